//! A corpus of bad specs (tests/bad-specs/*.vmdb), each with the exact messages vmdb must
//! print for it in its leading `# expect:` comment lines. Every one must be refused before
//! anything runs: exit status 2, exactly the expected `file:line:col:` lines, nothing made
//! in the output directory, no loop device and no mount.
//!
//! vmdb is run in the corpus directory with the spec's bare file name, so messages name it
//! as it is written in the `# expect:` lines. A message that names the image being built
//! shows its final name (not the temporary one it is built under); the test writes that
//! as `$OUTPUT`.

mod common;

use std::path::{Path, PathBuf};

use common::*;

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bad-specs")
}

fn corpus() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(corpus_dir())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "vmdb"))
        .collect();
    v.sort();
    v
}

/// The `# expect:` lines among the spec's leading comment lines.
fn expected(text: &str) -> Vec<String> {
    text.lines()
        .take_while(|l| l.starts_with('#'))
        .filter_map(|l| l.strip_prefix("# expect: "))
        .map(str::to_string)
        .collect()
}

/// `NAME:LINE:COL: ...`: a message about a place in the spec.
fn is_located(line: &str, name: &str) -> bool {
    let Some(rest) = line.strip_prefix(name).and_then(|r| r.strip_prefix(':')) else {
        return false;
    };
    let mut parts = rest.splitn(3, ':');
    let num =
        |s: Option<&str>| s.is_some_and(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_digit()));
    num(parts.next()) && num(parts.next()) && parts.next().is_some_and(|r| r.starts_with(' '))
}

/// Replace the output path `DIR/out.img` by `$OUTPUT`.
fn normalise(line: &str, out_dir: &Path) -> String {
    line.replace(&format!("{}/out.img", out_dir.display()), "$OUTPUT")
}

/// Check one spec of the corpus; returns what was wrong.
fn check_one(spec: &Path) -> Vec<String> {
    let name = spec.file_name().unwrap().to_string_lossy().into_owned();
    let text = std::fs::read_to_string(spec).unwrap();
    let want = expected(&text);
    let mut problems = Vec::new();
    if want.is_empty() {
        problems.push(format!("{name}: has no '# expect:' line"));
        return problems;
    }
    for w in &want {
        if !is_located(w, &name) {
            problems.push(format!(
                "{name}: expectation is not NAME:LINE:COL: ...: {w}"
            ));
        }
    }
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("out.img");
    let r = to_run(
        vmdb()
            .current_dir(corpus_dir())
            .args([name.as_str(), "--output", &out.to_string_lossy()])
            .output()
            .unwrap(),
    );
    let got: Vec<String> = r
        .stderr
        .lines()
        .filter(|l| is_located(l, &name))
        .map(|l| normalise(l, out_dir.path()))
        .collect();
    if r.code != 2 {
        problems.push(format!("{name}: exit status {}, expected 2", r.code));
    }
    if got != want {
        problems.push(format!(
            "{name}: messages differ\n  expected:\n    {}\n  got:\n    {}",
            want.join("\n    "),
            got.join("\n    ")
        ));
    }
    let n = want.len();
    let summary = format!(
        "vmdb: {name}: {n} problem{} found; nothing was built",
        if n == 1 { "" } else { "s" }
    );
    if !r.stderr.lines().any(|l| l == summary) {
        problems.push(format!("{name}: no line '{summary}' in:\n{}", r.stderr));
    }
    if !r.stdout.is_empty() {
        problems.push(format!("{name}: printed on stdout: {}", r.stdout));
    }
    let left = listing(out_dir.path());
    if !left.is_empty() {
        problems.push(format!("{name}: left in the output directory: {left:?}"));
    }
    let (l, m) = (
        loops_below(out_dir.path()),
        mounts_involving(out_dir.path()),
    );
    if !l.is_empty() || !m.is_empty() {
        problems.push(format!("{name}: left loops {l:?} mounts {m:?}"));
    }
    problems
}

