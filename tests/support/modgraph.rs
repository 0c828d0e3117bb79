//! The dependency graph between the files of `src/`, read from their paths as rustc resolves
//! them: `crate::`, `super::`, `self::` and child-module paths, `use` trees expanded, and a name
//! re-exported or imported by a module followed to the file that defines it (so `engine::Error`
//! is a reference to `engine/error.rs`, not to `engine/mod.rs`). A module root's `pub use` lines
//! are its facade and not references of its own. `#[cfg(test)]` modules are left out.

use std::collections::{BTreeMap, BTreeSet};

/// One source file: its module path (`["engine", "store"]`) and its text.
pub struct SourceFile {
    pub module: Vec<String>,
    /// `lib.rs` or a `mod.rs`: its children are the files below it.
    pub is_root: bool,
    pub text: String,
}

/// The module path of a file below `src/` (`engine/frameworks/mod.rs` → engine::frameworks).
pub fn module_of(relative: &str) -> (Vec<String>, bool) {
    let parts: Vec<&str> = relative.trim_end_matches(".rs").split('/').collect();
    match parts.as_slice() {
        ["lib"] => (Vec::new(), true),
        [dirs @ .., "mod"] => (dirs.iter().map(|s| s.to_string()).collect(), true),
        all => (all.iter().map(|s| s.to_string()).collect(), false),
    }
}

/// Comments, string and char literals blanked, and `#[cfg(test)]` items removed.
pub fn code_only(text: &str) -> String {
    let bytes: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        let next = bytes.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < bytes.len() && bytes[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < bytes.len() {
                if bytes[i] == '/' && bytes.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if bytes[i] == '*' && bytes.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    if bytes[i] == '\n' {
                        out.push('\n');
                    }
                    i += 1;
                }
            }
        } else if c == 'r'
            && (next == Some('"') || next == Some('#'))
            && !ident_char(prev(&bytes, i))
        {
            // Raw string: r"…" or r#"…"#.
            let mut j = i + 1;
            let mut hashes = 0;
            while bytes.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if bytes.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            j += 1;
            loop {
                match bytes.get(j) {
                    None => break,
                    Some('"') if (1..=hashes).all(|k| bytes.get(j + k) == Some(&'#')) => {
                        j += 1 + hashes;
                        break;
                    }
                    Some('\n') => out.push('\n'),
                    _ => {}
                }
                j += 1;
            }
            out.push_str("\"\"");
            i = j;
        } else if c == '"' {
            i += 1;
            while i < bytes.len() && bytes[i] != '"' {
                if bytes[i] == '\\' {
                    i += 1;
                }
                if bytes.get(i) == Some(&'\n') {
                    out.push('\n');
                }
                i += 1;
            }
            out.push_str("\"\"");
            i += 1;
        } else if c == '\'' {
            // A char literal ('a', '\n', '\u{1F}') — not a lifetime ('a without a closing quote).
            let close = if next == Some('\\') {
                (i + 2..bytes.len().min(i + 12)).find(|&j| bytes[j] == '\'')
            } else if bytes.get(i + 2) == Some(&'\'') {
                Some(i + 2)
            } else {
                None
            };
            match close {
                Some(end) => {
                    out.push_str("' '");
                    i = end + 1;
                }
                None => {
                    out.push(c);
                    i += 1;
                }
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    without_test_items(&out)
}

fn prev(chars: &[char], i: usize) -> char {
    if i == 0 { ' ' } else { chars[i - 1] }
}

fn ident_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Drops every item annotated `#[cfg(test)]` (a module's braces, or up to its `;`).
fn without_test_items(code: &str) -> String {
    let mut out = String::new();
    let mut rest = code;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let after = &rest[at..];
        let (brace, semi) = (after.find('{'), after.find(';'));
        let end = match (brace, semi) {
            (Some(b), Some(s)) if s < b => s + 1,
            (Some(b), _) => matching_brace(after, b).map_or(after.len(), |e| e + 1),
            (None, Some(s)) => s + 1,
            (None, None) => after.len(),
        };
        out.extend(after[..end].chars().filter(|&c| c == '\n'));
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// The index of the brace that closes the one at `open`.
pub fn matching_brace(text: &str, open: usize) -> Option<usize> {
    let mut depth = 0usize;
    for (i, c) in text[open..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(open + i);
                }
            }
            _ => {}
        }
    }
    None
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    PathSep,
    Open,
    Close,
    Comma,
    Star,
    Semi,
    Other,
}

