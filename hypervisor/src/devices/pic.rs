//! The two cascaded Intel 8259A programmable interrupt controllers of a PC
//! (the "Intel 8259A Programmable Interrupt Controller" datasheet; section
//! names below are its headings): the master at ports 0x20/0x21, the slave
//! at 0xa0/0xa1 with its INT output wired to the master's IR2, and the PIIX
//! edge/level control registers (ELCR) at 0x4d0/0x4d1 that choose the
//! trigger mode per line (Intel 82371AB PIIX4 datasheet, ELCR1/ELCR2).
//!
//! Linux masks the PIC once the I/O APIC runs, but it probes and
//! initialises it first (`probe_8259A` and `init_8259A` in
//! arch/x86/kernel/i8259.c: IMR write and read-back, ICW1-ICW4), may route
//! the timer through it in virtual-wire mode (`check_timer` in
//! arch/x86/kernel/apic/io_apic.c), and tells spurious IRQ 7/15 from real
//! ones by reading the ISR through OCW3 (`mask_and_ack_8259A`). All of that
//! works here as on the chip.
//!
//! The VM drives the 16 input lines with [`Pic::set_irq`], asks
//! [`Pic::output`] whether INTR is asserted and runs the CPU's interrupt
//! acknowledge cycle with [`Pic::acknowledge`], which returns the vector.
//! Every interrupt arrives in x86 (8086) mode: the MCS-80/85 call sequence
//! of an 8085 system has no meaning for an x86 CPU.

use serde::{Deserialize, Serialize};

use super::persist::{Invalid, Persist};

/// The master's command and data ports.
pub const MASTER_CMD: u16 = 0x20;
pub const MASTER_DATA: u16 = 0x21;
/// The slave's command and data ports.
pub const SLAVE_CMD: u16 = 0xa0;
pub const SLAVE_DATA: u16 = 0xa1;
/// The PIIX edge/level control registers for IRQ 0-7 and IRQ 8-15.
pub const ELCR_MASTER: u16 = 0x4d0;
pub const ELCR_SLAVE: u16 = 0x4d1;

/// The master input the slave's INT drives.
pub const CASCADE_IR: u8 = 2;

/// ELCR bits that exist: IRQ 0, 1, 2, 8 and 13 are always edge-triggered
/// on PIIX (reserved, read as 0); Linux's `save_ELCR` masks the same bits.
const ELCR_MASK: [u8; 2] = [0xf8, 0xde];

// ICW1 ("Initialization Command Words"): D4 set on the command port.
const ICW1_IC4: u8 = 0x01;
const ICW1_SNGL: u8 = 0x02;
const ICW1_LTIM: u8 = 0x08;
const ICW1_INIT: u8 = 0x10;
// ICW4: µPM, AEOI, M/S, BUF, SFNM; D7-D5 are 0.
const ICW4_AEOI: u8 = 0x02;
const ICW4_SFNM: u8 = 0x10;
const ICW4_BITS: u8 = 0x1f;
// OCW3 ("Operation Command Words"): D4 clear, D3 set on the command port.
const OCW3: u8 = 0x08;
const OCW3_ESMM: u8 = 0x40;
const OCW3_SMM: u8 = 0x20;
const OCW3_POLL: u8 = 0x04;
const OCW3_RR: u8 = 0x02;
const OCW3_RIS: u8 = 0x01;

/// One 8259A's registers and latches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChipState {
    /// Interrupt request register: requests waiting for service.
    pub irr: u8,
    /// In-service register: requests acknowledged and not yet ended.
    pub isr: u8,
    /// Interrupt mask register (OCW1).
    pub imr: u8,
    /// The IR input levels as last driven. On the master, bit 2 is the
    /// slave's INT output.
    pub lines: u8,
    /// ICW1 as written (IC4, SNGL, ADI, LTIM); 0 until the first ICW1.
    pub icw1: u8,
    /// ICW2 as written: the vector base in its top five bits.
    pub icw2: u8,
    /// ICW3: on the master, which IRs have a slave; on the slave, its ID.
    pub icw3: u8,
    /// ICW4: µPM, AEOI, M/S, BUF, SFNM (zero when ICW1 said no ICW4).
    pub icw4: u8,
    /// Which ICW the next data-port write is (2, 3 or 4), or 0 once
    /// initialised.
    pub init_step: u8,
    /// The IR with the lowest priority (7 after ICW1; rotation moves it).
    pub lowest: u8,
    /// OCW2 "rotate in automatic EOI mode".
    pub rotate_aeoi: bool,
    /// OCW3 special mask mode.
    pub special_mask: bool,
    /// OCW3: the command port reads the ISR (else the IRR).
    pub read_isr: bool,
    /// OCW3 poll command: the next read is a poll.
    pub poll: bool,
    /// The ELCR: set bits are level-triggered lines.
    pub elcr: u8,
}

/// Both controllers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PicState {
    /// `[master, slave]`.
    pub chips: [ChipState; 2],
}

/// The cascaded pair of 8259As with the ELCR.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pic {
    state: PicState,
}

