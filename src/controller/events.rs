//! Events (`events.k8s.io/v1`), with repeats folded into a series only when they say the same
//! thing. kube's `Recorder` folds every Event of one reason, action and object into the first
//! one's series whatever its note says, so that "deleted StateExport a" and "deleted StateExport
//! b" read as one Event about `a` seen twice; here the note is part of what makes Events equal.

use std::collections::HashMap;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event as K8sEvent, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType};
use kube::{Api, Client};

/// A repeat later than this after the last one starts a new Event (as kube's recorder).
const SERIES_WINDOW: SignedDuration = SignedDuration::from_mins(6);

/// What makes two Events the same occurrence repeated.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    warning: bool,
    reason: String,
    action: String,
    note: Option<String>,
    regarding: (
        Option<String>,
        Option<String>,
        Option<String>,
        Option<String>,
    ),
    related: Option<(Option<String>, Option<String>, Option<String>)>,
}

impl Key {
    fn of(event: &Event, regarding: &ObjectReference) -> Self {
        Self {
            warning: event.type_ == EventType::Warning,
            reason: event.reason.clone(),
            action: event.action.clone(),
            note: event.note.clone(),
            regarding: (
                regarding.kind.clone(),
                regarding.namespace.clone(),
                regarding.name.clone(),
                regarding.uid.clone(),
            ),
            related: event.secondary.as_ref().map(|related| {
                (
                    related.kind.clone(),
                    related.name.clone(),
                    related.field_path.clone(),
                )
            }),
        }
    }
}

/// Publishes Events as `controller` (`instance`: this replica).
pub struct EventPublisher {
    client: Client,
    controller: String,
    instance: String,
    published: tokio::sync::Mutex<HashMap<Key, K8sEvent>>,
}

impl EventPublisher {
    pub fn new(client: Client, controller: &str, instance: Option<String>) -> Self {
        Self {
            client,
            controller: controller.to_owned(),
            instance: instance.unwrap_or_else(|| controller.to_owned()),
            published: Default::default(),
        }
    }

    /// Creates the Event, or counts a repeat of the same Event in its series.
    pub async fn publish(
        &self,
        event: &Event,
        regarding: &ObjectReference,
    ) -> Result<(), kube::Error> {
        let now = Timestamp::now();
        let key = Key::of(event, regarding);
        // The lock is not held across the API call: reconciles publish concurrently.
        let earlier = {
            let mut published = self.published.lock().await;
            published.retain(|_, seen| last_seen(seen).is_some_and(|t| t + SERIES_WINDOW > now));
            published.get(&key).cloned()
        };
        let namespace = regarding.namespace.as_deref().unwrap_or("default");
        let api: Api<K8sEvent> = Api::namespaced(self.client.clone(), namespace);
        let written = match earlier {
            Some(mut repeat) => {
                repeat.series = Some(EventSeries {
                    count: repeat.series.as_ref().map_or(2, |s| s.count + 1),
                    last_observed_time: MicroTime(now),
                });
                let name = repeat.metadata.name.clone().unwrap_or_default();
                api.patch(&name, &PatchParams::default(), &Patch::Merge(&repeat))
                    .await?;
                repeat
            }
            None => {
                let fresh = self.event(event, regarding, now);
                api.create(&PostParams::default(), &fresh).await?;
                fresh
            }
        };
        self.published.lock().await.insert(key, written);
        Ok(())
    }

    fn event(&self, event: &Event, regarding: &ObjectReference, now: Timestamp) -> K8sEvent {
        K8sEvent {
            action: Some(event.action.clone()),
            reason: Some(event.reason.clone()),
            note: event.note.clone(),
            event_time: Some(MicroTime(now)),
            regarding: Some(regarding.clone()),
            related: event.secondary.clone(),
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(self.instance.clone()),
            type_: Some(
                match event.type_ {
                    EventType::Normal => "Normal",
                    EventType::Warning => "Warning",
                }
                .into(),
            ),
            metadata: ObjectMeta {
                namespace: regarding.namespace.clone(),
                name: Some(format!(
                    "{}.{:x}",
                    regarding.name.as_deref().unwrap_or(&self.controller),
                    now.as_nanosecond()
                )),
                ..ObjectMeta::default()
            },
            ..K8sEvent::default()
        }
    }
}

fn last_seen(event: &K8sEvent) -> Option<Timestamp> {
    event
        .series
        .as_ref()
        .map(|s| s.last_observed_time.0)
        .or_else(|| event.event_time.as_ref().map(|t| t.0))
}
