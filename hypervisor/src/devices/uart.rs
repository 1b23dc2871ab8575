//! A 16550A UART as the guest sees it (register map: National Semiconductor
//! PC16550D datasheet, table II). Bytes the guest writes are collected into
//! lines for the console; bytes for the guest wait in a receive buffer
//! ([`Uart::receive`]). Transmission is instant, so the transmitter is
//! always empty. Interrupts (datasheet table IV): received data (IER bit 0)
//! and transmitter empty (IER bit 1), prioritised in IIR; the line to the
//! interrupt controller is gated by MCR OUT2, as on every PC.

use alloc::string::String;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

use super::persist::{Invalid, Persist};

const LCR_DLAB: u8 = 0x80;
const LSR_DR: u8 = 0x01;
const LSR_THRE: u8 = 0x20;
const LSR_TEMT: u8 = 0x40;
const MCR_OUT2: u8 = 0x08;
const MCR_LOOP: u8 = 0x10;
const IER_RDA: u8 = 0x01;
const IER_THRE: u8 = 0x02;
/// IIR values: no interrupt, transmitter empty, received data.
const IIR_NONE: u8 = 0x01;
const IIR_THRE: u8 = 0x02;
const IIR_RDA: u8 = 0x04;
/// Output bytes kept for an attached terminal between two reads.
pub const RAW_BUFFER: usize = 64 * 1024;
/// Bytes the receive buffer holds for the guest (more than the chip's
/// 16-byte FIFO: the operator may paste a line faster than the guest reads).
pub const RX_BUFFER: usize = 4096;
/// Longest line kept before it is flushed anyway.
pub const MAX_LINE: usize = 512;

/// Complete lines a saved state may hold before the console took them.
const MAX_PENDING: usize = 256;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
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
    /// Bytes for the guest, oldest first.
    rx: alloc::collections::VecDeque<u8>,
    /// The transmitter-empty interrupt is pending (set when the holding
    /// register empties or the interrupt is enabled while it is empty;
    /// cleared by reading IIR while it is the source, or by a write).
    thre: bool,
    /// While an operator's terminal is attached (`vm console`): output goes
    /// here byte for byte instead of into lines. Host-side, not the
    /// guest's state: never saved.
    #[serde(skip)]
    raw: Option<alloc::collections::VecDeque<u8>>,
}

