//! Reading the document `sqlmesh state export` writes into SQLMesh's tables (docs/sqlmesh.md).
//! Each snapshot is stored as written (SQLMesh's own import re-renders some fields while it
//! parses them); the columns SQLMesh derives from it, its intervals, its auto-restatement and
//! each environment with its statements are written as SQLMesh writes them. Everything is staged
//! and checked first, then applied in one transaction under table locks with a backup kept.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use chrono::{Months, TimeZone, Utc};
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use sqlx::{AssertSqlSafe, PgConnection};

use super::{Fingerprint, OrderedObject, STORED_ELSEWHERE};
use crate::engine::Error;
use crate::engine::frameworks::ExportFormat;
use crate::engine::import::{
    Emitter, Header, ImportMode, ImportReport, Incoming, StagedShape, insert_staged,
};
use crate::engine::json::{compact_utf8, python_dumps};
use crate::engine::store::Store;
use crate::engine::tableset::qualified_list;

const SNAPSHOTS: &str = "_snapshots";
const INTERVALS: &str = "_intervals";
const AUTO_RESTATEMENTS: &str = "_auto_restatements";
const ENVIRONMENTS: &str = "_environments";
const STATEMENTS: &str = "_environment_statements";

/// Reads `snapshots` and `environments` (the sections after the header), turning each into the
/// rows SQLMesh would write.
pub(crate) fn read_sections<'de, A: MapAccess<'de>>(
    map: &mut A,
    emitter: &mut Emitter,
) -> Result<(), A::Error> {
    let sections = Sections::new();
    let mut seen = HashSet::new();
    while let Some(key) = map.next_key::<String>()? {
        if !seen.insert(key.clone()) {
            return Err(de::Error::custom(format!(
                "section \"{key}\" appears twice"
            )));
        }
        match key.as_str() {
            "snapshots" => map.next_value_seed(SnapshotList {
                emitter,
                sections: &sections,
            })?,
            "environments" => map.next_value_seed(EnvironmentMap {
                emitter,
                sections: &sections,
            })?,
            other => {
                return Err(de::Error::custom(format!(
                    "unknown section \"{other}\" in a SQLMesh export"
                )));
            }
        }
    }
    for required in ["snapshots", "environments"] {
        if !seen.contains(required) {
            return Err(de::Error::custom(format!(
                "section \"{required}\" is missing"
            )));
        }
    }
    Ok(())
}

/// Shared names, and the one time stamp every interval row of this import is created at.
struct Sections {
    snapshots: Arc<str>,
    intervals: Arc<str>,
    auto_restatements: Arc<str>,
    environments: Arc<str>,
    statements: Arc<str>,
    created_ts: i64,
}

impl Sections {
    fn new() -> Self {
        Self {
            snapshots: Arc::from(SNAPSHOTS),
            intervals: Arc::from(INTERVALS),
            auto_restatements: Arc::from(AUTO_RESTATEMENTS),
            environments: Arc::from(ENVIRONMENTS),
            statements: Arc::from(STATEMENTS),
            created_ts: Utc::now().timestamp_millis(),
        }
    }
}

struct SnapshotList<'a> {
    emitter: &'a mut Emitter,
    sections: &'a Sections,
}

impl<'de> DeserializeSeed<'de> for SnapshotList<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for SnapshotList<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of snapshots")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut position = 0usize;
        while let Some(OrderedObject(fields)) = seq.next_element::<OrderedObject>()? {
            position += 1;
            snapshot_rows(&fields, self.sections, self.emitter)
                .map_err(|e| de::Error::custom(format!("snapshot #{position}: {e}")))?;
        }
        Ok(())
    }
}

