//! `StateExport.spec.verify`: the StateExport reconciler, called for real against a real
//! PostgreSQL and an in-memory Kubernetes API, verifies each export after writing it. Each test
//! asserts the status, conditions and events that result.

mod support;

use kube::runtime::controller::Action;
use serde_json::json;
use support::operator::*;
use support::{TestDb, schemas};

/// An export written to `url` and not verified yet: the status a verifying export has when the
/// operator stopped between writing and verifying it (made by an export without `verify`, whose
/// status the verifying object then carries; its spec is immutable, so it never changes).
async fn written_unverified(
    h: &Harness,
    url: &str,
    spec: serde_json::Value,
) -> statekeeper::api::StateExport {
    h.kube.put(
        &export_path("unverified"),
        state_export("unverified", url, spec),
    );
    let (_, export) = h.reconcile_export("unverified").await;
    assert_eq!(export_condition(&export, "Ready").1, "ExportSucceeded");
    export
}

#[tokio::test]
async fn a_verified_export_is_ready_only_once_restored_in_scratch() {
    let db = TestDb::new().await;
    let h = store_harness(&db).await;
    let dir = temp_dir("verified");
    let file = dir.join("backup.json.zst");
    h.kube.put(
        &export_path("nightly"),
        state_export(
            "nightly",
            &format!("file://{}", file.display()),
            json!({"verify": true}),
        ),
    );
    let mut conn = db.conn().await;
    let before = schemas(&mut conn).await;

    let (action, export) = h.reconcile_export("nightly").await;
    assert_eq!(action, Action::await_change());
    let status = export.status.clone().unwrap();
    assert_eq!(status.phase.as_deref(), Some("Succeeded"));
    assert!(status.verified_at.is_some(), "{status:?}");
    let (verified, reason, message) = export_condition(&export, "Verified");
    assert_eq!(
        (verified.as_str(), reason.as_str()),
        ("True", "ExportVerified")
    );
    assert!(
        message.contains("every table matched the manifest"),
        "{message}"
    );
    assert_eq!(export_condition(&export, "Ready").1, "ExportVerified");
    let events = h.event_reasons();
    assert!(
        events.contains(&("Normal".into(), "ExportVerified".into())),
        "{events:?}"
    );
    assert_eq!(
        schemas(&mut conn).await,
        before,
        "a scratch schema was left"
    );

    // Verified once: never again.
    let writes = h.kube.requests().len();
    assert_eq!(
        h.reconcile_export("nightly").await.0,
        Action::await_change()
    );
    assert_eq!(h.kube.requests().len(), writes);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_file_changed_after_it_was_written_fails_verification_naming_the_table() {
    let db = TestDb::new().await;
    let h = store_harness(&db).await;
    let dir = temp_dir("tampered");
    let file = dir.join("backup.json");
    let url = format!("file://{}", file.display());
    let export = written_unverified(&h, &url, json!({"compression": "none"})).await;

    // One value of table model_versions changed before the verification ran (the operator
    // stopped between the two).
    let mut bytes = std::fs::read(&file).unwrap();
    let text = String::from_utf8(bytes.clone()).unwrap();
    let table = text.find("\"model_versions\":{").unwrap();
    let row = table + text[table..].find("\"rows\":[[").unwrap() + "\"rows\":[[".len();
    let value = row + text[row..].find(",\"").unwrap() + 2;
    bytes[value] = if bytes[value] == b'a' { b'b' } else { b'a' };
    std::fs::write(&file, &bytes).unwrap();
    let mut object = state_export(
        "nightly",
        &url,
        json!({"compression": "none", "verify": true}),
    );
    object["status"] = serde_json::to_value(export.status.clone().unwrap()).unwrap();
    h.kube.put(&export_path("nightly"), object);

    let (action, export) = h.reconcile_export("nightly").await;
    assert_eq!(action, Action::await_change());
    let status = export.status.clone().unwrap();
    assert_eq!(status.phase.as_deref(), Some("Failed"));
    assert!(status.verified_at.is_none());
    let (verified, reason, message) = export_condition(&export, "Verified");
    assert_eq!(
        (verified.as_str(), reason.as_str()),
        ("False", "VerificationFailed")
    );
    assert!(
        message.contains("table \"model_versions\" is not what was exported"),
        "{message}"
    );
    assert_eq!(export_condition(&export, "Stalled").0, "True");
    assert!(
        h.event_reasons()
            .contains(&("Warning".into(), "VerificationFailed".into()))
    );
    // Failed for good: not verified again.
    assert_eq!(
        h.reconcile_export("nightly").await.0,
        Action::await_change()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_verification_that_cannot_run_is_retried_without_exporting_again() {
    let db = TestDb::new().await;
    let h = store_harness(&db).await;
    let dir = temp_dir("retried");
    let file = dir.join("backup.json.zst");
    let url = format!("file://{}", file.display());
    let export = written_unverified(&h, &url, json!({})).await;
    let written = std::fs::metadata(&file).unwrap().modified().unwrap();

    // The verification comes due while the store's password Secret is gone.
    h.kube
        .remove(&format!("/api/v1/namespaces/{NS}/secrets/pg-credentials"));
    let mut object = state_export("nightly", &url, json!({"verify": true}));
    object["status"] = serde_json::to_value(export.status.clone().unwrap()).unwrap();
    h.kube.put(&export_path("nightly"), object);
    let (action, export) = h.reconcile_export("nightly").await;
    assert_ne!(action, Action::await_change());
    let status = export.status.clone().unwrap();
    assert_eq!(status.phase.as_deref(), Some("Succeeded"));
    let (verified, _, message) = export_condition(&export, "Verified");
    assert_eq!(verified, "False");
    assert!(
        message.contains("could not be verified yet, retrying"),
        "{message}"
    );
    assert!(!message.contains(&db.password()), "{message}");

    // The Secret is back: verified, from the same file.
    put_secret(&h.kube, "pg-credentials", &[("password", &db.password())]);
    let (action, export) = h.reconcile_export("nightly").await;
    assert_eq!(action, Action::await_change());
    assert_eq!(export_condition(&export, "Verified").0, "True");
    assert_eq!(
        std::fs::metadata(&file).unwrap().modified().unwrap(),
        written
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_schedule_verifies_every_export_it_runs() {
    let spec: statekeeper::api::StateExportSpec = serde_json::from_value(json!({
        "storeRef": {"name": "analytics"},
        "destination": {"url": "s3://bucket/nightly/"},
        "schedule": "@daily",
        "verify": true
    }))
    .unwrap();
    assert!(spec.child("s3://bucket/nightly/x.json".into()).verify);
}

/// A schedule that encrypts and verifies: its immediate run writes age ciphertext, is verified
/// with the identity from its Secret, and is Ready; the secret key is in no object or Event.
#[tokio::test]
async fn a_scheduled_encrypted_export_is_verified_with_the_identity_from_its_secret() {
    let db = TestDb::new().await;
    let h = store_harness(&db).await;
    let dir = temp_dir("verified-encrypted");
    let identity = age::x25519::Identity::generate();
    let secret_key = age::secrecy::ExposeSecret::expose_secret(&identity.to_string()).to_owned();
    put_secret(&h.kube, "backup-identity", &[("identity", &secret_key)]);
    let mut schedule = state_export(
        "nightly",
        &format!("file://{}/", dir.display()),
        json!({
            "schedule": "0 3 * * *",
            "immediate": true,
            "verify": true,
            "encryption": {
                "recipients": [identity.to_public().to_string()],
                "identitySecretRef": {"name": "backup-identity"}
            }
        }),
    );
    schedule["metadata"]["creationTimestamp"] = json!("2026-11-20T12:00:00Z");
    h.kube.put(&export_path("nightly"), schedule);
    at(&h.ctx, "2026-11-20T12:00:03Z");
    h.reconcile_export("nightly").await;
    let children: Vec<statekeeper::api::StateExport> = h
        .kube
        .list(&format!(
            "/apis/statekeeper.dev/v1alpha1/namespaces/{NS}/stateexports"
        ))
        .into_iter()
        .map(|v| serde_json::from_value(v).unwrap())
        .filter(|e: &statekeeper::api::StateExport| e.spec.schedule.is_none())
        .collect();
    assert_eq!(children.len(), 1, "the immediate run");
    let name = children[0].metadata.name.clone().unwrap();
    assert!(children[0].spec.verify && children[0].spec.encryption.is_some());

    let (action, child) = h.reconcile_export(&name).await;
    assert_eq!(action, Action::await_change());
    let status = child.status.clone().unwrap();
    assert!(status.verified_at.is_some(), "{status:?}");
    assert_eq!(export_condition(&child, "Verified").0, "True");
    assert_eq!(export_condition(&child, "Ready").1, "ExportVerified");
    let url = status.url.clone().unwrap();
    assert!(url.ends_with(".json.zst.age"), "{url}");
    let stored = std::fs::read(url.trim_start_matches("file://")).unwrap();
    assert!(stored.starts_with(b"age-encryption.org/v1"));
    let stored_objects: Vec<serde_json::Value> = h.kube.list(&format!(
        "/apis/statekeeper.dev/v1alpha1/namespaces/{NS}/stateexports"
    ));
    assert!(
        !serde_json::to_string(&stored_objects)
            .unwrap()
            .contains(secret_key.as_str()),
        "the secret key leaked into a StateExport"
    );
    let events = serde_json::to_string(&h.kube.events(NS)).unwrap();
    assert!(!events.contains(secret_key.as_str()));
    std::fs::remove_dir_all(&dir).unwrap();
}
