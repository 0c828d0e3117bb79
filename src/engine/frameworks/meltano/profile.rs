//! Meltano's profile: what its state store is made of, as data (see `framework::Profile`).

use crate::engine::framework::{
    Count, Entities, ExportFormat, Framework, Profile, ResetStyle, TableSet,
};

/// Every table of a Meltano system database.
pub const TABLES: &[&str] = &["alembic_version", "plugin_settings", "runs", "state"];

/// Meltano's own threshold for a stale run (`meltano/core/job/job.py`): a RUNNING run whose last
/// heartbeat is older than 5 minutes, or that never beat and started more than 24 hours ago.
const STALE_RUNS: &str = "SELECT count(*) FROM {s}.runs WHERE state = 'RUNNING' AND \
     ((last_heartbeat_at IS NOT NULL AND last_heartbeat_at < (now() AT TIME ZONE 'UTC') - interval '5 minutes') \
      OR (last_heartbeat_at IS NULL AND started_at < (now() AT TIME ZONE 'UTC') - interval '24 hours'))";

pub static PROFILE: Profile = Profile {
    framework: Framework::Meltano,
    display_name: "Meltano",
    default_schema: "public",
    tables: TableSet::Named {
        tables: TABLES,
        required: &["alembic_version", "runs", "state"],
    },
    entities: Entities {
        noun: "state IDs",
        table: "state",
        key: "state_id",
    },
    marker_table: "plugin_settings",
    owns_schema: false,
    // State and runs go; the settings (configuration, not state) and the revision stay.
    reset: ResetStyle::EmptyTables {
        keep: &["alembic_version", "plugin_settings"],
    },
    counts: &[
        Count {
            name: "state_ids",
            table: "state",
            sql: "",
        },
        Count {
            name: "runs",
            table: "runs",
            sql: "",
        },
        Count {
            name: "successful_runs",
            table: "runs",
            sql: "SELECT count(*) FROM {s}.runs WHERE state = 'SUCCESS'",
        },
        Count {
            name: "failed_runs",
            table: "runs",
            sql: "SELECT count(*) FROM {s}.runs WHERE state = 'FAIL'",
        },
        Count {
            name: "running_runs",
            table: "runs",
            sql: "SELECT count(*) FROM {s}.runs WHERE state = 'RUNNING'",
        },
        Count {
            name: "stale_runs",
            table: "runs",
            sql: STALE_RUNS,
        },
        Count {
            name: "newest_state_update_epoch_seconds",
            table: "state",
            sql: "SELECT coalesce(extract(epoch FROM max(updated_at)), 0) FROM {s}.state",
        },
    ],
    export_formats: &[
        ExportFormat::Exact,
        ExportFormat::Meltano,
        ExportFormat::MeltanoBackend,
    ],
    foreign_operation_hint: Some(
        "Meltano creates and migrates its system database itself (`meltano upgrade database`); \
         take a backup first with `statekeeper state backup --framework meltano`",
    ),
    not_initialized_hint: "Meltano creates its system database tables on its first command \
                           against it (e.g. `meltano state list`) or `meltano upgrade database`",
    version_mismatch_hint: "run `meltano upgrade database` on the older side (this database, or \
                            the one the file was exported from, then export again)",
    migrate_command: &["meltano", "upgrade", "database"],
    janitor_command: &[],
};
