//! The exact, table-level format (docs/export-format.md): every row of every table of a store,
//! each value in PostgreSQL's own text form, so that `import --replace` restores the store bit for
//! bit — statekeeper's history tables and ledger, or a framework's tables, whatever their
//! columns. The same code serves every framework: the profile only says which tables.
//!
//! ```json
//! {"metadata": {"timestamp", "file_version": 1, "format": "exact", "framework", "importable", "store"},
//!  "versions": {"schema_version", "statekeeper_version", "framework_versions": {…}},
//!  "tables": {"<table>": {"columns": [["name", "type"], …], "rows": [["text", null, …], …]}, …}}
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sqlx::{AssertSqlSafe, PgConnection};
use tokio::io::AsyncWrite;

use super::Error;
use super::catalog;
use super::framework::{Event, ExportFormat, Framework};
use super::hooks;
use super::identifier::qualified_list;
use super::store::{Store, TableLock};
use crate::engine::format::reader::{Emitter, SectionReader};
use crate::engine::format::staging::{
    Ending, Incoming, commit_import, drop_secondary_structures, insert_staged, remember_entities,
    removed_by_replace, restore_secondary_structures,
};
use crate::engine::format::stream::Header;
use crate::engine::format::writer::Output;
use crate::engine::jsonscan::{Cursor, ScanError};
use crate::engine::transfer::{ExportReport, ImportMode, ImportReport};

/// `metadata.format` of exact exports.
pub const FORMAT: &str = "exact";
pub const FILE_VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct Metadata {
    timestamp: String,
    file_version: u32,
    format: String,
    framework: Framework,
    importable: bool,
    store: String,
}

#[derive(Serialize, Deserialize)]
struct Versions {
    schema_version: i32,
    statekeeper_version: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    framework_versions: BTreeMap<String, String>,
}

/// Session settings under which every type's text form is unambiguous and exact.
const TEXT_SETTINGS: &[&str] = &[
    "SET LOCAL DateStyle = 'ISO, YMD'",
    "SET LOCAL IntervalStyle = 'postgres'",
    "SET LOCAL TimeZone = 'UTC'",
    "SET LOCAL extra_float_digits = 3",
    "SET LOCAL bytea_output = 'hex'",
];

async fn use_text_settings(conn: &mut PgConnection) -> Result<(), Error> {
    for setting in TEXT_SETTINGS {
        sqlx::query(*setting).execute(&mut *conn).await?;
    }
    Ok(())
}

/// Writes the whole document from the caller's snapshot.
pub(crate) async fn write<W: AsyncWrite + Unpin + Send>(
    store: &Store,
    tx: &mut PgConnection,
    out: &mut Output<W>,
    report: &mut ExportReport,
) -> Result<(), Error> {
    use_text_settings(tx).await?;
    let version = store.require_initialized(tx).await?;
    report.schema_version = version.schema_version;
    report.versions = version.details.clone();
    let metadata = Metadata {
        timestamp: chrono::Utc::now().to_rfc3339(),
        file_version: FILE_VERSION,
        format: FORMAT.into(),
        framework: store.framework(),
        importable: true,
        store: store.schema().to_string(),
    };
    let versions = Versions {
        schema_version: version.schema_version,
        statekeeper_version: env!("CARGO_PKG_VERSION").into(),
        framework_versions: version.details,
    };
    out.write_json_header(&metadata, &versions).await?;
    out.write(b",\"tables\":{").await?;
    for (i, table) in store.tables(tx).await?.iter().enumerate() {
        let described = catalog::described_columns(tx, store.schema().as_str(), table).await?;
        let columns: Vec<(&String, &String)> = described
            .iter()
            .map(|column| (&column.name, &column.type_name))
            .collect();
        let text = |e: serde_json::Error| Error::ExportWrite(e.to_string());
        out.write(
            format!(
                "{}{}:",
                if i == 0 { "" } else { "," },
                serde_json::to_string(table).map_err(text)?,
            )
            .as_bytes(),
        )
        .await?;
        out.begin_digest(table);
        out.write(
            format!(
                "{{\"columns\":{},\"rows\":[",
                serde_json::to_string(&columns).map_err(text)?
            )
            .as_bytes(),
        )
        .await?;
        let rows = super::format::copy_binary::stream_table_as_arrays(
            tx,
            out,
            store.schema().as_str(),
            table,
            &described,
        )
        .await?;
        out.write(b"]}").await?;
        out.end_digest();
        report.rows.insert(table.clone(), rows);
    }
    report.environments = environments_in(store, &report.rows);
    out.write(b"}").await?;
    out.end_with_manifest(&report.rows).await
}

