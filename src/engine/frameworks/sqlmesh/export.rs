//! Writing the document `sqlmesh state export` writes (docs/sqlmesh.md), straight from
//! SQLMesh's tables: each snapshot is its stored JSON as stored, with the fields SQLMesh keeps in
//! columns put back and its intervals computed from `_intervals` as SQLMesh computes them; each
//! environment is its row with its statements. Memory holds one snapshot, or one environment's
//! list of snapshots, at a time, and the names and fingerprints of the listed snapshots.

use std::collections::{HashMap, HashSet};

use futures::TryStreamExt;
use serde::Deserialize;
use serde_json::value::RawValue;
use sqlx::{AssertSqlSafe, PgConnection, Row as _};
use tokio::io::AsyncWrite;

use super::intervals::{self, Unit};
use super::{Fingerprint, OrderedObject, SNAPSHOT_FIELDS};
use crate::engine::Error;
use crate::engine::catalog;
use crate::engine::format::writer::Output;
use crate::engine::guards::refuse_unknown_environments;
use crate::engine::store::Store;
use crate::engine::transfer::{ExportOptions, ExportReport};

/// `metadata`, with SQLMesh's fields in SQLMesh's order.
#[derive(serde::Serialize)]
struct Metadata {
    timestamp: String,
    file_version: u32,
    importable: bool,
}

/// Writes the whole document from the caller's snapshot.
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
    if let Some(wanted) = &options.environments {
        refuse_unknown_environments(store, tx, wanted).await?;
    }
    let versions: String = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT json_build_object('schema_version', schema_version, 'sqlglot_version', sqlglot_version, 'sqlmesh_version', sqlmesh_version)::text FROM {s}._versions"
    )))
    .fetch_one(&mut *tx)
    .await?;
    let metadata = Metadata {
        // As SQLMesh writes it: UTC, to the minute.
        timestamp: chrono::Utc::now()
            .format("%Y-%m-%d %H:%M:00+00:00")
            .to_string(),
        file_version: 1,
        importable: true,
    };
    out.write_json_header(
        &metadata,
        &RawValue::from_string(versions).map_err(json_error)?,
    )
    .await?;

    // SQLMesh's own import reads the sections it knows by name: the manifest at the end is
    // invisible to it.
    out.write(b",\"snapshots\":").await?;
    out.begin_digest("snapshots");
    out.write(b"[").await?;
    let snapshots = write_snapshots(store, tx, out, options).await?;
    report.rows.insert("snapshots".into(), snapshots);
    out.write(b"]").await?;
    out.end_digest();
    out.write(b",\"environments\":").await?;
    out.begin_digest("environments");
    out.write(b"{").await?;
    let environments = write_environments(store, tx, out, options).await?;
    report.environments = environments;
    report.rows.insert("environments".into(), environments);
    out.write(b"}").await?;
    out.end_with_manifest(&report.rows).await
}

