//! The automatic step cache: the image tree after an expensive step is stored under a
//! key that hashes everything the tree depends on up to that step (the rendered steps,
//! the files they read, the tool versions that matter, the state of the archives they
//! fetch packages from). A later build restores the deepest state whose key still
//! matches and runs on from there; each entry keeps what went into its key, so that a
//! build that cannot use it can say what changed.
//!
//! Steps have one of three roles. *Setup* steps (partitioning, mkfs, mounts) always
//! run: their effects are on the disk, not in the tree. *Tree* steps (debootstrap, apt,
//! chroot, file steps) only change the tree, so a restored tree stands in for them.
//! *Volatile* steps depend on this build's disk (fstab and grub write its UUIDs) or on
//! the outside world (cache-rootfs): no state after one is ever cached or restored.
//!
//! An entry is KEY.tar.zst plus KEY.json, written under unique temporary names and
//! renamed into place together under the cache directory's lock, the JSON last: an
//! entry without it is incomplete and ignored. The JSON holds the archive's size and
//! SHA-256; before an entry is used its archive is checked against them and test-
//! decompressed, and a bad entry is removed and a shallower one (or none) used. Entries
//! are never changed once written: of two builds saving the same state, the first wins.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::{Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::digest::{Digest, Sha256, hex, sha256, sha256_reader};
use crate::engine::build::Options;
use crate::engine::cachekey::{Archive, CacheInputs};
use crate::engine::step::Step;
use crate::engine::step::{CacheRole, Distro, Registry, StepSpec, find};
use crate::host::cachefile::{
    Temp, Usage, is_temporary, lock_dir, remove_orphans, temporaries_usage,
};
use crate::host::cmd::Cmd;
use crate::host::mount::mounted_virtuals;
use crate::host::tarball::{Compression, pack_argv, unpack_argv};

/// A tree step that ran at least this long gets a cache entry.
const SAVE_AFTER_SECS: f64 = 1.0;

/// Bumped when the entry format or the meaning of keys changes.
const FORMAT: &str = "vmdb-step-cache-2";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Meta {
    pub key: String,
    /// Seconds since the epoch.
    pub created: u64,
    pub spec: String,
    pub step: usize,
    pub kind: String,
    /// The build's flags after the step (e.g. rootfs_unpacked).
    pub flags: Vec<String>,
    pub size: u64,
    pub sha256: String,
    /// What the key was made of (absent from entries of older versions).
    #[serde(default)]
    pub inputs: KeyInputs,
}

pub struct Cache {
    dir: PathBuf,
    /// Archives checked by `verify`, kept open: `restore` unpacks the very file that was
    /// checked, even if the entry is removed in between.
    verified: Mutex<HashMap<String, File>>,
}

/// A cache entry whose archive does not match its record or does not decompress.
#[derive(Debug)]
pub struct Damaged(String, String);

impl std::fmt::Display for Damaged {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "cache entry {} is damaged ({})", self.0, self.1)
    }
}

impl std::error::Error for Damaged {}

/// What `prune` removed.
#[derive(Debug, Default)]
pub struct Pruned {
    pub entries: Vec<Meta>,
    /// Temporaries of saves that died, and halves of entries.
    pub leftovers: Usage,
}

/// How a save went.
#[derive(Debug)]
pub enum Saved {
    New(Meta),
    /// Another build saved the same state first: its entry stays.
    Existing(Meta),
}

impl Saved {
    pub fn into_meta(self) -> Meta {
        match self {
            Saved::New(m) | Saved::Existing(m) => m,
        }
    }
}

impl Cache {
    pub fn open(dir: &Path) -> Result<Cache> {
        let dir = dir.join("steps");
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating the step cache {}", dir.display()))?;
        Ok(Cache {
            dir,
            verified: Mutex::default(),
        })
    }

    fn archive(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.tar.zst"))
    }

    fn meta_path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.json"))
    }

    /// The entry for `key`, if it is complete (its archive has the recorded size).
    pub fn lookup(&self, key: &str) -> Option<Meta> {
        let text = std::fs::read_to_string(self.meta_path(key)).ok()?;
        let meta: Meta = serde_json::from_str(&text).ok()?;
        let size = std::fs::metadata(self.archive(key)).ok()?.len();
        (meta.key == key && meta.size == size).then_some(meta)
    }

    /// Check an entry before anything is unpacked: its archive's size and checksum
    /// against the record, and that it decompresses (zstd checks its content checksum).
    /// The record alone is not enough: a save that went wrong (two builds writing one
    /// temporary file, as vmdb once did) records the checksum of a broken archive.
    /// Errors other than [`Damaged`] (an interrupt) say nothing about the entry.
    pub fn verify(&self, meta: &Meta) -> Result<()> {
        let damaged = |why: String| anyhow::Error::new(Damaged(meta.key.clone(), why));
        let path = self.archive(&meta.key);
        let mut f = File::open(&path).with_context(|| format!("reading {}", path.display()))?;
        let size = f.metadata()?.len();
        if size != meta.size {
            return Err(damaged(format!("{size} bytes, expected {}", meta.size)));
        }
        let got = sha256_reader(&mut f).with_context(|| format!("reading {}", path.display()))?;
        if got != meta.sha256 {
            return Err(damaged(format!("checksum {got}, expected {}", meta.sha256)));
        }
        f.rewind()?;
        let test = Cmd::new("zstd")
            .args(["--test", "--quiet"])
            .stdin_file(f.try_clone()?)
            .run();
        if let Err(e) = test {
            // Stopped by a signal, or no zstd: nothing is known about the entry.
            if crate::host::signals::interrupted() || !crate::host::cmd::in_path("zstd") {
                return Err(e.context(format!("checking step cache entry {}", meta.key)));
            }
            return Err(damaged(format!("it does not decompress: {e:#}")));
        }
        f.rewind()?;
        self.verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(meta.key.clone(), f);
        Ok(())
    }

    /// Store the tree at `root` as the state after `step`, whose key was made of `inputs`.
    /// The archive and its record are written under temporary names and renamed into
    /// place together, under the cache's lock; if another build saved the same state
    /// meanwhile, its entry stays.
    pub fn save(
        &self,
        key: &str,
        root: &Path,
        flags: &BTreeSet<String>,
        spec: &str,
        step: &Step,
        inputs: KeyInputs,
    ) -> Result<Saved> {
        if let Some(m) = self.lookup(key) {
            return Ok(Saved::Existing(m));
        }
        let mut tmp = Temp::new(&self.dir, &format!("{key}.tar.zst"))?;
        let zstd = Compression::Zstd.program(false);
        let virtuals = mounted_virtuals(root)?;
        Cmd::new("tar")
            .args(pack_argv(root, tmp.path(), zstd, &virtuals))
            .run()
            .context("packing the image tree for the step cache")?;
        let f = tmp.file();
        let size = f.metadata()?.len();
        let sha256 = sha256_reader(f)?;
        let meta = Meta {
            key: key.to_string(),
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            spec: spec.to_string(),
            step: step.index,
            kind: step.kind.to_string(),
            flags: flags.iter().cloned().collect(),
            size,
            sha256,
            inputs,
        };
        let mut tmp_meta = Temp::new(&self.dir, &format!("{key}.json"))?;
        tmp_meta
            .file()
            .write_all(serde_json::to_string_pretty(&meta)?.as_bytes())?;
        let _lock = lock_dir(&self.dir)?;
        if let Some(m) = self.lookup(key) {
            return Ok(Saved::Existing(m));
        }
        tmp.persist(&self.archive(key))?;
        if let Err(e) = tmp_meta.persist(&self.meta_path(key)) {
            let _ = std::fs::remove_file(self.archive(key));
            return Err(e);
        }
        Ok(Saved::New(meta))
    }

    /// Unpack an entry (verified first, unless `verify` did already) into `root`;
    /// returns the flags it recorded.
    ///
    /// If unpacking fails after the entry checked out, the cause is the image (its
    /// filesystem full or failing) or a signal, not the entry: the entry is kept and
    /// the build fails. Running the steps instead is no way out: the tree is half
    /// written, and clearing it means deleting below mount points that may hold other
    /// filesystems; steps run over a half-restored tree could make an image that
    /// differs from one built without the cache.
    pub fn restore(&self, meta: &Meta, root: &Path) -> Result<BTreeSet<String>> {
        let checked = self
            .verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&meta.key);
        let f = match checked {
            Some(f) => f,
            None => {
                self.verify(meta)?;
                self.verified
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&meta.key)
                    .context("a verified entry is kept open")?
            }
        };
        let zstd = Compression::Zstd.program(false);
        let virtuals = mounted_virtuals(root)?;
        Cmd::new("tar")
            .args(unpack_argv(root, Path::new("-"), zstd, &virtuals))
            .stdin_file(f)
            .run()
            .with_context(|| {
                format!(
                    "unpacking step cache entry {} into the image failed after the entry \
                     checked out: the image is half-written, so the build stops (the entry \
                     is kept; with --no-cache every step runs instead)",
                    meta.key
                )
            })?;
        Ok(meta.flags.iter().cloned().collect())
    }

    /// All complete entries, oldest first.
    pub fn list(&self) -> Vec<Meta> {
        let mut v: Vec<Meta> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let key = name.strip_suffix(".json")?;
                if is_temporary(key) {
                    return None;
                }
                self.lookup(key)
            })
            .collect();
        v.sort_by_key(|m| m.created);
        v
    }

    /// Files that are not part of a complete entry: saves in progress, temporaries of
    /// saves that died, archives without their record.
    pub fn leftovers(&self) -> Usage {
        let mut u = temporaries_usage(&self.dir);
        for (_, size) in self.incomplete() {
            u.add(size);
        }
        u
    }

    /// Archives and records (not temporaries) that do not make a complete entry.
    fn incomplete(&self) -> Vec<(PathBuf, u64)> {
        std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let key = name
                    .strip_suffix(".tar.zst")
                    .or_else(|| name.strip_suffix(".json"))?;
                if is_temporary(key) || self.lookup(key).is_some() {
                    return None;
                }
                Some((e.path(), e.metadata().ok()?.len()))
            })
            .collect()
    }

    /// Remove an entry (its JSON first, so it is never seen half-removed).
    pub fn remove(&self, key: &str) -> Result<()> {
        let _lock = lock_dir(&self.dir)?;
        let _ = std::fs::remove_file(self.meta_path(key));
        match std::fs::remove_file(self.archive(key)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// Remove entries older than `max_age` seconds, then the oldest until the rest
    /// fit in `max_size` bytes; also leftovers of saves that died.
    pub fn prune(&self, max_size: Option<u64>, max_age: Option<u64>) -> Result<Pruned> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut gone = Vec::new();
        let mut keep = Vec::new();
        for m in self.list() {
            if max_age.is_some_and(|a| now.saturating_sub(m.created) > a) {
                gone.push(m);
            } else {
                keep.push(m);
            }
        }
        if let Some(max) = max_size {
            let mut total: u64 = keep.iter().map(|m| m.size).sum();
            while total > max && !keep.is_empty() {
                let m = keep.remove(0);
                total -= m.size;
                gone.push(m);
            }
        }
        for m in &gone {
            self.remove(&m.key)?;
        }
        let leftovers = self.remove_orphans()?;
        Ok(Pruned {
            entries: gone,
            leftovers,
        })
    }

    /// Halves of entries and temporaries of saves that died. Under the lock: a save
    /// renames its two files under it, so outside it a half entry is never in progress.
    fn remove_orphans(&self) -> Result<Usage> {
        let _lock = lock_dir(&self.dir)?;
        let mut gone = remove_orphans(&self.dir);
        for (p, size) in self.incomplete() {
            if std::fs::remove_file(p).is_ok() {
                gone.add(size);
            }
        }
        Ok(gone)
    }
}

