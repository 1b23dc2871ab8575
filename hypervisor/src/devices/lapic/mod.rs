//! One vCPU's local APIC as the guest sees it (Intel SDM Vol. 3A chapter 11):
//! xAPIC registers in a relocatable 4 KiB MMIO page, x2APIC registers as
//! MSRs 0x800-0x8ff, IA32_APIC_BASE with its mode transitions, interrupt
//! priority (IRR/ISR/TMR, TPR/PPR, EOI), the error status register, the
//! interrupt command register and the timer in one-shot, periodic and
//! TSC-deadline modes. A VM has one per vCPU; nothing here knows how many.
//!
//! Pure logic: the caller routes what comes out (IPIs to other LAPICs, EOI
//! broadcasts to the I/O APIC), delivers what goes in ([`Lapic::accept`]),
//! injects [`Lapic::pending_vector`] when the vCPU can take it and calls
//! [`Lapic::acknowledge`] then, and drives the timer with the VM clock.
//!
//! **Time.** Every `now_ns` is the VM's clock in nanoseconds: monotonic, and
//! continuous across save and restore (a restored VM's clock continues from
//! the value it had when saved), so a saved timer resumes counting where it
//! stopped. The timer's input clock is [`LapicState::bus_hz`] (the core
//! crystal clock the VM advertises; Linux reads it from CPUID leaf 0x15 or
//! calibrates against the PIT, arch/x86/kernel/apic/apic.c
//! `calibrate_APIC_clock`). Counts are derived from elapsed time, never
//! accumulated. The caller calls [`Lapic::tick`] when
//! [`Lapic::next_timer_deadline`] says, and before it emulates an exit's
//! APIC access, so a deadline that passed is delivered before the guest
//! reprograms it (the accesses themselves also catch up one-shot and
//! periodic expiries; a TSC deadline needs the guest TSC, which only `tick`
//! takes).
//!
//! **MMIO accesses.** [`Lapic::read`] and [`Lapic::write`] take a byte
//! offset in the page and a 32-bit value: the SDM (11.4.1) defines only
//! 32-bit accesses at 16-byte aligned offsets. An access to bytes 4-15 of a
//! register slot is undefined there; here it reads 0 and a write does
//! nothing. For other access sizes the caller reads the aligned dword and
//! takes the bytes it needs (reads have no side effects, apart from an
//! access to a reserved offset logging an error), and drops writes that are
//! not 32 bits wide, as KVM does; Linux only uses 32-bit `mov`s
//! (arch/x86/include/asm/apic.h, `native_apic_mem_read/write`).
//!
//! What is left out: lowest-priority arbitration (APR reads 0; the caller
//! picks the target), directed EOI and EOI-broadcast suppression (the
//! version register says so, so every level-triggered EOI is broadcast),
//! the CMCI LVT, remote IRR for level-triggered LINT inputs, and the
//! thermal and performance-counter interrupts (their LVTs are registers
//! only).

#[cfg(test)]
mod tests;
mod timer;

use core::fmt;
use serde::{Deserialize, Serialize};

use super::persist::{Invalid, Persist};
pub use timer::{TimerState, divisor};

/// IA32_APIC_BASE.
pub const IA32_APIC_BASE: u32 = 0x1b;
/// IA32_TSC_DEADLINE.
pub const IA32_TSC_DEADLINE: u32 = 0x6e0;
/// The x2APIC register MSRs (SDM 11.12.1.2, Table 11-6).
pub const X2APIC_MSRS: core::ops::RangeInclusive<u32> = 0x800..=0x8ff;
/// Where the xAPIC page is after reset.
pub const DEFAULT_BASE: u64 = 0xfee0_0000;
/// The default timer input clock: 1 GHz, one tick per nanosecond.
pub const DEFAULT_BUS_HZ: u64 = 1_000_000_000;

/// IA32_APIC_BASE bits (SDM 11.4.4, Figure 11-5).
const BASE_BSP: u64 = 1 << 8;
const BASE_EXTD: u64 = 1 << 10;
const BASE_EN: u64 = 1 << 11;

/// The version register (SDM 11.4.8): version 0x14, an integrated xAPIC
/// (Linux's `modern_apic()` wants >= 0x14, so it neither synchronises
/// arbitration IDs nor expects INIT de-assert support), max LVT entry 5, so
/// six LVTs (timer, thermal, performance, LINT0, LINT1, error; no CMCI,
/// which needs MCG_CAP.CMCI_P the VM does not advertise), and bit 24 clear:
/// EOI-broadcast suppression ("directed EOI") is not supported.
pub const VERSION: u32 = 0x0005_0014;

// xAPIC register offsets (SDM 11.4.1, Table 11-1); the x2APIC MSR of each is
// 0x800 + offset / 16 (Table 11-6).
const REG_ID: u32 = 0x020;
const REG_VERSION: u32 = 0x030;
const REG_TPR: u32 = 0x080;
const REG_APR: u32 = 0x090;
const REG_PPR: u32 = 0x0a0;
const REG_EOI: u32 = 0x0b0;
const REG_RRD: u32 = 0x0c0;
const REG_LDR: u32 = 0x0d0;
const REG_DFR: u32 = 0x0e0;
const REG_SVR: u32 = 0x0f0;
const REG_ISR: u32 = 0x100;
const REG_TMR: u32 = 0x180;
const REG_IRR: u32 = 0x200;
const REG_ESR: u32 = 0x280;
const REG_ICR_LOW: u32 = 0x300;
const REG_ICR_HIGH: u32 = 0x310;
const REG_LVT_TIMER: u32 = 0x320;
const REG_LVT_ERROR: u32 = 0x370;
const REG_TIMER_INITIAL: u32 = 0x380;
const REG_TIMER_CURRENT: u32 = 0x390;
const REG_TIMER_DIVIDE: u32 = 0x3e0;
/// x2APIC only (SDM 11.12.11).
const REG_SELF_IPI: u32 = 0x3f0;

/// LVT indices, in register order from 0x320.
const LVT_TIMER: usize = 0;
const LVT_LINT0: usize = 3;
const LVT_LINT1: usize = 4;
const LVT_ERROR: usize = 5;
const LVT_COUNT: usize = 6;

