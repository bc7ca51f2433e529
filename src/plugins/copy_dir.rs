//! `copy-dir`: copy a directory tree from the host (relative to the spec) into the image.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use anyhow::{Context, Result, bail};

use crate::engine::build::Build;
use crate::engine::cachekey::CacheInputs;
use crate::engine::step::{CacheRole, Check, Key, Kind, Plugin, Step, StepSpec};
use crate::host::image_root::ImageRoot;
use crate::plugins::create_dir::{
    Owner, check_image_path, check_owner, check_root_mounted, target,
};

pub struct CopyDir;

static SPEC: StepSpec = StepSpec {
    name: "copy-dir",
    value: Kind::Str,
    value_doc: "path of the destination directory in the image. It must not contain `..`.",
    keys: &[
        Key::req(
            "src",
            Kind::Str,
            "the directory on the host. A relative path is relative to the spec file's \
                directory.",
        ),
        Key::opt(
            "perm",
            Kind::Mode,
            "mode of the destination directory (see above).",
        ),
        Key::opt("uid", Kind::Int, "numeric owner of every copied entry.").default("0"),
        Key::opt("gid", Kind::Int, "numeric group of every copied entry.").default("0"),
        Key::opt(
            "user",
            Kind::Str,
            "owner of every copied entry by name, looked up in the image's \
                `/etc/passwd` when the step runs (as vmdb2 does); it wins over `uid`.",
        ),
        Key::opt(
            "group",
            Kind::Str,
            "group of every copied entry by name, looked up in the image's \
                `/etc/group`; it wins over `gid`.",
        ),
        Key::opt(
            "umask",
            Kind::Mode,
            "permission bits to clear from the mode of every copied file and \
                directory, e.g. `0027`. Without it modes are copied as they are; vmdb2 \
                clears `0022` unless told otherwise, so a spec written for it that \
                relies on that should say `umask: 0022`.",
        ),
    ],
    summary: "Copies a directory tree from the host into the image: the contents of `src` go \
        into the destination directory.",
    cache: CacheRole::Tree,
    always_saved: false,
};

impl Plugin for CopyDir {
    fn spec(&self) -> &'static StepSpec {
        &SPEC
    }
    fn check(&self, c: &mut Check) {
        check_image_path(c);
        check_owner(c);

        if let Some(src) = c.step.opt_str("src") {
            let path = c.plan.spec_dir.path(src);
            match fs::metadata(&path) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => c.err("src", format!("{} is not a directory", path.display())),
                Err(e) => c.err("src", format!("cannot read {}: {e}", path.display())),
            }
        }
        check_root_mounted(c);
    }
    /// The copied file (or tree) is what the step puts in the image.
    fn cache_inputs(&self, step: &Step, inputs: &mut CacheInputs) -> Result<()> {
        match step.opt_str("src") {
            Some(src) => inputs.file(src),
            None => Ok(()),
        }
    }

    fn run(&self, step: &Step, b: &mut Build) -> Result<()> {
        let src = b.opts.spec_dir.path(step.str("src")?);
        let (img, mut owner) = target(step, b)?;
        if let Some(user) = step.opt_str("user") {
            owner.uid = id_of(&img, "/etc/passwd", user)?;
        }
        if let Some(group) = step.opt_str("group") {
            owner.gid = id_of(&img, "/etc/group", group)?;
        }
        let meta = fs::metadata(&src)
            .with_context(|| format!("cannot read source directory {}", src.display()))?;
        if !meta.is_dir() {
            bail!("source {} is not a directory", src.display());
        }
        let keep = !(step.int("umask").unwrap_or(0) as u32) & 0o7777;
        let dest = Path::new(step.arg());
        let top_mode = meta.mode() & keep;
        let (dir, created) = img.create_dir_all(dest, top_mode)?;
        copy_tree(&img, &src, dest, owner, keep)?;
        let perm = step.int("perm").map(|m| m as u32);
        let perm = perm.or(created.then_some(top_mode));
        img.set_owner_mode(&dir, dest, Some(owner.ids()), perm)
    }
}

