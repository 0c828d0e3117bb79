//! The database pools of the operator, shared by every store that connects the same way and
//! kept within one connection budget.

use std::collections::HashMap;
use std::time::Duration;

use sha2::{Digest, Sha256};
use sqlx::PgPool;

use crate::engine::{ConnectionSettings, Error as EngineError};

/// Database pools shared by every store that connects the same way (same target, user and
/// Secrets): a thousand stores in one database use one pool. The connections of all pools
/// together stay within a budget: the least recently used idle pools are closed to make room,
/// and when every pool is busy a new one waits (the reconcile retries) rather than exceed it.
pub struct PoolCache {
    inner: tokio::sync::Mutex<Pools>,
    /// Connections all pools may hold together.
    budget: u32,
    /// Connections one pool (one database) may hold.
    per_pool: u32,
    /// How long a store waits for room in the budget before it says it is waiting.
    slot_wait: Duration,
}

/// How long a store waits for a slot in the connection budget within one reconcile.
pub const SLOT_WAIT: Duration = Duration::from_secs(10);

/// Why the pool cache gave no pool.
#[derive(Debug)]
pub enum PoolError {
    /// Connecting failed (an unreachable database, wrong credentials …).
    Engine(EngineError),
    /// Every connection of the budget is held by a busy pool, for longer than the wait.
    NoSlot { budget: u32, waited: Duration },
}

#[derive(Default)]
struct Pools {
    /// Store key → the fingerprint of the pool it uses.
    stores: HashMap<String, String>,
    /// Fingerprint → (pool, its connection limit, last use).
    pools: HashMap<String, (PgPool, u32, std::time::Instant)>,
}

impl Default for PoolCache {
    fn default() -> Self {
        Self::new(16, 4)
    }
}

impl PoolCache {
    pub fn with_slot_wait(mut self, wait: Duration) -> Self {
        self.slot_wait = wait;
        self
    }

    pub fn new(budget: u32, per_pool: u32) -> Self {
        Self {
            inner: Default::default(),
            budget: budget.max(1),
            per_pool: per_pool.clamp(1, budget.max(1)),
            slot_wait: SLOT_WAIT,
        }
    }

    /// The pool for `key`'s connection settings, made when missing. When the budget is spent
    /// by pools that are all busy, it waits for one to become idle (a store queues for a slot:
    /// a full budget is not an unreachable database), up to [`SLOT_WAIT`].
    pub async fn get_or_connect(
        &self,
        key: &str,
        settings: &ConnectionSettings,
        secrets: &[String],
    ) -> Result<PgPool, PoolError> {
        let fingerprint = {
            let mut hasher = Sha256::new();
            hasher.update(settings.target());
            hasher.update(settings.user());
            hasher.update(settings.connect_timeout.as_millis().to_le_bytes());
            for secret in secrets {
                hasher.update([0]);
                hasher.update(secret);
            }
            hex::encode(hasher.finalize())
        };
        let started = std::time::Instant::now();
        loop {
            if let Some(pool) = self.try_get_or_connect(key, &fingerprint, settings).await? {
                return Ok(pool);
            }
            if started.elapsed() >= self.slot_wait {
                return Err(PoolError::NoSlot {
                    budget: self.budget,
                    waited: started.elapsed(),
                });
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// One attempt: the pool, or `None` when there is no room for it yet.
    async fn try_get_or_connect(
        &self,
        key: &str,
        fingerprint: &str,
        settings: &ConnectionSettings,
    ) -> Result<Option<PgPool>, PoolError> {
        let mut inner = self.inner.lock().await;
        if let Some((pool, _, used)) = inner.pools.get_mut(fingerprint)
            && !pool.is_closed()
        {
            *used = std::time::Instant::now();
            let pool = pool.clone();
            inner.stores.insert(key.to_owned(), fingerprint.to_owned());
            return Ok(Some(pool));
        }
        // The store's previous pool (its Secret changed) goes if nobody else uses it.
        if let Some(old) = inner.stores.remove(key) {
            inner.release_if_unused(&old).await;
        }
        let mut held: u32 = inner.pools.values().map(|(_, limit, _)| limit).sum();
        while held + self.per_pool > self.budget {
            let idle = inner
                .pools
                .iter()
                .filter(|(_, (pool, _, _))| pool.size() as usize == pool.num_idle())
                .min_by_key(|(_, (_, _, used))| *used)
                .map(|(fingerprint, _)| fingerprint.clone());
            let Some(idle) = idle else { break };
            if let Some((pool, limit, _)) = inner.pools.remove(&idle) {
                pool.close().await;
                held -= limit;
            }
            inner.stores.retain(|_, f| *f != idle);
        }
        let limit = self.per_pool.min(self.budget.saturating_sub(held));
        if limit == 0 {
            return Ok(None);
        }
        let pool = settings
            .clone()
            .with_max_connections(limit)
            .connect()
            .await
            .map_err(PoolError::Engine)?;
        inner.pools.insert(
            fingerprint.to_owned(),
            (pool.clone(), limit, std::time::Instant::now()),
        );
        inner.stores.insert(key.to_owned(), fingerprint.to_owned());
        Ok(Some(pool))
    }

    /// Drops a store's use of its pool (a connection broke); the pool closes when unused.
    pub async fn forget(&self, key: &str) {
        let mut inner = self.inner.lock().await;
        if let Some(fingerprint) = inner.stores.remove(key) {
            // A broken pool is rebuilt with a fresh probe by whoever needs it next.
            if let Some((pool, _, _)) = inner.pools.remove(&fingerprint) {
                pool.close().await;
            }
            inner.stores.retain(|_, f| *f != fingerprint);
        }
    }
}

impl Pools {
    async fn release_if_unused(&mut self, fingerprint: &str) {
        if !self.stores.values().any(|f| f == fingerprint)
            && let Some((pool, _, _)) = self.pools.remove(fingerprint)
        {
            pool.close().await;
        }
    }
}
