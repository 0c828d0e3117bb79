//! `statekeeper-bench`: fills stores with realistic synthetic state, and measures operations on
//! them. Without --database-url it starts a throwaway PostgreSQL (scripts/throwaway-postgres.sh).

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use sqlx::{AssertSqlSafe, Connection, PgConnection};
use statekeeper::engine::generator::GenerateOptions;
use statekeeper::engine::{ConnectionSettings, JanitorOptions, SchemaName, Store};

mod meltano_bench;
mod operator_scale;
mod sqlmesh_bench;
mod upgrade_bench;

#[derive(Parser)]
#[command(
    name = "statekeeper-bench",
    about = "Generate synthetic state and benchmark statekeeper operations"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fill an initialised, empty store with synthetic state.
    Generate {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        shape: Shape,
    },
    /// Export and import at growing sizes, next to pg_dump --data-only and a psql restore of
    /// the same schema in the same run.
    ExportImport {
        #[command(flatten)]
        target: Target,
        /// Model versions per round.
        #[arg(long, value_delimiter = ',', default_value = "10000,100000,1000000")]
        sizes: Vec<u64>,
        #[arg(long, default_value_t = 200)]
        environments: u32,
        #[arg(long, default_value = "zstd")]
        compression: statekeeper::engine::Compression,
        /// exact (every table, history included) or statekeeper (current state only).
        #[arg(long, default_value = "exact")]
        format: statekeeper::engine::ExportFormat,
    },
    /// Meltano's state export and import (and its way into a file state backend) next to
    /// statekeeper's, on state the real Meltano wrote, in the same run on the same server; both
    /// sides run as commands under /usr/bin/time (wall time, peak RSS).
    Meltano {
        /// PostgreSQL URL of a user that may create databases; a throwaway local server when
        /// omitted.
        #[arg(long, env = "STATEKEEPER_DATABASE_URL", hide_env_values = true)]
        database_url: Option<String>,
        /// State IDs per round.
        #[arg(long, value_delimiter = ',', default_value = "10000")]
        state_ids: Vec<u32>,
        /// Runs of each command; the median time and the largest peak are reported.
        #[arg(long, default_value_t = 3)]
        repeat: u32,
        /// The meltano CLI (default: STATEKEEPER_MELTANO, or the pinned Meltano installed into
        /// its test virtualenv).
        #[arg(long, env = "STATEKEEPER_MELTANO")]
        meltano: Option<String>,
        /// Where the project, documents and folders go (kept for a later look).
        #[arg(long, default_value = "/tmp/statekeeper-bench-meltano")]
        work_dir: std::path::PathBuf,
    },
    /// SQLMesh's state export and import next to statekeeper's, on state the real SQLMesh planned
    /// (a generated project: scripts/sqlmesh-bench-project.py), in the same run on the same
    /// server; both sides run as commands under /usr/bin/time (wall time, peak RSS).
    Sqlmesh {
        /// PostgreSQL URL of a user that may create databases; a throwaway local server when
        /// omitted.
        #[arg(long, env = "STATEKEEPER_DATABASE_URL", hide_env_values = true)]
        database_url: Option<String>,
        /// Models per round.
        #[arg(long, value_delimiter = ',', default_value = "100,1000")]
        models: Vec<u32>,
        /// Development environments, each changing 5 % of the models.
        #[arg(long, default_value_t = 2)]
        dev_envs: u32,
        /// Runs of each command; the median time and the largest peak are reported.
        #[arg(long, default_value_t = 3)]
        repeat: u32,
        /// The sqlmesh CLI (default: STATEKEEPER_SQLMESH, or the pinned SQLMesh installed into the
        /// test virtualenv).
        #[arg(long, env = "STATEKEEPER_SQLMESH")]
        sqlmesh: Option<String>,
        /// Where the generated projects go (kept for a later look).
        #[arg(long, default_value = "/tmp/statekeeper-bench-sqlmesh")]
        work_dir: std::path::PathBuf,
        /// Measure a project already planned by an earlier run (WORK_DIR/N and its database
        /// bench_sqlmesh_N) instead of generating and planning it again: planning 5000 models
        /// takes SQLMesh about an hour.
        #[arg(long)]
        reuse_planned: bool,
    },
    /// N StateStores in one PostgreSQL reconciled by the real operator code against the
    /// in-memory Kubernetes API: time until all are Ready, peak and idle RSS, peak database
    /// connections, status writes while idle.
    OperatorScale {
        /// PostgreSQL URL of a user that may create databases; a throwaway local server when
        /// omitted.
        #[arg(long, env = "STATEKEEPER_DATABASE_URL", hide_env_values = true)]
        database_url: Option<String>,
        #[arg(long, default_value_t = 1000)]
        stores: usize,
        /// Seconds to watch the idle operator (it looks at every store every 10 s).
        #[arg(long, default_value_t = 60)]
        idle_seconds: u64,
        #[arg(long, default_value_t = 16)]
        max_db_connections: u32,
    },
    /// The upgrade from schema version 2 to 3 with its automatic backup, next to a
    /// `CREATE TABLE … AS` copy of every table of the same store in the same run.
    Upgrade {
        #[command(flatten)]
        target: Target,
        /// Model versions per round.
        #[arg(long, value_delimiter = ',', default_value = "10000,100000,1000000")]
        sizes: Vec<u64>,
        #[arg(long, default_value_t = 200)]
        environments: u32,
    },
    /// Janitor on a store with half of its versions unreferenced, while a writer keeps writing.
    Janitor {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        shape: Shape,
        #[arg(long, default_value_t = 1000)]
        batch_size: u32,
        /// Pause between two writer transactions.
        #[arg(long, default_value_t = 5)]
        writer_pause_ms: u64,
    },
}

