//! SQLMesh's views after a restore: the `--repoint-views` flags of `rollback`, `import` and `run`,
//! the `state repoint-views` command that fixes stale views later, and how both report.

use std::path::PathBuf;

use clap::Args;

use crate::engine::virtual_layer::Change;
use crate::engine::{
    BackupInfo, Error, Framework, RepointOptions, Store, VirtualLayerReport, repoint_command,
};

/// Exit status of a restore that succeeded while views it was asked to re-point stayed stale.
pub(super) const EXIT_VIEWS_STALE: u8 = 3;

#[derive(Args, Debug, Clone, Default)]
pub(super) struct RepointArgs {
    /// SQLMesh: after the restore, re-point the views of every environment it changed at the
    /// restored snapshots' tables, through SQLMesh's own code (needs --project). When the
    /// warehouse cannot be reached the restore stands, the stale environments and the command
    /// that fixes them are printed, and the exit status is 3.
    #[arg(long, requires = "project")]
    pub repoint_views: bool,
    /// The SQLMesh project directory (its config names the warehouse).
    #[arg(long, value_name = "DIR")]
    pub project: Option<PathBuf>,
    /// The project's gateway (default: its default_gateway).
    #[arg(long, value_name = "NAME")]
    pub gateway: Option<String>,
    /// The sqlmesh executable whose Python runs SQLMesh's code (default: `sqlmesh` on PATH); it
    /// must be the store's SQLMesh version.
    #[arg(long, value_name = "PATH", default_value = "sqlmesh")]
    pub sqlmesh: PathBuf,
}

#[derive(Args, Debug)]
pub(super) struct RepointViewsArgs {
    /// The backup of the state the views were built for (a restore names it: the backup of
    /// the state it replaced); every environment that differs from it is re-pointed.
    #[arg(long, value_name = "ID")]
    since_backup: String,
    #[command(flatten)]
    repoint: RepointArgs,
}

impl RepointArgs {
    /// `--repoint-views` asks for a SQLMesh store; refused before anything runs otherwise.
    pub(super) fn check(&self, framework: Framework) -> Result<(), Error> {
        if self.repoint_views && framework != Framework::Sqlmesh {
            return Err(Error::InvalidOperation(format!(
                "--repoint-views re-points SQLMesh's views, and this is a {framework} store: \
                 pass --framework sqlmesh, or leave the flag out"
            )));
        }
        Ok(())
    }

    fn options(&self, env: Vec<(String, String)>, secrets: Vec<String>) -> Option<RepointOptions> {
        let project = self.project.clone().filter(|_| self.repoint_views)?;
        Some(RepointOptions {
            project,
            gateway: self.gateway.clone(),
            sqlmesh: self.sqlmesh.clone(),
            env,
            secrets,
        })
    }
}

/// After a restore of a SQLMesh store: the environments it changed, re-pointed when asked.
/// `replaced` is the backup of the state the restore replaced (none with backups off: then
/// nothing can say which views went stale).
pub(super) async fn after_restore(
    store: &Store,
    replaced: Option<&BackupInfo>,
    args: &RepointArgs,
    env: Vec<(String, String)>,
    secrets: Vec<String>,
) -> Result<Option<VirtualLayerReport>, Error> {
    let (Framework::Sqlmesh, Some(replaced)) = (store.framework(), replaced) else {
        return Ok(None);
    };
    let options = args.options(env, secrets);
    Ok(Some(
        store.repoint_views(&replaced.id, options.as_ref()).await?,
    ))
}

/// `state repoint-views`: the fix printed by a restore whose views stayed stale.
pub(super) async fn repoint_views(
    store: &Store,
    args: &RepointViewsArgs,
    env: Vec<(String, String)>,
    secrets: Vec<String>,
    json: bool,
) -> Result<(String, u8), Error> {
    let mut repoint = args.repoint.clone();
    repoint.repoint_views = true;
    repoint.check(store.framework())?;
    let options = repoint.options(env, secrets);
    let report = store
        .repoint_views(&args.since_backup, options.as_ref())
        .await?;
    let rendered = if json {
        serde_json::to_string_pretty(&report).unwrap_or_default()
    } else if report.changes.is_empty() {
        format!(
            "no environment differs from backup {}: every view already agrees",
            args.since_backup
        )
    } else {
        describe(&report, store, &repoint).join("\n")
    };
    Ok((rendered, exit_status(Some(&report))))
}

/// A restore's rendered report with what became of the views: a `virtualLayer` key in JSON,
/// lines after the report in text.
pub(super) fn with_report(
    rendered: String,
    report: Option<&VirtualLayerReport>,
    store: &Store,
    args: &RepointArgs,
    json: bool,
) -> String {
    let Some(report) = report else {
        return rendered;
    };
    if json {
        let Ok(mut value) = serde_json::from_str::<serde_json::Value>(&rendered) else {
            return rendered;
        };
        if let Some(object) = value.as_object_mut() {
            object.insert(
                "virtualLayer".into(),
                serde_json::to_value(report).unwrap_or_default(),
            );
        }
        return serde_json::to_string_pretty(&value).unwrap_or(rendered);
    }
    let mut lines = vec![rendered];
    if report.changes.is_empty() {
        lines.push("  views: no environment's snapshots changed, nothing to re-point".into());
    } else {
        lines.extend(
            describe(report, store, args)
                .into_iter()
                .map(|l| format!("  {l}")),
        );
    }
    lines.join("\n")
}

/// 3 when views that were asked to be re-pointed stayed stale; 0 otherwise.
pub(super) fn exit_status(report: Option<&VirtualLayerReport>) -> u8 {
    match report {
        Some(r)
            if !r.is_current()
                && r.failure
                    .as_ref()
                    .is_some_and(|f| f.reason != "NotRequested") =>
        {
            EXIT_VIEWS_STALE
        }
        _ => 0,
    }
}

fn describe(report: &VirtualLayerReport, store: &Store, args: &RepointArgs) -> Vec<String> {
    let mut lines = Vec::new();
    for done in &report.repointed {
        lines.push(format!(
            "views of environment {} re-pointed at the restored snapshots: {} replaced, {} dropped",
            done.name, done.promoted, done.demoted
        ));
    }
    if report.is_current() {
        return lines;
    }
    let stale: Vec<String> = report
        .changes
        .iter()
        .map(|c| {
            let what = match c.change {
                Change::Added => "restored",
                Change::Removed => "removed",
                Change::Changed => "changed",
            };
            let models: Vec<String> = c.models.iter().take(3).map(|m| m.describe()).collect();
            let more = c.models.len().saturating_sub(3);
            format!(
                "{} ({what}{}{})",
                c.name,
                if models.is_empty() { "" } else { ": " },
                models.join("; ")
                    + &if more > 0 {
                        format!("; {more} more")
                    } else {
                        String::new()
                    }
            )
        })
        .collect();
    let why = report
        .failure
        .as_ref()
        .map(|f| format!("{} ({})", f.message, f.reason))
        .unwrap_or_default();
    lines.push(format!(
        "VIEWS STALE: the views of {} still select from the replaced state's tables: {why}",
        stale.join(", ")
    ));
    lines.push(format!(
        "fix them with (same --database-url): {}",
        repoint_command(
            store.schema().as_str(),
            &report.since_backup,
            args.project.as_deref(),
            args.gateway.as_deref()
        )
    ));
    lines
}
