//! Killing a build half-way: with SIGKILL (of vmdb, or of the build process that is init
//! of its PID namespace) nothing may be left: no loop device, no mount, no process, no
//! scratch directory. With SIGTERM and SIGINT vmdb tears down in order, exits 1 and
//! removes the image.
//!
//! Each test sleeps for its own number of seconds, so that the `sleep` processes of one
//! test are told apart from those of the others running at the same time. Each build gets
//! its own TMPDIR, where vmdb makes its scratch directory and mount points.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use common::*;

const STEPS: &[&str] = &[
    "mkimg", "mklabel", "mkpart", "kpartx", "mkfs", "mount", "shell",
];

fn spec(secs: u32) -> String {
    spec_with(secs, "")
}

/// The spec, with `prefix` put before the shell step's sleeps.
fn spec_with(secs: u32, prefix: &str) -> String {
    format!(
        r#"steps:
  - mkimg: "{{{{ output }}}}"
    size: 64M
  - mklabel: msdos
    device: "{{{{ output }}}}"
  - mkpart: primary
    device: "{{{{ output }}}}"
    start: 0%
    end: 100%
    tag: root
  - kpartx: "{{{{ output }}}}"
  - mkfs: ext4
    partition: root
  - mount: root
  - shell: "{prefix}cd $ROOT; sleep {secs} & sleep {secs}"
    root-fs: root
"#
    )
}

struct Build {
    child: Child,
    /// The output directory: nothing else is in it.
    out_dir: tempfile::TempDir,
    /// Spec and vmdb's stderr.
    work: tempfile::TempDir,
    /// vmdb's TMPDIR.
    tmp: PathBuf,
    secs: u32,
}

impl Build {
    fn stderr(&self) -> String {
        std::fs::read_to_string(self.work.path().join("stderr")).unwrap_or_default()
    }
    fn out(&self) -> PathBuf {
        self.out_dir.path().join("out.img")
    }
    fn partial(&self) -> PathBuf {
        self.out_dir
            .path()
            .join(format!(".out.img.vmdb-partial-{}", self.child.id()))
    }
}

/// Start a build whose last step sleeps `secs` seconds twice, and wait until both
/// sleeps run.
fn start(secs: u32) -> Build {
    start_spec(secs, &spec(secs))
}

fn start_spec(secs: u32, spec_text: &str) -> Build {
    let out_dir = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let spec = write(work.path(), "spec.vmdb", spec_text);
    let err = std::fs::File::create(work.path().join("stderr")).unwrap();
    let tmp = work.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    // Its own process group, as a command started from a shell is.
    let child = std::os::unix::process::CommandExt::process_group(&mut vmdb(), 0)
        .env("TMPDIR", &tmp)
        .args([
            &*spec.to_string_lossy(),
            "--output",
            &out_dir.path().join("out.img").to_string_lossy(),
            "-v",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()
        .unwrap();
    let b = Build {
        child,
        out_dir,
        work,
        tmp,
        secs,
    };
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        // The last step (of 7, or more in a spec with more steps).
        let started = b
            .stderr()
            .lines()
            .any(|l| l.starts_with('[') && l.contains("] shell: "));
        if started && sleeps(secs).len() == 2 {
            break;
        }
        assert!(
            Instant::now() < end,
            "the shell step did not start:\n{}",
            b.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        b.partial().exists(),
        "the image is built as {:?}",
        b.partial()
    );
    // What must vanish can be seen: the disk's and the partition's loop devices (the
    // disk's gives the partition its vmdb2 name, /dev/mapper/loopNp1) from the host, the
    // mount in the build's mount namespace (through its processes).
    assert_eq!(loops_below(b.out_dir.path()).len(), 2, "{}", b.stderr());
    assert_eq!(mounts_anywhere(&b.tmp).len(), 1, "{}", b.stderr());
    b
}

fn procs() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// PIDs of processes running `sleep SECS`.
fn sleeps(secs: u32) -> Vec<u32> {
    let want = format!("sleep\0{secs}\0");
    procs()
        .into_iter()
        .filter(|&pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| c == want.as_bytes())
                .unwrap_or(false)
        })
        .collect()
}

