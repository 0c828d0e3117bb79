//! `statekeeper-bench meltano`: Meltano's own `state export` / `state import` next to
//! statekeeper's `--format meltano`, and Meltano's way into a file state backend
//! (`meltano state import` with `state_backend.uri` on a folder) next to `--format
//! meltano-backend`, on one system database in the same run. The state is written by the real
//! Meltano (`meltano state import` of a generated document); every command runs `repeat` times as
//! a child process under `/usr/bin/time`: wall time (median) and peak resident memory (largest).

use std::path::{Path, PathBuf};

use super::BenchResult;
use super::pg_baseline::{PSQL_RESTORE_ARGS, pg_tool};
use super::postgres::{drop_database, recreate_database};
use super::timing::{Measured, check, measure, require_time, run_timed, summarize, timed_command};

pub struct Settings {
    pub admin_url: String,
    pub meltano: String,
    pub repeat: u32,
    pub work_dir: PathBuf,
    pub statekeeper: PathBuf,
}

struct Round {
    state_ids: u32,
    file_mib: f64,
    /// Meltano, statekeeper.
    export: [Measured; 2],
    import: [Measured; 2],
    to_folder: [Measured; 2],
    /// `pg_dump --data-only` of the state table, and its `psql --single-transaction` restore.
    pg_dump: Measured,
    restore: Measured,
}

pub async fn run(settings: &Settings, sizes: &[u32]) -> BenchResult<()> {
    require_time()?;
    println!(
        "Meltano state export/import vs statekeeper (--framework meltano); same system database, \
         same run; median of {} runs, largest peak RSS",
        settings.repeat
    );
    let mut rounds = Vec::new();
    for &state_ids in sizes {
        rounds.push(round(settings, state_ids).await?);
    }
    println!();
    println!(
        "| state IDs | document | operation | meltano | statekeeper | speed-up | peak RSS meltano / statekeeper | pg_dump / psql -1 | statekeeper ÷ it |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in &rounds {
        for (operation, [theirs, ours], reference) in [
            (
                "export (`state export` / `--format meltano`)",
                r.export,
                Some(r.pg_dump),
            ),
            (
                "import (`state import` / `--format meltano --merge`)",
                r.import,
                Some(r.restore),
            ),
            (
                "into a folder backend (`state import` on a file backend / `--format meltano-backend`)",
                r.to_folder,
                None,
            ),
        ] {
            let (reference, ratio) = match reference {
                Some(m) => (
                    format!("{:.3} s", m.seconds),
                    format!("{:.2}×", ours.seconds / m.seconds),
                ),
                None => ("–".into(), "–".into()),
            };
            println!(
                "| {} | {:.1} MiB | {operation} | {:.2} s | {:.3} s | {:.1}× | {:.0} / {:.1} MiB | {reference} | {ratio} |",
                r.state_ids,
                r.file_mib,
                theirs.seconds,
                ours.seconds,
                theirs.seconds / ours.seconds,
                theirs.peak_mib,
                ours.peak_mib,
            );
        }
    }
    Ok(())
}

/// A Meltano project (`meltano init`) in `dir`, reused when it exists.
fn project(settings: &Settings, dir: &Path) -> BenchResult<PathBuf> {
    let project = dir.join("project");
    if !project.join("meltano.yml").exists() {
        std::fs::create_dir_all(dir)?;
        let out = std::process::Command::new(&settings.meltano)
            .args(["init", "project", "--no_usage_stats"])
            .current_dir(dir)
            .env("MELTANO_SEND_ANONYMOUS_USAGE_STATS", "false")
            .output()?;
        check(out, "meltano init")?;
    }
    Ok(project)
}

/// `{state_id: {"completed": …, "partial": {}}}` with five stream bookmarks per state ID, as a
/// tap with five incremental streams leaves it.
fn document(state_ids: u32) -> String {
    let mut doc = String::from("{");
    for i in 0..state_ids {
        if i > 0 {
            doc.push(',');
        }
        let streams: Vec<String> = (0..5)
            .map(|s| {
                format!(
                    "\"stream_{s}\":{{\"replication_key\":\"updated_at\",\"replication_key_value\":\"2026-11-{:02}T{:02}:{:02}:00+00:00\"}}",
                    1 + (i + s) % 28,
                    (i * 7 + s) % 24,
                    (i * 13 + s) % 60
                )
            })
            .collect();
        doc.push_str(&format!(
            "\"prod:tap-source-{i:05}-to-target-warehouse\":{{\"completed\":{{\"singer_state\":{{\"bookmarks\":{{{}}}}}}},\"partial\":{{}}}}",
            streams.join(",")
        ));
    }
    doc.push('}');
    doc
}

/// Where a round works: the Meltano project, the database its state is written to (the
/// source), the one every import starts anew in (the target), and the exports' files.
struct Workspace<'a> {
    settings: &'a Settings,
    dir: PathBuf,
    project: PathBuf,
    source_url: String,
    target: String,
    statekeeper: String,
    theirs_file: PathBuf,
    ours_file: PathBuf,
}

