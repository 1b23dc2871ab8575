//! CR2 isolation between VMs time-sliced on one CPU. The guest faults at an
//! unmapped address unique to its VM (from its VM id), then yields the CPU
//! with HLT, and checks after each fault and each yield that CR2 still holds
//! its own faulting address. CR2 is not part of the VMCS, so on VT-x the
//! hypervisor must switch it itself; if it does not, another VM's page fault
//! shows up here (an information leak between VMs).
//!
//! Command line: `rounds=<n>` (default 2000): fault, yield, check, n times.
//! Prints `cr2: halfway` after n/2 rounds (for tests that check two
//! instances really overlapped) and `cr2: PASS` or `cr2: FAIL ...`; exits
//! 0 or 1.
#![no_std]
#![no_main]

use guests::hypercall as hc;
use guests::io::{halt_once, hypercall, read_cr2, touch};
use guests::{Boot, println, trap};

/// 64 GiB: above the low 4 GiB the boot page tables map, so not present.
const FAULT_BASE: u64 = 0x10_0000_0000;

fn main(boot: Boot) -> u32 {
    let rounds = boot
        .cmdline()
        .split_whitespace()
        .find_map(|w| w.strip_prefix("rounds="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000u64)
        .max(1);
    let id = hypercall(hc::VM_ID, 0, 0);
    // One page per VM, and an offset that is not page-aligned, so a CR2
    // value from another VM (or a stale 0) can never match.
    let mine = FAULT_BASE + ((id & 0xffff) << 12) + 0x5a8;
    trap::install();
    println!("cr2: vm {id} faults at {mine:#x}, {rounds} rounds");
    let mut bad = 0u64;
    for round in 0..rounds {
        let vector = trap::probe(2, || touch(mine));
        let after_fault = read_cr2();
        // HLT with interrupts on: the hypervisor gives the CPU to the next
        // VM before it resumes this one.
        halt_once();
        let after_yield = read_cr2();
        if vector != Some(14) || after_fault != mine || after_yield != mine {
            if bad == 0 {
                println!(
                    "cr2: round {round}: fault {vector:?}, cr2 {after_fault:#x} after the fault, {after_yield:#x} after yielding (want {mine:#x})"
                );
            }
            bad += 1;
        }
        if round + 1 == rounds / 2 {
            println!("cr2: halfway ({} rounds, {bad} bad)", round + 1);
        }
    }
    if bad == 0 {
        println!("cr2: PASS ({rounds} rounds)");
        0
    } else {
        println!("cr2: FAIL ({bad} of {rounds} rounds saw another CR2)");
        1
    }
}

guests::entry!(main);
