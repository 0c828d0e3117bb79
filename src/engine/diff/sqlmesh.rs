//! SQLMesh's state compared between two schemas holding it: environments (SQLMesh's own
//! comparison, `frameworks::sqlmesh::environments`), snapshots on one side only, and each model
//! version's intervals as SQLMesh folds them from `_intervals`. Rows stream; only what differs
//! is held, up to the limit.

use futures::TryStreamExt as _;
use sqlx::{AssertSqlSafe, PgConnection};

use super::report::{
    Capped, Change, EnvironmentDiff, IntervalChange, ModelMove, OneSided, Range, SqlmeshDiff,
    VersionRef,
};
use crate::engine::Error;
use crate::engine::frameworks::sqlmesh::environments::{self, EnvironmentChange, SnapshotRef};
use crate::engine::frameworks::sqlmesh::intervals::{self, Interval, Row};
use crate::engine::identifier::SchemaName;

/// What differs from schema `from` to schema `to`. With `merge`, only what a merge of `to` into
/// `from` changes: nothing only in `from` goes, and intervals are only added.
pub(super) async fn diff(
    conn: &mut PgConnection,
    from: &SchemaName,
    to: &SchemaName,
    limit: usize,
    merge: bool,
) -> Result<SqlmeshDiff, Error> {
    let mut out = SqlmeshDiff::default();
    for change in environments::environment_changes(conn, from, to).await? {
        if merge && change.change == environments::Change::Removed {
            continue;
        }
        out.environments.push(environment(change, limit), limit);
    }
    // Snapshots by their key (name and identifier) on one side only.
    out.snapshots =
        OneSided::versions_by_key(conn, from, to, "_snapshots", "identifier", limit, merge).await?;
    out.intervals = interval_changes(conn, from, to, limit, merge).await?;
    Ok(out)
}

fn environment(change: EnvironmentChange, limit: usize) -> EnvironmentDiff {
    let version = |s: SnapshotRef| VersionRef {
        identifier: s.identifier,
        version: s.version,
    };
    let mut models = Capped::default();
    for model in change.models {
        models.push(
            ModelMove {
                name: model.name,
                from: model.from.map(version),
                to: model.to.map(version),
            },
            limit,
        );
    }
    EnvironmentDiff {
        name: change.name,
        change: match change.change {
            environments::Change::Added => Change::Added,
            environments::Change::Removed => Change::Removed,
            environments::Change::Changed => Change::Changed,
        },
        models,
    }
}

/// One `_intervals` row of a model version, with its side.
type IntervalRow = (
    String,
    String,
    bool,
    Option<String>,
    Option<String>,
    i64,
    i64,
    bool,
    bool,
    bool,
);

/// The model versions whose intervals differ. Only versions whose rows differ (by count and an
/// order-independent digest, computed in SQL) are read; each one's rows are folded per side as
/// SQLMesh folds them, and the resulting sets compared, so rows compacted or written otherwise
/// that amount to the same intervals are no difference.
async fn interval_changes(
    conn: &mut PgConnection,
    from: &SchemaName,
    to: &SchemaName,
    limit: usize,
    merge: bool,
) -> Result<Capped<IntervalChange>, Error> {
    let digest = |schema: &SchemaName| {
        format!(
            "SELECT name, version, count(*) AS n,
                    sum(hashtextextended(concat_ws('|', identifier, dev_version, start_ts, end_ts,
                        is_dev, is_removed, is_pending_restatement, created_ts), 0)::numeric) AS h
             FROM {}._intervals GROUP BY name, version",
            schema.quoted()
        )
    };
    let rows = |schema: &SchemaName, side: i32| {
        format!(
            "SELECT {side} AS side, name, version, identifier, dev_version, start_ts, end_ts,
                    is_dev, is_removed, is_pending_restatement, created_ts
             FROM {}._intervals",
            schema.quoted()
        )
    };
    let sql = format!(
        "WITH f AS ({from_digest}), t AS ({to_digest}),
              d AS (SELECT COALESCE(f.name, t.name) AS name, COALESCE(f.version, t.version) AS version
                    FROM f FULL JOIN t ON f.name = t.name AND f.version = t.version
                    WHERE f.n IS DISTINCT FROM t.n OR f.h IS DISTINCT FROM t.h)
         SELECT x.name, x.version, x.side = 1, x.identifier, x.dev_version, x.start_ts, x.end_ts,
                COALESCE(x.is_dev, false), COALESCE(x.is_removed, false),
                COALESCE(x.is_pending_restatement, false)
         FROM d JOIN ({from_rows} UNION ALL {to_rows}) x ON x.name = d.name AND x.version = d.version
         WHERE x.start_ts IS NOT NULL AND x.end_ts IS NOT NULL
         ORDER BY x.name, x.version, x.side, x.created_ts, x.is_removed, x.is_pending_restatement",
        from_digest = digest(from),
        to_digest = digest(to),
        from_rows = rows(from, 0),
        to_rows = rows(to, 1),
    );
    let mut out = Capped::default();
    let mut group = Group::default();
    let mut stream = sqlx::query_as::<_, IntervalRow>(AssertSqlSafe(sql)).fetch(&mut *conn);
    while let Some(row) = stream.try_next().await? {
        let (name, version, to_side, identifier, dev_version, start, end, is_dev, removed, pending) =
            row;
        if group.key.as_ref() != Some(&(name.clone(), version.clone())) {
            group.finish(&mut out, limit, merge);
            group.key = Some((name, version));
        }
        let row = Row {
            identifier,
            dev_version,
            start,
            end,
            is_dev,
            is_removed: removed,
            is_pending_restatement: pending,
            last_altered_ts: None,
        };
        if to_side {
            group.to.push(row);
        } else {
            group.from.push(row);
        }
    }
    group.finish(&mut out, limit, merge);
    Ok(out)
}

