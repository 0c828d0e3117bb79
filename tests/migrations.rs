//! The StateMigration reconciler, called for real against a real PostgreSQL and an in-memory
//! Kubernetes API: every operation, dry runs, approvals (pending, approved, stale), reset
//! refusals, corrupt imports, imports from a StateExport, copies between stores, the queue, and
//! operator restarts mid-operation. Each test asserts status, conditions, events and the rows.

mod support;

use kube::runtime::controller::Action;
use serde_json::json;
use sqlx::AssertSqlSafe;
use statekeeper::engine::{Operation, Plan};
use support::operator::*;
use support::{TestDb, populate_v1, snapshot};

const SCHEMA: &str = "sqlmesh_state";

/// A store at schema version 1 with rows, registered as StateStore `analytics`.
async fn v1_harness(db: &TestDb, store_spec: serde_json::Value) -> Harness {
    let engine = db.store(SCHEMA).await;
    engine.init(Some(1)).await.unwrap();
    populate_v1(&mut db.conn().await, SCHEMA).await;
    harness_for(db, store_spec)
}

/// A store at the latest version with generated state, registered as StateStore `analytics`.
async fn latest_harness(db: &TestDb, store_spec: serde_json::Value) -> Harness {
    generated_store(db).await;
    harness_for(db, store_spec)
}

fn harness_for(db: &TestDb, store_spec: serde_json::Value) -> Harness {
    let h = Harness::new();
    put_secret(&h.kube, "pg-credentials", &[("password", &db.password())]);
    h.kube.put(
        &store_path("analytics"),
        store_for(db, "analytics", store_spec),
    );
    h
}

async fn rows(db: &TestDb) -> std::collections::BTreeMap<String, Vec<String>> {
    snapshot(&mut db.conn().await, SCHEMA).await
}

async fn plan_of(db: &TestDb, operation: Operation<'_>) -> Plan {
    db.store(SCHEMA).await.plan(operation, true).await.unwrap()
}

fn phase(m: &statekeeper::api::StateMigration) -> String {
    m.status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_default()
}

#[tokio::test]
async fn upgrade_runs_once_with_a_backup_and_a_history_event() {
    let db = TestDb::new().await;
    let h = v1_harness(&db, json!({})).await;
    h.kube.put(
        &migration_path("upgrade"),
        state_migration(
            "upgrade",
            "2026-11-27T10:00:00Z",
            json!({"upgrade": {"targetVersion": "latest"}}),
        ),
    );
    let expected = plan_of(&db, Operation::Upgrade { target: None }).await;

    let (action, m) = h.reconcile_migration("upgrade").await;
    assert_eq!(action, Action::await_change());
    let status = m.status.clone().unwrap();
    assert_eq!(phase(&m), "Succeeded", "{:?}", status.message);
    assert_eq!(status.operation.as_deref(), Some("upgrade"));
    assert_eq!(status.plan_hash.as_deref(), Some(expected.hash.as_str()));
    let plan = status.plan.clone().unwrap();
    assert_eq!((plan.from_version, plan.to_version), (1, Some(3)));
    assert!(
        plan.steps
            .iter()
            .any(|s| s.starts_with("apply migration 2"))
    );
    assert!(plan.backup.is_some());
    assert_eq!((status.from_version, status.to_version), (Some(1), Some(3)));
    let backup_id = status.backup_id.clone().expect("a backup id");
    let backups = db.store(SCHEMA).await.backups().await.unwrap();
    let backup = backups.iter().find(|b| b.id == backup_id).unwrap();
    assert_eq!(backup.schema_version, 1);
    assert_eq!(backup.operation.as_deref(), Some("uid-upgrade"));
    assert!(status.started_at.is_some() && status.finished_at.is_some());
    assert!(status.duration_ms.is_some());
    assert_eq!(migration_condition(&m, "Ready").0, "True");
    assert_eq!(migration_condition(&m, "Succeeded").0, "True");
    assert_eq!(migration_condition(&m, "Planned").0, "True");
    assert_eq!(migration_condition(&m, "Approved").1, "NotRequired");
    assert_eq!(migration_condition(&m, "Stalled").0, "False");
    assert!(
        h.event_reasons()
            .contains(&("Normal".into(), "Succeeded".into())),
        "{:?}",
        h.event_reasons()
    );
    let actor: String = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT actor FROM {SCHEMA}.state_migration_events WHERE operation = 'upgrade'"
    )))
    .fetch_one(&mut db.conn().await)
    .await
    .unwrap();
    assert_eq!(actor, "statemigration:data/upgrade");

    // Finished: never again, and no API calls.
    let before = rows(&db).await;
    let requests = h.kube.requests().len();
    let (action, _) = h.reconcile_migration("upgrade").await;
    assert_eq!(action, Action::await_change());
    assert_eq!(h.kube.requests().len(), requests);
    assert_eq!(rows(&db).await, before);
}

