//! The I/O APIC as the guest sees it (Intel 82093AA I/O APIC datasheet,
//! order no. 290566): two registers in its MMIO page at 0xfec00000, IOREGSEL
//! (offset 0x00) selecting which internal register IOWIN (0x10) reads and
//! writes (datasheet 3.0): the ID (0x00), version (0x01), arbitration ID
//! (0x02) and 24 redirection entries of 64 bits as two 32-bit halves
//! (0x10-0x3f, datasheet 3.2.4).
//!
//! Version 0x11, the 82093AA's, not 0x20 (which adds an EOI register at
//! 0x40): the local APICs here do not offer directed EOI, so every
//! level-triggered EOI reaches [`IoApic::eoi`] as a broadcast and an EOI
//! register would have no user. Linux handles both: with a version below
//! 0x20 it clears a stuck remote IRR by switching the entry to edge and
//! back (arch/x86/kernel/apic/io_apic.c, `__eoi_ioapic_pin`), which works
//! here because an edge-triggered entry's remote IRR is cleared.
//!
//! Pure logic: the board calls [`IoApic::set_irq`] when a line changes and
//! delivers the [`Message`]s that come back to the local APICs (for fixed
//! and lowest-priority ones, `Lapic::accept(vector, level_triggered)` on
//! each LAPIC whose `is_destination(logical, destination, false)` holds),
//! and passes the LAPICs' EOI broadcasts to [`IoApic::eoi`].
//!
//! `set_irq`'s `asserted` is the line's logical state: the polarity bit of
//! an entry tells the guest how the board wires the pin (the firmware's
//! tables say the same) and is not applied again here.
//!
//! MMIO accesses are 32-bit at offsets 0x00 and 0x10 (datasheet 3.1); other
//! offsets read 0 and ignore writes. The caller maps narrower reads onto
//! the dword and drops narrower writes, as for the local APIC; Linux uses
//! 32-bit accesses (`io_apic_read`/`io_apic_write` in io_apic.c).

use serde::{Deserialize, Serialize};

use super::lapic::DeliveryMode;
use super::persist::{Invalid, Persist};

/// Where the I/O APIC's page is (the PC default; the MADT says so too).
pub const IOAPIC_BASE: u64 = 0xfec0_0000;
/// Its input pins (redirection entries).
pub const PINS: usize = 24;
/// The version register (datasheet 3.2.2): maximum redirection entry 23 in
/// bits 23:16, version 0x11 in bits 7:0.
pub const VERSION: u32 = (((PINS as u32) - 1) << 16) | 0x11;

const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;

const REG_ID: u8 = 0x00;
const REG_VERSION: u8 = 0x01;
const REG_ARBITRATION: u8 = 0x02;
const REG_REDIRECTION: u8 = 0x10;

/// Redirection entry bits (datasheet 3.2.4): vector 7:0, delivery mode
/// 10:8, destination mode 11, delivery status 12 (read-only), polarity 13,
/// remote IRR 14 (read-only), trigger mode 15, mask 16, destination 63:56.
const RTE_LOGICAL: u64 = 1 << 11;
const RTE_REMOTE_IRR: u64 = 1 << 14;
const RTE_LEVEL: u64 = 1 << 15;
const RTE_MASKED: u64 = 1 << 16;
const RTE_WRITABLE_LOW: u32 = 0x1_afff;
const RTE_WRITABLE_HIGH: u32 = 0xff00_0000;
const RTE_WRITABLE: u64 = ((RTE_WRITABLE_HIGH as u64) << 32) | RTE_WRITABLE_LOW as u64;

/// An interrupt message the I/O APIC sends to the local APICs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Message {
    /// The pin it came from.
    pub pin: u8,
    pub vector: u8,
    pub mode: DeliveryMode,
    /// Logical (true) or physical destination mode.
    pub logical: bool,
    /// The 8-bit destination (entry bits 63:56).
    pub destination: u8,
    /// Level-triggered: the receiving LAPIC sets TMR and broadcasts its EOI.
    pub level_triggered: bool,
}

impl Message {
    const NONE: Message = Message {
        pin: 0,
        vector: 0,
        mode: DeliveryMode::Fixed,
        logical: false,
        destination: 0,
        level_triggered: false,
    };
}

