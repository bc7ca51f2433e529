//! `mount`: mount a partition's filesystem, at a private directory (the image's root)
//! or below another mounted tag (`mount-on` + `dirname`, e.g. /boot/efi).
//!
//! A FAT filesystem (an EFI system partition) cannot be mounted by the kernel on the
//! hosts vmdb is built for, so its mount point is a tmpfs filled from the filesystem;
//! at teardown its contents are copied back into the filesystem with mtools.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use nix::mount::MsFlags;

use crate::engine::build::Build;
use crate::engine::cachekey::CacheInputs;
use crate::engine::plan::Filesystem;
use crate::engine::step::{CacheRole, Check, Key, Kind, Plugin, Step, StepSpec};
use crate::host::cmd::Cmd;
use crate::host::image_root::ImageRoot;
use crate::host::{fat, mount};

pub struct Mount;

static SPEC: StepSpec = StepSpec {
    name: "mount",
    value: Kind::Str,
    value_doc: "tag of a partition with a filesystem (made by `mkfs`, or found by `kpartx`'s \
        `tags`).",
    keys: &[
        Key::opt(
            "mount-on",
            Kind::Str,
            "tag of a mounted filesystem to mount this one below.",
        ),
        Key::opt(
            "dirname",
            Kind::Str,
            "absolute path in the image, e.g. `/boot/efi`; required with `mount-on`.",
        ),
        Key::opt(
            "zerofree",
            Kind::Bool,
            "after a successful build, when the filesystem is unmounted at teardown, \
                run `zerofree -v` on its device so that the blocks of files deleted \
                during the build (downloaded packages, caches) are zeros and the \
                image compresses well. Only for ext2, ext3 and ext4; other \
                filesystems are skipped with a note. Not run when the build failed \
                (the image is removed anyway). vmdb2 runs zerofree by default; vmdb \
                does not, because a new image file is sparse and zerofree makes the \
                zeroed blocks take space on the host's disk. Needs the `zerofree` \
                program on the host.",
        )
        .default("false"),
        Key::opt(
            "keep_resolvconf",
            Kind::Bool,
            "for the filesystem mounted at `/`: keep the build host's \
                `/etc/resolv.conf` in the image. By default, when a build succeeds, \
                the image's `/etc/resolv.conf` is removed at teardown if it is a \
                plain file with exactly the host's contents (debootstrap copies the \
                host's in, and the build host's name servers should not ship in an \
                image); a symbolic link (e.g. systemd-resolved's) or a file with \
                other contents is left alone.",
        )
        .default("false"),
        Key::opt(
            "fs-tag",
            Kind::Str,
            "a second name for the mounted filesystem, by which later steps may refer \
                to it. Accepted for compatibility with vmdb2's first releases, whose \
                specs tagged a partition and its mounted filesystem separately \
                (`mount: rootpart` with `fs-tag: rootfs`, then `target: rootfs`); \
                in vmdb both names are one tag.",
        ),
    ],
    summary: "Mounts a tagged filesystem for the rest of the build.",
    cache: CacheRole::Setup,
    always_saved: false,
};