impl ChipState {
    /// A chip at power-on. The datasheet leaves the state undefined until
    /// ICW1; every line starts masked so nothing reaches the CPU with a
    /// vector base the guest never chose.
    const fn new() -> Self {
        ChipState {
            irr: 0,
            isr: 0,
            imr: 0xff,
            lines: 0,
            icw1: 0,
            icw2: 0,
            icw3: 0,
            icw4: 0,
            init_step: 0,
            lowest: 7,
            rotate_aeoi: false,
            special_mask: false,
            read_isr: false,
            poll: false,
            elcr: 0,
        }
    }

    fn single(&self) -> bool {
        self.icw1 & ICW1_SNGL != 0
    }

    fn aeoi(&self) -> bool {
        self.icw4 & ICW4_AEOI != 0
    }

    /// Lines whose request follows the input level: ICW1's LTIM makes all
    /// of them level-triggered, as on a discrete 8259A; on PIIX, where LTIM
    /// is disabled, the ELCR chooses per line. Honouring both costs nothing
    /// (Linux writes LTIM = 0) and keeps either kind of guest working.
    fn level_mask(&self) -> u8 {
        if self.icw1 & ICW1_LTIM != 0 { 0xff } else { self.elcr }
    }

    /// Priority rank of `ir`: 0 is the highest ("Automatic Rotation":
    /// the IR after the lowest-priority one is the highest).
    fn rank(&self, ir: u8) -> u8 {
        ir.wrapping_sub(self.lowest).wrapping_sub(1) & 7
    }

    /// The highest-priority IR among `bits`.
    fn highest(&self, bits: u8) -> Option<u8> {
        (1..=8u8).map(|i| (self.lowest + i) & 7).find(|ir| bits & (1 << ir) != 0)
    }

    /// The IR that would interrupt now ("Fully Nested Mode": a request
    /// interrupts only above every level in service). In special mask mode
    /// masked levels in service block nothing ("Special Mask Mode"); in
    /// special fully nested mode a slave's line is not blocked by its own
    /// in-service bit, so a higher request within that slave gets through
    /// ("The Special Fully Nested Mode"). `slaves` is the set of IRs with a
    /// slave (nonzero only on the master).
    fn pending(&self, slaves: u8) -> Option<u8> {
        let request = self.highest(self.irr & !self.imr)?;
        let mut in_service = self.isr;
        if self.special_mask {
            in_service &= !self.imr;
        }
        match self.highest(in_service) {
            Some(s) if self.rank(s) < self.rank(request) => None,
            Some(s) if s == request && !(self.icw4 & ICW4_SFNM != 0 && slaves & (1 << s) != 0) => None,
            _ => Some(request),
        }
    }

    /// The acknowledge of `ir` ("Interrupt Sequence"): IRR to ISR, or
    /// straight through in automatic EOI mode, which ends the interrupt at
    /// the last INTA pulse ("Automatic End of Interrupt (AEOI) Mode").
    fn ack(&mut self, ir: u8) {
        let bit = 1 << ir;
        self.irr &= !bit;
        // A level-triggered request stays as long as its line is high.
        self.irr |= self.lines & self.level_mask() & bit;
        if self.aeoi() {
            if self.rotate_aeoi {
                self.lowest = ir;
            }
        } else {
            self.isr |= bit;
        }
    }

    /// A new level on input `ir`.
    fn drive(&mut self, ir: u8, high: bool) {
        let bit = 1 << ir;
        let rising = high && self.lines & bit == 0;
        if high {
            self.lines |= bit;
        } else {
            self.lines &= !bit;
        }
        if self.level_mask() & bit != 0 {
            self.irr = (self.irr & !bit) | (self.lines & bit);
        } else if rising {
            // The datasheet's edge-sense latch also drops the request if
            // the line falls before INTA ("Edge and Level Triggered
            // Modes"); here the request stays latched, because device
            // models pulse their lines (raise and lower within one exit)
            // where hardware would hold them until the acknowledge.
            self.irr |= bit;
        }
    }

    /// The guest's write to the command port (A0 = 0).
    fn write_command(&mut self, value: u8) {
        if value & ICW1_INIT != 0 {
            self.icw1(value);
        } else if value & OCW3 != 0 {
            self.ocw3(value);
        } else {
            self.ocw2(value);
        }
    }

    /// ICW1 starts initialisation. The datasheet's list of its effects:
    /// the edge-sense circuit is reset (an edge-triggered line must rise
    /// again), the IMR is cleared, IR7 gets the lowest priority, the slave
    /// address is 7, special mask mode is cleared and status read selects
    /// the IRR, and without IC4 every ICW4 function is zero. Pending and
    /// in-service requests are dropped too, so a re-initialised chip is not
    /// left blocked by an interrupt the guest will never end.
    fn icw1(&mut self, value: u8) {
        self.icw1 = value;
        if value & ICW1_IC4 == 0 {
            self.icw4 = 0;
        }
        self.init_step = 2;
        self.imr = 0;
        self.isr = 0;
        self.irr = self.lines & self.level_mask();
        self.lowest = 7;
        self.icw3 = 7;
        self.special_mask = false;
        self.read_isr = false;
        self.poll = false;
        self.rotate_aeoi = false;
    }

