//! Hostile spec values (docs/reliability.md#hostile-specs): every field of every CRD that a user
//! writes, given the values an attacker or a typo would — SQL in identifiers, 10 MB strings,
//! unicode look-alikes, negative and huge numbers, 6-field and impossible cron, URLs with
//! credentials or query strings, unknown schemes, references to other namespaces — and what
//! refuses each: the CRD's OpenAPI schema (checked here as the API server checks it), a CEL rule
//! (evaluated with a CEL interpreter), or the real reconciler (its Ready condition's reason,
//! against a real PostgreSQL and the in-memory Kubernetes API). A few values are harmless data
//! and are accepted; the table says why.
//!
//! Each row is checked; the table in docs/reliability.md is rendered from these rows, and the
//! test fails when the two differ.

mod support;

use serde_json::{Value, json};
use support::TestDb;
use support::operator::*;

/// What stops a value.
#[derive(Clone, Debug, PartialEq)]
enum Refusal {
    /// The CRD's OpenAPI schema (the keyword that fails).
    Schema(&'static str),
    /// A CEL rule of the CRD (a fragment of its message).
    Cel(&'static str),
    /// The reconciler: Ready=False with this reason, nothing done.
    Condition(&'static str),
    /// Accepted: the value is data, never code (why).
    Harmless(&'static str),
}

struct Row {
    kind: &'static str,
    field: &'static str,
    tried: &'static str,
    value: Value,
    refused_by: Refusal,
}

fn row(
    kind: &'static str,
    field: &'static str,
    tried: &'static str,
    value: Value,
    refused_by: Refusal,
) -> Row {
    Row {
        kind,
        field,
        tried,
        value,
        refused_by,
    }
}

fn huge() -> Value {
    Value::String("a".repeat(10 * 1024 * 1024))
}

fn rows() -> Vec<Row> {
    use Refusal::*;
    let sql = "x\"; DROP SCHEMA public CASCADE; --";
    vec![
        // StateStore
        row(
            "StateStore",
            "schema",
            "SQL in the identifier",
            json!(sql),
            Schema("pattern"),
        ),
        row(
            "StateStore",
            "schema",
            "unicode look-alike (Cyrillic ѕ)",
            json!("ѕtate"),
            Schema("pattern"),
        ),
        row(
            "StateStore",
            "schema",
            "10 MB string",
            huge(),
            Schema("maxLength"),
        ),
        row(
            "StateStore",
            "schema",
            "PostgreSQL's own schema",
            json!("pg_catalog"),
            Condition("InvalidSpec"),
        ),
        row(
            "StateStore",
            "connection.host",
            "SQL",
            json!("db'; DROP TABLE x; --"),
            Condition("DatabaseUnreachable"),
        ),
        row(
            "StateStore",
            "connection.host",
            "10 MB string",
            huge(),
            Schema("maxLength"),
        ),
        row(
            "StateStore",
            "connection.port",
            "negative",
            json!(-1),
            Schema("minimum"),
        ),
        row(
            "StateStore",
            "connection.port",
            "2^63",
            json!(9_223_372_036_854_775_807i64),
            Schema("maximum"),
        ),
        row(
            "StateStore",
            "connection.user",
            "SQL",
            json!("postgres' OR '1'='1"),
            Condition("AuthenticationFailed"),
        ),
        row(
            "StateStore",
            "connection.database",
            "SQL",
            json!("postgres; DROP DATABASE x"),
            Condition("DatabaseNotFound"),
        ),
        row(
            "StateStore",
            "connection.passwordSecretRef.name",
            "another namespace's Secret",
            json!("kube-system/admin"),
            Schema("pattern"),
        ),
        row(
            "StateStore",
            "connection.connectTimeoutSeconds",
            "0",
            json!(0),
            Schema("minimum"),
        ),
        row(
            "StateStore",
            "connection.connectTimeoutSeconds",
            "huge",
            json!(99_999_999_999i64),
            Schema("maximum"),
        ),
        row(
            "StateStore",
            "connection.sslMode",
            "unknown mode",
            json!("none"),
            Schema("enum"),
        ),
        row(
            "StateStore",
            "framework",
            "unknown framework",
            json!("dbt"),
            Schema("enum"),
        ),
        row(
            "StateStore",
            "initPolicy",
            "unknown policy",
            json!("Always"),
            Schema("enum"),
        ),
        row(
            "StateStore",
            "unsuffixedVirtualEnv",
            "SQL",
            json!("prod'; DROP TABLE x; --"),
            Harmless("a name compared as a query parameter"),
        ),
        row(
            "StateStore",
            "unsuffixedVirtualEnv",
            "10 MB string",
            huge(),
            Schema("maxLength"),
        ),
        row(
            "StateStore",
            "janitor.schedule",
            "6-field cron (seconds)",
            json!("0 0 3 * * *"),
            Condition("InvalidJanitorSpec"),
        ),
        row(
            "StateStore",
            "janitor.schedule",
            "impossible date (30 February)",
            json!("0 3 30 2 *"),
            Condition("InvalidJanitorSpec"),
        ),
        row(
            "StateStore",
            "janitor.schedule",
            "10 MB string",
            huge(),
            Schema("maxLength"),
        ),
        row(
            "StateStore",
            "janitor.timeZone",
            "unknown zone",
            json!("Mars/Olympus_Mons"),
            Condition("InvalidJanitorSpec"),
        ),
        row(
            "StateStore",
            "janitor.timeZone",
            "a path",
            json!("../../../../etc/passwd"),
            Condition("InvalidJanitorSpec"),
        ),
        row(
            "StateStore",
            "janitor.batchSize",
            "0",
            json!(0),
            Schema("minimum"),
        ),
        row(
            "StateStore",
            "janitor.batchSize",
            "huge",
            json!(4_294_967_296i64),
            Schema("maximum"),
        ),
        row(
            "StateStore",
            "janitor.keepCheckpoints",
            "negative",
            json!(-1),
            Schema("minimum"),
        ),
        row(
            "StateStore",
            "janitor.checkpointMinAge",
            "negative duration",
            json!("-5d"),
            Condition("InvalidJanitorSpec"),
        ),
        row(
            "StateStore",
            "janitor.versionGracePeriod",
            "huge duration",
            json!("99999999999999999d"),
            Condition("InvalidJanitorSpec"),
        ),
        row(
            "StateStore",
            "janitor.versionGracePeriod",
            "10 MB string",
            huge(),
            Schema("maxLength"),
        ),
        row(
            "StateStore",
            "janitor.startingDeadlineSeconds",
            "negative",
            json!(-5),
            Schema("minimum"),
        ),
        row(
            "StateStore",
            "janitor.runner",
            "a runner on a statekeeper store",
            json!({"image": "evil"}),
            Cel("janitor is SQLMesh's own"),
        ),
        // StateExport
        row(
            "StateExport",
            "destination.url",
            "credentials in the URL",
            json!("s3://AKIA:secret@bucket/backups/"),
            Schema("pattern"),
        ),
        row(
            "StateExport",
            "destination.url",
            "a query string (presigned)",
            json!("s3://bucket/x.json?X-Amz-Signature=abc"),
            Schema("pattern"),
        ),
        row(
            "StateExport",
            "destination.url",
            "unknown scheme",
            json!("ftp://host/backups/"),
            Schema("pattern"),
        ),
        row(
            "StateExport",
            "destination.url",
            "an existing file of the operator",
            json!("file:///etc/passwd"),
            Condition("DestinationExists"),
        ),
        row(
            "StateExport",
            "destination.url",
            "10 MB string",
            json!(format!("s3://b/{}", "a".repeat(10 * 1024 * 1024))),
            Schema("maxLength"),
        ),
        row(
            "StateExport",
            "destination.options",
            "an unknown option",
            json!({"endpont": "http://x"}),
            Condition("InvalidDestination"),
        ),
        row(
            "StateExport",
            "destination.options",
            "a secret as a plain option",
            json!({"aws_secret_access_key": "x"}),
            Condition("InvalidDestination"),
        ),
        row(
            "StateExport",
            "destination.credentialsSecretRef.name",
            "another namespace's Secret",
            json!("kube-system/aws"),
            Schema("pattern"),
        ),
        row(
            "StateExport",
            "storeRef.name",
            "another namespace's store",
            json!("other-team/analytics"),
            Schema("pattern"),
        ),
        row(
            "StateExport",
            "environments",
            "SQL in a name (format statekeeper)",
            json!(["prod'; DROP TABLE x; --"]),
            Condition("UnknownEnvironments"),
        ),
        row(
            "StateExport",
            "environments",
            "10 MB name",
            json!([huge()]),
            Schema("maxLength"),
        ),
        row(
            "StateExport",
            "schedule",
            "6-field cron (seconds)",
            json!("*/5 * * * * *"),
            Condition("InvalidSchedule"),
        ),
        row(
            "StateExport",
            "schedule",
            "step of 0",
            json!("*/0 * * * *"),
            Condition("InvalidSchedule"),
        ),
        row(
            "StateExport",
            "timeZone",
            "unknown zone",
            json!("Europe/Atlantis"),
            Condition("InvalidSchedule"),
        ),
        row(
            "StateExport",
            "backoffLimit",
            "0",
            json!(0),
            Schema("minimum"),
        ),
        row(
            "StateExport",
            "backoffLimit",
            "huge",
            json!(1_000_000),
            Schema("maximum"),
        ),
        row(
            "StateExport",
            "retention.keepLast",
            "0",
            json!(0),
            Schema("minimum"),
        ),
        row(
            "StateExport",
            "format",
            "unknown format",
            json!("parquet"),
            Schema("enum"),
        ),
        row(
            "StateExport",
            "compression",
            "unknown compression",
            json!("brotli"),
            Schema("enum"),
        ),
        row(
            "StateExport",
            "startingDeadlineSeconds",
            "negative",
            json!(-1),
            Schema("minimum"),
        ),
        row(
            "StateExport",
            "encryption.recipients",
            "a secret key where a public key belongs",
            json!(["AGE-SECRET-KEY-1QQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQ"]),
            Schema("pattern"),
        ),
        row(
            "StateExport",
            "encryption.recipients",
            "33 keys",
            json!(vec![
                "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p";
                33
            ]),
            Schema("maxItems"),
        ),
        row(
            "StateExport",
            "encryption.recipientsSecretRef.name",
            "another namespace's Secret",
            json!("kube-system/keys"),
            Schema("pattern"),
        ),
        row(
            "StateExport",
            "encryption.recipientsSecretRef.name",
            "a Secret that holds a secret key",
            json!("backup-identity"),
            Condition("InvalidEncryptionKey"),
        ),
        // StateMigration
        row(
            "StateMigration",
            "rollback.backupId",
            "SQL",
            json!("1; DROP SCHEMA x"),
            Schema("pattern"),
        ),
        row(
            "StateMigration",
            "rollback.backupId",
            "a backup that does not exist",
            json!("20991231235959999"),
            Condition("BackupNotFound"),
        ),
        row(
            "StateMigration",
            "upgrade.targetVersion",
            "huge version",
            json!(2_147_483_647),
            Condition("UnknownTargetVersion"),
        ),
        row(
            "StateMigration",
            "upgrade.targetVersion",
            "SQL",
            json!("'; DROP TABLE x; --"),
            Condition("InvalidSpec"),
        ),
        row(
            "StateMigration",
            "import.source.url",
            "a query string",
            json!("s3://bucket/x.json?versionId=1"),
            Schema("pattern"),
        ),
        row(
            "StateMigration",
            "import.expectedSha256",
            "not a digest",
            json!("'; DROP"),
            Schema("pattern"),
        ),
        row(
            "StateMigration",
            "import.fromExport.name",
            "another namespace's export",
            json!("other-team/nightly"),
            Schema("pattern"),
        ),
        row(
            "StateMigration",
            "import.identitySecretRef.name",
            "another namespace's Secret",
            json!("kube-system/keys"),
            Schema("pattern"),
        ),
        row(
            "StateMigration",
            "copyFrom.storeRef.name",
            "the store itself",
            json!("analytics"),
            Cel("copyFrom names the store itself"),
        ),
        row(
            "StateMigration",
            "approval.planHash",
            "SQL",
            json!("'; DROP TABLE x"),
            Schema("pattern"),
        ),
        row(
            "StateMigration",
            "upgrade.runner.image",
            "10 MB string",
            huge(),
            Schema("maxLength"),
        ),
        row(
            "StateMigration",
            "upgrade.runner.activeDeadlineSeconds",
            "negative",
            json!(-1),
            Schema("minimum"),
        ),
        row(
            "StateMigration",
            "storeRef.name",
            "another namespace's store",
            json!("other-team/analytics"),
            Schema("pattern"),
        ),
    ]
}

/// The first violation of the CRD's OpenAPI schema (the keywords statekeeper's CRDs use).
fn schema_violation(schema: &Value, value: &Value) -> Option<&'static str> {
    if value.is_null() {
        return None;
    }
    let chars = value.as_str().map(|s| s.chars().count() as u64);
    let number = value.as_f64();
    let type_ok = match schema["type"].as_str() {
        Some("string") => value.is_string(),
        Some("integer") => value.is_i64() || value.is_u64(),
        Some("number") => value.is_number(),
        Some("boolean") => value.is_boolean(),
        Some("object") => value.is_object(),
        Some("array") => value.is_array(),
        _ => true,
    };
    if !type_ok && schema["x-kubernetes-int-or-string"] != json!(true) {
        return Some("type");
    }
    if let Some(options) = schema["enum"].as_array()
        && !options.contains(value)
    {
        return Some("enum");
    }
    if let (Some(n), Some(min)) = (chars, schema["minLength"].as_u64())
        && n < min
    {
        return Some("minLength");
    }
    if let (Some(n), Some(max)) = (chars, schema["maxLength"].as_u64())
        && n > max
    {
        return Some("maxLength");
    }
    if let (Some(text), Some(pattern)) = (value.as_str(), schema["pattern"].as_str())
        && !regex::Regex::new(pattern)
            .expect("a valid pattern")
            .is_match(text)
    {
        return Some("pattern");
    }
    if let (Some(n), Some(min)) = (number, schema["minimum"].as_f64())
        && n < min
    {
        return Some("minimum");
    }
    if let (Some(n), Some(max)) = (number, schema["maximum"].as_f64())
        && n > max
    {
        return Some("maximum");
    }
    if let Some(items) = value.as_array() {
        if schema["maxItems"]
            .as_u64()
            .is_some_and(|max| items.len() as u64 > max)
        {
            return Some("maxItems");
        }
        if let Some(found) = items
            .iter()
            .find_map(|item| schema_violation(&schema["items"], item))
        {
            return Some(found);
        }
    }
    if let Some(object) = value.as_object() {
        if schema["maxProperties"]
            .as_u64()
            .is_some_and(|max| object.len() as u64 > max)
        {
            return Some("maxProperties");
        }
        for (key, item) in object {
            let child = match schema["properties"].get(key) {
                Some(child) => child,
                None => &schema["additionalProperties"],
            };
            if let Some(found) = schema_violation(child, item) {
                return Some(found);
            }
        }
    }
    None
}

fn set(object: &mut Value, dotted: &str, value: Value) {
    let mut at = &mut object["spec"];
    let parts: Vec<&str> = dotted.split('.').collect();
    for part in &parts[..parts.len() - 1] {
        at = &mut at[*part];
    }
    at[parts[parts.len() - 1]] = value;
}

fn base(kind: &str, db: &TestDb) -> Value {
    match kind {
        "StateStore" => store_for(db, "hostile", json!({})),
        "StateExport" => state_export(
            "hostile",
            &format!("file://{}/", temp_dir("hostile").display()),
            json!({"format": "statekeeper"}),
        ),
        _ => state_migration("hostile", "2026-01-01T00:00:00Z", json!({})),
    }
}

/// The reconciler's Ready reason for the object.
async fn reconcile(h: &Harness, kind: &str, object: &Value) -> (String, String) {
    match kind {
        "StateStore" => {
            // The janitor's own condition says why a janitor spec is refused; the store stays Ready.
            let (_, after) = h.reconcile(object).await;
            let conditions = after.status.unwrap_or_default().conditions;
            let refused = conditions
                .iter()
                .find(|c| c.status == "False" && c.reason.starts_with("Invalid"));
            match refused {
                Some(c) => (c.status.clone(), c.reason.clone()),
                None => {
                    let (status, reason, _) = condition(&conditions, "Ready");
                    (status, reason)
                }
            }
        }
        "StateExport" => {
            h.kube.put(&export_path("hostile"), object.clone());
            let (_, after) = h.reconcile_export("hostile").await;
            let (status, reason, _) = export_condition(&after, "Ready");
            h.kube.remove(&export_path("hostile"));
            (status, reason)
        }
        _ => {
            h.kube.put(&migration_path("hostile"), object.clone());
            let (_, after) = h.reconcile_migration("hostile").await;
            let (status, reason, _) = migration_condition(&after, "Ready");
            h.kube.remove(&migration_path("hostile"));
            (status, reason)
        }
    }
}

fn render(rows: &[(&Row, String)]) -> String {
    let mut table =
        String::from("| resource | field | value tried | refused by |\n|---|---|---|---|\n");
    for (row, outcome) in rows {
        table.push_str(&format!(
            "| {} | `{}` | {} | {} |\n",
            row.kind, row.field, row.tried, outcome
        ));
    }
    table
}

#[tokio::test]
async fn every_hostile_spec_value_is_refused_with_a_reason_or_harmless() {
    let crds: Vec<Value> =
        serde_yaml::Deserializer::from_str(&statekeeper::api::crds_yaml().unwrap())
            .map(|doc| serde::Deserialize::deserialize(doc).unwrap())
            .collect();
    let schema_of = |kind: &str| -> Value {
        crds.iter()
            .find(|c| c["spec"]["names"]["kind"] == kind)
            .map(|c| c["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone())
            .unwrap()
    };
    let db = TestDb::new().await;
    generated_store(&db).await;
    let h = Harness::new();
    put_secret(&h.kube, "pg-credentials", &[("password", &db.password())]);
    put_secret(
        &h.kube,
        "aws",
        &[("aws_access_key_id", "a"), ("aws_secret_access_key", "b")],
    );
    // An identity where recipients belong: refused without being echoed.
    let identity = age::x25519::Identity::generate();
    let identity = age::secrecy::ExposeSecret::expose_secret(&identity.to_string()).to_owned();
    put_secret(&h.kube, "backup-identity", &[("recipients", &identity)]);
    let (_, healthy) = h.reconcile(&store_for(&db, "analytics", json!({}))).await;
    assert_eq!(
        condition(&healthy.status.unwrap().conditions, "Ready").0,
        "True"
    );

    let rows = rows();
    let mut outcomes = Vec::new();
    let mut wrong = Vec::new();
    for row in &rows {
        let mut object = base(row.kind, &db);
        set(&mut object, row.field, row.value.clone());
        // A time zone is read only with a schedule.
        if row.kind == "StateExport" && row.field == "timeZone" {
            object["spec"]["schedule"] = json!("@daily");
        }
        let operations = ["upgrade", "rollback", "reset", "import", "copyFrom"];
        if row.kind == "StateMigration"
            && !operations.iter().any(|op| object["spec"].get(op).is_some())
        {
            object["spec"]["upgrade"] = json!({});
        }
        if row.field == "janitor.runner" || row.field.starts_with("janitor.") {
            object["spec"]["janitor"]["schedule"]
                .as_str()
                .is_none()
                .then(|| object["spec"]["janitor"]["schedule"] = json!("@daily"));
        }
        let schema = schema_of(row.kind);
        let found = if let Some(keyword) = schema_violation(&schema, &object) {
            Refusal::Schema(keyword)
        } else if let Some(message) = support::cel_violation(&schema, &object) {
            match &row.refused_by {
                Refusal::Cel(fragment) if message.contains(fragment) => Refusal::Cel(fragment),
                _ => {
                    wrong.push(format!(
                        "{} {} ({}): CEL refused it: {message}",
                        row.kind, row.field, row.tried
                    ));
                    continue;
                }
            }
        } else {
            let (status, reason) = reconcile(&h, row.kind, &object).await;
            match &row.refused_by {
                Refusal::Harmless(_) if status == "True" => row.refused_by.clone(),
                Refusal::Condition(expected) if status == "False" && reason == *expected => {
                    row.refused_by.clone()
                }
                _ => {
                    wrong.push(format!(
                        "{} {} ({}): the reconciler said Ready={status} ({reason})",
                        row.kind, row.field, row.tried
                    ));
                    continue;
                }
            }
        };
        if found != row.refused_by {
            wrong.push(format!(
                "{} {} ({}): {found:?}, not {:?}",
                row.kind, row.field, row.tried, row.refused_by
            ));
            continue;
        }
        let described = match &found {
            Refusal::Schema(keyword) => format!("CRD schema (`{keyword}`)"),
            Refusal::Cel(fragment) => format!("CEL rule (\"{fragment}…\")"),
            Refusal::Condition(reason) => format!("reconciler: `Ready=False`, reason `{reason}`"),
            Refusal::Harmless(why) => format!("accepted: {why}"),
        };
        outcomes.push((row, described));
    }
    let table = render(&outcomes);
    println!("{table}");
    assert!(
        wrong.is_empty(),
        "rows that did not hold:\n{}",
        wrong.join("\n")
    );
    let docs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/reliability.md"))
        .unwrap();
    assert!(
        docs.contains(&table),
        "docs/reliability.md's hostile-spec table differs from the test's rows; the table is:\n{table}"
    );
    println!(
        "hostile specs: {} values tried on {} fields, every one refused with a reason or harmless",
        rows.len(),
        {
            let mut fields: Vec<_> = rows.iter().map(|r| (r.kind, r.field)).collect();
            fields.dedup();
            fields.len()
        }
    );
}
