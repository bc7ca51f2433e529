//! Progress of a long step: on a terminal, a line that shows the elapsed time and is
//! redrawn every second (cleared when the step ends or another line is printed); when
//! standard error is not a terminal, a plain line now and then.

use std::io::{IsTerminal, Write};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::log::PROGRESS_SHOWN;

/// A step shows progress once it has run this long.
pub const TTY_AFTER: Duration = Duration::from_secs(3);
/// Without a terminal, a line every this long.
pub const PLAIN_EVERY: Duration = Duration::from_secs(60);

const SPINNER: [char; 4] = ['|', '/', '-', '\\'];

/// Shows progress until dropped.
pub struct Progress {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Progress {
    /// Start showing progress for `label` (e.g. "[8/12] debootstrap: bookworm").
    pub fn start(label: String) -> Progress {
        let tty = std::io::stderr().is_terminal() && crate::log::progress_on_stderr();
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("progress".into())
            .spawn(move || tick(&label, tty, &s))
            .ok();
        Progress { stop, thread }
    }
}

/// Wait `d` or until stopped; true if stopped.
fn wait(stop: &(Mutex<bool>, Condvar), d: Duration) -> bool {
    let (lock, cv) = stop;
    let guard = lock.lock().unwrap_or_else(|e| e.into_inner());
    let (guard, _) = cv
        .wait_timeout_while(guard, d, |stopped| !*stopped)
        .unwrap_or_else(|e| e.into_inner());
    *guard
}

fn tick(label: &str, tty: bool, stop: &(Mutex<bool>, Condvar)) {
    let start = Instant::now();
    if tty {
        if wait(stop, TTY_AFTER) {
            return;
        }
        let mut n = 0;
        loop {
            let secs = start.elapsed().as_secs();
            let line = format!(
                "\r\x1b[K{} {label} ({}:{:02})",
                SPINNER[n % SPINNER.len()],
                secs / 60,
                secs % 60
            );
            {
                let mut err = std::io::stderr().lock();
                let _ = err.write_all(line.as_bytes());
                let _ = err.flush();
                PROGRESS_SHOWN.store(true, Ordering::SeqCst);
            }
            n += 1;
            if wait(stop, Duration::from_secs(1)) {
                break;
            }
        }
        if PROGRESS_SHOWN.swap(false, Ordering::SeqCst) {
            let mut err = std::io::stderr().lock();
            let _ = err.write_all(b"\r\x1b[K");
            let _ = err.flush();
        }
    } else {
        while !wait(stop, PLAIN_EVERY) {
            crate::log::info(&format!(
                "{label}: still running after {}s",
                start.elapsed().as_secs()
            ));
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        let (lock, cv) = &*self.stop;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
