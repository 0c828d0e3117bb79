//! The shared vocabulary of frameworks: which framework a store belongs to, the formats it can be
//! written in, and its profile as data. Below everything that acts on a store, so that the store
//! core, backups and every framework module can name these without reaching up.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::Error;

/// The framework whose state a store holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Framework {
    /// The schema statekeeper creates and upgrades itself.
    #[default]
    Statekeeper,
    /// SQLMesh's state tables, which SQLMesh creates and migrates.
    Sqlmesh,
    /// Meltano's system database (state backend, runs, settings), which Meltano creates and
    /// migrates.
    Meltano,
}

impl Framework {
    pub const ALL: &'static [Framework] = &[
        Framework::Statekeeper,
        Framework::Sqlmesh,
        Framework::Meltano,
    ];

    /// The lower-case name used in flags and specs.
    pub fn as_str(self) -> &'static str {
        match self {
            Framework::Statekeeper => "statekeeper",
            Framework::Sqlmesh => "sqlmesh",
            Framework::Meltano => "meltano",
        }
    }
}

impl std::fmt::Display for Framework {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Framework {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Framework::ALL
            .iter()
            .copied()
            .find(|f| f.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown framework \"{s}\" (use {})",
                    Framework::ALL
                        .iter()
                        .map(|f| f.as_str())
                        .collect::<Vec<_>>()
                        .join(" or ")
                )
            })
    }
}

/// The formats an export can be written in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportFormat {
    /// Every row of every table of the store, column values as PostgreSQL text: restores bit for
    /// bit, history included (docs/export-format.md).
    #[default]
    Exact,
    /// statekeeper's logical format v1: current state only, mergeable.
    Statekeeper,
    /// The document `sqlmesh state export` writes.
    Sqlmesh,
    /// The document `meltano state export` writes: `{state_id: {"completed", "partial"}}`.
    Meltano,
    /// Meltano's file state backends: a folder (or object prefix) of `<state_id>/state.json`.
    #[serde(rename = "meltano-backend")]
    MeltanoBackend,
}

impl ExportFormat {
    pub const ALL: &'static [ExportFormat] = &[
        ExportFormat::Exact,
        ExportFormat::Statekeeper,
        ExportFormat::Sqlmesh,
        ExportFormat::Meltano,
        ExportFormat::MeltanoBackend,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ExportFormat::Exact => "exact",
            ExportFormat::Statekeeper => "statekeeper",
            ExportFormat::Sqlmesh => "sqlmesh",
            ExportFormat::Meltano => "meltano",
            ExportFormat::MeltanoBackend => "meltano-backend",
        }
    }
}

impl std::fmt::Display for ExportFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ExportFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        ExportFormat::ALL
            .iter()
            .copied()
            .find(|f| f.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown format \"{s}\" (use {})",
                    ExportFormat::ALL
                        .iter()
                        .map(|f| f.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
    }
}

/// Which tables make up a store.
#[derive(Debug)]
pub enum TableSet {
    /// Every table in the store's schema (statekeeper owns the schema).
    WholeSchema,
    /// These tables, of which `required` must exist for the store to count as created; the
    /// framework may share its schema with other tables (its own backups, for example).
    Named {
        tables: &'static [&'static str],
        required: &'static [&'static str],
    },
}

/// The named things a store is made of (environments, state IDs), as users count them.
#[derive(Debug)]
pub struct Entities {
    /// Plural, as in "3 environments".
    pub noun: &'static str,
    pub table: &'static str,
    pub key: &'static str,
}

/// What `reset` does to the tables.
#[derive(Debug)]
pub enum ResetStyle {
    /// Drops every table; `init` creates them again.
    DropTables,
    /// Empties every table but these, leaving the store as its framework creates it.
    EmptyTables { keep: &'static [&'static str] },
}

/// A count reported by `status`, skipped when its table does not exist: the rows of `table`, or
/// the value of `sql` when it is not empty (`{s}` stands for the quoted schema name).
#[derive(Debug)]
pub struct Count {
    pub name: &'static str,
    pub table: &'static str,
    pub sql: &'static str,
}

