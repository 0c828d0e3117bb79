//! The janitor of Meltano's `runs` table, which grows by a row per pipeline run for ever.
//!
//! What Meltano reads from `runs` (meltano/core/job/finder.py and its callers), and so what stays:
//! - every `RUNNING` run: `meltano run`/`elt` refuse to start a job while one is running
//!   (`latest_running`), and the stale-run check (`stale`, `all_stale`) reads their heartbeats;
//! - each job's newest successful run: `meltano schedule list` shows its end (`latest_success`);
//! - recent history: `meltano logs` lists recent runs and finds one by run ID.
//!
//! State itself lives in the `state` table; runs only rebuilt it in the migration that created
//! that table, so removing old runs loses no state.

use sqlx::{AssertSqlSafe, Connection, PgConnection, Row};

use crate::engine::janitor_report::{JanitorOptions, JanitorReport};
use crate::engine::store::Store;
use crate::engine::{Error, Framework};

/// The doomed run IDs, decided once from one snapshot and removed batch by batch.
const DOOMED: &str = "pg_temp.statekeeper_doomed_runs";

/// Cleans `runs` as `options` says, on a connection holding the store's session lock. A dry run
/// runs the same statements and rolls them back, so its counts are a real run's.
pub(crate) async fn run(
    store: &Store,
    conn: &mut PgConnection,
    options: &JanitorOptions,
) -> Result<JanitorReport, Error> {
    store.require_initialized(conn).await?;
    let mut report = JanitorReport {
        dry_run: options.dry_run,
        framework: Framework::Meltano,
        ..Default::default()
    };
    if options.dry_run {
        let mut outer = conn.begin().await?;
        clean(store, &mut outer, options, &mut report).await?;
        outer.rollback().await?;
    } else {
        let cleaned = clean(store, conn, options, &mut report).await;
        // The session goes back to its pool only after the janitor; the table goes with it anyway.
        let _ = sqlx::query(AssertSqlSafe(format!("DROP TABLE IF EXISTS {DOOMED}")))
            .execute(&mut *conn)
            .await;
        cleaned?;
    }
    Ok(report)
}

async fn clean(
    store: &Store,
    conn: &mut PgConnection,
    options: &JanitorOptions,
    report: &mut JanitorReport,
) -> Result<(), Error> {
    let s = store.schema().quoted();
    // Meltano keeps UTC in columns without a time zone.
    let now = "(now() AT TIME ZONE 'UTC')";
    if options.fail_stale_runs {
        // As Meltano's own stale-run check does it (stale_job_failer.py): FAIL, ended now, the
        // reason in the payload's "error".
        let fail = format!(
            "UPDATE {s}.runs SET state = 'FAIL', ended_at = {now}, \
               payload = (coalesce(nullif(payload, ''), '{{}}')::jsonb || jsonb_build_object('error', \
                 CASE WHEN last_heartbeat_at IS NOT NULL \
                      THEN 'No heartbeat recorded for 5 minutes.' \
                      ELSE 'Still running after 24 hours.' END \
                 || ' The process was likely killed unceremoniously.'))::text \
             WHERE state = 'RUNNING' AND ( \
               (last_heartbeat_at IS NOT NULL AND last_heartbeat_at < {now} - interval '5 minutes') \
               OR (last_heartbeat_at IS NULL AND started_at < {now} - interval '24 hours'))"
        );
        let failed = store
            .run_batch(conn, report, |tx| {
                Box::pin(sqlx::query(AssertSqlSafe(fail.clone())).execute(tx))
            })
            .await?
            .rows_affected();
        report.stale_runs_failed = failed;
    }

    sqlx::query(AssertSqlSafe(format!("DROP TABLE IF EXISTS {DOOMED}")))
        .execute(&mut *conn)
        .await?;
    // Per job: the newest `keep` runs, every run younger than the retention, every RUNNING run
    // and the newest successful one stay.
    sqlx::query(AssertSqlSafe(format!(
        "CREATE TEMP TABLE {DOOMED} AS \
         SELECT id FROM ( \
           SELECT id, state, ended_at, started_at, \
             row_number() OVER (PARTITION BY job_name ORDER BY started_at DESC NULLS FIRST, id DESC) AS newest, \
             first_value(id) OVER (PARTITION BY job_name \
               ORDER BY (state = 'SUCCESS' AND ended_at IS NOT NULL) DESC NULLS LAST, ended_at DESC NULLS LAST, id DESC) \
               AS latest_success \
           FROM {s}.runs) r \
         WHERE newest > $1 AND state IS DISTINCT FROM 'RUNNING' \
           AND started_at < {now} - make_interval(secs => $2) \
           AND NOT (id = latest_success AND state = 'SUCCESS' AND ended_at IS NOT NULL)"
    )))
    .bind(i64::from(options.keep_runs))
    .bind(options.run_min_age.as_secs_f64())
    .execute(&mut *conn)
    .await?;

    let batch = i64::from(options.batch_size.max(1));
    // A run that turned RUNNING again since (a FAIL run is retried in place) is spared.
    let remove = format!(
        "WITH batch AS ( \
           DELETE FROM {DOOMED} WHERE id IN (SELECT id FROM {DOOMED} ORDER BY id LIMIT $1) RETURNING id), \
         gone AS ( \
           DELETE FROM {s}.runs r USING batch b \
           WHERE r.id = b.id AND r.state IS DISTINCT FROM 'RUNNING' RETURNING 1) \
         SELECT (SELECT count(*) FROM batch) AS taken, (SELECT count(*) FROM gone) AS removed"
    );
    loop {
        let row = store
            .run_batch(conn, report, |tx| {
                Box::pin(
                    sqlx::query(AssertSqlSafe(remove.clone()))
                        .bind(batch)
                        .fetch_one(tx),
                )
            })
            .await?;
        report.runs += row.try_get::<i64, _>("removed")? as u64;
        if row.try_get::<i64, _>("taken")? < batch {
            break;
        }
    }
    Ok(())
}
