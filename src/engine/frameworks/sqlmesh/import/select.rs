//! Restore in part of a SQLMesh document: after the whole file is staged, only the chosen
//! environments stay (with their statements), and only the snapshots they list or the chosen
//! models have (each with its intervals and auto-restatement). The merge that follows then does
//! what `sqlmesh state import` does with them: snapshots replace their namesakes, intervals are
//! added, environments replace theirs. A model alone changes no environment.

use sqlx::{AssertSqlSafe, PgConnection};

use super::layout::{
    AUTO_RESTATEMENT_COLUMNS, AUTO_RESTATEMENTS, ENVIRONMENT_COLUMNS, ENVIRONMENTS,
    INTERVAL_COLUMNS, INTERVALS, LIST_COLUMNS, SNAPSHOT_COLUMNS, SNAPSHOTS, STATEMENTS,
    list_section, staged_position,
};
use crate::engine::Error;
use crate::engine::format::selection::{model_matches, refuse_unmatched, restored};
use crate::engine::format::staging::staged_field;
use crate::engine::identifier::quote_literal;
use crate::engine::transfer::{Restored, Selection};

/// The staging column of `column` in a section staged with `columns`.
fn at(columns: &[&str], column: &str) -> String {
    staged_field(staged_position(columns, column))
}

/// Keeps only what `selection` names; `None` when it names nothing (the whole file).
pub(super) async fn keep_selected(
    conn: &mut PgConnection,
    selection: &Selection,
) -> Result<Option<Restored>, Error> {
    if selection.is_empty() {
        return Ok(None);
    }
    // The selection's joins read the staged rows by section: statistics make them hash joins.
    sqlx::query("ANALYZE statekeeper_import")
        .execute(&mut *conn)
        .await?;
    let env_name = at(ENVIRONMENT_COLUMNS, "name");
    let snapshot_name = at(SNAPSHOT_COLUMNS, "name");
    refuse_unmatched(
        conn,
        "environment",
        &selection.environments,
        &format!(
            "SELECT a FROM unnest($1::text[]) a WHERE NOT EXISTS (SELECT 1 FROM statekeeper_import x \
             WHERE x.section = '{ENVIRONMENTS}' AND x.{env_name} = a)"
        ),
        &format!(
            "SELECT x.{env_name} FROM statekeeper_import x WHERE x.section = '{ENVIRONMENTS}' ORDER BY 1"
        ),
    )
    .await?;
    refuse_unmatched(
        conn,
        "model",
        &selection.models,
        &format!(
            "SELECT a FROM unnest($1::text[]) a WHERE NOT EXISTS (SELECT 1 FROM statekeeper_import x \
             WHERE x.section = '{SNAPSHOTS}' AND {})",
            model_matches(&format!("x.{snapshot_name}"), "a")
        ),
        &format!(
            "SELECT DISTINCT x.{snapshot_name} FROM statekeeper_import x \
             WHERE x.section = '{SNAPSHOTS}' ORDER BY 1"
        ),
    )
    .await?;
    for (statement, binds) in statements() {
        let query = sqlx::query(AssertSqlSafe(statement));
        let query = match binds {
            Binds::Environments => query.bind(&selection.environments),
            Binds::Models => query.bind(&selection.models),
            Binds::Neither => query,
        };
        query.execute(&mut *conn).await?;
    }
    let environments: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT x.{env_name} FROM statekeeper_import x WHERE x.section = '{ENVIRONMENTS}' ORDER BY 1"
    )))
    .fetch_all(&mut *conn)
    .await?;
    let models: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT DISTINCT x.{snapshot_name} FROM statekeeper_import x WHERE x.section = '{SNAPSHOTS}' \
         AND EXISTS (SELECT 1 FROM unnest($1::text[]) a WHERE {}) ORDER BY 1",
        model_matches(&format!("x.{snapshot_name}"), "a")
    )))
    .bind(&selection.models)
    .fetch_all(&mut *conn)
    .await?;
    restored(conn, environments, models, (SNAPSHOTS, INTERVALS))
        .await
        .map(Some)
}

/// What a statement of [`statements`] binds as `$1`.
enum Binds {
    Environments,
    Models,
    Neither,
}

