//! crds/, deploy/ and examples/ stay true to the code.

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use serde::Deserialize;
use serde_json::{Value, json};
use statekeeper::api::StateStore;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn yaml_documents(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).expect("valid YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

#[test]
fn crds_dir_and_chart_match_the_generated_crds() {
    for (file, generated) in statekeeper::api::crds().unwrap() {
        for dir in ["crds", "charts/statekeeper/crds"] {
            let committed = std::fs::read_to_string(Path::new(ROOT).join(dir).join(file))
                .unwrap_or_else(|e| panic!("{dir}/{file}: {e}"));
            assert!(
                committed == generated,
                "{dir}/{file} is stale: run scripts/generate-crds.sh"
            );
        }
    }
}

#[test]
fn crd_has_status_subresource_list_map_conditions_and_cel_rules() {
    let crd = &yaml_documents(&statekeeper::api::crds_yaml().unwrap())[0];
    assert_eq!(crd["spec"]["names"]["kind"], "StateStore");
    let version = &crd["spec"]["versions"][0];
    assert!(version["subresources"]["status"].is_object());
    let status = &version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"];
    assert_eq!(status["conditions"]["x-kubernetes-list-type"], "map");
    assert_eq!(
        status["conditions"]["x-kubernetes-list-map-keys"][0],
        "type"
    );
    let connection =
        &version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["connection"];
    let rules: Vec<&str> = connection["x-kubernetes-validations"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["rule"].as_str())
        .collect();
    assert!(
        rules.contains(&"has(self.urlSecretRef) != has(self.host)"),
        "{rules:?}"
    );
    let columns: Vec<&str> = version["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    for wanted in ["Phase", "Schema Version", "Age"] {
        assert!(columns.contains(&wanted), "{columns:?}");
    }
}

/// An age public key (the one in examples/stateexport-encrypted.yaml).
const RECIPIENT: &str = "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p";

/// Every YAML file under examples/, its subfolders (examples/sqlmesh/) included.
fn example_files() -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    let mut folders = vec![Path::new(ROOT).join("examples")];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(folder).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                folders.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

#[test]
fn every_example_state_store_parses_into_the_real_type() {
    let mut found = 0;
    let mut migrations = 0;
    let crds = yaml_documents(&statekeeper::api::crds_yaml().unwrap());
    let crds_by_kind: std::collections::BTreeMap<&str, &Value> = crds
        .iter()
        .filter_map(|c| c["spec"]["names"]["kind"].as_str().map(|k| (k, c)))
        .collect();
    for path in example_files() {
        for doc in yaml_documents(&std::fs::read_to_string(&path).unwrap()) {
            if doc["kind"] == "StateExport" {
                let export: statekeeper::api::StateExport = serde_json::from_value(doc.clone())
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                let spec = &export.spec;
                let name = export.metadata.name.clone().unwrap_or_default();
                let url = match &spec.schedule {
                    Some(schedule) => {
                        statekeeper::controller::schedule::Schedule::parse(
                            schedule,
                            spec.time_zone.as_deref(),
                        )
                        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                        statekeeper::controller::export_schedule::child_url(
                            &spec.destination.url,
                            &format!("{name}-20261122030000"),
                            &spec.file_extension(),
                        )
                    }
                    None => statekeeper::controller::state_export::file_url(
                        &spec.destination.url,
                        &name,
                        &spec.file_extension(),
                    ),
                };
                statekeeper::engine::Destination::parse(&url, &spec.destination.options)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                found += 1;
            }
            // The CRD's creation-time rules, wherever they sit, accept the example.
            if let Some(crd) = crds_by_kind.get(doc["kind"].as_str().unwrap_or_default()) {
                let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
                assert_eq!(
                    support::cel_violation(schema, &doc),
                    None,
                    "{}",
                    path.display()
                );
            }
            if doc["kind"] == "StateMigration" {
                let migration: statekeeper::api::StateMigration =
                    serde_json::from_value(doc.clone())
                        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                statekeeper::controller::state_migration::Requested::from_spec(&migration.spec)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                migrations += 1;
            }
            if doc["kind"] == "StateStore" {
                let store: StateStore = serde_json::from_value(doc.clone())
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                let c = &store.spec.connection;
                assert!(
                    c.url_secret_ref.is_some() != c.host.is_some(),
                    "{}",
                    path.display()
                );
                statekeeper::engine::SchemaName::new(store.spec.schema_name()).unwrap();
                if let Some(janitor) = &store.spec.janitor {
                    statekeeper::controller::schedule::Schedule::parse(
                        &janitor.schedule,
                        janitor.time_zone.as_deref(),
                    )
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                    statekeeper::controller::store_janitor::options(janitor, "prod")
                        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                }
                found += 1;
            }
        }
    }
    assert!(
        found >= 6,
        "examples/ holds StateStores and StateExports, SQLMesh's included ({found})"
    );
    assert!(
        migrations >= 7,
        "examples/ holds a StateMigration for every operation ({migrations})"
    );
}

/// The RBAC rules are exactly the API calls the operator makes.
#[test]
fn rbac_grants_only_what_the_operator_calls() {
    let text = std::fs::read_to_string(Path::new(ROOT).join("deploy/rbac.yaml")).unwrap();
    let role = yaml_documents(&text)
        .into_iter()
        .find(|d| d["kind"] == "ClusterRole")
        .unwrap();
    let mut granted = BTreeSet::new();
    for rule in role["rules"].as_array().unwrap() {
        for group in rule["apiGroups"].as_array().unwrap() {
            for resource in rule["resources"].as_array().unwrap() {
                for verb in rule["verbs"].as_array().unwrap() {
                    granted.insert(format!(
                        "{}/{} {}",
                        group.as_str().unwrap(),
                        resource.as_str().unwrap(),
                        verb.as_str().unwrap()
                    ));
                }
            }
        }
    }
    let called: BTreeSet<String> = [
        "statekeeper.dev/statestores get",
        "statekeeper.dev/statestores list",
        "statekeeper.dev/statestores watch",
        "statekeeper.dev/statestores/status patch",
        "/secrets get",
        "/secrets list",
        "/secrets watch",
        "/configmaps get",
        "coordination.k8s.io/leases get",
        "coordination.k8s.io/leases create",
        "coordination.k8s.io/leases patch",
        "events.k8s.io/events create",
        "events.k8s.io/events patch",
        "statekeeper.dev/stateexports get",
        "statekeeper.dev/stateexports list",
        "statekeeper.dev/stateexports watch",
        "statekeeper.dev/stateexports create",
        "statekeeper.dev/stateexports delete",
        "statekeeper.dev/stateexports/status patch",
        "statekeeper.dev/statemigrations get",
        "statekeeper.dev/statemigrations list",
        "statekeeper.dev/statemigrations watch",
        "statekeeper.dev/statemigrations/status patch",
        "batch/jobs get",
        "batch/jobs list",
        "batch/jobs watch",
        "batch/jobs create",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(granted, called);
}

#[test]
fn deploy_renders_with_kustomize_and_runs_non_root() {
    let Ok(out) = Command::new("kubectl")
        .args(["kustomize", &format!("{ROOT}/deploy")])
        .output()
    else {
        eprintln!(
            "SKIPPED deploy_renders_with_kustomize_and_runs_non_root: kubectl is not installed"
        );
        return;
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let docs = yaml_documents(&String::from_utf8_lossy(&out.stdout));
    let kinds: BTreeSet<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    for kind in [
        "CustomResourceDefinition",
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
    ] {
        assert!(kinds.contains(kind), "deploy/ renders no {kind}");
    }
    let deployment = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let container = &pod["containers"][0];
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        container["securityContext"]["allowPrivilegeEscalation"],
        false
    );
    assert_eq!(container["args"][0], "operator");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(deployment["metadata"]["namespace"], "statekeeper-system");
}

/// Every `x-kubernetes-validations` rule of every CRD, wherever it sits in the schema,
/// evaluated with a CEL interpreter (the cel-interpreter crate) on objects it must accept and
/// objects it must refuse, `oldSelf` transitions included; a rule without both kinds of case
/// fails the test.
#[test]
fn every_cel_rule_accepts_and_refuses_what_it_should() {
    let crds = yaml_documents(&statekeeper::api::crds_yaml().unwrap());
    // (kind, rule's message text, self, oldSelf, expected)
    let store = |spec: Value| json!({"metadata": {"name": "s"}, "spec": spec});
    let connection =
        json!({"host": "db", "user": "u", "passwordSecretRef": {"name": "p", "key": "k"}});
    let export = |spec: Value| json!({"metadata": {"name": "nightly"}, "spec": spec});
    let migration = |spec: Value| json!({"metadata": {"name": "m"}, "spec": spec});
    let base = json!({"storeRef": {"name": "analytics"}, "rollback": {"backupId": "20261122023000123"}, "backup": true, "dryRun": false, "requireApproval": true});
    let with = |patch: Value| {
        let mut spec = base.clone();
        support::operator::support_merge(&mut spec, &patch);
        migration(spec)
    };
    let destination = json!({"url": "s3://b/k/"});
    let cases: Vec<(&str, &str, Value, Option<Value>, bool)> = vec![
        // StateStore
        (
            "StateStore",
            "spec.framework is immutable",
            store(json!({"framework": "sqlmesh", "connection": connection})),
            Some(store(
                json!({"framework": "sqlmesh", "connection": connection}),
            )),
            true,
        ),
        (
            "StateStore",
            "spec.framework is immutable",
            store(json!({"connection": connection})),
            Some(store(
                json!({"framework": "statekeeper", "connection": connection}),
            )),
            true,
        ),
        (
            "StateStore",
            "spec.framework is immutable",
            store(json!({"framework": "statekeeper", "connection": connection})),
            Some(store(
                json!({"framework": "sqlmesh", "connection": connection}),
            )),
            false,
        ),
        (
            "StateStore",
            "janitor is SQLMesh's own",
            store(json!({"connection": connection, "janitor": {"schedule": "@daily"}})),
            None,
            true,
        ),
        (
            "StateStore",
            "janitor is SQLMesh's own",
            store(
                json!({"framework": "sqlmesh", "connection": connection, "janitor": {"schedule": "@daily", "runner": {"image": "i"}}}),
            ),
            None,
            true,
        ),
        (
            "StateStore",
            "janitor is SQLMesh's own",
            store(
                json!({"framework": "sqlmesh", "connection": connection, "janitor": {"schedule": "@daily"}}),
            ),
            None,
            false,
        ),
        (
            "StateStore",
            "janitor is SQLMesh's own",
            store(
                json!({"connection": connection, "janitor": {"schedule": "@daily", "runner": {"image": "i"}}}),
            ),
            None,
            false,
        ),
        (
            "StateStore",
            "janitor is SQLMesh's own",
            store(
                json!({"framework": "meltano", "connection": connection, "janitor": {"schedule": "@daily", "keepRuns": 20, "failStaleRuns": true}}),
            ),
            None,
            true,
        ),
        (
            "StateStore",
            "janitor is SQLMesh's own",
            store(
                json!({"framework": "meltano", "connection": connection, "janitor": {"schedule": "@daily", "runner": {"image": "i"}}}),
            ),
            None,
            false,
        ),
        (
            "StateStore",
            "only a SQLMesh store has them",
            store(
                json!({"framework": "sqlmesh", "connection": connection, "virtualLayer": {"runner": {"image": "i"}}}),
            ),
            None,
            true,
        ),
        (
            "StateStore",
            "only a SQLMesh store has them",
            store(json!({"framework": "meltano", "connection": connection})),
            None,
            true,
        ),
        (
            "StateStore",
            "only a SQLMesh store has them",
            store(json!({"connection": connection, "virtualLayer": {"runner": {"image": "i"}}})),
            None,
            false,
        ),
        (
            "StateStore",
            "only a SQLMesh store has them",
            store(
                json!({"framework": "meltano", "connection": connection, "virtualLayer": {"runner": {"image": "i"}}}),
            ),
            None,
            false,
        ),
        (
            "StateStore",
            "virtualLayer.runner.args is not used",
            json!({"runner": {"image": "i", "command": ["/opt/venv/bin/python"]}, "gateway": "prod"}),
            None,
            true,
        ),
        (
            "StateStore",
            "virtualLayer.runner.args is not used",
            json!({"runner": {"image": "i", "args": ["-m", "x"]}}),
            None,
            false,
        ),
        (
            "StateStore",
            "set either urlSecretRef, or host",
            connection.clone(),
            None,
            true,
        ),
        (
            "StateStore",
            "set either urlSecretRef, or host",
            json!({"urlSecretRef": {"name": "u", "key": "url"}}),
            None,
            true,
        ),
        (
            "StateStore",
            "set either urlSecretRef, or host",
            json!({"urlSecretRef": {"name": "u", "key": "url"}, "host": "db", "user": "u"}),
            None,
            false,
        ),
        (
            "StateStore",
            "set either urlSecretRef, or host",
            json!({}),
            None,
            false,
        ),
        (
            "StateStore",
            "user is required with host",
            connection.clone(),
            None,
            true,
        ),
        (
            "StateStore",
            "user is required with host",
            json!({"host": "db"}),
            None,
            false,
        ),
        // StateExport
        (
            "StateExport",
            "one-shot export is immutable",
            export(json!({"storeRef": {"name": "a"}, "destination": destination})),
            Some(export(
                json!({"storeRef": {"name": "a"}, "destination": destination}),
            )),
            true,
        ),
        (
            "StateExport",
            "one-shot export is immutable",
            export(
                json!({"storeRef": {"name": "a"}, "destination": destination, "schedule": "@daily", "suspend": true}),
            ),
            Some(export(
                json!({"storeRef": {"name": "a"}, "destination": destination, "schedule": "@daily"}),
            )),
            true,
        ),
        (
            "StateExport",
            "one-shot export is immutable",
            export(json!({"storeRef": {"name": "b"}, "destination": destination})),
            Some(export(
                json!({"storeRef": {"name": "a"}, "destination": destination}),
            )),
            false,
        ),
        (
            "StateExport",
            "cannot switch between one-shot and scheduled",
            export(
                json!({"storeRef": {"name": "a"}, "destination": destination, "schedule": "@daily"}),
            ),
            Some(export(
                json!({"storeRef": {"name": "a"}, "destination": destination, "schedule": "@hourly"}),
            )),
            true,
        ),
        (
            "StateExport",
            "cannot switch between one-shot and scheduled",
            export(
                json!({"storeRef": {"name": "a"}, "destination": destination, "schedule": "@daily"}),
            ),
            Some(export(
                json!({"storeRef": {"name": "a"}, "destination": destination}),
            )),
            false,
        ),
        (
            "StateExport",
            "at most 63 characters",
            export(
                json!({"storeRef": {"name": "a"}, "destination": destination, "schedule": "@daily"}),
            ),
            None,
            true,
        ),
        (
            "StateExport",
            "at most 63 characters",
            json!({"metadata": {"name": "n".repeat(64)}, "spec": {"storeRef": {"name": "a"}, "destination": destination, "schedule": "@daily"}}),
            None,
            false,
        ),
        (
            "StateExport",
            "environments select part of a store",
            export(
                json!({"storeRef": {"name": "a"}, "destination": destination, "environments": ["prod"], "format": "statekeeper"}),
            ),
            None,
            true,
        ),
        (
            "StateExport",
            "environments select part of a store",
            export(
                json!({"storeRef": {"name": "a"}, "destination": destination, "environments": ["prod"]}),
            ),
            None,
            false,
        ),
        (
            "StateExport",
            "environments select part of a store",
            export(
                json!({"storeRef": {"name": "a"}, "destination": destination, "environments": ["prod"], "format": "exact"}),
            ),
            None,
            false,
        ),
        (
            "StateExport",
            "format meltano-backend writes the folder",
            export(
                json!({"storeRef": {"name": "a"}, "destination": destination, "format": "meltano-backend", "compression": "none"}),
            ),
            None,
            true,
        ),
        (
            "StateExport",
            "format meltano-backend writes the folder",
            export(
                json!({"storeRef": {"name": "a"}, "destination": destination, "format": "meltano"}),
            ),
            None,
            true,
        ),
        (
            "StateExport",
            "format meltano-backend writes the folder",
            export(
                json!({"storeRef": {"name": "a"}, "destination": destination, "format": "meltano-backend"}),
            ),
            None,
            false,
        ),
        (
            "StateExport",
            "format meltano-backend writes the folder",
            export(
                json!({"storeRef": {"name": "a"}, "destination": destination, "format": "meltano-backend", "compression": "gzip"}),
            ),
            None,
            false,
        ),
        (
            "StateExport",
            "format meltano-backend writes the folder",
            export(
                json!({"storeRef": {"name": "a"}, "destination": destination, "format": "meltano-backend", "compression": "none", "schedule": "0 3 * * *"}),
            ),
            None,
            false,
        ),
        (
            "StateExport",
            "format meltano-backend writes the plain files",
            export(
                json!({"storeRef": {"name": "a"}, "destination": destination, "format": "meltano", "encryption": {"recipients": [RECIPIENT]}}),
            ),
            None,
            true,
        ),
        (
            "StateExport",
            "format meltano-backend writes the plain files",
            export(
                json!({"storeRef": {"name": "a"}, "destination": destination, "format": "meltano-backend", "compression": "none", "encryption": {"recipients": [RECIPIENT]}}),
            ),
            None,
            false,
        ),
        (
            "StateExport",
            "encryption needs recipients or recipientsSecretRef",
            export(
                json!({"storeRef": {"name": "a"}, "destination": destination, "encryption": {"recipientsSecretRef": {"name": "backup-recipients"}, "identitySecretRef": {"name": "backup-identity"}}}),
            ),
            None,
            true,
        ),
        (
            "StateExport",
            "encryption needs recipients or recipientsSecretRef",
            export(
                json!({"storeRef": {"name": "a"}, "destination": destination, "encryption": {"identitySecretRef": {"name": "backup-identity"}}}),
            ),
            None,
            false,
        ),
        (
            "StateExport",
            "verifying an encrypted export needs encryption.identitySecretRef",
            export(
                json!({"storeRef": {"name": "a"}, "destination": destination, "verify": true, "encryption": {"recipients": ["age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p"], "identitySecretRef": {"name": "backup-identity"}}}),
            ),
            None,
            true,
        ),
        (
            "StateExport",
            "verifying an encrypted export needs encryption.identitySecretRef",
            export(
                json!({"storeRef": {"name": "a"}, "destination": destination, "verify": true, "encryption": {"recipients": ["age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p"]}}),
            ),
            None,
            false,
        ),
        (
            "StateStore",
            "either configMapKeyRef or secretKeyRef",
            json!({"configMapKeyRef": {"name": "rds-ca", "key": "ca.crt"}}),
            None,
            true,
        ),
        (
            "StateStore",
            "either configMapKeyRef or secretKeyRef",
            json!({"configMapKeyRef": {"name": "rds-ca", "key": "ca.crt"},
                   "secretKeyRef": {"name": "rds-ca", "key": "ca.crt"}}),
            None,
            false,
        ),
        (
            "StateStore",
            "either configMapKeyRef or secretKeyRef",
            json!({}),
            None,
            false,
        ),
        // StateMigration
        (
            "StateMigration",
            "exactly one operation",
            migration(json!({"storeRef": {"name": "a"}, "reset": {}})),
            None,
            true,
        ),
        (
            "StateMigration",
            "exactly one operation",
            migration(json!({"storeRef": {"name": "a"}})),
            None,
            false,
        ),
        (
            "StateMigration",
            "exactly one operation",
            migration(json!({"storeRef": {"name": "a"}, "reset": {}, "upgrade": {}})),
            None,
            false,
        ),
        (
            "StateMigration",
            "operation cannot change",
            with(json!({"approval": {"planHash": "9c1e0f3a6b2d4e58"}}))["spec"].clone(),
            Some(base.clone()),
            true,
        ),
        (
            "StateMigration",
            "operation cannot change",
            with(json!({"reset": {}}))["spec"].clone(),
            Some(base.clone()),
            false,
        ),
        (
            "StateMigration",
            "always keeps the removed state",
            migration(json!({"storeRef": {"name": "a"}, "reset": {}})),
            None,
            true,
        ),
        (
            "StateMigration",
            "always keeps the removed state",
            migration(json!({"storeRef": {"name": "a"}, "reset": {}, "backup": false})),
            None,
            false,
        ),
        (
            "StateMigration",
            "copyFrom names the store itself",
            migration(json!({"storeRef": {"name": "a"}, "copyFrom": {"storeRef": {"name": "b"}}})),
            None,
            true,
        ),
        (
            "StateMigration",
            "copyFrom names the store itself",
            migration(json!({"storeRef": {"name": "a"}, "copyFrom": {"storeRef": {"name": "a"}}})),
            None,
            false,
        ),
        (
            "StateStore",
            "an empty backups policy says nothing about what to keep",
            json!({"keepLast": 0}),
            None,
            true,
        ),
        (
            "StateStore",
            "an empty backups policy says nothing about what to keep",
            json!({"maxAge": "7d"}),
            None,
            true,
        ),
        (
            "StateStore",
            "an empty backups policy says nothing about what to keep",
            json!({}),
            None,
            false,
        ),
        (
            "StateMigration",
            "set either import.source or import.fromExport",
            json!({"fromExport": {"name": "e"}}),
            None,
            true,
        ),
        (
            "StateMigration",
            "set either import.source or import.fromExport",
            json!({"source": {"url": "s3://b/k"}, "fromExport": {"name": "e"}}),
            None,
            false,
        ),
        (
            "StateMigration",
            "a restore in part (environments, models, stateIds) is a merge: set mode: Merge",
            json!({"fromExport": {"name": "e"}, "environments": ["dev"]}),
            None,
            true,
        ),
        (
            "StateMigration",
            "a restore in part (environments, models, stateIds) is a merge: set mode: Merge",
            json!({"fromExport": {"name": "e"}, "mode": "Merge", "stateIds": ["x"]}),
            None,
            true,
        ),
        (
            "StateMigration",
            "a restore in part (environments, models, stateIds) is a merge: set mode: Merge",
            json!({"fromExport": {"name": "e"}, "mode": "Replace", "models": ["m"]}),
            None,
            false,
        ),
    ];
    // Each field of a StateMigration's spec but `approval` keeps its value: (rule's message, the
    // value, another value).
    let unchanged = [
        (
            "spec.storeRef is immutable",
            json!({"name": "a"}),
            json!({"name": "b"}),
        ),
        (
            "spec.upgrade is immutable",
            json!({"targetVersion": 3}),
            json!({"targetVersion": "latest"}),
        ),
        (
            "spec.rollback is immutable",
            json!({"backupId": "20261122023000123"}),
            json!({}),
        ),
        (
            "spec.import is immutable",
            json!({"fromExport": {"name": "e"}}),
            json!({"fromExport": {"name": "f"}}),
        ),
        (
            "spec.copyFrom is immutable",
            json!({"storeRef": {"name": "b"}}),
            json!({"storeRef": {"name": "c"}}),
        ),
        ("spec.backup is immutable", json!(true), json!(false)),
        ("spec.dryRun is immutable", json!(false), json!(true)),
        (
            "spec.requireApproval is immutable",
            json!(true),
            json!(false),
        ),
    ];
    let mut cases = cases;
    for (message, value, other) in unchanged {
        cases.push((
            "StateMigration",
            message,
            value.clone(),
            Some(value.clone()),
            true,
        ));
        cases.push(("StateMigration", message, other, Some(value), false));
    }

    // Every rule of every CRD, with the kind it belongs to.
    fn collect(schema: &Value, kind: &str, out: &mut Vec<(String, String, String)>) {
        if let Some(rules) = schema["x-kubernetes-validations"].as_array() {
            for rule in rules {
                out.push((
                    kind.to_owned(),
                    rule["rule"].as_str().unwrap_or_default().to_owned(),
                    rule["message"].as_str().unwrap_or_default().to_owned(),
                ));
            }
        }
        match schema {
            Value::Object(map) => map.values().for_each(|v| collect(v, kind, out)),
            Value::Array(items) => items.iter().for_each(|v| collect(v, kind, out)),
            _ => {}
        }
    }
    let mut rules = Vec::new();
    for crd in &crds {
        let kind = crd["spec"]["names"]["kind"].as_str().unwrap();
        collect(&crd["spec"]["versions"][0]["schema"], kind, &mut rules);
    }
    assert!(rules.len() >= 13, "{rules:?}");
    for (kind, rule, message) in &rules {
        for expected in [true, false] {
            assert!(
                cases
                    .iter()
                    .any(|(k, m, _, _, e)| k == kind && message.contains(m) && *e == expected),
                "{kind} rule {rule:?} ({message}) has no case it must {}",
                if expected { "accept" } else { "refuse" }
            );
        }
    }
    let rule_of = |kind: &str, part: &str| {
        rules
            .iter()
            .find(|(k, _, m)| k == kind && m.contains(part))
            .unwrap_or_else(|| panic!("no {kind} rule saying {part:?}"))
            .1
            .clone()
    };
    let results: Vec<Result<bool, String>> = cases
        .iter()
        .map(|(kind, part, new, old, _)| {
            support::evaluate_cel(&rule_of(kind, part), new, old.as_ref())
        })
        .collect();
    for ((kind, part, new, old, expected), got) in cases.iter().zip(results) {
        assert_eq!(
            got,
            Ok(*expected),
            "{kind} rule \"{part}\" on {new} (old: {old:?})"
        );
    }
}

/// The `openAPIV3Schema` of each generated CRD, by kind.
fn crd_schemas() -> Vec<(String, Value)> {
    yaml_documents(&statekeeper::api::crds_yaml().unwrap())
        .into_iter()
        .map(|crd| {
            (
                crd["spec"]["names"]["kind"].as_str().unwrap().to_owned(),
                crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone(),
            )
        })
        .collect()
}

/// A real API server refuses a CRD whose rules' *estimated* cost is over its budget, past every
/// check that evaluates rules. Each rule of each CRD is estimated as the server estimates it
/// (tests/support/cel_cost.rs), and the CRD must be within both the per-rule and the per-CRD
/// limit.
#[test]
fn every_crd_rule_is_within_the_api_servers_cost_budget() {
    for (kind, schema) in crd_schemas() {
        let costs = support::cel_cost::crd_rule_costs(&schema).unwrap();
        assert!(!costs.is_empty(), "{kind} has rules");
        for cost in &costs {
            println!(
                "{kind} {} cost {} x {} = {} ({:.4}% of the limit): {}",
                cost.path,
                cost.cost,
                cost.cardinality,
                cost.total,
                cost.total as f64 * 100.0 / support::cel_cost::PER_RULE_LIMIT as f64,
                cost.rule
            );
        }
        let refused = support::cel_cost::server_verdict(&costs);
        assert!(
            refused.is_empty(),
            "a real API server would refuse the {kind} CRD:\n{}",
            refused.join("\n")
        );
    }
}

/// The estimate gives the verdict a real API server (v1.36) gave: it refused the StateMigration
/// CRD whose immutability rule compared `self.spec.import == oldSelf.spec.import` at the root,
/// with exactly this message. (`import` is a CEL keyword: the type checker finds the field as
/// `__import__`, the size estimator does not, so the size is unknown and the estimate huge.
/// kube-cel 0.8's `estimate_rule_cost` gives that rule 7, within its budget: it does not cost
/// equality.)
#[test]
fn the_cost_estimate_refuses_what_a_real_api_server_refused() {
    let (_, mut schema) = crd_schemas()
        .into_iter()
        .find(|(kind, _)| kind == "StateMigration")
        .unwrap();
    let refused_rule = concat!(
        "self.spec.storeRef == oldSelf.spec.storeRef",
        " && has(self.spec.upgrade) == has(oldSelf.spec.upgrade) && (!has(self.spec.upgrade) || self.spec.upgrade == oldSelf.spec.upgrade)",
        " && has(self.spec.rollback) == has(oldSelf.spec.rollback) && (!has(self.spec.rollback) || self.spec.rollback == oldSelf.spec.rollback)",
        " && has(self.spec.reset) == has(oldSelf.spec.reset) && (!has(self.spec.reset) || self.spec.reset == oldSelf.spec.reset)",
        " && has(self.spec.import) == has(oldSelf.spec.import) && (!has(self.spec.import) || self.spec.import == oldSelf.spec.import)",
        " && has(self.spec.copyFrom) == has(oldSelf.spec.copyFrom) && (!has(self.spec.copyFrom) || self.spec.copyFrom == oldSelf.spec.copyFrom)",
        " && (has(self.spec.backup) ? self.spec.backup : true) == (has(oldSelf.spec.backup) ? oldSelf.spec.backup : true)",
        " && (has(self.spec.dryRun) ? self.spec.dryRun : false) == (has(oldSelf.spec.dryRun) ? oldSelf.spec.dryRun : false)",
        " && (has(self.spec.requireApproval) ? self.spec.requireApproval : false) == (has(oldSelf.spec.requireApproval) ? oldSelf.spec.requireApproval : false)",
    );
    let rules = schema["x-kubernetes-validations"].as_array_mut().unwrap();
    rules.insert(1, json!({"rule": refused_rule, "message": "immutable"}));
    let costs = support::cel_cost::crd_rule_costs(&schema).unwrap();
    assert_eq!(
        support::cel_cost::server_verdict(&costs),
        vec![
            "spec.validation.openAPIV3Schema.x-kubernetes-validations[1].rule: Forbidden: \
             estimated rule cost exceeds budget by factor of more than 100x (try simplifying the \
             rule, or adding maxItems, maxProperties, and maxLength where arrays, maps, and \
             strings are declared)"
                .to_owned(),
            "spec.validation.openAPIV3Schema: Forbidden: x-kubernetes-validations estimated rule \
             cost total for entire OpenAPIv3 schema exceeds budget by factor of more than 100x \
             (try simplifying the rule, or adding maxItems, maxProperties, and maxLength where \
             arrays, maps, and strings are declared)"
                .to_owned(),
        ]
    );
    // The same comparison through a field whose name is not a keyword is cheap: an object's
    // size is 0 to the estimator.
    let cheap =
        support::cel_cost::rule_cost("self.spec.upgrade == oldSelf.spec.upgrade", &schema, true)
            .unwrap();
    assert_eq!(cheap.max, 6);
}

/// The estimate reproduces Kubernetes' own expectations for it (apiextensions-apiserver's
/// `TestCostEstimation` and cel-go's cost tests), on the schemas those tests generate.
#[test]
fn the_cost_estimate_matches_kubernetes_own_expectations() {
    let cost = |rule: &str, schema: Value| {
        support::cel_cost::rule_cost(rule, &schema, false)
            .unwrap()
            .max
    };
    let array = |items: Value| json!({"type": "array", "items": items});
    let number = json!({"type": "number"});
    let string = json!({"type": "string"});
    assert_eq!(cost("self.all(x, true)", array(number.clone())), 4_718_591);
    assert_eq!(cost("self.all(x, true)", array(string.clone())), 3_145_727);
    assert_eq!(
        cost("self.all(x, true)", array(json!({"type": "boolean"}))),
        1_887_437
    );
    assert_eq!(cost("self[1] == 0.0", array(number.clone())), 2);
    assert_eq!(cost("self[1] == self[1]", array(string.clone())), 314_577);
    assert_eq!(cost("self.contains('test')", string.clone()), 314_574);
    assert_eq!(cost("self.startsWith('test')", string.clone()), 2);
    assert_eq!(cost(r#"self == "x""#, string.clone()), 2);
    assert_eq!(cost(r#"self.matches("x")"#, string.clone()), 314_574);
    assert_eq!(
        cost(
            "self[0] == 5",
            array(json!({"x-kubernetes-int-or-string": true}))
        ),
        3
    );
    let mut bounded = array(number.clone());
    bounded["maxItems"] = json!(10);
    assert_eq!(cost("self.all(x, true)", bounded), 32);
    // cel-go: [1,2,3,4,5].filter(x, x % 2 == 0) costs {41, 101}.
    assert_eq!(
        support::cel_cost::rule_cost("[1,2,3,4,5].filter(x, x % 2 == 0)", &number, false).unwrap(),
        support::cel_cost::Estimate { min: 41, max: 101 }
    );
}
