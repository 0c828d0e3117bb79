//! `state diff`, on state written by the real frameworks (SQLMesh plans, Meltano's `state set`)
//! and by statekeeper's generator: a backup, an export file (each format) and the store compared
//! every way round; limits; bad inputs that leave no scratch schema behind; and the plans of a
//! rollback and an import, in the CLI and in a StateMigration's status.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{Value, json};
use sqlx::AssertSqlSafe;
use statekeeper::engine::diff::report::Change;
use statekeeper::engine::{
    Compression, Destination, DiffOptions, DiffReport, DiffSide, Error, ExportFormat,
    ExportOptions, FileSource, Framework, Operation, Store,
};
use support::TestDb;
use support::operator::{
    Harness, migration_path, put_secret, state_migration, store_for, store_path,
};
use support::sqlmesh::planned;

type Side = DiffSide<tokio::fs::File>;

/// A change of `prod` that no environment of the fixture has yet: a new snapshot of top_items.
const PROD_CHANGE: (&str, &str, &str) = (
    "models/top_items.sql",
    "WHERE revenue > 10",
    "WHERE revenue > 5",
);

fn cli(url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_statekeeper"))
        .args(args)
        .env("STATEKEEPER_DATABASE_URL", url)
        .env_remove("STATEKEEPER_SCHEMA")
        .env_remove("STATEKEEPER_FRAMEWORK")
        .output()
        .unwrap()
}