/// How many environments (Meltano: state IDs) a store's table rows hold.
fn environments_in(store: &Store, rows: &BTreeMap<String, u64>) -> u64 {
    rows.get(store.profile().entities.table)
        .copied()
        .unwrap_or(0)
}

/// Reads `tables` (the section after the header).
#[derive(Default)]
pub(crate) struct Sections {
    seen_tables: bool,
}

type Doc<'a, 'b> = &'a mut Cursor<&'b mut dyn std::io::Read>;

impl SectionReader for Sections {
    fn section(&mut self, cursor: Doc, key: &str, emitter: &mut Emitter) -> Result<(), ScanError> {
        if key != "tables" || self.seen_tables {
            return Err(ScanError(format!(
                "unexpected section \"{key}\" in an exact export"
            )));
        }
        self.seen_tables = true;
        let mut names = std::collections::HashSet::new();
        cursor.object(|cursor, name| {
            if !names.insert(name.clone()) {
                return Err(ScanError(format!("table \"{name}\" appears twice")));
            }
            let ((), digest) = cursor.digest(|cursor| read_table(cursor, &name, emitter))?;
            emitter.digests.insert(name, digest);
            Ok(())
        })
    }

    fn digests_its_tables(&self) -> bool {
        true
    }

    fn finish(&mut self, _emitter: &mut Emitter) -> Result<(), ScanError> {
        if self.seen_tables {
            Ok(())
        } else {
            Err(ScanError("section \"tables\" is missing".into()))
        }
    }
}

/// A table: `{"columns": [[name, type], …], "rows": [[text or null, …], …]}`, in that order.
fn read_table(cursor: Doc, name: &str, emitter: &mut Emitter) -> Result<(), ScanError> {
    let section: Arc<str> = Arc::from(name);
    let mut width = None;
    let mut rows_read = false;
    cursor.object(|cursor, field| match (field.as_str(), width) {
        ("columns", None) => {
            let columns: Vec<(String, String)> = serde_json::from_slice(&cursor.raw()?)
                .map_err(|e| ScanError(format!("the columns of table \"{name}\": {e}")))?;
            width = Some(columns.len());
            emitter.table(name.to_owned(), columns).map_err(ScanError)
        }
        ("rows", Some(width)) if !rows_read => {
            rows_read = true;
            cursor.array(|cursor| {
                let fields: Vec<Option<String>> = serde_json::from_slice(&cursor.raw()?)
                    .map_err(|e| ScanError(format!("a row of table \"{name}\": {e}")))?;
                if fields.len() != width {
                    return Err(ScanError(format!(
                        "a row of table {name} has {} values for {width} columns",
                        fields.len()
                    )));
                }
                emitter.fields(&section, fields).map_err(ScanError)
            })
        }
        ("columns", Some(_)) | ("rows", _) => Err(ScanError(format!(
            "table \"{name}\" must hold \"columns\", then \"rows\""
        ))),
        (other, _) => Err(ScanError(format!(
            "unexpected field \"{other}\" in table \"{name}\""
        ))),
    })?;
    if rows_read {
        Ok(())
    } else {
        Err(ScanError(format!(
            "table \"{name}\" has no \"rows\" after its columns"
        )))
    }
}

