//! The StateStore reconciler: connect, initialise when allowed, report what the store is.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};
use serde_json::json;
use sha2::{Digest, Sha256};
use sqlx::PgPool;

use super::conditions::{self, Desired, READY, RECONCILING, STALLED};
use super::store_janitor;
use super::telemetry::ObjectLabels;
use super::{Context, FIELD_MANAGER, ReconcileError};
use crate::api::SecretKeyRef;
use crate::api::state_store::{
    BackupStatus, ConfigMapKeyRef, InitPolicy, JanitorSpec, StateStore, StateStoreStatus,
    StoreFramework, TlsSpec,
};
use crate::engine::{
    ConnectionParts, ConnectionSettings, Error as EngineError, InitReport, SchemaName,
    StatusReport, Store, TlsMaterial, redact,
};

pub const CONNECTED: &str = "Connected";
pub const INITIALIZED: &str = "Initialized";
pub const SCHEMA_UP_TO_DATE: &str = "SchemaUpToDate";
/// The reason while a store waits for one of the operator's database connections.
pub const WAITING_FOR_CONNECTION: &str = "WaitingForConnection";

/// What the reconciler found, before it is turned into conditions.
#[derive(Debug)]
pub enum Observation {
    /// The spec cannot work as written (e.g. an invalid schema name).
    InvalidSpec(String),
    /// A Secret the connection needs is missing or unusable.
    SecretProblem {
        reason: &'static str,
        message: String,
    },
    /// The database could not be reached or refused us.
    ConnectFailed {
        reason: &'static str,
        message: String,
    },
    /// The store's tables do not exist, and statekeeper may not (`initPolicy: Never`) or cannot
    /// (the framework creates them) create them.
    NotInitialized { message: String },
    /// Every database connection of this operator is in use (`--max-db-connections`) and none
    /// became free in time: nothing is known about the store, nothing is wrong with it.
    WaitingForConnection { message: String },
    /// The store answered, but is not something this operator can manage.
    StoreFailed {
        reason: &'static str,
        message: String,
    },
    Observed {
        report: Box<StatusReport>,
        initialized_now: Option<InitReport>,
    },
}

impl Observation {
    /// Why the store cannot be used (the reason and message of `Ready=False`); None when healthy.
    pub fn problem(&self) -> Option<(String, String)> {
        if let Observation::WaitingForConnection { message } = self {
            return Some((WAITING_FOR_CONNECTION.into(), message.clone()));
        }
        decide(self)
            .into_iter()
            .find(|d| d.type_ == READY && !d.status)
            .map(|d| (d.reason, d.message))
    }
}

