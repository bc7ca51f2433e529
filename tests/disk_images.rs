//! Build real images with the vmdb binary and check them with the system's own tools
//! (sfdisk, blkid, fsck, debugfs, mtools), never with vmdb's code.

mod common;

use std::path::Path;

use common::*;

fn partitions(img: &Path) -> (String, Vec<serde_json::Value>) {
    let j: serde_json::Value =
        serde_json::from_str(&tool("sfdisk", &["-J", &img.to_string_lossy()])).unwrap();
    let t = &j["partitiontable"];
    (
        t["label"].as_str().unwrap().to_string(),
        t["partitions"].as_array().unwrap().clone(),
    )
}

fn part_range(p: &serde_json::Value) -> (u64, u64) {
    (p["start"].as_u64().unwrap(), p["size"].as_u64().unwrap())
}

const GPT_SPEC: &str = r#"
steps:
  - mkimg: "{{ output }}"
    size: 300M
  - mklabel: gpt
    device: "{{ output }}"
  - mkpart: primary
    device: "{{ output }}"
    start: 1M
    end: 65M
    fs-type: fat32
    tag: efi
  - mkpart: primary
    device: "{{ output }}"
    start: 65M
    end: 100%
    tag: root
  - kpartx: "{{ output }}"
  - mkfs: vfat
    partition: efi
    label: ESP
  - mkfs: ext4
    partition: root
    label: rootfs
  - mount: root
  - mount: efi
    mount-on: root
    dirname: /boot/efi
  - create-file: /etc/motd
    contents: "hello from vmdb\n"
    perm: "0600"
  - create-dir: /srv/data
    perm: "0750"
    uid: 1000
  - copy-file: /srv/data/input.txt
    src: input.txt
  - create-file: /boot/efi/EFI/BOOT/hello.txt
    contents: "on the ESP\n"
  - fstab: root
"#;

#[test]
fn gpt_image_with_esp_and_nested_mount() {
    need_root!();
    let d = tempfile::tempdir().unwrap();
    let spec = write(d.path(), "gpt.vmdb", GPT_SPEC);
    write(d.path(), "input.txt", "copied in\n");
    let img = d.path().join("gpt.img");
    let r = run(&[&spec.to_string_lossy(), "--output", &img.to_string_lossy()]);
    assert_eq!(r.code, 0, "stdout:\n{}\nstderr:\n{}", r.stdout, r.stderr);
    assert_eq!(
        listing(d.path()),
        vec!["gpt.img", "gpt.vmdb", "input.txt"],
        "no partial file left"
    );
    wait_clean(d.path(), 5).unwrap();

    // The layout parted would have made for the same spec (see DESIGN.md).
    let (label, parts) = partitions(&img);
    assert_eq!(label, "gpt");
    assert_eq!(parts.len(), 2);
    assert_eq!(part_range(&parts[0]), (2048, 126975 - 2048 + 1));
    assert_eq!(part_range(&parts[1]), (126976, 612351 - 126976 + 1));
    assert_eq!(parts[0]["type"], "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7");
    assert_eq!(parts[1]["type"], "0FC63DAF-8483-4772-8E79-3D69D8477DE4");
    let fdisk = tool("fdisk", &["-l", &img.to_string_lossy()]);
    assert!(!fdisk.to_lowercase().contains("corrupt"), "{fdisk}");

    let esp = d.path().join("esp.part");
    let root = d.path().join("root.part");
    let (s, n) = part_range(&parts[0]);
    extract(&img, s, n, &esp);
    let (s, n) = part_range(&parts[1]);
    extract(&img, s, n, &root);

    assert_eq!(
        tool(
            "blkid",
            &["-p", "-s", "TYPE", "-o", "value", &esp.to_string_lossy()]
        )
        .trim(),
        "vfat"
    );
    assert_eq!(
        tool(
            "blkid",
            &["-p", "-s", "LABEL", "-o", "value", &esp.to_string_lossy()]
        )
        .trim(),
        "ESP"
    );
    assert_eq!(
        tool(
            "blkid",
            &["-p", "-s", "TYPE", "-o", "value", &root.to_string_lossy()]
        )
        .trim(),
        "ext4"
    );
    assert_eq!(
        tool(
            "blkid",
            &["-p", "-s", "LABEL", "-o", "value", &root.to_string_lossy()]
        )
        .trim(),
        "rootfs"
    );
    tool("e2fsck", &["-fn", &root.to_string_lossy()]);
    tool("fsck.vfat", &["-n", &esp.to_string_lossy()]);

    let rs = root.to_string_lossy();
    assert_eq!(
        tool("debugfs", &["-R", "cat /etc/motd", &rs]),
        "hello from vmdb\n"
    );
    assert_eq!(
        tool("debugfs", &["-R", "cat /srv/data/input.txt", &rs]),
        "copied in\n"
    );
    let motd = tool("debugfs", &["-R", "stat /etc/motd", &rs]);
    assert!(motd.contains("Mode:  0600"), "{motd}");
    let data = tool("debugfs", &["-R", "stat /srv/data", &rs]);
    assert!(
        data.contains("Mode:  0750") && data.contains("User:  1000"),
        "{data}"
    );

    // The file written below /boot/efi is in the FAT filesystem, not on the root.
    let es = format!("{}", esp.display());
    let mtype = std::process::Command::new("mtype")
        .env("MTOOLS_SKIP_CHECK", "1")
        .args(["-i", &es, "::/EFI/BOOT/hello.txt"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&mtype.stdout), "on the ESP\n");
    assert!(!tool("debugfs", &["-R", "ls -l /boot/efi", &rs]).contains("EFI"));

    let efi_uuid = tool("blkid", &["-p", "-s", "UUID", "-o", "value", &es])
        .trim()
        .to_string();
    let root_uuid = tool("blkid", &["-p", "-s", "UUID", "-o", "value", &rs])
        .trim()
        .to_string();
    assert_eq!(
        tool("debugfs", &["-R", "cat /etc/fstab", &rs]),
        format!(
            "UUID={root_uuid} / ext4 errors=remount-ro 0 1\nUUID={efi_uuid} /boot/efi vfat umask=0077 0 2\n"
        )
    );
}

