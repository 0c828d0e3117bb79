//! Where export files live: a local path (`file://` or a plain path) or an object in S3 or an
//! S3-compatible server (`s3://`), Google Cloud Storage (`gs://`) or Azure Blob Storage
//! (`az://`), all through `object_store`. Large files go up as multipart uploads, so memory
//! stays bounded whatever the file size, and no reader ever sees a half-written object.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Once};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::buffered::BufWriter;
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::local::LocalFileSystem;
use object_store::multipart::MultipartStore;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};
use tokio::io::{AsyncRead, AsyncWrite};

use super::Error;

/// Local files up to this size are written in one go; object store uploads go up in parts of
/// this size (the last one smaller).
const UPLOAD_BUFFER: usize = 8 * 1024 * 1024;
/// Parts in flight at once: bounds memory to a few parts whatever the file size.
const UPLOAD_CONCURRENCY: usize = 2;

/// The object store a URL names; decides which option keys it accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scheme {
    S3,
    Gcs,
    Azure,
}

impl Scheme {
    /// The store of a URL scheme (`s3`, `gs`, `az`, ...); `file` and unknown schemes are not.
    fn from_name(name: &str) -> Option<Self> {
        match name {
            "s3" | "s3a" => Some(Scheme::S3),
            "gs" => Some(Scheme::Gcs),
            "az" | "azure" | "abfs" | "abfss" => Some(Scheme::Azure),
            _ => None,
        }
    }

    /// The prefix of the provider's environment variables (`AWS_ENDPOINT`, ...).
    fn env_prefix(self) -> &'static str {
        match self {
            Scheme::S3 => "aws_",
            Scheme::Gcs => "google_",
            Scheme::Azure => "azure_",
        }
    }

    /// Whether `key` is an option of this scheme's object store.
    fn accepts(self, key: &str) -> bool {
        match self {
            Scheme::S3 => key.parse::<AmazonS3ConfigKey>().is_ok(),
            Scheme::Gcs => key.parse::<GoogleConfigKey>().is_ok(),
            Scheme::Azure => key.parse::<AzureConfigKey>().is_ok(),
        }
    }
}

/// Builds one provider's store from its builder and the (already validated) option keys, as an
/// object store and as the multipart store whose upload ids an export records.
macro_rules! build_store {
    ($builder:expr, $config:expr) => {{
        let mut builder = $builder;
        for (key, value) in $config {
            if let Ok(key) = key.parse() {
                builder = builder.with_config(key, value);
            }
        }
        builder.build().map(|store| {
            let store = Arc::new(store);
            (
                store.clone() as Arc<dyn ObjectStore>,
                Some(store as Arc<dyn MultipartStore>),
            )
        })
    }};
}

/// One export file's location, ready to write, read or delete.
#[derive(Clone)]
pub struct Destination {
    store: Arc<dyn ObjectStore>,
    /// S3, GCS and Azure: uploads go up in parts under an id the caller can record, so that an
    /// upload a killed process left behind can be aborted later (not left billed).
    multipart: Option<Arc<dyn MultipartStore>>,
    /// Local files only: the same file system without a sync after every write, for folders of
    /// many small files, which [`Destination::make_durable`] syncs in one go instead.
    unsynced: Option<Arc<dyn ObjectStore>>,
    path: ObjectPath,
    url: String,
    /// Option values that must never appear in error text.
    secrets: Vec<String>,
    /// S3 without credentials in its options: object_store then asks the instance metadata
    /// service, whose refusal ("PUT http://169.254.169.254/latest/api/token … 403") is said as
    /// what it means.
    no_credentials_given: bool,
}

impl std::fmt::Debug for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Destination")
            .field("url", &self.url)
            .finish()
    }
}

impl Destination {
    /// Parses `url` (`file:///abs/path`, `s3://bucket/key`, `gs://bucket/key`,
    /// `az://container/key`, or a plain local path) with `options`, the object store's own
    /// configuration keys (`endpoint`, `region`, `aws_access_key_id`, `azure_storage_account_name`,
    /// ...; case-insensitive). An unknown key is an error, so a typo never goes unnoticed. An
    /// `http://` endpoint allows plain HTTP (S3-compatible servers inside a cluster).
    pub fn parse(url: &str, options: &BTreeMap<String, String>) -> Result<Self, Error> {
        Self::parse_with_secrets(url, options, &[])
    }

