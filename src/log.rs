//! Progress on stderr, a debug log file when asked for, and JSON events (`--json`).

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::event::{Event, round3};

static VERBOSE: AtomicBool = AtomicBool::new(false);
/// vmdb runs as `vmdb2`: progress only with --verbose, and then on standard output, as
/// vmdb2 shows it; warnings and errors stay on standard error.
static AS_VMDB2: AtomicBool = AtomicBool::new(false);
static LOG: Mutex<Option<File>> = Mutex::new(None);
/// Where JSON events go (`--json`), one object per line.
static JSON: Mutex<Option<File>> = Mutex::new(None);
/// The step running now (1-based; 0: none), named in command events.
static STEP: AtomicUsize = AtomicUsize::new(0);
/// A progress line is on the terminal now (see progress.rs): clear it before printing.
pub(crate) static PROGRESS_SHOWN: AtomicBool = AtomicBool::new(false);

pub fn init(verbose: bool, log_file: Option<&Path>) -> std::io::Result<()> {
    START.get_or_init(std::time::Instant::now);
    VERBOSE.store(verbose, Ordering::Relaxed);
    if let Some(p) = log_file {
        let f = File::options().create(true).append(true).open(p)?;
        *LOG.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
    }
    Ok(())
}

/// Show progress as vmdb2 does (see `AS_VMDB2`).
pub fn as_vmdb2() {
    AS_VMDB2.store(true, Ordering::Relaxed);
}

/// Whether progress goes to standard error, where a progress line may be drawn.
pub fn progress_on_stderr() -> bool {
    !AS_VMDB2.load(Ordering::Relaxed)
}

/// Send JSON events to `dest` (appended to), or to standard output for `-`. For `-`,
/// anything else vmdb or a step would print on standard output goes to standard error
/// instead, so that standard output carries nothing but events.
pub fn init_json(dest: &Path) -> std::io::Result<()> {
    let f = if dest == Path::new("-") {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        let stdout = std::io::stdout();
        let _ = stdout.lock().flush();
        let events = nix::unistd::dup(stdout.as_raw_fd())?;
        // SAFETY: dup returned a new descriptor that nothing else owns.
        let events = unsafe { OwnedFd::from_raw_fd(events) };
        nix::unistd::dup2(std::io::stderr().as_raw_fd(), stdout.as_raw_fd())?;
        File::from(events)
    } else {
        File::options().create(true).append(true).open(dest)?
    };
    *JSON.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
    Ok(())
}

pub fn json_enabled() -> bool {
    JSON.lock().unwrap_or_else(|e| e.into_inner()).is_some()
}

/// Write one JSON event: `{"event": NAME, "time": SECONDS_SINCE_EPOCH, ...members}`,
/// keys in alphabetical order. Each event is one line, written with one write.
pub fn event(e: Event) {
    let mut guard = JSON.lock().unwrap_or_else(|e| e.into_inner());
    let Some(f) = guard.as_mut() else {
        return;
    };
    let time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let Ok(serde_json::Value::Object(mut obj)) = serde_json::to_value(&e) else {
        return;
    };
    obj.insert("time".into(), round3(time).into());
    let mut line = serde_json::Value::Object(obj).to_string();
    line.push('\n');
    let _ = f.write_all(line.as_bytes());
}

/// The step running now (0: none), for command events.
pub fn set_step(index: usize) {
    STEP.store(index, Ordering::Relaxed);
}

pub fn current_step() -> Option<usize> {
    match STEP.load(Ordering::Relaxed) {
        0 => None,
        n => Some(n),
    }
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

/// A line of progress: on stderr, or on stdout as vmdb2 shows it.
fn show(msg: &str) {
    if AS_VMDB2.load(Ordering::Relaxed) {
        let _ = writeln!(std::io::stdout().lock(), "{msg}");
        return;
    }
    alert(msg);
}

/// A line on stderr, below any progress line (which is cleared first).
fn alert(msg: &str) {
    let mut err = std::io::stderr().lock();
    if PROGRESS_SHOWN.swap(false, Ordering::SeqCst) {
        let _ = err.write_all(b"\r\x1b[K");
    }
    let _ = writeln!(err, "{msg}");
}

/// Always shown (as vmdb2: with --verbose).
pub fn info(msg: &str) {
    if !AS_VMDB2.load(Ordering::Relaxed) || is_verbose() {
        show(msg);
    }
    debug(msg);
}

/// Why a build failed: always shown, on stderr (as vmdb2 too).
pub fn failure(msg: &str) {
    alert(msg);
    debug(msg);
}

/// Shown with --verbose.
pub fn verbose(msg: &str) {
    if is_verbose() {
        show(msg);
    }
    debug(msg);
}

/// A line of the build's own output (echo steps) on stdout, ignoring a closed stdout.
pub fn out(msg: &str) {
    let _ = writeln!(std::io::stdout().lock(), "{msg}");
    debug(msg);
}

/// Always shown as `vmdb: warning: MSG`, and a `warning` event.
pub fn warn(msg: &str) {
    let line = format!("vmdb: warning: {msg}");
    alert(&line);
    debug(&line);
    event(Event::Warning {
        message: msg.to_string(),
    });
}

/// Always shown as `vmdb: error: MSG`, and an `error` event.
pub fn error(msg: &str) {
    let line = format!("vmdb: error: {msg}");
    alert(&line);
    debug(&line);
    event(Event::Error {
        message: msg.to_string(),
    });
}