/// LVT bits (SDM 11.5.1, Figure 11-8).
const LVT_MASKED: u32 = 1 << 16;
const LVT_DELIVERY_STATUS: u32 = 1 << 12;
const LVT_REMOTE_IRR: u32 = 1 << 14;
const LVT_LEVEL: u32 = 1 << 15;
const TIMER_MODE_SHIFT: u32 = 17;
/// What software can set in each LVT: timer (vector, mask, mode), thermal
/// and performance (vector, delivery mode, mask), LINT0/1 (those plus
/// polarity and trigger mode), error (vector, mask).
const LVT_WRITABLE: [u32; LVT_COUNT] = [0x700ff, 0x107ff, 0x107ff, 0x1a7ff, 0x1a7ff, 0x100ff];
/// Read-only bits software may write back without effect: delivery status,
/// and remote IRR for LINT0/1. Anything else outside `LVT_WRITABLE` is
/// reserved (a #GP in x2APIC mode, 11.12.1.3).
const LVT_READ_ONLY: [u32; LVT_COUNT] = [
    LVT_DELIVERY_STATUS,
    LVT_DELIVERY_STATUS,
    LVT_DELIVERY_STATUS,
    LVT_DELIVERY_STATUS | LVT_REMOTE_IRR,
    LVT_DELIVERY_STATUS | LVT_REMOTE_IRR,
    LVT_DELIVERY_STATUS,
];

/// Spurious-interrupt vector register (SDM 11.9, Figure 11-23): vector,
/// APIC software enable, focus processor checking. Bit 12 (EOI-broadcast
/// suppression) is reserved as the version register does not offer it.
const SVR_WRITABLE: u32 = 0x3ff;
const SVR_ENABLE: u32 = 1 << 8;

/// Error status register bits (SDM 11.5.3, Figure 11-9).
pub const ESR_SEND_ILLEGAL_VECTOR: u32 = 1 << 5;
pub const ESR_RECEIVE_ILLEGAL_VECTOR: u32 = 1 << 6;
pub const ESR_ILLEGAL_REGISTER: u32 = 1 << 7;
const ESR_DEFINED: u32 = 0xff;

/// Interrupt command register (SDM 11.6.1, Figure 11-12): the bits kept in
/// xAPIC mode (vector, delivery mode, destination mode, level, trigger,
/// shorthand; delivery status always reads idle) and the destination field.
const ICR_LOW_WRITABLE: u32 = 0x000c_cfff;
const ICR_HIGH_WRITABLE: u32 = 0xff00_0000;
/// In x2APIC mode (11.12.9, Figure 11-28) bits 12 (delivery status is gone),
/// 13, 16-17 and 20-31 are reserved.
const ICR_X2APIC_RESERVED: u64 = 0xfff3_3000;

/// Divide configuration: bits 0, 1 and 3 (11.5.4, Figure 11-10).
const DIVIDE_WRITABLE: u32 = 0b1011;

/// A #GP(0) the caller raises in the guest: the access is one the SDM
/// faults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gp;

impl fmt::Display for Gp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("General-protection fault")
    }
}

/// The APIC's mode (SDM 11.12.5.1), from IA32_APIC_BASE's EN and EXTD.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Globally disabled (EN=0): no registers, LINT0/LINT1 act as the
    /// processor's INTR and NMI pins.
    Disabled,
    /// Registers in the MMIO page.
    XApic,
    /// Registers as MSRs; the MMIO page is not decoded.
    X2Apic,
}

/// How an interrupt message is delivered (the 3-bit delivery mode of the
/// ICR, the LVTs and the I/O APIC's redirection entries; SDM 11.5.1, 11.6.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryMode {
    /// The vector, through IRR ([`Lapic::accept`]).
    Fixed,
    /// The vector, to the lowest-priority processor among the destinations.
    LowestPriority,
    Smi,
    Nmi,
    /// INIT: the target resets to wait-for-SIPI ([`Lapic::init`]).
    Init,
    /// Start-up IPI: the target starts at vector × 4 KiB (ICR only).
    StartUp,
    /// The vector comes from the 8259A PIC (LVT and I/O APIC only).
    ExtInt,
}

impl DeliveryMode {
    /// The mode a 3-bit field encodes; `None` for the reserved codes 0b011
    /// and, where the field cannot carry them, 0b110 and 0b111.
    pub fn from_bits(bits: u32) -> Option<DeliveryMode> {
        Some(match bits & 7 {
            0 => DeliveryMode::Fixed,
            1 => DeliveryMode::LowestPriority,
            2 => DeliveryMode::Smi,
            4 => DeliveryMode::Nmi,
            5 => DeliveryMode::Init,
            6 => DeliveryMode::StartUp,
            7 => DeliveryMode::ExtInt,
            _ => return None,
        })
    }
}

/// The ICR's destination shorthand (SDM 11.6.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shorthand {
    /// The destination field says who.
    None,
    /// The sender only.
    SelfOnly,
    AllIncludingSelf,
    AllExcludingSelf,
}

/// An IPI the guest sent by writing the ICR, for the caller to route: to
/// every LAPIC that [`Lapic::is_destination`] (or the shorthand) selects,
/// through [`Lapic::accept`] for fixed and lowest-priority ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipi {
    pub vector: u8,
    pub mode: DeliveryMode,
    /// Logical (true) or physical destination mode.
    pub logical: bool,
    pub shorthand: Shorthand,
    /// The destination field: 8 bits (ICR bits 63:56) from an xAPIC, 32
    /// bits from an x2APIC; all-ones is a broadcast.
    pub destination: u32,
    /// Whether the sender was in x2APIC mode (the destination is 32 bits).
    pub x2apic: bool,
    /// The ICR's level bit (assert) and trigger mode bit, as written. On an
    /// xAPIC IPIs are delivered edge-triggered whatever the trigger bit
    /// says (SDM 11.6.1, Table 11-3 note 2): deliver fixed IPIs with
    /// `accept(vector, false)`.
    pub assert: bool,
    pub level_triggered: bool,
}

impl Ipi {
    /// An "INIT level de-assert" message (INIT, level-triggered, level bit
    /// clear). Only P6-era APICs act on it (SDM 11.6.1); Linux still sends
    /// one after the INIT that starts an AP
    /// (arch/x86/kernel/smpboot.c, `wakeup_secondary_cpu_via_init`) and the
    /// caller drops it rather than INIT the AP a second time.
    pub fn is_init_deassert(&self) -> bool {
        self.mode == DeliveryMode::Init && self.level_triggered && !self.assert
    }
}

/// What a register write asks of the caller.
#[must_use]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    None,
    /// The guest wrote the ICR: route this IPI.
    Ipi(Ipi),
    /// The guest ended a level-triggered interrupt: broadcast an EOI for
    /// this vector to the I/O APICs (`IoApic::eoi`).
    EoiBroadcast(u8),
}

/// A local interrupt pin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lint {
    Lint0,
    Lint1,
}

