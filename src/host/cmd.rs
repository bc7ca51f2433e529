//! Running external programs: argv only (never a shell string made from spec values),
//! stdin from /dev/null unless fed, output kept for the error message, and stopped
//! when vmdb is interrupted.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;

use super::signals;
use crate::event::Event;
use crate::log;

/// Process group of the command running now, to be stopped on a signal.
static RUNNING: AtomicU32 = AtomicU32::new(0);

const TAIL_LINES: usize = 20;
/// Grace time between SIGTERM and SIGKILL for a command vmdb stops.
const KILL_AFTER_SECS: u64 = 5;

/// Catch SIGINT, SIGTERM and SIGHUP: note them (see `signals::interrupted`) and stop
/// the running command.
pub fn stop_commands_on_signals() -> Result<()> {
    signals::catch(|sig| {
        log::info(&format!(
            "vmdb: got signal {sig}: stopping the build and tearing down"
        ));
        let pg = RUNNING.load(Ordering::SeqCst);
        if pg > 0 {
            signals::send_group(pg, Signal::SIGTERM);
            // A program that ignores SIGTERM (a script trapping it) is killed.
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_secs(KILL_AFTER_SECS));
                if RUNNING.load(Ordering::SeqCst) == pg {
                    log::info(&format!(
                        "vmdb: the running command ignored SIGTERM for {KILL_AFTER_SECS}s: killing it"
                    ));
                    signals::send_group(pg, Signal::SIGKILL);
                }
            });
        }
    })
}

/// Where administrators' programs live (mkfs.*, grub-install, debootstrap): a user's
/// PATH often lacks them (`su` without `-`, some sudo setups).
pub const SBIN_DIRS: &[&str] = &["/usr/local/sbin", "/usr/sbin", "/sbin"];

/// The PATH vmdb looks programs up in, and the one the programs it runs get: the
/// user's, then those of the sbin directories it lacks. Validation and the runner
/// then find the same programs.
pub fn search_path() -> OsString {
    let user = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    let mut dirs: Vec<std::path::PathBuf> = std::env::split_paths(&user).collect();
    for d in SBIN_DIRS {
        if !dirs.iter().any(|x| x == Path::new(d)) {
            dirs.push(d.into());
        }
    }
    std::env::join_paths(dirs).unwrap_or(user)
}

/// Where `program` is: an executable file in `search_path()` (or the path itself,
/// when it has a '/').
pub fn find_program(program: &str) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        return executable(Path::new(program)).then(|| program.into());
    }
    std::env::split_paths(&search_path())
        .map(|d| d.join(program))
        .find(|p| executable(p))
}

/// Whether `prog` is an executable in $PATH or the sbin directories (where the
/// programs vmdb runs are looked up).
pub fn in_path(prog: &str) -> bool {
    find_program(prog).is_some()
}

/// Whether the host has what a step declared it needs (`Check::needs`): a program in
/// `search_path()`, or a file or directory named by an absolute path.
pub fn host_has(program_or_path: &str) -> bool {
    if program_or_path.starts_with('/') {
        Path::new(program_or_path).exists()
    } else {
        find_program(program_or_path).is_some()
    }
}

pub struct Cmd {
    prog: OsString,
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
    stdin: Option<Vec<u8>>,
    stdin_file: Option<std::fs::File>,
    cwd: Option<OsString>,
    clear_env: bool,
}

impl Cmd {
    pub fn new(prog: impl AsRef<OsStr>) -> Cmd {
        Cmd {
            prog: prog.as_ref().to_owned(),
            args: Vec::new(),
            envs: Vec::new(),
            stdin: None,
            stdin_file: None,
            cwd: None,
            clear_env: false,
        }
    }
    pub fn arg(mut self, a: impl AsRef<OsStr>) -> Cmd {
        self.args.push(a.as_ref().to_owned());
        self
    }
    pub fn args<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(mut self, args: I) -> Cmd {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }
    pub fn env(mut self, k: impl AsRef<OsStr>, v: impl AsRef<OsStr>) -> Cmd {
        self.envs
            .push((k.as_ref().to_owned(), v.as_ref().to_owned()));
        self
    }
    /// Start from an empty environment: the program gets only what `env` sets (and the
    /// search PATH, unless `env` sets PATH).
    pub fn env_clear(mut self) -> Cmd {
        self.clear_env = true;
        self
    }
    pub fn stdin(mut self, data: impl Into<Vec<u8>>) -> Cmd {
        self.stdin = Some(data.into());
        self
    }
    /// Read stdin from an open file (from its current position).
    pub fn stdin_file(mut self, f: std::fs::File) -> Cmd {
        self.stdin_file = Some(f);
        self
    }
    pub fn cwd(mut self, dir: impl AsRef<Path>) -> Cmd {
        self.cwd = Some(dir.as_ref().as_os_str().to_owned());
        self
    }

