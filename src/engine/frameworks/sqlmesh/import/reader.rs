//! Reading the sections of `sqlmesh state export`'s document after its header into staged rows:
//! the document is cut into elements on this thread and turned into rows on a helper.

use std::collections::HashSet;

use serde_json::value::RawValue;

use super::environment_rows::{Fields, environment_rows};
use super::layout::{LIST_COLUMNS, Names};
use super::snapshot_rows::snapshot_rows;
use crate::engine::format::reader::{Emitter, SectionReader};
use crate::engine::frameworks::sqlmesh::OrderedObject;
use crate::engine::json::{compact_utf8_for_parsing, push_python_dumps};
use crate::engine::jsonscan::{Cursor, ScanError};

type Doc<'a, 'b> = &'a mut Cursor<&'b mut dyn std::io::Read>;

/// Reads `snapshots` and `environments` (the sections after the header), turning each into the
/// rows SQLMesh would write.
pub(crate) struct Sections {
    names: Names,
    seen: HashSet<String>,
}

impl Sections {
    pub(crate) fn new() -> Self {
        Self {
            names: Names::new(),
            seen: HashSet::new(),
        }
    }
}

impl SectionReader for Sections {
    fn section(&mut self, cursor: Doc, key: &str, emitter: &mut Emitter) -> Result<(), ScanError> {
        if !self.seen.insert(key.to_owned()) {
            return Err(ScanError(format!("section \"{key}\" appears twice")));
        }
        match key {
            "snapshots" => read_snapshots(cursor, &self.names, emitter),
            "environments" => cursor.object(|cursor, key| {
                emitter.environments += 1;
                let index = emitter.environments.to_string();
                read_environment(cursor, &key, &index, &self.names, emitter)
                    .map_err(|e| ScanError(format!("environment \"{key}\": {e}")))
            }),
            other => Err(ScanError(format!(
                "unknown section \"{other}\" in a SQLMesh export"
            ))),
        }
    }

    fn finish(&mut self, _emitter: &mut Emitter) -> Result<(), ScanError> {
        for required in ["snapshots", "environments"] {
            if !self.seen.contains(required) {
                return Err(ScanError(format!("section \"{required}\" is missing")));
            }
        }
        Ok(())
    }
}

/// The snapshots, each turned into its rows on a helper thread.
fn read_snapshots(cursor: Doc, names: &Names, emitter: &mut Emitter) -> Result<(), ScanError> {
    array_on_helper(
        cursor,
        emitter,
        0usize,
        |position, raw, emitter| {
            *position += 1;
            // One pass spells the snapshot as SQLMesh stores it (compact, non-ASCII as UTF-8);
            // the parses read that instead of the file's indentation.
            let invalid = || format!("snapshot #{position}: not valid JSON");
            let text = String::from_utf8(raw).map_err(|_| invalid())?;
            let compact = compact_utf8_for_parsing(&text).ok_or_else(invalid)?;
            let OrderedObject(fields) =
                serde_json::from_str(&compact).map_err(|e| format!("snapshot #{position}: {e}"))?;
            snapshot_rows(&fields, names, emitter).map_err(|e| format!("snapshot #{position}: {e}"))
        },
        |_, _| Ok(()),
    )
}

/// Elements go to the helper of [`array_on_helper`] in batches of about this many bytes: a
/// hand-off per element cost more than a small element takes to turn into text.
const HANDOFF_BYTES: usize = 64 * 1024;

/// Runs through the array at the cursor: this thread cuts it into elements, a helper thread
/// hands each to `each` with `state`, then calls `done` (parsing and respelling cost more than
/// cutting, so the two threads share the work). The helper's rows go out in order.
fn array_on_helper<S: Send>(
    cursor: Doc,
    emitter: &mut Emitter,
    mut state: S,
    each: impl Fn(&mut S, Vec<u8>, &mut Emitter) -> Result<(), String> + Send,
    done: impl FnOnce(S, &mut Emitter) -> Result<(), String> + Send,
) -> Result<(), ScanError> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Vec<u8>>>(16);
    let mut helper_emitter = emitter.fork();
    let stopped = || ScanError("the element reader stopped".into());
    let (read, helped) = std::thread::scope(|scope| {
        let helper = scope.spawn(move || -> Result<Emitter, String> {
            for raw in rx.into_iter().flatten() {
                each(&mut state, raw, &mut helper_emitter)?;
            }
            done(state, &mut helper_emitter)?;
            Ok(helper_emitter)
        });
        let mut batch = Vec::new();
        let mut bytes = 0;
        let read = cursor.array(|cursor| {
            let raw = cursor.raw()?;
            bytes += raw.len();
            batch.push(raw);
            if bytes < HANDOFF_BYTES {
                return Ok(());
            }
            bytes = 0;
            // A closed channel means the helper failed: its error is the one to report.
            tx.send(std::mem::take(&mut batch)).map_err(|_| stopped())
        });
        let read = read.and_then(|()| tx.send(batch).map_err(|_| stopped()));
        drop(tx);
        (read, helper.join())
    });
    let helper_emitter = helped.map_err(|_| stopped())?.map_err(ScanError)?;
    read?;
    emitter.absorb(helper_emitter).map_err(ScanError)
}

