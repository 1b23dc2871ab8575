//! Exit round-trip benchmark: N exits each of CPUID, VMCALL (VMMCALL on AMD)
//! and port I/O to
//! an in-hypervisor device (the UART scratch register), timed with RDTSC in
//! the guest. Under Bochs with `clock: sync=none` the TSC counts emulated
//! instructions, so "ticks per exit" is the instruction path length of one
//! exit, entry included, and repeats exactly.
//!
//! Command line: `n=<count>` (default 10000); `mmio=1` adds a row of
//! 32-bit reads of a device register in guest-physical memory (PCI
//! configuration space through ECAM, at 0xe000_0000: device 00:00.0's
//! vendor and device ID): a nested page fault the hypervisor decodes and
//! emulates, which on a CPU other than the boot CPU is a host call.
#![no_std]
#![no_main]

use guests::hypercall as hc;
use guests::io::{cpuid, hypercall, inb, outb, rdtsc};
use guests::{Boot, println};

fn measure(n: u64, mut f: impl FnMut()) -> u64 {
    let t0 = rdtsc();
    for _ in 0..n {
        f();
    }
    rdtsc() - t0
}

fn main(boot: Boot) -> u32 {
    let n = boot
        .cmdline()
        .split_whitespace()
        .find_map(|w| w.strip_prefix("n="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000u64)
        .max(1);
    let word = |key: &str| boot.cmdline().split_whitespace().any(|w| w == key);
    let mmio = word("mmio=1");
    let empty = measure(n, || core::hint::black_box(()));
    let hypercall_name = if guests::io::amd() { "vmmcall" } else { "vmcall" };
    let rows: [(&str, u64); 4] = [
        (
            "cpuid",
            measure(n, || {
                core::hint::black_box(cpuid(0, 0));
            }),
        ),
        (
            hypercall_name,
            measure(n, || {
                core::hint::black_box(hypercall(hc::PING, 0, 0));
            }),
        ),
        ("outb", measure(n, || outb(0x3ff, 0x42))),
        (
            "inb",
            measure(n, || {
                core::hint::black_box(inb(0x3ff));
            }),
        ),
    ];
    // The host bridge's vendor and device ID, through ECAM.
    const ECAM: *const u32 = 0xe000_0000 as *const u32;
    let ecam = mmio.then(|| {
        measure(n, || {
            // SAFETY: the low 4 GiB are identity-mapped (the boot
            // contract) and ECAM is the hypervisor's device page there:
            // the read exits and is emulated.
            core::hint::black_box(unsafe { ECAM.read_volatile() });
        })
    });
    println!("exitbench: n={n}, loop overhead {} ticks/iteration", empty / n);
    for (name, total) in rows.into_iter().chain(ecam.map(|t| ("ecam", t))) {
        let per = total.saturating_sub(empty) / n;
        println!("exitbench: {name:<6} {per} ticks/exit");
    }
    0
}

guests::entry!(main);
