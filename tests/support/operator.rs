//! The operator side of the harness: an in-memory Kubernetes API holding StateStores, StateExports
//! and Secrets, a real reconciler Context on it, and builders for the objects the tests use.

use std::sync::Arc;
use std::time::Duration;

use kube::runtime::controller::Action;
use serde_json::{Value, json};
use statekeeper::api::StateStore;
use statekeeper::controller::state_store::reconcile;
use statekeeper::controller::{Context, Settings};

use super::fake_kube::FakeKube;
use super::{TestDb, url_parts};

pub const NS: &str = "data";

pub fn store_path(name: &str) -> String {
    format!("/apis/statekeeper.dev/v1alpha1/namespaces/{NS}/statestores/{name}")
}

pub fn put_secret(kube: &FakeKube, name: &str, data: &[(&str, &str)]) {
    let data: serde_json::Map<String, Value> = data
        .iter()
        .map(|(k, v)| (k.to_string(), json!(super::fake_kube::base64(v.as_bytes()))))
        .collect();
    kube.put(
        &format!("/api/v1/namespaces/{NS}/secrets/{name}"),
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": NS}, "data": data}),
    );
}

/// A StateStore connecting by host/port/user with a password Secret.
pub fn store_for(db: &TestDb, name: &str, extra_spec: Value) -> Value {
    let (host, port, user, _, database) = url_parts(&db.url);
    let mut spec = json!({
        "connection": {
            "host": host, "port": port, "database": database, "user": user,
            "passwordSecretRef": {"name": "pg-credentials", "key": "password"},
            "connectTimeoutSeconds": 3
        },
        "schema": "sqlmesh_state"
    });
    support_merge(&mut spec, &extra_spec);
    json!({
        "apiVersion": "statekeeper.dev/v1alpha1",
        "kind": "StateStore",
        "metadata": {"name": name, "namespace": NS, "uid": format!("uid-{name}"), "generation": 1},
        "spec": spec
    })
}

