//! `statekeeper-bench upgrade`: the upgrade from schema version 2 to 3 (with its automatic
//! backup) of a store holding N model versions, next to a `CREATE TABLE … AS` copy of every
//! table of the same store in the same run.

use std::time::Instant;

use sqlx::{AssertSqlSafe, Connection, PgConnection};
use statekeeper::engine::backup::BACKUP_METADATA_TABLE;
use statekeeper::engine::identifier::quote_ident;
use statekeeper::engine::{SchemaName, Store};

use super::BenchResult;
use super::memory::{peak_rss_mib, reset_peak_rss};
use super::postgres::generated_store;

/// What schema version 3 adds: dropping it leaves the store exactly at version 2.
const VERSION_3_OBJECTS: &str = "
    DROP TABLE model_version_intervals;
    DROP INDEX model_versions_created_at_idx, function_versions_created_at_idx,
      physical_relations_version_idx, physical_relation_ancestry_parent_idx,
      virtual_environments_expires_at_idx, virtual_environment_refs_version_idx,
      virtual_environment_function_refs_version_idx, virtual_environment_checkpoints_env_idx,
      virtual_environment_checkpoint_refs_version_idx,
      virtual_environment_checkpoint_function_refs_version_idx,
      state_migration_events_occurred_at_idx;
    DELETE FROM state_versions WHERE version = 3;";

struct Round {
    rows: i64,
    upgrade_secs: f64,
    backup_rows: i64,
    peak_mib: f64,
    copy_secs: f64,
}

/// One round a size, each printed as a row as soon as it is measured.
pub async fn run(url: &str, schema: &str, sizes: &[u64], environments: u32) -> BenchResult<()> {
    println!(
        "upgrade benchmark (schema version 2 to 3 with its backup; CREATE TABLE … AS of every table; same store, same run)"
    );
    println!(
        "{:>9} {:>10} {:>10} {:>9} {:>9} {:>9}   ratio",
        "versions", "rows", "backed up", "upgrade s", "peak MiB", "CTAS s"
    );
    for &size in sizes {
        let r = round(url, schema, size, environments).await?;
        println!(
            "{:>9} {:>10} {:>10} {:>9.2} {:>9.1} {:>9.2}   upgrade/CTAS {:.2}x",
            size,
            r.rows,
            r.backup_rows,
            r.upgrade_secs,
            r.peak_mib,
            r.copy_secs,
            r.upgrade_secs / r.copy_secs
        );
    }
    Ok(())
}

/// Generates a store of `size` versions, takes it back to version 2, upgrades it, and copies
/// all its tables with `CREATE TABLE … AS` in one transaction.
async fn round(url: &str, schema: &str, size: u64, environments: u32) -> BenchResult<Round> {
    let store = generated_store(url, schema, size, environments).await?;
    let name = SchemaName::new(schema)?;
    let mut conn = PgConnection::connect(url).await?;
    sqlx::raw_sql(AssertSqlSafe(format!(
        "SET search_path TO {}; {VERSION_3_OBJECTS}",
        name.quoted()
    )))
    .execute(&mut conn)
    .await?;
    sqlx::query(AssertSqlSafe(format!(
        "VACUUM ANALYZE {}.model_versions",
        name.quoted()
    )))
    .execute(&mut conn)
    .await?;

    reset_peak_rss();
    let report = store.upgrade(None).await?;
    let peak_mib = peak_rss_mib();
    if report.from_version != 2 || report.to_version != 3 {
        return Err(format!(
            "expected an upgrade from 2 to 3, got {} to {}",
            report.from_version, report.to_version
        )
        .into());
    }
    let backup = report.backup.ok_or("the upgrade made no backup")?;
    let upgrade_secs = report.duration_ms as f64 / 1000.0;

    let copy_secs = copy_all_tables(&mut conn, &store, &backup.id).await?;
    store.drop_backup(&backup.id).await?;
    let rows: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT count(*) FROM {}.model_versions",
        name.quoted()
    )))
    .fetch_one(&mut conn)
    .await?;
    Ok(Round {
        rows,
        upgrade_secs,
        backup_rows: backup.rows,
        peak_mib,
        copy_secs,
    })
}

/// The reference: every table of the backup (what the upgrade copied, at version 2) copied with
/// `CREATE TABLE … AS` in one transaction, then dropped.
async fn copy_all_tables(
    conn: &mut PgConnection,
    store: &Store,
    backup_id: &str,
) -> BenchResult<f64> {
    let backup_schema = store.schema().backup_schema(backup_id);
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT tablename::text FROM pg_tables WHERE schemaname = $1 ORDER BY 1",
    )
    .bind(&backup_schema)
    .fetch_all(&mut *conn)
    .await?;
    let copies: Vec<String> = tables
        .iter()
        .filter(|t| t.as_str() != BACKUP_METADATA_TABLE)
        .map(|t| {
            format!(
                "CREATE TABLE bench_copy.{t} AS TABLE {}.{t}",
                quote_ident(&backup_schema)
            )
        })
        .collect();
    sqlx::query("DROP SCHEMA IF EXISTS bench_copy CASCADE")
        .execute(&mut *conn)
        .await?;
    let started = Instant::now();
    sqlx::raw_sql(AssertSqlSafe(format!(
        "BEGIN; CREATE SCHEMA bench_copy; {}; COMMIT",
        copies.join("; ")
    )))
    .execute(&mut *conn)
    .await?;
    let secs = started.elapsed().as_secs_f64();
    sqlx::query("DROP SCHEMA bench_copy CASCADE")
        .execute(&mut *conn)
        .await?;
    Ok(secs)
}
