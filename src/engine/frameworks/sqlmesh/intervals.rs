//! A snapshot's intervals as SQLMesh computes them from `_intervals` (docs/sqlmesh.md): rows are
//! folded per (name, version) into interval sets keyed by (identifier, dev_version), then each
//! snapshot of that version merges every set — its own and those of snapshots sharing its
//! version — aligned to its interval unit and cut at its `effective_from`.
//!
//! Intervals are `[start, end)` in epoch milliseconds.

use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Timelike, Utc};

pub type Interval = (i64, i64);

/// One `_intervals` row, in the order SQLMesh reads them (created_ts, then removals, then
/// pending restatements).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    pub identifier: Option<String>,
    pub dev_version: Option<String>,
    pub start: i64,
    pub end: i64,
    pub is_dev: bool,
    pub is_removed: bool,
    pub is_pending_restatement: bool,
    pub last_altered_ts: Option<i64>,
}

/// The intervals recorded for one (identifier, dev_version) of a version.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recorded {
    pub identifier: Option<String>,
    pub dev_version: Option<String>,
    pub intervals: Vec<Interval>,
    pub dev_intervals: Vec<Interval>,
    pub pending_restatement_intervals: Vec<Interval>,
    pub last_altered_ts: Option<i64>,
    pub dev_last_altered_ts: Option<i64>,
}

impl Recorded {
    fn is_empty(&self) -> bool {
        self.intervals.is_empty()
            && self.dev_intervals.is_empty()
            && self.pending_restatement_intervals.is_empty()
    }
}

/// Folds the rows of one (name, version), in SQLMesh's reading order, into interval sets in the
/// order SQLMesh first meets them; empty sets are dropped.
pub fn fold(rows: impl IntoIterator<Item = Row>) -> Vec<Recorded> {
    let mut sets: Vec<Recorded> = Vec::new();
    let index =
        |sets: &mut Vec<Recorded>, identifier: &Option<String>, dev: &Option<String>| match sets
            .iter()
            .position(|s| s.identifier == *identifier && s.dev_version == *dev)
        {
            Some(i) => i,
            None => {
                sets.push(Recorded {
                    identifier: identifier.clone(),
                    dev_version: dev.clone(),
                    ..Default::default()
                });
                sets.len() - 1
            }
        };
    for row in rows {
        let own = index(&mut sets, &row.identifier, &row.dev_version);
        // Pending restatements are kept per version, under no identifier and no dev version.
        let pending = index(&mut sets, &None, &None);
        let span = (row.start, row.end);
        if row.is_removed {
            let set = &mut sets[own];
            if row.is_dev {
                set.dev_intervals = remove(&set.dev_intervals, span);
            } else {
                set.intervals = remove(&set.intervals, span);
            }
        } else if row.is_pending_restatement {
            let set = &mut sets[pending];
            set.pending_restatement_intervals = merge(
                set.pending_restatement_intervals
                    .iter()
                    .copied()
                    .chain([span]),
            );
        } else if row.is_dev {
            let set = &mut sets[own];
            set.dev_intervals = merge(set.dev_intervals.iter().copied().chain([span]));
            set.dev_last_altered_ts = latest(set.dev_last_altered_ts, row.last_altered_ts);
        } else {
            let set = &mut sets[own];
            set.intervals = merge(set.intervals.iter().copied().chain([span]));
            set.last_altered_ts = latest(set.last_altered_ts, row.last_altered_ts);
            // A completed interval settles the restatements recorded before it.
            let set = &mut sets[pending];
            set.pending_restatement_intervals = remove(&set.pending_restatement_intervals, span);
        }
    }
    sets.retain(|s| !s.is_empty());
    sets
}

