//! Guest SMP: the BSP finds how many CPUs it has (fw_cfg's NB_CPUS and the
//! MADT's processor entries must agree), starts every AP with INIT-SIPI-SIPI
//! through a real-mode trampoline (SDM Vol. 3A 9.4.4.1, 11.6.1), each AP
//! goes to 64-bit mode and reports in; every vCPU counts in its own memory;
//! every AP sends a fixed IPI to the BSP and the BSP one to every AP (each
//! handler counts), then one all-excluding-self broadcast; an atomic-
//! increment stress from all vCPUs must reach the exact total.
//!
//! With `hold=1` (for checkpoints of a VM with several vCPUs) the stress
//! is a run instead: after the IPI checks every AP increments the shared
//! counter and its own in a loop, without end, and the BSP prints
//! `smptest: holding until a byte arrives on COM1` and halts until one
//! does (`vm send`), the VM meanwhile saved and restored elsewhere. Once
//! released: every AP must still advance its count, the shared counter
//! must equal the sum of the APs' own once they stop (no increment lost
//! or doubled), and IPIs must still flow both ways.
//!
//! With `live=1` (for live saves and migrations of a VM whose vCPUs all
//! write memory) every vCPU, the BSP included, runs memtest's live pattern
//! on pages of its own (`guests::memtest::LiveWriter`: pages rewritten in
//! rounds behind a header word that says what each holds) without end.
//! The BSP reads COM1 every 16 pages: at `c` every vCPU checks its pages
//! against its header between two of its pages, and the BSP prints each
//! one's result (`smptest: live check N: vcpu i round r cursor c: agree`);
//! `q` does the same and ends the run. A copy of the VM that is not one
//! instant, or a dirty log that missed a write of any vCPU, shows as a
//! page that disagrees with its header.
//!
//! With `pingpong=N` (a benchmark) the BSP and AP 1, both spinning with
//! interrupts on, then bounce an IPI N times (BSP to AP 1, which answers
//! at once) and the BSP prints the round trip in TSC ticks (mean, least,
//! most) before the stress. With `halt=1` as well both wait for each
//! IPI halted (`sti; hlt`) instead of spinning, as an idle kernel does.
//!
//! With `tick=N` it is an idle guest instead (`tick_run`): N millisecond
//! ticks of its APIC timer, halted between them.
//!
//! With `x2apic=1` every vCPU switches its local APIC to x2APIC mode
//! first (CPUID must offer it; SDM Vol. 3A 11.12) and from then on reaches
//! it through MSRs: the ICR is one 64-bit MSR with a 32-bit destination,
//! and INIT, SIPI, the IPIs and EOIs all go that way.
//!
//! Prints one line per check and `smptest: PASS`/`FAIL`; exits 0 or 1.
#![no_std]
#![no_main]
#![feature(abi_x86_interrupt)]

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::SeqCst};
use guests::io::{cpuid, inb, rdmsr, rdtsc, wrmsr};
use guests::{Boot, println, trap};

/// Where the trampoline is copied: startup IPI vector 0x20 starts an AP
/// at 2000:0000, physical 0x20000 (free RAM below 640 KiB).
const TRAMP: u64 = 0x20000;
const SIPI_VECTOR: u32 = (TRAMP >> 12) as u32;
const LAPIC: u64 = 0xfee0_0000;
const IPI_VECTOR: u8 = 0x40;
const MAX_CPUS: usize = 8;
/// Increments per vCPU in the stress.
const STRESS: u64 = 100_000;
/// Writes per vCPU to its own counter.
const OWN: u64 = 10_000;

