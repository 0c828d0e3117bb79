//! Backup schemas `<schema>__backup_<id>`: copies of every table of a store (a framework's with
//! their definitions, keys and indexes; statekeeper's own as plain copies of their columns), made
//! inside the transaction of the operation that needs them, so a failed operation leaves no
//! backup behind. An upgrade's backup is made beside
//! its transaction, from the same snapshot (`Store::backed_up_change`); a crash can leave that
//! one behind, whole and untagged.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration as ChronoDuration, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{AssertSqlSafe, PgConnection};

use super::Error;
use super::catalog;
use super::framework::{Framework, StoreVersion};
use super::identifier::{BACKUP_ID_LEN, SchemaName, quote_ident};

/// The table inside every backup schema that describes the backup.
pub const BACKUP_METADATA_TABLE: &str = "_statekeeper_backup";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BackupInfo {
    pub id: String,
    pub schema: String,
    pub created_at: DateTime<Utc>,
    /// The framework of the store the backup was taken from.
    pub framework: Framework,
    /// The store's schema version when the backup was taken.
    pub schema_version: i32,
    /// Further version facts of the store at the time (SQLMesh's and SQLGlot's versions).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub version_details: BTreeMap<String, String>,
    /// Why it was taken, its tag: see [`TAGS`].
    pub reason: String,
    pub tables: i32,
    pub rows: i64,
    /// What the backup schema takes on disk: the sum of `pg_total_relation_size` of its tables
    /// (their indexes and TOAST included).
    pub bytes: i64,
    /// Seconds from `created_at` to when the backup was listed, by the database's clock (0 for
    /// a backup just made).
    pub age_seconds: i64,
    /// The request the backup was made for (a StateMigration's uid, a janitor Job's name), when
    /// one was named.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operation: Option<String>,
}

/// Every tag a backup can have, and who makes it. A backup made by an older statekeeper may carry
/// another word; it is listed and pruned like any other.
pub const TAGS: &[(&str, &str)] = &[
    ("manual", "`state backup`"),
    (
        "pre-upgrade",
        "an upgrade of statekeeper's schema (`state upgrade`, a StateMigration's upgrade)",
    ),
    (
        "pre-migration",
        "a StateMigration's runner upgrade (the framework's own migration as a Job)",
    ),
    (
        "pre-import",
        "an import or a copy from another store (`state import`, a StateMigration's import or copyFrom)",
    ),
    ("pre-run", "`state run --backup`, before the command"),
    ("pre-rollback", "a rollback, of the state it replaces"),
    ("pre-reset", "a reset, of the state it removes"),
    (
        "pre-janitor",
        "a StateStore's framework janitor Job with `backup: true`",
    ),
];

impl BackupInfo {
    /// For people and plans: `backup ID (taken …, reason, version V, T tables, R rows)`.
    pub fn describe(&self) -> String {
        format!(
            "backup {} (taken {}, {}, version {}, {} tables, {} rows)",
            self.id,
            self.created_at.to_rfc3339(),
            self.reason,
            self.schema_version,
            self.tables,
            self.rows
        )
    }
}

/// The metadata row as stored; backups made before frameworks existed lack the newer columns.
#[derive(Deserialize)]
struct StoredMetadata {
    backup_id: String,
    schema_version: i32,
    reason: String,
    created_at: DateTime<Utc>,
    tables: i32,
    row_count: i64,
    #[serde(default)]
    framework: Option<Framework>,
    #[serde(default)]
    versions: Option<BTreeMap<String, String>>,
    #[serde(default)]
    operation: Option<String>,
}

/// Backup ids are exactly 17 digits; anything else is refused before it reaches SQL.
pub fn validate_backup_id(id: &str) -> Result<(), Error> {
    if id.len() == BACKUP_ID_LEN && id.bytes().all(|b| b.is_ascii_digit()) {
        Ok(())
    } else {
        Err(Error::IncompatibleBackup {
            id: id.escape_debug().take(40).collect(),
            reason: format!("backup ids are {BACKUP_ID_LEN} digits (YYYYMMDDHHMMSSmmm)"),
        })
    }
}

fn format_id(at: DateTime<Utc>) -> String {
    at.format("%Y%m%d%H%M%S%3f").to_string()
}

/// What a new backup records about its store.
pub struct BackupSource<'a> {
    pub schema: &'a SchemaName,
    pub framework: Framework,
    pub version: &'a StoreVersion,
    pub tables: &'a [String],
    pub operation: Option<&'a str>,
    /// Whether the copies get the tables' definitions, keys and indexes: only where a restore may
    /// recreate the tables from the backup (a framework's own tables). statekeeper rebuilds its
    /// tables from its migrations, and a restore reads the rows in full and checks them against
    /// the live constraints, so its backups are plain copies of the columns (the index builds
    /// made them cost twice a plain copy, the row-by-row insert another quarter).
    pub with_indexes: bool,
}

