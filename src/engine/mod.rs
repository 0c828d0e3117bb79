//! The state engine: everything statekeeper does to a state store, with no Kubernetes types.
//! The CLI and the reconcilers both call it.

pub mod backup;
mod catalog;
pub mod connection;
pub mod destination;
pub mod diff;
pub mod encryption;
mod error;
mod exact;
pub mod export;
pub mod failpoint;
mod format;
pub mod framework;
pub mod frameworks;
pub mod generator;
mod guards;
mod hooks;
pub mod identifier;
pub mod import;
pub mod io;
pub mod janitor;
mod janitor_report;
pub mod job_report;
pub mod json;
mod jsonscan;
mod lifecycle;
pub mod manifest;
mod meltano_backend;
pub mod migrations;
pub mod plan;
pub mod reports;
pub mod retention;
pub mod run;
pub mod store;
mod tableset;
pub mod transfer;
pub mod verify;
pub mod virtual_layer;
pub mod words;

pub use backup::BackupInfo;
pub use connection::{ConnectionParts, ConnectionSettings, TlsMaterial, redact};
pub use destination::Destination;
pub use diff::{DiffOptions, DiffReport, DiffSide, FileSource};
pub use encryption::{Identities, Recipients};
pub use error::Error;
pub use framework::{ExportFormat, Framework, StoreVersion};
pub use identifier::SchemaName;
pub use janitor::{JanitorOptions, JanitorReport};
pub use job_report::JobReport;
pub use meltano_backend::MeltanoLocks;
pub use migrations::{Migration, MigrationChain};
pub use plan::{Operation, Plan, PlanChanges};
pub use reports::{
    InitReport, ResetApproval, ResetReport, RollbackReport, StatusReport, UpgradeReport,
};
pub use retention::{KeptBecause, PruneOptions, PruneReport, RetentionPolicy};
pub use run::{RunOutcome, RunReport};
pub use store::Store;
pub use transfer::{
    Compression, ExportOptions, ExportReport, ImportMode, ImportOptions, ImportReport, Restored,
    Selection,
};
pub use verify::{VerifyOptions, VerifyReport};
pub use virtual_layer::{RepointOptions, VirtualLayerReport, repoint_command};

// Used by the controller.
pub use connection::password_in_url;
pub use frameworks::meltano::{MeltanoDriver, search_path_option};
pub use meltano_backend::prefix_url;
pub use plan::{copy_source_label, runner_description};
pub use store::DEFAULT_LOCK_TIMEOUT;