// The AP trampoline: entered in real mode at TRAMP (CS = TRAMP >> 4, IP = 0)
// in the state INIT leaves (SDM Vol. 3A 10.1.1, table 10-1); loads its own
// GDT, enters protected mode, then long mode with the BSP's page tables
// (the BSP patches tr_cr3, tr_stack and tr_entry before each SIPI), and
// calls tr_entry on tr_stack. Addresses inside are TRAMP-based.
global_asm!(
    ".section .rodata.smp_tramp, \"a\"",
    ".balign 16",
    ".global smp_tramp_start",
    "smp_tramp_start:",
    ".code16",
    "    cli",
    "    cld",
    "    movw %cs, %ax",
    "    movw %ax, %ds",
    "    lgdtl tr_gdtr - smp_tramp_start",
    "    movl %cr0, %eax",
    // Caches on (CD, NW clear), protection on.
    "    andl $0x9fffffff, %eax",
    "    orl $1, %eax",
    "    movl %eax, %cr0",
    "    ljmpl $0x18, $(0x20000 + tr_prot - smp_tramp_start)",
    ".code32",
    "tr_prot:",
    "    movw $0x10, %ax",
    "    movw %ax, %ds",
    "    movw %ax, %es",
    "    movw %ax, %ss",
    "    movl (0x20000 + tr_cr3 - smp_tramp_start), %eax",
    "    movl %eax, %cr3",
    "    movl %cr4, %eax",
    "    orl $0x20, %eax",
    "    movl %eax, %cr4",
    "    movl $0xC0000080, %ecx",
    "    rdmsr",
    "    orl $0x100, %eax",
    "    wrmsr",
    "    movl %cr0, %eax",
    "    orl $0x80000000, %eax",
    "    movl %eax, %cr0",
    "    ljmpl $0x08, $(0x20000 + tr_long - smp_tramp_start)",
    ".code64",
    "tr_long:",
    "    movw $0x10, %ax",
    "    movw %ax, %ds",
    "    movw %ax, %es",
    "    movw %ax, %ss",
    "    xorw %ax, %ax",
    "    movw %ax, %fs",
    "    movw %ax, %gs",
    "    movq tr_stack(%rip), %rsp",
    "    movq tr_entry(%rip), %rax",
    "    call *%rax",
    "1:  cli",
    "    hlt",
    "    jmp 1b",
    ".balign 8",
    "tr_gdt:",
    "    .quad 0",
    "    .quad 0x00af9b000000ffff",
    "    .quad 0x00cf93000000ffff",
    "    .quad 0x00cf9b000000ffff",
    "tr_gdtr:",
    "    .word 4 * 8 - 1",
    "    .long 0x20000 + tr_gdt - smp_tramp_start",
    ".balign 8",
    ".global tr_cr3",
    "tr_cr3: .quad 0",
    ".global tr_stack",
    "tr_stack: .quad 0",
    ".global tr_entry",
    "tr_entry: .quad 0",
    ".global smp_tramp_end",
    "smp_tramp_end:",
    ".text",
    options(att_syntax)
);

unsafe extern "C" {
    static smp_tramp_start: u8;
    static smp_tramp_end: u8;
    static tr_cr3: u8;
    static tr_stack: u8;
    static tr_entry: u8;
}

/// APs that reached `ap_main`.
static ALIVE: AtomicU32 = AtomicU32::new(0);
/// Fixed IPIs each vCPU's handler took, by APIC ID.
static IPIS: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(0) }; MAX_CPUS];
/// Each vCPU's own counter (plain writes: only its vCPU touches it).
static mut OWN_COUNT: [u64; MAX_CPUS] = [0; MAX_CPUS];
static OWN_DONE: AtomicU32 = AtomicU32::new(0);
static GO_IPI: AtomicBool = AtomicBool::new(false);
static GO_STRESS: AtomicBool = AtomicBool::new(false);
static SHARED: AtomicU64 = AtomicU64::new(0);
static STRESS_DONE: AtomicU32 = AtomicU32::new(0);
/// `hold=1`: the APs run until `STOP`; each counts its increments of
/// `SHARED` in `MINE`, and says when it is running and when it stopped.
static HOLD: AtomicBool = AtomicBool::new(false);
static MINE: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
static RUNNING: AtomicU32 = AtomicU32::new(0);
static STOP: AtomicBool = AtomicBool::new(false);
static STOPPED: AtomicU32 = AtomicU32::new(0);
/// Fixed IPIs each AP sends the BSP after the release, in turn.
static GO_IPI_AGAIN: AtomicBool = AtomicBool::new(false);
/// The BSP's IDTR, for the APs to load.
static IDTR: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];

#[repr(C, align(16))]
struct Stacks([[u8; 16384]; MAX_CPUS]);
static mut AP_STACKS: Stacks = Stacks([[0; 16384]; MAX_CPUS]);

