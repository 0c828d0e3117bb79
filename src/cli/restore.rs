//! Restore in part, on the command line: `state import --merge --environment NAME…` (or
//! `--model`, `--state-id`) from a file or, with `--backup-id`, from an in-database backup, and
//! the same flags on `state plan import`.

use clap::Args;

use crate::engine::{Error, Selection};

/// What a restore in part takes from its source (none: the whole source).
#[derive(Args, Debug, Default)]
pub struct SelectionArgs {
    /// Restore in part: only this environment, with the snapshots (SQLMesh) or versions
    /// (statekeeper) it references; everything else stays. Repeatable; needs --merge.
    #[arg(long = "environment", value_name = "NAME")]
    environments: Vec<String>,
    /// Restore in part: only this model's snapshots or versions, with their intervals (no
    /// environment changes unless --environment names it). `"db"."schema"."name"`, `schema.name`
    /// or `db.schema.name`. Repeatable; needs --merge.
    #[arg(long = "model", value_name = "NAME")]
    models: Vec<String>,
    /// Restore in part (Meltano): only this state ID, or the state IDs a `*` glob matches.
    /// Repeatable; needs --merge.
    #[arg(long = "state-id", value_name = "ID")]
    state_ids: Vec<String>,
}

impl SelectionArgs {
    /// The selection, refused without an explicit `--merge`: restoring a part replaces only that
    /// part, and says so.
    pub fn selection(&self, merge: bool) -> Result<Selection, Error> {
        let selection = Selection {
            environments: self.environments.clone(),
            models: self.models.clone(),
            state_ids: self.state_ids.clone(),
        };
        if !selection.is_empty() && !merge {
            return Err(Error::InvalidOperation(format!(
                "restoring {} in part is a merge: pass --merge (the rest of the store stays as \
                 it is; a replace would remove it)",
                selection.describe()
            )));
        }
        Ok(selection)
    }
}
