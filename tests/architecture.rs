//! The shape of `src/`: import circles between files, and files and functions too long to live
//! in. The dependency graph is read from the source as rustc resolves paths
//! (tests/support/modgraph.rs).
//!
//! The layering refactor (issue 26) is under way: until it lands, these tests hold the line —
//! they fail on any circle, long file or long function that is not in the lists below, and on
//! any listed one that is gone (take it off the list), so the lists only shrink.

#[path = "support/modgraph.rs"]
mod modgraph;

use std::collections::BTreeSet;
use std::path::Path;

use modgraph::{Graph, SourceFile, function_lengths, module_of};

const MAX_FILE_LINES: usize = 800;
const MAX_FUNCTION_LINES: usize = 150;

/// Import circles on record (the files of each, by module path), to be removed.
const KNOWN_CIRCLES: &[&str] = &[];

/// Files over MAX_FILE_LINES on record (below src/).
const KNOWN_LONG_FILES: &[&str] = &[];

/// Functions over MAX_FUNCTION_LINES on record (file below src/, function).
const KNOWN_LONG_FUNCTIONS: &[&str] = &[];

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

/// Fails naming what is new (not on record) and what is gone (to be taken off the record).
fn compare(what: &str, found: BTreeSet<String>, known: &[&str]) {
    let known: BTreeSet<String> = known.iter().map(|s| s.to_string()).collect();
    let new: Vec<_> = found.difference(&known).collect();
    let gone: Vec<_> = known.difference(&found).collect();
    assert!(
        new.is_empty() && gone.is_empty(),
        "{what}: new (fix them): {new:#?}\nno longer found (take them off the list in \
         tests/architecture.rs): {gone:#?}"
    );
}

#[test]
fn no_import_circle_beyond_those_on_record() {
    let graph = Graph::new(library());
    let found = graph.circles().iter().map(|c| names(c)).collect();
    compare("import circles between files of src/", found, KNOWN_CIRCLES);
}

#[test]
fn no_long_file_or_function_beyond_those_on_record() {
    let mut files = BTreeSet::new();
    let mut functions = BTreeSet::new();
    for (relative, text) in sources() {
        if text.lines().count() > MAX_FILE_LINES {
            files.insert(relative.clone());
        }
        for (name, _, lines) in function_lengths(&text) {
            if lines > MAX_FUNCTION_LINES {
                functions.insert(format!("{relative} {name}"));
            }
        }
    }
    compare(
        &format!("files over {MAX_FILE_LINES} lines"),
        files,
        KNOWN_LONG_FILES,
    );
    compare(
        &format!("functions over {MAX_FUNCTION_LINES} lines"),
        functions,
        KNOWN_LONG_FUNCTIONS,
    );
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
fn function_lengths_count_from_fn_to_its_closing_brace() {
    let text = "fn short() {}\n\nasync fn long(x: u8) -> u8 {\n    let s = \"}\";\n    x\n}\ntrait T { fn declared(&self); }\n";
    let found: Vec<(String, usize)> = function_lengths(text)
        .into_iter()
        .map(|(name, _, lines)| (name, lines))
        .collect();
    assert_eq!(found, [("short".to_owned(), 1), ("long".to_owned(), 4)]);
}