#[tokio::test]
async fn dry_run_records_the_plan_the_cli_computes_and_changes_nothing() {
    let db = TestDb::new().await;
    let h = v1_harness(&db, json!({})).await;
    h.kube.put(
        &migration_path("plan-only"),
        state_migration(
            "plan-only",
            "2026-11-27T10:00:00Z",
            json!({"upgrade": {"targetVersion": 2}, "dryRun": true}),
        ),
    );
    let before = rows(&db).await;
    let (action, m) = h.reconcile_migration("plan-only").await;
    assert_eq!(action, Action::await_change());
    assert_eq!(phase(&m), "Planned");
    assert_eq!(migration_condition(&m, "Ready").1, "Planned");
    assert_eq!(rows(&db).await, before, "a dry run changes nothing");
    let expected = plan_of(&db, Operation::Upgrade { target: Some(2) }).await;
    let status = m.status.unwrap();
    assert_eq!(status.plan_hash.as_deref(), Some(expected.hash.as_str()));
    assert_eq!(status.plan.unwrap().to_version, Some(2));
    assert!(status.backup_id.is_none());

    // The CLI prints the same hash for the same request.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_statekeeper"))
        .args([
            "state",
            "plan",
            "--schema",
            SCHEMA,
            "-o",
            "json",
            "upgrade",
            "--target-version",
            "2",
        ])
        .env("STATEKEEPER_DATABASE_URL", &db.url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed["hash"], expected.hash);
}

#[tokio::test]
async fn approval_pending_then_stale_after_a_change_then_approved_runs() {
    let db = TestDb::new().await;
    let h = latest_harness(&db, json!({"requireApproval": true})).await;
    let engine = db.store(SCHEMA).await;
    let backup = engine.backup().await.unwrap();
    let at_backup = support::current_state(&mut db.conn().await, SCHEMA).await;
    // The store moves on after the backup.
    sqlx::query(AssertSqlSafe(format!(
        "DELETE FROM {SCHEMA}.virtual_environment_refs WHERE ctid IN (SELECT ctid FROM {SCHEMA}.virtual_environment_refs LIMIT 50)"
    )))
    .execute(&mut db.conn().await)
    .await
    .unwrap();
    h.kube.put(
        &migration_path("restore"),
        state_migration(
            "restore",
            "2026-11-27T10:00:00Z",
            json!({"rollback": {"backupId": backup.id}}),
        ),
    );

    let (action, m) = h.reconcile_migration("restore").await;
    assert!(matches!(action, a if a != Action::await_change()));
    assert_eq!(phase(&m), "AwaitingApproval");
    let (ready, reason, message) = migration_condition(&m, "Ready");
    assert_eq!(
        (ready.as_str(), reason.as_str()),
        ("False", "ApprovalPending")
    );
    assert!(
        message.contains("StateStore requires approval"),
        "{message}"
    );
    assert_eq!(migration_condition(&m, "Reconciling").0, "True");
    let first_hash = m.status.unwrap().plan_hash.unwrap();
    assert!(message.contains(&first_hash));

    // Approved, but the store changed after that plan: the approval does not apply.
    h.patch(
        &migration_path("restore"),
        json!({"spec": {"approval": {"planHash": first_hash}}}),
    );
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE {SCHEMA}.virtual_environments SET expires_at = now() + interval '1 day' WHERE name <> 'prod'"
    )))
    .execute(&mut db.conn().await)
    .await
    .unwrap();
    let before = rows(&db).await;
    let (_, m) = h.reconcile_migration("restore").await;
    assert_eq!(phase(&m), "AwaitingApproval");
    let (approved, reason, message) = migration_condition(&m, "Approved");
    assert_eq!(
        (approved.as_str(), reason.as_str()),
        ("False", "StaleApproval")
    );
    let second_hash = m.status.clone().unwrap().plan_hash.unwrap();
    assert_ne!(first_hash, second_hash);
    assert!(
        message.contains(&first_hash) && message.contains(&second_hash),
        "{message}"
    );
    assert_eq!(rows(&db).await, before, "nothing ran");

    // Approving the current plan runs it.
    h.patch(
        &migration_path("restore"),
        json!({"spec": {"approval": {"planHash": second_hash}}}),
    );
    let (action, m) = h.reconcile_migration("restore").await;
    assert_eq!(action, Action::await_change());
    assert_eq!(phase(&m), "Succeeded", "{:?}", m.status);
    assert_eq!(migration_condition(&m, "Approved").1, "Approved");
    assert_eq!(
        support::current_state(&mut db.conn().await, SCHEMA).await,
        at_backup
    );
    assert!(
        m.status.unwrap().backup_id.is_some(),
        "the replaced state was kept"
    );
}