/// Where a LINT pin's signal goes, per its LVT entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LintRoute {
    /// Masked (or the APIC is software-disabled): the signal is dropped.
    Masked,
    /// Into IRR as this vector ([`Lapic::accept`]).
    Fixed {
        vector: u8,
        level_triggered: bool,
    },
    Smi,
    Nmi,
    Init,
    /// The PIC's interrupt, its vector read from the PIC (virtual wire
    /// mode), injected directly, not through IRR.
    ExtInt,
}

/// What a vCPU's LAPIC is built with (saved with its state: the guest has
/// calibrated against the clocks and read the ID).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LapicConfig {
    /// The APIC ID (CPUID's initial APIC ID and the x2APIC ID).
    pub id: u32,
    /// Whether this is the bootstrap processor (IA32_APIC_BASE.BSP).
    pub bsp: bool,
    /// The timer's input clock (Hz); [`DEFAULT_BUS_HZ`] unless the VM
    /// advertises another.
    pub bus_hz: u64,
    /// The guest TSC's frequency (Hz), to turn TSC deadlines into VM time.
    pub tsc_hz: u64,
    /// MAXPHYADDR the VM advertises (CPUID 0x80000008): IA32_APIC_BASE bits
    /// from here up are reserved.
    pub phys_addr_bits: u8,
}

/// Limits on the saved clocks: at least 1 kHz, at most 100 GHz.
const MIN_HZ: u64 = 1_000;
const MAX_HZ: u64 = 100_000_000_000;

/// A LAPIC's whole guest-visible state, as plain data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LapicState {
    /// The hardware-assigned APIC ID (read-only, as since Nehalem; SDM
    /// 11.4.6). xAPIC mode sees its low 8 bits in ID[31:24].
    pub id: u32,
    pub bus_hz: u64,
    pub tsc_hz: u64,
    pub phys_addr_bits: u8,
    /// IA32_APIC_BASE.
    pub apic_base: u64,
    /// Task priority (bits 7:0 of the TPR).
    pub tpr: u8,
    /// The xAPIC logical destination register (bits 31:24 kept); x2APIC
    /// mode derives its own from the ID.
    pub ldr: u32,
    /// The destination format model (DFR bits 31:28: 0xf flat, 0 cluster;
    /// other values, undefined in SDM 11.6.2.2, are kept and act as
    /// cluster).
    pub dfr_model: u8,
    /// Spurious-interrupt vector register.
    pub svr: u32,
    /// In-service, trigger-mode and interrupt-request registers, vector `v`
    /// at bit `v % 64` of word `v / 64`.
    pub isr: [u64; 4],
    pub tmr: [u64; 4],
    pub irr: [u64; 4],
    /// The ESR as software last read it, and errors logged since its last
    /// write (SDM 11.5.3: a write moves the second into the first).
    pub esr: u32,
    pub esr_pending: u32,
    /// The ICR, low half in bits 31:0 (x2APIC layout; the xAPIC destination
    /// is in bits 63:56).
    pub icr: u64,
    /// LVT timer, thermal, performance, LINT0, LINT1, error.
    pub lvt: [u32; LVT_COUNT],
    pub timer: TimerState,
}

/// What decides whether a LAPIC is a message's destination (SDM 11.6.2):
/// [`Lapic::route`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    mode: Mode,
    id: u32,
    /// The xAPIC LDR (bits 31:24 kept).
    ldr: u32,
    dfr_model: u8,
}

impl Route {
    /// See [`Lapic::is_destination`].
    pub fn is_destination(&self, logical: bool, destination: u32, wide: bool) -> bool {
        let broadcast = if wide { u32::MAX } else { 0xff };
        match self.mode {
            Mode::Disabled => false,
            _ if destination == broadcast => true,
            Mode::X2Apic if logical => {
                // 11.12.10.2: cluster in bits 31:16, member bitmap in 15:0.
                let ldr = x2apic_ldr(self.id);
                destination >> 16 == ldr >> 16 && destination & ldr & 0xffff != 0
            }
            Mode::X2Apic => destination == self.id,
            Mode::XApic if logical => {
                let (dest, ldr) = (destination as u8, (self.ldr >> 24) as u8);
                if destination > 0xff {
                    false
                } else if self.dfr_model == 0xf {
                    // Flat model (11.6.2.2): a bitmap of up to 8 APICs.
                    dest & ldr != 0
                } else {
                    // Cluster model: cluster in bits 7:4, members in 3:0.
                    dest >> 4 == ldr >> 4 && dest & ldr & 0xf != 0
                }
            }
            Mode::XApic => destination == self.id & 0xff,
        }
    }
}

/// The x2APIC logical ID, derived from the x2APIC ID (SDM 11.12.10.2).
fn x2apic_ldr(id: u32) -> u32 {
    ((id >> 4) << 16) | (1 << (id & 0xf))
}

/// A vCPU's local APIC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lapic {
    s: LapicState,
}

/// A 256-bit vector set: set, clear, test, highest.
fn bit_set(bits: &mut [u64; 4], v: u8) {
    bits[usize::from(v >> 6)] |= 1 << (v & 63);
}

fn bit_clear(bits: &mut [u64; 4], v: u8) {
    bits[usize::from(v >> 6)] &= !(1 << (v & 63));
}

fn bit_test(bits: &[u64; 4], v: u8) -> bool {
    bits[usize::from(v >> 6)] & (1 << (v & 63)) != 0
}

fn highest(bits: &[u64; 4]) -> Option<u8> {
    (0..4).rev().find(|&i| bits[i] != 0).map(|i| (i * 64 + 63 - bits[i].leading_zeros() as usize) as u8)
}

/// The 32-bit register `word` (0-7) of a 256-bit set.
fn bits_word(bits: &[u64; 4], word: u32) -> u32 {
    (bits[(word / 2) as usize] >> (32 * (word % 2))) as u32
}

/// A local APIC's interrupt state at a glance ([`Lapic::summary`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// The highest vector in service and the highest requested.
    pub isr: Option<u8>,
    pub irr: Option<u8>,
    pub tpr: u8,
    pub ppr: u8,
    pub lvt_timer: u32,
    /// IA32_TSC_DEADLINE (0: not armed).
    pub tsc_deadline: u64,
    /// When the timer is next due, in ns from now (`None`: not armed, or
    /// masked in a counting mode).
    pub timer_in_ns: Option<u64>,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = |v: Option<u8>| v.map_or_else(|| alloc::string::String::from("-"), |v| alloc::format!("{v:#04x}"));
        write!(
            f,
            "isr {}, irr {}, tpr {:#04x}, ppr {:#04x}, lvt timer {:#x}, ",
            v(self.isr),
            v(self.irr),
            self.tpr,
            self.ppr,
            self.lvt_timer
        )?;
        match self.timer_in_ns {
            Some(ns) => write!(f, "timer due in {} us", ns / 1000),
            None => write!(f, "timer not armed"),
        }
    }
}