fn tokens(code: &str) -> Vec<Token> {
    let chars: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if ident_char(c) {
            let start = i;
            while i < chars.len() && ident_char(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            // `r#type` and friends.
            out.push(Token::Ident(word.trim_start_matches("r#").to_owned()));
            continue;
        }
        match c {
            ':' if chars.get(i + 1) == Some(&':') => {
                out.push(Token::PathSep);
                i += 2;
                continue;
            }
            '{' => out.push(Token::Open),
            '}' => out.push(Token::Close),
            ',' => out.push(Token::Comma),
            '*' => out.push(Token::Star),
            ';' => out.push(Token::Semi),
            c if c.is_whitespace() => {}
            _ => out.push(Token::Other),
        }
        i += 1;
    }
    out
}

/// A path as written, and whether it came from a `pub … use` line.
#[derive(Debug, Clone)]
struct Written {
    segments: Vec<String>,
    glob: bool,
    in_pub_use: bool,
    in_use: bool,
}

/// Expands a use tree starting at `tokens[i]` under `prefix`; returns the index after it.
fn use_tree(
    tokens: &[Token],
    mut i: usize,
    prefix: Vec<String>,
    into: &mut Vec<(Vec<String>, bool)>,
) -> usize {
    let mut path = prefix;
    loop {
        match tokens.get(i) {
            Some(Token::Ident(word)) => {
                path.push(word.clone());
                i += 1;
                if tokens.get(i) == Some(&Token::PathSep) {
                    i += 1;
                    continue;
                }
                // `as alias` is skipped: the path is what it refers to.
                if tokens.get(i) == Some(&Token::Ident("as".into())) {
                    i += 2;
                }
                if path.last().map(String::as_str) == Some("self") {
                    path.pop();
                }
                into.push((path, false));
                return i;
            }
            Some(Token::Star) => {
                into.push((path, true));
                return i + 1;
            }
            Some(Token::Open) => {
                i += 1;
                loop {
                    match tokens.get(i) {
                        Some(Token::Close) => return i + 1,
                        Some(Token::Comma) => i += 1,
                        None => return i,
                        _ => i = use_tree(tokens, i, path.clone(), into),
                    }
                }
            }
            _ => return i,
        }
    }
}

fn written_paths(code: &str) -> Vec<Written> {
    let tokens = tokens(code);
    let mut out = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        if tokens[i] == Token::Ident("use".into()) {
            // `pub use` / `pub(crate) use`.
            let in_pub_use = tokens[..i]
                .iter()
                .rev()
                .take(5)
                .any(|t| *t == Token::Ident("pub".into()))
                && !tokens[..i]
                    .iter()
                    .rev()
                    .take(5)
                    .any(|t| *t == Token::Semi || *t == Token::Close);
            let mut expanded = Vec::new();
            let end = use_tree(&tokens, i + 1, Vec::new(), &mut expanded);
            for (segments, glob) in expanded {
                out.push(Written {
                    segments,
                    glob,
                    in_pub_use,
                    in_use: true,
                });
            }
            i = end.max(i + 1);
            continue;
        }
        if let Token::Ident(first) = &tokens[i] {
            let preceded_by_sep = i > 0 && tokens[i - 1] == Token::PathSep;
            if !preceded_by_sep && tokens.get(i + 1) == Some(&Token::PathSep) {
                let mut segments = vec![first.clone()];
                let mut j = i + 2;
                while let Some(Token::Ident(word)) = tokens.get(j) {
                    segments.push(word.clone());
                    if tokens.get(j + 1) == Some(&Token::PathSep) {
                        j += 2;
                    } else {
                        j += 1;
                        break;
                    }
                }
                if tokens.get(j) == Some(&Token::Open) && tokens.get(j - 1) == Some(&Token::PathSep)
                {
                    // A path into a group outside `use` does not occur in expressions.
                }
                out.push(Written {
                    segments,
                    glob: false,
                    in_pub_use: false,
                    in_use: false,
                });
                i = j;
                continue;
            }
        }
        i += 1;
    }
    out
}

/// The graph: each file (by module path) and the files it refers to.
pub struct Graph {
    pub files: BTreeMap<Vec<String>, SourceFile>,
    pub edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
}

/// Per module: the names its `use` lines bring in, to what absolute path, and its glob imports.
struct Scope {
    aliases: BTreeMap<String, Vec<String>>,
    globs: Vec<Vec<String>>,
}

