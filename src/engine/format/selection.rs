//! Restore in part: what every format's selection shares. A format stages the whole file as
//! usual, then keeps only the staged rows of the chosen environments, models or state IDs (and
//! what they reference) before it merges; a name that matches nothing stops the import, naming
//! what the file has instead.

use sqlx::{AssertSqlSafe, PgConnection};

use crate::engine::Error;
use crate::engine::transfer::Restored;

/// How many names an error lists of what the source has.
const LISTED: usize = 10;

/// The error source of a file (a restore from a backup renames it).
pub(crate) const THE_FILE: &str = "the file";

/// Fails unless each of `asked` matches: `missing_sql` binds `$1` (the asked names) and returns
/// those without a match; `existing_sql` returns the names the staged file has, in order.
pub(crate) async fn refuse_unmatched(
    conn: &mut PgConnection,
    what: &'static str,
    asked: &[String],
    missing_sql: &str,
    existing_sql: &str,
) -> Result<(), Error> {
    if asked.is_empty() {
        return Ok(());
    }
    let missing: Vec<String> = sqlx::query_scalar(AssertSqlSafe(missing_sql.to_owned()))
        .bind(asked)
        .fetch_all(&mut *conn)
        .await?;
    if missing.is_empty() {
        return Ok(());
    }
    let existing: Vec<String> = sqlx::query_scalar(AssertSqlSafe(existing_sql.to_owned()))
        .fetch_all(&mut *conn)
        .await?;
    Err(nothing_to_restore(
        THE_FILE.into(),
        what,
        &missing,
        &existing,
    ))
}

/// The error of a restore in part that asked for `missing`, which `source_name` does not have;
/// `existing` is what it has.
pub(crate) fn nothing_to_restore(
    source_name: String,
    what: &'static str,
    missing: &[String],
    existing: &[String],
) -> Error {
    Error::NothingToRestore {
        source_name,
        what,
        names: missing.iter().map(|n| format!("\"{n}\"")).collect(),
        available: available(what, existing),
    }
}

/// What a restore in part restores: the named environments and models, with the rows left staged
/// under `versions` and `intervals` counted.
pub(crate) async fn restored(
    conn: &mut PgConnection,
    environments: Vec<String>,
    models: Vec<String>,
    (versions, intervals): (&str, &str),
) -> Result<Restored, Error> {
    let (versions, intervals): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE section = $1), count(*) FILTER (WHERE section = $2) \
         FROM statekeeper_import",
    )
    .bind(versions)
    .bind(intervals)
    .fetch_one(conn)
    .await?;
    Ok(Restored {
        environments,
        models,
        state_ids: Vec::new(),
        versions: versions as u64,
        intervals: intervals as u64,
    })
}

/// `3 environments: dev, prod, staging`, the first [`LISTED`] of them.
fn available(what: &str, names: &[String]) -> String {
    if names.is_empty() {
        return format!("no {what} at all");
    }
    let shown: Vec<&str> = names.iter().take(LISTED).map(String::as_str).collect();
    format!(
        "{}: {}{}",
        crate::engine::words::counted(names.len() as u64, &format!("{what}s")),
        shown.join(", "),
        if names.len() > LISTED { ", …" } else { "" }
    )
}

/// The SQL of a `*` glob (Meltano's state IDs, the text expression `glob`) as a LIKE pattern;
/// `%`, `_` and `\` match themselves.
pub(crate) fn like_pattern_sql(glob: &str) -> String {
    format!(
        "replace(replace(replace(replace({glob}, '\\', '\\\\'), '%', '\\%'), '_', '\\_'), '*', '%')"
    )
}

/// A model name as asked (the text expression `asked`) names the model in `column` when they are
/// equal without SQL quotes, or the asked name ends it after a dot: `"db"."s"."m"`, `db.s.m` and
/// `s.m` all name `"db"."s"."m"`.
pub(crate) fn model_matches(column: &str, asked: &str) -> String {
    let bare = |e: &str| format!("replace({e}, '\"', '')");
    format!(
        "({c} = {a} OR right({c}, length({a}) + 1) = '.' || {a})",
        c = bare(column),
        a = bare(asked)
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn available_lists_a_few() {
        let names: Vec<String> = (0..12).map(|i| format!("e{i:02}")).collect();
        let text = super::available("environment", &names);
        assert!(text.starts_with("12 environments: e00, e01"), "{text}");
        assert!(text.ends_with(", …"), "{text}");
        assert_eq!(
            super::available("state ID", &[]),
            "no state ID at all".to_string()
        );
    }
}
