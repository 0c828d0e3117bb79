//! Plans: what an operation will do to a store, computed from the store as it is, with a hash
//! that binds an approval to exactly that plan. The hash covers every table's row count and a
//! checksum of its rows, so any change to the store (a `sqlmesh plan`, a janitor run) changes the
//! hash and voids an approval given before it.

use std::collections::BTreeMap;

use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::{AssertSqlSafe, PgConnection};
use tokio::io::AsyncRead;

use super::Error;
use super::backup::{self, BackupInfo};
use super::diff::{self, DiffOptions, DiffReport, DiffSide, FileSource, Side};
use super::framework::{Framework, Profile, ResetStyle};
use super::guards;
use super::hooks;
use super::identifier::quote_ident;
use super::store::Store;
use crate::engine::transfer::{ImportMode, Selection};

/// Hex digits of a plan hash: 64 bits, plenty to tell two plans of one store apart.
pub const PLAN_HASH_LEN: usize = 16;

/// Items a plan's diff keeps per list: its summary names only the first few.
const PLAN_DIFF_LIMIT: usize = 20;

/// An operation to plan.
#[derive(Clone, Copy)]
pub enum Operation<'a> {
    /// statekeeper's own steps, up to `target` (default: latest).
    Upgrade {
        target: Option<i32>,
    },
    /// The framework's own migration, run by `runner` (a Job, or a local command).
    RunnerUpgrade {
        runner: &'a str,
    },
    Rollback {
        backup_id: Option<&'a str>,
    },
    Reset {
        allow_reset: bool,
    },
    /// An import of the file at `source`, or (`backup_id`) a merge from an in-database backup;
    /// a non-empty `selection` restores only part of it.
    Import {
        source: &'a str,
        mode: ImportMode,
        expected_sha256: Option<&'a str>,
        selection: &'a Selection,
        backup_id: Option<&'a str>,
    },
    /// Make the store equal to `from` (named `label` for people).
    Copy {
        from: &'a Store,
        label: &'a str,
    },
}

impl Operation<'_> {
    pub fn name(&self) -> &'static str {
        match self {
            Operation::Upgrade { .. } | Operation::RunnerUpgrade { .. } => "upgrade",
            Operation::Rollback { .. } => "rollback",
            Operation::Reset { .. } => "reset",
            Operation::Import { .. } => "import",
            Operation::Copy { .. } => "copy",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PlannedTable {
    pub name: String,
    pub rows: i64,
    /// An order-independent checksum of the table's rows.
    pub checksum: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    pub operation: String,
    pub framework: Framework,
    pub schema: String,
    pub from_version: i32,
    /// Unknown ahead of time where the framework migrates itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to_version: Option<i32>,
    /// The framework's own version facts (SQLMesh's and SQLGlot's versions).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub versions: BTreeMap<String, String>,
    /// What will be done, in order.
    pub steps: Vec<String>,
    /// The store's tables as they are now.
    pub tables: Vec<PlannedTable>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// A restore in part: what it takes from its source (hashed with the rest).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selection: Option<Selection>,
    /// True when there is nothing to do (an upgrade of a store already at its target).
    pub no_op: bool,
    /// A rollback's backup, with its age as the plan was made. Not part of the hash (its age
    /// changes by the second; its id is in `source`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restores: Option<BackupInfo>,
    /// What the operation changes, from a diff of the store now with what it becomes (a
    /// rollback: the backup; an import planned with its file at hand: the file). Not part of the
    /// hash: it is a function of what the hash covers (the store's rows, the backup's id, the
    /// file's sha256 when pinned), and a plan made without reading the file has none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub changes: Option<PlanChanges>,
    /// sha256 of everything above, first [`PLAN_HASH_LEN`] hex digits.
    pub hash: String,
}

/// What an operation changes, in the few lines of [`DiffReport::summary_lines`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PlanChanges {
    /// What was compared with what: `the store now → backup 2026…`.
    pub compared: String,
    /// What differs (the store now is FROM: "added" is what the operation brings, "removed"
    /// what it takes away), or why nothing could be compared.
    pub summary: Vec<String>,
}

impl PlanChanges {
    /// Changes that could not be compared, saying why.
    pub fn not_compared(compared: String, why: &Error) -> Self {
        Self {
            compared,
            summary: vec![format!("not compared: {why}")],
        }
    }

