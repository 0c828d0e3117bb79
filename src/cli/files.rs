//! `state export`, `state import` and `state verify`: their arguments and how they run, files
//! and object stores alike.

use clap::Args;

use super::{output, restore, transfer};
use crate::engine::{Error, ExportFormat, MeltanoLocks, Store};

#[derive(Args, Debug)]
pub(super) struct ExportArgs {
    /// Destination: a path, file:///PATH, s3://BUCKET/KEY, gs://BUCKET/KEY,
    /// az://CONTAINER/KEY, or - for stdout.
    #[arg(long, value_name = "URL")]
    pub(super) to: String,
    /// Object store option KEY=VALUE (endpoint, region, aws_access_key_id, ...); repeatable.
    /// AWS_*, GOOGLE_* and AZURE_* environment variables are read too.
    #[arg(long = "storage-option", value_name = "KEY=VALUE", value_parser = transfer::key_value)]
    pub(super) storage_options: Vec<(String, String)>,
    /// Export only this environment (with every version it references); repeatable. For a
    /// Meltano store: a state ID, or a `*` glob of them (alias --state-id).
    #[arg(long = "environment", visible_alias = "state-id", value_name = "NAME")]
    pub(super) environments: Vec<String>,
    /// none, gzip or zstd.
    #[arg(long, default_value = "none")]
    pub(super) compression: crate::engine::Compression,
    /// exact (every row of every table, history included: restores bit for bit), statekeeper
    /// (statekeeper's logical format, mergeable), sqlmesh (the document `sqlmesh state export`
    /// writes), meltano (the document `meltano state export` writes) or meltano-backend (one
    /// <STATE_ID>/state.json per state ID below --to, as Meltano's file state backends keep them).
    #[arg(long, default_value = "exact")]
    pub(super) format: ExportFormat,
    /// Encrypt the export with age to this public key (age1…), after compressing it; repeatable
    /// (any one of the identities decrypts it). A value that is not a key is read as a
    /// recipients file: one age1… key a line, # comments allowed.
    #[arg(long = "encrypt-to", value_name = "RECIPIENT|FILE")]
    pub(super) encrypt_to: Vec<String>,
    #[command(flatten)]
    pub(super) meltano_locks: MeltanoLockArgs,
}

/// The age identities that decrypt an encrypted export.
#[derive(Args, Debug)]
pub(super) struct IdentityArgs {
    /// An age identity file (the AGE-SECRET-KEY-1… file `age-keygen` writes) to decrypt an
    /// encrypted file with; repeatable. Encryption is detected from the file.
    #[arg(long = "identity", value_name = "FILE")]
    pub(super) identity: Vec<std::path::PathBuf>,
}

impl IdentityArgs {
    pub(super) fn identities(&self) -> Result<crate::engine::Identities, Error> {
        let mut identities = crate::engine::Identities::default();
        for path in &self.identity {
            identities.extend(crate::engine::Identities::from_file(path)?);
        }
        Ok(identities)
    }
}

impl ExportArgs {
    /// Every `--encrypt-to`: a public key, or a recipients file.
    pub(super) fn recipients(&self) -> Result<crate::engine::Recipients, Error> {
        let mut recipients = crate::engine::Recipients::default();
        for value in &self.encrypt_to {
            let path = std::path::Path::new(value);
            recipients.extend(
                if value.trim_start().starts_with("age1") || !path.exists() {
                    crate::engine::Recipients::parse(value, "--encrypt-to")?
                } else {
                    let origin = format!("recipients file {value}");
                    let text =
                        std::fs::read_to_string(path).map_err(|_| Error::InvalidEncryptionKey {
                            origin: origin.clone(),
                            line: None,
                            problem: "cannot be read as text",
                        })?;
                    crate::engine::Recipients::parse(&text, &origin)?
                },
            );
        }
        Ok(recipients)
    }
}

