use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::SecretKeyRef;

/// A PostgreSQL-backed state store that the operator initialises and watches over.
#[derive(CustomResource, Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "statekeeper.dev",
    version = "v1alpha1",
    kind = "StateStore",
    namespaced,
    status = "StateStoreStatus",
    shortname = "sks",
    category = "statekeeper",
    validation = Rule::new("(has(self.spec.framework) ? self.spec.framework : 'statekeeper') == (has(oldSelf.spec.framework) ? oldSelf.spec.framework : 'statekeeper')").message("spec.framework is immutable: create a new StateStore for another framework"),
    validation = Rule::new("!has(self.spec.virtualLayer) || (has(self.spec.framework) && self.spec.framework == 'sqlmesh')").message("spec.virtualLayer re-points SQLMesh's environment views after a restore: only a SQLMesh store has them"),
    validation = Rule::new("!has(self.spec.janitor) || ((has(self.spec.framework) && self.spec.framework == 'sqlmesh') == has(self.spec.janitor.runner))").message("a SQLMesh store's janitor is SQLMesh's own (`sqlmesh janitor`): set spec.janitor.runner; statekeeper and Meltano stores are cleaned by statekeeper's janitor, which takes no runner"),
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Framework","type":"string","jsonPath":".spec.framework"}"#,
    printcolumn = r#"{"name":"Schema Version","type":"integer","jsonPath":".status.schemaVersion"}"#,
    printcolumn = r#"{"name":"Latest","type":"integer","jsonPath":".status.latestSchemaVersion","priority":1}"#,
    printcolumn = r#"{"name":"Last Janitor","type":"date","jsonPath":".status.janitor.lastSuccessfulTime"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct StateStoreSpec {
    /// The framework whose state the store holds: `statekeeper` (statekeeper's own schema, which
    /// it creates and upgrades), `sqlmesh` (SQLMesh's state tables) or `meltano` (a Meltano system
    /// database, schema `public` by default); SQLMesh and Meltano create and migrate their own
    /// tables, statekeeper backs them up, restores, exports and imports them. Immutable.
    #[serde(default)]
    pub framework: StoreFramework,
    /// How to reach the database.
    pub connection: ConnectionSpec,
    /// Schema holding the state tables (default: `statekeeper`, or `sqlmesh` for a SQLMesh store):
    /// lower-case letters, digits and '_', at most 37 bytes so that backup schemas
    /// `<schema>__backup_<id>` fit PostgreSQL's identifier limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z_][a-z0-9_]*$"), length(min = 1, max = 37))]
    pub schema: Option<String>,
    /// Allows `reset` operations on this store (each also needs its own approval).
    #[serde(default)]
    pub allow_reset: bool,
    /// Every StateMigration of this store waits for an approval of its plan
    /// (`spec.approval.planHash`) before it runs.
    #[serde(default)]
    pub require_approval: bool,
    /// The primary virtual data environment: it never expires and the janitor never removes it.
    #[serde(default = "default_unsuffixed_virtual_env")]
    #[schemars(length(min = 1, max = 253))]
    pub unsuffixed_virtual_env: String,
    /// Whether the operator creates the schema when it is missing. Applies to framework
    /// `statekeeper` only: SQLMesh creates its own tables (`sqlmesh plan`, `sqlmesh migrate`) and
    /// the store reports `NotInitialized` until it has.
    #[serde(default)]
    pub init_policy: InitPolicy,
    /// Run the janitor on a schedule, like a CronJob.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub janitor: Option<JanitorSpec>,
    /// Prune the store's backup schemas (`<schema>__backup_<id>`) after every operation and on
    /// every resync. Unset: backups are kept until dropped by hand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backups: Option<BackupRetentionSpec>,
    /// SQLMesh stores: after a restore (a StateMigration's rollback or import, or the restore
    /// after a failed runner Job), re-point the views of the environments it changed at the
    /// restored snapshots' tables, with SQLMesh's own code in a Job from the project's image.
    /// Unset: such a restore reports those views stale (the StateMigration's
    /// `status.virtualLayer`, the store's `VirtualLayerStale` condition) with the command that
    /// fixes them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_layer: Option<VirtualLayerSpec>,
}

