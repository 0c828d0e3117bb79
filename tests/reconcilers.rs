//! The reconcilers (StateStore, StateExport), called for real against a real PostgreSQL and an in-memory
//! Kubernetes API: each test asserts the status, conditions and events that result.

mod support;

use std::sync::Arc;
use std::time::Duration;

use base64_free::encode;
use kube::runtime::controller::Action;
use serde_json::{Value, json};
use statekeeper::api::StateStore;
use statekeeper::controller::state_store::reconcile;
use statekeeper::controller::{Context, Settings};
use support::fake_kube::FakeKube;
use support::{TestDb, url_parts};

const NS: &str = "data";

/// Minimal standard base64 for Secret data, so the tests need no extra crate.
mod base64_free {
    pub fn encode(input: &[u8]) -> String {
        const TABLE: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in input.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(TABLE[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}

fn store_path(name: &str) -> String {
    format!("/apis/statekeeper.dev/v1alpha1/namespaces/{NS}/statestores/{name}")
}

fn put_secret(kube: &FakeKube, name: &str, data: &[(&str, &str)]) {
    let data: serde_json::Map<String, Value> = data
        .iter()
        .map(|(k, v)| (k.to_string(), json!(encode(v.as_bytes()))))
        .collect();
    kube.put(
        &format!("/api/v1/namespaces/{NS}/secrets/{name}"),
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": NS}, "data": data}),
    );
}

/// A StateStore connecting by host/port/user with a password Secret.
fn store_for(db: &TestDb, name: &str, extra_spec: Value) -> Value {
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

fn support_merge(target: &mut Value, patch: &Value) {
    if let (Value::Object(t), Value::Object(p)) = (&mut *target, patch) {
        for (k, v) in p {
            support_merge(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    } else {
        *target = patch.clone();
    }
}

struct Harness {
    kube: FakeKube,
    ctx: Arc<Context>,
}

impl Harness {
    fn new() -> Self {
        let kube = FakeKube::new();
        let settings = Settings {
            connect_timeout: Duration::from_secs(3),
            ..Settings::default()
        };
        let ctx = Arc::new(Context::new(kube.client(), settings));
        Self { kube, ctx }
    }

    /// Stores the object, reconciles it, and returns the action and the object as stored after.
    async fn reconcile(&self, object: &Value) -> (Action, StateStore) {
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

    fn event_reasons(&self) -> Vec<(String, String)> {
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

fn condition<'a>(store: &'a StateStore, type_: &str) -> (&'a str, &'a str, &'a str) {
    let c = store
        .status
        .as_ref()
        .unwrap()
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .unwrap_or_else(|| panic!("no {type_} condition"));
    (c.status.as_str(), c.reason.as_str(), c.message.as_str())
}

#[tokio::test]
async fn ready_path_initializes_and_reports_the_store() {
    let db = TestDb::new().await;
    let h = Harness::new();
    put_secret(&h.kube, "pg-credentials", &[("password", &db.password())]);
    let object = store_for(&db, "analytics", json!({}));

    let (action, store) = h.reconcile(&object).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(300)));
    let status = store.status.clone().unwrap();
    assert_eq!(status.phase.as_deref(), Some("Ready"));
    assert_eq!(status.observed_generation, Some(1));
    assert_eq!(status.schema_version, Some(3));
    assert_eq!(status.latest_schema_version, Some(3));
    assert_eq!(status.counts.as_ref().unwrap()["model_versions"], 0);
    assert_eq!(condition(&store, "Ready").0, "True");
    assert_eq!(condition(&store, "Stalled").0, "False");
    assert_eq!(condition(&store, "Reconciling").0, "False");
    assert_eq!(
        condition(&store, "Connected"),
        ("True", "Connected", "connected to the database")
    );
    assert_eq!(condition(&store, "Initialized").1, "InitializedNow");
    assert_eq!(condition(&store, "SchemaUpToDate").1, "UpToDate");
    assert_eq!(
        h.event_reasons(),
        vec![
            ("Normal".into(), "Initializing".into()),
            ("Normal".into(), "StoreReady".into()),
            ("Normal".into(), "InitializedNow".into()),
        ]
    );
    // The database really was initialised.
    assert!(
        db.store("sqlmesh_state")
            .await
            .status()
            .await
            .unwrap()
            .initialized
    );

    // A second pass changes nothing that matters and emits no events.
    let ready_since = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap()
        .last_transition_time
        .clone();
    let (_, again) = h.reconcile(&object).await;
    let again_status = again.status.clone().unwrap();
    assert_eq!(condition(&again, "Initialized").1, "Initialized");
    assert_eq!(
        again_status
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .unwrap()
            .last_transition_time,
        ready_since
    );
    assert_eq!(h.event_reasons().len(), 3);
    assert!(
        !h.kube.dump().contains(&db.password()),
        "the password reached the API"
    );
    let metrics = h.ctx.metrics.render();
    assert!(
        metrics.contains(r#"statekeeper_store_ready{namespace="data",name="analytics"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics
            .contains(r#"statekeeper_store_schema_version{namespace="data",name="analytics"} 3"#)
    );
    assert!(metrics.contains(
        r#"statekeeper_reconciliations_total{kind="StateStore",outcome="StoreReady"} 2"#
    ));
    // Status writes are watch events that wake the reconciler: a pass that finds nothing new
    // does not write again, so the operator settles instead of looping.
    let status_writes = || {
        h.kube
            .requests()
            .iter()
            .filter(|(method, path)| method == "PATCH" && path.ends_with("/status"))
            .count()
    };
    assert_eq!(
        status_writes(),
        2,
        "the second pass changed Initialized's reason"
    );
    h.reconcile(&object).await;
    h.reconcile(&object).await;
    assert_eq!(
        status_writes(),
        2,
        "an unchanged status is not written again"
    );
    // Only status and events were written: never the spec.
    for (method, path) in h.kube.requests() {
        if method == "PATCH" || method == "POST" || method == "PUT" {
            assert!(
                path.ends_with("/status") || path.contains("/events"),
                "{method} {path}"
            );
        }
    }
}

#[tokio::test]
async fn url_secret_connections_work_too() {
    let db = TestDb::new().await;
    let h = Harness::new();
    put_secret(&h.kube, "pg-url", &[("url", &db.url)]);
    let mut object = store_for(&db, "by-url", json!({}));
    object["spec"]["connection"] = json!({"urlSecretRef": {"name": "pg-url", "key": "url"}});
    let (_, store) = h.reconcile(&object).await;
    assert_eq!(condition(&store, "Ready").0, "True");
    assert!(!h.kube.dump().contains(&db.password()));
}

#[tokio::test]
async fn missing_secret_and_missing_key_say_what_to_fix() {
    let db = TestDb::new().await;
    let h = Harness::new();
    let object = store_for(&db, "analytics", json!({}));

    let (action, store) = h.reconcile(&object).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(5)));
    assert_eq!(
        store.status.as_ref().unwrap().phase.as_deref(),
        Some("Failed")
    );
    let (status, reason, message) = condition(&store, "Connected");
    assert_eq!((status, reason), ("False", "SecretNotFound"));
    assert!(
        message.contains("\"pg-credentials\"") && message.contains(NS),
        "{message}"
    );
    assert_eq!(condition(&store, "Ready").1, "SecretNotFound");
    assert_eq!(condition(&store, "Stalled").0, "True");
    assert_eq!(
        h.event_reasons(),
        vec![("Warning".into(), "SecretNotFound".into())]
    );
    assert!(
        h.ctx
            .metrics
            .render()
            .contains(r#"statekeeper_store_ready{namespace="data",name="analytics"} 0"#)
    );

    // Backoff grows while the problem persists.
    let (action, _) = h.reconcile(&object).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(10)));
    assert_eq!(
        h.event_reasons().len(),
        1,
        "no repeated event for the same problem"
    );

    put_secret(&h.kube, "pg-credentials", &[("pasword", "typo-key-value")]);
    let (_, store) = h.reconcile(&object).await;
    let (_, reason, message) = condition(&store, "Connected");
    assert_eq!(reason, "SecretKeyMissing");
    assert!(
        message.contains("\"password\"") && message.contains("pasword"),
        "{message}"
    );
    assert!(
        !message.contains("typo-key-value"),
        "never the value: {message}"
    );

    // Fixing the Secret recovers the store, with a Normal event.
    put_secret(&h.kube, "pg-credentials", &[("password", &db.password())]);
    let (action, store) = h.reconcile(&object).await;
    assert_eq!(condition(&store, "Ready").0, "True");
    assert_eq!(action, Action::requeue(Duration::from_secs(300)));
    assert!(
        h.event_reasons()
            .contains(&("Normal".into(), "StoreReady".into()))
    );
}

#[tokio::test]
async fn bad_credentials_are_reported_without_the_password() {
    let db = TestDb::new().await;
    let h = Harness::new();
    let wrong = "definitely-not-the-password";
    put_secret(&h.kube, "pg-credentials", &[("password", wrong)]);
    let object = store_for(&db, "analytics", json!({}));

    let (_, store) = h.reconcile(&object).await;
    let (status, reason, message) = condition(&store, "Connected");
    assert_eq!((status, reason), ("False", "AuthenticationFailed"));
    assert!(message.contains("postgres"), "names the user: {message}");
    assert_eq!(condition(&store, "Ready").1, "AuthenticationFailed");
    assert!(
        h.event_reasons()
            .contains(&("Warning".into(), "AuthenticationFailed".into()))
    );
    let everything = h.kube.dump();
    assert!(!everything.contains(wrong) && !everything.contains(&db.password()));

    // The cached pool follows the Secret: fixing it heals the store, breaking it again is seen.
    put_secret(&h.kube, "pg-credentials", &[("password", &db.password())]);
    let (_, store) = h.reconcile(&object).await;
    assert_eq!(condition(&store, "Ready").0, "True");
    put_secret(&h.kube, "pg-credentials", &[("password", wrong)]);
    let (_, store) = h.reconcile(&object).await;
    assert_eq!(condition(&store, "Connected").1, "AuthenticationFailed");
    assert_eq!(
        store.status.as_ref().unwrap().schema_version,
        Some(3),
        "last known version kept"
    );
}

#[tokio::test]
async fn unreachable_database_is_reported() {
    let db = TestDb::new().await;
    let h = Harness::new();
    put_secret(&h.kube, "pg-credentials", &[("password", &db.password())]);
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let object = store_for(&db, "analytics", json!({"connection": {"port": port}}));

    let (_, store) = h.reconcile(&object).await;
    let (status, reason, message) = condition(&store, "Connected");
    assert_eq!((status, reason), ("False", "DatabaseUnreachable"));
    assert!(message.contains(&format!("127.0.0.1:{port}")), "{message}");
    assert_eq!(condition(&store, "Stalled").0, "True");
    assert!(
        h.event_reasons()
            .contains(&("Warning".into(), "DatabaseUnreachable".into()))
    );
}

#[tokio::test]
async fn never_policy_on_an_empty_database_creates_nothing() {
    let db = TestDb::new().await;
    let h = Harness::new();
    put_secret(&h.kube, "pg-credentials", &[("password", &db.password())]);
    let object = store_for(&db, "analytics", json!({"initPolicy": "Never"}));

    let (_, store) = h.reconcile(&object).await;
    assert_eq!(condition(&store, "Connected").0, "True");
    let (status, reason, message) = condition(&store, "Initialized");
    assert_eq!((status, reason), ("False", "NotInitialized"));
    assert!(
        message.contains("initPolicy") && message.contains("statekeeper state init"),
        "{message}"
    );
    assert_eq!(condition(&store, "Ready").0, "False");
    assert_eq!(
        store.status.as_ref().unwrap().phase.as_deref(),
        Some("Failed")
    );
    assert!(
        h.event_reasons()
            .contains(&("Warning".into(), "NotInitialized".into()))
    );
    let mut conn = db.conn().await;
    assert!(
        !support::schemas(&mut conn)
            .await
            .contains(&"sqlmesh_state".to_string())
    );
}

#[tokio::test]
async fn older_and_newer_schemas_are_reported() {
    let db = TestDb::new().await;
    let h = Harness::new();
    put_secret(&h.kube, "pg-credentials", &[("password", &db.password())]);
    db.store("sqlmesh_state").await.init(Some(1)).await.unwrap();
    let object = store_for(&db, "analytics", json!({}));

    let (_, store) = h.reconcile(&object).await;
    assert_eq!(
        condition(&store, "Ready").0,
        "True",
        "an older schema still works"
    );
    let (status, reason, message) = condition(&store, "SchemaUpToDate");
    assert_eq!((status, reason), ("False", "UpgradeAvailable"));
    assert!(message.contains("version 1 of 3"), "{message}");
    assert_eq!(store.status.as_ref().unwrap().schema_version, Some(1));
    assert!(
        h.event_reasons()
            .contains(&("Normal".into(), "UpgradeAvailable".into()))
    );

    let mut conn = db.conn().await;
    sqlx::query("INSERT INTO sqlmesh_state.state_versions VALUES (9, 'x', 'from a newer statekeeper', now())")
        .execute(&mut conn)
        .await
        .unwrap();
    let (_, store) = h.reconcile(&object).await;
    let (status, reason, message) = condition(&store, "Ready");
    assert_eq!((status, reason), ("False", "SchemaNewerThanOperator"));
    assert!(message.contains("version 9"), "{message}");
    assert_eq!(condition(&store, "Stalled").0, "True");
}

#[tokio::test]
async fn invalid_schema_in_spec_is_stalled_with_a_reason() {
    let db = TestDb::new().await;
    let h = Harness::new();
    put_secret(&h.kube, "pg-credentials", &[("password", &db.password())]);
    let object = store_for(&db, "analytics", json!({"schema": "Bad-Name"}));
    let (_, store) = h.reconcile(&object).await;
    let (status, reason, message) = condition(&store, "Ready");
    assert_eq!((status, reason), ("False", "InvalidSpec"));
    assert!(message.contains("Bad-Name"), "{message}");
    assert_eq!(condition(&store, "Stalled").0, "True");
}

fn janitor_store(db: &TestDb, janitor: Value) -> Value {
    let mut object = store_for(db, "analytics", json!({ "janitor": janitor }));
    object["metadata"]["creationTimestamp"] = json!("2026-11-21T00:30:00Z");
    object
}

fn at(ctx: &Context, time: &str) {
    ctx.set_clock(Some(time.parse().unwrap()));
}

async fn janitor_runs(db: &TestDb) -> i64 {
    let mut conn = db.conn().await;
    sqlx::query_scalar("SELECT count(*) FROM sqlmesh_state.state_operations WHERE kind = 'janitor'")
        .fetch_one(&mut conn)
        .await
        .unwrap()
}

async fn generated_store(db: &TestDb) {
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

#[tokio::test]
async fn scheduled_janitor_runs_like_a_cronjob() {
    let db = TestDb::new().await;
    generated_store(&db).await;
    let h = Harness::new();
    put_secret(&h.kube, "pg-credentials", &[("password", &db.password())]);
    let object = janitor_store(
        &db,
        json!({"schedule": "0 3 * * *", "timeZone": "Europe/Berlin", "keepCheckpoints": 3, "checkpointMinAge": "5d", "versionGracePeriod": "1h", "batchSize": 200}),
    );

    // 02:00 in Berlin: not yet. The next run is 03:00 CET = 02:00 UTC.
    at(&h.ctx, "2026-11-21T01:00:00Z");
    let (action, store) = h.reconcile(&object).await;
    let janitor = store.status.as_ref().unwrap().janitor.clone().unwrap();
    assert_eq!(
        janitor.next_schedule_time.as_deref(),
        Some("2026-11-21T02:00:00Z")
    );
    assert!(janitor.last_schedule_time.is_none());
    assert_eq!(action, Action::requeue(Duration::from_secs(300)));
    assert_eq!(janitor_runs(&db).await, 0);
    let versions_before = store.status.as_ref().unwrap().counts.as_ref().unwrap()["model_versions"];

    // Just after 03:00 Berlin: one run.
    at(&h.ctx, "2026-11-21T02:00:30Z");
    let (action, store) = h.reconcile(&object).await;
    let status = store.status.clone().unwrap();
    let janitor = status.janitor.clone().unwrap();
    assert_eq!(
        janitor.last_schedule_time.as_deref(),
        Some("2026-11-21T02:00:00Z")
    );
    assert_eq!(
        janitor.last_successful_time.as_deref(),
        Some("2026-11-21T02:00:30Z")
    );
    assert_eq!(
        janitor.next_schedule_time.as_deref(),
        Some("2026-11-22T02:00:00Z")
    );
    let result = janitor.last_result.unwrap();
    assert!(result.model_versions > 0 && result.expired_environments > 0 && result.checkpoints > 0);
    assert_eq!(
        status.counts.as_ref().unwrap()["model_versions"],
        versions_before - result.model_versions as i64,
        "counts are refreshed after the run"
    );
    let (cond, reason, message) = condition(&store, "JanitorSucceeded");
    assert_eq!((cond, reason), ("True", "Succeeded"));
    assert!(message.contains("model versions"), "{message}");
    assert!(
        h.event_reasons()
            .contains(&("Normal".into(), "JanitorSucceeded".into()))
    );
    assert_eq!(action, Action::requeue(Duration::from_secs(300)));
    assert_eq!(janitor_runs(&db).await, 1);

    // The same occurrence never runs twice.
    at(&h.ctx, "2026-11-21T02:10:00Z");
    let (_, store) = h.reconcile(&object).await;
    assert_eq!(janitor_runs(&db).await, 1);
    assert_eq!(condition(&store, "JanitorSucceeded").1, "Succeeded");

    // Three days of operator downtime: exactly one catch-up run, for the latest occurrence.
    at(&h.ctx, "2026-11-24T09:00:00Z");
    let (_, store) = h.reconcile(&object).await;
    assert_eq!(janitor_runs(&db).await, 2);
    assert_eq!(
        store
            .status
            .unwrap()
            .janitor
            .unwrap()
            .last_schedule_time
            .as_deref(),
        Some("2026-11-24T02:00:00Z")
    );
    at(&h.ctx, "2026-11-24T09:05:00Z");
    h.reconcile(&object).await;
    assert_eq!(janitor_runs(&db).await, 2);
}

#[tokio::test]
async fn scheduled_janitor_honours_deadline_suspend_and_reports_failures() {
    let db = TestDb::new().await;
    generated_store(&db).await;
    let h = Harness::new();
    put_secret(&h.kube, "pg-credentials", &[("password", &db.password())]);

    // Too late for the starting deadline: skipped, with a Warning, and recorded as scheduled.
    let late = janitor_store(
        &db,
        json!({"schedule": "0 * * * *", "startingDeadlineSeconds": 60}),
    );
    at(&h.ctx, "2026-11-21T10:05:00Z");
    let (_, store) = h.reconcile(&late).await;
    assert_eq!(janitor_runs(&db).await, 0);
    assert!(
        h.event_reasons()
            .contains(&("Warning".into(), "MissedSchedule".into()))
    );
    assert_eq!(
        store
            .status
            .unwrap()
            .janitor
            .unwrap()
            .last_schedule_time
            .as_deref(),
        Some("2026-11-21T10:00:00Z")
    );

    // Suspended: nothing runs and nothing is scheduled.
    let suspended = janitor_store(&db, json!({"schedule": "* * * * *", "suspend": true}));
    at(&h.ctx, "2026-11-21T11:00:30Z");
    let (_, store) = h.reconcile(&suspended).await;
    assert_eq!(janitor_runs(&db).await, 0);
    assert!(
        store
            .status
            .unwrap()
            .janitor
            .unwrap()
            .next_schedule_time
            .is_none()
    );

    // An invalid schedule is a condition with a reason; the store itself stays Ready.
    let invalid = janitor_store(&db, json!({"schedule": "0 0 3 * * *"}));
    let (_, store) = h.reconcile(&invalid).await;
    let (cond, reason, message) = condition(&store, "JanitorSucceeded");
    assert_eq!((cond, reason), ("False", "InvalidJanitorSpec"));
    assert!(message.contains("5 fields"), "{message}");
    assert_eq!(condition(&store, "Ready").0, "True");

    // A failing run (the store is too old for the janitor) turns the condition False.
    let old = TestDb::new().await;
    old.store("sqlmesh_state")
        .await
        .init(Some(2))
        .await
        .unwrap();
    let h = Harness::new();
    put_secret(&h.kube, "pg-credentials", &[("password", &old.password())]);
    let object = janitor_store(&old, json!({"schedule": "0 * * * *"}));
    at(&h.ctx, "2026-11-21T10:00:10Z");
    let (_, store) = h.reconcile(&object).await;
    let (cond, reason, message) = condition(&store, "JanitorSucceeded");
    assert_eq!((cond, reason), ("False", "SchemaTooOld"));
    assert!(message.contains("statekeeper state upgrade"), "{message}");
    assert!(
        h.event_reasons()
            .contains(&("Warning".into(), "JanitorFailed".into()))
    );
    assert!(
        h.ctx.metrics.render().contains(
            r#"statekeeper_janitor_runs_total{kind="StateStore",outcome="SchemaTooOld"} 1"#
        )
    );
}

// ---------------------------------------------------------------------------------------------
// StateExport

fn export_path(name: &str) -> String {
    format!("/apis/statekeeper.dev/v1alpha1/namespaces/{NS}/stateexports/{name}")
}

fn state_export(name: &str, url: &str, extra: Value) -> Value {
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
    async fn reconcile_export(&self, name: &str) -> (Action, statekeeper::api::StateExport) {
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

fn export_condition(
    export: &statekeeper::api::StateExport,
    type_: &str,
) -> (String, String, String) {
    let c = export
        .status
        .as_ref()
        .unwrap()
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .unwrap();
    (c.status.clone(), c.reason.clone(), c.message.clone())
}

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("sk-export-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test]
async fn state_export_runs_once_and_keeps_its_result() {
    let db = TestDb::new().await;
    generated_store(&db).await;
    let h = Harness::new();
    put_secret(&h.kube, "pg-credentials", &[("password", &db.password())]);
    h.kube.put(
        &store_path("analytics"),
        store_for(&db, "analytics", json!({})),
    );
    let dir = temp_dir("once");
    let file = dir.join("backup.json.zst");
    h.kube.put(
        &export_path("nightly"),
        state_export("nightly", &format!("file://{}", file.display()), json!({})),
    );

    let (action, export) = h.reconcile_export("nightly").await;
    assert_eq!(action, Action::await_change());
    let status = export.status.clone().unwrap();
    assert_eq!(status.phase.as_deref(), Some("Succeeded"));
    let bytes = std::fs::read(&file).expect("the export file exists");
    assert_eq!(status.bytes, Some(bytes.len() as u64));
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&bytes))
    };
    assert_eq!(status.sha256.as_deref(), Some(sha.as_str()));
    assert_eq!(status.rows.as_ref().unwrap()["model_versions"], 1_500);
    assert_eq!(status.schema_version, Some(3));
    assert_eq!(status.attempts, 1);
    assert!(status.started_at.is_some() && status.finished_at.is_some());
    assert_eq!(export_condition(&export, "Ready").1, "ExportSucceeded");
    assert!(
        h.event_reasons()
            .contains(&("Normal".into(), "ExportSucceeded".into()))
    );
    assert!(!dir.join("backup.json.partial").exists());

    // The file imports, checked against the recorded checksum.
    let target = TestDb::new().await;
    let store = target.store("sqlmesh_state").await;
    store.init(None).await.unwrap();
    store
        .import(
            std::io::Cursor::new(bytes),
            &statekeeper::engine::ImportOptions {
                mode: Default::default(),
                expected_sha256: Some(sha),
            },
        )
        .await
        .unwrap();

    // Finished exports never run again.
    std::fs::remove_file(&file).unwrap();
    let writes = h.kube.requests().len();
    let (action, _) = h.reconcile_export("nightly").await;
    assert_eq!(action, Action::await_change());
    assert!(!file.exists(), "a finished export is not re-run");
    assert_eq!(h.kube.requests().len(), writes, "and makes no API calls");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn state_export_waits_for_its_store_and_gives_up_after_its_backoff_limit() {
    let db = TestDb::new().await;
    generated_store(&db).await;
    let h = Harness::new();
    put_secret(&h.kube, "pg-credentials", &[("password", &db.password())]);
    let dir = temp_dir("retry");
    let url = format!("file://{}/x.json", dir.display());
    h.kube.put(
        &export_path("partial"),
        state_export(
            "partial",
            &url,
            json!({"environments": ["nope"], "backoffLimit": 2}),
        ),
    );
    at(&h.ctx, "2026-11-22T10:00:00Z");

    // No StateStore yet: pending, with the reason, and no attempt counted.
    let (_, export) = h.reconcile_export("partial").await;
    assert_eq!(
        export.status.as_ref().unwrap().phase.as_deref(),
        Some("Pending")
    );
    let (ready, reason, message) = export_condition(&export, "Ready");
    assert_eq!(
        (ready.as_str(), reason.as_str()),
        ("False", "StoreNotFound")
    );
    assert!(message.contains("\"analytics\""), "{message}");
    assert_eq!(export_condition(&export, "Reconciling").0, "True");
    assert_eq!(export.status.as_ref().unwrap().attempts, 0);

    // With the store, the export fails (unknown environment): attempt 1 of 2, retried later.
    h.kube.put(
        &store_path("analytics"),
        store_for(&db, "analytics", json!({})),
    );
    let (action, export) = h.reconcile_export("partial").await;
    let status = export.status.clone().unwrap();
    assert_eq!(
        (status.phase.as_deref(), status.attempts),
        (Some("Pending"), 1)
    );
    let (_, reason, message) = export_condition(&export, "Ready");
    assert_eq!(reason, "UnknownEnvironments");
    assert!(
        message.contains("attempt 1 of 2") && message.contains("nope"),
        "{message}"
    );
    assert_eq!(action, Action::requeue(Duration::from_secs(10)));
    assert!(
        h.event_reasons()
            .contains(&("Warning".into(), "UnknownEnvironments".into()))
    );

    // Woken early (its own status write is a watch event): it waits out the backoff.
    at(&h.ctx, "2026-11-22T10:00:04Z");
    let (action, export) = h.reconcile_export("partial").await;
    assert_eq!(export.status.unwrap().attempts, 1);
    assert_eq!(action, Action::requeue(Duration::from_secs(6)));

    // After the backoff: the last attempt fails, and the export is Failed for good.
    at(&h.ctx, "2026-11-22T10:00:11Z");
    let (action, export) = h.reconcile_export("partial").await;
    let status = export.status.clone().unwrap();
    assert_eq!(
        (status.phase.as_deref(), status.attempts),
        (Some("Failed"), 2)
    );
    assert_eq!(export_condition(&export, "Stalled").0, "True");
    assert_eq!(action, Action::await_change());
    at(&h.ctx, "2026-11-22T11:00:00Z");
    let (_, export) = h.reconcile_export("partial").await;
    assert_eq!(
        export.status.unwrap().attempts,
        2,
        "no attempt after Failed"
    );
    assert!(
        std::fs::read_dir(&dir).unwrap().next().is_none(),
        "failed attempts leave no files"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn state_export_with_an_unusable_destination_fails_at_once() {
    let h = Harness::new();
    h.kube.put(
        &export_path("bad"),
        state_export("bad", "file://relative/../path.json", json!({})),
    );
    let (action, export) = h.reconcile_export("bad").await;
    assert_eq!(action, Action::await_change());
    assert_eq!(
        export.status.as_ref().unwrap().phase.as_deref(),
        Some("Failed")
    );
    let (_, reason, message) = export_condition(&export, "Ready");
    assert_eq!(reason, "UnsupportedDestination");
    assert!(message.contains("absolute path"), "{message}");
}
