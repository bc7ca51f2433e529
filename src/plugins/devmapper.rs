//! What the device-mapper steps (cryptsetup, vgcreate, lvcreate, lvscan) share: the
//! validation that the host has device-mapper, and the block device of a tag.

use std::path::PathBuf;

use anyhow::Result;

use crate::engine::build::Build;
use crate::engine::step::Check;

/// Validation: report, at the step's main key, that this host has no device-mapper.
/// Returns whether it has.
pub fn check_host(c: &mut Check) -> bool {
    c.plan.uses_device_mapper = true;
    if c.plan.host_has_device_mapper {
        return true;
    }
    let kind = c.step.kind;
    c.err(
        kind,
        format!(
            "this host has no device-mapper (no 'device-mapper' in /proc/misc), which '{kind}' needs: \
             build this spec on a host with the dm_mod kernel module loaded"
        ),
    );
    false
}

/// The block device of a tag: one a step recorded (a LUKS mapping, a logical volume),
/// else the partition's loop device, attached on first use.
pub fn device(b: &mut Build, tag: &str) -> Result<PathBuf> {
    if let Some(d) = &b.state.tag(tag)?.device {
        return Ok(d.clone());
    }
    b.partition_device(tag)
}

/// Notes in the build state: what a step opened or activated, for its teardown.
#[derive(Debug, Clone, PartialEq)]
pub enum Active {
    /// A LUKS mapping, by name.
    Luks(String),
    /// A volume group, by name.
    VolumeGroup(String),
    /// A logical volume, as VG/LV.
    LogicalVolume(String),
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use crate::engine::plan::Plan;
    use crate::engine::spec::Diag;
    use crate::engine::state::Notes;
    use crate::engine::step::Step;
    use crate::engine::template::Renderer;
    use crate::plugins::testing::plan_with_root;
    use crate::plugins::{cryptsetup, lvcreate, lvscan, vgcreate};

    /// Validate a spec (YAML list items) against a plan with "/" and a partition
    /// "pv" defined, on a host with or without device-mapper.
    fn validate(items: &[&str], dm: bool) -> Result<Vec<Step>, Vec<String>> {
        validate_with_plan(items, dm).0
    }

    /// As `validate`, with the plan as validation left it.
    fn validate_with_plan(items: &[&str], dm: bool) -> (Result<Vec<Step>, Vec<String>>, Plan) {
        let mut text = String::from("steps:\n");
        for s in items {
            for (i, line) in s.lines().enumerate() {
                text.push_str(if i == 0 { "  - " } else { "    " });
                text.push_str(line);
                text.push('\n');
            }
        }
        let raw = crate::engine::spec::load(&text).unwrap();
        let mut plan: Plan = plan_with_root();
        plan.host_has_device_mapper = dm;
        plan.define_tag("pv", Default::default()).unwrap();
        plan.define_tag("pv2", Default::default()).unwrap();
        let result = crate::engine::validate::validate(
            &raw.steps,
            &Renderer::new(Default::default()),
            crate::plugins::ALL,
            &mut plan,
        )
        .map_err(|d: Vec<Diag>| {
            d.iter()
                .map(|d| format!("{}: {}", d.key.clone().unwrap_or_default(), d.msg))
                .collect()
        });
        (result, plan)
    }

    const LVM_SPEC: &[&str] = &[
        "cryptsetup: pv\ntag: pv_crypt\nkey-cmd: echo secret",
        "vgcreate: rootvg\nphysical: [pv_crypt, pv2]",
        "lvcreate: rootvg\nname: rootfs\nsize: 1G",
        "lvcreate: rootvg\nname: home\nsize: fill",
        "mkfs: ext4\npartition: rootfs",
        "mount: rootfs",
    ];

    #[test]
    fn a_whole_lvm_on_luks_spec_validates_with_device_mapper() {
        let steps = validate(LVM_SPEC, true).unwrap();
        assert_eq!(steps.len(), 6);
    }

    #[test]
    fn only_specs_without_device_mapper_steps_get_vmdb2_partition_names() {
        // The private /dev/mapper with the names would hide the host's mappings.
        let (steps, plan) = validate_with_plan(LVM_SPEC, true);
        assert!(steps.is_ok() && plan.uses_device_mapper);
        let (steps, plan) = validate_with_plan(&["mkfs: ext4\npartition: pv"], true);
        assert!(steps.is_ok() && !plan.uses_device_mapper);
    }

    #[test]
    fn without_device_mapper_each_step_says_so_before_anything_runs() {
        let e = validate(
            &[LVM_SPEC, &["lvscan: oldvg\ntags: [data]"]].concat(),
            false,
        )
        .unwrap_err();
        let msg = |kind: &str| {
            format!(
                "{kind}: this host has no device-mapper (no 'device-mapper' in /proc/misc), which '{kind}' needs: build this spec on a host with the dm_mod kernel module loaded"
            )
        };
        assert_eq!(
            e,
            [
                msg("cryptsetup"),
                msg("vgcreate"),
                msg("lvcreate"),
                msg("lvcreate"),
                msg("lvscan")
            ]
        );
    }

