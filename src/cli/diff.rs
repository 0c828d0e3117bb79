//! `state diff FROM [TO]`: what differs between two copies of the store's state, each a backup
//! (`backup:ID`), an export (a path or URL) or the store as it is (`live`, or TO left out); and
//! its report for people (grouped, aligned) or tools (JSON).

use clap::Args;

use super::files::IdentityArgs;
use super::transfer;
use crate::engine::backup::validate_backup_id;
use crate::engine::diff::report::{
    Capped, CheckpointEntry, Environments, IntervalChange, MeltanoDiff, OneSided, VersionEntry,
};
use crate::engine::words::counted;
use crate::engine::{
    DiffOptions, DiffReport, DiffSide, Error, ExportFormat, FileSource, Identities, Store,
};

#[derive(Args, Debug)]
pub(super) struct DiffArgs {
    /// What to compare from: backup:ID (one of `state backups`), an export's path or URL
    /// (file:///PATH, s3://BUCKET/KEY, gs://BUCKET/KEY, az://CONTAINER/KEY; compression and
    /// encryption are detected; - for stdin), or live (the store as it is; ./live names a file).
    #[arg(value_name = "FROM")]
    pub(super) from: String,
    /// What to compare to, as FROM; left out: the store as it is.
    #[arg(value_name = "TO")]
    pub(super) to: Option<String>,
    /// Items each list shows (environments, the models of one, snapshots, intervals, state IDs,
    /// …); the counts are exact whatever it is.
    #[arg(long, value_name = "N", default_value_t = crate::engine::diff::DEFAULT_LIMIT as u64,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub(super) limit: u64,
    /// Object store option KEY=VALUE (endpoint, region, aws_access_key_id, ...); repeatable.
    /// AWS_*, GOOGLE_* and AZURE_* environment variables are read too.
    #[arg(long = "storage-option", value_name = "KEY=VALUE", value_parser = transfer::key_value)]
    pub(super) storage_options: Vec<(String, String)>,
    #[command(flatten)]
    pub(super) identities: IdentityArgs,
}

/// A side as named on the command line.
enum Named {
    Live,
    Backup(String),
    File(transfer::Location),
}

impl DiffArgs {
    fn named(&self, text: &str) -> Result<Named, Error> {
        if text == "live" {
            return Ok(Named::Live);
        }
        if let Some(id) = text.strip_prefix("backup:") {
            validate_backup_id(id)?;
            return Ok(Named::Backup(id.to_owned()));
        }
        Ok(Named::File(transfer::Location::parse(
            text,
            &self.storage_options,
            ExportFormat::Exact,
        )?))
    }

    /// Both sides, checked before anything connects.
    fn sides(&self) -> Result<(Named, Named), Error> {
        let from = self.named(&self.from)?;
        let to = match &self.to {
            Some(to) => self.named(to)?,
            None => Named::Live,
        };
        if self.from == "-" && self.to.as_deref() == Some("-") {
            return Err(Error::InvalidOperation(
                "only one side can be read from stdin".into(),
            ));
        }
        Ok((from, to))
    }

    /// Checks the sides and identities without connecting.
    pub(super) fn check(&self) -> Result<(), Error> {
        self.sides()?;
        self.identities.identities()?;
        Ok(())
    }
}

type Reader = std::pin::Pin<Box<dyn tokio::io::AsyncRead + Send>>;

async fn open(
    named: Named,
    bar: &indicatif::ProgressBar,
    identities: &Identities,
) -> Result<DiffSide<Reader>, Error> {
    Ok(match named {
        Named::Live => DiffSide::Live,
        Named::Backup(id) => DiffSide::Backup(id),
        Named::File(location) => DiffSide::File(
            location.open(bar).await?,
            FileSource {
                label: location.to_string(),
                expected_sha256: None,
                identities: identities.clone(),
            },
        ),
    })
}

