//! `vmdb boot`: boot a disk image in qemu and prove that it works.
//!
//! The guest's serial console is qemu's stdio. We read it continuously,
//! log every byte, and drive a small state machine over it:
//! log in, run one command, check its exit status, power off. Anything
//! that shows the boot went wrong (GRUB prompt, UEFI shell, kernel panic,
//! initramfs shell, firmware finding nothing to boot, qemu dying, timeout)
//! fails fast with the reason and the tail of the console.
//!
//! The console logic (`Session`) is pure: it takes bytes and returns what
//! to send and what happened, so it can be tested with canned transcripts.
//! The qemu command line (`qemu_args`) is likewise a pure function.

use anyhow::{Context, Result, anyhow, bail};
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::host::signals;

#[derive(clap::Args, Debug, Clone)]
pub struct BootArgs {
    /// Disk image to boot (raw or qcow2; detected by extension .qcow2 or via qemu-img info)
    pub image: PathBuf,
    /// Boot with UEFI firmware (OVMF) instead of BIOS
    #[arg(long)]
    pub uefi: bool,
    /// Guest architecture: x86_64, i386 or aarch64 (aarch64 always uses UEFI)
    #[arg(long, default_value = "x86_64")]
    pub arch: String,
    /// Seconds allowed for the whole boot, login, command and power-off
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// Command run after login; its exit status must be 0
    #[arg(long, default_value = "cat /etc/os-release")]
    pub run: String,
    /// User to log in as
    #[arg(long, default_value = "root")]
    pub user: String,
    /// Password, sent if a Password: prompt appears (an empty line otherwise)
    #[arg(long)]
    pub password: Option<String>,
    /// Where to write the console log (default: IMAGE.console.log beside the image)
    #[arg(long)]
    pub console_log: Option<PathBuf>,
    /// Guest memory in MiB
    #[arg(long, default_value_t = 1024)]
    pub memory: u32,
    /// Use KVM instead of TCG emulation
    #[arg(long)]
    pub kvm: bool,
    /// Pass -snapshot so the image is not modified
    #[arg(long)]
    pub snapshot: bool,
    /// Extra disk to attach (e.g. a cloud-init seed); may be repeated
    #[arg(long = "drive")]
    pub extra_drives: Vec<PathBuf>,
}

/// Boot the image and check it works. Progress goes to stderr; with
/// `verbose` the console is echoed to stderr too.
///
/// The env var VMDB_QEMU, if set, names the qemu binary to run instead of
/// qemu-system-ARCH (used by tests, and handy for wrappers).
pub fn boot(args: &BootArgs, verbose: bool) -> Result<()> {
    let opts = Options {
        qemu: std::env::var_os("VMDB_QEMU").map(PathBuf::from),
        handle_signals: true,
    };
    // Catch Ctrl-C/SIGTERM so we can kill qemu and remove temp files
    // ourselves; PR_SET_PDEATHSIG covers the cases where we cannot.
    signals::catch(|_| {})?;
    run_boot(args, verbose, &opts)
}

const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
const AAVMF_CODE: &str = "/usr/share/AAVMF/AAVMF_CODE.fd";
const AAVMF_VARS: &str = "/usr/share/AAVMF/AAVMF_VARS.fd";

/// How long to poll between checks for timeout, qemu exit and signals.
const POLL: Duration = Duration::from_millis(100);
/// After login, if the console is quiet this long without a prompt, press
/// Enter: a kernel message printed after the prompt hides it from us.
const NUDGE_AFTER: Duration = Duration::from_secs(20);
const MAX_NUDGES: u32 = 3;
/// How long to wait for qemu to exit after the guest said "Power down".
const EXIT_GRACE: Duration = Duration::from_secs(30);
/// Lines of console shown in an error.
const TAIL_LINES: usize = 20;

struct Options {
    qemu: Option<PathBuf>,
    handle_signals: bool,
}

// ---------------------------------------------------------------------------
// qemu command line

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arch {
    X86_64,
    I386,
    Aarch64,
}

impl Arch {
    fn parse(s: &str) -> Result<Arch> {
        match s {
            "x86_64" | "amd64" => Ok(Arch::X86_64),
            "i386" | "i686" => Ok(Arch::I386),
            "aarch64" | "arm64" => Ok(Arch::Aarch64),
            _ => bail!("unsupported --arch {s:?}: use x86_64, i386 or aarch64"),
        }
    }

    fn qemu_binary(self) -> &'static str {
        match self {
            Arch::X86_64 => "qemu-system-x86_64",
            Arch::I386 => "qemu-system-i386",
            Arch::Aarch64 => "qemu-system-aarch64",
        }
    }

    fn debian_package(self) -> &'static str {
        match self {
            Arch::X86_64 | Arch::I386 => "qemu-system-x86",
            Arch::Aarch64 => "qemu-system-arm",
        }
    }

    /// KVM can only run guests of the host's own architecture.
    fn kvm_possible(self) -> bool {
        matches!(
            (self, std::env::consts::ARCH),
            (Arch::X86_64, "x86_64") | (Arch::I386, "x86_64" | "x86") | (Arch::Aarch64, "aarch64")
        )
    }
}

#[derive(Debug, Clone)]
struct Disk {
    path: PathBuf,
    format: String,
}

/// Firmware flash images: read-only code, and a per-boot writable copy of
/// the variable store (the firmware writes boot entries into it, and the
/// system copy must stay pristine).
#[derive(Debug, Clone)]
struct Firmware {
    code: PathBuf,
    vars: PathBuf,
}

#[derive(Debug, Clone)]
struct QemuConfig {
    arch: Arch,
    memory: u32,
    kvm: bool,
    snapshot: bool,
    /// The image first, then extra drives.
    disks: Vec<Disk>,
    firmware: Option<Firmware>,
}