    fn from_report(compared: String, report: &DiffReport) -> Self {
        Self {
            compared,
            summary: report.summary_lines(),
        }
    }
}

impl Plan {
    fn sealed(mut self) -> Self {
        self.hash = String::new();
        let restores = self.restores.take();
        let changes = self.changes.take();
        let canonical = serde_json::to_vec(&self).unwrap_or_default();
        let digest = hex::encode(Sha256::digest(&canonical));
        self.hash = digest[..PLAN_HASH_LEN].to_owned();
        self.restores = restores;
        self.changes = changes;
        self
    }

    /// The plan with what the operation changes (which leaves its hash as it is).
    pub fn with_changes(mut self, changes: PlanChanges) -> Self {
        self.changes = Some(changes);
        self
    }

    pub fn total_rows(&self) -> i64 {
        self.tables.iter().map(|t| t.rows).sum()
    }
}

/// How a runner appears in a plan. The operator describes `upgrade.runner` and the CLI
/// `--runner-image` the same way, so that one request gets one hash wherever it is planned.
pub fn runner_description(profile: &Profile, image: &str, command: &[String]) -> String {
    let command = if command.is_empty() {
        profile.migrate_command.join(" ")
    } else {
        command.join(" ")
    };
    format!("a Job running `{command}` in image {image}")
}

/// How a copy's source appears in a plan (shared by the operator and the CLI, as above).
pub fn copy_source_label(store_name: &str) -> String {
    format!("StateStore {store_name}")
}

/// Where a planned import reads from: a file, or an in-database backup.
struct ImportSource<'a> {
    url: &'a str,
    expected_sha256: Option<&'a str>,
    backup: Option<&'a BackupInfo>,
}

/// What every operation's plan starts from: the store as one snapshot found it.
struct Planning {
    initialized: bool,
    from_version: i32,
    table_count: usize,
    rows: i64,
    /// Whether the operation backs the store up first.
    backup: bool,
}

impl Planning {
    /// The backup step, when the operation makes one (and there is something to back up).
    fn backup_step(&self, store: &Store, reason: &str) -> Option<String> {
        (self.backup && self.initialized).then(|| {
            format!(
                "back up the store's {} tables ({} rows) to {}__backup_<id> ({reason})",
                self.table_count,
                self.rows,
                store.schema()
            )
        })
    }
}

impl Store {
    /// Plans `operation` from one consistent snapshot of the store, changing nothing.
    /// `backup` says whether the operation will back the store up first. Each operation's
    /// checks are the ones the operation itself makes (`guards.rs`), so an approved plan and
    /// the run it approves refuse alike.
    pub async fn plan(&self, operation: Operation<'_>, backup: bool) -> Result<Plan, Error> {
        let mut tx = self.begin_snapshot().await?;
        let version = hooks::read_version(self, &mut tx).await?;
        if version.is_none() {
            self.refuse_other_framework(&mut tx).await?;
        }
        let initialized = version.is_some();
        let version = version.unwrap_or_default();
        let tables = self.table_fingerprints(&mut tx).await?;
        let planning = Planning {
            initialized,
            from_version: version.schema_version,
            table_count: tables.len(),
            rows: tables.iter().map(|t| t.rows).sum(),
            backup,
        };
        let mut plan = Plan {
            operation: operation.name().into(),
            framework: self.framework(),
            schema: self.schema().to_string(),
            from_version: planning.from_version,
            to_version: None,
            versions: version.details,
            steps: Vec::new(),
            tables: Vec::new(),
            backup: None,
            job: None,
            source: None,
            selection: None,
            no_op: false,
            restores: None,
            changes: None,
            hash: String::new(),
        };
        match operation {
            Operation::Upgrade { target } => self.plan_upgrade(&planning, &mut plan, target)?,
            Operation::RunnerUpgrade { runner } => {
                self.plan_runner_upgrade(&planning, &mut plan, runner)?
            }
            Operation::Rollback { backup_id } => {
                let restored = backup::find(&mut tx, self.schema(), backup_id).await?;
                self.plan_rollback(&planning, &mut plan, &restored);
                let compared = format!(
                    "the store now → backup {}: what the rollback restores (added) and undoes \
                     (removed)",
                    restored.id
                );
                let changes = self
                    .backup_changes(&mut tx, &planning, &restored, compared, false)
                    .await?;
                plan.changes = Some(changes);
            }
            Operation::Reset { allow_reset } => {
                self.plan_reset(&planning, &mut plan, allow_reset)?
            }
            Operation::Import {
                source,
                mode,
                expected_sha256,
                selection,
                backup_id,
            } => {
                let from_backup = match backup_id {
                    Some(id) => Some(backup::find(&mut tx, self.schema(), Some(id)).await?),
                    None => None,
                };
                let source = ImportSource {
                    url: source,
                    expected_sha256,
                    backup: from_backup.as_ref(),
                };
                self.plan_import(&planning, &mut plan, &source, mode, selection)?;
                // A merge of a whole backup (a restore in part names what it takes instead).
                if let Some(merged) = from_backup.as_ref().filter(|_| selection.is_empty()) {
                    let compared = format!(
                        "the store now → the store merged with backup {}: what the backup adds \
                         or replaces (nothing else goes)",
                        merged.id
                    );
                    let changes = self
                        .backup_changes(&mut tx, &planning, merged, compared, true)
                        .await?;
                    plan.changes = Some(changes);
                }
            }
            Operation::Copy { from, label } => {
                self.plan_copy(&planning, &mut plan, from, label).await?
            }
        }
        tx.commit().await?;
        if let Some(step) = plan.backup.clone() {
            plan.steps.insert(0, step);
        }
        plan.tables = tables;
        Ok(plan.sealed())
    }

