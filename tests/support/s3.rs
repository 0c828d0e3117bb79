//! A real S3-compatible server for destination tests: the one named by
//! STATEKEEPER_TEST_S3_ENDPOINT, or one started through scripts/throwaway-s3.sh (moto's server on
//! 127.0.0.1), which stops when the test process exits. Each test gets buckets of its own.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::xml_tags;

static ENDPOINT: OnceLock<String> = OnceLock::new();
static NEXT_BUCKET: AtomicUsize = AtomicUsize::new(0);

/// The secret access key every test uses: tests assert it never shows up anywhere.
pub const SECRET_ACCESS_KEY: &str = "sk-test-secret-0f3c9a";

pub fn endpoint() -> &'static str {
    ENDPOINT.get_or_init(|| {
        if let Ok(endpoint) = std::env::var("STATEKEEPER_TEST_S3_ENDPOINT") {
            return endpoint;
        }
        super::start_throwaway("throwaway-s3.sh", "STATEKEEPER_S3_ENDPOINT")
    })
}

/// A fresh, empty bucket.
pub async fn bucket() -> String {
    let name = format!(
        "sk-{}-{}",
        std::process::id(),
        NEXT_BUCKET.fetch_add(1, Ordering::SeqCst)
    );
    let (status, body) = request("PUT", &format!("/{name}")).await;
    assert_eq!(status, 200, "create bucket {name}: {body}");
    name
}

/// Object store options for the test server: endpoint, region and credentials.
pub fn options() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("endpoint".to_owned(), endpoint().to_owned()),
        ("region".to_owned(), "us-east-1".to_owned()),
        (
            "aws_access_key_id".to_owned(),
            "statekeeper-test".to_owned(),
        ),
        (
            "aws_secret_access_key".to_owned(),
            SECRET_ACCESS_KEY.to_owned(),
        ),
    ])
}

/// The keys in a bucket, sorted.
pub async fn keys(bucket: &str) -> Vec<String> {
    let (status, body) = request("GET", &format!("/{bucket}?list-type=2")).await;
    assert_eq!(status, 200, "{body}");
    let mut keys = xml_tags(&body, "Key");
    keys.sort();
    keys
}

/// Starts a multipart upload of `key` (as a process that then dies would) and returns its id.
pub async fn start_upload(bucket: &str, key: &str) -> String {
    let (status, body) = request("POST", &format!("/{bucket}/{key}?uploads")).await;
    assert_eq!(status, 200, "{body}");
    xml_tags(&body, "UploadId").pop().expect("an upload id")
}

/// Multipart uploads started but neither completed nor aborted.
pub async fn pending_uploads(bucket: &str) -> Vec<String> {
    let (status, body) = request("GET", &format!("/{bucket}?uploads")).await;
    assert_eq!(status, 200, "{body}");
    xml_tags(&body, "UploadId")
}

/// The size of an object in bytes, and how many parts it was uploaded in (1 for a plain PUT).
pub async fn object_parts(bucket: &str, key: &str) -> (u64, u32) {
    let (status, body) = request("GET", &format!("/{bucket}?list-type=2&prefix={key}")).await;
    assert_eq!(status, 200, "{body}");
    let size = xml_tags(&body, "Size")
        .first()
        .and_then(|s| s.parse().ok())
        .expect("object listed");
    // A multipart object's ETag ends in -<parts>.
    let etag = xml_tags(&body, "ETag").first().cloned().unwrap_or_default();
    let parts = etag
        .replace("&quot;", "")
        .trim_matches('"')
        .rsplit_once('-')
        .and_then(|(_, n)| n.parse().ok())
        .unwrap_or(1);
    (size, parts)
}

/// One unsigned HTTP/1.1 request to the test server (it does not check signatures).
async fn request(method: &str, path: &str) -> (u16, String) {
    let (status, _, body) = super::http_request(endpoint(), method, path, "").await;
    (status, body)
}
