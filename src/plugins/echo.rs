//! `echo`: print a text when run and another at teardown (to test the runner).

use anyhow::Result;

use crate::engine::build::Build;
use crate::engine::step::{CacheRole, Key, Kind, Plugin, Step, StepSpec};

pub struct Echo;

static SPEC: StepSpec = StepSpec {
    name: "echo",
    value: Kind::Str,
    value_doc: "the text printed when the step runs.",
    keys: &[Key::opt(
        "teardown",
        Kind::Str,
        "the text printed at teardown.",
    )],
    summary: "Prints a text when it runs, and another at teardown.",
    cache: CacheRole::Setup,
    always_saved: false,
};

impl Plugin for Echo {
    fn spec(&self) -> &'static StepSpec {
        &SPEC
    }
    fn run(&self, step: &Step, _b: &mut Build) -> Result<()> {
        crate::log::out(step.arg());
        Ok(())
    }
    fn teardown(&self, step: &Step, _b: &mut Build) -> Result<()> {
        if let Some(t) = step.opt_str("teardown") {
            crate::log::out(t);
        }
        Ok(())
    }
}