    fn plan_upgrade(
        &self,
        planning: &Planning,
        plan: &mut Plan,
        target: Option<i32>,
    ) -> Result<(), Error> {
        let profile = self.profile();
        if !profile.owns_schema {
            return Err(Error::InvalidOperation(format!(
                "{} migrates its own state tables: upgrade it with a runner (a Job running \
                 `{}`), or locally with `statekeeper state run --backup --framework {} \
                 -- {}`",
                profile.display_name,
                profile.migrate_command.join(" "),
                profile.framework.as_str(),
                profile.migrate_command.join(" ")
            )));
        }
        if !planning.initialized {
            return Err(self.not_initialized());
        }
        let from_version = planning.from_version;
        let target = self.upgrade_target(target)?;
        let latest = self.chain().latest();
        if from_version > latest {
            return Err(Error::SchemaNewer {
                schema: self.schema().to_string(),
                current: from_version,
                latest,
            });
        }
        guards::refuse_downgrade(target, from_version)?;
        plan.to_version = Some(target);
        plan.steps = self
            .chain()
            .between(from_version, target)
            .map(|m| format!("apply migration {}: {}", m.version, m.description))
            .collect();
        plan.no_op = plan.steps.is_empty();
        if plan.no_op {
            plan.steps
                .push(format!("nothing to do: the store is at version {target}"));
        } else {
            plan.backup = planning.backup_step(self, "pre-upgrade");
            plan.steps.push(format!(
                "record the upgrade from {from_version} to {target} in the store's history"
            ));
        }
        Ok(())
    }

    fn plan_runner_upgrade(
        &self,
        planning: &Planning,
        plan: &mut Plan,
        runner: &str,
    ) -> Result<(), Error> {
        let profile = self.profile();
        if profile.owns_schema {
            return Err(Error::InvalidOperation(format!(
                "statekeeper upgrades the {} schema itself: set upgrade.targetVersion (or \
                 nothing, for the latest) instead of a runner",
                profile.display_name
            )));
        }
        if !planning.initialized {
            return Err(self.not_initialized());
        }
        plan.backup = planning.backup_step(self, "pre-migration");
        plan.job = Some(runner.to_owned());
        plan.steps.push(format!("run {runner}"));
        plan.steps.push(if plan.backup.is_some() {
            "if it fails or passes its deadline: restore the backup".into()
        } else {
            "if it fails: nothing is restored (backup: false)".into()
        });
        Ok(())
    }

    fn plan_rollback(&self, planning: &Planning, plan: &mut Plan, restored: &BackupInfo) {
        plan.to_version = Some(restored.schema_version);
        plan.backup = planning.backup_step(self, "pre-rollback");
        plan.source = Some(restored.describe());
        plan.steps.push(format!(
            "replace every table of the store with backup {}",
            restored.id
        ));
        plan.restores = Some(restored.clone());
    }

