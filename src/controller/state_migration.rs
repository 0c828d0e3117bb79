//! The StateMigration reconciler: plan the operation from the store as it is, stop there for a
//! dry run, wait for an approval of exactly that plan when one is required, wait for the store's
//! queue (earlier migrations, running exports, a framework janitor Job), then run it once.
//! In-database operations are one engine transaction; a runner upgrade is a backup, a Job, and a
//! restore of the backup when the Job fails. A finished migration is never run again.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::conditions::{self, Desired, READY, RECONCILING, STALLED};
use super::runner::{self, JobOutcome};
use super::state_export::{self, resolve_destination};
use super::state_store;
use super::{Context, FIELD_MANAGER, ReconcileError};
use crate::api::runner::Runner;
use crate::api::state_export::StateExport;
use crate::api::state_migration::{
    MigrationPlan, PlannedTable, QueueStatus, StateMigration, StateMigrationSpec,
    StateMigrationStatus,
};
use crate::api::state_store::StateStore;
use crate::engine::{
    Destination, Error as EngineError, ImportMode, ImportOptions, Operation, Plan, ResetApproval,
    Store, redact,
};

pub const PHASE_PENDING: &str = "Pending";
pub const PHASE_QUEUED: &str = "Queued";
pub const PHASE_AWAITING_APPROVAL: &str = "AwaitingApproval";
pub const PHASE_PLANNED: &str = "Planned";
pub const PHASE_RUNNING: &str = "Running";
pub const PHASE_SUCCEEDED: &str = "Succeeded";
pub const PHASE_FAILED: &str = "Failed";

pub const PLANNED: &str = "Planned";
pub const APPROVED: &str = "Approved";
pub const SUCCEEDED: &str = "Succeeded";

/// How often a waiting migration looks again (approval, queue, a running Job).
const WAIT: Duration = Duration::from_secs(15);

/// A migration that will never run again.
pub fn is_finished(phase: Option<&str>) -> bool {
    matches!(phase, Some(PHASE_SUCCEEDED | PHASE_FAILED | PHASE_PLANNED))
}

/// The requested operation, as the spec says it.
#[derive(Clone, Debug)]
pub enum Requested {
    Upgrade { target: Option<i32> },
    RunnerUpgrade { runner: Box<Runner> },
    Rollback { backup_id: Option<String> },
    Reset,
    Import,
    Copy { store: String },
}

impl Requested {
    /// The operation of a spec, or why the spec cannot work (the CRD's rules catch most of it;
    /// this is the last word for objects created before a rule existed).
    pub fn from_spec(spec: &StateMigrationSpec) -> Result<Self, String> {
        let set = [
            spec.upgrade.is_some(),
            spec.rollback.is_some(),
            spec.reset.is_some(),
            spec.import.is_some(),
            spec.copy_from.is_some(),
        ]
        .iter()
        .filter(|s| **s)
        .count();
        if set != 1 {
            return Err(
                "set exactly one operation: upgrade, rollback, reset, import or copyFrom".into(),
            );
        }
        if let Some(upgrade) = &spec.upgrade {
            return match (&upgrade.target_version, &upgrade.runner) {
                (Some(_), Some(_)) => Err(
                    "upgrade takes either targetVersion (statekeeper's schema) or runner (the \
                     framework's own migration), not both"
                        .into(),
                ),
                (_, Some(runner)) => Ok(Requested::RunnerUpgrade {
                    runner: Box::new(runner.clone()),
                }),
                (None, None) => Ok(Requested::Upgrade { target: None }),
                (Some(IntOrString::Int(version)), None) if *version >= 1 => {
                    Ok(Requested::Upgrade {
                        target: Some(*version),
                    })
                }
                (Some(IntOrString::String(text)), None) if text == "latest" => {
                    Ok(Requested::Upgrade { target: None })
                }
                (Some(IntOrString::String(text)), None)
                    if text.parse::<i32>().is_ok_and(|v| v >= 1) =>
                {
                    Ok(Requested::Upgrade {
                        target: text.parse().ok(),
                    })
                }
                (Some(other), None) => Err(format!(
                    "upgrade.targetVersion must be a version number (1 or more) or \"latest\", not {}",
                    match other {
                        IntOrString::Int(v) => v.to_string(),
                        IntOrString::String(s) => format!("\"{s}\""),
                    }
                )),
            };
        }
        if let Some(rollback) = &spec.rollback {
            return Ok(Requested::Rollback {
                backup_id: rollback.backup_id.clone(),
            });
        }
        if spec.reset.is_some() {
            return Ok(Requested::Reset);
        }
        if let Some(import) = &spec.import {
            if import.source.is_some() == import.from_export.is_some() {
                return Err("set either import.source or import.fromExport".into());
            }
            return Ok(Requested::Import);
        }
        match &spec.copy_from {
            Some(copy) if copy.store_ref.name == spec.store_ref.name => {
                Err("copyFrom names the store itself: name another StateStore".into())
            }
            Some(copy) => Ok(Requested::Copy {
                store: copy.store_ref.name.clone(),
            }),
            None => Err("no operation".into()),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Requested::Upgrade { .. } | Requested::RunnerUpgrade { .. } => "upgrade",
            Requested::Rollback { .. } => "rollback",
            Requested::Reset => "reset",
            Requested::Import => "import",
            Requested::Copy { .. } => "copy",
        }
    }
}

