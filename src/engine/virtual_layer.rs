//! SQLMesh's virtual layer after a restore. A restore puts SQLMesh's state back, but the views of
//! its environments live in the warehouse, where the restore cannot reach: they still select from
//! the tables of the state that was replaced, and `sqlmesh plan` sees no change to make. This
//! finds the environments whose snapshots the restore changed (the state it replaced, kept in a
//! backup, against the store now) and re-points their views through SQLMesh's own code, run by
//! the `sqlmesh` of the project (`repoint_views.py`), pinned to the store's SQLMesh version.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt as _;

use super::Error;
use super::backup;
use super::connection::redact;
use super::framework::Framework;
use super::frameworks::sqlmesh::environments::environment_changes;
pub use super::frameworks::sqlmesh::environments::{Change, EnvironmentChange};
use super::store::Store;

/// The driver run with the `sqlmesh` installation's Python: SQLMesh's promotion and view naming.
/// Public for the operator's re-point Job, which runs it as `PYTHON -c DRIVER` in the project's
/// image.
pub const DRIVER: &str = include_str!("frameworks/sqlmesh/repoint_views.py");

/// The environment variable the driver reads its request from (else stdin).
pub const REQUEST_ENV: &str = "STATEKEEPER_REPOINT_REQUEST";

/// Where the project is, and the `sqlmesh` whose code re-points its views.
#[derive(Clone, Debug)]
pub struct RepointOptions {
    /// The SQLMesh project directory (its config names the warehouse and the state connection).
    pub project: PathBuf,
    /// The project's gateway (default: its `default_gateway`).
    pub gateway: Option<String>,
    /// The `sqlmesh` executable; the Python it runs with runs the driver.
    pub sqlmesh: PathBuf,
    /// Environment for the driver (the store's connection, as `state run` gives a command).
    pub env: Vec<(String, String)>,
    /// Secrets to keep out of what the driver reports.
    pub secrets: Vec<String>,
}

/// What became of the virtual layer after a restore.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VirtualLayerReport {
    /// The backup of the state the restore replaced: the side the views were built for.
    pub since_backup: String,
    /// The environments whose snapshots the restore changed.
    pub changes: Vec<EnvironmentChange>,
    /// Those re-pointed, with how many views each got and lost.
    pub repointed: Vec<RepointedEnvironment>,
    /// Those whose views still select from the replaced state's tables.
    pub stale: Vec<String>,
    /// Why they are stale (not asked to re-point, the warehouse unreachable, …).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<RepointFailure>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RepointedEnvironment {
    pub name: String,
    /// Views created or replaced.
    pub promoted: u64,
    /// Views dropped (models the restored environment no longer has).
    pub demoted: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RepointFailure {
    /// `NotRequested`, `WarehouseUnreachable`, `SqlmeshVersionMismatch`, `SqlmeshNotFound`,
    /// `PhysicalTablesMissing`, `SnapshotsMissing`, `RepointFailed`.
    pub reason: String,
    pub message: String,
}

impl VirtualLayerReport {
    /// True when every view agrees with the restored state.
    pub fn is_current(&self) -> bool {
        self.stale.is_empty()
    }
}

impl Store {
    /// The environments whose views a restore made stale: those that differ between the backup
    /// of the replaced state and the store now.
    pub async fn virtual_layer_changes(
        &self,
        since_backup: &str,
    ) -> Result<Vec<EnvironmentChange>, Error> {
        self.require_sqlmesh()?;
        let mut conn = self.pool().acquire().await?;
        let info = backup::find(&mut conn, self.schema(), Some(since_backup)).await?;
        let before = self.schema().backup_of(&info.id);
        environment_changes(&mut conn, &before, self.schema()).await
    }

    /// Re-points the views of the environments a restore changed (see
    /// [`Store::virtual_layer_changes`]); without `options`, only reports them stale. A driver
    /// that fails leaves them reported stale with the reason: the restore stands either way.
    pub async fn repoint_views(
        &self,
        since_backup: &str,
        options: Option<&RepointOptions>,
    ) -> Result<VirtualLayerReport, Error> {
        let changes = self.virtual_layer_changes(since_backup).await?;
        let mut report = VirtualLayerReport {
            since_backup: since_backup.to_owned(),
            stale: changes.iter().map(|c| c.name.clone()).collect(),
            changes,
            repointed: Vec::new(),
            failure: None,
        };
        if report.changes.is_empty() {
            return Ok(report);
        }
        let Some(options) = options else {
            report.failure = Some(RepointFailure {
                reason: "NotRequested".into(),
                message: "views were not re-pointed (no --repoint-views)".into(),
            });
            return Ok(report);
        };
        let version = self.sqlmesh_version().await?;
        let request = request(&report.changes, options.gateway.as_deref(), version);
        match run_driver(options, &request).await {
            Ok(repointed) => {
                report.stale.clear();
                report.repointed = repointed;
            }
            Err(failure) => {
                report.failure = Some(RepointFailure {
                    message: redact(
                        &failure.message,
                        &options
                            .secrets
                            .iter()
                            .map(String::as_str)
                            .collect::<Vec<_>>(),
                    ),
                    ..failure
                });
            }
        }
        Ok(report)
    }

    fn require_sqlmesh(&self) -> Result<(), Error> {
        if self.framework() == Framework::Sqlmesh {
            return Ok(());
        }
        Err(Error::UnsupportedOperation {
            framework: self.framework().to_string(),
            operation: "re-point views of".into(),
            hint: "only SQLMesh keeps views in a warehouse: use --framework sqlmesh".into(),
        })
    }

