//! Import of export files (docs/export-format.md), whatever their format: the format is detected
//! from the document's header and each format's module reads its sections. The file is streamed
//! (memory stays flat) into a temporary staging table inside the import's transaction; only after
//! the whole file was read, its checksum matched and every check passed does the store change, in
//! the same transaction, with a backup of the replaced state. Any refusal leaves the store as it
//! was.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_compression::tokio::bufread::{GzipDecoder, ZstdDecoder};
use serde::Serialize;
use sqlx::{AssertSqlSafe, PgConnection};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::mpsc;

use super::Error;
use super::backup::BackupInfo;
use super::catalog;
use super::copy_binary::BINARY_SIGNATURE;
use super::exact;
use super::export::{Compression, Measure};
use super::frameworks::{self, ExportFormat};
use super::identifier::{quote_ident, quote_literal};
use super::io::Observed;
pub(crate) use super::jsonscan::{Cursor, ScanError};
use super::store::Store;

/// How an import treats what the store holds. No default: replacing is never implied (the CLI
/// and StateMigrations merge unless told to replace, as `sqlmesh state import` and
/// `meltano state import` do).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ImportMode {
    /// The store ends up equal to the file.
    Replace,
    /// What the file holds replaces its namesakes in the store; everything else stays.
    Merge,
}

#[derive(Clone, Debug)]
pub struct ImportOptions {
    pub mode: ImportMode,
    /// Refuse the file unless its sha256 (of the bytes as stored) is this hex digest.
    pub expected_sha256: Option<String>,
}

impl ImportOptions {
    pub fn replace() -> Self {
        Self {
            mode: ImportMode::Replace,
            expected_sha256: None,
        }
    }

    pub fn merge() -> Self {
        Self {
            mode: ImportMode::Merge,
            expected_sha256: None,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct ImportReport {
    /// The framework of the store imported into.
    pub framework: super::frameworks::Framework,
    pub mode: ImportMode,
    /// The file's format, detected from its content.
    pub format: ExportFormat,
    /// The schema the file was exported from, when the format records it.
    pub source_store: String,
    pub schema_version: i32,
    pub environments: u64,
    /// Rows read from the file, per section or table.
    pub rows: BTreeMap<String, u64>,
    pub bytes: u64,
    pub sha256: String,
    pub compression: Compression,
    /// The store as it was before the import.
    pub backup: Option<BackupInfo>,
    /// A replace: what the store held that the file does not (gone now, kept in the backup).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub removed: Option<Removed>,
    #[serde(skip)]
    pub duration: Duration,
}

/// What a replace removed: the store's environments (or Meltano state IDs) that the file does
/// not have.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Removed {
    /// "environments" or "state IDs".
    pub what: String,
    pub count: u64,
    /// The first of them by name (at most [`REMOVED_NAMES`]).
    pub names: Vec<String>,
}

impl ImportReport {
    /// What the import did to what the store held, in one line.
    pub fn effect(&self) -> String {
        match &self.removed {
            None => "merged: what the file holds replaced its namesakes, the rest stayed".into(),
            Some(removed) if removed.count == 0 => format!(
                "replaced the store's state: every one of its {} is in the file",
                removed.what
            ),
            Some(removed) => format!(
                "replaced the store's state: removed {} the file does not have ({}{})",
                super::words::counted(removed.count, &removed.what),
                removed.names.join(", "),
                if removed.count > removed.names.len() as u64 {
                    ", …"
                } else {
                    ""
                }
            ),
        }
    }
}

/// How many removed names a report lists.
pub const REMOVED_NAMES: i64 = 10;

/// Before a replace deletes anything: remembers the names of the store's entities (a temporary
/// table, dropped at commit) for [`removed_by_replace`].
pub(crate) async fn remember_entities(store: &Store, conn: &mut PgConnection) -> Result<(), Error> {
    let entities = &store.profile().entities;
    let present = catalog::table_exists(conn, store.schema().as_str(), entities.table).await?;
    let source = if present {
        format!(
            "SELECT {}::text AS name FROM {}.{}",
            quote_ident(entities.key),
            store.schema().quoted(),
            quote_ident(entities.table)
        )
    } else {
        "SELECT NULL::text AS name WHERE false".to_owned()
    };
    sqlx::query(AssertSqlSafe(format!(
        "CREATE TEMPORARY TABLE statekeeper_entities_before ON COMMIT DROP AS {source}"
    )))
    .execute(conn)
    .await?;
    Ok(())
}

/// After a replace wrote the file's state: the remembered entities that are gone.
pub(crate) async fn removed_by_replace(
    store: &Store,
    conn: &mut PgConnection,
) -> Result<Removed, Error> {
    let entities = &store.profile().entities;
    let (count, names): (i64, Vec<String>) = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT count(*), coalesce((array_agg(name ORDER BY name))[1:{REMOVED_NAMES}], '{{}}') \
         FROM statekeeper_entities_before b \
         WHERE NOT EXISTS (SELECT 1 FROM {}.{} t WHERE t.{}::text = b.name)",
        store.schema().quoted(),
        quote_ident(entities.table),
        quote_ident(entities.key)
    )))
    .fetch_one(conn)
    .await?;
    Ok(Removed {
        what: entities.noun.to_owned(),
        count: count.max(0) as u64,
        names,
    })
}