/// Mount points below `dir` in the mount namespace of any process (source and target).
fn mounts_anywhere(dir: &Path) -> Vec<String> {
    let dir = format!("{}/", dir.display());
    let mut v: Vec<String> = procs()
        .into_iter()
        .flat_map(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| {
                    let target = l.split(' ').nth(4)?;
                    let source = l.split(" - ").nth(1)?.split(' ').nth(1)?;
                    target
                        .starts_with(&dir)
                        .then(|| format!("{source} on {target}"))
                })
                .collect::<Vec<_>>()
        })
        .collect();
    v.sort();
    v.dedup();
    v
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // pid (comm) state ppid ...: comm may hold spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(1)?.parse().ok()
}

/// The build process: vmdb's only child (init of the build's PID namespace).
fn build_process(vmdb: u32) -> u32 {
    let kids: Vec<u32> = procs()
        .into_iter()
        .filter(|&p| parent_of(p) == Some(vmdb))
        .collect();
    assert_eq!(kids.len(), 1, "vmdb {vmdb} has children {kids:?}");
    kids[0]
}

fn signal(pid: u32, sig: Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).unwrap();
}

/// Wait up to `limit` seconds after `t0` until no loop device of the build is left (host
/// view), no mount of it in any process's view (host or build), and no sleep; returns how
/// long that took.
fn wait_all_gone(b: &Build, t0: Instant, limit: u64) -> Duration {
    let end = t0 + Duration::from_secs(limit);
    let dir = b.out_dir.path();
    loop {
        let (l, s) = (loops_below(dir), sleeps(b.secs));
        let mut m = mounts_involving(dir);
        m.extend(mounts_involving(&b.tmp));
        m.extend(mounts_anywhere(&b.tmp));
        if l.is_empty() && m.is_empty() && s.is_empty() {
            return t0.elapsed();
        }
        if Instant::now() > end {
            // Do not leave the sleeps of a failed test running.
            for p in &s {
                let _ =
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(*p as i32), Signal::SIGKILL);
            }
            panic!(
                "{limit}s after the kill, left behind: loops {l:?} mounts {m:?} sleep processes {s:?}\n{}",
                b.stderr()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn wait_exit(b: &mut Build, limit: u64) -> std::process::ExitStatus {
    let end = Instant::now() + Duration::from_secs(limit);
    loop {
        if let Some(s) = b.child.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > end {
            let _ = b.child.kill();
            panic!("vmdb did not exit within {limit}s:\n{}", b.stderr());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// vmdb's scratch directories (with their mount points) must not outlive the build.
fn assert_no_scratch_left(b: &Build) {
    let left: Vec<String> = walk(&b.tmp)
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    assert!(
        left.is_empty(),
        "scratch directories left in vmdb's TMPDIR: {left:?}"
    );
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        v.push(e.path());
        if e.file_type().unwrap().is_dir() {
            v.extend(walk(&e.path()));
        }
    }
    v.sort();
    v
}

#[test]
fn sigkill_of_vmdb_leaves_nothing_running_or_attached() {
    need_root!();
    let mut b = start(300);
    let t0 = Instant::now();
    signal(b.child.id(), Signal::SIGKILL);
    let status = wait_exit(&mut b, 5);
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );
    let took = wait_all_gone(&b, t0, 5);
    eprintln!(
        "SIGKILL of vmdb: loops, mounts and processes gone {:.3}s after the kill",
        took.as_secs_f64()
    );

    // vmdb had no chance to remove its partial image; the next build removes it (any
    // build: one of another test may have done so already).
    let partial = b.partial();
    let left = listing(b.out_dir.path());
    assert!(
        left.is_empty() || left == [partial.file_name().unwrap().to_string_lossy()],
        "{left:?}"
    );
    next_build_removes_what_was_left(&b, &b.out());
}

/// A build of a trivial spec to `output` succeeds and removes what the killed build `b`
/// left: nothing of it stays in its output directory or scratch space.
fn next_build_removes_what_was_left(b: &Build, output: &Path) {
    let next = write(b.work.path(), "next.vmdb", "steps:\n  - echo: hello\n");
    let r = to_run(
        vmdb()
            .env("TMPDIR", &b.tmp)
            .args([
                &*next.to_string_lossy(),
                "--output",
                &output.to_string_lossy(),
            ])
            .output()
            .unwrap(),
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        listing(b.out_dir.path()).is_empty(),
        "{:?}",
        listing(b.out_dir.path())
    );
    assert_no_scratch_left(b);
}

#[test]
fn sigkill_of_vmdb_leaves_no_second_disk_behind() {
    need_root!();
    let text = spec(309).replacen(
        "  - mklabel:",
        "  - mkimg: \"{{ output }}.data\"\n    size: 8M\n  - mklabel:",
        1,
    );
    let mut b = start_spec(309, &text);
    let data = PathBuf::from(format!("{}.data", b.partial().display()));
    assert!(data.exists(), "the second disk is built as {data:?}");
    let t0 = Instant::now();
    signal(b.child.id(), Signal::SIGKILL);
    wait_exit(&mut b, 5);
    wait_all_gone(&b, t0, 5);
    // Left for the next build (of anything, anywhere) to remove, never under its
    // final name.
    let left = listing(b.out_dir.path());
    assert!(
        left.iter().all(|n| n.starts_with(".out.img.vmdb-partial-")),
        "{left:?}"
    );
    next_build_removes_what_was_left(&b, &b.work.path().join("other.img"));
}

#[test]
fn sigkill_of_the_build_process_leaves_nothing_and_vmdb_fails() {
    need_root!();
    let mut b = start(301);
    let build = build_process(b.child.id());
    let t0 = Instant::now();
    signal(build, Signal::SIGKILL);
    let status = wait_exit(&mut b, 5);
    let exited = t0.elapsed();
    let took = wait_all_gone(&b, t0, 5);
    eprintln!(
        "SIGKILL of the build process: vmdb exited after {:.3}s; loops, mounts and processes gone {:.3}s after the kill",
        exited.as_secs_f64(),
        took.as_secs_f64()
    );
    let err = b.stderr();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.lines()
            .any(|l| l == "vmdb: the build process was killed by SIGKILL"),
        "{err}"
    );
    assert!(
        !err.contains("teardown ["),
        "nothing could tear down: {err}"
    );
    assert!(
        listing(b.out_dir.path()).is_empty(),
        "{:?}",
        listing(b.out_dir.path())
    );
    assert_no_scratch_left(&b);
}

/// SIGTERM or SIGINT: vmdb stops the shell step, tears down every step in reverse, exits
/// 1 and removes the image.
/// With `group`, the signal goes to vmdb's whole process group, as the terminal sends
/// SIGINT on Ctrl-C: the build process gets it too.
fn interrupt(sig: Signal, secs: u32, group: bool) {
    let mut b = start(secs);
    let t0 = Instant::now();
    let pid = b.child.id() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(if group { -pid } else { pid }),
        sig,
    )
    .unwrap();
    let status = wait_exit(&mut b, 5);
    let exited = t0.elapsed();
    let took = wait_all_gone(&b, t0, 5);
    eprintln!(
        "{sig:?} to vmdb{}: exited after {:.3}s; loops, mounts and processes gone {:.3}s after the signal",
        if group { "'s process group" } else { "" },
        exited.as_secs_f64(),
        took.as_secs_f64()
    );
    let err = b.stderr();
    assert_eq!(status.code(), Some(1), "{err}");
    // vmdb passes any of these signals on to the build as SIGTERM (15); the build
    // process may get the signal itself too.
    let got: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("vmdb: got signal"))
        .collect();
    let line = |n: i32| format!("vmdb: got signal {n}: stopping the build and tearing down");
    assert!(got.contains(&line(15).as_str()), "{err}");
    if group {
        assert!(got.contains(&line(sig as i32).as_str()), "{err}");
    } else {
        assert_eq!(got.len(), 1, "{err}");
    }
    let teardown: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("teardown ["))
        .collect();
    let want: Vec<String> = (1..=STEPS.len())
        .rev()
        .map(|k| format!("teardown [{k}/{}] {}", STEPS.len(), STEPS[k - 1]))
        .collect();
    assert_eq!(teardown, want, "{err}");
    let errors: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("vmdb: error:"))
        .collect();
    assert_eq!(errors.len(), 1, "{err}");
    assert!(
        errors[0].starts_with("vmdb: error: step 7 (shell) at line 15 failed after ")
            && errors[0].ends_with(&format!(
                "s: command failed with signal 15: sh -ec 'cd $ROOT; sleep {secs} & sleep {secs}'"
            )),
        "{err}"
    );
    assert!(
        err.lines()
            .any(|l| l == "vmdb: build failed; everything was torn down"),
        "{err}"
    );
    assert!(
        listing(b.out_dir.path()).is_empty(),
        "{:?}",
        listing(b.out_dir.path())
    );
    assert_no_scratch_left(&b);
}

