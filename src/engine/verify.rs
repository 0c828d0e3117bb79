//! `state verify`: proof that an export restores. The file is read back from where it is stored
//! (never from memory), checked against the manifest it carries, and restored, with every check
//! an import makes, into a scratch schema beside the store (`<schema>__verify_<id>`) that nothing
//! else uses; the restored tables must then hold the manifest's rows, and the scratch schema is
//! dropped. The store itself is only read (its tables' definitions and version): never written,
//! never locked.

use std::time::{Duration, Instant};

use chrono::{DateTime, Duration as ChronoDuration, NaiveDateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{AssertSqlSafe, PgConnection, PgPool};
use tokio::io::AsyncRead;

use super::Error;
use super::catalog;
use super::encryption::Identities;
use super::framework::{ExportFormat, ResetStyle};
use super::identifier::{SCRATCH_INFIX, SchemaName, quote_ident};
use super::store::Store;
use super::transfer::{Compression, ImportOptions, ImportReport};

/// Scratch schemas older than this are left over from a verification that was killed: the next
/// verification of the store drops them.
const STALE_SCRATCH_HOURS: i64 = 24;

#[derive(Clone, Debug, Default)]
pub struct VerifyOptions {
    /// The file's sha256 as stored, when known (a StateExport's `status.sha256`).
    pub expected_sha256: Option<String>,
    /// The age identities that decrypt an encrypted file.
    pub identities: Identities,
}

/// Read back from its JSON (a Job's report) as the CLI prints it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VerifyReport {
    pub format: ExportFormat,
    pub compression: Compression,
    pub bytes: u64,
    pub sha256: String,
    pub schema_version: i32,
    /// Whether the file's content was compared with the manifest it carries (otherwise with the
    /// sha256 given, in formats that carry none).
    pub manifest: bool,
    pub tables: Vec<VerifiedTable>,
    /// Not serialised here (the CLI adds `durationMs`); read back from `durationMs`.
    #[serde(
        skip_serializing,
        default,
        rename = "durationMs",
        deserialize_with = "super::transfer::duration_from_ms"
    )]
    pub duration: Duration,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VerifiedTable {
    pub name: String,
    /// Rows the file holds (as its manifest records them, else as read).
    pub rows: u64,
    /// The sha256 of the table's content in the file, which matched the manifest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Rows the scratch restore's table of this name held (none for sections of the file that
    /// are no table of the store).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restored_rows: Option<u64>,
}

impl VerifyReport {
    pub fn total_rows(&self) -> u64 {
        self.tables.iter().map(|t| t.rows).sum()
    }

    /// One line for people.
    pub fn summary(&self, from: &str) -> String {
        let checked = if self.manifest {
            "every table matched the manifest the export carries"
        } else {
            "its sha256 matched the one given (the format carries no manifest)"
        };
        format!(
            "verified {from} ({} export, {}, {}): {checked}, and it restored into a scratch \
             schema with every row; sha256 {}",
            self.format,
            super::words::counted(self.total_rows(), "rows"),
            super::words::counted(self.bytes, "bytes"),
            self.sha256
        )
    }
}

