//! The operator: one reconciler per resource, sharing a context (client, events, pools).

pub mod conditions;
pub mod export_schedule;
pub mod runner;
pub mod schedule;
pub mod state_export;
pub mod state_migration;
pub mod state_store;
pub mod store_janitor;
pub mod telemetry;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::ListParams;
use kube::runtime::controller::Controller;
use kube::runtime::events::{Event, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Api, Client};

use crate::api::StateStore;
use crate::engine::{ConnectionSettings, Error as EngineError};
use state_store::PoolCache;
use telemetry::Metrics;

/// The one field manager every status write uses (server-side apply).
pub const FIELD_MANAGER: &str = "statekeeper";

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("Kubernetes API error: {0}")]
    Kube(#[from] kube::Error),
    #[error("the resource has no namespace")]
    NotNamespaced,
}

/// Why the operator could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot reach the Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("cannot listen on {addr} for /metrics, /healthz and /readyz: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

#[derive(clap::Args, Debug, Clone)]
pub struct OperatorArgs {
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "STATEKEEPER_WATCH_NAMESPACE")]
    pub namespace: Option<String>,
    /// Seconds between checks of a healthy store.
    #[arg(long, default_value_t = 300)]
    pub resync_seconds: u64,
    /// Default seconds to wait when connecting to a database.
    #[arg(long, default_value_t = 10)]
    pub connect_timeout_seconds: u64,
    /// Seconds an operation waits for another one on the same store (or a framework's writer)
    /// before it reports the store busy and tries again later.
    #[arg(long, default_value_t = 30)]
    pub lock_timeout_seconds: u64,
    /// Address of the HTTP endpoints /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub http_addr: std::net::SocketAddr,
}

#[derive(Clone, Debug)]
pub struct Settings {
    pub resync_interval: Duration,
    pub connect_timeout: Duration,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// How long an operation waits for another one on the same store before it reports busy.
    pub lock_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            resync_interval: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(10),
            min_backoff: Duration::from_secs(5),
            max_backoff: Duration::from_secs(300),
            lock_timeout: crate::engine::store::DEFAULT_LOCK_TIMEOUT,
        }
    }
}

/// Shared by every reconcile call.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub settings: Settings,
    pub metrics: Arc<Metrics>,
    pools: PoolCache,
    failures: tokio::sync::Mutex<HashMap<String, u32>>,
    /// A pinned time for tests; the wall clock when unset.
    clock: std::sync::Mutex<Option<k8s_openapi::jiff::Timestamp>>,
}

impl Context {
    pub fn new(client: Client, settings: Settings) -> Self {
        let reporter = Reporter {
            controller: "statekeeper".into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            settings,
            metrics: Arc::default(),
            pools: PoolCache::default(),
            failures: Default::default(),
            clock: Default::default(),
        }
    }

    /// Now, as reconcilers see it.
    pub fn now(&self) -> k8s_openapi::jiff::Timestamp {
        self.clock
            .lock()
            .ok()
            .and_then(|pinned| *pinned)
            .unwrap_or_else(k8s_openapi::jiff::Timestamp::now)
    }

    /// Pins the reconcilers' clock (tests of schedules); `None` returns to the wall clock.
    pub fn set_clock(&self, now: Option<k8s_openapi::jiff::Timestamp>) {
        if let Ok(mut pinned) = self.clock.lock() {
            *pinned = now;
        }
    }

