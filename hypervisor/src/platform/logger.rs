//! The `log` backend: every record goes to COM1 with a time stamp
//! (seconds since boot, from the calibrated TSC).

use log::{Level, LevelFilter, Log, Metadata, Record};

struct SerialLogger;

static LOGGER: SerialLogger = SerialLogger;

impl Log for SerialLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        // virtio-drivers announces each device it starts at info level:
        // debug detail on this console.
        let level = match metadata.level() {
            Level::Info if metadata.target().starts_with("virtio_drivers") => Level::Debug,
            l => l,
        };
        level <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let us = super::time::micros();
        let level = match record.level() {
            Level::Error => "ERROR",
            Level::Warn => "WARN ",
            Level::Info => "INFO ",
            Level::Debug => "DEBUG",
            Level::Trace => "TRACE",
        };
        crate::println!("[{:>5}.{:06}] {} {}", us / 1_000_000, us % 1_000_000, level, record.args());
    }

    fn flush(&self) {}
}

pub fn init(level: LevelFilter) {
    // Only fails if a logger is already set, which would be a kernel bug
    // worth ignoring rather than dying for.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}
