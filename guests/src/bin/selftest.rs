//! The self-test booted as an ELF64 image (64-bit entry).
#![no_std]
#![no_main]

guests::entry!(guests::selftest::run);
