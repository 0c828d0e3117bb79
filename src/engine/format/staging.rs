//! Loading what a format read: rows are staged into temporary tables by binary COPY, checked,
//! then written to the store in the operation's one transaction.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use sqlx::{AssertSqlSafe, PgConnection, Postgres, Transaction};
use tokio::sync::mpsc;

use super::copy_binary::BINARY_SIGNATURE;
use super::stream::{BINARY_FLAGS_AND_EXTENSION, BINARY_TRAILER, Header, Message, Row};
use super::writer::Measure;
use crate::engine::Error;
use crate::engine::backup::BackupInfo;
use crate::engine::catalog;
use crate::engine::failpoint;
use crate::engine::framework::ExportFormat;
use crate::engine::identifier::{quote_ident, quote_literal};
use crate::engine::manifest::Manifest;
use crate::engine::store::Store;
use crate::engine::transfer::{
    Compression, ImportMode, ImportOptions, ImportReport, REMOVED_NAMES, Removed, Restored,
};

/// Before a replace deletes anything: remembers the names of the store's entities (a temporary
/// table, dropped at commit) for [`removed_by_replace`].
pub(crate) async fn remember_entities(store: &Store, conn: &mut PgConnection) -> Result<(), Error> {
    let entities = &store.profile().entities;
    let present = catalog::table_exists(conn, store.schema().as_str(), entities.table).await?;
    let source = if present {
        format!(
            "SELECT {}::text AS name FROM {}.{}",
            quote_ident(entities.key),
            store.schema().quoted(),
            quote_ident(entities.table)
        )
    } else {
        "SELECT NULL::text AS name WHERE false".to_owned()
    };
    sqlx::query(AssertSqlSafe(format!(
        "CREATE TEMPORARY TABLE statekeeper_entities_before ON COMMIT DROP AS {source}"
    )))
    .execute(conn)
    .await?;
    Ok(())
}

/// After a replace wrote the file's state: the remembered entities that are gone.
pub(crate) async fn removed_by_replace(
    store: &Store,
    conn: &mut PgConnection,
) -> Result<Removed, Error> {
    let entities = &store.profile().entities;
    let (count, names): (i64, Vec<String>) = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT count(*), coalesce((array_agg(name ORDER BY name))[1:{REMOVED_NAMES}], '{{}}') \
         FROM statekeeper_entities_before b \
         WHERE NOT EXISTS (SELECT 1 FROM {}.{} t WHERE t.{}::text = b.name)",
        store.schema().quoted(),
        quote_ident(entities.table),
        quote_ident(entities.key)
    )))
    .fetch_one(conn)
    .await?;
    Ok(Removed {
        what: entities.noun.to_owned(),
        count: count.max(0) as u64,
        names,
    })
}

/// Staged rows go by COPY's binary format: each value is its length and its bytes, so the server
/// neither scans for quotes and delimiters (CSV parsing had been the largest part of its
/// staging work) nor unescapes anything.
const COPY_BINARY: &str = "WITH (FORMAT binary)";

/// What a format's importer gets: the parsed stream and what was measured of the raw bytes.
pub(crate) struct Incoming<'a> {
    rx: &'a mut mpsc::Receiver<Message>,
    measure: &'a Arc<Mutex<Measure>>,
    pub compression: Compression,
    pub options: &'a ImportOptions,
    pub started: Instant,
}

/// Everything the file held, once staged.
pub(crate) struct Staged {
    pub counts: BTreeMap<String, u64>,
    pub environments: u64,
    /// Tables announced by an exact export, with their columns, in file order.
    pub tables: Vec<(String, Vec<(String, String)>)>,
    pub bytes: u64,
    pub sha256: String,
    /// The file's manifest, which every table matched.
    pub manifest: Option<Manifest>,
}

/// What an import knows at its end beyond what staging counted.
pub(crate) struct Ending {
    pub format: ExportFormat,
    pub mode: ImportMode,
    /// The schema the file was exported from, when the format records it.
    pub source_store: String,
    pub schema_version: i32,
    pub environments: u64,
    pub backup: Option<BackupInfo>,
    pub removed: Option<Removed>,
    /// A restore in part: what it restored.
    pub restored: Option<Restored>,
}

