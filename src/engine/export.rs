//! Exports (docs/export-format.md): one JSON document in the chosen format, streamed from one
//! consistent snapshot straight into the writer, optionally compressed, hashed and counted on the
//! fly. No table is ever held in memory. Each format's document is written by its own module.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_compression::tokio::write::{GzipEncoder, ZstdEncoder};
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::{AssertSqlSafe, PgConnection};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::Error;
use super::destination::Destination;
use super::frameworks::{ExportFormat, Framework};
use super::identifier::quote_ident;
use super::io::Observed;
use super::store::Store;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    #[default]
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// The conventional file name ending of an export with this compression.
    pub fn file_extension(self) -> &'static str {
        match self {
            Compression::None => "json",
            Compression::Gzip => "json.gz",
            Compression::Zstd => "json.zst",
        }
    }
}

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Self::None),
            "gzip" | "gz" => Ok(Self::Gzip),
            "zstd" | "zst" => Ok(Self::Zstd),
            other => Err(format!(
                "unknown compression \"{other}\" (use none, gzip or zstd)"
            )),
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct ExportOptions {
    /// Only these environments (with every version they reference); `None` exports everything.
    pub environments: Option<Vec<String>>,
    pub compression: Compression,
    pub format: ExportFormat,
}

#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ExportReport {
    pub framework: Framework,
    pub format: ExportFormat,
    pub schema_version: i32,
    /// Further version facts (SQLMesh's version, Meltano's Alembic revision).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub versions: BTreeMap<String, String>,
    pub environments: u64,
    /// Rows per table.
    pub rows: BTreeMap<String, u64>,
    /// Bytes written, after compression.
    pub bytes: u64,
    /// Hex sha256 of the bytes written; none for a folder of files (`meltano-backend`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    pub compression: Compression,
    #[serde(skip)]
    pub duration: Duration,
}

impl ExportReport {
    pub fn total_rows(&self) -> u64 {
        self.rows.values().sum()
    }

    /// One line for people: what went where.
    pub fn summary(&self, to: &str) -> String {
        let groups = self.framework.profile().entities.noun;
        format!(
            "exported {} ({}, {}) to {to}: {}{}",
            super::words::counted(self.total_rows(), "rows"),
            super::words::counted(self.environments, groups),
            self.framework
                .describe_version(self.schema_version, &self.versions),
            super::words::counted(self.bytes, "bytes"),
            self.sha256
                .as_ref()
                .map(|sha| format!(", sha256 {sha}"))
                .unwrap_or_default(),
        )
    }
}

/// Bytes counted and hashed as they are written.
#[derive(Default)]
pub(crate) struct Measure {
    pub bytes: u64,
    pub hasher: Sha256,
}

impl Measure {
    pub fn add(&mut self, bytes: &[u8]) {
        self.bytes += bytes.len() as u64;
        self.hasher.update(bytes);
    }

    pub fn finish(self) -> (u64, String) {
        (self.bytes, hex::encode(self.hasher.finalize()))
    }
}

type Measured<W> = Observed<W, Box<dyn FnMut(&[u8]) + Send>>;

/// The compressing layer over the measured destination.
enum Encoder<W: AsyncWrite + Unpin> {
    Plain(tokio::io::BufWriter<Measured<W>>),
    Gzip(GzipEncoder<Measured<W>>),
    Zstd(ZstdEncoder<Measured<W>>),
}

impl<W: AsyncWrite + Unpin> Encoder<W> {
    fn new(writer: W, compression: Compression, measure: Arc<Mutex<Measure>>) -> Self {
        let measured: Measured<W> = Observed::new(
            writer,
            Box::new(move |bytes: &[u8]| {
                if let Ok(mut m) = measure.lock() {
                    m.add(bytes);
                }
            }),
        );
        match compression {
            Compression::None => {
                Self::Plain(tokio::io::BufWriter::with_capacity(256 * 1024, measured))
            }
            Compression::Gzip => Self::Gzip(GzipEncoder::new(measured)),
            Compression::Zstd => Self::Zstd(ZstdEncoder::with_quality(
                measured,
                async_compression::Level::Fastest,
            )),
        }
    }

    async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Self::Plain(w) => w.write_all(bytes).await,
            Self::Gzip(w) => w.write_all(bytes).await,
            Self::Zstd(w) => w.write_all(bytes).await,
        }
    }

    /// Shuts every layer down, the destination included (writing compression trailers and
    /// completing an upload), and returns the destination.
    async fn finish(self) -> std::io::Result<W> {
        let measured = match self {
            Self::Plain(mut w) => {
                w.shutdown().await?;
                w.into_inner()
            }
            Self::Gzip(mut w) => {
                w.shutdown().await?;
                w.into_inner()
            }
            Self::Zstd(mut w) => {
                w.shutdown().await?;
                w.into_inner()
            }
        };
        Ok(measured.inner)
    }
}

