//! End to end against a real cluster: installs crds/, checks that the server's CEL rules refuse
//! a bad object with their message, runs two operator processes with leader election through a
//! ServiceAccount token bound only by deploy/'s RBAC, applies
//! examples/statestore.yaml pointed at a throwaway local PostgreSQL, and waits for Ready; then
//! examples/sqlmesh/statestore.yaml pointed at state the real SQLMesh wrote, waits for Ready with
//! SQLMesh's versions in status, and checks that the API server keeps `spec.framework` immutable.
//! Then StateMigrations: the example upgrade of the statekeeper store (Succeeded), the API server
//! refusing an edited spec but taking an approval, and the SQLMesh runner upgrade: approved by
//! its plan hash, its Job created, the Job marked failed (no kubelet runs it), the store restored.
//! Along the way: a broken Secret shows in the store's conditions and its fix recovers the store
//! at once; and at the end the leader is killed (SIGKILL) and the standby takes over within the
//! Lease's duration, with nothing finished run again.
//! It needs nothing but a bare API server: it creates the namespace it uses first, applies
//! everything server-side, and leaves no file behind. Runs only when STATEKEEPER_E2E_KUBECONFIG
//! names a kubeconfig; otherwise it says it skipped.

mod support;

use std::process::{Child, Command, Stdio};

struct Operator(Child);

/// Files the run writes outside the cluster (the ServiceAccount's kubeconfig, the export
/// folder), removed however the run ends.
#[derive(Default)]
struct Scratch(Vec<std::path::PathBuf>);

impl Drop for Scratch {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = std::fs::remove_file(path).or_else(|_| std::fs::remove_dir_all(path));
        }
    }
}

/// Every `kubectl apply` is server-side (a re-apply never puts back what another field manager
/// removed, as a client-side apply's last-applied annotation does), under one field manager.
fn with_server_side(args: &[&str]) -> Vec<String> {
    let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    if let Some(at) = all.iter().position(|a| a == "apply") {
        for (offset, flag) in [
            "--server-side",
            "--force-conflicts",
            "--field-manager=statekeeper-e2e",
        ]
        .into_iter()
        .enumerate()
        {
            all.insert(at + 1 + offset, flag.to_owned());
        }
    }
    all
}

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
        .args(with_server_side(args))
        .env("KUBECONFIG", kubeconfig)
        .output()
        .expect("run kubectl")
}

fn kubectl_stdin(kubeconfig: &str, args: &[&str], input: &str) -> std::process::Output {
    use std::io::Write as _;
    let mut child = Command::new("kubectl")
        .args(with_server_side(args))
        .env("KUBECONFIG", kubeconfig)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kubectl");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write to kubectl");
    child.wait_with_output().expect("kubectl")
}

/// A kubeconfig for the operator's ServiceAccount (deploy/'s namespace, ServiceAccount and
/// RBAC applied first): the operator runs with exactly the permissions deploy/ grants. The file
/// is removed with `scratch`.
fn service_account_kubeconfig(kubeconfig: &str, root: &str, scratch: &mut Scratch) -> String {
    kubectl(
        kubeconfig,
        &["apply", "-f", &format!("{root}/deploy/namespace.yaml")],
    );
    kubectl(
        kubeconfig,
        &[
            "-n",
            "statekeeper-system",
            "apply",
            "-f",
            &format!("{root}/deploy/serviceaccount.yaml"),
        ],
    );
    kubectl(
        kubeconfig,
        &["apply", "-f", &format!("{root}/deploy/rbac.yaml")],
    );
    let token = kubectl(
        kubeconfig,
        &[
            "-n",
            "statekeeper-system",
            "create",
            "token",
            "statekeeper",
            "--duration=2h",
        ],
    );
    let field = |path: &str| {
        kubectl(
            kubeconfig,
            &[
                "config",
                "view",
                "--raw",
                "--minify",
                "-o",
                &format!("jsonpath={{{path}}}"),
            ],
        )
    };
    let server = field(".clusters[0].cluster.server");
    let ca_data = field(".clusters[0].cluster.certificate-authority-data");
    let ca_file = field(".clusters[0].cluster.certificate-authority");
    let trust = if !ca_data.trim().is_empty() {
        format!("certificate-authority-data: {}", ca_data.trim())
    } else if !ca_file.trim().is_empty() {
        format!("certificate-authority: {}", ca_file.trim())
    } else {
        "insecure-skip-tls-verify: true".to_owned()
    };
    let config = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: e2e\n  cluster:\n    server: {}\n    {trust}\n\
         users:\n- name: statekeeper\n  user:\n    token: {}\ncontexts:\n- name: e2e\n  context:\n    \
         cluster: e2e\n    user: statekeeper\ncurrent-context: e2e\n",
        server.trim(),
        token.trim()
    );
    let path = std::env::temp_dir().join(format!(
        "statekeeper-e2e-sa-{}.kubeconfig",
        std::process::id()
    ));
    std::fs::write(&path, config).expect("write the ServiceAccount kubeconfig");
    scratch.0.push(path.clone());
    path.to_string_lossy().into_owned()
}

