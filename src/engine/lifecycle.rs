//! The lifecycle of a store (init, upgrade, status, backups, rollback, reset): the entry points
//! the CLI and reconcilers call, dispatching to statekeeper's own schema code or to the generic
//! operations over a framework's table set.

use std::collections::BTreeMap;

use sqlx::{AssertSqlSafe, PgConnection};

use super::Error;
use super::backup::{self, BackupInfo, BackupPin};
use super::catalog;
use super::framework::{Framework, StoreVersion};
use super::frameworks::statekeeper;
use super::hooks;
use super::identifier::quote_ident;
use super::reports::{
    InitReport, ResetApproval, ResetReport, RollbackReport, StatusReport, UpgradeReport,
};
use super::retention::{self, KeptBackup, KeptBecause, PruneOptions, PruneReport};
use super::store::Store;
use super::tableset;

impl Store {
    /// Creates statekeeper's schema (a framework that owns its tables creates them itself).
    pub async fn init(&self, target: Option<i32>) -> Result<InitReport, Error> {
        if !self.profile().owns_schema {
            return Err(Error::UnsupportedOperation {
                operation: "initialise".into(),
                framework: self.profile().display_name.into(),
                hint: self.profile().not_initialized_hint.into(),
            });
        }
        statekeeper::lifecycle::init(self, target).await
    }

    /// Backs up every table, then applies the steps up to `target` (default: latest).
    pub async fn upgrade(&self, target: Option<i32>) -> Result<UpgradeReport, Error> {
        if !self.profile().owns_schema {
            return Err(self.profile().not_ours("upgrade"));
        }
        statekeeper::lifecycle::upgrade(self, target).await
    }

    /// Reads the store from one snapshot without locking it. Fails when statekeeper's ledger does
    /// not match this binary (newer schema, changed checksum): every other answer would be a guess.
    pub async fn status(&self) -> Result<StatusReport, Error> {
        let mut tx = self.begin_snapshot().await?;
        let version = hooks::read_version(self, &mut tx).await?;
        if version.is_none() {
            self.refuse_other_framework(&mut tx).await?;
        }
        let (applied, pending, latest_version) = match self.framework() {
            Framework::Statekeeper => {
                let current = version.as_ref().map_or(0, |v| v.schema_version);
                (
                    statekeeper::read_ledger(self, &mut tx)
                        .await?
                        .unwrap_or_default(),
                    statekeeper::pending(self, current),
                    Some(self.chain().latest()),
                )
            }
            _ => (Vec::new(), Vec::new(), None),
        };
        let counts = if version.is_some() {
            self.counts(&mut tx).await?
        } else {
            BTreeMap::new()
        };
        let backups = backup::list(&mut tx, self.schema()).await?;
        let schema_exists =
            version.is_some() || catalog::schema_exists(&mut tx, self.schema().as_str()).await?;
        tx.commit().await?;
        let initialized = version.is_some();
        let version = version.unwrap_or_default();
        Ok(StatusReport {
            framework: self.framework(),
            schema: self.schema().to_string(),
            schema_exists,
            initialized,
            current_version: version.schema_version,
            latest_version,
            versions: version.details,
            applied,
            pending,
            counts,
            backups,
        })
    }

    /// The store's version, or why it cannot be operated on yet (`NotInitialized`, or another
    /// framework's tables in the schema). Reads only.
    pub async fn version(&self) -> Result<StoreVersion, Error> {
        let mut conn = self.pool().acquire().await?;
        self.require_initialized(&mut conn).await
    }

    /// Takes a backup of the store now, from one consistent snapshot: nothing waits on it.
    pub async fn backup(&self) -> Result<BackupInfo, Error> {
        self.backup_with_reason("manual").await
    }

    /// A backup now, recording why (`manual`, `pre-run`, `pre-migration`, …). The store's lock
    /// is taken first, on a session of its own, and the snapshot after it: a snapshot taken while
    /// waiting for the lock would predate the operation that held it. The session is detached
    /// from the pool, so that if this is cancelled PostgreSQL releases the lock with it.
    pub async fn backup_with_reason(&self, reason: &str) -> Result<BackupInfo, Error> {
        let (info, session) = self.backup_on_session(reason, false).await?;
        if let Some(session) = session {
            let _ = sqlx::Connection::close(session).await;
        }
        Ok(info)
    }

    /// A backup now, as [`Store::backup_with_reason`], pinned until the pin is released: no
    /// prune or drop removes it meanwhile. The pin is taken before the store's lock is given
    /// back, so no prune comes between the backup and its pin; it lives on a session of its own,
    /// so a process that dies releases it.
    pub async fn pinned_backup(&self, reason: &str) -> Result<(BackupInfo, BackupPin), Error> {
        let (info, session) = self.backup_on_session(reason, true).await?;
        let session = session.ok_or_else(|| {
            Error::InvalidOperation(format!(
                "backup {} was made but could not be pinned; it is kept",
                info.id
            ))
        })?;
        let pin = BackupPin::new(session, self.schema().clone(), info.id.clone());
        Ok((info, pin))
    }

