//! `state export` and `state import`: paths, `file://`, `s3://`, `gs://` and `az://` URLs, or `-`
//! for stdout/stdin, with a
//! progress spinner on a terminal and silence otherwise.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

use std::collections::BTreeMap;

use crate::engine::io::Observed;
use crate::engine::prefix_url;
use crate::engine::{Destination, Error, ExportFormat};

/// Where an export goes or an import comes from.
#[derive(Debug)]
pub enum Location {
    Std,
    Object(Destination),
}

impl Location {
    /// `-` is stdin/stdout; anything else a path or URL, with `options` (and, for cloud
    /// URLs, the provider's environment variables) configuring the object store. In the
    /// meltano-backend format it names a folder (prefix), with or without a trailing `/`.
    pub fn parse(
        value: &str,
        options: &[(String, String)],
        format: ExportFormat,
    ) -> Result<Self, Error> {
        if format == ExportFormat::MeltanoBackend {
            if value == "-" {
                return Err(Error::InvalidDestination {
                    url: "-".into(),
                    reason: "the meltano-backend format is a folder of files: name a folder or \
                             an object prefix, not stdin/stdout"
                        .into(),
                });
            }
            let options: BTreeMap<String, String> = options.iter().cloned().collect();
            return Ok(Self::Object(Destination::parse_with_env(
                prefix_url(value),
                &options,
            )?));
        }
        if value == "-" {
            if let Some((key, _)) = options.first() {
                return Err(Error::InvalidDestination {
                    url: "-".into(),
                    reason: format!("option \"{key}\" makes no sense for stdin/stdout"),
                });
            }
            return Ok(Self::Std);
        }
        let options: BTreeMap<String, String> = options.iter().cloned().collect();
        Ok(Self::Object(Destination::parse_with_env(value, &options)?))
    }
}

impl Location {
    /// The file to read (stdin, or the object), its bytes counted into `bar`.
    pub async fn open(
        &self,
        bar: &ProgressBar,
    ) -> Result<std::pin::Pin<Box<dyn tokio::io::AsyncRead + Send>>, Error> {
        Ok(match self {
            Location::Std => Box::pin(counted(tokio::io::stdin(), bar)),
            Location::Object(source) => Box::pin(counted(source.open().await?, bar)),
        })
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Std => f.write_str("-"),
            Location::Object(destination) => f.write_str(destination.url()),
        }
    }
}

/// Parses `KEY=VALUE` for `--storage-option`.
pub fn key_value(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .filter(|(key, _)| !key.is_empty())
        .map(|(key, value)| (key.trim().to_owned(), value.to_owned()))
        .ok_or_else(|| "expected KEY=VALUE".to_owned())
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
