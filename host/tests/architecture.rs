//! The layering rules of `docs/ARCHITECTURE.md`, checked on the source tree.
//!
//! rustc checks visibility, not direction: nothing stops `engine` from importing `server`. These
//! tests read `host/src` and fail when a module imports one it must not:
//! - no library module imports `cli` (the CLI builds typed configs; libraries take those);
//! - `engine`, `policy` and `model` never import `cli`, `server` or `bench`, tests included;
//! - only benchmarks and tests use the test support of `testing`;
//! - the top-level modules' imports form no cycle;
//! - no production file is over 800 lines.
//!
//! "Production" is a file without its `#[cfg(test)] mod tests` block, and not a test file
//! (`tests.rs`, `*_tests.rs`, `test_support.rs`). Comments are ignored.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

struct SourceFile {
    /// Relative to `host/src`, with `/` separators.
    path: String,
    /// The whole file, comments removed.
    all: String,
    /// The production part, comments removed.
    production: String,
    is_test_file: bool,
}

impl SourceFile {
    fn top_module(&self) -> &str {
        let first = self.path.split('/').next().unwrap_or("");
        first.strip_suffix(".rs").unwrap_or(first)
    }
}

fn strip_comments(text: &str) -> String {
    text.lines()
        .map(|line| match line.find("//") {
            Some(i) => &line[..i],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn production_part(text: &str) -> &str {
    let mut offset = 0;
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    for (i, line) in lines.iter().enumerate() {
        if line.trim() == "#[cfg(test)]"
            && lines
                .get(i + 1)
                .is_some_and(|next| next.trim_start().starts_with("mod tests"))
        {
            return &text[..offset];
        }
        offset += line.len();
    }
    text
}

fn collect(dir: &Path, root: &Path, out: &mut Vec<SourceFile>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            collect(&path, root, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).expect("read source");
            let rel = path
                .strip_prefix(root)
                .expect("under src")
                .to_string_lossy()
                .replace('\\', "/");
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let is_test_file =
                name == "tests.rs" || name.ends_with("_tests.rs") || name == "test_support.rs";
            out.push(SourceFile {
                production: strip_comments(production_part(&text)),
                all: strip_comments(&text),
                path: rel,
                is_test_file,
            });
        }
    }
}

fn sources() -> Vec<SourceFile> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    collect(&root, &root, &mut files);
    assert!(files.len() > 50, "found only {} files", files.len());
    files
}

/// The top-level modules `text` names through `crate::…`.
fn imported_modules(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (i, _) in text.match_indices("crate::") {
        let before = text[..i].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue; // e.g. `stepscope_crate::`
        }
        let name: String = text[i + "crate::".len()..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            found.insert(name);
        }
    }
    found
}

#[test]
fn no_library_module_imports_the_cli() {
    let offenders: Vec<String> = sources()
        .iter()
        .filter(|f| f.path != "main.rs" && f.path != "cli.rs" && !f.is_test_file)
        .filter(|f| imported_modules(&f.production).contains("cli"))
        .map(|f| f.path.clone())
        .collect();
    assert!(offenders.is_empty(), "import crate::cli: {offenders:?}");
}

#[test]
fn engine_policy_and_model_never_import_cli_server_or_bench() {
    let mut offenders = Vec::new();
    for f in sources() {
        if !matches!(f.top_module(), "engine" | "policy" | "model") {
            continue;
        }
        for module in imported_modules(&f.all) {
            if matches!(module.as_str(), "cli" | "server" | "bench") {
                offenders.push(format!("{} imports crate::{module}", f.path));
            }
        }
    }
    assert!(offenders.is_empty(), "{offenders:#?}");
}

#[test]
fn only_benchmarks_and_tests_use_the_test_support() {
    let offenders: Vec<String> = sources()
        .iter()
        .filter(|f| !f.is_test_file && !matches!(f.top_module(), "bench" | "testing"))
        .filter(|f| imported_modules(&f.production).contains("testing"))
        .map(|f| f.path.clone())
        .collect();
    assert!(offenders.is_empty(), "import crate::testing: {offenders:?}");
}

#[test]
fn top_level_modules_form_no_import_cycle() {
    let files = sources();
    let modules: BTreeSet<String> = files
        .iter()
        .map(|f| f.top_module().to_string())
        .filter(|m| m != "lib" && m != "main")
        .collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files.iter().filter(|f| !f.is_test_file) {
        let from = f.top_module().to_string();
        if !modules.contains(&from) {
            continue;
        }
        let to: Vec<String> = imported_modules(&f.production)
            .into_iter()
            .filter(|m| modules.contains(m) && *m != from)
            .collect();
        edges.entry(from).or_default().extend(to);
    }
    // A cycle exists iff some module reaches itself.
    for start in &modules {
        let mut seen = BTreeSet::new();
        let mut stack: Vec<(String, Vec<String>)> = vec![(start.clone(), vec![start.clone()])];
        while let Some((module, path)) = stack.pop() {
            for next in edges.get(&module).into_iter().flatten() {
                if next == start {
                    panic!("import cycle: {} -> {start}", path.join(" -> "));
                }
                if seen.insert(next.clone()) {
                    let mut longer = path.clone();
                    longer.push(next.clone());
                    stack.push((next.clone(), longer));
                }
            }
        }
    }
}

#[test]
fn no_production_file_is_over_800_lines() {
    let long: Vec<String> = sources()
        .iter()
        .filter(|f| !f.is_test_file)
        .map(|f| (f.path.clone(), f.production.lines().count()))
        .filter(|(_, lines)| *lines > 800)
        .map(|(path, lines)| format!("{path}: {lines}"))
        .collect();
    assert!(long.is_empty(), "{long:?}");
}

#[test]
fn the_checks_see_imports() {
    let modules = imported_modules("use crate::engine::X;\nlet y = crate::server::z();");
    assert_eq!(
        modules,
        BTreeSet::from(["engine".to_string(), "server".to_string()])
    );
    assert_eq!(
        production_part("a\n#[cfg(test)]\nmod tests {\n}\n"),
        "a\n",
        "the test module is cut"
    );
}
