//! `cache-rootfs: TAG`: pack the image's mounted tree into the rootfs tarball
//! (`--rootfs-tarball`), for `unpack-rootfs` to use in later builds.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};

use crate::build::Build;
use crate::chroot as image;
use crate::cmd::Cmd;
use crate::log;
use crate::step::{Check, Kind, Plugin, Step, StepSpec};

pub struct CacheRootfs;

static SPEC: StepSpec = StepSpec {
    name: "cache-rootfs",
    value: Kind::Str,
    value_doc: "tag of the mounted filesystem to pack (the image's root)",
    keys: &[],
    summary: "Save the image's file tree in the --rootfs-tarball file, unless it exists.",
};

/// How a tarball is compressed, chosen by its file name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
    Xz,
    /// A name tar does not know: written uncompressed, read by tar's own detection.
    Unknown,
}

impl Compression {
    pub fn for_path(p: &Path) -> Compression {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        let ends = |sfx: &[&str]| sfx.iter().any(|s| name.ends_with(s));
        if ends(&[".tar.gz", ".tgz"]) {
            Compression::Gzip
        } else if ends(&[".tar.zst", ".tzst", ".tar.zstd"]) {
            Compression::Zstd
        } else if ends(&[".tar.xz", ".txz"]) {
            Compression::Xz
        } else if ends(&[".tar"]) {
            Compression::None
        } else {
            Compression::Unknown
        }
    }

    /// The program tar pipes through (`--use-compress-program`), if any; `pigz` says
    /// whether pigz is installed. Fixed strings: nothing from the spec goes in here.
    pub fn program(self, pigz: bool) -> Option<&'static str> {
        match self {
            Compression::None | Compression::Unknown => None,
            Compression::Gzip if pigz => Some("pigz"),
            Compression::Gzip => Some("gzip"),
            Compression::Zstd => Some("zstd -T0"),
            Compression::Xz => Some("xz -T0"),
        }
    }
}

pub fn have_pigz() -> bool {
    crate::app::in_path("pigz")
}

/// Options both packing and unpacking use: owners by number, extended attributes
/// (file capabilities, SELinux labels) and ACLs.
pub const TAR_KEEP: &[&str] = &[
    "--numeric-owner",
    "--xattrs",
    "--xattrs-include=*",
    "--acls",
];

/// tar's arguments to pack `root` into `file`, leaving out the contents of the
/// virtual filesystems mounted in `mounted` (paths relative to root, e.g. "proc").
pub fn pack_argv(root: &Path, file: &Path, prog: Option<&str>, mounted: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = vec!["--create".into(), format!("--file={}", file.display())];
    if let Some(p) = prog {
        v.push(format!("--use-compress-program={p}"));
    }
    v.extend(TAR_KEEP.iter().map(|s| s.to_string()));
    for m in mounted {
        v.push(format!("--exclude=./{m}/*"));
    }
    v.extend([format!("--directory={}", root.display()), ".".to_string()]);
    v
}

/// Those of the virtual filesystem paths that are mount points now.
pub fn mounted_virtuals(root: &Path) -> Result<Vec<&'static str>> {
    let mounts = crate::mount::mounts_below(root)?;
    Ok(image::VIRTUAL_PATHS
        .iter()
        .copied()
        .filter(|p| mounts.contains(&root.join(p)))
        .collect())
}

fn size_mb(p: &Path) -> f64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0) as f64 / 1e6
}

