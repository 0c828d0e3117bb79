//! A StateExport with a schedule, run like a CronJob: each due run creates a one-shot child
//! StateExport named `<parent>-<UTC yyyymmddhhmmss>` (deterministic, so a retried create is
//! harmless), labelled and owned by the parent; the one-shot reconciler runs it. Never two runs
//! of one schedule at once, at most one catch-up after downtime, a run-now annotation, and
//! retention that deletes the oldest finished children together with their files.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};

use super::conditions::{self, Desired, READY, RECONCILING, STALLED};
use super::schedule::{self, Due, Schedule};
use super::state_export::{
    PHASE_FAILED, PHASE_SUCCEEDED, file_url, resolve_destination, write_status,
};
use super::{Context, ReconcileError};
use crate::api::state_export::{StateExport, StateExportStatus};
use crate::engine::Compression;

/// Label on every child: the name of its schedule.
pub const SCHEDULE_LABEL: &str = "statekeeper.dev/schedule";
/// Annotation on every child: the occurrence (or run-now request time) it was created for.
pub const SCHEDULED_AT_ANNOTATION: &str = "statekeeper.dev/scheduled-at";
/// Setting this annotation on a schedule to a new value (e.g. the current time) runs one extra
/// export as soon as none is running.
pub const RUN_NOW_ANNOTATION: &str = "statekeeper.dev/run-now";

pub const PHASE_SCHEDULED: &str = "Scheduled";
pub const PHASE_ACTIVE: &str = "Active";
pub const PHASE_SUSPENDED: &str = "Suspended";

/// The name of the child created for the run at `at`.
pub fn child_name(parent: &str, at: Timestamp) -> String {
    format!("{parent}-{}", at.strftime("%Y%m%d%H%M%S"))
}

/// The name of the child created for a run-now request: derived from the request's token, so
/// that however many reconciles see the request (a stale status among them), it makes one
/// child; a second create is refused by the API server as AlreadyExists.
pub fn run_now_child_name(parent: &str, token: &str) -> String {
    use sha2::Digest;
    let digest = hex::encode(sha2::Sha256::digest(token.as_bytes()));
    format!("{parent}-now-{}", &digest[..10])
}

/// On a run-now child: the request token it was made for.
pub const RUN_NOW_TOKEN_ANNOTATION: &str = "statekeeper.dev/run-now-token";

/// The URL of a child's file: inside the schedule's folder, named after the child.
pub fn child_url(folder: &str, child: &str, compression: Compression) -> String {
    let folder = format!("{}/", folder.trim_end_matches('/'));
    file_url(&folder, child, compression)
}

/// Orders children oldest run first: by creation, then by the time they were created for (two
/// children of one second), then by name. Never by name alone: a run-now child
/// (`<parent>-now-<hash>`) sorts after every timestamped one whenever it was made.
fn sort_by_run(children: &mut [StateExport]) {
    children.sort_by_cached_key(|c| {
        let created = c.meta().creation_timestamp.as_ref().map(|t| t.0);
        let scheduled_at: Option<Timestamp> = c
            .annotations()
            .get(SCHEDULED_AT_ANNOTATION)
            .and_then(|t| t.parse().ok());
        (created, scheduled_at, c.name_any())
    });
}

fn is_finished(child: &StateExport) -> bool {
    matches!(phase_of(child), Some(PHASE_SUCCEEDED | PHASE_FAILED))
}

fn phase_of(child: &StateExport) -> Option<&str> {
    child.status.as_ref().and_then(|s| s.phase.as_deref())
}

/// Why a run starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Trigger {
    Schedule,
    Immediate,
    RunNow,
}

