//! What specs written for vmdb2 rely on beyond its step types: the names kpartx gave
//! partitions (`/dev/mapper/loopNpM`) and the forms of vmdb2's first releases.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

/// A disk whose partitions a shell step finds as vmdb2 users' scripts do, the way
/// autopkgtest-build-qemu's spec finds its root and EFI partitions: by listing
/// /dev/mapper/loop*. The step also mounts one of them itself, writes a file, and then
/// waits until the test has looked at the host's /dev/mapper.
const NAMES_SPEC: &str = r#"
steps:
  - mkimg: "{{ output }}"
    size: 64M
  - mklabel: gpt
    device: "{{ output }}"
  - mkpart: primary
    device: "{{ output }}"
    start: 1MiB
    end: 16MiB
    tag: efi
  - mkpart: primary
    device: "{{ output }}"
    start: 16MiB
    end: 32MiB
    tag: data
  - mkpart: primary
    device: "{{ output }}"
    start: 32MiB
    end: 100%
    tag: root
  - kpartx: "{{ output }}"
  - mkfs: vfat
    partition: efi
  - mkfs: ext4
    partition: data
    label: DATA
  - mkfs: ext4
    partition: root
  - mount: root
  - shell: |
      out={{ out | quote }}
      ls -1 /dev/mapper/ > "$out/names"
      for n in /dev/mapper/loop*; do
        dev=$(readlink "$n")
        echo "$n $(cat /sys/block/${dev#/dev/}/loop/offset)" >> "$out/offsets"
      done
      rootdev=$(ls -1 /dev/mapper/loop* | sort | tail -1)
      efidev=$(ls -1 /dev/mapper/loop* | sort | head -1)
      blkid -c /dev/null -o value -s TYPE "$rootdev" > "$out/types"
      blkid -c /dev/null -o value -s TYPE "$efidev" >> "$out/types"
      uuid=$(blkid -c /dev/null -o value -s UUID "$rootdev")
      mkdir -p "$ROOT/etc"
      echo "UUID=$uuid / ext4 errors=remount-ro 0 1" > "$ROOT/etc/fstab"
      datadev=$(ls -1 /dev/mapper/loop*p2)
      blkid -c /dev/null -o value -s LABEL "$datadev" > "$out/label"
      mkdir "$out/mnt"
      mount "$datadev" "$out/mnt"
      echo "written through $datadev" > "$out/mnt/hello"
      umount "$out/mnt"
      touch "$out/waiting"
      i=0
      while [ ! -e "$out/go" ]; do
        i=$((i + 1))
        [ $i -lt 600 ] || exit 1
        sleep 0.1
      done
    root-fs: root
"#;

fn host_dev_mapper() -> Vec<String> {
    listing(Path::new("/dev/mapper"))
}

