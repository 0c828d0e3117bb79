//! `state verify` against a real PostgreSQL, with state written by the real SQLMesh and Meltano:
//! a good export verifies in every format, a changed one is refused naming its table, and the
//! store is never changed and no scratch schema is left behind.

mod support;

use std::path::Path;

use statekeeper::engine::generator::GenerateOptions;
use statekeeper::engine::{
    Compression, Destination, Error, ExportFormat, ExportOptions, Framework, Store, VerifyOptions,
    VerifyReport,
};
use support::{TestDb, snapshot};

async fn export_file(store: &Store, path: &Path, format: ExportFormat, compression: Compression) {
    let destination =
        Destination::parse(path.to_str().unwrap(), &Default::default()).expect("a local path");
    store
        .export_to(
            &destination,
            &ExportOptions {
                format,
                compression,
                ..Default::default()
            },
            |_| {},
        )
        .await
        .expect("export");
}

/// Verifies the file at `path` as the CLI does: read back from where it is stored.
async fn verify_file(
    store: &Store,
    path: &Path,
    sha256: Option<&str>,
) -> Result<VerifyReport, Error> {
    let source = Destination::parse(path.to_str().unwrap(), &Default::default())?;
    store
        .verify(
            source.open().await?,
            &VerifyOptions {
                expected_sha256: sha256.map(str::to_owned),
                ..Default::default()
            },
        )
        .await
}

/// Verifies, checking that the store is unchanged and no scratch schema was left behind.
async fn verify_unchanged(
    db: &TestDb,
    store: &Store,
    path: &Path,
    sha256: Option<&str>,
) -> Result<VerifyReport, Error> {
    let mut conn = db.conn().await;
    let schema = store.schema().as_str();
    let before = snapshot(&mut conn, schema).await;
    let schemas = support::schemas(&mut conn).await;
    let verified = verify_file(store, path, sha256).await;
    assert_eq!(
        snapshot(&mut conn, schema).await,
        before,
        "verify changed the store"
    );
    assert_eq!(
        support::schemas(&mut conn).await,
        schemas,
        "verify left a schema behind"
    );
    verified
}