/// vmdb's version and its executable's size and modification time: how vmdb runs a
/// step (its dpkg settings, its stand-ins in the image, the options it gives
/// mmdebstrap) changes with vmdb itself, and a development build keeps its version
/// number. A reinstalled copy of the same vmdb only costs a cold build.
fn vmdb_identity() -> String {
    let version = env!("CARGO_PKG_VERSION");
    let exe = std::env::current_exe().and_then(std::fs::metadata);
    match exe.as_ref().map(|m| (m.len(), m.modified())) {
        Ok((len, Ok(t))) => {
            let ns = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos();
            format!("{version} exe {len} {ns}")
        }
        _ => version.to_string(),
    }
}

/// What went into the key of the state after one step. Each cache entry keeps this for
/// every step up to its own, so that a miss can say what changed.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StepInputs {
    pub step: usize,
    pub kind: String,
    /// Each input by name ("text", "file files/motd", "archive URL", "bootstrap tools",
    /// ...) with its hash or value.
    pub items: BTreeMap<String, String>,
}

/// What a key was made of: vmdb itself (the chain's start) and each step's inputs.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct KeyInputs {
    pub base: String,
    pub steps: Vec<StepInputs>,
}

/// A directory or file that a step's text names (rather than `inputs:`) is hashed only
/// up to this size: a word that happens to name a big tree must not slow every build.
const AUTO_MAX_ENTRIES: usize = 10_000;
const AUTO_MAX_BYTES: u64 = 64 << 20;
/// The value of an archive input whose state could not be looked up.
const UNREACHABLE: &str = "not reachable";

/// Everything the keys depend on but the archives' states (looked up separately).
pub struct Gathered {
    pub base: String,
    pub steps: Vec<StepInputs>,
    /// The archives the build's steps fetch from, and for each step the indexes (into
    /// `archives`) of those it fetches from.
    pub archives: Vec<Archive>,
    pub fetches: Vec<Vec<usize>>,
}

impl Gathered {
    /// Each step's inputs with the archives' states filled in (None: unknown).
    pub fn with_states(&self, states: &[Option<String>]) -> Vec<StepInputs> {
        let mut out = self.steps.clone();
        for (s, fetches) in out.iter_mut().zip(&self.fetches) {
            for &a in fetches {
                let state = states.get(a).cloned().flatten();
                s.items.insert(
                    format!("archive {}", self.archives[a].url),
                    state.unwrap_or_else(|| UNREACHABLE.to_string()),
                );
            }
        }
        out
    }
}

/// The cache key of the state after each step: a hash chain over the steps' inputs.
pub fn chain(base: &str, steps: &[StepInputs]) -> Vec<String> {
    let mut prev = sha256(base.as_bytes());
    steps
        .iter()
        .map(|s| {
            let mut h = Sha256::new();
            h.update(prev.as_bytes());
            h.update(format!("\n{}\n", s.kind).as_bytes());
            for (k, v) in &s.items {
                h.update(format!("{k}\0{v}\n").as_bytes());
            }
            prev = hex(&h.finalize());
            prev.clone()
        })
        .collect()
}

/// The keys of a spec's steps, with the archives' states as they are now.
pub fn keys(steps: &[Step], opts: &Options, registry: &Registry) -> Result<Vec<String>> {
    let g = gather(steps, opts, registry)?;
    let states: Vec<Option<String>> = registry
        .distro
        .archive_states(&g.archives)
        .into_iter()
        .map(Result::ok)
        .collect();
    Ok(chain(&g.base, &g.with_states(&states)))
}

