//! `create-dir`: make a directory in the image, with its missing parents.
//!
//! Also holds what the file steps (create-file, copy-file, copy-dir) share: checking that
//! a root filesystem is mounted, owner and mode keys, and the image they write into
//! (paths resolved inside it, see src/host/image_root.rs).

use anyhow::{Context, Result};

use crate::engine::build::Build;
use crate::engine::step::{CacheRole, Check, Key, Kind, Plugin, Step, StepSpec};
use crate::host::image_root::{ImageRoot, check_path};

pub struct CreateDir;

static SPEC: StepSpec = StepSpec {
    name: "create-dir",
    value: Kind::Str,
    value_doc: "path of the directory in the image. It must not contain `..`.",
    keys: &[
        Key::opt("perm", Kind::Mode, "mode of the directory.").default("0755"),
        Key::opt("uid", Kind::Int, "numeric owner of the directory.").default("0"),
        Key::opt("gid", Kind::Int, "numeric group of the directory.").default("0"),
    ],
    summary: "Creates a directory in the image, and any missing parent directories.",
    cache: CacheRole::Tree,
    always_saved: false,
};

impl Plugin for CreateDir {
    fn spec(&self) -> &'static StepSpec {
        &SPEC
    }
    fn check(&self, c: &mut Check) {
        check_image_path(c);
        check_owner(c);
        check_root_mounted(c);
    }
    fn run(&self, step: &Step, b: &mut Build) -> Result<()> {
        let (img, owner) = target(step, b)?;
        let mode = mode(step, "perm");
        let (dir, _) = img.create_dir_all(step.arg(), mode)?;
        img.set_owner_mode(&dir, step.arg(), Some(owner.ids()), Some(mode))
    }
}

/// Numeric owner and group of a file step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Owner {
    pub uid: u32,
    pub gid: u32,
}

impl Owner {
    pub(crate) fn of(step: &Step) -> Result<Owner> {
        let id = |key: &str| -> Result<u32> {
            let v = step.int(key).unwrap_or(0);
            u32::try_from(v).with_context(|| format!("{key} {v} is not a valid id"))
        };
        Ok(Owner {
            uid: id("uid")?,
            gid: id("gid")?,
        })
    }

    pub(crate) fn ids(self) -> (u32, u32) {
        (self.uid, self.gid)
    }
}

/// A Mode key's value (validation guarantees it fits in 0o7777).
pub(crate) fn mode(step: &Step, key: &str) -> u32 {
    step.int(key).unwrap_or(0) as u32
}

/// The image the step writes into (its root filesystem), and the owner to give.
pub(crate) fn target(step: &Step, b: &Build) -> Result<(ImageRoot, Owner)> {
    let img = ImageRoot::open(b.state.root_dir()?)?;
    Ok((img, Owner::of(step)?))
}

/// The step's value must be a usable path in the image.
pub(crate) fn check_image_path(c: &mut Check) {
    let arg = c.step.arg();
    let kind = c.step.kind;
    if arg.trim().is_empty() {
        c.err(kind, "expected a path in the image, found an empty string");
    } else if let Err(e) = check_path(arg) {
        c.err(kind, e.to_string());
    }
}

/// uid and gid must be valid numeric ids.
pub(crate) fn check_owner(c: &mut Check) {
    for key in ["uid", "gid"] {
        if let Some(v) = c.step.int(key) {
            if u32::try_from(v).is_err() {
                c.err(
                    key,
                    format!("expected a numeric id from 0 to {}, found {v}", u32::MAX),
                );
            }
        }
    }
}