fn temp_file(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("sk-verify-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

async fn generated(db: &TestDb) -> Store {
    let store = db.store("state").await;
    store.init(None).await.unwrap();
    store
        .generate(&GenerateOptions {
            model_versions: 300,
            environments: 4,
            seed: 7,
            ..Default::default()
        })
        .await
        .unwrap();
    store
}

#[tokio::test]
async fn every_statekeeper_format_verifies_and_nothing_changes() {
    let db = TestDb::new().await;
    let store = generated(&db).await;
    for (format, compression) in [
        (ExportFormat::Exact, Compression::Zstd),
        (ExportFormat::Exact, Compression::None),
        (ExportFormat::Statekeeper, Compression::Gzip),
    ] {
        let path = temp_file(&format!("{format}-{compression:?}.json"));
        export_file(&store, &path, format, compression).await;
        let report = verify_unchanged(&db, &store, &path, None)
            .await
            .unwrap_or_else(|e| panic!("{format} {compression:?}: {e}"));
        assert!(report.manifest);
        assert_eq!(report.format, format);
        let versions = report
            .tables
            .iter()
            .find(|t| t.name == "model_versions")
            .expect("model_versions is in the report");
        assert_eq!(versions.rows, 300);
        assert_eq!(versions.restored_rows, Some(300));
        assert!(versions.sha256.is_some());
    }
}

#[tokio::test]
async fn a_changed_value_fails_verification_naming_the_table() {
    let db = TestDb::new().await;
    let store = generated(&db).await;
    let path = temp_file("tampered.json");
    export_file(&store, &path, ExportFormat::Exact, Compression::None).await;
    let mut bytes = std::fs::read(&path).unwrap();
    // One character of the first fingerprint, in table model_versions.
    let text = String::from_utf8(bytes.clone()).unwrap();
    let table = text.find("\"model_versions\":{").unwrap();
    let row = table + text[table..].find("\"rows\":[[").unwrap() + "\"rows\":[[".len();
    let value = row + text[row..].find(",\"").unwrap() + 2;
    bytes[value] = if bytes[value] == b'a' { b'b' } else { b'a' };
    std::fs::write(&path, &bytes).unwrap();
    let err = verify_unchanged(&db, &store, &path, None)
        .await
        .expect_err("a changed file verifies");
    assert!(matches!(err, Error::VerificationFailed(_)), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("table \"model_versions\" is not what was exported"),
        "{message}"
    );
    // An import refuses it the same way.
    let source = Destination::parse(path.to_str().unwrap(), &Default::default()).unwrap();
    let err = store
        .import(
            source.open().await.unwrap(),
            &statekeeper::engine::ImportOptions::replace(),
        )
        .await
        .expect_err("a changed file imports");
    assert!(
        err.to_string()
            .contains("table \"model_versions\" is not what was exported"),
        "{err}"
    );
}

#[tokio::test]
async fn a_wrong_checksum_a_truncated_file_and_a_file_without_manifest_fail() {
    let db = TestDb::new().await;
    let store = generated(&db).await;
    let path = temp_file("whole.json");
    export_file(&store, &path, ExportFormat::Statekeeper, Compression::None).await;

    let err = verify_unchanged(&db, &store, &path, Some(&"0".repeat(64)))
        .await
        .expect_err("a wrong sha256 verifies");
    assert!(err.to_string().contains("checksum mismatch"), "{err}");

    let bytes = std::fs::read(&path).unwrap();
    let truncated = temp_file("truncated.json");
    std::fs::write(&truncated, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let err = verify_unchanged(&db, &store, &truncated, None)
        .await
        .expect_err("a truncated file verifies");
    assert!(err.to_string().contains("truncated or corrupt"), "{err}");

    // A file written before exports carried a manifest restores, but cannot be compared.
    let text = String::from_utf8(bytes).unwrap();
    let old = temp_file("no-manifest.json");
    std::fs::write(
        &old,
        format!("{}}}\n", &text[..text.rfind(",\"manifest\":").unwrap()]),
    )
    .unwrap();
    let err = verify_unchanged(&db, &store, &old, None)
        .await
        .expect_err("a file without a manifest verifies");
    assert!(err.to_string().contains("carries no manifest"), "{err}");
}

#[tokio::test]
async fn a_file_of_another_schema_version_fails_with_the_reason() {
    let db = TestDb::new().await;
    let old = db.store("old").await;
    old.init(Some(2)).await.unwrap();
    let path = temp_file("version-2.json");
    export_file(&old, &path, ExportFormat::Exact, Compression::None).await;
    let store = generated(&db).await;
    let err = verify_unchanged(&db, &store, &path, None)
        .await
        .expect_err("a file of another version verifies");
    assert!(err.to_string().contains("schema version 2"), "{err}");
}

#[tokio::test]
async fn sqlmesh_state_written_by_sqlmesh_verifies_in_both_formats() {
    let (db, _project) = support::sqlmesh::planned().await;
    let store = db.store("sqlmesh").await.with_framework(Framework::Sqlmesh);
    for format in [ExportFormat::Sqlmesh, ExportFormat::Exact] {
        let path = temp_file(&format!("sqlmesh-{format}.json.zst"));
        export_file(&store, &path, format, Compression::Zstd).await;
        let report = verify_unchanged(&db, &store, &path, None)
            .await
            .unwrap_or_else(|e| panic!("{format}: {e}"));
        assert!(report.manifest, "{format}");
        assert!(report.total_rows() > 0, "{format}");
    }
}

#[tokio::test]
async fn meltano_state_verifies_by_manifest_or_checksum() {
    let db = TestDb::new().await;
    let project = support::meltano::Project::new(&db);
    project.set(
        "dev:tap-a-to-target-b",
        &serde_json::json!({"singer_state": {"a": 1}}),
    );
    project.set(
        "dev:tap-c-to-target-d",
        &serde_json::json!({"singer_state": {"c": 2}}),
    );
    let store = db.store("public").await.with_framework(Framework::Meltano);

    let exact = temp_file("meltano-exact.json");
    export_file(&store, &exact, ExportFormat::Exact, Compression::None).await;
    assert!(
        verify_unchanged(&db, &store, &exact, None)
            .await
            .unwrap()
            .manifest
    );

    // Meltano's own format has no place for a manifest: its checksum stands in.
    let own = temp_file("meltano.json");
    export_file(&store, &own, ExportFormat::Meltano, Compression::None).await;
    let err = verify_unchanged(&db, &store, &own, None)
        .await
        .expect_err("a Meltano document verifies without a checksum");
    assert!(
        err.to_string().contains("Meltano's format has no place"),
        "{err}"
    );
    let sha256 = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(std::fs::read(&own).unwrap()))
    };
    let report = verify_unchanged(&db, &store, &own, Some(&sha256))
        .await
        .unwrap();
    assert!(!report.manifest);
    assert_eq!(report.total_rows(), 2);
}

#[tokio::test]
async fn an_encrypted_export_verifies_with_its_identity_only() {
    let db = TestDb::new().await;
    let store = generated(&db).await;
    let identity = age::x25519::Identity::generate();
    let identities = statekeeper::engine::Identities::parse(
        age::secrecy::ExposeSecret::expose_secret(&identity.to_string()),
        "the test's key",
    )
    .unwrap();
    let path = temp_file("encrypted.json.zst.age");
    let destination = Destination::parse(path.to_str().unwrap(), &Default::default()).unwrap();
    store
        .export_to(
            &destination,
            &ExportOptions {
                compression: Compression::Zstd,
                recipients: identities.recipients(),
                ..Default::default()
            },
            |_| {},
        )
        .await
        .unwrap();
    let err = verify_unchanged(&db, &store, &path, None)
        .await
        .expect_err("an encrypted file verifies without its identity");
    assert!(
        matches!(err, Error::IdentityRequired { recipients: 1 }),
        "{err}"
    );
    let verify = |identities| async {
        store
            .verify(
                destination.open().await.unwrap(),
                &VerifyOptions {
                    identities,
                    ..Default::default()
                },
            )
            .await
    };
    let other = age::x25519::Identity::generate();
    let wrong = statekeeper::engine::Identities::parse(
        age::secrecy::ExposeSecret::expose_secret(&other.to_string()),
        "another key",
    )
    .unwrap();
    let err = verify(wrong).await.expect_err("a wrong identity verifies");
    assert!(matches!(err, Error::NoMatchingIdentity { .. }), "{err}");
    let report = verify(identities)
        .await
        .expect("verified with the identity");
    assert!(report.manifest);
    assert_eq!(report.format, ExportFormat::Exact);
}
