//! The operations that are one engine transaction (upgrade, rollback, reset, import, copy): run,
//! or after a restart, found committed.

use kube::runtime::controller::Action;

use super::inputs::Inputs;
use super::requested::Requested;
use super::run::{Run, migration_id};
use super::views::{self, Views};
use crate::api::phases;
use crate::api::state_migration::QueueStatus;
use crate::api::state_store::StateStore;
use crate::controller::context::ReconcileError;
use crate::engine::{Error as EngineError, ImportOptions, ResetApproval, Store};

/// After a restart during an in-database operation: its transaction either committed (and then
/// the backup it made, tagged with this migration, exists) or it did not (and the store is as
/// it was: the operation runs again, after the usual checks). Returns an action when the
/// migration is decided here.
pub(super) async fn resume_in_database(
    run: &mut Run<'_>,
    store: &StateStore,
    engine: &Store,
    requested: &Requested,
) -> Result<Option<Action>, ReconcileError> {
    let id = migration_id(run.migration);
    let committed = match engine.backup_of_operation(&id).await {
        Ok(backup) => backup,
        Err(e) => {
            let message = run.redact(&e.to_string());
            return run.pending(e.reason(), message).await.map(Some);
        }
    };
    if let Some(backup) = committed {
        run.status.backup_id = Some(backup.id.clone());
        let message = format!(
            "the {} completed before the operator restarted (it made backup {})",
            run.status.operation.clone().unwrap_or_default(),
            backup.id
        );
        let replaced = Some(backup.id.as_str());
        let views = restored_views(run, store, engine, requested, replaced).await;
        let mut extra: Vec<_> = run.approved_condition().into_iter().collect();
        extra.extend(views.conditions.iter().cloned());
        let action = run.succeed(message, extra).await?;
        return Ok(Some(views.then(action)));
    }
    // Not committed (with a backup, its tag would exist; without one, the caller compares the
    // new plan with the recorded one): planned and run again like a new request.
    Ok(None)
}

pub(super) async fn execute_in_database(
    run: &mut Run<'_>,
    store: &StateStore,
    engine: &Store,
    requested: &Requested,
    inputs: Inputs,
) -> Result<Action, ReconcileError> {
    let outcome: Result<(Option<String>, i32, String), EngineError> = match (requested, inputs) {
        (Requested::Upgrade { target }, _) => engine.upgrade(*target).await.map(|r| {
            (
                r.backup.map(|b| b.id),
                r.to_version,
                format!(
                    "upgraded from version {} to {}: {} step(s) applied",
                    r.from_version,
                    r.to_version,
                    r.applied.len()
                ),
            )
        }),
        (Requested::Rollback { backup_id }, _) => {
            engine.rollback(backup_id.as_deref()).await.map(|r| {
                (
                    r.pre_rollback_backup.map(|b| b.id),
                    r.to_version,
                    format!(
                        "restored backup {} ({} rows, version {})",
                        r.restored_backup.id, r.rows_restored, r.to_version
                    ),
                )
            })
        }
        (Requested::Reset, _) => engine
            .reset(ResetApproval {
                allow_reset: store.spec.allow_reset,
                approved: true,
            })
            .await
            .map(|r| {
                let backup = r.backup.map(|b| b.id);
                let message = format!(
                    "reset: {} tables removed; the removed state is kept in backup {}",
                    r.tables_reset,
                    backup.as_deref().unwrap_or("(none)")
                );
                (backup, 0, message)
            }),
        (Requested::Import, Inputs::Import(input)) => {
            let options = ImportOptions {
                mode: input.mode,
                expected_sha256: input.expected_sha256.clone(),
                identities: input.identities.clone(),
                selection: input.selection.clone(),
            };
            match input.destination.open().await {
                Ok(reader) => engine.import(reader, &options).await.map(|r| {
                    let message = format!(
                        "imported {} ({} format, {} bytes, sha256 {}); {}",
                        input.url,
                        r.format,
                        r.bytes,
                        r.sha256,
                        r.effect()
                    );
                    (r.backup.map(|b| b.id), r.schema_version, message)
                }),
                Err(e) => Err(e),
            }
        }
        (Requested::Copy { store: name }, Inputs::Copy { source, .. }) => {
            engine.copy_from(&source).await.map(|r| {
                (
                    r.backup.map(|b| b.id),
                    r.schema_version,
                    format!(
                        "copied StateStore {name}: {} rows in {} tables",
                        r.rows.values().sum::<u64>(),
                        r.rows.len()
                    ),
                )
            })
        }
        _ => Err(EngineError::InvalidOperation(
            "the operation's inputs are missing".into(),
        )),
    };
    match outcome {
        Ok((backup, to_version, message)) => {
            run.status.backup_id = backup.clone();
            run.status.to_version = Some(to_version);
            run.ctx
                .reset_failures(&format!("{}/{}", run.namespace, run.name))
                .await;
            let views = restored_views(run, store, engine, requested, backup.as_deref()).await;
            let mut extra: Vec<_> = run.approved_condition().into_iter().collect();
            extra.extend(views.conditions.iter().cloned());
            let message = format!("{message}{}", views::note(run));
            let action = run.succeed(message, extra).await?;
            Ok(views.then(action))
        }
        Err(EngineError::Busy { .. }) => {
            run.status.started_at = None;
            let message = "the store is busy (another operation holds its lock, e.g. a janitor \
                           run or a framework writer): waiting for it"
                .to_owned();
            run.status.queue = Some(QueueStatus {
                position: 1,
                waiting_for: "the store's lock".into(),
            });
            let approved = run.approved_condition().into_iter().collect();
            run.wait(phases::QUEUED, "StoreBusy", message, approved)
                .await
        }
        Err(e) if e.is_connection_error() => {
            // The transaction committed whole or changed nothing, and every operation is
            // idempotent: it runs again once the store is back.
            let message = format!(
                "{}; the operation is all-or-nothing and runs again once the database answers",
                run.redact(&e.to_string())
            );
            run.status.started_at = None;
            run.pending(e.reason(), message).await
        }
        Err(e) => {
            let message = format!(
                "{}; the store is unchanged. Fix the cause, then create a new StateMigration \
                 (this one is finished)",
                run.redact(&e.to_string())
            );
            run.fail(e.reason(), message).await
        }
    }
}

/// The views after a rollback or an import (the restores; `replaced` is the backup of the state
/// they replaced): see `views::after_restore`. Other operations leave the views alone.
async fn restored_views(
    run: &mut Run<'_>,
    store: &StateStore,
    engine: &Store,
    requested: &Requested,
    replaced: Option<&str>,
) -> Views {
    match requested {
        Requested::Rollback { .. } | Requested::Import => {
            views::after_restore(run, store, engine, replaced).await
        }
        _ => Views::none(),
    }
}
