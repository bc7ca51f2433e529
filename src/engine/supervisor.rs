//! The process shape that makes a build leave nothing behind.
//!
//! vmdb forks the build into a new PID namespace, where it is init, and into a private
//! mount namespace. The build dies with its parent (PDEATHSIG), and when the build's
//! init dies the kernel kills every process in the namespace; the namespace's mounts
//! then vanish and the autoclear loop devices detach. The parent only waits, passes on
//! signals, and puts the image under its final name, or removes it.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Instant, SystemTime};

use anyhow::{Context, Result, anyhow, bail};
use nix::sys::signal::Signal;
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid, waitpid};
use nix::unistd::{ForkResult, fork};

use crate::engine::build::Build;
use crate::engine::inflight::{self, InFlight, OutputLock};
use crate::engine::prepare::Prepared;
use crate::engine::runner;
use crate::engine::step::Registry;
use crate::event::{Event, round3};
use crate::host::blockdev::busy;
use crate::host::{cmd, mount, signals};
use crate::log;
use crate::output::{self, Report};

/// Where the image goes: built under a temporary name beside the final one, or written
/// in place: straight to a block device, or into an existing file (vmdb2's `--image`
/// for a spec that makes no image there).
pub struct Target {
    final_path: PathBuf,
    build_path: PathBuf,
    device: bool,
    in_place: bool,
    /// What the output's lock is keyed by: its real path, or the device's number.
    key: String,
    lock: Option<OutputLock>,
    claim: Option<busy::Claim>,
}

impl Target {
    /// Check where the image is to go; nothing is touched yet.
    pub fn new(out: &Path) -> Result<Target> {
        // A block device, named as such or by a symlink (/dev/disk/by-id/...).
        if let Some(rdev) = busy::block_rdev(out) {
            if let Some(why) = busy::refusal(out)? {
                bail!("refusing to write to {}: {why}", out.display());
            }
            let (maj, min) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
            return Ok(Target {
                final_path: out.to_path_buf(),
                build_path: out.to_path_buf(),
                device: true,
                in_place: true,
                key: format!("block device {maj}:{min}"),
                lock: None,
                claim: None,
            });
        }
        let abs = std::path::absolute(out).with_context(|| format!("output {}", out.display()))?;
        let dir = abs.parent().unwrap_or(Path::new("/")).to_path_buf();
        let name = abs
            .file_name()
            .with_context(|| format!("output {} has no file name", out.display()))?;
        if !dir.is_dir() {
            bail!(
                "cannot build {}: directory {} does not exist",
                out.display(),
                dir.display()
            );
        }
        output::check_file_output(&abs)?;
        // One lock for every spelling of the path (relative, through symlinked
        // directories).
        let key = std::fs::canonicalize(&dir)
            .with_context(|| format!("output directory {}", dir.display()))?
            .join(name)
            .display()
            .to_string();
        let build_path = output::temp_name(&abs, "partial", std::process::id());
        Ok(Target {
            final_path: abs,
            build_path,
            device: false,
            in_place: false,
            key,
            lock: None,
            claim: None,
        })
    }

    /// The existing file (or block device) `out`, written in place: the build changes
    /// it and neither renames nor removes it.
    pub fn existing(out: &Path) -> Result<Target> {
        let t = Target::new(out)?;
        if t.device {
            return Ok(t);
        }
        let real = match std::fs::metadata(out) {
            Ok(m) if m.is_file() => {
                std::fs::canonicalize(out).with_context(|| format!("image {}", out.display()))?
            }
            Ok(_) => bail!(
                "refusing to write to {}: it is not a regular file",
                out.display()
            ),
            Err(e) => return Err(e).with_context(|| format!("image {}", out.display())),
        };
        Ok(Target {
            final_path: real.clone(),
            build_path: real.clone(),
            device: false,
            in_place: true,
            key: real.display().to_string(),
            lock: None,
            claim: None,
        })
    }

    /// Before the build: take the output's lock, so that no other vmdb builds it at the
    /// same time, and hold a block device exclusively. Both last as long as the target.
    pub fn claim(&mut self) -> Result<()> {
        self.lock = Some(inflight::lock_output(&self.key, &self.final_path)?);
        if self.device {
            self.claim = busy::claim(&self.final_path)?;
        }
        Ok(())
    }

    pub fn build_path(&self) -> &Path {
        &self.build_path
    }

    pub fn final_path(&self) -> &Path {
        &self.final_path
    }

    pub fn is_device(&self) -> bool {
        self.device
    }

    /// Written in place: a block device, or an existing file.
    pub fn is_in_place(&self) -> bool {
        self.in_place
    }

    /// After a failure: remove every temporary file, or keep the half-built image as
    /// IMAGE.failed when asked to.
    fn discard(&self, report: &Report, keep: bool) {
        output::discard(report, Some(&self.build_path));
        if self.in_place || !self.build_path.exists() {
            return;
        }
        if keep {
            let kept = PathBuf::from(format!("{}.failed", self.final_path.display()));
            if std::fs::rename(&self.build_path, &kept).is_ok() {
                log::info(&format!(
                    "vmdb: kept the half-built image as {}",
                    kept.display()
                ));
                return;
            }
        }
        if let Err(e) = std::fs::remove_file(&self.build_path) {
            log::info(&format!(
                "vmdb: could not remove {}: {e}",
                self.build_path.display()
            ));
        }
    }

