//! statekeeper's logical export format v1 (docs/export-format.md): current state only, keyed so
//! that it can be merged; environments with their references and checkpoints. Written from the
//! caller's snapshot; read back by `import.rs` beside this file.

use serde::{Deserialize, Serialize};
use sqlx::{AssertSqlSafe, PgConnection};
use tokio::io::AsyncWrite;

use crate::engine::Error;
use crate::engine::catalog;
use crate::engine::format::copy_binary::stream_table_as_objects;
use crate::engine::format::writer::{
    CopyLines, FLUSH_BYTES, Output, push_copy_json, push_json_string,
};
use crate::engine::guards::refuse_unknown_environments;
use crate::engine::store::{Store, read_snapshot};
use crate::engine::transfer::{ExportOptions, ExportReport};

/// The export file version this statekeeper writes and reads.
pub const FILE_VERSION: u32 = 1;
/// The first schema version whose stores can be exported (every current-state table exists).
pub const EXPORT_MIN_VERSION: i32 = 3;

/// The header of every v1 file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    pub timestamp: String,
    pub file_version: u32,
    /// False would mark a file for reading only (e.g. a partial debugging dump).
    pub importable: bool,
    /// The schema the export was taken from.
    pub store: String,
    /// The environments filter, `null` for a full export.
    pub environments: Option<Vec<String>>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Versions {
    pub schema_version: i32,
    pub statekeeper_version: String,
}

/// Writes the whole document.
pub(crate) async fn write<W: AsyncWrite + Unpin + Send>(
    store: &Store,
    tx: &mut PgConnection,
    out: &mut Output<W>,
    report: &mut ExportReport,
    options: &ExportOptions,
) -> Result<(), Error> {
    let schema_version = store
        .require_version(&mut *tx, EXPORT_MIN_VERSION, "export")
        .await?;
    report.schema_version = schema_version;
    let s = store.schema().quoted();
    if let Some(wanted) = &options.environments {
        refuse_unknown_environments(store, tx, wanted).await?;
    }
    // Timestamps are written in UTC whatever the server's zone, so that equal stores give equal
    // files anywhere; `stream_table_as_objects` writes them so and PostgreSQL's JSON follows.
    sqlx::query("SET LOCAL TimeZone = 'UTC'")
        .execute(&mut *tx)
        .await?;
    let filter = serde_json::to_string(&options.environments.clone().unwrap_or_default())
        .map_err(|e| Error::ExportWrite(e.to_string()))?;
    set_environment_filter(tx, &filter).await?;

    let metadata = Metadata {
        timestamp: chrono::Utc::now().to_rfc3339(),
        file_version: FILE_VERSION,
        importable: true,
        store: store.schema().to_string(),
        environments: options.environments.clone(),
    };
    let versions = Versions {
        schema_version,
        statekeeper_version: env!("CARGO_PKG_VERSION").into(),
    };
    out.write_json_header(&metadata, &versions).await?;

    let filtered = options.environments.is_some();
    // Versions an environment export needs: those its environments and checkpoints reference.
    let (version_filter, function_filter) = if filtered {
        (
            format!(
                "WHERE t.id IN (SELECT model_version_id FROM {s}.virtual_environment_refs WHERE environment = ANY({ENVIRONMENTS})
                   UNION SELECT r.model_version_id FROM {s}.virtual_environment_checkpoint_refs r
                     JOIN {s}.virtual_environment_checkpoints c ON c.id = r.checkpoint_id WHERE c.environment = ANY({ENVIRONMENTS}))"
            ),
            format!(
                "WHERE t.id IN (SELECT function_version_id FROM {s}.virtual_environment_function_refs WHERE environment = ANY({ENVIRONMENTS})
                   UNION SELECT r.function_version_id FROM {s}.virtual_environment_checkpoint_function_refs r
                     JOIN {s}.virtual_environment_checkpoints c ON c.id = r.checkpoint_id WHERE c.environment = ANY({ENVIRONMENTS}))"
            ),
        )
    } else {
        (String::new(), String::new())
    };
    // A full export needs no filter: every row belongs (foreign keys hold the rest).
    let (exported_versions, exported_relations) = if filtered {
        let versions = format!("SELECT t.id FROM {s}.model_versions t {version_filter}");
        let relations =
            format!("SELECT id FROM {s}.physical_relations WHERE model_version_id IN ({versions})");
        (
            format!("WHERE t.model_version_id IN ({versions})"),
            format!(
                "WHERE t.relation_id IN ({relations}) AND t.parent_relation_id IN ({relations})"
            ),
        )
    } else {
        (String::new(), String::new())
    };
    let mut sections: Vec<(&str, String)> = vec![
        ("model_versions", format!("{version_filter} ORDER BY t.id")),
        (
            "model_version_intervals",
            format!("{exported_versions} ORDER BY t.id"),
        ),
        (
            "function_versions",
            format!("{function_filter} ORDER BY t.id"),
        ),
        (
            "physical_relations",
            format!("{exported_versions} ORDER BY t.id"),
        ),
        (
            "physical_relation_ancestry",
            format!("{exported_relations} ORDER BY t.relation_id, t.parent_relation_id"),
        ),
    ];
    if !filtered {
        // Store-wide state belongs to full exports only.
        sections.push(("locks", "ORDER BY t.name".into()));
        sections.push(("state_operations", "ORDER BY t.id".into()));
    }
    for (table, rest) in &sections {
        out.write(format!(",\"{table}\":").as_bytes()).await?;
        out.begin_digest(table);
        out.write(b"[").await?;
        let n =
            stream_table_as_objects(&mut *tx, out, store.schema().as_str(), table, rest).await?;
        out.write(b"]").await?;
        out.end_digest();
        report.rows.insert((*table).to_owned(), n);
    }
    write_environments(store, tx, out, report, filtered.then_some(filter.as_str())).await?;
    out.end_with_manifest(&report.rows).await
}

