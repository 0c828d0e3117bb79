//! What `state diff` reports: for each framework, what differs between two copies of a store's
//! state (FROM and TO), in lists capped at a limit with exact counts, and the few lines a plan
//! shows of it.

use chrono::{SecondsFormat, TimeZone, Utc};
use futures::TryStreamExt as _;
use serde::Serialize;
use sqlx::{AssertSqlSafe, PgConnection};

use crate::engine::Error;
use crate::engine::framework::Framework;
use crate::engine::identifier::{SchemaName, quote_ident};
use crate::engine::words::counted;

/// How many names a summary line shows before it says "and N more".
const SUMMARY_NAMES: usize = 3;

/// A list capped at the diff's limit: `count` is exact, `items` holds the first `limit` of them
/// and `truncated` says how many more there are.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Capped<T> {
    pub count: u64,
    pub truncated: u64,
    pub items: Vec<T>,
}

impl<T> Default for Capped<T> {
    fn default() -> Self {
        Self {
            count: 0,
            truncated: 0,
            items: Vec::new(),
        }
    }
}

impl<T> Capped<T> {
    /// Counts `item`, and keeps it while fewer than `limit` are kept.
    pub fn push(&mut self, item: T, limit: usize) {
        self.count += 1;
        if self.items.len() < limit {
            self.items.push(item);
        } else {
            self.truncated += 1;
        }
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

/// Something on one side only: what TO has and FROM has not (`added`), and the reverse
/// (`removed`).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OneSided<T> {
    pub added: Capped<T>,
    pub removed: Capped<T>,
}

impl<T> Default for OneSided<T> {
    fn default() -> Self {
        Self {
            added: Capped::default(),
            removed: Capped::default(),
        }
    }
}

impl<T> OneSided<T> {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty()
    }
}

impl OneSided<VersionEntry> {
    /// Rows of `table` (SQLMesh's `_snapshots`, statekeeper's `model_versions`) on one side only,
    /// by `name` and `key_column`, with their `version`. With `merge`, only what `to` adds.
    pub(super) async fn versions_by_key(
        conn: &mut PgConnection,
        from: &SchemaName,
        to: &SchemaName,
        table: &str,
        key_column: &str,
        limit: usize,
        merge: bool,
    ) -> Result<Self, Error> {
        let (table, key) = (quote_ident(table), quote_ident(key_column));
        let sql = format!(
            "SELECT COALESCE(f.name, t.name), COALESCE(f.{key}, t.{key}),
                    COALESCE(f.version, t.version), f.name IS NULL
             FROM {from}.{table} f
             FULL JOIN {to}.{table} t ON f.name = t.name AND f.{key} = t.{key}
             WHERE f.name IS NULL OR t.name IS NULL
             ORDER BY 1, 2",
            from = from.quoted(),
            to = to.quoted(),
        );
        let mut out = Self::default();
        let mut rows =
            sqlx::query_as::<_, (String, String, Option<String>, bool)>(AssertSqlSafe(sql))
                .fetch(&mut *conn);
        while let Some((name, identifier, version, added)) = rows.try_next().await? {
            let entry = VersionEntry {
                name,
                identifier,
                version,
            };
            if added {
                out.added.push(entry, limit);
            } else if !merge {
                out.removed.push(entry, limit);
            }
        }
        Ok(out)
    }
}

/// What happened to an environment (or a Meltano state ID) from FROM to TO.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Change {
    Added,
    Removed,
    Changed,
}

impl Change {
    pub fn as_str(self) -> &'static str {
        match self {
            Change::Added => "added",
            Change::Removed => "removed",
            Change::Changed => "changed",
        }
    }
}

/// An environment that differs, with the models whose version differs in it (for an added or
/// removed environment: every model it has).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvironmentDiff {
    pub name: String,
    /// Which list of [`Environments`] it is in.
    #[serde(skip)]
    pub change: Change,
    pub models: Capped<ModelMove>,
}

/// The environments that differ, by what happened to them: each list capped, each count exact.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Environments {
    pub changed: Capped<EnvironmentDiff>,
    pub added: Capped<EnvironmentDiff>,
    pub removed: Capped<EnvironmentDiff>,
}

impl Environments {
    /// Counts `environment` in its list, and keeps it while that list has room.
    pub fn push(&mut self, environment: EnvironmentDiff, limit: usize) {
        match environment.change {
            Change::Changed => self.changed.push(environment, limit),
            Change::Added => self.added.push(environment, limit),
            Change::Removed => self.removed.push(environment, limit),
        }
    }

    /// The lists, changed first.
    pub fn lists(&self) -> [(Change, &Capped<EnvironmentDiff>); 3] {
        [
            (Change::Changed, &self.changed),
            (Change::Added, &self.added),
            (Change::Removed, &self.removed),
        ]
    }