/// `state diff`: exits 0 whether or not the sides differ (`identical` in JSON says which).
pub(super) async fn diff_state(
    store: &Store,
    args: &DiffArgs,
    json: bool,
) -> Result<String, Error> {
    let (from, to) = args.sides()?;
    let identities = args.identities.identities()?;
    let bar = transfer::progress("reading");
    let from = open(from, &bar, &identities).await?;
    let to = open(to, &bar, &identities).await?;
    let options = DiffOptions {
        limit: usize::try_from(args.limit).unwrap_or(usize::MAX),
        merge: false,
    };
    let report = store.diff(from, to, &options).await;
    bar.finish_and_clear();
    Ok(render(&report?, json))
}

/// `state plan import --from URL`: the plan with what the import changes, the file read from its
/// location and restored in scratch. A file that cannot be opened is said in the changes.
pub(super) async fn with_import_changes(
    store: &Store,
    plan: crate::engine::Plan,
    url: &str,
    storage_options: &[(String, String)],
    expected_sha256: Option<&str>,
    identities: Identities,
    mode: crate::engine::ImportMode,
) -> Result<crate::engine::Plan, Error> {
    let source = FileSource {
        label: url.to_owned(),
        expected_sha256: expected_sha256.map(str::to_owned),
        identities,
    };
    let bar = transfer::progress("reading");
    let opened = match transfer::Location::parse(url, storage_options, ExportFormat::Exact) {
        Ok(location) => location.open(&bar).await,
        Err(e) => Err(e),
    };
    let changes = match opened {
        Ok(reader) => store.import_changes(reader, source, mode).await?,
        Err(e) => {
            crate::engine::plan::PlanChanges::not_compared(format!("the store now → {url}"), &e)
        }
    };
    bar.finish_and_clear();
    Ok(plan.with_changes(changes))
}

/// `state diff`: grouped by kind, names aligned, each list ending with how many more there are.
fn render(r: &DiffReport, json: bool) -> String {
    if json {
        return serde_json::to_string_pretty(r).unwrap_or_default();
    }
    let what = r.framework.profile().display_name;
    let mut out = format!("{what} state: {} → {}", r.from, r.to);
    if r.identical {
        out.push_str("\nno differences");
        return out;
    }
    if let Some(s) = &r.sqlmesh {
        environments(&s.environments, &mut out);
        one_sided("snapshots", &s.snapshots, &mut out, |v| {
            version_row(v, "identifier")
        });
        intervals(&s.intervals, &mut out);
    }
    if let Some(s) = &r.statekeeper {
        environments(&s.environments, &mut out);
        one_sided("model versions", &s.versions, &mut out, |v| {
            version_row(v, "fingerprint")
        });
        one_sided("checkpoints", &s.checkpoints, &mut out, checkpoint_row);
    }
    if let Some(m) = &r.meltano {
        state_ids(m, &mut out);
    }
    out
}

/// Rows with their columns padded to the widest (the last column is not).
fn aligned(rows: &[Vec<String>], indent: &str) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter(|r| r.len() > c + 1)
                .map(|r| r[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = indent.to_owned();
        for (c, value) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(value);
            } else {
                line.push_str(&format!("{value:<w$}  ", w = widths[c]));
            }
        }
        out.push('\n');
        out.push_str(line.trim_end());
    }
    out
}

/// `… and 3 more added`, after a list cut at the limit.
fn more<T>(list: &Capped<T>, what: &str, indent: &str, out: &mut String) {
    if list.truncated > 0 {
        out.push_str(&format!(
            "\n{indent}… and {} more{what} (--limit shows more)",
            list.truncated
        ));
    }
}

fn environments(list: &Environments, out: &mut String) {
    if list.is_empty() {
        return;
    }
    let kinds: Vec<String> = list
        .lists()
        .iter()
        .filter(|(_, l)| !l.is_empty())
        .map(|(change, l)| format!("{} {}", l.count, change.as_str()))
        .collect();
    out.push_str(&format!("\n\nenvironments: {}", kinds.join(", ")));
    for (change, environments) in list.lists() {
        for e in &environments.items {
            out.push_str(&format!(
                "\n  {:<8} {} ({})",
                change.as_str(),
                e.name,
                counted(e.models.count, "models")
            ));
            let rows: Vec<Vec<String>> = e
                .models
                .items
                .iter()
                .map(|m| vec![m.name.clone(), m.side(&m.from), "→".into(), m.side(&m.to)])
                .collect();
            out.push_str(&aligned(&rows, "      "));
            more(&e.models, " models", "      ", out);
        }
        more(
            environments,
            &format!(" {} environments", change.as_str()),
            "  ",
            out,
        );
    }
}