#[test]
fn every_bad_spec_is_refused_with_its_messages_before_anything_runs() {
    let specs = corpus();
    assert!(
        specs.len() >= 24,
        "the corpus has only {} specs",
        specs.len()
    );
    let problems: Vec<String> = specs.iter().flat_map(|s| check_one(s)).collect();
    assert!(
        problems.is_empty(),
        "{} of {} bad specs misbehaved:\n{}",
        problems.len(),
        specs.len(),
        problems.join("\n")
    );
}

#[test]
fn the_spec_is_named_as_given_on_the_command_line() {
    // The same spec by an absolute path: the messages use that path.
    let spec = corpus_dir().join("bad-size.vmdb");
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("out.img");
    let r = run(&[&spec.to_string_lossy(), "--output", &out.to_string_lossy()]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.starts_with(&format!(
            "{}:5:11: step 1 (mkimg): key 'size': '4Q' is not a size",
            spec.display()
        )),
        "{}",
        r.stderr
    );
    assert!(listing(out_dir.path()).is_empty());
}

const GOOD: &str = r#"steps:
  - mkimg: "{{ output }}"
    size: 300M
  - mklabel: gpt
    device: "{{ output }}"
  - mkpart: primary
    device: "{{ output }}"
    start: 1M
    end: 100%
    tag: root
  - kpartx: "{{ output }}"
  - mkfs: ext4
    partition: root
  - mount: root
  - create-file: /etc/motd
    contents: hello
    unless: never
"#;

fn plan(output: &str) -> String {
    format!(
        "  1. line 2    mkimg: {output}
  2. line 4    mklabel: gpt
  3. line 6    mkpart: primary
  4. line 11   kpartx: {output}
  5. line 12   mkfs: ext4
  6. line 14   mount: root
  7. line 15   create-file: /etc/motd  (unless never)
"
    )
}

#[test]
fn validate_prints_the_plan_and_builds_nothing() {
    let d = tempfile::tempdir().unwrap();
    let spec = write(d.path(), "good.vmdb", GOOD);
    let s = spec.to_string_lossy();
    let out = d.path().join("good.img");
    let o = out.to_string_lossy();

    let r = run(&["validate", &s]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        r.stdout,
        format!("{}{s}: OK, 7 steps\n", plan("OUTPUT.img"))
    );
    assert_eq!(r.stderr, "");

    let r = run(&["validate", &s, "--output", &o]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout, format!("{}{s}: OK, 7 steps\n", plan(&o)));

    let r = run(&[&s, "--output", &o, "--dry-run"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        r.stdout,
        format!("{}{s}: OK, 7 steps (dry run: nothing built)\n", plan(&o))
    );
    assert_eq!(r.stderr, "");

    assert_eq!(listing(d.path()), vec!["good.vmdb"], "nothing was built");
    assert!(loops_below(d.path()).is_empty());
    assert!(mounts_involving(d.path()).is_empty());
}

#[test]
fn validate_of_a_bad_spec_exits_2() {
    let r = to_run(
        vmdb()
            .current_dir(corpus_dir())
            .args(["validate", "tag-misspelt.vmdb"])
            .output()
            .unwrap(),
    );
    assert_eq!(r.code, 2);
    assert_eq!(r.stdout, "");
    assert_eq!(
        r.stderr,
        "tag-misspelt.vmdb:15:16: step 5 (mkfs): key 'partition': tag 'roots' is not defined by an earlier step (defined so far: 'root')\n\
         vmdb: tag-misspelt.vmdb: 1 problem found; nothing was built\n"
    );
}

/// The alias bomb of the corpus, validated with 1 GiB of address space and a minute of
/// CPU at most (the old loader took the machine's memory): refused with its message,
/// and the peak memory the kernel measured for that one process stays small.
#[test]
fn an_alias_bomb_is_refused_in_little_memory() {
    use std::os::unix::process::CommandExt;
    let mut cmd = vmdb();
    cmd.current_dir(corpus_dir())
        .args(["validate", "yaml-alias-bomb.vmdb"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let limit = |res, n| {
                let l = libc::rlimit {
                    rlim_cur: n,
                    rlim_max: n,
                };
                if libc::setrlimit(res, &l) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            };
            limit(libc::RLIMIT_AS, 1 << 30)?;
            limit(libc::RLIMIT_CPU, 60)
        })
    };
    // Reaped by wait4 below, which also reports its resource use.
    #[allow(clippy::zombie_processes)]
    let mut child = cmd.spawn().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    // wait4: this child's own resource use (not that of other tests' children).
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as i32);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 2,
        "status {status:#x}: {stderr}"
    );
    assert_eq!(
        stderr,
        "yaml-alias-bomb.vmdb:8:7: bad YAML: the aliases expand to more than 100000 values or 16 MiB of text (an alias bomb?); write the values out instead\n\
         vmdb: yaml-alias-bomb.vmdb: 1 problem found; nothing was built\n"
    );
    let peak_kib = usage.ru_maxrss;
    eprintln!("peak RSS of vmdb validate on the alias bomb: {peak_kib} KiB");
    assert!(peak_kib < 100 * 1024, "peak RSS {peak_kib} KiB");
}

