//! Progress on stderr, and a debug log file when asked for.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

static VERBOSE: AtomicBool = AtomicBool::new(false);
static LOG: Mutex<Option<File>> = Mutex::new(None);

pub fn init(verbose: bool, log_file: Option<&Path>) -> std::io::Result<()> {
    START.get_or_init(std::time::Instant::now);
    VERBOSE.store(verbose, Ordering::Relaxed);
    if let Some(p) = log_file {
        let f = File::options().create(true).append(true).open(p)?;
        *LOG.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
    }
    Ok(())
}

pub fn is_verbose() -> bool {
    VERBOSE.load(Ordering::Relaxed)
}

static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

/// Only to the log file, with the seconds since vmdb started.
pub fn debug(msg: &str) {
    let t = START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_secs_f64();
    if let Some(f) = LOG.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
        let _ = writeln!(f, "[{t:9.3}] {msg}");
    }
}

/// To stderr, ignoring a closed stderr: losing a progress line must not stop a
/// build half-way (eprintln! would panic), least of all while it tears down.
fn to_stderr(msg: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{msg}");
}

/// Always shown.
pub fn info(msg: &str) {
    to_stderr(msg);
    debug(msg);
}

/// Shown with --verbose.
pub fn verbose(msg: &str) {
    if is_verbose() {
        to_stderr(msg);
    }
    debug(msg);
}

/// A line of the build's own output (echo steps) on stdout, ignoring a closed stdout.
pub fn out(msg: &str) {
    let _ = writeln!(std::io::stdout().lock(), "{msg}");
    debug(msg);
}