    /// What a rollback to a backup (or a merge of it) changes: the store now against the backup,
    /// in the plan's snapshot. A diff that cannot run (a backup of another SQLMesh state version, a
    /// table its version lacks) is no failure of the plan: its changes say why instead.
    async fn backup_changes(
        &self,
        tx: &mut PgConnection,
        planning: &Planning,
        restored: &BackupInfo,
        compared: String,
        merge: bool,
    ) -> Result<PlanChanges, Error> {
        if !planning.initialized {
            return Ok(PlanChanges {
                compared,
                summary: vec![format!(
                    "the store holds no state now: all of backup {} comes back ({} rows)",
                    restored.id, restored.rows
                )],
            });
        }
        let from = Side {
            version: Some(planning.from_version),
            ..Side::live(self, "the store now")
        };
        let to = Side::backup(self, restored);
        let options = DiffOptions {
            limit: PLAN_DIFF_LIMIT,
            merge,
        };
        // In a savepoint: a diff that fails leaves the plan's snapshot usable.
        let mut savepoint = sqlx::Connection::begin(&mut *tx).await?;
        match diff::compare(self, &mut savepoint, &from, &to, &options).await {
            Ok(report) => {
                savepoint.commit().await?;
                Ok(PlanChanges::from_report(compared, &report))
            }
            Err(e @ (Error::Incomparable { .. } | Error::Database(_))) => {
                savepoint.rollback().await?;
                Ok(PlanChanges::not_compared(compared, &e))
            }
            Err(e) => Err(e),
        }
    }

