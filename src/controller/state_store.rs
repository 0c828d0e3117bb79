//! The StateStore reconciler: connect, initialise when allowed, report what the store is.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};

use super::access::{self, ConnectProblem, WAITING_FOR_CONNECTION};
use super::conditions::{self, Desired, READY, RECONCILING, STALLED};
use super::context::{Context, ReconcileError};
use super::store_backups::{self, PruneStep};
use super::store_janitor::{self, JanitorStep};
use super::store_views::{self, ViewsVerdict};
use super::telemetry::ObjectLabels;
use crate::api::phases;
use crate::api::state_store::{
    BackupStatus, InitPolicy, JanitorSpec, StateStore, StateStoreStatus, StoreFramework,
};
use crate::engine::{Error as EngineError, InitReport, StatusReport, Store, redact};

pub const CONNECTED: &str = "Connected";
pub const INITIALIZED: &str = "Initialized";
pub const SCHEMA_UP_TO_DATE: &str = "SchemaUpToDate";

/// How many backups `status.backups` lists (the newest); `status.backupSummary` counts them all.
const STATUS_BACKUPS: usize = 20;

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

impl From<ConnectProblem> for Observation {
    fn from(problem: ConnectProblem) -> Self {
        match problem {
            ConnectProblem::InvalidSpec(message) => Observation::InvalidSpec(message),
            ConnectProblem::Secret { reason, message } => {
                Observation::SecretProblem { reason, message }
            }
            ConnectProblem::Failed { reason, message } => {
                Observation::ConnectFailed { reason, message }
            }
            ConnectProblem::WaitingForConnection { message } => {
                Observation::WaitingForConnection { message }
            }
        }
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
pub fn phase(conds: &[Condition]) -> &'static str {
    if conditions::is_true(conds, READY) {
        phases::READY
    } else if conditions::is_true(conds, RECONCILING) {
        phases::INITIALIZING
    } else {
        phases::FAILED
    }
}

/// Events for conditions that changed status or reason since the last status.
pub fn transition_events(previous: &[Condition], next: &[Condition]) -> Vec<Event> {
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
    let waiting = matches!(observation, Observation::WaitingForConnection { .. });
    let previous = store.status.clone().unwrap_or_default();
    let reference = store.object_ref(&());

    // SQLMesh's views after the store's restores: reported, and the janitor waits for them.
    let views = match store.spec.framework {
        StoreFramework::Sqlmesh => {
            store_views::verdict(&ctx, &namespace, &name, &previous.conditions).await
        }
        _ => ViewsVerdict::default(),
    };
    // The scheduled janitor runs only against a healthy store.
    let janitor = match &engine {
        Some(engine) => {
            run_janitor(
                &store,
                &previous,
                engine,
                &mut observation,
                (&ctx, &reference),
                views.janitor_waits_for.as_deref(),
            )
            .await
        }
        None => None,
    };
    // Backups are pruned after the janitor, so that a janitor Job's backup is seen.
    let pruning = match &engine {
        Some(engine) => {
            prune_backups(&store, &namespace, engine, &mut observation, &ctx, &secrets).await
        }
        None => None,
    };
    let mut desired =
        desired_conditions(&store, &observation, &previous, janitor.as_ref(), &secrets);
    desired.extend(views.condition);
    match &pruning {
        Some(step) => desired.push(step.condition.clone()),
        // While the store cannot be observed, the last verdict stands.
        None if store.spec.backups.is_some() => desired.extend(
            conditions::find(&previous.conditions, store_backups::BACKUPS_PRUNED).map(|c| {
                Desired::new(
                    store_backups::BACKUPS_PRUNED,
                    c.status == "True",
                    c.reason.clone(),
                    c.message.clone(),
                )
            }),
        ),
        None => {}
    }
    let mut status = next_status(
        &store,
        &observation,
        &previous,
        &desired,
        janitor.as_ref(),
        ctx.now(),
    );
    if let Observation::Observed { report, .. } = &observation {
        status.backup_summary = Some(store_backups::summary(
            &report.backups,
            pruning.as_ref().and_then(|p| p.pruned.as_ref()),
            previous.backup_summary.as_ref(),
            &ctx.now().to_string(),
        ));
    }

    // Every status write is a watch event that wakes this reconciler again, and costs the API
    // server a write: write only when something changed. An idle store costs no writes at all
    // (a thousand of them included); `lastCheckedTime` is when the status last changed.
    if changed_besides_check_time(&previous, &status) {
        ctx.apply_status(&*store, &status).await?;
    }
    for event in transition_events(&previous.conditions, &status.conditions) {
        ctx.publish(&event, &reference).await;
    }
    record_metrics(&ctx, &namespace, &name, &status, healthy, waiting);
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

/// The janitor step of a healthy store with a janitor: a runner Job for a framework that cleans
/// itself, statekeeper's janitor otherwise. A run that removed rows refreshes the observation,
/// so the status counts what is left.
async fn run_janitor(
    store: &StateStore,
    previous: &StateStoreStatus,
    engine: &Store,
    observation: &mut Observation,
    (ctx, reference): (&Context, &ObjectReference),
    waits_for_views: Option<&str>,
) -> Option<JanitorStep> {
    let spec = store.spec.janitor.as_ref()?;
    let previous_condition =
        conditions::find(&previous.conditions, store_janitor::JANITOR_SUCCEEDED);
    if let JanitorSpec {
        runner: Some(runner),
        ..
    } = spec
    {
        return Some(
            store_janitor::runner_step(
                spec,
                runner,
                store,
                (previous.janitor.as_ref(), previous_condition),
                engine,
                ctx,
                reference,
                waits_for_views,
            )
            .await,
        );
    }
    let created = store
        .meta()
        .creation_timestamp
        .as_ref()
        .map_or_else(|| ctx.now(), |t| t.0);
    let step = store_janitor::step(
        spec,
        &store.spec.unsuffixed_virtual_env,
        previous.janitor.as_ref(),
        previous_condition,
        created,
        engine,
        ctx,
        reference,
    )
    .await;
    if step.changed_store
        && let Ok(report) = engine.status().await
        && let Observation::Observed {
            report: observed, ..
        } = observation
    {
        **observed = report;
    }
    Some(step)
}

/// `spec.backups` applied to a healthy store; a prune that dropped backups refreshes the
/// observation, so the status lists what is left.
async fn prune_backups(
    store: &StateStore,
    namespace: &str,
    engine: &Store,
    observation: &mut Observation,
    ctx: &Context,
    secrets: &[String],
) -> Option<PruneStep> {
    let spec = store.spec.backups.as_ref()?;
    let Observation::Observed { report, .. } = observation else {
        return None;
    };
    let secret_refs: Vec<&str> = secrets.iter().map(String::as_str).collect();
    let previous = store.status.as_ref().map_or(&[][..], |s| &s.conditions[..]);
    let step = store_backups::step(
        spec,
        store,
        namespace,
        &report.backups,
        previous,
        engine,
        ctx,
        &store.object_ref(&()),
        &secret_refs,
    )
    .await;
    if step.pruned.is_some()
        && let Ok(refreshed) = engine.status().await
    {
        **report = refreshed;
    }
    Some(step)
}

/// The conditions to report, secrets redacted: what was observed, the janitor's verdict, and
/// what was last observed for whatever could not be looked at this time.
fn desired_conditions(
    store: &StateStore,
    observation: &Observation,
    previous: &StateStoreStatus,
    janitor: Option<&JanitorStep>,
    secrets: &[String],
) -> Vec<Desired> {
    let carried = |c: &Condition, type_: &'static str| {
        Desired::new(
            type_,
            c.status == "True",
            c.reason.clone(),
            c.message.clone(),
        )
    };
    let mut desired = decide(observation);
    if matches!(observation, Observation::WaitingForConnection { .. }) {
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
                        .map(|t| carried(c, t))
                }),
        );
    }
    match janitor {
        Some(step) => desired.extend(step.condition.clone()),
        // While the store cannot be observed, the last janitor verdict still stands.
        None if store.spec.janitor.is_some() => desired.extend(
            conditions::find(&previous.conditions, store_janitor::JANITOR_SUCCEEDED)
                .map(|c| carried(c, store_janitor::JANITOR_SUCCEEDED)),
        ),
        None => {}
    }
    let secret_refs: Vec<&str> = secrets.iter().map(String::as_str).collect();
    desired
        .into_iter()
        .map(|mut d| {
            d.message = redact(&d.message, &secret_refs);
            d
        })
        .collect()
}

