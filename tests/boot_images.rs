//! End to end: build the example Debian images and boot each in qemu with `vmdb boot`.
//! One image is built cold (debootstrap from the network); the others reuse its rootfs
//! tarball, as users do. With VMDB_ROOTFS_TARBALL set (scripts/test sets it), the tarball
//! is kept there for later tests (scripts/test-package). Slow (minutes) and needs the
//! Debian archive: run with `cargo test -- --include-ignored` (scripts/test does).

mod common;

use std::path::Path;
use std::time::Instant;

use common::*;

fn spec(name: &str) -> String {
    format!("{}/specs/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Build a spec; `offline` runs vmdb in a network namespace with no network at all.
fn build(spec_name: &str, img: &Path, tarball: &Path, offline: bool) -> f64 {
    let t = Instant::now();
    let args = [
        spec(spec_name),
        "--output".into(),
        img.display().to_string(),
        "--rootfs-tarball".into(),
        tarball.display().to_string(),
    ];
    let mut cmd = if offline {
        let mut c = std::process::Command::new("unshare");
        c.args(["--net", env!("CARGO_BIN_EXE_vmdb")])
            .env("VMDB_CACHE_DIR", test_cache_dir());
        c
    } else {
        vmdb()
    };
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
    let tail: String = console
        .lines()
        .rev()
        .take(40)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n");
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
            "note: {} exists: the first build is not cold",
            tarball.display()
        );
    }

    let bios = d.path().join("bios.img");
    build("bookworm-bios.vmdb", &bios, &tarball, false);
    assert!(tarball.exists(), "the cold build cached its rootfs");
    boot(&bios, false, "bookworm-bios");

    let uefi = d.path().join("uefi.img");
    // From the rootfs tarball, a build needs no network.
    build("bookworm-uefi.vmdb", &uefi, &tarball, true);
    boot(&uefi, true, "bookworm-uefi");

    let hybrid = d.path().join("hybrid.img");
    build("bookworm-hybrid.vmdb", &hybrid, &tarball, true);
    boot(&hybrid, false, "bookworm-hybrid");
    boot(&hybrid, true, "bookworm-hybrid");
    wait_clean(d.path(), 5).unwrap();
}
