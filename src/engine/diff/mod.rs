//! `state diff`: what differs between two copies of a store's state, each the store as it is, a
//! backup, or an export file. Each side is a schema with the store's tables: the store's own, the
//! backup's (`<schema>__backup_<id>`), or a scratch schema a file is restored into exactly as
//! `state verify` restores it (dropped afterwards, also on error). The sides are then compared in
//! SQL from one REPEATABLE READ snapshot, rows streamed, so that a diff of a file costs about one
//! import of it and memory stays flat: counts are exact, lists are capped at a limit.

mod meltano;
pub mod report;
mod sqlmesh;
mod statekeeper;

use std::time::Instant;

use sqlx::PgConnection;
use tokio::io::AsyncRead;

pub use report::DiffReport;

use super::Error;
use super::backup::{self, BackupInfo};
use super::encryption::Identities;
use super::framework::Framework;
use super::identifier::SchemaName;
use super::store::{Store, elapsed_ms};
use super::transfer::ImportOptions;

/// Items each list of a report keeps unless told otherwise.
pub const DEFAULT_LIMIT: usize = 1000;

/// One side of a diff.
pub enum DiffSide<R> {
    /// The store as it is (one snapshot of it).
    Live,
    /// One of the store's backups, by id.
    Backup(String),
    /// An export file of the store's framework, in any format an import reads.
    File(R, FileSource),
}

/// How a file side is named and read.
#[derive(Clone, Debug, Default)]
pub struct FileSource {
    /// What people call it: its URL.
    pub label: String,
    /// Refuse the file unless its sha256 (of the bytes as stored) is this.
    pub expected_sha256: Option<String>,
    /// The age identities that decrypt an encrypted file.
    pub identities: Identities,
}

#[derive(Clone, Copy, Debug)]
pub struct DiffOptions {
    /// Items each list keeps (at least 1); counts are exact whatever it is.
    pub limit: usize,
    /// Compare as a merge of TO into FROM: report only what the merge would change (nothing only
    /// in FROM goes, but what TO's environments replace).
    pub merge: bool,
}

impl Default for DiffOptions {
    fn default() -> Self {
        Self {
            limit: DEFAULT_LIMIT,
            merge: false,
        }
    }
}

/// A side resolved to a schema holding the store's tables.
pub(crate) struct Side {
    pub(crate) schema: SchemaName,
    pub(crate) label: String,
    /// The state's schema version; none for the store itself, read in the diff's snapshot.
    pub(crate) version: Option<i32>,
}

impl Side {
    pub(crate) fn live(store: &Store, label: impl Into<String>) -> Self {
        Self {
            schema: store.schema().clone(),
            label: label.into(),
            version: None,
        }
    }

    pub(crate) fn backup(store: &Store, info: &BackupInfo) -> Self {
        Self {
            schema: store.schema().backup_of(&info.id),
            label: format!("backup {}", info.id),
            version: Some(info.schema_version),
        }
    }
}

