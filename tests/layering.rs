//! The layering rule of src/ (see lib.rs): imports only point down,
//!
//!     front -> plugins -> distro -> engine -> output -> host -> base
//!     boot  -> host and base; only the front imports boot
//!
//! and no module imports another that imports it back. Every `crate::` and `super::`
//! path of every file counts (in `use` items, in code, in macro arguments), but those
//! of `#[cfg(test)]` items: unit tests may build real steps with the registry, as the
//! tests in tests/ do.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use syn::visit::Visit;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Layer {
    Base,
    Host,
    Output,
    Engine,
    Distro,
    Plugins,
    Front,
    Boot,
}

const FRONT: &[&str] = &["main", "app", "cli", "matrix", "cachecmd"];
const BASE: &[&str] = &["log", "event", "progress", "size", "digest"];

fn layer(module: &[String]) -> Layer {
    let top = module[0].as_str();
    match top {
        "engine" => Layer::Engine,
        "plugins" => Layer::Plugins,
        "distro" => Layer::Distro,
        "output" => Layer::Output,
        "host" => Layer::Host,
        "boot" => Layer::Boot,
        _ if FRONT.contains(&top) => Layer::Front,
        _ if BASE.contains(&top) => Layer::Base,
        _ => panic!("src/{top}: a module that belongs to no layer (add it to tests/layering.rs)"),
    }
}

/// Why `from` may not import `to`, if it may not.
fn forbidden(from: &[String], to: &[String]) -> Option<&'static str> {
    let (f, t) = (layer(from), layer(to));
    if from[0] == "cli" && t == Layer::Front {
        return Some("cli.rs (the command line's types) imports nothing else of the front");
    }
    match (f, t) {
        _ if f == t => None,
        (Layer::Front, _) => None,
        (_, Layer::Front) => Some("only main imports the front"),
        (_, Layer::Boot) => Some("only the front imports boot/"),
        (Layer::Boot, Layer::Host | Layer::Base) => None,
        (Layer::Boot, _) => Some("boot/ imports host/ and base only"),
        _ if f > t => None,
        _ => Some("imports only point down"),
    }
}

/// The module of a file below src/: src/host/blockdev/busy.rs is host::blockdev::busy.
fn module_of(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .with_extension("")
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts
}

/// The paths of our crate a file names, outside `#[cfg(test)]` items.
struct Imports<'a> {
    module: &'a [String],
    /// The name the crate has in this file (`crate`, or `vmdb` in main.rs).
    root: &'a str,
    found: BTreeSet<Vec<String>>,
}

fn is_cfg_test(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path().is_ident("cfg")
            && a.parse_args::<syn::Meta>()
                .is_ok_and(|m| m.path().is_ident("test"))
    })
}

impl Imports<'_> {
    /// A path as written (`crate::host::cmd::Cmd`, `super::ALL`), made absolute.
    fn add(&mut self, segments: &[String]) {
        let Some(first) = segments.first() else {
            return;
        };
        let abs: Vec<String> = if first == self.root {
            segments[1..].to_vec()
        } else if first == "super" {
            let mut base = self.module.to_vec();
            let mut rest = segments;
            while rest.first().is_some_and(|s| s == "super") {
                base.pop();
                rest = &rest[1..];
            }
            base.extend(rest.iter().cloned());
            base
        } else {
            return;
        };
        if !abs.is_empty() {
            self.found.insert(abs);
        }
    }

    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.use_tree(prefix, &p.tree);
                prefix.pop();
            }
            syn::UseTree::Name(n) => {
                let mut full = prefix.clone();
                if n.ident != "self" {
                    full.push(n.ident.to_string());
                }
                self.add(&full);
            }
            syn::UseTree::Rename(r) => {
                let mut full = prefix.clone();
                full.push(r.ident.to_string());
                self.add(&full);
            }
            syn::UseTree::Glob(_) => {
                let full = prefix.clone();
                self.add(&full);
            }
            syn::UseTree::Group(g) => {
                for t in &g.items {
                    self.use_tree(prefix, t);
                }
            }
        }
    }

    /// `crate :: a :: b` in the tokens of a macro call (format!, bail!, ...).
    fn tokens(&mut self, tokens: proc_macro2::TokenStream) {
        let tts: Vec<proc_macro2::TokenTree> = tokens.into_iter().collect();
        let mut i = 0;
        while i < tts.len() {
            match &tts[i] {
                proc_macro2::TokenTree::Group(g) => self.tokens(g.stream()),
                proc_macro2::TokenTree::Ident(id) if *id == self.root || *id == "super" => {
                    let mut segs = vec![id.to_string()];
                    let mut j = i + 1;
                    while let (
                        Some(proc_macro2::TokenTree::Punct(a)),
                        Some(proc_macro2::TokenTree::Punct(b)),
                        Some(proc_macro2::TokenTree::Ident(next)),
                    ) = (tts.get(j), tts.get(j + 1), tts.get(j + 2))
                    {
                        if a.as_char() != ':' || b.as_char() != ':' {
                            break;
                        }
                        segs.push(next.to_string());
                        j += 3;
                    }
                    if segs.len() > 1 {
                        self.add(&segs);
                    }
                    i = j;
                    continue;
                }
                _ => {}
            }
            i += 1;
        }
    }
}

