//! The janitor against a real PostgreSQL filled by the generator.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use sqlx::{AssertSqlSafe, PgConnection};
use statekeeper::engine::generator::GenerateOptions;
use statekeeper::engine::{Error, JanitorOptions, JanitorReport, Store};
use support::{TestDb, snapshot};

const SCHEMA: &str = "state";

fn options() -> JanitorOptions {
    JanitorOptions {
        keep_checkpoints: Some(3),
        checkpoint_min_age: Duration::from_secs(5 * 24 * 3600),
        version_grace: Duration::from_secs(3600),
        batch_size: 97,
        ..JanitorOptions::default()
    }
}

fn small_store() -> GenerateOptions {
    GenerateOptions {
        model_versions: 3_000,
        environments: 12,
        seed: 7,
        checkpoints_per_environment: 9,
        ..GenerateOptions::default()
    }
}

async fn generated(db: &TestDb) -> Store {
    let store = db.store(SCHEMA).await;
    store.init(None).await.unwrap();
    store.generate(&small_store()).await.unwrap();
    store
}

async fn set(conn: &mut PgConnection, sql: &str) -> BTreeSet<String> {
    sqlx::query_scalar::<_, String>(AssertSqlSafe(sql.to_owned()))
        .fetch_all(conn)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

/// What must survive, written independently of the janitor from the rules in ARCHITECTURE §3.
struct Expected {
    environments: BTreeSet<String>,
    checkpoints: BTreeSet<String>,
    model_versions: BTreeSet<String>,
    function_versions: BTreeSet<String>,
    relations: BTreeSet<String>,
}

async fn expected_survivors(conn: &mut PgConnection, o: &JanitorOptions) -> Expected {
    let keep = o.keep_checkpoints.unwrap();
    let age = o.checkpoint_min_age.as_secs();
    let grace = o.version_grace.as_secs();
    let envs = "SELECT name FROM state.virtual_environments WHERE expires_at IS NULL OR expires_at >= now() OR name = 'prod'";
    let cps = format!(
        "SELECT c.id FROM state.virtual_environment_checkpoints c WHERE c.environment IN ({envs}) AND (
           c.environment = 'prod'
           OR c.created_at >= now() - interval '{age} seconds'
           OR (SELECT count(*) FROM state.virtual_environment_checkpoints n
               WHERE n.environment = c.environment AND (n.created_at, n.id) > (c.created_at, c.id)) < {keep})"
    );
    let versions = format!(
        "SELECT id FROM state.model_versions WHERE created_at >= now() - interval '{grace} seconds'
           OR id IN (SELECT model_version_id FROM state.virtual_environment_refs WHERE environment IN ({envs}))
           OR id IN (SELECT model_version_id FROM state.virtual_environment_checkpoint_refs WHERE checkpoint_id IN ({cps}))"
    );
    let functions = format!(
        "SELECT id FROM state.function_versions WHERE created_at >= now() - interval '{grace} seconds'
           OR id IN (SELECT function_version_id FROM state.virtual_environment_function_refs WHERE environment IN ({envs}))
           OR id IN (SELECT function_version_id FROM state.virtual_environment_checkpoint_function_refs WHERE checkpoint_id IN ({cps}))"
    );
    Expected {
        environments: set(conn, envs).await,
        checkpoints: set(conn, &format!("SELECT id::text FROM ({cps}) x")).await,
        model_versions: set(conn, &format!("SELECT id::text FROM ({versions}) x")).await,
        function_versions: set(conn, &format!("SELECT id::text FROM ({functions}) x")).await,
        relations: set(
            conn,
            &format!("SELECT relation_name FROM state.physical_relations WHERE model_version_id IN ({versions})"),
        )
        .await,
    }
}

async fn actual(conn: &mut PgConnection) -> Expected {
    Expected {
        environments: set(conn, "SELECT name FROM state.virtual_environments").await,
        checkpoints: set(
            conn,
            "SELECT id::text FROM state.virtual_environment_checkpoints",
        )
        .await,
        model_versions: set(conn, "SELECT id::text FROM state.model_versions").await,
        function_versions: set(conn, "SELECT id::text FROM state.function_versions").await,
        relations: set(conn, "SELECT relation_name FROM state.physical_relations").await,
    }
}