impl Plugin for Mount {
    fn spec(&self) -> &'static StepSpec {
        &SPEC
    }

    fn check(&self, c: &mut Check) {
        let tag = c.step.arg().to_string();
        if c.use_tag("mount", &tag) {
            let t = &c.plan.tags[&tag];
            if t.mounted {
                c.err("mount", format!("tag '{tag}' is already mounted"));
            } else if t.filesystem == Filesystem::None {
                c.err(
                    "mount",
                    format!("tag '{tag}' has no filesystem: add an mkfs step before mounting it"),
                );
            }
        }
        if let Some(on) = c.step.opt_str("mount-on").map(str::to_string) {
            if c.use_tag("mount-on", &on) && !c.plan.tags[&on].mounted {
                c.err(
                    "mount-on",
                    format!("tag '{on}' is not mounted by an earlier step"),
                );
            }
            if !c.step.has("dirname") {
                c.err(
                    "dirname",
                    "required with mount-on: where below it to mount (e.g. /boot/efi)",
                );
            }
        }
        if let Some(d) = c.step.opt_str("dirname") {
            if !d.starts_with('/') || d.split('/').any(|p| p == "..") {
                let d = d.to_string();
                c.err(
                    "dirname",
                    format!("'{d}' must be an absolute path in the image without '..'"),
                );
            }
        }
        let fs = c
            .plan
            .tags
            .get(&tag)
            .and_then(|t| t.filesystem.made().map(str::to_string));
        if matches!(fs.as_deref(), Some("vfat" | "fat")) {
            // FAT is not mounted but staged: mtools copy its files out and back in.
            c.needs("mount", "mdir", "mtools");
            c.needs("mount", "mcopy", "mtools");
        }
        if c.step.bool("zerofree")
            && fs.is_some_and(|fs| zerofree_argv(&fs, Path::new("")).is_some())
        {
            c.needs("zerofree", ZEROFREE, ZEROFREE);
        }
        c.plan.mount(&tag);
        if let Some(alias) = c.step.opt_str("fs-tag") {
            if let Err(e) = c.plan.define_alias(alias, &tag) {
                c.err("fs-tag", e);
            }
        }
    }

    /// Where it mounts a filesystem matters to the image's tree, not what the
    /// filesystem is.
    fn cache_inputs(&self, step: &Step, inputs: &mut CacheInputs) -> Result<()> {
        inputs.text(format!(
            "mount {:?} on {:?}\n",
            step.opt_str("dirname").unwrap_or("/"),
            step.opt_str("mount-on")
        ));
        Ok(())
    }

    fn run(&self, step: &Step, b: &mut Build) -> Result<()> {
        let tag = step.arg();
        let dirname = step.opt_str("dirname");
        let (point, target) = match step.opt_str("mount-on") {
            Some(on) => {
                let base = b.state.mount_point(on)?.to_path_buf();
                let dir = dirname.unwrap_or("/");
                // Made and found inside the image: its links are the image's own.
                let point = ImageRoot::open(&base)?.mount_point(dir)?;
                let on_target = b
                    .state
                    .tag(on)?
                    .target
                    .clone()
                    .unwrap_or_else(|| "/".into());
                let target = PathBuf::from(on_target).join(dir.trim_start_matches('/'));
                (point, target.display().to_string())
            }
            None => (b.scratch_dir("mnt-")?, dirname.unwrap_or("/").to_string()),
        };
        let dev = b.partition_device(tag)?;
        let fs = b.state.tag(tag)?.fs_type.clone();
        let fat = matches!(fs.as_deref(), Some("vfat"));
        if fat {
            mount::mount(
                std::path::Path::new("tmpfs"),
                &point,
                Some("tmpfs"),
                MsFlags::empty(),
                Some("mode=0755"),
            )?;
        } else {
            mount::mount(&dev, &point, fs.as_deref(), MsFlags::empty(), None)?;
        }
        let t = b.state.tag_mut(tag)?;
        t.mount_point = Some(point.clone());
        t.target = Some(target);
        t.fat_staged = fat;
        if fat {
            let disk = t
                .disk
                .clone()
                .context("a FAT filesystem must be on a partition")?;
            let offset = t.offset;
            fat::copy_out(&disk, offset, &point)?;
        } else {
            b.watch_filesystem(&point)?;
        }
        if let Some(alias) = step.opt_str("fs-tag") {
            b.state.add_alias(alias, tag)?;
        }
        Ok(())
    }

    fn teardown(&self, step: &Step, b: &mut Build) -> Result<()> {
        let tag = step.arg();
        let Ok(t) = b.state.tag(tag) else {
            return Ok(());
        };
        let Some(point) = t.mount_point.clone() else {
            return Ok(());
        };
        let staged = t.fat_staged;
        let disk = t.disk.clone();
        let offset = t.offset;
        // Whatever later steps mounted below and did not unmount goes first.
        let mut result = Ok(());
        for inner in mount::mounts_below(&point)? {
            if inner != point {
                if let Err(e) = mount::unmount(&inner) {
                    result = Err(e);
                }
            }
        }
        if staged {
            if let Some(disk) = &disk {
                if let Err(e) = fat::copy_in(&point, disk, offset) {
                    result = Err(e);
                }
            }
        }
        let succeeded = !b.state.failed;
        let is_root = b.state.tag(tag)?.target.as_deref() == Some("/");
        if succeeded && is_root && !step.bool("keep_resolvconf") {
            if let Err(e) = drop_host_resolv_conf(&point, Path::new(HOST_RESOLV_CONF)) {
                result = Err(e);
            }
        }
        if let Err(e) = b.flush_filesystem(&point, tag) {
            result = Err(e);
        }
        mount::unmount(&point)?;
        let t = b.state.tag_mut(tag)?;
        t.mount_point = None;
        let fs = t.fs_type.clone();
        let dev = t.device.clone();
        if succeeded && step.bool("zerofree") {
            if let (Some(fs), Some(dev)) = (fs.as_deref(), dev) {
                match zerofree_argv(fs, &dev) {
                    Some(argv) => Cmd::new(&argv[0]).args(&argv[1..]).run().map(|_| ())?,
                    None => crate::log::verbose(&format!(
                        "  zerofree: skipped for '{tag}', a {fs} filesystem (only ext2/3/4)"
                    )),
                }
            }
        }
        result
    }
}

