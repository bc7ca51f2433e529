//! The build state the steps share: tags (partitions, filesystems, mount points) and flags.

use std::any::Any;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow, bail};

#[derive(Debug, Clone, Default)]
pub struct Tag {
    pub name: String,
    /// The image or whole-disk device the partition is on.
    pub disk: Option<PathBuf>,
    pub number: Option<u32>,
    /// Byte offset and size of the partition on `disk`.
    pub offset: u64,
    pub size: u64,
    /// The block device of this partition once attached (a loop device at its offset).
    pub device: Option<PathBuf>,
    pub fs_type: Option<String>,
    pub fs_uuid: Option<String>,
    /// Where the filesystem is mounted on the host, while it is.
    pub mount_point: Option<PathBuf>,
    /// Where it is mounted inside the image ("/", "/boot/efi").
    pub target: Option<String>,
    /// Mount options for fstab.
    pub fstab_options: Option<String>,
    /// A FAT filesystem the kernel cannot mount: its mount point is a staging tmpfs
    /// copied into the filesystem with mtools when it is unmounted.
    pub fat_staged: bool,
}

#[derive(Debug, Default)]
pub struct State {
    pub tags: Vec<Tag>,
    /// A step failed or the build was interrupted: teardowns skip work that only a
    /// finished image needs (zerofree, writing back what is thrown away).
    pub failed: bool,
    /// Flags for `unless:` (e.g. rootfs_unpacked).
    pub flags: BTreeSet<String>,
    /// Second names of tags, with the tag each names (vmdb2's early `mount` with
    /// `fs-tag`).
    pub aliases: BTreeMap<String, String>,
    /// What steps did that their teardown must undo, or later steps need not redo
    /// (mounts of virtual filesystems, files written for the build's duration).
    pub notes: Notes,
}

/// A record in `Notes`: a type of the module that writes it.
pub trait Note: Any + Debug + Send {
    /// The record as `Any`, to downcast it (`&dyn Note as &dyn Any`, trait upcasting,
    /// needs Rust 1.86; Debian 13 builds with 1.85).
    fn as_any(&self) -> &dyn Any;
}

impl<T: Any + Debug + Send> Note for T {
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Typed records of what steps did, each kind a type of the module that writes and
/// reads it (the engine keeps them, never reads them); a record is kept once.
#[derive(Debug, Default)]
pub struct Notes(Vec<Box<dyn Note>>);

impl Notes {
    pub fn insert<T: Note + PartialEq>(&mut self, note: T) {
        if !self.contains(&note) {
            self.0.push(Box::new(note));
        }
    }

    pub fn contains<T: Note + PartialEq>(&self, note: &T) -> bool {
        self.of::<T>().any(|n| n == note)
    }

    /// Forget `note`; whether it was there.
    pub fn remove<T: Note + PartialEq>(&mut self, note: &T) -> bool {
        let before = self.0.len();
        self.0
            .retain(|n| n.as_ref().as_any().downcast_ref::<T>() != Some(note));
        self.0.len() != before
    }

