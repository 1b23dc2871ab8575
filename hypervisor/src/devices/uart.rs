//! A 16550A UART as the guest sees it (register map: National Semiconductor
//! PC16550D datasheet, table II). Transmit only: bytes the guest writes are
//! collected into lines for the console; the receiver is always empty. No
//! interrupts are raised (IER is stored but the VM has no interrupt
//! controller yet).

use alloc::string::String;
use alloc::vec::Vec;

const LCR_DLAB: u8 = 0x80;
const LSR_THRE: u8 = 0x20;
const LSR_TEMT: u8 = 0x40;
const MCR_LOOP: u8 = 0x10;
/// Longest line kept before it is flushed anyway.
pub const MAX_LINE: usize = 512;

#[derive(Clone, Debug, Default)]
pub struct Uart {
    ier: u8,
    lcr: u8,
    mcr: u8,
    scr: u8,
    dll: u8,
    dlm: u8,
    fcr: u8,
    line: Vec<u8>,
    /// Complete lines not yet taken by the console.
    pending: Vec<String>,
    pub bytes_out: u64,
}

impl Uart {
    /// A read of register `offset` (0..=7).
    pub fn read(&mut self, offset: u16) -> u8 {
        let dlab = self.lcr & LCR_DLAB != 0;
        match offset {
            0 if dlab => self.dll,
            0 => 0, // receive buffer: nothing ever arrives
            1 if dlab => self.dlm,
            1 => self.ier,
            // IIR: no interrupt pending; FIFO-enabled bits mirror FCR.0.
            2 => 0x01 | if self.fcr & 1 != 0 { 0xc0 } else { 0 },
            3 => self.lcr,
            4 => self.mcr,
            5 => LSR_THRE | LSR_TEMT,
            // MSR: CTS, DSR, DCD asserted unless in loopback.
            6 => {
                if self.mcr & MCR_LOOP != 0 {
                    0
                } else {
                    0xb0
                }
            }
            7 => self.scr,
            _ => 0xff,
        }
    }

    pub fn write(&mut self, offset: u16, v: u8) {
        let dlab = self.lcr & LCR_DLAB != 0;
        match offset {
            0 if dlab => self.dll = v,
            0 => self.transmit(v),
            1 if dlab => self.dlm = v,
            1 => self.ier = v & 0x0f,
            2 => self.fcr = v,
            3 => self.lcr = v,
            4 => self.mcr = v & 0x1f,
            7 => self.scr = v,
            _ => {}
        }
    }

    fn transmit(&mut self, v: u8) {
        self.bytes_out += 1;
        if self.mcr & MCR_LOOP != 0 {
            return;
        }
        match v {
            b'\n' => self.end_line(),
            b'\r' => {}
            _ => {
                self.line.push(v);
                if self.line.len() >= MAX_LINE {
                    self.end_line();
                }
            }
        }
    }

    fn end_line(&mut self) {
        let text = String::from_utf8_lossy(&self.line);
        // Control characters from a guest must not drive the operator's
        // terminal: show them escaped.
        let clean: String = text.chars().map(|c| if c.is_control() && c != '\t' { '\u{fffd}' } else { c }).collect();
        self.pending.push(clean);
        self.line.clear();
    }

    /// Takes the complete lines written so far.
    pub fn take_lines(&mut self) -> Vec<String> {
        core::mem::take(&mut self.pending)
    }

    /// Ends a partial last line (when the VM stops).
    pub fn flush_partial(&mut self) {
        if !self.line.is_empty() {
            self.end_line();
        }
    }

    pub fn has_output(&self) -> bool {
        !self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_str(u: &mut Uart, s: &str) {
        for b in s.bytes() {
            u.write(0, b);
        }
    }

    #[test]
    fn lines_are_collected_and_control_characters_neutralised() {
        let mut u = Uart::default();
        write_str(&mut u, "hello\r\nwor");
        assert_eq!(u.take_lines(), ["hello"]);
        write_str(&mut u, "ld\x1b[2J\n");
        assert_eq!(u.take_lines(), ["world\u{fffd}[2J"]);
        write_str(&mut u, "tail");
        u.flush_partial();
        assert_eq!(u.take_lines(), ["tail"]);
        assert_eq!(u.bytes_out, 21);
    }

    #[test]
    fn registers_behave_like_a_16550() {
        let mut u = Uart::default();
        assert_eq!(u.read(5) & 0x60, 0x60, "transmitter always ready");
        u.write(7, 0x5a);
        assert_eq!(u.read(7), 0x5a, "scratch register holds its value");
        u.write(3, 0x80); // DLAB on: offsets 0/1 are the divisor latch
        u.write(0, 0x01);
        u.write(1, 0x00);
        assert_eq!(u.read(0), 0x01);
        u.write(3, 0x03);
        assert_eq!(u.take_lines().len(), 0, "divisor writes are not output");
        u.write(1, 0xff);
        assert_eq!(u.read(1), 0x0f, "IER keeps its defined bits");
        assert_eq!(u.read(2) & 1, 1, "no interrupt pending");
    }

    #[test]
    fn very_long_lines_are_split() {
        let mut u = Uart::default();
        for _ in 0..MAX_LINE + 10 {
            u.write(0, b'x');
        }
        let lines = u.take_lines();
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].len(), MAX_LINE);
    }
}