/// How Meltano's lock files are honoured (`--format meltano-backend`).
#[derive(Args, Debug)]
pub(super) struct MeltanoLockArgs {
    /// Meltano's state_backend.lock_timeout_seconds: a younger lock file is held by a writer.
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    pub(super) meltano_lock_timeout: u64,
    /// How long to wait for a held lock before failing with the state ID it guards.
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    pub(super) meltano_lock_wait: u64,
}

impl ImportArgs {
    pub(super) fn format(&self) -> ExportFormat {
        self.format.unwrap_or_default()
    }
}

impl MeltanoLockArgs {
    pub(super) fn locks(&self) -> MeltanoLocks {
        MeltanoLocks {
            timeout: std::time::Duration::from_secs(self.meltano_lock_timeout),
            wait: std::time::Duration::from_secs(self.meltano_lock_wait),
        }
    }
}

#[derive(Args, Debug)]
pub(super) struct ImportArgs {
    /// Source: a path, file:///PATH, s3://BUCKET/KEY, gs://BUCKET/KEY, az://CONTAINER/KEY,
    /// or - for stdin. Compression is detected.
    #[arg(
        long,
        short = 'i',
        value_name = "URL",
        required_unless_present = "backup_id"
    )]
    pub(super) from: Option<String>,
    /// Merge from this in-database backup (`state backups`) instead of a file: with
    /// --environment, --model or --state-id, restores that part of it.
    #[arg(long, value_name = "ID", conflicts_with_all = ["from", "format", "sha256"])]
    pub(super) backup_id: Option<String>,
    /// Object store option KEY=VALUE (endpoint, region, aws_access_key_id, ...); repeatable.
    /// AWS_*, GOOGLE_* and AZURE_* environment variables are read too.
    #[arg(long = "storage-option", value_name = "KEY=VALUE", value_parser = transfer::key_value)]
    pub(super) storage_options: Vec<(String, String)>,
    /// The store ends up equal to the file: what it holds beyond the file (environments, state
    /// IDs) is removed, kept only in the backup. Never implied; an exact export needs it.
    #[arg(long, conflicts_with = "merge")]
    pub(super) replace: bool,
    /// What the file holds replaces its namesakes; the rest stays (the default, as
    /// `sqlmesh state import` and `meltano state import` do).
    #[arg(long)]
    pub(super) merge: bool,
    #[command(flatten)]
    pub(super) selection: restore::SelectionArgs,
    /// Refuse the file unless its sha256 is this hex digest.
    #[arg(long, value_name = "HEX")]
    sha256: Option<String>,
    #[command(flatten)]
    pub(super) identities: IdentityArgs,
    /// meltano-backend: read every <STATE_ID>/state.json below --from (a Meltano file state
    /// backend's folder or prefix). Files are otherwise recognised by their content.
    #[arg(long, value_name = "FORMAT", value_parser = only_meltano_backend)]
    pub(super) format: Option<ExportFormat>,
    #[command(flatten)]
    pub(super) meltano_locks: MeltanoLockArgs,
    #[command(flatten)]
    pub repoint: super::views::RepointArgs,
}

#[derive(Args, Debug)]
pub(super) struct VerifyArgs {
    /// The export: a path, file:///PATH, s3://BUCKET/KEY, gs://BUCKET/KEY, az://CONTAINER/KEY,
    /// or - for stdin. Compression is detected.
    #[arg(long, short = 'i', value_name = "URL")]
    pub(super) from: String,
    /// Object store option KEY=VALUE (endpoint, region, aws_access_key_id, ...); repeatable.
    /// AWS_*, GOOGLE_* and AZURE_* environment variables are read too.
    #[arg(long = "storage-option", value_name = "KEY=VALUE", value_parser = transfer::key_value)]
    pub(super) storage_options: Vec<(String, String)>,
    /// The file's sha256 as exported (a StateExport's `status.sha256`): the stored bytes must
    /// have it. Needed for Meltano-format files, which carry no manifest.
    #[arg(long, value_name = "HEX")]
    sha256: Option<String>,
    #[command(flatten)]
    pub(super) identities: IdentityArgs,
}

