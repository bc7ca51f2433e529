//! The environment of programs: those run in the image get exactly the documented one,
//! whatever vmdb's own holds (a host TMPDIR once broke a package's postinst); `shell`
//! steps, run on the host, get vmdb's environment and ROOT.
//!
//! The image is a tiny tree of the host's own `sh`, `env` and `sort` with the libraries
//! they need, so that no Debian system has to be downloaded.

mod common;

use std::path::Path;

use common::*;

/// Copy `prog` (resolved) and the shared libraries `ldd` lists for it into `tree`, each
/// at its host path, the program as usr/bin/NAME.
fn copy_with_libraries(prog: &str, name: &str, tree: &Path) {
    let bin = tree.join("usr/bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy(prog, bin.join(name)).unwrap();
    for line in tool("ldd", &[prog]).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        let Some(path) = path.filter(|p| p.starts_with('/')) else {
            continue;
        };
        let dest = tree.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        if !dest.exists() {
            std::fs::copy(path, &dest).unwrap();
        }
    }
}

const SPEC: &str = r#"
steps:
  - mkimg: "{{ output }}"
    size: 64M
  - mklabel: gpt
    device: "{{ output }}"
  - mkpart: root
    device: "{{ output }}"
    start: 0%
    end: 100%
    tag: /
  - mkfs: ext4
    partition: /
  - mount: /
  - shell: |
      cp -a tree/. "$ROOT/"
      env > host-env
    root-fs: /
  - chroot: /
    shell: env | sort > /env-without-locale
  - shell: mkdir -p "$ROOT/usr/lib/locale/C.utf8"
    root-fs: /
  - chroot: /
    shell: env | sort > /env-with-locale
  - shell: cp "$ROOT/env-without-locale" "$ROOT/env-with-locale" .
    root-fs: /
"#;

#[test]
fn programs_in_the_image_get_only_the_documented_environment() {
    need_root!();
    let d = tempfile::tempdir().unwrap();
    let tree = d.path().join("tree");
    copy_with_libraries("/bin/sh", "sh", &tree);
    copy_with_libraries("/usr/bin/env", "env", &tree);
    copy_with_libraries("/usr/bin/sort", "sort", &tree);
    let spec = write(d.path(), "env.vmdb", SPEC);
    // A TMPDIR of the host, as CI systems set it, and whatever else a host may have.
    let host_tmp = d.path().join("host-tmp");
    std::fs::create_dir(&host_tmp).unwrap();
    let mut cmd = vmdb();
    for p in [
        "http_proxy",
        "https_proxy",
        "no_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NO_PROXY",
    ] {
        cmd.env_remove(p);
    }
    cmd.env("TMPDIR", &host_tmp)
        .env("FOO", "bar")
        .env("LANG", "xx_XX.UTF-8")
        .env("LC_ALL", "xx_XX.UTF-8")
        .env("TERM", "xterm-256color")
        .env("HOME", "/nonexistent/home")
        .env("http_proxy", "http://proxy.invalid:3128")
        .env("NO_PROXY", "localhost,.example.org");
    let out = d.path().join("env.img");
    let r = to_run(
        cmd.args([
            &spec.to_string_lossy(),
            "--output",
            &out.to_string_lossy(),
            "--no-cache",
        ])
        .output()
        .unwrap(),
    );
    assert_eq!(r.code, 0, "stdout:\n{}\nstderr:\n{}", r.stdout, r.stderr);
    wait_clean(d.path(), 5).unwrap();

    let expected = |locale: &str| {
        format!(
            "DEBCONF_NONINTERACTIVE_SEEN=true\n\
             DEBIAN_FRONTEND=noninteractive\n\
             HOME=/root\n\
             LANG={locale}\n\
             LC_ALL={locale}\n\
             NO_PROXY=localhost,.example.org\n\
             PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n\
             PWD=/\n\
             http_proxy=http://proxy.invalid:3128\n"
        )
    };
    // Without the C.UTF-8 locale in the image (a tree being bootstrapped), C.
    assert_eq!(
        std::fs::read_to_string(d.path().join("env-without-locale")).unwrap(),
        expected("C")
    );
    assert_eq!(
        std::fs::read_to_string(d.path().join("env-with-locale")).unwrap(),
        expected("C.UTF-8")
    );

    // A shell step runs on the host: vmdb's environment, and ROOT.
    let host_env = std::fs::read_to_string(d.path().join("host-env")).unwrap();
    let lines: Vec<&str> = host_env.lines().collect();
    for want in [
        "FOO=bar".to_string(),
        format!("TMPDIR={}", host_tmp.display()),
        "LANG=xx_XX.UTF-8".to_string(),
        "http_proxy=http://proxy.invalid:3128".to_string(),
    ] {
        assert!(lines.contains(&want.as_str()), "no {want} in:\n{host_env}");
    }
    assert!(
        lines.iter().any(|l| l.starts_with("ROOT=/")),
        "no ROOT in:\n{host_env}"
    );
    // vmdb's scratch space was in that TMPDIR, and is gone.
    assert_eq!(listing(&host_tmp), Vec::<String>::new());
}

/// vmdb keeps its mounts in a private mount namespace; in a chroot into a plain
/// directory, / is no mount point and cannot be made private. It says so and how to
/// fix it, rather than a bare EINVAL, and builds nothing.
#[test]
fn a_chroot_whose_root_is_no_mount_point_is_named_as_the_cause() {
    need_root!();
    let d = tempfile::tempdir().unwrap();
    let tree = d.path().join("chroot");
    copy_with_libraries(env!("CARGO_BIN_EXE_vmdb"), "vmdb", &tree);
    std::fs::create_dir(tree.join("tmp")).unwrap();
    write(&tree, "s.vmdb", "steps:\n  - echo: hello\n");
    let r = to_run(
        std::process::Command::new("chroot")
            // The test suite's TMPDIR is no directory in the tree.
            .env("TMPDIR", "/tmp")
            .arg(&tree)
            .args(["/usr/bin/vmdb", "/s.vmdb", "--output", "/tmp/x.img"])
            .output()
            .unwrap(),
    );
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("/ is not a mount point here (in a chroot?)")
            && r.stderr.contains("mount --bind DIR DIR"),
        "{}",
        r.stderr
    );
    assert_eq!(listing(&tree.join("tmp")), Vec::<String>::new());
}
