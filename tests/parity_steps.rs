//! vmdb2-parity steps that need no network, with the vmdb binary on real images,
//! checked with sfdisk, debugfs and grep: kpartx `tags` on a disk partitioned outside
//! the spec, and the mount step's `zerofree`.

mod common;

use std::path::Path;

use common::*;

/// A disk image of `size` bytes partitioned by sfdisk from `table` (its input format).
fn partitioned_disk(disk: &Path, size: u64, table: &[u8]) {
    use std::io::Write;
    std::fs::File::create(disk).unwrap().set_len(size).unwrap();
    let mut c = std::process::Command::new("sfdisk")
        .args(["-q", &disk.to_string_lossy()])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(table).unwrap();
    assert!(c.wait().unwrap().success());
}

#[test]
fn kpartx_tags_name_the_partitions_of_a_partitioned_disk() {
    need_root!();
    let d = tempfile::tempdir().unwrap();
    let disk = d.path().join("disk.img");
    // Partitioned beforehand, by sfdisk: a 32 MiB partition, then the rest.
    partitioned_disk(
        &disk,
        96 << 20,
        b"label: dos\nstart=2048, size=65536, type=83\nstart=67584, type=83\n",
    );
    let table_before = tool("sfdisk", &["-d", &disk.to_string_lossy()]);
    let spec = write(
        d.path(),
        "kpartx.vmdb",
        r#"
steps:
  - kpartx: "{{ disk }}"
    tags: [boot, root]
  - mkfs: ext2
    partition: boot
    label: BOOT
  - mkfs: ext4
    partition: root
    label: ROOT
  - mount: root
  - mount: boot
    mount-on: root
    dirname: /boot
  - create-file: /etc/hello
    contents: "on the root\n"
  - create-file: /boot/hello
    contents: "on boot\n"
"#,
    );
    let out = d.path().join("unused.img");
    let r = run(&[
        &spec.to_string_lossy(),
        "--output",
        &out.to_string_lossy(),
        "--variable",
        &format!("disk={}", disk.display()),
    ]);
    assert_eq!(r.code, 0, "stdout:\n{}\nstderr:\n{}", r.stdout, r.stderr);
    wait_clean(d.path(), 5).unwrap();
    // The partition table is as sfdisk left it.
    assert_eq!(
        tool("sfdisk", &["-d", &disk.to_string_lossy()]),
        table_before
    );

    let boot = d.path().join("boot.part");
    let root = d.path().join("root.part");
    extract(&disk, 2048, 65536, &boot);
    extract(&disk, 67584, (96 << 11) - 67584, &root);
    let blkid = |p: &Path, what: &str| {
        tool(
            "blkid",
            &["-p", "-s", what, "-o", "value", &p.to_string_lossy()],
        )
        .trim()
        .to_string()
    };
    assert_eq!(blkid(&boot, "TYPE"), "ext2");
    assert_eq!(blkid(&boot, "LABEL"), "BOOT");
    assert_eq!(blkid(&root, "TYPE"), "ext4");
    assert_eq!(blkid(&root, "LABEL"), "ROOT");
    tool("e2fsck", &["-fn", &root.to_string_lossy()]);
    tool("e2fsck", &["-fn", &boot.to_string_lossy()]);
    let (rs, bs) = (root.to_string_lossy(), boot.to_string_lossy());
    assert_eq!(
        tool("debugfs", &["-R", "cat /etc/hello", &rs]),
        "on the root\n"
    );
    assert_eq!(tool("debugfs", &["-R", "cat /hello", &bs]), "on boot\n");
    // /boot's file went to the boot filesystem, not below the root's /boot.
    assert!(!tool("debugfs", &["-R", "ls /boot", &rs]).contains("hello"));
}