/// The end of every import: the store's one transaction commits (with a crash point on each
/// side, where the crash tests kill it) and the import reports what it did.
pub(crate) async fn commit_import(
    tx: Transaction<'static, Postgres>,
    store: &Store,
    incoming: &Incoming<'_>,
    staged: Staged,
    ending: Ending,
) -> Result<ImportReport, Error> {
    failpoint::hit("import.before_commit");
    tx.commit().await?;
    failpoint::hit("import.committed");
    Ok(ImportReport {
        framework: store.framework(),
        mode: ending.mode,
        format: ending.format,
        source_store: ending.source_store,
        schema_version: ending.schema_version,
        environments: ending.environments,
        rows: staged.counts,
        bytes: staged.bytes,
        sha256: staged.sha256,
        manifest: staged.manifest,
        compression: incoming.compression,
        backup: ending.backup,
        removed: ending.removed,
        restored: ending.restored,
        duration: incoming.started.elapsed(),
    })
}

/// What a replace removes (`None` for a merge, which removes nothing).
pub(crate) async fn removed_by(
    mode: ImportMode,
    store: &Store,
    conn: &mut PgConnection,
) -> Result<Option<Removed>, Error> {
    match mode {
        ImportMode::Replace => Ok(Some(removed_by_replace(store, conn).await?)),
        ImportMode::Merge => Ok(None),
    }
}

impl<'a> Incoming<'a> {
    pub(crate) fn new(
        rx: &'a mut mpsc::Receiver<Message>,
        measure: &'a Arc<Mutex<Measure>>,
        compression: Compression,
        options: &'a ImportOptions,
        started: Instant,
    ) -> Self {
        Incoming {
            rx,
            measure,
            compression,
            options,
            started,
        }
    }

    /// The file's header, which the reader sends first (or why there is none).
    pub(crate) async fn header(&mut self) -> Result<Header, Error> {
        match self.rx.recv().await {
            Some(Message::Header(header)) => Ok(header),
            _ => Err(Error::InvalidExport(STREAM_ENDED.into())),
        }
    }

    /// Streams every row into the temporary table `statekeeper_import (seq, section, environment,
    /// doc jsonb, f1 text, …, f{width} text)` (a row of text values has at most `width` of them:
    /// see [`staged_field`]), then checks the checksum. Returns only after the whole file was
    /// read. Each of `sections` gets a partition of its own, read alone by a query on its
    /// section; the other sections' rows share one.
    pub async fn stage(
        &mut self,
        conn: &mut PgConnection,
        sections: &[&str],
        width: usize,
    ) -> Result<Staged, Error> {
        let fields: Vec<String> = (1..=width).map(staged_field).collect();
        let storage: Vec<String> = std::iter::once("doc")
            .chain(fields.iter().map(String::as_str))
            .map(|c| format!("ALTER {c} SET STORAGE EXTERNAL"))
            .collect();
        let field_columns: String = fields.iter().map(|c| format!(", {c} text")).collect();
        // A partition per large section, so that applying it reads only its rows; staged values
        // are read once: kept uncompressed and, up to a page, inline (no TOAST).
        let mut ddl = vec![
            format!("CREATE TEMP TABLE statekeeper_import (seq bigserial, section text NOT NULL, environment text, doc jsonb{field_columns}) PARTITION BY LIST (section) ON COMMIT DROP"),
            format!("ALTER TABLE statekeeper_import {}", storage.join(", ")),
            "CREATE TEMP TABLE statekeeper_import_other PARTITION OF statekeeper_import DEFAULT WITH (toast_tuple_target = 8160) ON COMMIT DROP".to_owned(),
        ];
        for (i, section) in sections.iter().enumerate() {
            ddl.push(format!(
                "CREATE TEMP TABLE statekeeper_import_{i} PARTITION OF statekeeper_import FOR VALUES IN ({}) WITH (toast_tuple_target = 8160) ON COMMIT DROP",
                quote_literal(section)
            ));
        }
        // Sorting and grouping the staged rows stays in memory.
        ddl.push("SET LOCAL work_mem = '64MB'".to_owned());
        sqlx::raw_sql(AssertSqlSafe(ddl.join(";\n")))
            .execute(&mut *conn)
            .await?;
        fast_toast_compression(conn).await?;
        let copied: String = fields.iter().map(|c| format!(", {c}")).collect();
        self.copy_all(
            conn,
            &format!(
                "COPY statekeeper_import (section, environment, doc{copied}) FROM STDIN {COPY_BINARY}"
            ),
            |row, out| row.encode(width, out),
        )
        .await
    }

    /// Streams every row (all of them lists of text values) into `table` (a table of the
    /// caller's, one column per value), then checks the checksum. For imports that check their
    /// rows as they are read: no array literal for the server to parse, no staged copy to read
    /// again.
    pub async fn copy_fields_into(
        &mut self,
        conn: &mut PgConnection,
        table: &str,
        columns: &[&str],
    ) -> Result<Staged, Error> {
        let copy_sql = format!(
            "COPY {table} ({}) FROM STDIN {COPY_BINARY}",
            columns.join(", ")
        );
        self.copy_all(conn, &copy_sql, Row::encode_fields).await
    }

