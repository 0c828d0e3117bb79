//! Meltano system databases, on state written by the real Meltano (tests/support/meltano.rs):
//! status, backup and rollback, the exact table-level round trip, refusals, and the StateStore
//! reconciler.

mod support;

use std::process::Command;

use serde_json::{Value, json};
use statekeeper::engine::{
    Compression, ExportFormat, ExportOptions, Framework, ImportOptions, Store,
};
use support::meltano::Project;
use support::operator::{Harness, put_secret, store_for};
use support::{TestDb, snapshot};

async fn meltano_store(db: &TestDb) -> Store {
    db.store("public").await.with_framework(Framework::Meltano)
}

fn cli(url: &str, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_statekeeper"))
        .args(args)
        .env("STATEKEEPER_DATABASE_URL", url)
        .env_remove("STATEKEEPER_SCHEMA")
        .env_remove("STATEKEEPER_FRAMEWORK")
        .output()
        .unwrap()
}

/// The store's tables (not its backups), row by row.
async fn tables(db: &TestDb) -> std::collections::BTreeMap<String, Vec<String>> {
    snapshot(&mut db.conn().await, "public").await
}

fn bookmark(n: u64) -> Value {
    json!({"singer_state": {"bookmarks": {"users": {"replication_key_value": n}}}})
}

/// A Meltano system database with three state IDs, written by `meltano state set`.
async fn with_state() -> (TestDb, Project) {
    let db = TestDb::new().await;
    let project = Project::new(&db);
    for (i, id) in [
        "dev:tap-a-to-target-x",
        "dev:tap-b-to-target-x",
        "prod:tap-a-to-target-x",
    ]
    .into_iter()
    .enumerate()
    {
        project.set(id, &bookmark(i as u64 + 1));
    }
    (db, project)
}

