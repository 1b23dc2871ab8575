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

/// Measures the TSC frequency against PIT channel 2 counting down 50 ms.
///
/// Under an emulator on a loaded host the emulator's thread can be
/// descheduled for milliseconds between a PIT read and the TSC read next to
/// it; timing the PIT's output bit alone was seen off by 1.2-5.7x that way.
/// So each reading of the counter is bracketed by two TSC reads, and only
/// readings as tight as the tightest of a first batch (within 4x, at least
/// 2 us) count, at the start and at the end (the same check Linux's quick
/// PIT calibration makes). The best of three windows is kept.
pub fn init() {
    BOOT_TSC.store(rdtsc(), Ordering::Relaxed);
    let mut best: Option<(u64, u64)> = None;
    for _ in 0..3 {
        if let Some((hz, spread)) = pit_window()
            && best.is_none_or(|(_, s)| spread < s)
        {
            best = Some((hz, spread));
        }
    }
    TSC_HZ.store(best.map_or(0, |(hz, _)| hz).max(1_000_000), Ordering::Relaxed);
}

/// One reading of channel 2's count: (TSC in the middle, count, TSC ticks
/// the reading took).
fn pit_read(cmd: &mut Port<u8>, ch2: &mut Port<u8>) -> (u64, u16, u64) {
    let t0 = rdtsc();
    // SAFETY: latching and reading channel 2's count (two bytes, low
    // first) has no effect beyond the PIT's read state.
    let count = unsafe {
        cmd.write(0b1000_0000); // latch channel 2
        let lo = ch2.read() as u16;
        let hi = ch2.read() as u16;
        hi << 8 | lo
    };
    let t1 = rdtsc();
    (t0 / 2 + t1 / 2, count, t1 - t0)
}

/// TSC ticks per second over about 50 ms of PIT channel 2, and the summed
/// uncertainty of the two readings it rests on; none if no reading was
/// tight enough or the PIT did not count.
fn pit_window() -> Option<(u64, u64)> {
    const START: u16 = 0xffff;
    const SPAN: u16 = (PIT_HZ / 20) as u16; // 50 ms
    let mut gate: Port<u8> = Port::new(0x61);
    let mut cmd: Port<u8> = Port::new(0x43);
    let mut ch2: Port<u8> = Port::new(0x42);
    // SAFETY: ports 0x42/0x43/0x61 are the PIT and the system control port
    // B on every PC; channel 2 only drives the speaker, which stays off
    // (bit 1 of port 0x61 clear).
    let g = unsafe {
        let g = gate.read();
        gate.write((g & !0x02) | 0x01); // gate on, speaker off
        cmd.write(0b1011_0000); // channel 2, lobyte/hibyte, mode 0, binary
        ch2.write((START & 0xff) as u8);
        ch2.write((START >> 8) as u8);
        g
    };
    let tightest = (0..16).map(|_| pit_read(&mut cmd, &mut ch2).2).min().unwrap_or(u64::MAX);
    // 2 us at the slowest TSC this kernel accepts; an emulator's port exit
    // takes a few.
    let limit = tightest.saturating_mul(4).max(2_000);
    let tight = |cmd: &mut Port<u8>, ch2: &mut Port<u8>| (0..10_000).map(|_| pit_read(cmd, ch2)).find(|r| r.2 <= limit);
    let result = (|| {
        let first = tight(&mut cmd, &mut ch2)?;
        let mut last = first;
        let mut spins = 0u64;
        // Until SPAN counts have passed (bounded, for a PIT that is absent).
        while first.1.wrapping_sub(last.1) < SPAN && spins < 50_000_000 {
            last = pit_read(&mut cmd, &mut ch2);
            spins += 1;
        }
        let end = tight(&mut cmd, &mut ch2)?;
        let counted = first.1.wrapping_sub(end.1) as u64;
        (counted > 0 && end.0 > first.0)
            .then(|| ((end.0 - first.0) as u128 * PIT_HZ as u128 / counted as u128) as u64)
            .map(|hz| (hz, first.2 + end.2))
    })();
    // SAFETY: as above: the gate's old value back.
    unsafe { gate.write(g) };
    result
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