/// The file an import reads, resolved from `import.source` or a finished StateExport.
struct ImportInput {
    url: String,
    expected_sha256: Option<String>,
    mode: ImportMode,
    destination: Destination,
}

/// Everything an operation needs besides the store: resolved once per reconcile.
enum Inputs {
    None,
    Import(ImportInput),
    Copy { source: Store, label: String },
}

/// Engine errors that no retry can fix: the migration fails for good.
fn is_permanent(error: &EngineError) -> bool {
    matches!(
        error,
        EngineError::InvalidOperation(_)
            | EngineError::ResetRefused(_)
            | EngineError::DowngradeRefused { .. }
            | EngineError::UnknownTargetVersion { .. }
            | EngineError::SchemaNewer { .. }
            | EngineError::ChecksumMismatch { .. }
            | EngineError::BackupNotFound { .. }
            | EngineError::NoBackups { .. }
            | EngineError::IncompatibleBackup { .. }
            | EngineError::WrongFramework { .. }
            | EngineError::OtherFrameworkInDatabase { .. }
            | EngineError::UnsupportedOperation { .. }
            | EngineError::InvalidExport(_)
            | EngineError::InvalidSchemaName { .. }
            | EngineError::InvalidDestination { .. }
    )
}

/// One reconcile's view: the object, its status so far and the secrets to keep out of it.
struct Run<'a> {
    ctx: &'a Context,
    migration: &'a StateMigration,
    namespace: String,
    name: String,
    previous: StateMigrationStatus,
    status: StateMigrationStatus,
    secrets: Vec<String>,
}