/// The timer modes of LVT timer bits 18:17 (SDM 11.5.4.1, Table 11-2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TimerMode {
    OneShot,
    Periodic,
    TscDeadline,
    /// 0b11: reserved; the timer does not run.
    Reserved,
}

fn timer_mode(lvt: u32) -> TimerMode {
    match (lvt >> TIMER_MODE_SHIFT) & 3 {
        0 => TimerMode::OneShot,
        1 => TimerMode::Periodic,
        2 => TimerMode::TscDeadline,
        _ => TimerMode::Reserved,
    }
}

impl Lapic {
    /// A LAPIC as after power-up or RESET (SDM 11.4.7.1 and 11.12.5.1):
    /// xAPIC mode at [`DEFAULT_BASE`], every LVT masked, the APIC
    /// software-disabled with spurious vector 0xff, DFR flat.
    pub fn new(config: LapicConfig) -> Lapic {
        let mut s = LapicState {
            id: config.id,
            bus_hz: config.bus_hz,
            tsc_hz: config.tsc_hz,
            phys_addr_bits: config.phys_addr_bits,
            apic_base: DEFAULT_BASE | BASE_EN | if config.bsp { BASE_BSP } else { 0 },
            tpr: 0,
            ldr: 0,
            dfr_model: 0,
            svr: 0,
            isr: [0; 4],
            tmr: [0; 4],
            irr: [0; 4],
            esr: 0,
            esr_pending: 0,
            icr: 0,
            lvt: [0; LVT_COUNT],
            timer: TimerState::default(),
        };
        reset_registers(&mut s);
        Lapic { s }
    }

    /// Whether the timer may fire without a register access: a one-shot or
    /// periodic count running, or a TSC deadline armed (cheap: the exit
    /// path asks before computing the guest's TSC).
    pub fn timer_armed(&self) -> bool {
        self.s.timer.counting || self.s.timer.tsc_deadline != 0
    }

    /// The spurious-interrupt vector (SVR bits 7:0), what an acknowledge
    /// with nothing to deliver gives.
    pub fn spurious_vector(&self) -> u8 {
        self.s.svr as u8
    }

    /// The mode IA32_APIC_BASE selects.
    pub fn mode(&self) -> Mode {
        match (self.s.apic_base & BASE_EN != 0, self.s.apic_base & BASE_EXTD != 0) {
            (false, _) => Mode::Disabled,
            (true, false) => Mode::XApic,
            (true, true) => Mode::X2Apic,
        }
    }

    /// The guest-physical address of the xAPIC page while the guest can
    /// reach it (xAPIC mode); `None` in x2APIC mode or when disabled, when
    /// the page is not decoded (SDM 11.12.2).
    pub fn mmio_base(&self) -> Option<u64> {
        (self.mode() == Mode::XApic).then_some(self.s.apic_base & !0xfff & self.phys_mask())
    }

    /// The APIC ID.
    pub fn id(&self) -> u32 {
        self.s.id
    }

    /// The TPR (CR8 is its bits 7:4; SDM 11.8.6).
    pub fn tpr(&self) -> u8 {
        self.s.tpr
    }

    /// Set the TPR (a CR8 write, or the TPR shadow after a VM exit).
    pub fn set_tpr(&mut self, tpr: u8) {
        self.s.tpr = tpr;
    }

    /// What `vm stats` shows of it: enough to see why a vCPU takes no
    /// interrupts (a vector left in service, a masked timer, a deadline far
    /// off), at VM time `now_ns` with the guest's TSC `guest_tsc`.
    pub fn summary(&self, now_ns: u64, guest_tsc: u64) -> Summary {
        Summary {
            isr: highest(&self.s.isr),
            irr: highest(&self.s.irr),
            tpr: self.s.tpr,
            ppr: self.ppr(),
            lvt_timer: self.s.lvt[LVT_TIMER],
            tsc_deadline: self.s.timer.tsc_deadline,
            timer_in_ns: self.next_timer_deadline(now_ns, guest_tsc).map(|t| t.saturating_sub(now_ns)),
        }
    }

    /// The processor priority (SDM 11.8.3.1): the TPR if its class is at
    /// least the highest in-service vector's, else that vector's class.
    pub fn ppr(&self) -> u8 {
        let isrv = highest(&self.s.isr).unwrap_or(0);
        if self.s.tpr >> 4 >= isrv >> 4 { self.s.tpr } else { isrv & 0xf0 }
    }

    /// Whether the APIC is enabled both globally (IA32_APIC_BASE) and by
    /// software (SVR bit 8): only then are fixed interrupts accepted and
    /// delivered (SDM 11.4.3, 11.4.7.2).
    pub fn enabled(&self) -> bool {
        self.mode() != Mode::Disabled && self.s.svr & SVR_ENABLE != 0
    }

    fn phys_mask(&self) -> u64 {
        // Validated to 32..=52 bits; the clamp keeps the shift in range.
        (1u64 << self.s.phys_addr_bits.clamp(32, 52)) - 1
    }

    /// IA32_APIC_BASE bits that must be 0: 7:0, 9 and MAXPHYADDR and up
    /// (SDM 11.4.4).
    fn base_reserved(&self) -> u64 {
        0x2ff | !self.phys_mask()
    }

    /// IA32_APIC_BASE.
    pub fn apic_base(&self) -> u64 {
        self.s.apic_base
    }

    /// A WRMSR to IA32_APIC_BASE: relocates the page, moves between modes
    /// by the transitions of SDM 11.12.5 (Figure 11-27): xAPIC to x2APIC,
    /// either enabled mode to disabled, disabled to xAPIC. Disabled to
    /// x2APIC, x2APIC to xAPIC, EN=0 with EXTD=1 and reserved bits are a
    /// #GP. Disabling loses the register state (11.4.3: the APIC returns to
    /// its power-up state; only the ID survives, 11.12.5.1).
    pub fn set_apic_base(&mut self, value: u64) -> Result<(), Gp> {
        if value & self.base_reserved() != 0 {
            return Err(Gp);
        }
        let new = match (value & BASE_EN != 0, value & BASE_EXTD != 0) {
            (false, false) => Mode::Disabled,
            (true, false) => Mode::XApic,
            (true, true) => Mode::X2Apic,
            (false, true) => return Err(Gp),
        };
        let old = self.mode();
        if matches!((old, new), (Mode::X2Apic, Mode::XApic) | (Mode::Disabled, Mode::X2Apic)) {
            return Err(Gp);
        }
        if new == Mode::Disabled && old != Mode::Disabled {
            reset_registers(&mut self.s);
        }
        self.s.apic_base = value;
        Ok(())
    }

