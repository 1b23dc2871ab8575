//! Time since boot from the TSC, calibrated once against the PIT.
//!
//! The PIT is used because it exists on every PC and in every emulator here,
//! ACPI or not. Under Bochs with `clock: sync=none` the TSC counts emulated
//! instructions, so times there are path lengths, not wall-clock time.

use core::sync::atomic::{AtomicU64, Ordering};
use x86_64::instructions::port::Port;

static BOOT_TSC: AtomicU64 = AtomicU64::new(0);
static TSC_HZ: AtomicU64 = AtomicU64::new(0);

/// The PIT's input clock (Hz).
const PIT_HZ: u64 = 1_193_182;

pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC only reads the time-stamp counter; CR4.TSD is clear in
    // ring 0 anyway.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Measures the TSC frequency against 10 ms of PIT channel 2.
pub fn init() {
    BOOT_TSC.store(rdtsc(), Ordering::Relaxed);
    let ticks = PIT_HZ / 100;
    let mut gate: Port<u8> = Port::new(0x61);
    let mut cmd: Port<u8> = Port::new(0x43);
    let mut ch2: Port<u8> = Port::new(0x42);
    // SAFETY: ports 0x42/0x43/0x61 are the PIT and the system control port
    // B on every PC; channel 2 only drives the speaker, which stays off
    // (bit 1 of port 0x61 clear).
    let hz = unsafe {
        let g = gate.read();
        gate.write((g & !0x02) | 0x01); // gate on, speaker off
        cmd.write(0b1011_0000); // channel 2, lobyte/hibyte, mode 0, binary
        ch2.write((ticks & 0xff) as u8);
        ch2.write((ticks >> 8) as u8);
        let start = rdtsc();
        // Bit 5 of port 0x61 is channel 2's OUT, which goes high when mode 0
        // reaches zero. Bound the wait in case the PIT is absent.
        let mut spins = 0u64;
        while gate.read() & 0x20 == 0 && spins < 50_000_000 {
            spins += 1;
        }
        let end = rdtsc();
        gate.write(g);
        (end - start) * 100
    };
    TSC_HZ.store(hz.max(1_000_000), Ordering::Relaxed);
}

pub fn tsc_hz() -> u64 {
    TSC_HZ.load(Ordering::Relaxed)
}

/// Microseconds since `init`.
pub fn micros() -> u64 {
    let hz = TSC_HZ.load(Ordering::Relaxed);
    if hz == 0 {
        return 0;
    }
    let dt = rdtsc().wrapping_sub(BOOT_TSC.load(Ordering::Relaxed));
    ((dt as u128 * 1_000_000) / hz as u128) as u64
}
