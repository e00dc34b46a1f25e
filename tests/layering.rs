//! The architecture the README promises, checked on the source text: the layers import only
//! downwards, no import cycle among `src/`'s modules or among `src/train/`'s, library code never
//! reaches the command line, and the training loops name no objective.
//!
//! A module's references are the `crate::a::...` and `super::a::...` paths in its code
//! (comments left out), grouped `use` lists included.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The top-level modules from the bottom layer up; a module may refer only to modules below it.
const LAYERS: &[&str] = &[
    "model",
    "load",
    "data",
    "scoring",
    "generate",
    "export",
    "judge",
    "eval",
    "distributed",
    "train",
    "cli",
    "commands",
    "main",
];

/// The loops' files, which must name no objective.
const LOOP_FILES: &[&str] = &["mod.rs", "trainer.rs", "offline.rs", "online.rs", "distill.rs", "batching.rs"];

/// Every `.rs` file under `dir`, sorted.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// The file's code without comments (`//` to the end of the line, unless inside a string).
fn code_of(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let mut in_string = false;
        let mut prev = ' ';
        let mut cut = line.len();
        for (i, c) in line.char_indices() {
            if c == '"' && prev != '\\' {
                in_string = !in_string;
            }
            if !in_string && c == '/' && prev == '/' {
                cut = i - 1;
                break;
            }
            prev = c;
        }
        out.push_str(&line[..cut]);
        out.push('\n');
    }
    out
}

/// The first path segment after each `prefix::` in `code`, expanding `prefix::{a, b::c}`.
fn first_segments(code: &str, prefix: &str) -> BTreeSet<String> {
    let ident = |s: &str| s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>();
    let mut out = BTreeSet::new();
    let needle = format!("{prefix}::");
    for (at, _) in code.match_indices(&needle) {
        let before = code[..at].chars().last().unwrap_or(' ');
        if before.is_alphanumeric() || before == '_' {
            continue;
        }
        let rest = &code[at + needle.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let body = &group[..group.find('}').unwrap_or(group.len())];
            out.extend(body.split(',').map(|e| ident(e.trim())).filter(|s| !s.is_empty()));
        } else {
            out.insert(ident(rest));
        }
    }
    out
}

/// `src/`'s files by module path relative to `root` (`train/rounds/pairs.rs` → `["train",
/// "rounds", "pairs"]`; `mod.rs` is its directory's module).
fn module_path(root: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(root).unwrap();
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string()).collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts
}

