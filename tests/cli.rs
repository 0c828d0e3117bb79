//! The `statekeeper state …` CLI, run as a real process against a real PostgreSQL.

mod support;

use std::process::{Command, Output};

use serde_json::Value;
use support::{TestDb, schemas};

fn statekeeper(url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_statekeeper"))
        .args(args)
        .env("STATEKEEPER_DATABASE_URL", url)
        .env_remove("STATEKEEPER_SCHEMA")
        .output()
        .expect("run statekeeper")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn json(out: &Output) -> Value {
    assert!(out.status.success(), "failed: {}", stderr(out));
    serde_json::from_slice(&out.stdout).expect("valid JSON on stdout")
}

/// A failure prints exactly one line, no panic or backtrace, and exits 1.
fn assert_clean_failure(out: &Output) -> String {
    assert_eq!(
        out.status.code(),
        Some(1),
        "stdout: {} stderr: {}",
        stdout(out),
        stderr(out)
    );
    let err = stderr(out);
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
    err
}

#[tokio::test]
async fn walk_through_every_command() {
    let db = TestDb::new().await;
    let url = &db.url;
    let s = ["--schema", "sqlmesh"];

    let init = json(&statekeeper(
        url,
        &[
            "state",
            "init",
            "--target-version",
            "1",
            s[0],
            s[1],
            "-o",
            "json",
        ],
    ));
    assert_eq!(init["toVersion"], 1);
    let again = statekeeper(url, &["state", "init", s[0], s[1]]);
    assert!(
        stdout(&again).contains("already initialized at version 1"),
        "{}",
        stdout(&again)
    );

    let status = json(&statekeeper(
        url,
        &["state", "status", s[0], s[1], "-o", "json"],
    ));
    assert_eq!(status["currentVersion"], 1);
    assert_eq!(status["pending"].as_array().unwrap().len(), 2);
    let text = stdout(&statekeeper(url, &["state", "status", s[0], s[1]]));
    assert!(
        text.contains("version 1 of 3") && text.contains("2 pending"),
        "{text}"
    );

    // `migrate` is the word sqlbuild and SQLMesh users know.
    let up = json(&statekeeper(
        url,
        &["state", "migrate", s[0], s[1], "-o", "json"],
    ));
    assert_eq!(
        (up["fromVersion"].as_i64(), up["toVersion"].as_i64()),
        (Some(1), Some(3))
    );
    let backup_id = up["backup"]["id"].as_str().unwrap().to_owned();

    let list = json(&statekeeper(
        url,
        &["state", "backups", s[0], s[1], "-o", "json"],
    ));
    assert_eq!(list[0]["id"], backup_id.as_str());

    let rollback = statekeeper(
        url,
        &["state", "rollback", "--backup-id", &backup_id, s[0], s[1]],
    );
    assert!(rollback.status.success(), "{}", stderr(&rollback));
    assert!(stdout(&rollback).contains("undo with: statekeeper state rollback --schema"));
    let status = json(&statekeeper(
        url,
        &["state", "status", s[0], s[1], "-o", "json"],
    ));
    assert_eq!(status["currentVersion"], 1);
    assert_eq!(status["backups"].as_array().unwrap().len(), 2);

    let refused = statekeeper(url, &["state", "reset", s[0], s[1]]);
    let err = assert_clean_failure(&refused);
    assert!(err.contains("--allow-reset"), "{err}");
    let refused = statekeeper(url, &["state", "reset", "--allow-reset", s[0], s[1]]);
    assert!(assert_clean_failure(&refused).contains("--auto-approve"));
    assert_eq!(
        json(&statekeeper(
            url,
            &["state", "status", s[0], s[1], "-o", "json"]
        ))["initialized"],
        true
    );

    let reset = statekeeper(
        url,
        &[
            "state",
            "reset",
            "--allow-reset",
            "--auto-approve",
            s[0],
            s[1],
        ],
    );
    assert!(reset.status.success(), "{}", stderr(&reset));
    assert_eq!(
        json(&statekeeper(
            url,
            &["state", "status", s[0], s[1], "-o", "json"]
        ))["initialized"],
        false
    );

    let dropped = statekeeper(url, &["state", "backups", "drop", &backup_id, s[0], s[1]]);
    assert!(stdout(&dropped).contains(&backup_id));
    assert_eq!(
        json(&statekeeper(
            url,
            &["state", "backups", s[0], s[1], "-o", "json"]
        ))
        .as_array()
        .unwrap()
        .len(),
        2
    );
}

#[tokio::test]
async fn wrong_password_prints_one_line_without_the_password() {
    let db = TestDb::new().await;
    let real = db.password();
    let wrong = "Sup3rSecretWrongPw";
    let url = db
        .url
        .replacen(&format!(":{real}@"), &format!(":{wrong}@"), 1);
    for format in ["text", "json"] {
        let out = statekeeper(&url, &["state", "status", "-o", format]);
        let err = assert_clean_failure(&out);
        assert!(err.contains("rejected the credentials"), "{err}");
        assert!(!err.contains(wrong) && !err.contains(&real), "{err}");
        if format == "json" {
            let parsed: Value = serde_json::from_str(&err).unwrap();
            assert_eq!(parsed["error"]["reason"], "AuthenticationFailed");
        }
    }
    // Passed as a flag instead of the environment: same result.
    let out = Command::new(env!("CARGO_BIN_EXE_statekeeper"))
        .args(["state", "status", "--database-url", &url])
        .env_remove("STATEKEEPER_DATABASE_URL")
        .output()
        .unwrap();
    assert!(!assert_clean_failure(&out).contains(wrong));
}

#[tokio::test]
async fn hostile_schema_is_refused_and_nothing_is_created() {
    let db = TestDb::new().await;
    let mut conn = db.conn().await;
    let before = schemas(&mut conn).await;
    let out = statekeeper(
        &db.url,
        &[
            "state",
            "init",
            "--schema",
            "x\"; DROP SCHEMA public CASCADE; --",
        ],
    );
    let err = assert_clean_failure(&out);
    assert!(err.contains("invalid schema name"), "{err}");
    assert_eq!(schemas(&mut conn).await, before);
}

#[test]
fn missing_url_and_unreachable_host_are_clear() {
    let out = Command::new(env!("CARGO_BIN_EXE_statekeeper"))
        .args(["state", "status"])
        .env_remove("STATEKEEPER_DATABASE_URL")
        .output()
        .unwrap();
    assert!(assert_clean_failure(&out).contains("--database-url"));

    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let out = statekeeper(
        &format!("postgres://u:pw-in-url@127.0.0.1:{port}/db"),
        &["state", "status"],
    );
    let err = assert_clean_failure(&out);
    assert!(
        err.contains(&format!("cannot reach PostgreSQL at 127.0.0.1:{port}/db")),
        "{err}"
    );
    assert!(!err.contains("pw-in-url"));
}

#[test]
fn help_never_shows_the_database_url_from_the_environment() {
    let out = statekeeper("postgres://u:leaky-secret@h/db", &["state", "--help"]);
    assert!(out.status.success());
    assert!(!stdout(&out).contains("leaky-secret"));
}

#[tokio::test]
async fn janitor_dry_run_then_real_run() {
    let db = TestDb::new().await;
    let store = db.store("state").await;
    store.init(None).await.unwrap();
    store
        .generate(&statekeeper::engine::generator::GenerateOptions {
            model_versions: 2_000,
            environments: 8,
            ..Default::default()
        })
        .await
        .unwrap();
    let args = [
        "state",
        "janitor",
        "--schema",
        "state",
        "--keep-checkpoints",
        "2",
        "--checkpoint-min-age",
        "3d",
        "--grace",
        "1h",
        "--batch-size",
        "250",
    ];

    let dry = json(&statekeeper(
        &db.url,
        &[&args[..], &["--dry-run", "-o", "json"]].concat(),
    ));
    assert_eq!(dry["dryRun"], true);
    assert!(dry["modelVersions"].as_u64().unwrap() > 0);
    let names = dry["releasedRelations"].as_array().unwrap();
    assert_eq!(
        names.len() as u64,
        dry["physicalRelations"].as_u64().unwrap()
    );

    let real = statekeeper(&db.url, &args);
    assert!(real.status.success(), "{}", stderr(&real));
    let text = stdout(&real);
    assert!(
        text.contains(&format!("model versions         {}", dry["modelVersions"])),
        "the real run removes what the dry run reported: {text}"
    );
    let again = json(&statekeeper(
        &db.url,
        &[&args[..], &["-o", "json"]].concat(),
    ));
    assert_eq!(again["modelVersions"], 0);

    let bad = statekeeper(&db.url, &["state", "janitor", "--grace", "soon"]);
    assert_eq!(
        bad.status.code(),
        Some(2),
        "clap rejects a malformed duration"
    );
    assert!(stderr(&bad).contains("--grace"));
}

#[tokio::test]
async fn export_and_import_through_files_and_pipes() {
    let source = TestDb::new().await;
    let store = source.store("state").await;
    store.init(None).await.unwrap();
    store
        .generate(&statekeeper::engine::generator::GenerateOptions {
            model_versions: 500,
            environments: 4,
            ..Default::default()
        })
        .await
        .unwrap();
    let dir = std::env::temp_dir().join(format!("sk-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("state.json.zst");
    let path = file.to_str().unwrap();

    let exported = json(&statekeeper(
        &source.url,
        &[
            "state",
            "export",
            "--schema",
            "state",
            "--to",
            path,
            "--compression",
            "zstd",
            "-o",
            "json",
        ],
    ));
    let sha = exported["sha256"].as_str().unwrap().to_owned();
    assert_eq!(
        exported["bytes"].as_u64().unwrap(),
        std::fs::metadata(&file).unwrap().len()
    );
    assert!(
        !dir.join("state.json.partial").exists(),
        "no partial file is left behind"
    );

    let target = TestDb::new().await;
    statekeeper(&target.url, &["state", "init", "--schema", "state"]);
    // An exact export restores a whole store: never without --replace.
    let before = support::snapshot(&mut target.conn().await, "state").await;
    let refused = statekeeper(
        &target.url,
        &["state", "import", "--schema", "state", "--from", path],
    );
    assert!(
        assert_clean_failure(&refused).contains("import it with --replace"),
        "{}",
        stderr(&refused)
    );
    assert_eq!(
        support::snapshot(&mut target.conn().await, "state").await,
        before,
        "nothing changed"
    );
    let imported = statekeeper(
        &target.url,
        &[
            "state",
            "import",
            "--replace",
            "--schema",
            "state",
            "--from",
            &format!("file://{path}"),
            "--sha256",
            &sha,
        ],
    );
    assert!(imported.status.success(), "{}", stderr(&imported));
    assert!(
        stdout(&imported).contains("imported")
            && stdout(&imported).contains("replaced the store's state")
            && stdout(&imported).contains("undo with"),
        "{}",
        stdout(&imported)
    );

    // A wrong checksum is refused with one clear line.
    let refused = statekeeper(
        &target.url,
        &[
            "state",
            "import",
            "--replace",
            "--schema",
            "state",
            "-i",
            path,
            "--sha256",
            &"f".repeat(64),
        ],
    );
    assert!(assert_clean_failure(&refused).contains("checksum mismatch"));

    // Pipes: export to stdout, import from stdin; stdout carries only the data.
    let piped = statekeeper(
        &source.url,
        &[
            "state",
            "export",
            "--schema",
            "state",
            "--to",
            "-",
            "--format",
            "statekeeper",
            "--environment",
            "prod",
        ],
    );
    assert!(piped.status.success());
    assert!(
        stderr(&piped).contains("exported"),
        "summary on stderr: {}",
        stderr(&piped)
    );
    let doc: Value = serde_json::from_slice(&piped.stdout).expect("stdout is exactly the export");
    assert_eq!(doc["metadata"]["environments"][0], "prod");
    let mut child = Command::new(env!("CARGO_BIN_EXE_statekeeper"))
        .args([
            "state", "import", "--schema", "state", "--from", "-", "--merge",
        ])
        .env("STATEKEEPER_DATABASE_URL", &target.url)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&piped.stdout)
        .unwrap();
    let merged = child.wait_with_output().unwrap();
    assert!(
        merged.status.success(),
        "{}",
        String::from_utf8_lossy(&merged.stderr)
    );
    assert!(String::from_utf8_lossy(&merged.stdout).contains("merged: what the file holds"));

    let missing = statekeeper(
        &target.url,
        &[
            "state",
            "import",
            "--schema",
            "state",
            "--from",
            "/no/such/file.json",
        ],
    );
    let message = assert_clean_failure(&missing);
    assert!(
        message.contains("/no/such/file.json") && message.contains("not found"),
        "{message}"
    );
    let s3 = statekeeper(
        &target.url,
        &[
            "state",
            "export",
            "--schema",
            "state",
            "--to",
            "ftp://host/backup.json",
        ],
    );
    assert!(assert_clean_failure(&s3).contains("\"ftp://\" is not supported"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_closed_stdout_ends_quietly() {
    let db = TestDb::new().await;
    db.store("statekeeper").await.init(None).await.unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_statekeeper"))
        .args(["state", "status", "--output", "json"])
        .env("STATEKEEPER_DATABASE_URL", &db.url)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Like `| head -n 0`: the reader is gone before anything is written.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
}

#[tokio::test]
async fn plan_prints_the_hash_and_changes_nothing() {
    let db = TestDb::new().await;
    let url = &db.url;
    let store = db.store("sqlmesh").await;
    store.init(Some(1)).await.unwrap();
    support::populate_v1(&mut db.conn().await, "sqlmesh").await;
    let before = support::snapshot(&mut db.conn().await, "sqlmesh").await;

    let out = statekeeper(url, &["state", "--schema", "sqlmesh", "plan", "upgrade"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains(
            "plan: upgrade of the statekeeper store in schema \"sqlmesh\" (version 1 → 3)"
        ),
        "{text}"
    );
    assert!(text.contains("1. back up the store's"), "{text}");
    assert!(text.contains("apply migration 2"), "{text}");
    let plan = json(&statekeeper(
        url,
        &[
            "state", "--schema", "sqlmesh", "-o", "json", "plan", "upgrade",
        ],
    ));
    let hash = plan["hash"].as_str().unwrap();
    assert_eq!(hash.len(), 16);
    assert!(text.contains(&format!("hash: {hash}")), "{text}");
    assert_eq!(plan["toVersion"], 3);
    // The same request plans the same hash; without the backup it is another plan.
    let again = json(&statekeeper(
        url,
        &[
            "state", "--schema", "sqlmesh", "-o", "json", "plan", "upgrade",
        ],
    ));
    assert_eq!(again["hash"], plan["hash"]);
    let unbacked = json(&statekeeper(
        url,
        &[
            "state",
            "--schema",
            "sqlmesh",
            "-o",
            "json",
            "plan",
            "--no-backup",
            "upgrade",
        ],
    ));
    assert_ne!(unbacked["hash"], plan["hash"]);
    assert_eq!(
        support::snapshot(&mut db.conn().await, "sqlmesh").await,
        before
    );

    // A changed store is another plan.
    sqlx::query("DELETE FROM sqlmesh.model_versions WHERE name = 'db.model_1'")
        .execute(&mut db.conn().await)
        .await
        .unwrap();
    let changed = json(&statekeeper(
        url,
        &[
            "state", "--schema", "sqlmesh", "-o", "json", "plan", "upgrade",
        ],
    ));
    assert_ne!(changed["hash"], plan["hash"]);

    // Refusals are one clean line.
    let err = assert_clean_failure(&statekeeper(
        url,
        &["state", "--schema", "sqlmesh", "plan", "reset"],
    ));
    assert!(
        err.contains("allowReset") || err.contains("--allow-reset"),
        "{err}"
    );
}

#[tokio::test]
async fn run_with_backup_restores_the_store_when_the_command_fails() {
    let db = TestDb::new().await;
    let url = &db.url;
    let store = db.store("sqlmesh").await;
    store.init(None).await.unwrap();
    support::populate_v3(&mut db.conn().await, "sqlmesh").await;
    let before = support::snapshot(&mut db.conn().await, "sqlmesh").await;
    let bin = env!("CARGO_BIN_EXE_statekeeper");

    // The command reaches the store through the variables `run` sets, wipes it, and fails.
    let script = format!(
        "test -n \"$PGHOST\" && test -n \"$PGPASSWORD\" && test \"$STATEKEEPER_SCHEMA\" = sqlmesh && \
         {bin} state reset --allow-reset --auto-approve >&2 && exit 3"
    );
    let out = statekeeper(
        url,
        &[
            "state", "--schema", "sqlmesh", "run", "--backup", "--", "sh", "-c", &script,
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(3),
        "the command's own status: {}",
        stderr(&out)
    );
    let text = stdout(&out);
    assert!(text.contains("failed with exit status 3"), "{text}");
    assert!(text.contains("restored backup"), "{text}");
    assert!(!text.contains(&db.password()) && !stderr(&out).contains(&db.password()));
    let mut after = support::snapshot(&mut db.conn().await, "sqlmesh").await;
    let mut expected = before.clone();
    // Only the record of the rollback that undid the reset is new (the reset dropped the tables,
    // history included, so the restored history is the one from before the command).
    let events = after.remove("state_migration_events").unwrap();
    let earlier = expected.remove("state_migration_events").unwrap();
    assert_eq!(after, expected, "every row as before the command");
    assert_eq!(events.len(), earlier.len() + 1);
    assert!(
        earlier.iter().all(|e| events.contains(e)),
        "earlier history kept"
    );
    assert!(
        events
            .iter()
            .any(|e| e.contains("\"operation\": \"rollback\""))
    );

    // JSON, and a command that succeeds: its changes stay, the backup is kept.
    let report = json(&statekeeper(
        url,
        &[
            "state",
            "--schema",
            "sqlmesh",
            "-o",
            "json",
            "run",
            "--backup",
            "--",
            "sh",
            "-c",
            &format!("{bin} state reset --allow-reset --auto-approve >&2"),
        ],
    ));
    assert_eq!(report["outcome"]["kind"], "succeeded");
    assert!(report["restored"].is_null());
    let backup_id = report["backup"]["id"].as_str().unwrap();
    assert!(
        support::snapshot(&mut db.conn().await, "sqlmesh")
            .await
            .is_empty()
    );
    assert!(
        schemas(&mut db.conn().await)
            .await
            .contains(&format!("sqlmesh__backup_{backup_id}"))
    );

    // A command that does not exist changes nothing and says so.
    let err = assert_clean_failure(&statekeeper(
        url,
        &[
            "state",
            "--schema",
            "sqlmesh",
            "run",
            "--",
            "no-such-command-here",
        ],
    ));
    assert!(err.contains("cannot run `no-such-command-here`"), "{err}");
}

/// A pid a test's command wrote into `file` (waiting for it to be written).
fn pid_in(file: &std::path::Path) -> i32 {
    for _ in 0..500 {
        if let Some(pid) = std::fs::read_to_string(file)
            .ok()
            .and_then(|t| t.trim().parse().ok())
        {
            return pid;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("{} was never written", file.display());
}

fn is_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
    })
}

/// `state run --backup` restores only after every process the command started has ended: a
/// wrapper script's child that writes to the store when it is stopped, and a daemon that left
/// the command's process group, are stopped and waited for first; nothing is left running; and
/// statekeeper exits with the command's own status.
#[tokio::test]
async fn run_restores_only_after_every_process_the_command_started_has_ended() {
    let db = TestDb::new().await;
    let url = &db.url;
    let store = db.store("sqlmesh").await;
    store.init(None).await.unwrap();
    support::populate_v3(&mut db.conn().await, "sqlmesh").await;
    let before = support::snapshot(&mut db.conn().await, "sqlmesh").await;
    let bin = env!("CARGO_BIN_EXE_statekeeper");
    let dir = support::operator::temp_dir("run-group");
    let (writer, daemon) = (dir.join("writer.pid"), dir.join("daemon.pid"));

    // The wrapper starts a child that, when stopped, wipes the store on its way out (as a
    // SQLMesh child deleting environments did), and a daemon in a session of its own; then it
    // fails. Restoring before they end would leave the store wiped.
    let script = format!(
        "echo from-the-command; sh -c 'echo $$ > {writer}; trap \"{bin} state reset --allow-reset --auto-approve >&2; exit 0\" TERM; \
         while :; do sleep 0.05; done' & \
         setsid sh -c 'echo $$ > {daemon}; exec sleep 600' & \
         while [ ! -s {writer} ] || [ ! -s {daemon} ]; do sleep 0.05; done; exit 3",
        writer = writer.display(),
        daemon = daemon.display(),
    );
    let out = statekeeper(
        url,
        &[
            "state", "--schema", "sqlmesh", "-o", "json", "run", "--backup", "--", "sh", "-c",
            &script,
        ],
    );
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let report: Value = serde_json::from_slice(&out.stdout).expect("only the report on stdout");
    assert!(
        stderr(&out).contains("from-the-command"),
        "the command's output goes to stderr"
    );
    assert_eq!(
        report["outcome"],
        serde_json::json!({"kind": "failed", "code": 3})
    );
    // The writer, the daemon, and whatever they run at that moment (a `sleep`).
    assert!(report["stoppedProcesses"].as_u64() >= Some(2), "{report}");
    assert!(report["restored"].is_object(), "{report}");
    for pid in [pid_in(&writer), pid_in(&daemon)] {
        assert!(
            !is_alive(pid),
            "process {pid} the command started is still running"
        );
    }
    let mut after = support::snapshot(&mut db.conn().await, "sqlmesh").await;
    after.remove("state_migration_events");
    let mut expected = before.clone();
    expected.remove("state_migration_events");
    assert_eq!(after, expected, "the late write was undone by the restore");

    // The command's exit status, or 128 + N when a signal N ended it.
    for (script, code) in [("exit 7", 7), ("kill -KILL $$", 137)] {
        let out = statekeeper(
            url,
            &[
                "state", "--schema", "sqlmesh", "run", "--", "sh", "-c", script,
            ],
        );
        assert_eq!(out.status.code(), Some(code), "{script}: {}", stderr(&out));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// SIGTERM to statekeeper stops the command and everything it started, waits for them, restores,
/// and exits 143 (128 + SIGTERM).
#[tokio::test]
async fn run_interrupted_by_sigterm_stops_the_command_waits_and_restores() {
    let db = TestDb::new().await;
    let url = &db.url;
    let store = db.store("sqlmesh").await;
    store.init(None).await.unwrap();
    support::populate_v3(&mut db.conn().await, "sqlmesh").await;
    let before = support::snapshot(&mut db.conn().await, "sqlmesh").await;
    let bin = env!("CARGO_BIN_EXE_statekeeper");
    let dir = support::operator::temp_dir("run-term");
    let child = dir.join("child.pid");
    // The command wipes the store, then waits; its child outlives it unless stopped.
    let script = format!(
        "{bin} state reset --allow-reset --auto-approve >&2; \
         sh -c 'echo $$ > {child}; exec sleep 600' & wait",
        child = child.display()
    );
    let running = Command::new(bin)
        .args([
            "state", "--schema", "sqlmesh", "run", "--backup", "--", "sh", "-c", &script,
        ])
        .env("STATEKEEPER_DATABASE_URL", url)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = pid_in(&child);
    // SAFETY: signals the statekeeper process this test started.
    unsafe {
        libc::kill(running.id() as i32, libc::SIGTERM);
    }
    let out = running.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(143), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("interrupted by signal 15"), "{text}");
    assert!(
        text.contains("the store is as it was before the command"),
        "{text}"
    );
    assert!(!is_alive(pid), "the command's child is still running");
    let mut after = support::snapshot(&mut db.conn().await, "sqlmesh").await;
    after.remove("state_migration_events");
    let mut expected = before;
    expected.remove("state_migration_events");
    assert_eq!(after, expected);
    std::fs::remove_dir_all(&dir).unwrap();
}
