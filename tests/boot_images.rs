//! End to end: build the example Debian images and boot each in qemu with `vmdb boot`.
//! Each example is built cold (every step runs, from an empty step cache, sharing only
//! the package cache), with vmdb's TMPDIR a directory of the host; one is built again
//! from the BIOS image's rootfs tarball with no network, as users rebuild. With
//! VMDB_ROOTFS_TARBALL set (scripts/test sets it), the BIOS image's tarball is kept
//! there for later tests (scripts/test-package). Slow (minutes) and needs the Debian
//! archive: run with `cargo test -- --include-ignored` (scripts/test does).

mod common;

use std::path::Path;
use std::time::Instant;

use common::*;

fn spec(name: &str) -> String {
    format!("{}/specs/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Build a spec with `cache` as vmdb's cache directory and `tmpdir`, if any, as its
/// TMPDIR; `offline` runs vmdb in a network namespace with no network at all. The
/// build's log is IMG.build.log.
fn build(
    spec_name: &str,
    img: &Path,
    tarball: &Path,
    offline: bool,
    cache: &Path,
    tmpdir: Option<&Path>,
) -> f64 {
    let t = Instant::now();
    let args = [
        spec(spec_name),
        "--output".into(),
        img.display().to_string(),
        "--rootfs-tarball".into(),
        tarball.display().to_string(),
        "--log".into(),
        img.with_extension("build.log").display().to_string(),
    ];
    let mut cmd = if offline {
        let mut c = std::process::Command::new("unshare");
        c.args(["--net", env!("CARGO_BIN_EXE_vmdb")]);
        c
    } else {
        vmdb()
    };
    cmd.env("VMDB_CACHE_DIR", cache);
    if let Some(t) = tmpdir {
        cmd.env("TMPDIR", t);
    }
    let r = to_run(cmd.args(&args).output().unwrap());
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(r.code, 0, "building {spec_name}:\n{}", r.stderr);
    eprintln!("built {spec_name} in {secs:.1}s");
    secs
}

fn boot(img: &Path, uefi: bool, hostname: &str) {
    let log = img.with_extension(if uefi { "uefi.log" } else { "bios.log" });
    let mut args = vec!["boot".to_string(), img.display().to_string()];
    if uefi {
        args.push("--uefi".into());
    }
    args.extend(["--timeout".into(), "900".into(), "--snapshot".into()]);
    args.extend(["--console-log".into(), log.display().to_string()]);
    args.extend([
        "--run".into(),
        "cat /etc/hostname; findmnt -n -o SOURCE /".into(),
    ]);
    let t = Instant::now();
    let r = to_run(vmdb().args(&args).output().unwrap());
    let console = std::fs::read_to_string(&log).unwrap_or_default();
    let tail = last_lines(&console, 40);
    assert_eq!(
        r.code,
        0,
        "booting {} (uefi: {uefi}):\n{}\nconsole tail:\n{tail}",
        img.display(),
        r.stderr
    );
    // The hostname set by the spec's chroot step shows in the shell prompt and output.
    assert!(
        console.contains(&format!("root@{hostname}")),
        "no root@{hostname} prompt in the console log:\n{tail}"
    );
    eprintln!(
        "booted {} (uefi: {uefi}) in {:.1}s",
        img.display(),
        t.elapsed().as_secs_f64()
    );
}

#[test]
#[ignore = "builds Debian images and boots them in qemu: minutes, needs the Debian archive"]
fn example_images_build_and_boot() {
    need_root!();
    let d = tempfile::Builder::new()
        .prefix("vmdb-e2e-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let tarball = match std::env::var_os("VMDB_ROOTFS_TARBALL") {
        Some(p) => std::path::PathBuf::from(p),
        None => d.path().join("bookworm.tar.zst"),
    };
    if tarball.exists() {
        eprintln!(
            "note: {} exists: the BIOS build is not cold",
            tarball.display()
        );
    }
    let tmp = host_tmpdir(d.path());
    let cold = |name: &str| cold_cache_dir(d.path(), &format!("cache-{name}"));

    let bios = d.path().join("bios.img");
    build(
        "bookworm-bios.vmdb",
        &bios,
        &tarball,
        false,
        &cold("bios"),
        Some(&tmp),
    );
    assert!(tarball.exists(), "the cold build cached its rootfs");
    let log = std::fs::read_to_string(bios.with_extension("build.log")).unwrap();
    if log.contains("Setting up linux-image-") {
        // Debian makes a new kernel's initramfs twice; vmdb's stand-in defers the first.
        assert_eq!(
            log.matches("update-initramfs: Generating /boot/initrd.img-")
                .count(),
            1,
            "{log}"
        );
        assert!(
            log.contains("update-initramfs: deferring creation"),
            "{log}"
        );
    } else {
        eprintln!("note: the kernel came from a cache: the initramfs count is not checked");
    }
    boot(&bios, false, "bookworm-bios");
    std::fs::remove_file(&bios).unwrap();

    // The UEFI and hybrid specs cold (no rootfs tarball yet): debootstrap installs into
    // a root whose ESP is already mounted at /boot/efi.
    let uefi = d.path().join("uefi.img");
    build(
        "bookworm-uefi.vmdb",
        &uefi,
        &d.path().join("uefi.tar.zst"),
        false,
        &cold("uefi"),
        Some(&tmp),
    );
    boot(&uefi, true, "bookworm-uefi");
    std::fs::remove_file(&uefi).unwrap();

    let hybrid = d.path().join("hybrid.img");
    build(
        "bookworm-hybrid.vmdb",
        &hybrid,
        &d.path().join("hybrid.tar.zst"),
        false,
        &cold("hybrid"),
        Some(&tmp),
    );
    boot(&hybrid, false, "bookworm-hybrid");
    boot(&hybrid, true, "bookworm-hybrid");
    std::fs::remove_file(&hybrid).unwrap();

    // From the BIOS image's rootfs tarball, a build needs no network.
    build(
        "bookworm-uefi.vmdb",
        &uefi,
        &tarball,
        true,
        &test_cache_dir(),
        Some(&tmp),
    );
    wait_clean(d.path(), 5).unwrap();
    // vmdb's scratch directories were in its TMPDIR, and are gone.
    assert_eq!(listing(&tmp), Vec::<String>::new());
}

/// Where the foreign-architecture images' rootfs tarballs are kept for the rest of the
/// test run: tests/vmdb2_specs.rs (run after this file) builds vmdb2's i386 and arm64
/// specs from them instead of bootstrapping those architectures again.
fn shared_tarball(arch: &str) -> std::path::PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("e2e-rootfs");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!("bookworm-{arch}.tar.zst"))
}

