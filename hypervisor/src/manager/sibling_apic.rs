//! A sibling's own local APIC, where the sibling runs (`rounds`,
//! "Siblings"): its registers (x2APIC MSRs and IA32_TSC_DEADLINE by WRMSR
//! and RDMSR; xAPIC registers as `local_mmio` decodes them), its timer's
//! interrupts, and fixed IPIs to the VM's other vCPUs, posted to them.
//!
//! Each sibling holds its vCPU's [`Lapic`] alone for the round; nothing of
//! another vCPU's APIC is touched here. An IPI for another vCPU goes into
//! that vCPU's [`PostedIrr`] (shared through the round's gang), and the
//! sender kicks the host CPU the target runs on: the target's next exit
//! (at once: the kick is an external interrupt) takes the posted vectors
//! into its APIC and injects them. A target not running takes them from
//! the boot CPU after the join, which then wakes it if it halted. Routing
//! uses each vCPU's [`Route`] as the round began: only IA32_APIC_BASE and
//! the xAPIC LDR and DFR change a route, and those writes are left to the
//! boot CPU. Also left to it: NMI, INIT and SIPI IPIs (they change another
//! vCPU's state). xAPIC page accesses come here decoded
//! (`super::local_mmio`).

use core::sync::atomic::{AtomicU64, Ordering};
use vcpu::{Event, Vcpu};

use crate::devices::lapic::{self, DeliveryMode, Effect, Gp, Lapic, Route};
use crate::devices::{GuestTsc, ipi_targets};
use crate::vm::interrupts::{ns_to_ticks, vm_ns};

/// The x2APIC EOI and ICR registers (SDM Vol. 3A 11.12.1.2, Table 11-6).
const X2APIC_EOI: u32 = 0x80b;
const X2APIC_ICR: u32 = 0x830;

/// A set of vectors several host CPUs add to and one takes (IRR bits):
/// the fixed interrupts posted to one vCPU, or the level-triggered EOIs
/// a gang owes the I/O APIC.
pub struct PostedIrr([AtomicU64; 4]);

impl Default for PostedIrr {
    fn default() -> Self {
        PostedIrr([const { AtomicU64::new(0) }; 4])
    }
}

impl PostedIrr {
    /// Adds `vector`. (SeqCst, as the taker's loads: the poster then reads
    /// where the target runs, and either the target's next look sees the
    /// vector or the poster sees the target running and kicks it.)
    pub fn post(&self, vector: u8) {
        self.0[usize::from(vector >> 6)].fetch_or(1 << (vector & 63), Ordering::SeqCst);
    }

    /// Whether a vector waits to be taken.
    pub fn any(&self) -> bool {
        self.0.iter().any(|w| w.load(Ordering::SeqCst) != 0)
    }

    /// Takes every vector posted so far, handing each to `f`; whether
    /// there was one.
    pub fn take(&self, mut f: impl FnMut(u8)) -> bool {
        let mut any = false;
        for (w, word) in self.0.iter().enumerate() {
            if word.load(Ordering::SeqCst) == 0 {
                continue;
            }
            let mut bits = word.swap(0, Ordering::SeqCst);
            while bits != 0 {
                f((w * 64) as u8 + bits.trailing_zeros() as u8);
                bits &= bits - 1;
                any = true;
            }
        }
        any
    }
}

/// Where a sibling's APIC sends what is not its own: the round's gang.
pub trait Outbox {
    /// Every vCPU's APIC routing, by vCPU index.
    fn routes(&self) -> &[Route];
    /// A fixed interrupt for vCPU `vcpu`.
    fn post(&self, vcpu: usize, vector: u8);
    /// A level-triggered `vector` ended, for the I/O APIC.
    fn eoi(&self, vector: u8);
}