#[test]
fn partitions_have_vmdb2_names_inside_the_build_only() {
    need_root!();
    let before = host_dev_mapper();
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let spec = write(d.path(), "names.vmdb", NAMES_SPEC);
    let img = d.path().join("names.img");
    let mut child = vmdb()
        .args([
            spec.to_str().unwrap(),
            "--no-cache",
            "--output",
            img.to_str().unwrap(),
            "--variable",
            &format!("out={}", out.display()),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // While the build holds its names: none of them is visible on the host.
    let end = Instant::now() + Duration::from_secs(120);
    while !out.join("waiting").exists() {
        if Instant::now() > end || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            let r = to_run(child.wait_with_output().unwrap());
            panic!("the shell step never ran:\n{}\n{}", r.stdout, r.stderr);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let during = host_dev_mapper();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    std::fs::write(out.join("go"), "").unwrap();
    let r = to_run(child.wait_with_output().unwrap());
    assert_eq!(r.code, 0, "stdout:\n{}\nstderr:\n{}", r.stdout, r.stderr);
    assert_eq!(during, before, "the host's /dev/mapper during the build");
    assert!(
        !mounts.lines().any(|l| l.contains(" /dev/mapper ")),
        "{mounts}"
    );
    assert_eq!(host_dev_mapper(), before, "the host's /dev/mapper after it");
    wait_clean(d.path(), 5).unwrap();

    // The host's own entries (control) stay, and the three partitions of one disk.
    let names = std::fs::read_to_string(out.join("names")).unwrap();
    let names: Vec<&str> = names.lines().collect();
    let loops: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| n.starts_with("loop"))
        .collect();
    let host: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| !n.starts_with("loop"))
        .collect();
    assert_eq!(host, before, "{names:?}");
    assert_eq!(loops.len(), 3, "{names:?}");
    let disk = loops[0].strip_suffix("p1").expect("loopNp1");
    assert!(disk.strip_prefix("loop").unwrap().parse::<u32>().is_ok());
    assert_eq!(
        loops,
        [1, 2, 3].map(|m| format!("{disk}p{m}")),
        "partitions of one disk"
    );
    // Each name is the partition's own device, at the partition's offset.
    assert_eq!(
        std::fs::read_to_string(out.join("offsets")).unwrap(),
        format!(
            "/dev/mapper/{disk}p1 1048576\n/dev/mapper/{disk}p2 16777216\n/dev/mapper/{disk}p3 33554432\n"
        )
    );
    assert_eq!(
        std::fs::read_to_string(out.join("types")).unwrap(),
        "ext4\nvfat\n"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("label")).unwrap(),
        "DATA\n"
    );

    // What the shell wrote through the name it mounted is in the image.
    let data = d.path().join("data.part");
    extract(&img, 32768, 32768, &data);
    assert_eq!(
        tool("debugfs", &["-R", "cat /hello", data.to_str().unwrap()]),
        format!("written through /dev/mapper/{disk}p2\n")
    );
    let root = d.path().join("root.part");
    extract(&img, 65536, 63488, &root);
    let fstab = tool("debugfs", &["-R", "cat /etc/fstab", root.to_str().unwrap()]);
    let uuid = tool(
        "blkid",
        &["-p", "-s", "UUID", "-o", "value", root.to_str().unwrap()],
    );
    assert_eq!(
        fstab,
        format!("UUID={} / ext4 errors=remount-ro 0 1\n", uuid.trim())
    );
}

/// A spec in the dialect of vmdb2's first releases (2017): a partition and its mounted
/// filesystem have separate tags (`part-tag`, then `mount` with `fs-tag`), apt takes a
/// package as its value, and grub is told the root partition and the disk.
const ALPHA_SPEC: &str = r#"steps:
  - mkimg: "{{ image }}"
    size: 2G
  - mklabel: msdos
    device: "{{ image }}"
  - mkpart: primary
    device: "{{ image }}"
    start: 0%
    end: 100%
    part-tag: system
  - mkfs: ext4
    partition: system
  - mount: system
    fs-tag: tree
  - debootstrap: bookworm
    variant: minbase
    target: tree
  - apt: linux-image-amd64
    fs-tag: tree
    recommends: false
  - grub: bios
    root-fs: tree
    root-part: system
    device: "{{ image }}"
"#;