    /// What importing a file changes, for a plan made with the file at hand (`state plan import
    /// --from`): the store now against the file restored in scratch; for a merge, only what the
    /// merge changes. A file that cannot be read or restored is said in the changes rather than
    /// failing the plan (the import itself refuses it); an unreachable database fails it.
    pub async fn import_changes<R: AsyncRead + Unpin + Send + 'static>(
        &self,
        reader: R,
        source: FileSource,
        mode: ImportMode,
    ) -> Result<PlanChanges, Error> {
        let compared = match mode {
            ImportMode::Replace => format!(
                "the store now → {}: a replace, the store becomes the file's state",
                source.label
            ),
            ImportMode::Merge => format!(
                "the store now → the store merged with {}: what the file adds or replaces \
                 (nothing else goes)",
                source.label
            ),
        };
        let options = DiffOptions {
            limit: PLAN_DIFF_LIMIT,
            merge: mode == ImportMode::Merge,
        };
        match self
            .diff(DiffSide::Live, DiffSide::File(reader, source), &options)
            .await
        {
            Ok(report) => Ok(PlanChanges::from_report(compared, &report)),
            Err(e) if e.is_connection_error() => Err(e),
            Err(e) => Ok(PlanChanges::not_compared(compared, &e)),
        }
    }

    fn plan_reset(
        &self,
        planning: &Planning,
        plan: &mut Plan,
        allow_reset: bool,
    ) -> Result<(), Error> {
        guards::refuse_reset_not_allowed(allow_reset)?;
        let profile = self.profile();
        let (tables, rows) = (planning.table_count, planning.rows);
        plan.backup = planning.backup_step(self, "pre-reset");
        plan.steps.push(match &profile.reset {
            ResetStyle::DropTables => {
                format!("drop the store's {tables} tables ({rows} rows); `init` creates them again")
            }
            ResetStyle::EmptyTables { keep } => format!(
                "empty the store's tables except {} ({rows} rows in all)",
                keep.join(", ")
            ),
        });
        plan.to_version = Some(match profile.reset {
            ResetStyle::DropTables => 0,
            ResetStyle::EmptyTables { .. } => planning.from_version,
        });
        Ok(())
    }

    fn plan_import(
        &self,
        planning: &Planning,
        plan: &mut Plan,
        source: &ImportSource<'_>,
        mode: ImportMode,
        selection: &Selection,
    ) -> Result<(), Error> {
        if !planning.initialized {
            return Err(self.not_initialized());
        }
        selection.check(self.framework(), mode)?;
        plan.backup = planning.backup_step(self, "pre-import");
        plan.to_version = Some(planning.from_version);
        let read = match source.backup {
            Some(backup) => {
                if mode == ImportMode::Replace {
                    return Err(Error::InvalidOperation(format!(
                        "an import from backup {} is a merge; to make the store equal to the \
                         backup, plan a rollback",
                        backup.id
                    )));
                }
                plan.source = Some(backup.describe());
                format!("read backup {} as one snapshot", backup.id)
            }
            None => {
                plan.source = Some(match source.expected_sha256 {
                    Some(sha) => format!("{} (sha256 {sha})", source.url),
                    None => format!(
                        "{} (not pinned: set expectedSha256 to bind an approval to the file's \
                         content)",
                        source.url
                    ),
                });
                "read the whole file and validate it before writing".into()
            }
        };
        plan.steps.push(read);
        if !selection.is_empty() {
            plan.selection = Some(selection.clone());
            plan.steps.push(format!(
                "keep only {} (each environment with the versions it references, each model's \
                 versions with their intervals); refuse a name the source does not have",
                selection.describe()
            ));
            plan.steps.push(
                "merge them: they replace their namesakes; nothing else in the store changes"
                    .into(),
            );
            return Ok(());
        }
        let what = if source.backup.is_some() {
            "backup"
        } else {
            "file"
        };
        plan.steps.push(match mode {
            ImportMode::Replace => format!("replace the store's state with the {what}'s"),
            ImportMode::Merge => {
                format!("merge the {what}: what it holds replaces its namesakes, the rest stays")
            }
        });
        Ok(())
    }

    async fn plan_copy(
        &self,
        planning: &Planning,
        plan: &mut Plan,
        from: &Store,
        label: &str,
    ) -> Result<(), Error> {
        self.refuse_copy_across_frameworks(from)?;
        if !planning.initialized {
            return Err(self.not_initialized());
        }
        let from_version = planning.from_version;
        let mut source_tx = from.begin_snapshot().await?;
        let source_version = from.require_initialized(&mut source_tx).await?;
        let source_tables = from.table_fingerprints(&mut source_tx).await?;
        source_tx.commit().await?;
        let source_rows: i64 = source_tables.iter().map(|t| t.rows).sum();
        let digest = {
            let mut hasher = Sha256::new();
            for table in &source_tables {
                hasher.update(format!("{}:{}:{};", table.name, table.rows, table.checksum));
            }
            hex::encode(hasher.finalize())[..PLAN_HASH_LEN].to_owned()
        };
        if source_version.schema_version != from_version {
            return Err(Error::InvalidOperation(format!(
                "{label} is at schema version {}, this store at {from_version}: upgrade the older \
                 one first",
                source_version.schema_version
            )));
        }
        plan.to_version = Some(source_version.schema_version);
        plan.backup = planning.backup_step(self, "pre-import");
        plan.source = Some(format!(
            "{label}: schema \"{}\", version {}, {} tables, {source_rows} rows, content {digest}",
            from.schema(),
            source_version.schema_version,
            source_tables.len()
        ));
        plan.steps.push(format!(
            "replace every table of the store with {label}'s rows, streamed in one transaction"
        ));
        Ok(())
    }

    /// Row count and an order-independent checksum of every table of the store.
    async fn table_fingerprints(
        &self,
        conn: &mut PgConnection,
    ) -> Result<Vec<PlannedTable>, Error> {
        let tables = self.tables(conn).await?;
        if tables.is_empty() {
            return Ok(Vec::new());
        }
        let selects: Vec<String> = tables
            .iter()
            .map(|t| {
                format!(
                    "SELECT {name}::text, count(*)::bigint, \
                     coalesce(sum(hashtextextended(r::text, 0)::numeric), 0)::text \
                     FROM {s}.{table} r",
                    name = super::identifier::quote_literal(t),
                    s = self.schema().quoted(),
                    table = quote_ident(t)
                )
            })
            .collect();
        let rows: Vec<(String, i64, String)> =
            sqlx::query_as(AssertSqlSafe(selects.join(" UNION ALL ")))
                .fetch_all(&mut *conn)
                .await?;
        let mut out: Vec<PlannedTable> = rows
            .into_iter()
            .map(|(name, rows, sum)| PlannedTable {
                name,
                rows,
                checksum: hex::encode(Sha256::digest(sum.as_bytes()))[..PLAN_HASH_LEN].to_owned(),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }
}
