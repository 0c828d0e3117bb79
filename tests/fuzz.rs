//! Structure-aware fuzzing of every import reader (docs/reliability.md): valid exports of each
//! format — written by statekeeper, by the real SQLMesh's state (our `--format sqlmesh`) and by
//! the real `meltano state export` — plain, gzip and zstd, mutated (truncation, bit flips,
//! dropped, duplicated and retyped fields, huge numbers and strings, deep nesting, damaged
//! compression frames) and read to the end by the import's reader (`engine::import::scan`).
//! Every case must end in a report or a refusal, never a panic; a sample of refused cases is
//! imported into a real store, which must stay unchanged. The schedule parser, destination URLs
//! and schema names get the same treatment.
//!
//! `STATEKEEPER_FUZZ_CASES=N` sets the cases per reader (default 600 in the test command).

mod support;

use statekeeper::engine::import::scan;
use statekeeper::engine::{Compression, ExportFormat, ExportOptions, Framework, ImportOptions};
use support::TestDb;

/// A small, seeded xorshift generator: every run fuzzes the same cases.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn cases() -> usize {
    std::env::var("STATEKEEPER_FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(600)
}

/// One mutation of a valid file (`json`: the uncompressed document).
fn mutate(rng: &mut Rng, json: &[u8], compressed: &[u8]) -> Vec<u8> {
    let mut bytes = json.to_vec();
    match rng.below(12) {
        // Truncation anywhere.
        0 => bytes.truncate(rng.below(bytes.len())),
        // Bit flips.
        1 => {
            for _ in 0..=rng.below(8) {
                let at = rng.below(bytes.len());
                bytes[at] ^= 1 << rng.below(8);
            }
        }
        // A byte range removed (a field or part of one dropped).
        2 => {
            let from = rng.below(bytes.len());
            let to = (from + rng.below(64)).min(bytes.len());
            bytes.drain(from..to);
        }
        // A range duplicated (a field or value twice).
        3 => {
            let from = rng.below(bytes.len());
            let to = (from + rng.below(128)).min(bytes.len());
            let copy = bytes[from..to].to_vec();
            bytes.splice(to..to, copy);
        }
        // A value replaced by one of another type, or a huge or odd one.
        4..=7 => {
            let values: [&[u8]; 12] = [
                b"null",
                b"true",
                b"[]",
                b"{}",
                b"\"\"",
                b"1e400",
                b"-99999999999999999999999999999",
                b"18446744073709551616",
                b"\"\\ud800\"",
                b"0.0000000000000000000000001",
                b"\"\\u0000\"",
                b"NaN",
            ];
            let value = values[rng.below(values.len())];
            // After a colon: the start of some value.
            let colons: Vec<usize> = bytes
                .iter()
                .enumerate()
                .filter(|(_, b)| **b == b':')
                .map(|(i, _)| i)
                .collect();
            if let Some(&at) = colons.get(rng.below(colons.len())) {
                let end = (at + 1 + rng.below(40)).min(bytes.len());
                bytes.splice(at + 1..end, value.iter().copied());
            }
        }
        // A huge string value.
        8 => {
            let at = rng.below(bytes.len());
            let huge = format!("\"{}\"", "x".repeat(1 << 20));
            bytes.splice(at..at, huge.into_bytes());
        }
        // Deep nesting.
        9 => {
            let at = rng.below(bytes.len());
            let depth = 1 + rng.below(100_000);
            let mut nest = "[".repeat(depth);
            nest.push_str(&"]".repeat(rng.below(depth + 1)));
            bytes.splice(at..at, nest.into_bytes());
        }
        // A damaged compression frame.
        10 => {
            bytes = compressed.to_vec();
            for _ in 0..=rng.below(4) {
                let at = rng.below(bytes.len());
                bytes[at] = rng.next() as u8;
            }
        }
        // A truncated compression frame.
        _ => {
            bytes = compressed.to_vec();
            bytes.truncate(rng.below(bytes.len()));
        }
    }
    bytes
}

/// The file gzip- and zstd-compressed, as exports are.
async fn compressed(bytes: &[u8]) -> [Vec<u8>; 2] {
    use async_compression::tokio::write::{GzipEncoder, ZstdEncoder};
    use tokio::io::AsyncWriteExt;
    let mut gzip = GzipEncoder::new(Vec::new());
    gzip.write_all(bytes).await.unwrap();
    gzip.shutdown().await.unwrap();
    let mut zstd = ZstdEncoder::new(Vec::new());
    zstd.write_all(bytes).await.unwrap();
    zstd.shutdown().await.unwrap();
    [gzip.into_inner(), zstd.into_inner()]
}

#[derive(Default)]
struct Tally {
    cases: usize,
    accepted: usize,
    refused: usize,
    panics: usize,
}

