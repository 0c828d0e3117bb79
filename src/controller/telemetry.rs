//! Prometheus metrics and the operator's HTTP endpoints: /metrics, /healthz, /readyz.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub kind: &'static str,
    /// `Ready`, or the condition reason of the failure: a small, fixed set.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ObjectLabels {
    pub namespace: String,
    pub name: String,
}

pub struct Metrics {
    registry: Registry,
    pub reconciliations: Family<OutcomeLabels, Counter>,
    pub reconcile_duration: Family<KindLabels, Histogram>,
    pub store_ready: Family<ObjectLabels, Gauge>,
    pub store_schema_version: Family<ObjectLabels, Gauge>,
    pub janitor_runs: Family<OutcomeLabels, Counter>,
    pub janitor_removed_rows: Counter,
    pub export_attempts: Family<OutcomeLabels, Counter>,
    pub export_bytes: Counter,
    pub export_last_success: Family<ObjectLabels, Gauge>,
    /// 1 while this instance runs the controllers.
    pub leader: Gauge,
    ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("statekeeper");
        let reconciliations = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "reconciliations",
            "Reconciliations by resource kind and outcome",
            reconciliations.clone(),
        );
        let reconcile_duration = Family::<KindLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.005, 2.0, 14))
        });
        registry.register(
            "reconcile_duration_seconds",
            "Time spent in one reconciliation",
            reconcile_duration.clone(),
        );
        let store_ready = Family::<ObjectLabels, Gauge>::default();
        registry.register(
            "store_ready",
            "1 when the StateStore is Ready, else 0",
            store_ready.clone(),
        );
        let store_schema_version = Family::<ObjectLabels, Gauge>::default();
        registry.register(
            "store_schema_version",
            "Schema version of each StateStore",
            store_schema_version.clone(),
        );
        let janitor_runs = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "janitor_runs",
            "Scheduled janitor runs by outcome",
            janitor_runs.clone(),
        );
        let janitor_removed_rows = Counter::default();
        registry.register(
            "janitor_removed_rows",
            "Rows removed by scheduled janitor runs",
            janitor_removed_rows.clone(),
        );
        let export_attempts = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "export_attempts",
            "StateExport attempts by outcome (Succeeded, or the failure's reason)",
            export_attempts.clone(),
        );
        let export_bytes = Counter::default();
        registry.register(
            "export_bytes",
            "Bytes written by successful StateExports",
            export_bytes.clone(),
        );
        let export_last_success = Family::<ObjectLabels, Gauge>::default();
        registry.register(
            "export_last_success_timestamp_seconds",
            "Unix time of the last successful export of each schedule (or one-shot StateExport); alert when it grows old",
            export_last_success.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this instance runs the controllers (holds the Lease, or runs without leader election)",
            leader.clone(),
        );
        Self {
            registry,
            leader,
            export_attempts,
            export_bytes,
            export_last_success,
            janitor_runs,
            janitor_removed_rows,
            reconciliations,
            reconcile_duration,
            store_ready,
            store_schema_version,
            ready: AtomicBool::new(false),
        }
    }
}

impl Metrics {
    pub fn record_reconcile(&self, kind: &'static str, outcome: &str, took: Duration) {
        self.count_reconcile(kind, outcome);
        self.observe_reconcile_duration(kind, took);
    }

    /// A reconcile's outcome (the reason of the Ready condition it wrote).
    pub fn count_reconcile(&self, kind: &'static str, outcome: &str) {
        self.reconciliations
            .get_or_create(&OutcomeLabels {
                kind,
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// How long a whole reconcile took, whatever its outcome.
    pub fn observe_reconcile_duration(&self, kind: &'static str, took: Duration) {
        self.reconcile_duration
            .get_or_create(&KindLabels { kind })
            .observe(took.as_secs_f64());
    }

    pub fn record_janitor_run(&self, outcome: &str, removed_rows: u64) {
        self.janitor_runs
            .get_or_create(&OutcomeLabels {
                kind: "StateStore",
                outcome: outcome.to_owned(),
            })
            .inc();
        self.janitor_removed_rows.inc_by(removed_rows);
    }

    /// One export attempt; `backup` names the schedule of a scheduled run (else the export).
    pub fn record_export(
        &self,
        namespace: &str,
        backup: &str,
        outcome: &str,
        bytes: u64,
        finished_unix_seconds: i64,
    ) {
        self.export_attempts
            .get_or_create(&OutcomeLabels {
                kind: "StateExport",
                outcome: outcome.to_owned(),
            })
            .inc();
        if outcome == "Succeeded" {
            self.export_bytes.inc_by(bytes);
            self.export_last_success
                .get_or_create(&ObjectLabels {
                    namespace: namespace.to_owned(),
                    name: backup.to_owned(),
                })
                .set(finished_unix_seconds);
        }
    }

    /// Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "could not encode metrics");
        }
        out
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    /// Marks the operator ready once it can talk to the API server.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}

/// Serves /metrics, /healthz and /readyz until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "http accept failed");
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(route(&req, &metrics)) }
            });
            if let Err(error) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%error, "http connection ended with an error");
            }
        });
    }
}

fn route(req: &Request<Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match req.uri().path() {
        "/metrics" => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.render(),
        ),
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
        "/readyz" if metrics.is_ready() => (StatusCode::OK, "text/plain", "ready\n".to_owned()),
        "/readyz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "not ready: the Kubernetes API has not answered yet\n".to_owned(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

/// Binds the HTTP endpoints; fails early and clearly when the address is taken.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
