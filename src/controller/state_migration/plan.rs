//! The plan of a migration, made from the store as it is, and the approval bound to exactly that
//! plan.

use kube::runtime::controller::Action;

use super::inputs::{Inputs, Stop, resolve_inputs};
use super::requested::Requested;
use super::run::{APPROVED, Run, is_permanent};
use crate::api::phases;
use crate::api::state_migration::{
    MigrationPlan, PlannedChanges, PlannedTable, StateMigrationStatus,
};
use crate::api::state_store::StateStore;
use crate::controller::conditions::Desired;
use crate::controller::context::ReconcileError;
use crate::controller::runner;
use crate::engine::{Operation, Plan, Store, runner_description};

/// The reconcile ends here, with this result.
pub(super) type Done = Result<Action, ReconcileError>;

/// The operation's inputs and its plan from the engine, or the end of the reconcile: inputs
/// that cannot be used (yet), a plan the engine refuses.
pub(super) async fn make_plan(
    run: &mut Run<'_>,
    requested: &Requested,
    store: &StateStore,
    engine: &Store,
) -> Result<(Plan, Inputs), Done> {
    let inputs = match resolve_inputs(run, requested).await {
        Ok(inputs) => inputs,
        Err(Stop::Pending(reason, message)) => return Err(run.pending(&reason, message).await),
        Err(Stop::Fail(reason, message)) => return Err(run.fail(&reason, message).await),
    };
    let runner_text = match requested {
        Requested::RunnerUpgrade { runner } => runner_description(
            engine.profile(),
            &runner.image,
            &runner::command(runner, engine.profile().migrate_command),
        ),
        _ => String::new(),
    };
    let operation = match (requested, &inputs) {
        (Requested::Upgrade { target }, _) => Operation::Upgrade { target: *target },
        (Requested::RunnerUpgrade { .. }, _) => Operation::RunnerUpgrade {
            runner: &runner_text,
        },
        (Requested::Rollback { backup_id }, _) => Operation::Rollback {
            backup_id: backup_id.as_deref(),
        },
        (Requested::Reset, _) => Operation::Reset {
            allow_reset: store.spec.allow_reset,
        },
        (Requested::Import, Inputs::Import(input)) => Operation::Import {
            source: &input.url,
            mode: input.mode,
            expected_sha256: input.expected_sha256.as_deref(),
            selection: &input.selection,
            backup_id: None,
        },
        (Requested::Copy { .. }, Inputs::Copy { source, label }) => Operation::Copy {
            from: source,
            label,
        },
        _ => {
            return Err(run
                .fail("InvalidSpec", "the operation's inputs are missing".into())
                .await);
        }
    };
    let plan = match engine.plan(operation, run.migration.spec.backup).await {
        Ok(plan) => plan,
        Err(e) => {
            let message = run.redact(&e.to_string());
            return Err(if is_permanent(&e) {
                run.fail(e.reason(), format!("{message}; nothing was changed"))
                    .await
            } else {
                run.pending(e.reason(), message).await
            });
        }
    };
    Ok((plan, inputs))
}

pub(super) fn record_plan(status: &mut StateMigrationStatus, plan: &Plan) {
    status.plan_hash = Some(plan.hash.clone());
    status.plan = Some(MigrationPlan {
        operation: plan.operation.clone(),
        framework: plan.framework.to_string(),
        schema: plan.schema.clone(),
        from_version: plan.from_version,
        to_version: plan.to_version,
        steps: plan.steps.clone(),
        tables: plan
            .tables
            .iter()
            .map(|t| PlannedTable {
                name: t.name.clone(),
                rows: t.rows,
            })
            .collect(),
        backup: plan.backup.clone(),
        job: plan.job.clone(),
        source: plan.source.clone(),
        changes: plan.changes.as_ref().map(|c| PlannedChanges {
            compared: c.compared.clone(),
            summary: c.summary.clone(),
        }),
    });
}

/// The `Approved` condition when the migration may run: no approval is required, or the one
/// given is for exactly this plan. Otherwise the migration waits for one, saying which.
pub(super) async fn approval(
    run: &mut Run<'_>,
    requested: &Requested,
    store: &StateStore,
    plan: &Plan,
) -> Result<Desired, Done> {
    let spec = &run.migration.spec;
    let approval_required = spec.require_approval
        || store.spec.require_approval
        || matches!(requested, Requested::Reset);
    if !approval_required {
        return Ok(Desired::new(
            APPROVED,
            true,
            "NotRequired",
            "no approval is required",
        ));
    }
    let (reason, message) = match spec.approval.as_ref().map(|a| a.plan_hash.as_str()) {
        Some(hash) if hash == plan.hash => {
            return Ok(Desired::new(
                APPROVED,
                true,
                "Approved",
                format!("plan {hash} is approved"),
            ));
        }
        Some(stale) => (
            "StaleApproval",
            format!(
                "spec.approval.planHash is {stale}, but the plan is now {}: the store (or the \
                 request's inputs) changed since the approved plan was computed, so that \
                 approval does not apply; review status.plan and approve {}",
                plan.hash, plan.hash
            ),
        ),
        None => {
            let why = if matches!(requested, Requested::Reset) {
                "a reset always needs an approval"
            } else if store.spec.require_approval {
                "the StateStore requires approval"
            } else {
                "spec.requireApproval is set"
            };
            (
                "ApprovalPending",
                format!(
                    "{why}: review status.plan, then set spec.approval.planHash: \"{}\"",
                    plan.hash
                ),
            )
        }
    };
    let condition = Desired::new(APPROVED, false, reason, message.clone());
    Err(run
        .wait(
            phases::AWAITING_APPROVAL,
            "ApprovalPending",
            message,
            vec![condition],
        )
        .await)
}
