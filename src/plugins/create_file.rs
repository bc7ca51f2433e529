//! `create-file`: write a file with given contents into the image.

use anyhow::Result;

use crate::engine::build::Build;
use crate::engine::step::{CacheRole, Check, Key, Kind, Plugin, Step, StepSpec};
use crate::plugins::create_dir::{check_image_path, check_owner, check_root_mounted, mode, target};

pub struct CreateFile;

static SPEC: StepSpec = StepSpec {
    name: "create-file",
    value: Kind::Str,
    value_doc: "path of the file in the image, e.g. `/etc/hostname`. It must not contain `..`.",
    keys: &[
        Key::req(
            "contents",
            Kind::Str,
            "the file's contents, written byte for byte. No newline is added.",
        ),
        Key::opt("perm", Kind::Mode, "mode of the file.").default("0644"),
        Key::opt("uid", Kind::Int, "numeric owner of the file.").default("0"),
        Key::opt("gid", Kind::Int, "numeric group of the file.").default("0"),
    ],
    summary: "Creates a regular file in the image with exactly the given contents.",
    cache: CacheRole::Tree,
    always_saved: false,
};

impl Plugin for CreateFile {
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
        let mut contents = step.str("contents")?.as_bytes();
        // A symlink at the path is replaced, never followed (see ImageRoot::write_file).
        img.write_file(
            step.arg(),
            &mut contents,
            mode(step, "perm"),
            Some(owner.ids()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugins::testing::{
        Canary, is_root, own_ids, plan_with_root, plant_link, step_errors,
    };
    use crate::plugins::{test_build_with_root, test_step};
    use std::fs;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn run(yaml: &str, b: &mut Build) -> Result<()> {
        CreateFile.run(&test_step(yaml), b)
    }

    #[test]
    fn writes_exact_contents_mode_and_owner() {
        if !is_root("create-file writes_exact_contents_mode_and_owner") {
            return;
        }
        let (mut b, root) = test_build_with_root();
        let yaml = "create-file: /etc/motd.d/hello\n\
                    contents: \"line 1\\n  line 2 \\u00e9\"\n\
                    perm: 04750\nuid: 1000\ngid: 100";
        run(yaml, &mut b).unwrap();
        let p = root.path().join("etc/motd.d/hello");
        assert_eq!(fs::read(&p).unwrap(), "line 1\n  line 2 \u{e9}".as_bytes());
        let m = fs::metadata(&p).unwrap();
        assert!(m.is_file());
        assert_eq!(m.mode() & 0o7777, 0o4750);
        assert_eq!((m.uid(), m.gid()), (1000, 100));
        for d in ["etc", "etc/motd.d"] {
            let m = fs::metadata(root.path().join(d)).unwrap();
            assert_eq!(m.mode() & 0o7777, 0o755, "{d}");
        }
    }

    #[test]
    fn defaults_and_overwrite() {
        if !is_root("create-file defaults_and_overwrite") {
            return;
        }
        let (mut b, root) = test_build_with_root();
        let p = root.path().join("hostname");
        fs::write(&p, "a much longer old content\n").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::chown(&p, Some(5), Some(5)).unwrap();
        run("create-file: /hostname\ncontents: |\n  box\n", &mut b).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"box\n");
        let m = fs::metadata(&p).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o644);
        assert_eq!((m.uid(), m.gid()), (0, 0));
        // Empty contents give an empty file.
        run("create-file: /empty\ncontents: ''", &mut b).unwrap();
        assert_eq!(fs::read(root.path().join("empty")).unwrap(), b"");
    }

    #[test]
    fn replaces_a_symlink_instead_of_following_it() {
        let (mut b, root) = test_build_with_root();
        let outside = tempfile::NamedTempFile::new().unwrap();
        fs::write(outside.path(), "host file").unwrap();
        let link = root.path().join("resolv.conf");
        std::os::unix::fs::symlink(outside.path(), &link).unwrap();
        CreateFile
            .run(
                &test_step("create-file: /resolv.conf\ncontents: nameserver x\n"),
                &mut b,
            )
            .or_else(|e| {
                // Without root the chown to 0:0 fails, after the file was written.
                if nix::unistd::geteuid().is_root() {
                    Err(e)
                } else {
                    Ok(())
                }
            })
            .unwrap();
        assert_eq!(fs::read(outside.path()).unwrap(), b"host file");
        let m = fs::symlink_metadata(&link).unwrap();
        assert!(m.is_file());
        assert_eq!(fs::read(&link).unwrap(), b"nameserver x");
    }

