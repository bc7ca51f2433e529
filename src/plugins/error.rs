//! `error`: print a text and fail (to test teardown); prints another at teardown.

use anyhow::{Result, bail};

use crate::engine::build::Build;
use crate::engine::step::{CacheRole, Key, Kind, Plugin, Step, StepSpec};

pub struct Error;

static SPEC: StepSpec = StepSpec {
    name: "error",
    value: Kind::Str,
    value_doc: "the text printed before failing.",
    keys: &[Key::opt(
        "teardown",
        Kind::Str,
        "the text printed at teardown.",
    )],
    summary: "Prints a text and fails, so the build stops and tears down: a way to test \
        teardown.",
    cache: CacheRole::Setup,
    always_saved: false,
};

impl Plugin for Error {
    fn spec(&self) -> &'static StepSpec {
        &SPEC
    }
    fn run(&self, step: &Step, _b: &mut Build) -> Result<()> {
        crate::log::out(step.arg());
        bail!("error step: {}", step.arg())
    }
    fn teardown(&self, step: &Step, _b: &mut Build) -> Result<()> {
        if let Some(t) = step.opt_str("teardown") {
            crate::log::out(t);
        }
        Ok(())
    }
}