fn io_error(e: std::io::Error) -> Error {
    Error::ExportWrite(e.to_string())
}

impl Store {
    /// Streams an export of the store into `writer` from one REPEATABLE READ snapshot: the file
    /// is consistent while writers go on, and nothing waits on the export. Returns the writer,
    /// shut down (an upload is complete once this returns).
    pub async fn export<W: AsyncWrite + Unpin + Send>(
        &self,
        writer: W,
        options: &ExportOptions,
    ) -> Result<(ExportReport, W), Error> {
        let started = Instant::now();
        let profile = self.profile();
        if !profile.supports_format(options.format) {
            return Err(profile.unsupported_format(options.format));
        }
        if options.format == ExportFormat::Exact && options.environments.is_some() {
            return Err(Error::InvalidExportRequest(
                "an exact export always holds every table; choose environments with the \
                 statekeeper or sqlmesh format"
                    .into(),
            ));
        }
        let mut tx = self.begin_snapshot().await?;
        sqlx::query("SET TRANSACTION READ ONLY")
            .execute(&mut *tx)
            .await?;
        let measure = Arc::new(Mutex::new(Measure::default()));
        let mut out = Output {
            encoder: Encoder::new(writer, options.compression, measure.clone()),
        };
        let mut report = ExportReport {
            framework: self.framework(),
            format: options.format,
            compression: options.compression,
            ..Default::default()
        };
        match options.format {
            ExportFormat::Exact => {
                super::exact::write(self, &mut tx, &mut out, &mut report).await?
            }
            ExportFormat::Statekeeper => {
                super::frameworks::statekeeper::export::write(
                    self,
                    &mut tx,
                    &mut out,
                    &mut report,
                    options,
                )
                .await?
            }
            ExportFormat::Meltano => {
                super::frameworks::meltano::export::write(
                    self,
                    &mut tx,
                    &mut out,
                    &mut report,
                    options,
                )
                .await?
            }
            ExportFormat::MeltanoBackend => {
                return Err(Error::InvalidExportRequest(
                    "the meltano-backend format is a folder of files, not one stream: export it \
                     to a folder or object prefix"
                        .into(),
                ));
            }
            ExportFormat::Sqlmesh => {
                super::frameworks::sqlmesh::export::write(
                    self,
                    &mut tx,
                    &mut out,
                    &mut report,
                    options,
                )
                .await?
            }
        }
        tx.commit().await?;
        let writer = out.encoder.finish().await.map_err(io_error)?;
        let (bytes, sha256) = std::mem::take(
            &mut *measure
                .lock()
                .map_err(|_| Error::ExportWrite("checksum state poisoned".into()))?,
        )
        .finish();
        report.bytes = bytes;
        report.sha256 = Some(sha256);
        report.duration = started.elapsed();
        Ok((report, writer))
    }
}

/// Fails with the names in `wanted` that the store does not hold (its environments, Meltano's
/// state IDs).
pub(crate) async fn refuse_unknown_environments(
    store: &Store,
    conn: &mut PgConnection,
    wanted: &[String],
) -> Result<(), Error> {
    let entities = &store.profile().entities;
    let missing: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT w FROM unnest($1::text[]) w WHERE NOT EXISTS \
         (SELECT 1 FROM {}.{} e WHERE e.{} = w) ORDER BY 1",
        store.schema().quoted(),
        quote_ident(entities.table),
        quote_ident(entities.key)
    )))
    .bind(wanted)
    .fetch_all(conn)
    .await?;
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::UnknownEnvironments {
            what: entities.noun,
            names: missing,
        })
    }
}

/// Where a format writes its document: compressed, counted and hashed on the way out.
pub(crate) struct Output<W: AsyncWrite + Unpin> {
    encoder: Encoder<W>,
}

impl<W: AsyncWrite + Unpin + Send> Output<W> {
    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.encoder.write(bytes).await.map_err(io_error)
    }

    /// `{"metadata":…,"versions":…` — the opening every format shares.
    pub async fn write_json_header(
        &mut self,
        metadata: &impl Serialize,
        versions: &impl Serialize,
    ) -> Result<(), Error> {
        let header = format!(
            "{{\"metadata\":{},\"versions\":{}",
            serde_json::to_string(metadata).map_err(|e| Error::ExportWrite(e.to_string()))?,
            serde_json::to_string(versions).map_err(|e| Error::ExportWrite(e.to_string()))?
        );
        self.write(header.as_bytes()).await
    }
}