/// Boot a foreign-architecture image with `vmdb boot --arch ARCH`; the console must show
/// the spec's hostname and the output of `run`.
fn boot_arch(img: &Path, arch: &str, hostname: &str, expect: &[&str]) -> f64 {
    let log = img.with_extension("console.log");
    let t = Instant::now();
    let r = run(&[
        "boot",
        &img.to_string_lossy(),
        "--arch",
        arch,
        "--timeout",
        "1200",
        "--snapshot",
        "--console-log",
        &log.to_string_lossy(),
        "--run",
        "cat /etc/hostname; uname -m; cat /proc/cmdline",
    ]);
    let secs = t.elapsed().as_secs_f64();
    let console = std::fs::read_to_string(&log).unwrap_or_default();
    let tail = last_lines(&console, 40);
    assert_eq!(
        r.code,
        0,
        "booting {} --arch {arch}:\n{}\nconsole tail:\n{}",
        img.display(),
        r.stderr,
        tail
    );
    for e in [format!("root@{hostname}")]
        .iter()
        .map(String::as_str)
        .chain(expect.iter().copied())
    {
        assert!(
            console.contains(e),
            "no {e:?} in the console log:\n{}",
            tail
        );
    }
    eprintln!("booted {} --arch {arch} in {secs:.1}s", img.display());
    secs
}

#[test]
#[ignore = "bootstraps i386 and arm64 (arm64 under qemu-user) and boots both under TCG: many minutes, needs the Debian archive"]
fn foreign_architecture_images_build_and_boot() {
    need_root!();
    let d = tempfile::Builder::new()
        .prefix("vmdb-foreign-")
        .tempdir_in("/var/tmp")
        .unwrap();

    // i386: runs natively on amd64; BIOS; the kernel for 32-bit PCs with PAE.
    let tarball = shared_tarball("i386");
    let _ = std::fs::remove_file(&tarball);
    let img = d.path().join("i386.img");
    build(
        "bookworm-i386.vmdb",
        &img,
        &tarball,
        false,
        &test_cache_dir(),
        None,
    );
    boot_arch(
        &img,
        "i386",
        "bookworm-i386",
        &["i686", "console=ttyS0,115200n8"],
    );
    std::fs::remove_file(&img).unwrap();

    // arm64: debootstrap and apt run arm64 programs through qemu-user-static; UEFI with
    // AAVMF; GRUB's arm64-efi modules come from the image; serial console ttyAMA0.
    let tarball = shared_tarball("arm64");
    let _ = std::fs::remove_file(&tarball);
    let img = d.path().join("arm64.img");
    build(
        "bookworm-arm64.vmdb",
        &img,
        &tarball,
        false,
        &test_cache_dir(),
        None,
    );
    let esp = tool("sfdisk", &["-J", &img.to_string_lossy()]);
    let j: serde_json::Value = serde_json::from_str(&esp).unwrap();
    let off = j["partitiontable"]["partitions"][0]["start"]
        .as_u64()
        .unwrap()
        * 512;
    let listing = std::process::Command::new("mdir")
        .args([
            "-b",
            "-i",
            &format!("{}@@{off}", img.display()),
            "::/EFI/BOOT",
        ])
        .env("MTOOLS_SKIP_CHECK", "1")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&listing.stdout).contains("::/EFI/BOOT/BOOTAA64.EFI"),
        "{listing:?}"
    );
    boot_arch(
        &img,
        "aarch64",
        "bookworm-arm64",
        &["aarch64", "console=ttyAMA0,115200n8"],
    );
    std::fs::remove_file(&img).unwrap();
    wait_clean(d.path(), 5).unwrap();
}
