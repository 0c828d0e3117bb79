//! The operator's HTTP endpoints over a real socket.

use std::sync::Arc;

use statekeeper::controller::telemetry::{self, Metrics};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let code = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, body)
}

#[tokio::test]
async fn health_readiness_and_metrics_endpoints() {
    let listener = telemetry::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let metrics = Arc::new(Metrics::default());
    let server = tokio::spawn(telemetry::serve(listener, metrics.clone()));

    assert_eq!(get(addr, "/healthz").await.0, 200);
    let (code, body) = get(addr, "/readyz").await;
    assert_eq!(code, 503, "not ready before the API server answered");
    assert!(body.contains("not ready"));
    metrics.set_ready(true);
    assert_eq!(get(addr, "/readyz").await.0, 200);

    metrics.record_reconcile(
        "StateStore",
        "StoreReady",
        std::time::Duration::from_millis(12),
    );
    let (code, body) = get(addr, "/metrics").await;
    assert_eq!(code, 200);
    assert!(
        body.contains(
            r#"statekeeper_reconciliations_total{kind="StateStore",outcome="StoreReady"} 1"#
        ),
        "{body}"
    );
    assert!(
        body.contains("statekeeper_reconcile_duration_seconds_count"),
        "{body}"
    );
    assert_eq!(get(addr, "/nope").await.0, 404);
    server.abort();
}

#[tokio::test]
async fn a_taken_address_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let err = telemetry::bind(taken.local_addr().unwrap())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
}

/// With `--http-addr 127.0.0.1:0` the operator tells the port it bound, first thing (here it then
/// stops: there is no cluster to talk to).
#[test]
fn the_operator_logs_the_address_it_bound() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_statekeeper"))
        .args(["operator", "--http-addr", "127.0.0.1:0"])
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap();
    let logs = String::from_utf8_lossy(&out.stderr);
    let line = logs
        .lines()
        .find(|l| l.contains("serving /metrics"))
        .unwrap_or_else(|| panic!("no address logged: {logs}"));
    let log: serde_json::Value = serde_json::from_str(line).unwrap();
    let address = log["fields"]["address"].as_str().unwrap_or_default();
    let port: u16 = address
        .rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!(address.starts_with("127.0.0.1:") && port > 0, "{line}");
}