impl Run<'_> {
    fn redact(&self, text: &str) -> String {
        let refs: Vec<&str> = self.secrets.iter().map(String::as_str).collect();
        redact(text, &refs)
    }

    /// Writes the status with these conditions, publishes an Event when the phase changed, and
    /// remembers what was written as the new "previous".
    async fn write(&mut self, desired: Vec<Desired>) -> Result<(), ReconcileError> {
        let desired: Vec<Desired> = desired
            .into_iter()
            .map(|mut d| {
                d.message = self.redact(&d.message);
                d
            })
            .collect();
        if let Some(message) = self.status.message.take() {
            self.status.message = Some(self.redact(&message));
        }
        self.status.observed_generation = self.migration.meta().generation;
        self.status.conditions = conditions::merge(
            &self.previous.conditions,
            &desired,
            self.migration.meta().generation,
            self.ctx.now(),
        );
        if self.status != self.previous {
            let api: Api<StateMigration> =
                Api::namespaced(self.ctx.client.clone(), &self.namespace);
            let patch = json!({
                "apiVersion": "statekeeper.dev/v1alpha1",
                "kind": "StateMigration",
                "status": self.status,
            });
            api.patch_status(
                &self.name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await?;
        }
        let ready = conditions::find(&self.status.conditions, READY).cloned();
        let before = conditions::find(&self.previous.conditions, READY).cloned();
        if let Some(ready) = ready
            && before.is_none_or(|b| b.reason != ready.reason || b.status != ready.status)
        {
            let warning = ready.status != "True"
                && matches!(
                    self.status.phase.as_deref(),
                    Some(PHASE_FAILED | PHASE_PENDING)
                );
            let type_ = if warning {
                EventType::Warning
            } else {
                EventType::Normal
            };
            self.ctx
                .notify(
                    &self.migration.object_ref(&()),
                    type_,
                    &ready.reason,
                    "Migrate",
                    &ready.message,
                )
                .await;
        }
        self.previous = self.status.clone();
        Ok(())
    }

    fn plan_conditions(&self) -> Vec<Desired> {
        match &self.status.plan_hash {
            Some(hash) => vec![Desired::new(
                PLANNED,
                true,
                "Planned",
                format!(
                    "plan {hash}: {} step(s); see status.plan",
                    self.status.plan.as_ref().map_or(0, |p| p.steps.len())
                ),
            )],
            None => Vec::new(),
        }
    }

    /// Waiting (for a store, an approval, the queue): in progress, not stalled.
    async fn wait(
        &mut self,
        phase: &str,
        reason: &str,
        message: String,
        mut extra: Vec<Desired>,
    ) -> Result<Action, ReconcileError> {
        self.status.phase = Some(phase.into());
        self.status.message = Some(message.clone());
        let mut desired = vec![
            Desired::new(READY, false, reason, message.clone()),
            Desired::new(RECONCILING, true, reason, message),
            Desired::new(STALLED, false, reason, "waiting; nothing is wrong"),
        ];
        desired.extend(self.plan_conditions());
        desired.append(&mut extra);
        self.write(desired).await?;
        Ok(Action::requeue(WAIT))
    }

    /// A problem that may go away (the store unreachable, a Secret missing): Pending, retried
    /// with backoff.
    async fn pending(&mut self, reason: &str, message: String) -> Result<Action, ReconcileError> {
        self.status.phase = Some(PHASE_PENDING.into());
        self.status.message = Some(message.clone());
        let mut desired = vec![
            Desired::new(READY, false, reason, message.clone()),
            Desired::new(RECONCILING, true, reason, "retrying with backoff"),
            Desired::new(STALLED, false, reason, message),
        ];
        desired.extend(self.plan_conditions());
        self.write(desired).await?;
        let key = format!("{}/{}", self.namespace, self.name);
        Ok(Action::requeue(self.ctx.next_backoff(&key).await))
    }

    /// The migration failed for good; `message` says what happened and what to do.
    async fn fail(&mut self, reason: &str, message: String) -> Result<Action, ReconcileError> {
        self.status.phase = Some(PHASE_FAILED.into());
        self.status.finished_at = Some(self.ctx.now().to_string());
        self.status.queue = None;
        self.set_duration();
        self.status.message = Some(message.clone());
        let mut desired = vec![
            Desired::new(READY, false, reason, message.clone()),
            Desired::new(RECONCILING, false, reason, "the migration is finished"),
            Desired::new(STALLED, true, reason, message.clone()),
            Desired::new(SUCCEEDED, false, reason, message),
        ];
        if self.status.plan_hash.is_some() {
            desired.extend(self.plan_conditions());
        } else {
            desired.push(Desired::new(
                PLANNED,
                false,
                reason,
                "no plan could be made",
            ));
        }
        self.write(desired).await?;
        Ok(Action::await_change())
    }

    async fn succeed(
        &mut self,
        message: String,
        extra: Vec<Desired>,
    ) -> Result<Action, ReconcileError> {
        self.status.phase = Some(PHASE_SUCCEEDED.into());
        self.status.finished_at = Some(self.ctx.now().to_string());
        self.status.queue = None;
        self.set_duration();
        self.status.message = Some(message.clone());
        let mut desired = vec![
            Desired::new(READY, true, "Succeeded", message.clone()),
            Desired::new(RECONCILING, false, "Succeeded", "the migration is finished"),
            Desired::new(STALLED, false, "Succeeded", "the migration is finished"),
            Desired::new(SUCCEEDED, true, "Succeeded", message),
        ];
        desired.extend(self.plan_conditions());
        desired.extend(extra);
        self.write(desired).await?;
        Ok(Action::await_change())
    }

    fn set_duration(&mut self) {
        let started = self
            .status
            .started_at
            .as_deref()
            .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok());
        if let Some(started) = started {
            let elapsed = self.ctx.now().duration_since(started);
            self.status.duration_ms = Duration::try_from(elapsed)
                .ok()
                .map(|d| d.as_millis() as u64);
        }
    }

    fn approved_condition(&self) -> Option<Desired> {
        conditions::find(&self.status.conditions, APPROVED).map(|c| {
            Desired::new(
                APPROVED,
                c.status == "True",
                c.reason.clone(),
                c.message.clone(),
            )
        })
    }
}

