//! The state engine against a real PostgreSQL.

mod support;

use std::time::Duration;

use sqlx::{AssertSqlSafe, Row};
use statekeeper::engine::{
    ConnectionSettings, Error, Migration, MigrationChain, ResetApproval, SchemaName, Store,
};
use support::{TestDb, populate_v1, populate_v3, schemas, snapshot};

/// Every table of a store at the latest version: current state, the ledger and history.
fn all_tables() -> Vec<&'static str> {
    let mut tables = support::CURRENT_STATE_TABLES.to_vec();
    tables.extend([
        "state_versions",
        "plan_runs",
        "virtual_environment_ref_events",
        "reconcile_events",
        "state_migration_events",
        "state_operation_events",
    ]);
    tables
}

/// The shipped chain plus a fourth step that fails halfway through.
fn chain_with_failing_step() -> MigrationChain {
    let mut steps = MigrationChain::shipped().steps().to_vec();
    steps.push(Migration {
        version: 4,
        description: "deliberately failing step",
        sql: "CREATE TABLE half_done (id int); ALTER TABLE model_versions ADD COLUMN extra int; SELECT 1 / 0;",
    });
    MigrationChain::new(steps)
}

#[tokio::test]
async fn init_is_idempotent_and_creates_every_table() {
    let db = TestDb::new().await;
    let store = db.store("sqlmesh_state").await;

    let first = store.init(None).await.unwrap();
    assert!(!first.already_initialized);
    assert_eq!((first.from_version, first.to_version), (0, 3));
    assert_eq!(first.applied.len(), 3);

    let mut conn = db.conn().await;
    let before = snapshot(&mut conn, "sqlmesh_state").await;
    for table in all_tables() {
        assert!(before.contains_key(table), "missing table {table}");
    }
    assert_eq!(before.len(), all_tables().len());

    let second = store.init(None).await.unwrap();
    assert!(second.already_initialized);
    assert!(second.applied.is_empty());
    assert_eq!(second.to_version, 3);
    assert_eq!(snapshot(&mut conn, "sqlmesh_state").await, before);

    let status = store.status().await.unwrap();
    assert!(status.initialized);
    assert_eq!(
        (status.current_version, status.latest_version),
        (3, Some(3))
    );
    assert!(status.pending.is_empty());
    assert_eq!(status.applied.len(), 3);
    assert_eq!(status.counts["model_versions"], 0);
    assert_eq!(
        status.counts["state_migration_events"], 1,
        "init is recorded"
    );
    assert!(status.backups.is_empty());
}

#[tokio::test]
async fn status_of_an_empty_database_says_not_initialized() {
    let db = TestDb::new().await;
    let status = db.store("state").await.status().await.unwrap();
    assert!(!status.initialized);
    assert_eq!(status.current_version, 0);
    assert_eq!(status.pending.len(), 3);
    assert!(status.counts.is_empty());
}

