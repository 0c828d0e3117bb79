//! The real SQLMesh, pinned, from PyPI, writing the state the tests read: no fixture typed by
//! hand. `tests/fixtures/sqlmesh` is a small project (a SEED, an incremental model with an audit,
//! a FULL model, a VIEW, a standalone audit, a `before_all` statement) planned for `prod`, a dev
//! environment and a forward-only dev environment. It is planned once per test process into a
//! template database; each test gets its own copy of the database and of the project (with its
//! DuckDB warehouse), so tests never share state.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use sqlx::{AssertSqlSafe, Connection, PgConnection};
use tokio::sync::OnceCell;

use super::{TestDb, url_parts};

/// The SQLMesh the tests run, pinned in one file that scripts/test.sh installs from too.
pub const SQLMESH_REQUIREMENTS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/sqlmesh-requirements.txt"
);

/// The pinned version, as SQLMesh records it in `_versions`.
pub fn sqlmesh_version() -> String {
    let pin = std::fs::read_to_string(SQLMESH_REQUIREMENTS).expect("read the SQLMesh pin");
    pin.trim()
        .split_once("==")
        .map(|(_, version)| version.to_owned())
        .expect("the SQLMesh pin is NAME==VERSION")
}

/// The `sqlmesh` executable: `STATEKEEPER_SQLMESH`, or installed into the test virtualenv by
/// scripts/python-env.sh (about a minute, once per machine).
pub fn sqlmesh_bin() -> &'static str {
    static BIN: OnceLock<String> = OnceLock::new();
    BIN.get_or_init(|| {
        std::env::var("STATEKEEPER_SQLMESH")
            .unwrap_or_else(|_| install_sqlmesh(SQLMESH_REQUIREMENTS, None))
    })
}

/// An older SQLMesh release (pinned in tests/fixtures/sqlmesh-old-requirements.txt, with an older
/// state schema), in a virtualenv of its own: state it writes is what `sqlmesh migrate` upgrades.
pub fn old_sqlmesh_bin() -> &'static str {
    static BIN: OnceLock<String> = OnceLock::new();
    BIN.get_or_init(|| {
        let cache = std::env::var("XDG_CACHE_HOME").unwrap_or_else(|_| {
            format!(
                "{}/.cache",
                std::env::var("HOME").unwrap_or_else(|_| "/tmp".into())
            )
        });
        install_sqlmesh(
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/sqlmesh-old-requirements.txt"
            ),
            Some(format!("{cache}/statekeeper/venv-sqlmesh-old")),
        )
    })
}

