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

/// Read back from its JSON (a Job's report, `engine::job_report`) as the CLI prints it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExportReport {
    pub framework: Framework,
    pub format: ExportFormat,
    pub schema_version: i32,
    /// Further version facts (SQLMesh's version, Meltano's Alembic revision).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub versions: BTreeMap<String, String>,
    pub environments: u64,
    /// Rows per table.
    pub rows: BTreeMap<String, u64>,
    /// Bytes written, after compression (and encryption).
    pub bytes: u64,
    /// How many age recipients the file is encrypted to (0: not encrypted).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub encrypted_to: u64,
    /// Hex sha256 of the bytes written (encrypted ones, when encrypted); none for a folder of
    /// files (`meltano-backend`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    pub compression: Compression,
    /// Not serialised here (the CLI adds `durationMs`); read back from `durationMs`.
    #[serde(
        skip_serializing,
        default,
        rename = "durationMs",
        deserialize_with = "super::transfer::duration_from_ms"
    )]
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
    /// Restore in part: only these environments, models or state IDs of the file (a merge);
    /// empty, the whole file.
    pub selection: Selection,
}

impl ImportOptions {
    pub fn replace() -> Self {
        Self {
            mode: ImportMode::Replace,
            ..Self::merge()
        }
    }

    pub fn merge() -> Self {
        Self {
            mode: ImportMode::Merge,
            expected_sha256: None,
            identities: Identities::default(),
            selection: Selection::default(),
        }
    }

    /// A merge of only `selection`.
    pub fn restore(selection: Selection) -> Self {
        Self {
            selection,
            ..Self::merge()
        }
    }
}

/// A merge, the default of the CLI and of StateMigrations (never a replace).
impl Default for ImportOptions {
    fn default() -> Self {
        Self::merge()
    }
}

/// What a restore in part takes from its source: environments (each with the snapshots or
/// versions it references), models (their snapshots or versions, with their intervals; no
/// environment changes) or Meltano state IDs (exact, or `*` globs). Empty: everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Selection {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub environments: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub state_ids: Vec<String>,
}

impl Selection {
    pub fn is_empty(&self) -> bool {
        self.environments.is_empty() && self.models.is_empty() && self.state_ids.is_empty()
    }

    /// For people: `environment prod, model "db"."s"."m"`.
    pub fn describe(&self) -> String {
        [
            ("environment", &self.environments),
            ("model", &self.models),
            ("state ID", &self.state_ids),
        ]
        .iter()
        .filter(|(_, names)| !names.is_empty())
        .map(|(what, names)| {
            format!(
                "{what}{} {}",
                if names.len() > 1 { "s" } else { "" },
                names.join(", ")
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
    }

    /// Refuses a selection that cannot be restored: any selection but in a merge (a partial
    /// replace would drop everything else), and names a framework's store does not have.
    pub fn check(&self, framework: Framework, mode: ImportMode) -> Result<(), super::Error> {
        if self.is_empty() {
            return Ok(());
        }
        let refuse = |reason: String| Err(super::Error::InvalidOperation(reason));
        if mode == ImportMode::Replace {
            return refuse(format!(
                "a restore in part ({}) is a merge: it replaces only what it names and leaves                  the rest alone, so it cannot replace the store; pass --merge instead of                  --replace (import.mode: Merge)",
                self.describe()
            ));
        }
        match framework {
            Framework::Meltano if !self.environments.is_empty() || !self.models.is_empty() => {
                refuse(
                    "a Meltano store holds state IDs, not environments or models: choose them                      with --state-id"
                        .into(),
                )
            }
            Framework::Statekeeper | Framework::Sqlmesh if !self.state_ids.is_empty() => {
                refuse(format!(
                    "state IDs are Meltano's; a {} store is restored in part by --environment                      or --model",
                    framework.profile().display_name
                ))
            }
            _ => Ok(()),
        }
    }
}

/// What a restore in part restored.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Restored {
    /// Environments restored, by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub environments: Vec<String>,
    /// Models whose snapshots or versions were restored, by name as the store spells them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
    /// Meltano state IDs restored (globs expanded).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub state_ids: Vec<String>,
    /// Snapshots (SQLMesh) or model versions (statekeeper) written with them.
    pub versions: u64,
    /// Interval rows written with them.
    pub intervals: u64,
}

impl Restored {
    /// One line for people.
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        for (what, names) in [
            ("environments", &self.environments),
            ("models", &self.models),
            ("state IDs", &self.state_ids),
        ] {
            if !names.is_empty() {
                parts.push(format!("{what} {}", names.join(", ")));
            }
        }
        let mut line = format!("restored {}", parts.join("; "));
        if self.versions > 0 || self.intervals > 0 {
            line.push_str(&format!(
                " ({} and {} with them)",
                super::words::counted(self.versions, "versions"),
                super::words::counted(self.intervals, "interval rows")
            ));
        }
        line.push_str("; nothing else changed");
        line
    }
}

/// Read back from its JSON as the CLI prints it; of the manifest, only whether one was checked
/// survives (read back as an empty manifest).
#[derive(Clone, Debug, Serialize, Deserialize)]
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
    #[serde(
        rename = "checkedAgainstManifest",
        serialize_with = "is_some",
        deserialize_with = "checked"
    )]
    pub manifest: Option<Manifest>,
    /// The store as it was before the import.
    pub backup: Option<BackupInfo>,
    /// A replace: what the store held that the file does not (gone now, kept in the backup).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub removed: Option<Removed>,
    /// A restore in part: what it restored (everything else stayed as it was).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restored: Option<Restored>,
    /// Not serialised here (the CLI adds `durationMs`); read back from `durationMs`.
    #[serde(
        skip_serializing,
        default,
        rename = "durationMs",
        deserialize_with = "super::transfer::duration_from_ms"
    )]
    pub duration: Duration,
}

/// What a replace removed: the store's environments (or Meltano state IDs) that the file does
/// not have.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
        if let Some(restored) = &self.restored {
            return restored.summary();
        }
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

/// Reads `checkedAgainstManifest` back: a manifest was checked (its content is not in a report).
fn checked<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Manifest>, D::Error> {
    Ok(bool::deserialize(deserializer)?.then(Manifest::default))
}

/// Reads a report's `durationMs` back as a duration.
pub(crate) fn duration_from_ms<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Duration, D::Error> {
    Ok(Duration::from_millis(u64::deserialize(deserializer)?))
}
