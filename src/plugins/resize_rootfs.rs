//! `resize-rootfs: TAG`: make the image grow its root partition and filesystem to
//! fill its disk on first boot, so that an image written to a bigger disk (or
//! enlarged with `qemu-img resize`) uses all of it.
//!
//! The step writes a script and a systemd unit into the image and enables the unit.
//! At first boot, after the root filesystem is remounted read-write, the script grows
//! the root partition with sfdisk, tells the kernel its new size with partx, grows the
//! filesystem while it is mounted (resize2fs, xfs_growfs or btrfs), and the unit
//! disables itself. Everything it needs is in a default Debian system (fdisk,
//! util-linux, e2fsprogs): no network at first boot.

use anyhow::{Result, bail};

use crate::distro::chroot;
use crate::engine::build::Build;
use crate::engine::step::{CacheRole, Check, Kind, Plugin, Step, StepSpec};
use crate::host::image_root::ImageRoot;

pub struct ResizeRootfs;

static SPEC: StepSpec = StepSpec {
    name: "resize-rootfs",
    value: Kind::Str,
    value_doc: "tag of the image's root filesystem; an earlier step must mount it; an ext2/3/4, \
        xfs or btrfs filesystem",
    keys: &[],
    summary: "Makes the image grow its root partition and root filesystem to fill its disk the \
        first time it boots, so that an image written to a bigger disk, or enlarged \
        with `qemu-img resize`, uses all of it.",
    cache: CacheRole::Tree,
    always_saved: false,
};

/// Where the step writes its files, in the image.
pub const SCRIPT: &str = "/usr/local/sbin/resize-rootfs";
pub const UNIT: &str = "/etc/systemd/system/resize-rootfs.service";
pub const WANTS_LINK: &str = "/etc/systemd/system/local-fs.target.wants/resize-rootfs.service";

/// Filesystems the script can grow while mounted.
const GROWABLE: &[&str] = &["ext2", "ext3", "ext4", "xfs", "btrfs"];

pub const SCRIPT_TEXT: &str = r#"#!/bin/sh
# Written by vmdb's resize-rootfs step. Run once at first boot by resize-rootfs.service:
# grow the root partition to the end of its disk, then the root filesystem to fill it.
set -eu
part=$(findmnt -n -o SOURCE /)
fstype=$(findmnt -n -o FSTYPE /)
name=$(basename "$(readlink -f "$part")")
if [ ! -e "/sys/class/block/$name/partition" ]; then
    echo "resize-rootfs: $part is not a partition; nothing to do"
    exit 0
fi
num=$(cat "/sys/class/block/$name/partition")
disk="/dev/$(lsblk -n -o PKNAME "$part" | head -n 1)"
echo "resize-rootfs: growing partition $num of $disk ($part, $fstype)"
if sfdisk --dump "$disk" | grep -q '^label: gpt'; then
    # The disk grew: move GPT's backup header to its new end first.
    sfdisk --no-reread --no-tell-kernel --relocate gpt-bak-std "$disk"
fi
echo ', +' | sfdisk --no-reread --no-tell-kernel -N "$num" "$disk"
partx -u -n "$num" "$disk"
case "$fstype" in
    ext2|ext3|ext4) resize2fs "$part" ;;
    xfs) xfs_growfs / ;;
    btrfs) btrfs filesystem resize max / ;;
    *) echo "resize-rootfs: cannot grow a $fstype filesystem" ;;
esac
echo "resize-rootfs: done"
"#;

pub const UNIT_TEXT: &str = "# Written by vmdb's resize-rootfs step.
[Unit]
Description=Grow the root partition and filesystem to fill the disk
DefaultDependencies=no
After=systemd-remount-fs.service
Before=local-fs.target shutdown.target
Conflicts=shutdown.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/resize-rootfs
ExecStartPost=/bin/systemctl --no-reload disable resize-rootfs.service

[Install]
WantedBy=local-fs.target
";

/// Programs the script runs, by the package that has them (for the error message).
const NEEDS: &[(&[&str], &str)] = &[
    (&["usr/sbin/sfdisk", "sbin/sfdisk"], "fdisk"),
    (&["usr/bin/partx", "bin/partx"], "util-linux"),
    (&["usr/bin/lsblk", "bin/lsblk"], "util-linux"),
    (&["usr/bin/findmnt", "bin/findmnt"], "util-linux"),
    (&["usr/bin/systemctl", "bin/systemctl"], "systemd"),
];

/// Why the filesystem of `tag`, of type `fs`, cannot be resized; None when it can.
fn not_growable(tag: &str, fs: &str) -> Option<String> {
    (!GROWABLE.contains(&fs)).then(|| {
        format!(
            "tag '{tag}' has a {fs} filesystem, which cannot be grown while mounted: expected one of {}",
            GROWABLE.join(", ")
        )
    })
}

