//! The operator process: its command-line settings, the HTTP endpoints, leader election and
//! the three controllers with what wakes each.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Secret;
use kube::api::ListParams;
use kube::runtime::WatchStreamExt;
use kube::runtime::controller::Controller;
use kube::runtime::watcher::{self, watcher};
use kube::{Api, Client};

use super::context::{Context, FIELD_MANAGER, Settings};
use super::pool_cache::SLOT_WAIT;
use super::{state_export, state_migration, state_store, telemetry, wakeups};
use crate::api::StateStore;
use crate::api::labels::MANAGED_BY;

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
    /// Seconds between checks of a healthy store: how long an outage of its database can go
    /// unreported at most (a check that changes nothing writes nothing).
    #[arg(long, default_value_t = 60)]
    pub resync_seconds: u64,
    /// Default seconds to wait when connecting to a database.
    #[arg(long, default_value_t = 10)]
    pub connect_timeout_seconds: u64,
    /// Seconds an operation waits for another one on the same store (or a framework's writer)
    /// before it reports the store busy and tries again later.
    #[arg(long, default_value_t = 30)]
    pub lock_timeout_seconds: u64,
    /// Seconds before the first retry of a resource that failed (an unreachable database, a
    /// missing Secret); each further failure doubles it, up to --max-backoff-seconds.
    #[arg(long, default_value_t = 5)]
    pub min_backoff_seconds: u64,
    /// The longest wait between retries: after an outage of any length, everything is checked
    /// again at most this long after the database is back.
    #[arg(long, default_value_t = 60)]
    pub max_backoff_seconds: u64,
    /// Database connections the operator holds at most, all stores together (stores in one
    /// database share a pool; idle pools of other databases are closed to make room).
    #[arg(long, default_value_t = 16)]
    pub max_db_connections: u32,
    /// Database connections one database (every store in it) gets at most.
    #[arg(long, default_value_t = 4)]
    pub connections_per_database: u32,
    /// Address of the HTTP endpoints /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub http_addr: std::net::SocketAddr,
    /// Run the controllers only while holding a coordination.k8s.io Lease, so that several
    /// replicas never run the same operation (one leads, the others stand by).
    #[arg(long, env = "STATEKEEPER_LEADER_ELECT")]
    pub leader_elect: bool,
    /// Name of the Lease.
    #[arg(long, default_value = "statekeeper")]
    pub lease_name: String,
    /// Namespace of the Lease (default: POD_NAMESPACE, else the watched namespace, else default).
    #[arg(long, env = "STATEKEEPER_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// Seconds a Lease holds without renewal: the longest a failover takes.
    #[arg(long, default_value_t = 15)]
    pub lease_duration_seconds: u64,
    /// The leader renews this many seconds before its Lease would expire.
    #[arg(long, default_value_t = 5)]
    pub lease_grace_seconds: u64,
}

impl OperatorArgs {
    pub fn settings(&self) -> Settings {
        Settings {
            resync_interval: Duration::from_secs(self.resync_seconds.max(10)),
            connect_timeout: Duration::from_secs(self.connect_timeout_seconds.max(1)),
            lock_timeout: Duration::from_secs(self.lock_timeout_seconds.max(1)),
            min_backoff: Duration::from_secs(self.min_backoff_seconds.max(1)),
            max_backoff: Duration::from_secs(
                self.max_backoff_seconds
                    .max(self.min_backoff_seconds.max(1)),
            ),
            max_db_connections: self.max_db_connections.max(1),
            connections_per_database: self.connections_per_database.max(1),
            connection_slot_wait: SLOT_WAIT,
        }
    }
}

