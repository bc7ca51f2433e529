//! The guest's serial console: escape sequences stripped, and the state machine that
//! logs in, runs one command, checks its exit status and powers off. It is pure: it
//! takes bytes and returns what to send and what happened, so canned transcripts
//! test it.

use std::fmt;

pub(super) const MAX_NUDGES: u32 = 3;

/// Removes terminal escape sequences and carriage returns so that plain
/// substring matching works on what firmware, GRUB and getty print. Keeps
/// state between calls because a sequence can be split across reads.
#[derive(Debug, Default)]
pub(super) struct AnsiStripper {
    state: EscState,
    seq_len: usize,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) enum EscState {
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
pub(super) const MAX_SEQ: usize = 128;

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
pub(super) enum Phase {
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
pub(super) enum Failure {
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
pub(super) enum Event {
    FirstOutput,
    KernelStarted,
    LoginPrompt,
    LoggedIn,
    CommandExited(i32),
    PowerDown,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Output {
    Send(String),
    Event(Event),
    Fail(Failure),
}

/// Text meaning the boot went wrong. Only checked before the login prompt:
/// after login the command's own output could contain any of them.
pub(super) const BOOT_FAILURES: &[(&str, Failure)] = &[
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
pub(super) const PANIC: (&str, Failure) = ("Kernel panic", Failure::KernelPanic);
/// Longest pattern above; new text is scanned with this much overlap so a
/// pattern split across two reads is still found.
pub(super) const SCAN_OVERLAP: usize = 32;

/// Rolling buffer bounds: the command may print a lot, we only need the end.
pub(super) const BUFFER_LIMIT: usize = 256 * 1024;
pub(super) const BUFFER_KEEP: usize = 64 * 1024;

pub(super) struct Session {
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
    pub(super) fn scan_new_text(&mut self, out: &mut Vec<Output>) -> Option<Failure> {
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
    pub(super) fn advance(&mut self, out: &mut Vec<Output>) -> bool {
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
                if let Some(pos) = find(region, "Password:").filter(|_| !self.password_sent) {
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

    pub(super) fn enter(&mut self, phase: Phase, consumed: usize) {
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

    pub(super) fn trim_buffer(&mut self) {
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
pub(super) fn command_line(run: &str, nonce: &str) -> (String, String) {
    let command = format!("( {run} ); printf '%s-%s-RC=%s\\n' VMDB {nonce} \"$?\"");
    let marker = format!("VMDB-{nonce}-RC=");
    (command, marker)
}

pub(super) fn make_nonce() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{:x}", nanos ^ std::process::id().rotate_left(16))
}

pub(super) fn find(hay: &[u8], needle: &str) -> Option<usize> {
    let needle = needle.as_bytes();
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

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
}
