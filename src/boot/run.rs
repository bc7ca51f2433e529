//! The main loop of `vmdb boot`: start qemu, pump its console through the session
//! until the guest powers off or something fails, and report.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use super::args::BootArgs;
use super::console::{Event, Failure, Output, Phase, Session, make_nonce};
use super::qemu::{
    Arch, Disk, QemuConfig, detect_format, prepare_firmware, qemu_args, shell_words,
};
use super::vm::Vm;
use crate::host::signals;

/// How long to poll between checks for timeout, qemu exit and signals.
pub(super) const POLL: Duration = Duration::from_millis(100);
/// After login, if the console is quiet this long without a prompt, press
/// Enter: a kernel message printed after the prompt hides it from us.
pub(super) const NUDGE_AFTER: Duration = Duration::from_secs(20);
/// How long to wait for qemu to exit after the guest said "Power down".
pub(super) const EXIT_GRACE: Duration = Duration::from_secs(30);
/// Lines of console shown in an error.
pub(super) const TAIL_LINES: usize = 20;

pub(super) struct Options {
    pub(super) qemu: Option<PathBuf>,
    pub(super) handle_signals: bool,
}

pub(super) fn default_log_path(image: &Path) -> PathBuf {
    let mut s = image.as_os_str().to_owned();
    s.push(".console.log");
    PathBuf::from(s)
}

pub(super) fn run_boot(args: &BootArgs, verbose: bool, opts: &Options) -> Result<()> {
    let arch = Arch::parse(&args.arch)?;
    if args.kvm && !arch.kvm_possible() {
        bail!(
            "--kvm cannot run a {} guest on a {} host",
            args.arch,
            std::env::consts::ARCH
        );
    }
    for path in std::iter::once(&args.image).chain(&args.extra_drives) {
        if !path.is_file() {
            bail!("disk image {} does not exist", path.display());
        }
    }
    // Declared before the Vm so it is removed only after qemu is dead.
    let tmp = tempfile::Builder::new()
        .prefix("vmdb-boot-")
        .tempdir()
        .context("creating a temporary directory")?;
    let firmware = if args.uefi || arch == Arch::Aarch64 {
        Some(prepare_firmware(arch, tmp.path())?)
    } else {
        None
    };
    let disks = std::iter::once(&args.image)
        .chain(&args.extra_drives)
        .map(|p| Disk {
            path: p.clone(),
            format: detect_format(p),
        })
        .collect();
    let cfg = QemuConfig {
        arch,
        memory: args.memory,
        kvm: args.kvm,
        snapshot: args.snapshot,
        disks,
        firmware,
    };
    let qargs = qemu_args(&cfg);
    let program = opts
        .qemu
        .clone()
        .unwrap_or_else(|| PathBuf::from(arch.qemu_binary()));

    let log_path = args
        .console_log
        .clone()
        .unwrap_or_else(|| default_log_path(&args.image));
    let mut log = File::create(&log_path)
        .with_context(|| format!("creating console log {}", log_path.display()))?;

    let start = Instant::now();
    let mut vm = Vm::spawn(&program, &qargs, arch)?;
    eprintln!(
        "boot: started qemu (pid {}): {}",
        vm.pid(),
        shell_words(&program, &qargs)
    );
    let mut session = Session::new(&args.user, args.password.clone(), &args.run, &make_nonce());
    let limit = Duration::from_secs(args.timeout);
    let result = drive(&mut vm, &mut session, &mut log, verbose, start, limit, opts);

    match result {
        Ok(()) => {
            let off = start.elapsed();
            // The guest is down; give qemu a moment to exit on its own,
            // but its exit status does not matter any more.
            vm.wait_exit(EXIT_GRACE.min(limit.saturating_sub(off)));
            drop(vm);
            println!(
                "boot: OK: {} booted, logged in as {}, `{}` exited 0, powered off after {:.1}s (console log: {})",
                args.image.display(),
                args.user,
                args.run,
                off.as_secs_f64(),
                log_path.display()
            );
            Ok(())
        }
        Err(failure) => {
            if failure != Failure::Interrupted {
                // The line that gave the failure away is often still
                // arriving; show it whole.
                let until = Instant::now() + Duration::from_millis(500);
                while let Some(left) = until.checked_duration_since(Instant::now()) {
                    let Ok(chunk) = vm.console.recv_timeout(left) else {
                        break;
                    };
                    let _ = log.write_all(&chunk);
                    if verbose {
                        let _ = std::io::stderr().write_all(&chunk);
                    }
                    session.feed(&chunk);
                }
            }
            vm.kill();
            Err(failure_report(
                failure,
                &session,
                &log_path,
                &vm.stderr_text(),
            ))
        }
    }
}

