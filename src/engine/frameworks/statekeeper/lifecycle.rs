//! Creating and upgrading statekeeper's own schema with the embedded migration chain, each change
//! one transaction under the store's lock (an upgrade backed up first).

use std::time::Instant;

use sqlx::{AssertSqlSafe, PgConnection};

use super::{create_ledger, ensure_schema, record_event, run_step_sql, verified_version};
use crate::engine::framework::Event;
use crate::engine::reports::{AppliedStep, InitReport, UpgradeReport};
use crate::engine::store::{self, Store, TableLock};
use crate::engine::{Error, guards};

/// Creates the schema and applies every step (or up to `target`) on a store that has none. On an
/// initialised store it only verifies the ledger: moving forward is `upgrade`, which backs up.
pub(crate) async fn init(store: &Store, target: Option<i32>) -> Result<InitReport, Error> {
    let started = Instant::now();
    let target = store.upgrade_target(target)?;
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
    let target = store.upgrade_target(target)?;
    // Writers wait; readers go on and see the store as it was until the upgrade commits. The
    // steps' own DDL takes stronger locks where it needs them.
    let mut tx = store.begin_locked().await?;
    store.lock_tables(&mut tx, TableLock::WritersWait).await?;
    let version = store.require_initialized(&mut tx).await?;
    let current = version.schema_version;
    guards::refuse_downgrade(target, current)?;
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