/// The rows one snapshot of the file becomes: `_snapshots`, its `_intervals` and its
/// `_auto_restatements` entry.
fn snapshot_rows(
    fields: &[(String, Box<RawValue>)],
    sections: &Sections,
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
    let node = parse("node")?.ok_or_else(|| format!("{name} has no \"node\""))?;
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
    let kind_name = if node.get("source_type").and_then(Value::as_str) == Some("audit") {
        None
    } else {
        node.get("kind")
            .and_then(|k| k.get("name"))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let flag = |name_: &str| -> Result<bool, String> {
        Ok(match parse(name_)? {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => b,
            Some(other) => return Err(format!("{name}: {name_} is {other}, not true or false")),
        })
    };
    // The stored JSON is the snapshot without what SQLMesh keeps elsewhere, spelled as SQLMesh's
    // serializer spells it; values are copied as written.
    let stored = format!(
        "{{{}}}",
        fields
            .iter()
            .filter(|(k, _)| !STORED_ELSEWHERE.contains(&k.as_str()))
            .map(|(k, v)| format!(
                "{}:{}",
                serde_json::to_string(k).unwrap_or_default(),
                compact_utf8(v.get())
            ))
            .collect::<Vec<_>>()
            .join(",")
    );
    let mut row = Map::new();
    row.insert("name".into(), name.clone().into());
    row.insert("identifier".into(), identifier.clone().into());
    put(&mut row, "version", version.clone());
    row.insert("snapshot".into(), stored.into());
    put(&mut row, "kind_name", kind_name);
    row.insert("updated_ts".into(), updated_ts.to_string().into());
    put(
        &mut row,
        "unpaused_ts",
        number_field(parse("unpaused_ts")?, &name, "unpaused_ts")?.map(|v| v.to_string()),
    );
    row.insert("ttl_ms".into(), ttl_ms.to_string().into());
    row.insert(
        "unrestorable".into(),
        flag("unrestorable")?.to_string().into(),
    );
    row.insert(
        "forward_only".into(),
        flag("forward_only")?.to_string().into(),
    );
    row.insert("dev_version".into(), dev_version.clone().into());
    row.insert(
        "fingerprint".into(),
        compact_utf8(field("fingerprint").unwrap_or("{}")).into(),
    );
    emitter.row_text(&sections.snapshots, "", Value::Object(row).to_string())?;

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
            let mut row = Map::new();
            row.insert("created_ts".into(), sections.created_ts.to_string().into());
            row.insert("name".into(), name.clone().into());
            if !is_pending {
                row.insert("identifier".into(), identifier.clone().into());
                row.insert("dev_version".into(), dev_version.clone().into());
            }
            put(&mut row, "version", version.clone());
            row.insert("start_ts".into(), start.to_string().into());
            row.insert("end_ts".into(), end.to_string().into());
            row.insert("is_dev".into(), is_dev.to_string().into());
            row.insert("is_removed".into(), "false".into());
            row.insert("is_compacted".into(), "false".into());
            row.insert(
                "is_pending_restatement".into(),
                is_pending.to_string().into(),
            );
            emitter.row_text(&sections.intervals, "", Value::Object(row).to_string())?;
        }
    }
    if let Some(next) = number_field(
        parse("next_auto_restatement_ts")?,
        &name,
        "next_auto_restatement_ts",
    )? {
        let mut row = Map::new();
        row.insert("snapshot_name".into(), name.clone().into());
        put(&mut row, "snapshot_version", version);
        row.insert("next_auto_restatement_ts".into(), next.to_string().into());
        emitter.row_text(
            &sections.auto_restatements,
            "",
            Value::Object(row).to_string(),
        )?;
    }
    Ok(())
}

fn put(row: &mut Map<String, Value>, column: &str, value: Option<String>) {
    if let Some(value) = value {
        row.insert(column.into(), value.into());
    }
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

struct EnvironmentMap<'a> {
    emitter: &'a mut Emitter,
    sections: &'a Sections,
}

impl<'de> DeserializeSeed<'de> for EnvironmentMap<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for EnvironmentMap<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object of environments keyed by name")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<String>()? {
            let OrderedObject(parts) = map.next_value()?;
            self.emitter.environments += 1;
            environment_rows(&key, &parts, self.sections, self.emitter)
                .map_err(|e| de::Error::custom(format!("environment \"{key}\": {e}")))?;
        }
        Ok(())
    }
}