#[tokio::test]
async fn upgrade_through_every_version_preserves_data() {
    let db = TestDb::new().await;
    let store = db.store("state").await;
    let mut conn = db.conn().await;

    store.init(Some(1)).await.unwrap();
    populate_v1(&mut conn, "state").await;
    let v1_data = snapshot(&mut conn, "state").await;

    let to_v2 = store.upgrade(Some(2)).await.unwrap();
    assert_eq!((to_v2.from_version, to_v2.to_version), (1, 2));
    assert_eq!(to_v2.applied.len(), 1);
    let backup = to_v2.backup.expect("upgrade backs up first");
    assert_eq!(backup.schema_version, 1);
    assert_eq!(backup.reason, "pre-upgrade");
    assert!(backup.rows > 40);
    // The backup is an exact copy of the v1 store.
    let backup_schema = format!("state__backup_{}", backup.id);
    let mut backup_data = snapshot(&mut conn, &backup_schema).await;
    backup_data.remove("_statekeeper_backup");
    assert_eq!(backup_data, v1_data);

    let to_v3 = store.upgrade(None).await.unwrap();
    assert_eq!((to_v3.from_version, to_v3.to_version), (2, 3));
    populate_v3(&mut conn, "state").await;

    let after = snapshot(&mut conn, "state").await;
    for (table, rows) in &v1_data {
        if table != "state_versions" {
            assert_eq!(&after[table], rows, "{table} changed during upgrade");
        }
    }
    let status = store.status().await.unwrap();
    assert_eq!(status.current_version, 3);
    assert_eq!(status.backups.len(), 2);
    assert_eq!(status.counts["model_version_intervals"], 40);

    let events: Vec<(String, i32, i32)> = sqlx::query_as(
        "SELECT operation, from_version, to_version FROM state.state_migration_events ORDER BY id",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert_eq!(
        events,
        vec![("upgrade".to_string(), 1, 2), ("upgrade".to_string(), 2, 3)],
        "each upgrade is recorded once the history table exists"
    );

    let noop = store.upgrade(None).await.unwrap();
    assert!(noop.applied.is_empty() && noop.backup.is_none());
    assert!(matches!(
        store.upgrade(Some(1)).await,
        Err(Error::DowngradeRefused { .. })
    ));
    assert!(matches!(
        store.upgrade(Some(9)).await,
        Err(Error::UnknownTargetVersion { .. })
    ));
}

#[tokio::test]
async fn upgrade_of_an_uninitialized_store_is_refused() {
    let db = TestDb::new().await;
    let err = db.store("state").await.upgrade(None).await.unwrap_err();
    assert!(matches!(err, Error::NotInitialized { .. }));
    assert!(err.to_string().contains("statekeeper state init"));
}

#[tokio::test]
async fn rollback_restores_exactly_and_can_itself_be_undone() {
    let db = TestDb::new().await;
    let store = db.store("state").await;
    let mut conn = db.conn().await;
    store.init(Some(2)).await.unwrap();
    populate_v1(&mut conn, "state").await;
    let before_upgrade = snapshot(&mut conn, "state").await;

    let upgrade = store.upgrade(None).await.unwrap();
    populate_v3(&mut conn, "state").await;
    sqlx::query("DELETE FROM state.virtual_environments WHERE name = 'dev_old'")
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::query("UPDATE state.model_versions SET version = 'changed'")
        .execute(&mut conn)
        .await
        .unwrap();
    let before_rollback = snapshot(&mut conn, "state").await;

    let rollback = store.rollback(None).await.unwrap();
    assert_eq!(
        rollback.restored_backup.id,
        upgrade.backup.as_ref().unwrap().id
    );
    assert_eq!((rollback.from_version, rollback.to_version), (3, 2));
    let pre = rollback
        .pre_rollback_backup
        .clone()
        .expect("current state is kept");

    let after = snapshot(&mut conn, "state").await;
    for (table, rows) in &before_upgrade {
        if table == "state_migration_events" {
            continue;
        }
        assert_eq!(&after[table], rows, "{table} not restored exactly");
    }
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        before_upgrade.keys().collect::<Vec<_>>(),
        "tables of version 3 are gone"
    );
    // History is append-only: the upgrade and the rollback are both recorded.
    let ops: Vec<String> =
        sqlx::query_scalar("SELECT operation FROM state.state_migration_events ORDER BY id")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    assert_eq!(ops, vec!["init", "upgrade", "rollback"]);
    assert_eq!(store.status().await.unwrap().current_version, 2);

    // Identity sequences continue after the restored ids.
    sqlx::query(
        "INSERT INTO state.model_versions (name, fingerprint, version) VALUES ('new', 'x', 'v')",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    sqlx::query("DELETE FROM state.model_versions WHERE name = 'new'")
        .execute(&mut conn)
        .await
        .unwrap();

    // Undo the rollback with the backup it took.
    store.rollback(Some(&pre.id)).await.unwrap();
    let undone = snapshot(&mut conn, "state").await;
    for (table, rows) in &before_rollback {
        if table != "state_migration_events" {
            assert_eq!(&undone[table], rows, "{table} after undoing the rollback");
        }
    }
    assert_eq!(store.status().await.unwrap().current_version, 3);
}

#[tokio::test]
async fn rollback_errors_are_clear() {
    let db = TestDb::new().await;
    let store = db.store("state").await;
    store.init(None).await.unwrap();
    assert!(matches!(
        store.rollback(None).await,
        Err(Error::NoBackups { .. })
    ));
    assert!(matches!(
        store.rollback(Some("20990101000000000")).await,
        Err(Error::BackupNotFound { .. })
    ));
    let hostile = store
        .rollback(Some("1; DROP SCHEMA state"))
        .await
        .unwrap_err();
    assert!(
        matches!(hostile, Error::IncompatibleBackup { .. }),
        "{hostile}"
    );
    assert!(store.status().await.unwrap().initialized);
}

#[tokio::test]
async fn a_failing_step_leaves_the_store_and_database_unchanged() {
    let db = TestDb::new().await;
    let mut conn = db.conn().await;
    let store = db.store("state").await;
    store.init(None).await.unwrap();
    populate_v1(&mut conn, "state").await;
    populate_v3(&mut conn, "state").await;
    let before = snapshot(&mut conn, "state").await;
    let schemas_before = schemas(&mut conn).await;

    let failing = store.clone().with_chain(chain_with_failing_step());
    let err = failing.upgrade(None).await.unwrap_err();
    assert!(
        matches!(err, Error::MigrationFailed { version: 4, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("nothing was changed"));

    assert_eq!(snapshot(&mut conn, "state").await, before);
    assert_eq!(
        schemas(&mut conn).await,
        schemas_before,
        "no backup schema left behind"
    );
    let extra: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.columns WHERE table_schema = 'state' AND column_name = 'extra'",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(extra, 0);
}

/// The upgrade's backup is copied on a second connection, from the upgrade's snapshot, while the
/// steps run (a step that rewrites a table waits for the copy); with a pool of one connection it
/// is made in the upgrade's own transaction. Either way it holds the store as it was and carries
/// the request's tag, which commits with the upgrade.
#[tokio::test]
async fn an_upgrade_backs_up_beside_its_steps_or_in_its_own_transaction() {
    let db = TestDb::new().await;
    let mut conn = db.conn().await;
    let mut steps = MigrationChain::shipped().steps().to_vec();
    steps.push(Migration {
        version: 4,
        description: "a step that rewrites a table",
        sql: "ALTER TABLE model_versions ADD COLUMN extra int NOT NULL DEFAULT 1, \
              ALTER COLUMN created_at TYPE timestamptz USING created_at + interval '1 second'",
    });
    for (schema, connections, beside) in [("beside", 4, true), ("alone", 1, false)] {
        let pool = ConnectionSettings::from_url(&db.url)
            .unwrap()
            .with_max_connections(connections)
            .connect()
            .await
            .unwrap();
        let request = format!("request-{schema}");
        let store = Store::new(pool, SchemaName::new(schema).unwrap())
            .with_chain(MigrationChain::new(steps.clone()))
            .with_operation_id(&request);
        store.init(Some(3)).await.unwrap();
        populate_v1(&mut conn, schema).await;
        populate_v3(&mut conn, schema).await;
        let before = snapshot(&mut conn, schema).await;

        let report = store.upgrade(None).await.unwrap();
        assert_eq!((report.from_version, report.to_version), (3, 4));
        let backup = report.backup.expect("the upgrade backs up first");
        assert_eq!(backup.operation.as_deref(), Some(request.as_str()));
        let tagged = store.backup_of_operation(&request).await.unwrap();
        assert_eq!(tagged.map(|b| b.id), Some(backup.id.clone()));
        let backup_schema = format!("{schema}__backup_{}", backup.id);
        let mut copied = snapshot(&mut conn, &backup_schema).await;
        copied.remove("_statekeeper_backup");
        assert_eq!(
            copied, before,
            "{schema}: the backup is the store before the upgrade"
        );
        let rewritten: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT count(*) FROM {schema}.model_versions WHERE extra = 1"
        )))
        .fetch_one(&mut conn)
        .await
        .unwrap();
        assert_eq!(rewritten as usize, before["model_versions"].len());

        // The transaction that created the backup's schema is the upgrade's, or another.
        let same_transaction: bool = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT (SELECT xmin FROM pg_namespace WHERE nspname = $1) = \
                    (SELECT xmin FROM {schema}.state_versions WHERE version = 4)"
        )))
        .bind(&backup_schema)
        .fetch_one(&mut conn)
        .await
        .unwrap();
        assert_eq!(same_transaction, !beside, "{schema}");
    }
}

