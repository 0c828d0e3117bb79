//! Backups that do not pile up, against a real PostgreSQL: each backup's tag, age and size;
//! `prune` keeping exactly what it promises (keep-last, older-than, both, N = 0, dry run); the
//! backups an unfinished operation may still need kept whatever the policy; the store's lock; and
//! the CLI (`backups list`, `backups prune`, `status`, `rollback` naming its backup first).

mod support;

use std::collections::BTreeSet;
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;
use sqlx::AssertSqlSafe;
use statekeeper::engine::{
    BackupInfo, Error, Framework, KeptBecause, PruneOptions, PruneReport, RetentionPolicy, Store,
};
use support::{TestDb, hold_store_lock};

const SCHEMA: &str = "state";

/// A store with `ages.len()` manual backups, created oldest first and then backdated so that
/// backup i is `ages[i]` hours old. Returns their ids, oldest first.
async fn store_with_backups(db: &TestDb, ages: &[i64]) -> (Store, Vec<String>) {
    let store = db.store(SCHEMA).await;
    store.init(None).await.unwrap();
    let mut conn = db.conn().await;
    let mut ids = Vec::new();
    for hours in ages {
        let backup = store.backup().await.unwrap();
        backdate(&mut conn, &backup.id, *hours * 3600).await;
        ids.push(backup.id);
    }
    (store, ids)
}

async fn backdate(conn: &mut sqlx::PgConnection, id: &str, seconds: i64) {
    backdate_in(conn, SCHEMA, id, seconds).await
}

async fn backdate_in(conn: &mut sqlx::PgConnection, schema: &str, id: &str, seconds: i64) {
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE \"{schema}__backup_{id}\"._statekeeper_backup \
         SET created_at = now() - make_interval(secs => {seconds})"
    )))
    .execute(conn)
    .await
    .unwrap();
}

async fn remaining(store: &Store) -> Vec<String> {
    store
        .backups()
        .await
        .unwrap()
        .into_iter()
        .map(|b| b.id)
        .collect()
}

fn ids(backups: &[BackupInfo]) -> Vec<String> {
    backups.iter().map(|b| b.id.clone()).collect()
}

fn policy(keep_last: Option<u32>, older_than_hours: Option<u64>) -> PruneOptions {
    PruneOptions {
        policy: RetentionPolicy {
            keep_last,
            older_than: older_than_hours.map(|h| Duration::from_secs(h * 3600)),
        },
        ..Default::default()
    }
}

fn pick(all: &[String], indexes: &[usize]) -> Vec<String> {
    indexes.iter().map(|&i| all[i].clone()).collect()
}

/// The kept backups of a report, newest first, with why.
fn kept(report: &PruneReport) -> Vec<(String, KeptBecause)> {
    report
        .kept
        .iter()
        .map(|k| (k.backup.id.clone(), k.kept_because.clone()))
        .collect()
}

#[tokio::test]
async fn backups_report_their_tag_age_and_size() {
    let db = TestDb::new().await;
    let (store, all) = store_with_backups(&db, &[30, 2]).await;
    let listed = store.backups().await.unwrap();
    assert_eq!(ids(&listed), all);
    assert!(listed.iter().all(|b| b.reason == "manual"));
    assert!((30 * 3600..30 * 3600 + 60).contains(&listed[0].age_seconds));
    assert!((2 * 3600..2 * 3600 + 60).contains(&listed[1].age_seconds));
    // The size is what PostgreSQL says the backup schema's tables take, indexes and TOAST in.
    let mut conn = db.conn().await;
    for backup in &listed {
        let expected: i64 = sqlx::query_scalar(
            "SELECT sum(pg_total_relation_size(c.oid))::bigint FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relkind = 'r'",
        )
        .bind(format!("{SCHEMA}__backup_{}", backup.id))
        .fetch_one(&mut conn)
        .await
        .unwrap();
        assert!(expected > 0);
        assert_eq!(backup.bytes, expected, "backup {}", backup.id);
    }
    // Every operation's backup carries its tag.
    store.rollback(Some(&all[0])).await.unwrap();
    let tags: Vec<String> = store
        .backups()
        .await
        .unwrap()
        .into_iter()
        .map(|b| b.reason)
        .collect();
    assert_eq!(tags, ["manual", "manual", "pre-rollback"]);
}

