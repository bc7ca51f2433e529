//! Block devices: their size, loop devices, partition tables, and whether one is busy.

use std::fs::File;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use anyhow::{Context, Result};

pub mod busy;
pub mod loopdev;
pub mod mapper;
pub mod table;

// BLKGETSIZE64: _IOR(0x12, 114, size_t), the size of a block device in bytes.
nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);

/// Size in bytes of an image file or a block device.
pub fn disk_size(path: &Path) -> Result<u64> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let meta = file
        .metadata()
        .with_context(|| format!("cannot stat {}", path.display()))?;
    if !meta.file_type().is_block_device() {
        return Ok(meta.len());
    }
    // A block device's inode reports length 0; only the kernel knows its size.
    let mut size: u64 = 0;
    let fd = std::os::unix::io::AsRawFd::as_raw_fd(&file);
    // SAFETY: the ioctl writes one u64 through the pointer, which points at a live
    // local variable; fd stays open for the call.
    unsafe { blkgetsize64(fd, &mut size) }
        .with_context(|| format!("BLKGETSIZE64 failed on {}", path.display()))?;
    Ok(size)
}

pub fn is_block_device(p: &Path) -> bool {
    std::fs::metadata(p)
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false)
}

/// Whether this host has device-mapper (cryptsetup, LVM).
pub fn has_device_mapper() -> bool {
    std::fs::read_to_string("/proc/misc")
        .map(|s| s.lines().any(|l| l.ends_with(" device-mapper")))
        .unwrap_or(false)
}
