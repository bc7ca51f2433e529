//! The plugin API: the schema each step type declares (StepSpec, Key, its cache
//! role), the typed step it receives, the checks it makes against the plan, and what
//! the engine is handed (Registry). src/engine/validate.rs turns YAML steps into typed
//! ones.

use std::collections::BTreeMap;

use anyhow::{Result, anyhow};

use crate::engine::build::Build;
use crate::engine::cachekey::{Archive, CacheInputs};
use crate::engine::plan::{HostNeed, Plan};
use crate::engine::spec::{Diag, Loc};
use crate::output::Package;

/// What a key's value must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Str,
    Bool,
    Int,
    /// A list of strings; a single string is taken as a list of one.
    List,
    /// Octal file mode such as 0644.
    Mode,
    /// A mapping of names to strings (ansible's extra_vars).
    Map,
}

impl Kind {
    /// What its values are, in the key tables of the plugin pages.
    fn name(self) -> &'static str {
        match self {
            Kind::Str => "string",
            Kind::Bool => "`true` or `false`",
            Kind::Int => "number",
            Kind::List => "list",
            Kind::Mode => "octal mode",
            Kind::Map => "mapping",
        }
    }

    pub(super) fn expected(self) -> &'static str {
        match self {
            Kind::Str => "a string",
            Kind::Bool => "true or false",
            Kind::Int => "a whole number",
            Kind::List => "a list of strings",
            Kind::Mode => "an octal file mode such as 0644",
            Kind::Map => "a mapping of names to values",
        }
    }
}

#[derive(Debug)]
pub struct Key {
    pub name: &'static str,
    pub aliases: &'static [&'static str],
    pub kind: Kind,
    pub required: bool,
    /// Value used when the key is absent (rendered as if written in the spec).
    pub default: Option<&'static str>,
    pub doc: &'static str,
}

impl Key {
    pub const fn req(name: &'static str, kind: Kind, doc: &'static str) -> Key {
        Key {
            name,
            aliases: &[],
            kind,
            required: true,
            default: None,
            doc,
        }
    }
    pub const fn opt(name: &'static str, kind: Kind, doc: &'static str) -> Key {
        Key {
            name,
            aliases: &[],
            kind,
            required: false,
            default: None,
            doc,
        }
    }
    pub const fn default(mut self, value: &'static str) -> Key {
        self.default = Some(value);
        self
    }
    pub const fn aliases(mut self, aliases: &'static [&'static str]) -> Key {
        self.aliases = aliases;
        self
    }
}

/// What the step cache (src/engine/stepcache.rs) does with a step type's steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheRole {
    /// Its effects are on the disk, not in the image's tree (partitioning, mkfs,
    /// mounts): it always runs.
    Setup,
    /// It only changes the tree: a tree restored from the cache stands in for it.
    Tree,
    /// It depends on this build's disk (fstab and grub write its UUIDs) or on the
    /// outside world: no state after it is ever cached or restored.
    Volatile,
}

/// A plugin's description of its step type.
#[derive(Debug)]
pub struct StepSpec {
    /// The key that selects this step type; its value is the step's main argument.
    pub name: &'static str,
    pub value: Kind,
    pub value_doc: &'static str,
    pub keys: &'static [Key],
    pub summary: &'static str,
    /// What the step cache does with its steps.
    pub cache: CacheRole,
    /// A tree step whose state is saved however quick it was (it needs the network).
    pub always_saved: bool,
}

impl StepSpec {
    /// The table of the step type's keys, as its page (plugins/NAME.md) has it:
    /// generated from the registry, so that the page and the code say the same.
    pub fn keys_markdown(&self) -> String {
        let mut t = String::from(
            "| key | value | required | default | meaning |\n\
             |-----|-------|----------|---------|---------|\n",
        );
        let mut row =
            |name: &str, aliases: &[&str], kind: Kind, req: bool, def: Option<&str>, doc: &str| {
                let mut key = format!("`{name}`");
                for a in aliases {
                    key.push_str(&format!(" (or `{a}`)"));
                }
                let req = if req { "yes" } else { "no" };
                let def = def.map(|d| format!("`{d}`")).unwrap_or_default();
                t.push_str(&format!(
                    "| {key} | {} | {req} | {def} | {doc} |\n",
                    kind.name()
                ));
            };
        row(self.name, &[], self.value, true, None, self.value_doc);
        for k in self.keys {
            row(k.name, k.aliases, k.kind, k.required, k.default, k.doc);
        }
        t
    }
}

