//! A running qemu, in its own process group, its console read on a thread; it dies
//! with vmdb, and dropping it kills it.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use nix::sys::signal::Signal;

use super::qemu::Arch;
use crate::host::signals;

/// A running qemu in its own process group. Dropping it kills the group,
/// so no exit path can leave qemu behind.
pub(super) struct Vm {
    pub(super) child: Child,
    pub(super) stdin: Option<ChildStdin>,
    pub(super) console: Receiver<Vec<u8>>,
    pub(super) stderr: Arc<Mutex<Vec<u8>>>,
    stderr_reader: Option<JoinHandle<()>>,
    pub(super) status: Option<ExitStatus>,
}

impl Vm {
    pub(super) fn spawn(program: &Path, args: &[OsString], arch: Arch) -> Result<Vm> {
        let parent = nix::unistd::getpid();
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Own process group: Ctrl-C in the terminal reaches only us,
            // and we can kill qemu with everything it started in one go.
            .process_group(0);
        // SAFETY: only async-signal-safe calls (prctl, getppid) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // If vmdb dies without cleaning up (SIGKILL, panic=abort),
                // the kernel kills qemu for us.
                signals::die_with_parent()?;
                // We may have died before that took effect.
                if nix::unistd::getppid() != parent {
                    return Err(std::io::Error::other("vmdb is gone"));
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                anyhow!(
                    "{} not found (install the {} package, or set VMDB_QEMU)",
                    program.display(),
                    arch.debian_package()
                )
            } else {
                anyhow!("starting {}: {e}", program.display())
            }
        })?;

        let mut stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match stdout.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if tx.send(buf[..n].to_vec()).is_err() {
                            break;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                }
            }
        });

        // qemu's own complaints (bad image, missing firmware) go into the
        // error message; keep only the start, it is where the cause is.
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let mut err_pipe = child.stderr.take().expect("stderr is piped");
        let sink = Arc::clone(&stderr);
        let stderr_reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err_pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let mut s = sink.lock().unwrap_or_else(|p| p.into_inner());
                if s.len() < 16 * 1024 {
                    s.extend_from_slice(&buf[..n]);
                }
            }
        });

        let stdin = child.stdin.take();
        Ok(Vm {
            child,
            stdin,
            console: rx,
            stderr,
            stderr_reader: Some(stderr_reader),
            status: None,
        })
    }

    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(super) fn send(&mut self, text: &str) {
        // A failed write means qemu is gone; the main loop notices that.
        if let Some(stdin) = self.stdin.as_mut() {
            let _ = stdin.write_all(text.as_bytes());
            let _ = stdin.flush();
        }
    }

    pub(super) fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    pub(super) fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let until = Instant::now() + limit;
        while Instant::now() < until {
            if let Some(s) = self.try_exit() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.try_exit()
    }

    /// What qemu wrote to stderr. After qemu ended, the reader may still hold its last
    /// words: give it a moment to reach the end of the pipe (a helper that outlived qemu
    /// may keep it open, hence no plain join).
    pub(super) fn stderr_text(&mut self) -> String {
        if self.status.is_some() {
            let until = Instant::now() + Duration::from_secs(2);
            while self
                .stderr_reader
                .as_ref()
                .is_some_and(|r| !r.is_finished())
                && Instant::now() < until
            {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let s = self.stderr.lock().unwrap_or_else(|p| p.into_inner());
        String::from_utf8_lossy(&s).trim().to_string()
    }

    pub(super) fn kill(&mut self) {
        // The whole group: qemu may have helpers, and a wrapper script
        // standing in for qemu has children.
        signals::send_group(self.child.id(), Signal::SIGKILL);
        if self.status.is_none() {
            self.status = self.child.wait().ok();
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stdin = None;
        self.kill();
    }
}