/// The columns of `virtual_environment_refs`, whose objects the export builds itself
/// (`push_reference`).
const REFERENCE_COLUMNS: [&str; 3] = ["environment", "model_name", "model_version_id"];

/// Where a row of the environments query goes in its environment's object.
const ENVIRONMENT_PARTS: [&str; 4] = ["environment", "refs", "function_refs", "checkpoints"];

/// Rows written per part of the environments' objects, in [`ENVIRONMENT_PARTS`] order.
type PartCounts = [u64; ENVIRONMENT_PARTS.len()];

/// `"environments":{name:{environment, refs, function_refs, checkpoints}, …}`.
///
/// The model references are the bulk of the section. PostgreSQL reads them in their primary
/// key's order from its index on a second connection at the export's snapshot, while the first
/// one sends every environment's own row, function references and checkpoints, sorted (few);
/// each environment's references are written after its row. Sorting the references in with
/// the other rows cost PostgreSQL twice as long as sending the section (text comparisons), and
/// fetching them through a cursor left the server waiting while the client wrote them. Without
/// a spare connection in the pool, or when it cannot read the snapshot, they are sorted in.
async fn write_environments<W: AsyncWrite + Unpin + Send>(
    store: &Store,
    tx: &mut PgConnection,
    out: &mut Output<W>,
    report: &mut ExportReport,
    filter: Option<&str>,
) -> Result<(), Error> {
    let s = &store.schema().quoted();
    let only = |column: &str| {
        if filter.is_some() {
            format!("WHERE {column} = ANY({ENVIRONMENTS})")
        } else {
            String::new()
        }
    };
    let (environments, refs, function_refs, checkpoints) = (
        only("e.name"),
        only("r.environment"),
        only("f.environment"),
        only("c.environment"),
    );
    let refs_doc = reference_doc(store, tx).await?;

    let mut spare = store.spare_connection().await;
    let mut side = begin_side_reader(store, tx, spare.as_deref_mut(), filter).await?;
    // Read under the main transaction's locks, which it holds until after this returns.
    let model_refs = match side.as_mut() {
        Some(side) => Some(
            CopyLines::open(
                side,
                &format!(
                    "COPY (SELECT r.environment, r.model_name, r.model_version_id, {refs_doc}
                     FROM {s}.virtual_environment_refs r {refs} ORDER BY r.environment, r.model_name) TO STDOUT"
                ),
            )
            .await?,
        ),
        None => None,
    };
    let sorted_in_refs = if model_refs.is_none() {
        format!(
            "UNION ALL SELECT r.environment, 1, r.model_name, r.model_version_id, {refs_doc}
             FROM {s}.virtual_environment_refs r {refs}"
        )
    } else {
        String::new()
    };
    let rows = CopyLines::open(
        tx,
        &format!(
            "COPY (SELECT environment, part, name, id, doc FROM (
               SELECT e.name AS environment, 0 AS part, NULL::text AS name, NULL::bigint AS id, row_to_json(e)::text AS doc
                 FROM {s}.virtual_environments e {environments}
               {sorted_in_refs}
               UNION ALL SELECT f.environment, 2, f.function_name, NULL, row_to_json(f)::text
                 FROM {s}.virtual_environment_function_refs f {function_refs}
               UNION ALL SELECT c.environment, 3, NULL, c.id, json_build_object(
                   'checkpoint', row_to_json(c),
                   'refs', COALESCE((SELECT json_agg(row_to_json(r) ORDER BY r.model_name) FROM {s}.virtual_environment_checkpoint_refs r WHERE r.checkpoint_id = c.id), '[]'::json),
                   'function_refs', COALESCE((SELECT json_agg(row_to_json(r) ORDER BY r.function_name) FROM {s}.virtual_environment_checkpoint_function_refs r WHERE r.checkpoint_id = c.id), '[]'::json)
                 )::text
                 FROM {s}.virtual_environment_checkpoints c {checkpoints}
             ) rows ORDER BY environment, part, name, id) TO STDOUT"
        ),
    )
    .await?;

    let counts = write_environment_objects(out, rows, model_refs).await?;
    if let Some(side) = side {
        side.commit().await?;
    }
    record_environment_rows(tx, s, &checkpoints, counts, report).await
}

