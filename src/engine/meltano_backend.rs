//! Meltano's file state backends (a local folder, S3, GCS, Azure Blob Storage) as a destination
//! and a source: one `<prefix>/<state_id>/state.json` (`{"completed": …, "partial": …}`) per
//! state ID, and a `<prefix>/<state_id>/lock` file (a UTC epoch timestamp) while a Meltano
//! process writes it. A lock younger than `lock_timeout_seconds` is held; an older one is
//! abandoned, and Meltano itself breaks it. An operation beside export and import, built on the
//! import facade (each state file is imported as a Meltano export).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path as ObjectPath;
use serde_json::value::RawValue;
use sqlx::AssertSqlSafe;
use tokio::io::AsyncWriteExt;

use crate::engine::destination::Destination;
use crate::engine::framework::ExportFormat;
use crate::engine::store::Store;
use crate::engine::transfer::{ExportOptions, ExportReport};
use crate::engine::transfer::{ImportOptions, ImportReport};
use crate::engine::{Compression, Error};

const STATE_FILE: &str = "state.json";
const LOCK_FILE: &str = "lock";
/// State files written at once: enough to hide an object store's latency, few enough to be polite.
const CONCURRENT_WRITES: usize = 8;
/// How often a held lock is looked at again while waiting for it.
const LOCK_POLL: Duration = Duration::from_millis(250);

/// How Meltano's lock files are honoured.
#[derive(Clone, Copy, Debug)]
pub struct MeltanoLocks {
    /// Meltano's `state_backend.lock_timeout_seconds`: a younger lock is held.
    pub timeout: Duration,
    /// How long to wait for a held lock before giving up on the state ID.
    pub wait: Duration,
}

impl Default for MeltanoLocks {
    /// Meltano's default timeout (10 s), and as long again to wait.
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            wait: Duration::from_secs(10),
        }
    }
}

/// Where the layout lives: `prefix` without the trailing `/` a folder URL may carry.
pub fn prefix_url(url: &str) -> &str {
    url.trim_end_matches('/')
}

impl Store {
    /// Writes every state (or those `options.environments` selects) as Meltano's file backends
    /// lay them out below `prefix`, from one snapshot. Each state file is replaced atomically,
    /// under a lock file of our own, after any Meltano lock on it is released. State IDs already
    /// below the prefix and not exported stay as they are.
    pub async fn export_meltano_backend(
        &self,
        prefix: &Destination,
        options: &ExportOptions,
        locks: MeltanoLocks,
    ) -> Result<ExportReport, Error> {
        let started = std::time::Instant::now();
        let profile = self.profile();
        if !profile.supports_format(ExportFormat::MeltanoBackend) {
            return Err(profile.unsupported_format(ExportFormat::MeltanoBackend));
        }
        if options.compression != Compression::None {
            return Err(Error::InvalidExportRequest(
                "Meltano's state backends read plain state.json files: use compression none \
                 with the meltano-backend format"
                    .into(),
            ));
        }
        if !options.recipients.is_empty() {
            return Err(Error::InvalidExportRequest(
                "Meltano's state backends read plain state.json files, which Meltano itself must \
                 read: encryption is not available with the meltano-backend format (export the \
                 meltano format to encrypt Meltano's state)"
                    .into(),
            ));
        }
        let mut tx = self.begin_snapshot().await?;
        sqlx::query("SET TRANSACTION READ ONLY")
            .execute(&mut *tx)
            .await?;
        let version = self.require_initialized(&mut tx).await?;
        let filter =
            crate::engine::frameworks::meltano::export::selection(self, &mut tx, options).await?;
        let s = self.schema().quoted();
        // Every state ID must be a file name Meltano would use, before anything is written.
        let mut ids = sqlx::query_scalar::<_, String>(AssertSqlSafe(format!(
            "SELECT state_id FROM {s}.state{filter} ORDER BY state_id"
        )))
        .fetch(&mut *tx);
        while let Some(id) = ids.try_next().await? {
            state_paths(prefix, &id)?;
        }
        drop(ids);
        // Locks held now fail the export before its first write (after the wait).
        let mut listing = prefix.list_below();
        while let Some(path) = listing.try_next().await? {
            if let [id, file] = prefix.relative(&path).as_slice()
                && file == LOCK_FILE
            {
                wait_for_lock(prefix, id, &path, locks).await?;
            }
        }
        drop(listing);

        let rows = sqlx::query_as::<_, (String, String)>(AssertSqlSafe(format!(
            "SELECT state_id, json_build_object('completed', completed_state::json, \
                    'partial', partial_state::json)::text \
             FROM {s}.state{filter} ORDER BY state_id"
        )))
        .fetch(&mut *tx);
        let mut count = 0u64;
        let mut bytes = 0u64;
        rows.map_err(Error::from)
            .map_ok(|(id, state)| {
                count += 1;
                bytes += state.len() as u64;
                write_state(prefix, id, state, locks)
            })
            .try_buffer_unordered(CONCURRENT_WRITES)
            .try_collect::<()>()
            .await?;
        tx.commit().await?;
        prefix.make_durable().await?;
        Ok(ExportReport {
            framework: self.framework(),
            format: ExportFormat::MeltanoBackend,
            schema_version: version.schema_version,
            versions: version.details.clone(),
            environments: count,
            rows: [("state".to_owned(), count)].into(),
            bytes,
            encrypted_to: 0,
            sha256: None,
            compression: Compression::None,
            duration: started.elapsed(),
        })
    }

