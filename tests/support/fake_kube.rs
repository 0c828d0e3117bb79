//! An in-memory Kubernetes API server for reconciler tests: a tower service that stores objects
//! as JSON by URL path and answers get, list, watch, create, patch (apply, merge), status patches
//! and delete the way the API server does for the calls the operator makes: `resourceVersion`
//! preconditions and server-side-apply field ownership conflicts (409) included, so that two
//! operators can run against it. No mocks of our code.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use serde_json::{Value, json};

type Body = BoxBody<Bytes, Infallible>;

#[derive(Default)]
struct State {
    objects: BTreeMap<String, Value>,
    resource_version: u64,
    requests: Vec<(String, String)>,
    /// Every change, for watches: (resourceVersion, object path, event type, object).
    history: Vec<(u64, String, &'static str, Value)>,
    /// Server-side apply ownership: (object path, top-level field path) -> field manager.
    owners: BTreeMap<(String, String), String>,
    /// Refuse to create objects in a namespace that has no Namespace object, as an API server
    /// does (off by default: most tests never create namespaces).
    namespaces_enforced: bool,
}

impl State {
    fn record(&mut self, path: &str, kind: &'static str, object: &Value) {
        let rv = self.resource_version;
        self.history
            .push((rv, path.to_owned(), kind, object.clone()));
    }
}

#[derive(Clone, Default)]
pub struct FakeKube {
    state: Arc<Mutex<State>>,
    changed: Arc<tokio::sync::Notify>,
}

impl FakeKube {
    pub fn new() -> Self {
        Self::default()
    }

    /// A kube client whose every request is served by this fake.
    pub fn client(&self) -> kube::Client {
        let state = self.state.clone();
        let changed = self.changed.clone();
        let service = tower::service_fn(move |req: Request<kube::client::Body>| {
            let (state, changed) = (state.clone(), changed.clone());
            async move { Ok::<_, Infallible>(handle(state, changed, req).await) }
        });
        kube::Client::new(service, "default")
    }

    /// Stores an object as-is, under the path the API server would serve it at.
    pub fn put(&self, path: &str, mut object: Value) {
        {
            let mut state = self.state.lock().unwrap();
            state.resource_version += 1;
            let rv = state.resource_version.to_string();
            object["metadata"]["resourceVersion"] = json!(rv);
            let kind = if state.objects.contains_key(path) {
                "MODIFIED"
            } else {
                "ADDED"
            };
            state.record(path, kind, &object);
            state.objects.insert(path.to_owned(), object);
        }
        self.changed.notify_waiters();
    }

    /// From now on, creating an object in a namespace needs the Namespace to exist
    /// (`/api/v1/namespaces/NAME`), as on a real API server.
    pub fn enforce_namespaces(&self) {
        self.state.lock().unwrap().namespaces_enforced = true;
    }

    pub fn get(&self, path: &str) -> Option<Value> {
        self.state.lock().unwrap().objects.get(path).cloned()
    }

    pub fn remove(&self, path: &str) {
        {
            let mut state = self.state.lock().unwrap();
            if let Some(object) = state.objects.remove(path) {
                state.resource_version += 1;
                state.record(path, "DELETED", &object);
            }
        }
        self.changed.notify_waiters();
    }

    /// Every object stored under a collection path.
    pub fn list(&self, collection: &str) -> Vec<Value> {
        let prefix = format!("{collection}/");
        self.state
            .lock()
            .unwrap()
            .objects
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix) && !k[prefix.len()..].contains('/'))
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// events.k8s.io/v1 Events in a namespace, oldest first.
    pub fn events(&self, namespace: &str) -> Vec<Value> {
        let mut events = self.list(&format!(
            "/apis/events.k8s.io/v1/namespaces/{namespace}/events"
        ));
        events.sort_by_key(|e| {
            e["metadata"]["resourceVersion"]
                .as_str()
                .and_then(|v| v.parse::<u64>().ok())
        });
        events
    }

    /// `METHOD path` of every request served, in order.
    pub fn requests(&self) -> Vec<(String, String)> {
        self.state.lock().unwrap().requests.clone()
    }