    /// The build is over: let go of the device and the lock.
    fn release(mut self) {
        self.claim.take();
        if let Some(l) = self.lock.take() {
            l.release();
        }
    }
}

/// A build that failed, and said why (on standard error and as `error` events).
#[derive(Debug)]
pub struct Failed;

/// The exit status of the build process when the build failed (only vmdb reads it).
const BUILD_PROCESS_FAILED: i32 = 1;

/// Run the build of `p` with the step types of `registry`, in its own process, and put its outputs in
/// place; returns their final paths. Whatever fails is said here; the caller only
/// learns that it failed.
pub fn run_build(
    p: Prepared,
    target: Target,
    keep_failed: bool,
    registry: &'static Registry,
) -> Result<Vec<PathBuf>, Failed> {
    let started = Instant::now();
    log::event(Event::BuildStart {
        vmdb_version: env!("CARGO_PKG_VERSION").to_string(),
        spec: p.name.clone(),
        output: target.final_path.display().to_string(),
        format: p.opts.out.format.name().to_string(),
        steps: p.steps.len(),
    });
    let secs = || round3(started.elapsed().as_secs_f64());
    let fail = |e: anyhow::Error| {
        log::failure(&format!("vmdb: {e:#}"));
        log::event(Event::Error {
            message: format!("{e:#}"),
        });
    };
    // From here on a signal never ends vmdb before it cleaned up: it is passed on to
    // the build, and makes the build fail whatever phase it lands in.
    if let Err(e) = catch_signals() {
        fail(e);
        target.release();
        return Err(Failed);
    }
    let setup = Scratch::new().and_then(|scratch| {
        let entry = inflight::Entry {
            pid: std::process::id(),
            output: target.final_path.clone(),
            scratch: scratch.0.clone(),
            temporaries: if target.in_place {
                Vec::new()
            } else {
                vec![target.build_path.clone()]
            },
        };
        Ok((scratch, InFlight::register(&entry)?))
    });
    let (scratch, in_flight) = match setup {
        Ok(s) => s,
        Err(e) => {
            fail(e);
            target.release();
            return Err(Failed);
        }
    };
    let result = supervise(p, &scratch, registry);
    let report = Report::load(&scratch.0);
    let outcome = match result {
        // The build finished, but a signal came first: that is a failed build too.
        Ok(true) if signals::interrupted() => {
            fail(anyhow!(
                "interrupted by signal {} as the build ended: its outputs are removed",
                signals::last()
            ));
            target.discard(&report, false);
            Err(Failed)
        }
        // The commit is the point of no return: a signal from now on is too late to
        // stop the build, which has succeeded. It only renames files.
        Ok(true) => match output::commit(&report) {
            Ok(output::Committed { done, removed }) => {
                for r in &removed {
                    log::info(&format!(
                        "vmdb: removed {}, left by an earlier build: this build wrote none",
                        r.display()
                    ));
                }
                let image = report
                    .files
                    .iter()
                    .find(|f| f.path.as_deref() == Some(target.final_path.as_path()));
                if image.is_some() {
                    log::info(&format!(
                        "vmdb: built {} in {:.1}s",
                        target.final_path.display(),
                        secs()
                    ));
                } else {
                    // Legitimate (a spec that changes an existing disk), but say so:
                    // the user asked for an image there.
                    let older = if target.final_path.exists() {
                        " (the file there is from before)"
                    } else {
                        ""
                    };
                    log::info(&format!(
                        "vmdb: done in {:.1}s; the spec made no image, so nothing was written to {}{older}",
                        secs(),
                        target.final_path.display()
                    ));
                }
                for f in &report.files {
                    if let Some(p) = &f.path {
                        if p != &target.final_path {
                            log::info(&format!("vmdb: wrote {}", p.display()));
                        }
                    }
                }
                // A spec that made no image may still have left a file at its path.
                if image.is_none() && !target.in_place {
                    output::remove_path(&target.build_path);
                }
                Ok(done)
            }
            Err(e) => {
                fail(e);
                target.discard(&report, false);
                Err(Failed)
            }
        },
        Ok(false) => {
            target.discard(&report, keep_failed);
            log::failure("vmdb: build failed; everything was torn down");
            Err(Failed)
        }
        Err(e) => {
            fail(e);
            target.discard(&report, keep_failed);
            Err(Failed)
        }
    };
    drop(scratch);
    in_flight.done();
    target.release();
    outcome
}