// ---------------------------------------------------------------------------------------------
// Reading: raw bytes are counted and hashed as they are read, before decompression.

type BoxedRead = Pin<Box<dyn AsyncRead + Send>>;

/// Detects gzip and zstd by their magic bytes and returns the decompressed stream.
async fn decoded<R: AsyncRead + Unpin + Send + 'static>(
    reader: R,
    measure: Arc<Mutex<Measure>>,
) -> Result<(BoxedRead, Compression), Error> {
    let measured = Observed::new(reader, move |bytes: &[u8]| {
        if let Ok(mut m) = measure.lock() {
            m.add(bytes);
        }
    });
    let mut buffered = BufReader::with_capacity(256 * 1024, measured);
    let head = buffered
        .fill_buf()
        .await
        .map_err(|e| Error::InvalidExport(format!("cannot read the file: {e}")))?;
    if head.is_empty() {
        return Err(Error::InvalidExport("the file is empty".into()));
    }
    Ok(if head.starts_with(&[0x1f, 0x8b]) {
        (Box::pin(GzipDecoder::new(buffered)), Compression::Gzip)
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        (Box::pin(ZstdDecoder::new(buffered)), Compression::Zstd)
    } else {
        (Box::pin(buffered), Compression::None)
    })
}

// ---------------------------------------------------------------------------------------------
// Parsing: serde's streaming deserializer walks the document; rows go out in bounded batches.

/// Staged rows go by COPY's binary format: each value is its length and its bytes, so the server
/// neither scans for quotes and delimiters (CSV parsing had been the largest part of its
/// staging work) nor unescapes anything.
const COPY_BINARY: &str = "WITH (FORMAT binary)";
/// After the signature: no flags, no header extension.
const BINARY_FLAGS_AND_EXTENSION: [u8; 8] = [0; 8];
/// A field count of -1.
const BINARY_TRAILER: &[u8] = &[0xff, 0xff];
/// The binary form of `jsonb` is a version byte before its text.
const JSONB_VERSION: u8 = 1;

/// One staged row, under its section (or target table): a JSON document with a key (the
/// environment, JSON-encoded, or empty), or a list of PostgreSQL text values.
pub(crate) enum Row {
    Json {
        section: Arc<str>,
        key: String,
        doc: String,
    },
    Fields {
        section: Arc<str>,
        fields: Vec<Option<String>>,
    },
}

impl Row {
    fn section(&self) -> &Arc<str> {
        match self {
            Row::Json { section, .. } | Row::Fields { section, .. } => section,
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Row::Json { doc, key, .. } => doc.len() + key.len(),
            Row::Fields { fields, .. } => fields.iter().flatten().map(String::len).sum(),
        }
    }

