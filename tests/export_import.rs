//! Export and import against a real PostgreSQL: round trips, merge, filtered exports, bad files.

mod support;

use std::collections::BTreeMap;

use statekeeper::engine::generator::GenerateOptions;
use statekeeper::engine::{
    Compression, ConnectionSettings, Error, ExportFormat, ExportOptions, ImportMode, ImportOptions,
    SchemaName, Store,
};
use support::{TestDb, snapshot};

const SCHEMA: &str = "state";

/// statekeeper's logical format v1, which these tests are about (the exact format has its own
/// tests in tests/frameworks.rs).
fn logical() -> ExportOptions {
    ExportOptions {
        format: ExportFormat::Statekeeper,
        ..Default::default()
    }
}

/// Current-state tables: an export round-trips every row of each.
const CURRENT_STATE: &[&str] = support::CURRENT_STATE_TABLES;

async fn source(db: &TestDb) -> Store {
    let store = db.store(SCHEMA).await;
    store.init(None).await.unwrap();
    store
        .generate(&GenerateOptions {
            model_versions: 2_000,
            environments: 10,
            seed: 11,
            checkpoints_per_environment: 4,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut conn = db.conn().await;
    sqlx::query("INSERT INTO state.state_operations (kind, status, details) VALUES ('plan', 'succeeded', '{\"note\": \"tab\\tand \\\"quotes\\\" and \\\\ backslash\"}')")
        .execute(&mut conn)
        .await
        .unwrap();
    store
}

async fn current_state(db: &TestDb) -> BTreeMap<String, Vec<String>> {
    let mut conn = db.conn().await;
    support::current_state(&mut conn, SCHEMA).await
}

async fn export(
    store: &Store,
    options: &ExportOptions,
) -> (Vec<u8>, statekeeper::engine::ExportReport) {
    let (report, bytes) = store.export(Vec::new(), options).await.unwrap();
    (bytes, report)
}

/// Every constraint and index of the `state` schema, as PostgreSQL would recreate them.
async fn schema_definition(conn: &mut sqlx::PgConnection) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT t.relname || ' ' || c.conname || ' ' || pg_get_constraintdef(c.oid)
         FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid
         JOIN pg_namespace n ON n.oid = t.relnamespace WHERE n.nspname = 'state'
         UNION ALL
         SELECT indexdef FROM pg_indexes WHERE schemaname = 'state'
         ORDER BY 1",
    )
    .fetch_all(conn)
    .await
    .unwrap()
}

async fn empty_store() -> (TestDb, Store) {
    let db = TestDb::new().await;
    let store = db.store(SCHEMA).await;
    store.init(None).await.unwrap();
    (db, store)
}

fn replace() -> ImportOptions {
    ImportOptions {
        mode: ImportMode::Replace,
        expected_sha256: None,
        ..ImportOptions::merge()
    }
}