#[test]
fn sigterm_tears_down_and_removes_the_image() {
    need_root!();
    interrupt(Signal::SIGTERM, 302, false);
}

#[test]
fn sigint_tears_down_and_removes_the_image() {
    need_root!();
    interrupt(Signal::SIGINT, 303, false);
}

#[test]
fn ctrl_c_tears_down_and_removes_the_image() {
    need_root!();
    interrupt(Signal::SIGINT, 304, true);
}

#[test]
fn a_command_that_ignores_sigterm_is_killed() {
    need_root!();
    // The shell and its sleeps ignore SIGTERM; vmdb kills them after its grace time.
    let secs = 305;
    let mut b = start_spec(secs, &spec_with(secs, "trap '' TERM; "));
    let t0 = Instant::now();
    signal(b.child.id(), Signal::SIGTERM);
    let status = wait_exit(&mut b, 15);
    let exited = t0.elapsed();
    let took = wait_all_gone(&b, t0, 15);
    eprintln!(
        "SIGTERM ignored by the command: vmdb exited after {:.3}s, all gone after {:.3}s",
        exited.as_secs_f64(),
        took.as_secs_f64()
    );
    let err = b.stderr();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        exited >= Duration::from_secs(5),
        "the grace time is 5 s: {exited:?}"
    );
    assert!(
        err.lines()
            .any(|l| l == "vmdb: the running command ignored SIGTERM for 5s: killing it"),
        "{err}"
    );
    assert!(err.contains("command failed with signal 9"), "{err}");
    assert!(
        listing(b.out_dir.path()).is_empty(),
        "{:?}",
        listing(b.out_dir.path())
    );
    assert_no_scratch_left(&b);
}