fn qemu_args(cfg: &QemuConfig) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |s: &str| a.push(OsString::from(s));
    if cfg.arch == Arch::Aarch64 {
        // qemu-system-aarch64 has no default machine; "virt" is the generic one.
        for s in ["-M", "virt", "-cpu", "cortex-a57"] {
            push(s);
        }
    }
    // -cpu host aborts on this kind of host, so KVM uses the default CPU too.
    push("-accel");
    push(if cfg.kvm { "kvm" } else { "tcg" });
    push("-m");
    push(&cfg.memory.to_string());
    // -nographic (not -display none) matters: only then does SeaBIOS print
    // to the serial port, so "No bootable device" reaches us.
    for s in [
        "-nographic",
        "-serial",
        "mon:stdio",
        "-no-reboot",
        "-net",
        "none",
    ] {
        push(s);
    }
    if cfg.snapshot {
        push("-snapshot");
    }
    if let Some(fw) = &cfg.firmware {
        a.push("-drive".into());
        a.push(opt_with_file(
            "if=pflash,format=raw,unit=0,readonly=on,file=",
            &fw.code,
        ));
        a.push("-drive".into());
        a.push(opt_with_file("if=pflash,format=raw,unit=1,file=", &fw.vars));
    }
    for d in &cfg.disks {
        a.push("-drive".into());
        let mut opt = opt_with_file("file=", &d.path);
        opt.push(format!(",format={},if=virtio", d.format));
        a.push(opt);
    }
    a
}

/// qemu splits -drive options on commas; a comma in a file name is written
/// as two commas.
fn opt_with_file(prefix: &str, path: &Path) -> OsString {
    let mut bytes = prefix.as_bytes().to_vec();
    for &b in path.as_os_str().as_bytes() {
        bytes.push(b);
        if b == b',' {
            bytes.push(b',');
        }
    }
    OsString::from_vec(bytes)
}

fn detect_format(path: &Path) -> String {
    let is_qcow2 = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("qcow2"));
    if is_qcow2 {
        return "qcow2".into();
    }
    // -U: don't take the image lock, another process may hold it.
    let out = Command::new("qemu-img")
        .arg("info")
        .arg("-U")
        .arg(path)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output();
    match out {
        Ok(o) if o.status.success() => {
            parse_qemu_img_format(&String::from_utf8_lossy(&o.stdout)).unwrap_or("raw".into())
        }
        // Without qemu-img, raw is the only thing we can assume.
        _ => "raw".into(),
    }
}

/// The first "file format:" line of `qemu-img info` is the top-level image;
/// later ones belong to child nodes.
fn parse_qemu_img_format(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("file format:"))
        .map(|f| f.trim().to_string())
        .filter(|f| !f.is_empty())
}

fn default_log_path(image: &Path) -> PathBuf {
    let mut s = image.as_os_str().to_owned();
    s.push(".console.log");
    PathBuf::from(s)
}

fn prepare_firmware(arch: Arch, dir: &Path) -> Result<Firmware> {
    let (code, vars, package) = match arch {
        Arch::X86_64 => (OVMF_CODE, OVMF_VARS, "ovmf"),
        Arch::Aarch64 => (AAVMF_CODE, AAVMF_VARS, "qemu-efi-aarch64"),
        Arch::I386 => bail!("--uefi is not supported for i386 guests"),
    };
    for f in [code, vars] {
        if !Path::new(f).exists() {
            bail!("UEFI firmware {f} not found (install the {package} package)");
        }
    }
    let copy = dir.join(Path::new(vars).file_name().unwrap_or(OsStr::new("VARS.fd")));
    std::fs::copy(vars, &copy)
        .with_context(|| format!("copying UEFI variable store {vars} to {}", copy.display()))?;
    Ok(Firmware {
        code: code.into(),
        vars: copy,
    })
}

