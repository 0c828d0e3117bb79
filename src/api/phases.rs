//! The `.status.phase` values of the resources, each string defined once, and what a phase means
//! for the work of its object. The printer columns and `kubectl wait --for=jsonpath` read them,
//! so they are part of the API.

/// Waiting to run (a missing store or Secret, a retry's backoff): StateExport, StateMigration.
pub const PENDING: &str = "Pending";
/// Running now: StateExport, StateMigration.
pub const RUNNING: &str = "Running";
/// Done, for good: StateExport, StateMigration.
pub const SUCCEEDED: &str = "Succeeded";
/// Failed for good (StateExport, StateMigration), or unusable for now (StateStore).
pub const FAILED: &str = "Failed";

/// A StateMigration waiting for the store's queue (earlier migrations, running exports).
pub const QUEUED: &str = "Queued";
/// A StateMigration waiting for an approval of its plan.
pub const AWAITING_APPROVAL: &str = "AwaitingApproval";
/// A dry-run StateMigration whose plan is recorded: done, for good.
pub const PLANNED: &str = "Planned";

/// A StateExport with a schedule, waiting for its next run.
pub const SCHEDULED: &str = "Scheduled";
/// A StateExport with a schedule whose child export is running.
pub const ACTIVE: &str = "Active";
/// A StateExport with a suspended schedule.
pub const SUSPENDED: &str = "Suspended";

/// A StateStore that answers and is managed.
pub const READY: &str = "Ready";
/// A StateStore not observed yet (or waiting for a database connection).
pub const INITIALIZING: &str = "Initializing";

/// A one-shot StateExport that will never run again.
pub fn export_is_finished(phase: Option<&str>) -> bool {
    matches!(phase, Some(SUCCEEDED | FAILED))
}

/// A StateMigration that will never run again (a dry run ends when planned).
pub fn migration_is_finished(phase: Option<&str>) -> bool {
    matches!(phase, Some(SUCCEEDED | FAILED | PLANNED))
}
