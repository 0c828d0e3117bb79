//! The scheduled janitor of a StateStore: decides whether a run is due (CronJob semantics),
//! runs it through the engine, and reports it in `.status.janitor`, a `JanitorSucceeded`
//! condition, Events and metrics.

use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams};
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};

use super::conditions::Desired;
use super::context::Context;
use super::runner::{self, JobOutcome};
use super::schedule::{self, Due, Schedule};
use crate::api::StateMigration;
use crate::api::labels::SCHEDULED_AT_LABEL;
use crate::api::phases;
use crate::api::runner::Runner;
use crate::api::state_store::{JanitorResult, JanitorSpec, JanitorStatus, StateStore};
use crate::engine::{JanitorOptions, Store};

pub const JANITOR_SUCCEEDED: &str = "JanitorSucceeded";

/// What the janitor step decided and did in one reconcile.
pub struct JanitorStep {
    pub status: JanitorStatus,
    /// The condition to report; `None` until the first run or problem.
    pub condition: Option<Desired>,
    /// Look again after this long at the latest.
    pub requeue: Duration,
    /// A real run removed rows: the store's counts changed.
    pub changed_store: bool,
}

/// Options for the engine from the spec, or a message saying what is wrong with it.
pub fn options(spec: &JanitorSpec, unsuffixed: &str) -> Result<JanitorOptions, String> {
    let duration = |field: &str, value: &str| {
        humantime::parse_duration(value).map_err(|e| {
            format!("janitor.{field} \"{value}\" is not a duration such as 24h or 7d: {e}")
        })
    };
    Ok(JanitorOptions {
        expired_environments: spec.expired_environments,
        keep_checkpoints: spec.keep_checkpoints,
        checkpoint_min_age: duration("checkpointMinAge", &spec.checkpoint_min_age)?,
        version_grace: duration("versionGracePeriod", &spec.version_grace_period)?,
        unsuffixed_environment: unsuffixed.to_owned(),
        dry_run: spec.dry_run,
        batch_size: spec.batch_size.max(1),
        keep_runs: spec.keep_runs,
        run_min_age: duration("runMinAge", &spec.run_min_age)?,
        fail_stale_runs: spec.fail_stale_runs,
    })
}

/// What the schedule asks for now, after the run recorded last.
fn decide(
    schedule: &Schedule,
    spec: &JanitorSpec,
    status: &JanitorStatus,
    created: Timestamp,
    now: Timestamp,
) -> Due {
    let last_scheduled = status
        .last_schedule_time
        .as_ref()
        .and_then(|v| v.parse().ok());
    schedule::decide(
        schedule,
        last_scheduled,
        created,
        now,
        spec.starting_deadline_seconds.map(Duration::from_secs),
        spec.suspend,
    )
}

fn carried(previous: Option<&Condition>) -> Option<Desired> {
    previous.map(|c| {
        Desired::new(
            JANITOR_SUCCEEDED,
            c.status == "True",
            c.reason.clone(),
            c.message.clone(),
        )
    })
}