/// How the operator re-points SQLMesh's views after a restore: a Job runs statekeeper's driver
/// (SQLMesh's promotion code, the same the CLI's `state repoint-views` runs) with the Python of
/// the image's SQLMesh, in the project's directory, so the project's config reaches the
/// warehouse. The Job gets the store's connection as every runner Job does (its Secret by
/// `secretKeyRef`) and the request (which environments, which models) in
/// `STATEKEEPER_REPOINT_REQUEST`. The image's SQLMesh must be the store's version.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.runner.args)").message("virtualLayer.runner.args is not used: the operator runs `COMMAND -c <driver>`; name the Python interpreter in runner.command"))]
pub struct VirtualLayerSpec {
    /// The image with the project and SQLMesh; `workingDir` is the project's directory.
    /// `command` names the Python interpreter SQLMesh is installed in (default `["python3"]`,
    /// e.g. `["/opt/venv/bin/python"]`): the operator always runs `COMMAND -c <driver>`, so
    /// `args` must stay empty.
    pub runner: crate::api::runner::Runner,
    /// The project's gateway whose warehouse holds the views (default: its `default_gateway`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub gateway: Option<String>,
}

/// Which backups to keep. A backup is kept when it is among the newest `keepLast` or not older
/// than `maxAge`, and dropped otherwise (with both: dropped when beyond the newest `keepLast`
/// *and* older than `maxAge`; with one, that one alone decides). Backups of StateMigrations that
/// have not finished (and the backup an unfinished rollback will restore) are always kept.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.keepLast) || has(self.maxAge)").message("set keepLast, maxAge or both: an empty backups policy says nothing about what to keep"))]
pub struct BackupRetentionSpec {
    /// Keep the newest N backups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 10000))]
    pub keep_last: Option<u32>,
    /// Keep backups not older than this: a number and a unit, `s`, `m`, `h`, `d` or `w`
    /// (e.g. `7d`, `12h`, `30m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 2, max = 16), regex(pattern = r"^[0-9]{1,9}[smhdw]$"))]
    pub max_age: Option<String>,
}

/// The scheduled janitor: removes expired environments, old checkpoints and unreferenced
/// versions in bounded batches, never overlapping another operation on the store.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JanitorSpec {
    /// Standard 5-field cron expression (minute hour day-of-month month day-of-week), or a
    /// nickname such as `@daily`.
    #[schemars(length(min = 1, max = 100))]
    pub schedule: String,
    /// IANA time zone the schedule is read in (default UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub time_zone: Option<String>,
    /// Pause scheduling; a run in progress finishes.
    #[serde(default)]
    pub suspend: bool,
    /// A run more than this many seconds late (e.g. after operator downtime) is skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub starting_deadline_seconds: Option<u64>,
    /// Remove environments whose expiry has passed.
    #[serde(default = "default_true")]
    pub expired_environments: bool,
    /// Keep the newest N checkpoints of each environment (default 10); null keeps them all.
    #[serde(default = "default_keep_checkpoints")]
    pub keep_checkpoints: Option<u32>,
    /// Checkpoints younger than this always survive (default 7d).
    #[serde(default = "default_checkpoint_min_age")]
    #[schemars(length(min = 1, max = 32))]
    pub checkpoint_min_age: String,
    /// Unreferenced versions younger than this survive, protecting plans in flight (default 24h).
    #[serde(default = "default_version_grace_period")]
    #[schemars(length(min = 1, max = 32))]
    pub version_grace_period: String,
    /// Rows removed per transaction (default 1000).
    #[serde(default = "default_batch_size")]
    #[schemars(range(min = 1, max = 100000))]
    pub batch_size: u32,
    /// Meltano stores: keep the newest N runs of each job (default 100). Each job's newest
    /// successful run and every RUNNING run stay whatever N is.
    #[serde(default = "default_keep_runs")]
    pub keep_runs: u32,
    /// Meltano stores: runs younger than this always survive (default 7d).
    #[serde(default = "default_run_min_age")]
    #[schemars(length(min = 1, max = 32))]
    pub run_min_age: String,
    /// Meltano stores: first mark stale RUNNING runs failed, as Meltano's own check does (no
    /// heartbeat for 5 minutes, or 24 hours without one).
    #[serde(default)]
    pub fail_stale_runs: bool,
    /// Only report what would be removed.
    #[serde(default)]
    pub dry_run: bool,
    /// For a store whose framework cleans it itself (SQLMesh): run the framework's janitor
    /// (default command `sqlmesh janitor`) as a Job per scheduled run. The fields above apply to
    /// statekeeper's janitor (statekeeper and Meltano stores) only. A failed framework janitor
    /// is reported, never restored: it also drops warehouse objects, so old state could point
    /// at dropped tables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner: Option<crate::api::runner::Runner>,
    /// Back the store up before each framework janitor run (default false).
    #[serde(default)]
    pub backup: bool,
}

