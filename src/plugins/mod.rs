//! The step types, one file each. Order matters where a step could match two types:
//! the first plugin whose name is a key of the step wins (chroot before shell).

use crate::step::Plugin;

pub mod apt;
pub mod cache_rootfs;
pub mod chroot;
pub mod debootstrap;
pub mod echo;
pub mod error;
pub mod unpack_rootfs;
pub mod virtual_filesystems;

pub static ALL: &[&dyn Plugin] = &[
    &echo::Echo,
    &error::Error,
    &debootstrap::Debootstrap,
    &apt::Apt,
    // Before shell: a chroot step has a `shell` key too.
    &chroot::Chroot,
    &virtual_filesystems::VirtualFilesystems,
    &unpack_rootfs::UnpackRootfs,
    &cache_rootfs::CacheRootfs,
];
