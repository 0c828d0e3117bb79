//! Realistic synthetic state for tests and benchmarks, deterministic for a given seed: model
//! versions with relations, ancestry and intervals; environments (some expired) with refs and
//! checkpoints; some versions referenced by nobody. Built with set-based SQL in chunks, so a
//! million versions take seconds and no client memory.

use std::collections::BTreeMap;

use serde::Serialize;
use sqlx::AssertSqlSafe;

use super::Error;
use super::catalog;
use super::store::Store;

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub model_versions: u64,
    /// Including the unsuffixed (primary) environment `prod`.
    pub environments: u32,
    pub seed: u64,
    pub checkpoints_per_environment: u32,
    /// Share of model versions no environment references (per mille).
    pub unreferenced_per_mille: u32,
    /// Share of non-primary environments that have expired (per mille).
    pub expired_per_mille: u32,
    /// Share of model versions created just now, inside any grace period (per mille).
    pub young_per_mille: u32,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            model_versions: 10_000,
            environments: 20,
            seed: 42,
            checkpoints_per_environment: 12,
            unreferenced_per_mille: 500,
            expired_per_mille: 300,
            young_per_mille: 10,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct GenerateReport {
    pub rows: BTreeMap<String, i64>,
}

/// Rows per INSERT statement: big enough to be fast, small enough to keep transactions short.
const CHUNK: u64 = 200_000;

