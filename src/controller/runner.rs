//! Runner Jobs: a framework's own command (`sqlmesh migrate`, `sqlmesh janitor`) as a Kubernetes
//! Job, for StateMigration upgrades and scheduled framework janitors. The store's connection
//! reaches the container through `secretKeyRef`s to the store's own Secret: no secret value is
//! ever copied into a Job.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapProjection, Container, EnvVar, EnvVarSource, KeyToPath,
    PodSecurityContext, PodSpec, PodTemplateSpec, ProjectedVolumeSource, SeccompProfile,
    SecretKeySelector, SecretProjection, SecurityContext, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, PostParams};
use sha2::{Digest, Sha256};

use crate::api::SecretKeyRef;
use crate::api::labels::{MANAGED_BY, PURPOSE_LABEL, STORE_LABEL};
use crate::api::runner::Runner;
use crate::api::state_store::StateStore;
use crate::engine::{Framework, MeltanoDriver, search_path_option};

/// A Job name from `base` and `suffix`, at most 63 characters (Jobs label their pods with it):
/// long bases are cut and made unique again with a hash of the whole.
pub fn job_name(base: &str, suffix: &str) -> String {
    let full = format!("{base}-{suffix}");
    if full.len() <= 63 {
        return full;
    }
    let hash = &hex::encode(Sha256::digest(full.as_bytes()))[..8];
    let room = 63 - suffix.len() - hash.len() - 2;
    let cut: String = base.chars().take(room).collect();
    format!("{}-{hash}-{suffix}", cut.trim_end_matches(['-', '.']))
}

/// Everything a runner Job is made from.
pub struct JobRequest<'a> {
    pub name: String,
    pub namespace: &'a str,
    pub runner: &'a Runner,
    /// Used when the runner names no command.
    pub default_command: &'a [&'a str],
    pub store: &'a StateStore,
    pub owner: OwnerReference,
    pub purpose: &'a str,
    pub labels: BTreeMap<String, String>,
}

/// The command a runner runs: its own, or the framework's default.
pub fn command(runner: &Runner, default_command: &[&str]) -> Vec<String> {
    if runner.command.is_empty() {
        default_command.iter().map(|s| (*s).to_owned()).collect()
    } else {
        runner.command.clone()
    }
}

const MELTANO_DATABASE_URI: &str = "MELTANO_DATABASE_URI";

/// Where a runner's container finds the store's TLS material (`PGSSLROOTCERT`, …).
const TLS_DIR: &str = "/etc/statekeeper/tls";
const CA_FILE: &str = "ca.crt";
const CERT_FILE: &str = "client.crt";
const KEY_FILE: &str = "client.key";
/// The group of the runner's files: libpq reads a private key that root owns only when no one
/// but root and its group can read it (0440), and fsGroup puts the container in that group.
const TLS_FILE_GROUP: i64 = 65532;

/// One volume with the store's CA and client certificate, from their ConfigMap and Secrets by
/// reference (never a copied value).
fn tls_volume(store: &StateStore) -> Option<Volume> {
    let tls = store.spec.connection.tls.as_ref()?;
    let item = |key: &str, path: &str| KeyToPath {
        key: key.to_owned(),
        path: path.to_owned(),
        mode: None,
    };
    let mut sources = Vec::new();
    if let Some(ca) = &tls.ca_certificate {
        sources.push(match (&ca.config_map_key_ref, &ca.secret_key_ref) {
            (Some(r), _) => VolumeProjection {
                config_map: Some(ConfigMapProjection {
                    name: r.name.clone(),
                    items: Some(vec![item(&r.key, CA_FILE)]),
                    optional: Some(false),
                }),
                ..VolumeProjection::default()
            },
            (None, Some(r)) => VolumeProjection {
                secret: Some(SecretProjection {
                    name: r.name.clone(),
                    items: Some(vec![item(&r.key, CA_FILE)]),
                    optional: Some(false),
                }),
                ..VolumeProjection::default()
            },
            (None, None) => return None,
        });
    }
    if let Some(client) = &tls.client_certificate {
        sources.push(VolumeProjection {
            secret: Some(SecretProjection {
                name: client.secret_name.clone(),
                items: Some(vec![
                    item(&client.certificate_key, CERT_FILE),
                    item(&client.private_key_key, KEY_FILE),
                ]),
                optional: Some(false),
            }),
            ..VolumeProjection::default()
        });
    }
    Some(Volume {
        name: "statekeeper-tls".into(),
        projected: Some(ProjectedVolumeSource {
            default_mode: Some(0o440),
            sources: Some(sources),
        }),
        ..Volume::default()
    })
}

