//! Reading the document `sqlmesh state export` writes into SQLMesh's tables (docs/sqlmesh.md).
//! Each snapshot is stored as written (SQLMesh's own import re-renders some fields while it
//! parses them); the columns SQLMesh derives from it, its intervals, its auto-restatement and
//! each environment with its statements are written as SQLMesh writes them. Everything is staged
//! and checked first, then applied in one transaction under table locks with a backup kept.

use std::collections::HashSet;
use std::sync::Arc;

use chrono::{Months, TimeZone, Utc};
use serde_json::Value;
use serde_json::value::RawValue;
use sqlx::AssertSqlSafe;

use super::{Fingerprint, OrderedObject, STORED_ELSEWHERE};
use crate::engine::Error;
use crate::engine::format::reader::{Emitter, SectionReader};
use crate::engine::format::staging::{
    Ending, Incoming, commit_import, insert_staged, remember_entities, removed_by, staged_field,
};
use crate::engine::format::stream::Header;
use crate::engine::framework::ExportFormat;
use crate::engine::identifier::qualified_list;
use crate::engine::identifier::quote_literal;
use crate::engine::json::{compact_utf8_for_parsing, push_python_dumps, python_dumps};
use crate::engine::jsonscan::{Cursor, ScanError};
use crate::engine::store::{Store, TableLock};
use crate::engine::transfer::{ImportMode, ImportReport};

const SNAPSHOTS: &str = "_snapshots";
const INTERVALS: &str = "_intervals";
const AUTO_RESTATEMENTS: &str = "_auto_restatements";
const ENVIRONMENTS: &str = "_environments";
const STATEMENTS: &str = "_environment_statements";

/// The columns each table's rows are staged with, in this order. `has_statements` only decides
/// whether a statements row is written.
const SNAPSHOT_COLUMNS: &[&str] = &[
    "name",
    "identifier",
    "version",
    "snapshot",
    "kind_name",
    "updated_ts",
    "unpaused_ts",
    "ttl_ms",
    "unrestorable",
    "forward_only",
    "dev_version",
    "fingerprint",
];
const INTERVAL_COLUMNS: &[&str] = &[
    "id",
    "created_ts",
    "name",
    "identifier",
    "version",
    "dev_version",
    "start_ts",
    "end_ts",
    "is_dev",
    "is_removed",
    "is_compacted",
    "is_pending_restatement",
];
const AUTO_RESTATEMENT_COLUMNS: &[&str] = &[
    "snapshot_name",
    "snapshot_version",
    "next_auto_restatement_ts",
];
/// `_environments` rows: their lists of snapshots come from staged elements (`LIST_COLUMNS`),
/// joined when applied, and the flags say which lists the file held.
const ENVIRONMENT_COLUMNS: &[&str] = &[
    "name",
    "start_at",
    "end_at",
    "plan_id",
    "previous_plan_id",
    "expiration_ts",
    "finalized_ts",
    "suffix_target",
    "catalog_name_override",
    "normalize_name",
    "requirements",
    "gateway_managed",
    "environment_index",
    "snapshots_listed",
    "promoted_snapshot_ids_listed",
    "previous_finalized_snapshots_listed",
];
const STATEMENT_COLUMNS: &[&str] = &[
    "environment_name",
    "plan_id",
    "environment_statements",
    "has_statements",
];

/// The most values a staged row has (a list's element has two).
fn staged_width() -> usize {
    [
        SNAPSHOT_COLUMNS,
        INTERVAL_COLUMNS,
        AUTO_RESTATEMENT_COLUMNS,
        ENVIRONMENT_COLUMNS,
        STATEMENT_COLUMNS,
    ]
    .iter()
    .map(|columns| columns.len())
    .fold(2, usize::max)
}

/// A staged row of `columns`, filled by name.
struct StagedRow {
    columns: &'static [&'static str],
    fields: Vec<Option<String>>,
}

impl StagedRow {
    fn new(columns: &'static [&'static str]) -> Self {
        Self {
            columns,
            fields: vec![None; columns.len()],
        }
    }

    fn set(&mut self, column: &str, value: impl Into<Option<String>>) {
        if let Some(i) = self.columns.iter().position(|c| *c == column) {
            self.fields[i] = value.into();
        }
    }
}

/// The position (from 1, as in SQL) of a staged column.
fn staged_position(columns: &[&str], column: &str) -> usize {
    columns
        .iter()
        .position(|c| *c == column)
        .map_or(0, |i| i + 1)
}

/// The staging section of an environment list column's elements.
fn list_section(column: &str) -> String {
    format!("{ENVIRONMENTS}.{column}")
}

