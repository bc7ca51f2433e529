//! `mklabel`: write a new, empty partition table (msdos or gpt).

use std::path::Path;

use anyhow::Result;

use crate::engine::build::Build;
use crate::engine::step::{CacheRole, Check, Key, Kind, Plugin, Step, StepSpec};
use crate::host::blockdev::table::{self, LabelKind};

pub struct Mklabel;

static SPEC: StepSpec = StepSpec {
    name: "mklabel",
    value: Kind::Str,
    value_doc: "`msdos` (MBR; `dos` and `mbr` are accepted too) or `gpt`.",
    keys: &[Key::req(
        "device",
        Kind::Str,
        "the image file or block device.",
    )],
    summary: "Writes a new, empty partition table on the image, replacing any old one (both \
        ends of the disk are cleared, so no stale GPT backup is left).",
    cache: CacheRole::Setup,
    always_saved: false,
};

impl Plugin for Mklabel {
    fn spec(&self) -> &'static StepSpec {
        &SPEC
    }

    fn check(&self, c: &mut Check) {
        let Some(kind) = LabelKind::parse(c.step.arg()) else {
            let got = c.step.arg().to_string();
            c.err(
                "mklabel",
                format!("unknown partition table '{got}': expected msdos or gpt"),
            );
            return;
        };
        let dev = c.step.opt_str("device").unwrap_or_default().to_string();
        super::check_device(c, "device", &dev);
        let disk = c.plan.disks.entry(dev).or_default();
        disk.label = Some(kind);
        disk.parts.clear();
        disk.made_by.clear();
    }

    fn run(&self, step: &Step, b: &mut Build) -> Result<()> {
        let kind = LabelKind::parse(step.arg()).expect("validated");
        let device = Path::new(step.str("device")?);
        b.claim_device(device)?;
        table::write_label(device, kind)
    }
}

#[cfg(test)]
mod tests {
    use crate::plugins::testing::check_errors;

    #[test]
    fn unknown_label_is_refused() {
        assert_eq!(
            check_errors("mklabel: apple\ndevice: x.img"),
            vec!["key 'mklabel': unknown partition table 'apple': expected msdos or gpt"]
        );
    }
}
