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

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
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
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub version_details: BTreeMap<String, String>,
    /// Why it was taken: `manual`, `pre-upgrade`, `pre-rollback`, `pre-reset`, `pre-import`.
    pub reason: String,
    pub tables: i32,
    pub rows: i64,
    /// The request the backup was made for (a StateMigration's uid), when one was named.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operation: Option<String>,
}

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

/// Every backup of the store, oldest first.
pub async fn list(conn: &mut PgConnection, schema: &SchemaName) -> Result<Vec<BackupInfo>, Error> {
    let prefix = schema.backup_prefix();
    // left() rather than LIKE: '_' in schema names is a LIKE wildcard.
    let candidates: Vec<String> = sqlx::query_scalar(
        "SELECT nspname::text FROM pg_namespace WHERE left(nspname, length($1)) = $1 ORDER BY 1",
    )
    .bind(&prefix)
    .fetch_all(&mut *conn)
    .await?;
    let mut backups = Vec::new();
    for backup_schema in candidates {
        let id = &backup_schema[prefix.len()..];
        if validate_backup_id(id).is_err()
            || !catalog::table_exists(conn, &backup_schema, BACKUP_METADATA_TABLE).await?
        {
            continue;
        }
        backups.push(read_metadata(conn, schema, id).await?);
    }
    Ok(backups)
}

pub async fn read_metadata(
    conn: &mut PgConnection,
    schema: &SchemaName,
    id: &str,
) -> Result<BackupInfo, Error> {
    let incompatible = |reason: String| Error::IncompatibleBackup {
        id: id.to_owned(),
        reason,
    };
    let row: Option<String> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT to_jsonb(m)::text FROM {}.{} m",
        quote_ident(&schema.backup_schema(id)),
        quote_ident(BACKUP_METADATA_TABLE)
    )))
    .fetch_optional(&mut *conn)
    .await?;
    let row = row.ok_or_else(|| incompatible("its metadata table is empty".into()))?;
    let stored: StoredMetadata = serde_json::from_str(&row)
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
