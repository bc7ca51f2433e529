//! `vgcreate: VG`: make LVM physical volumes of tagged devices and a volume group of
//! them. Needs device-mapper on the host.

use std::path::PathBuf;

use anyhow::Result;

use crate::engine::build::Build;
use crate::engine::state::Notes;
use crate::engine::step::{CacheRole, Check, Key, Kind, Plugin, Step, StepSpec};
use crate::host::cmd::Cmd;
use crate::plugins::devmapper;

pub struct Vgcreate;

static SPEC: StepSpec = StepSpec {
    name: "vgcreate",
    value: Kind::Str,
    value_doc: "name of the volume group (letters, digits, `.`, `_`, `-`, `+`)",
    keys: &[Key::req(
        "physical",
        Kind::List,
        "tags of the partitions or devices to use; each must be defined by an \
                earlier step",
    )],
    summary: "Makes LVM physical volumes of tagged partitions (or LUKS devices) and a volume \
        group of them, for `lvcreate` steps.",
    cache: CacheRole::Setup,
    always_saved: false,
};

/// The commands that make the volume group: one pvcreate per device, then vgcreate.
pub fn argvs(vg: &str, devs: &[PathBuf]) -> Vec<Vec<String>> {
    let mut v: Vec<Vec<String>> = devs
        .iter()
        .map(|d| {
            vec![
                "pvcreate".into(),
                "-ff".into(),
                "--yes".into(),
                d.display().to_string(),
            ]
        })
        .collect();
    let mut vgcreate = vec!["vgcreate".to_string(), vg.to_string()];
    vgcreate.extend(devs.iter().map(|d| d.display().to_string()));
    v.push(vgcreate);
    v
}

/// Deactivate a volume group (the teardown of vgcreate and lvscan).
pub fn deactivate_argv(vg: &str) -> Vec<String> {
    vec!["vgchange".into(), "-an".into(), vg.into()]
}

/// The teardown's command, if the step made its volume group.
pub fn teardown_argv(step: &Step, notes: &Notes) -> Option<Vec<String>> {
    notes
        .contains(&devmapper::Active::VolumeGroup(step.arg().to_string()))
        .then(|| deactivate_argv(step.arg()))
}

/// A name LVM accepts for a volume group or logical volume.
pub fn valid_lvm_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 127
        && !n.starts_with('-')
        && n != "."
        && n != ".."
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '+'))
}

pub(crate) fn run_cmd(argv: &[String]) -> Result<String> {
    Cmd::new(&argv[0]).args(&argv[1..]).run()
}

impl Plugin for Vgcreate {
    fn spec(&self) -> &'static StepSpec {
        &SPEC
    }

    fn check(&self, c: &mut Check) {
        devmapper::check_host(c);
        // pvcreate and vgcreate, and vgchange in the teardown.
        for prog in ["pvcreate", "vgcreate", "vgchange"] {
            c.needs("vgcreate", prog, "lvm2");
        }
        let vg = c.step.arg().to_string();
        if !valid_lvm_name(&vg) {
            c.err(
                "vgcreate",
                format!(
                    "'{vg}' is not a volume group name: use letters, digits, '.', '_', '-' and '+'"
                ),
            );
        }
        let physical = c.step.list("physical");
        if c.step.has("physical") && physical.is_empty() {
            c.err("physical", "no physical volumes");
        }
        for p in &physical {
            c.use_tag("physical", p);
        }
        if !c.plan.volume_groups.insert(vg.clone()) {
            c.err(
                "vgcreate",
                format!("volume group '{vg}' is already made by an earlier step"),
            );
        }
    }

    fn run(&self, step: &Step, b: &mut Build) -> Result<()> {
        let mut devs = Vec::new();
        for tag in step.list("physical") {
            devs.push(devmapper::device(b, &tag)?);
        }
        let cmds = argvs(step.arg(), &devs);
        let (vgcreate, pvcreates) = cmds.split_last().expect("vgcreate is last");
        for c in pvcreates {
            run_cmd(c)?;
        }
        b.state
            .notes
            .insert(devmapper::Active::VolumeGroup(step.arg().to_string()));
        run_cmd(vgcreate)?;
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
