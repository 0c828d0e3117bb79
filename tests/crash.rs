//! Crash at any point (docs/reliability.md): each operation runs as the real CLI in a child
//! process and is SIGKILLed at every named failpoint it reaches (src/engine/failpoint.rs, the
//! `failpoints` feature) and at random moments. After each kill: every table of the store equals
//! the state before or the state after (row by row), no advisory lock is held, every listed
//! backup holds the rows its metadata promises, and the operation then runs to completion.
//!
//! The test command runs a bounded set (every named point, a few random moments per operation);
//! `STATEKEEPER_CRASH_RANDOM=N` adds N random kills per operation (docs/reliability.md has the
//! full run's command and figures).

mod support;

#[cfg(not(feature = "failpoints"))]
#[test]
fn crash_tests_need_the_failpoints_feature() {
    panic!(
        "tests/crash.rs kills operations at named failpoints: run it with `cargo test --features \
         failpoints` (scripts/test.sh does)"
    );
}

#[cfg(feature = "failpoints")]
mod crash {
    use std::collections::BTreeMap;
    use std::path::{Path, PathBuf};
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    use sqlx::{AssertSqlSafe, PgConnection};
    use statekeeper::engine::generator::GenerateOptions;

    use super::support::{TestDb, snapshot};

    /// Tables whose rows carry the time of the operation (its history, the migration ledger's
    /// `applied_at`): compared by count.
    const HISTORY: &[&str] = &[
        "state_versions",
        "state_operations",
        "state_operation_events",
        "state_migration_events",
        "reconcile_events",
    ];

    /// Columns a run fills anew each time (SQLMesh's intervals get a random UUID and the import's
    /// time, as SQLMesh's own import gives them): left out of the comparison.
    const GENERATED: &[(&str, &[&str])] = &[("_intervals", &["id", "created_ts"])];

    type Tables = BTreeMap<String, Vec<String>>;

    /// One operation on one store, as the CLI runs it.
    struct Scenario {
        name: &'static str,
        template: TestDb,
        framework: &'static str,
        schema: &'static str,
        args: Vec<String>,
        /// Commits batch by batch (the janitor): a kill may leave the store between two
        /// batches, and the next run must finish the work.
        batched: bool,
    }

    #[derive(Default)]
    struct Figures {
        kills: usize,
        named: usize,
        random: usize,
        before: usize,
        after: usize,
        between_batches: usize,
        partial: usize,
    }