pub async fn reconcile(
    export: Arc<StateExport>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    let namespace = export.namespace().ok_or(ReconcileError::NotNamespaced)?;
    let name = export.name_any();
    let spec = &export.spec;
    let previous = export.status.clone().unwrap_or_default();
    let reference = export.object_ref(&());
    let now = ctx.now();
    let cap = ctx.settings.resync_interval;
    let mut status = StateExportStatus {
        observed_generation: export.meta().generation,
        ..previous.clone()
    };

    let schedule = match Schedule::parse(
        spec.schedule.as_deref().unwrap_or_default(),
        spec.time_zone.as_deref(),
    ) {
        Ok(schedule) => schedule,
        Err(message) => {
            status.phase = Some(PHASE_SCHEDULED.into());
            status.next_schedule_time = None;
            stalled(
                &ctx,
                &export,
                status,
                &previous,
                "InvalidSchedule",
                &message,
            )
            .await?;
            return Ok(Action::await_change());
        }
    };
    // A destination that can never work is reported now, not at the first run.
    let compression = Compression::from(spec.compression);
    let sample = child_url(&spec.destination.url, &child_name(&name, now), compression);
    if let Err(problem) = resolve_destination(&ctx, &namespace, &spec.destination, &sample).await
        && problem.permanent
    {
        stalled(
            &ctx,
            &export,
            status,
            &previous,
            problem.reason,
            &problem.message,
        )
        .await?;
        return Ok(Action::await_change());
    }

    let api: Api<StateExport> = Api::namespaced(ctx.client.clone(), &namespace);
    let uid = export.uid();
    let mut children: Vec<StateExport> = api
        .list(&ListParams::default().labels(&format!("{SCHEDULE_LABEL}={name}")))
        .await?
        .items
        .into_iter()
        // Only our own children: a namesake schedule recreated later starts afresh.
        .filter(|child| {
            child
                .owner_references()
                .iter()
                .any(|o| Some(&o.uid) == uid.as_ref())
        })
        .collect();
    sort_by_run(&mut children);

    let created: Timestamp = export
        .meta()
        .creation_timestamp
        .as_ref()
        .map(|t| t.0)
        .unwrap_or(now);
    let last_scheduled = previous
        .last_schedule_time
        .as_deref()
        .and_then(|t| t.parse().ok());
    let due = schedule::decide(
        &schedule,
        last_scheduled,
        created,
        now,
        spec.starting_deadline_seconds.map(Duration::from_secs),
        spec.suspend,
    );
    // A child that was looked at and could not start (its store missing or not ready, a Secret
    // missing) must not hold the schedule for ever: when the next run is due it is superseded.
    // One not reconciled yet, or started, makes the schedule busy.
    let never_started = |c: &StateExport| {
        phase_of(c) == Some(super::state_export::PHASE_PENDING)
            && c.status.as_ref().is_some_and(|s| s.attempts == 0)
    };
    let busy = children
        .iter()
        .any(|c| !is_finished(c) && !never_started(c));
    // The store's absence is the schedule's problem too: every run would wait for it.
    let stores: Api<crate::api::StateStore> = Api::namespaced(ctx.client.clone(), &namespace);
    let store_problem = match stores.get_opt(&spec.store_ref.name).await? {
        Some(_) => None,
        None => Some(format!(
            "StateStore \"{}\" not found in namespace \"{namespace}\": no export can run until it exists",
            spec.store_ref.name
        )),
    };
    let mut run: Option<(Timestamp, Trigger)> = None;
    match &due {
        Due::Wait { next } => status.next_schedule_time = next.map(|t| t.to_string()),
        Due::Missed { scheduled, next } => {
            status.last_schedule_time = Some(scheduled.to_string());
            status.next_schedule_time = next.map(|t| t.to_string());
            ctx.publish(
                &schedule::missed_event("export", *scheduled, spec.starting_deadline_seconds),
                &reference,
            )
            .await;
        }
        Due::Run { scheduled, next } => {
            status.next_schedule_time = next.map(|t| t.to_string());
            // Never two at once: the occurrence stays due until the running export finishes
            // (a finishing child wakes us), unless it is past its deadline by then.
            if !busy {
                run = Some((*scheduled, Trigger::Schedule));
            }
        }
    }
    if run.is_none()
        && !busy
        && spec.immediate
        && !spec.suspend
        && previous.last_schedule_time.is_none()
        && children.is_empty()
    {
        run = Some((created, Trigger::Immediate));
    }
    // A request is done once a child carries its token, whatever a (possibly stale) status says.
    let requested = export.annotations().get(RUN_NOW_ANNOTATION).cloned();
    let answered = requested.as_ref().is_some_and(|token| {
        children
            .iter()
            .any(|c| c.annotations().get(RUN_NOW_TOKEN_ANNOTATION) == Some(token))
    });
    if answered {
        status.last_run_now = requested.clone();
    }
    let run_now =
        requested.filter(|token| !answered && previous.last_run_now.as_ref() != Some(token));
    if let Some(token) = &run_now
        && run.is_none()
        && !busy
    {
        run = Some((now, Trigger::RunNow));
        status.last_run_now = Some(token.clone());
    }

    if let Some((at, trigger)) = run {
        if trigger != Trigger::RunNow {
            status.last_schedule_time = Some(at.to_string());
        }
        for stuck in children.iter_mut().filter(|c| never_started(c)) {
            supersede(&ctx, stuck, at).await?;
        }
        let token = (trigger == Trigger::RunNow)
            .then(|| status.last_run_now.clone())
            .flatten();
        let child = create_child(&ctx, &api, &export, at, trigger, token.as_deref()).await?;
        children.push(child);
        sort_by_run(&mut children);
    }

    let retention = spec.retention.clone().unwrap_or_default();
    let prune_problem = prune(
        &ctx,
        &api,
        &namespace,
        &mut children,
        retention.keep_last,
        retention.keep_failed,
        &reference,
    )
    .await?;

    summarize(&mut status, &children, spec.suspend);
    let desired = schedule_conditions(&status, &children, prune_problem, store_problem);
    if changed(&status, &previous, &desired, now) {
        write_status(&ctx, &export, status, &previous, desired, &reference).await?;
    }
    let mut requeue = schedule::requeue_after(&due, now, cap);
    if run_now.is_some() && run.is_none() {
        // A run-now request waits for the running export; its finish wakes us, this is a backstop.
        requeue = requeue.min(Duration::from_secs(30));
    }
    Ok(Action::requeue(requeue))
}

