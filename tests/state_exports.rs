//! The StateExport reconciler (one-shot exports and schedules), called for real against a real
//! PostgreSQL, a real S3-compatible server (and a Google Cloud Storage emulator) and an in-memory
//! Kubernetes API: each test asserts the status, conditions, events, child objects and files that
//! result.

mod support;

use std::time::Duration;

use kube::runtime::controller::Action;
use serde_json::json;
use statekeeper::api::StateExport;
use statekeeper::controller::export_schedule::{RUN_NOW_ANNOTATION, run_now_child_name};
use support::operator::*;
use support::{TestDb, gcs, s3};

#[tokio::test]
async fn state_export_runs_once_and_keeps_its_result() {
    let db = TestDb::new().await;
    let h = store_harness(&db).await;
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
                mode: statekeeper::engine::ImportMode::Replace,
                expected_sha256: Some(sha),
                ..statekeeper::engine::ImportOptions::merge()
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
            json!({"format": "statekeeper", "environments": ["nope"], "backoffLimit": 2}),
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
    assert_eq!(reason, "InvalidDestination");
    assert!(message.contains("absolute path"), "{message}");
}

/// The same, plus S3 credentials in a Secret.
async fn s3_harness(db: &TestDb) -> Harness {
    let h = store_harness(db).await;
    let options = s3::options();
    put_secret(
        &h.kube,
        "backup-credentials",
        &[
            ("aws_access_key_id", &options["aws_access_key_id"]),
            ("aws_secret_access_key", &options["aws_secret_access_key"]),
        ],
    );
    h
}

/// The non-secret S3 settings of a destination on the test server.
fn s3_destination(url: &str) -> serde_json::Value {
    json!({
        "url": url,
        "options": {"endpoint": s3::endpoint(), "region": "us-east-1"},
        "credentialsSecretRef": {"name": "backup-credentials"}
    })
}

#[tokio::test]
async fn one_shot_export_to_s3_with_credentials_from_a_secret() {
    let db = TestDb::new().await;
    let h = s3_harness(&db).await;
    let bucket = s3::bucket().await;
    let mut object = state_export("adhoc", "unused", json!({}));
    object["spec"]["destination"] = s3_destination(&format!("s3://{bucket}/manual/"));
    h.kube.put(&export_path("adhoc"), object.clone());

    let (_, export) = h.reconcile_export("adhoc").await;
    let status = export.status.clone().unwrap();
    assert_eq!(status.phase.as_deref(), Some("Succeeded"), "{status:?}");
    // A folder URL gets the export's name.
    let url = format!("s3://{bucket}/manual/adhoc.json.zst");
    assert_eq!(status.url.as_deref(), Some(url.as_str()));
    assert_eq!(s3::keys(&bucket).await, vec!["manual/adhoc.json.zst"]);
    let (size, _) = s3::object_parts(&bucket, "manual/adhoc.json.zst").await;
    assert_eq!(status.bytes, Some(size));
    // Secrets are stored base64-encoded: the plain key anywhere would be a leak.
    assert!(!h.kube.dump().contains(s3::SECRET_ACCESS_KEY));
    for event in h.kube.events(NS) {
        assert!(!event.to_string().contains(s3::SECRET_ACCESS_KEY));
    }

    // A second one-shot export to the same file refuses to overwrite it.
    let mut again = object.clone();
    again["metadata"]["name"] = json!("adhoc-again");
    again["spec"]["destination"]["url"] = json!(url);
    h.kube.put(&export_path("adhoc-again"), again);
    let (_, export) = h.reconcile_export("adhoc-again").await;
    assert_eq!(
        export.status.as_ref().unwrap().phase.as_deref(),
        Some("Failed")
    );
    assert_eq!(export_condition(&export, "Ready").1, "DestinationExists");
    let (size_after, _) = s3::object_parts(&bucket, "manual/adhoc.json.zst").await;
    assert_eq!(size_after, size, "the first backup is untouched");
}

