//! Mounts, always inside vmdb's private mount namespace.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::mount::{MntFlags, MsFlags, umount2};

/// Give this process its own mount namespace, with nothing propagating back to the
/// host: every mount the build makes vanishes with the namespace, even on SIGKILL.
pub fn enter_private_namespace() -> Result<()> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .context("creating a private mount namespace (vmdb must run as root)")?;
    match nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    ) {
        Ok(()) => Ok(()),
        // The kernel changes propagation only at a mount's root: in a chroot into a
        // plain directory, / is none, and without private mounts every mount of the
        // build would show on the host.
        Err(nix::errno::Errno::EINVAL) => bail!(
            "making mounts private: / is not a mount point here (in a chroot?); vmdb needs \
             one, so that its mounts stay out of the host's view: bind-mount the chroot's \
             directory onto itself (mount --bind DIR DIR) before entering it, or use a \
             container"
        ),
        Err(e) => Err(e).context("making mounts private"),
    }
}

pub fn mount(
    source: &Path,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<()> {
    crate::log::verbose(&format!(
        "  mount {} on {} ({})",
        source.display(),
        target.display(),
        fstype.unwrap_or("bind")
    ));
    nix::mount::mount(Some(source), target, fstype, flags, data).with_context(|| {
        format!(
            "mounting {} on {} (type {})",
            source.display(),
            target.display(),
            fstype.unwrap_or("none")
        )
    })
}

/// Unmount, retrying while busy; as a last resort detach lazily and report it.
pub fn unmount(target: &Path) -> Result<()> {
    crate::log::verbose(&format!("  umount {}", target.display()));
    let mut last = None;
    for attempt in 0..10 {
        match umount2(target, MntFlags::empty()) {
            Ok(()) => return Ok(()),
            Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {
                // Not a mount point (any more): nothing to undo.
                return Ok(());
            }
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(50 * (attempt + 1)));
    }
    let _ = umount2(target, MntFlags::MNT_DETACH);
    bail!(
        "could not unmount {} ({}); detached it lazily",
        target.display(),
        last.map(|e| e.to_string()).unwrap_or_default()
    )
}

/// One mount, as /proc/self/mountinfo says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    /// The device number of what is mounted (major:minor).
    pub dev: u64,
    pub point: PathBuf,
    pub fstype: String,
}

/// The mounts of this process's mount namespace, in the order they were made.
pub fn mount_table() -> Result<Vec<MountInfo>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    Ok(parse_mountinfo(&info))
}

/// The lines of mountinfo(5): `ID PARENT MAJ:MIN ROOT POINT OPTIONS [TAGS...] - TYPE
/// SOURCE SUPER-OPTIONS`; a line that does not read so is left out.
fn parse_mountinfo(text: &str) -> Vec<MountInfo> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let (maj, min) = f.get(2)?.split_once(':')?;
            let dev = nix::sys::stat::makedev(maj.parse().ok()?, min.parse().ok()?);
            let sep = f.iter().position(|w| *w == "-")?;
            Some(MountInfo {
                dev,
                point: PathBuf::from(unescape(f.get(4)?)),
                fstype: f.get(sep + 1)?.to_string(),
            })
        })
        .collect()
}

/// Mount points at or below `dir`, deepest first.
pub fn mounts_below(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut found: Vec<PathBuf> = mount_table()?
        .into_iter()
        .map(|m| m.point)
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    Ok(found)
}

/// Paths in an image that hold virtual filesystems while programs run in it (left out
/// of a tarball of the image's tree).
pub const VIRTUAL_PATHS: &[&str] = &["proc", "sys", "dev", "run"];

/// Those of the virtual filesystem paths that are mount points now.
pub fn mounted_virtuals(root: &Path) -> Result<Vec<&'static str>> {
    let mounts = mounts_below(root)?;
    Ok(VIRTUAL_PATHS
        .iter()
        .copied()
        .filter(|p| mounts.contains(&root.join(p)))
        .collect())
}

/// Unmount everything at or below `dir`, deepest first, reporting every failure.
pub fn unmount_below(dir: &Path) -> Result<()> {
    let mut errors = Vec::new();
    for m in mounts_below(dir)? {
        if let Err(e) = unmount(&m) {
            errors.push(format!("{e:#}"));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        bail!(errors.join("; "))
    }
}

/// mountinfo (and /proc/swaps) escape space, tab, newline and backslash as octal.
pub fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_mountinfo_paths() {
        assert_eq!(unescape("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape("/plain"), "/plain");
    }

    #[test]
    fn reads_mountinfo_lines() {
        let text = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n\
                    40 22 0:35 / /mnt/a\\040b rw master:2 shared:3 - tmpfs none rw\n\
                    nonsense\n";
        assert_eq!(
            parse_mountinfo(text),
            [
                MountInfo {
                    dev: nix::sys::stat::makedev(8, 1),
                    point: "/".into(),
                    fstype: "ext4".into()
                },
                MountInfo {
                    dev: nix::sys::stat::makedev(0, 35),
                    point: "/mnt/a b".into(),
                    fstype: "tmpfs".into()
                },
            ]
        );
    }

    #[test]
    fn finds_root_mount() {
        assert!(
            mounts_below(Path::new("/"))
                .unwrap()
                .contains(&PathBuf::from("/"))
        );
    }
}
