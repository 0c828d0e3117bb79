//! `statekeeper`: the command line. `state …` works against any PostgreSQL URL, no cluster needed.

mod output;
mod transfer;

use std::io::Write as _;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::engine::{
    ConnectionSettings, Error, ExportFormat, Framework, JanitorOptions, ResetApproval, SchemaName,
    Store, redact,
};

#[derive(Parser, Debug)]
#[command(
    name = "statekeeper",
    version,
    about = "Manage the Postgres state store of data-transformation frameworks"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Operate on a state store directly.
    State(StateArgs),
    /// Run the Kubernetes operator (reconciles StateStore resources).
    Operator(crate::controller::OperatorArgs),
    /// Print the CustomResourceDefinitions as YAML.
    Crd,
}

#[derive(Args, Debug)]
pub struct StateArgs {
    /// PostgreSQL URL, e.g. postgres://user:password@host:5432/db
    #[arg(
        long,
        env = "STATEKEEPER_DATABASE_URL",
        hide_env_values = true,
        global = true
    )]
    database_url: Option<String>,
    /// The framework whose state the store holds: statekeeper (statekeeper's own schema) or
    /// sqlmesh (SQLMesh's state tables, which SQLMesh creates and migrates).
    #[arg(
        long,
        env = "STATEKEEPER_FRAMEWORK",
        default_value = "statekeeper",
        global = true
    )]
    framework: Framework,
    /// Schema holding the state tables (default: statekeeper, or sqlmesh with --framework sqlmesh).
    #[arg(long, env = "STATEKEEPER_SCHEMA", global = true)]
    schema: Option<String>,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = OutputFormat::Text, global = true)]
    output: OutputFormat,
    /// Seconds to wait for another operation on the same store before giving up.
    #[arg(long, default_value_t = 30, global = true)]
    lock_timeout: u64,
    #[command(subcommand)]
    command: StateCommand,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum StateCommand {
    /// Create the schema and apply all migrations (idempotent).
    Init {
        /// Stop at this schema version instead of the latest.
        #[arg(long)]
        target_version: Option<i32>,
    },
    /// Show the store's versions, pending migrations, row counts and backups.
    Status,
    /// Take a backup now (before running `sqlmesh migrate` or any risky command by hand); prints
    /// its id, which `rollback --backup-id` restores.
    Backup,
    /// Back up, then apply pending migrations up to a target version (default: latest).
    #[command(visible_alias = "migrate")]
    Upgrade {
        #[arg(long)]
        target_version: Option<i32>,
    },
    /// Restore a backup (the newest unless --backup-id names one); the replaced state is backed up.
    Rollback {
        #[arg(long)]
        backup_id: Option<String>,
    },
    /// Drop every state table (a backup is kept). Needs --allow-reset and --auto-approve.
    Reset {
        /// Confirms that this store may be reset.
        #[arg(long)]
        allow_reset: bool,
        /// Confirms this reset without asking.
        #[arg(long)]
        auto_approve: bool,
    },
    /// Remove expired environments, old checkpoints and unreferenced versions, in batches.
    Janitor(JanitorArgs),
    /// Stream a versioned JSON export of the store to a file, an object store (S3, GCS, Azure) or
    /// stdout.
    Export(ExportArgs),
    /// Import an export from a file, an object store or stdin (validated fully before anything
    /// changes; a backup is kept).
    Import(ImportArgs),
    /// List backups, or drop one.
    Backups {
        #[command(subcommand)]
        command: Option<BackupsCommand>,
    },
}

