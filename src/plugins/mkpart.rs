//! `mkpart`: add a partition, aligned to 1 MiB as parted does, and tag it.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

use crate::engine::build::Build;
use crate::engine::plan::{Filesystem, PlanTag};
use crate::engine::state::Tag;
use crate::engine::step::{CacheRole, Check, Key, Kind, Plugin, Step, StepSpec};
use crate::host::blockdev::table::{self, LabelKind, NewPartition};

pub struct Mkpart;

static SPEC: StepSpec = StepSpec {
    name: "mkpart",
    value: Kind::Str,
    value_doc: "`primary` on msdos; on gpt, the partition's name.",
    keys: &[
        Key::req(
            "device",
            Kind::Str,
            "the image file or block device (see [mklabel](mklabel.md) for block \
                devices in use).",
        ),
        Key::req(
            "start",
            Kind::Str,
            "where the partition starts: a position as above.",
        ),
        Key::req("end", Kind::Str, "where it ends: a position as above."),
        Key::opt(
            "tag",
            Kind::Str,
            "the name later steps use for the partition. Without it the partition is \
                named `DEVICE#N`.",
        )
        .aliases(&["part-tag"]),
        Key::opt(
            "fs-type",
            Kind::Str,
            "what the partition is for; sets its type: `fat16`, `fat32` and `vfat` \
                give a FAT type (0x06/0x0c, or Microsoft basic data on gpt), \
                `linux-swap` a swap type, anything else Linux filesystem (0x83).",
        )
        .default("ext2"),
    ],
    summary: "Adds a partition to a disk labelled by an earlier `mklabel` step and gives it a \
        tag.",
    cache: CacheRole::Setup,
    always_saved: false,
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
        match c.plan.disks.get(&device).and_then(|d| d.label) {
            None if c.plan.unchecked.contains(&"mklabel") => {}
            None => c.err(
                "device",
                format!("'{device}' has no partition table from an earlier mklabel step"),
            ),
            Some(kind) => {
                let range = positions_ok.then_some((start, end));
                check_partition(c, &device, kind, range);
            }
        }
        if let Some(tag) = step.opt_str("tag") {
            let t = PlanTag {
                step: step.index,
                disk: Some(device),
                filesystem: Filesystem::None,
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
        let size = crate::host::blockdev::disk_size(&device)?;
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

/// Whether the table on `device` has room for the partition and, when the disk's size
/// is known, whether it fits there: what the run would find, found before anything
/// runs. `range` is the step's start and end, if they parse.
fn check_partition(c: &mut Check, device: &str, kind: LabelKind, range: Option<(&str, &str)>) {
    if kind == LabelKind::Msdos {
        if let Err(e) = table::check_msdos_type(c.step.arg()) {
            c.err("mkpart", format!("{e:#}"));
            return;
        }
    }
    let Some(disk) = c.plan.disks.get_mut(device) else {
        return;
    };
    let max = kind.max_partitions();
    if let (Some(first), Some(last), true) = (
        disk.made_by.first(),
        disk.made_by.last(),
        disk.made_by.len() >= max,
    ) {
        let (first, last) = (*first, *last);
        let msg = match kind {
            LabelKind::Msdos => format!(
                "an msdos partition table holds at most {max} primary partitions, and steps \
                 {first} to {last} make them already; use a gpt label for more"
            ),
            LabelKind::Gpt => format!(
                "a GPT holds at most {max} partitions, and steps {first} to {last} make \
                 them already"
            ),
        };
        c.err("mkpart", msg);
        return;
    }
    disk.made_by.push(c.step.index);
    let (Some((start, end)), Some(size)) = (range, disk.size) else {
        return;
    };
    let (first, last) = match table::resolve_range(size, kind, start, end) {
        Ok(r) => r,
        Err(e) => {
            c.err("end", format!("{e:#}"));
            return;
        }
    };
    if kind == LabelKind::Msdos && last > table::MBR_LAST_SECTOR {
        c.err(
            "end",
            format!(
                "the partition ends at sector {last}, past the 2 TiB an msdos partition \
                 table can address; use a gpt label"
            ),
        );
        return;
    }
    // At most max_partitions() of them: this search stays short.
    match disk
        .parts
        .iter()
        .find(|(s, e, _)| first <= *e && *s <= last)
    {
        Some((s, e, by)) => {
            let msg = format!(
                "partition at sectors {first}-{last} overlaps the one made by step {by} (sectors {s}-{e})"
            );
            c.err("start", msg);
        }
        None => disk.parts.push((first, last, c.step.index)),
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

    #[test]
    fn a_fifth_msdos_partition_is_found_before_running() {
        let mut steps_yaml = vec![
            "mkimg: d.img\nsize: 1G".to_string(),
            "mklabel: msdos\ndevice: d.img".to_string(),
        ];
        for i in 0..5 {
            steps_yaml.push(format!(
                "mkpart: primary\ndevice: d.img\nstart: {}M\nend: {}M",
                i * 100 + 1,
                i * 100 + 100
            ));
        }
        let refs: Vec<&str> = steps_yaml.iter().map(String::as_str).collect();
        assert_eq!(
            steps(&refs).unwrap_err(),
            [
                "key 'mkpart': an msdos partition table holds at most 4 primary partitions, and steps 3 to 6 make them already; use a gpt label for more"
            ]
        );
        // A new label starts a new table.
        steps_yaml.insert(6, "mklabel: msdos\ndevice: d.img".into());
        let refs: Vec<&str> = steps_yaml.iter().map(String::as_str).collect();
        assert!(steps(&refs).is_ok());
    }

    #[test]
    fn a_129th_gpt_partition_is_found_before_running() {
        // On a device of unknown size too: the count does not need the places.
        let mut steps_yaml = vec!["mklabel: gpt\ndevice: /dev/vdz".to_string()];
        for i in 0..129 {
            steps_yaml.push(format!(
                "mkpart: p{i}\ndevice: /dev/vdz\nstart: {}MiB\nend: {}MiB",
                i + 1,
                i + 2
            ));
        }
        let refs: Vec<&str> = steps_yaml.iter().map(String::as_str).collect();
        assert_eq!(
            steps(&refs).unwrap_err(),
            [
                "key 'mkpart': a GPT holds at most 128 partitions, and steps 2 to 129 make them already"
            ]
        );
        assert!(steps(&refs[..129]).is_ok());
    }

    #[test]
    fn logical_partitions_and_msdos_past_2_tib_are_refused() {
        let e = steps(&[
            "mkimg: d.img\nsize: 3T",
            "mklabel: msdos\ndevice: d.img",
            "mkpart: logical\ndevice: d.img\nstart: 0%\nend: 10%",
            "mkpart: primary\ndevice: d.img\nstart: 10%\nend: 100%",
        ])
        .unwrap_err();
        assert_eq!(
            e,
            [
                "key 'mkpart': logical partitions are not supported; use primary partitions (at most 4) or a gpt label",
                "key 'end': the partition ends at sector 6442450943, past the 2 TiB an msdos partition table can address; use a gpt label"
            ]
        );
    }
}