/// How the environments' insert reads their lists: joined from their staged pieces as
/// `json.dumps` joins a list, each list by one aggregate over its pieces.
struct EnvironmentLists {
    /// Per list column, its value: the joined list or, where the file had none, `[]` for
    /// `snapshots` and NULL for the others.
    columns: Vec<(&'static str, String)>,
    /// The aggregates, joined to the staged environments (`x`).
    joins: String,
}

impl EnvironmentLists {
    fn sql() -> Self {
        let environment_index =
            staged_field(staged_position(ENVIRONMENT_COLUMNS, "environment_index"));
        let mut lists = Self {
            columns: Vec::new(),
            joins: String::new(),
        };
        for (i, column) in LIST_COLUMNS.iter().enumerate() {
            lists.joins.push_str(&format!(
                " LEFT JOIN (SELECT f1 AS environment, string_agg(f2, ', ' ORDER BY seq) AS items \
                 FROM statekeeper_import WHERE section = {} GROUP BY f1) l{i} \
                 ON l{i}.environment = x.{environment_index}",
                quote_literal(&list_section(column)),
            ));
            let listed = staged_field(staged_position(
                ENVIRONMENT_COLUMNS,
                &format!("{column}_listed"),
            ));
            let missing = if *column == "snapshots" {
                "'[]'"
            } else {
                "NULL"
            };
            lists.columns.push((
                *column,
                format!(
                    "CASE WHEN x.{listed} = 'true' THEN '[' || COALESCE(l{i}.items, '') || ']' \
                     ELSE {missing} END"
                ),
            ));
        }
        lists
    }
}

/// Shared section names, and the one time stamp every interval row of this import is created
/// at.
#[derive(Clone)]
struct Names {
    snapshots: Arc<str>,
    intervals: Arc<str>,
    auto_restatements: Arc<str>,
    environments: Arc<str>,
    statements: Arc<str>,
    /// Per list column, the section its elements are staged under.
    environment_lists: std::collections::HashMap<&'static str, Arc<str>>,
    created_ts: i64,
}

impl Names {
    fn new() -> Self {
        Self {
            snapshots: Arc::from(SNAPSHOTS),
            intervals: Arc::from(INTERVALS),
            auto_restatements: Arc::from(AUTO_RESTATEMENTS),
            environments: Arc::from(ENVIRONMENTS),
            statements: Arc::from(STATEMENTS),
            environment_lists: LIST_COLUMNS
                .iter()
                .map(|c| (*c, Arc::from(list_section(c).as_str())))
                .collect(),
            created_ts: Utc::now().timestamp_millis(),
        }
    }
}

type Doc<'a, 'b> = &'a mut Cursor<&'b mut dyn std::io::Read>;

/// Reads `snapshots` and `environments` (the sections after the header), turning each into the
/// rows SQLMesh would write.
pub(crate) struct Sections {
    names: Names,
    seen: HashSet<String>,
}

impl Sections {
    pub(crate) fn new() -> Self {
        Self {
            names: Names::new(),
            seen: HashSet::new(),
        }
    }
}

impl SectionReader for Sections {
    fn section(&mut self, cursor: Doc, key: &str, emitter: &mut Emitter) -> Result<(), ScanError> {
        if !self.seen.insert(key.to_owned()) {
            return Err(ScanError(format!("section \"{key}\" appears twice")));
        }
        match key {
            "snapshots" => read_snapshots(cursor, &self.names, emitter),
            "environments" => cursor.object(|cursor, key| {
                emitter.environments += 1;
                let index = emitter.environments.to_string();
                read_environment(cursor, &key, &index, &self.names, emitter)
                    .map_err(|e| ScanError(format!("environment \"{key}\": {e}")))
            }),
            other => Err(ScanError(format!(
                "unknown section \"{other}\" in a SQLMesh export"
            ))),
        }
    }

