//! Loading a spec: YAML text → a tree of nodes that remember their line and column.
//!
//! serde alone gives no position per value, so the YAML event parser builds our own
//! tree; every later error (template, validation) can then point at file:line:col.

use std::collections::HashMap;
use std::fmt;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Loc {
    pub line: usize,
    pub col: usize,
}

impl fmt::Display for Loc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.col)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A scalar; `plain` is false for quoted and block scalars, which are always strings.
    Scalar {
        text: String,
        plain: bool,
    },
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub value: Value,
    pub loc: Loc,
}

impl Node {
    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::Scalar { text, .. } => Some(text),
            _ => None,
        }
    }

    /// A plain `~`, `null` or empty scalar.
    pub fn is_null(&self) -> bool {
        matches!(&self.value, Value::Scalar { text, plain: true } if matches!(text.as_str(), "" | "~" | "null" | "Null" | "NULL"))
    }

    pub fn kind_name(&self) -> &'static str {
        match &self.value {
            Value::Scalar { .. } if self.is_null() => "nothing",
            Value::Scalar { .. } => "a string",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }
}

/// A problem found in a spec, before anything runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Diag {
    pub loc: Loc,
    /// Index (1-based) and type of the step, when the problem is inside one.
    pub step: Option<(usize, String)>,
    pub key: Option<String>,
    pub msg: String,
}

impl Diag {
    pub fn new(loc: Loc, msg: impl Into<String>) -> Self {
        Diag {
            loc,
            step: None,
            key: None,
            msg: msg.into(),
        }
    }

    pub fn render(&self, file: &str) -> String {
        let mut s = format!("{file}:{}", self.loc);
        if let Some((i, kind)) = &self.step {
            s.push_str(&format!(": step {i} ({kind})"));
        }
        if let Some(k) = &self.key {
            s.push_str(&format!(": key '{k}'"));
        }
        s.push_str(": ");
        s.push_str(&self.msg);
        s
    }
}

/// The steps of a spec, still untyped.
#[derive(Debug, Clone)]
pub struct RawSpec {
    pub steps: Vec<Node>,
}

/// Most nodes that aliases may copy: a spec needs few, and an "alias bomb" (aliases of
/// aliases, each copying the last) needs only a few hundred bytes to ask for billions.
pub const MAX_ALIAS_NODES: usize = 100_000;
/// Most text that aliases may copy, for the same reason (a long scalar aliased often).
pub const MAX_ALIAS_BYTES: usize = 16 << 20;

pub fn parse_yaml(text: &str) -> Result<Node, Diag> {
    // YAML allows a byte order mark at the start; the parser would take it for text.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut builder = TreeBuilder::default();
    let mut parser = Parser::new_from_str(text);
    if let Err(e) = parser.load(&mut builder, false) {
        let m = e.marker();
        return Err(Diag::new(
            Loc {
                line: m.line(),
                col: m.col() + 1,
            },
            format!("bad YAML: {}", e.info()),
        ));
    }
    if let Some(d) = builder.error {
        return Err(d);
    }
    builder.root.ok_or_else(|| {
        Diag::new(
            Loc { line: 1, col: 1 },
            "the spec is empty: expected a mapping with a 'steps' list",
        )
    })
}

/// Parse the spec's top level: a mapping with a `steps:` list of mappings.
pub fn load(text: &str) -> Result<RawSpec, Vec<Diag>> {
    let root = parse_yaml(text).map_err(|d| vec![d])?;
    let Value::Map(entries) = &root.value else {
        return Err(vec![Diag::new(
            root.loc,
            format!(
                "expected a mapping with a 'steps' list at the top, found {}",
                root.kind_name()
            ),
        )]);
    };
    let mut diags = Vec::new();
    let mut steps = None;
    for (k, v) in entries {
        match k.as_str() {
            Some("steps") => match &v.value {
                Value::Seq(items) => steps = Some(items.clone()),
                _ => diags.push(Diag::new(
                    v.loc,
                    format!("'steps' must be a list of steps, found {}", v.kind_name()),
                )),
            },
            other => {
                let other = other.unwrap_or("?");
                let hint = if strsim::jaro_winkler(other, "steps") > 0.8 {
                    "; did you mean 'steps'?"
                } else {
                    ": a spec has only 'steps'"
                };
                diags.push(Diag::new(
                    k.loc,
                    format!("unknown top-level key '{other}'{hint}"),
                ))
            }
        }
    }
    if steps.is_none() && diags.is_empty() {
        diags.push(Diag::new(root.loc, "the spec has no 'steps' list"));
    }
    if !diags.is_empty() {
        return Err(diags);
    }
    Ok(RawSpec {
        steps: steps.unwrap_or_default(),
    })
}

#[derive(Default)]
struct TreeBuilder {
    /// Open collections: the node being built, and for maps a pending key.
    stack: Vec<(Node, Option<Node>, usize)>,
    /// Anchored nodes, with their size (nodes, bytes of text).
    anchors: HashMap<usize, (Node, Size)>,
    /// What anchors and aliases have copied so far.
    copied: Size,
    root: Option<Node>,
    error: Option<Diag>,
}

