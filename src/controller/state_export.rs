//! The StateExport reconciler: a one-shot backup. It runs once; its status keeps the result for
//! good; a failed attempt is retried with backoff until `backoffLimit`, then Failed for good.

use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::conditions::{self, Desired, READY, RECONCILING, STALLED};
use super::state_store;
use super::{Context, FIELD_MANAGER, ReconcileError};
use crate::api::StateStore;
use crate::api::state_export::{ExportCompression, StateExport, StateExportStatus};
use crate::engine::{Compression, ExportOptions, redact};

pub const PHASE_SUCCEEDED: &str = "Succeeded";
pub const PHASE_FAILED: &str = "Failed";

/// The path of a `file:///absolute/path` destination, or why it cannot be used.
pub fn destination_path(url: &str) -> Result<std::path::PathBuf, String> {
    let path = url.strip_prefix("file://").ok_or_else(|| {
        format!("destination \"{url}\" is not supported: use file:///absolute/path")
    })?;
    if !path.starts_with('/') || path.split('/').any(|part| part == "..") {
        return Err(format!(
            "destination \"{url}\" must be an absolute path without \"..\""
        ));
    }
    Ok(path.into())
}

pub async fn reconcile(
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
    let mut status = StateExportStatus {
        observed_generation: export.meta().generation,
        url: Some(spec.destination.url.clone()),
        attempts: previous.attempts,
        ..previous.clone()
    };

    let path = match destination_path(&spec.destination.url) {
        Ok(path) => path,
        Err(message) => {
            // A destination that cannot work never will: fail for good, now.
            status.phase = Some(PHASE_FAILED.into());
            return finish(
                &ctx,
                &export,
                status,
                &previous,
                failed("UnsupportedDestination", &message, true),
                &reference,
            )
            .await;
        }
    };
    let (engine, secrets) = match store_engine(&ctx, &namespace, &spec.store_ref.name).await? {
        Ok(connected) => connected,
        Err((reason, message)) => {
            // The store may appear or heal: stay Pending, say why, and look again later.
            status.phase = Some("Pending".into());
            finish(
                &ctx,
                &export,
                status,
                &previous,
                failed(&reason, &message, false),
                &reference,
            )
            .await?;
            return Ok(Action::requeue(ctx.next_backoff(&key).await));
        }
    };

    let started = ctx.now();
    status.attempts += 1;
    status.started_at = Some(started.to_string());
    let options = ExportOptions {
        environments: (!spec.environments.is_empty()).then(|| spec.environments.clone()),
        compression: match spec.compression {
            ExportCompression::None => Compression::None,
            ExportCompression::Gzip => Compression::Gzip,
            ExportCompression::Zstd => Compression::Zstd,
        },
    };
    match engine.export_to_path(&path, &options, |_| {}).await {
        Ok(report) => {
            status.phase = Some(PHASE_SUCCEEDED.into());
            status.bytes = Some(report.bytes);
            status.sha256 = Some(report.sha256.clone());
            status.environments = Some(report.environments);
            status.schema_version = Some(report.schema_version);
            status.duration_ms = Some(report.duration.as_millis() as u64);
            status.finished_at = Some(ctx.now().to_string());
            let message = format!(
                "exported {} rows ({} environments) to {}: {} bytes, sha256 {}",
                report.total_rows(),
                report.environments,
                spec.destination.url,
                report.bytes,
                report.sha256
            );
            status.rows = Some(report.rows);
            ctx.reset_failures(&key).await;
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
            finish(&ctx, &export, status, &previous, desired, &reference).await?;
            Ok(Action::await_change())
        }
        Err(e) => {
            let secret_refs: Vec<&str> = secrets.iter().map(String::as_str).collect();
            let exhausted = status.attempts >= spec.backoff_limit;
            let message = format!(
                "attempt {} of {} failed: {}",
                status.attempts,
                spec.backoff_limit,
                redact(&e.to_string(), &secret_refs)
            );
            status.phase = Some(if exhausted { PHASE_FAILED } else { "Pending" }.into());
            let status_attempts = status.attempts;
            finish(
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
    Ok(state_store::connect(&store, namespace, ctx)
        .await
        .map_err(|(observation, secrets)| {
            let (reason, message) = observation
                .problem()
                .unwrap_or_else(|| ("StoreUnavailable".into(), "the store cannot be used".into()));
            let secret_refs: Vec<&str> = secrets.iter().map(String::as_str).collect();
            (
                reason,
                format!("StateStore \"{name}\": {}", redact(&message, &secret_refs)),
            )
        }))
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

/// Conditions of a failure; `final_` when no retry will follow.
fn failed(reason: &str, message: &str, final_: bool) -> Vec<Desired> {
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
async fn finish(
    ctx: &Context,
    export: &StateExport,
    mut status: StateExportStatus,
    previous: &StateExportStatus,
    desired: Vec<Desired>,
    reference: &k8s_openapi::api::core::v1::ObjectReference,
) -> Result<Action, ReconcileError> {
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
        if before.is_none_or(|b| b.status != ready.status || b.reason != ready.reason) {
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
        ctx.metrics
            .record_reconcile("StateExport", &ready.reason, Duration::ZERO);
    }
    Ok(Action::await_change())
}
