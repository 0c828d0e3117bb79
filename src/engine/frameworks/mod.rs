//! Framework profiles: what a state store of each framework is made of and which operations it
//! supports. Generic operations over a store's table set (backup, rollback, reset, backups,
//! status, exact export and import) live once in `tableset.rs` and read the profile; everything a
//! framework alone knows lives in its own module here.
//!
//! Adding a framework is one new module with a [`Profile`] and its hooks, plus one arm in each
//! `match` of this file (the compiler lists them).

pub mod meltano;
pub mod sqlmesh;
pub mod statekeeper;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sqlx::PgConnection;

use super::Error;
use super::backup::BackupInfo;
use super::store::Store;

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

    pub fn profile(self) -> &'static Profile {
        match self {
            Framework::Statekeeper => &statekeeper::PROFILE,
            Framework::Sqlmesh => &sqlmesh::PROFILE,
            Framework::Meltano => &meltano::PROFILE,
        }
    }

    pub fn as_str(self) -> &'static str {
        self.profile().name
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
/// framework's module, reached through the dispatch functions below.
#[derive(Debug)]
pub struct Profile {
    pub framework: Framework,
    /// The lower-case name used in flags and specs.
    pub name: &'static str,
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

/// A framework's state store found in a database (by the framework's marker table).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FoundStore {
    pub framework: Framework,
    pub schema: String,
}

impl FoundStore {
    /// The CLI options that name this store.
    pub fn flags(&self) -> String {
        let mut flags = format!("--framework {}", self.framework);
        if self.schema != self.framework.profile().default_schema {
            flags.push_str(&format!(" --schema {}", self.schema));
        }
        flags
    }

    /// The StateStore fields that name this store.
    pub fn spec_fields(&self) -> String {
        let mut fields = format!("spec.framework: {}", self.framework);
        if self.schema != self.framework.profile().default_schema {
            fields.push_str(&format!(", spec.schema: {}", self.schema));
        }
        fields
    }
}

impl std::fmt::Display for FoundStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} state in schema \"{}\"",
            self.framework.profile().display_name,
            self.schema
        )
    }
}

/// Every framework's state store in the database the connection is on (backups aside).
pub(crate) async fn find_stores(conn: &mut PgConnection) -> Result<Vec<FoundStore>, Error> {
    let markers: Vec<&str> = Framework::ALL
        .iter()
        .map(|f| f.profile().marker_table)
        .collect();
    Ok(super::catalog::find_tables(conn, &markers)
        .await?
        .into_iter()
        .filter_map(|(table, schema)| {
            Framework::ALL
                .iter()
                .find(|f| f.profile().marker_table == table)
                .map(|framework| FoundStore {
                    framework: *framework,
                    schema,
                })
        })
        .collect())
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

/// The store's version, `None` when its framework has not created it yet. Fails when the store
/// cannot be operated on safely (a newer or changed statekeeper schema).
pub(crate) async fn read_version(
    store: &Store,
    conn: &mut PgConnection,
) -> Result<Option<StoreVersion>, Error> {
    match store.framework() {
        Framework::Statekeeper => statekeeper::read_version(store, conn).await,
        Framework::Sqlmesh => sqlmesh::read_version(store, conn).await,
        Framework::Meltano => meltano::read_version(store, conn).await,
    }
}

/// Refuses a backup that cannot be restored into this store.
pub(crate) async fn check_backup(
    store: &Store,
    conn: &mut PgConnection,
    backup: &BackupInfo,
) -> Result<(), Error> {
    match store.framework() {
        Framework::Statekeeper => statekeeper::check_backup(store, conn, backup).await,
        Framework::Sqlmesh | Framework::Meltano => Ok(()),
    }
}

/// Recreates the tables of a backup whose structure differs from the live store's (rolling back
/// across an upgrade). Called with the live tables already dropped.
pub(crate) async fn rebuild_tables(
    store: &Store,
    conn: &mut PgConnection,
    backup: &BackupInfo,
) -> Result<(), Error> {
    match store.framework() {
        Framework::Statekeeper => statekeeper::rebuild_tables(store, conn, backup).await,
        Framework::Sqlmesh | Framework::Meltano => {
            super::tableset::rebuild_from_backup(store, conn, backup).await
        }
    }
}

/// Keeps what must survive a restore (statekeeper: the migration history recorded since the
/// backup). Runs before the live rows are replaced.
pub(crate) async fn before_restore(store: &Store, conn: &mut PgConnection) -> Result<(), Error> {
    match store.framework() {
        Framework::Statekeeper => statekeeper::carry_migration_events(store, conn).await,
        Framework::Sqlmesh | Framework::Meltano => Ok(()),
    }
}

/// Puts back what `before_restore` kept. Runs after the backup's rows were loaded.
pub(crate) async fn after_restore(store: &Store, conn: &mut PgConnection) -> Result<(), Error> {
    match store.framework() {
        Framework::Statekeeper => statekeeper::restore_migration_events(store, conn).await,
        Framework::Sqlmesh | Framework::Meltano => Ok(()),
    }
}

/// Records an operation in the store's own history, where the framework has one.
pub(crate) async fn record_event(
    store: &Store,
    conn: &mut PgConnection,
    event: &Event<'_>,
) -> Result<(), Error> {
    match store.framework() {
        Framework::Statekeeper => statekeeper::record_event(store, conn, event).await,
        Framework::Sqlmesh | Framework::Meltano => Ok(()),
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
