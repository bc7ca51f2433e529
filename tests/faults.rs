//! Fault injection: a full disk spec with an `error` step put after each of its steps in
//! turn. Every time, the build must fail with exit status 1 naming the error step, tear
//! down exactly the steps that started, newest first (as `-v` shows), and leave nothing:
//! no loop device, no mount, no image and no partial image.

mod common;

use std::path::Path;

use common::*;

/// The steps of a GPT disk with an ESP and an ext4 root, as (type, YAML) pairs.
const STEPS: &[(&str, &str)] = &[
    ("mkimg", "  - mkimg: \"{{ output }}\"\n    size: 300M\n"),
    (
        "mklabel",
        "  - mklabel: gpt\n    device: \"{{ output }}\"\n",
    ),
    (
        "mkpart",
        "  - mkpart: primary\n    device: \"{{ output }}\"\n    start: 1M\n    end: 65M\n    fs-type: fat32\n    tag: efi\n",
    ),
    (
        "mkpart",
        "  - mkpart: primary\n    device: \"{{ output }}\"\n    start: 65M\n    end: 100%\n    tag: root\n",
    ),
    ("kpartx", "  - kpartx: \"{{ output }}\"\n"),
    (
        "mkfs",
        "  - mkfs: vfat\n    partition: efi\n    label: ESP\n",
    ),
    ("mkfs", "  - mkfs: ext4\n    partition: root\n"),
    ("mount", "  - mount: root\n"),
    (
        "mount",
        "  - mount: efi\n    mount-on: root\n    dirname: /boot/efi\n",
    ),
    (
        "create-file",
        "  - create-file: /etc/motd\n    contents: \"hello\\n\"\n",
    ),
    (
        "create-file",
        "  - create-file: /boot/efi/hello.txt\n    contents: \"on the ESP\\n\"\n",
    ),
    ("fstab", "  - fstab: root\n"),
];

/// The spec with `extra` (one step) put after the first `after` steps; returns the text
/// and the line of the extra step.
fn spec_with(after: usize, extra: &str) -> (String, usize) {
    let mut s = String::from("steps:\n");
    let mut line = 0;
    for (i, (_, y)) in STEPS.iter().enumerate() {
        if i == after {
            line = s.lines().count() + 1;
            s.push_str(extra);
        }
        s.push_str(y);
    }
    if after == STEPS.len() {
        line = s.lines().count() + 1;
        s.push_str(extra);
    }
    (s, line)
}

fn teardown_lines(stderr: &str) -> Vec<String> {
    stderr
        .lines()
        .filter(|l| l.starts_with("teardown ["))
        .map(str::to_string)
        .collect()
}

fn error_lines(stderr: &str) -> Vec<String> {
    stderr
        .lines()
        .filter(|l| l.starts_with("vmdb: error:"))
        .map(str::to_string)
        .collect()
}

fn build(dir: &Path, spec: &str, extra_args: &[&str]) -> Run {
    let spec = write(dir, "spec.vmdb", spec);
    let out = dir.join("out.img");
    let mut args = vec![
        spec.to_string_lossy().into_owned(),
        "--output".into(),
        out.to_string_lossy().into_owned(),
        "-v".into(),
    ];
    args.extend(extra_args.iter().map(|s| s.to_string()));
    // vmdb's own TMPDIR: its scratch directory (mount points) must be gone after the build.
    let tmp = tempfile::tempdir().unwrap();
    let r = to_run(
        vmdb()
            .env("TMPDIR", tmp.path())
            .args(&args)
            .output()
            .unwrap(),
    );
    assert_eq!(
        listing(tmp.path()),
        Vec::<String>::new(),
        "scratch left in vmdb's TMPDIR; stderr:\n{}",
        r.stderr
    );
    r
}

