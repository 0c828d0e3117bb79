//! Reading statekeeper's logical format v1 (docs/export-format.md): every row is staged, checked
//! for completeness, duplicates and dangling references, then the store is replaced by the file
//! or the file is merged into it, in one transaction with a backup of the replaced state.

use std::collections::HashSet;
use std::sync::Arc;

use sqlx::{AssertSqlSafe, PgConnection};

use super::Event;
use super::export::{EXPORT_MIN_VERSION, FILE_VERSION};
use crate::engine::Error;
use crate::engine::catalog;
use crate::engine::format::reader::{Emitter, SectionReader};
use crate::engine::format::selection::{model_matches, refuse_unmatched, restored};
use crate::engine::format::staging::{
    Ending, Incoming, commit_import, drop_secondary_structures, invalid, remember_entities,
    removed_by, restore_secondary_structures,
};
use crate::engine::format::stream::Header;
use crate::engine::framework::{ExportFormat, StoreVersion};
use crate::engine::jsonscan::{Cursor, ScanError};
use crate::engine::store::{Store, TableLock};
use crate::engine::transfer::{ImportMode, ImportReport, Restored, Selection};

/// Sections of flat rows at the top of the document.
const TOP_SECTIONS: &[&str] = &[
    "model_versions",
    "model_version_intervals",
    "function_versions",
    "physical_relations",
    "physical_relation_ancestry",
    "locks",
    "state_operations",
];
/// Sections every importable file has (`locks` and `state_operations` only in full exports).
const REQUIRED_SECTIONS: &[&str] = &[
    "model_versions",
    "model_version_intervals",
    "function_versions",
    "physical_relations",
    "physical_relation_ancestry",
    "environments",
];

/// Staged section name -> target table, in insertion order (parents first).
const TABLES: &[(&str, &str)] = &[
    ("model_versions", "model_versions"),
    ("function_versions", "function_versions"),
    ("model_version_intervals", "model_version_intervals"),
    ("physical_relations", "physical_relations"),
    ("physical_relation_ancestry", "physical_relation_ancestry"),
    ("environment", "virtual_environments"),
    ("refs", "virtual_environment_refs"),
    ("function_refs", "virtual_environment_function_refs"),
    ("checkpoint", "virtual_environment_checkpoints"),
    ("checkpoint_refs", "virtual_environment_checkpoint_refs"),
    (
        "checkpoint_function_refs",
        "virtual_environment_checkpoint_function_refs",
    ),
    ("locks", "locks"),
    ("state_operations", "state_operations"),
];

/// Reads the sections after the header.
#[derive(Default)]
pub(crate) struct Sections {
    seen: HashSet<String>,
}

type Doc<'a, 'b> = &'a mut Cursor<&'b mut dyn std::io::Read>;

impl SectionReader for Sections {
    fn section(&mut self, cursor: Doc, key: &str, emitter: &mut Emitter) -> Result<(), ScanError> {
        if !self.seen.insert(key.to_owned()) {
            return Err(ScanError(format!("section \"{key}\" appears twice")));
        }
        if key == "environments" {
            cursor.object(|cursor, name| {
                let key = serde_json::to_string(&name).map_err(|e| ScanError(e.to_string()))?;
                emitter.environments += 1;
                read_environment(cursor, &key, emitter)
            })
        } else if TOP_SECTIONS.contains(&key) {
            rows(cursor, &section(key), "", emitter)
        } else {
            Err(ScanError(format!("unknown section \"{key}\"")))
        }
    }

    fn finish(&mut self, _emitter: &mut Emitter) -> Result<(), ScanError> {
        match REQUIRED_SECTIONS.iter().find(|s| !self.seen.contains(**s)) {
            Some(missing) => Err(ScanError(format!("section \"{missing}\" is missing"))),
            None => Ok(()),
        }
    }
}

fn section(name: &str) -> Arc<str> {
    Arc::from(name)
}

