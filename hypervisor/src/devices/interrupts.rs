//! How a PC's interrupt lines reach the vCPU (MultiProcessor Specification
//! 1.4, chapter 3 and 5.1; ACPI 6.5 5.2.12): every ISA line goes to the
//! 8259 pair and to the I/O APIC, IRQ 0 on pin 2 and the others on their
//! own pin (the MADT's interrupt source override says so); the I/O APIC's
//! messages and the guest's own IPIs go to the local APIC; the PIC's INTR
//! reaches the CPU through the local APIC's LINT0 when that is programmed
//! ExtINT (virtual wire mode, as firmware leaves it) or the APIC is
//! globally disabled. An ExtINT interrupt bypasses the local APIC's
//! priorities, as on hardware, so it is offered first.
//!
//! With several vCPUs, each has a local APIC (APIC ID = vCPU index); the
//! PIC's INTR goes to vCPU 0's LINT0 only, as a PC wires it to the BSP.
//! IPIs reach every APIC the shorthand or destination selects (SDM Vol. 3A
//! 11.6.1-11.6.2): fixed ones into IRR; NMI, INIT and SIPI are left as
//! [`Signals`] for the VM to carry out on the target vCPU.
//!
//! Left out for now: an I/O APIC entry in ExtINT mode (Linux falls back to
//! it only when IRQ 0 through pin 2 fails its check), SMI (nothing raises
//! it), and lowest-priority arbitration (the first APIC selected takes the
//! interrupt, which the SDM allows, 11.6.2.4, as "model specific").

use super::ioapic::{IOAPIC_BASE, Message};
use super::lapic::{self, DeliveryMode, Effect, Gp, Lint, LintRoute, Shorthand};
use super::pci::{ECAM_BASE, ECAM_SIZE};
use super::{DeviceSet, Signals};

/// The I/O APIC's pin for ISA line `irq`: the MADT overrides IRQ 0 to GSI 2
/// (where the 8254 sits on a PC's I/O APIC); the others are identity.
pub const fn ioapic_pin(irq: u8) -> usize {
    if irq == 0 { 2 } else { irq as usize }
}

/// The I/O APIC's register page.
const IOAPIC_PAGE: core::ops::Range<u64> = IOAPIC_BASE..IOAPIC_BASE + 0x1000;

/// The vCPUs (bit i: vCPU i, `routes` in vCPU order) a message in
/// `logical` or physical mode to `destination` selects (SDM Vol. 3A 11.6.2).
pub fn destinations(routes: impl Iterator<Item = lapic::Route>, logical: bool, destination: u32, wide: bool) -> u32 {
    routes
        .enumerate()
        .filter(|(_, r)| r.is_destination(logical, destination, wide))
        .fold(0, |m, (i, _)| m | super::bit(i))
}

/// Which of the selected vCPUs `targets` a `mode` message goes to: all of
/// them, but a lowest-priority one goes to the first selected, which the
/// SDM allows as "model specific" arbitration (Vol. 3A 11.6.2.4). The one
/// rule for the boot CPU's delivery and a sibling's.
pub fn delivered_to(targets: u32, mode: DeliveryMode) -> u32 {
    match mode {
        DeliveryMode::LowestPriority => targets.isolate_lowest_one(),
        _ => targets,
    }
}

/// The vCPUs an IPI from vCPU `me` reaches (SDM Vol. 3A 11.6.1,
/// destination shorthand), `routes` in vCPU order.
pub fn ipi_targets(routes: impl ExactSizeIterator<Item = lapic::Route>, me: usize, ipi: &lapic::Ipi) -> u32 {
    let all = super::bit(routes.len()).wrapping_sub(1);
    let me = super::bit(me);
    match ipi.shorthand {
        Shorthand::SelfOnly => me,
        Shorthand::AllIncludingSelf => all,
        Shorthand::AllExcludingSelf => all & !me,
        Shorthand::None => destinations(routes, ipi.logical, ipi.destination, ipi.x2apic),
    }
}

impl DeviceSet {
    /// Drive ISA line `irq` to `high` on both controllers.
    pub(super) fn set_isa_irq(&mut self, irq: u8, high: bool) {
        self.pic().set_irq(irq, high);
        if let Some(m) = self.ioapic.set_irq(ioapic_pin(irq), high) {
            self.deliver(m);
        }
    }

    /// One edge on ISA line `irq` (the PIT's output as the PC wires it).
    pub(super) fn pulse_isa_irq(&mut self, irq: u8) {
        self.set_isa_irq(irq, true);
        self.set_isa_irq(irq, false);
    }