    /// The SQLMesh version that wrote the store: the driver refuses to run with another.
    pub async fn sqlmesh_version(&self) -> Result<Option<String>, Error> {
        Ok(self.version().await?.details.get("sqlmeshVersion").cloned())
    }
}

/// The command that re-points the views later, for a person to run once the warehouse can be
/// reached (with the same `--database-url`; no secret is in it).
pub fn repoint_command(
    schema: &str,
    since_backup: &str,
    project: Option<&Path>,
    gateway: Option<&str>,
) -> String {
    let mut command = String::from("statekeeper state repoint-views --framework sqlmesh");
    if schema != Framework::Sqlmesh.profile().default_schema {
        command.push_str(&format!(" --schema {schema}"));
    }
    command.push_str(&format!(" --since-backup {since_backup} --project "));
    match project {
        Some(dir) => command.push_str(&shell_word(&dir.to_string_lossy())),
        None => command.push_str("PROJECT_DIR"),
    }
    if let Some(gateway) = gateway {
        command.push_str(&format!(" --gateway {}", shell_word(gateway)));
    }
    command
}

/// A word as a POSIX shell reads it back unchanged.
fn shell_word(word: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./:=@%+,".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// The driver's request: per environment, the models to promote (those with a snapshot now) and
/// the old entries whose views go (those without one). The CLI writes it to the driver's stdin;
/// the operator's re-point Job gets it in `STATEKEEPER_REPOINT_REQUEST` ([`REQUEST_ENV`]).
pub fn request(
    changes: &[EnvironmentChange],
    gateway: Option<&str>,
    version: Option<String>,
) -> serde_json::Value {
    let environments: Vec<serde_json::Value> = changes
        .iter()
        .map(|change| {
            let promote: Vec<&str> = change
                .models
                .iter()
                .filter(|m| m.to.is_some())
                .map(|m| m.name.as_str())
                .collect();
            let demote: Vec<&str> = change
                .models
                .iter()
                .filter_map(|m| m.from_entry.as_deref())
                .collect();
            serde_json::json!({
                "name": change.name,
                "change": match change.change {
                    Change::Added => "added",
                    Change::Removed => "removed",
                    Change::Changed => "changed",
                },
                "promote": promote,
                "demote": demote,
                "fromNaming": change.from_naming,
            })
        })
        .collect();
    serde_json::json!({
        "sqlmeshVersion": version,
        "gateway": gateway,
        "environments": environments,
    })
}

#[derive(Deserialize)]
struct DriverOutput {
    #[serde(default)]
    environments: Vec<RepointedEnvironment>,
    #[serde(default)]
    error: Option<RepointFailure>,
}

/// Runs the driver in the project with the Python of `options.sqlmesh`; its last line of output
/// is its report.
async fn run_driver(
    options: &RepointOptions,
    request: &serde_json::Value,
) -> Result<Vec<RepointedEnvironment>, RepointFailure> {
    let failure = |reason: &str, message: String| RepointFailure {
        reason: reason.into(),
        message,
    };
    let python = python_of(&options.sqlmesh).map_err(|m| failure("SqlmeshNotFound", m))?;
    let mut child = tokio::process::Command::new(&python)
        .arg("-c")
        .arg(DRIVER)
        .current_dir(&options.project)
        .envs(options.env.iter().map(|(k, v)| (k, v)))
        .env("NO_COLOR", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            failure(
                "SqlmeshNotFound",
                format!("cannot run {}: {e}", python.display()),
            )
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        let written = stdin.write_all(request.to_string().as_bytes()).await;
        drop(stdin);
        written.map_err(|e| failure("RepointFailed", format!("cannot talk to SQLMesh: {e}")))?;
    }
    let output = child
        .wait_with_output()
        .await
        .map_err(|e| failure("RepointFailed", format!("SQLMesh did not finish: {e}")))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().rev().find(|l| l.starts_with('{'));
    let parsed = last.and_then(|l| serde_json::from_str::<DriverOutput>(l).ok());
    match parsed {
        Some(DriverOutput { error: Some(e), .. }) => Err(e),
        Some(DriverOutput { environments, .. }) if output.status.success() => Ok(environments),
        _ => {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
            Err(failure(
                "RepointFailed",
                format!(
                    "SQLMesh ended with {} and no report: {}",
                    output.status,
                    tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
                ),
            ))
        }
    }
}

/// The interpreter a `sqlmesh` console script runs with (its `#!` line), else the `python3`
/// beside it.
fn python_of(sqlmesh: &Path) -> Result<PathBuf, String> {
    let resolved = if sqlmesh.components().count() > 1 {
        sqlmesh.to_path_buf()
    } else {
        find_on_path(sqlmesh).ok_or_else(|| {
            format!(
                "no {} on PATH: install SQLMesh (the store's version) or pass --sqlmesh PATH",
                sqlmesh.display()
            )
        })?
    };
    let head =
        std::fs::read(&resolved).map_err(|e| format!("cannot read {}: {e}", resolved.display()))?;
    let first = head.split(|b| *b == b'\n').next().unwrap_or_default();
    if let Some(shebang) = first.strip_prefix(b"#!") {
        let line = String::from_utf8_lossy(shebang);
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some(env), Some(program)) if env.ends_with("/env") => {
                return Ok(PathBuf::from(program));
            }
            (Some(interpreter), _) if interpreter.contains("python") => {
                return Ok(PathBuf::from(interpreter));
            }
            _ => {}
        }
    }
    let beside = resolved.with_file_name("python3");
    if beside.exists() {
        return Ok(beside);
    }
    Err(format!(
        "{} is not a Python console script, and no python3 is beside it: pass --sqlmesh with \
         the sqlmesh of a Python installation",
        resolved.display()
    ))
}

fn find_on_path(program: &Path) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}