/// One step type. Teardown must cope with a run that stopped anywhere: it undoes only
/// what the build state says was done.
pub trait Plugin: Sync {
    fn spec(&self) -> &'static StepSpec;
    /// Checks beyond types, against what earlier steps will have made (tags, disks),
    /// and the programs the step will run on the host (`Check::needs`).
    fn check(&self, _c: &mut Check) {}
    /// Keys (the type key for the step's value) whose text a shell runs: validation
    /// warns about template variables in them that are not `| quote`d.
    fn shell_keys(&self) -> &'static [&'static str] {
        &[]
    }
    /// What the step's cache key covers besides its text and its `inputs:`: the host
    /// files it reads, the versions of the tools it runs, the archives it fetches from.
    fn cache_inputs(&self, _step: &Step, _inputs: &mut CacheInputs) -> Result<()> {
        Ok(())
    }
    fn run(&self, step: &Step, b: &mut Build) -> Result<()>;
    fn teardown(&self, _step: &Step, _b: &mut Build) -> Result<()> {
        Ok(())
    }
}

/// What the engine learns of the distribution from src/distro/: the package archives
/// the step cache follows, and the packages an image has (for the manifest).
pub trait Distro: Sync {
    /// The archives (suites) a text names as package sources.
    fn archives_named_in(&self, text: &str) -> Vec<Archive>;
    /// The state each archive is in now, looked up at the same time; Err says why it
    /// is unknown.
    fn archive_states(&self, archives: &[Archive]) -> Vec<Result<String, String>>;
    /// When an archive in state `state` published it.
    fn state_date(&self, state: &str) -> String;
    /// The packages installed in the image whose root is at `root`; None when it has
    /// no package database.
    fn installed_packages(&self, root: &std::path::Path) -> Result<Option<Vec<Package>>>;
}

/// Everything the engine is handed about what it builds with (src/plugins/mod.rs
/// makes it): it never names a step type itself.
pub struct Registry {
    /// The step types, in the order a step's keys are matched against them.
    pub plugins: &'static [&'static dyn Plugin],
    pub distro: &'static dyn Distro,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Val {
    Str(String),
    Bool(bool),
    Int(i64),
    List(Vec<String>),
    Map(BTreeMap<String, String>),
}

#[derive(Debug, Clone)]
pub struct Param {
    pub val: Val,
    pub loc: Loc,
}

/// A rendered, typed step.
#[derive(Debug, Clone)]
pub struct Step {
    /// 1-based position in the spec.
    pub index: usize,
    pub kind: &'static str,
    pub loc: Loc,
    pub value: Param,
    pub params: BTreeMap<&'static str, Param>,
    pub unless: Vec<String>,
}

impl Step {
    /// The main argument (the value of the type key) as a string.
    pub fn arg(&self) -> &str {
        match &self.value.val {
            Val::Str(s) => s,
            _ => "",
        }
    }
    pub fn has(&self, key: &str) -> bool {
        self.params.contains_key(key)
    }
    pub fn opt_str(&self, key: &str) -> Option<&str> {
        match self.params.get(key).map(|p| &p.val) {
            Some(Val::Str(s)) => Some(s),
            _ => None,
        }
    }
    /// A required string key (validation guarantees it is there).
    pub fn str(&self, key: &str) -> Result<&str> {
        self.opt_str(key).ok_or_else(|| {
            anyhow!(
                "step {} ({}): key '{key}' is missing",
                self.index,
                self.kind
            )
        })
    }
    pub fn bool(&self, key: &str) -> bool {
        matches!(self.params.get(key).map(|p| &p.val), Some(Val::Bool(true)))
    }
    pub fn int(&self, key: &str) -> Option<i64> {
        match self.params.get(key).map(|p| &p.val) {
            Some(Val::Int(i)) => Some(*i),
            _ => None,
        }
    }
    pub fn list(&self, key: &str) -> Vec<String> {
        match self.params.get(key).map(|p| &p.val) {
            Some(Val::List(l)) => l.clone(),
            _ => Vec::new(),
        }
    }
    pub fn map(&self, key: &str) -> BTreeMap<String, String> {
        match self.params.get(key).map(|p| &p.val) {
            Some(Val::Map(m)) => m.clone(),
            _ => BTreeMap::new(),
        }
    }
    /// Every string the step was written with (its value, keys, list items, mapping
    /// values).
    pub fn strings(&self) -> Vec<&str> {
        let mut out = Vec::new();
        for v in std::iter::once(&self.value.val).chain(self.params.values().map(|p| &p.val)) {
            match v {
                Val::Str(t) => out.push(t.as_str()),
                Val::List(l) => out.extend(l.iter().map(String::as_str)),
                Val::Map(m) => out.extend(m.values().map(String::as_str)),
                Val::Bool(_) | Val::Int(_) => {}
            }
        }
        out
    }
    /// The host files the step names under `inputs:` (relative to the spec's directory).
    pub fn inputs(&self) -> Vec<String> {
        self.list("inputs")
    }
    /// False when the step says `cache: false`.
    pub fn cached(&self) -> bool {
        !matches!(
            self.params.get("cache").map(|p| &p.val),
            Some(Val::Bool(false))
        )
    }
    pub fn loc_of(&self, key: &str) -> Loc {
        self.params.get(key).map(|p| p.loc).unwrap_or(self.loc)
    }
    /// One line naming the step, for progress output.
    pub fn describe(&self) -> String {
        let arg = self.arg();
        if arg.is_empty() || arg.contains('\n') {
            self.kind.to_string()
        } else {
            format!("{}: {}", self.kind, arg)
        }
    }
}

