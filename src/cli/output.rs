//! Human-readable and JSON renderings of engine reports.

use serde::Serialize;

use crate::engine::words::counted;
use crate::engine::{
    BackupInfo, ExportReport, Framework, ImportReport, InitReport, JanitorReport, PruneReport,
    ResetReport, RollbackReport, StatusReport, UpgradeReport,
};

use super::transfer::human_bytes;

/// How many backups `state status` shows (the newest); `backups list` shows them all.
const STATUS_BACKUPS: usize = 5;

fn to_json<T: Serialize>(value: &T) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

fn steps(applied: &[crate::engine::reports::AppliedStep]) -> String {
    applied
        .iter()
        .map(|s| format!("  applied version {}: {}", s.version, s.description))
        .collect::<Vec<_>>()
        .join("\n")
}

/// An age in its largest unit or two: `45s`, `12m`, `3h 5m`, `2d 4h`.
pub fn human_age(seconds: i64) -> String {
    let s = seconds.max(0);
    let (d, h, m) = (s / 86_400, s % 86_400 / 3_600, s % 3_600 / 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, m) => format!("{m}m"),
        (0, h, 0) => format!("{h}h"),
        (0, h, m) => format!("{h}h {m}m"),
        (d, 0, _) => format!("{d}d"),
        (d, h, _) => format!("{d}d {h}h"),
    }
}

/// The backups as a table, in the order given.
fn backup_table(list: &[&BackupInfo]) -> Vec<String> {
    let rows: Vec<[String; 6]> = list
        .iter()
        .map(|b| {
            [
                b.id.clone(),
                b.reason.clone(),
                human_age(b.age_seconds),
                human_bytes(b.bytes.max(0) as u64),
                format!(
                    "{}, {}",
                    b.framework.profile().display_name,
                    b.framework
                        .describe_version(b.schema_version, &b.version_details)
                ),
                format!(
                    "{}, {}",
                    counted(b.tables.max(0) as u64, "tables"),
                    counted(b.rows.max(0) as u64, "rows")
                ),
            ]
        })
        .collect();
    let header = ["ID", "TAG", "AGE", "SIZE", "STORE", "CONTENT"].map(String::from);
    let mut widths = header.clone().map(|h| h.chars().count());
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    std::iter::once(&header)
        .chain(&rows)
        .map(|row| {
            let cells: Vec<String> = row
                .iter()
                .zip(widths)
                .map(|(cell, width)| format!("{cell:<width$}"))
                .collect();
            cells.join("  ").trim_end().to_owned()
        })
        .collect()
}

/// A backup in a few words: `20261207170000123 (pre-upgrade, 3h 5m old, 1.2 MiB)`.
fn backup_brief(b: &BackupInfo) -> String {
    format!(
        "{} ({}, {} old, {})",
        b.id,
        b.reason,
        human_age(b.age_seconds),
        human_bytes(b.bytes.max(0) as u64)
    )
}

/// What `state rollback` without --backup-id says before it restores.
pub fn announce_rollback(b: &BackupInfo, of: usize) -> String {
    format!(
        "restoring backup {}, the newest of {} (taken {})",
        backup_brief(b),
        counted(of as u64, "backups"),
        b.created_at.format("%Y-%m-%d %H:%M:%S UTC")
    )
}

/// The command that restores a backup (with `--framework` where the store needs it).
fn rollback_command(b: &BackupInfo) -> String {
    let framework = if b.framework == Framework::default() {
        String::new()
    } else {
        format!(" --framework {}", b.framework)
    };
    format!(
        "statekeeper state rollback{framework} --schema {} --backup-id {}",
        b.schema, b.id
    )
}

pub fn backup(b: &BackupInfo, json: bool) -> String {
    if json {
        return to_json(b);
    }
    format!(
        "backup {} of schema \"{}\": {} tables, {} rows\n  restore with: {}",
        b.id,
        b.schema,
        b.tables,
        b.rows,
        rollback_command(b)
    )
}

pub fn init(r: &InitReport, json: bool) -> String {
    if json {
        return to_json(r);
    }
    if r.already_initialized {
        format!(
            "schema \"{}\" is already initialized at version {}; nothing to do",
            r.schema, r.to_version
        )
    } else {
        format!(
            "initialized schema \"{}\" at version {} in {} ms\n{}",
            r.schema,
            r.to_version,
            r.duration_ms,
            steps(&r.applied)
        )
    }
}

