//! The hypervisor kernel. It only exists for `x86_64-unknown-none`; on the
//! host this binary just says how to build and run it.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("the hypervisor kernel runs on bare metal: use `cargo run -p boot -- run`");
}