/// Conditions for an observation. Pure, so tests can check every branch directly.
pub fn decide(observation: &Observation) -> Vec<Desired> {
    let failed = |connected: Option<(bool, &str, &str)>,
                  initialized: Option<(bool, &str, &str)>,
                  reason: &str,
                  message: &str| {
        let mut out = vec![
            Desired::new(READY, false, reason, message),
            Desired::new(
                RECONCILING,
                false,
                reason,
                "waiting for the problem to be fixed; retrying with backoff",
            ),
            Desired::new(STALLED, true, reason, message),
        ];
        if let Some((status, r, m)) = connected {
            out.push(Desired::new(CONNECTED, status, r, m));
        }
        if let Some((status, r, m)) = initialized {
            out.push(Desired::new(INITIALIZED, status, r, m));
        }
        out
    };
    match observation {
        // Only Reconciling says so; every other condition keeps what was last observed.
        Observation::WaitingForConnection { message } => vec![Desired::new(
            RECONCILING,
            true,
            WAITING_FOR_CONNECTION,
            message,
        )],
        Observation::InvalidSpec(message) => failed(None, None, "InvalidSpec", message),
        Observation::SecretProblem { reason, message }
        | Observation::ConnectFailed { reason, message } => {
            failed(Some((false, reason, message)), None, reason, message)
        }
        Observation::NotInitialized { message } => failed(
            Some((true, "Connected", "connected to the database")),
            Some((false, "NotInitialized", message)),
            "NotInitialized",
            message,
        ),
        Observation::StoreFailed { reason, message } => failed(
            Some((true, "Connected", "connected to the database")),
            None,
            reason,
            message,
        ),
        Observation::Observed {
            report,
            initialized_now,
        } => {
            let initialized_message = match initialized_now {
                Some(init) => format!(
                    "initialized schema \"{}\" at version {}",
                    init.schema, init.to_version
                ),
                None => format!("schema \"{}\" is initialized", report.schema),
            };
            let profile = report.framework.profile();
            let up_to_date = if !profile.owns_schema {
                Desired::new(
                    SCHEMA_UP_TO_DATE,
                    true,
                    "ManagedByFramework",
                    format!(
                        "{} migrates its own state tables; {}",
                        profile.display_name,
                        report
                            .framework
                            .describe_version(report.current_version, &report.versions)
                    ),
                )
            } else if report.pending.is_empty() {
                Desired::new(
                    SCHEMA_UP_TO_DATE,
                    true,
                    "UpToDate",
                    format!("schema version {} is the latest", report.current_version),
                )
            } else {
                Desired::new(
                    SCHEMA_UP_TO_DATE,
                    false,
                    "UpgradeAvailable",
                    format!(
                        "schema version {} of {}: {} migration(s) pending; apply a StateMigration with \
                         `upgrade: {{targetVersion: latest}}` (examples/statemigration-upgrade.yaml) \
                         or run `statekeeper state upgrade`",
                        report.current_version,
                        report.latest_version.unwrap_or(report.current_version),
                        report.pending.len()
                    ),
                )
            };
            let count = |t: &str| report.counts.get(t).copied().unwrap_or(0);
            let ready = if profile.owns_schema {
                format!(
                    "schema \"{}\" at version {}: {} model versions, {} environments, {} backups",
                    report.schema,
                    report.current_version,
                    count("model_versions"),
                    count("virtual_environments"),
                    report.backups.len()
                )
            } else {
                format!(
                    "{} state in schema \"{}\" ({}): {}, {} backups",
                    profile.display_name,
                    report.schema,
                    report
                        .framework
                        .describe_version(report.current_version, &report.versions),
                    profile
                        .counts
                        .iter()
                        .filter(|c| !c.name.contains("epoch"))
                        .map(|c| format!("{} {}", count(c.name), c.name.replace('_', " ")))
                        .collect::<Vec<_>>()
                        .join(", "),
                    report.backups.len()
                )
            };
            vec![
                Desired::new(READY, true, "StoreReady", ready),
                Desired::new(RECONCILING, false, "StoreReady", "nothing to do"),
                Desired::new(STALLED, false, "StoreReady", "the store is healthy"),
                Desired::new(CONNECTED, true, "Connected", "connected to the database"),
                Desired::new(
                    INITIALIZED,
                    true,
                    if initialized_now.is_some() {
                        "InitializedNow"
                    } else {
                        "Initialized"
                    },
                    initialized_message,
                ),
                up_to_date,
            ]
        }
    }
}

/// The printer-column phase, derived from the conditions.
pub fn phase(conds: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition]) -> &'static str {
    if conditions::is_true(conds, READY) {
        "Ready"
    } else if conditions::is_true(conds, RECONCILING) {
        "Initializing"
    } else {
        "Failed"
    }
}

/// Events for conditions that changed status or reason since the last status.
pub fn transition_events(
    previous: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    next: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
) -> Vec<Event> {
    let mut events = Vec::new();
    for condition in next {
        if ![READY, CONNECTED, INITIALIZED, SCHEMA_UP_TO_DATE].contains(&condition.type_.as_str()) {
            continue;
        }
        let before = conditions::find(previous, &condition.type_);
        let healthy = condition.status == "True";
        // A failure whose reason changes is news; a healthy condition only when it turns healthy.
        let changed = before.is_none_or(|b| {
            b.status != condition.status || (!healthy && b.reason != condition.reason)
        });
        if !changed {
            continue;
        }
        // A first observation of a healthy state is not news, except Ready itself.
        if before.is_none()
            && healthy
            && condition.type_ != READY
            && condition.reason != "InitializedNow"
        {
            continue;
        }
        // One problem shows in several conditions (Connected and Ready): one event says it.
        if events.iter().any(|e: &Event| e.reason == condition.reason) {
            continue;
        }
        events.push(Event {
            type_: if healthy || condition.reason == "UpgradeAvailable" {
                EventType::Normal
            } else {
                EventType::Warning
            },
            reason: condition.reason.clone(),
            note: Some(condition.message.chars().take(1000).collect()),
            action: condition.type_.clone(),
            secondary: None,
        });
    }
    events
}

