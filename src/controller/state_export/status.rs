//! How a StateExport's status is written, one-shot or schedule alike.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Resource;
use kube::runtime::events::{Event, EventType};

use crate::api::state_export::{StateExport, StateExportStatus};
use crate::controller::conditions::{self, Desired, READY, RECONCILING, STALLED};
use crate::controller::context::{Context, ReconcileError};

/// Conditions of a failure; `final_` when no retry will follow.
pub fn failed(reason: &str, message: &str, final_: bool) -> Vec<Desired> {
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
pub async fn write_status(
    ctx: &Context,
    export: &StateExport,
    mut status: StateExportStatus,
    previous: &StateExportStatus,
    desired: Vec<Desired>,
    reference: &ObjectReference,
) -> Result<StateExportStatus, ReconcileError> {
    status.conditions = conditions::merge(
        &previous.conditions,
        &desired,
        export.meta().generation,
        ctx.now(),
    );
    let ready = conditions::find(&status.conditions, READY).cloned();
    ctx.apply_status(export, &status).await?;
    if let Some(ready) = ready {
        let before = conditions::find(&previous.conditions, READY);
        // Attempts announce themselves (one Event each, see `one_shot`).
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
