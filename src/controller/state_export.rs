//! The StateExport reconciler. A one-shot export runs once; its status keeps the result for
//! good; a failed attempt is retried with backoff until `backoffLimit`, then Failed for good.
//! A StateExport with a schedule is handed to [`export_schedule`].

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::conditions::{self, Desired, READY, RECONCILING, STALLED};
use super::export_schedule;
use super::state_store;
use super::{Context, FIELD_MANAGER, ReconcileError};
use crate::api::StateStore;
use crate::api::state_export::{StateExport, StateExportStatus};
use crate::engine::frameworks::meltano::backend::prefix_url;
use crate::engine::{Compression, Destination, ExportOptions, MeltanoLocks, redact};

pub const PHASE_PENDING: &str = "Pending";
pub const PHASE_RUNNING: &str = "Running";
pub const PHASE_SUCCEEDED: &str = "Succeeded";
pub const PHASE_FAILED: &str = "Failed";

/// The URL of the file an export writes: `url` itself, or `<url><name>.<extension>` when `url`
/// ends in `/` (a folder).
pub fn file_url(url: &str, name: &str, compression: Compression) -> String {
    if url.ends_with('/') {
        format!("{url}{name}.{}", compression.file_extension())
    } else {
        url.to_owned()
    }
}

/// Why a destination cannot be used: permanent problems fail the export for good, the rest
/// (a Secret not created yet) are retried.
pub struct DestinationProblem {
    pub reason: &'static str,
    pub message: String,
    pub permanent: bool,
}

/// The destination at `url`, configured by the spec's options and the keys of its credentials
/// Secret. Credential values never appear in the messages.
pub async fn resolve_destination(
    ctx: &Context,
    namespace: &str,
    spec: &crate::api::state_export::Destination,
    url: &str,
) -> Result<Destination, DestinationProblem> {
    let mut options = spec.options.clone();
    let mut secret_values = Vec::new();
    if let Some(secret_ref) = &spec.credentials_secret_ref {
        let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
        let secret = secrets
            .get_opt(&secret_ref.name)
            .await
            .map_err(|e| DestinationProblem {
                reason: "SecretUnreadable",
                message: format!(
                    "cannot read Secret \"{}\" in namespace \"{namespace}\": {e}",
                    secret_ref.name
                ),
                permanent: false,
            })?
            .ok_or_else(|| DestinationProblem {
                reason: "SecretNotFound",
                message: format!(
                    "credentials Secret \"{}\" not found in namespace \"{namespace}\"",
                    secret_ref.name
                ),
                permanent: false,
            })?;
        for (key, value) in secret.data.unwrap_or_default() {
            let value = String::from_utf8(value.0).map_err(|_| DestinationProblem {
                reason: "SecretValueInvalid",
                message: format!(
                    "Secret \"{}\" key \"{key}\" is not UTF-8 text",
                    secret_ref.name
                ),
                permanent: true,
            })?;
            if options.contains_key(&key) {
                return Err(DestinationProblem {
                    reason: "InvalidDestination",
                    message: format!(
                        "option \"{key}\" is set both in destination.options and in Secret \"{}\"",
                        secret_ref.name
                    ),
                    permanent: true,
                });
            }
            secret_values.push(value.clone());
            options.insert(key, value);
        }
    }
    Destination::parse_with_secrets(url, &options, &secret_values).map_err(|e| DestinationProblem {
        reason: e.reason(),
        message: e.to_string(),
        permanent: true,
    })
}

pub async fn reconcile(
    export: Arc<StateExport>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    let started = std::time::Instant::now();
    let result = if export.spec.schedule.is_some() {
        export_schedule::reconcile(export, ctx.clone()).await
    } else {
        reconcile_one_shot(export, ctx.clone()).await
    };
    ctx.metrics
        .observe_reconcile_duration("StateExport", started.elapsed());
    result
}

