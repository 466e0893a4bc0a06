//! The crate's layout rules (`../shared/STYLE.md`, README *Layout*), checked on the sources:
//!
//! - only `lib.rs` imports the edge (`crate::http`);
//! - the domain modules never mention the HTTP error type, the boundary's error module, the
//!   edge or the root configuration module;
//! - the pipeline (`infer.rs`) never mentions the edge's state;
//! - no file imports a file that imports it back, directly or around a longer loop.
//!
//! An import is a `mod` declaration, or a path through `crate::`, `super::`, `self::` or a
//! child module, in a `use` or in code (comments are ignored for the cycle check).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `src/`, by its path relative to `src/`.
fn files() -> BTreeMap<String, String> {
    fn walk(dir: &Path, root: &Path, out: &mut BTreeMap<String, String>) {
        for entry in std::fs::read_dir(dir).expect("src readable") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                walk(&path, root, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let rel = path.strip_prefix(root).expect("under src").to_string_lossy().replace('\\', "/");
                out.insert(rel, std::fs::read_to_string(&path).expect("readable"));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(&src(), &src(), &mut out);
    out
}

/// The module path of a file: `policy/chain.rs` → [policy, chain]; `policy/mod.rs` → [policy].
fn module_of(file: &str) -> Vec<String> {
    let stem = file.trim_end_matches(".rs");
    let mut parts: Vec<String> = stem.split('/').map(str::to_string).collect();
    if parts.last().is_some_and(|p| p == "mod" || p == "lib" || p == "main") {
        parts.pop();
    }
    parts
}

/// The file that holds the module at `path`, or the longest prefix of it that is a module.
fn file_of(path: &[String], modules: &BTreeMap<Vec<String>, String>) -> Option<String> {
    (0..=path.len()).rev().find_map(|n| modules.get(&path[..n]).cloned())
}

fn strip_comment(line: &str) -> &str {
    match line.find("//") {
        Some(i) => &line[..i],
        None => line,
    }
}

/// `a::{b, c::{d, e}}` → [a::b, a::c::d, a::c::e].
fn expand_use(tree: &str) -> Vec<String> {
    let tree = tree.trim();
    let Some(open) = tree.find('{') else {
        return vec![tree.split(" as ").next().unwrap_or(tree).trim().to_string()];
    };
    let prefix = tree[..open].trim_end_matches("::").trim();
    let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[start..]);
    parts
        .into_iter()
        .filter(|p| !p.trim().is_empty())
        .flat_map(expand_use)
        .map(|p| if p == "self" { prefix.to_string() } else { format!("{prefix}::{p}") })
        .collect()
}

/// The files each file imports.
fn imports(files: &BTreeMap<String, String>) -> BTreeMap<String, BTreeSet<String>> {
    let modules: BTreeMap<Vec<String>, String> = files.keys().map(|f| (module_of(f), f.clone())).collect();
    let mut graph = BTreeMap::new();
    for (file, text) in files {
        let here = module_of(file);
        let children: BTreeSet<String> = modules
            .keys()
            .filter(|m| m.len() == here.len() + 1 && m.starts_with(&here))
            .map(|m| m[here.len()].clone())
            .collect();
        let mut edges = BTreeSet::new();
        let mut resolve = |path: &str, inline_depth: usize| {
            let segs: Vec<String> = path.split("::").map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
            let Some(first) = segs.first() else { return };
            let target: Vec<String> = match first.as_str() {
                "crate" => segs[1..].to_vec(),
                "self" => here.iter().cloned().chain(segs[1..].iter().cloned()).collect(),
                "super" => {
                    let ups = segs.iter().take_while(|s| *s == "super").count();
                    // Inside an inline module (`mod tests { … }`) the first `super` is this file.
                    let ups = ups.saturating_sub(inline_depth);
                    let base = &here[..here.len().saturating_sub(ups)];
                    base.iter()
                        .cloned()
                        .chain(segs[segs.iter().take_while(|s| *s == "super").count()..].iter().cloned())
                        .collect()
                }
                child if children.contains(child) => here.iter().cloned().chain(segs.iter().cloned()).collect(),
                _ => return,
            };
            if let Some(to) = file_of(&target, &modules)
                && to != *file
            {
                edges.insert(to);
            }
        };
        let mut depth = 0i32;
        let mut inline: Vec<i32> = Vec::new();
        let mut statement = String::new();
        for raw in text.lines() {
            let line = strip_comment(raw);
            let trimmed = line.trim();
            if let Some(name) = trimmed.strip_prefix("pub mod ").or(trimmed.strip_prefix("mod ")) {
                if let Some(name) = name.strip_suffix(';') {
                    resolve(&format!("self::{}", name.trim()), inline.len());
                } else if name.trim_end().ends_with('{') {
                    inline.push(depth);
                }
            }
            let in_use = !statement.is_empty()
                || trimmed.starts_with("use ")
                || trimmed.starts_with("pub use ")
                || trimmed.starts_with("pub(crate) use ");
            if in_use {
                statement.push_str(trimmed);
                statement.push(' ');
                if trimmed.ends_with(';') {
                    let body = statement.trim().trim_end_matches(';');
                    let body =
                        body.trim_start_matches("pub(crate) ").trim_start_matches("pub ").trim_start_matches("use ");
                    for path in expand_use(body) {
                        resolve(&path, inline.len());
                    }
                    statement.clear();
                }
            } else {
                // Paths in code: `crate::a::b`, `super::a`, `self::a`.
                for start in ["crate::", "super::", "self::"] {
                    let mut rest = line;
                    while let Some(i) = rest.find(start) {
                        let before = rest[..i].chars().last();
                        let tail = &rest[i..];
                        let end =
                            tail.find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':')).unwrap_or(tail.len());
                        if !before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                            resolve(&tail[..end], inline.len());
                        }
                        rest = &tail[end.max(1)..];
                    }
                }
            }
            for c in line.chars() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if inline.last() == Some(&depth) {
                            inline.pop();
                        }
                    }
                    _ => {}
                }
            }
        }
        graph.insert(file.clone(), edges);
    }
    graph
}

