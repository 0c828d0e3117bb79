//! The checks every operation makes before it acts on a store: that it exists at a version the
//! operation supports, and that the schema (or database) does not hold another framework's store
//! instead. One home for each rule, used alike by the operations and by `plan`.

use sqlx::{AssertSqlSafe, PgConnection};

use super::Error;
use super::framework::StoreVersion;
use super::frameworks;
use super::hooks;
use super::identifier::quote_ident;
use super::store::Store;

/// Refuses an upgrade to a version below the store's: going back is a rollback.
pub(crate) fn refuse_downgrade(target: i32, current: i32) -> Result<(), Error> {
    if target < current {
        return Err(Error::DowngradeRefused { target, current });
    }
    Ok(())
}

/// Refuses a reset the store does not allow (the first of reset's two yeses).
pub(crate) fn refuse_reset_not_allowed(allow_reset: bool) -> Result<(), Error> {
    if allow_reset {
        return Ok(());
    }
    Err(Error::ResetRefused(
        "this store does not allow reset (set allowReset: true on the StateStore, or pass \
         --allow-reset to the CLI)"
            .into(),
    ))
}

impl Store {
    /// The store's version, or `NotInitialized` (or, when the schema holds another framework's
    /// tables, an error naming the framework to use).
    pub(crate) async fn require_initialized(
        &self,
        conn: &mut PgConnection,
    ) -> Result<StoreVersion, Error> {
        match hooks::read_version(self, conn).await? {
            Some(version) => Ok(version),
            None => {
                self.refuse_other_framework(conn).await?;
                Err(self.not_initialized())
            }
        }
    }

    /// The error for a store whose tables do not exist yet.
    pub(crate) fn not_initialized(&self) -> Error {
        Error::NotInitialized {
            schema: self.schema().to_string(),
            framework: self.profile().display_name.into(),
            hint: self.profile().not_initialized_hint.into(),
        }
    }

    /// The version an upgrade (or init) goes to: `target`, or the latest this binary ships.
    pub(crate) fn upgrade_target(&self, target: Option<i32>) -> Result<i32, Error> {
        let latest = self.chain().latest();
        match target {
            None => Ok(latest),
            Some(t) if (1..=latest).contains(&t) => Ok(t),
            Some(t) => Err(Error::UnknownTargetVersion { target: t, latest }),
        }
    }

    /// Refuses copying a store of another framework into this one.
    pub(crate) fn refuse_copy_across_frameworks(&self, source: &Store) -> Result<(), Error> {
        if source.framework() == self.framework() {
            return Ok(());
        }
        Err(Error::InvalidOperation(format!(
            "cannot copy a {} store into a {} store: both must be of one framework",
            source.profile().display_name,
            self.profile().display_name
        )))
    }

    /// For a store that does not exist: fails when its schema holds another framework's store,
    /// or when the database holds another framework's store and none of this framework's, naming
    /// the options to use. A missing `--framework` must not act on (or create) the wrong store.
    pub(crate) async fn refuse_other_framework(
        &self,
        conn: &mut PgConnection,
    ) -> Result<(), Error> {
        self.refuse_other_framework_with(conn, "").await
    }

    async fn refuse_other_framework_with(
        &self,
        conn: &mut PgConnection,
        hint: &'static str,
    ) -> Result<(), Error> {
        let stores = frameworks::find_stores(conn).await?;
        if let Some(other) = stores
            .iter()
            .find(|s| s.schema == self.schema().as_str() && s.framework != self.framework())
        {
            return Err(Error::WrongFramework {
                schema: self.schema().to_string(),
                found: other.framework.profile().display_name.into(),
                expected: self.profile().display_name.into(),
                flag: other.framework.as_str().into(),
            });
        }
        if self.allows_other_frameworks() || stores.iter().any(|s| s.framework == self.framework())
        {
            return Ok(());
        }
        match stores.first() {
            Some(other) => Err(Error::OtherFrameworkInDatabase {
                schema: self.schema().to_string(),
                expected: self.profile().display_name,
                found: other.to_string(),
                names_it: format!(
                    "{} (on a StateStore: {})",
                    other.flags(),
                    other.spec_fields()
                ),
                hint,
            }),
            None => Ok(()),
        }
    }

    /// Before creating statekeeper's schema: refuses a database that holds another framework's
    /// store (and none of statekeeper's), unless this handle allows it.
    pub(crate) async fn refuse_creating_beside_other_framework(
        &self,
        conn: &mut PgConnection,
    ) -> Result<(), Error> {
        self.refuse_other_framework_with(
            conn,
            "; to create statekeeper's own schema beside it anyway: `statekeeper state init --force`",
        )
        .await
    }

    /// Why this store's schema is missing, and where the database keeps state instead.
    pub async fn schema_not_found(&self) -> Error {
        let elsewhere = async {
            let mut conn = self.pool().acquire().await?;
            frameworks::find_stores(&mut conn).await
        }
        .await
        .unwrap_or_default();
        let elsewhere = if elsewhere.is_empty() {
            format!(
                " (nor any other state store): {}",
                self.profile().not_initialized_hint
            )
        } else {
            format!(
                "; it holds {}",
                elsewhere
                    .iter()
                    .map(|s| format!("{s} ({})", s.flags()))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        Error::SchemaNotFound {
            schema: self.schema().to_string(),
            elsewhere,
        }
    }

    /// The verified version of statekeeper's schema, refusing stores older than `required`.
    pub(crate) async fn require_version(
        &self,
        conn: &mut PgConnection,
        required: i32,
        operation: &str,
    ) -> Result<i32, Error> {
        let current = self.require_initialized(conn).await?.schema_version;
        if current < required {
            return Err(Error::SchemaTooOld {
                schema: self.schema().to_string(),
                current,
                required,
                operation: operation.to_owned(),
            });
        }
        Ok(current)
    }
}

/// Fails with the names in `wanted` that the store does not hold (its environments, Meltano's
/// state IDs).
pub(crate) async fn refuse_unknown_environments(
    store: &Store,
    conn: &mut PgConnection,
    wanted: &[String],
) -> Result<(), Error> {
    let entities = &store.profile().entities;
    let missing: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT w FROM unnest($1::text[]) w WHERE NOT EXISTS \
         (SELECT 1 FROM {}.{} e WHERE e.{} = w) ORDER BY 1",
        store.schema().quoted(),
        quote_ident(entities.table),
        quote_ident(entities.key)
    )))
    .bind(wanted)
    .fetch_all(conn)
    .await?;
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::UnknownEnvironments {
            what: entities.noun,
            names: missing,
        })
    }
}
