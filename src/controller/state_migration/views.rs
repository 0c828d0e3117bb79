//! SQLMesh's views after a StateMigration's restore (a rollback, an import, the restore after a
//! failed runner Job). The restore puts SQLMesh's state back, but the warehouse's environment
//! views still select from the tables of the state it replaced: the environments it changed are
//! found (the replaced state's backup against the store), and re-pointed by a Job running
//! SQLMesh's own promotion code from the project's image (`spec.virtualLayer` of the store),
//! retried with backoff a few times. The migration's phase stays the restore's outcome; its
//! `status.virtualLayer` and `ViewsCurrent` condition say what became of the views, and always
//! name the command that fixes them by hand.

use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::EnvVar;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};

use super::run::{APPROVED, PLANNED, Run, SUCCEEDED, WAIT, is_permanent};
use crate::api::labels::{MIGRATION_LABEL, VIEWS_REPOINTED_ANNOTATION};
use crate::api::runner::Runner;
use crate::api::state_migration::VirtualLayerStatus;
use crate::api::state_store::{StateStore, VirtualLayerSpec};
use crate::controller::access;
use crate::controller::conditions::{Desired, READY, RECONCILING, STALLED};
use crate::controller::context::ReconcileError;
use crate::controller::runner::{self, JobOutcome};
use crate::engine::virtual_layer::{DRIVER, EnvironmentChange, REQUEST_ENV, request};
use crate::engine::{Framework, Store, repoint_command};

/// True when every view of the environments the migration's restore changed agrees with the
/// restored state (`kubectl wait --for=condition=ViewsCurrent`).
pub const VIEWS_CURRENT: &str = "ViewsCurrent";

/// Re-point Jobs made at most for one restore; then the views stay `Stale` until someone runs
/// the command and acknowledges it.
const MAX_ATTEMPTS: u32 = 5;
/// The wait before the second attempt; it doubles for each one after, up to `MAX_WAIT`.
const FIRST_RETRY: Duration = Duration::from_secs(30);
const MAX_WAIT: Duration = Duration::from_secs(600);
/// A request larger than this would not fit a Job's environment (an object is at most 1.5 MiB).
const REQUEST_LIMIT: usize = 512 * 1024;
/// The interpreter the driver runs with when the runner names none.
const DEFAULT_PYTHON: &[&str] = &["python3"];

/// What the views add to the migration's status write, and when to look again.
pub(super) struct Views {
    pub(super) conditions: Vec<Desired>,
    requeue: Option<Duration>,
}

impl Views {
    pub(super) fn none() -> Self {
        Self {
            conditions: Vec::new(),
            requeue: None,
        }
    }

    /// The migration's own action, unless a re-point Job must be looked at again.
    pub(super) fn then(&self, action: Action) -> Action {
        match self.requeue {
            Some(wait) if !wait.is_zero() => Action::requeue(wait),
            _ => action,
        }
    }
}

/// After a restore of the store that succeeded, `replaced` being the backup of the state it
/// replaced: which environments it changed, and for those a re-point Job when the store has
/// `spec.virtualLayer`, or the command that fixes them. Sets `status.virtualLayer`; the caller
/// writes it with the migration's outcome.
pub(super) async fn after_restore(
    run: &mut Run<'_>,
    store: &StateStore,
    engine: &Store,
    replaced: Option<&str>,
) -> Views {
    // Without a backup of the replaced state (backup: false), nothing tells which views the
    // restore made stale.
    let (Framework::Sqlmesh, Some(since)) = (engine.framework(), replaced) else {
        return Views::none();
    };
    run.status.virtual_layer = Some(VirtualLayerStatus {
        state: VirtualLayerStatus::REPOINTING.into(),
        reason: "Checking".into(),
        since_backup: since.to_owned(),
        command: Some(fix_command(
            engine,
            since,
            store.spec.virtual_layer.as_ref(),
        )),
        ..VirtualLayerStatus::default()
    });
    let requeue = match engine.virtual_layer_changes(since).await {
        Ok(changes) => match &store.spec.virtual_layer {
            _ if changes.is_empty() => {
                current(
                    run,
                    "NoEnvironmentChanged",
                    "no environment's snapshots changed",
                );
                None
            }
            None => {
                let vl = views_mut(run);
                vl.environments = names(&changes);
                stale(
                    run,
                    "NotConfigured",
                    "the store has no spec.virtualLayer",
                    false,
                );
                None
            }
            Some(spec) => Some(attempt(run, store, engine, spec, Some(changes)).await),
        },
        Err(e) => {
            let why = format!(
                "could not tell which environments the restore changed: {}",
                run.redact(&e.to_string())
            );
            let retry = store.spec.virtual_layer.is_some() && !is_permanent(&e);
            stale(run, e.reason(), &why, retry)
        }
    };
    warn_if_stale(run).await;
    Views {
        conditions: vec![condition(run)],
        requeue,
    }
}

