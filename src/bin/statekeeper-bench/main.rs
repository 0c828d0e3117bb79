//! `statekeeper-bench`: fills stores with realistic synthetic state, and measures operations on
//! them. Without --database-url it starts a throwaway PostgreSQL (scripts/throwaway-postgres.sh).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use statekeeper::engine::generator::GenerateOptions;

mod diff_bench;
mod export_import;
mod janitor_bench;
mod meltano_bench;
mod memory;
mod operator_scale;
mod pg_baseline;
mod postgres;
mod programs;
mod sqlmesh_bench;
mod timing;
mod upgrade_bench;

use postgres::server_url;
use programs::{install_python_tool, sibling_binary};

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
        /// Also export and import each store encrypted with age (a fresh key), alternating
        /// with plain runs (3 of each, medians), and print the encrypted/plain ratios.
        #[arg(long)]
        encrypt: bool,
    },
    /// `state diff` at growing sizes: a backup against the store and an exact export against the
    /// store, after a day of changes, next to an export and an import of the same store in the
    /// same run (wall time, peak RSS of each).
    Diff {
        #[command(flatten)]
        target: Target,
        /// Model versions per round.
        #[arg(long, value_delimiter = ',', default_value = "10000,100000")]
        sizes: Vec<u64>,
        #[arg(long, default_value_t = 200)]
        environments: u32,
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

/// Each subcommand's server first (a throwaway one when no URL is given), then its benchmark.
async fn run(cli: Cli) -> BenchResult<()> {
    match cli.command {
        Command::Generate { target, shape } => {
            let url = server_url(target.database_url.as_deref()).await?;
            let store = postgres::connect(&url, &target.schema).await?;
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
            let url = server_url(database_url.as_deref()).await?;
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
            let url = server_url(database_url.as_deref()).await?;
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
            let url = server_url(database_url.as_deref()).await?;
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
            let url = server_url(target.database_url.as_deref()).await?;
            upgrade_bench::run(&url, &target.schema, &sizes, environments).await
        }
        Command::ExportImport {
            target,
            sizes,
            environments,
            compression,
            format,
            encrypt,
        } => {
            let url = server_url(target.database_url.as_deref()).await?;
            export_import::run(
                &export_import::Settings {
                    url,
                    schema: target.schema,
                    environments,
                    compression,
                    format,
                    encrypt,
                },
                &sizes,
            )
            .await
        }
        Command::Diff {
            target,
            sizes,
            environments,
        } => {
            let url = server_url(target.database_url.as_deref()).await?;
            diff_bench::run(&url, &target.schema, &sizes, environments).await
        }
        Command::Janitor {
            target,
            shape,
            batch_size,
            writer_pause_ms,
        } => {
            let url = server_url(target.database_url.as_deref()).await?;
            janitor_bench::run(&janitor_bench::Settings {
                url,
                schema: target.schema,
                shape: &shape,
                batch_size,
                writer_pause: Duration::from_millis(writer_pause_ms),
            })
            .await
        }
    }
}
