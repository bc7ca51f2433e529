//! End to end, as Debian's CI uses vmdb2: autopkgtest-build-qemu, unchanged, finds vmdb
//! on PATH under the name `vmdb2` and builds its testbed image with it (BIOS and EFI);
//! autopkgtest-virt-qemu boots each image and runs a tiny package's test in it. qemu
//! runs under TCG through scripts/qemu-tcg, which drops what autopkgtest-virt-qemu adds
//! for KVM (nested KVM hangs on these hosts). Slow and needs the Debian archive: run with
//! `cargo test -- --include-ignored` (scripts/test does).

mod common;

use std::path::{Path, PathBuf};
use std::time::Instant;

use common::*;

/// A directory holding `vmdb2`, a link to the vmdb under test.
fn tools(dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_vmdb"), bin.join("vmdb2")).unwrap();
    bin
}

/// A source package whose one test checks what it runs on.
fn tiny_package(dir: &Path) -> PathBuf {
    let src = dir.join("smoke");
    std::fs::create_dir_all(src.join("debian/tests")).unwrap();
    std::fs::create_dir_all(src.join("debian/source")).unwrap();
    write(&src, "debian/source/format", "3.0 (native)\n");
    write(
        &src,
        "debian/changelog",
        "smoke (1) unstable; urgency=medium\n\n  * Test.\n\n -- Test <test@example.org>  Thu, 03 Dec 2026 00:00:00 +0000\n",
    );
    write(
        &src,
        "debian/control",
        "Source: smoke\nMaintainer: Test <test@example.org>\n\nPackage: smoke\nArchitecture: all\nDescription: test\n test\n",
    );
    write(
        &src,
        "debian/tests/control",
        "Test-Command: set -e; test \"$(cat /etc/hostname)\" = host; findmnt -n -o SOURCE /; echo smoke-test-ran-in-the-testbed\nDepends: util-linux\nRestrictions: needs-root\n",
    );
    src
}

fn build_and_test(boot: &str) {
    if !is_root() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let bin = tools(d.path());
    let mirror = vmdb::distro::mirror::host_default()
        .expect("a Debian mirror in the host's apt configuration");
    let img = d.path().join(format!("{boot}.qcow2"));
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );

    let t = Instant::now();
    let r = to_run(
        std::process::Command::new("autopkgtest-build-qemu")
            .env("PATH", &path)
            .env("VMDB_CACHE_DIR", test_cache_dir())
            .args([&format!("--boot={boot}"), &format!("--mirror={mirror}")])
            .args(["--size=4G", "bookworm", &img.display().to_string()])
            .output()
            .unwrap(),
    );
    assert_eq!(
        r.code, 0,
        "autopkgtest-build-qemu --boot={boot}:\n{}\n{}",
        r.stdout, r.stderr
    );
    assert!(img.is_file());
    eprintln!(
        "autopkgtest-build-qemu --boot={boot} with vmdb as vmdb2: {:.1}s",
        t.elapsed().as_secs_f64()
    );
    // vmdb2's leftovers would be here; vmdb's must not be.
    let left: Vec<String> = listing(d.path())
        .into_iter()
        .filter(|n| n.contains("vmdb"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");

    let t = Instant::now();
    let src = tiny_package(d.path());
    let out = d.path().join("out");
    let mut virt = vec![
        "qemu".to_string(),
        "--qemu-command".into(),
        concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/qemu-tcg").to_string(),
        "--timeout-reboot".into(),
        "600".into(),
    ];
    if boot == "efi" {
        virt.push("--efi".into());
    }
    virt.push(img.display().to_string());
    // autopkgtest-virt-qemu copies the host's /etc/timezone into the testbed with
    // `dpkg-reconfigure tzdata` and gives that 30 s, which an emulated machine on a
    // busy host does not always meet ("testbed failure"). It skips the step when that
    // file is empty: autopkgtest runs in a mount namespace of its own where /dev/null
    // stands in for the file; the host's stays as it is.
    let r = to_run(
        std::process::Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(
                "if [ -e /etc/timezone ]; then mount --bind /dev/null /etc/timezone || exit 1; fi; \
                 exec \"$@\"",
            )
            .args(["sh", "autopkgtest"])
            .args(["--output-dir", &out.display().to_string()])
            .arg("--timeout-test=900")
            // The test runs what the testbed has: nothing to build.
            .arg("--no-built-binaries")
            .arg(format!("{}/", src.display()))
            .arg("--")
            .args(&virt)
            .output()
            .unwrap(),
    );
    assert_eq!(
        r.code, 0,
        "autopkgtest in the --boot={boot} image:\n{}\n{}",
        r.stdout, r.stderr
    );
    let log = std::fs::read_to_string(out.join("log")).unwrap_or_default();
    assert!(
        log.contains("smoke-test-ran-in-the-testbed"),
        "the test's output is not in autopkgtest's log:\n{log}"
    );
    assert!(
        log.contains("command1") && log.contains("PASS"),
        "no PASS in autopkgtest's log:\n{log}"
    );
    eprintln!(
        "autopkgtest-virt-qemu ran the test in the --boot={boot} image: {:.1}s",
        t.elapsed().as_secs_f64()
    );
}

#[test]
#[ignore = "autopkgtest-build-qemu builds a Debian image and autopkgtest boots it: minutes, needs the Debian archive"]
fn autopkgtest_build_qemu_makes_a_bios_testbed_with_vmdb_as_vmdb2() {
    build_and_test("bios");
}

#[test]
#[ignore = "autopkgtest-build-qemu builds a Debian image and autopkgtest boots it: minutes, needs the Debian archive"]
fn autopkgtest_build_qemu_makes_an_efi_testbed_with_vmdb_as_vmdb2() {
    build_and_test("efi");
}