    /// The row as staging COPY input: `section, environment, doc, f1 … f{width}`, each text
    /// value its own field (no array literal for the server to parse, nor to take apart again
    /// for every value read), NULL for what the row has not.
    fn encode(&self, width: usize, out: &mut Vec<u8>) -> Result<(), Error> {
        push_field_count(3 + width, out)?;
        push_field(Some(self.section().as_bytes()), out)?;
        let used = match self {
            Row::Json { key, doc, .. } => {
                push_field((!key.is_empty()).then_some(key.as_bytes()), out)?;
                push_length(doc.len() + 1, out)?;
                out.push(JSONB_VERSION);
                out.extend_from_slice(doc.as_bytes());
                0
            }
            Row::Fields { fields, section } => {
                if fields.len() > width {
                    return Err(Error::InvalidExport(format!(
                        "a row of {section} has {} values, more than the {width} columns of any \
                         table it can go to",
                        fields.len()
                    )));
                }
                push_field(None, out)?;
                push_field(None, out)?;
                for field in fields {
                    push_field(field.as_deref().map(str::as_bytes), out)?;
                }
                fields.len()
            }
        };
        for _ in used..width {
            push_field(None, out)?;
        }
        Ok(())
    }

    /// The row's values as COPY input of text columns; a JSON row is its key and document.
    fn encode_fields(&self, out: &mut Vec<u8>) -> Result<(), Error> {
        match self {
            Row::Json { key, doc, .. } => {
                push_field_count(2, out)?;
                push_field(Some(key.as_bytes()), out)?;
                push_field(Some(doc.as_bytes()), out)
            }
            Row::Fields { fields, .. } => {
                push_field_count(fields.len(), out)?;
                for field in fields {
                    push_field(field.as_deref().map(str::as_bytes), out)?;
                }
                Ok(())
            }
        }
    }
}

fn push_field_count(count: usize, out: &mut Vec<u8>) -> Result<(), Error> {
    let count = i16::try_from(count).map_err(|_| {
        Error::InvalidExport(format!("a row has {count} values, too many to stage"))
    })?;
    out.extend_from_slice(&count.to_be_bytes());
    Ok(())
}

/// One value of a binary COPY row: its length and bytes, or -1 for NULL.
fn push_field(value: Option<&[u8]>, out: &mut Vec<u8>) -> Result<(), Error> {
    match value {
        Some(bytes) => {
            push_length(bytes.len(), out)?;
            out.extend_from_slice(bytes);
        }
        None => out.extend_from_slice(&(-1i32).to_be_bytes()),
    }
    Ok(())
}

fn push_length(length: usize, out: &mut Vec<u8>) -> Result<(), Error> {
    let length = i32::try_from(length).map_err(|_| {
        Error::InvalidExport(format!(
            "a value of {length} bytes is larger than PostgreSQL takes"
        ))
    })?;
    out.extend_from_slice(&length.to_be_bytes());
    Ok(())
}

/// The opening of every document: its format, `metadata` and `versions`.
pub(crate) struct Header {
    pub format: ExportFormat,
    pub metadata: serde_json::Value,
    pub versions: serde_json::Value,
}

impl Header {
    pub fn metadata_str(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).and_then(|v| v.as_str())
    }

    pub fn versions_str(&self, key: &str) -> Option<&str> {
        self.versions.get(key).and_then(|v| v.as_str())
    }

    /// `metadata.file_version` and `metadata.importable`, which every format has.
    pub fn check_importable(&self, supported_file_version: u64) -> Result<(), Error> {
        match self.metadata.get("file_version").and_then(|v| v.as_u64()) {
            Some(v) if v == supported_file_version => {}
            Some(v) => {
                return Err(Error::InvalidExport(format!(
                    "file version {v} is not supported (this statekeeper reads version {supported_file_version})"
                )));
            }
            None => {
                return Err(Error::InvalidExport(
                    "metadata.file_version is missing or not a number".into(),
                ));
            }
        }
        if self.metadata.get("importable").and_then(|v| v.as_bool()) != Some(true) {
            return Err(Error::InvalidExport(
                "the file is marked as not importable (for example an export of local, \
                 unversioned snapshots)"
                    .into(),
            ));
        }
        Ok(())
    }

    /// `versions.schema_version` as a number.
    pub fn schema_version(&self) -> Result<i32, Error> {
        self.versions
            .get("schema_version")
            .and_then(|v| v.as_i64())
            .and_then(|v| i32::try_from(v).ok())
            .ok_or_else(|| {
                Error::InvalidExport("versions.schema_version is missing or not a number".into())
            })
    }
}