    /// The guest's write to the data port (A0 = 1): the next ICW while
    /// initialising, else OCW1, the IMR.
    fn write_data(&mut self, value: u8) {
        let ic4 = self.icw1 & ICW1_IC4 != 0;
        match self.init_step {
            2 => {
                self.icw2 = value;
                self.init_step = if !self.single() {
                    3
                } else if ic4 {
                    4
                } else {
                    0
                };
            }
            3 => {
                self.icw3 = value;
                self.init_step = if ic4 { 4 } else { 0 };
            }
            4 => {
                self.icw4 = value & ICW4_BITS;
                self.init_step = 0;
            }
            _ => self.imr = value,
        }
    }

    /// The level a non-specific EOI ends: the highest in service, skipping
    /// masked levels in special mask mode ("End of Interrupt (EOI)").
    fn eoi_level(&self) -> Option<u8> {
        let mut in_service = self.isr;
        if self.special_mask {
            in_service &= !self.imr;
        }
        self.highest(in_service)
    }

    /// OCW2: R, SL, EOI and the level L2-L0.
    fn ocw2(&mut self, value: u8) {
        let level = value & 7;
        match value >> 5 {
            // Non-specific EOI.
            0b001 => {
                if let Some(ir) = self.eoi_level() {
                    self.isr &= !(1 << ir);
                }
            }
            // Specific EOI.
            0b011 => self.isr &= !(1 << level),
            // Rotate on non-specific EOI: the ended level becomes the
            // lowest ("Automatic Rotation").
            0b101 => {
                if let Some(ir) = self.eoi_level() {
                    self.isr &= !(1 << ir);
                    self.lowest = ir;
                }
            }
            // Rotate in automatic EOI mode (set / clear).
            0b100 => self.rotate_aeoi = true,
            0b000 => self.rotate_aeoi = false,
            // Rotate on specific EOI ("Specific Rotation").
            0b111 => {
                self.isr &= !(1 << level);
                self.lowest = level;
            }
            // Set priority: L becomes the lowest.
            0b110 => self.lowest = level,
            // 0b010: no operation.
            _ => {}
        }
    }

    /// OCW3: special mask mode, poll, and which register the command port
    /// reads ("Reading the 8259A Status").
    fn ocw3(&mut self, value: u8) {
        if value & OCW3_ESMM != 0 {
            self.special_mask = value & OCW3_SMM != 0;
        }
        if value & OCW3_POLL != 0 {
            self.poll = true;
        }
        if value & OCW3_RR != 0 {
            self.read_isr = value & OCW3_RIS != 0;
        }
    }

    /// A read after the poll command ("Poll Command"): it acts as an
    /// interrupt acknowledge and returns I (bit 7) and the level. With no
    /// request the level is undefined; it reads 0.
    fn poll_read(&mut self, slaves: u8) -> u8 {
        self.poll = false;
        match self.pending(slaves) {
            Some(ir) => {
                self.ack(ir);
                0x80 | ir
            }
            None => 0,
        }
    }

    /// The vector for `ir` in x86 mode: T7-T3 from ICW2, the level below.
    fn vector(&self, ir: u8) -> u8 {
        (self.icw2 & 0xf8) | ir
    }
}

impl Default for Pic {
    fn default() -> Self {
        Self::new()
    }
}

impl Pic {
    /// Both chips at power-on: every line masked, all edge-triggered,
    /// waiting for the guest's ICW1.
    pub const fn new() -> Self {
        Pic { state: PicState { chips: [ChipState::new(), ChipState::new()] } }
    }

    /// The master's IRs wired to a slave it will let answer the
    /// acknowledge: none in single mode.
    fn slaves(&self) -> u8 {
        let m = &self.state.chips[0];
        if m.single() { 0 } else { m.icw3 }
    }

    /// Feed the slave's INT into the master's IR2. The master sees it as a
    /// level: a request the slave still has after one acknowledge must
    /// reach the master again, which an edge would lose.
    fn cascade(&mut self) {
        let int = self.state.chips[1].pending(0).is_some();
        let bit = 1 << CASCADE_IR;
        let m = &mut self.state.chips[0];
        if int {
            m.lines |= bit;
            m.irr |= bit;
        } else {
            m.lines &= !bit;
            m.irr &= !bit;
        }
    }

    /// A guest read of `port`.
    pub fn read(&mut self, port: u16) -> u8 {
        let (c, command) = match port {
            MASTER_CMD => (0, true),
            MASTER_DATA => (0, false),
            SLAVE_CMD => (1, true),
            SLAVE_DATA => (1, false),
            ELCR_MASTER => return self.state.chips[0].elcr,
            ELCR_SLAVE => return self.state.chips[1].elcr,
            _ => return 0xff,
        };
        let slaves = if c == 0 { self.slaves() } else { 0 };
        let chip = &mut self.state.chips[c];
        // A poll takes the next read of either port (A0 does not matter).
        if chip.poll {
            let v = chip.poll_read(slaves);
            self.cascade();
            return v;
        }
        match (command, chip.read_isr) {
            (true, true) => chip.isr,
            (true, false) => chip.irr,
            (false, _) => chip.imr,
        }
    }