    /// Like [`Destination::parse`], where `secret_values` (every value read from a Secret,
    /// whatever its key) must never appear in any message, as the values of secret-looking keys
    /// never do.
    pub fn parse_with_secrets(
        url: &str,
        options: &BTreeMap<String, String>,
        secret_values: &[String],
    ) -> Result<Self, Error> {
        install_crypto_provider();
        let secrets: Vec<String> = options
            .iter()
            .filter(|(key, _)| is_secret_key(key))
            .map(|(_, value)| value.clone())
            .chain(secret_values.iter().cloned())
            .filter(|value| !value.is_empty())
            .collect();
        // Errors show the URL without a query or fragment: that is where tokens would be.
        let shown = url.split(['?', '#']).next().unwrap_or_default();
        let invalid = |reason: String| Error::InvalidDestination {
            url: shown.to_owned(),
            reason,
        };
        let Some((scheme_text, _)) = url.split_once("://") else {
            return Self::local(url, std::path::Path::new(url), options, secrets);
        };
        let parsed = url::Url::parse(url).map_err(|e| invalid(e.to_string()))?;
        if !parsed.username().is_empty() || parsed.password().is_some() {
            // Never accept credentials in a URL: URLs are printed in status and logs.
            return Err(Error::InvalidDestination {
                url: format!("{scheme_text}://…"),
                reason: "credentials do not belong in the URL; pass them as options (a Secret in the operator)".into(),
            });
        }
        if parsed.query().is_some() || parsed.fragment().is_some() {
            // A query is where SAS tokens and signatures live; it would be printed with the URL.
            return Err(invalid(
                "a URL with ? or # is not supported; pass tokens as options (a Secret in the operator)".into(),
            ));
        }
        if scheme_text == "file" {
            let path = parsed
                .to_file_path()
                .map_err(|()| invalid("a file:// URL needs an absolute path".into()))?;
            return Self::local(url, &path, options, secrets);
        }
        let Some(scheme) = Scheme::from_name(scheme_text) else {
            return Err(invalid(format!(
                "scheme \"{scheme_text}://\" is not supported; use file://, s3://, gs:// or az://"
            )));
        };
        if parsed.host_str().is_none_or(str::is_empty) {
            return Err(invalid("the URL names no bucket or container".into()));
        }
        let key = parsed.path().trim_start_matches('/');
        if key.is_empty() || key.ends_with('/') {
            return Err(invalid("the URL names no object (it ends in /)".into()));
        }
        let path = ObjectPath::parse(key).map_err(|e| invalid(e.to_string()))?;
        let mut config: Vec<(String, String)> = Vec::new();
        for (key, value) in options {
            let key = key.to_ascii_lowercase();
            if !scheme.accepts(&key) {
                return Err(invalid(format!(
                    "unknown option \"{key}\" for {scheme_text}:// destinations"
                )));
            }
            config.push((key, value.clone()));
        }
        // An http:// endpoint (an S3-compatible server or emulator in the cluster) needs plain
        // HTTP allowed; anything else stays HTTPS-only.
        let endpoint_is_http = config.iter().any(|(key, value)| {
            (key.contains("endpoint") || key.ends_with("base_url")) && value.starts_with("http://")
        });
        if endpoint_is_http && !config.iter().any(|(key, _)| key.ends_with("allow_http")) {
            config.push(("allow_http".into(), "true".into()));
        }
        let built = match scheme {
            Scheme::S3 => build_store!(AmazonS3Builder::new().with_url(url), &config),
            Scheme::Gcs => build_store!(GoogleCloudStorageBuilder::new().with_url(url), &config),
            Scheme::Azure => build_store!(MicrosoftAzureBuilder::new().with_url(url), &config),
        };
        let (store, multipart) = built.map_err(|e| invalid(redact(&e.to_string(), &secrets)))?;
        let no_credentials_given = scheme == Scheme::S3
            && !config.iter().any(|(key, _)| {
                key.ends_with("access_key_id")
                    || key.ends_with("skip_signature")
                    || key.contains("web_identity")
                    || key.contains("container_credentials")
            });
        Ok(Self {
            store,
            multipart,
            unsynced: None,
            path,
            url: url.to_owned(),
            secrets,
            no_credentials_given,
        })
    }