/// What a sibling needs to run its own APIC: the APIC (its alone until
/// the join), the VM's clock, and what it did, for the VM's counters.
pub struct SiblingApic {
    lapic: *mut Lapic,
    /// The host's TSC rate and the VM clock's lead over the host's
    /// (`Vm::clock_offset_ns`), and the guest's TSC as the devices see it.
    hz: u64,
    offset_ns: i64,
    tsc: GuestTsc,
    /// The PIC's INTR was up for this vCPU (vCPU 0) as the round began:
    /// the PIC's vector goes first, which the boot CPU delivers, so this
    /// APIC's wait until then.
    pic: bool,
    /// When its timer is next due, host TSC (`u64::MAX`: not armed).
    pub timer: u64,
    /// APIC accesses handled here, and IPIs posted to other vCPUs.
    pub handled: u64,
    pub posted: u64,
}

/// A WRMSR or RDMSR of the APIC's, carried out here.
pub enum Access {
    Read(u64),
    Written,
}

impl SiblingApic {
    /// # Safety
    /// `lapic` is the sibling's vCPU's APIC, alive and touched by nobody
    /// else until the join.
    pub unsafe fn new(lapic: *mut Lapic, hz: u64, offset_ns: i64, tsc: GuestTsc, pic: bool) -> Self {
        SiblingApic { lapic, hz, offset_ns, tsc, pic, timer: u64::MAX, handled: 0, posted: 0 }
    }

    fn lapic(&mut self) -> &mut Lapic {
        // SAFETY: `new`'s contract.
        unsafe { &mut *self.lapic }
    }

    fn now_ns(&self, now: u64) -> u64 {
        vm_ns(now, self.hz, self.offset_ns)
    }

    /// Looks up when its timer is next due, from host time `now`.
    pub fn refresh_timer(&mut self, now: u64) {
        let ns = self.now_ns(now);
        let tsc = self.tsc.at(ns);
        let lapic = self.lapic();
        let due = if lapic.timer_armed() { lapic.next_timer_deadline(ns, tsc) } else { None };
        self.timer = due.map_or(u64::MAX, |d| {
            let host_ns = (i128::from(d) - i128::from(self.offset_ns)).clamp(0, i128::from(u64::MAX)) as u64;
            ns_to_ticks(host_ns, self.hz)
        });
    }

    /// Its timer's interrupts due by host time `now`, into IRR.
    pub fn tick(&mut self, now: u64) {
        let ns = self.now_ns(now);
        let tsc = self.tsc.at(ns);
        self.lapic().tick(ns, tsc);
        self.refresh_timer(now);
    }

    /// Before an entry: the vectors posted to it go into IRR, and the
    /// highest deliverable one is injected if the vCPU can take it (else
    /// an interrupt window is asked for), as `Vm::deliver_interrupts` does
    /// on the boot CPU.
    pub fn deliver<V: Vcpu>(&mut self, posted: &PostedIrr, vcpu: &mut V) {
        let lapic = self.lapic();
        posted.take(|v| {
            lapic.accept(v, false);
        });
        if self.pic {
            return;
        }
        let lapic = self.lapic();
        let Some(v) = lapic.pending_vector() else { return };
        if vcpu.interrupt_window_open() {
            lapic.acknowledge(v);
            vcpu.inject(Event::Interrupt { vector: v });
        } else {
            vcpu.request_interrupt_window();
        }
    }

    /// Whether its halted vCPU wakes: the vectors posted to it go into
    /// IRR, and one is deliverable (above the processor priority; SDM Vol.
    /// 3A 11.8.3.1: a masked or lower-priority vector leaves HLT halted).
    pub fn wakes(&mut self, posted: &PostedIrr) -> bool {
        let lapic = self.lapic();
        posted.take(|v| {
            lapic.accept(v, false);
        });
        self.deliverable()
    }

    /// Whether an interrupt in IRR is above the processor priority.
    pub fn deliverable(&mut self) -> bool {
        self.lapic().pending_vector().is_some()
    }

    /// Whether this sibling delivers its interrupts itself: an interrupt
    /// window to fill, a HLT to wait out. Not while the PIC's vector (the
    /// boot CPU's to deliver) comes first.
    pub fn delivers(&self) -> bool {
        !self.pic
    }