fn default_true() -> bool {
    true
}

fn default_keep_checkpoints() -> Option<u32> {
    Some(10)
}

fn default_keep_runs() -> u32 {
    100
}

fn default_run_min_age() -> String {
    "7d".into()
}

fn default_checkpoint_min_age() -> String {
    "7d".into()
}

fn default_version_grace_period() -> String {
    "24h".into()
}

fn default_batch_size() -> u32 {
    1000
}

impl StateStoreSpec {
    /// The schema the state lives in: as set, or the framework's default.
    pub fn schema_name(&self) -> &str {
        self.schema.as_deref().unwrap_or(
            crate::engine::Framework::from(self.framework)
                .profile()
                .default_schema,
        )
    }
}

/// The framework whose state a store holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum StoreFramework {
    #[default]
    Statekeeper,
    Sqlmesh,
    Meltano,
}

impl From<StoreFramework> for crate::engine::Framework {
    fn from(value: StoreFramework) -> Self {
        match value {
            StoreFramework::Statekeeper => Self::Statekeeper,
            StoreFramework::Sqlmesh => Self::Sqlmesh,
            StoreFramework::Meltano => Self::Meltano,
        }
    }
}

fn default_unsuffixed_virtual_env() -> String {
    "prod".into()
}

/// Either a whole URL from a Secret, or host/port/database/user with a password Secret.
#[derive(Clone, Debug, Default, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.urlSecretRef) != has(self.host)").message("set either urlSecretRef, or host with user and passwordSecretRef"))]
#[x_kube(validation = Rule::new("!has(self.host) || has(self.user)").message("user is required with host"))]
pub struct ConnectionSpec {
    /// Database host name or address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub host: Option<String>,
    /// Database port (default 5432).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub port: Option<u16>,
    /// Database name (default `postgres`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub database: Option<String>,
    /// User name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub user: Option<String>,
    /// The user's password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret_ref: Option<SecretKeyRef>,
    /// A whole `postgres://user:password@host:port/db` URL, instead of the fields above.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_secret_ref: Option<SecretKeyRef>,
    /// TLS mode, as libpq's sslmode (default `prefer`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssl_mode: Option<SslMode>,
    /// The CA that signed the server's certificate (for `verify-ca` and `verify-full`), and a
    /// client certificate to log in with: PEM from Secrets or a ConfigMap, never files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,
    /// Seconds to wait when connecting (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 300))]
    pub connect_timeout_seconds: Option<u32>,
}

/// TLS material of a connection, in PEM.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    /// The CA certificate (or bundle) that signed the server's certificate: the bundle a managed
    /// service publishes (Amazon RDS, Cloud SQL, Azure), in a ConfigMap or Secret key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_certificate: Option<PemSource>,
    /// A client certificate and its private key, for `cert` authentication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificate: Option<ClientCertificateRef>,
}

/// One key of a ConfigMap or of a Secret, in the StateStore's namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.configMapKeyRef) != has(self.secretKeyRef)").message("set either configMapKeyRef or secretKeyRef"))]
pub struct PemSource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_key_ref: Option<ConfigMapKeyRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key_ref: Option<SecretKeyRef>,
}

