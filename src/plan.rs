//! What the steps will have made, worked out before anything runs, so that tag mistakes
//! and impossible partition layouts are found by validation rather than half-way.

use std::collections::BTreeMap;

use crate::blockdev::table::LabelKind;

#[derive(Debug, Clone, Default)]
pub struct PlanTag {
    /// Index of the step that defined it.
    pub step: usize,
    /// Image or device path holding it, for partitions.
    pub disk: Option<String>,
    pub fs_type: Option<String>,
    pub mounted: bool,
}

#[derive(Debug, Clone, Default)]
pub struct PlanDisk {
    /// Known when an earlier mkimg step creates it.
    pub size: Option<u64>,
    pub label: Option<LabelKind>,
    /// (first sector, last sector, step) of each partition made so far whose place is
    /// known (the disk's size is known when an earlier mkimg step makes it).
    pub parts: Vec<(u64, u64, usize)>,
    /// The steps that made a partition on it since its label, placed or not.
    pub made_by: Vec<usize>,
}

#[derive(Debug, Default)]
pub struct Plan {
    pub tags: BTreeMap<String, PlanTag>,
    pub disks: BTreeMap<String, PlanDisk>,
    /// Types of steps that could not be checked (a required key is missing or bad):
    /// what they would have defined is unknown, so later checks stay quiet about it.
    pub unchecked: Vec<&'static str>,
    /// Whether the host can use device-mapper (cryptsetup, LVM).
    pub host_has_device_mapper: bool,
    /// Directory of the spec file, for checking that source files named in steps exist.
    pub spec_dir: std::path::PathBuf,
    /// LVM volume groups made (vgcreate) or activated (lvscan) by earlier steps.
    pub volume_groups: std::collections::BTreeSet<String>,
}

impl Plan {
    pub fn for_this_host() -> Plan {
        let dm = std::fs::read_to_string("/proc/misc")
            .map(|s| s.lines().any(|l| l.ends_with(" device-mapper")))
            .unwrap_or(false);
        Plan {
            host_has_device_mapper: dm,
            ..Plan::default()
        }
    }

    pub fn tag_names(&self) -> String {
        if self.tags.is_empty() {
            "none".to_string()
        } else {
            self.tags
                .keys()
                .map(|k| format!("'{k}'"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    }

    /// Define a new tag; the error names the step that defined it first.
    pub fn define_tag(&mut self, name: &str, tag: PlanTag) -> Result<(), String> {
        if let Some(old) = self.tags.get(name) {
            return Err(format!(
                "tag '{name}' is already defined by step {}",
                old.step
            ));
        }
        self.tags.insert(name.to_string(), tag);
        Ok(())
    }

    /// The tag mounted at "/" in the image, if a step mounts one.
    pub fn root_tag(&self) -> Option<&str> {
        self.tags
            .iter()
            .find(|(name, t)| t.mounted && name.as_str() == "/")
            .or_else(|| self.tags.iter().find(|(_, t)| t.mounted))
            .map(|(n, _)| n.as_str())
    }
}
