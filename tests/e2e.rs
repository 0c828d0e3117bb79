//! End to end against a real cluster: installs crds/, runs the operator binary, applies
//! examples/statestore.yaml pointed at a throwaway local PostgreSQL, and waits for Ready; then
//! examples/sqlmesh/statestore.yaml pointed at state the real SQLMesh wrote, waits for Ready with
//! SQLMesh's versions in status, and checks that the API server keeps `spec.framework` immutable.
//! Runs only when STATEKEEPER_E2E_KUBECONFIG names a kubeconfig; otherwise it says it skipped.

mod support;

use std::process::{Child, Command, Stdio};

struct Operator(Child);

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn kubectl(kubeconfig: &str, args: &[&str]) -> String {
    let out = kubectl_output(kubeconfig, args);
    assert!(
        out.status.success(),
        "kubectl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn kubectl_output(kubeconfig: &str, args: &[&str]) -> std::process::Output {
    Command::new("kubectl")
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .output()
        .expect("run kubectl")
}

#[tokio::test]
async fn operator_makes_the_example_store_ready_on_a_real_cluster() {
    let Ok(kubeconfig) = std::env::var("STATEKEEPER_E2E_KUBECONFIG") else {
        eprintln!(
            "SKIPPED e2e: STATEKEEPER_E2E_KUBECONFIG is not set. Point it at a kubeconfig of a \
             disposable cluster to run the operator end to end."
        );
        return;
    };
    let root = env!("CARGO_MANIFEST_DIR");
    let db = support::TestDb::new().await;
    let (host, port, user, password, database) = support::url_parts(&db.url);

    kubectl(&kubeconfig, &["apply", "-k", &format!("{root}/crds")]);
    kubectl(
        &kubeconfig,
        &[
            "wait",
            "--for=condition=Established",
            "crd/statestores.statekeeper.dev",
            "--timeout=60s",
        ],
    );
    let _operator = Operator(
        Command::new(env!("CARGO_BIN_EXE_statekeeper"))
            .args(["operator", "--namespace", "data"])
            .env("KUBECONFIG", &kubeconfig)
            .stdout(Stdio::null())
            .spawn()
            .expect("start the operator"),
    );
    kubectl(
        &kubeconfig,
        &["apply", "-f", &format!("{root}/examples/statestore.yaml")],
    );
    // The operator runs here, so it reaches the throwaway database on this machine.
    kubectl(
        &kubeconfig,
        &[
            "-n",
            "data",
            "patch",
            "secret",
            "analytics-state-db",
            "--type",
            "merge",
            "-p",
            &format!(r#"{{"stringData":{{"password":"{password}"}}}}"#),
        ],
    );
    kubectl(
        &kubeconfig,
        &[
            "-n",
            "data",
            "patch",
            "statestore",
            "analytics",
            "--type",
            "merge",
            "-p",
            &format!(
                r#"{{"spec":{{"connection":{{"host":"{host}","port":{port},"user":"{user}","database":"{database}"}}}}}}"#
            ),
        ],
    );
    kubectl(
        &kubeconfig,
        &[
            "-n",
            "data",
            "wait",
            "statestore/analytics",
            "--for=condition=Ready",
            "--timeout=180s",
        ],
    );
    let version = kubectl(
        &kubeconfig,
        &[
            "-n",
            "data",
            "get",
            "statestore/analytics",
            "-o",
            "jsonpath={.status.schemaVersion}",
        ],
    );
    assert_eq!(version.trim(), "3");

    // A SQLMesh store, on state the real SQLMesh planned.
    let (sqlmesh_db, _project) = support::sqlmesh::planned().await;
    let example = format!("{root}/examples/sqlmesh/statestore.yaml");
    kubectl(&kubeconfig, &["apply", "-f", &example]);
    kubectl(
        &kubeconfig,
        &[
            "-n",
            "data",
            "patch",
            "secret",
            "sqlmesh-state-url",
            "--type",
            "merge",
            "-p",
            &format!(r#"{{"stringData":{{"url":"{}"}}}}"#, sqlmesh_db.url),
        ],
    );
    kubectl(
        &kubeconfig,
        &[
            "-n",
            "data",
            "wait",
            "statestore/sqlmesh-state",
            "--for=condition=Ready",
            "--timeout=180s",
        ],
    );
    let sqlmesh_version = kubectl(
        &kubeconfig,
        &[
            "-n",
            "data",
            "get",
            "statestore/sqlmesh-state",
            "-o",
            "jsonpath={.status.frameworkVersions.sqlmeshVersion}",
        ],
    );
    assert_eq!(sqlmesh_version.trim(), support::sqlmesh::sqlmesh_version());
    let refused = kubectl_output(
        &kubeconfig,
        &[
            "-n",
            "data",
            "patch",
            "statestore",
            "sqlmesh-state",
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"framework":"statekeeper"}}"#,
        ],
    );
    assert!(!refused.status.success(), "the framework changed");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("spec.framework is immutable"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    // Both examples share the namespace: delete them together at the end.
    kubectl(&kubeconfig, &["delete", "-f", &example, "--wait=false"]);
    kubectl(
        &kubeconfig,
        &[
            "delete",
            "-f",
            &format!("{root}/examples/statestore.yaml"),
            "--wait=false",
            "--ignore-not-found",
        ],
    );
}