/// An array of rows, each staged under `section` and `key`.
fn rows(
    cursor: Doc,
    section: &Arc<str>,
    key: &str,
    emitter: &mut Emitter,
) -> Result<(), ScanError> {
    cursor.array(|cursor| {
        let raw = cursor.raw()?;
        emitter.row(section, key, raw).map_err(ScanError)
    })
}

/// An environment: `{environment, refs, function_refs, checkpoints}`.
fn read_environment(cursor: Doc, key: &str, emitter: &mut Emitter) -> Result<(), ScanError> {
    let mut has_row = false;
    cursor.object(|cursor, field| match field.as_str() {
        "environment" => {
            has_row = true;
            let raw = cursor.raw()?;
            emitter
                .row(&section("environment"), key, raw)
                .map_err(ScanError)
        }
        "refs" | "function_refs" => rows(cursor, &section(&field), key, emitter),
        "checkpoints" => cursor.array(|cursor| read_checkpoint(cursor, key, emitter)),
        other => Err(ScanError(format!(
            "unknown field \"{other}\" in environment {key}"
        ))),
    })?;
    if has_row {
        Ok(())
    } else {
        Err(ScanError(format!(
            "environment {key} has no \"environment\" row"
        )))
    }
}

/// A checkpoint: `{checkpoint, refs, function_refs}`.
fn read_checkpoint(cursor: Doc, key: &str, emitter: &mut Emitter) -> Result<(), ScanError> {
    cursor.object(|cursor, field| match field.as_str() {
        "checkpoint" => {
            let raw = cursor.raw()?;
            emitter
                .row(&section("checkpoint"), key, raw)
                .map_err(ScanError)
        }
        "refs" => rows(cursor, &section("checkpoint_refs"), key, emitter),
        "function_refs" => rows(cursor, &section("checkpoint_function_refs"), key, emitter),
        other => Err(ScanError(format!(
            "unknown field \"{other}\" in a checkpoint of {key}"
        ))),
    })
}

/// Imports a v1 file into statekeeper's schema.
pub(crate) async fn import(
    store: &Store,
    header: Header,
    incoming: &mut Incoming<'_>,
) -> Result<ImportReport, Error> {
    header.check_importable(u64::from(FILE_VERSION))?;
    let file_version = header.schema_version()?;
    let source_store = header.metadata_str("store").unwrap_or_default().to_owned();
    let mut tx = store.begin_locked().await?;
    let current = store
        .require_version(&mut tx, EXPORT_MIN_VERSION, "import")
        .await?;
    if file_version != current {
        return Err(Error::InvalidExport(format!(
            "the file has schema version {file_version}, the store has {current}; upgrade the {} first",
            if file_version > current {
                "store"
            } else {
                "source store and export again"
            }
        )));
    }
    let sections: Vec<&str> = TABLES.iter().map(|(section, _)| *section).collect();
    let staged = incoming.stage(&mut tx, &sections, 0).await?;
    let restored = keep_selected(&mut tx, &incoming.options.selection).await?;
    let mode = incoming.options.mode;
    match mode {
        // A replace loads into tables whose keys check every rule but these.
        ImportMode::Replace => first_problem(&mut tx, &structural_checks()).await?,
        ImportMode::Merge => validate_staged(&mut tx).await?,
    }

    let version = StoreVersion {
        schema_version: current,
        details: Default::default(),
    };
    // Writers wait from here: the backup and the change see one state.
    store.lock_tables(&mut tx, TableLock::ReadersWait).await?;
    let backup = store
        .backup_before_change(&mut tx, &version, "pre-import")
        .await?;
    match mode {
        ImportMode::Replace => {
            remember_entities(store, &mut tx).await?;
            sqlx::query("SAVEPOINT statekeeper_replace")
                .execute(&mut *tx)
                .await?;
            if let Err(failed) = apply_replace(store, &mut tx).await {
                // Say which rule the file breaks, as a merge would, rather than which key
                // PostgreSQL tripped over first; its own reason when no rule explains it.
                sqlx::query("ROLLBACK TO SAVEPOINT statekeeper_replace")
                    .execute(&mut *tx)
                    .await?;
                validate_staged(&mut tx).await?;
                return Err(failed);
            }
        }
        ImportMode::Merge => apply_merge(store, &mut tx).await?,
    }
    catalog::resync_identities(&mut tx, store.schema().as_str()).await?;
    let removed = removed_by(mode, store, &mut tx).await?;
    super::record_event(
        store,
        &mut tx,
        &Event {
            operation: "import",
            from_version: current,
            to_version: current,
            backup_id: backup.as_ref().map(|b| b.id.as_str()),
            details: serde_json::json!({
                "mode": incoming.options.mode,
                "format": "statekeeper",
                "sourceStore": source_store,
                "exportedAt": header.metadata_str("timestamp"),
                "environments": header.metadata.get("environments"),
                "sha256": staged.sha256,
                "bytes": staged.bytes,
                "removed": removed.as_ref().map(|r| r.count),
            }),
        },
    )
    .await?;
    let ending = Ending {
        format: ExportFormat::Statekeeper,
        mode: incoming.options.mode,
        source_store,
        schema_version: current,
        environments: restored
            .as_ref()
            .map_or(staged.environments, |r| r.environments.len() as u64),
        backup,
        removed,
        restored,
    };
    commit_import(tx, store, incoming, staged, ending).await
}

