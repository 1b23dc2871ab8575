//! The host's hardware random numbers (RDRAND, SDM Vol. 2B RDRAND), the
//! source of the guests' virtio-rng devices.

use core::arch::x86_64::{__cpuid, _rdrand64_step};

/// Whether this CPU has RDRAND (CPUID.1:ECX[30]).
pub fn available() -> bool {
    __cpuid(1).ecx & (1 << 30) != 0
}

/// Fill `buf` from RDRAND; `false` if it kept failing (the DRNG is
/// momentarily out of entropy: Intel's DRNG guide says ten retries).
/// Only call when [`available`] said so.
pub fn fill(buf: &mut [u8]) -> bool {
    for chunk in buf.chunks_mut(8) {
        let mut v = 0u64;
        let mut ok = false;
        for _ in 0..10 {
            // SAFETY: RDRAND exists (the caller checked `available`); it
            // only writes `v`.
            if unsafe { _rdrand64_step(&mut v) } == 1 {
                ok = true;
                break;
            }
        }
        if !ok {
            return false;
        }
        chunk.copy_from_slice(&v.to_le_bytes()[..chunk.len()]);
    }
    true
}
