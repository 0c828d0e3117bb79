//! TLS to PostgreSQL as managed services require it: the server's certificate verified against a
//! CA given as PEM (not a file in the operator's pod), a client certificate to log in with, and
//! a refusal that says which setting to check. Against a throwaway server with `ssl=on` and a CA
//! made for the test (scripts/throwaway-postgres.sh start --ssl).

mod support;

use std::collections::BTreeMap;
use std::sync::OnceLock;

use serde_json::json;
use statekeeper::engine::{ConnectionParts, ConnectionSettings, Error, TlsMaterial};
use support::operator::*;

/// The TLS server of this test process and the files it made.
fn server() -> &'static BTreeMap<String, String> {
    static SERVER: OnceLock<BTreeMap<String, String>> = OnceLock::new();
    SERVER.get_or_init(|| support::start_throwaway_with("throwaway-postgres.sh", &["--ssl"]))
}

fn file(variable: &str) -> String {
    std::fs::read_to_string(&server()[variable]).unwrap_or_else(|e| panic!("{variable}: {e}"))
}

/// The TLS server's host, port and superuser password.
fn parts() -> (String, u16, String) {
    let (host, port, _, password, _) = support::url_parts(&server()["STATEKEEPER_PG_URL"]);
    (host, port, password)
}

fn settings(user: &str, password: Option<&str>, tls: TlsMaterial) -> ConnectionSettings {
    let (host, port, _) = parts();
    ConnectionSettings::from_parts(&ConnectionParts {
        host: &host,
        port,
        database: "postgres",
        user,
        password,
        ssl_mode: Some("verify-full"),
    })
    .unwrap()
    .with_tls(tls)
}

#[tokio::test]
async fn verify_full_trusts_the_given_ca_only_and_a_client_certificate_logs_in() {
    let (_, _, password) = parts();
    let with_ca = |ca: &str| TlsMaterial {
        root_certificate: Some(file(ca).into_bytes()),
        ..TlsMaterial::default()
    };
    // The CA that signed the server's certificate: connected, over TLS.
    let pool = settings("postgres", Some(&password), with_ca("STATEKEEPER_PG_CA"))
        .connect()
        .await
        .expect("verify-full with the server's CA");
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(ssl);

    // Another CA: refused, saying that the certificate is not trusted and what to set.
    let refused = settings(
        "postgres",
        Some(&password),
        with_ca("STATEKEEPER_PG_OTHER_CA"),
    )
    .connect()
    .await
    .unwrap_err();
    assert!(
        matches!(refused, Error::ServerCertificateUntrusted { .. }),
        "{refused:?}"
    );
    assert_eq!(refused.reason(), "ServerCertificateUntrusted");
    let message = refused.to_string();
    assert!(
        message.contains("the server's certificate is not trusted")
            && message.contains("connection.tls.caCertificate")
            && message.contains("sslrootcert"),
        "{message}"
    );

    // `tlsclient` logs in by certificate only: with it, connected; without, refused by the
    // server with its own reason.
    let client = TlsMaterial {
        client_certificate: Some(file("STATEKEEPER_PG_CLIENT_CERT").into_bytes()),
        client_key: Some(file("STATEKEEPER_PG_CLIENT_KEY").into_bytes()),
        ..with_ca("STATEKEEPER_PG_CA")
    };
    let pool = settings("tlsclient", None, client)
        .connect()
        .await
        .expect("login by client certificate");
    let user: String = sqlx::query_scalar("SELECT current_user::text")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(user, "tlsclient");
    let refused = settings("tlsclient", None, with_ca("STATEKEEPER_PG_CA"))
        .connect()
        .await
        .unwrap_err();
    assert_eq!(refused.reason(), "AuthenticationFailed", "{refused}");
    assert!(refused.to_string().contains("certificate"), "{refused}");
}

