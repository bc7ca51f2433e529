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
        let started = b.stderr().lines().any(|l| l.starts_with("[7/7] shell"));
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
    // What must vanish can be seen: the partition's loop device from the host, the mount
    // in the build's mount namespace (through its processes).
    assert_eq!(loops_below(b.out_dir.path()).len(), 1, "{}", b.stderr());
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

    // vmdb had no chance to remove its partial image; the next build to the same output
    // removes it, as its PID is gone.
    let partial = b.partial();
    assert_eq!(
        listing(b.out_dir.path()),
        [partial.file_name().unwrap().to_string_lossy()]
    );
    let next = write(b.work.path(), "next.vmdb", "steps:\n  - echo: hello\n");
    let r = to_run(
        vmdb()
            .env("TMPDIR", &b.tmp)
            .args([
                &*next.to_string_lossy(),
                "--output",
                &b.out().to_string_lossy(),
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
    assert_no_scratch_left(&b);
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