    /// What an APIC write asks for: a fixed IPI to itself goes into its
    /// IRR, one to another vCPU to `out`, as does an EOI of a
    /// level-triggered vector.
    fn apply(&mut self, effect: Effect, me: usize, out: &impl Outbox) {
        match effect {
            Effect::None => {}
            Effect::EoiBroadcast(v) => out.eoi(v),
            Effect::Ipi(ipi) => {
                let selected = ipi_targets(out.routes().iter().copied(), me, &ipi);
                let mut targets = crate::devices::delivered_to(selected, ipi.mode);
                while targets != 0 {
                    let t = targets.trailing_zeros() as usize;
                    targets &= targets - 1;
                    if t == me {
                        self.lapic().accept(ipi.vector, false);
                    } else {
                        out.post(t, ipi.vector);
                        self.posted += 1;
                    }
                }
            }
        }
    }

    /// Whether `gpa` is in its APIC's xAPIC page (xAPIC mode only).
    pub fn owns_page(&mut self, gpa: u64) -> bool {
        self.lapic().mmio_base() == Some(gpa & !0xfff)
    }

    /// A 32-bit read of the xAPIC register at `offset`.
    pub fn mmio_read(&mut self, offset: u64, now: u64) -> u32 {
        let ns = self.now_ns(now);
        self.handled += 1;
        self.lapic().read(offset, ns)
    }

    /// A 32-bit write of the xAPIC register at `offset`, for vCPU `me`;
    /// false, changing nothing, if it is not the sibling's to do: LDR and
    /// DFR (they change the routes the others use) and an ICR write other
    /// than a fixed or lowest-priority IPI (it changes another vCPU).
    pub fn mmio_write(&mut self, offset: u64, value: u32, now: u64, me: usize, out: &impl Outbox) -> bool {
        const LDR: u64 = 0xd0;
        const DFR: u64 = 0xe0;
        const ICR_LOW: u64 = 0x300;
        let fixed =
            matches!(DeliveryMode::from_bits(value >> 8), Some(DeliveryMode::Fixed | DeliveryMode::LowestPriority));
        if offset == LDR || offset == DFR || (offset == ICR_LOW && !fixed) {
            return false;
        }
        let ns = self.now_ns(now);
        self.handled += 1;
        let effect = self.lapic().write(offset, value, ns);
        self.apply(effect, me, out);
        if offset != 0xb0 && offset != ICR_LOW {
            // A timer register may have moved (not the EOI, the hot one).
            self.refresh_timer(now);
        }
        true
    }

    /// RDMSR: `None` if the MSR is not the APIC's.
    pub fn rdmsr(&mut self, msr: u32, now: u64) -> Option<Result<u64, Gp>> {
        if !Lapic::handles_msr(msr) {
            return None;
        }
        let ns = self.now_ns(now);
        self.handled += 1;
        Some(self.lapic().read_msr(msr, ns))
    }

