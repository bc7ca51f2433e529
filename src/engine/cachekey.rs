//! What a step's cache key covers besides its own text, as its plugin declares it
//! (`Plugin::cache_inputs`): the host files it reads, the versions of the tools it
//! runs, and the package archives it fetches from. src/engine/stepcache.rs chains
//! these into the keys.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::digest::{Digest, Sha256, hex, update_from};
use crate::engine::build::Options;

/// A suite of a package archive whose state the step cache's keys follow: a rebuild
/// after it published new packages runs the steps that fetch from it again.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Archive {
    /// Where it says what state it is in (for Debian: the directory of its Release
    /// files).
    pub url: String,
    /// CA certificates (PEM) to trust for an https archive with a private authority.
    pub ca: Option<PathBuf>,
}

/// Small files are also read for package sources (apt's `deb URI SUITE` lines, deb822
/// stanzas): the archives a copied sources file names are followed.
const SOURCES_MAX_BYTES: u64 = 64 << 10;

/// The inputs of one step's key, as its plugin and the engine add them.
pub struct CacheInputs<'a> {
    opts: &'a Options,
    /// Each input by name ("file files/motd", "bootstrap tools", ...) with its hash or
    /// value.
    pub(super) items: BTreeMap<String, String>,
    /// The text of the small files read, to look for package sources in.
    pub(super) texts: Vec<String>,
    /// What stands for the step's text in the key, if not its values.
    pub(super) text: Option<String>,
    /// The archives the step fetches from (and that the image's sources then name).
    pub(super) fetches: Vec<Archive>,
    /// The step fetches from every archive the image's sources name by then.
    pub(super) fetches_from_sources: bool,
}

impl<'a> CacheInputs<'a> {
    pub(super) fn new(opts: &'a Options) -> CacheInputs<'a> {
        CacheInputs {
            opts,
            items: BTreeMap::new(),
            texts: Vec::new(),
            text: None,
            fetches: Vec::new(),
            fetches_from_sources: false,
        }
    }

    /// The build's options (the spec's directory, the --rootfs-tarball, ...).
    pub fn opts(&self) -> &Options {
        self.opts
    }

    /// The step reads the host file or directory `name` (relative to the spec's
    /// directory): its contents, modes and owners go into the key.
    pub fn file(&mut self, name: &str) -> Result<()> {
        let path = self.opts.spec_dir.path(name);
        self.file_at(name, &path)
    }

    /// The step reads the host file or directory at `path`, called `name`.
    pub fn file_at(&mut self, name: &str, path: &Path) -> Result<()> {
        let mut h = Sha256::new();
        hash_tree(path, true, &mut h, &mut self.texts)?;
        self.items
            .insert(format!("file {name}"), hex(&h.finalize()));
        Ok(())
    }

    /// The step reads the file at `path`, too big to hash on every build: its size,
    /// modification time and inode go into the key. Nothing when it is not there.
    pub fn file_identity(&mut self, path: &Path) {
        use std::os::unix::fs::MetadataExt;
        if let Ok(m) = std::fs::metadata(path) {
            self.items.insert(
                format!("file {}", path.display()),
                format!("{} {} {}", m.len(), m.mtime(), m.ino()),
            );
        }
    }

    /// A value the step depends on (a tool's version), shown as it is when it changes.
    pub fn value(&mut self, name: &str, value: impl Into<String>) {
        self.items.insert(name.to_string(), value.into());
    }

    /// What stands for the step's text in the key (by default: its values, for a
    /// setup step nothing).
    pub fn text(&mut self, text: String) {
        self.text = Some(text);
    }

    /// The step fetches packages from `archive`, which the image's sources then name.
    pub fn fetches(&mut self, archive: Archive) {
        self.fetches.push(archive);
    }

    /// The step fetches packages from the archives the image's sources name so far
    /// (as far as the spec shows them).
    pub fn fetches_from_sources(&mut self) {
        self.fetches_from_sources = true;
    }
}

/// Hash a file or a directory tree: relative paths, modes, owners, link targets and
/// contents, in a fixed order. A symbolic link at the top is followed (steps read
/// through it); those inside a directory are hashed as links. The text of small files
/// is added to `texts`.
pub(super) fn hash_tree(
    path: &Path,
    follow: bool,
    h: &mut Sha256,
    texts: &mut Vec<String>,
) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let m = if follow {
        std::fs::metadata(path)
    } else {
        std::fs::symlink_metadata(path)
    }
    .with_context(|| format!("reading {}", path.display()))?;
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
            hash_tree(&path.join(&n), false, h, texts)?;
        }
    } else if m.is_file() {
        let mut f =
            std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
        if m.len() <= SOURCES_MAX_BYTES {
            let mut data = Vec::new();
            f.read_to_end(&mut data)?;
            h.update(&data);
            if let Ok(t) = String::from_utf8(data) {
                texts.push(t);
            }
            return Ok(());
        }
        update_from(h, &mut f, |_| Ok(()))?;
    }
    Ok(())
}
