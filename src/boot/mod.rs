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
//!
//! The parts: args (the command line), qemu (its command line), console (the
//! session's state machine), vm (the qemu process), run (the main loop).

use std::path::PathBuf;

use anyhow::Result;

use crate::host::signals;

mod args;
mod console;
mod qemu;
mod run;
mod vm;

pub use args::BootArgs;

/// Boot the image and check it works. Progress goes to stderr; with
/// `verbose` the console is echoed to stderr too.
///
/// The env var VMDB_QEMU, if set, names the qemu binary to run instead of
/// qemu-system-ARCH (used by tests, and handy for wrappers).
pub fn boot(args: &BootArgs, verbose: bool) -> Result<()> {
    let opts = run::Options {
        qemu: std::env::var_os("VMDB_QEMU").map(PathBuf::from),
        handle_signals: true,
    };
    // Catch Ctrl-C/SIGTERM so we can kill qemu and remove temp files
    // ourselves; PR_SET_PDEATHSIG covers the cases where we cannot.
    signals::catch(|_| {})?;
    run::run_boot(args, verbose, &opts)
}