/// Semantic checking of one step against the plan.
pub struct Check<'a> {
    pub step: &'a Step,
    pub plan: &'a mut Plan,
    diags: &'a mut Vec<Diag>,
}

impl<'a> Check<'a> {
    /// Checking `step` against `plan`; its problems go to `diags`.
    pub(super) fn new(step: &'a Step, plan: &'a mut Plan, diags: &'a mut Vec<Diag>) -> Self {
        Check { step, plan, diags }
    }

    /// Report a problem with one key of the step (the type key's name for its value).
    pub fn err(&mut self, key: &str, msg: impl Into<String>) {
        let loc = self.loc_of(key);
        self.diags.push(Diag {
            loc,
            step: Some((self.step.index, self.step.kind.to_string())),
            key: Some(key.to_string()),
            msg: msg.into(),
        });
    }
    /// The step runs `program` on the host; Debian's `package` has it. `key` is the
    /// key that makes it needed (the type key when the step always needs it). An
    /// absolute path names a file the step needs instead.
    pub fn needs(&mut self, key: &str, program: &'static str, package: &'static str) {
        self.needs_one_of(key, &[(program, package)]);
    }
    /// The step runs the first of these programs it finds.
    pub fn needs_one_of(&mut self, key: &str, programs: &[(&'static str, &'static str)]) {
        let loc = self.loc_of(key);
        self.plan.host_needs.push(HostNeed {
            step: self.step.index,
            kind: self.step.kind,
            key: key.to_string(),
            loc,
            any_of: programs.to_vec(),
        });
    }
    fn loc_of(&self, key: &str) -> Loc {
        if key == self.step.kind {
            self.step.value.loc
        } else {
            self.step.loc_of(key)
        }
    }
    /// The step uses a tag: it must have been defined by an earlier step.
    pub fn use_tag(&mut self, key: &str, tag: &str) -> bool {
        match self.plan.tags.get(tag) {
            Some(_) => true,
            None => {
                let known = self.plan.tag_names();
                self.err(
                    key,
                    format!(
                        "tag '{tag}' is not defined by an earlier step (defined so far: {known})"
                    ),
                );
                false
            }
        }
    }
}

pub fn find(plugins: &[&'static dyn Plugin], name: &str) -> Option<&'static dyn Plugin> {
    plugins.iter().copied().find(|p| p.spec().name == name)
}

const UNLESS: Key = Key::opt(
    "unless",
    Kind::List,
    "a flag or a list of flags: the step is skipped when all of them are set; \
     `unpack-rootfs` sets `rootfs_unpacked` when it unpacked the tarball",
);
const INPUTS: Key = Key::opt(
    "inputs",
    Kind::List,
    "a list of host files or directories the step reads, relative to the spec file's \
     directory: the step cache's key covers their contents (see [the \
     caches](#fast-rebuilds-the-caches)). Each must exist: validation fails \
     otherwise",
);
const CACHE: Key = Key::opt(
    "cache",
    Kind::Bool,
    "`false`: the step runs in every build, and so does every step after it; the step \
     cache keeps no state at or after it (default `true`)",
);

/// Keys every step type takes besides its own (documented once, in README.md, whose
/// table tests/plugin_docs.rs checks against these).
pub const COMMON_KEYS: &[Key] = &[UNLESS, INPUTS, CACHE];
