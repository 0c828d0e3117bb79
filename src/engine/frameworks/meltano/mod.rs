//! Meltano's system database (docs/meltano.md): its state backend (`state`: Singer bookmarks per
//! state ID), its runs (`runs`), its plugin settings (`plugin_settings`, which may hold
//! credentials) and Alembic's `alembic_version`. Meltano creates and migrates them
//! (`meltano upgrade database`) and does not take statekeeper's advisory lock: statekeeper reads
//! them from one snapshot, writes them under table locks, and never creates or alters them.

pub mod export;
pub mod import;
pub(crate) mod janitor;
pub mod profile;

use std::collections::BTreeMap;

use sqlx::{AssertSqlSafe, PgConnection};

use crate::engine::Error;
use crate::engine::catalog;
use crate::engine::framework::StoreVersion;
use crate::engine::store::Store;

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
    (schema != profile::PROFILE.default_schema)
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