#[tokio::test]
async fn reset_needs_the_store_flag_and_an_approval() {
    let db = TestDb::new().await;
    let h = latest_harness(&db, json!({})).await;
    h.kube.put(
        &migration_path("reset-refused"),
        state_migration(
            "reset-refused",
            "2026-11-27T10:00:00Z",
            json!({"reset": {}}),
        ),
    );
    let before = rows(&db).await;
    let (action, m) = h.reconcile_migration("reset-refused").await;
    assert_eq!(action, Action::await_change());
    assert_eq!(phase(&m), "Failed");
    let (_, reason, message) = migration_condition(&m, "Ready");
    assert_eq!(reason, "ResetRefused");
    assert!(message.contains("allowReset"), "{message}");
    assert_eq!(migration_condition(&m, "Stalled").0, "True");
    assert_eq!(rows(&db).await, before);

    // The store allows it: now the object's approval is missing. The refused object stays
    // refused (a failed StateMigration never runs again); the request is a new one.
    h.patch(
        &store_path("analytics"),
        json!({"spec": {"allowReset": true}}),
    );
    let (_, still) = h.reconcile_migration("reset-refused").await;
    assert_eq!(
        phase(&still),
        "Failed",
        "a failed StateMigration never runs again"
    );
    assert_eq!(migration_condition(&still, "Ready").1, "ResetRefused");
    h.kube.put(
        &migration_path("reset"),
        state_migration("reset", "2026-11-27T11:00:00Z", json!({"reset": {}})),
    );
    let (_, m) = h.reconcile_migration("reset").await;
    assert_eq!(phase(&m), "AwaitingApproval");
    assert!(
        migration_condition(&m, "Ready")
            .2
            .contains("a reset always needs an approval")
    );
    assert_eq!(rows(&db).await, before);
    let hash = m.status.unwrap().plan_hash.unwrap();
    h.patch(
        &migration_path("reset"),
        json!({"spec": {"approval": {"planHash": hash}}}),
    );
    let (_, m) = h.reconcile_migration("reset").await;
    assert_eq!(phase(&m), "Succeeded", "{:?}", m.status);
    let backup_id = m.status.unwrap().backup_id.unwrap();
    assert!(rows(&db).await.is_empty(), "the tables are gone");
    let mut conn = db.conn().await;
    let kept = snapshot(&mut conn, &format!("{SCHEMA}__backup_{backup_id}")).await;
    for (table, rows) in &before {
        assert_eq!(kept.get(table), Some(rows), "backup keeps {table}");
    }
}

