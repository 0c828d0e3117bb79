use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{EnvFromSource, EnvVar, ResourceRequirements, Toleration};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A framework's own command (`sqlmesh migrate`, `sqlmesh janitor`), run by the operator as a
/// Kubernetes Job. The container gets the store's connection from the store's Secret
/// (`secretKeyRef`, never a copied value): `PGHOST`, `PGPORT`, `PGDATABASE`, `PGUSER`,
/// `PGPASSWORD` and `PGSSLMODE` for a host connection, `STATEKEEPER_DATABASE_URL` for a URL
/// Secret, plus `STATEKEEPER_SCHEMA`; for Meltano also `MELTANO_DATABASE_URI`
/// (`postgresql+psycopg://`, completed from the PG* variables; a URL Secret's URL, which must then
/// be written as SQLAlchemy reads it, e.g. `postgresql+psycopg://…`), which `env` may set itself
/// (another driver, or its own Secret). The image holds the project (or mounts it) and its
/// config reads those variables.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Runner {
    /// Container image with the framework and the project, e.g. your SQLMesh project's image.
    #[schemars(length(min = 1, max = 1024))]
    pub image: String,
    /// The command (default: the framework's own, e.g. `sqlmesh migrate` or `sqlmesh janitor`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub command: Vec<String>,
    /// Arguments after the command.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub args: Vec<String>,
    /// Directory the command runs in (the project directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub working_dir: Option<String>,
    /// Further environment variables (the connection variables are added by the operator).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub env: Vec<EnvVar>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub env_from: Vec<EnvFromSource>,
    /// ServiceAccount the Job's pod runs as (default: the namespace's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub service_account_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub tolerations: Vec<Toleration>,
    /// The Job fails when it runs longer than this (default 3600).
    #[serde(default = "default_active_deadline_seconds")]
    #[schemars(range(min = 1, max = 604800))]
    pub active_deadline_seconds: i64,
    /// User id the container runs as; it always runs as a non-root user (set this when the
    /// image's own USER is root or numeric-less).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub run_as_user: Option<i64>,
}

fn default_active_deadline_seconds() -> i64 {
    3600
}
