//! The MMIO instruction emulator on arbitrary instruction bytes, registers,
//! segment bases and faulting access. The checks live beside the emulator
//! (`hypervisor::emulator::fuzzing::check`, so its unit tests run the same
//! loop): no panic; on success a length of 1..=15, RIP moved by it, only
//! the registers the instruction names and the status flags changed, every
//! device access on the faulting page; on a refusal nothing changed.

pub fn emulator(data: &[u8]) {
    let _ = hypervisor::emulator::fuzzing::check(data);
}
