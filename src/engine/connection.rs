//! Connecting to PostgreSQL with timeouts, and turning connection failures into clear errors.

use std::str::FromStr;
use std::time::Duration;

use sqlx::ConnectOptions;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgSslMode};

use super::Error;

/// Where and how to connect. Built from a URL (CLI, `urlSecretRef`) or from parts (StateStore).
#[derive(Clone)]
pub struct ConnectionSettings {
    options: PgConnectOptions,
    /// Bounds connecting, and every wait for a pooled connection.
    pub connect_timeout: Duration,
    pub max_connections: u32,
}

/// Parts of a connection as a StateStore declares them.
pub struct ConnectionParts<'a> {
    pub host: &'a str,
    pub port: u16,
    pub database: &'a str,
    pub user: &'a str,
    pub password: Option<&'a str>,
    pub ssl_mode: Option<&'a str>,
}

pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS material in PEM, as a StateStore's Secrets and ConfigMaps hold it.
#[derive(Clone, Debug, Default)]
pub struct TlsMaterial {
    pub root_certificate: Option<Vec<u8>>,
    pub client_certificate: Option<Vec<u8>>,
    pub client_key: Option<Vec<u8>>,
}

impl ConnectionSettings {
    /// Parses a `postgres://` URL; SQLAlchemy's `postgresql+DRIVER://` is read as `postgresql://`,
    /// so that one Secret serves statekeeper and a framework (Meltano's `MELTANO_DATABASE_URI`).
    /// The error never repeats the URL, which may hold a password.
    pub fn from_url(url: &str) -> Result<Self, Error> {
        let url = match url.split_once("://") {
            Some((scheme, rest)) if scheme.starts_with("postgresql+") => {
                format!("postgresql://{rest}")
            }
            _ => url.to_owned(),
        };
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(Error::InvalidConnection(
                "the database URL must start with postgres:// or postgresql:// \
                 (or SQLAlchemy's postgresql+DRIVER://)"
                    .into(),
            ));
        }
        let options = PgConnectOptions::from_str(&url).map_err(|_| {
            Error::InvalidConnection(
                "the database URL is malformed (expected postgres://user:password@host:port/database)"
                    .into(),
            )
        })?;
        Ok(Self::with_options(options))
    }

    pub fn from_parts(parts: &ConnectionParts<'_>) -> Result<Self, Error> {
        let mut options = PgConnectOptions::new_without_pgpass()
            .host(parts.host)
            .port(parts.port)
            .database(parts.database)
            .username(parts.user);
        if let Some(password) = parts.password {
            options = options.password(password);
        }
        if let Some(mode) = parts.ssl_mode {
            options = options.ssl_mode(parse_ssl_mode(mode)?);
        }
        Ok(Self::with_options(options))
    }

    fn with_options(options: PgConnectOptions) -> Self {
        Self {
            options: options
                .application_name("statekeeper")
                .disable_statement_logging(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            max_connections: 4,
        }
    }

    /// PEM material that a cluster cannot give as files: the CA that signed the server's
    /// certificate, and a client certificate with its key.
    pub fn with_tls(mut self, tls: TlsMaterial) -> Self {
        if let Some(ca) = tls.root_certificate {
            self.options = self.options.ssl_root_cert_from_pem(ca);
        }
        if let Some(certificate) = tls.client_certificate {
            self.options = self.options.ssl_client_cert_from_pem(certificate);
        }
        if let Some(key) = tls.client_key {
            self.options = self.options.ssl_client_key_from_pem(key);
        }
        self
    }

    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    pub fn with_max_connections(mut self, max: u32) -> Self {
        self.max_connections = max.max(1);
        self
    }

    /// `host:port/database`, safe to show anywhere.
    pub fn target(&self) -> String {
        format!(
            "{}:{}/{}",
            self.options.get_host(),
            self.options.get_port(),
            self.options.get_database().unwrap_or("postgres")
        )
    }

    pub fn user(&self) -> &str {
        self.options.get_username()
    }

    /// libpq's variables for everything but the password: PGHOST, PGPORT, PGDATABASE, PGUSER.
    pub fn libpq_environment(&self) -> Vec<(String, String)> {
        let mut env = vec![
            ("PGHOST".into(), self.options.get_host().to_owned()),
            ("PGPORT".into(), self.options.get_port().to_string()),
            (
                "PGDATABASE".into(),
                self.options.get_database().unwrap_or("postgres").to_owned(),
            ),
            ("PGUSER".into(), self.options.get_username().to_owned()),
        ];
        let ssl_mode = match self.options.get_ssl_mode() {
            PgSslMode::Disable => "disable",
            PgSslMode::Allow => "allow",
            PgSslMode::Prefer => "prefer",
            PgSslMode::Require => "require",
            PgSslMode::VerifyCa => "verify-ca",
            PgSslMode::VerifyFull => "verify-full",
        };
        env.push(("PGSSLMODE".into(), ssl_mode.into()));
        env
    }

    /// Opens the pool's first connection here, so that a wrong password, a missing database or an
    /// unreachable host is reported precisely rather than as a pool timeout; the connection stays
    /// in the pool for the first caller. The pool retries a refused TCP connect until its timeout
    /// (a server starting up), so a TCP host is asked whether it answers at all first.
    pub async fn connect(&self) -> Result<PgPool, Error> {
        let pool = PgPoolOptions::new()
            .max_connections(self.max_connections)
            .acquire_timeout(self.connect_timeout)
            .idle_timeout(Duration::from_secs(300))
            .connect_lazy_with(self.options.clone());
        if self.options.get_socket().is_none() {
            let address = (self.options.get_host(), self.options.get_port());
            tokio::time::timeout(
                self.connect_timeout,
                tokio::net::TcpStream::connect(address),
            )
            .await
            .map_err(|_| self.timed_out())?
            .map_err(|e| self.classify(sqlx::Error::Io(e)))?;
        }
        let mut first = tokio::time::timeout(self.connect_timeout, pool.acquire())
            .await
            .map_err(|_| self.timed_out())?
            .map_err(|e| self.classify(e))?;
        // Back into the pool before the caller asks for a connection: dropping it returns it on
        // a task of its own, and a caller quicker than that task got a second connection opened
        // (a backend started and authenticated for nothing).
        first.return_to_pool().await;
        Ok(pool)
    }

    fn timed_out(&self) -> Error {
        Error::ConnectTimeout {
            target: self.target(),
            after: self.connect_timeout,
        }
    }

    /// Maps a connect failure to an error that names the problem and never the secret.
    fn classify(&self, err: sqlx::Error) -> Error {
        match &err {
            sqlx::Error::Database(db) => match db.code().as_deref() {
                Some("28P01") | Some("28000") => Error::AuthenticationFailed {
                    user: self.user().to_owned(),
                    // The server's own words ("password authentication failed", "connection
                    // requires a valid client certificate"): they never hold a secret.
                    how: db.message().to_owned(),
                },
                Some("3D000") => Error::DatabaseNotFound {
                    database: self.options.get_database().unwrap_or("postgres").to_owned(),
                },
                _ => Error::Unreachable {
                    target: self.target(),
                    reason: db.message().to_owned(),
                },
            },
            // rustls reports a refused certificate as an I/O error of the handshake.
            sqlx::Error::Io(_) | sqlx::Error::Tls(_) => {
                let detail = match &err {
                    sqlx::Error::Tls(tls) => tls.to_string(),
                    other => other.to_string(),
                };
                let detail = detail
                    .strip_prefix("error communicating with database: ")
                    .unwrap_or(&detail)
                    .to_owned();
                match untrusted_certificate_hint(&detail, self.options.get_host()) {
                    Some(hint) => Error::ServerCertificateUntrusted {
                        target: self.target(),
                        detail,
                        hint,
                    },
                    None if matches!(err, sqlx::Error::Tls(_)) => Error::Unreachable {
                        target: self.target(),
                        reason: format!("TLS negotiation failed: {detail}"),
                    },
                    None => Error::Unreachable {
                        target: self.target(),
                        reason: detail,
                    },
                }
            }
            sqlx::Error::PoolTimedOut => self.timed_out(),
            _ => Error::Unreachable {
                target: self.target(),
                reason: "the server closed the connection during the handshake".into(),
            },
        }
    }
}