    async fn copy_all(
        &mut self,
        conn: &mut PgConnection,
        copy_sql: &str,
        encode: impl Fn(&Row, &mut Vec<u8>) -> Result<(), Error>,
    ) -> Result<Staged, Error> {
        let mut tables = Vec::new();
        let (counts, environments, manifest) = {
            let mut copy = conn.copy_in_raw(copy_sql).await?;
            let streamed = async {
                let mut buffer = Vec::with_capacity(512 * 1024);
                buffer.extend_from_slice(BINARY_SIGNATURE);
                buffer.extend_from_slice(&BINARY_FLAGS_AND_EXTENSION);
                let ended = loop {
                    let rows = match self.rx.recv().await {
                        Some(Message::Rows(rows)) => rows,
                        Some(Message::Table { name, columns }) => {
                            tables.push((name, columns));
                            continue;
                        }
                        Some(Message::End {
                            counts,
                            environments,
                            manifest,
                        }) => break (counts, environments, manifest),
                        Some(Message::Header(..)) => {
                            return Err(Error::InvalidExport("the header appears twice".into()));
                        }
                        // The parser stopped without finishing: the caller reports its error.
                        None => return Err(Error::InvalidExport(STREAM_ENDED.into())),
                    };
                    for row in &rows {
                        encode(row, &mut buffer)?;
                    }
                    if buffer.len() >= 256 * 1024 {
                        copy.send(std::mem::take(&mut buffer)).await?;
                        failpoint::hit("import.staged_batch");
                    }
                };
                buffer.extend_from_slice(BINARY_TRAILER);
                copy.send(buffer).await?;
                Ok::<_, Error>(ended)
            }
            .await;
            match streamed {
                Ok(ended) => {
                    copy.finish().await.map_err(|e| invalid(&e))?;
                    failpoint::hit("import.staged");
                    ended
                }
                // The COPY is ended (the rows sent so far are whole, and go only into this
                // transaction's staging, which the error rolls back), so that the connection
                // is in step with the server and sqlx has no unfinished COPY to warn about. Not
                // `abort`: after a row the server already refused, it leaves the connection
                // out of step.
                Err(e) => {
                    if copy.send(BINARY_TRAILER).await.is_ok() {
                        let _ = copy.finish().await;
                    }
                    return Err(e);
                }
            }
        };
        let (bytes, sha256) = std::mem::take(
            &mut *self
                .measure
                .lock()
                .map_err(|_| Error::InvalidExport("checksum state poisoned".into()))?,
        )
        .finish();
        if let Some(expected) = &self.options.expected_sha256
            && !expected.eq_ignore_ascii_case(&sha256)
        {
            return Err(Error::InvalidExport(format!(
                "checksum mismatch: expected sha256 {expected}, the file has {sha256}"
            )));
        }
        Ok(Staged {
            counts,
            environments,
            tables,
            bytes,
            sha256,
            manifest,
        })
    }
}

/// Compresses the large values this transaction writes with lz4 where the server has it (it is
/// several times faster than the default pglz, and every PostgreSQL since 14 reads both). This
/// sets how values are written, not any table's definition.
pub(crate) async fn fast_toast_compression(conn: &mut PgConnection) -> Result<(), Error> {
    let lz4: bool = sqlx::query_scalar(
        "SELECT COALESCE((SELECT 'lz4' = ANY(enumvals) FROM pg_settings WHERE name = 'default_toast_compression'), false)",
    )
    .fetch_one(&mut *conn)
    .await?;
    if lz4 {
        sqlx::query("SET LOCAL default_toast_compression = 'lz4'")
            .execute(conn)
            .await?;
    }
    Ok(())
}

