//! `statekeeper-bench export-import`: statekeeper's export and import of a generated store at
//! growing sizes, each round next to pg_dump and a psql restore of the same schema
//! (`pg_baseline`). With `--encrypt`, each round also exports and imports the same store
//! encrypted with age, alternating with the plain runs, and reports the overhead.

use std::path::Path;
use std::time::Duration;

use statekeeper::engine::{Compression, ExportFormat, Identities, Recipients, Store};

use super::BenchResult;
use super::memory::{peak_rss_mib, reset_peak_rss};
use super::pg_baseline::{Baseline, dump_and_restore};
use super::postgres::{fresh_store, generated_store};

/// What a round varies: the store's size and the export's form.
pub(crate) struct Settings {
    pub(crate) url: String,
    pub(crate) schema: String,
    pub(crate) environments: u32,
    pub(crate) compression: Compression,
    pub(crate) format: ExportFormat,
    /// Also measure the export and import encrypted with age, alternating with plain ones.
    pub(crate) encrypt: bool,
}

/// Plain and encrypted runs of one round, each this many times; the median is reported.
const ENCRYPTION_RUNS: usize = 3;

/// statekeeper's side of a round.
struct Transfer {
    rows: u64,
    export: Duration,
    export_bytes: u64,
    export_peak_mib: f64,
    import: Duration,
    import_peak_mib: f64,
    /// `state verify` of the same file, against the source store (a scratch restore beside it).
    verify: Duration,
    verify_peak_mib: f64,
}