    fn cli(db: &TestDb, scenario: &Scenario) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_statekeeper"));
        command
            .args([
                "state",
                "--framework",
                scenario.framework,
                "--schema",
                scenario.schema,
            ])
            .args(&scenario.args)
            .env("STATEKEEPER_DATABASE_URL", &db.url)
            .env_remove("STATEKEEPER_FAILPOINT")
            .env_remove("STATEKEEPER_FAILPOINT_TRACE")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        command
    }

    /// The store's tables, history tables reduced to their row counts.
    async fn digest(db: &TestDb, schema: &str) -> Tables {
        let mut conn = db.conn().await;
        snapshot(&mut conn, schema)
            .await
            .into_iter()
            .map(|(table, rows)| {
                if HISTORY.contains(&table.as_str()) {
                    let count = rows.len().to_string();
                    (table, vec![count])
                } else if let Some((_, columns)) = GENERATED.iter().find(|(t, _)| *t == table) {
                    let mut rows: Vec<String> = rows
                        .iter()
                        .map(|row| {
                            let mut value: serde_json::Value =
                                serde_json::from_str(row).expect("rows are JSON");
                            if let Some(object) = value.as_object_mut() {
                                for column in *columns {
                                    object.remove(*column);
                                }
                            }
                            value.to_string()
                        })
                        .collect();
                    rows.sort();
                    (table, rows)
                } else {
                    (table, rows)
                }
            })
            .collect()
    }

    /// What a scenario changes: the store's tables and, for a prune, how many backups there are
    /// (all of them or the one kept, never some).
    async fn state_of(db: &TestDb, scenario: &Scenario) -> Tables {
        let mut tables = digest(db, scenario.schema).await;
        if scenario.name == "backups prune" {
            let count = db
                .store(scenario.schema)
                .await
                .backups()
                .await
                .unwrap()
                .len();
            tables.insert("(backups)".into(), vec![count.to_string()]);
        }
        tables
    }

    /// Every listed backup holds the rows its metadata says it does.
    async fn backups_are_whole(db: &TestDb, framework: &str, schema: &str) -> Result<(), String> {
        let store = db
            .store(schema)
            .await
            .with_framework(framework.parse().map_err(|e: String| e)?);
        let backups = store.backups().await.map_err(|e| e.to_string())?;
        let mut conn = db.conn().await;
        for backup in backups {
            let backup_schema = format!("{schema}__backup_{}", backup.id);
            let tables: Vec<String> = sqlx::query_scalar(
                "SELECT tablename::text FROM pg_tables WHERE schemaname = $1 AND tablename <> '_statekeeper_backup'",
            )
            .bind(&backup_schema)
            .fetch_all(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
            let mut rows = 0i64;
            let mut per_table = Vec::new();
            for table in tables {
                let n: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
                    "SELECT count(*) FROM \"{backup_schema}\".\"{table}\""
                )))
                .fetch_one(&mut conn)
                .await
                .map_err(|e| e.to_string())?;
                rows += n;
                per_table.push(format!("{table}={n}"));
            }
            if rows != backup.rows {
                return Err(format!(
                    "backup {} ({}) lists {} rows but holds {rows}: {}",
                    backup.id,
                    backup.reason,
                    backup.rows,
                    per_table.join(" ")
                ));
            }
        }
        Ok(())
    }

    /// Waits until the killed client's session is gone and no advisory lock is held.
    async fn no_lock_left(db: &TestDb) -> Result<(), String> {
        let mut conn: PgConnection = db.conn().await;
        let started = Instant::now();
        loop {
            let held: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database \
                 WHERE l.locktype = 'advisory' AND d.datname = current_database()",
            )
            .fetch_one(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
            if held == 0 {
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(10) {
                return Err(format!(
                    "{held} advisory locks still held 10 s after the kill"
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs the operation to completion on a copy: the state after, its duration, and the
    /// failpoints it passes in order.
    async fn reference(scenario: &Scenario, trace: &Path) -> (Tables, Duration, Vec<String>) {
        let db = TestDb::from_template(&scenario.template.name).await;
        let _ = std::fs::remove_file(trace);
        let started = Instant::now();
        let out = cli(&db, scenario)
            .env("STATEKEEPER_FAILPOINT_TRACE", trace)
            .output()
            .unwrap();
        let took = started.elapsed();
        assert!(
            out.status.success(),
            "{}: the operation fails without a crash: {}",
            scenario.name,
            String::from_utf8_lossy(&out.stderr)
        );
        let points = std::fs::read_to_string(trace)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect();
        (state_of(&db, scenario).await, took, points)
    }

    /// Kills the operation at `point` (`NAME@N`) or after `delay`, then checks the store.
    async fn kill_once(
        scenario: &Scenario,
        before: &Tables,
        after: &Tables,
        point: Option<&str>,
        delay: Duration,
        figures: &mut Figures,
    ) {
        let db = TestDb::from_template(&scenario.template.name).await;
        let mut command = cli(&db, scenario);
        if let Some(point) = point {
            command.env("STATEKEEPER_FAILPOINT", point);
        }
        let mut child = command.spawn().unwrap();
        if point.is_none() {
            tokio::time::sleep(delay).await;
            let _ = child.kill();
        }
        let status = child.wait().unwrap();
        let what = point.map_or_else(|| format!("after {delay:?}"), str::to_owned);
        figures.kills += 1;
        if point.is_some() {
            figures.named += 1;
            assert!(
                !status.success(),
                "{}: failpoint {what} was not reached",
                scenario.name
            );
        } else {
            figures.random += 1;
        }
        let now = state_of(&db, scenario).await;
        let completed = &now == after && before != after && !scenario.batched;
        if &now == before {
            figures.before += 1;
        } else if &now == after {
            figures.after += 1;
        } else if scenario.batched {
            figures.between_batches += 1;
        } else {
            figures.partial += 1;
            let differing: Vec<&String> = now
                .keys()
                .filter(|t| now.get(*t) != before.get(*t) && now.get(*t) != after.get(*t))
                .collect();
            let sample = differing.first().map(|t| {
                let (n, a) = (&now[*t], &after[*t]);
                let first = n.iter().zip(a.iter()).find(|(x, y)| x != y);
                format!(
                    "{} vs {} rows; first difference {first:?}",
                    n.len(),
                    a.len()
                )
            });
            panic!(
                "{}: killed at {what}, the store is neither before nor after (tables {differing:?}: {})",
                scenario.name,
                sample
                    .unwrap_or_default()
                    .chars()
                    .take(1500)
                    .collect::<String>()
            );
        }
        no_lock_left(&db)
            .await
            .unwrap_or_else(|e| panic!("{}: killed at {what}: {e}", scenario.name));
        backups_are_whole(&db, scenario.framework, scenario.schema)
            .await
            .unwrap_or_else(|e| panic!("{}: killed at {what}: {e}", scenario.name));
        // The next operation succeeds: the operation again where it did not happen (and it
        // leaves the state after), a read where it did.
        let mut next = cli(&db, scenario);
        if completed {
            next = Command::new(env!("CARGO_BIN_EXE_statekeeper"));
            next.args([
                "state",
                "--framework",
                scenario.framework,
                "--schema",
                scenario.schema,
            ])
            .arg("status")
            .env("STATEKEEPER_DATABASE_URL", &db.url);
        }
        let out = next.output().unwrap();
        assert!(
            out.status.success(),
            "{}: killed at {what}, the next operation fails: {}",
            scenario.name,
            String::from_utf8_lossy(&out.stderr)
        );
        // Row for row equal but for keys a sequence hands out (a killed transaction used some
        // numbers up, which PostgreSQL never hands out twice): the same rows per table.
        let counts = |tables: &Tables| -> BTreeMap<String, usize> {
            tables
                .iter()
                .map(|(t, rows)| (t.clone(), rows.len()))
                .collect()
        };
        let again = state_of(&db, scenario).await;
        assert!(
            counts(&again) == counts(after),
            "{}: killed at {what}, then the next operation: rows per table {:?}, expected {:?}",
            scenario.name,
            counts(&again),
            counts(after)
        );
        drop_database(&db).await;
    }

    async fn drop_database(db: &TestDb) {
        use sqlx::Connection;
        let mut conn = PgConnection::connect(super::support::admin_url())
            .await
            .expect("connect to test server");
        let _ = sqlx::query(AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            db.name
        )))
        .execute(&mut conn)
        .await;
    }

    /// Every named point the operation passes (each of its hits), and random moments.
    async fn crash_everywhere(scenario: Scenario, random: usize, work: &Path) -> Figures {
        let trace = work.join(format!("{}.trace", scenario.name));
        let before = state_of(&scenario.template, &scenario).await;
        let (after, took, points) = reference(&scenario, &trace).await;
        // A backup changes no table of the store; everything else does (a prune, its backups).
        assert_eq!(
            before != after,
            scenario.name != "backup",
            "{}: what the operation changes",
            scenario.name
        );
        let mut figures = Figures::default();
        let mut seen: BTreeMap<&str, u32> = BTreeMap::new();
        for point in &points {
            let n = seen.entry(point.as_str()).or_default();
            *n += 1;
            kill_once(
                &scenario,
                &before,
                &after,
                Some(&format!("{point}@{n}")),
                Duration::ZERO,
                &mut figures,
            )
            .await;
        }
        // Random moments over the operation's duration (start-up included), spread evenly with
        // a deterministic jitter.
        for i in 0..random {
            let fraction = (i as f64 + 0.5 + ((i * 7919) % 100) as f64 / 250.0) / random as f64;
            let delay = took.mul_f64(fraction.min(1.2));
            kill_once(&scenario, &before, &after, None, delay, &mut figures).await;
        }
        println!(
            "crash: {:<22} {:>3} kills ({} at {} named points, {} random): {} before, {} after, {} between batches, {} partial",
            scenario.name,
            figures.kills,
            figures.named,
            seen.len(),
            figures.random,
            figures.before,
            figures.after,
            figures.between_batches,
            figures.partial
        );
        drop_database(&scenario.template).await;
        figures
    }

    async fn statekeeper_store(seed: u64, versions: u64) -> TestDb {
        let db = TestDb::new().await;
        let store = db.store("sqlmesh_state").await;
        store.init(None).await.unwrap();
        store
            .generate(&GenerateOptions {
                model_versions: versions,
                environments: 8,
                seed,
                ..Default::default()
            })
            .await
            .unwrap();
        db
    }

    fn export_of(db_url: &str, file: &Path, format: &str) {
        let out = Command::new(env!("CARGO_BIN_EXE_statekeeper"))
            .args([
                "state",
                "--schema",
                "sqlmesh_state",
                "export",
                "--format",
                format,
            ])
            .args(["--compression", "zstd", "--to"])
            .arg(file)
            .env("STATEKEEPER_DATABASE_URL", db_url)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A folder of the test's own (the tests of this file run side by side).
    fn work_dir(test: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sk-crash-{}-{test}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn random_kills() -> usize {
        std::env::var("STATEKEEPER_CRASH_RANDOM")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(4)
    }

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|a| a.to_string()).collect()
    }

    #[tokio::test]
    async fn statekeeper_operations_are_all_or_nothing_wherever_they_are_killed() {
        let work = work_dir("statekeeper");
        let random = random_kills();
        // Another store's state, as exact and logical exports, to import over this one.
        let other = statekeeper_store(7, 2_500).await;
        let exact = work.join("other.exact.json.zst");
        let logical = work.join("other.statekeeper.json.zst");
        export_of(&other.url, &exact, "exact");
        export_of(&other.url, &logical, "statekeeper");
        drop_database(&other).await;

        let mut scenarios = Vec::new();
        scenarios.push(Scenario {
            name: "import --replace exact",
            template: statekeeper_store(42, 1_500).await,
            framework: "statekeeper",
            schema: "sqlmesh_state",
            batched: false,
            args: args(&["import", "--replace", "--from", exact.to_str().unwrap()]),
        });
        scenarios.push(Scenario {
            name: "import --merge",
            template: statekeeper_store(42, 1_500).await,
            framework: "statekeeper",
            schema: "sqlmesh_state",
            batched: false,
            args: args(&["import", "--merge", "--from", logical.to_str().unwrap()]),
        });
        // A backup, then other state: rollback returns to the backup.
        let rollback = statekeeper_store(42, 1_500).await;
        {
            let store = rollback.store("sqlmesh_state").await;
            store.backup().await.unwrap();
            store
                .import(
                    tokio::fs::File::open(&exact).await.unwrap(),
                    &statekeeper::engine::ImportOptions::replace(),
                )
                .await
                .unwrap();
        }
        scenarios.push(Scenario {
            name: "rollback",
            template: rollback,
            framework: "statekeeper",
            schema: "sqlmesh_state",
            batched: false,
            args: args(&["rollback"]),
        });
        scenarios.push(Scenario {
            name: "reset",
            template: statekeeper_store(42, 1_500).await,
            framework: "statekeeper",
            schema: "sqlmesh_state",
            batched: false,
            args: args(&["reset", "--allow-reset", "--auto-approve"]),
        });
        // A store at the first version, upgraded through every later one.
        let old = TestDb::new().await;
        old.store("sqlmesh_state")
            .await
            .init(Some(1))
            .await
            .unwrap();
        scenarios.push(Scenario {
            name: "upgrade",
            template: old,
            framework: "statekeeper",
            schema: "sqlmesh_state",
            batched: false,
            args: args(&["upgrade"]),
        });
        scenarios.push(Scenario {
            name: "backup",
            template: statekeeper_store(42, 1_500).await,
            framework: "statekeeper",
            schema: "sqlmesh_state",
            batched: false,
            args: args(&["backup"]),
        });
        // Three backups; the prune drops two in one transaction: all or none.
        let pruned = statekeeper_store(42, 1_500).await;
        {
            let store = pruned.store("sqlmesh_state").await;
            for _ in 0..3 {
                store.backup().await.unwrap();
            }
        }
        scenarios.push(Scenario {
            name: "backups prune",
            template: pruned,
            framework: "statekeeper",
            schema: "sqlmesh_state",
            batched: false,
            args: args(&["backups", "prune", "--keep-last", "1"]),
        });
        scenarios.push(Scenario {
            name: "janitor",
            template: statekeeper_store(42, 1_500).await,
            framework: "statekeeper",
            schema: "sqlmesh_state",
            batched: true,
            args: args(&["janitor", "--batch-size", "100", "--grace", "1s"]),
        });
        crash_all("statekeeper operations", scenarios, random, &work).await;
    }

    /// Kills every scenario everywhere, prints the totals, and removes the work folder.
    async fn crash_all(label: &str, scenarios: Vec<Scenario>, random: usize, work: &Path) {
        let mut total = Figures::default();
        for scenario in scenarios {
            let figures = crash_everywhere(scenario, random, work).await;
            total.kills += figures.kills;
            total.partial += figures.partial;
        }
        println!(
            "crash: {label}: {} kills, {} partial states",
            total.kills, total.partial
        );
        assert_eq!(total.partial, 0);
        let _ = std::fs::remove_dir_all(work);
    }

    /// A generated `meltano state export` document: `ids` state IDs `<prefix>:tap-<n>-to-target`.
    fn meltano_document(prefix: &str, ids: u32) -> String {
        let states: Vec<String> = (0..ids)
            .map(|i| {
                format!(
                    "\"{prefix}:tap-{i}-to-target\":{{\"completed\":{{\"singer_state\":{{\"bookmarks\":{{\"users\":{{\"id\":{i}}}}}}}}},\"partial\":{{}}}}"
                )
            })
            .collect();
        format!("{{{}}}", states.join(","))
    }

    #[tokio::test]
    async fn sqlmesh_and_meltano_imports_are_all_or_nothing_wherever_they_are_killed() {
        use super::support::{meltano, sqlmesh};
        let work = work_dir("frameworks");
        let random = random_kills();

        // SQLMesh: the document `sqlmesh state export` writes, of state the real SQLMesh planned,
        // imported into the same store emptied (reset keeps SQLMesh's versions).
        let (planned, _project) = sqlmesh::planned().await;
        let sqlmesh_file = work.join("sqlmesh.json");
        let out = Command::new(env!("CARGO_BIN_EXE_statekeeper"))
            .args([
                "state",
                "--framework",
                "sqlmesh",
                "export",
                "--format",
                "sqlmesh",
                "--to",
            ])
            .arg(&sqlmesh_file)
            .env("STATEKEEPER_DATABASE_URL", &planned.url)
            .env_remove("STATEKEEPER_SCHEMA")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        planned
            .store("sqlmesh")
            .await
            .with_framework(statekeeper::engine::Framework::Sqlmesh)
            .reset(statekeeper::engine::ResetApproval {
                allow_reset: true,
                approved: true,
            })
            .await
            .unwrap();
        let sqlmesh_scenario = Scenario {
            name: "sqlmesh import",
            template: planned,
            framework: "sqlmesh",
            schema: "sqlmesh",
            batched: false,
            args: args(&[
                "import",
                "--replace",
                "--from",
                sqlmesh_file.to_str().unwrap(),
            ]),
        };

        // Meltano: a system database with 2,000 state IDs written by `meltano state import`,
        // replaced by another project's `meltano state export` of 3,000 others.
        let meltano_db = TestDb::new().await;
        let ours = meltano::Project::new(&meltano_db);
        let seed = work.join("seed-a.json");
        std::fs::write(&seed, meltano_document("a", 2_000)).unwrap();
        ours.ok(&["state", "import", seed.to_str().unwrap()]);
        let other_db = TestDb::new().await;
        let other = meltano::Project::new(&other_db);
        let seed = work.join("seed-b.json");
        std::fs::write(&seed, meltano_document("b", 3_000)).unwrap();
        other.ok(&["state", "import", seed.to_str().unwrap()]);
        let meltano_file = work.join("meltano-export.json");
        std::fs::write(&meltano_file, other.ok(&["state", "export"])).unwrap();
        drop_database(&other_db).await;
        let meltano_scenario = Scenario {
            name: "meltano import",
            template: meltano_db,
            framework: "meltano",
            schema: "public",
            batched: false,
            args: args(&[
                "import",
                "--replace",
                "--from",
                meltano_file.to_str().unwrap(),
            ]),
        };

        crash_all(
            "SQLMesh and Meltano imports",
            vec![sqlmesh_scenario, meltano_scenario],
            random,
            &work,
        )
        .await;
    }
}