#[test]
fn vmdb2_alpha_forms_validate() {
    let d = tempfile::tempdir().unwrap();
    let spec = write(d.path(), "alpha.vmdb", ALPHA_SPEC);
    let img = d.path().join("alpha.img");
    let r = run(&[
        "validate",
        spec.to_str().unwrap(),
        "--image",
        img.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.ends_with("alpha.vmdb: OK, 8 steps\n"),
        "{}",
        r.stdout
    );
    assert_eq!(listing(d.path()), ["alpha.vmdb"]);
}

/// Mistakes in those forms: a second name that is taken, a value of apt that is no
/// package name, grub told a partition that is not the root filesystem's.
const BAD_ALPHA_SPEC: &str = r#"steps:
  - mkimg: "{{ image }}"
    size: 2G
  - mklabel: msdos
    device: "{{ image }}"
  - mkpart: primary
    device: "{{ image }}"
    start: 0%
    end: 50%
    part-tag: system
  - mkpart: primary
    device: "{{ image }}"
    start: 50%
    end: 100%
    part-tag: other
  - mkfs: ext4
    partition: system
  - mount: system
    fs-tag: other
  - apt: Linux Image
    fs-tag: system
  - grub: bios
    root-fs: system
    root-part: other
    device: "{{ image }}"
"#;

#[test]
fn vmdb2_alpha_forms_are_checked_like_the_current_ones() {
    let d = tempfile::tempdir().unwrap();
    let spec = write(d.path(), "alpha.vmdb", BAD_ALPHA_SPEC);
    let img = d.path().join("alpha.img");
    let r = run(&[spec.to_str().unwrap(), "--image", img.to_str().unwrap()]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    let s = spec.display();
    assert_eq!(
        r.stderr,
        format!(
            "{s}:19:13: step 6 (mount): key 'fs-tag': tag 'other' is already defined by step 4\n\
             {s}:20:10: step 7 (apt): key 'apt': 'Linux Image' is neither 'install' (with 'packages') nor a package name (vmdb2's early form 'apt: PACKAGE')\n\
             {s}:24:16: step 8 (grub): key 'root-part': tag 'other' is not the partition of the root filesystem ('system'); vmdb finds that partition itself: leave root-part out\n\
             vmdb: {s}: 3 problems found; nothing was built\n"
        )
    );
    assert_eq!(listing(d.path()), ["alpha.vmdb"]);
}

#[test]
#[ignore = "builds a Debian image: minutes, needs the Debian archive"]
fn vmdb2_alpha_forms_build() {
    need_root!();
    let d = tempfile::Builder::new()
        .prefix("vmdb-alpha-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let spec = write(d.path(), "alpha.vmdb", ALPHA_SPEC);
    let img = d.path().join("alpha.img");
    let t = Instant::now();
    let r = run(&[spec.to_str().unwrap(), "--image", img.to_str().unwrap()]);
    assert_eq!(r.code, 0, "stdout:\n{}\nstderr:\n{}", r.stdout, r.stderr);
    eprintln!(
        "TIMING built alpha.vmdb in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    wait_clean(d.path(), 5).unwrap();

    let j: serde_json::Value =
        serde_json::from_str(&tool("sfdisk", &["-J", img.to_str().unwrap()])).unwrap();
    let p = &j["partitiontable"]["partitions"][0];
    let part = d.path().join("root.part");
    extract(
        &img,
        p["start"].as_u64().unwrap(),
        p["size"].as_u64().unwrap(),
        &part,
    );
    let cat = |f: &str| {
        tool(
            "debugfs",
            &["-R", &format!("cat {f}"), part.to_str().unwrap()],
        )
    };
    // debootstrap's target and apt's fs-tag, both the second name, reached the
    // filesystem mounted from the partition.
    assert!(cat("/etc/debian_version").starts_with("12."));
    assert!(
        cat("/var/lib/dpkg/status")
            .contains("Package: linux-image-amd64\nStatus: install ok installed\n")
    );
    // grub, told the root partition and the disk, put its boot code on the disk and
    // a menu that finds the root filesystem by its UUID.
    let uuid = tool(
        "blkid",
        &["-p", "-s", "UUID", "-o", "value", part.to_str().unwrap()],
    );
    let cfg = cat("/boot/grub/grub.cfg");
    assert!(cfg.contains(&format!("root=UUID={}", uuid.trim())), "{cfg}");
    let mbr = std::fs::read(&img).map(|b| b[..440].to_vec()).unwrap();
    assert!(
        mbr.windows(4).any(|w| w == b"GRUB"),
        "no GRUB boot code in the MBR"
    );
}
