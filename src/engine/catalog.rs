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

/// Which of `names` are base tables of the schema. Unlike listing a schema's tables (PostgreSQL
/// has no index on a relation's schema, so that reads all of `pg_class`: ~50 ms with a thousand
/// stores in one database), this looks each name up by index.
pub async fn existing_tables(
    conn: &mut PgConnection,
    schema: &str,
    names: &[&str],
) -> Result<Vec<String>, Error> {
    Ok(sqlx::query_scalar(
        "SELECT c.relname::text FROM unnest($2::text[]) AS wanted(name) \
         JOIN pg_class c ON c.relname = wanted.name \
           AND c.relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = $1) \
         WHERE c.relkind IN ('r', 'p') ORDER BY 1",
    )
    .bind(schema)
    .bind(names)
    .fetch_all(conn)
    .await?)
}

/// The schemas whose names start with `prefix`, sorted.
pub async fn schemas_with_prefix(
    conn: &mut PgConnection,
    prefix: &str,
) -> Result<Vec<String>, Error> {
    // left() rather than LIKE: '_' in schema names is a LIKE wildcard.
    Ok(sqlx::query_scalar(
        "SELECT nspname::text FROM pg_namespace WHERE left(nspname, length($1)) = $1 ORDER BY 1",
    )
    .bind(prefix)
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

/// (table, schema) of every base table named one of `names`, in any schema but PostgreSQL's own
/// and statekeeper's backups. Looked up by name (indexed), however many schemas there are.
pub async fn find_tables(
    conn: &mut PgConnection,
    names: &[&str],
) -> Result<Vec<(String, String)>, Error> {
    Ok(sqlx::query_as(
        "SELECT c.relname::text, n.nspname::text FROM pg_class c \
         JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relname = ANY($1::text[]) AND c.relkind IN ('r', 'p') \
           AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
           AND n.nspname NOT LIKE 'pg\\_%' AND strpos(n.nspname, $2) = 0 \
         ORDER BY 2, 1",
    )
    .bind(names)
    .bind(super::identifier::BACKUP_INFIX)
    .fetch_all(conn)
    .await?)
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

/// Column names of a table in ordinal order, quoted and joined for a column list. Generated
/// columns are left out: PostgreSQL computes them and refuses values for them.
pub async fn column_list(
    conn: &mut PgConnection,
    schema: &str,
    table: &str,
) -> Result<String, Error> {
    let columns: Vec<String> = sqlx::query_scalar(
        "SELECT a.attname::text FROM pg_attribute a \
         JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped \
           AND a.attgenerated = '' \
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
/// inserted with explicit ids (restore, import) never collide with later inserts. Never
/// backwards: `setval` is not undone when its transaction fails, so lowering a sequence in an
/// operation that then rolls back would hand out ids the store still holds.
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
            "SELECT setval(seq, GREATEST((SELECT max({col}) FROM {qualified}), last_value), true) \
             FROM (SELECT pg_get_serial_sequence($1, $2)::regclass AS seq) s, \
             LATERAL pg_sequence_last_value(seq) AS last_value",
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

/// The most columns any of `tables` has.
pub async fn widest(
    conn: &mut PgConnection,
    schema: &str,
    tables: &[String],
) -> Result<usize, Error> {
    let widest: i64 = sqlx::query_scalar(
        "SELECT coalesce(max(n), 0) FROM (SELECT count(*) AS n FROM pg_attribute a \
         JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = $1 AND c.relname = ANY($2) AND a.attnum > 0 AND NOT a.attisdropped \
         GROUP BY c.oid) t",
    )
    .bind(schema)
    .bind(tables)
    .fetch_one(conn)
    .await?;
    Ok(usize::try_from(widest).unwrap_or(0))
}

/// Columns of a table in ordinal order with their types (`format_type`), generated columns
/// included: equal lists mean rows move between the two tables unchanged.
pub async fn columns(
    conn: &mut PgConnection,
    schema: &str,
    table: &str,
) -> Result<Vec<(String, String)>, Error> {
    Ok(described_columns(conn, schema, table)
        .await?
        .into_iter()
        .map(|column| (column.name, column.type_name))
        .collect())
}

/// A column as [`described_columns`] describes it.
pub struct Column {
    pub name: String,
    /// `format_type`, as in [`columns`].
    pub type_name: String,
    /// Generated columns take no values: PostgreSQL computes them.
    pub generated: bool,
}

/// [`columns`], each with what else the callers need to know of it, in one round trip.
pub async fn described_columns(
    conn: &mut PgConnection,
    schema: &str,
    table: &str,
) -> Result<Vec<Column>, Error> {
    let rows: Vec<(String, String, bool)> = sqlx::query_as(
        "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attgenerated <> '' \
         FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped \
         ORDER BY a.attnum",
    )
    .bind(schema)
    .bind(table)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(name, type_name, generated)| Column {
            name,
            type_name,
            generated,
        })
        .collect())
}

/// Statements that give `to_schema.table` the primary key, unique and exclusion constraints and
/// the other indexes of `from_schema.table`, under the same names.
pub async fn index_definitions(
    conn: &mut PgConnection,
    from_schema: &str,
    to_schema: &str,
    table: &str,
) -> Result<Vec<String>, Error> {
    let target = format!("{}.{}", quote_ident(to_schema), quote_ident(table));
    // One round trip: the key constraints (with their names), then the indexes no constraint
    // owns. pg_get_indexdef names the table schema-qualified as quote_ident would, which is
    // swapped for the target.
    let definitions: Vec<(Option<String>, String, String)> = sqlx::query_as(
        "SELECT * FROM (SELECT c.conname::text, pg_get_constraintdef(c.oid), ''::text \
           FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid \
           JOIN pg_namespace n ON n.oid = t.relnamespace \
           WHERE n.nspname = $1 AND t.relname = $2 AND c.contype IN ('p', 'u', 'x') ORDER BY 1) k \
         UNION ALL SELECT * FROM (SELECT NULL::text, pg_get_indexdef(x.indexrelid), \
             format(' ON %s.%s USING ', quote_ident(n.nspname), quote_ident(t.relname)) \
           FROM pg_index x JOIN pg_class t ON t.oid = x.indrelid \
           JOIN pg_namespace n ON n.oid = t.relnamespace \
           WHERE n.nspname = $1 AND t.relname = $2 AND NOT EXISTS (SELECT 1 FROM pg_constraint c \
             WHERE c.conindid = x.indexrelid AND c.conrelid = x.indrelid) ORDER BY 2) i",
    )
    .bind(from_schema)
    .bind(table)
    .fetch_all(&mut *conn)
    .await?;
    let mut statements = Vec::with_capacity(definitions.len());
    for (constraint, definition, source_on) in definitions {
        match constraint {
            Some(name) => statements.push(format!(
                "ALTER TABLE {target} ADD CONSTRAINT {} {definition}",
                quote_ident(&name)
            )),
            None if definition.contains(&source_on) => {
                statements.push(definition.replacen(&source_on, &format!(" ON {target} USING "), 1))
            }
            None => {
                return Err(Error::Database(sqlx::Error::Protocol(format!(
                    "cannot copy index of {table}: unexpected definition {definition}"
                ))));
            }
        }
    }
    Ok(statements)
}
