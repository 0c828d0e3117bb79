//! Commands measured as child processes under GNU time, so that the framework's own CLI and
//! ours are measured the same way: wall time (median of the runs) and peak resident memory
//! (largest of the runs).

use std::path::Path;
use std::time::Instant;

use super::BenchResult;

/// One command's measurements.
#[derive(Clone, Copy)]
pub(crate) struct Measured {
    pub(crate) seconds: f64,
    pub(crate) peak_mib: f64,
}

/// Both sides are measured by GNU time: fail early, saying how to get it.
pub(crate) fn require_time() -> BenchResult<()> {
    if Path::new("/usr/bin/time").exists() {
        Ok(())
    } else {
        Err(
            "/usr/bin/time is missing: install the Debian package `time` (apt-get install time)"
                .into(),
        )
    }
}

/// `/usr/bin/time -f "%M" -o FILE program …` in `dir`, with extra environment variables.
pub(crate) fn timed_command(
    program: &str,
    dir: &Path,
    env: &[(&str, &str)],
) -> std::process::Command {
    let mut command = std::process::Command::new("/usr/bin/time");
    command
        .args(["-f", "%M", "-o"])
        .arg(dir.join(".time"))
        .arg(program)
        .current_dir(dir)
        .envs(env.iter().copied());
    command
}

/// The wall time is taken here (GNU time's `%e` counts in steps of 10 ms, too coarse for
/// commands of a few dozen); the peak RSS from GNU time.
pub(crate) fn run_timed(command: &mut std::process::Command) -> BenchResult<Measured> {
    let started = Instant::now();
    let out = command.output()?;
    let seconds = started.elapsed().as_secs_f64();
    let dir = command
        .get_current_dir()
        .ok_or("timed commands run in the project directory")?
        .to_owned();
    check(out, "a timed command")?;
    let text = std::fs::read_to_string(dir.join(".time"))?;
    let kib: f64 = text.trim().parse()?;
    Ok(Measured {
        seconds,
        peak_mib: kib / 1024.0,
    })
}

/// `repeat` runs of the command `command` builds (anew for each run, so it can clean up first).
pub(crate) async fn measure(
    repeat: u32,
    mut command: impl FnMut() -> std::process::Command,
) -> BenchResult<Measured> {
    let mut runs = Vec::new();
    for _ in 0..repeat {
        runs.push(run_timed(&mut command())?);
    }
    Ok(summarize(&runs))
}

/// The median time and the largest peak.
pub(crate) fn summarize(runs: &[Measured]) -> Measured {
    let mut seconds: Vec<f64> = runs.iter().map(|m| m.seconds).collect();
    seconds.sort_by(f64::total_cmp);
    Measured {
        seconds: seconds.get(seconds.len() / 2).copied().unwrap_or(0.0),
        peak_mib: runs.iter().map(|m| m.peak_mib).fold(0.0, f64::max),
    }
}

/// A failed command is an error carrying both of its outputs.
pub(crate) fn check(out: std::process::Output, what: &str) -> BenchResult<()> {
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
        .into())
    }
}