#[derive(Args)]
struct Target {
    /// PostgreSQL URL; a throwaway local server when omitted.
    #[arg(long, env = "STATEKEEPER_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    #[arg(long, default_value = "bench_state")]
    schema: String,
}

#[derive(Args)]
struct Shape {
    #[arg(long, default_value_t = 100_000)]
    model_versions: u64,
    #[arg(long, default_value_t = 200)]
    environments: u32,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    #[arg(long, default_value_t = 500)]
    unreferenced_per_mille: u32,
}

impl Shape {
    fn options(&self) -> GenerateOptions {
        GenerateOptions {
            model_versions: self.model_versions,
            environments: self.environments,
            seed: self.seed,
            unreferenced_per_mille: self.unreferenced_per_mille,
            ..GenerateOptions::default()
        }
    }
}

type BenchResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> BenchResult<()> {
    match cli.command {
        Command::Generate { target, shape } => {
            let url = database(&target).await?;
            let store = connect(&url, &target.schema).await?;
            let started = Instant::now();
            let report = store.generate(&shape.options()).await?;
            println!("generated in {:.1}s:", started.elapsed().as_secs_f64());
            for (table, rows) in report.rows {
                println!("  {table:<34} {rows}");
            }
            Ok(())
        }
        Command::OperatorScale {
            database_url,
            stores,
            idle_seconds,
            max_db_connections,
        } => {
            let url = database(&Target {
                database_url,
                schema: "unused".into(),
            })
            .await?;
            operator_scale::run(&operator_scale::Settings {
                admin_url: url,
                stores,
                idle_seconds: idle_seconds.max(1),
                max_db_connections,
            })
            .await
        }
        Command::Meltano {
            database_url,
            state_ids,
            repeat,
            meltano,
            work_dir,
        } => {
            let url = database(&Target {
                database_url,
                schema: "unused".into(),
            })
            .await?;
            let meltano = match meltano {
                Some(path) => path,
                None => install_python_tool("meltano").await?,
            };
            meltano_bench::run(
                &meltano_bench::Settings {
                    admin_url: url,
                    meltano,
                    repeat: repeat.max(1),
                    work_dir,
                    statekeeper: sibling_binary("statekeeper")?,
                },
                &state_ids,
            )
            .await
        }
        Command::Sqlmesh {
            database_url,
            models,
            dev_envs,
            repeat,
            sqlmesh,
            work_dir,
            reuse_planned,
        } => {
            let url = database(&Target {
                database_url,
                schema: "unused".into(),
            })
            .await?;
            let sqlmesh = match sqlmesh {
                Some(path) => path,
                None => install_python_tool("sqlmesh").await?,
            };
            sqlmesh_bench::run(
                &sqlmesh_bench::Settings {
                    admin_url: url,
                    sqlmesh,
                    dev_envs,
                    repeat: repeat.max(1),
                    work_dir,
                    reuse_planned,
                    statekeeper: sibling_binary("statekeeper")?,
                },
                &models,
            )
            .await
        }
        Command::Upgrade {
            target,
            sizes,
            environments,
        } => {
            let url = database(&target).await?;
            println!(
                "upgrade benchmark (schema version 2 to 3 with its backup; CREATE TABLE … AS of every table; same store, same run)"
            );
            println!(
                "{:>9} {:>10} {:>10} {:>9} {:>9} {:>9}   ratio",
                "versions", "rows", "backed up", "upgrade s", "peak MiB", "CTAS s"
            );
            for size in sizes {
                let r = upgrade_bench::round(&url, &target.schema, size, environments).await?;
                println!(
                    "{:>9} {:>10} {:>10} {:>9.2} {:>9.1} {:>9.2}   upgrade/CTAS {:.2}x",
                    size,
                    r.rows,
                    r.backup_rows,
                    r.upgrade_secs,
                    r.peak_mib,
                    r.copy_secs,
                    r.upgrade_secs / r.copy_secs
                );
            }
            Ok(())
        }
        Command::ExportImport {
            target,
            sizes,
            environments,
            compression,
            format,
        } => {
            let url = database(&target).await?;
            let dir =
                std::env::temp_dir().join(format!("statekeeper-bench-{}", std::process::id()));
            std::fs::create_dir_all(&dir)?;
            println!(
                "export/import benchmark ({format} format, {compression:?}; pg_dump --data-only plain SQL with COPY; same schema, same run)"
            );
            println!(
                "{:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}   ratios",
                "versions",
                "rows",
                "export s",
                "MiB",
                "peak MiB",
                "import s",
                "peak MiB",
                "pg_dump s",
                "MiB",
                "restore s"
            );
            for size in sizes {
                let round = export_import_round(
                    &url,
                    &target.schema,
                    &dir,
                    size,
                    environments,
                    compression,
                    format,
                )
                .await;
                let r = match round {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = std::fs::remove_dir_all(&dir);
                        return Err(e);
                    }
                };
                println!(
                    "{:>9} {:>9} {:>9.2} {:>9.1} {:>9.1} {:>9.2} {:>9.1} {:>9.2} {:>9.1} {:>9.2}   export/pg_dump {:.2}x, import/restore {:.2}x",
                    size,
                    r.rows,
                    r.export.as_secs_f64(),
                    r.export_bytes as f64 / 1048576.0,
                    r.export_peak_mib,
                    r.import.as_secs_f64(),
                    r.import_peak_mib,
                    r.pg_dump.as_secs_f64(),
                    r.dump_bytes as f64 / 1048576.0,
                    r.restore.as_secs_f64(),
                    r.export.as_secs_f64() / r.pg_dump.as_secs_f64(),
                    r.import.as_secs_f64() / r.restore.as_secs_f64(),
                );
            }
            std::fs::remove_dir_all(&dir)?;
            Ok(())
        }
        Command::Janitor {
            target,
            shape,
            batch_size,
            writer_pause_ms,
        } => {
            let url = database(&target).await?;
            let store = fresh_store(&url, &target.schema).await?;
            let started = Instant::now();
            store.generate(&shape.options()).await?;
            let generated = started.elapsed();
            vacuum_store(&url, &target.schema).await?;
            let mut conn = PgConnection::connect(&url).await?;
            let schema = SchemaName::new(&target.schema)?.quoted();
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
                Duration::from_millis(writer_pause_ms),
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
                shape.model_versions, unreferenced, shape.environments
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
    }
}

