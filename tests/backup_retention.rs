//! `StateStore.spec.backups`, through the real StateStore reconciler against a real PostgreSQL
//! and an in-memory Kubernetes API: what is pruned and kept (never a backup of a StateMigration
//! that has not finished), and the status, condition and events that say so.

mod support;

use serde_json::{Value, json};
use sqlx::AssertSqlSafe;
use statekeeper::api::StateStore;
use statekeeper::engine::Store;
use support::operator::*;
use support::{TestDb, hold_store_lock};

const SCHEMA: &str = "sqlmesh_state";

async fn backdate(db: &TestDb, id: &str, hours: i64) {
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE \"{SCHEMA}__backup_{id}\"._statekeeper_backup \
         SET created_at = now() - make_interval(hours => {hours})"
    )))
    .execute(&mut db.conn().await)
    .await
    .unwrap();
}

/// A backup `hours` old, made for `operation` when one is named.
async fn backup(db: &TestDb, engine: &Store, operation: Option<&str>, hours: i64) -> String {
    let engine = match operation {
        Some(id) => engine.clone().with_operation_id(id),
        None => engine.clone(),
    };
    let reason = if operation.is_some() {
        "pre-migration"
    } else {
        "manual"
    };
    let id = engine.backup_with_reason(reason).await.unwrap().id;
    backdate(db, &id, hours).await;
    id
}

async fn remaining(engine: &Store) -> Vec<String> {
    engine
        .backups()
        .await
        .unwrap()
        .into_iter()
        .map(|b| b.id)
        .collect()
}

/// A StateMigration of the store in `phase` (none: not reconciled yet).
fn migration(h: &Harness, name: &str, spec: Value, phase: Option<&str>) {
    let mut object = state_migration(name, "2026-12-01T00:00:00Z", spec);
    if let Some(phase) = phase {
        object["status"] = json!({"phase": phase});
    }
    h.kube.put(&migration_path(name), object);
}

fn set_phase(h: &Harness, name: &str, phase: &str) {
    h.patch(&migration_path(name), json!({"status": {"phase": phase}}));
}

fn pruned_events(h: &Harness) -> Vec<String> {
    h.kube
        .events(NS)
        .iter()
        .filter(|e| e["reason"] == "BackupsPruned")
        .map(|e| e["note"].as_str().unwrap_or_default().to_owned())
        .collect()
}

fn summary(store: &StateStore) -> statekeeper::api::state_store::BackupSummary {
    store
        .status
        .as_ref()
        .unwrap()
        .backup_summary
        .clone()
        .unwrap()
}

#[tokio::test]
async fn spec_backups_prunes_and_never_touches_an_unfinished_migrations_backup() {
    let db = TestDb::new().await;
    let engine = db.store(SCHEMA).await;
    engine.init(None).await.unwrap();
    let h = Harness::new();
    put_secret(&h.kube, "pg-credentials", &[("password", &db.password())]);

    // A runner upgrade whose Job still runs: if the Job fails, its backup is restored.
    migration(
        &h,
        "upgrade-running",
        json!({"upgrade": {"runner": {"image": "tobikodata/sqlmesh:0.200"}}}),
        Some("Running"),
    );
    let running = backup(&db, &engine, Some("uid-upgrade-running"), 100).await;
    // A migration that finished long ago: its backup is like any other.
    migration(
        &h,
        "old-import",
        json!({"import": {"source": {"url": "file:///x.json"}}}),
        Some("Succeeded"),
    );
    let finished = backup(&db, &engine, Some("uid-old-import"), 90).await;
    let b50 = backup(&db, &engine, None, 50).await;
    let b40 = backup(&db, &engine, None, 40).await;
    let b30 = backup(&db, &engine, None, 30).await;
    let b20 = backup(&db, &engine, None, 20).await;
    let b10 = backup(&db, &engine, None, 10).await;
    // A rollback not run yet names b50: it stays until the rollback has run.
    migration(
        &h,
        "rollback-pending",
        json!({"rollback": {"backupId": b50}}),
        None,
    );

    let object = store_for(
        &db,
        "analytics",
        json!({"backups": {"keepLast": 1, "maxAge": "35h"}}),
    );
    let (_, store) = h.reconcile(&object).await;
    // Kept: the newest (10h), the young (20h, 30h), the running upgrade's, the one the rollback
    // names. Dropped: 40h and the finished import's.
    let mut expected = vec![
        running.clone(),
        b50.clone(),
        b30.clone(),
        b20.clone(),
        b10.clone(),
    ];
    expected.sort();
    assert_eq!(remaining(&engine).await, expected);
    let (status, reason, message) =
        condition(&store.status.as_ref().unwrap().conditions, "BackupsPruned");
    assert_eq!((status.as_str(), reason.as_str()), ("True", "WithinPolicy"));
    assert!(message.contains("the newest 1"), "{message}");
    let s = summary(&store);
    assert_eq!(s.count, 5);
    assert_eq!(s.pruned, vec![b40.clone(), finished.clone()]);
    assert!(s.pruned_bytes.unwrap() > 0);
    assert!(s.bytes > 0);
    assert!(s.last_pruned_at.is_some());
    let listed = store.status.as_ref().unwrap().backups.clone().unwrap();
    assert_eq!(listed.len(), 5);
    assert!(listed.iter().all(|b| b.bytes > 0));
    let events = pruned_events(&h);
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(events[0].starts_with("dropped 2 backups"), "{events:?}");
    assert!(events[0].contains(&b40) && events[0].contains(&finished));

    // Nothing more to drop: no event, the last prune stays recorded.
    let (_, store) = h.reconcile(&object).await;
    assert_eq!(pruned_events(&h).len(), 1);
    assert_eq!(summary(&store).pruned, vec![b40.clone(), finished.clone()]);

    // The Job failed and its backup was restored; the rollback ran: both backups may go now.
    set_phase(&h, "upgrade-running", "Failed");
    set_phase(&h, "rollback-pending", "Succeeded");
    let (_, store) = h.reconcile(&object).await;
    assert_eq!(remaining(&engine).await, vec![b30, b20, b10]);
    let mut pruned = summary(&store).pruned;
    pruned.sort();
    let mut expected = vec![running, b50];
    expected.sort();
    assert_eq!(pruned, expected);
    assert_eq!(summary(&store).count, 3);
    assert_eq!(pruned_events(&h).len(), 2);
}