    fn finish(&mut self, _emitter: &mut Emitter) -> Result<(), ScanError> {
        for required in ["snapshots", "environments"] {
            if !self.seen.contains(required) {
                return Err(ScanError(format!("section \"{required}\" is missing")));
            }
        }
        Ok(())
    }
}

/// The snapshots, each turned into its rows on a helper thread.
fn read_snapshots(cursor: Doc, names: &Names, emitter: &mut Emitter) -> Result<(), ScanError> {
    array_on_helper(
        cursor,
        emitter,
        0usize,
        |position, raw, emitter| {
            *position += 1;
            // One pass spells the snapshot as SQLMesh stores it (compact, non-ASCII as UTF-8);
            // the parses read that instead of the file's indentation.
            let invalid = || format!("snapshot #{position}: not valid JSON");
            let text = String::from_utf8(raw).map_err(|_| invalid())?;
            let compact = compact_utf8_for_parsing(&text).ok_or_else(invalid)?;
            let OrderedObject(fields) =
                serde_json::from_str(&compact).map_err(|e| format!("snapshot #{position}: {e}"))?;
            snapshot_rows(&fields, names, emitter).map_err(|e| format!("snapshot #{position}: {e}"))
        },
        |_, _| Ok(()),
    )
}

/// Elements go to the helper of [`array_on_helper`] in batches of about this many bytes: a
/// hand-off per element cost more than a small element takes to turn into text.
const HANDOFF_BYTES: usize = 64 * 1024;

/// Runs through the array at the cursor: this thread cuts it into elements, a helper thread
/// hands each to `each` with `state`, then calls `done` (parsing and respelling cost more than
/// cutting, so the two threads share the work). The helper's rows go out in order.
fn array_on_helper<S: Send>(
    cursor: Doc,
    emitter: &mut Emitter,
    mut state: S,
    each: impl Fn(&mut S, Vec<u8>, &mut Emitter) -> Result<(), String> + Send,
    done: impl FnOnce(S, &mut Emitter) -> Result<(), String> + Send,
) -> Result<(), ScanError> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Vec<u8>>>(16);
    let mut helper_emitter = emitter.fork();
    let stopped = || ScanError("the element reader stopped".into());
    let (read, helped) = std::thread::scope(|scope| {
        let helper = scope.spawn(move || -> Result<Emitter, String> {
            for raw in rx.into_iter().flatten() {
                each(&mut state, raw, &mut helper_emitter)?;
            }
            done(state, &mut helper_emitter)?;
            Ok(helper_emitter)
        });
        let mut batch = Vec::new();
        let mut bytes = 0;
        let read = cursor.array(|cursor| {
            let raw = cursor.raw()?;
            bytes += raw.len();
            batch.push(raw);
            if bytes < HANDOFF_BYTES {
                return Ok(());
            }
            bytes = 0;
            // A closed channel means the helper failed: its error is the one to report.
            tx.send(std::mem::take(&mut batch)).map_err(|_| stopped())
        });
        let read = read.and_then(|()| tx.send(batch).map_err(|_| stopped()));
        drop(tx);
        (read, helper.join())
    });
    let helper_emitter = helped.map_err(|_| stopped())?.map_err(ScanError)?;
    read?;
    emitter.absorb(helper_emitter).map_err(ScanError)
}

/// What a node says about itself that a `_snapshots` row needs.
#[derive(serde::Deserialize)]
struct NodeFacts {
    #[serde(default)]
    source_type: Option<String>,
    #[serde(default)]
    kind: Option<KindFacts>,
}

#[derive(serde::Deserialize)]
struct KindFacts {
    #[serde(default)]
    name: Option<String>,
}

