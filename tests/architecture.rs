//! The shape of `src/`: its layers (a file refers only to its own layer and those below), no
//! import circle between files, and no file or function too long to live in. The dependency
//! graph is read from the source as rustc resolves paths (tests/support/modgraph.rs); the layer
//! table below is the one docs/architecture.md shows, and a test keeps the two equal.

#[path = "support/modgraph.rs"]
mod modgraph;

use std::collections::BTreeMap;
use std::path::Path;

use modgraph::{Graph, SourceFile, function_lengths, module_of};

const MAX_FILE_LINES: usize = 800;
const MAX_FUNCTION_LINES: usize = 150;

/// The layers of `src/`, lowest first. Every file is in exactly one; a pattern names a module
/// (`crate` is lib.rs) and `*` stands for any one path segment. A file may refer to files of its
/// own layer or below, never above: framework code never names the operations that dispatch to
/// it, and the engine never names the operator.
const LAYERS: &[(&str, &[&str])] = &[
    (
        "engine toolkit",
        &[
            "engine::error",
            "engine::identifier",
            "engine::connection",
            "engine::catalog",
            "engine::json",
            "engine::manifest",
            "engine::jsonscan",
            "engine::io",
            "engine::destination",
            "engine::failpoint",
            "engine::migrations",
            "engine::words",
            "engine::encryption",
        ],
    ),
    (
        "framework vocabulary",
        &[
            "engine::framework",
            "engine::frameworks",
            "engine::frameworks::*::profile",
        ],
    ),
    (
        "backups, requests and reports",
        &[
            "engine::backup",
            "engine::reports",
            "engine::transfer",
            "engine::janitor_report",
            "engine::retention",
            "engine::job_report",
        ],
    ),
    ("store core", &["engine::store"]),
    (
        "framework hooks and checks",
        &[
            "engine::frameworks::*",
            "engine::hooks",
            "engine::guards",
            "engine::tableset",
        ],
    ),
    (
        "format building blocks",
        &["engine::format", "engine::format::*"],
    ),
    (
        "formats, janitors and migrations of each framework",
        &[
            "engine::frameworks::*::export",
            "engine::frameworks::*::import",
            "engine::frameworks::*::import::*",
            "engine::frameworks::*::janitor",
            "engine::frameworks::*::lifecycle",
            "engine::frameworks::*::intervals",
            "engine::frameworks::*::environments",
            "engine::exact",
        ],
    ),
    (
        "operations",
        &[
            "engine::lifecycle",
            "engine::export",
            "engine::import",
            "engine::janitor",
            "engine::plan",
            "engine::run",
            "engine::meltano_backend",
            "engine::verify",
            "engine::virtual_layer",
            "engine::diff",
            "engine::diff::*",
            "engine::generator",
        ],
    ),
    ("engine facade", &["engine"]),
    ("resource types", &["api", "api::*"]),
    (
        "operator toolkit",
        &[
            "controller::events",
            "controller::conditions",
            "controller::telemetry",
            "controller::schedule",
            "controller::pool_cache",
            "controller::context",
            "controller::access",
            "controller::runner",
            "controller::wakeups",
        ],
    ),
    (
        "reconcilers",
        &[
            "controller::state_store",
            "controller::store_janitor",
            "controller::store_backups",
            "controller::store_views",
            "controller::state_export",
            "controller::state_export::*",
            "controller::state_migration",
            "controller::state_migration::*",
        ],
    ),
    ("operator", &["controller", "controller::operator"]),
    ("command line", &["cli", "cli::*"]),
    ("crate root", &["crate"]),
];

/// Every `.rs` file below src/, by its path relative to src/.
fn sources() -> Vec<(String, String)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = Vec::new();
    let mut dirs = vec![src.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("read src/").flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let relative = path.strip_prefix(&src).expect("below src/");
                let text = std::fs::read_to_string(&path).expect("read a source file");
                out.push((relative.to_string_lossy().into_owned(), text));
            }
        }
    }
    out.sort();
    out
}

/// The library's files (the binaries, src/main.rs and src/bin/, sit on top of it).
fn library() -> Vec<SourceFile> {
    sources()
        .into_iter()
        .filter(|(relative, _)| relative != "main.rs" && !relative.starts_with("bin/"))
        .map(|(relative, text)| {
            let (module, is_root) = module_of(&relative);
            SourceFile {
                module,
                is_root,
                text,
            }
        })
        .collect()
}

fn names(circle: &[Vec<String>]) -> String {
    let mut files: Vec<String> = circle.iter().map(|m| m.join("::")).collect();
    files.sort();
    files.join(" ")
}

fn pattern_matches(pattern: &str, module: &[String]) -> bool {
    if pattern == "crate" {
        return module.is_empty();
    }
    let parts: Vec<&str> = pattern.split("::").collect();
    parts.len() == module.len() && parts.iter().zip(module).all(|(p, m)| *p == "*" || p == m)
}

