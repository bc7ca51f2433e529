//! Running the steps in order and tearing down in reverse.

use std::time::Instant;

use anyhow::{Error, anyhow};

use crate::build::Build;
use crate::cmd;
use crate::log;
use crate::step::{Plugin, Step, find};

/// Set in the build state's flags once a step failed or the build was interrupted:
/// teardowns then skip work that only a finished image needs (zerofree).
pub const BUILD_FAILED: &str = "vmdb:build-failed";

/// Run every step; on the first failure (or a signal) stop, then tear down every step
/// that started, newest first, carrying on past teardown errors. Returns all errors.
pub fn run(steps: &[Step], plugins: &[&'static dyn Plugin], b: &mut Build) -> Vec<Error> {
    let total = steps.len();
    let mut started: Vec<&Step> = Vec::new();
    let mut errors = Vec::new();
    for step in steps {
        if cmd::interrupted() {
            errors.push(anyhow!("interrupted before step {}", step.index));
            break;
        }
        let head = format!("[{}/{total}] {}", step.index, step.describe());
        if b.state.skips(&step.unless) {
            log::info(&format!(
                "{head}: skipped (unless: {})",
                step.unless.join(", ")
            ));
            continue;
        }
        log::info(&head);
        let plugin = find(plugins, step.kind).expect("validated steps have a plugin");
        // Recorded before it runs, so a step that fails half-way still gets its teardown.
        started.push(step);
        let t = Instant::now();
        let result = plugin.run(step, b);
        let secs = t.elapsed().as_secs_f64();
        match result {
            Ok(()) if cmd::interrupted() => {
                errors.push(anyhow!("interrupted during step {}", step.index));
                break;
            }
            Ok(()) => log::verbose(&format!(
                "[{}/{total}] {} done in {secs:.2}s",
                step.index, step.kind
            )),
            Err(e) => {
                errors.push(e.context(format!(
                    "step {} ({}) at line {} failed after {secs:.1}s",
                    step.index, step.kind, step.loc.line
                )));
                break;
            }
        }
    }
    if !errors.is_empty() {
        b.state.flags.insert(BUILD_FAILED.to_string());
    }
    stop_leftover_processes();
    for step in started.iter().rev() {
        log::verbose(&format!("teardown [{}/{total}] {}", step.index, step.kind));
        let plugin = find(plugins, step.kind).expect("validated steps have a plugin");
        if let Err(e) = plugin.teardown(step, b) {
            errors.push(e.context(format!(
                "teardown of step {} ({}) at line {}",
                step.index, step.kind, step.loc.line
            )));
        }
    }
    b.release_all_loops();
    errors
}

/// As the init of the build's PID namespace, end whatever the steps left running
/// (a daemon a package started, a background job of a shell step), so nothing keeps
/// the image's filesystems busy or outlives the build.
fn stop_leftover_processes() {
    if std::process::id() == 1 {
        // SAFETY: kill(2) has no memory-safety preconditions; -1 from the namespace's
        // init reaches every other process in the namespace and never the caller.
        unsafe { libc::kill(-1, libc::SIGKILL) };
        // Reap them all (until there is no child left) so that their open files are
        // closed before we unmount.
        loop {
            // SAFETY: waitpid with a null status pointer is allowed.
            let r = unsafe { libc::waitpid(-1, std::ptr::null_mut(), 0) };
            if r <= 0 {
                break;
            }
        }
    }
}
