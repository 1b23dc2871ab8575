//! The local APIC timer, for time slices on CPUs without a VMX-style
//! preemption timer (AMD-V): a one-shot interrupt at the slice's end makes
//! the running guest exit (SDM Vol. 3A 11.5.4; APM Vol. 2 16.4).
//!
//! xAPIC registers are reached through the direct map (the bootloader maps
//! the first 4 GiB, where the APIC lives); x2APIC mode, when firmware left
//! it on, through MSRs. The timer counts at a rate calibrated against the
//! TSC once.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use x86_64::structures::idt::InterruptStackFrame;

use super::{memory, time};

/// The timer's interrupt vector.
pub const TIMER_VECTOR: u8 = 0x40;
const SPURIOUS_VECTOR: u32 = 0xff;

const IA32_APIC_BASE: u32 = 0x1b;
const BASE_ENABLE: u64 = 1 << 11;
const BASE_X2APIC: u64 = 1 << 10;

const REG_ID: u32 = 0x20;
const REG_EOI: u32 = 0xb0;
const REG_ICR_LOW: u32 = 0x300;
const REG_ICR_HIGH: u32 = 0x310;
/// ICR delivery status: the previous IPI is still being sent (xAPIC only,
/// SDM Vol. 3A 11.6.1).
const ICR_PENDING: u32 = 1 << 12;
const REG_SVR: u32 = 0xf0;
const REG_LVT_TIMER: u32 = 0x320;
const REG_INITIAL_COUNT: u32 = 0x380;
const REG_CURRENT_COUNT: u32 = 0x390;
const REG_DIVIDE: u32 = 0x3e0;

static BASE: AtomicU64 = AtomicU64::new(0);
static X2APIC: AtomicBool = AtomicBool::new(false);
/// Timer counts per TSC tick, as a 32.32 fixed-point number.
static RATE: AtomicU64 = AtomicU64::new(0);

fn read(reg: u32) -> u32 {
    if X2APIC.load(Ordering::Relaxed) {
        // SAFETY: x2APIC MSRs 0x800 + reg/16 exist in x2APIC mode.
        unsafe { x86_64::registers::model_specific::Msr::new(0x800 + (reg >> 4)).read() as u32 }
    } else {
        let p = memory::phys_to_virt(BASE.load(Ordering::Relaxed) + reg as u64) as *const u32;
        // SAFETY: the APIC's register page, mapped by the direct map; APIC
        // registers are read with aligned 32-bit accesses.
        unsafe { p.read_volatile() }
    }
}

fn write(reg: u32, v: u32) {
    if X2APIC.load(Ordering::Relaxed) {
        // SAFETY: as in `read`; these registers take any 32-bit value.
        unsafe { x86_64::registers::model_specific::Msr::new(0x800 + (reg >> 4)).write(v as u64) }
    } else {
        let p = memory::phys_to_virt(BASE.load(Ordering::Relaxed) + reg as u64) as *mut u32;
        // SAFETY: as in `read`.
        unsafe { p.write_volatile(v) }
    }
}

/// Enables this CPU's APIC (software-enabled, spurious vector set) so it
/// can send and take IPIs. The boot CPU's mode (xAPIC or x2APIC, as the
/// firmware left it) is the mode of all: an AP switches to x2APIC if the
/// boot CPU is in it (SDM Vol. 3A 11.12.5).
pub fn enable() {
    let mut msr = x86_64::registers::model_specific::Msr::new(IA32_APIC_BASE);
    // SAFETY: IA32_APIC_BASE exists on every x86-64 CPU; setting the global
    // enable bit (then, on an AP, x2APIC mode like the boot CPU's) keeps
    // the firmware's base address, and xAPIC -> x2APIC is a legal change.
    unsafe {
        let mut v = msr.read();
        if v & BASE_ENABLE == 0 {
            v |= BASE_ENABLE;
            msr.write(v);
        }
        if BASE.load(Ordering::Relaxed) == 0 {
            X2APIC.store(v & BASE_X2APIC != 0, Ordering::Relaxed);
            BASE.store(v & 0x000f_ffff_ffff_f000, Ordering::Relaxed);
        } else if X2APIC.load(Ordering::Relaxed) && v & BASE_X2APIC == 0 {
            msr.write(v | BASE_X2APIC);
        }
    }
    write(REG_SVR, 0x100 | SPURIOUS_VECTOR);
}