/// Starts an operator process with leader election; returns it and its HTTP port.
fn start_operator(kubeconfig: &str, identity: &str) -> (Operator, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let child = Command::new(env!("CARGO_BIN_EXE_statekeeper"))
        .args([
            "operator",
            "--namespace",
            "data",
            "--leader-elect",
            "--lease-namespace",
            "data",
            "--lease-duration-seconds",
            "5",
            "--lease-grace-seconds",
            "2",
            "--http-addr",
            &format!("127.0.0.1:{port}"),
        ])
        .env("KUBECONFIG", kubeconfig)
        .env("POD_NAME", identity)
        .stdout(Stdio::null())
        .spawn()
        .expect("start the operator");
    (Operator(child), port)
}

/// Whether the operator on `port` runs the controllers (its `statekeeper_leader` metric).
fn is_leader(port: u16) -> bool {
    use std::io::{Read as _, Write as _};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ =
        stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.lines().any(|l| l == "statekeeper_leader 1")
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
    let mut scratch = Scratch::default();
    // What the examples and the operators' Lease need, before anything that uses it: a bare API
    // server has nothing but `default`.
    let namespace = kubectl_stdin(
        &kubeconfig,
        &["apply", "-f", "-"],
        r#"{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "data"}}"#,
    );
    assert!(
        namespace.status.success(),
        "{}",
        String::from_utf8_lossy(&namespace.stderr)
    );

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
    // The server's own CEL rules refuse a bad object with their message.
    let refused = kubectl_stdin(
        &kubeconfig,
        &["apply", "-f", "-"],
        r#"{"apiVersion": "statekeeper.dev/v1alpha1", "kind": "StateMigration",
            "metadata": {"name": "two-operations", "namespace": "default"},
            "spec": {"storeRef": {"name": "analytics"}, "reset": {}, "upgrade": {}}}"#,
    );
    assert!(!refused.status.success(), "two operations were accepted");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("set exactly one operation"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    // Two replicas with leader election, as deploy/ runs them, each through a ServiceAccount
    // token bound only by deploy/'s RBAC.
    let operator_kubeconfig = service_account_kubeconfig(&kubeconfig, root, &mut scratch);
    let mut replicas: Vec<(Operator, u16)> = (0..2)
        .map(|i| start_operator(&operator_kubeconfig, &format!("e2e-replica-{i}")))
        .collect();
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
    let leaders: Vec<bool> = replicas.iter().map(|(_, port)| is_leader(*port)).collect();
    assert_eq!(leaders.iter().filter(|l| **l).count(), 1, "{leaders:?}");

    // A broken Secret shows as the store's condition; fixing it recovers the store at once.
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
            r#"{"stringData":{"password":"not-the-password"}}"#,
        ],
    );
    kubectl(
        &kubeconfig,
        &[
            "-n",
            "data",
            "wait",
            "statestore/analytics",
            "--for=jsonpath={.status.conditions[?(@.type==\"Ready\")].reason}=AuthenticationFailed",
            "--timeout=120s",
        ],
    );
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
    let fixed = std::time::Instant::now();
    kubectl(
        &kubeconfig,
        &[
            "-n",
            "data",
            "wait",
            "statestore/analytics",
            "--for=condition=Ready",
            "--timeout=60s",
        ],
    );
    println!(
        "recovered {:.1} s after the Secret was fixed",
        fixed.elapsed().as_secs_f64()
    );

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
    // Two more examples reach their documented conditions: a reset the store does not allow,
    // and a rollback to a backup the store does not have, both refused with nothing changed.
    for (example, name, reason) in [
        (
            "statemigration-reset.yaml",
            "analytics-reset",
            "ResetRefused",
        ),
        (
            "statemigration-rollback.yaml",
            "analytics-rollback",
            "BackupNotFound",
        ),
    ] {
        kubectl(
            &kubeconfig,
            &["apply", "-f", &format!("{root}/examples/{example}")],
        );
        kubectl(
            &kubeconfig,
            &[
                "-n",
                "data",
                "wait",
                &format!("statemigration/{name}"),
                &format!(
                    "--for=jsonpath={{.status.conditions[?(@.type==\"Ready\")].reason}}={reason}"
                ),
                "--timeout=120s",
            ],
        );
        kubectl(
            &kubeconfig,
            &[
                "delete",
                "-f",
                &format!("{root}/examples/{example}"),
                "--wait=false",
            ],
        );
    }
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
        String::from_utf8_lossy(&refused.stderr)
            .contains("spec.backup is immutable (only spec.approval may change)"),
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

    // An export big enough to be killed in the middle: fill the store, start the export, and
    // kill the leader (SIGKILL: no Lease release) while it runs. The standby takes over within
    // the Lease, retries the export once, and leaves no staging file behind.
    db.store("sqlmesh_state")
        .await
        .generate(&statekeeper::engine::generator::GenerateOptions {
            model_versions: 300_000,
            environments: 50,
            ..Default::default()
        })
        .await
        .expect("fill the store");
    let exports_dir = std::env::temp_dir().join(format!("statekeeper-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&exports_dir).expect("a directory for the export");
    scratch.0.push(exports_dir.clone());
    kubectl_stdin(
        &kubeconfig,
        &["apply", "-f", "-"],
        &format!(
            r#"{{"apiVersion": "statekeeper.dev/v1alpha1", "kind": "StateExport",
                "metadata": {{"name": "killed-mid-export", "namespace": "data"}},
                "spec": {{"storeRef": {{"name": "analytics"}}, "compression": "none",
                          "destination": {{"url": "file://{}/"}}}}}}"#,
            exports_dir.display()
        ),
    );
    kubectl(
        &kubeconfig,
        &[
            "-n",
            "data",
            "wait",
            "stateexport/killed-mid-export",
            "--for=jsonpath={.status.phase}=Running",
            "--timeout=60s",
        ],
    );
    let finished = kubectl(
        &kubeconfig,
        &[
            "-n",
            "data",
            "get",
            "statemigration/analytics-upgrade",
            "-o",
            "jsonpath={.status.finishedAt}",
        ],
    );
    let leader = replicas
        .iter()
        .position(|(_, port)| is_leader(*port))
        .expect("a leader");
    let (mut killed, _) = replicas.remove(leader);
    let export_phase = |kubeconfig: &str| {
        kubectl(
            kubeconfig,
            &[
                "-n",
                "data",
                "get",
                "stateexport/killed-mid-export",
                "-o",
                "jsonpath={.status.phase}",
            ],
        )
    };
    let _ = killed.0.kill();
    let killed_mid_export = export_phase(&kubeconfig).trim() == "Running";
    println!(
        "the leader was killed {} the export",
        if killed_mid_export { "during" } else { "after" }
    );
    let _ = killed.0.wait();
    let started = std::time::Instant::now();
    let standby = replicas[0].1;
    while !is_leader(standby) {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "the standby never took over"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    println!(
        "failover: {:.1} s (lease duration 5 s)",
        started.elapsed().as_secs_f64()
    );
    std::thread::sleep(std::time::Duration::from_secs(5));
    let after = kubectl(
        &kubeconfig,
        &[
            "-n",
            "data",
            "get",
            "statemigration/analytics-upgrade",
            "-o",
            "jsonpath={.status.finishedAt}",
        ],
    );
    assert_eq!(after, finished, "a finished migration never runs again");
    kubectl(
        &kubeconfig,
        &[
            "-n",
            "data",
            "wait",
            "stateexport/killed-mid-export",
            "--for=jsonpath={.status.phase}=Succeeded",
            "--timeout=300s",
        ],
    );
    let attempts = kubectl(
        &kubeconfig,
        &[
            "-n",
            "data",
            "get",
            "stateexport/killed-mid-export",
            "-o",
            "jsonpath={.status.attempts}",
        ],
    );
    let expected = if killed_mid_export { "2" } else { "1" };
    assert_eq!(
        attempts.trim(),
        expected,
        "the killed attempt, then one retry"
    );
    let files: Vec<String> = std::fs::read_dir(&exports_dir)
        .expect("read the export directory")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        files,
        vec!["killed-mid-export.json"],
        "no staging file is left"
    );

    verified_encrypted_schedule(&kubeconfig, &exports_dir);

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