#[tokio::test]
async fn prune_keeps_exactly_what_it_promises() {
    let db = TestDb::new().await;
    // Oldest first: 50h, 40h, 30h, 20h, 10h and 0h old.
    let (store, all) = store_with_backups(&db, &[50, 40, 30, 20, 10, 0]).await;

    // No flag says nothing about what to keep: refused, nothing dropped.
    let refused = store.prune_backups(&policy(None, None)).await.unwrap_err();
    assert!(matches!(refused, Error::InvalidOperation(_)), "{refused}");
    assert!(refused.to_string().contains("--keep-last"), "{refused}");
    assert_eq!(remaining(&store).await, all);

    // A dry run reports and changes nothing.
    let mut dry = policy(Some(2), None);
    dry.dry_run = true;
    let report = store.prune_backups(&dry).await.unwrap();
    assert!(report.dry_run);
    assert_eq!(ids(&report.dropped), pick(&all, &[3, 2, 1, 0]));
    assert_eq!(
        kept(&report),
        vec![
            (all[5].clone(), KeptBecause::Newest { rank: 1 }),
            (all[4].clone(), KeptBecause::Newest { rank: 2 }),
        ]
    );
    assert_eq!(
        report.bytes_freed,
        report.dropped.iter().map(|b| b.bytes).sum::<i64>()
    );
    assert!(report.bytes_freed > 0);
    assert_eq!(remaining(&store).await, all);

    // Both flags: beyond the newest 2 *and* older than 25h.
    let report = store
        .prune_backups(&policy(Some(2), Some(25)))
        .await
        .unwrap();
    assert_eq!(ids(&report.dropped), pick(&all, &[2, 1, 0]));
    assert_eq!(
        kept(&report),
        vec![
            (all[5].clone(), KeptBecause::Newest { rank: 1 }),
            (all[4].clone(), KeptBecause::Newest { rank: 2 }),
            (all[3].clone(), KeptBecause::Young),
        ]
    );
    assert_eq!(remaining(&store).await, pick(&all, &[3, 4, 5]));
    let mut conn = db.conn().await;
    let left = support::schemas(&mut conn).await;
    for id in pick(&all, &[0, 1, 2]) {
        assert!(
            !left.contains(&format!("{SCHEMA}__backup_{id}")),
            "{left:?}"
        );
    }

    // --older-than alone: every backup older than 15h goes, whatever its rank.
    let report = store.prune_backups(&policy(None, Some(15))).await.unwrap();
    assert_eq!(ids(&report.dropped), pick(&all, &[3]));
    assert_eq!(remaining(&store).await, pick(&all, &[4, 5]));

    // --keep-last 0 with --older-than: only the age keeps.
    let report = store
        .prune_backups(&policy(Some(0), Some(5)))
        .await
        .unwrap();
    assert_eq!(ids(&report.dropped), pick(&all, &[4]));
    assert_eq!(remaining(&store).await, pick(&all, &[5]));

    // --keep-last 0 alone: every backup goes.
    let report = store.prune_backups(&policy(Some(0), None)).await.unwrap();
    assert_eq!(ids(&report.dropped), pick(&all, &[5]));
    assert!(report.kept.is_empty());
    assert!(remaining(&store).await.is_empty());

    // The store itself is untouched.
    assert!(store.status().await.unwrap().initialized);
}

#[tokio::test]
async fn backups_of_unfinished_operations_are_never_pruned() {
    let db = TestDb::new().await;
    let (store, all) = store_with_backups(&db, &[9, 8, 7]).await;
    // A backup made for a request (a StateMigration's uid), as the operator makes them.
    let tagged = store
        .clone()
        .with_operation_id("3f1e0c2a-uid")
        .backup_with_reason("pre-migration")
        .await
        .unwrap();
    backdate(&mut db.conn().await, &tagged.id, 100 * 3600).await;

    let mut options = policy(Some(0), None);
    options.protected_operations = BTreeSet::from(["3f1e0c2a-uid".to_owned()]);
    options.protected_backups = BTreeSet::from([all[1].clone()]);
    let report = store.prune_backups(&options).await.unwrap();
    assert_eq!(ids(&report.dropped), pick(&all, &[2, 0]));
    assert_eq!(
        kept(&report),
        vec![
            (all[1].clone(), KeptBecause::ProtectedBackup),
            (
                tagged.id.clone(),
                KeptBecause::ProtectedOperation {
                    operation: "3f1e0c2a-uid".into()
                }
            ),
        ]
    );
    assert_eq!(
        remaining(&store).await,
        vec![all[1].clone(), tagged.id.clone()]
    );

    // Once the operation has finished, its backup is like any other.
    let report = store.prune_backups(&policy(Some(0), None)).await.unwrap();
    assert_eq!(ids(&report.dropped), vec![all[1].clone(), tagged.id]);
}

/// A command for `run_guarded` that runs until `marker` is removed, then fails.
fn failing_after(marker: &std::path::Path) -> Vec<String> {
    let _ = std::fs::remove_file(marker);
    [
        "sh",
        "-c",
        &format!(
            "touch {m}; while [ -e {m} ]; do sleep 0.05; done; exit 3",
            m = marker.display()
        ),
    ]
    .map(String::from)
    .to_vec()
}

