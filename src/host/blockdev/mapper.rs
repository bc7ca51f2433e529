//! The names kpartx gives partitions (`/dev/mapper/loop0p1`), which scripts written for
//! vmdb2 look up. vmdb maps partitions to loop devices of their own, so it makes those
//! names as symlinks to them, in a tmpfs mounted over /dev/mapper inside the build's
//! private mount namespace: /dev itself is shared with the host, so the names may not
//! be written into it.

use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use nix::mount::MsFlags;

/// The name kpartx gives partition `number` of the whole-disk device `disk`: the
/// device's name, then `p` when that ends in a digit (`loop0p1`, `nvme0n1p2`,
/// `sdb1`).
pub fn kpartx_name(disk: &Path, number: u32) -> String {
    let base = disk
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let sep = if base.ends_with(|c: char| c.is_ascii_digit()) {
        "p"
    } else {
        ""
    };
    format!("{base}{sep}{number}")
}

/// What was in the directory before the tmpfs hid it: copied into the tmpfs, so that
/// /dev/mapper/control stays usable.
enum Entry {
    Node {
        name: PathBuf,
        block: bool,
        rdev: u64,
        mode: u32,
    },
    Link {
        name: PathBuf,
        target: PathBuf,
    },
}

/// Mount a tmpfs over `dir` (in this process's mount namespace, which must be private),
/// holding what was there: device nodes and symlinks. A host that has no `dir` gets the
/// empty directory, as device-mapper's own tools (libdevmapper, which grub-install
/// links) make it on first use; the names themselves stay in the build's tmpfs. Returns
/// false, changing nothing, when `dir` is something other than a directory.
pub fn make_private(dir: &Path) -> Result<bool> {
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Ok(false),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .mode(0o755)
                .create(dir)
                .with_context(|| format!("making {}", dir.display()))?;
            crate::log::verbose(&format!("  made {} (the host had none)", dir.display()));
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    }
    let mut entries = Vec::new();
    let listing = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    for e in listing {
        let e = e.with_context(|| format!("reading {}", dir.display()))?;
        let meta = e.metadata()?;
        let ft = meta.file_type();
        let name = PathBuf::from(e.file_name());
        if ft.is_symlink() {
            let target = std::fs::read_link(e.path())?;
            entries.push(Entry::Link { name, target });
        } else if ft.is_block_device() || ft.is_char_device() {
            entries.push(Entry::Node {
                name,
                block: ft.is_block_device(),
                rdev: meta.rdev(),
                mode: meta.permissions().mode() & 0o7777,
            });
        }
    }
    crate::log::verbose(&format!(
        "  mount a private tmpfs on {} for vmdb2's partition names",
        dir.display()
    ));
    nix::mount::mount(
        Some("tmpfs"),
        dir,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=0755,size=1m"),
    )
    .with_context(|| format!("mounting a private tmpfs on {}", dir.display()))?;
    for e in entries {
        match e {
            Entry::Node {
                name,
                block,
                rdev,
                mode,
            } => {
                use nix::sys::stat::{Mode, SFlag, mknod};
                let kind = if block {
                    SFlag::S_IFBLK
                } else {
                    SFlag::S_IFCHR
                };
                let path = dir.join(&name);
                mknod(&path, kind, Mode::from_bits_truncate(mode), rdev)
                    .with_context(|| format!("recreating {}", path.display()))?;
            }
            Entry::Link { name, target } => {
                let path = dir.join(&name);
                std::os::unix::fs::symlink(&target, &path)
                    .with_context(|| format!("recreating {}", path.display()))?;
            }
        }
    }
    Ok(true)
}

/// Make `dir/name` a symlink to `device`; returns its path.
pub fn add(dir: &Path, name: &str, device: &Path) -> Result<PathBuf> {
    let link = dir.join(name);
    std::os::unix::fs::symlink(device, &link)
        .with_context(|| format!("making {} point at {}", link.display(), device.display()))?;
    crate::log::verbose(&format!(
        "  {} is {} (vmdb2's name)",
        link.display(),
        device.display()
    ));
    Ok(link)
}

/// Remove a name made by `add`; one already gone is fine.
pub fn remove(link: &Path) -> Result<()> {
    match std::fs::remove_file(link) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", link.display()))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_as_kpartx_makes_them() {
        assert_eq!(kpartx_name(Path::new("/dev/loop0"), 1), "loop0p1");
        assert_eq!(kpartx_name(Path::new("/dev/loop12"), 3), "loop12p3");
        assert_eq!(kpartx_name(Path::new("/dev/nvme0n1"), 2), "nvme0n1p2");
        assert_eq!(kpartx_name(Path::new("/dev/sdb"), 1), "sdb1");
        assert_eq!(kpartx_name(Path::new("/dev/vdc"), 14), "vdc14");
    }

    #[test]
    fn something_other_than_a_directory_is_left_alone() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("mapper");
        std::fs::write(&file, "x").unwrap();
        assert!(!make_private(&file).unwrap());
        assert_eq!(std::fs::read(&file).unwrap(), b"x");
    }

    #[test]
    fn names_are_symlinks_and_go_away() {
        let d = tempfile::tempdir().unwrap();
        let link = add(d.path(), "loop7p2", Path::new("/dev/loop9")).unwrap();
        assert_eq!(link, d.path().join("loop7p2"));
        assert_eq!(std::fs::read_link(&link).unwrap(), Path::new("/dev/loop9"));
        remove(&link).unwrap();
        assert!(std::fs::symlink_metadata(&link).is_err());
        remove(&link).unwrap();
    }
}