/// The status to write: the conditions merged, the facts observed (or the last known ones
/// while the store cannot be observed), the janitor's.
fn next_status(
    store: &StateStore,
    observation: &Observation,
    previous: &StateStoreStatus,
    desired: &[Desired],
    janitor: Option<&JanitorStep>,
    now: Timestamp,
) -> StateStoreStatus {
    let conds = conditions::merge(&previous.conditions, desired, store.meta().generation, now);
    let mut status = StateStoreStatus {
        observed_generation: store.meta().generation,
        phase: Some(phase(&conds).into()),
        framework: Some(crate::engine::Framework::from(store.spec.framework).to_string()),
        latest_schema_version: (store.spec.framework == StoreFramework::Statekeeper)
            .then(|| crate::engine::MigrationChain::shipped().latest()),
        last_checked_time: Some(now.to_string()),
        conditions: conds,
        janitor: match janitor {
            Some(step) => Some(step.status.clone()),
            None if store.spec.janitor.is_some() => previous.janitor.clone(),
            None => None,
        },
        ..Default::default()
    };
    if let Observation::Observed { report, .. } = observation {
        status.schema_version = Some(report.current_version);
        status.framework_versions = (!report.versions.is_empty()).then(|| report.versions.clone());
        status.counts = Some(report.counts.clone());
        let newest = report.backups.len().saturating_sub(STATUS_BACKUPS);
        status.backups = Some(
            report.backups[newest..]
                .iter()
                .map(|b| BackupStatus {
                    id: b.id.clone(),
                    created_at: b.created_at.to_rfc3339(),
                    schema_version: b.schema_version,
                    reason: b.reason.clone(),
                    rows: b.rows,
                    bytes: b.bytes,
                })
                .collect(),
        );
    } else {
        // Keep the last known facts about the store while it cannot be observed.
        status.schema_version = previous.schema_version;
        status.framework_versions = previous.framework_versions.clone();
        status.counts = previous.counts.clone();
        status.backups = previous.backups.clone();
        status.backup_summary = previous.backup_summary.clone();
    }
    status
}

