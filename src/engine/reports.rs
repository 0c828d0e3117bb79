//! What the lifecycle operations on a store (init, upgrade, status, rollback, reset) report back:
//! plain data the CLI prints and the reconcilers copy into status, below every operation.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::backup::BackupInfo;
use super::framework::Framework;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AppliedStep {
    pub version: i32,
    pub description: String,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AppliedVersion {
    pub version: i32,
    pub description: String,
    pub checksum: String,
    pub applied_at: DateTime<Utc>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InitReport {
    pub schema: String,
    /// True when the store was already initialised and nothing was done.
    pub already_initialized: bool,
    pub from_version: i32,
    pub to_version: i32,
    pub applied: Vec<AppliedStep>,
    pub duration_ms: u64,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusReport {
    pub framework: Framework,
    pub schema: String,
    /// False when the schema itself does not exist (a typo, or nothing created yet).
    pub schema_exists: bool,
    pub initialized: bool,
    /// 0 when not initialised.
    pub current_version: i32,
    /// The latest version statekeeper can upgrade to; none where the framework migrates itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latest_version: Option<i32>,
    /// Further version facts (SQLMesh: `sqlmeshVersion`, `sqlglotVersion`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub versions: BTreeMap<String, String>,
    /// statekeeper's ledger.
    pub applied: Vec<AppliedVersion>,
    pub pending: Vec<AppliedStep>,
    pub counts: BTreeMap<String, i64>,
    pub backups: Vec<BackupInfo>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpgradeReport {
    pub schema: String,
    pub from_version: i32,
    pub to_version: i32,
    pub applied: Vec<AppliedStep>,
    /// The backup taken before the first step; none when there was nothing to apply.
    pub backup: Option<BackupInfo>,
    pub duration_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RollbackReport {
    pub schema: String,
    pub restored_backup: BackupInfo,
    pub from_version: i32,
    pub to_version: i32,
    /// The backup of the state that the rollback replaced, so a rollback can itself be undone.
    pub pre_rollback_backup: Option<BackupInfo>,
    pub rows_restored: i64,
    pub duration_ms: u64,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ResetReport {
    pub schema: String,
    pub from_version: i32,
    /// Tables dropped (statekeeper) or emptied (a framework that owns its tables).
    pub tables_reset: usize,
    /// The backup of the state that the reset removed; `rollback` restores it.
    pub backup: Option<BackupInfo>,
    pub duration_ms: u64,
}

/// Reset needs two independent yeses: the store allows it, and this request is approved.
#[derive(Clone, Copy, Debug, Default)]
pub struct ResetApproval {
    pub allow_reset: bool,
    pub approved: bool,
}