/// Bytes gathered before they are handed to the compressor, which costs per call.
pub(crate) const FLUSH_BYTES: usize = 128 * 1024;

pub(crate) fn short_row() -> Error {
    Error::ExportWrite("PostgreSQL sent a COPY row with another number of columns".into())
}

/// Runs a `COPY … TO STDOUT` and hands each of its lines (without the line end), with its
/// index, to `transform`, which appends what to write; that is written on every
/// [`FLUSH_BYTES`]. Returns the number of lines. Memory holds one chunk, at most one partial
/// line and what is not yet written.
pub(crate) async fn transform_copy_lines<W: AsyncWrite + Unpin + Send>(
    conn: &mut PgConnection,
    out: &mut Output<W>,
    copy_sql: &str,
    mut transform: impl FnMut(u64, &[u8], &mut Vec<u8>) -> Result<(), Error>,
) -> Result<u64, Error> {
    let mut copy = conn.copy_out_raw(copy_sql).await?;
    let mut lines = 0u64;
    let mut partial: Vec<u8> = Vec::new();
    let mut written = Vec::with_capacity(FLUSH_BYTES + 64 * 1024);
    while let Some(chunk) = copy.try_next().await? {
        let mut start = 0;
        for end in line_ends(&chunk) {
            let line = if partial.is_empty() {
                &chunk[start..end]
            } else {
                partial.extend_from_slice(&chunk[start..end]);
                &partial[..]
            };
            transform(lines, line, &mut written)?;
            lines += 1;
            partial.clear();
            start = end + 1;
        }
        partial.extend_from_slice(&chunk[start..]);
        if written.len() >= FLUSH_BYTES {
            out.write(&written).await?;
            written.clear();
        }
    }
    if !partial.is_empty() {
        return Err(ended_mid_row());
    }
    out.write(&written).await?;
    Ok(lines)
}

fn line_ends(chunk: &[u8]) -> impl Iterator<Item = usize> + '_ {
    memchr::memchr_iter(b'\n', chunk)
}

/// The lines of a `COPY … TO STDOUT`, taken one at a time: for writing a COPY's rows in between
/// another stream's (the caller decides when to read on). Memory holds one chunk and one line.
pub(crate) struct CopyLines<'c> {
    copy: futures::stream::BoxStream<'c, sqlx::Result<bytes::Bytes>>,
    chunk: bytes::Bytes,
    /// Where the unread part of `chunk` starts.
    at: usize,
    /// The current line, without its end; valid while `current` is true.
    line: Vec<u8>,
    current: bool,
}

impl<'c> CopyLines<'c> {
    pub async fn open(conn: &'c mut PgConnection, copy_sql: &str) -> Result<Self, Error> {
        let mut lines = Self {
            copy: conn.copy_out_raw(copy_sql).await?,
            chunk: bytes::Bytes::new(),
            at: 0,
            line: Vec::new(),
            current: false,
        };
        lines.advance().await?;
        Ok(lines)
    }

    /// The current line, `None` after the last.
    pub fn line(&self) -> Option<&[u8]> {
        self.current.then_some(&self.line[..])
    }

    /// Moves on to the next line.
    pub async fn advance(&mut self) -> Result<(), Error> {
        self.line.clear();
        loop {
            let unread = &self.chunk[self.at..];
            if let Some(end) = memchr::memchr(b'\n', unread) {
                self.line.extend_from_slice(&unread[..end]);
                self.at += end + 1;
                self.current = true;
                return Ok(());
            }
            self.line.extend_from_slice(unread);
            match self.copy.try_next().await? {
                Some(chunk) => {
                    self.chunk = chunk;
                    self.at = 0;
                }
                None if self.line.is_empty() => {
                    self.current = false;
                    return Ok(());
                }
                None => return Err(ended_mid_row()),
            }
        }
    }
}

pub(crate) fn ended_mid_row() -> Error {
    Error::ExportWrite(
        "PostgreSQL ended a COPY in the middle of a row; refusing to write a corrupt export".into(),
    )
}

/// A COPY text field as a JSON string, escaped as PostgreSQL's `to_json` escapes text. Without a
/// backslash, a field is its value's text as it is.
pub(crate) fn push_json_string(field: &[u8], json: &mut Vec<u8>) -> Result<(), Error> {
    if memchr::memchr(b'\\', field).is_none() {
        push_raw_json_string(field, json);
        return Ok(());
    }
    json.push(b'"');
    unescape_copy_field(field, |value| push_json_escaped(value, json))?;
    json.push(b'"');
    Ok(())
}