#[test]
fn mbr_image_whole_disk() {
    need_root!();
    let d = tempfile::tempdir().unwrap();
    let spec = write(
        d.path(),
        "mbr.vmdb",
        r#"
steps:
  - mkimg: "{{ image }}"
    size: 64M
  - mklabel: msdos
    device: "{{ image }}"
  - mkpart: primary
    device: "{{ image }}"
    start: 0%
    end: 100%
    tag: /
  - kpartx: "{{ image }}"
  - mkfs: ext4
    partition: /
  - mount: /
  - create-file: /hello
    contents: "{{ greeting }}"
"#,
    );
    let img = d.path().join("mbr.img");
    let r = run(&[
        &spec.to_string_lossy(),
        "--image",
        &img.to_string_lossy(),
        "--variable",
        "greeting=hi there",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    wait_clean(d.path(), 5).unwrap();
    let (label, parts) = partitions(&img);
    assert_eq!(label, "dos");
    assert_eq!(parts[0]["type"], "83");
    assert_eq!(part_range(&parts[0]), (2048, 131072 - 2048));
    let root = d.path().join("root.part");
    extract(&img, 2048, 131072 - 2048, &root);
    tool("e2fsck", &["-fn", &root.to_string_lossy()]);
    assert_eq!(
        tool("debugfs", &["-R", "cat /hello", &root.to_string_lossy()]),
        "hi there"
    );
}

/// A loop device over a file, detached (and unmounted) when dropped.
struct TestLoop {
    dev: String,
    mounted: Option<std::path::PathBuf>,
}

impl TestLoop {
    fn new(file: &Path) -> TestLoop {
        let dev = tool("losetup", &["-f", "--show", &file.to_string_lossy()])
            .trim()
            .to_string();
        TestLoop { dev, mounted: None }
    }
}

impl Drop for TestLoop {
    fn drop(&mut self) {
        if let Some(m) = &self.mounted {
            let _ = std::process::Command::new("umount").arg(m).status();
        }
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.dev])
            .status();
    }
}

const SMALL_SPEC: &str = r#"
steps:
  - mkimg: "{{ output }}"
    size: 64M
  - mklabel: gpt
    device: "{{ output }}"
  - mkpart: primary
    device: "{{ output }}"
    start: 0%
    end: 100%
    tag: root
  - mkfs: ext4
    partition: root
  - mount: root
  - create-file: /on-a-device
    contents: "yes"
