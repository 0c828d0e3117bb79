//! `statekeeper-bench sqlmesh`: SQLMesh's own `state export` / `state import` next to
//! statekeeper's, on the same store in the same run. A project of N models is generated and
//! planned once with the real SQLMesh (scripts/sqlmesh-bench-project.py); then each command runs
//! `repeat` times as a child process under `/usr/bin/time`, so both sides are measured the same
//! way: wall time (median) and peak resident memory (largest).

use std::path::{Path, PathBuf};
use std::time::Instant;

use sqlx::{AssertSqlSafe, Connection, PgConnection};

use super::BenchResult;

pub struct Settings {
    pub admin_url: String,
    pub sqlmesh: String,
    pub dev_envs: u32,
    pub repeat: u32,
    pub work_dir: PathBuf,
    pub reuse_planned: bool,
    pub statekeeper: PathBuf,
}

/// One command's measurements.
#[derive(Clone, Copy)]
pub(super) struct Measured {
    pub(super) seconds: f64,
    pub(super) peak_mib: f64,
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

async fn round(settings: &Settings, models: u32) -> BenchResult<Round> {
    let source = format!("bench_sqlmesh_{models}");
    let target = format!("bench_sqlmesh_{models}_target");
    let target_url = database_url(&settings.admin_url, &target)?;
    let dir = settings.work_dir.join(models.to_string());
    let started = Instant::now();
    let source_url = if settings.reuse_planned {
        if !dir.join("config.yaml").exists() {
            return Err(format!("--reuse-planned: no planned project in {}", dir.display()).into());
        }
        database_url(&settings.admin_url, &source)?
    } else {
        plan(settings, models, &source, &dir).await?
    };
    let plan_seconds = (!settings.reuse_planned).then(|| started.elapsed().as_secs_f64());

    // SQLMesh loads every model of the project before it touches state; users run it in their
    // project, so that is the main figure. The same commands in a folder with only the config
    // (and one tiny model) show SQLMesh's state work alone.
    let state_only = state_only_project(&dir)?;
    let at_source = (
        "SQLMESH__GATEWAYS__BENCH__STATE_CONNECTION__DATABASE",
        source.as_str(),
    );
    let at_target = (
        "SQLMESH__GATEWAYS__BENCH__STATE_CONNECTION__DATABASE",
        target.as_str(),
    );
    let theirs_file = dir.join("sqlmesh-export.json");
    let ours_file = dir.join("statekeeper-export.json");
    let mut export = Vec::new();
    for project in [&dir, &state_only] {
        export.push(
            measure(settings.repeat, || {
                let _ = std::fs::remove_dir_all(project.join(".cache"));
                let _ = std::fs::remove_file(&theirs_file);
                let mut command = timed_command(&settings.sqlmesh, project, &[at_source]);
                command
                    .args(["state", "export", "-o"])
                    .arg(&theirs_file)
                    .arg("--no-confirm");
                command
            })
            .await?,
        );
    }
    export.push(
        measure(settings.repeat, || {
            let _ = std::fs::remove_file(&ours_file);
            let mut command =
                timed_command(settings.statekeeper.to_string_lossy().as_ref(), &dir, &[]);
            command
                .args([
                    "state",
                    "export",
                    "--framework",
                    "sqlmesh",
                    "--format",
                    "sqlmesh",
                ])
                .args(["--database-url", &source_url, "--to"])
                .arg(&ours_file);
            command
        })
        .await?,
    );

    // All import SQLMesh's own file into a database SQLMesh has just created its tables in.
    let mut import: [Vec<Measured>; 3] = Default::default();
    for _ in 0..settings.repeat {
        for (side, runs) in import.iter_mut().enumerate() {
            recreate_database(&settings.admin_url, &target).await?;
            check(
                timed_command(&settings.sqlmesh, &state_only, &[at_target])
                    .arg("migrate")
                    .output()?,
                "sqlmesh migrate",
            )?;
            let mut command = match side {
                0 | 1 => {
                    let project = if side == 0 { &dir } else { &state_only };
                    let mut c = timed_command(&settings.sqlmesh, project, &[at_target]);
                    c.args(["state", "import", "-i"])
                        .arg(&theirs_file)
                        .args(["--replace", "--no-confirm"]);
                    c
                }
                _ => {
                    let mut c =
                        timed_command(settings.statekeeper.to_string_lossy().as_ref(), &dir, &[]);
                    c.args(["state", "import", "--framework", "sqlmesh", "--replace"])
                        .args(["--database-url", &target_url, "--from"])
                        .arg(&theirs_file);
                    c
                }
            };
            runs.push(run_timed(&mut command)?);
        }
    }

    // The physical reference: PostgreSQL's own dump of the state schema and its restore in one
    // transaction into the tables `sqlmesh migrate` created, emptied.
    let dump = dir.join("pg-dump.sql");
    let (pg_dump_program, psql_program) = (
        super::pg_tool("pg_dump", &source_url).await?,
        super::pg_tool("psql", &source_url).await?,
    );
    let pg_dump = measure(settings.repeat, || {
        let mut command = timed_command(&pg_dump_program, &dir, &[]);
        command
            .args(["--data-only", "--schema", "sqlmesh", "--file"])
            .arg(&dump)
            .arg(&source_url);
        command
    })
    .await?;
    let mut restores = Vec::new();
    for _ in 0..settings.repeat {
        recreate_database(&settings.admin_url, &target).await?;
        check(
            timed_command(&settings.sqlmesh, &state_only, &[at_target])
                .arg("migrate")
                .output()?,
            "sqlmesh migrate",
        )?;
        let mut conn = PgConnection::connect(&target_url).await?;
        sqlx::raw_sql(
            "DO $$ BEGIN EXECUTE (SELECT 'TRUNCATE ' || string_agg(format('%I.%I', schemaname, tablename), ', ') \
             FROM pg_tables WHERE schemaname = 'sqlmesh'); END $$",
        )
        .execute(&mut conn)
        .await?;
        drop(conn);
        let mut command = timed_command(&psql_program, &dir, &[]);
        command
            .args([
                "--quiet",
                "--single-transaction",
                "-v",
                "ON_ERROR_STOP=1",
                "--file",
            ])
            .arg(&dump)
            .arg(&target_url);
        restores.push(run_timed(&mut command)?);
    }

    let mut conn = PgConnection::connect(&source_url).await?;
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
    drop(conn);
    drop_database(&settings.admin_url, &target).await?;
    Ok(Round {
        models,
        snapshots,
        intervals,
        environments,
        plan_seconds,
        file_mib: std::fs::metadata(&theirs_file)?.len() as f64 / 1048576.0,
        export: [export[0], export[1], export[2]],
        import: [
            summarize(&import[0]),
            summarize(&import[1]),
            summarize(&import[2]),
        ],
        pg_dump,
        restore: summarize(&restores),
    })
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

/// Both sides are measured by GNU time: fail early, saying how to get it.
pub(super) fn require_time() -> BenchResult<()> {
    if Path::new("/usr/bin/time").exists() {
        Ok(())
    } else {
        Err(
            "/usr/bin/time is missing: install the Debian package `time` (apt-get install time)"
                .into(),
        )
    }
}

/// `/usr/bin/time -f "%M" -o FILE program …` in `dir`, with extra environment variables.
pub(super) fn timed_command(
    program: &str,
    dir: &Path,
    env: &[(&str, &str)],
) -> std::process::Command {
    let mut command = std::process::Command::new("/usr/bin/time");
    command
        .args(["-f", "%M", "-o"])
        .arg(dir.join(".time"))
        .arg(program)
        .current_dir(dir)
        .envs(env.iter().copied());
    command
}

/// The wall time is taken here (GNU time's `%e` counts in steps of 10 ms, too coarse for
/// commands of a few dozen); the peak RSS from GNU time.
pub(super) fn run_timed(command: &mut std::process::Command) -> BenchResult<Measured> {
    let started = Instant::now();
    let out = command.output()?;
    let seconds = started.elapsed().as_secs_f64();
    let dir = command
        .get_current_dir()
        .ok_or("timed commands run in the project directory")?
        .to_owned();
    check(out, "a timed command")?;
    let text = std::fs::read_to_string(dir.join(".time"))?;
    let kib: f64 = text.trim().parse()?;
    Ok(Measured {
        seconds,
        peak_mib: kib / 1024.0,
    })
}

pub(super) async fn measure(
    repeat: u32,
    mut command: impl FnMut() -> std::process::Command,
) -> BenchResult<Measured> {
    let mut runs = Vec::new();
    for _ in 0..repeat {
        runs.push(run_timed(&mut command())?);
    }
    Ok(summarize(&runs))
}

/// The median time and the largest peak.
pub(super) fn summarize(runs: &[Measured]) -> Measured {
    let mut seconds: Vec<f64> = runs.iter().map(|m| m.seconds).collect();
    seconds.sort_by(f64::total_cmp);
    Measured {
        seconds: seconds.get(seconds.len() / 2).copied().unwrap_or(0.0),
        peak_mib: runs.iter().map(|m| m.peak_mib).fold(0.0, f64::max),
    }
}

pub(super) fn check(out: std::process::Output, what: &str) -> BenchResult<()> {
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
        .into())
    }
}

/// The admin URL with another database.
pub(super) fn database_url(admin_url: &str, database: &str) -> BenchResult<String> {
    let (base, _) = admin_url
        .rsplit_once('/')
        .ok_or("the database URL has no database part")?;
    Ok(format!("{base}/{database}"))
}

pub(super) async fn recreate_database(admin_url: &str, database: &str) -> BenchResult<String> {
    drop_database(admin_url, database).await?;
    let mut admin = PgConnection::connect(admin_url).await?;
    sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {database}")))
        .execute(&mut admin)
        .await?;
    database_url(admin_url, database)
}

pub(super) async fn drop_database(admin_url: &str, database: &str) -> BenchResult<()> {
    let mut admin = PgConnection::connect(admin_url).await?;
    sqlx::query(AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {database} WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await?;
    Ok(())
}