async fn reconcile_one_shot(
    export: Arc<StateExport>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    let namespace = export.namespace().ok_or(ReconcileError::NotNamespaced)?;
    let name = export.name_any();
    let previous = export.status.clone().unwrap_or_default();
    // Finished exports are never run again.
    if matches!(
        previous.phase.as_deref(),
        Some(PHASE_SUCCEEDED | PHASE_FAILED)
    ) {
        return Ok(Action::await_change());
    }
    // A retry waits for its backoff even when a watch event (our own status write) wakes us.
    if let Some(wait) = retry_wait(&previous, ctx.now()) {
        return Ok(Action::requeue(wait));
    }
    let reference = export.object_ref(&());
    let key = format!("{namespace}/{name}");
    let spec = &export.spec;
    let compression = Compression::from(spec.compression);
    let format = crate::engine::ExportFormat::from(spec.format);
    // Meltano's backend layout is a folder the export writes into; every other format, one file.
    let to_folder = format == crate::engine::ExportFormat::MeltanoBackend;
    let url = if to_folder {
        prefix_url(&spec.destination.url).to_owned()
    } else {
        file_url(&spec.destination.url, &name, compression)
    };
    let mut status = StateExportStatus {
        observed_generation: export.meta().generation,
        url: Some(url.clone()),
        ..previous.clone()
    };

    let destination = match resolve_destination(&ctx, &namespace, &spec.destination, &url).await {
        Ok(destination) => destination,
        // A destination that cannot work never will: fail for good, now. A missing Secret may
        // still appear: stay Pending.
        Err(problem) => {
            let (reason, message) = (problem.reason, problem.message);
            return stop(
                &ctx,
                &export,
                status,
                &previous,
                reason,
                &message,
                problem.permanent,
            )
            .await;
        }
    };
    let (engine, secrets) = match store_engine(&ctx, &namespace, &spec.store_ref.name).await? {
        Ok(connected) => connected,
        // The store may appear or heal: stay Pending, say why, and look again later.
        Err((reason, message)) => {
            return stop(&ctx, &export, status, &previous, &reason, &message, false).await;
        }
    };
    // A backup never overwrites a file it did not write: only the first attempt can find one.
    // (Replacing the state files below a Meltano backend's folder is what that format is for.)
    if previous.attempts == 0 && !to_folder {
        match destination.exists().await {
            Ok(false) => {}
            Ok(true) => {
                let message = format!(
                    "{url} already exists; refusing to overwrite it (delete it or choose another destination)"
                );
                return stop(
                    &ctx,
                    &export,
                    status,
                    &previous,
                    "DestinationExists",
                    &message,
                    true,
                )
                .await;
            }
            Err(e) => {
                let message = e.to_string();
                return stop(
                    &ctx,
                    &export,
                    status,
                    &previous,
                    e.reason(),
                    &message,
                    false,
                )
                .await;
            }
        }
    }
    // A store that is not ready yet (its tables not created) is waited for like a missing one:
    // no attempt is spent on it.
    if let Err(e) = engine.version().await {
        let message = format!(
            "StateStore \"{}\" is not ready: {}",
            spec.store_ref.name,
            redact(
                &e.to_string(),
                &secrets.iter().map(String::as_str).collect::<Vec<_>>()
            )
        );
        let reason = if e.is_connection_error() {
            e.reason()
        } else {
            "StoreNotReady"
        };
        return stop(&ctx, &export, status, &previous, reason, &message, false).await;
    }
    // What an interrupted attempt left (a multipart upload, a local staging file) goes first,
    // whether a retry follows or not: nothing is left behind, or billed, for ever.
    if previous.attempts > 0 {
        if let Err(e) = destination
            .clean_up(previous.staging_upload.as_deref())
            .await
        {
            let message = destination.redact(&e.to_string());
            return stop(
                &ctx,
                &export,
                status,
                &previous,
                e.reason(),
                &message,
                false,
            )
            .await;
        }
        status.staging_upload = None;
    }
    // An attempt that was interrupted (operator restart) still counts.
    if previous.attempts >= spec.backoff_limit {
        let message = format!(
            "attempt {} of {} was interrupted (the operator stopped) and no attempts are left",
            previous.attempts, spec.backoff_limit
        );
        return stop(
            &ctx,
            &export,
            status,
            &previous,
            "BackoffLimitExceeded",
            &message,
            true,
        )
        .await;
    }
    // A folder is written object by object, with no upload to stage.
    let upload = if to_folder {
        None
    } else {
        match destination.begin_upload().await {
            Ok(upload) => Some(upload),
            Err(e) => {
                let message = destination.redact(&e.to_string());
                return stop(
                    &ctx,
                    &export,
                    status,
                    &previous,
                    e.reason(),
                    &message,
                    false,
                )
                .await;
            }
        }
    };
    status.staging_upload = upload
        .as_ref()
        .and_then(|upload| upload.staging_id())
        .map(str::to_owned);
    // Record the attempt before running it: after a crash, the retry knows it is one (and which
    // upload to abort).
    status.attempts += 1;
    status.started_at = Some(ctx.now().to_string());
    status.phase = Some(PHASE_RUNNING.into());
    let running = vec![
        Desired::new(READY, false, "ExportRunning", format!("exporting to {url}")),
        Desired::new(
            RECONCILING,
            true,
            "ExportRunning",
            format!("attempt {} of {}", status.attempts, spec.backoff_limit),
        ),
        Desired::new(STALLED, false, "ExportRunning", "the export is running"),
    ];
    let previous = write_status(
        &ctx,
        &export,
        status.clone(),
        &previous,
        running,
        &reference,
    )
    .await?;
    // Every attempt is news, a retry after an operator restart included.
    ctx.notify_occurrence(
        &reference,
        EventType::Normal,
        "ExportRunning",
        "Export",
        &format!(
            "attempt {} of {}: exporting to {url}",
            status.attempts, spec.backoff_limit
        ),
        &format!("status.attempts={}", status.attempts),
    )
    .await;
    let options = ExportOptions {
        environments: (!spec.environments.is_empty()).then(|| spec.environments.clone()),
        compression,
        format,
    };
    let outcome = match upload {
        Some(upload) => {
            engine
                .export_upload(&destination, upload, &options, |_| {})
                .await
        }
        None => {
            engine
                .export_meltano_backend(&destination, &options, MeltanoLocks::default())
                .await
        }
    };
    // Completed or aborted: no upload of this attempt is left to clean up.
    status.staging_upload = None;
    match outcome {
        Ok(report) => {
            status.phase = Some(PHASE_SUCCEEDED.into());
            status.bytes = Some(report.bytes);
            status.sha256 = report.sha256.clone();
            status.environments = Some(report.environments);
            status.schema_version = Some(report.schema_version);
            status.duration_ms = Some(report.duration.as_millis() as u64);
            status.finished_at = Some(ctx.now().to_string());
            let message = report.summary(&url);
            status.rows = Some(report.rows);
            ctx.reset_failures(&key).await;
            ctx.metrics.record_export(
                &namespace,
                backup_name(&export),
                "Succeeded",
                report.bytes,
                ctx.now().as_second(),
            );
            let desired = vec![
                Desired::new(READY, true, "ExportSucceeded", message),
                Desired::new(
                    RECONCILING,
                    false,
                    "ExportSucceeded",
                    "the export is complete",
                ),
                Desired::new(STALLED, false, "ExportSucceeded", "the export is complete"),
            ];
            write_status(&ctx, &export, status, &previous, desired, &reference).await?;
            Ok(Action::await_change())
        }
        Err(e) => {
            let secret_refs: Vec<&str> = secrets.iter().map(String::as_str).collect();
            // A request the store can never serve (a format its framework lacks) is not retried.
            let exhausted = status.attempts >= spec.backoff_limit
                || matches!(
                    e,
                    crate::engine::Error::UnsupportedFormat { .. }
                        | crate::engine::Error::InvalidExportRequest(_)
                );
            let message = format!(
                "attempt {} of {} failed: {}",
                status.attempts,
                spec.backoff_limit,
                destination.redact(&redact(&e.to_string(), &secret_refs))
            );
            ctx.metrics
                .record_export(&namespace, backup_name(&export), e.reason(), 0, 0);
            status.phase = Some(
                if exhausted {
                    PHASE_FAILED
                } else {
                    PHASE_PENDING
                }
                .into(),
            );
            if exhausted {
                status.finished_at = Some(ctx.now().to_string());
            }
            let status_attempts = status.attempts;
            write_status(
                &ctx,
                &export,
                status,
                &previous,
                failed(e.reason(), &message, exhausted),
                &reference,
            )
            .await?;
            Ok(if exhausted {
                Action::await_change()
            } else {
                Action::requeue(retry_backoff(status_attempts))
            })
        }
    }
}