/// Every rule a file must satisfy before it may touch the store; the first broken rule wins.
async fn validate_staged(conn: &mut PgConnection) -> Result<(), Error> {
    sqlx::query("CREATE INDEX ON statekeeper_import (section, (doc->>'id'))")
        .execute(&mut *conn)
        .await?;
    // A temporary table has no statistics until analysed: without them the planner guessed
    // nested loops for the checks' anti-joins (a 10k-version file took 14 s to validate).
    sqlx::query("ANALYZE statekeeper_import")
        .execute(&mut *conn)
        .await?;
    first_problem(conn, &staged_checks()).await
}

/// The rules no key or constraint of the tables checks: each environment's rows name it.
fn structural_checks() -> Vec<String> {
    vec![
        "SELECT format('environment %s holds a row named %s', x.environment::jsonb #>> '{}', x.doc->>'name') FROM statekeeper_import x
         WHERE x.section = 'environment' AND x.doc->>'name' IS DISTINCT FROM x.environment::jsonb #>> '{}'".to_string(),
        "SELECT format('a %s row of environment %s names environment %s', section, environment::jsonb #>> '{}', doc->>'environment') FROM statekeeper_import
         WHERE section IN ('refs', 'function_refs', 'checkpoint') AND doc->>'environment' IS DISTINCT FROM environment::jsonb #>> '{}'".to_string(),
    ]
}

