//! Output formats, Vagrant boxes, cloud-init seeds, checksums and the manifest, with
//! small images (no Debian): what each file holds, and that a failed build leaves none.

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;

/// A 64 MiB image with an MBR and one ext4 partition holding a file; then `extra`.
fn spec(dir: &Path, extra: &str) -> String {
    let text = format!(
        "steps:
  - mkimg: \"{{{{ output }}}}\"
    size: 64M
  - mklabel: msdos
    device: \"{{{{ output }}}}\"
  - mkpart: primary
    device: \"{{{{ output }}}}\"
    start: 0%
    end: 100%
    tag: /
  - kpartx: \"{{{{ output }}}}\"
  - mkfs: ext4
    partition: /
  - mount: /
  - create-file: /hello
    contents: hello
{extra}"
    );
    write(dir, "s.vmdb", &text).display().to_string()
}

fn build(dir: &Path, extra: &str, out: &str, args: &[&str]) -> Run {
    let s = spec(dir, extra);
    let out = dir.join(out).display().to_string();
    let mut a = vec![s.as_str(), "--output", out.as_str()];
    a.extend_from_slice(args);
    run(&a)
}

fn qemu_img_info(p: &Path) -> Value {
    serde_json::from_str(&tool(
        "qemu-img",
        &["info", "--output=json", &p.to_string_lossy()],
    ))
    .unwrap()
}

fn tar_list(p: &Path) -> Vec<String> {
    tool("tar", &["-tf", &p.to_string_lossy()])
        .lines()
        .map(str::to_string)
        .collect()
}

fn tar_file(p: &Path, name: &str) -> String {
    tool("tar", &["-xOf", &p.to_string_lossy(), name])
}

#[test]
fn converts_to_each_format() {
    need_root!();
    let d = tempfile::tempdir().unwrap();
    for (fmt, compress, file_format, sub) in [
        ("qcow2", false, "qcow2", None),
        ("qcow2", true, "qcow2", None),
        ("vmdk", false, "vmdk", Some("monolithicSparse")),
        ("vmdk", true, "vmdk", Some("streamOptimized")),
        ("vdi", false, "vdi", None),
    ] {
        let name = format!("x-{fmt}-{compress}.{fmt}");
        let mut args = vec!["--format", fmt];
        if compress {
            args.push("--compress");
        }
        let r = build(d.path(), "", &name, &args);
        assert_eq!(r.code, 0, "{fmt}: {}", r.stderr);
        let info = qemu_img_info(&d.path().join(&name));
        assert_eq!(info["format"], file_format, "{info}");
        assert_eq!(info["virtual-size"], 64 << 20, "{info}");
        if let Some(sub) = sub {
            assert_eq!(
                info["format-specific"]["data"]["create-type"], sub,
                "{info}"
            );
        }
        if fmt == "qcow2" {
            assert_eq!(
                info["format-specific"]["data"]["compression-type"], "zlib",
                "{info}"
            );
        }
        // The content survives: convert back and find the file's partition intact.
        let raw = d.path().join("back.raw");
        tool(
            "qemu-img",
            &[
                "convert",
                "-O",
                "raw",
                &d.path().join(&name).to_string_lossy(),
                &raw.to_string_lossy(),
            ],
        );
        let table = tool("sfdisk", &["-J", &raw.to_string_lossy()]);
        assert!(table.contains("\"type\": \"83\""), "{table}");
        std::fs::remove_file(&raw).unwrap();
    }
    // Only the outputs: no temporary file is left beside them.
    let mut want: Vec<String> = vec!["s.vmdb".into()];
    for n in [
        "x-qcow2-false.qcow2",
        "x-qcow2-true.qcow2",
        "x-vmdk-false.vmdk",
        "x-vmdk-true.vmdk",
        "x-vdi-false.vdi",
    ] {
        want.push(n.into());
    }
    want.sort();
    assert_eq!(listing(d.path()), want);
    wait_clean(d.path(), 5).unwrap();
}

