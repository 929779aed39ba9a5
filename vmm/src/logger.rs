//! A minimal logger: `ligera: <level>: <message>` lines to stderr, or to
//! a file or pipe once [`set_file`] names one (Firecracker's `--log-path`).

use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use log::{Level, LevelFilter, Log, Metadata, Record};

struct StderrLogger;

static START: OnceLock<Instant> = OnceLock::new();
/// Where lines go instead of stderr, if set.
static FILE: Mutex<Option<File>> = Mutex::new(None);
/// Whether lines name the source file and line they come from.
static SHOW_ORIGIN: AtomicBool = AtomicBool::new(false);

/// Sends log lines to `file` from now on.
pub fn set_file(file: File) {
    *FILE.lock().unwrap_or_else(|e| e.into_inner()) = Some(file);
}

/// Whether lines carry their source file and line.
pub fn show_origin(on: bool) {
    SHOW_ORIGIN.store(on, Ordering::Relaxed);
}

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        // Libraries log what a guest makes them see (virtio-queue reports a
        // bad queue as an error): keep that at debug level, so a guest cannot
        // fill the host's stderr.
        let ours = ["vmm", "devices", "arch", "ligera"]
            .iter()
            .any(|c| record.target() == *c || record.target().starts_with(&format!("{c}::")));
        let level = if ours {
            record.level()
        } else {
            record.level().max(Level::Debug)
        };
        if level <= log::max_level() {
            let record_level = level;
            let level = record_level.as_str().to_ascii_lowercase();
            // Debug and trace lines carry the time since start, for profiling.
            let when = match record_level {
                Level::Debug | Level::Trace => {
                    let ms = START.get_or_init(Instant::now).elapsed().as_secs_f64() * 1e3;
                    format!("[{ms:8.3} ms] ")
                }
                _ => String::new(),
            };
            let origin = match (SHOW_ORIGIN.load(Ordering::Relaxed), record.file()) {
                (true, Some(file)) => format!("{file}:{}: ", record.line().unwrap_or(0)),
                _ => String::new(),
            };
            // One write per line, so lines from different threads don't mix.
            let line = format!("ligera: {when}{level}: {origin}{}\n", record.args());
            let mut file = FILE.lock().unwrap_or_else(|e| e.into_inner());
            let _ = match file.as_mut() {
                Some(f) => f.write_all(line.as_bytes()),
                None => std::io::stderr().lock().write_all(line.as_bytes()),
            };
        }
    }

    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;

/// When the process started (when the logger was set up, first thing).
pub fn started() -> Instant {
    *START.get_or_init(Instant::now)
}

pub fn init(level: LevelFilter) {
    START.get_or_init(Instant::now);
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
}
