//! An in-memory Kubernetes API server for reconciler tests: a tower service that stores objects
//! as JSON by URL path and answers get, list, create, patch (apply, merge), status patches and
//! delete the way the API server does for the calls the operator makes. No mocks of our code.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};

#[derive(Default)]
struct State {
    objects: BTreeMap<String, Value>,
    resource_version: u64,
    requests: Vec<(String, String)>,
}

#[derive(Clone, Default)]
pub struct FakeKube {
    state: Arc<Mutex<State>>,
}

impl FakeKube {
    pub fn new() -> Self {
        Self::default()
    }

    /// A kube client whose every request is served by this fake.
    pub fn client(&self) -> kube::Client {
        let state = self.state.clone();
        let service = tower::service_fn(move |req: Request<kube::client::Body>| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(handle(state, req).await) }
        });
        kube::Client::new(service, "default")
    }

    /// Stores an object as-is, under the path the API server would serve it at.
    pub fn put(&self, path: &str, mut object: Value) {
        let mut state = self.state.lock().unwrap();
        state.resource_version += 1;
        let rv = state.resource_version.to_string();
        object["metadata"]["resourceVersion"] = json!(rv);
        state.objects.insert(path.to_owned(), object);
    }

    pub fn get(&self, path: &str) -> Option<Value> {
        self.state.lock().unwrap().objects.get(path).cloned()
    }

    pub fn remove(&self, path: &str) {
        self.state.lock().unwrap().objects.remove(path);
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

fn respond(code: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

fn status_error(code: StatusCode, reason: &str, message: String) -> Response<Full<Bytes>> {
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

async fn handle(
    state: Arc<Mutex<State>>,
    req: Request<kube::client::Body>,
) -> Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let selector = label_selector(req.uri().query().unwrap_or(""));
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
            object["metadata"]["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
            state.objects.insert(key, object.clone());
            respond(StatusCode::CREATED, &object)
        }
        Method::PATCH => {
            let apply = content_type.starts_with("application/apply-patch");
            let Some(existing) = state.objects.get_mut(&object_path) else {
                if apply && subresource.is_none() {
                    let mut object = parsed;
                    object["metadata"]["resourceVersion"] = json!(rv);
                    state.objects.insert(object_path, object.clone());
                    return respond(StatusCode::CREATED, &object);
                }
                return status_error(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    format!("{path} not found"),
                );
            };
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
            existing["metadata"]["resourceVersion"] = json!(rv);
            let object = existing.clone();
            respond(StatusCode::OK, &object)
        }
        Method::PUT => {
            let mut object = parsed;
            object["metadata"]["resourceVersion"] = json!(rv);
            state.objects.insert(object_path, object.clone());
            respond(StatusCode::OK, &object)
        }
        Method::DELETE => match state.objects.remove(&object_path) {
            Some(object) => respond(StatusCode::OK, &object),
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
