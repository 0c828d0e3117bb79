//! SQLMesh's views after the operator restores a store (a StateMigration's rollback or import,
//! the restore after a failed runner Job), on state written by the real SQLMesh: the re-point
//! Job (built like every runner Job, the request in its environment, no secret value in it),
//! run here as its pod would run it; its retries; the StateMigration's `status.virtualLayer` and
//! `ViewsCurrent`, the StateStore's `VirtualLayerStale`; the janitor waiting meanwhile; and a
//! restore without `spec.virtualLayer`, or one that changed no environment.

mod support;

use std::path::Path;
use std::process::Command;

use kube::runtime::controller::Action;
use serde_json::{Value, json};
use statekeeper::api::StateMigration;
use statekeeper::api::state_migration::VirtualLayerStatus;
use statekeeper::engine::virtual_layer::{DRIVER, request};
use statekeeper::engine::{Framework, Store};
use support::TestDb;
use support::operator::{
    Harness, at, condition, job_path, migration_condition, migration_path, put_secret,
    state_migration, store_for, store_path, support_merge,
};
use support::sqlmesh::{DEV_CHANGE, Project, planned, sqlmesh_bin, sqlmesh_version};

const JOBS: &str = "/apis/batch/v1/namespaces/data/jobs";

async fn sqlmesh_store(db: &TestDb) -> Store {
    db.store("sqlmesh").await.with_framework(Framework::Sqlmesh)
}

/// The Python the test's `sqlmesh` runs with: the interpreter a re-point runner names.
fn python() -> String {
    Path::new(sqlmesh_bin())
        .with_file_name("python")
        .to_string_lossy()
        .into_owned()
}

/// The store `analytics` (SQLMesh, schema `sqlmesh`) with `extra` in its spec, and its Secret.
fn harness(db: &TestDb, extra: Value) -> Harness {
    let h = Harness::new();
    put_secret(&h.kube, "pg-credentials", &[("password", &db.password())]);
    let mut spec = json!({"framework": "sqlmesh", "schema": null});
    support_merge(&mut spec, &extra);
    let mut store = store_for(db, "analytics", spec);
    store["metadata"]["creationTimestamp"] = json!("2026-11-20T12:00:00Z");
    h.kube.put(&store_path("analytics"), store);
    h
}

/// A backup of the planned fixture, then a real `sqlmesh plan` that changes prod: a rollback to
/// the backup changes prod's snapshots back, and the warehouse's prod views are then stale.
async fn backed_up_then_changed(db: &TestDb, project: &Project) -> String {
    let backup = sqlmesh_store(db)
        .await
        .backup_with_reason("manual")
        .await
        .unwrap();
    let (file, from, to) = DEV_CHANGE;
    project.edit(file, from, to);
    project.plan("prod", &[]);
    backup.id
}

fn rollback(name: &str, backup_id: &str) -> Value {
    state_migration(
        name,
        "2026-11-27T10:00:00Z",
        json!({"rollback": {"backupId": backup_id}}),
    )
}

/// The StateStore as the operator reports it now.
async fn store_status(h: &Harness) -> statekeeper::api::StateStoreStatus {
    let object = h.kube.get(&store_path("analytics")).unwrap();
    let (_, store) = h.reconcile(&object).await;
    store.status.unwrap()
}

fn views(m: &StateMigration) -> VirtualLayerStatus {
    m.status
        .as_ref()
        .and_then(|s| s.virtual_layer.clone())
        .expect("status.virtualLayer")
}

fn env_var<'a>(job: &'a Value, name: &str) -> &'a Value {
    job["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in the Job"))
}

