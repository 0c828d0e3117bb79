//! Encrypted backups in the operator, called for real against a real PostgreSQL and an
//! in-memory Kubernetes API: a StateExport encrypted to its recipients (from the spec and a
//! Secret), restored by StateMigrations that read the identity from a Secret, and the Secrets
//! that are missing, incomplete or hold the wrong kind of key, reported without their values.

mod support;

use age::secrecy::ExposeSecret;
use serde_json::json;
use sha2::Digest;
use sqlx::AssertSqlSafe;
use support::operator::*;
use support::{TestDb, snapshot};

const SCHEMA: &str = "sqlmesh_state";

/// A fresh age key pair: the identity file's text and its public key.
fn key_pair() -> (String, String) {
    let identity = age::x25519::Identity::generate();
    let secret = identity.to_string().expose_secret().to_owned();
    (
        format!("# created: by the test\n{secret}\n"),
        identity.to_public().to_string(),
    )
}

fn phase(m: &statekeeper::api::StateMigration) -> String {
    m.status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_default()
}

/// Everything a status says, as one text: no key may appear in it.
fn said(status: &impl serde::Serialize) -> String {
    serde_json::to_string(status).unwrap()
}

#[tokio::test]
async fn an_encrypted_export_is_restored_with_the_identity_from_a_secret() {
    let db = TestDb::new().await;
    let h = store_harness(&db).await;
    let (ours, our_public) = key_pair();
    let (_, theirs) = key_pair();
    let (stranger, _) = key_pair();
    put_secret(
        &h.kube,
        "backup-recipients",
        &[("recipients", &format!("# the team\n{theirs}\n"))],
    );
    put_secret(&h.kube, "backup-identity", &[("identity", &ours)]);
    let dir = temp_dir("encrypted");
    h.kube.put(
        &export_path("nightly"),
        state_export(
            "nightly",
            &format!("file://{}/", dir.display()),
            json!({"encryption": {
                "recipients": [our_public],
                "recipientsSecretRef": {"name": "backup-recipients"},
                "identitySecretRef": {"name": "backup-identity"}
            }}),
        ),
    );
    let (_, export) = h.reconcile_export("nightly").await;
    let status = export.status.clone().unwrap();
    assert_eq!(status.phase.as_deref(), Some("Succeeded"), "{status:?}");
    let url = status.url.clone().unwrap();
    assert!(url.ends_with("/nightly.json.zst.age"), "{url}");
    let stored = std::fs::read(url.trim_start_matches("file://")).unwrap();
    assert!(stored.starts_with(b"age-encryption.org/v1\n"));
    assert_eq!(
        status.sha256.as_deref(),
        Some(hex::encode(sha2::Sha256::digest(&stored)).as_str())
    );
    assert_eq!(status.bytes, Some(stored.len() as u64));
    assert_eq!(status.encrypted_to, Some(2));
    assert!(
        export_condition(&export, "Ready")
            .2
            .contains("encrypted to 2 recipients")
    );
    let exported = snapshot(&mut db.conn().await, SCHEMA).await;

    // The store changes after the export.
    sqlx::query(AssertSqlSafe(format!(
        "DELETE FROM {SCHEMA}.virtual_environment_refs"
    )))
    .execute(&mut db.conn().await)
    .await
    .unwrap();
    let changed = snapshot(&mut db.conn().await, SCHEMA).await;

    // From the URL without an identity: refused with the number of recipients, nothing changed.
    h.kube.put(
        &migration_path("without-identity"),
        state_migration(
            "without-identity",
            "2026-11-27T08:00:00Z",
            json!({"import": {"source": {"url": url}, "mode": "Replace"}}),
        ),
    );
    let (_, m) = h.reconcile_migration("without-identity").await;
    assert_eq!(phase(&m), "Failed", "{:?}", m.status);
    let (_, reason, message) = migration_condition(&m, "Ready");
    assert_eq!(reason, "IdentityRequired");
    assert!(
        message.contains("the file is encrypted to 2 recipients: pass --identity"),
        "{message}"
    );

    // With someone else's identity: refused, nothing changed, no key in the status.
    put_secret(&h.kube, "stranger-identity", &[("key.txt", &stranger)]);
    h.kube.put(
        &migration_path("wrong-identity"),
        state_migration(
            "wrong-identity",
            "2026-11-27T09:00:00Z",
            json!({"import": {"source": {"url": url}, "mode": "Replace",
                   "identitySecretRef": {"name": "stranger-identity", "key": "key.txt"}}}),
        ),
    );
    let (_, m) = h.reconcile_migration("wrong-identity").await;
    assert_eq!(phase(&m), "Failed", "{:?}", m.status);
    assert_eq!(migration_condition(&m, "Ready").1, "NoMatchingIdentity");
    let text = said(&m.status);
    for key in [&ours, &stranger] {
        let secret = key.lines().last().unwrap();
        assert!(!text.contains(&secret[16..]), "{text}");
    }
    assert_eq!(snapshot(&mut db.conn().await, SCHEMA).await, changed);

    // From the export: its identitySecretRef decrypts the file.
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
    let mut now = snapshot(&mut db.conn().await, SCHEMA).await;
    let mut then = exported;
    now.remove("state_migration_events");
    then.remove("state_migration_events");
    assert_eq!(now, then);

    // An identity Secret that is not there yet: the import waits for it.
    h.kube.put(
        &migration_path("later"),
        state_migration(
            "later",
            "2026-11-27T11:00:00Z",
            json!({"import": {"source": {"url": url}, "mode": "Replace",
                   "identitySecretRef": {"name": "restore-identity"}}}),
        ),
    );
    let (_, m) = h.reconcile_migration("later").await;
    assert_eq!(phase(&m), "Pending", "{:?}", m.status);
    let (_, reason, message) = migration_condition(&m, "Ready");
    assert_eq!(reason, "SecretNotFound");
    assert!(message.contains("\"restore-identity\""), "{message}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn recipient_secrets_that_are_missing_or_hold_the_wrong_key_say_what_to_fix() {
    let db = TestDb::new().await;
    let h = store_harness(&db).await;
    let dir = temp_dir("recipients");
    h.kube.put(
        &export_path("nightly"),
        state_export(
            "nightly",
            &format!("file://{}/", dir.display()),
            json!({"encryption": {"recipientsSecretRef": {"name": "backup-recipients"}}}),
        ),
    );
    // No Secret yet: pending, no attempt spent, no file.
    let (_, export) = h.reconcile_export("nightly").await;
    let status = export.status.clone().unwrap();
    assert_eq!(status.phase.as_deref(), Some("Pending"));
    assert_eq!(status.attempts, 0);
    let (ready, reason, message) = export_condition(&export, "Ready");
    assert_eq!(
        (ready.as_str(), reason.as_str()),
        ("False", "SecretNotFound")
    );
    assert!(
        message.contains("recipients Secret \"backup-recipients\""),
        "{message}"
    );

    // The Secret without the key: the keys it has are named, never their values.
    put_secret(&h.kube, "backup-recipients", &[("team", "age1notakey")]);
    at(&h.ctx, "2026-11-22T11:00:00Z");
    let (_, export) = h.reconcile_export("nightly").await;
    let (_, reason, message) = export_condition(&export, "Ready");
    assert_eq!(reason, "SecretKeyMissing");
    assert!(message.contains("it has: team"), "{message}");
    assert!(!message.contains("age1notakey"), "{message}");

    // A secret key where the recipients belong: failed for good, the key never echoed.
    let (ours, _) = key_pair();
    put_secret(&h.kube, "backup-recipients", &[("recipients", &ours)]);
    at(&h.ctx, "2026-11-22T12:00:00Z");
    let (_, export) = h.reconcile_export("nightly").await;
    let status = export.status.clone().unwrap();
    assert_eq!(status.phase.as_deref(), Some("Failed"), "{status:?}");
    let (_, reason, message) = export_condition(&export, "Ready");
    assert_eq!(reason, "InvalidEncryptionKey");
    assert!(message.contains("is an age secret key"), "{message}");
    let secret = ours.lines().last().unwrap();
    assert!(!said(&export.status).contains(&secret[16..]));
    for event in h.kube.events(NS) {
        assert!(!event.to_string().contains(&secret[16..]), "{event}");
    }
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "no file");
    std::fs::remove_dir_all(&dir).unwrap();
}
