//! `lvcreate: VG`: make a logical volume in a volume group; the volume becomes a tag
//! (its name) for mkfs and mount. Needs device-mapper on the host.

use std::path::PathBuf;

use anyhow::Result;

use crate::engine::build::Build;
use crate::engine::plan::PlanTag;
use crate::engine::state::{Notes, Tag};
use crate::engine::step::{CacheRole, Check, Key, Kind, Plugin, Step, StepSpec};
use crate::plugins::devmapper;

use super::vgcreate::{run_cmd, valid_lvm_name};

pub struct Lvcreate;

static SPEC: StepSpec = StepSpec {
    name: "lvcreate",
    value: Kind::Str,
    value_doc: "the volume group",
    keys: &[
        Key::req(
            "name",
            Kind::Str,
            "name of the logical volume, also the new tag",
        ),
        Key::req(
            "size",
            Kind::Str,
            "`1G`, `500M`, ... (`-L`); `50%FREE`, `100%VG`, `20%PVS` (`-l`); or `fill` \
                (all free space)",
        ),
    ],
    summary: "Makes a logical volume in a volume group made by an earlier `vgcreate` (or \
        activated by `lvscan`) step.",
    cache: CacheRole::Setup,
    always_saved: false,
};

/// How the size is given to lvcreate: `-L SIZE` or `-l EXTENTS`.
pub fn size_args(size: &str) -> Result<[String; 2], String> {
    let s = size.trim();
    if s.eq_ignore_ascii_case("fill") {
        return Ok(["-l".into(), "100%FREE".into()]);
    }
    if let Some((n, what)) = s.split_once('%') {
        let ok = n.parse::<u32>().is_ok_and(|n| (1..=100).contains(&n))
            && ["FREE", "VG", "PVS", "ORIGIN"].contains(&what);
        return if ok {
            Ok(["-l".into(), s.into()])
        } else {
            Err(format!(
                "'{size}' is not a share of extents such as 50%FREE or 100%VG"
            ))
        };
    }
    let digits = s.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = &s[digits.len()..];
    let ok = !digits.is_empty()
        && digits.parse::<f64>().is_ok_and(|n| n > 0.0)
        && [
            "", "b", "B", "s", "S", "k", "K", "m", "M", "g", "G", "t", "T", "p", "P", "KiB", "MiB",
            "GiB", "TiB",
        ]
        .contains(&unit);
    if ok {
        Ok(["-L".into(), s.into()])
    } else {
        Err(format!(
            "'{size}' is not a size such as 1G or 500M, a share such as 50%FREE, or 'fill'"
        ))
    }
}

/// lvcreate's command line.
pub fn argv(vg: &str, name: &str, size: &str) -> Result<Vec<String>, String> {
    let [flag, value] = size_args(size)?;
    Ok(vec![
        "lvcreate".into(),
        "-qq".into(),
        "--yes".into(),
        "-n".into(),
        name.into(),
        flag,
        value,
        vg.into(),
    ])
}

/// The logical volume's block device.
pub fn device(vg: &str, name: &str) -> PathBuf {
    PathBuf::from("/dev").join(vg).join(name)
}

/// Deactivate one logical volume.
pub fn deactivate_argv(vg: &str, name: &str) -> Vec<String> {
    vec!["lvchange".into(), "-an".into(), format!("{vg}/{name}")]
}

/// The teardown's command, if the step made its volume.
pub fn teardown_argv(step: &Step, notes: &Notes) -> Option<Vec<String>> {
    let name = step.opt_str("name")?;
    notes
        .contains(&devmapper::Active::LogicalVolume(format!(
            "{}/{name}",
            step.arg()
        )))
        .then(|| deactivate_argv(step.arg(), name))
}

impl Plugin for Lvcreate {
    fn spec(&self) -> &'static StepSpec {
        &SPEC
    }

    fn check(&self, c: &mut Check) {
        devmapper::check_host(c);
        // lvcreate, and lvchange in the teardown.
        c.needs("lvcreate", "lvcreate", "lvm2");
        c.needs("lvcreate", "lvchange", "lvm2");
        let vg = c.step.arg().to_string();
        if !c.plan.volume_groups.contains(&vg) && !c.plan.unchecked.contains(&"vgcreate") {
            c.err(
                "lvcreate",
                format!("volume group '{vg}' is not made by an earlier vgcreate or lvscan step"),
            );
        }
        if let Some(size) = c.step.opt_str("size") {
            if let Err(e) = size_args(size) {
                c.err("size", e);
            }
        }
        let Some(name) = c.step.opt_str("name").map(str::to_string) else {
            return;
        };
        if !valid_lvm_name(&name) {
            c.err(
                "name",
                format!("'{name}' is not a logical volume name: use letters, digits, '.', '_', '-' and '+'"),
            );
        }
        let t = PlanTag {
            step: c.step.index,
            ..PlanTag::default()
        };
        if let Err(e) = c.plan.define_tag(&name, t) {
            c.err("name", e);
        }
    }

    fn run(&self, step: &Step, b: &mut Build) -> Result<()> {
        let (vg, name) = (step.arg(), step.str("name")?);
        let argv = argv(vg, name, step.str("size")?).map_err(anyhow::Error::msg)?;
        b.state
            .notes
            .insert(devmapper::Active::LogicalVolume(format!("{vg}/{name}")));
        run_cmd(&argv)?;
        b.state.add_tag(Tag {
            name: name.to_string(),
            device: Some(device(vg, name)),
            ..Tag::default()
        })
    }

    fn teardown(&self, step: &Step, b: &mut Build) -> Result<()> {
        if let Some(argv) = teardown_argv(step, &b.state.notes) {
            let (vg, name) = (step.arg(), step.str("name")?);
            if device(vg, name).exists() {
                run_cmd(&argv)?;
            }
            b.state
                .notes
                .remove(&devmapper::Active::LogicalVolume(format!("{vg}/{name}")));
        }
        Ok(())
    }
}