    /// An INIT (SDM 11.4.7.3, 11.12.5.1): every register back to its reset
    /// value except the ID; the mode and IA32_APIC_BASE stay. The caller
    /// puts the vCPU in wait-for-SIPI (an AP) or resets it.
    pub fn init(&mut self) {
        reset_registers(&mut self.s);
    }

    /// A fixed or lowest-priority interrupt for `vector` arrives (from the
    /// I/O APIC, an IPI or a local source): logged into IRR, and into TMR
    /// when level-triggered (SDM 11.8.4). Vectors 0-15 are illegal: the
    /// interrupt is dropped and ESR's "received illegal vector" is set
    /// (11.5.3). A disabled APIC drops it. Returns whether IRR took it.
    pub fn accept(&mut self, vector: u8, level_triggered: bool) -> bool {
        if !self.enabled() {
            return false;
        }
        if vector < 16 {
            self.error(ESR_RECEIVE_ILLEGAL_VECTOR);
            return false;
        }
        bit_set(&mut self.s.irr, vector);
        if level_triggered {
            bit_set(&mut self.s.tmr, vector);
        } else {
            bit_clear(&mut self.s.tmr, vector);
        }
        true
    }

    /// The vector to inject when the vCPU can take an interrupt: the
    /// highest requested one whose priority class is above the PPR's (SDM
    /// 11.8.3.1), while the APIC is enabled.
    pub fn pending_vector(&self) -> Option<u8> {
        if !self.enabled() {
            return None;
        }
        let v = highest(&self.s.irr)?;
        (v >> 4 > self.ppr() >> 4).then_some(v)
    }

    /// The vCPU took `vector` (it was injected): IRR to ISR (SDM 11.8.4).
    /// Returns false, changing nothing, if it was not requested.
    pub fn acknowledge(&mut self, vector: u8) -> bool {
        if !bit_test(&self.s.irr, vector) {
            return false;
        }
        bit_clear(&mut self.s.irr, vector);
        bit_set(&mut self.s.isr, vector);
        true
    }

    /// End of interrupt (SDM 11.8.5): the highest in-service vector is done.
    /// Returns it if it was level-triggered, for the caller to broadcast to
    /// the I/O APICs (no EOI-broadcast suppression here).
    pub fn eoi(&mut self) -> Option<u8> {
        let v = highest(&self.s.isr)?;
        bit_clear(&mut self.s.isr, v);
        bit_test(&self.s.tmr, v).then_some(v)
    }

    /// Where LINT0 or LINT1 delivers (SDM 11.5.1). With the APIC globally
    /// disabled the processor acts as if it had none (11.4.3): the pins are
    /// INTR (the PIC) and NMI.
    pub fn lint(&self, pin: Lint) -> LintRoute {
        let i = match pin {
            Lint::Lint0 => LVT_LINT0,
            Lint::Lint1 => LVT_LINT1,
        };
        if self.mode() == Mode::Disabled {
            return if i == LVT_LINT0 { LintRoute::ExtInt } else { LintRoute::Nmi };
        }
        let lvt = self.s.lvt[i];
        if lvt & LVT_MASKED != 0 {
            return LintRoute::Masked;
        }
        match DeliveryMode::from_bits(lvt >> 8) {
            Some(DeliveryMode::Fixed) => LintRoute::Fixed { vector: lvt as u8, level_triggered: lvt & LVT_LEVEL != 0 },
            Some(DeliveryMode::Smi) => LintRoute::Smi,
            Some(DeliveryMode::Nmi) => LintRoute::Nmi,
            Some(DeliveryMode::Init) => LintRoute::Init,
            Some(DeliveryMode::ExtInt) => LintRoute::ExtInt,
            // Lowest priority, start-up and the reserved codes mean nothing
            // for a local pin.
            _ => LintRoute::Masked,
        }
    }

    /// Whether this LAPIC is among the destinations of a message in
    /// `logical` or physical mode addressed to `destination` (SDM 11.6.2),
    /// which is 8 bits wide from an xAPIC or the I/O APIC and 32 bits
    /// (`wide`) from an x2APIC; all-ones of its width is a broadcast. The
    /// shorthands are the caller's (it knows the sender). A disabled APIC
    /// is no one's destination.
    pub fn is_destination(&self, logical: bool, destination: u32, wide: bool) -> bool {
        self.route().is_destination(logical, destination, wide)
    }

    /// What routing a message to this APIC reads of it, copied: another
    /// host CPU routes a sibling vCPU's IPIs with it while this vCPU runs
    /// (`manager::rounds`). It changes only with IA32_APIC_BASE and the
    /// xAPIC's LDR and DFR.
    pub fn route(&self) -> Route {
        Route { mode: self.mode(), id: self.s.id, ldr: self.s.ldr, dfr_model: self.s.dfr_model }
    }

    /// Whether an EOI now would end a level-triggered interrupt, which the
    /// caller then broadcasts to the I/O APICs ([`Effect::EoiBroadcast`]).
    pub fn eoi_broadcasts(&self) -> bool {
        highest(&self.s.isr).is_some_and(|v| bit_test(&self.s.tmr, v))
    }

    /// Log an error (SDM 11.5.3) and raise the error interrupt if its LVT
    /// lets it through. An illegal vector in the error LVT itself is logged
    /// too, but raises nothing more.
    fn error(&mut self, bit: u32) {
        self.s.esr_pending |= bit;
        let lvt = self.s.lvt[LVT_ERROR];
        if lvt & LVT_MASKED != 0 || !self.enabled() {
            return;
        }
        let vector = lvt as u8;
        if vector < 16 {
            self.s.esr_pending |= ESR_RECEIVE_ILLEGAL_VECTOR;
        } else {
            bit_set(&mut self.s.irr, vector);
            bit_clear(&mut self.s.tmr, vector);
        }
    }

    fn timer_mode(&self) -> TimerMode {
        timer_mode(self.s.lvt[LVT_TIMER])
    }

    fn timer_periodic(&self) -> bool {
        self.timer_mode() == TimerMode::Periodic
    }

    /// The timer reached zero: its interrupt goes to IRR unless masked
    /// (SDM 11.5.1). Whether IRR took it.
    fn fire_timer(&mut self) -> bool {
        let lvt = self.s.lvt[LVT_TIMER];
        lvt & LVT_MASKED == 0 && self.accept(lvt as u8, false)
    }