async fn create_child(
    ctx: &Context,
    api: &Api<StateExport>,
    parent: &StateExport,
    at: Timestamp,
    trigger: Trigger,
    run_now_token: Option<&str>,
) -> Result<StateExport, ReconcileError> {
    let parent_name = parent.name_any();
    let name = match run_now_token {
        Some(token) => run_now_child_name(&parent_name, token),
        None => child_name(&parent_name, at),
    };
    let url = child_url(
        &parent.spec.destination.url,
        &name,
        Compression::from(parent.spec.compression),
    );
    let child = StateExport {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: parent.namespace(),
            labels: Some(BTreeMap::from([
                (SCHEDULE_LABEL.to_owned(), parent_name.clone()),
                (
                    "app.kubernetes.io/managed-by".to_owned(),
                    "statekeeper".to_owned(),
                ),
            ])),
            annotations: Some(
                [(SCHEDULED_AT_ANNOTATION.to_owned(), at.to_string())]
                    .into_iter()
                    .chain(
                        run_now_token.map(|t| (RUN_NOW_TOKEN_ANNOTATION.to_owned(), t.to_owned())),
                    )
                    .collect(),
            ),
            owner_references: parent.controller_owner_ref(&()).map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        spec: parent.spec.child(url),
        status: None,
    };
    let created = match api.create(&PostParams::default(), &child).await {
        Ok(created) => created,
        // Created by an earlier attempt whose status write was lost: the same run, not another.
        Err(kube::Error::Api(status)) if status.code == 409 => api.get(&name).await?,
        Err(e) => return Err(e.into()),
    };
    let why = match trigger {
        Trigger::Schedule => format!("the run due at {at}"),
        Trigger::Immediate => "the first run (immediate)".to_owned(),
        Trigger::RunNow => format!("a {RUN_NOW_ANNOTATION} request"),
    };
    ctx.publish(
        &Event {
            type_: EventType::Normal,
            reason: "ExportCreated".into(),
            note: Some(format!("created StateExport \"{name}\" for {why}")),
            action: "Schedule".into(),
            secondary: Some(created.object_ref(&())),
        },
        &parent.object_ref(&()),
    )
    .await;
    Ok(created)
}