/// The main loop: pump console output through the session until the
/// guest powers off or something fails.
pub(super) fn drive(
    vm: &mut Vm,
    session: &mut Session,
    log: &mut File,
    verbose: bool,
    start: Instant,
    limit: Duration,
    opts: &Options,
) -> Result<(), Failure> {
    let deadline = start + limit;
    let mut last_output = Instant::now();
    let mut handle = |vm: &mut Vm, session: &mut Session, chunk: &[u8]| -> Result<(), Failure> {
        // Logging is best effort: a full disk must not hide the boot result.
        let _ = log.write_all(chunk);
        if verbose {
            let _ = std::io::stderr().write_all(chunk);
        }
        for out in session.feed(chunk) {
            match out {
                Output::Send(text) => vm.send(&text),
                Output::Event(ev) => progress(&ev, start),
                Output::Fail(f) => return Err(f),
            }
        }
        Ok(())
    };
    loop {
        if opts.handle_signals && signals::interrupted() {
            return Err(Failure::Interrupted);
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(Failure::Timeout {
                secs: limit.as_secs(),
                phase: session.phase(),
            });
        }
        match vm.console.recv_timeout(POLL.min(deadline - now)) {
            Ok(chunk) => {
                last_output = Instant::now();
                handle(vm, session, &chunk)?;
            }
            Err(RecvTimeoutError::Timeout) => {
                if let Some(text) = (last_output.elapsed() >= NUDGE_AFTER)
                    .then(|| session.nudge())
                    .flatten()
                {
                    vm.send(&text);
                    last_output = Instant::now();
                }
            }
            // qemu closed its console: it is exiting. Wait a moment
            // for the status below rather than spinning here.
            Err(RecvTimeoutError::Disconnected) => {
                vm.wait_exit(Duration::from_secs(5));
            }
        }
        if session.phase() == Phase::PoweredOff {
            return Ok(());
        }
        if let Some(status) = vm.try_exit() {
            // Output still in the pipe may say why (e.g. a panic).
            while let Ok(chunk) = vm.console.recv_timeout(Duration::from_millis(200)) {
                handle(vm, session, &chunk)?;
            }
            if session.phase() == Phase::PoweredOff {
                return Ok(());
            }
            return Err(Failure::QemuExited {
                code: status.code(),
                phase: session.phase(),
            });
        }
    }
}

pub(super) fn progress(ev: &Event, start: Instant) {
    let t = start.elapsed().as_secs_f64();
    match ev {
        Event::FirstOutput => {
            eprintln!("boot: firmware started (first console output after {t:.1}s)")
        }
        Event::KernelStarted => eprintln!("boot: kernel started after {t:.1}s"),
        Event::LoginPrompt => eprintln!("boot: login prompt after {t:.1}s"),
        Event::LoggedIn => eprintln!("boot: logged in"),
        Event::CommandExited(rc) => eprintln!("boot: command exited {rc}"),
        Event::PowerDown => eprintln!("boot: powered off after {t:.1}s"),
    }
}

