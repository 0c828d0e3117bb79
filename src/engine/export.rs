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
    pub environments: u64,
    /// Rows per table.
    pub rows: BTreeMap<String, u64>,
    /// Bytes written, after compression.
    pub bytes: u64,
    /// Hex sha256 of the bytes written.
    pub sha256: String,
    pub compression: Compression,
    #[serde(skip)]
    pub duration: Duration,
}

impl ExportReport {
    pub fn total_rows(&self) -> u64 {
        self.rows.values().sum()
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
        report.sha256 = sha256;
        report.duration = started.elapsed();
        Ok((report, writer))
    }
}

/// Fails with the names in `wanted` that the `column` of `table` (qualified; an environments
/// table's `name`, Meltano's `state_id`) does not hold.
pub(crate) async fn refuse_unknown_environments(
    conn: &mut PgConnection,
    table: &str,
    column: &str,
    wanted: &[String],
) -> Result<(), Error> {
    let missing: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT w FROM unnest($1::text[]) w WHERE NOT EXISTS (SELECT 1 FROM {table} e WHERE e.{column} = w) ORDER BY 1"
    )))
    .bind(wanted)
    .fetch_all(conn)
    .await?;
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::UnknownEnvironments(missing))
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

/// Streams a table's rows as JSON arrays of their text forms (`["v", null, …]`), comma-separated;
/// returns how many. The server sends `COPY … TO STDOUT` in its plain text format — the cheapest
/// form it has, what `pg_dump` reads — and the rows are turned into JSON here, on the client's
/// core, while the server goes on producing the next ones.
pub(crate) async fn stream_table_as_arrays<W: AsyncWrite + Unpin + Send>(
    conn: &mut PgConnection,
    out: &mut Output<W>,
    select: &str,
) -> Result<u64, Error> {
    let sql = format!("COPY ({select}) TO STDOUT");
    transform_copy_lines(conn, out, &sql, |index, line, json| {
        if index > 0 {
            json.push(b',');
        }
        copy_text_row_to_json(line, json)
    })
    .await
}

/// How one column's value in COPY's binary format becomes the JSON value `row_to_json` writes
/// for it with the export's `TimeZone` (UTC).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum JsonShape {
    /// `smallint`, `integer`, `bigint`: big-endian, written as their decimal digits.
    Integer,
    /// One byte.
    Boolean,
    /// Text-like types, sent as their characters: a JSON string.
    String,
    /// Microseconds from 2000-01-01, written in ISO 8601 as `to_json` writes them.
    Timestamp { with_zone: bool },
    /// `jsonb`: a version byte, then its text.
    Jsonb,
    /// JSON text already: `json`, or `to_json(column)` computed by the server for every other
    /// type (numerics, arrays, domains, …), so that unusual values stay exact.
    Json,
}

impl JsonShape {
    fn of(type_name: &str) -> Self {
        match type_name {
            "bigint" | "integer" | "smallint" => Self::Integer,
            "boolean" => Self::Boolean,
            "text" | "name" | "uuid" => Self::String,
            "jsonb" => Self::Jsonb,
            "timestamp with time zone" => Self::Timestamp { with_zone: true },
            "timestamp without time zone" => Self::Timestamp { with_zone: false },
            t if t.starts_with("character varying") || t.starts_with("character(") => Self::String,
            _ => Self::Json,
        }
    }

    /// What to select for a column of this shape: its binary form is what [`Self::push`] reads.
    fn select(self, type_name: &str, column: &str) -> String {
        match (self, type_name) {
            // A uuid's binary form is its 16 bytes; its text is what JSON gets.
            (Self::String, "uuid") => format!("{column}::text"),
            (Self::Json, t) if t != "json" => format!("to_json({column})"),
            _ => column.to_owned(),
        }
    }