    /// Imports every `<state_id>/state.json` below `prefix` (replace or merge, as the meltano
    /// format does), waiting for Meltano's locks on each. The files are read into the same
    /// staged, checked, all-or-nothing import: one that is not valid state changes nothing.
    pub async fn import_meltano_backend(
        &self,
        prefix: &Destination,
        options: &ImportOptions,
        locks: MeltanoLocks,
    ) -> Result<ImportReport, Error> {
        if !self.profile().supports_format(ExportFormat::MeltanoBackend) {
            return Err(self
                .profile()
                .unsupported_format(ExportFormat::MeltanoBackend));
        }
        if options.expected_sha256.is_some() {
            return Err(Error::InvalidExportRequest(
                "a checksum names one file; a Meltano state backend is a folder of them".into(),
            ));
        }
        let (writer, reader) = tokio::io::duplex(1 << 16);
        let document = write_document(prefix, writer, locks);
        let import = self.import(reader, options);
        let (written, imported) = tokio::join!(document, import);
        // The folder's own error explains an import that saw the document end early.
        written?;
        let mut report = imported?;
        report.format = ExportFormat::MeltanoBackend;
        Ok(report)
    }
}

/// Writes `{"<id>": <state.json>, …}` for every state file below `prefix`, each file checked to
/// be one JSON value (so no file can smuggle in another state ID).
async fn write_document(
    prefix: &Destination,
    mut writer: tokio::io::DuplexStream,
    locks: MeltanoLocks,
) -> Result<(), Error> {
    let broken = |e: std::io::Error| Error::ExportWrite(format!("cannot pass state on: {e}"));
    writer.write_all(b"{").await.map_err(broken)?;
    let mut first = true;
    let mut listing = prefix.list_below();
    while let Some(path) = listing.try_next().await? {
        let [id, file] = prefix.relative(&path).try_into().unwrap_or_default();
        if file != STATE_FILE {
            continue;
        }
        if let Some(lock) = prefix.child(&[&id, LOCK_FILE]) {
            wait_for_lock(prefix, &id, &lock, locks).await?;
        }
        // Deleted since it was listed (`meltano state clear`): not state any more.
        let Some(content) = prefix.read_small(&path).await? else {
            continue;
        };
        let value: &RawValue = serde_json::from_slice(&content).map_err(|e| {
            Error::InvalidExport(format!(
                "{}/{id}/{STATE_FILE} is not one JSON value: {e}",
                prefix.url()
            ))
        })?;
        let key = serde_json::to_string(&id).map_err(|e| Error::ExportWrite(e.to_string()))?;
        let mut entry = String::with_capacity(key.len() + value.get().len() + 2);
        if !first {
            entry.push(',');
        }
        first = false;
        entry.push_str(&key);
        entry.push(':');
        entry.push_str(value.get());
        writer.write_all(entry.as_bytes()).await.map_err(broken)?;
    }
    writer.write_all(b"}").await.map_err(broken)?;
    writer.shutdown().await.map_err(broken)
}