pub async fn reconcile(
    store: Arc<StateStore>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    let started = std::time::Instant::now();
    let namespace = store.namespace().ok_or(ReconcileError::NotNamespaced)?;
    let name = store.name_any();
    let key = format!("{namespace}/{name}");
    let (mut observation, secrets, engine) = observe(&store, &namespace, &key, &ctx).await;
    let healthy = matches!(observation, Observation::Observed { .. });
    let previous = store.status.clone().unwrap_or_default();
    let reference = store.object_ref(&());

    // The scheduled janitor runs only against a healthy store.
    let janitor = match (&store.spec.janitor, &engine) {
        (
            Some(
                spec @ JanitorSpec {
                    runner: Some(runner),
                    ..
                },
            ),
            Some(engine),
        ) => Some(
            store_janitor::runner_step(
                spec,
                runner,
                &store,
                previous.janitor.as_ref(),
                conditions::find(&previous.conditions, store_janitor::JANITOR_SUCCEEDED),
                engine,
                &ctx,
                &reference,
            )
            .await,
        ),
        (Some(spec), Some(engine)) => {
            let created = store
                .meta()
                .creation_timestamp
                .as_ref()
                .map_or_else(|| ctx.now(), |t| t.0);
            let step = store_janitor::step(
                spec,
                &store.spec.unsuffixed_virtual_env,
                previous.janitor.as_ref(),
                conditions::find(&previous.conditions, store_janitor::JANITOR_SUCCEEDED),
                created,
                engine,
                &ctx,
                &reference,
            )
            .await;
            if step.changed_store
                && let Ok(report) = engine.status().await
                && let Observation::Observed {
                    report: observed, ..
                } = &mut observation
            {
                **observed = report;
            }
            Some(step)
        }
        _ => None,
    };

    let waiting = matches!(observation, Observation::WaitingForConnection { .. });
    let mut desired = decide(&observation);
    if waiting {
        // A full connection budget is not news about the store: what was last observed stands.
        desired.extend(
            previous
                .conditions
                .iter()
                .filter(|c| c.type_ != RECONCILING && c.type_ != store_janitor::JANITOR_SUCCEEDED)
                .filter_map(|c| {
                    [READY, STALLED, CONNECTED, INITIALIZED, SCHEMA_UP_TO_DATE]
                        .into_iter()
                        .find(|t| *t == c.type_)
                        .map(|t| {
                            Desired::new(t, c.status == "True", c.reason.clone(), c.message.clone())
                        })
                }),
        );
    }
    match &janitor {
        Some(step) => desired.extend(step.condition.clone()),
        // While the store cannot be observed, the last janitor verdict still stands.
        None if store.spec.janitor.is_some() => desired.extend(
            conditions::find(&previous.conditions, store_janitor::JANITOR_SUCCEEDED).map(|c| {
                Desired::new(
                    store_janitor::JANITOR_SUCCEEDED,
                    c.status == "True",
                    c.reason.clone(),
                    c.message.clone(),
                )
            }),
        ),
        None => {}
    }
    let desired: Vec<Desired> = desired
        .into_iter()
        .map(|mut d| {
            let secret_refs: Vec<&str> = secrets.iter().map(String::as_str).collect();
            d.message = redact(&d.message, &secret_refs);
            d
        })
        .collect();
    let now = ctx.now();
    let conds = conditions::merge(&previous.conditions, &desired, store.meta().generation, now);
    let mut status = StateStoreStatus {
        observed_generation: store.meta().generation,
        phase: Some(phase(&conds).into()),
        framework: Some(crate::engine::Framework::from(store.spec.framework).to_string()),
        latest_schema_version: (store.spec.framework == StoreFramework::Statekeeper)
            .then(|| crate::engine::MigrationChain::shipped().latest()),
        last_checked_time: Some(now.to_string()),
        conditions: conds,
        janitor: match &janitor {
            Some(step) => Some(step.status.clone()),
            None if store.spec.janitor.is_some() => previous.janitor.clone(),
            None => None,
        },
        ..Default::default()
    };
    if let Observation::Observed { report, .. } = &observation {
        status.schema_version = Some(report.current_version);
        status.framework_versions = (!report.versions.is_empty()).then(|| report.versions.clone());
        status.counts = Some(report.counts.clone());
        status.backups = Some(
            report
                .backups
                .iter()
                .map(|b| BackupStatus {
                    id: b.id.clone(),
                    created_at: b.created_at.to_rfc3339(),
                    schema_version: b.schema_version,
                    reason: b.reason.clone(),
                    rows: b.rows,
                })
                .collect(),
        );
    } else {
        // Keep the last known facts about the store while it cannot be observed.
        status.schema_version = previous.schema_version;
        status.framework_versions = previous.framework_versions.clone();
        status.counts = previous.counts.clone();
        status.backups = previous.backups.clone();
    }

    // Every status write is a watch event that wakes this reconciler again, and costs the API
    // server a write: write only when something changed. An idle store costs no writes at all
    // (a thousand of them included); `lastCheckedTime` is when the status last changed.
    let changed = {
        let mut before = previous.clone();
        let mut after = status.clone();
        before.last_checked_time = None;
        after.last_checked_time = None;
        before != after
    };
    if changed {
        write_status(&ctx, &namespace, &name, &status).await?;
    }
    for event in transition_events(&previous.conditions, &status.conditions) {
        ctx.publish(&event, &reference).await;
    }

    let labels = ObjectLabels {
        namespace: namespace.clone(),
        name: name.clone(),
    };
    if !waiting {
        ctx.metrics
            .store_ready
            .get_or_create(&labels)
            .set(i64::from(healthy));
    }
    if let Some(version) = status.schema_version {
        ctx.metrics
            .store_schema_version
            .get_or_create(&labels)
            .set(i64::from(version));
    }
    let outcome =
        conditions::find(&status.conditions, READY).map_or("Unknown", |c| c.reason.as_str());
    ctx.metrics
        .record_reconcile("StateStore", outcome, started.elapsed());

    Ok(if healthy {
        ctx.reset_failures(&key).await;
        Action::requeue(janitor.map_or(ctx.settings.resync_interval, |step| step.requeue))
    } else if waiting {
        // Not a failure: no backoff, another try as soon as connections may have come free.
        Action::requeue(ctx.settings.min_backoff)
    } else {
        Action::requeue(ctx.next_backoff(&key).await)
    })
}

