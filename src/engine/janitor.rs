//! The janitor: removes expired environments, old checkpoints and unreferenced model/function
//! versions in bounded batches. Each batch is its own short transaction, so writers never wait
//! long and an interrupted run loses nothing: the next run continues where it stopped. The
//! store's advisory lock is held (at session level) for the whole run, so no migration overlaps.

use std::time::Instant;

use sqlx::{AssertSqlSafe, Connection, PgConnection, Row};

pub use super::janitor_report::{JanitorOptions, JanitorReport};
use super::store::Store;
use super::{Error, Framework};

/// The first schema version with everything the janitor relies on (intervals, indexes).
pub const JANITOR_MIN_VERSION: i32 = 3;
/// A batch that loses a race with a writer (a new reference appeared) is retried this often.
const RACE_RETRIES: u32 = 5;

impl Store {
    /// Runs the janitor. `on_released` receives the name of every physical relation released, so
    /// callers can drop the tables; memory stays flat however much is removed.
    pub async fn janitor(
        &self,
        options: &JanitorOptions,
        mut on_released: impl FnMut(String) + Send,
    ) -> Result<JanitorReport, Error> {
        let meltano = self.framework() == Framework::Meltano;
        if !self.profile().owns_schema && !meltano {
            return Err(self.profile().not_ours("run the janitor on"));
        }
        let started = Instant::now();
        // Detached from the pool: if this run is cancelled mid-way, dropping the connection ends
        // its session and PostgreSQL releases the session lock, instead of a pooled connection
        // keeping the store locked.
        let mut conn = self.pool().acquire().await?.detach();
        self.lock_session(&mut conn).await?;
        let result = if meltano {
            super::frameworks::meltano::janitor::run(self, &mut conn, options).await
        } else {
            self.janitor_locked(&mut conn, options, &mut on_released)
                .await
        };
        if self.unlock_session(&mut conn).await.is_ok() {
            let _ = conn.close().await;
        }
        let mut report = result?;
        report.duration = started.elapsed();
        Ok(report)
    }

    async fn janitor_locked(
        &self,
        conn: &mut PgConnection,
        options: &JanitorOptions,
        on_released: &mut (dyn FnMut(String) + Send),
    ) -> Result<JanitorReport, Error> {
        let current = self
            .require_version(conn, JANITOR_MIN_VERSION, "the janitor")
            .await?;
        debug_assert!(current >= JANITOR_MIN_VERSION);
        let mut report = JanitorReport {
            dry_run: options.dry_run,
            ..Default::default()
        };
        if options.dry_run {
            // The same statements as a real run, inside one transaction that is rolled back.
            let mut outer = conn.begin().await?;
            self.janitor_phases(&mut outer, options, &mut report, on_released)
                .await?;
            outer.rollback().await?;
            return Ok(report);
        }
        let operation = self.start_operation(conn, options).await?;
        match self
            .janitor_phases(conn, options, &mut report, on_released)
            .await
        {
            Ok(()) => {
                self.finish_operation(conn, operation, "succeeded", &report, None)
                    .await?;
                Ok(report)
            }
            Err(e) => {
                let _ = self
                    .finish_operation(conn, operation, "failed", &report, Some(&e.to_string()))
                    .await;
                Err(e)
            }
        }
    }

    /// The janitor's phases in order, each in batches of at most `batch_size` rows.
    async fn janitor_phases(
        &self,
        conn: &mut PgConnection,
        options: &JanitorOptions,
        report: &mut JanitorReport,
        on_released: &mut (dyn FnMut(String) + Send),
    ) -> Result<(), Error> {
        let batch = i64::from(options.batch_size.max(1));
        if options.expired_environments {
            self.remove_expired_environments(conn, options, batch, report)
                .await?;
        }
        if let Some(keep) = options.keep_checkpoints {
            self.prune_checkpoints(conn, options, keep, batch, report)
                .await?;
        }
        self.remove_unreferenced_model_versions(conn, options, batch, report, on_released)
            .await?;
        self.remove_unreferenced_function_versions(conn, options, batch, report)
            .await
    }

