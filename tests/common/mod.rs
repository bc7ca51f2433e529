//! Shared helpers for the integration tests: run the vmdb binary and look at the host
//! with the system's own tools.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The vmdb binary, with the test run's own caches (never the machine's
/// /var/cache/vmdb): the end-to-end tests share their package downloads and image trees.
pub fn vmdb() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vmdb"));
    c.env("VMDB_CACHE_DIR", test_cache_dir());
    c
}

pub fn test_cache_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cache")
}

/// A new cache directory `parent/name` with an empty step cache and the test run's
/// shared package cache: a build with it runs every step (a cold build), without
/// downloading again what earlier builds downloaded.
pub fn cold_cache_dir(parent: &Path, name: &str) -> PathBuf {
    let dir = parent.join(name);
    std::fs::create_dir(&dir).unwrap();
    let debs = test_cache_dir().join("debs");
    std::fs::create_dir_all(&debs).unwrap();
    std::os::unix::fs::symlink(&debs, dir.join("debs")).unwrap();
    dir
}

/// A new directory `parent/host-tmp` for vmdb's TMPDIR: a directory of the host the
/// image does not have, as CI systems set one. Nothing of the host's environment may
/// reach the programs run in the image (a package's postinst ran `mktemp` in it).
pub fn host_tmpdir(parent: &Path) -> PathBuf {
    let dir = parent.join("host-tmp");
    std::fs::create_dir(&dir).unwrap();
    dir
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

pub fn run(args: &[&str]) -> Run {
    to_run(vmdb().args(args).output().expect("running vmdb"))
}

pub fn to_run(o: Output) -> Run {
    Run {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Skip (with a note) unless root: CI runs as root, so these always run there.
#[macro_export]
macro_rules! need_root {
    () => {
        if !common::is_root() {
            eprintln!("skipped: needs root");
            return;
        }
    };
}

/// A system tool's output; panics with its stderr on failure.
pub fn tool(prog: &str, args: &[&str]) -> String {
    let o = Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{prog}: {e}"));
    assert!(
        o.status.success(),
        "{prog} {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Loop devices whose backing file is below `dir` (from the host's view).
pub fn loops_below(dir: &Path) -> Vec<String> {
    let out = Command::new("losetup")
        .args(["-l", "-n", "-O", "NAME,BACK-FILE"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&*dir.to_string_lossy()))
        .map(str::to_string)
        .collect()
}

/// Mounts on the host whose source is a loop device backed by a file below `dir`, or
/// whose target is below `dir`.
pub fn mounts_involving(dir: &Path) -> Vec<String> {
    let loops: Vec<String> = loops_below(dir)
        .iter()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let src = l
                .split(" - ")
                .nth(1)
                .and_then(|r| r.split(' ').nth(1))
                .unwrap_or("");
            f.get(4)
                .map(|t| t.starts_with(&*dir.to_string_lossy()))
                .unwrap_or(false)
                || loops.iter().any(|d| d == src)
        })
        .map(str::to_string)
        .collect()
}

/// Wait up to `secs` for no loop device or mount of `dir` to be left.
pub fn wait_clean(dir: &Path, secs: u64) -> Result<(), String> {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        let (l, m) = (loops_below(dir), mounts_involving(dir));
        if l.is_empty() && m.is_empty() {
            return Ok(());
        }
        if std::time::Instant::now() > end {
            return Err(format!("left behind: loops {l:?} mounts {m:?}"));
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// Files in `dir` (names only), sorted.
pub fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Copy one partition out of an image (start and size in 512-byte sectors).
pub fn extract(img: &Path, start: u64, size: u64, out: &Path) {
    tool(
        "dd",
        &[
            &format!("if={}", img.display()),
            &format!("of={}", out.display()),
            "bs=512",
            &format!("skip={start}"),
            &format!("count={size}"),
            "conv=sparse",
            "status=none",
        ],
    );
}

/// The last `n` lines of `text` (a console log's tail for a failure message).
pub fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
