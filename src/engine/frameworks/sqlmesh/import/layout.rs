//! Where the rows of a SQLMesh export wait between reading and applying: each table's section
//! of `statekeeper_import` and the columns its rows are staged with, shared by the reader that
//! stages them and the inserts that apply them.

use std::sync::Arc;

use chrono::Utc;

pub(super) const SNAPSHOTS: &str = "_snapshots";
pub(super) const INTERVALS: &str = "_intervals";
pub(super) const AUTO_RESTATEMENTS: &str = "_auto_restatements";
pub(super) const ENVIRONMENTS: &str = "_environments";
pub(super) const STATEMENTS: &str = "_environment_statements";

/// The columns each table's rows are staged with, in this order. `has_statements` only decides
/// whether a statements row is written.
pub(super) const SNAPSHOT_COLUMNS: &[&str] = &[
    "name",
    "identifier",
    "version",
    "snapshot",
    "kind_name",
    "updated_ts",
    "unpaused_ts",
    "ttl_ms",
    "unrestorable",
    "forward_only",
    "dev_version",
    "fingerprint",
];
pub(super) const INTERVAL_COLUMNS: &[&str] = &[
    "id",
    "created_ts",
    "name",
    "identifier",
    "version",
    "dev_version",
    "start_ts",
    "end_ts",
    "is_dev",
    "is_removed",
    "is_compacted",
    "is_pending_restatement",
];
pub(super) const AUTO_RESTATEMENT_COLUMNS: &[&str] = &[
    "snapshot_name",
    "snapshot_version",
    "next_auto_restatement_ts",
];
/// `_environments` rows: their lists of snapshots come from staged elements (`LIST_COLUMNS`),
/// joined when applied, and the flags say which lists the file held.
pub(super) const ENVIRONMENT_COLUMNS: &[&str] = &[
    "name",
    "start_at",
    "end_at",
    "plan_id",
    "previous_plan_id",
    "expiration_ts",
    "finalized_ts",
    "suffix_target",
    "catalog_name_override",
    "normalize_name",
    "requirements",
    "gateway_managed",
    "environment_index",
    "snapshots_listed",
    "promoted_snapshot_ids_listed",
    "previous_finalized_snapshots_listed",
];
pub(super) const STATEMENT_COLUMNS: &[&str] = &[
    "environment_name",
    "plan_id",
    "environment_statements",
    "has_statements",
];

/// The most values a staged row has (a list's element has two).
pub(super) fn staged_width() -> usize {
    [
        SNAPSHOT_COLUMNS,
        INTERVAL_COLUMNS,
        AUTO_RESTATEMENT_COLUMNS,
        ENVIRONMENT_COLUMNS,
        STATEMENT_COLUMNS,
    ]
    .iter()
    .map(|columns| columns.len())
    .fold(2, usize::max)
}

/// A staged row of `columns`, filled by name.
pub(super) struct StagedRow {
    columns: &'static [&'static str],
    pub(super) fields: Vec<Option<String>>,
}

impl StagedRow {
    pub(super) fn new(columns: &'static [&'static str]) -> Self {
        Self {
            columns,
            fields: vec![None; columns.len()],
        }
    }

    pub(super) fn set(&mut self, column: &str, value: impl Into<Option<String>>) {
        if let Some(i) = self.columns.iter().position(|c| *c == column) {
            self.fields[i] = value.into();
        }
    }
}

/// The position (from 1, as in SQL) of a staged column.
pub(super) fn staged_position(columns: &[&str], column: &str) -> usize {
    columns
        .iter()
        .position(|c| *c == column)
        .map_or(0, |i| i + 1)
}

/// The staging section of an environment list column's elements.
pub(super) fn list_section(column: &str) -> String {
    format!("{ENVIRONMENTS}.{column}")
}

/// The lists of snapshots an environment holds. They grow with the project, so their elements
/// are staged one by one and joined in PostgreSQL: memory stays flat.
pub(super) const LIST_COLUMNS: &[&str] = &[
    "snapshots",
    "promoted_snapshot_ids",
    "previous_finalized_snapshots",
];

/// Shared section names, and the one time stamp every interval row of this import is created
/// at.
#[derive(Clone)]
pub(super) struct Names {
    pub(super) snapshots: Arc<str>,
    pub(super) intervals: Arc<str>,
    pub(super) auto_restatements: Arc<str>,
    pub(super) environments: Arc<str>,
    pub(super) statements: Arc<str>,
    /// Per list column, the section its elements are staged under.
    pub(super) environment_lists: std::collections::HashMap<&'static str, Arc<str>>,
    pub(super) created_ts: i64,
}

impl Names {
    pub(super) fn new() -> Self {
        Self {
            snapshots: Arc::from(SNAPSHOTS),
            intervals: Arc::from(INTERVALS),
            auto_restatements: Arc::from(AUTO_RESTATEMENTS),
            environments: Arc::from(ENVIRONMENTS),
            statements: Arc::from(STATEMENTS),
            environment_lists: LIST_COLUMNS
                .iter()
                .map(|c| (*c, Arc::from(list_section(c).as_str())))
                .collect(),
            created_ts: Utc::now().timestamp_millis(),
        }
    }
}
