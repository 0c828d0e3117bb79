//! crds/, deploy/ and examples/ stay true to the code.

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use serde::Deserialize;
use serde_json::Value;
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
                "{dir}/{file} is stale: run `cargo run -- crd` and split it into crds/ and charts/statekeeper/crds/"
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
                            spec.compression.into(),
                        )
                    }
                    None => statekeeper::controller::state_export::file_url(
                        &spec.destination.url,
                        &name,
                        spec.compression.into(),
                    ),
                };
                statekeeper::engine::Destination::parse(&url, &spec.destination.options)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                found += 1;
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

/// The StateMigration CRD's CEL rules, evaluated (cel-python, pinned) on the edits a user makes:
/// exactly one operation, and a spec that cannot change after creation except its approval.
#[test]
fn state_migration_cel_rules_refuse_edits_and_operation_counts() {
    let crds = yaml_documents(&statekeeper::api::crds_yaml().unwrap());
    let crd = crds
        .iter()
        .find(|c| c["spec"]["names"]["kind"] == "StateMigration")
        .expect("the StateMigration CRD");
    let version = &crd["spec"]["versions"][0];
    assert!(version["subresources"]["status"].is_object());
    assert_eq!(crd["spec"]["names"]["shortNames"][0], "skm");
    assert_eq!(crd["spec"]["names"]["categories"][0], "statekeeper");
    let rules: Vec<(String, String)> =
        version["schema"]["openAPIV3Schema"]["x-kubernetes-validations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["rule"].as_str().unwrap().to_owned(),
                    r["message"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
    let rule = |message_part: &str| {
        rules
            .iter()
            .find(|(_, m)| m.contains(message_part))
            .unwrap_or_else(|| panic!("no rule saying {message_part:?} in {rules:?}"))
            .0
            .clone()
    };
    let one = rule("exactly one operation");
    let immutable = rule("immutable except spec.approval");
    let object = |spec: Value| serde_json::json!({"metadata": {"name": "m"}, "spec": spec});
    let base = serde_json::json!({"storeRef": {"name": "analytics"}, "rollback": {"backupId": "20261122023000123"}, "backup": true, "dryRun": false, "requireApproval": true});
    let with = |patch: Value| {
        let mut spec = base.clone();
        support::operator::support_merge(&mut spec, &patch);
        object(spec)
    };
    let cases: Vec<(String, Value, Option<Value>, bool, &str)> = vec![
        (
            one.clone(),
            object(serde_json::json!({"storeRef": {"name": "a"}, "reset": {}})),
            None,
            true,
            "one operation",
        ),
        (
            one.clone(),
            object(serde_json::json!({"storeRef": {"name": "a"}})),
            None,
            false,
            "no operation",
        ),
        (
            one.clone(),
            object(serde_json::json!({"storeRef": {"name": "a"}, "reset": {}, "upgrade": {}})),
            None,
            false,
            "two operations",
        ),
        (
            immutable.clone(),
            with(serde_json::json!({"approval": {"planHash": "9c1e0f3a6b2d4e58"}})),
            Some(object(base.clone())),
            true,
            "approving",
        ),
        (
            immutable.clone(),
            with(serde_json::json!({"approval": {"planHash": "0000000000000000"}})),
            Some(with(
                serde_json::json!({"approval": {"planHash": "9c1e0f3a6b2d4e58"}}),
            )),
            true,
            "re-approving",
        ),
        (
            immutable.clone(),
            with(serde_json::json!({"rollback": {"backupId": "20261122023000999"}})),
            Some(object(base.clone())),
            false,
            "another backup",
        ),
        (
            immutable.clone(),
            with(serde_json::json!({"storeRef": {"name": "other"}})),
            Some(object(base.clone())),
            false,
            "another store",
        ),
        (
            immutable.clone(),
            with(serde_json::json!({"backup": false})),
            Some(object(base.clone())),
            false,
            "no backup",
        ),
        (
            immutable.clone(),
            with(serde_json::json!({"requireApproval": false})),
            Some(object(base.clone())),
            false,
            "dropping the approval requirement",
        ),
        (
            immutable.clone(),
            with(serde_json::json!({"dryRun": true})),
            Some(object(base.clone())),
            false,
            "dry run",
        ),
        (
            immutable.clone(),
            with(serde_json::json!({"reset": {}})),
            Some(object(base.clone())),
            false,
            "adding an operation",
        ),
        (
            rule("copyFrom names the store itself"),
            object(
                serde_json::json!({"storeRef": {"name": "a"}, "copyFrom": {"storeRef": {"name": "a"}}}),
            ),
            None,
            false,
            "copy from itself",
        ),
        (
            rule("always keeps the removed state"),
            object(serde_json::json!({"storeRef": {"name": "a"}, "reset": {}, "backup": false})),
            None,
            false,
            "reset without backup",
        ),
    ];
    let python = Command::new("bash")
        .args([
            &format!("{ROOT}/scripts/python-env.sh"),
            "cel-python==0.5.0",
        ])
        .output()
        .expect("run scripts/python-env.sh");
    assert!(
        python.status.success(),
        "cannot install cel-python: {}",
        String::from_utf8_lossy(&python.stderr)
    );
    let python = String::from_utf8_lossy(&python.stdout).trim().to_owned();
    let input: Vec<Value> = cases
        .iter()
        .map(
            |(rule, new, old, _, _)| serde_json::json!({"rule": rule, "self": new, "oldSelf": old}),
        )
        .collect();
    let mut child = Command::new(python)
        .arg(format!("{ROOT}/tests/fixtures/cel_eval.py"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(serde_json::to_string(&input).unwrap().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let results: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    for ((_, _, _, expected, what), got) in cases.iter().zip(results) {
        assert_eq!(got, Value::Bool(*expected), "{what}");
    }
}