/// List elements are staged in pieces of about this many bytes: small enough to stay in their
/// staged row (no TOAST), large enough that a list is few rows.
const LIST_PIECE_BYTES: usize = 7 * 1024;

/// One environment of the file: `{"environment": {…}, "statements": […]}`.
fn read_environment(
    cursor: Doc,
    key: &str,
    index: &str,
    names: &Names,
    emitter: &mut Emitter,
) -> Result<(), ScanError> {
    let mut fields = None;
    let mut statements: Option<Vec<u8>> = None;
    cursor.object(|cursor, part| match part.as_str() {
        "environment" => {
            fields = Some(read_environment_fields(cursor, index, names, emitter)?);
            Ok(())
        }
        "statements" => {
            statements = Some(cursor.raw()?);
            Ok(())
        }
        other => Err(ScanError(format!("unknown field \"{other}\""))),
    })?;
    let fields = fields.ok_or_else(|| ScanError("it has no \"environment\"".into()))?;
    let statements = match statements {
        Some(raw) => json_text(raw, "statements")?,
        None => "[]".to_owned(),
    };
    environment_rows(&fields, &statements, index, names, emitter)
        .map_err(ScanError)
        .map_err(|e| ScanError(format!("{e} (environment key {key})")))
}

/// An environment's fields: each list column's elements staged as `[environment index, elements
/// as json.dumps spells and joins them]` in bounded pieces (a `null` list stages nothing), the
/// other fields kept.
fn read_environment_fields(
    cursor: Doc,
    index: &str,
    names: &Names,
    emitter: &mut Emitter,
) -> Result<Fields, ScanError> {
    let mut fields = Fields {
        values: Vec::new(),
        lists: Vec::new(),
    };
    cursor.object(|cursor, key| {
        let Some(column) = LIST_COLUMNS.iter().find(|c| **c == key) else {
            let raw = json_text(cursor.raw()?, &key)?;
            let value = RawValue::from_string(raw)
                .map_err(|e| ScanError(format!("{key} is not valid JSON: {e}")))?;
            fields.values.push((key, value));
            return Ok(());
        };
        if cursor.peek_value()? == b'n' {
            let raw = cursor.raw()?;
            return if raw == b"null" {
                Ok(())
            } else {
                Err(ScanError(format!("{key} is neither a list nor null")))
            };
        }
        // Elements go in pieces of a bounded size, already joined as `json.dumps` joins a list.
        let section = &names.environment_lists[column];
        let flush = |piece: &mut String, emitter: &mut Emitter| {
            if piece.is_empty() {
                return Ok(());
            }
            emitter.fields(
                section,
                vec![Some(index.to_owned()), Some(std::mem::take(piece))],
            )
        };
        array_on_helper(
            cursor,
            emitter,
            String::new(),
            |piece, raw, emitter| {
                let element = String::from_utf8(raw)
                    .map_err(|_| format!("an element of {column} is not UTF-8"))?;
                serde_json::from_str::<&RawValue>(&element)
                    .map_err(|e| format!("an element of {column} is not valid JSON: {e}"))?;
                if !piece.is_empty() {
                    piece.push_str(", ");
                }
                push_python_dumps(&element, piece);
                if piece.len() >= LIST_PIECE_BYTES {
                    flush(piece, emitter)?;
                }
                Ok(())
            },
            |mut piece, emitter| flush(&mut piece, emitter),
        )?;
        fields.lists.push(column);
        Ok(())
    })?;
    Ok(fields)
}

fn json_text(raw: Vec<u8>, what: &str) -> Result<String, ScanError> {
    String::from_utf8(raw).map_err(|_| ScanError(format!("{what} is not UTF-8")))
}