/// A scheduled export, encrypted with age to a key made here and verified after it is written
/// (the identity from a Secret): its first run is Verified on a real API server, its file is age
/// ciphertext, and the secret key appears in no object or Event.
fn verified_encrypted_schedule(kubeconfig: &str, exports_dir: &std::path::Path) {
    let identity = age::x25519::Identity::generate();
    let recipient = identity.to_public().to_string();
    let secret_key = age::secrecy::ExposeSecret::expose_secret(&identity.to_string()).to_owned();
    let secret = serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "e2e-backup-identity", "namespace": "data"},
        "stringData": {"identity": secret_key}
    });
    let applied = kubectl_stdin(kubeconfig, &["apply", "-f", "-"], &secret.to_string());
    assert!(
        applied.status.success(),
        "{}",
        String::from_utf8_lossy(&applied.stderr)
    );
    let dir = exports_dir.join("verified");
    std::fs::create_dir_all(&dir).expect("a directory for the schedule");
    let schedule = serde_json::json!({
        "apiVersion": "statekeeper.dev/v1alpha1", "kind": "StateExport",
        "metadata": {"name": "e2e-verified", "namespace": "data"},
        "spec": {
            "storeRef": {"name": "analytics"},
            "schedule": "0 3 * * *",
            "immediate": true,
            "verify": true,
            "compression": "zstd",
            "destination": {"url": format!("file://{}/", dir.display())},
            "encryption": {
                "recipients": [recipient],
                "identitySecretRef": {"name": "e2e-backup-identity"}
            }
        }
    });
    let applied = kubectl_stdin(kubeconfig, &["apply", "-f", "-"], &schedule.to_string());
    assert!(
        applied.status.success(),
        "{}",
        String::from_utf8_lossy(&applied.stderr)
    );
    let started = std::time::Instant::now();
    let child = loop {
        let names = kubectl(
            kubeconfig,
            &[
                "-n",
                "data",
                "get",
                "stateexports",
                "-l",
                "statekeeper.dev/schedule=e2e-verified",
                "-o",
                "jsonpath={.items[*].metadata.name}",
            ],
        );
        if let Some(name) = names.split_whitespace().next() {
            break name.to_owned();
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(120),
            "the schedule's immediate run never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    kubectl(
        kubeconfig,
        &[
            "-n",
            "data",
            "wait",
            &format!("stateexport/{child}"),
            "--for=condition=Verified",
            "--timeout=300s",
        ],
    );
    let url = kubectl(
        kubeconfig,
        &[
            "-n",
            "data",
            "get",
            &format!("stateexport/{child}"),
            "-o",
            "jsonpath={.status.url}",
        ],
    );
    assert!(url.ends_with(".json.zst.age"), "{url}");
    let path = url.trim_start_matches("file://");
    let head = std::fs::read(path).expect("the encrypted export");
    assert!(
        head.starts_with(b"age-encryption.org/v1"),
        "the file is not age ciphertext"
    );
    let objects = kubectl(
        kubeconfig,
        &["-n", "data", "get", "stateexports,events", "-o", "json"],
    );
    assert!(
        !objects.contains(&secret_key),
        "the secret key leaked into the API"
    );
    kubectl(
        kubeconfig,
        &[
            "-n",
            "data",
            "delete",
            "stateexport/e2e-verified",
            "secret/e2e-backup-identity",
            "--wait=false",
        ],
    );
}
