//! Machine-check whole-system test: a guest that handles machine checks the
//! way an OS retires a bad page. Every output line starts with `mcetest:`;
//! the exit code is 0 on PASS, 1 on FAIL, 2 for a bad command line.
//!
//! It fills `pages=N` pages (default 64) from 4 MiB guest-physical with
//! words that depend on the page, the word and `seed=S`; switches machine
//! checks on (CR4.MCE, bank 0 enabled with MC0_CTL all ones, a #MC handler);
//! prints `mcetest: ready <first page> <pages>`; then serves COM1 (`vm
//! send`): `c` checks every page and goes on, `q` checks and exits.
//!
//! A check reads each page's first word under a probe. If that read takes a
//! machine check (the host poisoned the page), the guest prints the bank
//! (`machine check at <MC0_ADDR> status <MC0_STATUS> mcg <MCG_STATUS>`),
//! clears MCG_STATUS and the bank, and retires the page: it is never touched
//! again. Every other page is checked word by word. The result line:
//! `mcetest: check: <good> good, <retired> retired, <bad> bad: PASS|FAIL`
//! (PASS: no page had a wrong word).
#![no_std]
#![no_main]

use core::arch::asm;
use guests::io::{halt_once, inb, rdmsr, wrmsr};
use guests::{Boot, println, trap};

const PAGE: u64 = 4096;
const WORDS: u64 = PAGE / 8;
const BASE: u64 = 4 << 20;
const MAX_PAGES: u64 = 4096;
const MCG_STATUS: u32 = 0x17a;
const MC0_CTL: u32 = 0x400;
const MC0_STATUS: u32 = 0x401;
const MC0_ADDR: u32 = 0x402;
const CR4_MCE: u64 = 1 << 6;
const MC_VECTOR: u8 = 18;

fn content(seed: u64, p: u64, w: u64) -> u64 {
    (seed ^ (p << 20) ^ w).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1
}

/// One word at `addr`, read with an instruction of known length (`mov rax,
/// [rdi]`, 3 bytes) so a machine check's probe can step over it.
fn read_probed(addr: u64) -> (u64, Option<u8>) {
    let mut v = 0u64;
    let fault = trap::probe(3, || {
        // SAFETY: `addr` is guest RAM of this test's region (identity
        // mapped); a #MC there is caught by the probe.
        unsafe { asm!("mov rax, qword ptr [rdi]", in("rdi") addr, inout("rax") v, options(nostack)) };
    });
    (v, fault)
}

struct Pages {
    seed: u64,
    count: u64,
    retired: [bool; MAX_PAGES as usize],
}

impl Pages {
    fn addr(&self, p: u64, w: u64) -> u64 {
        BASE + p * PAGE + w * 8
    }

    fn fill(&self) {
        for p in 0..self.count {
            for w in 0..WORDS {
                // SAFETY: guest RAM of the region, identity mapped.
                unsafe { core::ptr::write_volatile(self.addr(p, w) as *mut u64, content(self.seed, p, w)) };
            }
        }
    }

    fn check(&mut self) -> bool {
        let (mut good, mut bad) = (0, 0);
        for p in 0..self.count {
            if self.retired[p as usize] {
                continue;
            }
            let (first, fault) = read_probed(self.addr(p, 0));
            match fault {
                Some(MC_VECTOR) => {
                    let (status, addr, mcg) = (rdmsr(MC0_STATUS), rdmsr(MC0_ADDR), rdmsr(MCG_STATUS));
                    println!(
                        "mcetest: machine check at {addr:#x} status {status:#018x} mcg {mcg:#x}: page {p} retired"
                    );
                    if addr & !(PAGE - 1) != self.addr(p, 0) {
                        println!("mcetest: the bank names {addr:#x}, not page {p} at {:#x}", self.addr(p, 0));
                        bad += 1;
                    }
                    wrmsr(MC0_STATUS, 0);
                    wrmsr(MCG_STATUS, 0);
                    self.retired[p as usize] = true;
                    continue;
                }
                Some(v) => {
                    println!("mcetest: unexpected fault {v} reading page {p}");
                    bad += 1;
                    continue;
                }
                None => {}
            }
            let mut ok = first == content(self.seed, p, 0);
            for w in 1..WORDS {
                // SAFETY: as in `fill`.
                ok &= unsafe { core::ptr::read_volatile(self.addr(p, w) as *const u64) } == content(self.seed, p, w);
            }
            if ok {
                good += 1;
            } else {
                println!("mcetest: page {p} at {:#x} holds wrong words", self.addr(p, 0));
                bad += 1;
            }
        }
        let retired = self.retired.iter().filter(|&&r| r).count();
        println!(
            "mcetest: check: {good} good, {retired} retired, {bad} bad: {}",
            if bad == 0 { "PASS" } else { "FAIL" }
        );
        bad == 0
    }
}

fn main(boot: Boot) -> u32 {
    let (mut count, mut seed) = (64u64, 0u64);
    for word in boot.cmdline().split_whitespace() {
        let parsed = match word.split_once('=') {
            Some(("pages", v)) => v.parse().map(|n| count = n).ok(),
            Some(("seed", v)) => v.parse().map(|n| seed = n).ok(),
            _ => None,
        };
        if parsed.is_none() || count == 0 || count > MAX_PAGES || BASE + count * PAGE > boot.ram_bytes() {
            println!("mcetest: error: bad option {word:?} (pages=1..{MAX_PAGES} within RAM, seed=S)");
            return 2;
        }
    }
    let mut pages = Pages { seed, count, retired: [false; MAX_PAGES as usize] };
    pages.fill();
    trap::install();
    wrmsr(MC0_CTL, u64::MAX);
    // SAFETY: CR4.MCE with the #MC gate installed: a machine check reaches
    // the probe's handler.
    unsafe {
        let mut cr4: u64;
        asm!("mov {}, cr4", out(reg) cr4, options(nomem, nostack));
        cr4 |= CR4_MCE;
        asm!("mov cr4, {}", in(reg) cr4, options(nomem, nostack));
    }
    println!("mcetest: ready {BASE:#x} {count}");
    loop {
        // LSR bit 0: data ready (16550).
        while inb(0x3fd) & 1 == 0 {
            halt_once();
        }
        match inb(0x3f8) {
            b'c' => {
                pages.check();
            }
            b'q' => return if pages.check() { 0 } else { 1 },
            _ => {}
        }
    }
}

guests::entry!(main);