/// What a snapshot needs to know about itself to take its version's intervals.
#[derive(Clone, Debug)]
pub struct Target {
    pub identifier: String,
    pub dev_version: String,
    pub unit: Unit,
    pub allow_partials: bool,
    /// `effective_from`, already floored to the interval unit.
    pub effective_from_ts: Option<i64>,
    /// What the stored snapshot already says.
    pub last_altered_ts: Option<i64>,
    pub dev_last_altered_ts: Option<i64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hydrated {
    pub intervals: Vec<Interval>,
    pub dev_intervals: Vec<Interval>,
    pub pending_restatement_intervals: Vec<Interval>,
    pub last_altered_ts: Option<i64>,
    pub dev_last_altered_ts: Option<i64>,
}

/// The snapshot's intervals after merging every set of its version.
pub fn hydrate(target: &Target, sets: &[Recorded]) -> Hydrated {
    let mut out = Hydrated {
        last_altered_ts: target.last_altered_ts,
        dev_last_altered_ts: target.dev_last_altered_ts,
        ..Default::default()
    };
    let effective_from = target.effective_from_ts.filter(|ts| *ts > 0).unwrap_or(0);
    for set in sets {
        let cut = effective_from > 0 && set.identifier.as_deref() != Some(&target.identifier);
        for &(start, end) in &set.intervals {
            // Past effective_from, intervals must come from the snapshot itself.
            let end = if cut && start < effective_from {
                end.min(effective_from)
            } else {
                end
            };
            if !cut || end <= effective_from {
                add(target, &mut out.intervals, start, end);
            }
        }
        if let Some(ts) = set.last_altered_ts.filter(|ts| *ts != 0) {
            out.last_altered_ts = Some(out.last_altered_ts.unwrap_or(0).max(ts));
        }
        if set.dev_version.as_deref() == Some(&target.dev_version) {
            for &(start, end) in &set.dev_intervals {
                add(target, &mut out.dev_intervals, start, end);
            }
            if let Some(ts) = set.dev_last_altered_ts.filter(|ts| *ts != 0) {
                out.dev_last_altered_ts = Some(out.dev_last_altered_ts.unwrap_or(0).max(ts));
            }
        }
        out.pending_restatement_intervals = merge(
            out.pending_restatement_intervals
                .iter()
                .chain(&set.pending_restatement_intervals)
                .copied(),
        );
    }
    out
}

/// Adds an interval the way a snapshot does: aligned to whole units unless partial intervals are
/// allowed, skipped when nothing of it is left.
fn add(target: &Target, intervals: &mut Vec<Interval>, start: i64, end: i64) {
    let mut start_ts = target.unit.floor(start);
    if !target.allow_partials && start_ts < start {
        start_ts = target.unit.next(start_ts);
    }
    let end_ts = if target.allow_partials {
        end
    } else {
        target.unit.floor(end)
    };
    if start_ts >= end_ts {
        return;
    }
    intervals.push((start_ts, end_ts));
    if intervals.len() >= 2 {
        *intervals = merge(intervals.iter().copied());
    }
}

fn latest(current: Option<i64>, new: Option<i64>) -> Option<i64> {
    match new.filter(|ts| *ts != 0) {
        Some(ts) => Some(current.unwrap_or(0).max(ts)),
        None => current,
    }
}

/// Sorted, with overlapping or touching intervals joined.
pub fn merge(intervals: impl IntoIterator<Item = Interval>) -> Vec<Interval> {
    let mut sorted: Vec<Interval> = intervals.into_iter().collect();
    sorted.sort_unstable();
    let mut merged: Vec<Interval> = Vec::with_capacity(sorted.len());
    for (start, end) in sorted {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    merged
}

/// The intervals without `[start, end)`.
pub fn remove(intervals: &[Interval], (remove_start, remove_end): Interval) -> Vec<Interval> {
    let mut out = Vec::with_capacity(intervals.len() + 1);
    for &(start, end) in intervals {
        if remove_start > start && remove_end < end {
            out.push((start, remove_start));
            out.push((remove_end, end));
        } else if remove_start > start {
            out.push((start, remove_start.min(end)));
        } else if remove_end < end {
            out.push((remove_end.max(start), end));
        }
    }
    out
}

/// SQLMesh's interval units, the granularity a model's intervals are aligned to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    Year,
    Month,
    Day,
    Hour,
    HalfHour,
    QuarterHour,
    FiveMinute,
}

impl Unit {
    const BY_LENGTH: [(Unit, i64); 7] = [
        (Unit::Year, 365 * 86_400),
        (Unit::Month, 28 * 86_400),
        (Unit::Day, 86_400),
        (Unit::Hour, 3_600),
        (Unit::HalfHour, 1_800),
        (Unit::QuarterHour, 900),
        (Unit::FiveMinute, 300),
    ];