/// Run the spec with an error after `after` steps; returns what was wrong.
fn inject_after(after: usize) -> Vec<String> {
    let d = tempfile::tempdir().unwrap();
    let (spec, line) = spec_with(after, "  - error: injected\n");
    let total = STEPS.len() + 1;
    let err_index = after + 1;
    let r = build(d.path(), &spec, &[]);
    let mut problems = Vec::new();
    let ctx = format!("error after step {after}");
    if r.code != 1 {
        problems.push(format!("{ctx}: exit status {}, expected 1", r.code));
    }
    // Started: the steps before the error and the error step itself, torn down newest first.
    let want: Vec<String> = (1..=err_index)
        .rev()
        .map(|k| {
            let kind = if k == err_index {
                "error"
            } else {
                STEPS[k - 1].0
            };
            format!("teardown [{k}/{total}] {kind}")
        })
        .collect();
    let got = teardown_lines(&r.stderr);
    if got != want {
        problems.push(format!(
            "{ctx}: teardown\n  expected: {want:?}\n  got:      {got:?}"
        ));
    }
    let errors = error_lines(&r.stderr);
    let want_err = format!("vmdb: error: step {err_index} (error) at line {line} failed after ");
    if errors.len() != 1
        || !errors[0].starts_with(&want_err)
        || !errors[0].ends_with("s: error step: injected")
    {
        problems.push(format!(
            "{ctx}: expected one error line '{want_err}...s: error step: injected', got {errors:?}"
        ));
    }
    if !r
        .stderr
        .lines()
        .any(|l| l == "vmdb: build failed; everything was torn down")
    {
        problems.push(format!("{ctx}: no 'build failed' line"));
    }
    // Steps after the error never started.
    for k in err_index + 1..=total {
        if r.stderr
            .lines()
            .any(|l| l.starts_with(&format!("[{k}/{total}]")))
        {
            problems.push(format!("{ctx}: step {k} ran after the error"));
        }
    }
    if let Err(e) = wait_clean(d.path(), 5) {
        problems.push(format!("{ctx}: {e}"));
    }
    let left = listing(d.path());
    if left != ["spec.vmdb"] {
        problems.push(format!("{ctx}: the directory holds {left:?}"));
    }
    if !problems.is_empty() {
        problems.push(format!("stderr of the build:\n{}", r.stderr));
    }
    problems
}

