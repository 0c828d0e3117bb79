//! statekeeper's own schema: created and upgraded by the embedded migration chain, recorded in
//! the `state_versions` ledger, with its operations recorded in `state_migration_events`.

pub mod export;
pub mod import;
pub(crate) mod lifecycle;
pub mod profile;

use sqlx::{AssertSqlSafe, PgConnection, Row};

use crate::engine::Error;
use crate::engine::backup::BackupInfo;
use crate::engine::catalog;
use crate::engine::framework::{Event, StoreVersion};
use crate::engine::identifier::quote_ident;
use crate::engine::reports::{AppliedStep, AppliedVersion};
use crate::engine::store::Store;

/// The verified ledger version, `None` for a store without a ledger (never initialised, or reset).
pub(crate) async fn read_version(
    store: &Store,
    conn: &mut PgConnection,
) -> Result<Option<StoreVersion>, Error> {
    Ok(verified_version(store, conn).await?.map(|v| StoreVersion {
        schema_version: v,
        details: Default::default(),
    }))
}

/// The ledger as recorded; `None` when the store has none.
pub(crate) async fn read_ledger(
    store: &Store,
    conn: &mut PgConnection,
) -> Result<Option<Vec<AppliedVersion>>, Error> {
    if !catalog::table_exists(conn, store.schema().as_str(), "state_versions").await? {
        return Ok(None);
    }
    let rows = sqlx::query(AssertSqlSafe(format!(
        "SELECT version, checksum, description, applied_at FROM {}.state_versions ORDER BY version",
        store.schema().quoted()
    )))
    .fetch_all(conn)
    .await?;
    let applied = rows
        .iter()
        .map(|r| {
            Ok(AppliedVersion {
                version: r.try_get("version")?,
                checksum: r.try_get("checksum")?,
                description: r.try_get("description")?,
                applied_at: r.try_get("applied_at")?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    Ok(Some(applied))
}

/// The current version, after checking every recorded step against this binary.
pub(crate) fn verify_ledger(store: &Store, applied: &[AppliedVersion]) -> Result<i32, Error> {
    let chain = store.chain();
    let latest = chain.latest();
    let current = applied.iter().map(|a| a.version).max().unwrap_or(0);
    if current > latest {
        return Err(Error::SchemaNewer {
            schema: store.schema().to_string(),
            current,
            latest,
        });
    }
    for recorded in applied {
        if let Some(step) = chain.get(recorded.version) {
            let shipped = step.checksum();
            if shipped != recorded.checksum {
                return Err(Error::ChecksumMismatch {
                    version: recorded.version,
                    recorded: recorded.checksum.clone(),
                    shipped,
                });
            }
        }
    }
    Ok(current)
}

pub(crate) async fn verified_version(
    store: &Store,
    conn: &mut PgConnection,
) -> Result<Option<i32>, Error> {
    match read_ledger(store, conn).await? {
        Some(rows) if !rows.is_empty() => Ok(Some(verify_ledger(store, &rows)?)),
        _ => Ok(None),
    }
}

/// Steps of the chain after `current`, for `status`.
pub(crate) fn pending(store: &Store, current: i32) -> Vec<AppliedStep> {
    let chain = store.chain();
    chain
        .between(current, chain.latest())
        .map(|m| AppliedStep {
            version: m.version,
            description: m.description.into(),
        })
        .collect()
}

/// Refuses backups taken by a statekeeper whose steps differ from this one's.
pub(crate) async fn check_backup(
    store: &Store,
    conn: &mut PgConnection,
    restored: &BackupInfo,
) -> Result<(), Error> {
    let chain = store.chain();
    let incompatible = |reason: String| Error::IncompatibleBackup {
        id: restored.id.clone(),
        reason,
    };
    if restored.schema_version > chain.latest() {
        return Err(incompatible(format!(
            "it is at schema version {}, newer than {} that this statekeeper knows",
            restored.schema_version,
            chain.latest()
        )));
    }
    let backup_schema = store.schema().backup_schema(&restored.id);
    if !catalog::table_exists(conn, &backup_schema, "state_versions").await? {
        return Ok(());
    }
    let recorded: Vec<(i32, String)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT version, checksum FROM {}.state_versions ORDER BY version",
        quote_ident(&backup_schema)
    )))
    .fetch_all(&mut *conn)
    .await?;
    for (version, checksum) in recorded {
        match chain.get(version) {
            Some(step) if step.checksum() == checksum => {}
            _ => {
                return Err(incompatible(format!(
                    "its migration {version} does not match the one this statekeeper ships"
                )));
            }
        }
    }
    Ok(())
}

/// Rebuilds the exact schema of the backup's version from the embedded steps.
pub(crate) async fn rebuild_tables(
    store: &Store,
    conn: &mut PgConnection,
    backup: &BackupInfo,
) -> Result<(), Error> {
    ensure_schema(store, conn).await?;
    create_ledger(store, conn).await?;
    for step in store.chain().between(0, backup.schema_version) {
        run_step_sql(store, conn, step.version).await?;
    }
    Ok(())
}

/// Keeps the migration history across a restore: copied aside before the rows are replaced,
/// put back by [`restore_migration_events`].
pub(crate) async fn carry_migration_events(
    store: &Store,
    conn: &mut PgConnection,
) -> Result<(), Error> {
    if !catalog::table_exists(conn, store.schema().as_str(), "state_migration_events").await? {
        return Ok(());
    }
    sqlx::query(AssertSqlSafe(format!(
        "CREATE TEMP TABLE statekeeper_carried_events ON COMMIT DROP AS TABLE {}.state_migration_events",
        store.schema().quoted()
    )))
    .execute(conn)
    .await?;
    Ok(())
}

/// Adds the carried migration events that the restored rows lack, when the restored version has
/// the table (version 2 and later).
pub(crate) async fn restore_migration_events(
    store: &Store,
    conn: &mut PgConnection,
) -> Result<(), Error> {
    let carried: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_class WHERE relname = 'statekeeper_carried_events' AND relpersistence = 't')",
    )
    .fetch_one(&mut *conn)
    .await?;
    if !carried
        || !catalog::table_exists(conn, store.schema().as_str(), "state_migration_events").await?
    {
        return Ok(());
    }
    let columns =
        catalog::column_list(conn, store.schema().as_str(), "state_migration_events").await?;
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {store}.state_migration_events ({columns}) OVERRIDING SYSTEM VALUE \
         SELECT {columns} FROM pg_temp.statekeeper_carried_events c \
         WHERE NOT EXISTS (SELECT 1 FROM {store}.state_migration_events e WHERE e.id = c.id)",
        store = store.schema().quoted()
    )))
    .execute(&mut *conn)
    .await?;
    sqlx::query("DROP TABLE pg_temp.statekeeper_carried_events")
        .execute(conn)
        .await?;
    Ok(())
}