    /// Appends the JSON for one non-NULL binary value.
    fn push(self, value: &[u8], json: &mut Vec<u8>) -> Result<(), Error> {
        match self {
            Self::Integer => {
                let mut digits = itoa::Buffer::new();
                let text = match *value {
                    [a, b] => digits.format(i16::from_be_bytes([a, b])),
                    [a, b, c, d] => digits.format(i32::from_be_bytes([a, b, c, d])),
                    [a, b, c, d, e, f, g, h] => {
                        digits.format(i64::from_be_bytes([a, b, c, d, e, f, g, h]))
                    }
                    _ => return Err(malformed_binary("an integer")),
                };
                json.extend_from_slice(text.as_bytes());
            }
            Self::Boolean => match value {
                [0] => json.extend_from_slice(b"false"),
                [_] => json.extend_from_slice(b"true"),
                _ => return Err(malformed_binary("a boolean")),
            },
            Self::String => push_raw_json_string(value, json),
            Self::Timestamp { with_zone } => {
                let micros = <[u8; 8]>::try_from(value)
                    .map(i64::from_be_bytes)
                    .map_err(|_| malformed_binary("a timestamp"))?;
                push_json_timestamp(micros, with_zone, json);
            }
            Self::Jsonb => match value.split_first() {
                Some((1, text)) => json.extend_from_slice(text),
                _ => return Err(malformed_binary("a jsonb value of version 1")),
            },
            Self::Json => json.extend_from_slice(value),
        }
        Ok(())
    }
}

/// Streams the rows of `table` (qualified, aliased `t` in `rest`: a `WHERE`/`ORDER BY` tail) as
/// the JSON objects `row_to_json(t)` makes in UTC, byte for byte, comma-separated; returns how
/// many. The caller's transaction must have `TimeZone` UTC for the columns the server turns into
/// JSON itself. The server sends COPY's binary format and the objects are built on the client's
/// core: `row_to_json` cost PostgreSQL two to three times a plain COPY, and writing integers and
/// timestamps as text a third of the COPY of a table of them.
pub(crate) async fn stream_table_as_objects<W: AsyncWrite + Unpin + Send>(
    conn: &mut PgConnection,
    out: &mut Output<W>,
    schema: &str,
    table: &str,
    rest: &str,
) -> Result<u64, Error> {
    let columns = super::catalog::columns(conn, schema, table).await?;
    let mut selected = Vec::with_capacity(columns.len());
    let mut keys = Vec::with_capacity(columns.len());
    let mut shapes = Vec::with_capacity(columns.len());
    for (i, (name, type_name)) in columns.iter().enumerate() {
        let shape = JsonShape::of(type_name);
        selected.push(shape.select(type_name, &format!("t.{}", quote_ident(name))));
        let key = serde_json::to_string(name).map_err(|e| Error::ExportWrite(e.to_string()))?;
        keys.push(format!("{}{key}:", if i == 0 { "{" } else { "," }).into_bytes());
        shapes.push(shape);
    }
    let sql = format!(
        "COPY (SELECT {} FROM {}.{} t {rest}) TO STDOUT (FORMAT binary)",
        selected.join(", "),
        quote_ident(schema),
        quote_ident(table)
    );
    let mut copy = conn.copy_out_raw(&sql).await?;
    let mut reader = BinaryRows::new(shapes.len());
    let mut rows = 0u64;
    let mut written = Vec::with_capacity(FLUSH_BYTES + 64 * 1024);
    while let Some(chunk) = copy.try_next().await? {
        reader.read(&chunk, |row| {
            if rows > 0 {
                written.push(b',');
            }
            rows += 1;
            let mut fields = BinaryFields(row);
            for (key, shape) in keys.iter().zip(&shapes) {
                written.extend_from_slice(key);
                match fields.next_field()? {
                    None => written.extend_from_slice(b"null"),
                    Some(value) => shape.push(value, &mut written)?,
                }
            }
            written.push(b'}');
            Ok(())
        })?;
        if written.len() >= FLUSH_BYTES {
            out.write(&written).await?;
            written.clear();
        }
    }
    reader.finish()?;
    out.write(&written).await?;
    Ok(rows)
}

/// Bytes gathered before they are handed to the compressor, which costs per call.
pub(crate) const FLUSH_BYTES: usize = 128 * 1024;

/// The rows of a `COPY … (FORMAT binary)` from the chunks the server sends, which need not end
/// where rows do: a signature, flags and a header extension; per row an int16 field count and,
/// per field, an int32 length (-1 for NULL) and the value; an int16 -1 at the end.
struct BinaryRows {
    columns: usize,
    header_read: bool,
    ended: bool,
    /// The unread start of a row (or of the header) the last chunk ended in.
    pending: Vec<u8>,
}