/// What the CPU pushes for an interrupt in 64-bit mode (SDM Vol. 3A 7.14.4).
#[repr(C)]
struct Frame {
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

/// `x2apic=1`: the local APIC is in x2APIC mode, reached through MSRs.
static X2APIC: AtomicBool = AtomicBool::new(false);

/// IA32_APIC_BASE and its x2APIC enable bit (SDM Vol. 3A 11.12.1).
const APIC_BASE_MSR: u32 = 0x1b;
const APIC_BASE_EXTD: u64 = 1 << 10;

fn lapic_read(reg: u64) -> u32 {
    if X2APIC.load(SeqCst) {
        // Register at offset `reg` is MSR 0x800 + reg / 16 (Table 11-6).
        return rdmsr(0x800 + (reg >> 4) as u32) as u32;
    }
    // SAFETY: the local APIC page is identity-mapped; its registers are
    // 32-bit and read with one aligned access (SDM Vol. 3A 11.4.1).
    unsafe { core::ptr::read_volatile((LAPIC + reg) as *const u32) }
}

fn lapic_write(reg: u64, v: u32) {
    if X2APIC.load(SeqCst) {
        wrmsr(0x800 + (reg >> 4) as u32, u64::from(v));
        return;
    }
    // SAFETY: as for `lapic_read`.
    unsafe { core::ptr::write_volatile((LAPIC + reg) as *mut u32, v) }
}

/// Switches this vCPU's APIC to x2APIC mode (xAPIC to x2APIC is a legal
/// change, 11.12.5); whether it took.
fn enter_x2apic() -> bool {
    wrmsr(APIC_BASE_MSR, rdmsr(APIC_BASE_MSR) | APIC_BASE_EXTD);
    rdmsr(APIC_BASE_MSR) & APIC_BASE_EXTD != 0
}

fn apic_id() -> usize {
    if X2APIC.load(SeqCst) {
        // The x2APIC ID register is the whole 32-bit ID (11.12.5.1).
        return lapic_read(0x20) as usize;
    }
    (lapic_read(0x20) >> 24) as usize
}

/// Sends an IPI: ICR high (destination) first, then low, whose write sends
/// (SDM Vol. 3A 11.6.1); in x2APIC mode one write of both halves, the
/// destination in bits 63:32 (11.12.9).
fn send_ipi(dest: u32, low: u32) {
    if X2APIC.load(SeqCst) {
        wrmsr(0x830, (u64::from(dest) << 32) | u64::from(low));
        return;
    }
    lapic_write(0x310, dest << 24);
    lapic_write(0x300, low);
}

extern "x86-interrupt" fn ipi_handler(_f: Frame) {
    let id = apic_id();
    if let Some(c) = IPIS.get(id) {
        c.fetch_add(1, SeqCst);
    }
    lapic_write(0xb0, 0);
}

/// Local-APIC timer interrupts `tick_run` took.
static TICKS: AtomicU64 = AtomicU64::new(0);
const TICK_VECTOR: u8 = 0x41;

extern "x86-interrupt" fn tick_handler(_f: Frame) {
    TICKS.fetch_add(1, SeqCst);
    lapic_write(0xb0, 0);
}

/// `tick=N`: an idle guest, as a tickful kernel with nothing to do is. Its
/// APIC timer fires every millisecond (periodic, divide by 1, 10^6 counts
/// of the 1 GHz bus the hypervisor models) and it halts between the ticks,
/// N of them; then it prints how long they took on its TSC. Beside busy
/// VMs it is the VM whose slices end early (benchmarks of the scheduler).
/// With `spin=1` it is a busy one instead: it counts in a loop between the
/// ticks, as a kernel with work to do, and prints how far it counted (the
/// CPU time it got; each tick's EOI is an exit to the local APIC's page).
fn tick_run(n: u64, spin: bool) -> u32 {
    trap::set_handler(TICK_VECTOR, tick_handler as *const () as u64);
    // Software-enable the APIC (SVR bit 8), then the timer (SDM Vol. 3A
    // 11.5.4): divide by 1, periodic, the initial count last.
    lapic_write(0xf0, 0x1ff);
    lapic_write(0x3e0, 0xb);
    lapic_write(0x320, u32::from(TICK_VECTOR) | (1 << 17));
    let t0 = rdtsc();
    lapic_write(0x380, 1_000_000);
    let mut counted = 0u64;
    if spin {
        // SAFETY: the timer's vector has its handler.
        unsafe { asm!("sti", options(nomem, nostack)) };
        while TICKS.load(SeqCst) < n {
            counted = core::hint::black_box(counted + 1);
        }
    } else {
        while !halt_until(1, || TICKS.load(SeqCst) >= n) {}
    }
    lapic_write(0x380, 0);
    let how = if spin { "counted through" } else { "halted through" };
    println!("smptest: {n} timer ticks {how} in {} tsc ticks, {counted} counted", rdtsc() - t0);
    println!("smptest: PASS (ticks)");
    0
}

/// Spins until `done` or about `limit` iterations passed.
fn wait(limit: u64, done: impl Fn() -> bool) -> bool {
    for _ in 0..limit {
        if done() {
            return true;
        }
        core::hint::spin_loop();
    }
    done()
}

/// Halts with interrupts on until `done` (an IPI wakes it): `sti; hlt`
/// has no window between the check and the halt (the STI shadow). At most
/// `rounds` halts: the BSP, with no timer armed, is also woken at every
/// scheduling round, so a lost IPI ends in a FAIL, not a hang.
fn halt_until(rounds: u64, done: impl Fn() -> bool) -> bool {
    for _ in 0..rounds {
        // SAFETY: toggling IF in a guest that handles the IPI vector.
        unsafe { asm!("cli", options(nomem, nostack)) };
        if done() {
            // SAFETY: as above.
            unsafe { asm!("sti", options(nomem, nostack)) };
            return true;
        }
        // SAFETY: as above.
        unsafe { asm!("sti; hlt", options(nomem, nostack)) };
    }
    done()
}

fn count_own(id: usize) {
    for i in 0..OWN {
        // SAFETY: slot `id` is this vCPU's alone.
        unsafe { core::ptr::write_volatile(&raw mut OWN_COUNT[id], i + 1) };
    }
    OWN_DONE.fetch_add(1, SeqCst);
}

fn stress() {
    for _ in 0..STRESS {
        SHARED.fetch_add(1, SeqCst);
    }
    STRESS_DONE.fetch_add(1, SeqCst);
}

/// An AP's part of `hold=1`: increments until told to stop, then the
/// IPIs after the release: the BSP's (a third), then one back, in turn by
/// APIC ID as before.
fn hold_run(id: usize) {
    RUNNING.fetch_add(1, SeqCst);
    while !STOP.load(SeqCst) {
        SHARED.fetch_add(1, SeqCst);
        MINE[id].fetch_add(1, SeqCst);
    }
    STOPPED.fetch_add(1, SeqCst);
    halt_until(u64::MAX, || IPIS[id].load(SeqCst) >= 3);
    let before = IPI_BASE.load(SeqCst);
    wait(u64::MAX, || GO_IPI_AGAIN.load(SeqCst) && IPIS[0].load(SeqCst) + 1 >= before + id as u32);
    send_ipi(0, IPI_VECTOR as u32);
}

/// `live=1`: pages per vCPU (a header page and 255 data pages).
const LIVE_PAGES: u64 = 256;
/// Where vCPU 0's pages start (the others' follow): above the image.
const LIVE_BASE: u64 = 4 << 20;
/// APs that filled their pages and write on.
static LIVE_READY: AtomicU32 = AtomicU32::new(0);
/// The BSP's check requests, counted: each vCPU checks when it changes.
static LIVE_GEN: AtomicU32 = AtomicU32::new(0);
/// Set before the last request: the APs park after it.
static LIVE_QUIT: AtomicBool = AtomicBool::new(false);
/// Per vCPU: the request it last answered, whether its pages agreed then,
/// and its header's round and cursor.
static LIVE_DONE: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(0) }; MAX_CPUS];
static LIVE_AGREED: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];
static LIVE_AT: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