/// A COPY text field holding JSON (`json`, `jsonb`, `row_to_json`), as that JSON.
pub(crate) fn push_copy_json(field: &[u8], json: &mut Vec<u8>) -> Result<(), Error> {
    if memchr::memchr(b'\\', field).is_none() {
        json.extend_from_slice(field);
        Ok(())
    } else {
        unescape_copy_field(field, |byte| json.push(byte))
    }
}

/// A byte that is itself in COPY text and in a JSON string (most are: the fast path copies
/// whole fields).
#[inline(always)]
fn is_plain(byte: u8) -> bool {
    byte >= 0x20 && byte != b'"' && byte != b'\\'
}

#[inline(always)]
fn push_json_escaped(value: u8, json: &mut Vec<u8>) {
    match value {
        b'"' => json.extend_from_slice(b"\\\""),
        b'\\' => json.extend_from_slice(b"\\\\"),
        0x08 => json.extend_from_slice(b"\\b"),
        0x0c => json.extend_from_slice(b"\\f"),
        b'\n' => json.extend_from_slice(b"\\n"),
        b'\r' => json.extend_from_slice(b"\\r"),
        b'\t' => json.extend_from_slice(b"\\t"),
        0x00..=0x1f => json.extend_from_slice(format!("\\u{value:04x}").as_bytes()),
        _ => json.push(value),
    }
}

/// Text as a JSON string, escaped as PostgreSQL's `to_json` escapes it.
pub(crate) fn push_raw_json_string(text: &[u8], json: &mut Vec<u8>) {
    json.push(b'"');
    if text.iter().all(|b| is_plain(*b)) {
        json.extend_from_slice(text);
    } else {
        for byte in text {
            push_json_escaped(*byte, json);
        }
    }
    json.push(b'"');
}

/// The bytes a COPY text field stands for: its backslash escapes undone.
pub(crate) fn unescape_copy_field(field: &[u8], mut push: impl FnMut(u8)) -> Result<(), Error> {
    let mut bytes = field.iter().copied();
    while let Some(byte) = bytes.next() {
        if byte != b'\\' {
            push(byte);
            continue;
        }
        push(match bytes.next() {
            Some(b'b') => 0x08,
            Some(b'f') => 0x0c,
            Some(b'n') => b'\n',
            Some(b'r') => b'\r',
            Some(b't') => b'\t',
            Some(b'v') => 0x0b,
            Some(other) => other,
            None => {
                return Err(Error::ExportWrite(
                    "PostgreSQL sent a COPY field ending in a lone backslash".into(),
                ));
            }
        });
    }
    Ok(())
}

impl Store {
    /// Exports into `destination`. The object appears under its final name only once complete
    /// (a local file is written beside it, synced and renamed; S3, GCS and Azure commit the
    /// upload at the end): a failed export leaves no half-written file and no pending multipart
    /// upload behind. `observe` sees every byte written (progress).
    pub async fn export_to(
        &self,
        destination: &Destination,
        options: &ExportOptions,
        observe: impl FnMut(&[u8]) + Unpin + Send,
    ) -> Result<ExportReport, Error> {
        let upload = destination.begin_upload().await?;
        self.export_upload(destination, upload, options, observe)
            .await
    }

    /// [`Store::export_to`] into an upload the caller began (and whose staging id it recorded).
    pub async fn export_upload(
        &self,
        destination: &Destination,
        upload: crate::engine::destination::Upload,
        options: &ExportOptions,
        observe: impl FnMut(&[u8]) + Unpin + Send,
    ) -> Result<ExportReport, Error> {
        let mut upload = Observed::new(upload, observe);
        match self.export(&mut upload, options).await {
            Ok((report, _)) => Ok(report),
            Err(e) => {
                upload.inner.abort().await;
                Err(match e {
                    Error::ExportWrite(reason) => Error::ExportWrite(format!(
                        "{}: {}",
                        destination.url(),
                        destination.redact(&reason)
                    )),
                    other => other,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::push_json_string;

    fn json(field: &[u8]) -> String {
        let mut out = Vec::new();
        push_json_string(field, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn copy_text_fields_become_json_strings_as_postgres_escapes_them() {
        assert_eq!(json(b"a"), r#""a""#);
        assert_eq!(json(b"\\\\N"), r#""\\N""#);
        assert_eq!(
            json(b"say \"hi\"\\ttab\\nline\\\\"),
            r#""say \"hi\"\ttab\nline\\""#
        );
        assert_eq!(json(b"\\b\\f\\r\\v\x01"), r#""\b\f\r\u000b\u0001""#);
        assert_eq!(json("ünïcødé ✓".as_bytes()), r#""ünïcødé ✓""#);
        let mut out = Vec::new();
        assert!(push_json_string(b"trailing\\", &mut out).is_err());
    }
}
