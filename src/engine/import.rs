//! Import of export files (docs/export-format.md). The file is streamed (memory stays flat)
//! into a temporary staging table inside the import's transaction; only after the whole file was
//! read, its checksum matched and every check passed does the store change, in the same
//! transaction, with a backup of the replaced state. Any refusal leaves the store as it was.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_compression::tokio::bufread::{GzipDecoder, ZstdDecoder};
use serde::Serialize;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use sqlx::{AssertSqlSafe, PgConnection};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::mpsc;

use super::Error;
use super::backup::{self, BackupInfo};
use super::catalog;
use super::export::{Compression, FILE_VERSION, Measure, Metadata, Versions};
use super::io::Observed;
use super::store::Store;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ImportMode {
    /// The store ends up equal to the file.
    #[default]
    Replace,
    /// Environments and versions in the file replace their namesakes; everything else stays.
    Merge,
}

#[derive(Clone, Debug, Default)]
pub struct ImportOptions {
    pub mode: ImportMode,
    /// Refuse the file unless its sha256 (of the bytes as stored) is this hex digest.
    pub expected_sha256: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ImportReport {
    pub mode: ImportMode,
    pub source_store: String,
    pub schema_version: i32,
    pub environments: u64,
    /// Rows read from the file, per section.
    pub rows: BTreeMap<String, u64>,
    pub bytes: u64,
    pub sha256: String,
    pub compression: Compression,
    /// The store as it was before the import.
    pub backup: Option<BackupInfo>,
    #[serde(skip)]
    pub duration: Duration,
}

/// Sections of flat rows at the top of the document.
const TOP_SECTIONS: &[&str] = &[
    "model_versions",
    "model_version_intervals",
    "function_versions",
    "physical_relations",
    "physical_relation_ancestry",
    "locks",
    "state_operations",
];
/// Sections every importable file has (`locks` and `state_operations` only in full exports).
const REQUIRED_SECTIONS: &[&str] = &[
    "model_versions",
    "model_version_intervals",
    "function_versions",
    "physical_relations",
    "physical_relation_ancestry",
    "environments",
];

/// Staged section name -> target table, in insertion order (parents first).
const TABLES: &[(&str, &str)] = &[
    ("model_versions", "model_versions"),
    ("function_versions", "function_versions"),
    ("model_version_intervals", "model_version_intervals"),
    ("physical_relations", "physical_relations"),
    ("physical_relation_ancestry", "physical_relation_ancestry"),
    ("environment", "virtual_environments"),
    ("refs", "virtual_environment_refs"),
    ("function_refs", "virtual_environment_function_refs"),
    ("checkpoint", "virtual_environment_checkpoints"),
    ("checkpoint_refs", "virtual_environment_checkpoint_refs"),
    (
        "checkpoint_function_refs",
        "virtual_environment_checkpoint_function_refs",
    ),
    ("locks", "locks"),
    ("state_operations", "state_operations"),
];

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

/// One staged row: section, environment key (JSON-encoded, or empty), compact JSON row.
struct Row {
    section: &'static str,
    environment: String,
    doc: String,
}

enum Message {
    Header(Metadata, Versions),
    Rows(Vec<Row>),
    /// Sent only after the whole document parsed and every byte was read: the one signal that
    /// allows the import to touch the store. A channel that closes without it means failure.
    End {
        counts: BTreeMap<String, u64>,
        environments: u64,
    },
}

const BATCH: usize = 512;

struct Emitter {
    tx: mpsc::Sender<Message>,
    batch: Vec<Row>,
    counts: BTreeMap<String, u64>,
    environments: u64,
}

impl Emitter {
    fn send(&mut self, message: Message) -> Result<(), String> {
        self.tx
            .blocking_send(message)
            .map_err(|_| "the import was stopped".to_string())
    }