/// stdout of a command that must succeed.
fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn scratch_file(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sk-diff-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

async fn export_file(store: &Store, path: &Path, format: ExportFormat) {
    let _ = std::fs::remove_file(path);
    let destination = Destination::parse(&path.to_string_lossy(), &Default::default()).unwrap();
    let options = ExportOptions {
        compression: Compression::None,
        format,
        ..Default::default()
    };
    store
        .export_to(&destination, &options, |_| {})
        .await
        .unwrap();
}

async fn file(path: &Path) -> Side {
    DiffSide::File(
        tokio::fs::File::open(path).await.unwrap(),
        FileSource {
            label: path.display().to_string(),
            ..Default::default()
        },
    )
}

async fn diff(store: &Store, from: Side, to: Side) -> DiffReport {
    store.diff(from, to, &DiffOptions::default()).await.unwrap()
}

/// The schemas a diff restores files into, left behind (there must be none).
async fn scratch_schemas(db: &TestDb) -> Vec<String> {
    support::schemas(&mut db.conn().await)
        .await
        .into_iter()
        .filter(|s| s.contains("__verify_"))
        .collect()
}

/// The report without what names its sides and how long it took: equal sections.
fn sections(report: &DiffReport) -> Value {
    let mut value = serde_json::to_value(report).unwrap();
    for key in ["from", "to", "durationMs"] {
        value.as_object_mut().unwrap().remove(key);
    }
    value
}

#[tokio::test]
async fn sqlmesh_a_backup_against_the_store_shows_the_model_that_moved_and_its_snapshots_and_intervals()
 {
    let (db, project) = planned().await;
    let store = db.store("sqlmesh").await.with_framework(Framework::Sqlmesh);
    let backup = store.backup().await.unwrap();
    let (path, from, to) = PROD_CHANGE;
    project.edit(path, from, to);
    project.plan("prod", &[]);

    let report = diff(&store, Side::Backup(backup.id.clone()), Side::Live).await;
    assert_eq!(report.from, format!("backup {}", backup.id));
    assert!(!report.identical);
    let sqlmesh = report.sqlmesh.as_ref().unwrap();
    // prod, and only prod, changed: top_items moved from the backup's version to a new one.
    let environments = &sqlmesh.environments;
    assert_eq!(environments.count(), 1, "{environments:#?}");
    let prod = &environments.changed.items[0];
    assert_eq!((prod.name.as_str(), prod.change), ("prod", Change::Changed));
    assert_eq!(prod.models.count, 1, "{prod:#?}");
    let moved = &prod.models.items[0];
    assert!(moved.name.contains("top_items"), "{moved:#?}");
    let (old, new) = (moved.from.clone().unwrap(), moved.to.clone().unwrap());
    assert_ne!(old.version, new.version);
    let mut conn = db.conn().await;
    let versions_in = |schema: String| {
        format!("SELECT version FROM {schema}._snapshots WHERE name LIKE '%top_items%'")
    };
    let backed_up: Vec<String> = sqlx::query_scalar(AssertSqlSafe(versions_in(format!(
        "sqlmesh__backup_{}",
        backup.id
    ))))
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert!(backed_up.contains(&old.version) && !backed_up.contains(&new.version));
    // The plan wrote one new snapshot (top_items') and removed none.
    let snapshots = &sqlmesh.snapshots;
    assert_eq!((snapshots.added.count, snapshots.removed.count), (1, 0));
    assert_eq!(snapshots.added.items[0].identifier, new.identifier);
    // It filled the new version's intervals.
    let filled: Vec<_> = sqlmesh
        .intervals
        .items
        .iter()
        .filter(|c| c.version == new.version && !c.dev)
        .collect();
    assert_eq!(filled.len(), 1, "{:#?}", sqlmesh.intervals);
    assert!(filled[0].removed.is_empty() && filled[0].added.count >= 1);
    assert!(filled[0].added.items[0].start.ends_with('Z'), "{filled:#?}");
    let summary = report.summary_lines();
    assert!(
        summary[0].starts_with("1 environment changed: prod (")
            && summary[0].contains(&format!(
                "version {} → version {}",
                old.version, new.version
            )),
        "{summary:#?}"
    );

    // The other way round, each difference is reversed.
    let back = diff(&store, Side::Live, Side::Backup(backup.id.clone())).await;
    let sqlmesh = back.sqlmesh.as_ref().unwrap();
    let moved = &sqlmesh.environments.changed.items[0].models.items[0];
    assert_eq!(
        (moved.from.clone(), moved.to.clone()),
        (Some(new), Some(old))
    );
    assert_eq!(sqlmesh.snapshots.removed.count, 1);
    assert_eq!(sqlmesh.snapshots.added.count, 0);

    // A side against itself is no difference.
    for (from, to) in [
        (Side::Live, Side::Live),
        (
            Side::Backup(backup.id.clone()),
            Side::Backup(backup.id.clone()),
        ),
    ] {
        let same = diff(&store, from, to).await;
        assert!(same.identical, "{same:#?}");
        assert_eq!(same.summary_lines(), ["no differences"]);
    }

    // A backup of another SQLMesh state version (one taken before a `sqlmesh migrate`) is not
    // compared: SQLMesh's tables change shape between versions. A rollback plan says why it shows
    // no changes, and stands.
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE sqlmesh__backup_{}._statekeeper_backup SET schema_version = schema_version - 1",
        backup.id
    )))
    .execute(&mut conn)
    .await
    .unwrap();
    let refused = store
        .diff(
            Side::Backup(backup.id.clone()),
            Side::Live,
            &DiffOptions::default(),
        )
        .await;
    assert!(
        matches!(&refused, Err(Error::Incomparable { .. })),
        "{refused:?}"
    );
    let rollback = Operation::Rollback {
        backup_id: Some(&backup.id),
    };
    let changes = store.plan(rollback, true).await.unwrap().changes.unwrap();
    assert_eq!(changes.summary.len(), 1, "{changes:?}");
    assert!(
        changes.summary[0].starts_with(&format!(
            "not compared: cannot compare the store now with backup {}: one holds SQLMesh state \
             schema version",
            backup.id
        )),
        "{changes:?}"
    );
}