impl Store {
    /// Verifies an export of this store's framework by restoring it beside the store, which
    /// gives it the tables to restore into (and the schema version the file must have).
    pub async fn verify<R: AsyncRead + Unpin + Send + 'static>(
        &self,
        reader: R,
        options: &VerifyOptions,
    ) -> Result<VerifyReport, Error> {
        let started = Instant::now();
        let scratch = self.scratch_store().await?;
        let verified = verify_into(&scratch, reader, options).await;
        let dropped = drop_schema(self.pool(), scratch.schema()).await;
        let mut report = verified?;
        dropped?;
        report.duration = started.elapsed();
        Ok(report)
    }

    /// A new, empty store of this store's framework and version in a scratch schema: statekeeper
    /// creates its own tables there from its migrations; a framework's tables are copied from the
    /// store's definitions, with the rows that record its version. `state verify` and `state
    /// diff` restore files into it; the caller drops it ([`drop_schema`]).
    pub(crate) async fn scratch_store(&self) -> Result<Store, Error> {
        let mut conn = self.pool().acquire().await?;
        let version = self.require_initialized(&mut conn).await?;
        drop_stale_scratch_schemas(&mut conn, self.schema()).await?;
        // A diff of two files makes two in the same millisecond: each gets a name of its own.
        let mut at = Utc::now();
        let scratch_name = loop {
            let name = self
                .schema()
                .scratch_schema(&at.format("%Y%m%d%H%M%S%3f").to_string());
            if !catalog::schema_exists(&mut conn, name.as_str()).await? {
                break name;
            }
            at += ChronoDuration::milliseconds(1);
        };
        let scratch = Store::new(self.pool().clone(), scratch_name)
            .with_framework(self.framework())
            .with_chain(self.chain().clone())
            .with_backup_before_change(false)
            .beside_other_frameworks(true);
        let profile = self.profile();
        if profile.owns_schema {
            drop(conn);
            if let Err(e) = scratch.init(Some(version.schema_version)).await {
                let _ = drop_schema(self.pool(), scratch.schema()).await;
                return Err(e);
            }
            return Ok(scratch);
        }
        let kept_rows: &[&str] = match profile.reset {
            ResetStyle::EmptyTables { keep } => keep,
            ResetStyle::DropTables => &[],
        };
        let tables = self.tables(&mut conn).await?;
        let mut tx = sqlx::Transaction::begin(conn, None).await?;
        sqlx::query(AssertSqlSafe(format!(
            "CREATE SCHEMA {}",
            scratch.schema().quoted()
        )))
        .execute(&mut *tx)
        .await?;
        for table in &tables {
            let (from, to) = (
                format!("{}.{}", self.schema().quoted(), quote_ident(table)),
                format!("{}.{}", scratch.schema().quoted(), quote_ident(table)),
            );
            sqlx::query(AssertSqlSafe(format!(
                "CREATE TABLE {to} (LIKE {from} INCLUDING ALL)"
            )))
            .execute(&mut *tx)
            .await?;
            if kept_rows.contains(&table.as_str()) {
                sqlx::query(AssertSqlSafe(format!(
                    "INSERT INTO {to} SELECT * FROM {from}"
                )))
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(scratch)
    }
}

/// Restores the file into `scratch` and compares what it loaded with the file's manifest.
async fn verify_into<R: AsyncRead + Unpin + Send + 'static>(
    scratch: &Store,
    reader: R,
    options: &VerifyOptions,
) -> Result<VerifyReport, Error> {
    let import = ImportOptions {
        expected_sha256: options.expected_sha256.clone(),
        identities: options.identities.clone(),
        ..ImportOptions::replace()
    };
    let imported = scratch.import(reader, &import).await.map_err(|e| match e {
        Error::InvalidExport(reason) => Error::VerificationFailed(reason),
        other => other,
    })?;
    let mut conn = scratch.pool().acquire().await?;
    let tables = scratch.tables(&mut conn).await?;
    let ImportReport {
        manifest,
        rows: rows_read,
        ..
    } = &imported;
    let Some(manifest) = manifest else {
        if options.expected_sha256.is_some() {
            // A format without a manifest (Meltano's): the content is the stored bytes'.
            let mut verified = Vec::new();
            for (name, rows) in rows_read {
                let restored_rows = restored_rows(&mut conn, scratch, &tables, name).await?;
                verified.push(VerifiedTable {
                    name: name.clone(),
                    rows: *rows,
                    sha256: None,
                    restored_rows,
                });
            }
            return Ok(report(&imported, false, verified));
        }
        return Err(Error::VerificationFailed(format!(
            "the file carries no manifest ({}), so what it holds cannot be compared with what \
             was exported; it did restore whole. Pass --sha256 (the export's status.sha256) to \
             verify it by its checksum",
            if imported.format == ExportFormat::Meltano {
                "Meltano's format has no place for one"
            } else {
                "it was written before exports carried one"
            }
        )));
    };
    let mut verified = Vec::new();
    for (name, rows) in &manifest.rows {
        let restored_rows = restored_rows(&mut conn, scratch, &tables, name).await?;
        if let Some(restored) = restored_rows
            && restored != *rows
        {
            return Err(Error::VerificationFailed(format!(
                "table \"{name}\": the export's manifest records {rows} rows, the restore \
                 loaded {restored}"
            )));
        }
        verified.push(VerifiedTable {
            name: name.clone(),
            rows: *rows,
            sha256: manifest.sha256.get(name).cloned(),
            restored_rows,
        });
    }
    Ok(report(&imported, true, verified))
}

fn report(imported: &ImportReport, manifest: bool, tables: Vec<VerifiedTable>) -> VerifyReport {
    VerifyReport {
        format: imported.format,
        compression: imported.compression,
        bytes: imported.bytes,
        sha256: imported.sha256.clone(),
        schema_version: imported.schema_version,
        manifest,
        tables,
        duration: Duration::ZERO,
    }
}

/// The rows the scratch restore's table `name` holds. None where the store has no such table,
/// and for statekeeper's history of operations (`state_migration_events`), to which a restore
/// adds the scratch store's own (its creation, the import).
async fn restored_rows(
    conn: &mut PgConnection,
    scratch: &Store,
    tables: &[String],
    name: &str,
) -> Result<Option<u64>, Error> {
    let own_history = scratch.profile().owns_schema && name == "state_migration_events";
    if own_history || !tables.iter().any(|t| t == name) {
        return Ok(None);
    }
    let count: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT count(*) FROM {}.{}",
        scratch.schema().quoted(),
        quote_ident(name)
    )))
    .fetch_one(conn)
    .await?;
    Ok(Some(count.max(0) as u64))
}

pub(crate) async fn drop_schema(pool: &PgPool, schema: &SchemaName) -> Result<(), Error> {
    sqlx::query(AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS {} CASCADE",
        schema.quoted()
    )))
    .execute(pool)
    .await?;
    Ok(())
}

/// Drops the scratch schemas of this store that a killed verification left (older than
/// [`STALE_SCRATCH_HOURS`]; younger ones may belong to a verification still running).
async fn drop_stale_scratch_schemas(
    conn: &mut PgConnection,
    schema: &SchemaName,
) -> Result<(), Error> {
    let prefix = format!("{}{SCRATCH_INFIX}", schema.as_str());
    let cutoff = Utc::now() - ChronoDuration::hours(STALE_SCRATCH_HOURS);
    for name in catalog::schemas_with_prefix(conn, &prefix).await? {
        let created = NaiveDateTime::parse_from_str(&name[prefix.len()..], "%Y%m%d%H%M%S%3f")
            .ok()
            .map(|at| DateTime::<Utc>::from_naive_utc_and_offset(at, Utc));
        if created.is_some_and(|at| at < cutoff) {
            sqlx::query(AssertSqlSafe(format!(
                "DROP SCHEMA IF EXISTS {} CASCADE",
                quote_ident(&name)
            )))
            .execute(&mut *conn)
            .await?;
        }
    }
    Ok(())
}