#[tokio::test]
async fn full_round_trip_reproduces_every_row_with_every_compression() {
    let a = TestDb::new().await;
    let store_a = source(&a).await;
    let original = current_state(&a).await;
    assert_eq!(original.len(), CURRENT_STATE.len());
    for (table, rows) in &original {
        assert!(!rows.is_empty(), "the generator fills {table}");
    }

    for compression in [Compression::None, Compression::Gzip, Compression::Zstd] {
        let (bytes, report) = export(
            &store_a,
            &ExportOptions {
                environments: None,
                compression,
                format: ExportFormat::Statekeeper,
                ..Default::default()
            },
        )
        .await;
        assert_eq!(report.bytes as usize, bytes.len());
        assert_eq!(report.sha256.as_ref().map(String::len), Some(64));
        assert_eq!(report.rows["model_versions"], 2_000);
        assert_eq!(report.rows["virtual_environments"], 10);
        if compression == Compression::None {
            let doc: serde_json::Value =
                serde_json::from_slice(&bytes).expect("plain exports are JSON");
            assert_eq!(doc["metadata"]["file_version"], 1);
            assert_eq!(doc["versions"]["schema_version"], 3);
            assert!(doc["environments"]["prod"]["checkpoints"][0]["refs"].is_array());
        } else {
            assert!(
                report.bytes < report.total_rows() * 50,
                "{compression:?} compresses"
            );
        }

        let (b, store_b) = empty_store().await;
        let imported = store_b
            .import(
                std::io::Cursor::new(bytes.clone()),
                &ImportOptions {
                    mode: ImportMode::Replace,
                    expected_sha256: report.sha256.clone(),
                    ..ImportOptions::merge()
                },
            )
            .await
            .unwrap();
        assert_eq!(imported.compression, compression);
        assert_eq!(Some(imported.sha256), report.sha256);
        assert_eq!(imported.environments, 10);
        assert_eq!(imported.rows["model_versions"], 2_000);
        let copy = current_state(&b).await;
        for table in CURRENT_STATE {
            assert!(
                copy[*table] == original[*table],
                "{table} differs after a {compression:?} round trip"
            );
        }
        // Keys and indexes set aside for the load are all back, exactly as the schema defines them.
        let mut conn = b.conn().await;
        assert_eq!(
            schema_definition(&mut conn).await,
            schema_definition(&mut a.conn().await).await
        );
        // New rows in the imported store get fresh ids.
        sqlx::query("INSERT INTO state.model_versions (name, fingerprint, version) VALUES ('after', 'import', 'v1')")
            .execute(&mut conn)
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn replace_keeps_a_backup_that_rollback_restores() {
    let a = TestDb::new().await;
    let store_a = source(&a).await;
    let (bytes, _) = export(&store_a, &logical()).await;

    let b = TestDb::new().await;
    let store_b = b.store(SCHEMA).await;
    store_b.init(None).await.unwrap();
    store_b
        .generate(&GenerateOptions {
            model_versions: 300,
            environments: 3,
            seed: 99,
            ..Default::default()
        })
        .await
        .unwrap();
    let before = current_state(&b).await;

    let report = store_b
        .import(std::io::Cursor::new(bytes), &replace())
        .await
        .unwrap();
    let backup = report.backup.expect("the replaced state is kept");
    assert_eq!(backup.reason, "pre-import");
    assert_eq!(current_state(&b).await, current_state(&a).await);

    store_b.rollback(Some(&backup.id)).await.unwrap();
    assert_eq!(current_state(&b).await, before);
    let mut conn = b.conn().await;
    let ops: Vec<String> =
        sqlx::query_scalar("SELECT operation FROM state.state_migration_events ORDER BY id")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    assert!(
        ops.ends_with(&["import".to_string(), "rollback".to_string()]),
        "{ops:?}"
    );
}

#[tokio::test]
async fn environment_filtered_export_imports_on_its_own() {
    let a = TestDb::new().await;
    let store_a = source(&a).await;
    let wanted = vec!["env_2".to_string(), "prod".to_string()];
    let (bytes, report) = export(
        &store_a,
        &ExportOptions {
            environments: Some(wanted.clone()),
            compression: Compression::Zstd,
            format: ExportFormat::Statekeeper,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(report.environments, 2);
    assert!(report.rows["model_versions"] < 2_000);
    assert!(
        !report.rows.contains_key("locks"),
        "store-wide state belongs to full exports"
    );

    let (c, store_c) = empty_store().await;
    store_c
        .import(std::io::Cursor::new(bytes), &replace())
        .await
        .unwrap();
    let mut conn = c.conn().await;
    let names: Vec<String> =
        sqlx::query_scalar("SELECT name FROM state.virtual_environments ORDER BY name")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    assert_eq!(names, wanted);
    // Exactly the versions those environments and their checkpoints reference.
    let mut a_conn = a.conn().await;
    let referenced = "SELECT count(DISTINCT id) FROM state.model_versions WHERE id IN (
        SELECT model_version_id FROM state.virtual_environment_refs WHERE environment IN ('env_2', 'prod')
        UNION SELECT r.model_version_id FROM state.virtual_environment_checkpoint_refs r JOIN state.virtual_environment_checkpoints c ON c.id = r.checkpoint_id WHERE c.environment IN ('env_2', 'prod'))";
    let expected: i64 = sqlx::query_scalar(referenced)
        .fetch_one(&mut a_conn)
        .await
        .unwrap();
    let got: i64 = sqlx::query_scalar("SELECT count(*) FROM state.model_versions")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(got, expected);

    let unknown = store_a
        .export(
            Vec::new(),
            &ExportOptions {
                environments: Some(vec!["nope".into()]),
                compression: Compression::None,
                format: ExportFormat::Statekeeper,
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(unknown, Error::UnknownEnvironments { ref names, what: "environments" } if names == &["nope".to_string()]),
        "{unknown}"
    );
}

#[tokio::test]
async fn merge_replaces_namesakes_and_keeps_the_rest() {
    let a = TestDb::new().await;
    let store_a = source(&a).await;
    let (bytes, _) = export(
        &store_a,
        &ExportOptions {
            environments: Some(vec!["env_1".into()]),
            compression: Compression::Gzip,
            format: ExportFormat::Statekeeper,
            ..Default::default()
        },
    )
    .await;

    let (b, store_b) = empty_store().await;
    let mut conn = b.conn().await;
    // B has its own versions (ids that collide with A's), an env_1 to be replaced and a local env.
    sqlx::raw_sql(
        "INSERT INTO state.model_versions (name, fingerprint, version) SELECT 'local_' || i, md5('local' || i), 'v1' FROM generate_series(1, 50) i;
         INSERT INTO state.virtual_environments (name) VALUES ('env_1'), ('local_only');
         INSERT INTO state.virtual_environment_refs VALUES ('env_1', 'stale', 1), ('local_only', 'kept', 2);",
    )
    .execute(&mut conn)
    .await
    .unwrap();

    store_b
        .import(
            std::io::Cursor::new(bytes),
            &ImportOptions {
                mode: ImportMode::Merge,
                expected_sha256: None,
                ..ImportOptions::merge()
            },
        )
        .await
        .unwrap();

    let refs = |env: &'static str| {
        format!(
            "SELECT string_agg(r.model_name || '=' || m.name || '/' || m.fingerprint, ',' ORDER BY r.model_name)
             FROM state.virtual_environment_refs r JOIN state.model_versions m ON m.id = r.model_version_id WHERE r.environment = '{env}'"
        )
    };
    let mut a_conn = a.conn().await;
    let in_a: String = sqlx::query_scalar(sqlx::AssertSqlSafe(refs("env_1")))
        .fetch_one(&mut a_conn)
        .await
        .unwrap();
    let in_b: String = sqlx::query_scalar(sqlx::AssertSqlSafe(refs("env_1")))
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        in_b, in_a,
        "env_1 now refers to the same versions (by name and fingerprint) as in the source"
    );
    assert!(!in_b.contains("stale"));
    let kept: String = sqlx::query_scalar(sqlx::AssertSqlSafe(refs("local_only")))
        .fetch_one(&mut conn)
        .await
        .unwrap();
    let expected_kept: String = sqlx::query_scalar("SELECT 'kept=local_2/' || md5('local2')")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(kept, expected_kept);
    let locals: i64 =
        sqlx::query_scalar("SELECT count(*) FROM state.model_versions WHERE name LIKE 'local\\_%'")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(locals, 50, "versions not in the file stay");
    let checkpoints: (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM state.virtual_environment_checkpoints WHERE environment = 'env_1'),
                (SELECT count(*) FROM state.virtual_environment_checkpoint_refs r JOIN state.virtual_environment_checkpoints c ON c.id = r.checkpoint_id WHERE c.environment = 'env_1')",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(checkpoints.0, 4);
    assert!(checkpoints.1 > 0);
}

/// Every bad file is refused with a clear reason, and the store is left exactly as it was.
#[tokio::test]
async fn bad_files_are_refused_and_change_nothing() {
    let a = TestDb::new().await;
    let store_a = source(&a).await;
    let (plain, report) = export(&store_a, &logical()).await;
    let (gzip, _) = export(
        &store_a,
        &ExportOptions {
            environments: None,
            compression: Compression::Gzip,
            format: ExportFormat::Statekeeper,
            ..Default::default()
        },
    )
    .await;
    let doc: serde_json::Value = serde_json::from_slice(&plain).unwrap();

    // Exports put "metadata" and "versions" first, so that imports can refuse a file early.
    // Edited files lose their manifest (as files written before manifests have none), so that
    // the checks behind it are reached.
    let edited = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut d = doc.clone();
        d.as_object_mut().unwrap().remove("manifest");
        edit(&mut d);
        let map = d.as_object().unwrap();
        let mut parts = Vec::new();
        for key in ["metadata", "versions"] {
            parts.push(format!("\"{key}\":{}", map[key]));
        }
        for (key, value) in map
            .iter()
            .filter(|(k, _)| *k != "metadata" && *k != "versions")
        {
            parts.push(format!("\"{key}\":{value}"));
        }
        format!("{{{}}}", parts.join(",")).into_bytes()
    };
    let mut corrupt_gzip = gzip.clone();
    let middle = corrupt_gzip.len() / 2;
    for byte in &mut corrupt_gzip[middle..middle + 64] {
        *byte ^= 0x5a;
    }
    let text = String::from_utf8(plain.clone()).unwrap();
    let manifest_at = text
        .rfind(",\"manifest\":")
        .expect("an export ends with its manifest");
    let without_manifest = format!("{}}}\n", &text[..manifest_at]);
    // One character of one value changed, the manifest left as it was.
    let fingerprint_at = text.find("\"fingerprint\":\"").unwrap() + "\"fingerprint\":\"".len();
    let mut tampered = text.clone().into_bytes();
    tampered[fingerprint_at] = if tampered[fingerprint_at] == b'0' {
        b'1'
    } else {
        b'0'
    };
    let mut unlisted = doc.clone();
    unlisted["manifest"]["sha256"]
        .as_object_mut()
        .unwrap()
        .remove("locks");
    let unlisted = format!(
        "{}{}}}\n",
        &text[..manifest_at + ",\"manifest\":".len()],
        unlisted["manifest"]
    );
    let duplicate_environment = without_manifest.replacen("\"environments\":{", "\"environments\":{\"prod\":{\"environment\":{\"name\":\"prod\"},\"refs\":[],\"function_refs\":[],\"checkpoints\":[]},", 1);

    let cases: Vec<(&str, Vec<u8>, Option<String>, &str)> = vec![
        (
            "one value changed",
            tampered,
            None,
            "table \"model_versions\" is not what was exported",
        ),
        (
            "a table left out of the manifest",
            unlisted.into_bytes(),
            None,
            "table \"locks\" is in the file but not in the export's manifest",
        ),
        (
            "a key after the manifest",
            format!(
                "{},\"extra\":[]}}\n",
                text.trim_end().strip_suffix('}').unwrap()
            )
            .into_bytes(),
            None,
            "\"extra\" follows the manifest",
        ),
        (
            "truncated",
            plain[..plain.len() / 2].to_vec(),
            None,
            "truncated or corrupt",
        ),
        (
            "truncated gzip",
            gzip[..gzip.len() / 2].to_vec(),
            None,
            "truncated or corrupt",
        ),
        ("corrupt gzip", corrupt_gzip, None, "truncated or corrupt"),
        (
            "not json",
            b"PGDMP\x01\x0e binary dump".to_vec(),
            None,
            "truncated or corrupt",
        ),
        ("empty", Vec::new(), None, "empty"),
        (
            "wrong file version",
            edited(&|d| d["metadata"]["file_version"] = 2.into()),
            None,
            "file version 2 is not supported",
        ),
        (
            "wrong schema version",
            edited(&|d| d["versions"]["schema_version"] = 2.into()),
            None,
            "schema version 2",
        ),
        (
            "not importable",
            edited(&|d| d["metadata"]["importable"] = false.into()),
            None,
            "not importable",
        ),
        (
            "checksum mismatch",
            plain.clone(),
            Some("0".repeat(64)),
            "checksum mismatch",
        ),
        (
            "duplicate model version",
            edited(&|d| {
                let first = d["model_versions"][0].clone();
                d["model_versions"].as_array_mut().unwrap().push(first);
            }),
            None,
            "appears 2 times",
        ),
        (
            "duplicate environment",
            duplicate_environment.into_bytes(),
            None,
            "environment prod appears 2 times",
        ),
        (
            "dangling reference",
            edited(&|d| {
                d["environments"]["prod"]["refs"].as_array_mut().unwrap().push(serde_json::json!({"environment": "prod", "model_name": "ghost", "model_version_id": 999999}));
            }),
            None,
            "refers to model version 999999",
        ),
        (
            "wrong type",
            edited(&|d| d["model_versions"][0]["created_at"] = "yesterday-ish".into()),
            None,
            "yesterday-ish",
        ),
        (
            "unknown section",
            edited(&|d| d["extra"] = serde_json::json!([])),
            None,
            "unknown section \"extra\"",
        ),
        (
            "missing section",
            edited(&|d| {
                d.as_object_mut().unwrap().remove("environments");
            }),
            None,
            "section \"environments\" is missing",
        ),
    ];

    let (b, store_b) = empty_store().await;
    store_b
        .generate(&GenerateOptions {
            model_versions: 200,
            environments: 3,
            seed: 5,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut conn = b.conn().await;
    let before = snapshot(&mut conn, SCHEMA).await;
    for (name, bytes, expected_sha256, reason) in cases {
        let err = store_b
            .import(
                std::io::Cursor::new(bytes),
                &ImportOptions {
                    mode: ImportMode::Replace,
                    expected_sha256,
                    ..ImportOptions::merge()
                },
            )
            .await
            .expect_err(name);
        assert!(matches!(err, Error::InvalidExport(_)), "{name}: {err}");
        let message = err.to_string();
        assert!(message.contains(reason), "{name}: {message}");
        assert!(message.contains("nothing was changed"), "{name}: {message}");
        assert_eq!(
            snapshot(&mut conn, SCHEMA).await,
            before,
            "{name} changed the store"
        );
    }
    assert!(
        store_b.backups().await.unwrap().is_empty(),
        "refused imports leave no backup"
    );
    let _ = report;
}

/// The file is one consistent snapshot: rows committed while the export runs are not in it.
#[tokio::test]
async fn export_reads_one_snapshot_while_writers_go_on() {
    let a = TestDb::new().await;
    let store = source(&a).await;
    let (writer, mut reader) = tokio::io::duplex(16 * 1024);
    let export = tokio::spawn({
        let store = store.clone();
        async move {
            store
                .export(writer, &logical())
                .await
                .map(|(report, _)| report)
        }
    });
    // Nobody reads yet, so the export blocks on a full pipe, mid-file, holding its snapshot.
    let mut head = vec![0u8; 1024];
    tokio::io::AsyncReadExt::read_exact(&mut reader, &mut head)
        .await
        .unwrap();
    let mut conn = a.conn().await;
    sqlx::raw_sql(
        "INSERT INTO state.model_versions (name, fingerprint, version) SELECT 'late_' || i, md5('late' || i), 'v1' FROM generate_series(1, 100) i;
         INSERT INTO state.virtual_environments (name) VALUES ('late_env');",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    assert!(
        !export.is_finished(),
        "the export must still be running while the writer commits"
    );
    let mut rest = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut rest)
        .await
        .unwrap();
    let report = export.await.unwrap().unwrap();
    head.extend(rest);
    let doc: serde_json::Value = serde_json::from_slice(&head).unwrap();
    assert_eq!(doc["model_versions"].as_array().unwrap().len(), 2_000);
    assert!(doc["environments"].get("late_env").is_none());
    assert_eq!(report.rows["model_versions"], 2_000);
}

/// The exact format reads rows with COPY's text format and writes them as JSON itself: on a table
/// of every common column type (and a domain over `boolean`, whose `::text` is not its COPY text)
/// holding unicode, NULLs, control characters, quotes, backslashes, COPY's own `\N`, large JSON
/// values and extreme numbers, each exported row equals what PostgreSQL's `to_json` makes of the
/// row's `::text` forms, and the file restores every value.
#[tokio::test]
async fn exact_export_writes_every_type_and_odd_text_as_postgres_would() {
    let (db, store) = empty_store().await;
    let mut conn = db.conn().await;
    sqlx::raw_sql(
        r#"CREATE DOMAIN state.flag AS boolean;
           CREATE TABLE state.odd_values (
             id int PRIMARY KEY, t text, v varchar(20), c char(3), b boolean, i2 smallint,
             i8 bigint, n numeric, f4 real, f8 double precision, j json, jb jsonb, ts timestamptz,
             tsl timestamp, d date, tm time, iv interval, u uuid, ba bytea, arr text[],
             ia int[], ip inet, bits bit varying, money money, rng int4range, pt point,
             fl state.flag, bs boolean[]);
           INSERT INTO state.odd_values VALUES
             (1, E'tab\there\nnew "quoted" back\\slash \\N \x01\x1f\x7f', 'ünïcødé ✓ 𝄞', 'ab',
              true, -32768, 9223372036854775807, 12345678901234567890.000000000001, 'NaN',
              '-Infinity', '{"a": [1, "two", null, {"b": "\u00e9\n"}]}', '{"k": "v\"q"}',
              '2026-11-28 01:02:03.456789+05:30', '1999-12-31 23:59:59.999999', '0001-01-01',
              '24:00:00', '-1 year 2 mons 3 days 04:05:06.7', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
              E'\\x00ff5c0a', ARRAY['a,b', NULL, '"', E'\\', ''], '{1,NULL,3}', '::1/128',
              B'10101', '-$1,234.56', '[1,10)', '(1.5,-2)', true, '{t,f,NULL}'),
             (2, '', NULL, NULL, false, 0, 0, 0, 1.17549435e-38, 2.2250738585072014e-308, 'null',
              '[]', 'infinity', '-infinity', 'infinity', '00:00', '0', NULL, '', '{}', '{}', NULL,
              B'', 0, 'empty', NULL, false, '{}'),
             (3, repeat('x', 200000), NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
              (SELECT json_agg(g)::json FROM generate_series(1, 50000) g), NULL, NULL, NULL, NULL,
              NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
             (4, NULL, NULL, NULL, NULL, 32767, -9223372036854775808, NULL, NULL, NULL, NULL, NULL,
              '0044-03-15 12:00:00.000001+00 BC', '12345-06-07 08:09:10.5', NULL, NULL, NULL, NULL,
              NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);"#,
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let (bytes, report) = export(&store, &ExportOptions::default()).await;
    assert_eq!(report.rows["odd_values"], 4);
    let document: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let exported: Vec<String> = document["tables"]["odd_values"]["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row.to_string())
        .collect();
    sqlx::raw_sql(
        "SET DateStyle = 'ISO, YMD'; SET IntervalStyle = 'postgres'; SET TimeZone = 'UTC';
         SET extra_float_digits = 3; SET bytea_output = 'hex'",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let columns: Vec<String> = sqlx::query_scalar(
        "SELECT format('t.%I::text', attname) FROM pg_attribute
         WHERE attrelid = 'state.odd_values'::regclass AND attnum > 0 ORDER BY attnum",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let by_postgres: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT to_json(ARRAY[{}]::text[])::text FROM state.odd_values t ORDER BY id",
        columns.join(", ")
    )))
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let reparsed: Vec<String> = by_postgres
        .iter()
        .map(|text| {
            serde_json::from_str::<serde_json::Value>(text)
                .unwrap()
                .to_string()
        })
        .collect();
    let mut ours = exported.clone();
    ours.sort_by_key(|row| {
        row[2..row.find(',').unwrap() - 1]
            .parse::<i32>()
            .unwrap_or(0)
    });
    assert_eq!(
        ours, reparsed,
        "the exported rows differ from PostgreSQL's to_json"
    );

    // And back: the restored table equals the original, value for value.
    let before = snapshot(&mut conn, SCHEMA).await;
    let (target_db, target) = empty_store().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE DOMAIN state.flag AS boolean; CREATE TABLE state.odd_values ({})",
        sqlx::query_scalar::<_, String>(
            "SELECT string_agg(format('%I %s', attname, format_type(atttypid, atttypmod)), ', ' ORDER BY attnum)
             FROM pg_attribute WHERE attrelid = 'state.odd_values'::regclass AND attnum > 0",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap()
    )))
    .execute(&mut target_db.conn().await)
    .await
    .unwrap();
    target
        .import(std::io::Cursor::new(bytes), &replace())
        .await
        .unwrap();
    let after = snapshot(&mut target_db.conn().await, SCHEMA).await;
    assert_eq!(before["odd_values"], after["odd_values"]);

    // Rows wider than any table of the store are refused as they are staged.
    sqlx::query("ALTER TABLE state.odd_values ADD COLUMN extra text")
        .execute(&mut conn)
        .await
        .unwrap();
    let (wider, _) = export(&store, &ExportOptions::default()).await;
    let err = target
        .import(std::io::Cursor::new(wider), &replace())
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("a row of odd_values has 29 values, more than the 28 columns"),
        "{err}"
    );
    assert_eq!(snapshot(&mut target_db.conn().await, SCHEMA).await, after);
}

