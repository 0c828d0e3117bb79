//! The StateMigration reconciler: plan the operation from the store as it is, stop there for a
//! dry run, wait for an approval of exactly that plan when one is required, wait for the store's
//! queue (earlier migrations, running exports, a framework janitor Job), then run it once.
//! In-database operations are one engine transaction; a runner upgrade is a backup, a Job, and a
//! restore of the backup when the Job fails. A finished migration is never run again.

mod in_database;
mod inputs;
mod plan;
mod queue;
mod requested;
mod run;
mod runner_job;
mod views;

use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;
use kube::runtime::controller::Action;

use in_database::{execute_in_database, resume_in_database};
use plan::{Done, approval, make_plan, record_plan};
use queue::queue_position;
use run::{Run, migration_id};
use runner_job::runner_step;

use crate::api::phases;
use crate::api::state_migration::StateMigration;
use crate::api::state_store::StateStore;
use crate::controller::access;
use crate::controller::conditions::{Desired, READY, RECONCILING, STALLED};
use crate::controller::context::{Context, ReconcileError};
use crate::engine::{Plan, Store};

pub use requested::Requested;
pub use run::{APPROVED, PLANNED, SUCCEEDED};
pub use views::VIEWS_CURRENT;

pub async fn reconcile(
    migration: Arc<StateMigration>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    let started = std::time::Instant::now();
    let namespace = migration.namespace().ok_or(ReconcileError::NotNamespaced)?;
    let previous = migration.status.clone().unwrap_or_default();
    // A finished migration is a record: never run again, whatever changes. Only the views of
    // its restore may still be re-pointed.
    let finished = phases::migration_is_finished(previous.phase.as_deref());
    if finished && !views::needs_attention(&previous) {
        return Ok(Action::await_change());
    }
    let mut run = Run {
        ctx: &ctx,
        migration: &migration,
        name: migration.name_any(),
        namespace,
        status: previous.clone(),
        previous,
        secrets: Vec::new(),
    };
    let action = if finished {
        views::follow(&mut run).await
    } else {
        step(&mut run).await
    };
    let outcome = run
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == READY)
        .map_or("Unknown".to_owned(), |c| c.reason.clone());
    ctx.metrics
        .record_reconcile("StateMigration", &outcome, started.elapsed());
    action
}

async fn step(run: &mut Run<'_>) -> Done {
    let spec = &run.migration.spec;
    let requested = match Requested::from_spec(spec) {
        Ok(requested) => requested,
        Err(message) => return run.fail("InvalidSpec", message).await,
    };
    run.status.operation = Some(requested.name().into());
    let (store, engine) = match connect(run).await {
        Ok(connected) => connected,
        Err(done) => return done,
    };

    if run.previous.phase.as_deref() == Some(phases::RUNNING)
        && let Requested::RunnerUpgrade { runner } = &requested
    {
        return runner_step(run, &store, &engine, runner).await;
    }
    // Interrupted by a restart (Running) or by a lost connection (Pending): if the transaction
    // committed, its tagged backup says so, and the operation must not run twice (a second
    // rollback to "the newest backup" would undo the first).
    if matches!(
        run.previous.phase.as_deref(),
        Some(phases::RUNNING | phases::PENDING)
    ) && !matches!(requested, Requested::RunnerUpgrade { .. })
        && let Some(action) = resume_in_database(run, &store, &engine, &requested).await?
    {
        return Ok(action);
    }
    // Without a backup nothing marks a committed transaction: after a restart mid-operation only
    // an unchanged store (the same plan hash) proves that nothing was applied.
    let unmarked_resume = run.previous.phase.as_deref() == Some(phases::RUNNING) && !spec.backup;
    let recorded_hash = run.previous.plan_hash.clone();

    let (plan, inputs) = match make_plan(run, &requested, &store, &engine).await {
        Ok(planned) => planned,
        Err(done) => return done,
    };
    if unmarked_resume && recorded_hash.as_deref() != Some(plan.hash.as_str()) {
        let message = "the operator restarted while the operation ran, and the store has changed \
                       since its plan: with backup: false nothing records whether the operation \
                       committed. Check the store (`statekeeper state status`) and create a new \
                       StateMigration if needed"
            .to_owned();
        return run.fail("Interrupted", message).await;
    }
    record_plan(&mut run.status, &plan);
    if spec.dry_run {
        return finish_dry_run(run, &plan).await;
    }
    let approved = match approval(run, &requested, &store, &plan).await {
        Ok(approved) => approved,
        Err(done) => return done,
    };

    // One operation at a time per store, in creation order.
    match queue_position(run, &store).await? {
        Some(queue) => {
            let message = format!(
                "queued behind {} ({} ahead)",
                queue.waiting_for, queue.position
            );
            run.status.queue = Some(queue);
            return run
                .wait(phases::QUEUED, "Queued", message, vec![approved])
                .await;
        }
        None => run.status.queue = None,
    }

    if plan.no_op {
        run.status.from_version = Some(plan.from_version);
        run.status.to_version = plan.to_version;
        run.status.started_at = Some(run.ctx.now().to_string());
        let message = format!(
            "nothing to do: the store is already at version {}",
            plan.from_version
        );
        return run.succeed(message, vec![approved]).await;
    }
    record_start(run, &requested, &plan, approved).await?;
    if let Requested::RunnerUpgrade { runner } = &requested {
        return runner_step(run, &store, &engine, runner).await;
    }
    execute_in_database(run, &store, &engine, &requested, inputs).await
}