    fn row(
        &mut self,
        section: &'static str,
        environment: &str,
        raw: &RawValue,
    ) -> Result<(), String> {
        let text = raw.get();
        // Staging is line-based: rows from pretty-printed files are compacted first.
        let doc = if text.contains(['\n', '\r']) {
            let value: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
            value.to_string()
        } else {
            text.to_owned()
        };
        *self.counts.entry(section.to_owned()).or_default() += 1;
        self.batch.push(Row {
            section,
            environment: environment.to_owned(),
            doc,
        });
        if self.batch.len() >= BATCH {
            let batch = std::mem::take(&mut self.batch);
            self.send(Message::Rows(batch))?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), String> {
        if !self.batch.is_empty() {
            let batch = std::mem::take(&mut self.batch);
            self.send(Message::Rows(batch))?;
        }
        Ok(())
    }
}

struct Document<'a>(&'a mut Emitter);

impl<'de> Visitor<'de> for Document<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a statekeeper export document (a JSON object)")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let emitter = self.0;
        let first: Option<String> = map.next_key()?;
        if first.as_deref() != Some("metadata") {
            return Err(de::Error::custom(
                "not a statekeeper export: it does not start with \"metadata\"",
            ));
        }
        let metadata: Metadata = map.next_value()?;
        if map.next_key::<String>()?.as_deref() != Some("versions") {
            return Err(de::Error::custom("\"versions\" must follow \"metadata\""));
        }
        let versions: Versions = map.next_value()?;
        emitter
            .send(Message::Header(metadata, versions))
            .map_err(de::Error::custom)?;
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                return Err(de::Error::custom(format!(
                    "section \"{key}\" appears twice"
                )));
            }
            if key == "environments" {
                map.next_value_seed(Environments(emitter))?;
            } else if let Some(section) = TOP_SECTIONS.iter().find(|s| **s == key) {
                map.next_value_seed(Rows {
                    emitter,
                    section,
                    environment: "",
                })?;
            } else {
                return Err(de::Error::custom(format!("unknown section \"{key}\"")));
            }
        }
        if let Some(missing) = REQUIRED_SECTIONS.iter().find(|s| !seen.contains(**s)) {
            return Err(de::Error::custom(format!(
                "section \"{missing}\" is missing"
            )));
        }
        Ok(())
    }
}

struct Rows<'a> {
    emitter: &'a mut Emitter,
    section: &'static str,
    environment: &'a str,
}

impl<'de> DeserializeSeed<'de> for Rows<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Rows<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "an array of {} rows", self.section)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(raw) = seq.next_element::<Box<RawValue>>()? {
            self.emitter
                .row(self.section, self.environment, &raw)
                .map_err(de::Error::custom)?;
        }
        Ok(())
    }
}

struct Environments<'a>(&'a mut Emitter);

impl<'de> DeserializeSeed<'de> for Environments<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Environments<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object of environments keyed by name")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(name) = map.next_key::<String>()? {
            let key = serde_json::to_string(&name).map_err(de::Error::custom)?;
            self.0.environments += 1;
            map.next_value_seed(Environment {
                emitter: self.0,
                key: &key,
            })?;
        }
        Ok(())
    }
}

struct Environment<'a> {
    emitter: &'a mut Emitter,
    key: &'a str,
}

impl<'de> DeserializeSeed<'de> for Environment<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Environment<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an environment: {environment, refs, function_refs, checkpoints}")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut has_row = false;
        while let Some(field) = map.next_key::<String>()? {
            match field.as_str() {
                "environment" => {
                    let raw: Box<RawValue> = map.next_value()?;
                    self.emitter
                        .row("environment", self.key, &raw)
                        .map_err(de::Error::custom)?;
                    has_row = true;
                }
                "refs" => map.next_value_seed(Rows {
                    emitter: self.emitter,
                    section: "refs",
                    environment: self.key,
                })?,
                "function_refs" => map.next_value_seed(Rows {
                    emitter: self.emitter,
                    section: "function_refs",
                    environment: self.key,
                })?,
                "checkpoints" => map.next_value_seed(Checkpoints {
                    emitter: self.emitter,
                    key: self.key,
                })?,
                other => {
                    return Err(de::Error::custom(format!(
                        "unknown field \"{other}\" in environment {}",
                        self.key
                    )));
                }
            }
        }
        if !has_row {
            return Err(de::Error::custom(format!(
                "environment {} has no \"environment\" row",
                self.key
            )));
        }
        Ok(())
    }
}

struct Checkpoints<'a> {
    emitter: &'a mut Emitter,
    key: &'a str,
}

impl<'de> DeserializeSeed<'de> for Checkpoints<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Checkpoints<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of checkpoints")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq
            .next_element_seed(Checkpoint {
                emitter: &mut *self.emitter,
                key: self.key,
            })?
            .is_some()
        {}
        Ok(())
    }
}

