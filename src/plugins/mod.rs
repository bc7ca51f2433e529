//! The step types, one file each, and REGISTRY, what the engine is handed. Order
//! matters where a step could match two types: the first plugin whose name is a key of
//! the step wins (chroot before shell). Besides the step types: devmapper.rs (what the
//! device-mapper steps share) and testing.rs (helpers for unit tests).

use crate::engine::cachekey::CacheInputs;
use crate::engine::step::{Plugin, Registry, Step};

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

/// What the engine builds with: these step types, and Debian.
pub static REGISTRY: Registry = Registry {
    plugins: ALL,
    distro: &crate::distro::Debian,
};

/// The cache inputs of a step that runs a script (chroot, shell): a script that runs
/// apt fetches from the archives of the image's sources.
fn script_cache_inputs(step: &Step, inputs: &mut CacheInputs) -> anyhow::Result<()> {
    if step
        .strings()
        .iter()
        .any(|t| crate::distro::mirror::runs_apt(t))
    {
        inputs.fetches_from_sources();
    }
    Ok(())
}

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

#[cfg(test)]
mod registry_tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::engine::step::{COMMON_KEYS, CacheRole};

    /// Every step type with what the step cache does with it and whether its state is
    /// always saved: a new step type needs its row, and so a role chosen for it.
    const ROLES: &[(&str, CacheRole, bool)] = &[
        ("mkimg", CacheRole::Setup, false),
        ("mklabel", CacheRole::Setup, false),
        ("mkpart", CacheRole::Setup, false),
        ("set_part_flag", CacheRole::Setup, false),
        ("kpartx", CacheRole::Setup, false),
        ("cryptsetup", CacheRole::Setup, false),
        ("vgcreate", CacheRole::Setup, false),
        ("lvcreate", CacheRole::Setup, false),
        ("lvscan", CacheRole::Setup, false),
        ("mkfs", CacheRole::Setup, false),
        ("mount", CacheRole::Setup, false),
        ("virtual-filesystems", CacheRole::Setup, false),
        ("echo", CacheRole::Setup, false),
        ("error", CacheRole::Setup, false),
        ("unpack-rootfs", CacheRole::Tree, false),
        ("debootstrap", CacheRole::Tree, true),
        ("qemu-debootstrap", CacheRole::Tree, true),
        ("apt", CacheRole::Tree, true),
        ("ansible", CacheRole::Tree, true),
        ("chroot", CacheRole::Tree, false),
        ("shell", CacheRole::Tree, false),
        ("create-file", CacheRole::Tree, false),
        ("create-dir", CacheRole::Tree, false),
        ("copy-file", CacheRole::Tree, false),
        ("copy-dir", CacheRole::Tree, false),
        ("resize-rootfs", CacheRole::Tree, false),
        // They write this build's UUIDs into the tree, or act outside it.
        ("fstab", CacheRole::Volatile, false),
        ("grub", CacheRole::Volatile, false),
        ("cache-rootfs", CacheRole::Volatile, false),
        ("vagrant", CacheRole::Volatile, false),
        ("cloud-init-seed", CacheRole::Volatile, false),
    ];

    #[test]
    fn every_step_type_has_its_cache_role() {
        let registered: BTreeSet<&str> = ALL.iter().map(|p| p.spec().name).collect();
        let listed: BTreeSet<&str> = ROLES.iter().map(|(n, _, _)| *n).collect();
        assert_eq!(registered, listed, "step types and ROLES differ");
        for p in ALL {
            let s = p.spec();
            let (_, role, always) = ROLES.iter().find(|(n, _, _)| *n == s.name).unwrap();
            assert_eq!((s.cache, s.always_saved), (*role, *always), "{}", s.name);
            assert!(
                !s.always_saved || s.cache == CacheRole::Tree,
                "{}: only a tree step's state is saved",
                s.name
            );
        }
    }

    #[test]
    fn names_and_keys_are_unique() {
        let mut names = BTreeSet::new();
        for p in ALL {
            let s = p.spec();
            assert!(names.insert(s.name), "two step types are called {}", s.name);
            let mut keys = BTreeSet::from([s.name]);
            for k in s.keys.iter().chain(COMMON_KEYS) {
                for n in std::iter::once(&k.name).chain(k.aliases) {
                    assert!(keys.insert(n), "{}: key {n} twice", s.name);
                }
            }
        }
    }
}
