//! Import of export files (docs/export-format.md), whatever their format: the format is detected
//! from the document's header and each format's module reads its sections. The file is streamed
//! (memory stays flat) into a temporary staging table inside the import's transaction; only after
//! the whole file was read, its checksum matched and every check passed does the store change, in
//! the same transaction, with a backup of the replaced state. Any refusal leaves the store as it
//! was.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_compression::tokio::bufread::{GzipDecoder, ZstdDecoder};
use serde::Serialize;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::mpsc;

use super::Error;
use super::encryption::{self, Identities};
use super::exact;
use super::format::reader::{Emitter, SectionReader};
use super::format::staging::{Incoming, STREAM_ENDED};
use super::format::stream::{Header, Message};
use super::format::writer::Measure;
use super::framework::{ExportFormat, Framework};
use super::frameworks;
use super::io::Observed;
use super::jsonscan::{Cursor, ScanError};
use super::manifest::{MANIFEST_KEY, Manifest};
use super::store::Store;
use super::transfer::{Compression, ExportOptions, ImportOptions, ImportReport};

// ---------------------------------------------------------------------------------------------
// Reading: raw bytes are counted and hashed as they are read, before decompression.

type BoxedRead = Pin<Box<dyn AsyncRead + Send>>;

/// What a file's first bytes showed: the plaintext stream and how it was stored.
pub(crate) struct Decoded {
    /// The document, decrypted and decompressed.
    pub reader: BoxedRead,
    pub compression: Compression,
    /// How many age recipients the file is encrypted to (0: not encrypted).
    pub encrypted_to: usize,
}

/// Reads a stored file: counts and hashes its bytes as stored (`measure`), decrypts it with
/// `identities` when it is an age file, then detects gzip and zstd by their magic bytes and
/// returns the document. The shared first step of import, scan and verification.
pub(crate) async fn decoded<R: AsyncRead + Unpin + Send + 'static>(
    reader: R,
    measure: Arc<Mutex<Measure>>,
    identities: &Identities,
) -> Result<Decoded, Error> {
    let measured = Observed::new(reader, move |bytes: &[u8]| {
        if let Ok(mut m) = measure.lock() {
            m.add(bytes);
        }
    });
    let mut buffered = BufReader::with_capacity(256 * 1024, measured);
    let head = first_bytes(&mut buffered).await?;
    if !encryption::is_encrypted(head) {
        let (reader, compression) = decompressed(buffered).await?;
        return Ok(Decoded {
            reader,
            compression,
            encrypted_to: 0,
        });
    }
    let armored = !head.starts_with(b"age");
    let (plaintext, encrypted_to) = encryption::decrypt(buffered, armored, identities).await?;
    let (reader, compression) =
        decompressed(BufReader::with_capacity(256 * 1024, plaintext)).await?;
    Ok(Decoded {
        reader,
        compression,
        encrypted_to,
    })
}

/// Detects gzip and zstd by their magic bytes and returns the decompressed stream.
async fn decompressed<B: AsyncBufRead + Unpin + Send + 'static>(
    mut buffered: B,
) -> Result<(BoxedRead, Compression), Error> {
    let head = first_bytes(&mut buffered).await?;
    Ok(if head.starts_with(&[0x1f, 0x8b]) {
        (Box::pin(GzipDecoder::new(buffered)), Compression::Gzip)
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        (Box::pin(ZstdDecoder::new(buffered)), Compression::Zstd)
    } else {
        (Box::pin(buffered), Compression::None)
    })
}

/// The first bytes of a stream (without consuming them), or why there are none.
async fn first_bytes<B: AsyncBufRead + Unpin>(reader: &mut B) -> Result<&[u8], Error> {
    let head = reader
        .fill_buf()
        .await
        .map_err(|e| Error::InvalidExport(format!("cannot read the file: {e}")))?;
    if head.is_empty() {
        return Err(Error::InvalidExport("the file is empty".into()));
    }
    Ok(head)
}

// ---------------------------------------------------------------------------------------------
// Parsing: serde's streaming deserializer walks the document; rows go out in bounded batches.

