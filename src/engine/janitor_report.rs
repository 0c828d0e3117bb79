//! What a janitor run is asked to do and what it reports, shared by statekeeper's own janitor
//! and Meltano's (which sit above it and must not reach into each other).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::framework::Framework;

#[derive(Clone, Debug)]
pub struct JanitorOptions {
    /// Remove environments whose `expires_at` has passed.
    pub expired_environments: bool,
    /// Keep the newest N checkpoints of each environment; `None` keeps every checkpoint.
    pub keep_checkpoints: Option<u32>,
    /// Checkpoints younger than this always survive.
    pub checkpoint_min_age: Duration,
    /// Unreferenced versions younger than this survive (protects plans in flight).
    pub version_grace: Duration,
    /// The primary environment: never removed, nor its checkpoints.
    pub unsuffixed_environment: String,
    /// Report exactly what a real run would remove, and change nothing.
    pub dry_run: bool,
    /// Rows per batch (per transaction).
    pub batch_size: u32,
    /// Meltano: keep the newest N runs of each job (`job_name`).
    pub keep_runs: u32,
    /// Meltano: runs younger than this always survive.
    pub run_min_age: Duration,
    /// Meltano: mark stale `RUNNING` runs failed first, as Meltano's own check does.
    pub fail_stale_runs: bool,
}

impl Default for JanitorOptions {
    fn default() -> Self {
        Self {
            expired_environments: true,
            keep_checkpoints: Some(10),
            checkpoint_min_age: Duration::from_secs(7 * 24 * 3600),
            version_grace: Duration::from_secs(24 * 3600),
            unsuffixed_environment: "prod".into(),
            dry_run: false,
            batch_size: 1000,
            keep_runs: 100,
            run_min_age: Duration::from_secs(7 * 24 * 3600),
            fail_stale_runs: false,
        }
    }
}

/// Read back from its JSON (a Job's report) as the CLI prints it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JanitorReport {
    pub dry_run: bool,
    /// What was cleaned: statekeeper's own schema, or a Meltano system database's runs.
    pub framework: Framework,
    pub expired_environments: u64,
    /// Checkpoints removed, with their expired environment or by retention.
    pub checkpoints: u64,
    pub model_versions: u64,
    pub function_versions: u64,
    /// Physical relations released (their names go to the caller's sink).
    pub physical_relations: u64,
    pub intervals: u64,
    pub batches: u64,
    /// Batches retried because a writer referenced a version while it was being removed.
    pub retried_batches: u64,
    /// Meltano runs removed.
    pub runs: u64,
    /// Meltano runs marked failed because they went stale.
    pub stale_runs_failed: u64,
    /// Not serialised here (the CLI adds `durationMs`); read back from `durationMs`.
    #[serde(
        skip_serializing,
        default,
        rename = "durationMs",
        deserialize_with = "super::transfer::duration_from_ms"
    )]
    pub duration: Duration,
}

impl JanitorReport {
    /// "removed 3 expired environments, … 40 intervals" (or "dry run: would remove …").
    pub fn summary(&self) -> String {
        let verb = if self.dry_run {
            "dry run: would remove"
        } else {
            "removed"
        };
        if self.framework == Framework::Meltano {
            return format!(
                "{verb} {} runs; {} stale runs {}",
                self.runs,
                self.stale_runs_failed,
                if self.dry_run {
                    "would be marked failed"
                } else {
                    "marked failed"
                }
            );
        }
        format!(
            "{verb} {} expired environments, {} checkpoints, {} model versions, {} function versions, {} physical relations, {} intervals",
            self.expired_environments,
            self.checkpoints,
            self.model_versions,
            self.function_versions,
            self.physical_relations,
            self.intervals
        )
    }

    /// Rows removed or changed.
    pub fn removed_rows(&self) -> u64 {
        self.runs
            + self.stale_runs_failed
            + self.expired_environments
            + self.checkpoints
            + self.model_versions
            + self.function_versions
            + self.physical_relations
            + self.intervals
    }
}
