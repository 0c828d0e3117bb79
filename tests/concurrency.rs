//! Concurrent clients on one store (docs/reliability.md#concurrent-clients): eight clients at
//! once for `STATEKEEPER_CONCURRENCY_SECONDS` (default 15 in the test command; the full run is
//! 60) — a writer inserting what a framework would (a new model version promoted into an
//! environment, one transaction each), the CLI exporting, merging an import, running the janitor,
//! taking backups and rolling back, and the real reconcilers reporting the store's status and
//! running one-shot StateExports.
//!
//! Checked: operations that take the store's lock never overlap (pg_locks sampled all along);
//! no deadlock and no operation fails except with a clear `StoreBusy`; no writer row is lost
//! (a row may only be missing because a rollback restored a backup made before it, which the
//! backup itself shows); every export imports into a fresh store, each writer transaction in it
//! whole, holding every row committed before the export began and none committed after it ended.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sqlx::{AssertSqlSafe, Connection, PgConnection, Row};
use statekeeper::engine::generator::GenerateOptions;
use statekeeper::engine::{ExportFormat, ExportOptions, ImportMode, ImportOptions};
use support::TestDb;
use support::operator::*;

const SCHEMA: &str = "sqlmesh_state";
const WRITER_ENV: &str = "writer_env";

/// One writer transaction: a model version and its promotion into `writer_env`.
struct Written {
    name: String,
    /// When the transaction began: how long the writer waited shows against `committed`.
    began: Instant,
    /// Before COMMIT was sent (the row may be visible from here on)…
    committing: Instant,
    /// …and after it returned (visible to everyone from here on).
    committed: Instant,
}

/// One operation of a client.
struct Operation {
    client: &'static str,
    started: Instant,
    ended: Instant,
    /// None when it succeeded; the reason otherwise.
    failed: Option<String>,
    output: Value,
}

#[derive(Default)]
struct Log {
    operations: Vec<Operation>,
    /// Milliseconds each operation waited for the store's lock (from the debug log).
    lock_waits_ms: Vec<u64>,
}

type Shared = Arc<Mutex<Log>>;

fn record(log: &Shared, operation: Operation, waits: impl IntoIterator<Item = u64>) {
    let mut log = log.lock().unwrap();
    log.lock_waits_ms.extend(waits);
    log.operations.push(operation);
}