/// Copies the given tables of the store into a new backup schema.
pub async fn create(
    conn: &mut PgConnection,
    source: &BackupSource<'_>,
    reason: &str,
) -> Result<BackupInfo, Error> {
    let schema = source.schema;
    let mut at = Utc::now();
    let mut id = format_id(at);
    while catalog::schema_exists(conn, &schema.backup_schema(&id)).await? {
        at += ChronoDuration::milliseconds(1);
        id = format_id(at);
    }
    let backup_schema = schema.backup_schema(&id);
    sqlx::query(AssertSqlSafe(format!(
        "CREATE SCHEMA {}",
        quote_ident(&backup_schema)
    )))
    .execute(&mut *conn)
    .await?;
    let mut rows = 0i64;
    for table in source.tables {
        rows += copy_table(
            conn,
            schema.as_str(),
            &backup_schema,
            table,
            source.with_indexes,
        )
        .await?;
    }
    sqlx::query(AssertSqlSafe(format!(
        "CREATE TABLE {}.{} (backup_id text NOT NULL, source_schema text NOT NULL, \
         schema_version integer NOT NULL, reason text NOT NULL, created_at timestamptz NOT NULL, \
         tables integer NOT NULL, row_count bigint NOT NULL, framework text NOT NULL, versions jsonb NOT NULL, operation text)",
        quote_ident(&backup_schema),
        quote_ident(BACKUP_METADATA_TABLE)
    )))
    .execute(&mut *conn)
    .await?;
    let info = BackupInfo {
        id,
        schema: schema.as_str().to_owned(),
        created_at: at,
        framework: source.framework,
        schema_version: source.version.schema_version,
        version_details: source.version.details.clone(),
        reason: reason.to_owned(),
        tables: source.tables.len() as i32,
        rows,
        bytes: 0,
        age_seconds: 0,
        operation: source.operation.map(str::to_owned),
    };
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {}.{} VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        quote_ident(&backup_schema),
        quote_ident(BACKUP_METADATA_TABLE)
    )))
    .bind(&info.id)
    .bind(&info.schema)
    .bind(info.schema_version)
    .bind(&info.reason)
    .bind(info.created_at)
    .bind(info.tables)
    .bind(info.rows)
    .bind(info.framework.as_str())
    .bind(serde_json::to_value(&info.version_details).unwrap_or_default())
    .bind(&info.operation)
    .execute(&mut *conn)
    .await?;
    let mut info = info;
    info.bytes = sqlx::query_scalar(
        "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint FROM pg_class c \
         JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relkind = 'r'",
    )
    .bind(&backup_schema)
    .fetch_one(&mut *conn)
    .await?;
    Ok(info)
}

/// Records the request a backup was made for, in the transaction of that request's change (see
/// `Store::backed_up_change`: the backup itself committed earlier, on another connection).
pub(crate) async fn tag_operation(
    conn: &mut PgConnection,
    schema: &SchemaName,
    id: &str,
    operation: &str,
) -> Result<(), Error> {
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE {}.{} SET operation = $1",
        quote_ident(&schema.backup_schema(id)),
        quote_ident(BACKUP_METADATA_TABLE)
    )))
    .bind(operation)
    .execute(conn)
    .await?;
    Ok(())
}

/// Copies one table with its rows. `with_indexes`, the copy has the table's definition (LIKE …
/// INCLUDING ALL), and its key constraints and indexes are added after the load (built once);
/// otherwise it is a plain `CREATE TABLE … AS` of its columns, the cheapest copy PostgreSQL makes
/// (a bulk insert, no constraint checks). Foreign keys are not copied: a restore keeps the live
/// ones or recreates them.
pub(crate) async fn copy_table(
    conn: &mut PgConnection,
    from_schema: &str,
    to_schema: &str,
    table: &str,
    with_indexes: bool,
) -> Result<i64, Error> {
    let from = format!("{}.{}", quote_ident(from_schema), quote_ident(table));
    let to = format!("{}.{}", quote_ident(to_schema), quote_ident(table));
    let columns = catalog::column_list(conn, from_schema, table).await?;
    let statements = if with_indexes {
        let mut statements = vec![
            format!(
                "CREATE TABLE {to} (LIKE {from} INCLUDING ALL EXCLUDING INDEXES EXCLUDING DEFAULTS)"
            ),
            format!(
                "INSERT INTO {to} ({columns}) OVERRIDING SYSTEM VALUE SELECT {columns} FROM {from}"
            ),
        ];
        statements.extend(catalog::index_definitions(conn, from_schema, to_schema, table).await?);
        statements
    } else {
        vec![format!("CREATE TABLE {to} AS SELECT {columns} FROM {from}")]
    };
    // One round trip; only the INSERT or the CREATE TABLE … AS counts rows.
    let copied = sqlx::raw_sql(AssertSqlSafe(statements.join(";\n")))
        .execute(&mut *conn)
        .await?;
    Ok(copied.rows_affected() as i64)
}