/// `state import --format`: the one format that is not a file, so not detected from one.
pub(super) fn only_meltano_backend(text: &str) -> Result<ExportFormat, String> {
    match text.parse()? {
        ExportFormat::MeltanoBackend => Ok(ExportFormat::MeltanoBackend),
        other => Err(format!(
            "{other} files are recognised by their content: leave --format out (only \
             meltano-backend, a folder, needs it)"
        )),
    }
}

/// `state export`: to stdout, a file or object store, or a Meltano state backend's layout.
pub(super) async fn export_state(
    store: &Store,
    export: &ExportArgs,
    json: bool,
) -> Result<String, Error> {
    let location = transfer::Location::parse(&export.to, &export.storage_options, export.format)?;
    let options = crate::engine::ExportOptions {
        environments: (!export.environments.is_empty()).then(|| export.environments.clone()),
        compression: export.compression,
        format: export.format,
        recipients: export.recipients()?,
    };
    let bar = transfer::progress("exporting");
    let report = match &location {
        transfer::Location::Object(prefix) if export.format == ExportFormat::MeltanoBackend => {
            store
                .export_meltano_backend(prefix, &options, export.meltano_locks.locks())
                .await?
        }
        transfer::Location::Std => {
            let out = transfer::counted(tokio::io::stdout(), &bar);
            store.export(out, &options).await?.0
        }
        transfer::Location::Object(destination) => {
            let progress = bar.clone();
            store
                .export_to(destination, &options, move |bytes: &[u8]| {
                    progress.inc(bytes.len() as u64)
                })
                .await?
        }
    };
    bar.finish_and_clear();
    Ok(output::exported(&report, &location.to_string(), json))
}

/// `state import`: from stdin, a file or object store, or a Meltano state backend's layout.
pub(super) async fn import_state(
    store: &Store,
    import: &ImportArgs,
    json: bool,
) -> Result<(String, Option<crate::engine::BackupInfo>), Error> {
    let options = crate::engine::ImportOptions {
        mode: import_mode(import.replace),
        expected_sha256: import.sha256.clone(),
        identities: import.identities.identities()?,
        selection: import.selection.selection(import.merge)?,
    };
    let from = match (&import.from, &import.backup_id) {
        (Some(from), _) => from,
        (None, Some(id)) => {
            let report = store.import_from_backup(id, &options).await?;
            let rendered = output::imported(&report, &format!("backup {id}"), json);
            return Ok((rendered, report.backup));
        }
        (None, None) => {
            return Err(Error::InvalidOperation(
                "name the source: --from URL or --backup-id ID".into(),
            ));
        }
    };
    let location = transfer::Location::parse(from, &import.storage_options, import.format())?;
    let bar = transfer::progress("importing");
    let report = match &location {
        transfer::Location::Object(prefix) if import.format.is_some() => {
            store
                .import_meltano_backend(prefix, &options, import.meltano_locks.locks())
                .await?
        }
        location => store.import(location.open(&bar).await?, &options).await?,
    };
    bar.finish_and_clear();
    let rendered = output::imported(&report, &location.to_string(), json);
    Ok((rendered, report.backup))
}

/// `state verify`: the file read back from its location, never from memory.
pub(super) async fn verify_export(
    store: &Store,
    verify: &VerifyArgs,
    json: bool,
) -> Result<String, Error> {
    let location =
        transfer::Location::parse(&verify.from, &verify.storage_options, ExportFormat::Exact)?;
    let options = crate::engine::VerifyOptions {
        expected_sha256: verify.sha256.clone(),
        identities: verify.identities.identities()?,
    };
    let bar = transfer::progress("verifying");
    let report = store.verify(location.open(&bar).await?, &options).await?;
    bar.finish_and_clear();
    Ok(output::verified(&report, &location.to_string(), json))
}

/// Replace only when asked; merge otherwise.
pub(super) fn import_mode(replace: bool) -> crate::engine::ImportMode {
    if replace {
        crate::engine::ImportMode::Replace
    } else {
        crate::engine::ImportMode::Merge
    }
}