#[test]
fn an_error_after_any_step_tears_down_what_started_in_reverse() {
    need_root!();
    let problems: Vec<String> = (0..=STEPS.len()).flat_map(inject_after).collect();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_spec_without_an_error_builds() {
    need_root!();
    let d = tempfile::tempdir().unwrap();
    let (spec, _) = spec_with(STEPS.len(), "  - echo: done\n");
    let r = build(d.path(), &spec, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(listing(d.path()), ["out.img", "spec.vmdb"]);
    // A successful build tears down too, all of it, in reverse.
    let total = STEPS.len() + 1;
    let want: Vec<String> = (1..=total)
        .rev()
        .map(|k| {
            let kind = if k == total { "echo" } else { STEPS[k - 1].0 };
            format!("teardown [{k}/{total}] {kind}")
        })
        .collect();
    assert_eq!(teardown_lines(&r.stderr), want);
    wait_clean(d.path(), 5).unwrap();
}

#[test]
fn a_failing_command_is_torn_down_like_an_error_step() {
    need_root!();
    let d = tempfile::tempdir().unwrap();
    // After both mounts: the shell step fails half-way with a file open below the root.
    let (spec, line) = spec_with(
        9,
        "  - shell: |\n      echo partial > \"$ROOT/partial\"\n      exit 3\n    root-fs: root\n",
    );
    let r = build(d.path(), &spec, &[]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let total = STEPS.len() + 1;
    let want: Vec<String> = (1..=10)
        .rev()
        .map(|k| {
            let kind = if k == 10 { "shell" } else { STEPS[k - 1].0 };
            format!("teardown [{k}/{total}] {kind}")
        })
        .collect();
    assert_eq!(teardown_lines(&r.stderr), want, "{}", r.stderr);
    let errors = error_lines(&r.stderr);
    assert_eq!(errors.len(), 1, "{}", r.stderr);
    assert!(
        errors[0].starts_with(&format!(
            "vmdb: error: step 10 (shell) at line {line} failed after "
        )) && errors[0].contains("command failed with exit status 3: sh -ec"),
        "{}",
        r.stderr
    );
    wait_clean(d.path(), 5).unwrap();
    assert_eq!(listing(d.path()), ["spec.vmdb"]);
}

#[test]
fn a_step_that_is_not_skipped_runs_and_is_torn_down() {
    // No rootfs tarball, so unpack-rootfs is not in the spec and the flag is not set.
    need_root!();
    let d = tempfile::tempdir().unwrap();
    let (spec, _) = spec_with(
        10,
        "  - echo: not skipped\n    teardown: torn down\n    unless: rootfs_unpacked\n  - error: injected\n",
    );
    let r = build(d.path(), &spec, &[]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let total = STEPS.len() + 2;
    assert!(
        r.stderr
            .lines()
            .any(|l| l == format!("[11/{total}] echo: not skipped")),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("skipped (unless"), "{}", r.stderr);
    let td = teardown_lines(&r.stderr);
    assert_eq!(
        td[..2],
        [
            format!("teardown [12/{total}] error"),
            format!("teardown [11/{total}] echo")
        ],
        "{}",
        r.stderr
    );
    assert_eq!(td.len(), 12, "{td:?}");
    assert_eq!(r.stdout, "not skipped\ninjected\ntorn down\n");
    wait_clean(d.path(), 5).unwrap();
    assert_eq!(listing(d.path()), ["spec.vmdb"]);
}

#[test]
fn keep_failed_keeps_the_half_built_image() {
    need_root!();
    let d = tempfile::tempdir().unwrap();
    // After the files were written: teardown unmounts, so the kept image is consistent
    // and the ESP's staged files were copied into the FAT filesystem.
    let (spec, _) = spec_with(11, "  - error: injected\n");
    let r = build(d.path(), &spec, &["--keep-failed"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    wait_clean(d.path(), 5).unwrap();
    assert_eq!(listing(d.path()), ["out.img.failed", "spec.vmdb"]);
    let kept = d.path().join("out.img.failed");
    assert!(
        r.stderr
            .lines()
            .any(|l| l == format!("vmdb: kept the half-built image as {}", kept.display())),
        "{}",
        r.stderr
    );
    assert_eq!(std::fs::metadata(&kept).unwrap().len(), 300 << 20);

    let j: serde_json::Value =
        serde_json::from_str(&tool("sfdisk", &["-J", &kept.to_string_lossy()])).unwrap();
    let parts = j["partitiontable"]["partitions"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(j["partitiontable"]["label"], "gpt");
    assert_eq!(parts.len(), 2);
    let extract = |p: &serde_json::Value, name: &str| {
        let out = d.path().join(name);
        tool(
            "dd",
            &[
                &format!("if={}", kept.display()),
                &format!("of={}", out.display()),
                "bs=512",
                &format!("skip={}", p["start"].as_u64().unwrap()),
                &format!("count={}", p["size"].as_u64().unwrap()),
                "status=none",
            ],
        );
        out
    };
    let esp = extract(&parts[0], "esp.part");
    let root = extract(&parts[1], "root.part");
    tool("e2fsck", &["-fn", &root.to_string_lossy()]);
    assert_eq!(
        tool("debugfs", &["-R", "cat /etc/motd", &root.to_string_lossy()]),
        "hello\n"
    );
    let mtype = std::process::Command::new("mtype")
        .env("MTOOLS_SKIP_CHECK", "1")
        .args(["-i", &esp.to_string_lossy(), "::/hello.txt"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&mtype.stdout), "on the ESP\n");
    // The fstab step after the error never ran.
    let fstab = std::process::Command::new("debugfs")
        .args(["-R", "cat /etc/fstab", &root.to_string_lossy()])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&fstab.stdout), "");
}

#[test]
fn keep_failed_with_no_image_yet_keeps_nothing() {
    need_root!();
    let d = tempfile::tempdir().unwrap();
    let (spec, _) = spec_with(0, "  - error: injected\n");
    let r = build(d.path(), &spec, &["--keep-failed"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(listing(d.path()), ["spec.vmdb"]);
    assert!(
        !r.stderr.contains("kept the half-built image"),
        "{}",
        r.stderr
    );
}

#[test]
fn a_skipped_step_is_not_torn_down() {
    need_root!();
    let d = tempfile::tempdir().unwrap();
    // A tiny rootfs tarball: unpack-rootfs unpacks it and sets rootfs_unpacked.
    let tree = tempfile::tempdir().unwrap();
    std::fs::create_dir(tree.path().join("etc")).unwrap();
    std::fs::write(tree.path().join("etc/cached"), "from the tarball\n").unwrap();
    let tarball = d.path().join("rootfs.tar");
    tool(
        "tar",
        &[
            "-C",
            &tree.path().to_string_lossy(),
            "-cf",
            &tarball.to_string_lossy(),
            ".",
        ],
    );
    let (spec, _) = spec_with(
        10,
        "  - unpack-rootfs: root\n  - echo: skipped\n    teardown: must not appear\n    unless: rootfs_unpacked\n  - error: injected\n",
    );
    let r = build(
        d.path(),
        &spec,
        &["--rootfs-tarball", &tarball.to_string_lossy()],
    );
    assert_eq!(r.code, 1, "{}", r.stderr);
    let total = STEPS.len() + 3;
    assert!(
        r.stderr
            .lines()
            .any(|l| l == format!("[12/{total}] echo: skipped: skipped (unless: rootfs_unpacked)")),
        "{}",
        r.stderr
    );
    let td = teardown_lines(&r.stderr);
    assert_eq!(
        td[..2],
        [
            format!("teardown [13/{total}] error"),
            format!("teardown [11/{total}] unpack-rootfs")
        ],
        "{}",
        r.stderr
    );
    assert_eq!(td.len(), 12, "{td:?}");
    assert_eq!(
        r.stdout, "injected\n",
        "the skipped echo neither ran nor was torn down"
    );
    wait_clean(d.path(), 5).unwrap();
    assert_eq!(listing(d.path()), ["rootfs.tar", "spec.vmdb"]);
}
