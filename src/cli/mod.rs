//! `statekeeper`: the command line. `state …` works against any PostgreSQL URL, no cluster needed.

mod diff;
mod files;
mod output;
mod report;
mod restore;
mod transfer;
mod views;

use std::io::Write as _;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

use files::{
    ExportArgs, IdentityArgs, ImportArgs, VerifyArgs, export_state, import_mode, import_state,
    verify_export,
};

use crate::engine::frameworks::meltano::MeltanoDriver;
use crate::engine::{
    ConnectionSettings, Error, ExportFormat, Framework, JanitorOptions, ResetApproval, SchemaName,
    Store, redact,
};

#[derive(Parser, Debug)]
#[command(
    name = "statekeeper",
    version,
    about = "Manage the Postgres state store of data-transformation frameworks"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Operate on a state store directly.
    State(Box<StateArgs>),
    /// Run the Kubernetes operator (reconciles StateStore resources).
    Operator(crate::controller::OperatorArgs),
    /// Print the CustomResourceDefinitions as YAML.
    Crd,
}

#[derive(Args, Debug)]
pub struct StateArgs {
    /// PostgreSQL URL, e.g. postgres://user:password@host:5432/db
    #[arg(
        long,
        env = "STATEKEEPER_DATABASE_URL",
        hide_env_values = true,
        global = true
    )]
    database_url: Option<String>,
    /// The framework whose state the store holds: statekeeper (statekeeper's own schema), sqlmesh
    /// (SQLMesh's state tables) or meltano (a Meltano system database); SQLMesh and Meltano
    /// create and migrate their own tables.
    #[arg(
        long,
        env = "STATEKEEPER_FRAMEWORK",
        default_value = "statekeeper",
        global = true
    )]
    framework: Framework,
    /// Schema holding the state tables (default: statekeeper; sqlmesh with --framework sqlmesh;
    /// public with --framework meltano).
    #[arg(long, env = "STATEKEEPER_SCHEMA", global = true)]
    schema: Option<String>,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = OutputFormat::Text, global = true)]
    output: OutputFormat,
    /// Seconds to wait for another operation on the same store before giving up.
    #[arg(long, default_value_t = 30, global = true)]
    lock_timeout: u64,
    /// For the operator's Jobs: on success, keep the JSON report (implies -o json) under this
    /// operation id beside the store, or fail (cli::report, engine::job_report).
    #[arg(long, env = "STATEKEEPER_REPORT_ID", global = true, hide = true)]
    report_id: Option<String>,
    #[command(subcommand)]
    command: StateCommand,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum StateCommand {
    /// Create the schema and apply all migrations (idempotent).
    Init {
        /// Stop at this schema version instead of the latest.
        #[arg(long)]
        target_version: Option<i32>,
        /// Create statekeeper's schema even in a database that holds another framework's state
        /// store (SQLMesh, Meltano); without it, init refuses and names the --framework to use.
        #[arg(long)]
        force: bool,
    },
    /// Show the store's versions, pending migrations, row counts and backups (exits 1 when its
    /// schema does not exist).
    Status,
    /// Take a backup now (before running `sqlmesh migrate` or any risky command by hand); prints
    /// its id, which `rollback --backup-id` restores.
    Backup,
    /// Back up, then apply pending migrations up to a target version (default: latest).
    #[command(visible_alias = "migrate")]
    Upgrade {
        #[arg(long)]
        target_version: Option<i32>,
    },
    /// Restore a backup (the newest unless --backup-id names one; which one is said on stderr
    /// first); the replaced state is backed up.
    Rollback {
        #[arg(long)]
        backup_id: Option<String>,
        #[command(flatten)]
        repoint: views::RepointArgs,
    },
    /// SQLMesh: re-point the views of every environment that differs from a backup (the state a
    /// restore replaced) at the snapshots the store now names, through SQLMesh's own code: the
    /// fix a restore prints when it could not reach the warehouse. Exits 3 while views stay stale.
    RepointViews(views::RepointViewsArgs),
    /// Drop every state table (a backup is kept). Needs --allow-reset and --auto-approve.
    Reset {
        /// Confirms that this store may be reset.
        #[arg(long)]
        allow_reset: bool,
        /// Confirms this reset without asking.
        #[arg(long)]
        auto_approve: bool,
    },
    /// Remove expired environments, old checkpoints and unreferenced versions, in batches.
    Janitor(JanitorArgs),
    /// Stream a versioned JSON export of the store to a file, an object store (S3, GCS, Azure) or
    /// stdout.
    Export(ExportArgs),
    /// Import an export from a file, an object store or stdin (validated fully before anything
    /// changes; a backup is kept).
    Import(ImportArgs),
    /// Prove an export restorable: read it back from where it is stored, check it against the
    /// manifest it carries, and restore it into a scratch schema beside the store (dropped
    /// afterwards). The store is only read.
    Verify(VerifyArgs),
    /// Show what differs between two copies of the store's state: backups, exports, the store.
    ///
    /// FROM and TO are each backup:ID, an export's path or URL, or live; TO left out is the store
    /// as it is. SQLMesh: environments (which models moved from which version to which),
    /// snapshots on one side only, intervals added or removed; statekeeper: environments, model
    /// versions, checkpoints; Meltano: state IDs added, removed or changed (with the bookmarks
    /// that changed). A file is restored into a scratch schema beside the store (dropped
    /// afterwards); the store is only read. Exits 0 whether or not anything differs (JSON:
    /// `identical`), 1 on an error.
    Diff(diff::DiffArgs),
    /// List backups (tag, age, size), drop one, or prune them to a retention policy.
    Backups {
        #[command(subcommand)]
        command: Option<BackupsCommand>,
    },
    /// Print what an operation would do and its plan hash, changing nothing. The same inputs give
    /// the hash a StateMigration shows, so it can go into `spec.approval.planHash` before the
    /// object is applied.
    Plan(PlanArgs),
    /// Run a command (e.g. `sqlmesh migrate`) with the store's connection in its environment
    /// (STATEKEEPER_DATABASE_URL, STATEKEEPER_SCHEMA and PGHOST, PGPORT, PGDATABASE, PGUSER,
    /// PGPASSWORD, PGSSLMODE; for Meltano also MELTANO_DATABASE_URI). With --backup: back up first, and restore the backup when the command exits
    /// non-zero or statekeeper is interrupted, after every process it started has ended. Exits
    /// with the command's status (128+N for signal N).
    Run(RunArgs),
}

