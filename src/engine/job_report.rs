//! The reports a Job leaves for the operator: `execution: job` runs an operation as
//! `statekeeper state … --report-id ID` in a Job, and the Job hands its typed report back by
//! writing it here, in the store's own database, in a schema statekeeper owns beside the store
//! (`<schema>__statekeeper`, as backups are `<schema>__backup_<id>`), never in a framework's
//! tables. The Job already holds the store's credentials, so this needs no RBAC and no copied
//! secret; the row outlives the Pod; and a Pod that dies before committing leaves no row, so a
//! lost report can never read as a success (docs/operations.md, "How a Job reports back").
//!
//! One row per operation. A later record for the same operation replaces the report (the last
//! attempt that finished describes what is there now: the file at the destination, the newest
//! backup), but only with a report of the same kind: an id reused for another kind of operation
//! is refused. The operator counts an operation succeeded only when its Job completed and the
//! report is there.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{AssertSqlSafe, PgPool};

use super::Error;
use super::identifier::{SchemaName, quote_ident};

/// The table beside the store that holds the reports.
pub const TABLE: &str = "job_reports";
/// The longest operation id: a namespace, a Kubernetes name and a uid fit.
pub const MAX_OPERATION_ID_BYTES: usize = 320;
/// The longest kind (a command's name: `export`, `backups prune`).
const MAX_KIND_BYTES: usize = 63;

/// One operation's report, as a Job recorded it.
#[derive(Clone, Debug, PartialEq)]
pub struct JobReport {
    /// What ran: the command's name (`export`, `import`, `janitor`, …).
    pub kind: String,
    /// The command's JSON report, as `-o json` prints it.
    pub report: Value,
    pub recorded_at: DateTime<Utc>,
}

impl JobReport {
    /// The report as one of the engine's report types (`ExportReport`, …).
    pub fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T, Error> {
        serde_json::from_value(self.report.clone()).map_err(|e| {
            Error::InvalidOperation(format!("the {} report cannot be read: {e}", self.kind))
        })
    }
}

/// Checks an operation id: 1 to 320 bytes of ASCII letters, digits, `-`, `.`, `_`, `/` and `:`
/// (Kubernetes names, namespaces and uids, joined), starting with a letter or digit. Bound as a
/// parameter either way; the rule keeps ids readable and names in errors harmless.
pub fn check_operation_id(id: &str) -> Result<(), Error> {
    let invalid = |reason: String| Error::InvalidOperationId {
        id: id
            .chars()
            .take(80)
            .collect::<String>()
            .escape_debug()
            .to_string(),
        reason,
    };
    if id.is_empty() {
        return Err(invalid("it is empty".into()));
    }
    if id.len() > MAX_OPERATION_ID_BYTES {
        return Err(invalid(format!(
            "it is {} bytes long; at most {MAX_OPERATION_ID_BYTES} are allowed",
            id.len()
        )));
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || "-._/:".contains(c);
    if !id.starts_with(|c: char| c.is_ascii_alphanumeric()) || !id.chars().all(allowed) {
        return Err(invalid(
            "use only ASCII letters, digits, '-', '.', '_', '/' and ':', starting with a letter \
             or digit"
                .into(),
        ));
    }
    Ok(())
}

fn check_kind(kind: &str) -> Result<(), Error> {
    let ok = !kind.is_empty()
        && kind.len() <= MAX_KIND_BYTES
        && kind
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == ' ');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidOperation(format!(
            "invalid report kind {:?}: lower-case letters, digits, '-' and ' ', at most \
             {MAX_KIND_BYTES} bytes",
            kind.chars().take(80).collect::<String>()
        )))
    }
}

/// `"<schema>__statekeeper"."job_reports"`
fn table(schema: &SchemaName) -> String {
    format!(
        "{}.{}",
        quote_ident(&schema.reports_schema()),
        quote_ident(TABLE)
    )
}

