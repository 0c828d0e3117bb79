//! The public interface, byte for byte: every `--help` of the CLI (each subcommand, found by
//! walking the `Commands:` lists) and `statekeeper crd`, against `tests/fixtures/interface.txt`.
//! A refactoring must leave it unchanged; a deliberate change regenerates the file with
//! `STATEKEEPER_BLESS=1 cargo test --test interface` and shows up in review as its diff.

use std::path::Path;
use std::process::Command;

/// The output of the CLI with `args`, which must succeed.
fn run(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_statekeeper"))
        .args(args)
        .env_remove("STATEKEEPER_DATABASE_URL")
        .env("COLUMNS", "100")
        .output()
        .expect("run statekeeper");
    assert!(
        out.status.success(),
        "statekeeper {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// The subcommands a help text lists under `Commands:` (without `help`).
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|line| line.trim() != "Commands:")
        .skip(1)
        .take_while(|line| !line.trim().is_empty())
        .filter(|line| line.starts_with("  ") && !line.starts_with("   "))
        .filter_map(|line| line.split_whitespace().next().map(str::to_owned))
        .filter(|name| name != "help")
        .collect()
}

/// Every help text, depth first, each under a header naming its command line.
fn help_tree(path: &mut Vec<String>, into: &mut String) {
    let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
    args.push("--help");
    let help = run(&args);
    into.push_str(&format!("=== statekeeper {}\n{help}\n", args.join(" ")));
    for name in subcommands(&help) {
        path.push(name);
        help_tree(path, into);
        path.pop();
    }
}

#[test]
fn the_cli_and_the_crds_are_what_the_fixture_records() {
    let mut actual = String::new();
    help_tree(&mut Vec::new(), &mut actual);
    actual.push_str("=== statekeeper crd\n");
    actual.push_str(&run(&["crd"]));
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/interface.txt");
    if std::env::var_os("STATEKEEPER_BLESS").is_some() {
        std::fs::write(&fixture, &actual).expect("write the fixture");
        return;
    }
    let expected = std::fs::read_to_string(&fixture).expect("read tests/fixtures/interface.txt");
    if actual != expected {
        let first = actual
            .lines()
            .zip(expected.lines())
            .position(|(a, e)| a != e)
            .unwrap_or_else(|| actual.lines().count().min(expected.lines().count()));
        panic!(
            "the public interface changed at line {} (STATEKEEPER_BLESS=1 regenerates the fixture \
             when the change is meant):\n  now:    {:?}\n  before: {:?}",
            first + 1,
            actual.lines().nth(first),
            expected.lines().nth(first)
        );
    }
}

#[test]
fn the_walk_finds_subcommands_so_the_comparison_covers_them() {
    let help = run(&["--help"]);
    assert_eq!(subcommands(&help), ["state", "operator", "crd"]);
    assert!(subcommands(&run(&["state", "--help"])).contains(&"import".to_owned()));
}