/// Runs the operator until SIGTERM/SIGINT: the HTTP endpoints, then (as the leader, with
/// `--leader-elect`) the controllers.
pub async fn run(args: OperatorArgs) -> Result<(), StartError> {
    let listener = telemetry::bind(args.http_addr)
        .await
        .map_err(|source| StartError::Listen {
            addr: args.http_addr,
            source,
        })?;
    // The address actually bound: with port 0, the only place the port is told.
    if let Ok(bound) = listener.local_addr() {
        tracing::info!(address = %bound, "serving /metrics, /healthz and /readyz");
    }
    let client = Client::try_default().await?;
    let ctx = Arc::new(Context::new(client, args.settings()));
    let http = tokio::spawn(telemetry::serve(listener, ctx.metrics.clone()));
    let stop = tokio_util::sync::CancellationToken::new();
    let signal = stop.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        signal.cancel();
    });
    let identity = std::env::var("POD_NAME").unwrap_or_else(|_| {
        format!(
            "{}-{}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "statekeeper".into()),
            std::process::id()
        )
    });
    let result = operate(ctx, &args, identity, stop).await;
    http.abort();
    tracing::info!("statekeeper operator stopped");
    result
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// The operator on a client: ready as soon as the API server answers, then the controllers —
/// always, or (with `--leader-elect`) only while this instance holds the Lease. Losing the Lease
/// stops the controllers at once (in-flight operations are dropped; each is one transaction, so
/// nothing half-done remains); `stop` ends them gracefully and releases the Lease.
pub async fn operate(
    ctx: Arc<Context>,
    args: &OperatorArgs,
    identity: String,
    stop: tokio_util::sync::CancellationToken,
) -> Result<(), StartError> {
    // Ready once the API server answers a list of our resources (proves CRDs and RBAC). A standby
    // is ready too: it serves probes and waits for the Lease.
    let stores: Api<StateStore> = scoped(&ctx.client, args);
    stores.list(&ListParams::default().limit(1)).await?;
    ctx.metrics.set_ready(true);
    tracing::info!(namespace = ?args.namespace, %identity, leader_elect = args.leader_elect, "statekeeper operator started");
    if !args.leader_elect {
        controllers(ctx, args, stop).await;
        return Ok(());
    }
    let lease_namespace = args
        .lease_namespace
        .clone()
        .or_else(|| std::env::var("POD_NAMESPACE").ok())
        .or_else(|| args.namespace.clone())
        .unwrap_or_else(|| "default".into());
    // The Lease's namespace may not exist yet (created by the same GitOps sync, or later): wait
    // for it, saying why, rather than exit.
    let mut retry = Duration::from_secs(1);
    let manager = loop {
        let built =
            kube_lease_manager::LeaseManagerBuilder::new(ctx.client.clone(), &args.lease_name)
                .with_namespace(&lease_namespace)
                .with_identity(&identity)
                .with_duration(args.lease_duration_seconds.max(2))
                .with_grace(
                    args.lease_grace_seconds
                        .clamp(1, args.lease_duration_seconds.max(2) - 1),
                )
                .with_field_manager(format!("{FIELD_MANAGER}-{identity}"))
                .build()
                .await;
        match built {
            Ok(manager) => break manager,
            Err(error) => {
                tracing::warn!(
                    %error,
                    namespace = %lease_namespace,
                    lease = %args.lease_name,
                    retry_in_seconds = retry.as_secs(),
                    "cannot take part in leader election yet (does the Lease's namespace exist?); retrying"
                );
                tokio::select! {
                    () = stop.cancelled() => return Ok(()),
                    () = tokio::time::sleep(retry) => {}
                }
                retry = (retry * 2).min(Duration::from_secs(30));
            }
        }
    };
    let (mut leader, lease_task) = manager.watch().await;
    'election: loop {
        // A standby: wait for the Lease (or the end).
        while !*leader.borrow_and_update() {
            tokio::select! {
                () = stop.cancelled() => break 'election,
                changed = leader.changed() => if changed.is_err() { break 'election },
            }
        }
        tracing::info!(%identity, lease = %args.lease_name, "acquired the lease: running the controllers");
        ctx.metrics.set_leader(true);
        let work = controllers(ctx.clone(), args, stop.clone());
        tokio::pin!(work);
        let mut lost = leader.clone();
        tokio::select! {
            () = &mut work => break 'election,
            () = async {
                while *lost.borrow_and_update() {
                    if lost.changed().await.is_err() {
                        break;
                    }
                }
            } => {
                tracing::warn!(%identity, "lost the lease: stopped the controllers");
                ctx.metrics.set_leader(false);
            }
        }
    }
    ctx.metrics.set_leader(false);
    // Closing the channel ends the manager's task; then the Lease is released for the standby.
    drop(leader);
    if let Ok(Ok(manager)) = lease_task.await
        && let Err(error) = manager.release().await
    {
        tracing::warn!(%error, "could not release the lease");
    }
    Ok(())
}

