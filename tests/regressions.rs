//! What a real API server showed (issue 11's findings), each pinned by a test on the real
//! reconcilers, a real PostgreSQL and the in-memory Kubernetes API.

mod support;

use serde_json::json;
use support::operator::*;
use support::{TestDb, s3};

/// 3. A value read from a Secret never reaches status or Events, whatever its key is called.
#[tokio::test]
async fn a_secret_value_under_a_harmless_key_is_never_echoed() {
    let db = TestDb::new().await;
    generated_store(&db).await;
    let h = Harness::new();
    put_secret(&h.kube, "pg-credentials", &[("password", &db.password())]);
    h.kube.put(
        &store_path("analytics"),
        store_for(&db, "analytics", json!({})),
    );
    let marker = "marker-value-7f3a9c";
    put_secret(
        &h.kube,
        "backup-credentials",
        &[
            ("aws_access_key_id", "statekeeper-test"),
            ("aws_secret_access_key", s3::SECRET_ACCESS_KEY),
            ("aws_virtual_hosted_style_request", marker),
        ],
    );
    let mut object = state_export("leaky", "unused", json!({}));
    object["spec"]["destination"] = json!({
        "url": "s3://bucket/leaky.json",
        // Never contacted: the options are refused before anything connects.
        "options": {"endpoint": "http://127.0.0.1:9", "region": "us-east-1"},
        "credentialsSecretRef": {"name": "backup-credentials"}
    });
    h.kube.put(&export_path("leaky"), object);
    let (_, export) = h.reconcile_export("leaky").await;
    assert_eq!(
        export.status.as_ref().unwrap().phase.as_deref(),
        Some("Failed")
    );
    let (_, reason, message) = export_condition(&export, "Ready");
    assert_eq!(reason, "InvalidDestination");
    assert!(!message.contains(marker), "{message}");
    let dump = h.kube.dump();
    assert!(!dump.contains(marker), "the value reached the API: {dump}");
    assert!(!dump.contains(s3::SECRET_ACCESS_KEY));
}