impl<'ast> Visit<'ast> for Imports<'_> {
    fn visit_item(&mut self, i: &'ast syn::Item) {
        let attrs = match i {
            syn::Item::Mod(m) => &m.attrs,
            syn::Item::Use(u) => &u.attrs,
            syn::Item::Fn(f) => &f.attrs,
            syn::Item::Impl(x) => &x.attrs,
            syn::Item::Struct(x) => &x.attrs,
            syn::Item::Enum(x) => &x.attrs,
            syn::Item::Const(x) => &x.attrs,
            syn::Item::Static(x) => &x.attrs,
            syn::Item::Trait(x) => &x.attrs,
            _ => return syn::visit::visit_item(self, i),
        };
        if !is_cfg_test(attrs) {
            syn::visit::visit_item(self, i);
        }
    }

    fn visit_item_use(&mut self, i: &'ast syn::ItemUse) {
        self.use_tree(&mut Vec::new(), &i.tree);
    }

    fn visit_path(&mut self, p: &'ast syn::Path) {
        let segs: Vec<String> = p.segments.iter().map(|s| s.ident.to_string()).collect();
        self.add(&segs);
        syn::visit::visit_path(self, p);
    }

    fn visit_macro(&mut self, m: &'ast syn::Macro) {
        self.tokens(m.tokens.clone());
        syn::visit::visit_macro(self, m);
    }
}

/// Every .rs file below `dir`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The module of our crate that a path names (the longest known prefix).
fn target_module(path: &[String], modules: &BTreeSet<Vec<String>>) -> Option<Vec<String>> {
    (1..=path.len())
        .rev()
        .map(|n| path[..n].to_vec())
        .find(|m| modules.contains(m))
}

/// Module -> the modules it imports, for every file below `src`.
fn import_graph(src: &Path) -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let modules: BTreeSet<Vec<String>> = files
        .iter()
        .map(|f| module_of(f.strip_prefix(src).unwrap()))
        .filter(|m| m != &["lib"])
        .collect();
    let mut graph = BTreeMap::new();
    for f in &files {
        let module = module_of(f.strip_prefix(src).unwrap());
        if module == ["lib"] {
            continue;
        }
        let text = std::fs::read_to_string(f).unwrap();
        let ast = syn::parse_file(&text)
            .unwrap_or_else(|e| panic!("{}: does not parse: {e}", f.display()));
        let root = if module == ["main"] { "vmdb" } else { "crate" };
        let mut v = Imports {
            module: &module,
            root,
            found: BTreeSet::new(),
        };
        v.visit_file(&ast);
        let targets: BTreeSet<Vec<String>> = v
            .found
            .iter()
            .filter_map(|p| target_module(p, &modules))
            .filter(|t| t != &module && !module.starts_with(t))
            .collect();
        graph.insert(module, targets);
    }
    graph
}

fn name(m: &[String]) -> String {
    m.join("::")
}

/// Every import against the rule, as "from -> to: why".
fn violations(graph: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>) -> Vec<String> {
    let mut bad = Vec::new();
    for (from, tos) in graph {
        for to in tos {
            if let Some(why) = forbidden(from, to) {
                bad.push(format!("{} -> {}: {why}", name(from), name(to)));
            }
        }
    }
    bad
}

/// The import cycles between modules, each as "a -> b -> a".
fn cycles(graph: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>) -> Vec<String> {
    fn walk<'a>(
        m: &'a Vec<String>,
        graph: &'a BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        stack: &mut Vec<&'a Vec<String>>,
        done: &mut BTreeSet<&'a Vec<String>>,
        found: &mut Vec<String>,
    ) {
        if let Some(at) = stack.iter().position(|s| *s == m) {
            let mut names: Vec<String> = stack[at..].iter().map(|s| name(s)).collect();
            names.push(name(m));
            found.push(names.join(" -> "));
            return;
        }
        if !done.insert(m) {
            return;
        }
        stack.push(m);
        for next in graph.get(m).into_iter().flatten() {
            walk(next, graph, stack, done, found);
        }
        stack.pop();
    }
    let mut found = Vec::new();
    let mut done = BTreeSet::new();
    for m in graph.keys() {
        walk(m, graph, &mut Vec::new(), &mut done, &mut found);
    }
    found
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn imports_only_point_down() {
    let bad = violations(&import_graph(&src()));
    assert!(
        bad.is_empty(),
        "imports against the layering rule:\n{}",
        bad.join("\n")
    );
}

#[test]
fn no_module_imports_one_that_imports_it() {
    let found = cycles(&import_graph(&src()));
    assert!(found.is_empty(), "import cycles:\n{}", found.join("\n"));
}

/// The rule catches what it is for: a copy of src/ with one import against it fails.
#[test]
fn a_planted_violation_is_caught() {
    let d = tempfile::tempdir().unwrap();
    let copy = d.path().join("src");
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    for f in &files {
        let to = copy.join(f.strip_prefix(src()).unwrap());
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(f, &to).unwrap();
    }
    assert_eq!(violations(&import_graph(&copy)), Vec::<String>::new());
    let planted = |file: &str, line: &str| {
        let p = copy.join(file);
        let text = std::fs::read_to_string(&p).unwrap();
        std::fs::write(&p, format!("{text}\n{line}\n")).unwrap();
    };
    planted("host/cmd.rs", "use crate::engine::build::Build;");
    planted(
        "engine/runner.rs",
        "use crate::{cli::EXIT_FAILED, distro::mirror};",
    );
    planted("boot/mod.rs", "fn f() { let _ = crate::output::REPORT; }");
    assert_eq!(
        violations(&import_graph(&copy)),
        [
            "boot -> output: boot/ imports host/ and base only",
            "engine::runner -> cli: only main imports the front",
            "engine::runner -> distro::mirror: imports only point down",
            "host::cmd -> engine::build: imports only point down",
        ]
    );
}
