//! `qemu-debootstrap: SUITE`: debootstrap for a foreign architecture (vmdb2's alias).
//! The same keys and the same code as debootstrap, but `arch` is required, and the
//! host's binfmt_misc handler for the architecture (qemu-user-static) is registered
//! first when the host cannot run its programs itself.

use anyhow::Result;

use crate::engine::build::Build;
use crate::engine::cachekey::CacheInputs;
use crate::engine::step::{CacheRole, Check, Key, Kind, Plugin, Step, StepSpec};

use super::debootstrap;

pub struct QemuDebootstrap;

static KEYS: [Key; 12] = debootstrap::keys(Key::req(
    "arch",
    Kind::Str,
    "the Debian architecture (`--arch`): `arm64`, `armhf`, `armel`, `i386`, \
                `ppc64el`, `riscv64`, `s390x`, ...",
));

static SPEC: StepSpec = StepSpec {
    name: "qemu-debootstrap",
    value: Kind::Str,
    value_doc: "the suite to install (`bookworm`, `stable`, ...)",
    keys: &KEYS,
    summary: "Installs a basic Debian system for another architecture (arm64, armhf, ppc64el, \
        ...).",
    cache: CacheRole::Tree,
    always_saved: true,
};

impl Plugin for QemuDebootstrap {
    fn spec(&self) -> &'static StepSpec {
        &SPEC
    }

    fn check(&self, c: &mut Check) {
        debootstrap::check_step(c);
    }

    fn cache_inputs(&self, step: &Step, inputs: &mut CacheInputs) -> Result<()> {
        debootstrap::cache_inputs_of(step, inputs)
    }

    fn run(&self, step: &Step, b: &mut Build) -> Result<()> {
        // debootstrap itself sets up qemu-user-static for a foreign architecture.
        debootstrap::run_step(step, b)
    }

    fn teardown(&self, step: &Step, b: &mut Build) -> Result<()> {
        debootstrap::teardown_step(step, b)
    }
}

#[cfg(test)]
mod tests {
    use crate::plugins::testing::specs as testing;

    const M: &str = "    mirror: http://m.example.org/debian\n";

    #[test]
    fn arch_is_required() {
        assert_eq!(
            testing::errors(&format!(
                "steps:\n  - qemu-debootstrap: bookworm\n    target: /\n{M}"
            )),
            ["missing required key: expected a string"]
        );
    }

    #[test]
    fn same_keys_and_checks_as_debootstrap() {
        let s = testing::step(&format!(
            "steps:\n  - qemu-debootstrap: bookworm\n    target: /\n    arch: arm64\n{M}"
        ));
        assert_eq!(s.kind, "qemu-debootstrap");
        assert_eq!(s.opt_str("variant"), Some("-"));
        assert_eq!(s.list("components"), ["main"]);
        assert!(s.bool("require_empty_target"));
        assert_eq!(
            testing::errors(&format!(
                "steps:\n  - qemu-debootstrap: book worm\n    target: unmounted\n    arch: vax\n{M}"
            )),
            [
                "'book worm' is not a suite name".to_string(),
                "tag 'unmounted' is not mounted at this point: add a 'mount: unmounted' step before this one".to_string(),
                format!(
                    "vmdb does not know how to run 'vax' programs on this {} host",
                    crate::distro::binfmt::host_arch().unwrap()
                ),
            ]
        );
    }

    #[test]
    fn every_debootstrap_key_is_a_qemu_debootstrap_key() {
        let d: Vec<&str> = super::debootstrap::keys(crate::engine::step::Key::opt(
            "arch",
            crate::engine::step::Kind::Str,
            "",
        ))
        .iter()
        .map(|k| k.name)
        .collect();
        let q: Vec<&str> = super::KEYS.iter().map(|k| k.name).collect();
        assert_eq!(d, q);
        assert!(super::KEYS.iter().any(|k| k.name == "arch" && k.required));
    }
}