#[derive(Args, Debug)]
struct PlanArgs {
    /// Plan without the backup the operation makes first (a StateMigration's `backup: false`).
    #[arg(long)]
    no_backup: bool,
    #[command(subcommand)]
    operation: PlanOperation,
}

#[derive(Subcommand, Debug)]
enum PlanOperation {
    /// statekeeper's own steps (--target-version), or the framework's migration run by a runner
    /// (--runner-image: a StateMigration's `upgrade.runner`).
    Upgrade {
        #[arg(long, conflicts_with = "runner_image")]
        target_version: Option<i32>,
        /// The runner's image, as in `upgrade.runner.image`.
        #[arg(long)]
        runner_image: Option<String>,
        /// The runner's command and arguments, as in `upgrade.runner.command` and `.args`
        /// (default: the framework's own migration command).
        #[arg(
            long = "runner-command",
            value_name = "WORD",
            requires = "runner_image"
        )]
        runner_command: Vec<String>,
    },
    /// Restore a backup (the newest unless --backup-id names one).
    Rollback {
        #[arg(long)]
        backup_id: Option<String>,
    },
    /// Remove the store's state (the store must allow it).
    Reset {
        #[arg(long)]
        allow_reset: bool,
    },
    /// Import a file: --from is the URL as the StateMigration names it (`import.source.url`, or
    /// the StateExport's `status.url`).
    Import {
        #[arg(
            long,
            short = 'i',
            value_name = "URL",
            required_unless_present = "backup_id"
        )]
        from: Option<String>,
        /// Plan a merge from this in-database backup instead of a file.
        #[arg(long, value_name = "ID", conflicts_with_all = ["from", "sha256"])]
        backup_id: Option<String>,
        /// Plan a replace (`import.mode: Replace`); the default is a merge.
        #[arg(long, conflicts_with = "merge")]
        replace: bool,
        /// Plan a merge (the default).
        #[arg(long)]
        merge: bool,
        #[command(flatten)]
        selection: restore::SelectionArgs,
        /// The file's expected sha256 (`expectedSha256`, or the StateExport's `status.sha256`).
        #[arg(long, value_name = "HEX")]
        sha256: Option<String>,
        // As `state import --identity` takes them, so that one command line serves both: the
        // plan reads the file to show what the import changes (`changes`, not in the hash).
        #[command(flatten)]
        identities: IdentityArgs,
        /// Object store option KEY=VALUE for reading the file; repeatable.
        #[arg(long = "storage-option", value_name = "KEY=VALUE", value_parser = transfer::key_value)]
        storage_options: Vec<(String, String)>,
    },
    /// Make the store equal to another store of the same framework.
    Copy {
        /// PostgreSQL URL of the source store.
        #[arg(long, value_name = "URL")]
        from_database_url: String,
        /// Schema of the source store (default: the framework's).
        #[arg(long)]
        from_schema: Option<String>,
        /// The source StateStore's name, as `copyFrom.storeRef.name` gives it.
        #[arg(long, value_name = "NAME")]
        from_store: String,
    },
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Back up first; restore the backup when the command fails or is interrupted.
    #[arg(long)]
    backup: bool,
    #[command(flatten)]
    repoint: views::RepointArgs,
    /// The command and its arguments, after `--`.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        required = true,
        value_name = "COMMAND"
    )]
    command: Vec<String>,
}

