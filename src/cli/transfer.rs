//! `state export` and `state import`: files, `file://` URLs, or `-` for stdout/stdin, with a
//! progress spinner on a terminal and silence otherwise.

use std::io::IsTerminal;
use std::pin::Pin;
use std::task::{Context, Poll};

use indicatif::{ProgressBar, ProgressStyle};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::engine::Error;

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
pub struct Counted<T> {
    pub inner: T,
    bar: ProgressBar,
}

impl<T> Counted<T> {
    pub fn new(inner: T, bar: ProgressBar) -> Self {
        Self { inner, bar }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let result = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &result {
            this.bar.inc(*n as u64);
        }
        result
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &result {
            this.bar.inc((buf.filled().len() - before) as u64);
        }
        result
    }
}

/// Human-readable byte counts for summaries.
pub fn human_bytes(bytes: u64) -> String {
    indicatif::HumanBytes(bytes).to_string()
}
