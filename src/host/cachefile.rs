//! Writing into the caches when several builds share them. Every file is written under
//! a unique temporary name (a dot, the final name, random letters: a PID would not do,
//! as every build runs as PID 1 of its own PID namespace), held locked with flock(2)
//! while it is written, and renamed into place only when complete. A temporary that
//! no one holds locked and that is older than a short grace period was left by a
//! writer that died (SIGKILL, a power cut): `vmdb cache prune` removes it.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use rustix::fs::{FlockOperation, flock};

/// How long an unlocked temporary may be a writer's that has not locked it yet.
pub const GRACE: Duration = Duration::from_secs(60);

/// A temporary file in a cache directory, locked while this value lives; removed when
/// dropped unless renamed into place.
pub struct Temp {
    file: tempfile::NamedTempFile,
}

impl Temp {
    /// A new empty temporary for the file `name` in `dir`.
    pub fn new(dir: &Path, name: &str) -> Result<Temp> {
        let file = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .suffix(".tmp")
            .tempfile_in(dir)
            .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
        lock(file.as_file()).with_context(|| format!("locking {}", file.path().display()))?;
        Ok(Temp { file })
    }

    pub fn path(&self) -> &Path {
        self.file.path()
    }

    pub fn file(&mut self) -> &mut File {
        self.file.as_file_mut()
    }

    /// Rename into place, replacing what is there.
    pub fn persist(self, dest: &Path) -> Result<()> {
        self.file
            .persist(dest)
            .map(drop)
            .map_err(|e| e.error)
            .with_context(|| format!("renaming a temporary file to {}", dest.display()))
    }

    /// Rename into place unless `dest` exists; false (and the temporary removed) if it
    /// did: of two writers of the same file, the first one wins.
    pub fn persist_new(self, dest: &Path) -> Result<bool> {
        match self.file.persist_noclobber(dest) {
            Ok(_) => Ok(true),
            Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e.error)
                .with_context(|| format!("renaming a temporary file to {}", dest.display())),
        }
    }
}

/// Lock a temporary file that is being written, until it is closed: `remove_orphans`
/// leaves it alone, however old it is.
pub fn lock(f: &File) -> std::io::Result<()> {
    flock(f, FlockOperation::NonBlockingLockExclusive).map_err(Into::into)
}

/// Hold an exclusive lock on `dir` (for changes that take more than one rename) until
/// the returned handle is dropped.
pub fn lock_dir(dir: &Path) -> Result<File> {
    let f = File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    flock(&f, FlockOperation::LockExclusive)
        .with_context(|| format!("locking {}", dir.display()))?;
    Ok(f)
}

/// A number of files and their size.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub files: usize,
    pub bytes: u64,
}

impl Usage {
    pub fn add(&mut self, bytes: u64) {
        self.files += 1;
        self.bytes += bytes;
    }
}

impl std::ops::AddAssign for Usage {
    fn add_assign(&mut self, o: Usage) {
        self.files += o.files;
        self.bytes += o.bytes;
    }
}

/// Whether a name in a cache directory is a temporary one (a dot first).
pub fn is_temporary(name: &str) -> bool {
    name.starts_with('.')
}

/// The files in `dir` whose names `wanted` accepts, with their sizes.
fn files(dir: &Path, wanted: impl Fn(&str) -> bool) -> Vec<(PathBuf, std::fs::Metadata)> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| wanted(&e.file_name().to_string_lossy()))
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            m.is_file().then(|| (e.path(), m))
        })
        .collect()
}

/// The temporary files in `dir`: writes in progress and those left by dead writers.
pub fn temporaries_usage(dir: &Path) -> Usage {
    let mut u = Usage::default();
    for (_, m) in files(dir, is_temporary) {
        u.add(m.len());
    }
    u
}

/// Remove the temporaries in `dir` that no writer holds: unlocked, and older than
/// the grace period. Returns what went.
pub fn remove_orphans(dir: &Path) -> Usage {
    remove_orphans_named(dir, is_temporary)
}

/// `remove_orphans` for the files in `dir` whose names `temporary` accepts.
pub fn remove_orphans_named(dir: &Path, temporary: impl Fn(&str) -> bool) -> Usage {
    let mut gone = Usage::default();
    let now = SystemTime::now();
    for (path, m) in files(dir, temporary) {
        let age = m
            .modified()
            .ok()
            .and_then(|t| now.duration_since(t).ok())
            .unwrap_or_default();
        if age < GRACE {
            continue;
        }
        let Ok(f) = File::open(&path) else { continue };
        // Locked: a writer is at work on it, however old it is.
        if lock(&f).is_err() {
            continue;
        }
        if std::fs::remove_file(&path).is_ok() {
            gone.add(m.len());
        }
    }
    gone
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Make a file look `secs` old.
    pub fn age(p: &Path, secs: u64) {
        let t = SystemTime::now() - Duration::from_secs(secs);
        File::options()
            .write(true)
            .open(p)
            .unwrap()
            .set_modified(t)
            .unwrap();
    }

    #[test]
    fn temporaries_are_unique_locked_and_only_orphans_are_removed() {
        let d = tempfile::tempdir().unwrap();
        let mut a = Temp::new(d.path(), "k.tar.zst").unwrap();
        let b = Temp::new(d.path(), "k.tar.zst").unwrap();
        assert_ne!(a.path(), b.path());
        let name = a.path().file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.starts_with(".k.tar.zst.") && name.ends_with(".tmp"),
            "{name}"
        );
        use std::io::Write;
        a.file().write_all(b"12345").unwrap();
        // Left by an old vmdb (no lock) and by a SIGKILLed writer (lock gone with it).
        let old = d.path().join(".k.1.tmp");
        std::fs::write(&old, b"abc").unwrap();
        let fresh = d.path().join(".k.2.tmp");
        std::fs::write(&fresh, b"abcd").unwrap();
        std::fs::write(d.path().join("k.json"), b"{}").unwrap();
        assert_eq!(
            temporaries_usage(d.path()),
            Usage {
                files: 4,
                bytes: 12
            }
        );
        // Old but still locked by its writer: kept.
        age(a.path(), 3600);
        age(&old, 3600);
        assert_eq!(remove_orphans(d.path()), Usage { files: 1, bytes: 3 });
        assert!(!old.exists() && fresh.exists() && a.path().exists() && b.path().exists());
        // Renamed into place: the first one wins with persist_new.
        let dest = d.path().join("k.tar.zst");
        assert!(a.persist_new(&dest).unwrap());
        let bp = b.path().to_path_buf();
        assert!(!b.persist_new(&dest).unwrap());
        assert!(!bp.exists());
        assert_eq!(std::fs::read(&dest).unwrap(), b"12345");
    }
}
