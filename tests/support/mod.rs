//! Shared test harness: a real throwaway PostgreSQL (no mocks) and one fresh database per test.
//! Each test binary uses the server named by STATEKEEPER_TEST_DATABASE_URL, or starts its own
//! through scripts/throwaway-postgres.sh, which stops it when the test process exits.
#![allow(dead_code)]

pub mod azure;
pub mod cel_cost;
pub mod fake_kube;
pub mod gcs;
pub mod meltano;
pub mod operator;
pub mod s3;
pub mod sqlmesh;

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use sqlx::{AssertSqlSafe, Connection, PgConnection, Row};
use statekeeper::engine::{ConnectionSettings, SchemaName, Store};

static ADMIN_URL: OnceLock<String> = OnceLock::new();
static NEXT_DB: AtomicUsize = AtomicUsize::new(0);

/// The superuser URL of the test server (its `postgres` database).
pub fn admin_url() -> &'static str {
    ADMIN_URL.get_or_init(|| {
        if let Ok(url) = std::env::var("STATEKEEPER_TEST_DATABASE_URL") {
            return url;
        }
        start_throwaway("throwaway-postgres.sh", "STATEKEEPER_PG_URL")
    })
}

/// Starts a throwaway server with `scripts/<script> start`, stopped by the script once this test
/// process exits, and returns the `variable=value` it prints.
pub fn start_throwaway(script: &str, variable: &str) -> String {
    start_throwaway_all(script)
        .remove(variable)
        .unwrap_or_else(|| panic!("scripts/{script} printed no {variable}"))
}

/// Like [`start_throwaway`]: every `VARIABLE=value` line the script prints.
pub fn start_throwaway_all(script: &str) -> BTreeMap<String, String> {
    start_throwaway_with(script, &[])
}

/// Like [`start_throwaway_all`], with further options for the script's `start`.
pub fn start_throwaway_with(script: &str, options: &[&str]) -> BTreeMap<String, String> {
    let path = format!("{}/scripts/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("bash")
        .args([
            &path,
            "start",
            "--owner-pid",
            &std::process::id().to_string(),
        ])
        .args(options)
        .output()
        .unwrap_or_else(|e| panic!("cannot run scripts/{script}: {e}"));
    assert!(
        out.status.success(),
        "scripts/{script} could not start its server:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// One plain HTTP/1.1 request to a test server at `endpoint` (`http://host:port`): the status,
/// the head (status line and headers) and the body.
pub async fn http_request(
    endpoint: &str,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let authority = endpoint.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(authority)
        .await
        .unwrap_or_else(|e| panic!("connect to the test server at {endpoint}: {e}"));
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (status, head.to_owned(), body.to_owned())
}

/// The text of every `<tag>…</tag>` in an XML document, in order.
pub fn xml_tags(xml: &str, tag: &str) -> Vec<String> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    xml.split(&open)
        .skip(1)
        .filter_map(|rest| rest.split_once(&close).map(|(value, _)| value.to_owned()))
        .collect()
}

/// A database of its own for one test.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub async fn new() -> Self {
        let admin = admin_url();
        let name = format!(
            "sk_{}_{}",
            std::process::id(),
            NEXT_DB.fetch_add(1, Ordering::SeqCst)
        );
        let mut conn = PgConnection::connect(admin)
            .await
            .expect("connect to test server");
        sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .expect("create test database");
        let url = match admin.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{name}"),
            None => panic!("admin URL has no database part"),
        };
        Self { name, url }
    }

    /// A new database that is a copy of the database `template` (whose sessions are ended
    /// first: PostgreSQL copies only a database nobody is connected to).
    pub async fn from_template(template: &str) -> Self {
        let copy = Self::new().await;
        let mut conn = PgConnection::connect(admin_url())
            .await
            .expect("connect to test server");
        sqlx::query(AssertSqlSafe(format!("DROP DATABASE {}", copy.name)))
            .execute(&mut conn)
            .await
            .expect("drop the placeholder");
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(template)
        .execute(&mut conn)
        .await
        .expect("end the template's sessions");
        sqlx::query(AssertSqlSafe(format!(
            "CREATE DATABASE {} TEMPLATE {template}",
            copy.name
        )))
        .execute(&mut conn)
        .await
        .expect("copy the template");
        copy
    }

    pub async fn store(&self, schema: &str) -> Store {
        let pool = ConnectionSettings::from_url(&self.url)
            .expect("valid url")
            .connect()
            .await
            .expect("connect");
        Store::new(pool, SchemaName::new(schema).expect("valid schema"))
    }

    pub async fn conn(&self) -> PgConnection {
        PgConnection::connect(&self.url).await.expect("connect")
    }

    /// The password of the test server, to check that no output ever contains it.
    pub fn password(&self) -> String {
        let after_scheme = self.url.split("://").nth(1).unwrap_or_default();
        let userinfo = after_scheme.split('@').next().unwrap_or_default();
        userinfo.split(':').nth(1).unwrap_or_default().to_owned()
    }
}