    /// A guest write of `value` to `port`.
    pub fn write(&mut self, port: u16, value: u8) {
        match port {
            MASTER_CMD => self.state.chips[0].write_command(value),
            MASTER_DATA => self.state.chips[0].write_data(value),
            SLAVE_CMD => self.state.chips[1].write_command(value),
            SLAVE_DATA => self.state.chips[1].write_data(value),
            ELCR_MASTER | ELCR_SLAVE => {
                let c = usize::from(port == ELCR_SLAVE);
                let chip = &mut self.state.chips[c];
                chip.elcr = value & ELCR_MASK[c];
                // Lines now level-triggered request as long as they are
                // high; lines now edge-triggered keep what they latched.
                let level = chip.level_mask();
                chip.irr = (chip.irr & !level) | (chip.lines & level);
            }
            _ => return,
        }
        self.cascade();
    }

    /// Drive ISA line `line` (0-15; 0-7 on the master, 8-15 on the slave)
    /// to `high`. Line 2 is the cascade, driven by the slave only (an ISA
    /// card's IRQ 2 reaches IRQ 9 on an AT), so it is ignored here, as are
    /// lines past 15.
    pub fn set_irq(&mut self, line: u8, high: bool) {
        if line >= 16 || line == CASCADE_IR {
            return;
        }
        self.state.chips[usize::from(line >> 3)].drive(line & 7, high);
        self.cascade();
    }

    /// The vector the master gives for its input `ir` (0-7).
    pub fn master_vector(&self, ir: u8) -> u8 {
        self.state.chips[0].vector(ir & 7)
    }

    /// Whether the master has a request latched on `ir` (0-7).
    pub fn master_requested(&self, ir: u8) -> bool {
        self.state.chips[0].irr & (1 << (ir & 7)) != 0
    }

    /// Whether INTR to the CPU is asserted.
    pub fn output(&self) -> bool {
        self.state.chips[0].pending(self.slaves()).is_some()
    }

    /// The CPU's interrupt acknowledge cycle: the highest-priority request
    /// goes in service and its vector is returned, from the slave when the
    /// master's request is a cascaded IR ("Cascade Mode": the master names
    /// the slave, the slave whose ICW3 ID matches supplies the vector).
    /// A request that is gone by the acknowledge (a level-triggered line
    /// dropped, or the line was masked) makes the chip answer with IR7 and
    /// set no ISR bit ("Interrupt Sequence": the default IR7): the guest
    /// sees a spurious IRQ 7, which Linux recognises by reading the ISR.
    /// The slave would answer IRQ 15 the same way, but here it is never
    /// asked without a request: the master follows its INT as a level, so a
    /// slave request that vanishes withdraws the master's IR2 with it.
    pub fn acknowledge(&mut self) -> u8 {
        let slaves = self.slaves();
        let master = &mut self.state.chips[0];
        let Some(ir) = master.pending(slaves) else {
            return master.vector(7);
        };
        master.ack(ir);
        let vector = if slaves & (1 << ir) != 0 {
            let slave = &mut self.state.chips[1];
            if slave.single() || slave.icw3 & 7 != ir {
                // No slave answers to that ID: the data bus floats high.
                0xff
            } else {
                match slave.pending(0) {
                    Some(s) => {
                        slave.ack(s);
                        slave.vector(s)
                    }
                    None => slave.vector(7),
                }
            }
        } else {
            self.state.chips[0].vector(ir)
        };
        self.cascade();
        vector
    }
}

impl Persist for Pic {
    type State = PicState;
    const STATE_VERSION: u16 = 1;

    fn save(&self) -> PicState {
        self.state
    }

    fn validate(s: &PicState) -> Result<(), Invalid> {
        for (c, chip) in s.chips.iter().enumerate() {
            match chip.init_step {
                0 | 2 => {}
                3 if !chip.single() => {}
                4 if chip.icw1 & ICW1_IC4 != 0 => {}
                _ => return Err(Invalid("an initialisation step the ICW1 written does not lead to")),
            }
            if chip.lowest > 7 {
                return Err(Invalid("the lowest priority is not an IR number"));
            }
            if chip.icw4 & !ICW4_BITS != 0 {
                return Err(Invalid("ICW4 has bits an 8259A does not keep"));
            }
            if chip.elcr & !ELCR_MASK[c] != 0 {
                return Err(Invalid("the ELCR marks a line that is always edge-triggered"));
            }
            let level = chip.level_mask();
            if chip.irr & level != chip.lines & level {
                return Err(Invalid("a level-triggered request disagrees with its line"));
            }
        }
        let int = s.chips[1].pending(0).is_some();
        let bit = 1 << CASCADE_IR;
        let m = &s.chips[0];
        if (m.lines & bit != 0) != int || (m.irr & bit != 0) != int {
            return Err(Invalid("the master's cascade input disagrees with the slave's output"));
        }
        Ok(())
    }