/// The layer of each module, by its index in `layers`; modules in none or in several are errors.
fn layer_of(
    layers: &[(&str, &[&str])],
    modules: impl Iterator<Item = Vec<String>>,
) -> Result<BTreeMap<Vec<String>, usize>, Vec<String>> {
    let mut placed = BTreeMap::new();
    let mut errors = Vec::new();
    for module in modules {
        let found: Vec<usize> = (0..layers.len())
            .filter(|&i| layers[i].1.iter().any(|p| pattern_matches(p, &module)))
            .collect();
        match found.as_slice() {
            [layer] => {
                placed.insert(module, *layer);
            }
            [] => errors.push(format!("{} is in no layer", module.join("::"))),
            _ => errors.push(format!(
                "{} is in several layers: {:?}",
                module.join("::"),
                found.iter().map(|&i| layers[i].0).collect::<Vec<_>>()
            )),
        }
    }
    if errors.is_empty() {
        Ok(placed)
    } else {
        Err(errors)
    }
}

/// Every reference from a file to a file of a higher layer, as `from (layer) → to (layer)`.
fn upward_references(
    graph: &Graph,
    layers: &[(&str, &[&str])],
) -> Result<Vec<String>, Vec<String>> {
    let placed = layer_of(layers, graph.edges.keys().cloned())?;
    let mut upward = Vec::new();
    for (from, tos) in &graph.edges {
        for to in tos {
            let (low, high) = (placed[to], placed[from]);
            if low > high {
                upward.push(format!(
                    "{} ({}) → {} ({})",
                    from.join("::"),
                    layers[high].0,
                    to.join("::"),
                    layers[low].0
                ));
            }
        }
    }
    Ok(upward)
}

#[test]
fn every_file_is_in_one_layer_and_refers_only_downward() {
    let graph = Graph::new(library());
    match upward_references(&graph, LAYERS) {
        Ok(upward) => assert!(
            upward.is_empty(),
            "references up the layers (move the shared piece down, or the caller up): {upward:#?}"
        ),
        Err(unplaced) => panic!(
            "place each file in one layer of LAYERS (tests/architecture.rs) and of \
             docs/architecture.md: {unplaced:#?}"
        ),
    }
}

/// docs/architecture.md shows the same table: one row per layer, lowest first, naming the same
/// modules, and a sentence for every module of `src/`.
#[test]
fn the_layer_table_in_the_docs_is_this_one() {
    let docs =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/architecture.md"))
            .expect("read docs/architecture.md");
    let rows: Vec<(String, Vec<String>)> = docs
        .lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line
                .trim()
                .trim_matches('|')
                .split('|')
                .map(str::trim)
                .collect();
            match cells.as_slice() {
                [number, name, modules, ..] if number.parse::<usize>().is_ok() => Some((
                    name.to_string(),
                    modules
                        .split(',')
                        .map(|m| m.trim().trim_matches('`').to_string())
                        .collect(),
                )),
                _ => None,
            }
        })
        .collect();
    let expected: Vec<(String, Vec<String>)> = LAYERS
        .iter()
        .map(|(name, patterns)| {
            (
                name.to_string(),
                patterns.iter().map(|p| p.to_string()).collect(),
            )
        })
        .collect();
    assert_eq!(
        rows, expected,
        "the layer table of docs/architecture.md differs from LAYERS"
    );
    let undescribed: Vec<String> = library()
        .iter()
        .map(|f| {
            if f.module.is_empty() {
                "crate".to_owned()
            } else {
                f.module.join("::")
            }
        })
        .filter(|m| !docs.contains(&format!("- `{m}`")))
        .collect();
    assert!(
        undescribed.is_empty(),
        "docs/architecture.md has no \"- `module`: …\" line for: {undescribed:#?}"
    );
}

#[test]
fn an_upward_reference_and_an_unplaced_file_are_found() {
    let files = vec![
        file("lib.rs", "pub mod low; pub mod high; pub mod stray;\n"),
        file("low.rs", "use crate::high::Top;\npub struct Base;\n"),
        file("high.rs", "pub struct Top;\n"),
        file("stray.rs", "pub struct Lost;\n"),
    ];
    let graph = Graph::new(files);
    let layers: &[(&str, &[&str])] = &[
        ("low", &["low"]),
        ("high", &["high", "crate"]),
        ("all", &["*"]),
    ];
    assert_eq!(
        upward_references(&graph, layers),
        Err(vec![
            "high is in several layers: [\"high\", \"all\"]".to_owned(),
            "low is in several layers: [\"low\", \"all\"]".to_owned(),
        ])
    );
    let layers: &[(&str, &[&str])] = &[("low", &["low"]), ("high", &["high", "crate"])];
    assert_eq!(
        upward_references(&graph, layers),
        Err(vec!["stray is in no layer".to_owned()])
    );
    let layers: &[(&str, &[&str])] = &[("low", &["low", "stray"]), ("high", &["high", "crate"])];
    assert_eq!(
        upward_references(&graph, layers),
        Ok(vec!["low (low) → high (high)".to_owned()])
    );
}