/// Every row of every table in a schema, as sorted JSON text: equal snapshots mean equal data.
pub async fn snapshot(conn: &mut PgConnection, schema: &str) -> BTreeMap<String, Vec<String>> {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT tablename::text FROM pg_tables WHERE schemaname = $1 ORDER BY 1",
    )
    .bind(schema)
    .fetch_all(&mut *conn)
    .await
    .expect("list tables");
    let mut out = BTreeMap::new();
    for table in tables {
        let rows: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!(
            // An alias no column is named: `to_jsonb(t)` would read a column `t`.
            "SELECT to_jsonb(whole_row)::text FROM \"{schema}\".\"{table}\" whole_row ORDER BY 1"
        )))
        .fetch_all(&mut *conn)
        .await
        .expect("read table");
        out.insert(table, rows);
    }
    out
}

/// Names of all schemas in the database that are not PostgreSQL's own.
/// The rows of the current-state tables (what an export carries), table by table.
pub async fn current_state(conn: &mut PgConnection, schema: &str) -> BTreeMap<String, Vec<String>> {
    snapshot(conn, schema)
        .await
        .into_iter()
        .filter(|(t, _)| CURRENT_STATE_TABLES.contains(&t.as_str()))
        .collect()
}

pub async fn schemas(conn: &mut PgConnection) -> Vec<String> {
    sqlx::query("SELECT nspname::text AS n FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%' AND nspname <> 'information_schema' ORDER BY 1")
        .fetch_all(conn)
        .await
        .expect("list schemas")
        .iter()
        .map(|r| r.get::<String, _>("n"))
        .collect()
}

/// Realistic rows for every table that schema version 1 defines.
pub async fn populate_v1(conn: &mut PgConnection, schema: &str) {
    let sql = format!(
        r#"
        SET search_path TO "{schema}";
        INSERT INTO model_versions (name, fingerprint, version, definition)
          SELECT 'db.model_' || i, md5(i::text), 'v' || i, jsonb_build_object('sql', 'select ' || i)
          FROM generate_series(1, 40) i;
        INSERT INTO function_versions (name, fingerprint) SELECT 'fn_' || i, md5('f' || i) FROM generate_series(1, 5) i;
        INSERT INTO physical_relations (model_version_id, relation_name)
          SELECT id, 'sk__db.model_' || id FROM model_versions;
        INSERT INTO physical_relation_ancestry SELECT id, id - 1 FROM physical_relations WHERE id > 1;
        INSERT INTO virtual_environments (name, plan_id, expires_at) VALUES
          ('prod', 'plan-1', NULL), ('dev_alice', 'plan-2', now() + interval '7 days'), ('dev_old', 'plan-3', now() - interval '1 day');
        INSERT INTO virtual_environment_refs SELECT e.name, m.name, m.id FROM virtual_environments e, model_versions m WHERE m.id % 3 = 0;
        INSERT INTO virtual_environment_function_refs SELECT e.name, f.name, f.id FROM virtual_environments e, function_versions f;
        INSERT INTO virtual_environment_checkpoints (environment, plan_id, description)
          SELECT e.name, 'plan-' || i, 'checkpoint ' || i FROM virtual_environments e, generate_series(1, 3) i;
        INSERT INTO virtual_environment_checkpoint_refs SELECT c.id, m.name, m.id FROM virtual_environment_checkpoints c, model_versions m WHERE m.id % 5 = 0;
        INSERT INTO virtual_environment_checkpoint_function_refs SELECT c.id, f.name, f.id FROM virtual_environment_checkpoints c, function_versions f;
        INSERT INTO locks (name, holder) VALUES ('plan', 'alice');
        INSERT INTO state_operations (kind, status) VALUES ('plan', 'succeeded');
        RESET search_path;
        "#
    );
    sqlx::raw_sql(AssertSqlSafe(sql))
        .execute(conn)
        .await
        .expect("populate v1 tables");
}

