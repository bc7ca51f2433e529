//! `kpartx`: make the partitions of a disk usable as block devices. vmdb uses no
//! device-mapper: each partition becomes a loop device at its offset and size.

use std::path::PathBuf;

use anyhow::{Result, bail};

use crate::engine::build::Build;
use crate::engine::plan::{Filesystem, PlanTag};
use crate::engine::state::Tag;
use crate::engine::step::{CacheRole, Check, Key, Kind, Plugin, Step, StepSpec};
use crate::host::blockdev::table;

pub struct Kpartx;

static SPEC: StepSpec = StepSpec {
    name: "kpartx",
    value: Kind::Str,
    value_doc: "the image file or block device (see [mklabel](mklabel.md) for block devices in \
        use).",
    keys: &[Key::opt(
        "tags",
        Kind::List,
        "for a disk partitioned outside this spec, the tags to give its existing \
                partitions, in order of their numbers.",
    )],
    summary: "Makes a disk's partitions usable as block devices.",
    cache: CacheRole::Setup,
    always_saved: false,
};

impl Plugin for Kpartx {
    fn spec(&self) -> &'static StepSpec {
        &SPEC
    }

    fn check(&self, c: &mut Check) {
        let disk = c.step.arg().to_string();
        super::check_device(c, "kpartx", &disk);
        if c.step.has("tags") {
            // It reads the filesystems of the tagged partitions.
            c.needs("tags", "blkid", "util-linux");
        }
        for tag in c.step.list("tags") {
            // What filesystem the partition holds is only known when it is read.
            let t = PlanTag {
                step: c.step.index,
                disk: Some(disk.clone()),
                filesystem: Filesystem::Existing,
                ..PlanTag::default()
            };
            if let Err(e) = c.plan.define_tag(&tag, t) {
                c.err("tags", e);
            }
        }
    }

    fn run(&self, step: &Step, b: &mut Build) -> Result<()> {
        let disk = PathBuf::from(step.arg());
        b.claim_device(&disk)?;
        let tags = step.list("tags");
        if !tags.is_empty() {
            let parts = table::read_partitions(&disk)?;
            if parts.len() < tags.len() {
                bail!(
                    "{} has {} partitions but {} tags were given",
                    disk.display(),
                    parts.len(),
                    tags.len()
                );
            }
            for (name, p) in tags.iter().zip(parts) {
                b.state.add_tag(Tag {
                    name: name.clone(),
                    disk: Some(disk.clone()),
                    number: Some(p.number),
                    offset: p.start_sector * 512,
                    size: p.size_sectors * 512,
                    ..Tag::default()
                })?;
            }
        }
        for name in partition_tags(b, &disk) {
            let dev = b.partition_device(&name)?;
            crate::log::verbose(&format!("  partition '{name}' is {}", dev.display()));
            if tags.contains(&name) {
                // A filesystem made outside this spec: mount and fstab need its type.
                let probe = |what: &str| {
                    crate::host::cmd::Cmd::new("blkid")
                        .args(["-p", "-s", what, "-o", "value"])
                        .arg(&dev)
                        .run()
                        .map(|s| s.trim().to_string())
                        .ok()
                        .filter(|s| !s.is_empty())
                };
                let (fs, uuid) = (probe("TYPE"), probe("UUID"));
                let t = b.state.tag_mut(&name)?;
                t.fs_type = fs;
                t.fs_uuid = uuid;
            }
        }
        Ok(())
    }

    fn teardown(&self, step: &Step, b: &mut Build) -> Result<()> {
        let names = partition_tags(b, &PathBuf::from(step.arg()));
        b.release_partitions(&names)
    }
}

fn partition_tags(b: &Build, disk: &PathBuf) -> Vec<String> {
    b.state
        .tags
        .iter()
        .filter(|t| t.disk.as_ref() == Some(disk))
        .map(|t| t.name.clone())
        .collect()
}
