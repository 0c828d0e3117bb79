//! CustomResourceDefinition types (`statekeeper.dev/v1alpha1`). `crds/` is generated from them.

pub mod runner;
pub mod state_export;
pub mod state_migration;
pub mod state_store;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResourceExt;
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};

pub use state_export::{StateExport, StateExportSpec, StateExportStatus};
pub use state_migration::{StateMigration, StateMigrationSpec, StateMigrationStatus};
pub use state_store::{StateStore, StateStoreSpec, StateStoreStatus};

pub const API_GROUP: &str = "statekeeper.dev";

/// A key in a Secret in the resource's namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret, in the referring object's namespace (a name, never `namespace/name`).
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Key inside the Secret's data.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

/// `conditions` as a list-map keyed by `type`, so server-side apply merges per condition.
pub fn conditions_schema(generator: &mut SchemaGenerator) -> Schema {
    let mut schema = <Vec<Condition>>::json_schema(generator);
    schema.insert("x-kubernetes-list-type".into(), "map".into());
    schema.insert(
        "x-kubernetes-list-map-keys".into(),
        serde_json::json!(["type"]),
    );
    schema
}

/// Every CRD this operator serves: (file name in `crds/`, YAML document).
pub fn crds() -> Result<Vec<(&'static str, String)>, serde_yaml::Error> {
    let yaml = |crd: CustomResourceDefinition| -> Result<String, serde_yaml::Error> {
        let mut value = serde_yaml::to_value(&crd)?;
        kubernetes_formats(&mut value);
        Ok(format!("---\n{}", serde_yaml::to_string(&value)?))
    };
    Ok(vec![
        ("statestores.statekeeper.dev.yaml", yaml(StateStore::crd())?),
        (
            "stateexports.statekeeper.dev.yaml",
            yaml(StateExport::crd())?,
        ),
        (
            "statemigrations.statekeeper.dev.yaml",
            yaml(StateMigration::crd())?,
        ),
    ])
}

/// The API server knows the integer formats `int32` and `int64` only (it warns about schemars'
/// `uint16`, `uint32` and `uint64`): unsigned fields become signed ones with `minimum: 0`.
fn kubernetes_formats(value: &mut serde_yaml::Value) {
    match value {
        serde_yaml::Value::Mapping(map) => {
            let format = map
                .get("format")
                .and_then(serde_yaml::Value::as_str)
                .map(str::to_owned);
            if let Some(format) = format
                && let Some(signed) = match format.as_str() {
                    "uint8" | "uint16" | "uint32" => Some("int32"),
                    "uint64" | "uint" => Some("int64"),
                    _ => None,
                }
            {
                map.insert("format".into(), signed.into());
                if !map.contains_key("minimum") {
                    map.insert("minimum".into(), 0.into());
                }
            }
            for (_, child) in map.iter_mut() {
                kubernetes_formats(child);
            }
        }
        serde_yaml::Value::Sequence(items) => items.iter_mut().for_each(kubernetes_formats),
        _ => {}
    }
}

/// All CRDs as one multi-document YAML stream (`statekeeper crd`).
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    Ok(crds()?.into_iter().map(|(_, yaml)| yaml).collect())
}
