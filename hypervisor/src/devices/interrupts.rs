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
//! Left out for now: an I/O APIC entry in ExtINT mode (Linux falls back to
//! it only when IRQ 0 through pin 2 fails its check), NMI and SMI sources
//! (nothing on this board raises them), and INIT/SIPI (one vCPU per VM:
//! its own INIT IPIs go nowhere).

use super::DeviceSet;
use super::ioapic::{IOAPIC_BASE, Message};
use super::lapic::{self, DeliveryMode, Effect, Gp, Lint, LintRoute, Shorthand};
use super::pci::{ECAM_BASE, ECAM_SIZE};

/// The I/O APIC's pin for ISA line `irq`: the MADT overrides IRQ 0 to GSI 2
/// (where the 8254 sits on a PC's I/O APIC); the others are identity.
pub const fn ioapic_pin(irq: u8) -> usize {
    if irq == 0 { 2 } else { irq as usize }
}

/// IA32_APIC_BASE.EXTD.
const X2APIC_ENABLE: u64 = 1 << 10;

/// The I/O APIC's register page.
const IOAPIC_PAGE: core::ops::Range<u64> = IOAPIC_BASE..IOAPIC_BASE + 0x1000;

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

    /// An I/O APIC message to the local APIC.
    pub(super) fn deliver(&mut self, m: Message) {
        if matches!(m.mode, DeliveryMode::Fixed | DeliveryMode::LowestPriority)
            && self.lapic.is_destination(m.logical, m.destination.into(), false)
        {
            self.lapic.accept(m.vector, m.level_triggered);
        }
    }

    /// What a local APIC register write asks for: an IPI (to itself, the
    /// only APIC in the VM) or an EOI broadcast to the I/O APIC.
    fn apply(&mut self, effect: Effect) {
        match effect {
            Effect::None => {}
            Effect::Ipi(ipi) => {
                let to_self = match ipi.shorthand {
                    Shorthand::SelfOnly | Shorthand::AllIncludingSelf => true,
                    Shorthand::AllExcludingSelf => false,
                    Shorthand::None => self.lapic.is_destination(ipi.logical, ipi.destination, ipi.x2apic),
                };
                if to_self && matches!(ipi.mode, DeliveryMode::Fixed | DeliveryMode::LowestPriority) {
                    self.lapic.accept(ipi.vector, false);
                }
            }
            Effect::EoiBroadcast(vector) => {
                for m in self.ioapic.eoi(vector) {
                    self.deliver(m);
                }
            }
        }
    }

    /// Whether the PIC's INTR reaches the CPU.
    fn pic_connected(&self) -> bool {
        self.lapic.lint(Lint::Lint0) == LintRoute::ExtInt
    }

    /// Recompute the cached "an interrupt waits" flag.
    pub(super) fn refresh_intr(&mut self) {
        let pic = self.pic_connected() && self.pic().output();
        self.intr = pic || self.lapic.pending_vector().is_some();
    }

    /// The interrupt acknowledge cycle: the vector to inject, the PIC's
    /// (ExtINT) first, else the local APIC's highest deliverable one (into
    /// ISR). With neither (nothing was pending), the local APIC's spurious
    /// vector, as hardware gives when a request vanishes.
    pub fn acknowledge_interrupt(&mut self) -> u8 {
        let vector = if self.pic_connected() && self.pic().output() {
            self.acknowledge_pic()
        } else if let Some(v) = self.lapic.pending_vector() {
            self.lapic.acknowledge(v);
            v
        } else {
            self.lapic.spurious_vector()
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
                MmioPage::Lapic => u64::from(this.lapic.read(at, now_ns)),
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
                let effect = self.lapic.write(offset, value as u32, now_ns);
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

    fn mmio_target(&self, gpa: u64) -> Option<(MmioPage, u64)> {
        if let Some(base) = self.lapic.mmio_base()
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
        self.lapic.id()
    }

    pub fn lapic_read_msr(&mut self, msr: u32, now_ns: u64) -> Option<Result<u64, Gp>> {
        lapic::Lapic::handles_msr(msr).then(|| self.lapic.read_msr(msr, now_ns))
    }

    /// A guest WRMSR of a local APIC MSR; `None` for one that is not.
    pub fn lapic_write_msr(&mut self, msr: u32, value: u64, now_ns: u64) -> Option<Result<(), Gp>> {
        if !lapic::Lapic::handles_msr(msr) {
            return None;
        }
        if msr == lapic::IA32_APIC_BASE && value & X2APIC_ENABLE != 0 {
            // CPUID offers no x2APIC: enabling it is a #GP (SDM Vol. 3A
            // 11.12.1).
            return Some(Err(Gp));
        }
        let r = self.lapic.write_msr(msr, value, now_ns).map(|effect| self.apply(effect));
        self.interrupts_changed(now_ns);
        Some(r)
    }

    /// The task priority the guest set with MOV CR8 (CR8 is TPR[7:4]).
    pub fn set_cr8(&mut self, cr8: u64) {
        self.lapic.set_tpr((cr8 as u8 & 0xf) << 4);
        self.refresh_intr();
    }

    /// After the guest changed an interrupt controller: timers may have
    /// moved and interrupts become deliverable.
    fn interrupts_changed(&mut self, now_ns: u64) {
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