/// The engine for the referenced StateStore, or why it cannot be used (reason, message), with
/// any secret redacted from the message.
async fn store_engine(
    ctx: &Context,
    namespace: &str,
    name: &str,
) -> Result<Result<(crate::engine::Store, Vec<String>), (String, String)>, ReconcileError> {
    let stores: Api<StateStore> = Api::namespaced(ctx.client.clone(), namespace);
    let Some(store) = stores.get_opt(name).await? else {
        return Ok(Err((
            "StoreNotFound".into(),
            format!("StateStore \"{name}\" not found in namespace \"{namespace}\""),
        )));
    };
    Ok(state_store::connect_for_operation(&store, namespace, ctx).await)
}

/// Backoff after the n-th failed attempt: 10 s, doubling, at most 5 minutes.
pub fn retry_backoff(attempts: u32) -> Duration {
    Duration::from_secs(
        10u64
            .saturating_mul(1 << attempts.saturating_sub(1).min(10))
            .min(300),
    )
}

/// How long a failed export still has to wait before its next attempt, if at all.
fn retry_wait(previous: &StateExportStatus, now: k8s_openapi::jiff::Timestamp) -> Option<Duration> {
    if previous.attempts == 0 {
        return None;
    }
    let started: k8s_openapi::jiff::Timestamp = previous.started_at.as_deref()?.parse().ok()?;
    let elapsed = Duration::try_from(now.duration_since(started)).unwrap_or_default();
    retry_backoff(previous.attempts)
        .checked_sub(elapsed)
        .filter(|d| !d.is_zero())
}

