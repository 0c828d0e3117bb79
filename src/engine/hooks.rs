//! A framework's hooks into the generic operations on a store's tables (rollback, reset, exact
//! import): one function per hook, dispatching to the framework that has one.

use sqlx::PgConnection;

use super::Error;
use super::backup::BackupInfo;
use super::framework::{Event, Framework, StoreVersion};
use super::frameworks::{meltano, sqlmesh, statekeeper};
use super::store::Store;

/// The store's version, `None` when its framework has not created it yet. Fails when the store
/// cannot be operated on safely (a newer or changed statekeeper schema).
pub(crate) async fn read_version(
    store: &Store,
    conn: &mut PgConnection,
) -> Result<Option<StoreVersion>, Error> {
    match store.framework() {
        Framework::Statekeeper => statekeeper::read_version(store, conn).await,
        Framework::Sqlmesh => sqlmesh::read_version(store, conn).await,
        Framework::Meltano => meltano::read_version(store, conn).await,
    }
}

/// Refuses a backup that cannot be restored into this store.
pub(crate) async fn check_backup(
    store: &Store,
    conn: &mut PgConnection,
    backup: &BackupInfo,
) -> Result<(), Error> {
    match store.framework() {
        Framework::Statekeeper => statekeeper::check_backup(store, conn, backup).await,
        Framework::Sqlmesh | Framework::Meltano => Ok(()),
    }
}

/// Recreates the tables of a backup whose structure differs from the live store's (rolling back
/// across an upgrade). Called with the live tables already dropped.
pub(crate) async fn rebuild_tables(
    store: &Store,
    conn: &mut PgConnection,
    backup: &BackupInfo,
) -> Result<(), Error> {
    match store.framework() {
        Framework::Statekeeper => statekeeper::rebuild_tables(store, conn, backup).await,
        Framework::Sqlmesh | Framework::Meltano => {
            super::backup::recreate_tables(conn, store.schema(), &backup.id).await
        }
    }
}

/// Keeps what must survive a restore (statekeeper: the migration history recorded since the
/// backup). Runs before the live rows are replaced.
pub(crate) async fn before_restore(store: &Store, conn: &mut PgConnection) -> Result<(), Error> {
    match store.framework() {
        Framework::Statekeeper => statekeeper::carry_migration_events(store, conn).await,
        Framework::Sqlmesh | Framework::Meltano => Ok(()),
    }
}

/// Puts back what `before_restore` kept. Runs after the backup's rows were loaded.
pub(crate) async fn after_restore(store: &Store, conn: &mut PgConnection) -> Result<(), Error> {
    match store.framework() {
        Framework::Statekeeper => statekeeper::restore_migration_events(store, conn).await,
        Framework::Sqlmesh | Framework::Meltano => Ok(()),
    }
}

/// Records an operation in the store's own history, where the framework has one.
pub(crate) async fn record_event(
    store: &Store,
    conn: &mut PgConnection,
    event: &Event<'_>,
) -> Result<(), Error> {
    match store.framework() {
        Framework::Statekeeper => statekeeper::record_event(store, conn, event).await,
        Framework::Sqlmesh | Framework::Meltano => Ok(()),
    }
}
