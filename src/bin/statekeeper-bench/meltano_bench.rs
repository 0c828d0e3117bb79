//! `statekeeper-bench meltano`: Meltano's own `state export` / `state import` next to
//! statekeeper's `--format meltano`, and Meltano's way into a file state backend
//! (`meltano state import` with `state_backend.uri` on a folder) next to `--format
//! meltano-backend`, on one system database in the same run. The state is written by the real
//! Meltano (`meltano state import` of a generated document); every command runs `repeat` times as
//! a child process under `/usr/bin/time`: wall time (median) and peak resident memory (largest).

use std::path::{Path, PathBuf};

use super::BenchResult;
use super::sqlmesh_bench::{
    Measured, check, measure, recreate_database, run_timed, summarize, timed_command,
};

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
    super::sqlmesh_bench::require_time()?;
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

async fn round(settings: &Settings, state_ids: u32) -> BenchResult<Round> {
    let dir = settings.work_dir.join(state_ids.to_string());
    let project = project(settings, &dir)?;
    let source = format!("bench_meltano_{state_ids}");
    let target = format!("bench_meltano_{state_ids}_target");
    let source_url = recreate_database(&settings.admin_url, &source).await?;
    let uri = |url: &str| url.replacen("postgres://", "postgresql+psycopg://", 1);
    let source_uri = uri(&source_url);
    let meltano_env = |database_uri: &str| {
        vec![
            ("MELTANO_DATABASE_URI", database_uri.to_owned()),
            ("MELTANO_SEND_ANONYMOUS_USAGE_STATS", "false".to_owned()),
        ]
    };
    // Each timed command starts with the file system clean (`sync` first), so that no side pays
    // for the other's unwritten files: statekeeper syncs what it writes before it reports
    // success, Meltano never does.
    let timed = |program: &str, env: &[(&'static str, String)]| {
        let _ = std::process::Command::new("sync").status();
        let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        timed_command(program, &project, &pairs)
    };
    let statekeeper = settings.statekeeper.to_string_lossy().into_owned();

    // The state, written by Meltano itself.
    let seed = dir.join("seed.json");
    std::fs::write(&seed, document(state_ids))?;
    let file_mib = std::fs::metadata(&seed)?.len() as f64 / 1048576.0;
    check(
        timed(&settings.meltano, &meltano_env(&source_uri))
            .args(["state", "import"])
            .arg(&seed)
            .output()?,
        "meltano state import (seeding)",
    )?;
    println!("{state_ids} state IDs ({file_mib:.1} MiB) written by meltano state import");

    let theirs_file = dir.join("meltano-export.json");
    let ours_file = dir.join("statekeeper-export.json");
    let export_theirs = measure(settings.repeat, || {
        let mut command = timed(&settings.meltano, &meltano_env(&source_uri));
        command.args(["state", "export"]);
        command
    })
    .await?;
    let out = timed(&settings.meltano, &meltano_env(&source_uri))
        .args(["state", "export"])
        .output()?;
    std::fs::write(&theirs_file, &out.stdout)?;
    check(out, "meltano state export")?;
    let export_ours = measure(settings.repeat, || {
        let _ = std::fs::remove_file(&ours_file);
        let mut command = timed(&statekeeper, &[]);
        command
            .args([
                "state",
                "--framework",
                "meltano",
                "export",
                "--format",
                "meltano",
            ])
            .args(["--database-url", &source_url, "--to"])
            .arg(&ours_file);
        command
    })
    .await?;
    let theirs: serde_json::Value = serde_json::from_slice(&std::fs::read(&theirs_file)?)?;
    let ours: serde_json::Value = serde_json::from_slice(&std::fs::read(&ours_file)?)?;
    if theirs != ours {
        return Err("the two exports differ as JSON".into());
    }
    println!(
        "  export: meltano {:.2} s, {:.0} MiB; statekeeper {:.3} s, {:.1} MiB (equal as JSON)",
        export_theirs.seconds, export_theirs.peak_mib, export_ours.seconds, export_ours.peak_mib
    );

    // Both import Meltano's own file into a database Meltano has just created its tables in.
    let mut import: [Vec<Measured>; 2] = Default::default();
    for _ in 0..settings.repeat {
        for (side, runs) in import.iter_mut().enumerate() {
            let target_url = recreate_database(&settings.admin_url, &target).await?;
            let target_env = meltano_env(&uri(&target_url));
            check(
                timed(&settings.meltano, &target_env)
                    .args(["upgrade", "database"])
                    .output()?,
                "meltano upgrade database",
            )?;
            let mut command = if side == 0 {
                let mut c = timed(&settings.meltano, &target_env);
                c.args(["state", "import"]).arg(&theirs_file);
                c
            } else {
                let mut c = timed(&statekeeper, &[]);
                c.args(["state", "--framework", "meltano", "import", "--merge"])
                    .args(["--database-url", &target_url, "--from"])
                    .arg(&theirs_file);
                c
            };
            runs.push(run_timed(&mut command)?);
        }
    }
    let import = [summarize(&import[0]), summarize(&import[1])];

    // The physical reference: PostgreSQL's own dump of the state table and its restore in one
    // transaction into the table `meltano upgrade database` created.
    let dump = dir.join("pg-dump.sql");
    let (pg_dump_program, psql_program) = (
        super::pg_tool("pg_dump", &source_url).await?,
        super::pg_tool("psql", &source_url).await?,
    );
    let pg_dump = measure(settings.repeat, || {
        let mut command = timed(&pg_dump_program, &[]);
        command
            .args(["--data-only", "--table", "public.state", "--file"])
            .arg(&dump)
            .arg(&source_url);
        command
    })
    .await?;
    let mut restores = Vec::new();
    for _ in 0..settings.repeat {
        let target_url = recreate_database(&settings.admin_url, &target).await?;
        check(
            timed(&settings.meltano, &meltano_env(&uri(&target_url)))
                .args(["upgrade", "database"])
                .output()?,
            "meltano upgrade database",
        )?;
        let mut command = timed(&psql_program, &[]);
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
    let restore = summarize(&restores);
    println!(
        "  pg_dump of the state table {:.3} s; psql --single-transaction restore {:.3} s",
        pg_dump.seconds, restore.seconds
    );
    println!(
        "  import: meltano {:.2} s, {:.0} MiB; statekeeper {:.3} s, {:.1} MiB",
        import[0].seconds, import[0].peak_mib, import[1].seconds, import[1].peak_mib
    );

    // Into a file state backend: Meltano's way is `meltano state import` with the project's
    // state backend on the folder; ours, an export in its layout. Each starts from no folder.
    let theirs_folder = dir.join("meltano-backend");
    let ours_folder = dir.join("statekeeper-backend");
    let mut backend_env = meltano_env(&source_uri);
    backend_env.push((
        "MELTANO_STATE_BACKEND_URI",
        format!("file://{}", theirs_folder.display()),
    ));
    let folder_theirs = measure(settings.repeat, || {
        let _ = std::fs::remove_dir_all(&theirs_folder);
        let mut command = timed(&settings.meltano, &backend_env);
        command.args(["state", "import"]).arg(&theirs_file);
        command
    })
    .await?;
    let folder_ours = measure(settings.repeat, || {
        let _ = std::fs::remove_dir_all(&ours_folder);
        let mut command = timed(&statekeeper, &[]);
        command
            .args([
                "state",
                "--framework",
                "meltano",
                "export",
                "--format",
                "meltano-backend",
            ])
            .args(["--database-url", &source_url, "--to"])
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
    super::sqlmesh_bench::drop_database(&settings.admin_url, &target).await?;
    Ok(Round {
        state_ids,
        file_mib,
        export: [export_theirs, export_ours],
        import,
        to_folder: [folder_theirs, folder_ours],
        pg_dump,
        restore,
    })
}
