//! The flow of a build: load (spec), render (template), validate (step, plan), run
//! (runner, build, state, stepcache), in its own process (supervisor, inflight). It
//! never names a step type and knows nothing of Debian: plugins are handed in.

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