fn secret_env(name: &str, reference: &SecretKeyRef) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: reference.name.clone(),
                key: reference.key.clone(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn plain_env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

/// The store's connection as environment variables: values that are not secret as they are,
/// secrets as references to the store's Secret.
pub fn connection_env(store: &StateStore) -> Vec<EnvVar> {
    let spec = &store.spec;
    let connection = &spec.connection;
    let mut env = vec![
        plain_env("STATEKEEPER_SCHEMA", spec.schema_name()),
        plain_env(
            "STATEKEEPER_FRAMEWORK",
            Framework::from(spec.framework).as_str(),
        ),
    ];
    if let Some(url) = &connection.url_secret_ref {
        env.push(secret_env("STATEKEEPER_DATABASE_URL", url));
    }
    if let Some(host) = &connection.host {
        env.push(plain_env("PGHOST", host.clone()));
        env.push(plain_env(
            "PGPORT",
            connection.port.unwrap_or(5432).to_string(),
        ));
        env.push(plain_env(
            "PGDATABASE",
            connection.database.as_deref().unwrap_or("postgres"),
        ));
        if let Some(user) = &connection.user {
            env.push(plain_env("PGUSER", user.clone()));
        }
        if let Some(password) = &connection.password_secret_ref {
            env.push(secret_env("PGPASSWORD", password));
        }
        if let Some(mode) = connection.ssl_mode {
            env.push(plain_env("PGSSLMODE", mode.as_libpq()));
        }
    }
    // libpq reads the TLS material from files: the Job mounts it (see `tls_volume`).
    if let Some(tls) = &connection.tls {
        if tls.ca_certificate.is_some() {
            env.push(plain_env("PGSSLROOTCERT", format!("{TLS_DIR}/{CA_FILE}")));
        }
        if tls.client_certificate.is_some() {
            env.push(plain_env("PGSSLCERT", format!("{TLS_DIR}/{CERT_FILE}")));
            env.push(plain_env("PGSSLKEY", format!("{TLS_DIR}/{KEY_FILE}")));
        }
    }
    if Framework::from(spec.framework) == Framework::Meltano {
        // Meltano reads its database from MELTANO_DATABASE_URI, never from PG* (without it,
        // it would migrate a SQLite file in the image). A host connection: a URI with no host
        // or secret, completed by psycopg from the PG* variables; a URL Secret: its URL, by
        // reference (Kubernetes expands `$(VAR)` from the variables before it).
        let uri = match &connection.url_secret_ref {
            Some(_) => "$(STATEKEEPER_DATABASE_URL)".to_owned(),
            None => MeltanoDriver::default().database_uri().to_owned(),
        };
        env.push(plain_env(MELTANO_DATABASE_URI, uri));
        if let Some((name, value)) = search_path_option(spec.schema_name()) {
            env.push(plain_env(&name, value));
        }
    }
    env
}

/// The Job for a request: one pod, never retried (a half-run migration is restored, not run
/// twice), bounded by the runner's deadline, non-root, owned by the requesting object.
pub fn build_job(request: &JobRequest<'_>) -> Job {
    let runner = request.runner;
    let mut labels = request.labels.clone();
    labels.insert(MANAGED_BY.0.into(), MANAGED_BY.1.into());
    labels.insert(STORE_LABEL.into(), store_name(request.store));
    labels.insert(PURPOSE_LABEL.into(), request.purpose.into());
    // The runner's own variables first; the connection's last, so they cannot be overridden by
    // accident into pointing the command at another database.
    let tls = tls_volume(request.store);
    let mut env = runner.env.clone();
    let mut connection = connection_env(request.store);
    // The one connection variable a runner may set itself: Meltano's URI, to name another
    // driver (`postgresql+psycopg2://`) or to take it from a Secret of its own.
    if env.iter().any(|e| e.name == MELTANO_DATABASE_URI) {
        connection.retain(|c| c.name != MELTANO_DATABASE_URI);
    }
    env.retain(|e| !connection.iter().any(|c| c.name == e.name));
    env.extend(connection);
    let container = Container {
        name: request.purpose.into(),
        image: Some(runner.image.clone()),
        command: Some(command(runner, request.default_command)),
        args: (!runner.args.is_empty()).then(|| runner.args.clone()),
        working_dir: runner.working_dir.clone(),
        env: Some(env),
        env_from: (!runner.env_from.is_empty()).then(|| runner.env_from.clone()),
        volume_mounts: tls.as_ref().map(|volume| {
            vec![VolumeMount {
                name: volume.name.clone(),
                mount_path: TLS_DIR.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            }]
        }),
        resources: runner.resources.clone(),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        ..Container::default()
    };
    Job {
        metadata: ObjectMeta {
            name: Some(request.name.clone()),
            namespace: Some(request.namespace.to_owned()),
            labels: Some(labels.clone()),
            owner_references: Some(vec![request.owner.clone()]),
            ..ObjectMeta::default()
        },
        spec: Some(JobSpec {
            backoff_limit: Some(0),
            active_deadline_seconds: Some(runner.active_deadline_seconds),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    restart_policy: Some("Never".into()),
                    service_account_name: runner.service_account_name.clone(),
                    node_selector: (!runner.node_selector.is_empty())
                        .then(|| runner.node_selector.clone()),
                    tolerations: (!runner.tolerations.is_empty())
                        .then(|| runner.tolerations.clone()),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: runner.run_as_user,
                        fs_group: tls.is_some().then_some(TLS_FILE_GROUP),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            ..SeccompProfile::default()
                        }),
                        ..PodSecurityContext::default()
                    }),
                    containers: vec![container],
                    volumes: tls.map(|volume| vec![volume]),
                    ..PodSpec::default()
                }),
            },
            ..JobSpec::default()
        }),
        status: None,
    }
}

