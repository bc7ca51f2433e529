//! `virtual-filesystems: TAG`: mount proc, sys, dev, dev/pts and a tmpfs on /run in
//! the image for the rest of the build.

use anyhow::Result;

use crate::distro::chroot as image;
use crate::engine::build::Build;
use crate::engine::step::{CacheRole, Check, Kind, Plugin, Step, StepSpec};

pub struct VirtualFilesystems;

static SPEC: StepSpec = StepSpec {
    name: "virtual-filesystems",
    value: Kind::Str,
    value_doc: "tag of the image's root filesystem; an earlier step must mount it",
    keys: &[],
    summary: "Mounts the virtual filesystems a running system expects in the image, for the \
        rest of the build: `proc` (proc), `sys` (sysfs), `dev` (devtmpfs, or a bind \
        mount of the host's `/dev` where devtmpfs cannot be mounted), `dev/pts` \
        (devpts) and `run` (tmpfs).",
    cache: CacheRole::Setup,
    always_saved: false,
};

const OWNER: &str = "virtual-filesystems";

impl Plugin for VirtualFilesystems {
    fn spec(&self) -> &'static StepSpec {
        &SPEC
    }

    fn check(&self, c: &mut Check) {
        let tag = c.step.arg();
        image::check_mounted_tag(c, "virtual-filesystems", tag);
    }

    fn run(&self, step: &Step, b: &mut Build) -> Result<()> {
        let root = image::tag_dir(b, step.arg())?;
        image::mount_vfs(b, &root, image::FOR_BUILD, OWNER)
    }

    fn teardown(&self, _step: &Step, b: &mut Build) -> Result<()> {
        image::unmount_vfs(b, OWNER)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugins::testing::specs as testing;
    use std::path::{Path, PathBuf};

    #[test]
    fn mounts_until_teardown() {
        if !testing::is_root() {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(d.path()).unwrap();
        let _guard = testing::Unmounter(root.clone());
        let mut b = testing::build(&root, None);
        let s = testing::step("steps:\n  - virtual-filesystems: /\n");
        VirtualFilesystems.run(&s, &mut b).unwrap();
        let mut got = crate::host::mount::mounts_below(&root).unwrap();
        got.sort();
        let want: Vec<PathBuf> = ["dev", "dev/pts", "proc", "run", "sys"]
            .iter()
            .map(|p| root.join(p))
            .collect();
        assert_eq!(got, want);
        assert!(root.join("proc/self").exists());
        assert!(root.join("dev/null").exists());
        // A chroot step then mounts nothing more, and leaves these alone.
        crate::distro::chroot::enter(&mut b, &root, "chroot").unwrap();
        assert_eq!(b.state.notes.len(), 5);
        crate::distro::chroot::leave(&mut b, "chroot").unwrap();
        assert_eq!(crate::host::mount::mounts_below(&root).unwrap().len(), 5);
        VirtualFilesystems.teardown(&s, &mut b).unwrap();
        assert!(crate::host::mount::mounts_below(&root).unwrap().is_empty());
        assert!(b.state.notes.is_empty());
    }

    #[test]
    fn chroot_setup_stays_in_the_image() {
        use crate::plugins::testing::{Canary, plant_link};
        if !testing::is_root() {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(d.path()).unwrap().join("root");
        std::fs::create_dir_all(root.join("usr/sbin")).unwrap();
        let files = Canary::new();
        let mounts = Canary::new();
        let _guard = testing::Unmounter(root.clone());
        let _host_guard = testing::Unmounter(mounts.path.clone());
        // The image's /etc and /usr/local lead to a host directory that has what vmdb
        // writes into, absolutely and relatively; its /proc to another.
        for dir in ["dpkg/dpkg.cfg.d", "apt/apt.conf.d", "sbin"] {
            std::fs::create_dir_all(files.path.join(dir)).unwrap();
            std::fs::create_dir_all(files.inside(&root).join(dir)).unwrap();
        }
        plant_link(&root, "etc", &files.path.display().to_string());
        plant_link(&root, "usr/local", &files.escaping());
        plant_link(&root, "proc", &mounts.path.display().to_string());
        let inside = files.inside(&root);
        let proc_inside = mounts.inside(&root);
        let before = files.snapshot();
        let mut b = testing::build(&root, None);
        crate::distro::chroot::enter(&mut b, &root, "chroot").unwrap();
        let mounted = crate::host::mount::mounts_below(Path::new("/")).unwrap();
        assert!(
            !mounted.contains(&mounts.path),
            "mounted on the host's directory"
        );
        assert!(mounted.contains(&proc_inside));
        assert!(proc_inside.join("self").exists());
        mounts.assert_untouched();
        assert_eq!(files.snapshot(), before);
        for f in [
            "dpkg/dpkg.cfg.d/vmdb-unsafe-io",
            "apt/apt.conf.d/00vmdb-dpkg-path",
            "sbin/update-initramfs",
        ] {
            assert!(inside.join(f).is_file(), "{f}");
        }
        assert!(root.join("usr/sbin/policy-rc.d").is_file());
        crate::distro::chroot::leave(&mut b, "chroot").unwrap();
        assert!(crate::host::mount::mounts_below(&root).unwrap().is_empty());
        assert!(b.state.notes.is_empty());
        assert_eq!(files.snapshot(), before);
        assert!(!inside.join("sbin/update-initramfs").exists());
        assert!(!root.join("usr/sbin/policy-rc.d").exists());
    }
}