    #[test]
    fn lvm_checks() {
        let e = validate(
            &[
                "vgcreate: -bad\nphysical: [nope]",
                "lvcreate: othervg\nname: a/b\nsize: 12 apples",
                "lvcreate: othervg\nname: x\nsize: 150%FREE",
                "vgcreate: vg\nphysical: pv",
                "vgcreate: vg\nphysical: pv2",
                "lvscan: vg2\ntags: [pv]",
            ],
            true,
        )
        .unwrap_err();
        assert_eq!(
            e,
            [
                "vgcreate: '-bad' is not a volume group name: use letters, digits, '.', '_', '-' and '+'",
                "physical: tag 'nope' is not defined by an earlier step (defined so far: '/', 'pv', 'pv2')",
                "lvcreate: volume group 'othervg' is not made by an earlier vgcreate or lvscan step",
                "name: 'a/b' is not a logical volume name: use letters, digits, '.', '_', '-' and '+'",
                "size: '12 apples' is not a size such as 1G or 500M, a share such as 50%FREE, or 'fill'",
                "lvcreate: volume group 'othervg' is not made by an earlier vgcreate or lvscan step",
                "size: '150%FREE' is not a share of extents such as 50%FREE or 100%VG",
                "vgcreate: volume group 'vg' is already made by an earlier step",
                "tags: tag 'pv' is already defined by step 0",
            ]
        );
    }

    #[test]
    fn lvm_command_lines() {
        let devs = [
            PathBuf::from("/dev/mapper/pv_crypt"),
            PathBuf::from("/dev/loop4"),
        ];
        assert_eq!(
            vgcreate::argvs("rootvg", &devs),
            [
                vec!["pvcreate", "-ff", "--yes", "/dev/mapper/pv_crypt"],
                vec!["pvcreate", "-ff", "--yes", "/dev/loop4"],
                vec!["vgcreate", "rootvg", "/dev/mapper/pv_crypt", "/dev/loop4"],
            ]
        );
        assert_eq!(
            lvcreate::argv("rootvg", "rootfs", "1G").unwrap(),
            [
                "lvcreate", "-qq", "--yes", "-n", "rootfs", "-L", "1G", "rootvg"
            ]
        );
        assert_eq!(
            lvcreate::argv("rootvg", "home", "fill").unwrap(),
            [
                "lvcreate", "-qq", "--yes", "-n", "home", "-l", "100%FREE", "rootvg"
            ]
        );
        assert_eq!(
            lvcreate::argv("rootvg", "var", "50%VG").unwrap()[5..7],
            ["-l", "50%VG"]
        );
        assert_eq!(
            lvcreate::device("rootvg", "rootfs"),
            Path::new("/dev/rootvg/rootfs")
        );
        assert_eq!(
            lvscan::argvs("oldvg"),
            [
                vec!["vgscan", "--mknodes"],
                vec!["vgchange", "-ay", "oldvg"]
            ]
        );
    }

    /// What the teardowns of the dm steps run, newest step first (as the runner calls
    /// them), given the flags their runs left.
    fn teardown_commands(steps: &[Step], notes: &[super::Active]) -> Vec<Vec<String>> {
        let mut flags = Notes::default();
        for n in notes {
            flags.insert(n.clone());
        }
        let flags = &flags;
        steps
            .iter()
            .rev()
            .filter_map(|s| match s.kind {
                "cryptsetup" => cryptsetup::teardown_argv(s, flags),
                "vgcreate" => vgcreate::teardown_argv(s, flags),
                "lvcreate" => lvcreate::teardown_argv(s, flags),
                "lvscan" => lvscan::teardown_argv(s, flags),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn teardown_closes_and_deactivates_in_reverse() {
        let steps = validate(&[LVM_SPEC, &["lvscan: oldvg\ntags: [data]"]].concat(), true).unwrap();
        // Everything ran: every run recorded what it opened or activated.
        let all = [
            super::Active::Luks("pv_crypt".into()),
            super::Active::VolumeGroup("rootvg".into()),
            super::Active::LogicalVolume("rootvg/rootfs".into()),
            super::Active::LogicalVolume("rootvg/home".into()),
            super::Active::VolumeGroup("oldvg".into()),
        ];
        assert_eq!(
            teardown_commands(&steps, &all),
            [
                vec!["vgchange", "-an", "oldvg"],
                vec!["lvchange", "-an", "rootvg/home"],
                vec!["lvchange", "-an", "rootvg/rootfs"],
                vec!["vgchange", "-an", "rootvg"],
                vec!["cryptsetup", "close", "pv_crypt"],
            ]
        );
        // The build failed in vgcreate: only the LUKS mapping and the half-made
        // volume group are undone.
        let part = [
            super::Active::Luks("pv_crypt".into()),
            super::Active::VolumeGroup("rootvg".into()),
        ];
        assert_eq!(
            teardown_commands(&steps, &part),
            [
                vec!["vgchange", "-an", "rootvg"],
                vec!["cryptsetup", "close", "pv_crypt"],
            ]
        );
        assert!(teardown_commands(&steps, &[]).is_empty());
    }
}
