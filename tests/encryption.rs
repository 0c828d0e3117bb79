//! Encryption at rest with age, against a real PostgreSQL: encrypted round trips in every
//! compression and format, files refused without an identity or with the wrong one (the store
//! unchanged), the sha256 of the stored bytes, armored files, no key in any message, and the CLI.

mod support;

use std::collections::BTreeMap;
use std::process::{Command, Output};

use age::secrecy::ExposeSecret;
use sha2::Digest;
use statekeeper::engine::generator::GenerateOptions;
use statekeeper::engine::import::scan_decrypting;
use statekeeper::engine::{
    Compression, Error, ExportFormat, ExportOptions, Identities, ImportMode, ImportOptions,
    Recipients, Store,
};
use support::TestDb;

const SCHEMA: &str = "state";

/// A fresh age key pair: the identity file's text and its public key.
fn key_pair() -> (String, String) {
    let identity = age::x25519::Identity::generate();
    let secret = identity.to_string().expose_secret().to_owned();
    (
        format!(
            "# created: by the test\n# public key: {}\n{secret}\n",
            identity.to_public()
        ),
        identity.to_public().to_string(),
    )
}

/// The secret key alone, from an identity file's text.
fn secret_of(identity_file: &str) -> &str {
    identity_file
        .lines()
        .find(|l| l.starts_with("AGE-SECRET-KEY-1"))
        .unwrap()
}

async fn source(db: &TestDb) -> Store {
    let store = db.store(SCHEMA).await;
    store.init(None).await.unwrap();
    store
        .generate(&GenerateOptions {
            model_versions: 600,
            environments: 6,
            seed: 27,
            checkpoints_per_environment: 2,
            ..Default::default()
        })
        .await
        .unwrap();
    store
}

async fn everything(db: &TestDb) -> BTreeMap<String, Vec<String>> {
    support::snapshot(&mut db.conn().await, SCHEMA).await
}

async fn current(db: &TestDb) -> BTreeMap<String, Vec<String>> {
    support::current_state(&mut db.conn().await, SCHEMA).await
}

fn import_options(mode: ImportMode, identities: Identities) -> ImportOptions {
    ImportOptions {
        mode,
        identities,
        ..ImportOptions::merge()
    }
}

#[tokio::test]
async fn encrypted_exports_round_trip_in_every_compression_and_format() {
    let a = TestDb::new().await;
    let store = source(&a).await;
    let original = current(&a).await;
    let (ours, our_public) = key_pair();
    let (_, theirs) = key_pair();
    let mut recipients = Recipients::parse(&our_public, "test").unwrap();
    recipients.extend(Recipients::parse(&theirs, "test").unwrap());
    let identities = Identities::parse(&ours, "test").unwrap();

    for format in [ExportFormat::Exact, ExportFormat::Statekeeper] {
        for compression in [Compression::None, Compression::Gzip, Compression::Zstd] {
            let options = ExportOptions {
                format,
                compression,
                recipients: recipients.clone(),
                ..Default::default()
            };
            let (report, bytes) = store.export(Vec::new(), &options).await.unwrap();
            let case = format!("{format} {compression:?}");
            assert!(bytes.starts_with(b"age-encryption.org/v1\n"), "{case}");
            // The checksum and the size are of the bytes as stored: encrypted.
            assert_eq!(report.bytes, bytes.len() as u64, "{case}");
            assert_eq!(
                report.sha256.as_deref(),
                Some(hex::encode(sha2::Sha256::digest(&bytes)).as_str()),
                "{case}"
            );
            assert_eq!(report.encrypted_to, 2, "{case}");
            assert!(report.summary("f").contains("encrypted to 2 recipients"));

            // Compression came first: what is inside the encryption is compressed.
            let scanned = scan_decrypting(std::io::Cursor::new(bytes.clone()), &identities)
                .await
                .unwrap();
            assert_eq!(scanned.compression, compression, "{case}");
            assert_eq!(scanned.encrypted_to, 2, "{case}");
            assert_eq!(scanned.sha256, report.sha256.clone().unwrap(), "{case}");

            let b = TestDb::new().await;
            let target = b.store(SCHEMA).await;
            target.init(None).await.unwrap();
            let imported = target
                .import(
                    std::io::Cursor::new(bytes),
                    &ImportOptions {
                        expected_sha256: report.sha256.clone(),
                        ..import_options(ImportMode::Replace, identities.clone())
                    },
                )
                .await
                .unwrap_or_else(|e| panic!("{case}: {e}"));
            assert_eq!(imported.compression, compression, "{case}");
            assert_eq!(Some(imported.sha256), report.sha256, "{case}");
            assert_eq!(current(&b).await, original, "{case}");
        }
    }
}

