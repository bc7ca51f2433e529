//! Paths inside the image, resolved as the image itself would resolve them.
//!
//! An image's tree has symbolic links of its own: Debian ships `/var/run -> /run`, and a
//! rootfs tarball or an earlier step may hold any link. A host path joined onto the
//! mount point follows those links on the host, so `/var/run/x` would land in the
//! host's /run. Every lookup here goes through openat2(2) with RESOLVE_IN_ROOT from a
//! descriptor of the image's root: absolute links and `..` stop at that root, as they
//! would for a program chrooted into the image, and no path can lead out of it.
//! (A capability-directory crate such as cap-std refuses absolute links instead of
//! resolving them inside the tree, which would break `/var/run/x` on every Debian image.)
//!
//! Changes are made through descriptors: the last component is created, replaced or
//! removed with *at calls on its resolved parent and is never followed; modes and
//! owners are set with fchmod/fchown on the open file. Nothing is written into the
//! host's virtual filesystems (proc, sysfs, the host's /dev ...) when a build has
//! mounted them in the image.

use std::ffi::OsString;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use rustix::fs::{AtFlags, FileType, Gid, Mode, OFlags, ResolveFlags, Uid};
use rustix::io::Errno;

/// The root directory of an image, opened once; every path is looked up below it.
pub struct ImageRoot {
    dir: OwnedFd,
    /// The host path of the root (canonical), to check paths handed to host tools.
    host: PathBuf,
}

/// One entry of a directory in the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: OsString,
    pub kind: FileType,
}

/// The step's value must be a usable path in the image (checked at validation).
pub fn check_path(path: &str) -> Result<()> {
    parts(Path::new(path)).map(|_| ())
}

/// The normal components of an image path ("/etc/x", "etc/x" and "etc/./x" are one).
fn parts(path: &Path) -> Result<Vec<&std::ffi::OsStr>> {
    let mut v = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => v.push(n),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => bail!("path '{}' must not contain '..'", path.display()),
            Component::Prefix(_) => bail!("path '{}' is not a path in the image", path.display()),
        }
    }
    Ok(v)
}

/// How the image shows a path: absolute, normalised.
fn shown(parts: &[&std::ffi::OsStr]) -> String {
    let mut s = String::new();
    for p in parts {
        s.push('/');
        s.push_str(&p.to_string_lossy());
    }
    if s.is_empty() {
        s.push('/');
    }
    s
}

/// The relative path openat2 resolves below the root ("." for the root itself).
fn rel(parts: &[&std::ffi::OsStr]) -> PathBuf {
    if parts.is_empty() {
        PathBuf::from(".")
    } else {
        parts.iter().collect()
    }
}

fn is_missing(e: Errno) -> bool {
    e == Errno::NOENT || e == Errno::NOTDIR
}

/// The host's own filesystems that a build mounts in the image (virtual-filesystems,
/// chroot steps): writing there changes the host, not the image.
fn host_filesystem(fd: &OwnedFd) -> Result<Option<&'static str>> {
    let fs = rustix::fs::fstatfs(fd)?;
    // The magic numbers are 32 bits; f_type is signed and of the platform's width.
    let name = match fs.f_type as u32 {
        0x9fa0 => "proc filesystem",
        0x6265_6572 => "sysfs",
        0x1cd1 => "devpts",
        0x6367_7270 | 0x0027_e0eb => "cgroup filesystem",
        0x7363_6673 => "securityfs",
        0x6462_6720 => "debugfs",
        0x7472_6163 => "tracefs",
        0xde5e_81e4 => "efivarfs",
        0x4249_4e4d => "binfmt_misc",
        0xcafe_4a11 => "bpf filesystem",
        _ => {
            // devtmpfs is a tmpfs by its magic: the host's /dev (when it is a
            // filesystem of its own) is recognised by its device.
            let here = rustix::fs::fstat(fd)?.st_dev;
            match (rustix::fs::stat("/dev"), rustix::fs::stat("/")) {
                (Ok(dev), Ok(root)) if dev.st_dev == here && dev.st_dev != root.st_dev => "/dev",
                _ => return Ok(None),
            }
        }
    };
    Ok(Some(name))
}

