//! What every reconcile shares: the client, the settings, Events, metrics, the database pools,
//! the per-object backoff and the clock; and the one way a status is written.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Api, Patch, PatchParams};
use kube::core::NamespaceResourceScope;
use kube::runtime::events::Event;
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use super::events::EventPublisher;
use super::pool_cache::{PoolCache, PoolError, SLOT_WAIT};
use super::telemetry::Metrics;
use crate::engine::{ConnectionSettings, DEFAULT_LOCK_TIMEOUT};

/// The one field manager every status write uses (server-side apply).
pub const FIELD_MANAGER: &str = "statekeeper";

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("Kubernetes API error: {0}")]
    Kube(#[from] kube::Error),
    #[error("the resource has no namespace")]
    NotNamespaced,
}

#[derive(Clone, Debug)]
pub struct Settings {
    pub resync_interval: Duration,
    pub connect_timeout: Duration,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// How long an operation waits for another one on the same store before it reports busy.
    pub lock_timeout: Duration,
    /// Database connections the operator holds at most, all stores together.
    pub max_db_connections: u32,
    /// Database connections one database (every store in it) gets at most.
    pub connections_per_database: u32,
    /// How long a reconcile waits for a free connection slot before it reports the wait.
    pub connection_slot_wait: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            resync_interval: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
            min_backoff: Duration::from_secs(5),
            max_backoff: Duration::from_secs(60),
            lock_timeout: DEFAULT_LOCK_TIMEOUT,
            max_db_connections: 16,
            connections_per_database: 4,
            connection_slot_wait: SLOT_WAIT,
        }
    }
}

/// Shared by every reconcile call.
pub struct Context {
    pub client: Client,
    pub events: EventPublisher,
    pub settings: Settings,
    pub metrics: Arc<Metrics>,
    pools: PoolCache,
    failures: tokio::sync::Mutex<HashMap<String, u32>>,
    /// A pinned time for tests; the wall clock when unset.
    clock: std::sync::Mutex<Option<k8s_openapi::jiff::Timestamp>>,
}

impl Context {
    pub fn new(client: Client, settings: Settings) -> Self {
        Self {
            events: EventPublisher::new(
                client.clone(),
                "statekeeper",
                std::env::var("POD_NAME").ok(),
            ),
            client,
            pools: PoolCache::new(
                settings.max_db_connections,
                settings.connections_per_database,
            )
            .with_slot_wait(settings.connection_slot_wait),
            settings,
            metrics: Arc::default(),
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
        self.publish(&event(type_, reason, action, note, None), reference)
            .await;
    }

    /// Like [`Context::notify`], for one occurrence of something that repeats (a janitor run, an
    /// export attempt), named as the related object's field path: two occurrences that happen to
    /// say the same are still two Events, not a series.
    pub async fn notify_occurrence(
        &self,
        reference: &ObjectReference,
        type_: kube::runtime::events::EventType,
        reason: &str,
        action: &str,
        note: &str,
        occurrence: &str,
    ) {
        let occurrence = ObjectReference {
            field_path: Some(occurrence.into()),
            ..reference.clone()
        };
        let event = event(type_, reason, action, note, Some(occurrence));
        self.publish(&event, reference).await;
    }

    /// Events are best effort: a refused event must not fail the reconcile that caused it.
    pub async fn publish(&self, event: &Event, reference: &ObjectReference) {
        if let Err(error) = self.events.publish(event, reference).await {
            tracing::warn!(%error, reason = %event.reason, "could not publish event");
        }
    }

    pub(super) async fn pool_for(
        &self,
        key: &str,
        settings: &ConnectionSettings,
        secrets: &[String],
    ) -> Result<sqlx::PgPool, PoolError> {
        self.pools.get_or_connect(key, settings, secrets).await
    }

    pub(super) async fn forget_pool(&self, key: &str) {
        self.pools.forget(key).await;
    }

    /// Exponential backoff per object: min_backoff, doubling, capped at max_backoff.
    pub(super) async fn next_backoff(&self, key: &str) -> Duration {
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

    pub(super) async fn reset_failures(&self, key: &str) {
        self.failures.lock().await.remove(key);
    }

    /// Writes `status` as the object's status: server-side apply through the status
    /// subresource, with the one field manager, taking the fields over from any other manager.
    pub async fn apply_status<K>(
        &self,
        object: &K,
        status: &impl Serialize,
    ) -> Result<(), ReconcileError>
    where
        K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
            + Clone
            + Debug
            + DeserializeOwned,
    {
        let namespace = object.namespace().ok_or(ReconcileError::NotNamespaced)?;
        let api: Api<K> = Api::namespaced(self.client.clone(), &namespace);
        let patch = json!({
            "apiVersion": K::api_version(&()),
            "kind": K::kind(&()),
            "status": status,
        });
        api.patch_status(
            &object.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
        Ok(())
    }
}

/// An Event with `note` cut to the API server's limit.
fn event(
    type_: kube::runtime::events::EventType,
    reason: &str,
    action: &str,
    note: &str,
    secondary: Option<ObjectReference>,
) -> Event {
    Event {
        type_,
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: action.into(),
        secondary,
    }
}
