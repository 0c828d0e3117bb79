//! Reading the document `meltano state export` writes (`{state_id: {"completed": …,
//! "partial": …}}`) into a Meltano system database, as `meltano state import` does: Replace (the
//! store holds exactly the file's state IDs) or Merge (the file's IDs overwrite theirs, the others
//! stay). The whole file is staged and checked before anything changes; one transaction under
//! table locks, with a backup of what it replaces.

use std::sync::Arc;

use sqlx::AssertSqlSafe;

use crate::engine::Error;
use crate::engine::format::reader::{Emitter, SectionReader};
use crate::engine::format::selection::{like_pattern_sql, refuse_unmatched};
use crate::engine::format::staging::{
    Ending, Incoming, commit_import, remember_entities, removed_by,
};
use crate::engine::format::stream::Header;
use crate::engine::framework::ExportFormat;
use crate::engine::json::python_dumps;
use crate::engine::jsonscan::{Cursor, ScanError};
use crate::engine::store::{Store, TableLock};
use crate::engine::transfer::{ImportMode, ImportReport, Restored};

/// The staging section of state rows.
const STATE: &str = "state";

/// Every member of the document is a state: its key the state ID, its value staged as is.
#[derive(Default)]
pub(crate) struct Sections;

impl Sections {
    /// The reader for a document whose first key (a state ID) was just read. The state is
    /// checked here and staged as the two texts Meltano stores, spelled as its `json.dumps`
    /// spells them: the server parses nothing.
    pub(crate) fn state(
        cursor: &mut Cursor<&mut dyn std::io::Read>,
        state_id: &str,
        emitter: &mut Emitter,
    ) -> Result<(), ScanError> {
        let not_a_state = |found: &str| {
            ScanError(format!(
                "state \"{state_id}\" is not {{\"completed\": object or null, \"partial\": object \
                 or null}}: {found}"
            ))
        };
        if cursor.peek_value()? != b'{' {
            let raw = cursor.raw()?;
            return Err(not_a_state(&String::from_utf8_lossy(
                &raw[..raw.len().min(200)],
            )));
        }
        let (mut completed, mut partial) = (None, None);
        cursor.object(|cursor, key| {
            let raw = cursor.raw()?;
            let member = match key.as_str() {
                "completed" => &mut completed,
                "partial" => &mut partial,
                _ => return Err(not_a_state(&format!("it has \"{key}\""))),
            };
            *member = state_text(&raw).map_err(|e| not_a_state(&format!("its {key} {e}")))?;
            Ok(())
        })?;
        let section: Arc<str> = Arc::from(STATE);
        emitter
            .fields(
                &section,
                vec![Some(state_id.to_owned()), completed, partial],
            )
            .map_err(ScanError)?;
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

/// A member of a state as the text Meltano stores (None for `null`); refuses all but an object.
fn state_text(raw: &[u8]) -> Result<Option<String>, String> {
    if raw == b"null" {
        return Ok(None);
    }
    if raw.first() != Some(&b'{') {
        return Err(format!(
            "is {}, not an object",
            String::from_utf8_lossy(&raw[..raw.len().min(200)])
        ));
    }
    serde_json::from_slice::<serde::de::IgnoredAny>(raw)
        .map_err(|e| format!("is not JSON: {e}"))?;
    let text = std::str::from_utf8(raw).map_err(|_| "is not UTF-8".to_string())?;
    Ok(Some(python_dumps(text)))
}

/// A state ID that comes twice stops the load with the table's key violation: named as such.
fn state_id_twice(error: Error) -> Error {
    let detail = match &error {
        Error::InvalidExport(reason) => reason.clone(),
        Error::Database(sqlx::Error::Database(db)) => db
            .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
            .and_then(|pg| pg.detail())
            .map(|detail| format!("{} ({detail})", db.message()))
            .unwrap_or_default(),
        _ => return error,
    };
    if !detail.contains("statekeeper_meltano_state_pkey") {
        return error;
    }
    match detail
        .split_once("Key (state_id)=(")
        .and_then(|(_, rest)| rest.rsplit_once(") already exists"))
    {
        Some((state_id, _)) => Error::InvalidExport(format!("state \"{state_id}\" appears twice")),
        None => Error::InvalidExport("a state ID appears twice".into()),
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
    // Each state was checked as it was read (an object of "completed" and "partial", each an
    // object or null, as `meltano state import` reads them) and comes as the texts Meltano
    // stores: they go by COPY into a table of the same columns, keyed so that a state ID that
    // comes twice stops the load.
    sqlx::raw_sql(
        "CREATE TEMP TABLE statekeeper_meltano_state (state_id text PRIMARY KEY, completed_state text, partial_state text) ON COMMIT DROP",
    )
    .execute(&mut *tx)
    .await?;
    let staged = incoming
        .copy_fields_into(
            &mut tx,
            "statekeeper_meltano_state",
            &["state_id", "completed_state", "partial_state"],
        )
        .await
        .map_err(state_id_twice)?;
    let restored = keep_selected(&mut tx, &incoming.options.selection.state_ids).await?;

    store.lock_tables(&mut tx, TableLock::ReadersWait).await?;
    let backup = store
        .backup_before_change(&mut tx, &current, "pre-import")
        .await?;
    let s = store.schema().quoted();
    let mode = incoming.options.mode;
    if mode == ImportMode::Replace {
        remember_entities(store, &mut tx).await?;
    }
    let delete = match mode {
        ImportMode::Replace => format!("DELETE FROM {s}.state"),
        ImportMode::Merge => format!(
            "DELETE FROM {s}.state WHERE state_id IN (SELECT state_id FROM statekeeper_meltano_state)"
        ),
    };
    let statements = [
        delete,
        format!(
            "INSERT INTO {s}.state (state_id, completed_state, partial_state) \
             SELECT state_id, completed_state, partial_state FROM statekeeper_meltano_state"
        ),
    ];
    for statement in statements {
        sqlx::query(AssertSqlSafe(statement))
            .execute(&mut *tx)
            .await?;
    }
    let ending = Ending {
        format: ExportFormat::Meltano,
        mode,
        source_store: String::new(),
        schema_version: current.schema_version,
        environments: restored
            .as_ref()
            .map_or(staged.environments, |r| r.state_ids.len() as u64),
        backup,
        removed: removed_by(mode, store, &mut tx).await?,
        restored,
    };
    commit_import(tx, store, incoming, staged, ending).await
}

/// A restore in part: keeps only the staged states whose IDs `asked` names (exact, or `*`
/// globs), each of which must match one; `None` when nothing was asked (the whole file).
async fn keep_selected(
    conn: &mut sqlx::PgConnection,
    asked: &[String],
) -> Result<Option<Restored>, Error> {
    if asked.is_empty() {
        return Ok(None);
    }
    let matches = format!("s.state_id LIKE {}", like_pattern_sql("a"));
    refuse_unmatched(
        conn,
        "state ID",
        asked,
        &format!(
            "SELECT a FROM unnest($1::text[]) a WHERE NOT EXISTS \
             (SELECT 1 FROM statekeeper_meltano_state s WHERE {matches})"
        ),
        "SELECT state_id FROM statekeeper_meltano_state ORDER BY 1",
    )
    .await?;
    sqlx::query(AssertSqlSafe(format!(
        "DELETE FROM statekeeper_meltano_state s WHERE NOT EXISTS \
         (SELECT 1 FROM unnest($1::text[]) a WHERE {matches})"
    )))
    .bind(asked)
    .execute(&mut *conn)
    .await?;
    let state_ids: Vec<String> =
        sqlx::query_scalar("SELECT state_id FROM statekeeper_meltano_state ORDER BY 1")
            .fetch_all(&mut *conn)
            .await?;
    Ok(Some(Restored {
        state_ids,
        ..Default::default()
    }))
}
