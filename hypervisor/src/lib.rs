//! Hardware-independent logic of the hypervisor: everything here builds and
//! unit-tests on the host with `cargo test`.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod acpi;
pub mod backend;
pub mod boot_config;
pub mod cpuid;
pub mod devices;
pub mod disk;
pub mod emulator;
pub mod firmware;
pub mod hostnet;
pub mod hypercall;
pub mod loader;
pub mod manager;
pub mod mca;
pub mod memory;
pub mod msr;
pub mod net;
pub mod numa;
pub mod pci;
pub mod vm;

/// Per-exit tracing hook (compiled out unless the `trace-exits` feature is
/// on, so the exit path pays nothing for it).
#[inline(always)]
pub fn trace_exit(_vm: u32, _exit: &vcpu::VmExit) {
    #[cfg(feature = "trace-exits")]
    log::trace!("vm {_vm}: {_exit:?}");
}
pub mod console;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