#[allow(clippy::too_many_arguments)]
pub async fn step(
    spec: &JanitorSpec,
    unsuffixed: &str,
    previous: Option<&JanitorStatus>,
    previous_condition: Option<&Condition>,
    created: Timestamp,
    engine: &Store,
    ctx: &Context,
    reference: &ObjectReference,
) -> JanitorStep {
    let now = ctx.now();
    let mut status = previous.cloned().unwrap_or_default();
    let cap = ctx.settings.resync_interval;
    let invalid = |message: String| JanitorStep {
        status: JanitorStatus {
            next_schedule_time: None,
            ..previous.cloned().unwrap_or_default()
        },
        condition: Some(Desired::new(
            JANITOR_SUCCEEDED,
            false,
            "InvalidJanitorSpec",
            message,
        )),
        requeue: cap,
        changed_store: false,
    };
    let schedule = match Schedule::parse(&spec.schedule, spec.time_zone.as_deref()) {
        Ok(schedule) => schedule,
        Err(message) => return invalid(message),
    };
    let options = match options(spec, unsuffixed) {
        Ok(options) => options,
        Err(message) => return invalid(message),
    };
    let due = decide(&schedule, spec, &status, created, now);
    let requeue = schedule::requeue_after(&due, now, cap);
    let mut condition = carried(previous_condition);
    let mut changed_store = false;
    if let Some(scheduled) = record_due(ctx, spec, &due, &mut status, reference).await {
        status.last_schedule_time = Some(scheduled.to_string());
        let outcome = engine.janitor(&options, |_| {}).await;
        let finished = ctx.now();
        let (event_type, reason, note) = match &outcome {
            Ok(report) => {
                status.last_successful_time = Some(finished.to_string());
                status.last_result = Some(JanitorResult {
                    dry_run: report.dry_run,
                    expired_environments: report.expired_environments,
                    checkpoints: report.checkpoints,
                    model_versions: report.model_versions,
                    function_versions: report.function_versions,
                    physical_relations: report.physical_relations,
                    intervals: report.intervals,
                    batches: report.batches,
                    runs: report.runs,
                    stale_runs_failed: report.stale_runs_failed,
                    duration_ms: report.duration.as_millis() as u64,
                });
                changed_store = !report.dry_run && report.removed_rows() > 0;
                let message = format!(
                    "run for {scheduled}: {} in {} ms",
                    report.summary(),
                    report.duration.as_millis()
                );
                condition = success(message.clone());
                (EventType::Normal, "JanitorSucceeded", message)
            }
            Err(e) => {
                let message = format!("run for {scheduled} failed: {e}");
                condition = Some(Desired::new(
                    JANITOR_SUCCEEDED,
                    false,
                    e.reason(),
                    message.clone(),
                ));
                (EventType::Warning, "JanitorFailed", message)
            }
        };
        ctx.metrics.record_janitor_run(
            outcome
                .as_ref()
                .map_or_else(|e| e.reason(), |_| "Succeeded"),
            outcome.as_ref().map_or(0, |r| r.removed_rows()),
        );
        ctx.notify_occurrence(
            reference,
            event_type,
            reason,
            "Janitor",
            &note,
            &format!("status.janitor.lastScheduleTime={scheduled}"),
        )
        .await;
    }
    JanitorStep {
        status,
        condition,
        requeue,
        changed_store,
    }
}

/// Records the decision in the status, announcing a missed run; returns the run due now.
async fn record_due(
    ctx: &Context,
    spec: &JanitorSpec,
    due: &Due,
    status: &mut JanitorStatus,
    reference: &ObjectReference,
) -> Option<Timestamp> {
    let (due_now, missed) = schedule::record(
        due,
        "janitor run",
        spec.starting_deadline_seconds,
        &mut status.last_schedule_time,
        &mut status.next_schedule_time,
    );
    if let Some(event) = missed {
        ctx.publish(&event, reference).await;
    }
    due_now
}

/// A janitor run that succeeded, as its condition.
fn success(message: String) -> Option<Desired> {
    Some(Desired::new(JANITOR_SUCCEEDED, true, "Succeeded", message))
}

/// A failed janitor, as its condition.
fn failure(reason: &str, message: String) -> Option<Desired> {
    Some(Desired::new(JANITOR_SUCCEEDED, false, reason, message))
}

/// The scheduled janitor of a store whose framework cleans it itself: a runner Job per due run
/// (named from the run's time, so a restart adopts it rather than creating a second), an
/// optional backup first, never two at once, never while a StateMigration of the store runs.
/// A failed run is reported and never restored: the framework's janitor also drops warehouse
/// objects, so the old state could point at tables that no longer exist. For the same reason a
/// due run waits while a restore's views are stale or being re-pointed (`waits_for_views` says
/// why): the restored state's tables must survive until its views are re-pointed.
#[allow(clippy::too_many_arguments)]
pub async fn runner_step(
    spec: &JanitorSpec,
    runner: &Runner,
    store: &StateStore,
    (previous, previous_condition): (Option<&JanitorStatus>, Option<&Condition>),
    engine: &Store,
    ctx: &Context,
    reference: &ObjectReference,
    waits_for_views: Option<&str>,
) -> JanitorStep {
    let now = ctx.now();
    let mut status = previous.cloned().unwrap_or_default();
    let cap = ctx.settings.resync_interval;
    let condition = carried(previous_condition);
    if runner.command.is_empty() && engine.profile().janitor_command.is_empty() {
        return JanitorStep {
            status,
            condition: failure(
                "InvalidJanitorSpec",
                format!(
                    "{} has no janitor command of its own: remove janitor.runner (statekeeper's \
                     janitor cleans this store) or give runner.command",
                    engine.profile().display_name
                ),
            ),
            requeue: cap,
            changed_store: false,
        };
    }
    let namespace = store.namespace().unwrap_or_default();
    let janitor = RunnerJanitor {
        spec,
        runner,
        store,
        engine,
        ctx,
        reference,
        jobs: Api::namespaced(ctx.client.clone(), &namespace),
        namespace,
        waits_for_views,
    };
    if let Some(active) = status.active_job.clone() {
        return janitor.follow_job(&active, now, status, condition).await;
    }

    let schedule = match Schedule::parse(&spec.schedule, spec.time_zone.as_deref()) {
        Ok(schedule) => schedule,
        Err(message) => {
            return JanitorStep {
                status,
                condition: failure("InvalidJanitorSpec", message),
                requeue: cap,
                changed_store: false,
            };
        }
    };
    let created = store
        .meta()
        .creation_timestamp
        .as_ref()
        .map_or(now, |t| t.0);
    let due = decide(&schedule, spec, &status, created, now);
    let requeue = schedule::requeue_after(&due, now, cap);
    if let Some(scheduled) = record_due(ctx, spec, &due, &mut status, reference).await {
        return janitor.start_run(scheduled, status, condition).await;
    }
    JanitorStep {
        status,
        condition,
        requeue,
        changed_store: false,
    }
}

