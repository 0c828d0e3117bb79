//! Reading the document `sqlmesh state export` writes into SQLMesh's tables (docs/sqlmesh.md).
//! Each snapshot is stored as written (SQLMesh's own import re-renders some fields while it
//! parses them); the columns SQLMesh derives from it, its intervals, its auto-restatement and
//! each environment with its statements are written as SQLMesh writes them. Everything is staged
//! and checked first, then applied in one transaction under table locks with a backup kept.

mod apply;
mod checks;
mod environment_rows;
mod layout;
mod reader;
mod select;
mod snapshot_rows;

pub(crate) use reader::Sections;

use crate::engine::Error;
use crate::engine::format::staging::{Ending, Incoming, commit_import, removed_by};
use crate::engine::format::stream::Header;
use crate::engine::framework::ExportFormat;
use crate::engine::store::{Store, TableLock};
use crate::engine::transfer::ImportReport;
use checks::FileVersions;
use layout::{INTERVALS, SNAPSHOTS, staged_width};

/// Imports a SQLMesh export into this SQLMesh store: `Replace` empties every table but
/// `_versions` first; `Merge` replaces the file's snapshots (by name and identifier) and
/// environments (by name) and adds its intervals, as `sqlmesh state import` without `--replace`.
pub(crate) async fn import(
    store: &Store,
    header: Header,
    incoming: &mut Incoming<'_>,
) -> Result<ImportReport, Error> {
    let file = FileVersions::read(&header)?;
    let mut tx = store.begin_locked().await?;
    let current = store.require_initialized(&mut tx).await?;
    checks::refuse_other_versions(store, &file, &current)?;
    // The two sections that hold most rows and bytes get partitions of their own; the rest share
    // one (each partition is a table to create and drop, about as long as reading a few thousand
    // small rows).
    let staged = incoming
        .stage(&mut tx, &[SNAPSHOTS, INTERVALS], staged_width())
        .await?;
    let restored = select::keep_selected(&mut tx, &incoming.options.selection).await?;

    store.lock_tables(&mut tx, TableLock::ReadersWait).await?;
    let backup = store
        .backup_before_change(&mut tx, &current, "pre-import")
        .await?;
    let present = store.tables(&mut tx).await?;
    let mode = incoming.options.mode;
    apply::clear_replaced_rows(store, &mut tx, mode, &present).await?;
    apply::insert_staged_rows(store, &mut tx, &staged, &present).await?;
    let ending = Ending {
        format: ExportFormat::Sqlmesh,
        mode,
        source_store: String::new(),
        schema_version: current.schema_version,
        environments: restored
            .as_ref()
            .map_or(staged.environments, |r| r.environments.len() as u64),
        backup,
        removed: removed_by(mode, store, &mut tx).await?,
        restored,
    };
    commit_import(tx, store, incoming, staged, ending).await
}