/// The messages one EOI broadcast re-sends (at most one per pin), without
/// allocating.
#[derive(Clone, Debug)]
pub struct Messages {
    buf: [Message; PINS],
    len: usize,
    next: usize,
}

impl Messages {
    fn new() -> Messages {
        Messages { buf: [Message::NONE; PINS], len: 0, next: 0 }
    }

    fn push(&mut self, m: Message) {
        if let Some(slot) = self.buf.get_mut(self.len) {
            *slot = m;
            self.len += 1;
        }
    }
}

impl Iterator for Messages {
    type Item = Message;

    fn next(&mut self) -> Option<Message> {
        let m = *self.buf[..self.len].get(self.next)?;
        self.next += 1;
        Some(m)
    }
}

/// The I/O APIC's guest-visible state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoApicState {
    /// The I/O APIC ID (register 0x00 bits 27:24).
    pub id: u8,
    /// IOREGSEL.
    pub select: u8,
    /// The redirection table.
    pub redirection: [u64; PINS],
    /// Which input lines are asserted, pin `n` at bit `n`.
    pub lines: u32,
}

/// The I/O APIC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IoApic {
    s: IoApicState,
}

impl IoApic {
    /// An I/O APIC after reset with the ID the MADT gives it: every entry
    /// masked (datasheet 3.2.4: the mask bit is set at reset; the other
    /// fields are undefined there and 0 here), no line asserted.
    pub fn new(id: u8) -> IoApic {
        IoApic { s: IoApicState { id: id & 0xf, select: 0, redirection: [RTE_MASKED; PINS], lines: 0 } }
    }

    /// The message entry `pin` sends, if its delivery mode is one an I/O
    /// APIC can send (0b011 and 0b110 are reserved).
    fn message(&self, pin: usize) -> Option<Message> {
        let e = self.s.redirection[pin];
        let mode = match DeliveryMode::from_bits((e >> 8) as u32)? {
            DeliveryMode::StartUp => return None,
            m => m,
        };
        Some(Message {
            pin: pin as u8,
            vector: e as u8,
            mode,
            logical: e & RTE_LOGICAL != 0,
            destination: (e >> 56) as u8,
            level_triggered: e & RTE_LEVEL != 0,
        })
    }

    fn line(&self, pin: usize) -> bool {
        self.s.lines & (1 << pin) != 0
    }

    /// A level-triggered pin delivers while its line is asserted, it is
    /// unmasked and its last interrupt was EOI'd (remote IRR clear,
    /// datasheet 3.2.4); delivering sets remote IRR. Only fixed and
    /// lowest-priority interrupts are ever EOI'd, so only they set it (later
    /// Intel I/O APICs document the same: never for SMI, NMI, INIT or
    /// ExtINT); a level-triggered entry of another mode sends once per
    /// assertion or unmask instead of sticking after the first.
    fn service_level(&mut self, pin: usize) -> Option<Message> {
        let e = self.s.redirection[pin];
        if e & RTE_LEVEL == 0 || e & (RTE_MASKED | RTE_REMOTE_IRR) != 0 || !self.line(pin) {
            return None;
        }
        let m = self.message(pin)?;
        if eoi_follows(m.mode) {
            self.s.redirection[pin] |= RTE_REMOTE_IRR;
        }
        Some(m)
    }

    /// Input line `pin` is now `asserted` or not. Returns the message to
    /// deliver, if any: an unmasked edge-triggered pin sends one on the
    /// rising edge (edges on a masked pin are lost, datasheet 3.2.4); a
    /// level-triggered one while asserted with remote IRR clear. Pins
    /// beyond the 24 are not wired.
    pub fn set_irq(&mut self, pin: usize, asserted: bool) -> Option<Message> {
        if pin >= PINS {
            return None;
        }
        let was = self.line(pin);
        if asserted {
            self.s.lines |= 1 << pin;
        } else {
            self.s.lines &= !(1 << pin);
        }
        let e = self.s.redirection[pin];
        if e & RTE_LEVEL != 0 {
            let eoi_able = self.message(pin).is_some_and(|m| eoi_follows(m.mode));
            if was && !eoi_able {
                // Already sent for this assertion (see `service_level`).
                return None;
            }
            return self.service_level(pin);
        }
        if asserted && !was && e & RTE_MASKED == 0 { self.message(pin) } else { None }
    }