async fn count(conn: &mut PgConnection, sql: &str) -> i64 {
    sqlx::query_scalar(AssertSqlSafe(sql.to_owned()))
        .fetch_one(conn)
        .await
        .unwrap()
}

#[tokio::test]
async fn removes_exactly_what_is_specified_and_nothing_else() {
    let db = TestDb::new().await;
    let store = generated(&db).await;
    let mut conn = db.conn().await;
    let o = options();
    let before = actual(&mut conn).await;
    let expected = expected_survivors(&mut conn, &o).await;
    // The generated store has something in every category, and something that must survive it.
    assert!(
        expected.environments.len() < before.environments.len(),
        "some environments expired"
    );
    assert!(expected.checkpoints.len() < before.checkpoints.len());
    assert!(expected.model_versions.len() < before.model_versions.len());
    assert!(expected.function_versions.len() < before.function_versions.len());
    let young: i64 = count(&mut conn, "SELECT count(*) FROM state.model_versions mv WHERE created_at > now() - interval '1 hour' AND NOT EXISTS (SELECT 1 FROM state.virtual_environment_refs r WHERE r.model_version_id = mv.id)").await;
    assert!(
        young > 0,
        "the generator makes unreferenced versions inside the grace period"
    );

    let mut released = BTreeSet::new();
    let report = store
        .janitor(&o, |name| {
            released.insert(name);
        })
        .await
        .unwrap();

    let after = actual(&mut conn).await;
    assert_eq!(after.environments, expected.environments);
    assert_eq!(after.checkpoints, expected.checkpoints);
    assert_eq!(after.model_versions, expected.model_versions);
    assert_eq!(after.function_versions, expected.function_versions);
    assert_eq!(after.relations, expected.relations);
    assert!(after.environments.contains("prod"));
    assert_eq!(
        released,
        before
            .relations
            .difference(&expected.relations)
            .cloned()
            .collect::<BTreeSet<_>>(),
        "every released relation name, and only those"
    );
    assert_eq!(
        report.expired_environments as usize,
        before.environments.len() - after.environments.len()
    );
    assert_eq!(
        report.checkpoints as usize,
        before.checkpoints.len() - after.checkpoints.len()
    );
    assert_eq!(
        report.model_versions as usize,
        before.model_versions.len() - after.model_versions.len()
    );
    assert_eq!(
        report.function_versions as usize,
        before.function_versions.len() - after.function_versions.len()
    );
    assert_eq!(report.physical_relations as usize, released.len());
    assert_eq!(report.intervals, 2 * report.model_versions);
    assert!(report.batches > 10, "bounded batches: {}", report.batches);

    // Cascades leave no orphans behind.
    for orphan_check in [
        "SELECT count(*) FROM state.model_version_intervals i WHERE NOT EXISTS (SELECT 1 FROM state.model_versions m WHERE m.id = i.model_version_id)",
        "SELECT count(*) FROM state.physical_relation_ancestry a WHERE NOT EXISTS (SELECT 1 FROM state.physical_relations p WHERE p.id = a.parent_relation_id)",
        "SELECT count(*) FROM state.virtual_environment_checkpoint_refs r WHERE NOT EXISTS (SELECT 1 FROM state.virtual_environment_checkpoints c WHERE c.id = r.checkpoint_id)",
        "SELECT count(*) FROM state.virtual_environment_refs r WHERE NOT EXISTS (SELECT 1 FROM state.virtual_environments e WHERE e.name = r.environment)",
    ] {
        assert_eq!(count(&mut conn, orphan_check).await, 0, "{orphan_check}");
    }

    // The run is in the history tables; a second run finds nothing more.
    let (status, removed): (String, i64) = sqlx::query_as(
        "SELECT status, (details->>'modelVersions')::bigint FROM state.state_operations WHERE kind = 'janitor'",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(
        (status.as_str(), removed),
        ("succeeded", report.model_versions as i64)
    );
    assert_eq!(
        count(
            &mut conn,
            "SELECT count(*) FROM state.state_operation_events WHERE kind = 'janitor_succeeded'"
        )
        .await,
        1
    );
    let again = store.janitor(&o, |_| {}).await.unwrap();
    assert_eq!(again.removed_rows(), 0);
}

#[tokio::test]
async fn dry_run_reports_exactly_what_a_real_run_removes_and_changes_nothing() {
    let db = TestDb::new().await;
    let store = generated(&db).await;
    let mut conn = db.conn().await;
    let before = snapshot(&mut conn, SCHEMA).await;

    let mut dry_names = Vec::new();
    let dry = store
        .janitor(
            &JanitorOptions {
                dry_run: true,
                ..options()
            },
            |n| dry_names.push(n),
        )
        .await
        .unwrap();
    assert!(dry.dry_run && dry.removed_rows() > 0);
    assert_eq!(
        snapshot(&mut conn, SCHEMA).await,
        before,
        "a dry run changed the store"
    );

    let mut real_names = Vec::new();
    let real = store
        .janitor(&options(), |n| real_names.push(n))
        .await
        .unwrap();
    let comparable = |r: &JanitorReport| JanitorReport {
        dry_run: false,
        duration: Duration::ZERO,
        ..r.clone()
    };
    assert_eq!(comparable(&dry), comparable(&real));
    dry_names.sort();
    real_names.sort();
    assert_eq!(dry_names, real_names);
}

#[tokio::test]
async fn an_interrupted_run_followed_by_a_new_run_reaches_the_same_end_state() {
    let whole = TestDb::new().await;
    let store = generated(&whole).await;
    store.janitor(&options(), |_| {}).await.unwrap();
    let mut conn = whole.conn().await;
    let reference = identities(&mut conn).await;

    let interrupted = TestDb::new().await;
    let store = generated(&interrupted).await;
    let mut conn = interrupted.conn().await;
    let total = count(&mut conn, "SELECT count(*) FROM state.model_versions").await;
    let slow = JanitorOptions {
        batch_size: 3,
        ..options()
    };
    let task = tokio::spawn({
        let store = store.clone();
        async move { store.janitor(&slow, |_| {}).await }
    });
    // Interrupt once versions are being removed, well before the end.
    loop {
        let left = count(&mut conn, "SELECT count(*) FROM state.model_versions").await;
        if left < total {
            break;
        }
        assert!(
            !task.is_finished(),
            "the run ended before it could be interrupted"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(!task.is_finished(), "the run must be interrupted mid-way");
    task.abort();
    let _ = task.await;
    let partial = count(&mut conn, "SELECT count(*) FROM state.model_versions").await;
    assert!(partial < total);

    store.janitor(&options(), |_| {}).await.unwrap();
    let resumed = identities(&mut conn).await;
    for (table, rows) in &reference {
        assert!(
            resumed[table] == *rows,
            "{table}: {} rows after the resumed run, {} after one whole run",
            resumed[table].len(),
            rows.len()
        );
    }
}

/// The identity of every remaining row in the tables the janitor touches (timestamps differ
/// between two generated stores, identities do not).
async fn identities(
    conn: &mut PgConnection,
) -> std::collections::BTreeMap<&'static str, BTreeSet<String>> {
    let mut out = std::collections::BTreeMap::new();
    for (table, sql) in [
        (
            "environments",
            "SELECT name FROM state.virtual_environments",
        ),
        (
            "checkpoints",
            "SELECT id::text FROM state.virtual_environment_checkpoints",
        ),
        (
            "checkpoint refs",
            "SELECT checkpoint_id || '/' || model_name FROM state.virtual_environment_checkpoint_refs",
        ),
        (
            "refs",
            "SELECT environment || '/' || model_name FROM state.virtual_environment_refs",
        ),
        (
            "model versions",
            "SELECT id::text FROM state.model_versions",
        ),
        (
            "function versions",
            "SELECT id::text FROM state.function_versions",
        ),
        (
            "relations",
            "SELECT relation_name FROM state.physical_relations",
        ),
        (
            "ancestry",
            "SELECT relation_id || '/' || parent_relation_id FROM state.physical_relation_ancestry",
        ),
        (
            "intervals",
            "SELECT id::text FROM state.model_version_intervals",
        ),
    ] {
        out.insert(table, set(conn, sql).await);
    }
    out
}

#[tokio::test]
async fn concurrent_writes_during_a_run_are_not_lost() {
    let db = TestDb::new().await;
    let store = generated(&db).await;
    let slow = JanitorOptions {
        batch_size: 5,
        ..options()
    };
    let janitor = tokio::spawn({
        let store = store.clone();
        async move { store.janitor(&slow, |_| {}).await }
    });

    // A writer promotes versions into prod while the janitor runs: new versions, and old
    // unreferenced ones that the janitor is about to remove.
    let mut writer = db.conn().await;
    let mut committed_refs = Vec::new();
    let mut refused = 0;
    for i in 0..150i64 {
        let version = if i % 2 == 0 {
            sqlx::query_scalar::<_, i64>(
                "INSERT INTO state.model_versions (name, fingerprint, version) VALUES ('new_' || $1, md5($1::text), 'v1') RETURNING id",
            )
            .bind(i)
            .fetch_one(&mut writer)
            .await
            .unwrap()
        } else {
            // An old version that nobody references (yet).
            i * 20 + 1
        };
        let promoted = sqlx::query(
            "INSERT INTO state.virtual_environment_refs (environment, model_name, model_version_id) VALUES ('prod', 'promoted_' || $1, $2)",
        )
        .bind(i)
        .bind(version)
        .execute(&mut writer)
        .await;
        match promoted {
            Ok(_) => committed_refs.push((format!("promoted_{i}"), version)),
            // The version was already gone: the writer is told, nothing is silently lost.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("23503") => refused += 1,
            Err(e) => panic!("unexpected writer error: {e}"),
        }
    }
    let report = janitor.await.unwrap().unwrap();
    assert!(report.model_versions > 0);

    let mut conn = db.conn().await;
    for (model_name, version) in &committed_refs {
        let alive: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM state.virtual_environment_refs r JOIN state.model_versions m ON m.id = r.model_version_id
             WHERE r.environment = 'prod' AND r.model_name = $1 AND m.id = $2",
        )
        .bind(model_name)
        .bind(version)
        .fetch_one(&mut conn)
        .await
        .unwrap();
        assert_eq!(
            alive, 1,
            "committed promotion {model_name} -> {version} was lost"
        );
    }
    assert!(committed_refs.len() + refused == 150);
    assert!(
        committed_refs.len() >= 75,
        "every new version's promotion commits"
    );
}

#[tokio::test]
async fn janitor_refuses_old_schemas_and_waits_for_other_operations() {
    let db = TestDb::new().await;
    let store = db.store(SCHEMA).await;
    store.init(Some(2)).await.unwrap();
    let err = store.janitor(&options(), |_| {}).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::SchemaTooOld {
                required: 3,
                current: 2,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("statekeeper state upgrade"));

    store.upgrade(None).await.unwrap();
    let mut holder = support::hold_store_lock(&db, "state").await;
    let busy = store
        .clone()
        .with_lock_timeout(Duration::from_millis(200))
        .janitor(&options(), |_| {})
        .await
        .unwrap_err();
    assert!(matches!(busy, Error::Busy { .. }), "{busy}");
    sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
    store.janitor(&options(), |_| {}).await.unwrap();
}

#[tokio::test]
async fn the_generator_is_deterministic_for_a_seed() {
    let a = TestDb::new().await;
    let b = TestDb::new().await;
    generated(&a).await;
    generated(&b).await;
    let ids =
        "SELECT string_agg(id || name || fingerprint, ',' ORDER BY id) FROM state.model_versions";
    let refs = "SELECT string_agg(environment || model_name || model_version_id, ',' ORDER BY environment, model_name) FROM state.virtual_environment_refs";
    let mut ca = a.conn().await;
    let mut cb = b.conn().await;
    for sql in [ids, refs] {
        let x: String = sqlx::query_scalar(sql).fetch_one(&mut ca).await.unwrap();
        let y: String = sqlx::query_scalar(sql).fetch_one(&mut cb).await.unwrap();
        assert_eq!(x, y);
    }
}
