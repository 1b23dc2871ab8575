//! Memory-manager whole-system test (`guests::memtest`), entered in 64-bit
//! mode by the hypervisor's ELF loader.
#![no_std]
#![no_main]

guests::entry!(guests::memtest::main);
