//! `mount`: mount a partition's filesystem, at a private directory (the image's root)
//! or below another mounted tag (`mount-on` + `dirname`, e.g. /boot/efi).
//!
//! A FAT filesystem (an EFI system partition) cannot be mounted by the kernel on the
//! hosts vmdb is built for, so its mount point is a tmpfs filled from the filesystem;
//! at teardown its contents are copied back into the filesystem with mtools.

use std::path::PathBuf;

use anyhow::{Context, Result};
use nix::mount::MsFlags;

use crate::build::Build;
use crate::step::{Check, Key, Kind, Plugin, Step, StepSpec};
use crate::{fat, mount};

pub struct Mount;

static SPEC: StepSpec = StepSpec {
    name: "mount",
    value: Kind::Str,
    value_doc: "tag of the partition whose filesystem to mount",
    keys: &[
        Key::opt(
            "mount-on",
            Kind::Str,
            "tag of a mounted filesystem to mount this one below",
        ),
        Key::opt(
            "dirname",
            Kind::Str,
            "where in the image to mount it (e.g. /boot/efi); required with mount-on",
        ),
    ],
    summary: "Mount a filesystem for the rest of the build.",
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
            } else if t.fs_type.is_none() {
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
        if let Some(t) = c.plan.tags.get_mut(&tag) {
            t.mounted = true;
        }
    }

    fn run(&self, step: &Step, b: &mut Build) -> Result<()> {
        let tag = step.arg();
        let dirname = step.opt_str("dirname");
        let (point, target) = match step.opt_str("mount-on") {
            Some(on) => {
                let base = b.state.mount_point(on)?.to_path_buf();
                let dir = dirname.unwrap_or("/");
                let point = crate::state::in_image(&base, dir)?;
                std::fs::create_dir_all(&point)
                    .with_context(|| format!("creating mount point {}", point.display()))?;
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
        mount::unmount(&point)?;
        let t = b.state.tag_mut(tag)?;
        t.mount_point = None;
        result
    }
}

#[cfg(test)]
mod tests {
    use crate::plugins::testing::steps;

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