    fn restore(&mut self, state: PicState) {
        self.state = state;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::persist::{RestoreError, decode, save};

    /// ISA_IRQ_VECTOR(0) and (8) in current Linux.
    const BASE: u8 = 0x30;

    /// `init_8259A(auto_eoi)` as Linux issues it, then the masks it caches.
    fn linux_init(p: &mut Pic, auto_eoi: bool, master_mask: u8, slave_mask: u8) {
        p.write(MASTER_DATA, 0xff);
        p.write(MASTER_CMD, 0x11); // ICW1: edge, cascade, ICW4 follows
        p.write(MASTER_DATA, BASE); // ICW2
        p.write(MASTER_DATA, 1 << CASCADE_IR); // ICW3: slave on IR2
        p.write(MASTER_DATA, if auto_eoi { 0x03 } else { 0x01 }); // ICW4: x86 mode
        p.write(SLAVE_CMD, 0x11);
        p.write(SLAVE_DATA, BASE + 8);
        p.write(SLAVE_DATA, CASCADE_IR); // slave ID 2
        p.write(SLAVE_DATA, 0x01);
        p.write(MASTER_DATA, master_mask);
        p.write(SLAVE_DATA, slave_mask);
    }

    fn linux_pic(master_mask: u8, slave_mask: u8) -> Pic {
        let mut p = Pic::new();
        linux_init(&mut p, false, master_mask, slave_mask);
        p
    }

    /// Linux's `i8259A_irq_real`: whether `irq` is in service, read
    /// through OCW3, then back to reading the IRR.
    fn in_service(p: &mut Pic, irq: u8) -> bool {
        let (cmd, bit) = if irq < 8 { (MASTER_CMD, 1 << irq) } else { (SLAVE_CMD, 1 << (irq - 8)) };
        p.write(cmd, 0x0b);
        let v = p.read(cmd) & bit != 0;
        p.write(cmd, 0x0a);
        v
    }

    /// Linux's `mask_and_ack_8259A` EOI part: specific EOIs, slave first.
    fn linux_eoi(p: &mut Pic, irq: u8) {
        if irq >= 8 {
            p.write(SLAVE_CMD, 0x60 + (irq & 7));
            p.write(MASTER_CMD, 0x60 + CASCADE_IR);
        } else {
            p.write(MASTER_CMD, 0x60 + irq);
        }
    }

    #[test]
    fn linux_probe_and_init_work() {
        let mut p = Pic::new();
        assert!(!p.output(), "power-on: everything masked");
        // probe_8259A: mask the slave, all but the cascade on the master,
        // read the master's IMR back.
        p.write(SLAVE_DATA, 0xff);
        p.write(MASTER_DATA, 0xfb);
        assert_eq!(p.read(MASTER_DATA), 0xfb);
        // mask_8259A / i8259A_shutdown.
        p.write(MASTER_DATA, 0xff);
        assert_eq!(p.read(MASTER_DATA), 0xff);
        assert_eq!(p.read(SLAVE_DATA), 0xff);
        linux_init(&mut p, false, 0xfb, 0xff);
        let [m, s] = p.save().chips;
        assert_eq!((m.icw2, m.icw3, m.icw4, m.init_step), (0x30, 0x04, 0x01, 0));
        assert_eq!((s.icw2, s.icw3, s.icw4, s.init_step), (0x38, 0x02, 0x01, 0));
        assert_eq!((p.read(MASTER_DATA), p.read(SLAVE_DATA)), (0xfb, 0xff), "the cached masks");
        // i8259A_irq_pending reads the IRR from the command port.
        assert_eq!(p.read(MASTER_CMD), 0);
        assert!(!p.output());
    }

    #[test]
    fn an_interrupt_is_delivered_acknowledged_and_ended() {
        let mut p = linux_pic(0xfa, 0xff); // IRQ 0 and the cascade unmasked
        p.set_irq(0, true);
        p.set_irq(0, false);
        assert!(p.output(), "the edge latched");
        assert_eq!(p.read(MASTER_CMD), 0x01, "IRR");
        assert_eq!(p.acknowledge(), BASE);
        assert!(!p.output());
        assert!(in_service(&mut p, 0));
        // mask_and_ack: dummy IMR read, mask rewrite, specific EOI.
        p.read(MASTER_DATA);
        p.write(MASTER_DATA, 0xfa);
        linux_eoi(&mut p, 0);
        assert!(!in_service(&mut p, 0));
        assert!(!p.output(), "one edge, one interrupt");
        assert_eq!(p.acknowledge(), BASE + 7, "nothing pending: spurious IRQ 7");
        assert!(!in_service(&mut p, 7), "a spurious IRQ sets no ISR bit");
    }

    #[test]
    fn slave_interrupts_cascade_through_ir2() {
        let mut p = linux_pic(0xfb, 0xef); // IRQ 12 unmasked
        p.set_irq(12, true);
        assert!(p.output());
        assert_eq!(p.read(MASTER_CMD), 0x04, "the slave's INT is the master's IR2");
        assert_eq!(p.acknowledge(), BASE + 8 + 4);
        assert!(in_service(&mut p, 12) && in_service(&mut p, 2));
        linux_eoi(&mut p, 12);
        assert!(!in_service(&mut p, 12) && !in_service(&mut p, 2));
        assert!(!p.output());
        // A slave request masked at the master's IR2 does not get through.
        p.write(MASTER_DATA, 0xff);
        p.set_irq(12, false);
        p.set_irq(12, true);
        assert!(!p.output());
        p.write(MASTER_DATA, 0xfb);
        assert_eq!(p.acknowledge(), BASE + 12);
    }

    #[test]
    fn priorities_nest() {
        let mut p = linux_pic(0x00, 0x00);
        p.set_irq(3, true);
        p.set_irq(1, true);
        assert_eq!(p.acknowledge(), BASE + 1, "IR1 beats IR3");
        assert!(!p.output(), "IR3 waits while IR1 is in service");
        p.set_irq(0, true);
        assert!(p.output(), "IR0 preempts IR1");
        assert_eq!(p.acknowledge(), BASE);
        p.write(MASTER_CMD, 0x20); // non-specific EOI ends IR0, the highest
        assert_eq!(p.save().chips[0].isr, 0x02);
        assert!(!p.output());
        p.write(MASTER_CMD, 0x20);
        assert_eq!(p.acknowledge(), BASE + 3);
        // Slave lines rank at the master's IR2: IRQ 8 is below IRQ 1 and
        // above IRQ 3.
        p.write(MASTER_CMD, 0x20);
        p.set_irq(8, true);
        p.set_irq(3, false);
        p.set_irq(3, true);
        assert_eq!(p.acknowledge(), BASE + 8);
    }

    #[test]
    fn vanished_requests_are_spurious() {
        let mut p = linux_pic(0x00, 0x00);
        // A level-triggered line that drops before the acknowledge.
        p.write(ELCR_MASTER, 0x20);
        p.set_irq(5, true);
        assert!(p.output());
        p.set_irq(5, false);
        assert!(!p.output());
        assert_eq!(p.acknowledge(), BASE + 7);
        // Linux (mask_and_ack_8259A) then asks the ISR and finds IR7 idle.
        assert!(!in_service(&mut p, 7));
        // An edge request masked between INTR and INTA.
        p.set_irq(6, true);
        p.write(MASTER_DATA, 0x40);
        assert_eq!(p.acknowledge(), BASE + 7);
        p.write(MASTER_DATA, 0x00);
        assert_eq!(p.acknowledge(), BASE + 6, "the request was kept");
        p.write(MASTER_CMD, 0x20);
        // IRQ 15 never comes up spurious here: the master sees the
        // slave's INT as a level, so it asks the slave only while the
        // slave has a request to give.
        p.write(ELCR_SLAVE, 0x08);
        p.set_irq(11, true);
        p.set_irq(11, false);
        assert!(!p.output());
        assert_eq!(p.acknowledge(), BASE + 7);
    }

    #[test]
    fn edge_and_level_triggering() {
        let mut p = linux_pic(0x00, 0x00);
        // Edge: a line held high requests once.
        p.set_irq(4, true);
        assert_eq!(p.acknowledge(), BASE + 4);
        p.write(MASTER_CMD, 0x64);
        p.set_irq(4, true);
        assert!(!p.output(), "no new edge");
        p.set_irq(4, false);
        p.set_irq(4, true);
        assert!(p.output());
        assert_eq!(p.acknowledge(), BASE + 4);
        p.write(MASTER_CMD, 0x64);
        // Level (ELCR): the request follows the line and comes back after
        // the EOI while the line stays high.
        p.write(ELCR_SLAVE, 0x02); // IRQ 9
        p.set_irq(9, true);
        assert_eq!(p.acknowledge(), BASE + 9);
        linux_eoi(&mut p, 9);
        assert!(p.output(), "still high: requested again");
        p.set_irq(9, false);
        assert!(!p.output());
        // Switching a high line to level mode requests it at once.
        p.set_irq(10, true);
        assert_eq!(p.acknowledge(), BASE + 10);
        linux_eoi(&mut p, 10);
        assert!(!p.output());
        p.write(ELCR_SLAVE, 0x06);
        assert!(p.output());
        // ICW1's LTIM makes the whole chip level-triggered.
        let mut q = Pic::new();
        q.write(MASTER_CMD, 0x1b); // LTIM, single, ICW4
        q.write(MASTER_DATA, 0x40);
        q.write(MASTER_DATA, 0x01);
        q.set_irq(1, true);
        assert_eq!(q.acknowledge(), 0x41);
        q.write(MASTER_CMD, 0x20);
        assert!(q.output());
    }

    #[test]
    fn elcr_keeps_only_its_bits() {
        let mut p = Pic::new();
        p.write(ELCR_MASTER, 0xff);
        p.write(ELCR_SLAVE, 0xff);
        assert_eq!((p.read(ELCR_MASTER), p.read(ELCR_SLAVE)), (0xf8, 0xde));
        let before = p.save();
        assert_eq!(p.read(0x4d2), 0xff, "not ours");
        p.write(0x22, 0x12);
        assert_eq!(p.save(), before);
    }

    #[test]
    fn automatic_eoi_and_rotation() {
        let mut p = Pic::new();
        linux_init(&mut p, true, 0x00, 0xff);
        p.set_irq(1, true);
        assert_eq!(p.acknowledge(), BASE + 1);
        assert!(!in_service(&mut p, 1), "AEOI ends the interrupt at INTA");
        // Rotate in AEOI mode: the acknowledged level becomes the lowest.
        p.write(MASTER_CMD, 0x80);
        p.set_irq(0, true);
        p.set_irq(1, false);
        p.set_irq(1, true);
        assert_eq!(p.acknowledge(), BASE);
        assert_eq!(p.save().chips[0].lowest, 0);
        p.set_irq(0, false);
        p.set_irq(0, true);
        assert_eq!(p.acknowledge(), BASE + 1, "IR1 now outranks IR0");
        p.write(MASTER_CMD, 0x00); // rotate in AEOI off
        assert!(!p.save().chips[0].rotate_aeoi);
    }

    #[test]
    fn rotation_and_set_priority() {
        let mut p = linux_pic(0x00, 0x00);
        // Set priority: IR4 lowest, so IR5 highest.
        p.write(MASTER_CMD, 0xc4);
        p.set_irq(3, true);
        p.set_irq(6, true);
        assert_eq!(p.acknowledge(), BASE + 6);
        // Rotate on non-specific EOI: IR6 becomes the lowest, IR7 highest.
        p.write(MASTER_CMD, 0xa0);
        assert_eq!(p.save().chips[0].lowest, 6);
        p.set_irq(6, false);
        p.set_irq(6, true);
        assert_eq!(p.acknowledge(), BASE + 3, "IR3 now above IR6");
        // Rotate on specific EOI.
        p.write(MASTER_CMD, 0xe3);
        assert_eq!(p.save().chips[0].lowest, 3);
        assert_eq!(p.save().chips[0].isr, 0);
        p.write(MASTER_CMD, 0x40); // no operation
        assert_eq!(p.acknowledge(), BASE + 6);
        // A non-specific rotate with nothing in service changes nothing.
        p.write(MASTER_CMD, 0x66);
        p.write(MASTER_CMD, 0xa0);
        assert_eq!(p.save().chips[0].lowest, 3);
    }

    #[test]
    fn poll_mode() {
        let mut p = linux_pic(0xff, 0xff);
        p.write(MASTER_CMD, 0x0c);
        assert_eq!(p.read(MASTER_DATA), 0, "nothing requesting");
        p.set_irq(5, true);
        p.write(MASTER_CMD, 0x0c);
        assert_eq!(p.read(MASTER_CMD), 0, "a masked request is not polled");
        p.write(MASTER_DATA, 0xdf);
        p.write(MASTER_CMD, 0x0c);
        assert_eq!(p.read(MASTER_CMD), 0x85);
        assert!(in_service(&mut p, 5), "a poll is an acknowledge");
        assert_eq!(p.read(MASTER_CMD), 0, "one read only: back to the IRR");
    }

    #[test]
    fn special_mask_mode() {
        let mut p = linux_pic(0x00, 0x00);
        p.set_irq(3, true);
        assert_eq!(p.acknowledge(), BASE + 3);
        p.set_irq(5, true);
        assert!(!p.output(), "IR5 is below IR3 in service");
        // The handler masks its own level and enters special mask mode.
        p.write(MASTER_DATA, 0x08);
        p.write(MASTER_CMD, 0x68);
        assert!(p.output(), "lower levels get through");
        assert_eq!(p.acknowledge(), BASE + 5);
        // A non-specific EOI skips the masked level in service.
        p.write(MASTER_CMD, 0x20);
        assert_eq!(p.save().chips[0].isr, 0x08);
        p.write(MASTER_CMD, 0x48); // leave special mask mode
        p.write(MASTER_CMD, 0x20);
        assert_eq!(p.save().chips[0].isr, 0);
    }

    #[test]
    fn special_fully_nested_mode_lets_the_slave_nest() {
        let mut p = Pic::new();
        p.write(MASTER_CMD, 0x11);
        p.write(MASTER_DATA, BASE);
        p.write(MASTER_DATA, 0x04);
        p.write(MASTER_DATA, 0x11); // SFNM
        p.write(SLAVE_CMD, 0x11);
        p.write(SLAVE_DATA, BASE + 8);
        p.write(SLAVE_DATA, 0x02);
        p.write(SLAVE_DATA, 0x01);
        p.set_irq(13, true);
        assert_eq!(p.acknowledge(), BASE + 13);
        p.set_irq(9, true);
        assert!(p.output(), "a higher slave request passes the master's IR2 in service");
        assert_eq!(p.acknowledge(), BASE + 9);
        // Without SFNM it waits.
        let mut q = linux_pic(0x00, 0x00);
        q.set_irq(13, true);
        assert_eq!(q.acknowledge(), BASE + 13);
        q.set_irq(9, true);
        assert!(!q.output());
    }

    #[test]
    fn icw1_resets_and_icw_sequences_follow_it() {
        let mut p = linux_pic(0x00, 0x00);
        p.set_irq(1, true);
        assert_eq!(p.acknowledge(), BASE + 1);
        p.write(MASTER_CMD, 0x0b); // read ISR
        p.write(MASTER_CMD, 0x68); // special mask mode
        // Single mode without ICW4: ICW1, ICW2 and done.
        p.write(MASTER_CMD, 0x12);
        let m = p.save().chips[0];
        assert_eq!((m.imr, m.isr, m.init_step, m.icw4, m.special_mask, m.read_isr), (0, 0, 2, 0, false, false));
        p.write(MASTER_DATA, 0x50);
        assert_eq!(p.save().chips[0].init_step, 0);
        p.write(MASTER_DATA, 0xaa);
        assert_eq!(p.read(MASTER_DATA), 0xaa, "OCW1 after the sequence");
        p.write(MASTER_DATA, 0x00);
        assert!(!p.output(), "IRQ 1 is still high but must rise again");
        p.set_irq(1, false);
        p.set_irq(1, true);
        assert_eq!(p.acknowledge(), 0x51);
        // Single mode: IR2 is an ordinary input, answered by the master.
        p.write(SLAVE_CMD, 0x13);
        p.write(SLAVE_DATA, 0x70);
        p.write(SLAVE_DATA, 0x01);
        p.write(MASTER_CMD, 0x20);
        p.set_irq(8, true);
        assert_eq!(p.acknowledge(), 0x52);
    }

    #[test]
    fn a_cascade_to_a_missing_slave_floats() {
        let mut p = linux_pic(0x00, 0x00);
        p.write(SLAVE_CMD, 0x11);
        p.write(SLAVE_DATA, 0x38);
        p.write(SLAVE_DATA, 0x05); // the slave thinks it is on IR5
        p.write(SLAVE_DATA, 0x01);
        p.set_irq(8, true);
        assert_eq!(p.acknowledge(), 0xff);
    }

    /// xorshift64: deterministic noise for the fuzz tests.
    fn noise(seed: &mut u64) -> u64 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    }