#[tokio::test]
async fn a_failing_middle_step_applies_none_of_the_steps() {
    let db = TestDb::new().await;
    let mut conn = db.conn().await;
    let mut steps = MigrationChain::shipped().steps().to_vec();
    steps[1].sql = "CREATE TABLE plan_runs (id int); CREATE TABLE plan_runs (id int);";
    let broken = db
        .store("state")
        .await
        .with_chain(MigrationChain::new(steps));
    broken.init(Some(1)).await.unwrap();
    populate_v1(&mut conn, "state").await;
    let before = snapshot(&mut conn, "state").await;

    let err = broken.upgrade(None).await.unwrap_err();
    assert!(
        matches!(err, Error::MigrationFailed { version: 2, .. }),
        "{err}"
    );
    assert_eq!(snapshot(&mut conn, "state").await, before);
    assert_eq!(
        db.store("state")
            .await
            .status()
            .await
            .unwrap()
            .current_version,
        1
    );
}

#[tokio::test]
async fn reset_needs_both_approvals_and_keeps_a_backup() {
    let db = TestDb::new().await;
    let mut conn = db.conn().await;
    let store = db.store("state").await;
    store.init(None).await.unwrap();
    populate_v1(&mut conn, "state").await;
    let before = snapshot(&mut conn, "state").await;

    for approval in [
        ResetApproval {
            allow_reset: false,
            approved: false,
        },
        ResetApproval {
            allow_reset: false,
            approved: true,
        },
        ResetApproval {
            allow_reset: true,
            approved: false,
        },
    ] {
        let err = store.reset(approval).await.unwrap_err();
        assert!(matches!(err, Error::ResetRefused(_)), "{err}");
        assert_eq!(
            snapshot(&mut conn, "state").await,
            before,
            "refused reset changed data"
        );
    }

    let report = store
        .reset(ResetApproval {
            allow_reset: true,
            approved: true,
        })
        .await
        .unwrap();
    assert_eq!(report.tables_reset, all_tables().len());
    let backup = report.backup.expect("reset keeps a backup");
    assert_eq!(backup.reason, "pre-reset");
    assert!(snapshot(&mut conn, "state").await.is_empty());
    assert!(!store.status().await.unwrap().initialized);

    store.rollback(Some(&backup.id)).await.unwrap();
    let restored = snapshot(&mut conn, "state").await;
    for (table, rows) in &before {
        if table != "state_migration_events" {
            assert_eq!(&restored[table], rows);
        }
    }
}

