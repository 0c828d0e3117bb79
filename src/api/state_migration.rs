use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::KeysSecretRef;
use super::runner::Runner;
use super::state_export::{Destination, StoreRef};

/// The spec is immutable once created, except `approval`: a migration is a request, and its
/// status the record of what was done for exactly that request. The rule is one `self == oldSelf`
/// per field, placed on the field itself (`reset` has nothing to change), plus one rule on `spec`
/// for which operation is set: a
/// rule that reaches a field through `self.spec.import` costs the API server's estimate an
/// unknown size (`import` is a CEL keyword, and the estimator does not resolve the escaped
/// name), which a real API server refuses as "more than 100x" its budget. `tests/manifests.rs`
/// estimates every rule's cost as the API server does.
const SAME_OPERATION_RULE: &str = concat!(
    "has(self.upgrade) == has(oldSelf.upgrade) && has(self.rollback) == has(oldSelf.rollback)",
    " && has(self.reset) == has(oldSelf.reset) && has(self.import) == has(oldSelf.import)",
    " && has(self.copyFrom) == has(oldSelf.copyFrom)",
);

const ONE_OPERATION_RULE: &str = "[has(self.spec.upgrade), has(self.spec.rollback), has(self.spec.reset), has(self.spec.import), has(self.spec.copyFrom)].filter(x, x).size() == 1";

/// A one-shot operation on a StateStore, GitOps style: the object is the request, its status the
/// record. The operator plans it (status.plan, status.planHash), waits for approval when asked,
/// runs it once, after everything queued before it on the same store, and never again.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "statekeeper.dev",
    version = "v1alpha1",
    kind = "StateMigration",
    namespaced,
    status = "StateMigrationStatus",
    shortname = "skm",
    category = "statekeeper",
    validation = Rule::new(ONE_OPERATION_RULE).message("set exactly one operation: upgrade, rollback, reset, import or copyFrom"),
    validation = Rule::new("!has(self.spec.reset) || !has(self.spec.backup) || self.spec.backup").message("a reset always keeps the removed state in a backup: backup cannot be false"),
    validation = Rule::new("!has(self.spec.copyFrom) || self.spec.copyFrom.storeRef.name != self.spec.storeRef.name").message("copyFrom names the store itself: name another StateStore"),
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Store","type":"string","jsonPath":".spec.storeRef.name"}"#,
    printcolumn = r#"{"name":"Operation","type":"string","jsonPath":".status.operation"}"#,
    printcolumn = r#"{"name":"Plan Hash","type":"string","jsonPath":".status.planHash","priority":1}"#,
    printcolumn = r#"{"name":"Backup","type":"string","jsonPath":".status.backupId","priority":1}"#,
    printcolumn = r#"{"name":"Finished","type":"date","jsonPath":".status.finishedAt"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(SAME_OPERATION_RULE).message("a StateMigration's operation cannot change (spec is immutable except spec.approval): create a new StateMigration for another operation"))]
pub struct StateMigrationSpec {
    /// The StateStore to operate on, in the same namespace.
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.storeRef is immutable (only spec.approval may change): create a new StateMigration"))]
    pub store_ref: StoreRef,
    /// Upgrade the store's schema: to `targetVersion` where statekeeper owns the schema, or by
    /// running the framework's own migration (`runner`) where the framework does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.upgrade is immutable (only spec.approval may change): create a new StateMigration"))]
    pub upgrade: Option<UpgradeOperation>,
    /// Restore a backup of the store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.rollback is immutable (only spec.approval may change): create a new StateMigration"))]
    pub rollback: Option<RollbackOperation>,
    /// Remove the store's state (kept in a backup). Needs `allowReset: true` on the store and an
    /// approval on this object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reset: Option<ResetOperation>,
    /// Import an export file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.import is immutable (only spec.approval may change): create a new StateMigration"))]
    pub import: Option<ImportOperation>,
    /// Make this store equal to another store of the same framework (streamed, no file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.copyFrom is immutable (only spec.approval may change): create a new StateMigration"))]
    pub copy_from: Option<CopyFromOperation>,
    /// Back the store up before changing it (default true; `rollback` restores that backup).
    #[serde(default = "default_true")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.backup is immutable (only spec.approval may change): create a new StateMigration"))]
    pub backup: bool,
    /// Only plan: record the plan and its hash in status, change nothing.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.dryRun is immutable (only spec.approval may change): create a new StateMigration"))]
    pub dry_run: bool,
    /// Wait for `approval.planHash` before running (the store's `requireApproval` asks too).
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.requireApproval is immutable (only spec.approval may change): create a new StateMigration"))]
    pub require_approval: bool,
    /// The approval of one plan: the only field that may change after creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<Approval>,
}

