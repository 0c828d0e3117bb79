//! Every shell block of README.md and docs/ runs as written, against a throwaway PostgreSQL and
//! the real tools, so that a pasted command works and docs cannot drift from the code.
//!
//! A block runs with `bash -eo pipefail`, the `statekeeper` under test first on `PATH` and
//! `STATEKEEPER_DATABASE_URL` naming a fresh database, in the context its marker names, an HTML
//! comment on the line before its fence (invisible when rendered):
//!
//! - no marker: an empty database, in a scratch folder;
//! - `<!-- docs-test: statekeeper-store -->`: statekeeper's store initialised, with state;
//! - `<!-- docs-test: sqlmesh -->`: SQLMesh's state planned by the real SQLMesh, in the
//!   project's folder, `sqlmesh` on `PATH`;
//! - `<!-- docs-test: meltano -->`: a Meltano system database written by the real Meltano, in
//!   the project's folder, `meltano` on `PATH`;
//! - `<!-- docs-test: repository -->`: no database, in the repository's folder (scripts that
//!   start their own server);
//! - `<!-- docs-test: skip: REASON -->`: not run, and REASON says why (a cluster, a benchmark of
//!   minutes, this test suite itself).

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::TestDb;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

#[derive(Debug)]
struct Block {
    file: String,
    line: usize,
    marker: Option<String>,
    code: String,
}

/// The sh/bash blocks of a Markdown file, with the marker before each.
fn shell_blocks(file: &str) -> Vec<Block> {
    let text = std::fs::read_to_string(Path::new(ROOT).join(file))
        .unwrap_or_else(|e| panic!("{file}: {e}"));
    let lines: Vec<&str> = text.lines().collect();
    let mut blocks = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let fence = lines[i].trim_start();
        let info = fence.strip_prefix("```").map(str::trim);
        if info.is_some_and(|info| {
            ["sh", "bash", "shell", "console"]
                .contains(&info.split_whitespace().next().unwrap_or(""))
        }) {
            let start = i;
            let end = (i + 1..lines.len())
                .find(|j| lines[*j].trim_start().starts_with("```"))
                .unwrap_or_else(|| panic!("{file}:{}: unclosed block", start + 1));
            let marker = start
                .checked_sub(1)
                .map(|p| lines[p].trim())
                .and_then(|l| l.strip_prefix("<!-- docs-test:"))
                .and_then(|l| l.strip_suffix("-->"))
                .map(|m| m.trim().to_owned());
            blocks.push(Block {
                file: file.to_owned(),
                line: start + 1,
                marker,
                code: lines[start + 1..end].join("\n"),
            });
            i = end;
        }
        i += 1;
    }
    blocks
}