/// The size of a tree: its nodes and the bytes of its scalars.
#[derive(Debug, Clone, Copy, Default)]
struct Size {
    nodes: usize,
    bytes: usize,
}

impl Size {
    fn of(node: &Node) -> Size {
        let mut size = Size::default();
        let mut todo = vec![node];
        while let Some(n) = todo.pop() {
            size.nodes += 1;
            match &n.value {
                Value::Scalar { text, .. } => size.bytes += text.len(),
                Value::Seq(items) => todo.extend(items),
                Value::Map(entries) => todo.extend(entries.iter().flat_map(|(k, v)| [k, v])),
            }
        }
        size
    }
}

impl TreeBuilder {
    /// Count a copy of `size` against the limits; false (and an error at `loc`) when
    /// it would pass them.
    fn copy_allowed(&mut self, size: Size, loc: Loc) -> bool {
        self.copied.nodes += size.nodes;
        self.copied.bytes += size.bytes;
        if self.copied.nodes <= MAX_ALIAS_NODES && self.copied.bytes <= MAX_ALIAS_BYTES {
            return true;
        }
        self.error.get_or_insert_with(|| {
            Diag::new(
                loc,
                format!(
                    "bad YAML: the aliases expand to more than {MAX_ALIAS_NODES} values or \
                     {} MiB of text (an alias bomb?); write the values out instead",
                    MAX_ALIAS_BYTES >> 20
                ),
            )
        });
        false
    }

    fn finish(&mut self, node: Node, anchor: usize) {
        if anchor > 0 {
            // Anchored copies count too: nested anchors would otherwise copy freely.
            let size = Size::of(&node);
            if !self.copy_allowed(size, node.loc) {
                return;
            }
            self.anchors.insert(anchor, (node.clone(), size));
        }
        match self.stack.last_mut() {
            None => self.root = Some(node),
            Some((parent, pending_key, _)) => match &mut parent.value {
                Value::Seq(items) => items.push(node),
                Value::Map(entries) => match pending_key.take() {
                    None => *pending_key = Some(node),
                    Some(k) => entries.push((k, node)),
                },
                Value::Scalar { .. } => unreachable!("scalars are never on the stack"),
            },
        }
    }
}

impl MarkedEventReceiver for TreeBuilder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        // After an error the tree is dropped: build nothing more (nor copy aliases).
        if self.error.is_some() {
            return;
        }
        let loc = Loc {
            line: mark.line(),
            col: mark.col() + 1,
        };
        match ev {
            Event::Scalar(text, style, anchor, _tag) => {
                let plain = matches!(style, TScalarStyle::Plain);
                self.finish(
                    Node {
                        value: Value::Scalar { text, plain },
                        loc,
                    },
                    anchor,
                );
            }
            Event::SequenceStart(anchor, _) => self.stack.push((
                Node {
                    value: Value::Seq(Vec::new()),
                    loc,
                },
                None,
                anchor,
            )),
            Event::MappingStart(anchor, _) => self.stack.push((
                Node {
                    value: Value::Map(Vec::new()),
                    loc,
                },
                None,
                anchor,
            )),
            Event::SequenceEnd | Event::MappingEnd => {
                if let Some((mut node, _, anchor)) = self.stack.pop() {
                    // A block mapping's start event is marked after its first key; the
                    // key itself is where a reader looks for the step.
                    if let Value::Map(entries) = &node.value {
                        if let Some((k, _)) = entries.first() {
                            node.loc = k.loc;
                        }
                    }
                    self.finish(node, anchor);
                }
            }
            Event::Alias(id) => match self.anchors.get(&id).map(|(_, size)| *size) {
                Some(size) => {
                    if self.copy_allowed(size, loc) {
                        let mut node = self.anchors[&id].0.clone();
                        node.loc = loc;
                        self.finish(node, 0);
                    }
                }
                None => {
                    self.error
                        .get_or_insert_with(|| Diag::new(loc, "bad YAML: unknown alias"));
                }
            },
            _ => {}
        }
    }
}

/// The directory of the spec file: relative paths in steps (files to copy, keyrings,
/// `inputs:`) are relative to it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecDir(std::path::PathBuf);

impl SpecDir {
    /// The directory of the spec file at `spec` (canonical where it can be), or the
    /// current directory for a spec read from standard input ('-').
    pub fn of(spec: &std::path::Path) -> SpecDir {
        use std::path::Path;
        if spec == Path::new("-") {
            return SpecDir(std::env::current_dir().unwrap_or_else(|_| ".".into()));
        }
        let dir = match spec.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        SpecDir(std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf()))
    }

    /// A path written in the spec: an absolute one as it is, a relative one below the
    /// spec's directory.
    pub fn path(&self, p: impl AsRef<std::path::Path>) -> std::path::PathBuf {
        self.0.join(p)
    }

    pub fn dir(&self) -> &std::path::Path {
        &self.0
    }
}

