//! Signals, in one place: SIGINT, SIGTERM and SIGHUP are caught (signal-hook), noted,
//! and handed on a thread of their own to whoever asked; processes are signalled
//! through nix; a child can ask to die with its parent.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use anyhow::Result;
use nix::sys::signal::Signal;
use nix::unistd::Pid;

/// Set as soon as one of the caught signals came.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// The last signal caught (0: none).
static LAST: AtomicI32 = AtomicI32::new(0);

/// Catch SIGINT, SIGTERM and SIGHUP from now on: each is noted (`interrupted`,
/// `last`), then `then` runs with it on a thread of its own. A process cannot start
/// threads once it unshared its PID namespace: it calls this before.
pub fn catch(mut then: impl FnMut(i32) + Send + 'static) -> Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    for sig in [SIGINT, SIGTERM, SIGHUP] {
        // Noted in the handler itself: the thread below may run only after the main
        // thread has decided that nothing interrupted it.
        // SAFETY: the action only does atomic stores, which are async-signal-safe.
        unsafe {
            signal_hook::low_level::register(sig, move || {
                LAST.store(sig, Ordering::SeqCst);
                INTERRUPTED.store(true, Ordering::SeqCst);
            })
        }?;
    }
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])?;
    std::thread::spawn(move || {
        for sig in signals.forever() {
            then(sig);
        }
    });
    Ok(())
}

/// Whether a caught signal came.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// The last signal caught (0: none).
pub fn last() -> i32 {
    LAST.load(Ordering::SeqCst)
}

/// Send `sig` to the process `pid`; one that is gone already is no error.
pub fn send(pid: u32, sig: Signal) {
    let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), sig);
}

/// Send `sig` to every process of the process group `pgid`.
pub fn send_group(pgid: u32, sig: Signal) {
    let _ = nix::sys::signal::killpg(Pid::from_raw(pgid as i32), sig);
}

/// Send `sig` to every process this one may signal but itself: from the init of a PID
/// namespace, to every other process in the namespace.
pub fn send_all(sig: Signal) {
    let _ = nix::sys::signal::kill(Pid::from_raw(-1), sig);
}

/// Have the kernel kill this process (SIGKILL) when its parent ends. It is only a
/// system call: a child may call it between fork and exec.
pub fn die_with_parent() -> std::io::Result<()> {
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_group_is_signalled() {
        let mut c = std::process::Command::new("sleep");
        let mut child = std::os::unix::process::CommandExt::process_group(c.arg("60"), 0)
            .spawn()
            .unwrap();
        send_group(child.id(), Signal::SIGTERM);
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGTERM));
        // Gone already: nothing happens.
        send(child.id(), Signal::SIGTERM);
    }
}