/// Replaces one state file as a Meltano writer does: wait for its lock, hold our own while
/// writing, release it.
async fn write_state(
    prefix: &Destination,
    id: String,
    state: String,
    locks: MeltanoLocks,
) -> Result<(), Error> {
    let (lock, file) = state_paths(prefix, &id)?;
    wait_for_lock(prefix, &id, &lock, locks).await?;
    prefix
        .write_small(&lock, Bytes::from(epoch_seconds(SystemTime::now())))
        .await?;
    let written = prefix.write_small(&file, Bytes::from(state)).await;
    let released = prefix.delete_small(&lock).await;
    written.and(released)
}

/// The lock file and state file of `id` below `prefix`, or why `id` cannot be a folder name
/// there.
fn state_paths(prefix: &Destination, id: &str) -> Result<(ObjectPath, ObjectPath), Error> {
    match (
        prefix.child(&[id, LOCK_FILE]),
        prefix.child(&[id, STATE_FILE]),
    ) {
        (Some(lock), Some(file)) => Ok((lock, file)),
        _ => Err(Error::InvalidExportRequest(format!(
            "state ID {id:?} cannot be a folder name in Meltano's file backends (it holds /, %, \
             *, ?, #, a bracket or a control character, or is . or ..); export it with the \
             meltano format instead"
        ))),
    }
}

/// Returns once the lock at `path` is absent or older than the timeout; fails naming the state
/// ID when it is still held after the wait.
async fn wait_for_lock(
    prefix: &Destination,
    id: &str,
    path: &ObjectPath,
    locks: MeltanoLocks,
) -> Result<(), Error> {
    let started = tokio::time::Instant::now();
    loop {
        let Some(content) = prefix.read_small(path).await? else {
            return Ok(());
        };
        let text = String::from_utf8_lossy(&content);
        let locked_at: f64 = text.trim().parse().map_err(|_| {
            Error::InvalidExportRequest(format!(
                "the lock file of Meltano state ID {id:?} at {} holds {:?}, not a timestamp",
                prefix.url(),
                text.chars().take(40).collect::<String>()
            ))
        })?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        if now - locked_at > locks.timeout.as_secs_f64() {
            // Abandoned (its writer died): Meltano breaks such a lock too.
            return Ok(());
        }
        let waited = started.elapsed();
        if waited >= locks.wait {
            return Err(Error::MeltanoStateLocked {
                state_id: id.to_owned(),
                url: prefix.url().to_owned(),
                lock_timeout: locks.timeout,
                waited,
            });
        }
        tokio::time::sleep(LOCK_POLL.min(locks.wait - waited)).await;
    }
}

/// A UTC epoch timestamp as Meltano writes it into a lock file (`1764274000.123456`).
fn epoch_seconds(at: SystemTime) -> String {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    format!("{}.{:06}", since.as_secs(), since.subsec_micros())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_timestamps_are_what_meltano_parses() {
        let at = UNIX_EPOCH + Duration::from_micros(1_764_274_000_123_456);
        assert_eq!(epoch_seconds(at), "1764274000.123456");
        assert_eq!(prefix_url("s3://bucket/state/"), "s3://bucket/state");
    }
}