/// Every backup of the store, oldest first, with its size and age. Two queries whatever the
/// number of backups: one over the catalog (the backup schemas, their sizes, which have a
/// metadata table, the database's clock), one reading every metadata row.
pub async fn list(conn: &mut PgConnection, schema: &SchemaName) -> Result<Vec<BackupInfo>, Error> {
    let prefix = schema.backup_prefix();
    // left() rather than LIKE: '_' in schema names is a LIKE wildcard.
    let candidates: Vec<(String, i64, bool, DateTime<Utc>)> = sqlx::query_as(
        "SELECT n.nspname::text, \
                coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint, \
                coalesce(bool_or(c.relname = $2), false), \
                now() \
         FROM pg_namespace n \
         LEFT JOIN pg_class c ON c.relnamespace = n.oid AND c.relkind = 'r' \
         WHERE left(n.nspname, length($1)) = $1 \
         GROUP BY n.nspname ORDER BY 1",
    )
    .bind(&prefix)
    .bind(BACKUP_METADATA_TABLE)
    .fetch_all(&mut *conn)
    .await?;
    let backups: Vec<(String, i64, DateTime<Utc>)> = candidates
        .into_iter()
        .filter(|(name, _, has_metadata, _)| {
            *has_metadata && validate_backup_id(&name[prefix.len()..]).is_ok()
        })
        .map(|(name, bytes, _, now)| (name, bytes, now))
        .collect();
    if backups.is_empty() {
        return Ok(Vec::new());
    }
    let selects: Vec<String> = backups
        .iter()
        .map(|(name, _, _)| {
            format!(
                "SELECT {}::text, to_jsonb(m)::text FROM {}.{} m",
                super::identifier::quote_literal(name),
                quote_ident(name),
                quote_ident(BACKUP_METADATA_TABLE)
            )
        })
        .collect();
    let rows: Vec<(String, String)> = sqlx::query_as(AssertSqlSafe(selects.join(" UNION ALL ")))
        .fetch_all(&mut *conn)
        .await?;
    let metadata: BTreeMap<String, String> = rows.into_iter().collect();
    let mut list = Vec::with_capacity(backups.len());
    for (name, bytes, now) in backups {
        let id = &name[prefix.len()..];
        let row = metadata.get(&name).map(String::as_str);
        let mut info = parse_metadata(schema, id, row)?;
        info.bytes = bytes;
        info.age_seconds = (now - info.created_at).num_seconds().max(0);
        list.push(info);
    }
    Ok(list)
}

pub async fn read_metadata(
    conn: &mut PgConnection,
    schema: &SchemaName,
    id: &str,
) -> Result<BackupInfo, Error> {
    let row: Option<String> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT to_jsonb(m)::text FROM {}.{} m",
        quote_ident(&schema.backup_schema(id)),
        quote_ident(BACKUP_METADATA_TABLE)
    )))
    .fetch_optional(&mut *conn)
    .await?;
    parse_metadata(schema, id, row.as_deref())
}

/// A backup's metadata row, as `to_jsonb` gives it (none: the table is empty).
fn parse_metadata(schema: &SchemaName, id: &str, row: Option<&str>) -> Result<BackupInfo, Error> {
    let incompatible = |reason: String| Error::IncompatibleBackup {
        id: id.to_owned(),
        reason,
    };
    let row = row.ok_or_else(|| incompatible("its metadata table is empty".into()))?;
    let stored: StoredMetadata = serde_json::from_str(row)
        .map_err(|e| incompatible(format!("its metadata cannot be read: {e}")))?;
    Ok(BackupInfo {
        id: stored.backup_id,
        schema: schema.as_str().to_owned(),
        created_at: stored.created_at,
        framework: stored.framework.unwrap_or_default(),
        schema_version: stored.schema_version,
        version_details: stored.versions.unwrap_or_default(),
        reason: stored.reason,
        tables: stored.tables,
        rows: stored.row_count,
        bytes: 0,
        age_seconds: 0,
        operation: stored.operation,
    })
}

/// Finds one backup by id, or the newest when no id is given.
pub async fn find(
    conn: &mut PgConnection,
    schema: &SchemaName,
    id: Option<&str>,
) -> Result<BackupInfo, Error> {
    let backups = list(conn, schema).await?;
    match id {
        Some(id) => {
            validate_backup_id(id)?;
            backups
                .into_iter()
                .find(|b| b.id == id)
                .ok_or_else(|| Error::BackupNotFound {
                    schema: schema.as_str().to_owned(),
                    id: id.to_owned(),
                })
        }
        None => backups.into_iter().last().ok_or_else(|| Error::NoBackups {
            schema: schema.as_str().to_owned(),
        }),
    }
}