/// This CPU's APIC ID.
pub fn id() -> u32 {
    if X2APIC.load(Ordering::Relaxed) { read(REG_ID) } else { read(REG_ID) >> 24 }
}

/// Sends an IPI: `low` is the ICR's low word (vector, delivery mode,
/// level, shorthand), `dest` the destination APIC ID (ignored with a
/// shorthand). Waits for the previous IPI to leave first (xAPIC).
pub fn send_ipi(dest: u32, low: u32) {
    if X2APIC.load(Ordering::Relaxed) {
        // SAFETY: the x2APIC ICR is one 64-bit MSR, destination in the high
        // half (SDM Vol. 3A 11.12.9); any IPI is a legal write.
        unsafe { x86_64::registers::model_specific::Msr::new(0x830).write(((dest as u64) << 32) | low as u64) }
    } else {
        wait_icr_idle();
        write(REG_ICR_HIGH, dest << 24);
        write(REG_ICR_LOW, low);
        wait_icr_idle();
    }
}

fn wait_icr_idle() {
    let start = time::rdtsc();
    let limit = time::tsc_hz() / 100;
    while read(REG_ICR_LOW) & ICR_PENDING != 0 && time::rdtsc() - start < limit {
        core::hint::spin_loop();
    }
}

/// Ends the interrupt being handled.
pub fn eoi() {
    write(REG_EOI, 0);
}

/// Enables this CPU's APIC and its timer, calibrated against the TSC on
/// the first CPU to ask (all count at the same rate). Returns the timer's
/// rate in counts per second.
pub fn init() -> u64 {
    enable();
    write(REG_DIVIDE, 0b1011); // divide by 1
    // One-shot, masked while calibrating.
    write(REG_LVT_TIMER, (1 << 16) | TIMER_VECTOR as u32);
    let tsc_hz = time::tsc_hz().max(1);
    if RATE.load(Ordering::Relaxed) == 0 {
        let window = (tsc_hz / 1000).max(10_000);
        write(REG_INITIAL_COUNT, u32::MAX);
        let start = time::rdtsc();
        while time::rdtsc() - start < window {
            core::hint::spin_loop();
        }
        let counted = u32::MAX - read(REG_CURRENT_COUNT);
        let elapsed = time::rdtsc() - start;
        write(REG_INITIAL_COUNT, 0);
        let rate = ((counted as u128) << 32) / elapsed.max(1) as u128;
        RATE.store(rate.max(1) as u64, Ordering::Relaxed);
    }
    write(REG_LVT_TIMER, TIMER_VECTOR as u32);
    ((RATE.load(Ordering::Relaxed) as u128 * tsc_hz as u128) >> 32) as u64
}

/// Fires the timer interrupt at TSC `deadline` (or at once if it passed).
pub fn arm(deadline: u64) {
    let ticks = deadline.saturating_sub(time::rdtsc());
    let count = ((ticks as u128 * RATE.load(Ordering::Relaxed) as u128) >> 32).clamp(1, u32::MAX as u128);
    write(REG_INITIAL_COUNT, count as u32);
}

/// Stops the timer (a count of 0; SDM Vol. 3A 11.5.4).
pub fn disarm() {
    write(REG_INITIAL_COUNT, 0);
}

/// Sends this CPU an interrupt (a self-IPI on `smp::WAKE_VECTOR`, whose
/// handler only acknowledges it). With interrupts off it stays pending, so
/// the next guest entry exits at once (`SvmCpu::nudge_after_interrupt`).
pub fn nudge() {
    // Fixed delivery, destination shorthand "self" (ICR bits 19:18 = 01,
    // SDM Vol. 3A 11.6.1).
    send_ipi(0, super::smp::WAKE_VECTOR as u32 | (1 << 14) | (0b01 << 18));
}

/// How many timer interrupts this CPU has taken.
pub fn fired() -> u64 {
    vcpu::cpu_local::get().timer_fired.load(Ordering::Relaxed)
}

pub extern "x86-interrupt" fn timer_interrupt(_frame: InterruptStackFrame) {
    vcpu::cpu_local::get().timer_fired.fetch_add(1, Ordering::Relaxed);
    write(REG_EOI, 0);
}