impl Plugin for CacheRootfs {
    fn spec(&self) -> &'static StepSpec {
        &SPEC
    }

    fn check(&self, c: &mut Check) {
        let tag = c.step.arg();
        image::check_mounted_tag(c, "cache-rootfs", tag);
    }

    fn run(&self, step: &Step, b: &mut Build) -> Result<()> {
        let Some(tarball) = b.opts.rootfs_tarball.clone() else {
            log::verbose("  no --rootfs-tarball given: nothing to cache");
            return Ok(());
        };
        let dir = match tarball.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = tarball
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // What a pack that was killed left: unlocked, and older than a minute.
        let prefix = format!(".{name}.");
        crate::cachefile::remove_orphans_named(&dir, |n| {
            n.starts_with(&prefix) && n.ends_with(".partial")
        });
        if tarball.exists() {
            log::info(&format!(
                "  {} exists already: left as it is",
                tarball.display()
            ));
            return Ok(());
        }
        let root = image::tag_dir(b, step.arg())?;
        // Written under a temporary name beside it and renamed when complete, so a
        // failed pack never leaves a tarball a later build would trust; locked while
        // written, so that only a killed pack's is taken for a leftover.
        let tmp = tempfile::Builder::new()
            .prefix(&prefix)
            .suffix(".partial")
            .tempfile_in(&dir)
            .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
        crate::cachefile::lock(tmp.as_file())
            .with_context(|| format!("locking {}", tmp.path().display()))?;
        let prog = Compression::for_path(&tarball).program(have_pigz());
        let mounted = mounted_virtuals(&root)?;
        let t = Instant::now();
        Cmd::new("tar")
            .args(pack_argv(&root, tmp.path(), prog, &mounted))
            .run()?;
        tmp.persist(&tarball)
            .with_context(|| format!("renaming the new tarball to {}", tarball.display()))?;
        log::verbose(&format!(
            "  packed {} ({:.0} MB) in {:.1}s",
            tarball.display(),
            size_mb(&tarball),
            t.elapsed().as_secs_f64()
        ));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compression_by_file_name() {
        let c = |n: &str| Compression::for_path(Path::new(n));
        assert_eq!(c("/x/root.tar.gz"), Compression::Gzip);
        assert_eq!(c("root.TGZ"), Compression::Gzip);
        assert_eq!(c("root.tar.zst"), Compression::Zstd);
        assert_eq!(c("root.tzst"), Compression::Zstd);
        assert_eq!(c("root.tar.xz"), Compression::Xz);
        assert_eq!(c("root.txz"), Compression::Xz);
        assert_eq!(c("root.tar"), Compression::None);
        assert_eq!(c("root.cache"), Compression::Unknown);
        assert_eq!(Compression::Gzip.program(true), Some("pigz"));
        assert_eq!(Compression::Gzip.program(false), Some("gzip"));
        assert_eq!(Compression::Zstd.program(false), Some("zstd -T0"));
        assert_eq!(Compression::Xz.program(false), Some("xz -T0"));
        assert_eq!(Compression::None.program(true), None);
        assert_eq!(Compression::Unknown.program(true), None);
    }

    #[test]
    fn pack_command_line() {
        assert_eq!(
            pack_argv(
                Path::new("/mnt"),
                Path::new("/c/.r.tar.zst.x.partial"),
                Some("zstd -T0"),
                &["proc", "dev"]
            ),
            [
                "--create",
                "--file=/c/.r.tar.zst.x.partial",
                "--use-compress-program=zstd -T0",
                "--numeric-owner",
                "--xattrs",
                "--xattrs-include=*",
                "--acls",
                "--exclude=./proc/*",
                "--exclude=./dev/*",
                "--directory=/mnt",
                "."
            ]
        );
    }

    #[test]
    fn nothing_without_a_tarball_and_no_overwrite() {
        let d = tempfile::tempdir().unwrap();
        let s = crate::chroot::testing::step("steps:\n  - cache-rootfs: /\n");
        let mut b = crate::chroot::testing::build(d.path(), None);
        CacheRootfs.run(&s, &mut b).unwrap();
        let t = d.path().join("old.tar");
        std::fs::write(&t, "old").unwrap();
        let mut b = crate::chroot::testing::build(d.path(), Some(&t));
        CacheRootfs.run(&s, &mut b).unwrap();
        assert_eq!(std::fs::read(&t).unwrap(), b"old");
    }

    #[test]
    fn failed_pack_leaves_no_tarball() {
        let d = tempfile::tempdir().unwrap();
        let s = crate::chroot::testing::step("steps:\n  - cache-rootfs: /\n");
        let t = d.path().join("out/r.tar.zst");
        std::fs::create_dir(d.path().join("out")).unwrap();
        let mut b = crate::chroot::testing::build(&d.path().join("missing"), Some(&t));
        assert!(CacheRootfs.run(&s, &mut b).is_err());
        assert_eq!(std::fs::read_dir(d.path().join("out")).unwrap().count(), 0);
    }
}