#[test]
fn kpartx_tags_beyond_the_partitions_fail_the_build() {
    need_root!();
    let d = tempfile::tempdir().unwrap();
    let disk = d.path().join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let mut c = std::process::Command::new("sfdisk")
        .args(["-q", &disk.to_string_lossy()])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        c.stdin
            .take()
            .unwrap()
            .write_all(b"label: dos\nstart=2048, type=83\n")
            .unwrap();
    }
    assert!(c.wait().unwrap().success());
    let spec = write(
        d.path(),
        "k.vmdb",
        "steps:\n  - kpartx: \"{{ disk }}\"\n    tags: [a, b]\n",
    );
    let r = run(&[
        &spec.to_string_lossy(),
        "--output",
        &d.path().join("o.img").to_string_lossy(),
        "--variable",
        &format!("disk={}", disk.display()),
    ]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!(
            "{} has 1 partitions but 2 tags were given",
            disk.display()
        )),
        "{}",
        r.stderr
    );
    wait_clean(d.path(), 5).unwrap();
}

const MARK: &str = "VMDB-ZEROFREE-MARK";

fn zerofree_spec(zerofree: bool) -> String {
    format!(
        r#"
steps:
  - mkimg: "{{{{ output }}}}"
    size: 64M
  - mklabel: msdos
    device: "{{{{ output }}}}"
  - mkpart: primary
    device: "{{{{ output }}}}"
    start: 0%
    end: 100%
    tag: /
  - mkfs: ext4
    partition: /
  - mount: /
    zerofree: {zerofree}
  - shell: |
      yes {MARK} | head -c 4M > "$ROOT/big"
      sync
      rm "$ROOT/big"
      sync
    root-fs: /
"#
    )
}

