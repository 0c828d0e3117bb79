//! The reading half of every format: the file's header, and the bounded batches of rows a
//! format's section reader emits as the document streams past.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::stream::{Message, Row};
use crate::engine::json;
use crate::engine::jsonscan::{Cursor, ScanError};
use crate::engine::manifest::Manifest;

/// Rows are sent to the importing task in batches of at most this many rows or bytes.
const BATCH: usize = 512;

const BATCH_BYTES: usize = 256 * 1024;

/// What a format's section reader hands rows to.
pub(crate) struct Emitter {
    tx: mpsc::Sender<Message>,
    batch: Vec<Row>,
    batch_bytes: usize,
    counts: BTreeMap<String, u64>,
    pub environments: u64,
    /// The sha256 of each table's (or section's) value as read, for the manifest.
    pub digests: BTreeMap<String, String>,
    /// The file's manifest, once every digest matched it.
    pub manifest: Option<Manifest>,
}

impl Emitter {
    pub(crate) fn new(tx: mpsc::Sender<Message>) -> Self {
        Emitter {
            tx,
            batch: Vec::with_capacity(BATCH),
            batch_bytes: 0,
            counts: BTreeMap::new(),
            environments: 0,
            digests: BTreeMap::new(),
            manifest: None,
        }
    }

    /// Sends the last batch, then `End` with what was counted: the document was read whole.
    pub(crate) fn finish(mut self) -> Result<(), String> {
        self.flush()?;
        let end = Message::End {
            counts: std::mem::take(&mut self.counts),
            environments: self.environments,
            manifest: self.manifest.take(),
        };
        self.send(end)
    }

    pub(crate) fn send(&mut self, message: Message) -> Result<(), String> {
        self.tx
            .blocking_send(message)
            .map_err(|_| "the import was stopped".to_string())
    }

    /// Stages a row given as JSON text, compacting pretty-printed values (staging is
    /// line-based). PostgreSQL validates it as it stages it.
    pub fn row(&mut self, section: &Arc<str>, key: &str, raw: Vec<u8>) -> Result<(), String> {
        let text = String::from_utf8(raw).map_err(|_| format!("a {section} row is not UTF-8"))?;
        let doc = if text.contains(['\n', '\r']) {
            json::minify(&text)
        } else {
            text
        };
        self.row_text(section, key, doc)
    }

    /// Stages a row that is already compact JSON.
    pub fn row_text(&mut self, section: &Arc<str>, key: &str, doc: String) -> Result<(), String> {
        self.push(Row::Json {
            section: section.clone(),
            key: key.to_owned(),
            doc,
        })
    }

    /// Stages a row of PostgreSQL text values.
    pub fn fields(
        &mut self,
        section: &Arc<str>,
        fields: Vec<Option<String>>,
    ) -> Result<(), String> {
        self.push(Row::Fields {
            section: section.clone(),
            fields,
        })
    }

    fn push(&mut self, row: Row) -> Result<(), String> {
        *self.counts.entry(row.section().to_string()).or_default() += 1;
        self.batch_bytes += row.bytes();
        self.batch.push(row);
        if self.batch.len() >= BATCH || self.batch_bytes >= BATCH_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    /// Announces a table (exact format); rows staged before it are sent first, so order holds.
    pub fn table(&mut self, name: String, columns: Vec<(String, String)>) -> Result<(), String> {
        self.flush()?;
        self.counts.entry(name.clone()).or_default();
        self.send(Message::Table { name, columns })
    }

    /// A second emitter into the same import, for a helper thread; give it back with
    /// [`Emitter::absorb`] before the document ends.
    pub fn fork(&self) -> Emitter {
        Emitter {
            tx: self.tx.clone(),
            batch: Vec::with_capacity(BATCH),
            batch_bytes: 0,
            counts: BTreeMap::new(),
            environments: 0,
            digests: BTreeMap::new(),
            manifest: None,
        }
    }

    /// Takes back a forked emitter: its last rows are sent and its counts added.
    pub fn absorb(&mut self, mut other: Emitter) -> Result<(), String> {
        other.flush()?;
        for (section, count) in other.counts {
            *self.counts.entry(section).or_default() += count;
        }
        self.environments += other.environments;
        Ok(())
    }

    fn flush(&mut self) -> Result<(), String> {
        if !self.batch.is_empty() {
            let batch = std::mem::take(&mut self.batch);
            self.batch_bytes = 0;
            self.send(Message::Rows(batch))?;
        }
        Ok(())
    }
}

/// Reads the sections after a format's header, each from the document cursor.
pub(crate) trait SectionReader {
    /// Reads the value of section `key` (the cursor is at it).
    fn section(
        &mut self,
        cursor: &mut Cursor<&mut dyn std::io::Read>,
        key: &str,
        emitter: &mut Emitter,
    ) -> Result<(), ScanError>;

    /// After the last section: what must have been there.
    fn finish(&mut self, emitter: &mut Emitter) -> Result<(), ScanError>;

    /// Whether the reader digests each table itself (an exact export's tables are one section),
    /// instead of the document digesting each section.
    fn digests_its_tables(&self) -> bool {
        false
    }
}