pub fn support_merge(target: &mut Value, patch: &Value) {
    if let (Value::Object(t), Value::Object(p)) = (&mut *target, patch) {
        for (k, v) in p {
            support_merge(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    } else {
        *target = patch.clone();
    }
}

pub struct Harness {
    pub kube: FakeKube,
    pub ctx: Arc<Context>,
}

impl Harness {
    pub fn new() -> Self {
        Self::with_settings(Settings::default())
    }

    /// A harness whose operator has these settings (short connect and lock timeouts as in
    /// every test).
    pub fn with_settings(settings: Settings) -> Self {
        let kube = FakeKube::new();
        let settings = Settings {
            connect_timeout: Duration::from_secs(3),
            lock_timeout: Duration::from_secs(2),
            ..settings
        };
        let ctx = Arc::new(Context::new(kube.client(), settings));
        Self { kube, ctx }
    }

    /// Stores the object, reconciles it, and returns the action and the object as stored after.
    pub async fn reconcile(&self, object: &Value) -> (Action, StateStore) {
        let name = object["metadata"]["name"].as_str().unwrap().to_owned();
        let path = store_path(&name);
        let mut stored = object.clone();
        if let Some(existing) = self.kube.get(&path) {
            stored["status"] = existing["status"].clone();
        }
        self.kube.put(&path, stored.clone());
        let typed: StateStore = serde_json::from_value(self.kube.get(&path).unwrap()).unwrap();
        let action = reconcile(Arc::new(typed), self.ctx.clone())
            .await
            .expect("reconcile");
        let after: StateStore = serde_json::from_value(self.kube.get(&path).unwrap()).unwrap();
        (action, after)
    }

    pub fn event_reasons(&self) -> Vec<(String, String)> {
        self.kube
            .events(NS)
            .iter()
            .map(|e| {
                (
                    e["type"].as_str().unwrap_or_default().to_owned(),
                    e["reason"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }
}

pub fn at(ctx: &Context, time: &str) {
    ctx.set_clock(Some(time.parse().unwrap()));
}

pub async fn generated_store(db: &TestDb) {
    let engine = db.store("sqlmesh_state").await;
    engine.init(None).await.unwrap();
    engine
        .generate(&statekeeper::engine::generator::GenerateOptions {
            model_versions: 1_500,
            environments: 8,
            ..Default::default()
        })
        .await
        .unwrap();
}

/// The StateStore `analytics` on generated state, with its password Secret, in the fake API.
pub async fn store_harness(db: &TestDb) -> Harness {
    generated_store(db).await;
    let h = Harness::new();
    put_secret(&h.kube, "pg-credentials", &[("password", &db.password())]);
    h.kube.put(
        &store_path("analytics"),
        store_for(db, "analytics", json!({})),
    );
    h
}

pub fn export_path(name: &str) -> String {
    format!("/apis/statekeeper.dev/v1alpha1/namespaces/{NS}/stateexports/{name}")
}

pub fn state_export(name: &str, url: &str, extra: Value) -> Value {
    let mut spec = json!({"storeRef": {"name": "analytics"}, "destination": {"url": url}, "compression": "zstd"});
    support_merge(&mut spec, &extra);
    json!({
        "apiVersion": "statekeeper.dev/v1alpha1",
        "kind": "StateExport",
        "metadata": {"name": name, "namespace": NS, "uid": format!("uid-{name}"), "generation": 1},
        "spec": spec
    })
}

impl Harness {
    /// Reconciles a StateExport as stored in the fake (status included); returns the result.
    pub async fn reconcile_export(&self, name: &str) -> (Action, statekeeper::api::StateExport) {
        let path = export_path(name);
        let typed: statekeeper::api::StateExport =
            serde_json::from_value(self.kube.get(&path).unwrap()).unwrap();
        let action =
            statekeeper::controller::state_export::reconcile(Arc::new(typed), self.ctx.clone())
                .await
                .expect("reconcile");
        (
            action,
            serde_json::from_value(self.kube.get(&path).unwrap()).unwrap(),
        )
    }
}

pub fn export_condition(
    export: &statekeeper::api::StateExport,
    type_: &str,
) -> (String, String, String) {
    condition(&export.status.as_ref().unwrap().conditions, type_)
}

/// (status, reason, message) of the condition `type_`.
pub fn condition(
    conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    type_: &str,
) -> (String, String, String) {
    let c = conditions
        .iter()
        .find(|c| c.type_ == type_)
        .unwrap_or_else(|| panic!("no {type_} condition in {conditions:?}"));
    (c.status.clone(), c.reason.clone(), c.message.clone())
}

pub fn temp_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("sk-export-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn migration_path(name: &str) -> String {
    format!("/apis/statekeeper.dev/v1alpha1/namespaces/{NS}/statemigrations/{name}")
}

/// A StateMigration of the `analytics` store created at `created` (creation order is queue order).
pub fn state_migration(name: &str, created: &str, spec: Value) -> Value {
    let mut full = json!({"storeRef": {"name": "analytics"}});
    support_merge(&mut full, &spec);
    json!({
        "apiVersion": "statekeeper.dev/v1alpha1",
        "kind": "StateMigration",
        "metadata": {
            "name": name, "namespace": NS, "uid": format!("uid-{name}"), "generation": 1,
            "creationTimestamp": created
        },
        "spec": full
    })
}

pub fn job_path(name: &str) -> String {
    format!("/apis/batch/v1/namespaces/{NS}/jobs/{name}")
}

impl Harness {
    /// Reconciles a StateMigration as stored in the fake (status included); returns the result.
    pub async fn reconcile_migration(
        &self,
        name: &str,
    ) -> (Action, statekeeper::api::StateMigration) {
        let path = migration_path(name);
        let typed: statekeeper::api::StateMigration =
            serde_json::from_value(self.kube.get(&path).unwrap()).unwrap();
        let action =
            statekeeper::controller::state_migration::reconcile(Arc::new(typed), self.ctx.clone())
                .await
                .expect("reconcile");
        (
            action,
            serde_json::from_value(self.kube.get(&path).unwrap()).unwrap(),
        )
    }

    /// Sets a field of a stored object, as a user's `kubectl patch` would.
    pub fn patch(&self, path: &str, patch: Value) {
        let mut object = self.kube.get(path).unwrap();
        support_merge(&mut object, &patch);
        self.kube.put(path, object);
    }
}

pub fn migration_condition(
    migration: &statekeeper::api::StateMigration,
    type_: &str,
) -> (String, String, String) {
    condition(&migration.status.as_ref().unwrap().conditions, type_)
}
