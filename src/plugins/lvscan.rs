//! `lvscan: VG`: activate an existing volume group (on a disk partitioned outside the
//! spec, see kpartx's `tags`) and give tags to its logical volumes. Needs
//! device-mapper on the host.

use anyhow::{Result, bail};

use crate::engine::build::Build;
use crate::engine::plan::PlanTag;
use crate::engine::state::{Notes, Tag};
use crate::engine::step::{CacheRole, Check, Key, Kind, Plugin, Step, StepSpec};
use crate::plugins::devmapper;

use super::lvcreate;
use super::vgcreate::{deactivate_argv, run_cmd, valid_lvm_name};

pub struct Lvscan;

static SPEC: StepSpec = StepSpec {
    name: "lvscan",
    value: Kind::Str,
    value_doc: "the volume group to activate",
    keys: &[Key::req(
        "tags",
        Kind::List,
        "names of its logical volumes; each becomes a tag with its device \
                `/dev/VG/LV`",
    )],
    summary: "Activates an LVM volume group that already exists, on a disk partitioned outside \
        the spec (see `kpartx`'s `tags`), and gives tags to its logical volumes so \
        that later steps can use them.",
    cache: CacheRole::Setup,
    always_saved: false,
};

/// The commands that find and activate the volume group.
pub fn argvs(vg: &str) -> Vec<Vec<String>> {
    vec![
        vec!["vgscan".into(), "--mknodes".into()],
        vec!["vgchange".into(), "-ay".into(), vg.into()],
    ]
}

/// The teardown's command, if the step activated the volume group.
pub fn teardown_argv(step: &Step, notes: &Notes) -> Option<Vec<String>> {
    notes
        .contains(&devmapper::Active::VolumeGroup(step.arg().to_string()))
        .then(|| deactivate_argv(step.arg()))
}

impl Plugin for Lvscan {
    fn spec(&self) -> &'static StepSpec {
        &SPEC
    }

    fn check(&self, c: &mut Check) {
        devmapper::check_host(c);
        c.needs("lvscan", "vgscan", "lvm2");
        c.needs("lvscan", "vgchange", "lvm2");
        let vg = c.step.arg().to_string();
        if !valid_lvm_name(&vg) {
            c.err("lvscan", format!("'{vg}' is not a volume group name"));
        }
        c.plan.volume_groups.insert(vg);
        for lv in c.step.list("tags") {
            if !valid_lvm_name(&lv) {
                c.err("tags", format!("'{lv}' is not a logical volume name"));
            }
            let t = PlanTag {
                step: c.step.index,
                ..PlanTag::default()
            };
            if let Err(e) = c.plan.define_tag(&lv, t) {
                c.err("tags", e);
            }
        }
    }

    fn run(&self, step: &Step, b: &mut Build) -> Result<()> {
        let vg = step.arg();
        let (scan, activate) = {
            let mut v = argvs(vg);
            let a = v.pop().expect("two commands");
            (v.pop().expect("two commands"), a)
        };
        run_cmd(&scan)?;
        b.state
            .notes
            .insert(devmapper::Active::VolumeGroup(vg.to_string()));
        run_cmd(&activate)?;
        for lv in step.list("tags") {
            let dev = lvcreate::device(vg, &lv);
            if !dev.exists() {
                bail!(
                    "volume group '{vg}' has no logical volume '{lv}' ({} does not exist)",
                    dev.display()
                );
            }
            b.state.add_tag(Tag {
                name: lv,
                device: Some(dev),
                ..Tag::default()
            })?;
        }
        Ok(())
    }

    fn teardown(&self, step: &Step, b: &mut Build) -> Result<()> {
        if let Some(argv) = teardown_argv(step, &b.state.notes) {
            run_cmd(&argv)?;
            b.state
                .notes
                .remove(&devmapper::Active::VolumeGroup(step.arg().to_string()));
        }
        Ok(())
    }
}