    /// Like [`Destination::parse`], with options also taken from the provider's environment
    /// variables (`AWS_*` for s3://, `GOOGLE_*` for gs://, `AZURE_*` for az://), as the
    /// providers' own CLIs do. Explicit options win. For the CLI; the operator never reads its
    /// own environment for credentials.
    pub fn parse_with_env(url: &str, options: &BTreeMap<String, String>) -> Result<Self, Error> {
        let Some(scheme) = url
            .split_once("://")
            .and_then(|(name, _)| Scheme::from_name(name))
        else {
            return Self::parse(url, options);
        };
        let mut merged: BTreeMap<String, String> = std::env::vars()
            .map(|(key, value)| (key.to_ascii_lowercase(), value))
            .filter(|(key, _)| key.starts_with(scheme.env_prefix()) && scheme.accepts(key))
            .collect();
        for (key, value) in options {
            merged.insert(key.to_ascii_lowercase(), value.clone());
        }
        Self::parse(url, &merged)
    }

    fn local(
        url: &str,
        path: &std::path::Path,
        options: &BTreeMap<String, String>,
        secrets: Vec<String>,
    ) -> Result<Self, Error> {
        let invalid = |reason: String| Error::InvalidDestination {
            url: url.to_owned(),
            reason,
        };
        if let Some(key) = options.keys().next() {
            return Err(invalid(format!(
                "unknown option \"{key}\": local files take no options"
            )));
        }
        if path.as_os_str().is_empty() || path.to_string_lossy().ends_with('/') {
            return Err(invalid("the path names no file (it ends in /)".into()));
        }
        let absolute = std::path::absolute(path).map_err(|e| invalid(e.to_string()))?;
        let object_path =
            ObjectPath::from_absolute_path(&absolute).map_err(|e| invalid(e.to_string()))?;
        Ok(Self {
            // fsync: a backup that a power cut can lose is no backup.
            store: Arc::new(LocalFileSystem::new().with_fsync(true)),
            multipart: None,
            unsynced: Some(Arc::new(LocalFileSystem::new())),
            path: object_path,
            url: url.to_owned(),
            secrets,
            no_credentials_given: false,
        })
    }

    /// The URL as given (never holds credentials).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A writer for a new object at this location. Nothing is visible under the final name until
    /// [`tokio::io::AsyncWriteExt::shutdown`] succeeds; call [`Upload::abort`] on failure. On S3,
    /// GCS and Azure the multipart upload exists from here on: record [`Upload::staging_id`]
    /// before writing, so that [`Destination::clean_up`] can abort it if this process dies.
    pub async fn begin_upload(&self) -> Result<Upload, Error> {
        let Some(multipart) = &self.multipart else {
            return Ok(Upload {
                inner: UploadKind::Buffered(
                    BufWriter::with_capacity(self.store.clone(), self.path.clone(), UPLOAD_BUFFER)
                        .with_max_concurrency(UPLOAD_CONCURRENCY),
                ),
                finishing: false,
            });
        };
        let id = multipart
            .create_multipart(&self.path)
            .await
            .map_err(|e| self.unavailable("cannot start the upload", e))?;
        let (writer, reader) = tokio::io::duplex(1 << 20);
        let (commit, committed) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(upload_parts(
            multipart.clone(),
            self.path.clone(),
            id.clone(),
            reader,
            committed,
            self.secrets.clone(),
        ));
        Ok(Upload {
            inner: UploadKind::Parts {
                writer,
                commit: Some(commit),
                task,
                id,
            },
            finishing: false,
        })
    }