/// Called by the controller runtime when `reconcile` itself failed (the API server refused us).
pub fn error_policy(store: Arc<StateStore>, error: &ReconcileError, _ctx: Arc<Context>) -> Action {
    tracing::warn!(store = %store.name_any(), %error, "reconcile failed");
    Action::requeue(Duration::from_secs(15))
}

async fn write_status(
    ctx: &Context,
    namespace: &str,
    name: &str,
    status: &StateStoreStatus,
) -> Result<(), ReconcileError> {
    let api: Api<StateStore> = Api::namespaced(ctx.client.clone(), namespace);
    let patch = json!({
        "apiVersion": "statekeeper.dev/v1alpha1",
        "kind": "StateStore",
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

/// Connects (through the pool cache), initialises when allowed, and reads the store's status.
/// Also returns the secret values it read, so that callers can redact them from messages.
/// Connects to a StateStore's database through the pool cache. On success, returns the engine
/// handle and the secret values read (for redaction); otherwise what went wrong, as an observation.
pub async fn connect(
    store: &StateStore,
    namespace: &str,
    ctx: &Context,
) -> Result<(Store, Vec<String>), (Observation, Vec<String>)> {
    let key = format!("{namespace}/{}", store.name_any());
    let schema = SchemaName::new(store.spec.schema_name())
        .map_err(|e| (Observation::InvalidSpec(e.to_string()), Vec::new()))?;
    let (settings, secrets) = resolve_connection(store, namespace, ctx)
        .await
        .map_err(|observation| (observation, Vec::new()))?;
    match ctx.pool_for(&key, &settings, &secrets).await {
        Ok(pool) => Ok((
            Store::new(pool, schema)
                .with_framework(store.spec.framework.into())
                .with_actor(format!("operator:{key}"))
                .with_lock_timeout(ctx.settings.lock_timeout),
            secrets,
        )),
        Err(PoolError::NoSlot { budget, waited }) => Err((
            Observation::WaitingForConnection {
                message: format!(
                    "waiting for a database connection: all {budget} of this operator's are in \
                     use (--max-db-connections) and none came free in {}s; retrying",
                    waited.as_secs()
                ),
            },
            secrets,
        )),
        Err(PoolError::Engine(e)) => Err((
            Observation::ConnectFailed {
                reason: e.reason(),
                message: e.to_string(),
            },
            secrets,
        )),
    }
}

/// The engine of a store another resource operates on, or why it cannot be used (reason, message),
/// with any secret redacted from the message.
pub async fn connect_for_operation(
    store: &StateStore,
    namespace: &str,
    ctx: &Context,
) -> Result<(Store, Vec<String>), (String, String)> {
    connect(store, namespace, ctx)
        .await
        .map_err(|(observation, secrets)| {
            let (reason, message) = observation
                .problem()
                .unwrap_or_else(|| ("StoreUnavailable".into(), "the store cannot be used".into()));
            let secret_refs: Vec<&str> = secrets.iter().map(String::as_str).collect();
            (
                reason,
                format!(
                    "StateStore \"{}\": {}",
                    store.name_any(),
                    redact(&message, &secret_refs)
                ),
            )
        })
}

async fn observe(
    store: &StateStore,
    namespace: &str,
    key: &str,
    ctx: &Context,
) -> (Observation, Vec<String>, Option<Store>) {
    let (engine, secrets) = match connect(store, namespace, ctx).await {
        Ok(connected) => connected,
        Err((observation, secrets)) => return (observation, secrets, None),
    };
    let observation = match observe_store(&engine, store.spec.init_policy, ctx, store).await {
        Ok(observation) => observation,
        Err(e) => {
            // A pool whose connections broke (the server went away) is rebuilt with a fresh,
            // precise probe next time. A pool that was only busy (stores in one database share
            // it) stays: closing it would fail every other store's work.
            let broken = matches!(e, EngineError::Database(sqlx::Error::Tls(_)))
                || (e.is_connection_error()
                    && !matches!(
                        e,
                        EngineError::ConnectTimeout { .. }
                            | EngineError::Database(sqlx::Error::PoolTimedOut)
                    ));
            if broken {
                ctx.forget_pool(key).await;
            }
            if e.is_connection_error() || matches!(e, EngineError::Database(_)) {
                Observation::ConnectFailed {
                    reason: e.reason(),
                    message: e.to_string(),
                }
            } else {
                Observation::StoreFailed {
                    reason: e.reason(),
                    message: e.to_string(),
                }
            }
        }
    };
    let healthy = matches!(observation, Observation::Observed { .. });
    (observation, secrets, healthy.then_some(engine))
}

async fn observe_store(
    engine: &Store,
    policy: InitPolicy,
    ctx: &Context,
    store: &StateStore,
) -> Result<Observation, EngineError> {
    let report = engine.status().await?;
    if report.initialized {
        return Ok(Observation::Observed {
            report: Box::new(report),
            initialized_now: None,
        });
    }
    let profile = engine.profile();
    if !profile.owns_schema {
        return Ok(Observation::NotInitialized {
            message: format!(
                "no {} state tables in schema \"{}\" yet: {}",
                profile.display_name,
                engine.schema(),
                profile.not_initialized_hint
            ),
        });
    }
    if policy == InitPolicy::Never {
        return Ok(Observation::NotInitialized {
            message: format!(
                "schema \"{}\" is not initialized and initPolicy is Never; run `statekeeper state init` \
                 against the database or set initPolicy: IfMissing",
                engine.schema()
            ),
        });
    }
    ctx.publish(
        &Event {
            type_: EventType::Normal,
            reason: "Initializing".into(),
            note: Some(format!(
                "creating schema \"{}\" and applying {} migrations",
                engine.schema(),
                engine.latest_version()
            )),
            action: "Initialize".into(),
            secondary: None,
        },
        &store.object_ref(&()),
    )
    .await;
    let init = engine.init(None).await?;
    let report = engine.status().await?;
    Ok(Observation::Observed {
        report: Box::new(report),
        initialized_now: Some(init),
    })
}

/// Builds connection settings from the spec and its Secrets, or says precisely what is wrong.
async fn resolve_connection(
    store: &StateStore,
    namespace: &str,
    ctx: &Context,
) -> Result<(ConnectionSettings, Vec<String>), Observation> {
    let spec = &store.spec.connection;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let timeout = Duration::from_secs(
        spec.connect_timeout_seconds
            .map(u64::from)
            .unwrap_or(ctx.settings.connect_timeout.as_secs()),
    );
    let (settings, secret_values) = match (&spec.url_secret_ref, &spec.host) {
        (Some(url_ref), None) => {
            let url = read_secret_key(&secrets, namespace, url_ref).await?;
            let settings = ConnectionSettings::from_url(&url).map_err(|e| {
                Observation::InvalidSpec(format!(
                    "the URL in Secret \"{}\" key \"{}\" is not usable: {e}",
                    url_ref.name, url_ref.key
                ))
            })?;
            let password = crate::engine::connection::password_in_url(&url).unwrap_or_default();
            (settings, vec![url, password])
        }
        (None, Some(host)) => {
            let user = spec.user.as_deref().ok_or_else(|| {
                Observation::InvalidSpec("connection.user is required with connection.host".into())
            })?;
            let password = match &spec.password_secret_ref {
                Some(r) => Some(read_secret_key(&secrets, namespace, r).await?),
                None => None,
            };
            let settings = ConnectionSettings::from_parts(&ConnectionParts {
                host,
                port: spec.port.unwrap_or(5432),
                database: spec.database.as_deref().unwrap_or("postgres"),
                user,
                password: password.as_deref(),
                ssl_mode: spec.ssl_mode.map(|m| m.as_libpq()),
            })
            .map_err(|e| Observation::InvalidSpec(e.to_string()))?;
            (settings, password.into_iter().collect())
        }
        _ => {
            return Err(Observation::InvalidSpec(
                "set exactly one of connection.urlSecretRef and connection.host".into(),
            ));
        }
    };
    let (tls, material) = read_tls(spec.tls.as_ref(), &secrets, namespace, ctx).await?;
    let mut secret_values = secret_values;
    // The material is part of what makes a pool: a new CA or certificate makes a new one. The
    // key is secret; the certificates are kept out of messages all the same.
    secret_values.extend(material);
    Ok((
        settings.with_tls(tls).with_connect_timeout(timeout),
        secret_values,
    ))
}

/// The TLS material a connection names: its CA (ConfigMap or Secret) and client certificate,
/// and the same as text (for the pool's fingerprint and for redaction).
async fn read_tls(
    tls: Option<&TlsSpec>,
    secrets: &Api<Secret>,
    namespace: &str,
    ctx: &Context,
) -> Result<(TlsMaterial, Vec<String>), Observation> {
    let mut material = TlsMaterial::default();
    let mut texts = Vec::new();
    let Some(tls) = tls else {
        return Ok((material, texts));
    };
    if let Some(source) = &tls.ca_certificate {
        let ca = match (&source.config_map_key_ref, &source.secret_key_ref) {
            (Some(r), _) => read_config_map_key(ctx, namespace, r).await?,
            (None, Some(r)) => read_secret_key(secrets, namespace, r).await?,
            (None, None) => {
                return Err(Observation::InvalidSpec(
                    "tls.caCertificate names neither a ConfigMap nor a Secret".into(),
                ));
            }
        };
        material.root_certificate = Some(ca.clone().into_bytes());
        texts.push(ca);
    }
    if let Some(client) = &tls.client_certificate {
        let key_of = |key: &str| SecretKeyRef {
            name: client.secret_name.clone(),
            key: key.to_owned(),
        };
        let certificate =
            read_secret_key(secrets, namespace, &key_of(&client.certificate_key)).await?;
        let key = read_secret_key(secrets, namespace, &key_of(&client.private_key_key)).await?;
        material.client_certificate = Some(certificate.clone().into_bytes());
        material.client_key = Some(key.clone().into_bytes());
        texts.extend([certificate, key]);
    }
    Ok((material, texts))
}

async fn read_config_map_key(
    ctx: &Context,
    namespace: &str,
    r: &ConfigMapKeyRef,
) -> Result<String, Observation> {
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), namespace);
    let config_map = api
        .get_opt(&r.name)
        .await
        .map_err(|e| Observation::SecretProblem {
            reason: "ConfigMapUnreadable",
            message: format!(
                "cannot read ConfigMap \"{}\" in namespace \"{namespace}\": {e}",
                r.name
            ),
        })?
        .ok_or_else(|| Observation::SecretProblem {
            reason: "ConfigMapNotFound",
            message: format!(
                "ConfigMap \"{}\" not found in namespace \"{namespace}\"",
                r.name
            ),
        })?;
    let data = config_map.data.unwrap_or_default();
    data.get(&r.key)
        .cloned()
        .ok_or_else(|| Observation::SecretProblem {
            reason: "ConfigMapKeyMissing",
            message: format!(
                "ConfigMap \"{}\" has no key \"{}\" (it has: {})",
                r.name,
                r.key,
                if data.is_empty() {
                    "no keys".to_owned()
                } else {
                    data.keys().cloned().collect::<Vec<_>>().join(", ")
                }
            ),
        })
}

async fn read_secret_key(
    api: &Api<Secret>,
    namespace: &str,
    r: &SecretKeyRef,
) -> Result<String, Observation> {
    let secret = api
        .get_opt(&r.name)
        .await
        .map_err(|e| Observation::SecretProblem {
            reason: "SecretUnreadable",
            message: format!(
                "cannot read Secret \"{}\" in namespace \"{namespace}\": {e}",
                r.name
            ),
        })?
        .ok_or_else(|| Observation::SecretProblem {
            reason: "SecretNotFound",
            message: format!(
                "Secret \"{}\" not found in namespace \"{namespace}\"",
                r.name
            ),
        })?;
    let data = secret.data.unwrap_or_default();
    let value = data.get(&r.key).ok_or_else(|| Observation::SecretProblem {
        reason: "SecretKeyMissing",
        message: format!(
            "Secret \"{}\" has no key \"{}\" (it has: {})",
            r.name,
            r.key,
            if data.is_empty() {
                "no keys".to_string()
            } else {
                data.keys().cloned().collect::<Vec<_>>().join(", ")
            }
        ),
    })?;
    String::from_utf8(value.0.clone()).map_err(|_| Observation::SecretProblem {
        reason: "SecretValueInvalid",
        message: format!("Secret \"{}\" key \"{}\" is not UTF-8 text", r.name, r.key),
    })
}

/// Database pools shared by every store that connects the same way (same target, user and
/// Secrets): a thousand stores in one database use one pool. The connections of all pools
/// together stay within a budget: the least recently used idle pools are closed to make room,
/// and when every pool is busy a new one waits (the reconcile retries) rather than exceed it.
pub struct PoolCache {
    inner: tokio::sync::Mutex<Pools>,
    /// Connections all pools may hold together.
    budget: u32,
    /// Connections one pool (one database) may hold.
    per_pool: u32,
    /// How long a store waits for room in the budget before it says it is waiting.
    slot_wait: Duration,
}

/// How long a store waits for a slot in the connection budget within one reconcile.
pub const SLOT_WAIT: Duration = Duration::from_secs(10);

/// Why the pool cache gave no pool.
#[derive(Debug)]
pub enum PoolError {
    /// Connecting failed (an unreachable database, wrong credentials …).
    Engine(EngineError),
    /// Every connection of the budget is held by a busy pool, for longer than the wait.
    NoSlot { budget: u32, waited: Duration },
}

#[derive(Default)]
struct Pools {
    /// Store key → the fingerprint of the pool it uses.
    stores: HashMap<String, String>,
    /// Fingerprint → (pool, its connection limit, last use).
    pools: HashMap<String, (PgPool, u32, std::time::Instant)>,
}

impl Default for PoolCache {
    fn default() -> Self {
        Self::new(16, 4)
    }
}

impl PoolCache {
    pub fn with_slot_wait(mut self, wait: Duration) -> Self {
        self.slot_wait = wait;
        self
    }

    pub fn new(budget: u32, per_pool: u32) -> Self {
        Self {
            inner: Default::default(),
            budget: budget.max(1),
            per_pool: per_pool.clamp(1, budget.max(1)),
            slot_wait: SLOT_WAIT,
        }
    }

    /// The pool for `key`'s connection settings, made when missing. When the budget is spent
    /// by pools that are all busy, it waits for one to become idle (a store queues for a slot:
    /// a full budget is not an unreachable database), up to [`SLOT_WAIT`].
    pub async fn get_or_connect(
        &self,
        key: &str,
        settings: &ConnectionSettings,
        secrets: &[String],
    ) -> Result<PgPool, PoolError> {
        let fingerprint = {
            let mut hasher = Sha256::new();
            hasher.update(settings.target());
            hasher.update(settings.user());
            hasher.update(settings.connect_timeout.as_millis().to_le_bytes());
            for secret in secrets {
                hasher.update([0]);
                hasher.update(secret);
            }
            hex::encode(hasher.finalize())
        };
        let started = std::time::Instant::now();
        loop {
            if let Some(pool) = self.try_get_or_connect(key, &fingerprint, settings).await? {
                return Ok(pool);
            }
            if started.elapsed() >= self.slot_wait {
                return Err(PoolError::NoSlot {
                    budget: self.budget,
                    waited: started.elapsed(),
                });
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// One attempt: the pool, or `None` when there is no room for it yet.
    async fn try_get_or_connect(
        &self,
        key: &str,
        fingerprint: &str,
        settings: &ConnectionSettings,
    ) -> Result<Option<PgPool>, PoolError> {
        let mut inner = self.inner.lock().await;
        if let Some((pool, _, used)) = inner.pools.get_mut(fingerprint)
            && !pool.is_closed()
        {
            *used = std::time::Instant::now();
            let pool = pool.clone();
            inner.stores.insert(key.to_owned(), fingerprint.to_owned());
            return Ok(Some(pool));
        }
        // The store's previous pool (its Secret changed) goes if nobody else uses it.
        if let Some(old) = inner.stores.remove(key) {
            inner.release_if_unused(&old).await;
        }
        let mut held: u32 = inner.pools.values().map(|(_, limit, _)| limit).sum();
        while held + self.per_pool > self.budget {
            let idle = inner
                .pools
                .iter()
                .filter(|(_, (pool, _, _))| pool.size() as usize == pool.num_idle())
                .min_by_key(|(_, (_, _, used))| *used)
                .map(|(fingerprint, _)| fingerprint.clone());
            let Some(idle) = idle else { break };
            if let Some((pool, limit, _)) = inner.pools.remove(&idle) {
                pool.close().await;
                held -= limit;
            }
            inner.stores.retain(|_, f| *f != idle);
        }
        let limit = self.per_pool.min(self.budget.saturating_sub(held));
        if limit == 0 {
            return Ok(None);
        }
        let pool = settings
            .clone()
            .with_max_connections(limit)
            .connect()
            .await
            .map_err(PoolError::Engine)?;
        inner.pools.insert(
            fingerprint.to_owned(),
            (pool.clone(), limit, std::time::Instant::now()),
        );
        inner.stores.insert(key.to_owned(), fingerprint.to_owned());
        Ok(Some(pool))
    }

    /// Drops a store's use of its pool (a connection broke); the pool closes when unused.
    pub async fn forget(&self, key: &str) {
        let mut inner = self.inner.lock().await;
        if let Some(fingerprint) = inner.stores.remove(key) {
            // A broken pool is rebuilt with a fresh probe by whoever needs it next.
            if let Some((pool, _, _)) = inner.pools.remove(&fingerprint) {
                pool.close().await;
            }
            inner.stores.retain(|_, f| *f != fingerprint);
        }
    }
}

impl Pools {
    async fn release_if_unused(&mut self, fingerprint: &str) {
        if !self.stores.values().any(|f| f == fingerprint)
            && let Some((pool, _, _)) = self.pools.remove(fingerprint)
        {
            pool.close().await;
        }
    }
}
