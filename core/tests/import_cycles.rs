//! No import cycles between the files of the extension (`src/`) or of this crate
//! (`core/src/`), and no file of the extension importing from a layer above its own.
//!
//! A file imports another when it names a path into it: `use crate::a::b::f`, `crate::a::b::f()`
//! inline, `super::x`, `self::x`, use trees (`use crate::a::{b, c::d}`), or, in a module with
//! child modules, `child::x`. Each path is resolved to the deepest module file it names (a
//! folder's `mod.rs` for the folder itself); a file's `#[cfg(test)]` part, comments and string
//! literals are not read, and `lib.rs` (which only declares modules) is no target. The test
//! fails naming every cycle with the names that tie it, file by file. The layers are those of
//! CONTRIBUTING.md ("Layout and layers"), listed in `LAYERS`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Module = Vec<String>;

/// Every `.rs` file under `root`, by module path (`a/b.rs` and `a/b/mod.rs` are `a::b`).
fn modules(root: &Path) -> BTreeMap<Module, PathBuf> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("source directory is readable") {
            let path = entry.expect("directory entry is readable").path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(root).expect("file is under the root").with_extension("");
            let mut module: Module = rel.iter().map(|s| s.to_string_lossy().into_owned()).collect();
            if module.last().is_some_and(|s| s == "mod" || s == "lib" || s == "main") {
                module.pop();
            }
            out.insert(module, path);
        }
    }
    out
}

/// The code of a file without comments, string and char literals, and without its
/// `#[cfg(test)]` part (everything from the first such attribute on).
fn code_of(text: &str) -> String {
    let text = match [text.find("#[cfg(test)]"), text.find("#[cfg(any(test")].into_iter().flatten().min() {
        Some(at) => &text[..at],
        None => text,
    };
    let b = text.as_bytes();
    let mut out = String::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let mut depth = 0;
                while i < b.len() {
                    if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                        depth += 1;
                        i += 2;
                    } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
                out.push(' ');
            }
            b'r' if (b.get(i + 1) == Some(&b'"') || b.get(i + 1) == Some(&b'#'))
                && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_')) =>
            {
                // A raw string: r"..." or r#"..."#.
                let mut j = i + 1;
                let mut hashes = 0;
                while b.get(j) == Some(&b'#') {
                    hashes += 1;
                    j += 1;
                }
                if b.get(j) != Some(&b'"') {
                    out.push('r');
                    i += 1;
                    continue;
                }
                j += 1;
                let close: Vec<u8> = std::iter::once(b'"').chain(std::iter::repeat_n(b'#', hashes)).collect();
                while j < b.len() && !b[j..].starts_with(&close) {
                    j += 1;
                }
                i = j + close.len();
                out.push_str("\"\"");
            }
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
                out.push_str("\"\"");
            }
            b'\'' if b.get(i + 1) == Some(&b'\\') => {
                i += 2;
                while i < b.len() && b[i] != b'\'' {
                    i += 1;
                }
                i += 1;
                out.push_str("' '");
            }
            b'\'' if b.get(i + 2) == Some(&b'\'') => {
                i += 3;
                out.push_str("' '");
            }
            c => {
                out.push(c as char);
                i += 1;
            }
        }
    }
    out
}

#[derive(Debug, PartialEq)]
enum Token {
    Ident(String),
    PathSep,
    Open,
    Close,
    Comma,
    Star,
    Other,
}

fn tokens(code: &str) -> Vec<Token> {
    let b = code.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_alphabetic() || c == b'_' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            out.push(Token::Ident(code[start..i].to_string()));
            continue;
        }
        i += 1;
        out.push(match c {
            b':' if b.get(i) == Some(&b':') => {
                i += 1;
                Token::PathSep
            }
            b'{' => Token::Open,
            b'}' => Token::Close,
            b',' => Token::Comma,
            b'*' => Token::Star,
            c if c.is_ascii_whitespace() => continue,
            _ => Token::Other,
        });
    }
    out
}

