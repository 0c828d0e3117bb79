//! Export destinations through object_store against real servers on 127.0.0.1: an S3-compatible
//! server (moto), a Google Cloud Storage emulator (fake-gcs-server) and an Azure Blob Storage
//! emulator (Azurite) — multipart uploads, credentials, failures that leave nothing behind — and
//! local files, from the engine and from the CLI.

mod support;

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use statekeeper::engine::generator::GenerateOptions;
use statekeeper::engine::{
    Compression, Destination, ExportFormat, ExportOptions, ExportReport, ImportOptions,
};
use support::{TestDb, current_state, gcs, s3};

async fn generated(db: &TestDb, model_versions: u64) -> statekeeper::engine::Store {
    let store = db.store("state").await;
    store.init(None).await.unwrap();
    store
        .generate(&GenerateOptions {
            model_versions,
            environments: 12,
            ..Default::default()
        })
        .await
        .unwrap();
    store
}

/// A whole-store export without compression: large enough to go up in parts.
fn uncompressed() -> ExportOptions {
    ExportOptions {
        environments: None,
        compression: Compression::None,
        format: ExportFormat::Statekeeper,
        ..Default::default()
    }
}

#[tokio::test]
async fn s3_round_trip_uses_multipart_and_imports_every_row() {
    let bucket = s3::bucket().await;
    // Uncompressed, this is over the 8 MiB single-PUT buffer: a multipart upload.
    let (destination, report) = round_trip(
        &format!("s3://{bucket}/nightly/state.json"),
        &s3::options(),
        15_000,
        &uncompressed(),
        ImportOptions::replace(),
    )
    .await;
    assert_eq!(s3::keys(&bucket).await, vec!["nightly/state.json"]);
    let (size, parts) = s3::object_parts(&bucket, "nightly/state.json").await;
    assert_eq!(size, report.bytes);
    assert!(
        parts >= 2,
        "{size} bytes went up in {parts} part(s), expected multipart"
    );
    assert!(s3::pending_uploads(&bucket).await.is_empty());

    // Deleting is idempotent: retention may retry it.
    destination.delete().await.unwrap();
    destination.delete().await.unwrap();
    assert!(s3::keys(&bucket).await.is_empty());
    assert!(!destination.exists().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_export_leaves_no_object_and_no_pending_upload() {
    let db = TestDb::new().await;
    let store = generated(&db, 60_000).await;
    let bucket = s3::bucket().await;
    let destination =
        Destination::parse(&format!("s3://{bucket}/broken.json"), &s3::options()).unwrap();
    let error = export_killed_midway(&db, &store, &destination, async {
        assert!(
            !s3::pending_uploads(&bucket).await.is_empty(),
            "a multipart upload is open"
        );
    })
    .await;
    assert!(!error.to_string().contains(s3::SECRET_ACCESS_KEY));
    assert!(s3::keys(&bucket).await.is_empty(), "no object appeared");
    assert!(
        s3::pending_uploads(&bucket).await.is_empty(),
        "the multipart upload was aborted"
    );
}

/// Exports `store` (uncompressed) to `destination` and, once more than 8 MiB went up as
/// multipart parts, pauses the export in its progress callback, runs `while_paused`, kills the
/// export's database session and lets it go on: the export's error.
async fn export_killed_midway(
    db: &TestDb,
    store: &statekeeper::engine::Store,
    destination: &Destination,
    while_paused: impl std::future::Future<Output = ()>,
) -> statekeeper::engine::Error {
    let written = Arc::new(AtomicU64::new(0));
    let counter = written.clone();
    let (paused_tx, paused) = std::sync::mpsc::channel::<()>();
    let (resume, resume_rx) = std::sync::mpsc::channel::<()>();
    let (engine, target) = (store.clone(), destination.clone());
    let export = tokio::spawn(async move {
        let mut paused_once = false;
        engine
            .export_to(&target, &uncompressed(), move |bytes: &[u8]| {
                let total = counter.fetch_add(bytes.len() as u64, Ordering::SeqCst);
                if !paused_once && total > 8 * 1024 * 1024 {
                    paused_once = true;
                    let _ = paused_tx.send(());
                    let _ = resume_rx.recv_timeout(std::time::Duration::from_secs(60));
                }
            })
            .await
    });
    tokio::task::spawn_blocking(move || paused.recv_timeout(std::time::Duration::from_secs(120)))
        .await
        .unwrap()
        .expect("the export got past 8 MiB");
    while_paused.await;
    let mut admin = db.conn().await;
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
         WHERE datname = current_database() AND pid <> pg_backend_pid()
         AND backend_type = 'client backend' AND state <> 'idle'",
    )
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert!(killed >= 1, "the export's session was found");
    resume.send(()).unwrap();
    let result = export.await.unwrap();
    result.expect_err("the export lost its database session")
}

#[tokio::test]
async fn bad_destinations_are_refused_with_reasons_and_no_secrets() {
    let options = s3::options();
    let cases: [(&str, BTreeMap<String, String>, &str); 7] = [
        ("ftp://host/x.json", BTreeMap::new(), "not supported"),
        (
            "s3://bucket/x.json",
            BTreeMap::from([("endpont".into(), "http://x".into())]),
            "unknown option \"endpont\"",
        ),
        ("s3://bucket/folder/", options.clone(), "ends in /"),
        (
            "s3://user:pw@bucket/x.json",
            BTreeMap::new(),
            "credentials do not belong in the URL",
        ),
        ("file://relative/x.json", BTreeMap::new(), "absolute path"),
        (
            "az://container/x.json?sv=2024&sig=TOPSECRETSIG",
            BTreeMap::new(),
            "with ? or # is not supported",
        ),
        (
            "/tmp/x.json",
            BTreeMap::from([("region".into(), "eu".into())]),
            "local files take no options",
        ),
    ];
    for (url, options, expected) in cases {
        let error = Destination::parse(url, &options).expect_err(url);
        let message = error.to_string();
        assert_eq!(error.reason(), "InvalidDestination", "{url}: {message}");
        assert!(message.contains(expected), "{url}: {message}");
        assert!(!message.contains("pw@"), "{message}");
        assert!(!message.contains("TOPSECRETSIG"), "{message}");
    }

    // A missing bucket: a clear, one-line error that never shows the secret key.
    let db = TestDb::new().await;
    let store = generated(&db, 100).await;
    let destination = Destination::parse("s3://no-such-bucket/x.json", &options).unwrap();
    let error = store
        .export_to(&destination, &ExportOptions::default(), |_| {})
        .await
        .unwrap_err();
    let message = error.to_string();
    assert!(message.contains("NoSuchBucket"), "{message}");
    assert!(!message.contains(s3::SECRET_ACCESS_KEY) && !message.contains('\n'));
    let error = match destination.open().await {
        Err(e) => e,
        Ok(_) => panic!("a missing bucket cannot be read"),
    };
    assert_eq!(error.reason(), "DestinationUnavailable");
}

#[tokio::test]
async fn local_files_are_written_whole_and_never_half() {
    let db = TestDb::new().await;
    let store = generated(&db, 500).await;
    let dir = std::env::temp_dir().join(format!("sk-dest-{}", std::process::id()));
    let file = dir.join("nested/deeper/state.json.zst");
    let destination =
        Destination::parse(&format!("file://{}", file.display()), &BTreeMap::new()).unwrap();
    let report = store
        .export_to(
            &destination,
            &ExportOptions {
                environments: None,
                compression: Compression::Zstd,
                format: ExportFormat::Statekeeper,
                ..Default::default()
            },
            |_| {},
        )
        .await
        .unwrap();
    assert_eq!(std::fs::metadata(&file).unwrap().len(), report.bytes);
    // A failing export (unknown environment) leaves the directory as it was.
    let other =
        Destination::parse(dir.join("other.json").to_str().unwrap(), &BTreeMap::new()).unwrap();
    store
        .export_to(
            &other,
            &ExportOptions {
                environments: Some(vec!["nope".into()]),
                compression: Compression::None,
                format: ExportFormat::Statekeeper,
                ..Default::default()
            },
            |_| {},
        )
        .await
        .unwrap_err();
    let entries: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(entries, vec!["nested"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn cli_exports_to_and_imports_from_s3_with_credentials_from_the_environment() {
    let db = TestDb::new().await;
    generated(&db, 300).await;
    let bucket = s3::bucket().await;
    let url = format!("s3://{bucket}/cli/state.json.zst");
    let endpoint = format!("endpoint={}", s3::endpoint());
    // Without credentials: said so, not as the metadata service's refusal.
    let started = std::time::Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_statekeeper"))
        .args(["state", "export", "--schema", "state", "--to", &url])
        .args([
            "--storage-option",
            &endpoint,
            "--storage-option",
            "region=us-east-1",
        ])
        .env("STATEKEEPER_DATABASE_URL", &db.url)
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_PROFILE")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("no S3 credentials") && !err.contains("169.254"),
        "{err} (after {:?})",
        started.elapsed()
    );
    let settings = [
        ("AWS_ACCESS_KEY_ID", "statekeeper-test"),
        ("AWS_SECRET_ACCESS_KEY", s3::SECRET_ACCESS_KEY),
        ("AWS_REGION", "us-east-1"),
    ];
    let missing = format!("s3://{bucket}/cli/missing.json");
    let options = ["--storage-option", &endpoint];
    cli_round_trip(
        &db,
        &url,
        &missing,
        &settings,
        &options,
        s3::SECRET_ACCESS_KEY,
    )
    .await;
    assert_eq!(s3::keys(&bucket).await, vec!["cli/state.json.zst"]);
}

#[tokio::test]
async fn azure_round_trip_in_blocks_through_a_real_emulator() {
    let prefix = format!("run-{}", std::process::id());
    let url = format!("az://{}/{prefix}/state.json", support::azure::CONTAINER);
    // Over the single-PUT buffer: the blob goes up as blocks committed at the end.
    let (destination, report) = round_trip(
        &url,
        &support::azure::options(),
        15_000,
        &uncompressed(),
        ImportOptions::replace(),
    )
    .await;
    assert!(report.bytes > 8 * 1024 * 1024, "{} bytes", report.bytes);
    destination.delete().await.unwrap();
    assert!(!destination.exists().await.unwrap());
}

/// One export round trip, the scenario every destination runs: a store of `model_versions`
/// generated versions is exported to `url` (with the object store `options`) as `export` says,
/// read back from there into a fresh store with `import` (and the export's sha256) and compared
/// table by table. A variant (a verified or an encrypted export, say) is this with other
/// options, asserting on the destination and report it returns.
async fn round_trip(
    url: &str,
    options: &BTreeMap<String, String>,
    model_versions: u64,
    export: &ExportOptions,
    import: ImportOptions,
) -> (Destination, ExportReport) {
    let db = TestDb::new().await;
    let store = generated(&db, model_versions).await;
    let destination = Destination::parse(url, options).unwrap();
    assert!(!destination.exists().await.unwrap(), "{url} is new");
    let report = store.export_to(&destination, export, |_| {}).await.unwrap();
    assert!(destination.exists().await.unwrap());

    let target = TestDb::new().await;
    let copy = target.store("state").await;
    copy.init(None).await.unwrap();
    let imported = copy
        .import(
            destination.open().await.unwrap(),
            &ImportOptions {
                expected_sha256: report.sha256.clone(),
                ..import
            },
        )
        .await
        .unwrap();
    assert_eq!(imported.bytes, report.bytes);
    let (before, after) = (
        current_state(&mut db.conn().await, "state").await,
        current_state(&mut target.conn().await, "state").await,
    );
    assert!(
        before == after,
        "the import from {url} differs from the source"
    );
    (destination, report)
}

#[tokio::test]
async fn gcs_round_trip_uses_multipart_and_imports_every_row() {
    let bucket = gcs::bucket().await;
    // Uncompressed, this is over the 8 MiB part size: an XML API multipart upload.
    let (destination, report) = round_trip(
        &format!("gs://{bucket}/nightly/state.json"),
        &gcs::options(),
        15_000,
        &uncompressed(),
        ImportOptions::replace(),
    )
    .await;
    assert_eq!(gcs::keys(&bucket).await, vec!["nightly/state.json"]);
    let (size, parts) = gcs::object_parts(&bucket, "nightly/state.json").await;
    assert_eq!(size, report.bytes);
    assert!(
        parts >= 2,
        "{size} bytes went up in {parts} part(s), expected multipart"
    );
    assert!(gcs::pending_uploads(&bucket).await.is_empty());

    // Deleting is idempotent: retention may retry it.
    destination.delete().await.unwrap();
    destination.delete().await.unwrap();
    assert!(gcs::keys(&bucket).await.is_empty());
    assert!(!destination.exists().await.unwrap());
}

#[tokio::test]
async fn gcs_round_trip_of_a_compressed_export_in_one_part() {
    let bucket = gcs::bucket().await;
    let url = format!("gs://{bucket}/state.json.gz");
    let export = ExportOptions {
        compression: Compression::Gzip,
        format: ExportFormat::Statekeeper,
        ..Default::default()
    };
    let (_, report) = round_trip(
        &url,
        &gcs::options(),
        2_000,
        &export,
        ImportOptions::replace(),
    )
    .await;
    assert_eq!(
        gcs::object_parts(&bucket, "state.json.gz").await,
        (report.bytes, 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_gcs_export_leaves_no_object_and_no_pending_upload() {
    let db = TestDb::new().await;
    let store = generated(&db, 60_000).await;
    let bucket = gcs::bucket().await;
    let destination =
        Destination::parse(&format!("gs://{bucket}/broken.json"), &gcs::options()).unwrap();
    let error = export_killed_midway(&db, &store, &destination, async {
        assert_eq!(
            gcs::pending_uploads(&bucket).await.len(),
            1,
            "an upload is open"
        );
    })
    .await;
    assert!(!error.to_string().contains(gcs::PRIVATE_KEY), "{error}");
    assert!(gcs::keys(&bucket).await.is_empty(), "no object appeared");
    assert!(
        gcs::pending_uploads(&bucket).await.is_empty(),
        "the multipart upload was aborted"
    );

    // An upload a killed process left behind is aborted by the retry's clean-up, by its id.
    let left = destination.begin_upload().await.unwrap();
    let id = left.staging_id().expect("a multipart upload").to_owned();
    std::mem::forget(left);
    assert_eq!(gcs::pending_uploads(&bucket).await, vec![id.clone()]);
    destination.clean_up(Some(&id)).await.unwrap();
    destination.clean_up(Some(&id)).await.unwrap();
    assert!(gcs::pending_uploads(&bucket).await.is_empty());
}

#[tokio::test]
async fn gcs_refusals_and_failures_name_the_reason_and_never_the_key() {
    let error = Destination::parse(
        "gs://bucket/x.json",
        &BTreeMap::from([("google_base_ur".into(), gcs::endpoint().into())]),
    )
    .expect_err("a typo");
    assert!(
        error
            .to_string()
            .contains("unknown option \"google_base_ur\""),
        "{error}"
    );
    let mut bad_key = gcs::options();
    bad_key.insert(
        "google_service_account_key".into(),
        format!("{{\"private_key\": \"{}\"", gcs::PRIVATE_KEY),
    );
    let error = Destination::parse("gs://bucket/x.json", &bad_key).expect_err("a broken key");
    assert_eq!(error.reason(), "InvalidDestination");
    assert!(!error.to_string().contains(gcs::PRIVATE_KEY), "{error}");

    // A missing bucket: one line, the reason, never the key.
    let db = TestDb::new().await;
    let store = generated(&db, 100).await;
    let destination = Destination::parse("gs://no-such-bucket/x.json", &gcs::options()).unwrap();
    let error = store
        .export_to(&destination, &ExportOptions::default(), |_| {})
        .await
        .unwrap_err();
    let message = error.to_string();
    assert_eq!(error.reason(), "DestinationUnavailable", "{message}");
    assert!(message.contains("NoSuchBucket"), "{message}");
    assert!(!message.contains(gcs::PRIVATE_KEY) && !message.contains('\n'));
    let error = match destination.open().await {
        Err(e) => e,
        Ok(_) => panic!("a missing bucket cannot be read"),
    };
    assert_eq!(error.reason(), "DestinationUnavailable");
    assert!(!error.to_string().contains(gcs::PRIVATE_KEY));
}

#[tokio::test]
async fn cli_exports_to_and_imports_from_gcs_with_settings_from_the_environment() {
    let db = TestDb::new().await;
    generated(&db, 300).await;
    let bucket = gcs::bucket().await;
    let url = format!("gs://{bucket}/cli/state.json.zst");
    let key = gcs::service_account_key();
    let settings = [
        ("GOOGLE_BASE_URL", gcs::endpoint()),
        ("GOOGLE_SERVICE_ACCOUNT_KEY", key.as_str()),
    ];
    let missing = format!("gs://{bucket}/cli/missing.json");
    cli_round_trip(&db, &url, &missing, &settings, &[], gcs::PRIVATE_KEY).await;
    assert_eq!(gcs::keys(&bucket).await, vec!["cli/state.json.zst"]);
}

/// The CLI's round trip through `url`, with the provider's environment variables `settings` and
/// the arguments `options` (`--storage-option`s): `state export --compression zstd` of the
/// schema `state` in `db`, `state import --replace --sha256` of it into the schema `copy`,
/// compared table by table, and an import from the missing object `missing`, refused on one line
/// that says "not found". `secret` shows in no output.
async fn cli_round_trip(
    db: &TestDb,
    url: &str,
    missing: &str,
    settings: &[(&str, &str)],
    options: &[&str],
    secret: &str,
) {
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_statekeeper"))
            .args(args)
            .env("STATEKEEPER_DATABASE_URL", &db.url)
            .envs(settings.iter().copied())
            .output()
            .unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "{stderr}"
        );
        (out.status.code(), stdout, stderr)
    };
    let export = ["state", "export", "--schema", "state", "--to", url];
    let (code, stdout, stderr) = run(&[
        &export[..],
        options,
        &["--compression", "zstd", "-o", "json"],
    ]
    .concat());
    assert_eq!(code, Some(0), "{stderr}");
    let summary: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(summary["destination"], url, "{summary}");

    assert_eq!(run(&["state", "init", "--schema", "copy"]).0, Some(0));
    let sha256 = summary["sha256"].as_str().unwrap();
    let import = [
        "state",
        "import",
        "--replace",
        "--schema",
        "copy",
        "--from",
        url,
    ];
    let (code, _, stderr) = run(&[&import[..], options, &["--sha256", sha256]].concat());
    assert_eq!(code, Some(0), "{stderr}");
    let mut conn = db.conn().await;
    let (before, after) = (
        current_state(&mut conn, "state").await,
        current_state(&mut conn, "copy").await,
    );
    assert!(
        before == after,
        "the import from {url} differs from the source"
    );

    // A missing object: one line, the reason.
    let import = ["state", "import", "--schema", "copy", "--from", missing];
    let (code, _, stderr) = run(&[&import[..], options].concat());
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("not found"), "{stderr}");
}

/// `state verify` reads the file back from each object store, as a scheduled export's
/// verification does.
#[tokio::test]
async fn exports_verify_read_back_from_s3_gcs_and_azure() {
    let (s3_bucket, gcs_bucket) = (s3::bucket().await, gcs::bucket().await);
    let targets = [
        (format!("s3://{s3_bucket}/verified.json.zst"), s3::options()),
        (
            format!("gs://{gcs_bucket}/verified.json.zst"),
            gcs::options(),
        ),
        (
            format!(
                "az://{}/verify-{}/verified.json.zst",
                support::azure::CONTAINER,
                std::process::id()
            ),
            support::azure::options(),
        ),
    ];
    let export = ExportOptions {
        compression: Compression::Zstd,
        ..Default::default()
    };
    let db = TestDb::new().await;
    let store = db.store("state").await;
    store.init(None).await.unwrap();
    for (url, options) in targets {
        let (destination, report) =
            round_trip(&url, &options, 2_000, &export, ImportOptions::replace()).await;
        let verified = store
            .verify(
                destination.open().await.unwrap(),
                &statekeeper::engine::VerifyOptions {
                    expected_sha256: report.sha256.clone(),
                    ..Default::default()
                },
            )
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        assert!(verified.manifest, "{url}");
        assert_eq!(verified.sha256, report.sha256.clone().unwrap(), "{url}");
        assert_eq!(verified.total_rows(), report.total_rows(), "{url}");
    }
}
