//! A state store's handle and core: a pool, the schema it lives in and the framework whose state
//! it holds, with the transactions and locks every operation takes. The operations themselves are
//! above it (`lifecycle.rs`, `export.rs`, `import.rs`, `janitor.rs`, `plan.rs`, `run.rs`).
//!
//! Every operation that writes is one transaction holding the store's advisory lock (and, for a
//! framework that does not take that lock, locks on its tables): it either completes or leaves the
//! store exactly as it was.

use std::time::{Duration, Instant};

use sqlx::postgres::PgPool;
use sqlx::{AssertSqlSafe, PgConnection, Postgres, Transaction};

use super::Error;
use super::backup::{self, BackupInfo, BackupSource};
use super::catalog;
use super::framework::{Framework, Profile, StoreVersion, TableSet};
use super::identifier::{SchemaName, qualified_list, quote_literal};
use super::migrations::MigrationChain;

/// First key of every statekeeper advisory lock; the second is derived from the schema name.
const LOCK_CLASS: i32 = 0x5354_4B50; // "STKP"
/// How long an operation waits for another one on the same store before reporting Busy.
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(30);

/// How long [`Store::backed_up_change`] waits for a second connection and its locks before it
/// backs up on the operation's own connection instead.
const SIDE_CONNECTION_WAIT: Duration = Duration::from_secs(2);

/// The table locks of an operation that changes the store, beside its advisory lock.
#[derive(Clone, Copy, Debug)]
pub(crate) enum TableLock {
    /// ACCESS EXCLUSIVE: for operations that replace rows (TRUNCATE is not MVCC-safe, so a
    /// reader must not hold a snapshot across it).
    ReadersWait,
    /// EXCLUSIVE: readers go on and see the store as it was until the operation commits.
    WritersWait,
    /// ACCESS SHARE: a reader's, which only the first kind waits for.
    Shared,
}

impl TableLock {
    fn mode(self) -> &'static str {
        match self {
            TableLock::ReadersWait => "ACCESS EXCLUSIVE",
            TableLock::WritersWait => "EXCLUSIVE",
            TableLock::Shared => "ACCESS SHARE",
        }
    }
}

/// Makes `tx`, a transaction just begun, read the snapshot another transaction exported
/// (`pg_export_snapshot`): a second connection sees exactly what the first one sees.
pub(crate) async fn read_snapshot(tx: &mut PgConnection, snapshot: &str) -> Result<(), Error> {
    sqlx::raw_sql(AssertSqlSafe(format!(
        "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ; SET TRANSACTION SNAPSHOT {}",
        quote_literal(snapshot)
    )))
    .execute(tx)
    .await?;
    Ok(())
}

/// A state store of one framework in one schema.
#[derive(Clone)]
pub struct Store {
    pool: PgPool,
    schema: SchemaName,
    framework: Framework,
    chain: MigrationChain,
    actor: String,
    lock_timeout: Duration,
    /// Whether operations that change the store back it up first (the default).
    backup_before_change: bool,
    /// Recorded in the backups this handle makes, so that a caller can tell after a crash whether
    /// its operation committed (the tag commits with it).
    operation_id: Option<String>,
    /// Whether this store may be created in a database that holds another framework's store.
    beside_other_frameworks: bool,
}

pub(crate) fn elapsed_ms(started: Instant) -> u64 {
    started.elapsed().as_millis() as u64
}

impl Store {
    /// A store of statekeeper's own schema; see [`Store::with_framework`].
    pub fn new(pool: PgPool, schema: SchemaName) -> Self {
        Self {
            pool,
            schema,
            framework: Framework::Statekeeper,
            chain: MigrationChain::shipped(),
            actor: "statekeeper".into(),
            lock_timeout: DEFAULT_LOCK_TIMEOUT,
            backup_before_change: true,
            operation_id: None,
            beside_other_frameworks: false,
        }
    }

    /// Lets `init` create statekeeper's schema in a database that holds another framework's
    /// state store (and status report this store missing instead of naming the other one).
    pub fn beside_other_frameworks(mut self, allowed: bool) -> Self {
        self.beside_other_frameworks = allowed;
        self
    }

    pub fn with_framework(mut self, framework: Framework) -> Self {
        self.framework = framework;
        self
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

    /// Whether rollback, reset, import, upgrade and copy back the store up first (default yes).
    pub fn with_backup_before_change(mut self, enabled: bool) -> Self {
        self.backup_before_change = enabled;
        self
    }

    /// Tags the backups this handle makes with the id of the request they belong to.
    pub fn with_operation_id(mut self, id: impl Into<String>) -> Self {
        self.operation_id = Some(id.into());
        self
    }

    pub fn with_lock_timeout(mut self, timeout: Duration) -> Self {
        self.lock_timeout = timeout;
        self
    }

    pub fn schema(&self) -> &SchemaName {
        &self.schema
    }

    pub fn framework(&self) -> Framework {
        self.framework
    }

    pub fn profile(&self) -> &'static Profile {
        self.framework.profile()
    }

