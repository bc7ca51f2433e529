//! `mkfs`: make a filesystem on a partition and record its UUID.

use anyhow::{Context, Result};

use crate::build::Build;
use crate::cmd::Cmd;
use crate::step::{Check, Key, Kind, Plugin, Step, StepSpec};

pub struct Mkfs;

const TYPES: &[&str] = &[
    "ext2", "ext3", "ext4", "vfat", "fat", "xfs", "btrfs", "swap",
];

static SPEC: StepSpec = StepSpec {
    name: "mkfs",
    value: Kind::Str,
    value_doc: "filesystem type: ext2, ext3, ext4, vfat, xfs, btrfs or swap",
    keys: &[
        Key::req("partition", Kind::Str, "tag of the partition"),
        Key::opt("label", Kind::Str, "filesystem label"),
        Key::opt(
            "options",
            Kind::Str,
            "extra options for the mkfs program, split at spaces",
        ),
    ],
    summary: "Make a filesystem on a partition.",
};

impl Plugin for Mkfs {
    fn spec(&self) -> &'static StepSpec {
        &SPEC
    }

    fn check(&self, c: &mut Check) {
        let fs = c.step.arg().to_string();
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
                t.fs_type = Some(fs);
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
        let cmd = match fs {
            "swap" => Cmd::new("mkswap").args(label.map(|l| ["-L", l]).into_iter().flatten()),
            "vfat" | "fat" => {
                Cmd::new("mkfs.vfat").args(label.map(|l| ["-n", l]).into_iter().flatten())
            }
            // -f: the partition may hold an old filesystem from a reused image.
            "xfs" | "btrfs" => Cmd::new(format!("mkfs.{fs}"))
                .arg("-f")
                .args(label.map(|l| ["-L", l]).into_iter().flatten()),
            _ => Cmd::new(format!("mkfs.{fs}"))
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
}
