//! Validated, always-quoted SQL identifiers for schema names that come from users.

use std::fmt;

use super::Error;

/// PostgreSQL truncates identifiers longer than this many bytes (NAMEDATALEN - 1).
pub const MAX_IDENTIFIER_BYTES: usize = 63;
/// Separator between a store schema and the id of one of its backups.
pub const BACKUP_INFIX: &str = "__backup_";
/// Separator between a store schema and the id of a scratch schema `state verify` restores into.
pub const SCRATCH_INFIX: &str = "__verify_";
/// Suffix of the schema beside a store that holds statekeeper's own bookkeeping about it (the
/// reports its Jobs leave, `engine::job_report`), never a framework's tables.
pub const REPORTS_SUFFIX: &str = "__statekeeper";
/// Backup ids are UTC timestamps with milliseconds: `YYYYMMDDHHMMSSmmm`.
pub const BACKUP_ID_LEN: usize = 17;
/// The longest store schema whose backup schema names still fit in 63 bytes.
pub const MAX_SCHEMA_BYTES: usize = MAX_IDENTIFIER_BYTES - BACKUP_INFIX.len() - BACKUP_ID_LEN;

/// A state store schema name: lower-case letters, digits and `_`, starting with a letter or
/// `_`, short enough that `<schema>__backup_<id>` never exceeds PostgreSQL's identifier limit.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SchemaName(String);

impl SchemaName {
    pub fn new(name: &str) -> Result<Self, Error> {
        let invalid = |reason: String| Error::InvalidSchemaName {
            name: printable(name),
            reason,
        };
        if name.is_empty() {
            return Err(invalid("it is empty".into()));
        }
        if name.len() > MAX_SCHEMA_BYTES {
            return Err(invalid(format!(
                "it is {} bytes long; at most {MAX_SCHEMA_BYTES} are allowed so that backup schemas \
                 named <schema>{BACKUP_INFIX}<{BACKUP_ID_LEN}-digit id> fit PostgreSQL's \
                 {MAX_IDENTIFIER_BYTES}-byte identifier limit",
                name.len()
            )));
        }
        let mut chars = name.chars();
        let first_ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
        if !first_ok || !chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_') {
            return Err(invalid(
                "use only lower-case letters, digits and '_', starting with a letter or '_'".into(),
            ));
        }
        if name.starts_with("pg_") || name == "information_schema" {
            return Err(invalid(
                "names starting with 'pg_' and 'information_schema' are reserved by PostgreSQL"
                    .into(),
            ));
        }
        if name.contains(BACKUP_INFIX) {
            return Err(invalid(format!(
                "'{BACKUP_INFIX}' is reserved for backup schemas"
            )));
        }
        if name.contains(SCRATCH_INFIX) {
            return Err(invalid(format!(
                "'{SCRATCH_INFIX}' is reserved for the scratch schemas of `state verify`"
            )));
        }
        if name.contains(REPORTS_SUFFIX) {
            return Err(invalid(format!(
                "'{REPORTS_SUFFIX}' is reserved for the schema statekeeper keeps beside a store"
            )));
        }
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The schema, quoted for use in SQL text.
    pub fn quoted(&self) -> String {
        quote_ident(&self.0)
    }

    /// The name of the backup schema with the given id.
    pub fn backup_schema(&self, backup_id: &str) -> String {
        format!("{}{BACKUP_INFIX}{backup_id}", self.0)
    }

    /// The scratch schema `state verify` restores into, beside the store: as long as a backup
    /// schema's name (the infixes have the same length).
    pub fn scratch_schema(&self, id: &str) -> Self {
        Self(format!("{}{SCRATCH_INFIX}{id}", self.0))
    }

    /// The schema beside the store where statekeeper keeps its own bookkeeping about it (Jobs'
    /// reports): shorter than a backup schema's name, so it always fits.
    pub fn reports_schema(&self) -> String {
        format!("{}{REPORTS_SUFFIX}", self.0)
    }

    /// The backup schema with the given (validated) id, as a schema of its own: only the engine
    /// reads a backup as a store (a restore in part exports from it), so only it may name one.
    pub(crate) fn backup_of(&self, backup_id: &str) -> Self {
        Self(self.backup_schema(backup_id))
    }

    /// The prefix every backup schema of this store starts with.
    pub fn backup_prefix(&self) -> String {
        format!("{}{BACKUP_INFIX}", self.0)
    }
}

impl fmt::Display for SchemaName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Quotes any identifier for SQL text, doubling embedded quotes.
pub fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// Quotes any text as a SQL string literal, doubling embedded quotes (standard_conforming_strings
/// is on in every supported PostgreSQL, so backslashes are plain characters).
pub fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// Keeps error messages on one readable line whatever a hostile name contains.
fn printable(name: &str) -> String {
    let shown: String = name.chars().take(80).collect();
    shown.escape_debug().to_string()
}

/// `"schema"."a", "schema"."b"`
pub(crate) fn qualified_list(schema: &str, tables: &[String]) -> String {
    tables
        .iter()
        .map(|t| format!("{}.{}", quote_ident(schema), quote_ident(t)))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for ok in [
            "sqlmesh",
            "_state",
            "state_2",
            &"a".repeat(MAX_SCHEMA_BYTES),
        ] {
            assert_eq!(SchemaName::new(ok).expect(ok).as_str(), ok);
        }
    }

    #[test]
    fn rejects_hostile_and_oversized_names() {
        let too_long = "a".repeat(MAX_SCHEMA_BYTES + 1);
        for bad in [
            "",
            "Upper",
            "1abc",
            "a-b",
            "a\"; DROP SCHEMA public CASCADE; --",
            "a b",
            "pg_catalog",
            "information_schema",
            "x__backup_1",
            "x__verify_1",
            "x__statekeeper",
            "x__statekeeper_2",
            "é",
            too_long.as_str(),
        ] {
            let err = SchemaName::new(bad).expect_err(bad);
            assert!(
                matches!(err, Error::InvalidSchemaName { .. }),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn longest_backup_name_fits_identifier_limit() {
        let schema = SchemaName::new(&"s".repeat(MAX_SCHEMA_BYTES)).unwrap();
        assert_eq!(
            schema.backup_schema(&"9".repeat(BACKUP_ID_LEN)).len(),
            MAX_IDENTIFIER_BYTES
        );
    }

    #[test]
    fn reports_schema_fits_and_is_no_store_name() {
        let schema = SchemaName::new(&"s".repeat(MAX_SCHEMA_BYTES)).unwrap();
        assert!(schema.reports_schema().len() <= MAX_IDENTIFIER_BYTES);
        assert!(SchemaName::new(&schema.reports_schema()).is_err());
    }

    #[test]
    fn quoting_doubles_quotes() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
