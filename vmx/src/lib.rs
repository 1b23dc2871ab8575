//! The Intel VT-x backend. It implements the neutral `vcpu::Vcpu` interface
//! on a VMCS; nothing outside this crate names a VMCS field.
//!
//! Host-testable logic (capabilities and control derivation, exit decoding,
//! guest-state checks, access-rights conversion, the CR2 switch) is separate from the thin
//! hardware layer (`hw`, `entry`, `cpu`, `vcpu`).
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod ar;
pub mod caps;
pub mod checks;
pub mod controls;
pub mod cpu;
pub mod cr2;
pub mod decode;
pub mod entry;
pub mod hw;
pub mod names;
pub mod vcpu;

pub use cpu::VmxCpu;
pub use vcpu::VmxVcpu;
