//! SQLMesh state stores, on state written by the real SQLMesh (tests/support/sqlmesh.rs): status,
//! backup and rollback, the SQLMesh format both ways against SQLMesh's own export and import,
//! exact round trips, refusals, a rollback racing a real `sqlmesh plan`, and the reconcilers.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use sqlx::Row;
use statekeeper::engine::{
    Compression, Destination, Error, ExportFormat, ExportOptions, Framework, ImportMode,
    ImportOptions, Store,
};
use support::operator::{Harness, at, export_path, put_secret, state_export, store_for};
use support::sqlmesh::{DEV_CHANGE, planned, sqlmesh_bin, sqlmesh_state, sqlmesh_version};
use support::{TestDb, snapshot};

async fn sqlmesh_store(db: &TestDb) -> Store {
    db.store("sqlmesh").await.with_framework(Framework::Sqlmesh)
}

fn scratch_file(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sk-sqlmesh-files-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

async fn export_file(store: &Store, path: &Path, format: ExportFormat, environments: &[&str]) {
    let destination = Destination::parse(&path.to_string_lossy(), &Default::default()).unwrap();
    let _ = std::fs::remove_file(path);
    store
        .export_to(
            &destination,
            &ExportOptions {
                environments: (!environments.is_empty())
                    .then(|| environments.iter().map(|e| e.to_string()).collect()),
                compression: Compression::None,
                format,
            },
            |_| {},
        )
        .await
        .unwrap();
}

async fn import_file(store: &Store, path: &Path, mode: ImportMode) -> Result<(), Error> {
    let file = tokio::fs::File::open(path).await.unwrap();
    store
        .import(
            file,
            &ImportOptions {
                mode,
                expected_sha256: None,
                ..Default::default()
            },
        )
        .await
        .map(|_| ())
}

/// A SQLMesh export as SQLMesh reads it: snapshots by id, environments by name, no timestamp.
fn normalized(path: &Path) -> Value {
    let mut doc: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    doc["metadata"].as_object_mut().unwrap().remove("timestamp");
    let mut snapshots = doc["snapshots"].as_array().unwrap().clone();
    snapshots.sort_by_key(|s| format!("{}{}", s["name"], s["fingerprint"]));
    doc["snapshots"] = Value::Array(snapshots);
    doc
}

/// Fails with the rows that differ, table by table, unless both hold the same SQLMesh state.
async fn assert_same_state(a: &TestDb, b: &TestDb) {
    let (left, right) = (sqlmesh_state(&a.url).await, sqlmesh_state(&b.url).await);
    let mut differences = Vec::new();
    for (table, rows) in &left {
        let other = &right[table];
        let only = |x: &Vec<String>, y: &Vec<String>| {
            x.iter()
                .filter(|r| !y.contains(r))
                .cloned()
                .collect::<Vec<_>>()
        };
        let (missing, extra) = (only(rows, other), only(other, rows));
        if !missing.is_empty() || !extra.is_empty() || rows.len() != other.len() {
            differences.push(format!(
                "{table}: {} vs {} rows\n  only left: {missing:?}\n  only right: {extra:?}",
                rows.len(),
                other.len()
            ));
        }
    }
    assert!(differences.is_empty(), "{}", differences.join("\n"));
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

#[tokio::test]
async fn status_reports_sqlmesh_versions_and_counts_and_refuses_what_sqlmesh_owns() {
    let (db, _project) = planned().await;
    let store = sqlmesh_store(&db).await;
    let status = store.status().await.unwrap();
    assert!(status.initialized);
    assert_eq!(status.framework, Framework::Sqlmesh);
    let mut conn = db.conn().await;
    let versions = sqlx::query("SELECT * FROM sqlmesh._versions")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        status.current_version,
        versions.get::<i32, _>("schema_version")
    );
    assert_eq!(status.versions["sqlmeshVersion"], sqlmesh_version());
    assert_eq!(
        status.versions["sqlglotVersion"],
        versions.get::<String, _>("sqlglot_version")
    );
    assert_eq!(status.latest_version, None);
    for (name, sql) in [
        ("snapshots", "SELECT count(*) FROM sqlmesh._snapshots"),
        ("environments", "SELECT count(*) FROM sqlmesh._environments"),
        (
            "expired_environments",
            "SELECT count(*) FROM sqlmesh._environments WHERE expiration_ts <= extract(epoch FROM now()) * 1000",
        ),
        ("intervals", "SELECT count(*) FROM sqlmesh._intervals"),
        (
            "environment_statements",
            "SELECT count(*) FROM sqlmesh._environment_statements",
        ),
        (
            "auto_restatements",
            "SELECT count(*) FROM sqlmesh._auto_restatements",
        ),
    ] {
        let expected: i64 = sqlx::query_scalar(sql).fetch_one(&mut conn).await.unwrap();
        assert_eq!(status.counts[name], expected, "{name}");
    }
    assert_eq!(status.counts["environments"], 3, "prod, dev and dev_fwd");
    assert!(status.counts["snapshots"] >= 6);

    // SQLMesh owns its tables: no init, upgrade or janitor of ours.
    let refused = store.init(None).await.unwrap_err();
    assert_eq!(refused.reason(), "UnsupportedOperation");
    assert!(
        refused
            .to_string()
            .contains("`sqlmesh plan` or `sqlmesh migrate`"),
        "{refused}"
    );
    assert!(
        store
            .upgrade(None)
            .await
            .unwrap_err()
            .to_string()
            .contains("sqlmesh migrate")
    );
    let janitor = store
        .janitor(&Default::default(), |_| {})
        .await
        .unwrap_err();
    assert!(janitor.to_string().contains("sqlmesh janitor"), "{janitor}");

    // Pointed at the other framework's tables, commands name the flag to use.
    let wrong = db.store("sqlmesh").await.status().await.unwrap_err();
    assert_eq!(wrong.reason(), "WrongFramework");
    assert!(wrong.to_string().contains("--framework sqlmesh"), "{wrong}");
    // On SQLMesh's database, a command without --framework acts on nothing: status and init name
    // the flag to add (a `statekeeper` schema created here would protect nothing), and a
    // schema that does not exist is an error that says where the state is.
    let default = db.store("statekeeper").await;
    let wrong = default.status().await.unwrap_err();
    assert_eq!(wrong.reason(), "WrongFramework");
    assert!(
        wrong
            .to_string()
            .contains("SQLMesh state in schema \"sqlmesh\"")
            && wrong.to_string().contains("--framework sqlmesh"),
        "{wrong}"
    );
    for args in [
        vec!["state", "status"],
        vec!["state", "init"],
        vec!["state", "run", "--backup", "--", "true"],
        vec!["state", "backup"],
    ] {
        let out = cli(&db.url, &args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("use --framework sqlmesh"), "{args:?}: {err}");
    }
    let refused = default.init(None).await.unwrap_err();
    assert!(
        refused.to_string().contains("--framework sqlmesh")
            && refused.to_string().contains("state init --force"),
        "{refused}"
    );
    let out = cli(
        &db.url,
        &[
            "state",
            "status",
            "--framework",
            "sqlmesh",
            "--schema",
            "sqlmsh",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "a typo is not an empty store");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("schema \"sqlmsh\" does not exist")
            && err.contains("SQLMesh state in schema \"sqlmesh\" (--framework sqlmesh)"),
        "{err}"
    );
    assert!(
        !support::schemas(&mut db.conn().await)
            .await
            .iter()
            .any(|s| s.starts_with("statekeeper") || s.starts_with("sqlmsh")),
        "nothing was created"
    );
    // Asked for explicitly, statekeeper's own schema can live beside SQLMesh's.
    let out = cli(&db.url, &["state", "init", "--schema", "state", "--force"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let wrong = db
        .store("state")
        .await
        .with_framework(Framework::Sqlmesh)
        .status()
        .await
        .unwrap_err();
    assert!(
        wrong.to_string().contains("--framework statekeeper"),
        "{wrong}"
    );

    // The CLI: the schema defaults to `sqlmesh` with --framework sqlmesh.
    let out = cli(
        &db.url,
        &["state", "status", "--framework", "sqlmesh", "-o", "json"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["framework"], "sqlmesh");
    assert_eq!(json["versions"]["sqlmeshVersion"], sqlmesh_version());
    let out = cli(&db.url, &["state", "status", "--schema", "sqlmesh"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--framework sqlmesh"));

    // A database where SQLMesh has created nothing yet.
    let empty = TestDb::new().await;
    let missing = sqlmesh_store(&empty).await.backup().await.unwrap_err();
    assert_eq!(missing.reason(), "NotInitialized");
    assert!(missing.to_string().contains("sqlmesh plan"), "{missing}");
}

#[tokio::test]
async fn backup_then_a_new_plan_then_rollback_restores_every_table() {
    let (db, project) = planned().await;
    let out = cli(
        &db.url,
        &["state", "backup", "--framework", "sqlmesh", "-o", "json"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let backup: Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = backup["id"].as_str().unwrap().to_owned();
    assert_eq!(backup["framework"], "sqlmesh");
    assert_eq!(backup["reason"], "manual");
    let mut conn = db.conn().await;
    let before = snapshot(&mut conn, "sqlmesh").await;
    assert_eq!(
        before.len(),
        6,
        "all six SQLMesh tables: {:?}",
        before.keys()
    );

    // A real plan changes prod.
    let (file, from, to) = DEV_CHANGE;
    project.edit(file, from, to);
    project.plan("prod", &[]);
    assert_ne!(snapshot(&mut conn, "sqlmesh").await, before);

    let out = cli(
        &db.url,
        &[
            "state",
            "rollback",
            "--framework",
            "sqlmesh",
            "--backup-id",
            &id,
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("--framework sqlmesh"));
    assert_eq!(
        snapshot(&mut conn, "sqlmesh").await,
        before,
        "every table equals the backup"
    );

    // SQLMesh sees the old state: with the old model, prod has nothing to do.
    project.edit(file, to, from);
    let planned = project.plan("prod", &[]);
    assert!(planned.contains("No changes to plan"), "{planned}");

    let backups = sqlmesh_store(&db).await.backups().await.unwrap();
    let reasons: Vec<&str> = backups.iter().map(|b| b.reason.as_str()).collect();
    assert_eq!(reasons, ["manual", "pre-rollback"]);
    assert!(backups.iter().all(|b| b.framework == Framework::Sqlmesh));
}

#[tokio::test]
async fn our_sqlmesh_export_imports_into_sqlmesh_like_its_own() {
    let (db, project) = planned().await;
    let store = sqlmesh_store(&db).await;
    let ours = scratch_file("ours.json");
    let theirs = scratch_file("theirs.json");
    export_file(&store, &ours, ExportFormat::Sqlmesh, &[]).await;
    project.export(&theirs, &[]);

    let a = TestDb::new().await;
    project.copy_for(&a).import(&ours, true);
    let b = TestDb::new().await;
    project.copy_for(&b).import(&theirs, true);
    assert_same_state(&a, &b).await;

    // One environment, as `sqlmesh state export --environment` chooses it.
    let ours_dev = scratch_file("ours-dev.json");
    let theirs_dev = scratch_file("theirs-dev.json");
    export_file(&store, &ours_dev, ExportFormat::Sqlmesh, &["dev_fwd"]).await;
    project.export(&theirs_dev, &["dev_fwd"]);
    let ids = |path: &Path| {
        let doc = normalized(path);
        let snapshots: Vec<String> = doc["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| format!("{} {}", s["name"], s["fingerprint"]))
            .collect();
        (
            snapshots,
            doc["environments"].clone(),
            doc["versions"].clone(),
        )
    };
    assert_eq!(ids(&ours_dev), ids(&theirs_dev));

    // Lists that are not what SQLMesh writes: a missing list of snapshots reads as empty, and a
    // list that is not one, or not JSON, is named and fails the export.
    let mut conn = db.conn().await;
    let set = |list: Option<&'static str>| {
        sqlx::query("UPDATE sqlmesh._environments SET promoted_snapshot_ids = $1, snapshots = NULL WHERE name = 'dev_fwd'")
            .bind(list)
    };
    set(Some("  null")).execute(&mut conn).await.unwrap();
    let odd = scratch_file("odd.json");
    export_file(&store, &odd, ExportFormat::Sqlmesh, &["dev_fwd"]).await;
    let doc = normalized(&odd);
    let environment = &doc["environments"]["dev_fwd"]["environment"];
    assert_eq!(environment["snapshots"], serde_json::json!([]));
    assert!(
        environment.get("promoted_snapshot_ids").is_none(),
        "{environment}"
    );
    for (list, reason) in [
        (r#"{"a": 1}"#, "is not a list"),
        (r#"[{"name": "a"},"#, "EOF while parsing"),
    ] {
        set(Some(list)).execute(&mut conn).await.unwrap();
        let destination = Destination::parse(&odd.to_string_lossy(), &Default::default()).unwrap();
        let err = store
            .export_to(
                &destination,
                &ExportOptions {
                    environments: Some(vec!["dev_fwd".into()]),
                    compression: Compression::None,
                    format: ExportFormat::Sqlmesh,
                },
                |_| {},
            )
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("dev_fwd")
                && err.contains("promoted_snapshot_ids")
                && err.contains(reason),
            "{err}"
        );
    }
}

#[tokio::test]
async fn sqlmesh_exports_import_exactly_and_merge_like_sqlmesh() {
    let (_source, project) = planned().await;
    let file = scratch_file("replace.json");
    project.export(&file, &[]);

    // Replace into a store SQLMesh created and left empty.
    let target = TestDb::new().await;
    let target_project = project.copy_for(&target);
    target_project.ok(&["migrate"]);
    let store = sqlmesh_store(&target).await;
    let empty = sqlmesh_state(&target.url).await;
    import_file(&store, &file, ImportMode::Replace)
        .await
        .unwrap();
    // The store holds exactly the file's state: what SQLMesh's own import of it holds.
    let reference = TestDb::new().await;
    project.copy_for(&reference).import(&file, true);
    assert_same_state(&target, &reference).await;
    let again = scratch_file("replace-again.json");
    target_project.export(&again, &[]);
    assert_eq!(normalized(&again), normalized(&file));
    let plan = target_project.plan("prod", &[]);
    assert!(plan.contains("No changes to plan"), "{plan}");
    // The import kept a backup: rollback undoes it.
    store.rollback(None).await.unwrap();
    assert_eq!(sqlmesh_state(&target.url).await, empty);

    // Merge a one-environment export: ours and SQLMesh's give the same state.
    let (file, from, _) = DEV_CHANGE;
    project.edit(file, from, "WHERE revenue > 30");
    project.plan("dev_merge", &[]);
    let one = scratch_file("merge.json");
    project.export(&one, &["dev_merge"]);
    let (ours_db, _) = planned().await;
    let (theirs_db, theirs_project) = planned().await;
    import_file(&sqlmesh_store(&ours_db).await, &one, ImportMode::Merge)
        .await
        .unwrap();
    theirs_project.import(&one, false);
    assert_same_state(&ours_db, &theirs_db).await;
    let merged = sqlmesh_state(&ours_db.url).await;
    assert!(
        merged["_environments"]
            .iter()
            .any(|e| e.contains("\"dev_merge\"")),
        "the merged environment is there"
    );
    assert_eq!(merged["_environments"].len(), 4, "the others stay");
}

#[tokio::test]
async fn exact_exports_round_trip_sqlmesh_and_statekeeper_stores_bit_for_bit() {
    let (db, project) = planned().await;
    let file = scratch_file("exact-sqlmesh.json");
    export_file(&sqlmesh_store(&db).await, &file, ExportFormat::Exact, &[]).await;
    let target = TestDb::new().await;
    project.copy_for(&target).ok(&["migrate"]);
    import_file(&sqlmesh_store(&target).await, &file, ImportMode::Replace)
        .await
        .unwrap();
    assert_eq!(
        snapshot(&mut target.conn().await, "sqlmesh").await,
        snapshot(&mut db.conn().await, "sqlmesh").await
    );

    // statekeeper's own schema, history tables and ledger included.
    let source = TestDb::new().await;
    let store = source.store("state").await;
    store.init(None).await.unwrap();
    let mut conn = source.conn().await;
    support::populate_v1(&mut conn, "state").await;
    support::populate_v3(&mut conn, "state").await;
    let file = scratch_file("exact-state.json");
    export_file(&store, &file, ExportFormat::Exact, &[]).await;
    let target = TestDb::new().await;
    let copy = target.store("state").await;
    copy.init(None).await.unwrap();
    import_file(&copy, &file, ImportMode::Replace)
        .await
        .unwrap();
    let mut before = snapshot(&mut conn, "state").await;
    let mut after = snapshot(&mut target.conn().await, "state").await;
    for history in ["plan_runs", "reconcile_events", "state_operation_events"] {
        assert!(!after[history].is_empty(), "{history} came along");
    }
    // The import records itself in the migration history, after the file's own rows.
    let events = |s: &mut std::collections::BTreeMap<String, Vec<String>>| {
        s.remove("state_migration_events").unwrap()
    };
    let (source_events, target_events) = (events(&mut before), events(&mut after));
    assert_eq!(before, after, "every other table is equal, row for row");
    assert_eq!(target_events.len(), source_events.len() + 1);
    assert!(
        source_events.iter().all(|e| target_events.contains(e)),
        "the source's migration history is kept"
    );
    // Merging an exact export is refused: it restores whole stores.
    let err = import_file(&copy, &file, ImportMode::Merge)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("--replace"), "{err}");
}

#[tokio::test]
async fn bad_files_are_refused_and_change_nothing() {
    let (db, project) = planned().await;
    let file = scratch_file("good.json");
    project.export(&file, &[]);
    let good: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    // Written with "metadata" and "versions" first, as every export is.
    let edited = |name: &str, edit: &dyn Fn(&mut Value)| {
        let mut doc = good.clone();
        edit(&mut doc);
        let text = format!(
            "{{\"metadata\":{},\"versions\":{},\"snapshots\":{},\"environments\":{}}}",
            doc["metadata"], doc["versions"], doc["snapshots"], doc["environments"]
        );
        let path = scratch_file(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    // A list element of an environment that is not JSON: an escape JSON does not have.
    let bad_element = {
        let path = edited("bad-element.json", &|_| {});
        let text = std::fs::read_to_string(&path).unwrap();
        let lists = text.find("\"environments\":").unwrap();
        let at = lists + text[lists..].find("\"snapshots\":[").unwrap() + "\"snapshots\":[".len();
        std::fs::write(&path, format!("{}\"\\q\",{}", &text[..at], &text[at..])).unwrap();
        path
    };
    let local = scratch_file("local.json");
    project.ok(&[
        "state",
        "export",
        "--local",
        "-o",
        &local.to_string_lossy(),
        "--no-confirm",
    ]);
    let truncated = scratch_file("truncated.json");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let statekeeper_file = scratch_file("statekeeper.json");
    {
        let other = TestDb::new().await;
        let store = other.store("state").await;
        store.init(None).await.unwrap();
        export_file(&store, &statekeeper_file, ExportFormat::Statekeeper, &[]).await;
    }

    let store = sqlmesh_store(&db).await;
    let mut conn = db.conn().await;
    let before = snapshot(&mut conn, "sqlmesh").await;
    let cases: Vec<(&str, PathBuf, Option<String>, &str)> = vec![
        (
            "older schema version",
            edited("schema.json", &|d| {
                d["versions"]["schema_version"] = json!(101)
            }),
            None,
            "schema version 101",
        ),
        (
            "other SQLMesh minor version",
            edited("minor.json", &|d| {
                d["versions"]["sqlmesh_version"] = json!("0.235.0")
            }),
            None,
            "SQLMesh 0.235.0",
        ),
        ("not importable (--local)", local, None, "not importable"),
        ("truncated", truncated, None, "truncated or corrupt"),
        (
            "wrong sha256",
            file.clone(),
            Some("0".repeat(64)),
            "checksum mismatch",
        ),
        (
            "a statekeeper export",
            statekeeper_file,
            None,
            "--framework statekeeper",
        ),
        (
            "a snapshot twice",
            edited("twice.json", &|d| {
                let first = d["snapshots"][0].clone();
                d["snapshots"].as_array_mut().unwrap().push(first);
            }),
            None,
            "already exists",
        ),
        (
            "a snapshot without a fingerprint",
            edited("no-fingerprint.json", &|d| {
                d["snapshots"][0]
                    .as_object_mut()
                    .unwrap()
                    .remove("fingerprint");
            }),
            None,
            "no \"fingerprint\"",
        ),
        (
            "an environment's list element that is not JSON",
            bad_element,
            None,
            "an element of snapshots is not valid JSON",
        ),
    ];
    for (name, path, sha, expected) in cases {
        let file = tokio::fs::File::open(&path).await.unwrap();
        let err = store
            .import(
                file,
                &ImportOptions {
                    mode: ImportMode::Replace,
                    expected_sha256: sha,
                    ..Default::default()
                },
            )
            .await
            .unwrap_err();
        assert_eq!(err.reason(), "InvalidExport", "{name}: {err}");
        assert!(err.to_string().contains(expected), "{name}: {err}");
        assert_eq!(
            snapshot(&mut conn, "sqlmesh").await,
            before,
            "{name} changed the store"
        );
    }
    assert!(
        store.backups().await.unwrap().is_empty(),
        "no backup left behind"
    );
    let schema_hint = import_file(&store, &scratch_file("schema.json"), ImportMode::Replace)
        .await
        .unwrap_err();
    assert!(
        schema_hint.to_string().contains("sqlmesh migrate")
            && schema_hint.to_string().contains("102"),
        "{schema_hint}"
    );

    // Into a database where SQLMesh has created nothing: refused, nothing created.
    let empty = TestDb::new().await;
    let err = import_file(&sqlmesh_store(&empty).await, &file, ImportMode::Replace)
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "NotInitialized", "{err}");
    assert!(
        !support::schemas(&mut empty.conn().await)
            .await
            .contains(&"sqlmesh".to_owned())
    );
}

#[tokio::test]
async fn a_rollback_racing_a_real_sqlmesh_plan_waits_or_is_busy_and_never_tears_state() {
    let (db, project) = planned().await;
    let store = sqlmesh_store(&db)
        .await
        .with_lock_timeout(Duration::from_millis(300));
    let backup = store.backup().await.unwrap();
    let (file, from, to) = DEV_CHANGE;
    project.edit(file, from, to);
    let dir = project.dir.clone();
    let plan = std::thread::spawn(move || {
        Command::new(sqlmesh_bin())
            .args(["plan", "dev_busy", "--auto-apply", "--no-prompts"])
            .current_dir(dir)
            .output()
            .unwrap()
    });
    let (mut restored, mut busy) = (0, 0);
    while !plan.is_finished() {
        match store.rollback(Some(&backup.id)).await {
            Ok(_) => restored += 1,
            Err(Error::Busy { .. }) => busy += 1,
            Err(other) => panic!("a rollback failed otherwise than busy: {other}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let plan = plan.join().unwrap();
    assert!(restored + busy > 0, "rollbacks ran while SQLMesh planned");

    // Whatever the interleaving, the state is whole: every environment's snapshots exist, and
    // SQLMesh itself reads all of it.
    let mut conn = db.conn().await;
    let dangling: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM sqlmesh._environments e, jsonb_array_elements(e.snapshots::jsonb) r
         WHERE NOT EXISTS (SELECT 1 FROM sqlmesh._snapshots s WHERE s.name = r->>'name'
                           AND s.fingerprint::jsonb = r->'fingerprint')",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(dangling, 0, "no environment points at a missing snapshot");
    project.export(&scratch_file("after-race.json"), &[]);
    store.status().await.unwrap();
    if plan.status.success() {
        // The plan's own writes are all there or, rolled back after it, all gone.
        let environments: Vec<String> =
            sqlx::query_scalar("SELECT name FROM sqlmesh._environments ORDER BY 1")
                .fetch_all(&mut conn)
                .await
                .unwrap();
        assert!(
            environments.contains(&"dev_busy".to_owned()) || restored > 0,
            "{environments:?}"
        );
    }
}

#[tokio::test]
async fn reconcilers_report_a_sqlmesh_store_and_export_it_on_a_schedule() {
    let (db, project) = planned().await;
    let h = Harness::new();
    put_secret(&h.kube, "pg-credentials", &[("password", &db.password())]);
    let object = store_for(
        &db,
        "analytics",
        json!({"framework": "sqlmesh", "schema": null}),
    );
    let (_, stored) = h.reconcile(&object).await;
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
        ready
            .message
            .contains("SQLMesh state in schema \"sqlmesh\""),
        "{}",
        ready.message
    );
    assert_eq!(status.framework.as_deref(), Some("sqlmesh"));
    assert_eq!(
        status.framework_versions.as_ref().unwrap()["sqlmeshVersion"],
        sqlmesh_version()
    );
    assert_eq!(status.latest_schema_version, None);
    assert_eq!(status.counts.as_ref().unwrap()["environments"], 3);
    let up_to_date = status
        .conditions
        .iter()
        .find(|c| c.type_ == "SchemaUpToDate")
        .unwrap();
    assert_eq!(up_to_date.reason, "ManagedByFramework");

    // A database SQLMesh has not created its tables in: NotInitialized, nothing created.
    let empty = TestDb::new().await;
    let (_, stored) = h
        .reconcile(&store_for(
            &empty,
            "empty",
            json!({"framework": "sqlmesh", "schema": null}),
        ))
        .await;
    let ready = stored
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(ready.reason, "NotInitialized");
    assert!(ready.message.contains("sqlmesh plan"), "{}", ready.message);

    // A nightly SQLMesh-format export: the file it writes imports into SQLMesh.
    let dir = std::env::temp_dir().join(format!("sk-sqlmesh-nightly-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut schedule = state_export(
        "nightly",
        &format!("file://{}/", dir.display()),
        json!({"schedule": "0 3 * * *", "format": "sqlmesh", "compression": "none"}),
    );
    schedule["metadata"]["creationTimestamp"] = json!("2026-11-20T12:00:00Z");
    h.kube.put(&export_path("nightly"), schedule);
    at(&h.ctx, "2026-11-21T03:00:05Z");
    h.reconcile_export("nightly").await;
    let child = "nightly-20261121030000";
    let (_, done) = h.reconcile_export(child).await;
    let status = done.status.unwrap();
    assert_eq!(
        status.phase.as_deref(),
        Some("Succeeded"),
        "{:?}",
        status.conditions
    );
    let written = dir.join(format!("{child}.json"));
    let target = TestDb::new().await;
    project.copy_for(&target).import(&written, true);
    let reference = TestDb::new().await;
    let path = scratch_file("nightly-theirs.json");
    project.export(&path, &[]);
    project.copy_for(&reference).import(&path, true);
    assert_same_state(&target, &reference).await;
}

#[tokio::test]
async fn reset_empties_sqlmeshs_tables_but_versions_and_rollback_brings_them_back() {
    let (db, _project) = planned().await;
    let store = sqlmesh_store(&db).await;
    let mut conn = db.conn().await;
    let before = snapshot(&mut conn, "sqlmesh").await;
    let refused = store
        .reset(statekeeper::engine::ResetApproval {
            allow_reset: true,
            approved: false,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.reason(), "ResetRefused");
    let report = store
        .reset(statekeeper::engine::ResetApproval {
            allow_reset: true,
            approved: true,
        })
        .await
        .unwrap();
    assert_eq!(report.tables_reset, 5);
    let after = snapshot(&mut conn, "sqlmesh").await;
    assert_eq!(after.len(), 6, "SQLMesh's tables are kept");
    for (table, rows) in &after {
        assert_eq!(rows.is_empty(), table != "_versions", "{table}");
    }
    assert_eq!(after["_versions"], before["_versions"]);
    store
        .rollback(Some(&report.backup.unwrap().id))
        .await
        .unwrap();
    assert_eq!(snapshot(&mut conn, "sqlmesh").await, before);
}

/// The StateMigration of a runner upgrade, on SQLMesh's store `analytics`.
fn runner_migration(name: &str) -> Value {
    support::operator::state_migration(
        name,
        "2026-11-27T10:00:00Z",
        json!({"upgrade": {"runner": {
            "image": "ghcr.io/acme/analytics-sqlmesh:0.237.0",
            "workingDir": "/project",
            "env": [{"name": "SQLMESH_GATEWAY", "value": "test"}],
            "serviceAccountName": "sqlmesh",
            "resources": {"limits": {"memory": "1Gi"}},
            "nodeSelector": {"pool": "batch"},
            "tolerations": [{"key": "batch", "operator": "Exists"}],
            "activeDeadlineSeconds": 600,
            "runAsUser": 1000
        }}}),
    )
}

fn sqlmesh_harness(db: &TestDb, extra: Value) -> Harness {
    let h = Harness::new();
    put_secret(&h.kube, "pg-credentials", &[("password", &db.password())]);
    let mut spec = json!({"framework": "sqlmesh", "schema": null});
    support::operator::support_merge(&mut spec, &extra);
    h.kube.put(
        &support::operator::store_path("analytics"),
        store_for(db, "analytics", spec),
    );
    h
}

fn job_posts(h: &Harness) -> usize {
    h.kube
        .requests()
        .iter()
        .filter(|(method, path)| method == "POST" && path.ends_with("/jobs"))
        .count()
}

async fn schema_version(db: &TestDb) -> i32 {
    let mut conn = db.conn().await;
    sqlx::query("SELECT schema_version FROM sqlmesh._versions")
        .fetch_one(&mut conn)
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn a_runner_upgrade_builds_its_job_from_the_spec_and_a_failed_job_is_restored() {
    use support::operator::{job_path, migration_condition, migration_path};
    let (db, _project) = planned().await;
    let h = sqlmesh_harness(&db, json!({}));
    h.kube
        .put(&migration_path("migrate"), runner_migration("migrate"));
    let before = sqlmesh_state(&db.url).await;

    let (action, m) = h.reconcile_migration("migrate").await;
    assert_ne!(action, kube::runtime::controller::Action::await_change());
    let status = m.status.clone().unwrap();
    assert_eq!(
        status.phase.as_deref(),
        Some("Running"),
        "{:?}",
        status.message
    );
    assert_eq!(status.job_name.as_deref(), Some("migrate-upgrade"));
    let plan = status.plan.clone().unwrap();
    assert_eq!(
        plan.job.as_deref(),
        Some("a Job running `sqlmesh migrate` in image ghcr.io/acme/analytics-sqlmesh:0.237.0")
    );
    let backup_id = status.backup_id.clone().expect("backed up before the Job");
    let backups = sqlmesh_store(&db).await.backups().await.unwrap();
    let backup = backups.iter().find(|b| b.id == backup_id).unwrap();
    assert_eq!(backup.reason, "pre-migration");
    assert_eq!(backup.operation.as_deref(), Some("uid-migrate"));

    // The Job, field by field.
    let job = h
        .kube
        .get(&job_path("migrate-upgrade"))
        .expect("the Job exists");
    let owner = &job["metadata"]["ownerReferences"][0];
    assert_eq!(
        (
            &owner["kind"],
            &owner["name"],
            &owner["uid"],
            &owner["controller"]
        ),
        (
            &json!("StateMigration"),
            &json!("migrate"),
            &json!("uid-migrate"),
            &json!(true)
        )
    );
    let labels = &job["metadata"]["labels"];
    assert_eq!(labels["app.kubernetes.io/managed-by"], "statekeeper");
    assert_eq!(labels["statekeeper.dev/store"], "analytics");
    assert_eq!(labels["statekeeper.dev/purpose"], "upgrade");
    assert_eq!(job["spec"]["backoffLimit"], 0);
    assert_eq!(job["spec"]["activeDeadlineSeconds"], 600);
    let pod = &job["spec"]["template"]["spec"];
    assert_eq!(pod["restartPolicy"], "Never");
    assert_eq!(pod["serviceAccountName"], "sqlmesh");
    assert_eq!(pod["nodeSelector"]["pool"], "batch");
    assert_eq!(pod["tolerations"][0]["key"], "batch");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["runAsUser"], 1000);
    let container = &pod["containers"][0];
    assert_eq!(container["image"], "ghcr.io/acme/analytics-sqlmesh:0.237.0");
    assert_eq!(container["command"], json!(["sqlmesh", "migrate"]));
    assert_eq!(container["workingDir"], "/project");
    assert_eq!(container["resources"]["limits"]["memory"], "1Gi");
    assert_eq!(
        container["securityContext"]["allowPrivilegeEscalation"],
        false
    );
    let env: Vec<&Value> = container["env"].as_array().unwrap().iter().collect();
    let var = |name: &str| {
        *env.iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("no {name} in {env:?}"))
    };
    assert_eq!(var("SQLMESH_GATEWAY")["value"], "test");
    assert_eq!(var("STATEKEEPER_SCHEMA")["value"], "sqlmesh");
    let (host, port, user, password, database) = support::url_parts(&db.url);
    assert_eq!(var("PGHOST")["value"], host.as_str());
    assert_eq!(var("PGPORT")["value"], port.to_string());
    assert_eq!(var("PGUSER")["value"], user.as_str());
    assert_eq!(var("PGDATABASE")["value"], database.as_str());
    assert!(var("PGPASSWORD").get("value").is_none());
    assert_eq!(
        var("PGPASSWORD")["valueFrom"]["secretKeyRef"],
        json!({"name": "pg-credentials", "key": "password", "optional": false})
    );
    assert!(
        !job.to_string().contains(&password),
        "no secret value in the Job"
    );

    // While it runs: the same Job, never a second.
    let (_, m) = h.reconcile_migration("migrate").await;
    assert_eq!(m.status.unwrap().phase.as_deref(), Some("Running"));
    assert_eq!(job_posts(&h), 1);

    // The Job changed state halfway, then passed its deadline.
    let mut conn = db.conn().await;
    sqlx::raw_sql(
        "UPDATE sqlmesh._versions SET schema_version = schema_version + 1; DELETE FROM sqlmesh._intervals",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    h.patch(
        &job_path("migrate-upgrade"),
        json!({"status": {"failed": 1, "conditions": [{"type": "Failed", "status": "True",
            "reason": "DeadlineExceeded", "message": "Job was active longer than specified deadline"}]}}),
    );
    let (action, m) = h.reconcile_migration("migrate").await;
    assert_eq!(action, kube::runtime::controller::Action::await_change());
    let status = m.status.clone().unwrap();
    assert_eq!(status.phase.as_deref(), Some("Failed"));
    assert_eq!(status.restored, Some(true));
    let (_, reason, message) = migration_condition(&m, "Ready");
    assert_eq!(reason, "DeadlineExceeded");
    assert!(message.contains("deadline of 600s"), "{message}");
    assert!(
        message.contains(&format!("restored from backup {backup_id}")),
        "{message}"
    );
    assert_eq!(
        sqlmesh_state(&db.url).await,
        before,
        "every table as before the Job"
    );
    assert!(
        h.event_reasons()
            .contains(&("Warning".into(), "Restored".into()))
    );
    assert!(!h.kube.dump().contains(&password));
}

#[tokio::test]
async fn a_runner_upgrade_that_succeeds_reports_the_new_version_and_survives_restarts() {
    use support::operator::{job_path, migration_path};
    let (db, _project) = planned().await;
    let h = sqlmesh_harness(&db, json!({}));
    h.kube
        .put(&migration_path("migrate"), runner_migration("migrate"));
    let (_, m) = h.reconcile_migration("migrate").await;
    let backup_id = m.status.unwrap().backup_id.unwrap();
    let backups = sqlmesh_store(&db).await.backups().await.unwrap().len();

    // The operator restarted before it recorded the Job and the backup: it adopts both.
    h.patch(
        &migration_path("migrate"),
        json!({"status": {"jobName": null, "backupId": null}}),
    );
    let (_, m) = h.reconcile_migration("migrate").await;
    let status = m.status.unwrap();
    assert_eq!(status.phase.as_deref(), Some("Running"));
    assert_eq!(status.backup_id.as_deref(), Some(backup_id.as_str()));
    assert_eq!(
        sqlmesh_store(&db).await.backups().await.unwrap().len(),
        backups
    );
    let jobs = h.kube.list("/apis/batch/v1/namespaces/data/jobs");
    assert_eq!(jobs.len(), 1, "one Job for one request");

    // `sqlmesh migrate` ran (its effect, as the Job's pod would leave it) and the Job completed.
    let from = schema_version(&db).await;
    sqlx::query("UPDATE sqlmesh._versions SET schema_version = schema_version + 1")
        .execute(&mut db.conn().await)
        .await
        .unwrap();
    h.patch(
        &job_path("migrate-upgrade"),
        json!({"status": {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}}),
    );
    let (_, m) = h.reconcile_migration("migrate").await;
    let status = m.status.unwrap();
    assert_eq!(
        status.phase.as_deref(),
        Some("Succeeded"),
        "{:?}",
        status.message
    );
    assert_eq!(status.from_version, Some(from));
    assert_eq!(status.to_version, Some(from + 1));
    assert!(status.message.unwrap().contains("succeeded"));
    assert_eq!(status.restored, None);
    assert_eq!(schema_version(&db).await, from + 1, "not restored");
}

#[tokio::test]
async fn a_framework_janitor_runs_one_job_per_tick_across_a_restart_and_is_never_restored() {
    use support::operator::{job_path, store_path};
    let (db, _project) = planned().await;
    let h = sqlmesh_harness(
        &db,
        json!({"janitor": {"schedule": "0 3 * * *", "backup": true,
            "runner": {"image": "ghcr.io/acme/analytics-sqlmesh:0.236.4", "workingDir": "/project"}}}),
    );
    let mut object = h.kube.get(&store_path("analytics")).unwrap();
    object["metadata"]["creationTimestamp"] = json!("2026-11-20T12:00:00Z");
    at(&h.ctx, "2026-11-21T03:00:05Z");
    let (_, store) = h.reconcile(&object).await;
    let janitor = store.status.unwrap().janitor.unwrap();
    let name = "analytics-janitor-202611210300";
    assert_eq!(janitor.active_job.as_deref(), Some(name));
    let job = h.kube.get(&job_path(name)).expect("the janitor Job");
    let container = &job["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["command"], json!(["sqlmesh", "janitor"]));
    assert_eq!(
        job["metadata"]["labels"]["statekeeper.dev/purpose"],
        "janitor"
    );
    assert_eq!(job["metadata"]["ownerReferences"][0]["kind"], "StateStore");
    let backup_id = janitor.last_backup_id.clone().expect("backed up first");
    let backups = sqlmesh_store(&db).await.backups().await.unwrap().len();

    // Again, and after a restart that lost the status: still one Job, one backup.
    h.reconcile(&object).await;
    h.kube.remove(&store_path("analytics"));
    let (_, store) = h.reconcile(&object).await;
    let janitor = store.status.unwrap().janitor.unwrap();
    assert_eq!(janitor.active_job.as_deref(), Some(name));
    assert_eq!(janitor.last_backup_id.as_deref(), Some(backup_id.as_str()));
    assert_eq!(h.kube.list("/apis/batch/v1/namespaces/data/jobs").len(), 1);
    assert_eq!(
        sqlmesh_store(&db).await.backups().await.unwrap().len(),
        backups
    );

    // It fails after dropping state: reported, not restored.
    sqlx::query("DELETE FROM sqlmesh._environments WHERE name = 'dev'")
        .execute(&mut db.conn().await)
        .await
        .unwrap();
    let after_job = sqlmesh_state(&db.url).await;
    h.patch(
        &job_path(name),
        json!({"status": {"failed": 1, "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}}),
    );
    let (_, store) = h.reconcile(&object).await;
    let status = store.status.unwrap();
    let janitor = status.janitor.clone().unwrap();
    assert_eq!(janitor.active_job, None);
    assert_eq!(janitor.last_job.as_deref(), Some(name));
    assert_eq!(
        janitor.last_outcome.as_deref(),
        Some("Failed: BackoffLimitExceeded")
    );
    let condition = status
        .conditions
        .iter()
        .find(|c| c.type_ == "JanitorSucceeded")
        .unwrap();
    assert_eq!(
        (condition.status.as_str(), condition.reason.as_str()),
        ("False", "JanitorJobFailed")
    );
    assert!(
        condition.message.contains("not restored"),
        "{}",
        condition.message
    );
    assert!(
        condition.message.contains(&backup_id),
        "{}",
        condition.message
    );
    assert_eq!(sqlmesh_state(&db.url).await, after_job, "never restored");

    // The next tick: a new Job; it succeeds.
    at(&h.ctx, "2026-11-22T03:00:05Z");
    let (_, store) = h.reconcile(&object).await;
    let next = "analytics-janitor-202611220300";
    assert_eq!(
        store.status.unwrap().janitor.unwrap().active_job.as_deref(),
        Some(next)
    );
    h.patch(
        &job_path(next),
        json!({"status": {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}}),
    );
    let (_, store) = h.reconcile(&object).await;
    let status = store.status.unwrap();
    assert_eq!(
        status.janitor.unwrap().last_outcome.as_deref(),
        Some("Succeeded")
    );
    let condition = status
        .conditions
        .iter()
        .find(|c| c.type_ == "JanitorSucceeded")
        .unwrap();
    assert_eq!(condition.status, "True");
    assert_eq!(h.kube.list("/apis/batch/v1/namespaces/data/jobs").len(), 2);
}

#[tokio::test]
async fn state_run_backup_upgrades_state_an_older_sqlmesh_wrote() {
    let old = support::sqlmesh::old_sqlmesh_bin();
    let db = TestDb::new().await;
    let project = support::sqlmesh::Project::new(&db);
    let out = project.run_with(old, &["plan", "prod", "--auto-apply", "--no-prompts"]);
    assert!(
        out.status.success(),
        "the older sqlmesh plan failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let before = sqlmesh_store(&db).await.status().await.unwrap();
    assert_ne!(before.versions["sqlmeshVersion"], sqlmesh_version());

    let out = Command::new(env!("CARGO_BIN_EXE_statekeeper"))
        .args(["state", "--framework", "sqlmesh", "run", "--backup", "--"])
        .arg(sqlmesh_bin())
        .arg("migrate")
        .current_dir(&project.dir)
        .env("STATEKEEPER_DATABASE_URL", &db.url)
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("`") && stdout.contains("succeeded"),
        "{stdout}"
    );
    let after = sqlmesh_store(&db).await.status().await.unwrap();
    assert_eq!(after.versions["sqlmeshVersion"], sqlmesh_version());
    assert!(
        after.current_version > before.current_version,
        "state schema {} → {}",
        before.current_version,
        after.current_version
    );
    let backups = sqlmesh_store(&db).await.backups().await.unwrap();
    assert_eq!(backups.len(), 1);
    assert_eq!(backups[0].reason, "pre-run");
    assert_eq!(backups[0].schema_version, before.current_version);
    // The new SQLMesh reads the migrated state: nothing to plan.
    let plan = project.plan("prod", &[]);
    assert!(plan.contains("No changes to plan"), "{plan}");
}