/// The rows one environment of the file becomes: `_environments` and `_environment_statements`,
/// with the JSON columns spelled as SQLMesh's `json.dumps` spells them.
fn environment_rows(
    _key: &str,
    parts: &[(String, Box<RawValue>)],
    sections: &Sections,
    emitter: &mut Emitter,
) -> Result<(), String> {
    let part = |name: &str| parts.iter().find(|(k, _)| k == name).map(|(_, v)| v.get());
    if let Some((other, _)) = parts
        .iter()
        .find(|(k, _)| k != "environment" && k != "statements")
    {
        return Err(format!("unknown field \"{other}\""));
    }
    let OrderedObject(fields) = serde_json::from_str(
        part("environment").ok_or_else(|| "it has no \"environment\"".to_string())?,
    )
    .map_err(|e| format!("environment: {e}"))?;
    let field = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| v.get());
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
    let mut row = Map::new();
    row.insert("name".into(), name.clone().into());
    for column in [
        "start_at",
        "end_at",
        "plan_id",
        "previous_plan_id",
        "suffix_target",
        "catalog_name_override",
    ] {
        match value(column)? {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => {
                row.insert(column.into(), s.into());
            }
            Some(Value::Number(n)) if column.ends_with("_at") => {
                // SQLMesh stores time values as text: epoch milliseconds become a date-time.
                let text = n
                    .as_i64()
                    .and_then(|ms| Utc.timestamp_millis_opt(ms).single())
                    .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                    .ok_or_else(|| format!("{column} is {n}, not a time"))?;
                row.insert(column.into(), text.into());
            }
            Some(other) => return Err(format!("{column} is {other}, not text")),
        }
    }
    for column in ["expiration_ts", "finalized_ts"] {
        match value(column)? {
            None | Some(Value::Null) => {}
            Some(Value::Number(n)) if n.is_i64() => {
                row.insert(column.into(), n.to_string().into());
            }
            Some(other) => return Err(format!("{column} is {other}, not a time in milliseconds")),
        }
    }
    for column in ["normalize_name", "gateway_managed"] {
        match value(column)? {
            None | Some(Value::Null) => {}
            Some(Value::Bool(b)) => {
                row.insert(column.into(), b.to_string().into());
            }
            Some(other) => return Err(format!("{column} is {other}, not true or false")),
        }
    }
    for (column, default) in [
        ("snapshots", Some("[]")),
        ("promoted_snapshot_ids", None),
        ("previous_finalized_snapshots", None),
        ("requirements", Some("{}")),
    ] {
        if let Some(raw) = field(column).filter(|raw| raw.trim() != "null").or(default) {
            row.insert(column.into(), python_dumps(raw).into());
        }
    }
    row.entry("normalize_name").or_insert_with(|| "true".into());
    row.entry("gateway_managed")
        .or_insert_with(|| "false".into());
    let plan_id = row.get("plan_id").cloned();
    emitter.row_text(&sections.environments, "", Value::Object(row).to_string())?;

    // Statements are stored only when there are some (an empty list leaves no row).
    let statements = part("statements").unwrap_or("[]");
    let has_statements = matches!(
        serde_json::from_str::<Value>(statements),
        Ok(Value::Array(items)) if !items.is_empty()
    );
    let mut row = Map::new();
    row.insert("environment_name".into(), name.into());
    if let Some(plan_id) = plan_id {
        row.insert("plan_id".into(), plan_id);
    }
    if has_statements {
        row.insert(
            "environment_statements".into(),
            python_dumps(statements).into(),
        );
    }
    // Staged either way: a merge replaces (or removes) the environment's statements.
    row.insert("has_statements".into(), has_statements.into());
    emitter.row_text(&sections.statements, "", Value::Object(row).to_string())
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
    let staged = incoming.stage(&mut tx).await?;
    validate_staged(&mut tx).await?;

    store.lock_tables(&mut tx).await?;
    let backup = store.create_backup(&mut tx, &current, "pre-import").await?;
    let schema = store.schema().as_str();
    let s = store.schema().quoted();
    let present = store.tables(&mut tx).await?;
    let mode = incoming.options.mode;
    match mode {
        ImportMode::Replace => {
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
                     WHERE x.section = '{SNAPSHOTS}' AND t.name = x.doc->>'name' AND t.identifier = x.doc->>'identifier'"
                ),
                format!(
                    "DELETE FROM {s}._environments t USING statekeeper_import x
                     WHERE x.section = '{ENVIRONMENTS}' AND t.name = x.doc->>'name'"
                ),
            ] {
                sqlx::query(AssertSqlSafe(statement))
                    .execute(&mut *tx)
                    .await?;
            }
            if present.iter().any(|t| t == STATEMENTS) {
                sqlx::query(AssertSqlSafe(format!(
                    "DELETE FROM {s}._environment_statements t USING statekeeper_import x
                     WHERE x.section = '{STATEMENTS}' AND t.environment_name = x.doc->>'environment_name'"
                )))
                .execute(&mut *tx)
                .await?;
            }
            if present.iter().any(|t| t == AUTO_RESTATEMENTS) {
                sqlx::query(AssertSqlSafe(format!(
                    "DELETE FROM {s}._auto_restatements t USING statekeeper_import x
                     WHERE x.section = '{AUTO_RESTATEMENTS}' AND t.snapshot_name = x.doc->>'snapshot_name'
                       AND t.snapshot_version IS NOT DISTINCT FROM x.doc->>'snapshot_version'"
                )))
                .execute(&mut *tx)
                .await?;
            }
        }
    }
    // Environments without statements only cleared their old ones (merge); they insert nothing.
    sqlx::query(AssertSqlSafe(format!(
        "DELETE FROM statekeeper_import WHERE section = '{STATEMENTS}' AND NOT (doc->>'has_statements')::boolean"
    )))
    .execute(&mut *tx)
    .await?;
    for table in [
        SNAPSHOTS,
        INTERVALS,
        AUTO_RESTATEMENTS,
        ENVIRONMENTS,
        STATEMENTS,
    ] {
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
        // Interval ids are random, as SQLMesh's are.
        let defaults: &[(&str, &str)] = if table == INTERVALS {
            &[("id", "replace(gen_random_uuid()::text, '-', '')")]
        } else {
            &[]
        };
        insert_staged(&mut tx, schema, table, table, StagedShape::ByName, defaults).await?;
    }
    tx.commit().await?;
    Ok(ImportReport {
        mode,
        format: ExportFormat::Sqlmesh,
        source_store: String::new(),
        schema_version: current.schema_version,
        environments: staged.environments,
        rows: staged.counts,
        bytes: staged.bytes,
        sha256: staged.sha256,
        compression: incoming.compression,
        backup: Some(backup),
        duration: incoming.started.elapsed(),
    })
}

/// Rules a file must satisfy before it may touch the store; the first broken rule wins.
async fn validate_staged(conn: &mut PgConnection) -> Result<(), Error> {
    let checks = [
        format!(
            "SELECT format('snapshot %s (identifier %s) appears %s times', doc->>'name', doc->>'identifier', count(*))
             FROM statekeeper_import WHERE section = '{SNAPSHOTS}'
             GROUP BY doc->>'name', doc->>'identifier' HAVING count(*) > 1"
        ),
        format!(
            "SELECT format('environment %s appears %s times', doc->>'name', count(*))
             FROM statekeeper_import WHERE section = '{ENVIRONMENTS}'
             GROUP BY doc->>'name' HAVING count(*) > 1"
        ),
    ];
    for check in checks {
        let problem: Option<String> = sqlx::query_scalar(AssertSqlSafe(format!("{check} LIMIT 1")))
            .fetch_optional(&mut *conn)
            .await?;
        if let Some(problem) = problem {
            return Err(Error::InvalidExport(problem));
        }
    }
    Ok(())
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