pub async fn reconcile(
    migration: Arc<StateMigration>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    let started = std::time::Instant::now();
    let namespace = migration.namespace().ok_or(ReconcileError::NotNamespaced)?;
    let previous = migration.status.clone().unwrap_or_default();
    // A finished migration is a record: never run again, whatever changes.
    if is_finished(previous.phase.as_deref()) {
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
    let action = step(&mut run).await;
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

async fn step(run: &mut Run<'_>) -> Result<Action, ReconcileError> {
    let spec = &run.migration.spec;
    let requested = match Requested::from_spec(spec) {
        Ok(requested) => requested,
        Err(message) => return run.fail("InvalidSpec", message).await,
    };
    run.status.operation = Some(requested.name().into());

    let stores: Api<StateStore> = Api::namespaced(run.ctx.client.clone(), &run.namespace);
    let Some(store) = stores.get_opt(&spec.store_ref.name).await? else {
        let message = format!(
            "StateStore \"{}\" not found in namespace \"{}\"",
            spec.store_ref.name, run.namespace
        );
        return run.pending("StoreNotFound", message).await;
    };
    let engine = match state_store::connect_for_operation(&store, &run.namespace, run.ctx).await {
        Ok((engine, secrets)) => {
            run.secrets.extend(secrets);
            engine
                .with_actor(format!("statemigration:{}/{}", run.namespace, run.name))
                .with_operation_id(migration_id(run.migration))
                .with_backup_before_change(spec.backup)
        }
        Err((reason, message)) => return run.pending(&reason, message).await,
    };

    if run.previous.phase.as_deref() == Some(PHASE_RUNNING)
        && let Requested::RunnerUpgrade { runner } = &requested
    {
        return runner_step(run, &store, &engine, runner).await;
    }
    // Interrupted by a restart (Running) or by a lost connection (Pending): if the transaction
    // committed, its tagged backup says so, and the operation must not run twice (a second
    // rollback to "the newest backup" would undo the first).
    if matches!(
        run.previous.phase.as_deref(),
        Some(PHASE_RUNNING | PHASE_PENDING)
    ) && !matches!(requested, Requested::RunnerUpgrade { .. })
        && let Some(action) = resume_in_database(run, &engine).await?
    {
        return Ok(action);
    }
    // Without a backup nothing marks a committed transaction: after a restart mid-operation only
    // an unchanged store (the same plan hash) proves that nothing was applied.
    let unmarked_resume = run.previous.phase.as_deref() == Some(PHASE_RUNNING) && !spec.backup;
    let recorded_hash = run.previous.plan_hash.clone();

    let inputs = match resolve_inputs(run, &requested, &stores).await {
        Ok(inputs) => inputs,
        Err(Stop::Pending(reason, message)) => return run.pending(&reason, message).await,
        Err(Stop::Fail(reason, message)) => return run.fail(&reason, message).await,
    };
    let runner_text = match &requested {
        Requested::RunnerUpgrade { runner } => crate::engine::plan::runner_description(
            engine.profile(),
            &runner.image,
            &runner::command(runner, engine.profile().migrate_command),
        ),
        _ => String::new(),
    };
    let operation = match (&requested, &inputs) {
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
        },
        (Requested::Copy { .. }, Inputs::Copy { source, label }) => Operation::Copy {
            from: source,
            label,
        },
        _ => {
            return run
                .fail("InvalidSpec", "the operation's inputs are missing".into())
                .await;
        }
    };
    let plan = match engine.plan(operation, spec.backup).await {
        Ok(plan) => plan,
        Err(e) => {
            let message = run.redact(&e.to_string());
            return if is_permanent(&e) {
                run.fail(e.reason(), format!("{message}; nothing was changed"))
                    .await
            } else {
                run.pending(e.reason(), message).await
            };
        }
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
        run.status.phase = Some(PHASE_PLANNED.into());
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
        return Ok(Action::await_change());
    }

    // Approval: bound to exactly this plan.
    let approval_required = spec.require_approval
        || store.spec.require_approval
        || matches!(requested, Requested::Reset);
    let approved = if approval_required {
        match spec.approval.as_ref().map(|a| a.plan_hash.as_str()) {
            Some(hash) if hash == plan.hash => Desired::new(
                APPROVED,
                true,
                "Approved",
                format!("plan {hash} is approved"),
            ),
            Some(stale) => {
                let message = format!(
                    "spec.approval.planHash is {stale}, but the plan is now {}: the store (or the \
                     request's inputs) changed since the approved plan was computed, so that \
                     approval does not apply; review status.plan and approve {}",
                    plan.hash, plan.hash
                );
                let condition = Desired::new(APPROVED, false, "StaleApproval", message.clone());
                return run
                    .wait(
                        PHASE_AWAITING_APPROVAL,
                        "ApprovalPending",
                        message,
                        vec![condition],
                    )
                    .await;
            }
            None => {
                let why = if matches!(requested, Requested::Reset) {
                    "a reset always needs an approval"
                } else if store.spec.require_approval {
                    "the StateStore requires approval"
                } else {
                    "spec.requireApproval is set"
                };
                let message = format!(
                    "{why}: review status.plan, then set spec.approval.planHash: \"{}\"",
                    plan.hash
                );
                let condition = Desired::new(APPROVED, false, "ApprovalPending", message.clone());
                return run
                    .wait(
                        PHASE_AWAITING_APPROVAL,
                        "ApprovalPending",
                        message,
                        vec![condition],
                    )
                    .await;
            }
        }
    } else {
        Desired::new(APPROVED, true, "NotRequired", "no approval is required")
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
                .wait(PHASE_QUEUED, "Queued", message, vec![approved])
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

    run.status.phase = Some(PHASE_RUNNING.into());
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
    run.write(desired).await?;

    if let Requested::RunnerUpgrade { runner } = &requested {
        return runner_step(run, &store, &engine, runner).await;
    }
    execute_in_database(run, &store, &engine, &requested, inputs).await
}

/// The id recorded in the backups a migration makes, to tell after a restart whether its
/// transaction committed.
fn migration_id(migration: &StateMigration) -> String {
    migration.meta().uid.clone().unwrap_or_else(|| {
        format!(
            "{}/{}",
            migration.namespace().unwrap_or_default(),
            migration.name_any()
        )
    })
}

fn record_plan(status: &mut StateMigrationStatus, plan: &Plan) {
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
    });
}