#[tokio::test]
async fn import_of_a_corrupt_file_fails_and_leaves_the_store_unchanged() {
    let db = TestDb::new().await;
    let h = latest_harness(&db, json!({})).await;
    let dir = temp_dir("corrupt-import");
    let file = dir.join("broken.json");
    std::fs::write(
        &file,
        br#"{"metadata": {"file_version": 1, "importable": true}, "versions": {"#,
    )
    .unwrap();
    h.kube.put(
        &migration_path("import-broken"),
        state_migration(
            "import-broken",
            "2026-11-27T10:00:00Z",
            json!({"import": {"source": {"url": format!("file://{}", file.display())}}}),
        ),
    );
    let before = rows(&db).await;
    let schemas_before = support::schemas(&mut db.conn().await).await;
    let (action, m) = h.reconcile_migration("import-broken").await;
    assert_eq!(action, Action::await_change());
    assert_eq!(phase(&m), "Failed", "{:?}", m.status);
    let (_, reason, message) = migration_condition(&m, "Ready");
    assert_eq!(reason, "InvalidExport");
    assert!(message.contains("the store is unchanged"), "{message}");
    assert_eq!(rows(&db).await, before);
    assert_eq!(support::schemas(&mut db.conn().await).await, schemas_before);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn import_from_a_state_export_restores_its_file() {
    let db = TestDb::new().await;
    let h = latest_harness(&db, json!({})).await;
    let dir = temp_dir("from-export");
    h.kube.put(
        &export_path("nightly"),
        state_export("nightly", &format!("file://{}/", dir.display()), json!({})),
    );
    let (_, export) = h.reconcile_export("nightly").await;
    assert_eq!(
        export.status.as_ref().unwrap().phase.as_deref(),
        Some("Succeeded")
    );
    let exported = snapshot(&mut db.conn().await, SCHEMA).await;
    // The store changes after the export.
    sqlx::query(AssertSqlSafe(format!(
        "DELETE FROM {SCHEMA}.virtual_environment_refs"
    )))
    .execute(&mut db.conn().await)
    .await
    .unwrap();
    // Without `mode: Replace`, an import merges, and an exact export (a whole store) cannot
    // merge: refused, naming the field, with nothing changed.
    h.kube.put(
        &migration_path("restore-without-mode"),
        state_migration(
            "restore-without-mode",
            "2026-11-27T09:00:00Z",
            json!({"import": {"fromExport": {"name": "nightly"}}}),
        ),
    );
    let changed = snapshot(&mut db.conn().await, SCHEMA).await;
    let (_, m) = h.reconcile_migration("restore-without-mode").await;
    assert_eq!(phase(&m), "Failed", "{:?}", m.status);
    let (_, reason, message) = migration_condition(&m, "Ready");
    assert_eq!(reason, "InvalidExport");
    assert!(message.contains("import.mode: Replace"), "{message}");
    assert_eq!(snapshot(&mut db.conn().await, SCHEMA).await, changed);
    h.kube.put(
        &migration_path("restore-nightly"),
        state_migration(
            "restore-nightly",
            "2026-11-27T10:00:00Z",
            json!({"import": {"fromExport": {"name": "nightly"}, "mode": "Replace"}}),
        ),
    );
    let (_, m) = h.reconcile_migration("restore-nightly").await;
    assert_eq!(phase(&m), "Succeeded", "{:?}", m.status);
    let status = m.status.unwrap();
    assert!(
        status
            .message
            .as_deref()
            .is_some_and(|m| m.contains("replaced the store's state")),
        "{:?}",
        status.message
    );
    let sha = export.status.unwrap().sha256.unwrap();
    assert!(status.plan.unwrap().source.unwrap().contains(&sha));
    assert!(status.backup_id.is_some());
    // The exact format restores every table; the import adds its own history event.
    let mut now = snapshot(&mut db.conn().await, SCHEMA).await;
    let mut then = exported;
    now.remove("state_migration_events");
    then.remove("state_migration_events");
    assert_eq!(now, then);

    // A pinned checksum that differs from the export's is refused before anything is read.
    h.kube.put(
        &migration_path("restore-wrong-sha"),
        state_migration(
            "restore-wrong-sha",
            "2026-11-27T11:00:00Z",
            json!({"import": {"fromExport": {"name": "nightly"}, "expectedSha256": "0".repeat(64)}}),
        ),
    );
    let (_, m) = h.reconcile_migration("restore-wrong-sha").await;
    assert_eq!(phase(&m), "Failed");
    assert_eq!(migration_condition(&m, "Ready").1, "ChecksumMismatch");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn copy_from_makes_the_store_equal_to_the_other() {
    let db = TestDb::new().await;
    let h = v1_harness(&db, json!({})).await;
    db.store(SCHEMA).await.upgrade(None).await.unwrap();
    let source_db = TestDb::new().await;
    generated_store(&source_db).await;
    put_secret(
        &h.kube,
        "pg-credentials-staging",
        &[("password", &source_db.password())],
    );
    let mut staging = store_for(&source_db, "staging", json!({}));
    staging["spec"]["connection"]["passwordSecretRef"]["name"] = json!("pg-credentials-staging");
    h.kube.put(&store_path("staging"), staging);
    h.kube.put(
        &migration_path("copy"),
        state_migration(
            "copy",
            "2026-11-27T10:00:00Z",
            json!({"copyFrom": {"storeRef": {"name": "staging"}}}),
        ),
    );
    let (_, m) = h.reconcile_migration("copy").await;
    assert_eq!(phase(&m), "Succeeded", "{:?}", m.status);
    let status = m.status.unwrap();
    assert!(
        status
            .plan
            .unwrap()
            .source
            .unwrap()
            .starts_with("StateStore staging")
    );
    assert!(status.backup_id.is_some());
    let mut target = snapshot(&mut db.conn().await, SCHEMA).await;
    let mut source = snapshot(&mut source_db.conn().await, SCHEMA).await;
    target.remove("state_migration_events");
    source.remove("state_migration_events");
    assert_eq!(target, source, "every row of every table equal");
    assert!(!target["model_versions"].is_empty());
}

#[tokio::test]
async fn queued_behind_earlier_migrations_a_running_export_and_a_janitor_job() {
    let db = TestDb::new().await;
    let h = v1_harness(&db, json!({})).await;
    // An earlier migration that waits for its approval holds the later one.
    h.kube.put(
        &migration_path("first"),
        state_migration(
            "first",
            "2026-11-27T09:00:00Z",
            json!({"upgrade": {"targetVersion": 2}, "requireApproval": true}),
        ),
    );
    h.kube.put(
        &migration_path("second"),
        state_migration("second", "2026-11-27T10:00:00Z", json!({"upgrade": {}})),
    );
    let (_, first) = h.reconcile_migration("first").await;
    assert_eq!(phase(&first), "AwaitingApproval");
    let before = rows(&db).await;
    let (action, m) = h.reconcile_migration("second").await;
    assert!(action != Action::await_change());
    assert_eq!(phase(&m), "Queued");
    let queue = m.status.clone().unwrap().queue.unwrap();
    assert_eq!(queue.position, 1);
    assert_eq!(queue.waiting_for, "StateMigration first (AwaitingApproval)");
    assert_eq!(migration_condition(&m, "Ready").1, "Queued");
    assert_eq!(rows(&db).await, before);

    // The first one goes away; a running export of the store holds the second.
    h.kube.remove(&migration_path("first"));
    let mut export = state_export("nightly", "file:///tmp/never/", json!({}));
    export["status"] = json!({"phase": "Running"});
    h.kube.put(&export_path("nightly"), export);
    let (_, m) = h.reconcile_migration("second").await;
    assert_eq!(phase(&m), "Queued");
    assert_eq!(
        m.status.clone().unwrap().queue.unwrap().waiting_for,
        "StateExport nightly (Running)"
    );

    // The export finished; the store's janitor Job runs.
    h.patch(
        &export_path("nightly"),
        json!({"status": {"phase": "Succeeded"}}),
    );
    h.patch(
        &store_path("analytics"),
        json!({"status": {"janitor": {"activeJob": "analytics-janitor-202611271000"}}}),
    );
    let (_, m) = h.reconcile_migration("second").await;
    assert_eq!(phase(&m), "Queued");
    assert!(
        m.status
            .clone()
            .unwrap()
            .queue
            .unwrap()
            .waiting_for
            .contains("analytics-janitor-202611271000")
    );
    assert_eq!(rows(&db).await, before);

    // Nothing ahead: it runs.
    h.patch(
        &store_path("analytics"),
        json!({"status": {"janitor": {"activeJob": null}}}),
    );
    let (_, m) = h.reconcile_migration("second").await;
    assert_eq!(phase(&m), "Succeeded", "{:?}", m.status);
    assert!(m.status.unwrap().queue.is_none());
}

#[tokio::test]
async fn a_busy_store_sends_the_migration_back_to_the_queue() {
    let db = TestDb::new().await;
    let h = v1_harness(&db, json!({})).await;
    h.kube.put(
        &migration_path("upgrade"),
        state_migration("upgrade", "2026-11-27T10:00:00Z", json!({"upgrade": {}})),
    );
    // Another operation (a janitor run, a CLI upgrade) holds the store's lock.
    let holder = support::hold_store_lock(&db, SCHEMA).await;
    let before = rows(&db).await;
    let (_, m) = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        h.reconcile_migration("upgrade"),
    )
    .await
    .expect("gives up after the lock timeout");
    assert_eq!(phase(&m), "Queued", "{:?}", m.status);
    assert_eq!(migration_condition(&m, "Ready").1, "StoreBusy");
    assert_eq!(rows(&db).await, before);
    drop(holder);
    let (_, m) = h.reconcile_migration("upgrade").await;
    assert_eq!(phase(&m), "Succeeded", "{:?}", m.status);
}

#[tokio::test]
async fn a_restart_after_the_commit_finishes_without_running_again() {
    let db = TestDb::new().await;
    let h = v1_harness(&db, json!({})).await;
    let mut object = state_migration("upgrade", "2026-11-27T10:00:00Z", json!({"upgrade": {}}));
    // The operator marked it Running, committed the upgrade, and died before writing status.
    object["status"] =
        json!({"phase": "Running", "operation": "upgrade", "startedAt": "2026-11-27T10:00:01Z"});
    h.kube.put(&migration_path("upgrade"), object);
    let engine = db.store(SCHEMA).await.with_operation_id("uid-upgrade");
    let report = engine.upgrade(None).await.unwrap();
    let after_upgrade = rows(&db).await;

    let (_, m) = h.reconcile_migration("upgrade").await;
    assert_eq!(phase(&m), "Succeeded", "{:?}", m.status);
    let status = m.status.unwrap();
    assert!(
        status
            .message
            .unwrap()
            .contains("before the operator restarted")
    );
    assert_eq!(status.backup_id, report.backup.map(|b| b.id));
    assert_eq!(rows(&db).await, after_upgrade, "not applied twice");

    // Died before the commit: no tagged backup, the store as it was — it runs, once.
    let db2 = TestDb::new().await;
    let h2 = v1_harness(&db2, json!({})).await;
    let mut object = state_migration("upgrade", "2026-11-27T10:00:00Z", json!({"upgrade": {}}));
    object["status"] = json!({"phase": "Running", "operation": "upgrade"});
    h2.kube.put(&migration_path("upgrade"), object);
    let (_, m) = h2.reconcile_migration("upgrade").await;
    assert_eq!(phase(&m), "Succeeded", "{:?}", m.status);
    let upgrades: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT count(*) FROM {SCHEMA}.state_migration_events WHERE operation = 'upgrade'"
    )))
    .fetch_one(&mut db2.conn().await)
    .await
    .unwrap();
    assert_eq!(upgrades, 1);
}