/// Rows for the tables that versions 2 and 3 add.
pub async fn populate_v3(conn: &mut PgConnection, schema: &str) {
    let sql = format!(
        r#"
        SET search_path TO "{schema}";
        INSERT INTO plan_runs (plan_id, environment, status) VALUES ('plan-9', 'prod', 'succeeded');
        INSERT INTO virtual_environment_ref_events (environment, model_name, new_model_version_id) VALUES ('prod', 'db.model_3', 3);
        INSERT INTO reconcile_events (source, kind, message) VALUES ('test', 'info', 'hello');
        INSERT INTO state_operation_events (operation_id, kind, message) VALUES (1, 'log', 'ran');
        INSERT INTO model_version_intervals (model_version_id, start_ts, end_ts)
          SELECT id, '2026-01-01'::timestamptz + (id || ' days')::interval, '2026-01-02'::timestamptz + (id || ' days')::interval FROM model_versions;
        RESET search_path;
        "#
    );
    sqlx::raw_sql(AssertSqlSafe(sql))
        .execute(conn)
        .await
        .expect("populate v3 tables");
}

/// host, port, user, password, database of a test database URL.
pub fn url_parts(url: &str) -> (String, u16, String, String, String) {
    let rest = url.split_once("://").expect("scheme").1;
    let (userinfo, hostpart) = rest.rsplit_once('@').expect("userinfo");
    let (user, password) = userinfo.split_once(':').expect("password");
    let (hostport, database) = hostpart.split_once('/').expect("database");
    let (host, port) = hostport.rsplit_once(':').expect("port");
    (
        host.to_owned(),
        port.parse().expect("numeric port"),
        user.to_owned(),
        password.to_owned(),
        database.to_owned(),
    )
}

/// Every current-state table (not the ledger, not history): what exports round-trip.
pub const CURRENT_STATE_TABLES: &[&str] = &[
    "model_versions",
    "model_version_intervals",
    "function_versions",
    "physical_relations",
    "physical_relation_ancestry",
    "virtual_environments",
    "virtual_environment_refs",
    "virtual_environment_function_refs",
    "virtual_environment_checkpoints",
    "virtual_environment_checkpoint_refs",
    "virtual_environment_checkpoint_function_refs",
    "locks",
    "state_operations",
];

/// A connection whose open transaction holds the store's advisory lock, as another operation
/// would; rolling it back (or dropping it) releases the lock.
pub async fn hold_store_lock(db: &TestDb, schema: &str) -> PgConnection {
    let mut holder = db.conn().await;
    sqlx::query("BEGIN")
        .execute(&mut holder)
        .await
        .expect("begin");
    sqlx::query("SELECT pg_advisory_xact_lock(1398033232, hashtext($1))")
        .bind(schema)
        .execute(&mut holder)
        .await
        .expect("take the store lock");
    holder
}

/// A `tracing` writer into a shared buffer.
pub struct Captured(pub std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut logs) = self.0.lock() {
            logs.extend_from_slice(bytes);
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// How long a bounded run lasts: `variable` (seconds) for the full run, `default` in the test
/// command.
pub fn seconds_from_env(variable: &str, default: u64) -> std::time::Duration {
    std::time::Duration::from_secs(
        std::env::var(variable)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default),
    )
}

/// A CEL rule's result on `self` (and `oldSelf` for a transition rule), as the API server's
/// validation would compute it.
pub fn evaluate_cel(
    rule: &str,
    new: &serde_json::Value,
    old: Option<&serde_json::Value>,
) -> Result<bool, String> {
    let program = cel_interpreter::Program::compile(rule).map_err(|e| e.to_string())?;
    let mut context = cel_interpreter::Context::default();
    context
        .add_variable("self", new.clone())
        .map_err(|e| e.to_string())?;
    if let Some(old) = old {
        context
            .add_variable("oldSelf", old.clone())
            .map_err(|e| e.to_string())?;
    }
    match program.execute(&context).map_err(|e| e.to_string())? {
        cel_interpreter::Value::Bool(result) => Ok(result),
        other => Err(format!("the rule gave {other:?}, not a bool")),
    }
}

/// The message of the first CEL rule (create-time: no `oldSelf`) the object breaks.
pub fn cel_violation(schema: &serde_json::Value, value: &serde_json::Value) -> Option<String> {
    for rule in schema["x-kubernetes-validations"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let text = rule["rule"].as_str().unwrap_or_default();
        if text.contains("oldSelf") {
            continue;
        }
        if evaluate_cel(text, value, None) != Ok(true) {
            return Some(rule["message"].as_str().unwrap_or(text).to_owned());
        }
    }
    if let Some(object) = value.as_object() {
        for (key, item) in object {
            if let Some(child) = schema["properties"].get(key)
                && let Some(message) = cel_violation(child, item)
            {
                return Some(message);
            }
        }
    }
    None
}