#[test]
fn sigterm_tears_down_even_when_stderr_is_gone() {
    need_root!();
    // vmdb's reader went away (a CI runner killed, a closed pipe): the progress lines it
    // writes while tearing down must not stop the teardown.
    let out_dir = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let started = work.path().join("started");
    let text = spec(306).replace(
        "cd $ROOT; ",
        &format!("touch {}; cd $ROOT; ", started.display()),
    );
    let spec_file = write(work.path(), "spec.vmdb", &text);
    let mut child = vmdb()
        .args([
            &*spec_file.to_string_lossy(),
            "--output",
            &out_dir.path().join("out.img").to_string_lossy(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Close our ends of its stdout and stderr.
    drop(child.stdout.take());
    drop(child.stderr.take());
    let end = Instant::now() + Duration::from_secs(60);
    while !started.exists() {
        assert!(Instant::now() < end, "the shell step did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    signal(child.id(), Signal::SIGTERM);
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "vmdb did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(1));
    wait_clean(out_dir.path(), 5).unwrap();
    assert!(
        listing(out_dir.path()).is_empty(),
        "{:?}",
        listing(out_dir.path())
    );
    assert!(sleeps(306).is_empty());
}

// Signals at every moment of a small build: an interrupted build fails (exit 1), leaves
// the older image at the output as it was and no temporary file; only a build that
// was complete before the signal mattered succeeds, with its new image in place.

const SMALL: &str = r#"steps:
  - mkimg: "{{ output }}"
    size: 32M
  - mklabel: msdos
    device: "{{ output }}"
  - mkpart: primary
    device: "{{ output }}"
    start: 0%
    end: 100%
    tag: root
  - kpartx: "{{ output }}"
  - mkfs: ext4
    partition: root
  - mount: root
  - create-file: /hello
    contents: hello
"#;

const OLD: &str = "an older image\n";

struct Small {
    work: tempfile::TempDir,
    out_dir: tempfile::TempDir,
}

impl Small {
    fn new() -> Small {
        let s = Small {
            work: tempfile::tempdir().unwrap(),
            out_dir: tempfile::tempdir().unwrap(),
        };
        write(s.work.path(), "s.vmdb", SMALL);
        std::fs::create_dir(s.tmp()).unwrap();
        s.reset();
        s
    }
    fn tmp(&self) -> PathBuf {
        self.work.path().join("tmp")
    }
    fn out(&self) -> PathBuf {
        self.out_dir.path().join("x.img")
    }
    /// Only the older image at the output.
    fn reset(&self) {
        let _ = std::fs::remove_file(self.out_dir.path().join("x.img.sha256"));
        std::fs::write(self.out(), OLD).unwrap();
    }
    /// vmdb building it with --checksums (a finish phase), its standard error read
    /// line by line as it comes.
    fn spawn(&self, verbose: bool) -> Watched {
        let mut c = vmdb();
        std::os::unix::process::CommandExt::process_group(&mut c, 0);
        c.env("TMPDIR", self.tmp()).args([
            &*self.work.path().join("s.vmdb").to_string_lossy(),
            "--output",
            &self.out().to_string_lossy(),
            "--checksums",
        ]);
        if verbose {
            c.arg("-v");
        }
        let mut child = c
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let err = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            use std::io::BufRead;
            let mut all = Vec::new();
            for line in std::io::BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line.clone());
                all.push(line);
            }
            all.join("\n")
        });
        Watched { child, rx, reader }
    }

    /// Check what vmdb left after exiting with `code`; true if the build was
    /// interrupted (failed).
    fn check(&self, code: Option<i32>, err: &str, what: &str) -> bool {
        wait_clean(self.out_dir.path(), 5).unwrap_or_else(|e| panic!("{what}: {e}\n{err}"));
        assert_eq!(
            walk(&self.tmp()),
            Vec::<PathBuf>::new(),
            "{what}: scratch left\n{err}"
        );
        let listed = listing(self.out_dir.path());
        if code == Some(0) {
            assert_eq!(listed, ["x.img", "x.img.sha256"], "{what}: {err}");
            assert_eq!(
                std::fs::metadata(self.out()).unwrap().len(),
                32 << 20,
                "{what}: {err}"
            );
            let o = std::process::Command::new("sha256sum")
                .args(["-c", "x.img.sha256"])
                .current_dir(self.out_dir.path())
                .output()
                .unwrap();
            assert!(o.status.success(), "{what}: {err}");
            assert!(
                err.lines().any(|l| l.starts_with("vmdb: built ")),
                "{what}: {err}"
            );
            self.reset();
            false
        } else {
            assert_ne!(code, None, "{what}: vmdb must not die of the signal: {err}");
            assert_eq!(listed, ["x.img"], "{what}: {err}");
            assert_eq!(
                std::fs::read_to_string(self.out()).unwrap(),
                OLD,
                "{what}: the older image was touched\n{err}"
            );
            assert!(
                !err.lines().any(|l| l.starts_with("vmdb: built ")),
                "{what}: {err}"
            );
            true
        }
    }
}

struct Watched {
    child: Child,
    rx: std::sync::mpsc::Receiver<String>,
    reader: std::thread::JoinHandle<String>,
}

impl Watched {
    /// Wait for a line starting with `prefix`; false if vmdb ended first.
    fn wait_line(&self, prefix: &str) -> bool {
        let end = Instant::now() + Duration::from_secs(60);
        while Instant::now() < end {
            match self.rx.recv_timeout(Duration::from_secs(1)) {
                Ok(l) if l.starts_with(prefix) => return true,
                Ok(_) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(_) => return false,
            }
        }
        panic!("no line starting with {prefix:?} within 60s");
    }

    /// Wait for vmdb to exit; its exit code (None if a signal ended it) and stderr.
    fn finish(mut self) -> (Option<i32>, String) {
        let end = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > end {
                let _ = self.child.kill();
                panic!("vmdb did not exit within 60s");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        (status.code(), self.reader.join().unwrap())
    }
}

fn state_of(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 2..].chars().next()
}

#[test]
fn a_signal_while_tearing_down_or_handing_over_fails_the_build() {
    need_root!();
    let s = Small::new();
    // Each line is printed just before the phase it names: the signal lands in it.
    for (line, sig) in [
        ("teardown [7/7] create-file", Signal::SIGTERM),
        ("teardown [6/7] mount", Signal::SIGINT),
        ("teardown [1/7] mkimg", Signal::SIGTERM),
        ("handing over the outputs", Signal::SIGHUP),
    ] {
        let w = s.spawn(true);
        assert!(w.wait_line(line), "no {line:?}");
        signal(w.child.id(), sig);
        let (code, err) = w.finish();
        assert_eq!(code, Some(1), "{sig:?} at {line:?}: {err}");
        assert!(s.check(code, &err, &format!("{sig:?} at {line:?}")));
        assert!(
            err.lines()
                .any(|l| l == "vmdb: error: interrupted while tearing down"
                    || l == "vmdb: error: interrupted while handing over the outputs"
                    || l.starts_with("vmdb: error: teardown of step")
                    || l.starts_with("vmdb: error: handing over the outputs")),
            "{sig:?} at {line:?}: {err}"
        );
    }
}

#[test]
fn a_signal_after_the_build_process_ended_fails_the_build() {
    need_root!();
    let s = Small::new();
    // vmdb is stopped while the build runs; the build ends; the signal comes before
    // vmdb (continued) could put the image in place.
    let w = s.spawn(true);
    assert!(w.wait_line("[7/7] create-file"));
    let vmdb_pid = w.child.id();
    let build = build_process(vmdb_pid);
    signal(vmdb_pid, Signal::SIGSTOP);
    let end = Instant::now() + Duration::from_secs(30);
    while state_of(build) != Some('Z') {
        assert!(Instant::now() < end, "the build process did not end");
        std::thread::sleep(Duration::from_millis(5));
    }
    signal(vmdb_pid, Signal::SIGTERM);
    signal(vmdb_pid, Signal::SIGCONT);
    let (code, err) = w.finish();
    assert_eq!(code, Some(1), "{err}");
    assert!(s.check(code, &err, "signal after the build process ended"));
    assert!(
        err.lines()
            .any(|l| l
                == "vmdb: interrupted by signal 15 as the build ended: its outputs are removed"),
        "{err}"
    );
}

#[test]
fn a_signal_at_any_moment_fails_the_build() {
    need_root!();
    let s = Small::new();
    let t0 = Instant::now();
    let (code, err) = s.spawn(false).finish();
    let whole = t0.elapsed();
    assert!(!s.check(code, &err, "no signal"), "{err}");
    let steps = 24;
    let mut interrupted = 0;
    for k in 0..steps {
        let delay = whole * k / 20;
        let sig = if k % 2 == 0 {
            Signal::SIGTERM
        } else {
            Signal::SIGINT
        };
        let w = s.spawn(false);
        std::thread::sleep(delay);
        // The signal may come after vmdb exited.
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(w.child.id() as i32), sig);
        let (code, err) = w.finish();
        let what = format!(
            "{sig:?} after {:.3}s of {:.3}s",
            delay.as_secs_f64(),
            whole.as_secs_f64()
        );
        match code {
            Some(0) | Some(1) => {}
            // Before vmdb caught signals (while it read the spec): nothing was made.
            None => {
                assert_eq!(listing(s.out_dir.path()), ["x.img"], "{what}");
                assert_eq!(std::fs::read_to_string(s.out()).unwrap(), OLD, "{what}");
                interrupted += 1;
                continue;
            }
            Some(c) => panic!("{what}: exit status {c}: {err}"),
        }
        if s.check(code, &err, &what) {
            interrupted += 1;
        }
    }
    eprintln!("{interrupted} of {steps} builds interrupted");
    assert!(
        interrupted >= 5,
        "only {interrupted} builds were interrupted"
    );
}

