//! A StateExport with a schedule, run like a CronJob: each due run creates a one-shot child
//! StateExport named `<parent>-<UTC yyyymmddhhmmss>` (deterministic, so a retried create is
//! harmless), labelled and owned by the parent; the one-shot reconciler runs it. Never two runs
//! of one schedule at once, at most one catch-up after downtime, a run-now annotation, and
//! retention that deletes the oldest finished children together with their files.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};

use super::status::{failed, write_status};
use crate::api::phases;
use crate::api::state_export::{StateExport, StateExportSpec, StateExportStatus};
use crate::controller::access::{file_url, read_recipients, resolve_destination};
use crate::controller::conditions::{self, Desired, READY, RECONCILING, STALLED};
use crate::controller::context::{Context, ReconcileError};
use crate::controller::schedule::{self, Schedule};

/// The keys this reconciler sets, by the paths they have always had.
pub use crate::api::labels::{
    MANAGED_BY, RUN_NOW_ANNOTATION, RUN_NOW_TOKEN_ANNOTATION, SCHEDULE_LABEL,
    SCHEDULED_AT_ANNOTATION,
};

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

/// The URL of a child's file: inside the schedule's folder, named after the child.
pub fn child_url(folder: &str, child: &str, extension: &str) -> String {
    let folder = format!("{}/", folder.trim_end_matches('/'));
    file_url(&folder, child, extension)
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
    phases::export_is_finished(phase_of(child))
}