pub fn status(r: &StatusReport, json: bool) -> String {
    if json {
        return to_json(r);
    }
    let profile = r.framework.profile();
    if !r.initialized {
        return format!(
            "{} schema \"{}\": not initialized; {}",
            profile.display_name, r.schema, profile.not_initialized_hint
        );
    }
    let headline = match r.latest_version {
        Some(latest) => format!(
            "schema \"{}\": version {} of {latest}{}",
            r.schema,
            r.current_version,
            if r.pending.is_empty() {
                " (up to date)".to_string()
            } else {
                format!(
                    " ({} pending: run `statekeeper state upgrade`)",
                    r.pending.len()
                )
            }
        ),
        None => format!(
            "{} schema \"{}\": {}",
            profile.display_name,
            r.schema,
            r.framework.describe_version(r.current_version, &r.versions)
        ),
    };
    let mut out = vec![headline];
    out.push("counts:".into());
    out.extend(
        r.counts
            .iter()
            .map(|(name, n)| match name.strip_suffix("_epoch_seconds") {
                // A time, not a count: when it happened, if it was recorded.
                Some(what) => format!(
                    "  {what:<34} {}",
                    chrono::DateTime::from_timestamp(*n, 0)
                        .filter(|_| *n > 0)
                        .map_or("none recorded".to_owned(), |t| {
                            t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
                        })
                ),
                None => format!("  {name:<34} {n}"),
            }),
    );
    out.extend(status_backups(&r.backups));
    out.join("\n")
}

/// The backups in `state status`: how many and their size, then the newest few, newest first.
fn status_backups(backups: &[BackupInfo]) -> Vec<String> {
    let bytes: i64 = backups.iter().map(|b| b.bytes.max(0)).sum();
    let mut out = vec![format!(
        "backups: {} ({})",
        backups.len(),
        human_bytes(bytes as u64)
    )];
    if backups.is_empty() {
        return out;
    }
    let newest: Vec<&BackupInfo> = backups.iter().rev().take(STATUS_BACKUPS).collect();
    out.extend(
        backup_table(&newest)
            .into_iter()
            .map(|line| format!("  {line}")),
    );
    if backups.len() > newest.len() {
        out.push(format!(
            "  … {} more: statekeeper state backups list",
            backups.len() - newest.len()
        ));
    }
    out
}

pub fn upgrade(r: &UpgradeReport, json: bool) -> String {
    if json {
        return to_json(r);
    }
    match &r.backup {
        None => format!(
            "schema \"{}\" is already at version {}; nothing to do",
            r.schema, r.to_version
        ),
        Some(b) => format!(
            "upgraded schema \"{}\" from version {} to {} in {} ms\n  backup {} taken first ({} rows)\n{}",
            r.schema,
            r.from_version,
            r.to_version,
            r.duration_ms,
            b.id,
            b.rows,
            steps(&r.applied)
        ),
    }
}

pub fn rollback(r: &RollbackReport, json: bool) -> String {
    if json {
        return to_json(r);
    }
    let undo = match &r.pre_rollback_backup {
        Some(b) => format!(
            "\n  the replaced state is in backup {} (undo with: {})",
            b.id,
            rollback_command(b)
        ),
        None => String::new(),
    };
    format!(
        "rolled back schema \"{}\" to backup {}: version {} -> {}, {} rows restored in {} ms{}",
        r.schema,
        backup_brief(&r.restored_backup),
        r.from_version,
        r.to_version,
        r.rows_restored,
        r.duration_ms,
        undo
    )
}

pub fn reset(r: &ResetReport, json: bool) -> String {
    if json {
        return to_json(r);
    }
    let kept = match &r.backup {
        Some(b) => format!(
            "\n  the removed state is in backup {} (restore with: {})",
            b.id,
            rollback_command(b)
        ),
        None => String::new(),
    };
    format!(
        "reset schema \"{}\": {} tables reset (was version {}){}",
        r.schema, r.tables_reset, r.from_version, kept
    )
}

