//! `mkfs`: make a filesystem on a partition and record its UUID.

use anyhow::{Context, Result};

use crate::engine::build::Build;
use crate::engine::plan::Filesystem;
use crate::engine::step::{CacheRole, Check, Key, Kind, Plugin, Step, StepSpec};
use crate::host::cmd::Cmd;

pub struct Mkfs;

const TYPES: &[&str] = &[
    "ext2", "ext3", "ext4", "vfat", "fat", "xfs", "btrfs", "swap",
];

/// The program that makes a filesystem of a type, and the Debian package with it.
fn program(fs: &str) -> Option<(&'static str, &'static str)> {
    Some(match fs {
        "ext2" => ("mkfs.ext2", "e2fsprogs"),
        "ext3" => ("mkfs.ext3", "e2fsprogs"),
        "ext4" => ("mkfs.ext4", "e2fsprogs"),
        "vfat" | "fat" => ("mkfs.vfat", "dosfstools"),
        "xfs" => ("mkfs.xfs", "xfsprogs"),
        "btrfs" => ("mkfs.btrfs", "btrfs-progs"),
        "swap" => ("mkswap", "util-linux"),
        _ => return None,
    })
}

static SPEC: StepSpec = StepSpec {
    name: "mkfs",
    value: Kind::Str,
    value_doc: "`ext2`, `ext3`, `ext4`, `vfat` (or `fat`), `xfs`, `btrfs` or `swap`.",
    keys: &[
        Key::req("partition", Kind::Str, "tag of the partition."),
        Key::opt(
            "label",
            Kind::Str,
            "filesystem label (at most 11 characters for vfat, 12 for xfs, 16 for the \
                others).",
        ),
        Key::opt(
            "options",
            Kind::Str,
            "extra options for the mkfs tool, split at spaces.",
        ),
    ],
    summary: "Makes a filesystem on a tagged partition with the system's mkfs tool (`mkfs.ext4 \
        -F`, `mkfs.xfs -f`, `mkfs.btrfs -f`, `mkfs.vfat`, `mkswap`) and records its \
        UUID for `fstab` and `grub`.",
    cache: CacheRole::Setup,
    always_saved: false,
};

impl Plugin for Mkfs {
    fn spec(&self) -> &'static StepSpec {
        &SPEC
    }

    fn check(&self, c: &mut Check) {
        let fs = c.step.arg().to_string();
        if let Some((prog, package)) = program(&fs) {
            c.needs("mkfs", prog, package);
            c.needs("mkfs", "blkid", "util-linux");
        }
        if !TYPES.contains(&fs.as_str()) {
            c.err(
                "mkfs",
                format!(
                    "unknown filesystem type '{fs}': expected one of {}",
                    TYPES.join(", ")
                ),
            );
        }
        if let Some(label) = c.step.opt_str("label") {
            let max = match fs.as_str() {
                "vfat" | "fat" => 11,
                "xfs" => 12,
                _ => 16,
            };
            if label.len() > max {
                let l = label.to_string();
                c.err(
                    "label",
                    format!("label '{l}' is longer than {max} characters, the most {fs} allows"),
                );
            }
        }
        let part = c.step.opt_str("partition").unwrap_or_default().to_string();
        if c.use_tag("partition", &part) {
            if let Some(t) = c.plan.tags.get_mut(&part) {
                t.filesystem = Filesystem::Made(fs);
            }
        }
    }

    fn run(&self, step: &Step, b: &mut Build) -> Result<()> {
        let tag = step.str("partition")?;
        let dev = b.partition_device(tag)?;
        let fs = step.arg();
        let label = step.opt_str("label");
        let extra: Vec<&str> = step
            .opt_str("options")
            .unwrap_or("")
            .split_whitespace()
            .collect();
        let (prog, _) = program(fs).context("validated")?;
        let cmd = Cmd::new(prog);
        let cmd = match fs {
            "swap" => cmd.args(label.map(|l| ["-L", l]).into_iter().flatten()),
            "vfat" | "fat" => cmd.args(label.map(|l| ["-n", l]).into_iter().flatten()),
            // -f: the partition may hold an old filesystem from a reused image.
            "xfs" | "btrfs" => cmd
                .arg("-f")
                .args(label.map(|l| ["-L", l]).into_iter().flatten()),
            _ => cmd
                .arg("-F")
                .args(label.map(|l| ["-L", l]).into_iter().flatten()),
        };
        cmd.args(&extra).arg(&dev).run()?;
        // Flush the device's cache to the image file: mtools and later tools read the
        // image file directly.
        std::fs::File::open(&dev)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("flushing {}", dev.display()))?;
        let uuid = Cmd::new("blkid")
            .args(["-p", "-s", "UUID", "-o", "value"])
            .arg(&dev)
            .run()
            .with_context(|| {
                format!(
                    "reading the UUID of the new filesystem on {}",
                    dev.display()
                )
            })?
            .trim()
            .to_string();
        let t = b.state.tag_mut(tag)?;
        t.fs_type = Some(if fs == "fat" {
            "vfat".into()
        } else {
            fs.to_string()
        });
        t.fs_uuid = Some(uuid);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::plugins::testing::check_errors;

    #[test]
    fn unknown_type_and_tag() {
        assert_eq!(
            check_errors("mkfs: ext5\npartition: nope"),
            vec![
                "key 'mkfs': unknown filesystem type 'ext5': expected one of ext2, ext3, ext4, vfat, fat, xfs, btrfs, swap",
                "key 'partition': tag 'nope' is not defined by an earlier step (defined so far: '/')"
            ]
        );
    }

    #[test]
    fn long_fat_label() {
        assert_eq!(
            check_errors("mkfs: vfat\npartition: /\nlabel: MUCHTOOLONGLABEL"),
            vec![
                "key 'label': label 'MUCHTOOLONGLABEL' is longer than 11 characters, the most vfat allows"
            ]
        );
    }

    #[test]
    fn every_type_declares_its_program() {
        for fs in super::TYPES {
            let raw =
                crate::engine::spec::load(&format!("steps:\n  - mkfs: {fs}\n    partition: /\n"))
                    .unwrap();
            let mut plan = crate::plugins::testing::plan_with_root();
            let r = crate::engine::template::Renderer::new(Default::default());
            crate::engine::validate::validate(&raw.steps, &r, crate::plugins::ALL, &mut plan)
                .unwrap();
            let needs: Vec<_> = plan.host_needs.iter().map(|n| n.any_of[0]).collect();
            let (prog, package) = super::program(fs).unwrap();
            assert_eq!(needs, [(prog, package), ("blkid", "util-linux")], "{fs}");
            assert_eq!(plan.host_needs[0].loc.line, 2);
        }
        assert_eq!(super::program("xfs"), Some(("mkfs.xfs", "xfsprogs")));
    }
}
