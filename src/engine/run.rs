//! A framework's own command (`sqlmesh migrate`, `sqlmesh janitor`, anything risky) wrapped in a
//! backup and an automatic restore: the local twin of the operator's runner Jobs.
//!
//! The command runs in a process group of its own, and statekeeper is the subreaper of whatever
//! it starts: when the command exits, or statekeeper is interrupted, every process the command
//! started (a wrapper script's children, a daemon that left the group) is ended and waited for
//! before anything is restored. A restore while one of them still writes would be undone by it.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::Error;
use super::backup::BackupInfo;
use super::reports::RollbackReport;
use super::store::{Store, elapsed_ms};

/// How long the command's processes get to end after SIGTERM (or the interrupting signal)
/// before they are killed.
const GRACE: Duration = Duration::from_secs(10);
/// How long killed processes get to disappear before statekeeper gives up waiting.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// How a guarded command ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum RunOutcome {
    /// Exit status 0.
    Succeeded,
    /// A non-zero exit status.
    Failed { code: i32 },
    /// Ended by a signal it did not handle.
    Killed { signal: i32 },
    /// statekeeper received `signal` (Ctrl-C, SIGTERM, SIGHUP) and stopped the command.
    Interrupted { signal: i32 },
}

impl RunOutcome {
    /// The exit status statekeeper ends with: the command's own, 128 + N for signal N.
    pub fn exit_code(&self) -> u8 {
        match self {
            RunOutcome::Succeeded => 0,
            RunOutcome::Failed { code } => u8::try_from(*code).unwrap_or(1).max(1),
            RunOutcome::Killed { signal } | RunOutcome::Interrupted { signal } => {
                u8::try_from(128 + signal).unwrap_or(u8::MAX)
            }
        }
    }
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunReport {
    pub command: Vec<String>,
    pub outcome: RunOutcome,
    /// Processes the command started that were still running after it ended, stopped by
    /// statekeeper before anything else happened.
    pub stopped_processes: usize,
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
    /// environment, ends every process it started once it exits (or once statekeeper is
    /// interrupted), and then restores the backup when the command did not succeed. The
    /// command's output goes to statekeeper's stderr, so that stdout keeps only the report.
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
                super::hooks::read_version(self, &mut conn)
                    .await?
                    .map_or(0, |v| v.schema_version)
            }
        };
        // Pinned until the run is over: no prune or drop can remove the backup it may restore.
        let (backup, pin) = if backup {
            let (info, pin) = self.pinned_backup("pre-run").await?;
            (Some(info), Some(pin))
        } else {
            (None, None)
        };
        let taken = || {
            backup
                .as_ref()
                .map(|b| format!(" (backup {} was taken)", b.id))
                .unwrap_or_default()
        };
        processes::become_subreaper();
        let mut spawn = tokio::process::Command::new(program);
        spawn
            .args(args)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true);
        #[cfg(unix)]
        spawn.process_group(0);
        match processes::stderr_for_child() {
            Some(stderr) => spawn.stdout(stderr),
            None => spawn.stdout(std::process::Stdio::inherit()),
        };
        let mut child = spawn.spawn().map_err(|e| {
            Error::InvalidOperation(format!(
                "cannot run `{program}`: {e}; the store is unchanged{}",
                taken()
            ))
        })?;
        let group = child.id().and_then(|id| i32::try_from(id).ok());
        let outcome = tokio::select! {
            status = child.wait() => match status {
                Ok(status) => outcome_of(status),
                Err(e) => return Err(Error::InvalidOperation(format!(
                    "waiting for `{program}` failed: {e}{}", taken()
                ))),
            },
            signal = interrupted() => {
                if let Some(group) = group {
                    processes::signal_group(group, signal);
                }
                if tokio::time::timeout(GRACE, child.wait()).await.is_err() {
                    let _ = child.kill().await;
                }
                RunOutcome::Interrupted { signal }
            }
        };
        // Nothing the command started may outlive it: a restore (or a success reported) while
        // one of its processes still writes would not be the truth for long.
        let stopped_processes = match group {
            Some(group) => {
                processes::end_all(group)
                    .await
                    .map_err(|left| Error::CommandStillRunning {
                        command: command.join(" "),
                        pids: left,
                        backup: backup.as_ref().map(|b| b.id.clone()),
                    })?
            }
            None => 0,
        };
        let restored = match (&outcome, &backup) {
            (RunOutcome::Succeeded, _) | (_, None) => None,
            (_, Some(backup)) => Some(self.rollback(Some(&backup.id)).await?),
        };
        if let Some(pin) = pin {
            pin.release().await;
        }
        let to_version = {
            let mut conn = self.pool().acquire().await?;
            super::hooks::read_version(self, &mut conn)
                .await?
                .map_or(0, |v| v.schema_version)
        };
        Ok(RunReport {
            command: command.to_vec(),
            outcome,
            stopped_processes,
            backup,
            restored,
            from_version,
            to_version,
            duration_ms: elapsed_ms(started),
        })
    }
}

