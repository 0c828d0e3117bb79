//! How SQLMesh's environments differ between two copies of its state (the live tables, a backup,
//! a file restored into scratch): which environments were added, removed or changed, and which
//! models moved from which snapshot to which. A restore re-points exactly these environments'
//! views, and `state diff` reports them.

use futures::TryStreamExt as _;
use serde::Serialize;
use sqlx::{AssertSqlSafe, PgConnection};

use super::Fingerprint;
use crate::engine::Error;
use crate::engine::identifier::SchemaName;

/// What happened to an environment between the two sides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Change {
    Added,
    Removed,
    Changed,
}

/// One environment that differs, with the models whose snapshot differs in it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvironmentChange {
    pub name: String,
    pub change: Change,
    /// In model name order; a model is listed when its snapshot (or the environment's naming of
    /// views) differs.
    pub models: Vec<ModelChange>,
}

/// A model of an environment: the snapshot it had on the `from` side and has on the `to` side.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelChange {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<SnapshotRef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<SnapshotRef>,
}

/// A snapshot as an environment refers to it: its identifier and the version that names its
/// physical table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotRef {
    pub identifier: String,
    pub version: String,
}

impl ModelChange {
    /// `shop.orders: 1234 -> 5678`, in versions (what names the tables a view selects from).
    pub fn describe(&self) -> String {
        let side = |s: &Option<SnapshotRef>| {
            s.as_ref()
                .map_or_else(|| "(none)".to_owned(), |s| format!("version {}", s.version))
        };
        format!("{}: {} -> {}", self.name, side(&self.from), side(&self.to))
    }
}

/// The environments that differ between the `_environments` tables of schemas `from` and `to`
/// (each a copy of one SQLMesh store: the store, a backup of it, a scratch restore), in name
/// order. Entries are compared whole, with the environment's naming of views (suffix target,
/// catalog override, name normalisation, gateway management): anything that can change what a
/// view is called or selects from. Rows stream; only differing models are held.
pub async fn environment_changes(
    conn: &mut PgConnection,
    from: &SchemaName,
    to: &SchemaName,
) -> Result<Vec<EnvironmentChange>, Error> {
    let entries = |schema: &SchemaName| {
        format!(
            "SELECT e.name AS environment, x ->> 'name' AS model, x AS info,
                    jsonb_build_array(e.suffix_target, e.catalog_name_override, e.normalize_name,
                                      e.gateway_managed) AS naming
             FROM {}._environments e
             CROSS JOIN LATERAL jsonb_array_elements(COALESCE(e.snapshots, '[]')::jsonb) x",
            schema.quoted()
        )
    };
    let sql = format!(
        "WITH f AS ({from_entries}), t AS ({to_entries}),
              fe AS (SELECT name FROM {from}._environments),
              te AS (SELECT name FROM {to}._environments)
         SELECT COALESCE(t.environment, f.environment), COALESCE(t.model, f.model),
                f.info ->> 'fingerprint', f.info ->> 'version',
                t.info ->> 'fingerprint', t.info ->> 'version',
                EXISTS (SELECT 1 FROM fe WHERE fe.name = COALESCE(t.environment, f.environment)),
                EXISTS (SELECT 1 FROM te WHERE te.name = COALESCE(t.environment, f.environment))
         FROM f FULL JOIN t ON f.environment = t.environment AND f.model = t.model
         WHERE f.info IS DISTINCT FROM t.info OR f.naming IS DISTINCT FROM t.naming
         UNION ALL
         SELECT name, NULL, NULL, NULL, NULL, NULL,
                EXISTS (SELECT 1 FROM fe WHERE fe.name = n.name),
                EXISTS (SELECT 1 FROM te WHERE te.name = n.name)
         FROM (SELECT name FROM fe UNION SELECT name FROM te) n
         ORDER BY 1, 2 NULLS FIRST",
        from_entries = entries(from),
        to_entries = entries(to),
        from = from.quoted(),
        to = to.quoted(),
    );
    type Row = (
        String,
        Option<String>,
        Option<String>,
        Option<String>,
        Option<String>,
        Option<String>,
        bool,
        bool,
    );
    let mut rows = sqlx::query_as::<_, Row>(AssertSqlSafe(sql)).fetch(&mut *conn);
    let mut changes: Vec<EnvironmentChange> = Vec::new();
    while let Some((environment, model, from_fp, from_version, to_fp, to_version, in_from, in_to)) =
        rows.try_next().await?
    {
        let Some(model) = model else {
            // One row per environment, before its models: it starts an entry when it is on one
            // side only; an environment on both sides gets one only when a model differs.
            if in_from != in_to {
                changes.push(EnvironmentChange {
                    name: environment,
                    change: if in_to { Change::Added } else { Change::Removed },
                    models: Vec::new(),
                });
            }
            continue;
        };
        if changes.last().is_none_or(|c| c.name != environment) {
            changes.push(EnvironmentChange {
                name: environment.clone(),
                change: Change::Changed,
                models: Vec::new(),
            });
        }
        if let Some(entry) = changes.last_mut() {
            entry.models.push(ModelChange {
                name: model,
                from: snapshot_ref(from_fp, from_version)?,
                to: snapshot_ref(to_fp, to_version)?,
            });
        }
    }
    Ok(changes)
}

/// The identifier SQLMesh derives from a fingerprint, and the version (the fingerprint's default
/// when the entry names none).
fn snapshot_ref(
    fingerprint: Option<String>,
    version: Option<String>,
) -> Result<Option<SnapshotRef>, Error> {
    let Some(fingerprint) = fingerprint else {
        return Ok(None);
    };
    let parsed: Fingerprint = serde_json::from_str(&fingerprint).map_err(|e| {
        Error::InvalidExport(format!(
            "an environment's snapshot has a fingerprint SQLMesh did not write: {e}"
        ))
    })?;
    Ok(Some(SnapshotRef {
        identifier: parsed.to_identifier(),
        version: version.unwrap_or_else(|| parsed.to_version()),
    }))
}
