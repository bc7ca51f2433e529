//! `cache-rootfs: TAG`: pack the image's mounted tree into the rootfs tarball
//! (`--rootfs-tarball`), for `unpack-rootfs` to use in later builds.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};

use crate::distro::chroot as image;
use crate::engine::build::Build;
use crate::engine::step::{CacheRole, Check, Kind, Plugin, Step, StepSpec};
use crate::host::cmd::Cmd;
use crate::host::mount::mounted_virtuals;
use crate::host::tarball::{Compression, have_pigz, pack_argv};
use crate::log;

pub struct CacheRootfs;

static SPEC: StepSpec = StepSpec {
    name: "cache-rootfs",
    value: Kind::Str,
    value_doc: "tag of the image's root filesystem; an earlier step must mount it",
    keys: &[],
    summary: "Packs the image's file tree into the tarball given with `--rootfs-tarball FILE`, \
        so that a later build can start from it with `unpack-rootfs` and skip the \
        slow steps (mark them `unless: rootfs_unpacked`).",
    cache: CacheRole::Volatile,
    always_saved: false,
};

/// Validation: the step packs or unpacks the --rootfs-tarball, if there is one, with
/// tar and the program its name asks for.
pub fn needs_tar(c: &mut Check) {
    let Some(tarball) = c.plan.rootfs_tarball.clone() else {
        return;
    };
    let key = c.step.kind;
    c.needs(key, "tar", "tar");
    let programs = Compression::for_path(&tarball).programs();
    if !programs.is_empty() {
        c.needs_one_of(key, programs);
    }
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
        needs_tar(c);
    }

    fn run(&self, step: &Step, b: &mut Build) -> Result<()> {
        let Some(tarball) = b.opts.rootfs_tarball.clone() else {
            log::verbose("  no --rootfs-tarball given: nothing to cache");
            return Ok(());
        };
        if tarball.exists() {
            log::info(&format!(
                "  {} exists already: left as it is",
                tarball.display()
            ));
            return Ok(());
        }
        let root = image::tag_dir(b, step.arg())?;
        // Written under a temporary name beside it and renamed when complete, so a
        // failed pack never leaves a tarball a later build would trust. The name is
        // registered before the file exists, so that it is removed whatever happens,
        // by the next vmdb if this one is killed. tar creates it as any file is made
        // (0666 less the umask).
        let tmp = crate::output::temp_name(&tarball, "partial", b.opts.out.pid());
        b.add_temporary(&tmp)?;
        let prog = Compression::for_path(&tarball).program(have_pigz());
        let mounted = mounted_virtuals(&root)?;
        let t = Instant::now();
        let packed = Cmd::new("tar")
            .args(pack_argv(&root, &tmp, prog, &mounted))
            .run()
            .and_then(|_| crate::output::sync_file(&tmp))
            .and_then(|_| {
                std::fs::rename(&tmp, &tarball)
                    .with_context(|| format!("renaming the new tarball to {}", tarball.display()))
            });
        if let Err(e) = packed {
            crate::output::remove_path(&tmp);
            return Err(e);
        }
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

    /// What packing and unpacking run is among what validation asks the host for.
    #[test]
    fn the_programs_run_are_the_programs_declared() {
        for c in [
            Compression::None,
            Compression::Gzip,
            Compression::Zstd,
            Compression::Xz,
            Compression::Unknown,
        ] {
            for pigz in [true, false] {
                let run = c.program(pigz).map(|p| p.split(' ').next().unwrap_or(p));
                let declared: Vec<&str> = c.programs().iter().map(|(p, _)| *p).collect();
                match run {
                    Some(p) => assert!(declared.contains(&p), "{c:?}: {p} not in {declared:?}"),
                    None => assert!(declared.is_empty(), "{c:?}"),
                }
            }
        }
    }

    #[test]
    fn tar_and_the_compressor_are_needed_for_a_tarball() {
        let needs = |tarball: Option<&str>| {
            let raw = crate::engine::spec::load("steps:\n  - cache-rootfs: /\n").unwrap();
            let mut plan = crate::plugins::testing::plan_with_root();
            plan.rootfs_tarball = tarball.map(Into::into);
            let r = crate::engine::template::Renderer::new(Default::default());
            crate::engine::validate::validate(&raw.steps, &r, crate::plugins::ALL, &mut plan)
                .unwrap();
            plan.host_needs
                .iter()
                .map(|n| n.any_of.clone())
                .collect::<Vec<_>>()
        };
        assert!(needs(None).is_empty());
        assert_eq!(
            needs(Some("/c/r.tar.zst")),
            [vec![("tar", "tar")], vec![("zstd", "zstd")]]
        );
        assert_eq!(
            needs(Some("r.tgz")),
            [
                vec![("tar", "tar")],
                vec![("pigz", "pigz"), ("gzip", "gzip")]
            ]
        );
    }

    #[test]
    fn nothing_without_a_tarball_and_no_overwrite() {
        let d = tempfile::tempdir().unwrap();
        let s = crate::plugins::testing::specs::step("steps:\n  - cache-rootfs: /\n");
        let mut b = crate::plugins::testing::specs::build(d.path(), None);
        CacheRootfs.run(&s, &mut b).unwrap();
        let t = d.path().join("old.tar");
        std::fs::write(&t, "old").unwrap();
        let mut b = crate::plugins::testing::specs::build(d.path(), Some(&t));
        CacheRootfs.run(&s, &mut b).unwrap();
        assert_eq!(std::fs::read(&t).unwrap(), b"old");
    }

    /// The process's umask, as the kernel reports it.
    fn umask() -> u32 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("Umask:")).unwrap();
        u32::from_str_radix(line.split_whitespace().nth(1).unwrap(), 8).unwrap()
    }

    #[test]
    fn the_tarball_is_made_as_any_file_and_no_temporary_is_left() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/hostname"), "packed\n").unwrap();
        let out = d.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let t = out.join("r.tar.gz");
        let s = crate::plugins::testing::specs::step("steps:\n  - cache-rootfs: /\n");
        let mut b = crate::plugins::testing::specs::build(&root, Some(&t));
        CacheRootfs.run(&s, &mut b).unwrap();
        let mode = std::fs::metadata(&t).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o666 & !umask(), "mode {mode:o}");
        assert_eq!(
            std::fs::read_dir(&out)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect::<Vec<_>>(),
            ["r.tar.gz"]
        );
        // The temporary name was registered before tar made the file.
        let tmp = out.join(format!(".r.tar.gz.vmdb-partial-{}", std::process::id()));
        assert!(
            b.report
                .files
                .iter()
                .any(|f| f.partial == tmp && f.path.is_none()),
            "{:?}",
            b.report.files
        );
    }

    #[test]
    fn failed_pack_leaves_no_tarball() {
        let d = tempfile::tempdir().unwrap();
        let s = crate::plugins::testing::specs::step("steps:\n  - cache-rootfs: /\n");
        let t = d.path().join("out/r.tar.zst");
        std::fs::create_dir(d.path().join("out")).unwrap();
        let mut b = crate::plugins::testing::specs::build(&d.path().join("missing"), Some(&t));
        assert!(CacheRootfs.run(&s, &mut b).is_err());
        assert_eq!(std::fs::read_dir(d.path().join("out")).unwrap().count(), 0);
    }
}