/// What each step's key covers, but the archives' states: its text, the host files it
/// reads (declared by its plugin, named under `inputs:`, or named in its text), tool
/// versions, and which archives it fetches from.
pub fn gather(steps: &[Step], opts: &Options, registry: &Registry) -> Result<Gathered> {
    // The image is built under a name that changes with every run: keys use a fixed one.
    let built: Vec<&String> = ["output", "image"]
        .iter()
        .filter_map(|v| opts.vars.get(*v))
        .collect();
    let mut g = Gathered {
        base: format!("{FORMAT} vmdb {}", vmdb_identity()),
        steps: Vec::with_capacity(steps.len()),
        archives: Vec::new(),
        fetches: Vec::with_capacity(steps.len()),
    };
    // The package sources the image will have, as far as the spec shows them.
    let mut sources: Vec<usize> = Vec::new();
    for s in steps {
        let plugin = find(registry.plugins, s.kind).expect("validated steps have a plugin");
        let role = plugin.spec().cache;
        let mut inputs = CacheInputs::new(opts);
        for input in s.inputs() {
            inputs.file(&input)?;
        }
        plugin.cache_inputs(s, &mut inputs)?;
        let mut text = match (inputs.text.take(), role) {
            (Some(t), _) => t,
            // A setup step matters to the tree only as its plugin says (a mount, by
            // where it mounts): the image's size or partitioning does not change what
            // debootstrap makes.
            (None, CacheRole::Setup) => String::new(),
            // Values only, not where they stand: a comment added above a step
            // changes nothing.
            (None, _) => format!(
                "{}\n{:?}\n{:?}\n{:?}\n",
                s.kind,
                s.value.val,
                s.params
                    .iter()
                    .map(|(k, p)| (k, &p.val))
                    .collect::<Vec<_>>(),
                s.unless
            ),
        };
        for b in &built {
            text = text.replace(b.as_str(), "@OUTPUT@");
        }
        inputs
            .items
            .insert("text".to_string(), sha256(text.as_bytes()));
        if role == CacheRole::Tree {
            named_inputs(s, opts, &built, &mut inputs);
        }

        let mut fetches = Vec::new();
        if role == CacheRole::Tree {
            let mut texts = std::mem::take(&mut inputs.texts);
            texts.extend(s.strings().into_iter().map(str::to_string));
            for t in &texts {
                for a in registry.distro.archives_named_in(t) {
                    let a = add_archive(&mut g.archives, a);
                    if !sources.contains(&a) {
                        sources.push(a);
                    }
                }
            }
        }
        for a in std::mem::take(&mut inputs.fetches) {
            let a = add_archive(&mut g.archives, a);
            fetches.push(a);
            if !sources.contains(&a) {
                sources.push(a);
            }
        }
        if inputs.fetches_from_sources {
            fetches = sources.clone();
        }
        g.steps.push(StepInputs {
            step: s.index,
            kind: s.kind.to_string(),
            items: inputs.items,
        });
        g.fetches.push(fetches);
    }
    Ok(g)
}

/// The index of `a` in `archives`, adding it if it is new.
fn add_archive(archives: &mut Vec<Archive>, a: Archive) -> usize {
    match archives.iter().position(|x| x.url == a.url) {
        Some(i) => i,
        None => {
            archives.push(a);
            archives.len() - 1
        }
    }
}

/// The files a tree step's text names (see `named_files`), unless they are inputs
/// already.
fn named_inputs(s: &Step, opts: &Options, built: &[&String], inputs: &mut CacheInputs) {
    for (name, path) in named_files(s, opts, built) {
        if inputs.items.contains_key(&format!("file {name}")) {
            continue;
        }
        if !small_tree(&path) {
            crate::log::info(&format!(
                "vmdb: warning: step {} ({}) names {name}, too big for the step cache to \
                 watch (over {AUTO_MAX_ENTRIES} files or {} MB): list it under `inputs:` \
                 to have it hashed anyway",
                s.index,
                s.kind,
                AUTO_MAX_BYTES >> 20
            ));
            continue;
        }
        // Unlike `inputs:`, a word may name what the step does not read (a dangling
        // link in a list of names): what cannot be read is left out, and said so.
        if let Err(e) = inputs.file_at(&name, &path) {
            crate::log::info(&format!(
                "vmdb: warning: step {} ({}) names {name}, which the step cache cannot watch: {e:#}",
                s.index, s.kind
            ));
        }
    }
}

/// Files and directories below the spec's directory that a step's text names, such as
/// `files/motd` in `install files/motd "$ROOT/etc/motd"`: words of its strings, split at
/// white space, quotes and shell punctuation, that are relative paths (or absolute ones
/// inside the spec's directory) of existing files, without `..` and without `$`. The
/// image being built and the cache directory are never among them.
fn named_files(s: &Step, opts: &Options, built: &[&String]) -> Vec<(String, PathBuf)> {
    use std::path::Component;
    let dir = opts.spec_dir.dir();
    let ours: Vec<PathBuf> = built
        .iter()
        .map(|b| PathBuf::from(b.as_str()))
        .chain(opts.cache_dir.clone())
        .collect();
    let mut found = BTreeSet::new();
    for text in s.strings() {
        for word in text.split(|c: char| c.is_whitespace() || "\"'`;|&()<>=,".contains(c)) {
            if word.is_empty() || word.len() > 1024 || word.contains('$') || word.starts_with('-') {
                continue;
            }
            let p = Path::new(word);
            let rel = if p.is_absolute() {
                match p.strip_prefix(dir) {
                    Ok(r) => r,
                    Err(_) => continue,
                }
            } else {
                p
            };
            let parts: Vec<&std::ffi::OsStr> = rel
                .components()
                .filter(|c| *c != Component::CurDir)
                .map(|c| match c {
                    Component::Normal(n) => Some(n),
                    _ => None,
                })
                .collect::<Option<_>>()
                .unwrap_or_default();
            if parts.is_empty() {
                continue;
            }
            let rel: PathBuf = parts.iter().collect();
            let full = dir.join(&rel);
            if std::fs::symlink_metadata(&full).is_err()
                || ours.iter().any(|o| o.starts_with(&full))
            {
                continue;
            }
            found.insert((rel.display().to_string(), full));
        }
    }
    found.into_iter().collect()
}

/// Whether the tree at `path` is small enough to hash on every build.
fn small_tree(path: &Path) -> bool {
    let (mut entries, mut bytes) = (0usize, 0u64);
    let mut todo = vec![(path.to_path_buf(), true)];
    while let Some((p, top)) = todo.pop() {
        let m = if top {
            std::fs::metadata(&p)
        } else {
            std::fs::symlink_metadata(&p)
        };
        let Ok(m) = m else { continue };
        entries += 1;
        if m.is_file() {
            bytes += m.len();
        } else if m.is_dir() {
            for e in std::fs::read_dir(&p).into_iter().flatten().flatten() {
                todo.push((e.path(), false));
                if entries + todo.len() > AUTO_MAX_ENTRIES {
                    return false;
                }
            }
        }
        if entries > AUTO_MAX_ENTRIES || bytes > AUTO_MAX_BYTES {
            return false;
        }
    }
    true
}

/// Where a build can start from: the deepest cached state it may use.
#[derive(Debug)]
pub struct Plan {
    pub keys: Vec<String>,
    /// Index (into the steps) of the step whose state is restored, and its entry.
    pub restore: Option<(usize, Meta)>,
    /// Steps at or after this index are never cached: a volatile step, a step with
    /// `cache: false`, or one fetching from an archive whose state is unknown.
    pub first_uncached: usize,
    /// What the keys were made of (each entry keeps its part).
    pub inputs: KeyInputs,
    /// Each step's type, which says what the cache does with it.
    pub specs: Vec<&'static StepSpec>,
}

impl Plan {
    /// What the key of the state after step `i` was made of.
    pub fn inputs_upto(&self, i: usize) -> KeyInputs {
        KeyInputs {
            base: self.inputs.base.clone(),
            steps: self.inputs.steps[..=i.min(self.inputs.steps.len().saturating_sub(1))].to_vec(),
        }
    }
}

/// The first step (index) whose state is never cached.
fn first_uncached(steps: &[Step], specs: &[&StepSpec]) -> usize {
    steps
        .iter()
        .zip(specs)
        .position(|(s, spec)| spec.cache == CacheRole::Volatile || !s.cached())
        .unwrap_or(steps.len())
}

/// The deepest tree step before `upto` whose state the cache holds under its key.
fn deepest(
    keys: &[String],
    specs: &[&StepSpec],
    upto: usize,
    cache: &Cache,
) -> Option<(usize, Meta)> {
    (0..upto)
        .rev()
        .filter(|&i| specs[i].cache == CacheRole::Tree)
        .find_map(|i| cache.lookup(&keys[i]).map(|m| (i, m)))
}

