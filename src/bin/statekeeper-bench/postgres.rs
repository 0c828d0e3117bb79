//! The PostgreSQL the benchmarks run on, its databases, and the stores they fill in it.

use sqlx::{AssertSqlSafe, Connection, PgConnection};
use statekeeper::engine::generator::GenerateOptions;
use statekeeper::engine::{ConnectionSettings, SchemaName, Store};

use super::BenchResult;

/// The bin directory of the throwaway server this process started, if it started one.
pub(crate) static THROWAWAY_BIN: std::sync::OnceLock<std::path::PathBuf> =
    std::sync::OnceLock::new();

/// The given URL, or a throwaway server that stops by itself when this process exits.
pub(crate) async fn server_url(given: Option<&str>) -> BenchResult<String> {
    if let Some(url) = given {
        return Ok(url.to_owned());
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/throwaway-postgres.sh");
    let out = tokio::process::Command::new("bash")
        .args([
            script,
            "start",
            "--owner-pid",
            &std::process::id().to_string(),
        ])
        .output()
        .await?;
    if !out.status.success() {
        return Err(format!(
            "could not start a throwaway PostgreSQL: {}",
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    let printed = String::from_utf8_lossy(&out.stdout);
    let value = |name: &str| {
        printed
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix('=').map(str::to_owned))
    };
    let url = value("STATEKEEPER_PG_URL").ok_or("the throwaway script printed no URL")?;
    if let Some(dir) = value("STATEKEEPER_PG_DIR") {
        let bin = std::fs::read_to_string(std::path::Path::new(&dir).join("bin"))?;
        // Its version's pg_dump and psql, wherever they are (PyPI's builds are not on PATH).
        let _ = THROWAWAY_BIN.set(bin.trim().into());
    }
    Ok(url)
}

/// The admin URL with another database.
pub(crate) fn database_url(admin_url: &str, database: &str) -> BenchResult<String> {
    let (base, _) = admin_url
        .rsplit_once('/')
        .ok_or("the database URL has no database part")?;
    Ok(format!("{base}/{database}"))
}

/// An empty database `database` (dropped first if it exists); returns its URL.
pub(crate) async fn recreate_database(admin_url: &str, database: &str) -> BenchResult<String> {
    drop_database(admin_url, database).await?;
    let mut admin = PgConnection::connect(admin_url).await?;
    sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {database}")))
        .execute(&mut admin)
        .await?;
    database_url(admin_url, database)
}

pub(crate) async fn drop_database(admin_url: &str, database: &str) -> BenchResult<()> {
    let mut admin = PgConnection::connect(admin_url).await?;
    sqlx::query(AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {database} WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await?;
    Ok(())
}

pub(crate) async fn connect(url: &str, schema: &str) -> BenchResult<Store> {
    let pool = ConnectionSettings::from_url(url)?
        .with_max_connections(4)
        .connect()
        .await?;
    Ok(Store::new(pool, SchemaName::new(schema)?).with_actor("statekeeper-bench"))
}

/// An empty, initialised store: the benchmark's own schema is dropped and recreated.
pub(crate) async fn fresh_store(url: &str, schema: &str) -> BenchResult<Store> {
    let name = SchemaName::new(schema)?;
    let mut conn = PgConnection::connect(url).await?;
    sqlx::query(AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS {} CASCADE",
        name.quoted()
    )))
    .execute(&mut conn)
    .await?;
    let store = connect(url, schema).await?;
    store.init(None).await?;
    Ok(store)
}

/// A fresh store filled by the generator with `size` model versions, then vacuumed: rows read
/// for the first time after they were written cost their reader the hint bits it sets (and
/// autovacuum, woken by the inserts, shares the cores), which would fall on whichever of our
/// operation and its reference ran first. A store in use has been read and vacuumed before.
pub(crate) async fn generated_store(
    url: &str,
    schema: &str,
    size: u64,
    environments: u32,
) -> BenchResult<Store> {
    let store = fresh_store(url, schema).await?;
    store
        .generate(&GenerateOptions {
            model_versions: size,
            environments,
            ..GenerateOptions::default()
        })
        .await?;
    vacuum_store(url, schema).await?;
    Ok(store)
}

/// Vacuums and analyses every table of `schema`, as a store in use has been (see
/// [`generated_store`]).
pub(crate) async fn vacuum_store(url: &str, schema: &str) -> BenchResult<()> {
    let mut conn = PgConnection::connect(url).await?;
    let tables = schema_tables(&mut conn, schema).await?;
    sqlx::query(AssertSqlSafe(format!(
        "VACUUM (ANALYZE) {}",
        tables.join(", ")
    )))
    .execute(&mut conn)
    .await?;
    Ok(())
}

/// The tables of `schema`, qualified and quoted.
pub(crate) async fn schema_tables(
    conn: &mut PgConnection,
    schema: &str,
) -> BenchResult<Vec<String>> {
    Ok(sqlx::query_scalar(
        "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables WHERE schemaname = $1",
    )
    .bind(schema)
    .fetch_all(conn)
    .await?)
}