    /// The command line as a user could type it (for logs and errors).
    pub fn display(&self) -> String {
        std::iter::once(&self.prog)
            .chain(&self.args)
            .map(|a| {
                let s = a.to_string_lossy();
                if !s.is_empty()
                    && s.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c))
                {
                    s.into_owned()
                } else {
                    format!("'{}'", s.replace('\'', "'\\''"))
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Run to completion; returns stdout. On failure the error has the command, its exit
    /// status and the last lines of its output.
    pub fn run(&self) -> Result<String> {
        let shown = self.display();
        log::verbose(&format!("  $ {shown}"));
        log::event(Event::Command {
            step: log::current_step(),
            command: shown.clone(),
            argv: std::iter::once(&self.prog)
                .chain(&self.args)
                .map(|a| a.to_string_lossy().into_owned())
                .collect(),
        });
        let mut c = Command::new(&self.prog);
        if self.clear_env {
            c.env_clear();
        }
        if !self.envs.iter().any(|(k, _)| k == "PATH") {
            // Also where `Command` looks the program up.
            c.env("PATH", search_path());
        }
        c.args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdin(match (&self.stdin, &self.stdin_file) {
                (Some(_), _) => Stdio::piped(),
                (None, Some(f)) => f.try_clone().context("duplicating stdin")?.into(),
                (None, None) => Stdio::null(),
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so a signal can stop it and all its children.
            .process_group(0);
        if let Some(d) = &self.cwd {
            c.current_dir(d);
        }
        let mut child = c.spawn().map_err(|e| self.spawn_error(e))?;
        RUNNING.store(child.id(), Ordering::SeqCst);
        if signals::interrupted() {
            signals::send_group(child.id(), Signal::SIGTERM);
        }

        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let out_thread = {
            let tail = tail.clone();
            std::thread::spawn(move || {
                let mut all = Vec::new();
                let mut r = BufReader::new(stdout);
                let mut line = Vec::new();
                while r.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
                    note_line(&tail, &line);
                    all.extend_from_slice(&line);
                    line.clear();
                }
                all
            })
        };
        let err_thread = {
            let tail = tail.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(stderr);
                let mut line = Vec::new();
                while r.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
                    note_line(&tail, &line);
                    line.clear();
                }
            })
        };
        if let Some(data) = &self.stdin {
            let mut stdin = child.stdin.take().expect("piped");
            // A program may exit without reading all of its input; that is its business.
            let _ = stdin.write_all(data);
        }
        let status = child.wait();
        RUNNING.store(0, Ordering::SeqCst);
        let out = out_thread.join().unwrap_or_default();
        let _ = err_thread.join();
        let status = status.with_context(|| format!("waiting for {shown}"))?;
        if status.success() {
            return Ok(String::from_utf8_lossy(&out).into_owned());
        }
        let how = match (status.code(), status.signal()) {
            (Some(c), _) => format!("exit status {c}"),
            (None, Some(s)) => format!("signal {s}"),
            _ => "unknown status".to_string(),
        };
        let lines: Vec<String> = tail
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect();
        let mut msg = format!("command failed with {how}: {shown}");
        if !lines.is_empty() {
            msg.push_str("\n  last lines of its output:");
            for l in lines {
                msg.push_str("\n  | ");
                msg.push_str(&l);
            }
        }
        bail!(msg)
    }

    /// Why the program could not be started: a missing program is named as such (and
    /// only then is installing it suggested), anything else is the system's own error.
    fn spawn_error(&self, e: std::io::Error) -> anyhow::Error {
        let prog = self.prog.to_string_lossy();
        if e.kind() == std::io::ErrorKind::NotFound {
            if let Some(d) = self.cwd.as_deref().filter(|d| !Path::new(d).is_dir()) {
                return anyhow::anyhow!(
                    "cannot run {prog}: its working directory {} does not exist",
                    Path::new(d).display()
                );
            }
            return anyhow::anyhow!("cannot run {prog}: no such program (is it installed?)");
        }
        anyhow::anyhow!("cannot run {prog}: {e}")
    }
}

