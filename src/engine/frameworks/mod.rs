//! The registry of frameworks: each framework's profile, and finding which framework's store a
//! database holds. Everything a framework alone knows lives in its own module here; what acts on
//! a store through a framework's hooks is dispatched from `hooks.rs`.
//!
//! Adding a framework is one new module with a profile and its hooks, plus one arm in each
//! `match` over `Framework` (the compiler lists them).

pub mod meltano;
pub mod sqlmesh;
pub mod statekeeper;

use serde::Serialize;
use sqlx::PgConnection;

use super::Error;
use super::framework::{Framework, Profile};

impl Framework {
    pub fn profile(self) -> &'static Profile {
        match self {
            Framework::Statekeeper => &statekeeper::profile::PROFILE,
            Framework::Sqlmesh => &sqlmesh::profile::PROFILE,
            Framework::Meltano => &meltano::profile::PROFILE,
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
