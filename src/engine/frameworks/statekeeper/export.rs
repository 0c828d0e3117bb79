//! statekeeper's logical export format v1 (docs/export-format.md): current state only, keyed so
//! that it can be merged; environments with their references and checkpoints. Written from the
//! caller's snapshot; read back by `import.rs` beside this file.

use serde::{Deserialize, Serialize};
use sqlx::{AssertSqlSafe, PgConnection};
use tokio::io::AsyncWrite;

use crate::engine::Error;
use crate::engine::export::{ExportOptions, ExportReport, Output, refuse_unknown_environments};
use crate::engine::store::Store;

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
        refuse_unknown_environments(tx, &format!("{s}.virtual_environments"), "name", wanted)
            .await?;
    }
    // COPY takes no parameters: the filter travels in a transaction-local setting instead of
    // being spliced into SQL text.
    let filter = serde_json::to_string(&options.environments.clone().unwrap_or_default())
        .map_err(|e| Error::ExportWrite(e.to_string()))?;
    sqlx::query("SELECT set_config('statekeeper.export_environments', $1, true)")
        .bind(filter)
        .execute(&mut *tx)
        .await?;

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
    let exported_versions = format!("SELECT t.id FROM {s}.model_versions t {version_filter}");
    let exported_relations = format!(
        "SELECT id FROM {s}.physical_relations WHERE model_version_id IN ({exported_versions})"
    );
    let mut sections: Vec<(&str, String)> = vec![
        ("model_versions", format!("SELECT row_to_json(t)::text FROM {s}.model_versions t {version_filter} ORDER BY t.id")),
        (
            "model_version_intervals",
            format!("SELECT row_to_json(t)::text FROM {s}.model_version_intervals t WHERE t.model_version_id IN ({exported_versions}) ORDER BY t.id"),
        ),
        ("function_versions", format!("SELECT row_to_json(t)::text FROM {s}.function_versions t {function_filter} ORDER BY t.id")),
        (
            "physical_relations",
            format!("SELECT row_to_json(t)::text FROM {s}.physical_relations t WHERE t.model_version_id IN ({exported_versions}) ORDER BY t.id"),
        ),
        (
            "physical_relation_ancestry",
            format!(
                "SELECT row_to_json(t)::text FROM {s}.physical_relation_ancestry t
                 WHERE t.relation_id IN ({exported_relations}) AND t.parent_relation_id IN ({exported_relations})
                 ORDER BY t.relation_id, t.parent_relation_id"
            ),
        ),
    ];
    if !filtered {
        // Store-wide state belongs to full exports only.
        sections.push((
            "locks",
            format!("SELECT row_to_json(t)::text FROM {s}.locks t ORDER BY t.name"),
        ));
        sections.push((
            "state_operations",
            format!("SELECT row_to_json(t)::text FROM {s}.state_operations t ORDER BY t.id"),
        ));
    }
    for (section, sql) in &sections {
        out.write(format!(",\"{section}\":[").as_bytes()).await?;
        let n = out.stream_rows(&mut *tx, sql).await?;
        out.write(b"]").await?;
        report.rows.insert((*section).to_owned(), n);
    }

    // Environments keyed by name, each with its refs and checkpoints (with their refs).
    out.write(b",\"environments\":{").await?;
    let env_filter = if filtered {
        format!("WHERE t.name = ANY({ENVIRONMENTS})")
    } else {
        String::new()
    };
    let names: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT t.name FROM {s}.virtual_environments t {env_filter} ORDER BY t.name"
    )))
    .fetch_all(&mut *tx)
    .await?;
    let env_row =
        format!("SELECT row_to_json(t)::text FROM {s}.virtual_environments t WHERE t.name = $1");
    let refs = format!(
        "SELECT row_to_json(t)::text FROM {s}.virtual_environment_refs t WHERE t.environment = {ENVIRONMENT} ORDER BY t.model_name"
    );
    let function_refs = format!(
        "SELECT row_to_json(t)::text FROM {s}.virtual_environment_function_refs t WHERE t.environment = {ENVIRONMENT} ORDER BY t.function_name"
    );
    let checkpoints = format!(
        "SELECT json_build_object(
           'checkpoint', row_to_json(c),
           'refs', COALESCE((SELECT json_agg(row_to_json(r) ORDER BY r.model_name) FROM {s}.virtual_environment_checkpoint_refs r WHERE r.checkpoint_id = c.id), '[]'::json),
           'function_refs', COALESCE((SELECT json_agg(row_to_json(r) ORDER BY r.function_name) FROM {s}.virtual_environment_checkpoint_function_refs r WHERE r.checkpoint_id = c.id), '[]'::json)
         )::text FROM {s}.virtual_environment_checkpoints c WHERE c.environment = {ENVIRONMENT} ORDER BY c.id"
    );
    let counts = format!(
        "SELECT (SELECT count(*) FROM {s}.virtual_environment_checkpoint_refs r JOIN {s}.virtual_environment_checkpoints c ON c.id = r.checkpoint_id WHERE c.environment = $1),
                (SELECT count(*) FROM {s}.virtual_environment_checkpoint_function_refs r JOIN {s}.virtual_environment_checkpoints c ON c.id = r.checkpoint_id WHERE c.environment = $1)"
    );
    for (i, name) in names.iter().enumerate() {
        let key = serde_json::to_string(name).map_err(|e| Error::ExportWrite(e.to_string()))?;
        sqlx::query("SELECT set_config('statekeeper.export_environment', $1, true)")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        let row: String = sqlx::query_scalar(AssertSqlSafe(env_row.clone()))
            .bind(name)
            .fetch_one(&mut *tx)
            .await?;
        let lead = if i == 0 { "" } else { "," };
        out.write(format!("{lead}{key}:{{\"environment\":{row},\"refs\":[").as_bytes())
            .await?;
        let n = out.stream_rows(&mut *tx, &refs).await?;
        *report
            .rows
            .entry("virtual_environment_refs".into())
            .or_default() += n;
        out.write(b"],\"function_refs\":[").await?;
        let n = out.stream_rows(&mut *tx, &function_refs).await?;
        *report
            .rows
            .entry("virtual_environment_function_refs".into())
            .or_default() += n;
        out.write(b"],\"checkpoints\":[").await?;
        let n = out.stream_rows(&mut *tx, &checkpoints).await?;
        *report
            .rows
            .entry("virtual_environment_checkpoints".into())
            .or_default() += n;
        out.write(b"]}").await?;
        let (checkpoint_refs, checkpoint_function_refs): (i64, i64) =
            sqlx::query_as(AssertSqlSafe(counts.clone()))
                .bind(name)
                .fetch_one(&mut *tx)
                .await?;
        *report
            .rows
            .entry("virtual_environment_checkpoint_refs".into())
            .or_default() += checkpoint_refs as u64;
        *report
            .rows
            .entry("virtual_environment_checkpoint_function_refs".into())
            .or_default() += checkpoint_function_refs as u64;
    }
    report.environments = names.len() as u64;
    report
        .rows
        .insert("virtual_environments".into(), names.len() as u64);
    out.write(b"}}\n").await?;
    Ok(())
}

/// SQL expressions for the environment filters, read from transaction-local settings.
const ENVIRONMENTS: &str = "ARRAY(SELECT jsonb_array_elements_text(current_setting('statekeeper.export_environments')::jsonb))";
const ENVIRONMENT: &str = "current_setting('statekeeper.export_environment')";