pub fn backups(list: &[BackupInfo], json: bool) -> String {
    if json {
        return to_json(&list);
    }
    if list.is_empty() {
        return "no backups".into();
    }
    let bytes: i64 = list.iter().map(|b| b.bytes.max(0)).sum();
    let mut out = backup_table(&list.iter().collect::<Vec<_>>());
    out.push(format!(
        "{}, {}",
        counted(list.len() as u64, "backups"),
        human_bytes(bytes as u64)
    ));
    out.join("\n")
}

pub fn pruned(r: &PruneReport, json: bool) -> String {
    if json {
        return to_json(r);
    }
    let verb = if r.dry_run { "would drop" } else { "dropped" };
    let mut out = vec![format!(
        "{verb} {} ({}), kept {}{}",
        counted(r.dropped.len() as u64, "backups"),
        human_bytes(r.bytes_freed.max(0) as u64),
        r.kept.len(),
        if r.dry_run {
            "; dry run: nothing was changed"
        } else {
            ""
        }
    )];
    out.extend(
        r.dropped
            .iter()
            .map(|b| format!("  {verb:<10} {}", backup_brief(b))),
    );
    out.extend(r.kept.iter().map(|k| {
        format!(
            "  {:<10} {}: {}",
            "kept",
            backup_brief(&k.backup),
            k.kept_because.describe()
        )
    }));
    out.join("\n")
}

pub fn dropped_backup(b: &BackupInfo, json: bool) -> String {
    if json {
        return to_json(b);
    }
    format!("dropped backup {}", b.id)
}

pub fn janitor(r: &JanitorReport, released: &[String], json: bool) -> String {
    if json {
        let mut value = serde_json::to_value(r).unwrap_or_default();
        value["durationMs"] = serde_json::json!(r.duration.as_millis() as u64);
        value["releasedRelations"] = serde_json::json!(released);
        return serde_json::to_string_pretty(&value).unwrap_or_default();
    }
    let verb = if r.dry_run { "would remove" } else { "removed" };
    let header = format!(
        "janitor {verb} (in {} ms, {}{}):",
        r.duration.as_millis(),
        counted(r.batches, "batches"),
        if r.dry_run {
            ", dry run: nothing was changed"
        } else {
            ""
        }
    );
    if r.framework == crate::engine::Framework::Meltano {
        return format!(
            "{header}\n  runs                   {}\n  stale runs failed      {}",
            r.runs, r.stale_runs_failed
        );
    }
    format!(
        "{header}\n  expired environments   {}\n  checkpoints            {}\n  model versions         {}\n  function versions      {}\n  physical relations     {}\n  intervals              {}{}",
        r.expired_environments,
        r.checkpoints,
        r.model_versions,
        r.function_versions,
        r.physical_relations,
        r.intervals,
        if r.physical_relations > 0 {
            "\n  (--output json lists the released physical relations, to drop their tables)"
        } else {
            ""
        }
    )
}

/// The export summary; with stdout as the destination it goes to stderr (stdout is the data).
pub fn exported(r: &ExportReport, to: &str, json: bool) -> String {
    let summary = if json {
        let mut value = serde_json::to_value(r).unwrap_or_default();
        value["durationMs"] = serde_json::json!(r.duration.as_millis() as u64);
        value["destination"] = serde_json::json!(to);
        serde_json::to_string_pretty(&value).unwrap_or_default()
    } else {
        format!("{} in {:.1}s", r.summary(to), r.duration.as_secs_f64())
    };
    if to == "-" {
        eprintln!("{summary}");
        String::new()
    } else {
        summary
    }
}

pub fn imported(r: &ImportReport, from: &str, json: bool) -> String {
    if json {
        let mut value = serde_json::to_value(r).unwrap_or_default();
        value["durationMs"] = serde_json::json!(r.duration.as_millis() as u64);
        value["source"] = serde_json::json!(from);
        return serde_json::to_string_pretty(&value).unwrap_or_default();
    }
    let rows: u64 = r.rows.values().sum();
    let mut out = format!(
        "imported {} ({}) from {from} ({}, sha256 {}) in {:.1}s",
        counted(rows, "rows"),
        counted(r.environments, r.framework.profile().entities.noun),
        super::transfer::human_bytes(r.bytes),
        r.sha256,
        r.duration.as_secs_f64(),
    );
    out.push_str(&format!("\n  {}", r.effect()));
    if let Some(b) = &r.backup {
        out.push_str(&format!(
            "\n  the previous state is in backup {} (undo with: {})",
            b.id,
            rollback_command(b)
        ));
    }
    out
}

