//! The CustomResourceDefinitions as YAML, as `statekeeper crd` prints them and `crds/` holds.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use super::state_export::StateExport;
use super::state_migration::StateMigration;
use super::state_store::StateStore;

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

#[cfg(test)]
mod tests {
    use kube::Resource;

    use super::{StateExport, StateMigration, StateStore};
    use crate::api::common::API_VERSION;

    /// The `#[kube(group, version)]` attributes take literals only: they must say what the
    /// constant says.
    #[test]
    fn every_kind_has_the_groups_api_version() {
        assert_eq!(StateStore::api_version(&()), API_VERSION);
        assert_eq!(StateExport::api_version(&()), API_VERSION);
        assert_eq!(StateMigration::api_version(&()), API_VERSION);
    }
}
