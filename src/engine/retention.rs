//! Which backups a prune keeps and which it drops: the retention policy as a pure function over
//! the listed backups, and what a prune reports.
//!
//! The rule, exactly: backups are ranked newest first (by creation time, then id). A backup is
//! kept when any of these holds, and dropped otherwise:
//! - it is among the newest `keep_last` (with `--keep-last N`);
//! - it is not older than `older_than` (with `--older-than AGE`: created at most AGE before now,
//!   by the database's clock);
//! - it belongs to an operation that may still need it (a protected operation id or backup id);
//! - it is pinned by a running operation that may restore it (`state run --backup`).
//!
//! So with both flags a backup goes when it is beyond the newest N *and* older than AGE; with
//! `--keep-last N` alone everything beyond the newest N goes (N = 0: every backup that is not
//! protected or pinned); with `--older-than AGE` alone every backup older than AGE goes, the
//! newest included. A policy with neither is refused: it would say nothing about what to keep.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::Serialize;

use super::Error;
use super::backup::BackupInfo;

/// What to keep.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RetentionPolicy {
    /// Keep the newest N backups.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_last: Option<u32>,
    /// Keep backups that are not older than this.
    #[serde(
        rename = "olderThanSeconds",
        skip_serializing_if = "Option::is_none",
        serialize_with = "seconds"
    )]
    pub older_than: Option<Duration>,
}

fn seconds<S: serde::Serializer>(value: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match value {
        Some(d) => s.serialize_u64(d.as_secs()),
        None => s.serialize_none(),
    }
}

impl RetentionPolicy {
    /// Refuses a policy that says nothing about what to keep.
    pub fn check(&self) -> Result<(), Error> {
        if self.keep_last.is_none() && self.older_than.is_none() {
            return Err(Error::InvalidOperation(
                "say which backups to keep: --keep-last N (the newest N), --older-than AGE \
                 (drop only those older than AGE, e.g. 7d, 12h, 30m), or both (drop those beyond \
                 the newest N that are also older than AGE)"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// A prune: the policy, what must survive whatever the policy says, and whether to change
/// anything.
#[derive(Clone, Debug, Default)]
pub struct PruneOptions {
    pub policy: RetentionPolicy,
    /// Operations that may still need their backups (StateMigrations that have not finished):
    /// every backup whose `operation` is one of these is kept.
    pub protected_operations: BTreeSet<String>,
    /// Backups kept by id (the backup an unfinished rollback will restore).
    pub protected_backups: BTreeSet<String>,
    /// Report what would be dropped; drop nothing.
    pub dry_run: bool,
}

/// Why a backup was kept.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum KeptBecause {
    /// Among the newest `keepLast` (`rank` 1 is the newest).
    Newest { rank: usize },
    /// Not older than `olderThan`.
    Young,
    /// Its operation has not finished.
    ProtectedOperation { operation: String },
    /// Named by an operation that has not finished.
    ProtectedBackup,
    /// Pinned by a running operation that may restore it (`state run --backup`).
    InUse,
}

impl KeptBecause {
    pub fn describe(&self) -> String {
        match self {
            KeptBecause::Newest { rank } => format!("among the newest (#{rank})"),
            KeptBecause::Young => "younger than --older-than".into(),
            KeptBecause::ProtectedOperation { operation } => {
                format!("its operation {operation} has not finished")
            }
            KeptBecause::ProtectedBackup => "an unfinished operation will restore it".into(),
            KeptBecause::InUse => "in use: a running operation may restore it".into(),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KeptBackup {
    #[serde(flatten)]
    pub backup: BackupInfo,
    pub kept_because: KeptBecause,
}

/// What a prune dropped (or, in a dry run, would drop) and kept, newest first.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PruneReport {
    pub schema: String,
    pub dry_run: bool,
    pub policy: RetentionPolicy,
    pub dropped: Vec<BackupInfo>,
    pub kept: Vec<KeptBackup>,
    /// The bytes the dropped backups took.
    pub bytes_freed: i64,
    pub duration_ms: u64,
}

/// The verdict on each backup, newest first: `Ok` to drop, `Err(why)` to keep. Pins are not known
/// here (the prune asks the database about the backups this would drop).
pub fn decide(
    backups: &[BackupInfo],
    options: &PruneOptions,
) -> Vec<(BackupInfo, Result<(), KeptBecause>)> {
    let mut newest_first: Vec<&BackupInfo> = backups.iter().collect();
    newest_first.sort_by(|a, b| (b.created_at, &b.id).cmp(&(a.created_at, &a.id)));
    let policy = &options.policy;
    newest_first
        .into_iter()
        .enumerate()
        .map(|(index, backup)| {
            let operation = backup
                .operation
                .as_ref()
                .filter(|o| options.protected_operations.contains(*o));
            let verdict = if let Some(operation) = operation {
                Err(KeptBecause::ProtectedOperation {
                    operation: operation.clone(),
                })
            } else if options.protected_backups.contains(&backup.id) {
                Err(KeptBecause::ProtectedBackup)
            } else if policy.keep_last.is_some_and(|n| index < n as usize) {
                Err(KeptBecause::Newest { rank: index + 1 })
            } else if policy
                .older_than
                .is_some_and(|age| backup.age_seconds.max(0) as u64 <= age.as_secs())
            {
                Err(KeptBecause::Young)
            } else {
                Ok(())
            };
            (backup.clone(), verdict)
        })
        .collect()
}
