//! vmdb as `vmdb2`: vmdb2's command line under that name (autopkgtest-build-qemu runs
//! `vmdb2 --verbose --image=IMG.raw --log=IMG.log SPEC`), `--image` building into an
//! existing file or device in place, and every disk a spec makes appearing under its
//! final name only when the build succeeds.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// A link named `vmdb2` to the vmdb binary, in `dir`.
fn vmdb2_in(dir: &Path) -> PathBuf {
    let link = dir.join("vmdb2");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_vmdb"), &link).unwrap();
    link
}

fn vmdb2(link: &Path, args: &[&str]) -> Run {
    to_run(
        // As vmdb2, vmdb keeps no step cache unless VMDB_CACHE_DIR names one.
        Command::new(link)
            .env_remove("VMDB_CACHE_DIR")
            .args(args)
            .output()
            .expect("running vmdb2"),
    )
}

/// A small disk with one ext4 partition holding /hello, made by the spec (`mkimg`) or
/// not (the image is there already).
fn disk_spec(var: &str, mkimg: bool, last: &str) -> String {
    let mk = if mkimg {
        format!("  - mkimg: \"{{{{ {var} }}}}\"\n    size: 32M\n")
    } else {
        String::new()
    };
    format!(
        r#"steps:
{mk}  - mklabel: msdos
    device: "{{{{ {var} }}}}"
  - mkpart: primary
    device: "{{{{ {var} }}}}"
    start: 0%
    end: 100%
    tag: root
  - kpartx: "{{{{ {var} }}}}"
  - mkfs: ext4
    partition: root
  - mount: root
  - create-file: /hello
    contents: "built"
{last}"#
    )
}

/// The label and the first partition's (start, size) in sectors.
fn table(img: &Path) -> (String, u64, u64) {
    let j: serde_json::Value =
        serde_json::from_str(&tool("sfdisk", &["-J", &img.to_string_lossy()])).unwrap();
    let t = &j["partitiontable"];
    let p = &t["partitions"][0];
    (
        t["label"].as_str().unwrap().to_string(),
        p["start"].as_u64().unwrap(),
        p["size"].as_u64().unwrap(),
    )
}

/// /hello of the image's first partition.
fn hello(img: &Path, dir: &Path) -> String {
    let (_, start, size) = table(img);
    let part = dir.join("part");
    extract(img, start, size, &part);
    let text = tool("debugfs", &["-R", "cat /hello", &part.to_string_lossy()]);
    std::fs::remove_file(&part).unwrap();
    text
}