/// The lock waits in a debug log (`took the store's lock … waited_ms=N`).
fn lock_waits(log: &str) -> Vec<u64> {
    log.lines()
        .filter(|line| line.contains("took the store's lock"))
        .filter_map(|line| {
            let after = line.split("waited_ms=").nth(1)?;
            after
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// Runs `statekeeper state … ARGS -o json` against the store; records it.
async fn cli(db: &TestDb, log: &Shared, client: &'static str, args: &[&str]) -> Option<Value> {
    let started = Instant::now();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_statekeeper"))
        .args(["state", "--schema", SCHEMA, "-o", "json"])
        .args(args)
        .env("STATEKEEPER_DATABASE_URL", &db.url)
        .env("STATEKEEPER_LOG", "statekeeper::engine::store=debug")
        .env_remove("STATEKEEPER_FAILPOINT")
        .output()
        .await
        .expect("run statekeeper");
    let ended = Instant::now();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let output: Value = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    let failed = (!out.status.success()).then(|| {
        stderr
            .lines()
            .find_map(|line| serde_json::from_str::<Value>(line).ok())
            .and_then(|e| {
                let reason = e["error"]["reason"].as_str()?;
                Some(if reason == "StoreBusy" {
                    reason.to_owned()
                } else {
                    format!("{reason}: {}", e["error"]["message"])
                })
            })
            .unwrap_or_else(|| format!("{client} failed: {stderr}"))
    });
    let succeeded = failed.is_none();
    record(
        log,
        Operation {
            client,
            started,
            ended,
            failed,
            output: output.clone(),
        },
        lock_waits(&stderr),
    );
    succeeded.then_some(output)
}

/// The writer: one transaction per new model version, promoted into `writer_env`.
async fn writer(db: &TestDb, until: Instant) -> (Vec<Written>, usize) {
    let mut conn = db.conn().await;
    let (mut written, mut refused) = (Vec::new(), 0);
    let mut n = 0;
    while Instant::now() < until {
        n += 1;
        let name = format!("writer_model_{n:06}");
        let began = Instant::now();
        let mut tx = conn.begin().await.expect("begin");
        let inserted = async {
            let id: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
                "INSERT INTO {SCHEMA}.model_versions (name, fingerprint, version) \
                 VALUES ($1, 'fp', '1') RETURNING id"
            )))
            .bind(&name)
            .fetch_one(&mut *tx)
            .await?;
            sqlx::query(AssertSqlSafe(format!(
                "INSERT INTO {SCHEMA}.virtual_environment_refs (environment, model_name, model_version_id) \
                 VALUES ($1, $2, $3)"
            )))
            .bind(WRITER_ENV)
            .bind(&name)
            .bind(id)
            .execute(&mut *tx)
            .await?;
            Ok::<_, sqlx::Error>(())
        }
        .await;
        if inserted.is_err() {
            // A framework retries a refused write; it was never committed, so never counted.
            refused += 1;
            let _ = tx.rollback().await;
            continue;
        }
        let committing = Instant::now();
        if tx.commit().await.is_err() {
            refused += 1;
            continue;
        }
        written.push(Written {
            name,
            began,
            committing,
            committed: Instant::now(),
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (written, refused)
}

/// Samples pg_locks: the most sessions ever seen holding the store's lock at once, and how many
/// samples saw it held.
async fn watch_lock(db: &TestDb, until: Instant) -> (i64, usize, usize) {
    let mut conn = db.conn().await;
    let (mut most, mut held, mut samples) = (0, 0, 0);
    while Instant::now() < until {
        let holders: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted \
             AND classid = 1398033232::oid AND objsubid = 2 \
             AND objid = (hashtext($1)::bigint & 4294967295)::oid",
        )
        .bind(SCHEMA)
        .fetch_one(&mut conn)
        .await
        .expect("read pg_locks");
        most = most.max(holders);
        held += usize::from(holders > 0);
        samples += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (most, held, samples)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

async fn writer_rows(
    conn: &mut PgConnection,
    schema: &str,
) -> (BTreeSet<String>, BTreeSet<String>) {
    let versions = sqlx::query(AssertSqlSafe(format!(
        "SELECT name FROM {schema}.model_versions WHERE name LIKE 'writer_model_%'"
    )))
    .fetch_all(&mut *conn)
    .await
    .expect("read versions")
    .iter()
    .map(|r| r.get::<String, _>(0))
    .collect();
    let promoted = sqlx::query(AssertSqlSafe(format!(
        "SELECT r.model_name FROM {schema}.virtual_environment_refs r \
         JOIN {schema}.model_versions v ON v.id = r.model_version_id AND v.name = r.model_name \
         WHERE r.environment = '{WRITER_ENV}'"
    )))
    .fetch_all(&mut *conn)
    .await
    .expect("read refs")
    .iter()
    .map(|r| r.get::<String, _>(0))
    .collect();
    (versions, promoted)
}

#[tokio::test(flavor = "current_thread")]
async fn eight_clients_at_once_serialize_lose_nothing_and_export_consistent_states() {
    let run_for = support::seconds_from_env("STATEKEEPER_CONCURRENCY_SECONDS", 15);
    let db = TestDb::new().await;
    let store = db.store(SCHEMA).await;
    store.init(None).await.unwrap();
    store
        .generate(&GenerateOptions {
            model_versions: 400,
            environments: 6,
            checkpoints_per_environment: 3,
            ..Default::default()
        })
        .await
        .unwrap();
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {SCHEMA}.virtual_environments (name, plan_id) VALUES ('{WRITER_ENV}', 'writer')"
    )))
    .execute(&mut db.conn().await)
    .await
    .unwrap();
    // A first backup, for the rollback client.
    store.backup().await.unwrap();
    // The file the import client merges: another store's state, in the logical format.
    let dir = temp_dir("concurrency");
    let other = TestDb::new().await;
    let other_store = other.store(SCHEMA).await;
    other_store.init(None).await.unwrap();
    other_store
        .generate(&GenerateOptions {
            model_versions: 200,
            environments: 4,
            seed: 7,
            ..Default::default()
        })
        .await
        .unwrap();
    let merge_file = dir.join("merge.json");
    other_store
        .export(
            tokio::fs::File::create(&merge_file).await.unwrap(),
            &ExportOptions {
                format: ExportFormat::Statekeeper,
                compression: statekeeper::engine::Compression::None,
                environments: None,
            },
        )
        .await
        .unwrap();

    // The operator: its logs (lock waits) captured at debug level.
    let logs = Arc::new(Mutex::new(Vec::<u8>::new()));
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter("statekeeper::engine::store=debug")
        .with_ansi(false)
        .with_writer({
            let logs = logs.clone();
            move || support::Captured(logs.clone())
        })
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let h = Harness::new();
    put_secret(&h.kube, "pg-credentials", &[("password", &db.password())]);
    let store_object = store_for(&db, "analytics", json!({}));

    let log: Shared = Arc::default();
    let start = Instant::now();
    let until = start + run_for;
    let merge_path = merge_file.display().to_string();
    let exports_dir = dir.join("cli");
    std::fs::create_dir_all(&exports_dir).unwrap();
    let operator_dir = dir.join("operator");
    std::fs::create_dir_all(&operator_dir).unwrap();

    let repeat = |client: &'static str, args: Vec<String>| {
        let (db, log) = (&db, log.clone());
        async move {
            while Instant::now() < until {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                cli(db, &log, client, &args).await;
            }
        }
    };
    let exporter = {
        let (db, log, exports_dir) = (&db, log.clone(), exports_dir.clone());
        async move {
            let mut n = 0;
            while Instant::now() < until {
                n += 1;
                let to = exports_dir.join(format!("export-{n:04}.json"));
                let to = to.display().to_string();
                cli(db, &log, "export", &["export", "--to", &to]).await;
            }
        }
    };
    let store_status = {
        let (h, log, object) = (&h, log.clone(), store_object.clone());
        async move {
            while Instant::now() < until {
                let started = Instant::now();
                let (_, after) = h.reconcile(&object).await;
                let ready = condition(
                    &after.status.clone().unwrap_or_default().conditions,
                    "Ready",
                );
                record(
                    &log,
                    Operation {
                        client: "operator status",
                        started,
                        ended: Instant::now(),
                        failed: (ready.0 != "True").then(|| format!("{}: {}", ready.1, ready.2)),
                        output: Value::Null,
                    },
                    [],
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let operator_exports = {
        let (h, log, operator_dir) = (&h, log.clone(), operator_dir.clone());
        async move {
            let url = format!("file://{}/", operator_dir.display());
            let mut n = 0;
            while Instant::now() < until {
                n += 1;
                let name = format!("backup-{n:04}");
                h.kube.put(
                    &export_path(&name),
                    state_export(&name, &url, json!({"format": "exact"})),
                );
                let started = Instant::now();
                let (_, export) = h.reconcile_export(&name).await;
                let status = export.status.clone().unwrap_or_default();
                let ready = export_condition(&export, "Ready");
                record(
                    &log,
                    Operation {
                        client: "operator export",
                        started,
                        ended: Instant::now(),
                        failed: (status.phase.as_deref() != Some("Succeeded"))
                            .then(|| format!("{}: {}", ready.1, ready.2)),
                        output: json!({"url": status.url}),
                    },
                    [],
                );
            }
        }
    };
    let (written, _, _, _, _, _, _, _, watched) = tokio::join!(
        writer(&db, until),
        exporter,
        repeat(
            "import --merge",
            vec![
                "import".into(),
                "--merge".into(),
                "--from".into(),
                merge_path
            ]
        ),
        repeat("janitor", vec!["janitor".into()]),
        repeat("backup", vec!["backup".into()]),
        repeat("rollback", vec!["rollback".into()]),
        store_status,
        operator_exports,
        watch_lock(&db, until),
    );
    let elapsed = start.elapsed();
    let (written, writer_refused) = written;
    let (most_holders, held_samples, samples) = watched;
    let mut log = std::mem::take(&mut *log.lock().unwrap());
    log.lock_waits_ms
        .extend(lock_waits(&String::from_utf8_lossy(&logs.lock().unwrap())));

    // No deadlock: every client ended within its last operation of the deadline.
    assert!(
        elapsed < run_for + Duration::from_secs(60),
        "the clients took {elapsed:?} for a {run_for:?} run"
    );
    // Serialized: never two sessions holding the store's lock.
    assert_eq!(
        most_holders, 1,
        "the store's lock was held by two sessions at once"
    );
    // Every failure is a clear StoreBusy (waiting longer than the lock timeout), nothing else.
    let unexpected: Vec<String> = log
        .operations
        .iter()
        .filter_map(|o| o.failed.as_ref().map(|f| (o.client, f)))
        .filter(|(_, reason)| reason.as_str() != "StoreBusy")
        .map(|(client, reason)| format!("{client}: {reason}"))
        .collect();
    assert!(unexpected.is_empty(), "operations failed: {unexpected:#?}");

    // Lost rows: every committed writer row is in the store, unless a rollback that ended after
    // it committed restored a backup without it.
    let mut conn = db.conn().await;
    let (versions, promoted) = writer_rows(&mut conn, SCHEMA).await;
    let rollbacks: Vec<(Instant, String)> = log
        .operations
        .iter()
        .filter(|o| o.client == "rollback" && o.failed.is_none())
        .map(|o| {
            (
                o.ended,
                o.output["restoredBackup"]["schema"]
                    .as_str()
                    .expect("the rollback names the backup it restored")
                    .to_owned(),
            )
        })
        .collect();
    let mut backup_rows: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (_, backup) in &rollbacks {
        if !backup_rows.contains_key(backup) {
            let (rows, _) = writer_rows(&mut conn, &format!("\"{backup}\"")).await;
            backup_rows.insert(backup.clone(), rows);
        }
    }
    let (mut lost, mut rolled_back) = (Vec::new(), 0);
    for row in &written {
        if versions.contains(&row.name) && promoted.contains(&row.name) {
            continue;
        }
        let explained = rollbacks.iter().any(|(ended, backup)| {
            *ended > row.committing && !backup_rows[backup].contains(&row.name)
        });
        if explained {
            rolled_back += 1;
        } else {
            lost.push(row.name.clone());
        }
    }

    // Every export imports into a fresh store and is a consistent instant of the store.
    let fresh = TestDb::new().await;
    let fresh_store = fresh.store(SCHEMA).await;
    fresh_store.init(None).await.unwrap();
    let mut fresh_conn = fresh.conn().await;
    let mut exports_checked = 0;
    // The full run checks every export; the bounded one (in the test command) every n-th, about 40.
    let made = log
        .operations
        .iter()
        .filter(|o| o.failed.is_none() && matches!(o.client, "export" | "operator export"))
        .count();
    let every = if run_for >= Duration::from_secs(60) {
        1
    } else {
        (made / 40).max(1)
    };
    let (mut cli_exports, mut seen) = (0, 0);
    for operation in &log.operations {
        let path = match operation.client {
            "export" => {
                cli_exports += 1;
                exports_dir
                    .join(format!("export-{cli_exports:04}.json"))
                    .display()
                    .to_string()
            }
            "operator export" => operation.output["url"]
                .as_str()
                .unwrap_or_default()
                .trim_start_matches("file://")
                .to_owned(),
            _ => continue,
        };
        if operation.failed.is_some() {
            continue;
        }
        seen += 1;
        if seen % every != 0 {
            continue;
        }
        let file = tokio::fs::File::open(&path).await.unwrap();
        fresh_store
            .import(
                file,
                &ImportOptions {
                    mode: ImportMode::Replace,
                    expected_sha256: None,
                    ..Default::default()
                },
            )
            .await
            .unwrap_or_else(|e| panic!("{path} does not import into a fresh store: {e}"));
        let (versions, promoted) = writer_rows(&mut fresh_conn, SCHEMA).await;
        assert_eq!(
            versions, promoted,
            "{path}: a writer transaction is cut in two"
        );
        for row in &written {
            if versions.contains(&row.name) {
                assert!(
                    row.committing < operation.ended,
                    "{path} holds {} committed after the export ended",
                    row.name
                );
            } else {
                let removed_since = rollbacks.iter().any(|(ended, _)| {
                    *ended > row.committing && *ended < operation.ended + Duration::from_secs(1)
                });
                assert!(
                    row.committed > operation.started || removed_since,
                    "{path} misses {}, committed before the export began",
                    row.name
                );
            }
        }
        exports_checked += 1;
    }

    // The figures.
    let mut per_client: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for o in &log.operations {
        let entry = per_client.entry(o.client).or_default();
        if o.failed.is_none() {
            entry.0 += 1;
        } else {
            entry.1 += 1;
        }
    }
    let mut waits = log.lock_waits_ms.clone();
    waits.sort_unstable();
    println!("concurrency: {} s, 8 clients", run_for.as_secs());
    let mut writer_ms: Vec<u64> = written
        .iter()
        .map(|w| w.committed.duration_since(w.began).as_millis() as u64)
        .collect();
    writer_ms.sort_unstable();
    println!(
        "concurrency: writer: {} transactions committed ({writer_refused} refused and retried); \
         each took p50 {} ms, p99 {} ms, max {} ms (waiting for operations that replace rows)",
        written.len(),
        percentile(&writer_ms, 50.0),
        percentile(&writer_ms, 99.0),
        writer_ms.last().copied().unwrap_or(0)
    );
    for (client, (ok, busy)) in &per_client {
        println!("concurrency: {client:<16} {ok:>5} completed, {busy:>3} StoreBusy");
    }
    println!(
        "concurrency: lock waits: {} acquisitions, p50 {} ms, p99 {} ms, max {} ms",
        waits.len(),
        percentile(&waits, 50.0),
        percentile(&waits, 99.0),
        waits.last().copied().unwrap_or(0)
    );
    println!(
        "concurrency: the store's lock held in {held_samples} of {samples} pg_locks samples, never by two sessions"
    );
    println!(
        "concurrency: {exports_checked} of {made} exports imported into a fresh store, each a consistent instant"
    );
    println!(
        "concurrency: writer rows: {} committed, {rolled_back} removed by a rollback to an earlier backup, {} lost",
        written.len(),
        lost.len()
    );
    assert!(lost.is_empty(), "writer rows lost: {lost:?}");
    assert!(
        exports_checked > 0 && !rollbacks.is_empty(),
        "the run exercised exports and rollbacks"
    );
    assert!(!waits.is_empty(), "lock waits were measured");
}
