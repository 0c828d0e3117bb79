//! statekeeper's own schema's profile: what its state store is made of, as data (see `framework::Profile`).

use crate::engine::framework::{
    Count, Entities, ExportFormat, Framework, Profile, ResetStyle, TableSet,
};

pub static PROFILE: Profile = Profile {
    framework: Framework::Statekeeper,
    display_name: "statekeeper",
    default_schema: "statekeeper",
    tables: TableSet::WholeSchema,
    entities: Entities {
        noun: "environments",
        table: "virtual_environments",
        key: "name",
    },
    marker_table: "state_versions",
    owns_schema: true,
    reset: ResetStyle::DropTables,
    counts: &[
        count("model_versions"),
        count("function_versions"),
        count("physical_relations"),
        count("model_version_intervals"),
        count("virtual_environments"),
        count("virtual_environment_refs"),
        count("virtual_environment_checkpoints"),
        count("locks"),
        count("state_operations"),
        count("plan_runs"),
        count("state_migration_events"),
    ],
    export_formats: &[ExportFormat::Exact, ExportFormat::Statekeeper],
    foreign_operation_hint: None,
    not_initialized_hint: "run `statekeeper state init` first",
    version_mismatch_hint: "upgrade the older store with `statekeeper state upgrade` (and export \
                            again if that was the source)",
    migrate_command: &[],
    janitor_command: &[],
};

/// A row count of one table, named after it.
const fn count(table: &'static str) -> Count {
    Count {
        name: table,
        table,
        sql: "",
    }
}
