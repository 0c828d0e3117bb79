//! Secrets that stores and exports reference wake them at once when they change (a fixed
//! password, a rotated key), instead of on their retry timer. Only Secret metadata is watched:
//! no secret value ever reaches the operator through the watch.

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::ObjectRef;

use crate::api::{StateExport, StateStore};

/// The names of the Secrets a store reads (its password or URL).
pub fn store_secrets(store: &StateStore) -> impl Iterator<Item = &str> {
    let connection = &store.spec.connection;
    [&connection.password_secret_ref, &connection.url_secret_ref]
        .into_iter()
        .flatten()
        .map(|r| r.name.as_str())
}

/// The stores that read the Secret.
pub fn stores_using(
    secret: &PartialObjectMeta<Secret>,
    stores: &[std::sync::Arc<StateStore>],
) -> Vec<ObjectRef<StateStore>> {
    let (namespace, name) = (secret.namespace(), secret.name_any());
    stores
        .iter()
        .filter(|s| s.namespace() == namespace && store_secrets(s).any(|n| n == name))
        .map(|s| ObjectRef::from_obj(s.as_ref()))
        .collect()
}

/// The exports that read the Secret: their destination credentials, or their store's connection.
pub fn exports_using(
    secret: &PartialObjectMeta<Secret>,
    exports: &[std::sync::Arc<StateExport>],
    stores: &[std::sync::Arc<StateStore>],
) -> Vec<ObjectRef<StateExport>> {
    let (namespace, name) = (secret.namespace(), secret.name_any());
    let reading_stores: Vec<String> = stores
        .iter()
        .filter(|s| s.namespace() == namespace && store_secrets(s).any(|n| n == name))
        .map(|s| s.name_any())
        .collect();
    exports
        .iter()
        .filter(|e| e.namespace() == namespace)
        .filter(|e| {
            e.spec
                .destination
                .credentials_secret_ref
                .as_ref()
                .is_some_and(|r| r.name == name)
                || reading_stores.contains(&e.spec.store_ref.name)
        })
        .map(|e| ObjectRef::from_obj(e.as_ref()))
        .collect()
}