impl Store {
    /// Fills an initialised, empty store (schema version 3 or later) with synthetic state.
    pub async fn generate(&self, o: &GenerateOptions) -> Result<GenerateReport, Error> {
        let mut conn = self.pool().acquire().await?;
        self.require_version(&mut conn, 3, "the generator").await?;
        let s = self.schema().quoted();
        let n = o.model_versions.max(1) as i64;
        let m = i64::from(o.environments.max(1));
        let models = (n / 8).max(1);
        let functions = (n / 100).max(1);
        let seed = o.seed as i64;
        // r(x, salt) is a deterministic pseudo-random number in [0, 1000).
        let r = |x: &str, salt: u32| {
            format!("(abs(hashtextextended(({x})::text || ':{salt}', $seed)) % 1000)")
        };
        let env_of = |x: &str| format!("CASE WHEN ({x}) = 0 THEN 'prod' ELSE 'env_' || ({x}) END");

        let chunked = [
            // Model versions: mostly old; a few young ones, inside any grace period.
            format!(
                "INSERT INTO {s}.model_versions (id, name, fingerprint, version, kind, definition, created_at)
                 SELECT i, 'model_' || (i % {models}), md5($seed::text || ':' || i), 'v' || (i / {models}),
                        CASE WHEN i % 7 = 0 THEN 'seed' ELSE 'model' END,
                        jsonb_build_object('query', 'SELECT * FROM upstream_' || (i % 97), 'owner', 'team_' || (i % 5)),
                        CASE WHEN {young} < {young_pm} THEN now() ELSE now() - interval '30 days' + (i % 86400) * interval '1 second' END
                 FROM generate_series($lo, $hi) i",
                young = r("i", 1),
                young_pm = o.young_per_mille,
            ),
            format!(
                "INSERT INTO {s}.physical_relations (id, model_version_id, relation_name, created_at)
                 SELECT i, i, 'sqlmesh__db.model_' || (i % {models}) || '__' || substr(md5($seed::text || ':' || i), 1, 10), now() - interval '30 days'
                 FROM generate_series($lo, $hi) i"
            ),
            format!(
                "INSERT INTO {s}.physical_relation_ancestry (relation_id, parent_relation_id)
                 SELECT i, i - {models} FROM generate_series(greatest($lo, {models} + 1), $hi) i"
            ),
            format!(
                "INSERT INTO {s}.model_version_intervals (model_version_id, start_ts, end_ts, is_dev)
                 SELECT i, timestamptz '2026-01-01' + k * interval '1 day', timestamptz '2026-01-01' + (k + 1) * interval '1 day', k = 1
                 FROM generate_series($lo, $hi) i, generate_series(0, 1) k"
            ),
            // References: a version is referenced unless drawn as unreferenced; its environment is drawn too.
            format!(
                "INSERT INTO {s}.virtual_environment_refs (environment, model_name, model_version_id)
                 SELECT {env}, 'model_' || i, i FROM generate_series($lo, $hi) i
                 WHERE {unref} >= {unref_pm}",
                env = env_of(&format!("abs(hashtextextended(i::text || ':3', $seed)) % {m}")),
                unref = r("i", 2),
                unref_pm = o.unreferenced_per_mille,
            ),
        ];
        let before_chunks = [
            format!(
                "INSERT INTO {s}.function_versions (id, name, fingerprint, created_at)
                 SELECT j, 'macro_' || j, md5('f' || $seed::text || ':' || j), now() - interval '30 days'
                 FROM generate_series(1, {functions}) j"
            ),
            format!(
                "INSERT INTO {s}.virtual_environments (name, plan_id, previous_plan_id, created_at, updated_at, expires_at)
                 SELECT {env}, 'plan_' || k, 'plan_' || (k - 1), now() - interval '40 days', now() - interval '2 days',
                        CASE WHEN k = 0 THEN NULL
                             WHEN {expired} < {expired_pm} THEN now() - interval '1 day'
                             ELSE now() + interval '30 days' END
                 FROM generate_series(0, {m} - 1) k",
                env = env_of("k"),
                expired = r("k", 4),
                expired_pm = o.expired_per_mille,
            ),
        ];
        let after_chunks = [
            format!(
                "INSERT INTO {s}.virtual_environment_function_refs (environment, function_name, function_version_id)
                 SELECT {env}, 'macro_' || j, j FROM generate_series(1, {functions}) j WHERE {unref} >= {unref_pm}",
                env = env_of(&format!("j % {m}")),
                unref = r("j", 5),
                unref_pm = o.unreferenced_per_mille,
            ),
            // Checkpoints: one a day per environment, the newest yesterday.
            format!(
                "INSERT INTO {s}.virtual_environment_checkpoints (environment, plan_id, description, created_at)
                 SELECT {env}, 'plan_' || k || '_' || c, 'checkpoint ' || c, now() - ({cps} - c) * interval '1 day'
                 FROM generate_series(0, {m} - 1) k, generate_series(0, {cps} - 1) c",
                env = env_of("k"),
                cps = o.checkpoints_per_environment,
            ),
            format!(
                "INSERT INTO {s}.virtual_environment_checkpoint_refs (checkpoint_id, model_name, model_version_id)
                 SELECT DISTINCT c.id, 'model_' || v, v
                 FROM {s}.virtual_environment_checkpoints c, generate_series(0, 2) k,
                      LATERAL (SELECT abs(hashtextextended(c.id::text || ':' || k, $seed)) % {n} + 1 AS v) pick"
            ),
            format!(
                "INSERT INTO {s}.virtual_environment_checkpoint_function_refs (checkpoint_id, function_name, function_version_id)
                 SELECT c.id, 'macro_' || f, f FROM {s}.virtual_environment_checkpoints c,
                      LATERAL (SELECT abs(hashtextextended(c.id::text, $seed)) % {functions} + 1 AS f) pick"
            ),
            format!(
                "INSERT INTO {s}.locks (name, holder, expires_at) VALUES ('plan:prod', 'scheduler', now() + interval '5 minutes')"
            ),
            format!(
                "INSERT INTO {s}.plan_runs (plan_id, environment, status, started_at, finished_at)
                 SELECT 'plan_' || k, 'prod', 'succeeded', now() - k * interval '1 hour', now() - k * interval '1 hour' + interval '5 minutes'
                 FROM generate_series(1, 24) k"
            ),
        ];

        for sql in &before_chunks {
            sqlx::query(AssertSqlSafe(bind_literals(sql, seed, 0, 0)))
                .execute(&mut *conn)
                .await?;
        }
        let mut lo = 1;
        while lo <= n {
            let hi = (lo + CHUNK as i64 - 1).min(n);
            for sql in &chunked {
                sqlx::query(AssertSqlSafe(bind_literals(sql, seed, lo, hi)))
                    .execute(&mut *conn)
                    .await?;
            }
            lo = hi + 1;
        }
        for sql in &after_chunks {
            sqlx::query(AssertSqlSafe(bind_literals(sql, seed, 0, 0)))
                .execute(&mut *conn)
                .await?;
        }
        catalog::resync_identities(&mut conn, self.schema().as_str()).await?;
        sqlx::query(AssertSqlSafe(format!("ANALYZE {s}.model_versions, {s}.virtual_environment_refs, {s}.virtual_environment_checkpoint_refs, {s}.physical_relations")))
            .execute(&mut *conn)
            .await?;
        Ok(GenerateReport {
            rows: self.status().await?.counts,
        })
    }
}

/// The generator's statements take only integers, substituted as literals so that one
/// statement text serves every chunk without a prepared-statement per shape.
fn bind_literals(sql: &str, seed: i64, lo: i64, hi: i64) -> String {
    sql.replace("$seed", &seed.to_string())
        .replace("$lo", &lo.to_string())
        .replace("$hi", &hi.to_string())
}