#[test]
fn no_import_circle() {
    let graph = Graph::new(library());
    let circles: Vec<String> = graph.circles().iter().map(|c| names(c)).collect();
    assert!(
        circles.is_empty(),
        "import circles between files of src/ (move what both need into a lower file): \
         {circles:#?}"
    );
}

#[test]
fn no_file_or_function_too_long_to_live_in() {
    let mut long = Vec::new();
    for (relative, text) in sources() {
        let lines = text.lines().count();
        if lines > MAX_FILE_LINES {
            long.push(format!(
                "{relative}: {lines} lines (at most {MAX_FILE_LINES})"
            ));
        }
        for (name, _, lines) in function_lengths(&text) {
            if lines > MAX_FUNCTION_LINES {
                long.push(format!(
                    "{relative} {name}: {lines} lines (at most {MAX_FUNCTION_LINES})"
                ));
            }
        }
    }
    assert!(long.is_empty(), "split these into named parts: {long:#?}");
}

fn file(path: &str, text: &str) -> SourceFile {
    let (module, is_root) = module_of(path);
    SourceFile {
        module,
        is_root,
        text: text.to_owned(),
    }
}

#[test]
fn the_analysis_finds_a_deliberate_circle_and_only_that() {
    // a → b through a re-export of the crate root, b → a through `super`, c → a only.
    let files = vec![
        file(
            "lib.rs",
            "pub mod a; pub mod b; pub mod c;\npub use b::Thing;\n",
        ),
        file("a.rs", "use crate::Thing;\npub struct Other;\n"),
        file(
            "b.rs",
            "// use crate::c::Nothing; (a comment is no reference)\n\
             pub struct Thing;\nfn f() -> super::a::Other { todo!() }\n",
        ),
        file(
            "c.rs",
            "use crate::a::Other;\nconst S: &str = \"crate::b::Thing\";\n",
        ),
    ];
    let graph = Graph::new(files);
    let circles: Vec<String> = graph.circles().iter().map(|c| names(c)).collect();
    assert_eq!(circles, ["a b"]);
    let c = vec!["c".to_owned()];
    assert_eq!(
        graph.edges[&c]
            .iter()
            .map(|m| m.join("::"))
            .collect::<Vec<_>>(),
        ["a"],
        "a string and a comment are no references; c refers to a alone"
    );
}

#[test]
fn no_circle_where_dependencies_run_one_way() {
    let files = vec![
        file("lib.rs", "pub mod low; pub mod high;\n"),
        file("low/mod.rs", "mod inner;\npub use inner::Base;\n"),
        file("low/inner.rs", "pub struct Base;\n"),
        file(
            "high.rs",
            "use crate::low::Base;\nmod nested { use super::super::low::Base; }\n",
        ),
    ];
    let graph = Graph::new(files);
    assert!(graph.circles().is_empty());
    let high = vec!["high".to_owned()];
    assert_eq!(
        graph.edges[&high]
            .iter()
            .map(|m| m.join("::"))
            .collect::<Vec<_>>(),
        ["low::inner"],
        "a re-exported name is a reference to the file that defines it"
    );
}

#[test]
fn a_module_named_like_the_crate_is_a_module_and_not_the_crate() {
    // frameworks::statekeeper, imported by name: its uses are references to it, not to lib.rs.
    let files = vec![
        file("lib.rs", "pub mod fw; pub mod ops;\n"),
        file("fw/mod.rs", "pub mod statekeeper;\n"),
        file("fw/statekeeper.rs", "pub fn init() {}\n"),
        file(
            "ops.rs",
            "use crate::fw::statekeeper;\nfn f() { statekeeper::init(); }\n",
        ),
    ];
    let graph = Graph::new(files);
    let ops = vec!["ops".to_owned()];
    assert_eq!(
        graph.edges[&ops]
            .iter()
            .map(|m| m.join("::"))
            .collect::<Vec<_>>(),
        ["fw::statekeeper"]
    );
}

#[test]
fn function_lengths_count_from_fn_to_its_closing_brace() {
    let text = "fn short() {}\n\nasync fn long(x: u8) -> u8 {\n    let s = \"}\";\n    x\n}\ntrait T { fn declared(&self); }\nfn sized(parts: [u64; 4]) -> [u8; 2] {\n    [0; 2]\n}\n";
    let found: Vec<(String, usize)> = function_lengths(text)
        .into_iter()
        .map(|(name, _, lines)| (name, lines))
        .collect();
    assert_eq!(
        found,
        [
            ("short".to_owned(), 1),
            ("long".to_owned(), 4),
            ("sized".to_owned(), 3)
        ]
    );
}
