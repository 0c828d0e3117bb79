//! `statekeeper-bench sqlmesh`: SQLMesh's own `state export` / `state import` next to
//! statekeeper's, on the same store in the same run. A project of N models is generated and
//! planned once with the real SQLMesh (scripts/sqlmesh-bench-project.py); then each command runs
//! `repeat` times as a child process under `/usr/bin/time`, so both sides are measured the same
//! way: wall time (median) and peak resident memory (largest).

use std::path::{Path, PathBuf};
use std::time::Instant;

use sqlx::{AssertSqlSafe, Connection, PgConnection};

use super::BenchResult;
use super::pg_baseline::{PSQL_RESTORE_ARGS, pg_tool};
use super::postgres::{database_url, drop_database, recreate_database};
use super::timing::{Measured, check, measure, require_time, run_timed, summarize, timed_command};

pub struct Settings {
    pub admin_url: String,
    pub sqlmesh: String,
    pub dev_envs: u32,
    pub repeat: u32,
    pub work_dir: PathBuf,
    pub reuse_planned: bool,
    pub statekeeper: PathBuf,
}

struct Round {
    models: u32,
    snapshots: i64,
    intervals: i64,
    environments: i64,
    /// None when an earlier run planned the project (`--reuse-planned`).
    plan_seconds: Option<f64>,
    file_mib: f64,
    /// SQLMesh in its project, SQLMesh with the project's models left out, statekeeper.
    export: [Measured; 3],
    import: [Measured; 3],
    /// `pg_dump --data-only` of the state schema, and its `psql --single-transaction` restore.
    pg_dump: Measured,
    restore: Measured,
}

pub async fn run(settings: &Settings, sizes: &[u32]) -> BenchResult<()> {
    require_time()?;
    println!(
        "SQLMesh state export/import vs statekeeper (--format sqlmesh); same store, same run; \
         median of {} runs, largest peak RSS",
        settings.repeat
    );
    let mut rounds = Vec::new();
    for &models in sizes {
        let round = round(settings, models).await?;
        print_round(&round);
        rounds.push(round);
    }
    println!();
    println!(
        "| models | snapshots | intervals | file | operation | sqlmesh | sqlmesh, state only | statekeeper | speed-up (state only) | peak RSS sqlmesh / state only / statekeeper | pg_dump / psql -1 | statekeeper ÷ it |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &rounds {
        for (operation, [project, state_only, ours], reference) in [
            ("export", r.export, r.pg_dump),
            ("import", r.import, r.restore),
        ] {
            println!(
                "| {} | {} | {} | {:.1} MiB | {operation} | {:.2} s | {:.2} s | {:.3} s | {:.0}× ({:.0}×) | {:.0} / {:.0} / {:.1} MiB | {:.3} s | {:.2}× |",
                r.models,
                r.snapshots,
                r.intervals,
                r.file_mib,
                project.seconds,
                state_only.seconds,
                ours.seconds,
                project.seconds / ours.seconds,
                state_only.seconds / ours.seconds,
                project.peak_mib,
                state_only.peak_mib,
                ours.peak_mib,
                reference.seconds,
                ours.seconds / reference.seconds,
            );
        }
    }
    Ok(())
}

fn print_round(r: &Round) {
    println!(
        "{} models ({} snapshots, {} intervals, {} environments; {}; file {:.1} MiB)",
        r.models,
        r.snapshots,
        r.intervals,
        r.environments,
        match r.plan_seconds {
            Some(seconds) => format!("planned in {seconds:.0} s"),
            None => "planned by an earlier run".into(),
        },
        r.file_mib
    );
    for (what, [theirs, state_only, ours]) in [("export", r.export), ("import", r.import)] {
        println!(
            "  {what}: sqlmesh {:.2} s, {:.0} MiB (state only: {:.2} s, {:.0} MiB); statekeeper {:.3} s, {:.1} MiB; {:.0}× faster ({:.0}×)",
            theirs.seconds,
            theirs.peak_mib,
            state_only.seconds,
            state_only.peak_mib,
            ours.seconds,
            ours.peak_mib,
            theirs.seconds / ours.seconds,
            state_only.seconds / ours.seconds,
        );
    }
}

/// Where a round works: the project and its state-only twin, SQLMesh's state database (the
/// source, planned) and the one every import starts anew (the target), and the exports' files.
struct Workspace {
    dir: PathBuf,
    state_only: PathBuf,
    source: String,
    source_url: String,
    target: String,
    target_url: String,
    theirs_file: PathBuf,
    ours_file: PathBuf,
}

impl Workspace {
    /// The environment that points the project's gateway `bench` at the source database.
    fn at_source(&self) -> (&'static str, &str) {
        (STATE_DATABASE_VARIABLE, &self.source)
    }

    /// The environment that points the project's gateway `bench` at the target database.
    fn at_target(&self) -> (&'static str, &str) {
        (STATE_DATABASE_VARIABLE, &self.target)
    }
}