/// Steps writing into the image need an earlier step to mount its root filesystem.
pub(crate) fn check_root_mounted(c: &mut Check) {
    if c.plan.root_tag().is_none() {
        let kind = c.step.kind;
        c.err(
            kind,
            "no filesystem is mounted at / by an earlier step (add a mount step)",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugins::testing::{Canary, is_root, own_ids, plant_link, step_errors};
    use crate::plugins::{test_build_with_root, test_step};
    use std::fs;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn run(yaml: &str, b: &mut Build) -> Result<()> {
        CreateDir.run(&test_step(yaml), b)
    }

    #[test]
    fn creates_with_parents_mode_and_owner() {
        if !is_root("create-dir creates_with_parents_mode_and_owner") {
            return;
        }
        let (mut b, root) = test_build_with_root();
        run(
            "create-dir: /srv/a/b\nperm: 01770\nuid: 1234\ngid: 55",
            &mut b,
        )
        .unwrap();
        let m = fs::metadata(root.path().join("srv/a/b")).unwrap();
        assert!(m.is_dir());
        assert_eq!(m.mode() & 0o7777, 0o1770);
        assert_eq!((m.uid(), m.gid()), (1234, 55));
        for parent in ["srv", "srv/a"] {
            let m = fs::metadata(root.path().join(parent)).unwrap();
            assert_eq!(m.mode() & 0o7777, 0o755, "{parent}");
            assert_eq!((m.uid(), m.gid()), (0, 0), "{parent}");
        }
    }

    #[test]
    fn defaults_and_existing_directory() {
        if !is_root("create-dir defaults_and_existing_directory") {
            return;
        }
        let (mut b, root) = test_build_with_root();
        let d = root.path().join("opt");
        fs::create_dir(&d).unwrap();
        fs::set_permissions(&d, fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::chown(&d, Some(7), Some(7)).unwrap();
        run("create-dir: /opt", &mut b).unwrap();
        let m = fs::metadata(&d).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o755);
        assert_eq!((m.uid(), m.gid()), (0, 0));
    }

    #[test]
    fn a_file_in_the_way_is_an_error() {
        let (mut b, root) = test_build_with_root();
        fs::write(root.path().join("etc"), "x").unwrap();
        let e = run("create-dir: /etc", &mut b).unwrap_err();
        assert_eq!(
            format!("{e:#}"),
            "cannot create the directory /etc in the image: /etc exists and is not a directory"
        );
        let e = run("create-dir: /etc/x", &mut b).unwrap_err();
        assert_eq!(
            format!("{e:#}"),
            "cannot create the directory /etc/x in the image: /etc is not a directory"
        );
    }

    #[test]
    fn links_lead_where_the_image_sees_them_never_to_the_host() {
        let canary = Canary::new();
        let (mut b, root) = test_build_with_root();
        let r = root.path();
        let inside = canary.inside(r);
        // Absolute, as Debian's /var/run -> /run, and relative, climbing out.
        plant_link(r, "var/run", &canary.path.display().to_string());
        plant_link(r, "var/lock", &canary.escaping());
        // The last component, a link to the host's directory.
        plant_link(r, "srv", &canary.path.display().to_string());
        let mode_before = fs::metadata(&canary.path).unwrap().mode();
        let results: Vec<Result<()>> = ["/var/run/a", "/var/lock/b/c", "/srv"]
            .iter()
            .map(|dir| {
                run(
                    &format!("create-dir: {dir}\nperm: 0700\n{}", own_ids()),
                    &mut b,
                )
            })
            .collect();
        canary.assert_untouched();
        for r in results {
            r.unwrap();
        }
        assert!(inside.join("a").is_dir());
        assert!(inside.join("b/c").is_dir());
        // /srv leads to the canary's path in the image, which got the mode.
        assert_eq!(fs::metadata(&inside).unwrap().mode() & 0o7777, 0o700);
        assert_eq!(fs::metadata(&canary.path).unwrap().mode(), mode_before);
    }

    #[test]
    fn validation() {
        let mut plan = crate::plugins::testing::plan_with_root();
        assert_eq!(
            step_errors("create-dir: /x\nperm: '0999'", &mut plan),
            [
                "spec:2:7: step 1 (create-dir): key 'perm': expected an octal file mode such as 0644, found '0999'"
            ]
        );
        assert_eq!(
            step_errors("create-dir: /x\nuid: -1", &mut plan),
            [
                "spec:2:6: step 1 (create-dir): key 'uid': expected a numeric id from 0 to 4294967295, found -1"
            ]
        );
        assert_eq!(
            step_errors("create-dir: /a/../x", &mut plan),
            [
                "spec:1:13: step 1 (create-dir): key 'create-dir': path '/a/../x' must not contain '..'"
            ]
        );
        assert_eq!(
            step_errors("create-dir: /x", &mut crate::engine::plan::Plan::default()),
            [
                "spec:1:13: step 1 (create-dir): key 'create-dir': no filesystem is mounted at / by an earlier step (add a mount step)"
            ]
        );
    }
}