/// Deletes finished children beyond the retention, oldest first, each file before its object:
/// a file whose deletion failed keeps its object, so it is retried and never orphaned. Returns
/// the last problem, if any.
async fn prune(
    ctx: &Context,
    api: &Api<StateExport>,
    namespace: &str,
    children: &mut Vec<StateExport>,
    keep_last: u32,
    keep_failed: u32,
    parent: &k8s_openapi::api::core::v1::ObjectReference,
) -> Result<Option<String>, ReconcileError> {
    let mut doomed: Vec<String> = Vec::new();
    for (phase, keep) in [(PHASE_SUCCEEDED, keep_last), (PHASE_FAILED, keep_failed)] {
        doomed.extend(
            children
                .iter()
                .rev()
                .filter(|c| phase_of(c) == Some(phase))
                .skip(keep as usize)
                .map(|c| c.name_any()),
        );
    }
    let mut problem = None;
    for name in doomed {
        let Some(child) = children.iter().find(|c| c.name_any() == name) else {
            continue;
        };
        let url = child
            .status
            .as_ref()
            .and_then(|s| s.url.clone())
            .unwrap_or_else(|| {
                file_url(
                    &child.spec.destination.url,
                    &name,
                    child.spec.compression.into(),
                )
            });
        let staging = child.status.as_ref().and_then(|s| s.staging_upload.clone());
        let deleted = match resolve_destination(ctx, namespace, &child.spec.destination, &url).await
        {
            Ok(destination) => match destination.delete().await {
                // A child killed mid-upload may have left staging behind too.
                Ok(()) => destination
                    .clean_up(staging.as_deref())
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            },
            Err(p) => Err(p.message),
        };
        if let Err(message) = deleted {
            problem = Some(format!(
                "cannot delete {url} of StateExport \"{name}\" (kept until it can be): {message}"
            ));
            continue;
        }
        match api.delete(&name, &DeleteParams::background()).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
        let pruned = child.object_ref(&());
        children.retain(|c| c.name_any() != name);
        ctx.publish(
            &Event {
                type_: EventType::Normal,
                reason: "ExportPruned".into(),
                note: Some(format!(
                    "deleted StateExport \"{name}\" and {url} (retention)"
                )),
                action: "Prune".into(),
                secondary: Some(pruned),
            },
            parent,
        )
        .await;
    }
    Ok(problem)
}

/// Fills the schedule's status from its children: active, last success, phase.
fn summarize(status: &mut StateExportStatus, children: &[StateExport], suspend: bool) {
    let active = children.iter().rev().find(|c| !is_finished(c));
    status.active_export = active.map(|c| c.name_any());
    let last_success = children
        .iter()
        .rev()
        .find(|c| phase_of(c) == Some(PHASE_SUCCEEDED));
    if let Some(child) = last_success {
        let result = child.status.clone().unwrap_or_default();
        status.last_successful_export = Some(child.name_any());
        status.last_successful_time = result.finished_at;
        status.url = result.url;
        status.bytes = result.bytes;
        status.sha256 = result.sha256;
        status.rows = result.rows;
        status.environments = result.environments;
        status.schema_version = result.schema_version;
    }
    status.phase = Some(
        if active.is_some() {
            PHASE_ACTIVE
        } else if suspend {
            PHASE_SUSPENDED
        } else {
            PHASE_SCHEDULED
        }
        .into(),
    );
}