/// Reads the whole document: the header, then every section through the format's reader.
fn read_document(
    cursor: &mut Cursor<&mut dyn std::io::Read>,
    emitter: &mut Emitter,
) -> Result<(), ScanError> {
    let mut position = 0;
    let mut metadata = Vec::new();
    let mut reader: Option<Box<dyn SectionReader>> = None;
    // Documents with a header (all but Meltano's) may end with a manifest.
    let mut has_header = false;
    let mut manifest: Option<Manifest> = None;
    cursor.object(|cursor, key| {
        position += 1;
        match (position, reader.as_mut()) {
            (_, Some(_)) if manifest.is_some() => Err(ScanError(format!(
                "\"{key}\" follows the manifest, which ends an export"
            ))),
            (_, Some(_)) if has_header && key == MANIFEST_KEY => {
                manifest = Some(serde_json::from_slice(&cursor.raw()?).map_err(|e| {
                    ScanError(format!("the export's manifest cannot be read: {e}"))
                })?);
                Ok(())
            }
            (_, Some(reader)) if has_header && !reader.digests_its_tables() => {
                let ((), digest) = cursor.digest(|cursor| reader.section(cursor, &key, emitter))?;
                emitter.digests.insert(key, digest);
                Ok(())
            }
            // A Meltano document's reader is set at its first key: every later key is a state.
            (_, Some(reader)) => reader.section(cursor, &key, emitter),
            (1, _) if key == "metadata" => {
                metadata = cursor.raw()?;
                emitter.digests.insert(key, sha256_hex(&metadata));
                Ok(())
            }
            // No metadata: the document `meltano state export` writes, keyed by state ID.
            (1, _) => {
                emitter
                    .send(Message::Header(
                        frameworks::meltano::import::Sections::header(),
                    ))
                    .map_err(ScanError)?;
                reader = Some(Box::new(frameworks::meltano::import::Sections));
                frameworks::meltano::import::Sections::state(cursor, &key, emitter)
            }
            (2, _) if key == "versions" => {
                let versions = cursor.raw()?;
                emitter.digests.insert(key, sha256_hex(&versions));
                let header = read_header(&metadata, &versions)?;
                let format = header.format;
                has_header = true;
                emitter.send(Message::Header(header)).map_err(ScanError)?;
                reader = Some(match format {
                    ExportFormat::Exact => Box::new(exact::Sections::default()),
                    ExportFormat::Statekeeper => {
                        Box::new(frameworks::statekeeper::import::Sections::default())
                    }
                    ExportFormat::Sqlmesh => Box::new(frameworks::sqlmesh::import::Sections::new()),
                    ExportFormat::Meltano | ExportFormat::MeltanoBackend => {
                        return Err(ScanError(
                            "a Meltano state document carries no metadata: this one is forged"
                                .into(),
                        ));
                    }
                });
                Ok(())
            }
            (2, _) => Err(ScanError("\"versions\" must follow \"metadata\"".into())),
            (_, None) => Err(ScanError("the header is incomplete".into())),
        }
    })?;
    if let Some(manifest) = manifest {
        manifest.check(&emitter.digests).map_err(ScanError)?;
        emitter.manifest = Some(manifest);
    }
    match reader {
        Some(mut reader) => reader.finish(emitter),
        // `{}`: a Meltano document without state.
        None if position == 0 => emitter
            .send(Message::Header(
                frameworks::meltano::import::Sections::header(),
            ))
            .map_err(ScanError),
        None => Err(ScanError(
            "the document has no \"metadata\" and \"versions\"".into(),
        )),
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Parses the whole document from a blocking reader, reads to the end (so the checksum covers
/// every byte), and only then sends `End`.
fn parse(mut reader: impl std::io::Read, tx: mpsc::Sender<Message>) -> Result<(), String> {
    let mut emitter = Emitter::new(tx);
    {
        let mut cursor = Cursor::new(&mut reader as &mut dyn std::io::Read);
        read_document(&mut cursor, &mut emitter).map_err(|e| e.0)?;
        cursor.end().map_err(|e| e.0)?;
    }
    emitter.finish()
}

// ---------------------------------------------------------------------------------------------

impl Store {
    /// Imports an export file of any format this store's framework reads. Compression and format
    /// are detected from the content.
    pub async fn import<R: AsyncRead + Unpin + Send + 'static>(
        &self,
        reader: R,
        options: &ImportOptions,
    ) -> Result<ImportReport, Error> {
        let started = Instant::now();
        let measure = Arc::new(Mutex::new(Measure::default()));
        let Decoded {
            reader: decoded,
            compression,
            ..
        } = decoded(reader, measure.clone(), &options.identities).await?;
        // A few batches in flight keep both sides busy; more would only hold memory.
        let (tx, mut rx) = mpsc::channel::<Message>(8);
        let bridge = tokio_util::io::SyncIoBridge::new(decoded);
        let parser = tokio::task::spawn_blocking(move || parse(bridge, tx));

        let result = self
            .import_parsed(Incoming::new(
                &mut rx,
                &measure,
                compression,
                options,
                started,
            ))
            .await;
        // Whatever happened, stop the parser (dropping the receiver) and surface its error first:
        // a truncated file explains a failure better than what followed from it.
        drop(rx);
        let parsed = parser
            .await
            .map_err(|e| Error::InvalidExport(format!("the reader stopped: {e}")))?;
        match (result, parsed) {
            (Err(Error::InvalidExport(reason)), Err(parse_error))
                if reason == STREAM_ENDED || reason.starts_with("cannot read") =>
            {
                Err(Error::InvalidExport(format!(
                    "the file is truncated or corrupt: {parse_error}"
                )))
            }
            (Err(e), _) => Err(e),
            (Ok(report), _) => Ok(report),
        }
    }

    async fn import_parsed(&self, mut incoming: Incoming<'_>) -> Result<ImportReport, Error> {
        let header = incoming.header().await?;
        let profile = self.profile();
        if !profile.supports_format(header.format) {
            let fits = Framework::ALL
                .iter()
                .find(|f| f.profile().supports_format(header.format))
                .map(|f| {
                    format!(
                        " (import it into a {} store: --framework {f})",
                        f.profile().display_name
                    )
                })
                .unwrap_or_default();
            return Err(Error::InvalidExport(format!(
                "it is a {} export, which {} stores do not read{fits}",
                header.format, profile.display_name
            )));
        }
        incoming
            .options
            .selection
            .check(self.framework(), incoming.options.mode)?;
        if header.format == ExportFormat::Exact && !incoming.options.selection.is_empty() {
            return Err(Error::InvalidOperation(format!(
                "an exact export is restored whole (it holds every row of every table, not \
                 {}); restore in part from a {} export, or from a backup with --backup-id",
                self.profile().entities.noun,
                self.logical_format()
            )));
        }
        match header.format {
            ExportFormat::Exact => exact::import(self, header, &mut incoming).await,
            ExportFormat::Statekeeper => {
                frameworks::statekeeper::import::import(self, header, &mut incoming).await
            }
            ExportFormat::Sqlmesh => {
                frameworks::sqlmesh::import::import(self, header, &mut incoming).await
            }
            ExportFormat::Meltano | ExportFormat::MeltanoBackend => {
                frameworks::meltano::import::import(self, header, &mut incoming).await
            }
        }
    }

    /// Makes this store equal to `source`, a store of the same framework and schema version: an
    /// exact export of the source (one snapshot) streamed straight into an exact import here (one
    /// transaction, with a backup of what it replaces). No file, memory bounded by the pipe.
    pub async fn copy_from(&self, source: &Store) -> Result<ImportReport, Error> {
        self.refuse_copy_across_frameworks(source)?;
        let (writer, reader) = tokio::io::duplex(1 << 20);
        let options = ExportOptions {
            environments: None,
            compression: Compression::None,
            format: ExportFormat::Exact,
            ..Default::default()
        };
        let export = async move {
            source
                .export(writer, &options)
                .await
                .map(|(report, _)| report)
        };
        let replace = ImportOptions::replace();
        let import = self.import(reader, &replace);
        let (exported, imported) = tokio::join!(export, import);
        match (exported, imported) {
            // The import stopped reading first (it refused the data): its reason is the news.
            (Err(Error::ExportWrite(_)), Err(e)) => Err(e),
            (Err(e), _) => Err(e),
            (Ok(_), imported) => imported,
        }
    }
}

impl Store {
    /// Restores from the in-database backup `backup_id` (see [`super::backup`]) what `options`
    /// selects, as a merge: the backup's schema, read as a store of this framework, is exported
    /// in the framework's logical format (one snapshot) and streamed straight into a merge import
    /// here (one transaction under the store's lock, with a backup of the store first). No file;
    /// memory bounded by the pipe.
    pub async fn import_from_backup(
        &self,
        backup_id: &str,
        options: &ImportOptions,
    ) -> Result<ImportReport, Error> {
        let source = self.backup_as_store(backup_id).await?;
        if options.mode == super::transfer::ImportMode::Replace {
            return Err(Error::InvalidOperation(format!(
                "an import from backup {backup_id} is a merge (of some of it: --environment, \
                 --model, --state-id); to make the store equal to the backup, roll back: \
                 `statekeeper state rollback --backup-id {backup_id}`"
            )));
        }
        if options.expected_sha256.is_some() {
            return Err(Error::InvalidOperation(
                "a checksum pins a file; a backup is read from the database, not a file".into(),
            ));
        }
        options.selection.check(self.framework(), options.mode)?;
        let (writer, reader) = tokio::io::duplex(1 << 20);
        // Environments (or state IDs) alone are chosen by the export already; a model is found
        // among all the backup's snapshots, on the import's side.
        let selection = &options.selection;
        let chosen = match self.framework() {
            Framework::Meltano => selection.state_ids.clone(),
            _ if selection.models.is_empty() => selection.environments.clone(),
            _ => Vec::new(),
        };
        let export_options = ExportOptions {
            format: self.logical_format(),
            environments: (!chosen.is_empty()).then_some(chosen),
            ..Default::default()
        };
        let backup_store = source.clone();
        let export = async move {
            source
                .export(writer, &export_options)
                .await
                .map(|(report, _)| report)
        };
        let import = self.import(reader, options);
        let (exported, imported) = tokio::join!(export, import);
        let renamed = |e: Error| match e {
            Error::NothingToRestore {
                what,
                names,
                available,
                ..
            } => Error::NothingToRestore {
                source_name: format!("backup {backup_id}"),
                what,
                names,
                available,
            },
            other => other,
        };
        let mut report = match (exported, imported) {
            (Err(Error::UnknownEnvironments { names, .. }), _) => {
                return Err(self.not_in_backup(&backup_store, backup_id, &names).await);
            }
            // The import stopped reading first (it refused the data): its reason is the news.
            (Err(Error::ExportWrite(_)), Err(e)) => return Err(renamed(e)),
            (Err(e), _) => return Err(e),
            (Ok(_), imported) => imported.map_err(renamed)?,
        };
        report.source_store = format!("backup {backup_id}");
        Ok(report)
    }

    /// The error of a restore in part from a backup that lacks `missing` (environments or state
    /// IDs), naming what the backup has.
    async fn not_in_backup(&self, backup: &Store, backup_id: &str, missing: &[String]) -> Error {
        let entities = &self.profile().entities;
        let existing = async {
            let mut conn = self.pool().acquire().await?;
            sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(format!(
                "SELECT {key}::text FROM {}.{} ORDER BY 1",
                backup.schema().quoted(),
                super::identifier::quote_ident(entities.table),
                key = super::identifier::quote_ident(entities.key),
            )))
            .fetch_all(&mut *conn)
            .await
        }
        .await
        .unwrap_or_default();
        let what = match self.framework() {
            Framework::Meltano => "state ID",
            _ => "environment",
        };
        super::format::selection::nothing_to_restore(
            format!("backup {backup_id}"),
            what,
            missing,
            &existing,
        )
    }

    /// The backup `backup_id` of this store, read as a store of its own (its schema).
    async fn backup_as_store(&self, backup_id: &str) -> Result<Store, Error> {
        super::backup::validate_backup_id(backup_id)?;
        let info = {
            let mut conn = self.pool().acquire().await?;
            super::backup::find(&mut conn, self.schema(), Some(backup_id)).await?
        };
        if info.framework != self.framework() {
            return Err(Error::IncompatibleBackup {
                id: backup_id.to_owned(),
                reason: format!(
                    "it holds a {} store, this store is {}",
                    info.framework.profile().display_name,
                    self.profile().display_name
                ),
            });
        }
        Ok(
            Store::new(self.pool().clone(), self.schema().backup_of(backup_id))
                .with_framework(self.framework())
                .beside_other_frameworks(true),
        )
    }

    /// The format this store's framework merges: its own logical format.
    fn logical_format(&self) -> ExportFormat {
        match self.framework() {
            Framework::Statekeeper => ExportFormat::Statekeeper,
            Framework::Sqlmesh => ExportFormat::Sqlmesh,
            Framework::Meltano => ExportFormat::Meltano,
        }
    }
}

/// What a file holds, read to its end without a database.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ScanReport {
    pub format: ExportFormat,
    pub compression: Compression,
    pub environments: u64,
    /// Rows per section or table.
    pub rows: BTreeMap<String, u64>,
    pub bytes: u64,
    pub sha256: String,
    /// The manifest the file carries, which every table matched (none in older files and in
    /// Meltano's format).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub manifest: Option<Manifest>,
    /// How many age recipients the file is encrypted to (0: not encrypted).
    #[serde(skip_serializing_if = "is_zero")]
    pub encrypted_to: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// Reads a whole file as an import would, without a database: its format, rows and checksum, or
/// why it cannot be imported (compression, structure, header, every row's shape). The checks
/// that need the store (versions, references, duplicates) come on import.
pub async fn scan<R: AsyncRead + Unpin + Send + 'static>(reader: R) -> Result<ScanReport, Error> {
    scan_decrypting(reader, &Identities::default()).await
}