#[derive(Args, Debug)]
struct JanitorArgs {
    /// Report what would be removed; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Keep the newest N checkpoints of each environment.
    #[arg(long, default_value_t = 10, conflicts_with = "keep_all_checkpoints")]
    keep_checkpoints: u32,
    /// Never remove checkpoints.
    #[arg(long)]
    keep_all_checkpoints: bool,
    /// Checkpoints younger than this always survive (e.g. 7d, 36h).
    #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
    checkpoint_min_age: std::time::Duration,
    /// Unreferenced versions younger than this survive (protects plans in flight).
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    grace: std::time::Duration,
    /// Leave expired environments in place.
    #[arg(long)]
    keep_expired_environments: bool,
    /// The primary environment, never removed.
    #[arg(long, default_value = "prod")]
    unsuffixed_env: String,
    /// Rows removed per transaction.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    batch_size: u32,
    /// Meltano: keep the newest N runs of each job (each job's newest successful run and
    /// every RUNNING run stay whatever N is).
    #[arg(long, default_value_t = 100)]
    keep_runs: u32,
    /// Meltano: runs younger than this always survive (e.g. 7d, 36h).
    #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
    run_min_age: std::time::Duration,
    /// Meltano: first mark stale RUNNING runs failed, as Meltano's own check does (no
    /// heartbeat for 5 minutes, or 24 hours without one).
    #[arg(long)]
    fail_stale_runs: bool,
}

impl JanitorArgs {
    fn options(&self) -> JanitorOptions {
        JanitorOptions {
            expired_environments: !self.keep_expired_environments,
            keep_checkpoints: (!self.keep_all_checkpoints).then_some(self.keep_checkpoints),
            checkpoint_min_age: self.checkpoint_min_age,
            version_grace: self.grace,
            unsuffixed_environment: self.unsuffixed_env.clone(),
            dry_run: self.dry_run,
            batch_size: self.batch_size,
            keep_runs: self.keep_runs,
            run_min_age: self.run_min_age,
            fail_stale_runs: self.fail_stale_runs,
        }
    }
}