/// How `row_to_json` would spell a model reference, or NULL where the export builds the object
/// itself (`push_reference`): a table with other columns than this statekeeper knows is written
/// by PostgreSQL.
async fn reference_doc(store: &Store, tx: &mut PgConnection) -> Result<&'static str, Error> {
    let columns = catalog::columns(tx, store.schema().as_str(), "virtual_environment_refs").await?;
    let known = columns
        .iter()
        .map(|(name, _)| name.as_str())
        .eq(REFERENCE_COLUMNS);
    Ok(if known {
        "NULL::text"
    } else {
        "row_to_json(r)::text"
    })
}

/// A transaction on the spare connection at the export's snapshot, to read the model references
/// beside the main one; none without a spare connection, or when it cannot read the snapshot
/// (the references are then sorted in on the export's own connection).
async fn begin_side_reader<'c>(
    store: &Store,
    tx: &mut PgConnection,
    spare: Option<&'c mut PgConnection>,
    filter: Option<&str>,
) -> Result<Option<sqlx::Transaction<'c, sqlx::Postgres>>, Error> {
    let Some(conn) = spare else {
        return Ok(None);
    };
    let snapshot: String = sqlx::query_scalar("SELECT pg_export_snapshot()")
        .fetch_one(&mut *tx)
        .await?;
    match begin_beside(conn, &snapshot, filter).await {
        Ok(side) => Ok(Some(side)),
        Err(e) => {
            tracing::debug!(
                schema = %store.schema(),
                error = %e,
                "reading the references on the export's own connection"
            );
            Ok(None)
        }
    }
}