impl Graph {
    pub fn new(files: Vec<SourceFile>) -> Self {
        let files: BTreeMap<_, _> = files.into_iter().map(|f| (f.module.clone(), f)).collect();
        // Each file's paths, with the module each was written in (an inline `mod x { … }` has
        // its own `self` and `super`).
        let codes: BTreeMap<Vec<String>, Vec<(Vec<String>, Written)>> = files
            .iter()
            .map(|(m, f)| {
                let mut paths = Vec::new();
                for (module, code) in inline_modules(m, &code_only(&f.text)) {
                    paths.extend(
                        written_paths(&code)
                            .into_iter()
                            .map(|w| (module.clone(), w)),
                    );
                }
                (m.clone(), paths)
            })
            .collect();
        let mut scopes = BTreeMap::new();
        for (module, paths) in &codes {
            let mut scope = Scope {
                aliases: BTreeMap::new(),
                globs: Vec::new(),
            };
            for (base, written) in paths.iter().filter(|(base, w)| w.in_use && base == module) {
                let Some(absolute) = absolute(&files, base, &written.segments) else {
                    continue;
                };
                if written.glob {
                    scope.globs.push(absolute);
                } else if let Some(name) = absolute.last() {
                    scope.aliases.insert(name.clone(), absolute.clone());
                }
            }
            scopes.insert(module.clone(), scope);
        }
        let mut edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
        for (module, paths) in &codes {
            let is_root = files[module].is_root;
            let targets = edges.entry(module.clone()).or_default();
            for (base, written) in paths {
                if written.in_pub_use && is_root {
                    continue;
                }
                let Some(absolute) = absolute(&files, base, &written.segments) else {
                    continue;
                };
                let target = if written.glob {
                    Some(absolute)
                } else {
                    defining_file(&files, &scopes, &absolute, 0)
                };
                if let Some(target) = target.filter(|t| t != module) {
                    targets.insert(target);
                }
            }
        }
        Graph { files, edges }
    }

    /// Every import circle, as the files in it (strongly connected components of two or more).
    pub fn circles(&self) -> Vec<Vec<Vec<String>>> {
        let nodes: Vec<&Vec<String>> = self.files.keys().collect();
        let index: BTreeMap<&Vec<String>, usize> =
            nodes.iter().enumerate().map(|(i, n)| (*n, i)).collect();
        let adjacency: Vec<Vec<usize>> = nodes
            .iter()
            .map(|n| {
                self.edges
                    .get(*n)
                    .into_iter()
                    .flatten()
                    .filter_map(|t| index.get(t).copied())
                    .collect()
            })
            .collect();
        tarjan(&adjacency)
            .into_iter()
            .filter(|c| c.len() > 1)
            .map(|c| c.into_iter().map(|i| nodes[i].clone()).collect())
            .collect()
    }
}

/// A file's code split into its own and that of each inline `mod name { … }` (nested ones too),
/// each with its module path.
fn inline_modules(module: &[String], code: &str) -> Vec<(Vec<String>, String)> {
    let mut own = String::new();
    let mut inner = Vec::new();
    let mut rest = code;
    loop {
        let found = rest.match_indices("mod ").find(|(at, _)| {
            (*at == 0 || !rest[..*at].chars().last().is_some_and(ident_char))
                && rest[at + 4..]
                    .trim_start_matches(|c: char| ident_char(c))
                    .trim_start()
                    .starts_with('{')
        });
        let Some((at, _)) = found else {
            own.push_str(rest);
            break;
        };
        let name: String = rest[at + 4..]
            .chars()
            .take_while(|&c| ident_char(c))
            .collect();
        let open = at + rest[at..].find('{').unwrap_or(0);
        let close = matching_brace(rest, open).unwrap_or(rest.len() - 1);
        own.push_str(&rest[..at]);
        let mut path = module.to_vec();
        path.push(name);
        inner.extend(inline_modules(&path, &rest[open + 1..close]));
        rest = &rest[close + 1..];
    }
    let mut out = vec![(module.to_vec(), own)];
    out.extend(inner);
    out
}

/// The absolute module path a path written in `module` names (None for other crates and std).
fn absolute(
    files: &BTreeMap<Vec<String>, SourceFile>,
    module: &[String],
    segments: &[String],
) -> Option<Vec<String>> {
    let (first, rest) = segments.split_first()?;
    // A non-root file's `super` is its parent module; a root's is its directory's parent.
    let mut base: Vec<String> = module.to_vec();
    let mut rest = rest;
    match first.as_str() {
        "crate" => base.clear(),
        "self" => {}
        "super" => {
            base.pop();
            while rest.first().map(String::as_str) == Some("super") {
                base.pop();
                rest = &rest[1..];
            }
        }
        child => {
            let mut candidate = module.to_vec();
            candidate.push(child.to_owned());
            if files.contains_key(&candidate) {
                return Some(candidate.into_iter().chain(rest.iter().cloned()).collect());
            }
            // Another crate, or a name this module imports (its `use` line is the reference).
            // The library never names itself by its crate name: a module of its own called
            // `statekeeper` (frameworks::statekeeper) is such an imported name.
            return None;
        }
    }
    Some(base.into_iter().chain(rest.iter().cloned()).collect())
}