/// vCPU `id`'s live writer over its own pages.
fn live_writer(id: usize) -> Option<guests::memtest::LiveWriter> {
    let start = LIVE_BASE.max(guests::image_end().next_multiple_of(4096)) + id as u64 * LIVE_PAGES * 4096;
    // SAFETY: `live` checked that every vCPU's pages lie in RAM above the
    // image; each vCPU's are its own.
    unsafe { guests::memtest::LiveWriter::new(start, LIVE_PAGES, 0x5eed + id as u64) }
}

/// Answers check request `request` for vCPU `id` (see the module's `live=1`).
fn live_answer(id: usize, w: &guests::memtest::LiveWriter, request: u32) {
    let c = w.check();
    if !c.agrees() {
        c.report("smptest: live");
    }
    LIVE_AGREED[id].store(c.agrees(), SeqCst);
    LIVE_AT[id].store((c.round << 32) | c.cursor, SeqCst);
    LIVE_DONE[id].store(request, SeqCst);
}

/// An AP's part of `live=1`: writes its pages without end, checking them
/// at each request, until the last.
fn live_run(id: usize) {
    let Some(w) = live_writer(id) else { return };
    LIVE_READY.fetch_add(1, SeqCst);
    let mut seen = 0;
    loop {
        let request = LIVE_GEN.load(SeqCst);
        if request != seen {
            seen = request;
            live_answer(id, &w, request);
            if LIVE_QUIT.load(SeqCst) {
                return;
            }
        }
        w.step();
    }
}

