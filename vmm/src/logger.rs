//! A minimal logger to stderr: `ligera: <level>: <message>`.

use std::sync::OnceLock;
use std::time::Instant;

use log::{Level, LevelFilter, Log, Metadata, Record};

struct StderrLogger;

static START: OnceLock<Instant> = OnceLock::new();

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
            // One write per line, so lines from different threads don't mix.
            let line = format!("ligera: {when}{level}: {}\n", record.args());
            let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
        }
    }

    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;

pub fn init(level: LevelFilter) {
    START.get_or_init(Instant::now);
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
}
