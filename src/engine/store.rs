//! The operations on one state store. Each mutating operation is one transaction holding the
//! store's advisory lock: it either completes or leaves the store exactly as it was.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::postgres::PgPool;
use sqlx::{AssertSqlSafe, PgConnection, Postgres, Row, Transaction};

use super::Error;
use super::backup::{self, BackupInfo};
use super::catalog;
use super::identifier::{SchemaName, quote_ident};
use super::migrations::MigrationChain;

/// First key of every statekeeper advisory lock; the second is derived from the schema name.
const LOCK_CLASS: i32 = 0x5354_4B50; // "STKP"
/// How long an operation waits for another one on the same store before reporting Busy.
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(30);

/// Tables whose row counts `status` reports.
pub const COUNTED_TABLES: &[&str] = &[
    "model_versions",
    "function_versions",
    "physical_relations",
    "model_version_intervals",
    "virtual_environments",
    "virtual_environment_refs",
    "virtual_environment_checkpoints",
    "locks",
    "state_operations",
    "plan_runs",
    "state_migration_events",
];

/// A state store: a pool, the schema it lives in, and the migration chain that defines it.
#[derive(Clone)]
pub struct Store {
    pool: PgPool,
    schema: SchemaName,
    chain: MigrationChain,
    actor: String,
    lock_timeout: Duration,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AppliedStep {
    pub version: i32,
    pub description: String,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AppliedVersion {
    pub version: i32,
    pub description: String,
    pub checksum: String,
    pub applied_at: DateTime<Utc>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InitReport {
    pub schema: String,
    /// True when the store was already initialised and nothing was done.
    pub already_initialized: bool,
    pub from_version: i32,
    pub to_version: i32,
    pub applied: Vec<AppliedStep>,
    pub duration_ms: u64,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusReport {
    pub schema: String,
    pub initialized: bool,
    /// 0 when not initialised.
    pub current_version: i32,
    pub latest_version: i32,
    pub applied: Vec<AppliedVersion>,
    pub pending: Vec<AppliedStep>,
    pub counts: BTreeMap<String, i64>,
    pub backups: Vec<BackupInfo>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UpgradeReport {
    pub schema: String,
    pub from_version: i32,
    pub to_version: i32,
    pub applied: Vec<AppliedStep>,
    /// The backup taken before the first step; none when there was nothing to apply.
    pub backup: Option<BackupInfo>,
    pub duration_ms: u64,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RollbackReport {
    pub schema: String,
    pub restored_backup: BackupInfo,
    pub from_version: i32,
    pub to_version: i32,
    /// The backup of the state that the rollback replaced, so a rollback can itself be undone.
    pub pre_rollback_backup: Option<BackupInfo>,
    pub rows_restored: i64,
    pub duration_ms: u64,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ResetReport {
    pub schema: String,
    pub from_version: i32,
    pub tables_dropped: usize,
    /// The backup of the state that the reset removed; `rollback` restores it.
    pub backup: Option<BackupInfo>,
    pub duration_ms: u64,
}

/// Reset needs two independent yeses: the store allows it, and this request is approved.
#[derive(Clone, Copy, Debug, Default)]
pub struct ResetApproval {
    pub allow_reset: bool,
    pub approved: bool,
}

fn elapsed_ms(started: Instant) -> u64 {
    started.elapsed().as_millis() as u64
}

impl Store {
    pub fn new(pool: PgPool, schema: SchemaName) -> Self {
        Self {
            pool,
            schema,
            chain: MigrationChain::shipped(),
            actor: "statekeeper".into(),
            lock_timeout: DEFAULT_LOCK_TIMEOUT,
        }
    }

    pub fn with_chain(mut self, chain: MigrationChain) -> Self {
        self.chain = chain;
        self
    }

    /// Who is acting, recorded in the history tables (`cli`, `operator:ns/name`).
    pub fn with_actor(mut self, actor: impl Into<String>) -> Self {
        self.actor = actor.into();
        self
    }

    pub fn with_lock_timeout(mut self, timeout: Duration) -> Self {
        self.lock_timeout = timeout;
        self
    }

    pub fn schema(&self) -> &SchemaName {
        &self.schema
    }

    pub(crate) fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub(crate) fn actor(&self) -> &str {
        &self.actor
    }

    pub fn latest_version(&self) -> i32 {
        self.chain.latest()
    }

    /// Creates the schema and applies every step (or up to `target`) on a store that has none.
    /// On an initialised store it only verifies the recorded steps and changes nothing: moving
    /// an existing store forward is `upgrade`, which backs it up first.
    pub async fn init(&self, target: Option<i32>) -> Result<InitReport, Error> {
        let started = Instant::now();
        let target = self.resolve_target(target)?;
        let mut tx = self.begin_locked().await?;
        let current = self.verified_version(&mut tx).await?;
        if let Some(current) = current {
            return Ok(InitReport {
                schema: self.schema.to_string(),
                already_initialized: true,
                from_version: current,
                to_version: current,
                applied: Vec::new(),
                duration_ms: elapsed_ms(started),
            });
        }
        self.ensure_schema(&mut tx).await?;
        self.create_ledger(&mut tx).await?;
        let applied = self.apply_steps(&mut tx, 0, target).await?;
        self.record_event(&mut tx, "init", 0, target, None, serde_json::json!({}))
            .await?;
        tx.commit().await?;
        Ok(InitReport {
            schema: self.schema.to_string(),
            already_initialized: false,
            from_version: 0,
            to_version: target,
            applied,
            duration_ms: elapsed_ms(started),
        })
    }

    /// Reads the store without locking it. Fails when the recorded steps do not match this
    /// binary (newer schema, changed checksum), because every other answer would be a guess.
    pub async fn status(&self) -> Result<StatusReport, Error> {
        let mut conn = self.pool.acquire().await?;
        let ledger = self.read_ledger(&mut conn).await?;
        let current = match &ledger {
            Some(rows) => Some(self.verify_ledger(rows)?),
            None => None,
        };
        let current_version = current.unwrap_or(0);
        let mut counts = BTreeMap::new();
        if current.is_some() {
            let present = catalog::tables(&mut conn, self.schema.as_str()).await?;
            let selects: Vec<String> = COUNTED_TABLES
                .iter()
                .filter(|t| present.iter().any(|p| p == *t))
                .map(|t| {
                    format!(
                        "SELECT '{t}'::text AS name, count(*) AS n FROM {}.{}",
                        self.schema.quoted(),
                        quote_ident(t)
                    )
                })
                .collect();
            if !selects.is_empty() {
                let rows = sqlx::query(AssertSqlSafe(selects.join(" UNION ALL ")))
                    .fetch_all(&mut *conn)
                    .await?;
                for row in rows {
                    counts.insert(row.try_get("name")?, row.try_get("n")?);
                }
            }
        }
        let backups = backup::list(&mut conn, &self.schema).await?;
        Ok(StatusReport {
            schema: self.schema.to_string(),
            initialized: current.is_some(),
            current_version,
            latest_version: self.chain.latest(),
            applied: ledger.unwrap_or_default(),
            pending: self
                .chain
                .between(current_version, self.chain.latest())
                .map(|m| AppliedStep {
                    version: m.version,
                    description: m.description.into(),
                })
                .collect(),
            counts,
            backups,
        })
    }

    /// Backs up every state table, then applies the steps up to `target` (default: latest).
    pub async fn upgrade(&self, target: Option<i32>) -> Result<UpgradeReport, Error> {
        let started = Instant::now();
        let target = self.resolve_target(target)?;
        let mut tx = self.begin_locked().await?;
        let current = self.require_initialized(&mut tx).await?;
        if target < current {
            return Err(Error::DowngradeRefused { target, current });
        }
        if target == current {
            return Ok(UpgradeReport {
                schema: self.schema.to_string(),
                from_version: current,
                to_version: current,
                applied: Vec::new(),
                backup: None,
                duration_ms: elapsed_ms(started),
            });
        }
        let backup = backup::create(&mut tx, &self.schema, current, "pre-upgrade").await?;
        let applied = self.apply_steps(&mut tx, current, target).await?;
        self.record_event(
            &mut tx,
            "upgrade",
            current,
            target,
            Some(&backup.id),
            serde_json::json!({ "applied": applied }),
        )
        .await?;
        tx.commit().await?;
        Ok(UpgradeReport {
            schema: self.schema.to_string(),
            from_version: current,
            to_version: target,
            applied,
            backup: Some(backup),
            duration_ms: elapsed_ms(started),
        })
    }

    /// Replaces the store with a backup (the newest, or the one named). The replaced state is
    /// itself backed up first; the migration history recorded since the backup is kept.
    pub async fn rollback(&self, backup_id: Option<&str>) -> Result<RollbackReport, Error> {
        let started = Instant::now();
        let mut tx = self.begin_locked().await?;
        let restored = backup::find(&mut tx, &self.schema, backup_id).await?;
        self.check_backup_compatible(&mut tx, &restored).await?;
        let current = self.verified_version(&mut tx).await?;
        let pre_rollback_backup = self
            .backup_if_initialized(&mut tx, current, "pre-rollback")
            .await?;
        let carried_events = self.carry_migration_events(&mut tx).await?;
        self.drop_state_tables(&mut tx).await?;

        // Rebuild the exact schema of the backup's version, then load its rows.
        self.ensure_schema(&mut tx).await?;
        self.create_ledger(&mut tx).await?;
        for step in self.chain.between(0, restored.schema_version) {
            self.run_step_sql(&mut tx, step.version).await?;
        }
        sqlx::query("SET CONSTRAINTS ALL DEFERRED")
            .execute(&mut *tx)
            .await?;
        let backup_schema = self.schema.backup_schema(&restored.id);
        let mut rows_restored = 0i64;
        for table in catalog::tables(&mut tx, &backup_schema).await? {
            if table == backup::BACKUP_METADATA_TABLE {
                continue;
            }
            if !catalog::table_exists(&mut tx, self.schema.as_str(), &table).await? {
                return Err(Error::IncompatibleBackup {
                    id: restored.id.clone(),
                    reason: format!(
                        "it holds table \"{table}\" that schema version {} does not define",
                        restored.schema_version
                    ),
                });
            }
            let columns = catalog::column_list(&mut tx, &backup_schema, &table).await?;
            let loaded = sqlx::query(AssertSqlSafe(format!(
                "INSERT INTO {store}.{t} ({columns}) OVERRIDING SYSTEM VALUE SELECT {columns} FROM {backup}.{t}",
                store = self.schema.quoted(),
                backup = quote_ident(&backup_schema),
                t = quote_ident(&table),
            )))
            .execute(&mut *tx)
            .await?;
            rows_restored += loaded.rows_affected() as i64;
        }
        if carried_events
            && catalog::table_exists(&mut tx, self.schema.as_str(), "state_migration_events")
                .await?
        {
            let columns =
                catalog::column_list(&mut tx, self.schema.as_str(), "state_migration_events")
                    .await?;
            sqlx::query(AssertSqlSafe(format!(
                "INSERT INTO {store}.state_migration_events ({columns}) OVERRIDING SYSTEM VALUE \
                 SELECT {columns} FROM pg_temp.statekeeper_carried_events c \
                 WHERE NOT EXISTS (SELECT 1 FROM {store}.state_migration_events e WHERE e.id = c.id)",
                store = self.schema.quoted()
            )))
            .execute(&mut *tx)
            .await?;
        }
        catalog::resync_identities(&mut tx, self.schema.as_str()).await?;
        let from_version = current.unwrap_or(0);
        self.record_event(
            &mut tx,
            "rollback",
            from_version,
            restored.schema_version,
            Some(&restored.id),
            serde_json::json!({
                "preRollbackBackup": pre_rollback_backup.as_ref().map(|b| b.id.clone()),
                "rowsRestored": rows_restored,
            }),
        )
        .await?;
        tx.commit().await?;
        Ok(RollbackReport {
            schema: self.schema.to_string(),
            from_version,
            to_version: restored.schema_version,
            restored_backup: restored,
            pre_rollback_backup,
            rows_restored,
            duration_ms: elapsed_ms(started),
        })
    }

    /// Drops every state table. Refused unless both the store and the request say yes; the
    /// dropped state is kept in a backup that `rollback` restores.
    pub async fn reset(&self, approval: ResetApproval) -> Result<ResetReport, Error> {
        if !approval.allow_reset {
            return Err(Error::ResetRefused(
                "this store does not allow reset (set allowReset: true on the StateStore, or pass \
                 --allow-reset to the CLI)"
                    .into(),
            ));
        }
        if !approval.approved {
            return Err(Error::ResetRefused(
                "the reset was not approved (pass --auto-approve to the CLI, or set \
                 approveReset: true on the StateMigration)"
                    .into(),
            ));
        }
        let started = Instant::now();
        let mut tx = self.begin_locked().await?;
        let current = self.verified_version(&mut tx).await?;
        let backup = self
            .backup_if_initialized(&mut tx, current, "pre-reset")
            .await?;
        let tables_dropped = self.drop_state_tables(&mut tx).await?;
        tx.commit().await?;
        Ok(ResetReport {
            schema: self.schema.to_string(),
            from_version: current.unwrap_or(0),
            tables_dropped,
            backup,
            duration_ms: elapsed_ms(started),
        })
    }

    pub async fn backups(&self) -> Result<Vec<BackupInfo>, Error> {
        let mut conn = self.pool.acquire().await?;
        backup::list(&mut conn, &self.schema).await
    }

    pub async fn drop_backup(&self, id: &str) -> Result<BackupInfo, Error> {
        let mut tx = self.begin_locked().await?;
        let info = backup::find(&mut tx, &self.schema, Some(id)).await?;
        backup::drop(&mut tx, &self.schema, &info.id).await?;
        tx.commit().await?;
        Ok(info)
    }

    fn resolve_target(&self, target: Option<i32>) -> Result<i32, Error> {
        let latest = self.chain.latest();
        match target {
            None => Ok(latest),
            Some(t) if (1..=latest).contains(&t) => Ok(t),
            Some(t) => Err(Error::UnknownTargetVersion { target: t, latest }),
        }
    }

    /// Begins a transaction and takes the store's advisory lock, waiting at most `lock_timeout`.
    pub(crate) async fn begin_locked(&self) -> Result<Transaction<'static, Postgres>, Error> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(AssertSqlSafe(format!(
            "SET LOCAL lock_timeout = {}",
            self.lock_timeout.as_millis()
        )))
        .execute(&mut *tx)
        .await?;
        let locked = sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2))")
            .bind(LOCK_CLASS)
            .bind(self.schema.as_str())
            .execute(&mut *tx)
            .await;
        match locked {
            Ok(_) => {}
            Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("55P03") => {
                return Err(Error::Busy {
                    schema: self.schema.to_string(),
                    waited: self.lock_timeout,
                });
            }
            Err(e) => return Err(e.into()),
        }
        // Operations may legitimately wait on row locks held by writers; only the store lock is bounded.
        sqlx::query("SET LOCAL lock_timeout = 0")
            .execute(&mut *tx)
            .await?;
        Ok(tx)
    }

    /// Takes the store's lock for a whole session (operations made of many transactions).
    /// The same key as `begin_locked`, so the two exclude each other.
    pub(crate) async fn lock_session(&self, conn: &mut PgConnection) -> Result<(), Error> {
        sqlx::query(AssertSqlSafe(format!(
            "SET lock_timeout = {}",
            self.lock_timeout.as_millis()
        )))
        .execute(&mut *conn)
        .await?;
        let locked = sqlx::query("SELECT pg_advisory_lock($1, hashtext($2))")
            .bind(LOCK_CLASS)
            .bind(self.schema.as_str())
            .execute(&mut *conn)
            .await;
        sqlx::query("RESET lock_timeout")
            .execute(&mut *conn)
            .await?;
        match locked {
            Ok(_) => Ok(()),
            Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("55P03") => {
                Err(Error::Busy {
                    schema: self.schema.to_string(),
                    waited: self.lock_timeout,
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    pub(crate) async fn unlock_session(&self, conn: &mut PgConnection) -> Result<(), Error> {
        sqlx::query("SELECT pg_advisory_unlock($1, hashtext($2))")
            .bind(LOCK_CLASS)
            .bind(self.schema.as_str())
            .execute(conn)
            .await?;
        Ok(())
    }

    /// The verified current version, refusing stores older than `required`.
    pub(crate) async fn require_version(
        &self,
        conn: &mut PgConnection,
        required: i32,
        operation: &str,
    ) -> Result<i32, Error> {
        let current = self.require_initialized(conn).await?;
        if current < required {
            return Err(Error::SchemaTooOld {
                schema: self.schema.to_string(),
                current,
                required,
                operation: operation.to_owned(),
            });
        }
        Ok(current)
    }

    async fn read_ledger(
        &self,
        conn: &mut PgConnection,
    ) -> Result<Option<Vec<AppliedVersion>>, Error> {
        if !catalog::table_exists(conn, self.schema.as_str(), "state_versions").await? {
            return Ok(None);
        }
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT version, checksum, description, applied_at FROM {}.state_versions ORDER BY version",
            self.schema.quoted()
        )))
        .fetch_all(conn)
        .await?;
        let applied = rows
            .iter()
            .map(|r| {
                Ok(AppliedVersion {
                    version: r.try_get("version")?,
                    checksum: r.try_get("checksum")?,
                    description: r.try_get("description")?,
                    applied_at: r.try_get("applied_at")?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        Ok(Some(applied))
    }

    /// The current version, after checking every recorded step against this binary.
    fn verify_ledger(&self, applied: &[AppliedVersion]) -> Result<i32, Error> {
        let latest = self.chain.latest();
        let current = applied.iter().map(|a| a.version).max().unwrap_or(0);
        if current > latest {
            return Err(Error::SchemaNewer {
                schema: self.schema.to_string(),
                current,
                latest,
            });
        }
        for recorded in applied {
            if let Some(step) = self.chain.get(recorded.version) {
                let shipped = step.checksum();
                if shipped != recorded.checksum {
                    return Err(Error::ChecksumMismatch {
                        version: recorded.version,
                        recorded: recorded.checksum.clone(),
                        shipped,
                    });
                }
            }
        }
        Ok(current)
    }

    /// `None` when the store has no ledger (never initialised, or reset).
    async fn verified_version(&self, conn: &mut PgConnection) -> Result<Option<i32>, Error> {
        match self.read_ledger(conn).await? {
            Some(rows) if !rows.is_empty() => Ok(Some(self.verify_ledger(&rows)?)),
            _ => Ok(None),
        }
    }

    async fn require_initialized(&self, conn: &mut PgConnection) -> Result<i32, Error> {
        self.verified_version(conn)
            .await?
            .ok_or_else(|| Error::NotInitialized {
                schema: self.schema.to_string(),
            })
    }

    /// Backs up the store when it has a ledger; a store without one has nothing to keep.
    async fn backup_if_initialized(
        &self,
        conn: &mut PgConnection,
        current: Option<i32>,
        reason: &str,
    ) -> Result<Option<BackupInfo>, Error> {
        match current {
            Some(version) => Ok(Some(
                backup::create(conn, &self.schema, version, reason).await?,
            )),
            None => Ok(None),
        }
    }

    async fn ensure_schema(&self, conn: &mut PgConnection) -> Result<(), Error> {
        sqlx::query(AssertSqlSafe(format!(
            "CREATE SCHEMA IF NOT EXISTS {}",
            self.schema.quoted()
        )))
        .execute(conn)
        .await?;
        Ok(())
    }

    async fn create_ledger(&self, conn: &mut PgConnection) -> Result<(), Error> {
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TABLE IF NOT EXISTS {}.state_versions (\
               version integer PRIMARY KEY, checksum text NOT NULL, description text NOT NULL, \
               applied_at timestamptz NOT NULL DEFAULT now())",
            self.schema.quoted()
        )))
        .execute(conn)
        .await?;
        Ok(())
    }

    async fn run_step_sql(&self, conn: &mut PgConnection, version: i32) -> Result<(), Error> {
        let step = self.chain.get(version).ok_or(Error::UnknownTargetVersion {
            target: version,
            latest: self.chain.latest(),
        })?;
        sqlx::query(AssertSqlSafe(format!(
            "SET LOCAL search_path TO {}",
            self.schema.quoted()
        )))
        .execute(&mut *conn)
        .await?;
        let result = sqlx::raw_sql(AssertSqlSafe(step.sql))
            .execute(&mut *conn)
            .await;
        // Restore the default path even when the step failed, for clear later errors.
        let _ = sqlx::query("SET LOCAL search_path TO DEFAULT")
            .execute(&mut *conn)
            .await;
        result.map_err(|source| Error::MigrationFailed {
            version: step.version,
            description: step.description.into(),
            source,
        })?;
        Ok(())
    }

    async fn apply_steps(
        &self,
        conn: &mut PgConnection,
        from: i32,
        to: i32,
    ) -> Result<Vec<AppliedStep>, Error> {
        let mut applied = Vec::new();
        for step in self.chain.between(from, to) {
            self.run_step_sql(conn, step.version).await?;
            sqlx::query(AssertSqlSafe(format!(
                "INSERT INTO {}.state_versions (version, checksum, description) VALUES ($1, $2, $3)",
                self.schema.quoted()
            )))
            .bind(step.version)
            .bind(step.checksum())
            .bind(step.description)
            .execute(&mut *conn)
            .await?;
            applied.push(AppliedStep {
                version: step.version,
                description: step.description.into(),
            });
        }
        Ok(applied)
    }

    /// Appends to `state_migration_events` when the store's version has that table.
    async fn record_event(
        &self,
        conn: &mut PgConnection,
        operation: &str,
        from: i32,
        to: i32,
        backup_id: Option<&str>,
        details: serde_json::Value,
    ) -> Result<(), Error> {
        if !catalog::table_exists(conn, self.schema.as_str(), "state_migration_events").await? {
            return Ok(());
        }
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {}.state_migration_events (operation, from_version, to_version, backup_id, actor, details) \
             VALUES ($1, $2, $3, $4, $5, $6)",
            self.schema.quoted()
        )))
        .bind(operation)
        .bind(from)
        .bind(to)
        .bind(backup_id)
        .bind(&self.actor)
        .bind(details)
        .execute(conn)
        .await?;
        Ok(())
    }

    /// Refuses backups taken by a statekeeper whose steps differ from this one's.
    async fn check_backup_compatible(
        &self,
        conn: &mut PgConnection,
        restored: &BackupInfo,
    ) -> Result<(), Error> {
        let incompatible = |reason: String| Error::IncompatibleBackup {
            id: restored.id.clone(),
            reason,
        };
        if restored.schema_version > self.chain.latest() {
            return Err(incompatible(format!(
                "it is at schema version {}, newer than {} that this statekeeper knows",
                restored.schema_version,
                self.chain.latest()
            )));
        }
        for (version, checksum) in
            backup::recorded_versions(conn, &self.schema, &restored.id).await?
        {
            match self.chain.get(version) {
                Some(step) if step.checksum() == checksum => {}
                _ => {
                    return Err(incompatible(format!(
                        "its migration {version} does not match the one this statekeeper ships"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Keeps the migration history across a rollback; returns whether there was any to keep.
    async fn carry_migration_events(&self, conn: &mut PgConnection) -> Result<bool, Error> {
        if !catalog::table_exists(conn, self.schema.as_str(), "state_migration_events").await? {
            return Ok(false);
        }
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TEMP TABLE statekeeper_carried_events ON COMMIT DROP AS TABLE {}.state_migration_events",
            self.schema.quoted()
        )))
        .execute(conn)
        .await?;
        Ok(true)
    }

    async fn drop_state_tables(&self, conn: &mut PgConnection) -> Result<usize, Error> {
        let tables = catalog::tables(conn, self.schema.as_str()).await?;
        if tables.is_empty() {
            return Ok(0);
        }
        let list = tables
            .iter()
            .map(|t| format!("{}.{}", self.schema.quoted(), quote_ident(t)))
            .collect::<Vec<_>>()
            .join(", ");
        sqlx::query(AssertSqlSafe(format!("DROP TABLE {list} CASCADE")))
            .execute(conn)
            .await?;
        Ok(tables.len())
    }
}