/// What a runner janitor step works with.
struct RunnerJanitor<'a> {
    spec: &'a JanitorSpec,
    runner: &'a Runner,
    store: &'a StateStore,
    engine: &'a Store,
    ctx: &'a Context,
    reference: &'a ObjectReference,
    namespace: String,
    jobs: Api<Job>,
    waits_for_views: Option<&'a str>,
}

impl RunnerJanitor<'_> {
    /// The run's Job is recorded as active: wait for it, or report how it ended (at `now`).
    async fn follow_job(
        &self,
        active: &str,
        now: Timestamp,
        mut status: JanitorStatus,
        mut condition: Option<Desired>,
    ) -> JanitorStep {
        let job = match self.jobs.get_opt(active).await {
            Ok(job) => job,
            Err(e) => {
                return JanitorStep {
                    status,
                    condition: failure("KubernetesError", format!("cannot read Job {active}: {e}")),
                    requeue: Duration::from_secs(15),
                    changed_store: false,
                };
            }
        };
        let outcome = match &job {
            Some(job) => runner::outcome(job),
            None => JobOutcome::Failed {
                reason: "JobDeleted".into(),
                message: "the Job was deleted before it finished".into(),
            },
        };
        let (event_type, reason, note) = match outcome {
            JobOutcome::Running => {
                return JanitorStep {
                    status,
                    condition,
                    requeue: Duration::from_secs(15),
                    changed_store: false,
                };
            }
            JobOutcome::Succeeded => {
                let message = format!("janitor Job {active} succeeded");
                status.last_successful_time = Some(now.to_string());
                status.last_outcome = Some("Succeeded".into());
                condition = success(message.clone());
                (EventType::Normal, "JanitorSucceeded", message)
            }
            JobOutcome::Failed { reason, message } => {
                let backup = status
                    .last_backup_id
                    .as_ref()
                    .map(|id| {
                        format!(
                            " Backup {id} holds the state before the run; restore it by hand \
                             only if the warehouse objects it references still exist."
                        )
                    })
                    .unwrap_or_default();
                let text = format!(
                    "janitor Job {active} {}. The store was not restored: a framework janitor \
                     also drops warehouse objects, so old state could point at dropped tables.{backup}",
                    runner::describe_failure(
                        &reason,
                        &message,
                        self.runner.active_deadline_seconds
                    )
                );
                status.last_outcome = Some(format!("Failed: {reason}"));
                condition = failure("JanitorJobFailed", text.clone());
                (EventType::Warning, "JanitorFailed", text)
            }
        };
        status.last_job = Some(active.to_owned());
        status.active_job = None;
        self.ctx.metrics.record_janitor_run(
            if event_type == EventType::Normal {
                "Succeeded"
            } else {
                "JobFailed"
            },
            0,
        );
        self.ctx
            .notify_occurrence(
                self.reference,
                event_type,
                reason,
                "Janitor",
                &note,
                &format!("status.janitor.lastJob={active}"),
            )
            .await;
        JanitorStep {
            status,
            condition,
            requeue: Duration::from_secs(1),
            changed_store: reason == "JanitorSucceeded",
        }
    }

    /// The run due at `scheduled`: after any running StateMigration of the store, and after the
    /// backup when one is asked for, its Job.
    async fn start_run(
        &self,
        scheduled: Timestamp,
        mut status: JanitorStatus,
        condition: Option<Desired>,
    ) -> JanitorStep {
        let store_name = self.store.name_any();
        if let Some(migration) = running_migration(self.ctx, &self.namespace, &store_name).await {
            // The run waits (still due) until the migration is done.
            return JanitorStep {
                status,
                condition: Some(Desired::new(
                    JANITOR_SUCCEEDED,
                    condition.as_ref().is_none_or(|c| c.status),
                    "WaitingForMigration",
                    format!(
                        "the janitor run due at {scheduled} waits for StateMigration {migration}"
                    ),
                )),
                requeue: Duration::from_secs(15),
                changed_store: false,
            };
        }
        if let Some(why) = self.waits_for_views {
            // Still due: it runs once the views agree with the restored state.
            return JanitorStep {
                status,
                condition: Some(Desired::new(
                    JANITOR_SUCCEEDED,
                    condition.as_ref().is_none_or(|c| c.status),
                    "WaitingForViews",
                    format!("the janitor run due at {scheduled} waits: {why}"),
                )),
                requeue: Duration::from_secs(15),
                changed_store: false,
            };
        }
        let name = runner::job_name(
            &store_name,
            &format!("janitor-{}", scheduled.strftime("%Y%m%d%H%M")),
        );
        if self.spec.backup {
            match self.backup_before(&name).await {
                Ok(id) => status.last_backup_id = Some(id),
                Err(e) => {
                    return JanitorStep {
                        status,
                        condition: failure(
                            e.reason(),
                            format!(
                                "the janitor run due at {scheduled} did not start: the backup \
                                 before it failed: {e}"
                            ),
                        ),
                        requeue: Duration::from_secs(30),
                        changed_store: false,
                    };
                }
            }
        }
        let Some(owner) = self.store.controller_owner_ref(&()) else {
            return JanitorStep {
                status,
                condition: failure("InvalidObject", "the StateStore has no uid".into()),
                requeue: self.ctx.settings.resync_interval,
                changed_store: false,
            };
        };
        let janitor_command = self.engine.profile().janitor_command;
        let request = runner::JobRequest {
            name: name.clone(),
            namespace: &self.namespace,
            runner: self.runner,
            default_command: janitor_command,
            store: self.store,
            owner,
            purpose: "janitor",
            labels: [(
                SCHEDULED_AT_LABEL.to_owned(),
                scheduled.strftime("%Y%m%dT%H%M%SZ").to_string(),
            )]
            .into(),
        };
        match runner::create_or_adopt(&self.jobs, &runner::build_job(&request)).await {
            Ok(_) => {
                status.last_schedule_time = Some(scheduled.to_string());
                status.active_job = Some(name.clone());
                let note = format!(
                    "created Job {name} running `{}` for the run due at {scheduled}",
                    runner::command(self.runner, janitor_command).join(" ")
                );
                self.ctx
                    .notify(
                        self.reference,
                        EventType::Normal,
                        "JanitorJobCreated",
                        "Janitor",
                        &note,
                    )
                    .await;
                JanitorStep {
                    status,
                    condition,
                    requeue: Duration::from_secs(15),
                    changed_store: false,
                }
            }
            Err(e) => JanitorStep {
                status,
                condition: failure(
                    "JobCreateFailed",
                    format!("cannot create janitor Job {name}: {e}"),
                ),
                requeue: Duration::from_secs(30),
                changed_store: false,
            },
        }
    }

    /// The backup before the run of Job `job`, tagged with the Job's name: a restart before the
    /// status write finds it rather than making a second.
    async fn backup_before(&self, job: &str) -> Result<String, crate::engine::Error> {
        let tagged = self.engine.clone().with_operation_id(job.to_owned());
        let existing = tagged.backup_of_operation(job).await.ok().flatten();
        let backup = match existing {
            Some(backup) => backup,
            None => tagged.backup_with_reason("pre-janitor").await?,
        };
        Ok(backup.id)
    }
}

/// A StateMigration of the store that is running now, if any.
async fn running_migration(ctx: &Context, namespace: &str, store: &str) -> Option<String> {
    let api: Api<StateMigration> = Api::namespaced(ctx.client.clone(), namespace);
    let list = api.list(&ListParams::default()).await.ok()?;
    list.items
        .into_iter()
        .find(|m| {
            m.spec.store_ref.name == store
                && m.status.as_ref().and_then(|s| s.phase.as_deref()) == Some(phases::RUNNING)
        })
        .map(|m| m.name_any())
}