/// The database of the state connection of the generated project's gateway `bench`.
const STATE_DATABASE_VARIABLE: &str = "SQLMESH__GATEWAYS__BENCH__STATE_CONNECTION__DATABASE";

async fn round(settings: &Settings, models: u32) -> BenchResult<Round> {
    let source = format!("bench_sqlmesh_{models}");
    let target = format!("bench_sqlmesh_{models}_target");
    let target_url = database_url(&settings.admin_url, &target)?;
    let dir = settings.work_dir.join(models.to_string());
    let (source_url, plan_seconds) = planned_source(settings, models, &source, &dir).await?;

    // SQLMesh loads every model of the project before it touches state; users run it in their
    // project, so that is the main figure. The same commands in a folder with only the config
    // (and one tiny model) show SQLMesh's state work alone.
    let state_only = state_only_project(&dir)?;
    let workspace = Workspace {
        theirs_file: dir.join("sqlmesh-export.json"),
        ours_file: dir.join("statekeeper-export.json"),
        dir,
        state_only,
        source,
        source_url,
        target,
        target_url,
    };
    let export = measure_exports(settings, &workspace).await?;
    let import = measure_imports(settings, &workspace).await?;
    let (pg_dump, restore) = measure_pg_reference(settings, &workspace).await?;
    let (snapshots, intervals, environments) = count_state(&workspace.source_url).await?;
    drop_database(&settings.admin_url, &workspace.target).await?;
    Ok(Round {
        models,
        snapshots,
        intervals,
        environments,
        plan_seconds,
        file_mib: std::fs::metadata(&workspace.theirs_file)?.len() as f64 / 1048576.0,
        export,
        import,
        pg_dump,
        restore,
    })
}

/// The source database's URL, planned now (and how long that took) or by an earlier run
/// (`--reuse-planned`).
async fn planned_source(
    settings: &Settings,
    models: u32,
    source: &str,
    dir: &Path,
) -> BenchResult<(String, Option<f64>)> {
    let started = Instant::now();
    let source_url = if settings.reuse_planned {
        if !dir.join("config.yaml").exists() {
            return Err(format!("--reuse-planned: no planned project in {}", dir.display()).into());
        }
        database_url(&settings.admin_url, source)?
    } else {
        plan(settings, models, source, dir).await?
    };
    let plan_seconds = (!settings.reuse_planned).then(|| started.elapsed().as_secs_f64());
    Ok((source_url, plan_seconds))
}

/// `sqlmesh state export` in the project and in the state-only folder, then statekeeper's.
async fn measure_exports(settings: &Settings, ws: &Workspace) -> BenchResult<[Measured; 3]> {
    let mut export = Vec::new();
    for project in [&ws.dir, &ws.state_only] {
        export.push(
            measure(settings.repeat, || {
                let _ = std::fs::remove_dir_all(project.join(".cache"));
                let _ = std::fs::remove_file(&ws.theirs_file);
                let mut command = timed_command(&settings.sqlmesh, project, &[ws.at_source()]);
                command
                    .args(["state", "export", "-o"])
                    .arg(&ws.theirs_file)
                    .arg("--no-confirm");
                command
            })
            .await?,
        );
    }
    export.push(
        measure(settings.repeat, || {
            let _ = std::fs::remove_file(&ws.ours_file);
            let mut command = statekeeper_command(settings, ws);
            command
                .args([
                    "state",
                    "export",
                    "--framework",
                    "sqlmesh",
                    "--format",
                    "sqlmesh",
                ])
                .args(["--database-url", &ws.source_url, "--to"])
                .arg(&ws.ours_file);
            command
        })
        .await?,
    );
    Ok([export[0], export[1], export[2]])
}

/// All import SQLMesh's own file into a database SQLMesh has just created its tables in: the
/// three sides take turns, so that each run of each finds the server in the same state.
async fn measure_imports(settings: &Settings, ws: &Workspace) -> BenchResult<[Measured; 3]> {
    let mut import: [Vec<Measured>; 3] = Default::default();
    for _ in 0..settings.repeat {
        for (side, runs) in import.iter_mut().enumerate() {
            migrated_target(settings, ws).await?;
            let mut command = match side {
                0 | 1 => {
                    let project = if side == 0 { &ws.dir } else { &ws.state_only };
                    let mut c = timed_command(&settings.sqlmesh, project, &[ws.at_target()]);
                    c.args(["state", "import", "-i"])
                        .arg(&ws.theirs_file)
                        .args(["--replace", "--no-confirm"]);
                    c
                }
                _ => {
                    let mut c = statekeeper_command(settings, ws);
                    c.args(["state", "import", "--framework", "sqlmesh", "--replace"])
                        .args(["--database-url", &ws.target_url, "--from"])
                        .arg(&ws.theirs_file);
                    c
                }
            };
            runs.push(run_timed(&mut command)?);
        }
    }
    Ok([
        summarize(&import[0]),
        summarize(&import[1]),
        summarize(&import[2]),
    ])
}

