//! A StateStore's backup retention (`spec.backups`), applied after every reconcile of a healthy
//! store (so after each operation it or a StateMigration completes, and on every resync): which
//! backups must survive whatever the policy says (those of StateMigrations that have not
//! finished, the backup an unfinished rollback will restore, the one of a running janitor Job),
//! the prune through the engine, and what it reports: `status.backupSummary`, a `BackupsPruned`
//! condition and Events.

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, ListParams};
use kube::runtime::events::EventType;

use super::conditions::{self, Desired};
use super::context::Context;
use crate::api::phases;
use crate::api::state_migration::StateMigration;
use crate::api::state_store::{BackupRetentionSpec, BackupSummary, StateStore};
use crate::engine::retention;
use crate::engine::{BackupInfo, PruneOptions, PruneReport, RetentionPolicy, Store, redact};

pub const BACKUPS_PRUNED: &str = "BackupsPruned";

/// How many ids of pruned backups the status keeps.
const PRUNED_IDS: usize = 100;

/// What the retention step decided and did in one reconcile.
pub struct PruneStep {
    pub condition: Desired,
    /// The prune that dropped backups this time, if one did.
    pub pruned: Option<PruneReport>,
}

/// The engine's policy from the spec, or what is wrong with it.
pub fn policy(spec: &BackupRetentionSpec) -> Result<RetentionPolicy, String> {
    let older_than = match &spec.max_age {
        Some(age) => Some(humantime::parse_duration(age).map_err(|e| {
            format!("backups.maxAge \"{age}\" is not a duration such as 7d, 12h or 30m: {e}")
        })?),
        None => None,
    };
    let policy = RetentionPolicy {
        keep_last: spec.keep_last,
        older_than,
    };
    policy
        .check()
        .map_err(|_| "backups sets neither keepLast nor maxAge: set one or both".to_owned())?;
    Ok(policy)
}

/// The operations whose backups must survive, and backups kept by id: every StateMigration of
/// the store that has not finished (its backup proves after a restart that it committed, or a
/// runner Job's failure restores it); the backup an unfinished rollback names, or the newest one
/// when it names none (pruning it would change what the rollback restores); the running janitor
/// Job's; the backup of the state a restore replaced while that restore's views are stale or
/// being re-pointed.
pub fn protection(
    store: &str,
    migrations: &[StateMigration],
    backups: &[BackupInfo],
    janitor_job: Option<&str>,
) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut operations = BTreeSet::new();
    let mut kept = BTreeSet::new();
    let newest = backups
        .iter()
        .max_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
    for migration in migrations.iter().filter(|m| m.spec.store_ref.name == store) {
        let phase = migration.status.as_ref().and_then(|s| s.phase.as_deref());
        // The state a restore replaced, while its views are not re-pointed yet: each attempt
        // reads it again to tell which views differ.
        if let Some(vl) = migration
            .status
            .as_ref()
            .and_then(|s| s.virtual_layer.as_ref())
            && vl.is_unsettled()
        {
            kept.insert(vl.since_backup.clone());
        }
        if phases::migration_is_finished(phase) {
            continue;
        }
        operations.insert(migration.operation_id());
        if let Some(rollback) = &migration.spec.rollback {
            match (&rollback.backup_id, newest) {
                (Some(id), _) => {
                    kept.insert(id.clone());
                }
                (None, Some(newest)) => {
                    kept.insert(newest.id.clone());
                }
                (None, None) => {}
            }
        }
    }
    operations.extend(janitor_job.map(str::to_owned));
    (operations, kept)
}

fn describe(policy: &RetentionPolicy) -> String {
    let mut parts = Vec::new();
    if let Some(n) = policy.keep_last {
        parts.push(format!("the newest {n}"));
    }
    if let Some(age) = policy.older_than {
        parts.push(format!(
            "those not older than {}",
            humantime::format_duration(Duration::from_secs(age.as_secs()))
        ));
    }
    parts.join(" and ")
}

