//! COM1 output: the hypervisor's emulated 16550 forwards each byte to its
//! console prefixed with the VM's id.

use core::fmt::{self, Write};

const COM1: u16 = 0x3f8;
const LSR: u16 = COM1 + 5;
const THR_EMPTY: u8 = 1 << 5;

pub struct Com1;

impl Write for Com1 {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            let mut spins = 0;
            while super::io::inb(LSR) & THR_EMPTY == 0 && spins < 100_000 {
                spins += 1;
            }
            super::io::outb(COM1, b);
        }
        Ok(())
    }
}

pub fn _print(args: fmt::Arguments) {
    let _ = Com1.write_fmt(args);
}

#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => ($crate::serial::_print(format_args!($($arg)*)));
}

#[macro_export]
macro_rules! println {
    () => ($crate::print!("\n"));
    ($($arg:tt)*) => ($crate::serial::_print(format_args!("{}\n", format_args!($($arg)*))));
}