/// The physical reference: PostgreSQL's own dump of the state schema and its restore in one
/// transaction into the tables `sqlmesh migrate` created, emptied.
async fn measure_pg_reference(
    settings: &Settings,
    ws: &Workspace,
) -> BenchResult<(Measured, Measured)> {
    let dump = ws.dir.join("pg-dump.sql");
    let (pg_dump_program, psql_program) = (
        pg_tool("pg_dump", &ws.source_url).await?,
        pg_tool("psql", &ws.source_url).await?,
    );
    let pg_dump = measure(settings.repeat, || {
        let mut command = timed_command(&pg_dump_program, &ws.dir, &[]);
        command
            .args(["--data-only", "--schema", "sqlmesh", "--file"])
            .arg(&dump)
            .arg(&ws.source_url);
        command
    })
    .await?;
    let mut restores = Vec::new();
    for _ in 0..settings.repeat {
        migrated_target(settings, ws).await?;
        let mut conn = PgConnection::connect(&ws.target_url).await?;
        sqlx::raw_sql(
            "DO $$ BEGIN EXECUTE (SELECT 'TRUNCATE ' || string_agg(format('%I.%I', schemaname, tablename), ', ') \
             FROM pg_tables WHERE schemaname = 'sqlmesh'); END $$",
        )
        .execute(&mut conn)
        .await?;
        drop(conn);
        let mut command = timed_command(&psql_program, &ws.dir, &[]);
        command
            .args(PSQL_RESTORE_ARGS)
            .arg(&dump)
            .arg(&ws.target_url);
        restores.push(run_timed(&mut command)?);
    }
    Ok((pg_dump, summarize(&restores)))
}

/// The target database anew, with the tables `sqlmesh migrate` creates (not timed).
async fn migrated_target(settings: &Settings, ws: &Workspace) -> BenchResult<()> {
    recreate_database(&settings.admin_url, &ws.target).await?;
    check(
        timed_command(&settings.sqlmesh, &ws.state_only, &[ws.at_target()])
            .arg("migrate")
            .output()?,
        "sqlmesh migrate",
    )
}

/// `statekeeper` under GNU time in the project folder, as SQLMesh's commands run.
fn statekeeper_command(settings: &Settings, ws: &Workspace) -> std::process::Command {
    timed_command(
        settings.statekeeper.to_string_lossy().as_ref(),
        &ws.dir,
        &[],
    )
}

/// Snapshots, intervals and environments in the source's state.
async fn count_state(source_url: &str) -> BenchResult<(i64, i64, i64)> {
    let mut conn = PgConnection::connect(source_url).await?;
    let count = |table: &str| format!("SELECT count(*) FROM sqlmesh.{table}");
    let snapshots: i64 = sqlx::query_scalar(AssertSqlSafe(count("_snapshots")))
        .fetch_one(&mut conn)
        .await?;
    let intervals: i64 = sqlx::query_scalar(AssertSqlSafe(count("_intervals")))
        .fetch_one(&mut conn)
        .await?;
    let environments: i64 = sqlx::query_scalar(AssertSqlSafe(count("_environments")))
        .fetch_one(&mut conn)
        .await?;
    Ok((snapshots, intervals, environments))
}

/// A folder beside the project with its config and one tiny model, where SQLMesh's state
/// commands do only their state work.
fn state_only_project(dir: &Path) -> BenchResult<PathBuf> {
    let folder = dir.join("state-only");
    std::fs::create_dir_all(folder.join("models"))?;
    std::fs::copy(dir.join("config.yaml"), folder.join("config.yaml"))?;
    std::fs::write(
        folder.join("models").join("placeholder.sql"),
        "MODEL (name bench.placeholder, kind VIEW);\n\nSELECT 1 AS x\n",
    )?;
    Ok(folder)
}

/// Generates the project of `models` models in `dir` and plans it with the real SQLMesh into a
/// new database `source`; returns that database's URL.
async fn plan(settings: &Settings, models: u32, source: &str, dir: &Path) -> BenchResult<String> {
    let source_url = recreate_database(&settings.admin_url, source).await?;
    let generator = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/sqlmesh-bench-project.py"
    );
    let python = Path::new(&settings.sqlmesh).with_file_name("python");
    check(
        tokio::process::Command::new(&python)
            .arg(generator)
            .args(["--models", &models.to_string(), "--dir"])
            .arg(dir)
            .args(["--state-url", &source_url, "--plan", "--force"])
            .args(["--dev-envs", &settings.dev_envs.to_string()])
            .args(["--sqlmesh", &settings.sqlmesh])
            .output()
            .await?,
        "generating and planning the project",
    )?;
    Ok(source_url)
}