    /// Whether this handle may act where the database holds another framework's store.
    pub(crate) fn allows_other_frameworks(&self) -> bool {
        self.beside_other_frameworks
    }

    pub(crate) fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub(crate) fn actor(&self) -> &str {
        &self.actor
    }

    pub(crate) fn chain(&self) -> &MigrationChain {
        &self.chain
    }

    /// The latest schema version this statekeeper ships for its own schema.
    pub fn latest_version(&self) -> i32 {
        self.chain.latest()
    }

    /// The tables of the store that exist now, by name.
    pub(crate) async fn tables(&self, conn: &mut PgConnection) -> Result<Vec<String>, Error> {
        match &self.profile().tables {
            TableSet::WholeSchema => catalog::tables(conn, self.schema.as_str()).await,
            TableSet::Named { tables, .. } => {
                catalog::existing_tables(conn, self.schema.as_str(), tables).await
            }
        }
    }

    /// The backup an operation that changes the store makes first, unless backups before changes
    /// are turned off for this handle.
    pub(crate) async fn backup_before_change(
        &self,
        conn: &mut PgConnection,
        version: &StoreVersion,
        reason: &str,
    ) -> Result<Option<BackupInfo>, Error> {
        if !self.backup_before_change {
            return Ok(None);
        }
        let backup = self.create_backup(conn, version, reason).await?;
        super::failpoint::hit("backup.made");
        Ok(Some(backup))
    }

    /// A backup of every table of the store, in the caller's transaction.
    pub(crate) async fn create_backup(
        &self,
        conn: &mut PgConnection,
        version: &StoreVersion,
        reason: &str,
    ) -> Result<BackupInfo, Error> {
        let tables = self.tables(conn).await?;
        let source = self.backup_source(version, &tables, self.operation_id.as_deref());
        backup::create(conn, &source, reason).await
    }