#[derive(Subcommand, Debug)]
enum BackupsCommand {
    /// List backups (the default): id, tag, age, size, version, rows.
    List,
    /// Drop the backup with this id.
    Drop { backup_id: String },
    /// Drop the backups a retention policy does not keep (--keep-last, --older-than).
    ///
    /// In one transaction under the store's lock. A backup is kept when it is among the newest N
    /// (--keep-last) or not older than AGE (--older-than), and dropped otherwise: with both
    /// flags, those beyond the newest N that are also older than AGE go; with one, that flag
    /// alone decides. At least one flag is required. A backup that a running `state run
    /// --backup` may restore is always kept.
    Prune(PruneArgs),
}

#[derive(Args, Debug)]
struct PruneArgs {
    /// Keep the newest N backups (0: keep none for this reason).
    #[arg(long, value_name = "N")]
    keep_last: Option<u32>,
    /// Keep backups not older than AGE (e.g. 7d, 12h, 30m); older ones go unless --keep-last
    /// keeps them.
    #[arg(long, value_name = "AGE", value_parser = humantime::parse_duration)]
    older_than: Option<std::time::Duration>,
    /// Report what would be dropped; drop nothing.
    #[arg(long)]
    dry_run: bool,
}

/// Runs a `state` command; errors print one line (never a password) and exit non-zero.
pub async fn run_state(args: StateArgs) -> ExitCode {
    let secret = args
        .database_url
        .as_deref()
        .and_then(crate::engine::connection::password_in_url)
        .unwrap_or_default();
    match execute(&args).await {
        Ok((rendered, status)) => {
            let code = ExitCode::from(status);
            // Empty when the command's output was data on stdout (export --to -).
            if rendered.is_empty() {
                return code;
            }
            let mut stdout = std::io::stdout().lock();
            match writeln!(stdout, "{rendered}").and_then(|()| stdout.flush()) {
                Ok(()) => code,
                // The reader went away (`| head`): the work is done, stop quietly.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => code,
                Err(e) => {
                    eprintln!("error: cannot write the output: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Err(err) => {
            let message = redact(&err.to_string(), &[&secret]);
            match args.output {
                OutputFormat::Json => eprintln!(
                    "{}",
                    serde_json::json!({ "error": { "reason": err.reason(), "message": message } })
                ),
                OutputFormat::Text => eprintln!("error: {message}"),
            }
            ExitCode::FAILURE
        }
    }
}

/// The rendered report, and the exit status (`state run` reports a failed command and exits
/// with its status).
async fn execute(args: &StateArgs) -> Result<(String, u8), Error> {
    let schema = SchemaName::new(
        args.schema
            .as_deref()
            .unwrap_or(args.framework.profile().default_schema),
    )?;
    let url = args.database_url.as_deref().ok_or_else(|| {
        Error::InvalidConnection(
            "no database URL: pass --database-url or set STATEKEEPER_DATABASE_URL".into(),
        )
    })?;
    check_location(&args.command, args.framework)?;
    if let Some(id) = &args.report_id {
        let export_to = match &args.command {
            StateCommand::Export(export) => Some(export.to.as_str()),
            _ => None,
        };
        report::check(id, export_to)?;
    }
    let pool = ConnectionSettings::from_url(url)?.connect().await?;
    let store = Store::new(pool, schema)
        .with_framework(args.framework)
        .with_actor(format!("cli:{}", whoami()))
        .with_lock_timeout(std::time::Duration::from_secs(args.lock_timeout));
    // A recorded report is the JSON one, so a Job's output is that too.
    let json = args.output == OutputFormat::Json || args.report_id.is_some();
    let (rendered, status) = dispatch(args, &store, url, json).await?;
    if let Some(id) = &args.report_id
        && status == 0
    {
        report::record(&store, id, command_name(&args.command), &rendered).await?;
    }
    Ok((rendered, status))
}

/// The command's name, as a recorded report's kind.
fn command_name(command: &StateCommand) -> &'static str {
    match command {
        StateCommand::Init { .. } => "init",
        StateCommand::Status => "status",
        StateCommand::Backup => "backup",
        StateCommand::Upgrade { .. } => "upgrade",
        StateCommand::Rollback { .. } => "rollback",
        StateCommand::RepointViews(_) => "repoint-views",
        StateCommand::Reset { .. } => "reset",
        StateCommand::Janitor(_) => "janitor",
        StateCommand::Export(_) => "export",
        StateCommand::Import(_) => "import",
        StateCommand::Verify(_) => "verify",
        StateCommand::Diff(_) => "diff",
        StateCommand::Backups { command } => match command {
            None | Some(BackupsCommand::List) => "backups list",
            Some(BackupsCommand::Drop { .. }) => "backups drop",
            Some(BackupsCommand::Prune(_)) => "backups prune",
        },
        StateCommand::Plan(_) => "plan",
        StateCommand::Run(_) => "run",
    }
}

/// Runs one command against the store: its rendered report and exit status.
async fn dispatch(
    args: &StateArgs,
    store: &Store,
    url: &str,
    json: bool,
) -> Result<(String, u8), Error> {
    let rendered = match &args.command {
        StateCommand::Init {
            target_version,
            force,
        } => output::init(
            &store
                .clone()
                .beside_other_frameworks(*force)
                .init(*target_version)
                .await?,
            json,
        ),
        StateCommand::Status => {
            let report = store.status().await?;
            if !report.schema_exists {
                return Err(store.schema_not_found().await);
            }
            output::status(&report, json)
        }
        StateCommand::Backup => output::backup(&store.backup().await?, json),
        StateCommand::Upgrade { target_version } => {
            output::upgrade(&store.upgrade(*target_version).await?, json)
        }
        StateCommand::Rollback { backup_id, repoint } => {
            let report = rollback(store, backup_id.as_deref()).await?;
            let rendered = output::rollback(&report, json);
            let replaced = report.pre_rollback_backup.as_ref();
            return restored(store, rendered, replaced, repoint, url, json).await;
        }
        StateCommand::RepointViews(repoint) => {
            let (env, secrets) = (run_environment(url, store), secrets_of(url));
            return views::repoint_views(store, repoint, env, secrets, json).await;
        }
        StateCommand::Reset {
            allow_reset,
            auto_approve,
        } => output::reset(
            &store
                .reset(ResetApproval {
                    allow_reset: *allow_reset,
                    approved: *auto_approve,
                })
                .await?,
            json,
        ),
        StateCommand::Janitor(janitor) => {
            // Names are only printed in JSON; text output shows counts.
            let mut released = Vec::new();
            let report = store
                .janitor(&janitor.options(), |name| {
                    if json {
                        released.push(name);
                    }
                })
                .await?;
            output::janitor(&report, &released, json)
        }
        StateCommand::Export(export) => export_state(store, export, json).await?,
        StateCommand::Import(import) => {
            let (rendered, replaced) = import_state(store, import, json).await?;
            let repoint = &import.repoint;
            return restored(store, rendered, replaced.as_ref(), repoint, url, json).await;
        }
        StateCommand::Verify(verify) => verify_export(store, verify, json).await?,
        StateCommand::Diff(args) => diff::diff_state(store, args, json).await?,
        StateCommand::Backups { command } => match command {
            None | Some(BackupsCommand::List) => output::backups(&store.backups().await?, json),
            Some(BackupsCommand::Drop { backup_id }) => {
                output::dropped_backup(&store.drop_backup(backup_id).await?, json)
            }
            Some(BackupsCommand::Prune(prune)) => {
                let options = crate::engine::PruneOptions {
                    policy: crate::engine::RetentionPolicy {
                        keep_last: prune.keep_last,
                        older_than: prune.older_than,
                    },
                    dry_run: prune.dry_run,
                    ..Default::default()
                };
                output::pruned(&store.prune_backups(&options).await?, json)
            }
        },
        StateCommand::Plan(plan) => output::plan(&plan_operation(store, plan, args).await?, json),
        StateCommand::Run(run) => {
            let env = run_environment(url, store);
            let report = store.run_guarded(&run.command, &env, run.backup).await?;
            let rendered = output::run(&report, json);
            let Some(restore) = &report.restored else {
                return Ok((rendered, report.outcome.exit_code()));
            };
            let replaced = restore.pre_rollback_backup.as_ref();
            let (rendered, _) =
                restored(store, rendered, replaced, &run.repoint, url, json).await?;
            return Ok((rendered, report.outcome.exit_code()));
        }
    };
    Ok((rendered, 0))
}

/// A restore's report with what became of a SQLMesh store's views, and its exit status (3 when
/// views it was asked to re-point stayed stale).
async fn restored(
    store: &Store,
    rendered: String,
    replaced: Option<&crate::engine::BackupInfo>,
    repoint: &views::RepointArgs,
    url: &str,
    json: bool,
) -> Result<(String, u8), Error> {
    let (env, secrets) = (run_environment(url, store), secrets_of(url));
    let report = views::after_restore(store, replaced, repoint, env, secrets).await?;
    let status = views::exit_status(report.as_ref());
    let rendered = views::with_report(rendered, report.as_ref(), store, repoint, json);
    Ok((rendered, status))
}

/// The store's password, as given and decoded: kept out of what a driver reports.
fn secrets_of(url: &str) -> Vec<String> {
    let Some(password) = crate::engine::connection::password_in_url(url) else {
        return Vec::new();
    };
    let decoded = percent_encoding::percent_decode_str(&password)
        .decode_utf8_lossy()
        .into_owned();
    vec![password, decoded]
}

/// `state rollback`: without --backup-id, the newest backup, named on stderr before it is
/// restored (and exactly that one is restored, whatever is backed up meanwhile).
async fn rollback(
    store: &Store,
    backup_id: Option<&str>,
) -> Result<crate::engine::RollbackReport, Error> {
    let chosen = match backup_id {
        Some(id) => id.to_owned(),
        None => {
            let backups = store.backups().await?;
            let count = backups.len();
            let Some(newest) = backups.into_iter().last() else {
                return Err(Error::NoBackups {
                    schema: store.schema().to_string(),
                });
            };
            eprintln!("{}", output::announce_rollback(&newest, count));
            newest.id
        }
    };
    store.rollback(Some(&chosen)).await
}

/// A bad destination, source or flag fails before anything connects.
fn check_location(command: &StateCommand, framework: Framework) -> Result<(), Error> {
    match command {
        StateCommand::Export(export) => {
            transfer::Location::parse(&export.to, &export.storage_options, export.format)?;
            export.recipients()?;
        }
        StateCommand::Import(import) => {
            if let Some(from) = &import.from {
                transfer::Location::parse(from, &import.storage_options, import.format())?;
            }
            import.identities.identities()?;
            import.repoint.check(framework)?;
        }
        StateCommand::Verify(verify) => {
            transfer::Location::parse(&verify.from, &verify.storage_options, ExportFormat::Exact)?;
        }
        StateCommand::Rollback { repoint, .. } => repoint.check(framework)?,
        StateCommand::Run(run) => run.repoint.check(framework)?,
        StateCommand::Diff(args) => args.check()?,
        _ => {}
    }
    Ok(())
}

async fn plan_operation(
    store: &Store,
    plan: &PlanArgs,
    args: &StateArgs,
) -> Result<crate::engine::Plan, Error> {
    use crate::engine::Operation;
    let backup = !plan.no_backup;
    match &plan.operation {
        PlanOperation::Upgrade {
            target_version,
            runner_image: Some(image),
            runner_command,
        } => {
            let _ = target_version;
            let runner =
                crate::engine::plan::runner_description(store.profile(), image, runner_command);
            store
                .plan(Operation::RunnerUpgrade { runner: &runner }, backup)
                .await
        }
        PlanOperation::Upgrade { target_version, .. } => {
            store
                .plan(
                    Operation::Upgrade {
                        target: *target_version,
                    },
                    backup,
                )
                .await
        }
        PlanOperation::Rollback { backup_id } => {
            store
                .plan(
                    Operation::Rollback {
                        backup_id: backup_id.as_deref(),
                    },
                    backup,
                )
                .await
        }
        PlanOperation::Reset { allow_reset } => {
            store
                .plan(
                    Operation::Reset {
                        allow_reset: *allow_reset,
                    },
                    true,
                )
                .await
        }
        PlanOperation::Import {
            from,
            backup_id,
            selection,
            replace,
            merge,
            sha256,
            identities,
            storage_options,
        } => {
            let keys = identities.identities()?;
            let selection = selection.selection(*merge)?;
            let source = match (from, backup_id) {
                (Some(from), _) => from.clone(),
                (None, Some(id)) => format!("backup {id}"),
                (None, None) => String::new(),
            };
            let plan = store
                .plan(
                    Operation::Import {
                        source: &source,
                        mode: import_mode(*replace),
                        expected_sha256: sha256.as_deref(),
                        selection: &selection,
                        backup_id: backup_id.as_deref(),
                    },
                    backup,
                )
                .await?;
            match from {
                // A restore in part is not compared: its plan names what it takes.
                Some(url) if selection.is_empty() => {
                    let mode = import_mode(*replace);
                    let sha256 = sha256.as_deref();
                    diff::with_import_changes(store, plan, url, storage_options, sha256, keys, mode)
                        .await
                }
                _ => Ok(plan),
            }
        }
        PlanOperation::Copy {
            from_database_url,
            from_schema,
            from_store,
        } => {
            let schema = SchemaName::new(
                from_schema
                    .as_deref()
                    .unwrap_or(args.framework.profile().default_schema),
            )?;
            let pool = ConnectionSettings::from_url(from_database_url)?
                .connect()
                .await?;
            let source = Store::new(pool, schema).with_framework(args.framework);
            let label = crate::engine::plan::copy_source_label(from_store);
            store
                .plan(
                    Operation::Copy {
                        from: &source,
                        label: &label,
                    },
                    backup,
                )
                .await
        }
    }
}

/// The store's connection for a command: statekeeper's own variables and libpq's, which most
/// frameworks' configs can read.
fn run_environment(url: &str, store: &Store) -> Vec<(String, String)> {
    let mut env = vec![
        ("STATEKEEPER_DATABASE_URL".to_owned(), url.to_owned()),
        ("STATEKEEPER_SCHEMA".to_owned(), store.schema().to_string()),
        (
            "STATEKEEPER_FRAMEWORK".to_owned(),
            store.framework().to_string(),
        ),
    ];
    if let Ok(settings) = ConnectionSettings::from_url(url) {
        env.extend(settings.libpq_environment());
    }
    if let Some(decoded) = secrets_of(url).pop() {
        env.push(("PGPASSWORD".to_owned(), decoded));
    }
    if store.framework() == Framework::Meltano {
        // Meltano reads its database from MELTANO_DATABASE_URI (else a SQLite file in the
        // project): a URI without host or secret, completed by the driver from the PG* above.
        let driver = MeltanoDriver::detect(std::env::var_os("PATH").as_deref()).unwrap_or_default();
        env.push((
            "MELTANO_DATABASE_URI".to_owned(),
            driver.database_uri().to_owned(),
        ));
        env.extend(crate::engine::frameworks::meltano::search_path_option(
            store.schema().as_str(),
        ));
    }
    env
}

fn whoami() -> String {
    std::env::var("USER").unwrap_or_else(|_| "unknown".into())
}