/// `--variable output=X` would make the spec write X while the build makes, checks and
/// renames its own output: refused as a usage error, as are `image` and
/// `rootfs_tarball`, and a matrix axis of those names.
#[test]
fn variables_that_options_set_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let spec = write(d.path(), "good.vmdb", GOOD);
    let s = spec.to_string_lossy().into_owned();
    let out = d.path().join("out.img").to_string_lossy().into_owned();
    let other = d.path().join("other.img").to_string_lossy().into_owned();
    for (args, name, option) in [
        (
            vec![&s[..], "--output", &out, "--variable"],
            "output",
            "--output",
        ),
        (vec!["validate", &s, "--variable"], "output", "--output"),
        (
            vec![&s[..], "--image", &out, "--variable"],
            "image",
            "--image",
        ),
        (
            vec![&s[..], "--output", &out, "--variable"],
            "rootfs_tarball",
            "--rootfs-tarball",
        ),
        (
            vec![&s[..], "--output", &out, "--matrix"],
            "output",
            "--output",
        ),
    ] {
        let value = format!("{name}={other}");
        let mut a = args.clone();
        a.push(&value);
        let r = run(&a);
        assert_eq!(r.code, 2, "{a:?}: {}", r.stderr);
        assert!(
            r.stderr.contains(&format!(
                "the variable '{name}' is set by {option}: use {option} instead"
            )),
            "{a:?}: {}",
            r.stderr
        );
        assert_eq!(listing(d.path()), vec!["good.vmdb"], "{a:?}");
    }
}

/// Every error about an undefined tag listed every tag defined so far: with thousands
/// of both, validation wrote gigabytes (quadratic). The list is short now, whatever
/// the number of tags.
#[test]
fn errors_stay_short_with_thousands_of_tags() {
    let n = 3000;
    let mut text = String::from("steps:\n  - kpartx: /dev/vdz\n    tags: [");
    text.push_str(
        &(0..n)
            .map(|i| format!("t{i}"))
            .collect::<Vec<_>>()
            .join(", "),
    );
    text.push_str("]\n");
    for i in 0..n {
        text.push_str(&format!("  - mkfs: ext4\n    partition: nope{i}\n"));
    }
    let d = tempfile::tempdir().unwrap();
    let spec = write(d.path(), "tags.vmdb", &text);
    let r = run(&["validate", &spec.to_string_lossy()]);
    assert_eq!(r.code, 2);
    let lines: Vec<&str> = r.stderr.lines().collect();
    assert_eq!(lines.len(), n + 1);
    assert!(
        lines[0].ends_with(
            ": step 2 (mkfs): key 'partition': tag 'nope0' is not defined by an earlier step \
             (defined so far: 't0', 't1', 't10', 't100', 't1000', 't1001', 't1002', 't1003', \
             't1004', 't1005' and 2990 more)"
        ),
        "{}",
        lines[0]
    );
    assert!(lines.iter().all(|l| l.len() < 400), "a long line");
}
