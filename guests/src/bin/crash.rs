//! Dies the hard way: with an empty IDT, an invalid opcode cannot be
//! delivered (#UD -> #GP -> #DF), so the CPU shuts down (triple fault). The
//! hypervisor must end only this VM, with a report.
#![no_std]
#![no_main]

use guests::{Boot, println};

fn main(_boot: Boot) -> u32 {
    println!("crash: loading an empty IDT and executing UD2");
    let idtr = [0u16; 5];
    // SAFETY: deliberately fatal for this guest.
    unsafe {
        core::arch::asm!("lidt [{}]", "ud2", in(reg) &idtr, options(nostack, noreturn));
    }
}

guests::entry!(main);