/// Installs the requirements (into `venv`, or the test virtualenv) and returns its `sqlmesh`.
fn install_sqlmesh(requirements: &str, venv: Option<String>) -> String {
    let script = format!("{}/scripts/python-env.sh", env!("CARGO_MANIFEST_DIR"));
    let mut command = Command::new("bash");
    command.args([&script, "-r", requirements]);
    if let Some(venv) = venv {
        command.env("STATEKEEPER_VENV", venv);
    }
    let out = command.output().expect("run scripts/python-env.sh");
    assert!(
        out.status.success(),
        "cannot install SQLMesh from {requirements}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let python = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    Path::new(&python)
        .with_file_name("sqlmesh")
        .to_string_lossy()
        .into_owned()
}

/// A copy of the fixture project whose state lives in one test database.
pub struct Project {
    pub dir: PathBuf,
    pub database_url: String,
    /// The warehouse: a PostgreSQL database's URL, or none for the project's DuckDB file.
    pub warehouse_url: Option<String>,
}

impl Project {
    /// A fresh copy of `tests/fixtures/sqlmesh` with its state in `db` (schema `sqlmesh`).
    pub fn new(db: &TestDb) -> Self {
        let dir = scratch_dir("project");
        copy_dir(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sqlmesh"),
            &dir,
        );
        let project = Self {
            dir,
            database_url: db.url.clone(),
            warehouse_url: None,
        };
        project.write_config();
        project
    }

    /// Like [`Project::new`], with the warehouse in the PostgreSQL database `warehouse`.
    pub fn with_postgres_warehouse(db: &TestDb, warehouse: &TestDb) -> Self {
        let mut project = Self::new(db);
        project.warehouse_url = Some(warehouse.url.clone());
        project.write_config();
        project
    }

    /// A copy of this project (models and warehouse as they are now) with its state in `db`.
    pub fn copy_for(&self, db: &TestDb) -> Self {
        let dir = scratch_dir("project");
        copy_dir(&self.dir, &dir);
        let project = Self {
            dir,
            database_url: db.url.clone(),
            warehouse_url: self.warehouse_url.clone(),
        };
        project.write_config();
        project
    }

    /// Writes config.yaml: gateway `test`, its warehouse, and its state in the test database.
    pub fn write_config(&self) {
        let connection = match &self.warehouse_url {
            None => "type: duckdb\n      database: warehouse.duckdb".to_owned(),
            Some(url) => {
                let (host, port, user, password, database) = url_parts(url);
                format!(
                    "type: postgres\n      host: {host}\n      port: {port}\n      user: {user}\n      password: {password}\n      database: {database}"
                )
            }
        };
        let (host, port, user, password, database) = url_parts(&self.database_url);
        let config = format!(
            "gateways:
  test:
    connection:
      {connection}
    state_connection:
      type: postgres
      host: {host}
      port: {port}
      user: {user}
      password: {password}
      database: {database}
default_gateway: test
model_defaults:
  dialect: duckdb
  cron: '@daily'
before_all:
  - CREATE TABLE IF NOT EXISTS audit_log (note TEXT)
"
        );
        std::fs::write(self.dir.join("config.yaml"), config).expect("write config.yaml");
    }

    /// Runs `sqlmesh ARGS` in the project.
    pub fn run(&self, args: &[&str]) -> Output {
        self.run_with(sqlmesh_bin(), args)
    }

    /// Runs `ARGS` with the `sqlmesh` executable `bin` (another release) in the project.
    pub fn run_with(&self, bin: &str, args: &[&str]) -> Output {
        // SQLMesh's local snapshot cache would make `state export` read models from disk rather
        // than from the database: without it, exports show exactly what the database holds.
        let _ = std::fs::remove_dir_all(self.dir.join(".cache"));
        Command::new(bin)
            .args(args)
            .current_dir(&self.dir)
            .env("NO_COLOR", "1")
            .output()
            .expect("run sqlmesh")
    }

    /// Runs `sqlmesh ARGS` and fails the test, with SQLMesh's output, unless it succeeds.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "sqlmesh {args:?} failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    /// `sqlmesh plan ENV --auto-apply --no-prompts`, plus `extra` flags.
    pub fn plan(&self, environment: &str, extra: &[&str]) -> String {
        let mut args = vec!["plan", environment, "--auto-apply", "--no-prompts"];
        args.extend_from_slice(extra);
        self.ok(&args)
    }

    /// Replaces `from` with `to` in a project file (a model change).
    pub fn edit(&self, file: &str, from: &str, to: &str) {
        let path = self.dir.join(file);
        let text = std::fs::read_to_string(&path).expect("read model");
        assert!(text.contains(from), "{file} has no {from:?}");
        std::fs::write(&path, text.replacen(from, to, 1)).expect("write model");
    }

    /// `sqlmesh state export` into `path` (only `environments`, when given).
    pub fn export(&self, path: &Path, environments: &[&str]) {
        let path = path.to_string_lossy();
        let mut args = vec!["state", "export", "-o", &path, "--no-confirm"];
        for environment in environments {
            args.extend(["--environment", environment]);
        }
        self.ok(&args);
    }

    /// `sqlmesh state import`, merging unless `replace`.
    pub fn import(&self, path: &Path, replace: bool) {
        let path = path.to_string_lossy();
        let mut args = vec!["state", "import", "-i", &path, "--no-confirm"];
        if replace {
            args.push("--replace");
        }
        self.ok(&args);
    }
}

/// The view change planned into `dev`.
pub const DEV_CHANGE: (&str, &str, &str) = (
    "models/top_items.sql",
    "WHERE revenue > 10",
    "WHERE revenue > 20",
);
/// The forward-only change planned into `dev_fwd`.
pub const FORWARD_ONLY_CHANGE: (&str, &str, &str) = (
    "models/daily_orders.sql",
    "  amount\nFROM",
    "  amount,\n  amount * 2 AS double_amount\nFROM",
);

/// The fixture planned for `prod`, `dev` (a changed view) and `dev_fwd` (a forward-only change
/// of the incremental model, so dev intervals exist), with the project's files back as `prod`
/// has them. Returns a database and project of the test's own.
pub async fn planned() -> (TestDb, Project) {
    static TEMPLATE: OnceCell<(String, Project)> = OnceCell::const_new();
    let (template, project) = TEMPLATE
        .get_or_init(|| async {
            let db = TestDb::new().await;
            let project = Project::new(&db);
            let planned = project.clone_handle();
            tokio::task::spawn_blocking(move || plan_fixture(&planned))
                .await
                .expect("planning the fixture");
            (db.name.clone(), project)
        })
        .await;
    let db = TestDb::from_template(template).await;
    let copy = project.copy_for(&db);
    (db, copy)
}

fn plan_fixture(project: &Project) {
    project.plan("prod", &[]);
    let (file, from, to) = DEV_CHANGE;
    project.edit(file, from, to);
    project.plan("dev", &[]);
    project.edit(file, to, from);
    let (file, from, to) = FORWARD_ONLY_CHANGE;
    project.edit(file, from, to);
    project.plan("dev_fwd", &["--forward-only"]);
    project.edit(file, to, from);
}

impl Project {
    fn clone_handle(&self) -> Self {
        Self {
            dir: self.dir.clone(),
            database_url: self.database_url.clone(),
            warehouse_url: self.warehouse_url.clone(),
        }
    }
}

fn scratch_dir(what: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "sk-sqlmesh-{what}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create dir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("dir entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy file");
        }
    }
}

/// Every row of every SQLMesh table as stored, byte for byte, but interval rows without their
/// random ids and creation times.
pub async fn sqlmesh_state(url: &str) -> std::collections::BTreeMap<String, Vec<String>> {
    let mut conn = PgConnection::connect(url).await.expect("connect");
    let mut out = std::collections::BTreeMap::new();
    for (table, select) in [
        ("_snapshots", "to_jsonb(t)"),
        ("_intervals", "to_jsonb(t) - 'id' - 'created_ts'"),
        ("_environments", "to_jsonb(t)"),
        ("_environment_statements", "to_jsonb(t)"),
        ("_auto_restatements", "to_jsonb(t)"),
        ("_versions", "to_jsonb(t)"),
    ] {
        let rows: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT ({select})::text FROM sqlmesh.{table} t ORDER BY 1"
        )))
        .fetch_all(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("read sqlmesh.{table}: {e}"));
        out.insert(table.to_owned(), rows);
    }
    out
}
