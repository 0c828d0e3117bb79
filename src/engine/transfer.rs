//! What an export or import is asked to do and what it reports: plain data shared by the
//! operations, the formats that carry them out, the CLI and the reconcilers.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::backup::BackupInfo;
use super::encryption::{Identities, Recipients};
use super::framework::{ExportFormat, Framework};
use super::manifest::Manifest;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    #[default]
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// The conventional file name ending of an export with this compression.
    pub fn file_extension(self) -> &'static str {
        match self {
            Compression::None => "json",
            Compression::Gzip => "json.gz",
            Compression::Zstd => "json.zst",
        }
    }
}

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Self::None),
            "gzip" | "gz" => Ok(Self::Gzip),
            "zstd" | "zst" => Ok(Self::Zstd),
            other => Err(format!(
                "unknown compression \"{other}\" (use none, gzip or zstd)"
            )),
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct ExportOptions {
    /// Only these environments (with every version they reference); `None` exports everything.
    pub environments: Option<Vec<String>>,
    pub compression: Compression,
    pub format: ExportFormat,
    /// Encrypt the file to these age public keys, after compressing it (none: not encrypted).
    pub recipients: Recipients,
}

#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ExportReport {
    pub framework: Framework,
    pub format: ExportFormat,
    pub schema_version: i32,
    /// Further version facts (SQLMesh's version, Meltano's Alembic revision).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub versions: BTreeMap<String, String>,
    pub environments: u64,
    /// Rows per table.
    pub rows: BTreeMap<String, u64>,
    /// Bytes written, after compression (and encryption).
    pub bytes: u64,
    /// How many age recipients the file is encrypted to (0: not encrypted).
    #[serde(skip_serializing_if = "is_zero")]
    pub encrypted_to: u64,
    /// Hex sha256 of the bytes written (encrypted ones, when encrypted); none for a folder of
    /// files (`meltano-backend`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    pub compression: Compression,
    #[serde(skip)]
    pub duration: Duration,
}

impl ExportReport {
    pub fn total_rows(&self) -> u64 {
        self.rows.values().sum()
    }

    /// One line for people: what went where.
    pub fn summary(&self, to: &str) -> String {
        let groups = self.framework.profile().entities.noun;
        format!(
            "exported {} ({}, {}) to {to}: {}{}{}",
            super::words::counted(self.total_rows(), "rows"),
            super::words::counted(self.environments, groups),
            self.framework
                .describe_version(self.schema_version, &self.versions),
            super::words::counted(self.bytes, "bytes"),
            if self.encrypted_to > 0 {
                format!(
                    " encrypted to {}",
                    super::words::counted(self.encrypted_to, "recipients")
                )
            } else {
                String::new()
            },
            self.sha256
                .as_ref()
                .map(|sha| format!(", sha256 {sha}"))
                .unwrap_or_default(),
        )
    }
}

/// How an import treats what the store holds. No default: replacing is never implied (the CLI
/// and StateMigrations merge unless told to replace, as `sqlmesh state import` and
/// `meltano state import` do).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ImportMode {
    /// The store ends up equal to the file.
    Replace,
    /// What the file holds replaces its namesakes in the store; everything else stays.
    Merge,
}

#[derive(Clone, Debug)]
pub struct ImportOptions {
    pub mode: ImportMode,
    /// Refuse the file unless its sha256 (of the bytes as stored) is this hex digest.
    pub expected_sha256: Option<String>,
    /// The age identities that decrypt an encrypted file (tried in order).
    pub identities: Identities,
}

impl ImportOptions {
    pub fn replace() -> Self {
        Self {
            mode: ImportMode::Replace,
            expected_sha256: None,
            identities: Identities::default(),
        }
    }

    pub fn merge() -> Self {
        Self {
            mode: ImportMode::Merge,
            expected_sha256: None,
            identities: Identities::default(),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct ImportReport {
    /// The framework of the store imported into.
    pub framework: Framework,
    pub mode: ImportMode,
    /// The file's format, detected from its content.
    pub format: ExportFormat,
    /// The schema the file was exported from, when the format records it.
    pub source_store: String,
    pub schema_version: i32,
    pub environments: u64,
    /// Rows read from the file, per section or table.
    pub rows: BTreeMap<String, u64>,
    pub bytes: u64,
    pub sha256: String,
    pub compression: Compression,
    /// The manifest the file carries, which every table matched; none in files written before
    /// exports carried one, and in Meltano's format.
    #[serde(rename = "checkedAgainstManifest", serialize_with = "is_some")]
    pub manifest: Option<Manifest>,
    /// The store as it was before the import.
    pub backup: Option<BackupInfo>,
    /// A replace: what the store held that the file does not (gone now, kept in the backup).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub removed: Option<Removed>,
    #[serde(skip)]
    pub duration: Duration,
}

/// What a replace removed: the store's environments (or Meltano state IDs) that the file does
/// not have.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Removed {
    /// "environments" or "state IDs".
    pub what: String,
    pub count: u64,
    /// The first of them by name (at most [`REMOVED_NAMES`]).
    pub names: Vec<String>,
}

impl ImportReport {
    /// What the import did to what the store held, in one line.
    pub fn effect(&self) -> String {
        match &self.removed {
            None => "merged: what the file holds replaced its namesakes, the rest stayed".into(),
            Some(removed) if removed.count == 0 => format!(
                "replaced the store's state: every one of its {} is in the file",
                removed.what
            ),
            Some(removed) => format!(
                "replaced the store's state: removed {} the file does not have ({}{})",
                super::words::counted(removed.count, &removed.what),
                removed.names.join(", "),
                if removed.count > removed.names.len() as u64 {
                    ", …"
                } else {
                    ""
                }
            ),
        }
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// How many removed names a report lists.
pub const REMOVED_NAMES: i64 = 10;

/// Serialises an option as whether it is there.
fn is_some<T, S: serde::Serializer>(value: &Option<T>, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_bool(value.is_some())
}