/// What a root filesystem of type `fs` needs to grow, in the image.
fn grower(fs: &str) -> Option<(&'static [&'static str], &'static str)> {
    Some(match fs {
        "ext2" | "ext3" | "ext4" => (&["usr/sbin/resize2fs", "sbin/resize2fs"], "e2fsprogs"),
        "xfs" => (&["usr/sbin/xfs_growfs", "sbin/xfs_growfs"], "xfsprogs"),
        "btrfs" => (&["usr/bin/btrfs", "bin/btrfs"], "btrfs-progs"),
        _ => return None,
    })
}

/// The packages the image lacks for the first-boot resize (empty: nothing missing).
pub fn missing_packages(img: &ImageRoot, fs: &str) -> Result<Vec<&'static str>> {
    let mut missing = Vec::new();
    for (paths, pkg) in NEEDS.iter().copied().chain(grower(fs)) {
        let mut present = false;
        for p in paths {
            present |= img.exists(p)?;
        }
        if !present && !missing.contains(&pkg) {
            missing.push(pkg);
        }
    }
    Ok(missing)
}

/// Install the script and the unit in the image, and enable the unit.
pub fn install(img: &ImageRoot) -> Result<()> {
    img.write_file(SCRIPT, &mut SCRIPT_TEXT.as_bytes(), 0o755, None)?;
    img.write_file(UNIT, &mut UNIT_TEXT.as_bytes(), 0o644, None)?;
    img.symlink(std::path::Path::new(UNIT), WANTS_LINK)
}

