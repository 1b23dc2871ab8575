//! The self-test booted through Multiboot v1 (32-bit protected-mode entry),
//! with extra checks of the Multiboot information structure.
#![no_std]
#![no_main]

guests::multiboot_entry!();
guests::entry!(guests::selftest::run);