/// Set the owner (first: chown clears set-id bits), then the mode, of an open file.
fn set_owner_mode(fd: &OwnedFd, owner: Option<(u32, u32)>, mode: Option<u32>) -> Result<()> {
    if let Some((uid, gid)) = owner {
        rustix::fs::fchown(
            fd,
            Some(Uid::from_raw_unchecked(uid)),
            Some(Gid::from_raw_unchecked(gid)),
        )
        .with_context(|| format!("changing the owner to {uid}:{gid}"))?;
    }
    if let Some(mode) = mode {
        rustix::fs::fchmod(fd, Mode::from_raw_mode(mode))
            .with_context(|| format!("setting the mode to {mode:04o}"))?;
    }
    Ok(())
}

impl ImageRoot {
    /// Open the image whose root is the host directory `root`.
    pub fn open(root: &Path) -> Result<ImageRoot> {
        let host = std::fs::canonicalize(root)
            .with_context(|| format!("the image's root {}", root.display()))?;
        let dir = rustix::fs::open(
            &host,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .with_context(|| format!("opening the image's root {}", host.display()))?;
        Ok(ImageRoot { dir, host })
    }

    /// The host directory of the image's root.
    pub fn host_root(&self) -> &Path {
        &self.host
    }

    /// Open `parts` below the root, resolving every symbolic link inside the image.
    fn resolve(&self, parts: &[&std::ffi::OsStr], flags: OFlags) -> Result<OwnedFd, Errno> {
        let how = ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS;
        let path = rel(parts);
        let open = || {
            rustix::fs::openat2(
                &self.dir,
                &path,
                flags | OFlags::CLOEXEC,
                Mode::empty(),
                how,
            )
        };
        // The kernel asks for a retry when a rename raced with the lookup.
        let mut r = open();
        for _ in 0..100 {
            if !matches!(r, Err(Errno::AGAIN)) {
                break;
            }
            r = open();
        }
        r
    }

    fn open_dir(&self, parts: &[&std::ffi::OsStr]) -> Result<OwnedFd, Errno> {
        self.resolve(parts, OFlags::RDONLY | OFlags::DIRECTORY)
    }

    /// The kind of thing at `path`, following symbolic links inside the image; None
    /// when there is nothing.
    pub fn kind(&self, path: impl AsRef<Path>) -> Result<Option<FileType>> {
        let p = parts(path.as_ref())?;
        match self.resolve(&p, OFlags::PATH) {
            Ok(fd) => Ok(Some(FileType::from_raw_mode(
                rustix::fs::fstat(&fd)?.st_mode,
            ))),
            Err(e) if is_missing(e) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot look up {} in the image", shown(&p))),
        }
    }

    /// The kind of the entry at `path` itself (a symbolic link is not followed).
    pub fn kind_nofollow(&self, path: impl AsRef<Path>) -> Result<Option<FileType>> {
        let p = parts(path.as_ref())?;
        let Some((name, dir)) = p.split_last() else {
            return Ok(Some(FileType::Directory));
        };
        let parent = match self.open_dir(dir) {
            Ok(fd) => fd,
            Err(e) if is_missing(e) => return Ok(None),
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("cannot look up {} in the image", shown(&p)));
            }
        };
        match rustix::fs::statat(&parent, *name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(FileType::from_raw_mode(st.st_mode))),
            Err(e) if is_missing(e) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot look up {} in the image", shown(&p))),
        }
    }

    pub fn exists(&self, path: impl AsRef<Path>) -> Result<bool> {
        Ok(self.kind(path)?.is_some())
    }

    pub fn is_dir(&self, path: impl AsRef<Path>) -> Result<bool> {
        Ok(self.kind(path)? == Some(FileType::Directory))
    }

    pub fn is_file(&self, path: impl AsRef<Path>) -> Result<bool> {
        Ok(self.kind(path)? == Some(FileType::RegularFile))
    }

    /// The host path of what `path` names in the image, for host tools that take a
    /// path (mount, grub-install, dpkg-query): it has no symbolic link left in it.
    pub fn host_path(&self, path: impl AsRef<Path>) -> Result<PathBuf> {
        let p = parts(path.as_ref())?;
        let fd = self
            .resolve(&p, OFlags::PATH)
            .with_context(|| format!("cannot find {} in the image", shown(&p)))?;
        self.host_path_of(&fd, &p)
    }

    fn host_path_of(&self, fd: &OwnedFd, p: &[&std::ffi::OsStr]) -> Result<PathBuf> {
        let link = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(fd));
        let host = std::fs::read_link(&link)
            .with_context(|| format!("cannot find {} in the image", shown(p)))?;
        if !host.starts_with(&self.host) {
            bail!(
                "cannot use {} in the image: it is at {}, outside the image's root {}",
                shown(p),
                host.display(),
                self.host.display()
            );
        }
        Ok(host)
    }

    /// The entries of the directory `path`, or None if there is no such directory.
    pub fn read_dir(&self, path: impl AsRef<Path>) -> Result<Option<Vec<Entry>>> {
        let p = parts(path.as_ref())?;
        let what = || format!("cannot read the directory {} in the image", shown(&p));
        let fd = match self.open_dir(&p) {
            Ok(fd) => fd,
            Err(e) if is_missing(e) => return Ok(None),
            Err(e) => return Err(e).with_context(what),
        };
        let mut entries = Vec::new();
        for e in rustix::fs::Dir::read_from(&fd).with_context(what)? {
            let e = e.with_context(what)?;
            let name = e.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            let name = std::ffi::OsStr::from_bytes(name).to_os_string();
            let kind = match e.file_type() {
                FileType::Unknown => FileType::from_raw_mode(
                    rustix::fs::statat(&fd, name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW)
                        .with_context(what)?
                        .st_mode,
                ),
                k => k,
            };
            entries.push(Entry { name, kind });
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Some(entries))
    }

    /// Open the regular file `path` for reading, or None if there is none.
    pub fn open_file(&self, path: impl AsRef<Path>) -> Result<Option<std::fs::File>> {
        let p = parts(path.as_ref())?;
        let what = || format!("cannot read {} in the image", shown(&p));
        // Non-blocking: opening a FIFO for reading must not wait for a writer.
        let fd = match self.resolve(&p, OFlags::RDONLY | OFlags::NONBLOCK) {
            Ok(fd) => fd,
            Err(e) if is_missing(e) => return Ok(None),
            Err(e) => return Err(e).with_context(what),
        };
        let st = rustix::fs::fstat(&fd).with_context(what)?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            bail!("{}: it is not a regular file", what());
        }
        rustix::fs::fcntl_setfl(&fd, OFlags::empty()).with_context(what)?;
        Ok(Some(std::fs::File::from(fd)))
    }

    /// The contents of the regular file `path`, or None if there is none.
    pub fn read(&self, path: impl AsRef<Path>) -> Result<Option<Vec<u8>>> {
        let path = path.as_ref();
        let Some(mut f) = self.open_file(path)? else {
            return Ok(None);
        };
        let mut data = Vec::new();
        f.read_to_end(&mut data)
            .with_context(|| format!("cannot read {} in the image", path.display()))?;
        Ok(Some(data))
    }

    /// Copy the host file `src` to `path` in the image (as `write_file`, owner kept).
    pub fn copy_in(&self, src: &Path, path: impl AsRef<Path>, mode: u32) -> Result<()> {
        let mut f =
            std::fs::File::open(src).with_context(|| format!("cannot read {}", src.display()))?;
        self.write_file(path, &mut f, mode, None)
    }

    /// Copy the regular file `path` of the image to the host file `dest`.
    pub fn copy_out(&self, path: impl AsRef<Path>, dest: &Path) -> Result<()> {
        let path = path.as_ref();
        let mut f = self
            .open_file(path)?
            .with_context(|| format!("cannot read {} in the image: it is gone", path.display()))?;
        let mut out = std::fs::File::create(dest)
            .with_context(|| format!("cannot create {}", dest.display()))?;
        std::io::copy(&mut f, &mut out)
            .with_context(|| format!("copying {} to {}", path.display(), dest.display()))?;
        Ok(())
    }

    /// Make the directory `path` and its missing parents (mode 0755), as `mkdir -p`
    /// would in the image. A new directory at `path` gets `mode`; an existing one, or
    /// a symbolic link to one inside the image, is used as it is, and a symbolic link
    /// to nothing there is replaced by the new directory. Returns the directory, open,
    /// and whether it was made.
    pub fn create_dir_all(&self, path: impl AsRef<Path>, mode: u32) -> Result<(OwnedFd, bool)> {
        let p = parts(path.as_ref())?;
        self.make_dirs(&p, mode, true)
            .with_context(|| format!("cannot create the directory {} in the image", shown(&p)))
    }

    fn make_dirs(
        &self,
        p: &[&std::ffi::OsStr],
        mode: u32,
        replace_dangling: bool,
    ) -> Result<(OwnedFd, bool)> {
        let mut dir = self.open_dir(&[]).map_err(|e| anyhow!(e))?;
        let mut created = false;
        for i in 0..p.len() {
            let last = i + 1 == p.len();
            match self.open_dir(&p[..=i]) {
                Ok(fd) => {
                    dir = fd;
                    created = false;
                    continue;
                }
                Err(Errno::NOENT) => {}
                Err(Errno::NOTDIR) => {
                    let what = if last { "exists and is" } else { "is" };
                    bail!("{} {what} not a directory", shown(&p[..=i]));
                }
                Err(e) => return Err(e).context(shown(&p[..=i])),
            }
            // Missing: made in its parent, which is `dir` (resolved inside the image).
            let m = if last { mode } else { 0o755 };
            self.refuse_host_fs(&dir, &p[..=i])?;
            match rustix::fs::mkdirat(&dir, p[i], Mode::from_raw_mode(m)) {
                Ok(()) => {}
                Err(Errno::EXIST) if last && replace_dangling => {
                    // A symbolic link to nothing in the image.
                    rustix::fs::unlinkat(&dir, p[i], AtFlags::empty())
                        .with_context(|| format!("replacing the link {}", shown(&p[..=i])))?;
                    rustix::fs::mkdirat(&dir, p[i], Mode::from_raw_mode(m))?;
                }
                Err(Errno::EXIST) => {
                    bail!(
                        "{} is a symbolic link to nothing in the image",
                        shown(&p[..=i])
                    )
                }
                Err(e) => return Err(e.into()),
            }
            dir = rustix::fs::openat(
                &dir,
                p[i],
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            // The umask may have taken bits away.
            rustix::fs::fchmod(&dir, Mode::from_raw_mode(m))?;
            created = true;
        }
        Ok((dir, created))
    }

    fn refuse_host_fs(&self, dir: &OwnedFd, p: &[&std::ffi::OsStr]) -> Result<()> {
        match host_filesystem(dir)? {
            Some(fs) => bail!("{} is in the host's {fs} (mounted in the image)", shown(p)),
            None => Ok(()),
        }
    }

    /// Write a regular file at `path` (making missing parents, mode 0755), replacing
    /// whatever file or symbolic link is there (a link is never followed), then give it
    /// `owner` (if any) and `mode`.
    pub fn write_file(
        &self,
        path: impl AsRef<Path>,
        data: &mut dyn Read,
        mode: u32,
        owner: Option<(u32, u32)>,
    ) -> Result<()> {
        let p = parts(path.as_ref())?;
        let what = || format!("cannot write {} in the image", shown(&p));
        let Some((name, dir)) = p.split_last() else {
            bail!("{}: it is a directory", what());
        };
        let (parent, _) = self.make_dirs(dir, 0o755, false).with_context(what)?;
        self.replace(&parent, name, &p).with_context(what)?;
        let mut write = || -> Result<()> {
            let fd = rustix::fs::openat(
                &parent,
                *name,
                OFlags::WRONLY
                    | OFlags::CREATE
                    | OFlags::TRUNC
                    | OFlags::NOFOLLOW
                    | OFlags::NOCTTY
                    | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )?;
            let mut file = std::fs::File::from(fd);
            std::io::copy(data, &mut file)?;
            set_owner_mode(&OwnedFd::from(file), owner, Some(mode))
        };
        write().with_context(what)
    }

    /// Make room for a new entry `name` in `parent`: a file or symbolic link there is
    /// removed; a directory or anything that is not a regular file is an error.
    fn replace(
        &self,
        parent: &OwnedFd,
        name: &std::ffi::OsStr,
        p: &[&std::ffi::OsStr],
    ) -> Result<()> {
        self.refuse_host_fs(parent, p)?;
        match rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => match FileType::from_raw_mode(st.st_mode) {
                FileType::RegularFile => Ok(()),
                FileType::Symlink => Ok(rustix::fs::unlinkat(parent, name, AtFlags::empty())
                    .context("removing the symbolic link there")?),
                FileType::Directory => bail!("it is a directory"),
                _ => bail!("it is not a regular file"),
            },
            Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Make `path` a symbolic link to `target` (text kept as it is), replacing a file
    /// or link there; missing parents are made (mode 0755).
    pub fn symlink(&self, target: &Path, path: impl AsRef<Path>) -> Result<()> {
        let p = parts(path.as_ref())?;
        let what = || format!("cannot make the symbolic link {} in the image", shown(&p));
        let Some((name, dir)) = p.split_last() else {
            bail!("{}: it is a directory", what());
        };
        let (parent, _) = self.make_dirs(dir, 0o755, false).with_context(what)?;
        self.refuse_host_fs(&parent, &p).with_context(what)?;
        match rustix::fs::statat(&parent, *name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
                bail!("{}: it is a directory", what())
            }
            Ok(_) => rustix::fs::unlinkat(&parent, *name, AtFlags::empty()).with_context(what)?,
            Err(Errno::NOENT) => {}
            Err(e) => return Err(e).with_context(what),
        }
        rustix::fs::symlinkat(target, &parent, *name).with_context(what)
    }

    /// Give the entry `path` itself (a symbolic link is not followed) an owner.
    pub fn lchown(&self, path: impl AsRef<Path>, uid: u32, gid: u32) -> Result<()> {
        let p = parts(path.as_ref())?;
        let what = || {
            format!(
                "cannot change the owner of {} in the image to {uid}:{gid}",
                shown(&p)
            )
        };
        let Some((name, dir)) = p.split_last() else {
            let fd = self
                .open_dir(&[])
                .map_err(|e| anyhow!(e))
                .with_context(what)?;
            return set_owner_mode(&fd, Some((uid, gid)), None).with_context(what);
        };
        let parent = self.open_dir(dir).with_context(what)?;
        self.refuse_host_fs(&parent, &p).with_context(what)?;
        rustix::fs::chownat(
            &parent,
            *name,
            Some(Uid::from_raw_unchecked(uid)),
            Some(Gid::from_raw_unchecked(gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .with_context(what)
    }

    /// Give an open directory of the image (from `create_dir_all`) an owner, then a mode.
    pub fn set_owner_mode(
        &self,
        dir: &OwnedFd,
        path: impl AsRef<Path>,
        owner: Option<(u32, u32)>,
        mode: Option<u32>,
    ) -> Result<()> {
        let p = parts(path.as_ref())?;
        let what = || {
            format!(
                "cannot set the owner and mode of {} in the image",
                shown(&p)
            )
        };
        self.refuse_host_fs(dir, &p).with_context(what)?;
        set_owner_mode(dir, owner, mode).with_context(what)
    }

    /// Remove the file or symbolic link `path` (a link is removed, not followed).
    /// Returns whether there was one.
    pub fn remove_file(&self, path: impl AsRef<Path>) -> Result<bool> {
        let p = parts(path.as_ref())?;
        let what = || format!("cannot remove {} in the image", shown(&p));
        let Some((name, dir)) = p.split_last() else {
            bail!("{}: it is a directory", what());
        };
        let parent = match self.open_dir(dir) {
            Ok(fd) => fd,
            Err(e) if is_missing(e) => return Ok(false),
            Err(e) => return Err(e).with_context(what),
        };
        self.refuse_host_fs(&parent, &p).with_context(what)?;
        match rustix::fs::unlinkat(&parent, *name, AtFlags::empty()) {
            Ok(()) => Ok(true),
            Err(Errno::NOENT) => Ok(false),
            Err(Errno::ISDIR) => bail!("{}: it is a directory", what()),
            Err(e) => Err(e).with_context(what),
        }
    }

    /// Make the directory `path` (as `create_dir_all`, new ones mode 0755) and return
    /// its host path, for mounting something on it.
    pub fn mount_point(&self, path: impl AsRef<Path>) -> Result<PathBuf> {
        let p = parts(path.as_ref())?;
        let (fd, _) = self
            .make_dirs(&p, 0o755, false)
            .with_context(|| format!("cannot create the mount point {} in the image", shown(&p)))?;
        self.host_path_of(&fd, &p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, symlink};

    /// An image root with hostile links, and a canary directory on the host that
    /// nothing may touch.
    struct Hostile {
        _tmp: tempfile::TempDir,
        root: PathBuf,
        canary: PathBuf,
    }

    fn hostile() -> Hostile {
        let tmp = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(tmp.path()).unwrap();
        let root = base.join("root");
        let canary = base.join("canary");
        std::fs::create_dir_all(root.join("var")).unwrap();
        std::fs::create_dir_all(root.join("run")).unwrap();
        std::fs::create_dir_all(&canary).unwrap();
        std::fs::write(canary.join("file"), "host").unwrap();
        // Absolute, as Debian's /var/run -> /run, but naming the host's canary.
        symlink(&canary, root.join("var/abs")).unwrap();
        symlink("/run", root.join("var/run")).unwrap();
        // Relative, climbing far above the root.
        let up = "../".repeat(base.components().count() + 3);
        symlink(format!("{up}{}", canary.display()), root.join("var/rel")).unwrap();
        symlink(canary.join("file"), root.join("var/last")).unwrap();
        Hostile {
            _tmp: tmp,
            root,
            canary,
        }
    }

    impl Hostile {
        fn canary_untouched(&self) {
            let names: Vec<_> = std::fs::read_dir(&self.canary)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(names, ["file"]);
            assert_eq!(std::fs::read(self.canary.join("file")).unwrap(), b"host");
        }
    }

    #[test]
    fn paths_are_checked() {
        check_path("/etc/hosts").unwrap();
        check_path("etc/./hosts").unwrap();
        assert_eq!(
            check_path("/../etc").unwrap_err().to_string(),
            "path '/../etc' must not contain '..'"
        );
        assert_eq!(shown(&parts(Path::new("etc//x/")).unwrap()), "/etc/x");
        assert_eq!(shown(&[]), "/");
    }

    #[test]
    fn links_resolve_inside_the_image() {
        let h = hostile();
        let img = ImageRoot::open(&h.root).unwrap();
        // /var/run -> /run: the image's /run.
        img.write_file("/var/run/x", &mut &b"in"[..], 0o640, None)
            .unwrap();
        assert_eq!(std::fs::read(h.root.join("run/x")).unwrap(), b"in");
        assert_eq!(
            std::fs::metadata(h.root.join("run/x")).unwrap().mode() & 0o7777,
            0o640
        );
        // An absolute link to the canary's host path leads to that path in the image.
        let inside = h.root.join(h.canary.strip_prefix("/").unwrap());
        std::fs::create_dir_all(&inside).unwrap();
        img.create_dir_all("/var/abs/d", 0o700).unwrap();
        assert!(inside.join("d").is_dir());
        // A relative link climbing out stops at the image's root.
        img.write_file("/var/rel/f", &mut &b"r"[..], 0o644, None)
            .unwrap();
        assert_eq!(std::fs::read(inside.join("f")).unwrap(), b"r");
        assert_eq!(
            img.host_path("/var/rel").unwrap(),
            inside,
            "resolved like a chroot"
        );
        // A link as the last component is replaced, never followed.
        img.write_file("/var/last", &mut &b"new"[..], 0o644, None)
            .unwrap();
        assert!(
            std::fs::symlink_metadata(h.root.join("var/last"))
                .unwrap()
                .is_file()
        );
        h.canary_untouched();
        // Reading follows links inside the image only.
        assert_eq!(img.read("/var/run/x").unwrap().unwrap(), b"in");
        assert_eq!(img.read("/var/abs/file").unwrap(), None);
        assert_eq!(img.kind("/var/run").unwrap(), Some(FileType::Directory));
        assert_eq!(
            img.kind_nofollow("/var/run").unwrap(),
            Some(FileType::Symlink)
        );
        // Removing goes through links only inside the image.
        symlink(h.canary.join("file"), h.root.join("run/gone")).unwrap();
        assert!(img.remove_file("/var/run/gone").unwrap());
        assert!(!img.remove_file("/var/abs/file").unwrap());
        h.canary_untouched();
    }

    #[test]
    fn dangling_links_and_things_in_the_way() {
        let h = hostile();
        let img = ImageRoot::open(&h.root).unwrap();
        // The canary's path does not exist in the image: /var/abs leads to nothing.
        let e = img.write_file("/var/abs/x", &mut &b""[..], 0o644, None);
        assert_eq!(
            format!("{:#}", e.unwrap_err()),
            "cannot write /var/abs/x in the image: /var/abs is a symbolic link to nothing in the image"
        );
        // As the last component of a directory to make, it is replaced.
        let (_, created) = img.create_dir_all("/var/abs", 0o755).unwrap();
        assert!(created);
        assert!(
            std::fs::symlink_metadata(h.root.join("var/abs"))
                .unwrap()
                .is_dir()
        );
        std::fs::write(h.root.join("var/f"), "").unwrap();
        let e = img.create_dir_all("/var/f", 0o755).unwrap_err();
        assert_eq!(
            format!("{e:#}"),
            "cannot create the directory /var/f in the image: /var/f exists and is not a directory"
        );
        let e = img.create_dir_all("/var/f/g", 0o755).unwrap_err();
        assert_eq!(
            format!("{e:#}"),
            "cannot create the directory /var/f/g in the image: /var/f is not a directory"
        );
        let e = img
            .write_file("/var", &mut &b""[..], 0o644, None)
            .unwrap_err();
        assert_eq!(
            format!("{e:#}"),
            "cannot write /var in the image: it is a directory"
        );
        nix::unistd::mkfifo(&h.root.join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let e = img
            .write_file("/fifo", &mut &b""[..], 0o644, None)
            .unwrap_err();
        assert_eq!(
            format!("{e:#}"),
            "cannot write /fifo in the image: it is not a regular file"
        );
        let e = img.read("/fifo").unwrap_err();
        assert_eq!(
            format!("{e:#}"),
            "cannot read /fifo in the image: it is not a regular file"
        );
        h.canary_untouched();
    }

    #[test]
    fn host_virtual_filesystems_are_refused() {
        // The host's /proc, as a build's virtual-filesystems step mounts one in the image.
        let img = ImageRoot::open(Path::new("/")).unwrap();
        let e = img
            .write_file("/proc/vmdb-test", &mut &b""[..], 0o644, None)
            .unwrap_err();
        assert_eq!(
            format!("{e:#}"),
            "cannot write /proc/vmdb-test in the image: /proc/vmdb-test is in the host's proc filesystem (mounted in the image)"
        );
        let e = img.create_dir_all("/dev/vmdb-test", 0o755).unwrap_err();
        assert_eq!(
            format!("{e:#}"),
            "cannot create the directory /dev/vmdb-test in the image: /dev/vmdb-test is in the host's /dev (mounted in the image)"
        );
        assert!(!Path::new("/dev/vmdb-test").exists());
    }
}
