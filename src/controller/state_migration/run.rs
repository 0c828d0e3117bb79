//! One reconcile of a StateMigration: its status so far, how each kind of stop is written
//! (waiting, pending, failed, succeeded), and what every step shares.

use std::time::Duration;

use kube::Resource;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;

use crate::api::phases;
use crate::api::state_migration::{StateMigration, StateMigrationStatus};
use crate::controller::conditions::{self, Desired, READY, RECONCILING, STALLED};
use crate::controller::context::{Context, ReconcileError};
use crate::engine::{Error as EngineError, redact};

pub const PLANNED: &str = "Planned";
pub const APPROVED: &str = "Approved";
pub const SUCCEEDED: &str = "Succeeded";

/// How often a waiting migration looks again (approval, queue, a running Job).
pub(super) const WAIT: Duration = Duration::from_secs(15);

/// One reconcile's view: the object, its status so far and the secrets to keep out of it.
pub(super) struct Run<'a> {
    pub(super) ctx: &'a Context,
    pub(super) migration: &'a StateMigration,
    pub(super) namespace: String,
    pub(super) name: String,
    pub(super) previous: StateMigrationStatus,
    pub(super) status: StateMigrationStatus,
    pub(super) secrets: Vec<String>,
}

impl Run<'_> {
    pub(super) fn redact(&self, text: &str) -> String {
        let refs: Vec<&str> = self.secrets.iter().map(String::as_str).collect();
        redact(text, &refs)
    }

    /// Writes the status with these conditions, publishes an Event when the phase changed, and
    /// remembers what was written as the new "previous".
    pub(super) async fn write(&mut self, desired: Vec<Desired>) -> Result<(), ReconcileError> {
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
            self.ctx.apply_status(self.migration, &self.status).await?;
        }
        let ready = conditions::find(&self.status.conditions, READY).cloned();
        let before = conditions::find(&self.previous.conditions, READY).cloned();
        if let Some(ready) = ready
            && before.is_none_or(|b| b.reason != ready.reason || b.status != ready.status)
        {
            let warning = ready.status != "True"
                && matches!(
                    self.status.phase.as_deref(),
                    Some(phases::FAILED | phases::PENDING)
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

    pub(super) fn plan_conditions(&self) -> Vec<Desired> {
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
    pub(super) async fn wait(
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
    pub(super) async fn pending(
        &mut self,
        reason: &str,
        message: String,
    ) -> Result<Action, ReconcileError> {
        self.status.phase = Some(phases::PENDING.into());
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
    pub(super) async fn fail(
        &mut self,
        reason: &str,
        message: String,
    ) -> Result<Action, ReconcileError> {
        self.fail_with(reason, message, Vec::new()).await
    }

    /// A failure with further conditions (the views of a restore that followed it).
    pub(super) async fn fail_with(
        &mut self,
        reason: &str,
        message: String,
        extra: Vec<Desired>,
    ) -> Result<Action, ReconcileError> {
        self.status.phase = Some(phases::FAILED.into());
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
        desired.extend(extra);
        self.write(desired).await?;
        Ok(Action::await_change())
    }

    pub(super) async fn succeed(
        &mut self,
        message: String,
        extra: Vec<Desired>,
    ) -> Result<Action, ReconcileError> {
        self.status.phase = Some(phases::SUCCEEDED.into());
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

    pub(super) fn approved_condition(&self) -> Option<Desired> {
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

/// The conditions of a running migration, for status writes between its steps.
pub(super) fn current_conditions(run: &Run<'_>) -> Vec<Desired> {
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

/// The id recorded in the backups a migration makes, to tell after a restart whether its
/// transaction committed.
pub(super) fn migration_id(migration: &StateMigration) -> String {
    migration.operation_id()
}

/// Engine errors that no retry can fix: the migration fails for good.
pub(super) fn is_permanent(error: &EngineError) -> bool {
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