/// Every rule, in the order they are reported.
fn staged_checks() -> Vec<String> {
    let staged =
        |section: &str| format!("(SELECT * FROM statekeeper_import WHERE section = '{section}')");
    let unique = |section: &str, what: &str, key: &str| {
        format!(
            "SELECT format('{what} %s appears %s times', {key}, count(*)) FROM {} x GROUP BY {key} HAVING count(*) > 1",
            staged(section)
        )
    };
    let present = |section: &str, field: &str, target: &str, target_field: &str, what: &str| {
        format!(
            "SELECT format('{what}', x.environment::jsonb #>> '{{}}', x.doc->>'{field}') FROM {} x
             WHERE NOT EXISTS (SELECT 1 FROM statekeeper_import t WHERE t.section = '{target}' AND t.doc->>'{target_field}' = x.doc->>'{field}')",
            staged(section)
        )
    };
    let mut checks = vec![
        "SELECT format('a %s row is not a JSON object', section) FROM statekeeper_import WHERE jsonb_typeof(doc) <> 'object'".to_string(),
        unique("model_versions", "model version id", "x.doc->>'id'"),
        unique("model_versions", "model version", "(x.doc->>'name') || ' ' || (x.doc->>'fingerprint')"),
        unique("function_versions", "function version id", "x.doc->>'id'"),
        unique("function_versions", "function version", "(x.doc->>'name') || ' ' || (x.doc->>'fingerprint')"),
        unique("physical_relations", "physical relation id", "x.doc->>'id'"),
        unique("physical_relations", "physical relation", "x.doc->>'relation_name'"),
        unique("model_version_intervals", "interval id", "x.doc->>'id'"),
        unique("environment", "environment", "x.environment::jsonb #>> '{}'"),
        unique("checkpoint", "checkpoint id", "x.doc->>'id'"),
        unique("refs", "model reference", "(x.environment::jsonb #>> '{}') || '/' || (x.doc->>'model_name')"),
    ];
    checks.extend(structural_checks());
    checks.extend([
        present("refs", "model_version_id", "model_versions", "id", "environment %s refers to model version %s, which the file does not contain"),
        present("function_refs", "function_version_id", "function_versions", "id", "environment %s refers to function version %s, which the file does not contain"),
        present("checkpoint_refs", "model_version_id", "model_versions", "id", "a checkpoint of environment %s refers to model version %s, which the file does not contain"),
        present("checkpoint_function_refs", "function_version_id", "function_versions", "id", "a checkpoint of environment %s refers to function version %s, which the file does not contain"),
        present("checkpoint_refs", "checkpoint_id", "checkpoint", "id", "environment %s has references for checkpoint %s, which the file does not contain"),
        present("physical_relations", "model_version_id", "model_versions", "id", "%sphysical relation of model version %s, which the file does not contain"),
        present("model_version_intervals", "model_version_id", "model_versions", "id", "%sinterval of model version %s, which the file does not contain"),
        present("physical_relation_ancestry", "parent_relation_id", "physical_relations", "id", "%sancestry names relation %s, which the file does not contain"),
        present("physical_relation_ancestry", "relation_id", "physical_relations", "id", "%sancestry names relation %s, which the file does not contain"),
    ]);
    checks
}

/// Runs `checks` in order; the first that returns a row is the file's problem. Rows that do not
/// convert to their table's row type fail when applied, inside this same transaction and with
/// PostgreSQL's reason: no separate pass over the file is needed.
async fn first_problem(conn: &mut PgConnection, checks: &[String]) -> Result<(), Error> {
    for check in checks {
        let problem: Option<Option<String>> =
            sqlx::query_scalar(AssertSqlSafe(format!("{check} LIMIT 1")))
                .fetch_optional(&mut *conn)
                .await
                .map_err(|e| invalid(&e))?;
        if let Some(Some(problem)) = problem {
            return Err(Error::InvalidExport(
                problem.replace("environment  ", "environment "),
            ));
        }
    }
    Ok(())
}

/// The store becomes exactly the file, ids included. The tables are emptied and reloaded
/// under TRUNCATE's exclusive locks, so their foreign keys and secondary indexes are dropped
/// for the load and restored after it, in the same transaction: PostgreSQL then checks each
/// key with one join instead of a trigger per row and builds each index once, and a
/// violation still fails (and undoes) the whole import.
async fn apply_replace(store: &Store, conn: &mut PgConnection) -> Result<(), Error> {
    let s = store.schema().quoted();
    let tables: Vec<String> = TABLES.iter().map(|(_, t)| format!("{s}.{t}")).collect();
    let names: Vec<String> = TABLES.iter().map(|(_, t)| (*t).to_owned()).collect();
    sqlx::query(AssertSqlSafe(format!("TRUNCATE {}", tables.join(", "))))
        .execute(&mut *conn)
        .await?;
    let restore = drop_secondary_structures(conn, store.schema().as_str(), &names).await?;
    for (section, table) in TABLES {
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {s}.{table} OVERRIDING SYSTEM VALUE {}",
            staged_rows(&s, section, table)
        )))
        .execute(&mut *conn)
        .await
        .map_err(|e| invalid(&e))?;
    }
    restore_secondary_structures(conn, &restore).await
}

