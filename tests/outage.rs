//! A database outage while the operator runs (docs/reliability.md#database-outage): the whole
//! operator (every controller, as `statekeeper operator` runs them) against the in-memory
//! Kubernetes API and a PostgreSQL server of its own, which is stopped as a crash stops it —
//! with the store idle, an export in its transaction and an import in its transaction — and
//! started again `STATEKEEPER_OUTAGE_SECONDS` later (default 20 in the test command; the full
//! run is 60).
//!
//! Checked: the operator stays up; the StateStore says why (`DatabaseUnreachable` or
//! `ConnectTimeout`) within one
//! resync; the interrupted export and import are retried, not failed, and leave nothing
//! half-applied; after the database returns everything is Ready within one backoff period
//! (`--max-backoff-seconds`, 60) and scheduled exports created meanwhile run.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{Value, json};
use sqlx::{AssertSqlSafe, Connection, PgConnection};
use statekeeper::controller::{Context, OperatorArgs, operate};
use support::TestDb;
use support::operator::*;
use tokio_util::sync::CancellationToken;

const SCHEMA: &str = "sqlmesh_state";

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    operator: OperatorArgs,
}

fn script(command: &str, dir: &str) {
    let out = std::process::Command::new("bash")
        .args([
            &format!(
                "{}/scripts/throwaway-postgres.sh",
                env!("CARGO_MANIFEST_DIR")
            ),
            command,
            dir,
        ])
        .output()
        .expect("run throwaway-postgres.sh");
    assert!(
        out.status.success(),
        "throwaway-postgres.sh {command}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The Ready condition of a stored object: (status, reason).
fn ready(h: &Harness, path: &str) -> (String, String) {
    h.kube
        .get(path)
        .and_then(|o| {
            o["status"]["conditions"]
                .as_array()?
                .iter()
                .find(|c| c["type"] == "Ready")
                .map(|c| {
                    (
                        c["status"].as_str().unwrap_or_default().to_owned(),
                        c["reason"].as_str().unwrap_or_default().to_owned(),
                    )
                })
        })
        .unwrap_or_default()
}

fn phase(h: &Harness, path: &str) -> String {
    h.kube
        .get(path)
        .and_then(|o| o["status"]["phase"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Waits until `done` holds (checked every 200 ms) or `limit` passes; returns the time taken.
async fn until(limit: Duration, mut done: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if done() {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

/// The current UTC minute (a `* * * * *` schedule falls due when it changes).
fn minute_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 60)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_rides_out_a_database_outage_and_recovers_within_one_backoff() {
    let outage = support::seconds_from_env("STATEKEEPER_OUTAGE_SECONDS", 20);
    let server = support::start_throwaway_all("throwaway-postgres.sh");
    let (admin, dir) = (&server["STATEKEEPER_PG_URL"], &server["STATEKEEPER_PG_DIR"]);
    let mut conn = PgConnection::connect(admin).await.unwrap();
    sqlx::query("CREATE DATABASE outage")
        .execute(&mut conn)
        .await
        .unwrap();
    drop(conn);
    let db = TestDb {
        name: "outage".into(),
        url: format!("{}/outage", admin.rsplit_once('/').unwrap().0),
    };
    generated_store(&db).await;
    let exports = temp_dir("outage");
    let before = support::current_state(&mut db.conn().await, SCHEMA).await;
    // The import's file: the store as it is (exact, so imported with Replace), so the import
    // changes no current row.
    let file = exports.join("before.json");
    db.store(SCHEMA)
        .await
        .export(
            tokio::fs::File::create(&file).await.unwrap(),
            &statekeeper::engine::ExportOptions::default(),
        )
        .await
        .unwrap();

    let h = Harness::new();
    put_secret(&h.kube, "pg-credentials", &[("password", &db.password())]);
    h.kube.put(
        &store_path("analytics"),
        store_for(&db, "analytics", json!({})),
    );
    let url = format!("file://{}/", exports.display());
    // Created now, as the API server would stamp it (a schedule counts occurrences from there).
    let mut nightly = state_export(
        "nightly",
        &url,
        json!({"schedule": "* * * * *", "startingDeadlineSeconds": 300}),
    );
    nightly["metadata"]["creationTimestamp"] = json!(
        k8s_openapi::jiff::Timestamp::now()
            .round(k8s_openapi::jiff::Unit::Second)
            .unwrap()
            .to_string()
    );
    h.kube.put(&export_path("nightly"), nightly);
    // The operator as `statekeeper operator` runs it, with its default backoff.
    let args = Args::parse_from([
        "statekeeper",
        "--namespace",
        NS,
        "--resync-seconds",
        "10",
        "--connect-timeout-seconds",
        "3",
        "--lock-timeout-seconds",
        "600",
    ])
    .operator;
    let max_backoff = Duration::from_secs(args.max_backoff_seconds);
    let ctx = Arc::new(Context::new(h.kube.client(), args.settings()));
    let stop = CancellationToken::new();
    let operator = tokio::spawn({
        let (ctx, stop) = (ctx.clone(), stop.clone());
        async move { operate(ctx, &args, "outage".into(), stop).await }
    });
    until(Duration::from_secs(60), || {
        ready(&h, &store_path("analytics")).0 == "True"
    })
    .await
    .expect("the store is Ready before the outage");

    // An export and an import each inside their transaction: a session of the test holds a
    // table, so the export waits for its snapshot and the import (its file staged) for its
    // exclusive locks.
    let mut holder = db.conn().await;
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query(AssertSqlSafe(format!(
        "LOCK TABLE {SCHEMA}.model_versions IN ACCESS EXCLUSIVE MODE"
    )))
    .execute(&mut holder)
    .await
    .unwrap();
    h.kube.put(
        &export_path("mid-export"),
        state_export("mid-export", &url, json!({"format": "exact"})),
    );
    h.kube.put(
        &migration_path("mid-import"),
        state_migration(
            "mid-import",
            "2026-01-01T00:00:00Z",
            json!({"import": {"source": {"url": format!("file://{}", file.display())}, "mode": "Replace"}}),
        ),
    );
    let mut watcher = PgConnection::connect(admin).await.unwrap();
    let mut inside = 0;
    for _ in 0..300 {
        inside = sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = 'outage' AND wait_event_type = 'Lock'",
        )
        .fetch_one(&mut watcher)
        .await
        .unwrap();
        if inside >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        inside, 2,
        "the export and the import never got inside their transactions"
    );
    drop(watcher);
    assert_eq!(phase(&h, &export_path("mid-export")), "Running");

    // The outage.
    script("halt", dir);
    let down = Instant::now();
    let down_minute = minute_now();
    drop(holder);
    let noticed = until(outage, || {
        // Refused connections, or the pool's attempts timing out: either names the cause.
        matches!(
            ready(&h, &store_path("analytics")).1.as_str(),
            "DatabaseUnreachable" | "ConnectTimeout"
        )
    })
    .await;
    let during = (
        ready(&h, &store_path("analytics")),
        ready(&h, &export_path("mid-export")),
        phase(&h, &export_path("mid-export")),
        ready(&h, &migration_path("mid-import")),
        phase(&h, &migration_path("mid-import")),
    );
    tokio::time::sleep(outage.saturating_sub(down.elapsed())).await;
    assert!(
        !operator.is_finished(),
        "the operator stopped during the outage"
    );
    script("resume", dir);
    // A scheduled export fell due while the database was down: it runs once it is back.
    let missed_occurrence = minute_now() != down_minute;

    // Recovery: everything Ready within one backoff period.
    let recovered = until(max_backoff + Duration::from_secs(15), || {
        ready(&h, &store_path("analytics")).0 == "True"
            && phase(&h, &export_path("mid-export")) == "Succeeded"
            && phase(&h, &migration_path("mid-import")) == "Succeeded"
    })
    .await;
    let after = (
        ready(&h, &store_path("analytics")),
        phase(&h, &export_path("mid-export")),
        ready(&h, &migration_path("mid-import")),
    );
    // Scheduled exports created before or during the outage all succeed.
    let children = || -> Vec<(String, String)> {
        h.kube
            .list(&format!(
                "/apis/statekeeper.dev/v1alpha1/namespaces/{NS}/stateexports"
            ))
            .iter()
            .filter(|e| e["metadata"]["labels"]["statekeeper.dev/schedule"] == "nightly")
            .map(|e| {
                (
                    e["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                    e["status"]["phase"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    };
    until(max_backoff + Duration::from_secs(15), || {
        let children = children();
        (!missed_occurrence || !children.is_empty())
            && children.iter().all(|(_, phase)| phase == "Succeeded")
    })
    .await;
    let scheduled = children();
    let export_attempts = h
        .kube
        .get(&export_path("mid-export"))
        .map(|e| e["status"]["attempts"].clone())
        .unwrap_or(Value::Null);
    stop.cancel();
    let stayed_up = tokio::time::timeout(Duration::from_secs(30), operator).await;

    println!(
        "outage: {} s; noticed after {:?} ({:?}); during: {during:?}",
        outage.as_secs(),
        noticed,
        ready(&h, &store_path("analytics"))
    );
    println!(
        "outage: recovered {:?} after the database returned (max backoff {} s); after: {after:?}; \
         mid-export attempts {export_attempts}; scheduled children {scheduled:?}; schedule status {}",
        recovered,
        max_backoff.as_secs(),
        h.kube
            .get(&export_path("nightly"))
            .map(|e| e["status"].to_string())
            .unwrap_or_default()
    );
    let noticed =
        noticed.expect("the StateStore said the database is unreachable during the outage");
    assert!(noticed < Duration::from_secs(10) + max_backoff);
    assert_ne!(during.2, "Failed", "the interrupted export failed for good");
    assert_ne!(during.4, "Failed", "the interrupted import failed for good");
    assert!(
        recovered.is_some(),
        "not everything was Ready within one backoff period: {after:?}"
    );
    assert!(
        (!missed_occurrence || !scheduled.is_empty())
            && scheduled.iter().all(|(_, phase)| phase == "Succeeded"),
        "scheduled exports (an occurrence fell in the outage: {missed_occurrence}): {scheduled:?}"
    );
    // Nothing half-applied: the import of the store's own state changed no current row.
    assert_eq!(
        support::current_state(&mut db.conn().await, SCHEMA).await,
        before
    );
    assert!(
        matches!(stayed_up, Ok(Ok(Ok(())))),
        "the operator did not stop cleanly: {stayed_up:?}"
    );
}