/// For the migration's message: a pointer to `status.virtualLayer` when the views of the restore
/// are not current.
pub(super) fn note(run: &Run<'_>) -> String {
    match &run.status.virtual_layer {
        Some(vl) if vl.is_unsettled() && vl.environments.is_empty() => {
            "; the views of the environments it changed may be stale: see status.virtualLayer"
                .into()
        }
        Some(vl) if vl.is_unsettled() => format!(
            "; the views of {} must be re-pointed: see status.virtualLayer",
            match vl.environments.len() {
                1 => format!("environment {}", vl.environments[0]),
                n => format!("{n} environments"),
            }
        ),
        _ => String::new(),
    }
}

/// A finished migration whose views are not current yet: acknowledged by hand, its Job
/// followed, or its next attempt started when due.
pub(super) async fn follow(run: &mut Run<'_>) -> Result<Action, ReconcileError> {
    let Some(vl) = run.status.virtual_layer.clone() else {
        return Ok(Action::await_change());
    };
    if !vl.is_unsettled() {
        return Ok(Action::await_change());
    }
    if acknowledged(run) {
        current(
            run,
            "Acknowledged",
            &format!("re-pointed by hand, as the annotation {VIEWS_REPOINTED_ANNOTATION} says"),
        );
        notify(run, EventType::Normal, "ViewsAcknowledged").await;
        write(run).await?;
        return Ok(Action::await_change());
    }
    if vl.state == VirtualLayerStatus::REPOINTING
        && let Some(job) = &vl.job_name
    {
        return follow_job(run, job).await;
    }
    let due = match vl.next_attempt_at.as_deref() {
        None if vl.state == VirtualLayerStatus::REPOINTING => Some(Duration::ZERO),
        None => None,
        Some(at) => Some(remaining(run, at)),
    };
    match due {
        None => Ok(Action::await_change()),
        Some(wait) if !wait.is_zero() => Ok(Action::requeue(wait)),
        Some(_) => retry(run).await,
    }
}

/// Whether the views are unsettled, so a finished migration is looked at again.
pub(super) fn needs_attention(status: &crate::api::state_migration::StateMigrationStatus) -> bool {
    status
        .virtual_layer
        .as_ref()
        .is_some_and(VirtualLayerStatus::is_unsettled)
}

/// The next attempt: the store connected again, and a new Job.
async fn retry(run: &mut Run<'_>) -> Result<Action, ReconcileError> {
    let store_name = run.migration.spec.store_ref.name.clone();
    let operated = match access::store_for_operation(run.ctx, &run.namespace, &store_name).await? {
        Ok(operated) => operated,
        // The store is gone or unreachable for now: the attempt waits for it, unspent.
        Err(_) => {
            let key = format!("{}/{}", run.namespace, run.name);
            return Ok(Action::requeue(run.ctx.next_backoff(&key).await));
        }
    };
    run.secrets.extend(operated.secrets);
    let requeue = match &operated.store.spec.virtual_layer {
        Some(spec) => attempt(run, &operated.store, &operated.engine, spec, None).await,
        None => {
            stale(
                run,
                "NotConfigured",
                "the store no longer has spec.virtualLayer",
                false,
            );
            Duration::ZERO
        }
    };
    warn_if_stale(run).await;
    write(run).await?;
    Ok(if requeue.is_zero() {
        Action::await_change()
    } else {
        Action::requeue(requeue)
    })
}