    /// An EOI broadcast for `vector` from a local APIC: every
    /// level-triggered entry with that vector has its remote IRR cleared
    /// (datasheet 3.2.4) and, if its line is still asserted and it is
    /// unmasked, delivers again.
    pub fn eoi(&mut self, vector: u8) -> Messages {
        let mut out = Messages::new();
        for pin in 0..PINS {
            let e = self.s.redirection[pin];
            if e as u8 != vector || e & RTE_LEVEL == 0 || e & RTE_REMOTE_IRR == 0 {
                continue;
            }
            self.s.redirection[pin] &= !RTE_REMOTE_IRR;
            if let Some(m) = self.service_level(pin) {
                out.push(m);
            }
        }
        out
    }

    /// Entry `pin` as the guest reads it.
    pub fn redirection(&self, pin: usize) -> Option<u64> {
        self.s.redirection.get(pin).copied()
    }

    /// A 32-bit read at byte `offset` of the page.
    pub fn read(&self, offset: u64) -> u32 {
        match offset {
            IOREGSEL => u32::from(self.s.select),
            IOWIN => self.read_register(self.s.select),
            _ => 0,
        }
    }

    fn read_register(&self, index: u8) -> u32 {
        match index {
            REG_ID => u32::from(self.s.id) << 24,
            REG_VERSION => VERSION,
            // The arbitration ID follows the ID (datasheet 3.2.3).
            REG_ARBITRATION => u32::from(self.s.id) << 24,
            _ => match redirection_half(index) {
                Some((pin, false)) => self.s.redirection[pin] as u32,
                Some((pin, true)) => (self.s.redirection[pin] >> 32) as u32,
                // Undefined registers read 0.
                None => 0,
            },
        }
    }

    /// A 32-bit write at byte `offset` of the page. Returns a message when
    /// the write lets an asserted level-triggered pin deliver (unmasking
    /// it, or making it level-triggered).
    pub fn write(&mut self, offset: u64, value: u32) -> Option<Message> {
        match offset {
            // Bits 31:8 are reserved (datasheet 3.1.1).
            IOREGSEL => self.s.select = value as u8,
            IOWIN => return self.write_register(self.s.select, value),
            _ => {}
        }
        None
    }

    fn write_register(&mut self, index: u8, value: u32) -> Option<Message> {
        match index {
            REG_ID => self.s.id = ((value >> 24) & 0xf) as u8,
            // Version and arbitration are read-only; other indices are
            // undefined.
            _ => {
                let (pin, high) = redirection_half(index)?;
                let e = &mut self.s.redirection[pin];
                if high {
                    *e = (*e & 0xffff_ffff) | (u64::from(value & RTE_WRITABLE_HIGH) << 32);
                } else {
                    *e = (*e & !0xffff_ffff) | (*e & RTE_REMOTE_IRR) | u64::from(value & RTE_WRITABLE_LOW);
                    if *e & RTE_LEVEL == 0 {
                        // Remote IRR means nothing for an edge-triggered
                        // entry; clearing it is what Linux's EOI for
                        // version-0x11 I/O APICs relies on (module notes).
                        *e &= !RTE_REMOTE_IRR;
                    }
                    return self.service_level(pin);
                }
            }
        }
        None
    }
}

/// Whether a local APIC will EOI an interrupt of this mode (it goes
/// through IRR and ISR).
fn eoi_follows(mode: DeliveryMode) -> bool {
    matches!(mode, DeliveryMode::Fixed | DeliveryMode::LowestPriority)
}

/// The pin and half (high: bits 63:32) a register index selects, if it is
/// a redirection entry.
fn redirection_half(index: u8) -> Option<(usize, bool)> {
    let i = usize::from(index.checked_sub(REG_REDIRECTION)?);
    (i < 2 * PINS).then_some((i / 2, i % 2 == 1))
}

impl Persist for IoApic {
    type State = IoApicState;
    const STATE_VERSION: u16 = 1;

    fn save(&self) -> IoApicState {
        self.s.clone()
    }