/// The rows one snapshot of the file becomes: `_snapshots`, its `_intervals` and its
/// `_auto_restatements` entry. `fields` come from the snapshot already spelled as SQLMesh's
/// serializer spells it (`compact_utf8_for_parsing`).
fn snapshot_rows(
    fields: &[(String, Box<RawValue>)],
    names: &Names,
    emitter: &mut Emitter,
) -> Result<(), String> {
    let field = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| v.get());
    let parse = |name: &str| -> Result<Option<Value>, String> {
        field(name)
            .map(|raw| serde_json::from_str::<Value>(raw).map_err(|e| format!("{name}: {e}")))
            .transpose()
    };
    let name = match parse("name")? {
        Some(Value::String(name)) => name,
        _ => return Err("it has no \"name\"".into()),
    };
    let fingerprint: Fingerprint = serde_json::from_str(
        field("fingerprint").ok_or_else(|| format!("{name} has no \"fingerprint\""))?,
    )
    .map_err(|e| format!("{name}: fingerprint: {e}"))?;
    let node: NodeFacts =
        serde_json::from_str(field("node").ok_or_else(|| format!("{name} has no \"node\""))?)
            .map_err(|e| format!("{name}: node: {e}"))?;
    let identifier = fingerprint.to_identifier();
    let version = string_field(parse("version")?, &name, "version")?;
    let dev_version = string_field(parse("dev_version")?, &name, "dev_version")?
        .unwrap_or_else(|| fingerprint.to_version());
    let updated_ts = number_field(parse("updated_ts")?, &name, "updated_ts")?
        .ok_or_else(|| format!("{name} has no \"updated_ts\""))?;
    let ttl = string_field(parse("ttl")?, &name, "ttl")?
        .ok_or_else(|| format!("{name} has no \"ttl\""))?;
    let ttl_ms = ttl_ms(&ttl, updated_ts).ok_or_else(|| {
        format!(
            "{name} has ttl \"{ttl}\", which statekeeper cannot convert (it reads \"in N \
             seconds|minutes|hours|days|weeks|months|years\")"
        )
    })?;
    // Standalone audits have no model kind.
    let kind_name = match node.source_type.as_deref() {
        Some("audit") => None,
        _ => node.kind.and_then(|k| k.name),
    };
    let flag = |name_: &str| -> Result<bool, String> {
        Ok(match parse(name_)? {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => b,
            Some(other) => return Err(format!("{name}: {name_} is {other}, not true or false")),
        })
    };
    // The stored JSON is the snapshot without what SQLMesh keeps elsewhere; values are copied as
    // written.
    let mut stored = String::with_capacity(fields.iter().map(|(_, v)| v.get().len()).sum());
    stored.push('{');
    for (key, value) in fields
        .iter()
        .filter(|(k, _)| !STORED_ELSEWHERE.contains(&k.as_str()))
    {
        if stored.len() > 1 {
            stored.push(',');
        }
        stored.push_str(&serde_json::to_string(key).map_err(|e| e.to_string())?);
        stored.push(':');
        stored.push_str(value.get());
    }
    stored.push('}');
    let mut row = StagedRow::new(SNAPSHOT_COLUMNS);
    row.set("name", name.clone());
    row.set("identifier", identifier.clone());
    row.set("version", version.clone());
    row.set("snapshot", stored);
    row.set("kind_name", kind_name);
    row.set("updated_ts", updated_ts.to_string());
    row.set(
        "unpaused_ts",
        number_field(parse("unpaused_ts")?, &name, "unpaused_ts")?.map(|v| v.to_string()),
    );
    row.set("ttl_ms", ttl_ms.to_string());
    row.set("unrestorable", flag("unrestorable")?.to_string());
    row.set("forward_only", flag("forward_only")?.to_string());
    row.set("dev_version", dev_version.clone());
    row.set(
        "fingerprint",
        field("fingerprint").unwrap_or("{}").to_owned(),
    );
    emitter.fields(&names.snapshots, row.fields)?;

    // Intervals as SQLMesh records them on import: one row per interval (empty ones skipped,
    // except pending restatements), pending restatements last and under no identifier. The rows
    // carry no last-altered time: that stays in the stored snapshot.
    let kinds: [(&str, bool, bool); 3] = [
        ("intervals", false, false),
        ("dev_intervals", true, false),
        ("pending_restatement_intervals", false, true),
    ];
    for (list, is_dev, is_pending) in kinds {
        let intervals: Vec<(i64, i64)> = match field(list) {
            Some(raw) => serde_json::from_str(raw).map_err(|e| format!("{name}: {list}: {e}"))?,
            None => Vec::new(),
        };
        for (start, end) in intervals.into_iter().filter(|(s, e)| is_pending || s < e) {
            let mut row = StagedRow::new(INTERVAL_COLUMNS);
            row.set("id", random_id()?);
            row.set("created_ts", names.created_ts.to_string());
            row.set("name", name.clone());
            if !is_pending {
                row.set("identifier", identifier.clone());
                row.set("dev_version", dev_version.clone());
            }
            row.set("version", version.clone());
            row.set("start_ts", start.to_string());
            row.set("end_ts", end.to_string());
            row.set("is_dev", is_dev.to_string());
            row.set("is_removed", "false".to_string());
            row.set("is_compacted", "false".to_string());
            row.set("is_pending_restatement", is_pending.to_string());
            emitter.fields(&names.intervals, row.fields)?;
        }
    }
    if let Some(next) = number_field(
        parse("next_auto_restatement_ts")?,
        &name,
        "next_auto_restatement_ts",
    )? {
        let mut row = StagedRow::new(AUTO_RESTATEMENT_COLUMNS);
        row.set("snapshot_name", name.clone());
        row.set("snapshot_version", version);
        row.set("next_auto_restatement_ts", next.to_string());
        emitter.fields(&names.auto_restatements, row.fields)?;
    }
    Ok(())
}

/// A random interval id, as SQLMesh makes them (`uuid4().hex`). Made here rather than by
/// `gen_random_uuid()` on insert, which cost the server about 5 µs a row.
fn random_id() -> Result<String, String> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| format!("no random interval id: {e}"))?;
    // Version 4, variant 10xx.
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    Ok(hex::encode(bytes))
}

fn string_field(
    value: Option<Value>,
    snapshot: &str,
    field: &str,
) -> Result<Option<String>, String> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(format!("{snapshot}: {field} is {other}, not a string")),
    }
}

