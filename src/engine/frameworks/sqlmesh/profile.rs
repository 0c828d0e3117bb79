//! SQLMesh's profile: what its state store is made of, as data (see `framework::Profile`).

use crate::engine::framework::{
    Count, Entities, ExportFormat, Framework, Profile, ResetStyle, TableSet,
};

/// Every table SQLMesh keeps its state in; its own `_*_backup` copies are not part of the store.
pub const TABLES: &[&str] = &[
    "_auto_restatements",
    "_environment_statements",
    "_environments",
    "_intervals",
    "_snapshots",
    "_versions",
];

pub static PROFILE: Profile = Profile {
    framework: Framework::Sqlmesh,
    display_name: "SQLMesh",
    default_schema: "sqlmesh",
    tables: TableSet::Named {
        tables: TABLES,
        required: &["_versions", "_snapshots", "_environments", "_intervals"],
    },
    entities: Entities {
        noun: "environments",
        table: "_environments",
        key: "name",
    },
    marker_table: "_versions",
    owns_schema: false,
    reset: ResetStyle::EmptyTables {
        keep: &["_versions"],
    },
    counts: &[
        Count {
            name: "snapshots",
            table: "_snapshots",
            sql: "",
        },
        Count {
            name: "environments",
            table: "_environments",
            sql: "",
        },
        Count {
            name: "expired_environments",
            table: "_environments",
            sql: "SELECT count(*) FROM {s}._environments \
                  WHERE expiration_ts <= (extract(epoch FROM now()) * 1000)::bigint",
        },
        Count {
            name: "intervals",
            table: "_intervals",
            sql: "",
        },
        Count {
            name: "environment_statements",
            table: "_environment_statements",
            sql: "",
        },
        Count {
            name: "auto_restatements",
            table: "_auto_restatements",
            sql: "",
        },
    ],
    export_formats: &[ExportFormat::Exact, ExportFormat::Sqlmesh],
    foreign_operation_hint: Some(
        "SQLMesh creates and migrates its own state tables (`sqlmesh plan`, `sqlmesh migrate`) \
         and cleans them up (`sqlmesh janitor`); take a backup first with \
         `statekeeper state backup --framework sqlmesh`",
    ),
    not_initialized_hint: "SQLMesh creates its state tables on its first `sqlmesh plan` or \
                           `sqlmesh migrate`",
    version_mismatch_hint: "run `sqlmesh migrate` on the older side (this store, or the database \
                            the file was exported from, then export again)",
    migrate_command: &["sqlmesh", "migrate"],
    janitor_command: &["sqlmesh", "janitor"],
};
