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
    /// How the `from` side named this environment's views (SQLMesh's `EnvironmentNamingInfo`
    /// fields as JSON), when it had the environment: what dropping its old views needs.
    #[serde(skip)]
    pub from_naming: Option<String>,
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
    /// The `from` side's entry as SQLMesh wrote it (a `SnapshotTableInfo`), when the model has
    /// no snapshot on the `to` side: what dropping its view needs.
    #[serde(skip)]
    pub from_entry: Option<String>,
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
        format!(
            "{}: {} -> {}",
            display_name(&self.name),
            side(&self.from),
            side(&self.to)
        )
    }
}

/// A stored model name (`"warehouse"."shop"."orders"`) as people write it
/// (`warehouse.shop.orders`), when no part needs its quotes.
pub fn display_name(stored: &str) -> String {
    let parts: Vec<&str> = stored.split('.').collect();
    let plain = parts.iter().all(|p| {
        let inner = p.strip_prefix('"').and_then(|p| p.strip_suffix('"'));
        inner.is_some_and(|i| {
            !i.is_empty() && i.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
    });
    if !plain {
        return stored.to_owned();
    }
    parts
        .iter()
        .map(|p| p.trim_matches('"'))
        .collect::<Vec<_>>()
        .join(".")
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
                    jsonb_build_object('name', e.name, 'suffix_target', e.suffix_target,
                                       'catalog_name_override', e.catalog_name_override,
                                       'normalize_name', e.normalize_name,
                                       'gateway_managed', e.gateway_managed) AS naming
             FROM {}._environments e
             CROSS JOIN LATERAL jsonb_array_elements(COALESCE(e.snapshots, '[]')::jsonb) x",
            schema.quoted()
        )
    };
    let sql = format!(
        "WITH f AS ({from_entries}), t AS ({to_entries}),
              fe AS (SELECT name FROM {from}._environments),
              fn AS (SELECT name, jsonb_build_object('name', name, 'suffix_target', suffix_target,
                                       'catalog_name_override', catalog_name_override,
                                       'normalize_name', normalize_name,
                                       'gateway_managed', gateway_managed) AS naming
                     FROM {from}._environments),
              te AS (SELECT name FROM {to}._environments)
         SELECT COALESCE(t.environment, f.environment), COALESCE(t.model, f.model),
                f.info ->> 'fingerprint', f.info ->> 'version',
                t.info ->> 'fingerprint', t.info ->> 'version',
                EXISTS (SELECT 1 FROM fe WHERE fe.name = COALESCE(t.environment, f.environment)),
                EXISTS (SELECT 1 FROM te WHERE te.name = COALESCE(t.environment, f.environment)),
                CASE WHEN t.info IS NULL THEN f.info::text END, NULL
         FROM f FULL JOIN t ON f.environment = t.environment AND f.model = t.model
         WHERE f.info IS DISTINCT FROM t.info OR f.naming IS DISTINCT FROM t.naming
         UNION ALL
         SELECT name, NULL, NULL, NULL, NULL, NULL,
                EXISTS (SELECT 1 FROM fe WHERE fe.name = n.name),
                EXISTS (SELECT 1 FROM te WHERE te.name = n.name),
                NULL, (SELECT naming::text FROM fn WHERE fn.name = n.name)
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
        Option<String>,
        Option<String>,
    );
    let mut rows = sqlx::query_as::<_, Row>(AssertSqlSafe(sql)).fetch(&mut *conn);
    let mut changes: Vec<EnvironmentChange> = Vec::new();
    // One row per environment comes before its models' rows (NULLS FIRST): it starts an entry
    // when the environment is on one side only, or holds its naming until a model differs.
    let mut naming: Option<String> = None;
    while let Some(row) = rows.try_next().await? {
        let (environment, model, from_fp, from_version, to_fp, to_version, in_from, in_to) =
            (row.0, row.1, row.2, row.3, row.4, row.5, row.6, row.7);
        let Some(model) = model else {
            naming = row.9;
            if in_from != in_to {
                changes.push(EnvironmentChange {
                    name: environment,
                    change: if in_to {
                        Change::Added
                    } else {
                        Change::Removed
                    },
                    models: Vec::new(),
                    from_naming: naming.clone(),
                });
            }
            continue;
        };
        if changes.last().is_none_or(|c| c.name != environment) {
            changes.push(EnvironmentChange {
                name: environment.clone(),
                change: Change::Changed,
                models: Vec::new(),
                from_naming: naming.clone(),
            });
        }
        if let Some(entry) = changes.last_mut() {
            entry.models.push(ModelChange {
                name: model,
                from: snapshot_ref(from_fp, from_version)?,
                to: snapshot_ref(to_fp, to_version)?,
                from_entry: row.8,
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
