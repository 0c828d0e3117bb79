//! statekeeper: a Kubernetes operator and CLI that manages the Postgres state store of
//! data-transformation frameworks with virtual data environments.

pub mod engine;