/// Runs the Job's container as its pod would (its command, args, working directory and plain
/// environment; the project's config names the state connection itself) and records the
/// outcome in the Job's status, as the Job controller would. Returns the driver's report.
fn run_job_like_its_pod(h: &Harness, name: &str) -> Value {
    let job = h.kube.get(&job_path(name)).expect("the Job");
    let container = &job["spec"]["template"]["spec"]["containers"][0];
    let words: Vec<String> = container["command"]
        .as_array()
        .unwrap()
        .iter()
        .chain(container["args"].as_array().unwrap())
        .map(|w| w.as_str().unwrap().to_owned())
        .collect();
    let mut command = Command::new(&words[0]);
    command
        .args(&words[1..])
        .current_dir(container["workingDir"].as_str().unwrap())
        .env("NO_COLOR", "1");
    for var in container["env"].as_array().unwrap() {
        if let Some(value) = var["value"].as_str() {
            command.env(var["name"].as_str().unwrap(), value);
        }
    }
    let out = command.output().expect("run the Job's command");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| {
            panic!(
                "no report from the driver:\n{stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let status = if out.status.success() {
        json!({"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]})
    } else {
        json!({"failed": 1, "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]})
    };
    h.patch(&job_path(name), json!({ "status": status }));
    report
}

fn fail_job(h: &Harness, name: &str, reason: &str) {
    h.patch(
        &job_path(name),
        json!({"status": {"failed": 1, "conditions": [{"type": "Failed", "status": "True",
            "reason": reason, "message": "Job was active longer than specified deadline"}]}}),
    );
}

#[tokio::test]
async fn a_rollback_repoints_the_views_it_changed_with_a_job_retried_after_a_failure() {
    let (db, project) = planned().await;
    let backup_id = backed_up_then_changed(&db, &project).await;
    let project_dir = project.dir.to_string_lossy().into_owned();
    let h = harness(
        &db,
        json!({
            "virtualLayer": {"gateway": "test", "runner": {
                "image": "ghcr.io/acme/analytics-sqlmesh:0.237.0", "workingDir": project_dir,
                "command": [python()], "activeDeadlineSeconds": 900, "runAsUser": 1000}},
            "janitor": {"schedule": "0 3 * * *", "runner": {"image": "ghcr.io/acme/analytics-sqlmesh:0.237.0"}}
        }),
    );
    h.kube
        .put(&migration_path("restore"), rollback("restore", &backup_id));
    at(&h.ctx, "2026-11-27T10:00:05Z");

    // The rollback succeeds; prod's views are being re-pointed by a Job.
    let (action, m) = h.reconcile_migration("restore").await;
    let status = m.status.clone().unwrap();
    assert_eq!(
        status.phase.as_deref(),
        Some("Succeeded"),
        "{:?}",
        status.message
    );
    assert_ne!(action, Action::await_change(), "the Job is followed");
    let replaced = status
        .backup_id
        .clone()
        .expect("the replaced state's backup");
    let vl = views(&m);
    assert_eq!(vl.state, "Repointing", "{vl:?}");
    assert_eq!(vl.environments, ["prod"]);
    assert_eq!(vl.since_backup, replaced);
    assert_eq!(vl.attempts, 1);
    assert_eq!(vl.job_name.as_deref(), Some("restore-repoint-views"));
    assert!(
        status
            .message
            .as_deref()
            .unwrap()
            .contains("the views of environment prod must be re-pointed: see status.virtualLayer"),
        "{:?}",
        status.message
    );
    let (ready, _, _) = migration_condition(&m, "Ready");
    assert_eq!(ready, "True");
    let (current, reason, message) = migration_condition(&m, "ViewsCurrent");
    assert_eq!((current.as_str(), reason.as_str()), ("False", "JobRunning"));
    assert!(message.contains("restore-repoint-views"), "{message}");

    // The Job: the runner's image, interpreter and directory running the driver, the request
    // the engine builds in its environment, the store's connection by reference only.
    let job = h
        .kube
        .get(&job_path("restore-repoint-views"))
        .expect("the re-point Job");
    assert_eq!(
        job["metadata"]["labels"]["statekeeper.dev/purpose"],
        "repoint-views"
    );
    assert_eq!(
        job["metadata"]["labels"]["statekeeper.dev/migration"],
        "restore"
    );
    assert_eq!(
        job["metadata"]["ownerReferences"][0]["kind"],
        "StateMigration"
    );
    assert_eq!(job["spec"]["activeDeadlineSeconds"], 900);
    let pod = &job["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let container = &pod["containers"][0];
    assert_eq!(container["image"], "ghcr.io/acme/analytics-sqlmesh:0.237.0");
    assert_eq!(container["command"], json!([python()]));
    assert_eq!(container["args"], json!(["-c", DRIVER]));
    assert_eq!(container["workingDir"], project_dir.as_str());
    let engine = sqlmesh_store(&db).await;
    let expected = request(
        &engine.virtual_layer_changes(&replaced).await.unwrap(),
        Some("test"),
        Some(sqlmesh_version()),
    );
    let sent: Value = serde_json::from_str(
        env_var(&job, "STATEKEEPER_REPOINT_REQUEST")["value"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(sent, expected);
    assert_eq!(
        env_var(&job, "PGPASSWORD")["valueFrom"]["secretKeyRef"],
        json!({"name": "pg-credentials", "key": "password", "optional": false})
    );
    assert!(env_var(&job, "PGPASSWORD").get("value").is_none());
    let password = db.password();
    assert!(!job.to_string().contains(&password), "no secret in the Job");

    // The store reports the stale views, and its janitor run that is due waits for them.
    at(&h.ctx, "2026-11-28T03:00:05Z");
    let store = store_status(&h).await;
    let (stale, reason, message) = condition(&store.conditions, "VirtualLayerStale");
    assert_eq!((stale.as_str(), reason.as_str()), ("True", "Repointing"));
    assert!(
        message.contains("StateMigration restore") && message.contains("prod"),
        "{message}"
    );
    let (_, reason, message) = condition(&store.conditions, "JanitorSucceeded");
    assert_eq!(reason, "WaitingForViews", "{message}");
    assert!(
        h.kube
            .list(JOBS)
            .iter()
            .all(|j| j["metadata"]["labels"]["statekeeper.dev/purpose"] != "janitor"),
        "no janitor Job while views are being re-pointed"
    );

    // Still running: the same Job. Then it passes its deadline: stale, a Warning, a retry later.
    let (_, m) = h.reconcile_migration("restore").await;
    assert_eq!(views(&m).job_name.as_deref(), Some("restore-repoint-views"));
    assert_eq!(h.kube.list(JOBS).len(), 1);
    fail_job(&h, "restore-repoint-views", "DeadlineExceeded");
    let (action, m) = h.reconcile_migration("restore").await;
    let vl = views(&m);
    assert_eq!(
        (vl.state.as_str(), vl.reason.as_str()),
        ("Stale", "DeadlineExceeded")
    );
    let fix = format!(
        "statekeeper state repoint-views --framework sqlmesh --since-backup {replaced} \
         --project PROJECT_DIR --gateway test"
    );
    assert_eq!(vl.command.as_deref(), Some(fix.as_str()));
    assert!(vl.message.contains(&fix), "{}", vl.message);
    assert!(vl.message.contains("deadline of 900s"), "{}", vl.message);
    assert!(vl.message.contains("Attempt 2 of 5"), "{}", vl.message);
    let next = vl.next_attempt_at.clone().expect("a retry is scheduled");
    assert!(matches!(action, a if a != Action::await_change()));
    let (current, reason, _) = migration_condition(&m, "ViewsCurrent");
    assert_eq!(
        (current.as_str(), reason.as_str()),
        ("False", "DeadlineExceeded")
    );
    assert_eq!(
        m.status.as_ref().unwrap().phase.as_deref(),
        Some("Succeeded")
    );
    assert!(
        h.event_reasons()
            .contains(&("Warning".into(), "ViewsStale".into())),
        "{:?}",
        h.event_reasons()
    );
    let store = store_status(&h).await;
    let (stale, reason, message) = condition(&store.conditions, "VirtualLayerStale");
    assert_eq!(
        (stale.as_str(), reason.as_str()),
        ("True", "DeadlineExceeded")
    );
    assert!(message.contains(&fix), "{message}");

    // Not before its time; then the second attempt, a Job of its own, run as its pod would.
    let (_, m) = h.reconcile_migration("restore").await;
    assert_eq!(views(&m).attempts, 1);
    assert_eq!(h.kube.list(JOBS).len(), 1);
    let later: k8s_openapi::jiff::Timestamp = next.parse().unwrap();
    h.ctx.set_clock(Some(
        later
            .checked_add(std::time::Duration::from_secs(1))
            .unwrap(),
    ));
    let (_, m) = h.reconcile_migration("restore").await;
    let vl = views(&m);
    assert_eq!(
        (vl.state.as_str(), vl.attempts),
        ("Repointing", 2),
        "{vl:?}"
    );
    assert_eq!(vl.job_name.as_deref(), Some("restore-repoint-views-2"));
    let report = run_job_like_its_pod(&h, "restore-repoint-views-2");
    assert_eq!(report["environments"][0]["name"], "prod", "{report}");
    assert!(report["environments"][0]["promoted"].as_u64().unwrap() > 0);

    let (action, m) = h.reconcile_migration("restore").await;
    assert_eq!(action, Action::await_change());
    let vl = views(&m);
    assert_eq!(
        (vl.state.as_str(), vl.reason.as_str()),
        ("Current", "Repointed")
    );
    let (current, _, _) = migration_condition(&m, "ViewsCurrent");
    assert_eq!(current, "True");
    assert!(
        h.event_reasons()
            .contains(&("Normal".into(), "ViewsRepointed".into()))
    );
    assert_eq!(
        m.status.as_ref().unwrap().phase.as_deref(),
        Some("Succeeded")
    );

    // The store: views current, and the janitor runs.
    let store = store_status(&h).await;
    let (stale, reason, _) = condition(&store.conditions, "VirtualLayerStale");
    assert_eq!((stale.as_str(), reason.as_str()), ("False", "ViewsCurrent"));
    assert!(
        store.janitor.unwrap().active_job.is_some(),
        "the janitor runs once the views agree"
    );
    assert!(!h.kube.dump().contains(&password));
}

#[tokio::test]
async fn without_virtual_layer_a_rollback_reports_the_stale_views_and_the_fix_until_acknowledged() {
    let (db, project) = planned().await;
    let backup_id = backed_up_then_changed(&db, &project).await;
    let h = harness(&db, json!({}));
    h.kube
        .put(&migration_path("restore"), rollback("restore", &backup_id));
    let (action, m) = h.reconcile_migration("restore").await;
    assert_eq!(action, Action::await_change(), "nothing to follow");
    let status = m.status.clone().unwrap();
    assert_eq!(status.phase.as_deref(), Some("Succeeded"));
    let vl = views(&m);
    assert_eq!(
        (vl.state.as_str(), vl.reason.as_str()),
        ("Stale", "NotConfigured")
    );
    assert_eq!(vl.environments, ["prod"]);
    let fix = format!(
        "statekeeper state repoint-views --framework sqlmesh --since-backup {} --project PROJECT_DIR",
        status.backup_id.unwrap()
    );
    assert_eq!(vl.command.as_deref(), Some(fix.as_str()));
    assert!(
        vl.message.contains(
            "kubectl -n data annotate statemigration restore statekeeper.dev/views-repointed=true"
        ),
        "{}",
        vl.message
    );
    assert!(h.kube.list(JOBS).is_empty(), "no Job without virtualLayer");
    let store = store_status(&h).await;
    let (stale, reason, message) = condition(&store.conditions, "VirtualLayerStale");
    assert_eq!((stale.as_str(), reason.as_str()), ("True", "NotConfigured"));
    assert!(message.contains(&fix), "{message}");

    // Re-pointed by hand, and said so.
    h.patch(
        &migration_path("restore"),
        json!({"metadata": {"annotations": {"statekeeper.dev/views-repointed": "true"}}}),
    );
    let (_, m) = h.reconcile_migration("restore").await;
    let vl = views(&m);
    assert_eq!(
        (vl.state.as_str(), vl.reason.as_str()),
        ("Current", "Acknowledged")
    );
    let (current, _, _) = migration_condition(&m, "ViewsCurrent");
    assert_eq!(current, "True");
    let store = store_status(&h).await;
    let (stale, _, _) = condition(&store.conditions, "VirtualLayerStale");
    assert_eq!(stale, "False");
}

#[tokio::test]
async fn a_rollback_that_changed_no_environment_leaves_the_views_current_and_makes_no_job() {
    let (db, _project) = planned().await;
    let backup = sqlmesh_store(&db)
        .await
        .backup_with_reason("manual")
        .await
        .unwrap();
    let h = harness(
        &db,
        json!({"virtualLayer": {"runner": {"image": "ghcr.io/acme/analytics-sqlmesh:0.237.0"}}}),
    );
    h.kube
        .put(&migration_path("restore"), rollback("restore", &backup.id));
    let (action, m) = h.reconcile_migration("restore").await;
    assert_eq!(action, Action::await_change());
    let vl = views(&m);
    assert_eq!(
        (vl.state.as_str(), vl.reason.as_str()),
        ("Current", "NoEnvironmentChanged")
    );
    assert!(vl.environments.is_empty());
    let (current, _, _) = migration_condition(&m, "ViewsCurrent");
    assert_eq!(current, "True");
    assert!(h.kube.list(JOBS).is_empty());
    let store = store_status(&h).await;
    let (stale, _, _) = condition(&store.conditions, "VirtualLayerStale");
    assert_eq!(stale, "False");
}

/// A runner upgrade whose Job failed after changing prod: the restore of its backup is followed
/// by a re-point of prod's views; the migration stays Failed. Failed re-point Jobs are retried
/// five times in all, then the views stay stale with the fix.
#[tokio::test]
async fn the_restore_after_a_failed_runner_job_repoints_views_and_gives_up_after_five_attempts() {
    let (db, project) = planned().await;
    let h = harness(
        &db,
        json!({"virtualLayer": {"runner": {"image": "ghcr.io/acme/analytics-sqlmesh:0.237.0",
            "workingDir": "/project"}}}),
    );
    h.kube.put(
        &migration_path("migrate"),
        state_migration(
            "migrate",
            "2026-11-27T10:00:00Z",
            json!({"upgrade": {"runner": {"image": "ghcr.io/acme/analytics-sqlmesh:0.237.0"}}}),
        ),
    );
    at(&h.ctx, "2026-11-27T10:00:05Z");
    let (_, m) = h.reconcile_migration("migrate").await;
    assert_eq!(m.status.unwrap().phase.as_deref(), Some("Running"));

    // What the Job did before it failed: prod changed, by the real SQLMesh.
    let (file, from, to) = DEV_CHANGE;
    project.edit(file, from, to);
    project.plan("prod", &[]);
    fail_job(&h, "migrate-upgrade", "DeadlineExceeded");
    let (_, m) = h.reconcile_migration("migrate").await;
    let status = m.status.clone().unwrap();
    assert_eq!(
        status.phase.as_deref(),
        Some("Failed"),
        "{:?}",
        status.message
    );
    assert_eq!(status.restored, Some(true));
    let vl = views(&m);
    assert_eq!(vl.state, "Repointing", "{vl:?}");
    assert_eq!(vl.environments, ["prod"]);
    assert!(
        status.message.unwrap().contains("see status.virtualLayer"),
        "the restore's message points at the views"
    );
    let container = &h.kube.get(&job_path("migrate-repoint-views")).unwrap()["spec"]["template"]["spec"]
        ["containers"][0];
    assert_eq!(container["command"], json!(["python3"]), "the default");

    // Every attempt fails.
    let mut job = "migrate-repoint-views".to_owned();
    for attempt in 1..=5 {
        fail_job(&h, &job, "BackoffLimitExceeded");
        let (action, m) = h.reconcile_migration("migrate").await;
        let vl = views(&m);
        assert_eq!(vl.state, "Stale");
        assert_eq!(vl.attempts, attempt);
        assert!(vl.command.is_some());
        assert_eq!(m.status.as_ref().unwrap().phase.as_deref(), Some("Failed"));
        if attempt == 5 {
            assert_eq!(vl.next_attempt_at, None);
            assert_eq!(action, Action::await_change());
            assert!(
                vl.message.contains("No more attempts (5 made)"),
                "{}",
                vl.message
            );
            assert!(vl.message.contains(vl.command.as_deref().unwrap()));
            break;
        }
        let next: k8s_openapi::jiff::Timestamp = vl.next_attempt_at.unwrap().parse().unwrap();
        h.ctx.set_clock(Some(
            next.checked_add(std::time::Duration::from_secs(1)).unwrap(),
        ));
        let (_, m) = h.reconcile_migration("migrate").await;
        job = views(&m).job_name.unwrap();
        assert_eq!(job, format!("migrate-repoint-views-{}", attempt + 1));
    }
    let (action, _) = h.reconcile_migration("migrate").await;
    assert_eq!(action, Action::await_change());
    let repoint_jobs = h
        .kube
        .list(JOBS)
        .into_iter()
        .filter(|j| j["metadata"]["labels"]["statekeeper.dev/purpose"] == "repoint-views")
        .count();
    assert_eq!(repoint_jobs, 5);
}

/// An import that puts an older prod back is a restore too: its backup of the state it
/// replaced is what the views are compared with, and prod's views are re-pointed.
#[tokio::test]
async fn an_import_that_changes_prod_repoints_its_views() {
    use statekeeper::engine::{Compression, Destination, ExportFormat, ExportOptions};
    let (db, project) = planned().await;
    let file = std::env::temp_dir().join(format!("sk-views-import-{}.json", std::process::id()));
    let _ = std::fs::remove_file(&file);
    let url = file.to_string_lossy().into_owned();
    sqlmesh_store(&db)
        .await
        .export_to(
            &Destination::parse(&url, &Default::default()).unwrap(),
            &ExportOptions {
                compression: Compression::None,
                format: ExportFormat::Exact,
                ..Default::default()
            },
            |_| {},
        )
        .await
        .unwrap();
    let (path, from, to) = DEV_CHANGE;
    project.edit(path, from, to);
    project.plan("prod", &[]);
    let h = harness(
        &db,
        json!({"virtualLayer": {"runner": {"image": "ghcr.io/acme/analytics-sqlmesh:0.237.0"}}}),
    );
    h.kube.put(
        &migration_path("import"),
        state_migration(
            "import",
            "2026-11-27T10:00:00Z",
            json!({"import": {"source": {"url": url}, "mode": "Replace"}}),
        ),
    );
    let (_, m) = h.reconcile_migration("import").await;
    let status = m.status.clone().unwrap();
    assert_eq!(
        status.phase.as_deref(),
        Some("Succeeded"),
        "{:?}",
        status.message
    );
    let vl = views(&m);
    assert_eq!(vl.state, "Repointing", "{vl:?}");
    assert_eq!(vl.environments, ["prod"]);
    assert_eq!(Some(vl.since_backup), status.backup_id);
    assert_eq!(vl.job_name.as_deref(), Some("import-repoint-views"));
    assert!(h.kube.get(&job_path("import-repoint-views")).is_some());
    let _ = std::fs::remove_file(&file);
}