const HOST_RESOLV_CONF: &str = "/etc/resolv.conf";

/// The program (and its Debian package).
const ZEROFREE: &str = "zerofree";

/// zerofree's command line for a filesystem, if zerofree handles its type.
pub fn zerofree_argv(fs_type: &str, dev: &Path) -> Option<Vec<String>> {
    matches!(fs_type, "ext2" | "ext3" | "ext4")
        .then(|| vec![ZEROFREE.into(), "-v".into(), dev.display().to_string()])
}

/// Remove the image's /etc/resolv.conf when it is a plain file with the build host's
/// contents (debootstrap copies the host's in): the host's name servers should not
/// ship in the image. A symbolic link or a file of the image's own is left alone.
/// Returns whether it removed the file.
pub fn drop_host_resolv_conf(root: &Path, host: &Path) -> Result<bool> {
    const RESOLV_CONF: &str = "/etc/resolv.conf";
    let img = ImageRoot::open(root)?;
    if img.kind_nofollow(RESOLV_CONF)? != Some(rustix::fs::FileType::RegularFile) {
        return Ok(false);
    }
    let Ok(host_text) = std::fs::read(host) else {
        return Ok(false);
    };
    if img.read(RESOLV_CONF)? != Some(host_text) {
        return Ok(false);
    }
    img.remove_file(RESOLV_CONF)?;
    crate::log::verbose("  removed the build host's /etc/resolv.conf from the image");
    Ok(true)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::{drop_host_resolv_conf, zerofree_argv};
    use crate::plugins::testing::steps;

    #[test]
    fn zerofree_only_for_ext_filesystems() {
        let dev = Path::new("/dev/loop7");
        assert_eq!(
            zerofree_argv("ext4", dev).unwrap(),
            ["zerofree", "-v", "/dev/loop7"]
        );
        assert!(zerofree_argv("ext2", dev).is_some());
        assert_eq!(zerofree_argv("xfs", dev), None);
        assert_eq!(zerofree_argv("vfat", dev), None);
    }

    #[test]
    fn defaults_keep_nothing_and_zero_nothing() {
        let disk = [
            "mkimg: d.img\nsize: 1G",
            "mklabel: gpt\ndevice: d.img",
            "mkpart: primary\ndevice: d.img\nstart: 0%\nend: 100%\ntag: root",
            "mkfs: ext4\npartition: root",
        ];
        let s = steps(&[&disk[..], &["mount: root"]].concat()).unwrap();
        assert!(!s[4].bool("zerofree"));
        assert!(!s[4].bool("keep_resolvconf"));
        let s = steps(
            &[
                &disk[..],
                &["mount: root\nzerofree: true\nkeep_resolvconf: yes"],
            ]
            .concat(),
        )
        .unwrap();
        assert!(s[4].bool("zerofree"));
        assert!(s[4].bool("keep_resolvconf"));
        let e = steps(&[&disk[..], &["mount: root\nzerofree: maybe"]].concat()).unwrap_err();
        assert_eq!(e, ["key 'zerofree': expected true or false, found 'maybe'"]);
    }

    #[test]
    fn host_resolv_conf_is_dropped_but_not_the_images_own() {
        let d = tempfile::tempdir().unwrap();
        let host = d.path().join("host-resolv.conf");
        std::fs::write(&host, "nameserver 192.0.2.53\n").unwrap();
        let root = d.path().join("root");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        let f = root.join("etc/resolv.conf");
        // No file: nothing to do.
        assert!(!drop_host_resolv_conf(&root, &host).unwrap());
        // The image's own contents stay.
        std::fs::write(&f, "nameserver 198.51.100.1\n").unwrap();
        assert!(!drop_host_resolv_conf(&root, &host).unwrap());
        assert!(f.exists());
        // A symbolic link (systemd-resolved's) stays.
        std::fs::remove_file(&f).unwrap();
        std::os::unix::fs::symlink(&host, &f).unwrap();
        assert!(!drop_host_resolv_conf(&root, &host).unwrap());
        assert!(std::fs::symlink_metadata(&f).is_ok());
        // A copy of the host's goes.
        std::fs::remove_file(&f).unwrap();
        std::fs::copy(&host, &f).unwrap();
        assert!(drop_host_resolv_conf(&root, &host).unwrap());
        assert!(!f.exists());
    }

    #[test]
    fn the_hosts_resolv_conf_is_never_removed_through_a_link() {
        use crate::plugins::testing::{Canary, plant_link};
        // The host's /etc, with its resolv.conf; the image's /etc a link to it.
        let canary = Canary::new();
        let host = canary.path.join("resolv.conf");
        std::fs::write(&host, "nameserver 192.0.2.53\n").unwrap();
        let before = canary.snapshot();
        for target in [canary.path.display().to_string(), canary.escaping()] {
            let d = tempfile::tempdir().unwrap();
            let root = d.path();
            let inside = canary.inside(root);
            plant_link(root, "etc", &target);
            // Where /etc leads in the image, a copy of the host's: removed there only.
            std::fs::copy(&host, inside.join("resolv.conf")).unwrap();
            let removed = drop_host_resolv_conf(root, &host);
            assert_eq!(canary.snapshot(), before, "etc -> {target}");
            assert!(removed.unwrap());
            assert!(!inside.join("resolv.conf").exists());
        }
    }

    #[test]
    fn mount_checks() {
        let e = steps(&[
            "mkimg: d.img\nsize: 1G",
            "mklabel: gpt\ndevice: d.img",
            "mkpart: primary\ndevice: d.img\nstart: 0%\nend: 100%\ntag: root",
            "mount: root",
            "mount: nope\nmount-on: root",
        ])
        .unwrap_err();
        assert_eq!(
            e,
            vec![
                "key 'mount': tag 'root' has no filesystem: add an mkfs step before mounting it",
                "key 'dirname': required with mount-on: where below it to mount (e.g. /boot/efi)",
                "key 'mount': tag 'nope' is not defined by an earlier step (defined so far: '/', 'root')",
            ]
        );
    }
}
