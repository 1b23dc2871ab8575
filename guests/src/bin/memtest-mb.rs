//! `guests::memtest` booted through Multiboot v1, so plain QEMU can run it
//! (`-kernel`): the guest of the QEMU-to-QEMU migration baseline
//! (`cargo run -p tests-qemu --bin qemu-migration-baseline`).
#![no_std]
#![no_main]

guests::multiboot_entry!();
guests::entry!(guests::memtest::main);
