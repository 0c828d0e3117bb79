//! End to end against a real cluster: installs crds/, runs the operator binary, applies
//! examples/statestore.yaml pointed at a throwaway local PostgreSQL, and waits for Ready; then
//! examples/sqlmesh/statestore.yaml pointed at state the real SQLMesh wrote, waits for Ready with
//! SQLMesh's versions in status, and checks that the API server keeps `spec.framework` immutable.
//! Then StateMigrations: the example upgrade of the statekeeper store (Succeeded), the API server
//! refusing an edited spec but taking an approval, and the SQLMesh runner upgrade: approved by
//! its plan hash, its Job created, the Job marked failed (no kubelet runs it), the store restored.
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
    for crd in [
        "crd/statestores.statekeeper.dev",
        "crd/stateexports.statekeeper.dev",
        "crd/statemigrations.statekeeper.dev",
    ] {
        kubectl(
            &kubeconfig,
            &["wait", "--for=condition=Established", crd, "--timeout=60s"],
        );
    }
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

    // A StateMigration: the example upgrade, already at the latest version, succeeds at once.
    let upgrade = format!("{root}/examples/statemigration-upgrade.yaml");
    kubectl(&kubeconfig, &["apply", "-f", &upgrade]);
    kubectl(
        &kubeconfig,
        &[
            "-n",
            "data",
            "wait",
            "statemigration/analytics-upgrade",
            "--for=condition=Succeeded",
            "--timeout=120s",
        ],
    );
    // Its spec is immutable, but for the approval.
    let refused = kubectl_output(
        &kubeconfig,
        &[
            "-n",
            "data",
            "patch",
            "statemigration",
            "analytics-upgrade",
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"backup":false}}"#,
        ],
    );
    assert!(!refused.status.success(), "the spec changed");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("immutable except spec.approval"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    kubectl(
        &kubeconfig,
        &[
            "-n",
            "data",
            "patch",
            "statemigration",
            "analytics-upgrade",
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"approval":{"planHash":"0123456789abcdef"}}}"#,
        ],
    );

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
    // The SQLMesh runner upgrade: waits for the approval of its plan, then backs up and creates
    // its Job. No kubelet runs the Job here: mark it failed as the Job controller would, and the
    // operator restores the backup.
    let migration = format!("{root}/examples/sqlmesh/statemigration-upgrade.yaml");
    kubectl(&kubeconfig, &["apply", "-f", &migration]);
    kubectl(
        &kubeconfig,
        &[
            "-n",
            "data",
            "wait",
            "statemigration/sqlmesh-migrate-0-237",
            "--for=jsonpath={.status.phase}=AwaitingApproval",
            "--timeout=120s",
        ],
    );
    let hash = kubectl(
        &kubeconfig,
        &[
            "-n",
            "data",
            "get",
            "statemigration/sqlmesh-migrate-0-237",
            "-o",
            "jsonpath={.status.planHash}",
        ],
    );
    kubectl(
        &kubeconfig,
        &[
            "-n",
            "data",
            "patch",
            "statemigration",
            "sqlmesh-migrate-0-237",
            "--type",
            "merge",
            "-p",
            &format!(
                r#"{{"spec":{{"approval":{{"planHash":"{}"}}}}}}"#,
                hash.trim()
            ),
        ],
    );
    kubectl(
        &kubeconfig,
        &[
            "-n",
            "data",
            "wait",
            "statemigration/sqlmesh-migrate-0-237",
            "--for=jsonpath={.status.jobName}=sqlmesh-migrate-0-237-upgrade",
            "--timeout=120s",
        ],
    );
    let job = kubectl(
        &kubeconfig,
        &[
            "-n",
            "data",
            "get",
            "job/sqlmesh-migrate-0-237-upgrade",
            "-o",
            "json",
        ],
    );
    assert!(!job.contains(&password), "no secret value in the Job");
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    kubectl(
        &kubeconfig,
        &[
            "-n",
            "data",
            "patch",
            "job",
            "sqlmesh-migrate-0-237-upgrade",
            "--subresource=status",
            "--type",
            "merge",
            "-p",
            &format!(
                r#"{{"status":{{"startTime":"{now}","failed":1,"conditions":[{{"type":"FailureTarget","status":"True","reason":"DeadlineExceeded","message":"Job was active longer than specified deadline","lastProbeTime":"{now}","lastTransitionTime":"{now}"}},{{"type":"Failed","status":"True","reason":"DeadlineExceeded","message":"Job was active longer than specified deadline","lastProbeTime":"{now}","lastTransitionTime":"{now}"}}]}}}}"#
            ),
        ],
    );
    kubectl(
        &kubeconfig,
        &[
            "-n",
            "data",
            "wait",
            "statemigration/sqlmesh-migrate-0-237",
            "--for=jsonpath={.status.restored}=true",
            "--timeout=120s",
        ],
    );

    // Both examples share the namespace: delete them together at the end.
    kubectl(&kubeconfig, &["delete", "-f", &migration, "--wait=false"]);
    kubectl(&kubeconfig, &["delete", "-f", &upgrade, "--wait=false"]);
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