    /// Publishes an Event with `note` cut to the API server's limit (best effort, as `publish`).
    pub async fn notify(
        &self,
        reference: &ObjectReference,
        type_: kube::runtime::events::EventType,
        reason: &str,
        action: &str,
        note: &str,
    ) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note.chars().take(1000).collect()),
            action: action.into(),
            secondary: None,
        };
        self.publish(&event, reference).await;
    }

    /// Like [`Context::notify`], for one occurrence of something that repeats (a janitor run, an
    /// export attempt). kube's recorder folds Events of one reason into a series that keeps the
    /// first note; naming the occurrence (as the related object's field path) gives each its own
    /// Event with its own note.
    pub async fn notify_occurrence(
        &self,
        reference: &ObjectReference,
        type_: kube::runtime::events::EventType,
        reason: &str,
        action: &str,
        note: &str,
        occurrence: &str,
    ) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note.chars().take(1000).collect()),
            action: action.into(),
            secondary: Some(ObjectReference {
                field_path: Some(occurrence.into()),
                ..reference.clone()
            }),
        };
        self.publish(&event, reference).await;
    }

    /// Events are best effort: a refused event must not fail the reconcile that caused it.
    pub async fn publish(&self, event: &Event, reference: &ObjectReference) {
        if let Err(error) = self.recorder.publish(event, reference).await {
            tracing::warn!(%error, reason = %event.reason, "could not publish event");
        }
    }

    async fn pool_for(
        &self,
        key: &str,
        settings: &ConnectionSettings,
        secrets: &[String],
    ) -> Result<sqlx::PgPool, EngineError> {
        self.pools.get_or_connect(key, settings, secrets).await
    }

    async fn forget_pool(&self, key: &str) {
        self.pools.forget(key).await;
    }

    /// Exponential backoff per object: min_backoff, doubling, capped at max_backoff.
    async fn next_backoff(&self, key: &str) -> Duration {
        let mut failures = self.failures.lock().await;
        let n = failures.entry(key.to_owned()).or_insert(0);
        let delay = self
            .settings
            .min_backoff
            .saturating_mul(2u32.saturating_pow(*n))
            .min(self.settings.max_backoff);
        *n = n.saturating_add(1);
        delay
    }

    async fn reset_failures(&self, key: &str) {
        self.failures.lock().await.remove(key);
    }
}

/// Runs the controllers until SIGTERM/SIGINT.
pub async fn run(args: OperatorArgs) -> Result<(), StartError> {
    let listener = telemetry::bind(args.http_addr)
        .await
        .map_err(|source| StartError::Listen {
            addr: args.http_addr,
            source,
        })?;
    let client = Client::try_default().await?;
    let settings = Settings {
        resync_interval: Duration::from_secs(args.resync_seconds.max(10)),
        connect_timeout: Duration::from_secs(args.connect_timeout_seconds.max(1)),
        lock_timeout: Duration::from_secs(args.lock_timeout_seconds.max(1)),
        ..Settings::default()
    };
    let ctx = Arc::new(Context::new(client.clone(), settings));
    let (stores, exports, migrations, jobs): (
        Api<StateStore>,
        Api<crate::api::StateExport>,
        Api<crate::api::StateMigration>,
        Api<Job>,
    ) = match &args.namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client, ns),
        ),
        None => (
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client),
        ),
    };
    // Only the Jobs statekeeper made: their progress wakes the object that owns them.
    let our_jobs = || {
        watcher::Config::default()
            .labels(&format!(
                "{}={}",
                runner::MANAGED_BY.0,
                runner::MANAGED_BY.1
            ))
            .any_semantic()
    };
    let http = tokio::spawn(telemetry::serve(listener, ctx.metrics.clone()));
    // Ready once the API server answers a list of our resources (proves CRDs and RBAC).
    stores.list(&ListParams::default().limit(1)).await?;
    ctx.metrics.set_ready(true);
    tracing::info!(namespace = ?args.namespace, http = %args.http_addr, "statekeeper operator started");
    let store_controller = Controller::new(stores, watcher::Config::default().any_semantic())
        .owns(jobs.clone(), our_jobs())
        .shutdown_on_signal()
        .run(
            state_store::reconcile,
            state_store::error_policy,
            ctx.clone(),
        )
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => tracing::debug!(store = %object.name, "reconciled"),
                Err(error) => tracing::warn!(%error, "reconcile error"),
            }
        });
    // A schedule owns its one-shot children: a child's progress wakes its schedule.
    let export_controller =
        Controller::new(exports.clone(), watcher::Config::default().any_semantic())
            .owns(exports, watcher::Config::default().any_semantic())
            .shutdown_on_signal()
            .run(
                state_export::reconcile,
                state_export::error_policy,
                ctx.clone(),
            )
            .for_each(|result| async move {
                match result {
                    Ok((object, _)) => tracing::debug!(export = %object.name, "reconciled"),
                    Err(error) => tracing::warn!(%error, "reconcile error"),
                }
            });
    let migration_controller =
        Controller::new(migrations, watcher::Config::default().any_semantic())
            .owns(jobs, our_jobs())
            .shutdown_on_signal()
            .run(
                state_migration::reconcile,
                state_migration::error_policy,
                ctx,
            )
            .for_each(|result| async move {
                match result {
                    Ok((object, _)) => tracing::debug!(migration = %object.name, "reconciled"),
                    Err(error) => tracing::warn!(%error, "reconcile error"),
                }
            });
    futures::join!(store_controller, export_controller, migration_controller);
    http.abort();
    tracing::info!("statekeeper operator stopped");
    Ok(())
}