/// A rollback without a backupId restores the newest backup: while it has not run, the newest
/// backup is kept even with keepLast 0.
#[tokio::test]
async fn an_unfinished_rollback_keeps_the_newest_backup() {
    let db = TestDb::new().await;
    let engine = db.store(SCHEMA).await;
    engine.init(None).await.unwrap();
    let h = Harness::new();
    put_secret(&h.kube, "pg-credentials", &[("password", &db.password())]);
    let old = backup(&db, &engine, None, 5).await;
    let newest = backup(&db, &engine, None, 1).await;
    migration(
        &h,
        "rollback",
        json!({"rollback": {}}),
        Some("AwaitingApproval"),
    );
    let object = store_for(&db, "analytics", json!({"backups": {"keepLast": 0}}));
    h.reconcile(&object).await;
    assert_eq!(remaining(&engine).await, vec![newest.clone()]);
    assert_ne!(old, newest);
}

#[tokio::test]
async fn a_busy_store_or_a_bad_policy_is_reported_and_nothing_is_dropped() {
    let db = TestDb::new().await;
    let engine = db.store(SCHEMA).await;
    engine.init(None).await.unwrap();
    let h = Harness::new();
    put_secret(&h.kube, "pg-credentials", &[("password", &db.password())]);
    let old = backup(&db, &engine, None, 48).await;
    let young = backup(&db, &engine, None, 1).await;

    // maxAge the schema would refuse (the in-memory API does not validate): said, not guessed.
    let bad = store_for(
        &db,
        "analytics",
        json!({"backups": {"maxAge": "2 fortnights"}}),
    );
    let (_, store) = h.reconcile(&bad).await;
    let (status, reason, message) =
        condition(&store.status.as_ref().unwrap().conditions, "BackupsPruned");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "InvalidBackupsSpec")
    );
    assert!(message.contains("maxAge"), "{message}");
    assert_eq!(
        condition(&store.status.as_ref().unwrap().conditions, "Ready").0,
        "True"
    );
    assert_eq!(remaining(&engine).await, vec![old.clone(), young.clone()]);

    // Another operation holds the store's lock longer than the lock timeout: StoreBusy.
    let object = store_for(&db, "analytics", json!({"backups": {"maxAge": "1d"}}));
    let mut holder = hold_store_lock(&db, SCHEMA).await;
    let (_, store) = h.reconcile(&object).await;
    let (status, reason, message) =
        condition(&store.status.as_ref().unwrap().conditions, "BackupsPruned");
    assert_eq!((status.as_str(), reason.as_str()), ("False", "StoreBusy"));
    assert!(message.contains("nothing was dropped"), "{message}");
    assert!(
        h.event_reasons()
            .contains(&("Warning".into(), "StoreBusy".into()))
    );
    assert_eq!(remaining(&engine).await, vec![old.clone(), young.clone()]);
    sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();

    // Once the lock is free, the next reconcile prunes.
    let (_, store) = h.reconcile(&object).await;
    assert_eq!(remaining(&engine).await, vec![young]);
    let (status, reason, _) =
        condition(&store.status.as_ref().unwrap().conditions, "BackupsPruned");
    assert_eq!((status.as_str(), reason.as_str()), ("True", "WithinPolicy"));
    assert_eq!(summary(&store).pruned, vec![old]);
    assert!(!h.kube.dump().contains(&db.password()));
}
