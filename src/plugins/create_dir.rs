//! `create-dir`: make a directory in the image, with its missing parents.
//!
//! Also holds what the file steps (create-file, copy-file, copy-dir) share: checking that
//! a root filesystem is mounted, owner and mode keys, and making missing parents.

use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::build::Build;
use crate::state::in_image;
use crate::step::{Check, Key, Kind, Plugin, Step, StepSpec};

pub struct CreateDir;

static SPEC: StepSpec = StepSpec {
    name: "create-dir",
    value: Kind::Str,
    value_doc: "path of the directory in the image",
    keys: &[
        Key::opt(
            "perm",
            Kind::Mode,
            "mode of the directory (missing parents get 0755)",
        )
        .default("0755"),
        Key::opt("uid", Kind::Int, "numeric owner of the directory").default("0"),
        Key::opt("gid", Kind::Int, "numeric group of the directory").default("0"),
    ],
    summary: "Create a directory in the image, and any missing parents.",
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
        let (path, owner) = target(step, b)?;
        let mode = mode(step, "perm");
        make_parents(&path)?;
        match fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => bail!(
                "cannot create directory {}: {} exists and is not a directory",
                step.arg(),
                path.display()
            ),
            Err(e) if e.kind() == ErrorKind::NotFound => fs::DirBuilder::new()
                .mode(mode)
                .create(&path)
                .with_context(|| format!("creating directory {}", path.display()))?,
            Err(e) => {
                return Err(e).with_context(|| format!("examining {}", path.display()));
            }
        }
        set_owner_mode(&path, owner, Some(mode))
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
}

/// A Mode key's value (validation guarantees it fits in 0o7777).
pub(crate) fn mode(step: &Step, key: &str) -> u32 {
    step.int(key).unwrap_or(0) as u32
}

/// The host path of the step's image path, and the owner to give it.
pub(crate) fn target(step: &Step, b: &Build) -> Result<(PathBuf, Owner)> {
    let root = b.state.root_dir()?;
    let path = in_image(root, step.arg())?;
    Ok((path, Owner::of(step)?))
}

/// The step's value must be a usable path in the image.
pub(crate) fn check_image_path(c: &mut Check) {
    let arg = c.step.arg();
    let kind = c.step.kind;
    if arg.trim().is_empty() {
        c.err(kind, "expected a path in the image, found an empty string");
    } else if let Err(e) = in_image(Path::new("/"), arg) {
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

/// Create the missing parent directories of `path`, each with mode 0755 owned by root.
pub(crate) fn make_parents(path: &Path) -> Result<()> {
    let mut missing = Vec::new();
    for dir in path.ancestors().skip(1) {
        match fs::metadata(dir) {
            Ok(m) if m.is_dir() => break,
            Ok(_) => bail!(
                "cannot create {}: {} is not a directory",
                path.display(),
                dir.display()
            ),
            Err(e) if e.kind() == ErrorKind::NotFound => missing.push(dir),
            Err(e) => return Err(e).with_context(|| format!("examining {}", dir.display())),
        }
    }
    for dir in missing.into_iter().rev() {
        fs::DirBuilder::new()
            .mode(0o755)
            .create(dir)
            .with_context(|| format!("creating directory {}", dir.display()))?;
        // The umask may have taken bits away.
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("setting the mode of {}", dir.display()))?;
    }
    Ok(())
}

/// Give `path` (not following a symlink) an owner, then a mode (after chown, which
/// would clear set-id bits). Symlinks have no mode of their own.
pub(crate) fn set_owner_mode(path: &Path, owner: Owner, mode: Option<u32>) -> Result<()> {
    std::os::unix::fs::lchown(path, Some(owner.uid), Some(owner.gid)).with_context(|| {
        format!(
            "changing the owner of {} to {}:{}",
            path.display(),
            owner.uid,
            owner.gid
        )
    })?;
    if let Some(mode) = mode {
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .with_context(|| format!("setting the mode of {} to {mode:04o}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugins::testing::{is_root, step_errors};
    use crate::plugins::{test_build_with_root, test_step};
    use std::os::unix::fs::MetadataExt;

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
        let e = run("create-dir: /etc", &mut b).unwrap_err().to_string();
        assert!(e.contains("exists and is not a directory"), "{e}");
        let e = run("create-dir: /etc/x", &mut b).unwrap_err().to_string();
        assert!(e.ends_with("etc is not a directory"), "{e}");
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
            step_errors("create-dir: /x", &mut crate::plan::Plan::default()),
            [
                "spec:1:13: step 1 (create-dir): key 'create-dir': no filesystem is mounted at / by an earlier step (add a mount step)"
            ]
        );
    }
}
