//! What the builds running on this machine hold, in /run/vmdb:
//!
//! - `outputs/KEY.lock`, one per output (its absolute path, or a block device's number):
//!   a build holds its lock (flock) from before it starts until its outputs are in place
//!   or removed, so that a second build to the same output stops at once and says who
//!   builds it, instead of both running and the last one silently winning.
//! - `builds/PID-XXXXXX.json`, one per build: where its scratch directory and its image's
//!   temporary name are. The scratch directory's report.json names every other temporary
//!   file the build makes beside its outputs (and it is written before the file is).
//!   vmdb holds the entry's lock for as long as the build runs (the build process
//!   inherits it), and the kernel releases it when both are gone, however they died. So
//!   an entry whose lock is free belongs to a dead build, and any later vmdb build removes
//!   what it left. PIDs cannot tell that: every build is PID 1 in its own namespace, and
//!   PIDs are reused.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::log;
use crate::output::{Report, remove_path};

pub const RUN_DIR: &str = "/run/vmdb";

fn dir(sub: &str) -> Result<PathBuf> {
    let d = Path::new(RUN_DIR).join(sub);
    std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    Ok(d)
}

/// Take the exclusive flock of `file` without waiting: false when another open file
/// description holds it. It is let go when the file is closed. (std's File::try_lock
/// needs Rust 1.89; Debian 13 builds with 1.85.)
fn try_lock(file: &File) -> std::io::Result<bool> {
    match rustix::fs::flock(file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// The lock of one output, held until dropped (or `release`d).
#[derive(Debug)]
pub struct OutputLock {
    path: PathBuf,
    file: File,
}

/// Take the lock of the output `shown` (as the user named it), identified by `key`
/// (its absolute path, or a block device's number). Fails, saying which vmdb holds it,
/// if another build has it.
pub fn lock_output(key: &str, shown: &Path) -> Result<OutputLock> {
    use crate::digest::{Digest, Sha256, hex};
    let sum = hex(&Sha256::digest(key.as_bytes())[..16]);
    let path = dir("outputs")?.join(format!("{sum}.lock"));
    // The file may be removed by its holder between our open and our lock: then the
    // lock is on a file nobody else will find, and we try again.
    for _ in 0..100 {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        match try_lock(&file) {
            Ok(true) => {}
            Ok(false) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                let who = match text.lines().next().and_then(|l| l.parse::<u32>().ok()) {
                    Some(pid) => format!("another vmdb (PID {pid})"),
                    None => "another vmdb".to_string(),
                };
                bail!(
                    "{who} is building {}: wait for it to finish, or stop it",
                    shown.display()
                );
            }
            Err(e) => {
                return Err(e).with_context(|| format!("locking {}", path.display()));
            }
        }
        let same = std::fs::metadata(&path)
            .ok()
            .zip(file.metadata().ok())
            .is_some_and(|(a, b)| a.ino() == b.ino() && a.dev() == b.dev());
        if !same {
            continue;
        }
        file.set_len(0)?;
        file.write_all(format!("{}\n{key}\n", std::process::id()).as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
        return Ok(OutputLock { path, file });
    }
    bail!("could not lock {}", path.display())
}

impl OutputLock {
    /// Remove the lock file and let go: the next build finds no file, or a new one.
    pub fn release(self) {
        let _ = std::fs::remove_file(&self.path);
        drop(self.file);
    }
}

/// What the next vmdb needs to clean up after a build that died.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Entry {
    /// vmdb's PID (for people reading the file).
    pub pid: u32,
    pub output: PathBuf,
    /// The scratch directory, with report.json naming the build's temporary files.
    pub scratch: PathBuf,
    /// Temporary files known before the build starts (the image's temporary name).
    pub temporaries: Vec<PathBuf>,
}

/// This build's entry, locked while the build runs.
#[derive(Debug)]
pub struct InFlight {
    path: PathBuf,
    _file: File,
}

impl InFlight {
    pub fn register(entry: &Entry) -> Result<InFlight> {
        let builds = dir("builds")?;
        // Made and locked under a name the cleaner does not look at, then renamed,
        // so that no other vmdb ever sees it unlocked.
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{}-", std::process::id()))
            .tempfile_in(&builds)
            .with_context(|| format!("creating an entry in {}", builds.display()))?;
        if !try_lock(tmp.as_file()).with_context(|| format!("locking {}", tmp.path().display()))? {
            bail!("{} is locked by another process", tmp.path().display());
        }
        let data = serde_json::to_vec(entry).context("encoding the build's entry")?;
        tmp.as_file()
            .write_all(&data)
            .with_context(|| format!("writing {}", tmp.path().display()))?;
        let name = tmp
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().trim_start_matches('.').to_string())
            .unwrap_or_default();
        let path = builds.join(format!("{name}.json"));
        let file = tmp
            .persist(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(InFlight { path, _file: file })
    }

    /// The build is over and its files are in place or removed.
    pub fn done(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Remove what dead builds left behind: their temporary files beside their outputs
/// and their scratch directories. Entries of live builds are left alone.
pub fn clean_stale() {
    let Ok(builds) = dir("builds") else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(&builds) else {
        return;
    };
    let me = format!("{}-", std::process::id());
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            // An entry being made; one that stayed so (vmdb killed while making it)
            // names nothing yet.
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age.as_secs() > 60);
            if old && File::open(e.path()).is_ok_and(|f| matches!(try_lock(&f), Ok(true))) {
                let _ = std::fs::remove_file(e.path());
            }
            continue;
        }
        if !name.ends_with(".json") {
            continue;
        }
        let Ok(mut file) = File::open(e.path()) else {
            continue;
        };
        // An entry left by an earlier vmdb with our own PID names the same temporary
        // files as ours will: give any other vmdb cleaning it up the time to finish.
        let tries = if name.starts_with(&me) { 50 } else { 1 };
        let locked = (0..tries).any(|i| {
            if i > 0 {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            matches!(try_lock(&file), Ok(true))
        });
        if !locked {
            continue;
        }
        let mut text = String::new();
        let entry: Entry = file
            .read_to_string(&mut text)
            .ok()
            .and_then(|_| serde_json::from_str(&text).ok())
            .unwrap_or_default();
        remove_leftovers(&entry);
        let _ = std::fs::remove_file(e.path());
        log::verbose(&format!(
            "vmdb: removed what a killed vmdb (PID {}) left of its build of {}",
            entry.pid,
            entry.output.display()
        ));
    }
}

fn remove_leftovers(entry: &Entry) {
    if !entry.scratch.as_os_str().is_empty() {
        let report = Report::load(&entry.scratch);
        for f in &report.files {
            // An output written in place (a block device) is never a temporary.
            if f.path.as_ref() != Some(&f.partial) {
                remove_path(&f.partial);
            }
        }
        remove_path(&entry.scratch);
    }
    for t in &entry.temporaries {
        remove_path(t);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftovers_named_by_the_report_are_removed_but_never_an_output() {
        let d = tempfile::tempdir().unwrap();
        let p = |n: &str| d.path().join(n);
        let scratch = p("scratch");
        std::fs::create_dir(&scratch).unwrap();
        for n in [
            ".a.vmdb-partial-9",
            ".a.raw",
            "a",
            "dev",
            ".img.vmdb-partial-9",
        ] {
            std::fs::write(p(n), n).unwrap();
        }
        let file = |partial: &str, path: Option<&str>| crate::output::OutFile {
            partial: p(partial),
            path: path.map(p),
            kind: crate::output::OutKind::Image,
            format: None,
            size: None,
            sha256: None,
        };
        Report {
            files: vec![
                file(".a.vmdb-partial-9", Some("a")),
                file(".a.raw", None),
                file("dev", Some("dev")),
            ],
            ..Report::default()
        }
        .save(&scratch)
        .unwrap();
        remove_leftovers(&Entry {
            pid: 9,
            output: p("img"),
            scratch,
            temporaries: vec![p(".img.vmdb-partial-9")],
        });
        let mut left: Vec<String> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["a", "dev"]);
    }
}