/// The CLI takes the same as libpq does, in its URL.
#[test]
fn the_cli_verifies_with_sslrootcert_in_its_url() {
    let url = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        server()["STATEKEEPER_PG_URL"],
        server()["STATEKEEPER_PG_CA"]
    );
    let run = |url: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_statekeeper"))
            .args(["state", "init", "--schema", "tls_cli"])
            .env("STATEKEEPER_DATABASE_URL", url)
            .output()
            .unwrap()
    };
    let out = run(&url);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let other = url.replace(
        &server()["STATEKEEPER_PG_CA"],
        &server()["STATEKEEPER_PG_OTHER_CA"],
    );
    let out = run(&other);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("the server's certificate is not trusted"),
        "{err}"
    );
}

/// A StateStore takes its CA from a ConfigMap and its client certificate from a
/// kubernetes.io/tls Secret, and says which setting to check when the server is not trusted.
#[tokio::test]
async fn a_state_store_verifies_the_server_with_a_ca_from_a_config_map() {
    let (host, port, password) = parts();
    let h = Harness::new();
    put_secret(&h.kube, "pg-credentials", &[("password", &password)]);
    put_secret(
        &h.kube,
        "pg-client",
        &[
            ("tls.crt", &file("STATEKEEPER_PG_CLIENT_CERT")),
            ("tls.key", &file("STATEKEEPER_PG_CLIENT_KEY")),
        ],
    );
    for (name, ca) in [
        ("right", "STATEKEEPER_PG_CA"),
        ("other", "STATEKEEPER_PG_OTHER_CA"),
    ] {
        h.kube.put(
            &format!("/api/v1/namespaces/{NS}/configmaps/{name}-ca"),
            json!({"apiVersion": "v1", "kind": "ConfigMap",
                   "metadata": {"name": format!("{name}-ca"), "namespace": NS},
                   "data": {"ca.crt": file(ca)}}),
        );
    }
    let store = |name: &str, user: &str, ca: &str, client: bool| {
        let mut connection = json!({
            "host": host, "port": port, "database": "postgres", "user": user,
            "sslMode": "verify-full",
            "tls": {"caCertificate": {"configMapKeyRef": {"name": ca, "key": "ca.crt"}}}
        });
        if client {
            connection["tls"]["clientCertificate"] = json!({"secretName": "pg-client"});
        } else {
            connection["passwordSecretRef"] = json!({"name": "pg-credentials", "key": "password"});
        }
        json!({
            "apiVersion": "statekeeper.dev/v1alpha1", "kind": "StateStore",
            "metadata": {"name": name, "namespace": NS, "uid": format!("uid-{name}"), "generation": 1},
            "spec": {"connection": connection, "schema": format!("tls_{}", name.replace('-', "_"))}
        })
    };
    let ready = |s: &statekeeper::api::StateStore| {
        let c = s
            .status
            .as_ref()
            .unwrap()
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        (c.status.clone(), c.reason.clone(), c.message.clone())
    };
    let (_, verified) = h
        .reconcile(&store("verified", "postgres", "right-ca", false))
        .await;
    assert_eq!(ready(&verified).0, "True", "{:?}", ready(&verified));
    let (_, by_certificate) = h
        .reconcile(&store("by-certificate", "tlsclient", "right-ca", true))
        .await;
    assert_eq!(
        ready(&by_certificate).0,
        "True",
        "{:?}",
        ready(&by_certificate)
    );
    let (_, untrusted) = h
        .reconcile(&store("untrusted", "postgres", "other-ca", false))
        .await;
    let (status, reason, message) = ready(&untrusted);
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "ServerCertificateUntrusted")
    );
    assert!(
        message.contains("connection.tls.caCertificate"),
        "{message}"
    );
    // No key material in status or Events.
    let key = file("STATEKEEPER_PG_CLIENT_KEY");
    let key_body = key.lines().nth(1).unwrap();
    let status_and_events = format!(
        "{}{:?}",
        serde_json::to_string(&untrusted.status).unwrap(),
        h.kube.events(NS)
    );
    assert!(!status_and_events.contains(key_body));
    assert!(!status_and_events.contains(&password));
}