    fn backup_source<'a>(
        &'a self,
        version: &'a StoreVersion,
        tables: &'a [String],
        operation: Option<&'a str>,
    ) -> BackupSource<'a> {
        BackupSource {
            schema: &self.schema,
            framework: self.framework,
            version,
            tables,
            operation,
            with_indexes: !self.profile().owns_schema,
        }
    }

    /// A REPEATABLE READ transaction: every read in it sees the store at one instant, whatever
    /// writers (statekeeper's or the framework's own) do meanwhile. Its first statement takes
    /// shared locks on every table of the store, so the snapshot is taken after them: an
    /// operation that replaces the store's rows (it locks them exclusively, in the same order)
    /// is wholly before it or waits for it. Without them, a snapshot taken before a TRUNCATE
    /// commits reads the emptied tables (TRUNCATE is not MVCC-safe), and reading tables in
    /// another order than the operation locks them can deadlock.
    pub(crate) async fn begin_snapshot(&self) -> Result<Transaction<'static, Postgres>, Error> {
        let mut relisted = 0;
        loop {
            // Listed before the transaction (its first query takes the snapshot), on the
            // connection it then runs on: one just dropped goes back to the pool on a task of its
            // own, and asking the pool before that task ran opened a second connection.
            let mut conn = self.pool.acquire().await?;
            let tables = self.tables(&mut conn).await?;
            let mut tx = sqlx::Transaction::begin(conn, None).await?;
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                .execute(&mut *tx)
                .await?;
            if tables.is_empty() {
                return Ok(tx);
            }
            let locked = sqlx::query(AssertSqlSafe(
                self.lock_statement(&tables, TableLock::Shared),
            ))
            .execute(&mut *tx)
            .await;
            match locked {
                Ok(_) => return Ok(tx),
                // A table dropped since it was listed (a reset, a rollback rebuilding tables).
                Err(sqlx::Error::Database(db))
                    if db.code().as_deref() == Some("42P01") && relisted < 3 =>
                {
                    relisted += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Begins a transaction holding the store's advisory lock, waiting at most `lock_timeout`.
    pub(crate) async fn begin_locked(&self) -> Result<Transaction<'static, Postgres>, Error> {
        let mut tx = self.pool.begin().await?;
        self.take_advisory_lock(&mut tx).await?;
        Ok(tx)
    }

    /// Begins a transaction for an operation that replaces the store's rows: the advisory lock,
    /// and exclusive locks on its tables (writers that do not take the advisory lock — a
    /// framework's, or anything writing to statekeeper's schema — wait for the operation, or it
    /// fails with `StoreBusy`, and never interleave).
    pub(crate) async fn begin_write(&self) -> Result<Transaction<'static, Postgres>, Error> {
        let mut tx = self.begin_locked().await?;
        self.lock_tables(&mut tx, TableLock::ReadersWait).await?;
        Ok(tx)
    }

    /// Locks on the store's tables, in the order [`Store::begin_snapshot`] takes its shared
    /// ones, so that the two never deadlock.
    pub(crate) async fn lock_tables(
        &self,
        conn: &mut PgConnection,
        lock: TableLock,
    ) -> Result<(), Error> {
        let tables = self.tables(conn).await?;
        if tables.is_empty() {
            return Ok(());
        }
        self.bounded(conn, &self.lock_statement(&tables, lock))
            .await
    }

    fn lock_statement(&self, tables: &[String], lock: TableLock) -> String {
        format!(
            "LOCK TABLE {} IN {} MODE",
            qualified_list(self.schema.as_str(), tables),
            lock.mode()
        )
    }

    /// Runs `change` in `conn`'s transaction (which holds the advisory lock and
    /// [`TableLock::WritersWait`]) and backs the store up first, as `backup_before_change` does,
    /// but on a second connection at the same time: the backup reads the snapshot `conn` exports
    /// before `change` starts, so it holds exactly the rows `change` begins from, and an upgrade
    /// costs about the larger of the copy and its steps instead of their sum.
    ///
    /// The backup commits on its own, untagged; `conn`'s transaction tags it with the operation
    /// id, so the tag still commits with the change (see [`Store::backup_of_operation`]). A change
    /// that fails drops the backup; a crash before the change commits leaves it, a whole backup
    /// of the unchanged store. Without a spare connection in the pool, or when the second
    /// connection cannot lock the tables at once, the backup is made in `conn`'s transaction.
    pub(crate) async fn backed_up_change<T>(
        &self,
        conn: &mut PgConnection,
        version: &StoreVersion,
        reason: &str,
        change: impl AsyncFnOnce(&mut PgConnection) -> Result<T, Error>,
    ) -> Result<(Option<BackupInfo>, T), Error> {
        if !self.backup_before_change {
            return Ok((None, change(conn).await?));
        }
        let change = match self.spare_connection().await {
            Some(side) => {
                let tables = self.tables(conn).await?;
                let snapshot: String = sqlx::query_scalar("SELECT pg_export_snapshot()")
                    .fetch_one(&mut *conn)
                    .await?;
                // The copy is the longer half: the change's index builds leave it the other core.
                sqlx::query("SET LOCAL max_parallel_maintenance_workers = 0")
                    .execute(&mut *conn)
                    .await?;
                let (locked, copying) = tokio::sync::oneshot::channel();
                let (backup, changed) = tokio::join!(
                    self.backup_from_snapshot(side, &snapshot, &tables, version, reason, locked),
                    async {
                        match copying.await {
                            Ok(()) => Ok(change(&mut *conn).await),
                            Err(_) => Err(change),
                        }
                    }
                );
                match (backup, changed) {
                    (Ok(mut backup), Ok(Ok(value))) => {
                        if let Some(operation) = &self.operation_id {
                            let tagged =
                                backup::tag_operation(conn, &self.schema, &backup.id, operation)
                                    .await;
                            if let Err(e) = tagged {
                                self.discard_backup(&backup.id).await;
                                return Err(e);
                            }
                            backup.operation = Some(operation.clone());
                        }
                        return Ok((Some(backup), value));
                    }
                    (Ok(backup), Ok(Err(e))) => {
                        self.discard_backup(&backup.id).await;
                        return Err(e);
                    }
                    (Err(e), Ok(_)) => return Err(e),
                    // The second connection could not start its copy: one connection does both.
                    (backup, Err(change)) => {
                        match backup {
                            Ok(backup) => self.discard_backup(&backup.id).await,
                            Err(e) => tracing::debug!(
                                schema = %self.schema,
                                error = %e,
                                "backing up on the operation's own connection"
                            ),
                        }
                        change
                    }
                }
            }
            None => change,
        };
        let backup = self.backup_before_change(conn, version, reason).await?;
        Ok((backup, change(conn).await?))
    }

    /// A pooled connection that is free now or can be opened, without waiting on other callers.
    pub(crate) async fn spare_connection(&self) -> Option<sqlx::pool::PoolConnection<Postgres>> {
        if let Some(idle) = self.pool.try_acquire() {
            return Some(idle);
        }
        if self.pool.size() >= self.pool.options().get_max_connections() {
            return None;
        }
        tokio::time::timeout(SIDE_CONNECTION_WAIT, self.pool.acquire())
            .await
            .ok()?
            .ok()
    }

    /// The backup half of [`Store::backed_up_change`]: imports the snapshot, takes shared locks
    /// (granted at once beside [`TableLock::WritersWait`], unless someone queues for an exclusive
    /// one), says so on `locked`, copies and commits.
    async fn backup_from_snapshot(
        &self,
        mut conn: sqlx::pool::PoolConnection<Postgres>,
        snapshot: &str,
        tables: &[String],
        version: &StoreVersion,
        reason: &str,
        locked: tokio::sync::oneshot::Sender<()>,
    ) -> Result<BackupInfo, Error> {
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        let made = async {
            read_snapshot(&mut tx, snapshot).await?;
            self.bounded_by(
                &mut tx,
                &self.lock_statement(tables, TableLock::Shared),
                SIDE_CONNECTION_WAIT.min(self.lock_timeout),
            )
            .await?;
            let _ = locked.send(());
            let source = self.backup_source(version, tables, None);
            let backup = backup::create(&mut tx, &source, reason).await?;
            super::failpoint::hit("backup.made");
            Ok(backup)
        }
        .await;
        match made {
            Ok(backup) => {
                tx.commit().await?;
                super::failpoint::hit("backup.committed_alongside");
                Ok(backup)
            }
            Err(e) => {
                // At once, so that a change waiting on these locks is not left waiting.
                let _ = tx.rollback().await;
                Err(e)
            }
        }
    }

    /// Drops a backup made for a change that failed; the backup is harmless if this fails too.
    async fn discard_backup(&self, id: &str) {
        let dropped = async {
            let mut conn = self.pool.acquire().await?;
            backup::drop(&mut conn, &self.schema, id).await
        }
        .await;
        if let Err(e) = dropped {
            tracing::warn!(schema = %self.schema, backup = id, error = %e,
                "could not drop the backup of a change that failed; it holds the unchanged store");
        }
    }

    async fn take_advisory_lock(&self, conn: &mut PgConnection) -> Result<(), Error> {
        self.bounded(
            conn,
            &format!(
                "SELECT pg_advisory_xact_lock({LOCK_CLASS}, hashtext({}))",
                quote_literal(self.schema.as_str())
            ),
        )
        .await
    }

    /// Runs a locking statement that may wait at most `lock_timeout`; a timeout or a deadlock
    /// with another writer is `StoreBusy`. Later statements may wait on row locks unbounded.
    async fn bounded(&self, conn: &mut PgConnection, statement: &str) -> Result<(), Error> {
        self.bounded_by(conn, statement, self.lock_timeout).await
    }

    async fn bounded_by(
        &self,
        conn: &mut PgConnection,
        statement: &str,
        timeout: Duration,
    ) -> Result<(), Error> {
        sqlx::query(AssertSqlSafe(format!(
            "SET LOCAL lock_timeout = {}",
            timeout.as_millis()
        )))
        .execute(&mut *conn)
        .await?;
        let waiting = std::time::Instant::now();
        let locked = sqlx::query(AssertSqlSafe(statement.to_owned()))
            .execute(&mut *conn)
            .await;
        match locked {
            Ok(_) => self.log_lock_wait(waiting),
            Err(sqlx::Error::Database(db))
                if matches!(db.code().as_deref(), Some("55P03" | "40P01")) =>
            {
                return Err(Error::Busy {
                    schema: self.schema.to_string(),
                    waited: self.lock_timeout,
                });
            }
            Err(e) => return Err(e.into()),
        }
        sqlx::query("SET LOCAL lock_timeout = 0")
            .execute(&mut *conn)
            .await?;
        Ok(())
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
        let waiting = std::time::Instant::now();
        let locked = sqlx::query("SELECT pg_advisory_lock($1, hashtext($2))")
            .bind(LOCK_CLASS)
            .bind(self.schema.as_str())
            .execute(&mut *conn)
            .await;
        sqlx::query("RESET lock_timeout")
            .execute(&mut *conn)
            .await?;
        match locked {
            Ok(_) => {
                self.log_lock_wait(waiting);
                Ok(())
            }
            Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("55P03") => {
                Err(Error::Busy {
                    schema: self.schema.to_string(),
                    waited: self.lock_timeout,
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// How long an operation queued behind another on this store (the figure the concurrency
    /// test reports; `STATEKEEPER_LOG=statekeeper::engine::store=debug` shows it).
    fn log_lock_wait(&self, waiting: std::time::Instant) {
        tracing::debug!(
            schema = %self.schema,
            waited_ms = waiting.elapsed().as_millis() as u64,
            "took the store's lock"
        );
    }

    pub(crate) async fn unlock_session(&self, conn: &mut PgConnection) -> Result<(), Error> {
        sqlx::query("SELECT pg_advisory_unlock($1, hashtext($2))")
            .bind(LOCK_CLASS)
            .bind(self.schema.as_str())
            .execute(conn)
            .await?;
        Ok(())
    }
}
