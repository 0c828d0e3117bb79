use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::KeysSecretRef;

/// A backup of a StateStore. Without `schedule` it is a one-shot export: it runs once and its
/// status keeps the result for good. With `schedule` it is a schedule, like a CronJob: each due
/// run creates a one-shot child StateExport named `<name>-<UTC yyyymmddhhmmss>`.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "statekeeper.dev",
    version = "v1alpha1",
    kind = "StateExport",
    namespaced,
    status = "StateExportStatus",
    shortname = "skx",
    category = "statekeeper",
    validation = Rule::new("has(oldSelf.spec.schedule) || self.spec == oldSelf.spec").message("the spec of a one-shot export is immutable: create a new StateExport"),
    validation = Rule::new("has(self.spec.schedule) == has(oldSelf.spec.schedule)").message("a StateExport cannot switch between one-shot and scheduled: create a new one"),
    validation = Rule::new("!has(self.spec.schedule) || size(self.metadata.name) <= 63").message("a scheduled StateExport's name is at most 63 characters (it labels its children)"),
    validation = Rule::new("!has(self.spec.environments) || size(self.spec.environments) == 0 || (has(self.spec.format) && self.spec.format != 'exact')").message("environments select part of a store: set format: statekeeper (or sqlmesh for a SQLMesh store); an exact export always holds every table"),
    validation = Rule::new("!has(self.spec.format) || self.spec.format != 'meltano-backend' || (!has(self.spec.schedule) && has(self.spec.compression) && self.spec.compression == 'none')").message("format meltano-backend writes the folder a Meltano state backend reads: one-shot only (no schedule), with compression: none"),
    validation = Rule::new("!has(self.spec.encryption) || !has(self.spec.format) || self.spec.format != 'meltano-backend'").message("format meltano-backend writes the plain files Meltano itself reads: it cannot be encrypted (export the meltano format to encrypt Meltano's state)"),
    validation = Rule::new("!has(self.spec.encryption) || has(self.spec.encryption.recipients) || has(self.spec.encryption.recipientsSecretRef)").message("encryption needs recipients or recipientsSecretRef: the age public keys to encrypt to"),
    validation = Rule::new("!has(self.spec.verify) || !self.spec.verify || !has(self.spec.encryption) || has(self.spec.encryption.identitySecretRef)").message("verifying an encrypted export needs encryption.identitySecretRef: the identity that decrypts it"),
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Store","type":"string","jsonPath":".spec.storeRef.name"}"#,
    printcolumn = r#"{"name":"Schedule","type":"string","jsonPath":".spec.schedule"}"#,
    printcolumn = r#"{"name":"Suspended","type":"boolean","jsonPath":".spec.suspend"}"#,
    printcolumn = r#"{"name":"Last Backup","type":"date","jsonPath":".status.lastSuccessfulTime"}"#,
    printcolumn = r#"{"name":"Next Run","type":"string","jsonPath":".status.nextScheduleTime"}"#,
    printcolumn = r#"{"name":"Bytes","type":"integer","jsonPath":".status.bytes"}"#,
    printcolumn = r#"{"name":"Finished","type":"date","jsonPath":".status.finishedAt","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct StateExportSpec {
    /// The StateStore to export, in the same namespace.
    pub store_ref: StoreRef,
    pub destination: Destination,
    /// Only these environments, with every version they reference; empty exports everything.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000), inner(length(min = 1, max = 253)))]
    pub environments: Vec<String>,
    #[serde(default)]
    pub compression: ExportCompression,
    /// `exact` (the default: every row of every table of the store, history included; restores
    /// bit for bit), `statekeeper` (statekeeper's logical format, mergeable, current state only),
    /// `sqlmesh` (the document `sqlmesh state export` writes; SQLMesh stores only) or `meltano`
    /// (the document `meltano state export` writes; Meltano stores only).
    #[serde(default)]
    pub format: ExportFormat,
    /// Attempts before an export is marked Failed for good (default 3).
    #[serde(default = "default_backoff_limit")]
    #[schemars(range(min = 1, max = 20))]
    pub backoff_limit: u32,
    /// Standard 5-field cron expression (or a nickname such as `@daily`): makes this a schedule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 100))]
    pub schedule: Option<String>,
    /// IANA time zone the schedule is read in (default UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub time_zone: Option<String>,
    /// Pause the schedule; an export in progress finishes. Run-now requests still run.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspend: bool,
    /// A run more than this many seconds late (e.g. after operator downtime) is skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub starting_deadline_seconds: Option<u64>,
    /// Run once as soon as the schedule is created, then follow the schedule.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub immediate: bool,
    /// How many finished exports of a schedule (and their files) to keep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<Retention>,
    /// Verify each export after writing it: read it back from the destination, check it against
    /// the manifest it carries and restore it into a scratch schema beside the store (condition
    /// `Verified`, `status.verifiedAt`; Ready only once verified). A schedule verifies every
    /// export it runs.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub verify: bool,
    /// Encrypt the file with age to these public keys, after compressing it (the file is named
    /// `….json.zst.age`). A schedule's exports inherit it. Not for `meltano-backend`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<Encryption>,
}

