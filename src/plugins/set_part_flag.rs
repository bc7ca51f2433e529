//! `set_part_flag`: set or clear a partition flag (esp, bios_grub, boot, lvm, ...).

use std::path::Path;

use anyhow::{Context, Result};

use crate::engine::build::Build;
use crate::engine::step::{CacheRole, Check, Key, Kind, Plugin, Step, StepSpec};
use crate::host::blockdev::table;

pub struct SetPartFlag;

static SPEC: StepSpec = StepSpec {
    name: "set_part_flag",
    value: Kind::Str,
    value_doc: "the image file or block device.",
    keys: &[
        Key::req("tag", Kind::Str, "tag of the partition."),
        Key::req(
            "flag",
            Kind::Str,
            "`esp`, `boot`, `bios_grub`, `lvm`, `raid`, `swap`, `legacy_boot`, \
                `msftdata`.",
        ),
        Key::opt("state", Kind::Str, "`enabled` or `disabled`.").default("enabled"),
    ],
    summary: "Sets or clears a flag on a partition, as parted's `set N FLAG on|off` does.",
    cache: CacheRole::Setup,
    always_saved: false,
};

impl Plugin for SetPartFlag {
    fn spec(&self) -> &'static StepSpec {
        &SPEC
    }

    fn check(&self, c: &mut Check) {
        let tag = c.step.opt_str("tag").unwrap_or_default().to_string();
        if c.use_tag("tag", &tag) && c.plan.tags[&tag].disk.is_none() {
            c.err("tag", format!("tag '{tag}' is not a partition"));
        }
        let flag = c.step.opt_str("flag").unwrap_or_default().to_string();
        if !table::known_flags().contains(&flag.as_str()) {
            c.err(
                "flag",
                format!(
                    "unknown flag '{flag}': expected one of {}",
                    table::known_flags().join(", ")
                ),
            );
        }
        let state = c.step.opt_str("state").unwrap_or_default().to_string();
        if state != "enabled" && state != "disabled" {
            c.err(
                "state",
                format!("expected enabled or disabled, found '{state}'"),
            );
        }
    }

    fn run(&self, step: &Step, b: &mut Build) -> Result<()> {
        let tag = b.state.tag(step.str("tag")?)?;
        let number = tag.number.context("the tag is not a partition")?;
        let on = step.str("state")? == "enabled";
        table::set_flag(Path::new(step.arg()), number, step.str("flag")?, on)
    }
}
