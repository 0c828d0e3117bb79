//! Meltano's system database (docs/meltano.md): its state backend (`state`: Singer bookmarks per
//! state ID), its runs (`runs`), its plugin settings (`plugin_settings`, which may hold
//! credentials) and Alembic's `alembic_version`. Meltano creates and migrates them
//! (`meltano upgrade database`) and does not take statekeeper's advisory lock: statekeeper reads
//! them from one snapshot, writes them under table locks, and never creates or alters them.

pub mod backend;
pub mod export;
pub mod import;
pub(crate) mod janitor;

use std::collections::BTreeMap;

use sqlx::{AssertSqlSafe, PgConnection};

use super::{
    Count, Entities, ExportFormat, Framework, Profile, ResetStyle, StoreVersion, TableSet,
};
use crate::engine::Error;
use crate::engine::catalog;
use crate::engine::store::Store;

/// Every table of a Meltano system database.
pub const TABLES: &[&str] = &["alembic_version", "plugin_settings", "runs", "state"];

/// Meltano's own threshold for a stale run (`meltano/core/job/job.py`): a RUNNING run whose last
/// heartbeat is older than 5 minutes, or that never beat and started more than 24 hours ago.
const STALE_RUNS: &str = "SELECT count(*) FROM {s}.runs WHERE state = 'RUNNING' AND \
     ((last_heartbeat_at IS NOT NULL AND last_heartbeat_at < (now() AT TIME ZONE 'UTC') - interval '5 minutes') \
      OR (last_heartbeat_at IS NULL AND started_at < (now() AT TIME ZONE 'UTC') - interval '24 hours'))";

pub static PROFILE: Profile = Profile {
    framework: Framework::Meltano,
    name: "meltano",
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

/// The PostgreSQL driver of the Python that runs Meltano: SQLAlchemy needs it named in
/// `MELTANO_DATABASE_URI`. Meltano's `postgres` extra installs psycopg 3, its `psycopg2` extra
/// psycopg2.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MeltanoDriver {
    #[default]
    Psycopg,
    Psycopg2,
}

impl MeltanoDriver {
    /// `MELTANO_DATABASE_URI` for a command that gets the connection as libpq's variables
    /// (`PGHOST`, `PGPASSWORD`, …): no host, no credentials; the driver fills them in from the
    /// environment, so the URI holds no secret.
    pub fn database_uri(self) -> &'static str {
        match self {
            MeltanoDriver::Psycopg => "postgresql+psycopg://",
            MeltanoDriver::Psycopg2 => "postgresql+psycopg2://",
        }
    }

    /// The driver installed beside `meltano` on `PATH` (read from its script's interpreter line),
    /// when one of the two is; `None` when that cannot be told.
    pub fn detect(path: Option<&std::ffi::OsStr>) -> Option<MeltanoDriver> {
        let meltano = std::env::split_paths(path?)
            .map(|dir| dir.join("meltano"))
            .find(|candidate| candidate.is_file())?;
        let first_line = std::fs::read_to_string(&meltano)
            .ok()?
            .lines()
            .next()?
            .to_owned();
        // `#!/venv/bin/python` or `#!/usr/bin/env python3`.
        let mut interpreter = first_line.strip_prefix("#!")?.split_whitespace();
        let program = interpreter.next()?;
        let probe = "import importlib.util as u; \
                     print('psycopg' if u.find_spec('psycopg') else 'psycopg2' if u.find_spec('psycopg2') else '')";
        let out = std::process::Command::new(program)
            .args(interpreter)
            .args(["-c", probe])
            .stdin(std::process::Stdio::null())
            .output()
            .ok()?;
        match String::from_utf8_lossy(&out.stdout).trim() {
            "psycopg" => Some(MeltanoDriver::Psycopg),
            "psycopg2" => Some(MeltanoDriver::Psycopg2),
            _ => None,
        }
    }
}

/// libpq's `PGOPTIONS` that make Meltano find (and create) its tables in `schema` rather than
/// `public`, as `?options=-csearch_path=…` in its URI would.
pub fn search_path_option(schema: &str) -> Option<(String, String)> {
    (schema != PROFILE.default_schema)
        .then(|| ("PGOPTIONS".to_owned(), format!("-c search_path={schema}")))
}

/// Alembic's revision. Revisions are identifiers, not ordered numbers: the schema version is a
/// fingerprint of the revision (equal revisions, equal versions), the revision itself is
/// reported as `alembicRevision`.
pub(crate) async fn read_version(
    store: &Store,
    conn: &mut PgConnection,
) -> Result<Option<StoreVersion>, Error> {
    let schema = store.schema();
    let present =
        catalog::existing_tables(conn, schema.as_str(), &["alembic_version", "runs", "state"])
            .await?;
    if present.len() < 3 {
        return Ok(None);
    }
    let revision: Option<String> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT version_num FROM {}.alembic_version",
        schema.quoted()
    )))
    .fetch_optional(conn)
    .await?;
    let Some(revision) = revision else {
        return Ok(None);
    };
    Ok(Some(StoreVersion {
        schema_version: revision_fingerprint(&revision),
        details: BTreeMap::from([("alembicRevision".to_owned(), revision)]),
    }))
}

/// A positive 31-bit fingerprint of an Alembic revision.
fn revision_fingerprint(revision: &str) -> i32 {
    (crc32fast::hash(revision.as_bytes()) & 0x7fff_ffff) as i32
}