const BINARY_SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";

impl BinaryRows {
    fn new(columns: usize) -> Self {
        Self {
            columns,
            header_read: false,
            ended: false,
            pending: Vec::new(),
        }
    }

    /// Hands every row that `chunk` completes to `row` (its fields, after the count).
    fn read(
        &mut self,
        chunk: &[u8],
        row: impl FnMut(&[u8]) -> Result<(), Error>,
    ) -> Result<(), Error> {
        if self.pending.is_empty() {
            let used = self.read_whole(chunk, row)?;
            self.pending.extend_from_slice(&chunk[used..]);
        } else {
            let mut buffer = std::mem::take(&mut self.pending);
            buffer.extend_from_slice(chunk);
            let used = self.read_whole(&buffer, row)?;
            buffer.drain(..used);
            self.pending = buffer;
        }
        Ok(())
    }

    /// Reads what is complete in `bytes`; returns how many bytes that was.
    fn read_whole(
        &mut self,
        bytes: &[u8],
        mut row: impl FnMut(&[u8]) -> Result<(), Error>,
    ) -> Result<usize, Error> {
        let mut at = 0;
        if !self.header_read {
            let fixed = BINARY_SIGNATURE.len() + 8;
            if bytes.len() < fixed {
                return Ok(0);
            }
            if !bytes.starts_with(BINARY_SIGNATURE) {
                return Err(malformed_binary("the signature"));
            }
            let flags = be_i32(&bytes[BINARY_SIGNATURE.len()..]);
            let extension = be_i32(&bytes[BINARY_SIGNATURE.len() + 4..]);
            if flags != 0 || extension < 0 {
                return Err(malformed_binary("the header"));
            }
            let end = fixed + extension as usize;
            if bytes.len() < end {
                return Ok(0);
            }
            self.header_read = true;
            at = end;
        }
        while at + 2 <= bytes.len() {
            if self.ended {
                return Err(malformed_binary("the end"));
            }
            let count = i16::from_be_bytes([bytes[at], bytes[at + 1]]);
            if count == -1 {
                self.ended = true;
                at += 2;
                continue;
            }
            if count as usize != self.columns {
                return Err(short_row());
            }
            let start = at + 2;
            let mut end = start;
            for _ in 0..self.columns {
                if end + 4 > bytes.len() {
                    return Ok(at);
                }
                let length = be_i32(&bytes[end..]);
                end += 4 + usize::try_from(length).unwrap_or(0);
            }
            if end > bytes.len() {
                return Ok(at);
            }
            row(&bytes[start..end])?;
            at = end;
        }
        Ok(at)
    }

    /// Fails unless the COPY ended where a row did, with its trailer.
    fn finish(&self) -> Result<(), Error> {
        if self.ended && self.pending.is_empty() {
            Ok(())
        } else {
            Err(ended_mid_row())
        }
    }
}

/// The fields of one complete binary row, in order; `None` for NULL.
struct BinaryFields<'a>(&'a [u8]);

impl<'a> BinaryFields<'a> {
    fn next_field(&mut self) -> Result<Option<&'a [u8]>, Error> {
        if self.0.len() < 4 {
            return Err(short_row());
        }
        let length = be_i32(self.0);
        let rest = &self.0[4..];
        if length < 0 {
            self.0 = rest;
            return Ok(None);
        }
        let value = rest.get(..length as usize).ok_or_else(short_row)?;
        self.0 = &rest[value.len()..];
        Ok(Some(value))
    }
}