/// Applies `spec.backups` to a healthy store whose backups are `backups` (as just listed). Takes
/// the store's lock only when the listing shows something to drop.
#[allow(clippy::too_many_arguments)]
pub async fn step(
    spec: &BackupRetentionSpec,
    store: &StateStore,
    namespace: &str,
    backups: &[BackupInfo],
    previous: &[Condition],
    engine: &Store,
    ctx: &Context,
    reference: &ObjectReference,
    secrets: &[&str],
) -> PruneStep {
    let failed = async |reason: &str, message: String| {
        let message = redact(&message, secrets);
        let before = conditions::find(previous, BACKUPS_PRUNED);
        if before.is_none_or(|c| c.status == "True" || c.reason != reason) {
            ctx.notify(
                reference,
                EventType::Warning,
                reason,
                "PruneBackups",
                &message,
            )
            .await;
        }
        PruneStep {
            condition: Desired::new(BACKUPS_PRUNED, false, reason, message),
            pruned: None,
        }
    };
    let policy = match policy(spec) {
        Ok(policy) => policy,
        Err(message) => return failed("InvalidBackupsSpec", message).await,
    };
    let migrations: Api<StateMigration> = Api::namespaced(ctx.client.clone(), namespace);
    let migrations = match migrations.list(&ListParams::default()).await {
        Ok(list) => list.items,
        Err(e) => {
            let message = format!(
                "cannot list the StateMigrations whose backups must be kept ({e}); nothing was \
                 pruned"
            );
            return failed("MigrationsUnknown", message).await;
        }
    };
    let janitor_job = store
        .status
        .as_ref()
        .and_then(|s| s.janitor.as_ref())
        .and_then(|j| j.active_job.as_deref());
    let store_name = reference.name.as_deref().unwrap_or_default();
    let (protected_operations, protected_backups) =
        protection(store_name, &migrations, backups, janitor_job);
    let options = PruneOptions {
        policy,
        protected_operations,
        protected_backups,
        dry_run: false,
    };
    let within = |count: usize| {
        Desired::new(
            BACKUPS_PRUNED,
            true,
            "WithinPolicy",
            format!(
                "{count} backups: keeping {}, and those of unfinished operations",
                describe(&policy)
            ),
        )
    };
    if retention::decide(backups, &options)
        .iter()
        .all(|(_, verdict)| verdict.is_err())
    {
        return PruneStep {
            condition: within(backups.len()),
            pruned: None,
        };
    }
    match engine.prune_backups(&options).await {
        Ok(report) => {
            let condition = within(report.kept.len());
            if report.dropped.is_empty() {
                return PruneStep {
                    condition,
                    pruned: None,
                };
            }
            let note = format!(
                "dropped {} backups ({} bytes): {}; kept {}",
                report.dropped.len(),
                report.bytes_freed,
                report
                    .dropped
                    .iter()
                    .map(|b| format!("{} ({})", b.id, b.reason))
                    .collect::<Vec<_>>()
                    .join(", "),
                report.kept.len()
            );
            ctx.notify(
                reference,
                EventType::Normal,
                "BackupsPruned",
                "PruneBackups",
                &note,
            )
            .await;
            PruneStep {
                condition,
                pruned: Some(report),
            }
        }
        Err(e) => {
            let message = format!("pruning backups failed, nothing was dropped: {e}");
            failed(e.reason(), message).await
        }
    }
}

/// `status.backupSummary`: the store's backups now, and the last prune (this one, or the one
/// recorded before).
pub fn summary(
    backups: &[BackupInfo],
    pruned: Option<&PruneReport>,
    previous: Option<&BackupSummary>,
    now: &str,
) -> BackupSummary {
    let mut summary = BackupSummary {
        count: backups.len() as u32,
        bytes: backups.iter().map(|b| b.bytes.max(0)).sum(),
        ..previous.cloned().unwrap_or_default()
    };
    if let Some(report) = pruned {
        summary.last_pruned_at = Some(now.to_owned());
        summary.pruned = report
            .dropped
            .iter()
            .take(PRUNED_IDS)
            .map(|b| b.id.clone())
            .collect();
        summary.pruned_bytes = Some(report.bytes_freed);
    }
    summary
}
