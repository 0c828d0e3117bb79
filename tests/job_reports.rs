//! The channel a Job's report comes back through (`engine::job_report`, `--report-id`): a row in
//! `<schema>__statekeeper.job_reports` beside the store, against a real PostgreSQL. A report is
//! there only when the command succeeded and committed it: a failed or killed command leaves none,
//! so a report lost with its Pod can never read as a success.

mod support;

use std::process::{Command, Output};
use std::time::Duration;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use statekeeper::engine::job_report;
use statekeeper::engine::{Error, ExportReport, ImportReport, JanitorReport, SchemaName};
use support::{TestDb, schemas, snapshot};

fn statekeeper(url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_statekeeper"))
        .args(args)
        .env("STATEKEEPER_DATABASE_URL", url)
        .env_remove("STATEKEEPER_SCHEMA")
        .env_remove("STATEKEEPER_REPORT_ID")
        .output()
        .expect("run statekeeper")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn schema(name: &str) -> SchemaName {
    SchemaName::new(name).expect("valid schema")
}

async fn pool(db: &TestDb) -> sqlx::PgPool {
    statekeeper::engine::ConnectionSettings::from_url(&db.url)
        .expect("url")
        .connect()
        .await
        .expect("connect")
}

#[tokio::test]
async fn record_read_replace_forget_and_prune() {
    let db = TestDb::new().await;
    let pool = pool(&db).await;
    let store = schema("statekeeper");
    assert_eq!(job_report::read(&pool, &store, "op-1").await.unwrap(), None);
    assert!(!job_report::forget(&pool, &store, "op-1").await.unwrap());
    // Reading created nothing.
    assert!(
        !schemas(&mut db.conn().await)
            .await
            .contains(&"statekeeper__statekeeper".into())
    );

    let first = json!({"sha256": "aa", "bytes": 1});
    let recorded = job_report::record(&pool, &store, "op-1", "export", &first)
        .await
        .unwrap();
    assert_eq!(
        (recorded.kind.as_str(), &recorded.report),
        ("export", &first)
    );
    let read = job_report::read(&pool, &store, "op-1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(read, recorded);

    // A later attempt of the same operation replaces the report: it describes what is there now.
    let second = json!({"sha256": "bb", "bytes": 2});
    job_report::record(&pool, &store, "op-1", "export", &second)
        .await
        .unwrap();
    let read = job_report::read(&pool, &store, "op-1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(read.report, second);
    assert!(read.recorded_at >= recorded.recorded_at);

    // An id names one operation: a report of another kind under it is refused, the first stays.
    let err = job_report::record(&pool, &store, "op-1", "import", &json!({}))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("already has a report of kind \"export\""),
        "{err}"
    );
    assert_eq!(
        job_report::read(&pool, &store, "op-1")
            .await
            .unwrap()
            .unwrap()
            .report,
        second
    );

    // Another store in the same database keeps its own reports.
    let other = schema("other");
    job_report::record(&pool, &other, "op-1", "janitor", &json!({"runs": 0}))
        .await
        .unwrap();
    assert_eq!(
        job_report::read(&pool, &other, "op-1")
            .await
            .unwrap()
            .unwrap()
            .kind,
        "janitor"
    );

    assert!(job_report::forget(&pool, &store, "op-1").await.unwrap());
    assert_eq!(job_report::read(&pool, &store, "op-1").await.unwrap(), None);
    assert!(!job_report::forget(&pool, &store, "op-1").await.unwrap());

    // Pruning removes only what is older than the age given.
    job_report::record(&pool, &store, "old", "export", &first)
        .await
        .unwrap();
    job_report::record(&pool, &store, "new", "export", &first)
        .await
        .unwrap();
    sqlx::query(
        "UPDATE statekeeper__statekeeper.job_reports SET recorded_at = now() - interval '8 days' \
         WHERE operation = 'old'",
    )
    .execute(&pool)
    .await
    .unwrap();
    let seven_days = Duration::from_secs(7 * 24 * 3600);
    assert_eq!(
        job_report::prune(&pool, &store, seven_days).await.unwrap(),
        1
    );
    assert_eq!(job_report::read(&pool, &store, "old").await.unwrap(), None);
    assert!(
        job_report::read(&pool, &store, "new")
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(
        job_report::prune(&pool, &schema("none"), seven_days)
            .await
            .unwrap(),
        0
    );
}

#[tokio::test]
async fn operation_ids_are_validated_before_anything_is_written() {
    let db = TestDb::new().await;
    let pool = pool(&db).await;
    let store = schema("statekeeper");
    let long = "a".repeat(321);
    for bad in ["", "a b", "x'; DROP TABLE t; --", "-x", "é", long.as_str()] {
        let err = job_report::record(&pool, &store, bad, "export", &json!({}))
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::InvalidOperationId { .. }),
            "{bad}: {err}"
        );
        assert_eq!(err.reason(), "InvalidOperationId");
        assert!(job_report::read(&pool, &store, bad).await.is_err());
    }
    assert!(
        !schemas(&mut db.conn().await)
            .await
            .contains(&"statekeeper__statekeeper".into())
    );
    job_report::record(
        &pool,
        &store,
        "default/nightly:4f9c2b1e-5d6a-4c3b-9e8f-0a1b2c3d4e5f",
        "export",
        &json!({}),
    )
    .await
    .unwrap();

    // The CLI refuses a bad id before it does the work: no backup is taken.
    let out = statekeeper(&db.url, &["state", "backup", "--report-id", "bad id"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("invalid operation id"),
        "{}",
        stderr(&out)
    );
    assert!(
        db.store("statekeeper")
            .await
            .backups()
            .await
            .unwrap()
            .is_empty()
    );
}

/// Framework stores get their reports beside them; the framework's tables are untouched.
#[tokio::test]
async fn reports_sit_beside_every_framework_store() {
    let db = TestDb::new().await;
    let pool = pool(&db).await;
    let mut conn = db.conn().await;
    // statekeeper's own store first: init refuses a database that holds another framework's.
    statekeeper::engine::Store::new(pool.clone(), schema("statekeeper"))
        .init(None)
        .await
        .unwrap();
    for sql in [
        // SQLMesh-like: its state tables in schema sqlmesh.
        "CREATE SCHEMA sqlmesh",
        "CREATE TABLE sqlmesh._versions (schema_version int, sqlglot_version text, sqlmesh_version text)",
        "INSERT INTO sqlmesh._versions VALUES (60, '26.0.0', '0.170.0')",
        "CREATE TABLE sqlmesh._environments (name text PRIMARY KEY, snapshots text)",
        "INSERT INTO sqlmesh._environments VALUES ('prod', '[]')",
        // Meltano-like: its system database's tables in public.
        "CREATE TABLE public.state (state_id text PRIMARY KEY, partial_state json, completed_state json)",
        "INSERT INTO public.state VALUES ('tap-to-target', '{}', '{\"singer_state\": {}}')",
        "CREATE TABLE public.alembic_version (version_num text)",
        "INSERT INTO public.alembic_version VALUES ('6828cc5b1a4f')",
    ] {
        sqlx::query(sql).execute(&mut conn).await.expect(sql);
    }
    sqlx::query("CREATE TABLE public.runs (id int)")
        .execute(&mut conn)
        .await
        .unwrap();
    let before_sqlmesh = snapshot(&mut conn, "sqlmesh").await;
    let before_public = snapshot(&mut conn, "public").await;

    let before_statekeeper = snapshot(&mut conn, "statekeeper").await;

    for (store, kind) in [
        ("statekeeper", "upgrade"),
        ("sqlmesh", "export"),
        ("public", "janitor"),
    ] {
        job_report::record(&pool, &schema(store), "op", kind, &json!({"store": store}))
            .await
            .unwrap();
        let read = job_report::read(&pool, &schema(store), "op")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(read.report, json!({"store": store}));
        let beside = format!("{store}__statekeeper");
        assert_eq!(
            snapshot(&mut conn, &beside)
                .await
                .keys()
                .collect::<Vec<_>>(),
            ["job_reports"]
        );
    }
    assert_eq!(snapshot(&mut conn, "sqlmesh").await, before_sqlmesh);
    assert_eq!(snapshot(&mut conn, "public").await, before_public);
    assert_eq!(snapshot(&mut conn, "statekeeper").await, before_statekeeper);
    // A store's schema may not take the reserved name.
    assert!(SchemaName::new("sqlmesh__statekeeper").is_err());
}

#[tokio::test]
async fn an_export_records_its_report_and_a_failed_one_records_nothing() {
    let db = TestDb::new().await;
    let store = db.store("statekeeper").await;
    store.init(None).await.unwrap();
    support::populate_v3(&mut db.conn().await, "statekeeper").await;
    let pool = pool(&db).await;
    let dir = support::operator::temp_dir("job-reports");
    let file = dir.join("export.json.zst");
    let file_arg = file.to_str().unwrap();

    let out = statekeeper(
        &db.url,
        &[
            "state",
            "export",
            "--to",
            file_arg,
            "--compression",
            "zstd",
            "--report-id",
            "default/nightly-1",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    // The output is the JSON report, as with -o json.
    let printed: Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");

    let recorded = job_report::read(&pool, store.schema(), "default/nightly-1")
        .await
        .unwrap()
        .expect("the export's report");
    assert_eq!(recorded.kind, "export");
    assert_eq!(recorded.report, printed);
    let password = db.password();
    assert!(password.is_empty() || !recorded.report.to_string().contains(&password));
    let report: ExportReport = recorded.parse().unwrap();
    let bytes = std::fs::read(&file).unwrap();
    assert_eq!(
        report.sha256.as_deref(),
        Some(hex::encode(Sha256::digest(&bytes)).as_str())
    );
    assert_eq!(report.bytes, bytes.len() as u64);
    assert!(report.total_rows() > 0);
    assert_eq!(report.compression, statekeeper::engine::Compression::Zstd);
    assert_eq!(
        report.duration.as_millis() as u64,
        printed["durationMs"].as_u64().unwrap()
    );
    // ExportReport round-trips through its JSON.
    let again: ExportReport =
        serde_json::from_value(serde_json::to_value(&report).unwrap()).unwrap();
    assert_eq!(
        ExportReport {
            duration: Duration::ZERO,
            ..report.clone()
        },
        again
    );

    // The import of that file reports back too, with the backup it took and its manifest check.
    let out = statekeeper(
        &db.url,
        &[
            "state",
            "import",
            "--from",
            file_arg,
            "--replace",
            "--report-id",
            "import-1",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let import = job_report::read(&pool, store.schema(), "import-1")
        .await
        .unwrap()
        .expect("the import's report");
    assert_eq!(import.kind, "import");
    let import: ImportReport = import.parse().unwrap();
    assert_eq!(Some(import.sha256.as_str()), report.sha256.as_deref());
    assert!(import.manifest.is_some(), "checked against its manifest");
    assert!(import.backup.is_some(), "the replaced state's backup");

    // The environment variable names it too, and the janitor's report reads back.
    let out = Command::new(env!("CARGO_BIN_EXE_statekeeper"))
        .args(["state", "janitor", "--dry-run"])
        .env("STATEKEEPER_DATABASE_URL", &db.url)
        .env("STATEKEEPER_REPORT_ID", "janitor-1")
        .env_remove("STATEKEEPER_SCHEMA")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let janitor = job_report::read(&pool, store.schema(), "janitor-1")
        .await
        .unwrap()
        .expect("the janitor's report");
    assert_eq!(janitor.kind, "janitor");
    assert!(janitor.parse::<JanitorReport>().unwrap().dry_run);

    // A failed export records nothing: the destination cannot be written.
    let out = statekeeper(
        &db.url,
        &[
            "state",
            "export",
            "--to",
            "/dev/null/export.json",
            "--report-id",
            "failed-1",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(
        job_report::read(&pool, store.schema(), "failed-1")
            .await
            .unwrap(),
        None
    );
    // An export to stdout has no report to keep: refused before it starts.
    let out = statekeeper(
        &db.url,
        &["state", "export", "--to", "-", "--report-id", "x"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("not to stdout"), "{}", stderr(&out));
    assert!(out.stdout.is_empty());
}

/// A process killed before it records (a Pod lost mid-operation) leaves no report, so the
/// operator cannot count the operation as succeeded.
#[tokio::test]
async fn a_killed_command_leaves_no_report() {
    let db = TestDb::new().await;
    let store = db.store("statekeeper").await;
    store.init(None).await.unwrap();
    let pool = pool(&db).await;
    // Another operation holds the store's lock: the janitor waits for it, and is killed waiting.
    let holder = support::hold_store_lock(&db, "statekeeper").await;
    let mut child = Command::new(env!("CARGO_BIN_EXE_statekeeper"))
        .args([
            "state",
            "--lock-timeout",
            "120",
            "janitor",
            "--report-id",
            "killed-1",
        ])
        .env("STATEKEEPER_DATABASE_URL", &db.url)
        .env_remove("STATEKEEPER_SCHEMA")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for_lock_waiter(&pool).await;
    child.kill().unwrap(); // SIGKILL: no destructor, no goodbye.
    assert!(!child.wait().unwrap().success());
    drop(holder);
    assert_eq!(
        job_report::read(&pool, store.schema(), "killed-1")
            .await
            .unwrap(),
        None
    );
    assert!(
        !schemas(&mut db.conn().await)
            .await
            .contains(&"statekeeper__statekeeper".into())
    );
}

/// Waits until a session waits for an advisory lock (the janitor, blocked on the store's lock).
async fn wait_for_lock_waiter(pool: &sqlx::PgPool) {
    for _ in 0..300 {
        let waiting: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        if waiting {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the janitor never waited for the store's lock");
}

/// Killed at the last moment, between writing the report and committing it: still no report.
#[cfg(feature = "failpoints")]
#[tokio::test]
async fn killed_before_the_commit_leaves_no_report() {
    let db = TestDb::new().await;
    let store = db.store("statekeeper").await;
    store.init(None).await.unwrap();
    let pool = pool(&db).await;
    let out = Command::new(env!("CARGO_BIN_EXE_statekeeper"))
        .args(["state", "janitor", "--dry-run", "--report-id", "killed-2"])
        .env("STATEKEEPER_DATABASE_URL", &db.url)
        .env("STATEKEEPER_FAILPOINT", "job_report.before_commit")
        .env_remove("STATEKEEPER_SCHEMA")
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("failpoint job_report.before_commit"),
        "killed at the point: {}",
        stderr(&out)
    );
    let none: Option<job_report::JobReport> = job_report::read(&pool, store.schema(), "killed-2")
        .await
        .unwrap();
    assert_eq!(none, None);
    // The schema made in the same transaction went with it.
    assert!(
        !schemas(&mut db.conn().await)
            .await
            .contains(&"statekeeper__statekeeper".into())
    );
}