"#;

#[test]
fn writes_to_a_block_device() {
    need_root!();
    let d = tempfile::tempdir().unwrap();
    let backing = d.path().join("disk");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let l = TestLoop::new(&backing);
    let spec = write(d.path(), "dev.vmdb", SMALL_SPEC);
    let r = run(&[&spec.to_string_lossy(), "--output", &l.dev]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let (label, parts) = partitions(&backing);
    assert_eq!(label, "gpt");
    let (s, n) = part_range(&parts[0]);
    let root = d.path().join("root.part");
    extract(&backing, s, n, &root);
    assert_eq!(
        tool(
            "debugfs",
            &["-R", "cat /on-a-device", &root.to_string_lossy()]
        ),
        "yes"
    );
}

#[test]
fn refuses_a_mounted_block_device() {
    need_root!();
    let d = tempfile::tempdir().unwrap();
    let backing = d.path().join("disk");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let mut l = TestLoop::new(&backing);
    tool("mkfs.ext4", &["-q", &l.dev]);
    let mnt = d.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    tool("mount", &[&l.dev, &mnt.to_string_lossy()]);
    l.mounted = Some(mnt.clone());
    let spec = write(d.path(), "dev.vmdb", SMALL_SPEC);
    let r = run(&[&spec.to_string_lossy(), "--output", &l.dev]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert_eq!(
        r.stderr.trim(),
        format!(
            "vmdb: refusing to write to {}: it is mounted on {}",
            l.dev,
            mnt.display()
        )
    );
    // Untouched: still the ext4 filesystem made above.
    assert_eq!(
        tool(
            "blkid",
            &[
                "-p",
                "-s",
                "TYPE",
                "-o",
                "value",
                &backing.to_string_lossy()
            ]
        )
        .trim(),
        "ext4"
    );
}

// Busy block devices: loop devices stand in for disks. Each is refused, as --output and
// as a step's device, before anything runs (exit 2), and left as it was.

/// Undoes what a test set up on the host (swapon, mounts, loop devices), newest first.
#[derive(Default)]
struct Undo(Vec<Vec<String>>);

impl Undo {
    fn push(&mut self, argv: &[&str]) {
        self.0.push(argv.iter().map(|s| s.to_string()).collect());
    }
}

impl Drop for Undo {
    fn drop(&mut self) {
        while let Some(argv) = self.0.pop() {
            let _ = std::process::Command::new(&argv[0])
                .args(&argv[1..])
                .status();
        }
    }
}

/// A 64 MiB file and a loop device over it.
fn test_disk(d: &Path, name: &str, undo: &mut Undo) -> (std::path::PathBuf, String) {
    let backing = d.join(name);
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let dev = tool("losetup", &["-f", "--show", &backing.to_string_lossy()])
        .trim()
        .to_string();
    undo.push(&["losetup", "-d", &dev]);
    (backing, dev)
}

const DEVICE_STEP_SPEC: &str = r#"steps:
  - mkimg: "{{ output }}"
    size: 64M
  - mklabel: gpt
    device: "{{ disk }}"
  - kpartx: "{{ disk }}"
"#;

/// The device refused with `why`, as --output and as the `device:` of a step (also by
/// `vmdb validate`).
fn assert_refused(d: &Path, dev: &str, why: &str) {
    let spec = write(d, "dev.vmdb", SMALL_SPEC);
    let r = run(&[&spec.to_string_lossy(), "--output", dev]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert_eq!(
        r.stderr,
        format!("vmdb: refusing to write to {dev}: {why}\n")
    );

    let spec = write(d, "steps.vmdb", DEVICE_STEP_SPEC);
    let out = d.join("x.img");
    let disk = format!("disk={dev}");
    let args = [
        &*spec.to_string_lossy(),
        "--output",
        &out.to_string_lossy(),
        "--variable",
        &disk,
    ];
    let msg = format!("refusing to write to {dev}: {why}");
    let want = format!(
        "{sp}:5:13: step 2 (mklabel): key 'device': {msg}\n\
         {sp}:6:13: step 3 (kpartx): key 'kpartx': {msg}\n\
         vmdb: {sp}: 2 problems found; nothing was built\n",
        sp = spec.display()
    );
    let r = run(&args);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert_eq!(r.stderr, want);
    let mut v = vec!["validate"];
    v.extend_from_slice(&args);
    let r = run(&v);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert_eq!(r.stderr, want);
    assert!(!out.exists());
}

fn blkid_type(p: &Path) -> String {
    tool(
        "blkid",
        &["-p", "-s", "TYPE", "-o", "value", &p.to_string_lossy()],
    )
    .trim()
    .to_string()
}

#[test]
fn refuses_a_block_device_used_as_swap() {
    need_root!();
    let d = tempfile::tempdir().unwrap();
    let mut undo = Undo::default();
    let (backing, dev) = test_disk(d.path(), "disk", &mut undo);
    tool("mkswap", &[&dev]);
    tool("swapon", &[&dev]);
    undo.push(&["swapoff", &dev]);
    assert_refused(d.path(), &dev, "it is used as swap");
    assert_eq!(blkid_type(&backing), "swap");
}

#[test]
fn refuses_a_block_device_whose_partition_is_mounted() {
    need_root!();
    let d = tempfile::tempdir().unwrap();
    let mut undo = Undo::default();
    let (backing, dev) = test_disk(d.path(), "disk", &mut undo);
    // A partition at 1 MiB, used through a loop device at its offset (the kernel here
    // makes no partition devices), formatted and mounted.
    let mut c = std::process::Command::new("sfdisk")
        .args(["-q", "--no-reread", &dev])
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
    let part = tool(
        "losetup",
        &[
            "-f",
            "--show",
            "-o",
            "1048576",
            "--sizelimit",
            "66060288",
            &dev,
        ],
    )
    .trim()
    .to_string();
    undo.push(&["losetup", "-d", &part]);
    tool("mkfs.ext4", &["-q", &part]);
    let mnt = d.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    tool("mount", &[&part, &mnt.to_string_lossy()]);
    undo.push(&["umount", &mnt.to_string_lossy()]);
    assert_refused(
        d.path(),
        &dev,
        &format!(
            "{part} over it (at byte 1048576): it is mounted on {}",
            mnt.display()
        ),
    );
    let (label, parts) = partitions(&backing);
    assert_eq!((label.as_str(), parts.len()), ("dos", 1));
    assert_eq!(
        tool("findmnt", &["-n", "-o", "SOURCE", &mnt.to_string_lossy()]).trim(),
        part
    );
}

#[test]
fn refuses_a_mounted_block_device_as_a_steps_device() {
    need_root!();
    let d = tempfile::tempdir().unwrap();
    let mut undo = Undo::default();
    let (backing, dev) = test_disk(d.path(), "disk", &mut undo);
    tool("mkfs.ext4", &["-q", &dev]);
    let mnt = d.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    tool("mount", &[&dev, &mnt.to_string_lossy()]);
    undo.push(&["umount", &mnt.to_string_lossy()]);
    assert_refused(
        d.path(),
        &dev,
        &format!("it is mounted on {}", mnt.display()),
    );
    assert_eq!(blkid_type(&backing), "ext4");
}

#[test]
fn refuses_a_block_device_held_exclusively() {
    need_root!();
    use std::os::unix::fs::OpenOptionsExt;
    let d = tempfile::tempdir().unwrap();
    let mut undo = Undo::default();
    let (backing, dev) = test_disk(d.path(), "disk", &mut undo);
    // Held as RAID, LVM or a program's exclusive open would hold it.
    let hold = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(&dev)
        .unwrap();
    assert_refused(
        d.path(),
        &dev,
        "it is in use: another program holds it exclusively (a mounted filesystem, swap, \
         RAID, LVM or device-mapper)",
    );
    assert_eq!(std::fs::read(&backing).unwrap(), vec![0u8; 64 << 20]);
    drop(hold);
}

fn exclusive_open_is_busy(dev: &str) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    let r = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(dev);
    matches!(r, Err(e) if e.raw_os_error() == Some(libc::EBUSY))
}

#[test]
fn devices_are_held_while_the_build_writes_them() {
    need_root!();
    let d = tempfile::tempdir().unwrap();
    let mut undo = Undo::default();
    let (_, out_dev) = test_disk(d.path(), "out-disk", &mut undo);
    let (_, step_dev) = test_disk(d.path(), "step-disk", &mut undo);
    let mark = d.path().join("mark");
    let wait = format!(
        "  - shell: touch {}; sleep 3\n    root-fs: root\n",
        mark.display()
    );
    // The output device, and a device only a step names.
    let on_step = SMALL_SPEC.replace("{{ output }}", "{{ disk }}");
    for (text, out, dev) in [
        (format!("{SMALL_SPEC}{wait}"), out_dev.clone(), &out_dev),
        (
            format!("{on_step}{wait}"),
            d.path().join("unused.img").display().to_string(),
            &step_dev,
        ),
    ] {
        let _ = std::fs::remove_file(&mark);
        let spec = write(d.path(), "held.vmdb", &text);
        let mut child = vmdb()
            .args([
                &*spec.to_string_lossy(),
                "--output",
                &out,
                "--variable",
                &format!("disk={step_dev}"),
                "--no-cache",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let end = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !mark.exists() {
            if std::time::Instant::now() > end || child.try_wait().unwrap().is_some() {
                let _ = child.kill();
                let r = to_run(child.wait_with_output().unwrap());
                panic!("the shell step did not start: {}", r.stderr);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(exclusive_open_is_busy(dev), "{dev} is not held");
        let r = to_run(child.wait_with_output().unwrap());
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert!(!exclusive_open_is_busy(dev), "{dev} is still held");
    }
}

/// With a PATH without the sbin directories (`su` without `-`, some sudo setups),
/// mkfs.ext4 and blkid (in /usr/sbin) were not found when the mkfs step ran: vmdb now
/// looks there too, and gives the programs it runs that PATH.
#[test]
fn programs_in_sbin_are_run_without_sbin_in_path() {
    need_root!();
    let d = tempfile::tempdir().unwrap();
    let spec = write(
        d.path(),
        "sbin.vmdb",
        &format!(
            "{SMALL_SPEC}  - shell: printf %s \"$PATH\" > \"$ROOT/path\"\n    root-fs: root\n"
        ),
    );
    let img = d.path().join("sbin.img");
    let r = to_run(
        vmdb()
            .env("PATH", "/usr/bin:/bin")
            .args([
                &spec.to_string_lossy()[..],
                "--output",
                &img.to_string_lossy(),
                "--no-cache",
            ])
            .output()
            .unwrap(),
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    wait_clean(d.path(), 5).unwrap();
    let (_, parts) = partitions(&img);
    let (start, size) = part_range(&parts[0]);
    let root = d.path().join("root.part");
    extract(&img, start, size, &root);
    assert_eq!(
        tool("debugfs", &["-R", "cat /path", &root.to_string_lossy()]),
        "/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"
    );
}

/// An image whose tree has links of its own (made by a shell step): Debian's absolute
/// /var/run -> /run, and links naming a directory of the host, absolutely and
/// relatively (climbing above the root). Every file step, fstab and a mount below the
/// root resolve them as the image would: what they write lands in the image, where
/// its links lead there, and nothing on the host changes.
const LINKS_SPEC: &str = r#"
steps:
  - mkimg: "{{ output }}"
    size: 200M
  - mklabel: gpt
    device: "{{ output }}"
  - mkpart: primary
    device: "{{ output }}"
    start: 1M
    end: 33M
    fs-type: fat32
    tag: efi
  - mkpart: primary
    device: "{{ output }}"
    start: 33M
    end: 100%
    tag: root
  - kpartx: "{{ output }}"
  - mkfs: vfat
    partition: efi
  - mkfs: ext4
    partition: root
  - mount: root
  - shell: |
      mkdir -p "$ROOT/run" "$ROOT/var" "$ROOT/srv/app" "$ROOT/CANARY"
      ln -s /run "$ROOT/var/run"
      ln -s CANARY "$ROOT/var/lock"
      ln -s UPCANARY "$ROOT/var/spool"
      ln -s CANARY "$ROOT/etc"
      ln -s CANARY "$ROOT/boot"
      ln -s CANARY "$ROOT/opt"
      ln -s UPCANARY "$ROOT/srv/app/sub"
    root-fs: root
  - mount: efi
    mount-on: root
    dirname: /boot/efi
  - create-dir: /var/run/RUNDIR
  - create-file: /var/lock/created
    contents: "created in the image\n"
  - copy-file: /var/spool/copied
    src: input.txt
  - copy-dir: /opt
    src: tree
  - copy-dir: /srv/app
    src: tree
  - create-file: /boot/efi/EFI/hello.txt
    contents: "on the ESP\n"
  - fstab: root
"#;

#[test]
fn links_in_the_image_never_lead_to_the_host() {
    need_root!();
    let d = tempfile::tempdir().unwrap();
    let base = std::fs::canonicalize(d.path()).unwrap();
    let canary = base.join("canary");
    std::fs::create_dir(&canary).unwrap();
    write(&canary, "file", "host");
    let run_dir = format!("vmdb-imagepaths-test-{}", std::process::id());
    let host_run_dir = Path::new("/run").join(&run_dir);
    let c = canary.display().to_string();
    let up = format!("{}{}", "../".repeat(12), &c[1..]);
    let spec_text = LINKS_SPEC
        .replace("UPCANARY", &up)
        .replace("CANARY", &c)
        .replace("RUNDIR", &run_dir);
    let spec = write(&base, "links.vmdb", &spec_text);
    write(&base, "input.txt", "copied in\n");
    std::fs::create_dir_all(base.join("tree/sub")).unwrap();
    write(&base, "tree/top.txt", "top\n");
    write(&base, "tree/sub/deep.txt", "deep\n");
    let img = base.join("links.img");
    let r = run(&[&spec.to_string_lossy(), "--output", &img.to_string_lossy()]);
    let leaked_run_dir = host_run_dir.exists();
    let _ = std::fs::remove_dir(&host_run_dir);
    wait_clean(&base, 5).unwrap();

    // Nothing on the host changed.
    assert!(!leaked_run_dir, "created {}", host_run_dir.display());
    assert_eq!(listing(&canary), ["file"], "written through a link");
    assert_eq!(std::fs::read(canary.join("file")).unwrap(), b"host");
    assert_eq!(r.code, 0, "stdout:\n{}\nstderr:\n{}", r.stdout, r.stderr);

    // Everything is in the image, where its links lead.
    let (_, parts) = partitions(&img);
    let (esp, root) = (base.join("esp.part"), base.join("root.part"));
    let (s, n) = part_range(&parts[0]);
    extract(&img, s, n, &esp);
    let (s, n) = part_range(&parts[1]);
    extract(&img, s, n, &root);
    let rs = root.to_string_lossy();
    tool("e2fsck", &["-fn", &rs]);
    let cat = |p: &str| tool("debugfs", &["-R", &format!("cat {p}"), &rs]);
    let stat = |p: &str| tool("debugfs", &["-R", &format!("stat {p}"), &rs]);
    assert!(stat("/var/run").contains("Type: symlink"));
    assert!(stat(&format!("/run/{run_dir}")).contains("Type: directory"));
    assert_eq!(cat(&format!("{c}/created")), "created in the image\n");
    assert_eq!(cat(&format!("{c}/copied")), "copied in\n");
    assert_eq!(cat(&format!("{c}/top.txt")), "top\n");
    assert_eq!(cat(&format!("{c}/sub/deep.txt")), "deep\n");
    assert_eq!(cat("/srv/app/top.txt"), "top\n");
    assert!(stat("/srv/app/sub").contains("Type: symlink"));
    assert_eq!(cat(&format!("{c}/deep.txt")), "deep\n");
    // The ESP was mounted where /boot/efi is in the image; the file is in its FAT.
    assert!(stat(&format!("{c}/efi")).contains("Type: directory"));
    let es = esp.to_string_lossy();
    let mtype = std::process::Command::new("mtype")
        .env("MTOOLS_SKIP_CHECK", "1")
        .args(["-i", &es, "::/EFI/hello.txt"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&mtype.stdout), "on the ESP\n");
    let uuid = |f: &str| {
        tool("blkid", &["-p", "-s", "UUID", "-o", "value", f])
            .trim()
            .to_string()
    };
    assert_eq!(
        cat(&format!("{c}/fstab")),
        format!(
            "UUID={} / ext4 errors=remount-ro 0 1\nUUID={} /boot/efi vfat umask=0077 0 2\n",
            uuid(&rs),
            uuid(&es)
        )
    );
}