    #[test]
    fn a_directory_in_the_way_is_an_error() {
        let (mut b, root) = test_build_with_root();
        fs::create_dir(root.path().join("d")).unwrap();
        let e = run("create-file: /d\ncontents: x", &mut b).unwrap_err();
        assert_eq!(
            format!("{e:#}"),
            "cannot write /d in the image: it is a directory"
        );
    }

    #[test]
    fn links_lead_where_the_image_sees_them_never_to_the_host() {
        let canary = Canary::new();
        let (mut b, root) = test_build_with_root();
        let r = root.path();
        let inside = canary.inside(r);
        // Absolute, as Debian's /var/lock -> /run/lock, and relative, climbing out.
        plant_link(r, "var/lock", &canary.path.display().to_string());
        plant_link(r, "var/tmp", &canary.escaping());
        // The last component, a link to the host's file.
        plant_link(
            r,
            "etc/motd",
            &canary.path.join("file").display().to_string(),
        );
        for (file, text) in [
            ("/var/lock/a", "A"),
            ("/var/tmp/b/c", "C"),
            ("/etc/motd", "M"),
        ] {
            let yaml = format!("create-file: {file}\ncontents: {text}\n{}", own_ids());
            run(&yaml, &mut b).unwrap();
        }
        canary.assert_untouched();
        assert_eq!(fs::read(inside.join("a")).unwrap(), b"A");
        assert_eq!(fs::read(inside.join("b/c")).unwrap(), b"C");
        assert_eq!(fs::read(r.join("etc/motd")).unwrap(), b"M");
        assert!(fs::symlink_metadata(r.join("etc/motd")).unwrap().is_file());
    }

    #[test]
    fn host_filesystems_mounted_in_the_image_are_refused() {
        // A build mounts the host's /dev in the image (virtual-filesystems, chroot
        // steps); here the image's /dev is a link to the host's, which in the image
        // leads to its own /dev: bind-mount the host's there.
        if !is_root("create-file host_filesystems_mounted_in_the_image_are_refused") {
            return;
        }
        let (mut b, root) = test_build_with_root();
        let r = std::fs::canonicalize(root.path()).unwrap();
        let _guard = crate::plugins::testing::specs::Unmounter(r.clone());
        fs::create_dir(r.join("dev")).unwrap();
        nix::mount::mount(
            Some("/dev"),
            &r.join("dev"),
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .unwrap();
        let r = run("create-file: /dev/vmdb-test-file\ncontents: x", &mut b);
        let leaked = std::path::Path::new("/dev/vmdb-test-file");
        let wrote_on_the_host = leaked.exists();
        let _ = fs::remove_file(leaked);
        assert!(!wrote_on_the_host, "wrote in the host's /dev");
        let e = r.unwrap_err();
        assert_eq!(
            format!("{e:#}"),
            "cannot write /dev/vmdb-test-file in the image: \
             /dev/vmdb-test-file is in the host's /dev (mounted in the image)"
        );
    }

    #[test]
    fn validation() {
        let mut plan = plan_with_root();
        assert_eq!(
            step_errors("create-file: /x", &mut plan),
            [
                "spec:1:1: step 1 (create-file): key 'contents': missing required key: expected a string"
            ]
        );
        assert_eq!(
            step_errors("create-file: /x\ncontents: a\nperm: '0999'", &mut plan),
            [
                "spec:3:7: step 1 (create-file): key 'perm': expected an octal file mode such as 0644, found '0999'"
            ]
        );
        assert_eq!(
            step_errors(
                "create-file: /x\ncontents: a",
                &mut crate::engine::plan::Plan::default()
            ),
            [
                "spec:1:14: step 1 (create-file): key 'create-file': no filesystem is mounted at / by an earlier step (add a mount step)"
            ]
        );
        let s = test_step("create-file: /x\ncontents: a");
        assert_eq!(s.int("perm"), Some(0o644));
        assert_eq!((s.int("uid"), s.int("gid")), (Some(0), Some(0)));
    }
}