/// Scans `cases` mutations of `seed`; returns the tally and a few refused files for the
/// database check.
async fn fuzz_reader(
    name: &str,
    seed: &[u8],
    cases: usize,
    rng: &mut Rng,
) -> (Tally, Vec<Vec<u8>>) {
    let compressed = compressed(seed).await;
    let report = scan(std::io::Cursor::new(seed.to_vec()))
        .await
        .unwrap_or_else(|e| panic!("{name}: the seed itself is refused: {e}"));
    assert!(
        report.rows.values().sum::<u64>() > 0,
        "{name}: the seed has rows"
    );
    let mut tally = Tally::default();
    let mut samples = Vec::new();
    for case in 0..cases {
        let which = &compressed[case % 2];
        let file = mutate(rng, seed, which);
        tally.cases += 1;
        match scan(std::io::Cursor::new(file.clone())).await {
            Ok(_) => tally.accepted += 1,
            Err(e) => {
                let text = e.to_string();
                if text.contains("panicked") {
                    tally.panics += 1;
                    let path = std::env::temp_dir().join(format!("fuzz-panic-{name}-{case}"));
                    let _ = std::fs::write(&path, &file);
                    eprintln!("{name}: case {case} panicked ({}): {text}", path.display());
                } else {
                    tally.refused += 1;
                    if samples.len() < 8 && case % 97 == 0 {
                        samples.push(file);
                    }
                }
            }
        }
    }
    println!(
        "fuzz: {name:<28} {:>8} cases: {:>7} accepted, {:>7} refused, {} panics",
        tally.cases, tally.accepted, tally.refused, tally.panics
    );
    (tally, samples)
}

async fn export_bytes(store: &statekeeper::engine::Store, format: ExportFormat) -> Vec<u8> {
    let (_, bytes) = store
        .export(
            Vec::new(),
            &ExportOptions {
                format,
                compression: Compression::None,
                environments: None,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    bytes
}

#[tokio::test]
async fn every_import_reader_refuses_mutated_files_without_panicking_or_changing_anything() {
    let cases = cases();
    let mut rng = Rng(0x5eed_1234_abcd_0042);

    // Seeds: statekeeper's exact and logical exports of generated state; SQLMesh's document of
    // state the real SQLMesh planned; the real `meltano state export`.
    let ours = TestDb::new().await;
    let store = ours.store("sqlmesh_state").await;
    store.init(None).await.unwrap();
    store
        .generate(&statekeeper::engine::generator::GenerateOptions {
            model_versions: 40,
            environments: 3,
            checkpoints_per_environment: 2,
            ..Default::default()
        })
        .await
        .unwrap();
    let (planned, _project) = support::sqlmesh::planned().await;
    let sqlmesh_store = planned
        .store("sqlmesh")
        .await
        .with_framework(Framework::Sqlmesh);
    let meltano_db = TestDb::new().await;
    let meltano = support::meltano::Project::new(&meltano_db);
    for i in 0..3 {
        meltano.set(
            &format!("dev:tap-{i}-to-target"),
            &serde_json::json!({"singer_state": {"bookmarks": {"users": {"id": i}}}}),
        );
    }
    let seeds = [
        (
            "exact",
            export_bytes(&store, ExportFormat::Exact).await,
            &store,
            &ours,
        ),
        (
            "statekeeper",
            export_bytes(&store, ExportFormat::Statekeeper).await,
            &store,
            &ours,
        ),
        (
            "sqlmesh",
            export_bytes(&sqlmesh_store, ExportFormat::Sqlmesh).await,
            &sqlmesh_store,
            &planned,
        ),
    ];
    let meltano_seed = meltano.ok(&["state", "export"]).into_bytes();
    let meltano_store = meltano_db
        .store("public")
        .await
        .with_framework(Framework::Meltano);

    let mut total = Tally::default();
    let mut checked = 0;
    let all_seeds = seeds
        .iter()
        .map(|(name, bytes, store, db)| (*name, bytes.as_slice(), *store, *db))
        .chain(std::iter::once((
            "meltano",
            meltano_seed.as_slice(),
            &meltano_store,
            &meltano_db,
        )));
    for (name, seed, target, db) in all_seeds {
        let (tally, samples) = fuzz_reader(name, seed, cases, &mut rng).await;
        total.cases += tally.cases;
        total.panics += tally.panics;
        // A sample of refused files against the real store: refused again, nothing changed.
        for file in samples {
            let before = support::snapshot(&mut db.conn().await, target.schema().as_str()).await;
            let result = target
                .import(std::io::Cursor::new(file), &ImportOptions::replace())
                .await;
            assert!(result.is_err(), "{name}: a file scan refused was imported");
            let after = support::snapshot(&mut db.conn().await, target.schema().as_str()).await;
            assert!(
                before == after,
                "{name}: a refused import changed the store"
            );
            checked += 1;
        }
    }

    // The schedule parser, destination URLs and schema names: odd input, never a panic.
    let mut others = 0;
    let alphabet: Vec<char> =
        "0123456789*/,-@LW#?abcdefghijklmnopqrstuvwxyz:/%.\\ \t\u{2215}\u{ff0f}\u{0}é"
            .chars()
            .collect();
    for _ in 0..cases {
        let length = rng.below(40);
        let text: String = (0..length)
            .map(|_| alphabet[rng.below(alphabet.len())])
            .collect();
        let _ = statekeeper::controller::schedule::Schedule::parse(&text, None);
        let _ = statekeeper::controller::schedule::Schedule::parse(&text, Some(&text));
        let _ = statekeeper::engine::Destination::parse(&text, &Default::default());
        let _ =
            statekeeper::engine::Destination::parse(&format!("s3://{text}"), &Default::default());
        let _ = statekeeper::engine::SchemaName::new(&text);
        others += 5;
    }
    println!(
        "fuzz: {} reader cases, {} refused files imported into real stores (unchanged), {others} \
         schedules, URLs and names; {} panics",
        total.cases, checked, total.panics
    );
    assert_eq!(total.panics, 0);
}
