//! The code's layout keeps its data flow visible: the crate's top-level modules import each
//! other without cycles, and the lower layers (model, sinks, file format) never import the
//! loader, the engine or the commands above them. Read from the sources (every `crate::X`
//! path, including inside `use crate::{..}` groups); test modules are left out.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("src dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            if p.file_name().is_some_and(|n| n != "snapshots") {
                sources(&p, out);
            }
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level modules a source text names: `crate::a::..`, and each first segment of a
/// `use crate::{a::.., b, c::{..}}` group.
fn named_modules(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level items of the group: split at depth-0 commas.
            let (mut depth, mut start) = (0usize, 0usize);
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        out.insert(ident(group[start..j].trim()));
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.insert(ident(group[start..j].trim()));
                        start = j + 1;
                    }
                    _ => {}
                }
            }
        } else {
            out.insert(ident(rest));
        }
    }
    out.remove("");
    out
}

/// Top-level module → the top-level modules its non-test code imports.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(&src).expect("under src");
        let top = rel
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .expect("name")
            .trim_end_matches(".rs")
            .to_string();
        if top == "main" || top == "lib" || f.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&f).expect("read");
        let code = text.split("#[cfg(test)]\nmod tests").next().unwrap_or("");
        let code = code.split("#[cfg(test)]\npub(crate) mod tests").next().unwrap_or("");
        let mut deps = named_modules(code);
        deps.remove(&top);
        deps.retain(|d| src.join(format!("{d}.rs")).exists() || src.join(d).is_dir());
        g.entry(top).or_default().extend(deps);
    }
    g
}

fn reaches(g: &BTreeMap<String, BTreeSet<String>>, from: &str, to: &str) -> Option<Vec<String>> {
    let mut stack = vec![vec![from.to_string()]];
    let mut seen = BTreeSet::new();
    while let Some(path) = stack.pop() {
        let last = path.last().expect("non-empty").clone();
        for n in g.get(&last).into_iter().flatten() {
            let mut p = path.clone();
            p.push(n.clone());
            if n == to {
                return Some(p);
            }
            if seen.insert(n.clone()) {
                stack.push(p);
            }
        }
    }
    None
}

#[test]
fn the_modules_import_each_other_without_cycles() {
    let g = graph();
    assert!(g.len() >= 15, "{g:?}");
    assert!(
        g["trace"].contains("engine"),
        "the reader sees `crate::engine` in trace.rs: {g:?}"
    );
    for (m, deps) in &g {
        for d in deps {
            if let Some(back) = reaches(&g, d, m) {
                panic!("import cycle: {m} -> {}", back.join(" -> "));
            }
        }
    }
}

#[test]
fn model_sinks_and_file_format_never_import_the_loader_engine_or_commands() {
    let g = graph();
    let upper = ["bpf", "engine", "cli", "trace", "prove", "tui"];
    for low in [
        "decode", "hooks", "counters", "path", "output", "pcap", "record", "filter", "clock", "usage",
    ] {
        for up in upper {
            if let Some(p) = reaches(&g, low, up) {
                panic!("{low} reaches up into {up}: {}", p.join(" -> "));
            }
        }
    }
}

#[test]
fn the_module_scanner_reads_use_groups() {
    let m = named_modules(
        "use crate::{\n    bpf::session::{A, B},\n    engine,\n    path::{X, y::Z},\n};\nlet a = crate::fault::get();",
    );
    assert_eq!(m.into_iter().collect::<Vec<_>>(), ["bpf", "engine", "fault", "path"]);
}
