//! PostgreSQL's own copy of the same data, the reference every benchmark compares with:
//! `pg_dump --data-only` and its restore by `psql --single-transaction`, with the client tools of
//! the server's major version.

use std::path::Path;
use std::time::{Duration, Instant};

use sqlx::{AssertSqlSafe, Connection, PgConnection};
use statekeeper::engine::SchemaName;

use super::BenchResult;
use super::postgres::{THROWAWAY_BIN, schema_tables};

/// psql's arguments for restoring a dump all or nothing; the dump file and the URL follow.
pub(crate) const PSQL_RESTORE_ARGS: [&str; 5] = [
    "--quiet",
    "--single-transaction",
    "-v",
    "ON_ERROR_STOP=1",
    "--file",
];

/// The reference of one export/import round.
pub(crate) struct Baseline {
    pub(crate) pg_dump: Duration,
    pub(crate) dump_bytes: u64,
    pub(crate) restore: Duration,
}

/// pg_dump the schema's data, then restore it into the same (emptied) tables with psql; a
/// restore that does not bring back all `size` model versions is an error.
pub(crate) async fn dump_and_restore(
    url: &str,
    schema: &str,
    dir: &Path,
    size: u64,
) -> BenchResult<Baseline> {
    let dump = dir.join("dump.sql");
    // Found before the clock starts: finding them connects and runs each candidate.
    let (pg_dump_program, psql_program) =
        (pg_tool("pg_dump", url).await?, pg_tool("psql", url).await?);
    let started = Instant::now();
    run_tool(
        &pg_dump_program,
        &[
            "--data-only",
            "--schema",
            schema,
            "--file",
            path_str(&dump)?,
            url,
        ],
    )
    .await?;
    let pg_dump = started.elapsed();
    let mut conn = PgConnection::connect(url).await?;
    let quoted = SchemaName::new(schema)?.quoted();
    let tables = schema_tables(&mut conn, schema).await?;
    sqlx::query(AssertSqlSafe(format!("TRUNCATE {}", tables.join(", "))))
        .execute(&mut conn)
        .await?;
    let mut restore_args = PSQL_RESTORE_ARGS.to_vec();
    restore_args.extend([path_str(&dump)?, url]);
    let started = Instant::now();
    run_tool(&psql_program, &restore_args).await?;
    let restore = started.elapsed();
    let restored: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT count(*) FROM {quoted}.model_versions"
    )))
    .fetch_one(&mut conn)
    .await?;
    if restored as u64 != size {
        return Err(format!("psql restored {restored} model versions of {size}").into());
    }
    Ok(Baseline {
        pg_dump,
        dump_bytes: std::fs::metadata(&dump)?.len(),
        restore,
    })
}

fn path_str(path: &Path) -> BenchResult<&str> {
    path.to_str()
        .ok_or_else(|| "temporary path is not UTF-8".into())
}

/// Runs a PostgreSQL client tool (a path from [`pg_tool`]).
async fn run_tool(program: &str, args: &[&str]) -> BenchResult<()> {
    let out = tokio::process::Command::new(program)
        .args(args)
        .output()
        .await?;
    if !out.status.success() {
        return Err(format!("{program} failed: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(())
}

/// The client tool `name` (pg_dump, psql) to measure against the server at `url`: one of the
/// server's major version from PATH, the throwaway server's binaries or /usr/lib/postgresql,
/// else the newest found (pg_dump refuses a server newer than itself, and a newer one would time
/// another program).
pub(crate) async fn pg_tool(name: &str, url: &str) -> BenchResult<String> {
    let mut conn = PgConnection::connect(url).await?;
    let server: i32 = sqlx::query_scalar("SELECT current_setting('server_version_num')::int")
        .fetch_one(&mut conn)
        .await?;
    let server_major = u32::try_from(server / 10_000)?;
    let mut dirs: Vec<std::path::PathBuf> = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect())
        .unwrap_or_default();
    dirs.extend(THROWAWAY_BIN.get().cloned());
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        dirs.extend(entries.flatten().map(|d| d.path().join("bin")));
    }
    let mut found: Vec<(u32, String)> = Vec::new();
    for program in dirs.iter().map(|d| d.join(name)).filter(|p| p.is_file()) {
        let out = tokio::process::Command::new(&program)
            .arg("--version")
            .output()
            .await?;
        // "pg_dump (PostgreSQL) 18.6" (Debian adds its package version after it).
        let major = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .nth(2)
            .and_then(|v| v.split('.').next()?.parse().ok());
        if let (Some(major), Some(path)) = (major, program.to_str()) {
            found.push((major, path.to_owned()));
        }
    }
    found.sort_by_key(|(major, _)| (*major == server_major, *major));
    found
        .pop()
        .map(|(_, path)| path)
        .ok_or_else(|| format!("no {name} found on PATH or in /usr/lib/postgresql").into())
}
