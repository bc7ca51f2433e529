//! `unpack-rootfs: TAG`: fill the mounted filesystem from the rootfs tarball
//! (`--rootfs-tarball`) when it exists, and set the flag `rootfs_unpacked`.

use std::time::Instant;

use anyhow::Result;

use crate::distro::chroot as image;
use crate::engine::build::Build;
use crate::engine::cachekey::CacheInputs;
use crate::engine::step::{CacheRole, Check, Kind, Plugin, Step, StepSpec};
use crate::host::cmd::Cmd;
use crate::host::mount::mounted_virtuals;
use crate::host::tarball::{Compression, have_pigz, unpack_argv};
use crate::log;
use crate::plugins::cache_rootfs::needs_tar;

pub struct UnpackRootfs;

static SPEC: StepSpec = StepSpec {
    name: "unpack-rootfs",
    value: Kind::Str,
    value_doc: "tag of the filesystem to unpack into; an earlier step must mount it",
    keys: &[],
    summary: "Unpacks the tarball given with `--rootfs-tarball FILE` (made by `cache-rootfs`) \
        into the mounted filesystem, keeping numeric owners, permissions, extended \
        attributes and ACLs, and sets the flag `rootfs_unpacked`, so that steps \
        marked `unless: rootfs_unpacked` are skipped.",
    cache: CacheRole::Tree,
    always_saved: false,
};

/// The flag later steps test with `unless: rootfs_unpacked`.
pub const FLAG: &str = "rootfs_unpacked";