fn number_field(value: Option<Value>, snapshot: &str, field: &str) -> Result<Option<i64>, String> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n.as_i64().map(Some).ok_or_else(|| {
            format!("{snapshot}: {field} is {n}, not a whole number of milliseconds")
        }),
        Some(other) => Err(format!("{snapshot}: {field} is {other}, not a number")),
    }
}

/// SQLMesh's `ttl_ms`: how long after `updated_ts` the ttl ("in 1 week") ends, as its date
/// parser counts: calendar months and years first (the day kept, or the month's last day), then
/// fixed-length units.
pub(crate) fn ttl_ms(ttl: &str, updated_ts: i64) -> Option<i64> {
    let lower = ttl.to_lowercase();
    let words: Vec<&str> = lower
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|w| !w.is_empty() && *w != "and")
        .collect();
    let rest = match words.as_slice() {
        ["in", rest @ ..] if !rest.is_empty() => rest,
        _ => return None,
    };
    let mut months = 0u32;
    let mut millis = 0f64;
    for pair in rest.chunks(2) {
        let [count, unit] = pair else { return None };
        let count: f64 = match *count {
            "a" | "an" | "one" => 1.0,
            "two" => 2.0,
            "three" => 3.0,
            "four" => 4.0,
            "five" => 5.0,
            "six" => 6.0,
            "seven" => 7.0,
            "eight" => 8.0,
            "nine" => 9.0,
            "ten" => 10.0,
            number => number
                .parse()
                .ok()
                .filter(|n: &f64| n.is_finite() && *n >= 0.0)?,
        };
        let unit = unit.strip_suffix('s').unwrap_or(unit);
        let whole = || (count.fract() == 0.0).then_some(count as u32);
        match unit {
            "second" | "sec" => millis += count * 1e3,
            "minute" | "min" => millis += count * 60e3,
            "hour" => millis += count * 3_600e3,
            "day" => millis += count * 86_400e3,
            "week" => millis += count * 604_800e3,
            "month" => months = months.checked_add(whole()?)?,
            "year" => months = months.checked_add(whole()?.checked_mul(12)?)?,
            "decade" => months = months.checked_add(whole()?.checked_mul(120)?)?,
            _ => return None,
        }
    }
    let base = Utc.timestamp_millis_opt(updated_ts).single()?;
    let end = base.checked_add_months(Months::new(months))?;
    Some(end.timestamp_millis() - updated_ts + millis.round() as i64)
}

/// The lists of snapshots an environment holds. They grow with the project, so their elements
/// are staged one by one and joined in PostgreSQL: memory stays flat.
const LIST_COLUMNS: &[&str] = &[
    "snapshots",
    "promoted_snapshot_ids",
    "previous_finalized_snapshots",
];

/// List elements are staged in pieces of about this many bytes: small enough to stay in their
/// staged row (no TOAST), large enough that a list is few rows.
const LIST_PIECE_BYTES: usize = 7 * 1024;

/// An environment's fields: the lists streamed, the rest kept (they are small).
struct Fields {
    /// Small fields as written.
    values: Vec<(String, Box<RawValue>)>,
    /// List columns that held a list (their elements are staged).
    lists: Vec<&'static str>,
}

/// One environment of the file: `{"environment": {…}, "statements": […]}`.
fn read_environment(
    cursor: Doc,
    key: &str,
    index: &str,
    names: &Names,
    emitter: &mut Emitter,
) -> Result<(), ScanError> {
    let mut fields = None;
    let mut statements: Option<Vec<u8>> = None;
    cursor.object(|cursor, part| match part.as_str() {
        "environment" => {
            fields = Some(read_environment_fields(cursor, index, names, emitter)?);
            Ok(())
        }
        "statements" => {
            statements = Some(cursor.raw()?);
            Ok(())
        }
        other => Err(ScanError(format!("unknown field \"{other}\""))),
    })?;
    let fields = fields.ok_or_else(|| ScanError("it has no \"environment\"".into()))?;
    let statements = match statements {
        Some(raw) => json_text(raw, "statements")?,
        None => "[]".to_owned(),
    };
    environment_rows(&fields, &statements, index, names, emitter)
        .map_err(ScanError)
        .map_err(|e| ScanError(format!("{e} (environment key {key})")))
}