    /// COM1's line as a vCPU running beside its siblings moved it
    /// ([`DeviceSet::pio_alone`]), carried to both controllers where that
    /// vCPU runs, when all that follows is fixed (or lowest-priority)
    /// edge-triggered interrupts for local APICs: `post` hands each to
    /// its vCPU (`routes`: every vCPU's route as the round began). Not if
    /// the PIC's INTR would change (vCPU 0's ExtINT, the boot CPU's to
    /// deliver), nor if the I/O APIC would send a level-triggered message
    /// (its remote IRR waits for an EOI) or one of another mode: then it
    /// returns false having touched nothing, and [`Self::update_lines`]
    /// does it later with the whole VM. Touches the controllers, never
    /// `lapics` (the siblings hold them).
    pub fn com1_line_alone(&mut self, routes: &[lapic::Route], mut post: impl FnMut(usize, u8)) -> bool {
        let level = self.com1().irq();
        if level == self.com1_level {
            return true;
        }
        // Tried on copies first (both are a few words): a refusal leaves
        // the controllers as they were.
        let mut pic = self.pic().clone();
        pic.set_irq(4, level);
        if pic.output() != self.pic().output() {
            return false;
        }
        let mut ioapic = self.ioapic.clone();
        let message = ioapic.set_irq(ioapic_pin(4), level);
        if message
            .is_some_and(|m| m.level_triggered || !matches!(m.mode, DeliveryMode::Fixed | DeliveryMode::LowestPriority))
        {
            return false;
        }
        *self.pic() = pic;
        self.ioapic = ioapic;
        self.com1_level = level;
        if let Some(m) = message {
            let selected = destinations(routes.iter().copied(), m.logical, m.destination.into(), false);
            let mut targets = delivered_to(selected, m.mode);
            while targets != 0 {
                post(targets.trailing_zeros() as usize, m.vector);
                targets &= targets - 1;
            }
        }
        true
    }

    /// An I/O APIC message to the local APICs it names.
    pub(super) fn deliver(&mut self, m: Message) {
        let targets = self.destinations(m.logical, m.destination.into(), false);
        self.send(targets, m.mode, m.vector, m.level_triggered, false);
    }

    /// The vCPUs (bit i: vCPU i) whose APIC a message in `logical` or
    /// physical mode to `destination` selects; IDs that no vCPU has select
    /// no one (SDM Vol. 3A 11.6.2).
    pub fn destinations(&self, logical: bool, destination: u32, wide: bool) -> u32 {
        destinations(self.lapics.iter().map(lapic::Lapic::route), logical, destination, wide)
    }

    /// The vCPUs an IPI from the current vCPU reaches.
    pub fn ipi_targets(&self, ipi: &lapic::Ipi) -> u32 {
        ipi_targets(self.lapics.iter().map(lapic::Lapic::route), self.cur, ipi)
    }