fn documents() -> Vec<String> {
    let mut files = vec!["README.md".to_owned()];
    let mut docs: Vec<String> = std::fs::read_dir(Path::new(ROOT).join("docs"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".md"))
        .map(|name| format!("docs/{name}"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
}

/// Where a block runs: its folder, the database, and what goes first on PATH. The databases
/// and projects live as long as this value.
struct Context {
    dir: PathBuf,
    /// The folder is the test's own, removed after a block that passed.
    scratch: bool,
    url: Option<String>,
    path: Vec<PathBuf>,
    _databases: Vec<TestDb>,
}

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sk-docs-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn context(kind: &str, tag: &str) -> Context {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_statekeeper"));
    let mut path = vec![bin.parent().unwrap().to_owned()];
    match kind {
        "default" | "statekeeper-store" => {
            let db = TestDb::new().await;
            if kind == "statekeeper-store" {
                db.store("statekeeper").await.init(None).await.unwrap();
                support::populate_v3(&mut db.conn().await, "statekeeper").await;
            }
            Context {
                dir: scratch(tag),
                scratch: true,
                url: Some(db.url.clone()),
                path,
                _databases: vec![db],
            }
        }
        "repository" => Context {
            dir: PathBuf::from(ROOT),
            scratch: false,
            url: None,
            path,
            _databases: Vec::new(),
        },
        "sqlmesh" => {
            let (db, project) = support::sqlmesh::planned().await;
            path.push(
                Path::new(support::sqlmesh::sqlmesh_bin())
                    .parent()
                    .unwrap()
                    .to_owned(),
            );
            Context {
                dir: project.dir.clone(),
                scratch: false,
                url: Some(db.url.clone()),
                path,
                _databases: vec![db],
            }
        }
        "meltano" => {
            let db = TestDb::new().await;
            let project = support::meltano::Project::new(&db);
            for (i, id) in ["dev:tap-a-to-target-x", "prod:tap-a-to-target-x"]
                .into_iter()
                .enumerate()
            {
                project.set(
                    id,
                    &serde_json::json!({"singer_state": {"bookmarks": {"users": {"id": i}}}}),
                );
            }
            path.push(
                Path::new(support::meltano::meltano_bin())
                    .parent()
                    .unwrap()
                    .to_owned(),
            );
            Context {
                dir: project.dir.clone(),
                scratch: false,
                url: Some(db.url.clone()),
                path,
                _databases: vec![db],
            }
        }
        other => panic!("unknown docs-test context \"{other}\""),
    }
}

/// Runs one block in its context; the error says where it is and what it printed.
async fn run(block: &Block, kind: &str) -> Result<(), String> {
    let tag = format!("{}-{}", block.file.replace(['/', '.'], "-"), block.line);
    let ctx = context(kind, &tag).await;
    let path = std::env::join_paths(ctx.path.iter().cloned().chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))
    .unwrap();
    let mut command = Command::new("bash");
    command
        .args(["-eo", "pipefail", "-c", &block.code])
        .current_dir(&ctx.dir)
        .env("PATH", path)
        // A release build is not what is tested: the quickstart uses this binary.
        .env("STATEKEEPER_BIN", env!("CARGO_BIN_EXE_statekeeper"))
        .env("MELTANO_SEND_ANONYMOUS_USAGE_STATS", "false")
        .env("NO_COLOR", "1")
        .env_remove("STATEKEEPER_SCHEMA")
        .env_remove("STATEKEEPER_FRAMEWORK")
        .env_remove("MELTANO_DATABASE_URI")
        .stdin(std::process::Stdio::null());
    match &ctx.url {
        Some(url) => command.env("STATEKEEPER_DATABASE_URL", url),
        None => command.env_remove("STATEKEEPER_DATABASE_URL"),
    };
    let out = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .map_err(|e| format!("cannot run bash: {e}"))?;
    if out.status.success() {
        if ctx.scratch {
            let _ = std::fs::remove_dir_all(&ctx.dir);
        }
        return Ok(());
    }
    Err(format!(
        "{}:{} ({kind}) failed with {}:\n--- block\n{}\n--- stdout\n{}\n--- stderr\n{}",
        block.file,
        block.line,
        out.status,
        block.code,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

#[tokio::test]
async fn every_shell_block_of_the_docs_runs_as_written_or_says_why_not() {
    let mut ran = 0;
    let mut skipped = Vec::new();
    let mut failures = Vec::new();
    for file in documents() {
        for block in shell_blocks(&file) {
            let kind = match block.marker.as_deref() {
                None => "default".to_owned(),
                Some(marker) => match marker.strip_prefix("skip:") {
                    Some(reason) => {
                        assert!(
                            reason.trim().len() >= 10,
                            "{}:{}: a skipped block says why",
                            block.file,
                            block.line
                        );
                        skipped.push(format!("{}:{} ({})", block.file, block.line, reason.trim()));
                        continue;
                    }
                    None => marker.to_owned(),
                },
            };
            ran += 1;
            if let Err(failure) = run(&block, &kind).await {
                failures.push(failure);
            }
        }
    }
    println!("ran {ran} shell blocks; skipped {}:", skipped.len());
    for skip in &skipped {
        println!("  {skip}");
    }
    assert!(ran >= 10, "only {ran} blocks ran");
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// The markers are read as the test reads them: a marker naming no known context fails here,
/// not silently.
#[test]
fn every_marker_names_a_context_or_a_reason() {
    for file in documents() {
        for block in shell_blocks(&file) {
            if let Some(marker) = &block.marker {
                assert!(
                    marker.starts_with("skip:")
                        || ["statekeeper-store", "sqlmesh", "meltano", "repository"]
                            .contains(&marker.as_str()),
                    "{}:{}: unknown marker \"{marker}\"",
                    block.file,
                    block.line
                );
            }
        }
    }
}