/// The logical format's rows as the export used to have PostgreSQL write them (`row_to_json`
/// per row, a query per environment), for comparing with what the export writes now.
async fn logical_document_by_postgres(conn: &mut sqlx::PgConnection) -> serde_json::Value {
    let mut document = serde_json::Map::new();
    for (table, order) in [
        ("model_versions", "t.id"),
        ("model_version_intervals", "t.id"),
        ("function_versions", "t.id"),
        ("physical_relations", "t.id"),
        (
            "physical_relation_ancestry",
            "t.relation_id, t.parent_relation_id",
        ),
        ("locks", "t.name"),
        ("state_operations", "t.id"),
    ] {
        let rows: Vec<sqlx::types::Json<serde_json::Value>> =
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT row_to_json(t) FROM state.{table} t ORDER BY {order}"
            )))
            .fetch_all(&mut *conn)
            .await
            .unwrap();
        document.insert(
            table.into(),
            rows.into_iter().map(|row| row.0).collect::<Vec<_>>().into(),
        );
    }
    let environments: Vec<(String, sqlx::types::Json<serde_json::Value>)> = sqlx::query_as(
        "SELECT e.name, json_build_object(
           'environment', row_to_json(e),
           'refs', COALESCE((SELECT json_agg(row_to_json(r) ORDER BY r.model_name) FROM state.virtual_environment_refs r WHERE r.environment = e.name), '[]'),
           'function_refs', COALESCE((SELECT json_agg(row_to_json(r) ORDER BY r.function_name) FROM state.virtual_environment_function_refs r WHERE r.environment = e.name), '[]'),
           'checkpoints', COALESCE((SELECT json_agg(json_build_object(
               'checkpoint', row_to_json(c),
               'refs', COALESCE((SELECT json_agg(row_to_json(r) ORDER BY r.model_name) FROM state.virtual_environment_checkpoint_refs r WHERE r.checkpoint_id = c.id), '[]'),
               'function_refs', COALESCE((SELECT json_agg(row_to_json(r) ORDER BY r.function_name) FROM state.virtual_environment_checkpoint_function_refs r WHERE r.checkpoint_id = c.id), '[]')
             ) ORDER BY c.id) FROM state.virtual_environment_checkpoints c WHERE c.environment = e.name), '[]')
         ) FROM state.virtual_environments e ORDER BY e.name",
    )
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    let mut by_name = serde_json::Map::new();
    for (name, environment) in environments {
        by_name.insert(name, environment.0);
    }
    document.insert("environments".into(), by_name.into());
    document.into()
}

