//! `shell`: run a shell script on the host, with $ROOT set to a mounted filesystem.

use anyhow::Result;

use crate::engine::build::Build;
use crate::engine::cachekey::CacheInputs;
use crate::engine::step::{CacheRole, Check, Key, Kind, Plugin, Step, StepSpec};
use crate::host::cmd::Cmd;

pub struct Shell;

static SPEC: StepSpec = StepSpec {
    name: "shell",
    value: Kind::Str,
    value_doc: "the script, run on the host with `sh -ec` in the spec file's directory.",
    keys: &[Key::req(
        "root-fs",
        Kind::Str,
        "tag of a mounted filesystem. Its host mount point is in `$ROOT`.",
    )],
    summary: "Runs a shell script on the host, not inside the image (see `chroot` for that).",
    cache: CacheRole::Tree,
    always_saved: false,
};

/// The shell that runs the script, and its Debian package.
pub const SH: (&str, &str) = ("sh", "dash");

impl Plugin for Shell {
    fn spec(&self) -> &'static StepSpec {
        &SPEC
    }
    fn shell_keys(&self) -> &'static [&'static str] {
        &["shell"]
    }
    fn check(&self, c: &mut Check) {
        c.needs("shell", SH.0, SH.1);
        let Some(tag) = c.step.opt_str("root-fs") else {
            return;
        };
        if c.use_tag("root-fs", tag) && !c.plan.tags[tag].mounted {
            c.err(
                "root-fs",
                format!("tag '{tag}' is not mounted by an earlier step (add a mount step)"),
            );
        }
    }
    fn cache_inputs(&self, step: &Step, inputs: &mut CacheInputs) -> Result<()> {
        super::script_cache_inputs(step, inputs)
    }

    fn run(&self, step: &Step, b: &mut Build) -> Result<()> {
        let root = b.state.mount_point(step.str("root-fs")?)?;
        let mut cmd = Cmd::new(SH.0).arg("-ec").arg(step.arg()).env("ROOT", root);
        if !b.opts.spec_dir.dir().as_os_str().is_empty() {
            cmd = cmd.cwd(b.opts.spec_dir.dir());
        }
        cmd.run()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::plan::{Plan, PlanTag};
    use crate::plugins::testing::{plan_with_root, step_errors};
    use crate::plugins::{test_build_with_root, test_step};
    use std::fs;

    #[test]
    fn runs_on_the_host_with_root_and_cwd() {
        let (mut b, root) = test_build_with_root();
        let spec_dir = tempfile::tempdir().unwrap();
        fs::write(spec_dir.path().join("input"), "from the spec dir").unwrap();
        b.opts.spec_dir = spec_dir.path().into();
        // Quotes and $ in the script reach sh untouched.
        let s = test_step(
            "shell: |\n  cat input > \"$ROOT/out\"\n  printf '%s' \"$0:$ROOT\" > \"$ROOT/env\"\nroot-fs: /",
        );
        Shell.run(&s, &mut b).unwrap();
        assert_eq!(
            fs::read_to_string(root.path().join("out")).unwrap(),
            "from the spec dir"
        );
        assert_eq!(
            fs::read_to_string(root.path().join("env")).unwrap(),
            format!("sh:{}", root.path().display())
        );
    }

    #[test]
    fn stops_at_the_first_failing_command() {
        let (mut b, root) = test_build_with_root();
        let s = test_step("shell: |\n  false\n  touch \"$ROOT/after\"\nroot-fs: /");
        let e = Shell.run(&s, &mut b).unwrap_err().to_string();
        assert!(
            e.starts_with("command failed with exit status 1: sh -ec"),
            "{e}"
        );
        assert!(!root.path().join("after").exists());
    }

    #[test]
    fn validation() {
        let mut plan = plan_with_root();
        assert_eq!(
            step_errors("shell: 'true'", &mut plan),
            ["spec:1:1: step 1 (shell): key 'root-fs': missing required key: expected a string"]
        );
        assert_eq!(
            step_errors("shell: 'true'\nroot-fs: boot", &mut plan),
            [
                "spec:2:10: step 1 (shell): key 'root-fs': tag 'boot' is not defined by an earlier step (defined so far: '/')"
            ]
        );
        let mut plan = Plan::default();
        plan.define_tag("rootfs", PlanTag::default()).unwrap();
        assert_eq!(
            step_errors("shell: 'true'\nroot-fs: rootfs", &mut plan),
            [
                "spec:2:10: step 1 (shell): key 'root-fs': tag 'rootfs' is not mounted by an earlier step (add a mount step)"
            ]
        );
    }

    /// A variable with quotes and a command in it, as a CI system might pass a branch
    /// name: through `quote` it is text, whatever quotes it holds.
    #[test]
    fn a_quoted_variable_runs_no_command() {
        let (mut b, root) = test_build_with_root();
        let marker = root.path().join("INJECTED");
        for value in [
            format!("x\"; touch {}; echo \"", marker.display()),
            format!("x'; touch {}; echo '", marker.display()),
            format!("$(touch {})", marker.display()),
        ] {
            let mut vars = std::collections::BTreeMap::new();
            vars.insert("hostname".to_string(), value.clone());
            let node = crate::engine::spec::parse_yaml(
                "shell: printf %s {{ hostname | quote }} > \"$ROOT/hostname\"\nroot-fs: /",
            )
            .unwrap();
            let renderer = crate::engine::template::Renderer::new(vars);
            let mut plan = plan_with_root();
            let s = crate::engine::validate::validate(
                &[node],
                &renderer,
                crate::plugins::ALL,
                &mut plan,
            )
            .unwrap()
            .remove(0);
            assert!(plan.warnings.is_empty(), "{:?}", plan.warnings);
            Shell.run(&s, &mut b).unwrap();
            assert!(!marker.exists(), "{value} ran a command");
            assert_eq!(
                fs::read_to_string(root.path().join("hostname")).unwrap(),
                value
            );
        }
    }
}
