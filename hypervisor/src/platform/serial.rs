//! COM1, the operator console: a 16550 UART driven by `uart_16550`, polled.

use core::fmt::{self, Write};
use spin::Mutex;
use uart_16550::SerialPort;

/// I/O base of COM1 on every PC since the IBM PC.
const COM1: u16 = 0x3f8;

static PORT: Mutex<Option<SerialPort>> = Mutex::new(None);

pub fn init() {
    // SAFETY: 0x3f8 is COM1 on the PC platform; nothing else in the kernel
    // drives these ports, and the port is only used behind the `PORT` lock.
    let mut port = unsafe { SerialPort::new(COM1) };
    port.init();
    *PORT.lock() = Some(port);
}

struct Writer<'a>(&'a mut SerialPort);

impl Write for Writer<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            // `send` turns '\n' into nothing special: terminals want CR LF.
            if b == b'\n' {
                self.0.send_raw(b'\r');
            }
            self.0.send_raw(b);
        }
        Ok(())
    }
}

pub fn write_fmt(args: fmt::Arguments) {
    // Interrupts stay off in the kernel (it polls), so the lock cannot be
    // re-entered by an interrupt handler on this CPU, except by the
    // exception path, which uses `force_write_fmt`.
    if let Some(port) = PORT.lock().as_mut() {
        let _ = Writer(port).write_fmt(args);
    }
}

/// Output from the exception handlers: they may fire while the lock is held,
/// so they take the port over rather than deadlock.
pub fn force_write_fmt(args: fmt::Arguments) {
    // SAFETY: only called on the way to power-off after a CPU exception; if
    // the lock was held, its holder will never run again.
    unsafe { PORT.force_unlock() };
    write_fmt(args);
}

/// Bytes exactly as given (an attached guest's terminal output: its own
/// line endings and escape sequences).
pub fn write_bytes(bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    if let Some(port) = PORT.lock().as_mut() {
        for &b in bytes {
            port.send_raw(b);
        }
    }
}

/// One received byte, if any arrived.
pub fn try_read() -> Option<u8> {
    PORT.lock().as_mut().and_then(|p| p.try_receive().ok())
}

/// Whether a received byte waits, without taking it: the line status
/// register's data-ready bit (16550 LSR bit 0).
pub fn rx_ready() -> bool {
    let _port = PORT.lock();
    // SAFETY: COM1's line status register; a read clears only its error
    // bits, which the driver does not use, and the lock keeps the driver's
    // own accesses out meanwhile.
    let lsr: u8 = unsafe { x86_64::instructions::port::PortReadOnly::new(COM1 + 5).read() };
    lsr & 1 != 0
}

#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => ($crate::platform::serial::write_fmt(format_args!($($arg)*)));
}

#[macro_export]
macro_rules! println {
    () => ($crate::print!("\n"));
    ($($arg:tt)*) => ($crate::platform::serial::write_fmt(format_args!("{}\n", format_args!($($arg)*))));
}