/// One round a size, its row printed as soon as it is measured; the files go to a temporary
/// folder removed at the end, also when a round fails.
pub(crate) async fn run(settings: &Settings, sizes: &[u64]) -> BenchResult<()> {
    let dir = std::env::temp_dir().join(format!("statekeeper-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    print_header(settings);
    for &size in sizes {
        let round = round(settings, &dir, size).await;
        let (ours, reference) = match round {
            Ok(r) => r,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        print_row(size, &ours, &reference);
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// Our export and import first, then PostgreSQL's reference of the same schema.
async fn round(settings: &Settings, dir: &Path, size: u64) -> BenchResult<(Transfer, Baseline)> {
    let (url, schema) = (settings.url.as_str(), settings.schema.as_str());
    let source = generated_store(url, schema, size, settings.environments).await?;
    let ours = if settings.encrypt {
        compare_encryption(settings, dir, &source, size).await?
    } else {
        export_and_import(settings, dir, &source, None).await?
    };
    let reference = dump_and_restore(&settings.url, &settings.schema, dir, size).await?;
    Ok((ours, reference))
}

/// Plain and encrypted export and import of one store, alternating; prints the encrypted
/// medians and their ratios to the plain ones, and returns the plain medians.
async fn compare_encryption(
    settings: &Settings,
    dir: &Path,
    source: &Store,
    size: u64,
) -> BenchResult<Transfer> {
    // A fresh key pair, as `age-keygen` makes one.
    let identity = age::x25519::Identity::generate();
    let identities = Identities::parse(
        age::secrecy::ExposeSecret::expose_secret(&identity.to_string()),
        "the benchmark's key",
    )?;
    let keys = (identities.recipients(), identities);
    let (mut plain, mut encrypted) = (Vec::new(), Vec::new());
    for _ in 0..ENCRYPTION_RUNS {
        plain.push(export_and_import(settings, dir, source, None).await?);
        encrypted.push(export_and_import(settings, dir, source, Some(&keys)).await?);
    }
    let (plain, encrypted) = (Transfer::median(plain), Transfer::median(encrypted));
    println!(
        "{:>9} encrypted: export {:.3} s (plain {:.3} s), {:.1} MiB, peak {:.1} MiB (plain {:.1}); \
         import {:.3} s (plain {:.3} s), peak {:.1} MiB (plain {:.1})   encrypted/plain: export {:.2}x, import {:.2}x",
        size,
        encrypted.export.as_secs_f64(),
        plain.export.as_secs_f64(),
        encrypted.export_bytes as f64 / 1048576.0,
        encrypted.export_peak_mib,
        plain.export_peak_mib,
        encrypted.import.as_secs_f64(),
        plain.import.as_secs_f64(),
        encrypted.import_peak_mib,
        plain.import_peak_mib,
        encrypted.export.as_secs_f64() / plain.export.as_secs_f64(),
        encrypted.import.as_secs_f64() / plain.import.as_secs_f64(),
    );
    Ok(plain)
}

impl Transfer {
    /// The median of each figure over several runs (peaks: the largest).
    fn median(mut runs: Vec<Transfer>) -> Transfer {
        let mid = runs.len() / 2;
        let pick = |runs: &mut Vec<Transfer>, key: fn(&Transfer) -> Duration| {
            runs.sort_by_key(key);
            key(&runs[mid])
        };
        let export = pick(&mut runs, |t| t.export);
        let import = pick(&mut runs, |t| t.import);
        let verify = pick(&mut runs, |t| t.verify);
        let peak = |key: fn(&Transfer) -> f64| runs.iter().map(key).fold(0.0, f64::max);
        Transfer {
            rows: runs[mid].rows,
            export,
            export_bytes: runs[mid].export_bytes,
            export_peak_mib: peak(|t| t.export_peak_mib),
            import,
            import_peak_mib: peak(|t| t.import_peak_mib),
            verify,
            verify_peak_mib: peak(|t| t.verify_peak_mib),
        }
    }
}

/// Exports `source` to a file (encrypted to the key when one is given) and imports it into a
/// fresh store, each with its own peak RSS; the import must read back the very file the export
/// wrote.
async fn export_and_import(
    settings: &Settings,
    dir: &Path,
    source: &Store,
    keys: Option<&(Recipients, Identities)>,
) -> BenchResult<Transfer> {
    let (url, schema) = (settings.url.as_str(), settings.schema.as_str());

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
                compression: settings.compression,
                format: settings.format,
                recipients: keys.map(|(r, _)| r.clone()).unwrap_or_default(),
                ..Default::default()
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
            &statekeeper::engine::ImportOptions {
                identities: keys.map(|(_, i)| i.clone()).unwrap_or_default(),
                ..statekeeper::engine::ImportOptions::replace()
            },
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
    reset_peak_rss();
    let verified = source
        .verify(
            destination.open().await?,
            &statekeeper::engine::VerifyOptions {
                expected_sha256: report.sha256.clone(),
                identities: keys.map(|(_, i)| i.clone()).unwrap_or_default(),
            },
        )
        .await?;
    let verify_peak_mib = peak_rss_mib();
    Ok(Transfer {
        rows: report.total_rows(),
        export: report.duration,
        export_bytes: report.bytes,
        export_peak_mib,
        import: imported.duration,
        import_peak_mib,
        verify: verified.duration,
        verify_peak_mib,
    })
}

fn print_header(settings: &Settings) {
    let (format, compression) = (settings.format, settings.compression);
    println!(
        "export/import benchmark ({format} format, {compression:?}; pg_dump --data-only plain SQL with COPY; same schema, same run)"
    );
    println!(
        "{:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}   ratios",
        "versions",
        "rows",
        "export s",
        "MiB",
        "peak MiB",
        "import s",
        "peak MiB",
        "verify s",
        "peak MiB",
        "pg_dump s",
        "MiB",
        "restore s"
    );
}

fn print_row(size: u64, ours: &Transfer, reference: &Baseline) {
    println!(
        "{:>9} {:>9} {:>9.2} {:>9.1} {:>9.1} {:>9.2} {:>9.1} {:>9.2} {:>9.1} {:>9.2} {:>9.1} {:>9.2}   export/pg_dump {:.2}x, import/restore {:.2}x, verify/import {:.2}x",
        size,
        ours.rows,
        ours.export.as_secs_f64(),
        ours.export_bytes as f64 / 1048576.0,
        ours.export_peak_mib,
        ours.import.as_secs_f64(),
        ours.import_peak_mib,
        ours.verify.as_secs_f64(),
        ours.verify_peak_mib,
        reference.pg_dump.as_secs_f64(),
        reference.dump_bytes as f64 / 1048576.0,
        reference.restore.as_secs_f64(),
        ours.export.as_secs_f64() / reference.pg_dump.as_secs_f64(),
        ours.import.as_secs_f64() / reference.restore.as_secs_f64(),
        ours.verify.as_secs_f64() / ours.import.as_secs_f64(),
    );
}