#[tokio::test]
async fn credentials_problems_are_reported_without_secrets() {
    let h = Harness::new();
    // The credentials Secret does not exist yet: Pending, retried.
    let mut object = state_export("waiting", "unused", json!({}));
    object["spec"]["destination"] = s3_destination("s3://bucket/x.json");
    h.kube.put(&export_path("waiting"), object);
    let (action, export) = h.reconcile_export("waiting").await;
    assert_eq!(
        export.status.as_ref().unwrap().phase.as_deref(),
        Some("Pending")
    );
    let (ready, reason, message) = export_condition(&export, "Ready");
    assert_eq!(
        (ready.as_str(), reason.as_str()),
        ("False", "SecretNotFound")
    );
    assert!(message.contains("backup-credentials"), "{message}");
    assert_ne!(action, Action::await_change());

    // A typo in an option can never work: Failed at once, naming the option.
    put_secret(
        &h.kube,
        "backup-credentials",
        &[("aws_secret_access_key", s3::SECRET_ACCESS_KEY)],
    );
    let mut object = state_export("typo", "unused", json!({}));
    object["spec"]["destination"] = s3_destination("s3://bucket/x.json");
    object["spec"]["destination"]["options"]["endpont"] = json!("http://x");
    h.kube.put(&export_path("typo"), object);
    let (_, export) = h.reconcile_export("typo").await;
    assert_eq!(
        export.status.as_ref().unwrap().phase.as_deref(),
        Some("Failed")
    );
    let (_, reason, message) = export_condition(&export, "Ready");
    assert_eq!(reason, "InvalidDestination");
    assert!(message.contains("\"endpont\""), "{message}");
    assert!(!h.kube.dump().contains(s3::SECRET_ACCESS_KEY));
}

fn schedule_object(bucket: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut object = state_export(
        "nightly",
        "unused",
        json!({"schedule": "0 3 * * *", "timeZone": "Europe/Berlin"}),
    );
    object["spec"]["destination"] = s3_destination(&format!("s3://{bucket}/nightly"));
    object["metadata"]["creationTimestamp"] = json!("2026-11-20T12:00:00Z");
    support_merge(&mut object, &extra);
    object
}

fn children(h: &Harness) -> Vec<StateExport> {
    let mut list: Vec<StateExport> = h
        .kube
        .list(&format!(
            "/apis/statekeeper.dev/v1alpha1/namespaces/{NS}/stateexports"
        ))
        .into_iter()
        .map(|v| serde_json::from_value(v).unwrap())
        .filter(|e: &StateExport| e.spec.schedule.is_none())
        .collect();
    list.sort_by_key(|c| c.metadata.name.clone());
    list
}

fn child_names(h: &Harness) -> Vec<String> {
    children(h)
        .iter()
        .map(|c| c.metadata.name.clone().unwrap())
        .collect()
}

/// Lets every unfinished child run (the one-shot reconciler, for real).
async fn run_children(h: &Harness) {
    for child in children(h) {
        let name = child.metadata.name.clone().unwrap();
        let finished = matches!(
            child.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        );
        if !finished {
            h.reconcile_export(&name).await;
        }
    }
}

