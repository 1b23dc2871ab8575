//! What the CPU is doing right now, for fault and panic reports.

use core::sync::atomic::{AtomicU32, Ordering};

/// The VM whose exit is being handled, or 0 when in the host's own code.
static CURRENT_VM: AtomicU32 = AtomicU32::new(0);

pub fn enter_vm(id: u32) {
    CURRENT_VM.store(id, Ordering::Relaxed);
}

pub fn leave_vm() {
    CURRENT_VM.store(0, Ordering::Relaxed);
}

pub struct Describe;

impl core::fmt::Display for Describe {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match CURRENT_VM.load(Ordering::Relaxed) {
            0 => write!(f, "host"),
            id => write!(f, "handling an exit of vm {id}"),
        }
    }
}

pub fn describe() -> Describe {
    Describe
}