/// An environment's fields: each list column's elements staged as `[environment index, elements
/// as json.dumps spells and joins them]` in bounded pieces (a `null` list stages nothing), the
/// other fields kept.
fn read_environment_fields(
    cursor: Doc,
    index: &str,
    names: &Names,
    emitter: &mut Emitter,
) -> Result<Fields, ScanError> {
    let mut fields = Fields {
        values: Vec::new(),
        lists: Vec::new(),
    };
    cursor.object(|cursor, key| {
        let Some(column) = LIST_COLUMNS.iter().find(|c| **c == key) else {
            let raw = json_text(cursor.raw()?, &key)?;
            let value = RawValue::from_string(raw)
                .map_err(|e| ScanError(format!("{key} is not valid JSON: {e}")))?;
            fields.values.push((key, value));
            return Ok(());
        };
        if cursor.peek_value()? == b'n' {
            let raw = cursor.raw()?;
            return if raw == b"null" {
                Ok(())
            } else {
                Err(ScanError(format!("{key} is neither a list nor null")))
            };
        }
        // Elements go in pieces of a bounded size, already joined as `json.dumps` joins a list.
        let section = &names.environment_lists[column];
        let flush = |piece: &mut String, emitter: &mut Emitter| {
            if piece.is_empty() {
                return Ok(());
            }
            emitter.fields(
                section,
                vec![Some(index.to_owned()), Some(std::mem::take(piece))],
            )
        };
        array_on_helper(
            cursor,
            emitter,
            String::new(),
            |piece, raw, emitter| {
                let element = String::from_utf8(raw)
                    .map_err(|_| format!("an element of {column} is not UTF-8"))?;
                serde_json::from_str::<&RawValue>(&element)
                    .map_err(|e| format!("an element of {column} is not valid JSON: {e}"))?;
                if !piece.is_empty() {
                    piece.push_str(", ");
                }
                push_python_dumps(&element, piece);
                if piece.len() >= LIST_PIECE_BYTES {
                    flush(piece, emitter)?;
                }
                Ok(())
            },
            |mut piece, emitter| flush(&mut piece, emitter),
        )?;
        fields.lists.push(column);
        Ok(())
    })?;
    Ok(fields)
}

fn json_text(raw: Vec<u8>, what: &str) -> Result<String, ScanError> {
    String::from_utf8(raw).map_err(|_| ScanError(format!("{what} is not UTF-8")))
}