/// The BSP's part of `live=1`, after the IPI checks.
fn live(c: &mut Checks, cpus: usize, ram: u64) {
    let end = LIVE_BASE.max(guests::image_end().next_multiple_of(4096)) + cpus as u64 * LIVE_PAGES * 4096;
    if end > ram {
        c.check("live pages fit in ram", false, format_args!("they end at {end:#x}, ram at {ram:#x}"));
        return;
    }
    LIVE.store(true, SeqCst);
    GO_STRESS.store(true, SeqCst);
    let Some(w) = live_writer(0) else { return };
    let aps = cpus as u32 - 1;
    let ready = wait(1 << 32, || LIVE_READY.load(SeqCst) == aps);
    c.check("every ap writes its pages", ready, format_args!("{} of {aps}", LIVE_READY.load(SeqCst)));
    println!("smptest: live: {cpus} vcpus rewriting {} pages each; c checks, q checks and exits", w.pages());
    let mut pages = 0u64;
    loop {
        w.step();
        pages += 1;
        if pages % 16 != 0 || inb(0x3fd) & 1 == 0 {
            continue;
        }
        let key = inb(0x3f8);
        if key != b'c' && key != b'q' {
            continue;
        }
        if key == b'q' {
            LIVE_QUIT.store(true, SeqCst);
        }
        let request = LIVE_GEN.fetch_add(1, SeqCst) + 1;
        live_answer(0, &w, request);
        let answered = wait(1 << 32, || (1..cpus).all(|i| LIVE_DONE[i].load(SeqCst) == request));
        for i in 0..cpus {
            let at = LIVE_AT[i].load(SeqCst);
            let agreed = LIVE_AGREED[i].load(SeqCst) && LIVE_DONE[i].load(SeqCst) == request;
            let verdict = if agreed { "agree" } else { "DISAGREE" };
            println!(
                "smptest: live check {request}: vcpu {i} round {} cursor {}: {verdict}",
                at >> 32,
                at & 0xffff_ffff
            );
        }
        let all = answered && (0..cpus).all(|i| LIVE_AGREED[i].load(SeqCst));
        c.check(
            "every vcpu's pages agree with its header",
            all,
            format_args!("check {request}{}", if answered { "" } else { ": not every vcpu answered" }),
        );
        if key == b'q' || !all {
            LIVE_QUIT.store(true, SeqCst);
            return;
        }
    }
}

/// `pingpong=N`: round trips asked for (0: none).
static PINGS: AtomicU32 = AtomicU32::new(0);

/// `halt=1`: pingpong waits halted.
static PING_HALTS: AtomicBool = AtomicBool::new(false);

/// Pingpong's wait for `done`: spinning (about `limit` iterations) or
/// halted (at most `limit >> 16` halts; each lasts until an interrupt).
fn ping_wait(limit: u64, done: impl Fn() -> bool) -> bool {
    if PING_HALTS.load(SeqCst) { halt_until(limit >> 16, done) } else { wait(limit, done) }
}

/// AP 1's part of `pingpong=N`: answers each IPI from the BSP with one.
fn pong_run() {
    let pings = PINGS.load(SeqCst);
    // Read before the BSP may ping (it waits for PONG_READY).
    let base = IPIS[1].load(SeqCst);
    PONG_READY.store(true, SeqCst);
    for i in 1..=pings {
        ping_wait(u64::MAX, || IPIS[1].load(SeqCst) >= base + i);
        send_ipi(0, IPI_VECTOR as u32);
    }
}

/// The BSP's part of `pingpong=N`: N round trips to AP 1, timed.
fn ping(c: &mut Checks, pings: u32) {
    let (mut total, mut least, mut most) = (0u64, u64::MAX, 0u64);
    // The first 256 round trips, for the median.
    let mut times = [0u64; 256];
    let base = IPIS[0].load(SeqCst);
    GO_PING.store(true, SeqCst);
    let ready = wait(1 << 32, || PONG_READY.load(SeqCst));
    let mut done = 0;
    for i in (1..=pings).take_while(|_| ready) {
        let t0 = rdtsc();
        send_ipi(1, IPI_VECTOR as u32);
        if !ping_wait(1 << 32, || IPIS[0].load(SeqCst) >= base + i) {
            break;
        }
        let t = rdtsc().wrapping_sub(t0);
        (total, least, most) = (total + t, least.min(t), most.max(t));
        if let Some(slot) = times.get_mut(i as usize - 1) {
            *slot = t;
        }
        done = i;
    }
    let kept = &mut times[..(done as usize).min(256)];
    kept.sort_unstable();
    let median = kept.get(kept.len() / 2).copied().unwrap_or(0);
    println!(
        "smptest: ipi round trip bsp -> ap 1 -> bsp: mean {} ticks, median {median}, least {least}, most {most} ({done} round trips)",
        total / u64::from(done.max(1))
    );
    c.check("every ipi round trip completed", done == pings, format_args!("{done} of {pings}"));
}

/// `pingpong=N`: AP 1 may start answering; it has read its count.
static GO_PING: AtomicBool = AtomicBool::new(false);
static PONG_READY: AtomicBool = AtomicBool::new(false);

/// `live=1`: the APs write pages instead of the stress.
static LIVE: AtomicBool = AtomicBool::new(false);

/// The BSP's IPI count when the IPIs after the release began.
static IPI_BASE: AtomicU32 = AtomicU32::new(0);