#[tokio::test]
async fn schema_names_that_are_sql_keywords_work_because_they_are_quoted() {
    let db = TestDb::new().await;
    let store = db.store("user").await;
    store.init(None).await.unwrap();
    store.upgrade(None).await.unwrap();
    assert_eq!(store.status().await.unwrap().current_version, 3);
}

#[tokio::test]
async fn hostile_schema_names_are_refused_before_any_sql() {
    for name in [
        "x\"; DROP SCHEMA public CASCADE; --",
        "Robert'); --",
        "a.b",
        "pg_temp",
    ] {
        let err = SchemaName::new(name).unwrap_err();
        assert!(matches!(err, Error::InvalidSchemaName { .. }));
        assert!(!err.to_string().contains('\n'));
    }
    let too_long = "s".repeat(38);
    let err = SchemaName::new(&too_long).unwrap_err();
    assert!(err.to_string().contains("at most 37"), "{err}");
}

#[tokio::test]
async fn wrong_password_is_a_clear_error_without_the_password() {
    let db = TestDb::new().await;
    let real = db.password();
    let wrong = "hunter2-wrong-password";
    let url = db.url.replacen(&real, wrong, 1);
    let err = ConnectionSettings::from_url(&url)
        .unwrap()
        .connect()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::AuthenticationFailed { .. }), "{err}");
    let text = format!("{err} {err:?}");
    assert!(!text.contains(wrong) && !text.contains(&real), "{text}");
    assert!(text.contains("postgres"), "names the user: {text}");
}