/// [`scan`] of a file that may be encrypted, decrypted with `identities`.
pub async fn scan_decrypting<R: AsyncRead + Unpin + Send + 'static>(
    reader: R,
    identities: &Identities,
) -> Result<ScanReport, Error> {
    let measure = Arc::new(Mutex::new(Measure::default()));
    let Decoded {
        reader: decoded,
        compression,
        encrypted_to,
    } = decoded(reader, measure.clone(), identities).await?;
    let (tx, mut rx) = mpsc::channel::<Message>(8);
    let bridge = tokio_util::io::SyncIoBridge::new(decoded);
    let parser = tokio::task::spawn_blocking(move || parse(bridge, tx));
    let mut format = None;
    let mut end = None;
    while let Some(message) = rx.recv().await {
        match message {
            Message::Header(header) if format.is_none() => format = Some(header.format),
            Message::Header(_) => {
                return Err(Error::InvalidExport("the header appears twice".into()));
            }
            Message::End {
                counts,
                environments,
                manifest,
            } => end = Some((counts, environments, manifest)),
            Message::Rows(_) | Message::Table { .. } => {}
        }
    }
    parser
        .await
        .map_err(|e| Error::InvalidExport(format!("the reader stopped: {e}")))?
        .map_err(|e| Error::InvalidExport(format!("the file is truncated or corrupt: {e}")))?;
    let (Some(format), Some((rows, environments, manifest))) = (format, end) else {
        return Err(Error::InvalidExport(STREAM_ENDED.into()));
    };
    let (bytes, sha256) = std::mem::take(
        &mut *measure
            .lock()
            .map_err(|_| Error::InvalidExport("checksum state poisoned".into()))?,
    )
    .finish();
    Ok(ScanReport {
        format,
        compression,
        environments,
        rows,
        bytes,
        sha256,
        manifest,
        encrypted_to,
    })
}

/// Parses the header of a document (at `metadata`, then `versions`) and detects the format.
fn read_header(metadata: &[u8], versions: &[u8]) -> Result<Header, ScanError> {
    let parse = |bytes: &[u8], what: &str| -> Result<serde_json::Value, ScanError> {
        match serde_json::from_slice::<serde_json::Value>(bytes) {
            Ok(value) if value.is_object() => Ok(value),
            Ok(_) => Err(ScanError(format!("\"{what}\" must be an object"))),
            Err(e) => Err(ScanError(format!("\"{what}\" is not valid JSON: {e}"))),
        }
    };
    let metadata = parse(metadata, "metadata")?;
    let versions = parse(versions, "versions")?;
    let format = if metadata.get("format").and_then(|f| f.as_str()) == Some(exact::FORMAT) {
        ExportFormat::Exact
    } else if versions.get("sqlmesh_version").is_some() {
        ExportFormat::Sqlmesh
    } else if versions.get("statekeeper_version").is_some() {
        ExportFormat::Statekeeper
    } else {
        return Err(ScanError(
            "not a statekeeper or SQLMesh export: \"versions\" names neither".into(),
        ));
    };
    Ok(Header {
        format,
        metadata,
        versions,
    })
}
