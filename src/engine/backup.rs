//! Backup schemas `<schema>__backup_<id>`: full copies of every state table, made inside the
//! transaction of the operation that needs them, so a failed operation leaves no backup behind.

use chrono::{DateTime, Duration as ChronoDuration, Utc};
use serde::Serialize;
use sqlx::{AssertSqlSafe, PgConnection, Row};

use super::Error;
use super::catalog;
use super::identifier::{BACKUP_ID_LEN, SchemaName, quote_ident};

/// The table inside every backup schema that describes the backup.
pub const BACKUP_METADATA_TABLE: &str = "_statekeeper_backup";

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BackupInfo {
    pub id: String,
    pub schema: String,
    pub created_at: DateTime<Utc>,
    /// The store's schema version when the backup was taken.
    pub schema_version: i32,
    /// Why it was taken: `pre-upgrade`, `pre-rollback`, `pre-reset`.
    pub reason: String,
    pub tables: i32,
    pub rows: i64,
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

/// Copies every table of the store into a new backup schema.
pub async fn create(
    conn: &mut PgConnection,
    schema: &SchemaName,
    schema_version: i32,
    reason: &str,
) -> Result<BackupInfo, Error> {
    let mut at = Utc::now();
    let mut id = format_id(at);
    while catalog::schema_exists(conn, &schema.backup_schema(&id)).await? {
        at += ChronoDuration::milliseconds(1);
        id = format_id(at);
    }
    let backup_schema = quote_ident(&schema.backup_schema(&id));
    sqlx::query(AssertSqlSafe(format!("CREATE SCHEMA {backup_schema}")))
        .execute(&mut *conn)
        .await?;
    let tables = catalog::tables(conn, schema.as_str()).await?;
    let mut rows = 0i64;
    for table in &tables {
        let copied = sqlx::query(AssertSqlSafe(format!(
            "CREATE TABLE {backup_schema}.{t} AS TABLE {store}.{t}",
            t = quote_ident(table),
            store = schema.quoted(),
        )))
        .execute(&mut *conn)
        .await?;
        rows += copied.rows_affected() as i64;
    }
    sqlx::query(AssertSqlSafe(format!(
        "CREATE TABLE {backup_schema}.{meta} (backup_id text NOT NULL, source_schema text NOT NULL, \
         schema_version integer NOT NULL, reason text NOT NULL, created_at timestamptz NOT NULL, \
         tables integer NOT NULL, row_count bigint NOT NULL)",
        meta = quote_ident(BACKUP_METADATA_TABLE)
    )))
    .execute(&mut *conn)
    .await?;
    let info = BackupInfo {
        id,
        schema: schema.as_str().to_owned(),
        created_at: at,
        schema_version,
        reason: reason.to_owned(),
        tables: tables.len() as i32,
        rows,
    };
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {backup_schema}.{meta} VALUES ($1, $2, $3, $4, $5, $6, $7)",
        meta = quote_ident(BACKUP_METADATA_TABLE)
    )))
    .bind(&info.id)
    .bind(&info.schema)
    .bind(info.schema_version)
    .bind(&info.reason)
    .bind(info.created_at)
    .bind(info.tables)
    .bind(info.rows)
    .execute(&mut *conn)
    .await?;
    Ok(info)
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
    let row = sqlx::query(AssertSqlSafe(format!(
        "SELECT backup_id, schema_version, reason, created_at, tables, row_count FROM {}.{}",
        quote_ident(&schema.backup_schema(id)),
        quote_ident(BACKUP_METADATA_TABLE)
    )))
    .fetch_optional(&mut *conn)
    .await?
    .ok_or_else(|| Error::IncompatibleBackup {
        id: id.to_owned(),
        reason: "its metadata table is empty".into(),
    })?;
    Ok(BackupInfo {
        id: row.try_get("backup_id")?,
        schema: schema.as_str().to_owned(),
        created_at: row.try_get("created_at")?,
        schema_version: row.try_get("schema_version")?,
        reason: row.try_get("reason")?,
        tables: row.try_get("tables")?,
        rows: row.try_get("row_count")?,
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

pub async fn drop(conn: &mut PgConnection, schema: &SchemaName, id: &str) -> Result<(), Error> {
    sqlx::query(AssertSqlSafe(format!(
        "DROP SCHEMA {} CASCADE",
        quote_ident(&schema.backup_schema(id))
    )))
    .execute(conn)
    .await?;
    Ok(())
}

/// Versions and checksums recorded in a backup's own copy of `state_versions`.
pub async fn recorded_versions(
    conn: &mut PgConnection,
    schema: &SchemaName,
    id: &str,
) -> Result<Vec<(i32, String)>, Error> {
    let backup_schema = schema.backup_schema(id);
    if !catalog::table_exists(conn, &backup_schema, "state_versions").await? {
        return Ok(Vec::new());
    }
    let rows = sqlx::query(AssertSqlSafe(format!(
        "SELECT version, checksum FROM {}.state_versions ORDER BY version",
        quote_ident(&backup_schema)
    )))
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|r| Ok((r.try_get("version")?, r.try_get("checksum")?)))
        .collect()
}