/// One attempt: the environments that still differ (`changes`, or looked up now), and a Job
/// re-pointing their views. Returns when to look again.
async fn attempt(
    run: &mut Run<'_>,
    store: &StateStore,
    engine: &Store,
    spec: &VirtualLayerSpec,
    changes: Option<Vec<EnvironmentChange>>,
) -> Duration {
    let since = views_mut(run).since_backup.clone();
    let changes = match changes {
        Some(changes) => Ok(changes),
        None => engine.virtual_layer_changes(&since).await,
    };
    let version = match changes {
        Ok(changes) => engine.sqlmesh_version().await.map(|v| (changes, v)),
        Err(e) => Err(e),
    };
    let (changes, version) = match version {
        Ok(found) => found,
        Err(e) => {
            let why = format!(
                "could not tell which environments differ from backup {since}: {}",
                run.redact(&e.to_string())
            );
            let retry = !is_permanent(&e);
            spend_attempt(run);
            return stale(run, e.reason(), &why, retry).unwrap_or(Duration::ZERO);
        }
    };
    if changes.is_empty() {
        current(
            run,
            "NoEnvironmentChanged",
            &format!("no environment differs from backup {since} any more"),
        );
        return Duration::ZERO;
    }
    views_mut(run).environments = names(&changes);
    let body = request(&changes, spec.gateway.as_deref(), version).to_string();
    if body.len() > REQUEST_LIMIT {
        let why = format!(
            "the re-point request ({} bytes) is too large for a Job's environment",
            body.len()
        );
        return stale(run, "RequestTooLarge", &why, false).unwrap_or(Duration::ZERO);
    }
    let number = spend_attempt(run);
    let job_name = runner::job_name(
        &run.name,
        &match number {
            1 => "repoint-views".to_owned(),
            n => format!("repoint-views-{n}"),
        },
    );
    match create_job(run, store, spec, &job_name, body).await {
        Ok(()) => {
            let vl = views_mut(run);
            vl.state = VirtualLayerStatus::REPOINTING.into();
            vl.reason = "JobRunning".into();
            vl.job_name = Some(job_name.clone());
            vl.next_attempt_at = None;
            vl.message = format!(
                "Job {job_name} re-points the views of {} (attempt {number} of {MAX_ATTEMPTS})",
                list(&vl.environments)
            );
            notify(run, EventType::Normal, "RepointJobCreated").await;
            WAIT
        }
        Err(e) => {
            let why = format!("cannot create the re-point Job {job_name}: {e}");
            stale(run, "JobCreateFailed", &why, true).unwrap_or(Duration::ZERO)
        }
    }
}