/// The build's scratch directory (mount points, temporary files), made and removed by
/// the parent so that it goes even when the build is killed; the next vmdb removes one
/// left by a killed vmdb (src/engine/inflight.rs).
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Result<Scratch> {
        // Absolute: the next vmdb, from another directory, may have to remove it.
        let tmp = std::path::absolute(std::env::temp_dir()).context("the temporary directory")?;
        let dir = tmp.join(format!("vmdb-build-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir)
            .with_context(|| format!("creating scratch directory {}", dir.display()))?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // Only called once the build's mount namespace is gone, so nothing can be
        // mounted below it any more.
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Fork the build into its namespaces and wait for it; true if it succeeded.
fn supervise(p: Prepared, scratch: &Scratch, registry: &'static Registry) -> Result<bool> {
    if signals::interrupted() {
        bail!("interrupted before the build started");
    }
    // A pipe whose write end only the parent holds: EOF tells the child the parent died
    // before PDEATHSIG was armed.
    let (alive_r, alive_w) = nix::unistd::pipe().context("creating a pipe")?;
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWPID)
        .context("creating a PID namespace for the build")?;
    // SAFETY: the only other thread is the signal forwarder, blocked reading its pipe
    // and holding no lock but CHILD's, which it takes only after a signal; the child
    // takes no lock of ours.
    match unsafe { fork() }.context("forking the build")? {
        ForkResult::Child => {
            drop(alive_w);
            let code = child_main(p, scratch.0.clone(), alive_r, registry);
            std::process::exit(code);
        }
        ForkResult::Parent { child } => {
            drop(alive_r);
            *CHILD.lock().unwrap_or_else(|e| e.into_inner()) = child.as_raw();
            // A signal that came between catching and forking has nobody to go to yet.
            if signals::interrupted() {
                signals::send(child.as_raw() as u32, Signal::SIGTERM);
            }
            // Wait for the child to end without reaping it, so that its PID cannot be
            // reused while the forwarder may still send it a signal.
            loop {
                match waitid(Id::Pid(child), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
                    Err(nix::errno::Errno::EINTR) => continue,
                    other => {
                        other.context("waiting for the build")?;
                        break;
                    }
                }
            }
            *CHILD.lock().unwrap_or_else(|e| e.into_inner()) = 0;
            let status = loop {
                match waitpid(child, None) {
                    Err(nix::errno::Errno::EINTR) => continue,
                    other => break other.context("waiting for the build")?,
                }
            };
            drop(alive_w);
            match status {
                WaitStatus::Exited(_, 0) => Ok(true),
                WaitStatus::Exited(_, _) => Ok(false),
                WaitStatus::Signaled(_, sig, _) => {
                    bail!("the build process was killed by {sig:?}")
                }
                other => bail!("the build process ended oddly: {other:?}"),
            }
        }
    }
}

/// The build process while it runs (0 before and after), for the forwarder.
static CHILD: Mutex<i32> = Mutex::new(0);

/// Catch SIGINT, SIGTERM and SIGHUP: note them, and pass them on to the build process
/// as SIGTERM. Threads cannot be created once the PID namespace is unshared, so the
/// thread starts now and learns the child's PID after the fork.
fn catch_signals() -> Result<()> {
    signals::catch(|_| {
        let child = CHILD.lock().unwrap_or_else(|e| e.into_inner());
        if *child > 0 {
            signals::send(*child as u32, Signal::SIGTERM);
        }
    })
}

fn child_main(
    p: Prepared,
    workdir: PathBuf,
    alive: std::os::fd::OwnedFd,
    registry: &Registry,
) -> i32 {
    // Only fails for a bad signal number.
    let _ = signals::die_with_parent();
    if parent_gone(&alive) {
        return BUILD_PROCESS_FAILED;
    }
    if let Err(e) = mount::enter_private_namespace() {
        log::failure(&format!("vmdb: {e:#}"));
        return BUILD_PROCESS_FAILED;
    }
    if let Err(e) = cmd::stop_commands_on_signals() {
        log::failure(&format!("vmdb: {e:#}"));
        return BUILD_PROCESS_FAILED;
    }
    let started = SystemTime::now();
    let t = Instant::now();
    let mut b = Build::in_workdir(p.opts, workdir.clone());
    let mut errors = runner::run(&p.steps, registry, &mut b);
    // A signal after the last step (while tearing down) fails the build as well.
    if errors.is_empty() && signals::interrupted() {
        errors.push(anyhow!("interrupted while tearing down"));
    }
    if errors.is_empty() {
        let secs = t.elapsed().as_secs_f64();
        log::verbose("handing over the outputs");
        let finished = output::finish(
            &mut b.report,
            &workdir,
            &b.opts.out,
            &b.opts.vars,
            started,
            secs,
        );
        if let Err(e) = finished {
            errors.push(e.context("handing over the outputs"));
        } else if signals::interrupted() {
            errors.push(anyhow!("interrupted while handing over the outputs"));
        }
    }
    for e in &errors {
        log::error(&format!("{e:#}"));
    }
    if errors.is_empty() {
        0
    } else {
        BUILD_PROCESS_FAILED
    }
}

fn parent_gone(alive: &std::os::fd::OwnedFd) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    let mut fds = [PollFd::new(alive.as_fd(), PollFlags::POLLIN)];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
}