/// The BSP's part of `hold=1`, after the IPI checks: waits for every AP
/// to run, holds until a byte arrives on COM1, then checks the run.
fn hold(c: &mut Checks, cpus: usize) {
    HOLD.store(true, SeqCst);
    GO_STRESS.store(true, SeqCst);
    let aps = cpus as u32 - 1;
    let running = wait(1 << 32, || RUNNING.load(SeqCst) == aps);
    c.check("every ap runs", running, format_args!("{} of {aps}", RUNNING.load(SeqCst)));
    println!("smptest: holding until a byte arrives on COM1");
    // LSR bit 0: data ready (16550). The BSP halts meanwhile (woken at
    // every scheduling round, having no timer), the APs run.
    while inb(0x3fd) & 1 == 0 {
        // SAFETY: interrupts on with the IPI handler installed.
        unsafe { asm!("sti; hlt", options(nomem, nostack)) };
    }
    let key = inb(0x3f8);
    let at_release: [u64; MAX_CPUS] = core::array::from_fn(|i| MINE[i].load(SeqCst));
    println!("smptest: released by {key:#04x}");
    let went_on = wait(1 << 32, || (1..cpus).all(|i| MINE[i].load(SeqCst) >= at_release[i] + 1000));
    c.check(
        "every ap went on counting after the release",
        went_on,
        format_args!("{:?} at the release", &at_release[1..cpus]),
    );
    STOP.store(true, SeqCst);
    let stopped = wait(1 << 32, || STOPPED.load(SeqCst) == aps);
    let total = SHARED.load(SeqCst);
    let sum: u64 = (1..cpus).map(|i| MINE[i].load(SeqCst)).sum();
    println!("smptest: hold total {total}, the aps' own counts add up to {sum}");
    c.check(
        "atomic increments from every vcpu reach the exact total",
        stopped && total == sum && sum > 0,
        format_args!("{total}, want {sum}"),
    );
    // IPIs after the release: the BSP to each AP, each AP back in turn.
    IPI_BASE.store(IPIS[0].load(SeqCst), SeqCst);
    for ap in 1..cpus {
        send_ipi(ap as u32, IPI_VECTOR as u32);
    }
    GO_IPI_AGAIN.store(true, SeqCst);
    let base = IPI_BASE.load(SeqCst);
    halt_until(20_000, || IPIS[0].load(SeqCst) >= base + aps);
    let got = wait(1 << 28, || (1..cpus).all(|i| IPIS[i].load(SeqCst) >= 3));
    let counts: [u32; MAX_CPUS] = core::array::from_fn(|i| IPIS[i].load(SeqCst));
    c.check(
        "ipis flow both ways after the release",
        got && counts[0] == base + aps && (1..cpus).all(|i| counts[i] == 3),
        format_args!("{:?}", &counts[..cpus]),
    );
}

extern "C" fn ap_main() -> ! {
    let idtr = [IDTR[0].load(SeqCst), IDTR[1].load(SeqCst)];
    // SAFETY: the BSP's IDT, loaded as it stored it (10-byte pseudo-descriptor).
    unsafe { asm!("lidt [{}]", in(reg) idtr.as_ptr(), options(nostack)) };
    if X2APIC.load(SeqCst) && !enter_x2apic() {
        println!("smptest: FAIL an ap's apic did not enter x2apic mode");
    }
    // Software-enable the local APIC, spurious vector 0xff (SDM 11.4.7.1):
    // after INIT it accepts no fixed interrupts.
    lapic_write(0xf0, 0x1ff);
    let id = apic_id();
    let cpuid_id = (cpuid(1, 0).ebx >> 24) as usize;
    if cpuid_id != id {
        println!("smptest: FAIL ap apic id {id} but cpuid says {cpuid_id}");
    }
    ALIVE.fetch_add(1, SeqCst);
    count_own(id);
    // In turn, by APIC ID: two IPIs of one vector pending at the BSP at
    // once would set the same IRR bit (SDM Vol. 3A 11.8.4) and count once.
    wait(u64::MAX, || GO_IPI.load(SeqCst) && IPIS[0].load(SeqCst) as usize + 1 >= id);
    send_ipi(0, IPI_VECTOR as u32);
    // The BSP's IPI and its broadcast: two.
    halt_until(u64::MAX, || IPIS[id].load(SeqCst) >= 2);
    if id == 1 && PINGS.load(SeqCst) > 0 {
        wait(u64::MAX, || GO_PING.load(SeqCst));
        pong_run();
    }
    wait(u64::MAX, || GO_STRESS.load(SeqCst));
    if HOLD.load(SeqCst) {
        hold_run(id);
    } else if LIVE.load(SeqCst) {
        live_run(id);
    } else {
        stress();
    }
    loop {
        // SAFETY: parks this vCPU for good.
        unsafe { asm!("cli; hlt", options(nomem, nostack)) };
    }
}

/// fw_cfg's NB_CPUS (QEMU's fw_cfg interface: selector 0x510, data 0x511).
fn fw_cfg_cpus() -> u16 {
    // SAFETY: port I/O to fw_cfg; the selector is a 16-bit port.
    unsafe { asm!("out dx, ax", in("dx") 0x510u16, in("ax") 0x0005u16, options(nomem, nostack)) };
    u16::from_le_bytes([inb(0x511), inb(0x511)])
}