    /// A node's explicit `interval_unit`.
    pub fn parse(name: &str) -> Option<Unit> {
        Some(match name {
            "year" => Unit::Year,
            "month" => Unit::Month,
            "day" => Unit::Day,
            "hour" => Unit::Hour,
            "half_hour" => Unit::HalfHour,
            "quarter_hour" => Unit::QuarterHour,
            "five_minute" => Unit::FiveMinute,
            _ => return None,
        })
    }

    /// The unit SQLMesh infers from a cron: the longest unit that fits in the shortest gap
    /// between the next runs.
    pub fn from_cron(cron: &str) -> Result<Unit, String> {
        let schedule = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Disallowed)
            .build()
            .parse(cron)
            .map_err(|e| format!("cannot read cron \"{cron}\": {e}"))?;
        let mut at = jiff::Timestamp::now().to_zoned(jiff::tz::TimeZone::UTC);
        let mut runs = Vec::with_capacity(6);
        for _ in 0..6 {
            let next = schedule
                .find_next_occurrence(&at, false)
                .map_err(|e| format!("cron \"{cron}\" has no next run: {e}"))?;
            runs.push(next.timestamp().as_second());
            at = next;
        }
        let gap = runs.windows(2).map(|w| w[1] - w[0]).min().unwrap_or(0);
        Self::BY_LENGTH
            .iter()
            .find(|(_, seconds)| *seconds <= gap)
            .map(|(unit, _)| *unit)
            .ok_or_else(|| format!("cron \"{cron}\" runs more often than every 5 minutes"))
    }

    /// The start of the unit that holds `ms` (UTC).
    pub fn floor(self, ms: i64) -> i64 {
        let Some(at) = Utc.timestamp_millis_opt(ms).single() else {
            return ms;
        };
        let date = at.date_naive();
        let day_start = |d: NaiveDate| d.and_hms_opt(0, 0, 0).map(|t| t.and_utc());
        let floored = match self {
            Unit::Year => NaiveDate::from_ymd_opt(date.year(), 1, 1).and_then(day_start),
            Unit::Month => {
                NaiveDate::from_ymd_opt(date.year(), date.month(), 1).and_then(day_start)
            }
            Unit::Day => day_start(date),
            Unit::Hour | Unit::HalfHour | Unit::QuarterHour | Unit::FiveMinute => {
                let step = match self {
                    Unit::HalfHour => 30,
                    Unit::QuarterHour => 15,
                    Unit::FiveMinute => 5,
                    _ => 60,
                };
                let minute = at.minute() - at.minute() % step;
                date.and_hms_opt(at.hour(), minute, 0).map(|t| t.and_utc())
            }
        };
        floored.map_or(ms, |t: DateTime<Utc>| t.timestamp_millis())
    }