    /// Expired environments go with their checkpoints; the unsuffixed environment never
    /// expires.
    async fn remove_expired_environments(
        &self,
        conn: &mut PgConnection,
        options: &JanitorOptions,
        batch: i64,
        report: &mut JanitorReport,
    ) -> Result<(), Error> {
        let s = self.schema().quoted();
        let unsuffixed = options.unsuffixed_environment.as_str();
        let sql = format!(
            "WITH victims AS (
                   SELECT name FROM {s}.virtual_environments
                   WHERE expires_at < now() AND name <> $1
                   ORDER BY name LIMIT $2 FOR UPDATE SKIP LOCKED),
                 checkpoints AS (
                   DELETE FROM {s}.virtual_environment_checkpoints c USING victims v
                   WHERE c.environment = v.name RETURNING 1),
                 environments AS (
                   DELETE FROM {s}.virtual_environments e USING victims v
                   WHERE e.name = v.name RETURNING 1)
                 SELECT (SELECT count(*) FROM environments) AS environments,
                        (SELECT count(*) FROM checkpoints) AS checkpoints"
        );
        loop {
            let row = self
                .run_batch(conn, report, |tx| {
                    Box::pin(
                        sqlx::query(AssertSqlSafe(sql.clone()))
                            .bind(unsuffixed)
                            .bind(batch)
                            .fetch_one(tx),
                    )
                })
                .await?;
            let environments: i64 = row.try_get("environments")?;
            report.expired_environments += environments as u64;
            report.checkpoints += row.try_get::<i64, _>("checkpoints")? as u64;
            if environments < batch {
                break;
            }
        }
        Ok(())
    }

    /// Keeps each environment's newest `keep` checkpoints and any younger than
    /// `checkpoint_min_age`, going through the crowded environments a page at a time.
    async fn prune_checkpoints(
        &self,
        conn: &mut PgConnection,
        options: &JanitorOptions,
        keep: u32,
        batch: i64,
        report: &mut JanitorReport,
    ) -> Result<(), Error> {
        let s = self.schema().quoted();
        let unsuffixed = options.unsuffixed_environment.as_str();
        let keep = i64::from(keep);
        let min_age = options.checkpoint_min_age.as_secs_f64();
        let crowded = format!(
            "SELECT environment FROM {s}.virtual_environment_checkpoints
                 WHERE environment <> $1 AND environment > $2
                 GROUP BY environment HAVING count(*) > $3 ORDER BY environment LIMIT 100"
        );
        let prune = format!(
            "WITH keep AS (
                   SELECT id FROM {s}.virtual_environment_checkpoints WHERE environment = $1
                   ORDER BY created_at DESC, id DESC LIMIT $2),
                 victims AS (
                   SELECT id FROM {s}.virtual_environment_checkpoints
                   WHERE environment = $1 AND created_at < now() - make_interval(secs => $3)
                     AND id NOT IN (SELECT id FROM keep)
                   ORDER BY id LIMIT $4 FOR UPDATE SKIP LOCKED)
                 DELETE FROM {s}.virtual_environment_checkpoints c USING victims v
                 WHERE c.id = v.id RETURNING 1"
        );
        let mut after = String::new();
        loop {
            let environments: Vec<String> = sqlx::query_scalar(AssertSqlSafe(crowded.clone()))
                .bind(unsuffixed)
                .bind(&after)
                .bind(keep)
                .fetch_all(&mut *conn)
                .await?;
            let Some(last) = environments.last().cloned() else {
                break;
            };
            for environment in &environments {
                loop {
                    let removed = self
                        .run_batch(conn, report, |tx| {
                            Box::pin(
                                sqlx::query(AssertSqlSafe(prune.clone()))
                                    .bind(environment)
                                    .bind(keep)
                                    .bind(min_age)
                                    .bind(batch)
                                    .execute(tx),
                            )
                        })
                        .await?
                        .rows_affected() as i64;
                    report.checkpoints += removed as u64;
                    if removed < batch {
                        break;
                    }
                }
            }
            after = last;
        }
        Ok(())
    }

    /// Model versions no environment or checkpoint references, older than `version_grace`, with
    /// their intervals and physical relations (each released relation goes to `on_released`).
    async fn remove_unreferenced_model_versions(
        &self,
        conn: &mut PgConnection,
        options: &JanitorOptions,
        batch: i64,
        report: &mut JanitorReport,
        on_released: &mut (dyn FnMut(String) + Send),
    ) -> Result<(), Error> {
        let s = self.schema().quoted();
        let grace = options.version_grace.as_secs_f64();
        let versions = format!(
            "WITH victims AS (
               SELECT mv.id FROM {s}.model_versions mv
               WHERE mv.id > $1 AND mv.created_at < now() - make_interval(secs => $2)
                 AND NOT EXISTS (SELECT 1 FROM {s}.virtual_environment_refs r WHERE r.model_version_id = mv.id)
                 AND NOT EXISTS (SELECT 1 FROM {s}.virtual_environment_checkpoint_refs r WHERE r.model_version_id = mv.id)
               ORDER BY mv.id LIMIT $3 FOR UPDATE SKIP LOCKED),
             relations AS (
               DELETE FROM {s}.physical_relations p USING victims v
               WHERE p.model_version_id = v.id RETURNING p.relation_name),
             intervals AS (
               DELETE FROM {s}.model_version_intervals i USING victims v
               WHERE i.model_version_id = v.id RETURNING 1),
             versions AS (
               DELETE FROM {s}.model_versions m USING victims v WHERE m.id = v.id RETURNING m.id)
             SELECT (SELECT count(*) FROM versions) AS versions,
                    (SELECT max(id) FROM versions) AS last_id,
                    (SELECT count(*) FROM intervals) AS intervals,
                    ARRAY(SELECT relation_name FROM relations) AS relations"
        );
        let mut after = 0i64;
        loop {
            let row = self
                .run_batch(conn, report, |tx| {
                    Box::pin(
                        sqlx::query(AssertSqlSafe(versions.clone()))
                            .bind(after)
                            .bind(grace)
                            .bind(batch)
                            .fetch_one(tx),
                    )
                })
                .await?;
            let removed: i64 = row.try_get("versions")?;
            report.model_versions += removed as u64;
            report.intervals += row.try_get::<i64, _>("intervals")? as u64;
            let relations: Vec<String> = row.try_get("relations")?;
            report.physical_relations += relations.len() as u64;
            relations.into_iter().for_each(&mut *on_released);
            match row.try_get::<Option<i64>, _>("last_id")? {
                Some(last) if removed >= batch => after = last,
                _ => break,
            }
        }
        Ok(())
    }

    /// Function versions no environment or checkpoint references, older than `version_grace`.
    async fn remove_unreferenced_function_versions(
        &self,
        conn: &mut PgConnection,
        options: &JanitorOptions,
        batch: i64,
        report: &mut JanitorReport,
    ) -> Result<(), Error> {
        let s = self.schema().quoted();
        let grace = options.version_grace.as_secs_f64();
        let functions = format!(
            "WITH victims AS (
               SELECT fv.id FROM {s}.function_versions fv
               WHERE fv.id > $1 AND fv.created_at < now() - make_interval(secs => $2)
                 AND NOT EXISTS (SELECT 1 FROM {s}.virtual_environment_function_refs r WHERE r.function_version_id = fv.id)
                 AND NOT EXISTS (SELECT 1 FROM {s}.virtual_environment_checkpoint_function_refs r WHERE r.function_version_id = fv.id)
               ORDER BY fv.id LIMIT $3 FOR UPDATE SKIP LOCKED),
             removed AS (
               DELETE FROM {s}.function_versions f USING victims v WHERE f.id = v.id RETURNING f.id)
             SELECT count(*) AS removed, max(id) AS last_id FROM removed"
        );
        let mut after = 0i64;
        loop {
            let row = self
                .run_batch(conn, report, |tx| {
                    Box::pin(
                        sqlx::query(AssertSqlSafe(functions.clone()))
                            .bind(after)
                            .bind(grace)
                            .bind(batch)
                            .fetch_one(tx),
                    )
                })
                .await?;
            let removed: i64 = row.try_get("removed")?;
            report.function_versions += removed as u64;
            match row.try_get::<Option<i64>, _>("last_id")? {
                Some(last) if removed >= batch => after = last,
                _ => break,
            }
        }
        Ok(())
    }

    /// Runs one batch in its own transaction (a savepoint inside a dry run). A foreign-key
    /// violation means a writer referenced a row while we removed it: the batch rolls back and
    /// is evaluated again, so the writer's reference always wins.
    pub(crate) async fn run_batch<T>(
        &self,
        conn: &mut PgConnection,
        report: &mut JanitorReport,
        statement: impl for<'c> Fn(
            &'c mut PgConnection,
        ) -> futures::future::BoxFuture<'c, Result<T, sqlx::Error>>,
    ) -> Result<T, Error> {
        let mut attempt = 0;
        loop {
            let mut tx = conn.begin().await?;
            match statement(&mut tx).await {
                Ok(value) => {
                    super::failpoint::hit("janitor.before_commit");
                    tx.commit().await?;
                    super::failpoint::hit("janitor.committed");
                    report.batches += 1;
                    return Ok(value);
                }
                Err(sqlx::Error::Database(db))
                    if db.code().as_deref() == Some("23503") && attempt < RACE_RETRIES =>
                {
                    tx.rollback().await?;
                    attempt += 1;
                    report.retried_batches += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    async fn start_operation(
        &self,
        conn: &mut PgConnection,
        options: &JanitorOptions,
    ) -> Result<i64, Error> {
        let id = sqlx::query_scalar(AssertSqlSafe(format!(
            "INSERT INTO {}.state_operations (kind, status, details) VALUES ('janitor', 'running', $1) RETURNING id",
            self.schema().quoted()
        )))
        .bind(serde_json::json!({
            "expiredEnvironments": options.expired_environments,
            "keepCheckpoints": options.keep_checkpoints,
            "checkpointMinAgeSeconds": options.checkpoint_min_age.as_secs(),
            "versionGraceSeconds": options.version_grace.as_secs(),
            "batchSize": options.batch_size,
            "actor": self.actor(),
        }))
        .fetch_one(conn)
        .await?;
        Ok(id)
    }

    async fn finish_operation(
        &self,
        conn: &mut PgConnection,
        id: i64,
        status: &str,
        report: &JanitorReport,
        error: Option<&str>,
    ) -> Result<(), Error> {
        let s = self.schema().quoted();
        let mut details = serde_json::to_value(report).unwrap_or_default();
        details["durationMs"] = serde_json::json!(report.duration.as_millis() as u64);
        if let Some(error) = error {
            details["error"] = serde_json::json!(error);
        }
        let mut tx = conn.begin().await?;
        sqlx::query(AssertSqlSafe(format!(
            "UPDATE {s}.state_operations SET status = $2, finished_at = now(), details = details || $3 WHERE id = $1"
        )))
        .bind(id)
        .bind(status)
        .bind(&details)
        .execute(&mut *tx)
        .await?;
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {s}.state_operation_events (operation_id, kind, message) VALUES ($1, $2, $3)"
        )))
        .bind(id)
        .bind(format!("janitor_{status}"))
        .bind(match error {
            Some(error) => format!("janitor failed after removing {} rows: {error}", report.removed_rows()),
            None => format!("janitor {}", report.summary()),
        })
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }
}