/// The snapshots the chosen environments reference, each with its intervals.
async fn write_snapshots<W: AsyncWrite + Unpin + Send>(
    store: &Store,
    tx: &mut PgConnection,
    out: &mut Output<W>,
    options: &ExportOptions,
) -> Result<u64, Error> {
    let s = store.schema().quoted();
    // A snapshot's intervals are those of its version; SQLMesh derives a missing version from
    // the fingerprint, which SQL cannot: such (rare) snapshots get theirs passed in.
    let unversioned: Vec<(String, String, String)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT name, identifier, fingerprint FROM {s}._snapshots WHERE version IS NULL"
    )))
    .fetch_all(&mut *tx)
    .await?;
    let mut fallback = (Vec::new(), Vec::new(), Vec::new());
    for (name, identifier, fingerprint) in unversioned {
        let fingerprint: Fingerprint = serde_json::from_str(&fingerprint).map_err(|e| {
            Error::ExportWrite(format!(
                "snapshot {name} has an unreadable fingerprint: {e}"
            ))
        })?;
        fallback.0.push(name);
        fallback.1.push(identifier);
        fallback.2.push(fingerprint.to_version());
    }
    let auto_restatements =
        catalog::table_exists(&mut *tx, store.schema().as_str(), "_auto_restatements").await?;
    let next_restatement = if auto_restatements {
        format!(
            "(SELECT a.next_auto_restatement_ts FROM {s}._auto_restatements a WHERE a.snapshot_name = s.name AND a.snapshot_version = s.version)"
        )
    } else {
        "NULL::bigint".into()
    };
    let listed = listed_snapshots(store, tx, options).await?;
    // As SQLMesh's export: the listed snapshots by their ids (name and the identifier of their
    // fingerprint), each row found by the table's key.
    let sql = format!(
        "SELECT s.snapshot, s.identifier, s.updated_ts, s.unpaused_ts, s.unrestorable, s.forward_only,
                {next_restatement} AS next_auto_restatement_ts,
                (SELECT COALESCE(json_agg(json_build_array(i.identifier, i.dev_version, i.start_ts, i.end_ts,
                                                           i.is_dev, i.is_removed, i.is_pending_restatement, i.last_altered_ts)
                                          ORDER BY i.created_ts, i.is_removed, i.is_pending_restatement), '[]')::text
                 FROM {s}._intervals i
                 WHERE i.name = s.name AND i.version = COALESCE(s.version, fb.version)) AS intervals
         FROM unnest($4::text[], $5::text[]) AS ids(name, identifier)
         JOIN {s}._snapshots s ON s.name = ids.name AND s.identifier = ids.identifier
         LEFT JOIN unnest($1::text[], $2::text[], $3::text[]) AS fb(name, identifier, version)
                ON fb.name = s.name AND fb.identifier = s.identifier
         ORDER BY s.name, s.identifier",
    );
    let mut units: HashMap<String, Unit> = HashMap::new();
    let mut rows = sqlx::query(AssertSqlSafe(sql))
        .bind(&fallback.0)
        .bind(&fallback.1)
        .bind(&fallback.2)
        .bind(&listed.names)
        .bind(&listed.identifiers)
        .fetch(&mut *tx);
    let mut written = 0u64;
    let mut line = String::with_capacity(64 * 1024);
    while let Some(row) = rows.try_next().await? {
        let columns = Columns {
            snapshot: row.try_get("snapshot")?,
            identifier: row.try_get("identifier")?,
            updated_ts: row.try_get("updated_ts")?,
            unpaused_ts: row.try_get("unpaused_ts")?,
            unrestorable: row.try_get("unrestorable")?,
            forward_only: row.try_get("forward_only")?,
            next_auto_restatement_ts: row.try_get("next_auto_restatement_ts")?,
            intervals: row.try_get("intervals")?,
        };
        line.clear();
        if written > 0 {
            line.push(',');
        }
        snapshot_json(&columns, &mut units, &mut line)?;
        out.write(line.as_bytes()).await?;
        written += 1;
    }
    Ok(written)
}

/// The ids of the snapshots the chosen environments list (each once), as columns to bind.
#[derive(Default)]
struct Listed {
    names: Vec<String>,
    identifiers: Vec<String>,
}

/// An element of an environment's list of snapshots: the fields that identify it.
#[derive(Deserialize)]
struct ListedSnapshot {
    name: String,
    #[serde(default)]
    fingerprint: Fingerprint,
}

/// Reads the environments' lists of snapshots one environment at a time and parses them here:
/// PostgreSQL's JSON parser took most of the export's time on them.
async fn listed_snapshots(
    store: &Store,
    tx: &mut PgConnection,
    options: &ExportOptions,
) -> Result<Listed, Error> {
    let mut rows = sqlx::query_as::<_, (String, Option<String>)>(AssertSqlSafe(format!(
        "SELECT name, snapshots FROM {}._environments WHERE $1::text[] IS NULL OR name = ANY($1)",
        store.schema().quoted()
    )))
    .bind(&options.environments)
    .fetch(&mut *tx);
    let mut seen = HashSet::new();
    let mut listed = Listed::default();
    while let Some((environment, list)) = rows.try_next().await? {
        let Some(list) = list else { continue };
        let elements: Vec<ListedSnapshot> = serde_json::from_str(&list).map_err(|e| {
            Error::ExportWrite(format!(
                "environment {environment} has an unreadable list of snapshots: {e}"
            ))
        })?;
        for ListedSnapshot { name, fingerprint } in elements {
            let id = (name, fingerprint.to_identifier());
            if seen.insert(id.clone()) {
                listed.names.push(id.0);
                listed.identifiers.push(id.1);
            }
        }
    }
    Ok(listed)
}