#[tokio::test]
async fn a_schedule_creates_named_owned_children_in_its_time_zone_and_never_overlaps() {
    let db = TestDb::new().await;
    let h = s3_harness(&db).await;
    let bucket = s3::bucket().await;
    h.kube
        .put(&export_path("nightly"), schedule_object(&bucket, json!({})));

    // Before 03:00 Berlin (02:00 UTC): nothing due; the next run is announced.
    at(&h.ctx, "2026-11-21T01:59:00Z");
    let (action, parent) = h.reconcile_export("nightly").await;
    let status = parent.status.clone().unwrap();
    assert_eq!(status.phase.as_deref(), Some("Scheduled"));
    assert_eq!(
        status.next_schedule_time.as_deref(),
        Some("2026-11-21T02:00:00Z")
    );
    assert_eq!(action, Action::requeue(Duration::from_secs(60)));
    assert!(child_names(&h).is_empty());

    // Due: one child, named after the occurrence in UTC, labelled and owned by the schedule.
    at(&h.ctx, "2026-11-21T02:00:05Z");
    let (_, parent) = h.reconcile_export("nightly").await;
    assert_eq!(child_names(&h), vec!["nightly-20261121020000"]);
    let child = &children(&h)[0];
    assert_eq!(
        child.metadata.labels.as_ref().unwrap()["statekeeper.dev/schedule"],
        "nightly"
    );
    let owner = &child.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str(), owner.controller),
        ("StateExport", "nightly", Some(true))
    );
    assert_eq!(
        child.spec.destination.url,
        format!("s3://{bucket}/nightly/nightly-20261121020000.json.zst")
    );
    assert!(child.spec.schedule.is_none());
    let status = parent.status.clone().unwrap();
    assert_eq!(status.phase.as_deref(), Some("Active"));
    assert_eq!(
        status.active_export.as_deref(),
        Some("nightly-20261121020000")
    );
    assert_eq!(
        status.last_schedule_time.as_deref(),
        Some("2026-11-21T02:00:00Z")
    );
    assert!(
        h.event_reasons()
            .contains(&("Normal".into(), "ExportCreated".into()))
    );

    // A retried reconcile at the same moment creates nothing new.
    h.reconcile_export("nightly").await;
    assert_eq!(child_names(&h).len(), 1);

    // The next night comes while that export still runs: no second run at once.
    at(&h.ctx, "2026-11-22T02:00:10Z");
    let (_, parent) = h.reconcile_export("nightly").await;
    assert_eq!(child_names(&h).len(), 1, "never two runs at once");
    assert_eq!(
        parent.status.unwrap().last_schedule_time.as_deref(),
        Some("2026-11-21T02:00:00Z")
    );

    // The child finishes (the one-shot reconciler runs it); the waiting run starts.
    run_children(&h).await;
    assert_eq!(
        s3::keys(&bucket).await,
        vec!["nightly/nightly-20261121020000.json.zst"]
    );
    at(&h.ctx, "2026-11-22T02:00:20Z");
    let (_, parent) = h.reconcile_export("nightly").await;
    assert_eq!(
        child_names(&h),
        vec!["nightly-20261121020000", "nightly-20261122020000"]
    );
    let status = parent.status.clone().unwrap();
    assert_eq!(
        status.last_successful_export.as_deref(),
        Some("nightly-20261121020000")
    );
    assert!(status.sha256.is_some() && status.bytes.is_some());
    run_children(&h).await;
    let (_, parent) = h.reconcile_export("nightly").await;
    let status = parent.status.unwrap();
    assert_eq!(
        status.last_successful_export.as_deref(),
        Some("nightly-20261122020000")
    );
    assert_eq!(status.phase.as_deref(), Some("Scheduled"));
    assert_eq!(
        status.next_schedule_time.as_deref(),
        Some("2026-11-23T02:00:00Z")
    );
    let parent: StateExport =
        serde_json::from_value(h.kube.get(&export_path("nightly")).unwrap()).unwrap();
    assert_eq!(export_condition(&parent, "Ready").0, "True");

    // Metrics for alerting: the schedule's last success, and bytes written.
    let metrics = h.ctx.metrics.render();
    let last_run: k8s_openapi::jiff::Timestamp = "2026-11-22T02:00:20Z".parse().unwrap();
    assert!(
        metrics.contains(&format!(
            r#"statekeeper_export_last_success_timestamp_seconds{{namespace="data",name="nightly"}} {}"#,
            last_run.as_second()
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            r#"statekeeper_export_attempts_total{kind="StateExport",outcome="Succeeded"} 2"#
        ),
        "{metrics}"
    );

    // Settled: another reconcile writes nothing (no status loop on a real cluster).
    let before = h
        .kube
        .requests()
        .iter()
        .filter(|(m, _)| m == "PATCH")
        .count();
    h.reconcile_export("nightly").await;
    let after = h
        .kube
        .requests()
        .iter()
        .filter(|(m, _)| m == "PATCH")
        .count();
    assert_eq!(before, after);
}

