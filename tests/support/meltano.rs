//! The real Meltano, pinned (tests/fixtures/meltano-requirements.txt), in a virtualenv of its
//! own, writing the system database the Meltano tests read: no fixture typed by hand. Each test
//! gets a project of its own (`meltano init`) whose system database is one test database.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::OnceLock;

use serde_json::Value;

use super::TestDb;

/// The `meltano` executable: `STATEKEEPER_MELTANO`, or installed by scripts/python-env.sh.
pub fn meltano_bin() -> &'static str {
    static BIN: OnceLock<String> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(bin) = std::env::var("STATEKEEPER_MELTANO") {
            return bin;
        }
        let root = env!("CARGO_MANIFEST_DIR");
        let cache = std::env::var("XDG_CACHE_HOME").unwrap_or_else(|_| {
            format!(
                "{}/.cache",
                std::env::var("HOME").unwrap_or_else(|_| "/tmp".into())
            )
        });
        let out = Command::new("bash")
            .args([
                &format!("{root}/scripts/python-env.sh"),
                "-r",
                &format!("{root}/tests/fixtures/meltano-requirements.txt"),
            ])
            .env(
                "STATEKEEPER_VENV",
                format!("{cache}/statekeeper/venv-meltano"),
            )
            .output()
            .expect("run scripts/python-env.sh");
        assert!(
            out.status.success(),
            "cannot install Meltano:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let python = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        std::path::Path::new(&python)
            .with_file_name("meltano")
            .to_string_lossy()
            .into_owned()
    })
}

/// A Meltano project whose system database is a test database.
#[derive(Clone)]
pub struct Project {
    pub dir: PathBuf,
    pub database_uri: String,
    /// `state_backend.uri` when the project keeps its state in files, not its system database.
    pub state_backend: Option<String>,
}

impl Project {
    pub fn new(db: &TestDb) -> Self {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let parent = std::env::temp_dir().join(format!(
            "sk-meltano-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&parent);
        std::fs::create_dir_all(&parent).expect("create the project's folder");
        let out = Command::new(meltano_bin())
            .args(["init", "project", "--no_usage_stats"])
            .current_dir(&parent)
            .env("MELTANO_SEND_ANONYMOUS_USAGE_STATS", "false")
            .output()
            .expect("run meltano init");
        assert!(
            out.status.success(),
            "meltano init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let database_uri = db.url.replacen("postgres://", "postgresql+psycopg://", 1);
        Self {
            dir: parent.join("project"),
            database_uri,
            state_backend: None,
        }
    }

    /// The same project with its state in the file backend at `uri` (`file:///folder`).
    pub fn with_state_backend(&self, uri: &str) -> Self {
        Self {
            state_backend: Some(uri.to_owned()),
            ..self.clone()
        }
    }

    pub fn run(&self, args: &[&str]) -> Output {
        let mut command = Command::new(meltano_bin());
        if let Some(uri) = &self.state_backend {
            command.env("MELTANO_STATE_BACKEND_URI", uri);
        }
        command
            .args(args)
            .current_dir(&self.dir)
            .env("MELTANO_DATABASE_URI", &self.database_uri)
            .env("MELTANO_SEND_ANONYMOUS_USAGE_STATS", "false")
            .env("NO_COLOR", "1")
            .output()
            .expect("run meltano")
    }

    /// Runs `meltano ARGS` and fails the test, with Meltano's output, unless it succeeds.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "meltano {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `meltano state set --force ID JSON`.
    pub fn set(&self, state_id: &str, state: &Value) {
        self.ok(&["state", "set", "--force", state_id, &state.to_string()]);
    }

    /// `meltano state get ID`, as JSON.
    pub fn get(&self, state_id: &str) -> Value {
        let out = self.ok(&["state", "get", state_id]);
        serde_json::from_str(out.trim())
            .unwrap_or_else(|e| panic!("state get {state_id}: {e}: {out}"))
    }
}
