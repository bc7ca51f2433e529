//! `chroot: TAG` with `shell: SCRIPT`: run a shell script inside the image.

use anyhow::Result;

use crate::distro::chroot as image;
use crate::engine::build::Build;
use crate::engine::cachekey::CacheInputs;
use crate::engine::step::{CacheRole, Check, Key, Kind, Plugin, Step, StepSpec};

pub struct Chroot;

static SPEC: StepSpec = StepSpec {
    name: "chroot",
    value: Kind::Str,
    value_doc: "tag of the image's root filesystem; an earlier step must mount it",
    keys: &[Key::req(
        "shell",
        Kind::Str,
        "the script, run with `sh -ec` inside the image",
    )],
    summary: "Runs a shell script inside the image: `chroot MOUNTPOINT sh -ec SCRIPT`, the \
        script passed as one argument, so the first failing command fails the step.",
    cache: CacheRole::Tree,
    always_saved: false,
};

const OWNER: &str = "chroot";

/// The command run inside the chroot: the script is an argument, never interpolated.
pub fn argv(script: &str) -> Vec<String> {
    vec!["sh".into(), "-ec".into(), script.into()]
}

impl Plugin for Chroot {
    fn spec(&self) -> &'static StepSpec {
        &SPEC
    }

    fn check(&self, c: &mut Check) {
        let tag = c.step.arg();
        image::check_mounted_tag(c, "chroot", tag);
        image::needs_chroot(c);
    }

    fn shell_keys(&self) -> &'static [&'static str] {
        &["shell"]
    }

    fn cache_inputs(&self, step: &Step, inputs: &mut CacheInputs) -> Result<()> {
        super::script_cache_inputs(step, inputs)
    }

    fn run(&self, step: &Step, b: &mut Build) -> Result<()> {
        let root = image::tag_dir(b, step.arg())?;
        image::enter(b, &root, OWNER)?;
        let out = image::command(&root, &argv(step.str("shell")?)).run()?;
        if !out.is_empty() {
            crate::log::debug(out.trim_end());
        }
        image::finish(b, &root, OWNER)
    }

    fn teardown(&self, _step: &Step, b: &mut Build) -> Result<()> {
        image::leave(b, OWNER)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugins::testing::specs as testing;

    #[test]
    fn script_is_one_argument() {
        assert_eq!(argv("echo 'a b'; true"), ["sh", "-ec", "echo 'a b'; true"]);
    }

    #[test]
    fn needs_a_script_and_a_mounted_tag() {
        let s = testing::step("steps:\n  - chroot: /\n    shell: |\n      echo hi\n");
        assert_eq!(s.kind, "chroot");
        assert_eq!(s.str("shell").unwrap(), "echo hi\n");
        assert_eq!(
            testing::errors("steps:\n  - chroot: /\n"),
            ["missing required key: expected a string"]
        );
        assert_eq!(
            testing::errors("steps:\n  - chroot: nope\n    shell: true\n"),
            ["tag 'nope' is not defined by an earlier step (defined so far: '/', 'unmounted')"]
        );
    }
}