    /// Removes what an earlier attempt may have left when its process died: the multipart upload
    /// it recorded (`staging_id`), and a local file's staging copies (`<file>#<n>`).
    pub async fn clean_up(&self, staging_id: Option<&str>) -> Result<(), Error> {
        if let (Some(multipart), Some(id)) = (&self.multipart, staging_id) {
            match multipart.abort_multipart(&self.path, &id.to_owned()).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.unavailable("cannot abort the earlier upload", e)),
            }
        }
        let file = local_file(&self.path);
        if self.multipart.is_none()
            && let (Some(dir), Some(name)) = (file.parent(), file.file_name())
        {
            let prefix = format!("{}#", name.to_string_lossy());
            let entries = match std::fs::read_dir(dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) => {
                    return Err(Error::DestinationUnavailable {
                        url: self.url.clone(),
                        reason: format!("cannot list {}: {e}", dir.display()),
                    });
                }
            };
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with(&prefix) {
                    std::fs::remove_file(entry.path()).map_err(|e| {
                        Error::DestinationUnavailable {
                            url: self.url.clone(),
                            reason: format!(
                                "cannot remove the staging file {}: {e}",
                                entry.path().display()
                            ),
                        }
                    })?;
                }
            }
        }
        Ok(())
    }

    /// Streams the object, for import.
    pub async fn open(&self) -> Result<Pin<Box<dyn AsyncRead + Send>>, Error> {
        let result = self
            .store
            .get(&self.path)
            .await
            .map_err(|e| self.unavailable("cannot read", e))?;
        // A local file is read in large blocks: object_store's stream of it hands over 8 KiB at
        // a time, each through the blocking pool, which costs more than the reading.
        if result.range.start == 0
            && let object_store::GetResultPayload::File(file, _) = result.payload
        {
            use tokio::io::AsyncReadExt;
            let length = result.range.end - result.range.start;
            return Ok(Box::pin(tokio::io::BufReader::with_capacity(
                1 << 20,
                tokio::fs::File::from_std(file).take(length),
            )));
        }
        let secrets = self.secrets.clone();
        let stream = result
            .into_stream()
            .map_err(move |e| std::io::Error::other(redact(&e.to_string(), &secrets)));
        Ok(Box::pin(tokio_util::io::StreamReader::new(stream)))
    }

    /// Deletes the object; one that is already gone counts as deleted.
    pub async fn delete(&self) -> Result<(), Error> {
        match self.store.delete(&self.path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.unavailable("cannot delete", e)),
        }
    }

    /// Whether the object exists.
    pub async fn exists(&self) -> Result<bool, Error> {
        match self.store.head(&self.path).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.unavailable("cannot look up", e)),
        }
    }

    /// Redacts this destination's secret option values from `text`, and puts it on one line.
    pub fn redact(&self, text: &str) -> String {
        redact(text, &self.secrets)
    }

    /// The object at `parts` below this location, read as a folder (a prefix): where layouts of
    /// many files (Meltano's state backends) keep theirs. `None` when a part would not be stored
    /// under its own name (it holds `/`, `%`, `*`, a control character, or is `.` or `..`).
    pub(crate) fn child(&self, parts: &[&str]) -> Option<ObjectPath> {
        let mut path = self.path.clone();
        for part in parts {
            let stored = object_store::path::PathPart::from(*part);
            if part.is_empty() || stored.as_ref() != *part {
                return None;
            }
            path = path.clone().join(stored);
        }
        Some(path)
    }

    /// The parts of `path` below this location (see [`Destination::child`]).
    pub(crate) fn relative(&self, path: &ObjectPath) -> Vec<String> {
        path.prefix_match(&self.path)
            .map(|parts| parts.map(|part| part.as_ref().to_owned()).collect())
            .unwrap_or_default()
    }

    /// Every object below this location (a folder, read recursively); a folder or prefix that
    /// does not exist lists nothing.
    pub(crate) fn list_below(
        &self,
    ) -> futures::stream::BoxStream<'static, Result<ObjectPath, Error>> {
        let url = self.url.clone();
        let secrets = self.secrets.clone();
        self.small_store()
            .list(Some(&self.path))
            .map_ok(|meta| meta.location)
            .map_err(move |e| Error::DestinationUnavailable {
                url: url.clone(),
                reason: format!("cannot list: {}", redact(&e.to_string(), &secrets)),
            })
            .boxed()
    }

    /// A small object's bytes (a state file, a lock), or `None` when it does not exist.
    pub(crate) async fn read_small(&self, path: &ObjectPath) -> Result<Option<Bytes>, Error> {
        let result = match self.small_store().get(path).await {
            Ok(result) => result,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.unavailable(&format!("cannot read {path}"), e)),
        };
        match result.bytes().await {
            Ok(bytes) => Ok(Some(bytes)),
            // Deleted between the request and the body (a lock released meanwhile).
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.unavailable(&format!("cannot read {path}"), e)),
        }
    }

    /// Writes a small object in one request: readers see the old bytes or the new, never a part
    /// (a local file is written beside its name and renamed; an object store PUT is atomic). A
    /// local file is durable only after [`Destination::make_durable`].
    pub(crate) async fn write_small(&self, path: &ObjectPath, bytes: Bytes) -> Result<(), Error> {
        self.small_store()
            .put(path, bytes.into())
            .await
            .map(|_| ())
            .map_err(|e| self.unavailable(&format!("cannot write {path}"), e))
    }

    /// Deletes one object below this location; one already gone counts as deleted.
    pub(crate) async fn delete_small(&self, path: &ObjectPath) -> Result<(), Error> {
        match self.small_store().delete(path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.unavailable(&format!("cannot delete {path}"), e)),
        }
    }

    fn small_store(&self) -> &Arc<dyn ObjectStore> {
        self.unsynced.as_ref().unwrap_or(&self.store)
    }

    /// Makes every small object written below this location durable: one `syncfs` of the local
    /// file system it is on (thousands of files synced one by one cost seconds); nothing to do
    /// for object stores, whose writes are durable when they return.
    pub(crate) async fn make_durable(&self) -> Result<(), Error> {
        if self.unsynced.is_none() {
            return Ok(());
        }
        let folder = local_file(&self.path);
        let url = self.url.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            use std::os::fd::AsRawFd;
            let dir = std::fs::File::open(&folder)?;
            // SAFETY: `dir` is an open descriptor for the whole call; syncfs only reads it.
            if unsafe { libc::syncfs(dir.as_raw_fd()) } == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|synced| synced)
        .map_err(|e| Error::DestinationUnavailable {
            url,
            reason: format!("cannot sync the files written: {e}"),
        })
    }

    fn unavailable(&self, what: &str, e: object_store::Error) -> Error {
        let text = e.to_string();
        if self.no_credentials_given && text.contains("169.254.169.254") {
            return Error::DestinationUnavailable {
                url: self.url.clone(),
                reason: "no S3 credentials: none were given (the aws_access_key_id and \
                         aws_secret_access_key options, AWS_ACCESS_KEY_ID and \
                         AWS_SECRET_ACCESS_KEY, or the destination's credentialsSecretRef in the \
                         operator), and no instance metadata service gave any"
                    .into(),
            };
        }
        Error::DestinationUnavailable {
            url: self.url.clone(),
            reason: format!("{what}: {}", redact(&text, &self.secrets)),
        }
    }
}