    /// Account for one-shot and periodic expiries up to `now_ns`, raising
    /// one interrupt if any happened (IRR holds one per vector: several
    /// missed periods are one interrupt, as on hardware where the later
    /// ones find the IRR bit set). Whether IRR took it.
    fn sync_timer(&mut self, now_ns: u64) -> bool {
        let periodic = self.timer_periodic();
        let due = self.s.timer.due_expiries(now_ns, self.s.bus_hz, periodic);
        if !self.s.timer.counting || due <= self.s.timer.expiries {
            return false;
        }
        self.s.timer.expiries = due;
        if !periodic {
            // One-shot: stays at 0 until reprogrammed (11.5.4).
            self.s.timer.stop();
        }
        self.fire_timer()
    }

    /// Deliver every timer interrupt due by `now_ns` (VM clock) or, in
    /// TSC-deadline mode, by `guest_tsc` (the guest's TSC at the same
    /// moment). Returns whether an interrupt went into IRR.
    pub fn tick(&mut self, now_ns: u64, guest_tsc: u64) -> bool {
        let mut fired = self.sync_timer(now_ns);
        let deadline = self.s.timer.tsc_deadline;
        if self.timer_mode() == TimerMode::TscDeadline && deadline != 0 && guest_tsc >= deadline {
            // 11.5.4.1: it disarms itself and clears IA32_TSC_DEADLINE,
            // masked or not.
            self.s.timer.tsc_deadline = 0;
            fired |= self.fire_timer();
        }
        fired
    }

    /// When (VM clock, ns) the caller should next call [`Self::tick`]: the
    /// next timer expiry not yet delivered, `now_ns` or earlier if one is
    /// already due, `None` if none is coming. A masked one-shot or periodic
    /// timer needs no visits (a later LVT write accounts for expiries that
    /// passed while masked); an armed TSC deadline is reported even when
    /// masked, since reaching it disarms the timer.
    pub fn next_timer_deadline(&self, now_ns: u64, guest_tsc: u64) -> Option<u64> {
        match self.timer_mode() {
            TimerMode::OneShot | TimerMode::Periodic => {
                if self.s.lvt[LVT_TIMER] & LVT_MASKED != 0 {
                    return None;
                }
                self.s.timer.next_expiry(self.s.bus_hz, self.timer_periodic())
            }
            TimerMode::TscDeadline if self.s.timer.tsc_deadline != 0 => {
                let left = self.s.timer.tsc_deadline.saturating_sub(guest_tsc);
                let ns = (u128::from(left) * 1_000_000_000).div_ceil(u128::from(self.s.tsc_hz.max(1)));
                Some(now_ns.saturating_add(u64::try_from(ns).unwrap_or(u64::MAX)))
            }
            _ => None,
        }
    }

    fn set_lvt(&mut self, i: usize, value: u32, now_ns: u64) {
        if i == LVT_TIMER {
            // Expiries before the write happened under the old entry.
            self.sync_timer(now_ns);
        }
        let mut new = value & LVT_WRITABLE[i];
        if self.s.svr & SVR_ENABLE == 0 {
            // 11.4.7.2: masks cannot be cleared while software-disabled.
            new |= LVT_MASKED;
        }
        if i == LVT_TIMER && timer_mode(new) != self.timer_mode() {
            // 11.5.4.1: a write that changes the timer mode disarms it.
            self.s.timer.stop();
            self.s.timer.tsc_deadline = 0;
        }
        self.s.lvt[i] = new;
    }

    fn set_svr(&mut self, value: u32, now_ns: u64) {
        self.sync_timer(now_ns);
        self.s.svr = value & SVR_WRITABLE;
        if self.s.svr & SVR_ENABLE == 0 {
            // 11.4.7.2: software disable masks every LVT.
            for lvt in &mut self.s.lvt {
                *lvt |= LVT_MASKED;
            }
        }
    }

    /// A write to the ESR (11.5.3): what was logged since the last write
    /// becomes readable, and logging starts afresh.
    fn write_esr(&mut self) {
        self.s.esr = core::mem::take(&mut self.s.esr_pending);
    }

    fn set_initial_count(&mut self, value: u32, now_ns: u64) {
        match self.timer_mode() {
            // 11.5.4.1: ignored in TSC-deadline mode.
            TimerMode::TscDeadline => {}
            TimerMode::OneShot | TimerMode::Periodic => {
                self.sync_timer(now_ns);
                self.s.timer.initial = value;
                // A write (re)starts the count; 0 stops it (11.5.4).
                self.s.timer.start(now_ns, value);
            }
            TimerMode::Reserved => self.s.timer.initial = value,
        }
    }

    fn set_divide(&mut self, value: u32, now_ns: u64) {
        self.sync_timer(now_ns);
        if self.s.timer.counting {
            // The SDM leaves a mid-count change open: the count left goes
            // on at the new rate, from now.
            let left = self.s.timer.current(now_ns, self.s.bus_hz, self.timer_periodic());
            self.s.timer.start(now_ns, left);
        }
        self.s.timer.divide = value & DIVIDE_WRITABLE;
    }

    fn current_count(&self, now_ns: u64) -> u32 {
        match self.timer_mode() {
            TimerMode::OneShot | TimerMode::Periodic => {
                self.s.timer.current(now_ns, self.s.bus_hz, self.timer_periodic())
            }
            // 11.5.4.1: reads 0 in TSC-deadline mode.
            _ => 0,
        }
    }

    /// Send the IPI in `icr` (SDM 11.6.1): returned for the caller to route.
    /// Combinations the xAPIC refuses (Table 11-3: the self and
    /// all-including-self shorthands carry only fixed interrupts) and the
    /// reserved delivery modes are not sent; a fixed or lowest-priority IPI
    /// with a vector below 16 logs "send illegal vector" instead.
    fn send_ipi(&mut self, icr: u64) -> Effect {
        let low = icr as u32;
        let x2apic = self.mode() == Mode::X2Apic;
        let shorthand = match (low >> 18) & 3 {
            0 => Shorthand::None,
            1 => Shorthand::SelfOnly,
            2 => Shorthand::AllIncludingSelf,
            _ => Shorthand::AllExcludingSelf,
        };
        let mode = match DeliveryMode::from_bits(low >> 8) {
            Some(DeliveryMode::ExtInt) | None => return Effect::None,
            Some(m) => m,
        };
        if matches!(shorthand, Shorthand::SelfOnly | Shorthand::AllIncludingSelf) && mode != DeliveryMode::Fixed {
            return Effect::None;
        }
        let vector = low as u8;
        if matches!(mode, DeliveryMode::Fixed | DeliveryMode::LowestPriority) && vector < 16 {
            self.error(ESR_SEND_ILLEGAL_VECTOR);
            return Effect::None;
        }
        Effect::Ipi(Ipi {
            vector,
            mode,
            logical: low & (1 << 11) != 0,
            shorthand,
            destination: if x2apic { (icr >> 32) as u32 } else { (icr >> 56) as u32 },
            x2apic,
            assert: low & (1 << 14) != 0,
            level_triggered: low & (1 << 15) != 0,
        })
    }

