//! The dependency rule between the crate's top-level modules (docs/architecture.md): no import
//! cycles; surfaces (`http`, `mcp`, `cli`) → domains → `db`; domains never import a surface,
//! the shared request state or client code; client code never imports the server's surfaces.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Modules that serve requests or run commands: only they may import `app`.
const SURFACES: &[&str] = &["cli", "http", "mcp"];
/// One module per domain; each owns the SQL of its tables.
const DOMAINS: &[&str] = &[
    "accounts",
    "admin",
    "chat",
    "login",
    "oauth",
    "perspectives",
    "quota",
    "proxy",
    "runtime",
    "vault",
    "zk",
];
/// Client code (of a polydev server), for the command line, the bench and agents.
const CLIENTS: &[&str] = &["client"];

fn src() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src")
}

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

/// The top-level module a source file belongs to (`src/http/zk.rs` → `http`).
fn module_of(path: &Path) -> Option<String> {
    let relative = path.strip_prefix(src()).ok()?;
    let first = relative.components().next()?.as_os_str().to_str()?;
    let name = first.trim_end_matches(".rs");
    (name != "lib" && name != "main").then(|| name.to_string())
}

/// The top-level modules a source text names through `crate::` paths, including grouped
/// imports over several lines (`use crate::{a, b::{c, d}}`). Comments are skipped.
fn imports(text: &str) -> BTreeSet<String> {
    let code: String = text
        .lines()
        .map(|line| line.split("//").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n");
    let mut found = BTreeSet::new();
    let mut rest = code.as_str();
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        match rest.strip_prefix('{') {
            Some(group) => found.extend(top_level_items(group).iter().map(|i| ident(i))),
            None => {
                found.insert(ident(rest));
            }
        }
    }
    found.retain(|m| !m.is_empty());
    found
}

/// The comma-separated items of a `{...}` group (its text starts after the `{`), nested groups
/// kept whole.
fn top_level_items(group: &str) -> Vec<&str> {
    let (mut items, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => {
                items.push(group[start..i].trim());
                break;
            }
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(group[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    items
}

fn ident(path: &str) -> String {
    path.chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let Some(module) = module_of(&file) else {
            continue;
        };
        let text = std::fs::read_to_string(&file).unwrap();
        let edges = graph.entry(module.clone()).or_default();
        edges.extend(imports(&text).into_iter().filter(|m| *m != module));
    }
    graph
}

/// A cycle through `start`, if there is one.
fn cycle_from(graph: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    fn walk(
        graph: &BTreeMap<String, BTreeSet<String>>,
        start: &str,
        node: &str,
        path: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        for next in graph.get(node).into_iter().flatten() {
            if next == start {
                path.push(next.clone());
                return true;
            }
            if seen.insert(next.clone()) {
                path.push(next.clone());
                if walk(graph, start, next, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![start.to_string()];
    walk(graph, start, start, &mut path, &mut BTreeSet::new()).then_some(path)
}

#[test]
fn the_import_parser_reads_paths_and_groups() {
    let text = "use crate::{\n    accounts,\n    quota::{self, Counter},\n};\nlet x = crate::zk::is_enabled();\n// crate::http is a comment";
    let found: Vec<String> = imports(text).into_iter().collect();
    assert_eq!(found, ["accounts", "quota", "zk"]);
    let mut graph = BTreeMap::new();
    graph.insert("a".to_string(), BTreeSet::from(["b".to_string()]));
    graph.insert("b".to_string(), BTreeSet::from(["a".to_string()]));
    assert_eq!(cycle_from(&graph, "a").unwrap(), ["a", "b", "a"]);
}

#[test]
fn no_module_imports_another_that_imports_it_back() {
    let graph = graph();
    assert!(graph.contains_key("http") && graph.contains_key("perspectives"));
    for module in graph.keys() {
        if let Some(cycle) = cycle_from(&graph, module) {
            panic!("import cycle: {}", cycle.join(" → "));
        }
    }
}

#[test]
fn domains_import_no_surface_and_no_client_and_clients_no_surface() {
    let graph = graph();
    for domain in DOMAINS {
        let edges = &graph[*domain];
        for banned in SURFACES.iter().chain(CLIENTS).chain(&["app", "api"]) {
            assert!(
                !edges.contains(*banned),
                "domain `{domain}` imports `{banned}`: {edges:?}"
            );
        }
    }
    for client in CLIENTS {
        for surface in SURFACES {
            assert!(
                !graph[*client].contains(*surface),
                "`{client}` imports the server's `{surface}`"
            );
        }
    }
}
