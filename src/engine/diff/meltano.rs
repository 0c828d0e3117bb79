//! Meltano's state compared between two schemas holding its `state` table: state IDs on one side
//! only, and those whose state differs, with the bookmarks that changed
//! (`completed_state.singer_state.bookmarks.STREAM`) or else the parts of the state that did.

use futures::TryStreamExt as _;
use serde_json::{Map, Value};
use sqlx::{AssertSqlSafe, PgConnection};

use super::report::{BookmarkChange, Capped, MeltanoDiff, StateChange};
use crate::engine::Error;
use crate::engine::identifier::SchemaName;

type StateRow = (
    String,
    bool,
    bool,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
);

/// What differs from schema `from` to schema `to`. With `merge`, only what a merge of `to` into
/// `from` changes: state IDs only in `from` stay.
pub(super) async fn diff(
    conn: &mut PgConnection,
    from: &SchemaName,
    to: &SchemaName,
    limit: usize,
    merge: bool,
) -> Result<MeltanoDiff, Error> {
    // Texts that differ are compared again as JSON on the client: only a real change counts.
    let sql = format!(
        "SELECT COALESCE(f.state_id, t.state_id), f.state_id IS NOT NULL, t.state_id IS NOT NULL,
                CASE WHEN t.state_id IS NOT NULL THEN f.completed_state END,
                CASE WHEN t.state_id IS NOT NULL THEN f.partial_state END,
                CASE WHEN f.state_id IS NOT NULL THEN t.completed_state END,
                CASE WHEN f.state_id IS NOT NULL THEN t.partial_state END
         FROM {from}.state f FULL JOIN {to}.state t ON f.state_id = t.state_id
         WHERE f.state_id IS NULL OR t.state_id IS NULL
            OR f.completed_state IS DISTINCT FROM t.completed_state
            OR f.partial_state IS DISTINCT FROM t.partial_state
         ORDER BY 1",
        from = from.quoted(),
        to = to.quoted(),
    );
    let mut out = MeltanoDiff::default();
    let mut rows = sqlx::query_as::<_, StateRow>(AssertSqlSafe(sql)).fetch(&mut *conn);
    while let Some(row) = rows.try_next().await? {
        let (state_id, in_from, in_to, from_completed, from_partial, to_completed, to_partial) =
            row;
        match (in_from, in_to) {
            (false, _) => out.state_ids.added.push(state_id, limit),
            (_, false) => {
                if !merge {
                    out.state_ids.removed.push(state_id, limit);
                }
            }
            _ => {
                let from = (parse(&from_completed), parse(&from_partial));
                let to = (parse(&to_completed), parse(&to_partial));
                if from == to {
                    continue;
                }
                let change = state_change(state_id, &from, &to, limit);
                out.changed.push(change, limit);
            }
        }
    }
    Ok(out)
}

/// A state column as JSON; text that is not JSON stays text (Meltano only writes JSON).
fn parse(text: &Option<String>) -> Value {
    match text {
        None => Value::Null,
        Some(text) => serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.clone())),
    }
}

fn state_change(
    state_id: String,
    (from_completed, from_partial): &(Value, Value),
    (to_completed, to_partial): &(Value, Value),
    limit: usize,
) -> StateChange {
    let mut bookmarks = Capped::default();
    let mut other = Vec::new();
    let empty = Map::new();
    let object = |v: &Value| v.as_object().cloned();
    match (object(from_completed), object(to_completed)) {
        (Some(from), Some(to)) => {
            let singer = |m: &Map<String, Value>| m.get("singer_state").cloned();
            for key in changed_keys(&from, &to) {
                if key != "singer_state" {
                    other.push(format!("completed_state.{key}"));
                }
            }
            let (from_singer, to_singer) = (singer(&from), singer(&to));
            let from_singer = from_singer
                .as_ref()
                .and_then(Value::as_object)
                .unwrap_or(&empty);
            let to_singer = to_singer
                .as_ref()
                .and_then(Value::as_object)
                .unwrap_or(&empty);
            for key in changed_keys(from_singer, to_singer) {
                if key != "bookmarks" {
                    other.push(format!("completed_state.singer_state.{key}"));
                }
            }
            let marks = |m: &Map<String, Value>| {
                m.get("bookmarks")
                    .and_then(Value::as_object)
                    .cloned()
                    .unwrap_or_default()
            };
            let (from_marks, to_marks) = (marks(from_singer), marks(to_singer));
            for stream in changed_keys(&from_marks, &to_marks) {
                bookmarks.push(
                    BookmarkChange {
                        from: from_marks.get(&stream).cloned(),
                        to: to_marks.get(&stream).cloned(),
                        stream,
                    },
                    limit,
                );
            }
            let bookmarks_differ = from_singer.get("bookmarks") != to_singer.get("bookmarks");
            if bookmarks_differ && bookmarks.is_empty() {
                other.push("completed_state.singer_state.bookmarks".into());
            }
        }
        _ if from_completed != to_completed => other.push("completed_state".into()),
        _ => {}
    }
    if from_partial != to_partial {
        other.push("partial_state".into());
    }
    StateChange {
        state_id,
        bookmarks,
        other,
    }
}

/// The keys whose values differ (or that one side lacks), in order.
fn changed_keys(from: &Map<String, Value>, to: &Map<String, Value>) -> Vec<String> {
    let mut keys: Vec<&String> = from.keys().chain(to.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| from.get(*k) != to.get(*k))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::state_change;

    #[test]
    fn a_changed_state_names_its_bookmarks_else_what_changed() {
        let from = (
            json!({"singer_state": {"bookmarks": {"users": {"id": 1}, "orders": {"id": 5}}}}),
            json!({}),
        );
        let to = (
            json!({"singer_state": {"bookmarks": {"users": {"id": 2}, "orders": {"id": 5}}}}),
            json!({"singer_state": {}}),
        );
        let change = state_change("s".into(), &from, &to, 10);
        assert_eq!(change.bookmarks.items.len(), 1);
        assert_eq!(change.bookmarks.items[0].stream, "users");
        assert_eq!(change.bookmarks.items[0].to, Some(json!({"id": 2})));
        assert_eq!(change.other, vec!["partial_state"]);
        let change = state_change("s".into(), &(json!(null), json!({})), &to, 10);
        assert_eq!(change.other, vec!["completed_state", "partial_state"]);
    }
}