fn shell_words(program: &Path, args: &[OsString]) -> String {
    std::iter::once(program.as_os_str())
        .chain(args.iter().map(|a| a.as_os_str()))
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

// ---------------------------------------------------------------------------
// Console: escape stripping and the login/command/poweroff state machine

/// Removes terminal escape sequences and carriage returns so that plain
/// substring matching works on what firmware, GRUB and getty print. Keeps
/// state between calls because a sequence can be split across reads.
#[derive(Debug, Default)]
struct AnsiStripper {
    state: EscState,
    seq_len: usize,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum EscState {
    #[default]
    Text,
    Esc,
    /// ESC followed by intermediate bytes, e.g. "ESC ( B".
    EscIntermediate,
    /// "ESC [" ... final byte.
    Csi,
    /// OSC/DCS etc.: runs to BEL or "ESC \".
    Str,
    StrEsc,
}

/// A malformed sequence must not swallow the rest of the console.
const MAX_SEQ: usize = 128;

impl AnsiStripper {
    fn push(&mut self, input: &[u8], out: &mut Vec<u8>) {
        for &b in input {
            if self.state != EscState::Text {
                self.seq_len += 1;
                if self.seq_len > MAX_SEQ {
                    self.state = EscState::Text;
                }
            }
            self.state = match self.state {
                EscState::Text => match b {
                    0x1b => {
                        self.seq_len = 0;
                        EscState::Esc
                    }
                    b'\n' | b'\t' => {
                        out.push(b);
                        EscState::Text
                    }
                    // \r and other controls carry no text.
                    0..=0x1f | 0x7f => EscState::Text,
                    _ => {
                        out.push(b);
                        EscState::Text
                    }
                },
                EscState::Esc => match b {
                    b'[' => EscState::Csi,
                    b']' | b'P' | b'X' | b'^' | b'_' => EscState::Str,
                    0x20..=0x2f => EscState::EscIntermediate,
                    _ => EscState::Text,
                },
                EscState::EscIntermediate => match b {
                    0x20..=0x2f => EscState::EscIntermediate,
                    _ => EscState::Text,
                },
                EscState::Csi => match b {
                    0x40..=0x7e => EscState::Text,
                    _ => EscState::Csi,
                },
                EscState::Str => match b {
                    0x07 => EscState::Text,
                    0x1b => EscState::StrEsc,
                    _ => EscState::Str,
                },
                EscState::StrEsc => match b {
                    b'\\' => EscState::Text,
                    _ => EscState::Str,
                },
            };
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    WaitLogin,
    WaitShell,
    WaitResult,
    WaitPowerDown,
    PoweredOff,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            Phase::WaitLogin => "waiting for the login prompt",
            Phase::WaitShell => "waiting for a shell prompt after login",
            Phase::WaitResult => "waiting for the command to finish",
            Phase::WaitPowerDown => "waiting for the guest to power down",
            Phase::PoweredOff => "after power-down",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    GrubPrompt,
    GrubRescue,
    UefiShell,
    InitramfsShell,
    KernelPanic,
    NoBootableDevice,
    LoginIncorrect,
    CommandFailed(i32),
    /// `code` is None when qemu was killed by a signal.
    QemuExited {
        code: Option<i32>,
        phase: Phase,
    },
    Timeout {
        secs: u64,
        phase: Phase,
    },
    Interrupted,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Failure::GrubPrompt => write!(
                f,
                "GRUB dropped to its `grub>` prompt: it found no usable configuration or kernel"
            ),
            Failure::GrubRescue => write!(
                f,
                "GRUB dropped to `grub rescue>`: it could not find its own files"
            ),
            Failure::UefiShell => write!(
                f,
                "the firmware started the UEFI shell: no bootable EFI system partition/loader was found"
            ),
            Failure::InitramfsShell => write!(
                f,
                "the initramfs gave up and started its `(initramfs)` shell: root file system not found"
            ),
            Failure::KernelPanic => write!(f, "the kernel panicked"),
            Failure::NoBootableDevice => write!(
                f,
                "the firmware found no bootable device (\"No bootable device\"/\"Boot failed\")"
            ),
            Failure::LoginIncorrect => write!(f, "login was refused (\"Login incorrect\")"),
            Failure::CommandFailed(rc) => write!(f, "the command exited with status {rc}"),
            Failure::QemuExited { code, phase } => {
                match code {
                    Some(c) => write!(f, "qemu exited with status {c}")?,
                    None => write!(f, "qemu was killed by a signal")?,
                }
                write!(f, " while {phase}, before the guest powered off")
            }
            Failure::Timeout { secs, phase } => write!(f, "timed out after {secs}s while {phase}"),
            Failure::Interrupted => write!(f, "interrupted"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Event {
    FirstOutput,
    KernelStarted,
    LoginPrompt,
    LoggedIn,
    CommandExited(i32),
    PowerDown,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Output {
    Send(String),
    Event(Event),
    Fail(Failure),
}

/// Text meaning the boot went wrong. Only checked before the login prompt:
/// after login the command's own output could contain any of them.
const BOOT_FAILURES: &[(&str, Failure)] = &[
    ("grub rescue>", Failure::GrubRescue),
    ("grub>", Failure::GrubPrompt),
    ("UEFI Interactive Shell", Failure::UefiShell),
    ("Shell> ", Failure::UefiShell),
    ("(initramfs)", Failure::InitramfsShell),
    ("No bootable device", Failure::NoBootableDevice),
    ("Boot failed", Failure::NoBootableDevice),
    ("Boot Failed", Failure::NoBootableDevice),
    ("Kernel panic", Failure::KernelPanic),
];
/// A panic can happen at any time, but while the command runs we cannot
/// tell its output from the kernel's, so it is not checked then.
const PANIC: (&str, Failure) = ("Kernel panic", Failure::KernelPanic);
/// Longest pattern above; new text is scanned with this much overlap so a
/// pattern split across two reads is still found.
const SCAN_OVERLAP: usize = 32;

/// Rolling buffer bounds: the command may print a lot, we only need the end.
const BUFFER_LIMIT: usize = 256 * 1024;
const BUFFER_KEEP: usize = 64 * 1024;

pub(crate) struct Session {
    user: String,
    password: Option<String>,
    command: String,
    marker: String,
    phase: Phase,
    strip: AnsiStripper,
    /// Console text with escapes and \r removed.
    buf: Vec<u8>,
    /// Start of the text the current phase looks at; earlier text belongs
    /// to earlier phases and must not match again.
    consumed: usize,
    /// End of the text already scanned for failures.
    scanned: usize,
    /// End of the text already searched for the current phase's patterns.
    searched: usize,
    seen_output: bool,
    seen_kernel: bool,
    password_sent: bool,
    nudges: u32,
}

impl Session {
    pub(crate) fn new(user: &str, password: Option<String>, run: &str, nonce: &str) -> Session {
        let (command, marker) = command_line(run, nonce);
        Session {
            user: user.into(),
            password,
            command,
            marker,
            phase: Phase::WaitLogin,
            strip: AnsiStripper::default(),
            buf: Vec::new(),
            consumed: 0,
            scanned: 0,
            searched: 0,
            seen_output: false,
            seen_kernel: false,
            password_sent: false,
            nudges: 0,
        }
    }

    pub(crate) fn phase(&self) -> Phase {
        self.phase
    }

    /// Feed raw console bytes; returns what to send and what happened, in
    /// order. A `Fail` is always last.
    pub(crate) fn feed(&mut self, bytes: &[u8]) -> Vec<Output> {
        let mut out = Vec::new();
        if !self.seen_output && !bytes.is_empty() {
            self.seen_output = true;
            out.push(Output::Event(Event::FirstOutput));
        }
        self.strip.push(bytes, &mut self.buf);
        loop {
            if let Some(f) = self.scan_new_text(&mut out) {
                out.push(Output::Fail(f));
                return out;
            }
            if !self.advance(&mut out) {
                break;
            }
            if matches!(out.last(), Some(Output::Fail(_))) {
                return out;
            }
        }
        self.trim_buffer();
        out
    }

    /// Check text not yet scanned (within the current phase) for failures
    /// and for the kernel-started milestone.
    fn scan_new_text(&mut self, out: &mut Vec<Output>) -> Option<Failure> {
        let from = self.scanned.saturating_sub(SCAN_OVERLAP).max(self.consumed);
        self.scanned = self.buf.len();
        let hay = &self.buf[from..];
        let patterns: &[(&str, Failure)] = match self.phase {
            Phase::WaitLogin => BOOT_FAILURES,
            Phase::WaitShell | Phase::WaitPowerDown => std::slice::from_ref(&PANIC),
            Phase::WaitResult | Phase::PoweredOff => &[],
        };
        if self.phase == Phase::WaitLogin
            && !self.seen_kernel
            && find(hay, "Linux version ").is_some()
        {
            self.seen_kernel = true;
            out.push(Output::Event(Event::KernelStarted));
        }
        // Report whichever failure appears first in the text.
        patterns
            .iter()
            .filter_map(|(p, f)| find(hay, p).map(|pos| (pos, *f)))
            .min_by_key(|(pos, _)| *pos)
            .map(|(_, f)| f)
    }

    /// Try to move to the next phase. Returns true if it did (or failed),
    /// so the caller looks at the rest of the text again.
    fn advance(&mut self, out: &mut Vec<Output>) -> bool {
        // Only look at new text (plus overlap for split patterns): the
        // command may print a lot, and rescanning it all would be quadratic.
        let base = self
            .searched
            .saturating_sub(SCAN_OVERLAP)
            .max(self.consumed);
        self.searched = self.buf.len();
        let region = &self.buf[base..];
        match self.phase {
            Phase::WaitLogin => {
                if let Some(pos) = find(region, "login:") {
                    self.enter(Phase::WaitShell, base + pos + "login:".len());
                    out.push(Output::Event(Event::LoginPrompt));
                    out.push(Output::Send(format!("{}\n", self.user)));
                    return true;
                }
            }
            Phase::WaitShell => {
                if find(region, "Login incorrect").is_some() {
                    out.push(Output::Fail(Failure::LoginIncorrect));
                    return true;
                }
                if !self.password_sent
                    && let Some(pos) = find(region, "Password:")
                {
                    self.password_sent = true;
                    self.consumed = base + pos + "Password:".len();
                    self.searched = self.consumed;
                    let pw = self.password.clone().unwrap_or_default();
                    out.push(Output::Send(format!("{pw}\n")));
                    return true;
                }
                // A prompt is the last thing printed before the shell waits.
                let all = &self.buf[self.consumed..];
                if all.ends_with(b"# ") || all.ends_with(b"$ ") {
                    self.enter(Phase::WaitResult, self.buf.len());
                    out.push(Output::Event(Event::LoggedIn));
                    out.push(Output::Send(format!("{}\n", self.command)));
                    return true;
                }
            }
            Phase::WaitResult => {
                if let Some(pos) = find(region, &self.marker) {
                    let start = pos + self.marker.len();
                    let rest = &region[start..];
                    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
                    match rest.get(digits) {
                        // Status not complete yet: look here again next time.
                        None => {
                            self.consumed = base + pos;
                            self.searched = self.consumed;
                            return false;
                        }
                        Some(b'\n') if digits > 0 => {
                            let rc: i32 = std::str::from_utf8(&rest[..digits])
                                .ok()
                                .and_then(|s| s.parse().ok())
                                .unwrap_or(-1);
                            let end = base + start + digits + 1;
                            out.push(Output::Event(Event::CommandExited(rc)));
                            if rc == 0 {
                                self.enter(Phase::WaitPowerDown, end);
                                // Only root may power off; another user goes through sudo.
                                let off = if self.user == "root" {
                                    "poweroff\n"
                                } else {
                                    "sudo -n poweroff || poweroff\n"
                                };
                                out.push(Output::Send(off.into()));
                            } else {
                                out.push(Output::Fail(Failure::CommandFailed(rc)));
                            }
                            return true;
                        }
                        // Garbled; skip this occurrence.
                        Some(_) => {
                            self.consumed = base + start;
                            self.searched = self.consumed;
                            return true;
                        }
                    }
                }
            }
            Phase::WaitPowerDown => {
                // The kernel prints "reboot: Power down"; match the
                // part without the prefix, which older kernels lack.
                if let Some(pos) = find(region, "Power down") {
                    self.enter(Phase::PoweredOff, base + pos);
                    out.push(Output::Event(Event::PowerDown));
                    return true;
                }
            }
            Phase::PoweredOff => {}
        }
        false
    }

    fn enter(&mut self, phase: Phase, consumed: usize) {
        self.phase = phase;
        self.consumed = consumed;
        self.scanned = consumed;
        self.searched = consumed;
    }

    /// Called when the console has been quiet for a while. After login, a
    /// kernel message may have been printed after the shell prompt, hiding
    /// it; Enter makes the shell print a fresh one. Only done once login
    /// has clearly moved past the user name (a line after the echoed name),
    /// so the Enter cannot be taken as a password.
    pub(crate) fn nudge(&mut self) -> Option<String> {
        if self.phase != Phase::WaitShell || self.nudges >= MAX_NUDGES {
            return None;
        }
        let region = &self.buf[self.consumed..];
        let lines = region.iter().filter(|&&b| b == b'\n').count();
        let past_user = self.password_sent || lines >= 2;
        if region.ends_with(b"\n") && past_user {
            self.nudges += 1;
            return Some("\n".into());
        }
        None
    }

    fn trim_buffer(&mut self) {
        if self.buf.len() > BUFFER_LIMIT {
            let cut = self.buf.len() - BUFFER_KEEP;
            self.buf.drain(..cut);
            self.consumed = self.consumed.saturating_sub(cut);
            self.scanned = self.scanned.saturating_sub(cut);
            self.searched = self.searched.saturating_sub(cut);
        }
    }

    /// The last `n` lines of cleaned console text.
    pub(crate) fn tail(&self, n: usize) -> Vec<String> {
        let text = String::from_utf8_lossy(&self.buf);
        let lines: Vec<&str> = text.trim_end().lines().collect();
        let skip = lines.len().saturating_sub(n);
        lines[skip..].iter().map(|l| l.to_string()).collect()
    }
}

/// The line typed into the guest shell, and the marker its output carries.
/// printf assembles the marker from separate words, so the shell echoing
/// the typed line never contains the marker itself. The subshell keeps an
/// `exit` in the user's command from ending the login session.
fn command_line(run: &str, nonce: &str) -> (String, String) {
    let command = format!("( {run} ); printf '%s-%s-RC=%s\\n' VMDB {nonce} \"$?\"");
    let marker = format!("VMDB-{nonce}-RC=");
    (command, marker)
}

fn make_nonce() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{:x}", nanos ^ std::process::id().rotate_left(16))
}

fn find(hay: &[u8], needle: &str) -> Option<usize> {
    let needle = needle.as_bytes();
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

// ---------------------------------------------------------------------------
// Running qemu

/// A running qemu in its own process group. Dropping it kills the group,
/// so no exit path can leave qemu behind.
struct Vm {
    child: Child,
    stdin: Option<ChildStdin>,
    console: Receiver<Vec<u8>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    status: Option<ExitStatus>,
}

impl Vm {
    fn spawn(program: &Path, args: &[OsString], arch: Arch) -> Result<Vm> {
        let parent = nix::unistd::getpid();
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Own process group: Ctrl-C in the terminal reaches only us,
            // and we can kill qemu with everything it started in one go.
            .process_group(0);
        // SAFETY: only async-signal-safe calls (prctl, getppid) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // If vmdb dies without cleaning up (SIGKILL, panic=abort),
                // the kernel kills qemu for us.
                signals::die_with_parent()?;
                // We may have died before that took effect.
                if nix::unistd::getppid() != parent {
                    return Err(std::io::Error::other("vmdb is gone"));
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                anyhow!(
                    "{} not found (install the {} package, or set VMDB_QEMU)",
                    program.display(),
                    arch.debian_package()
                )
            } else {
                anyhow!("starting {}: {e}", program.display())
            }
        })?;

        let mut stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match stdout.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if tx.send(buf[..n].to_vec()).is_err() {
                            break;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                }
            }
        });

        // qemu's own complaints (bad image, missing firmware) go into the
        // error message; keep only the start, it is where the cause is.
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let mut err_pipe = child.stderr.take().expect("stderr is piped");
        let sink = Arc::clone(&stderr);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err_pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let mut s = sink.lock().unwrap_or_else(|p| p.into_inner());
                if s.len() < 16 * 1024 {
                    s.extend_from_slice(&buf[..n]);
                }
            }
        });

        let stdin = child.stdin.take();
        Ok(Vm {
            child,
            stdin,
            console: rx,
            stderr,
            status: None,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn send(&mut self, text: &str) {
        // A failed write means qemu is gone; the main loop notices that.
        if let Some(stdin) = self.stdin.as_mut() {
            let _ = stdin.write_all(text.as_bytes());
            let _ = stdin.flush();
        }
    }

    fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let until = Instant::now() + limit;
        while Instant::now() < until {
            if let Some(s) = self.try_exit() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.try_exit()
    }

    fn stderr_text(&self) -> String {
        let s = self.stderr.lock().unwrap_or_else(|p| p.into_inner());
        String::from_utf8_lossy(&s).trim().to_string()
    }

    fn kill(&mut self) {
        // The whole group: qemu may have helpers, and a wrapper script
        // standing in for qemu has children.
        signals::send_group(self.child.id(), Signal::SIGKILL);
        if self.status.is_none() {
            self.status = self.child.wait().ok();
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stdin = None;
        self.kill();
    }
}

fn run_boot(args: &BootArgs, verbose: bool, opts: &Options) -> Result<()> {
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
fn drive(
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
                if last_output.elapsed() >= NUDGE_AFTER
                    && let Some(text) = session.nudge()
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

fn progress(ev: &Event, start: Instant) {
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

fn failure_report(
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

// ---------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(e: Event) -> Output {
        Output::Event(e)
    }

    fn session(password: Option<&str>, run: &str) -> Session {
        Session::new("root", password.map(String::from), run, "n1")
    }

    fn failure_of(outs: &[Output]) -> Option<Failure> {
        outs.iter().find_map(|o| match o {
            Output::Fail(f) => Some(*f),
            _ => None,
        })
    }

    /// Run a session up to the login prompt with typical firmware output.
    fn at_login(s: &mut Session) {
        let out = s.feed(
            b"\x1bc\x1b[?7l\x1b[2J\x1b[0mSeaBIOS (version 1.16.2)\r\nBooting from Hard Disk...\r\n",
        );
        assert_eq!(out, vec![ev(Event::FirstOutput)]);
        let out = s.feed(
            b"\x1b[H\x1b[2J[    0.000000] Linux version 6.1.0-18-amd64\r\n\
              [  OK  ] Started getty@ttyS0.service\r\n\r\n\
              Debian GNU/Linux 12 debian ttyS0\r\n\r\ndebian login: ",
        );
        assert_eq!(
            out,
            vec![
                ev(Event::KernelStarted),
                ev(Event::LoginPrompt),
                Output::Send(format!("{}\n", s.user))
            ]
        );
    }

    #[test]
    fn success_transcript() {
        let mut s = session(None, "cat /etc/os-release");
        at_login(&mut s);
        let out = s.feed(
            b"root\r\nLinux debian 6.1.0-18-amd64 #1 SMP\r\n\r\nThe programs included...\r\n",
        );
        assert!(out.is_empty(), "{out:?}");
        let out = s.feed(b"\x1b[?2004hroot@debian:~# ");
        let (cmd, _) = command_line("cat /etc/os-release", "n1");
        assert_eq!(
            out,
            vec![ev(Event::LoggedIn), Output::Send(format!("{cmd}\n"))]
        );
        assert_eq!(s.phase(), Phase::WaitResult);
        // The shell echoes the command line: that must not count as the result.
        let out = s.feed(format!("\x1b[?2004l{cmd}\r\n").as_bytes());
        assert!(out.is_empty(), "{out:?}");
        let out = s.feed(b"PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\r\nVMDB-n1-RC=0\r\n\x1b[?2004hroot@debian:~# ");
        assert_eq!(
            out,
            vec![
                ev(Event::CommandExited(0)),
                Output::Send("poweroff\n".into())
            ]
        );
        let out = s.feed(b"poweroff\r\n[  OK  ] Reached target System Power Off.\r\n[   37.1] reboot: Power down\r\n");
        assert_eq!(out, vec![ev(Event::PowerDown)]);
        assert_eq!(s.phase(), Phase::PoweredOff);
    }

    #[test]
    fn a_user_other_than_root_powers_off_through_sudo() {
        let mut s = Session::new("vagrant", Some("vagrant".into()), "id", "n1");
        at_login(&mut s);
        s.feed(b"vagrant\r\nPassword: ");
        let (cmd, _) = command_line("id", "n1");
        let out = s.feed(b"\r\nvagrant@debian:~$ ");
        assert_eq!(
            out.last(),
            Some(&Output::Send(format!("{cmd}\n"))),
            "{out:?}"
        );
        let out = s.feed(b"uid=1000(vagrant)\r\nVMDB-n1-RC=0\r\nvagrant@debian:~$ ");
        assert_eq!(
            out,
            vec![
                ev(Event::CommandExited(0)),
                Output::Send("sudo -n poweroff || poweroff\n".into())
            ]
        );
    }

    #[test]
    fn password_prompt_is_answered() {
        let mut s = session(Some("secret"), "true");
        at_login(&mut s);
        let out = s.feed(b"root\r\nPass");
        assert!(out.is_empty());
        let out = s.feed(b"word: ");
        assert_eq!(out, vec![Output::Send("secret\n".into())]);
        let out = s.feed(b"\r\nroot@debian:~# ");
        assert_eq!(out[0], ev(Event::LoggedIn));
    }

    #[test]
    fn password_prompt_without_password_sends_empty_line() {
        let mut s = session(None, "true");
        at_login(&mut s);
        assert_eq!(
            s.feed(b"root\r\nPassword: "),
            vec![Output::Send("\n".into())]
        );
    }

    #[test]
    fn non_root_dollar_prompt() {
        let mut s = session(None, "true");
        at_login(&mut s);
        assert_eq!(s.feed(b"root\r\nuser@debian:~$ ")[0], ev(Event::LoggedIn));
    }

    #[test]
    fn marker_split_across_reads() {
        let mut s = session(None, "true");
        at_login(&mut s);
        s.feed(b"root\r\n# ");
        assert!(s.feed(b"VMDB-n1-R").is_empty());
        assert!(s.feed(b"C=1").is_empty());
        assert!(s.feed(b"2").is_empty());
        let out = s.feed(b"\r\n# ");
        assert_eq!(
            out,
            vec![
                ev(Event::CommandExited(12)),
                Output::Fail(Failure::CommandFailed(12))
            ]
        );
    }

    #[test]
    fn command_failure() {
        let mut s = session(None, "false");
        at_login(&mut s);
        s.feed(b"root\r\n# ");
        let out = s.feed(b"VMDB-n1-RC=1\r\n# ");
        assert_eq!(failure_of(&out), Some(Failure::CommandFailed(1)));
    }

    #[test]
    fn echoed_command_line_never_matches_marker() {
        let (cmd, marker) = command_line("cat /etc/os-release", "abc");
        assert!(!cmd.contains(&marker));
        assert_eq!(marker, "VMDB-abc-RC=");
    }

    fn boot_failure(text: &[u8]) -> Option<Failure> {
        let mut s = session(None, "true");
        failure_of(&s.feed(text))
    }

    #[test]
    fn boot_failures_are_detected() {
        let cases: &[(&[u8], Failure)] = &[
            (
                b"GNU GRUB  version 2.06\r\n\x1b[0mgrub> ",
                Failure::GrubPrompt,
            ),
            (
                b"error: unknown filesystem.\r\nEntering rescue mode...\r\ngrub rescue> ",
                Failure::GrubRescue,
            ),
            (
                b"\x1b[01;01HUEFI Interactive Shell v2.2\r\nEDK II\r\n",
                Failure::UefiShell,
            ),
            (
                b"\x1b[10;01H\x1b[1m\x1b[33m\x1b[40mShell> \x1b[0m",
                Failure::UefiShell,
            ),
            (
                b"Gave up waiting for root file system device.\r\n(initramfs) ",
                Failure::InitramfsShell,
            ),
            (
                b"[ 1.2] Kernel panic - not syncing: VFS: Unable to mount root fs\r\n",
                Failure::KernelPanic,
            ),
            (
                b"Booting from Hard Disk...\r\nBoot failed: not a bootable disk\r\n",
                Failure::NoBootableDevice,
            ),
            (b"No bootable device.\r\n", Failure::NoBootableDevice),
        ];
        for (text, want) in cases {
            assert_eq!(
                boot_failure(text),
                Some(*want),
                "{}",
                String::from_utf8_lossy(text)
            );
        }
    }

    #[test]
    fn pattern_split_across_reads_is_found() {
        let mut s = session(None, "true");
        assert_eq!(failure_of(&s.feed(b"blah\r\nKernel pa")), None);
        assert_eq!(
            failure_of(&s.feed(b"nic - not syncing\r\n")),
            Some(Failure::KernelPanic)
        );
    }

    #[test]
    fn pattern_split_by_escape_sequence_is_found() {
        let mut s = session(None, "true");
        assert_eq!(failure_of(&s.feed(b"gr\x1b[1")), None);
        assert_eq!(failure_of(&s.feed(b"mub> ")), Some(Failure::GrubPrompt));
    }

    #[test]
    fn first_failure_in_text_wins() {
        assert_eq!(
            boot_failure(b"Boot failed: x\r\nKernel panic\r\n"),
            Some(Failure::NoBootableDevice)
        );
    }

    #[test]
    fn login_incorrect() {
        let mut s = session(Some("wrong"), "true");
        at_login(&mut s);
        s.feed(b"root\r\nPassword: ");
        let out = s.feed(b"\r\nLogin incorrect\r\ndebian login: ");
        assert_eq!(failure_of(&out), Some(Failure::LoginIncorrect));
    }

    #[test]
    fn boot_patterns_in_command_output_are_ignored() {
        let mut s = session(None, "journalctl");
        at_login(&mut s);
        s.feed(b"root\r\n# ");
        let out =
            s.feed(b"grub> Shell> (initramfs) Kernel panic Boot failed\r\nVMDB-n1-RC=0\r\n# ");
        assert_eq!(failure_of(&out), None);
        assert_eq!(s.phase(), Phase::WaitPowerDown);
    }

    #[test]
    fn panic_after_login_is_detected() {
        let mut s = session(None, "true");
        at_login(&mut s);
        s.feed(b"root\r\n# ");
        s.feed(b"VMDB-n1-RC=0\r\n# ");
        let out =
            s.feed(b"poweroff\r\n[ 9.0] Kernel panic - not syncing: Attempted to kill init!\r\n");
        assert_eq!(failure_of(&out), Some(Failure::KernelPanic));
    }

    #[test]
    fn login_word_before_login_prompt_in_firmware_is_fine() {
        // "Last login:" after logging in must not restart anything.
        let mut s = session(None, "true");
        at_login(&mut s);
        let out = s.feed(b"root\r\nLast login: Mon Jan  1 on ttyS0\r\nroot@debian:~# ");
        assert_eq!(out[0], ev(Event::LoggedIn));
    }

    #[test]
    fn nudge_only_after_login_progress() {
        let mut s = session(None, "true");
        assert_eq!(s.nudge(), None, "not before login");
        at_login(&mut s);
        s.feed(b"root\r\n");
        assert_eq!(s.nudge(), None, "could be read as a password");
        s.feed(b"Linux debian 6.1\r\nroot@debian:~# [  20.1] random: crng init done\r\n");
        assert_eq!(s.phase(), Phase::WaitShell);
        assert_eq!(s.nudge(), Some("\n".into()));
        assert_eq!(s.feed(b"\r\nroot@debian:~# ")[0], ev(Event::LoggedIn));
        assert_eq!(s.nudge(), None);
    }

    #[test]
    fn long_output_keeps_buffer_bounded() {
        let mut s = session(None, "yes | head");
        at_login(&mut s);
        s.feed(b"root\r\n# ");
        let line = [b'y'; 1023];
        for _ in 0..2000 {
            s.feed(&line);
            s.feed(b"\r\n");
        }
        assert!(s.buf.len() <= BUFFER_LIMIT);
        let out = s.feed(b"VMDB-n1-RC=0\r\n# ");
        assert_eq!(out[0], ev(Event::CommandExited(0)));
    }

    #[test]
    fn tail_has_last_lines_without_escapes() {
        let mut s = session(None, "true");
        for i in 0..30 {
            s.feed(format!("\x1b[1mline {i}\x1b[0m\r\n").as_bytes());
        }
        let tail = s.tail(20);
        assert_eq!(tail.len(), 20);
        assert_eq!(tail[0], "line 10");
        assert_eq!(tail[19], "line 29");
    }

    #[test]
    fn ansi_stripper() {
        let mut st = AnsiStripper::default();
        let mut out = Vec::new();
        st.push(
            b"a\x1b[1;33mb\x1b]0;title\x07c\x1b(Bd\x1bce\r\n\x1b[=3hf\x1b]2;t\x1b\\g\x08",
            &mut out,
        );
        assert_eq!(out, b"abcde\nfg");
        // A sequence split over two calls.
        let mut out = Vec::new();
        st.push(b"x\x1b[", &mut out);
        st.push(b"0my", &mut out);
        assert_eq!(out, b"xy");
    }

    // --- qemu command line ---

    fn strings(args: &[OsString]) -> Vec<String> {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    fn config(arch: Arch) -> QemuConfig {
        QemuConfig {
            arch,
            memory: 1024,
            kvm: false,
            snapshot: false,
            disks: vec![Disk {
                path: "/img/disk.img".into(),
                format: "raw".into(),
            }],
            firmware: None,
        }
    }

    const COMMON: &[&str] = &[
        "-accel",
        "tcg",
        "-m",
        "1024",
        "-nographic",
        "-serial",
        "mon:stdio",
        "-no-reboot",
        "-net",
        "none",
    ];

    #[test]
    fn qemu_args_bios() {
        let mut want: Vec<&str> = COMMON.to_vec();
        want.extend(["-drive", "file=/img/disk.img,format=raw,if=virtio"]);
        assert_eq!(strings(&qemu_args(&config(Arch::X86_64))), want);
        assert_eq!(Arch::X86_64.qemu_binary(), "qemu-system-x86_64");
    }

    #[test]
    fn qemu_args_uefi() {
        let mut cfg = config(Arch::X86_64);
        cfg.firmware = Some(Firmware {
            code: OVMF_CODE.into(),
            vars: "/tmp/x/OVMF_VARS_4M.fd".into(),
        });
        let mut want: Vec<&str> = COMMON.to_vec();
        want.extend([
            "-drive",
            "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
            "-drive",
            "if=pflash,format=raw,unit=1,file=/tmp/x/OVMF_VARS_4M.fd",
            "-drive",
            "file=/img/disk.img,format=raw,if=virtio",
        ]);
        assert_eq!(strings(&qemu_args(&cfg)), want);
    }

    #[test]
    fn qemu_args_i386() {
        assert_eq!(Arch::parse("i386").unwrap(), Arch::I386);
        assert_eq!(Arch::I386.qemu_binary(), "qemu-system-i386");
        let a = strings(&qemu_args(&config(Arch::I386)));
        assert_eq!(a[0], "-accel");
        assert!(!a.contains(&"-M".to_string()));
    }

    #[test]
    fn qemu_args_aarch64() {
        let mut cfg = config(Arch::Aarch64);
        cfg.firmware = Some(Firmware {
            code: AAVMF_CODE.into(),
            vars: "/tmp/x/AAVMF_VARS.fd".into(),
        });
        let a = strings(&qemu_args(&cfg));
        assert_eq!(a[..4], ["-M", "virt", "-cpu", "cortex-a57"]);
        assert!(a.contains(
            &"if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/AAVMF/AAVMF_CODE.fd".into()
        ));
        assert!(a.contains(&"if=pflash,format=raw,unit=1,file=/tmp/x/AAVMF_VARS.fd".into()));
        assert_eq!(Arch::Aarch64.qemu_binary(), "qemu-system-aarch64");
    }

    #[test]
    fn qemu_args_kvm_snapshot_extra_drives() {
        let mut cfg = config(Arch::X86_64);
        cfg.kvm = true;
        cfg.snapshot = true;
        cfg.memory = 2048;
        cfg.disks.push(Disk {
            path: "/img/seed,1.iso".into(),
            format: "raw".into(),
        });
        cfg.disks.push(Disk {
            path: "/img/data.qcow2".into(),
            format: "qcow2".into(),
        });
        let a = strings(&qemu_args(&cfg));
        assert_eq!(a[..4], ["-accel", "kvm", "-m", "2048"]);
        assert!(a.contains(&"-snapshot".into()));
        assert!(!a.contains(&"tcg".into()));
        let drives: Vec<&String> = a
            .iter()
            .zip(a.iter().skip(1))
            .filter(|(k, _)| *k == "-drive")
            .map(|(_, v)| v)
            .collect();
        assert_eq!(
            drives,
            [
                "file=/img/disk.img,format=raw,if=virtio",
                // qemu's escaping of a comma in a file name
                "file=/img/seed,,1.iso,format=raw,if=virtio",
                "file=/img/data.qcow2,format=qcow2,if=virtio",
            ]
        );
    }

    #[test]
    fn arch_names() {
        assert_eq!(Arch::parse("amd64").unwrap(), Arch::X86_64);
        assert_eq!(Arch::parse("arm64").unwrap(), Arch::Aarch64);
        assert!(Arch::parse("riscv64").is_err());
    }

    #[test]
    fn format_detection() {
        assert_eq!(detect_format(Path::new("/nonexistent/x.QCOW2")), "qcow2");
        assert_eq!(
            parse_qemu_img_format(
                "image: a.img\nfile format: qcow2\nvirtual size: 1 GiB\nChild node '/file':\n    file format: file\n"
            ),
            Some("qcow2".into())
        );
        assert_eq!(parse_qemu_img_format("garbage"), None);
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("disk.img");
        std::fs::write(&raw, vec![0u8; 4096]).unwrap();
        assert_eq!(detect_format(&raw), "raw");
    }

    #[test]
    fn default_console_log_is_beside_image() {
        assert_eq!(
            default_log_path(Path::new("/x/disk.img")),
            PathBuf::from("/x/disk.img.console.log")
        );
    }

    #[test]
    fn firmware_vars_are_copied_per_boot() {
        assert!(prepare_firmware(Arch::I386, Path::new("/tmp")).is_err());
        if !Path::new(OVMF_VARS).exists() {
            eprintln!("skipped: no OVMF");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let fw = prepare_firmware(Arch::X86_64, dir.path()).unwrap();
        assert_eq!(fw.code, Path::new(OVMF_CODE));
        assert!(fw.vars.starts_with(dir.path()));
        assert_eq!(
            std::fs::read(&fw.vars).unwrap(),
            std::fs::read(OVMF_VARS).unwrap()
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