async fn wait_for(marker: &std::path::Path) {
    for _ in 0..400 {
        if marker.exists() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the command did not start");
}

/// `state run --backup` restores its backup when the command fails: while the command runs, its
/// backup is pinned, and neither prune nor drop removes it.
#[tokio::test]
async fn a_running_state_run_keeps_the_backup_it_may_restore() {
    let db = TestDb::new().await;
    let (store, all) = store_with_backups(&db, &[5]).await;
    let marker = std::env::temp_dir().join(format!("sk-prune-run-{}", std::process::id()));
    let command = failing_after(&marker);
    let runner = store.clone();
    let run = tokio::spawn(async move { runner.run_guarded(&command, &[], true).await });
    // The command runs once the marker exists: its backup was made before it started.
    wait_for(&marker).await;
    let backups = store.backups().await.unwrap();
    let pre_run = backups
        .iter()
        .find(|b| b.reason == "pre-run")
        .unwrap()
        .id
        .clone();

    let report = store.prune_backups(&policy(Some(0), None)).await.unwrap();
    assert_eq!(ids(&report.dropped), all);
    assert_eq!(kept(&report), vec![(pre_run.clone(), KeptBecause::InUse)]);
    let refused = store.drop_backup(&pre_run).await.unwrap_err();
    assert!(matches!(refused, Error::BackupInUse { .. }), "{refused}");
    assert_eq!(remaining(&store).await, vec![pre_run.clone()]);

    // The command fails: its backup is there to restore.
    std::fs::remove_file(&marker).unwrap();
    let report = run.await.unwrap().unwrap();
    assert!(!report.succeeded());
    assert_eq!(report.restored.unwrap().restored_backup.id, pre_run);

    // After the run, nothing pins it any more.
    let report = store.prune_backups(&policy(Some(0), None)).await.unwrap();
    assert!(report.kept.is_empty(), "{:?}", kept(&report));
    assert!(remaining(&store).await.is_empty());
}

/// State written by the real SQLMesh: its backups (tables with their keys and indexes) are sized
/// and pruned like statekeeper's, and a failing `state run --backup` (as around `sqlmesh
/// migrate`) restores SQLMesh's state exactly although a prune to zero ran while it did.
#[tokio::test]
async fn sqlmesh_backups_are_pruned_and_a_failing_run_still_restores() {
    let (db, _project) = support::sqlmesh::planned().await;
    let store = db.store("sqlmesh").await.with_framework(Framework::Sqlmesh);
    let before = support::sqlmesh::sqlmesh_state(&db.url).await;
    let mut conn = db.conn().await;
    let mut all = Vec::new();
    for hours in [30, 20, 10] {
        let backup = store.backup().await.unwrap();
        backdate_in(&mut conn, "sqlmesh", &backup.id, hours * 3600).await;
        all.push(backup.id);
    }
    let listed = store.backups().await.unwrap();
    assert!(
        listed
            .iter()
            .all(|b| b.bytes > 0 && b.framework == Framework::Sqlmesh)
    );

    let marker = std::env::temp_dir().join(format!("sk-prune-sqlmesh-{}", std::process::id()));
    let command = failing_after(&marker);
    let runner = store.clone();
    let run = tokio::spawn(async move { runner.run_guarded(&command, &[], true).await });
    wait_for(&marker).await;
    // What the command would have broken.
    sqlx::query("DELETE FROM sqlmesh._environments WHERE name = 'dev'")
        .execute(&mut conn)
        .await
        .unwrap();
    // Without its pin, the run's backup (the newest) would go with the others.
    let report = store.prune_backups(&policy(Some(0), None)).await.unwrap();
    assert_eq!(ids(&report.dropped), pick(&all, &[2, 1, 0]));
    let kept_now = kept(&report);
    assert_eq!(kept_now.len(), 1, "{kept_now:?}");
    assert_eq!(kept_now[0].1, KeptBecause::InUse);
    let pre_run = kept_now[0].0.clone();

    std::fs::remove_file(&marker).unwrap();
    let report = run.await.unwrap().unwrap();
    assert_eq!(report.restored.unwrap().restored_backup.id, pre_run);
    assert_eq!(support::sqlmesh::sqlmesh_state(&db.url).await, before);
}

#[tokio::test]
async fn prune_waits_for_the_store_lock_and_then_reports_busy() {
    let db = TestDb::new().await;
    let (store, all) = store_with_backups(&db, &[3, 2, 1]).await;
    let store = store.with_lock_timeout(Duration::from_millis(300));
    let mut holder = hold_store_lock(&db, SCHEMA).await;
    let busy = store
        .prune_backups(&policy(Some(1), None))
        .await
        .unwrap_err();
    assert!(matches!(busy, Error::Busy { .. }), "{busy}");
    assert_eq!(remaining(&store).await, all);
    sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
    let report = store.prune_backups(&policy(Some(1), None)).await.unwrap();
    assert_eq!(ids(&report.dropped), pick(&all, &[1, 0]));
}

fn statekeeper(url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_statekeeper"))
        .args(["state", "--schema", SCHEMA])
        .args(args)
        .env("STATEKEEPER_DATABASE_URL", url)
        .env_remove("STATEKEEPER_SCHEMA")
        .output()
        .expect("run statekeeper")
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json(out: &Output) -> Value {
    assert!(out.status.success(), "failed: {:?}", text(out));
    serde_json::from_slice(&out.stdout).expect("valid JSON on stdout")
}

#[tokio::test]
async fn the_cli_lists_prunes_and_says_what_it_restores() {
    let db = TestDb::new().await;
    let url = &db.url;
    let (_store, all) = store_with_backups(&db, &[80, 60, 40, 30, 20, 10, 5]).await;

    // `backups list`: a table with the tag, age and size of each.
    let (list, _) = text(&statekeeper(url, &["backups", "list"]));
    let lines: Vec<&str> = list.lines().collect();
    assert!(lines[0].starts_with("ID") && lines[0].contains("TAG") && lines[0].contains("AGE"));
    assert!(lines[0].contains("SIZE"), "{list}");
    assert!(lines[1].starts_with(&all[0]) && lines[1].contains("manual"));
    assert!(lines[1].contains("3d 8h"), "{list}");
    assert!(lines.last().unwrap().starts_with("7 backups"), "{list}");
    let listed = json(&statekeeper(url, &["backups", "list", "-o", "json"]));
    assert_eq!(listed.as_array().unwrap().len(), 7);
    assert_eq!(listed[0]["reason"], "manual");
    assert!(listed[0]["bytes"].as_i64().unwrap() > 0);
    assert!(listed[0]["ageSeconds"].as_i64().unwrap() >= 80 * 3600);

    // `status` stays short: the newest five, and how to see the rest.
    let (status, _) = text(&statekeeper(url, &["status"]));
    assert!(status.contains("backups: 7 ("), "{status}");
    assert!(
        status.contains(&all[6]) && !status.contains(&all[0]),
        "{status}"
    );
    assert!(
        status.contains("… 2 more: statekeeper state backups list"),
        "{status}"
    );
    let status = json(&statekeeper(url, &["status", "-o", "json"]));
    assert_eq!(status["backups"].as_array().unwrap().len(), 7);

    // No flag: refused with a clear error, nothing dropped.
    let refused = statekeeper(url, &["backups", "prune"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        text(&refused).1.contains("--keep-last N"),
        "{:?}",
        text(&refused)
    );
    let (dry, _) = text(&statekeeper(
        url,
        &[
            "backups",
            "prune",
            "--keep-last",
            "3",
            "--older-than",
            "35h",
            "--dry-run",
        ],
    ));
    assert!(dry.starts_with("would drop 3 backups"), "{dry}");
    assert!(dry.contains("dry run: nothing was changed"), "{dry}");
    assert_eq!(
        json(&statekeeper(url, &["backups", "-o", "json"]))
            .as_array()
            .unwrap()
            .len(),
        7
    );
    let pruned = json(&statekeeper(
        url,
        &[
            "backups",
            "prune",
            "--keep-last",
            "3",
            "--older-than",
            "35h",
            "-o",
            "json",
        ],
    ));
    let dropped: Vec<&str> = pruned["dropped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(dropped, [&all[2], &all[1], &all[0]]);
    assert_eq!(pruned["kept"][3]["keptBecause"]["kind"], "young");
    assert_eq!(pruned["policy"]["olderThanSeconds"], 35 * 3600);

    // `plan rollback` and `rollback` without --backup-id name the backup they restore.
    let (plan, _) = text(&statekeeper(url, &["plan", "rollback"]));
    assert!(
        plan.contains(&format!("restores: backup {} (manual, 5h", all[6])),
        "{plan}"
    );
    let out = statekeeper(url, &["rollback"]);
    let (report, announced) = text(&out);
    assert!(out.status.success(), "{announced}");
    assert!(
        announced.starts_with(&format!("restoring backup {} (manual, 5h old, ", all[6])),
        "{announced}"
    );
    assert!(announced.contains("the newest of 4 backups"), "{announced}");
    assert!(
        report.contains(&format!("to backup {} (manual, 5h old", all[6])),
        "{report}"
    );
}
