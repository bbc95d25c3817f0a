//! The layering of `src/` stays true: a module imports (`crate::name`, in code or doc links)
//! only modules of its own layer or below, and no set of modules imports itself in a circle.
//! Reads the source, like `python3 /work/shared/tools/import_cycles.py src`; the picture is in
//! the README's design section.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, lowest first. A module may import its own layer and those below.
const LAYERS: &[(&str, &[&str])] = &[
    (
        "foundation",
        &[
            "diag", "duration", "calendar", "settings", "output", "notify", "backoff",
        ],
    ),
    (
        "subsystems",
        &[
            "rules",
            "import",
            "store",
            "transport",
            "links",
            "metrics",
            "listener",
        ],
    ),
    (
        "engine",
        &[
            "render",
            "sources",
            "playbook",
            "plan",
            "query",
            "dispatch",
            "bounce",
            "runtime",
            "replies",
            "experience",
            "digest",
        ],
    ),
    ("surfaces", &["http", "ingest", "web"]),
    ("wiring", &["config", "commands", "daemon", "cli"]),
];

/// One import: `from` names `to` at `file:line`.
struct Import {
    from: String,
    to: String,
    file: PathBuf,
    line: usize,
}

#[test]
fn lower_layers_do_not_import_higher_ones() {
    let imports = imports_of(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/src")));
    let layer = layer_of_each_module();
    let mut problems = Vec::new();
    let modules: BTreeSet<&str> = imports.iter().map(|i| i.from.as_str()).collect();
    for module in modules {
        if !layer.contains_key(module) {
            problems.push(format!(
                "src/{module}: a module in no layer; add it to LAYERS in tests/layers.rs"
            ));
        }
    }
    for import in &imports {
        let (Some(from), Some(to)) = (
            layer.get(import.from.as_str()),
            layer.get(import.to.as_str()),
        ) else {
            continue;
        };
        if to > from {
            problems.push(format!(
                "{}:{}: {} ({}) imports {} ({}), a higher layer",
                import.file.display(),
                import.line,
                import.from,
                LAYERS[*from].0,
                import.to,
                LAYERS[*to].0
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn no_modules_import_each_other_in_a_circle() {
    let imports = imports_of(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/src")));
    let mut edges: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for import in &imports {
        edges
            .entry(import.from.as_str())
            .or_default()
            .insert(import.to.as_str());
    }
    if let Some(circle) = find_circle(&edges) {
        let at: Vec<String> = circle
            .windows(2)
            .filter_map(|pair| {
                imports
                    .iter()
                    .find(|i| i.from == pair[0] && i.to == pair[1])
                    .map(|i| format!("  {}:{}: {} -> {}", i.file.display(), i.line, i.from, i.to))
            })
            .collect();
        panic!(
            "an import circle: {}\n{}",
            circle.join(" -> "),
            at.join("\n")
        );
    }
}

#[test]
fn the_scanner_finds_paths_and_use_groups() {
    let text = "use crate::store::X;\nuse crate::{\n    diag::D,\n    rules::{self, R},\n};\n\
                fn f() { crate::web::page(); }\n#[cfg(test)]\nmod tests { use crate::daemon; }\n";
    let found: Vec<(String, usize)> = names_imported(text);
    assert_eq!(
        found,
        [
            ("store".to_string(), 1),
            ("web".to_string(), 6),
            ("diag".to_string(), 3),
            ("rules".to_string(), 4),
        ]
    );
}

fn layer_of_each_module() -> BTreeMap<&'static str, usize> {
    let mut layer = BTreeMap::new();
    for (index, (_, modules)) in LAYERS.iter().enumerate() {
        for module in *modules {
            assert!(
                layer.insert(*module, index).is_none(),
                "{module} is in two layers"
            );
        }
    }
    layer
}

/// Every import between different top-level modules of `src` (`main.rs` and `lib.rs`, which
/// only declare and start, are left out).
fn imports_of(src: &Path) -> Vec<Import> {
    let mut imports = Vec::new();
    for file in rust_files(src) {
        let relative = file.strip_prefix(src).unwrap_or(&file);
        let Some(first) = relative.components().next() else {
            continue;
        };
        let first = first.as_os_str().to_string_lossy();
        let module = first.strip_suffix(".rs").unwrap_or(&first).to_string();
        if module == "main" || module == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
        for (to, line) in names_imported(&text) {
            if to != module {
                imports.push(Import {
                    from: module.clone(),
                    to,
                    file: Path::new("src").join(relative),
                    line,
                });
            }
        }
    }
    imports
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let entries =
        std::fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()));
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files.sort();
    files
}

/// The modules a file names with `crate::name` or in a `use crate::{...}` group, with the line
/// of each mention; the `#[cfg(test)]` module at the end is left out (tests may reach anywhere).
fn names_imported(text: &str) -> Vec<(String, usize)> {
    let text = text.split("#[cfg(test)]").next().unwrap_or_default();
    let line_at = |offset: usize| text[..offset].matches('\n').count() + 1;
    let mut found = Vec::new();
    for (offset, _) in text.match_indices("crate::") {
        let after = offset + "crate::".len();
        let preceded_by_word = text[..offset]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_');
        if preceded_by_word {
            continue;
        }
        let name = identifier_at(text, after);
        if !name.is_empty() {
            found.push((name.to_string(), line_at(offset)));
        }
    }
    for (offset, _) in text.match_indices("crate::{") {
        let start = offset + "crate::{".len();
        for (name, at) in group_heads(text, start) {
            found.push((name, line_at(at)));
        }
    }
    found
}

/// The first name of each top-level item of the `{...}` group that starts at `start`.
fn group_heads(text: &str, start: usize) -> Vec<(String, usize)> {
    let mut heads = Vec::new();
    let mut depth = 0;
    let mut expecting = true;
    let mut index = start;
    while index < text.len() {
        let c = text[index..].chars().next().unwrap_or(' ');
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => expecting = true,
            c if expecting && depth == 0 && (c.is_alphabetic() || c == '_') => {
                let name = identifier_at(text, index);
                heads.push((name.to_string(), index));
                index += name.len();
                expecting = false;
                continue;
            }
            _ => {}
        }
        index += c.len_utf8();
    }
    heads
}

fn identifier_at(text: &str, start: usize) -> &str {
    let rest = &text[start..];
    let end = rest
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(rest.len());
    &rest[..end]
}

/// A circle in `edges` as a path that ends where it starts, if there is one.
fn find_circle<'a>(edges: &BTreeMap<&'a str, BTreeSet<&'a str>>) -> Option<Vec<&'a str>> {
    fn visit<'a>(
        node: &'a str,
        edges: &BTreeMap<&'a str, BTreeSet<&'a str>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<&'a str>> {
        if let Some(at) = path.iter().position(|n| *n == node) {
            let mut circle = path[at..].to_vec();
            circle.push(node);
            return Some(circle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node);
        for next in edges.get(node).into_iter().flatten() {
            if let Some(circle) = visit(next, edges, path, done) {
                return Some(circle);
            }
        }
        path.pop();
        done.insert(node);
        None
    }
    let mut done = BTreeSet::new();
    for node in edges.keys() {
        if let Some(circle) = visit(node, edges, &mut Vec::new(), &mut done) {
            return Some(circle);
        }
    }
    None
}