/// The rows staged under `section` as rows of `table`. `(jsonb_populate_record(…)).*` in a
/// select list would call the function once per column; in `FROM` it runs once per row.
fn staged_rows(s: &str, section: &str, table: &str) -> String {
    format!(
        "SELECT r.* FROM statekeeper_import x \
         CROSS JOIN LATERAL jsonb_populate_record(NULL::{s}.{table}, x.doc) r \
         WHERE x.section = '{section}'"
    )
}

/// Versions (by name and fingerprint), relations (by name) and environments (by name) in the
/// file replace their namesakes; ids are remapped to the store's; everything else stays.
async fn apply_merge(store: &Store, conn: &mut PgConnection) -> Result<(), Error> {
    let s = store.schema().quoted();
    let rows = |section: &str, table: &str| format!("({})", staged_rows(&s, section, table));
    let statements = [
        // Model and function versions: update namesakes, insert the rest, map file ids to ours.
        format!(
            "UPDATE {s}.model_versions m SET version = f.version, kind = f.kind, definition = f.definition, created_at = f.created_at
             FROM {} f WHERE m.name = f.name AND m.fingerprint = f.fingerprint",
            rows("model_versions", "model_versions")
        ),
        format!(
            "INSERT INTO {s}.model_versions (name, fingerprint, version, kind, definition, created_at)
             SELECT f.name, f.fingerprint, f.version, f.kind, f.definition, f.created_at FROM {} f
             WHERE NOT EXISTS (SELECT 1 FROM {s}.model_versions m WHERE m.name = f.name AND m.fingerprint = f.fingerprint)",
            rows("model_versions", "model_versions")
        ),
        format!(
            "CREATE TEMP TABLE statekeeper_version_map ON COMMIT DROP AS
             SELECT f.id AS file_id, m.id AS local_id FROM {} f JOIN {s}.model_versions m ON m.name = f.name AND m.fingerprint = f.fingerprint",
            rows("model_versions", "model_versions")
        ),
        format!(
            "UPDATE {s}.function_versions m SET definition = f.definition, created_at = f.created_at
             FROM {} f WHERE m.name = f.name AND m.fingerprint = f.fingerprint",
            rows("function_versions", "function_versions")
        ),
        format!(
            "INSERT INTO {s}.function_versions (name, fingerprint, definition, created_at)
             SELECT f.name, f.fingerprint, f.definition, f.created_at FROM {} f
             WHERE NOT EXISTS (SELECT 1 FROM {s}.function_versions m WHERE m.name = f.name AND m.fingerprint = f.fingerprint)",
            rows("function_versions", "function_versions")
        ),
        format!(
            "CREATE TEMP TABLE statekeeper_function_map ON COMMIT DROP AS
             SELECT f.id AS file_id, m.id AS local_id FROM {} f JOIN {s}.function_versions m ON m.name = f.name AND m.fingerprint = f.fingerprint",
            rows("function_versions", "function_versions")
        ),
        // Intervals of merged versions are replaced by the file's.
        format!(
            "DELETE FROM {s}.model_version_intervals WHERE model_version_id IN (SELECT local_id FROM statekeeper_version_map)"
        ),
        format!(
            "INSERT INTO {s}.model_version_intervals (model_version_id, start_ts, end_ts, is_dev, created_at)
             SELECT v.local_id, f.start_ts, f.end_ts, f.is_dev, f.created_at FROM {} f JOIN statekeeper_version_map v ON v.file_id = f.model_version_id",
            rows("model_version_intervals", "model_version_intervals")
        ),
        // Physical relations by name, then their ancestry.
        format!(
            "INSERT INTO {s}.physical_relations (model_version_id, relation_name, created_at)
             SELECT v.local_id, f.relation_name, f.created_at FROM {} f JOIN statekeeper_version_map v ON v.file_id = f.model_version_id
             ON CONFLICT (relation_name) DO UPDATE SET model_version_id = excluded.model_version_id",
            rows("physical_relations", "physical_relations")
        ),
        format!(
            "CREATE TEMP TABLE statekeeper_relation_map ON COMMIT DROP AS
             SELECT f.id AS file_id, p.id AS local_id FROM {} f JOIN {s}.physical_relations p ON p.relation_name = f.relation_name",
            rows("physical_relations", "physical_relations")
        ),
        format!(
            "INSERT INTO {s}.physical_relation_ancestry (relation_id, parent_relation_id)
             SELECT c.local_id, p.local_id FROM {} f
             JOIN statekeeper_relation_map c ON c.file_id = f.relation_id JOIN statekeeper_relation_map p ON p.file_id = f.parent_relation_id
             ON CONFLICT DO NOTHING",
            rows("physical_relation_ancestry", "physical_relation_ancestry")
        ),
        // Environments in the file replace their namesakes wholesale (refs and checkpoints).
        format!(
            "DELETE FROM {s}.virtual_environments WHERE name IN (SELECT environment::jsonb #>> '{{}}' FROM statekeeper_import WHERE section = 'environment')"
        ),
        format!("INSERT INTO {s}.virtual_environments SELECT * FROM {} e", rows("environment", "virtual_environments")),
        format!(
            "INSERT INTO {s}.virtual_environment_refs (environment, model_name, model_version_id)
             SELECT f.environment, f.model_name, v.local_id FROM {} f JOIN statekeeper_version_map v ON v.file_id = f.model_version_id",
            rows("refs", "virtual_environment_refs")
        ),
        format!(
            "INSERT INTO {s}.virtual_environment_function_refs (environment, function_name, function_version_id)
             SELECT f.environment, f.function_name, v.local_id FROM {} f JOIN statekeeper_function_map v ON v.file_id = f.function_version_id",
            rows("function_refs", "virtual_environment_function_refs")
        ),
        format!(
            "CREATE TEMP TABLE statekeeper_checkpoint_map ON COMMIT DROP AS
             SELECT f.id AS file_id, nextval(pg_get_serial_sequence('{s}.virtual_environment_checkpoints', 'id')) AS local_id FROM {} f",
            rows("checkpoint", "virtual_environment_checkpoints")
        ),
        format!(
            "INSERT INTO {s}.virtual_environment_checkpoints (id, environment, plan_id, description, created_at) OVERRIDING SYSTEM VALUE
             SELECT c.local_id, f.environment, f.plan_id, f.description, f.created_at FROM {} f JOIN statekeeper_checkpoint_map c ON c.file_id = f.id",
            rows("checkpoint", "virtual_environment_checkpoints")
        ),
        format!(
            "INSERT INTO {s}.virtual_environment_checkpoint_refs (checkpoint_id, model_name, model_version_id)
             SELECT c.local_id, f.model_name, v.local_id FROM {} f
             JOIN statekeeper_checkpoint_map c ON c.file_id = f.checkpoint_id JOIN statekeeper_version_map v ON v.file_id = f.model_version_id",
            rows("checkpoint_refs", "virtual_environment_checkpoint_refs")
        ),
        format!(
            "INSERT INTO {s}.virtual_environment_checkpoint_function_refs (checkpoint_id, function_name, function_version_id)
             SELECT c.local_id, f.function_name, v.local_id FROM {} f
             JOIN statekeeper_checkpoint_map c ON c.file_id = f.checkpoint_id JOIN statekeeper_function_map v ON v.file_id = f.function_version_id",
            rows("checkpoint_function_refs", "virtual_environment_checkpoint_function_refs")
        ),
    ];
    for sql in statements {
        sqlx::query(AssertSqlSafe(sql))
            .execute(&mut *conn)
            .await
            .map_err(|e| invalid(&e))?;
    }
    Ok(())
}