/// The file that defines what `path` names: the longest module prefix, following a name that
/// module imports (`use`) to where it comes from.
fn defining_file(
    files: &BTreeMap<Vec<String>, SourceFile>,
    scopes: &BTreeMap<Vec<String>, Scope>,
    path: &[String],
    depth: usize,
) -> Option<Vec<String>> {
    let split = (0..=path.len())
        .rev()
        .find(|&n| files.contains_key(&path[..n]))?;
    let module = path[..split].to_vec();
    let Some(name) = path.get(split) else {
        return Some(module);
    };
    if depth > 16 {
        return Some(module);
    }
    let scope = &scopes[&module];
    if let Some(target) = scope.aliases.get(name) {
        let mut followed = target.clone();
        followed.extend(path[split + 1..].iter().cloned());
        return defining_file(files, scopes, &followed, depth + 1).or(Some(module));
    }
    Some(module)
}

/// Tarjan's strongly connected components.
fn tarjan(adjacency: &[Vec<usize>]) -> Vec<Vec<usize>> {
    struct State<'a> {
        adjacency: &'a [Vec<usize>],
        index: Vec<Option<usize>>,
        low: Vec<usize>,
        on_stack: Vec<bool>,
        stack: Vec<usize>,
        next: usize,
        out: Vec<Vec<usize>>,
    }
    fn visit(s: &mut State, v: usize) {
        s.index[v] = Some(s.next);
        s.low[v] = s.next;
        s.next += 1;
        s.stack.push(v);
        s.on_stack[v] = true;
        for &w in &s.adjacency[v] {
            match s.index[w] {
                None => {
                    visit(s, w);
                    s.low[v] = s.low[v].min(s.low[w]);
                }
                Some(iw) if s.on_stack[w] => s.low[v] = s.low[v].min(iw),
                _ => {}
            }
        }
        if Some(s.low[v]) == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack[w] = false;
                component.push(w);
                if w == v {
                    break;
                }
            }
            component.sort();
            s.out.push(component);
        }
    }
    let n = adjacency.len();
    let mut state = State {
        adjacency,
        index: vec![None; n],
        low: vec![0; n],
        on_stack: vec![false; n],
        stack: Vec::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in 0..n {
        if state.index[v].is_none() {
            visit(&mut state, v);
        }
    }
    state.out
}

/// Every function (`fn name` with a body) and its length in lines, from the `fn` line to the
/// closing brace.
pub fn function_lengths(text: &str) -> Vec<(String, usize, usize)> {
    let code = code_only_keeping_tests(text);
    let mut out = Vec::new();
    let mut search = 0;
    while let Some(found) = code[search..].find("fn ") {
        let at = search + found;
        search = at + 3;
        if at > 0 && code[..at].chars().last().is_some_and(ident_char) {
            continue;
        }
        let name: String = code[at + 3..]
            .chars()
            .take_while(|&c| ident_char(c))
            .collect();
        if name.is_empty() {
            continue;
        }
        // The body opens at the first `{` outside brackets, before any `;` there (a declaration
        // without a body ends with `;`; `[u64; 4]` in a signature does not).
        let rest = &code[at..];
        let Some(open) = body_start(rest) else {
            continue;
        };
        let Some(close) = matching_brace(rest, open) else {
            continue;
        };
        let line = code[..at].matches('\n').count() + 1;
        let lines = rest[..close].matches('\n').count() + 1;
        out.push((name, line, lines));
    }
    out
}

/// Where a function's body opens, or None for a declaration without one.
fn body_start(signature: &str) -> Option<usize> {
    let mut depth = 0usize;
    for (i, c) in signature.char_indices() {
        match c {
            '(' | '[' => depth += 1,
            ')' | ']' => depth = depth.saturating_sub(1),
            '{' if depth == 0 => return Some(i),
            ';' if depth == 0 => return None,
            _ => {}
        }
    }
    None
}

/// Like [`code_only`], keeping test modules (their functions count too).
fn code_only_keeping_tests(text: &str) -> String {
    code_only(&text.replace("#[cfg(test)]", "#[cfg(tests)]"))
}
