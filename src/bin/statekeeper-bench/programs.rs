//! The programs measured against ours that are not PostgreSQL's: the pinned SQLMesh and Meltano,
//! and the `statekeeper` binary the comparisons run as a command like theirs.

use super::BenchResult;

/// A pinned Python tool (`sqlmesh`, `meltano`) in its virtualenv, as the test suite installs it
/// (tests/fixtures/<tool>-requirements.txt, by scripts/python-env.sh; Meltano in a virtualenv of
/// its own).
pub(crate) async fn install_python_tool(tool: &str) -> BenchResult<String> {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut command = tokio::process::Command::new("bash");
    command.args([
        &format!("{root}/scripts/python-env.sh"),
        "-r",
        &format!("{root}/tests/fixtures/{tool}-requirements.txt"),
    ]);
    if tool == "meltano" {
        let cache = std::env::var("XDG_CACHE_HOME").unwrap_or_else(|_| {
            format!(
                "{}/.cache",
                std::env::var("HOME").unwrap_or_else(|_| "/tmp".into())
            )
        });
        command.env(
            "STATEKEEPER_VENV",
            format!("{cache}/statekeeper/venv-meltano"),
        );
    }
    let out = command.output().await?;
    if !out.status.success() {
        return Err(format!(
            "cannot install {tool}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    let python = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    Ok(std::path::Path::new(&python)
        .with_file_name(tool)
        .to_string_lossy()
        .into_owned())
}

/// A binary built beside this one (`statekeeper`, from the same `cargo build`).
pub(crate) fn sibling_binary(name: &str) -> BenchResult<std::path::PathBuf> {
    let path = std::env::current_exe()?.with_file_name(name);
    if path.exists() {
        Ok(path)
    } else {
        Err(format!(
            "{} not found: build it too (cargo build --release --bins)",
            path.display()
        )
        .into())
    }
}