#[tokio::test]
async fn invalid_requests_fail_with_the_reason() {
    let db = TestDb::new().await;
    let h = latest_harness(&db, json!({})).await;
    for (name, spec, reason, text) in [
        (
            "two-ops",
            json!({"upgrade": {}, "reset": {}}),
            "InvalidSpec",
            "exactly one operation",
        ),
        (
            "bad-target",
            json!({"upgrade": {"targetVersion": "newest"}}),
            "InvalidSpec",
            "\"latest\"",
        ),
        (
            "unknown-target",
            json!({"upgrade": {"targetVersion": 99}}),
            "UnknownTargetVersion",
            "99",
        ),
        (
            "runner-on-own-schema",
            json!({"upgrade": {"runner": {"image": "busybox"}}}),
            "InvalidOperation",
            "targetVersion",
        ),
        (
            "no-backup",
            json!({"rollback": {"backupId": "20260101000000000"}}),
            "BackupNotFound",
            "20260101000000000",
        ),
    ] {
        h.kube.put(
            &migration_path(name),
            state_migration(name, "2026-11-27T10:00:00Z", spec),
        );
        let before = rows(&db).await;
        let (_, m) = h.reconcile_migration(name).await;
        assert_eq!(phase(&m), "Failed", "{name}: {:?}", m.status);
        let (_, got, message) = migration_condition(&m, "Ready");
        assert_eq!(got, reason, "{name}: {message}");
        assert!(message.contains(text), "{name}: {message}");
        assert_eq!(rows(&db).await, before, "{name} changed nothing");
        h.kube.remove(&migration_path(name));
    }
    // A missing store is waited for, not failed.
    h.kube.put(
        &migration_path("elsewhere"),
        state_migration(
            "elsewhere",
            "2026-11-27T10:00:00Z",
            json!({"storeRef": {"name": "missing"}, "upgrade": {}}),
        ),
    );
    let (action, m) = h.reconcile_migration("elsewhere").await;
    assert!(action != Action::await_change());
    assert_eq!(phase(&m), "Pending");
    assert_eq!(migration_condition(&m, "Ready").1, "StoreNotFound");
    assert!(
        !h.kube.dump().contains(&db.password()),
        "no secret anywhere"
    );
}

