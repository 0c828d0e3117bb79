//! Secrets never appear in output (docs/reliability.md): marker values in every secret — the
//! database password, an S3 secret key, an Azure account key, a GCS service account's private
//! key — driven through every failure
//! path the CLI and the reconcilers can reach, with debug logs on; every byte of output (CLI
//! stdout and stderr in text and JSON, the operator's logs, status, Events and metrics) is
//! searched for them.

mod support;

use std::process::Command;
use std::sync::{Arc, Mutex};

use serde_json::json;
use sqlx::AssertSqlSafe;
use support::TestDb;
use support::operator::{Harness, export_path, put_secret, state_export, store_for};

/// The database password of the role the tests connect as.
const PG_MARKER: &str = "pgpw-marker-8c41d2e7";
/// An S3 secret access key.
const S3_MARKER: &str = "s3key-marker-5d2a9b61";
/// An Azure account key (base64, as Azure requires) of `azkey-marker-3e9f0a`.
const AZ_MARKER: &str = "YXprZXktbWFya2VyLTNlOWYwYQ==";
/// The private key in the GCS service account key the tests use.
const GCS_MARKER: &str = support::gcs::PRIVATE_KEY;
const MARKERS: &[&str] = &[PG_MARKER, S3_MARKER, AZ_MARKER, GCS_MARKER];

fn leaks(text: &str) -> Vec<&'static str> {
    MARKERS
        .iter()
        .copied()
        .filter(|marker| text.contains(marker))
        .collect()
}

/// A database whose role logs in with the marker password, and its URL.
async fn marked_database() -> (TestDb, String) {
    let db = TestDb::new().await;
    let role = format!("leak_{}", db.name);
    let mut conn = db.conn().await;
    sqlx::query(AssertSqlSafe(format!(
        "CREATE ROLE {role} LOGIN SUPERUSER PASSWORD '{PG_MARKER}'"
    )))
    .execute(&mut conn)
    .await
    .unwrap();
    let (host, port, _, _, database) = support::url_parts(&db.url);
    let url = format!("postgres://{role}:{PG_MARKER}@{host}:{port}/{database}");
    (db, url)
}

