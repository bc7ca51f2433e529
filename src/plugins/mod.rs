//! The step types, one file each. Order matters where a step could match two types:
//! the first plugin whose name is a key of the step wins (chroot before shell).

use crate::engine::step::Plugin;

pub mod ansible;
pub mod apt;
pub mod cache_rootfs;
pub mod chroot;
pub mod cloud_init_seed;
pub mod copy_dir;
pub mod copy_file;
pub mod create_dir;
pub mod create_file;
pub mod cryptsetup;
pub mod debootstrap;
pub mod devmapper;
pub mod echo;
pub mod error;
pub mod fstab;
pub mod grub;
pub mod kpartx;
pub mod lvcreate;
pub mod lvscan;
pub mod mkfs;
pub mod mkimg;
pub mod mklabel;
pub mod mkpart;
pub mod mount;
pub mod qemu_debootstrap;
pub mod resize_rootfs;
pub mod set_part_flag;
pub mod shell;
pub mod unpack_rootfs;
pub mod vagrant;
pub mod vgcreate;
pub mod virtual_filesystems;

#[cfg(test)]
pub mod testing;
#[cfg(test)]
pub(crate) use testing::{test_build_with_root, test_step};

pub static ALL: &[&dyn Plugin] = &[
    &mkimg::Mkimg,
    &mklabel::Mklabel,
    &mkpart::Mkpart,
    &set_part_flag::SetPartFlag,
    &kpartx::Kpartx,
    &cryptsetup::Cryptsetup,
    &vgcreate::Vgcreate,
    &lvcreate::Lvcreate,
    &lvscan::Lvscan,
    &mkfs::Mkfs,
    &mount::Mount,
    &virtual_filesystems::VirtualFilesystems,
    &unpack_rootfs::UnpackRootfs,
    &debootstrap::Debootstrap,
    &qemu_debootstrap::QemuDebootstrap,
    &apt::Apt,
    &cache_rootfs::CacheRootfs,
    // Before shell: a chroot step has a `shell` key too.
    &chroot::Chroot,
    &ansible::Ansible,
    &fstab::Fstab,
    &create_file::CreateFile,
    &create_dir::CreateDir,
    &copy_file::CopyFile,
    &copy_dir::CopyDir,
    &shell::Shell,
    &grub::Grub,
    &resize_rootfs::ResizeRootfs,
    &vagrant::Vagrant,
    &cloud_init_seed::CloudInitSeed,
    &echo::Echo,
    &error::Error,
];

/// Validation of a step's disk (`device:`, or the value of mkimg and kpartx): a block
/// device that something else uses (mounted, swap, RAID, LVM, held exclusively, or a
/// partition of it mounted) is refused before anything runs. Image files pass.
pub fn check_device(c: &mut crate::engine::step::Check, key: &str, path: &str) {
    match crate::host::blockdev::busy::refusal(std::path::Path::new(path)) {
        Ok(Some(why)) => c.err(key, format!("refusing to write to {path}: {why}")),
        Ok(None) => {}
        Err(e) => c.err(key, format!("cannot check {path}: {e:#}")),
    }
}
