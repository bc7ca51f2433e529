//! `mkpart`: add a partition, aligned to 1 MiB as parted does, and tag it.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

use crate::blockdev::table::{self, LabelKind, NewPartition};
use crate::build::Build;
use crate::plan::PlanTag;
use crate::state::Tag;
use crate::step::{Check, Key, Kind, Plugin, Step, StepSpec};

pub struct Mkpart;

static SPEC: StepSpec = StepSpec {
    name: "mkpart",
    value: Kind::Str,
    value_doc: "partition type: primary (msdos); for gpt, the partition's name",
    keys: &[
        Key::req("device", Kind::Str, "image file or block device to partition"),
        Key::req(
            "start",
            Kind::Str,
            "start: a percentage of the disk (0%), a size (1M = 10^6 bytes, 1MiB, 1G) or sectors (2048s); rounded to 1 MiB",
        ),
        Key::req("end", Kind::Str, "end, in the same forms as start (100% is the end of the disk)"),
        Key::opt("tag", Kind::Str, "name by which later steps refer to the partition").aliases(&["part-tag"]),
        Key::opt(
            "fs-type",
            Kind::Str,
            "filesystem the partition is for (sets its type): ext2, ext4, xfs, btrfs, fat32, vfat, linux-swap, ...",
        )
        .default("ext2"),
    ],
    summary: "Create a partition on a labelled disk.",
};

impl Plugin for Mkpart {
    fn spec(&self) -> &'static StepSpec {
        &SPEC
    }

    fn check(&self, c: &mut Check) {
        let step = c.step;
        let start = step.opt_str("start").unwrap_or_default();
        let end = step.opt_str("end").unwrap_or_default();
        let mut positions_ok = true;
        for (key, v) in [("start", start), ("end", end)] {
            if let Err(e) = table::parse_position(v) {
                c.err(key, format!("{e:#}"));
                positions_ok = false;
            }
        }
        let device = step.opt_str("device").unwrap_or_default().to_string();
        super::check_device(c, "device", &device);
        let disk = c.plan.disks.get(&device).cloned();
        match disk.as_ref().and_then(|d| d.label) {
            None if c.plan.unchecked.contains(&"mklabel") => {}
            None => c.err(
                "device",
                format!("'{device}' has no partition table from an earlier mklabel step"),
            ),
            Some(LabelKind::Msdos)
                if step.arg() != "primary"
                    && step.arg() != "logical"
                    && step.arg() != "extended" =>
            {
                let got = step.arg().to_string();
                c.err(
                    "mkpart",
                    format!("'{got}' is not an msdos partition type: expected primary"),
                );
            }
            Some(kind) => {
                if let (true, Some(size)) = (positions_ok, disk.as_ref().and_then(|d| d.size)) {
                    match table::resolve_range(size, kind, start, end) {
                        Err(e) => c.err("end", format!("{e:#}")),
                        Ok((first, last)) => {
                            let clash = disk
                                .as_ref()
                                .map(|d| {
                                    d.parts
                                        .iter()
                                        .find(|(s, e, _)| first <= *e && *s <= last)
                                        .copied()
                                })
                                .unwrap_or(None);
                            if let Some((s, e, by)) = clash {
                                c.err(
                                    "start",
                                    format!(
                                        "partition at sectors {first}-{last} overlaps the one made by step {by} (sectors {s}-{e})"
                                    ),
                                );
                            } else if let Some(d) = c.plan.disks.get_mut(&device) {
                                d.parts.push((first, last, step.index));
                            }
                        }
                    }
                }
            }
        }
        if let Some(tag) = step.opt_str("tag") {
            let t = PlanTag {
                step: step.index,
                disk: Some(device),
                fs_type: None,
                mounted: false,
            };
            if let Err(e) = c.plan.define_tag(tag, t) {
                c.err("tag", e);
            }
        }
    }

    fn run(&self, step: &Step, b: &mut Build) -> Result<()> {
        let device = PathBuf::from(step.str("device")?);
        b.claim_device(&device)?;
        let Some(kind) = table::read_label(&device)? else {
            bail!("{} has no partition table", device.display());
        };
        let size = table::disk_size(&device)?;
        let (first, last) = table::resolve_range(size, kind, step.str("start")?, step.str("end")?)?;
        let number = table::add_partition(
            &device,
            &NewPartition {
                part_type: step.arg(),
                fs_type: step.opt_str("fs-type").unwrap_or("ext2"),
                start_sector: first,
                end_sector: last,
            },
        )?;
        crate::log::verbose(&format!(
            "  partition {number} of {}: sectors {first}-{last}",
            device.display()
        ));
        let name = step
            .opt_str("tag")
            .map(str::to_string)
            .unwrap_or_else(|| format!("{}#{number}", display(&device)));
        b.state.add_tag(Tag {
            name,
            disk: Some(device),
            number: Some(number),
            offset: first * 512,
            size: (last - first + 1) * 512,
            ..Tag::default()
        })
    }
}

fn display(p: &Path) -> String {
    p.display().to_string()
}

#[cfg(test)]
mod tests {
    use crate::plugins::testing::steps;

    #[test]
    fn overlapping_and_oversized_partitions_are_found_before_running() {
        let e = steps(&[
            "mkimg: d.img\nsize: 300M",
            "mklabel: gpt\ndevice: d.img",
            "mkpart: primary\ndevice: d.img\nstart: 1M\nend: 65M\ntag: efi",
            "mkpart: primary\ndevice: d.img\nstart: 60M\nend: 100%\ntag: root",
            "mkpart: primary\ndevice: d.img\nstart: 1M\nend: 400M\ntag: efi",
        ])
        .unwrap_err();
        assert_eq!(e.len(), 3, "{e:?}");
        assert!(
            e[0].starts_with(
                "key 'start': partition at sectors 116736-612351 overlaps the one made by step 3"
            ),
            "{e:?}"
        );
        assert!(e[1].starts_with("key 'end': "), "{e:?}");
        assert_eq!(e[2], "key 'tag': tag 'efi' is already defined by step 3");
    }

    #[test]
    fn needs_a_label_first() {
        let e = steps(&["mkpart: primary\ndevice: d.img\nstart: 0%\nend: 100%"]).unwrap_err();
        assert_eq!(
            e,
            vec!["key 'device': 'd.img' has no partition table from an earlier mklabel step"]
        );
    }

    #[test]
    fn bad_positions() {
        let e = steps(&[
            "mklabel: msdos\ndevice: d.img",
            "mkpart: primary\ndevice: d.img\nstart: 0%\nend: 12Q",
        ])
        .unwrap_err();
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with("key 'end': "), "{e:?}");
    }
}