/// The numeric id of `name` in the image's `file` (/etc/passwd or /etc/group: the
/// third field of the line that starts with the name).
fn id_of(img: &ImageRoot, file: &str, name: &str) -> Result<u32> {
    let text = img
        .read(file)?
        .with_context(|| format!("the image has no {file} to look up '{name}' in"))?;
    String::from_utf8_lossy(&text)
        .lines()
        .find_map(|l| {
            let mut f = l.split(':');
            (f.next() == Some(name))
                .then(|| f.nth(1).and_then(|id| id.parse().ok()))
                .flatten()
        })
        .with_context(|| format!("'{name}' is not in the image's {file}"))
}

/// Copy the entries of `src` into the image's directory `dest`: files and directories
/// keep the bits of their modes that are in `keep` (all but the umask), symlinks are
/// copied as symlinks, and every created entry gets `owner`. Directories that already exist in the image (or symlinks to directories in
/// it) are merged into and keep mode and owner; files and symlinks in the way are
/// replaced. Every path is resolved inside the image (see src/host/image_root.rs).
fn copy_tree(img: &ImageRoot, src: &Path, dest: &Path, owner: Owner, keep: u32) -> Result<()> {
    let mut entries = fs::read_dir(src)
        .with_context(|| format!("reading directory {}", src.display()))?
        .collect::<std::io::Result<Vec<_>>>()
        .with_context(|| format!("reading directory {}", src.display()))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let from = entry.path();
        let to = dest.join(entry.file_name());
        let m =
            fs::symlink_metadata(&from).with_context(|| format!("examining {}", from.display()))?;
        let ft = m.file_type();
        let mode = m.mode() & keep;
        if ft.is_dir() {
            let (dir, created) = img.create_dir_all(&to, mode)?;
            if created {
                img.set_owner_mode(&dir, &to, Some(owner.ids()), Some(mode))?;
            }
            copy_tree(img, &from, &to, owner, keep)?;
        } else if ft.is_symlink() {
            let link =
                fs::read_link(&from).with_context(|| format!("reading link {}", from.display()))?;
            img.symlink(&link, &to)?;
            img.lchown(&to, owner.uid, owner.gid)?;
        } else if ft.is_file() {
            let mut f =
                fs::File::open(&from).with_context(|| format!("reading {}", from.display()))?;
            img.write_file(&to, &mut f, mode, Some(owner.ids()))?;
        } else {
            bail!(
                "cannot copy {}: not a file, directory or symlink",
                from.display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugins::test_build_with_root;
    use crate::plugins::testing::{
        Canary, is_root, own_ids, plan_with_root, plant_link, step_errors, validate_step,
    };
    use std::os::unix::fs::PermissionsExt;

    fn chmod(p: &Path, mode: u32) {
        fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
    }

    /// A source tree: top (0750) / a.sh (0755), sub (0700) / b.txt (0600), link -> sub/b.txt
    fn source_tree() -> tempfile::TempDir {
        let spec_dir = tempfile::tempdir().unwrap();
        let top = spec_dir.path().join("overlay");
        fs::create_dir_all(top.join("sub")).unwrap();
        fs::write(top.join("a.sh"), "#!/bin/sh\necho a\n").unwrap();
        fs::write(top.join("sub/b.txt"), [0u8, 1, 2, 255]).unwrap();
        std::os::unix::fs::symlink("sub/b.txt", top.join("link")).unwrap();
        chmod(&top, 0o750);
        chmod(&top.join("a.sh"), 0o755);
        chmod(&top.join("sub"), 0o700);
        chmod(&top.join("sub/b.txt"), 0o600);
        spec_dir
    }

    fn step(yaml: &str, spec_dir: &Path) -> Step {
        let mut plan = plan_with_root();
        plan.spec_dir = spec_dir.into();
        validate_step(yaml, &mut plan).unwrap()
    }

    #[test]
    fn copies_tree_with_modes_links_and_owner() {
        if !is_root("copy-dir copies_tree_with_modes_links_and_owner") {
            return;
        }
        let spec_dir = source_tree();
        let (mut b, root) = test_build_with_root();
        b.opts.spec_dir = spec_dir.path().into();
        let s = step(
            "copy-dir: /opt/app\nsrc: overlay\nuid: 42\ngid: 43",
            spec_dir.path(),
        );
        CopyDir.run(&s, &mut b).unwrap();
        let dest = root.path().join("opt/app");
        let meta = |p: &str| fs::symlink_metadata(dest.join(p)).unwrap();
        let m = meta("");
        assert!(m.is_dir());
        assert_eq!(m.mode() & 0o7777, 0o750);
        assert_eq!(fs::read(dest.join("a.sh")).unwrap(), b"#!/bin/sh\necho a\n");
        assert_eq!(fs::read(dest.join("sub/b.txt")).unwrap(), [0u8, 1, 2, 255]);
        assert_eq!(meta("a.sh").mode() & 0o7777, 0o755);
        assert_eq!(meta("sub").mode() & 0o7777, 0o700);
        assert_eq!(meta("sub/b.txt").mode() & 0o7777, 0o600);
        assert!(meta("link").file_type().is_symlink());
        assert_eq!(
            fs::read_link(dest.join("link")).unwrap(),
            Path::new("sub/b.txt")
        );
        for p in ["", "a.sh", "sub", "sub/b.txt", "link"] {
            let m = meta(p);
            assert_eq!((m.uid(), m.gid()), (42, 43), "{p}");
        }
        // The parent made for it is 0755 root:root.
        let m = fs::metadata(root.path().join("opt")).unwrap();
        assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o755, 0, 0));
    }

    #[test]
    fn perm_applies_to_the_top_and_existing_dirs_are_merged() {
        if !is_root("copy-dir perm_applies_to_the_top_and_existing_dirs_are_merged") {
            return;
        }
        let spec_dir = source_tree();
        let (mut b, root) = test_build_with_root();
        b.opts.spec_dir = spec_dir.path().into();
        let dest = root.path().join("etc");
        fs::create_dir_all(dest.join("sub")).unwrap();
        chmod(&dest.join("sub"), 0o755);
        fs::write(dest.join("keep"), "kept").unwrap();
        fs::write(dest.join("a.sh"), "old and longer contents").unwrap();
        std::os::unix::fs::symlink("/nonexistent", dest.join("sub/b.txt")).unwrap();
        let s = step("copy-dir: /etc\nsrc: overlay\nperm: 0711", spec_dir.path());
        CopyDir.run(&s, &mut b).unwrap();
        assert_eq!(fs::metadata(&dest).unwrap().mode() & 0o7777, 0o711);
        assert_eq!(fs::read(dest.join("keep")).unwrap(), b"kept");
        assert_eq!(fs::read(dest.join("a.sh")).unwrap(), b"#!/bin/sh\necho a\n");
        // An existing directory keeps its mode; a symlink in the way is replaced.
        assert_eq!(
            fs::metadata(dest.join("sub")).unwrap().mode() & 0o7777,
            0o755
        );
        let m = fs::symlink_metadata(dest.join("sub/b.txt")).unwrap();
        assert!(m.is_file());
        assert_eq!(m.mode() & 0o7777, 0o600);
    }

    #[test]
    fn links_lead_where_the_image_sees_them_never_to_the_host() {
        let canary = Canary::new();
        let spec_dir = source_tree();
        let (mut b, root) = test_build_with_root();
        b.opts.spec_dir = spec_dir.path().into();
        let r = root.path();
        let inside = canary.inside(r);
        let to_canary = canary.path.display().to_string();
        // A link in a parent of the destination, and the destination itself a link.
        plant_link(r, "usr/local", &to_canary);
        plant_link(r, "srv", &canary.escaping());
        // Links inside the destination, where the copied tree has a directory.
        fs::create_dir_all(r.join("etc/app")).unwrap();
        plant_link(r, "etc/app/sub", &to_canary);
        plant_link(r, "home/sub", &canary.escaping());
        for dest in ["/usr/local/app", "/srv", "/etc/app", "/home"] {
            let yaml = format!("copy-dir: {dest}\nsrc: overlay\n{}", own_ids());
            CopyDir.run(&step(&yaml, spec_dir.path()), &mut b).unwrap();
        }
        canary.assert_untouched();
        // Each lands where the image's links lead, inside the image.
        assert_eq!(
            fs::read(inside.join("app/sub/b.txt")).unwrap(),
            [0u8, 1, 2, 255]
        );
        assert_eq!(
            fs::read(inside.join("a.sh")).unwrap(),
            b"#!/bin/sh\necho a\n"
        );
        assert_eq!(fs::read(inside.join("b.txt")).unwrap(), [0u8, 1, 2, 255]);
        assert_eq!(
            fs::read(r.join("etc/app/a.sh")).unwrap(),
            b"#!/bin/sh\necho a\n"
        );
        assert_eq!(
            fs::read(r.join("home/a.sh")).unwrap(),
            b"#!/bin/sh\necho a\n"
        );
    }

    #[test]
    fn umask_clears_bits_and_names_are_looked_up_in_the_image() {
        if !is_root("copy-dir umask_clears_bits_and_names_are_looked_up_in_the_image") {
            return;
        }
        let spec_dir = source_tree();
        let (mut b, root) = test_build_with_root();
        b.opts.spec_dir = spec_dir.path().into();
        fs::create_dir_all(root.path().join("etc")).unwrap();
        fs::write(
            root.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nbuilder:x:1234:1234::/home/builder:/bin/sh\n",
        )
        .unwrap();
        fs::write(
            root.path().join("etc/group"),
            "root:x:0:\nstaff:x:50:builder\n",
        )
        .unwrap();
        let s = step(
            "copy-dir: /opt/app\nsrc: overlay\nuser: builder\ngroup: staff\numask: 0077",
            spec_dir.path(),
        );
        CopyDir.run(&s, &mut b).unwrap();
        let dest = root.path().join("opt/app");
        for (p, mode) in [
            ("", 0o700),
            ("a.sh", 0o700),
            ("sub", 0o700),
            ("sub/b.txt", 0o600),
        ] {
            let m = fs::symlink_metadata(dest.join(p)).unwrap();
            assert_eq!(
                (m.mode() & 0o7777, m.uid(), m.gid()),
                (mode, 1234, 50),
                "{p}"
            );
        }
        let m = fs::symlink_metadata(dest.join("link")).unwrap();
        assert_eq!((m.uid(), m.gid()), (1234, 50));

        // A name the image does not have fails the step, before anything is copied.
        let s = step(
            "copy-dir: /opt/other\nsrc: overlay\nuser: nobody",
            spec_dir.path(),
        );
        assert_eq!(
            format!("{:#}", CopyDir.run(&s, &mut b).unwrap_err()),
            "'nobody' is not in the image's /etc/passwd"
        );
        let s = step(
            "copy-dir: /opt/other\nsrc: overlay\ngroup: wheel",
            spec_dir.path(),
        );
        assert_eq!(
            format!("{:#}", CopyDir.run(&s, &mut b).unwrap_err()),
            "'wheel' is not in the image's /etc/group"
        );
        assert!(!root.path().join("opt/other").exists());
    }

    #[test]
    fn validation() {
        let spec_dir = source_tree();
        let mut plan = plan_with_root();
        plan.spec_dir = spec_dir.path().into();
        assert_eq!(
            step_errors("copy-dir: /x\nsrc: missing", &mut plan),
            [format!(
                "spec:2:6: step 1 (copy-dir): key 'src': cannot read {}: No such file or directory (os error 2)",
                spec_dir.path().join("missing").display()
            )]
        );
        assert_eq!(
            step_errors("copy-dir: /x\nsrc: overlay/a.sh", &mut plan),
            [format!(
                "spec:2:6: step 1 (copy-dir): key 'src': {} is not a directory",
                spec_dir.path().join("overlay/a.sh").display()
            )]
        );
        assert_eq!(
            step_errors("copy-dir: /x\nsrc: overlay\nperm: '0999'", &mut plan),
            [
                "spec:3:7: step 1 (copy-dir): key 'perm': expected an octal file mode such as 0644, found '0999'"
            ]
        );
        let mut no_root = crate::engine::plan::Plan {
            spec_dir: spec_dir.path().into(),
            ..Default::default()
        };
        assert_eq!(
            step_errors("copy-dir: /x\nsrc: overlay", &mut no_root),
            [
                "spec:1:11: step 1 (copy-dir): key 'copy-dir': no filesystem is mounted at / by an earlier step (add a mount step)"
            ]
        );
        let s = step("copy-dir: /x\nsrc: overlay", spec_dir.path());
        assert_eq!(s.int("perm"), None);
        assert_eq!(s.int("umask"), None);
    }
}