/// Whether the status says anything new besides the time of the check.
fn changed_besides_check_time(previous: &StateStoreStatus, status: &StateStoreStatus) -> bool {
    let mut before = previous.clone();
    let mut after = status.clone();
    before.last_checked_time = None;
    after.last_checked_time = None;
    before != after
}

/// The store's gauges. While it waits for a connection nothing is known, so readiness keeps its
/// last value.
fn record_metrics(
    ctx: &Context,
    namespace: &str,
    name: &str,
    status: &StateStoreStatus,
    healthy: bool,
    waiting: bool,
) {
    let labels = ObjectLabels {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
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
}

/// Called by the controller runtime when `reconcile` itself failed (the API server refused us).
pub fn error_policy(store: Arc<StateStore>, error: &ReconcileError, _ctx: Arc<Context>) -> Action {
    tracing::warn!(store = %store.name_any(), %error, "reconcile failed");
    Action::requeue(Duration::from_secs(15))
}

/// Connects (through the pool cache), initialises when allowed, and reads the store's status.
/// Also returns the secret values it read, so that callers can redact them from messages.
async fn observe(
    store: &StateStore,
    namespace: &str,
    key: &str,
    ctx: &Context,
) -> (Observation, Vec<String>, Option<Store>) {
    let (engine, secrets) = match access::connect(store, namespace, ctx).await {
        Ok(connected) => connected,
        Err((problem, secrets)) => return (problem.into(), secrets, None),
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