pub(super) fn failure_report(
    failure: Failure,
    session: &Session,
    log_path: &Path,
    qemu_stderr: &str,
) -> anyhow::Error {
    let mut msg = format!(
        "boot failed: {failure}\nconsole log: {}\n",
        log_path.display()
    );
    if !qemu_stderr.is_empty() {
        msg.push_str("qemu stderr:\n");
        for line in qemu_stderr.lines() {
            msg.push_str(&format!("  {line}\n"));
        }
    }
    let tail = session.tail(TAIL_LINES);
    if tail.is_empty() {
        msg.push_str("(no console output)");
    } else {
        msg.push_str(&format!("last {} console lines:\n", tail.len()));
        for line in tail {
            msg.push_str(&format!("  | {line}\n"));
        }
    }
    anyhow!(msg.trim_end().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::qemu::OVMF_CODE;

    #[test]
    fn default_console_log_is_beside_image() {
        assert_eq!(
            default_log_path(Path::new("/x/disk.img")),
            PathBuf::from("/x/disk.img.console.log")
        );
    }

    // --- end to end with a fake qemu ---

    /// A shell script standing in for qemu. It picks its behaviour from the
    /// first line of the disk image, talks like a serial console and reacts
    /// to what we type. It runs the typed command line on the host, so the
    /// exit-status marker is really produced by a shell.
    const FAKE_QEMU: &str = r#"#!/bin/bash
img=
code=
vars=
for a in "$@"; do
    case $a in
        file=*,format=*,if=virtio) [ -z "$img" ] && { img=${a#file=}; img=${img%%,format=*}; } ;;
        if=pflash,*unit=0,readonly=on,file=*) code=${a##*file=} ;;
        if=pflash,*unit=1,file=*) vars=${a##*file=} ;;
    esac
done
scenario=$(head -n1 "$img")
echo $$ > "$img.pid"
firmware() {
    printf '\033c\033[?7l\033[2J\033[0mSeaBIOS (version fake)\r\nBooting from Hard Disk...\r\n'
    printf '\033[H\033[2J[    0.000000] Linux version 6.1.0-fake\r\n'
}
login() {
    printf 'Debian GNU/Linux 12 fake ttyS0\r\n\r\nfake lo'
    sleep 0.1
    printf 'gin: '
    read -r user || exit 3
    printf '%s\r\n' "$user"
    if [ "$scenario" = password ]; then
        printf 'Password: '
        read -r pw
        printf '\r\n'
        if [ "$pw" != secret ]; then printf '\r\nLogin incorrect\r\nfake login: '; sleep 100; fi
    fi
    printf 'Linux fake 6.1.0\r\n\r\n\033[?2004hroot@fake:~# '
    read -r cmd || exit 3
    printf '\033[?2004l%s\r\n' "$cmd"
    eval "$cmd"
    printf '\033[?2004hroot@fake:~# '
    read -r cmd || exit 3
    [ "$cmd" = poweroff ] || exit 4
    printf 'poweroff\r\n[  OK  ] Reached target System Power Off.\r\n[   12.345678] reboot: Power down\r\n'
    exit 0
}
case $scenario in
    success|password) firmware; login ;;
    uefi)
        [ "$code" = /usr/share/OVMF/OVMF_CODE_4M.fd ] || { echo "bad code $code" >&2; exit 5; }
        case $vars in /usr/share/*) echo "vars not copied" >&2; exit 5 ;; esac
        [ -w "$vars" ] || { echo "vars not writable" >&2; exit 5; }
        firmware; login ;;
    grub) printf 'GNU GRUB  version 2.06\r\n\r\n\033[0mgrub> '; sleep 100 ;;
    panic) firmware; printf '[    1.0] Kernel panic - not syncing: VFS: Unable to mount root fs\r\n'; sleep 100 ;;
    hang) firmware; sleep 300 & echo $! > "$img.child"; wait ;;
    die) firmware; echo 'fake-qemu: something broke' >&2; exit 1 ;;
    nopoweroff) firmware; printf 'fake login: '; read -r user; printf '# '; read -r cmd; eval "$cmd"; printf '# '; read -r cmd; exit 0 ;;
esac
"#;

    /// Written once per test process, before any test forks (a fork while
    /// the file is open for writing makes exec fail with "text file busy").
    /// It goes to one fixed place, replaced by rename, so test runs leave no
    /// pile of temp dirs and parallel runs never see a half-written file.
    fn fake_qemu() -> &'static Path {
        static PATH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
        PATH.get_or_init(|| {
            use std::os::unix::fs::PermissionsExt;
            let dir = std::env::temp_dir().join("vmdb-boot-fake-qemu");
            std::fs::create_dir_all(&dir).unwrap();
            let mut tmp = tempfile::NamedTempFile::new_in(&dir).unwrap();
            tmp.write_all(FAKE_QEMU.as_bytes()).unwrap();
            std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
            let path = dir.join("qemu-system-x86_64");
            tmp.persist(&path).unwrap();
            path
        })
    }

    struct FakeRun {
        result: Result<()>,
        dir: tempfile::TempDir,
        elapsed: Duration,
    }

    impl FakeRun {
        fn err(&self) -> String {
            format!("{:#}", self.result.as_ref().expect_err("boot should fail"))
        }

        fn pid_file(&self, name: &str) -> Option<i32> {
            std::fs::read_to_string(self.dir.path().join(name))
                .ok()
                .and_then(|s| s.trim().parse().ok())
        }
    }

    fn fake_boot(scenario: &str, tweak: impl FnOnce(&mut BootArgs)) -> FakeRun {
        let qemu = fake_qemu().to_path_buf();
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        std::fs::write(&image, format!("{scenario}\n")).unwrap();
        let mut args = BootArgs {
            image,
            uefi: false,
            arch: "x86_64".into(),
            timeout: 30,
            run: "cat /etc/os-release".into(),
            user: "root".into(),
            password: None,
            console_log: None,
            memory: 1024,
            kvm: false,
            snapshot: false,
            extra_drives: vec![],
        };
        tweak(&mut args);
        let opts = Options {
            qemu: Some(qemu),
            handle_signals: false,
        };
        let t = Instant::now();
        let result = run_boot(&args, false, &opts);
        FakeRun {
            result,
            dir,
            elapsed: t.elapsed(),
        }
    }

    fn alive(pid: i32) -> bool {
        // A zombie (state Z) waiting for someone else to reap it is dead too.
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => !stat
                .rsplit(')')
                .next()
                .is_some_and(|s| s.trim_start().starts_with('Z')),
            Err(_) => false,
        }
    }

    /// SIGKILL is delivered at once, but a loaded machine may take a moment to finish
    /// the process off.
    fn gone_soon(pid: i32) -> bool {
        for _ in 0..100 {
            if !alive(pid) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    #[test]
    fn fake_success() {
        let run = fake_boot("success", |a| a.run = "echo hello; true".into());
        run.result.as_ref().unwrap();
        let log = std::fs::read_to_string(run.dir.path().join("disk.img.console.log")).unwrap();
        assert!(log.contains("fake login: "), "{log}");
        assert!(log.contains("hello\n"), "{log}");
        assert!(log.contains("reboot: Power down"), "{log}");
        assert!(gone_soon(run.pid_file("disk.img.pid").unwrap()));
    }

    #[test]
    fn fake_success_with_password_and_custom_log() {
        let run = fake_boot("password", |a| {
            a.password = Some("secret".into());
            a.console_log = Some(a.image.with_file_name("my.log"));
        });
        run.result.as_ref().unwrap();
        assert!(run.dir.path().join("my.log").exists());
    }

    #[test]
    fn fake_wrong_password() {
        let run = fake_boot("password", |a| a.password = Some("nope".into()));
        assert!(run.err().contains("Login incorrect"), "{}", run.err());
    }

    #[test]
    fn fake_uefi_gets_writable_vars_copy() {
        if !Path::new(OVMF_CODE).exists() {
            eprintln!("skipped: no OVMF");
            return;
        }
        let run = fake_boot("uefi", |a| a.uefi = true);
        run.result.as_ref().unwrap();
    }

    #[test]
    fn fake_command_fails() {
        let run = fake_boot("success", |a| a.run = "exit 3".into());
        let err = run.err();
        assert!(err.contains("the command exited with status 3"), "{err}");
    }

    #[test]
    fn fake_grub_prompt() {
        let run = fake_boot("grub", |_| {});
        let err = run.err();
        assert!(err.contains("`grub>` prompt"), "{err}");
        assert!(err.contains("disk.img.console.log"), "{err}");
        assert!(err.contains("  | grub>"), "{err}");
        assert!(run.elapsed < Duration::from_secs(10));
        assert!(gone_soon(run.pid_file("disk.img.pid").unwrap()));
    }

    #[test]
    fn fake_kernel_panic() {
        let run = fake_boot("panic", |_| {});
        let err = run.err();
        assert!(err.contains("the kernel panicked"), "{err}");
        assert!(err.contains("VFS: Unable to mount root fs"), "{err}");
        assert!(run.elapsed < Duration::from_secs(10));
    }

    #[test]
    fn fake_timeout_kills_whole_process_group() {
        let run = fake_boot("hang", |a| a.timeout = 2);
        let err = run.err();
        assert!(
            err.contains("timed out after 2s while waiting for the login prompt"),
            "{err}"
        );
        assert!(run.elapsed < Duration::from_secs(10));
        assert!(gone_soon(run.pid_file("disk.img.pid").unwrap()));
        // The fake's own child shows that the group was killed, not just qemu.
        assert!(gone_soon(run.pid_file("disk.img.child").unwrap()));
    }

    #[test]
    fn fake_qemu_dies() {
        let run = fake_boot("die", |_| {});
        let err = run.err();
        assert!(
            err.contains("qemu exited with status 1 while waiting for the login prompt"),
            "{err}"
        );
        assert!(err.contains("fake-qemu: something broke"), "{err}");
    }

    #[test]
    fn fake_exit_without_power_down_message() {
        let run = fake_boot("nopoweroff", |a| a.run = "true".into());
        let err = run.err();
        assert!(
            err.contains("qemu exited with status 0 while waiting for the guest to power down"),
            "{err}"
        );
    }

    #[test]
    fn missing_image_and_bad_options() {
        let run = fake_boot("success", |a| a.image = "/nonexistent.img".into());
        assert!(run.err().contains("does not exist"));
        let run = fake_boot("success", |a| {
            a.arch = "i386".into();
            a.uefi = true;
        });
        assert!(
            run.err().contains("not supported for i386"),
            "{}",
            run.err()
        );
        if std::env::consts::ARCH == "x86_64" {
            let run = fake_boot("success", |a| {
                a.arch = "aarch64".into();
                a.kvm = true;
            });
            assert!(run.err().contains("--kvm cannot"), "{}", run.err());
        }
    }

    #[test]
    fn missing_qemu_binary_is_explained() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        std::fs::write(&image, b"x").unwrap();
        let args = BootArgs {
            image,
            uefi: false,
            arch: "x86_64".into(),
            timeout: 5,
            run: "true".into(),
            user: "root".into(),
            password: None,
            console_log: None,
            memory: 256,
            kvm: false,
            snapshot: false,
            extra_drives: vec![],
        };
        let opts = Options {
            qemu: Some("/nonexistent/qemu".into()),
            handle_signals: false,
        };
        let err = format!("{:#}", run_boot(&args, false, &opts).unwrap_err());
        assert!(err.contains("install the qemu-system-x86 package"), "{err}");
    }

    // --- real qemu ---

    /// Boots real qemu (TCG, SeaBIOS) from an empty disk: SeaBIOS says
    /// "Boot failed" and we must stop right away with that reason.
    #[test]
    #[ignore = "needs qemu-system-x86_64"]
    fn real_qemu_bios_empty_disk_fails_fast() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("empty.raw");
        std::fs::write(&image, vec![0u8; 1024 * 1024]).unwrap();
        let args = BootArgs {
            image,
            uefi: false,
            arch: "x86_64".into(),
            timeout: 60,
            run: "true".into(),
            user: "root".into(),
            password: None,
            console_log: None,
            memory: 256,
            kvm: false,
            snapshot: true,
            extra_drives: vec![],
        };
        let opts = Options {
            qemu: None,
            handle_signals: false,
        };
        let t = Instant::now();
        let err = format!("{:#}", run_boot(&args, false, &opts).unwrap_err());
        eprintln!("{err}\n(after {:.1}s)", t.elapsed().as_secs_f64());
        assert!(err.contains("no bootable device"), "{err}");
        assert!(t.elapsed() < Duration::from_secs(30));
    }

    /// Same with OVMF: it finds nothing and starts the UEFI shell.
    #[test]
    #[ignore = "needs qemu-system-x86_64 and ovmf"]
    fn real_qemu_uefi_empty_disk_reaches_uefi_shell() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("empty.raw");
        std::fs::write(&image, vec![0u8; 1024 * 1024]).unwrap();
        let args = BootArgs {
            image,
            uefi: true,
            arch: "x86_64".into(),
            timeout: 120,
            run: "true".into(),
            user: "root".into(),
            password: None,
            console_log: None,
            memory: 256,
            kvm: false,
            snapshot: true,
            extra_drives: vec![],
        };
        let opts = Options {
            qemu: None,
            handle_signals: false,
        };
        let t = Instant::now();
        let err = format!("{:#}", run_boot(&args, false, &opts).unwrap_err());
        eprintln!("{err}\n(after {:.1}s)", t.elapsed().as_secs_f64());
        assert!(err.contains("UEFI shell"), "{err}");
    }
}