    /// The EOI register (11.8.5): the value written does not matter.
    fn write_eoi(&mut self) -> Effect {
        match self.eoi() {
            Some(v) => Effect::EoiBroadcast(v),
            None => Effect::None,
        }
    }

    /// A 32-bit read of the xAPIC page at byte `offset` (see the module
    /// notes for other sizes). Outside xAPIC mode the page is not decoded
    /// and this reads 0. Reserved registers read 0 and log "illegal
    /// register address" (SDM 11.5.3); write-only ones (EOI) read 0.
    pub fn read(&mut self, offset: u64, now_ns: u64) -> u32 {
        if self.mode() != Mode::XApic || offset >= 0x1000 || offset & 0xf != 0 {
            return 0;
        }
        let reg = offset as u32;
        match reg {
            REG_ID => (self.s.id & 0xff) << 24,
            REG_LDR => self.s.ldr,
            REG_DFR => (u32::from(self.s.dfr_model) << 28) | 0x0fff_ffff,
            REG_ICR_LOW => self.s.icr as u32,
            REG_ICR_HIGH => (self.s.icr >> 32) as u32,
            // APR: arbitration is the caller's; RRD: remote read is gone
            // since the xAPIC (delivery mode 0b011 is reserved).
            REG_APR | REG_RRD | REG_EOI => 0,
            _ => match self.read_common(reg, now_ns) {
                Some(v) => v,
                None => {
                    self.error(ESR_ILLEGAL_REGISTER);
                    0
                }
            },
        }
    }

    /// Registers both modes read alike; `None` for any other offset.
    fn read_common(&self, reg: u32, now_ns: u64) -> Option<u32> {
        Some(match reg {
            REG_VERSION => VERSION,
            REG_TPR => u32::from(self.s.tpr),
            REG_PPR => u32::from(self.ppr()),
            REG_SVR => self.s.svr,
            0x100..=0x170 => bits_word(&self.s.isr, (reg - REG_ISR) >> 4),
            0x180..=0x1f0 => bits_word(&self.s.tmr, (reg - REG_TMR) >> 4),
            0x200..=0x270 => bits_word(&self.s.irr, (reg - REG_IRR) >> 4),
            REG_ESR => self.s.esr,
            REG_LVT_TIMER..=REG_LVT_ERROR => self.s.lvt[((reg - REG_LVT_TIMER) >> 4) as usize],
            REG_TIMER_INITIAL => self.s.timer.initial,
            REG_TIMER_CURRENT => self.current_count(now_ns),
            REG_TIMER_DIVIDE => self.s.timer.divide,
            _ => return None,
        })
    }

    /// A 32-bit write to the xAPIC page at byte `offset` (see the module
    /// notes). Outside xAPIC mode it does nothing. Writes to read-only
    /// registers are ignored (the ID is read-only, as since Nehalem: SDM
    /// 11.4.1 note); writes to reserved ones log "illegal register
    /// address". Writing ICR's low half sends the IPI.
    pub fn write(&mut self, offset: u64, value: u32, now_ns: u64) -> Effect {
        if self.mode() != Mode::XApic || offset >= 0x1000 || offset & 0xf != 0 {
            return Effect::None;
        }
        match offset as u32 {
            REG_TPR => self.s.tpr = value as u8,
            REG_EOI => return self.write_eoi(),
            REG_LDR => self.s.ldr = value & 0xff00_0000,
            REG_DFR => self.s.dfr_model = (value >> 28) as u8,
            REG_SVR => self.set_svr(value, now_ns),
            REG_ESR => self.write_esr(),
            REG_ICR_LOW => {
                let low = value & ICR_LOW_WRITABLE;
                self.s.icr = (self.s.icr & !0xffff_ffff) | u64::from(low);
                return self.send_ipi(self.s.icr);
            }
            REG_ICR_HIGH => {
                self.s.icr = (self.s.icr & 0xffff_ffff) | (u64::from(value & ICR_HIGH_WRITABLE) << 32);
            }
            reg @ REG_LVT_TIMER..=REG_LVT_ERROR => self.set_lvt(((reg - REG_LVT_TIMER) >> 4) as usize, value, now_ns),
            REG_TIMER_INITIAL => self.set_initial_count(value, now_ns),
            REG_TIMER_DIVIDE => self.set_divide(value, now_ns),
            REG_ID | REG_VERSION | REG_APR | REG_PPR | REG_RRD | 0x100..=0x270 | REG_TIMER_CURRENT => {}
            _ => self.error(ESR_ILLEGAL_REGISTER),
        }
        Effect::None
    }

    /// Whether `msr` is one [`Self::read_msr`]/[`Self::write_msr`] handle.
    pub fn handles_msr(msr: u32) -> bool {
        msr == IA32_APIC_BASE || msr == IA32_TSC_DEADLINE || X2APIC_MSRS.contains(&msr)
    }

    /// RDMSR of IA32_APIC_BASE, IA32_TSC_DEADLINE or an x2APIC register.
    /// x2APIC registers #GP outside x2APIC mode, as do the write-only ones
    /// (EOI, SELF IPI) and every address Table 11-6 does not list (APR,
    /// RRD, DFR, ICR's high half 0x831 among them; SDM 11.12.1.2).
    pub fn read_msr(&mut self, msr: u32, now_ns: u64) -> Result<u64, Gp> {
        match msr {
            IA32_APIC_BASE => Ok(self.s.apic_base),
            // 11.5.4.1: reads 0 outside TSC-deadline mode.
            IA32_TSC_DEADLINE => {
                Ok(if self.timer_mode() == TimerMode::TscDeadline { self.s.timer.tsc_deadline } else { 0 })
            }
            _ if !X2APIC_MSRS.contains(&msr) || self.mode() != Mode::X2Apic => Err(Gp),
            _ => {
                let reg = (msr - 0x800) << 4;
                match reg {
                    REG_ID => Ok(u64::from(self.s.id)),
                    REG_LDR => Ok(u64::from(x2apic_ldr(self.s.id))),
                    REG_ICR_LOW => Ok(self.s.icr),
                    _ => self.read_common(reg, now_ns).map(u64::from).ok_or(Gp),
                }
            }
        }
    }