    /// WRMSR, for vCPU `me`: `None` if it is not the sibling's to do (not
    /// the APIC's, IA32_APIC_BASE, an ICR write other than a fixed or
    /// lowest-priority IPI). A fixed IPI to itself goes into its IRR, one
    /// to another vCPU to `out`, as does an EOI of a level-triggered vector
    /// (for the I/O APIC after the join: its pin waits until then, as the
    /// devices do).
    pub fn wrmsr(&mut self, msr: u32, value: u64, now: u64, me: usize, out: &impl Outbox) -> Option<Result<(), Gp>> {
        let in_x2apic = self.lapic().mode() == lapic::Mode::X2Apic;
        let fixed = matches!(
            DeliveryMode::from_bits((value >> 8) as u32),
            Some(DeliveryMode::Fixed | DeliveryMode::LowestPriority)
        );
        if !Lapic::handles_msr(msr) || msr == lapic::IA32_APIC_BASE || (msr == X2APIC_ICR && in_x2apic && !fixed) {
            return None;
        }
        let ns = self.now_ns(now);
        self.handled += 1;
        let done = self.lapic().write_msr(msr, value, ns).map(|effect| self.apply(effect, me, out));
        // A timer register or the deadline may have moved.
        if msr != X2APIC_EOI && msr != X2APIC_ICR {
            self.refresh_timer(now);
        }
        Some(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;
    use core::cell::RefCell;
    use lapic::LapicConfig;

    /// `n` APICs in x2APIC mode, software-enabled, IDs 0..n.
    fn x2apics(n: u32) -> Vec<Lapic> {
        (0..n)
            .map(|id| {
                let mut l = Lapic::new(LapicConfig {
                    id,
                    bsp: id == 0,
                    bus_hz: lapic::DEFAULT_BUS_HZ,
                    tsc_hz: 1_000_000_000,
                    phys_addr_bits: 36,
                });
                l.set_apic_base(l.apic_base() | (1 << 10)).unwrap();
                assert_eq!(l.write_msr(0x80f, 0x1ff, 0), Ok(Effect::None));
                l
            })
            .collect()
    }

    /// Records what is posted.
    struct Sent {
        routes: Vec<Route>,
        sent: RefCell<Vec<(usize, u8)>>,
    }

    impl Outbox for Sent {
        fn routes(&self) -> &[Route] {
            &self.routes
        }
        fn post(&self, vcpu: usize, vector: u8) {
            self.sent.borrow_mut().push((vcpu, vector));
        }
        fn eoi(&self, _: u8) {
            panic!("no level-triggered EOI here");
        }
    }

    fn clock() -> GuestTsc {
        crate::devices::DeviceSet::pc(0, 16 << 20).guest_tsc_clock()
    }

    #[test]
    fn posted_vectors_are_taken_once_in_order() {
        let p = PostedIrr::default();
        for v in [0xfe, 0x30, 0x41, 0x30] {
            p.post(v);
        }
        let mut got = Vec::new();
        assert!(p.take(|v| got.push(v)));
        assert_eq!(got, [0x30, 0x41, 0xfe]);
        assert!(!p.take(|_| panic!("taken twice")));
    }

    #[test]
    fn fixed_ipis_go_to_their_targets_and_the_rest_to_the_boot_cpu() {
        let mut apics = x2apics(4);
        let routes: Vec<Route> = apics.iter().map(Lapic::route).collect();
        // SAFETY: the APIC outlives `s`, and nothing else touches it.
        let mut s = unsafe { SiblingApic::new(&raw mut apics[1], 1_000_000_000, 0, clock(), false) };
        let out = Sent { routes, sent: RefCell::new(Vec::new()) };
        let wr = |s: &mut SiblingApic, msr: u32, value: u64, out: &Sent| s.wrmsr(msr, value, 0, 1, out);
        // Physical destination 3; all but self (shorthand 11b); self (01b);
        // lowest priority to logical cluster 0, members 0 and 2 (one takes it).
        assert_eq!(wr(&mut s, 0x830, (3 << 32) | 0x50, &out), Some(Ok(())));
        assert_eq!(wr(&mut s, 0x830, (3 << 18) | 0x51, &out), Some(Ok(())));
        assert_eq!(wr(&mut s, 0x830, (1 << 18) | 0x52, &out), Some(Ok(())));
        assert_eq!(wr(&mut s, 0x830, (0b101 << 32) | (1 << 11) | 0x153, &out), Some(Ok(())));
        assert_eq!(*out.sent.borrow(), [(3, 0x50), (0, 0x51), (2, 0x51), (3, 0x51), (0, 0x53)]);
        assert_eq!((s.posted, s.handled), (5, 4));
        // INIT, SIPI and NMI change another vCPU; IA32_APIC_BASE changes
        // the routes: none of them is done here.
        for (msr, value) in [(0x830, 0x4500), (0x830, 0x620), (0x830, 0x400), (0x1b, 0xfee0_0c00)] {
            assert_eq!(wr(&mut s, msr, value, &out), None, "{msr:#x} {value:#x}");
        }
        assert_eq!(wr(&mut s, 0x10, 0, &out), None, "not the APIC's");
        assert_eq!(wr(&mut s, 0x80b, 1, &out), Some(Err(Gp)), "a non-zero EOI is a #GP");
        assert_eq!(s.handled, 5);
        // The one to itself is in its own IRR (`s` is done with it).
        assert_eq!(apics[1].pending_vector(), Some(0x52));
    }
}
