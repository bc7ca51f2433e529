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