fn store_name(store: &StateStore) -> String {
    store.metadata.name.clone().unwrap_or_default()
}

/// Creates the Job, or adopts the one an earlier attempt created under the same name (its status
/// write was lost to a restart): never two Jobs for one request.
pub async fn create_or_adopt(api: &Api<Job>, job: &Job) -> Result<Job, kube::Error> {
    match api.create(&PostParams::default(), job).await {
        Ok(created) => Ok(created),
        Err(kube::Error::Api(status)) if status.code == 409 => {
            api.get(job.metadata.name.as_deref().unwrap_or_default())
                .await
        }
        Err(e) => Err(e),
    }
}

/// Where a Job is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobOutcome {
    Running,
    Succeeded,
    /// The Job failed: its condition's reason (e.g. `DeadlineExceeded`, `BackoffLimitExceeded`)
    /// and message.
    Failed {
        reason: String,
        message: String,
    },
}

pub fn outcome(job: &Job) -> JobOutcome {
    let Some(status) = &job.status else {
        return JobOutcome::Running;
    };
    for condition in status.conditions.iter().flatten() {
        if condition.status != "True" {
            continue;
        }
        match condition.type_.as_str() {
            "Complete" => return JobOutcome::Succeeded,
            "Failed" => {
                return JobOutcome::Failed {
                    reason: condition.reason.clone().unwrap_or_else(|| "Failed".into()),
                    message: condition.message.clone().unwrap_or_default(),
                };
            }
            _ => {}
        }
    }
    if status.succeeded.unwrap_or(0) > 0 && status.active.unwrap_or(0) == 0 {
        return JobOutcome::Succeeded;
    }
    if status.failed.unwrap_or(0) > 0 && status.active.unwrap_or(0) == 0 {
        return JobOutcome::Failed {
            reason: "PodFailed".into(),
            message: "the Job's pod failed".into(),
        };
    }
    JobOutcome::Running
}