/// Replaces every table of the store with the file's rows. Refused, with nothing changed, unless
/// the file is an exact export of a store of the same framework and version whose tables have
/// exactly the store's columns.
pub(crate) async fn import(
    store: &Store,
    header: Header,
    incoming: &mut Incoming<'_>,
) -> Result<ImportReport, Error> {
    header.check_importable(u64::from(FILE_VERSION))?;
    let metadata: Metadata = serde_json::from_value(header.metadata.clone())
        .map_err(|e| Error::InvalidExport(format!("its metadata cannot be read: {e}")))?;
    if metadata.framework != store.framework() {
        return Err(Error::InvalidExport(format!(
            "it is an exact export of a {} store; import it into one (--framework {})",
            metadata.framework.profile().display_name,
            metadata.framework
        )));
    }
    if incoming.options.mode == ImportMode::Merge {
        return Err(Error::InvalidExport(
            "an exact export restores a whole store and cannot be merged: import it with \
             --replace (a StateMigration: import.mode: Replace)"
                .into(),
        ));
    }
    let file_version = header.schema_version()?;
    let mut tx = store.begin_locked().await?;
    let current = store.require_initialized(&mut tx).await?;
    if file_version != current.schema_version {
        return Err(Error::InvalidExport(format!(
            "the file has schema version {file_version}, the store has {}; {}",
            current.schema_version,
            store.profile().version_mismatch_hint
        )));
    }
    use_text_settings(&mut tx).await?;
    let live = store.tables(&mut tx).await?;
    let sections: Vec<&str> = live.iter().map(String::as_str).collect();
    let width = catalog::widest(&mut tx, store.schema().as_str(), &live).await?;
    let staged = incoming.stage(&mut tx, &sections, width).await?;

    let schema = store.schema().as_str();
    for (table, columns) in &staged.tables {
        if !live.contains(table) {
            return Err(Error::InvalidExport(format!(
                "it holds table \"{table}\", which the store does not have"
            )));
        }
        let store_columns = catalog::columns(&mut tx, schema, table).await?;
        if *columns != store_columns {
            return Err(Error::InvalidExport(format!(
                "table \"{table}\" has columns ({}) in the file but ({}) in the store",
                describe(columns),
                describe(&store_columns)
            )));
        }
    }
    if let Some(missing) = live
        .iter()
        .find(|t| !staged.tables.iter().any(|(name, _)| name == *t))
    {
        return Err(Error::InvalidExport(format!(
            "it lacks table \"{missing}\" of the store"
        )));
    }

    // Rows arrive table by table: one index finds each table's rows without a scan per table.
    sqlx::query("CREATE INDEX ON statekeeper_import (section, seq)")
        .execute(&mut *tx)
        .await?;
    store.lock_tables(&mut tx, TableLock::ReadersWait).await?;
    let backup = store
        .backup_before_change(&mut tx, &current, "pre-import")
        .await?;
    remember_entities(store, &mut tx).await?;
    sqlx::query(AssertSqlSafe(format!(
        "TRUNCATE {}",
        qualified_list(schema, &live)
    )))
    .execute(&mut *tx)
    .await?;
    let restore = drop_secondary_structures(&mut tx, schema, &live).await?;
    for (table, columns) in &staged.tables {
        let names: Vec<&str> = columns.iter().map(|(name, _)| name.as_str()).collect();
        insert_staged(&mut tx, schema, table, table, &names, &[], "").await?;
    }
    restore_secondary_structures(&mut tx, &restore).await?;
    catalog::resync_identities(&mut tx, schema).await?;
    // The file's own ledger (statekeeper) must match this binary like any other.
    hooks::read_version(store, &mut tx).await?;
    let removed = removed_by_replace(store, &mut tx).await?;
    hooks::record_event(
        store,
        &mut tx,
        &Event {
            operation: "import",
            from_version: current.schema_version,
            to_version: current.schema_version,
            backup_id: backup.as_ref().map(|b| b.id.as_str()),
            details: serde_json::json!({
                "mode": ImportMode::Replace,
                "format": ExportFormat::Exact,
                "sourceStore": metadata.store,
                "exportedAt": metadata.timestamp,
                "sha256": staged.sha256,
                "bytes": staged.bytes,
                "removed": removed.count,
            }),
        },
    )
    .await?;
    let ending = Ending {
        format: ExportFormat::Exact,
        mode: ImportMode::Replace,
        source_store: metadata.store,
        schema_version: current.schema_version,
        environments: environments_in(store, &staged.counts),
        backup,
        removed: Some(removed),
        restored: None,
    };
    commit_import(tx, store, incoming, staged, ending).await
}

fn describe(columns: &[(String, String)]) -> String {
    columns
        .iter()
        .map(|(name, type_)| format!("{name} {type_}"))
        .collect::<Vec<_>>()
        .join(", ")
}