#[tokio::test]
async fn sqlmesh_export_files_compare_as_the_state_they_hold() {
    let (db, project) = planned().await;
    let store = db.store("sqlmesh").await.with_framework(Framework::Sqlmesh);
    let backup = store.backup().await.unwrap();
    let (path, from, to) = PROD_CHANGE;
    project.edit(path, from, to);
    project.plan("prod", &[]);
    let exact = scratch_file("sqlmesh-exact.json");
    let sqlmesh_format = scratch_file("sqlmesh-format.json");
    export_file(&store, &exact, ExportFormat::Exact).await;
    export_file(&store, &sqlmesh_format, ExportFormat::Sqlmesh).await;

    // An exact export is the store, row for row.
    let same = diff(&store, file(&exact).await, Side::Live).await;
    assert!(same.identical, "{same:#?}");
    // Against the backup, a file of the store differs as the store does.
    let by_file = diff(&store, Side::Backup(backup.id.clone()), file(&exact).await).await;
    let by_store = diff(&store, Side::Backup(backup.id.clone()), Side::Live).await;
    assert_eq!(by_file.to, exact.display().to_string());
    assert_eq!(sections(&by_file), sections(&by_store));

    // SQLMesh's format holds the environments and the snapshots they reference, with their
    // intervals as SQLMesh computes them: the store differs from it only by the snapshots no
    // environment references (and their intervals).
    let report = diff(&store, file(&sqlmesh_format).await, Side::Live).await;
    let sqlmesh = report.sqlmesh.as_ref().unwrap();
    assert!(sqlmesh.environments.is_empty(), "{report:#?}");
    assert!(sqlmesh.snapshots.removed.is_empty(), "{report:#?}");
    let unreferenced: Vec<String> = sqlx::query_scalar(
        "SELECT s.identifier FROM sqlmesh._snapshots s WHERE NOT EXISTS (
             SELECT 1 FROM sqlmesh._environments e,
                  jsonb_array_elements(e.snapshots::jsonb) x
             WHERE x ->> 'name' = s.name AND x -> 'fingerprint' IS NOT NULL
               AND s.identifier = (SELECT identifier FROM sqlmesh._snapshots t
                                   WHERE t.name = s.name AND t.fingerprint::jsonb = x -> 'fingerprint'))
         ORDER BY s.name, s.identifier",
    )
    .fetch_all(&mut db.conn().await)
    .await
    .unwrap();
    let added: Vec<String> = sqlmesh
        .snapshots
        .added
        .items
        .iter()
        .map(|s| s.identifier.clone())
        .collect();
    assert!(!added.is_empty());
    assert_eq!(added, unreferenced, "{report:#?}");
    assert!(
        sqlmesh.intervals.items.iter().all(|c| c.removed.is_empty()),
        "the file has every interval the store's environments have: {report:#?}"
    );
    assert!(scratch_schemas(&db).await.is_empty());
}

/// A statekeeper store with generated state, and a backup of it.
async fn generated(db: &TestDb) -> (Store, String) {
    let store = db.store("statekeeper").await;
    store.init(None).await.unwrap();
    store
        .generate(&statekeeper::engine::generator::GenerateOptions {
            model_versions: 400,
            environments: 5,
            checkpoints_per_environment: 3,
            ..Default::default()
        })
        .await
        .unwrap();
    let backup = store.backup().await.unwrap();
    (store, backup.id)
}

