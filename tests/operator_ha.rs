//! Two operators against one API server (the in-memory one, which enforces resourceVersion
//! preconditions and server-side apply conflicts as a real one does), with leader election on a
//! Lease: one leads, the other stands by; when the leader is killed the standby takes over
//! within the Lease's duration, and no export or run-now request runs twice across the failover.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{Value, json};
use statekeeper::controller::{Context, OperatorArgs, operate};
use support::TestDb;
use support::fake_kube::FakeKube;
use support::operator::*;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    operator: OperatorArgs,
}

fn args() -> OperatorArgs {
    Args::parse_from([
        "statekeeper",
        "--namespace",
        NS,
        "--leader-elect",
        "--lease-namespace",
        NS,
        "--lease-duration-seconds",
        "3",
        "--lease-grace-seconds",
        "1",
    ])
    .operator
}

struct Replica {
    ctx: Arc<Context>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

fn start(kube: &FakeKube, identity: &str) -> Replica {
    let args = args();
    let mut settings = args.settings();
    settings.lock_timeout = Duration::from_secs(2);
    let ctx = Arc::new(Context::new(kube.client(), settings));
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let (ctx, stop, identity) = (ctx.clone(), stop.clone(), identity.to_owned());
        async move {
            operate(ctx, &args, identity, stop).await.expect("operator");
        }
    });
    Replica { ctx, stop, task }
}

fn is_leader(replica: &Replica) -> bool {
    replica
        .ctx
        .metrics
        .render()
        .lines()
        .any(|l| l == "statekeeper_leader 1")
}

async fn until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !check() {
        assert!(started.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    started.elapsed()
}

fn phase(kube: &FakeKube, path: &str) -> Option<String> {
    kube.get(path)
        .and_then(|o| o["status"]["phase"].as_str().map(str::to_owned))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_standby_takes_over_within_the_lease_and_nothing_runs_twice() {
    let db = TestDb::new().await;
    generated_store(&db).await;
    let kube = FakeKube::new();
    put_secret(&kube, "pg-credentials", &[("password", &db.password())]);
    kube.put(
        &store_path("analytics"),
        store_for(&db, "analytics", json!({})),
    );
    let dir = temp_dir("ha");
    kube.put(
        &export_path("once"),
        state_export("once", &format!("file://{}/", dir.display()), json!({})),
    );
    let mut schedule = state_export(
        "nightly",
        &format!("file://{}/nightly/", dir.display()),
        json!({"schedule": "0 3 * * *"}),
    );
    schedule["metadata"]["annotations"] =
        json!({ statekeeper::controller::export_schedule::RUN_NOW_ANNOTATION: "request-1" });
    kube.put(&export_path("nightly"), schedule);

    let a = start(&kube, "replica-a");
    until("replica a to lead", Duration::from_secs(20), || {
        is_leader(&a)
    })
    .await;
    let b = start(&kube, "replica-b");
    until("both to be ready", Duration::from_secs(20), || {
        b.ctx.metrics.is_ready()
    })
    .await;
    let run_now_child = export_path(
        &statekeeper::controller::export_schedule::run_now_child_name("nightly", "request-1"),
    );
    until("the exports to finish", Duration::from_secs(60), || {
        phase(&kube, &export_path("once")).as_deref() == Some("Succeeded")
            && phase(&kube, &run_now_child).as_deref() == Some("Succeeded")
    })
    .await;
    assert!(!is_leader(&b), "one leader at a time");

    // The leader dies without releasing its Lease (kill -9); the standby takes over.
    a.task.abort();
    let killed = Instant::now();
    until("replica b to lead", Duration::from_secs(20), || {
        is_leader(&b)
    })
    .await;
    let failover = killed.elapsed();
    println!(
        "failover: {:.2} s (lease duration 3 s)",
        failover.as_secs_f64()
    );
    assert!(
        failover <= Duration::from_secs(6),
        "failover took {failover:?}"
    );

    // The new leader reconciles everything again: nothing runs a second time.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let once = kube.get(&export_path("once")).unwrap();
    assert_eq!(once["status"]["attempts"], 1, "{once}");
    let children: Vec<Value> = kube
        .list(&format!(
            "/apis/statekeeper.dev/v1alpha1/namespaces/{NS}/stateexports"
        ))
        .into_iter()
        .filter(|e| e["metadata"]["labels"]["statekeeper.dev/schedule"] == "nightly")
        .collect();
    assert_eq!(children.len(), 1, "one child for one run-now request");
    let running: Vec<Value> = kube
        .events(NS)
        .into_iter()
        .filter(|e| e["reason"] == "ExportRunning")
        .collect();
    assert_eq!(running.len(), 2, "one attempt per export: {running:?}");

    // A graceful stop releases the Lease.
    b.stop.cancel();
    tokio::time::timeout(Duration::from_secs(20), b.task)
        .await
        .expect("stops")
        .unwrap();
    let lease = kube
        .get(&format!(
            "/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/statekeeper"
        ))
        .expect("the lease");
    assert!(lease["spec"]["holderIdentity"].is_null(), "{lease}");
    let _ = a.stop;
    std::fs::remove_dir_all(&dir).unwrap();
}

/// 6. A fixed Secret wakes the store that reads it at once, not on its retry timer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fixed_secret_makes_its_store_ready_at_once() {
    let db = TestDb::new().await;
    generated_store(&db).await;
    let kube = FakeKube::new();
    put_secret(&kube, "pg-credentials", &[("password", "wrong-password")]);
    kube.put(
        &store_path("analytics"),
        store_for(&db, "analytics", json!({})),
    );
    let args = Args::parse_from(["statekeeper", "--namespace", NS]).operator;
    let ctx = Arc::new(Context::new(kube.client(), args.settings()));
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let (ctx, stop) = (ctx.clone(), stop.clone());
        async move {
            operate(ctx, &args, "solo".into(), stop)
                .await
                .expect("operator")
        }
    });
    let ready_reason = || {
        kube.get(&store_path("analytics")).and_then(|s| {
            s["status"]["conditions"]
                .as_array()
                .and_then(|c| c.iter().find(|c| c["type"] == "Ready").cloned())
                .map(|c| c["reason"].as_str().unwrap_or_default().to_owned())
        })
    };
    until(
        "the wrong password to show",
        Duration::from_secs(20),
        || ready_reason().as_deref() == Some("AuthenticationFailed"),
    )
    .await;
    // The next retry is at least 5 s away (min backoff); the watch must not wait for it.
    put_secret(&kube, "pg-credentials", &[("password", &db.password())]);
    let took = until("the store to recover", Duration::from_secs(20), || {
        ready_reason().as_deref() == Some("StoreReady")
    })
    .await;
    println!(
        "recovered {:.2} s after the Secret was fixed",
        took.as_secs_f64()
    );
    assert!(took < Duration::from_secs(3), "recovery took {took:?}");
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .expect("stops")
        .unwrap();
}