impl Uart {
    /// A read of register `offset` (0..=7).
    pub fn read(&mut self, offset: u16) -> u8 {
        let dlab = self.lcr & LCR_DLAB != 0;
        match offset {
            0 if dlab => self.dll,
            0 => self.rx.pop_front().unwrap_or(0),
            1 if dlab => self.dlm,
            1 => self.ier,
            // IIR: the highest-priority source; FIFO bits mirror FCR.0.
            2 => {
                let id = self.interrupt_id();
                if id == IIR_THRE {
                    // Reading IIR with THRE as the source clears it
                    // (datasheet table IV).
                    self.thre = false;
                }
                id | if self.fcr & 1 != 0 { 0xc0 } else { 0 }
            }
            3 => self.lcr,
            4 => self.mcr,
            5 => LSR_THRE | LSR_TEMT | if self.rx.is_empty() { 0 } else { LSR_DR },
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
            0 => {
                self.transmit(v);
                // The byte leaves at once: the holding register is empty
                // again, which is a new THRE interrupt.
                self.thre = true;
            }
            1 if dlab => self.dlm = v,
            1 => {
                // Enabling THRE while the register is empty interrupts at
                // once (what Linux's 8250 driver relies on to start a
                // transmission).
                if v & IER_THRE != 0 && self.ier & IER_THRE == 0 {
                    self.thre = true;
                }
                self.ier = v & 0x0f;
            }
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
        if let Some(raw) = self.raw.as_mut() {
            // A terminal that stopped reading loses the oldest output.
            if raw.len() >= RAW_BUFFER {
                raw.pop_front();
            }
            raw.push_back(v);
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

    /// The IIR interrupt identification: received data first, then the
    /// transmitter (datasheet table IV).
    fn interrupt_id(&self) -> u8 {
        if self.ier & IER_RDA != 0 && !self.rx.is_empty() {
            IIR_RDA
        } else if self.ier & IER_THRE != 0 && self.thre {
            IIR_THRE
        } else {
            IIR_NONE
        }
    }

    /// The level of the UART's interrupt line (IRQ 4 for COM1): a source
    /// is pending and OUT2 connects the line.
    pub fn irq(&self) -> bool {
        self.mcr & MCR_OUT2 != 0 && self.interrupt_id() != IIR_NONE
    }

    /// Attach (`true`) or detach an operator's terminal: while attached,
    /// output is kept byte for byte for [`Self::take_raw`]; on attaching,
    /// the line written so far goes first.
    pub fn set_raw(&mut self, on: bool) {
        match (on, self.raw.is_some()) {
            (true, false) => {
                let mut raw = alloc::collections::VecDeque::new();
                raw.extend(core::mem::take(&mut self.line));
                self.raw = Some(raw);
            }
            (false, true) => self.raw = None,
            _ => {}
        }
    }

    /// Whether a terminal is attached.
    pub fn is_raw(&self) -> bool {
        self.raw.is_some()
    }

    /// Output bytes since the last call, while attached.
    pub fn take_raw(&mut self) -> Vec<u8> {
        self.raw.as_mut().map(|r| r.drain(..).collect()).unwrap_or_default()
    }

    /// Room left in the receive buffer.
    pub fn rx_room(&self) -> usize {
        RX_BUFFER - self.rx.len()
    }

    /// Bytes for the guest (the operator's keys); what does not fit the
    /// receive buffer is dropped, as an overrun would. Returns how many
    /// were taken.
    pub fn receive(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(RX_BUFFER - self.rx.len());
        self.rx.extend(&bytes[..n]);
        n
    }

    /// The partial line written so far, taken (for a console that shows a
    /// prompt before its line ends).
    pub fn take_partial(&mut self) -> Option<String> {
        if self.line.is_empty() {
            return None;
        }
        self.end_line();
        self.pending.pop()
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

/// The UART's state is its registers and the output not yet shown: the
/// runtime object is plain data already, so it is its own saved form.
impl Persist for Uart {
    type State = Uart;
    /// 2: the receive buffer and the pending THRE interrupt.
    const STATE_VERSION: u16 = 2;

    fn save(&self) -> Uart {
        // The attached terminal is the host's business, not the guest's.
        Uart { raw: None, ..self.clone() }
    }

    fn validate(s: &Uart) -> Result<(), Invalid> {
        if s.line.len() >= MAX_LINE {
            return Err(Invalid("the partial output line is longer than the line limit"));
        }
        if s.pending.len() > MAX_PENDING || s.pending.iter().any(|l| l.len() > 4 * MAX_LINE) {
            return Err(Invalid("more or longer pending output lines than the UART keeps"));
        }
        if s.rx.len() > RX_BUFFER {
            return Err(Invalid("more received bytes than the receive buffer holds"));
        }
        if s.ier & !0x0f != 0 || s.mcr & !0x1f != 0 {
            return Err(Invalid("IER or MCR has bits a 16550 does not keep"));
        }
        Ok(())
    }

    fn restore(&mut self, state: Uart) {
        let raw = self.raw.take();
        *self = state;
        self.raw = raw;
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
        assert_eq!(u.read(2) & 0x0f, IIR_THRE, "enabling THRE with the register empty interrupts");
        assert_eq!(u.read(2) & 1, 1, "and reading IIR acknowledged it");
    }

    #[test]
    fn state_round_trips_and_hostile_state_is_refused() {
        use crate::devices::persist::{RestoreError, decode, save};
        let mut u = Uart::default();
        u.write(3, 0x03);
        u.write(7, 0x42);
        u.write(1, 0x05);
        write_str(&mut u, "done\npart");
        let saved = save("com1", &u);
        let mut back = Uart::default();
        back.restore(decode::<Uart>("com1", &saved).unwrap());
        assert_eq!(back, u);
        assert_eq!(back.take_lines(), ["done"]);
        // The partial line carries on where it stopped.
        write_str(&mut back, "ial\n");
        assert_eq!(back.take_lines(), ["partial"]);

        let mut bad = u.clone();
        bad.mcr = 0xff;
        let saved = save("com1", &bad);
        assert_eq!(
            decode::<Uart>("com1", &saved),
            Err(RestoreError::Invalid { device: "com1", why: "IER or MCR has bits a 16550 does not keep" })
        );
        let mut saved = save("com1", &u);
        saved.bytes.truncate(saved.bytes.len() - 1);
        assert_eq!(decode::<Uart>("com1", &saved), Err(RestoreError::Corrupt { device: "com1" }));
        let mut saved = save("com1", &u);
        saved.bytes.push(0);
        assert_eq!(decode::<Uart>("com1", &saved), Err(RestoreError::Corrupt { device: "com1" }), "trailing bytes");
        saved.version = 1;
        assert!(matches!(decode::<Uart>("com1", &saved), Err(RestoreError::Version { found: 1, expected: 2, .. })));
    }

    #[test]
    fn thre_and_receive_interrupts_follow_ier_iir_and_out2() {
        let mut u = Uart::default();
        assert!(!u.irq());
        u.write(4, MCR_OUT2);
        // Enabling THRE with the register empty interrupts at once.
        u.write(1, IER_THRE);
        assert!(u.irq());
        assert_eq!(u.read(2) & 0x0f, IIR_THRE);
        assert!(!u.irq(), "reading IIR acknowledged THRE");
        assert_eq!(u.read(2) & 0x0f, IIR_NONE);
        // Each byte written empties the register again: another THRE.
        u.write(0, b'x');
        assert!(u.irq());
        // Received data takes priority and holds the line until read.
        u.write(1, IER_THRE | IER_RDA);
        assert_eq!(u.receive(b"ab"), 2);
        assert_eq!(u.read(5) & LSR_DR, LSR_DR);
        assert_eq!(u.read(2) & 0x0f, IIR_RDA);
        assert_eq!(u.read(0), b'a');
        assert_eq!(u.read(0), b'b');
        assert_eq!(u.read(5) & LSR_DR, 0);
        assert_eq!(u.read(2) & 0x0f, IIR_THRE, "then the pending THRE");
        // OUT2 clear: the line stays low whatever is pending.
        u.receive(b"c");
        u.write(4, 0);
        assert!(!u.irq());
        // A full buffer drops the rest.
        assert_eq!(u.receive(&[0; RX_BUFFER]), RX_BUFFER - 1);
    }

    #[test]
    fn an_attached_terminal_gets_every_byte_and_lines_resume_after() {
        let mut u = Uart::default();
        write_str(&mut u, "line\n$ ");
        u.set_raw(true);
        write_str(&mut u, "ls\r\n\x1b[0m");
        assert_eq!(u.take_raw(), b"$ ls\r\n\x1b[0m", "the open line first, then raw bytes");
        assert_eq!(u.take_lines(), ["line"], "lines finished before attaching are still there");
        u.set_raw(false);
        write_str(&mut u, "back\n");
        assert_eq!(u.take_lines(), ["back"]);
        assert!(u.take_raw().is_empty());
        // Not part of the saved state.
        u.set_raw(true);
        assert_eq!(u.save().raw, None::<alloc::collections::VecDeque<u8>>);
    }

    #[test]
    fn a_partial_line_can_be_taken() {
        let mut u = Uart::default();
        write_str(&mut u, "done\n# ");
        assert_eq!(u.take_partial().as_deref(), Some("# "));
        assert_eq!(u.take_lines(), ["done"]);
        assert_eq!(u.take_partial(), None);
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
