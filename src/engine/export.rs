//! Export format v1 (docs/export-format.md): one JSON document streamed from one consistent
//! snapshot straight into the writer, optionally compressed, hashed and counted on the fly.
//! No table is ever held in memory.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_compression::tokio::write::{GzipEncoder, ZstdEncoder};
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::{AssertSqlSafe, Connection, PgConnection};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::Error;
use super::destination::Destination;
use super::io::Observed;
use super::store::Store;

/// The export file version this statekeeper writes and reads.
pub const FILE_VERSION: u32 = 1;
/// The first schema version whose stores can be exported (every current-state table exists).
pub const EXPORT_MIN_VERSION: i32 = 3;

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
}

/// The header of every export file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    pub timestamp: String,
    pub file_version: u32,
    /// False would mark a file for reading only (e.g. a partial debugging dump).
    pub importable: bool,
    /// The schema the export was taken from.
    pub store: String,
    /// The environments filter, `null` for a full export.
    pub environments: Option<Vec<String>>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Versions {
    pub schema_version: i32,
    pub statekeeper_version: String,
}

#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ExportReport {
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
            Compression::Zstd => Self::Zstd(ZstdEncoder::new(measured)),
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
        let mut conn = self.pool().acquire().await?;
        let mut tx = conn.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await?;
        let schema_version = self
            .require_version(&mut tx, EXPORT_MIN_VERSION, "export")
            .await?;
        let s = self.schema().quoted();
        if let Some(wanted) = &options.environments {
            let missing: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!(
                "SELECT w FROM unnest($1::text[]) w WHERE NOT EXISTS (SELECT 1 FROM {s}.virtual_environments e WHERE e.name = w) ORDER BY 1"
            )))
            .bind(wanted)
            .fetch_all(&mut *tx)
            .await?;
            if !missing.is_empty() {
                return Err(Error::UnknownEnvironments(missing));
            }
        }
        // COPY takes no parameters: the filter travels in a transaction-local setting instead of
        // being spliced into SQL text.
        let filter = serde_json::to_string(&options.environments.clone().unwrap_or_default())
            .map_err(|e| Error::ExportWrite(e.to_string()))?;
        sqlx::query("SELECT set_config('statekeeper.export_environments', $1, true)")
            .bind(filter)
            .execute(&mut *tx)
            .await?;

        let measure = Arc::new(Mutex::new(Measure::default()));
        let mut out = Encoder::new(writer, options.compression, measure.clone());
        let mut report = ExportReport {
            schema_version,
            compression: options.compression,
            ..Default::default()
        };
        let metadata = Metadata {
            timestamp: chrono::Utc::now().to_rfc3339(),
            file_version: FILE_VERSION,
            importable: true,
            store: self.schema().to_string(),
            environments: options.environments.clone(),
        };
        let versions = Versions {
            schema_version,
            statekeeper_version: env!("CARGO_PKG_VERSION").into(),
        };
        let header = format!(
            "{{\"metadata\":{},\"versions\":{}",
            serde_json::to_string(&metadata).map_err(|e| Error::ExportWrite(e.to_string()))?,
            serde_json::to_string(&versions).map_err(|e| Error::ExportWrite(e.to_string()))?
        );
        out.write(header.as_bytes()).await.map_err(io_error)?;

        let filtered = options.environments.is_some();
        // Versions an environment export needs: those its environments and checkpoints reference.
        let (version_filter, function_filter) = if filtered {
            (
                format!(
                    "WHERE t.id IN (SELECT model_version_id FROM {s}.virtual_environment_refs WHERE environment = ANY({ENVIRONMENTS})
                       UNION SELECT r.model_version_id FROM {s}.virtual_environment_checkpoint_refs r
                         JOIN {s}.virtual_environment_checkpoints c ON c.id = r.checkpoint_id WHERE c.environment = ANY({ENVIRONMENTS}))"
                ),
                format!(
                    "WHERE t.id IN (SELECT function_version_id FROM {s}.virtual_environment_function_refs WHERE environment = ANY({ENVIRONMENTS})
                       UNION SELECT r.function_version_id FROM {s}.virtual_environment_checkpoint_function_refs r
                         JOIN {s}.virtual_environment_checkpoints c ON c.id = r.checkpoint_id WHERE c.environment = ANY({ENVIRONMENTS}))"
                ),
            )
        } else {
            (String::new(), String::new())
        };
        let exported_versions = format!("SELECT t.id FROM {s}.model_versions t {version_filter}");
        let exported_relations = format!(
            "SELECT id FROM {s}.physical_relations WHERE model_version_id IN ({exported_versions})"
        );
        let mut sections: Vec<(&str, String)> = vec![
            ("model_versions", format!("SELECT row_to_json(t)::text FROM {s}.model_versions t {version_filter} ORDER BY t.id")),
            (
                "model_version_intervals",
                format!("SELECT row_to_json(t)::text FROM {s}.model_version_intervals t WHERE t.model_version_id IN ({exported_versions}) ORDER BY t.id"),
            ),
            ("function_versions", format!("SELECT row_to_json(t)::text FROM {s}.function_versions t {function_filter} ORDER BY t.id")),
            (
                "physical_relations",
                format!("SELECT row_to_json(t)::text FROM {s}.physical_relations t WHERE t.model_version_id IN ({exported_versions}) ORDER BY t.id"),
            ),
            (
                "physical_relation_ancestry",
                format!(
                    "SELECT row_to_json(t)::text FROM {s}.physical_relation_ancestry t
                     WHERE t.relation_id IN ({exported_relations}) AND t.parent_relation_id IN ({exported_relations})
                     ORDER BY t.relation_id, t.parent_relation_id"
                ),
            ),
        ];
        if !filtered {
            // Store-wide state belongs to full exports only.
            sections.push((
                "locks",
                format!("SELECT row_to_json(t)::text FROM {s}.locks t ORDER BY t.name"),
            ));
            sections.push((
                "state_operations",
                format!("SELECT row_to_json(t)::text FROM {s}.state_operations t ORDER BY t.id"),
            ));
        }
        for (section, sql) in &sections {
            out.write(format!(",\"{section}\":[").as_bytes())
                .await
                .map_err(io_error)?;
            let n = stream_rows(&mut tx, &mut out, sql).await?;
            out.write(b"]").await.map_err(io_error)?;
            report.rows.insert((*section).to_owned(), n);
        }

        // Environments keyed by name, each with its refs and checkpoints (with their refs).
        out.write(b",\"environments\":{").await.map_err(io_error)?;
        let env_filter = if filtered {
            format!("WHERE t.name = ANY({ENVIRONMENTS})")
        } else {
            String::new()
        };
        let names: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT t.name FROM {s}.virtual_environments t {env_filter} ORDER BY t.name"
        )))
        .fetch_all(&mut *tx)
        .await?;
        let env_row = format!(
            "SELECT row_to_json(t)::text FROM {s}.virtual_environments t WHERE t.name = $1"
        );
        let refs = format!(
            "SELECT row_to_json(t)::text FROM {s}.virtual_environment_refs t WHERE t.environment = {ENVIRONMENT} ORDER BY t.model_name"
        );
        let function_refs = format!(
            "SELECT row_to_json(t)::text FROM {s}.virtual_environment_function_refs t WHERE t.environment = {ENVIRONMENT} ORDER BY t.function_name"
        );
        let checkpoints = format!(
            "SELECT json_build_object(
               'checkpoint', row_to_json(c),
               'refs', COALESCE((SELECT json_agg(row_to_json(r) ORDER BY r.model_name) FROM {s}.virtual_environment_checkpoint_refs r WHERE r.checkpoint_id = c.id), '[]'::json),
               'function_refs', COALESCE((SELECT json_agg(row_to_json(r) ORDER BY r.function_name) FROM {s}.virtual_environment_checkpoint_function_refs r WHERE r.checkpoint_id = c.id), '[]'::json)
             )::text FROM {s}.virtual_environment_checkpoints c WHERE c.environment = {ENVIRONMENT} ORDER BY c.id"
        );
        let counts = format!(
            "SELECT (SELECT count(*) FROM {s}.virtual_environment_checkpoint_refs r JOIN {s}.virtual_environment_checkpoints c ON c.id = r.checkpoint_id WHERE c.environment = $1),
                    (SELECT count(*) FROM {s}.virtual_environment_checkpoint_function_refs r JOIN {s}.virtual_environment_checkpoints c ON c.id = r.checkpoint_id WHERE c.environment = $1)"
        );
        for (i, name) in names.iter().enumerate() {
            let key = serde_json::to_string(name).map_err(|e| Error::ExportWrite(e.to_string()))?;
            sqlx::query("SELECT set_config('statekeeper.export_environment', $1, true)")
                .bind(name)
                .execute(&mut *tx)
                .await?;
            let row: String = sqlx::query_scalar(AssertSqlSafe(env_row.clone()))
                .bind(name)
                .fetch_one(&mut *tx)
                .await?;
            let lead = if i == 0 { "" } else { "," };
            out.write(format!("{lead}{key}:{{\"environment\":{row},\"refs\":[").as_bytes())
                .await
                .map_err(io_error)?;
            let n = stream_rows(&mut tx, &mut out, &refs).await?;
            *report
                .rows
                .entry("virtual_environment_refs".into())
                .or_default() += n;
            out.write(b"],\"function_refs\":[")
                .await
                .map_err(io_error)?;
            let n = stream_rows(&mut tx, &mut out, &function_refs).await?;
            *report
                .rows
                .entry("virtual_environment_function_refs".into())
                .or_default() += n;
            out.write(b"],\"checkpoints\":[").await.map_err(io_error)?;
            let n = stream_rows(&mut tx, &mut out, &checkpoints).await?;
            *report
                .rows
                .entry("virtual_environment_checkpoints".into())
                .or_default() += n;
            out.write(b"]}").await.map_err(io_error)?;
            let (checkpoint_refs, checkpoint_function_refs): (i64, i64) =
                sqlx::query_as(AssertSqlSafe(counts.clone()))
                    .bind(name)
                    .fetch_one(&mut *tx)
                    .await?;
            *report
                .rows
                .entry("virtual_environment_checkpoint_refs".into())
                .or_default() += checkpoint_refs as u64;
            *report
                .rows
                .entry("virtual_environment_checkpoint_function_refs".into())
                .or_default() += checkpoint_function_refs as u64;
        }
        report.environments = names.len() as u64;
        report
            .rows
            .insert("virtual_environments".into(), names.len() as u64);
        out.write(b"}}\n").await.map_err(io_error)?;
        tx.commit().await?;

        let writer = out.finish().await.map_err(io_error)?;
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

