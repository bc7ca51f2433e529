//! Loop devices set up with LOOP_CONFIGURE: one ioctl sets the backing file, the byte
//! offset and size limit of a partition, and autoclear, so that a device whose last user
//! goes away (including a SIGKILLed vmdb and its private mount namespace) detaches itself.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_NAME_SIZE: usize = 64;

#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// An attached loop device. Holding it keeps the device; dropping it lets it detach as
/// soon as nothing else (a mount, a running mkfs) uses it.
///
/// It also keeps the backing file open from the moment of attaching: the kernel reports
/// a write-back error to every file descriptor that was open when it happened, so
/// `close` learns of every write to the device or the file that was lost since then.
#[derive(Debug)]
pub struct LoopDevice {
    path: PathBuf,
    fd: Option<File>,
    backing: Option<File>,
    backing_path: PathBuf,
}

impl LoopDevice {
    /// Attach `backing` from byte `offset` for `size` bytes (0: to its end).
    pub fn attach(backing: &Path, offset: u64, size: u64) -> Result<LoopDevice> {
        let backing_file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(backing)
            .with_context(|| format!("opening {} for a loop device", backing.display()))?;
        let control = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/loop-control")
            .context("opening /dev/loop-control (is the loop module loaded?)")?;
        let mut info = LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: offset,
            lo_sizelimit: size,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: LO_FLAGS_AUTOCLEAR,
            lo_file_name: [0; LO_NAME_SIZE],
            lo_crypt_name: [0; LO_NAME_SIZE],
            lo_encrypt_key: [0; 32],
            lo_init: [0; 2],
        };
        let name = backing.as_os_str().as_encoded_bytes();
        let n = name.len().min(LO_NAME_SIZE - 1);
        info.lo_file_name[..n].copy_from_slice(&name[..n]);
        let config = LoopConfig {
            fd: backing_file.as_raw_fd() as u32,
            block_size: 0,
            info,
            reserved: [0; 8],
        };
        // Another process may take the free device between asking and configuring it.
        for _ in 0..20 {
            // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number.
            let nr = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE) };
            if nr < 0 {
                return Err(std::io::Error::last_os_error()).context("finding a free loop device");
            }
            let path = PathBuf::from(format!("/dev/loop{nr}"));
            let dev = match OpenOptions::new().read(true).write(true).open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    // udev has not made the node yet; make it ourselves.
                    make_node(&path, nr as u32)?;
                    OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(&path)
                        .with_context(|| format!("opening {}", path.display()))?
                }
                Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
            };
            // SAFETY: config is a valid loop_config that outlives the call.
            let rc = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE, &config) };
            if rc == 0 {
                crate::log::debug(&format!(
                    "attached {} to {} at offset {offset} size {size}",
                    path.display(),
                    backing.display()
                ));
                return Ok(LoopDevice {
                    path,
                    fd: Some(dev),
                    backing: Some(backing_file),
                    backing_path: backing.to_path_buf(),
                });
            }
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EBUSY) {
                return Err(err).with_context(|| {
                    format!("configuring {} for {}", path.display(), backing.display())
                });
            }
        }
        bail!("no free loop device could be configured after 20 tries")
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Write back everything written through the device and check that it reached
    /// the backing file and its disk: fsync of the device (its page cache, then a flush,
    /// which the loop driver turns into an fsync of the backing file), then fsync of
    /// the backing file. Then let go of the device; with autoclear the kernel detaches
    /// it once unused.
    pub fn close(mut self) -> Result<()> {
        let mut result = Ok(());
        if let Some(dev) = self.fd.take() {
            if let Err(e) = dev.sync_all() {
                result = Err(e).with_context(|| {
                    format!(
                        "writing back {} (over {})",
                        self.path.display(),
                        self.backing_path.display()
                    )
                });
            }
        }
        if let Some(f) = self.backing.take() {
            if let Err(e) = f.sync_all() {
                if result.is_ok() {
                    result = Err(e)
                        .with_context(|| format!("writing back {}", self.backing_path.display()));
                }
            }
        }
        result
    }

    /// Let go of the device without writing anything back (after a failure).
    pub fn abandon(mut self) {
        self.fd.take();
        self.backing.take();
    }
}

fn make_node(path: &Path, nr: u32) -> Result<()> {
    use nix::sys::stat::{Mode, SFlag, makedev, mknod};
    mknod(
        path,
        SFlag::S_IFBLK,
        Mode::from_bits_truncate(0o660),
        makedev(7, nr as u64),
    )
    .with_context(|| format!("creating {}", path.display()))
}

/// Whether a loop device still has a backing file (is attached).
pub fn is_attached(dev: &Path) -> bool {
    let name = dev
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Path::new(&format!("/sys/block/{name}/loop/backing_file")).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    #[test]
    fn attaches_at_offset_with_size_and_clears_itself() {
        if !is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        let f = File::create(&img).unwrap();
        f.set_len(8 << 20).unwrap();
        let dev = LoopDevice::attach(&img, 1 << 20, 2 << 20).unwrap();
        let size = std::fs::read_to_string(format!(
            "/sys/block/{}/size",
            dev.path().file_name().unwrap().to_string_lossy()
        ))
        .unwrap();
        assert_eq!(size.trim(), "4096", "2 MiB in 512-byte sectors");
        let path = dev.path().to_path_buf();
        assert!(is_attached(&path));
        dev.close().unwrap();
        // Autoclear happens on the last close; the kernel may finish it a moment later.
        for _ in 0..50 {
            if !is_attached(&path) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        panic!("{} still attached after close", path.display());
    }
}