pub(crate) enum Message {
    Header(Header),
    /// A table of an exact export begins, with its columns (name, type).
    Table {
        name: String,
        columns: Vec<(String, String)>,
    },
    Rows(Vec<Row>),
    /// Sent only after the whole document parsed and every byte was read: the one signal that
    /// allows the import to touch the store. A channel that closes without it means failure.
    End {
        counts: BTreeMap<String, u64>,
        environments: u64,
    },
}

/// Rows are sent to the importing task in batches of at most this many rows or bytes.
const BATCH: usize = 512;
const BATCH_BYTES: usize = 256 * 1024;

/// What a format's section reader hands rows to.
pub(crate) struct Emitter {
    tx: mpsc::Sender<Message>,
    batch: Vec<Row>,
    batch_bytes: usize,
    counts: BTreeMap<String, u64>,
    pub environments: u64,
}

impl Emitter {
    pub(crate) fn send(&mut self, message: Message) -> Result<(), String> {
        self.tx
            .blocking_send(message)
            .map_err(|_| "the import was stopped".to_string())
    }

    /// Stages a row given as JSON text, compacting pretty-printed values (staging is
    /// line-based). PostgreSQL validates it as it stages it.
    pub fn row(&mut self, section: &Arc<str>, key: &str, raw: Vec<u8>) -> Result<(), String> {
        let text = String::from_utf8(raw).map_err(|_| format!("a {section} row is not UTF-8"))?;
        let doc = if text.contains(['\n', '\r']) {
            super::json::minify(&text)
        } else {
            text
        };
        self.row_text(section, key, doc)
    }

    /// Stages a row that is already compact JSON.
    pub fn row_text(&mut self, section: &Arc<str>, key: &str, doc: String) -> Result<(), String> {
        self.push(Row::Json {
            section: section.clone(),
            key: key.to_owned(),
            doc,
        })
    }

    /// Stages a row of PostgreSQL text values.
    pub fn fields(
        &mut self,
        section: &Arc<str>,
        fields: Vec<Option<String>>,
    ) -> Result<(), String> {
        self.push(Row::Fields {
            section: section.clone(),
            fields,
        })
    }

    fn push(&mut self, row: Row) -> Result<(), String> {
        *self.counts.entry(row.section().to_string()).or_default() += 1;
        self.batch_bytes += row.bytes();
        self.batch.push(row);
        if self.batch.len() >= BATCH || self.batch_bytes >= BATCH_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    /// Announces a table (exact format); rows staged before it are sent first, so order holds.
    pub fn table(&mut self, name: String, columns: Vec<(String, String)>) -> Result<(), String> {
        self.flush()?;
        self.counts.entry(name.clone()).or_default();
        self.send(Message::Table { name, columns })
    }

    /// A second emitter into the same import, for a helper thread; give it back with
    /// [`Emitter::absorb`] before the document ends.
    pub fn fork(&self) -> Emitter {
        Emitter {
            tx: self.tx.clone(),
            batch: Vec::with_capacity(BATCH),
            batch_bytes: 0,
            counts: BTreeMap::new(),
            environments: 0,
        }
    }

    /// Takes back a forked emitter: its last rows are sent and its counts added.
    pub fn absorb(&mut self, mut other: Emitter) -> Result<(), String> {
        other.flush()?;
        for (section, count) in other.counts {
            *self.counts.entry(section).or_default() += count;
        }
        self.environments += other.environments;
        Ok(())
    }

    fn flush(&mut self) -> Result<(), String> {
        if !self.batch.is_empty() {
            let batch = std::mem::take(&mut self.batch);
            self.batch_bytes = 0;
            self.send(Message::Rows(batch))?;
        }
        Ok(())
    }
}

/// Reads the sections after a format's header, each from the document cursor.
pub(crate) trait SectionReader {
    /// Reads the value of section `key` (the cursor is at it).
    fn section(
        &mut self,
        cursor: &mut Cursor<&mut dyn std::io::Read>,
        key: &str,
        emitter: &mut Emitter,
    ) -> Result<(), ScanError>;

