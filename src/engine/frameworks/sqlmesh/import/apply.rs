//! Applying the staged rows to SQLMesh's tables, inside the import's transaction under table
//! locks: what the file replaces goes first, then each table's rows are inserted from staging.

use sqlx::{AssertSqlSafe, PgConnection};

use super::checks::refuse_rows_without_table;
use super::layout::{
    AUTO_RESTATEMENT_COLUMNS, AUTO_RESTATEMENTS, ENVIRONMENT_COLUMNS, ENVIRONMENTS,
    INTERVAL_COLUMNS, INTERVALS, LIST_COLUMNS, SNAPSHOT_COLUMNS, SNAPSHOTS, STATEMENT_COLUMNS,
    STATEMENTS, list_section, staged_position,
};
use crate::engine::Error;
use crate::engine::format::staging::{Staged, insert_staged, remember_entities, staged_field};
use crate::engine::identifier::{qualified_list, quote_literal};
use crate::engine::store::Store;
use crate::engine::transfer::ImportMode;

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

/// Clears what the file replaces: `Replace` every table but `_versions` (remembering the
/// entities before, to report the removed ones); `Merge` the file's snapshots, environments,
/// their statements and auto-restatements.
pub(super) async fn clear_replaced_rows(
    store: &Store,
    conn: &mut PgConnection,
    mode: ImportMode,
    present: &[String],
) -> Result<(), Error> {
    match mode {
        ImportMode::Replace => empty_all_but_versions(store, conn, present).await,
        ImportMode::Merge => delete_merged_rows(store, conn, present).await,
    }
}

async fn empty_all_but_versions(
    store: &Store,
    conn: &mut PgConnection,
    present: &[String],
) -> Result<(), Error> {
    remember_entities(store, conn).await?;
    let emptied: Vec<String> = present
        .iter()
        .filter(|t| t.as_str() != "_versions")
        .cloned()
        .collect();
    sqlx::query(AssertSqlSafe(format!(
        "TRUNCATE {}",
        qualified_list(store.schema().as_str(), &emptied)
    )))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// As `sqlmesh state import` without `--replace`: snapshots by name and identifier,
/// environments and their statements by name, auto-restatements by snapshot name and version.
async fn delete_merged_rows(
    store: &Store,
    conn: &mut PgConnection,
    present: &[String],
) -> Result<(), Error> {
    let s = store.schema().quoted();
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
            .execute(&mut *conn)
            .await?;
    }
    if present.iter().any(|t| t == STATEMENTS) {
        sqlx::query(AssertSqlSafe(format!(
            "DELETE FROM {s}._environment_statements t USING statekeeper_import x
                     WHERE x.section = '{STATEMENTS}' AND t.environment_name = x.f1"
        )))
        .execute(&mut *conn)
        .await?;
    }
    if present.iter().any(|t| t == AUTO_RESTATEMENTS) {
        sqlx::query(AssertSqlSafe(format!(
            "DELETE FROM {s}._auto_restatements t USING statekeeper_import x
                     WHERE x.section = '{AUTO_RESTATEMENTS}' AND t.snapshot_name = x.f1
                       AND t.snapshot_version IS NOT DISTINCT FROM x.f2"
        )))
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// Inserts each staged table's rows into its table, environments with their lists joined from
/// their staged pieces.
pub(super) async fn insert_staged_rows(
    store: &Store,
    conn: &mut PgConnection,
    staged: &Staged,
    present: &[String],
) -> Result<(), Error> {
    // Environments without statements only cleared their old ones (merge); they insert nothing.
    sqlx::query(AssertSqlSafe(format!(
        "DELETE FROM statekeeper_import WHERE section = '{STATEMENTS}' AND f4 = 'false'"
    )))
    .execute(&mut *conn)
    .await?;
    let schema = store.schema().as_str();
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
            refuse_rows_without_table(conn, table).await?;
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
        insert_staged(conn, schema, table, table, staged_columns, &defaults, joins).await?;
    }
    Ok(())
}
