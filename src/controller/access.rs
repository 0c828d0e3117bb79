//! What the operator reaches outside the cluster's objects, and how: a store's database (its
//! Secrets and TLS material read, a pool from the pool cache) and an export's destination (its
//! credentials Secret). Secrets are read here and nowhere else; their values never leave in a
//! message.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::ResourceExt;
use kube::api::Api;

use super::context::{Context, ReconcileError};
use super::pool_cache::PoolError;
use crate::api::SecretKeyRef;
use crate::api::common::{IDENTITY_KEY, KeysSecretRef, RECIPIENTS_KEY};
use crate::api::state_export::Encryption;
use crate::api::state_store::{ConfigMapKeyRef, StateStore, TlsSpec};
use crate::engine::{
    ConnectionParts, ConnectionSettings, Destination, Identities, Recipients, SchemaName, Store,
    TlsMaterial, password_in_url, redact,
};

/// The reason while a store waits for one of the operator's database connections.
pub const WAITING_FOR_CONNECTION: &str = "WaitingForConnection";

/// Why a store's database cannot be used.
#[derive(Debug)]
pub enum ConnectProblem {
    /// The spec cannot work as written (e.g. an invalid schema name).
    InvalidSpec(String),
    /// A Secret (or ConfigMap) the connection needs is missing or unusable.
    Secret {
        reason: &'static str,
        message: String,
    },
    /// The database could not be reached or refused us.
    Failed {
        reason: &'static str,
        message: String,
    },
    /// Every database connection of this operator is in use (`--max-db-connections`) and none
    /// became free in time: nothing is known about the store, nothing is wrong with it.
    WaitingForConnection { message: String },
}

impl ConnectProblem {
    /// The reason and message a status reports.
    pub fn reason_and_message(&self) -> (&str, &str) {
        match self {
            ConnectProblem::InvalidSpec(message) => ("InvalidSpec", message),
            ConnectProblem::Secret { reason, message }
            | ConnectProblem::Failed { reason, message } => (reason, message),
            ConnectProblem::WaitingForConnection { message } => (WAITING_FOR_CONNECTION, message),
        }
    }
}