/// The API of a kind in the watched namespace, or in all namespaces.
fn scoped<K>(client: &Client, args: &OperatorArgs) -> Api<K>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match &args.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// The three controllers, until `stop` (graceful: running reconciles finish).
async fn controllers(
    ctx: Arc<Context>,
    args: &OperatorArgs,
    stop: tokio_util::sync::CancellationToken,
) {
    let stores: Api<StateStore> = scoped(&ctx.client, args);
    let exports: Api<crate::api::StateExport> = scoped(&ctx.client, args);
    let migrations: Api<crate::api::StateMigration> = scoped(&ctx.client, args);
    let jobs: Api<Job> = scoped(&ctx.client, args);
    let secrets: Api<kube::core::PartialObjectMeta<Secret>> = scoped(&ctx.client, args);
    // Only the Jobs statekeeper made: their progress wakes the object that owns them.
    let our_jobs = || {
        watcher::Config::default()
            .labels(&format!("{}={}", MANAGED_BY.0, MANAGED_BY.1))
            .any_semantic()
    };
    // Secret changes (metadata only) wake the stores and exports that read them.
    let secret_changes =
        || watcher(secrets.clone(), watcher::Config::default().any_semantic()).touched_objects();
    // Reconciles at once per controller: about the database connections there are, so that
    // a thousand stores queue here rather than time out waiting for a connection.
    let limit = || {
        kube::runtime::controller::Config::default()
            .concurrency(u16::try_from(ctx.settings.max_db_connections).unwrap_or(u16::MAX))
    };
    let store_controller =
        Controller::new(stores.clone(), watcher::Config::default().any_semantic())
            .with_config(limit());
    let store_cache = store_controller.store();
    let store_cache_for_exports = store_cache.clone();
    let store_controller = store_controller
        .owns(jobs.clone(), our_jobs())
        .watches_stream(secret_changes(), move |secret| {
            wakeups::stores_using(&secret, &store_cache.state())
        })
        // A finished StateMigration shows in its store's status at once (the new version).
        .watches(
            migrations.clone(),
            watcher::Config::default().any_semantic(),
            |migration| wakeups::store_of_finished_migration(&migration),
        )
        .graceful_shutdown_on(stop.clone().cancelled_owned())
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
            .with_config(limit());
    let export_cache = export_controller.store();
    let exports_by_store = export_cache.clone();
    let export_controller = export_controller
        .owns(exports, watcher::Config::default().any_semantic())
        // A store appearing (or changing) wakes the exports that wait for it.
        .watches(
            stores,
            watcher::Config::default().any_semantic(),
            move |store| wakeups::exports_of_store(&store, &exports_by_store.state()),
        )
        .watches_stream(secret_changes(), move |secret| {
            wakeups::exports_using(
                &secret,
                &export_cache.state(),
                &store_cache_for_exports.state(),
            )
        })
        .graceful_shutdown_on(stop.clone().cancelled_owned())
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
            .with_config(limit())
            .owns(jobs, our_jobs())
            .graceful_shutdown_on(stop.cancelled_owned())
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
}
