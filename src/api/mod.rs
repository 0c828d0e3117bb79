//! CustomResourceDefinition types (`statekeeper.dev/v1alpha1`). `crds/` is generated from them.

pub mod common;
pub mod crds;
pub mod labels;
pub mod phases;
pub mod runner;
pub mod state_export;
pub mod state_migration;
pub mod state_store;

pub use common::{API_GROUP, API_VERSION, SecretKeyRef, conditions_schema};
pub use crds::{crds, crds_yaml};
pub use state_export::{StateExport, StateExportSpec, StateExportStatus};
pub use state_migration::{StateMigration, StateMigrationSpec, StateMigrationStatus};
pub use state_store::{StateStore, StateStoreSpec, StateStoreStatus};
