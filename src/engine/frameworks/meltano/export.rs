//! Writing the document `meltano state export` writes: one JSON object mapping each state ID to
//! `{"completed": …, "partial": …}`, each state as Meltano stored it (its JSON text, whitespace
//! between tokens aside). Streamed row by row from one snapshot: memory stays flat.

use sqlx::PgConnection;
use tokio::io::AsyncWrite;

use crate::engine::Error;
use crate::engine::export::{ExportOptions, ExportReport, Output, refuse_unknown_environments};
use crate::engine::identifier::quote_literal;
use crate::engine::store::Store;

/// Writes the whole document from the caller's snapshot. `options.environments` selects state
/// IDs: exact names (each must exist) or `*` globs, as `meltano state list` takes them.
pub(crate) async fn write<W: AsyncWrite + Unpin + Send>(
    store: &Store,
    tx: &mut PgConnection,
    out: &mut Output<W>,
    report: &mut ExportReport,
    options: &ExportOptions,
) -> Result<(), Error> {
    let version = store.require_initialized(tx).await?;
    report.schema_version = version.schema_version;
    let s = store.schema().quoted();
    let filter = selection(store, tx, options).await?;
    // Raw line ends can only be whitespace between JSON tokens (never inside strings): they go,
    // so that each state is one line of the stream.
    let state = |column: &str| {
        format!("coalesce(translate({column}::json::text, E'\\n\\r', '  '), 'null')")
    };
    let sql = format!(
        "SELECT to_json(state_id)::text || ':{{\"completed\":' || {} || ',\"partial\":' || {} || '}}' \
         FROM {s}.state{filter} ORDER BY state_id",
        state("completed_state"),
        state("partial_state")
    );
    out.write(b"{").await?;
    let rows = out.stream_rows(tx, &sql).await?;
    out.write(b"}").await?;
    report.environments = rows;
    report.rows.insert("state".into(), rows);
    Ok(())
}

/// The `WHERE` clause (or nothing) of the state IDs `options.environments` selects: exact names
/// (each must exist) or `*` globs, as `meltano state list` takes them.
pub(crate) async fn selection(
    store: &Store,
    tx: &mut PgConnection,
    options: &ExportOptions,
) -> Result<String, Error> {
    let Some(wanted) = &options.environments else {
        return Ok(String::new());
    };
    let s = store.schema().quoted();
    let exact: Vec<String> = wanted
        .iter()
        .filter(|w| !w.contains('*'))
        .cloned()
        .collect();
    refuse_unknown_environments(tx, &format!("{s}.state"), "state_id", &exact).await?;
    let patterns: Vec<String> = wanted
        .iter()
        .map(|w| quote_literal(&like_pattern(w)))
        .collect();
    Ok(format!(
        " WHERE state_id LIKE ANY (ARRAY[{}]::text[])",
        patterns.join(", ")
    ))
}

/// A `*` glob as a LIKE pattern; `%`, `_` and `\` match themselves.
fn like_pattern(glob: &str) -> String {
    glob.replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_")
        .replace('*', "%")
}
