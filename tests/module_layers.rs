//! The crate's structure stays what docs/design.md draws: its modules form layers (no module
//! uses one that uses it back, directly or through others), and no source file grows past
//! ~700 lines except data tables.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file without comments (doc links may point anywhere).
fn code(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every `prefix<name>` in `text` (names are lowercase identifiers).
fn uses(text: &str, prefix: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find(prefix) {
        let after = &rest[at + prefix.len()..];
        let name: String = after
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        let skip = name.len().max(1).min(after.len());
        if !name.is_empty() {
            found.insert(name);
        }
        rest = &after[skip..];
    }
    found
}

/// A cycle of the graph, if it has one.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match state.get(node) {
            Some(2) => return None,
            Some(1) => {
                let start = path.iter().position(|n| n == node).unwrap();
                let mut cycle = path[start..].to_vec();
                cycle.push(node.to_string());
                return Some(cycle);
            }
            _ => {}
        }
        state.insert(node.to_string(), 1);
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, state, path) {
                return Some(cycle);
            }
        }
        path.pop();
        state.insert(node.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for node in graph.keys() {
        if let Some(cycle) = visit(node, graph, &mut state, &mut Vec::new()) {
            return Some(cycle);
        }
    }
    None
}

/// The `mmkd` crate's top-level modules and which others each one uses.
fn top_level_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut files = Vec::new();
    rust_files(src, &mut files);
    for file in files {
        let rel = file.strip_prefix(src).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        if top == "lib" || top == "main" {
            continue;
        }
        let used = uses(&code(&file), "crate::");
        let entry = graph.entry(top.clone()).or_default();
        entry.extend(used.into_iter().filter(|m| *m != top));
    }
    graph
}

#[test]
fn the_modules_form_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = top_level_graph(&src);
    assert!(graph.len() > 10, "modules not found: {graph:?}");
    if let Some(cycle) = find_cycle(&graph) {
        panic!("module cycle: {}", cycle.join(" → "));
    }
    // The layers docs/design.md draws: nothing below the learner reads presets, and the math
    // of the losses depends on no model or training code.
    for (module, forbidden) in [
        ("train", ["config", "stages", "teacher", "cli"].as_slice()),
        ("objective", &["config", "train", "models", "stages"]),
        ("distill", &["objective", "train", "models", "config"]),
        ("teacher_cache", &["config", "train", "teacher", "stages"]),
        ("batch", &["config", "train", "stages"]),
        ("runtime", &["config", "train", "models"]),
    ] {
        for f in forbidden {
            assert!(
                !graph[module].contains(*f),
                "`{module}` uses `{f}`, a layer above it"
            );
        }
    }
}

#[test]
fn the_files_of_each_module_form_layers_too() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for module in [
        "distill",
        "objective",
        "train",
        "teacher",
        "stages",
        "teacher_cache",
        "tower",
    ] {
        let dir = src.join(module);
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut files = Vec::new();
        rust_files(&dir, &mut files);
        let names: BTreeSet<String> = files
            .iter()
            .map(|f| f.file_stem().unwrap().to_string_lossy().to_string())
            .collect();
        for file in &files {
            let name = file.file_stem().unwrap().to_string_lossy().to_string();
            if name == "mod" {
                continue;
            }
            let used = uses(&code(file), "super::")
                .into_iter()
                .filter(|n| names.contains(n) && *n != name && n != "mod")
                .collect();
            graph.insert(name, used);
        }
        if let Some(cycle) = find_cycle(&graph) {
            panic!("cycle inside `{module}`: {}", cycle.join(" → "));
        }
    }
}

#[test]
fn a_cycle_is_found_when_there_is_one() {
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec![]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.into_iter().map(String::from).collect()))
    .collect();
    assert_eq!(find_cycle(&graph).unwrap(), ["a", "b", "c", "a"]);
    assert_eq!(
        uses("use crate::train::step; crate::objective::Term", "crate::"),
        ["objective", "train"].map(String::from).into()
    );
}

/// Source files may be long only when they are data tables.
const DATA_TABLES: &[&str] = &["src/scoring/caption/ptb/rules.rs"];

#[test]
fn no_source_file_is_over_700_lines_except_data_tables() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for dir in ["src", "nn/src", "vision/src", "datasets/src"] {
        rust_files(&root.join(dir), &mut files);
    }
    let long: Vec<String> = files
        .iter()
        .filter_map(|f| {
            let rel = f.strip_prefix(root).unwrap().to_string_lossy().to_string();
            let lines = std::fs::read_to_string(f).unwrap().lines().count();
            (lines > 700 && !DATA_TABLES.contains(&rel.as_str())).then(|| format!("{rel}: {lines}"))
        })
        .collect();
    assert!(long.is_empty(), "split these files: {long:?}");
}