pub fn verified(r: &crate::engine::VerifyReport, from: &str, json: bool) -> String {
    if json {
        let mut value = serde_json::to_value(r).unwrap_or_default();
        value["durationMs"] = serde_json::json!(r.duration.as_millis() as u64);
        value["source"] = serde_json::json!(from);
        return serde_json::to_string_pretty(&value).unwrap_or_default();
    }
    let mut out = format!("{} in {:.1}s", r.summary(from), r.duration.as_secs_f64());
    for table in &r.tables {
        out.push_str(&format!(
            "\n  {:<44} {:>10} rows{}",
            table.name,
            table.rows,
            match table.restored_rows {
                Some(_) => ", restored",
                None => "",
            }
        ));
    }
    out
}

pub fn plan(p: &crate::engine::Plan, json: bool) -> String {
    if json {
        return to_json(p);
    }
    let versions = match p.to_version {
        Some(to) if to != p.from_version => format!("version {} → {to}", p.from_version),
        _ => format!("version {}", p.from_version),
    };
    let mut out = format!(
        "plan: {} of the {} store in schema \"{}\" ({versions})\n",
        p.operation,
        p.framework.profile().display_name,
        p.schema
    );
    for (n, step) in p.steps.iter().enumerate() {
        out.push_str(&format!("  {}. {step}\n", n + 1));
    }
    if let Some(source) = &p.source {
        out.push_str(&format!("source: {source}\n"));
    }
    if let Some(b) = &p.restores {
        out.push_str(&format!("restores: backup {}\n", backup_brief(b)));
    }
    if let Some(changes) = &p.changes {
        out.push_str(&format!("changes ({}):\n", changes.compared));
        for line in &changes.summary {
            out.push_str(&format!("  {line}\n"));
        }
    }
    out.push_str(&format!(
        "store now: {} tables, {} rows\n",
        p.tables.len(),
        p.total_rows()
    ));
    out.push_str(&format!(
        "hash: {}\n  approve it with spec.approval.planHash: \"{}\"",
        p.hash, p.hash
    ));
    out
}

pub fn run(r: &crate::engine::RunReport, json: bool) -> String {
    if json {
        return to_json(r);
    }
    let command = r.command.join(" ");
    let outcome = match &r.outcome {
        crate::engine::RunOutcome::Succeeded => format!("`{command}` succeeded"),
        crate::engine::RunOutcome::Failed { code } => {
            format!("`{command}` failed with exit status {code}")
        }
        crate::engine::RunOutcome::Killed { signal } => {
            format!("`{command}` was killed by signal {signal}")
        }
        crate::engine::RunOutcome::Interrupted { signal } => {
            format!("interrupted by signal {signal}: `{command}` was stopped")
        }
    };
    let mut out = format!(
        "{outcome} in {:.1}s; schema version {} → {}",
        r.duration_ms as f64 / 1000.0,
        r.from_version,
        r.to_version
    );
    if r.stopped_processes > 0 {
        out.push_str(&format!(
            "\n  stopped {} process{} the command had started and left running",
            r.stopped_processes,
            if r.stopped_processes == 1 { "" } else { "es" }
        ));
    }
    match (&r.backup, &r.restored) {
        (Some(backup), Some(restored)) => out.push_str(&format!(
            "\n  restored backup {} ({} rows): the store is as it was before the command{}",
            backup.id,
            restored.rows_restored,
            restored
                .pre_rollback_backup
                .as_ref()
                .map(|b| format!("; what the command left is kept in backup {}", b.id))
                .unwrap_or_default()
        )),
        (Some(backup), None) => out.push_str(&format!(
            "\n  backup {} was taken first; undo with: {}",
            backup.id,
            rollback_command(backup)
        )),
        (None, _) => out.push_str("\n  no backup was taken (run without --backup)"),
    }
    out
}