/// The tables a backup holds (its metadata table aside).
pub async fn tables(
    conn: &mut PgConnection,
    schema: &SchemaName,
    id: &str,
) -> Result<Vec<String>, Error> {
    Ok(catalog::tables(conn, &schema.backup_schema(id))
        .await?
        .into_iter()
        .filter(|t| t != BACKUP_METADATA_TABLE)
        .collect())
}

pub async fn drop(conn: &mut PgConnection, schema: &SchemaName, id: &str) -> Result<(), Error> {
    sqlx::query(AssertSqlSafe(format!(
        "DROP SCHEMA {} CASCADE",
        quote_ident(&schema.backup_schema(id))
    )))
    .execute(conn)
    .await?;
    Ok(())
}

/// For a framework that owns its tables: recreates the store's tables with the columns,
/// constraints and indexes of the backup's copies (taken from the live tables at backup time).
pub(crate) async fn recreate_tables(
    conn: &mut PgConnection,
    schema: &SchemaName,
    id: &str,
) -> Result<(), Error> {
    let backup_schema = schema.backup_schema(id);
    for table in tables(conn, schema, id).await? {
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TABLE {}.{t} (LIKE {}.{t} INCLUDING ALL)",
            schema.quoted(),
            quote_ident(&backup_schema),
            t = quote_ident(&table),
        )))
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// First key of the advisory locks that pin a backup (the second is derived from the backup
/// schema's name): an operation that may still restore a backup holds its pin, shared, for as
/// long as it may, and pruning or dropping a backup needs the pin exclusively.
const PIN_CLASS: i32 = 0x534B_5042; // "SKPB"

/// A backup pinned by a running operation that may restore it (see [`PIN_CLASS`]): held on a
/// session of its own until released (or until the process ends and the session with it).
pub struct BackupPin {
    session: PgConnection,
    schema: SchemaName,
    id: String,
}

impl BackupPin {
    pub(crate) fn new(session: PgConnection, schema: SchemaName, id: String) -> Self {
        Self {
            session,
            schema,
            id,
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Unpins the backup and closes the pin's session.
    pub async fn release(mut self) {
        let _ = unpin(&mut self.session, &self.schema, &self.id).await;
        let _ = sqlx::Connection::close(self.session).await;
    }
}

/// Pins a backup for the rest of `conn`'s session (see [`PIN_CLASS`]); closing the session
/// releases it.
pub(crate) async fn pin(
    conn: &mut PgConnection,
    schema: &SchemaName,
    id: &str,
) -> Result<(), Error> {
    sqlx::query("SELECT pg_advisory_lock_shared($1, hashtext($2))")
        .bind(PIN_CLASS)
        .bind(schema.backup_schema(id))
        .execute(conn)
        .await?;
    Ok(())
}

pub(crate) async fn unpin(
    conn: &mut PgConnection,
    schema: &SchemaName,
    id: &str,
) -> Result<(), Error> {
    sqlx::query("SELECT pg_advisory_unlock_shared($1, hashtext($2))")
        .bind(PIN_CLASS)
        .bind(schema.backup_schema(id))
        .execute(conn)
        .await?;
    Ok(())
}

/// Of `ids`, those some session has pinned. The others are locked exclusively until `conn`'s
/// transaction ends, so that none can be pinned before they are dropped.
pub(crate) async fn pinned(
    conn: &mut PgConnection,
    schema: &SchemaName,
    ids: &[String],
) -> Result<Vec<String>, Error> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let free: Vec<String> = sqlx::query_scalar(
        "SELECT id FROM unnest($1::text[]) AS ids(id) \
         WHERE pg_try_advisory_xact_lock($2, hashtext($3 || id))",
    )
    .bind(ids)
    .bind(PIN_CLASS)
    .bind(schema.backup_prefix())
    .fetch_all(conn)
    .await?;
    Ok(ids
        .iter()
        .filter(|id| !free.contains(id))
        .cloned()
        .collect())
}

/// Drops the backups in one statement (in the caller's transaction).
pub(crate) async fn drop_all(
    conn: &mut PgConnection,
    schema: &SchemaName,
    ids: &[String],
) -> Result<(), Error> {
    if ids.is_empty() {
        return Ok(());
    }
    let schemas: Vec<String> = ids
        .iter()
        .map(|id| quote_ident(&schema.backup_schema(id)))
        .collect();
    sqlx::query(AssertSqlSafe(format!(
        "DROP SCHEMA {} CASCADE",
        schemas.join(", ")
    )))
    .execute(conn)
    .await?;
    Ok(())
}
