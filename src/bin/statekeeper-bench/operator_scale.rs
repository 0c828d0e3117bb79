//! `statekeeper-bench operator-scale`: N StateStores in one PostgreSQL (N schemas, a few
//! Secrets) reconciled by the real operator code (`controller::operate`, every controller with
//! its watches) against the in-memory Kubernetes API the tests use. Measures the time until all
//! are Ready, the operator process's peak and idle RSS, the most PostgreSQL connections it held
//! (sampled from `pg_stat_activity`) and status writes per minute while nothing changes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::json;
use sqlx::{AssertSqlSafe, Connection, PgConnection};
use statekeeper::controller::{Context, OperatorArgs, operate};

use super::BenchResult;

#[path = "../../../tests/support/fake_kube.rs"]
#[allow(dead_code)]
mod fake_kube;

const NS: &str = "data";

pub struct Settings {
    pub admin_url: String,
    pub stores: usize,
    pub idle_seconds: u64,
    pub max_db_connections: u32,
}

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    operator: OperatorArgs,
}

pub async fn run(settings: &Settings) -> BenchResult<()> {
    let database = "bench_operator_scale";
    let mut admin = PgConnection::connect(&settings.admin_url).await?;
    sqlx::query(AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {database} WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await?;
    sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {database}")))
        .execute(&mut admin)
        .await?;
    let url = match settings.admin_url.rsplit_once('/') {
        Some((base, _)) => format!("{base}/{database}"),
        None => return Err("the database URL has no database part".into()),
    };

    // N initialised stores, 8 at a time (setup, not measured).
    let started = Instant::now();
    let pool = statekeeper::engine::ConnectionSettings::from_url(&url)?
        .with_max_connections(8)
        .connect()
        .await?;
    let schemas: Vec<String> = (0..settings.stores).map(|i| format!("s{i:05}")).collect();
    for chunk in schemas.chunks(8) {
        let inits = chunk.iter().map(|schema| {
            let store = statekeeper::engine::Store::new(
                pool.clone(),
                statekeeper::engine::SchemaName::new(schema).expect("valid schema name"),
            );
            async move { store.init(None).await }
        });
        for result in futures::future::join_all(inits).await {
            result?;
        }
    }
    pool.close().await;
    println!(
        "setup: {} schemas initialised in {:.1} s",
        settings.stores,
        started.elapsed().as_secs_f64()
    );

    // The API: a few Secrets and N StateStores.
    let kube = fake_kube::FakeKube::new();
    let (host, port, user, password) = url_parts(&url)?;
    for i in 0..3 {
        kube.put(
            &format!("/api/v1/namespaces/{NS}/secrets/pg-{i}"),
            json!({"apiVersion": "v1", "kind": "Secret",
                   "metadata": {"name": format!("pg-{i}"), "namespace": NS},
                   "data": {"password": fake_kube::base64(password.as_bytes())}}),
        );
    }
    for (i, schema) in schemas.iter().enumerate() {
        let name = format!("store-{i:05}");
        kube.put(
            &format!("/apis/statekeeper.dev/v1alpha1/namespaces/{NS}/statestores/{name}"),
            json!({"apiVersion": "statekeeper.dev/v1alpha1", "kind": "StateStore",
                   "metadata": {"name": name, "namespace": NS, "uid": format!("uid-{name}"), "generation": 1},
                   "spec": {"schema": schema, "connection": {
                       "host": host, "port": port, "database": database, "user": user,
                       "passwordSecretRef": {"name": format!("pg-{}", i % 3), "key": "password"}}}}),
        );
    }

    // Sample the operator's connections while it works.
    let sampling = Arc::new(AtomicBool::new(true));
    let peak_connections = Arc::new(AtomicI64::new(0));
    let sampler = tokio::spawn({
        let (sampling, peak, admin_url) = (
            sampling.clone(),
            peak_connections.clone(),
            settings.admin_url.clone(),
        );
        async move {
            let Ok(mut conn) = PgConnection::connect(&admin_url).await else {
                return;
            };
            while sampling.load(Ordering::Relaxed) {
                let held: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'statekeeper'",
                )
                .fetch_one(&mut conn)
                .await
                .unwrap_or(0);
                peak.fetch_max(held, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });

    let args = Args::parse_from([
        "statekeeper",
        "--namespace",
        NS,
        "--resync-seconds",
        "10",
        "--max-db-connections",
        &settings.max_db_connections.to_string(),
    ])
    .operator;
    let ctx = Arc::new(Context::new(kube.client(), args.settings()));
    let stop = tokio_util::sync::CancellationToken::new();
    super::reset_peak_rss();
    let rss_before = super::peak_rss_mib();
    let started = Instant::now();
    let operator = tokio::spawn({
        let (ctx, stop) = (ctx.clone(), stop.clone());
        async move { operate(ctx, &args, "bench".into(), stop).await }
    });
    let collection = format!("/apis/statekeeper.dev/v1alpha1/namespaces/{NS}/statestores");
    let ready = || {
        kube.list(&collection)
            .iter()
            .filter(|s| {
                s["status"]["conditions"].as_array().is_some_and(|c| {
                    c.iter()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
                })
            })
            .count()
    };
    while ready() < settings.stores {
        if started.elapsed() > Duration::from_secs(600) {
            return Err(format!(
                "only {} of {} stores Ready after 600 s",
                ready(),
                settings.stores
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let all_ready = started.elapsed();
    let peak_rss = super::peak_rss_mib();

    // Idle: nothing changes; the operator still looks at every store every 10 s.
    let writes = |kube: &fake_kube::FakeKube| {
        kube.requests()
            .iter()
            .filter(|(method, path)| method == "PATCH" && path.ends_with("/status"))
            .count()
    };
    let writes_before = writes(&kube);
    tokio::time::sleep(Duration::from_secs(settings.idle_seconds)).await;
    let idle_writes = writes(&kube) - writes_before;
    let idle_rss = super::rss_mib("VmRSS:");
    sampling.store(false, Ordering::Relaxed);
    let _ = sampler.await;
    stop.cancel();
    let _ = operator.await;

    let per_minute = idle_writes as f64 * 60.0 / settings.idle_seconds as f64;
    println!(
        "{} stores: all Ready in {:.1} s; peak RSS {:.1} MiB (process, with the in-memory API; {:.1} MiB before the operator started), idle RSS {:.1} MiB; peak PostgreSQL connections {} (limit --max-db-connections {}); status writes while idle: {} in {} s ({per_minute:.1}/min)",
        settings.stores,
        all_ready.as_secs_f64(),
        peak_rss,
        rss_before,
        idle_rss,
        peak_connections.load(Ordering::Relaxed),
        settings.max_db_connections,
        idle_writes,
        settings.idle_seconds,
    );
    println!();
    println!(
        "| stores | all Ready | peak RSS | idle RSS | peak connections (limit) | idle status writes/min |"
    );
    println!("|---|---|---|---|---|---|");
    println!(
        "| {} | {:.1} s | {:.1} MiB | {:.1} MiB | {} ({}) | {per_minute:.1} |",
        settings.stores,
        all_ready.as_secs_f64(),
        peak_rss,
        idle_rss,
        peak_connections.load(Ordering::Relaxed),
        settings.max_db_connections
    );
    Ok(())
}

fn url_parts(url: &str) -> BenchResult<(String, u16, String, String)> {
    let parsed = url::Url::parse(url)?;
    Ok((
        parsed.host_str().unwrap_or("127.0.0.1").to_owned(),
        parsed.port().unwrap_or(5432),
        parsed.username().to_owned(),
        parsed.password().unwrap_or_default().to_owned(),
    ))
}