/// What a framework's store is, as data. The behaviour that is more than data is in the
/// framework's module, reached through `hooks.rs`.
#[derive(Debug)]
pub struct Profile {
    pub framework: Framework,
    /// The name users know the framework by.
    pub display_name: &'static str,
    /// The schema the framework uses unless configured otherwise.
    pub default_schema: &'static str,
    pub tables: TableSet,
    /// What the store holds many of, by name: what a replace reports it removed.
    pub entities: Entities,
    /// A table whose presence tells that a schema holds this framework's store (to name the right
    /// `--framework` when a command is pointed at another framework's tables).
    pub marker_table: &'static str,
    /// True when statekeeper creates and upgrades the tables (init, upgrade); otherwise the
    /// framework does, and its writers do not take statekeeper's advisory lock, so writes lock
    /// the tables themselves.
    pub owns_schema: bool,
    pub reset: ResetStyle,
    pub counts: &'static [Count],
    /// Export formats this store can be written in; the first is the default.
    pub export_formats: &'static [ExportFormat],
    /// Why `init`, `upgrade` or `janitor` are not statekeeper's to run, when they are not.
    pub foreign_operation_hint: Option<&'static str>,
    /// What to do about a store whose tables do not exist yet.
    pub not_initialized_hint: &'static str,
    /// What to do when a file's schema version differs from the store's.
    pub version_mismatch_hint: &'static str,
    /// The framework's own command that migrates its tables (empty: statekeeper upgrades them).
    pub migrate_command: &'static [&'static str],
    /// The framework's own janitor command (empty: statekeeper's janitor cleans the store).
    pub janitor_command: &'static [&'static str],
}

impl Profile {
    pub fn supports_format(&self, format: ExportFormat) -> bool {
        self.export_formats.contains(&format)
    }

    /// The error for a format this framework's stores do not have.
    pub fn unsupported_format(&self, format: ExportFormat) -> Error {
        Error::UnsupportedFormat {
            format: format.as_str().into(),
            framework: self.display_name.into(),
            supported: self
                .export_formats
                .iter()
                .map(|f| f.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        }
    }

    /// The error for an operation that the framework runs itself.
    pub fn not_ours(&self, operation: &str) -> Error {
        Error::UnsupportedOperation {
            operation: operation.into(),
            framework: self.display_name.into(),
            hint: self.foreign_operation_hint.unwrap_or_default().into(),
        }
    }
}

/// The version of a store as its framework records it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StoreVersion {
    /// statekeeper: the ledger's version; SQLMesh: `_versions.schema_version`.
    pub schema_version: i32,
    /// Further version facts (SQLMesh: `sqlmeshVersion`, `sqlglotVersion`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub details: BTreeMap<String, String>,
}

impl Framework {
    /// A store's version as its framework's users know it: statekeeper's schema version,
    /// SQLMesh's state schema version (with SQLMesh's own), Meltano's Alembic revision (whose
    /// `schema_version` is only a fingerprint).
    pub fn describe_version(
        self,
        schema_version: i32,
        details: &BTreeMap<String, String>,
    ) -> String {
        match self {
            Framework::Statekeeper => format!("schema version {schema_version}"),
            Framework::Sqlmesh => {
                let tools: Vec<String> =
                    [("sqlmeshVersion", "SQLMesh"), ("sqlglotVersion", "SQLGlot")]
                        .iter()
                        .filter_map(|(key, name)| details.get(*key).map(|v| format!("{name} {v}")))
                        .collect();
                if tools.is_empty() {
                    format!("state schema version {schema_version}")
                } else {
                    format!(
                        "state schema version {schema_version} ({})",
                        tools.join(", ")
                    )
                }
            }
            Framework::Meltano => match details.get("alembicRevision") {
                Some(revision) => format!("Alembic revision {revision}"),
                None => format!("Alembic revision fingerprint {schema_version}"),
            },
        }
    }
}

/// An operation, as recorded in a store's history.
pub(crate) struct Event<'a> {
    pub operation: &'a str,
    pub from_version: i32,
    pub to_version: i32,
    pub backup_id: Option<&'a str>,
    pub details: serde_json::Value,
}
