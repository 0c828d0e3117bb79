//! A framework's own command (`sqlmesh migrate`, `sqlmesh janitor`, anything risky) wrapped in a
//! backup and an automatic restore: the local twin of the operator's runner Jobs.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::Error;
use super::backup::BackupInfo;
use super::store::{RollbackReport, Store, elapsed_ms};

/// How a guarded command ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum RunOutcome {
    /// Exit status 0.
    Succeeded,
    /// A non-zero exit status, or a signal (`code` is none then).
    Failed { code: Option<i32> },
    /// statekeeper was interrupted (Ctrl-C, SIGTERM) and stopped the command.
    Interrupted,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunReport {
    pub command: Vec<String>,
    pub outcome: RunOutcome,
    /// The backup taken before the command; none with backups turned off.
    pub backup: Option<BackupInfo>,
    /// Set when the backup was restored because the command did not succeed.
    pub restored: Option<RollbackReport>,
    pub from_version: i32,
    pub to_version: i32,
    pub duration_ms: u64,
}

impl RunReport {
    pub fn succeeded(&self) -> bool {
        self.outcome == RunOutcome::Succeeded
    }
}

impl Store {
    /// Backs the store up (unless backups are off), runs `command` with `env` added to its
    /// environment, and restores the backup when the command fails or statekeeper is
    /// interrupted meanwhile (the command is stopped first). The command's output goes to
    /// statekeeper's stderr, so that stdout keeps only statekeeper's report.
    pub async fn run_guarded(
        &self,
        command: &[String],
        env: &[(String, String)],
        backup: bool,
    ) -> Result<RunReport, Error> {
        let started = Instant::now();
        let Some((program, args)) = command.split_first() else {
            return Err(Error::InvalidOperation(
                "no command to run: give it after `--`".into(),
            ));
        };
        // A backup needs a store; without one, the command may be what creates it.
        let from_version = {
            let mut conn = self.pool().acquire().await?;
            if backup {
                self.require_initialized(&mut conn).await?.schema_version
            } else {
                super::frameworks::read_version(self, &mut conn)
                    .await?
                    .map_or(0, |v| v.schema_version)
            }
        };
        let backup = if backup {
            Some(self.backup_with_reason("pre-run").await?)
        } else {
            None
        };
        let mut child = tokio::process::Command::new(program)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::inherit())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                Error::InvalidOperation(format!(
                    "cannot run `{program}`: {e}; the store is unchanged{}",
                    backup
                        .as_ref()
                        .map(|b| format!(" (backup {} was taken)", b.id))
                        .unwrap_or_default()
                ))
            })?;
        let outcome = tokio::select! {
            status = child.wait() => match status {
                Ok(status) if status.success() => RunOutcome::Succeeded,
                Ok(status) => RunOutcome::Failed { code: status.code() },
                Err(e) => return Err(Error::InvalidOperation(format!("waiting for `{program}` failed: {e}"))),
            },
            () = interrupted() => {
                stop(&mut child).await;
                RunOutcome::Interrupted
            }
        };
        let restored = match (&outcome, &backup) {
            (RunOutcome::Succeeded, _) | (_, None) => None,
            (_, Some(backup)) => Some(self.rollback(Some(&backup.id)).await?),
        };
        let to_version = {
            let mut conn = self.pool().acquire().await?;
            super::frameworks::read_version(self, &mut conn)
                .await?
                .map_or(0, |v| v.schema_version)
        };
        Ok(RunReport {
            command: command.to_vec(),
            outcome,
            backup,
            restored,
            from_version,
            to_version,
            duration_ms: elapsed_ms(started),
        })
    }
}

/// Resolves on Ctrl-C or SIGTERM.
async fn interrupted() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Stops the command: SIGTERM, then SIGKILL after a grace period.
async fn stop(child: &mut tokio::process::Child) {
    #[cfg(unix)]
    if let Some(pid) = child.id() {
        // SIGTERM lets the command clean up; `kill(1)` keeps us off libc bindings.
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        if tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .is_ok()
        {
            return;
        }
    }
    let _ = child.kill().await;
    let _ = child.wait().await;
}