/// One `_snapshots` row with what it takes from other tables.
struct Columns {
    snapshot: Option<String>,
    identifier: String,
    updated_ts: Option<i64>,
    unpaused_ts: Option<i64>,
    unrestorable: Option<bool>,
    forward_only: Option<bool>,
    next_auto_restatement_ts: Option<i64>,
    /// `[[identifier, dev_version, start, end, is_dev, is_removed, is_pending, last_altered], …]`
    intervals: String,
}

/// The facts of a snapshot's node that its intervals depend on.
#[derive(Deserialize)]
struct NodeFacts {
    #[serde(default)]
    source_type: Option<String>,
    #[serde(default)]
    cron: Option<String>,
    #[serde(default)]
    interval_unit: Option<String>,
    #[serde(default)]
    allow_partials: Option<bool>,
}

type IntervalRow = (
    Option<String>,
    Option<String>,
    i64,
    i64,
    Option<bool>,
    Option<bool>,
    Option<bool>,
    Option<i64>,
);

/// Appends the exported form of one snapshot to `out`, in the field order of SQLMesh's model.
fn snapshot_json(
    columns: &Columns,
    units: &mut HashMap<String, Unit>,
    out: &mut String,
) -> Result<(), Error> {
    let stored = columns.snapshot.as_deref().unwrap_or("{}");
    let OrderedObject(fields) = serde_json::from_str(stored).map_err(|e| {
        Error::ExportWrite(format!(
            "snapshot {} has unreadable stored JSON: {e}",
            columns.identifier
        ))
    })?;
    let field = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| v.get());
    let unreadable = |what: &str, e: &dyn std::fmt::Display| {
        Error::ExportWrite(format!(
            "snapshot {} has an unreadable {what}: {e}",
            columns.identifier
        ))
    };
    let fingerprint: Fingerprint = serde_json::from_str(field("fingerprint").unwrap_or("{}"))
        .map_err(|e| unreadable("fingerprint", &e))?;
    let node: NodeFacts =
        serde_json::from_str(field("node").unwrap_or("{}")).map_err(|e| unreadable("node", &e))?;
    let unit = match &node.interval_unit {
        Some(name) => Unit::parse(name).ok_or_else(|| unreadable("interval unit", name))?,
        None => {
            let cron = node.cron.as_deref().unwrap_or("@daily");
            match units.get(cron) {
                Some(unit) => *unit,
                None => {
                    let unit = Unit::from_cron(cron).map_err(|e| unreadable("cron", &e))?;
                    units.insert(cron.to_owned(), unit);
                    unit
                }
            }
        }
    };
    let number = |name: &str| field(name).and_then(|v| v.parse::<i64>().ok());
    let effective_from_ts = match field("effective_from") {
        Some(raw) => Some(
            unit.floor(super::timelike_ms(raw).ok_or_else(|| unreadable("effective_from", &raw))?),
        ),
        None => None,
    };
    let dev_version = match field("dev_version") {
        Some(raw) => {
            serde_json::from_str::<String>(raw).map_err(|e| unreadable("dev_version", &e))?
        }
        None => fingerprint.to_version(),
    };
    let target = intervals::Target {
        identifier: columns.identifier.clone(),
        dev_version,
        unit,
        // Only models may have partial intervals; a standalone audit never does.
        allow_partials: node.source_type.as_deref() != Some("audit")
            && node.allow_partials.unwrap_or(false),
        effective_from_ts,
        last_altered_ts: number("last_altered_ts"),
        dev_last_altered_ts: number("dev_last_altered_ts"),
    };
    let rows: Vec<IntervalRow> =
        serde_json::from_str(&columns.intervals).map_err(|e| unreadable("interval", &e))?;
    let sets = intervals::fold(rows.into_iter().map(
        |(identifier, dev_version, start, end, is_dev, is_removed, is_pending, last_altered)| {
            intervals::Row {
                identifier,
                dev_version,
                start,
                end,
                is_dev: is_dev.unwrap_or(false),
                is_removed: is_removed.unwrap_or(false),
                is_pending_restatement: is_pending.unwrap_or(false),
                last_altered_ts: last_altered,
            }
        },
    ));
    let hydrated = intervals::hydrate(&target, &sets);

    let list = |intervals: &[intervals::Interval]| {
        let items: Vec<String> = intervals
            .iter()
            .map(|(s, e)| format!("[{s},{e}]"))
            .collect();
        format!("[{}]", items.join(","))
    };
    let computed = |name: &str| -> Option<String> {
        match name {
            "forward_only" => Some(columns.forward_only.unwrap_or(false).to_string()),
            "intervals" => Some(list(&hydrated.intervals)),
            "dev_intervals" => Some(list(&hydrated.dev_intervals)),
            "pending_restatement_intervals" => Some(list(&hydrated.pending_restatement_intervals)),
            "updated_ts" => columns.updated_ts.map(|v| v.to_string()),
            "unpaused_ts" => columns.unpaused_ts.map(|v| v.to_string()),
            "unrestorable" => Some(columns.unrestorable.unwrap_or(false).to_string()),
            "next_auto_restatement_ts" => columns.next_auto_restatement_ts.map(|v| v.to_string()),
            "last_altered_ts" => hydrated.last_altered_ts.map(|v| v.to_string()),
            "dev_last_altered_ts" => hydrated.dev_last_altered_ts.map(|v| v.to_string()),
            _ => None,
        }
    };
    out.push('{');
    let mut first = true;
    let mut push = |out: &mut String, key: &str, value: &str| {
        if !first {
            out.push(',');
        }
        first = false;
        out.push('"');
        out.push_str(key);
        out.push_str("\":");
        out.push_str(value);
    };
    for name in SNAPSHOT_FIELDS {
        let value = if super::is_computed_field(name) {
            computed(name)
        } else {
            field(name).map(str::to_owned)
        };
        if let Some(value) = value {
            push(out, name, &value);
        }
    }
    // Fields of a newer SQLMesh than this statekeeper knows travel as stored, after the rest.
    for (name, value) in &fields {
        if !SNAPSHOT_FIELDS.contains(&name.as_str()) {
            let key = serde_json::to_string(name).map_err(json_error)?;
            push(out, &key[1..key.len() - 1], value.get());
        }
    }
    out.push('}');
    Ok(())
}

