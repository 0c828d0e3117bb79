//! `state export` and `state import`: files, `file://` URLs, or `-` for stdout/stdin, with a
//! progress spinner on a terminal and silence otherwise.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

use crate::engine::Error;
use crate::engine::io::Observed;

/// Where an export goes or an import comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    Std,
    Path(std::path::PathBuf),
}

impl Location {
    pub fn parse(value: &str) -> Result<Self, Error> {
        if value == "-" {
            return Ok(Self::Std);
        }
        if let Some(path) = value.strip_prefix("file://") {
            return Ok(Self::Path(path.into()));
        }
        if let Some((scheme, _)) = value.split_once("://") {
            return Err(Error::InvalidConnection(format!(
                "destination scheme \"{scheme}://\" is not supported by this build (use a path, file://PATH or -)"
            )));
        }
        Ok(Self::Path(value.into()))
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Std => f.write_str("-"),
            Location::Path(p) => write!(f, "{}", p.display()),
        }
    }
}

/// A spinner counting bytes, shown only when stderr is a terminal.
pub fn progress(verb: &'static str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner();
    if let Ok(style) =
        ProgressStyle::with_template("{spinner} {msg} {bytes} ({bytes_per_sec}, {elapsed})")
    {
        bar.set_style(style);
    }
    bar.set_message(verb);
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}

/// Counts bytes through a reader or writer into a progress bar.
pub fn counted<T>(
    inner: T,
    bar: &ProgressBar,
) -> Observed<T, impl FnMut(&[u8]) + Unpin + Send + use<T>> {
    let bar = bar.clone();
    Observed::new(inner, move |bytes: &[u8]| bar.inc(bytes.len() as u64))
}

/// Human-readable byte counts for summaries.
pub fn human_bytes(bytes: u64) -> String {
    indicatif::HumanBytes(bytes).to_string()
}
