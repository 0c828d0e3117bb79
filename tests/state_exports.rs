//! The StateExport reconciler (one-shot exports and schedules), called for real against a real
//! PostgreSQL, a real S3-compatible server and an in-memory Kubernetes API: each test asserts the
//! status, conditions, events, child objects and files that result.

mod support;

use std::time::Duration;

use kube::runtime::controller::Action;
use serde_json::json;
use support::TestDb;
use support::operator::*;

#[tokio::test]
async fn state_export_runs_once_and_keeps_its_result() {
    let db = TestDb::new().await;
    generated_store(&db).await;
    let h = Harness::new();
    put_secret(&h.kube, "pg-credentials", &[("password", &db.password())]);
    h.kube.put(
        &store_path("analytics"),
        store_for(&db, "analytics", json!({})),
    );
    let dir = temp_dir("once");
    let file = dir.join("backup.json.zst");
    h.kube.put(
        &export_path("nightly"),
        state_export("nightly", &format!("file://{}", file.display()), json!({})),
    );

    let (action, export) = h.reconcile_export("nightly").await;
    assert_eq!(action, Action::await_change());
    let status = export.status.clone().unwrap();
    assert_eq!(status.phase.as_deref(), Some("Succeeded"));
    let bytes = std::fs::read(&file).expect("the export file exists");
    assert_eq!(status.bytes, Some(bytes.len() as u64));
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&bytes))
    };
    assert_eq!(status.sha256.as_deref(), Some(sha.as_str()));
    assert_eq!(status.rows.as_ref().unwrap()["model_versions"], 1_500);
    assert_eq!(status.schema_version, Some(3));
    assert_eq!(status.attempts, 1);
    assert!(status.started_at.is_some() && status.finished_at.is_some());
    assert_eq!(export_condition(&export, "Ready").1, "ExportSucceeded");
    assert!(
        h.event_reasons()
            .contains(&("Normal".into(), "ExportSucceeded".into()))
    );
    assert!(!dir.join("backup.json.partial").exists());

    // The file imports, checked against the recorded checksum.
    let target = TestDb::new().await;
    let store = target.store("sqlmesh_state").await;
    store.init(None).await.unwrap();
    store
        .import(
            std::io::Cursor::new(bytes),
            &statekeeper::engine::ImportOptions {
                mode: Default::default(),
                expected_sha256: Some(sha),
            },
        )
        .await
        .unwrap();

    // Finished exports never run again.
    std::fs::remove_file(&file).unwrap();
    let writes = h.kube.requests().len();
    let (action, _) = h.reconcile_export("nightly").await;
    assert_eq!(action, Action::await_change());
    assert!(!file.exists(), "a finished export is not re-run");
    assert_eq!(h.kube.requests().len(), writes, "and makes no API calls");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn state_export_waits_for_its_store_and_gives_up_after_its_backoff_limit() {
    let db = TestDb::new().await;
    generated_store(&db).await;
    let h = Harness::new();
    put_secret(&h.kube, "pg-credentials", &[("password", &db.password())]);
    let dir = temp_dir("retry");
    let url = format!("file://{}/x.json", dir.display());
    h.kube.put(
        &export_path("partial"),
        state_export(
            "partial",
            &url,
            json!({"environments": ["nope"], "backoffLimit": 2}),
        ),
    );
    at(&h.ctx, "2026-11-22T10:00:00Z");

    // No StateStore yet: pending, with the reason, and no attempt counted.
    let (_, export) = h.reconcile_export("partial").await;
    assert_eq!(
        export.status.as_ref().unwrap().phase.as_deref(),
        Some("Pending")
    );
    let (ready, reason, message) = export_condition(&export, "Ready");
    assert_eq!(
        (ready.as_str(), reason.as_str()),
        ("False", "StoreNotFound")
    );
    assert!(message.contains("\"analytics\""), "{message}");
    assert_eq!(export_condition(&export, "Reconciling").0, "True");
    assert_eq!(export.status.as_ref().unwrap().attempts, 0);

    // With the store, the export fails (unknown environment): attempt 1 of 2, retried later.
    h.kube.put(
        &store_path("analytics"),
        store_for(&db, "analytics", json!({})),
    );
    let (action, export) = h.reconcile_export("partial").await;
    let status = export.status.clone().unwrap();
    assert_eq!(
        (status.phase.as_deref(), status.attempts),
        (Some("Pending"), 1)
    );
    let (_, reason, message) = export_condition(&export, "Ready");
    assert_eq!(reason, "UnknownEnvironments");
    assert!(
        message.contains("attempt 1 of 2") && message.contains("nope"),
        "{message}"
    );
    assert_eq!(action, Action::requeue(Duration::from_secs(10)));
    assert!(
        h.event_reasons()
            .contains(&("Warning".into(), "UnknownEnvironments".into()))
    );

    // Woken early (its own status write is a watch event): it waits out the backoff.
    at(&h.ctx, "2026-11-22T10:00:04Z");
    let (action, export) = h.reconcile_export("partial").await;
    assert_eq!(export.status.unwrap().attempts, 1);
    assert_eq!(action, Action::requeue(Duration::from_secs(6)));

    // After the backoff: the last attempt fails, and the export is Failed for good.
    at(&h.ctx, "2026-11-22T10:00:11Z");
    let (action, export) = h.reconcile_export("partial").await;
    let status = export.status.clone().unwrap();
    assert_eq!(
        (status.phase.as_deref(), status.attempts),
        (Some("Failed"), 2)
    );
    assert_eq!(export_condition(&export, "Stalled").0, "True");
    assert_eq!(action, Action::await_change());
    at(&h.ctx, "2026-11-22T11:00:00Z");
    let (_, export) = h.reconcile_export("partial").await;
    assert_eq!(
        export.status.unwrap().attempts,
        2,
        "no attempt after Failed"
    );
    assert!(
        std::fs::read_dir(&dir).unwrap().next().is_none(),
        "failed attempts leave no files"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn state_export_with_an_unusable_destination_fails_at_once() {
    let h = Harness::new();
    h.kube.put(
        &export_path("bad"),
        state_export("bad", "file://relative/../path.json", json!({})),
    );
    let (action, export) = h.reconcile_export("bad").await;
    assert_eq!(action, Action::await_change());
    assert_eq!(
        export.status.as_ref().unwrap().phase.as_deref(),
        Some("Failed")
    );
    let (_, reason, message) = export_condition(&export, "Ready");
    assert_eq!(reason, "UnsupportedDestination");
    assert!(message.contains("absolute path"), "{message}");
}