    /// Each vCPU's [`lapic::Route`], by vCPU index: what routing its
    /// siblings' IPIs needs while they run on other host CPUs.
    pub fn routes(&self) -> impl Iterator<Item = lapic::Route> + '_ {
        self.lapics.iter().map(lapic::Lapic::route)
    }

    /// Delivers a `mode` message to the vCPUs in `targets`: fixed ones
    /// into IRR, lowest-priority ones to the first target, NMI, INIT and
    /// SIPI as signals for the VM. SMI and ExtINT messages are dropped
    /// (nothing here handles SMM; ExtINT through the I/O APIC is left out).
    fn send(&mut self, targets: u32, mode: DeliveryMode, vector: u8, level: bool, init_deassert: bool) {
        let targets = delivered_to(targets, mode);
        for i in 0..self.lapics.len() {
            if targets & super::bit(i) == 0 {
                continue;
            }
            let mut signal = |f: &mut dyn FnMut(&mut Signals)| {
                f(&mut self.signals[i]);
                self.signalled |= super::bit(i);
            };
            match mode {
                DeliveryMode::Fixed | DeliveryMode::LowestPriority => {
                    self.lapics[i].accept(vector, level);
                }
                DeliveryMode::Nmi => signal(&mut |s| s.nmi = true),
                // The de-assert Linux sends after an INIT does nothing on
                // an integrated APIC (SDM 11.6.1).
                DeliveryMode::Init if init_deassert => {}
                DeliveryMode::Init => {
                    // INIT resets the target's APIC but for its ID (SDM
                    // 11.4.7.3); a SIPI before this INIT is void.
                    self.lapics[i].init();
                    signal(&mut |s| {
                        s.init = true;
                        s.sipi = None;
                    });
                }
                DeliveryMode::StartUp => signal(&mut |s| s.sipi = Some(vector)),
                DeliveryMode::Smi | DeliveryMode::ExtInt => {}
            }
        }
    }

    /// What a local APIC register write asks for: an IPI or an EOI
    /// broadcast to the I/O APIC.
    fn apply(&mut self, effect: Effect) {
        match effect {
            Effect::None => {}
            Effect::Ipi(ipi) => {
                let targets = self.ipi_targets(&ipi);
                let me = self.cur_bit;
                let init_me = if ipi.mode == DeliveryMode::Init { me } else { 0 };
                self.kicked |= targets & (!me | init_me);
                // IPIs are edge-triggered whatever the trigger bit says on
                // an xAPIC (11.6.1, Table 11-3 note 2).
                self.send(targets, ipi.mode, ipi.vector, false, ipi.is_init_deassert());
            }
            Effect::EoiBroadcast(vector) => {
                for m in self.ioapic.eoi(vector) {
                    self.deliver(m);
                }
            }
        }
    }

    /// A local APIC that ended a level-triggered `vector` where its vCPU
    /// ran beside its siblings: the EOI reaches the I/O APIC now.
    pub fn eoi_broadcast(&mut self, vector: u8) {
        self.apply(Effect::EoiBroadcast(vector));
        self.refresh_intr();
    }

    /// Whether the PIC asserts INTR at vCPU 0 now.
    pub fn pic_intr(&mut self) -> bool {
        self.pic_connected() && self.pic().output()
    }

    /// Whether the PIC's INTR reaches vCPU 0 (the BSP: only it has the
    /// PIC wired to LINT0).
    fn pic_connected(&self) -> bool {
        self.lapics.first().is_some_and(|l| l.lint(Lint::Lint0) == LintRoute::ExtInt)
    }

    /// Recompute the cached "an interrupt waits" flags.
    pub(super) fn refresh_intr(&mut self) {
        let pic = self.pic_connected() && self.pic().output();
        let mut intr = u32::from(pic);
        if let [bsp, aps @ ..] = self.lapics.as_slice() {
            intr |= u32::from(bsp.pending_vector().is_some());
            for (i, l) in aps.iter().enumerate() {
                if l.pending_vector().is_some() {
                    intr |= super::bit(i + 1);
                }
            }
        }
        self.intr = intr;
    }

    /// The interrupt acknowledge cycle: the vector to inject, the PIC's
    /// (ExtINT) first, else the local APIC's highest deliverable one (into
    /// ISR). With neither (nothing was pending), the local APIC's spurious
    /// vector, as hardware gives when a request vanishes.
    pub fn acknowledge_interrupt(&mut self) -> u8 {
        let vector = if self.cur == 0 && self.pic_connected() && self.pic().output() {
            self.acknowledge_pic()
        } else if let Some(v) = self.cur_lapic().pending_vector() {
            self.cur_lapic().acknowledge(v);
            v
        } else {
            self.cur_lapic().spurious_vector()
        };
        self.refresh_intr();
        vector
    }

    /// A guest read of `size` bytes (1, 2, 4 or 8) at `gpa`, if a device's
    /// registers are there: the local APIC's page (where IA32_APIC_BASE
    /// puts it, in xAPIC mode) or the I/O APIC's. Both have 32-bit
    /// registers: a narrower read takes its bytes from the dword, a wider
    /// one reads the next dword for its upper half.
    pub fn mmio_read(&mut self, gpa: u64, size: u8, now_ns: u64) -> Option<u64> {
        let (page, offset) = self.mmio_target(gpa)?;
        match page {
            MmioPage::Ecam => return Some(self.pci().ecam_read(offset, size)),
            MmioPage::Virtio(i) => return Some(self.virtio_read(i, offset, size)),
            _ => {}
        }
        let dword = offset & !3;
        let lane = 8 * (offset & 3);
        let read = |this: &mut Self, at: u64| -> u64 {
            match page {
                MmioPage::Lapic => u64::from(this.cur_lapic().read(at, now_ns)),
                MmioPage::IoApic => u64::from(this.ioapic.read(at)),
                MmioPage::Ecam | MmioPage::Virtio(_) => 0,
            }
        };
        let mut v = read(self, dword) >> lane;
        if size == 8 && dword + 4 < 0x1000 {
            v |= read(self, dword + 4) << 32;
        }
        Some(match size {
            1 => v & 0xff,
            2 => v & 0xffff,
            4 => v & 0xffff_ffff,
            _ => v,
        })
    }

    /// A guest write at `gpa`; `false` if no device's registers are there.
    /// Only aligned 32-bit writes reach a register (the SDM and the 82093AA
    /// define no others; KVM drops them too); other sizes are dropped.
    pub fn mmio_write(&mut self, gpa: u64, size: u8, value: u64, now_ns: u64) -> bool {
        let Some((page, offset)) = self.mmio_target(gpa) else {
            return false;
        };
        match page {
            MmioPage::Ecam => {
                self.pci().ecam_write(offset, size, value);
                return true;
            }
            MmioPage::Virtio(_) => return self.virtio_write_no_ram(gpa, size, value),
            _ => {}
        }
        if size != 4 || offset & 3 != 0 {
            return true;
        }
        match page {
            MmioPage::Lapic => {
                let effect = self.cur_lapic().write(offset, value as u32, now_ns);
                self.apply(effect);
            }
            MmioPage::IoApic => {
                if let Some(m) = self.ioapic.write(offset, value as u32) {
                    self.deliver(m);
                }
            }
            MmioPage::Ecam | MmioPage::Virtio(_) => {}
        }
        self.interrupts_changed(now_ns);
        true
    }

    /// Whether a device claims the page of `gpa` (for the exit handler:
    /// emulate the access, or report an access to nothing).
    pub fn claims_mmio(&self, gpa: u64) -> bool {
        self.mmio_target(gpa).is_some()
    }

    /// Whether `gpa` is in the current vCPU's local APIC page (xAPIC mode)
    /// or the I/O APIC's: registers of this VM's alone, which no host
    /// resource stands behind.
    pub fn interrupt_controller_page(&self, gpa: u64) -> bool {
        matches!(self.mmio_target(gpa), Some((MmioPage::Lapic | MmioPage::IoApic, _)))
    }

    fn mmio_target(&self, gpa: u64) -> Option<(MmioPage, u64)> {
        if let Some(base) = self.lapics[self.cur].mmio_base()
            && (base..base + 0x1000).contains(&gpa)
        {
            return Some((MmioPage::Lapic, gpa - base));
        }
        if IOAPIC_PAGE.contains(&gpa) {
            return Some((MmioPage::IoApic, gpa - IOAPIC_BASE));
        }
        if let Some((i, offset)) = self.virtio_target(gpa) {
            return Some((MmioPage::Virtio(i), offset));
        }
        (ECAM_BASE..ECAM_BASE + ECAM_SIZE).contains(&gpa).then(|| (MmioPage::Ecam, gpa - ECAM_BASE))
    }

    /// A guest RDMSR of a local APIC MSR (IA32_APIC_BASE, IA32_TSC_DEADLINE,
    /// the x2APIC range); `None` for an MSR that is not the APIC's.
    pub fn apic_id(&self) -> u32 {
        self.lapics[self.cur].id()
    }

    pub fn lapic_read_msr(&mut self, msr: u32, now_ns: u64) -> Option<Result<u64, Gp>> {
        lapic::Lapic::handles_msr(msr).then(|| self.cur_lapic().read_msr(msr, now_ns))
    }

    /// A guest WRMSR of a local APIC MSR; `None` for one that is not.
    pub fn lapic_write_msr(&mut self, msr: u32, value: u64, now_ns: u64) -> Option<Result<(), Gp>> {
        if !lapic::Lapic::handles_msr(msr) {
            return None;
        }
        let r = self.cur_lapic().write_msr(msr, value, now_ns).map(|effect| self.apply(effect));
        self.interrupts_changed(now_ns);
        Some(r)
    }

    /// The task priority the guest set with MOV CR8 (CR8 is TPR[7:4]).
    pub fn set_cr8(&mut self, cr8: u64) {
        self.cur_lapic().set_tpr((cr8 as u8 & 0xf) << 4);
        self.refresh_intr();
    }

    /// After the guest changed an interrupt controller: timers may have
    /// moved and interrupts become deliverable.
    pub(super) fn interrupts_changed(&mut self, now_ns: u64) {
        self.next_timer_ns = None;
        self.poll_timers(now_ns);
        self.refresh_intr();
    }
}

#[derive(Clone, Copy)]
enum MmioPage {
    Lapic,
    IoApic,
    /// PCI configuration space, memory-mapped.
    Ecam,
    /// The register page of `virtio[i]`.
    Virtio(usize),
}