    /// The start of the unit after the one that holds `ms`.
    pub fn next(self, ms: i64) -> i64 {
        let start = self.floor(ms);
        let Some(at) = Utc.timestamp_millis_opt(start).single() else {
            return ms;
        };
        let next = match self {
            Unit::Year => at.with_year(at.year() + 1),
            Unit::Month => {
                if at.month() == 12 {
                    at.with_year(at.year() + 1).and_then(|t| t.with_month(1))
                } else {
                    at.with_month(at.month() + 1)
                }
            }
            Unit::Day => Some(at + Duration::days(1)),
            Unit::Hour => Some(at + Duration::hours(1)),
            Unit::HalfHour => Some(at + Duration::minutes(30)),
            Unit::QuarterHour => Some(at + Duration::minutes(15)),
            Unit::FiveMinute => Some(at + Duration::minutes(5)),
        };
        next.map_or(ms, |t| t.timestamp_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400_000;

    fn row(identifier: &str, start: i64, end: i64) -> Row {
        Row {
            identifier: Some(identifier.into()),
            dev_version: Some("d1".into()),
            start,
            end,
            is_dev: false,
            is_removed: false,
            is_pending_restatement: false,
            last_altered_ts: None,
        }
    }

    fn target(identifier: &str) -> Target {
        Target {
            identifier: identifier.into(),
            dev_version: "d1".into(),
            unit: Unit::Day,
            allow_partials: false,
            effective_from_ts: None,
            last_altered_ts: None,
            dev_last_altered_ts: None,
        }
    }

    #[test]
    fn merge_joins_touching_and_overlapping_intervals() {
        assert_eq!(
            merge([(5, 7), (1, 3), (3, 4), (6, 9), (11, 12)]),
            vec![(1, 4), (5, 9), (11, 12)]
        );
    }

    #[test]
    fn remove_splits_and_trims() {
        assert_eq!(remove(&[(0, 10)], (3, 5)), vec![(0, 3), (5, 10)]);
        assert_eq!(remove(&[(0, 10)], (0, 5)), vec![(5, 10)]);
        assert_eq!(remove(&[(0, 10)], (5, 10)), vec![(0, 5)]);
        assert_eq!(remove(&[(0, 10)], (0, 10)), vec![]);
    }

    #[test]
    fn fold_applies_removals_and_settles_pending_restatements() {
        let mut removal = row("a", DAY, 2 * DAY);
        removal.is_removed = true;
        let mut pending = row("a", 0, 3 * DAY);
        pending.is_pending_restatement = true;
        pending.identifier = None;
        pending.dev_version = None;
        let sets = fold([row("a", 0, 3 * DAY), removal, pending, row("a", 0, DAY)]);
        assert_eq!(sets.len(), 2);
        assert_eq!(sets[0].intervals, vec![(0, DAY), (2 * DAY, 3 * DAY)]);
        assert_eq!(sets[1].pending_restatement_intervals, vec![(DAY, 3 * DAY)]);
    }

    #[test]
    fn hydrate_aligns_to_units_and_cuts_at_effective_from() {
        let sets = fold([row("a", 0, 4 * DAY), row("b", 10 * DAY + 5, 12 * DAY + 7)]);
        let mut own = target("b");
        own.effective_from_ts = Some(2 * DAY);
        let hydrated = hydrate(&own, &sets);
        // From "a" only what lies before effective_from; "b"'s own, aligned to whole days.
        assert_eq!(hydrated.intervals, vec![(0, 2 * DAY), (11 * DAY, 12 * DAY)]);
    }

    #[test]
    fn units_floor_and_step() {
        let ts = DateTime::parse_from_rfc3339("2026-03-15T13:47:12Z")
            .unwrap()
            .timestamp_millis();
        let at = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().timestamp_millis();
        assert_eq!(Unit::Year.floor(ts), at("2026-01-01T00:00:00Z"));
        assert_eq!(Unit::Month.next(ts), at("2026-04-01T00:00:00Z"));
        assert_eq!(Unit::Day.floor(ts), at("2026-03-15T00:00:00Z"));
        assert_eq!(Unit::QuarterHour.floor(ts), at("2026-03-15T13:45:00Z"));
        assert_eq!(Unit::FiveMinute.next(ts), at("2026-03-15T13:50:00Z"));
        assert_eq!(
            Unit::Month.next(at("2026-12-31T00:00:00Z")),
            at("2027-01-01T00:00:00Z")
        );
    }

    #[test]
    fn units_from_cron() {
        assert_eq!(Unit::from_cron("@daily"), Ok(Unit::Day));
        assert_eq!(Unit::from_cron("0 * * * *"), Ok(Unit::Hour));
        assert_eq!(Unit::from_cron("*/15 * * * *"), Ok(Unit::QuarterHour));
        assert_eq!(Unit::from_cron("0 0 1 * *"), Ok(Unit::Month));
        assert_eq!(Unit::from_cron("0 3 * * 1"), Ok(Unit::Day));
        assert!(Unit::from_cron("* * * * *").is_err());
    }
}