/// `import.environments`: a restore in part of one environment of a file, planned with the
/// selection among its steps; the other environments keep what changed since the export.
#[tokio::test]
async fn import_restores_one_environment_of_a_file_in_part() {
    let db = TestDb::new().await;
    let h = latest_harness(&db, json!({})).await;
    let file = temp_dir("restore-part").join("before.json");
    let destination =
        statekeeper::engine::Destination::parse(&file.to_string_lossy(), &Default::default())
            .unwrap();
    let options = statekeeper::engine::ExportOptions {
        format: statekeeper::engine::ExportFormat::Statekeeper,
        ..Default::default()
    };
    db.store(SCHEMA)
        .await
        .export_to(&destination, &options, |_| {})
        .await
        .unwrap();
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE {SCHEMA}.virtual_environments SET plan_id = 'changed'"
    )))
    .execute(&mut db.conn().await)
    .await
    .unwrap();
    let url = format!("file://{}", file.display());
    // With `mode: Replace` (which the CRD's rule refuses on a real API server): refused.
    h.kube.put(
        &migration_path("restore-prod-replace"),
        state_migration(
            "restore-prod-replace",
            "2026-11-27T09:00:00Z",
            json!({"import": {"source": {"url": url}, "mode": "Replace", "environments": ["prod"]}}),
        ),
    );
    let (_, m) = h.reconcile_migration("restore-prod-replace").await;
    assert_eq!(phase(&m), "Failed", "{:?}", m.status);
    let (_, _, message) = migration_condition(&m, "Ready");
    assert!(message.contains("import.mode: Merge"), "{message}");

    h.kube.put(
        &migration_path("restore-prod"),
        state_migration(
            "restore-prod",
            "2026-11-27T10:00:00Z",
            json!({"import": {"source": {"url": url}, "environments": ["prod"]}}),
        ),
    );
    let (_, m) = h.reconcile_migration("restore-prod").await;
    assert_eq!(phase(&m), "Succeeded", "{:?}", m.status);
    let status = m.status.unwrap();
    let message = status.message.unwrap_or_default();
    assert!(message.contains("restored environments prod"), "{message}");
    let steps = status.plan.unwrap().steps;
    assert!(
        steps
            .iter()
            .any(|s| s.contains("keep only environment prod")),
        "{steps:?}"
    );
    let plans: Vec<(String, String)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT name, plan_id FROM {SCHEMA}.virtual_environments ORDER BY name"
    )))
    .fetch_all(&mut db.conn().await)
    .await
    .unwrap();
    assert!(plans.len() > 1);
    for (name, plan_id) in plans {
        assert_eq!(plan_id == "changed", name != "prod", "{name}: {plan_id}");
    }
}