/// Records `report` as what operation `operation_id` (of kind `kind`) reported, creating the
/// schema and table beside the store when missing; returns the row as stored. Replaces an
/// earlier report of the same kind; refuses one of another kind.
pub async fn record(
    pool: &PgPool,
    schema: &SchemaName,
    operation_id: &str,
    kind: &str,
    report: &Value,
) -> Result<JobReport, Error> {
    check_operation_id(operation_id)?;
    check_kind(kind)?;
    let mut tx = pool.begin().await?;
    // Two Jobs of one store may create the schema at once; CREATE … IF NOT EXISTS alone can
    // still fail with a duplicate key then. The two-key form is a lock space of its own.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('statekeeper job reports'), hashtext($1))")
        .bind(schema.as_str())
        .execute(&mut *tx)
        .await?;
    let reports = quote_ident(&schema.reports_schema());
    sqlx::query(AssertSqlSafe(format!(
        "CREATE SCHEMA IF NOT EXISTS {reports}"
    )))
    .execute(&mut *tx)
    .await?;
    sqlx::query(AssertSqlSafe(format!(
        "CREATE TABLE IF NOT EXISTS {} (operation text PRIMARY KEY, kind text NOT NULL, \
         report jsonb NOT NULL, recorded_at timestamptz NOT NULL DEFAULT now())",
        table(schema)
    )))
    .execute(&mut *tx)
    .await?;
    let row: Option<(String, Value, DateTime<Utc>)> = sqlx::query_as(AssertSqlSafe(format!(
        "INSERT INTO {t} AS r (operation, kind, report) VALUES ($1, $2, $3) \
         ON CONFLICT (operation) DO UPDATE SET report = EXCLUDED.report, recorded_at = now() \
         WHERE r.kind = EXCLUDED.kind RETURNING kind, report, recorded_at",
        t = table(schema)
    )))
    .bind(operation_id)
    .bind(kind)
    .bind(report)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((kind, report, recorded_at)) = row else {
        let existing = read_kind(&mut tx, schema, operation_id).await?;
        return Err(Error::InvalidOperation(format!(
            "operation \"{operation_id}\" already has a report of kind \"{}\"; an operation id \
             names one operation",
            existing.unwrap_or_default()
        )));
    };
    // A kill here (a node failure before the commit) must leave no report at all.
    super::failpoint::hit("job_report.before_commit");
    tx.commit().await?;
    Ok(JobReport {
        kind,
        report,
        recorded_at,
    })
}

async fn read_kind(
    tx: &mut sqlx::PgConnection,
    schema: &SchemaName,
    operation_id: &str,
) -> Result<Option<String>, Error> {
    Ok(sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT kind FROM {} WHERE operation = $1",
        table(schema)
    )))
    .bind(operation_id)
    .fetch_optional(tx)
    .await?)
}

/// Whether the table beside the store exists yet (reading creates nothing).
async fn exists(pool: &PgPool, schema: &SchemaName) -> Result<bool, Error> {
    let qualified = table(schema);
    Ok(sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(qualified)
        .fetch_one(pool)
        .await?)
}

/// The report recorded for an operation, if any. No row means no success: the Job failed, or
/// its Pod died before it committed.
pub async fn read(
    pool: &PgPool,
    schema: &SchemaName,
    operation_id: &str,
) -> Result<Option<JobReport>, Error> {
    check_operation_id(operation_id)?;
    if !exists(pool, schema).await? {
        return Ok(None);
    }
    let row: Option<(String, Value, DateTime<Utc>)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT kind, report, recorded_at FROM {} WHERE operation = $1",
        table(schema)
    )))
    .bind(operation_id)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|(kind, report, recorded_at)| JobReport {
        kind,
        report,
        recorded_at,
    }))
}

/// Removes an operation's report once the operator has it in status; true when there was one.
pub async fn forget(pool: &PgPool, schema: &SchemaName, operation_id: &str) -> Result<bool, Error> {
    check_operation_id(operation_id)?;
    if !exists(pool, schema).await? {
        return Ok(false);
    }
    let done = sqlx::query(AssertSqlSafe(format!(
        "DELETE FROM {} WHERE operation = $1",
        table(schema)
    )))
    .bind(operation_id)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() > 0)
}

/// Removes reports recorded longer than `older_than` ago (those of operations the operator
/// never came back for); returns how many.
pub async fn prune(pool: &PgPool, schema: &SchemaName, older_than: Duration) -> Result<u64, Error> {
    if !exists(pool, schema).await? {
        return Ok(0);
    }
    let seconds = older_than.as_secs_f64();
    let done = sqlx::query(AssertSqlSafe(format!(
        "DELETE FROM {} WHERE recorded_at < now() - make_interval(secs => $1)",
        table(schema)
    )))
    .bind(seconds)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operation_ids() {
        for ok in [
            "a",
            "default/nightly-20261207t2300z",
            "4f9c2b1e-5d6a-4c3b-9e8f-0a1b2c3d4e5f",
            "ns/name.v2:4f9c2b1e",
        ] {
            check_operation_id(ok).expect(ok);
        }
        let long = "a".repeat(MAX_OPERATION_ID_BYTES + 1);
        for bad in [
            "",
            "-a",
            "/a",
            "a b",
            "a'b",
            "a\"b",
            "é",
            "a;b",
            long.as_str(),
        ] {
            assert!(
                matches!(
                    check_operation_id(bad),
                    Err(Error::InvalidOperationId { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn kinds() {
        check_kind("export").unwrap();
        check_kind("backups prune").unwrap();
        assert!(check_kind("").is_err());
        assert!(check_kind("Export").is_err());
        assert!(check_kind("a;b").is_err());
    }
}
