//! The state engine: everything statekeeper does to a state store, with no Kubernetes types.
//! The CLI and the reconcilers both call it.

pub mod backup;
mod catalog;
pub mod connection;
pub(crate) mod copy_binary;
pub mod destination;
mod error;
mod exact;
pub mod export;
pub mod failpoint;
pub mod frameworks;
pub mod generator;
pub mod identifier;
pub mod import;
pub mod io;
pub mod janitor;
mod janitor_report;
pub mod json;
mod jsonscan;
pub mod migrations;
pub mod plan;
pub mod run;
pub mod store;
mod tableset;
pub mod words;

pub use backup::BackupInfo;
pub use connection::{ConnectionParts, ConnectionSettings, TlsMaterial, redact};
pub use destination::Destination;
pub use error::Error;
pub use export::{Compression, ExportOptions, ExportReport};
pub use frameworks::meltano::backend::MeltanoLocks;
pub use frameworks::{ExportFormat, Framework, StoreVersion};
pub use identifier::SchemaName;
pub use import::{ImportMode, ImportOptions, ImportReport};
pub use janitor::{JanitorOptions, JanitorReport};
pub use migrations::{Migration, MigrationChain};
pub use plan::{Operation, Plan};
pub use run::{RunOutcome, RunReport};
pub use store::{
    InitReport, ResetApproval, ResetReport, RollbackReport, StatusReport, Store, UpgradeReport,
};

// Used by the controller.
pub use connection::password_in_url;
pub use frameworks::meltano::backend::prefix_url;
pub use frameworks::meltano::{MeltanoDriver, search_path_option};
pub use plan::{copy_source_label, runner_description};
pub use store::DEFAULT_LOCK_TIMEOUT;