struct Round {
    rows: u64,
    export: Duration,
    export_bytes: u64,
    export_peak_mib: f64,
    import: Duration,
    import_peak_mib: f64,
    pg_dump: Duration,
    dump_bytes: u64,
    restore: Duration,
}

async fn export_import_round(
    url: &str,
    schema: &str,
    dir: &std::path::Path,
    size: u64,
    environments: u32,
    compression: statekeeper::engine::Compression,
    format: statekeeper::engine::ExportFormat,
) -> BenchResult<Round> {
    let source = generated_store(url, schema, size, environments).await?;

    // The same path as `state export --to FILE` and StateExport: object_store, fsync, rename.
    let file = dir.join("export.json");
    let destination = statekeeper::engine::Destination::parse(
        &file.to_string_lossy(),
        &std::collections::BTreeMap::new(),
    )?;
    reset_peak_rss();
    let report = source
        .export_to(
            &destination,
            &statekeeper::engine::ExportOptions {
                environments: None,
                compression,
                format,
            },
            |_| {},
        )
        .await?;
    let export_peak_mib = peak_rss_mib();

    let import_schema = format!("{schema}_import");
    let target = fresh_store(url, &import_schema).await?;
    reset_peak_rss();
    let imported = target
        .import(
            destination.open().await?,
            &statekeeper::engine::ImportOptions::replace(),
        )
        .await?;
    let import_peak_mib = peak_rss_mib();
    if Some(&imported.sha256) != report.sha256.as_ref() {
        return Err("the imported file's sha256 differs from the export's".into());
    }
    // Keep the database small between rounds: the import's pre-import backup of an empty store.
    if let Some(backup) = &imported.backup {
        target.drop_backup(&backup.id).await?;
    }

    // pg_dump the same schema's data, then restore it into the same (emptied) tables with psql.
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
    let started = Instant::now();
    run_tool(
        &psql_program,
        &[
            "--quiet",
            "--single-transaction",
            "-v",
            "ON_ERROR_STOP=1",
            "--file",
            path_str(&dump)?,
            url,
        ],
    )
    .await?;
    let restore = started.elapsed();
    let restored: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT count(*) FROM {quoted}.model_versions"
    )))
    .fetch_one(&mut conn)
    .await?;
    if restored as u64 != size {
        return Err(format!("psql restored {restored} model versions of {size}").into());
    }
    Ok(Round {
        rows: report.total_rows(),
        export: report.duration,
        export_bytes: report.bytes,
        export_peak_mib,
        import: imported.duration,
        import_peak_mib,
        pg_dump,
        dump_bytes: std::fs::metadata(&dump)?.len(),
        restore,
    })
}