impl<P: Into<std::path::PathBuf>> From<P> for SpecDir {
    fn from(dir: P) -> SpecDir {
        SpecDir(dir.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_in_the_spec_are_relative_to_its_directory() {
        let d = SpecDir::from("/srv/specs");
        assert_eq!(
            d.path("files/motd"),
            std::path::Path::new("/srv/specs/files/motd")
        );
        assert_eq!(d.path("/etc/motd"), std::path::Path::new("/etc/motd"));
        assert_eq!(
            SpecDir::of(std::path::Path::new("/nonexistent/x.vmdb")).dir(),
            std::path::Path::new("/nonexistent")
        );
        assert_eq!(
            SpecDir::of(std::path::Path::new("-")).dir(),
            std::env::current_dir().unwrap()
        );
    }

    #[test]
    fn steps_keep_their_lines() {
        let spec = load("steps:\n  - mkimg: x.img\n    size: 4G\n\n  - echo: hi\n").unwrap();
        assert_eq!(spec.steps.len(), 2);
        assert_eq!(spec.steps[0].loc.line, 2);
        let Value::Map(m) = &spec.steps[1].value else {
            panic!("not a map")
        };
        assert_eq!(m[0].0.as_str(), Some("echo"));
        assert_eq!(m[0].1.loc, Loc { line: 5, col: 11 });
    }

    #[test]
    fn quoted_scalars_are_not_plain() {
        let n = parse_yaml("a: 'true'\nb: true\n").unwrap();
        let Value::Map(m) = n.value else { panic!() };
        assert!(matches!(&m[0].1.value, Value::Scalar { plain: false, .. }));
        assert!(matches!(&m[1].1.value, Value::Scalar { plain: true, .. }));
    }

    #[test]
    fn bad_yaml_has_a_position() {
        let d = load("steps:\n  - mkimg: [x\n").unwrap_err();
        assert_eq!(d.len(), 1);
        assert!(d[0].msg.starts_with("bad YAML"), "{:?}", d[0]);
        assert!(d[0].loc.line >= 2);
    }

    #[test]
    fn top_level_must_have_steps() {
        let d = load("stepz: []\n").unwrap_err();
        assert!(d[0].msg.contains("unknown top-level key 'stepz'"));
        let d = load("- a\n").unwrap_err();
        assert!(d[0].msg.contains("expected a mapping"));
    }

    #[test]
    fn aliases_are_expanded() {
        let n = parse_yaml("a: &x hello\nb: *x\n").unwrap();
        let Value::Map(m) = n.value else { panic!() };
        assert_eq!(m[1].1.as_str(), Some("hello"));
        assert_eq!(m[1].1.loc.line, 2);
    }

    /// "Billion laughs": nine aliases of nine aliases ..., nine levels deep.
    fn alias_bomb() -> String {
        let mut t = String::from("a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
        for i in 1..10 {
            let p = format!("*a{}", i - 1);
            t.push_str(&format!("a{i}: &a{i} [{}]\n", vec![p; 9].join(", ")));
        }
        t.push_str("steps: []\n");
        t
    }

    #[test]
    fn an_alias_bomb_is_refused_where_it_passes_the_limit() {
        let d = load(&alias_bomb()).unwrap_err();
        assert_eq!(d.len(), 1);
        assert_eq!(
            d[0].msg,
            "bad YAML: the aliases expand to more than 100000 values or 16 MiB of text (an alias bomb?); write the values out instead"
        );
        // a4 holds 9^5 scalars: the alias that passes the limit is on its line.
        assert_eq!(d[0].loc.line, 5, "{:?}", d[0]);
    }

    #[test]
    fn a_long_scalar_aliased_often_is_refused() {
        let mut t = format!("a: &x {}\nb: [", "y".repeat(1 << 20));
        t.push_str(&vec!["*x"; 20].join(", "));
        t.push_str("]\nsteps: []\n");
        let d = load(&t).unwrap_err();
        assert!(d[0].msg.contains("16 MiB of text"), "{:?}", d[0]);
        assert_eq!(d[0].loc.line, 2);
    }

    #[test]
    fn ordinary_aliases_are_within_the_limits() {
        let t = "steps:\n  - &step\n    echo: hi\n  - *step\n  - *step\n";
        let spec = load(t).unwrap();
        assert_eq!(spec.steps.len(), 3);
        assert_eq!(
            spec.steps[2],
            Node {
                loc: Loc { line: 5, col: 5 },
                ..spec.steps[0].clone()
            }
        );
    }

    #[test]
    fn a_byte_order_mark_is_allowed() {
        let spec = load("\u{feff}steps:\n  - echo: hi\n").unwrap();
        assert_eq!(spec.steps.len(), 1);
        assert_eq!(spec.steps[0].loc, Loc { line: 2, col: 5 });
    }
}