/// Appends to `state_migration_events` when the store's version has that table.
pub(crate) async fn record_event(
    store: &Store,
    conn: &mut PgConnection,
    event: &Event<'_>,
) -> Result<(), Error> {
    if !catalog::table_exists(conn, store.schema().as_str(), "state_migration_events").await? {
        return Ok(());
    }
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {}.state_migration_events (operation, from_version, to_version, backup_id, actor, details) \
         VALUES ($1, $2, $3, $4, $5, $6)",
        store.schema().quoted()
    )))
    .bind(event.operation)
    .bind(event.from_version)
    .bind(event.to_version)
    .bind(event.backup_id)
    .bind(store.actor())
    .bind(&event.details)
    .execute(conn)
    .await?;
    Ok(())
}

pub(crate) async fn ensure_schema(store: &Store, conn: &mut PgConnection) -> Result<(), Error> {
    sqlx::query(AssertSqlSafe(format!(
        "CREATE SCHEMA IF NOT EXISTS {}",
        store.schema().quoted()
    )))
    .execute(conn)
    .await?;
    Ok(())
}

pub(crate) async fn create_ledger(store: &Store, conn: &mut PgConnection) -> Result<(), Error> {
    sqlx::query(AssertSqlSafe(format!(
        "CREATE TABLE IF NOT EXISTS {}.state_versions (\
           version integer PRIMARY KEY, checksum text NOT NULL, description text NOT NULL, \
           applied_at timestamptz NOT NULL DEFAULT now())",
        store.schema().quoted()
    )))
    .execute(conn)
    .await?;
    Ok(())
}

pub(crate) async fn run_step_sql(
    store: &Store,
    conn: &mut PgConnection,
    version: i32,
) -> Result<(), Error> {
    let chain = store.chain();
    let step = chain.get(version).ok_or(Error::UnknownTargetVersion {
        target: version,
        latest: chain.latest(),
    })?;
    sqlx::query(AssertSqlSafe(format!(
        "SET LOCAL search_path TO {}",
        store.schema().quoted()
    )))
    .execute(&mut *conn)
    .await?;
    let result = sqlx::raw_sql(AssertSqlSafe(step.sql))
        .execute(&mut *conn)
        .await;
    // Restore the default path even when the step failed, for clear later errors.
    let _ = sqlx::query("SET LOCAL search_path TO DEFAULT")
        .execute(&mut *conn)
        .await;
    result.map_err(|source| Error::MigrationFailed {
        version: step.version,
        description: step.description.into(),
        source,
    })?;
    Ok(())
}
