//! Whether a block device may be written, and holding it while it is.
//!
//! A device is refused while it, one of its partitions, or a loop device over either is
//! mounted, used as swap, held by another block device (device-mapper, md RAID, LVM:
//! `holders` in sysfs), or opened exclusively by another program (the kernel's own
//! claim, which every mount, swap area, RAID and LVM volume takes: an `O_EXCL` open
//! then fails with EBUSY). vmdb then opens the device exclusively itself for the whole
//! build, so that nothing else can take it meanwhile; its own loop devices over the
//! device still work, as they open it without `O_EXCL`.

use std::fs::File;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result, bail};

use crate::host::mount::{mount_table, unescape};

/// Device numbers this process holds exclusively (the output device, devices named by
/// steps). A build process forked from vmdb inherits both the list and the holds.
static CLAIMED: Mutex<Vec<u64>> = Mutex::new(Vec::new());

fn claimed(rdev: u64) -> bool {
    CLAIMED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .contains(&rdev)
}

/// A block device held open with `O_EXCL` until this is dropped.
#[derive(Debug)]
pub struct Claim {
    rdev: u64,
    _file: File,
}

impl Drop for Claim {
    fn drop(&mut self) {
        CLAIMED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|&r| r != self.rdev);
    }
}

/// The device number of `path` if it is a block device (following symlinks).
pub fn block_rdev(path: &Path) -> Option<u64> {
    std::fs::metadata(path)
        .ok()
        .filter(|m| m.file_type().is_block_device())
        .map(|m| m.rdev())
}

/// Check that `dev` may be written and hold it exclusively. Ok(None) if this process
/// holds it already.
pub fn claim(dev: &Path) -> Result<Option<Claim>> {
    let rdev =
        block_rdev(dev).with_context(|| format!("{} is not a block device", dev.display()))?;
    if claimed(rdev) {
        return Ok(None);
    }
    if let Some(why) = refusal(dev)? {
        bail!("refusing to write to {}: {why}", dev.display());
    }
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(dev)
    {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            bail!("refusing to write to {}: {IN_USE}", dev.display())
        }
        Err(e) => return Err(e).with_context(|| format!("opening {}", dev.display())),
    };
    CLAIMED.lock().unwrap_or_else(|e| e.into_inner()).push(rdev);
    Ok(Some(Claim { rdev, _file: file }))
}

const IN_USE: &str = "it is in use: another program holds it exclusively \
                      (a mounted filesystem, swap, RAID, LVM or device-mapper)";

/// Why the block device `dev` must not be written now, if it must not; None for
/// anything that is not a block device. What cannot be checked without root (the
/// exclusive open) is left out.
pub fn refusal(dev: &Path) -> Result<Option<String>> {
    let Some(rdev) = block_rdev(dev) else {
        return Ok(None);
    };
    let host = Host::read()?;
    Ok(host.why_busy(rdev, Some(dev), 0))
}

/// What the host's mount table, swap list and loop devices say, read once.
struct Host {
    /// (device number, mount point)
    mounts: Vec<(u64, String)>,
    swaps: Vec<u64>,
    /// (loop device node, device number of its backing device, offset)
    loops: Vec<(PathBuf, u64, u64)>,
}

impl Host {
    fn read() -> Result<Host> {
        let mounts = mount_table()?
            .into_iter()
            .map(|m| (m.dev, m.point.display().to_string()))
            .collect();
        let swaps = std::fs::read_to_string("/proc/swaps")
            .unwrap_or_default()
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next())
            .filter_map(|p| block_rdev(Path::new(&unescape(p))))
            .collect();
        let mut loops = Vec::new();
        for e in std::fs::read_dir("/sys/block")
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(backing) = std::fs::read_to_string(e.path().join("loop/backing_file")) else {
                continue;
            };
            let Some(back) = block_rdev(Path::new(backing.trim_end())) else {
                continue;
            };
            let offset = std::fs::read_to_string(e.path().join("loop/offset"))
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0);
            loops.push((PathBuf::from("/dev").join(name), back, offset));
        }
        Ok(Host {
            mounts,
            swaps,
            loops,
        })
    }

    /// Why the device `rdev` (whose node is `node`, if known) is busy; `depth` bounds
    /// the walk through loop devices over loop devices.
    fn why_busy(&self, rdev: u64, node: Option<&Path>, depth: u32) -> Option<String> {
        if let Some((_, point)) = self.mounts.iter().find(|(d, _)| *d == rdev) {
            return Some(format!("it is mounted on {point}"));
        }
        if self.swaps.contains(&rdev) {
            return Some("it is used as swap".into());
        }
        let sys = sys_dir(rdev)?;
        if let Some(h) = first_entry(&sys.join("holders")) {
            return Some(format!(
                "it is held by {h} (device-mapper, RAID or LVM: see /sys/class/block/{h})"
            ));
        }
        if !claimed(rdev) {
            if let Some(n) = node {
                if exclusively_open(n) {
                    return Some(IN_USE.into());
                }
            }
        }
        // Its partitions, as the kernel knows them (sda1 in /sys/block/sda/sda1).
        for e in std::fs::read_dir(&sys).into_iter().flatten().flatten() {
            if !e.path().join("partition").exists() {
                continue;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(prdev) = dev_number(&e.path()) else {
                continue;
            };
            let pnode = PathBuf::from("/dev").join(&name);
            let pnode = (block_rdev(&pnode) == Some(prdev)).then_some(pnode);
            if let Some(why) = self.why_busy(prdev, pnode.as_deref(), depth) {
                return Some(format!("its partition {name}: {why}"));
            }
        }
        // Loop devices over it: how partitions are used where the kernel makes none.
        if depth < 4 {
            for (lnode, back, offset) in &self.loops {
                if *back != rdev {
                    continue;
                }
                let Some(lrdev) = block_rdev(lnode) else {
                    continue;
                };
                if let Some(why) = self.why_busy(lrdev, Some(lnode), depth + 1) {
                    return Some(format!(
                        "{} over it (at byte {offset}): {why}",
                        lnode.display()
                    ));
                }
            }
        }
        None
    }
}

/// /sys/dev/block/MAJ:MIN, resolved (e.g. /sys/devices/.../block/sda).
fn sys_dir(rdev: u64) -> Option<PathBuf> {
    let (maj, min) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
    std::fs::canonicalize(format!("/sys/dev/block/{maj}:{min}")).ok()
}

/// The device number in a sysfs block directory's `dev` file ("8:1").
fn dev_number(sys: &Path) -> Option<u64> {
    let s = std::fs::read_to_string(sys.join("dev")).ok()?;
    let (maj, min) = s.trim().split_once(':')?;
    Some(nix::sys::stat::makedev(
        maj.parse().ok()?,
        min.parse().ok()?,
    ))
}

fn first_entry(dir: &Path) -> Option<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names.into_iter().next()
}

/// Whether another program holds the device exclusively (our own exclusive open
/// fails with EBUSY). Without the permission to open it, this cannot be known.
fn exclusively_open(node: &Path) -> bool {
    let r = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(node);
    matches!(r, Err(e) if e.raw_os_error() == Some(libc::EBUSY))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_no_block_device() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("x.img");
        std::fs::write(&f, "").unwrap();
        assert_eq!(refusal(&f).unwrap(), None);
        assert!(claim(&f).is_err());
    }
}