#[derive(Args, Debug)]
struct ExportArgs {
    /// Destination: a path, file:///PATH, s3://BUCKET/KEY, gs://BUCKET/KEY,
    /// az://CONTAINER/KEY, or - for stdout.
    #[arg(long, value_name = "URL")]
    to: String,
    /// Object store option KEY=VALUE (endpoint, region, aws_access_key_id, ...); repeatable.
    /// AWS_*, GOOGLE_* and AZURE_* environment variables are read too.
    #[arg(long = "storage-option", value_name = "KEY=VALUE", value_parser = transfer::key_value)]
    storage_options: Vec<(String, String)>,
    /// Export only this environment (with every version it references); repeatable.
    #[arg(long = "environment", value_name = "NAME")]
    environments: Vec<String>,
    /// none, gzip or zstd.
    #[arg(long, default_value = "none")]
    compression: crate::engine::Compression,
    /// exact (every row of every table, history included: restores bit for bit), statekeeper
    /// (statekeeper's logical format, mergeable) or sqlmesh (the document `sqlmesh state export`
    /// writes).
    #[arg(long, default_value = "exact")]
    format: ExportFormat,
}

#[derive(Args, Debug)]
struct ImportArgs {
    /// Source: a path, file:///PATH, s3://BUCKET/KEY, gs://BUCKET/KEY, az://CONTAINER/KEY,
    /// or - for stdin. Compression is detected.
    #[arg(long, short = 'i', value_name = "URL")]
    from: String,
    /// Object store option KEY=VALUE (endpoint, region, aws_access_key_id, ...); repeatable.
    /// AWS_*, GOOGLE_* and AZURE_* environment variables are read too.
    #[arg(long = "storage-option", value_name = "KEY=VALUE", value_parser = transfer::key_value)]
    storage_options: Vec<(String, String)>,
    /// The store ends up equal to the file (the default).
    #[arg(long, conflicts_with = "merge")]
    replace: bool,
    /// Environments and versions in the file replace their namesakes; the rest stays.
    #[arg(long)]
    merge: bool,
    /// Refuse the file unless its sha256 is this hex digest.
    #[arg(long, value_name = "HEX")]
    sha256: Option<String>,
}

#[derive(Args, Debug)]
struct JanitorArgs {
    /// Report what would be removed; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Keep the newest N checkpoints of each environment.
    #[arg(long, default_value_t = 10, conflicts_with = "keep_all_checkpoints")]
    keep_checkpoints: u32,
    /// Never remove checkpoints.
    #[arg(long)]
    keep_all_checkpoints: bool,
    /// Checkpoints younger than this always survive (e.g. 7d, 36h).
    #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
    checkpoint_min_age: std::time::Duration,
    /// Unreferenced versions younger than this survive (protects plans in flight).
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    grace: std::time::Duration,
    /// Leave expired environments in place.
    #[arg(long)]
    keep_expired_environments: bool,
    /// The primary environment, never removed.
    #[arg(long, default_value = "prod")]
    unsuffixed_env: String,
    /// Rows removed per transaction.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    batch_size: u32,
}

impl JanitorArgs {
    fn options(&self) -> JanitorOptions {
        JanitorOptions {
            expired_environments: !self.keep_expired_environments,
            keep_checkpoints: (!self.keep_all_checkpoints).then_some(self.keep_checkpoints),
            checkpoint_min_age: self.checkpoint_min_age,
            version_grace: self.grace,
            unsuffixed_environment: self.unsuffixed_env.clone(),
            dry_run: self.dry_run,
            batch_size: self.batch_size,
        }
    }
}

#[derive(Subcommand, Debug)]
enum BackupsCommand {
    /// List backups (the default).
    List,
    /// Drop the backup with this id.
    Drop { backup_id: String },
}

