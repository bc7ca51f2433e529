//! End to end: specs/ci-worker.vmdb built for bookworm and trixie × amd64 and i386 with
//! one `--matrix` command, each image booted (two at a time), the user "ci" logged in on
//! the console with a password, and in the running system: passwordless sudo, the SSH
//! key, sshd and unattended-upgrades enabled, the updates and security suites. Slow
//! (four cold builds, four emulated boots) and needs the Debian archive: run with
//! `cargo test -- --include-ignored` (scripts/test does).

mod common;

use std::path::Path;
use std::time::Instant;

use common::*;

const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKq7n2vmdbCiWorkerTestKey0000000000000 ci@test";
/// `openssl passwd -6 -salt vmdbtest secret`
const HASH: &str = "$6$vmdbtest$CEV3yLXmNiv6/sWYitgQZStw9fuDB6saJAGZr8SRM3M9Iie7nfcCtF3MapUeyDFeXMCnRNBvHF3FciBfNLf48/";

const CELLS: [(&str, &str); 4] = [
    ("bookworm", "amd64"),
    ("bookworm", "i386"),
    ("trixie", "amd64"),
    ("trixie", "i386"),
];

/// Boot `img` as "ci", run the checks; the console log, for the assertions.
fn boot_and_check(img: &Path, suite: &str, arch: &str) -> String {
    let log = img.with_extension("console.log");
    let check = "set -e; sudo -n true; echo \"who=$(id -un)\"; id -nG | tr ' ' '\\n' | sed 's/^/group=/'; \
                 echo \"arch=$(dpkg --print-architecture)\"; \
                 echo \"ssh=$(systemctl is-active ssh)\"; cat ~/.ssh/authorized_keys; \
                 grep -h '^Suites:' /etc/apt/sources.list.d/debian.sources; \
                 echo \"upgrades=$(systemctl is-enabled unattended-upgrades)\"; \
                 sudo -n apt-config dump APT::Periodic::Unattended-Upgrade";
    let t = Instant::now();
    // i386 images boot on a 64-bit machine: trixie's have the amd64 kernel.
    let r = to_run(
        vmdb()
            .args(["boot", &img.display().to_string(), "--snapshot"])
            .args(["--timeout", "1200", "--user", "ci", "--password", "secret"])
            .args(["--console-log", &log.display().to_string(), "--run", check])
            .output()
            .unwrap(),
    );
    let console = std::fs::read_to_string(&log).unwrap_or_default();
    let tail = last_lines(&console, 40);
    assert_eq!(
        r.code, 0,
        "booting {suite}/{arch}:\n{}\nconsole tail:\n{}",
        r.stderr, tail
    );
    eprintln!(
        "booted {suite}/{arch} and checked it in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    console
}

#[test]
#[ignore = "builds four Debian images and boots them in qemu: many minutes, needs the Debian archive"]
fn the_ci_worker_matrix_builds_and_each_worker_lets_its_user_in() {
    if !is_root() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let r = to_run(
        vmdb()
            .env("VMDB_CACHE_DIR", test_cache_dir())
            .arg(format!(
                "{}/specs/ci-worker.vmdb",
                env!("CARGO_MANIFEST_DIR")
            ))
            .args([
                "--output",
                &format!("{}/{{{{ suite }}}}-{{{{ arch }}}}.img", d.path().display()),
            ])
            .args([
                "--matrix",
                "suite=bookworm,trixie",
                "--matrix",
                "arch=amd64,i386",
            ])
            .args(["-j", "2"])
            .args(["--variable", &format!("ssh_key={KEY}")])
            .args(["--variable", &format!("password_hash={HASH}")])
            .output()
            .unwrap(),
    );
    assert_eq!(r.code, 0, "the matrix build:\n{}\n{}", r.stdout, r.stderr);
    eprintln!(
        "built the 4 CI workers in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    for (suite, arch) in CELLS {
        assert!(d.path().join(format!("{suite}-{arch}.img")).is_file());
    }

    let consoles: Vec<(&str, &str, String)> = std::thread::scope(|s| {
        let halves: Vec<_> = CELLS
            .chunks(2)
            .map(|cells| {
                let dir = d.path();
                s.spawn(move || {
                    cells
                        .iter()
                        .map(|&(suite, arch)| {
                            let img = dir.join(format!("{suite}-{arch}.img"));
                            (suite, arch, boot_and_check(&img, suite, arch))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        halves.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    for (suite, arch, console) in consoles {
        let expect = [
            "who=ci".to_string(),
            "group=sudo".to_string(),
            "group=sbuild".to_string(),
            format!("arch={arch}"),
            "ssh=active".to_string(),
            KEY.to_string(),
            format!("Suites: {suite} {suite}-updates"),
            format!("Suites: {suite}-security"),
            "upgrades=enabled".to_string(),
            "APT::Periodic::Unattended-Upgrade \"1\";".to_string(),
            "ci@ci-worker".to_string(),
        ];
        for e in expect {
            assert!(
                console.contains(&e),
                "{suite}/{arch}: {e:?} not in the console log:\n{console}"
            );
        }
    }
}
