//! A runner upgrade: the framework's own migration as a Job, with a backup before it and a restore
//! of the backup when it fails.

use k8s_openapi::api::batch::v1::Job;
use kube::Resource;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;

use super::run::{Run, WAIT, current_conditions, is_permanent, migration_id};
use super::views;
use crate::api::labels::MIGRATION_LABEL;
use crate::api::runner::Runner;
use crate::api::state_store::StateStore;
use crate::controller::context::ReconcileError;
use crate::controller::runner::{self, JobOutcome};
use crate::engine::Store;

/// A runner upgrade: backup, Job, and the Job's outcome — a restore of the backup when it fails.
/// Each step is recorded in status before the next, so a restart resumes where it stopped.
pub(super) async fn runner_step(
    run: &mut Run<'_>,
    store: &StateStore,
    engine: &Store,
    runner: &Runner,
) -> Result<Action, ReconcileError> {
    let spec = &run.migration.spec;
    if spec.backup && run.status.backup_id.is_none() {
        // A backup made before a restart lost its status write is found by its tag.
        let id = migration_id(run.migration);
        let existing = engine.backup_of_operation(&id).await.ok().flatten();
        let backup = match existing {
            Some(backup) => backup,
            None => match engine.backup_with_reason("pre-migration").await {
                Ok(backup) => backup,
                Err(e) => {
                    let message = format!(
                        "could not back up the store before the migration: {}; nothing was run",
                        run.redact(&e.to_string())
                    );
                    return if is_permanent(&e) {
                        run.fail(e.reason(), message).await
                    } else {
                        run.status.started_at = None;
                        run.pending(e.reason(), message).await
                    };
                }
            },
        };
        run.status.backup_id = Some(backup.id);
        let desired = current_conditions(run);
        run.write(desired).await?;
    }
    let jobs: Api<Job> = Api::namespaced(run.ctx.client.clone(), &run.namespace);
    let job_name = run
        .status
        .job_name
        .clone()
        .unwrap_or_else(|| runner::job_name(&run.name, "upgrade"));
    let job = match jobs.get_opt(&job_name).await? {
        Some(job) => job,
        None if run.status.job_name.is_some() => {
            // The Job was recorded and is gone (deleted by hand): its outcome is unknown.
            return job_failed(
                run,
                store,
                engine,
                &job_name,
                "JobDeleted",
                "the Job was deleted before it finished",
                runner,
            )
            .await;
        }
        None => {
            let Some(owner) = run.migration.controller_owner_ref(&()) else {
                return run
                    .fail("InvalidObject", "the StateMigration has no uid".into())
                    .await;
            };
            let request = runner::JobRequest {
                name: job_name.clone(),
                namespace: &run.namespace,
                runner,
                default_command: engine.profile().migrate_command,
                store,
                owner,
                purpose: "upgrade",
                labels: [(MIGRATION_LABEL.to_owned(), run.name.clone())].into(),
            };
            let job = runner::create_or_adopt(&jobs, &runner::build_job(&request)).await?;
            run.status.job_name = Some(job_name.clone());
            run.status.message = Some(format!(
                "Job {job_name} is running `{}`",
                runner::command(runner, engine.profile().migrate_command).join(" ")
            ));
            let desired = current_conditions(run);
            run.write(desired).await?;
            run.ctx
                .notify(
                    &run.migration.object_ref(&()),
                    EventType::Normal,
                    "JobCreated",
                    "Migrate",
                    &format!("created Job {job_name}"),
                )
                .await;
            job
        }
    };
    run.status.job_name = Some(job_name.clone());
    match runner::outcome(&job) {
        JobOutcome::Running => {
            let desired = current_conditions(run);
            run.write(desired).await?;
            Ok(Action::requeue(WAIT))
        }
        JobOutcome::Succeeded => {
            let message = match engine.status().await {
                Ok(report) => {
                    run.status.to_version = Some(report.current_version);
                    format!(
                        "Job {job_name} succeeded: state schema version {} → {}{}",
                        run.status.from_version.unwrap_or_default(),
                        report.current_version,
                        report
                            .versions
                            .iter()
                            .map(|(k, v)| format!(", {k} {v}"))
                            .collect::<String>()
                    )
                }
                Err(e) => format!(
                    "Job {job_name} succeeded (the store could not be read afterwards: {})",
                    run.redact(&e.to_string())
                ),
            };
            let approved = run.approved_condition().into_iter().collect();
            run.succeed(message, approved).await
        }
        JobOutcome::Failed { reason, message } => {
            job_failed(run, store, engine, &job_name, &reason, &message, runner).await
        }
    }
}

/// Restores the backup after a failed runner Job (when there is one) and fails the migration,
/// saying what was done and what to do.
async fn job_failed(
    run: &mut Run<'_>,
    store: &StateStore,
    engine: &Store,
    job_name: &str,
    reason: &str,
    detail: &str,
    runner: &Runner,
) -> Result<Action, ReconcileError> {
    let what = format!(
        "Job {job_name} {}",
        runner::describe_failure(reason, detail, runner.active_deadline_seconds)
    );
    let Some(backup_id) = run.status.backup_id.clone() else {
        let message = format!(
            "{what}; nothing was restored (backup: false): check the store with `statekeeper \
             state status` and the Job's logs"
        );
        return run.fail(reason, message).await;
    };
    match engine.rollback(Some(&backup_id)).await {
        Ok(report) => {
            run.status.restored = Some(true);
            run.status.to_version = Some(report.to_version);
            let replaced = report.pre_rollback_backup.as_ref().map(|b| b.id.clone());
            let views = views::after_restore(run, store, engine, replaced.as_deref()).await;
            let message = format!(
                "{what}; the store was restored from backup {backup_id} (version {}){}{}. Read \
                 the Job's logs, fix the cause, and create a new StateMigration",
                report.to_version,
                replaced
                    .map(|id| format!("; what the Job left is kept in backup {id}"))
                    .unwrap_or_default(),
                views::note(run)
            );
            run.ctx
                .notify(
                    &run.migration.object_ref(&()),
                    EventType::Warning,
                    "Restored",
                    "Migrate",
                    &format!("restored backup {backup_id} after {what}"),
                )
                .await;
            let action = run
                .fail_with(reason, message, views.conditions.clone())
                .await?;
            Ok(views.then(action))
        }
        Err(e) => {
            run.status.restored = Some(false);
            let message = format!(
                "{what}, and restoring backup {backup_id} failed: {}. Restore it by hand: \
                 statekeeper state rollback --framework {} --schema {} --backup-id {backup_id}",
                run.redact(&e.to_string()),
                engine.framework(),
                engine.schema()
            );
            run.fail("RestoreFailed", message).await
        }
    }
}