#[test]
fn vmdb2_takes_autopkgtest_build_qemus_command_line() {
    need_root!();
    let d = tempfile::tempdir().unwrap();
    let link = vmdb2_in(d.path());
    let spec = write(d.path(), "vmdb2.yaml", &disk_spec("image", true, ""));
    let img = d.path().join("img");
    let r = vmdb2(
        &link,
        &[
            "--verbose",
            &format!("--image={}.raw", img.display()),
            &format!("--log={}.log", img.display()),
            &spec.to_string_lossy(),
        ],
    );
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    wait_clean(d.path(), 5).unwrap();
    // Progress on standard output, as vmdb2 shows it; nothing on standard error.
    assert!(r.stdout.starts_with("[1/7] mkimg: "), "{}", r.stdout);
    assert!(
        r.stdout.contains("\n[7/7] create-file: /hello\n"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout
            .contains(&format!("\nvmdb: built {}.raw in ", img.display())),
        "{}",
        r.stdout
    );
    assert_eq!(r.stderr, "");
    let log = std::fs::read_to_string(d.path().join("img.log")).unwrap();
    assert!(log.contains("] [7/7] create-file: /hello\n"), "{log}");
    assert_eq!(
        listing(d.path()),
        ["img.log", "img.raw", "vmdb2", "vmdb2.yaml"]
    );
    assert_eq!(
        table(&d.path().join("img.raw")),
        ("dos".into(), 2048, 63488)
    );
    assert_eq!(hello(&d.path().join("img.raw"), d.path()), "built");

    // Without --verbose vmdb2 is quiet; a failure says why on standard error and exits 1.
    let bad = write(
        d.path(),
        "bad.yaml",
        &disk_spec("image", true, "  - error: no good\n"),
    );
    let r = vmdb2(
        &link,
        &[
            "--image",
            &d.path().join("bad.raw").to_string_lossy(),
            &bad.to_string_lossy(),
        ],
    );
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    wait_clean(d.path(), 5).unwrap();
    assert_eq!(r.stdout, "no good\n");
    assert_eq!(
        r.stderr,
        "vmdb: error: step 8 (error) at line 17 failed after 0.0s: error step: no good\n\
         vmdb: build failed; everything was torn down\n"
    );
    assert_eq!(
        listing(d.path()),
        ["bad.yaml", "img.log", "img.raw", "vmdb2", "vmdb2.yaml"]
    );
}

#[test]
fn vmdb2_help_and_usage_errors_say_vmdb2() {
    let d = tempfile::tempdir().unwrap();
    let link = vmdb2_in(d.path());
    let spec = write(d.path(), "s.vmdb", "steps:\n  - echo: hi\n");
    let s = spec.to_string_lossy();

    let r = vmdb2(&link, &["--help"]);
    assert_eq!(r.code, 0);
    assert!(
        r.stdout.contains("\nUsage: vmdb2 [OPTIONS] <SPECFILE>\n"),
        "{}",
        r.stdout
    );
    for option in [
        "--image <FILE>",
        "--output <FILE>",
        "--rootfs-tarball <FILE>",
        "-v, --verbose",
        "--log <FILE>",
        "--variable <NAME=VALUE>",
        "-V, --version",
    ] {
        assert!(r.stdout.contains(option), "{option}: {}", r.stdout);
    }
    // vmdb's own options are vmdb's.
    assert!(!r.stdout.contains("--matrix"), "{}", r.stdout);

    let r = vmdb2(&link, &["--version"]);
    assert_eq!(
        (r.code, r.stdout.as_str()),
        (
            0,
            concat!(
                "vmdb2 ",
                env!("CARGO_PKG_VERSION"),
                " (vmdb answering as vmdb2)\n"
            )
        )
    );

    let r = vmdb2(&link, &["--matrix", "a=b", &s]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr
            .starts_with("error: unexpected argument '--matrix' found")
            && r.stderr.contains("\nUsage: vmdb2 [OPTIONS] <SPECFILE>\n"),
        "{}",
        r.stderr
    );

    let r = vmdb2(&link, &[&s]);
    assert_eq!(r.code, 2);
    assert_eq!(
        r.stderr,
        "vmdb2: say where to build the image with --image FILE or --output FILE\n"
    );

    let r = vmdb2(&link, &["--image", "a.img", "--output", "b.img", &s]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.starts_with(
            "error: the argument '--image <FILE>' cannot be used with '--output <FILE>'"
        ),
        "{}",
        r.stderr
    );

    // vmdb2 sets only the variables of the options given; a spec problem is a usage
    // error, with nothing written.
    let uses_output = write(d.path(), "o.vmdb", "steps:\n  - echo: \"{{ output }}\"\n");
    let log = d.path().join("x.log");
    let r = vmdb2(
        &link,
        &[
            "--image",
            &d.path().join("x.img").to_string_lossy(),
            "--log",
            &log.to_string_lossy(),
            &uses_output.to_string_lossy(),
        ],
    );
    assert_eq!(r.code, 2);
    let problem = "key 'echo': undefined template variable 'output'";
    assert!(r.stderr.contains(problem), "{}", r.stderr);
    // The log says it too (autopkgtest-build-qemu shows the log when vmdb2 fails).
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains(problem), "{logged}");
    assert!(
        logged.ends_with(&format!(
            "] vmdb: {}: 1 problem found; nothing was built\n",
            uses_output.display()
        )),
        "{logged}"
    );
    assert_eq!(listing(d.path()), ["o.vmdb", "s.vmdb", "vmdb2", "x.log"]);
}

