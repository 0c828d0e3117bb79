//! A real Azure Blob Storage emulator (Azurite) for destination tests: the one named by
//! STATEKEEPER_TEST_AZURE_ENDPOINT, or one started through scripts/throwaway-azure.sh on
//! 127.0.0.1, which stops when the test process exits. It holds one container,
//! `statekeeper-test`; tests keep apart by key prefix.

use std::collections::BTreeMap;
use std::sync::OnceLock;

static ENDPOINT: OnceLock<String> = OnceLock::new();

pub const CONTAINER: &str = "statekeeper-test";
/// Azurite's published development account key (not a secret).
const ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

pub fn endpoint() -> &'static str {
    ENDPOINT.get_or_init(|| {
        if let Ok(endpoint) = std::env::var("STATEKEEPER_TEST_AZURE_ENDPOINT") {
            return endpoint;
        }
        super::start_throwaway("throwaway-azure.sh", "STATEKEEPER_AZURE_ENDPOINT")
    })
}

/// Object store options for the emulator: account, key and endpoint.
pub fn options() -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "azure_storage_account_name".to_owned(),
            "devstoreaccount1".to_owned(),
        ),
        (
            "azure_storage_account_key".to_owned(),
            ACCOUNT_KEY.to_owned(),
        ),
        ("azure_storage_endpoint".to_owned(), endpoint().to_owned()),
    ])
}
