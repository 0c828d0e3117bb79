//! A StateExport's verification (`spec.verify`): once the export is written, the file is read
//! back from its destination and verified (`Store::verify`: its manifest checked, restored into a
//! scratch schema beside the store). The export is Ready only once verified. A file that fails
//! verification fails the export for good; a verification that could not run (the database or
//! the destination unreachable) is retried with backoff, without exporting again.

use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};

use super::status::{failed, write_status};
use crate::api::phases;
use crate::api::state_export::{StateExport, StateExportStatus};
use crate::controller::access::{self, OperatedStore, resolve_destination};
use crate::controller::conditions::{Desired, READY, RECONCILING, STALLED};
use crate::controller::context::{Context, ReconcileError};
use crate::engine::{
    Destination, Error as EngineError, ExportFormat, Identities, VerifyOptions, redact,
};

/// The condition a verifying export carries.
pub const VERIFIED: &str = "Verified";

type Done = Result<Action, ReconcileError>;

/// Whether this export asks for verification: a folder of Meltano state files (the
/// meltano-backend layout) is not one file to verify.
pub(super) fn requested(export: &StateExport) -> bool {
    export.spec.verify && ExportFormat::from(export.spec.format) != ExportFormat::MeltanoBackend
}

/// A succeeded export whose verification has not happened yet (the operator stopped between
/// the two, or the last try could not reach the database or the destination).
pub(super) fn pending(export: &StateExport) -> bool {
    let Some(status) = export.status.as_ref() else {
        return false;
    };
    requested(export)
        && status.phase.as_deref() == Some(phases::SUCCEEDED)
        && status.verified_at.is_none()
}

/// The conditions of an export written and about to be verified.
pub(super) fn verifying(url: &str) -> Vec<Desired> {
    vec![
        Desired::new(
            READY,
            false,
            "Verifying",
            format!("exported to {url}; verifying it"),
        ),
        Desired::new(RECONCILING, true, "Verifying", "verifying the export"),
        Desired::new(STALLED, false, "Verifying", "verifying the export"),
        Desired::new(
            VERIFIED,
            false,
            "Verifying",
            "reading the export back to restore it into a scratch schema",
        ),
    ]
}

/// Resumes a pending verification: connects to the store and the destination again.
pub(super) async fn resume(export: &StateExport, ctx: &Context, namespace: &str) -> Done {
    let status = export.status.clone().unwrap_or_default();
    let url = status.url.clone().unwrap_or_default();
    let key = format!("{namespace}/{}", export.name_any());
    let destination = match resolve_destination(ctx, namespace, &export.spec.destination, &url)
        .await
    {
        Ok(destination) => destination,
        Err(problem) => {
            return retry_later(ctx, export, &status, &key, problem.reason, &problem.message).await;
        }
    };
    let store = match access::store_for_operation(ctx, namespace, &export.spec.store_ref.name).await
    {
        Ok(Ok(store)) => store,
        Ok(Err((reason, message))) => {
            return retry_later(ctx, export, &status, &key, &reason, &message).await;
        }
        Err(error) => return Err(error),
    };
    run(ctx, export, &status, &destination, &store).await
}

/// Verifies the export's file and records the outcome over `previous` (the succeeded export's
/// status, as last written).
pub(super) async fn run(
    ctx: &Context,
    export: &StateExport,
    previous: &StateExportStatus,
    destination: &Destination,
    store: &OperatedStore,
) -> Done {
    let mut status = previous.clone();
    let url = status.url.clone().unwrap_or_default();
    let key = format!(
        "{}/{}",
        export.namespace().unwrap_or_default(),
        export.name_any()
    );
    // An encrypted export is verified with the identity its spec names (a CEL rule requires
    // one with `verify`); a Secret still missing or wrong is retried, as it can be fixed.
    let identities = match export
        .spec
        .encryption
        .as_ref()
        .and_then(|e| e.identity_secret_ref.as_ref())
    {
        Some(secret_ref) => {
            let namespace = export.namespace().unwrap_or_default();
            match access::read_identities(ctx, &namespace, secret_ref).await {
                Ok(identities) => identities,
                Err(problem) => {
                    return retry_later(
                        ctx,
                        export,
                        previous,
                        &key,
                        problem.reason,
                        &problem.message,
                    )
                    .await;
                }
            }
        }
        None => Identities::default(),
    };
    let options = VerifyOptions {
        expected_sha256: status.sha256.clone(),
        identities,
    };
    let outcome = match destination.open().await {
        Ok(reader) => store.engine.verify(reader, &options).await,
        Err(e) => Err(e),
    };
    let secrets: Vec<&str> = store.secrets.iter().map(String::as_str).collect();
    match outcome {
        Ok(report) => {
            let message = report.summary(&url);
            status.verified_at = Some(ctx.now().to_string());
            let desired = vec![
                Desired::new(READY, true, "ExportVerified", message.clone()),
                Desired::new(
                    RECONCILING,
                    false,
                    "ExportVerified",
                    "the export is verified",
                ),
                Desired::new(STALLED, false, "ExportVerified", "the export is verified"),
                Desired::new(VERIFIED, true, "ExportVerified", message),
            ];
            write(ctx, export, previous, status, desired).await?;
            ctx.reset_failures(&key).await;
            Ok(Action::await_change())
        }
        // The file is not what was exported, or does not restore: a backup that cannot be
        // trusted, for good.
        Err(e @ (EngineError::VerificationFailed(_) | EngineError::InvalidExport(_))) => {
            let message = destination.redact(&redact(&e.to_string(), &secrets));
            status.phase = Some(phases::FAILED.into());
            let mut desired = failed("VerificationFailed", &message, true);
            desired.push(Desired::new(VERIFIED, false, "VerificationFailed", message));
            write(ctx, export, previous, status, desired).await?;
            Ok(Action::await_change())
        }
        Err(e) => {
            let message = destination.redact(&redact(&e.to_string(), &secrets));
            retry_later(ctx, export, previous, &key, e.reason(), &message).await
        }
    }
}

/// A verification that could not run: said in the conditions, tried again after a backoff.
async fn retry_later(
    ctx: &Context,
    export: &StateExport,
    status: &StateExportStatus,
    key: &str,
    reason: &str,
    message: &str,
) -> Done {
    let message = format!("the export could not be verified yet, retrying: {message}");
    let mut desired = failed(reason, &message, false);
    desired.push(Desired::new(VERIFIED, false, reason, message));
    write(ctx, export, status, status.clone(), desired).await?;
    Ok(Action::requeue(ctx.next_backoff(key).await))
}

/// Writes `status` over `previous`; Ready's change is the Event (ExportVerified,
/// VerificationFailed).
async fn write(
    ctx: &Context,
    export: &StateExport,
    previous: &StateExportStatus,
    status: StateExportStatus,
    desired: Vec<Desired>,
) -> Result<StateExportStatus, ReconcileError> {
    let reference = export.object_ref(&());
    write_status(ctx, export, status, previous, desired, &reference).await
}