enum Stop {
    Pending(String, String),
    Fail(String, String),
}

async fn resolve_inputs(
    run: &mut Run<'_>,
    requested: &Requested,
    stores: &Api<StateStore>,
) -> Result<Inputs, Stop> {
    match requested {
        Requested::Import => {
            let Some(import) = &run.migration.spec.import else {
                return Err(Stop::Fail("InvalidSpec".into(), "no import".into()));
            };
            let (url, spec_destination, expected) = match (&import.source, &import.from_export) {
                (Some(source), _) => (
                    source.url.clone(),
                    source.clone(),
                    import.expected_sha256.clone(),
                ),
                (None, Some(export_ref)) => {
                    let exports: Api<StateExport> =
                        Api::namespaced(run.ctx.client.clone(), &run.namespace);
                    let export = exports
                        .get_opt(&export_ref.name)
                        .await
                        .map_err(|e| Stop::Pending("ExportUnreadable".into(), e.to_string()))?
                        .ok_or_else(|| {
                            Stop::Pending(
                                "ExportNotFound".into(),
                                format!(
                                    "StateExport \"{}\" not found in namespace \"{}\"",
                                    export_ref.name, run.namespace
                                ),
                            )
                        })?;
                    let status = export.status.clone().unwrap_or_default();
                    match status.phase.as_deref() {
                        Some(state_export::PHASE_SUCCEEDED) => {}
                        Some(state_export::PHASE_FAILED) => {
                            return Err(Stop::Fail(
                                "ExportFailed".into(),
                                format!(
                                    "StateExport \"{}\" failed; there is no file to import",
                                    export_ref.name
                                ),
                            ));
                        }
                        _ if export.spec.schedule.is_some() => {
                            return Err(Stop::Fail(
                                "InvalidSpec".into(),
                                format!(
                                    "StateExport \"{}\" is a schedule: name one of its exports \
                                     (status.lastSuccessfulExport)",
                                    export_ref.name
                                ),
                            ));
                        }
                        _ => {
                            return Err(Stop::Pending(
                                "ExportNotFinished".into(),
                                format!(
                                    "waiting for StateExport \"{}\" to succeed",
                                    export_ref.name
                                ),
                            ));
                        }
                    }
                    let (Some(url), Some(sha256)) = (status.url.clone(), status.sha256.clone())
                    else {
                        return Err(Stop::Fail(
                            "ExportIncomplete".into(),
                            format!(
                                "StateExport \"{}\" records no url or sha256",
                                export_ref.name
                            ),
                        ));
                    };
                    if let Some(expected) = &import.expected_sha256
                        && *expected != sha256
                    {
                        return Err(Stop::Fail(
                            "ChecksumMismatch".into(),
                            format!(
                                "expectedSha256 is {expected}, but StateExport \"{}\" recorded {sha256}; nothing was changed",
                                export_ref.name
                            ),
                        ));
                    }
                    let destination = crate::api::state_export::Destination {
                        url: url.clone(),
                        ..export.spec.destination.clone()
                    };
                    (url, destination, Some(sha256))
                }
                (None, None) => {
                    return Err(Stop::Fail(
                        "InvalidSpec".into(),
                        "set either import.source or import.fromExport".into(),
                    ));
                }
            };
            let destination = resolve_destination(run.ctx, &run.namespace, &spec_destination, &url)
                .await
                .map_err(|problem| {
                    if problem.permanent {
                        Stop::Fail(problem.reason.into(), problem.message)
                    } else {
                        Stop::Pending(problem.reason.into(), problem.message)
                    }
                })?;
            Ok(Inputs::Import(ImportInput {
                url,
                expected_sha256: expected,
                mode: import.mode.into(),
                destination,
            }))
        }
        Requested::Copy { store: name } => {
            let source_store = stores
                .get_opt(name)
                .await
                .map_err(|e| Stop::Pending("StoreUnreadable".into(), e.to_string()))?
                .ok_or_else(|| {
                    Stop::Pending(
                        "SourceStoreNotFound".into(),
                        format!(
                            "source StateStore \"{name}\" not found in namespace \"{}\"",
                            run.namespace
                        ),
                    )
                })?;
            let (source, secrets) =
                state_store::connect_for_operation(&source_store, &run.namespace, run.ctx)
                    .await
                    .map_err(|(reason, message)| Stop::Pending(reason, message))?;
            run.secrets.extend(secrets);
            Ok(Inputs::Copy {
                source,
                label: crate::engine::plan::copy_source_label(name),
            })
        }
        _ => Ok(Inputs::None),
    }
}

