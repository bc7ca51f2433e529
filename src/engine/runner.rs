//! Running the steps in order and tearing down in reverse.

use std::path::Path;
use std::time::Instant;

use anyhow::{Error, anyhow};
use nix::sys::signal::Signal;

use crate::engine::build::Build;
use crate::engine::step::{CacheRole, Registry, Step, find};
use crate::engine::stepcache::{self, Cache};
use crate::event::{Event, Status, StepInfo, round3};
use crate::host::signals;
use crate::log;
use crate::output::StepRecord;
use crate::progress::Progress;

/// Run every step; on the first failure (or a signal) stop, then tear down every step
/// that started, newest first, carrying on past teardown errors. Returns all errors.
pub fn run(steps: &[Step], registry: &Registry, b: &mut Build) -> Vec<Error> {
    let total = steps.len();
    let mut started: Vec<&Step> = Vec::new();
    let mut errors = Vec::new();
    let cache = open_cache(steps, b, registry);
    let restore_at = cache
        .as_ref()
        .and_then(|(_, p)| p.restore.as_ref().map(|(i, _)| *i));
    for (i, step) in steps.iter().enumerate() {
        if signals::interrupted() {
            errors.push(anyhow!("interrupted before step {}", step.index));
            break;
        }
        let plugin = find(registry.plugins, step.kind).expect("validated steps have a plugin");
        let head = format!("[{}/{total}] {}", step.index, step.describe());
        // Up to the restored state, tree steps are stood in for by the cached tree,
        // unpacked in place of the last of them.
        if restore_at.is_some_and(|r| i <= r) && plugin.spec().cache == CacheRole::Tree {
            log::info(&format!("{head}: from the step cache"));
            log::event(Event::StepCached {
                step: step_info(step, total),
            });
            record(b, step, Status::Cached, None);
            if restore_at == Some(i) {
                let (c, p) = cache.as_ref().expect("a restore point comes from a cache");
                let meta = &p.restore.as_ref().expect("restore point").1;
                if let Err(e) = restore(c, meta, b) {
                    errors.push(e.context(format!(
                        "restoring the state after step {} from the step cache",
                        step.index
                    )));
                    break;
                }
            }
            continue;
        }
        if b.state.skips(&step.unless) {
            log::info(&format!(
                "{head}: skipped (unless: {})",
                step.unless.join(", ")
            ));
            log::event(Event::StepSkipped {
                step: step_info(step, total),
                unless: step.unless.clone(),
            });
            record(b, step, Status::Skipped, None);
            continue;
        }
        log::info(&head);
        log::event(Event::StepStart {
            step: step_info(step, total),
        });
        log::set_step(step.index);
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
            Ok(()) if signals::interrupted() => {
                errors.push(anyhow!("interrupted during step {}", step.index));
                (Status::Interrupted, None)
            }
            Ok(()) => {
                log::verbose(&format!(
                    "[{}/{total}] {} done in {secs:.2}s",
                    step.index, step.kind
                ));
                if let Some((c, p)) = &cache {
                    if stepcache::worth_saving(p, i, secs) {
                        save(c, p, i, step, b);
                    }
                }
                (Status::Ok, None)
            }
            Err(e) => failed(
                &mut errors,
                e.context(format!(
                    "step {} ({}) at line {} failed after {secs:.1}s",
                    step.index, step.kind, step.loc.line
                )),
            ),
        };
        log::event(Event::StepEnd {
            step: step.index,
            steps: total,
            kind: step.kind.to_string(),
            status,
            duration: round3(secs),
            error,
        });
        record(b, step, status, Some(secs));
        if status != Status::Ok {
            break;
        }
    }
    if errors.is_empty() && b.opts.out.manifest {
        // Before teardown, while the image's root is mounted.
        match b.state.root_dir().map(Path::to_path_buf) {
            Ok(root) => match registry.distro.installed_packages(&root) {
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
    if !errors.is_empty() {
        b.state.failed = true;
    }
    stop_leftover_processes();
    for step in started.iter().rev() {
        log::verbose(&format!("teardown [{}/{total}] {}", step.index, step.kind));
        let plugin = find(registry.plugins, step.kind).expect("validated steps have a plugin");
        let t = Instant::now();
        let r = plugin.teardown(step, b);
        let duration = round3(t.elapsed().as_secs_f64());
        let (status, error) = match r {
            Ok(()) => (Status::Ok, None),
            Err(e) => failed(
                &mut errors,
                e.context(format!(
                    "teardown of step {} ({}) at line {}",
                    step.index, step.kind, step.loc.line
                )),
            ),
        };
        log::event(Event::Teardown {
            step: step.index,
            kind: step.kind.to_string(),
            status,
            duration,
            error,
        });
    }
    errors.extend(b.release_all_loops());
    errors
}

/// The step cache and where this build starts from, unless caching is off; a cache
/// that cannot be used is reported and the build goes on without it.
fn open_cache(steps: &[Step], b: &Build, registry: &Registry) -> Option<(Cache, stepcache::Plan)> {
    let dir = b.opts.cache_dir.as_ref()?;
    let r = Cache::open(dir).and_then(|c| {
        let p = stepcache::plan(steps, &b.opts, &c, registry)?;
        Ok((c, p))
    });
    match r {
        Ok((c, p)) => {
            match &p.restore {
                Some((i, m)) => log::info(&format!(
                    "step cache: starting from the state after step {} ({}), saved {}",
                    i + 1,
                    m.kind,
                    stepcache::age(m.created)
                )),
                None => log::verbose("step cache: no saved state matches; building from the start"),
            }
            Some((c, p))
        }
        Err(e) => {
            log::info(&format!("vmdb: warning: not using the step cache: {e:#}"));
            None
        }
    }
}

fn restore(c: &Cache, meta: &stepcache::Meta, b: &mut Build) -> anyhow::Result<()> {
    let t = Instant::now();
    let root = b.state.root_dir()?.to_path_buf();
    let flags = c.restore(meta, &root)?;
    b.state.flags.extend(flags);
    log::info(&format!(
        "  restored {:.0} MB in {:.1}s",
        meta.size as f64 / 1e6,
        t.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// Store the tree after a step; a failure to do so only costs speed next time.
fn save(c: &Cache, p: &stepcache::Plan, i: usize, step: &Step, b: &Build) {
    let Ok(root) = b.state.root_dir() else { return };
    let t = Instant::now();
    let inputs = p.inputs_upto(i);
    // Entries are never changed once written, so --refresh makes way for the new one.
    if b.opts.refresh {
        if let Err(e) = c.remove(&p.keys[i]) {
            log::warn(&format!("could not replace a step cache entry: {e:#}"));
        }
    }
    match c.save(
        &p.keys[i],
        root,
        &b.state.flags,
        &b.opts.spec_name,
        step,
        inputs,
    ) {
        Ok(stepcache::Saved::New(m)) => log::info(&format!(
            "  saved the image tree in the step cache ({:.0} MB, {:.1}s)",
            m.size as f64 / 1e6,
            t.elapsed().as_secs_f64()
        )),
        Ok(stepcache::Saved::Existing(_)) => log::info(
            "  the step cache has this image tree already (another build saved it meanwhile)",
        ),
        Err(e) => log::info(&format!(
            "vmdb: warning: could not save to the step cache: {e:#}"
        )),
    }
}

/// Note `e` among the build's errors: the status and the message its event gives.
fn failed(errors: &mut Vec<Error>, e: Error) -> (Status, Option<String>) {
    let msg = format!("{e:#}");
    errors.push(e);
    (Status::Failed, Some(msg))
}

/// What a step event says about `step`, of `total`.
fn step_info(step: &Step, total: usize) -> StepInfo {
    StepInfo {
        step: step.index,
        steps: total,
        kind: step.kind.to_string(),
        line: step.loc.line,
        description: step.describe(),
    }
}

/// Note in the report how a step went (for the manifest).
fn record(b: &mut Build, step: &Step, status: Status, secs: Option<f64>) {
    b.report.steps.push(StepRecord {
        index: step.index,
        kind: step.kind.to_string(),
        line: step.loc.line,
        description: step.describe(),
        status,
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
        signals::send_all(Signal::SIGKILL);
        // Reap them all (until there is no child left) so that their open files are
        // closed before we unmount.
        while nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(-1), None).is_ok() {}
    }
}