fn default_true() -> bool {
    true
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpgradeOperation {
    /// A schema version number, or `latest` (the default), for a store statekeeper owns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_version: Option<IntOrString>,
    /// The framework's own migration as a Job (required for SQLMesh; default command
    /// `sqlmesh migrate`). The store is backed up first and restored when the Job fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner: Option<Runner>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RollbackOperation {
    /// The backup to restore (17 digits, see the store's status.backups); the latest when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]{17}$"))]
    pub backup_id: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ResetOperation {}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.source) != has(self.fromExport)").message("set either import.source or import.fromExport"))]
#[x_kube(validation = Rule::new("!has(self.mode) || self.mode == 'Merge' || !(has(self.environments) || has(self.models) || has(self.stateIds))").message("a restore in part (environments, models, stateIds) is a merge: set mode: Merge"))]
pub struct ImportOperation {
    /// Where the file is (`url`, `options`, `credentialsSecretRef`, as a StateExport's
    /// destination).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Destination>,
    /// A finished StateExport in this namespace: its file, credentials and sha256 are used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_export: Option<ExportRef>,
    /// `Merge` (the default: what the file holds replaces its namesakes, everything else
    /// stays, as `sqlmesh state import` and `meltano state import` do) or `Replace` (the store
    /// ends up equal to the file; what it held beyond the file is kept only in the backup). An
    /// exact export restores a whole store: it needs `Replace`.
    #[serde(default)]
    pub mode: ImportModeSpec,
    /// Refuse the file unless its sha256 is this hex digest (with `fromExport`: the export's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    pub expected_sha256: Option<String>,
    /// A Secret with the age identity that decrypts an encrypted file (the `AGE-SECRET-KEY-1…`
    /// file `age-keygen` writes; key `identity` unless `key` says otherwise). With
    /// `fromExport`, the export's `encryption.identitySecretRef` is used when this is not set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_secret_ref: Option<KeysSecretRef>,
    /// Restore in part (needs `mode: Merge`): only these environments, each with the snapshots
    /// or versions it references; everything else in the store stays as it is.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100), inner(length(min = 1, max = 253)))]
    pub environments: Vec<String>,
    /// Restore in part (needs `mode: Merge`): only these models' snapshots or versions, with
    /// their intervals; no environment changes unless `environments` names it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100), inner(length(min = 1, max = 1024)))]
    pub models: Vec<String>,
    /// Restore in part of a Meltano store (needs `mode: Merge`): only these state IDs (or the
    /// ones a `*` glob matches).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100), inner(length(min = 1, max = 1024)))]
    pub state_ids: Vec<String>,
}

impl ImportOperation {
    /// What a restore in part takes from the file (empty: all of it).
    pub fn selection(&self) -> crate::engine::Selection {
        crate::engine::Selection {
            environments: self.environments.clone(),
            models: self.models.clone(),
            state_ids: self.state_ids.clone(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ExportRef {
    /// A StateExport in this object's namespace.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub name: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ImportModeSpec {
    Replace,
    #[default]
    Merge,
}

impl StateMigration {
    /// The id the migration's backups are tagged with (its uid; namespace/name for an object
    /// that has none yet), by which the store's backup pruning recognises them.
    pub fn operation_id(&self) -> String {
        use kube::{Resource, ResourceExt};
        self.meta().uid.clone().unwrap_or_else(|| {
            format!(
                "{}/{}",
                self.namespace().unwrap_or_default(),
                self.name_any()
            )
        })
    }
}

impl From<ImportModeSpec> for crate::engine::ImportMode {
    fn from(value: ImportModeSpec) -> Self {
        match value {
            ImportModeSpec::Replace => Self::Replace,
            ImportModeSpec::Merge => Self::Merge,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CopyFromOperation {
    /// The StateStore to copy from, in the same namespace and of the same framework.
    pub store_ref: StoreRef,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Approval {
    /// The `status.planHash` (or `statekeeper state plan` hash) being approved. It approves
    /// exactly that plan: when the store changes, the plan and its hash change, and the old
    /// approval no longer applies.
    #[schemars(regex(pattern = r"^[0-9a-f]{12,64}$"))]
    pub plan_hash: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StateMigrationStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Pending, Queued, AwaitingApproval, Planned (dry run), Running, Succeeded or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// upgrade, rollback, reset, import or copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<String>,
    /// What the operation will do (or did), as computed from the store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<MigrationPlan>,
    /// The plan's hash: put it in `spec.approval.planHash` to approve exactly this plan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_hash: Option<String>,
    /// While queued: this object's place and what it waits for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<QueueStatus>,
    /// The backup made before the change; a rollback to it undoes the operation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_id: Option<String>,
    /// The Job running the framework's command (runner upgrades).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_name: Option<String>,
    /// True when a failed runner's changes were undone by restoring the backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_version: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_version: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// What happened, and after a failure what to do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// After a restore of a SQLMesh store: whether the warehouse's environment views agree
    /// with the restored state (the `ViewsCurrent` condition says the same).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_layer: Option<VirtualLayerStatus>,
    #[serde(default)]
    #[schemars(schema_with = "super::common::conditions_schema")]
    pub conditions: Vec<Condition>,
}

/// SQLMesh's views after this migration's restore. The restore stands whatever this says: the
/// migration's phase is the restore's outcome.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VirtualLayerStatus {
    /// `Current` (every view agrees with the restored state), `Repointing` (a Job re-points
    /// them) or `Stale` (some still select from the replaced state's tables).
    pub state: String,
    /// Why it is so: `NoEnvironmentChanged`, `Repointed`, `Acknowledged`, `NotConfigured`
    /// (the store has no `spec.virtualLayer`), a failed Job's reason (`DeadlineExceeded`,
    /// `PodFailed`, `JobDeleted`, …), or `GaveUp` after the last attempt.
    pub reason: String,
    /// The environments whose views the restore made stale.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub environments: Vec<String>,
    /// The backup of the state the restore replaced: the state the views were built for.
    pub since_backup: String,
    /// The re-point Job of the latest attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_name: Option<String>,
    /// Re-point Jobs created so far.
    #[serde(default)]
    pub attempts: u32,
    /// When the next attempt starts, after a failed one (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<String>,
    /// The command that re-points the views by hand (with the store's `--database-url`, from
    /// a machine that reaches the warehouse).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    pub message: String,
}

impl VirtualLayerStatus {
    pub const CURRENT: &'static str = "Current";
    pub const REPOINTING: &'static str = "Repointing";
    pub const STALE: &'static str = "Stale";

    /// Stale or being re-pointed: a janitor must not drop the tables those views may need,
    /// and the store's `VirtualLayerStale` condition is True.
    pub fn is_unsettled(&self) -> bool {
        self.state != Self::CURRENT
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QueueStatus {
    /// 1 = next to run.
    pub position: u32,
    /// The operation this one waits for, e.g. `StateExport nightly-20261127 (Running)`.
    pub waiting_for: String,
}

/// The engine's plan, as recorded in status.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigrationPlan {
    pub operation: String,
    pub framework: String,
    pub schema: String,
    pub from_version: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_version: Option<i32>,
    /// What will be done, in order.
    pub steps: Vec<String>,
    /// The store's tables now, with their row counts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tables: Vec<PlannedTable>,
    /// The backup to be made first, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<String>,
    /// The Job to be created, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// Where the new state comes from (import file, backup, other store).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// What the operation changes, from a diff of the store now with what it becomes (a
    /// rollback: its backup), so that an approver sees what it will undo before approving.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changes: Option<PlannedChanges>,
}

/// A few lines of `statekeeper state diff`: environments changed, added or removed (with the
/// models that move), versions, intervals, checkpoints or state IDs on one side only.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlannedChanges {
    /// What was compared with what, e.g. `the store now → backup 20261127093000123: …`.
    pub compared: String,
    /// What differs, or why nothing could be compared.
    pub summary: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PlannedTable {
    pub name: String,
    pub rows: i64,
}