/// Runs a `state` command; errors print one line (never a password) and exit non-zero.
pub async fn run_state(args: StateArgs) -> ExitCode {
    let secret = args
        .database_url
        .as_deref()
        .and_then(crate::engine::connection::password_in_url)
        .unwrap_or_default();
    match execute(&args).await {
        Ok(rendered) => {
            // Empty when the command's output was data on stdout (export --to -).
            if rendered.is_empty() {
                return ExitCode::SUCCESS;
            }
            let mut stdout = std::io::stdout().lock();
            match writeln!(stdout, "{rendered}").and_then(|()| stdout.flush()) {
                Ok(()) => ExitCode::SUCCESS,
                // The reader went away (`| head`): the work is done, stop quietly.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: cannot write the output: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Err(err) => {
            let message = redact(&err.to_string(), &[&secret]);
            match args.output {
                OutputFormat::Json => eprintln!(
                    "{}",
                    serde_json::json!({ "error": { "reason": err.reason(), "message": message } })
                ),
                OutputFormat::Text => eprintln!("error: {message}"),
            }
            ExitCode::FAILURE
        }
    }
}

async fn execute(args: &StateArgs) -> Result<String, Error> {
    let schema = SchemaName::new(
        args.schema
            .as_deref()
            .unwrap_or(args.framework.profile().default_schema),
    )?;
    let url = args.database_url.as_deref().ok_or_else(|| {
        Error::InvalidConnection(
            "no database URL: pass --database-url or set STATEKEEPER_DATABASE_URL".into(),
        )
    })?;
    // A bad destination or source fails before anything connects.
    if let StateCommand::Export(ExportArgs {
        to: location,
        storage_options,
        ..
    })
    | StateCommand::Import(ImportArgs {
        from: location,
        storage_options,
        ..
    }) = &args.command
    {
        transfer::Location::parse(location, storage_options)?;
    }
    let pool = ConnectionSettings::from_url(url)?.connect().await?;
    let store = Store::new(pool, schema)
        .with_framework(args.framework)
        .with_actor(format!("cli:{}", whoami()))
        .with_lock_timeout(std::time::Duration::from_secs(args.lock_timeout));
    let json = args.output == OutputFormat::Json;
    Ok(match &args.command {
        StateCommand::Init { target_version } => {
            output::init(&store.init(*target_version).await?, json)
        }
        StateCommand::Status => output::status(&store.status().await?, json),
        StateCommand::Backup => output::backup(&store.backup().await?, json),
        StateCommand::Upgrade { target_version } => {
            output::upgrade(&store.upgrade(*target_version).await?, json)
        }
        StateCommand::Rollback { backup_id } => {
            output::rollback(&store.rollback(backup_id.as_deref()).await?, json)
        }
        StateCommand::Reset {
            allow_reset,
            auto_approve,
        } => output::reset(
            &store
                .reset(ResetApproval {
                    allow_reset: *allow_reset,
                    approved: *auto_approve,
                })
                .await?,
            json,
        ),
        StateCommand::Janitor(janitor) => {
            // Names are only printed in JSON; text output shows counts.
            let mut released = Vec::new();
            let report = store
                .janitor(&janitor.options(), |name| {
                    if json {
                        released.push(name);
                    }
                })
                .await?;
            output::janitor(&report, &released, json)
        }
        StateCommand::Export(export) => {
            let location = transfer::Location::parse(&export.to, &export.storage_options)?;
            let options = crate::engine::ExportOptions {
                environments: (!export.environments.is_empty())
                    .then(|| export.environments.clone()),
                compression: export.compression,
                format: export.format,
            };
            let bar = transfer::progress("exporting");
            let report = match &location {
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
            output::exported(&report, &location.to_string(), json)
        }
        StateCommand::Import(import) => {
            let location = transfer::Location::parse(&import.from, &import.storage_options)?;
            let options = crate::engine::ImportOptions {
                mode: if import.merge {
                    crate::engine::ImportMode::Merge
                } else {
                    crate::engine::ImportMode::Replace
                },
                expected_sha256: import.sha256.clone(),
            };
            let bar = transfer::progress("importing");
            let report = match &location {
                transfer::Location::Std => {
                    store
                        .import(transfer::counted(tokio::io::stdin(), &bar), &options)
                        .await?
                }
                transfer::Location::Object(source) => {
                    let reader = source.open().await?;
                    store
                        .import(transfer::counted(reader, &bar), &options)
                        .await?
                }
            };
            bar.finish_and_clear();
            output::imported(&report, &location.to_string(), json)
        }
        StateCommand::Backups { command } => match command {
            None | Some(BackupsCommand::List) => output::backups(&store.backups().await?, json),
            Some(BackupsCommand::Drop { backup_id }) => {
                output::dropped_backup(&store.drop_backup(backup_id).await?, json)
            }
        },
    })
}

fn whoami() -> String {
    std::env::var("USER").unwrap_or_else(|_| "unknown".into())
}
