//! The process shape that makes a build leave nothing behind.
//!
//! vmdb forks the build into a new PID namespace, where it is init, and into a private
//! mount namespace. The build dies with its parent (PDEATHSIG), and when the build's
//! init dies the kernel kills every process in the namespace; the namespace's mounts
//! then vanish and the autoclear loop devices detach. The parent only waits, passes on
//! signals, and puts the image under its final name, or removes it.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::{Instant, SystemTime};

use anyhow::{Context, Result, anyhow, bail};
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid, waitpid};
use nix::unistd::{ForkResult, Pid, fork};

use crate::app::{EXIT_FAILED, Prepared};
use crate::blockdev::busy;
use crate::build::Build;
use crate::inflight::{self, InFlight, OutputLock};
use crate::outputs::{self, Report};
use crate::{cmd, log, mount, plugins, runner};

/// Where the image goes: built under a temporary name beside the final one, or written
/// straight to a block device.
pub struct Target {
    final_path: PathBuf,
    build_path: PathBuf,
    device: bool,
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
        outputs::check_file_output(&abs)?;
        // One lock for every spelling of the path (relative, through symlinked
        // directories).
        let key = std::fs::canonicalize(&dir)
            .with_context(|| format!("output directory {}", dir.display()))?
            .join(name)
            .display()
            .to_string();
        let build_path = outputs::temp_name(&abs, "partial", std::process::id());
        Ok(Target {
            final_path: abs,
            build_path,
            device: false,
            key,
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

    /// After a failure: remove every temporary file, or keep the half-built image as
    /// IMAGE.failed when asked to.
    fn discard(&self, report: &Report, keep: bool) {
        outputs::discard(report, Some(&self.build_path));
        if self.device || !self.build_path.exists() {
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

pub fn run_build(p: Prepared, target: Target, keep_failed: bool) -> i32 {
    let started = Instant::now();
    log::event(
        "build-start",
        serde_json::json!({
            "vmdb_version": env!("CARGO_PKG_VERSION"),
            "spec": p.name,
            "output": target.final_path.display().to_string(),
            "format": p.opts.out.format.name(),
            "steps": p.steps.len(),
        }),
    );
    let secs = || outputs::round3(started.elapsed().as_secs_f64());
    let end = |code: i32, outputs: &[PathBuf]| {
        log::event(
            "build-end",
            serde_json::json!({
                "status": if code == 0 { "ok" } else { "failed" },
                "exit_code": code,
                "duration": secs(),
                "outputs": outputs.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
            }),
        );
        code
    };
    let fail = |e: anyhow::Error| {
        log::info(&format!("vmdb: {e:#}"));
        log::event("error", serde_json::json!({ "message": format!("{e:#}") }));
    };
    // From here on a signal never ends vmdb before it cleaned up: it is passed on to
    // the build, and makes the build fail whatever phase it lands in.
    if let Err(e) = catch_signals() {
        fail(e);
        target.release();
        return end(EXIT_FAILED, &[]);
    }
    let setup = Scratch::new().and_then(|scratch| {
        let entry = inflight::Entry {
            pid: std::process::id(),
            output: target.final_path.clone(),
            scratch: scratch.0.clone(),
            temporaries: if target.device {
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
            return end(EXIT_FAILED, &[]);
        }
    };
    let result = supervise(p, &scratch);
    let report = Report::load(&scratch.0);
    let code = match result {
        // The build finished, but a signal came first: that is a failed build too.
        Ok(true) if interrupted() => {
            fail(anyhow!(
                "interrupted by signal {} as the build ended: its outputs are removed",
                LAST_SIGNAL.load(Ordering::SeqCst)
            ));
            target.discard(&report, false);
            end(EXIT_FAILED, &[])
        }
        // The commit is the point of no return: a signal from now on is too late to
        // stop the build, which has succeeded. It only renames files.
        Ok(true) => match outputs::commit(&report) {
            Ok(done) => {
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
                if image.is_none() && !target.device {
                    outputs::remove_path(&target.build_path);
                }
                end(0, &done)
            }
            Err(e) => {
                fail(e);
                target.discard(&report, false);
                end(EXIT_FAILED, &[])
            }
        },
        Ok(false) => {
            target.discard(&report, keep_failed);
            log::info("vmdb: build failed; everything was torn down");
            end(EXIT_FAILED, &[])
        }
        Err(e) => {
            fail(e);
            target.discard(&report, keep_failed);
            end(EXIT_FAILED, &[])
        }
    };
    drop(scratch);
    in_flight.done();
    target.release();
    code
}

/// The build's scratch directory (mount points, temporary files), made and removed by
/// the parent so that it goes even when the build is killed; the next vmdb removes one
/// left by a killed vmdb (src/inflight.rs).
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
fn supervise(p: Prepared, scratch: &Scratch) -> Result<bool> {
    if interrupted() {
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
            let code = child_main(p, scratch.0.clone(), alive_r);
            std::process::exit(code);
        }
        ForkResult::Parent { child } => {
            drop(alive_r);
            *CHILD.lock().unwrap_or_else(|e| e.into_inner()) = child.as_raw();
            // A signal that came between catching and forking has nobody to go to yet.
            if interrupted() {
                let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGTERM);
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
/// Set as soon as vmdb gets SIGINT, SIGTERM or SIGHUP.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static LAST_SIGNAL: AtomicI32 = AtomicI32::new(0);

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Catch SIGINT, SIGTERM and SIGHUP: note them, and pass them on to the build process
/// as SIGTERM. Threads cannot be created once the PID namespace is unshared, so the
/// thread starts now and learns the child's PID after the fork.
fn catch_signals() -> Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    for sig in [SIGINT, SIGTERM, SIGHUP] {
        // Noted in the handler itself, on the thread the signal lands on: the
        // forwarder thread may run only after the main thread has decided to commit.
        // SAFETY: the action only does atomic stores, which are async-signal-safe.
        unsafe {
            signal_hook::low_level::register(sig, move || {
                LAST_SIGNAL.store(sig, Ordering::SeqCst);
                INTERRUPTED.store(true, Ordering::SeqCst);
            })
        }?;
    }
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])?;
    std::thread::spawn(move || {
        for _ in signals.forever() {
            let child = CHILD.lock().unwrap_or_else(|e| e.into_inner());
            if *child > 0 {
                let _ = nix::sys::signal::kill(
                    Pid::from_raw(*child),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
        }
    });
    Ok(())
}

fn child_main(p: Prepared, workdir: PathBuf, alive: std::os::fd::OwnedFd) -> i32 {
    // SAFETY: prctl(PR_SET_PDEATHSIG) only changes this process's attributes.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    if parent_gone(&alive) {
        return EXIT_FAILED;
    }
    if let Err(e) = mount::enter_private_namespace() {
        log::info(&format!("vmdb: {e:#}"));
        return EXIT_FAILED;
    }
    if let Err(e) = cmd::forward_signals() {
        log::info(&format!("vmdb: {e:#}"));
        return EXIT_FAILED;
    }
    let started = SystemTime::now();
    let t = Instant::now();
    let mut b = Build::in_workdir(p.opts, workdir);
    let mut errors = runner::run(&p.steps, plugins::ALL, &mut b);
    // A signal after the last step (while tearing down) fails the build as well.
    if errors.is_empty() && cmd::interrupted() {
        errors.push(anyhow!("interrupted while tearing down"));
    }
    if errors.is_empty() {
        let secs = t.elapsed().as_secs_f64();
        if let Err(e) = outputs::finish(&mut b, started, secs) {
            errors.push(e.context("handing over the outputs"));
        } else if cmd::interrupted() {
            errors.push(anyhow!("interrupted while handing over the outputs"));
        }
    }
    for e in &errors {
        log::error(&format!("{e:#}"));
    }
    if errors.is_empty() { 0 } else { EXIT_FAILED }
}

fn parent_gone(alive: &std::os::fd::OwnedFd) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    let mut fds = [PollFd::new(alive.as_fd(), PollFlags::POLLIN)];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
}