#[tokio::test]
async fn downtime_catches_up_once_and_deadlines_and_suspend_are_honoured() {
    let db = TestDb::new().await;
    let h = s3_harness(&db).await;
    let bucket = s3::bucket().await;
    h.kube
        .put(&export_path("nightly"), schedule_object(&bucket, json!({})));

    // The operator was down for three nights: exactly one catch-up run, for the latest one.
    at(&h.ctx, "2026-11-24T09:00:00Z");
    h.reconcile_export("nightly").await;
    assert_eq!(child_names(&h), vec!["nightly-20261124020000"]);
    run_children(&h).await;
    h.reconcile_export("nightly").await;
    assert_eq!(child_names(&h).len(), 1);

    // With a starting deadline, a run found too late is skipped with a Warning.
    h.kube.put(
        &export_path("nightly"),
        schedule_object(&bucket, json!({"spec": {"startingDeadlineSeconds": 300}})),
    );
    at(&h.ctx, "2026-11-25T03:00:00Z");
    let (_, parent) = h.reconcile_export("nightly").await;
    assert_eq!(child_names(&h).len(), 1, "a missed run is not started");
    assert!(
        h.event_reasons()
            .contains(&("Warning".into(), "MissedSchedule".into()))
    );
    assert_eq!(
        parent.status.unwrap().last_schedule_time.as_deref(),
        Some("2026-11-25T02:00:00Z")
    );

    // Suspended: nothing runs and no next run is announced.
    h.kube.put(
        &export_path("nightly"),
        schedule_object(&bucket, json!({"spec": {"suspend": true}})),
    );
    at(&h.ctx, "2026-11-26T02:00:30Z");
    let (_, parent) = h.reconcile_export("nightly").await;
    assert_eq!(child_names(&h).len(), 1);
    let status = parent.status.unwrap();
    assert_eq!(status.phase.as_deref(), Some("Suspended"));
    assert_eq!(status.next_schedule_time, None);

    // Run-now works even while suspended, once per annotation value.
    let mut object = schedule_object(&bucket, json!({"spec": {"suspend": true}}));
    object["metadata"]["annotations"] = json!({ RUN_NOW_ANNOTATION: "first" });
    h.kube.put(&export_path("nightly"), object.clone());
    at(&h.ctx, "2026-11-26T10:15:42Z");
    let (_, parent) = h.reconcile_export("nightly").await;
    let requested = run_now_child_name("nightly", "first");
    assert!(
        child_names(&h).contains(&requested),
        "{:?}",
        child_names(&h)
    );
    assert_eq!(
        parent.status.unwrap().last_run_now.as_deref(),
        Some("first")
    );
    run_children(&h).await;
    at(&h.ctx, "2026-11-26T10:20:00Z");
    h.reconcile_export("nightly").await;
    assert_eq!(child_names(&h).len(), 2, "the same request runs once");
    // A reconcile that saw a stale status wrote the old `lastRunNow` back: the request is still
    // answered (its child carries the token), so it does not run again.
    h.patch(
        &export_path("nightly"),
        json!({"status": {"lastRunNow": null}}),
    );
    let (_, parent) = h.reconcile_export("nightly").await;
    assert_eq!(
        child_names(&h).len(),
        2,
        "a regressed status makes no second child"
    );
    assert_eq!(
        parent.status.unwrap().last_run_now.as_deref(),
        Some("first")
    );
    object["metadata"]["annotations"] = json!({ RUN_NOW_ANNOTATION: "second" });
    h.kube.put(&export_path("nightly"), object);
    h.reconcile_export("nightly").await;
    assert_eq!(child_names(&h).len(), 3, "a new request runs again");
}

#[tokio::test]
async fn immediate_runs_at_creation_and_retention_prunes_children_and_files() {
    let db = TestDb::new().await;
    let h = s3_harness(&db).await;
    let bucket = s3::bucket().await;
    h.kube.put(
        &export_path("nightly"),
        schedule_object(
            &bucket,
            json!({"spec": {"immediate": true, "retention": {"keepLast": 2, "keepFailed": 1}}}),
        ),
    );
    at(&h.ctx, "2026-11-20T12:00:03Z");
    h.reconcile_export("nightly").await;
    assert_eq!(
        child_names(&h),
        vec!["nightly-20261120120000"],
        "first run at creation"
    );
    run_children(&h).await;

    // Four more nights.
    for day in 21..=24 {
        at(&h.ctx, &format!("2026-11-{day}T02:00:01Z"));
        h.reconcile_export("nightly").await;
        run_children(&h).await;
    }
    at(&h.ctx, "2026-11-24T02:05:00Z");
    let (_, parent) = h.reconcile_export("nightly").await;
    assert_eq!(
        child_names(&h),
        vec!["nightly-20261123020000", "nightly-20261124020000"],
        "the two newest succeeded exports are kept"
    );
    assert_eq!(
        s3::keys(&bucket).await,
        vec![
            "nightly/nightly-20261123020000.json.zst",
            "nightly/nightly-20261124020000.json.zst"
        ],
        "pruned exports took their files with them"
    );
    assert!(
        h.event_reasons()
            .contains(&("Normal".into(), "ExportPruned".into()))
    );
    assert_eq!(
        parent.status.unwrap().last_successful_export.as_deref(),
        Some("nightly-20261124020000")
    );

    // A failing run is reported on the schedule with its reason and kept for inspection.
    h.kube.put(
        &export_path("nightly"),
        schedule_object(
            &bucket,
            json!({"spec": {"format": "statekeeper", "environments": ["nope"], "backoffLimit": 1, "retention": {"keepLast": 2, "keepFailed": 1}}}),
        ),
    );
    at(&h.ctx, "2026-11-25T02:00:01Z");
    h.reconcile_export("nightly").await;
    run_children(&h).await;
    let (_, parent) = h.reconcile_export("nightly").await;
    let (ready, reason, message) = export_condition(&parent, "Ready");
    assert_eq!((ready.as_str(), reason.as_str()), ("False", "ExportFailed"));
    assert!(
        message.contains("nightly-20261125020000") && message.contains("nope"),
        "{message}"
    );
    assert_eq!(child_names(&h).len(), 3);
    assert!(h.ctx.metrics.render().contains(
        r#"statekeeper_export_attempts_total{kind="StateExport",outcome="UnknownEnvironments"} 1"#
    ));
}