/// An object being written.
pub struct Upload {
    inner: UploadKind,
    /// Set once shutdown began: from then on the upload completes or fails as a whole.
    finishing: bool,
}

enum UploadKind {
    /// A local file: buffered, then written beside the final name and renamed.
    Buffered(BufWriter),
    /// S3, GCS, Azure: bytes go through a pipe to a task that uploads them in parts of the
    /// multipart upload `id`, and completes it only when told to (`commit`).
    Parts {
        writer: tokio::io::DuplexStream,
        commit: Option<tokio::sync::oneshot::Sender<()>>,
        task: tokio::task::JoinHandle<Result<(), String>>,
        id: String,
    },
}

impl Upload {
    /// The multipart upload this writes, where the destination has one.
    pub fn staging_id(&self) -> Option<&str> {
        match &self.inner {
            UploadKind::Buffered(_) => None,
            UploadKind::Parts { id, .. } => Some(id),
        }
    }

    /// Discards everything written so far (incomplete multipart parts included).
    pub async fn abort(self) {
        if self.finishing {
            return;
        }
        match self.inner {
            UploadKind::Buffered(mut writer) => {
                let _ = writer.abort().await;
            }
            // Without a commit the task aborts the multipart upload itself.
            UploadKind::Parts {
                writer,
                commit,
                task,
                ..
            } => {
                drop(commit);
                drop(writer);
                let _ = task.await;
            }
        }
    }
}

