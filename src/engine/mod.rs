//! The flow of a build: load (spec), render (template), validate (validate: each step
//! against its plugin's StepSpec, step.rs, and the plan), all three in prepare; then
//! run in order and tear down in reverse (runner, build, state), with the step cache
//! (stepcache, cachekey), in a process of its own (supervisor, inflight). It never
//! names a step type and knows nothing of Debian: the plugins and the distribution are
//! handed in (step::Registry).

pub mod build;
pub mod cachekey;
pub mod inflight;
pub mod plan;
pub mod prepare;
pub mod runner;
pub mod spec;
pub mod state;
pub mod step;
pub mod stepcache;
pub mod supervisor;
pub mod template;
pub mod validate;