fn outcome_of(status: std::process::ExitStatus) -> RunOutcome {
    #[cfg(unix)]
    if let Some(signal) = std::os::unix::process::ExitStatusExt::signal(&status) {
        return RunOutcome::Killed { signal };
    }
    match status.code() {
        Some(0) => RunOutcome::Succeeded,
        Some(code) => RunOutcome::Failed { code },
        None => RunOutcome::Failed { code: 1 },
    }
}

/// Resolves with the signal number on Ctrl-C, SIGTERM or SIGHUP.
async fn interrupted() -> i32 {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let (Ok(mut term), Ok(mut hangup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        ) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => return libc::SIGINT,
                _ = term.recv() => return libc::SIGTERM,
                _ = hangup.recv() => return libc::SIGHUP,
            }
        }
    }
    let _ = tokio::signal::ctrl_c().await;
    2
}

/// The processes a command started, found by its process group and, since statekeeper is their
/// subreaper, by being statekeeper's children (which catches those that left the group).
#[cfg(target_os = "linux")]
mod processes {
    use std::time::Instant;

    use super::{Duration, GRACE, KILL_WAIT};

    /// Orphans of the command become statekeeper's children instead of init's: they can be
    /// found, and reaped, whatever group they are in.
    pub fn become_subreaper() {
        // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes plain integers and changes only this
        // process's attribute.
        unsafe {
            libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
        }
    }

    /// statekeeper's stderr, for the command's stdout.
    pub fn stderr_for_child() -> Option<std::process::Stdio> {
        use std::os::fd::AsFd;
        std::io::stderr()
            .as_fd()
            .try_clone_to_owned()
            .ok()
            .map(std::process::Stdio::from)
    }

    pub fn signal_group(group: i32, signal: i32) {
        // SAFETY: kill(2) with a negative pid signals that process group; no memory is shared.
        unsafe {
            libc::kill(-group, signal);
        }
    }

    fn signal(pid: i32, signal: i32) {
        // SAFETY: as above, for one process.
        unsafe {
            libc::kill(pid, signal);
        }
    }

    /// Collects exited children of statekeeper (the command's orphans) so that they are gone,
    /// not zombies that still look alive.
    fn reap() {
        loop {
            let mut status = 0;
            // SAFETY: waitpid with WNOHANG writes the status into a local integer.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                return;
            }
        }
    }

    /// Live processes of the group, and live children of statekeeper (orphans of the command).
    fn alive(group: i32) -> Vec<i32> {
        let me = std::process::id() as i32;
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                    return false;
                };
                // "pid (comm) state ppid pgrp …": comm may hold anything, so read after ')'.
                let mut fields = stat
                    .rsplit_once(')')
                    .map(|(_, rest)| rest.split_whitespace())
                    .into_iter()
                    .flatten();
                let state = fields.next().unwrap_or("Z");
                let parent = fields.next().and_then(|p| p.parse::<i32>().ok());
                let process_group = fields.next().and_then(|p| p.parse::<i32>().ok());
                state != "Z" && (process_group == Some(group) || parent == Some(me))
            })
            .collect()
    }

    /// Waits until none of the command's processes is alive, up to `limit`; returns those left.
    async fn wait_gone(group: i32, limit: Duration) -> Vec<i32> {
        let deadline = Instant::now() + limit;
        loop {
            reap();
            let left = alive(group);
            if left.is_empty() || Instant::now() >= deadline {
                return left;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Ends every process the command started: SIGTERM, then SIGKILL after a grace period.
    /// Returns how many had to be stopped, or the ids of those that outlived SIGKILL.
    pub async fn end_all(group: i32) -> Result<usize, Vec<i32>> {
        reap();
        let running = alive(group);
        if running.is_empty() {
            return Ok(0);
        }
        tracing::info!(
            processes = running.len(),
            "the command left processes running: stopping them"
        );
        signal_group(group, libc::SIGTERM);
        running.iter().for_each(|pid| signal(*pid, libc::SIGTERM));
        let left = wait_gone(group, GRACE).await;
        if left.is_empty() {
            return Ok(running.len());
        }
        signal_group(group, libc::SIGKILL);
        left.iter().for_each(|pid| signal(*pid, libc::SIGKILL));
        let left = wait_gone(group, KILL_WAIT).await;
        if left.is_empty() {
            Ok(running.len())
        } else {
            Err(left)
        }
    }
}

/// Elsewhere: the process group alone (no subreaper, no /proc).
#[cfg(not(target_os = "linux"))]
mod processes {
    pub fn become_subreaper() {}

    pub fn stderr_for_child() -> Option<std::process::Stdio> {
        None
    }

    #[cfg(unix)]
    pub fn signal_group(group: i32, signal: i32) {
        // SAFETY: kill(2) with a negative pid signals that process group.
        unsafe {
            libc::kill(-group, signal);
        }
    }

    #[cfg(not(unix))]
    pub fn signal_group(_group: i32, _signal: i32) {}

    pub async fn end_all(_group: i32) -> Result<usize, Vec<i32>> {
        Ok(0)
    }
}