    pub fn count(&self) -> u64 {
        self.changed.count + self.added.count + self.removed.count
    }

    pub fn is_empty(&self) -> bool {
        self.count() == 0
    }
}

/// A model of an environment: the version it had in FROM and has in TO (none: not there).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelMove {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<VersionRef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<VersionRef>,
}

/// A version as an environment refers to it: SQLMesh's snapshot identifier (statekeeper's model
/// version fingerprint) and the version that names its physical table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VersionRef {
    pub identifier: String,
    pub version: String,
}

impl ModelMove {
    /// `shop.orders: version 12 → version 34`.
    pub fn describe(&self) -> String {
        format!(
            "{}: {} → {}",
            self.name,
            self.side(&self.from),
            self.side(&self.to)
        )
    }

    /// `version 12`; with the identifier (its first 12 characters) when both sides have one
    /// version, and only the identifier tells them apart.
    pub fn side(&self, side: &Option<VersionRef>) -> String {
        let Some(v) = side else {
            return "(none)".to_owned();
        };
        let same = matches!((&self.from, &self.to), (Some(a), Some(b)) if a.version == b.version);
        if same {
            let short: String = v.identifier.chars().take(12).collect();
            format!("version {} ({short})", v.version)
        } else {
            format!("version {}", v.version)
        }
    }
}

/// A SQLMesh snapshot or a statekeeper model version, found on one side only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VersionEntry {
    pub name: String,
    /// SQLMesh's snapshot identifier, statekeeper's fingerprint.
    pub identifier: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// A SQLMesh model version's intervals that differ: the ranges TO has that FROM has not
/// (`added`), and the reverse (`removed`), each `[start, end)` in UTC.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IntervalChange {
    pub model: String,
    pub version: String,
    /// Dev intervals (a forward-only change's, in a development environment).
    pub dev: bool,
    pub added: Capped<Range>,
    pub removed: Capped<Range>,
}

/// `[start, end)`, as ISO 8601 timestamps in UTC.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Range {
    pub start: String,
    pub end: String,
}

impl Range {
    /// From epoch milliseconds.
    pub fn from_ms(start: i64, end: i64) -> Self {
        let iso = |ms: i64| {
            Utc.timestamp_millis_opt(ms).single().map_or_else(
                || ms.to_string(),
                |t| t.to_rfc3339_opts(SecondsFormat::Secs, true),
            )
        };
        Self {
            start: iso(start),
            end: iso(end),
        }
    }
}