/// A restore in part: keeps only the staged rows of the chosen environments (with the versions
/// their refs and checkpoints name) and of the chosen models' versions, each version with its
/// intervals and physical relations; `None` when nothing was asked (the whole file).
async fn keep_selected(
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
    const ENVIRONMENT: &str = "(x.environment::jsonb #>> '{}')";
    refuse_unmatched(
        conn,
        "environment",
        &selection.environments,
        &format!(
            "SELECT a FROM unnest($1::text[]) a WHERE NOT EXISTS (SELECT 1 FROM statekeeper_import x \
             WHERE x.section = 'environment' AND {ENVIRONMENT} = a)"
        ),
        &format!(
            "SELECT {ENVIRONMENT} FROM statekeeper_import x WHERE x.section = 'environment' ORDER BY 1"
        ),
    )
    .await?;
    let named = model_matches("x.doc->>'name'", "a");
    refuse_unmatched(
        conn,
        "model",
        &selection.models,
        &format!(
            "SELECT a FROM unnest($1::text[]) a WHERE NOT EXISTS (SELECT 1 FROM statekeeper_import x \
             WHERE x.section = 'model_versions' AND {named})"
        ),
        "SELECT DISTINCT x.doc->>'name' FROM statekeeper_import x \
         WHERE x.section = 'model_versions' ORDER BY 1",
    )
    .await?;
    let kept = |section: &str, field: &str, by: &str, by_field: &str| {
        format!(
            "DELETE FROM statekeeper_import x WHERE x.section = '{section}' AND NOT EXISTS \
             (SELECT 1 FROM statekeeper_import k WHERE k.section IN ({by}) \
              AND k.doc->>'{by_field}' = x.doc->>'{field}')"
        )
    };
    sqlx::query(AssertSqlSafe(format!(
        "DELETE FROM statekeeper_import x WHERE x.section IN ('environment', 'refs', \
         'function_refs', 'checkpoint', 'checkpoint_refs', 'checkpoint_function_refs') \
         AND NOT ({ENVIRONMENT} = ANY($1))"
    )))
    .bind(&selection.environments)
    .execute(&mut *conn)
    .await?;
    sqlx::query(AssertSqlSafe(format!(
        "{} AND NOT EXISTS (SELECT 1 FROM unnest($1::text[]) a WHERE {named})",
        kept(
            "model_versions",
            "id",
            "'refs', 'checkpoint_refs'",
            "model_version_id"
        )
    )))
    .bind(&selection.models)
    .execute(&mut *conn)
    .await?;
    for statement in [
        kept(
            "function_versions",
            "id",
            "'function_refs', 'checkpoint_function_refs'",
            "function_version_id",
        ),
        kept(
            "model_version_intervals",
            "model_version_id",
            "'model_versions'",
            "id",
        ),
        kept(
            "physical_relations",
            "model_version_id",
            "'model_versions'",
            "id",
        ),
        kept(
            "physical_relation_ancestry",
            "relation_id",
            "'physical_relations'",
            "id",
        ),
        kept(
            "physical_relation_ancestry",
            "parent_relation_id",
            "'physical_relations'",
            "id",
        ),
        "DELETE FROM statekeeper_import WHERE section IN ('locks', 'state_operations')".into(),
    ] {
        sqlx::query(AssertSqlSafe(statement))
            .execute(&mut *conn)
            .await?;
    }
    let environments: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT {ENVIRONMENT} FROM statekeeper_import x WHERE x.section = 'environment' ORDER BY 1"
    )))
    .fetch_all(&mut *conn)
    .await?;
    let models: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT DISTINCT x.doc->>'name' FROM statekeeper_import x WHERE x.section = 'model_versions' \
         AND EXISTS (SELECT 1 FROM unnest($1::text[]) a WHERE {named}) ORDER BY 1"
    )))
    .bind(&selection.models)
    .fetch_all(&mut *conn)
    .await?;
    restored(
        conn,
        environments,
        models,
        ("model_versions", "model_version_intervals"),
    )
    .await
    .map(Some)
}