/// A key in a ConfigMap in the resource's namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConfigMapKeyRef {
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub name: String,
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

/// A Secret holding a client certificate and its key, such as a `kubernetes.io/tls` Secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClientCertificateRef {
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub secret_name: String,
    /// The key holding the certificate (default `tls.crt`).
    #[serde(default = "default_certificate_key")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub certificate_key: String,
    /// The key holding the private key (default `tls.key`).
    #[serde(default = "default_private_key_key")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub private_key_key: String,
}

fn default_certificate_key() -> String {
    "tls.crt".into()
}

fn default_private_key_key() -> String {
    "tls.key".into()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn as_libpq(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum InitPolicy {
    /// Create the schema and apply all migrations when the store is not initialised.
    #[default]
    IfMissing,
    /// Never create anything; report `Initialized=False` until someone runs `state init`.
    Never,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StateStoreStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, Initializing or Failed: a summary of the conditions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// The framework whose state the store holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub framework: Option<String>,
    /// Schema version of the store (0 when not initialised); for SQLMesh, its state schema
    /// version (`_versions.schema_version`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema_version: Option<i32>,
    /// The framework's own versions: for SQLMesh, `sqlmeshVersion` and `sqlglotVersion`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub framework_versions: Option<BTreeMap<String, String>>,
    /// The latest schema version this operator ships (framework statekeeper).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_schema_version: Option<i32>,
    /// Row counts of the main state tables (SQLMesh: snapshots, environments, expired
    /// environments, intervals, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counts: Option<BTreeMap<String, i64>>,
    /// The newest backup schemas of this store (at most 20), oldest first; `backupSummary`
    /// counts them all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backups: Option<Vec<BackupStatus>>,
    /// How many backups the store has, their size, and what `spec.backups` last pruned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_summary: Option<BackupSummary>,
    /// When the operator last found the store changed (RFC 3339). It looks every `resyncSeconds`,
    /// but writes status only when something changed, so an idle store costs no writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_checked_time: Option<String>,
    /// The scheduled janitor, when `spec.janitor` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub janitor: Option<JanitorStatus>,
    #[serde(default)]
    #[schemars(schema_with = "super::common::conditions_schema")]
    pub conditions: Vec<Condition>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JanitorStatus {
    /// The occurrence of the schedule the last run was for (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_schedule_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_successful_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_schedule_time: Option<String>,
    /// What the last successful run removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_result: Option<JanitorResult>,
    /// Framework janitor: the Job running now, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_job: Option<String>,
    /// Framework janitor: the last Job that finished, and how.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_job: Option<String>,
    /// Succeeded or Failed (with the Job's reason).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_outcome: Option<String>,
    /// Framework janitor: the backup taken before the active or last run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_backup_id: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JanitorResult {
    pub dry_run: bool,
    pub expired_environments: u64,
    pub checkpoints: u64,
    pub model_versions: u64,
    pub function_versions: u64,
    pub physical_relations: u64,
    pub intervals: u64,
    pub batches: u64,
    /// Meltano runs removed.
    #[serde(default)]
    pub runs: u64,
    /// Meltano runs marked failed because they went stale.
    #[serde(default)]
    pub stale_runs_failed: u64,
    pub duration_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupStatus {
    pub id: String,
    pub created_at: String,
    pub schema_version: i32,
    /// Its tag: why it was made (`pre-upgrade`, `pre-import`, `manual`, …).
    pub reason: String,
    pub rows: i64,
    /// What its tables take on disk, in bytes.
    #[serde(default)]
    pub bytes: i64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupSummary {
    /// Backups of the store now.
    pub count: u32,
    /// What they take on disk, in bytes.
    pub bytes: i64,
    /// When `spec.backups` last dropped backups (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_pruned_at: Option<String>,
    /// The ids of the backups dropped then (the first 100).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100))]
    pub pruned: Vec<String>,
    /// The bytes they took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pruned_bytes: Option<i64>,
}