/// An environment's fields but its lists of snapshots, which are read one at a time.
struct EnvironmentHead {
    name: String,
    /// `"name":…,…,"gateway_managed":…`
    fields: String,
    requirements: String,
    statements: String,
}

/// The columns of an environment that list snapshots, in SQLMesh's order.
const LIST_COLUMNS: [&str; 3] = [
    "snapshots",
    "promoted_snapshot_ids",
    "previous_finalized_snapshots",
];

/// The chosen environments, each with its statements. An environment's lists of snapshots grow
/// with the project: memory holds one list (one column of one row) at a time.
async fn write_environments<W: AsyncWrite + Unpin + Send>(
    store: &Store,
    tx: &mut PgConnection,
    out: &mut Output<W>,
    options: &ExportOptions,
) -> Result<u64, Error> {
    let s = store.schema().quoted();
    let statements =
        catalog::table_exists(&mut *tx, store.schema().as_str(), "_environment_statements").await?;
    let statements_sql = if statements {
        format!(
            "(SELECT st.environment_statements FROM {s}._environment_statements st WHERE st.environment_name = e.name)"
        )
    } else {
        "NULL::text".into()
    };
    let sql = format!(
        "SELECT e.name, e.start_at, e.end_at, e.plan_id, e.previous_plan_id, e.expiration_ts,
                e.finalized_ts, e.suffix_target, e.catalog_name_override, e.normalize_name,
                e.gateway_managed, e.requirements, {statements_sql} AS statements
         FROM {s}._environments e
         WHERE $1::text[] IS NULL OR e.name = ANY($1)
         ORDER BY e.name"
    );
    let rows = sqlx::query(AssertSqlSafe(sql))
        .bind(&options.environments)
        .fetch_all(&mut *tx)
        .await?;
    let mut heads = Vec::with_capacity(rows.len());
    for row in rows {
        let text = |column: &str| -> Result<Option<String>, Error> {
            Ok(row
                .try_get::<Option<String>, _>(column)?
                .map(|v| serde_json::to_string(&v).unwrap_or_default()))
        };
        let number = |column: &str| -> Result<Option<String>, Error> {
            Ok(row
                .try_get::<Option<i64>, _>(column)?
                .map(|v| v.to_string()))
        };
        let boolean = |column: &str| -> Result<Option<String>, Error> {
            Ok(row
                .try_get::<Option<bool>, _>(column)?
                .map(|v| v.to_string()))
        };
        // Environment's fields in SQLMesh's order; absent values are left out, as SQLMesh does.
        let fields: [(&str, Option<String>); 11] = [
            ("name", text("name")?),
            ("start_at", text("start_at")?),
            ("end_at", text("end_at")?),
            ("plan_id", text("plan_id")?),
            ("previous_plan_id", text("previous_plan_id")?),
            ("expiration_ts", number("expiration_ts")?),
            ("finalized_ts", number("finalized_ts")?),
            ("suffix_target", text("suffix_target")?),
            ("catalog_name_override", text("catalog_name_override")?),
            // SQLMesh reads a missing normalize_name as true and gateway_managed as false.
            (
                "normalize_name",
                boolean("normalize_name")?.or_else(|| Some("true".into())),
            ),
            (
                "gateway_managed",
                boolean("gateway_managed")?.or_else(|| Some("false".into())),
            ),
        ];
        heads.push(EnvironmentHead {
            name: row.try_get("name")?,
            fields: fields
                .iter()
                .filter_map(|(k, v)| v.as_ref().map(|v| format!("\"{k}\":{v}")))
                .collect::<Vec<_>>()
                .join(","),
            requirements: row
                .try_get::<Option<String>, _>("requirements")?
                .unwrap_or_else(|| "{}".into()),
            statements: row
                .try_get::<Option<String>, _>("statements")?
                .unwrap_or_else(|| "[]".into()),
        });
    }
    for (i, head) in heads.iter().enumerate() {
        out.write(
            format!(
                "{}{}:{{\"environment\":{{{}",
                if i == 0 { "" } else { "," },
                serde_json::to_string(&head.name).map_err(json_error)?,
                head.fields
            )
            .as_bytes(),
        )
        .await?;
        for column in LIST_COLUMNS {
            let list: Option<String> = sqlx::query_scalar(AssertSqlSafe(format!(
                "SELECT {column} FROM {s}._environments WHERE name = $1"
            )))
            .bind(&head.name)
            .fetch_one(&mut *tx)
            .await?;
            let unreadable = |reason: String| {
                Error::ExportWrite(format!(
                    "environment {} has an unreadable {column}: {reason}",
                    head.name
                ))
            };
            match list.as_deref().map(str::trim_start) {
                // Each element as stored, in order (checked as JSON first: nothing else reads it).
                Some(text) if text.starts_with('[') => {
                    // One parse checks the list and finds its elements, each written as stored.
                    let elements: Vec<&RawValue> =
                        serde_json::from_str(text).map_err(|e| unreadable(e.to_string()))?;
                    // Sized once: lists run to megabytes.
                    let mut piece = Vec::with_capacity(text.len() + column.len() + 8);
                    piece.extend_from_slice(format!(",\"{column}\":[").as_bytes());
                    for (i, element) in elements.iter().enumerate() {
                        if i > 0 {
                            piece.push(b',');
                        }
                        piece.extend_from_slice(element.get().as_bytes());
                    }
                    piece.push(b']');
                    out.write(&piece).await?;
                }
                // A missing list of snapshots reads as empty; the others are left out.
                None | Some("null") if column == "snapshots" => {
                    out.write(b",\"snapshots\":[]").await?;
                }
                None | Some("null") => {}
                Some(other) => {
                    return Err(unreadable(format!(
                        "{} is not a list",
                        other.chars().take(40).collect::<String>()
                    )));
                }
            }
        }
        out.write(
            format!(
                ",\"requirements\":{}}},\"statements\":{}}}",
                head.requirements, head.statements
            )
            .as_bytes(),
        )
        .await?;
    }
    Ok(heads.len() as u64)
}

fn json_error(e: serde_json::Error) -> Error {
    Error::ExportWrite(e.to_string())
}
