//! A restore of SQLMesh's state reaches the warehouse: after a bad `sqlmesh plan` and a
//! rollback (or a failed `state run --backup`, or an import), the views of every environment the
//! restore changed select from the restored snapshots' tables again, through SQLMesh's own code.
//! Everything is written by the real SQLMesh, on a DuckDB and on a PostgreSQL warehouse.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

use sqlx::{Connection, PgConnection};
use support::TestDb;
use support::sqlmesh::{DEV_CHANGE, Project, old_sqlmesh_bin, sqlmesh_bin, sqlmesh_version};
use tokio::sync::OnceCell;

/// The bad change: the prod view `top_items` keeps no row.
const BAD_CHANGE: (&str, &str, &str) = (
    "models/top_items.sql",
    "WHERE revenue > 10",
    "WHERE revenue > 1000000",
);
/// A model the bad plan adds: its view must go with the rollback.
const BAD_MODEL: &str = "models/bad_model.sql";

/// A planned project (prod, and dev with a changed view), backed up by statekeeper, then a bad
/// plan into prod that also adds a model and an environment `hotfix`; the project's files are
/// back as the backup has them. Each test gets its own copy (state, warehouse and project).
struct Scenario {
    _db: TestDb,
    _warehouse: Option<TestDb>,
    project: Project,
    backup: String,
    rows_before: i64,
}

/// A planned scenario: the project, the backup and the rows its prod view had.
struct Template {
    project: Project,
    backup: String,
    rows_before: i64,
}

async fn scenario(postgres_warehouse: bool) -> Scenario {
    // A PostgreSQL warehouse's database name is the catalog in every model name SQLMesh
    // stores, so a copy under another name is another warehouse: each test plans its own.
    if postgres_warehouse {
        let (template, db, warehouse) = plan_scenario(true).await;
        return Scenario {
            _db: db,
            _warehouse: warehouse,
            project: template.project,
            backup: template.backup,
            rows_before: template.rows_before,
        };
    }
    static DUCKDB: OnceCell<(String, Template)> = OnceCell::const_new();
    let (db_name, template) = DUCKDB
        .get_or_init(|| async {
            let (template, db, _) = plan_scenario(false).await;
            (db.name.clone(), template)
        })
        .await;
    let db = TestDb::from_template(db_name).await;
    let project = template.project.copy_for(&db);
    Scenario {
        _db: db,
        _warehouse: None,
        project,
        backup: template.backup.clone(),
        rows_before: template.rows_before,
    }
}

async fn plan_scenario(postgres_warehouse: bool) -> (Template, TestDb, Option<TestDb>) {
    let db = TestDb::new().await;
    let warehouse = if postgres_warehouse {
        Some(TestDb::new().await)
    } else {
        None
    };
    let project = match &warehouse {
        Some(warehouse) => Project::with_postgres_warehouse(&db, warehouse),
        None => Project::new(&db),
    };
    let project = tokio::task::spawn_blocking(move || {
        project.plan("prod", &[]);
        let (file, from, to) = DEV_CHANGE;
        project.edit(file, from, to);
        project.plan("dev", &[]);
        project.edit(file, to, from);
        project
    })
    .await
    .expect("planning");
    let rows_before = count(&project, "shop.top_items").await;
    assert!(rows_before > 0, "the fixture's top_items has rows");
    let backup = backup_id(&project);
    let project = tokio::task::spawn_blocking(move || {
        let (file, from, to) = BAD_CHANGE;
        project.edit(file, from, to);
        std::fs::write(
            project.dir.join(BAD_MODEL),
            "MODEL (name shop.bad_model, kind VIEW);\n\nSELECT 1 AS one\n",
        )
        .expect("write the bad model");
        project.plan("prod", &[]);
        project.plan("hotfix", &["--include-unmodified"]);
        project.edit(file, to, from);
        std::fs::remove_file(project.dir.join(BAD_MODEL)).expect("remove the bad model");
        project
    })
    .await
    .expect("the bad plan");
    assert_eq!(
        count(&project, "shop.top_items").await,
        0,
        "the bad plan ran"
    );
    let template = Template {
        project,
        backup,
        rows_before,
    };
    (template, db, warehouse)
}