    #[test]
    fn any_guest_sequence_keeps_a_valid_state() {
        const PORTS: [u16; 8] = [MASTER_CMD, MASTER_DATA, SLAVE_CMD, SLAVE_DATA, ELCR_MASTER, ELCR_SLAVE, 0x22, 0xffff];
        let mut seed = 0x9e37_79b9_7f4a_7c15;
        for round in 0..200 {
            let mut p = if round % 2 == 0 { Pic::new() } else { linux_pic(0, 0) };
            for _ in 0..500 {
                let r = noise(&mut seed);
                let port = PORTS[(r >> 8) as usize % PORTS.len()];
                match r % 5 {
                    0 => p.write(port, (r >> 16) as u8),
                    1 => {
                        p.read(port);
                    }
                    2 => p.set_irq((r >> 16) as u8 % 20, r & 0x100 != 0),
                    3 => {
                        if p.output() {
                            p.acknowledge();
                        }
                    }
                    _ => {
                        p.acknowledge();
                    }
                }
                assert_eq!(Pic::validate(&p.save()), Ok(()), "state after {r:#x}");
            }
        }
    }

    #[test]
    fn state_round_trips() {
        let mut p = linux_pic(0x00, 0x00);
        p.write(ELCR_SLAVE, 0x08);
        p.set_irq(4, true);
        p.set_irq(3, true);
        p.set_irq(11, true);
        assert_eq!(p.acknowledge(), BASE + 11, "the cascade (IR2) comes before IR3");
        p.write(MASTER_CMD, 0x0b);
        let saved = save("pic", &p);
        let mut back = Pic::new();
        back.restore(decode::<Pic>("pic", &saved).unwrap());
        assert_eq!(back, p);
        // Both carry on identically.
        for q in [&mut p, &mut back] {
            assert_eq!(q.read(MASTER_CMD), 0x04, "ISR selected");
            q.set_irq(11, false);
            linux_eoi(q, 11);
            assert_eq!(q.acknowledge(), BASE + 3);
            assert_eq!(q.acknowledge(), BASE + 7, "IR4 waits behind IR3 in service");
        }
        assert_eq!(back, p);
    }

