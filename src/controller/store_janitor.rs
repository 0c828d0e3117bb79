//! The scheduled janitor of a StateStore: decides whether a run is due (CronJob semantics),
//! runs it through the engine, and reports it in `.status.janitor`, a `JanitorSucceeded`
//! condition, Events and metrics.

use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::events::{Event, EventType};

use super::Context;
use super::conditions::Desired;
use super::schedule::{self, Due, Schedule};
use crate::api::state_store::{JanitorResult, JanitorSpec, JanitorStatus};
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
    })
}

fn parse_time(value: Option<&String>) -> Option<Timestamp> {
    value.and_then(|v| v.parse().ok())
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
    let due = schedule::decide(
        &schedule,
        parse_time(status.last_schedule_time.as_ref()),
        created,
        now,
        spec.starting_deadline_seconds.map(Duration::from_secs),
        spec.suspend,
    );
    let requeue = schedule::requeue_after(&due, now, cap);
    let mut condition = carried(previous_condition);
    let mut changed_store = false;
    match due {
        Due::Wait { next } => {
            status.next_schedule_time = next.map(|t| t.to_string());
        }
        Due::Missed { scheduled, next } => {
            status.last_schedule_time = Some(scheduled.to_string());
            status.next_schedule_time = next.map(|t| t.to_string());
            ctx.publish(
                &schedule::missed_event("janitor run", scheduled, spec.starting_deadline_seconds),
                reference,
            )
            .await;
        }
        Due::Run { scheduled, next } => {
            status.last_schedule_time = Some(scheduled.to_string());
            status.next_schedule_time = next.map(|t| t.to_string());
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
                        duration_ms: report.duration.as_millis() as u64,
                    });
                    changed_store = !report.dry_run && report.removed_rows() > 0;
                    let message = format!(
                        "run for {scheduled}: {} in {} ms",
                        report.summary(),
                        report.duration.as_millis()
                    );
                    condition = Some(Desired::new(
                        JANITOR_SUCCEEDED,
                        true,
                        "Succeeded",
                        message.clone(),
                    ));
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
            ctx.publish(
                &Event {
                    type_: event_type,
                    reason: reason.into(),
                    note: Some(note.chars().take(1000).collect()),
                    action: "Janitor".into(),
                    secondary: None,
                },
                reference,
            )
            .await;
        }
    }
    JanitorStep {
        status,
        condition,
        requeue,
        changed_store,
    }
}