/// How many times the mark is in the image file.
fn marks(img: &Path) -> usize {
    let out = std::process::Command::new("grep")
        .args(["-a", "-c", MARK, &img.to_string_lossy()])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

#[test]
fn zerofree_zeroes_the_blocks_of_deleted_files() {
    need_root!();
    if !Path::new("/usr/sbin/zerofree").exists() {
        panic!("zerofree is not installed (scripts/install-deps installs it)");
    }
    let d = tempfile::tempdir().unwrap();
    for (zerofree, expect_marks) in [(false, true), (true, false)] {
        let spec = write(d.path(), "z.vmdb", &zerofree_spec(zerofree));
        let img = d.path().join(format!("z-{zerofree}.img"));
        let r = run(&[
            &spec.to_string_lossy(),
            "--output",
            &img.to_string_lossy(),
            "-v",
        ]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert_eq!(
            r.stdout.contains("zerofree -v") || r.stderr.contains("zerofree -v"),
            zerofree,
            "{}{}",
            r.stdout,
            r.stderr
        );
        let n = marks(&img);
        assert_eq!(
            n > 0,
            expect_marks,
            "zerofree: {zerofree}: {n} marks in the image"
        );
    }
    wait_clean(d.path(), 5).unwrap();
}

#[test]
fn kpartx_tags_mount_filesystems_made_elsewhere() {
    need_root!();
    let d = tempfile::tempdir().unwrap();
    let disk = d.path().join("disk.img");
    // An ext4 filesystem with a file in it, made without vmdb.
    let src = d.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("old"), "made elsewhere\n").unwrap();
    let part = disk_with_filesystem(d.path(), &["mkfs.ext4", "-q", "-d", &src.to_string_lossy()]);
    let uuid = tool(
        "blkid",
        &["-p", "-s", "UUID", "-o", "value", &part.to_string_lossy()],
    );
    let spec = write(
        d.path(),
        "existing.vmdb",
        "steps:\n  - kpartx: \"{{ disk }}\"\n    tags: [root]\n  - mount: root\n  - create-file: /new\n    contents: \"added\\n\"\n  - fstab: root\n",
    );
    let r = run(&[
        &spec.to_string_lossy(),
        "--output",
        &d.path().join("unused.img").to_string_lossy(),
        "--variable",
        &format!("disk={}", disk.display()),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    wait_clean(d.path(), 5).unwrap();
    extract(&disk, 2048, (63 << 20) / 512, &part);
    let p = part.to_string_lossy();
    assert_eq!(tool("debugfs", &["-R", "cat /old", &p]), "made elsewhere\n");
    assert_eq!(tool("debugfs", &["-R", "cat /new", &p]), "added\n");
    assert_eq!(
        tool("debugfs", &["-R", "cat /etc/fstab", &p]),
        format!("UUID={} / ext4 errors=remount-ro 0 1\n", uuid.trim())
    );
}

/// A 64 MiB disk with one partition from 1 MiB on, holding a filesystem made by
/// `mkfs` (with its arguments) without vmdb; returns the partition's image.
fn disk_with_filesystem(dir: &Path, mkfs: &[&str]) -> std::path::PathBuf {
    let disk = dir.join("disk.img");
    partitioned_disk(&disk, 64 << 20, b"label: dos\nstart=2048, type=83\n");
    let part = dir.join("part.img");
    std::fs::File::create(&part)
        .unwrap()
        .set_len((64 << 20) - (1 << 20))
        .unwrap();
    let mut args: Vec<&str> = mkfs[1..].to_vec();
    let p = part.to_string_lossy().into_owned();
    args.push(&p);
    tool(mkfs[0], &args);
    tool(
        "dd",
        &[
            &format!("if={}", part.display()),
            &format!("of={}", disk.display()),
            "bs=1M",
            "seek=1",
            "conv=notrunc,sparse",
            "status=none",
        ],
    );
    part
}

/// A vmdb2 spec for a disk partitioned outside it: kpartx `tags`, then resize-rootfs
/// on the root filesystem found there (with stand-ins for the programs it needs in
/// the image).
const EXISTING_ROOT: &str = r#"
steps:
  - kpartx: "{{ disk }}"
    tags: [root]
  - mount: root
  - shell: |
      for p in usr/sbin/sfdisk usr/bin/partx usr/bin/lsblk usr/bin/findmnt \
               usr/bin/systemctl usr/sbin/resize2fs; do
          mkdir -p "$ROOT/$(dirname $p)" && touch "$ROOT/$p"
      done
    root-fs: root
  - resize-rootfs: root
"#;

#[test]
fn resize_rootfs_grows_an_existing_filesystem_and_says_why_it_cannot() {
    need_root!();
    let d = tempfile::tempdir().unwrap();
    let spec = write(d.path(), "existing.vmdb", EXISTING_ROOT);
    let build = || {
        run(&[
            &spec.to_string_lossy(),
            "--output",
            &d.path().join("unused.img").to_string_lossy(),
            "--variable",
            &format!("disk={}", d.path().join("disk.img").display()),
        ])
    };
    // Its type is only known when the build reads it: validation accepts it.
    let part = disk_with_filesystem(d.path(), &["mkfs.ext4", "-q"]);
    let r = build();
    assert_eq!(r.code, 0, "{}", r.stderr);
    wait_clean(d.path(), 5).unwrap();
    extract(&d.path().join("disk.img"), 2048, (63 << 20) / 512, &part);
    let p = part.to_string_lossy();
    assert!(
        tool("debugfs", &["-R", "cat /usr/local/sbin/resize-rootfs", &p])
            .starts_with("#!/bin/sh\n# Written by vmdb's resize-rootfs step."),
    );
    // A filesystem that cannot grow while mounted fails the build, saying why.
    disk_with_filesystem(d.path(), &["mkfs.vfat"]);
    let r = build();
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains(
            "step 4 (resize-rootfs) at line 12 failed after 0.0s: tag 'root' has a vfat \
             filesystem, which cannot be grown while mounted: expected one of ext2, ext3, \
             ext4, xfs, btrfs"
        ),
        "{}",
        r.stderr
    );
    wait_clean(d.path(), 5).unwrap();
}
