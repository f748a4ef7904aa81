//! The source tree is layered: each top-level module of `src/` is a layer, and a module
//! may import (`crate::…`) only from its own layer and the layers below. The order is
//! the one `src/lib.rs` documents; a backward import fails here, naming the file and line.

use std::path::Path;

/// Lowest first.
const LAYERS: &[&str] = &["fs", "wire", "config", "tls", "credentials", "shared", "pipeline", "server", "cli"];

fn rank(layer: &str) -> Option<usize> {
    LAYERS.iter().position(|l| *l == layer)
}

/// Every `crate::<name>` in `text`, grouped imports (`crate::{a::…, b}`) included, with
/// its line number.
fn crate_paths(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                for item in group.split('}').next().unwrap_or("").split(',') {
                    out.push((i + 1, item.trim().split("::").next().unwrap_or("").to_string()));
                }
            } else {
                let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                out.push((i + 1, name));
            }
        }
    }
    out
}

#[test]
fn no_module_imports_from_a_layer_above_its_own() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut seen_layers = std::collections::BTreeSet::new();
    let mut backward = Vec::new();
    let mut dirs = vec![src.clone()];
    while let Some(dir) = dirs.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let path = e.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let rel = path.strip_prefix(&src).unwrap();
            let top = rel.iter().next().unwrap().to_string_lossy().trim_end_matches(".rs").to_string();
            if top == "lib" || top == "main" {
                continue;
            }
            let own = rank(&top).unwrap_or_else(|| panic!("src/{top} is in no layer: add it to LAYERS and src/lib.rs"));
            seen_layers.insert(top.clone());
            for (line, name) in crate_paths(&std::fs::read_to_string(&path).unwrap()) {
                let Some(theirs) = rank(&name) else { continue };
                if theirs > own {
                    backward.push(format!("src/{}:{line}: {top} imports {name}", rel.display()));
                }
            }
        }
    }
    assert_eq!(seen_layers.len(), LAYERS.len(), "a layer without a module: {seen_layers:?}");
    assert!(backward.is_empty(), "lower layers import higher ones:\n{}", backward.join("\n"));
}