/// SQL expressions for the environment filters, read from transaction-local settings.
const ENVIRONMENTS: &str = "ARRAY(SELECT jsonb_array_elements_text(current_setting('statekeeper.export_environments')::jsonb))";
const ENVIRONMENT: &str = "current_setting('statekeeper.export_environment')";

/// Streams one query's JSON rows into the writer, comma-separated; returns how many. COPY moves
/// the rows as raw bytes, far faster than decoding them one by one: the CSV format with 0x01 as
/// quote and 0x02 as delimiter passes JSON text (which has no raw control characters) through
/// untouched, one row per line; each line end becomes the separating comma.
async fn stream_rows<W: AsyncWrite + Unpin + Send>(
    conn: &mut PgConnection,
    out: &mut Encoder<W>,
    sql: &str,
) -> Result<u64, Error> {
    let mut copy = conn
        .copy_out_raw(&format!(
            "COPY ({sql}) TO STDOUT WITH (FORMAT csv, QUOTE E'\\x01', DELIMITER E'\\x02')"
        ))
        .await?;
    let mut rows = 0u64;
    // The last byte seen is held back: the final line end must not become a comma.
    let mut held: Option<u8> = None;
    let mut chunk_out = Vec::with_capacity(64 * 1024);
    while let Some(chunk) = copy.try_next().await? {
        chunk_out.clear();
        chunk_out.extend(held.take());
        for &byte in chunk.iter() {
            match byte {
                b'\n' => {
                    rows += 1;
                    chunk_out.push(b',');
                }
                // COPY quotes a field only if it holds a raw line break: never valid here, and
                // never silently passed on as a corrupt file.
                0x01 => {
                    return Err(Error::ExportWrite(
                        "PostgreSQL returned a row with a raw line break; refusing to write a corrupt export".into(),
                    ));
                }
                _ => chunk_out.push(byte),
            }
        }
        held = chunk_out.pop();
        out.write(&chunk_out).await.map_err(io_error)?;
    }
    if let Some(byte) = held.filter(|b| *b != b',') {
        out.write(&[byte]).await.map_err(io_error)?;
    }
    Ok(rows)
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
        let mut upload = Observed::new(destination.upload(), observe);
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