/// A cycle in `graph`, if any (depth-first search).
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(node.to_string(), 1);
        stack.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            match state.get(next.as_str()) {
                Some(1) => {
                    let start = stack.iter().position(|n| n == next).unwrap();
                    return Some([&stack[start..], std::slice::from_ref(next)].concat());
                }
                None => {
                    if let Some(cycle) = visit(next, graph, state, stack) {
                        return Some(cycle);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(node.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for node in graph.keys() {
        if !state.contains_key(node) {
            if let Some(cycle) = visit(node, graph, &mut state, &mut Vec::new()) {
                return Some(cycle);
            }
        }
    }
    None
}

/// Each file's module path and code.
fn sources() -> Vec<(Vec<String>, PathBuf, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    rust_files(&root)
        .into_iter()
        .map(|f| (module_path(&root, &f), f.clone(), code_of(&std::fs::read_to_string(&f).unwrap())))
        .collect()
}

/// Edges between top-level modules (`crate::X` references), with the files that make them.
fn top_level_edges() -> BTreeMap<(String, String), Vec<PathBuf>> {
    let mut edges: BTreeMap<(String, String), Vec<PathBuf>> = BTreeMap::new();
    for (module, file, code) in sources() {
        let from = module.first().cloned().unwrap_or_default();
        for to in first_segments(&code, "crate") {
            if to != from && LAYERS.contains(&to.as_str()) {
                edges.entry((from.clone(), to)).or_default().push(file.clone());
            }
        }
    }
    edges
}

#[test]
fn library_code_never_imports_the_command_line() {
    let offenders: Vec<String> = top_level_edges()
        .into_iter()
        .filter(|((from, to), _)| {
            (to == "cli" || to == "commands") && !["cli", "commands", "main"].contains(&from.as_str())
        })
        .map(|((_, to), files)| format!("{files:?} -> crate::{to}"))
        .collect();
    assert!(offenders.is_empty(), "library code reaches the command layer: {offenders:#?}");
}

#[test]
fn library_code_never_sees_clap() {
    let offenders: Vec<String> = sources()
        .into_iter()
        .filter(|(module, ..)| !["cli", "commands", "main"].contains(&module[0].as_str()))
        .filter(|(.., code)| code.contains("clap::") || code.contains("use clap"))
        .map(|(_, file, _)| file.display().to_string())
        .collect();
    let alignment = Path::new(env!("CARGO_MANIFEST_DIR")).join("alignment/src");
    let in_alignment: Vec<PathBuf> = rust_files(&alignment)
        .into_iter()
        .filter(|f| code_of(&std::fs::read_to_string(f).unwrap()).contains("clap"))
        .collect();
    assert!(offenders.is_empty() && in_alignment.is_empty(), "clap in library code: {offenders:?} {in_alignment:?}");
}

#[test]
fn layers_import_only_downwards() {
    let rank = |m: &str| LAYERS.iter().position(|l| *l == m);
    let lib = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs");
    let mut upward = Vec::new();
    for ((from, to), files) in top_level_edges() {
        let (Some(f), Some(t)) = (rank(&from), rank(&to)) else { continue };
        let files: Vec<&PathBuf> = files.iter().filter(|p| **p != lib).collect();
        if t >= f && !files.is_empty() {
            upward.push(format!("{from} -> {to} in {files:?}"));
        }
    }
    assert!(upward.is_empty(), "imports against the layer order {LAYERS:?}: {upward:#?}");
}

#[test]
fn no_import_cycle_among_top_level_modules_or_within_train() {
    let mut top: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for ((from, to), _) in top_level_edges() {
        top.entry(from).or_default().insert(to);
    }
    assert_eq!(find_cycle(&top), None, "a cycle among src/'s modules");

    // Within train/: its direct submodules (a directory counts as one), `mod.rs` as "train".
    let mut train: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let children: BTreeSet<String> =
        sources().iter().filter(|(m, ..)| m.len() >= 2 && m[0] == "train").map(|(m, ..)| m[1].clone()).collect();
    for (module, _, code) in sources() {
        if module.first().map(String::as_str) != Some("train") {
            continue;
        }
        let from = module.get(1).cloned().unwrap_or_else(|| "train".into());
        let mut refs: BTreeSet<String> = BTreeSet::new();
        if module.len() == 2 {
            refs.extend(first_segments(&code, "super"));
        }
        if module.len() == 1 {
            refs.extend(first_segments(&code, "self"));
            let uses = code.lines().filter_map(|l| l.trim().strip_prefix("pub use ").or(l.trim().strip_prefix("use ")));
            refs.extend(uses.map(|u| u.split("::").next().unwrap().to_string()));
            refs.extend(children.iter().filter(|c| code.contains(&format!("{c}::"))).cloned());
        }
        let crate_train: BTreeSet<String> = code
            .match_indices("crate::train::")
            .map(|(at, _)| code[at + 14..].chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect())
            .collect();
        refs.extend(crate_train);
        for to in refs.into_iter().filter(|r| children.contains(r) && *r != from) {
            train.entry(from.clone()).or_default().insert(to);
        }
    }
    assert!(
        train.contains_key("online") && train["online"].contains("rounds"),
        "the check sees train's edges: {train:?}"
    );
    assert_eq!(find_cycle(&train), None, "a cycle among train/'s modules: {train:#?}");
}

#[test]
fn training_loops_name_no_objective() {
    let names = regex::Regex::new("(?i)nft|text2grad|kdrl|spo|inpo|dno|copg|hindsight|sinkd|dac_kl").unwrap();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/train");
    let mut found = Vec::new();
    for file in LOOP_FILES {
        let code = code_of(&std::fs::read_to_string(dir.join(file)).unwrap());
        for (n, line) in code.lines().enumerate() {
            if let Some(m) = names.find(line) {
                found.push(format!("src/train/{file}:{}: `{}` in {}", n + 1, m.as_str(), line.trim()));
            }
        }
    }
    assert!(found.is_empty(), "the loops name objectives: {found:#?}");
}

#[test]
fn the_checks_see_what_they_look_for() {
    assert_eq!(code_of("let a = \"http://x\"; // crate::cli\n"), "let a = \"http://x\"; \n");
    let refs = first_segments("use crate::{cli::X, data::{a, b}};\nlet y = crate::judge::f();", "crate");
    assert!(refs.contains("cli") && refs.contains("data") && refs.contains("judge"), "{refs:?}");
    let graph = BTreeMap::from([
        ("a".to_string(), BTreeSet::from(["b".to_string()])),
        ("b".into(), BTreeSet::from(["a".into()])),
    ]);
    assert!(find_cycle(&graph).is_some());
}
