//! `fstab`: write the image's /etc/fstab from the mounted filesystems, by UUID.

use anyhow::Result;

use crate::engine::build::Build;
use crate::engine::state::Tag;
use crate::engine::step::{CacheRole, Check, Kind, Plugin, Step, StepSpec};
use crate::host::image_root::ImageRoot;

pub struct Fstab;

static SPEC: StepSpec = StepSpec {
    name: "fstab",
    value: Kind::Str,
    value_doc: "tag of the root filesystem; the file goes to its `/etc/fstab`.",
    keys: &[],
    summary: "Writes the image's `/etc/fstab`: one line per filesystem mounted in the image, by \
        UUID, sorted by mount point (so `/` comes before `/boot/efi`), and one line \
        per swap partition.",
    cache: CacheRole::Volatile,
    always_saved: false,
};

impl Plugin for Fstab {
    fn spec(&self) -> &'static StepSpec {
        &SPEC
    }

    fn check(&self, c: &mut Check) {
        let tag = c.step.arg().to_string();
        if c.use_tag("fstab", &tag) && !c.plan.tags[&tag].mounted {
            c.err(
                "fstab",
                format!("tag '{tag}' is not mounted by an earlier step"),
            );
        }
    }

    fn run(&self, step: &Step, b: &mut Build) -> Result<()> {
        let img = ImageRoot::open(b.state.mount_point(step.arg())?)?;
        let text = fstab_text(&b.state.tags);
        img.write_file("/etc/fstab", &mut text.as_bytes(), 0o644, None)
    }
}

/// One line per mounted filesystem with a UUID (and per swap partition), sorted by
/// mount point so that parents come before what is mounted below them.
pub fn fstab_text(tags: &[Tag]) -> String {
    let mut lines: Vec<(String, String)> = Vec::new();
    for t in tags {
        let (Some(uuid), Some(fs)) = (&t.fs_uuid, &t.fs_type) else {
            continue;
        };
        if fs == "swap" {
            lines.push(("none".into(), format!("UUID={uuid} none swap sw 0 0")));
            continue;
        }
        let Some(target) = &t.target else { continue };
        let (opts, pass) = match (fs.as_str(), target.as_str()) {
            ("vfat", _) => ("umask=0077", 2),
            (f, "/") if f.starts_with("ext") => ("errors=remount-ro", 1),
            (_, "/") => ("defaults", 1),
            ("xfs" | "btrfs", _) => ("defaults", 0),
            _ => ("defaults", 2),
        };
        let opts = t.fstab_options.as_deref().unwrap_or(opts);
        lines.push((
            target.clone(),
            format!("UUID={uuid} {target} {fs} {opts} 0 {pass}"),
        ));
    }
    lines.sort();
    let mut s: String = lines.into_iter().map(|(_, l)| l + "\n").collect();
    if s.is_empty() {
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugins::testing::{Canary, plant_link, test_build_with_root, test_step};

    fn tag(name: &str, fs: &str, uuid: &str, target: Option<&str>) -> Tag {
        Tag {
            name: name.into(),
            fs_type: Some(fs.into()),
            fs_uuid: Some(uuid.into()),
            target: target.map(str::to_string),
            ..Tag::default()
        }
    }

    #[test]
    fn sorted_by_mount_point_with_sane_options() {
        let tags = vec![
            tag("efi", "vfat", "AB12-CD34", Some("/boot/efi")),
            tag("root", "ext4", "1111", Some("/")),
            tag("swap", "swap", "2222", None),
            tag("unmounted", "ext4", "3333", None),
        ];
        assert_eq!(
            fstab_text(&tags),
            "UUID=1111 / ext4 errors=remount-ro 0 1\n\
             UUID=AB12-CD34 /boot/efi vfat umask=0077 0 2\n\
             UUID=2222 none swap sw 0 0\n"
        );
    }

    #[test]
    fn written_inside_the_image_whatever_its_etc_links_to() {
        for absolute in [true, false] {
            let canary = Canary::new();
            let (mut b, root) = test_build_with_root();
            let r = root.path();
            let inside = canary.inside(r);
            let target = match absolute {
                true => canary.path.display().to_string(),
                false => canary.escaping(),
            };
            plant_link(r, "etc", &target);
            b.state.tag_mut("/").unwrap().fs_uuid = Some("1111".into());
            Fstab.run(&test_step("fstab: /"), &mut b).unwrap();
            canary.assert_untouched();
            assert_eq!(
                std::fs::read_to_string(inside.join("fstab")).unwrap(),
                "UUID=1111 / ext4 errors=remount-ro 0 1\n"
            );
        }
    }

    #[test]
    fn a_link_at_etc_fstab_is_replaced() {
        let canary = Canary::new();
        let (mut b, root) = test_build_with_root();
        let host_file = canary.path.join("file").display().to_string();
        plant_link(root.path(), "etc/fstab", &host_file);
        Fstab.run(&test_step("fstab: /"), &mut b).unwrap();
        canary.assert_untouched();
        let f = root.path().join("etc/fstab");
        assert!(std::fs::symlink_metadata(&f).unwrap().is_file());
        assert_eq!(std::fs::read(&f).unwrap(), b"\n");
    }
}