/// 4. An export of a store whose tables do not exist yet waits like one for a missing store,
/// spending no attempt, and runs once the store is ready.
#[tokio::test]
async fn an_export_waits_for_an_uninitialised_store_without_spending_attempts() {
    let db = TestDb::new().await;
    let h = Harness::new();
    put_secret(&h.kube, "pg-credentials", &[("password", &db.password())]);
    h.kube.put(
        &store_path("analytics"),
        store_for(&db, "analytics", json!({"initPolicy": "Never"})),
    );
    let dir = temp_dir("not-ready");
    h.kube.put(
        &export_path("early"),
        state_export(
            "early",
            &format!("file://{}/", dir.display()),
            json!({"backoffLimit": 1}),
        ),
    );
    for _ in 0..3 {
        let (action, export) = h.reconcile_export("early").await;
        let status = export.status.clone().unwrap();
        assert_eq!(status.phase.as_deref(), Some("Pending"));
        assert_eq!(status.attempts, 0, "no attempt spent");
        let (ready, reason, message) = export_condition(&export, "Ready");
        assert_eq!(
            (ready.as_str(), reason.as_str()),
            ("False", "StoreNotReady")
        );
        assert!(message.contains("not initialized"), "{message}");
        assert_ne!(action, kube::runtime::controller::Action::await_change());
    }
    db.store("sqlmesh_state").await.init(None).await.unwrap();
    let (_, export) = h.reconcile_export("early").await;
    let status = export.status.unwrap();
    assert_eq!(
        (status.phase.as_deref(), status.attempts),
        (Some("Succeeded"), 1)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// 5. A schedule whose store is gone says so, and a child that never started does not block
/// the next run for ever.
#[tokio::test]
async fn a_schedule_without_its_store_is_not_ready_and_a_stuck_child_is_superseded() {
    let h = Harness::new();
    let dir = temp_dir("no-store");
    let mut object = state_export(
        "nightly",
        &format!("file://{}/", dir.display()),
        json!({"schedule": "0 3 * * *"}),
    );
    object["metadata"]["creationTimestamp"] = json!("2026-11-20T12:00:00Z");
    h.kube.put(&export_path("nightly"), object);
    at(&h.ctx, "2026-11-21T03:00:05Z");
    let (_, parent) = h.reconcile_export("nightly").await;
    let (ready, reason, message) = export_condition(&parent, "Ready");
    assert_eq!(
        (ready.as_str(), reason.as_str()),
        ("False", "StoreNotFound")
    );
    assert!(message.contains("\"analytics\""), "{message}");
    let first = "nightly-20261121030000";
    let (_, child) = h.reconcile_export(first).await;
    assert_eq!(export_condition(&child, "Ready").1, "StoreNotFound");

    // The next night the first child still waits: it is superseded, the new one is created.
    at(&h.ctx, "2026-11-22T03:00:05Z");
    let (_, parent) = h.reconcile_export("nightly").await;
    let stuck: statekeeper::api::StateExport =
        serde_json::from_value(h.kube.get(&export_path(first)).unwrap()).unwrap();
    assert_eq!(
        stuck.status.as_ref().unwrap().phase.as_deref(),
        Some("Failed")
    );
    let (_, reason, message) = export_condition(&stuck, "Ready");
    assert_eq!(reason, "Superseded");
    assert!(message.contains("never started"), "{message}");
    assert!(h.kube.get(&export_path("nightly-20261122030000")).is_some());
    assert_eq!(export_condition(&parent, "Ready").1, "StoreNotFound");
    // A superseded child never runs, even once the store appears.
    let (action, _) = h.reconcile_export(first).await;
    assert_eq!(action, kube::runtime::controller::Action::await_change());
    let _ = std::fs::remove_dir_all(&dir);
}

/// 7. Each export attempt announces itself (a retry after a restart included), each janitor run
/// has an Event with its own text, and the export reconcile time is measured.
#[tokio::test]
async fn every_attempt_and_run_has_its_own_event_and_reconciles_are_timed() {
    let db = TestDb::new().await;
    generated_store(&db).await;
    let h = Harness::new();
    put_secret(&h.kube, "pg-credentials", &[("password", &db.password())]);
    let mut store = store_for(
        &db,
        "analytics",
        json!({"janitor": {"schedule": "0 * * * *", "versionGracePeriod": "1s"}}),
    );
    store["metadata"]["creationTimestamp"] = json!("2026-11-20T12:00:00Z");
    h.kube.put(&store_path("analytics"), store.clone());
    let dir = temp_dir("events");
    let mut object = state_export(
        "retry",
        &format!("file://{}/", dir.display()),
        json!({"backoffLimit": 3}),
    );
    object["status"] =
        json!({"phase": "Running", "attempts": 1, "startedAt": "2026-11-22T10:00:00Z"});
    h.kube.put(&export_path("retry"), object);
    at(&h.ctx, "2026-11-22T10:05:00Z");
    let (_, export) = h.reconcile_export("retry").await;
    assert_eq!(export.status.unwrap().phase.as_deref(), Some("Succeeded"));
    let notes = |reason: &str| -> Vec<String> {
        h.kube
            .events(NS)
            .iter()
            .filter(|e| e["reason"] == reason)
            .map(|e| e["note"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    assert_eq!(notes("ExportRunning").len(), 1, "the retry is announced");
    assert!(notes("ExportRunning")[0].contains("attempt 2 of 3"));

    at(&h.ctx, "2026-11-22T11:00:05Z");
    h.reconcile(&store).await;
    // The next run finds other rows to remove.
    sqlx::query("UPDATE sqlmesh_state.virtual_environments SET expires_at = now() - interval '1 day' WHERE name <> 'prod'")
        .execute(&mut db.conn().await)
        .await
        .unwrap();
    at(&h.ctx, "2026-11-22T12:00:05Z");
    h.reconcile(&store).await;
    let runs = notes("JanitorSucceeded");
    assert_eq!(runs.len(), 2, "one Event per run: {runs:?}");
    assert_ne!(runs[0], runs[1], "each with its own text");
    assert!(runs[1].contains("2026-11-22T12:00:00Z"), "{runs:?}");

    let metrics = h.ctx.metrics.render();
    let count = metrics
        .lines()
        .find(|l| l.starts_with("statekeeper_reconcile_duration_seconds_sum{kind=\"StateExport\"}"))
        .unwrap_or_else(|| panic!("{metrics}"));
    let seconds: f64 = count.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(seconds > 0.0, "{count}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// 7. The CRDs use only the integer formats Kubernetes knows.
#[test]
fn crds_use_only_kubernetes_integer_formats() {
    let yaml = statekeeper::api::crds_yaml().unwrap();
    for format in ["uint8", "uint16", "uint32", "uint64"] {
        assert!(!yaml.contains(&format!("format: {format}")), "{format}");
    }
    assert!(yaml.contains("format: int32") && yaml.contains("format: int64"));
}

/// 2. What a killed attempt left behind — a local staging file, a multipart upload — is removed
/// by the retry, by giving up, and by retention.
#[tokio::test]
async fn a_killed_attempt_leaves_no_staging_file_or_upload_behind() {
    let db = TestDb::new().await;
    generated_store(&db).await;
    let h = Harness::new();
    put_secret(&h.kube, "pg-credentials", &[("password", &db.password())]);
    h.kube.put(
        &store_path("analytics"),
        store_for(&db, "analytics", json!({})),
    );
    let dir = temp_dir("staging");
    let interrupted =
        json!({"phase": "Running", "attempts": 1, "startedAt": "2026-11-22T10:00:00Z"});
    at(&h.ctx, "2026-11-22T10:05:00Z");

    // Local: the retry removes `<file>#<n>`, and so does giving up.
    for (name, limit, phase) in [("retried", 2, "Succeeded"), ("spent", 1, "Failed")] {
        let file = dir.join(format!("{name}.json.zst"));
        let staging = dir.join(format!("{name}.json.zst#1"));
        std::fs::write(&staging, vec![7u8; 4096]).unwrap();
        let mut object = state_export(
            name,
            &format!("file://{}", file.display()),
            json!({"backoffLimit": limit}),
        );
        object["status"] = interrupted.clone();
        h.kube.put(&export_path(name), object);
        let (_, export) = h.reconcile_export(name).await;
        assert_eq!(
            export.status.as_ref().unwrap().phase.as_deref(),
            Some(phase)
        );
        assert!(!staging.exists(), "{name}: the staging file is gone");
    }

    // S3: the upload the killed attempt recorded is aborted before the retry.
    let bucket = s3::bucket().await;
    let options = s3::options();
    put_secret(
        &h.kube,
        "backup-credentials",
        &[
            ("aws_access_key_id", &options["aws_access_key_id"]),
            ("aws_secret_access_key", &options["aws_secret_access_key"]),
        ],
    );
    let orphan = s3::start_upload(&bucket, "retry.json.zst").await;
    assert_eq!(s3::pending_uploads(&bucket).await, vec![orphan.clone()]);
    let mut object = state_export("retry", "unused", json!({"backoffLimit": 3}));
    object["spec"]["destination"] = json!({
        "url": format!("s3://{bucket}/retry.json.zst"),
        "options": {"endpoint": s3::endpoint(), "region": "us-east-1"},
        "credentialsSecretRef": {"name": "backup-credentials"}
    });
    let mut status = interrupted.clone();
    status["stagingUpload"] = json!(orphan);
    object["status"] = status;
    h.kube.put(&export_path("retry"), object);
    let (_, export) = h.reconcile_export("retry").await;
    let status = export.status.unwrap();
    assert_eq!(status.phase.as_deref(), Some("Succeeded"));
    assert_eq!(status.staging_upload, None);
    assert!(
        s3::pending_uploads(&bucket).await.is_empty(),
        "the orphan was aborted"
    );
    assert_eq!(s3::keys(&bucket).await, vec!["retry.json.zst"]);

    // Retention: a pruned child takes its leftovers with it.
    let mut schedule = state_export(
        "nightly",
        &format!("file://{}/", dir.display()),
        json!({"schedule": "0 3 * * *", "retention": {"keepLast": 1, "keepFailed": 0}}),
    );
    schedule["metadata"]["creationTimestamp"] = json!("2026-11-20T12:00:00Z");
    h.kube.put(&export_path("nightly"), schedule);
    for day in [21, 22] {
        at(&h.ctx, &format!("2026-11-{day}T03:00:05Z"));
        h.reconcile_export("nightly").await;
        let child = format!("nightly-2026112{}030000", day - 20);
        if day == 21 {
            // The first child was killed after writing its file: a staging copy is left too.
            std::fs::write(dir.join(format!("{child}.json.zst#3")), b"partial").unwrap();
        }
        h.reconcile_export(&child).await;
    }
    at(&h.ctx, "2026-11-22T03:10:00Z");
    h.reconcile_export("nightly").await;
    let left: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("nightly"))
        .collect();
    assert_eq!(left, vec!["nightly-20261122030000.json.zst"], "{left:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}
