//! What the CRD types share: the API group and version, Secret references and the conditions list.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};

/// The group's name, written once: [`API_GROUP`] and [`API_VERSION`] are made from it.
macro_rules! api_group {
    () => {
        "statekeeper.dev"
    };
}

pub const API_GROUP: &str = api_group!();
/// The `apiVersion` of every kind of the group (the CRD types declare the same; a test checks).
pub const API_VERSION: &str = concat!(api_group!(), "/v1alpha1");

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

/// A Secret in the resource's namespace and the key in it that holds age keys; `key` defaults
/// to what the referring field says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeysSecretRef {
    /// Name of the Secret, in the referring object's namespace.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Key inside the Secret's data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: Option<String>,
}

/// The key of a recipients Secret when `key` is not given.
pub const RECIPIENTS_KEY: &str = "recipients";
/// The key of an identity Secret when `key` is not given.
pub const IDENTITY_KEY: &str = "identity";

impl KeysSecretRef {
    /// The key to read: `key`, or `default`.
    pub fn key_or<'a>(&'a self, default: &'a str) -> &'a str {
        self.key.as_deref().unwrap_or(default)
    }
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
