//! End to end for vmdb2-parity steps: a cold Debian build with `resize-rootfs`, enlarged
//! with `qemu-img resize` and booted to check that / grew; and the `ansible` step with
//! a playbook and a role, applied to an image made from the same rootfs tarball.
//! Checked with qemu's console, debugfs and sfdisk. Slow (minutes) and needs the Debian
//! archive: run with `cargo test -- --include-ignored` (scripts/test does).

mod common;

use std::path::Path;
use std::time::Instant;

use common::*;

fn data(name: &str) -> String {
    format!("{}/tests/data/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn build(spec: &str, img: &Path, tarball: &Path, extra: &[&str]) -> f64 {
    let t = Instant::now();
    let mut args = vec![
        spec.to_string(),
        "--output".into(),
        img.display().to_string(),
        "--rootfs-tarball".into(),
        tarball.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let r = to_run(vmdb().args(&args).output().unwrap());
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(r.code, 0, "building {spec}:\n{}", r.stderr);
    eprintln!("TIMING built {spec} in {secs:.1}s");
    secs
}

/// The root partition (the first) of an msdos image, copied out for debugfs.
fn root_partition(img: &Path, out: &Path) -> (u64, u64) {
    let j: serde_json::Value =
        serde_json::from_str(&tool("sfdisk", &["-J", &img.to_string_lossy()])).unwrap();
    let p = &j["partitiontable"]["partitions"][0];
    let (start, size) = (p["start"].as_u64().unwrap(), p["size"].as_u64().unwrap());
    extract(img, start, size, out);
    (start, size)
}

fn debugfs_cat(part: &Path, file: &str) -> String {
    tool(
        "debugfs",
        &["-R", &format!("cat {file}"), &part.to_string_lossy()],
    )
}

#[test]
#[ignore = "builds a Debian image and boots it in qemu: minutes, needs the Debian archive"]
fn resize_rootfs_grows_root_and_ansible_runs_a_playbook() {
    need_root!();
    let d = tempfile::Builder::new()
        .prefix("vmdb-parity-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let tarball = d.path().join("bookworm-python3.tar.zst");

    // Cold: debootstrap, kernel and python3, cached in the tarball.
    let img = d.path().join("resize.img");
    build(&data("resize-rootfs.vmdb"), &img, &tarball, &[]);
    assert!(tarball.exists(), "the cold build cached its rootfs");
    let part = d.path().join("root.part");
    let (_, sectors) = root_partition(&img, &part);
    assert!(
        debugfs_cat(&part, "/etc/systemd/system/resize-rootfs.service")
            .contains("ExecStart=/usr/local/sbin/resize-rootfs\n")
    );
    std::fs::remove_file(&part).unwrap();

    // Ansible, on an image made from the tarball.
    let aimg = d.path().join("ansible.img");
    build(
        &data("ansible/ansible.vmdb"),
        &aimg,
        &tarball,
        &["--variable", "greeting=Hi there"],
    );
    let apart = d.path().join("ansible.part");
    root_partition(&aimg, &apart);
    assert_eq!(
        debugfs_cat(&apart, "/etc/motd"),
        "Hi there, from an Ansible role\n"
    );
    assert_eq!(
        debugfs_cat(&apart, "/etc/vmdb-ansible-vars"),
        format!("greeting=Hi there rootfs_tarball={}\n", tarball.display())
    );
    assert_eq!(
        debugfs_cat(&apart, "/etc/vmdb-ansible-python3"),
        "install ok installed\n"
    );
    let stat = tool(
        "debugfs",
        &[
            "-R",
            "stat /etc/vmdb-ansible-vars",
            &apart.to_string_lossy(),
        ],
    );
    assert!(stat.contains("Mode:  0640"), "{stat}");
    // The task tagged 'extra' was left out by the step's `tags: [base]`.
    let ls = tool("debugfs", &["-R", "ls /etc", &apart.to_string_lossy()]);
    assert!(!ls.contains("vmdb-ansible-extra"), "{ls}");
    std::fs::remove_file(&aimg).unwrap();
    std::fs::remove_file(&apart).unwrap();

    // Enlarge the disk by 1 GiB and boot: / must have grown to fill it.
    let before_mib = sectors * 512 / (1 << 20);
    assert!(before_mib < 2048, "{before_mib}");
    tool(
        "qemu-img",
        &["resize", "-f", "raw", &img.to_string_lossy(), "+1G"],
    );
    let log = d.path().join("resize.console.log");
    let t = Instant::now();
    let r = to_run(
        vmdb()
            .args(["boot", &img.to_string_lossy(), "--timeout", "900"])
            .args(["--console-log", &log.to_string_lossy()])
            .args([
                "--run",
                "df -h /; echo ROOTSIZE=$(df -B1M --output=size / | tail -n 1 | tr -d ' ')",
            ])
            .output()
            .unwrap(),
    );
    let console = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(r.code, 0, "boot failed:\n{}\n{console}", r.stderr);
    eprintln!(
        "TIMING booted the resized image in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    let size: u64 = console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("ROOTSIZE="))
        .find_map(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no ROOTSIZE= line in the console log:\n{console}"));
    eprintln!("root filesystem: {before_mib} MiB partition before, {size} MiB filesystem after");
    // 3 GiB disk, minus the first MiB and the filesystem's own overhead.
    assert!((2900..3072).contains(&size), "/ is {size} MiB");
    assert!(console.contains("root@resized"), "{console}");
    // The partition table written at first boot: the partition ends at the disk's end.
    let j: serde_json::Value =
        serde_json::from_str(&tool("sfdisk", &["-J", &img.to_string_lossy()])).unwrap();
    let p = &j["partitiontable"]["partitions"][0];
    assert_eq!(
        p["start"].as_u64().unwrap() + p["size"].as_u64().unwrap(),
        3 * (1 << 30) / 512
    );
    wait_clean(d.path(), 5).unwrap();
}