#[tokio::test]
async fn status_reports_meltanos_revision_and_counts_as_sql_gives_them() {
    let (db, project) = with_state().await;
    let out = cli(
        &db.url,
        &["state", "--framework", "meltano", "-o", "json", "status"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut conn = db.conn().await;
    let revision: String = sqlx::query_scalar("SELECT version_num FROM public.alembic_version")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(status["framework"], "meltano");
    assert_eq!(status["schema"], "public");
    assert_eq!(status["versions"]["alembicRevision"], revision);
    for (count, sql) in [
        ("state_ids", "SELECT count(*) FROM public.state"),
        ("runs", "SELECT count(*) FROM public.runs"),
        (
            "running_runs",
            "SELECT count(*) FROM public.runs WHERE state = 'RUNNING'",
        ),
    ] {
        let expected: i64 = sqlx::query_scalar(sql).fetch_one(&mut conn).await.unwrap();
        assert_eq!(status["counts"][count], expected, "{count}");
    }
    assert_eq!(status["counts"]["state_ids"], 3);
    // A run that stopped beating 10 minutes ago is stale by Meltano's own rule.
    sqlx::query(
        "INSERT INTO public.runs (job_name, run_id, state, started_at, last_heartbeat_at, payload, payload_flags, trigger) \
         VALUES ('dev:tap-a-to-target-x', gen_random_uuid(), 'RUNNING', now() - interval '1 hour', \
                 (now() AT TIME ZONE 'UTC') - interval '10 minutes', '{}', 0, 'cli')",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let report = meltano_store(&db).await.status().await.unwrap();
    assert_eq!(report.counts["stale_runs"], 1);
    assert_eq!(report.counts["running_runs"], 1);

    // The text says what is true: the Alembic revision (the numeric version is only its
    // fingerprint), the time of the newest state update (not a count), backups by revision.
    cli_ok(&db.url, &["backup"]);
    let before_update = cli_ok(&db.url, &["status"]);
    assert!(
        before_update.contains("none recorded"),
        "Meltano records updated_at on updates only: {before_update}"
    );
    project.set("dev:tap-a-to-target-x", &bookmark(9));
    let text = cli_ok(&db.url, &["status"]);
    let fingerprint = status["currentVersion"].to_string();
    assert!(
        text.contains(&format!(
            "Meltano schema \"public\": Alembic revision {revision}"
        )),
        "{text}"
    );
    assert!(!text.contains(&fingerprint), "no fingerprint: {text}");
    let newest = text
        .lines()
        .find(|l| l.trim_start().starts_with("newest_state_update"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(newest.contains(" UTC"), "a time: {newest}");
    let backup = text.lines().last().unwrap();
    assert!(
        backup.contains(&format!("Meltano, Alembic revision {revision}")),
        "{backup}"
    );
    // Exact exports count the state IDs they hold, in the right number.
    let dir = std::env::temp_dir().join(format!("sk-meltano-status-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("exact.json");
    let exported = cli_ok(&db.url, &["export", "--to", file.to_str().unwrap()]);
    assert!(exported.contains("3 state IDs"), "{exported}");
    assert!(
        !exported.contains("sha256") || exported.contains("sha256 "),
        "{exported}"
    );
    let folder = format!("file://{}/backend", dir.display());
    let to_folder = cli_ok(
        &db.url,
        &["export", "--format", "meltano-backend", "--to", &folder],
    );
    assert!(
        to_folder.contains("3 state IDs") && !to_folder.contains("sha256"),
        "a folder has no sha256: {to_folder}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn backup_then_new_state_then_rollback_restores_every_table() {
    let (db, project) = with_state().await;
    let before = tables(&db).await;
    let out = cli(
        &db.url,
        &["state", "--framework", "meltano", "-o", "json", "backup"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let backup: Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = backup["id"].as_str().unwrap().to_owned();

    project.set("dev:tap-a-to-target-x", &bookmark(99));
    project.set("dev:tap-c-to-target-x", &bookmark(7));
    assert_ne!(tables(&db).await, before);

    let out = cli(
        &db.url,
        &[
            "state",
            "--framework",
            "meltano",
            "rollback",
            "--backup-id",
            &id,
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(tables(&db).await, before, "every table as it was backed up");
    // Meltano itself reads the restored state.
    assert_eq!(
        project.get("dev:tap-a-to-target-x")["singer_state"],
        bookmark(1)["singer_state"]
    );
    let list = project.ok(&["state", "list"]);
    assert!(!list.contains("dev:tap-c-to-target-x"), "{list}");
}

#[tokio::test]
async fn exact_exports_round_trip_a_meltano_database_bit_for_bit() {
    let (db, _project) = with_state().await;
    let source = meltano_store(&db).await;
    let options = ExportOptions {
        environments: None,
        compression: Compression::Zstd,
        format: ExportFormat::Exact,
        ..Default::default()
    };
    let (report, bytes) = source.export(Vec::new(), &options).await.unwrap();
    assert_eq!(report.rows["state"], 3);
    // A fresh system database, created by Meltano itself, then replaced by the file.
    let target_db = TestDb::new().await;
    let target_project = Project::new(&target_db);
    target_project.ok(&["state", "list"]);
    meltano_store(&target_db)
        .await
        .import(
            std::io::Cursor::new(bytes),
            &ImportOptions {
                expected_sha256: report.sha256.clone(),
                ..ImportOptions::replace()
            },
        )
        .await
        .unwrap();
    assert_eq!(tables(&target_db).await, tables(&db).await);
    assert_eq!(
        target_project.get("prod:tap-a-to-target-x")["singer_state"],
        bookmark(3)["singer_state"]
    );
}

#[tokio::test]
async fn refusals_name_the_problem_and_change_nothing() {
    // Meltano has not created its tables: NotInitialized, with what to run.
    let empty = TestDb::new().await;
    let out = cli(
        &empty.url,
        &["state", "--framework", "meltano", "status", "-o", "json"],
    );
    assert!(out.status.success());
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["initialized"], false);
    let out = cli(&empty.url, &["state", "--framework", "meltano", "backup"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("meltano upgrade database"), "{err}");
    let out = cli(&empty.url, &["state", "--framework", "meltano", "init"]);
    assert!(!out.status.success());

    // statekeeper pointed at a Meltano database: the error names the flag.
    let (db, _project) = with_state().await;
    let before = tables(&db).await;
    let out = cli(&db.url, &["state", "--schema", "public", "status"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--framework meltano"), "{err}");
    let out = cli(&db.url, &["state", "--schema", "public", "init"]);
    assert!(!out.status.success());
    assert_eq!(tables(&db).await, before, "nothing created or changed");

    // Formats a Meltano store does not read or write, refused by name; nothing changes.
    let out = cli(
        &db.url,
        &[
            "state",
            "--framework",
            "meltano",
            "export",
            "--format",
            "parquet",
            "--to",
            "-",
        ],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("parquet"));
    let out = cli(
        &db.url,
        &[
            "state",
            "--framework",
            "meltano",
            "export",
            "--format",
            "sqlmesh",
            "--to",
            "-",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("meltano-backend"),
        "{err}"
    );
    let dir = support::operator::temp_dir("meltano-refusals");
    let foreign = dir.join("statekeeper.json");
    let source = TestDb::new().await;
    let ours = source.store("sqlmesh_state").await;
    ours.init(None).await.unwrap();
    ours.export_to(
        &statekeeper::engine::Destination::parse(foreign.to_str().unwrap(), &Default::default())
            .unwrap(),
        &ExportOptions {
            format: ExportFormat::Statekeeper,
            compression: Compression::None,
            environments: None,
            ..Default::default()
        },
        |_| {},
    )
    .await
    .unwrap();
    let out = cli(
        &db.url,
        &[
            "state",
            "--framework",
            "meltano",
            "import",
            "--from",
            foreign.to_str().unwrap(),
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("statekeeper export"),
        "{err}"
    );
    // Janitor and import on a database Meltano has not set up: NotInitialized, nothing created.
    let document = dir.join("meltano.json");
    std::fs::write(
        &document,
        br#"{"dev:x": {"completed": {"a": 1}, "partial": null}}"#,
    )
    .unwrap();
    for args in [
        vec!["state", "--framework", "meltano", "janitor"],
        vec![
            "state",
            "--framework",
            "meltano",
            "import",
            "--from",
            document.to_str().unwrap(),
        ],
    ] {
        let out = cli(&empty.url, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("not initialized"),
            "{args:?}: {err}"
        );
    }
    let created: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', 'information_schema')",
    )
    .fetch_one(&mut empty.conn().await)
    .await
    .unwrap();
    assert_eq!(created, 0, "nothing created in the empty database");
    assert_eq!(tables(&db).await, before, "nothing changed");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn the_state_store_reconciler_reports_a_meltano_database() {
    let (db, _project) = with_state().await;
    let h = Harness::new();
    put_secret(&h.kube, "pg-credentials", &[("password", &db.password())]);
    let (_, stored) = h
        .reconcile(&store_for(
            &db,
            "meltano",
            json!({"framework": "meltano", "schema": null}),
        ))
        .await;
    let status = stored.status.unwrap();
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("True", "StoreReady")
    );
    assert!(
        ready.message.contains("Meltano state in schema \"public\"")
            && ready.message.contains("3 state ids"),
        "{}",
        ready.message
    );
    assert_eq!(status.framework.as_deref(), Some("meltano"));
    assert!(
        status
            .framework_versions
            .unwrap()
            .contains_key("alembicRevision")
    );
    assert_eq!(status.counts.unwrap()["state_ids"], 3);
    assert!(!h.kube.dump().contains(&db.password()));
}

#[tokio::test]
async fn our_meltano_format_export_is_what_meltano_exports_and_imports() {
    let (db, project) = with_state().await;
    // A state with a partial part too, as an interrupted run leaves it.
    project.ok(&[
        "state",
        "merge",
        "dev:tap-b-to-target-x",
        &json!({"singer_state": {"bookmarks": {"orders": {"id": 3}}}}).to_string(),
    ]);
    // Text that needs escaping, in the ID and in the state (the export copies states as stored).
    project.ok(&[
        "state",
        "merge",
        "dev:tap-ü\"q\\-to-target-x",
        &json!({"singer_state": {"bookmarks": {"naïve \"表\"": {"path": "C:\\tmp\\x", "note": "a\tb\nc", "big": 1.5e300, "deep": [[[{"k": null}]]]}}}}).to_string(),
    ]);
    let theirs: Value = serde_json::from_str(project.ok(&["state", "export"]).trim()).unwrap();
    let dir = std::env::temp_dir().join(format!("sk-meltano-export-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("state.json");
    let export = |args: &[&str]| {
        let mut all = vec![
            "state",
            "--framework",
            "meltano",
            "export",
            "--format",
            "meltano",
        ];
        all.extend_from_slice(args);
        cli(&db.url, &all)
    };
    let out = export(&["--to", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ours: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(ours, theirs, "the same document, as JSON");
    // A state written over several lines (by hand) is exported as the same JSON on one line.
    let mut conn = db.conn().await;
    sqlx::query(
        "UPDATE state SET partial_state = E'{\\n  \"a\": \"x\\\\ny\",\\r\\n  \"b\": [1,\\n 2]\\n}' WHERE state_id = 'dev:tap-b-to-target-x'",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let out = export(&["--to", "-"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.stdout.contains(&b'\n'), "one line");
    let ours: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        ours["dev:tap-b-to-target-x"]["partial"],
        json!({"a": "x\ny", "b": [1, 2]})
    );
    // A state that is not JSON is named, and no document is written.
    sqlx::query(
        "UPDATE state SET completed_state = '{\"a\": 1,' WHERE state_id = 'dev:tap-b-to-target-x'",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let broken = dir.join("broken.json");
    let out = export(&["--to", broken.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("dev:tap-b-to-target-x")
            && stderr.contains("completed_state that is not JSON"),
        "{stderr}"
    );
    assert!(!broken.exists(), "a failed export leaves no file");
    sqlx::query("DELETE FROM state WHERE state_id = 'dev:tap-b-to-target-x'")
        .execute(&mut conn)
        .await
        .unwrap();

    // The real `meltano state import` reads it into a fresh system database.
    let target = TestDb::new().await;
    let target_project = Project::new(&target);
    target_project.ok(&["state", "import", file.to_str().unwrap()]);
    let imported: Value =
        serde_json::from_str(target_project.ok(&["state", "export"]).trim()).unwrap();
    assert_eq!(imported, theirs);

    // Some state IDs: exact names and globs, as `meltano state list` takes them.
    let some = dir.join("some.json");
    let out = export(&["--state-id", "dev:*", "--to", some.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let some: Value =
        serde_json::from_slice(&std::fs::read(dir.join("some.json")).unwrap()).unwrap();
    let ids: Vec<&String> = some.as_object().unwrap().keys().collect();
    assert_eq!(
        ids,
        vec!["dev:tap-a-to-target-x", "dev:tap-ü\"q\\-to-target-x"]
    );
    let out = export(&["--state-id", "nope", "--to", "-"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("state IDs not found in the store: nope"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn we_import_meltanos_own_export_with_replace_and_merge() {
    let (_source_db, source) = with_state().await;
    let dir = std::env::temp_dir().join(format!("sk-meltano-import-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("theirs.json");
    std::fs::write(&file, source.ok(&["state", "export"])).unwrap();
    let theirs: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    let import = |url: &str, mode: &str, path: &std::path::Path| {
        cli(
            url,
            &[
                "state",
                "--framework",
                "meltano",
                "-o",
                "json",
                "import",
                mode,
                "--from",
                path.to_str().unwrap(),
            ],
        )
    };

    // Replace: the target holds exactly the file's state IDs, and Meltano reads each of them.
    let db = TestDb::new().await;
    let project = Project::new(&db);
    project.set("dev:only-here", &bookmark(42));
    let out = import(&db.url, "--replace", &file);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["format"], "meltano");
    assert!(
        report["backup"]["id"].is_string(),
        "the replaced state is kept"
    );
    assert_eq!(
        report["removed"],
        json!({"what": "state IDs", "count": 1, "names": ["dev:only-here"]}),
        "a replace says what it removed"
    );
    let after: Value = serde_json::from_str(project.ok(&["state", "export"]).trim()).unwrap();
    assert_eq!(after, theirs);
    for id in theirs.as_object().unwrap().keys() {
        assert_eq!(project.get(id), source.get(id), "{id}");
    }

    // Merge: the file's IDs overwrite theirs, the others stay, as `meltano state import` does.
    let merged_db = TestDb::new().await;
    let merged = Project::new(&merged_db);
    let reference_db = TestDb::new().await;
    let reference = Project::new(&reference_db);
    for project in [&merged, &reference] {
        project.set("dev:only-here", &bookmark(42));
        project.set("dev:tap-a-to-target-x", &bookmark(1000));
    }
    reference.ok(&["state", "import", file.to_str().unwrap()]);
    let out = import(&merged_db.url, "--merge", &file);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ours: Value = serde_json::from_str(merged.ok(&["state", "export"]).trim()).unwrap();
    let meltanos: Value = serde_json::from_str(reference.ok(&["state", "export"]).trim()).unwrap();
    assert_eq!(ours, meltanos);

    // Without --replace or --merge: a merge, as `meltano state import` without options. A file of
    // two state IDs never turns a database of many into two.
    let default_db = TestDb::new().await;
    let default = Project::new(&default_db);
    default.set("dev:only-here", &bookmark(42));
    default.set("dev:tap-a-to-target-x", &bookmark(1000));
    let out = cli(
        &default_db.url,
        &[
            "state",
            "--framework",
            "meltano",
            "import",
            "--from",
            file.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("merged: what the file holds replaced its namesakes"),
        "{text}"
    );
    let by_default: Value = serde_json::from_str(default.ok(&["state", "export"]).trim()).unwrap();
    assert_eq!(by_default, meltanos);
    // A replace says what it removed and how to undo it.
    let out = cli(
        &default_db.url,
        &[
            "state",
            "--framework",
            "meltano",
            "import",
            "--replace",
            "--from",
            file.to_str().unwrap(),
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("removed 1 state ID the file does not have (dev:only-here)")
            && text.contains("undo with: statekeeper state rollback --framework meltano"),
        "{text}"
    );
    // Stored as Meltano stores them: the same text, spelled by Python's json.dumps.
    let stored = |db: &TestDb| {
        let db = db.url.clone();
        async move {
            let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&db)
                .await
                .unwrap();
            sqlx::query_as::<_, (String, Option<String>, Option<String>)>(
                "SELECT state_id, completed_state, partial_state FROM state ORDER BY 1",
            )
            .fetch_all(&mut conn)
            .await
            .unwrap()
        }
    };
    assert_eq!(stored(&merged_db).await, stored(&reference_db).await);

    // A broken or truncated document changes nothing, and a broken state is named.
    let before = tables(&merged_db).await;
    let broken = dir.join("broken.json");
    std::fs::write(&broken, br#"{"dev:x": {"completed": [1, 2]}}"#).unwrap();
    let out = import(&merged_db.url, "--replace", &broken);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("dev:x"));
    for (document, named) in [
        (
            &br#"{"dev:y": {"completed": {"a": 1}, "extra": {}}}"#[..],
            "it has",
        ),
        (br#"{"dev:z": 5}"#, "dev:z"),
        (br#"{"dev:w": {"partial": {"a": 1,}}}"#, "not JSON"),
        (br#"{"dev:v": {}, "dev:v": {}}"#, "dev:v\\\" appears twice"),
    ] {
        std::fs::write(&broken, document).unwrap();
        let out = import(&merged_db.url, "--merge", &broken);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(named),
            "{named}: {err}"
        );
    }
    let truncated = dir.join("truncated.json");
    std::fs::write(&truncated, br#"{"dev:x": {"completed": {"a": 1}"#).unwrap();
    let out = import(&merged_db.url, "--replace", &truncated);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "one error line, no warning from an unfinished COPY: {err}"
    );
    assert_eq!(tables(&merged_db).await, before, "nothing changed");

    // Into a statekeeper store: refused, naming the framework to use.
    let other = TestDb::new().await;
    other.store("statekeeper").await.init(None).await.unwrap();
    let out = cli(
        &other.url,
        &["state", "import", "--from", file.to_str().unwrap()],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--framework meltano"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Runs the CLI against a Meltano store and returns stdout, failing the test with stderr.
fn cli_ok(url: &str, args: &[&str]) -> String {
    let mut all = vec!["state", "--framework", "meltano"];
    all.extend_from_slice(args);
    let out = cli(url, &all);
    assert!(
        out.status.success(),
        "statekeeper {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every file below `dir`, relative path → bytes.
fn files_below(dir: &std::path::Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    fn walk(
        root: &std::path::Path,
        dir: &std::path::Path,
        out: &mut std::collections::BTreeMap<String, Vec<u8>>,
    ) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let relative = path
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                out.insert(relative, std::fs::read(&path).unwrap());
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

#[tokio::test]
async fn the_meltano_backend_layout_is_read_by_meltano_and_read_back() {
    let (db, project) = with_state().await;
    project.ok(&[
        "state",
        "merge",
        "dev:tap-b-to-target-x",
        &json!({"singer_state": {"bookmarks": {"orders": {"id": 3}}}}).to_string(),
    ]);
    let theirs: Value = serde_json::from_str(project.ok(&["state", "export"]).trim()).unwrap();
    let ids = [
        "dev:tap-a-to-target-x",
        "dev:tap-b-to-target-x",
        "prod:tap-a-to-target-x",
    ];
    let dir = std::env::temp_dir().join(format!("sk-meltano-backend-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let folder = dir.join("state");
    let uri = format!("file://{}", folder.display());

    // Our export, into the folder (a trailing / is fine), is what the project's file backend reads.
    cli_ok(
        &db.url,
        &[
            "export",
            "--format",
            "meltano-backend",
            "--to",
            &format!("{uri}/"),
        ],
    );
    let files = files_below(&folder);
    assert_eq!(
        files.keys().cloned().collect::<Vec<_>>(),
        ids.iter()
            .map(|id| format!("{id}/state.json"))
            .collect::<Vec<_>>(),
        "one state.json per state ID, no lock left behind"
    );
    let on_files = project.with_state_backend(&uri, &[]);
    let listed = on_files.ok(&["state", "list"]);
    for id in ids {
        assert!(
            listed.contains(id),
            "meltano state list shows {id}: {listed}"
        );
        assert_eq!(on_files.get(id), project.get(id), "meltano state get {id}");
    }
    let from_files: Value = serde_json::from_str(on_files.ok(&["state", "export"]).trim()).unwrap();
    assert_eq!(from_files, theirs);

    // A fresh lock (a Meltano run writing that state ID) makes the export wait, then fail
    // naming it, before any file is touched.
    let lock = folder.join("prod:tap-a-to-target-x").join("lock");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    std::fs::write(&lock, format!("{now}")).unwrap();
    project.set("dev:tap-a-to-target-x", &bookmark(42));
    let before = files_below(&folder);
    let started = std::time::Instant::now();
    let out = cli(
        &db.url,
        &[
            "state",
            "--framework",
            "meltano",
            "export",
            "--format",
            "meltano-backend",
            "--meltano-lock-timeout",
            "60",
            "--meltano-lock-wait",
            "2",
            "--to",
            &uri,
        ],
    );
    let waited = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("\"prod:tap-a-to-target-x\"") && stderr.contains("locked"),
        "{stderr}"
    );
    assert!(
        waited >= std::time::Duration::from_secs(2),
        "waited {waited:?}"
    );
    assert_eq!(files_below(&folder), before, "nothing written");
    // An abandoned lock (older than the timeout) is broken, as Meltano breaks it.
    std::fs::write(&lock, format!("{}", now - 3600.0)).unwrap();
    cli_ok(
        &db.url,
        &["export", "--format", "meltano-backend", "--to", &uri],
    );
    assert!(!lock.exists(), "our own lock is released");
    assert_eq!(
        on_files.get("dev:tap-a-to-target-x"),
        project.get("dev:tap-a-to-target-x")
    );

    // State Meltano itself writes to the folder, read back into a fresh system database.
    on_files.set("new:tap-c-to-target-y", &bookmark(7));
    let target = TestDb::new().await;
    let target_project = Project::new(&target);
    target_project.ok(&["state", "list"]);
    let imported = cli_ok(
        &target.url,
        &[
            "--output",
            "json",
            "import",
            "--format",
            "meltano-backend",
            "--from",
            &uri,
        ],
    );
    let report: Value = serde_json::from_str(&imported).unwrap();
    assert_eq!(report["format"], "meltano-backend", "{report}");
    assert_eq!(report["environments"], 4, "{report}");
    let all: Value = serde_json::from_str(on_files.ok(&["state", "export"]).trim()).unwrap();
    let back: Value = serde_json::from_str(target_project.ok(&["state", "export"]).trim()).unwrap();
    assert_eq!(
        back, all,
        "the system database holds exactly the folder's state"
    );

    // A file that is not one JSON value refuses the whole import; nothing changes.
    let unchanged = tables(&target).await;
    let bad = folder.join("new:tap-c-to-target-y").join("state.json");
    std::fs::write(&bad, br#"{"completed": {}}, "smuggled": {"completed": {}}"#).unwrap();
    let out = cli(
        &target.url,
        &[
            "state",
            "--framework",
            "meltano",
            "import",
            "--format",
            "meltano-backend",
            "--from",
            &uri,
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("new:tap-c-to-target-y/state.json"),
        "{stderr}"
    );
    assert_eq!(tables(&target).await, unchanged);
    // --format takes only the one format files cannot reveal.
    let out = cli(
        &target.url,
        &[
            "state",
            "--framework",
            "meltano",
            "import",
            "--format",
            "meltano",
            "--from",
            &uri,
        ],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("recognised by their content"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_state_export_moves_a_meltano_database_into_the_backend_layout() {
    let (db, project) = with_state().await;
    let h = Harness::new();
    put_secret(&h.kube, "pg-credentials", &[("password", &db.password())]);
    h.reconcile(&store_for(
        &db,
        "meltano",
        json!({"framework": "meltano", "schema": null}),
    ))
    .await;
    let dir = support::operator::temp_dir("meltano-move");
    let uri = format!("file://{}/state/", dir.display());
    h.kube.put(
        &support::operator::export_path("to-files"),
        support::operator::state_export(
            "to-files",
            &uri,
            json!({"storeRef": {"name": "meltano"}, "format": "meltano-backend", "compression": "none"}),
        ),
    );
    let (_, export) = h.reconcile_export("to-files").await;
    let status = export.status.clone().unwrap();
    assert_eq!(status.phase.as_deref(), Some("Succeeded"), "{status:?}");
    assert_eq!(status.url.as_deref(), Some(uri.trim_end_matches('/')));
    assert_eq!(status.environments, Some(3));
    let on_files = project.with_state_backend(uri.trim_end_matches('/'), &[]);
    for id in [
        "dev:tap-a-to-target-x",
        "dev:tap-b-to-target-x",
        "prod:tap-a-to-target-x",
    ] {
        assert_eq!(on_files.get(id), project.get(id), "{id}");
    }
    assert!(
        h.event_reasons()
            .contains(&("Normal".into(), "ExportSucceeded".into()))
    );
    assert!(!h.kube.dump().contains(&db.password()));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `(id, job_name, state)` of every run, oldest first.
async fn runs(db: &TestDb) -> Vec<(i32, String, String)> {
    sqlx::query_as("SELECT id, job_name, state FROM public.runs ORDER BY id")
        .fetch_all(&mut db.conn().await)
        .await
        .unwrap()
}

/// Waits until `job` has a RUNNING run (Meltano writes it as the run starts).
async fn wait_running(db: &TestDb, job: &str) {
    for _ in 0..300 {
        let running: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM public.runs WHERE job_name = $1 AND state = 'RUNNING'",
        )
        .bind(job)
        .fetch_one(&mut db.conn().await)
        .await
        .unwrap();
        if running > 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("{job} never started running");
}

#[tokio::test]
async fn the_runs_janitor_keeps_what_meltano_reads_and_removes_the_rest() {
    let db = TestDb::new().await;
    let project = Project::new(&db).with_pipelines();
    let job = "dev:tap-tiny-to-target-tiny";
    // Two successful runs, then three failed ones, all by the real `meltano run`.
    for _ in 0..2 {
        project.ok(&["run", "tap-tiny", "target-tiny"]);
    }
    for _ in 0..3 {
        let out = project.run_with(&["run", "tap-tiny", "target-tiny"], &[("TINY_FAIL", "1")]);
        assert!(!out.status.success(), "the failing tap fails the run");
    }
    // A run whose process died (killed with its plugins); its heartbeat is then aged by ten
    // minutes, as the clock would: Meltano calls it stale.
    let stale_job = "dev:tap-slow-to-target-tiny";
    let mut killed = project.spawn(&["run", "tap-slow", "target-tiny"]);
    wait_running(&db, stale_job).await;
    support::meltano::kill_group(&mut killed);
    sqlx::query(
        "UPDATE public.runs SET started_at = started_at - interval '10 minutes', \
         last_heartbeat_at = coalesce(last_heartbeat_at, started_at) - interval '10 minutes' \
         WHERE job_name = $1",
    )
    .bind(stale_job)
    .execute(&mut db.conn().await)
    .await
    .unwrap();
    // A live run, beating while the janitor works.
    let mut live = project.spawn(&[
        "run",
        "--state-id-suffix",
        "live",
        "tap-slow",
        "target-tiny",
    ]);
    let live_job = "dev:tap-slow-to-target-tiny:live";
    wait_running(&db, live_job).await;

    let before = runs(&db).await;
    assert_eq!(before.len(), 7, "{before:?}");
    let ids: Vec<i32> = before.iter().filter(|r| r.1 == job).map(|r| r.0).collect();

    // Status counts what SQL counts.
    let status: Value =
        serde_json::from_str(&cli_ok(&db.url, &["--output", "json", "status"])).unwrap();
    let counts = &status["counts"];
    assert_eq!(
        (
            counts["runs"].as_i64(),
            counts["successful_runs"].as_i64(),
            counts["failed_runs"].as_i64(),
            counts["running_runs"].as_i64(),
            counts["stale_runs"].as_i64()
        ),
        (Some(7), Some(2), Some(3), Some(2), Some(1)),
        "{status}"
    );

    let janitor = |dry_run: bool| {
        let mut args = vec![
            "--output",
            "json",
            "janitor",
            "--keep-runs",
            "2",
            "--run-min-age",
            "0s",
            "--fail-stale-runs",
            "--batch-size",
            "1",
        ];
        if dry_run {
            args.push("--dry-run");
        }
        let report: Value = serde_json::from_str(&cli_ok(&db.url, &args)).unwrap();
        report
    };
    let tables_before = tables(&db).await;
    let dry = janitor(true);
    assert_eq!(
        tables(&db).await,
        tables_before,
        "a dry run changes nothing"
    );
    let real = janitor(false);
    for key in ["runs", "staleRunsFailed"] {
        assert_eq!(
            dry[key], real[key],
            "dry run and real run agree on {key}: {dry} {real}"
        );
    }
    // Of the tiny job: the oldest success and the oldest failure go; the newest two runs (both
    // failed) and the newest success stay. The stale run is marked failed and, the newest of its
    // job, stays; the live run stays.
    assert_eq!(
        (real["runs"].as_u64(), real["staleRunsFailed"].as_u64()),
        (Some(2), Some(1))
    );
    let after = runs(&db).await;
    let kept: Vec<i32> = after.iter().filter(|r| r.1 == job).map(|r| r.0).collect();
    assert_eq!(kept, vec![ids[1], ids[3], ids[4]], "{after:?}");
    let states: Vec<(&str, &str)> = after
        .iter()
        .filter(|r| r.1 != job)
        .map(|r| (r.1.as_str(), r.2.as_str()))
        .collect();
    assert_eq!(states, vec![(stale_job, "FAIL"), (live_job, "RUNNING")]);
    let payload: String = sqlx::query_scalar("SELECT payload FROM public.runs WHERE job_name = $1")
        .bind(stale_job)
        .fetch_one(&mut db.conn().await)
        .await
        .unwrap();
    assert!(
        payload.contains("No heartbeat recorded for 5 minutes"),
        "{payload}"
    );

    // Idempotent.
    let again = janitor(false);
    assert_eq!(
        (again["runs"].as_u64(), again["staleRunsFailed"].as_u64()),
        (Some(0), Some(0))
    );
    support::meltano::kill_group(&mut live);

    // Meltano goes on as before: the job runs from its state, which no run removal touched.
    project.ok(&["run", "tap-tiny", "target-tiny"]);
    assert_eq!(
        project.get(job),
        json!({"singer_state": {"bookmarks": {"users": {"id": 2}}}})
    );

    // Scheduled through the StateStore: the same janitor, reported in status and an Event.
    let h = Harness::new();
    put_secret(&h.kube, "pg-credentials", &[("password", &db.password())]);
    let mut object = store_for(
        &db,
        "meltano",
        json!({"framework": "meltano", "schema": null,
               "janitor": {"schedule": "0 3 * * *", "keepRuns": 1, "runMinAge": "0s"}}),
    );
    object["metadata"]["creationTimestamp"] = json!("2026-11-21T00:30:00Z");
    support::operator::at(&h.ctx, "2026-11-21T03:00:30Z");
    let (_, stored) = h.reconcile(&object).await;
    let janitor = stored.status.unwrap().janitor.unwrap();
    let result = janitor.last_result.expect("a run");
    // The tiny job keeps its newest run (a success, also its newest success); the three older
    // go. The stale job's one run and the killed live run (still RUNNING until Meltano's stale
    // check) stay.
    assert_eq!(result.runs, 3, "{result:?}");
    assert!(
        h.event_reasons()
            .contains(&("Normal".into(), "JanitorSucceeded".into())),
        "{:?}",
        h.event_reasons()
    );
    assert!(!h.kube.dump().contains(&db.password()));
}

/// `statekeeper state run --framework meltano ARGS` in the project, with nothing of the database
/// in the environment but statekeeper's URL: Meltano finds it from the MELTANO_DATABASE_URI and
/// PG* variables statekeeper hands the command (as a runner Job's), with `meltano` on PATH.
fn run_in_project(db: &TestDb, project: &Project, args: &[&str]) -> std::process::Output {
    let meltano_dir = std::path::Path::new(support::meltano::meltano_bin())
        .parent()
        .unwrap()
        .to_owned();
    let path = std::env::join_paths(std::iter::once(meltano_dir).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))
    .unwrap();
    Command::new(env!("CARGO_BIN_EXE_statekeeper"))
        .args(["state", "--framework", "meltano", "run"])
        .args(args)
        .current_dir(&project.dir)
        .env("STATEKEEPER_DATABASE_URL", &db.url)
        .env("PATH", path)
        .env("MELTANO_SEND_ANONYMOUS_USAGE_STATS", "false")
        .env_remove("MELTANO_DATABASE_URI")
        .env_remove("STATEKEEPER_SCHEMA")
        .env_remove("PGHOST")
        .env_remove("PGPASSWORD")
        .output()
        .unwrap()
}

/// Meltano's Alembic revision in a database, if it has one.
async fn alembic_revision(db: &TestDb) -> Option<String> {
    sqlx::query_scalar("SELECT version_num FROM public.alembic_version")
        .fetch_optional(&mut db.conn().await)
        .await
        .ok()
        .flatten()
}

/// `state run --framework meltano -- meltano upgrade database` migrates the managed PostgreSQL
/// database, not a SQLite file of the project's (Meltano reads MELTANO_DATABASE_URI, not PG*).
#[tokio::test]
async fn meltano_commands_under_state_run_reach_the_managed_database() {
    let (reference, _) = with_state().await;
    let head = alembic_revision(&reference)
        .await
        .expect("Meltano's revision");
    let db = TestDb::new().await;
    let project = Project::new(&db);
    // `meltano init` made one; Meltano would migrate it again without MELTANO_DATABASE_URI.
    let sqlite = project.dir.join(".meltano/meltano.db");
    let _ = std::fs::remove_file(&sqlite);
    let out = run_in_project(&db, &project, &["--", "meltano", "upgrade", "database"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        alembic_revision(&db).await.as_deref(),
        Some(head.as_str()),
        "Meltano migrated the managed database"
    );
    assert!(!sqlite.exists(), "and no SQLite file");
    // In a schema of its own (`--schema`; Meltano creates tables, not schemas): its tables go
    // there.
    sqlx::query("CREATE SCHEMA meltano_sys")
        .execute(&mut db.conn().await)
        .await
        .unwrap();
    let out = run_in_project(
        &db,
        &project,
        &[
            "--schema",
            "meltano_sys",
            "--",
            "meltano",
            "upgrade",
            "database",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let revision: Option<String> =
        sqlx::query_scalar("SELECT version_num FROM meltano_sys.alembic_version")
            .fetch_optional(&mut db.conn().await)
            .await
            .unwrap();
    assert_eq!(revision.as_deref(), Some(head.as_str()));
}

#[tokio::test]
async fn meltano_upgrade_database_runs_backed_up_and_a_failure_is_restored() {
    let (db, project) = with_state().await;
    let store = meltano_store(&db).await;
    let before = tables(&db).await;

    // The real `meltano upgrade database`, backed up first; the database is already current.
    let out = run_in_project(
        &db,
        &project,
        &[
            "--backup",
            "--",
            support::meltano::meltano_bin(),
            "upgrade",
            "database",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        store.backups().await.unwrap().len(),
        1,
        "backed up before the command"
    );
    assert_eq!(tables(&db).await, before);

    // A command that changes state through Meltano and then fails: every table as before.
    let script = format!(
        "{} state clear --force dev:tap-a-to-target-x && exit 3",
        support::meltano::meltano_bin()
    );
    let out = run_in_project(&db, &project, &["--backup", "--", "sh", "-c", &script]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(
        stdout.contains("exit status 3") && stdout.contains("restored backup"),
        "{stdout}"
    );
    assert_eq!(tables(&db).await, before, "restored from the backup");
    assert_eq!(project.get("dev:tap-a-to-target-x"), bookmark(1));

    // As a StateMigration: a Job running `meltano upgrade database` by default, with the
    // connection as PG* variables (the password by reference), backed up first.
    use support::operator::{job_path, migration_path, store_path};
    let h = Harness::new();
    put_secret(&h.kube, "pg-credentials", &[("password", &db.password())]);
    h.kube.put(
        &store_path("analytics"),
        store_for(
            &db,
            "analytics",
            json!({"framework": "meltano", "schema": null}),
        ),
    );
    h.kube.put(
        &migration_path("upgrade"),
        support::operator::state_migration(
            "upgrade",
            "2026-11-27T10:00:00Z",
            json!({"upgrade": {"runner": {
                "image": "ghcr.io/acme/analytics-meltano:4.5.0",
                "runAsUser": 1000
            }}}),
        ),
    );
    let (_, m) = h.reconcile_migration("upgrade").await;
    let status = m.status.clone().unwrap();
    assert_eq!(
        status.phase.as_deref(),
        Some("Running"),
        "{:?}",
        status.message
    );
    assert!(status.backup_id.is_some());
    let job = h
        .kube
        .get(&job_path("upgrade-upgrade"))
        .expect("the Job exists");
    let container = &job["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        container["command"],
        json!(["meltano", "upgrade", "database"])
    );
    let env = container["env"].as_array().unwrap();
    assert!(
        env.iter()
            .any(|e| e["name"] == "MELTANO_DATABASE_URI" && e["value"] == "postgresql+psycopg://"),
        "Meltano is pointed at the managed database: {env:?}"
    );
    for name in ["PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGPASSWORD"] {
        assert!(env.iter().any(|e| e["name"] == name), "{name} in {env:?}");
    }
    assert!(!job.to_string().contains(&db.password()));
}

#[tokio::test]
async fn the_meltano_backend_layout_on_s3_is_read_by_meltanos_s3_backend() {
    let bucket = support::s3::bucket().await;
    // Meltano's own S3 backend (boto3) reads it.
    let meltano = [
        (
            "MELTANO_STATE_BACKEND_S3_ENDPOINT_URL",
            support::s3::endpoint(),
        ),
        (
            "MELTANO_STATE_BACKEND_S3_AWS_ACCESS_KEY_ID",
            "statekeeper-test",
        ),
        (
            "MELTANO_STATE_BACKEND_S3_AWS_SECRET_ACCESS_KEY",
            support::s3::SECRET_ACCESS_KEY,
        ),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ];
    backend_layout_round_trip(
        &format!("s3://{bucket}/prod"),
        &support::s3::options(),
        &meltano,
        async || support::s3::keys(&bucket).await,
        support::s3::SECRET_ACCESS_KEY,
    )
    .await;
}

#[tokio::test]
async fn the_meltano_backend_layout_on_gcs_is_read_by_meltanos_gcs_backend() {
    let bucket = support::gcs::bucket().await;
    // Meltano's own GCS backend (google-cloud-storage, the JSON API) reads it; Google's client
    // libraries reach an emulator through STORAGE_EMULATOR_HOST, with anonymous credentials.
    let meltano = [("STORAGE_EMULATOR_HOST", support::gcs::endpoint())];
    backend_layout_round_trip(
        &format!("gs://{bucket}/prod"),
        &support::gcs::options(),
        &meltano,
        async || support::gcs::keys(&bucket).await,
        support::gcs::PRIVATE_KEY,
    )
    .await;
}

/// Three state IDs written by the real Meltano are exported by the CLI in the meltano-backend
/// layout to `uri` (an object store prefix, with the `--storage-option`s `options`): one
/// `<state_id>/state.json` object each (`keys` lists the bucket) and no lock left. Meltano's own
/// backend for that store (configured by `meltano`) reads every state back, and what Meltano
/// writes there is imported into a fresh system database. `secret` never shows.
async fn backend_layout_round_trip(
    uri: &str,
    options: &std::collections::BTreeMap<String, String>,
    meltano: &[(&str, &str)],
    keys: impl AsyncFn() -> Vec<String>,
    secret: &str,
) {
    let (db, project) = with_state().await;
    let options: Vec<String> = options.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let with_options = |args: &[&str]| {
        let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        for option in &options {
            all.push("--storage-option".into());
            all.push(option.clone());
        }
        all
    };
    let args = with_options(&["export", "--format", "meltano-backend", "--to", uri]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = cli_ok(&db.url, &args);
    assert!(!out.contains(secret));
    let ids = [
        "dev:tap-a-to-target-x",
        "dev:tap-b-to-target-x",
        "prod:tap-a-to-target-x",
    ];
    assert_eq!(
        keys().await,
        ids.iter()
            .map(|id| format!("prod/{id}/state.json"))
            .collect::<Vec<_>>(),
        "one object per state ID, no lock left behind"
    );

    let on_backend = project.with_state_backend(uri, meltano);
    let listed = on_backend.ok(&["state", "list"]);
    for id in ids {
        assert!(listed.contains(id), "{listed}");
        assert_eq!(on_backend.get(id), project.get(id), "{id}");
    }

    // What Meltano writes there comes back into a fresh system database.
    on_backend.set("new:tap-c-to-target-y", &bookmark(9));
    let target = TestDb::new().await;
    let target_project = Project::new(&target);
    target_project.ok(&["state", "list"]);
    let args = with_options(&[
        "import",
        "--format",
        "meltano-backend",
        "--from",
        &format!("{uri}/"),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = cli_ok(&target.url, &args);
    assert!(!out.contains(secret));
    let all: Value = serde_json::from_str(on_backend.ok(&["state", "export"]).trim()).unwrap();
    let back: Value = serde_json::from_str(target_project.ok(&["state", "export"]).trim()).unwrap();
    assert_eq!(back, all);
    assert_eq!(back.as_object().unwrap().len(), 4);
}
