//! The writing half of every format: the output stream (compressed, then encrypted when asked,
//! counted and hashed as it is written), flushing in bounded chunks, and turning rows read by COPY into JSON.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use async_compression::tokio::write::{GzipEncoder, ZstdEncoder};
use futures::TryStreamExt;
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::PgConnection;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::engine::Error;
use crate::engine::encryption::{Encrypting, Recipients};
use crate::engine::io::Observed;
use crate::engine::manifest::{MANIFEST_KEY, Manifest};
use crate::engine::transfer::Compression;

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

/// The bytes as stored: the measured destination, behind age's encryption when asked.
enum Stored<W: AsyncWrite + Unpin> {
    Plain(Measured<W>),
    Encrypted(Encrypting<Measured<W>>),
}

impl<W: AsyncWrite + Unpin> Stored<W> {
    fn into_inner(self) -> Measured<W> {
        match self {
            Self::Plain(w) => w,
            Self::Encrypted(w) => w.into_inner(),
        }
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Stored<W> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(w) => std::pin::Pin::new(w).poll_write(cx, buf),
            Self::Encrypted(w) => std::pin::Pin::new(w).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(w) => std::pin::Pin::new(w).poll_flush(cx),
            Self::Encrypted(w) => std::pin::Pin::new(w).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(w) => std::pin::Pin::new(w).poll_shutdown(cx),
            Self::Encrypted(w) => std::pin::Pin::new(w).poll_shutdown(cx),
        }
    }
}

/// The compressing layer over the stored bytes: compression comes before encryption (encrypted
/// bytes do not compress).
enum Encoder<W: AsyncWrite + Unpin> {
    Plain(tokio::io::BufWriter<Stored<W>>),
    Gzip(GzipEncoder<Stored<W>>),
    Zstd(ZstdEncoder<Stored<W>>),
}

impl<W: AsyncWrite + Unpin> Encoder<W> {
    fn new(
        writer: W,
        compression: Compression,
        recipients: &Recipients,
        measure: Arc<Mutex<Measure>>,
    ) -> Result<Self, Error> {
        let measured: Measured<W> = Observed::new(
            writer,
            Box::new(move |bytes: &[u8]| {
                if let Ok(mut m) = measure.lock() {
                    m.add(bytes);
                }
            }),
        );
        let stored = if recipients.is_empty() {
            Stored::Plain(measured)
        } else {
            Stored::Encrypted(Encrypting::new(measured, recipients)?)
        };
        Ok(match compression {
            Compression::None => {
                Self::Plain(tokio::io::BufWriter::with_capacity(256 * 1024, stored))
            }
            Compression::Gzip => Self::Gzip(GzipEncoder::new(stored)),
            Compression::Zstd => Self::Zstd(ZstdEncoder::with_quality(
                stored,
                async_compression::Level::Fastest,
            )),
        })
    }

    async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Self::Plain(w) => w.write_all(bytes).await,
            Self::Gzip(w) => w.write_all(bytes).await,
            Self::Zstd(w) => w.write_all(bytes).await,
        }
    }

    /// Shuts every layer down, the destination included (writing compression trailers, age's
    /// last chunk and completing an upload), and returns the destination.
    async fn finish(self) -> std::io::Result<W> {
        let stored = match self {
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
        Ok(stored.into_inner().inner)
    }
}

fn io_error(e: std::io::Error) -> Error {
    Error::ExportWrite(e.to_string())
}

/// Where a format writes its document: compressed, counted and hashed on the way out.
pub(crate) struct Output<W: AsyncWrite + Unpin> {
    encoder: Encoder<W>,
    /// While a table's value is written: its name and the hash of its bytes so far.
    tap: Option<(String, Sha256)>,
    /// The finished tables' digests, for the manifest.
    digests: BTreeMap<String, String>,
}

impl<W: AsyncWrite + Unpin + Send> Output<W> {
    /// The output stream: compressed, then encrypted to `recipients` unless there are none.
    pub(crate) fn new(
        writer: W,
        compression: Compression,
        recipients: &Recipients,
        measure: Arc<Mutex<Measure>>,
    ) -> Result<Self, Error> {
        Ok(Output {
            encoder: Encoder::new(writer, compression, recipients, measure)?,
            tap: None,
            digests: BTreeMap::new(),
        })
    }

    /// Starts hashing a table's value for the manifest: call it right before the value's first
    /// byte (after its key and colon), as an import's reader starts at the value.
    pub(crate) fn begin_digest(&mut self, table: &str) {
        self.tap = Some((table.to_owned(), Sha256::new()));
    }

    /// Ends the table's digest, right after its value's last byte.
    pub(crate) fn end_digest(&mut self) {
        if let Some((table, hasher)) = self.tap.take() {
            self.digests.insert(table, hex::encode(hasher.finalize()));
        }
    }

    /// Ends the document with its manifest (`,"manifest":{…}}` and a newline): the rows per
    /// table the export counted and the digests taken.
    pub(crate) async fn end_with_manifest(
        &mut self,
        rows: &BTreeMap<String, u64>,
    ) -> Result<(), Error> {
        self.end_digest();
        let manifest = Manifest::new(rows.clone(), std::mem::take(&mut self.digests));
        let json =
            serde_json::to_string(&manifest).map_err(|e| Error::ExportWrite(e.to_string()))?;
        self.write(format!(",\"{MANIFEST_KEY}\":{json}}}\n").as_bytes())
            .await
    }

    /// Ends the compressed stream and hands back the writer.
    pub(crate) async fn finish(self) -> Result<W, Error> {
        self.encoder.finish().await.map_err(io_error)
    }

    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), Error> {
        if let Some((_, hasher)) = self.tap.as_mut() {
            hasher.update(bytes);
        }
        self.encoder.write(bytes).await.map_err(io_error)
    }

    /// `{"metadata":…,"versions":…` — the opening every format shares.
    pub async fn write_json_header(
        &mut self,
        metadata: &impl Serialize,
        versions: &impl Serialize,
    ) -> Result<(), Error> {
        let metadata =
            serde_json::to_string(metadata).map_err(|e| Error::ExportWrite(e.to_string()))?;
        let versions =
            serde_json::to_string(versions).map_err(|e| Error::ExportWrite(e.to_string()))?;
        // The header is in the manifest too: a changed version or framework is a changed file.
        for (key, value) in [("metadata", &metadata), ("versions", &versions)] {
            self.digests.insert(
                key.to_owned(),
                hex::encode(Sha256::digest(value.as_bytes())),
            );
        }
        let header = format!("{{\"metadata\":{metadata},\"versions\":{versions}");
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
