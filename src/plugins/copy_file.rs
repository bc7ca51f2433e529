//! `copy-file`: copy a file from the host (relative to the spec) into the image.

use anyhow::{Context, Result};

use crate::engine::build::Build;
use crate::engine::cachekey::CacheInputs;
use crate::engine::step::{CacheRole, Check, Key, Kind, Plugin, Step, StepSpec};
use crate::plugins::create_dir::{check_image_path, check_owner, check_root_mounted, mode, target};

pub struct CopyFile;

static SPEC: StepSpec = StepSpec {
    name: "copy-file",
    value: Kind::Str,
    value_doc: "path of the destination file in the image. It must not contain `..`.",
    keys: &[
        Key::req(
            "src",
            Kind::Str,
            "the file on the host. A relative path is relative to the spec file's \
                directory (in vmdb2 it is relative to the working directory).",
        ),
        Key::opt("perm", Kind::Mode, "mode of the copied file.").default("0644"),
        Key::opt("uid", Kind::Int, "numeric owner of the copied file.").default("0"),
        Key::opt("gid", Kind::Int, "numeric group of the copied file.").default("0"),
    ],
    summary: "Copies a file from the host into the image.",
    cache: CacheRole::Tree,
    always_saved: false,
};

impl Plugin for CopyFile {
    fn spec(&self) -> &'static StepSpec {
        &SPEC
    }
    fn check(&self, c: &mut Check) {
        check_image_path(c);
        check_owner(c);
        if let Some(src) = c.step.opt_str("src") {
            let path = c.plan.spec_dir.path(src);
            match std::fs::metadata(&path) {
                Ok(m) if m.is_file() => {}
                Ok(_) => c.err("src", format!("{} is not a regular file", path.display())),
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
        let (img, owner) = target(step, b)?;
        let mut f = std::fs::File::open(&src)
            .with_context(|| format!("cannot read source file {}", src.display()))?;
        img.write_file(step.arg(), &mut f, mode(step, "perm"), Some(owner.ids()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugins::test_build_with_root;
    use crate::plugins::testing::{
        Canary, is_root, own_ids, plan_with_root, plant_link, step_errors, validate_step,
    };
    use std::fs;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn copies_bytes_mode_and_owner() {
        if !is_root("copy-file copies_bytes_mode_and_owner") {
            return;
        }
        let spec_dir = tempfile::tempdir().unwrap();
        fs::create_dir(spec_dir.path().join("files")).unwrap();
        let data: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
        fs::write(spec_dir.path().join("files/blob"), &data).unwrap();
        let mut plan = plan_with_root();
        plan.spec_dir = spec_dir.path().into();
        let step = validate_step(
            "copy-file: /usr/local/bin/blob\nsrc: files/blob\nperm: 0755\nuid: 3\ngid: 4",
            &mut plan,
        )
        .unwrap();
        let (mut b, root) = test_build_with_root();
        b.opts.spec_dir = spec_dir.path().into();
        CopyFile.run(&step, &mut b).unwrap();
        let p = root.path().join("usr/local/bin/blob");
        assert_eq!(fs::read(&p).unwrap(), data);
        let m = fs::metadata(&p).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o755);
        assert_eq!((m.uid(), m.gid()), (3, 4));
        assert_eq!(
            fs::metadata(root.path().join("usr/local")).unwrap().mode() & 0o7777,
            0o755
        );

        // Defaults: 0644 root:root, whatever the source's mode.
        let step = validate_step("copy-file: /blob\nsrc: files/blob", &mut plan).unwrap();
        CopyFile.run(&step, &mut b).unwrap();
        let m = fs::metadata(root.path().join("blob")).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o644);
        assert_eq!((m.uid(), m.gid()), (0, 0));
    }

    #[test]
    fn links_lead_where_the_image_sees_them_never_to_the_host() {
        let canary = Canary::new();
        let spec_dir = tempfile::tempdir().unwrap();
        fs::write(spec_dir.path().join("src"), "from the spec").unwrap();
        let mut plan = plan_with_root();
        plan.spec_dir = spec_dir.path().into();
        let (mut b, root) = test_build_with_root();
        b.opts.spec_dir = spec_dir.path().into();
        let r = root.path();
        let inside = canary.inside(r);
        plant_link(r, "var/run", &canary.path.display().to_string());
        plant_link(r, "opt", &canary.escaping());
        plant_link(
            r,
            "etc/issue",
            &canary.path.join("file").display().to_string(),
        );
        for dest in ["/var/run/a", "/opt/b", "/etc/issue"] {
            let yaml = format!("copy-file: {dest}\nsrc: src\n{}", own_ids());
            let step = validate_step(&yaml, &mut plan).unwrap();
            CopyFile.run(&step, &mut b).unwrap();
        }
        canary.assert_untouched();
        assert_eq!(fs::read(inside.join("a")).unwrap(), b"from the spec");
        assert_eq!(fs::read(inside.join("b")).unwrap(), b"from the spec");
        assert_eq!(fs::read(r.join("etc/issue")).unwrap(), b"from the spec");
    }

    #[test]
    fn validation() {
        let spec_dir = tempfile::tempdir().unwrap();
        fs::create_dir(spec_dir.path().join("adir")).unwrap();
        let mut plan = plan_with_root();
        plan.spec_dir = spec_dir.path().into();
        let missing = spec_dir.path().join("nope.conf");
        assert_eq!(
            step_errors("copy-file: /etc/x\nsrc: nope.conf", &mut plan),
            [format!(
                "spec:2:6: step 1 (copy-file): key 'src': cannot read {}: No such file or directory (os error 2)",
                missing.display()
            )]
        );
        assert_eq!(
            step_errors("copy-file: /etc/x\nsrc: adir", &mut plan),
            [format!(
                "spec:2:6: step 1 (copy-file): key 'src': {} is not a regular file",
                spec_dir.path().join("adir").display()
            )]
        );
        assert_eq!(
            step_errors("copy-file: /etc/x", &mut plan),
            ["spec:1:1: step 1 (copy-file): key 'src': missing required key: expected a string"]
        );
        assert_eq!(
            step_errors(
                "copy-file: /etc/x\nsrc: /etc/hostname\nperm: '0999'",
                &mut plan
            ),
            [
                "spec:3:7: step 1 (copy-file): key 'perm': expected an octal file mode such as 0644, found '0999'"
            ]
        );
        // An absolute source is taken as it is.
        fs::write(spec_dir.path().join("ok"), "x").unwrap();
        let abs = spec_dir.path().join("ok");
        validate_step(
            &format!("copy-file: /etc/x\nsrc: {}", abs.display()),
            &mut plan,
        )
        .unwrap();
    }

    #[test]
    fn missing_source_at_run_time_names_it() {
        let (mut b, _root) = test_build_with_root();
        let spec_dir = tempfile::tempdir().unwrap();
        let src = spec_dir.path().join("gone");
        fs::write(&src, "x").unwrap();
        let mut plan = plan_with_root();
        plan.spec_dir = spec_dir.path().into();
        let step = validate_step("copy-file: /x\nsrc: gone", &mut plan).unwrap();
        fs::remove_file(&src).unwrap();
        b.opts.spec_dir = spec_dir.path().into();
        let e = CopyFile.run(&step, &mut b).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("cannot read source file {}", src.display())
        );
    }
}
