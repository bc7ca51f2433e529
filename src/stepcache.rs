//! The automatic step cache: the image tree after an expensive step is stored under a
//! key that hashes everything the tree depends on up to that step (the rendered steps,
//! the files they read, the tool versions that matter). A later build restores the
//! deepest state whose key still matches and runs on from there.
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

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::build::Options;
use crate::cachefile::{Temp, Usage, is_temporary, lock_dir, remove_orphans, temporaries_usage};
use crate::cmd::Cmd;
use crate::plugins::cache_rootfs::{Compression, mounted_virtuals, pack_argv};
use crate::plugins::unpack_rootfs::unpack_argv;
use crate::step::Step;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Setup,
    Tree,
    Volatile,
}

/// The role of a step type. Types not listed are volatile: never cached across.
pub fn role(kind: &str) -> Role {
    match kind {
        "mkimg"
        | "mklabel"
        | "mkpart"
        | "set_part_flag"
        | "kpartx"
        | "mkfs"
        | "mount"
        | "virtual-filesystems"
        | "echo"
        | "error"
        | "cryptsetup"
        | "vgcreate"
        | "lvcreate"
        | "lvscan" => Role::Setup,
        "debootstrap" | "qemu-debootstrap" | "apt" | "chroot" | "shell" | "ansible"
        | "create-file" | "create-dir" | "copy-file" | "copy-dir" | "unpack-rootfs"
        | "resize-rootfs" => Role::Tree,
        _ => Role::Volatile,
    }
}

/// Steps worth a cache entry even when quick (they need the network).
fn always_saved(kind: &str) -> bool {
    matches!(kind, "debootstrap" | "qemu-debootstrap" | "apt" | "ansible")
}

/// A tree step that ran at least this long gets a cache entry.
const SAVE_AFTER_SECS: f64 = 1.0;