/// Client-side encryption at rest with age (docs/encryption.md): the file is encrypted to every
/// recipient given here and in the Secret; any one of their identities decrypts it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Encryption {
    /// age X25519 public keys (`age1…`, as `age-keygen` prints them). Public keys are not
    /// secret; a secret key is refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 32),
        inner(length(min = 5, max = 128), regex(pattern = r"^age1[0-9a-z]+$"))
    )]
    pub recipients: Vec<String>,
    /// A Secret with more recipients: one `age1…` key a line, `#` comments allowed (key
    /// `recipients` unless `key` says otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipients_secret_ref: Option<KeysSecretRef>,
    /// A Secret with an identity that decrypts the file (the `AGE-SECRET-KEY-1…` file
    /// `age-keygen` writes; key `identity` unless `key` says otherwise): read to verify an
    /// export, and by a StateMigration importing it with `fromExport`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_secret_ref: Option<KeysSecretRef>,
}

impl StateExportSpec {
    /// The spec of a one-shot child of this schedule, writing to `url`.
    pub fn child(&self, url: String) -> Self {
        Self {
            destination: Destination {
                url,
                ..self.destination.clone()
            },
            schedule: None,
            time_zone: None,
            suspend: false,
            starting_deadline_seconds: None,
            immediate: false,
            retention: None,
            ..self.clone()
        }
    }

    /// The ending of the file's name: `json[.gz|.zst]`, then `.age` when encrypted.
    pub fn file_extension(&self) -> String {
        let compressed = crate::engine::Compression::from(self.compression).file_extension();
        match self.encryption {
            Some(_) => format!("{compressed}.age"),
            None => compressed.to_owned(),
        }
    }
}

/// Keeps the newest finished exports of a schedule; older ones are deleted with their files.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Retention {
    /// Succeeded exports to keep (default 7).
    #[serde(default = "default_keep_last")]
    #[schemars(range(min = 1, max = 1000))]
    pub keep_last: u32,
    /// Failed exports to keep for inspection (default 3).
    #[serde(default = "default_keep_failed")]
    #[schemars(range(min = 0, max = 1000))]
    pub keep_failed: u32,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            keep_last: default_keep_last(),
            keep_failed: default_keep_failed(),
        }
    }
}

fn default_keep_last() -> u32 {
    7
}

fn default_keep_failed() -> u32 {
    3
}

fn default_backoff_limit() -> u32 {
    3
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct StoreRef {
    /// A StateStore in this object's namespace.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Destination {
    /// The file: `file:///absolute/path` (a volume mounted into the operator),
    /// `s3://bucket/key`, `gs://bucket/key` or `az://container/key`. For an export, a URL ending
    /// in `/` is a folder: the file is named `<StateExport name>.json[.gz|.zst]` inside it, and a
    /// schedule's URL is always a folder.
    #[schemars(
        length(min = 6, max = 2048),
        regex(pattern = r"^(file:///|s3a?://|gs://|az://|azure://|abfss?://)[^@?#]*$")
    )]
    pub url: String,
    /// Object store settings that are not secret, e.g. `endpoint`, `region`,
    /// `virtual_hosted_style_request` (S3) or `azure_storage_account_name`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    pub options: BTreeMap<String, String>,
    /// A Secret whose keys are object store settings too, for credentials such as
    /// `aws_access_key_id` and `aws_secret_access_key`, `google_service_account_key` or
    /// `azure_storage_account_key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretRef>,
}

/// A Secret in the resource's namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SecretRef {
    /// A Secret in this object's namespace.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub name: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ExportFormat {
    #[default]
    Exact,
    Statekeeper,
    Sqlmesh,
    Meltano,
    /// Meltano's file state backends: `<url>/<state_id>/state.json` per state ID, where `url` is
    /// the folder or prefix a Meltano project's `state_backend.uri` names.
    #[serde(rename = "meltano-backend")]
    MeltanoBackend,
}

impl From<ExportFormat> for crate::engine::ExportFormat {
    fn from(value: ExportFormat) -> Self {
        match value {
            ExportFormat::Exact => Self::Exact,
            ExportFormat::Statekeeper => Self::Statekeeper,
            ExportFormat::Sqlmesh => Self::Sqlmesh,
            ExportFormat::Meltano => Self::Meltano,
            ExportFormat::MeltanoBackend => Self::MeltanoBackend,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ExportCompression {
    None,
    Gzip,
    #[default]
    Zstd,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StateExportStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// One-shot: Pending, Succeeded or Failed. Schedule: Scheduled, Active or Suspended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// Where the file was written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    /// Hex sha256 of the file as stored (encrypted, when encrypted); `statekeeper state import
    /// --sha256` checks it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// How many age recipients the file is encrypted to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encrypted_to: Option<u64>,
    /// Rows per table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<BTreeMap<String, u64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environments: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema_version: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// When the export was verified (`spec.verify`): read back, checked and restored in scratch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_at: Option<String>,
    /// Attempts made so far.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub attempts: u32,
    /// The multipart upload of the attempt in progress (S3, GCS, Azure): aborted before a retry,
    /// or when the export is given up or pruned, if the attempt's process died.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staging_upload: Option<String>,
    /// Schedule: when the latest run was due.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_schedule_time: Option<String>,
    /// Schedule: when the next run is due (none while suspended).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_schedule_time: Option<String>,
    /// Schedule: the newest export that succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_successful_export: Option<String>,
    /// Schedule: when that export finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_successful_time: Option<String>,
    /// Schedule: the export running now, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_export: Option<String>,
    /// Schedule: the last `statekeeper.dev/run-now` annotation value acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run_now: Option<String>,
    #[serde(default)]
    #[schemars(schema_with = "super::common::conditions_schema")]
    pub conditions: Vec<Condition>,
}

impl From<ExportCompression> for crate::engine::Compression {
    fn from(value: ExportCompression) -> Self {
        match value {
            ExportCompression::None => Self::None,
            ExportCompression::Gzip => Self::Gzip,
            ExportCompression::Zstd => Self::Zstd,
        }
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}