pub fn error_policy(
    export: Arc<StateExport>,
    error: &ReconcileError,
    _ctx: Arc<Context>,
) -> Action {
    tracing::warn!(export = %export.name_any(), %error, "reconcile failed");
    Action::requeue(Duration::from_secs(15))
}

/// The backup an export belongs to, for metrics: its schedule, or itself.
fn backup_name(export: &StateExport) -> &str {
    export
        .labels()
        .get(export_schedule::SCHEDULE_LABEL)
        .map_or_else(
            || export.meta().name.as_deref().unwrap_or_default(),
            String::as_str,
        )
}

/// Ends a reconcile without running the export: Failed for good (`final_`), or Pending and
/// looked at again after a backoff.
async fn stop(
    ctx: &Context,
    export: &StateExport,
    mut status: StateExportStatus,
    previous: &StateExportStatus,
    reason: &str,
    message: &str,
    final_: bool,
) -> Result<Action, ReconcileError> {
    status.phase = Some(if final_ { PHASE_FAILED } else { PHASE_PENDING }.into());
    if final_ {
        status.finished_at = Some(ctx.now().to_string());
    }
    let reference = export.object_ref(&());
    let desired = failed(reason, message, final_);
    write_status(ctx, export, status, previous, desired, &reference).await?;
    if final_ {
        return Ok(Action::await_change());
    }
    let key = format!(
        "{}/{}",
        export.namespace().unwrap_or_default(),
        export.name_any()
    );
    Ok(Action::requeue(ctx.next_backoff(&key).await))
}

/// Conditions of a failure; `final_` when no retry will follow.
pub(super) fn failed(reason: &str, message: &str, final_: bool) -> Vec<Desired> {
    vec![
        Desired::new(READY, false, reason, message),
        Desired::new(
            RECONCILING,
            !final_,
            reason,
            if final_ {
                "no further attempts"
            } else {
                "retrying with backoff"
            },
        ),
        Desired::new(STALLED, final_, reason, message),
    ]
}

/// Writes the status (one field manager, server-side apply) and an Event when Ready changed.
pub(super) async fn write_status(
    ctx: &Context,
    export: &StateExport,
    mut status: StateExportStatus,
    previous: &StateExportStatus,
    desired: Vec<Desired>,
    reference: &k8s_openapi::api::core::v1::ObjectReference,
) -> Result<StateExportStatus, ReconcileError> {
    status.conditions = conditions::merge(
        &previous.conditions,
        &desired,
        export.meta().generation,
        ctx.now(),
    );
    let ready = conditions::find(&status.conditions, READY).cloned();
    let api: Api<StateExport> =
        Api::namespaced(ctx.client.clone(), &export.namespace().unwrap_or_default());
    let patch = json!({ "apiVersion": "statekeeper.dev/v1alpha1", "kind": "StateExport", "status": status });
    api.patch_status(
        &export.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    if let Some(ready) = ready {
        let before = conditions::find(&previous.conditions, READY);
        // Attempts announce themselves (one Event each, see `reconcile`).
        if ready.reason != "ExportRunning"
            && before.is_none_or(|b| b.status != ready.status || b.reason != ready.reason)
        {
            ctx.publish(
                &Event {
                    type_: if ready.status == "True" {
                        EventType::Normal
                    } else {
                        EventType::Warning
                    },
                    reason: ready.reason.clone(),
                    note: Some(ready.message.chars().take(1000).collect()),
                    action: "Export".into(),
                    secondary: None,
                },
                reference,
            )
            .await;
        }
        ctx.metrics.count_reconcile("StateExport", &ready.reason);
    }
    Ok(status)
}
