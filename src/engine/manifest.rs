//! The manifest an export carries at its end: each table's rows and the sha256 of its value as
//! written. An import checks the file against it (a file changed after it was written is refused
//! and the table named), and `state verify` also compares it with what a restore loaded.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The document key of the manifest, the last of an export (formats whose readers ignore keys
/// they do not know: statekeeper's, the exact one and SQLMesh's).
pub const MANIFEST_KEY: &str = "manifest";

/// The only digest algorithm so far.
const ALGORITHM: &str = "sha256";

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub algorithm: String,
    /// Rows per table (or section), as the export counted them.
    pub rows: BTreeMap<String, u64>,
    /// The hex sha256 of each table's (or section's) JSON value, byte for byte as written.
    pub sha256: BTreeMap<String, String>,
}

impl Manifest {
    pub(crate) fn new(rows: BTreeMap<String, u64>, sha256: BTreeMap<String, String>) -> Self {
        Manifest {
            algorithm: ALGORITHM.into(),
            rows,
            sha256,
        }
    }

    /// Whether the digests of what was read are the ones the export recorded; the error names
    /// the first table that differs.
    pub(crate) fn check(&self, read: &BTreeMap<String, String>) -> Result<(), String> {
        if self.algorithm != ALGORITHM {
            return Err(format!(
                "its manifest uses the digest algorithm \"{}\", which this statekeeper does not know",
                self.algorithm.escape_debug()
            ));
        }
        for (table, recorded) in &self.sha256 {
            match read.get(table) {
                Some(digest) if digest == recorded => {}
                Some(digest) => {
                    return Err(format!(
                        "table \"{table}\" is not what was exported: its content has sha256 \
                         {digest}, the export's manifest records {recorded} (the file was \
                         changed after it was written)"
                    ));
                }
                None => {
                    return Err(format!(
                        "table \"{table}\" of the export's manifest is missing from the file"
                    ));
                }
            }
        }
        match read.keys().find(|table| !self.sha256.contains_key(*table)) {
            Some(table) => Err(format!(
                "table \"{table}\" is in the file but not in the export's manifest (the file was \
                 changed after it was written)"
            )),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digests(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn names_the_table_that_differs_is_missing_or_was_added() {
        let manifest = Manifest::new(BTreeMap::new(), digests(&[("a", "1"), ("b", "2")]));
        assert!(manifest.check(&digests(&[("a", "1"), ("b", "2")])).is_ok());
        let changed = manifest
            .check(&digests(&[("a", "1"), ("b", "3")]))
            .unwrap_err();
        assert!(
            changed.starts_with("table \"b\" is not what was exported"),
            "{changed}"
        );
        let missing = manifest.check(&digests(&[("a", "1")])).unwrap_err();
        assert!(
            missing.contains("\"b\" of the export's manifest is missing"),
            "{missing}"
        );
        let added = manifest
            .check(&digests(&[("a", "1"), ("b", "2"), ("c", "4")]))
            .unwrap_err();
        assert!(added.contains("\"c\" is in the file but not in"), "{added}");
        let mut unknown = manifest.clone();
        unknown.algorithm = "md5".into();
        assert!(
            unknown
                .check(&digests(&[]))
                .unwrap_err()
                .contains("\"md5\"")
        );
    }
}