/// The state an entry recorded for an archive.
fn recorded_state<'a>(m: &'a Meta, item: &str) -> Option<&'a str> {
    m.inputs
        .steps
        .iter()
        .find_map(|s| s.items.get(item))
        .map(String::as_str)
        .filter(|v| *v != UNREACHABLE)
}

/// Where the build of `steps` starts from, with the cache in `cache`.
pub fn plan(steps: &[Step], opts: &Options, cache: &Cache, registry: &Registry) -> Result<Plan> {
    let g = gather(steps, opts, registry)?;
    let specs: Vec<&'static StepSpec> = steps
        .iter()
        .map(|s| {
            find(registry.plugins, s.kind)
                .expect("validated steps have a plugin")
                .spec()
        })
        .collect();
    let mut first_uncached = first_uncached(steps, &specs);
    if let Some(s) = steps.get(first_uncached).filter(|s| !s.cached()) {
        crate::log::verbose(&format!(
            "step cache: step {} ({}) says cache: false: it and the steps after it run",
            s.index, s.kind
        ));
    }
    let t = std::time::Instant::now();
    let looked_up = registry.distro.archive_states(&g.archives);
    if !g.archives.is_empty() {
        crate::log::verbose(&format!(
            "step cache: looked up the state of {} archive suite(s) in {:.2}s",
            g.archives.len(),
            t.elapsed().as_secs_f64()
        ));
    }
    let mut states: Vec<Option<String>> = looked_up.iter().map(|r| r.clone().ok()).collect();
    let unknown: Vec<usize> = (0..g.archives.len())
        .filter(|&a| states[a].is_none())
        .collect();
    let entries = cache.list();
    if !unknown.is_empty() {
        let newest = newest_usable_states(
            &g,
            &states,
            &unknown,
            &specs,
            first_uncached,
            cache,
            &entries,
        );
        for &a in &unknown {
            let why = looked_up[a].as_ref().err().map_or("", String::as_str);
            let url = &g.archives[a].url;
            match newest.as_ref().and_then(|c| c[a].as_deref()) {
                Some(s) => crate::log::info(&format!(
                    "step cache: archive not reachable ({url}: {why}): using the newest \
                     cached state from {}",
                    registry.distro.state_date(s)
                )),
                None => crate::log::info(&format!(
                    "step cache: archive not reachable ({url}: {why}) and no saved state \
                     matches: the steps that fetch from it run, and are not saved"
                )),
            }
        }
        if let Some(n) = newest {
            states = n;
        }
    }
    let inputs = KeyInputs {
        steps: g.with_states(&states),
        base: g.base.clone(),
    };
    let keys = chain(&inputs.base, &inputs.steps);
    let mut restore = None;
    if opts.refresh {
        crate::log::info("step cache: --refresh: every step runs, and fresh states are saved");
    } else {
        let mut upto = first_uncached;
        while let Some((i, meta)) = deepest(&keys, &specs, upto, cache) {
            // Checked before the build relies on it: a damaged entry is dropped, and a
            // shallower one (or none) is used instead.
            match cache.verify(&meta) {
                Ok(()) => {
                    restore = Some((i, meta));
                    break;
                }
                Err(e) if e.is::<Damaged>() => {
                    crate::log::info(&format!("vmdb: {e:#}: ignoring and removing it"));
                    let _ = cache.remove(&meta.key);
                    upto = i;
                }
                Err(e) => {
                    crate::log::warn(&format!("not using step cache entry {}: {e:#}", meta.key));
                    upto = i;
                }
            }
        }
        let from = restore.as_ref().map_or(0, |(i, _)| i + 1);
        let changed = what_changed(&inputs, from, &opts.spec_name, &entries, registry.distro);
        if let Some(why) = changed {
            crate::log::info(&format!("step cache: {why}"));
        }
    }
    // A step that runs and fetches from an archive in an unknown state makes a tree
    // that has no sound key: it and the steps after it are not saved.
    let from = restore.as_ref().map_or(0, |(i, _)| i + 1);
    if let Some(i) = (from..steps.len()).find(|&i| g.fetches[i].iter().any(|a| unknown.contains(a)))
    {
        first_uncached = first_uncached.min(i);
    }
    Ok(Plan {
        keys,
        restore,
        first_uncached,
        inputs,
        specs,
    })
}

/// Offline (or with a mirror that does not answer): the states of the `unknown`
/// archives that the newest saved entry was made with whose other inputs match, so
/// that the build can start past the first step fetching from them. None when no entry
/// allows that.
fn newest_usable_states(
    g: &Gathered,
    states: &[Option<String>],
    unknown: &[usize],
    specs: &[&StepSpec],
    first_uncached: usize,
    cache: &Cache,
    entries: &[Meta],
) -> Option<Vec<Option<String>>> {
    let first_fetch = g
        .fetches
        .iter()
        .position(|f| f.iter().any(|a| unknown.contains(a)))?;
    let names: Vec<String> = unknown
        .iter()
        .map(|&a| format!("archive {}", g.archives[a].url))
        .collect();
    let mut tried: Vec<Vec<&str>> = Vec::new();
    for m in entries.iter().rev() {
        let Some(recorded) = names
            .iter()
            .map(|n| recorded_state(m, n))
            .collect::<Option<Vec<&str>>>()
        else {
            continue;
        };
        if tried.contains(&recorded) {
            continue;
        }
        let mut with = states.to_vec();
        for (&a, r) in unknown.iter().zip(&recorded) {
            with[a] = Some(r.to_string());
        }
        let keys = chain(&g.base, &g.with_states(&with));
        if deepest(&keys, specs, first_uncached, cache).is_some_and(|(i, _)| i >= first_fetch) {
            return Some(with);
        }
        tried.push(recorded);
    }
    None
}

/// Why the build cannot start deeper than step index `from`: the first difference
/// between this build's inputs and those of the saved entry of the same spec that
/// matches them longest (the newest of those), among entries past `from`.
pub fn what_changed(
    ours: &KeyInputs,
    from: usize,
    spec: &str,
    entries: &[Meta],
    distro: &dyn Distro,
) -> Option<String> {
    let mut best: Option<(usize, &Meta)> = None;
    for m in entries
        .iter()
        .filter(|m| m.spec == spec && !m.inputs.steps.is_empty())
    {
        let same = if m.inputs.base != ours.base {
            0
        } else {
            m.inputs
                .steps
                .iter()
                .zip(&ours.steps)
                .take_while(|(a, b)| a == b)
                .count()
        };
        // One that matches all the way was usable; one that parts before `from` is
        // about steps this build does not run.
        let whole = m.inputs.base == ours.base && same == m.inputs.steps.len();
        if whole || same < from {
            continue;
        }
        // Entries come oldest first: a later one that matches as long wins.
        if best.is_none_or(|(n, _)| same >= n) {
            best = Some((same, m));
        }
    }
    let (at, m) = best?;
    if m.inputs.base != ours.base {
        return Some(
            "vmdb itself changed since the saved states were made (another version or \
             executable): every step runs"
                .to_string(),
        );
    }
    let (old, new) = (&m.inputs.steps[at], ours.steps.get(at)?);
    let mut what = Vec::new();
    if old.kind != new.kind {
        what.push(format!("it was a {} step", old.kind));
    } else {
        let names: BTreeSet<&String> = old.items.keys().chain(new.items.keys()).collect();
        for n in names {
            match (old.items.get(n), new.items.get(n)) {
                (Some(a), Some(b)) if a != b => what.push(differs(n, a, b, distro)),
                (None, Some(_)) => what.push(format!("{n} is new")),
                (Some(_), None) => what.push(format!("{n} is no longer read")),
                _ => {}
            }
        }
    }
    Some(format!(
        "step {} ({}) changed: {}",
        new.step,
        new.kind,
        what.join("; ")
    ))
}

