//! What wakes what, at once instead of on a retry timer: Secrets wake the stores and exports
//! that read them (a fixed password, a rotated key; only Secret metadata is watched, so no
//! secret value reaches the operator through the watch); a store wakes the exports that name it
//! (one created after its export); a finished StateMigration wakes its store (whose status
//! reports the new schema version).

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::ObjectRef;

use crate::api::phases;
use crate::api::{StateExport, StateMigration, StateStore};

/// The names of the Secrets a store reads (its password or URL, its CA, its client
/// certificate).
pub fn store_secrets(store: &StateStore) -> impl Iterator<Item = &str> {
    let connection = &store.spec.connection;
    let tls = connection.tls.as_ref();
    [&connection.password_secret_ref, &connection.url_secret_ref]
        .into_iter()
        .flatten()
        .map(|r| r.name.as_str())
        .chain(
            tls.and_then(|t| t.ca_certificate.as_ref())
                .and_then(|ca| ca.secret_key_ref.as_ref())
                .map(|r| r.name.as_str()),
        )
        .chain(
            tls.and_then(|t| t.client_certificate.as_ref())
                .map(|c| c.secret_name.as_str()),
        )
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

/// The exports that name the store (waiting for it to exist, or to become ready).
pub fn exports_of_store(
    store: &StateStore,
    exports: &[std::sync::Arc<StateExport>],
) -> Vec<ObjectRef<StateExport>> {
    let (namespace, name) = (store.namespace(), store.name_any());
    exports
        .iter()
        .filter(|e| e.namespace() == namespace && e.spec.store_ref.name == name)
        .map(|e| ObjectRef::from_obj(e.as_ref()))
        .collect()
}

/// The store of a StateMigration that has finished: what it did (an upgrade, a rollback) shows
/// in the store's status at once.
pub fn store_of_finished_migration(migration: &StateMigration) -> Option<ObjectRef<StateStore>> {
    let finished = migration
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        // A dry run (Planned) changed nothing.
        .is_some_and(|phase| matches!(phase, phases::SUCCEEDED | phases::FAILED));
    finished.then(|| {
        let reference = ObjectRef::new(&migration.spec.store_ref.name);
        match migration.namespace() {
            Some(namespace) => reference.within(&namespace),
            None => reference,
        }
    })
}