fn version_row(v: &VersionEntry, id: &str) -> Vec<String> {
    vec![
        v.name.clone(),
        format!("{id} {}", v.identifier),
        v.version
            .as_ref()
            .map_or_else(String::new, |v| format!("version {v}")),
    ]
}

fn checkpoint_row(c: &CheckpointEntry) -> Vec<String> {
    vec![
        c.environment.clone(),
        c.created_at.clone(),
        c.plan_id
            .as_ref()
            .map_or_else(String::new, |p| format!("plan {p}")),
    ]
}

/// What is on one side only: `added` rows then `removed` rows, aligned together.
fn one_sided<T>(
    what: &str,
    sides: &OneSided<T>,
    out: &mut String,
    row: impl Fn(&T) -> Vec<String>,
) {
    if sides.is_empty() {
        return;
    }
    out.push_str(&format!(
        "\n\n{what}: {} added, {} removed",
        sides.added.count, sides.removed.count
    ));
    let mut rows = Vec::new();
    for (list, word) in [(&sides.added, "added"), (&sides.removed, "removed")] {
        for item in &list.items {
            let mut r = vec![word.to_owned()];
            r.extend(row(item));
            rows.push(r);
        }
    }
    out.push_str(&aligned(&rows, "  "));
    more(&sides.added, " added", "  ", out);
    more(&sides.removed, " removed", "  ", out);
}

fn intervals(list: &Capped<IntervalChange>, out: &mut String) {
    if list.is_empty() {
        return;
    }
    out.push_str(&format!(
        "\n\nintervals: {} with other intervals",
        counted(list.count, "model versions")
    ));
    for c in &list.items {
        let dev = if c.dev { " (dev intervals)" } else { "" };
        out.push_str(&format!("\n  {} version {}{dev}", c.model, c.version));
        let mut rows = Vec::new();
        for (ranges, word) in [(&c.added, "added"), (&c.removed, "removed")] {
            for r in &ranges.items {
                rows.push(vec![word.to_owned(), format!("{} … {}", r.start, r.end)]);
            }
        }
        out.push_str(&aligned(&rows, "      "));
        more(&c.added, " added", "      ", out);
        more(&c.removed, " removed", "      ", out);
    }
    more(list, " model versions", "  ", out);
}

fn state_ids(m: &MeltanoDiff, out: &mut String) {
    let ids = &m.state_ids;
    out.push_str(&format!(
        "\n\nstate IDs: {} added, {} removed, {} changed",
        ids.added.count, ids.removed.count, m.changed.count
    ));
    let mut rows = Vec::new();
    for (list, word) in [(&ids.added, "added"), (&ids.removed, "removed")] {
        rows.extend(
            list.items
                .iter()
                .map(|id| vec![word.to_owned(), id.clone()]),
        );
    }
    let json = |v: &Option<serde_json::Value>| {
        v.as_ref()
            .map_or_else(|| "(none)".to_owned(), |v| v.to_string())
    };
    // The IDs on one side only, aligned; then each changed one with what changed in it.
    out.push_str(&aligned(&rows, "  "));
    more(&ids.added, " added", "  ", out);
    more(&ids.removed, " removed", "  ", out);
    for c in &m.changed.items {
        out.push_str(&format!("\n  changed  {}", c.state_id));
        let mut rows: Vec<Vec<String>> = c
            .bookmarks
            .items
            .iter()
            .map(|b| {
                vec![
                    format!("bookmark {}", b.stream),
                    json(&b.from),
                    "→".into(),
                    json(&b.to),
                ]
            })
            .collect();
        rows.extend(c.other.iter().map(|o| vec![format!("{o} differs")]));
        out.push_str(&aligned(&rows, "      "));
        more(&c.bookmarks, " bookmarks", "      ", out);
    }
    more(&m.changed, " changed", "  ", out);
}
