//! A real Google Cloud Storage emulator for destination tests: the one named by
//! STATEKEEPER_TEST_GCS_ENDPOINT, or one started through scripts/throwaway-gcs.sh
//! (fake-gcs-server behind the XML upload front in scripts/lib/gcs_xml_gateway.py, on
//! 127.0.0.1), which stops when the test process exits. Each test gets buckets of its own.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::{http_request, xml_tags};

static ENDPOINT: OnceLock<String> = OnceLock::new();
static NEXT_BUCKET: AtomicUsize = AtomicUsize::new(0);

/// The private key of the service account every test uses: tests assert it never shows up.
pub const PRIVATE_KEY: &str = "gcs-test-private-key-7d41e2";

pub fn endpoint() -> &'static str {
    ENDPOINT.get_or_init(|| {
        if let Ok(endpoint) = std::env::var("STATEKEEPER_TEST_GCS_ENDPOINT") {
            return endpoint;
        }
        super::start_throwaway("throwaway-gcs.sh", "STATEKEEPER_GCS_ENDPOINT")
    })
}

/// A fresh, empty bucket (created through the emulator's JSON API, as `gcloud` would).
pub async fn bucket() -> String {
    let name = format!(
        "sk-{}-{}",
        std::process::id(),
        NEXT_BUCKET.fetch_add(1, Ordering::SeqCst)
    );
    let body = serde_json::json!({ "name": name }).to_string();
    let (status, _, response) = http_request(endpoint(), "POST", "/storage/v1/b", &body).await;
    assert_eq!(status, 200, "create bucket {name}: {response}");
    name
}

/// A service account key as Google issues them, for the emulator: `disable_oauth` (no token
/// exchange) and the emulator as `gcs_base_url`. Its private key is [`PRIVATE_KEY`].
pub fn service_account_key() -> String {
    serde_json::json!({
        "type": "service_account",
        "client_email": "statekeeper-test@statekeeper-test.iam.gserviceaccount.com",
        "private_key_id": "0",
        "private_key": PRIVATE_KEY,
        "disable_oauth": true,
        "gcs_base_url": endpoint(),
    })
    .to_string()
}

/// Object store options for the emulator: its URL and a service account key (a secret).
pub fn options() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("google_base_url".to_owned(), endpoint().to_owned()),
        (
            "google_service_account_key".to_owned(),
            service_account_key(),
        ),
    ])
}

/// The keys in a bucket, sorted (the XML API's listing, as object_store lists).
pub async fn keys(bucket: &str) -> Vec<String> {
    let (status, _, body) =
        http_request(endpoint(), "GET", &format!("/{bucket}?list-type=2"), "").await;
    assert_eq!(status, 200, "{body}");
    let mut keys = xml_tags(&body, "Key");
    keys.sort();
    keys
}

/// Multipart uploads started but neither completed nor aborted.
pub async fn pending_uploads(bucket: &str) -> Vec<String> {
    let (status, _, body) =
        http_request(endpoint(), "GET", &format!("/{bucket}?uploads"), "").await;
    assert_eq!(status, 200, "{body}");
    xml_tags(&body, "UploadId")
}

/// The size of an object in bytes, and how many parts it was uploaded in (1 for a plain PUT):
/// the `x-goog-component-count` of a composed object.
pub async fn object_parts(bucket: &str, key: &str) -> (u64, u32) {
    let path = format!("/{bucket}/{}", key.replace('/', "%2F"));
    let (status, head, _) = http_request(endpoint(), "HEAD", &path, "").await;
    assert_eq!(status, 200, "{head}");
    let header = |name: &str| {
        head.lines()
            .filter_map(|line| line.split_once(':'))
            .find(|(key, _)| key.trim().eq_ignore_ascii_case(name))
            .and_then(|(_, value)| value.trim().parse().ok())
    };
    let size = header("content-length").expect("a size");
    let parts = header("x-goog-component-count").map_or(1, |n: u64| n as u32);
    (size, parts)
}