    /// After the last section: what must have been there.
    fn finish(&mut self, emitter: &mut Emitter) -> Result<(), ScanError>;
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

/// Reads the whole document: the header, then every section through the format's reader.
fn read_document(
    cursor: &mut Cursor<&mut dyn std::io::Read>,
    emitter: &mut Emitter,
) -> Result<(), ScanError> {
    let mut position = 0;
    let mut metadata = Vec::new();
    let mut reader: Option<Box<dyn SectionReader>> = None;
    cursor.object(|cursor, key| {
        position += 1;
        match (position, reader.as_mut()) {
            // A Meltano document's reader is set at its first key: every later key is a state.
            (_, Some(reader)) => reader.section(cursor, &key, emitter),
            (1, _) if key == "metadata" => {
                metadata = cursor.raw()?;
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
                let header = read_header(&metadata, &cursor.raw()?)?;
                let format = header.format;
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

/// Parses the whole document from a blocking reader, reads to the end (so the checksum covers
/// every byte), and only then sends `End`.
fn parse(mut reader: impl std::io::Read, tx: mpsc::Sender<Message>) -> Result<(), String> {
    let mut emitter = Emitter {
        tx,
        batch: Vec::with_capacity(BATCH),
        batch_bytes: 0,
        counts: BTreeMap::new(),
        environments: 0,
    };
    {
        let mut cursor = Cursor::new(&mut reader as &mut dyn std::io::Read);
        read_document(&mut cursor, &mut emitter).map_err(|e| e.0)?;
        cursor.end().map_err(|e| e.0)?;
    }
    emitter.flush()?;
    let end = Message::End {
        counts: std::mem::take(&mut emitter.counts),
        environments: emitter.environments,
    };
    emitter.send(end)
}

// ---------------------------------------------------------------------------------------------

/// What a format's importer gets: the parsed stream and what was measured of the raw bytes.
pub(crate) struct Incoming<'a> {
    rx: &'a mut mpsc::Receiver<Message>,
    measure: &'a Arc<Mutex<Measure>>,
    pub compression: Compression,
    pub options: &'a ImportOptions,
    pub started: Instant,
}

/// Everything the file held, once staged.
pub(crate) struct Staged {
    pub counts: BTreeMap<String, u64>,
    pub environments: u64,
    /// Tables announced by an exact export, with their columns, in file order.
    pub tables: Vec<(String, Vec<(String, String)>)>,
    pub bytes: u64,
    pub sha256: String,
}

impl Incoming<'_> {
    /// Streams every row into the temporary table `statekeeper_import (seq, section, environment,
    /// doc jsonb, f1 text, …, f{width} text)` (a row of text values has at most `width` of them:
    /// see [`staged_field`]), then checks the checksum. Returns only after the whole file was
    /// read. Each of `sections` gets a partition of its own, read alone by a query on its
    /// section; the other sections' rows share one.
    pub async fn stage(
        &mut self,
        conn: &mut PgConnection,
        sections: &[&str],
        width: usize,
    ) -> Result<Staged, Error> {
        let fields: Vec<String> = (1..=width).map(staged_field).collect();
        let storage: Vec<String> = std::iter::once("doc")
            .chain(fields.iter().map(String::as_str))
            .map(|c| format!("ALTER {c} SET STORAGE EXTERNAL"))
            .collect();
        let field_columns: String = fields.iter().map(|c| format!(", {c} text")).collect();
        // A partition per large section, so that applying it reads only its rows; staged values
        // are read once: kept uncompressed and, up to a page, inline (no TOAST).
        let mut ddl = vec![
            format!("CREATE TEMP TABLE statekeeper_import (seq bigserial, section text NOT NULL, environment text, doc jsonb{field_columns}) PARTITION BY LIST (section) ON COMMIT DROP"),
            format!("ALTER TABLE statekeeper_import {}", storage.join(", ")),
            "CREATE TEMP TABLE statekeeper_import_other PARTITION OF statekeeper_import DEFAULT WITH (toast_tuple_target = 8160) ON COMMIT DROP".to_owned(),
        ];
        for (i, section) in sections.iter().enumerate() {
            ddl.push(format!(
                "CREATE TEMP TABLE statekeeper_import_{i} PARTITION OF statekeeper_import FOR VALUES IN ({}) WITH (toast_tuple_target = 8160) ON COMMIT DROP",
                quote_literal(section)
            ));
        }
        // Sorting and grouping the staged rows stays in memory.
        ddl.push("SET LOCAL work_mem = '64MB'".to_owned());
        sqlx::raw_sql(AssertSqlSafe(ddl.join(";\n")))
            .execute(&mut *conn)
            .await?;
        fast_toast_compression(conn).await?;
        let copied: String = fields.iter().map(|c| format!(", {c}")).collect();
        self.copy_all(
            conn,
            &format!(
                "COPY statekeeper_import (section, environment, doc{copied}) FROM STDIN {COPY_BINARY}"
            ),
            |row, out| row.encode(width, out),
        )
        .await
    }

    /// Streams every row (all of them lists of text values) into `table` (a table of the
    /// caller's, one column per value), then checks the checksum. For imports that check their
    /// rows as they are read: no array literal for the server to parse, no staged copy to read
    /// again.
    pub async fn copy_fields_into(
        &mut self,
        conn: &mut PgConnection,
        table: &str,
        columns: &[&str],
    ) -> Result<Staged, Error> {
        let copy_sql = format!(
            "COPY {table} ({}) FROM STDIN {COPY_BINARY}",
            columns.join(", ")
        );
        self.copy_all(conn, &copy_sql, Row::encode_fields).await
    }

    async fn copy_all(
        &mut self,
        conn: &mut PgConnection,
        copy_sql: &str,
        encode: impl Fn(&Row, &mut Vec<u8>) -> Result<(), Error>,
    ) -> Result<Staged, Error> {
        let mut tables = Vec::new();
        let (counts, environments) = {
            let mut copy = conn.copy_in_raw(copy_sql).await?;
            let streamed = async {
                let mut buffer = Vec::with_capacity(512 * 1024);
                buffer.extend_from_slice(BINARY_SIGNATURE);
                buffer.extend_from_slice(&BINARY_FLAGS_AND_EXTENSION);
                let ended = loop {
                    let rows = match self.rx.recv().await {
                        Some(Message::Rows(rows)) => rows,
                        Some(Message::Table { name, columns }) => {
                            tables.push((name, columns));
                            continue;
                        }
                        Some(Message::End {
                            counts,
                            environments,
                        }) => break (counts, environments),
                        Some(Message::Header(..)) => {
                            return Err(Error::InvalidExport("the header appears twice".into()));
                        }
                        // The parser stopped without finishing: the caller reports its error.
                        None => return Err(Error::InvalidExport(STREAM_ENDED.into())),
                    };
                    for row in &rows {
                        encode(row, &mut buffer)?;
                    }
                    if buffer.len() >= 256 * 1024 {
                        copy.send(std::mem::take(&mut buffer)).await?;
                        super::failpoint::hit("import.staged_batch");
                    }
                };
                buffer.extend_from_slice(BINARY_TRAILER);
                copy.send(buffer).await?;
                Ok::<_, Error>(ended)
            }
            .await;
            match streamed {
                Ok(ended) => {
                    copy.finish().await.map_err(|e| invalid(&e))?;
                    super::failpoint::hit("import.staged");
                    ended
                }
                // The COPY is ended (the rows sent so far are whole, and go only into this
                // transaction's staging, which the error rolls back), so that the connection
                // is in step with the server and sqlx has no unfinished COPY to warn about. Not
                // `abort`: after a row the server already refused, it leaves the connection
                // out of step.
                Err(e) => {
                    if copy.send(BINARY_TRAILER).await.is_ok() {
                        let _ = copy.finish().await;
                    }
                    return Err(e);
                }
            }
        };
        let (bytes, sha256) = std::mem::take(
            &mut *self
                .measure
                .lock()
                .map_err(|_| Error::InvalidExport("checksum state poisoned".into()))?,
        )
        .finish();
        if let Some(expected) = &self.options.expected_sha256
            && !expected.eq_ignore_ascii_case(&sha256)
        {
            return Err(Error::InvalidExport(format!(
                "checksum mismatch: expected sha256 {expected}, the file has {sha256}"
            )));
        }
        Ok(Staged {
            counts,
            environments,
            tables,
            bytes,
            sha256,
        })
    }
}

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
        let (decoded, compression) = decoded(reader, measure.clone()).await?;
        // A few batches in flight keep both sides busy; more would only hold memory.
        let (tx, mut rx) = mpsc::channel::<Message>(8);
        let bridge = tokio_util::io::SyncIoBridge::new(decoded);
        let parser = tokio::task::spawn_blocking(move || parse(bridge, tx));

        let result = self
            .import_parsed(Incoming {
                rx: &mut rx,
                measure: &measure,
                compression,
                options,
                started,
            })
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
        let Some(Message::Header(header)) = incoming.rx.recv().await else {
            return Err(Error::InvalidExport(STREAM_ENDED.into()));
        };
        let profile = self.profile();
        if !profile.supports_format(header.format) {
            let fits = frameworks::Framework::ALL
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
}

/// Reads a whole file as an import would, without a database: its format, rows and checksum, or
/// why it cannot be imported (compression, structure, header, every row's shape). The checks
/// that need the store (versions, references, duplicates) come on import.
pub async fn scan<R: AsyncRead + Unpin + Send + 'static>(reader: R) -> Result<ScanReport, Error> {
    let measure = Arc::new(Mutex::new(Measure::default()));
    let (decoded, compression) = decoded(reader, measure.clone()).await?;
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
            } => end = Some((counts, environments)),
            Message::Rows(_) | Message::Table { .. } => {}
        }
    }
    parser
        .await
        .map_err(|e| Error::InvalidExport(format!("the reader stopped: {e}")))?
        .map_err(|e| Error::InvalidExport(format!("the file is truncated or corrupt: {e}")))?;
    let (Some(format), Some((rows, environments))) = (format, end) else {
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
    })
}