    #[test]
    fn hostile_state_is_refused() {
        let good = linux_pic(0xfb, 0xff).save();
        let refuse = |f: &dyn Fn(&mut PicState), why: &'static str| {
            let mut s = good;
            f(&mut s);
            let mut p = Pic::new();
            p.state = s;
            assert_eq!(
                decode::<Pic>("pic", &save("pic", &p)),
                Err(RestoreError::Invalid { device: "pic", why }),
                "{why}"
            );
        };
        let step = "an initialisation step the ICW1 written does not lead to";
        refuse(&|s| s.chips[0].init_step = 1, step);
        refuse(&|s| s.chips[1].init_step = 5, step);
        refuse(
            &|s| {
                s.chips[0].icw1 = 0x13;
                s.chips[0].init_step = 3;
            },
            step,
        );
        refuse(
            &|s| {
                s.chips[0].icw1 = 0x10;
                s.chips[0].init_step = 4;
            },
            step,
        );
        refuse(&|s| s.chips[1].lowest = 8, "the lowest priority is not an IR number");
        refuse(&|s| s.chips[0].icw4 = 0x21, "ICW4 has bits an 8259A does not keep");
        refuse(&|s| s.chips[0].elcr = 0x04, "the ELCR marks a line that is always edge-triggered");
        refuse(&|s| s.chips[1].elcr = 0x01, "the ELCR marks a line that is always edge-triggered");
        refuse(
            &|s| {
                s.chips[0].elcr = 0x08;
                s.chips[0].lines = 0x08;
            },
            "a level-triggered request disagrees with its line",
        );
        refuse(
            &|s| {
                s.chips[1].imr = 0;
                s.chips[1].irr = 1;
            },
            "the master's cascade input disagrees with the slave's output",
        );
        refuse(&|s| s.chips[0].irr = 0x04, "the master's cascade input disagrees with the slave's output");
        let mut saved = save("pic", &linux_pic(0, 0));
        saved.bytes.pop();
        assert_eq!(decode::<Pic>("pic", &saved), Err(RestoreError::Corrupt { device: "pic" }));
        saved.version = 9;
        assert!(matches!(decode::<Pic>("pic", &saved), Err(RestoreError::Version { found: 9, expected: 1, .. })));
    }
}