#[test]
fn only_lib_rs_imports_the_edge() {
    for (file, text) in files() {
        if file == "lib.rs" || file.starts_with("http/") {
            continue;
        }
        assert!(!text.contains("crate::http"), "{file} mentions crate::http; only lib.rs wires the edge in");
    }
}

#[test]
fn the_domain_knows_neither_the_http_error_nor_the_edge_nor_the_root_config() {
    let domain = |f: &str| {
        f.starts_with("policy/")
            || f.starts_with("quota/")
            || ["batcher.rs", "queue.rs", "model.rs", "store.rs", "spec.rs", "gpu.rs", "metrics.rs"].contains(&f)
    };
    for (file, text) in files().into_iter().filter(|(f, _)| domain(f)) {
        for word in ["ApiError", "crate::error", "crate::http", "crate::config"] {
            assert!(!text.contains(word), "{file} mentions `{word}`");
        }
    }
}

#[test]
fn the_pipeline_knows_no_app_state() {
    let files = files();
    assert!(!files["infer.rs"].contains("AppState"), "infer.rs mentions AppState");
}

#[test]
fn the_leaves_import_nothing_from_the_crate() {
    let files = files();
    let graph = imports(&files);
    for leaf in ["clock.rs", "names.rs"] {
        assert!(graph[leaf].is_empty(), "{leaf} imports {:?}", graph[leaf]);
    }
}

#[test]
fn no_file_imports_a_file_that_imports_it_back() {
    let graph = imports(&files());
    // A depth-first search that reports the first loop it finds, with its files.
    fn visit<'a>(
        node: &'a str,
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<&'a str, u8>,
        stack: &mut Vec<&'a str>,
    ) -> Option<Vec<String>> {
        state.insert(node, 1);
        stack.push(node);
        for next in &graph[node] {
            match state.get(next.as_str()) {
                Some(1) => {
                    let from = stack.iter().position(|n| *n == next).unwrap_or(0);
                    let mut cycle: Vec<String> = stack[from..].iter().map(|s| s.to_string()).collect();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                Some(_) => {}
                None => {
                    if let Some(c) = visit(next, graph, state, stack) {
                        return Some(c);
                    }
                }
            }
        }
        stack.pop();
        state.insert(node, 2);
        None
    }
    let mut state = BTreeMap::new();
    for node in graph.keys() {
        if !state.contains_key(node.as_str())
            && let Some(cycle) = visit(node, &graph, &mut state, &mut Vec::new())
        {
            panic!("import cycle: {}", cycle.join(" → "));
        }
    }
    // The checker itself sees the imports it must see.
    assert!(graph["lib.rs"].contains("http/mod.rs"));
    assert!(graph["http/v1.rs"].contains("infer.rs"));
    assert!(graph["infer.rs"].contains("policy/mod.rs"));
    assert!(graph["policy/registry.rs"].contains("policy/chain.rs"));
}

#[test]
fn use_trees_expand_into_paths() {
    assert_eq!(expand_use("super::{a, b::{c, self}}"), vec!["super::a", "super::b::c", "super::b"]);
    assert_eq!(expand_use("crate::x::Y as Z"), vec!["crate::x::Y"]);
}