fn read_phys<T: Copy>(addr: u64) -> T {
    // SAFETY: low guest-physical memory is identity-mapped; callers read
    // ACPI tables the hypervisor put in the BIOS area and RAM.
    unsafe { core::ptr::read_unaligned(addr as *const T) }
}

/// Enabled processor local APIC entries in the MADT (ACPI 6.5 5.2.12),
/// found from the RSDP in 0xE0000-0xFFFFF through the RSDT.
fn madt_cpus() -> Option<u32> {
    let rsdp = (0xe0000u64..0x100000).step_by(16).find(|&a| read_phys::<[u8; 8]>(a) == *b"RSD PTR ")?;
    let rsdt = read_phys::<u32>(rsdp + 16) as u64;
    let len = read_phys::<u32>(rsdt + 4) as u64;
    let madt = (rsdt + 36..rsdt + len)
        .step_by(4)
        .map(|e| read_phys::<u32>(e) as u64)
        .find(|&t| read_phys::<[u8; 4]>(t) == *b"APIC")?;
    let end = madt + read_phys::<u32>(madt + 4) as u64;
    let (mut at, mut n) = (madt + 44, 0);
    while at + 2 <= end {
        let (kind, elen) = (read_phys::<u8>(at), read_phys::<u8>(at + 1) as u64);
        if elen < 2 {
            return None;
        }
        if kind == 0 && read_phys::<u32>(at + 4) & 1 != 0 {
            n += 1;
        }
        at += elen;
    }
    Some(n)
}

struct Checks {
    failed: u32,
    total: u32,
}

impl Checks {
    fn check(&mut self, name: &str, ok: bool, detail: core::fmt::Arguments) {
        self.total += 1;
        if ok {
            println!("smptest: ok   {name}");
        } else {
            self.failed += 1;
            println!("smptest: FAIL {name}: {detail}");
        }
    }
}