/// One changed input, in words.
fn differs(name: &str, old: &str, new: &str, distro: &dyn Distro) -> String {
    if name == "text" {
        "its text differs".to_string()
    } else if name.starts_with("archive ") {
        format!(
            "{name} differs (Release of {}, now {})",
            distro.state_date(old),
            distro.state_date(new)
        )
    } else if name.starts_with("file ") {
        format!("{name} differs")
    } else {
        format!("{name} differs (was {old}, now {new})")
    }
}

/// How long ago an entry was made (`created`: seconds since the epoch), in words.
pub fn age(created: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let s = now.saturating_sub(created);
    match s {
        0..=119 => format!("{s}s ago"),
        120..=7199 => format!("{}m ago", s / 60),
        7200..=172_799 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86400),
    }
}

/// Whether the state after step `i`, which ran for `secs`, should be stored.
pub fn worth_saving(plan: &Plan, i: usize, secs: f64) -> bool {
    plan.specs[i].cache == CacheRole::Tree
        && i < plan.first_uncached
        && plan.restore.as_ref().is_none_or(|(r, _)| i > *r)
        && (plan.specs[i].always_saved || secs >= SAVE_AFTER_SECS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::step::Registry;
    use crate::plugins::testing::{plan_with_root, steps, validate_step};

    const REG: &Registry = &crate::plugins::REGISTRY;

    /// Validated steps whose relative paths are relative to `dir`.
    fn steps_in(dir: &Path, yaml: &[&str]) -> Vec<Step> {
        let mut plan = plan_with_root();
        plan.spec_dir = dir.into();
        yaml.iter()
            .enumerate()
            .map(|(i, y)| {
                let mut s = validate_step(y, &mut plan).unwrap();
                s.index = i + 1;
                s
            })
            .collect()
    }

    fn opts(dir: &Path) -> Options {
        let mut o = Options {
            spec_dir: dir.into(),
            ..Options::default()
        };
        o.vars
            .insert("output".into(), "/x/.a.img.vmdb-partial-1".into());
        o
    }

    const SPEC: &[&str] = &[
        "mkimg: \"/x/.a.img.vmdb-partial-1\"\nsize: 1G",
        "create-file: /etc/a\ncontents: a",
        "copy-file: /etc/b\nsrc: b.txt",
        "create-file: /etc/c\ncontents: c",
    ];

    #[test]
    fn a_change_invalidates_from_that_step_on_never_earlier() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("b.txt"), "one").unwrap();
        let s = steps_in(d.path(), SPEC);
        let k1 = keys(&s, &opts(d.path()), REG).unwrap();
        // The same spec built again, under another temporary image name: same keys.
        let mut o = opts(d.path());
        o.vars
            .insert("output".into(), "/x/.a.img.vmdb-partial-2".into());
        let s2 = steps_in(
            d.path(),
            &[
                "mkimg: \"/x/.a.img.vmdb-partial-2\"\nsize: 1G",
                SPEC[1],
                SPEC[2],
                SPEC[3],
            ],
        );
        assert_eq!(keys(&s2, &o, REG).unwrap(), k1);
        // A comment above a step moves it down a line: nothing changes.
        let s5 = steps_in(
            d.path(),
            &[
                SPEC[0],
                &format!("# a comment\n{}", SPEC[1]),
                SPEC[2],
                SPEC[3],
            ],
        );
        assert_eq!(keys(&s5, &opts(d.path()), REG).unwrap(), k1);
        // Another image size: the tree does not depend on it.
        let s4 = steps_in(
            d.path(),
            &[
                "mkimg: \"/x/.a.img.vmdb-partial-1\"\nsize: 2G",
                SPEC[1],
                SPEC[2],
                SPEC[3],
            ],
        );
        assert_eq!(keys(&s4, &opts(d.path()), REG).unwrap()[1..], k1[1..]);
        // A copied file changes: that step and later ones change, earlier ones do not.
        std::fs::write(d.path().join("b.txt"), "two").unwrap();
        let k2 = keys(&s, &opts(d.path()), REG).unwrap();
        assert_eq!(k1[..2], k2[..2]);
        assert!(k1[2] != k2[2] && k1[3] != k2[3]);
        // A step's text changes.
        let s3 = steps_in(
            d.path(),
            &[
                SPEC[0],
                "create-file: /etc/a\ncontents: A",
                SPEC[2],
                SPEC[3],
            ],
        );
        let k3 = keys(&s3, &opts(d.path()), REG).unwrap();
        assert_eq!(k3[0], k2[0]);
        assert!(k3[1..].iter().zip(&k2[1..]).all(|(a, b)| a != b));
    }

    fn tree(root: &Path) {
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/hostname"), "cached\n").unwrap();
        std::os::unix::fs::symlink("hostname", root.join("etc/link")).unwrap();
    }

    #[test]
    fn save_restore_and_damage() {
        let d = tempfile::tempdir().unwrap();
        let cache = Cache::open(&d.path().join("cache")).unwrap();
        let root = d.path().join("root");
        tree(&root);
        let s = steps(&["create-file: /etc/a\ncontents: a"]).unwrap();
        let mut flags = BTreeSet::new();
        flags.insert("rootfs_unpacked".to_string());
        let meta = cache
            .save(
                "k1",
                &root,
                &flags,
                "spec.vmdb",
                &s[0],
                KeyInputs::default(),
            )
            .unwrap()
            .into_meta();
        assert_eq!(cache.lookup("k1"), Some(meta.clone()));
        assert_eq!(cache.list(), vec![meta.clone()]);

        let out = d.path().join("out");
        std::fs::create_dir(&out).unwrap();
        assert_eq!(cache.restore(&meta, &out).unwrap(), flags);
        assert_eq!(
            std::fs::read_to_string(out.join("etc/hostname")).unwrap(),
            "cached\n"
        );
        assert_eq!(
            std::fs::read_link(out.join("etc/link")).unwrap(),
            Path::new("hostname")
        );

        // One flipped byte: detected, never unpacked.
        let archive = d.path().join("cache/steps/k1.tar.zst");
        let mut bytes = std::fs::read(&archive).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        std::fs::write(&archive, &bytes).unwrap();
        let out2 = d.path().join("out2");
        std::fs::create_dir(&out2).unwrap();
        let e = cache.restore(&meta, &out2).unwrap_err().to_string();
        assert!(e.contains("cache entry k1 is damaged"), "{e}");
        assert_eq!(std::fs::read_dir(&out2).unwrap().count(), 0);

        // Half-written (shorter than recorded): not found at all.
        std::fs::write(&archive, &bytes[..mid]).unwrap();
        assert_eq!(cache.lookup("k1"), None);
        // An archive without its JSON is ignored too, and pruned.
        std::fs::write(d.path().join("cache/steps/k2.tar.zst"), b"partial").unwrap();
        assert_eq!(cache.lookup("k2"), None);
        cache.prune(None, None).unwrap();
        assert!(!d.path().join("cache/steps/k2.tar.zst").exists());
    }

    #[test]
    fn prune_by_size_keeps_the_newest() {
        let d = tempfile::tempdir().unwrap();
        let cache = Cache::open(d.path()).unwrap();
        let root = d.path().join("root");
        tree(&root);
        let s = steps(&["create-file: /etc/a\ncontents: a"]).unwrap();
        let mut metas = Vec::new();
        for k in ["a", "b", "c"] {
            let mut m = cache
                .save(k, &root, &BTreeSet::new(), "s", &s[0], KeyInputs::default())
                .unwrap()
                .into_meta();
            // Distinct ages without waiting.
            m.created = metas.len() as u64 + 1;
            std::fs::write(cache.meta_path(k), serde_json::to_string(&m).unwrap()).unwrap();
            metas.push(m);
        }
        let gone = cache
            .prune(Some(metas[1].size + metas[2].size), None)
            .unwrap();
        assert_eq!(
            gone.entries
                .iter()
                .map(|m| m.key.as_str())
                .collect::<Vec<_>>(),
            ["a"]
        );
        assert_eq!(
            cache
                .list()
                .iter()
                .map(|m| m.key.as_str())
                .collect::<Vec<_>>(),
            ["b", "c"]
        );
        let gone = cache.prune(None, Some(0)).unwrap();
        assert_eq!(gone.entries.len(), 2);
        assert!(cache.list().is_empty());
    }

    /// The names of the inputs of each step besides its text.
    fn input_names(g: &Gathered) -> Vec<Vec<&str>> {
        g.steps
            .iter()
            .map(|s| {
                s.items
                    .keys()
                    .map(String::as_str)
                    .filter(|k| *k != "text")
                    .collect()
            })
            .collect()
    }

    /// Files in the cache directory whose names start with a dot.
    fn temporaries(cache: &Cache) -> Vec<String> {
        std::fs::read_dir(&cache.dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect()
    }

    #[test]
    fn files_below_the_spec_named_in_a_script_are_hashed() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("spec");
        std::fs::create_dir_all(dir.join("files")).unwrap();
        std::fs::create_dir_all(dir.join("conf.d")).unwrap();
        std::fs::create_dir_all(dir.join("cache/steps")).unwrap();
        std::fs::write(dir.join("files/motd"), "one\n").unwrap();
        std::fs::write(dir.join("conf.d/a.conf"), "a\n").unwrap();
        std::fs::write(dir.join(".a.img.vmdb-partial-1"), "image").unwrap();
        std::fs::write(d.path().join("secret"), "outside\n").unwrap();
        let script = format!(
            "shell: |\n  install -m 0644 files/motd \"$ROOT/etc/motd\"\n  \
             cp ./files/motd {dir}/conf.d/a.conf ../secret files/none \"$ROOT/tmp\"\n  \
             truncate -s 1M {dir}/.a.img.vmdb-partial-1; ls cache . {dir}\nroot-fs: /",
            dir = dir.display()
        );
        let s = steps_in(&dir, &[&script]);
        let mut o = opts(&dir);
        o.vars.insert(
            "output".into(),
            dir.join(".a.img.vmdb-partial-1").display().to_string(),
        );
        o.cache_dir = Some(dir.join("cache"));
        // Not `$ROOT/...`, not outside the spec's directory, not what is not there, not
        // the image being built nor the cache, not the spec's directory itself.
        let g = gather(&s, &o, REG).unwrap();
        assert_eq!(input_names(&g), [["file conf.d/a.conf", "file files/motd"]]);
        let k1 = keys(&s, &o, REG).unwrap();
        std::fs::write(dir.join("files/motd"), "two\n").unwrap();
        let k2 = keys(&s, &o, REG).unwrap();
        assert_ne!(k1, k2);
        std::fs::write(dir.join("conf.d/a.conf"), "b\n").unwrap();
        let k3 = keys(&s, &o, REG).unwrap();
        assert_ne!(k2, k3);
        std::fs::write(d.path().join("secret"), "changed\n").unwrap();
        std::fs::write(dir.join(".a.img.vmdb-partial-1"), "another image").unwrap();
        assert_eq!(keys(&s, &o, REG).unwrap(), k3);
        // A dangling link named in the text is left out; a symbolic link is read
        // through.
        std::os::unix::fs::symlink("nowhere", dir.join("files/none")).unwrap();
        assert_eq!(keys(&s, &o, REG).unwrap(), k3);
        std::fs::write(d.path().join("real-motd"), "real\n").unwrap();
        std::fs::remove_file(dir.join("files/motd")).unwrap();
        std::os::unix::fs::symlink(d.path().join("real-motd"), dir.join("files/motd")).unwrap();
        let k4 = keys(&s, &o, REG).unwrap();
        std::fs::write(d.path().join("real-motd"), "real, edited\n").unwrap();
        assert_ne!(keys(&s, &o, REG).unwrap(), k4);
    }

    #[test]
    fn trees_too_big_to_watch_by_name() {
        let d = tempfile::tempdir().unwrap();
        let small = d.path().join("small");
        std::fs::create_dir(&small).unwrap();
        for i in 0..3 {
            std::fs::write(small.join(i.to_string()), "x").unwrap();
        }
        assert!(small_tree(&small));
        let many = d.path().join("many");
        std::fs::create_dir(&many).unwrap();
        for i in 0..=AUTO_MAX_ENTRIES {
            std::fs::File::create(many.join(i.to_string())).unwrap();
        }
        assert!(!small_tree(&many));
        let big = d.path().join("big");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(AUTO_MAX_BYTES + 1)
            .unwrap();
        assert!(!small_tree(&big));
        // Named in a script, they are left out (with a warning); under `inputs:` a big
        // tree is hashed all the same.
        let s = steps_in(
            d.path(),
            &[
                "shell: ls many big small\nroot-fs: /",
                "shell: ls\nroot-fs: /\ninputs: [big]",
            ],
        );
        let g = gather(&s, &opts(d.path()), REG).unwrap();
        assert_eq!(input_names(&g), [vec!["file small"], vec!["file big"]]);
    }

    #[test]
    fn inputs_are_hashed_and_must_be_there() {
        let d = tempfile::tempdir().unwrap();
        let conf = d.path().join("conf");
        std::fs::create_dir(&conf).unwrap();
        std::fs::write(conf.join("a.conf"), "a\n").unwrap();
        let with = "shell: cat conf/*.conf > \"$ROOT/etc/all.conf\"\nroot-fs: /\ninputs: [conf]";
        let without = "shell: cat conf/*.conf > \"$ROOT/etc/all.conf\"\nroot-fs: /";
        let s = steps_in(d.path(), &[with, without]);
        let o = opts(d.path());
        let k1 = keys(&s[..1], &o, REG).unwrap();
        let n1 = keys(&s[1..], &o, REG).unwrap();
        std::fs::write(conf.join("a.conf"), "A\n").unwrap();
        let k2 = keys(&s[..1], &o, REG).unwrap();
        assert_ne!(k1, k2);
        // The glob names no file: without `inputs:` the change goes unseen.
        assert_eq!(keys(&s[1..], &o, REG).unwrap(), n1);
        std::fs::write(conf.join("b.conf"), "b\n").unwrap();
        assert_ne!(keys(&s[..1], &o, REG).unwrap(), k2);

        // Any step type takes it; a path that is not there is a spec error.
        let mut plan = plan_with_root();
        plan.spec_dir = d.path().into();
        validate_step("mkimg: x.img\nsize: 1G\ninputs: conf", &mut plan).unwrap();
        assert_eq!(
            crate::plugins::testing::step_errors(
                "create-dir: /x\ninputs:\n  - conf\n  - nope",
                &mut plan
            ),
            [
                "spec:3:3: step 1 (create-dir): key 'inputs': cannot read 'nope' (relative to \
              the spec file's directory): No such file or directory (os error 2)"
            ]
        );
        assert_eq!(
            crate::plugins::testing::step_errors("create-dir: /x\ninputs: ''", &mut plan),
            [
                "spec:2:9: step 1 (create-dir): key 'inputs': an empty path: name a file or \
              directory"
            ]
        );
    }

    /// A file:// mirror at `dir`/debian whose suite's Release file has this Date.
    fn publish(dir: &Path, suite: &str, date: &str) {
        let d = dir.join("debian/dists").join(suite);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join("Release"),
            format!("Origin: Test\nSuite: {suite}\nDate: {date}\nSHA256:\n 00 1 main/x\n"),
        )
        .unwrap();
    }

    const MON: &str = "Mon, 01 Jan 2024 10:00:00 UTC";
    const TUE: &str = "Tue, 02 Jan 2024 10:00:00 UTC";

    #[test]
    fn steps_that_fetch_are_keyed_by_the_archives_state() {
        let d = tempfile::tempdir().unwrap();
        let m = format!("file://{}/debian", d.path().display());
        publish(d.path(), "bookworm", MON);
        publish(d.path(), "bookworm-updates", MON);
        let debootstrap = format!("debootstrap: bookworm\ntarget: /\nmirror: {m}");
        let sources = format!(
            "create-file: /etc/apt/sources.list.d/u.list\ncontents: \"deb {m} bookworm-updates main\\n\""
        );
        let s = steps_in(
            d.path(),
            &[
                SPEC[0],
                &debootstrap,
                &sources,
                "chroot: /\nshell: echo hi > /etc/motd",
                "apt: install\npackages: [less]\ntag: /",
                "chroot: /\nshell: DEBIAN_FRONTEND=noninteractive /usr/bin/apt-get -y install vim",
            ],
        );
        let o = opts(d.path());
        let g = gather(&s, &o, REG).unwrap();
        let urls: Vec<&str> = g.archives.iter().map(|a| a.url.as_str()).collect();
        assert_eq!(
            urls,
            [
                format!("{m}/dists/bookworm"),
                format!("{m}/dists/bookworm-updates")
            ]
        );
        assert_eq!(
            g.fetches,
            [vec![], vec![0], vec![], vec![], vec![0, 1], vec![0, 1]]
        );
        let k1 = keys(&s, &o, REG).unwrap();
        // A new publication of -updates: from the first step that installs from it.
        publish(d.path(), "bookworm-updates", TUE);
        let k2 = keys(&s, &o, REG).unwrap();
        assert_eq!(k1[..4], k2[..4]);
        assert!(k1[4..].iter().zip(&k2[4..]).all(|(a, b)| a != b));
        // Of the suite itself: from debootstrap on.
        publish(d.path(), "bookworm", TUE);
        let k3 = keys(&s, &o, REG).unwrap();
        assert_eq!(k3[0], k2[0]);
        assert!(k3[1..].iter().zip(&k2[1..]).all(|(a, b)| a != b));
        // The state is in the step's inputs, readable.
        let item = format!("archive {m}/dists/bookworm");
        let state = g.with_states(&[Some("S".into()), None])[4].items.clone();
        assert_eq!(state[&item], "S");
        assert_eq!(state[&format!("{item}-updates")], UNREACHABLE);
    }

    /// Give an entry another creation time, to order entries without waiting.
    fn set_created(cache: &Cache, key: &str, created: u64) {
        let mut m = cache.lookup(key).unwrap();
        m.created = created;
        std::fs::write(cache.meta_path(key), serde_json::to_string(&m).unwrap()).unwrap();
    }

    #[test]
    fn offline_builds_use_the_newest_cached_archive_state() {
        let d = tempfile::tempdir().unwrap();
        let m = format!("file://{}/debian", d.path().display());
        let url = format!("{m}/dists/bookworm");
        let item = format!("archive {url}");
        publish(d.path(), "bookworm", MON);
        let cache = Cache::open(&d.path().join("cache")).unwrap();
        let root = d.path().join("root");
        tree(&root);
        let debootstrap = format!("debootstrap: bookworm\ntarget: /\nmirror: {m}");
        let pre = "create-dir: /pre";
        let s = steps_in(d.path(), &[SPEC[0], pre, &debootstrap, SPEC[1]]);
        let mut o = opts(d.path());
        o.spec_name = "spec".into();
        let save = |p: &Plan, i: usize, created: u64| {
            cache
                .save(
                    &p.keys[i],
                    &root,
                    &BTreeSet::new(),
                    "spec",
                    &s[i],
                    p.inputs_upto(i),
                )
                .unwrap();
            set_created(&cache, &p.keys[i], created);
        };

        let mon = plan(&s, &o, &cache, REG).unwrap();
        assert!(mon.restore.is_none());
        save(&mon, 1, 1);
        save(&mon, 2, 2);
        save(&mon, 3, 3);
        assert_eq!(plan(&s, &o, &cache, REG).unwrap().restore.unwrap().0, 3);

        // The archive publishes anew: only the state before debootstrap matches, and
        // the log can say why.
        publish(d.path(), "bookworm", TUE);
        let tue = plan(&s, &o, &cache, REG).unwrap();
        assert_eq!(tue.restore.as_ref().unwrap().0, 1);
        let mon_state = mon.inputs.steps[2].items[&item].clone();
        let tue_state = tue.inputs.steps[2].items[&item].clone();
        assert_eq!(crate::distro::mirror::state_date(&mon_state), MON);
        assert_eq!(crate::distro::mirror::state_date(&tue_state), TUE);
        assert_eq!(
            what_changed(&tue.inputs, 2, "spec", &cache.list(), REG.distro).unwrap(),
            format!(
                "step 3 (debootstrap) changed: archive {url} differs (Release of {MON}, now {TUE})"
            )
        );
        save(&tue, 3, 4);

        // Offline: the newest state that an entry matching the rest was made with.
        std::fs::remove_file(d.path().join("debian/dists/bookworm/Release")).unwrap();
        let off = plan(&s, &o, &cache, REG).unwrap();
        assert_eq!(off.restore.as_ref().unwrap().1.key, tue.keys[3]);
        assert_eq!(off.inputs.steps[2].items[&item], tue_state);
        assert_eq!(off.first_uncached, 4);
        // Only Monday's entry after debootstrap matches an edited last step.
        let edited = steps_in(
            d.path(),
            &[
                SPEC[0],
                pre,
                &debootstrap,
                "create-file: /etc/a\ncontents: A",
            ],
        );
        let off = plan(&edited, &o, &cache, REG).unwrap();
        assert_eq!(off.restore.as_ref().unwrap().1.key, mon.keys[2]);
        assert_eq!(off.inputs.steps[2].items[&item], mon_state);
        assert_eq!(off.first_uncached, 4);
        // Nothing matches another debootstrap (the state before it does not count):
        // it runs, and nothing from it on is saved.
        let other = format!("{debootstrap}\nvariant: minbase");
        let other = steps_in(d.path(), &[SPEC[0], pre, &other, SPEC[1]]);
        let off = plan(&other, &o, &cache, REG).unwrap();
        assert_eq!(off.restore.as_ref().unwrap().1.key, mon.keys[1]);
        assert_eq!(off.inputs.steps[2].items[&item], UNREACHABLE);
        assert_eq!(off.first_uncached, 2);
        assert!(!worth_saving(&off, 2, 60.0));
        assert!(!worth_saving(&off, 3, 60.0));
    }

    #[test]
    fn refresh_restores_nothing_and_saves_again() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("b.txt"), "one").unwrap();
        let cache = Cache::open(&d.path().join("cache")).unwrap();
        let root = d.path().join("root");
        tree(&root);
        let s = steps_in(d.path(), SPEC);
        let mut o = opts(d.path());
        let p = plan(&s, &o, &cache, REG).unwrap();
        cache
            .save(
                &p.keys[3],
                &root,
                &BTreeSet::new(),
                "spec",
                &s[3],
                p.inputs_upto(3),
            )
            .unwrap();
        assert_eq!(plan(&s, &o, &cache, REG).unwrap().restore.unwrap().0, 3);
        o.refresh = true;
        let p = plan(&s, &o, &cache, REG).unwrap();
        assert!(p.restore.is_none());
        assert!(worth_saving(&p, 3, 2.0));
    }

    #[test]
    fn cache_false_runs_the_step_and_every_step_after_it() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("b.txt"), "one").unwrap();
        let cache = Cache::open(&d.path().join("cache")).unwrap();
        let root = d.path().join("root");
        tree(&root);
        let spec = [
            SPEC[0],
            SPEC[1],
            "copy-file: /etc/b\nsrc: b.txt\ncache: false",
            SPEC[3],
        ];
        let s = steps_in(d.path(), &spec);
        assert!(s[1].cached() && !s[2].cached());
        let o = opts(d.path());
        let p = plan(&s, &o, &cache, REG).unwrap();
        assert_eq!(p.first_uncached, 2);
        assert!(worth_saving(&p, 1, 2.0));
        assert!(!worth_saving(&p, 2, 2.0));
        assert!(!worth_saving(&p, 3, 2.0));
        // Even an entry saved for a later step (before `cache: false` was added) is
        // not used: the step runs.
        for i in [1, 3] {
            cache
                .save(
                    &p.keys[i],
                    &root,
                    &BTreeSet::new(),
                    "spec",
                    &s[i],
                    p.inputs_upto(i),
                )
                .unwrap();
        }
        assert_eq!(plan(&s, &o, &cache, REG).unwrap().restore.unwrap().0, 1);
    }

    fn entry(spec: &str, created: u64, inputs: KeyInputs) -> Meta {
        Meta {
            key: format!("k{created}"),
            created,
            spec: spec.into(),
            step: inputs.steps.last().map_or(0, |s| s.step),
            kind: inputs
                .steps
                .last()
                .map_or(String::new(), |s| s.kind.clone()),
            flags: Vec::new(),
            size: 1,
            sha256: String::new(),
            inputs,
        }
    }

    #[test]
    fn a_miss_says_which_input_changed() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("files")).unwrap();
        std::fs::write(d.path().join("files/motd"), "one\n").unwrap();
        std::fs::write(d.path().join("b.txt"), "one").unwrap();
        let spec = [
            SPEC[0],
            SPEC[1],
            "shell: install files/motd \"$ROOT/etc/motd\"\nroot-fs: /",
            SPEC[2],
        ];
        let s = steps_in(d.path(), &spec);
        let o = opts(d.path());
        let before = gather(&s, &o, REG).unwrap();
        let old = KeyInputs {
            base: before.base.clone(),
            steps: before.with_states(&[]),
        };
        let entries = [
            entry("spec", 1, old.clone()),
            // Another spec's entries are not compared.
            entry("other.vmdb", 2, KeyInputs::default()),
        ];
        // Nothing changed: nothing to say.
        assert_eq!(what_changed(&old, 4, "spec", &entries, REG.distro), None);

        std::fs::write(d.path().join("files/motd"), "two\n").unwrap();
        std::fs::write(d.path().join("b.txt"), "two").unwrap();
        let now = gather(&s, &o, REG).unwrap();
        let ours = KeyInputs {
            base: now.base.clone(),
            steps: now.with_states(&[]),
        };
        assert_eq!(
            what_changed(&ours, 2, "spec", &entries, REG.distro).as_deref(),
            Some("step 3 (shell) changed: file files/motd differs")
        );
        // An entry that parts from this build before where it starts says nothing.
        assert_eq!(what_changed(&ours, 3, "spec", &entries, REG.distro), None);

        let mut edited = ours.clone();
        edited.steps[1]
            .items
            .insert("text".into(), "another".into());
        assert_eq!(
            what_changed(&edited, 0, "spec", &entries, REG.distro).as_deref(),
            Some("step 2 (create-file) changed: its text differs")
        );
        let mut newer = ours.clone();
        newer.base = "vmdb-step-cache-2 vmdb 9.9".into();
        assert_eq!(
            what_changed(&newer, 0, "spec", &entries, REG.distro).as_deref(),
            Some(
                "vmdb itself changed since the saved states were made (another version or \
                 executable): every step runs"
            )
        );
        // The entry that matches longest is the one compared, newest first.
        let mut mid = old.clone();
        mid.steps[2] = ours.steps[2].clone();
        let entries = [entry("spec", 1, old), entry("spec", 2, mid)];
        assert_eq!(
            what_changed(&ours, 0, "spec", &entries, REG.distro).as_deref(),
            Some("step 4 (copy-file) changed: file b.txt differs")
        );
    }

    #[test]
    fn saves_of_one_key_at_once_leave_one_sound_entry() {
        let d = tempfile::tempdir().unwrap();
        let cache = Cache::open(&d.path().join("cache")).unwrap();
        let root = d.path().join("root");
        tree(&root);
        // Enough to keep tar busy for a while: both writers overlap.
        let mut data = vec![0u8; 8 << 20];
        let mut x: u32 = 1;
        for b in data.iter_mut() {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            *b = (x >> 24) as u8;
        }
        std::fs::write(root.join("data"), &data).unwrap();
        let s = steps(&["create-file: /etc/a\ncontents: a"]).unwrap();
        let saved: Vec<Saved> = std::thread::scope(|sc| {
            let t: Vec<_> = (0..2)
                .map(|_| {
                    sc.spawn(|| {
                        cache.save(
                            "k",
                            &root,
                            &BTreeSet::new(),
                            "s",
                            &s[0],
                            KeyInputs::default(),
                        )
                    })
                })
                .collect();
            t.into_iter().map(|t| t.join().unwrap().unwrap()).collect()
        });
        let new: Vec<&Meta> = saved
            .iter()
            .filter_map(|s| match s {
                Saved::New(m) => Some(m),
                Saved::Existing(_) => None,
            })
            .collect();
        assert_eq!(new.len(), 1, "{saved:?}");
        let meta = cache.lookup("k").unwrap();
        assert_eq!(&meta, new[0]);
        let out = d.path().join("out");
        std::fs::create_dir(&out).unwrap();
        cache.restore(&meta, &out).unwrap();
        assert_eq!(std::fs::read(out.join("data")).unwrap(), data);
        assert_eq!(temporaries(&cache), Vec::<String>::new());
        assert_eq!(cache.leftovers(), Usage::default());
    }

    #[test]
    fn an_archive_that_matches_its_record_but_does_not_decompress_is_damaged() {
        let d = tempfile::tempdir().unwrap();
        let cache = Cache::open(d.path()).unwrap();
        let root = d.path().join("root");
        tree(&root);
        let s = steps(&["create-file: /etc/a\ncontents: a"]).unwrap();
        let mut meta = cache
            .save(
                "k",
                &root,
                &BTreeSet::new(),
                "s",
                &s[0],
                KeyInputs::default(),
            )
            .unwrap()
            .into_meta();
        // What two writers of one temporary file made: a record of a broken archive.
        let archive = cache.archive("k");
        let mut bytes = std::fs::read(&archive).unwrap();
        let n = bytes.len();
        bytes[n / 2] ^= 0x55;
        bytes[n - 2] ^= 0x55;
        std::fs::write(&archive, &bytes).unwrap();
        meta.sha256 = sha256_reader(&mut bytes.as_slice()).unwrap();
        std::fs::write(cache.meta_path("k"), serde_json::to_string(&meta).unwrap()).unwrap();
        assert_eq!(cache.lookup("k"), Some(meta.clone()));
        let e = cache.verify(&meta).unwrap_err();
        assert!(e.is::<Damaged>());
        let e = format!("{e:#}");
        assert!(
            e.starts_with("cache entry k is damaged (it does not decompress: command failed"),
            "{e}"
        );
        let out = d.path().join("out");
        std::fs::create_dir(&out).unwrap();
        assert!(cache.restore(&meta, &out).is_err());
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0);
    }

    #[test]
    fn list_counts_and_prune_removes_leftovers() {
        let d = tempfile::tempdir().unwrap();
        let cache = Cache::open(d.path()).unwrap();
        // A SIGKILLed save of an older vmdb, a half entry, and a save in progress.
        std::fs::write(cache.dir.join(".k.1.tmp"), vec![0u8; 1000]).unwrap();
        std::fs::write(cache.dir.join("h.tar.zst"), vec![0u8; 10]).unwrap();
        let mut busy = Temp::new(&cache.dir, "b.tar.zst").unwrap();
        busy.file().write_all(&[0u8; 100]).unwrap();
        for p in [cache.dir.join(".k.1.tmp"), busy.path().to_path_buf()] {
            File::options()
                .write(true)
                .open(p)
                .unwrap()
                .set_modified(SystemTime::now() - std::time::Duration::from_secs(3600))
                .unwrap();
        }
        assert_eq!(
            cache.leftovers(),
            Usage {
                files: 3,
                bytes: 1110
            }
        );
        let pruned = cache.prune(None, None).unwrap();
        assert_eq!(
            pruned.leftovers,
            Usage {
                files: 2,
                bytes: 1010
            }
        );
        assert_eq!(
            cache.leftovers(),
            Usage {
                files: 1,
                bytes: 100
            }
        );
        drop(busy);
        assert_eq!(cache.leftovers(), Usage::default());
    }
}