#[tokio::test]
async fn encrypted_files_without_the_right_identity_change_nothing_and_say_why() {
    let a = TestDb::new().await;
    let store = source(&a).await;
    let (ours, our_public) = key_pair();
    let (stranger, _) = key_pair();
    let (_, theirs) = key_pair();
    let recipients =
        Recipients::parse(&format!("# two keys\n{our_public}\n{theirs}\n"), "test").unwrap();
    let (report, bytes) = store
        .export(
            Vec::new(),
            &ExportOptions {
                format: ExportFormat::Statekeeper,
                compression: Compression::Zstd,
                recipients,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let sha = report.sha256.clone().unwrap();

    // The target holds state of its own, which must survive every refusal.
    let b = TestDb::new().await;
    let target = source(&b).await;
    let before = everything(&b).await;
    let backups = target.backups().await.unwrap().len();
    let keys = [
        secret_of(&ours).to_owned(),
        secret_of(&stranger).to_owned(),
        our_public.clone(),
        theirs.clone(),
    ];
    let assert_no_key = |text: &str| {
        for key in &keys {
            // Not the key, nor a recognisable part of it.
            assert!(!text.contains(&key[16..40]), "a key in: {text}");
        }
    };

    let without = target
        .import(
            std::io::Cursor::new(bytes.clone()),
            &import_options(ImportMode::Replace, Identities::default()),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(without, Error::IdentityRequired { recipients: 2 }),
        "{without:?}"
    );
    assert_eq!(
        without.to_string(),
        "the file is encrypted to 2 recipients: pass --identity FILE (on a StateMigration: \
         spec.import.identitySecretRef); nothing was changed"
    );
    assert_eq!(without.reason(), "IdentityRequired");

    let wrong = target
        .import(
            std::io::Cursor::new(bytes.clone()),
            &ImportOptions {
                expected_sha256: Some(sha.clone()),
                ..import_options(
                    ImportMode::Replace,
                    Identities::parse(&stranger, "test").unwrap(),
                )
            },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            wrong,
            Error::NoMatchingIdentity {
                recipients: 2,
                identities: 1
            }
        ),
        "{wrong:?}"
    );
    assert_eq!(
        wrong.to_string(),
        "no identity matches: the file is encrypted to 2 recipients and none of the 1 identity \
         given is one of them; nothing was changed"
    );

    // One changed byte of ciphertext: age's authentication refuses the chunk.
    let mut tampered = bytes.clone();
    let at = tampered.len() - 100;
    tampered[at] ^= 0x01;
    let corrupt = target
        .import(
            std::io::Cursor::new(tampered),
            &import_options(
                ImportMode::Replace,
                Identities::parse(&ours, "test").unwrap(),
            ),
        )
        .await
        .unwrap_err();
    assert!(matches!(corrupt, Error::InvalidExport(_)), "{corrupt:?}");

    // Cut short after a whole chunk: the last chunk is missing, which age notices.
    let truncated = target
        .import(
            std::io::Cursor::new(bytes[..bytes.len() / 2].to_vec()),
            &import_options(
                ImportMode::Replace,
                Identities::parse(&ours, "test").unwrap(),
            ),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(truncated, Error::InvalidExport(_)),
        "{truncated:?}"
    );

    for error in [&without, &wrong, &corrupt, &truncated] {
        assert_no_key(&error.to_string());
        assert_no_key(&format!("{error:?}"));
    }
    assert_eq!(everything(&b).await, before, "nothing changed");
    assert_eq!(
        target.backups().await.unwrap().len(),
        backups,
        "no backup made"
    );

    // The right identity among others imports it, checked against the stored bytes' sha256.
    let mut identities = Identities::parse(&stranger, "test").unwrap();
    identities.extend(Identities::parse(&ours, "test").unwrap());
    let imported = target
        .import(
            std::io::Cursor::new(bytes),
            &ImportOptions {
                expected_sha256: Some(sha.clone()),
                ..import_options(ImportMode::Replace, identities)
            },
        )
        .await
        .unwrap();
    assert_eq!(imported.sha256, sha);
    assert_eq!(current(&b).await, current(&a).await);
}

#[tokio::test]
async fn armored_age_files_import_too() {
    let a = TestDb::new().await;
    let store = source(&a).await;
    let (ours, our_public) = key_pair();
    let (_, plain) = store
        .export(
            Vec::new(),
            &ExportOptions {
                format: ExportFormat::Statekeeper,
                compression: Compression::Gzip,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    // What `age -a -r age1… < export.json.gz` writes.
    let recipient: age::x25519::Recipient = our_public.parse().unwrap();
    let encryptor =
        age::Encryptor::with_recipients(std::iter::once(&recipient as &dyn age::Recipient))
            .unwrap();
    let mut armored = Vec::new();
    {
        use std::io::Write;
        let armor =
            age::armor::ArmoredWriter::wrap_output(&mut armored, age::armor::Format::AsciiArmor)
                .unwrap();
        let mut writer = encryptor.wrap_output(armor).unwrap();
        writer.write_all(&plain).unwrap();
        writer.finish().unwrap().finish().unwrap();
    }
    assert!(armored.starts_with(b"-----BEGIN AGE ENCRYPTED FILE-----"));

    let b = TestDb::new().await;
    let target = b.store(SCHEMA).await;
    target.init(None).await.unwrap();
    let refused = target
        .import(
            std::io::Cursor::new(armored.clone()),
            &ImportOptions::replace(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(refused, Error::IdentityRequired { recipients: 1 }),
        "{refused:?}"
    );
    let imported = target
        .import(
            std::io::Cursor::new(armored),
            &import_options(
                ImportMode::Replace,
                Identities::parse(&ours, "test").unwrap(),
            ),
        )
        .await
        .unwrap();
    assert_eq!(imported.compression, Compression::Gzip);
    assert_eq!(current(&b).await, current(&a).await);
}

#[tokio::test]
async fn keys_in_the_wrong_place_are_refused_without_being_quoted() {
    let (ours, public) = key_pair();
    let secret = secret_of(&ours);
    let as_recipient = Recipients::parse(&format!("# keys\n{secret}\n"), "Secret \"k\"")
        .unwrap_err()
        .to_string();
    assert_eq!(
        as_recipient,
        "Secret \"k\", line 2: is an age secret key, not a public key: give the recipient \
         (`age-keygen -y KEYFILE` prints it) and keep the secret key out of recipients"
    );
    let as_identity = Identities::parse(&public, "identity file x")
        .unwrap_err()
        .to_string();
    assert!(as_identity.contains("is a public key"), "{as_identity}");
    assert!(!as_identity.contains(&public[4..]), "{as_identity}");
    let garbage = Identities::parse("not a key\n", "identity file y").unwrap_err();
    assert_eq!(garbage.reason(), "InvalidEncryptionKey");
    assert!(!garbage.to_string().contains("not a key"), "{garbage}");
}

/// The binary under test (`STATEKEEPER_TEST_BIN` overrides cargo's, e.g. where several
/// worktrees share one target folder).
fn statekeeper(url: &str, args: &[&str]) -> Output {
    let binary = std::env::var("STATEKEEPER_TEST_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_statekeeper").to_owned());
    Command::new(binary)
        .args(args)
        .env("STATEKEEPER_DATABASE_URL", url)
        .env_remove("STATEKEEPER_SCHEMA")
        .output()
        .expect("run statekeeper")
}

#[tokio::test]
async fn the_cli_encrypts_to_keys_and_files_and_decrypts_with_identity_files() {
    let a = TestDb::new().await;
    source(&a).await;
    let dir = std::env::temp_dir().join(format!("sk-encryption-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (ours, our_public) = key_pair();
    let (_, theirs) = key_pair();
    let (stranger, _) = key_pair();
    let identity_file = dir.join("key.txt");
    std::fs::write(&identity_file, &ours).unwrap();
    let stranger_file = dir.join("stranger.txt");
    std::fs::write(&stranger_file, &stranger).unwrap();
    let recipients_file = dir.join("recipients.txt");
    std::fs::write(&recipients_file, format!("# the team\n{theirs}\n")).unwrap();
    let file = dir.join("state.json.zst.age");
    let path = file.to_str().unwrap();

    let exported = statekeeper(
        &a.url,
        &[
            "state",
            "export",
            "--schema",
            SCHEMA,
            "--to",
            path,
            "--compression",
            "zstd",
            "--encrypt-to",
            &our_public,
            "--encrypt-to",
            recipients_file.to_str().unwrap(),
            "-o",
            "json",
        ],
    );
    assert!(
        exported.status.success(),
        "{}",
        String::from_utf8_lossy(&exported.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&exported.stdout).unwrap();
    let stored = std::fs::read(&file).unwrap();
    assert!(stored.starts_with(b"age-encryption.org/v1\n"));
    assert_eq!(report["encryptedTo"], 2);
    assert_eq!(
        report["sha256"].as_str().unwrap(),
        hex::encode(sha2::Sha256::digest(&stored))
    );
    let sha = report["sha256"].as_str().unwrap().to_owned();

    let b = TestDb::new().await;
    statekeeper(&b.url, &["state", "init", "--schema", SCHEMA]);
    let before = everything(&b).await;
    let import = |extra: &[&str]| {
        let mut args = vec![
            "state",
            "import",
            "--replace",
            "--schema",
            SCHEMA,
            "--from",
            path,
            "--sha256",
            &sha,
        ];
        args.extend_from_slice(extra);
        statekeeper(&b.url, &args)
    };
    let refused = import(&[]);
    let message = String::from_utf8_lossy(&refused.stderr).into_owned();
    assert_eq!(refused.status.code(), Some(1), "{message}");
    assert!(
        message.contains("the file is encrypted to 2 recipients: pass --identity"),
        "{message}"
    );
    let wrong = import(&["--identity", stranger_file.to_str().unwrap()]);
    let message = String::from_utf8_lossy(&wrong.stderr).into_owned();
    assert_eq!(wrong.status.code(), Some(1), "{message}");
    assert!(message.contains("no identity matches"), "{message}");
    assert!(!message.contains(&secret_of(&stranger)[16..]), "{message}");
    assert_eq!(everything(&b).await, before, "nothing changed");

    let imported = import(&["--identity", identity_file.to_str().unwrap()]);
    assert!(
        imported.status.success(),
        "{}",
        String::from_utf8_lossy(&imported.stderr)
    );
    assert_eq!(current(&b).await, current(&a).await);

    // A key where a recipient belongs, given on the command line: refused before connecting,
    // never echoed.
    let leaked = statekeeper(
        &a.url,
        &[
            "state",
            "export",
            "--schema",
            SCHEMA,
            "--to",
            dir.join("never.json").to_str().unwrap(),
            "--encrypt-to",
            secret_of(&ours),
        ],
    );
    let message = String::from_utf8_lossy(&leaked.stderr).into_owned();
    assert_eq!(leaked.status.code(), Some(1), "{message}");
    assert!(message.contains("is an age secret key"), "{message}");
    assert!(!message.contains(&secret_of(&ours)[16..]), "{message}");
    assert!(!dir.join("never.json").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn sqlmesh_state_written_by_sqlmesh_round_trips_encrypted() {
    use statekeeper::engine::Framework;
    let (db, _project) = support::sqlmesh::planned().await;
    let store = db.store("sqlmesh").await.with_framework(Framework::Sqlmesh);
    let planned = support::sqlmesh::sqlmesh_state(&db.url).await;
    let (ours, our_public) = key_pair();
    let identities = Identities::parse(&ours, "test").unwrap();
    let recipients = Recipients::parse(&our_public, "test").unwrap();
    let mut files = Vec::new();
    for format in [ExportFormat::Exact, ExportFormat::Sqlmesh] {
        let (report, bytes) = store
            .export(
                Vec::new(),
                &ExportOptions {
                    format,
                    compression: Compression::Zstd,
                    recipients: recipients.clone(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert!(bytes.starts_with(b"age-encryption.org/v1\n"), "{format}");
        assert_eq!(report.encrypted_to, 1);
        files.push((format, bytes));
    }

    // The store loses an environment; an import without the identity changes nothing.
    sqlx::query("DELETE FROM sqlmesh._environments WHERE name = 'dev'")
        .execute(&mut db.conn().await)
        .await
        .unwrap();
    let changed = support::sqlmesh::sqlmesh_state(&db.url).await;
    assert_ne!(changed, planned);
    for (format, bytes) in &files {
        let refused = store
            .import(
                std::io::Cursor::new(bytes.clone()),
                &import_options(ImportMode::Replace, Identities::default()),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(refused, Error::IdentityRequired { recipients: 1 }),
            "{format}: {refused:?}"
        );
        assert_eq!(support::sqlmesh::sqlmesh_state(&db.url).await, changed);
    }
    // With it, SQLMesh's own format brings the environment back, and the exact format every
    // row as SQLMesh wrote it.
    let environments = |url: String| async move {
        sqlx::query_scalar::<_, String>("SELECT name FROM sqlmesh._environments ORDER BY name")
            .fetch_all(
                &mut <sqlx::PgConnection as sqlx::Connection>::connect(&url)
                    .await
                    .unwrap(),
            )
            .await
            .unwrap()
    };
    files.reverse();
    for (format, bytes) in files {
        store
            .import(
                std::io::Cursor::new(bytes),
                &import_options(ImportMode::Replace, identities.clone()),
            )
            .await
            .unwrap_or_else(|e| panic!("{format}: {e}"));
        assert_eq!(
            environments(db.url.clone()).await,
            ["dev", "dev_fwd", "prod"],
            "{format}"
        );
    }
    assert_eq!(support::sqlmesh::sqlmesh_state(&db.url).await, planned);
}
