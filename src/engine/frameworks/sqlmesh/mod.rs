//! SQLMesh's state tables (docs/sqlmesh.md). SQLMesh creates and migrates them (`sqlmesh plan`,
//! `sqlmesh migrate`) and does not take statekeeper's advisory lock: statekeeper reads them from
//! one snapshot and writes them under table locks, and never creates or alters them.

pub mod environments;
pub mod export;
pub mod import;
pub(crate) mod intervals;
pub mod profile;

use std::collections::BTreeMap;

use sqlx::{AssertSqlSafe, PgConnection};

use crate::engine::Error;
use crate::engine::catalog;
use crate::engine::framework::StoreVersion;
use crate::engine::store::Store;

/// `_versions`: the state schema version and the SQLMesh and SQLGlot versions that wrote it.
pub(crate) async fn read_version(
    store: &Store,
    conn: &mut PgConnection,
) -> Result<Option<StoreVersion>, Error> {
    let schema = store.schema();
    for table in ["_versions", "_snapshots", "_environments", "_intervals"] {
        if !catalog::table_exists(conn, schema.as_str(), table).await? {
            return Ok(None);
        }
    }
    let row: Option<(Option<i32>, Option<String>, Option<String>)> =
        sqlx::query_as(AssertSqlSafe(format!(
            "SELECT schema_version, sqlglot_version, sqlmesh_version FROM {}._versions",
            schema.quoted()
        )))
        .fetch_optional(conn)
        .await?;
    let Some((schema_version, sqlglot, sqlmesh)) = row else {
        return Ok(None);
    };
    let mut details = BTreeMap::new();
    details.extend(sqlmesh.map(|v| ("sqlmeshVersion".to_owned(), v)));
    details.extend(sqlglot.map(|v| ("sqlglotVersion".to_owned(), v)));
    Ok(Some(StoreVersion {
        schema_version: schema_version.unwrap_or(0),
        details,
    }))
}

/// A snapshot's fields in the order of SQLMesh's model: the order `sqlmesh state export` writes.
pub(crate) const SNAPSHOT_FIELDS: &[&str] = &[
    "name",
    "dev_version",
    "change_category",
    "fingerprint",
    "previous_versions",
    "base_table_name_override",
    "dev_table_suffix",
    "table_naming_convention",
    "forward_only",
    "physical_schema",
    "node",
    "parents",
    "intervals",
    "dev_intervals",
    "pending_restatement_intervals",
    "created_ts",
    "updated_ts",
    "ttl",
    "version",
    "unpaused_ts",
    "effective_from",
    "migrated",
    "unrestorable",
    "next_auto_restatement_ts",
    "last_altered_ts",
    "dev_last_altered_ts",
];

/// Fields SQLMesh keeps in columns or other tables rather than in the stored snapshot JSON.
pub(crate) const STORED_ELSEWHERE: &[&str] = &[
    "intervals",
    "dev_intervals",
    "pending_restatement_intervals",
    "updated_ts",
    "unpaused_ts",
    "unrestorable",
    "forward_only",
    "next_auto_restatement_ts",
];

/// Fields an export computes rather than copies: those stored elsewhere, and the last-altered
/// times, which also take the newest time recorded with the intervals.
pub(crate) fn is_computed_field(name: &str) -> bool {
    STORED_ELSEWHERE.contains(&name) || name == "last_altered_ts" || name == "dev_last_altered_ts"
}

/// A snapshot's fingerprint; its identifier and default version are CRC-32 digests of it.
#[derive(Clone, Debug, Default, serde::Deserialize)]
pub(crate) struct Fingerprint {
    #[serde(default)]
    pub data_hash: Option<String>,
    #[serde(default)]
    pub metadata_hash: Option<String>,
    #[serde(default)]
    pub parent_data_hash: Option<String>,
    #[serde(default)]
    pub parent_metadata_hash: Option<String>,
}

impl Fingerprint {
    /// The snapshot's identifier (`_snapshots.identifier`).
    pub fn to_identifier(&self) -> String {
        hash_data(&[
            &self.data_hash,
            &self.metadata_hash,
            &self.parent_data_hash,
            &self.parent_metadata_hash,
        ])
    }

    /// The version a snapshot has when none was assigned.
    pub fn to_version(&self) -> String {
        hash_data(&[&self.data_hash, &self.parent_data_hash])
    }
}

/// SQLMesh's `hash_data`: the decimal CRC-32 of the parts joined by `;` (absent parts empty).
fn hash_data(parts: &[&Option<String>]) -> String {
    let joined = parts
        .iter()
        .map(|p| p.as_deref().unwrap_or(""))
        .collect::<Vec<_>>()
        .join(";");
    crc32fast::hash(joined.as_bytes()).to_string()
}

/// A JSON object read with its keys in order and its values as written.
pub(crate) struct OrderedObject(pub Vec<(String, Box<serde_json::value::RawValue>)>);

impl<'de> serde::Deserialize<'de> for OrderedObject {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> serde::de::Visitor<'de> for Fields {
            type Value = OrderedObject;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<OrderedObject, A::Error> {
                let mut fields = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    fields.push(entry);
                }
                Ok(OrderedObject(fields))
            }
        }
        d.deserialize_map(Fields)
    }
}

/// A SQLMesh time value (epoch milliseconds, or a date or date-time text, UTC unless it says
/// otherwise) in epoch milliseconds.
pub(crate) fn timelike_ms(raw: &str) -> Option<i64> {
    if let Ok(ms) = raw.parse::<f64>() {
        return Some(ms as i64);
    }
    let text: String = serde_json::from_str(raw).ok()?;
    if let Ok(ms) = text.parse::<f64>() {
        return Some(ms as i64);
    }
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(&text) {
        return Some(t.timestamp_millis());
    }
    for format in ["%Y-%m-%d %H:%M:%S%.f%:z", "%Y-%m-%d %H:%M:%S%:z"] {
        if let Ok(t) = chrono::DateTime::parse_from_str(&text, format) {
            return Some(t.timestamp_millis());
        }
    }
    for format in [
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M:%S",
    ] {
        if let Ok(t) = chrono::NaiveDateTime::parse_from_str(&text, format) {
            return Some(t.and_utc().timestamp_millis());
        }
    }
    chrono::NaiveDate::parse_from_str(&text, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc().timestamp_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_sqlmesh_crc32_digests() {
        // Values from a snapshot SQLMesh 0.236.4 wrote (`_snapshots` of the example project).
        let fingerprint = Fingerprint {
            data_hash: Some("4026621668".into()),
            metadata_hash: Some("1996457212".into()),
            parent_data_hash: Some("1696254145".into()),
            parent_metadata_hash: Some("815584658".into()),
        };
        assert_eq!(fingerprint.to_identifier(), "2790571579");
        assert_eq!(fingerprint.to_version(), "635791289");
    }

    #[test]
    fn time_values_in_every_spelling() {
        assert_eq!(timelike_ms("1700000000000"), Some(1_700_000_000_000));
        assert_eq!(timelike_ms("\"2024-01-02\""), Some(1_704_153_600_000));
        assert_eq!(
            timelike_ms("\"2024-01-02 00:00:00\""),
            Some(1_704_153_600_000)
        );
        assert_eq!(
            timelike_ms("\"2024-01-02T01:00:00+01:00\""),
            Some(1_704_153_600_000)
        );
        assert_eq!(timelike_ms("\"next tuesday\""), None);
    }
}
