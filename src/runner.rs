//! Running the steps in order and tearing down in reverse.

use std::path::Path;
use std::time::Instant;

use anyhow::{Error, anyhow};
use serde_json::json;

use crate::build::Build;
use crate::cmd;
use crate::log;
use crate::outputs::{self, StepRecord, round3};
use crate::progress::Progress;
use crate::step::{Plugin, Step, find};

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
            log::event(
                "step-skipped",
                json!({
                    "step": step.index,
                    "steps": total,
                    "type": step.kind,
                    "line": step.loc.line,
                    "description": step.describe(),
                    "unless": step.unless,
                }),
            );
            record(b, step, "skipped", None);
            continue;
        }
        log::info(&head);
        log::event(
            "step-start",
            json!({
                "step": step.index,
                "steps": total,
                "type": step.kind,
                "line": step.loc.line,
                "description": step.describe(),
            }),
        );
        log::set_step(step.index);
        let plugin = find(plugins, step.kind).expect("validated steps have a plugin");
        // Recorded before it runs, so a step that fails half-way still gets its teardown.
        started.push(step);
        let t = Instant::now();
        let result = {
            let _progress = Progress::start(head.clone());
            plugin.run(step, b)
        };
        let secs = t.elapsed().as_secs_f64();
        log::set_step(0);
        let (status, error) = match result {
            Ok(()) if cmd::interrupted() => {
                errors.push(anyhow!("interrupted during step {}", step.index));
                ("interrupted", None)
            }
            Ok(()) => {
                log::verbose(&format!(
                    "[{}/{total}] {} done in {secs:.2}s",
                    step.index, step.kind
                ));
                ("ok", None)
            }
            Err(e) => {
                let e = e.context(format!(
                    "step {} ({}) at line {} failed after {secs:.1}s",
                    step.index, step.kind, step.loc.line
                ));
                let msg = format!("{e:#}");
                errors.push(e);
                ("failed", Some(msg))
            }
        };
        let mut ev = json!({
            "step": step.index,
            "steps": total,
            "type": step.kind,
            "status": status,
            "duration": round3(secs),
        });
        if let Some(m) = error {
            ev["error"] = m.into();
        }
        log::event("step-end", ev);
        record(b, step, status, Some(secs));
        if status != "ok" {
            break;
        }
    }
    if errors.is_empty() && b.opts.out.manifest {
        // Before teardown, while the image's root is mounted.
        match b.state.root_dir().map(Path::to_path_buf) {
            Ok(root) => match outputs::installed_packages(&root) {
                Ok(Some(p)) => b.report.packages = Some(p),
                Ok(None) => {
                    log::warn("the image has no dpkg database: the manifest lists no packages")
                }
                Err(e) => errors.push(e.context("listing the packages installed in the image")),
            },
            Err(_) => log::warn(
                "no filesystem is mounted at / of the image at the end: the manifest lists no packages",
            ),
        }
        let _ = b.save_report();
    }
    stop_leftover_processes();
    for step in started.iter().rev() {
        log::verbose(&format!("teardown [{}/{total}] {}", step.index, step.kind));
        let plugin = find(plugins, step.kind).expect("validated steps have a plugin");
        let t = Instant::now();
        let r = plugin.teardown(step, b);
        let mut ev = json!({
            "step": step.index,
            "type": step.kind,
            "status": if r.is_ok() { "ok" } else { "failed" },
            "duration": round3(t.elapsed().as_secs_f64()),
        });
        if let Err(e) = r {
            let e = e.context(format!(
                "teardown of step {} ({}) at line {}",
                step.index, step.kind, step.loc.line
            ));
            ev["error"] = format!("{e:#}").into();
            errors.push(e);
        }
        log::event("teardown", ev);
    }
    b.release_all_loops();
    errors
}

/// Note in the report how a step went (for the manifest).
fn record(b: &mut Build, step: &Step, status: &str, secs: Option<f64>) {
    b.report.steps.push(StepRecord {
        index: step.index,
        kind: step.kind.to_string(),
        line: step.loc.line,
        description: step.describe(),
        status: status.to_string(),
        duration: secs.map(round3),
        unless: step.unless.clone(),
    });
    // The report is for the parent; a build without one (a unit test) carries on.
    let _ = b.save_report();
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