impl Plugin for UnpackRootfs {
    fn spec(&self) -> &'static StepSpec {
        &SPEC
    }

    fn check(&self, c: &mut Check) {
        let tag = c.step.arg();
        image::check_mounted_tag(c, "unpack-rootfs", tag);
        needs_tar(c);
    }

    /// Whether the tarball is there decides what the step does.
    fn cache_inputs(&self, _step: &Step, inputs: &mut CacheInputs) -> Result<()> {
        if let Some(t) = inputs.opts().rootfs_tarball.clone() {
            inputs.file_identity(&t);
        }
        Ok(())
    }

    fn run(&self, step: &Step, b: &mut Build) -> Result<()> {
        let Some(tarball) = b.opts.rootfs_tarball.clone() else {
            log::verbose("  no --rootfs-tarball given: nothing to unpack");
            return Ok(());
        };
        if !tarball.exists() {
            log::verbose(&format!(
                "  {} does not exist (yet): nothing to unpack",
                tarball.display()
            ));
            return Ok(());
        }
        let root = image::tag_dir(b, step.arg())?;
        let prog = Compression::for_path(&tarball).unpack_program(have_pigz());
        let mounted = mounted_virtuals(&root)?;
        let t = Instant::now();
        Cmd::new("tar")
            .args(unpack_argv(&root, &tarball, prog, &mounted))
            .run()?;
        log::verbose(&format!(
            "  unpacked {} in {:.1}s",
            tarball.display(),
            t.elapsed().as_secs_f64()
        ));
        b.state.flags.insert(FLAG.to_string());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugins::cache_rootfs::CacheRootfs;
    use crate::plugins::testing::specs as testing;
    use std::path::Path;

    #[test]
    fn no_tarball_no_flag() {
        let d = tempfile::tempdir().unwrap();
        let s = testing::step("steps:\n  - unpack-rootfs: /\n");
        let mut b = testing::build(d.path(), None);
        UnpackRootfs.run(&s, &mut b).unwrap();
        let mut b = testing::build(d.path(), Some(&d.path().join("none.tar.zst")));
        UnpackRootfs.run(&s, &mut b).unwrap();
        assert!(b.state.flags.is_empty());
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }

    /// Pack and unpack a small tree with each compression: same names, contents,
    /// modes, owners and links.
    #[test]
    fn round_trip_every_compression() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        std::fs::create_dir_all(src.join("etc/deep")).unwrap();
        std::fs::write(src.join("etc/deep/file"), "contents\n").unwrap();
        std::os::unix::fs::symlink("deep/file", src.join("etc/link")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            src.join("etc/deep/file"),
            std::fs::Permissions::from_mode(0o640),
        )
        .unwrap();
        let cache = testing::step("steps:\n  - cache-rootfs: /\n");
        let unpack = testing::step("steps:\n  - unpack-rootfs: /\n");
        for name in ["r.tar", "r.tar.gz", "r.tar.zst", "r.tar.xz", "r.cache"] {
            let t = d.path().join(name);
            let mut b = testing::build(&src, Some(&t));
            CacheRootfs.run(&cache, &mut b).unwrap();
            let dst = d.path().join(format!("dst-{name}"));
            std::fs::create_dir(&dst).unwrap();
            let mut b = testing::build(&dst, Some(&t));
            UnpackRootfs.run(&unpack, &mut b).unwrap();
            assert!(b.state.flags.contains(FLAG));
            assert_eq!(
                std::fs::read_to_string(dst.join("etc/link")).unwrap(),
                "contents\n"
            );
            let m = std::fs::metadata(dst.join("etc/deep/file")).unwrap();
            assert_eq!(m.permissions().mode() & 0o7777, 0o640, "{name}");
            assert_eq!(
                std::fs::read_link(dst.join("etc/link")).unwrap(),
                Path::new("deep/file")
            );
        }
    }

    /// With the virtual filesystems mounted, nothing is unpacked into them (the
    /// image's dev would be the host's).
    #[test]
    fn leaves_mounted_virtual_filesystems_alone() {
        if !testing::is_root() {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(d.path()).unwrap();
        let src = base.join("src");
        let marker = "vmdb-test-marker-unpack";
        std::fs::create_dir_all(src.join("dev")).unwrap();
        std::fs::create_dir_all(src.join("etc")).unwrap();
        std::fs::write(src.join("dev").join(marker), "x").unwrap();
        std::fs::write(src.join("etc/hostname"), "x\n").unwrap();
        let t = base.join("r.tar");
        let mut b = testing::build(&src, Some(&t));
        CacheRootfs
            .run(&testing::step("steps:\n  - cache-rootfs: /\n"), &mut b)
            .unwrap();
        let dst = base.join("dst");
        std::fs::create_dir(&dst).unwrap();
        let _guard = testing::Unmounter(dst.clone());
        let mut b = testing::build(&dst, Some(&t));
        crate::distro::chroot::mount_vfs(&mut b, &dst, crate::distro::chroot::FOR_BUILD, "test")
            .unwrap();
        let r = UnpackRootfs.run(&testing::step("steps:\n  - unpack-rootfs: /\n"), &mut b);
        let leaked = Path::new("/dev").join(marker);
        let was_leaked = leaked.exists();
        let _ = std::fs::remove_file(&leaked);
        crate::distro::chroot::unmount_vfs(&mut b, "test").unwrap();
        r.unwrap();
        assert!(!was_leaked, "unpacked into the host's /dev");
        assert_eq!(
            std::fs::read_to_string(dst.join("etc/hostname")).unwrap(),
            "x\n"
        );
    }

    /// The step cache restores, and unpack-rootfs unpacks, with GNU tar into a tree
    /// that may hold links already. Safe, because tar replaces a link in the target
    /// where the archive has a directory or a file (and vmdb's archives, made from a
    /// tree with ".", list every directory before what is in it), and it never follows
    /// a link the archive itself made (such links are made last, after the rest).
    #[test]
    fn unpacking_never_follows_links_out_of_the_image() {
        use crate::plugins::testing::{Canary, plant_link};
        let canary = Canary::new();
        let d = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(d.path()).unwrap();
        let src = base.join("src");
        std::fs::create_dir_all(src.join("var/run")).unwrap();
        std::fs::create_dir_all(src.join("etc")).unwrap();
        std::fs::write(src.join("var/run/x"), "x").unwrap();
        std::fs::write(src.join("etc/hostname"), "box\n").unwrap();
        // The archive's own link to the host, as Debian's /var/lock -> /run/lock.
        plant_link(&src, "var/lock", &canary.path.display().to_string());
        let t = base.join("r.tar");
        let mut b = testing::build(&src, Some(&t));
        CacheRootfs
            .run(&testing::step("steps:\n  - cache-rootfs: /\n"), &mut b)
            .unwrap();
        // A target with links where the archive has a directory and a file.
        let dst = base.join("dst");
        plant_link(&dst, "var/run", &canary.path.display().to_string());
        plant_link(&dst, "etc", &canary.escaping());
        let mut b = testing::build(&dst, Some(&t));
        UnpackRootfs
            .run(&testing::step("steps:\n  - unpack-rootfs: /\n"), &mut b)
            .unwrap();
        canary.assert_untouched();
        assert_eq!(std::fs::read(dst.join("var/run/x")).unwrap(), b"x");
        assert_eq!(std::fs::read(dst.join("etc/hostname")).unwrap(), b"box\n");
        assert_eq!(
            std::fs::read_link(dst.join("var/lock")).unwrap(),
            canary.path
        );

        // A hostile archive: a link to the host, then a file below it.
        let evil = base.join("evil");
        plant_link(&evil, "l", &canary.path.display().to_string());
        let tar = |args: &[&str]| {
            crate::host::cmd::Cmd::new("tar")
                .args(args)
                .cwd(&evil)
                .run()
        };
        tar(&["--create", "--file=../evil.tar", "./l"]).unwrap();
        std::fs::remove_file(evil.join("l")).unwrap();
        std::fs::create_dir(evil.join("l")).unwrap();
        std::fs::write(evil.join("l/x"), "x").unwrap();
        tar(&["--append", "--file=../evil.tar", "./l/x"]).unwrap();
        let dst = base.join("dst2");
        std::fs::create_dir(&dst).unwrap();
        let mut b = testing::build(&dst, Some(&base.join("evil.tar")));
        let e = UnpackRootfs
            .run(&testing::step("steps:\n  - unpack-rootfs: /\n"), &mut b)
            .unwrap_err();
        assert!(
            format!("{e:#}").contains("./l/x: Cannot open: Not a directory"),
            "{e:#}"
        );
        canary.assert_untouched();
    }
}