/// `statekeeper ARGS` against the project's state, with the tests' SQLMesh first on PATH.
fn statekeeper(project: &Project, args: &[&str]) -> Output {
    let bin_dir = Path::new(sqlmesh_bin()).parent().expect("venv bin");
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    Command::new(env!("CARGO_BIN_EXE_statekeeper"))
        .args(args)
        .env("STATEKEEPER_DATABASE_URL", &project.database_url)
        .env("STATEKEEPER_FRAMEWORK", "sqlmesh")
        .env_remove("STATEKEEPER_SCHEMA")
        .env("PATH", path)
        .current_dir(&project.dir)
        .output()
        .expect("run statekeeper")
}

/// `statekeeper state rollback` to the scenario's backup, re-pointing views, with `extra` flags.
fn rollback_repointing(scenario: &Scenario, extra: &[&str]) -> Output {
    let project_dir = scenario.project.dir.to_string_lossy().into_owned();
    let mut args = vec![
        "state",
        "rollback",
        "--backup-id",
        &scenario.backup,
        "--repoint-views",
        "--project",
        &project_dir,
    ];
    args.extend_from_slice(extra);
    statekeeper(&scenario.project, &args)
}

/// The command a restore prints for fixing stale views.
fn fix_command(said: &str) -> String {
    said.lines()
        .find_map(|l| l.split_once("fix them with (same --database-url): "))
        .map(|(_, command)| command.trim().to_owned())
        .unwrap_or_else(|| panic!("no command: {said}"))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn backup_id(project: &Project) -> String {
    let out = statekeeper(project, &["state", "backup", "-o", "json"]);
    assert!(out.status.success(), "backup: {}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("backup JSON");
    report["id"].as_str().expect("backup id").to_owned()
}

/// Every view of the warehouse: (schema, view) -> its definition.
async fn views(project: &Project) -> BTreeMap<(String, String), String> {
    match &project.warehouse_url {
        Some(url) => {
            let mut conn = PgConnection::connect(url).await.expect("warehouse");
            let rows: Vec<(String, String, String)> = sqlx::query_as(
                "SELECT schemaname::text, viewname::text, definition FROM pg_views
                 WHERE schemaname NOT IN ('pg_catalog', 'information_schema')",
            )
            .fetch_all(&mut conn)
            .await
            .expect("read pg_views");
            rows.into_iter().map(|(s, v, d)| ((s, v), d)).collect()
        }
        None => {
            let rows = duckdb(
                project,
                "SELECT schema_name, view_name, sql FROM duckdb_views() WHERE NOT internal",
            );
            rows.into_iter()
                .map(|row| {
                    let text = |i: usize| row[i].as_str().unwrap_or_default().to_owned();
                    ((text(0), text(1)), text(2))
                })
                .collect()
        }
    }
}

async fn count(project: &Project, view: &str) -> i64 {
    let sql = format!("SELECT count(*) FROM {view}");
    match &project.warehouse_url {
        Some(url) => {
            let mut conn = PgConnection::connect(url).await.expect("warehouse");
            sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                .fetch_one(&mut conn)
                .await
                .expect("count")
        }
        None => duckdb(project, &sql)[0][0].as_i64().expect("a count"),
    }
}

/// Rows of a query of the project's DuckDB warehouse, read with the DuckDB SQLMesh installed.
fn duckdb(project: &Project, sql: &str) -> Vec<Vec<serde_json::Value>> {
    let python = Path::new(sqlmesh_bin()).with_file_name("python");
    let script = "import duckdb, json, sys\n\
                  c = duckdb.connect('warehouse.duckdb', read_only=True)\n\
                  print(json.dumps(c.execute(sys.argv[1]).fetchall(), default=str))";
    let out = Command::new(python)
        .args(["-c", script, sql])
        .current_dir(&project.dir)
        .output()
        .expect("run python");
    assert!(out.status.success(), "duckdb: {}", text(&out));
    serde_json::from_slice(&out.stdout).expect("rows as JSON")
}

/// Each environment's promoted models (schema, table, version), as the store's state has them.
async fn promoted_models(project: &Project) -> Vec<(String, String, String, String)> {
    let mut conn = PgConnection::connect(&project.database_url)
        .await
        .expect("state");
    let rows: Vec<(String, String, String, String)> = sqlx::query_as(
        "SELECT e.name, x ->> 'name', x ->> 'version', x ->> 'fingerprint'
         FROM sqlmesh._environments e, jsonb_array_elements(e.snapshots::jsonb) x
         WHERE COALESCE(x ->> 'node_type', 'model') = 'model'
           AND (e.promoted_snapshot_ids IS NULL
            OR e.promoted_snapshot_ids::jsonb @> jsonb_build_array(
                 jsonb_build_object('name', x ->> 'name')))
         ORDER BY 1, 2",
    )
    .fetch_all(&mut conn)
    .await
    .expect("read environments");
    rows.into_iter()
        .map(|(env, name, version, _)| {
            let parts: Vec<String> = name
                .split('.')
                .map(|p| p.trim_matches('"').into())
                .collect();
            let [.., schema, table] = parts.as_slice() else {
                panic!("a model name is catalog.schema.table: {name}");
            };
            (env, schema.clone(), table.clone(), version)
        })
        .collect()
}

/// Every environment's views select from the tables of the snapshots the state names; the bad
/// plan's model and environment have no view left; the prod view returns the rows from before
/// the bad plan; and SQLMesh itself sees nothing to change.
async fn assert_views_match_state(scenario: &Scenario) {
    let project = &scenario.project;
    let views = views(project).await;
    let promoted = promoted_models(project).await;
    assert!(promoted.iter().any(|(env, ..)| env == "prod"));
    assert!(promoted.iter().any(|(env, ..)| env == "dev"));
    for (env, schema, table, version) in &promoted {
        let view_schema = if env == "prod" {
            schema.clone()
        } else {
            format!("{schema}__{env}")
        };
        let definition = views
            .get(&(view_schema.clone(), table.clone()))
            .unwrap_or_else(|| panic!("no view {view_schema}.{table}; views: {views:#?}"));
        let physical = format!("{schema}__{table}__{version}");
        assert!(
            definition.contains(&physical),
            "{view_schema}.{table} should select from {physical}: {definition}"
        );
    }
    assert!(
        !views.keys().any(|(_, view)| view == "bad_model"),
        "the bad plan's model keeps a view: {views:#?}"
    );
    assert!(
        !views.keys().any(|(schema, _)| schema.ends_with("__hotfix")),
        "the environment the rollback removed keeps views: {views:#?}"
    );
    assert_eq!(
        count(project, "shop.top_items").await,
        scenario.rows_before,
        "the prod view returns the rows from before the bad plan"
    );
    let plan = project.run(&["plan", "--no-prompts"]);
    let said = text(&plan);
    assert!(
        plan.status.success() && said.contains("No changes to plan"),
        "sqlmesh plan should have nothing to change: {said}"
    );
}

async fn rollback_repoints_views(postgres_warehouse: bool) {
    let scenario = scenario(postgres_warehouse).await;
    let out = rollback_repointing(&scenario, &["--gateway", "test"]);
    let said = text(&out);
    assert!(out.status.success(), "rollback: {said}");
    assert!(
        said.contains("views of environment prod re-pointed") && said.contains("hotfix"),
        "{said}"
    );
    assert!(!said.contains("STALE"), "{said}");
    assert_views_match_state(&scenario).await;
}

#[tokio::test]
async fn rollback_repoints_the_views_of_a_duckdb_warehouse() {
    rollback_repoints_views(false).await;
}

#[tokio::test]
async fn rollback_repoints_the_views_of_a_postgres_warehouse() {
    rollback_repoints_views(true).await;
}

#[tokio::test]
async fn an_unreachable_warehouse_leaves_the_restore_and_prints_the_command_that_fixes_it() {
    let mut scenario = scenario(true).await;
    let reachable = scenario.project.warehouse_url.clone();
    // Nothing listens on port 1: the warehouse refuses every connection.
    scenario.project.warehouse_url = reachable.as_ref().map(|url| {
        let (base, database) = url.rsplit_once('/').expect("database");
        let (host_part, _port) = base.rsplit_once(':').expect("port");
        format!("{host_part}:1/{database}")
    });
    scenario.project.write_config();
    let project_dir = scenario.project.dir.to_string_lossy().into_owned();
    let out = rollback_repointing(&scenario, &[]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(3), "restored, views stale: {said}");
    assert!(said.contains("rolled back schema \"sqlmesh\""), "{said}");
    assert!(said.contains("WarehouseUnreachable"), "{said}");
    let stale_line = said
        .lines()
        .find(|l| l.contains("VIEWS STALE"))
        .unwrap_or_else(|| panic!("no stale line: {said}"));
    for environment in ["prod", "hotfix"] {
        assert!(stale_line.contains(environment), "{stale_line}");
    }
    assert!(
        !stale_line.contains("dev ("),
        "dev did not change: {stale_line}"
    );
    let command = fix_command(&said);
    assert!(
        command.starts_with("statekeeper state repoint-views --framework sqlmesh")
            && command.contains(&project_dir),
        "{command}"
    );
    assert!(
        !said.contains(&support::url_parts(&scenario.project.database_url).3),
        "no password in the output"
    );
    // The state is restored whatever became of the views.
    let rolled_back = statekeeper(&scenario.project, &["state", "status", "-o", "json"]);
    assert!(rolled_back.status.success(), "{}", text(&rolled_back));

    // The warehouse is back: the printed command, run as printed, fixes the views.
    scenario.project.warehouse_url = reachable;
    scenario.project.write_config();
    let words: Vec<&str> = command.split_whitespace().skip(1).collect();
    let fixed = statekeeper(&scenario.project, &words);
    let said = text(&fixed);
    assert!(fixed.status.success(), "{command}: {said}");
    assert!(
        said.contains("views of environment prod re-pointed"),
        "{said}"
    );
    assert_views_match_state(&scenario).await;
    // Run again, it finds every view current and changes nothing.
    let again = statekeeper(&scenario.project, &words);
    assert!(again.status.success(), "{}", text(&again));
}

#[tokio::test]
async fn a_rollback_not_asked_to_repoint_says_how_and_a_failed_guarded_plan_is_restored_whole() {
    let scenario = scenario(false).await;
    let project = &scenario.project;
    let project_dir = project.dir.to_string_lossy().into_owned();
    // Without --repoint-views the rollback names the stale views and the command that fixes them.
    let out = statekeeper(
        project,
        &["state", "rollback", "--backup-id", &scenario.backup],
    );
    let said = text(&out);
    assert!(
        out.status.success(),
        "not asked to re-point: exit 0: {said}"
    );
    assert!(
        said.contains("VIEWS STALE") && said.contains("NotRequested"),
        "{said}"
    );
    let command = fix_command(&said).replace("PROJECT_DIR", &project_dir);
    let words: Vec<&str> = command.split_whitespace().skip(1).collect();
    let fixed = statekeeper(project, &words);
    assert!(fixed.status.success(), "{command}: {}", text(&fixed));
    assert_views_match_state(&scenario).await;

    // The bad plan again, by a command that then fails: `state run --backup` restores the state
    // and, with --repoint-views, the views.
    let (file, from, to) = BAD_CHANGE;
    project.edit(file, from, to);
    let script = format!(
        "NO_COLOR=1 {} plan --auto-apply --no-prompts >/dev/null && exit 1",
        sqlmesh_bin()
    );
    let out = statekeeper(
        project,
        &[
            "state",
            "run",
            "--backup",
            "--repoint-views",
            "--project",
            &project_dir,
            "--",
            "sh",
            "-c",
            &script,
        ],
    );
    let said = text(&out);
    project.edit(file, to, from);
    assert_eq!(out.status.code(), Some(1), "the command's status: {said}");
    assert!(
        said.contains("views of environment prod re-pointed"),
        "{said}"
    );
    assert_views_match_state(&scenario).await;
}

#[tokio::test]
async fn repointing_refuses_another_sqlmesh_version_and_other_frameworks() {
    let scenario = scenario(false).await;
    let project_dir = scenario.project.dir.to_string_lossy().into_owned();
    let out = rollback_repointing(&scenario, &["--sqlmesh", old_sqlmesh_bin()]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(3), "{said}");
    assert!(
        said.contains("SqlmeshVersionMismatch") && said.contains(&sqlmesh_version()),
        "{said}"
    );
    let other = Command::new(env!("CARGO_BIN_EXE_statekeeper"))
        .args([
            "state",
            "rollback",
            "--framework",
            "meltano",
            "--repoint-views",
            "--project",
            &project_dir,
        ])
        .env("STATEKEEPER_DATABASE_URL", &scenario.project.database_url)
        .output()
        .expect("run statekeeper");
    let said = text(&other);
    assert!(!other.status.success(), "{said}");
    assert!(
        said.contains("--repoint-views re-points SQLMesh's views"),
        "{said}"
    );
}
