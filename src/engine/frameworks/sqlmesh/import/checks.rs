//! What refuses a SQLMesh export: a file of another state schema or SQLMesh major.minor version
//! than the store's, and staged rows for a table the store does not have.

use sqlx::PgConnection;

use crate::engine::Error;
use crate::engine::format::stream::Header;
use crate::engine::framework::StoreVersion;
use crate::engine::store::Store;

/// The versions the file's header names, read before the store is touched so that a file this
/// statekeeper cannot read fails without a transaction.
pub(super) struct FileVersions {
    schema_version: i32,
    sqlmesh: String,
}

impl FileVersions {
    pub(super) fn read(header: &Header) -> Result<Self, Error> {
        header.check_importable(1)?;
        let schema_version = header.schema_version()?;
        let sqlmesh = header
            .versions_str("sqlmesh_version")
            .unwrap_or("")
            .to_owned();
        Ok(Self {
            schema_version,
            sqlmesh,
        })
    }
}

/// SQLMesh reads state of its own schema and major.minor version only, so a file of another
/// would leave the store unreadable to the SQLMesh that uses it.
pub(super) fn refuse_other_versions(
    store: &Store,
    file: &FileVersions,
    current: &StoreVersion,
) -> Result<(), Error> {
    let FileVersions {
        schema_version: file_schema_version,
        sqlmesh: file_sqlmesh,
    } = file;
    if *file_schema_version != current.schema_version {
        return Err(Error::InvalidExport(format!(
            "the file has SQLMesh state schema version {file_schema_version}, the store has {}; {}",
            current.schema_version,
            store.profile().version_mismatch_hint
        )));
    }
    let store_sqlmesh = current
        .details
        .get("sqlmeshVersion")
        .cloned()
        .unwrap_or_default();
    if major_minor(file_sqlmesh) != major_minor(&store_sqlmesh) {
        return Err(Error::InvalidExport(format!(
            "the file was written by SQLMesh {file_sqlmesh} and the store by SQLMesh \
             {store_sqlmesh}; SQLMesh reads state of its own major.minor version only (upgrade or \
             downgrade one side with `sqlmesh migrate`)"
        )));
    }
    Ok(())
}

/// `0.236` of `0.236.4`, as SQLMesh compares versions on import.
fn major_minor(version: &str) -> Vec<&str> {
    version.split('.').take(2).collect()
}

/// A table older SQLMesh versions lack may be missing: that is fine while the file has no rows
/// for it, and calls for `sqlmesh migrate` when it has.
pub(super) async fn refuse_rows_without_table(
    conn: &mut PgConnection,
    table: &str,
) -> Result<(), Error> {
    let staged_rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM statekeeper_import WHERE section = $1")
            .bind(table)
            .fetch_one(&mut *conn)
            .await?;
    if staged_rows > 0 {
        return Err(Error::InvalidExport(format!(
            "it has {table} rows, and this store has no {table} table (run `sqlmesh migrate`)"
        )));
    }
    Ok(())
}