    async fn backup_on_session(
        &self,
        reason: &str,
        pinned: bool,
    ) -> Result<(BackupInfo, Option<PgConnection>), Error> {
        let mut lock = self.pool().acquire().await?.detach();
        self.lock_session(&mut lock).await?;
        let backup = async {
            let mut tx = self.begin_snapshot().await?;
            let version = self.require_initialized(&mut tx).await?;
            let info = self.create_backup(&mut tx, &version, reason).await?;
            super::failpoint::hit("backup.before_commit");
            tx.commit().await?;
            if pinned {
                backup::pin(&mut lock, self.schema(), &info.id).await?;
            }
            Ok(info)
        }
        .await;
        let unlocked = self.unlock_session(&mut lock).await;
        match (backup, unlocked) {
            (Ok(info), Ok(())) => Ok((info, Some(lock))),
            // The backup committed: without a pin to keep, dropping the session (closing it)
            // releases the lock as well.
            (Ok(info), Err(_)) if !pinned => Ok((info, None)),
            (Ok(_), Err(e)) | (Err(e), _) => {
                let _ = sqlx::Connection::close(lock).await;
                Err(e)
            }
        }
    }

    /// Replaces the store with a backup (the newest, or the one named). The replaced state is
    /// itself backed up first.
    pub async fn rollback(&self, backup_id: Option<&str>) -> Result<RollbackReport, Error> {
        tableset::rollback(self, backup_id).await
    }

    /// Drops (statekeeper) or empties (a framework's tables) the store. Refused unless both the
    /// store and the request say yes; the removed state is kept in a backup.
    pub async fn reset(&self, approval: ResetApproval) -> Result<ResetReport, Error> {
        tableset::reset(self, approval).await
    }

    /// The backup made for a request (see [`Store::with_operation_id`]): its existence proves
    /// that the request's transaction committed.
    pub async fn backup_of_operation(&self, id: &str) -> Result<Option<BackupInfo>, Error> {
        Ok(self
            .backups()
            .await?
            .into_iter()
            .find(|b| b.operation.as_deref() == Some(id)))
    }

    pub async fn backups(&self) -> Result<Vec<BackupInfo>, Error> {
        let mut conn = self.pool().acquire().await?;
        backup::list(&mut conn, self.schema()).await
    }

    /// Drops one backup, unless a running operation has pinned it ([`Store::pinned_backup`]).
    pub async fn drop_backup(&self, id: &str) -> Result<BackupInfo, Error> {
        let mut tx = self.begin_locked().await?;
        let info = backup::find(&mut tx, self.schema(), Some(id)).await?;
        if !backup::pinned(&mut tx, self.schema(), std::slice::from_ref(&info.id))
            .await?
            .is_empty()
        {
            return Err(Error::BackupInUse {
                schema: self.schema().to_string(),
                id: info.id,
            });
        }
        backup::drop(&mut tx, self.schema(), &info.id).await?;
        tx.commit().await?;
        Ok(info)
    }

    /// Drops the backups the policy does not keep (see `retention.rs` for the exact rule), in one
    /// transaction under the store's lock (waiting at most the lock timeout, then `StoreBusy`).
    /// Backups of protected operations, and backups pinned by a running operation, are kept
    /// whatever the policy says. A dry run reports the same and drops nothing.
    pub async fn prune_backups(&self, options: &PruneOptions) -> Result<PruneReport, Error> {
        options.policy.check()?;
        let started = std::time::Instant::now();
        let mut tx = self.begin_locked().await?;
        let backups = backup::list(&mut tx, self.schema()).await?;
        let mut verdicts = retention::decide(&backups, options);
        let candidates: Vec<String> = verdicts
            .iter()
            .filter(|(_, verdict)| verdict.is_ok())
            .map(|(b, _)| b.id.clone())
            .collect();
        let in_use = backup::pinned(&mut tx, self.schema(), &candidates).await?;
        for (backup, verdict) in &mut verdicts {
            if verdict.is_ok() && in_use.contains(&backup.id) {
                *verdict = Err(KeptBecause::InUse);
            }
        }
        let mut dropped = Vec::new();
        let mut kept = Vec::new();
        for (backup, verdict) in verdicts {
            match verdict {
                Ok(()) => dropped.push(backup),
                Err(kept_because) => kept.push(KeptBackup {
                    backup,
                    kept_because,
                }),
            }
        }
        if !options.dry_run {
            let ids: Vec<String> = dropped.iter().map(|b| b.id.clone()).collect();
            backup::drop_all(&mut tx, self.schema(), &ids).await?;
            super::failpoint::hit("prune.before_commit");
        }
        tx.commit().await?;
        Ok(PruneReport {
            schema: self.schema().to_string(),
            dry_run: options.dry_run,
            policy: options.policy,
            bytes_freed: dropped.iter().map(|b| b.bytes).sum(),
            dropped,
            kept,
            duration_ms: super::store::elapsed_ms(started),
        })
    }

    async fn counts(&self, conn: &mut PgConnection) -> Result<BTreeMap<String, i64>, Error> {
        let names: Vec<&str> = self.profile().counts.iter().map(|c| c.table).collect();
        let present = catalog::existing_tables(conn, self.schema().as_str(), &names).await?;
        let s = self.schema().quoted();
        let selects: Vec<String> = self
            .profile()
            .counts
            .iter()
            .filter(|c| present.iter().any(|p| p == c.table))
            .map(|c| {
                let value = if c.sql.is_empty() {
                    format!("SELECT count(*) FROM {s}.{}", quote_ident(c.table))
                } else {
                    c.sql.replace("{s}", &s)
                };
                format!("SELECT '{}'::text, ({value})::bigint", c.name)
            })
            .collect();
        if selects.is_empty() {
            return Ok(BTreeMap::new());
        }
        let rows: Vec<(String, i64)> = sqlx::query_as(AssertSqlSafe(selects.join(" UNION ALL ")))
            .fetch_all(conn)
            .await?;
        Ok(rows.into_iter().collect())
    }
}