/// Compresses the large values this transaction writes with lz4 where the server has it (it is
/// several times faster than the default pglz, and every PostgreSQL since 14 reads both). This
/// sets how values are written, not any table's definition.
pub(crate) async fn fast_toast_compression(conn: &mut PgConnection) -> Result<(), Error> {
    let lz4: bool = sqlx::query_scalar(
        "SELECT COALESCE((SELECT 'lz4' = ANY(enumvals) FROM pg_settings WHERE name = 'default_toast_compression'), false)",
    )
    .fetch_one(&mut *conn)
    .await?;
    if lz4 {
        sqlx::query("SET LOCAL default_toast_compression = 'lz4'")
            .execute(conn)
            .await?;
    }
    Ok(())
}

/// Drops the foreign keys and secondary indexes of tables about to be emptied and reloaded, and
/// returns the statements that restore them. Under the exclusive locks a reload takes anyway,
/// PostgreSQL then checks each key with one join instead of a trigger per row and builds each
/// index once; a violation still fails (and undoes) the whole import.
pub(crate) async fn drop_secondary_structures(
    conn: &mut PgConnection,
    schema: &str,
    tables: &[String],
) -> Result<Vec<String>, Error> {
    let keys: Vec<(String, String)> = sqlx::query_as(
        "SELECT format('ALTER TABLE %I.%I DROP CONSTRAINT %I', n.nspname, t.relname, c.conname),
                format('ALTER TABLE %I.%I ADD CONSTRAINT %I %s', n.nspname, t.relname, c.conname, pg_get_constraintdef(c.oid))
         FROM pg_constraint c
         JOIN pg_class t ON t.oid = c.conrelid
         JOIN pg_namespace n ON n.oid = t.relnamespace
         JOIN pg_class r ON r.oid = c.confrelid
         WHERE c.contype = 'f' AND n.nspname = $1
           AND (t.relname = ANY($2) OR r.relname = ANY($2))
         ORDER BY t.relname, c.conname",
    )
    .bind(schema)
    .bind(tables)
    .fetch_all(&mut *conn)
    .await?;
    let indexes: Vec<(String, String)> = sqlx::query_as(
        "SELECT format('DROP INDEX %I.%I', n.nspname, i.relname), pg_get_indexdef(x.indexrelid)
         FROM pg_index x
         JOIN pg_class i ON i.oid = x.indexrelid
         JOIN pg_class t ON t.oid = x.indrelid
         JOIN pg_namespace n ON n.oid = t.relnamespace
         WHERE n.nspname = $1 AND t.relname = ANY($2)
           AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = x.indexrelid)
         ORDER BY i.relname",
    )
    .bind(schema)
    .bind(tables)
    .fetch_all(&mut *conn)
    .await?;
    for (drop, _) in keys.iter().chain(&indexes) {
        sqlx::query(AssertSqlSafe(drop.clone()))
            .execute(&mut *conn)
            .await?;
    }
    // Indexes first, then keys (which may rely on them).
    Ok(indexes
        .into_iter()
        .chain(keys)
        .map(|(_, restore)| restore)
        .collect())
}