/// Writes `"environments":{…}` from the environments query's `rows` (sorted by environment and
/// part), each environment's references from `model_refs` right after its row where a side
/// connection sends them. Returns the rows written per part.
async fn write_environment_objects<W: AsyncWrite + Unpin + Send>(
    out: &mut Output<W>,
    mut rows: CopyLines<'_>,
    mut model_refs: Option<CopyLines<'_>>,
) -> Result<PartCounts, Error> {
    out.write(b",\"environments\":").await?;
    out.begin_digest("environments");
    out.write(b"{").await?;
    let mut counts = [0u64; 4];
    // The part the last row went to in the open environment; None before the first.
    let mut open: Option<usize> = None;
    let mut first_in_part = true;
    let mut json = Vec::with_capacity(FLUSH_BYTES + 64 * 1024);
    while let Some(line) = rows.line() {
        let [environment, part, name, id, doc] = fields(line)?;
        let part = match part {
            b"0" => 0,
            b"1" => 1,
            b"2" => 2,
            b"3" => 3,
            _ => return Err(corrupt_row()),
        };
        counts[part] += 1;
        if part == 0 {
            if let Some(at) = open {
                close_environment(at, &mut json);
                json.push(b',');
            }
            push_json_string(environment, &mut json)?;
            json.extend_from_slice(b":{\"environment\":");
            push_copy_json(doc, &mut json)?;
            json.extend_from_slice(b",\"refs\":[");
            open = Some(1);
            first_in_part = true;
            if let Some(model_refs) = model_refs.as_mut() {
                let written = write_side_refs(environment, model_refs, &mut json, out).await?;
                counts[1] += written;
                first_in_part = written == 0;
            }
        } else {
            let Some(mut at) = open else {
                return Err(corrupt_row());
            };
            if at < part {
                at = open_parts(at, part, &mut json);
                first_in_part = true;
            } else if at > part {
                return Err(corrupt_row());
            }
            if !first_in_part {
                json.push(b',');
            }
            first_in_part = false;
            if part == 1 {
                push_reference(environment, name, id, doc, &mut json)?;
            } else {
                push_copy_json(doc, &mut json)?;
            }
            open = Some(at);
        }
        rows.advance().await?;
        if json.len() >= FLUSH_BYTES {
            out.write(&json).await?;
            json.clear();
        }
    }
    drop(rows);
    if let Some(at) = open {
        close_environment(at, &mut json);
    }
    json.push(b'}');
    out.write(&json).await?;
    out.end_digest();
    // A reference left over belongs to no environment that was written.
    let left_over = model_refs.is_some_and(|left| left.line().is_some());
    if left_over {
        return Err(corrupt_row());
    }
    Ok(counts)
}

/// Writes the model references of `environment` (whose `"refs":[` is open) from the side
/// connection, which sends them in the environments' order; returns how many.
async fn write_side_refs<W: AsyncWrite + Unpin + Send>(
    environment: &[u8],
    model_refs: &mut CopyLines<'_>,
    json: &mut Vec<u8>,
    out: &mut Output<W>,
) -> Result<u64, Error> {
    let mut written = 0;
    while let Some(reference) = model_refs.line() {
        let [ref_environment, name, id, doc] = fields(reference)?;
        if ref_environment != environment {
            break;
        }
        if written > 0 {
            json.push(b',');
        }
        push_reference(ref_environment, name, id, doc, json)?;
        written += 1;
        model_refs.advance().await?;
        if json.len() >= FLUSH_BYTES {
            out.write(json).await?;
            json.clear();
        }
    }
    Ok(written)
}

/// The report's counts of the environments section: the written rows per part, and the
/// checkpoints' references (written inside their checkpoints) counted by PostgreSQL.
async fn record_environment_rows(
    tx: &mut PgConnection,
    s: &str,
    checkpoints: &str,
    counts: PartCounts,
    report: &mut ExportReport,
) -> Result<(), Error> {
    let (checkpoint_refs, checkpoint_function_refs): (i64, i64) = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT (SELECT count(*) FROM {s}.virtual_environment_checkpoint_refs r JOIN {s}.virtual_environment_checkpoints c ON c.id = r.checkpoint_id {checkpoints}),
                (SELECT count(*) FROM {s}.virtual_environment_checkpoint_function_refs r JOIN {s}.virtual_environment_checkpoints c ON c.id = r.checkpoint_id {checkpoints})"
    )))
    .fetch_one(&mut *tx)
    .await?;
    report.environments = counts[0];
    for (table, n) in [
        ("virtual_environments", counts[0]),
        ("virtual_environment_refs", counts[1]),
        ("virtual_environment_function_refs", counts[2]),
        ("virtual_environment_checkpoints", counts[3]),
        (
            "virtual_environment_checkpoint_refs",
            checkpoint_refs as u64,
        ),
        (
            "virtual_environment_checkpoint_function_refs",
            checkpoint_function_refs as u64,
        ),
    ] {
        report.rows.insert(table.into(), n);
    }
    Ok(())
}