fn path_str(path: &std::path::Path) -> BenchResult<&str> {
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

/// The pinned SQLMesh of the tests (tests/fixtures/sqlmesh-requirements.txt), installed into the
/// private virtualenv by scripts/python-env.sh.
/// A pinned Python tool (`sqlmesh`, `meltano`) in its virtualenv, as the test suite installs it
/// (tests/fixtures/<tool>-requirements.txt; Meltano in a virtualenv of its own).
async fn install_python_tool(tool: &str) -> BenchResult<String> {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut command = tokio::process::Command::new("bash");
    command.args([
        &format!("{root}/scripts/python-env.sh"),
        "-r",
        &format!("{root}/tests/fixtures/{tool}-requirements.txt"),
    ]);
    if tool == "meltano" {
        let cache = std::env::var("XDG_CACHE_HOME").unwrap_or_else(|_| {
            format!(
                "{}/.cache",
                std::env::var("HOME").unwrap_or_else(|_| "/tmp".into())
            )
        });
        command.env(
            "STATEKEEPER_VENV",
            format!("{cache}/statekeeper/venv-meltano"),
        );
    }
    let out = command.output().await?;
    if !out.status.success() {
        return Err(format!(
            "cannot install {tool}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    let python = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    Ok(std::path::Path::new(&python)
        .with_file_name(tool)
        .to_string_lossy()
        .into_owned())
}

/// A binary built beside this one (`statekeeper`, from the same `cargo build`).
fn sibling_binary(name: &str) -> BenchResult<std::path::PathBuf> {
    let path = std::env::current_exe()?.with_file_name(name);
    if path.exists() {
        Ok(path)
    } else {
        Err(format!(
            "{} not found: build it too (cargo build --release --bins)",
            path.display()
        )
        .into())
    }
}

/// Resets this process's peak RSS (VmHWM), so each operation's peak is measured on its own.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
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

async fn connect(url: &str, schema: &str) -> BenchResult<Store> {
    let pool = ConnectionSettings::from_url(url)?
        .with_max_connections(4)
        .connect()
        .await?;
    Ok(Store::new(pool, SchemaName::new(schema)?).with_actor("statekeeper-bench"))
}

/// An empty, initialised store: the benchmark's own schema is dropped and recreated.
async fn fresh_store(url: &str, schema: &str) -> BenchResult<Store> {
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
async fn generated_store(
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
async fn vacuum_store(url: &str, schema: &str) -> BenchResult<()> {
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
async fn schema_tables(conn: &mut PgConnection, schema: &str) -> BenchResult<Vec<String>> {
    Ok(sqlx::query_scalar(
        "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables WHERE schemaname = $1",
    )
    .bind(schema)
    .fetch_all(conn)
    .await?)
}

/// The given URL, or a throwaway server that stops by itself when this process exits.
async fn database(target: &Target) -> BenchResult<String> {
    if let Some(url) = &target.database_url {
        return Ok(url.clone());
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

/// The bin directory of the throwaway server this process started, if it started one.
static THROWAWAY_BIN: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// Peak resident memory of this process (VmHWM), in MiB.
fn peak_rss_mib() -> f64 {
    rss_mib("VmHWM:")
}

/// A memory figure of this process from /proc/self/status (`VmHWM:` peak, `VmRSS:` now), in MiB.
fn rss_mib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}
