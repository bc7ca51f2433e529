//! What the steps will have made, worked out before anything runs, so that tag mistakes
//! and impossible partition layouts are found by validation rather than half-way.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use crate::engine::spec::{Diag, Loc, SpecDir};
use crate::host::blockdev::table::LabelKind;

/// The filesystem a tag carries, as far as validation knows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Filesystem {
    /// None yet: a partition before its mkfs step.
    #[default]
    None,
    /// Made by a step of the spec (mkfs), of this type.
    Made(String),
    /// Already on a disk partitioned outside the spec (kpartx `tags`): its type is
    /// only known when the build reads it.
    Existing,
}

impl Filesystem {
    /// The type, when a step of the spec makes it.
    pub fn made(&self) -> Option<&str> {
        match self {
            Filesystem::Made(t) => Some(t),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct PlanTag {
    /// Index of the step that defined it.
    pub step: usize,
    /// Image or device path holding it, for partitions.
    pub disk: Option<String>,
    pub filesystem: Filesystem,
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

/// A program (or, as an absolute path, a file) a step needs on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostNeed {
    pub step: usize,
    pub kind: &'static str,
    pub key: String,
    pub loc: Loc,
    /// Any one of these will do: (program or absolute path, Debian package with it).
    pub any_of: Vec<(&'static str, &'static str)>,
}

#[derive(Debug, Default)]
pub struct Plan {
    pub tags: BTreeMap<String, PlanTag>,
    pub disks: BTreeMap<String, PlanDisk>,
    /// Types of steps that could not be checked (a required key is missing or bad):
    /// what they would have defined is unknown, so later checks stay quiet about it.
    pub unchecked: BTreeSet<&'static str>,
    /// Whether the host can use device-mapper (cryptsetup, LVM).
    pub host_has_device_mapper: bool,
    /// Whether a step uses the host's device-mapper: then /dev/mapper stays the host's
    /// and partitions get no vmdb2 names (see `Options::vmdb2_names`).
    pub uses_device_mapper: bool,
    /// Directory of the spec file, for checking that source files named in steps exist.
    pub spec_dir: SpecDir,
    /// LVM volume groups made (vgcreate) or activated (lvscan) by earlier steps.
    pub volume_groups: BTreeSet<String>,
    /// The tags mounted so far (see `mount`).
    pub mounted: BTreeSet<String>,
    /// Second names of tags, with the tag each names (vmdb2's early `mount` with
    /// `fs-tag`).
    pub aliases: BTreeMap<String, String>,
    /// The build's --rootfs-tarball, if any: its name says how it is compressed.
    pub rootfs_tarball: Option<PathBuf>,
    /// What the steps need on the host, checked once validation is done.
    pub host_needs: Vec<HostNeed>,
    /// Problems that do not stop the build, shown by validation.
    pub warnings: Vec<Diag>,
}

/// How many tag names an error lists: a spec can define thousands, and every error
/// about a tag would otherwise list them all.
const TAGS_LISTED: usize = 10;

impl Plan {
    pub fn for_this_host() -> Plan {
        Plan {
            host_has_device_mapper: crate::host::blockdev::has_device_mapper(),
            ..Plan::default()
        }
    }

    pub fn tag_names(&self) -> String {
        if self.tags.is_empty() {
            return "none".to_string();
        }
        let mut names = self
            .tags
            .keys()
            .take(TAGS_LISTED)
            .map(|k| format!("'{k}'"))
            .collect::<Vec<_>>()
            .join(", ");
        if self.tags.len() > TAGS_LISTED {
            names.push_str(&format!(" and {} more", self.tags.len() - TAGS_LISTED));
        }
        names
    }

    /// Define a new tag; the error names the step that defined it first.
    pub fn define_tag(&mut self, name: &str, tag: PlanTag) -> Result<(), String> {
        if let Some(old) = self.tags.get(name) {
            return Err(format!(
                "tag '{name}' is already defined by step {}",
                old.step
            ));
        }
        if tag.mounted {
            self.mounted.insert(name.to_string());
        }
        self.tags.insert(name.to_string(), tag);
        Ok(())
    }

    /// Give tag `of` a second name: checks by either name see what it is at this point
    /// of the spec (vmdb2's early `mount` with `fs-tag`; nothing changes a tag after it
    /// is mounted).
    pub fn define_alias(&mut self, alias: &str, of: &str) -> Result<(), String> {
        let of = self.canonical(of).to_string();
        let t = self.tags.get(&of).cloned().unwrap_or_default();
        self.define_tag(alias, t)?;
        self.aliases.insert(alias.to_string(), of);
        Ok(())
    }

    /// The tag a name stands for: itself, or the tag it is a second name of.
    pub fn canonical<'a>(&'a self, name: &'a str) -> &'a str {
        self.aliases.get(name).map(String::as_str).unwrap_or(name)
    }

    /// A step mounts the tag.
    pub fn mount(&mut self, name: &str) {
        if let Some(t) = self.tags.get_mut(name) {
            t.mounted = true;
            self.mounted.insert(name.to_string());
        }
    }

    /// The tag mounted at "/" in the image, if a step mounts one (else the first
    /// mounted tag by name). Looked up, not searched: steps that write into the image
    /// ask for it, and a spec can have thousands of both.
    pub fn root_tag(&self) -> Option<&str> {
        if let Some((name, t)) = self.tags.get_key_value("/") {
            if t.mounted {
                return Some(name.as_str());
            }
        }
        self.mounted
            .iter()
            .find(|n| self.tags.get(n.as_str()).is_some_and(|t| t.mounted))
            .map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_lists_are_short() {
        let mut plan = Plan::default();
        for i in 0..5000 {
            plan.define_tag(&format!("t{i:04}"), PlanTag::default())
                .unwrap();
        }
        assert_eq!(
            plan.tag_names(),
            "'t0000', 't0001', 't0002', 't0003', 't0004', 't0005', 't0006', 't0007', 't0008', 't0009' and 4990 more"
        );
    }

    #[test]
    fn root_tag_is_the_one_at_slash_else_the_first_mounted() {
        let mut plan = Plan::default();
        for t in ["b", "a", "/"] {
            plan.define_tag(t, PlanTag::default()).unwrap();
        }
        assert_eq!(plan.root_tag(), None);
        plan.mount("b");
        assert_eq!(plan.root_tag(), Some("b"));
        plan.mount("/");
        assert_eq!(plan.root_tag(), Some("/"));
    }
}