/// What failed, in words, for status messages.
pub fn describe_failure(reason: &str, message: &str, deadline_seconds: i64) -> String {
    let what = match reason {
        "DeadlineExceeded" => format!("ran longer than its deadline of {deadline_seconds}s"),
        "BackoffLimitExceeded" | "PodFailed" => "exited with an error".to_owned(),
        other => format!("failed ({other})"),
    };
    if message.is_empty() {
        what
    } else {
        format!("{what}: {message}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(connection: serde_json::Value, framework: &str) -> StateStore {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "statekeeper.dev/v1alpha1",
            "kind": "StateStore",
            "metadata": {"name": "s", "namespace": "data"},
            "spec": {"framework": framework, "connection": connection}
        }))
        .expect("a StateStore")
    }

    fn value_of<'a>(env: &'a [EnvVar], name: &str) -> Option<&'a str> {
        env.iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value.as_deref())
    }

    /// Meltano reads MELTANO_DATABASE_URI, never PG*: a runner of a Meltano store always gets
    /// one for the managed database, and never with a copied secret.
    #[test]
    fn a_meltano_runner_is_pointed_at_the_managed_database() {
        let host = connection_env(&store(
            serde_json::json!({"host": "db", "user": "u",
                "passwordSecretRef": {"name": "pg", "key": "password"}}),
            "meltano",
        ));
        assert_eq!(
            value_of(&host, "MELTANO_DATABASE_URI"),
            Some("postgresql+psycopg://")
        );
        assert_eq!(value_of(&host, "PGOPTIONS"), None, "schema public");
        let url = connection_env(&store(
            serde_json::json!({"urlSecretRef": {"name": "pg", "key": "url"}}),
            "meltano",
        ));
        let position = |name: &str| url.iter().position(|e| e.name == name);
        assert_eq!(
            value_of(&url, "MELTANO_DATABASE_URI"),
            Some("$(STATEKEEPER_DATABASE_URL)")
        );
        assert!(
            position("STATEKEEPER_DATABASE_URL") < position("MELTANO_DATABASE_URI"),
            "Kubernetes expands only variables defined before"
        );
        let sqlmesh = connection_env(&store(
            serde_json::json!({"urlSecretRef": {"name": "pg", "key": "url"}}),
            "sqlmesh",
        ));
        assert_eq!(value_of(&sqlmesh, "MELTANO_DATABASE_URI"), None);
    }

    /// libpq in a runner reads the store's CA and client certificate from files: one projected
    /// volume of the ConfigMap and Secret (by reference), the PGSSL* variables naming its files,
    /// a private key only its owner and group can read, the pod in that group.
    #[test]
    fn a_runner_gets_the_stores_tls_material_as_files() {
        let store = store(
            serde_json::json!({"host": "db", "user": "u", "sslMode": "verify-full",
                "passwordSecretRef": {"name": "pg", "key": "password"},
                "tls": {"caCertificate": {"configMapKeyRef": {"name": "rds-ca", "key": "bundle.pem"}},
                        "clientCertificate": {"secretName": "pg-client"}}}),
            "sqlmesh",
        );
        let env = connection_env(&store);
        assert_eq!(value_of(&env, "PGSSLMODE"), Some("verify-full"));
        assert_eq!(
            value_of(&env, "PGSSLROOTCERT"),
            Some("/etc/statekeeper/tls/ca.crt")
        );
        assert_eq!(
            value_of(&env, "PGSSLCERT"),
            Some("/etc/statekeeper/tls/client.crt")
        );
        assert_eq!(
            value_of(&env, "PGSSLKEY"),
            Some("/etc/statekeeper/tls/client.key")
        );
        let volume = serde_json::to_value(tls_volume(&store).expect("a volume")).unwrap();
        assert_eq!(volume["projected"]["defaultMode"], 0o440);
        let sources = &volume["projected"]["sources"];
        assert_eq!(sources[0]["configMap"]["name"], "rds-ca");
        assert_eq!(
            sources[0]["configMap"]["items"],
            serde_json::json!([{"key": "bundle.pem", "path": "ca.crt"}])
        );
        assert_eq!(sources[1]["secret"]["name"], "pg-client");
        assert_eq!(
            sources[1]["secret"]["items"],
            serde_json::json!([{"key": "tls.crt", "path": "client.crt"}, {"key": "tls.key", "path": "client.key"}])
        );
    }
}
