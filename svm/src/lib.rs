//! The AMD-V (SVM) backend. It implements the neutral `vcpu::Vcpu` interface
//! on a VMCB; nothing outside this crate names a VMCB offset.
//!
//! Host-testable logic (the VMCB layout, exit decoding, the VMRUN
//! consistency checks, instruction-length decoding for CPUs without
//! next-RIP saving and the code reads it needs) is separate from the thin
//! hardware layer (`hw`, `entry`, `cpu`, `vcpu`).
//!
//! The `x86` crate knows neither the VMCB layout nor the SVM instructions,
//! so both are written here from AMD's manual (APM Vol. 2, chapter 15 and
//! appendix B).
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod checks;
pub mod code;
pub mod cpu;
pub mod decode;
pub mod entry;
pub mod fetch;
pub mod hw;
pub mod names;
pub mod vcpu;
pub mod vmcb;

pub use cpu::{SliceTimer, SvmCaps, SvmCpu};
pub use vcpu::SvmVcpu;