    /// The notes of type `T`, oldest first.
    pub fn of<T: Note>(&self) -> impl Iterator<Item = &T> {
        self.0
            .iter()
            .filter_map(|n| n.as_ref().as_any().downcast_ref::<T>())
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl State {
    pub fn tag(&self, name: &str) -> Result<&Tag> {
        let name = self.canonical(name);
        self.tags
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| anyhow!("no tag '{name}' in the build state"))
    }

    pub fn tag_mut(&mut self, name: &str) -> Result<&mut Tag> {
        let name = self
            .aliases
            .get(name)
            .cloned()
            .unwrap_or_else(|| name.to_string());
        self.tags
            .iter_mut()
            .find(|t| t.name == name)
            .ok_or_else(|| anyhow!("no tag '{name}' in the build state"))
    }

    pub fn add_tag(&mut self, tag: Tag) -> Result<()> {
        if self.tags.iter().any(|t| t.name == tag.name) || self.aliases.contains_key(&tag.name) {
            bail!("tag '{}' is already defined", tag.name);
        }
        self.tags.push(tag);
        Ok(())
    }

    /// Give tag `of` the second name `alias` (vmdb2's early `mount` with `fs-tag`).
    pub fn add_alias(&mut self, alias: &str, of: &str) -> Result<()> {
        let of = self.tag(of)?.name.clone();
        if self.tags.iter().any(|t| t.name == alias) || self.aliases.contains_key(alias) {
            bail!("tag '{alias}' is already defined");
        }
        self.aliases.insert(alias.to_string(), of);
        Ok(())
    }

    /// The tag a name stands for: itself, or the tag it is a second name of.
    fn canonical<'a>(&'a self, name: &'a str) -> &'a str {
        self.aliases.get(name).map(String::as_str).unwrap_or(name)
    }

    pub fn device(&self, name: &str) -> Result<&Path> {
        self.tag(name)?
            .device
            .as_deref()
            .ok_or_else(|| anyhow!("tag '{name}' has no block device (is there a kpartx step, or a partition with that tag?)"))
    }

    pub fn mount_point(&self, name: &str) -> Result<&Path> {
        self.tag(name)?
            .mount_point
            .as_deref()
            .ok_or_else(|| anyhow!("tag '{name}' is not mounted"))
    }

    /// The host directory of the image's root filesystem (the tag mounted at "/").
    pub fn root_dir(&self) -> Result<&Path> {
        self.tags
            .iter()
            .find(|t| t.target.as_deref() == Some("/") && t.mount_point.is_some())
            .and_then(|t| t.mount_point.as_deref())
            .ok_or_else(|| anyhow!("no filesystem is mounted at / of the image"))
    }

    /// Unless-flags: a step is skipped when all its flags are set (vmdb2's rule).
    pub fn skips(&self, unless: &[String]) -> bool {
        !unless.is_empty() && unless.iter().all(|f| self.flags.contains(f))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_are_kept_once_by_type_and_value() {
        #[derive(Debug, PartialEq)]
        struct A(u32);
        #[derive(Debug, PartialEq)]
        struct B(u32);
        let mut n = Notes::default();
        n.insert(A(1));
        n.insert(A(1));
        n.insert(B(1));
        n.insert(A(2));
        assert_eq!(n.len(), 3);
        assert!(n.contains(&A(1)) && n.contains(&B(1)) && !n.contains(&B(2)));
        assert_eq!(n.of::<A>().collect::<Vec<_>>(), [&A(1), &A(2)]);
        assert!(n.remove(&A(1)));
        assert!(!n.remove(&A(1)));
        assert_eq!(n.of::<A>().collect::<Vec<_>>(), [&A(2)]);
        assert!(n.contains(&B(1)));
    }

    #[test]
    fn a_second_name_finds_the_same_tag() {
        let mut s = State::default();
        s.add_tag(Tag {
            name: "rootpart".into(),
            ..Tag::default()
        })
        .unwrap();
        s.add_alias("rootfs", "rootpart").unwrap();
        s.tag_mut("rootfs").unwrap().fs_type = Some("ext4".into());
        assert_eq!(s.tag("rootpart").unwrap().fs_type.as_deref(), Some("ext4"));
        assert_eq!(s.tag("rootfs").unwrap().name, "rootpart");
        assert_eq!(s.tags.len(), 1);
        assert_eq!(
            s.add_alias("rootfs", "rootpart").unwrap_err().to_string(),
            "tag 'rootfs' is already defined"
        );
        assert!(
            s.add_tag(Tag {
                name: "rootfs".into(),
                ..Tag::default()
            })
            .is_err()
        );
        assert_eq!(
            s.add_alias("x", "nope").unwrap_err().to_string(),
            "no tag 'nope' in the build state"
        );
    }

    #[test]
    fn unless_needs_all_flags() {
        let mut s = State::default();
        s.flags.insert("a".into());
        assert!(!s.skips(&[]));
        assert!(s.skips(&["a".into()]));
        assert!(!s.skips(&["a".into(), "b".into()]));
    }
}