pub(crate) async fn restore_secondary_structures(
    conn: &mut PgConnection,
    statements: &[String],
) -> Result<(), Error> {
    for statement in statements {
        sqlx::query(AssertSqlSafe(statement.clone()))
            .execute(&mut *conn)
            .await
            .map_err(|e| invalid(&e))?;
    }
    Ok(())
}

/// The staging column of a row's `position`-th text value (from 1, as in SQL).
pub(crate) fn staged_field(position: usize) -> String {
    format!("f{position}")
}

/// Inserts the rows staged under `section` (as `Row::Fields`, whose values are in the order of
/// `staged`) into `schema.table`. Each text value is converted by its column type's own input
/// function, so values arrive exactly as written; a column of the table that was not staged gets
/// its expression from `defaults`, or its default. The staged rows are `x`; `joins` may join
/// more relations to them for `defaults` to read.
pub(crate) async fn insert_staged(
    conn: &mut PgConnection,
    schema: &str,
    table: &str,
    section: &str,
    staged: &[&str],
    defaults: &[(&str, &str)],
    joins: &str,
) -> Result<u64, Error> {
    let columns = catalog::described_columns(conn, schema, table).await?;
    let mut names = Vec::new();
    let mut values = Vec::new();
    for column in columns.iter().filter(|column| !column.generated) {
        let (name, type_) = (&column.name, &column.type_name);
        let value = match staged.iter().position(|s| s == name) {
            Some(position) => format!("(x.{})::{type_}", staged_field(position + 1)),
            None => match defaults.iter().find(|(column, _)| column == name) {
                Some((_, default)) => (*default).to_owned(),
                None => continue,
            },
        };
        names.push(quote_ident(name));
        values.push(value);
    }
    let inserted = sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {}.{} ({}) OVERRIDING SYSTEM VALUE SELECT {} FROM statekeeper_import x{joins} \
         WHERE x.section = {}",
        quote_ident(schema),
        quote_ident(table),
        names.join(", "),
        values.join(", "),
        quote_literal(section),
    )))
    .execute(conn)
    .await
    .map_err(|e| invalid(&e))?;
    Ok(inserted.rows_affected())
}

/// The marker the staging step returns when the stream ended early; the parser's error says why.
pub(crate) const STREAM_ENDED: &str = "the file ended before its header";

/// Database errors while loading a file are problems with the file (types, constraints).
/// PostgreSQL's detail (which key is duplicated, which row violates a check) goes with it.
pub(crate) fn invalid(e: &sqlx::Error) -> Error {
    match e {
        sqlx::Error::Database(db) => {
            let detail = db
                .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                .and_then(|pg| pg.detail())
                .map(|d| format!(" ({d})"))
                .unwrap_or_default();
            Error::InvalidExport(format!("{}{detail}", db.message()))
        }
        other => Error::InvalidExport(other.to_string()),
    }
}
