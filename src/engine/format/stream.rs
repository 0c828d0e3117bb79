//! What flows from a format's reader to staging: the file's header, then rows in bounded batches,
//! each row already encoded as binary COPY expects it.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::engine::Error;
use crate::engine::framework::ExportFormat;
use crate::engine::manifest::Manifest;

/// The opening of every document: its format, `metadata` and `versions`.
pub(crate) struct Header {
    pub format: ExportFormat,
    pub metadata: serde_json::Value,
    pub versions: serde_json::Value,
}

impl Header {
    pub fn metadata_str(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).and_then(|v| v.as_str())
    }

    pub fn versions_str(&self, key: &str) -> Option<&str> {
        self.versions.get(key).and_then(|v| v.as_str())
    }

    /// `metadata.file_version` and `metadata.importable`, which every format has.
    pub fn check_importable(&self, supported_file_version: u64) -> Result<(), Error> {
        match self.metadata.get("file_version").and_then(|v| v.as_u64()) {
            Some(v) if v == supported_file_version => {}
            Some(v) => {
                return Err(Error::InvalidExport(format!(
                    "file version {v} is not supported (this statekeeper reads version {supported_file_version})"
                )));
            }
            None => {
                return Err(Error::InvalidExport(
                    "metadata.file_version is missing or not a number".into(),
                ));
            }
        }
        if self.metadata.get("importable").and_then(|v| v.as_bool()) != Some(true) {
            return Err(Error::InvalidExport(
                "the file is marked as not importable (for example an export of local, \
                 unversioned snapshots)"
                    .into(),
            ));
        }
        Ok(())
    }

    /// `versions.schema_version` as a number.
    pub fn schema_version(&self) -> Result<i32, Error> {
        self.versions
            .get("schema_version")
            .and_then(|v| v.as_i64())
            .and_then(|v| i32::try_from(v).ok())
            .ok_or_else(|| {
                Error::InvalidExport("versions.schema_version is missing or not a number".into())
            })
    }
}

pub(crate) enum Message {
    Header(Header),
    /// A table of an exact export begins, with its columns (name, type).
    Table {
        name: String,
        columns: Vec<(String, String)>,
    },
    Rows(Vec<Row>),
    /// Sent only after the whole document parsed and every byte was read: the one signal that
    /// allows the import to touch the store. A channel that closes without it means failure.
    End {
        counts: BTreeMap<String, u64>,
        environments: u64,
        /// The file's manifest, which every table matched; none in files without one.
        manifest: Option<Manifest>,
    },
}

/// After the signature: no flags, no header extension.
pub(crate) const BINARY_FLAGS_AND_EXTENSION: [u8; 8] = [0; 8];

/// A field count of -1.
pub(crate) const BINARY_TRAILER: &[u8] = &[0xff, 0xff];

/// The binary form of `jsonb` is a version byte before its text.
pub(crate) const JSONB_VERSION: u8 = 1;

/// One staged row, under its section (or target table): a JSON document with a key (the
/// environment, JSON-encoded, or empty), or a list of PostgreSQL text values.
pub(crate) enum Row {
    Json {
        section: Arc<str>,
        key: String,
        doc: String,
    },
    Fields {
        section: Arc<str>,
        fields: Vec<Option<String>>,
    },
}

impl Row {
    pub(crate) fn section(&self) -> &Arc<str> {
        match self {
            Row::Json { section, .. } | Row::Fields { section, .. } => section,
        }
    }

    pub(crate) fn bytes(&self) -> usize {
        match self {
            Row::Json { doc, key, .. } => doc.len() + key.len(),
            Row::Fields { fields, .. } => fields.iter().flatten().map(String::len).sum(),
        }
    }

    /// The row as staging COPY input: `section, environment, doc, f1 … f{width}`, each text
    /// value its own field (no array literal for the server to parse, nor to take apart again
    /// for every value read), NULL for what the row has not.
    pub(crate) fn encode(&self, width: usize, out: &mut Vec<u8>) -> Result<(), Error> {
        push_field_count(3 + width, out)?;
        push_field(Some(self.section().as_bytes()), out)?;
        let used = match self {
            Row::Json { key, doc, .. } => {
                push_field((!key.is_empty()).then_some(key.as_bytes()), out)?;
                push_length(doc.len() + 1, out)?;
                out.push(JSONB_VERSION);
                out.extend_from_slice(doc.as_bytes());
                0
            }
            Row::Fields { fields, section } => {
                if fields.len() > width {
                    return Err(Error::InvalidExport(format!(
                        "a row of {section} has {} values, more than the {width} columns of any \
                         table it can go to",
                        fields.len()
                    )));
                }
                push_field(None, out)?;
                push_field(None, out)?;
                for field in fields {
                    push_field(field.as_deref().map(str::as_bytes), out)?;
                }
                fields.len()
            }
        };
        for _ in used..width {
            push_field(None, out)?;
        }
        Ok(())
    }

    /// The row's values as COPY input of text columns; a JSON row is its key and document.
    pub(crate) fn encode_fields(&self, out: &mut Vec<u8>) -> Result<(), Error> {
        match self {
            Row::Json { key, doc, .. } => {
                push_field_count(2, out)?;
                push_field(Some(key.as_bytes()), out)?;
                push_field(Some(doc.as_bytes()), out)
            }
            Row::Fields { fields, .. } => {
                push_field_count(fields.len(), out)?;
                for field in fields {
                    push_field(field.as_deref().map(str::as_bytes), out)?;
                }
                Ok(())
            }
        }
    }
}

fn push_field_count(count: usize, out: &mut Vec<u8>) -> Result<(), Error> {
    let count = i16::try_from(count).map_err(|_| {
        Error::InvalidExport(format!("a row has {count} values, too many to stage"))
    })?;
    out.extend_from_slice(&count.to_be_bytes());
    Ok(())
}

/// One value of a binary COPY row: its length and bytes, or -1 for NULL.
fn push_field(value: Option<&[u8]>, out: &mut Vec<u8>) -> Result<(), Error> {
    match value {
        Some(bytes) => {
            push_length(bytes.len(), out)?;
            out.extend_from_slice(bytes);
        }
        None => out.extend_from_slice(&(-1i32).to_be_bytes()),
    }
    Ok(())
}

fn push_length(length: usize, out: &mut Vec<u8>) -> Result<(), Error> {
    let length = i32::try_from(length).map_err(|_| {
        Error::InvalidExport(format!(
            "a value of {length} bytes is larger than PostgreSQL takes"
        ))
    })?;
    out.extend_from_slice(&length.to_be_bytes());
    Ok(())
}