#[tokio::test]
async fn an_invalid_schedule_is_stalled_with_its_reason() {
    let h = Harness::new();
    let mut object = state_export(
        "broken",
        "s3://bucket/folder",
        json!({"schedule": "every night"}),
    );
    object["metadata"]["creationTimestamp"] = json!("2026-11-20T12:00:00Z");
    h.kube.put(&export_path("broken"), object);
    let (action, export) = h.reconcile_export("broken").await;
    assert_eq!(action, Action::await_change());
    let (_, reason, message) = export_condition(&export, "Stalled");
    assert_eq!(reason, "InvalidSchedule");
    assert!(message.contains("5 fields"), "{message}");
    assert!(child_names(&h).is_empty());
}

#[tokio::test]
async fn an_attempt_interrupted_by_an_operator_restart_is_retried_or_counted() {
    let db = TestDb::new().await;
    let h = store_harness(&db).await;
    let dir = temp_dir("restart");
    // The operator died mid-export: status says Running, attempt 1, and a file may exist.
    let file = dir.join("x.json.zst");
    std::fs::write(&file, b"left by the interrupted attempt").unwrap();
    let interrupted =
        json!({"phase": "Running", "attempts": 1, "startedAt": "2026-11-22T10:00:00Z"});
    let mut object = state_export(
        "retry",
        &format!("file://{}", file.display()),
        json!({"backoffLimit": 2}),
    );
    object["status"] = interrupted.clone();
    h.kube.put(&export_path("retry"), object);
    at(&h.ctx, "2026-11-22T10:05:00Z");
    let (_, export) = h.reconcile_export("retry").await;
    let status = export.status.unwrap();
    assert_eq!(
        (status.phase.as_deref(), status.attempts),
        (Some("Succeeded"), 2),
        "the retry may replace its own earlier output"
    );
    assert_eq!(
        std::fs::metadata(&file).unwrap().len(),
        status.bytes.unwrap()
    );

    // With no attempts left, the interrupted attempt counts: Failed, not a silent extra run.
    let mut object = state_export(
        "spent",
        &format!("file://{}/y.json", dir.display()),
        json!({"backoffLimit": 1}),
    );
    object["status"] = interrupted;
    h.kube.put(&export_path("spent"), object);
    let (_, export) = h.reconcile_export("spent").await;
    assert_eq!(
        export.status.as_ref().unwrap().phase.as_deref(),
        Some("Failed")
    );
    assert_eq!(export_condition(&export, "Ready").1, "BackoffLimitExceeded");
    assert!(!dir.join("y.json").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Retention keeps the newest runs, whatever their names: a run-now child
/// (`<parent>-now-<hash>`) sorts after every timestamped child by name, and ordering by name
/// deleted the newest backups right after they succeeded while the oldest survived.
#[tokio::test]
async fn retention_keeps_the_newest_runs_when_scheduled_and_run_now_children_mix() {
    let db = TestDb::new().await;
    let h = s3_harness(&db).await;
    let bucket = s3::bucket().await;
    h.kube.put(
        &export_path("nightly"),
        schedule_object(
            &bucket,
            json!({"spec": {"retention": {"keepLast": 1, "keepFailed": 0}}}),
        ),
    );
    // (time, run-now token, the child that run makes)
    let runs = [
        (
            "2026-11-21T02:00:01Z",
            None,
            "nightly-20261121020000".to_owned(),
        ),
        (
            "2026-11-21T10:00:00Z",
            Some("a"),
            run_now_child_name("nightly", "a"),
        ),
        (
            "2026-11-22T02:00:01Z",
            Some("a"),
            "nightly-20261122020000".to_owned(),
        ),
        (
            "2026-11-22T10:00:00Z",
            Some("b"),
            run_now_child_name("nightly", "b"),
        ),
        (
            "2026-11-23T02:00:01Z",
            Some("b"),
            "nightly-20261123020000".to_owned(),
        ),
    ];
    let mut pruned = Vec::new();
    for (time, token, newest) in &runs {
        if let Some(token) = token {
            h.patch(
                &export_path("nightly"),
                json!({"metadata": {"annotations": { RUN_NOW_ANNOTATION: token }}}),
            );
        }
        at(&h.ctx, time);
        h.reconcile_export("nightly").await;
        run_children(&h).await;
        let (_, parent) = h.reconcile_export("nightly").await;
        assert_eq!(
            child_names(&h),
            vec![newest.clone()],
            "after the run at {time} only its own child is kept"
        );
        let status = parent.status.unwrap();
        assert_eq!(
            status.last_successful_export.as_deref(),
            Some(newest.as_str())
        );
        assert_eq!(
            s3::keys(&bucket).await,
            vec![format!("nightly/{newest}.json.zst")],
            "the kept child's file is the one left"
        );
        pruned.push(newest.clone());
    }
    // Each pruned child has an Event of its own that names it (not one series of the first).
    let notes: Vec<String> = h
        .kube
        .events(NS)
        .iter()
        .filter(|e| e["reason"] == "ExportPruned")
        .map(|e| e["note"].as_str().unwrap_or_default().to_owned())
        .collect();
    pruned.pop();
    assert_eq!(notes.len(), pruned.len(), "{notes:?}");
    for name in &pruned {
        assert!(
            notes.iter().any(|n| n.contains(&format!("\"{name}\""))),
            "no ExportPruned Event names {name}: {notes:?}"
        );
    }
}

#[tokio::test]
async fn a_schedule_to_gcs_writes_and_prunes_its_files_with_a_key_from_a_secret() {
    let db = TestDb::new().await;
    let h = store_harness(&db).await;
    put_secret(
        &h.kube,
        "gcs-credentials",
        &[("google_service_account_key", &gcs::service_account_key())],
    );
    let bucket = gcs::bucket().await;
    let mut object = schedule_object(
        &bucket,
        json!({"spec": {"immediate": true, "retention": {"keepLast": 1, "keepFailed": 0}}}),
    );
    object["spec"]["destination"] = json!({
        "url": format!("gs://{bucket}/nightly"),
        "options": {"google_base_url": gcs::endpoint()},
        "credentialsSecretRef": {"name": "gcs-credentials"}
    });
    h.kube.put(&export_path("nightly"), object);
    at(&h.ctx, "2026-11-20T12:00:03Z");
    h.reconcile_export("nightly").await;
    run_children(&h).await;
    for day in 21..=22 {
        at(&h.ctx, &format!("2026-11-{day}T02:00:01Z"));
        h.reconcile_export("nightly").await;
        run_children(&h).await;
    }
    at(&h.ctx, "2026-11-22T02:05:00Z");
    let (_, parent) = h.reconcile_export("nightly").await;
    assert_eq!(child_names(&h), vec!["nightly-20261122020000"]);
    assert_eq!(
        gcs::keys(&bucket).await,
        vec!["nightly/nightly-20261122020000.json.zst"],
        "pruned exports took their objects with them"
    );
    let status = parent.status.unwrap();
    let (size, _) = gcs::object_parts(&bucket, "nightly/nightly-20261122020000.json.zst").await;
    assert_eq!(status.bytes, Some(size));
    assert!(gcs::pending_uploads(&bucket).await.is_empty());
    assert!(!h.kube.dump().contains(gcs::PRIVATE_KEY));
    for event in h.kube.events(NS) {
        assert!(!event.to_string().contains(gcs::PRIVATE_KEY));
    }
}