/// The first operation this migration must wait for, if any: a migration of the same store that
/// runs or was created earlier and is not finished, a running export of the store, or the
/// store's framework janitor Job.
async fn queue_position(
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
            if is_finished(phase.as_deref()) {
                return None;
            }
            let running = phase.as_deref() == Some(PHASE_RUNNING);
            let key = order_key(&m);
            (running || key < me).then(|| {
                (
                    !running,
                    key,
                    format!(
                        "StateMigration {} ({})",
                        m.name_any(),
                        phase.unwrap_or_else(|| PHASE_PENDING.into())
                    ),
                )
            })
        })
        .collect();
    let exports: Api<StateExport> = Api::namespaced(run.ctx.client.clone(), &run.namespace);
    for export in exports.list(&ListParams::default()).await?.items {
        let running = export.status.as_ref().and_then(|s| s.phase.as_deref())
            == Some(state_export::PHASE_RUNNING);
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

/// After a restart during an in-database operation: its transaction either committed (and then
/// the backup it made, tagged with this migration, exists) or it did not (and the store is as
/// it was: the operation runs again, after the usual checks). Returns an action when the
/// migration is decided here.
async fn resume_in_database(
    run: &mut Run<'_>,
    engine: &Store,
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
        let approved = run.approved_condition().into_iter().collect();
        return run.succeed(message, approved).await.map(Some);
    }
    // Not committed (with a backup, its tag would exist; without one, the caller compares the
    // new plan with the recorded one): planned and run again like a new request.
    Ok(None)
}