#[tokio::test]
async fn statekeeper_environments_versions_and_checkpoints_differ_by_what_they_are() {
    let db = TestDb::new().await;
    let (store, backup) = generated(&db).await;
    // A plan moves one of prod's models to a new version and makes a new environment with it;
    // the janitor removes prod's oldest checkpoint.
    let mut conn = db.conn().await;
    let (model, old_version): (String, String) = sqlx::query_as(
        "SELECT r.model_name, v.version FROM statekeeper.virtual_environment_refs r
         JOIN statekeeper.model_versions v ON v.id = r.model_version_id
         WHERE r.environment = 'prod' ORDER BY r.model_name LIMIT 1",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    let removed_checkpoint: (String,) = sqlx::query_as(
        "DELETE FROM statekeeper.virtual_environment_checkpoints WHERE id =
           (SELECT id FROM statekeeper.virtual_environment_checkpoints WHERE environment = 'prod'
            ORDER BY created_at LIMIT 1) RETURNING plan_id",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    sqlx::raw_sql(AssertSqlSafe(format!(
        "INSERT INTO statekeeper.model_versions (name, fingerprint, version)
           VALUES ('{model}', 'fp-new', 'v-new');
         UPDATE statekeeper.virtual_environment_refs
           SET model_version_id = (SELECT id FROM statekeeper.model_versions WHERE fingerprint = 'fp-new')
           WHERE environment = 'prod' AND model_name = '{model}';
         INSERT INTO statekeeper.virtual_environments (name, plan_id) VALUES ('feature', 'plan_x');
         INSERT INTO statekeeper.virtual_environment_refs
           SELECT 'feature', '{model}', id FROM statekeeper.model_versions WHERE fingerprint = 'fp-new';"
    )))
    .execute(&mut conn)
    .await
    .unwrap();

    let report = diff(&store, Side::Backup(backup.clone()), Side::Live).await;
    let s = report.statekeeper.as_ref().unwrap();
    let environments: Vec<(Change, &str, u64)> = s
        .environments
        .lists()
        .into_iter()
        .flat_map(|(change, list)| {
            list.items
                .iter()
                .map(move |e| (change, e.name.as_str(), e.models.count))
        })
        .collect();
    assert_eq!(
        environments,
        [(Change::Changed, "prod", 1), (Change::Added, "feature", 1)]
    );
    let moved = &s.environments.changed.items[0].models.items[0];
    assert_eq!(moved.name, model);
    assert_eq!(moved.from.as_ref().unwrap().version, old_version);
    assert_eq!(moved.to.as_ref().unwrap().version, "v-new");
    assert_eq!((s.versions.added.count, s.versions.removed.count), (1, 0));
    assert_eq!(s.versions.added.items[0].identifier, "fp-new");
    assert_eq!(
        (s.checkpoints.added.count, s.checkpoints.removed.count),
        (0, 1)
    );
    let checkpoint = &s.checkpoints.removed.items[0];
    assert_eq!(checkpoint.environment, "prod");
    assert_eq!(
        checkpoint.plan_id.as_deref(),
        Some(removed_checkpoint.0.as_str())
    );
    let summary = report.summary_lines();
    assert_eq!(
        summary,
        [
            format!("1 environment changed: prod ({model}: version {old_version} → version v-new)"),
            "1 environment added: feature (1 model)".to_owned(),
            format!("model versions: 1 added ({model})"),
            format!("checkpoints: 1 removed (prod {})", checkpoint.created_at),
        ]
    );

    // A merge of the whole backup, planned: only what it adds or replaces (prod's version and
    // checkpoint come back; the new environment and version stay).
    let merge = ok(&cli(
        &db.url,
        &[
            "state",
            "plan",
            "import",
            "--backup-id",
            &backup,
            "--merge",
            "-o",
            "json",
        ],
    ));
    let merge: Value = serde_json::from_str(&merge).unwrap();
    let changes = &merge["changes"];
    assert!(
        changes["compared"]
            .as_str()
            .unwrap()
            .contains("merged with backup"),
        "{merge:#}"
    );
    assert_eq!(
        changes["summary"],
        json!([
            format!("1 environment changed: prod ({model}: version v-new → version {old_version})"),
            format!("checkpoints: 1 added (prod {})", checkpoint.created_at),
        ])
    );

    // Exports of the store compare as the store, whatever their format: statekeeper's own
    // renumbers versions and checkpoints on import, and they are matched by what they are.
    for format in [ExportFormat::Exact, ExportFormat::Statekeeper] {
        let path = scratch_file(&format!("statekeeper-{format}.json"));
        export_file(&store, &path, format).await;
        let same = diff(&store, file(&path).await, Side::Live).await;
        assert!(same.identical, "{format}: {same:#?}");
        let by_file = diff(&store, Side::Backup(backup.clone()), file(&path).await).await;
        assert_eq!(sections(&by_file), sections(&report), "{format}");
    }
    assert!(scratch_schemas(&db).await.is_empty());
}

