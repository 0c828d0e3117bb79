//! Named crash points for the crash tests (tests/crash.rs, docs/reliability.md). Compiled in only
//! with the `failpoints` feature, which the test command enables and release builds never do:
//! without it, [`hit`] is an empty inline function.
//!
//! With the feature, `STATEKEEPER_FAILPOINT=NAME` (or `NAME@N`, the N-th time it is reached)
//! SIGKILLs the process when execution reaches that point, as a node failure would: no
//! destructor, no rollback message, the database sees the connection vanish.
//! `STATEKEEPER_FAILPOINT_TRACE=FILE` appends the name of every point reached, one per line, so
//! a harness can find where an operation can be killed.

#[cfg(feature = "failpoints")]
pub fn hit(name: &str) {
    use std::io::Write as _;
    use std::sync::Mutex;
    static HITS: Mutex<Vec<(String, u32)>> = Mutex::new(Vec::new());

    if let Ok(trace) = std::env::var("STATEKEEPER_FAILPOINT_TRACE")
        && let Ok(mut file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(trace)
    {
        let _ = writeln!(file, "{name}");
    }
    let Ok(wanted) = std::env::var("STATEKEEPER_FAILPOINT") else {
        return;
    };
    let (wanted, nth) = match wanted.split_once('@') {
        Some((point, n)) => (point.to_owned(), n.parse().unwrap_or(1)),
        None => (wanted, 1),
    };
    if wanted != name {
        return;
    }
    let count = {
        let mut hits = HITS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match hits.iter_mut().find(|(point, _)| point == name) {
            Some((_, count)) => {
                *count += 1;
                *count
            }
            None => {
                hits.push((name.to_owned(), 1));
                1
            }
        }
    };
    if count == nth {
        eprintln!("failpoint {name}@{nth}: killing the process");
        // SAFETY: kill(2) on our own pid with a valid signal number.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_name: &str) {}
