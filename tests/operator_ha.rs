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