#[test]
fn vmdb2_variables_lose_their_quotes() {
    need_root!();
    let d = tempfile::tempdir().unwrap();
    let link = vmdb2_in(d.path());
    let spec = write(
        d.path(),
        "s.vmdb",
        "steps:\n  - echo: \"[{{ a }}] [{{ b }}] [{{ c }}]\"\n",
    );
    let r = vmdb2(
        &link,
        &[
            "--output",
            &d.path().join("x.img").to_string_lossy(),
            "--variable",
            "a='one two'",
            "--variable",
            "b=\"three\"",
            "--variable",
            "c=it's",
            &spec.to_string_lossy(),
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout, "[one two] [three] [it's]\n");
}

#[test]
fn image_that_exists_is_built_in_place_when_the_spec_makes_none() {
    need_root!();
    let d = tempfile::tempdir().unwrap();
    let spec = write(d.path(), "s.vmdb", &disk_spec("image", false, ""));
    let img = d.path().join("existing.img");
    std::fs::write(&img, b"").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let inode = std::fs::metadata(&img).unwrap().ino();
    let r = run(&[&spec.to_string_lossy(), "--image", &img.to_string_lossy()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    wait_clean(d.path(), 5).unwrap();
    assert!(
        r.stderr
            .contains(&format!("\nvmdb: built {} in ", img.display())),
        "{}",
        r.stderr
    );
    // The same file, changed: not a new one renamed over it.
    assert_eq!(std::fs::metadata(&img).unwrap().ino(), inode);
    assert_eq!(listing(d.path()), ["existing.img", "s.vmdb"]);
    assert_eq!(table(&img), ("dos".into(), 2048, 63488));
    assert_eq!(hello(&img, d.path()), "built");

    // A failed build leaves the file (changed as far as the build got): it is the
    // user's, not vmdb's to remove.
    let bad = write(
        d.path(),
        "bad.vmdb",
        &disk_spec("image", false, "  - error: no good\n"),
    );
    let r = run(&[&bad.to_string_lossy(), "--image", &img.to_string_lossy()]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    wait_clean(d.path(), 5).unwrap();
    assert_eq!(std::fs::metadata(&img).unwrap().ino(), inode);
    assert_eq!(listing(d.path()), ["bad.vmdb", "existing.img", "s.vmdb"]);

    // No file and no mkimg: nothing to build into.
    let missing = d.path().join("missing.img");
    let r = run(&[
        &spec.to_string_lossy(),
        "--image",
        &missing.to_string_lossy(),
    ]);
    assert_eq!(r.code, 2);
    assert_eq!(
        r.stderr,
        format!(
            "vmdb: {} does not exist, and the spec makes no image there (no mkimg step of \
             it): --image builds into an existing file or device\n",
            missing.display()
        )
    );
    assert_eq!(listing(d.path()), ["bad.vmdb", "existing.img", "s.vmdb"]);

    // Built in place, the image cannot be converted.
    let r = run(&[
        &spec.to_string_lossy(),
        "--image",
        &img.to_string_lossy(),
        "--format",
        "qcow2",
    ]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.ends_with(&format!(
            "\nvmdb: {} is built in place: it can only be written raw (not --format qcow2)\n",
            img.display()
        )),
        "{}",
        r.stderr
    );
}

/// A loop device over a file, detached when dropped.
struct TestLoop(String);

impl Drop for TestLoop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn image_that_is_a_block_device_is_built_in_place() {
    need_root!();
    let d = tempfile::tempdir().unwrap();
    let spec = write(d.path(), "s.vmdb", &disk_spec("image", false, ""));
    let backing = d.path().join("backing");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let dev = TestLoop(
        tool("losetup", &["-f", "--show", &backing.to_string_lossy()])
            .trim()
            .to_string(),
    );
    let link = vmdb2_in(d.path());
    let r = vmdb2(&link, &["--image", &dev.0, &spec.to_string_lossy()]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    // Nothing of the build is left attached but the test's own device.
    let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while loops_below(d.path()).len() > 1 && std::time::Instant::now() < end {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(loops_below(d.path()).len(), 1);
    drop(dev);
    assert_eq!(listing(d.path()), ["backing", "s.vmdb", "vmdb2"]);
    assert_eq!(table(&backing), ("dos".into(), 2048, 63488));
    assert_eq!(hello(&backing, d.path()), "built");
}

#[test]
fn image_that_the_spec_makes_replaces_the_file_only_on_success() {
    need_root!();
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("x.img");
    std::fs::write(&img, "old").unwrap();

    // vmdb2's mkimg makes the image anew; vmdb builds it beside and renames it over
    // the old one only when the build succeeded.
    let bad = write(
        d.path(),
        "bad.vmdb",
        &disk_spec("image", true, "  - error: no good\n"),
    );
    let r = run(&[&bad.to_string_lossy(), "--image", &img.to_string_lossy()]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    wait_clean(d.path(), 5).unwrap();
    assert_eq!(std::fs::read_to_string(&img).unwrap(), "old");
    assert_eq!(listing(d.path()), ["bad.vmdb", "x.img"]);

    let spec = write(d.path(), "s.vmdb", &disk_spec("image", true, ""));
    let r = run(&[&spec.to_string_lossy(), "--image", &img.to_string_lossy()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    wait_clean(d.path(), 5).unwrap();
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 32 << 20);
    assert_eq!(hello(&img, d.path()), "built");
    assert_eq!(listing(d.path()), ["bad.vmdb", "s.vmdb", "x.img"]);
}

/// The image and a second disk named after it, with a partition table of its own.
fn two_disks(last: &str) -> String {
    format!(
        r#"steps:
  - mkimg: "{{{{ output }}}}"
    size: 16M
  - mkimg: "{{{{ output }}}}.data"
    size: 8M
  - mklabel: gpt
    device: "{{{{ output }}}}.data"
  - mklabel: msdos
    device: "{{{{ output }}}}"
{last}"#
    )
}

#[test]
fn a_second_disk_appears_with_the_image_only_when_the_build_succeeds() {
    need_root!();
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let img = out.join("two.img");

    let bad = write(d.path(), "bad.vmdb", &two_disks("  - error: no good\n"));
    let r = run(&[&bad.to_string_lossy(), "--output", &img.to_string_lossy()]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(listing(&out).is_empty(), "{:?}", listing(&out));

    let spec = write(d.path(), "s.vmdb", &two_disks(""));
    let r = run(&[
        &spec.to_string_lossy(),
        "--output",
        &img.to_string_lossy(),
        "--checksums",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.ends_with(&format!(
            "vmdb: wrote {0}.data\nvmdb: wrote {0}.sha256\nvmdb: wrote {0}.data.sha256\n",
            img.display()
        )),
        "{}",
        r.stderr
    );
    assert_eq!(
        listing(&out),
        [
            "two.img",
            "two.img.data",
            "two.img.data.sha256",
            "two.img.sha256"
        ]
    );
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 16 << 20);
    let data = out.join("two.img.data");
    assert_eq!(std::fs::metadata(&data).unwrap().len(), 8 << 20);
    let label = |p: &Path| {
        let j: serde_json::Value =
            serde_json::from_str(&tool("sfdisk", &["-J", &p.to_string_lossy()])).unwrap();
        j["partitiontable"]["label"].as_str().unwrap().to_string()
    };
    assert_eq!((label(&img), label(&data)), ("dos".into(), "gpt".into()));
    let sum = tool("sha256sum", &[&data.to_string_lossy()]);
    assert_eq!(
        std::fs::read_to_string(out.join("two.img.data.sha256")).unwrap(),
        sum.replace(&data.display().to_string(), "two.img.data")
    );
}