#[test]
fn a_second_build_to_the_same_output_is_refused() {
    need_root!();
    let mut b = start(307);
    let before = listing(b.out_dir.path());
    // The same output, spelled through a symlinked directory.
    let link = b.work.path().join("link");
    std::os::unix::fs::symlink(b.out_dir.path(), &link).unwrap();
    let other = link.join("out.img");
    let spec = write(b.work.path(), "other.vmdb", SMALL);
    let r = run(&[
        &spec.to_string_lossy(),
        "--output",
        &other.to_string_lossy(),
    ]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert_eq!(
        r.stderr,
        format!(
            "vmdb: another vmdb (PID {}) is building {}: wait for it to finish, or stop it\n",
            b.child.id(),
            other.display()
        )
    );
    // The first build's files are as they were, and it goes on.
    assert_eq!(listing(b.out_dir.path()), before);
    assert!(b.child.try_wait().unwrap().is_none());
    assert_eq!(sleeps(307).len(), 2);
    signal(b.child.id(), Signal::SIGTERM);
    let status = wait_exit(&mut b, 10);
    assert_eq!(status.code(), Some(1), "{}", b.stderr());
    wait_all_gone(&b, Instant::now(), 5);
    // Once it is over, the output can be built again.
    let r = run(&[
        &spec.to_string_lossy(),
        "--output",
        &other.to_string_lossy(),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(listing(b.out_dir.path()), ["out.img"]);
}

/// A build that packs a rootfs tarball slowly enough to be killed while it does.
const SLOW_PACK: &str = r#"steps:
  - mkimg: "{{ output }}"
    size: 256M
  - mklabel: msdos
    device: "{{ output }}"
  - mkpart: primary
    device: "{{ output }}"
    start: 0%
    end: 100%
    tag: root
  - kpartx: "{{ output }}"
  - mkfs: ext4
    partition: root
  - mount: root
  - shell: head -c 100000000 /dev/urandom > $ROOT/noise
    root-fs: root
  - cache-rootfs: root
"#;

#[test]
fn what_killed_builds_left_is_removed_by_the_next_build_of_anything() {
    need_root!();
    // Build 1: killed while its shell step runs.
    let mut one = start(308);
    // Build 2: killed while it packs its rootfs tarball.
    let two_dir = tempfile::tempdir().unwrap();
    let two_tmp = two_dir.path().join("tmp");
    let tar_dir = two_dir.path().join("tarballs");
    for d in [&two_tmp, &tar_dir] {
        std::fs::create_dir(d).unwrap();
    }
    let two_out = two_dir.path().join("out");
    std::fs::create_dir(&two_out).unwrap();
    let spec2 = write(two_dir.path(), "slow.vmdb", SLOW_PACK);
    let err2 = std::fs::File::create(two_dir.path().join("stderr")).unwrap();
    let mut two = std::os::unix::process::CommandExt::process_group(&mut vmdb(), 0)
        .env("TMPDIR", &two_tmp)
        .args([
            &*spec2.to_string_lossy(),
            "--output",
            &two_out.join("two.img").to_string_lossy(),
            "--rootfs-tarball",
            &tar_dir.join("root.tar.xz").to_string_lossy(),
            "--no-cache",
            "-v",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err2)
        .spawn()
        .unwrap();
    let stderr2 = || std::fs::read_to_string(two_dir.path().join("stderr")).unwrap_or_default();
    let end = Instant::now() + Duration::from_secs(120);
    while !stderr2().contains("--file=") {
        assert!(Instant::now() < end, "tar did not start:\n{}", stderr2());
        assert!(two.try_wait().unwrap().is_none(), "{}", stderr2());
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        two.try_wait().unwrap().is_none(),
        "packed too fast:\n{}",
        stderr2()
    );
    let left_by_two = listing(&tar_dir);
    assert_eq!(left_by_two.len(), 1, "{left_by_two:?}");
    assert!(
        !left_by_two[0].starts_with("root.tar.xz"),
        "{left_by_two:?}"
    );

    signal(one.child.id(), Signal::SIGKILL);
    signal(two.id(), Signal::SIGKILL);
    wait_exit(&mut one, 5);
    let _ = two.wait();
    wait_all_gone(&one, Instant::now(), 5);
    wait_clean(two_dir.path(), 5).unwrap();

    // A third build of another spec to another output, with the default TMPDIR.
    let third_dir = tempfile::tempdir().unwrap();
    let third = write(third_dir.path(), "third.vmdb", "steps:\n  - echo: hello\n");
    let third_img = third_dir.path().join("third.img");
    let r = run(&[
        &third.to_string_lossy(),
        "--output",
        &third_img.to_string_lossy(),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // A spec that makes no image succeeds, and says so.
    let done = r.stderr.lines().last().unwrap_or_default();
    assert!(
        done.starts_with("vmdb: done in ")
            && done.ends_with(&format!(
                "s; the spec made no image, so nothing was written to {}",
                third_img.display()
            )),
        "{}",
        r.stderr
    );
    assert_eq!(listing(third_dir.path()), ["third.vmdb"]);
    assert_eq!(listing(one.out_dir.path()), Vec::<String>::new());
    assert_eq!(listing(&two_out), Vec::<String>::new());
    assert_eq!(listing(&tar_dir), Vec::<String>::new());
    assert_no_scratch_left(&one);
    assert_eq!(walk(&two_tmp), Vec::<PathBuf>::new());
}
