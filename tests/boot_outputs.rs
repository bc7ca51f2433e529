//! End to end: build a Debian image with cloud-init (cold, with a host TMPDIR, caching
//! its rootfs) as qcow2 with a NoCloud seed, and boot it with the seed attached:
//! cloud-init applies the seed. Then build the Vagrant box spec from the same rootfs
//! tarball, as a libvirt box, and boot its box.img: the vagrant user logs in, sudo needs no password, sshd
//! runs. Slow (minutes) and needs the Debian archive: run with
//! `cargo test -- --include-ignored` (scripts/test does).

mod common;

use std::path::Path;
use std::time::Instant;

use common::*;
use serde_json::Value;

fn spec(name: &str) -> String {
    format!("{}/specs/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn vmdb_ok(args: &[&str], what: &str) -> f64 {
    vmdb_ok_with(vmdb(), args, what)
}

fn vmdb_ok_with(mut cmd: std::process::Command, args: &[&str], what: &str) -> f64 {
    let t = Instant::now();
    let r = to_run(cmd.args(args).output().unwrap());
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(r.code, 0, "{what}:\n{}", r.stderr);
    eprintln!("{what}: {secs:.1}s");
    secs
}

/// Boot with `vmdb boot`, returning the console log.
fn boot(img: &Path, extra: &[&str], run_cmd: &str) -> String {
    let log = img.with_extension("console.log");
    let mut args = vec![
        "boot".to_string(),
        img.display().to_string(),
        "--timeout".into(),
        "600".into(),
        "--snapshot".into(),
        "--console-log".into(),
        log.display().to_string(),
        "--run".into(),
        run_cmd.into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let t = Instant::now();
    let r = to_run(vmdb().args(&args).output().unwrap());
    let console = std::fs::read_to_string(&log).unwrap_or_default();
    let tail = last_lines(&console, 40);
    assert_eq!(
        r.code,
        0,
        "booting {}:\n{}\nconsole tail:\n{}",
        img.display(),
        r.stderr,
        tail
    );
    eprintln!(
        "booted {} in {:.1}s",
        img.display(),
        t.elapsed().as_secs_f64()
    );
    console
}

#[test]
#[ignore = "builds Debian images and boots them in qemu: minutes, needs the Debian archive"]
fn cloud_init_image_and_vagrant_box_boot() {
    need_root!();
    let d = tempfile::Builder::new()
        .prefix("vmdb-e2e-outputs-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let p = |n: &str| d.path().join(n).display().to_string();
    let tarball = p("bookworm-cloud.tar.zst");

    // cloud-init: a qcow2 image and its seed, with checksums and a manifest. Cold
    // (every step runs), with vmdb's TMPDIR a directory of the host: openssh-server's
    // and ca-certificates' maintainer scripts run mktemp, which must not see it.
    let img = p("cloud.qcow2");
    let seed = p("seed.iso");
    let tmp = host_tmpdir(d.path());
    let mut cold = vmdb();
    cold.env("TMPDIR", &tmp)
        .env("VMDB_CACHE_DIR", cold_cache_dir(d.path(), "cold-cache"));
    vmdb_ok_with(
        cold,
        &[
            &spec("bookworm-cloud-init.vmdb"),
            "--output",
            &img,
            "--format",
            "qcow2",
            "--rootfs-tarball",
            &tarball,
            "--variable",
            &format!("seed={seed}"),
            "--variable",
            "seed_hostname=seeded-by-vmdb",
            "--checksums",
            "--manifest",
        ],
        "cold build of bookworm-cloud-init (qcow2 and seed)",
    );
    let m: Value =
        serde_json::from_str(&std::fs::read_to_string(p("cloud.qcow2.manifest.json")).unwrap())
            .unwrap();
    let pkgs: Vec<&str> = m["packages"]
        .as_array()
        .expect("packages listed")
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    for want in [
        "cloud-init",
        "openssh-server",
        "sudo",
        "linux-image-amd64",
        "base-files",
    ] {
        assert!(pkgs.contains(&want), "{want} not in {pkgs:?}");
    }
    let bf = m["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "base-files")
        .unwrap();
    assert_eq!(bf["architecture"], "amd64");
    assert!(bf["version"].as_str().unwrap().starts_with("12"), "{bf}");
    let names: Vec<&str> = m["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["cloud.qcow2", "seed.iso"]);
    eprintln!(
        "cloud.qcow2: {} bytes; {} packages",
        std::fs::metadata(&img).unwrap().len(),
        pkgs.len()
    );
    let console = boot(
        Path::new(&img),
        &["--drive", &seed],
        "cloud-init status --wait >/dev/null; echo HOST=$(hostname); cat /etc/vmdb-seeded",
    );
    assert!(console.contains("HOST=seeded-by-vmdb"), "hostname not set");
    assert!(
        console.contains("applied by cloud-init from the vmdb seed"),
        "write_files not applied"
    );

    // Vagrant: a libvirt box from the same rootfs (it has openssh-server and sudo).
    let bx = p("bookworm.box");
    vmdb_ok(
        &[
            &spec("bookworm-vagrant.vmdb"),
            "--output",
            &bx,
            "--format",
            "vagrant-libvirt",
            "--rootfs-tarball",
            &tarball,
            "--variable",
            "size=4G",
        ],
        "hot build of bookworm-vagrant (libvirt box)",
    );
    eprintln!(
        "bookworm.box: {} bytes",
        std::fs::metadata(&bx).unwrap().len()
    );
    let listing = tool("tar", &["-tf", &bx]);
    assert_eq!(listing, "metadata.json\nVagrantfile\nbox.img\n");
    tool(
        "tar",
        &["-xf", &bx, "-C", &p(""), "box.img", "metadata.json"],
    );
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(p("metadata.json")).unwrap()).unwrap();
    assert_eq!(
        meta,
        serde_json::json!({"provider": "libvirt", "format": "qcow2", "virtual_size": 4})
    );
    std::fs::remove_file(&bx).unwrap();
    // The vagrant user logs in with its password, sudo asks for none, sshd runs (with
    // host keys made at boot: under TCG that takes a while, so wait for the boot to
    // finish), Vagrant's keys are authorized. A user other than root
    // cannot run poweroff: a timer does it after the command.
    let console = boot(
        &d.path().join("box.img"),
        &["--user", "vagrant", "--password", "vagrant"],
        "id -un; sudo -n true && echo SUDO=ok; sudo systemctl is-system-running --wait; \
         echo SSHD=$(sudo systemctl is-active ssh); \
         echo KEYS=$(grep -c 'vagrant insecure public key' ~/.ssh/authorized_keys); \
         sudo systemd-run --quiet --on-active=5 systemctl poweroff",
    );
    for want in ["SUDO=ok", "SSHD=active", "KEYS=2"] {
        assert!(console.contains(want), "{want} not in the console");
    }
    wait_clean(d.path(), 5).unwrap();
    assert_eq!(common::listing(&tmp), Vec::<String>::new());
}