    /// Everything the fake holds, as text: to prove that no secret leaked anywhere.
    pub fn dump(&self) -> String {
        serde_json::to_string(&self.state.lock().unwrap().objects).unwrap()
    }
}

/// Standard base64, for Secret data (so that neither the tests nor the benchmark need a crate).
pub fn base64(input: &[u8]) -> String {
    const TABLE: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(TABLE[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn respond(code: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .unwrap()
}

fn status_error(code: StatusCode, reason: &str, message: String) -> Response<Body> {
    respond(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "reason": reason, "code": code.as_u16()}),
    )
}

/// The `key=value` pairs of a list's `labelSelector` (equality selectors only).
fn label_selector(query: &str) -> Vec<(String, String)> {
    let decode = |text: &str| {
        let bytes = text.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'%' if i + 2 < bytes.len() => {
                    let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                    out.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
                    i += 3;
                }
                b'+' => {
                    out.push(b' ');
                    i += 1;
                }
                b => {
                    out.push(b);
                    i += 1;
                }
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    query
        .split('&')
        .filter_map(|pair| pair.strip_prefix("labelSelector="))
        .flat_map(|selector| {
            decode(selector)
                .split(',')
                .filter_map(|term| {
                    term.split_once('=')
                        .map(|(k, v)| (k.to_owned(), v.trim_start_matches('=').to_owned()))
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

/// One query parameter's (undecoded) value.
fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
}

/// A watch: every change to the collection after `since`, as JSON lines, until the client goes.
fn watch(
    state: Arc<Mutex<State>>,
    changed: Arc<tokio::sync::Notify>,
    collection: String,
    selector: Vec<(String, String)>,
    since: u64,
) -> Response<Body> {
    let prefix = format!("{collection}/");
    let events = futures::stream::unfold(since, move |mut seen| {
        let (state, changed, prefix, selector) = (
            state.clone(),
            changed.clone(),
            prefix.clone(),
            selector.clone(),
        );
        async move {
            loop {
                let notified = changed.notified();
                let batch: Vec<(u64, String)> = {
                    let state = state.lock().unwrap();
                    // History is in resourceVersion order: start after what was seen.
                    let start = state.history.partition_point(|(rv, _, _, _)| *rv <= seen);
                    let newest = state.history.last().map_or(seen, |(rv, _, _, _)| *rv);
                    let batch: Vec<(u64, String)> = state.history[start..]
                        .iter()
                        .filter(|(_, path, _, _)| {
                            path.starts_with(&prefix) && !path[prefix.len()..].contains('/')
                        })
                        .filter(|(_, _, _, object)| {
                            selector.iter().all(|(key, value)| {
                                object["metadata"]["labels"][key].as_str() == Some(value)
                            })
                        })
                        .map(|(rv, _, kind, object)| {
                            (
                                *rv,
                                format!("{}\n", json!({"type": kind, "object": object})),
                            )
                        })
                        .collect();
                    // Nothing of ours among the newer changes: skip them next time.
                    if batch.is_empty() {
                        seen = newest;
                    }
                    batch
                };
                if let Some(last) = batch.last() {
                    seen = last.0;
                    let text: String = batch.into_iter().map(|(_, line)| line).collect();
                    return Some((
                        Ok::<_, Infallible>(hyper::body::Frame::data(Bytes::from(text))),
                        seen,
                    ));
                }
                notified.await;
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(StreamBody::new(events)))
        .unwrap()
}

async fn handle(
    state: Arc<Mutex<State>>,
    changed: Arc<tokio::sync::Notify>,
    req: Request<kube::client::Body>,
) -> Response<Body> {
    let response = handle_request(state, changed.clone(), req).await;
    changed.notify_waiters();
    response
}

async fn handle_request(
    state: Arc<Mutex<State>>,
    changed: Arc<tokio::sync::Notify>,
    req: Request<kube::client::Body>,
) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let selector = label_selector(&query);
    if method == Method::GET && matches!(query_param(&query, "watch"), Some("true" | "1")) {
        let since = query_param(&query, "resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        state
            .lock()
            .unwrap()
            .requests
            .push(("WATCH".into(), path.clone()));
        return watch(state, changed, path, selector, since);
    }
    let field_manager = query_param(&query, "fieldManager").unwrap_or("").to_owned();
    let force = query_param(&query, "force") == Some("true");
    let content_type = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body = match req.into_body().collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => return status_error(StatusCode::BAD_REQUEST, "BadRequest", e.to_string()),
    };
    let mut state = state.lock().unwrap();
    state.requests.push((method.to_string(), path.clone()));
    state.resource_version += 1;
    let rv = state.resource_version.to_string();

    let (object_path, subresource) = match path.strip_suffix("/status") {
        Some(base) => (base.to_owned(), Some("status")),
        None => (path.clone(), None),
    };
    let parsed: Value = if body.is_empty() {
        Value::Null
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => return status_error(StatusCode::BAD_REQUEST, "BadRequest", e.to_string()),
        }
    };

    match method {
        Method::GET => {
            if let Some(object) = state.objects.get(&object_path) {
                return respond(StatusCode::OK, object);
            }
            let prefix = format!("{object_path}/");
            let items: Vec<Value> = state
                .objects
                .iter()
                .filter(|(k, _)| k.starts_with(&prefix) && !k[prefix.len()..].contains('/'))
                .filter(|(_, v)| {
                    selector
                        .iter()
                        .all(|(key, value)| v["metadata"]["labels"][key].as_str() == Some(value))
                })
                .map(|(_, v)| v.clone())
                .collect();
            // After /api/v1 or /apis/<group>/<version>, a collection path has an odd number of
            // segments ([namespaces, ns,] plural) and an object path an even one (…, name).
            let segments: Vec<&str> = object_path.trim_matches('/').split('/').collect();
            let prefix = if segments.first() == Some(&"api") {
                2
            } else {
                3
            };
            let is_collection = segments.len().saturating_sub(prefix) % 2 == 1;
            if is_collection {
                return respond(
                    StatusCode::OK,
                    &json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": rv}, "items": items}),
                );
            }
            status_error(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("{path} not found"),
            )
        }
        Method::POST => {
            if state.namespaces_enforced
                && let Some(namespace) = path
                    .split_once("/namespaces/")
                    .and_then(|(_, rest)| rest.split_once('/'))
                    .map(|(namespace, _)| namespace.to_owned())
                && !state
                    .objects
                    .contains_key(&format!("/api/v1/namespaces/{namespace}"))
            {
                return status_error(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    format!("namespaces \"{namespace}\" not found"),
                );
            }
            let mut object = parsed;
            let name = match object["metadata"]["name"].as_str() {
                Some(n) => n.to_owned(),
                None => match object["metadata"]["generateName"].as_str() {
                    Some(prefix) => format!("{prefix}{rv}"),
                    None => {
                        return status_error(
                            StatusCode::UNPROCESSABLE_ENTITY,
                            "Invalid",
                            "metadata.name is required".into(),
                        );
                    }
                },
            };
            let key = format!("{object_path}/{name}");
            if state.objects.contains_key(&key) {
                return status_error(
                    StatusCode::CONFLICT,
                    "AlreadyExists",
                    format!("{name} already exists"),
                );
            }
            object["metadata"]["name"] = json!(name);
            object["metadata"]["resourceVersion"] = json!(rv);
            object["metadata"]["uid"] = json!(format!("uid-{rv}"));
            object["metadata"]["creationTimestamp"] = json!(created_at(&rv));
            state.record(&key, "ADDED", &object);
            state.objects.insert(key, object.clone());
            respond(StatusCode::CREATED, &object)
        }
        Method::PATCH => {
            let apply = content_type.starts_with("application/apply-patch");
            // A resourceVersion in the patch is a precondition, as on the API server.
            if let (Some(wanted), Some(existing)) = (
                parsed["metadata"]["resourceVersion"].as_str(),
                state.objects.get(&object_path),
            ) && existing["metadata"]["resourceVersion"].as_str() != Some(wanted)
            {
                return status_error(
                    StatusCode::CONFLICT,
                    "Conflict",
                    format!("{path}: the object has been modified"),
                );
            }
            // Server-side apply: a field another manager set to another value is a conflict,
            // unless forced. Other patches take the fields they set.
            if subresource.is_none()
                && !field_manager.is_empty()
                && let Some(spec) = parsed["spec"].as_object()
            {
                let current = state.objects.get(&object_path).map(|o| o["spec"].clone());
                for (field, value) in spec {
                    let key = (object_path.clone(), format!("spec.{field}"));
                    let owner = state.owners.get(&key).cloned();
                    let same = current.as_ref().is_some_and(|c| c[field] == *value);
                    if apply
                        && !force
                        && owner.as_ref().is_some_and(|o| *o != field_manager)
                        && !same
                    {
                        return status_error(
                            StatusCode::CONFLICT,
                            "Conflict",
                            format!(
                                "Apply failed with 1 conflict: conflict with \"{}\": .spec.{field}",
                                owner.unwrap_or_default()
                            ),
                        );
                    }
                }
                for (field, value) in spec {
                    let key = (object_path.clone(), format!("spec.{field}"));
                    if value.is_null() {
                        state.owners.remove(&key);
                    } else {
                        state.owners.insert(key, field_manager.clone());
                    }
                }
            }
            let Some(existing) = state.objects.get_mut(&object_path) else {
                if apply && subresource.is_none() {
                    let mut object = parsed;
                    object["metadata"]["resourceVersion"] = json!(rv);
                    object["metadata"]["uid"] = json!(format!("uid-{rv}"));
                    object["metadata"]["creationTimestamp"] = json!(created_at(&rv));
                    state.record(&object_path, "ADDED", &object);
                    state.objects.insert(object_path, object.clone());
                    return respond(StatusCode::CREATED, &object);
                }
                return status_error(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    format!("{path} not found"),
                );
            };
            let before = existing.clone();
            match subresource {
                // One field manager owns the whole status: applying it replaces it.
                Some("status") if apply => existing["status"] = parsed["status"].clone(),
                Some("status") => merge_patch(&mut existing["status"], &parsed["status"]),
                _ => {
                    let mut patch = parsed;
                    if let Some(meta) = patch.get_mut("metadata").and_then(Value::as_object_mut) {
                        meta.remove("resourceVersion");
                    }
                    merge_patch(existing, &patch);
                }
            }
            // A patch that changes nothing is no change, as on an API server: the same
            // resourceVersion, and no watch event.
            if *existing == before {
                let object = existing.clone();
                return respond(StatusCode::OK, &object);
            }
            existing["metadata"]["resourceVersion"] = json!(rv);
            let object = existing.clone();
            state.record(&object_path, "MODIFIED", &object);
            respond(StatusCode::OK, &object)
        }
        Method::PUT => {
            let mut object = parsed;
            let current = state
                .objects
                .get(&object_path)
                .map(|o| o["metadata"]["resourceVersion"].clone());
            if let (Some(wanted), Some(Some(current))) = (
                object["metadata"]["resourceVersion"].as_str(),
                current.as_ref().map(Value::as_str),
            ) && wanted != current
            {
                return status_error(
                    StatusCode::CONFLICT,
                    "Conflict",
                    format!("{path}: the object has been modified"),
                );
            }
            object["metadata"]["resourceVersion"] = json!(rv);
            state.record(&object_path, "MODIFIED", &object);
            state.objects.insert(object_path, object.clone());
            respond(StatusCode::OK, &object)
        }
        Method::DELETE => match state.objects.remove(&object_path) {
            Some(object) => {
                state.record(&object_path, "DELETED", &object);
                respond(StatusCode::OK, &object)
            }
            None => status_error(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("{path} not found"),
            ),
        },
        _ => status_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            method.to_string(),
        ),
    }
}

/// Objects created later carry a later creationTimestamp, as on an API server (one second per
/// resource version, so that order by creation is never a tie).
fn created_at(resource_version: &str) -> String {
    let seconds: i64 = resource_version.parse().unwrap_or_default();
    (chrono::DateTime::<chrono::Utc>::from_timestamp(1_767_225_600, 0).unwrap_or_default()
        + chrono::Duration::seconds(seconds))
    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}