/// Marks a child that never started as Failed, superseded by the run at `at`: it never runs.
async fn supersede(
    ctx: &Context,
    child: &mut StateExport,
    at: Timestamp,
) -> Result<(), ReconcileError> {
    let previous = child.status.clone().unwrap_or_default();
    let why = conditions::find(&previous.conditions, READY)
        .map(|c| format!(" (it waited: {})", c.message))
        .unwrap_or_default();
    let message = format!("superseded by the run due at {at}: it never started{why}");
    let status = StateExportStatus {
        phase: Some(PHASE_FAILED.into()),
        finished_at: Some(ctx.now().to_string()),
        ..previous.clone()
    };
    let written = super::state_export::write_status(
        ctx,
        child,
        status,
        &previous,
        super::state_export::failed("Superseded", &message, true),
        &child.object_ref(&()),
    )
    .await?;
    child.status = Some(written);
    Ok(())
}

fn schedule_conditions(
    status: &StateExportStatus,
    children: &[StateExport],
    prune_problem: Option<String>,
    store_problem: Option<String>,
) -> Vec<Desired> {
    let last_finished = children.iter().rev().find(|c| is_finished(c));
    let next = status
        .next_schedule_time
        .as_deref()
        .map(|t| format!("next run at {t}"))
        .unwrap_or_else(|| "no run scheduled (suspended)".into());
    let reconciling = match &status.active_export {
        Some(active) => Desired::new(
            RECONCILING,
            true,
            "ExportRunning",
            format!("StateExport \"{active}\" is running"),
        ),
        None => Desired::new(RECONCILING, false, "Idle", next.clone()),
    };
    let ready = match last_finished {
        _ if store_problem.is_some() => Desired::new(
            READY,
            false,
            "StoreNotFound",
            store_problem.clone().unwrap_or_default(),
        ),
        Some(child) if phase_of(child) == Some(PHASE_FAILED) => {
            let why = child
                .status
                .as_ref()
                .and_then(|s| conditions::find(&s.conditions, READY))
                .map(|c| c.message.clone())
                .unwrap_or_default();
            Desired::new(
                READY,
                false,
                "ExportFailed",
                format!("the latest export \"{}\" failed: {why}", child.name_any()),
            )
        }
        _ => match prune_problem {
            Some(problem) => Desired::new(READY, false, "RetentionFailed", problem),
            None => Desired::new(
                READY,
                true,
                "Scheduled",
                match &status.last_successful_export {
                    Some(last) => format!("last backup \"{last}\"; {next}"),
                    None => format!("no backup yet; {next}"),
                },
            ),
        },
    };
    vec![
        ready,
        reconciling,
        Desired::new(STALLED, false, "Scheduled", "the schedule is valid"),
    ]
}

/// A schedule that cannot work as written: Stalled until its spec changes.
async fn stalled(
    ctx: &Context,
    export: &StateExport,
    status: StateExportStatus,
    previous: &StateExportStatus,
    reason: &str,
    message: &str,
) -> Result<(), ReconcileError> {
    let desired = vec![
        Desired::new(READY, false, reason, message),
        Desired::new(RECONCILING, false, reason, "waiting for the spec to change"),
        Desired::new(STALLED, true, reason, message),
    ];
    if !changed(&status, previous, &desired, ctx.now()) {
        return Ok(());
    }
    write_status(
        ctx,
        export,
        status,
        previous,
        desired,
        &export.object_ref(&()),
    )
    .await?;
    Ok(())
}

/// Whether writing would change anything: every write wakes this reconciler again, so an
/// unchanged status is never written (or it would loop).
fn changed(
    status: &StateExportStatus,
    previous: &StateExportStatus,
    desired: &[Desired],
    now: Timestamp,
) -> bool {
    let merged = conditions::merge(
        &previous.conditions,
        desired,
        status.observed_generation,
        now,
    );
    let without_conditions = |s: &StateExportStatus| StateExportStatus {
        conditions: Vec::new(),
        ..s.clone()
    };
    without_conditions(status) != without_conditions(previous) || merged != previous.conditions
}