/// The statements that keep the selection, in order.
fn statements() -> Vec<(String, Binds)> {
    let env_name = at(ENVIRONMENT_COLUMNS, "name");
    let env_index = at(ENVIRONMENT_COLUMNS, "environment_index");
    let (s_name, s_identifier, s_version, s_fingerprint) = (
        at(SNAPSHOT_COLUMNS, "name"),
        at(SNAPSHOT_COLUMNS, "identifier"),
        at(SNAPSHOT_COLUMNS, "version"),
        at(SNAPSHOT_COLUMNS, "fingerprint"),
    );
    let (i_name, i_identifier, i_version) = (
        at(INTERVAL_COLUMNS, "name"),
        at(INTERVAL_COLUMNS, "identifier"),
        at(INTERVAL_COLUMNS, "version"),
    );
    let (a_name, a_version) = (
        at(AUTO_RESTATEMENT_COLUMNS, "snapshot_name"),
        at(AUTO_RESTATEMENT_COLUMNS, "snapshot_version"),
    );
    let listed = quote_literal(&list_section("snapshots"));
    let lists: Vec<String> = LIST_COLUMNS
        .iter()
        .map(|c| quote_literal(&list_section(c)))
        .collect();
    vec![
        // The snapshots the chosen environments list, by name and fingerprint (their elements
        // are staged in pieces, each a list's items as `json.dumps` joins them).
        (format!(
            "CREATE TEMP TABLE statekeeper_restore_listed ON COMMIT DROP AS
             SELECT DISTINCT el->>'name' AS name, el->'fingerprint' AS fingerprint
             FROM statekeeper_import e
             JOIN statekeeper_import l ON l.section = {listed} AND l.f1 = e.{env_index}
             CROSS JOIN LATERAL jsonb_array_elements(('[' || l.f2 || ']')::jsonb) el
             WHERE e.section = '{ENVIRONMENTS}' AND e.{env_name} = ANY($1)"
        ), Binds::Environments),
        (format!(
            "DELETE FROM statekeeper_import x WHERE x.section = '{SNAPSHOTS}'
               AND NOT EXISTS (SELECT 1 FROM statekeeper_restore_listed r
                               WHERE r.name = x.{s_name} AND r.fingerprint = x.{s_fingerprint}::jsonb)
               AND NOT EXISTS (SELECT 1 FROM unnest($1::text[]) a WHERE {})",
            model_matches(&format!("x.{s_name}"), "a")
        ), Binds::Models),
        // Intervals of the kept snapshots: by identifier, or by version where the file gives
        // none (pending restatements).
        (format!(
            "DELETE FROM statekeeper_import x WHERE x.section = '{INTERVALS}'
               AND x.{i_identifier} IS NOT NULL AND NOT EXISTS (
               SELECT 1 FROM statekeeper_import s WHERE s.section = '{SNAPSHOTS}'
                 AND s.{s_name} = x.{i_name} AND s.{s_identifier} = x.{i_identifier})"
        ), Binds::Neither),
        (format!(
            "DELETE FROM statekeeper_import x WHERE x.section = '{INTERVALS}'
               AND x.{i_identifier} IS NULL AND NOT EXISTS (
               SELECT 1 FROM statekeeper_import s WHERE s.section = '{SNAPSHOTS}'
                 AND s.{s_name} = x.{i_name} AND s.{s_version} = x.{i_version})"
        ), Binds::Neither),
        (format!(
            "DELETE FROM statekeeper_import x WHERE x.section = '{AUTO_RESTATEMENTS}' AND NOT EXISTS (
               SELECT 1 FROM statekeeper_import s WHERE s.section = '{SNAPSHOTS}'
                 AND s.{s_name} = x.{a_name} AND s.{s_version} IS NOT DISTINCT FROM x.{a_version})"
        ), Binds::Neither),
        // Environments not chosen, with their lists and statements.
        (format!(
            "DELETE FROM statekeeper_import x WHERE x.section IN ({}) AND NOT EXISTS (
               SELECT 1 FROM statekeeper_import e WHERE e.section = '{ENVIRONMENTS}'
                 AND e.{env_index} = x.f1 AND e.{env_name} = ANY($1))",
            lists.join(", ")
        ), Binds::Environments),
        (format!(
            "DELETE FROM statekeeper_import x WHERE x.section = '{STATEMENTS}'
               AND NOT (x.{} = ANY($1))",
            at(super::layout::STATEMENT_COLUMNS, "environment_name")
        ), Binds::Environments),
        (format!(
            "DELETE FROM statekeeper_import x WHERE x.section = '{ENVIRONMENTS}'
               AND NOT (x.{env_name} = ANY($1))"
        ), Binds::Environments),
    ]
}