#[tokio::test]
async fn unreachable_and_missing_databases_are_classified() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let err = ConnectionSettings::from_url(&format!("postgres://u:secretpw@127.0.0.1:{port}/db"))
        .unwrap()
        .with_connect_timeout(Duration::from_secs(3))
        .connect()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unreachable { .. }), "{err}");
    assert!(!err.to_string().contains("secretpw"));

    let db = TestDb::new().await;
    let missing = db.url.replace(&db.name, "no_such_db");
    let err = ConnectionSettings::from_url(&missing)
        .unwrap()
        .connect()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::DatabaseNotFound { .. }), "{err}");

    let err = ConnectionSettings::from_url("postgres://u:pw@host:notaport/db")
        .err()
        .unwrap();
    assert!(matches!(err, Error::InvalidConnection(_)));
    assert!(!err.to_string().contains("pw@"));
}

#[tokio::test]
async fn checksum_drift_and_newer_schemas_are_refused() {
    let db = TestDb::new().await;
    let mut conn = db.conn().await;
    let store = db.store("state").await;
    store.init(Some(2)).await.unwrap();

    sqlx::query("UPDATE state.state_versions SET checksum = 'tampered' WHERE version = 1")
        .execute(&mut conn)
        .await
        .unwrap();
    let before = snapshot(&mut conn, "state").await;
    for err in [
        store.status().await.unwrap_err(),
        store.upgrade(None).await.unwrap_err(),
        store.init(None).await.unwrap_err(),
    ] {
        assert!(
            matches!(err, Error::ChecksumMismatch { version: 1, .. }),
            "{err}"
        );
    }
    assert_eq!(
        snapshot(&mut conn, "state").await,
        before,
        "nothing re-applied"
    );

    sqlx::query("DELETE FROM state.state_versions")
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::query("INSERT INTO state.state_versions VALUES (7, 'abc', 'from the future', now())")
        .execute(&mut conn)
        .await
        .unwrap();
    let err = store.upgrade(None).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::SchemaNewer {
                current: 7,
                latest: 3,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(err.reason(), "SchemaNewerThanOperator");
}

#[tokio::test]
async fn operations_on_one_store_are_serialized_by_its_lock() {
    let db = TestDb::new().await;
    let store = db.store("state").await;
    store.init(Some(1)).await.unwrap();

    let (a, b) = tokio::join!(store.upgrade(None), store.upgrade(None));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(
        a.applied.len() + b.applied.len(),
        2,
        "exactly one of two concurrent upgrades applies the steps"
    );
    assert_eq!(store.status().await.unwrap().backups.len(), 1);

    // Another session holds the store's lock: a short lock timeout reports Busy.
    let mut holder = support::hold_store_lock(&db, "state").await;
    let busy = store
        .clone()
        .with_lock_timeout(Duration::from_millis(200))
        .reset(ResetApproval {
            allow_reset: true,
            approved: true,
        })
        .await
        .unwrap_err();
    assert!(matches!(busy, Error::Busy { .. }), "{busy}");
    sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
    assert!(store.status().await.unwrap().initialized);
}

#[tokio::test]
async fn backups_are_listed_and_dropped() {
    let db = TestDb::new().await;
    let store = db.store("state").await;
    let other = db.store("state_other").await;
    store.init(Some(1)).await.unwrap();
    other.init(Some(1)).await.unwrap();
    store.upgrade(Some(2)).await.unwrap();
    store.upgrade(Some(3)).await.unwrap();
    other.upgrade(None).await.unwrap();

    let backups = store.backups().await.unwrap();
    assert_eq!(
        backups.len(),
        2,
        "only this store's backups, not state_other's"
    );
    assert_eq!(
        backups.iter().map(|b| b.schema_version).collect::<Vec<_>>(),
        vec![1, 2]
    );
    assert!(backups[0].id < backups[1].id);

    let dropped = store.drop_backup(&backups[0].id).await.unwrap();
    assert_eq!(dropped.id, backups[0].id);
    assert_eq!(store.backups().await.unwrap().len(), 1);
    assert_eq!(other.backups().await.unwrap().len(), 1);
    let mut conn = db.conn().await;
    let exists: bool =
        sqlx::query("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1) AS e")
            .bind(format!("state__backup_{}", backups[0].id))
            .fetch_one(&mut conn)
            .await
            .unwrap()
            .get("e");
    assert!(!exists);
}

/// A backup of statekeeper's schema is a plain copy (`CREATE TABLE … AS`) of every table: the
/// same columns, with the same types, and every row. Keys, indexes and check constraints are left
/// out: statekeeper rebuilds its tables from its migrations, and a restore reads every row into
/// tables that check them, so building them would only multiply the backup's cost. A framework's
/// backup keeps them: tests/sqlmesh.rs and tests/meltano.rs rebuild tables from backups.
#[tokio::test]
async fn backups_copy_every_column_and_row() {
    let db = TestDb::new().await;
    let store = db.store("state").await;
    store.init(None).await.unwrap();
    let mut conn = db.conn().await;
    populate_v1(&mut conn, "state").await;
    let backup = store.backup().await.unwrap();
    assert_eq!(backup.reason, "manual");
    let columns = "SELECT table_name::text || '.' || column_name::text || ' ' || data_type::text
                   FROM information_schema.columns
                   WHERE table_schema = $1 AND table_name <> '_statekeeper_backup'
                   ORDER BY table_name, ordinal_position";
    let backup_schema = format!("state__backup_{}", backup.id);
    let live: Vec<String> = sqlx::query_scalar(columns)
        .bind("state")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    let copied: Vec<String> = sqlx::query_scalar(columns)
        .bind(&backup_schema)
        .fetch_all(&mut conn)
        .await
        .unwrap();
    assert!(live.len() > 60, "{live:?}");
    assert_eq!(copied, live);
    // And every row.
    let mut backed_up = snapshot(&mut conn, &backup_schema).await;
    backed_up.remove("_statekeeper_backup");
    assert_eq!(backed_up, snapshot(&mut conn, "state").await);
}

/// The test command runs this file on two PostgreSQL versions; STATEKEEPER_PG_VERSION names the
/// one a run asks for (scripts/throwaway-postgres.sh reads it too), so a run on the wrong server
/// fails here instead of passing as the other version.
#[tokio::test]
async fn the_server_is_the_postgresql_version_the_run_asks_for() {
    let db = TestDb::new().await;
    let version: String = sqlx::query_scalar("SELECT current_setting('server_version')")
        .fetch_one(&mut db.conn().await)
        .await
        .unwrap();
    println!("PostgreSQL {version}");
    if let Ok(major) = std::env::var("STATEKEEPER_PG_VERSION") {
        assert_eq!(
            version.split('.').next(),
            Some(major.as_str()),
            "STATEKEEPER_PG_VERSION={major} but the server is {version}"
        );
    }
}
