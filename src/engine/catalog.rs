//! Small catalog queries shared by every operation. All take the transaction they run in.

use sqlx::{AssertSqlSafe, PgConnection, Row};

use super::Error;
use super::identifier::quote_ident;

/// Base tables of a schema, by name.
pub async fn tables(conn: &mut PgConnection, schema: &str) -> Result<Vec<String>, Error> {
    Ok(sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') ORDER BY 1",
    )
    .bind(schema)
    .fetch_all(conn)
    .await?)
}

pub async fn schema_exists(conn: &mut PgConnection, schema: &str) -> Result<bool, Error> {
    Ok(
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
            .bind(schema)
            .fetch_one(conn)
            .await?,
    )
}

pub async fn table_exists(
    conn: &mut PgConnection,
    schema: &str,
    table: &str,
) -> Result<bool, Error> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p'))",
    )
    .bind(schema)
    .bind(table)
    .fetch_one(conn)
    .await?)
}

/// Column names of a table in ordinal order, quoted and joined for a column list.
pub async fn column_list(
    conn: &mut PgConnection,
    schema: &str,
    table: &str,
) -> Result<String, Error> {
    let columns: Vec<String> = sqlx::query_scalar(
        "SELECT a.attname::text FROM pg_attribute a \
         JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped \
         ORDER BY a.attnum",
    )
    .bind(schema)
    .bind(table)
    .fetch_all(conn)
    .await?;
    Ok(columns
        .iter()
        .map(|c| quote_ident(c))
        .collect::<Vec<_>>()
        .join(", "))
}

/// Moves every identity sequence of the schema past the largest id present, so that rows
/// inserted with explicit ids (restore, import) never collide with later inserts.
pub async fn resync_identities(conn: &mut PgConnection, schema: &str) -> Result<(), Error> {
    let identities = sqlx::query(
        "SELECT c.relname::text AS table_name, a.attname::text AS column_name FROM pg_attribute a \
         JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = $1 AND a.attidentity <> '' AND NOT a.attisdropped",
    )
    .bind(schema)
    .fetch_all(&mut *conn)
    .await?;
    for row in identities {
        let table: String = row.try_get("table_name")?;
        let column: String = row.try_get("column_name")?;
        let qualified = format!("{}.{}", quote_ident(schema), quote_ident(&table));
        let sql = format!(
            "SELECT setval(pg_get_serial_sequence($1, $2), COALESCE((SELECT max({col}) FROM {qualified}), 0) + 1, false)",
            col = quote_ident(&column),
        );
        sqlx::query(AssertSqlSafe(sql))
            .bind(&qualified)
            .bind(&column)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}