struct Checkpoint<'a> {
    emitter: &'a mut Emitter,
    key: &'a str,
}

impl<'de> DeserializeSeed<'de> for Checkpoint<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Checkpoint<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a checkpoint: {checkpoint, refs, function_refs}")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(field) = map.next_key::<String>()? {
            match field.as_str() {
                "checkpoint" => {
                    let raw: Box<RawValue> = map.next_value()?;
                    self.emitter
                        .row("checkpoint", self.key, &raw)
                        .map_err(de::Error::custom)?;
                }
                "refs" => map.next_value_seed(Rows {
                    emitter: self.emitter,
                    section: "checkpoint_refs",
                    environment: self.key,
                })?,
                "function_refs" => map.next_value_seed(Rows {
                    emitter: self.emitter,
                    section: "checkpoint_function_refs",
                    environment: self.key,
                })?,
                other => {
                    return Err(de::Error::custom(format!(
                        "unknown field \"{other}\" in a checkpoint of {}",
                        self.key
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Parses the whole document from a blocking reader, reads to the end (so the checksum covers
/// every byte), and only then sends `End`.
fn parse(mut reader: impl std::io::Read, tx: mpsc::Sender<Message>) -> Result<(), String> {
    let mut emitter = Emitter {
        tx,
        batch: Vec::with_capacity(BATCH),
        counts: BTreeMap::new(),
        environments: 0,
    };
    {
        let mut de = serde_json::Deserializer::from_reader(std::io::BufReader::with_capacity(
            256 * 1024,
            &mut reader,
        ));
        de.deserialize_map(Document(&mut emitter))
            .map_err(|e| e.to_string())?;
        de.end()
            .map_err(|e| format!("unexpected data after the document: {e}"))?;
    }
    let mut sink = [0u8; 64 * 1024];
    loop {
        match std::io::Read::read(&mut reader, &mut sink) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    emitter.flush()?;
    let end = Message::End {
        counts: std::mem::take(&mut emitter.counts),
        environments: emitter.environments,
    };
    emitter.send(end)
}

// ---------------------------------------------------------------------------------------------

impl Store {
    /// Imports an export file. Compression is detected from the content.
    pub async fn import<R: AsyncRead + Unpin + Send + 'static>(
        &self,
        reader: R,
        options: &ImportOptions,
    ) -> Result<ImportReport, Error> {
        let started = Instant::now();
        let measure = Arc::new(Mutex::new(Measure::default()));
        let (decoded, compression) = decoded(reader, measure.clone()).await?;
        let (tx, mut rx) = mpsc::channel::<Message>(64);
        let bridge = tokio_util::io::SyncIoBridge::new(decoded);
        let parser = tokio::task::spawn_blocking(move || parse(bridge, tx));

        let result = self
            .import_staged(&mut rx, options, compression, &measure, started)
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

    async fn import_staged(
        &self,
        rx: &mut mpsc::Receiver<Message>,
        options: &ImportOptions,
        compression: Compression,
        measure: &Arc<Mutex<Measure>>,
        started: Instant,
    ) -> Result<ImportReport, Error> {
        let Some(Message::Header(metadata, versions)) = rx.recv().await else {
            return Err(Error::InvalidExport(STREAM_ENDED.into()));
        };
        if metadata.file_version != FILE_VERSION {
            return Err(Error::InvalidExport(format!(
                "file version {} is not supported (this statekeeper reads version {FILE_VERSION})",
                metadata.file_version
            )));
        }
        if !metadata.importable {
            return Err(Error::InvalidExport(
                "the file is marked as not importable".into(),
            ));
        }
        let mut tx = self.begin_locked().await?;
        let current = self
            .require_version(&mut tx, super::export::EXPORT_MIN_VERSION, "import")
            .await?;
        if versions.schema_version != current {
            return Err(Error::InvalidExport(format!(
                "the file has schema version {}, the store has {current}; upgrade the {} first",
                versions.schema_version,
                if versions.schema_version > current {
                    "store"
                } else {
                    "source store and export again"
                }
            )));
        }

        sqlx::query(
            "CREATE TEMP TABLE statekeeper_import (seq bigserial, section text NOT NULL, environment text, doc jsonb NOT NULL) ON COMMIT DROP",
        )
        .execute(&mut *tx)
        .await?;
        let (counts, environments) = {
            // JSON rows contain no raw control characters, so 0x01/0x02 can never collide.
            let mut copy = tx
                .copy_in_raw(
                    "COPY statekeeper_import (section, environment, doc) FROM STDIN WITH (FORMAT csv, DELIMITER E'\\x02', QUOTE E'\\x01')",
                )
                .await?;
            let mut buffer = Vec::with_capacity(512 * 1024);
            let (counts, environments) = loop {
                let rows = match rx.recv().await {
                    Some(Message::Rows(rows)) => rows,
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
                for row in rows {
                    buffer.extend_from_slice(row.section.as_bytes());
                    buffer.push(0x02);
                    buffer.extend_from_slice(row.environment.as_bytes());
                    buffer.push(0x02);
                    buffer.extend_from_slice(row.doc.as_bytes());
                    buffer.push(b'\n');
                }
                if buffer.len() >= 256 * 1024 {
                    copy.send(std::mem::take(&mut buffer)).await?;
                }
            };
            if !buffer.is_empty() {
                copy.send(buffer).await?;
            }
            copy.finish().await.map_err(|e| invalid(&e))?;
            (counts, environments)
        };
        let (bytes, sha256) = std::mem::take(
            &mut *measure
                .lock()
                .map_err(|_| Error::InvalidExport("checksum state poisoned".into()))?,
        )
        .finish();
        if let Some(expected) = &options.expected_sha256
            && !expected.eq_ignore_ascii_case(&sha256)
        {
            return Err(Error::InvalidExport(format!(
                "checksum mismatch: expected sha256 {expected}, the file has {sha256}"
            )));
        }
        sqlx::query("CREATE INDEX ON statekeeper_import (section, (doc->>'id'))")
            .execute(&mut *tx)
            .await?;
        self.validate_staged(&mut tx).await?;

        let backup = backup::create(&mut tx, self.schema(), current, "pre-import").await?;
        match options.mode {
            ImportMode::Replace => self.apply_replace(&mut tx).await?,
            ImportMode::Merge => self.apply_merge(&mut tx).await?,
        }
        catalog::resync_identities(&mut tx, self.schema().as_str()).await?;
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {}.state_migration_events (operation, from_version, to_version, backup_id, actor, details) VALUES ('import', $1, $1, $2, $3, $4)",
            self.schema().quoted()
        )))
        .bind(current)
        .bind(&backup.id)
        .bind(self.actor())
        .bind(serde_json::json!({
            "mode": options.mode,
            "sourceStore": metadata.store,
            "exportedAt": metadata.timestamp,
            "environments": metadata.environments,
            "sha256": sha256,
            "bytes": bytes,
        }))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(ImportReport {
            mode: options.mode,
            source_store: metadata.store,
            schema_version: current,
            environments,
            rows: counts,
            bytes,
            sha256,
            compression,
            backup: Some(backup),
            duration: started.elapsed(),
        })
    }

    /// Every rule a file must satisfy before it may touch the store; the first broken rule wins.
    async fn validate_staged(&self, conn: &mut PgConnection) -> Result<(), Error> {
        let staged = |section: &str| {
            format!("(SELECT * FROM statekeeper_import WHERE section = '{section}')")
        };
        let unique = |section: &str, what: &str, key: &str| {
            format!(
                "SELECT format('{what} %s appears %s times', {key}, count(*)) FROM {} x GROUP BY {key} HAVING count(*) > 1",
                staged(section)
            )
        };
        let present = |section: &str, field: &str, target: &str, target_field: &str, what: &str| {
            format!(
                "SELECT format('{what}', x.environment::jsonb #>> '{{}}', x.doc->>'{field}') FROM {} x
                 WHERE NOT EXISTS (SELECT 1 FROM statekeeper_import t WHERE t.section = '{target}' AND t.doc->>'{target_field}' = x.doc->>'{field}')",
                staged(section)
            )
        };
        let checks = vec![
            "SELECT format('a %s row is not a JSON object', section) FROM statekeeper_import WHERE jsonb_typeof(doc) <> 'object'".to_string(),
            unique("model_versions", "model version id", "x.doc->>'id'"),
            unique("model_versions", "model version", "(x.doc->>'name') || ' ' || (x.doc->>'fingerprint')"),
            unique("function_versions", "function version id", "x.doc->>'id'"),
            unique("function_versions", "function version", "(x.doc->>'name') || ' ' || (x.doc->>'fingerprint')"),
            unique("physical_relations", "physical relation id", "x.doc->>'id'"),
            unique("physical_relations", "physical relation", "x.doc->>'relation_name'"),
            unique("model_version_intervals", "interval id", "x.doc->>'id'"),
            unique("environment", "environment", "x.environment::jsonb #>> '{}'"),
            unique("checkpoint", "checkpoint id", "x.doc->>'id'"),
            unique("refs", "model reference", "(x.environment::jsonb #>> '{}') || '/' || (x.doc->>'model_name')"),
            format!(
                "SELECT format('environment %s holds a row named %s', x.environment::jsonb #>> '{{}}', x.doc->>'name') FROM {} x WHERE x.doc->>'name' IS DISTINCT FROM x.environment::jsonb #>> '{{}}'",
                staged("environment")
            ),
            "SELECT format('a %s row of environment %s names environment %s', section, environment::jsonb #>> '{}', doc->>'environment') FROM statekeeper_import
             WHERE section IN ('refs', 'function_refs', 'checkpoint') AND doc->>'environment' IS DISTINCT FROM environment::jsonb #>> '{}'".to_string(),
            present("refs", "model_version_id", "model_versions", "id", "environment %s refers to model version %s, which the file does not contain"),
            present("function_refs", "function_version_id", "function_versions", "id", "environment %s refers to function version %s, which the file does not contain"),
            present("checkpoint_refs", "model_version_id", "model_versions", "id", "a checkpoint of environment %s refers to model version %s, which the file does not contain"),
            present("checkpoint_function_refs", "function_version_id", "function_versions", "id", "a checkpoint of environment %s refers to function version %s, which the file does not contain"),
            present("checkpoint_refs", "checkpoint_id", "checkpoint", "id", "environment %s has references for checkpoint %s, which the file does not contain"),
            present("physical_relations", "model_version_id", "model_versions", "id", "%sphysical relation of model version %s, which the file does not contain"),
            present("model_version_intervals", "model_version_id", "model_versions", "id", "%sinterval of model version %s, which the file does not contain"),
            present("physical_relation_ancestry", "parent_relation_id", "physical_relations", "id", "%sancestry names relation %s, which the file does not contain"),
            present("physical_relation_ancestry", "relation_id", "physical_relations", "id", "%sancestry names relation %s, which the file does not contain"),
        ];
        // Rows that do not convert to their table's row type fail when applied, inside this same
        // transaction and with PostgreSQL's reason: no separate pass over the file is needed.
        for check in checks {
            let problem: Option<Option<String>> =
                sqlx::query_scalar(AssertSqlSafe(format!("{check} LIMIT 1")))
                    .fetch_optional(&mut *conn)
                    .await
                    .map_err(|e| invalid(&e))?;
            if let Some(Some(problem)) = problem {
                return Err(Error::InvalidExport(
                    problem.replace("environment  ", "environment "),
                ));
            }
        }
        Ok(())
    }

    /// The store becomes exactly the file, ids included. The tables are emptied and reloaded
    /// under TRUNCATE's exclusive locks, so their foreign keys and secondary indexes are dropped
    /// for the load and restored after it, in the same transaction: PostgreSQL then checks each
    /// key with one join instead of a trigger per row and builds each index once, and a
    /// violation still fails (and undoes) the whole import.
    async fn apply_replace(&self, conn: &mut PgConnection) -> Result<(), Error> {
        let s = self.schema().quoted();
        let tables: Vec<String> = TABLES.iter().map(|(_, t)| format!("{s}.{t}")).collect();
        let names: Vec<String> = TABLES.iter().map(|(_, t)| (*t).to_owned()).collect();
        sqlx::query(AssertSqlSafe(format!("TRUNCATE {}", tables.join(", "))))
            .execute(&mut *conn)
            .await?;
        // Every foreign key from or to a reloaded table, as DROP and ADD statements.
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
        .bind(self.schema().as_str())
        .bind(&names)
        .fetch_all(&mut *conn)
        .await?;
        // Secondary indexes (not backing a primary key or unique constraint) are built once
        // after the load, which is cheaper than maintaining them row by row.
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
        .bind(self.schema().as_str())
        .bind(&names)
        .fetch_all(&mut *conn)
        .await?;
        for (drop, _) in keys.iter().chain(&indexes) {
            sqlx::query(AssertSqlSafe(drop.clone()))
                .execute(&mut *conn)
                .await?;
        }
        for (section, table) in TABLES {
            sqlx::query(AssertSqlSafe(format!(
                "INSERT INTO {s}.{table} OVERRIDING SYSTEM VALUE
                 SELECT (jsonb_populate_record(NULL::{s}.{table}, doc)).* FROM statekeeper_import WHERE section = '{section}'"
            )))
            .execute(&mut *conn)
            .await
            .map_err(|e| invalid(&e))?;
        }
        for (_, create) in &indexes {
            sqlx::query(AssertSqlSafe(create.clone()))
                .execute(&mut *conn)
                .await?;
        }
        for (_, add) in &keys {
            sqlx::query(AssertSqlSafe(add.clone()))
                .execute(&mut *conn)
                .await
                .map_err(|e| invalid(&e))?;
        }
        Ok(())
    }

    /// Versions (by name and fingerprint), relations (by name) and environments (by name) in the
    /// file replace their namesakes; ids are remapped to the store's; everything else stays.
    async fn apply_merge(&self, conn: &mut PgConnection) -> Result<(), Error> {
        let s = self.schema().quoted();
        let rows = |section: &str, table: &str| {
            format!(
                "(SELECT (jsonb_populate_record(NULL::{s}.{table}, doc)).* FROM statekeeper_import WHERE section = '{section}')"
            )
        };
        let statements = [
            // Model and function versions: update namesakes, insert the rest, map file ids to ours.
            format!(
                "UPDATE {s}.model_versions m SET version = f.version, kind = f.kind, definition = f.definition, created_at = f.created_at
                 FROM {} f WHERE m.name = f.name AND m.fingerprint = f.fingerprint",
                rows("model_versions", "model_versions")
            ),
            format!(
                "INSERT INTO {s}.model_versions (name, fingerprint, version, kind, definition, created_at)
                 SELECT f.name, f.fingerprint, f.version, f.kind, f.definition, f.created_at FROM {} f
                 WHERE NOT EXISTS (SELECT 1 FROM {s}.model_versions m WHERE m.name = f.name AND m.fingerprint = f.fingerprint)",
                rows("model_versions", "model_versions")
            ),
            format!(
                "CREATE TEMP TABLE statekeeper_version_map ON COMMIT DROP AS
                 SELECT f.id AS file_id, m.id AS local_id FROM {} f JOIN {s}.model_versions m ON m.name = f.name AND m.fingerprint = f.fingerprint",
                rows("model_versions", "model_versions")
            ),
            format!(
                "UPDATE {s}.function_versions m SET definition = f.definition, created_at = f.created_at
                 FROM {} f WHERE m.name = f.name AND m.fingerprint = f.fingerprint",
                rows("function_versions", "function_versions")
            ),
            format!(
                "INSERT INTO {s}.function_versions (name, fingerprint, definition, created_at)
                 SELECT f.name, f.fingerprint, f.definition, f.created_at FROM {} f
                 WHERE NOT EXISTS (SELECT 1 FROM {s}.function_versions m WHERE m.name = f.name AND m.fingerprint = f.fingerprint)",
                rows("function_versions", "function_versions")
            ),
            format!(
                "CREATE TEMP TABLE statekeeper_function_map ON COMMIT DROP AS
                 SELECT f.id AS file_id, m.id AS local_id FROM {} f JOIN {s}.function_versions m ON m.name = f.name AND m.fingerprint = f.fingerprint",
                rows("function_versions", "function_versions")
            ),
            // Intervals of merged versions are replaced by the file's.
            format!(
                "DELETE FROM {s}.model_version_intervals WHERE model_version_id IN (SELECT local_id FROM statekeeper_version_map)"
            ),
            format!(
                "INSERT INTO {s}.model_version_intervals (model_version_id, start_ts, end_ts, is_dev, created_at)
                 SELECT v.local_id, f.start_ts, f.end_ts, f.is_dev, f.created_at FROM {} f JOIN statekeeper_version_map v ON v.file_id = f.model_version_id",
                rows("model_version_intervals", "model_version_intervals")
            ),
            // Physical relations by name, then their ancestry.
            format!(
                "INSERT INTO {s}.physical_relations (model_version_id, relation_name, created_at)
                 SELECT v.local_id, f.relation_name, f.created_at FROM {} f JOIN statekeeper_version_map v ON v.file_id = f.model_version_id
                 ON CONFLICT (relation_name) DO UPDATE SET model_version_id = excluded.model_version_id",
                rows("physical_relations", "physical_relations")
            ),
            format!(
                "CREATE TEMP TABLE statekeeper_relation_map ON COMMIT DROP AS
                 SELECT f.id AS file_id, p.id AS local_id FROM {} f JOIN {s}.physical_relations p ON p.relation_name = f.relation_name",
                rows("physical_relations", "physical_relations")
            ),
            format!(
                "INSERT INTO {s}.physical_relation_ancestry (relation_id, parent_relation_id)
                 SELECT c.local_id, p.local_id FROM {} f
                 JOIN statekeeper_relation_map c ON c.file_id = f.relation_id JOIN statekeeper_relation_map p ON p.file_id = f.parent_relation_id
                 ON CONFLICT DO NOTHING",
                rows("physical_relation_ancestry", "physical_relation_ancestry")
            ),
            // Environments in the file replace their namesakes wholesale (refs and checkpoints).
            format!(
                "DELETE FROM {s}.virtual_environments WHERE name IN (SELECT environment::jsonb #>> '{{}}' FROM statekeeper_import WHERE section = 'environment')"
            ),
            format!("INSERT INTO {s}.virtual_environments SELECT * FROM {} e", rows("environment", "virtual_environments")),
            format!(
                "INSERT INTO {s}.virtual_environment_refs (environment, model_name, model_version_id)
                 SELECT f.environment, f.model_name, v.local_id FROM {} f JOIN statekeeper_version_map v ON v.file_id = f.model_version_id",
                rows("refs", "virtual_environment_refs")
            ),
            format!(
                "INSERT INTO {s}.virtual_environment_function_refs (environment, function_name, function_version_id)
                 SELECT f.environment, f.function_name, v.local_id FROM {} f JOIN statekeeper_function_map v ON v.file_id = f.function_version_id",
                rows("function_refs", "virtual_environment_function_refs")
            ),
            format!(
                "CREATE TEMP TABLE statekeeper_checkpoint_map ON COMMIT DROP AS
                 SELECT f.id AS file_id, nextval(pg_get_serial_sequence('{s}.virtual_environment_checkpoints', 'id')) AS local_id FROM {} f",
                rows("checkpoint", "virtual_environment_checkpoints")
            ),
            format!(
                "INSERT INTO {s}.virtual_environment_checkpoints (id, environment, plan_id, description, created_at) OVERRIDING SYSTEM VALUE
                 SELECT c.local_id, f.environment, f.plan_id, f.description, f.created_at FROM {} f JOIN statekeeper_checkpoint_map c ON c.file_id = f.id",
                rows("checkpoint", "virtual_environment_checkpoints")
            ),
            format!(
                "INSERT INTO {s}.virtual_environment_checkpoint_refs (checkpoint_id, model_name, model_version_id)
                 SELECT c.local_id, f.model_name, v.local_id FROM {} f
                 JOIN statekeeper_checkpoint_map c ON c.file_id = f.checkpoint_id JOIN statekeeper_version_map v ON v.file_id = f.model_version_id",
                rows("checkpoint_refs", "virtual_environment_checkpoint_refs")
            ),
            format!(
                "INSERT INTO {s}.virtual_environment_checkpoint_function_refs (checkpoint_id, function_name, function_version_id)
                 SELECT c.local_id, f.function_name, v.local_id FROM {} f
                 JOIN statekeeper_checkpoint_map c ON c.file_id = f.checkpoint_id JOIN statekeeper_function_map v ON v.file_id = f.function_version_id",
                rows("checkpoint_function_refs", "virtual_environment_checkpoint_function_refs")
            ),
        ];
        for sql in statements {
            sqlx::query(AssertSqlSafe(sql))
                .execute(&mut *conn)
                .await
                .map_err(|e| invalid(&e))?;
        }
        Ok(())
    }
}

/// The marker the staging step returns when the stream ended early; the parser's error says why.
const STREAM_ENDED: &str = "the file ended before its header";

/// Database errors while loading a file are problems with the file (types, constraints).
fn invalid(e: &sqlx::Error) -> Error {
    match e {
        sqlx::Error::Database(db) => Error::InvalidExport(db.message().to_owned()),
        other => Error::InvalidExport(other.to_string()),
    }
}