/// A table may carry columns statekeeper does not know (added by hand): each is written as
/// `row_to_json` writes it, whatever its type, edge values and NULLs included.
#[tokio::test]
async fn logical_export_writes_every_column_type_as_row_to_json_does() {
    let db = TestDb::new().await;
    let store = db.store(SCHEMA).await;
    store.init(None).await.unwrap();
    let mut conn = db.conn().await;
    sqlx::raw_sql(
        r#"CREATE DOMAIN state.positive AS integer CHECK (VALUE > 0);
           ALTER TABLE state.locks
             ADD COLUMN small smallint, ADD COLUMN medium integer, ADD COLUMN large bigint,
             ADD COLUMN flag boolean, ADD COLUMN short varchar(20), ADD COLUMN padded char(5),
             ADD COLUMN label name, ADD COLUMN token uuid, ADD COLUMN plain json, ADD COLUMN doc jsonb,
             ADD COLUMN local timestamp, ADD COLUMN amount numeric, ADD COLUMN ratio double precision,
             ADD COLUMN ids integer[], ADD COLUMN count state.positive, ADD COLUMN day date,
             ADD COLUMN span interval, ADD COLUMN raw bytea, ADD COLUMN address inet;
           INSERT INTO state.locks VALUES
             ('max', 'h', '2026-06-01 12:34:56.123456+05:30', 'infinity', 32767, 2147483647,
              9223372036854775807, true, E'tab	 "q" \\ é', 'ab', E'nl
name', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
              '{"spaced" :  [1,2] }', '{"b": 1, "a": [true, null]}', '2026-01-01 00:00:00.5', 12345678901234567890.123,
              'NaN', '{1,NULL,3}', 7, '2026-02-28', '1 day 02:03:04', '\x00ff', '10.0.0.1/8'),
             ('min', E'', '0044-03-15 12:00:00+00 BC', '-infinity', -32768, -2147483648,
              -9223372036854775808, false, '', 'a', 'x', '00000000-0000-0000-0000-000000000000',
              'null', '"text"', '0001-01-01 00:00:00 BC', -0.5, 'Infinity', '{}', 1, '0001-01-01 BC', '-1 mon', '\x', '::1'),
             ('far', 'h', '12345-12-31 23:59:59.999999+00', '2000-01-01 00:00:00+00', NULL, NULL, NULL, NULL,
              NULL, NULL, NULL, NULL, NULL, NULL, '294276-12-31 23:59:59.999999', NULL, 1.5e300, NULL, NULL,
              'infinity', NULL, NULL, NULL),
             ('epoch', 'h', '1999-12-31 23:59:59.999999+00', '1970-01-01 00:00:00.000001+00', 0, 0, 0, true,
              'x', 'abcde', 'n', NULL, '[]', '{}', '2000-02-29 00:00:00', 0, 0, '{{1,2},{3,4}}', 2, '2000-03-01',
              '0', NULL, NULL);"#,
    )
    .execute(&mut conn)
    .await
    .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE {} SET TimeZone = 'America/St_Johns'",
        db.name
    )))
    .execute(&mut conn)
    .await
    .unwrap();
    let store = db.store(SCHEMA).await;
    let (bytes, report) = export(&store, &logical()).await;
    assert_eq!(report.rows["locks"], 4);
    let document: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let mut compare = db.conn().await;
    sqlx::query("SET TimeZone = 'UTC'")
        .execute(&mut compare)
        .await
        .unwrap();
    let expected: Vec<sqlx::types::Json<serde_json::Value>> =
        sqlx::query_scalar("SELECT row_to_json(t) FROM state.locks t ORDER BY t.name")
            .fetch_all(&mut compare)
            .await
            .unwrap();
    let expected: Vec<serde_json::Value> = expected.into_iter().map(|row| row.0).collect();
    assert_eq!(document["locks"], serde_json::Value::from(expected));
    // `json` keeps its text as written; the parsed comparison above cannot see spacing.
    let text = String::from_utf8(bytes).unwrap();
    assert!(text.contains(r#""plain":{"spaced" :  [1,2] }"#), "{text}");
}

/// Timestamps are written in UTC whatever the session's zone: equal stores give equal files on
/// any server.
#[tokio::test]
async fn logical_export_writes_rows_as_row_to_json_does_in_utc_from_every_time_zone() {
    let db = TestDb::new().await;
    let store = db.store(SCHEMA).await;
    store.init(None).await.unwrap();
    // More references and checkpoints than the export fetches at a time (5,000).
    store
        .generate(&GenerateOptions {
            model_versions: 12_000,
            environments: 4,
            seed: 5,
            checkpoints_per_environment: 1_300,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut conn = db.conn().await;
    sqlx::raw_sql(
        r#"INSERT INTO state.model_versions (name, fingerprint, version, kind, definition, created_at) VALUES
             (E'ünïcødé ✓ 𝄞 "q" back\\slash tab\t nl\n \x01 \\N', 'odd-1', E'v"1', 'model',
              '{"a": [1, "two", null, {"b": "é\n"}], "big": 12345678901234567890.5, "s": "\\\\"}', '1850-06-01 12:00:00+00'),
             ('bc', 'odd-2', '', 'seed', (SELECT jsonb_build_object('many', jsonb_agg(g)) FROM generate_series(1, 50000) g),
              '0044-03-15 12:00:00+00 BC'),
             ('forever', 'odd-3', 'v', 'model', '{}', 'infinity'),
             ('never', 'odd-4', 'v', 'model', '{}', '-infinity'),
             ('far', 'odd-5', 'v', 'model', '{}', '12345-01-01 00:00:00.5+00'),
             ('micro', 'odd-6', 'v', 'model', '{}', '2026-06-01 12:34:56.123456+00');
           INSERT INTO state.model_version_intervals (model_version_id, start_ts, end_ts, is_dev, created_at)
             SELECT id, '0100-01-01 00:00:00+00 BC', '2026-01-01 00:00:00.000001+00', true, '1901-12-13 20:45:52+00'
             FROM state.model_versions WHERE fingerprint LIKE 'odd-%';
           INSERT INTO state.virtual_environments (name, plan_id, previous_plan_id, expires_at)
             VALUES (E'ënv "x" \\ \t', NULL, E'plan\n"p"', NULL);
           INSERT INTO state.virtual_environment_refs (environment, model_name, model_version_id)
             SELECT E'ënv "x" \\ \t', name, id FROM state.model_versions WHERE fingerprint LIKE 'odd-%';
           INSERT INTO state.virtual_environment_checkpoints (environment, plan_id, description)
             VALUES (E'ënv "x" \\ \t', NULL, E'line\nbreak "q" \\');
           INSERT INTO state.state_operations (kind, status, started_at, finished_at, details)
             VALUES ('plan', E'ok\x02', '2026-03-29 01:30:00+01', NULL, '{"k": null, "list": [true, false, 1.5e300]}');"#,
    )
    .execute(&mut conn)
    .await
    .unwrap();

    let mut first_body: Option<Vec<u8>> = None;
    for zone in [
        "UTC",
        "Asia/Kolkata",
        "America/St_Johns",
        "Europe/Amsterdam",
        "Pacific/Chatham",
    ] {
        // Sessions opened from here on (the export's and the comparison's) use this zone.
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "ALTER DATABASE {} SET TimeZone = '{zone}'",
            db.name
        )))
        .execute(&mut conn)
        .await
        .unwrap();
        let store = db.store(SCHEMA).await;
        let mut compare = db.conn().await;
        sqlx::query("SET TimeZone = 'UTC'")
            .execute(&mut compare)
            .await
            .unwrap();
        let (bytes, report) = export(&store, &logical()).await;
        assert!(report.rows["virtual_environment_refs"] > 5_000);
        assert!(report.rows["virtual_environment_checkpoints"] > 5_000);
        let mut document: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        let object = document.as_object_mut().unwrap();
        object.remove("metadata");
        object.remove("versions");
        assert!(
            object.remove("manifest").is_some(),
            "the export has no manifest"
        );
        let expected = logical_document_by_postgres(&mut compare).await;
        for (section, rows) in expected.as_object().unwrap() {
            assert!(
                document[section] == *rows,
                "in time zone {zone}, section {section} differs from row_to_json's in UTC"
            );
        }
        assert_eq!(
            document.as_object().unwrap().len(),
            expected.as_object().unwrap().len()
        );
        // The rows, without the header and the manifest (whose digest of the header covers its
        // timestamp).
        let body = |bytes: &[u8]| {
            let at = bytes
                .windows(18)
                .position(|w| w == b",\"model_versions\":")
                .unwrap();
            let manifest = bytes
                .windows(12)
                .rposition(|w| w == b",\"manifest\":")
                .unwrap();
            bytes[at..manifest].to_vec()
        };

        if let Some(first) = &first_body {
            assert!(
                *first == body(&bytes),
                "the export in time zone {zone} wrote other bytes than in UTC"
            );
        } else {
            first_body = Some(body(&bytes));
            // With one connection, the references are sorted in with the environments' other
            // rows instead of read beside them: the same bytes after the header.
            let pool = ConnectionSettings::from_url(&db.url)
                .unwrap()
                .with_max_connections(1)
                .connect()
                .await
                .unwrap();
            let alone = Store::new(pool, SchemaName::new(SCHEMA).unwrap());
            let (alone_bytes, _) = export(&alone, &logical()).await;
            assert!(
                body(&alone_bytes) == body(&bytes),
                "one connection wrote another document than two"
            );
            let before = current_state(&db).await;
            let (target_db, target) = empty_store().await;
            target
                .import(std::io::Cursor::new(bytes.clone()), &replace())
                .await
                .unwrap();
            assert_eq!(
                current_state(&target_db).await,
                before,
                "the logical file did not restore every row"
            );
        }
    }
}
