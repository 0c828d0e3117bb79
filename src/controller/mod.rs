//! The operator: one reconciler per resource, sharing a context (client, events, pools).
//!
//! Dependencies run one way. At the bottom: `context` (what every reconcile shares),
//! `pool_cache`, `access` (databases, Secrets, destinations), `conditions`, `events`, `runner`,
//! `schedule`, `telemetry`, `wakeups`. Above them the reconcilers — `state_store` (with
//! `store_janitor`, `store_backups` and `store_views`), `state_export`, `state_migration` — which never import each other; on top
//! `operator`, which runs them.

pub mod access;
pub mod conditions;
pub mod context;
pub mod events;
pub mod operator;
pub mod pool_cache;
pub mod runner;
pub mod schedule;
pub mod state_export;
pub mod state_migration;
pub mod state_store;
pub mod store_backups;
pub mod store_janitor;
pub mod store_views;
pub mod telemetry;
pub mod wakeups;

pub use context::{Context, FIELD_MANAGER, ReconcileError, Settings};
pub use operator::{OperatorArgs, StartError, operate, run};
/// The schedule half of the StateExport reconciler, by the path it has always had.
pub use state_export::scheduled as export_schedule;