#[tokio::test]
async fn meltano_state_ids_added_removed_and_changed_with_the_bookmark_that_changed() {
    let db = TestDb::new().await;
    let project = support::meltano::Project::new(&db);
    let bookmark =
        |n: u64| json!({"singer_state": {"bookmarks": {"users": {"replication_key_value": n}}}});
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
    let backup = ok(&cli(
        &db.url,
        &["state", "backup", "--framework", "meltano", "-o", "json"],
    ));
    let backup: Value = serde_json::from_str(&backup).unwrap();
    let id = backup["id"].as_str().unwrap();
    // A run moves one bookmark; a new pipeline appears; one state is cleared.
    project.set("dev:tap-a-to-target-x", &bookmark(9));
    project.set("dev:tap-c-to-target-x", &bookmark(1));
    project.ok(&["state", "clear", "--force", "prod:tap-a-to-target-x"]);

    let side = format!("backup:{id}");
    let out = ok(&cli(
        &db.url,
        &[
            "state",
            "diff",
            &side,
            "--framework",
            "meltano",
            "-o",
            "json",
        ],
    ));
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["identical"], false);
    let meltano = &report["meltano"];
    assert_eq!(
        meltano["stateIds"]["added"]["items"],
        json!(["dev:tap-c-to-target-x"])
    );
    assert_eq!(
        meltano["stateIds"]["removed"]["items"],
        json!(["prod:tap-a-to-target-x"])
    );
    assert_eq!(meltano["changed"]["count"], 1);
    let moved = &meltano["changed"]["items"][0];
    assert_eq!(moved["stateId"], "dev:tap-a-to-target-x");
    assert_eq!(
        moved["bookmarks"]["items"],
        json!([{"stream": "users", "from": {"replication_key_value": 1}, "to": {"replication_key_value": 9}}])
    );

    let text = ok(&cli(
        &db.url,
        &["state", "diff", &side, "--framework", "meltano"],
    ));
    assert!(
        text.starts_with(&format!(
            "Meltano state: backup {id} → the store (schema \"public\")"
        )),
        "{text}"
    );
    assert!(text.contains("  added    dev:tap-c-to-target-x"), "{text}");
    assert!(
        text.contains(
            "bookmark users  {\"replication_key_value\":1}  →  {\"replication_key_value\":9}"
        ),
        "{text}"
    );

    // Meltano's own export format, against the store it came from.
    let path = scratch_file("meltano.json");
    let store = db.store("public").await.with_framework(Framework::Meltano);
    export_file(&store, &path, ExportFormat::Meltano).await;
    let out = ok(&cli(
        &db.url,
        &[
            "state",
            "diff",
            &path.to_string_lossy(),
            "--framework",
            "meltano",
        ],
    ));
    assert!(out.ends_with("no differences\n"), "{out}");
}