fn note_line(tail: &Mutex<VecDeque<String>>, raw: &[u8]) {
    let line = String::from_utf8_lossy(raw).trim_end().to_string();
    log::verbose(&format!("    {line}"));
    let mut t = tail.lock().unwrap_or_else(|e| e.into_inner());
    if t.len() == TAIL_LINES {
        t.pop_front();
    }
    t.push_back(line);
}

/// Read a small text file, with the path in the error.
pub fn read_to_string(path: &Path) -> Result<String> {
    let mut s = String::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_string(&mut s))
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_stdout() {
        assert_eq!(Cmd::new("echo").arg("hi").run().unwrap(), "hi\n");
    }

    #[test]
    fn failure_names_command_status_and_output_tail() {
        let e = Cmd::new("sh")
            .args(["-c", "echo one; echo two >&2; exit 3"])
            .run()
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("command failed with exit status 3: sh -c"),
            "{e}"
        );
        assert!(e.contains("| one") && e.contains("| two"), "{e}");
    }

    #[test]
    fn a_signal_is_named() {
        let e = Cmd::new("sh")
            .args(["-c", "echo stopping >&2; kill -TERM $$"])
            .run()
            .unwrap_err();
        assert_eq!(
            format!("{e:#}"),
            "command failed with signal 15: sh -c 'echo stopping >&2; kill -TERM $$'\n  \
             last lines of its output:\n  | stopping"
        );
    }

    #[test]
    fn feeds_stdin_and_quotes_for_display() {
        let c = Cmd::new("cat").stdin("data").arg("-");
        assert_eq!(c.run().unwrap(), "data");
        assert_eq!(
            Cmd::new("echo").arg("a b").arg("it's").display(),
            "echo 'a b' 'it'\\''s'"
        );
    }

    #[test]
    fn missing_program_is_clear() {
        let e = Cmd::new("no-such-program-vmdb").run().unwrap_err();
        assert_eq!(
            format!("{e:#}"),
            "cannot run no-such-program-vmdb: no such program (is it installed?)"
        );
    }

    #[test]
    fn only_a_missing_program_is_called_missing() {
        let d = tempfile::tempdir().unwrap();
        // A program that exists but cannot be executed (no x bit).
        let f = d.path().join("not-executable");
        std::fs::write(&f, "#!/bin/sh\n").unwrap();
        let e = Cmd::new(&f).run().unwrap_err();
        assert_eq!(
            format!("{e:#}"),
            format!(
                "cannot run {}: Permission denied (os error 13)",
                f.display()
            )
        );
        // A working directory that is gone is not a missing program.
        let e = Cmd::new("true")
            .cwd(d.path().join("gone"))
            .run()
            .unwrap_err();
        assert_eq!(
            format!("{e:#}"),
            format!(
                "cannot run true: its working directory {} does not exist",
                d.path().join("gone").display()
            )
        );
    }

    #[test]
    fn programs_get_and_are_found_on_the_search_path() {
        let path = search_path();
        let dirs: Vec<_> = std::env::split_paths(&path).collect();
        for d in SBIN_DIRS {
            assert!(dirs.iter().any(|x| x == Path::new(d)), "{d} in {path:?}");
        }
        let got = Cmd::new("sh")
            .args(["-c", "printf %s \"$PATH\""])
            .run()
            .unwrap();
        assert_eq!(got, path.to_string_lossy());
        assert!(find_program("sh").is_some());
        assert_eq!(find_program("no-such-program-vmdb"), None);
        assert_eq!(find_program("/bin/sh"), Some("/bin/sh".into()));
    }

    #[test]
    fn env_clear_passes_only_what_is_set() {
        let out = Cmd::new("/usr/bin/env")
            .env_clear()
            .env("ONLY", "this")
            .run()
            .unwrap();
        // And the search path, unless PATH is set.
        assert_eq!(
            out,
            format!("ONLY=this\nPATH={}\n", search_path().to_string_lossy())
        );
        let out = Cmd::new("/usr/bin/env")
            .env_clear()
            .env("PATH", "/nowhere")
            .run()
            .unwrap();
        assert_eq!(out, "PATH=/nowhere\n");
    }
}