/// The rows one environment of the file becomes: `_environments` (its lists joined from their
/// staged elements when applied) and `_environment_statements`, with JSON spelled as SQLMesh's
/// `json.dumps` spells it.
fn environment_rows(
    fields: &Fields,
    statements: &str,
    index: &str,
    names: &Names,
    emitter: &mut Emitter,
) -> Result<(), String> {
    let field = |name: &str| {
        fields
            .values
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.get())
    };
    let value = |name: &str| -> Result<Option<Value>, String> {
        field(name)
            .map(|raw| serde_json::from_str::<Value>(raw).map_err(|e| format!("{name}: {e}")))
            .transpose()
    };
    // SQLMesh names an environment by its `name`, lower-cased with non-word characters as `_`
    // (the key in the file is not used).
    let name: String = match value("name")? {
        Some(Value::String(name)) => name
            .chars()
            .map(|c| {
                if c.is_alphanumeric() || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect::<String>()
            .to_lowercase(),
        _ => return Err("its environment has no \"name\"".into()),
    };
    let mut row = StagedRow::new(ENVIRONMENT_COLUMNS);
    row.set("name", name.clone());
    let mut plan_id = None;
    for column in [
        "start_at",
        "end_at",
        "plan_id",
        "previous_plan_id",
        "suffix_target",
        "catalog_name_override",
    ] {
        let text = match value(column)? {
            None | Some(Value::Null) => continue,
            Some(Value::String(s)) => s,
            // SQLMesh stores time values as text: epoch milliseconds become a date-time.
            Some(Value::Number(n)) if column.ends_with("_at") => n
                .as_i64()
                .and_then(|ms| Utc.timestamp_millis_opt(ms).single())
                .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                .ok_or_else(|| format!("{column} is {n}, not a time"))?,
            Some(other) => return Err(format!("{column} is {other}, not text")),
        };
        if column == "plan_id" {
            plan_id = Some(text.clone());
        }
        row.set(column, text);
    }
    for column in ["expiration_ts", "finalized_ts"] {
        match value(column)? {
            None | Some(Value::Null) => {}
            Some(Value::Number(n)) if n.is_i64() => row.set(column, n.to_string()),
            Some(other) => return Err(format!("{column} is {other}, not a time in milliseconds")),
        }
    }
    // SQLMesh reads a missing normalize_name as true and gateway_managed as false.
    for (column, default) in [("normalize_name", true), ("gateway_managed", false)] {
        let flag = match value(column)? {
            None | Some(Value::Null) => default,
            Some(Value::Bool(b)) => b,
            Some(other) => return Err(format!("{column} is {other}, not true or false")),
        };
        row.set(column, flag.to_string());
    }
    row.set(
        "requirements",
        python_dumps(
            field("requirements")
                .filter(|raw| raw.trim() != "null")
                .unwrap_or("{}"),
        ),
    );
    row.set("environment_index", index.to_owned());
    for column in &fields.lists {
        row.set(&format!("{column}_listed"), "true".to_owned());
    }
    emitter.fields(&names.environments, row.fields)?;

    // Statements are stored only when there are some (an empty list leaves no row); the row is
    // staged either way, since a merge replaces (or removes) the environment's statements.
    let has_statements = matches!(
        serde_json::from_str::<Value>(statements),
        Ok(Value::Array(items)) if !items.is_empty()
    );
    let mut row = StagedRow::new(STATEMENT_COLUMNS);
    row.set("environment_name", name);
    row.set("plan_id", plan_id);
    if has_statements {
        row.set("environment_statements", python_dumps(statements));
    }
    row.set("has_statements", has_statements.to_string());
    emitter.fields(&names.statements, row.fields)
}

/// Imports a SQLMesh export into this SQLMesh store: `Replace` empties every table but
/// `_versions` first; `Merge` replaces the file's snapshots (by name and identifier) and
/// environments (by name) and adds its intervals, as `sqlmesh state import` without `--replace`.
pub(crate) async fn import(
    store: &Store,
    header: Header,
    incoming: &mut Incoming<'_>,
) -> Result<ImportReport, Error> {
    header.check_importable(1)?;
    let file_schema_version = header.schema_version()?;
    let file_sqlmesh = header
        .versions_str("sqlmesh_version")
        .unwrap_or("")
        .to_owned();
    let mut tx = store.begin_locked().await?;
    let current = store.require_initialized(&mut tx).await?;
    if file_schema_version != current.schema_version {
        return Err(Error::InvalidExport(format!(
            "the file has SQLMesh state schema version {file_schema_version}, the store has {}; {}",
            current.schema_version,
            store.profile().version_mismatch_hint
        )));
    }
    let store_sqlmesh = current
        .details
        .get("sqlmeshVersion")
        .cloned()
        .unwrap_or_default();
    if major_minor(&file_sqlmesh) != major_minor(&store_sqlmesh) {
        return Err(Error::InvalidExport(format!(
            "the file was written by SQLMesh {file_sqlmesh} and the store by SQLMesh \
             {store_sqlmesh}; SQLMesh reads state of its own major.minor version only (upgrade or \
             downgrade one side with `sqlmesh migrate`)"
        )));
    }
    // The two sections that hold most rows and bytes get partitions of their own; the rest share
    // one (each partition is a table to create and drop, about as long as reading a few thousand
    // small rows).
    let staged = incoming
        .stage(&mut tx, &[SNAPSHOTS, INTERVALS], staged_width())
        .await?;

    store.lock_tables(&mut tx, TableLock::ReadersWait).await?;
    let backup = store
        .backup_before_change(&mut tx, &current, "pre-import")
        .await?;
    let schema = store.schema().as_str();
    let s = store.schema().quoted();
    let present = store.tables(&mut tx).await?;
    let mode = incoming.options.mode;
    match mode {
        ImportMode::Replace => {
            remember_entities(store, &mut tx).await?;
            let emptied: Vec<String> = present
                .iter()
                .filter(|t| t.as_str() != "_versions")
                .cloned()
                .collect();
            sqlx::query(AssertSqlSafe(format!(
                "TRUNCATE {}",
                qualified_list(schema, &emptied)
            )))
            .execute(&mut *tx)
            .await?;
        }
        ImportMode::Merge => {
            for statement in [
                format!(
                    "DELETE FROM {s}._snapshots t USING statekeeper_import x
                     WHERE x.section = '{SNAPSHOTS}' AND t.name = x.f1 AND t.identifier = x.f2"
                ),
                format!(
                    "DELETE FROM {s}._environments t USING statekeeper_import x
                     WHERE x.section = '{ENVIRONMENTS}' AND t.name = x.f1"
                ),
            ] {
                sqlx::query(AssertSqlSafe(statement))
                    .execute(&mut *tx)
                    .await?;
            }
            if present.iter().any(|t| t == STATEMENTS) {
                sqlx::query(AssertSqlSafe(format!(
                    "DELETE FROM {s}._environment_statements t USING statekeeper_import x
                     WHERE x.section = '{STATEMENTS}' AND t.environment_name = x.f1"
                )))
                .execute(&mut *tx)
                .await?;
            }
            if present.iter().any(|t| t == AUTO_RESTATEMENTS) {
                sqlx::query(AssertSqlSafe(format!(
                    "DELETE FROM {s}._auto_restatements t USING statekeeper_import x
                     WHERE x.section = '{AUTO_RESTATEMENTS}' AND t.snapshot_name = x.f1
                       AND t.snapshot_version IS NOT DISTINCT FROM x.f2"
                )))
                .execute(&mut *tx)
                .await?;
            }
        }
    }
    // Environments without statements only cleared their old ones (merge); they insert nothing.
    sqlx::query(AssertSqlSafe(format!(
        "DELETE FROM statekeeper_import WHERE section = '{STATEMENTS}' AND f4 = 'false'"
    )))
    .execute(&mut *tx)
    .await?;
    let lists = EnvironmentLists::sql();
    for (table, staged_columns) in [
        (SNAPSHOTS, SNAPSHOT_COLUMNS),
        (INTERVALS, INTERVAL_COLUMNS),
        (AUTO_RESTATEMENTS, AUTO_RESTATEMENT_COLUMNS),
        (ENVIRONMENTS, ENVIRONMENT_COLUMNS),
        (STATEMENTS, STATEMENT_COLUMNS),
    ] {
        if !staged.counts.contains_key(table) {
            continue;
        }
        if !present.iter().any(|t| t == table) {
            let staged_rows: i64 =
                sqlx::query_scalar("SELECT count(*) FROM statekeeper_import WHERE section = $1")
                    .bind(table)
                    .fetch_one(&mut *tx)
                    .await?;
            if staged_rows > 0 {
                return Err(Error::InvalidExport(format!(
                    "it has {table} rows, and this store has no {table} table (run `sqlmesh migrate`)"
                )));
            }
            continue;
        }
        let (defaults, joins): (Vec<(&str, &str)>, &str) = match table {
            ENVIRONMENTS => (
                lists
                    .columns
                    .iter()
                    .map(|(c, e)| (*c, e.as_str()))
                    .collect(),
                &lists.joins,
            ),
            _ => (Vec::new(), ""),
        };
        insert_staged(
            &mut tx,
            schema,
            table,
            table,
            staged_columns,
            &defaults,
            joins,
        )
        .await?;
    }
    let ending = Ending {
        format: ExportFormat::Sqlmesh,
        mode,
        source_store: String::new(),
        schema_version: current.schema_version,
        environments: staged.environments,
        backup,
        removed: removed_by(mode, store, &mut tx).await?,
    };
    commit_import(tx, store, incoming, staged, ending).await
}

/// `0.236` of `0.236.4`, as SQLMesh compares versions on import.
fn major_minor(version: &str) -> Vec<&str> {
    version.split('.').take(2).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const UPDATED: i64 = 1_795_790_906_418; // 2026-11-27 UTC

    #[test]
    fn ttl_in_fixed_units() {
        assert_eq!(ttl_ms("in 1 week", UPDATED), Some(604_800_000));
        assert_eq!(ttl_ms("in 2 days", UPDATED), Some(2 * 86_400_000));
        assert_eq!(ttl_ms("in 12 hours", UPDATED), Some(12 * 3_600_000));
        assert_eq!(ttl_ms("in 1 week 1 day", UPDATED), Some(8 * 86_400_000));
    }

    #[test]
    fn ttl_in_calendar_units() {
        // From 27 November: one month is the 30 days to 27 December.
        assert_eq!(ttl_ms("in 1 month", UPDATED), Some(30 * 86_400_000));
        // 2027 is not a leap year.
        assert_eq!(ttl_ms("in 1 year", UPDATED), Some(365 * 86_400_000));
    }

    #[test]
    fn ttl_in_words_and_fractions() {
        assert_eq!(ttl_ms("in one week", UPDATED), Some(604_800_000));
        assert_eq!(ttl_ms("in 1.5 days", UPDATED), Some(129_600_000));
        assert_eq!(ttl_ms("in 2 days 3 hours", UPDATED), Some(183_600_000));
        // 29 February plus a year is 28 February.
        let leap = 1_835_395_200_000; // 2028-02-29 UTC
        assert_eq!(ttl_ms("in 1 year", leap), Some(365 * 86_400_000));
    }

    #[test]
    fn ttl_refuses_what_it_cannot_read() {
        for ttl in [
            "",
            "in",
            "1 week",
            "in 1 fortnight",
            "tomorrow",
            "in 1.5 months",
        ] {
            assert_eq!(ttl_ms(ttl, UPDATED), None, "{ttl}");
        }
    }
}
