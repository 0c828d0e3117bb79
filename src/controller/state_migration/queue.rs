//! One operation at a time per store, in creation order: what a migration waits for.

use kube::api::{Api, ListParams};
use kube::{Resource, ResourceExt};

use super::run::Run;
use crate::api::phases;
use crate::api::state_export::StateExport;
use crate::api::state_migration::{QueueStatus, StateMigration};
use crate::api::state_store::StateStore;
use crate::controller::context::ReconcileError;

/// The first operation this migration must wait for, if any: a migration of the same store that
/// runs or was created earlier and is not finished, a running export of the store, or the
/// store's framework janitor Job.
pub(super) async fn queue_position(
    run: &Run<'_>,
    store: &StateStore,
) -> Result<Option<QueueStatus>, ReconcileError> {
    let store_name = &run.migration.spec.store_ref.name;
    let migrations: Api<StateMigration> = Api::namespaced(run.ctx.client.clone(), &run.namespace);
    let me = order_key(run.migration);
    let mut ahead: Vec<(bool, (String, String), String)> = migrations
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|m| m.spec.store_ref.name == *store_name && m.name_any() != run.name)
        .filter(|m| !m.spec.dry_run)
        .filter_map(|m| {
            let phase = m.status.as_ref().and_then(|s| s.phase.clone());
            if phases::migration_is_finished(phase.as_deref()) {
                return None;
            }
            let running = phase.as_deref() == Some(phases::RUNNING);
            let key = order_key(&m);
            (running || key < me).then(|| {
                (
                    !running,
                    key,
                    format!(
                        "StateMigration {} ({})",
                        m.name_any(),
                        phase.unwrap_or_else(|| phases::PENDING.into())
                    ),
                )
            })
        })
        .collect();
    let exports: Api<StateExport> = Api::namespaced(run.ctx.client.clone(), &run.namespace);
    for export in exports.list(&ListParams::default()).await?.items {
        let running =
            export.status.as_ref().and_then(|s| s.phase.as_deref()) == Some(phases::RUNNING);
        if export.spec.store_ref.name == *store_name && export.spec.schedule.is_none() && running {
            ahead.push((
                false,
                order_key(&export),
                format!("StateExport {} (Running)", export.name_any()),
            ));
        }
    }
    if let Some(job) = store
        .status
        .as_ref()
        .and_then(|s| s.janitor.as_ref())
        .and_then(|j| j.active_job.clone())
    {
        ahead.push((
            false,
            (String::new(), String::new()),
            format!("the store's janitor Job {job} (Running)"),
        ));
    }
    ahead.sort();
    Ok(ahead.first().map(|(_, _, what)| QueueStatus {
        position: ahead.len() as u32,
        waiting_for: what.clone(),
    }))
}

/// Creation order: creation time, then name.
fn order_key<K: Resource>(object: &K) -> (String, String) {
    (
        object
            .meta()
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.to_string())
            .unwrap_or_default(),
        object.meta().name.clone().unwrap_or_default(),
    )
}
