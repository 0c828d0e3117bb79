//! Every label and annotation key the operator reads or writes, in one place.

/// On everything statekeeper creates (Jobs, child StateExports): the operator's Job watch
/// selects on it.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "statekeeper");

/// On runner Jobs: the StateStore they work on.
pub const STORE_LABEL: &str = "statekeeper.dev/store";
/// On runner Jobs: what the Job is for, `upgrade`, `janitor` or `repoint-views`.
pub const PURPOSE_LABEL: &str = "statekeeper.dev/purpose";
/// On runner upgrade Jobs: the StateMigration that made them.
pub const MIGRATION_LABEL: &str = "statekeeper.dev/migration";
/// On janitor Jobs: the run they are for.
pub const SCHEDULED_AT_LABEL: &str = "statekeeper.dev/scheduled-at";

/// On every child of a scheduled StateExport: the name of its schedule.
pub const SCHEDULE_LABEL: &str = "statekeeper.dev/schedule";
/// On every child of a scheduled StateExport: the occurrence (or run-now request time) it was
/// created for.
pub const SCHEDULED_AT_ANNOTATION: &str = "statekeeper.dev/scheduled-at";
/// Setting this annotation on a schedule to a new value (e.g. the current time) runs one extra
/// export as soon as none is running.
pub const RUN_NOW_ANNOTATION: &str = "statekeeper.dev/run-now";
/// On a run-now child: the request token it was made for.
pub const RUN_NOW_TOKEN_ANNOTATION: &str = "statekeeper.dev/run-now-token";

/// Set to `true` on a StateMigration whose views are stale after its restore, once they were
/// re-pointed by hand (`statekeeper state repoint-views …`): the migration's views become
/// `Current` (reason `Acknowledged`), the store's `VirtualLayerStale` clears, its janitor may
/// run again, and no further re-point Job is made.
pub const VIEWS_REPOINTED_ANNOTATION: &str = "statekeeper.dev/views-repointed";
