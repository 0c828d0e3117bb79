//! Export destinations through object_store against real servers: a real S3-compatible server on
//! 127.0.0.1 (multipart uploads, credentials, failures that leave nothing behind) and local files,
//! from the engine and from the CLI.

mod support;

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use statekeeper::engine::generator::GenerateOptions;
use statekeeper::engine::{Compression, Destination, ExportFormat, ExportOptions, ImportOptions};
use support::{TestDb, current_state, s3};

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
    }
}

#[tokio::test]
async fn s3_round_trip_uses_multipart_and_imports_every_row() {
    let db = TestDb::new().await;
    // Uncompressed, this is over the 8 MiB single-PUT buffer: a multipart upload.
    let store = generated(&db, 15_000).await;
    let bucket = s3::bucket().await;
    let url = format!("s3://{bucket}/nightly/state.json");
    let destination = Destination::parse(&url, &s3::options()).unwrap();
    let report = store
        .export_to(&destination, &uncompressed(), |_| {})
        .await
        .unwrap();
    assert_eq!(s3::keys(&bucket).await, vec!["nightly/state.json"]);
    let (size, parts) = s3::object_parts(&bucket, "nightly/state.json").await;
    assert_eq!(size, report.bytes);
    assert!(
        parts >= 2,
        "{size} bytes went up in {parts} part(s), expected multipart"
    );
    assert!(s3::pending_uploads(&bucket).await.is_empty());

    // Back from S3 into a fresh store: every row of every table.
    let target = TestDb::new().await;
    let copy = target.store("state").await;
    copy.init(None).await.unwrap();
    let reader = destination.open().await.unwrap();
    copy.import(
        reader,
        &ImportOptions {
            mode: statekeeper::engine::ImportMode::Replace,
            expected_sha256: report.sha256.clone(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut a = db.conn().await;
    let mut b = target.conn().await;
    let (before, after) = (
        current_state(&mut a, "state").await,
        current_state(&mut b, "state").await,
    );
    assert!(before == after, "the import differs from the source");

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

    // Once the version sections went up as multipart parts, the export's progress callback
    // pauses it and the test kills its database session.
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
    assert!(
        !s3::pending_uploads(&bucket).await.is_empty(),
        "a multipart upload is open"
    );
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
    let error = result.expect_err("the export lost its database session");
    assert!(!error.to_string().contains(s3::SECRET_ACCESS_KEY));
    assert!(s3::keys(&bucket).await.is_empty(), "no object appeared");
    assert!(
        s3::pending_uploads(&bucket).await.is_empty(),
        "the multipart upload was aborted"
    );
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
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_statekeeper"))
            .args(args)
            .env("STATEKEEPER_DATABASE_URL", &db.url)
            .env("AWS_ACCESS_KEY_ID", "statekeeper-test")
            .env("AWS_SECRET_ACCESS_KEY", s3::SECRET_ACCESS_KEY)
            .env("AWS_REGION", "us-east-1")
            .output()
            .unwrap()
    };
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
    let out = run(&[
        "state",
        "export",
        "--schema",
        "state",
        "--to",
        &url,
        "--compression",
        "zstd",
        "--storage-option",
        &endpoint,
        "-o",
        "json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["destination"], url.as_str(), "{summary}");
    assert_eq!(s3::keys(&bucket).await, vec!["cli/state.json.zst"]);

    let out = run(&["state", "init", "--schema", "copy"]);
    assert!(out.status.success());
    let out = run(&[
        "state",
        "import",
        "--replace",
        "--schema",
        "copy",
        "--from",
        &url,
        "--storage-option",
        &endpoint,
        "--sha256",
        summary["sha256"].as_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut conn = db.conn().await;
    let (before, after) = (
        current_state(&mut conn, "state").await,
        current_state(&mut conn, "copy").await,
    );
    assert!(before == after, "the import differs from the source");

    // A missing object: one line, the reason, never the secret.
    let out = run(&[
        "state",
        "import",
        "--schema",
        "copy",
        "--from",
        &format!("s3://{bucket}/cli/missing.json"),
        "--storage-option",
        &endpoint,
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("not found"), "{err}");
    assert!(!err.contains(s3::SECRET_ACCESS_KEY), "{err}");
}

#[tokio::test]
async fn azure_round_trip_in_blocks_through_a_real_emulator() {
    let db = TestDb::new().await;
    // Over the single-PUT buffer: the blob goes up as blocks committed at the end.
    let store = generated(&db, 15_000).await;
    let prefix = format!("run-{}", std::process::id());
    let url = format!("az://{}/{prefix}/state.json", support::azure::CONTAINER);
    let destination = Destination::parse(&url, &support::azure::options()).unwrap();
    assert!(!destination.exists().await.unwrap());
    let report = store
        .export_to(&destination, &uncompressed(), |_| {})
        .await
        .unwrap();
    assert!(report.bytes > 8 * 1024 * 1024, "{} bytes", report.bytes);
    assert!(destination.exists().await.unwrap());

    let target = TestDb::new().await;
    let copy = target.store("state").await;
    copy.init(None).await.unwrap();
    let imported = copy
        .import(
            destination.open().await.unwrap(),
            &ImportOptions {
                mode: statekeeper::engine::ImportMode::Replace,
                expected_sha256: report.sha256.clone(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(imported.bytes, report.bytes);
    let (before, after) = (
        current_state(&mut db.conn().await, "state").await,
        current_state(&mut target.conn().await, "state").await,
    );
    assert!(before == after, "the import differs from the source");
    destination.delete().await.unwrap();
    assert!(!destination.exists().await.unwrap());
}
