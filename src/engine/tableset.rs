//! Operations that are generic over a store's table set, for every framework: rollback to a
//! backup and reset. Each is one transaction under [`Store::begin_write`]'s locks; a
//! framework's particulars come in through the hooks in `frameworks/`.

use std::time::Instant;

use sqlx::{AssertSqlSafe, PgConnection};

use super::Error;
use super::backup::{self, BackupInfo};
use super::catalog;
use super::framework::{Event, ResetStyle};
use super::guards;
use super::hooks;
use super::identifier::{qualified_list, quote_ident};
use super::reports::{ResetApproval, ResetReport, RollbackReport};
use super::store::{Store, elapsed_ms};

/// Replaces the store with a backup (the newest, or the one named), after backing up the state
/// it replaces.
pub(crate) async fn rollback(
    store: &Store,
    backup_id: Option<&str>,
) -> Result<RollbackReport, Error> {
    let started = Instant::now();
    let mut tx = store.begin_write().await?;
    let restored = backup::find(&mut tx, store.schema(), backup_id).await?;
    if restored.framework != store.framework() {
        return Err(Error::IncompatibleBackup {
            id: restored.id.clone(),
            reason: format!(
                "it is a backup of a {} store, and this store is {}",
                restored.framework.profile().display_name,
                store.profile().display_name
            ),
        });
    }
    hooks::check_backup(store, &mut tx, &restored).await?;
    let current = hooks::read_version(store, &mut tx).await?;
    let pre_rollback_backup = match &current {
        Some(version) => {
            store
                .backup_before_change(&mut tx, version, "pre-rollback")
                .await?
        }
        None => None,
    };
    let rows_restored = restore(store, &mut tx, &restored).await?;
    crate::engine::failpoint::hit("rollback.restored");
    let from_version = current.map_or(0, |v| v.schema_version);
    hooks::record_event(
        store,
        &mut tx,
        &Event {
            operation: "rollback",
            from_version,
            to_version: restored.schema_version,
            backup_id: Some(&restored.id),
            details: serde_json::json!({
                "preRollbackBackup": pre_rollback_backup.as_ref().map(|b| b.id.clone()),
                "rowsRestored": rows_restored,
            }),
        },
    )
    .await?;
    crate::engine::failpoint::hit("rollback.before_commit");
    tx.commit().await?;
    crate::engine::failpoint::hit("rollback.committed");
    Ok(RollbackReport {
        schema: store.schema().to_string(),
        from_version,
        to_version: restored.schema_version,
        restored_backup: restored,
        pre_rollback_backup,
        rows_restored,
        duration_ms: elapsed_ms(started),
    })
}

/// Makes every table of the store hold exactly the backup's rows. Where the live tables have the
/// backup's structure they are emptied and refilled (keeping their owner, grants and identity);
/// otherwise (a rollback across an upgrade, or after a reset that dropped them) they are rebuilt
/// as they were at the backup's version first.
async fn restore(
    store: &Store,
    conn: &mut PgConnection,
    backup: &BackupInfo,
) -> Result<i64, Error> {
    let schema = store.schema().as_str();
    let backup_schema = store.schema().backup_schema(&backup.id);
    let backup_tables = backup::tables(conn, store.schema(), &backup.id).await?;
    let live_tables = store.tables(conn).await?;
    hooks::before_restore(store, conn).await?;
    let mut same_structure = backup_tables == live_tables;
    for table in &backup_tables {
        if !same_structure {
            break;
        }
        same_structure = catalog::columns(conn, schema, table).await?
            == catalog::columns(conn, &backup_schema, table).await?;
    }
    if same_structure {
        if !live_tables.is_empty() {
            sqlx::query(AssertSqlSafe(format!(
                "TRUNCATE {}",
                qualified_list(schema, &live_tables)
            )))
            .execute(&mut *conn)
            .await?;
        }
    } else {
        drop_tables(conn, schema, &live_tables).await?;
        hooks::rebuild_tables(store, conn, backup).await?;
    }
    sqlx::query("SET CONSTRAINTS ALL DEFERRED")
        .execute(&mut *conn)
        .await?;
    let mut rows_restored = 0i64;
    for table in &backup_tables {
        if !catalog::table_exists(conn, schema, table).await? {
            return Err(Error::IncompatibleBackup {
                id: backup.id.clone(),
                reason: format!(
                    "it holds table \"{table}\" that schema version {} does not define",
                    backup.schema_version
                ),
            });
        }
        let columns = catalog::column_list(conn, &backup_schema, table).await?;
        let loaded = sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {}.{t} ({columns}) OVERRIDING SYSTEM VALUE SELECT {columns} FROM {}.{t}",
            quote_ident(schema),
            quote_ident(&backup_schema),
            t = quote_ident(table),
        )))
        .execute(&mut *conn)
        .await?;
        rows_restored += loaded.rows_affected() as i64;
    }
    hooks::after_restore(store, conn).await?;
    catalog::resync_identities(conn, schema).await?;
    Ok(rows_restored)
}

/// Drops (statekeeper) or empties (a framework's own tables) the store, keeping what it removes
/// in a backup. Refused unless the store allows it and the request is approved.
pub(crate) async fn reset(store: &Store, approval: ResetApproval) -> Result<ResetReport, Error> {
    guards::refuse_reset_not_allowed(approval.allow_reset)?;
    if !approval.approved {
        return Err(Error::ResetRefused(
            "the reset was not approved (pass --auto-approve to the CLI, or approve the \
             StateMigration's plan with spec.approval.planHash)"
                .into(),
        ));
    }
    let started = Instant::now();
    let mut tx = store.begin_write().await?;
    let current = hooks::read_version(store, &mut tx).await?;
    if current.is_none() {
        store.refuse_other_framework(&mut tx).await?;
    }
    let backup = match &current {
        Some(version) => {
            store
                .backup_before_change(&mut tx, version, "pre-reset")
                .await?
        }
        None => None,
    };
    let tables = store.tables(&mut tx).await?;
    let schema = store.schema().as_str();
    let tables_reset = match &store.profile().reset {
        ResetStyle::DropTables => {
            drop_tables(&mut tx, schema, &tables).await?;
            tables.len()
        }
        ResetStyle::EmptyTables { keep } => {
            let emptied: Vec<String> = tables
                .into_iter()
                .filter(|t| !keep.contains(&t.as_str()))
                .collect();
            if !emptied.is_empty() {
                sqlx::query(AssertSqlSafe(format!(
                    "TRUNCATE {}",
                    qualified_list(schema, &emptied)
                )))
                .execute(&mut *tx)
                .await?;
            }
            emptied.len()
        }
    };
    crate::engine::failpoint::hit("reset.before_commit");
    tx.commit().await?;
    crate::engine::failpoint::hit("reset.committed");
    Ok(ResetReport {
        schema: store.schema().to_string(),
        from_version: current.map_or(0, |v| v.schema_version),
        tables_reset,
        backup,
        duration_ms: elapsed_ms(started),
    })
}

async fn drop_tables(
    conn: &mut PgConnection,
    schema: &str,
    tables: &[String],
) -> Result<(), Error> {
    if tables.is_empty() {
        return Ok(());
    }
    sqlx::query(AssertSqlSafe(format!(
        "DROP TABLE {} CASCADE",
        qualified_list(schema, tables)
    )))
    .execute(conn)
    .await?;
    Ok(())
}