impl Workspace<'_> {
    /// `program` under GNU time in the project. Each timed command starts with the file system
    /// clean (`sync` first), so that no side pays for the other's unwritten files: statekeeper
    /// syncs what it writes before it reports success, Meltano never does.
    fn timed(&self, program: &str, env: &[(&'static str, String)]) -> std::process::Command {
        let _ = std::process::Command::new("sync").status();
        let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        timed_command(program, &self.project, &pairs)
    }

    fn meltano(&self, env: &[(&'static str, String)]) -> std::process::Command {
        self.timed(&self.settings.meltano, env)
    }

    fn statekeeper(&self) -> std::process::Command {
        self.timed(&self.statekeeper, &[])
    }

    /// Meltano's environment for the source database.
    fn source_env(&self) -> Vec<(&'static str, String)> {
        meltano_env(&sqlalchemy_uri(&self.source_url))
    }

    /// The target database anew, with the tables `meltano upgrade database` creates (not
    /// timed); returns its URL.
    async fn upgraded_target(&self) -> BenchResult<String> {
        let target_url = recreate_database(&self.settings.admin_url, &self.target).await?;
        check(
            self.meltano(&meltano_env(&sqlalchemy_uri(&target_url)))
                .args(["upgrade", "database"])
                .output()?,
            "meltano upgrade database",
        )?;
        Ok(target_url)
    }
}

/// The URL as Meltano's SQLAlchemy takes it, with the driver it is installed with.
fn sqlalchemy_uri(url: &str) -> String {
    url.replacen("postgres://", "postgresql+psycopg://", 1)
}

/// Meltano's environment for the database at `database_uri`, without usage statistics.
fn meltano_env(database_uri: &str) -> Vec<(&'static str, String)> {
    vec![
        ("MELTANO_DATABASE_URI", database_uri.to_owned()),
        ("MELTANO_SEND_ANONYMOUS_USAGE_STATS", "false".to_owned()),
    ]
}

async fn round(settings: &Settings, state_ids: u32) -> BenchResult<Round> {
    let dir = settings.work_dir.join(state_ids.to_string());
    let project = project(settings, &dir)?;
    let source = format!("bench_meltano_{state_ids}");
    let target = format!("bench_meltano_{state_ids}_target");
    let source_url = recreate_database(&settings.admin_url, &source).await?;
    let ws = Workspace {
        settings,
        theirs_file: dir.join("meltano-export.json"),
        ours_file: dir.join("statekeeper-export.json"),
        dir,
        project,
        source_url,
        target,
        statekeeper: settings.statekeeper.to_string_lossy().into_owned(),
    };
    let file_mib = seed(&ws, state_ids)?;
    let export = measure_exports(&ws).await?;
    let import = measure_imports(&ws).await?;
    let (pg_dump, restore) = measure_pg_reference(&ws).await?;
    println!(
        "  pg_dump of the state table {:.3} s; psql --single-transaction restore {:.3} s",
        pg_dump.seconds, restore.seconds
    );
    println!(
        "  import: meltano {:.2} s, {:.0} MiB; statekeeper {:.3} s, {:.1} MiB",
        import[0].seconds, import[0].peak_mib, import[1].seconds, import[1].peak_mib
    );
    let to_folder = measure_into_folders(&ws, state_ids).await?;
    drop_database(&settings.admin_url, &ws.target).await?;
    Ok(Round {
        state_ids,
        file_mib,
        export,
        import,
        to_folder,
        pg_dump,
        restore,
    })
}

/// The state, written by Meltano itself (`meltano state import` of a generated document);
/// returns the document's size in MiB.
fn seed(ws: &Workspace, state_ids: u32) -> BenchResult<f64> {
    let seed = ws.dir.join("seed.json");
    std::fs::write(&seed, document(state_ids))?;
    let file_mib = std::fs::metadata(&seed)?.len() as f64 / 1048576.0;
    check(
        ws.meltano(&ws.source_env())
            .args(["state", "import"])
            .arg(&seed)
            .output()?,
        "meltano state import (seeding)",
    )?;
    println!("{state_ids} state IDs ({file_mib:.1} MiB) written by meltano state import");
    Ok(file_mib)
}

/// `meltano state export` (once more untimed, to keep its output) and statekeeper's export;
/// the two must be equal as JSON.
async fn measure_exports(ws: &Workspace<'_>) -> BenchResult<[Measured; 2]> {
    let repeat = ws.settings.repeat;
    let export_theirs = measure(repeat, || {
        let mut command = ws.meltano(&ws.source_env());
        command.args(["state", "export"]);
        command
    })
    .await?;
    let out = ws
        .meltano(&ws.source_env())
        .args(["state", "export"])
        .output()?;
    std::fs::write(&ws.theirs_file, &out.stdout)?;
    check(out, "meltano state export")?;
    let export_ours = measure(repeat, || {
        let _ = std::fs::remove_file(&ws.ours_file);
        let mut command = ws.statekeeper();
        command
            .args([
                "state",
                "--framework",
                "meltano",
                "export",
                "--format",
                "meltano",
            ])
            .args(["--database-url", &ws.source_url, "--to"])
            .arg(&ws.ours_file);
        command
    })
    .await?;
    let theirs: serde_json::Value = serde_json::from_slice(&std::fs::read(&ws.theirs_file)?)?;
    let ours: serde_json::Value = serde_json::from_slice(&std::fs::read(&ws.ours_file)?)?;
    if theirs != ours {
        return Err("the two exports differ as JSON".into());
    }
    println!(
        "  export: meltano {:.2} s, {:.0} MiB; statekeeper {:.3} s, {:.1} MiB (equal as JSON)",
        export_theirs.seconds, export_theirs.peak_mib, export_ours.seconds, export_ours.peak_mib
    );
    Ok([export_theirs, export_ours])
}

/// Both import Meltano's own file into a database Meltano has just created its tables in,
/// taking turns.
async fn measure_imports(ws: &Workspace<'_>) -> BenchResult<[Measured; 2]> {
    let mut import: [Vec<Measured>; 2] = Default::default();
    for _ in 0..ws.settings.repeat {
        for (side, runs) in import.iter_mut().enumerate() {
            let target_url = ws.upgraded_target().await?;
            let mut command = if side == 0 {
                let mut c = ws.meltano(&meltano_env(&sqlalchemy_uri(&target_url)));
                c.args(["state", "import"]).arg(&ws.theirs_file);
                c
            } else {
                let mut c = ws.statekeeper();
                c.args(["state", "--framework", "meltano", "import", "--merge"])
                    .args(["--database-url", &target_url, "--from"])
                    .arg(&ws.theirs_file);
                c
            };
            runs.push(run_timed(&mut command)?);
        }
    }
    Ok([summarize(&import[0]), summarize(&import[1])])
}

/// The physical reference: PostgreSQL's own dump of the state table and its restore in one
/// transaction into the table `meltano upgrade database` created.
async fn measure_pg_reference(ws: &Workspace<'_>) -> BenchResult<(Measured, Measured)> {
    let dump = ws.dir.join("pg-dump.sql");
    let (pg_dump_program, psql_program) = (
        pg_tool("pg_dump", &ws.source_url).await?,
        pg_tool("psql", &ws.source_url).await?,
    );
    let pg_dump = measure(ws.settings.repeat, || {
        let mut command = ws.timed(&pg_dump_program, &[]);
        command
            .args(["--data-only", "--table", "public.state", "--file"])
            .arg(&dump)
            .arg(&ws.source_url);
        command
    })
    .await?;
    let mut restores = Vec::new();
    for _ in 0..ws.settings.repeat {
        let target_url = ws.upgraded_target().await?;
        let mut command = ws.timed(&psql_program, &[]);
        command.args(PSQL_RESTORE_ARGS).arg(&dump).arg(&target_url);
        restores.push(run_timed(&mut command)?);
    }
    Ok((pg_dump, summarize(&restores)))
}

/// Into a file state backend: Meltano's way is `meltano state import` with the project's
/// state backend on the folder; ours, an export in its layout. Each starts from no folder, and
/// each must leave one folder per state ID.
async fn measure_into_folders(ws: &Workspace<'_>, state_ids: u32) -> BenchResult<[Measured; 2]> {
    let theirs_folder = ws.dir.join("meltano-backend");
    let ours_folder = ws.dir.join("statekeeper-backend");
    let mut backend_env = ws.source_env();
    backend_env.push((
        "MELTANO_STATE_BACKEND_URI",
        format!("file://{}", theirs_folder.display()),
    ));
    let folder_theirs = measure(ws.settings.repeat, || {
        let _ = std::fs::remove_dir_all(&theirs_folder);
        let mut command = ws.meltano(&backend_env);
        command.args(["state", "import"]).arg(&ws.theirs_file);
        command
    })
    .await?;
    let folder_ours = measure(ws.settings.repeat, || {
        let _ = std::fs::remove_dir_all(&ours_folder);
        let mut command = ws.statekeeper();
        command
            .args([
                "state",
                "--framework",
                "meltano",
                "export",
                "--format",
                "meltano-backend",
            ])
            .args(["--database-url", &ws.source_url, "--to"])
            .arg(format!("file://{}", ours_folder.display()));
        command
    })
    .await?;
    let files = |folder: &Path| std::fs::read_dir(folder).map(|d| d.count()).unwrap_or(0);
    if files(&theirs_folder) != state_ids as usize || files(&ours_folder) != state_ids as usize {
        return Err("a backend folder does not hold one folder per state ID".into());
    }
    println!(
        "  into a folder backend: meltano {:.2} s, {:.0} MiB; statekeeper {:.3} s, {:.1} MiB",
        folder_theirs.seconds, folder_theirs.peak_mib, folder_ours.seconds, folder_ours.peak_mib
    );
    Ok([folder_theirs, folder_ours])
}
