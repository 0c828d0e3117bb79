//! statekeeper's own state compared between two schemas holding it: environments (which model
//! moved from which version to which), model versions on one side only, and checkpoints on one
//! side only. Versions and checkpoints are matched by what they are (name and fingerprint;
//! environment, time, plan and description), never by their ids, which an import renumbers.

use chrono::{DateTime, SecondsFormat, Utc};
use futures::TryStreamExt as _;
use sqlx::{AssertSqlSafe, PgConnection};

use super::report::{
    Capped, Change, CheckpointEntry, EnvironmentDiff, Environments, ModelMove, OneSided,
    StatekeeperDiff, VersionRef,
};
use crate::engine::Error;
use crate::engine::identifier::SchemaName;

/// What differs from schema `from` to schema `to`. With `merge`, only what a merge of `to` into
/// `from` changes: environments `to` has replace their namesakes (their checkpoints with them);
/// nothing else of `from` goes.
pub(super) async fn diff(
    conn: &mut PgConnection,
    from: &SchemaName,
    to: &SchemaName,
    limit: usize,
    merge: bool,
) -> Result<StatekeeperDiff, Error> {
    Ok(StatekeeperDiff {
        environments: environments(conn, from, to, limit, merge).await?,
        // Model versions by name and fingerprint on one side only.
        versions: OneSided::versions_by_key(
            conn,
            from,
            to,
            "model_versions",
            "fingerprint",
            limit,
            merge,
        )
        .await?,
        checkpoints: checkpoints(conn, from, to, limit, merge).await?,
    })
}

type EnvironmentRow = (
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<bool>,
    Option<bool>,
    Option<bool>,
);

/// Environments that differ, in name order: one row per environment (whether each side has it,
/// and whether its own row differs), then one per model whose version differs.
async fn environments(
    conn: &mut PgConnection,
    from: &SchemaName,
    to: &SchemaName,
    limit: usize,
    merge: bool,
) -> Result<Environments, Error> {
    let refs = |s: &SchemaName| {
        format!(
            "SELECT r.environment, r.model_name, v.fingerprint, v.version
             FROM {s}.virtual_environment_refs r JOIN {s}.model_versions v ON v.id = r.model_version_id",
            s = s.quoted()
        )
    };
    let sql = format!(
        "WITH f AS ({from_refs}), t AS ({to_refs})
         SELECT COALESCE(t.environment, f.environment), COALESCE(t.model_name, f.model_name),
                f.fingerprint, f.version, t.fingerprint, t.version, NULL::bool, NULL::bool, NULL::bool
         FROM f FULL JOIN t ON f.environment = t.environment AND f.model_name = t.model_name
         WHERE f.fingerprint IS DISTINCT FROM t.fingerprint OR f.version IS DISTINCT FROM t.version
         UNION ALL
         SELECT COALESCE(te.name, fe.name), NULL, NULL, NULL, NULL, NULL,
                fe.name IS NOT NULL, te.name IS NOT NULL,
                (fe.plan_id, fe.previous_plan_id, fe.expires_at)
                    IS DISTINCT FROM (te.plan_id, te.previous_plan_id, te.expires_at)
         FROM {from}.virtual_environments fe FULL JOIN {to}.virtual_environments te ON fe.name = te.name
         ORDER BY 1, 2 NULLS FIRST",
        from_refs = refs(from),
        to_refs = refs(to),
        from = from.quoted(),
        to = to.quoted(),
    );
    let mut out = Environments::default();
    let mut current: Option<EnvironmentDiff> = None;
    // An environment on both sides whose own row is the same: it is changed only if a model is.
    let mut unchanged: Option<String> = None;
    let mut rows = sqlx::query_as::<_, EnvironmentRow>(AssertSqlSafe(sql)).fetch(&mut *conn);
    while let Some(row) = rows.try_next().await? {
        let (environment, model, from_fp, from_version, to_fp, to_version, in_from, in_to, differs) =
            row;
        let Some(model) = model else {
            flush(&mut current, &mut out, limit, merge);
            let change = match (in_from, in_to) {
                (Some(true), Some(false)) => Some(Change::Removed),
                (Some(false), Some(true)) => Some(Change::Added),
                _ if differs == Some(true) => Some(Change::Changed),
                _ => None,
            };
            match change {
                Some(change) => {
                    current = Some(EnvironmentDiff {
                        name: environment,
                        change,
                        models: Capped::default(),
                    });
                    unchanged = None;
                }
                None => unchanged = Some(environment),
            }
            continue;
        };
        if current.is_none() && unchanged.as_deref() == Some(environment.as_str()) {
            current = Some(EnvironmentDiff {
                name: environment,
                change: Change::Changed,
                models: Capped::default(),
            });
            unchanged = None;
        }
        let side = |fingerprint: Option<String>, version: Option<String>| {
            fingerprint
                .zip(version)
                .map(|(identifier, version)| VersionRef {
                    identifier,
                    version,
                })
        };
        if let Some(entry) = current.as_mut() {
            entry.models.push(
                ModelMove {
                    name: model,
                    from: side(from_fp, from_version),
                    to: side(to_fp, to_version),
                },
                limit,
            );
        }
    }
    flush(&mut current, &mut out, limit, merge);
    Ok(out)
}

fn flush(current: &mut Option<EnvironmentDiff>, out: &mut Environments, limit: usize, merge: bool) {
    if let Some(entry) = current.take()
        && !(merge && entry.change == Change::Removed)
    {
        out.push(entry, limit);
    }
}

type CheckpointRow = (
    String,
    DateTime<Utc>,
    Option<String>,
    Option<String>,
    bool,
    bool,
);

/// Checkpoints on one side only. In a merge, a checkpoint only in `from` goes only when `to`
/// replaces its environment.
async fn checkpoints(
    conn: &mut PgConnection,
    from: &SchemaName,
    to: &SchemaName,
    limit: usize,
    merge: bool,
) -> Result<OneSided<CheckpointEntry>, Error> {
    let sql = format!(
        "SELECT COALESCE(f.environment, t.environment), COALESCE(f.created_at, t.created_at),
                COALESCE(f.plan_id, t.plan_id), COALESCE(f.description, t.description),
                f.environment IS NULL,
                EXISTS (SELECT 1 FROM {to}.virtual_environments e
                        WHERE e.name = COALESCE(f.environment, t.environment))
         FROM {from}.virtual_environment_checkpoints f
         FULL JOIN {to}.virtual_environment_checkpoints t
           ON f.environment = t.environment AND f.created_at = t.created_at
          AND COALESCE(f.plan_id, '') = COALESCE(t.plan_id, '')
          AND COALESCE(f.description, '') = COALESCE(t.description, '')
         WHERE f.environment IS NULL OR t.environment IS NULL
         ORDER BY 1, 2",
        from = from.quoted(),
        to = to.quoted(),
    );
    let mut out = OneSided::default();
    let mut rows = sqlx::query_as::<_, CheckpointRow>(AssertSqlSafe(sql)).fetch(&mut *conn);
    while let Some((environment, created_at, plan_id, description, added, replaced)) =
        rows.try_next().await?
    {
        let entry = CheckpointEntry {
            environment,
            created_at: created_at.to_rfc3339_opts(SecondsFormat::Micros, true),
            plan_id,
            description,
        };
        if added {
            out.added.push(entry, limit);
        } else if !merge || replaced {
            out.removed.push(entry, limit);
        }
    }
    Ok(out)
}