async fn execute_in_database(
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
            run.status.backup_id = backup;
            run.status.to_version = Some(to_version);
            run.ctx
                .reset_failures(&format!("{}/{}", run.namespace, run.name))
                .await;
            let approved = run.approved_condition().into_iter().collect();
            run.succeed(message, approved).await
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
            run.wait(PHASE_QUEUED, "StoreBusy", message, approved).await
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

/// A runner upgrade: backup, Job, and the Job's outcome — a restore of the backup when it fails.
/// Each step is recorded in status before the next, so a restart resumes where it stopped.
async fn runner_step(
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
                labels: [("statekeeper.dev/migration".to_owned(), run.name.clone())].into(),
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
            job_failed(run, engine, &job_name, &reason, &message, runner).await
        }
    }
}

/// Restores the backup after a failed runner Job (when there is one) and fails the migration,
/// saying what was done and what to do.
async fn job_failed(
    run: &mut Run<'_>,
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
            let message = format!(
                "{what}; the store was restored from backup {backup_id} (version {}){}. Read the \
                 Job's logs, fix the cause, and create a new StateMigration",
                report.to_version,
                report
                    .pre_rollback_backup
                    .map(|b| format!("; what the Job left is kept in backup {}", b.id))
                    .unwrap_or_default()
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
            run.fail(reason, message).await
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

/// The conditions of a running migration, for status writes between its steps.
fn current_conditions(run: &Run<'_>) -> Vec<Desired> {
    let message = run
        .status
        .message
        .clone()
        .unwrap_or_else(|| "running".into());
    let mut desired = vec![
        Desired::new(READY, false, "Running", message.clone()),
        Desired::new(RECONCILING, true, "Running", message),
        Desired::new(STALLED, false, "Running", "the operation is running"),
    ];
    desired.extend(run.plan_conditions());
    desired.extend(run.approved_condition());
    desired
}

pub fn error_policy(
    migration: Arc<StateMigration>,
    error: &ReconcileError,
    _ctx: Arc<Context>,
) -> Action {
    tracing::warn!(migration = %migration.name_any(), %error, "reconcile failed");
    Action::requeue(Duration::from_secs(15))
}
