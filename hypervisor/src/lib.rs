//! Hardware-independent logic of the hypervisor: everything here builds and
//! unit-tests on the host with `cargo test`.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod frame_bitmap;
pub mod acpi_sleep;
pub mod loader;
