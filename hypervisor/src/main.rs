//! The hypervisor kernel. It only exists for `x86_64-unknown-none`: on the host
//! this binary just says how to build and run it, so that `cargo test` on the
//! workspace can build the crate's library.
#![cfg_attr(target_os = "none", no_std, no_main)]
#![cfg_attr(target_os = "none", feature(abi_x86_interrupt))]

#[cfg(target_os = "none")]
extern crate alloc;

#[cfg(target_os = "none")]
mod platform;

#[cfg(target_os = "none")]
mod kernel;

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("the hypervisor kernel runs on bare metal: use `cargo run -p boot -- run`");
}