#[tokio::test]
async fn the_cli_caps_lists_at_the_limit_with_exact_counts_and_exits_zero_either_way() {
    let db = TestDb::new().await;
    let store = db.store("statekeeper").await;
    store.init(None).await.unwrap();
    let empty = store.backup().await.unwrap();
    store
        .generate(&statekeeper::engine::generator::GenerateOptions {
            model_versions: 300,
            environments: 3,
            ..Default::default()
        })
        .await
        .unwrap();
    let side = format!("backup:{}", empty.id);
    let out = ok(&cli(
        &db.url,
        &["state", "diff", &side, "--limit", "5", "-o", "json"],
    ));
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["limit"], 5);
    let added = &report["statekeeper"]["versions"]["added"];
    assert_eq!(added["count"], 300);
    assert_eq!(added["items"].as_array().unwrap().len(), 5);
    assert_eq!(added["truncated"], 295);
    let environments = &report["statekeeper"]["environments"];
    assert_eq!(environments["added"]["count"], 3);
    assert_eq!(environments["changed"]["count"], 0);
    for environment in environments["added"]["items"].as_array().unwrap() {
        let models = &environment["models"];
        assert!(models["items"].as_array().unwrap().len() <= 5);
        assert_eq!(
            models["count"].as_u64().unwrap() - models["truncated"].as_u64().unwrap(),
            models["items"].as_array().unwrap().len() as u64
        );
    }
    let text = ok(&cli(&db.url, &["state", "diff", &side, "--limit", "5"]));
    assert!(
        text.contains("model versions: 300 added, 0 removed"),
        "{text}"
    );
    assert!(
        text.contains("  … and 295 more added (--limit shows more)"),
        "{text}"
    );

    // Nothing differs: exit 0 too, and JSON says so.
    let now = store.backup().await.unwrap();
    let out = ok(&cli(
        &db.url,
        &["state", "diff", &format!("backup:{}", now.id), "-o", "json"],
    ));
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["identical"], true);
    let text = ok(&cli(&db.url, &["state", "diff", "live"]));
    assert!(text.ends_with("no differences\n"), "{text}");
}

