//! The process shape that makes a build leave nothing behind.
//!
//! vmdb forks the build into a new PID namespace, where it is init, and into a private
//! mount namespace. The build dies with its parent (PDEATHSIG), and when the build's
//! init dies the kernel kills every process in the namespace; the namespace's mounts
//! then vanish and the autoclear loop devices detach. The parent only waits, passes on
//! signals, and puts the image under its final name, or removes it.

use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use anyhow::{Context, Result, bail};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork};

use crate::app::{EXIT_FAILED, Prepared};
use crate::build::{Build, is_block_device};
use crate::outputs::{self, Report};
use crate::{cmd, log, mount, plugins, runner};

/// Where the image goes: built under a temporary name beside the final one, or written
/// straight to a block device.
pub struct Target {
    final_path: PathBuf,
    build_path: PathBuf,
    device: bool,
}

impl Target {
    pub fn new(out: &Path) -> Result<Target> {
        if is_block_device(out) {
            if let Some(m) = mounted_part_of(out)? {
                bail!("refusing to write to {}: {m}", out.display());
            }
            return Ok(Target {
                final_path: out.to_path_buf(),
                build_path: out.to_path_buf(),
                device: true,
            });
        }
        let abs = std::path::absolute(out).with_context(|| format!("output {}", out.display()))?;
        let dir = abs.parent().unwrap_or(Path::new("/")).to_path_buf();
        abs.file_name()
            .with_context(|| format!("output {} has no file name", out.display()))?;
        if !dir.is_dir() {
            bail!(
                "cannot build {}: directory {} does not exist",
                out.display(),
                dir.display()
            );
        }
        if abs.is_dir() {
            bail!("cannot build {}: it is a directory", out.display());
        }
        outputs::remove_stale_of(&abs);
        let build_path = outputs::temp_name(&abs, "partial", std::process::id());
        Ok(Target {
            final_path: abs,
            build_path,
            device: false,
        })
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
}

/// Why `dev` must not be written: it or one of its partitions is mounted.
fn mounted_part_of(dev: &Path) -> Result<Option<String>> {
    use std::os::unix::fs::MetadataExt;
    let rdev = std::fs::metadata(dev)?.rdev();
    let (maj, min) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
    let sys = std::fs::canonicalize(format!("/sys/dev/block/{maj}:{min}"))?;
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    for line in info.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let (Some(mm), Some(point)) = (f.get(2), f.get(4)) else {
            continue;
        };
        if let Ok(p) = std::fs::canonicalize(format!("/sys/dev/block/{mm}")) {
            if p == sys {
                return Ok(Some(format!("it is mounted on {point}")));
            }
            if p.starts_with(&sys) {
                let part = p.file_name().unwrap_or_default().to_string_lossy();
                return Ok(Some(format!("its partition {part} is mounted on {point}")));
            }
        }
    }
    Ok(None)
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
    let (result, report) = supervise(p);
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
    match result {
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
                    log::info(&format!(
                        "vmdb: done in {:.1}s (the spec made no image at {})",
                        secs(),
                        target.build_path.display()
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
                if image.is_none() {
                    outputs::remove_path(&target.build_path);
                }
                end(0, &done)
            }
            Err(e) => {
                log::info(&format!("vmdb: {e:#}"));
                log::event("error", serde_json::json!({ "message": format!("{e:#}") }));
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
            log::info(&format!("vmdb: {e:#}"));
            log::event("error", serde_json::json!({ "message": format!("{e:#}") }));
            target.discard(&report, keep_failed);
            end(EXIT_FAILED, &[])
        }
    }
}

/// The build's scratch directory (mount points, temporary files), made and removed by
/// the parent so that it goes even when the build is killed. Its name carries the
/// parent's PID, so that one left by a killed vmdb is removed by the next.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Result<Scratch> {
        let tmp = std::env::temp_dir();
        outputs::remove_stale(&tmp, "vmdb-build-", "");
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

/// Fork the build into its namespaces and wait for it; true if it succeeded. Also the
/// report the build left in its scratch directory (its files, even after a failure).
fn supervise(p: Prepared) -> (Result<bool>, Report) {
    let scratch = match Scratch::new() {
        Ok(s) => s,
        Err(e) => return (Err(e), Report::default()),
    };
    let r = supervise_in(p, &scratch);
    (r, Report::load(&scratch.0))
}

fn supervise_in(p: Prepared, scratch: &Scratch) -> Result<bool> {
    if !nix::unistd::geteuid().is_root() {
        bail!("building needs root (loop devices, mounts): run vmdb with sudo");
    }
    // A pipe whose write end only the parent holds: EOF tells the child the parent died
    // before PDEATHSIG was armed.
    let (alive_r, alive_w) = nix::unistd::pipe().context("creating a pipe")?;
    // Threads cannot be created once the PID namespace is unshared, so the thread that
    // passes signals on starts now and learns the child's PID after the fork.
    forward_signals_to_child()?;
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWPID)
        .context("creating a PID namespace for the build")?;
    // SAFETY: the only other thread is the signal forwarder, blocked reading its pipe
    // and holding no lock, so the child may run ordinary code after fork.
    match unsafe { fork() }.context("forking the build")? {
        ForkResult::Child => {
            drop(alive_w);
            let code = child_main(p, scratch.0.clone(), alive_r);
            std::process::exit(code);
        }
        ForkResult::Parent { child } => {
            drop(alive_r);
            CHILD.store(child.as_raw(), std::sync::atomic::Ordering::SeqCst);
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

static CHILD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

fn forward_signals_to_child() -> Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])?;
    std::thread::spawn(move || {
        for _ in signals.forever() {
            let child = CHILD.load(std::sync::atomic::Ordering::SeqCst);
            if child > 0 {
                let _ =
                    nix::sys::signal::kill(Pid::from_raw(child), nix::sys::signal::Signal::SIGTERM);
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
    if errors.is_empty() && !cmd::interrupted() {
        let secs = t.elapsed().as_secs_f64();
        if let Err(e) = outputs::finish(&mut b, started, secs) {
            errors.push(e.context("handing over the outputs"));
        } else if cmd::interrupted() {
            errors.push(anyhow::anyhow!(
                "interrupted while handing over the outputs"
            ));
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
