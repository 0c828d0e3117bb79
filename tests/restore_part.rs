//! Restore in part (issue 27, point 4): one environment, one model's versions or one Meltano
//! state ID restored from an in-database backup or an export file, as a merge that leaves the
//! rest of the store alone. State written by the real SQLMesh and Meltano; every claim proven by
//! digests computed in SQL (md5 of each table's ordered rows, split into what was restored and
//! everything else), and by the frameworks' own commands.

mod support;

use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use sqlx::{AssertSqlSafe, PgConnection};
use statekeeper::engine::{
    Compression, Destination, Error, ExportFormat, ExportOptions, Framework, ImportMode,
    ImportOptions, ImportReport, Operation, Selection, Store,
};
use support::sqlmesh::{DEV_CHANGE, planned};
use support::{TestDb, populate_v1, populate_v3};

fn scratch_file(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sk-restore-part-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

async fn export_file(store: &Store, path: &Path, format: ExportFormat) {
    let destination = Destination::parse(&path.to_string_lossy(), &Default::default()).unwrap();
    let _ = std::fs::remove_file(path);
    let options = ExportOptions {
        compression: Compression::Gzip,
        format,
        ..Default::default()
    };
    store
        .export_to(&destination, &options, |_| {})
        .await
        .unwrap();
}

async fn restore_file(
    store: &Store,
    path: &Path,
    selection: Selection,
) -> Result<ImportReport, Error> {
    let file = tokio::fs::File::open(path).await.unwrap();
    store.import(file, &ImportOptions::restore(selection)).await
}

fn environments(names: &[&str]) -> Selection {
    Selection {
        environments: names.iter().map(|n| n.to_string()).collect(),
        ..Default::default()
    }
}

/// md5 of the rows (`columns` of each, as JSON, in order) of `schema.table` where `filter` holds.
async fn digest(
    conn: &mut PgConnection,
    schema: &str,
    table: &str,
    columns: &str,
    filter: &str,
) -> String {
    sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT md5(COALESCE(string_agg(r, E'\\n' ORDER BY r), '')) || ':' || count(*) \
         FROM (SELECT ({columns})::text AS r FROM \"{schema}\".\"{table}\" t WHERE {filter}) x"
    )))
    .fetch_one(conn)
    .await
    .unwrap_or_else(|e| panic!("digest of {schema}.{table}: {e}"))
}

/// Copies the tables of `schema` into a new schema `copy` (the state as it was at that moment).
async fn keep_copy(conn: &mut PgConnection, schema: &str, copy: &str, tables: &[&str]) {
    let mut sql = format!("DROP SCHEMA IF EXISTS {copy} CASCADE; CREATE SCHEMA {copy};");
    for table in tables {
        sql.push_str(&format!(
            "CREATE TABLE {copy}.\"{table}\" AS SELECT * FROM \"{schema}\".\"{table}\";"
        ));
    }
    sqlx::raw_sql(AssertSqlSafe(sql))
        .execute(conn)
        .await
        .unwrap();
}