#[tokio::test]
async fn bad_sides_are_refused_clearly_and_leave_no_scratch_schema() {
    let db = TestDb::new().await;
    let (store, backup) = generated(&db).await;
    let fail = |args: &[&str]| {
        let out = cli(&db.url, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let stderr = fail(&["state", "diff", "backup:20200101000000000"]);
    assert!(
        stderr.contains("backup \"20200101000000000\" of schema \"statekeeper\" not found"),
        "{stderr}"
    );
    let stderr = fail(&["state", "diff", "backup:last-tuesday"]);
    assert!(stderr.contains("backup ids are 17 digits"), "{stderr}");
    let stderr = fail(&["state", "diff", "-", "-"]);
    assert!(
        stderr.contains("only one side can be read from stdin"),
        "{stderr}"
    );
    let missing = scratch_file("missing.json");
    let _ = std::fs::remove_file(&missing);
    fail(&["state", "diff", &missing.to_string_lossy()]);

    // A file cut short: the import's own refusal, and its scratch schema is gone.
    let whole = scratch_file("whole.json");
    export_file(&store, &whole, ExportFormat::Exact).await;
    let bytes = std::fs::read(&whole).unwrap();
    let corrupt = scratch_file("corrupt.json");
    std::fs::write(&corrupt, &bytes[..bytes.len() / 2]).unwrap();
    let corrupt = corrupt.to_string_lossy().into_owned();
    let side = format!("backup:{backup}");
    let stderr = fail(&["state", "diff", &side, &corrupt]);
    assert!(stderr.contains("not importable"), "{stderr}");
    let out = cli(&db.url, &["state", "diff", &corrupt, "-o", "json"]);
    let error: Value = serde_json::from_slice(&out.stderr).unwrap();
    assert_eq!(error["error"]["reason"], "InvalidExport");
    // Through the engine, a good file with a bad one: both scratch schemas are dropped.
    let failed = store
        .diff(
            file(&whole).await,
            file(Path::new(&corrupt)).await,
            &DiffOptions::default(),
        )
        .await;
    assert!(matches!(failed, Err(Error::InvalidExport(_))), "{failed:?}");
    assert!(scratch_schemas(&db).await.is_empty());

    // Another framework's file is refused as an import refuses it.
    let meltano_file = scratch_file("not-statekeeper.json");
    std::fs::write(
        &meltano_file,
        r#"{"dev:tap-a": {"completed": {}, "partial": {}}}"#,
    )
    .unwrap();
    fail(&["state", "diff", &meltano_file.to_string_lossy()]);
    assert!(scratch_schemas(&db).await.is_empty());
}

#[tokio::test]
async fn a_rollback_plan_says_what_it_restores_and_undoes_in_the_cli_and_the_state_migration() {
    let (db, project) = planned().await;
    let store = db.store("sqlmesh").await.with_framework(Framework::Sqlmesh);
    let backup = store.backup().await.unwrap();
    let file = scratch_file("plan-import.json");
    export_file(&store, &file, ExportFormat::Sqlmesh).await;
    let (path, from, to) = PROD_CHANGE;
    project.edit(path, from, to);
    project.plan("prod", &[]);

    let args = [
        "state",
        "plan",
        "--framework",
        "sqlmesh",
        "rollback",
        "--backup-id",
        &backup.id,
    ];
    let text = ok(&cli(&db.url, &args));
    assert!(
        text.contains(&format!(
            "changes (the store now → backup {}: what the rollback",
            backup.id
        )),
        "{text}"
    );
    assert!(text.contains("  1 environment changed: prod ("), "{text}");
    assert!(text.contains("  snapshots: 1 removed ("), "{text}");
    let mut json_args = args.to_vec();
    json_args.extend(["-o", "json"]);
    let cli_plan: Value = serde_json::from_str(&ok(&cli(&db.url, &json_args))).unwrap();
    let summary = cli_plan["changes"]["summary"].clone();
    assert!(
        summary[0].as_str().unwrap().contains("prod"),
        "{cli_plan:#}"
    );

    // The StateMigration shows the same lines in status.plan, and the same hash.
    let h = Harness::new();
    put_secret(&h.kube, "pg-credentials", &[("password", &db.password())]);
    h.kube.put(
        &store_path("analytics"),
        store_for(
            &db,
            "analytics",
            json!({"framework": "sqlmesh", "schema": null}),
        ),
    );
    h.kube.put(
        &migration_path("undo"),
        state_migration(
            "undo",
            "2026-11-27T10:00:00Z",
            json!({"rollback": {"backupId": backup.id}, "dryRun": true}),
        ),
    );
    let (_, migration) = h.reconcile_migration("undo").await;
    let status = migration.status.unwrap();
    assert_eq!(status.phase.as_deref(), Some("Planned"));
    let changes = status.plan.unwrap().changes.unwrap();
    assert_eq!(json!(changes.summary), summary);
    assert_eq!(changes.compared, cli_plan["changes"]["compared"]);
    assert_eq!(status.plan_hash.as_deref(), cli_plan["hash"].as_str());

    // An import planned with its file (exported before the plan): a replace undoes what the file
    // lacks; a merge only adds.
    let mut conn = db.conn().await;
    let before = support::snapshot(&mut conn, "sqlmesh").await;
    let from = file.to_string_lossy().into_owned();
    let replace: Value = serde_json::from_str(&ok(&cli(
        &db.url,
        &[
            "state",
            "plan",
            "--framework",
            "sqlmesh",
            "import",
            "--from",
            &from,
            "--replace",
            "-o",
            "json",
        ],
    )))
    .unwrap();
    let lines = replace["changes"]["summary"].to_string();
    assert!(lines.contains("1 environment changed: prod"), "{replace:#}");
    assert!(lines.contains("removed"), "{replace:#}");
    let merge: Value = serde_json::from_str(&ok(&cli(
        &db.url,
        &[
            "state",
            "plan",
            "--framework",
            "sqlmesh",
            "import",
            "--from",
            &from,
            "-o",
            "json",
        ],
    )))
    .unwrap();
    let lines = merge["changes"]["summary"].to_string();
    assert!(
        merge["changes"]["compared"]
            .as_str()
            .unwrap()
            .contains("merged"),
        "{merge:#}"
    );
    assert!(!lines.contains("removed"), "{merge:#}");
    assert_eq!(
        support::snapshot(&mut conn, "sqlmesh").await,
        before,
        "plans change nothing"
    );
    assert!(scratch_schemas(&db).await.is_empty());
}