/// Drops the foreign keys and secondary indexes of tables about to be emptied and reloaded, and
/// returns the statements that restore them. Under the exclusive locks a reload takes anyway,
/// PostgreSQL then checks each key with one join instead of a trigger per row and builds each
/// index once; a violation still fails (and undoes) the whole import.
pub(crate) async fn drop_secondary_structures(
    conn: &mut PgConnection,
    schema: &str,
    tables: &[String],
) -> Result<Vec<String>, Error> {
    let keys: Vec<(String, String)> = sqlx::query_as(
        "SELECT format('ALTER TABLE %I.%I DROP CONSTRAINT %I', n.nspname, t.relname, c.conname),
                format('ALTER TABLE %I.%I ADD CONSTRAINT %I %s', n.nspname, t.relname, c.conname, pg_get_constraintdef(c.oid))
         FROM pg_constraint c
         JOIN pg_class t ON t.oid = c.conrelid
         JOIN pg_namespace n ON n.oid = t.relnamespace
         JOIN pg_class r ON r.oid = c.confrelid
         WHERE c.contype = 'f' AND n.nspname = $1
           AND (t.relname = ANY($2) OR r.relname = ANY($2))
         ORDER BY t.relname, c.conname",
    )
    .bind(schema)
    .bind(tables)
    .fetch_all(&mut *conn)
    .await?;
    let indexes: Vec<(String, String)> = sqlx::query_as(
        "SELECT format('DROP INDEX %I.%I', n.nspname, i.relname), pg_get_indexdef(x.indexrelid)
         FROM pg_index x
         JOIN pg_class i ON i.oid = x.indexrelid
         JOIN pg_class t ON t.oid = x.indrelid
         JOIN pg_namespace n ON n.oid = t.relnamespace
         WHERE n.nspname = $1 AND t.relname = ANY($2)
           AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = x.indexrelid)
         ORDER BY i.relname",
    )
    .bind(schema)
    .bind(tables)
    .fetch_all(&mut *conn)
    .await?;
    for (drop, _) in keys.iter().chain(&indexes) {
        sqlx::query(AssertSqlSafe(drop.clone()))
            .execute(&mut *conn)
            .await?;
    }
    // Indexes first, then keys (which may rely on them).
    Ok(indexes
        .into_iter()
        .chain(keys)
        .map(|(_, restore)| restore)
        .collect())
}

pub(crate) async fn restore_secondary_structures(
    conn: &mut PgConnection,
    statements: &[String],
) -> Result<(), Error> {
    for statement in statements {
        sqlx::query(AssertSqlSafe(statement.clone()))
            .execute(&mut *conn)
            .await
            .map_err(|e| invalid(&e))?;
    }
    Ok(())
}

/// The staging column of a row's `position`-th text value (from 1, as in SQL).
pub(crate) fn staged_field(position: usize) -> String {
    format!("f{position}")
}

/// Inserts the rows staged under `section` (as `Row::Fields`, whose values are in the order of
/// `staged`) into `schema.table`. Each text value is converted by its column type's own input
/// function, so values arrive exactly as written; a column of the table that was not staged gets
/// its expression from `defaults`, or its default. The staged rows are `x`; `joins` may join
/// more relations to them for `defaults` to read.
pub(crate) async fn insert_staged(
    conn: &mut PgConnection,
    schema: &str,
    table: &str,
    section: &str,
    staged: &[&str],
    defaults: &[(&str, &str)],
    joins: &str,
) -> Result<u64, Error> {
    let columns = catalog::described_columns(conn, schema, table).await?;
    let mut names = Vec::new();
    let mut values = Vec::new();
    for column in columns.iter().filter(|column| !column.generated) {
        let (name, type_) = (&column.name, &column.type_name);
        let value = match staged.iter().position(|s| s == name) {
            Some(position) => format!("(x.{})::{type_}", staged_field(position + 1)),
            None => match defaults.iter().find(|(column, _)| column == name) {
                Some((_, default)) => (*default).to_owned(),
                None => continue,
            },
        };
        names.push(quote_ident(name));
        values.push(value);
    }
    let inserted = sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {}.{} ({}) OVERRIDING SYSTEM VALUE SELECT {} FROM statekeeper_import x{joins} \
         WHERE x.section = {}",
        quote_ident(schema),
        quote_ident(table),
        names.join(", "),
        values.join(", "),
        quote_literal(section),
    )))
    .execute(conn)
    .await
    .map_err(|e| invalid(&e))?;
    Ok(inserted.rows_affected())
}

/// The marker the staging step returns when the stream ended early; the parser's error says why.
pub(crate) const STREAM_ENDED: &str = "the file ended before its header";

/// Database errors while loading a file are problems with the file (types, constraints).
/// PostgreSQL's detail (which key is duplicated, which row violates a check) goes with it.
pub(crate) fn invalid(e: &sqlx::Error) -> Error {
    match e {
        sqlx::Error::Database(db) => {
            let detail = db
                .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                .and_then(|pg| pg.detail())
                .map(|d| format!(" ({d})"))
                .unwrap_or_default();
            Error::InvalidExport(format!("{}{detail}", db.message()))
        }
        other => Error::InvalidExport(other.to_string()),
    }
}
