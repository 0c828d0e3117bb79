//! `statekeeper-bench janitor`: the janitor on a store with half of its versions unreferenced,
//! while a writer keeps promoting versions as a busy scheduler would; the writer's waits show
//! what the janitor costs the store's users.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sqlx::{AssertSqlSafe, Connection, PgConnection};
use statekeeper::engine::{JanitorOptions, SchemaName};

use super::memory::peak_rss_mib;
use super::postgres::{fresh_store, vacuum_store};
use super::{BenchResult, Shape};

pub(crate) struct Settings<'a> {
    pub(crate) url: String,
    pub(crate) schema: String,
    pub(crate) shape: &'a Shape,
    pub(crate) batch_size: u32,
    pub(crate) writer_pause: Duration,
}

pub(crate) async fn run(settings: &Settings<'_>) -> BenchResult<()> {
    let (url, batch_size) = (&settings.url, settings.batch_size);
    let store = fresh_store(url, &settings.schema).await?;
    let started = Instant::now();
    store.generate(&settings.shape.options()).await?;
    let generated = started.elapsed();
    vacuum_store(url, &settings.schema).await?;
    let mut conn = PgConnection::connect(url).await?;
    let schema = SchemaName::new(&settings.schema)?.quoted();
    let unreferenced: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT count(*) FROM {schema}.model_versions mv WHERE NOT EXISTS (SELECT 1 FROM {schema}.virtual_environment_refs r WHERE r.model_version_id = mv.id)"
    )))
    .fetch_one(&mut conn)
    .await?;

    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(writer_loop(
        url.clone(),
        schema.clone(),
        stop.clone(),
        settings.writer_pause,
    ));
    let options = JanitorOptions {
        batch_size,
        version_grace: Duration::from_secs(3600),
        ..JanitorOptions::default()
    };
    let mut released = 0u64;
    let report = store.janitor(&options, |_| released += 1).await?;
    stop.store(true, Ordering::Relaxed);
    let waits = writer.await??;

    let secs = report.duration.as_secs_f64();
    println!(
        "janitor benchmark: {} model versions ({} unreferenced before the run), {} environments",
        settings.shape.model_versions, unreferenced, settings.shape.environments
    );
    println!(
        "  generate                {:>10.1} s",
        generated.as_secs_f64()
    );
    println!(
        "  janitor                 {secs:>10.1} s   ({} batches of {batch_size})",
        report.batches
    );
    println!(
        "  removed                 {:>10} rows: {}",
        report.removed_rows(),
        report.summary()
    );
    println!(
        "  rows removed per second {:>10.0}   (model versions per second {:.0})",
        report.removed_rows() as f64 / secs,
        report.model_versions as f64 / secs
    );
    println!(
        "  concurrent writer       {:>10} transactions, longest wait {:.1} ms, p99 {:.1} ms, lost 0",
        waits.len(),
        ms(waits.last()),
        ms(waits.get(waits.len().saturating_sub(1) * 99 / 100))
    );
    println!("  peak memory (RSS)       {:>10.1} MiB", peak_rss_mib());
    Ok(())
}

fn ms(d: Option<&Duration>) -> f64 {
    d.map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// Promotes new versions into a live environment as fast as a busy scheduler would, timing
/// every transaction; returns the sorted latencies. Every commit is checked afterwards.
async fn writer_loop(
    url: String,
    schema: String,
    stop: Arc<AtomicBool>,
    pause: Duration,
) -> BenchResult<Vec<Duration>> {
    let mut conn = PgConnection::connect(&url).await?;
    let mut waits = Vec::new();
    let mut i = 0i64;
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let mut tx = conn.begin().await?;
        let id: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
            "INSERT INTO {schema}.model_versions (name, fingerprint, version) VALUES ('bench_writer', md5($1::text), 'v' || $1) RETURNING id"
        )))
        .bind(i)
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {schema}.virtual_environment_refs (environment, model_name, model_version_id) VALUES ('prod', 'bench_writer_' || ($1 % 50), $2)
             ON CONFLICT (environment, model_name) DO UPDATE SET model_version_id = excluded.model_version_id"
        )))
        .bind(i)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        waits.push(started.elapsed());
        i += 1;
        tokio::time::sleep(pause).await;
    }
    let kept: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT count(*) FROM {schema}.virtual_environment_refs r JOIN {schema}.model_versions m ON m.id = r.model_version_id WHERE r.model_name LIKE 'bench_writer_%'"
    )))
    .fetch_one(&mut conn)
    .await?;
    if kept != i.min(50) {
        return Err(format!(
            "the writer committed {} promotions but {kept} survived",
            i.min(50)
        )
        .into());
    }
    waits.sort();
    Ok(waits)
}
