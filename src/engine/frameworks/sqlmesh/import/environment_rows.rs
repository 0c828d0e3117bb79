//! One environment of a SQLMesh export turned into the rows SQLMesh writes for it:
//! `_environments` and `_environment_statements`.

use chrono::{TimeZone, Utc};
use serde_json::Value;
use serde_json::value::RawValue;

use super::layout::{ENVIRONMENT_COLUMNS, Names, STATEMENT_COLUMNS, StagedRow};
use crate::engine::format::reader::Emitter;
use crate::engine::json::python_dumps;

/// An environment's fields: the lists streamed, the rest kept (they are small).
pub(super) struct Fields {
    /// Small fields as written.
    pub(super) values: Vec<(String, Box<RawValue>)>,
    /// List columns that held a list (their elements are staged).
    pub(super) lists: Vec<&'static str>,
}

/// The rows one environment of the file becomes: `_environments` (its lists joined from their
/// staged elements when applied) and `_environment_statements`, with JSON spelled as SQLMesh's
/// `json.dumps` spells it.
pub(super) fn environment_rows(
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