/// Asserts that `schema.table` and `other.table` have the same rows where `filter` holds.
async fn assert_same(
    conn: &mut PgConnection,
    table: &str,
    columns: &str,
    (schema, other): (&str, &str),
    filter: &str,
    what: &str,
) {
    let (left, right) = (
        digest(conn, schema, table, columns, filter).await,
        digest(conn, other, table, columns, filter).await,
    );
    if left != right {
        let rows = format!(
            "SELECT ({columns})::text FROM \"{schema}\".\"{table}\" t WHERE {filter} EXCEPT ALL \
             SELECT ({columns})::text FROM \"{other}\".\"{table}\" t WHERE {filter}"
        );
        let only: Vec<String> = sqlx::query_scalar(AssertSqlSafe(rows))
            .fetch_all(&mut *conn)
            .await
            .unwrap();
        panic!(
            "{table} ({what}): {schema} differs from {other} ({left} vs {right}); only in {schema}: {only:#?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// SQLMesh

/// A `_snapshots` row with its stored snapshot read as JSON: SQLMesh reads the text as a JSON
/// document, and an import stores the text the export wrote (spacing and key order may differ
/// from what `sqlmesh plan` wrote). An import also keeps the last-altered times, which SQLMesh
/// reads from `_intervals` rows a plan wrote, in the snapshot, as `sqlmesh state import` does:
/// they are compared by SQLMesh's own export instead ([`sqlmesh_view`]).
const SNAPSHOT_ROW: &str = "to_jsonb(t) - 'snapshot' || jsonb_build_object('snapshot', \
     t.snapshot::jsonb - 'last_altered_ts' - 'dev_last_altered_ts')";

const SQLMESH_TABLES: &[&str] = &[
    "_snapshots",
    "_intervals",
    "_environments",
    "_environment_statements",
    "_auto_restatements",
    "_versions",
];

/// A snapshot (`t`) listed by `schema`'s environment `env` (by name and fingerprint).
fn listed_by(schema: &str, env: &str) -> String {
    format!(
        "EXISTS (SELECT 1 FROM \"{schema}\"._environments e, jsonb_array_elements(e.snapshots::jsonb) el \
         WHERE e.name = '{env}' AND el->>'name' = t.name AND el->'fingerprint' = t.snapshot::jsonb->'fingerprint')"
    )
}

/// An interval row (`t`) of a version of a snapshot listed by `schema`'s environment `env`.
fn interval_listed_by(schema: &str, env: &str) -> String {
    format!(
        "EXISTS (SELECT 1 FROM \"{schema}\"._environments e, jsonb_array_elements(e.snapshots::jsonb) el \
         WHERE e.name = '{env}' AND el->>'name' = t.name AND el->>'version' = t.version)"
    )
}

/// After restoring `env` from `backup` into `sqlmesh` (which was `broken` before): the
/// environment (its row, statements and snapshots) equals the backup's, everything else equals
/// `broken`, and no interval row `broken` had is gone.
async fn assert_only_environment_restored(
    conn: &mut PgConnection,
    backup: &str,
    broken: &str,
    env: &str,
) {
    let live = "sqlmesh";
    let named = format!("t.name = '{env}'");
    let others = format!("t.name <> '{env}'");
    assert_same(
        conn,
        "_environments",
        "to_jsonb(t)",
        (live, backup),
        &named,
        "the restored environment",
    )
    .await;
    assert_same(
        conn,
        "_environments",
        "to_jsonb(t)",
        (live, broken),
        &others,
        "every other environment",
    )
    .await;
    let statements = format!("t.environment_name = '{env}'");
    let other_statements = format!("t.environment_name <> '{env}'");
    assert_same(
        conn,
        "_environment_statements",
        "to_jsonb(t)",
        (live, backup),
        &statements,
        "its statements",
    )
    .await;
    assert_same(
        conn,
        "_environment_statements",
        "to_jsonb(t)",
        (live, broken),
        &other_statements,
        "other statements",
    )
    .await;
    let listed = listed_by(backup, env);
    assert_same(
        conn,
        "_snapshots",
        SNAPSHOT_ROW,
        (live, backup),
        &listed,
        "its snapshots",
    )
    .await;
    assert_same(
        conn,
        "_snapshots",
        "to_jsonb(t)",
        (live, broken),
        &format!("NOT {listed}"),
        "other snapshots",
    )
    .await;
    let intervals = interval_listed_by(backup, env);
    assert_same(
        conn,
        "_intervals",
        "to_jsonb(t)",
        (live, broken),
        &format!("NOT {intervals}"),
        "other versions' intervals",
    )
    .await;
    let kept = format!("t.id IN (SELECT id FROM \"{broken}\"._intervals)");
    assert_same(
        conn,
        "_intervals",
        "to_jsonb(t)",
        (live, broken),
        &kept,
        "every interval row that was there",
    )
    .await;
    for table in ["_versions", "_auto_restatements"] {
        assert_same(
            conn,
            table,
            "to_jsonb(t)",
            (live, broken),
            "true",
            "unchanged",
        )
        .await;
    }
}

/// `sqlmesh state export` of the environments, as SQLMesh reads it (no timestamp, snapshots in
/// order).
fn sqlmesh_view(project: &support::sqlmesh::Project, name: &str, envs: &[&str]) -> Value {
    let path = scratch_file(name);
    let _ = std::fs::remove_file(&path);
    project.export(&path, envs);
    let mut doc: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    doc["metadata"].as_object_mut().unwrap().remove("timestamp");
    let mut snapshots = doc["snapshots"].as_array().unwrap().clone();
    snapshots.sort_by_key(|s| format!("{}{}", s["name"], s["fingerprint"]));
    doc["snapshots"] = Value::Array(snapshots);
    doc
}

#[tokio::test]
async fn sqlmesh_environment_is_restored_from_a_backup_and_from_a_file_leaving_the_rest() {
    let (db, project) = planned().await;
    let store = db.store("sqlmesh").await.with_framework(Framework::Sqlmesh);
    let mut conn = db.conn().await;
    let backup = store.backup().await.unwrap();
    let backup_schema = format!("sqlmesh__backup_{}", backup.id);
    let file = scratch_file("sqlmesh-before.json.gz");
    export_file(&store, &file, ExportFormat::Sqlmesh).await;
    let dev_before = sqlmesh_view(&project, "dev-before.json", &["dev"]);

    // A bad plan into dev, and a new environment planned after the backup, which must stay.
    let (model, prod_text, dev_text) = DEV_CHANGE;
    project.edit(model, prod_text, "WHERE revenue > 30");
    project.plan("dev", &[]);
    project.plan("qa", &[]);
    project.edit(model, "WHERE revenue > 30", prod_text);
    keep_copy(&mut conn, "sqlmesh", "broken", SQLMESH_TABLES).await;
    assert_ne!(
        digest(
            &mut conn,
            "sqlmesh",
            "_environments",
            "to_jsonb(t)",
            "t.name = 'dev'"
        )
        .await,
        digest(
            &mut conn,
            &backup_schema,
            "_environments",
            "to_jsonb(t)",
            "t.name = 'dev'"
        )
        .await,
        "the bad plan changed dev"
    );

    // From the backup.
    let report = store
        .import_from_backup(&backup.id, &ImportOptions::restore(environments(&["dev"])))
        .await
        .unwrap();
    let restored = report
        .restored
        .clone()
        .expect("a restore in part reports what it restored");
    assert_eq!(restored.environments, ["dev"]);
    assert!(restored.versions > 0, "{restored:?}");
    assert_eq!(report.mode, ImportMode::Merge);
    assert_eq!(report.environments, 1);
    let pre_import = report.backup.clone().expect("a pre-import backup");
    assert!(
        report.effect().starts_with("restored environments dev"),
        "{}",
        report.effect()
    );
    assert_only_environment_restored(&mut conn, &backup_schema, "broken", "dev").await;
    assert_eq!(
        sqlmesh_view(&project, "dev-from-backup.json", &["dev"]),
        dev_before
    );

    // Back to the broken state (the restore's own backup), then from the file.
    store.rollback(Some(&pre_import.id)).await.unwrap();
    for table in SQLMESH_TABLES {
        assert_same(
            &mut conn,
            table,
            "to_jsonb(t)",
            ("sqlmesh", "broken"),
            "true",
            "rolled back",
        )
        .await;
    }
    let report = restore_file(&store, &file, environments(&["dev"]))
        .await
        .unwrap();
    assert_eq!(report.restored.unwrap().environments, ["dev"]);
    assert_only_environment_restored(&mut conn, &backup_schema, "broken", "dev").await;
    assert_eq!(
        sqlmesh_view(&project, "dev-from-file.json", &["dev"]),
        dev_before
    );

    // The real SQLMesh: with dev's files, dev has nothing to do; qa is still there.
    project.edit(model, prod_text, dev_text);
    let plan = project.plan("dev", &[]);
    assert!(plan.contains("No changes to plan"), "{plan}");
    let envs = project.ok(&["environments"]);
    assert!(envs.contains("qa"), "{envs}");
}

#[tokio::test]
async fn sqlmesh_model_versions_are_restored_without_touching_any_environment() {
    let (db, project) = planned().await;
    let store = db.store("sqlmesh").await.with_framework(Framework::Sqlmesh);
    let mut conn = db.conn().await;
    let whole_before = sqlmesh_view(&project, "model-before.json", &[]);
    let backup = store.backup().await.unwrap();
    let backup_schema = format!("sqlmesh__backup_{}", backup.id);
    let model = "t.name LIKE '%daily\\_orders%'";

    // The model's snapshots and intervals lost (a cleanup by hand gone wrong).
    sqlx::raw_sql(AssertSqlSafe(format!(
        "DELETE FROM sqlmesh._snapshots t WHERE {model}; DELETE FROM sqlmesh._intervals t WHERE {model};"
    )))
    .execute(&mut conn)
    .await
    .unwrap();
    keep_copy(&mut conn, "sqlmesh", "broken", SQLMESH_TABLES).await;

    let selection = Selection {
        models: vec!["shop.daily_orders".into()],
        ..Default::default()
    };
    let report = store
        .import_from_backup(&backup.id, &ImportOptions::restore(selection))
        .await
        .unwrap();
    let restored = report.restored.unwrap();
    assert!(restored.environments.is_empty(), "{restored:?}");
    assert_eq!(restored.models.len(), 1, "{restored:?}");
    assert!(restored.models[0].contains("daily_orders"), "{restored:?}");
    assert!(
        restored.versions >= 2 && restored.intervals > 0,
        "{restored:?}"
    );

    // The model's snapshots are the backup's; every other row is as it was; no environment moved.
    assert_same(
        &mut conn,
        "_snapshots",
        SNAPSHOT_ROW,
        ("sqlmesh", &backup_schema),
        model,
        "the model's snapshots",
    )
    .await;
    let others = format!("NOT ({model})");
    for table in SQLMESH_TABLES {
        let filter = if matches!(*table, "_snapshots" | "_intervals") {
            others.as_str()
        } else {
            "true"
        };
        assert_same(
            &mut conn,
            table,
            "to_jsonb(t)",
            ("sqlmesh", "broken"),
            filter,
            "not the model's",
        )
        .await;
    }
    // Its intervals as SQLMesh computes them: the whole state reads as before, in SQLMesh's eyes.
    assert_eq!(
        sqlmesh_view(&project, "model-after.json", &[]),
        whole_before
    );
    let plan = project.plan("prod", &[]);
    assert!(plan.contains("No changes to plan"), "{plan}");
}

// ---------------------------------------------------------------------------------------------
// Meltano

#[tokio::test]
async fn meltano_state_id_is_restored_and_the_other_stays_changed() {
    let db = TestDb::new().await;
    let project = support::meltano::Project::new(&db);
    project.ok(&["state", "list"]);
    for (id, value) in [
        ("dev:tap-a-to-target", 1),
        ("dev:tap-b-to-target", 2),
        ("dev:tap-c-to-target", 3),
    ] {
        project.set(
            id,
            &json!({"singer_state": {"bookmarks": {"users": {"id": value}}}}),
        );
    }
    let store = db.store("public").await.with_framework(Framework::Meltano);
    let mut conn = db.conn().await;
    let backup = store.backup().await.unwrap();
    let backup_schema = format!("public__backup_{}", backup.id);
    let file = scratch_file("meltano-before.json");
    export_file(&store, &file, ExportFormat::Meltano).await;
    let (a, b) = ("dev:tap-a-to-target", "dev:tap-b-to-target");
    for id in [a, b] {
        project.set(
            id,
            &json!({"singer_state": {"bookmarks": {"users": {"id": 99}}}}),
        );
    }
    keep_copy(&mut conn, "public", "broken", &["state"]).await;
    let columns = "jsonb_build_array(t.state_id, t.completed_state, t.partial_state)";

    let selection = Selection {
        state_ids: vec![a.into()],
        ..Default::default()
    };
    let report = store
        .import_from_backup(&backup.id, &ImportOptions::restore(selection))
        .await
        .unwrap();
    assert_eq!(report.restored.unwrap().state_ids, [a]);
    let only_a = format!("t.state_id = '{a}'");
    assert_same(
        &mut conn,
        "state",
        columns,
        ("public", &backup_schema),
        &only_a,
        "restored",
    )
    .await;
    assert_same(
        &mut conn,
        "state",
        columns,
        ("public", "broken"),
        &format!("NOT {only_a}"),
        "the rest",
    )
    .await;
    assert_eq!(
        project.get(a)["singer_state"]["bookmarks"]["users"]["id"],
        1
    );
    assert_eq!(
        project.get(b)["singer_state"]["bookmarks"]["users"]["id"],
        99
    );

    // From the file, by a glob: b comes back too; c was never changed.
    let selection = Selection {
        state_ids: vec!["dev:tap-b-*".into()],
        ..Default::default()
    };
    let report = restore_file(&store, &file, selection).await.unwrap();
    assert_eq!(report.restored.unwrap().state_ids, [b]);
    assert_same(
        &mut conn,
        "state",
        columns,
        ("public", &backup_schema),
        "true",
        "all restored",
    )
    .await;
    assert_eq!(
        project.get(b)["singer_state"]["bookmarks"]["users"]["id"],
        2
    );
}

// ---------------------------------------------------------------------------------------------
// statekeeper's own schema

async fn statekeeper_store(db: &TestDb) -> Store {
    let store = db.store("sk").await;
    store.init(None).await.unwrap();
    let mut conn = db.conn().await;
    populate_v1(&mut conn, "sk").await;
    populate_v3(&mut conn, "sk").await;
    store
}

#[tokio::test]
async fn statekeeper_environment_is_restored_from_a_backup_and_from_a_file() {
    let db = TestDb::new().await;
    let store = statekeeper_store(&db).await;
    let mut conn = db.conn().await;
    let backup = store.backup().await.unwrap();
    let backup_schema = format!("sk__backup_{}", backup.id);
    let file = scratch_file("statekeeper-before.json.gz");
    export_file(&store, &file, ExportFormat::Statekeeper).await;
    sqlx::raw_sql(
        "DELETE FROM sk.virtual_environment_refs WHERE environment = 'dev_alice';
         DELETE FROM sk.virtual_environment_checkpoints WHERE environment = 'dev_alice';
         UPDATE sk.virtual_environments SET plan_id = 'plan-bad' WHERE name = 'dev_alice';
         UPDATE sk.virtual_environments SET plan_id = 'plan-new' WHERE name = 'prod';",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let tables = [
        "virtual_environments",
        "virtual_environment_refs",
        "virtual_environment_function_refs",
        "virtual_environment_checkpoints",
        "model_versions",
        "function_versions",
        "model_version_intervals",
        "physical_relations",
        "locks",
    ];
    keep_copy(&mut conn, "sk", "broken", &tables).await;
    let check = async |conn: &mut PgConnection| {
        let env = "t.environment = 'dev_alice'";
        let not_env = "t.environment <> 'dev_alice'";
        assert_same(
            conn,
            "virtual_environments",
            "to_jsonb(t)",
            ("sk", &backup_schema),
            "t.name = 'dev_alice'",
            "restored",
        )
        .await;
        assert_same(
            conn,
            "virtual_environments",
            "to_jsonb(t)",
            ("sk", "broken"),
            "t.name <> 'dev_alice'",
            "the rest",
        )
        .await;
        for table in [
            "virtual_environment_refs",
            "virtual_environment_function_refs",
        ] {
            assert_same(
                conn,
                table,
                "to_jsonb(t)",
                ("sk", &backup_schema),
                env,
                "restored",
            )
            .await;
            assert_same(
                conn,
                table,
                "to_jsonb(t)",
                ("sk", "broken"),
                not_env,
                "the rest",
            )
            .await;
        }
        // Checkpoints get new ids in a merge: compared without them.
        let checkpoint = "to_jsonb(t) - 'id'";
        assert_same(
            conn,
            "virtual_environment_checkpoints",
            checkpoint,
            ("sk", &backup_schema),
            env,
            "restored",
        )
        .await;
        assert_same(
            conn,
            "virtual_environment_checkpoints",
            "to_jsonb(t)",
            ("sk", "broken"),
            not_env,
            "the rest",
        )
        .await;
        for table in [
            "model_versions",
            "function_versions",
            "physical_relations",
            "locks",
        ] {
            assert_same(
                conn,
                table,
                "to_jsonb(t)",
                ("sk", "broken"),
                "true",
                "unchanged",
            )
            .await;
        }
        assert_same(
            conn,
            "model_version_intervals",
            "to_jsonb(t) - 'id'",
            ("sk", "broken"),
            "true",
            "same intervals",
        )
        .await;
    };

    let report = store
        .import_from_backup(
            &backup.id,
            &ImportOptions::restore(environments(&["dev_alice"])),
        )
        .await
        .unwrap();
    assert_eq!(
        report.restored.as_ref().unwrap().environments,
        ["dev_alice"]
    );
    check(&mut conn).await;

    store
        .rollback(Some(&report.backup.unwrap().id))
        .await
        .unwrap();
    let report = restore_file(&store, &file, environments(&["dev_alice"]))
        .await
        .unwrap();
    assert_eq!(report.restored.unwrap().environments, ["dev_alice"]);
    check(&mut conn).await;
}

// ---------------------------------------------------------------------------------------------
// Refusals and plans

/// `statekeeper state --schema sk -o json ARGS` against the test database (`STATEKEEPER_BIN`, when
/// set, names the binary: a target folder shared by several checkouts holds the last one built).
fn cli(db: &TestDb, args: &[&str]) -> std::process::Output {
    let bin = std::env::var("STATEKEEPER_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_statekeeper").to_owned());
    std::process::Command::new(bin)
        .args([
            "state",
            "--database-url",
            &db.url,
            "--schema",
            "sk",
            "-o",
            "json",
        ])
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test]
async fn refusals_change_nothing_and_the_selection_is_in_the_plan_hash() {
    let db = TestDb::new().await;
    let store = statekeeper_store(&db).await;
    let mut conn = db.conn().await;
    let backup = store.backup().await.unwrap();
    let file = scratch_file("statekeeper-refusals.json.gz");
    export_file(&store, &file, ExportFormat::Statekeeper).await;
    let before = support::current_state(&mut conn, "sk").await;
    let backups = store.backups().await.unwrap().len();

    // An environment the source does not have: named, with what it has.
    for result in [
        store
            .import_from_backup(&backup.id, &ImportOptions::restore(environments(&["nope"])))
            .await,
        restore_file(&store, &file, environments(&["nope"])).await,
    ] {
        let error = result.unwrap_err();
        let text = error.to_string();
        assert!(matches!(error, Error::NothingToRestore { .. }), "{error:?}");
        assert!(
            text.contains("\"nope\"") && text.contains("dev_alice") && text.contains("prod"),
            "{text}"
        );
    }
    let text = store
        .import_from_backup(&backup.id, &ImportOptions::restore(environments(&["nope"])))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        text.starts_with(&format!("backup {} has no environment", backup.id)),
        "{text}"
    );
    // A partial replace, and Meltano's state IDs in a statekeeper store.
    let replace = ImportOptions {
        mode: ImportMode::Replace,
        ..ImportOptions::restore(environments(&["prod"]))
    };
    let file_reader = tokio::fs::File::open(&file).await.unwrap();
    let text = store
        .import(file_reader, &replace)
        .await
        .unwrap_err()
        .to_string();
    assert!(text.contains("--merge"), "{text}");
    let state_ids = Selection {
        state_ids: vec!["x".into()],
        ..Default::default()
    };
    let text = restore_file(&store, &file, state_ids)
        .await
        .unwrap_err()
        .to_string();
    assert!(text.contains("--environment"), "{text}");
    assert_eq!(
        support::current_state(&mut conn, "sk").await,
        before,
        "nothing changed"
    );
    assert_eq!(
        store.backups().await.unwrap().len(),
        backups,
        "no backup was left behind"
    );

    // The CLI: a selection needs --merge, said before anything happens.
    let out = cli(
        &db,
        &["import", "--backup-id", &backup.id, "--environment", "prod"],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("pass --merge"), "{stderr}");
    let out = cli(
        &db,
        &[
            "import",
            "--merge",
            "--backup-id",
            &backup.id,
            "--environment",
            "prod",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["restored"]["environments"], json!(["prod"]));

    // Plans: the selection is hashed; the same selection gives the same hash.
    let plan = async |selection: &Selection, backup_id: Option<&str>| {
        store
            .plan(
                Operation::Import {
                    source: "backup",
                    mode: ImportMode::Merge,
                    expected_sha256: None,
                    selection,
                    backup_id,
                },
                true,
            )
            .await
            .unwrap()
    };
    let (prod, dev) = (environments(&["prod"]), environments(&["dev_alice"]));
    let whole = Selection::default();
    let id = Some(backup.id.as_str());
    let hashes = [
        plan(&prod, id).await.hash,
        plan(&dev, id).await.hash,
        plan(&whole, id).await.hash,
        plan(&prod, None).await.hash,
    ];
    for (i, a) in hashes.iter().enumerate() {
        for b in &hashes[i + 1..] {
            assert_ne!(a, b, "{hashes:?}");
        }
    }
    assert_eq!(plan(&prod, id).await.hash, hashes[0]);
    let planned = plan(&dev, id).await;
    assert_eq!(planned.selection, Some(dev.clone()));
    assert!(
        planned
            .steps
            .iter()
            .any(|s| s.contains("environment dev_alice")),
        "{:?}",
        planned.steps
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_statekeeper"))
        .args([
            "state",
            "--database-url",
            &db.url,
            "--schema",
            "sk",
            "plan",
            "import",
        ])
        .args([
            "--backup-id",
            &backup.id,
            "--merge",
            "--environment",
            "dev_alice",
            "-o",
            "json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cli_plan: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(cli_plan["selection"]["environments"], json!(["dev_alice"]));
}
