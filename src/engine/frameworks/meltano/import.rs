//! Reading the document `meltano state export` writes (`{state_id: {"completed": …,
//! "partial": …}}`) into a Meltano system database, as `meltano state import` does: Replace (the
//! store holds exactly the file's state IDs) or Merge (the file's IDs overwrite theirs, the others
//! stay). The whole file is staged and checked before anything changes; one transaction under
//! table locks, with a backup of what it replaces.

use std::sync::Arc;

use sqlx::AssertSqlSafe;

use crate::engine::Error;
use crate::engine::frameworks::ExportFormat;
use crate::engine::import::{
    Cursor, Emitter, Header, ImportMode, ImportReport, Incoming, ScanError, SectionReader,
};
use crate::engine::store::Store;

/// The staging section of state rows.
const STATE: &str = "state";

/// Every member of the document is a state: its key the state ID, its value staged as is.
#[derive(Default)]
pub(crate) struct Sections;

impl Sections {
    /// The reader for a document whose first key (a state ID) was just read.
    pub(crate) fn state(
        cursor: &mut Cursor<&mut dyn std::io::Read>,
        state_id: &str,
        emitter: &mut Emitter,
    ) -> Result<(), ScanError> {
        let section: Arc<str> = Arc::from(STATE);
        let raw = cursor.raw()?;
        emitter.row(&section, state_id, raw).map_err(ScanError)?;
        emitter.environments += 1;
        Ok(())
    }

    /// The header a Meltano document stands for: it carries none of its own.
    pub(crate) fn header() -> Header {
        Header {
            format: ExportFormat::Meltano,
            metadata: serde_json::json!({}),
            versions: serde_json::json!({}),
        }
    }
}

impl SectionReader for Sections {
    fn section(
        &mut self,
        cursor: &mut Cursor<&mut dyn std::io::Read>,
        key: &str,
        emitter: &mut Emitter,
    ) -> Result<(), ScanError> {
        Self::state(cursor, key, emitter)
    }

    fn finish(&mut self, _emitter: &mut Emitter) -> Result<(), ScanError> {
        Ok(())
    }
}

pub(crate) async fn import(
    store: &Store,
    _header: Header,
    incoming: &mut Incoming<'_>,
) -> Result<ImportReport, Error> {
    let mut tx = store.begin_locked().await?;
    let current = store.require_initialized(&mut tx).await?;
    let staged = incoming.stage(&mut tx, &[STATE]).await?;
    // Each state is an object of "completed" and "partial", each an object or null, as
    // `meltano state import` reads them.
    let bad: Option<(String, String)> = sqlx::query_as(
        "SELECT environment, left(doc::text, 200) FROM statekeeper_import \
         WHERE section = 'state' AND (jsonb_typeof(doc) IS DISTINCT FROM 'object' \
            OR EXISTS (SELECT 1 FROM jsonb_object_keys(doc) k WHERE k NOT IN ('completed', 'partial')) \
            OR coalesce(jsonb_typeof(doc -> 'completed'), 'null') NOT IN ('object', 'null') \
            OR coalesce(jsonb_typeof(doc -> 'partial'), 'null') NOT IN ('object', 'null')) \
         ORDER BY seq LIMIT 1",
    )
    .fetch_optional(&mut *tx)
    .await?;
    if let Some((state_id, doc)) = bad {
        return Err(Error::InvalidExport(format!(
            "state \"{state_id}\" is not {{\"completed\": object or null, \"partial\": object or \
             null}}: {doc}"
        )));
    }
    let twice: Option<String> = sqlx::query_scalar(
        "SELECT environment FROM statekeeper_import WHERE section = 'state' \
         GROUP BY environment HAVING count(*) > 1 ORDER BY 1 LIMIT 1",
    )
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(state_id) = twice {
        return Err(Error::InvalidExport(format!(
            "state \"{state_id}\" appears twice"
        )));
    }

    store.lock_tables(&mut tx).await?;
    let backup = store
        .backup_before_change(&mut tx, &current, "pre-import")
        .await?;
    let s = store.schema().quoted();
    let mode = incoming.options.mode;
    let delete = match mode {
        ImportMode::Replace => format!("DELETE FROM {s}.state"),
        ImportMode::Merge => format!(
            "DELETE FROM {s}.state WHERE state_id IN \
             (SELECT environment FROM statekeeper_import WHERE section = 'state')"
        ),
    };
    let value = |member: &str| {
        format!(
            "CASE WHEN coalesce(jsonb_typeof(doc -> '{member}'), 'null') = 'null' THEN NULL \
             ELSE (doc -> '{member}')::text END"
        )
    };
    let statements = [
        delete,
        format!(
            "INSERT INTO {s}.state (state_id, partial_state, completed_state) \
             SELECT environment, {}, {} FROM statekeeper_import WHERE section = 'state' ORDER BY seq",
            value("partial"),
            value("completed")
        ),
    ];
    for statement in statements {
        sqlx::query(AssertSqlSafe(statement))
            .execute(&mut *tx)
            .await?;
    }
    crate::engine::failpoint::hit("import.before_commit");
    tx.commit().await?;
    crate::engine::failpoint::hit("import.committed");
    Ok(ImportReport {
        mode,
        format: ExportFormat::Meltano,
        source_store: String::new(),
        schema_version: current.schema_version,
        environments: staged.environments,
        rows: staged.counts,
        bytes: staged.bytes,
        sha256: staged.sha256,
        compression: incoming.compression,
        backup,
        duration: incoming.started.elapsed(),
    })
}