impl Store {
    /// What differs from `from` to `to`. A file side is restored into a scratch schema beside
    /// the store first (as `state verify` does: every check an import makes), which is dropped
    /// whatever happens; the store itself is only read.
    pub async fn diff<R: AsyncRead + Unpin + Send + 'static>(
        &self,
        from: DiffSide<R>,
        to: DiffSide<R>,
        options: &DiffOptions,
    ) -> Result<DiffReport, Error> {
        let started = Instant::now();
        let mut scratches = Vec::new();
        let compared = self.diff_sides(from, to, options, &mut scratches).await;
        let mut dropped = Ok(());
        for scratch in &scratches {
            if let Err(e) = super::verify::drop_schema(self.pool(), scratch).await {
                dropped = Err(e);
            }
        }
        let mut report = compared?;
        dropped?;
        report.duration_ms = elapsed_ms(started);
        Ok(report)
    }

    async fn diff_sides<R: AsyncRead + Unpin + Send + 'static>(
        &self,
        from: DiffSide<R>,
        to: DiffSide<R>,
        options: &DiffOptions,
        scratches: &mut Vec<SchemaName>,
    ) -> Result<DiffReport, Error> {
        let from = self.resolve(from, scratches).await?;
        let to = self.resolve(to, scratches).await?;
        let mut tx = self.begin_snapshot().await?;
        let report = compare(self, &mut tx, &from, &to, options).await?;
        tx.commit().await?;
        Ok(report)
    }

    /// The schema a side is read from: a file is restored into a new scratch schema (added to
    /// `scratches` as soon as it exists).
    async fn resolve<R: AsyncRead + Unpin + Send + 'static>(
        &self,
        side: DiffSide<R>,
        scratches: &mut Vec<SchemaName>,
    ) -> Result<Side, Error> {
        match side {
            DiffSide::Live => Ok(Side::live(
                self,
                format!("the store (schema \"{}\")", self.schema()),
            )),
            DiffSide::Backup(id) => {
                let mut conn = self.pool().acquire().await?;
                let info = backup::find(&mut conn, self.schema(), Some(&id)).await?;
                if info.framework != self.framework() {
                    return Err(Error::InvalidOperation(format!(
                        "backup {id} holds {} state, not {}'s: pass --framework {}",
                        info.framework.profile().display_name,
                        self.profile().display_name,
                        info.framework.as_str()
                    )));
                }
                Ok(Side::backup(self, &info))
            }
            DiffSide::File(reader, source) => {
                let scratch = self.scratch_store().await?;
                scratches.push(scratch.schema().clone());
                let import = ImportOptions {
                    expected_sha256: source.expected_sha256,
                    identities: source.identities,
                    ..ImportOptions::replace()
                };
                let imported = scratch.import(reader, &import).await?;
                Ok(Side {
                    schema: scratch.schema().clone(),
                    label: source.label,
                    version: Some(imported.schema_version),
                })
            }
        }
    }
}

/// Compares two sides of `store`'s framework in the caller's transaction (a snapshot).
pub(crate) async fn compare(
    store: &Store,
    conn: &mut PgConnection,
    from: &Side,
    to: &Side,
    options: &DiffOptions,
) -> Result<DiffReport, Error> {
    let limit = options.limit.max(1);
    let live = match (from.version, to.version) {
        (Some(_), Some(_)) => None,
        _ => Some(store.require_initialized(conn).await?.schema_version),
    };
    let (from_version, to_version) = (
        from.version.or(live).unwrap_or_default(),
        to.version.or(live).unwrap_or_default(),
    );
    let framework = store.framework();
    // SQLMesh's tables change shape between its state versions.
    if framework == Framework::Sqlmesh && from_version != to_version {
        return Err(Error::Incomparable {
            from: from.label.clone(),
            to: to.label.clone(),
            reason: format!(
                "one holds SQLMesh state schema version {from_version}, the other \
                 {to_version}; a diff compares states of one version (restore or migrate one \
                 of them first)"
            ),
        });
    }
    let mut report = DiffReport {
        framework,
        from: from.label.clone(),
        to: to.label.clone(),
        identical: false,
        limit,
        merge: options.merge,
        sqlmesh: None,
        statekeeper: None,
        meltano: None,
        duration_ms: 0,
    };
    // For this transaction only: a backup's tables are copies PostgreSQL has no statistics for,
    // so it estimates millions of rows and JIT-compiles the plans, which took longer than running
    // them (1 s of 1.3 s at 100,000 versions); and sorts and hashes of a few MiB stay in memory.
    sqlx::raw_sql("SET LOCAL jit = off; SET LOCAL work_mem = '64MB'")
        .execute(&mut *conn)
        .await?;
    let (f, t, merge) = (&from.schema, &to.schema, options.merge);
    match framework {
        Framework::Sqlmesh => report.sqlmesh = Some(sqlmesh::diff(conn, f, t, limit, merge).await?),
        Framework::Statekeeper => {
            report.statekeeper = Some(statekeeper::diff(conn, f, t, limit, merge).await?)
        }
        Framework::Meltano => report.meltano = Some(meltano::diff(conn, f, t, limit, merge).await?),
    }
    report.identical = !report.has_differences();
    Ok(report)
}
