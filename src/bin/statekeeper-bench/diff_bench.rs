//! `statekeeper-bench diff`: `state diff` of a generated store at growing sizes, next to an export
//! and an import of the same store in the same run. Each round backs the store up, changes it as
//! a day of plans would (1 % of the environments' references moved to other versions, 0.5 % new
//! versions, each environment's oldest checkpoint removed), then diffs the backup against the
//! store (two schemas read) and an exact export taken with the backup against the store (the file
//! restored in scratch, then compared), each with its peak RSS; both must find the same.

use std::path::Path;
use std::time::{Duration, Instant};

use sqlx::{AssertSqlSafe, Connection, PgConnection};
use statekeeper::engine::{
    Compression, Destination, DiffOptions, DiffSide, ExportFormat, ExportOptions, FileSource,
    ImportOptions, SchemaName, Store,
};

use super::BenchResult;
use super::memory::{peak_rss_mib, reset_peak_rss};
use super::postgres::{fresh_store, generated_store, vacuum_store};

/// One operation's wall time and peak RSS.
struct Measured {
    time: Duration,
    peak_mib: f64,
}

struct Round {
    rows: u64,
    bytes: u64,
    export: Measured,
    import: Measured,
    backup_diff: Measured,
    file_diff: Measured,
    /// What the diffs found: (environments, versions, checkpoints) that differ.
    found: (u64, u64, u64),
}

pub(crate) async fn run(
    url: &str,
    schema: &str,
    sizes: &[u64],
    environments: u32,
) -> BenchResult<()> {
    let dir = std::env::temp_dir().join(format!("statekeeper-bench-diff-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    println!(
        "state diff benchmark (exact export, no compression; the same store and file in the same run)"
    );
    println!(
        "{:>9} {:>9} {:>7} {:>9} {:>8} {:>9} {:>8} {:>10} {:>8} {:>10} {:>8}   found (environments, versions, checkpoints); ratios",
        "versions",
        "rows",
        "MiB",
        "export s",
        "peak MiB",
        "import s",
        "peak MiB",
        "backup→ s",
        "peak MiB",
        "file→ s",
        "peak MiB",
    );
    for &size in sizes {
        let round = round(url, schema, &dir, size, environments).await;
        let round = match round {
            Ok(round) => round,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        print_row(size, &round);
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

async fn round(
    url: &str,
    schema: &str,
    dir: &Path,
    size: u64,
    environments: u32,
) -> BenchResult<Round> {
    let store = generated_store(url, schema, size, environments).await?;
    let backup = store.backup().await?;

    // The export, and the file the diff reads: the store as the backup has it.
    let file = dir.join("store.json");
    let destination = Destination::parse(&file.to_string_lossy(), &Default::default())?;
    let options = ExportOptions {
        compression: Compression::None,
        format: ExportFormat::Exact,
        ..Default::default()
    };
    reset_peak_rss();
    let exported = store.export_to(&destination, &options, |_| {}).await?;
    let export = Measured {
        time: exported.duration,
        peak_mib: peak_rss_mib(),
    };

    let target = fresh_store(url, &format!("{schema}_import")).await?;
    reset_peak_rss();
    let imported = target
        .import(destination.open().await?, &ImportOptions::replace())
        .await?;
    let import = Measured {
        time: imported.duration,
        peak_mib: peak_rss_mib(),
    };
    if let Some(b) = &imported.backup {
        target.drop_backup(&b.id).await?;
    }
    change(url, schema, size).await?;
    vacuum_store(url, schema).await?;

    let backup_side = DiffSide::<tokio::fs::File>::Backup(backup.id.clone());
    let (backup_diff, by_backup) = timed_diff(&store, backup_side).await?;
    let source = FileSource {
        label: file.display().to_string(),
        ..Default::default()
    };
    let file_side = DiffSide::File(destination.open().await?, source);
    let (file_diff, report) = timed_diff(&store, file_side).await?;
    if by_backup.statekeeper != report.statekeeper {
        return Err("the diff of the backup and of its export differ".into());
    }
    let found = report
        .statekeeper
        .map(|s| {
            (
                s.environments.count(),
                s.versions.added.count + s.versions.removed.count,
                s.checkpoints.added.count + s.checkpoints.removed.count,
            )
        })
        .unwrap_or_default();
    store.drop_backup(&backup.id).await?;
    Ok(Round {
        rows: exported.total_rows(),
        bytes: exported.bytes,
        export,
        import,
        backup_diff,
        file_diff,
        found,
    })
}

/// `from` against the store, as `state diff` runs it.
async fn timed_diff<R: tokio::io::AsyncRead + Unpin + Send + 'static>(
    store: &Store,
    from: DiffSide<R>,
) -> BenchResult<(Measured, statekeeper::engine::DiffReport)> {
    reset_peak_rss();
    let started = Instant::now();
    let report = store
        .diff(from, DiffSide::Live, &DiffOptions::default())
        .await?;
    let measured = Measured {
        time: started.elapsed(),
        peak_mib: peak_rss_mib(),
    };
    Ok((measured, report))
}

/// A day of plans: references moved, versions added, old checkpoints gone.
async fn change(url: &str, schema: &str, size: u64) -> BenchResult<()> {
    let s = SchemaName::new(schema)?.quoted();
    let n = size.max(1);
    let mut conn = PgConnection::connect(url).await?;
    let mut tx = conn.begin().await?;
    for sql in [
        format!(
            "UPDATE {s}.virtual_environment_refs SET model_version_id = model_version_id % {n} + 1
             WHERE abs(hashtext(model_name)) % 100 = 0"
        ),
        format!(
            "INSERT INTO {s}.model_versions (name, fingerprint, version)
             SELECT 'model_new_' || i, md5('new:' || i), 'vnew_' || i
             FROM generate_series(1, greatest({n} / 200, 1)) i"
        ),
        format!(
            "DELETE FROM {s}.virtual_environment_checkpoints c
             WHERE c.created_at = (SELECT min(d.created_at) FROM {s}.virtual_environment_checkpoints d
                                   WHERE d.environment = c.environment)"
        ),
    ] {
        sqlx::query(AssertSqlSafe(sql)).execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(())
}

fn print_row(size: u64, r: &Round) {
    let s = |m: &Measured| m.time.as_secs_f64();
    println!(
        "{:>9} {:>9} {:>7.1} {:>9.2} {:>8.1} {:>9.2} {:>8.1} {:>10.2} {:>8.1} {:>10.2} {:>8.1}   ({}, {}, {}); backup→/export {:.2}x, file→/export {:.2}x, file→/import {:.2}x",
        size,
        r.rows,
        r.bytes as f64 / 1048576.0,
        s(&r.export),
        r.export.peak_mib,
        s(&r.import),
        r.import.peak_mib,
        s(&r.backup_diff),
        r.backup_diff.peak_mib,
        s(&r.file_diff),
        r.file_diff.peak_mib,
        r.found.0,
        r.found.1,
        r.found.2,
        s(&r.backup_diff) / s(&r.export),
        s(&r.file_diff) / s(&r.export),
        s(&r.file_diff) / s(&r.import),
    );
}