#[test]
fn compressed_qcow2_is_smaller() {
    need_root!();
    let d = tempfile::tempdir().unwrap();
    // Compressible data: a file of one repeated line.
    let extra = "  - shell: yes vmdb | head -c 20000000 > $ROOT/big\n    root-fs: /\n";
    assert_eq!(
        build(d.path(), extra, "a.qcow2", &["--format", "qcow2"]).code,
        0
    );
    let r = build(
        d.path(),
        extra,
        "b.qcow2",
        &["--format", "qcow2", "--compress"],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let a = std::fs::metadata(d.path().join("a.qcow2")).unwrap().len();
    let b = std::fs::metadata(d.path().join("b.qcow2")).unwrap().len();
    assert!(b * 4 < a, "compressed {b} vs {a}");
}

#[test]
fn bad_output_options_are_usage_errors() {
    let d = tempfile::tempdir().unwrap();
    let s = spec(d.path(), "");
    let out = d.path().join("x.vdi").display().to_string();
    let r = run(&[&s, "--output", &out, "--format", "vdi", "--compress"]);
    assert_eq!(r.code, 2);
    assert_eq!(
        r.stderr,
        "vmdb: --compress works with --format qcow2, vmdk, vagrant-libvirt and vagrant-virtualbox, not vdi\n"
    );
    let r = run(&[&s, "--output", &out, "--format", "iso"]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr
            .contains("invalid value 'iso' for '--format <FORMAT>'"),
        "{}",
        r.stderr
    );
    assert_eq!(listing(d.path()), ["s.vmdb"]);
}

#[test]
fn vagrant_libvirt_box() {
    need_root!();
    let d = tempfile::tempdir().unwrap();
    let r = build(d.path(), "", "x.box", &["--format", "vagrant-libvirt"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let bx = d.path().join("x.box");
    assert_eq!(tar_list(&bx), ["metadata.json", "Vagrantfile", "box.img"]);
    let meta: Value = serde_json::from_str(&tar_file(&bx, "metadata.json")).unwrap();
    assert_eq!(
        meta,
        serde_json::json!({"provider": "libvirt", "format": "qcow2", "virtual_size": 1})
    );
    let vf = tar_file(&bx, "Vagrantfile");
    assert!(
        vf.contains("Vagrant.configure(\"2\")") && vf.contains(":libvirt"),
        "{vf}"
    );
    let x = tempfile::tempdir().unwrap();
    tool(
        "tar",
        &[
            "-xf",
            &bx.to_string_lossy(),
            "-C",
            &x.path().to_string_lossy(),
        ],
    );
    let info = qemu_img_info(&x.path().join("box.img"));
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["virtual-size"], 64 << 20);
    assert_eq!(listing(d.path()), ["s.vmdb", "x.box"]);

    // Gzipped with --compress.
    let r = build(
        d.path(),
        "",
        "z.box",
        &["--format", "vagrant-libvirt", "--compress"],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let magic = std::fs::read(d.path().join("z.box")).unwrap();
    assert_eq!(&magic[..2], &[0x1f, 0x8b]);
    assert_eq!(
        tar_list(&d.path().join("z.box")),
        ["metadata.json", "Vagrantfile", "box.img"]
    );
}

#[test]
fn vagrant_virtualbox_box() {
    need_root!();
    let d = tempfile::tempdir().unwrap();
    let r = build(d.path(), "", "vb.box", &["--format", "vagrant-virtualbox"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let bx = d.path().join("vb.box");
    assert_eq!(
        tar_list(&bx),
        [
            "metadata.json",
            "Vagrantfile",
            "box.ovf",
            "box-disk001.vmdk"
        ]
    );
    let meta: Value = serde_json::from_str(&tar_file(&bx, "metadata.json")).unwrap();
    assert_eq!(meta, serde_json::json!({"provider": "virtualbox"}));
    let vf = tar_file(&bx, "Vagrantfile");
    let mac = vf
        .split("base_mac = \"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap_or_else(|| panic!("no base_mac: {vf}"));
    assert!(mac.starts_with("080027") && mac.len() == 12, "{mac}");

    let x = tempfile::tempdir().unwrap();
    tool(
        "tar",
        &[
            "-xf",
            &bx.to_string_lossy(),
            "-C",
            &x.path().to_string_lossy(),
        ],
    );
    let ovf = x.path().join("box.ovf");
    // Well-formed XML, and it references the disk, with its size and capacity.
    tool("xmllint", &["--noout", &ovf.to_string_lossy()]);
    let disk = x.path().join("box-disk001.vmdk");
    let size = std::fs::metadata(&disk).unwrap().len();
    let xp = |q: &str| {
        tool("xmllint", &["--xpath", q, &ovf.to_string_lossy()])
            .trim()
            .to_string()
    };
    let ns = "*[local-name()='Envelope']";
    assert_eq!(
        xp(&format!(
            "string(/{ns}/*[local-name()='References']/*[local-name()='File']/@*[local-name()='href'])"
        )),
        "box-disk001.vmdk"
    );
    assert_eq!(
        xp(&format!(
            "string(/{ns}/*[local-name()='References']/*[local-name()='File']/@*[local-name()='size'])"
        )),
        size.to_string()
    );
    assert_eq!(
        xp(&format!(
            "string(/{ns}/*[local-name()='DiskSection']/*[local-name()='Disk']/@*[local-name()='capacity'])"
        )),
        (64u64 << 20).to_string()
    );
    assert_eq!(
        xp(&format!(
            "string(/{ns}/*[local-name()='DiskSection']/*[local-name()='Disk']/@*[local-name()='fileRef'])"
        )),
        "file1"
    );
    let info = qemu_img_info(&disk);
    assert_eq!(info["format"], "vmdk");
    assert_eq!(
        info["format-specific"]["data"]["create-type"],
        "streamOptimized"
    );
    assert_eq!(info["virtual-size"], 64 << 20);
}

const SEED: &str = "  - cloud-init-seed: SEEDPATH
    format: FORMAT
    user-data: |
      #cloud-config
      runcmd: [touch /seeded]
    meta-data: |
      instance-id: test-1
      local-hostname: seeded
";

#[test]
fn cloud_init_seeds() {
    need_root!();
    let d = tempfile::tempdir().unwrap();
    for format in ["iso", "vfat"] {
        let seed = d.path().join(format!("seed-{format}.img"));
        let extra = SEED
            .replace("SEEDPATH", &seed.to_string_lossy())
            .replace("FORMAT", format);
        let r = build(d.path(), &extra, &format!("{format}.img"), &[]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert!(
            r.stderr
                .contains(&format!("vmdb: wrote {}\n", seed.display())),
            "{}",
            r.stderr
        );
        let blkid = tool("blkid", &["-p", "-o", "export", &seed.to_string_lossy()]);
        let want_type = if format == "iso" {
            "TYPE=iso9660"
        } else {
            "TYPE=vfat"
        };
        assert!(blkid.lines().any(|l| l == "LABEL=cidata"), "{blkid}");
        assert!(blkid.lines().any(|l| l == want_type), "{blkid}");
        let (user, meta) = if format == "iso" {
            let get = |n: &str| {
                tool(
                    "xorriso",
                    &[
                        "-dev",
                        &seed.to_string_lossy(),
                        "-osirrox",
                        "on",
                        "-extract",
                        &format!("/{n}"),
                        &d.path().join(n).to_string_lossy(),
                    ],
                );
                std::fs::read_to_string(d.path().join(n)).unwrap()
            };
            (get("user-data"), get("meta-data"))
        } else {
            let get = |n: &str| tool("mtype", &["-i", &seed.to_string_lossy(), &format!("::{n}")]);
            (get("user-data"), get("meta-data"))
        };
        assert_eq!(user, "#cloud-config\nruncmd: [touch /seeded]\n");
        assert_eq!(meta, "instance-id: test-1\nlocal-hostname: seeded\n");
        let _ = std::fs::remove_file(d.path().join("user-data"));
        let _ = std::fs::remove_file(d.path().join("meta-data"));
    }
}

#[test]
fn failed_build_leaves_no_output_at_all() {
    need_root!();
    let d = tempfile::tempdir().unwrap();
    let seed = d.path().join("seed.iso");
    let extra = format!(
        "{}  - error: planned failure\n",
        SEED.replace("SEEDPATH", &seed.to_string_lossy())
            .replace("FORMAT", "iso")
    );
    for fmt in ["raw", "qcow2", "vagrant-libvirt"] {
        let r = build(
            d.path(),
            &extra,
            "x.out",
            &["--format", fmt, "--checksums", "--manifest"],
        );
        assert_eq!(r.code, 1, "{}", r.stderr);
        assert_eq!(listing(d.path()), ["s.vmdb"], "{fmt}: {}", r.stderr);
    }
    wait_clean(d.path(), 5).unwrap();
}

#[test]
fn checksums_and_manifest() {
    need_root!();
    let d = tempfile::tempdir().unwrap();
    let seed = d.path().join("seed.iso");
    let extra = format!(
        "{}  - echo: not run\n    unless: [never]\n  - echo: skipped\n    unless: [rootfs_unpacked]\n",
        SEED.replace("SEEDPATH", &seed.to_string_lossy())
            .replace("FORMAT", "iso")
    )
    // Set the flag by hand, so that the last step is skipped.
    .replace(
        "  - echo: not run",
        "  - unpack-rootfs: /\n  - echo: not run",
    );
    let tarball = d.path().join("empty.tar");
    tool(
        "tar",
        &[
            "-cf",
            &tarball.to_string_lossy(),
            "-C",
            &d.path().to_string_lossy(),
            "--files-from",
            "/dev/null",
        ],
    );
    let r = build(
        d.path(),
        &extra,
        "m.qcow2",
        &[
            "--format",
            "qcow2",
            "--checksums",
            "--manifest",
            "--variable",
            "colour=blue",
            "--rootfs-tarball",
            &tarball.to_string_lossy(),
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        listing(d.path()),
        [
            "empty.tar",
            "m.qcow2",
            "m.qcow2.manifest.json",
            "m.qcow2.sha256",
            "s.vmdb",
            "seed.iso",
            "seed.iso.sha256"
        ]
    );
    // sha256sum can check them, in the output directory.
    let o = std::process::Command::new("sha256sum")
        .args(["-c", "m.qcow2.sha256", "seed.iso.sha256"])
        .current_dir(d.path())
        .output()
        .unwrap();
    assert!(o.status.success());
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "m.qcow2: OK\nseed.iso: OK\n"
    );
    let m: Value = serde_json::from_str(
        &std::fs::read_to_string(d.path().join("m.qcow2.manifest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(m["manifest_version"], 1);
    assert_eq!(m["vmdb_version"], env!("CARGO_PKG_VERSION"));
    let spec_text = std::fs::read(d.path().join("s.vmdb")).unwrap();
    let spec_sum = tool("sha256sum", &[&d.path().join("s.vmdb").to_string_lossy()]);
    assert_eq!(
        m["spec"]["sha256"],
        spec_sum.split_whitespace().next().unwrap()
    );
    assert!(!spec_text.is_empty());
    assert_eq!(m["variables"]["colour"], "blue");
    assert_eq!(
        m["variables"]["output"],
        d.path().join("m.qcow2").display().to_string()
    );
    assert_eq!(m["format"], "qcow2");
    assert_eq!(m["compressed"], false);
    let steps = m["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 11);
    for (i, s) in steps.iter().enumerate() {
        assert_eq!(s["index"], i + 1);
    }
    assert_eq!(steps[0]["type"], "mkimg");
    assert_eq!(steps[0]["status"], "ok");
    assert!(steps[0]["duration"].as_f64().unwrap() >= 0.0);
    assert_eq!(steps[9]["description"], "echo: not run");
    assert_eq!(steps[9]["status"], "ok");
    assert_eq!(steps[10]["status"], "skipped");
    assert_eq!(steps[10]["unless"], serde_json::json!(["rootfs_unpacked"]));
    assert!(steps[10].get("duration").is_none());
    // No dpkg database in this image.
    assert_eq!(m["packages"], Value::Null);
    let outs = m["outputs"].as_array().unwrap();
    assert_eq!(outs.len(), 2);
    let sum = |n: &str| {
        std::fs::read_to_string(d.path().join(format!("{n}.sha256")))
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    for (o, name, kind, format) in [
        (&outs[0], "m.qcow2", "image", "qcow2"),
        (&outs[1], "seed.iso", "cloud-init-seed", "iso"),
    ] {
        assert_eq!(o["name"], name);
        assert_eq!(o["path"], d.path().join(name).display().to_string());
        assert_eq!(o["kind"], kind);
        assert_eq!(o["format"], format);
        assert_eq!(
            o["size"],
            std::fs::metadata(d.path().join(name)).unwrap().len()
        );
        assert_eq!(o["sha256"], sum(name));
    }
}

/// A filesystem mounted by a test, detached when dropped.
struct TestMount(std::path::PathBuf);

impl Drop for TestMount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[test]
fn a_full_disk_under_the_image_fails_the_build() {
    need_root!();
    // 300 MB written into a 1 GiB image whose file sits on a 200 MB filesystem: the
    // kernel loses writes, and only logs it.
    let d = tempfile::tempdir().unwrap();
    let small = d.path().join("small");
    std::fs::create_dir(&small).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &small,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=200M"),
    )
    .unwrap();
    let _m = TestMount(small.clone());
    let spec = write(
        d.path(),
        "full.vmdb",
        "steps:
  - mkimg: \"{{ output }}\"
    size: 1G
  - mklabel: msdos
    device: \"{{ output }}\"
  - mkpart: primary
    device: \"{{ output }}\"
    start: 0%
    end: 100%
    tag: root
  - kpartx: \"{{ output }}\"
  - mkfs: ext4
    partition: root
  - mount: root
  - shell: head -c 300000000 /dev/urandom > $ROOT/big
    root-fs: root
",
    );
    let out = small.join("x.img");
    std::fs::write(&out, "an older image\n").unwrap();
    let r = run(&[
        &spec.to_string_lossy(),
        "--output",
        &out.to_string_lossy(),
        "--no-cache",
    ]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.lines().any(|l| l
            == "vmdb: error: teardown of step 6 (mount) at line 14: the image is incomplete: \
                writing back the filesystem of tag 'root' failed (is the disk holding the image \
                full?): EIO: I/O error"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr
            .lines()
            .any(|l| l == "vmdb: build failed; everything was torn down"),
        "{}",
        r.stderr
    );
    assert_eq!(listing(&small), ["x.img"]);
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "an older image\n");
    // No loop device left (the test's own tmpfs is the one mount there).
    let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !loops_below(&small).is_empty() {
        assert!(std::time::Instant::now() < end, "{:?}", loops_below(&small));
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn outputs_that_are_not_files_are_refused_and_left_alone() {
    need_root!();
    use std::os::unix::fs::FileTypeExt;
    let d = tempfile::tempdir().unwrap();
    let s = spec(d.path(), "");
    // A character device like /dev/null (made here: the test must not risk the real one).
    let null = d.path().join("null");
    nix::sys::stat::mknod(
        &null,
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(1, 3),
    )
    .unwrap();
    let fifo = d.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    let sock = d.path().join("sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let target = d.path().join("target.img");
    std::fs::write(&target, "an older image\n").unwrap();
    let link = d.path().join("link.img");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let dangling = d.path().join("dangling.img");
    std::os::unix::fs::symlink(d.path().join("nowhere.img"), &dangling).unwrap();
    for (out, why) in [
        (
            &null,
            "it is a character device, not a file or a block device".to_string(),
        ),
        (&fifo, "it is a named pipe (FIFO), not a file".to_string()),
        (&sock, "it is a socket, not a file".to_string()),
        (
            &link,
            format!(
                "it is a symbolic link (to {}): name the file itself",
                target.display()
            ),
        ),
        (
            &dangling,
            format!(
                "it is a symbolic link (to {}): name the file itself",
                d.path().join("nowhere.img").display()
            ),
        ),
    ] {
        let r = run(&[&s, "--output", &out.to_string_lossy()]);
        assert_eq!(r.code, 2, "{}: {}", out.display(), r.stderr);
        assert_eq!(
            r.stderr,
            format!("vmdb: refusing to write to {}: {why}\n", out.display())
        );
    }
    let t = |p: &Path| std::fs::symlink_metadata(p).unwrap().file_type();
    assert!(t(&null).is_char_device());
    assert!(t(&fifo).is_fifo());
    assert!(t(&sock).is_socket());
    assert!(t(&link).is_symlink() && t(&dangling).is_symlink());
    assert_eq!(
        std::fs::read_to_string(&target).unwrap(),
        "an older image\n"
    );
    assert_eq!(
        listing(d.path()),
        [
            "dangling.img",
            "fifo",
            "link.img",
            "null",
            "s.vmdb",
            "sock",
            "target.img"
        ]
    );
}

/// A rebuild replaces the image: an earlier build's checksum and manifest, which this
/// build does not write, go with the old image (they would describe a file that is
/// gone: `sha256sum -c` failed); a failed build leaves the old image and its files.
#[test]
fn side_files_of_an_earlier_build_do_not_outlive_its_image() {
    need_root!();
    let d = tempfile::tempdir().unwrap();
    let p = |n: &str| d.path().join(n);
    let check = || {
        std::process::Command::new("sha256sum")
            .args(["--check", "--quiet", "x.img.sha256"])
            .current_dir(d.path())
            .status()
            .unwrap()
            .success()
    };
    let r = build(d.path(), "", "x.img", &["--checksums", "--manifest"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(check());
    assert_eq!(
        listing(d.path()),
        ["s.vmdb", "x.img", "x.img.manifest.json", "x.img.sha256"]
    );

    // Without --checksums and --manifest: both go, and vmdb says so.
    let r = build(d.path(), "", "x.img", &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    for f in ["x.img.sha256", "x.img.manifest.json"] {
        let line = format!(
            "vmdb: removed {}, left by an earlier build: this build wrote none\n",
            p(f).display()
        );
        assert!(r.stderr.contains(&line), "no {line:?} in:\n{}", r.stderr);
    }
    assert_eq!(listing(d.path()), ["s.vmdb", "x.img"]);

    // With --checksums only: a checksum of the new image, and no manifest.
    std::fs::write(p("x.img.manifest.json"), "{}\n").unwrap();
    let r = build(d.path(), "", "x.img", &["--checksums"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(check());
    assert!(!r.stderr.contains("x.img.sha256, left by"), "{}", r.stderr);
    assert_eq!(listing(d.path()), ["s.vmdb", "x.img", "x.img.sha256"]);

    // A failed build changes nothing: the image and its checksum still match.
    let before = std::fs::read(p("x.img.sha256")).unwrap();
    let r = build(d.path(), "  - error: planned failure\n", "x.img", &[]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(std::fs::read(p("x.img.sha256")).unwrap(), before);
    assert!(check());
    wait_clean(d.path(), 5).unwrap();
}

/// `--format qcow2 --output x.img` writes qcow2 into a name that says raw: vmdb warns
/// (and builds what was asked).
#[test]
fn an_output_name_that_says_another_format_is_warned_about() {
    need_root!();
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("x.img");
    let r = build(d.path(), "", "x.img", &["--format", "qcow2"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let warning = format!(
        "vmdb: warning: {} will hold a qcow2 image (--format qcow2), but its name says a raw \
         image: name it {}, or give --format raw\n",
        img.display(),
        d.path().join("x.qcow2").display()
    );
    assert!(r.stderr.starts_with(&warning), "{}", r.stderr);
    assert_eq!(qemu_img_info(&img)["format"], "qcow2");
    let r = build(d.path(), "", "y.qcow2", &["--format", "qcow2"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!r.stderr.contains("warning"), "{}", r.stderr);
    wait_clean(d.path(), 5).unwrap();
}
