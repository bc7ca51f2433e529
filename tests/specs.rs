//! Every example spec in specs/, bench/ and .ci/ validates, with no warning, on this host
//! (so the programs its steps declare are installed here: a declaration that names a
//! program no package has fails here); and validation's checks of the host.

mod common;

use common::*;

#[test]
fn example_specs_validate() {
    let root = env!("CARGO_MANIFEST_DIR");
    let d = tempfile::tempdir().unwrap();
    let never = d.path().join("never-built.img");
    let mut seen = 0;
    for dir in ["specs", "bench", ".ci"] {
        for e in std::fs::read_dir(format!("{root}/{dir}")).unwrap() {
            let p = e.unwrap().path();
            if p.extension().and_then(|x| x.to_str()) != Some("vmdb") {
                continue;
            }
            let r = run(&[
                "validate",
                &p.to_string_lossy(),
                "--output",
                &never.to_string_lossy(),
                "--variable",
                "mirror=http://mirror.invalid/debian",
                // bench/matrix.vmdb takes these from --matrix.
                "--variable",
                "suite=bookworm",
                "--variable",
                "arch=amd64",
                // The tarball steps then need tar and zstd.
                "--rootfs-tarball",
                "/tmp/never-made.tar.zst",
            ]);
            assert_eq!(r.code, 0, "{}:\n{}", p.display(), r.stderr);
            assert_eq!(r.stderr, "", "{}", p.display());
            assert!(r.stdout.contains(": OK, "), "{}", r.stdout);
            seen += 1;
        }
    }
    assert!(seen >= 4, "found only {seen} specs");
    assert_eq!(listing(d.path()), Vec::<String>::new());
}

/// A byte order mark before the first key is allowed, as YAML allows it (it was
/// reported as an unknown top-level key).
#[test]
fn a_byte_order_mark_is_allowed() {
    let d = tempfile::tempdir().unwrap();
    let spec = write(d.path(), "bom.vmdb", "\u{feff}steps:\n  - echo: hello\n");
    let r = run(&["validate", &spec.to_string_lossy()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stderr, "");
    assert!(r.stdout.ends_with("bom.vmdb: OK, 1 step\n"), "{}", r.stdout);
}

const NEEDS_PROGRAMS: &str = r##"steps:
  - mkimg: "{{ output }}"
    size: 1G
  - mklabel: gpt
    device: "{{ output }}"
  - mkpart: efi
    device: "{{ output }}"
    start: 1M
    end: 100M
    tag: efi
  - mkpart: root
    device: "{{ output }}"
    start: 100M
    end: 100%
    tag: /
  - mkfs: vfat
    partition: efi
  - mkfs: ext4
    partition: /
  - mount: /
  - unpack-rootfs: /
  - cache-rootfs: /
  - cloud-init-seed: seed.iso
    user-data: "#cloud-config\n"
  - grub: uefi
    tag: /
    efi: efi
"##;

/// A directory of links to some of the host's programs, to be the whole PATH.
fn path_of(dir: &std::path::Path, programs: &[&str]) -> std::path::PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir(&bin).unwrap();
    for p in programs {
        let target = ["/usr/bin", "/bin"]
            .iter()
            .map(|d| std::path::Path::new(d).join(p))
            .find(|t| t.exists())
            .unwrap_or_else(|| panic!("{p} is not in /usr/bin"));
        std::os::unix::fs::symlink(target, bin.join(p)).unwrap();
    }
    bin
}

/// Programs a step runs are checked by validation (they were found missing only when
/// their step ran): every missing one at once, at the first step that needs it, with
/// its Debian package. Those in the sbin directories are found without them in PATH.
#[test]
fn missing_host_programs_are_found_at_validation() {
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "needs.vmdb", NEEDS_PROGRAMS);
    // tar only: mkfs.vfat, mkfs.ext4 and blkid are in /usr/sbin, which PATH lacks.
    let bin = path_of(d.path(), &["tar"]);
    let r = to_run(
        vmdb()
            .current_dir(d.path())
            .env("PATH", &bin)
            .args(["validate", "needs.vmdb", "--rootfs-tarball", "r.tar.zst"])
            .output()
            .unwrap(),
    );
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert_eq!(
        r.stderr,
        "needs.vmdb:21:20: step 8 (unpack-rootfs): key 'unpack-rootfs': zstd not found (install zstd); step 9 needs it too\n\
         needs.vmdb:23:5: step 10 (cloud-init-seed): key 'format': none of xorriso, genisoimage found (install xorriso or genisoimage)\n\
         needs.vmdb:25:11: step 11 (grub): key 'grub': grub-mkimage not found (install grub-common)\n\
         needs.vmdb:27:10: step 11 (grub): key 'efi': mcopy not found (install mtools)\n\
         vmdb: needs.vmdb: 4 problems found; nothing was built\n"
    );
    assert_eq!(listing(d.path()), ["bin", "needs.vmdb"]);

    // With them, the same spec validates; sbin programs still come from /usr/sbin.
    let bin = d.path().join("bin");
    for p in ["zstd", "xorriso", "grub-mkimage", "mcopy"] {
        if let Some(t) = ["/usr/bin", "/bin"]
            .iter()
            .map(|x| std::path::Path::new(x).join(p))
            .find(|t| t.exists())
        {
            std::os::unix::fs::symlink(t, bin.join(p)).unwrap();
        }
    }
    let r = to_run(
        vmdb()
            .current_dir(d.path())
            .env("PATH", &bin)
            .args(["validate", "needs.vmdb", "--rootfs-tarball", "r.tar.zst"])
            .output()
            .unwrap(),
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
}

/// A template variable in a shell script without `| quote` gets a warning naming the
/// file, line, step and key; the spec still validates.
#[test]
fn an_unquoted_variable_in_a_shell_script_is_warned_about() {
    let d = tempfile::tempdir().unwrap();
    let spec = write(
        d.path(),
        "warn.vmdb",
        "steps:\n  - shell: |\n      echo \"{{ hostname }}\" > \"$ROOT/etc/hostname\"\n      echo {{ hostname | quote }}\n    root-fs: /\n",
    );
    // The shell step wants a mounted root: validate only its text here.
    let r = run(&[
        "validate",
        &spec.to_string_lossy(),
        "--variable",
        "hostname=x\"; touch /tmp/INJECTED; echo \"",
    ]);
    let first = r.stderr.lines().next().unwrap_or_default();
    assert_eq!(
        first,
        format!(
            "{}:3:13: step 1 (shell): key 'shell': warning: {{{{ hostname }}}} goes into the shell script unquoted: a value with quotes or ';' would run commands; write {{{{ hostname | quote }}}} (one shell word: put no quotes around it)",
            spec.display()
        )
    );
    assert_eq!(r.stderr.matches("warning:").count(), 1, "{}", r.stderr);
}