fn main(boot: Boot) -> u32 {
    let mut c = Checks { failed: 0, total: 0 };
    let hold_mode = boot.cmdline().split_whitespace().any(|w| w == "hold=1");
    let live_mode = boot.cmdline().split_whitespace().any(|w| w == "live=1");
    let pings =
        boot.cmdline().split_whitespace().find_map(|w| w.strip_prefix("pingpong=")?.parse::<u32>().ok()).unwrap_or(0);
    // Before any AP starts: each reads it once its IPI checks are done.
    // Only beside the stress (`hold=1` and `live=1` have their own runs).
    let pings = if hold_mode || live_mode { 0 } else { pings };
    PINGS.store(pings, SeqCst);
    PING_HALTS.store(boot.cmdline().split_whitespace().any(|w| w == "halt=1"), SeqCst);
    if boot.cmdline().split_whitespace().any(|w| w == "x2apic=1") {
        let offered = cpuid(1, 0).ecx & (1 << 21) != 0;
        let entered = offered && enter_x2apic();
        c.check("cpuid offers x2apic and the apic enters x2apic mode", entered, format_args!("cpuid {offered}"));
        X2APIC.store(entered, SeqCst);
    }
    let cpus = fw_cfg_cpus() as usize;
    let madt = madt_cpus();
    println!("smptest: {cpus} cpus (fw_cfg), {madt:?} in the MADT");
    c.check("fw_cfg and the madt agree", madt == Some(cpus as u32), format_args!("{cpus} vs {madt:?}"));
    c.check("bsp has apic id 0", apic_id() == 0, format_args!("{}", apic_id()));
    if !(1..=MAX_CPUS).contains(&cpus) {
        println!("smptest: FAIL cpu count {cpus}");
        return 1;
    }
    trap::install();
    trap::set_handler(IPI_VECTOR, ipi_handler as *const () as u64);
    if let Some(n) = boot.cmdline().split_whitespace().find_map(|w| w.strip_prefix("tick=")?.parse::<u64>().ok()) {
        let spin = boot.cmdline().split_whitespace().any(|w| w == "spin=1");
        return tick_run(n, spin);
    }
    let mut idtr = [0u64; 2];
    // SAFETY: SIDT stores 10 bytes into `idtr`.
    unsafe { asm!("sidt [{}]", in(reg) idtr.as_mut_ptr(), options(nostack)) };
    IDTR[0].store(idtr[0], SeqCst);
    IDTR[1].store(idtr[1], SeqCst);

    // SAFETY: the trampoline's symbols are in this image; TRAMP is free RAM
    // below 1 MiB that nothing else uses; the patched slots are inside it.
    unsafe {
        let start = &raw const smp_tramp_start as u64;
        let len = &raw const smp_tramp_end as u64 - start;
        core::ptr::copy_nonoverlapping(start as *const u8, TRAMP as *mut u8, len as usize);
        let slot = |sym: *const u8| (TRAMP + (sym as u64 - start)) as *mut u64;
        let cr3: u64;
        asm!("mov {}, cr3", out(reg) cr3, options(nomem, nostack));
        slot(&raw const tr_cr3).write_volatile(cr3);
        slot(&raw const tr_entry).write_volatile(ap_main as *const () as u64);
    }
    for ap in 1..cpus {
        // SAFETY: stack `ap` is this AP's alone; the slot is read by the
        // AP the SIPI below starts, before the next AP is started.
        unsafe {
            let top = (&raw mut AP_STACKS) as u64 + (ap as u64 + 1) * 16384;
            let start = &raw const smp_tramp_start as u64;
            ((TRAMP + (&raw const tr_stack as u64 - start)) as *mut u64).write_volatile(top);
        }
        // INIT (assert), then two startup IPIs (SDM Vol. 3A 9.4.4.1; the
        // second is ignored by an AP already started).
        send_ipi(ap as u32, 0x4500);
        send_ipi(ap as u32, 0x0600 | SIPI_VECTOR);
        send_ipi(ap as u32, 0x0600 | SIPI_VECTOR);
        let up = wait(1 << 32, || ALIVE.load(SeqCst) >= ap as u32);
        c.check("ap started in 64-bit mode", up, format_args!("ap {ap} did not report in"));
        if !up {
            break;
        }
    }
    let aps = ALIVE.load(SeqCst);
    println!("smptest: {aps} aps started");
    c.check("every ap started", aps as usize == cpus - 1, format_args!("{aps} of {}", cpus - 1));

    count_own(0);
    let counted = wait(1 << 32, || OWN_DONE.load(SeqCst) as usize == cpus);
    // SAFETY: every vCPU finished writing its slot (OWN_DONE).
    let own = unsafe { core::ptr::read_volatile(&raw const OWN_COUNT) };
    c.check(
        "each vcpu counted in its own memory",
        counted && own[..cpus].iter().all(|&v| v == OWN),
        format_args!("{:?}", &own[..cpus]),
    );

    // IPIs: each AP to the BSP; the BSP to each AP; then one broadcast.
    // SAFETY: the IPI handler is installed.
    unsafe { asm!("sti", options(nomem, nostack)) };
    GO_IPI.store(true, SeqCst);
    let want = cpus as u32 - 1;
    halt_until(20_000, || IPIS[0].load(SeqCst) >= want);
    c.check(
        "every ap sent the bsp an ipi",
        IPIS[0].load(SeqCst) == want,
        format_args!("{} of {want}", IPIS[0].load(SeqCst)),
    );
    for ap in 1..cpus {
        send_ipi(ap as u32, IPI_VECTOR as u32);
    }
    // A second IPI of the same vector before the first is taken would
    // only set the same IRR bit again (SDM Vol. 3A 11.8.4): wait first.
    let first = wait(1 << 28, || (1..cpus).all(|i| IPIS[i].load(SeqCst) >= 1));
    // All excluding self (ICR shorthand 11b).
    send_ipi(0, (3 << 18) | IPI_VECTOR as u32);
    let got = first && wait(1 << 28, || (1..cpus).all(|i| IPIS[i].load(SeqCst) >= 2));
    let counts: [u32; MAX_CPUS] = core::array::from_fn(|i| IPIS[i].load(SeqCst));
    c.check(
        "the bsp's ipi and broadcast reached every ap",
        got && (1..cpus).all(|i| counts[i] == 2) && counts[0] == want,
        format_args!("{:?}", &counts[..cpus]),
    );

    if hold_mode {
        hold(&mut c, cpus);
        return verdict(&c, cpus);
    }
    if live_mode {
        live(&mut c, cpus, boot.ram_bytes());
        return verdict(&c, cpus);
    }
    if pings > 0 && cpus > 1 {
        ping(&mut c, pings);
    }
    GO_STRESS.store(true, SeqCst);
    stress();
    let done = wait(1 << 32, || STRESS_DONE.load(SeqCst) as usize == cpus);
    let total = SHARED.load(SeqCst);
    println!("smptest: stress total {total}");
    c.check(
        "atomic increments from every vcpu reach the exact total",
        done && total == STRESS * cpus as u64,
        format_args!("{total}, want {}", STRESS * cpus as u64),
    );
    verdict(&c, cpus)
}

fn verdict(c: &Checks, cpus: usize) -> u32 {
    if c.failed == 0 {
        println!("smptest: PASS ({} checks, {cpus} vcpus)", c.total);
        0
    } else {
        println!("smptest: FAIL ({} of {} checks)", c.failed, c.total);
        1
    }
}

guests::entry!(main);