/// An operator started before the Lease's namespace exists (one GitOps sync creating both) waits
/// for it, and leads once it exists, instead of exiting.
#[tokio::test]
async fn an_operator_waits_for_the_lease_namespace_instead_of_exiting() {
    let kube = FakeKube::new();
    kube.enforce_namespaces();
    let replica = start(&kube, "early");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!replica.task.is_finished(), "the operator is still running");
    assert!(!is_leader(&replica));
    kube.put(
        &format!("/api/v1/namespaces/{NS}"),
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}),
    );
    until("the operator to lead", Duration::from_secs(10), || {
        is_leader(&replica)
    })
    .await;
    replica.stop.cancel();
    replica.task.await.unwrap();
}

/// A single operator (no leader election) on the in-memory API server, until `stop`.
fn solo(kube: &FakeKube, extra: &[&str]) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let args = Args::parse_from(
        ["statekeeper", "--namespace", NS]
            .iter()
            .chain(extra)
            .copied(),
    )
    .operator;
    let ctx = Arc::new(Context::new(kube.client(), args.settings()));
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move {
            operate(ctx, &args, "solo".into(), stop)
                .await
                .expect("operator")
        }
    });
    (stop, task)
}

/// An export applied before its store (one GitOps sync, any order) runs as soon as the store
/// appears, not after its retry backoff; a StateMigration that upgraded a store shows in the
/// store's status at once, not at its next resync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_and_migrations_wake_what_waits_for_them() {
    let db = TestDb::new().await;
    let engine = db.store("sqlmesh_state").await;
    engine.init(Some(1)).await.unwrap();
    let kube = FakeKube::new();
    put_secret(&kube, "pg-credentials", &[("password", &db.password())]);
    let dir = temp_dir("wakeups");
    kube.put(
        &export_path("early"),
        state_export("early", &format!("file://{}/", dir.display()), json!({})),
    );
    // Retries and resyncs a minute apart: only a wakeup can be quick.
    let (stop, task) = solo(
        &kube,
        &["--min-backoff-seconds", "60", "--resync-seconds", "60"],
    );
    let reason = |path: &str| {
        kube.get(path).and_then(|o| {
            o["status"]["conditions"]
                .as_array()
                .and_then(|c| c.iter().find(|c| c["type"] == "Ready").cloned())
                .map(|c| c["reason"].as_str().unwrap_or_default().to_owned())
        })
    };
    until(
        "the export to wait for its store",
        Duration::from_secs(20),
        || reason(&export_path("early")).as_deref() == Some("StoreNotFound"),
    )
    .await;
    // Its next try is far off (its backoff); the store's arrival must not wait for it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    kube.put(
        &store_path("analytics"),
        store_for(&db, "analytics", json!({"initPolicy": "Never"})),
    );
    let took = until("the export to run", Duration::from_secs(30), || {
        phase(&kube, &export_path("early")).as_deref() == Some("Succeeded")
    })
    .await;
    println!(
        "the export ran {:.2} s after its store appeared",
        took.as_secs_f64()
    );
    assert!(took < Duration::from_secs(5), "took {took:?}");

    // The store is at version 1 of 3; a StateMigration upgrades it.
    until(
        "the store to report version 1",
        Duration::from_secs(20),
        || {
            kube.get(&store_path("analytics"))
                .is_some_and(|s| s["status"]["schemaVersion"] == 1)
        },
    )
    .await;
    kube.put(
        &migration_path("upgrade"),
        state_migration(
            "upgrade",
            "2026-11-27T10:00:00Z",
            json!({"upgrade": {"targetVersion": "latest"}}),
        ),
    );
    until("the upgrade to succeed", Duration::from_secs(30), || {
        phase(&kube, &migration_path("upgrade")).as_deref() == Some("Succeeded")
    })
    .await;
    let took = until(
        "the store to report version 3",
        Duration::from_secs(30),
        || {
            kube.get(&store_path("analytics"))
                .is_some_and(|s| s["status"]["schemaVersion"] == 3)
        },
    )
    .await;
    println!(
        "the store reported the upgrade {:.2} s after it succeeded",
        took.as_secs_f64()
    );
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert_eq!(
        reason(&store_path("analytics")).as_deref(),
        Some("StoreReady")
    );
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .expect("stops")
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}