/// A transaction on `conn` that reads `snapshot` with the export's environment filter.
async fn begin_beside<'c>(
    conn: &'c mut PgConnection,
    snapshot: &str,
    filter: Option<&str>,
) -> Result<sqlx::Transaction<'c, sqlx::Postgres>, Error> {
    let mut side = sqlx::Connection::begin(conn).await?;
    read_snapshot(&mut side, snapshot).await?;
    if let Some(filter) = filter {
        set_environment_filter(&mut side, filter).await?;
    }
    Ok(side)
}

/// COPY takes no parameters: the environments filter (a JSON array of names) travels in a
/// transaction-local setting that [`ENVIRONMENTS`] reads, instead of being spliced into SQL text.
async fn set_environment_filter(conn: &mut PgConnection, filter: &str) -> Result<(), Error> {
    sqlx::query("SELECT set_config('statekeeper.export_environments', $1, true)")
        .bind(filter)
        .execute(conn)
        .await?;
    Ok(())
}

/// The `N` tab-separated fields of a COPY text line.
fn fields<const N: usize>(line: &[u8]) -> Result<[&[u8]; N], Error> {
    let mut fields = line.split(|b| *b == b'\t');
    let mut out: [&[u8]; N] = [&[]; N];
    for slot in &mut out {
        *slot = fields.next().ok_or_else(corrupt_row)?;
    }
    match fields.next() {
        Some(_) => Err(corrupt_row()),
        None => Ok(out),
    }
}

/// A model reference's object: as PostgreSQL wrote it (`doc`), or built from its three columns
/// as `row_to_json` builds it.
fn push_reference(
    environment: &[u8],
    model_name: &[u8],
    version_id: &[u8],
    doc: &[u8],
    json: &mut Vec<u8>,
) -> Result<(), Error> {
    if doc != b"\\N" {
        return push_copy_json(doc, json);
    }
    json.extend_from_slice(b"{\"environment\":");
    push_json_string(environment, json)?;
    json.extend_from_slice(b",\"model_name\":");
    push_json_string(model_name, json)?;
    json.extend_from_slice(b",\"model_version_id\":");
    json.extend_from_slice(version_id);
    json.push(b'}');
    Ok(())
}

/// Closes the open part and opens each one after it up to `part` (every part is written, with
/// rows or empty); returns `part`.
fn open_parts(mut at: usize, part: usize, json: &mut Vec<u8>) -> usize {
    while at < part {
        at += 1;
        json.extend_from_slice(if at == 1 { b"," } else { b"]," });
        json.push(b'"');
        json.extend_from_slice(ENVIRONMENT_PARTS[at].as_bytes());
        json.extend_from_slice(b"\":[");
    }
    at
}

/// Ends an environment's object after its last row.
fn close_environment(at: usize, json: &mut Vec<u8>) {
    open_parts(at, ENVIRONMENT_PARTS.len() - 1, json);
    json.extend_from_slice(b"]}");
}

fn corrupt_row() -> Error {
    Error::ExportWrite(
        "PostgreSQL returned an environment row in an unexpected shape; refusing to write a corrupt export"
            .into(),
    )
}

/// SQL expressions for the environment filters, read from transaction-local settings.
const ENVIRONMENTS: &str = "ARRAY(SELECT jsonb_array_elements_text(current_setting('statekeeper.export_environments')::jsonb))";