/// The rows of one model version, per side.
#[derive(Default)]
struct Group {
    key: Option<(String, String)>,
    from: Vec<Row>,
    to: Vec<Row>,
}

impl Group {
    /// Compares the version's intervals on both sides (prod, then dev) and starts over.
    fn finish(&mut self, out: &mut Capped<IntervalChange>, limit: usize, merge: bool) {
        let Some((model, version)) = self.key.take() else {
            return;
        };
        let (from, to) = (
            effective(std::mem::take(&mut self.from)),
            effective(std::mem::take(&mut self.to)),
        );
        for (dev, from, to) in [(false, &from.0, &to.0), (true, &from.1, &to.1)] {
            let added = subtract(to, from);
            let removed = if merge {
                Vec::new()
            } else {
                subtract(from, to)
            };
            if added.is_empty() && removed.is_empty() {
                continue;
            }
            let capped = |ranges: Vec<Interval>| {
                let mut capped = Capped::default();
                for (start, end) in ranges {
                    capped.push(Range::from_ms(start, end), limit);
                }
                capped
            };
            out.push(
                IntervalChange {
                    model: model.clone(),
                    version: version.clone(),
                    dev,
                    added: capped(added),
                    removed: capped(removed),
                },
                limit,
            );
        }
    }
}

/// A version's intervals and dev intervals: every set SQLMesh folds from its rows, merged.
fn effective(rows: Vec<Row>) -> (Vec<Interval>, Vec<Interval>) {
    let sets = intervals::fold(rows);
    (
        intervals::merge(sets.iter().flat_map(|s| s.intervals.iter().copied())),
        intervals::merge(sets.iter().flat_map(|s| s.dev_intervals.iter().copied())),
    )
}

/// The parts of `a` that `b` does not cover.
fn subtract(a: &[Interval], b: &[Interval]) -> Vec<Interval> {
    let mut left = a.to_vec();
    for &span in b {
        if left.is_empty() {
            break;
        }
        left = intervals::remove(&left, span);
    }
    left.retain(|(start, end)| start < end);
    left
}

#[cfg(test)]
mod tests {
    use super::subtract;

    #[test]
    fn subtract_leaves_what_the_other_side_lacks() {
        assert_eq!(
            subtract(&[(0, 10)], &[(2, 4), (6, 8)]),
            vec![(0, 2), (4, 6), (8, 10)]
        );
        assert_eq!(subtract(&[(0, 10)], &[(0, 10)]), vec![]);
        assert_eq!(
            subtract(&[(0, 10), (20, 30)], &[(5, 25)]),
            vec![(0, 5), (25, 30)]
        );
        assert_eq!(subtract(&[], &[(5, 25)]), vec![]);
    }
}