/// A checkpoint of statekeeper's schema, found on one side only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointEntry {
    pub environment: String,
    pub created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plan_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// A Meltano state ID whose state differs on both sides.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StateChange {
    pub state_id: String,
    /// Streams whose bookmark (`completed_state.singer_state.bookmarks.STREAM`) differs.
    pub bookmarks: Capped<BookmarkChange>,
    /// Other parts of the state that differ: `partial_state`, `completed_state.KEY`, …
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub other: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BookmarkChange {
    pub stream: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SqlmeshDiff {
    pub environments: Environments,
    /// Snapshots (by name and identifier) on one side only.
    pub snapshots: OneSided<VersionEntry>,
    /// Model versions whose intervals differ.
    pub intervals: Capped<IntervalChange>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatekeeperDiff {
    pub environments: Environments,
    /// Model versions (by name and fingerprint) on one side only.
    pub versions: OneSided<VersionEntry>,
    /// Checkpoints (by environment, time, plan and description) on one side only.
    pub checkpoints: OneSided<CheckpointEntry>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MeltanoDiff {
    pub state_ids: OneSided<String>,
    pub changed: Capped<StateChange>,
}

/// What differs from FROM to TO.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DiffReport {
    pub framework: Framework,
    /// The sides, for people: `backup 20261207…`, `the store (schema "sqlmesh")`, a file's URL.
    pub from: String,
    pub to: String,
    /// True when nothing differs.
    pub identical: bool,
    /// How many items each list keeps (counts are exact whatever it is).
    pub limit: usize,
    /// Compared as a merge of TO into FROM: only what the merge would change.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub merge: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sqlmesh: Option<SqlmeshDiff>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub statekeeper: Option<StatekeeperDiff>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub meltano: Option<MeltanoDiff>,
    /// Milliseconds the diff took, a file's restore into scratch included.
    pub duration_ms: u64,
}

impl DiffReport {
    /// Whether any section holds a difference.
    pub fn has_differences(&self) -> bool {
        let sqlmesh = self.sqlmesh.as_ref().is_some_and(|s| {
            !s.environments.is_empty() || !s.snapshots.is_empty() || !s.intervals.is_empty()
        });
        let statekeeper = self.statekeeper.as_ref().is_some_and(|s| {
            !s.environments.is_empty() || !s.versions.is_empty() || !s.checkpoints.is_empty()
        });
        let meltano = self
            .meltano
            .as_ref()
            .is_some_and(|m| !m.state_ids.is_empty() || !m.changed.is_empty());
        sqlmesh || statekeeper || meltano
    }

    /// A few short lines for people and plans: each kind of difference with its count and the
    /// first names. "no differences" when there are none.
    pub fn summary_lines(&self) -> Vec<String> {
        let mut lines = Vec::new();
        if let Some(s) = &self.sqlmesh {
            environment_lines(&s.environments, &mut lines);
            one_sided_line("snapshots", &s.snapshots, |v| v.name.clone(), &mut lines);
            interval_line(&s.intervals, &mut lines);
        }
        if let Some(s) = &self.statekeeper {
            environment_lines(&s.environments, &mut lines);
            one_sided_line(
                "model versions",
                &s.versions,
                |v| v.name.clone(),
                &mut lines,
            );
            one_sided_line(
                "checkpoints",
                &s.checkpoints,
                |c| format!("{} {}", c.environment, c.created_at),
                &mut lines,
            );
        }
        if let Some(m) = &self.meltano {
            one_sided_line("state IDs", &m.state_ids, String::clone, &mut lines);
            if !m.changed.is_empty() {
                let names = names(&m.changed, |c| {
                    let streams: Vec<&str> = c
                        .bookmarks
                        .items
                        .iter()
                        .map(|b| b.stream.as_str())
                        .collect();
                    if streams.is_empty() {
                        format!("{} ({})", c.state_id, c.other.join(", "))
                    } else {
                        format!("{} (bookmark {})", c.state_id, streams.join(", "))
                    }
                });
                lines.push(format!(
                    "{} changed: {names}",
                    counted(m.changed.count, "state IDs")
                ));
            }
        }
        if lines.is_empty() {
            lines.push("no differences".into());
        }
        lines
    }
}

/// One line per kind of environment change, with exact counts: `1 environment changed: prod
/// (shop.orders: version 1 → version 2)`, `2 environments removed: a, b`.
fn environment_lines(environments: &Environments, lines: &mut Vec<String>) {
    for (change, list) in environments.lists() {
        if list.is_empty() {
            continue;
        }
        let text = names(list, |e| match (change, e.models.count) {
            (_, 0) => e.name.clone(),
            (Change::Changed, 1) => {
                let moves: Vec<String> = e.models.items.iter().map(ModelMove::describe).collect();
                format!("{} ({})", e.name, moves.join(""))
            }
            (_, n) => format!("{} ({})", e.name, counted(n, "models")),
        });
        lines.push(format!(
            "{} {}: {text}",
            counted(list.count, "environments"),
            change.as_str()
        ));
    }
}

/// `snapshots: 2 added (a, b), 1 removed (c)`.
fn one_sided_line<T>(
    what: &str,
    sides: &OneSided<T>,
    name: impl Fn(&T) -> String,
    lines: &mut Vec<String>,
) {
    if sides.is_empty() {
        return;
    }
    let mut parts = Vec::new();
    for (capped, word) in [(&sides.added, "added"), (&sides.removed, "removed")] {
        if capped.count > 0 {
            parts.push(format!(
                "{} {word} ({})",
                capped.count,
                names(capped, &name)
            ));
        }
    }
    lines.push(format!("{what}: {}", parts.join(", ")));
}

fn interval_line(intervals: &Capped<IntervalChange>, lines: &mut Vec<String>) {
    if intervals.is_empty() {
        return;
    }
    let gaining = intervals
        .items
        .iter()
        .filter(|c| !c.added.is_empty())
        .count();
    let losing = intervals
        .items
        .iter()
        .filter(|c| !c.removed.is_empty())
        .count();
    let names = names(intervals, |c| {
        format!("{}{}", c.model, if c.dev { " (dev)" } else { "" })
    });
    let mut line = format!(
        "intervals differ for {}: {names}",
        counted(intervals.count, "model versions")
    );
    if intervals.truncated == 0 {
        let mut parts = Vec::new();
        if gaining > 0 {
            parts.push(format!("{gaining} with new intervals"));
        }
        if losing > 0 {
            parts.push(format!("{losing} with intervals gone"));
        }
        line.push_str(&format!(" ({})", parts.join(", ")));
    }
    lines.push(line);
}

/// The first names of a capped list, with "and N more".
fn names<T>(capped: &Capped<T>, name: impl Fn(&T) -> String) -> String {
    let mut shown: Vec<String> = capped.items.iter().take(SUMMARY_NAMES).map(name).collect();
    let more = capped.count.saturating_sub(shown.len() as u64);
    if more > 0 {
        shown.push(format!("and {more} more"));
    }
    shown.join(", ")
}