impl Plugin for ResizeRootfs {
    fn spec(&self) -> &'static StepSpec {
        &SPEC
    }

    fn check(&self, c: &mut Check) {
        let tag = c.step.arg().to_string();
        chroot::check_mounted_tag(c, "resize-rootfs", &tag);
        // An existing filesystem (kpartx tags) is checked when the build knows its type.
        let fs = c
            .plan
            .tags
            .get(&tag)
            .and_then(|t| t.filesystem.made().map(str::to_string));
        if let Some(why) = fs.and_then(|fs| not_growable(&tag, &fs)) {
            c.err("resize-rootfs", why);
        }
    }

    fn run(&self, step: &Step, b: &mut Build) -> Result<()> {
        let tag = step.arg();
        let root = chroot::tag_dir(b, tag)?;
        let Some(fs) = b.state.tag(tag)?.fs_type.clone() else {
            bail!("the type of the filesystem of tag '{tag}' is not known (blkid found none)");
        };
        if let Some(why) = not_growable(tag, &fs) {
            bail!(why);
        }
        let img = ImageRoot::open(&root)?;
        let missing = missing_packages(&img, &fs)?;
        if !missing.is_empty() {
            bail!(
                "the image lacks what resize-rootfs needs at first boot: install {} (an apt step before this one)",
                missing.join(", ")
            );
        }
        install(&img)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugins::testing::{
        Canary, check_errors, plant_link, test_build_with_root, test_step,
    };
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    fn touch(root: &Path, p: &str) {
        let f = root.join(p);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(f, "").unwrap();
    }

    #[test]
    fn needs_a_mounted_growable_filesystem() {
        assert_eq!(
            check_errors("resize-rootfs: nope"),
            [
                "key 'resize-rootfs': tag 'nope' is not defined by an earlier step (defined so far: '/')"
            ]
        );
        let e = crate::plugins::testing::steps(&[
            "mkimg: d.img\nsize: 1G",
            "mklabel: gpt\ndevice: d.img",
            "mkpart: primary\ndevice: d.img\nstart: 0%\nend: 100%\ntag: esp",
            "mkfs: vfat\npartition: esp",
            "mount: esp\nmount-on: /\ndirname: /boot/efi",
            "resize-rootfs: esp",
        ])
        .unwrap_err();
        assert_eq!(
            e,
            [
                "key 'resize-rootfs': tag 'esp' has a vfat filesystem, which cannot be grown while mounted: expected one of ext2, ext3, ext4, xfs, btrfs"
            ]
        );
        assert!(check_errors("resize-rootfs: /").is_empty());
    }

    /// A disk partitioned outside the spec (kpartx `tags`): the filesystem's type is
    /// only known when the build reads it.
    #[test]
    fn an_existing_filesystem_is_checked_when_the_build_reads_it() {
        let s = crate::plugins::testing::steps(&[
            "kpartx: disk.img\ntags: [root]",
            "mount: root",
            "resize-rootfs: root",
        ]);
        assert!(s.is_ok(), "{s:?}");
        // When the build runs, the type read decides.
        let refusal = |fs: Option<&str>| {
            let (mut b, _root) = test_build_with_root();
            b.state.tag_mut("/").unwrap().fs_type = fs.map(str::to_string);
            let step = test_step("resize-rootfs: /");
            ResizeRootfs.run(&step, &mut b).unwrap_err().to_string()
        };
        assert_eq!(
            refusal(Some("vfat")),
            "tag '/' has a vfat filesystem, which cannot be grown while mounted: expected one of ext2, ext3, ext4, xfs, btrfs"
        );
        assert_eq!(
            refusal(None),
            "the type of the filesystem of tag '/' is not known (blkid found none)"
        );
    }

    #[test]
    fn lists_what_the_image_lacks() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(
            missing_packages(&ImageRoot::open(d.path()).unwrap(), "ext4").unwrap(),
            ["fdisk", "util-linux", "systemd", "e2fsprogs"]
        );
        for p in [
            "usr/sbin/sfdisk",
            "usr/bin/partx",
            "usr/bin/lsblk",
            "usr/bin/findmnt",
            "usr/bin/systemctl",
            "usr/sbin/resize2fs",
        ] {
            touch(d.path(), p);
        }
        let img = ImageRoot::open(d.path()).unwrap();
        assert!(missing_packages(&img, "ext4").unwrap().is_empty());
        assert_eq!(missing_packages(&img, "xfs").unwrap(), ["xfsprogs"]);
    }

    #[test]
    fn refuses_an_image_without_sfdisk() {
        let (mut b, root) = test_build_with_root();
        let e = ResizeRootfs
            .run(&test_step("resize-rootfs: /"), &mut b)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "the image lacks what resize-rootfs needs at first boot: install fdisk, util-linux, systemd, e2fsprogs (an apt step before this one)"
        );
        assert!(!root.path().join("usr/local/sbin/resize-rootfs").exists());
    }

    #[test]
    fn installs_and_enables_the_unit() {
        let (mut b, root) = test_build_with_root();
        let r = root.path();
        for p in [
            "usr/sbin/sfdisk",
            "usr/bin/partx",
            "usr/bin/lsblk",
            "usr/bin/findmnt",
            "usr/bin/systemctl",
            "usr/sbin/resize2fs",
        ] {
            touch(r, p);
        }
        let step = test_step("resize-rootfs: /");
        ResizeRootfs.run(&step, &mut b).unwrap();
        // Twice is the same as once.
        ResizeRootfs.run(&step, &mut b).unwrap();
        let script = r.join("usr/local/sbin/resize-rootfs");
        assert_eq!(std::fs::read_to_string(&script).unwrap(), SCRIPT_TEXT);
        assert_eq!(
            std::fs::metadata(&script).unwrap().permissions().mode() & 0o7777,
            0o755
        );
        let unit = r.join("etc/systemd/system/resize-rootfs.service");
        assert_eq!(std::fs::read_to_string(&unit).unwrap(), UNIT_TEXT);
        assert_eq!(
            std::fs::read_link(
                r.join("etc/systemd/system/local-fs.target.wants/resize-rootfs.service")
            )
            .unwrap(),
            Path::new("/etc/systemd/system/resize-rootfs.service")
        );
        // The unit runs the script the step wrote.
        assert!(UNIT_TEXT.contains(&format!("ExecStart={SCRIPT}\n")));
    }

    #[test]
    fn writes_inside_the_image_whatever_its_links() {
        let canary = Canary::new();
        let (mut b, root) = test_build_with_root();
        let r = root.path();
        for p in [
            "usr/sbin/sfdisk",
            "usr/bin/partx",
            "usr/bin/lsblk",
            "usr/bin/findmnt",
            "usr/bin/systemctl",
            "usr/sbin/resize2fs",
        ] {
            touch(r, p);
        }
        let inside = canary.inside(r);
        plant_link(r, "usr/local", &canary.escaping());
        plant_link(r, "etc/systemd", &canary.path.display().to_string());
        ResizeRootfs
            .run(&test_step("resize-rootfs: /"), &mut b)
            .unwrap();
        canary.assert_untouched();
        assert_eq!(
            std::fs::read_to_string(inside.join("sbin/resize-rootfs")).unwrap(),
            SCRIPT_TEXT
        );
        assert_eq!(
            std::fs::read_to_string(inside.join("system/resize-rootfs.service")).unwrap(),
            UNIT_TEXT
        );
        assert!(
            std::fs::symlink_metadata(
                inside.join("system/local-fs.target.wants/resize-rootfs.service")
            )
            .unwrap()
            .is_symlink()
        );
    }

    #[test]
    fn the_script_is_valid_shell() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("s");
        std::fs::write(&f, SCRIPT_TEXT).unwrap();
        crate::host::cmd::Cmd::new("sh")
            .arg("-n")
            .arg(&f)
            .run()
            .unwrap();
    }
}
