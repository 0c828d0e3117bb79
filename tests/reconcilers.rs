//! The StateStore reconciler, called for real against a real PostgreSQL and an in-memory
//! Kubernetes API: each test asserts the status, conditions and events that result.

mod support;

use std::time::Duration;

use kube::runtime::controller::Action;
use serde_json::{Value, json};
use statekeeper::api::StateStore;
use support::TestDb;
use support::operator::*;

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
    assert_eq!(action, Action::requeue(Duration::from_secs(60)));
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
    assert_eq!(action, Action::requeue(Duration::from_secs(60)));
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

async fn janitor_runs(db: &TestDb) -> i64 {
    let mut conn = db.conn().await;
    sqlx::query_scalar("SELECT count(*) FROM sqlmesh_state.state_operations WHERE kind = 'janitor'")
        .fetch_one(&mut conn)
        .await
        .unwrap()
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
    assert_eq!(action, Action::requeue(Duration::from_secs(60)));
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
    assert_eq!(action, Action::requeue(Duration::from_secs(60)));
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

/// Events that say different things stay different Events; the same Event again is counted in
/// its series (kube's recorder folded every Event of one reason into the first one's series,
/// so that "deleted a" and "deleted b" read as "deleted a", seen twice).
#[tokio::test]
async fn events_of_different_text_are_never_folded_into_one_series() {
    let h = Harness::new();
    let regarding = k8s_openapi::api::core::v1::ObjectReference {
        kind: Some("StateExport".into()),
        namespace: Some(NS.into()),
        name: Some("nightly".into()),
        uid: Some("uid-1".into()),
        ..Default::default()
    };
    let normal = kube::runtime::events::EventType::Normal;
    for note in ["deleted \"a\"", "deleted \"b\"", "deleted \"b\""] {
        h.ctx
            .notify(&regarding, normal, "ExportPruned", "Prune", note)
            .await;
    }
    let events = h.kube.events(NS);
    let notes: Vec<(&str, i64)> = events
        .iter()
        .map(|e| {
            (
                e["note"].as_str().unwrap_or_default(),
                e["series"]["count"].as_i64().unwrap_or(1),
            )
        })
        .collect();
    assert_eq!(
        notes,
        vec![("deleted \"a\"", 1), ("deleted \"b\"", 2)],
        "{events:?}"
    );
}

/// A StateStore whose framework is not the one whose state the database holds says so in its
/// conditions, naming the spec fields to use, and creates nothing: a statekeeper store does not
/// initialise its schema beside another framework's store.
#[tokio::test]
async fn a_store_of_the_wrong_framework_says_which_one_the_database_holds() {
    let db = TestDb::new().await;
    db.store("analytics").await.init(None).await.unwrap();
    let h = Harness::new();
    put_secret(&h.kube, "pg-credentials", &[("password", &db.password())]);
    let (_, store) = h
        .reconcile(&store_for(
            &db,
            "lake",
            json!({"framework": "meltano", "schema": "public"}),
        ))
        .await;
    let (ready, reason, message) = condition(&store, "Ready");
    assert_eq!((ready, reason), ("False", "WrongFramework"));
    assert!(
        message.contains("statekeeper state in schema \"analytics\"")
            && message.contains("spec.framework: statekeeper, spec.schema: analytics"),
        "{message}"
    );
    assert_eq!(condition(&store, "Stalled").0, "True", "{store:?}");
}

/// A full connection budget is not an unreachable database: a store that finds every one of the
/// operator's connections busy waits for one, and when the wait is long says so in Reconciling
/// while Ready keeps what was last observed (on a leader takeover, stores in eight of eleven
/// databases had turned Ready=False "DatabaseUnreachable" with PostgreSQL healthy).
#[tokio::test]
async fn a_store_waits_for_a_connection_slot_and_stays_ready() {
    let (a_db, b_db) = (TestDb::new().await, TestDb::new().await);
    let h = Harness::with_settings(statekeeper::controller::Settings {
        max_db_connections: 1,
        connections_per_database: 1,
        connection_slot_wait: Duration::from_millis(800),
        ..Default::default()
    });
    put_secret(&h.kube, "pg-credentials", &[("password", &a_db.password())]);
    let (a, b) = (
        store_for(&a_db, "a", json!({})),
        store_for(&b_db, "b", json!({})),
    );
    assert_eq!(condition(&h.reconcile(&a).await.1, "Ready").0, "True");
    // B takes the one connection slot (A's pool is idle, so it is closed to make room).
    assert_eq!(condition(&h.reconcile(&b).await.1, "Ready").0, "True");

    // B's next check holds that connection for a while (it waits for a table lock).
    let mut locker = b_db.conn().await;
    sqlx::raw_sql("BEGIN; LOCK TABLE sqlmesh_state.model_versions IN ACCESS EXCLUSIVE MODE")
        .execute(&mut locker)
        .await
        .unwrap();
    let ((_, _), (action, waited)) = tokio::join!(h.reconcile(&b), async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let checked = h.reconcile(&a).await;
        // B's check may go on now.
        sqlx::query("ROLLBACK").execute(&mut locker).await.unwrap();
        checked
    });
    let (ready, reason, _) = condition(&waited, "Ready");
    assert_eq!((ready, reason), ("True", "StoreReady"), "Ready stands");
    let (reconciling, reason, message) = condition(&waited, "Reconciling");
    assert_eq!((reconciling, reason), ("True", "WaitingForConnection"));
    assert!(message.contains("--max-db-connections"), "{message}");
    assert_eq!(
        action,
        Action::requeue(Duration::from_secs(5)),
        "no backoff"
    );
    assert!(
        !h.event_reasons()
            .iter()
            .any(|(_, r)| r == "DatabaseUnreachable"),
        "{:?}",
        h.event_reasons()
    );

    // Once a connection is free, A is checked as usual.
    let (_, again) = h.reconcile(&a).await;
    assert_eq!(condition(&again, "Ready").0, "True");
    assert_eq!(condition(&again, "Reconciling").1, "StoreReady");
}