/// Connects to a StateStore's database through the pool cache. On success, returns the engine
/// handle and the secret values read (for redaction); otherwise what went wrong, with the secret
/// values read so far.
pub async fn connect(
    store: &StateStore,
    namespace: &str,
    ctx: &Context,
) -> Result<(Store, Vec<String>), (ConnectProblem, Vec<String>)> {
    let key = format!("{namespace}/{}", store.name_any());
    let schema = SchemaName::new(store.spec.schema_name())
        .map_err(|e| (ConnectProblem::InvalidSpec(e.to_string()), Vec::new()))?;
    let (settings, secrets) = resolve_connection(store, namespace, ctx)
        .await
        .map_err(|problem| (problem, Vec::new()))?;
    match ctx.pool_for(&key, &settings, &secrets).await {
        Ok(pool) => Ok((
            Store::new(pool, schema)
                .with_framework(store.spec.framework.into())
                .with_actor(format!("operator:{key}"))
                .with_lock_timeout(ctx.settings.lock_timeout),
            secrets,
        )),
        Err(PoolError::NoSlot { budget, waited }) => Err((
            ConnectProblem::WaitingForConnection {
                message: format!(
                    "waiting for a database connection: all {budget} of this operator's are in \
                     use (--max-db-connections) and none came free in {}s; retrying",
                    waited.as_secs()
                ),
            },
            secrets,
        )),
        Err(PoolError::Engine(e)) => Err((
            ConnectProblem::Failed {
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
        .map_err(|(problem, secrets)| {
            let (reason, message) = problem.reason_and_message();
            let secret_refs: Vec<&str> = secrets.iter().map(String::as_str).collect();
            (
                reason.to_owned(),
                format!(
                    "StateStore \"{}\": {}",
                    store.name_any(),
                    redact(message, &secret_refs)
                ),
            )
        })
}

/// The store an operation names, connected: the object, its engine and the secret values read.
pub struct OperatedStore {
    pub store: StateStore,
    pub engine: Store,
    pub secrets: Vec<String>,
}

/// The StateStore `name` in `namespace`, connected for an operation, or why it cannot be used
/// yet (reason, message; both may heal: the store may appear, its database come back).
pub async fn store_for_operation(
    ctx: &Context,
    namespace: &str,
    name: &str,
) -> Result<Result<OperatedStore, (String, String)>, ReconcileError> {
    let stores: Api<StateStore> = Api::namespaced(ctx.client.clone(), namespace);
    let Some(store) = stores.get_opt(name).await? else {
        return Ok(Err((
            "StoreNotFound".into(),
            format!("StateStore \"{name}\" not found in namespace \"{namespace}\""),
        )));
    };
    Ok(connect_for_operation(&store, namespace, ctx)
        .await
        .map(|(engine, secrets)| OperatedStore {
            store,
            engine,
            secrets,
        }))
}

/// Builds connection settings from the spec and its Secrets, or says precisely what is wrong.
async fn resolve_connection(
    store: &StateStore,
    namespace: &str,
    ctx: &Context,
) -> Result<(ConnectionSettings, Vec<String>), ConnectProblem> {
    let spec = &store.spec.connection;
    let timeout = Duration::from_secs(
        spec.connect_timeout_seconds
            .map(u64::from)
            .unwrap_or(ctx.settings.connect_timeout.as_secs()),
    );
    let (settings, secret_values) = match (&spec.url_secret_ref, &spec.host) {
        (Some(url_ref), None) => {
            let url = read_secret_key(ctx, namespace, url_ref).await?;
            let settings = ConnectionSettings::from_url(&url).map_err(|e| {
                ConnectProblem::InvalidSpec(format!(
                    "the URL in Secret \"{}\" key \"{}\" is not usable: {e}",
                    url_ref.name, url_ref.key
                ))
            })?;
            let password = password_in_url(&url).unwrap_or_default();
            (settings, vec![url, password])
        }
        (None, Some(host)) => {
            let user = spec.user.as_deref().ok_or_else(|| {
                ConnectProblem::InvalidSpec(
                    "connection.user is required with connection.host".into(),
                )
            })?;
            let password = match &spec.password_secret_ref {
                Some(r) => Some(read_secret_key(ctx, namespace, r).await?),
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
            .map_err(|e| ConnectProblem::InvalidSpec(e.to_string()))?;
            (settings, password.into_iter().collect())
        }
        _ => {
            return Err(ConnectProblem::InvalidSpec(
                "set exactly one of connection.urlSecretRef and connection.host".into(),
            ));
        }
    };
    let (tls, material) = read_tls(spec.tls.as_ref(), namespace, ctx).await?;
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
    namespace: &str,
    ctx: &Context,
) -> Result<(TlsMaterial, Vec<String>), ConnectProblem> {
    let mut material = TlsMaterial::default();
    let mut texts = Vec::new();
    let Some(tls) = tls else {
        return Ok((material, texts));
    };
    if let Some(source) = &tls.ca_certificate {
        let ca = match (&source.config_map_key_ref, &source.secret_key_ref) {
            (Some(r), _) => read_config_map_key(ctx, namespace, r).await?,
            (None, Some(r)) => read_secret_key(ctx, namespace, r).await?,
            (None, None) => {
                return Err(ConnectProblem::InvalidSpec(
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
        let certificate = read_secret_key(ctx, namespace, &key_of(&client.certificate_key)).await?;
        let key = read_secret_key(ctx, namespace, &key_of(&client.private_key_key)).await?;
        material.client_certificate = Some(certificate.clone().into_bytes());
        material.client_key = Some(key.clone().into_bytes());
        texts.extend([certificate, key]);
    }
    Ok((material, texts))
}

/// "it has: a, b" for a message about a missing key: the keys, never the values.
fn key_list<'a>(keys: impl Iterator<Item = &'a String>) -> String {
    let keys: Vec<&str> = keys.map(String::as_str).collect();
    if keys.is_empty() {
        "no keys".to_owned()
    } else {
        keys.join(", ")
    }
}

async fn read_config_map_key(
    ctx: &Context,
    namespace: &str,
    r: &ConfigMapKeyRef,
) -> Result<String, ConnectProblem> {
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), namespace);
    let config_map = api
        .get_opt(&r.name)
        .await
        .map_err(|e| ConnectProblem::Secret {
            reason: "ConfigMapUnreadable",
            message: format!(
                "cannot read ConfigMap \"{}\" in namespace \"{namespace}\": {e}",
                r.name
            ),
        })?
        .ok_or_else(|| ConnectProblem::Secret {
            reason: "ConfigMapNotFound",
            message: format!(
                "ConfigMap \"{}\" not found in namespace \"{namespace}\"",
                r.name
            ),
        })?;
    let data = config_map.data.unwrap_or_default();
    data.get(&r.key)
        .cloned()
        .ok_or_else(|| ConnectProblem::Secret {
            reason: "ConfigMapKeyMissing",
            message: format!(
                "ConfigMap \"{}\" has no key \"{}\" (it has: {})",
                r.name,
                r.key,
                key_list(data.keys())
            ),
        })
}

/// Why a Secret gave no value.
struct SecretProblem {
    reason: &'static str,
    message: String,
}

impl From<SecretProblem> for ConnectProblem {
    fn from(problem: SecretProblem) -> Self {
        ConnectProblem::Secret {
            reason: problem.reason,
            message: problem.message,
        }
    }
}

/// The data of the Secret `name` (`what` names it in messages): the one place the operator
/// reads a Secret.
async fn read_secret(
    ctx: &Context,
    namespace: &str,
    name: &str,
    what: &str,
) -> Result<BTreeMap<String, ByteString>, SecretProblem> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let secret = api
        .get_opt(name)
        .await
        .map_err(|e| SecretProblem {
            reason: "SecretUnreadable",
            message: format!("cannot read Secret \"{name}\" in namespace \"{namespace}\": {e}"),
        })?
        .ok_or_else(|| SecretProblem {
            reason: "SecretNotFound",
            message: format!("{what} \"{name}\" not found in namespace \"{namespace}\""),
        })?;
    Ok(secret.data.unwrap_or_default())
}

/// A Secret's value as text (connection strings, certificates and credentials all are).
fn secret_text(secret: &str, key: &str, value: ByteString) -> Result<String, SecretProblem> {
    String::from_utf8(value.0).map_err(|_| SecretProblem {
        reason: "SecretValueInvalid",
        message: format!("Secret \"{secret}\" key \"{key}\" is not UTF-8 text"),
    })
}

async fn read_secret_key(
    ctx: &Context,
    namespace: &str,
    r: &SecretKeyRef,
) -> Result<String, ConnectProblem> {
    let mut data = read_secret(ctx, namespace, &r.name, "Secret").await?;
    let Some(value) = data.remove(&r.key) else {
        return Err(ConnectProblem::Secret {
            reason: "SecretKeyMissing",
            message: format!(
                "Secret \"{}\" has no key \"{}\" (it has: {})",
                r.name,
                r.key,
                key_list(data.keys())
            ),
        });
    };
    Ok(secret_text(&r.name, &r.key, value)?)
}

/// The URL of the file an export writes: `url` itself, or `<url><name>.<extension>` when `url`
/// ends in `/` (a folder); `extension` is the spec's (`StateExportSpec::file_extension`).
pub fn file_url(url: &str, name: &str, extension: &str) -> String {
    if url.ends_with('/') {
        format!("{url}{name}.{extension}")
    } else {
        url.to_owned()
    }
}

/// Why a destination (or the keys of an encryption) cannot be used: permanent problems fail the
/// export for good, the rest (a Secret not created yet) are retried.
pub struct DestinationProblem {
    pub reason: &'static str,
    pub message: String,
    pub permanent: bool,
}

/// The destination at `url`, configured by the spec's options and the keys of its credentials
/// Secret. Credential values never appear in the messages.
pub async fn resolve_destination(
    ctx: &Context,
    namespace: &str,
    spec: &crate::api::state_export::Destination,
    url: &str,
) -> Result<Destination, DestinationProblem> {
    let mut options = spec.options.clone();
    let mut secret_values = Vec::new();
    if let Some(secret_ref) = &spec.credentials_secret_ref {
        let data = read_secret(ctx, namespace, &secret_ref.name, "credentials Secret")
            .await
            .map_err(|problem| DestinationProblem {
                reason: problem.reason,
                message: problem.message,
                permanent: false,
            })?;
        for (key, value) in data {
            let value = secret_text(&secret_ref.name, &key, value).map_err(|problem| {
                DestinationProblem {
                    reason: problem.reason,
                    message: problem.message,
                    permanent: true,
                }
            })?;
            if options.contains_key(&key) {
                return Err(DestinationProblem {
                    reason: "InvalidDestination",
                    message: format!(
                        "option \"{key}\" is set both in destination.options and in Secret \"{}\"",
                        secret_ref.name
                    ),
                    permanent: true,
                });
            }
            secret_values.push(value.clone());
            options.insert(key, value);
        }
    }
    Destination::parse_with_secrets(url, &options, &secret_values).map_err(|e| DestinationProblem {
        reason: e.reason(),
        message: e.to_string(),
        permanent: true,
    })
}

/// The age keys in `secret_ref` (`default_key` unless it names another): a missing Secret or key
/// may still appear (retried); one that is not text is permanent. Never a value in a message.
async fn read_keys(
    ctx: &Context,
    namespace: &str,
    secret_ref: &KeysSecretRef,
    default_key: &str,
    what: &str,
) -> Result<(String, String), DestinationProblem> {
    let key = secret_ref.key_or(default_key);
    let mut data = read_secret(ctx, namespace, &secret_ref.name, what)
        .await
        .map_err(|problem| DestinationProblem {
            reason: problem.reason,
            message: problem.message,
            permanent: false,
        })?;
    let Some(value) = data.remove(key) else {
        return Err(DestinationProblem {
            reason: "SecretKeyMissing",
            message: format!(
                "{what} \"{}\" has no key \"{key}\" (it has: {})",
                secret_ref.name,
                key_list(data.keys())
            ),
            permanent: false,
        });
    };
    let text = secret_text(&secret_ref.name, key, value).map_err(|problem| DestinationProblem {
        reason: problem.reason,
        message: problem.message,
        permanent: true,
    })?;
    Ok((
        text,
        format!("{what} \"{}\" key \"{key}\"", secret_ref.name),
    ))
}

/// A key that is not an age key of the right kind: the spec (or the Secret) must change.
fn invalid_keys(e: crate::engine::Error) -> DestinationProblem {
    DestinationProblem {
        reason: e.reason(),
        message: e.to_string(),
        permanent: true,
    }
}

/// The recipients an export is encrypted to: the spec's and its Secret's.
pub async fn read_recipients(
    ctx: &Context,
    namespace: &str,
    encryption: &Encryption,
) -> Result<Recipients, DestinationProblem> {
    let mut recipients = Recipients::default();
    if !encryption.recipients.is_empty() {
        recipients.extend(
            Recipients::parse(&encryption.recipients.join("\n"), "encryption.recipients")
                .map_err(invalid_keys)?,
        );
    }
    if let Some(secret_ref) = &encryption.recipients_secret_ref {
        let (text, origin) = read_keys(
            ctx,
            namespace,
            secret_ref,
            RECIPIENTS_KEY,
            "recipients Secret",
        )
        .await?;
        recipients.extend(Recipients::parse(&text, &origin).map_err(invalid_keys)?);
    }
    if recipients.is_empty() {
        return Err(DestinationProblem {
            reason: "InvalidSpec",
            message: "encryption names no recipient: set encryption.recipients or \
                      encryption.recipientsSecretRef"
                .into(),
            permanent: true,
        });
    }
    Ok(recipients)
}

/// The identities in an identity Secret (to import or verify an encrypted export).
pub async fn read_identities(
    ctx: &Context,
    namespace: &str,
    secret_ref: &KeysSecretRef,
) -> Result<Identities, DestinationProblem> {
    let (text, origin) =
        read_keys(ctx, namespace, secret_ref, IDENTITY_KEY, "identity Secret").await?;
    Identities::parse(&text, &origin).map_err(invalid_keys)
}
