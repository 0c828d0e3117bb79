//! A SQLMesh StateStore's views after its restores, as the store reports them: the
//! `VirtualLayerStale` condition, derived from the newest StateMigration of the store whose
//! restore changed what its views should select (its `status.virtualLayer`, which only the
//! migration's reconciler writes), and whether the store's janitor must wait: a janitor run
//! between a restore and the re-point could drop the physical tables the restored state still
//! references. The order is backup, restore, re-point, janitor.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, ListParams};

use super::conditions::{self, Desired};
use super::context::Context;
use crate::api::state_migration::{StateMigration, VirtualLayerStatus};

/// True while the newest restore of the store left views that select from the replaced
/// state's tables (stale, or being re-pointed).
pub const VIRTUAL_LAYER_STALE: &str = "VirtualLayerStale";

/// What the store's views mean for its status and its janitor.
#[derive(Debug, Default)]
pub struct ViewsVerdict {
    /// `VirtualLayerStale`, once a restore of the store has reported its views.
    pub condition: Option<Desired>,
    /// Why the janitor must not run now, if it must not.
    pub janitor_waits_for: Option<String>,
}

/// The verdict from the store's StateMigrations (pure, for tests).
pub fn decide(store: &str, migrations: &[StateMigration]) -> ViewsVerdict {
    let newest = migrations
        .iter()
        .filter(|m| m.spec.store_ref.name == store)
        .filter_map(|m| Some((m, m.status.as_ref()?.virtual_layer.as_ref()?)))
        .max_by_key(|(m, _)| order(m));
    let Some((migration, vl)) = newest else {
        return ViewsVerdict::default();
    };
    let name = migration.name_any();
    if !vl.is_unsettled() {
        return ViewsVerdict {
            condition: Some(Desired::new(
                VIRTUAL_LAYER_STALE,
                false,
                "ViewsCurrent",
                format!(
                    "the views agree with the state StateMigration {name} restored: {}",
                    vl.message
                ),
            )),
            janitor_waits_for: None,
        };
    }
    let reason = if vl.state == VirtualLayerStatus::REPOINTING {
        VirtualLayerStatus::REPOINTING
    } else {
        vl.reason.as_str()
    };
    ViewsVerdict {
        condition: Some(Desired::new(
            VIRTUAL_LAYER_STALE,
            true,
            reason,
            format!("StateMigration {name} restored the store: {}", vl.message),
        )),
        janitor_waits_for: Some(format!(
            "the views StateMigration {name} left are {} (status.virtualLayer of {name}): the \
             janitor could drop tables the restored state references",
            vl.state.to_lowercase()
        )),
    }
}

/// The verdict for the store `store` in `namespace`. When its migrations cannot be listed, the
/// condition last reported stands and the janitor waits: it is the one that drops tables.
pub async fn verdict(
    ctx: &Context,
    namespace: &str,
    store: &str,
    previous: &[Condition],
) -> ViewsVerdict {
    let api: Api<StateMigration> = Api::namespaced(ctx.client.clone(), namespace);
    match api.list(&ListParams::default()).await {
        Ok(list) => decide(store, &list.items),
        Err(e) => ViewsVerdict {
            condition: conditions::find(previous, VIRTUAL_LAYER_STALE).map(|c| {
                Desired::new(
                    VIRTUAL_LAYER_STALE,
                    c.status == "True",
                    c.reason.clone(),
                    c.message.clone(),
                )
            }),
            janitor_waits_for: Some(format!(
                "the StateMigrations cannot be listed to tell whether a restore left stale views \
                 ({e})"
            )),
        },
    }
}

/// Newest last: by when the migration finished, then when it was created, then its name.
fn order(migration: &StateMigration) -> (Option<Timestamp>, Option<Timestamp>, String) {
    let finished = migration
        .status
        .as_ref()
        .and_then(|s| s.finished_at.as_deref())
        .and_then(|t| t.parse().ok());
    let created = migration.metadata.creation_timestamp.as_ref().map(|t| t.0);
    (finished, created, migration.name_any())
}