    /// WRMSR of IA32_APIC_BASE, IA32_TSC_DEADLINE or an x2APIC register.
    /// In x2APIC mode a reserved bit set is a #GP (SDM 11.12.1.3: bits 63:32
    /// of all but the ICR, the reserved bits of each register, any non-zero
    /// EOI or ESR value), as is a write to a read-only register.
    pub fn write_msr(&mut self, msr: u32, value: u64, now_ns: u64) -> Result<Effect, Gp> {
        match msr {
            IA32_APIC_BASE => return self.set_apic_base(value).map(|()| Effect::None),
            IA32_TSC_DEADLINE => {
                // 11.5.4.1: ignored outside TSC-deadline mode; 0 disarms; a
                // deadline already passed fires at the next `tick`.
                if self.timer_mode() == TimerMode::TscDeadline && self.mode() != Mode::Disabled {
                    self.s.timer.tsc_deadline = value;
                }
                return Ok(Effect::None);
            }
            _ if !X2APIC_MSRS.contains(&msr) || self.mode() != Mode::X2Apic => return Err(Gp),
            _ => {}
        }
        let reg = (msr - 0x800) << 4;
        if reg == REG_ICR_LOW {
            if value & ICR_X2APIC_RESERVED != 0 {
                return Err(Gp);
            }
            self.s.icr = value & (0xffff_ffff_0000_0000 | u64::from(ICR_LOW_WRITABLE));
            return Ok(self.send_ipi(self.s.icr));
        }
        let v = u32::try_from(value).map_err(|_| Gp)?;
        let check = |writable: u32| if v & !writable == 0 { Ok(()) } else { Err(Gp) };
        match reg {
            REG_TPR => {
                check(0xff)?;
                self.s.tpr = v as u8;
            }
            REG_EOI => {
                check(0)?;
                return Ok(self.write_eoi());
            }
            REG_SVR => {
                check(SVR_WRITABLE)?;
                self.set_svr(v, now_ns);
            }
            REG_ESR => {
                check(0)?;
                self.write_esr();
            }
            REG_LVT_TIMER..=REG_LVT_ERROR => {
                let i = ((reg - REG_LVT_TIMER) >> 4) as usize;
                check(LVT_WRITABLE[i] | LVT_READ_ONLY[i])?;
                self.set_lvt(i, v, now_ns);
            }
            REG_TIMER_INITIAL => self.set_initial_count(v, now_ns),
            REG_TIMER_DIVIDE => {
                check(DIVIDE_WRITABLE)?;
                self.set_divide(v, now_ns);
            }
            REG_SELF_IPI => {
                // 11.12.11: a fixed, edge-triggered IPI to this APIC alone,
                // delivered here.
                check(0xff)?;
                if v < 16 {
                    self.error(ESR_SEND_ILLEGAL_VECTOR);
                } else {
                    self.accept(v as u8, false);
                }
            }
            _ => return Err(Gp),
        }
        Ok(Effect::None)
    }
}

/// The registers' power-up values (SDM 11.4.7.1), the ID and
/// IA32_APIC_BASE aside.
fn reset_registers(s: &mut LapicState) {
    s.tpr = 0;
    s.ldr = 0;
    s.dfr_model = 0xf;
    s.svr = 0xff;
    s.isr = [0; 4];
    s.tmr = [0; 4];
    s.irr = [0; 4];
    s.esr = 0;
    s.esr_pending = 0;
    s.icr = 0;
    s.lvt = [LVT_MASKED; LVT_COUNT];
    s.timer = TimerState::default();
}

/// The saved timer is a start time and a start count on the VM clock, not a
/// remaining count: restored into a VM whose clock (the `now_ns` every call
/// takes) continues from the value it had when saved, the count resumes
/// exactly where it stopped, and a periodic timer stays on its grid.
impl Persist for Lapic {
    type State = LapicState;
    const STATE_VERSION: u16 = 1;

    fn save(&self) -> LapicState {
        self.s.clone()
    }

    fn validate(s: &LapicState) -> Result<(), Invalid> {
        if s.id == u32::MAX {
            return Err(Invalid("the APIC ID is the reserved all-ones value"));
        }
        if !(MIN_HZ..=MAX_HZ).contains(&s.bus_hz) || !(MIN_HZ..=MAX_HZ).contains(&s.tsc_hz) {
            return Err(Invalid("a timer clock frequency is outside 1 kHz to 100 GHz"));
        }
        if !(32..=52).contains(&s.phys_addr_bits) {
            return Err(Invalid("the physical address width is outside 32 to 52 bits"));
        }
        let probe = Lapic { s: s.clone() };
        if s.apic_base & probe.base_reserved() != 0 {
            return Err(Invalid("IA32_APIC_BASE has reserved bits set"));
        }
        if s.apic_base & BASE_EXTD != 0 && s.apic_base & BASE_EN == 0 {
            return Err(Invalid("IA32_APIC_BASE is in the invalid state EXTD=1, EN=0"));
        }
        if (s.isr[0] | s.tmr[0] | s.irr[0]) & 0xffff != 0 {
            return Err(Invalid("IRR, ISR or TMR holds a vector below 16"));
        }
        if s.ldr & 0x00ff_ffff != 0 || s.dfr_model > 0xf {
            return Err(Invalid("LDR or DFR has bits the xAPIC does not keep"));
        }
        if s.svr & !SVR_WRITABLE != 0 || (s.esr | s.esr_pending) & !ESR_DEFINED != 0 {
            return Err(Invalid("SVR or ESR has reserved bits set"));
        }
        if s.icr & !(0xffff_ffff_0000_0000 | u64::from(ICR_LOW_WRITABLE)) != 0 {
            return Err(Invalid("the ICR has reserved bits set"));
        }
        for (i, lvt) in s.lvt.iter().enumerate() {
            if lvt & !LVT_WRITABLE[i] != 0 {
                return Err(Invalid("an LVT entry has reserved or read-only bits set"));
            }
            if s.svr & SVR_ENABLE == 0 && lvt & LVT_MASKED == 0 {
                return Err(Invalid("an LVT entry is unmasked while the APIC is software-disabled"));
            }
        }
        let t = &s.timer;
        if t.divide & !DIVIDE_WRITABLE != 0 {
            return Err(Invalid("the timer divide register has reserved bits set"));
        }
        let mode = timer_mode(s.lvt[LVT_TIMER]);
        if t.counting
            && (t.start_count == 0
                || t.initial == 0
                || t.start_count > t.initial
                || !matches!(mode, TimerMode::OneShot | TimerMode::Periodic)
                || (mode == TimerMode::OneShot && t.expiries != 0))
        {
            return Err(Invalid("the timer counts from an impossible state"));
        }
        if t.tsc_deadline != 0 && mode != TimerMode::TscDeadline {
            return Err(Invalid("a TSC deadline is armed outside TSC-deadline mode"));
        }
        Ok(())
    }

    fn restore(&mut self, state: LapicState) {
        self.s = state;
    }
}