impl AsyncWrite for Upload {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match &mut self.inner {
            UploadKind::Buffered(writer) => Pin::new(writer).poll_write(cx, buf),
            UploadKind::Parts { writer, .. } => Pin::new(writer).poll_write(cx, buf),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.inner {
            UploadKind::Buffered(writer) => Pin::new(writer).poll_flush(cx),
            UploadKind::Parts { writer, .. } => Pin::new(writer).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.finishing = true;
        match &mut self.inner {
            UploadKind::Buffered(writer) => Pin::new(writer).poll_shutdown(cx),
            UploadKind::Parts {
                writer,
                commit,
                task,
                ..
            } => {
                std::task::ready!(Pin::new(writer).poll_shutdown(cx))?;
                if let Some(commit) = commit.take() {
                    let _ = commit.send(());
                }
                match std::task::ready!(Pin::new(task).poll(cx)) {
                    Ok(Ok(())) => Poll::Ready(Ok(())),
                    Ok(Err(reason)) => Poll::Ready(Err(std::io::Error::other(reason))),
                    Err(e) => Poll::Ready(Err(std::io::Error::other(e.to_string()))),
                }
            }
        }
    }
}

/// Reads the pipe in parts of [`UPLOAD_BUFFER`] bytes and uploads them, at most
/// [`UPLOAD_CONCURRENCY`] at once. At the end of the pipe it completes the upload if `commit`
/// says so, and aborts it otherwise (the writer failed or gave up).
async fn upload_parts(
    store: Arc<dyn MultipartStore>,
    path: ObjectPath,
    id: String,
    mut reader: tokio::io::DuplexStream,
    commit: tokio::sync::oneshot::Receiver<()>,
    secrets: Vec<String>,
) -> Result<(), String> {
    use futures::StreamExt;
    use tokio::io::AsyncReadExt;
    let fail = |e: object_store::Error| redact(&e.to_string(), &secrets);
    let mut parts: Vec<object_store::multipart::PartId> = Vec::new();
    let mut in_flight = futures::stream::FuturesOrdered::new();
    let mut index = 0usize;
    let result: Result<(), String> = async {
        loop {
            let mut part = Vec::with_capacity(UPLOAD_BUFFER);
            while part.len() < UPLOAD_BUFFER {
                let read = (&mut reader)
                    .take((UPLOAD_BUFFER - part.len()) as u64)
                    .read_to_end(&mut part)
                    .await
                    .map_err(|e| e.to_string())?;
                if read == 0 {
                    break;
                }
            }
            let last = part.len() < UPLOAD_BUFFER;
            // Every upload has at least one part; an empty one only when the file is empty.
            if !part.is_empty() || index == 0 {
                let (store, path, id) = (store.clone(), path.clone(), id.clone());
                let n = index;
                in_flight.push_back(async move {
                    store
                        .put_part(&path, &id, n, object_store::PutPayload::from(part))
                        .await
                });
                index += 1;
            }
            while in_flight.len() >= UPLOAD_CONCURRENCY || (last && !in_flight.is_empty()) {
                if let Some(done) = in_flight.next().await {
                    parts.push(done.map_err(fail)?);
                }
            }
            if last {
                return Ok(());
            }
        }
    }
    .await;
    let committed = commit.await.is_ok();
    match result {
        Ok(()) if committed => store
            .complete_multipart(&path, &id, parts)
            .await
            .map(|_| ())
            .map_err(fail),
        outcome => {
            let _ = store.abort_multipart(&path, &id).await;
            outcome.and(Err("the upload was abandoned".into()))
        }
    }
}

/// The local path of a file destination.
fn local_file(path: &ObjectPath) -> std::path::PathBuf {
    std::path::PathBuf::from(format!("/{}", path.as_ref()))
}

/// Keys whose values are credentials: never echoed in errors.
fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["secret", "key", "token", "password", "sas", "credential"]
        .iter()
        .any(|word| key.contains(word))
        && !key.ends_with("key_id")
}

/// Error text fit for a status condition: secrets redacted, on one line (S3 errors carry XML).
fn redact(text: &str, secrets: &[String]) -> String {
    let refs: Vec<&str> = secrets.iter().map(String::as_str).collect();
    super::redact(text, &refs)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// object_store's HTTP client uses rustls without a built-in crypto provider: install ring, the
/// one kube and sqlx already use, once per process.
fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_scheme_accepts_allow_http_and_endpoints() {
        for scheme in [Scheme::S3, Scheme::Gcs, Scheme::Azure] {
            assert!(scheme.accepts("allow_http"), "{scheme:?}");
        }
        assert!(Scheme::S3.accepts("endpoint"));
        assert!(Scheme::Azure.accepts("azure_storage_endpoint"));
        assert!(Scheme::Gcs.accepts("google_base_url"));
        assert!(!Scheme::S3.accepts("endpont"));
    }

    #[test]
    fn secret_keys_are_recognised() {
        for key in [
            "aws_secret_access_key",
            "AWS_SESSION_TOKEN",
            "google_service_account_key",
            "azure_storage_account_key",
            "azure_storage_sas_key",
        ] {
            assert!(is_secret_key(key), "{key}");
        }
        for key in ["aws_access_key_id", "endpoint", "region"] {
            assert!(!is_secret_key(key), "{key}");
        }
    }
}