/// Reads a path (or use tree) starting at `tokens[*i]`, an identifier: every path it names,
/// prefixed with `prefix`.
fn read_paths(tokens: &[Token], i: &mut usize, prefix: Vec<String>, out: &mut Vec<Vec<String>>) {
    let mut path = prefix;
    loop {
        match tokens.get(*i) {
            Some(Token::Ident(name)) => {
                path.push(name.clone());
                *i += 1;
            }
            Some(Token::Star) => {
                *i += 1;
                break;
            }
            Some(Token::Open) => {
                *i += 1;
                loop {
                    match tokens.get(*i) {
                        Some(Token::Close) => {
                            *i += 1;
                            break;
                        }
                        Some(Token::Comma) => *i += 1,
                        Some(Token::Ident(_)) | Some(Token::Star) | Some(Token::Open) => {
                            read_paths(tokens, i, path.clone(), out)
                        }
                        None => break,
                        Some(_) => *i += 1,
                    }
                }
                return;
            }
            _ => break,
        }
        if tokens.get(*i) == Some(&Token::PathSep) {
            *i += 1;
        } else {
            break;
        }
    }
    // `x as y`: only `x` names something.
    if matches!(tokens.get(*i), Some(Token::Ident(a)) if a == "as") {
        *i += 2;
    }
    out.push(path);
}

/// The modules that the file of `module` imports, with the names it takes from each.
fn imports(module: &Module, code: &str, all: &BTreeMap<Module, PathBuf>) -> BTreeMap<Module, BTreeSet<String>> {
    let tokens = tokens(code);
    let children: BTreeSet<&str> = all
        .keys()
        .filter(|m| m.len() == module.len() + 1 && m.starts_with(module))
        .map(|m| m[module.len()].as_str())
        .collect();
    let mut paths = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        let after_sep = i > 0 && tokens[i - 1] == Token::PathSep;
        let starts = match &tokens[i] {
            Token::Ident(name) if !after_sep && tokens.get(i + 1) == Some(&Token::PathSep) => {
                matches!(name.as_str(), "crate" | "super" | "self") || children.contains(name.as_str())
            }
            _ => false,
        };
        if starts {
            read_paths(&tokens, &mut i, Vec::new(), &mut paths);
        } else {
            i += 1;
        }
    }
    let mut out: BTreeMap<Module, BTreeSet<String>> = BTreeMap::new();
    for path in paths {
        let mut resolved: Vec<String> = Vec::new();
        for (n, seg) in path.iter().enumerate() {
            match (n, seg.as_str()) {
                (0, "crate") => {}
                (0, "self") => resolved = module.clone(),
                (0, "super") => {
                    resolved = module.clone();
                    resolved.pop();
                }
                (_, "super") => {
                    resolved.pop();
                }
                (0, child) => {
                    resolved = module.clone();
                    resolved.push(child.to_string());
                }
                (_, name) => resolved.push(name.to_string()),
            }
        }
        let Some(depth) = (1..=resolved.len()).rev().find(|&d| all.contains_key(&resolved[..d])) else {
            continue;
        };
        let target = resolved[..depth].to_vec();
        if &target == module {
            continue;
        }
        let name = resolved.get(depth).cloned().unwrap_or_else(|| "*".to_string());
        out.entry(target).or_default().insert(name);
    }
    out
}

/// The strongly connected components of more than one module (Tarjan).
fn cycles(graph: &BTreeMap<Module, BTreeMap<Module, BTreeSet<String>>>) -> Vec<Vec<Module>> {
    struct State<'a> {
        graph: &'a BTreeMap<Module, BTreeMap<Module, BTreeSet<String>>>,
        index: BTreeMap<&'a Module, usize>,
        low: BTreeMap<&'a Module, usize>,
        stack: Vec<&'a Module>,
        on_stack: BTreeSet<&'a Module>,
        found: Vec<Vec<Module>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a Module) {
        let n = s.index.len();
        s.index.insert(v, n);
        s.low.insert(v, n);
        s.stack.push(v);
        s.on_stack.insert(v);
        let graph = s.graph;
        for w in graph.get(v).into_iter().flat_map(|e| e.keys()) {
            if !s.index.contains_key(w) {
                visit(s, w);
                let low = s.low[v].min(s.low[w]);
                s.low.insert(v, low);
            } else if s.on_stack.contains(w) {
                let low = s.low[v].min(s.index[w]);
                s.low.insert(v, low);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                component.push(w.clone());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                s.found.push(component);
            }
        }
    }
    let mut state = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for v in graph.keys() {
        if !state.index.contains_key(v) {
            visit(&mut state, v);
        }
    }
    state.found
}

fn graph_of(root: &Path) -> BTreeMap<Module, BTreeMap<Module, BTreeSet<String>>> {
    let all = modules(root);
    all.iter()
        .map(|(module, path)| {
            let text = std::fs::read_to_string(path).expect("source file is readable");
            let mut deps = imports(module, &code_of(&text), &all);
            deps.remove(&Vec::new()); // lib.rs
            (module.clone(), deps)
        })
        .collect()
}

