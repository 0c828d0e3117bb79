//! Where export files live: a local path (`file://` or a plain path) or an object in S3 or an
//! S3-compatible server (`s3://`), Google Cloud Storage (`gs://`) or Azure Blob Storage
//! (`az://`), all through `object_store`. Large files go up as multipart uploads, so memory
//! stays bounded whatever the file size, and no reader ever sees a half-written object.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::{Arc, Once};
use std::task::{Context, Poll};

use futures::TryStreamExt;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::buffered::BufWriter;
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};
use tokio::io::{AsyncRead, AsyncWrite};

use super::Error;

/// Files up to this size are one PUT; larger ones a multipart upload in 5 MiB parts.
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

/// Builds one provider's store from its builder and the (already validated) option keys.
macro_rules! build_store {
    ($builder:expr, $config:expr) => {{
        let mut builder = $builder;
        for (key, value) in $config {
            if let Ok(key) = key.parse() {
                builder = builder.with_config(key, value);
            }
        }
        builder
            .build()
            .map(|store| Arc::new(store) as Arc<dyn ObjectStore>)
    }};
}

/// One export file's location, ready to write, read or delete.
#[derive(Clone, Debug)]
pub struct Destination {
    store: Arc<dyn ObjectStore>,
    path: ObjectPath,
    url: String,
    /// Option values that must never appear in error text.
    secrets: Vec<String>,
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
        let store = built.map_err(|e| invalid(redact(&e.to_string(), &secrets)))?;
        Ok(Self {
            store,
            path,
            url: url.to_owned(),
            secrets,
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
            path: object_path,
            url: url.to_owned(),
            secrets,
        })
    }

    /// The URL as given (never holds credentials).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A writer for a new object at this location. Nothing is visible under the final name until
    /// [`tokio::io::AsyncWriteExt::shutdown`] succeeds; call [`Upload::abort`] on failure.
    pub fn upload(&self) -> Upload {
        Upload {
            inner: BufWriter::with_capacity(self.store.clone(), self.path.clone(), UPLOAD_BUFFER)
                .with_max_concurrency(UPLOAD_CONCURRENCY),
            finishing: false,
        }
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

    fn unavailable(&self, what: &str, e: object_store::Error) -> Error {
        Error::DestinationUnavailable {
            url: self.url.clone(),
            reason: format!("{what}: {}", redact(&e.to_string(), &self.secrets)),
        }
    }
}

/// An object being written: buffered, then one PUT or a multipart upload.
pub struct Upload {
    inner: BufWriter,
    /// Set once shutdown began: from then on the upload completes or fails as a whole.
    finishing: bool,
}

impl Upload {
    /// Discards everything written so far (incomplete multipart parts included).
    pub async fn abort(mut self) {
        if !self.finishing {
            let _ = self.inner.abort().await;
        }
    }
}

impl AsyncWrite for Upload {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.finishing = true;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
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