/// Bumped when the entry format or the meaning of keys changes.
const FORMAT: &str = "vmdb-step-cache-1";

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
            if crate::cmd::interrupted() || !crate::app::in_path("zstd") {
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

    /// Store the tree at `root` as the state after `step`. The archive and its record
    /// are written under temporary names and renamed into place together, under the
    /// cache's lock; if another build saved the same state meanwhile, its entry stays.
    pub fn save(
        &self,
        key: &str,
        root: &Path,
        flags: &BTreeSet<String>,
        spec: &str,
        step: &Step,
    ) -> Result<Saved> {
        if let Some(m) = self.lookup(key) {
            return Ok(Saved::Existing(m));
        }
        let mut tmp = Temp::new(&self.dir, &format!("{key}.tar.zst"))?;
        let zstd = Compression::for_path(Path::new("x.tar.zst")).program(false);
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
        let zstd = Compression::for_path(Path::new("x.tar.zst")).program(false);
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

/// The SHA-256 of what is left to read in `f`.
pub fn sha256_reader(f: &mut impl Read) -> std::io::Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
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

/// The cache key of the state after each step: a hash chain over the steps.
pub fn keys(steps: &[Step], opts: &Options) -> Result<Vec<String>> {
    // The image is built under a name that changes with every run: keys use a fixed one.
    let built: Vec<&String> = ["output", "image"]
        .iter()
        .filter_map(|v| opts.vars.get(*v))
        .collect();
    let mut prev = format!("{FORMAT} vmdb {}", vmdb_identity());
    let mut tools = ToolVersions::default();
    let mut out = Vec::with_capacity(steps.len());
    for s in steps {
        let mut h = Sha256::new();
        h.update(prev.as_bytes());
        let mut text = match role(s.kind) {
            // A setup step matters to the tree only by where it mounts a filesystem:
            // the image's size or partitioning does not change what debootstrap makes.
            Role::Setup if s.kind == "mount" => format!(
                "mount {:?} on {:?}\n",
                s.opt_str("dirname").unwrap_or("/"),
                s.opt_str("mount-on")
            ),
            Role::Setup => String::new(),
            // Values only, not where they stand: a comment added above a step
            // changes nothing.
            _ => format!(
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
        h.update(text.as_bytes());
        inputs(s, opts, &mut tools, &mut h)?;
        prev = hex(&h.finalize());
        out.push(prev.clone());
    }
    Ok(out)
}

#[derive(Default)]
struct ToolVersions {
    debootstrap: Option<String>,
    mirror: Option<String>,
}

/// What a step reads besides its own text: files, the default mirror, tool versions.
fn inputs(s: &Step, opts: &Options, tools: &mut ToolVersions, h: &mut Sha256) -> Result<()> {
    let spec_path = |p: &str| {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            opts.spec_dir.join(p)
        }
    };
    match s.kind {
        "copy-file" | "copy-dir" => {
            if let Some(src) = s.opt_str("src") {
                hash_tree(&spec_path(src), h)?;
            }
        }
        "ansible" => {
            // The playbook's directory: roles, vars and templates beside it.
            if let Some(pb) = s.opt_str("playbook") {
                let pb = spec_path(pb);
                hash_tree(pb.parent().unwrap_or(Path::new(".")), h)?;
            }
        }
        "unpack-rootfs" => {
            // Whether the tarball is there decides what the step does.
            if let Some(t) = &opts.rootfs_tarball {
                if let Ok(m) = std::fs::metadata(t) {
                    use std::os::unix::fs::MetadataExt;
                    h.update(format!("tarball {} {} {}", m.len(), m.mtime(), m.ino()).as_bytes());
                }
            }
        }
        "debootstrap" | "qemu-debootstrap" => {
            // Either tool may do the step (its `tool: auto`), so both versions count.
            let v = tools.debootstrap.get_or_insert_with(|| {
                ["debootstrap", "mmdebstrap"]
                    .map(|p| {
                        let v = Cmd::new("dpkg-query")
                            .args(["-W", "-f", "${Version}", p])
                            .run()
                            .unwrap_or_default();
                        format!("{p} {v}")
                    })
                    .join(", ")
            });
            h.update(format!("bootstrap tools {v}\n").as_bytes());
            if !s.has("mirror") {
                let m = tools
                    .mirror
                    .get_or_insert_with(|| crate::mirror::host_default().unwrap_or_default());
                h.update(format!("mirror {m}\n").as_bytes());
            }
        }
        _ => {}
    }
    Ok(())
}

/// Hash a file or a directory tree: relative paths, modes, owners, link targets and
/// contents, in a fixed order.
fn hash_tree(path: &Path, h: &mut Sha256) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let m =
        std::fs::symlink_metadata(path).with_context(|| format!("reading {}", path.display()))?;
    h.update(format!("{:o} {} {}\n", m.mode(), m.uid(), m.gid()).as_bytes());
    if m.file_type().is_symlink() {
        h.update(std::fs::read_link(path)?.as_os_str().as_encoded_bytes());
    } else if m.is_dir() {
        let mut names: Vec<_> = std::fs::read_dir(path)?
            .flatten()
            .map(|e| e.file_name())
            .collect();
        names.sort();
        for n in names {
            h.update(n.as_encoded_bytes());
            h.update(b"\n");
            hash_tree(&path.join(&n), h)?;
        }
    } else if m.is_file() {
        let mut f = std::fs::File::open(path)?;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    Ok(())
}

/// Where a build can start from: the deepest cached state it may use.
#[derive(Debug)]
pub struct Plan {
    pub keys: Vec<String>,
    /// Index (into the steps) of the step whose state is restored, and its entry.
    pub restore: Option<(usize, Meta)>,
    /// Steps at or after this index are past a volatile step: never cached.
    pub first_volatile: usize,
}

pub fn plan(steps: &[Step], opts: &Options, cache: &Cache) -> Result<Plan> {
    let keys = keys(steps, opts)?;
    let first_volatile = steps
        .iter()
        .position(|s| role(s.kind) == Role::Volatile)
        .unwrap_or(steps.len());
    let mut restore = None;
    for i in (0..first_volatile).rev() {
        if role(steps[i].kind) != Role::Tree {
            continue;
        }
        let Some(meta) = cache.lookup(&keys[i]) else {
            continue;
        };
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
            }
            Err(e) => crate::log::warn(&format!("not using step cache entry {}: {e:#}", meta.key)),
        }
    }
    Ok(Plan {
        keys,
        restore,
        first_volatile,
    })
}

/// Whether the state after step `i`, which ran for `secs`, should be stored.
pub fn worth_saving(plan: &Plan, steps: &[Step], i: usize, secs: f64) -> bool {
    role(steps[i].kind) == Role::Tree
        && i < plan.first_volatile
        && plan.restore.as_ref().is_none_or(|(r, _)| i > *r)
        && (always_saved(steps[i].kind) || secs >= SAVE_AFTER_SECS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugins::testing::{plan_with_root, steps, validate_step};

    /// Validated steps whose relative paths are relative to `dir`.
    fn steps_in(dir: &Path, yaml: &[&str]) -> Vec<Step> {
        let mut plan = plan_with_root();
        plan.spec_dir = dir.to_path_buf();
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
            spec_dir: dir.to_path_buf(),
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
        let k1 = keys(&s, &opts(d.path())).unwrap();
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
        assert_eq!(keys(&s2, &o).unwrap(), k1);
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
        assert_eq!(keys(&s5, &opts(d.path())).unwrap(), k1);
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
        assert_eq!(keys(&s4, &opts(d.path())).unwrap()[1..], k1[1..]);
        // A copied file changes: that step and later ones change, earlier ones do not.
        std::fs::write(d.path().join("b.txt"), "two").unwrap();
        let k2 = keys(&s, &opts(d.path())).unwrap();
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
        let k3 = keys(&s3, &opts(d.path())).unwrap();
        assert_eq!(k3[0], k2[0]);
        assert!(k3[1..].iter().zip(&k2[1..]).all(|(a, b)| a != b));
    }

    #[test]
    fn roles_put_fstab_and_grub_past_the_cache() {
        assert_eq!(role("mount"), Role::Setup);
        assert_eq!(role("debootstrap"), Role::Tree);
        assert_eq!(role("fstab"), Role::Volatile);
        assert_eq!(role("grub"), Role::Volatile);
        assert_eq!(role("some-future-step"), Role::Volatile);
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
            .save("k1", &root, &flags, "spec.vmdb", &s[0])
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
                .save(k, &root, &BTreeSet::new(), "s", &s[0])
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
                .map(|_| sc.spawn(|| cache.save("k", &root, &BTreeSet::new(), "s", &s[0])))
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
            .save("k", &root, &BTreeSet::new(), "s", &s[0])
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