/// The re-point Job: the store's runner conventions (connection by `secretKeyRef`, non-root,
/// one pod, owned by the migration), running `PYTHON -c DRIVER` with the request in its
/// environment. No secret value is in it: the request names environments, models and tables.
async fn create_job(
    run: &Run<'_>,
    store: &StateStore,
    spec: &VirtualLayerSpec,
    name: &str,
    body: String,
) -> Result<(), String> {
    let Some(owner) = run.migration.controller_owner_ref(&()) else {
        return Err("the StateMigration has no uid".into());
    };
    let runner = repoint_runner(&spec.runner, body);
    let job = runner::build_job(&runner::JobRequest {
        name: name.to_owned(),
        namespace: &run.namespace,
        runner: &runner,
        default_command: DEFAULT_PYTHON,
        store,
        owner,
        purpose: "repoint-views",
        labels: [(MIGRATION_LABEL.to_owned(), run.name.clone())].into(),
    });
    let jobs: Api<Job> = Api::namespaced(run.ctx.client.clone(), &run.namespace);
    runner::create_or_adopt(&jobs, &job)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The runner as the Job runs it: its interpreter (default `python3`) with `-c DRIVER`, and the
/// request in `STATEKEEPER_REPOINT_REQUEST` (never one of the runner's own variables).
fn repoint_runner(runner: &Runner, body: String) -> Runner {
    let mut runner = runner.clone();
    if runner.command.is_empty() {
        runner.command = DEFAULT_PYTHON.iter().map(|s| (*s).to_owned()).collect();
    }
    runner.args = vec!["-c".into(), DRIVER.into()];
    runner.env.retain(|e| e.name != REQUEST_ENV);
    runner.env.push(EnvVar {
        name: REQUEST_ENV.into(),
        value: Some(body),
        ..EnvVar::default()
    });
    runner
}

/// The Job of the current attempt: still running, done, or failed (then another attempt later).
async fn follow_job(run: &mut Run<'_>, name: &str) -> Result<Action, ReconcileError> {
    let jobs: Api<Job> = Api::namespaced(run.ctx.client.clone(), &run.namespace);
    let job = jobs.get_opt(name).await?;
    let outcome = match &job {
        Some(job) => runner::outcome(job),
        None => JobOutcome::Failed {
            reason: "JobDeleted".into(),
            message: "the Job was deleted before it finished".into(),
        },
    };
    let deadline = job
        .as_ref()
        .and_then(|j| j.spec.as_ref())
        .and_then(|s| s.active_deadline_seconds)
        .unwrap_or_default();
    let requeue = match outcome {
        JobOutcome::Running => return Ok(Action::requeue(WAIT)),
        JobOutcome::Succeeded => {
            let envs = list(&views_mut(run).environments);
            current(
                run,
                "Repointed",
                &format!(
                    "Job {name} re-pointed the views of {envs} at the restored snapshots' tables"
                ),
            );
            notify(run, EventType::Normal, "ViewsRepointed").await;
            None
        }
        JobOutcome::Failed { reason, message } => {
            let why = format!(
                "Job {name} {} (the last line of its log is the driver's report)",
                runner::describe_failure(&reason, &message, deadline)
            );
            let wait = stale(run, &reason, &why, true);
            warn_if_stale(run).await;
            wait
        }
    };
    write(run).await?;
    Ok(requeue.map_or_else(Action::await_change, Action::requeue))
}

/// Counts an attempt; returns its number.
fn spend_attempt(run: &mut Run<'_>) -> u32 {
    let vl = views_mut(run);
    vl.attempts += 1;
    vl.attempts
}

/// The views are current: said in status (no attempt pending).
fn current(run: &mut Run<'_>, reason: &str, message: &str) {
    let vl = views_mut(run);
    vl.state = VirtualLayerStatus::CURRENT.into();
    vl.reason = reason.into();
    vl.next_attempt_at = None;
    vl.message = message.to_owned();
}

/// The views are stale because of `why`; with `retry`, another attempt follows after a backoff
/// while attempts remain (returned: the wait). A Warning Event says so, with the fix.
fn stale(run: &mut Run<'_>, reason: &str, why: &str, retry: bool) -> Option<Duration> {
    let now = run.ctx.now();
    let namespace = run.namespace.clone();
    let name = run.name.clone();
    let vl = views_mut(run);
    vl.state = VirtualLayerStatus::STALE.into();
    vl.reason = reason.into();
    let wait = (retry && vl.attempts < MAX_ATTEMPTS).then(|| backoff(vl.attempts));
    vl.next_attempt_at = wait.and_then(|w| now.checked_add(w).ok().map(|t| t.to_string()));
    let next = match (&vl.next_attempt_at, retry) {
        (Some(at), _) => format!(
            " Attempt {} of {MAX_ATTEMPTS} starts at {at}.",
            vl.attempts + 1
        ),
        (None, true) => format!(" No more attempts ({} made).", vl.attempts),
        (None, false) => String::new(),
    };
    let environments = if vl.environments.is_empty() {
        "the environments the restore changed".to_owned()
    } else {
        format!("environments {}", list(&vl.environments))
    };
    vl.message = format!(
        "the views of {environments} still select from the tables of the state the restore \
         replaced: {why}.{next} Fix: run `{}` (with the store's --database-url, where the \
         warehouse can be reached), then `kubectl -n {namespace} annotate statemigration {name} \
         {VIEWS_REPOINTED_ANNOTATION}=true`",
        vl.command.as_deref().unwrap_or_default()
    );
    wait
}

fn backoff(attempts: u32) -> Duration {
    FIRST_RETRY
        .saturating_mul(2u32.saturating_pow(attempts.saturating_sub(1)))
        .min(MAX_WAIT)
}

/// How long until `at` (zero when it has passed or cannot be read).
fn remaining(run: &Run<'_>, at: &str) -> Duration {
    at.parse::<k8s_openapi::jiff::Timestamp>()
        .ok()
        .and_then(|at| Duration::try_from(run.ctx.now().duration_until(at)).ok())
        .unwrap_or(Duration::ZERO)
}

fn acknowledged(run: &Run<'_>) -> bool {
    run.migration
        .annotations()
        .get(VIEWS_REPOINTED_ANNOTATION)
        .is_some_and(|v| v.eq_ignore_ascii_case("true"))
}

/// The fix for stale views, with the gateway the store's `virtualLayer` names.
fn fix_command(engine: &Store, since: &str, spec: Option<&VirtualLayerSpec>) -> String {
    repoint_command(
        engine.schema().as_str(),
        since,
        None,
        spec.and_then(|s| s.gateway.as_deref()),
    )
}

fn views_mut<'a>(run: &'a mut Run<'_>) -> &'a mut VirtualLayerStatus {
    run.status
        .virtual_layer
        .get_or_insert_with(Default::default)
}

fn names(changes: &[EnvironmentChange]) -> Vec<String> {
    changes.iter().map(|c| c.name.clone()).collect()
}

/// Names for a message: the first ten, then how many more.
fn list(names: &[String]) -> String {
    let shown = names
        .iter()
        .take(10)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    match names.len().saturating_sub(10) {
        0 => shown,
        more => format!("{shown} and {more} more"),
    }
}

/// `ViewsCurrent`, from `status.virtualLayer`.
fn condition(run: &Run<'_>) -> Desired {
    let vl = run.status.virtual_layer.clone().unwrap_or_default();
    Desired::new(
        VIEWS_CURRENT,
        !vl.is_unsettled(),
        vl.reason.clone(),
        vl.message.clone(),
    )
}

/// A Warning Event when the views are stale now, with why and the fix.
async fn warn_if_stale(run: &Run<'_>) {
    if run
        .status
        .virtual_layer
        .as_ref()
        .is_some_and(|vl| vl.state == VirtualLayerStatus::STALE)
    {
        notify(run, EventType::Warning, "ViewsStale").await;
    }
}

async fn notify(run: &Run<'_>, type_: EventType, reason: &str) {
    let note = run
        .status
        .virtual_layer
        .as_ref()
        .map(|vl| vl.message.clone())
        .unwrap_or_default();
    run.ctx
        .notify(
            &run.migration.object_ref(&()),
            type_,
            reason,
            "RepointViews",
            &run.redact(&note),
        )
        .await;
}

/// Writes a finished migration's status: its conditions as they were, `ViewsCurrent` as it is
/// now.
async fn write(run: &mut Run<'_>) -> Result<(), ReconcileError> {
    let mut desired: Vec<Desired> = run
        .status
        .conditions
        .iter()
        .filter_map(|c| {
            [READY, RECONCILING, STALLED, SUCCEEDED, PLANNED, APPROVED]
                .into_iter()
                .find(|t| *t == c.type_)
                .map(|t| Desired::new(t, c.status == "True", c.reason.clone(), c.message.clone()))
        })
        .collect();
    desired.push(condition(run));
    run.write(desired).await
}
