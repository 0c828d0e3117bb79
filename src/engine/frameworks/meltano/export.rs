//! Writing the document `meltano state export` writes: one JSON object mapping each state ID to
//! `{"completed": …, "partial": …}`, each state as Meltano stored it (its JSON text, whitespace
//! between tokens aside). Streamed row by row from one snapshot: memory stays flat.

use sqlx::PgConnection;
use tokio::io::AsyncWrite;

use crate::engine::Error;
use crate::engine::format::writer::{
    Output, push_json_string, transform_copy_lines, unescape_copy_field,
};
use crate::engine::guards::refuse_unknown_environments;
use crate::engine::identifier::quote_literal;
use crate::engine::store::Store;
use crate::engine::transfer::{ExportOptions, ExportReport};

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
    report.versions = version.details.clone();
    let s = store.schema().quoted();
    let filter = selection(store, tx, options).await?;
    // The columns as COPY's text sends them; each state is checked and written on the client
    // (PostgreSQL's json cast and translate() cost ten times the COPY itself).
    let sql = format!(
        "COPY (SELECT state_id, completed_state, partial_state FROM {s}.state{filter} ORDER BY state_id) TO STDOUT"
    );
    out.write(b"{").await?;
    let mut scratch = Vec::new();
    let rows = transform_copy_lines(tx, out, &sql, |index, line, json| {
        let mut fields = line.split(|b| *b == b'\t');
        let (Some(id), Some(completed), Some(partial), None) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return Err(Error::ExportWrite(
                "PostgreSQL sent a state row with another number of columns".into(),
            ));
        };
        if index > 0 {
            json.push(b',');
        }
        push_json_string(id, json)?;
        json.extend_from_slice(b":{\"completed\":");
        push_state(id, "completed_state", completed, &mut scratch, json)?;
        json.extend_from_slice(b",\"partial\":");
        push_state(id, "partial_state", partial, &mut scratch, json)?;
        json.push(b'}');
        Ok(())
    })
    .await?;
    out.write(b"}").await?;
    report.environments = rows;
    report.rows.insert("state".into(), rows);
    Ok(())
}

/// A state column's COPY field as the JSON Meltano stored (`null` for NULL), checked to be JSON.
/// Raw line ends can only be whitespace between tokens (never inside strings): they become
/// spaces, so that the text is the same JSON on one line.
fn push_state(
    id: &[u8],
    column: &str,
    field: &[u8],
    scratch: &mut Vec<u8>,
    json: &mut Vec<u8>,
) -> Result<(), Error> {
    if field == b"\\N" {
        json.extend_from_slice(b"null");
        return Ok(());
    }
    // Without a backslash the field is the text itself, and holds no line end.
    let text = if field.contains(&b'\\') {
        scratch.clear();
        unescape_copy_field(field, |byte| {
            scratch.push(if byte == b'\n' || byte == b'\r' {
                b' '
            } else {
                byte
            })
        })?;
        &scratch[..]
    } else {
        field
    };
    if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(text) {
        let mut id_text = Vec::new();
        unescape_copy_field(id, |byte| id_text.push(byte))?;
        return Err(Error::ExportWrite(format!(
            "state ID {} has a {column} that is not JSON: {e}",
            String::from_utf8_lossy(&id_text)
        )));
    }
    json.extend_from_slice(text);
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
    let exact: Vec<String> = wanted
        .iter()
        .filter(|w| !w.contains('*'))
        .cloned()
        .collect();
    refuse_unknown_environments(store, tx, &exact).await?;
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
