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
use sqlx::{Connection, PgConnection};
use statekeeper::controller::{Context, OperatorArgs, operate};

use super::BenchResult;
use super::memory::{peak_rss_mib, reset_peak_rss, rss_mib};
use super::postgres::recreate_database;

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

/// What a run saw.
struct Measurements {
    all_ready: Duration,
    /// The process before the operator started (the in-memory API with its resources).
    rss_before: f64,
    peak_rss: f64,
    idle_rss: f64,
    peak_connections: i64,
    idle_writes: usize,
}

pub async fn run(settings: &Settings) -> BenchResult<()> {
    let database = "bench_operator_scale";
    let url = recreate_database(&settings.admin_url, database).await?;
    let schemas = init_stores(&url, settings.stores).await?;
    let kube = fake_kube::FakeKube::new();
    publish_resources(&kube, &url, database, &schemas)?;

    let sampler = ConnectionSampler::start(settings.admin_url.clone());
    let args = operator_args(settings);
    let ctx = Arc::new(Context::new(kube.client(), args.settings()));
    let stop = tokio_util::sync::CancellationToken::new();
    reset_peak_rss();
    let rss_before = peak_rss_mib();
    let started = Instant::now();
    let operator = tokio::spawn({
        let (ctx, stop) = (ctx.clone(), stop.clone());
        async move { operate(ctx, &args, "bench".into(), stop).await }
    });
    let all_ready = wait_until_ready(&kube, settings.stores, started).await?;
    let peak_rss = peak_rss_mib();

    // Idle: nothing changes; the operator still looks at every store every 10 s.
    let idle_writes = status_writes_while_idle(&kube, settings.idle_seconds).await;
    let idle_rss = rss_mib("VmRSS:");
    let peak_connections = sampler.stop().await;
    stop.cancel();
    let _ = operator.await;
    print_report(
        settings,
        &Measurements {
            all_ready,
            rss_before,
            peak_rss,
            idle_rss,
            peak_connections,
            idle_writes,
        },
    );
    Ok(())
}

/// `stores` initialised stores in the database at `url`, 8 at a time (setup, not measured);
/// returns their schemas.
async fn init_stores(url: &str, stores: usize) -> BenchResult<Vec<String>> {
    let started = Instant::now();
    let pool = statekeeper::engine::ConnectionSettings::from_url(url)?
        .with_max_connections(8)
        .connect()
        .await?;
    let schemas: Vec<String> = (0..stores).map(|i| format!("s{i:05}")).collect();
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
        stores,
        started.elapsed().as_secs_f64()
    );
    Ok(schemas)
}

/// The API: a few Secrets and a StateStore for each schema.
fn publish_resources(
    kube: &fake_kube::FakeKube,
    url: &str,
    database: &str,
    schemas: &[String],
) -> BenchResult<()> {
    let (host, port, user, password) = url_parts(url)?;
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
    Ok(())
}

/// The operator's connections, sampled from `pg_stat_activity` every 50 ms while it works: the
/// pool's limit is only a promise until the server is seen keeping to it.
struct ConnectionSampler {
    sampling: Arc<AtomicBool>,
    peak: Arc<AtomicI64>,
    task: tokio::task::JoinHandle<()>,
}

impl ConnectionSampler {
    fn start(admin_url: String) -> Self {
        let sampling = Arc::new(AtomicBool::new(true));
        let peak = Arc::new(AtomicI64::new(0));
        let task = tokio::spawn({
            let (sampling, peak) = (sampling.clone(), peak.clone());
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
        Self {
            sampling,
            peak,
            task,
        }
    }

    /// Stops sampling; returns the most connections seen.
    async fn stop(self) -> i64 {
        self.sampling.store(false, Ordering::Relaxed);
        let _ = self.task.await;
        self.peak.load(Ordering::Relaxed)
    }
}

/// The operator's arguments as a deployment would pass them, so that they go through its own
/// parsing and defaults.
fn operator_args(settings: &Settings) -> OperatorArgs {
    Args::parse_from([
        "statekeeper",
        "--namespace",
        NS,
        "--resync-seconds",
        "10",
        "--max-db-connections",
        &settings.max_db_connections.to_string(),
    ])
    .operator
}

/// Waits until all `stores` StateStores are Ready (at most 600 s); returns the time since
/// `started`.
async fn wait_until_ready(
    kube: &fake_kube::FakeKube,
    stores: usize,
    started: Instant,
) -> BenchResult<Duration> {
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
    while ready() < stores {
        if started.elapsed() > Duration::from_secs(600) {
            return Err(format!("only {} of {} stores Ready after 600 s", ready(), stores).into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(started.elapsed())
}

/// Status writes in `idle_seconds` of waiting, with nothing changing.
async fn status_writes_while_idle(kube: &fake_kube::FakeKube, idle_seconds: u64) -> usize {
    let writes = |kube: &fake_kube::FakeKube| {
        kube.requests()
            .iter()
            .filter(|(method, path)| method == "PATCH" && path.ends_with("/status"))
            .count()
    };
    let writes_before = writes(kube);
    tokio::time::sleep(Duration::from_secs(idle_seconds)).await;
    writes(kube) - writes_before
}

fn print_report(settings: &Settings, m: &Measurements) {
    let per_minute = m.idle_writes as f64 * 60.0 / settings.idle_seconds as f64;
    println!(
        "{} stores: all Ready in {:.1} s; peak RSS {:.1} MiB (process, with the in-memory API; {:.1} MiB before the operator started), idle RSS {:.1} MiB; peak PostgreSQL connections {} (limit --max-db-connections {}); status writes while idle: {} in {} s ({per_minute:.1}/min)",
        settings.stores,
        m.all_ready.as_secs_f64(),
        m.peak_rss,
        m.rss_before,
        m.idle_rss,
        m.peak_connections,
        settings.max_db_connections,
        m.idle_writes,
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
        m.all_ready.as_secs_f64(),
        m.peak_rss,
        m.idle_rss,
        m.peak_connections,
        settings.max_db_connections
    );
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
