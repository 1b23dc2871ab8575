//! Platform bring-up: the thin, hardware-facing layer of the kernel. Everything
//! here talks to real devices or CPU state; the logic it serves lives in the
//! library (`hypervisor::*`) where it is unit-tested on the host.

pub mod acpi;
pub mod apic;
pub mod cpu;
pub mod disk;
pub mod gdt;
pub mod idt;
pub mod logger;
pub mod mce;
pub mod memory;
pub mod mmio;
pub mod net;
pub mod pci;
pub mod power;
pub mod random;
pub mod rtc;
pub mod serial;
pub mod smp;
pub mod time;