/// A child that was looked at and could not start (its store missing or not ready, a Secret
/// missing). It must not hold the schedule for ever: when the next run is due it is superseded.
fn never_started(child: &StateExport) -> bool {
    phase_of(child) == Some(phases::PENDING)
        && child.status.as_ref().is_some_and(|s| s.attempts == 0)
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
    let spec = &export.spec;
    let previous = export.status.clone().unwrap_or_default();
    let reference = export.object_ref(&());
    let now = ctx.now();
    let mut status = StateExportStatus {
        observed_generation: export.meta().generation,
        ..previous.clone()
    };
    let Some(schedule) =
        schedule_or_stall(&ctx, &export, &namespace, now, &status, &previous).await?
    else {
        return Ok(Action::await_change());
    };

    let api: Api<StateExport> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut children = children_of(&api, &export).await?;
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
    // A child not reconciled yet, or started, makes the schedule busy.
    let busy = children
        .iter()
        .any(|c| !is_finished(c) && !never_started(c));
    let store_problem = missing_store(&ctx, &namespace, spec).await?;
    let (due_now, missed) = schedule::record(
        &due,
        "export",
        spec.starting_deadline_seconds,
        &mut status.last_schedule_time,
        &mut status.next_schedule_time,
    );
    if let Some(event) = missed {
        ctx.publish(&event, &reference).await;
    }
    let run_now = run_now_request(&export, &children, &previous, &mut status);
    let run = choose_run(
        spec, &previous, &children, busy, due_now, created, now, &run_now,
    );
    if let Some((at, trigger)) = run {
        if let Trigger::RunNow = trigger {
            status.last_run_now = run_now.clone();
        } else {
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
    let mut requeue = schedule::requeue_after(&due, now, ctx.settings.resync_interval);
    if run_now.is_some() && run.is_none() {
        // A run-now request waits for the running export; its finish wakes us, this is a backstop.
        requeue = requeue.min(Duration::from_secs(30));
    }
    Ok(Action::requeue(requeue))
}

/// The schedule, when the spec can work: an invalid cron expression, or a destination that
/// can never work, stalls the schedule now rather than at its first run (`None`).
async fn schedule_or_stall(
    ctx: &Context,
    export: &StateExport,
    namespace: &str,
    now: Timestamp,
    status: &StateExportStatus,
    previous: &StateExportStatus,
) -> Result<Option<Schedule>, ReconcileError> {
    let spec = &export.spec;
    let schedule = match Schedule::parse(
        spec.schedule.as_deref().unwrap_or_default(),
        spec.time_zone.as_deref(),
    ) {
        Ok(schedule) => schedule,
        Err(message) => {
            let status = StateExportStatus {
                phase: Some(phases::SCHEDULED.into()),
                next_schedule_time: None,
                ..status.clone()
            };
            stalled(ctx, export, status, previous, "InvalidSchedule", &message).await?;
            return Ok(None);
        }
    };
    let sample = child_url(
        &spec.destination.url,
        &child_name(&export.name_any(), now),
        &spec.file_extension(),
    );
    let destination = resolve_destination(ctx, namespace, &spec.destination, &sample)
        .await
        .err();
    // Keys that are not keys would fail every child: the schedule stalls instead.
    let keys = match &spec.encryption {
        Some(encryption) => read_recipients(ctx, namespace, encryption).await.err(),
        None => None,
    };
    if let Some(problem) = destination.into_iter().chain(keys).find(|p| p.permanent) {
        stalled(
            ctx,
            export,
            status.clone(),
            previous,
            problem.reason,
            &problem.message,
        )
        .await?;
        return Ok(None);
    }
    Ok(Some(schedule))
}

/// The schedule's children, oldest run first. Only its own: a namesake schedule recreated later
/// starts afresh.
async fn children_of(
    api: &Api<StateExport>,
    export: &StateExport,
) -> Result<Vec<StateExport>, ReconcileError> {
    let uid = export.uid();
    let mut children: Vec<StateExport> = api
        .list(&ListParams::default().labels(&format!("{SCHEDULE_LABEL}={}", export.name_any())))
        .await?
        .items
        .into_iter()
        .filter(|child| {
            child
                .owner_references()
                .iter()
                .any(|o| Some(&o.uid) == uid.as_ref())
        })
        .collect();
    sort_by_run(&mut children);
    Ok(children)
}

/// The store's absence is the schedule's problem too: every run would wait for it.
async fn missing_store(
    ctx: &Context,
    namespace: &str,
    spec: &StateExportSpec,
) -> Result<Option<String>, ReconcileError> {
    let stores: Api<crate::api::StateStore> = Api::namespaced(ctx.client.clone(), namespace);
    Ok(match stores.get_opt(&spec.store_ref.name).await? {
        Some(_) => None,
        None => Some(format!(
            "StateStore \"{}\" not found in namespace \"{namespace}\": no export can run until it exists",
            spec.store_ref.name
        )),
    })
}

/// The token of a run-now request not answered yet. A request is done once a child carries its
/// token, whatever a (possibly stale) status says; the status then records it.
fn run_now_request(
    export: &StateExport,
    children: &[StateExport],
    previous: &StateExportStatus,
    status: &mut StateExportStatus,
) -> Option<String> {
    let requested = export.annotations().get(RUN_NOW_ANNOTATION).cloned();
    let answered = requested.as_ref().is_some_and(|token| {
        children
            .iter()
            .any(|c| c.annotations().get(RUN_NOW_TOKEN_ANNOTATION) == Some(token))
    });
    if answered {
        status.last_run_now = requested.clone();
    }
    requested.filter(|token| !answered && previous.last_run_now.as_ref() != Some(token))
}

/// The run that starts now, if any, and why: the occurrence due, else the first run of an
/// `immediate` schedule, else a run-now request. Never two at once: a due occurrence stays due
/// until the running export finishes (a finishing child wakes us), unless it is past its
/// deadline by then.
#[allow(clippy::too_many_arguments)]
fn choose_run(
    spec: &StateExportSpec,
    previous: &StateExportStatus,
    children: &[StateExport],
    busy: bool,
    due_now: Option<Timestamp>,
    created: Timestamp,
    now: Timestamp,
    run_now: &Option<String>,
) -> Option<(Timestamp, Trigger)> {
    if busy {
        return None;
    }
    if let Some(scheduled) = due_now {
        return Some((scheduled, Trigger::Schedule));
    }
    if spec.immediate
        && !spec.suspend
        && previous.last_schedule_time.is_none()
        && children.is_empty()
    {
        return Some((created, Trigger::Immediate));
    }
    run_now.as_ref().map(|_| (now, Trigger::RunNow))
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
        &parent.spec.file_extension(),
    );
    let child = StateExport {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: parent.namespace(),
            labels: Some(BTreeMap::from([
                (SCHEDULE_LABEL.to_owned(), parent_name.clone()),
                (MANAGED_BY.0.to_owned(), MANAGED_BY.1.to_owned()),
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
    parent: &ObjectReference,
) -> Result<Option<String>, ReconcileError> {
    let mut doomed: Vec<String> = Vec::new();
    for (phase, keep) in [
        (phases::SUCCEEDED, keep_last),
        (phases::FAILED, keep_failed),
    ] {
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
                    &child.spec.file_extension(),
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
        .find(|c| phase_of(c) == Some(phases::SUCCEEDED));
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
            phases::ACTIVE
        } else if suspend {
            phases::SUSPENDED
        } else {
            phases::SCHEDULED
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
        phase: Some(phases::FAILED.into()),
        finished_at: Some(ctx.now().to_string()),
        ..previous.clone()
    };
    let written = write_status(
        ctx,
        child,
        status,
        &previous,
        failed("Superseded", &message, true),
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
        Some(child) if phase_of(child) == Some(phases::FAILED) => {
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
