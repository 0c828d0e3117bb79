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
    /// Settings from the environment (`MELTANO_STATE_BACKEND_URI`, …): the state backend when
    /// the project keeps its state in files, not its system database.
    pub env: Vec<(String, String)>,
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
            env: Vec::new(),
        }
    }

    /// The same project with its state in the file backend at `uri` (`file:///folder`,
    /// `s3://bucket/prefix`), configured further by `settings` (`MELTANO_STATE_BACKEND_…`).
    pub fn with_state_backend(&self, uri: &str, settings: &[(&str, &str)]) -> Self {
        let mut env = vec![("MELTANO_STATE_BACKEND_URI".to_owned(), uri.to_owned())];
        env.extend(settings.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        Self {
            env,
            ..self.clone()
        }
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.run_with(args, &[])
    }

    /// `meltano ARGS` with extra environment variables (which its plugins see too).
    pub fn run_with(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        Command::new(meltano_bin())
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .envs(env.iter().copied())
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

    /// Adds real Singer plugins to the project, as local executables (no install needed):
    /// `tap-tiny` (two records and a bookmark; exits 1 when `TINY_FAIL` is set), `tap-slow`
    /// (the same after 120 s: a run that stays RUNNING) and `target-tiny` (emits the last state,
    /// as targets do), so that `meltano run` writes real rows into `runs`.
    pub fn with_pipelines(self) -> Self {
        let tap = "#!/bin/sh\n[ -n \"$TINY_SLEEP\" ] && sleep \"$TINY_SLEEP\"\n[ -n \"$TINY_FAIL\" ] && exit 1\n\
echo '{\"type\":\"SCHEMA\",\"stream\":\"users\",\"schema\":{\"properties\":{\"id\":{\"type\":\"integer\"}}},\"key_properties\":[\"id\"]}'\n\
echo '{\"type\":\"RECORD\",\"stream\":\"users\",\"record\":{\"id\":1}}'\n\
echo '{\"type\":\"RECORD\",\"stream\":\"users\",\"record\":{\"id\":2}}'\n\
echo '{\"type\":\"STATE\",\"value\":{\"bookmarks\":{\"users\":{\"id\":2}}}}'\n";
        let slow = "#!/bin/sh\nTINY_SLEEP=120 exec \"$(dirname \"$0\")/tap-tiny\"\n";
        let target =
            "#!/bin/sh\ngrep '\"type\":\"STATE\"' | tail -n 1 | sed 's/.*\"value\"://; s/}$//'\n";
        for (name, script) in [
            ("tap-tiny", tap),
            ("tap-slow", slow),
            ("target-tiny", target),
        ] {
            let path = self.dir.join(name);
            std::fs::write(&path, script).expect("write a plugin script");
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
                .expect("make a plugin executable");
        }
        let dir = self.dir.display();
        let plugins = format!(
            "plugins:\n  extractors:\n  - name: tap-tiny\n    namespace: tap_tiny\n    executable: {dir}/tap-tiny\n  - name: tap-slow\n    namespace: tap_slow\n    executable: {dir}/tap-slow\n  loaders:\n  - name: target-tiny\n    namespace: target_tiny\n    executable: {dir}/target-tiny\n"
        );
        let config = self.dir.join("meltano.yml");
        let mut text = std::fs::read_to_string(&config).expect("read meltano.yml");
        text.push_str(&plugins);
        std::fs::write(&config, text).expect("write meltano.yml");
        self
    }

    /// Starts `meltano ARGS` in a process group of its own (so the test can kill it with its
    /// plugins, as a node failure would).
    pub fn spawn(&self, args: &[&str]) -> std::process::Child {
        use std::os::unix::process::CommandExt;
        Command::new(meltano_bin())
            .args(args)
            .current_dir(&self.dir)
            .env("MELTANO_DATABASE_URI", &self.database_uri)
            .env("MELTANO_SEND_ANONYMOUS_USAGE_STATS", "false")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .process_group(0)
            .spawn()
            .expect("start meltano")
    }
}

/// SIGKILLs a process started by [`Project::spawn`] and everything it started.
pub fn kill_group(child: &mut std::process::Child) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", child.id())])
        .status();
    let _ = child.wait();
}