/// The store the migration works on and its engine, acting for this migration; or the
/// migration waits for it (missing, unreachable).
async fn connect(run: &mut Run<'_>) -> Result<(StateStore, Store), Done> {
    let spec = &run.migration.spec;
    match access::store_for_operation(run.ctx, &run.namespace, &spec.store_ref.name).await {
        Ok(Ok(operated)) => {
            run.secrets.extend(operated.secrets);
            let engine = operated
                .engine
                .with_actor(format!("statemigration:{}/{}", run.namespace, run.name))
                .with_operation_id(migration_id(run.migration))
                .with_backup_before_change(spec.backup);
            Ok((operated.store, engine))
        }
        Ok(Err((reason, message))) => Err(run.pending(&reason, message).await),
        Err(error) => Err(Err(error)),
    }
}

/// A dry run ends with its plan recorded: nothing is changed.
async fn finish_dry_run(run: &mut Run<'_>, plan: &Plan) -> Done {
    run.status.phase = Some(phases::PLANNED.into());
    run.status.queue = None;
    let message = format!(
        "dry run: plan {} recorded in status.plan; nothing was changed",
        plan.hash
    );
    run.status.message = Some(message.clone());
    let mut desired = vec![
        Desired::new(READY, true, "Planned", message.clone()),
        Desired::new(RECONCILING, false, "Planned", "dry run: nothing more to do"),
        Desired::new(STALLED, false, "Planned", "dry run: nothing more to do"),
    ];
    desired.extend(run.plan_conditions());
    run.write(desired).await?;
    Ok(Action::await_change())
}

/// Records that the operation runs, before it does: after a restart, the status says so.
async fn record_start(
    run: &mut Run<'_>,
    requested: &Requested,
    plan: &Plan,
    approved: Desired,
) -> Result<(), ReconcileError> {
    run.status.phase = Some(phases::RUNNING.into());
    run.status.started_at = Some(run.ctx.now().to_string());
    run.status.from_version = Some(plan.from_version);
    let message = format!("running the {} (plan {})", requested.name(), plan.hash);
    run.status.message = Some(message.clone());
    let mut desired = vec![
        Desired::new(READY, false, "Running", message.clone()),
        Desired::new(RECONCILING, true, "Running", message),
        Desired::new(STALLED, false, "Running", "the operation is running"),
        approved,
    ];
    desired.extend(run.plan_conditions());
    run.write(desired).await
}

pub fn error_policy(
    migration: Arc<StateMigration>,
    error: &ReconcileError,
    _ctx: Arc<Context>,
) -> Action {
    tracing::warn!(migration = %migration.name_any(), %error, "reconcile failed");
    Action::requeue(Duration::from_secs(15))
}