    fn validate(s: &IoApicState) -> Result<(), Invalid> {
        if s.id > 0xf {
            return Err(Invalid("the I/O APIC ID is wider than 4 bits"));
        }
        if s.lines >> PINS != 0 {
            return Err(Invalid("a line beyond the 24 pins is asserted"));
        }
        for e in s.redirection {
            if e & !(RTE_WRITABLE | RTE_REMOTE_IRR) != 0 {
                return Err(Invalid("a redirection entry has reserved or delivery-status bits set"));
            }
            if e & RTE_REMOTE_IRR != 0 && e & RTE_LEVEL == 0 {
                return Err(Invalid("an edge-triggered redirection entry has remote IRR set"));
            }
        }
        Ok(())
    }

    fn restore(&mut self, state: IoApicState) {
        self.s = state;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::persist::{RestoreError, decode, save};

    fn write_entry(io: &mut IoApic, pin: usize, entry: u64) -> Option<Message> {
        io.write(IOREGSEL, (0x10 + 2 * pin + 1) as u32);
        io.write(IOWIN, (entry >> 32) as u32);
        io.write(IOREGSEL, (0x10 + 2 * pin) as u32);
        io.write(IOWIN, entry as u32)
    }

    fn read_reg(io: &mut IoApic, index: u32) -> u32 {
        io.write(IOREGSEL, index);
        io.read(IOWIN)
    }

    const LEVEL: u64 = RTE_LEVEL;

    #[test]
    fn registers_follow_the_datasheet() {
        let mut io = IoApic::new(2);
        assert_eq!(read_reg(&mut io, 0x00), 2 << 24);
        assert_eq!(read_reg(&mut io, 0x01), 0x0017_0011, "24 entries, version 0x11");
        assert_eq!(read_reg(&mut io, 0x02), 2 << 24);
        io.write(IOREGSEL, 0x00);
        io.write(IOWIN, 0xffff_ffff);
        assert_eq!(io.read(IOWIN), 0x0f00_0000, "only the 4-bit ID is kept");
        io.write(IOREGSEL, 0x01);
        io.write(IOWIN, 0);
        assert_eq!(io.read(IOWIN), VERSION, "version is read-only");
        assert_eq!(io.read(IOREGSEL), 0x01);
        io.write(IOREGSEL, 0x1234);
        assert_eq!(io.read(IOREGSEL), 0x34, "IOREGSEL keeps 8 bits");
        for pin in 0..PINS {
            assert_eq!(read_reg(&mut io, 0x10 + 2 * pin as u32), 0x1_0000, "masked after reset");
            assert_eq!(read_reg(&mut io, 0x11 + 2 * pin as u32), 0);
        }
        // Undefined registers and offsets.
        assert_eq!(read_reg(&mut io, 0x03), 0);
        assert_eq!(read_reg(&mut io, 0x40), 0);
        assert_eq!(read_reg(&mut io, 0xff), 0);
        io.write(IOREGSEL, 0x50);
        io.write(IOWIN, 0xffff_ffff);
        io.write(0x40, 0x31);
        io.write(0x04, 0xffff_ffff);
        assert_eq!(io.read(0x40), 0);
        assert_eq!(io.read(0x20), 0);
        assert_eq!(io.save(), {
            let mut fresh = IoApic::new(0xf);
            fresh.s.select = 0x50;
            fresh.save()
        });
        // Entries keep their defined bits only; delivery status and remote
        // IRR are read-only.
        write_entry(&mut io, 5, u64::MAX);
        assert_eq!(io.redirection(5), Some(0xff00_0000_0001_afff));
        assert_eq!(io.redirection(24), None);
    }

    #[test]
    fn edge_pins_send_on_rising_edges_only() {
        let mut io = IoApic::new(0);
        assert_eq!(write_entry(&mut io, 4, (3 << 56) | 0x34), None);
        let m = io.set_irq(4, true).unwrap();
        assert_eq!(
            m,
            Message {
                pin: 4,
                vector: 0x34,
                mode: DeliveryMode::Fixed,
                logical: false,
                destination: 3,
                level_triggered: false
            }
        );
        assert_eq!(io.set_irq(4, true), None, "no edge: still high");
        assert_eq!(io.set_irq(4, false), None);
        assert!(io.set_irq(4, true).is_some(), "second rising edge");
        assert_eq!(io.redirection(4).unwrap() & RTE_REMOTE_IRR, 0, "no remote IRR for edge");
        // Masked edges are lost, not held.
        io.set_irq(4, false);
        write_entry(&mut io, 4, RTE_MASKED | 0x34);
        assert_eq!(io.set_irq(4, true), None);
        assert_eq!(write_entry(&mut io, 4, 0x34), None, "unmasking an edge pin delivers nothing");
        // Other delivery modes and logical destinations pass through.
        write_entry(&mut io, 0, (0xf0 << 56) | RTE_LOGICAL | (7 << 8));
        let m = io.set_irq(0, true).unwrap();
        assert_eq!((m.mode, m.logical, m.destination), (DeliveryMode::ExtInt, true, 0xf0));
        write_entry(&mut io, 1, 4 << 8);
        assert_eq!(io.set_irq(1, true).unwrap().mode, DeliveryMode::Nmi);
        write_entry(&mut io, 2, 6 << 8);
        assert_eq!(io.set_irq(2, true), None, "0b110 is reserved in an I/O APIC");
        assert_eq!(io.set_irq(24, true), None);
        assert_eq!(io.set_irq(usize::MAX, true), None);
    }

    #[test]
    fn level_pins_wait_for_eoi_and_resend_while_asserted() {
        let mut io = IoApic::new(0);
        write_entry(&mut io, 9, LEVEL | 0x59);
        write_entry(&mut io, 10, LEVEL | 0x5a);
        let m = io.set_irq(9, true).unwrap();
        assert!(m.level_triggered);
        assert_ne!(io.redirection(9).unwrap() & RTE_REMOTE_IRR, 0, "remote IRR set on delivery");
        assert_eq!(io.set_irq(9, true), None, "remote IRR holds it");
        assert_eq!(io.eoi(0x5a).count(), 0, "another vector's EOI");
        assert_ne!(io.redirection(9).unwrap() & RTE_REMOTE_IRR, 0);
        let again: Vec<_> = io.eoi(0x59).collect();
        assert_eq!(again.len(), 1, "still asserted: delivered again");
        assert_eq!(again[0].pin, 9);
        assert_ne!(io.redirection(9).unwrap() & RTE_REMOTE_IRR, 0);
        io.set_irq(9, false);
        assert_eq!(io.eoi(0x59).count(), 0, "deasserted: the EOI just clears remote IRR");
        assert_eq!(io.redirection(9).unwrap() & RTE_REMOTE_IRR, 0);
        assert!(io.set_irq(9, true).is_some());
        // Two pins sharing a vector are both re-sent by one EOI.
        write_entry(&mut io, 10, LEVEL | 0x59);
        assert!(io.set_irq(10, true).is_some());
        let pins: Vec<_> = io.eoi(0x59).map(|m| m.pin).collect();
        assert_eq!(pins, [9, 10]);
        // An EOI for an edge entry's vector changes nothing.
        write_entry(&mut io, 3, 0x59);
        assert_eq!(io.eoi(0x59).count(), 2);
    }

    #[test]
    fn masking_holds_a_level_pin_and_unmasking_delivers() {
        let mut io = IoApic::new(0);
        write_entry(&mut io, 11, LEVEL | RTE_MASKED | 0x61);
        assert_eq!(io.set_irq(11, true), None, "masked");
        let m = write_entry(&mut io, 11, LEVEL | 0x61).expect("unmasking an asserted level pin delivers");
        assert_eq!((m.pin, m.vector), (11, 0x61));
        // Masked with remote IRR set: the EOI clears it but nothing is sent
        // until the unmask.
        write_entry(&mut io, 11, LEVEL | RTE_MASKED | 0x61);
        assert_eq!(io.eoi(0x61).count(), 0);
        assert!(write_entry(&mut io, 11, LEVEL | 0x61).is_some());
        // Changing an asserted edge entry to level delivers too.
        write_entry(&mut io, 12, 0x62);
        assert!(io.set_irq(12, true).is_some());
        assert!(write_entry(&mut io, 12, LEVEL | 0x62).is_some());
        // The high half alone does not deliver.
        io.write(IOREGSEL, 0x10 + 2 * 12 + 1);
        assert_eq!(io.write(IOWIN, 0x0100_0000), None);
    }

    #[test]
    fn level_entries_without_eoi_send_once_per_assertion() {
        let mut io = IoApic::new(0);
        write_entry(&mut io, 3, LEVEL | (4 << 8)); // NMI
        assert_eq!(io.set_irq(3, true).unwrap().mode, DeliveryMode::Nmi);
        assert_eq!(io.redirection(3).unwrap() & RTE_REMOTE_IRR, 0, "no EOI will come for an NMI");
        assert_eq!(io.set_irq(3, true), None, "same assertion");
        io.set_irq(3, false);
        assert!(io.set_irq(3, true).is_some(), "a new assertion");
        write_entry(&mut io, 3, LEVEL | RTE_MASKED | (4 << 8));
        assert!(write_entry(&mut io, 3, LEVEL | (4 << 8)).is_some(), "unmasked while asserted");
        // Lowest priority is EOI'd like fixed.
        write_entry(&mut io, 4, LEVEL | (1 << 8) | 0x44);
        assert!(io.set_irq(4, true).is_some());
        assert_ne!(io.redirection(4).unwrap() & RTE_REMOTE_IRR, 0);
    }

    #[test]
    fn switching_to_edge_clears_a_stuck_remote_irr() {
        // Linux's EOI for I/O APICs without an EOI register: mask, switch
        // to edge, restore (io_apic.c, __eoi_ioapic_pin).
        let mut io = IoApic::new(0);
        let entry = LEVEL | 0x70;
        write_entry(&mut io, 7, entry);
        assert!(io.set_irq(7, true).is_some());
        io.set_irq(7, false);
        write_entry(&mut io, 7, RTE_MASKED | 0x70);
        assert_eq!(io.redirection(7).unwrap() & RTE_REMOTE_IRR, 0);
        assert_eq!(write_entry(&mut io, 7, entry), None, "line low: nothing to send");
        assert!(io.set_irq(7, true).is_some(), "the pin works again");
    }

    #[test]
    fn state_round_trips_and_hostile_state_is_refused() {
        let mut io = IoApic::new(1);
        write_entry(&mut io, 9, LEVEL | (1 << 56) | 0x59);
        write_entry(&mut io, 4, 0x34);
        io.set_irq(9, true);
        io.write(IOREGSEL, 0x12);
        let saved = save("ioapic", &io);
        let mut back = IoApic::new(0);
        back.restore(decode::<IoApic>("ioapic", &saved).unwrap());
        assert_eq!(back, io);
        assert_eq!(back.set_irq(9, true), None, "remote IRR survived");
        assert_eq!(back.eoi(0x59).count(), 1, "and the line level too");

        let refused = |state: IoApicState| {
            let bytes = postcard::to_allocvec(&state).unwrap();
            let saved = crate::devices::SavedDevice { name: "ioapic".into(), version: 1, bytes };
            decode::<IoApic>("ioapic", &saved)
        };
        let mut s = io.save();
        s.id = 16;
        assert!(matches!(refused(s), Err(RestoreError::Invalid { .. })));
        let mut s = io.save();
        s.lines = 1 << 24;
        assert!(matches!(refused(s), Err(RestoreError::Invalid { .. })));
        let mut s = io.save();
        s.redirection[0] |= 1 << 12;
        assert!(matches!(refused(s), Err(RestoreError::Invalid { .. })), "delivery status");
        let mut s = io.save();
        s.redirection[0] |= 1 << 40;
        assert!(matches!(refused(s), Err(RestoreError::Invalid { .. })), "reserved bits");
        let mut s = io.save();
        s.redirection[4] |= RTE_REMOTE_IRR;
        assert!(matches!(refused(s), Err(RestoreError::Invalid { .. })), "remote IRR on an edge entry");
        let mut saved = save("ioapic", &io);
        saved.bytes.truncate(10);
        assert_eq!(decode::<IoApic>("ioapic", &saved), Err(RestoreError::Corrupt { device: "ioapic" }));
    }

    #[test]
    fn random_accesses_never_panic_and_keep_state_valid() {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut io = IoApic::new(0);
        for _ in 0..20_000 {
            let r = next();
            match r % 5 {
                0 => {
                    io.write(next() % 0x48, next() as u32);
                }
                1 => {
                    io.read(next() % 0x48);
                }
                2 => {
                    io.set_irq((next() % 30) as usize, next() & 1 == 0);
                }
                3 => io.eoi(next() as u8).for_each(drop),
                _ => {
                    io.write(IOREGSEL, (next() % 0x40) as u32);
                    io.write(IOWIN, next() as u32);
                }
            }
            assert_eq!(IoApic::validate(&io.save()), Ok(()));
        }
    }
}