/// Runs the CLI with debug logs, in text and in JSON, and returns everything it printed.
fn cli_output(url: &str, args: &[&str]) -> (bool, String) {
    let mut all = String::new();
    let mut succeeded = true;
    for output in ["text", "json"] {
        let out = Command::new(env!("CARGO_BIN_EXE_statekeeper"))
            .args(["state", "--output", output])
            .args(args)
            .env("STATEKEEPER_DATABASE_URL", url)
            .env("STATEKEEPER_LOG", "debug")
            .env_remove("STATEKEEPER_SCHEMA")
            .output()
            .unwrap();
        succeeded &= out.status.success();
        all.push_str(&String::from_utf8_lossy(&out.stdout));
        all.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    (succeeded, all)
}

#[tokio::test]
async fn no_secret_reaches_any_output_on_any_failure_path() {
    let (db, url) = marked_database().await;
    let (host, port, user, _, database) = support::url_parts(&url);
    let dir = support::operator::temp_dir("secrets");
    let corrupt = dir.join("corrupt.json");
    std::fs::write(&corrupt, br#"{"metadata": {"format": "statekeeper", "#).unwrap();
    let s3 = |bucket: &str| {
        vec![
            "--storage-option".to_owned(),
            format!("endpoint={}", support::s3::endpoint()),
            "--storage-option".to_owned(),
            "region=us-east-1".to_owned(),
            "--storage-option".to_owned(),
            "aws_access_key_id=statekeeper-test".to_owned(),
            "--storage-option".to_owned(),
            format!("aws_secret_access_key={S3_MARKER}"),
            "--to".to_owned(),
            format!("s3://{bucket}/backup.json"),
        ]
    };
    let azure = vec![
        "--storage-option".to_owned(),
        "azure_storage_account_name=devstoreaccount1".to_owned(),
        "--storage-option".to_owned(),
        format!("azure_storage_account_key={AZ_MARKER}"),
        "--storage-option".to_owned(),
        format!("azure_storage_endpoint={}", support::azure::endpoint()),
        "--to".to_owned(),
        format!("az://{}/secrets/backup.json", support::azure::CONTAINER),
    ];
    let gcs = |url: String| {
        vec![
            "--storage-option".to_owned(),
            format!("google_base_url={}", support::gcs::endpoint()),
            "--storage-option".to_owned(),
            format!(
                "google_service_account_key={}",
                support::gcs::service_account_key()
            ),
            "--to".to_owned(),
            url,
        ]
    };
    let bucket = support::s3::bucket().await;
    let gcs_bucket = support::gcs::bucket().await;
    let wrong_password = format!("postgres://postgres:{PG_MARKER}@{host}:{port}/{database}");
    let unreachable = format!("postgres://{user}:{PG_MARKER}@127.0.0.1:1/{database}");
    let bad_port = format!("postgres://{user}:{PG_MARKER}@{host}:99999/{database}");
    let no_database = format!("postgres://{user}:{PG_MARKER}@{host}:{port}/no_such_database");
    let strings = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();

    // (what, database URL, arguments, whether it should succeed)
    let mut paths: Vec<(&str, String, Vec<String>, bool)> = vec![
        (
            "wrong password",
            wrong_password,
            strings(&["status"]),
            false,
        ),
        (
            "unreachable database",
            unreachable,
            strings(&["status"]),
            false,
        ),
        ("invalid URL (port)", bad_port, strings(&["status"]), false),
        (
            "database does not exist",
            no_database,
            strings(&["status"]),
            false,
        ),
        (
            "store not initialized",
            url.clone(),
            strings(&["backup"]),
            false,
        ),
        ("init", url.clone(), strings(&["init"]), true),
        ("status", url.clone(), strings(&["status"]), true),
        (
            "corrupt import",
            url.clone(),
            strings(&["import", "--from", corrupt.to_str().unwrap()]),
            false,
        ),
        (
            "import of a file that does not exist",
            url.clone(),
            strings(&["import", "--from", "/nonexistent/backup.json"]),
            false,
        ),
        (
            "credentials in a destination URL",
            url.clone(),
            strings(&[
                "export",
                "--to",
                &format!("s3://user:{S3_MARKER}@bucket/key"),
            ]),
            false,
        ),
        (
            "a command that fails under state run",
            url.clone(),
            strings(&["run", "--backup", "--", "sh", "-c", "exit 3"]),
            false,
        ),
    ];
    let mut export_missing_bucket = strings(&["export"]);
    export_missing_bucket.extend(s3("no-such-bucket-statekeeper"));
    paths.push((
        "S3 refuses (no such bucket)",
        url.clone(),
        export_missing_bucket,
        false,
    ));
    let mut export_s3 = strings(&["export"]);
    export_s3.extend(s3(&bucket));
    paths.push(("S3 export", url.clone(), export_s3, true));
    let mut export_azure = strings(&["export"]);
    export_azure.extend(azure);
    paths.push((
        "Azure refuses the account key",
        url.clone(),
        export_azure,
        false,
    ));
    for (what, to, should_succeed) in [
        ("GCS export", format!("gs://{gcs_bucket}/backup.json"), true),
        (
            "GCS bucket does not exist",
            "gs://no-such-bucket-statekeeper/backup.json".to_owned(),
            false,
        ),
    ] {
        let mut export_gcs = strings(&["export"]);
        export_gcs.extend(gcs(to));
        paths.push((what, url.clone(), export_gcs, should_succeed));
    }

    let mut leaked = Vec::new();
    for (what, url, args, should_succeed) in &paths {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (succeeded, output) = cli_output(url, &args);
        assert_eq!(
            succeeded,
            *should_succeed,
            "{what}: unexpected outcome:\n{}",
            output.chars().take(3000).collect::<String>()
        );
        for marker in leaks(&output) {
            leaked.push(format!("CLI, {what}: {marker}"));
        }
    }
    let cli_paths = paths.len();

    // The operator: its logs at debug level, status, Events and metrics.
    let logs = Arc::new(Mutex::new(Vec::<u8>::new()));
    let writer = {
        let logs = logs.clone();
        move || support::Captured(logs.clone())
    };
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_writer(writer)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let h = Harness::new();
    let mut operator_paths = 0;
    // A wrong password in the Secret.
    put_secret(&h.kube, "pg-credentials", &[("password", PG_MARKER)]);
    let mut wrong = store_for(&db, "wrong", json!({}));
    wrong["spec"]["connection"]["user"] = json!("postgres");
    let (_, stored) = h.reconcile(&wrong).await;
    let ready = support::operator::condition(
        &stored.status.clone().unwrap_or_default().conditions,
        "Ready",
    );
    assert_eq!(
        (ready.0.as_str(), ready.1.as_str()),
        ("False", "AuthenticationFailed")
    );
    operator_paths += 1;
    // The right one, as the marked role: Ready; then exports the destination refuses.
    let mut right = store_for(&db, "analytics", json!({}));
    right["spec"]["connection"]["user"] = json!(user);
    h.reconcile(&right).await;
    operator_paths += 1;
    let s3_secret = [
        ("aws_access_key_id", "statekeeper-test"),
        ("aws_secret_access_key", S3_MARKER),
    ];
    put_secret(&h.kube, "s3-credentials", &s3_secret);
    h.kube.put(
        &export_path("to-missing-bucket"),
        state_export(
            "to-missing-bucket",
            "s3://no-such-bucket-statekeeper/backup.json.zst",
            json!({"destination": {"options": {"endpoint": support::s3::endpoint(), "region": "us-east-1"},
                   "credentialsSecretRef": {"name": "s3-credentials"}}, "backoffLimit": 1}),
        ),
    );
    let (_, refused) = h.reconcile_export("to-missing-bucket").await;
    assert_refused(&refused);
    operator_paths += 1;
    put_secret(
        &h.kube,
        "azure-credentials",
        &[
            ("azure_storage_account_name", "devstoreaccount1"),
            ("azure_storage_account_key", AZ_MARKER),
        ],
    );
    h.kube.put(
        &export_path("to-azure"),
        state_export(
            "to-azure",
            &format!("az://{}/secrets/operator.json.zst", support::azure::CONTAINER),
            json!({"destination": {"options": {"azure_storage_endpoint": support::azure::endpoint()},
                   "credentialsSecretRef": {"name": "azure-credentials"}}, "backoffLimit": 1}),
        ),
    );
    let (_, refused) = h.reconcile_export("to-azure").await;
    assert_refused(&refused);
    operator_paths += 1;
    let gcs_key = support::gcs::service_account_key();
    put_secret(
        &h.kube,
        "gcs-credentials",
        &[("google_service_account_key", &gcs_key)],
    );
    h.kube.put(
        &export_path("to-gcs"),
        state_export(
            "to-gcs",
            "gs://no-such-bucket-statekeeper/operator.json.zst",
            json!({"destination": {"options": {"google_base_url": support::gcs::endpoint()},
                   "credentialsSecretRef": {"name": "gcs-credentials"}}, "backoffLimit": 1}),
        ),
    );
    let (_, refused) = h.reconcile_export("to-gcs").await;
    assert_refused(&refused);
    operator_paths += 1;
    // A secret key that is also set in the spec's options (refused, naming the key only).
    h.kube.put(
        &export_path("twice"),
        state_export(
            "twice",
            &format!("s3://{bucket}/twice.json.zst"),
            json!({"destination": {"options": {"endpoint": support::s3::endpoint(), "region": "us-east-1",
                   "aws_access_key_id": "statekeeper-test"},
                   "credentialsSecretRef": {"name": "s3-credentials"}}}),
        ),
    );
    h.reconcile_export("twice").await;
    operator_paths += 1;
    // A successful export, for completeness of status and metrics.
    h.kube.put(
        &export_path("good"),
        state_export(
            "good",
            &format!("s3://{bucket}/good.json.zst"),
            json!({"destination": {"options": {"endpoint": support::s3::endpoint(), "region": "us-east-1"},
                   "credentialsSecretRef": {"name": "s3-credentials"}}}),
        ),
    );
    let (_, good) = h.reconcile_export("good").await;
    assert_eq!(
        good.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded")
    );
    operator_paths += 1;

    // A runner Job that fails: the migration restores its backup and reports it.
    {
        use support::operator::{job_path, migration_path, state_migration};
        let meltano_db = TestDb::new().await;
        let mut conn = meltano_db.conn().await;
        let role = format!("leak_{}", db.name);
        sqlx::query(AssertSqlSafe(format!(
            "GRANT ALL ON SCHEMA public TO {role}"
        )))
        .execute(&mut conn)
        .await
        .unwrap();
        support::meltano::Project::new(&meltano_db).ok(&["state", "list"]);
        let mut meltano_store = store_for(
            &meltano_db,
            "meltano",
            json!({"framework": "meltano", "schema": null}),
        );
        meltano_store["spec"]["connection"]["user"] = json!(role);
        h.reconcile(&meltano_store).await;
        h.kube.put(
            &migration_path("upgrade"),
            state_migration(
                "upgrade",
                "2026-11-27T10:00:00Z",
                json!({"storeRef": {"name": "meltano"},
                       "upgrade": {"runner": {"image": "ghcr.io/acme/meltano:4.5.0", "runAsUser": 1000}}}),
            ),
        );
        let (_, running) = h.reconcile_migration("upgrade").await;
        assert_eq!(
            running.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Running")
        );
        h.patch(
            &job_path("upgrade-upgrade"),
            json!({"status": {"failed": 1, "conditions": [{"type": "Failed", "status": "True",
                "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"}]}}),
        );
        let (_, failed) = h.reconcile_migration("upgrade").await;
        let status = failed.status.clone().unwrap();
        assert_eq!(
            (status.phase.as_deref(), status.restored),
            (Some("Failed"), Some(true))
        );
        operator_paths += 1;
    }

    let api = h.kube.dump();
    for marker in leaks(&api) {
        leaked.push(format!("operator status or Events: {marker}"));
    }
    for marker in leaks(&h.ctx.metrics.render()) {
        leaked.push(format!("operator metrics: {marker}"));
    }
    let logged = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(!logged.is_empty(), "debug logs were captured");
    for marker in leaks(&logged) {
        leaked.push(format!("operator logs: {marker}"));
    }
    println!(
        "secrets: {cli_paths} CLI paths (text and JSON, debug logs) and {operator_paths} operator \
         paths (logs at debug, status, Events, metrics) driven; {} leaks",
        leaked.len()
    );
    assert!(leaked.is_empty(), "secrets leaked: {leaked:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The export did not happen, and its Ready condition says why.
fn assert_refused(export: &statekeeper::api::StateExport) {
    let conditions = export.status.clone().unwrap_or_default().conditions;
    let (status, reason, _) = support::operator::condition(&conditions, "Ready");
    assert_eq!(status, "False", "{reason}");
    assert!(
        [
            "DestinationUnavailable",
            "ExportWriteFailed",
            "BackoffLimitExceeded"
        ]
        .contains(&reason.as_str()),
        "{reason}"
    );
}
