//! The StateExport reconciler. A one-shot export runs once; its status keeps the result for
//! good; a failed attempt is retried with backoff until `backoffLimit`, then Failed for good.
//! A StateExport with a schedule is run like a CronJob ([`scheduled`]): each run is a one-shot
//! child.

mod one_shot;
pub mod scheduled;
mod status;
mod verification;

use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;
use kube::runtime::controller::Action;

use crate::api::state_export::StateExport;
use crate::controller::context::{Context, ReconcileError};

/// Where an export writes, by the path it has always had.
pub use crate::controller::access::file_url;
pub use one_shot::retry_backoff;
pub use verification::VERIFIED;

pub async fn reconcile(
    export: Arc<StateExport>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    let started = std::time::Instant::now();
    let result = if export.spec.schedule.is_some() {
        scheduled::reconcile(export, ctx.clone()).await
    } else {
        one_shot::reconcile(export, ctx.clone()).await
    };
    ctx.metrics
        .observe_reconcile_duration("StateExport", started.elapsed());
    result
}

pub fn error_policy(
    export: Arc<StateExport>,
    error: &ReconcileError,
    _ctx: Arc<Context>,
) -> Action {
    tracing::warn!(export = %export.name_any(), %error, "reconcile failed");
    Action::requeue(Duration::from_secs(15))
}