fn report(root: &Path) -> String {
    let graph = graph_of(root);
    let name = |m: &Module| if m.is_empty() { "lib".to_string() } else { m.join("::") };
    let mut text = String::new();
    for cycle in cycles(&graph) {
        text.push_str(&format!("cycle of {} modules under {}:\n", cycle.len(), root.display()));
        for a in &cycle {
            for (b, names) in &graph[a] {
                if cycle.contains(b) {
                    let names: Vec<&str> = names.iter().map(String::as_str).collect();
                    text.push_str(&format!("  {} -> {}: {}\n", name(a), name(b), names.join(", ")));
                }
            }
        }
    }
    text
}

/// The layer of each top-level module of `src/` (see CONTRIBUTING.md, "Layout and layers"): a
/// file imports only from its own layer or lower ones. A module not listed here is not checked.
const LAYERS: &[(u8, &[&str])] = &[
    (
        2,
        &[
            "error",
            "sql",
            "guc",
            "ddl_settings",
            "pg_compat",
            "pg_list",
            "notices",
            "libpq",
            "peer_calls",
            "shmem",
            "run_as",
            "session",
            "catalog",
            "node",
            "commit_time_cache",
            "marker_writes",
        ],
    ),
    (
        3,
        &[
            "log",
            "consumers",
            "capture",
            "row_versions",
            "conflicts",
            "ddl_history",
            "peer_ddl",
            "large_objects",
            "sequences",
            "tables",
            "retention",
        ],
    ),
    (4, &["worker", "join", "exceptions"]),
    (5, &["peers", "compare", "sync", "status", "utility_hook", "setval"]),
];

fn layer_of(module: &Module) -> Option<u8> {
    let top = module.first()?;
    LAYERS.iter().find(|(_, names)| names.contains(&top.as_str())).map(|(layer, _)| *layer)
}

#[test]
fn no_file_imports_from_a_higher_layer() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../src");
    let mut found = String::new();
    for (module, deps) in graph_of(&root) {
        let Some(own) = layer_of(&module) else { continue };
        for (target, names) in deps {
            if let Some(theirs) = layer_of(&target).filter(|&l| l > own) {
                let names: Vec<&str> = names.iter().map(String::as_str).collect();
                found.push_str(&format!(
                    "  {} (layer {own}) -> {} (layer {theirs}): {}\n",
                    module.join("::"),
                    target.join("::"),
                    names.join(", ")
                ));
            }
        }
    }
    assert!(found.is_empty(), "imports from a higher layer (move what they use down):\n{found}");
}

#[test]
fn the_extension_has_no_import_cycle() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../src");
    let found = report(&root);
    assert!(found.is_empty(), "import cycles (move what ties them to the lower layer):\n{found}");
}

#[test]
fn the_core_crate_has_no_import_cycle() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let found = report(&root);
    assert!(found.is_empty(), "import cycles (move what ties them to the lower layer):\n{found}");
}

/// The check itself: a cycle through a use tree, an inline path, `super` and a child module
/// is found; comments and strings are not read.
#[test]
fn a_cycle_is_found() {
    let dir = std::env::temp_dir().join(format!("trompe-import-cycles-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("a")).unwrap();
    std::fs::write(dir.join("lib.rs"), "pub mod a; pub mod b; pub mod c;").unwrap();
    std::fs::write(dir.join("a/mod.rs"), "pub mod inner;\nfn f() { inner::g(); }").unwrap();
    std::fs::write(dir.join("a/inner.rs"), "use crate::{b::{x, y as z}};\npub fn g() {}").unwrap();
    std::fs::write(dir.join("b.rs"), "// crate::c::no\nfn x() { let _ = \"crate::c::no\"; crate::c::h(); }").unwrap();
    std::fs::write(dir.join("c.rs"), "use super::a::inner::g;\npub fn h() {}").unwrap();
    let found = report(&dir);
    assert!(found.contains("a::inner -> b: x, y"), "{found}");
    assert!(found.contains("b -> c: h"), "{found}");
    assert!(found.contains("c -> a::inner: g"), "{found}");
    assert!(!found.contains("-> a: "), "a::inner does not import a: {found}");
    std::fs::write(dir.join("c.rs"), "// use super::a::inner::g;\npub fn h() {}").unwrap();
    assert_eq!(report(&dir), "", "a cycle only through a comment is none");
    std::fs::remove_dir_all(&dir).unwrap();
}
