//! statekeeper: a Kubernetes operator and CLI that manages the Postgres state store of
//! data-transformation frameworks with virtual data environments.
//!
//! Layers, top to bottom: `cli` and `controller` (reconcilers) call `engine`, which knows
//! nothing about Kubernetes. `api` holds the CRD types.

pub mod api;
pub mod cli;
pub mod controller;
pub mod engine;