/// What to check when the server's certificate was refused, or `None` for another TLS failure.
fn untrusted_certificate_hint(detail: &str, host: &str) -> Option<String> {
    if detail.contains("NotValidForName") {
        return Some(format!(
            "it is not issued for \"{host}\": connect by a name the certificate holds, or use \
             sslMode verify-ca (the CA, not the name)"
        ));
    }
    let untrusted = [
        "UnknownIssuer",
        "BadSignature",
        "Expired",
        "NotValidYet",
        "invalid peer certificate",
    ]
    .iter()
    .any(|sign| detail.contains(sign));
    untrusted.then(|| {
        "give the CA that signed it: connection.tls.caCertificate on a StateStore, \
         sslrootcert=FILE in a URL (managed services publish their bundles: docs/operations.md#tls)"
            .to_owned()
    })
}

fn parse_ssl_mode(mode: &str) -> Result<PgSslMode, Error> {
    Ok(match mode {
        "disable" => PgSslMode::Disable,
        "allow" => PgSslMode::Allow,
        "prefer" => PgSslMode::Prefer,
        "require" => PgSslMode::Require,
        "verify-ca" => PgSslMode::VerifyCa,
        "verify-full" => PgSslMode::VerifyFull,
        other => {
            return Err(Error::InvalidConnection(format!(
                "unknown sslMode \"{other}\" (use disable, allow, prefer, require, verify-ca or verify-full)"
            )));
        }
    })
}

/// The password in a `postgres://user:password@host/db` URL, so that it can be redacted from
/// anything printed. Never used to connect: that goes through `ConnectionSettings::from_url`.
pub fn password_in_url(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let userinfo = rest.rsplit_once('@')?.0;
    userinfo.split_once(':').map(|(_, p)| p.to_owned())
}

/// Replaces every occurrence of each secret in `text`: a last guard at the edges (CLI output,
/// status, events) for messages that came from outside the engine.
pub fn redact(text: &str, secrets: &[&str]) -> String {
    secrets
        .iter()
        .filter(|s| s.len() >= 3)
        .fold(text.to_owned(), |acc, s| acc.replace(s, "[REDACTED]"))
}
