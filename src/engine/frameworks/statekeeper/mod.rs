//! statekeeper's own schema: created and upgraded by the embedded migration chain, recorded in
//! the `state_versions` ledger, with its operations recorded in `state_migration_events`.

pub mod export;
pub mod import;

use std::time::Instant;

use sqlx::{AssertSqlSafe, PgConnection, Row};

use super::{
    Count, Entities, Event, ExportFormat, Framework, Profile, ResetStyle, StoreVersion, TableSet,
};
use crate::engine::Error;
use crate::engine::backup::BackupInfo;
use crate::engine::catalog;
use crate::engine::identifier::quote_ident;
use crate::engine::store::{
    self, AppliedStep, AppliedVersion, InitReport, Store, TableLock, UpgradeReport,
};

pub static PROFILE: Profile = Profile {
    framework: Framework::Statekeeper,
    name: "statekeeper",
    display_name: "statekeeper",
    default_schema: "statekeeper",
    tables: TableSet::WholeSchema,
    entities: Entities {
        noun: "environments",
        table: "virtual_environments",
        key: "name",
    },
    marker_table: "state_versions",
    owns_schema: true,
    reset: ResetStyle::DropTables,
    counts: &[
        count("model_versions"),
        count("function_versions"),
        count("physical_relations"),
        count("model_version_intervals"),
        count("virtual_environments"),
        count("virtual_environment_refs"),
        count("virtual_environment_checkpoints"),
        count("locks"),
        count("state_operations"),
        count("plan_runs"),
        count("state_migration_events"),
    ],
    export_formats: &[ExportFormat::Exact, ExportFormat::Statekeeper],
    foreign_operation_hint: None,
    not_initialized_hint: "run `statekeeper state init` first",
    version_mismatch_hint: "upgrade the older store with `statekeeper state upgrade` (and export \
                            again if that was the source)",
    migrate_command: &[],
    janitor_command: &[],
};

/// A row count of one table, named after it.
const fn count(table: &'static str) -> Count {
    Count {
        name: table,
        table,
        sql: "",
    }
}

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

async fn verified_version(store: &Store, conn: &mut PgConnection) -> Result<Option<i32>, Error> {
    match read_ledger(store, conn).await? {
        Some(rows) if !rows.is_empty() => Ok(Some(verify_ledger(store, &rows)?)),
        _ => Ok(None),
    }
}

fn resolve_target(store: &Store, target: Option<i32>) -> Result<i32, Error> {
    let latest = store.chain().latest();
    match target {
        None => Ok(latest),
        Some(t) if (1..=latest).contains(&t) => Ok(t),
        Some(t) => Err(Error::UnknownTargetVersion { target: t, latest }),
    }
}

/// Creates the schema and applies every step (or up to `target`) on a store that has none. On an
/// initialised store it only verifies the ledger: moving forward is `upgrade`, which backs up.
pub(crate) async fn init(store: &Store, target: Option<i32>) -> Result<InitReport, Error> {
    let started = Instant::now();
    let target = resolve_target(store, target)?;
    let mut tx = store.begin_write().await?;
    if let Some(current) = verified_version(store, &mut tx).await? {
        return Ok(InitReport {
            schema: store.schema().to_string(),
            already_initialized: true,
            from_version: current,
            to_version: current,
            applied: Vec::new(),
            duration_ms: store::elapsed_ms(started),
        });
    }
    store
        .refuse_creating_beside_other_framework(&mut tx)
        .await?;
    ensure_schema(store, &mut tx).await?;
    create_ledger(store, &mut tx).await?;
    let applied = apply_steps(store, &mut tx, 0, target).await?;
    record_event(
        store,
        &mut tx,
        &Event {
            operation: "init",
            from_version: 0,
            to_version: target,
            backup_id: None,
            details: serde_json::json!({}),
        },
    )
    .await?;
    tx.commit().await?;
    Ok(InitReport {
        schema: store.schema().to_string(),
        already_initialized: false,
        from_version: 0,
        to_version: target,
        applied,
        duration_ms: store::elapsed_ms(started),
    })
}

/// Backs up every table, then applies the steps up to `target` (default: latest).
pub(crate) async fn upgrade(store: &Store, target: Option<i32>) -> Result<UpgradeReport, Error> {
    let started = Instant::now();
    let target = resolve_target(store, target)?;
    // Writers wait; readers go on and see the store as it was until the upgrade commits. The
    // steps' own DDL takes stronger locks where it needs them.
    let mut tx = store.begin_locked().await?;
    store.lock_tables(&mut tx, TableLock::WritersWait).await?;
    let version = store.require_initialized(&mut tx).await?;
    let current = version.schema_version;
    if target < current {
        return Err(Error::DowngradeRefused { target, current });
    }
    if target == current {
        return Ok(UpgradeReport {
            schema: store.schema().to_string(),
            from_version: current,
            to_version: current,
            applied: Vec::new(),
            backup: None,
            duration_ms: store::elapsed_ms(started),
        });
    }
    let (backup, applied) = store
        .backed_up_change(&mut tx, &version, "pre-upgrade", async |conn| {
            apply_steps(store, conn, current, target).await
        })
        .await?;
    record_event(
        store,
        &mut tx,
        &Event {
            operation: "upgrade",
            from_version: current,
            to_version: target,
            backup_id: backup.as_ref().map(|b| b.id.as_str()),
            details: serde_json::json!({ "applied": applied }),
        },
    )
    .await?;
    crate::engine::failpoint::hit("upgrade.before_commit");
    tx.commit().await?;
    crate::engine::failpoint::hit("upgrade.committed");
    Ok(UpgradeReport {
        schema: store.schema().to_string(),
        from_version: current,
        to_version: target,
        applied,
        backup,
        duration_ms: store::elapsed_ms(started),
    })
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

async fn ensure_schema(store: &Store, conn: &mut PgConnection) -> Result<(), Error> {
    sqlx::query(AssertSqlSafe(format!(
        "CREATE SCHEMA IF NOT EXISTS {}",
        store.schema().quoted()
    )))
    .execute(conn)
    .await?;
    Ok(())
}

async fn create_ledger(store: &Store, conn: &mut PgConnection) -> Result<(), Error> {
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

async fn run_step_sql(store: &Store, conn: &mut PgConnection, version: i32) -> Result<(), Error> {
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

async fn apply_steps(
    store: &Store,
    conn: &mut PgConnection,
    from: i32,
    to: i32,
) -> Result<Vec<AppliedStep>, Error> {
    let mut applied = Vec::new();
    for step in store.chain().between(from, to) {
        run_step_sql(store, conn, step.version).await?;
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {}.state_versions (version, checksum, description) VALUES ($1, $2, $3)",
            store.schema().quoted()
        )))
        .bind(step.version)
        .bind(step.checksum())
        .bind(step.description)
        .execute(&mut *conn)
        .await?;
        applied.push(AppliedStep {
            version: step.version,
            description: step.description.into(),
        });
        crate::engine::failpoint::hit("upgrade.step");
    }
    Ok(applied)
}