/// The big-endian int32 `bytes` starts with (callers check that four are there).
fn be_i32(bytes: &[u8]) -> i32 {
    i32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

fn malformed_binary(what: &str) -> Error {
    Error::ExportWrite(format!(
        "PostgreSQL sent a binary COPY with malformed {what}; refusing to write a corrupt export"
    ))
}

fn short_row() -> Error {
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

fn ended_mid_row() -> Error {
    Error::ExportWrite(
        "PostgreSQL ended a COPY in the middle of a row; refusing to write a corrupt export".into(),
    )
}

/// One line of COPY's text format (tab-separated fields, `\N` for NULL, backslash escapes) as a
/// JSON array of strings, escaped as PostgreSQL's own `to_json` escapes them.
pub(crate) fn copy_text_row_to_json(line: &[u8], json: &mut Vec<u8>) -> Result<(), Error> {
    json.push(b'[');
    for (i, field) in line.split(|b| *b == b'\t').enumerate() {
        if i > 0 {
            json.push(b',');
        }
        if field == b"\\N" {
            json.extend_from_slice(b"null");
        } else {
            push_json_string(field, json)?;
        }
    }
    json.push(b']');
    Ok(())
}

/// A COPY text field as a JSON string, escaped as PostgreSQL's `to_json` escapes text.
pub(crate) fn push_json_string(field: &[u8], json: &mut Vec<u8>) -> Result<(), Error> {
    json.push(b'"');
    if field.iter().all(|b| is_plain(*b)) {
        json.extend_from_slice(field);
    } else {
        unescape_copy_field(field, |value| push_json_escaped(value, json))?;
    }
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

/// A timestamp as `to_json` writes it in UTC, from its microseconds since 2000-01-01:
/// `"2024-05-01T10:20:30.5+00:00"`; years past 9999 in full, ` BC` after the offset, and
/// `"infinity"`/`"-infinity"`. PostgreSQL's calendar is the proleptic Gregorian one.
fn push_json_timestamp(micros: i64, with_zone: bool, json: &mut Vec<u8>) {
    const MICROS_PER_DAY: i64 = 86_400_000_000;
    /// Days from 1970-01-01 (where the civil-date arithmetic counts from) to 2000-01-01.
    const POSTGRES_EPOCH_DAYS: i64 = 10_957;
    match micros {
        i64::MAX => return json.extend_from_slice(b"\"infinity\""),
        i64::MIN => return json.extend_from_slice(b"\"-infinity\""),
        _ => {}
    }
    let (year, month, day) =
        civil_from_days(micros.div_euclid(MICROS_PER_DAY) + POSTGRES_EPOCH_DAYS);
    let in_day = micros.rem_euclid(MICROS_PER_DAY);
    let seconds = in_day / 1_000_000;
    let fraction = in_day % 1_000_000;
    // Astronomical year 0 is 1 BC.
    let (shown_year, before_christ) = if year <= 0 {
        (1 - year, true)
    } else {
        (year, false)
    };
    json.push(b'"');
    let mut digits = itoa::Buffer::new();
    let year_digits = digits.format(shown_year);
    json.extend(std::iter::repeat_n(
        b'0',
        4usize.saturating_sub(year_digits.len()),
    ));
    json.extend_from_slice(year_digits.as_bytes());
    for (separator, value) in [
        (b'-', month),
        (b'-', day),
        (b'T', seconds / 3600),
        (b':', seconds / 60 % 60),
        (b':', seconds % 60),
    ] {
        json.push(separator);
        json.push(b'0' + (value / 10) as u8);
        json.push(b'0' + (value % 10) as u8);
    }
    if fraction != 0 {
        let mut six = [b'0'; 6];
        let mut rest = fraction;
        for digit in six.iter_mut().rev() {
            *digit = b'0' + (rest % 10) as u8;
            rest /= 10;
        }
        let kept = six.iter().rposition(|d| *d != b'0').map_or(0, |at| at + 1);
        json.push(b'.');
        json.extend_from_slice(&six[..kept]);
    }
    if with_zone {
        json.extend_from_slice(b"+00:00");
    }
    if before_christ {
        json.extend_from_slice(b" BC");
    }
    json.push(b'"');
}

/// The (year, month, day) of a day counted from 1970-01-01, in the proleptic Gregorian calendar
/// with astronomical years (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Text as a JSON string, escaped as PostgreSQL's `to_json` escapes it.
fn push_raw_json_string(text: &[u8], json: &mut Vec<u8>) {
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
    use super::{BINARY_SIGNATURE, BinaryFields, BinaryRows, copy_text_row_to_json};

    /// A binary COPY of two columns: a header with a 3-byte extension, `(7, 'ab')`,
    /// `(NULL, '')`, the trailer.
    fn binary_copy() -> Vec<u8> {
        let mut bytes = BINARY_SIGNATURE.to_vec();
        bytes.extend_from_slice(&0i32.to_be_bytes());
        bytes.extend_from_slice(&3i32.to_be_bytes());
        bytes.extend_from_slice(b"ext");
        for row in [
            [Some(&7i64.to_be_bytes()[..]), Some(b"ab")],
            [None, Some(b"")],
        ] {
            bytes.extend_from_slice(&2i16.to_be_bytes());
            for field in row {
                match field {
                    Some(value) => {
                        bytes.extend_from_slice(&(value.len() as i32).to_be_bytes());
                        bytes.extend_from_slice(value);
                    }
                    None => bytes.extend_from_slice(&(-1i32).to_be_bytes()),
                }
            }
        }
        bytes.extend_from_slice(&(-1i16).to_be_bytes());
        bytes
    }

    /// Every row `chunks` hold, as its fields.
    fn read_rows(chunks: &[&[u8]]) -> Result<Vec<Vec<Option<Vec<u8>>>>, super::Error> {
        let mut reader = BinaryRows::new(2);
        let mut rows = Vec::new();
        for chunk in chunks {
            reader.read(chunk, |row| {
                let mut fields = BinaryFields(row);
                let mut values = Vec::new();
                for _ in 0..2 {
                    values.push(fields.next_field()?.map(<[u8]>::to_vec));
                }
                rows.push(values);
                Ok(())
            })?;
        }
        reader.finish()?;
        Ok(rows)
    }

    #[test]
    fn binary_rows_are_read_wherever_the_chunks_split_them() {
        let bytes = binary_copy();
        let whole = read_rows(&[&bytes]).unwrap();
        assert_eq!(
            whole,
            vec![
                vec![Some(7i64.to_be_bytes().to_vec()), Some(b"ab".to_vec())],
                vec![None, Some(Vec::new())],
            ]
        );
        for at in 0..=bytes.len() {
            let (first, second) = bytes.split_at(at);
            assert_eq!(read_rows(&[first, second]).unwrap(), whole, "split at {at}");
        }
        let bytes_one_by_one: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(read_rows(&bytes_one_by_one).unwrap(), whole);
    }

    #[test]
    fn a_cut_or_malformed_binary_copy_is_refused() {
        let bytes = binary_copy();
        for at in 0..bytes.len() {
            assert!(read_rows(&[&bytes[..at]]).is_err(), "cut at {at}");
        }
        let mut other_signature = bytes.clone();
        other_signature[0] = b'X';
        assert!(read_rows(&[&other_signature]).is_err());
        let mut with_oids = bytes.clone();
        with_oids[BINARY_SIGNATURE.len() + 1] = 1;
        assert!(read_rows(&[&with_oids]).is_err());
        let mut three_columns = bytes.clone();
        three_columns[BINARY_SIGNATURE.len() + 11] = 3;
        assert!(read_rows(&[&three_columns]).is_err());
        let mut after_the_end = bytes;
        after_the_end.extend_from_slice(&2i16.to_be_bytes());
        assert!(read_rows(&[&after_the_end]).is_err());
    }

    fn json(line: &[u8]) -> String {
        let mut out = Vec::new();
        copy_text_row_to_json(line, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn copy_text_rows_become_json_arrays_as_postgres_escapes_them() {
        assert_eq!(json(b"a\tb"), r#"["a","b"]"#);
        assert_eq!(json(b"\\N\t"), r#"[null,""]"#);
        assert_eq!(json(b"\\\\N"), r#"["\\N"]"#);
        assert_eq!(
            json(b"say \"hi\"\\ttab\\nline\\\\"),
            r#"["say \"hi\"\ttab\nline\\"]"#
        );
        assert_eq!(json(b"\\b\\f\\r\\v\x01"), r#"["\b\f\r\u000b\u0001"]"#);
        assert_eq!(json("ünïcødé ✓".as_bytes()), r#"["ünïcødé ✓"]"#);
        let mut out = Vec::new();
        assert!(copy_text_row_to_json(b"trailing\\", &mut out).is_err());
    }
}
