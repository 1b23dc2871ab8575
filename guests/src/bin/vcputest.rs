//! The vCPU model seen from a guest: event delivery and the exits the
//! hypervisor emulates.
//!
//! Events: interrupts queued by hypercall while RFLAGS.IF = 0 are not
//! delivered, across exits, until IF = 1 and the STI shadow has ended (the
//! handler sees the instruction after STI completed and returns to the one
//! after it); two queued vectors arrive in order; an interrupt queued
//! before an injected #GP still arrives (the second event did not
//! overwrite the first); an NMI queued inside the NMI handler waits for its
//! IRET. Exits: WRMSR of the TSC moves RDTSC (the TSC offset), RDTSCP reads
//! TSC_AUX (or both are hidden and refused), MOV DR reads back what was
//! written and DR7.GD raises #DB, XSETBV takes x87|SSE and refuses AVX,
//! WBINVD and INVD complete, MONITOR and MWAIT raise #UD. Timer: PIT
//! interrupts through the 8259 reach a guest that spins without exits,
//! also right after a stretch of exits (when the host's slice timer is
//! likely to fire while the host handles one); none interrupts a handler
//! that runs for milliseconds with IF = 0 (each is delivered once).
//!
//! Prints one line per check and `vcputest: PASS`/`FAIL`; exits 0 or 1.
#![no_std]
#![no_main]
#![feature(abi_x86_interrupt)]

use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering::SeqCst};
use guests::hypercall as hc;
use guests::io::{cpuid, hypercall, outb, rdmsr, rdtsc, wrmsr};
use guests::{Boot, println, trap};

/// What the CPU pushes for an interrupt in 64-bit mode (SDM Vol. 3A 7.14.4).
#[repr(C)]
struct Frame {
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

const V1: u8 = 0x40;
const V2: u8 = 0x41;

/// Deliveries: count, the vectors in order (4 bits each), the last frame's
/// RIP and RFLAGS, and `IN_SHADOW` as the handler saw it.
static COUNT: AtomicU64 = AtomicU64::new(0);
static ORDER: AtomicU64 = AtomicU64::new(0);
static LAST_RIP: AtomicU64 = AtomicU64::new(0);
static LAST_RFLAGS: AtomicU64 = AtomicU64::new(0);
static SHADOW_SEEN: AtomicU64 = AtomicU64::new(0);
/// Written by the instruction in the STI shadow.
static IN_SHADOW: AtomicU64 = AtomicU64::new(0);

static NMIS: AtomicU64 = AtomicU64::new(0);
static IN_NMI: AtomicU64 = AtomicU64::new(0);
static NESTED_NMIS: AtomicU64 = AtomicU64::new(0);

fn record(vector: u8, f: &Frame) {
    let n = COUNT.fetch_add(1, SeqCst);
    ORDER.fetch_or(((vector & 0xf) as u64) << (4 * n.min(15)), SeqCst);
    LAST_RIP.store(f.rip, SeqCst);
    LAST_RFLAGS.store(f.rflags, SeqCst);
    SHADOW_SEEN.store(IN_SHADOW.load(SeqCst), SeqCst);
}

extern "x86-interrupt" fn irq1(f: Frame) {
    record(V1, &f);
}

extern "x86-interrupt" fn irq2(f: Frame) {
    record(V2, &f);
}

extern "x86-interrupt" fn nmi(_f: Frame) {
    if IN_NMI.swap(1, SeqCst) != 0 {
        NESTED_NMIS.fetch_add(1, SeqCst);
    }
    if NMIS.fetch_add(1, SeqCst) == 0 {
        // A second NMI while this handler runs: it must wait for the IRET,
        // whatever exits happen meanwhile.
        hypercall(hc::QUEUE_NMI, 0, 0);
        for _ in 0..20 {
            core::hint::black_box(cpuid(0, 0));
        }
    }
    IN_NMI.store(0, SeqCst);
}

fn cli() {
    // SAFETY: only masks interrupts.
    unsafe { asm!("cli", options(nomem, nostack)) };
}

/// STI, one instruction in its shadow (a store), then CLI; returns the CLI's
/// address. An interrupt that waits for IF arrives right before the CLI.
fn sti_window() -> u64 {
    let cli_at: u64;
    IN_SHADOW.store(0, SeqCst);
    // SAFETY: interrupts are enabled for one instruction's shadow and the
    // boundary after it; the handlers installed preserve every register.
    unsafe {
        asm!(
            "lea {at}, [rip + 3f]",
            "sti",
            "mov qword ptr [{flag}], 1",
            "3:",
            "cli",
            at = out(reg) cli_at,
            flag = in(reg) IN_SHADOW.as_ptr(),
            options(nostack),
        )
    };
    cli_at
}

/// A few exits of different kinds while interrupts stay masked.
fn exits_with_if_clear() {
    for _ in 0..5 {
        core::hint::black_box(cpuid(1, 0));
        outb(0x80, 0);
        core::hint::black_box(hypercall(hc::PING, 0, 0));
    }
}

struct Checks {
    failed: u32,
    total: u32,
}

impl Checks {
    fn check(&mut self, name: &str, ok: bool, detail: core::fmt::Arguments) {
        self.total += 1;
        if ok {
            println!("vcputest: ok   {name}");
        } else {
            self.failed += 1;
            println!("vcputest: FAIL {name}: {detail}");
        }
    }
}

fn events(c: &mut Checks) {
    trap::set_handler(V1, irq1 as *const () as u64);
    trap::set_handler(V2, irq2 as *const () as u64);
    trap::set_handler(2, nmi as *const () as u64);

    cli();
    hypercall(hc::QUEUE_INTERRUPT, V1 as u64, 0);
    exits_with_if_clear();
    let before = COUNT.load(SeqCst);
    c.check("no interrupt while IF = 0, across exits", before == 0, format_args!("{before} delivered"));
    let cli_at = sti_window();
    let (n, rip, rflags, shadow) =
        (COUNT.load(SeqCst), LAST_RIP.load(SeqCst), LAST_RFLAGS.load(SeqCst), SHADOW_SEEN.load(SeqCst));
    c.check(
        "interrupt delivered after the STI shadow",
        n == 1 && rip == cli_at && shadow == 1 && rflags & (1 << 9) != 0,
        format_args!("count {n}, at rip {rip:#x} (cli at {cli_at:#x}), shadow store seen {shadow}, rflags {rflags:#x}"),
    );

    COUNT.store(0, SeqCst);
    ORDER.store(0, SeqCst);
    hypercall(hc::QUEUE_INTERRUPT, V2 as u64, 0);
    hypercall(hc::QUEUE_INTERRUPT, V1 as u64, 0);
    exits_with_if_clear();
    let cli_at = sti_window();
    let (n, order, rip) = (COUNT.load(SeqCst), ORDER.load(SeqCst), LAST_RIP.load(SeqCst));
    c.check(
        "two queued interrupts, in order, one per window",
        n == 2 && order == ((V1 as u64 & 0xf) << 4 | (V2 as u64 & 0xf)) && rip == cli_at,
        format_args!("count {n}, order {order:#x}, last at {rip:#x} (cli at {cli_at:#x})"),
    );

    COUNT.store(0, SeqCst);
    hypercall(hc::QUEUE_INTERRUPT, V1 as u64, 0);
    let gp = trap::probe(2, || {
        rdmsr(0x1234_5678);
    });
    let early = COUNT.load(SeqCst);
    sti_window();
    let n = COUNT.load(SeqCst);
    c.check(
        "an exception after a queued interrupt does not replace it",
        gp == Some(13) && early == 0 && n == 1,
        format_args!("fault {gp:?}, {early} delivered before STI, {n} after"),
    );

    hypercall(hc::QUEUE_NMI, 0, 0);
    let mut spins = 0;
    while NMIS.load(SeqCst) < 2 && spins < 1000 {
        core::hint::black_box(cpuid(0, 0));
        spins += 1;
    }
    let (nmis, nested) = (NMIS.load(SeqCst), NESTED_NMIS.load(SeqCst));
    c.check(
        "an NMI queued in the NMI handler waits for its IRET",
        nmis == 2 && nested == 0,
        format_args!("{nmis} NMIs, {nested} nested"),
    );
}

/// The PIC's vector base for IRQ 0-7, and the PIT's count for 1 kHz.
const PIC_BASE: u8 = 0x20;
const PIT_1KHZ: u16 = 1193;
/// How long a spin waits for one 1 ms tick before calling it lost: 2^32
/// TSC ticks (over a second at any TSC rate these emulators give).
const SPIN_LIMIT: u64 = 1 << 32;
const TIMER_ROUNDS: u32 = 200;

static TICKS: AtomicU64 = AtomicU64::new(0);

extern "x86-interrupt" fn pit_tick(_f: Frame) {
    TICKS.fetch_add(1, SeqCst);
    outb(0x20, 0x20); // non-specific EOI
}

fn wait_tick_with_exits() {
    let t = TICKS.load(SeqCst);
    while TICKS.load(SeqCst) == t {
        outb(0x80, 0);
    }
}

/// Spins without a single exit until the next tick; false if it never came.
fn wait_tick_without_exits() -> bool {
    let t = TICKS.load(SeqCst);
    let start = rdtsc();
    while TICKS.load(SeqCst) == t {
        if rdtsc().wrapping_sub(start) > SPIN_LIMIT {
            return false;
        }
        core::hint::spin_loop();
    }
    true
}

fn timer(c: &mut Checks) {
    trap::set_handler(PIC_BASE, pit_tick as *const () as u64);
    // 8259 pair: ICW1 (edge, cascade, ICW4), ICW2 vector base, ICW3 wiring,
    // ICW4 8086 mode; then mask all but IRQ 0.
    for (cmd, data, base, wiring, mask) in [(0x20, 0x21, PIC_BASE, 0x04, 0xfe), (0xa0, 0xa1, PIC_BASE + 8, 0x02, 0xff)]
    {
        outb(cmd, 0x11);
        outb(data, base);
        outb(data, wiring);
        outb(data, 0x01);
        outb(data, mask);
    }
    // Counter 0, low then high byte, mode 2 (rate generator).
    outb(0x43, 0x34);
    outb(0x40, PIT_1KHZ as u8);
    outb(0x40, (PIT_1KHZ >> 8) as u8);
    // SAFETY: the only unmasked interrupt is IRQ 0, whose handler is set.
    unsafe { asm!("sti", options(nomem, nostack)) };
    let mut lost_at = None;
    for round in 0..TIMER_ROUNDS {
        wait_tick_with_exits();
        if !wait_tick_without_exits() {
            lost_at = Some(round);
            break;
        }
    }
    cli();
    let ticks = TICKS.load(SeqCst);
    c.check(
        "pit ticks reach a guest spinning without exits",
        lost_at.is_none() && ticks >= 2 * u64::from(TIMER_ROUNDS),
        format_args!("{ticks} ticks; no tick for 2^32 TSC ticks in round {lost_at:?} of {TIMER_ROUNDS}"),
    );
    slow_ticks(c);
}

/// Ticks the slow handler took, and those that arrived with IF clear.
static SLOW_TICKS: AtomicU64 = AtomicU64::new(0);
static IF_CLEAR: AtomicU64 = AtomicU64::new(0);
static IF_CLEAR_RIP: AtomicU64 = AtomicU64::new(0);
/// TSC ticks the slow handler spins.
static SLOW_SPIN: AtomicU64 = AtomicU64::new(0);
/// Slow ticks to take (`slow=N` on the command line).
static SLOW_WANTED: AtomicU64 = AtomicU64::new(150);

/// A PIT tick handler that runs about 3 ms with IF clear and no exits. An
/// interrupt that interrupts code running with IF = 0 was delivered twice
/// (or against the guest's mask): counted.
extern "x86-interrupt" fn slow_tick(f: Frame) {
    if f.rflags & (1 << 9) == 0 {
        IF_CLEAR.fetch_add(1, SeqCst);
        IF_CLEAR_RIP.store(f.rip, SeqCst);
    }
    let n = SLOW_TICKS.fetch_add(1, SeqCst) + 1;
    let start = rdtsc();
    let spin = SLOW_SPIN.load(SeqCst);
    while rdtsc().wrapping_sub(start) < spin {
        core::hint::spin_loop();
    }
    // At 1 kHz the next tick is due when this one ends, so the code outside
    // does not run until the ticks stop.
    if n >= SLOW_WANTED.load(SeqCst) {
        outb(0x21, 0xff);
    }
    outb(0x20, 0x20);
}

/// Ticks whose handler is long: every injected interrupt is followed by
/// milliseconds of guest code with IF = 0. An emulator that keeps the
/// injected vector pending after delivering it (QEMU 7.2's TCG,
/// `SvmCpu::nudge_after_interrupt`) delivers it again when something asks
/// its loop to stop before the next exit; under QEMU with two CPUs, without
/// the nudge, 1500 ticks (`slow=1500`, about 5 s) caught that twice.
fn slow_ticks(c: &mut Checks) {
    // The TSC's rate against the 1 kHz PIT, over 10 ticks.
    // SAFETY: IRQ 0 is the only unmasked interrupt; `pit_tick` handles it.
    unsafe { asm!("sti", options(nomem, nostack)) };
    wait_tick_with_exits();
    let t0 = rdtsc();
    for _ in 0..10 {
        wait_tick_with_exits();
    }
    cli();
    SLOW_SPIN.store(rdtsc().wrapping_sub(t0) / 10 * 3, SeqCst);
    trap::set_handler(PIC_BASE, slow_tick as *const () as u64);
    let wanted = SLOW_WANTED.load(SeqCst);
    // SAFETY: IRQ 0 is the only unmasked interrupt, its handler is set.
    unsafe { asm!("sti", options(nomem, nostack)) };
    // The handler masks the PIT after the last tick; the bound is for a
    // PIT that stops early.
    let start = rdtsc();
    while SLOW_TICKS.load(SeqCst) < wanted && rdtsc().wrapping_sub(start) < SPIN_LIMIT {
        core::hint::spin_loop();
    }
    cli();
    outb(0x21, 0xff);
    let (n, bad) = (SLOW_TICKS.load(SeqCst), IF_CLEAR.load(SeqCst));
    c.check(
        "no interrupt arrives while a long handler runs with IF = 0",
        n >= wanted && bad == 0,
        format_args!(
            "{n} of {wanted} slow ticks, {bad} with IF clear (last at rip {:#x}, handler {:#x})",
            IF_CLEAR_RIP.load(SeqCst),
            slow_tick as *const () as u64
        ),
    );
}

fn rdtscp() -> (u64, u32) {
    let (lo, hi, aux): (u32, u32, u32);
    // SAFETY: RDTSCP reads the TSC and TSC_AUX (or raises #UD, which the
    // caller probes for).
    unsafe { asm!("rdtscp", out("eax") lo, out("edx") hi, out("ecx") aux, options(nomem, nostack)) };
    ((hi as u64) << 32 | lo as u64, aux)
}

fn read_dr0() -> u64 {
    let v: u64;
    // SAFETY: MOV RAX, DR0 (0f 21 c0: 3 bytes, as `trap::probe` is told);
    // it exits or faults.
    unsafe { asm!("mov rax, dr0", out("rax") v, options(nomem, nostack)) };
    v
}

fn read_dr(n: u8) -> u64 {
    let v: u64;
    // SAFETY: MOV from a debug register; it exits.
    unsafe {
        match n {
            6 => asm!("mov {}, dr6", out(reg) v, options(nomem, nostack)),
            7 => asm!("mov {}, dr7", out(reg) v, options(nomem, nostack)),
            _ => asm!("mov {}, dr0", out(reg) v, options(nomem, nostack)),
        }
    }
    v
}

fn write_dr(n: u8, v: u64) {
    // SAFETY: MOV to a debug register; it exits. Breakpoints stay disabled
    // (L0-L3, G0-G3 clear).
    unsafe {
        match n {
            7 => asm!("mov dr7, {}", in(reg) v, options(nomem, nostack)),
            _ => asm!("mov dr0, {}", in(reg) v, options(nomem, nostack)),
        }
    }
}

fn xsetbv(xcr: u32, v: u64) {
    // SAFETY: XSETBV (0f 01 d1, 3 bytes) exits; a refused one faults and the
    // caller probes for it.
    unsafe { asm!("xsetbv", in("ecx") xcr, in("eax") v as u32, in("edx") (v >> 32) as u32, options(nomem, nostack)) };
}

fn xgetbv() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: XGETBV reads XCR0 (CR4.OSXSAVE is set by the caller).
    unsafe { asm!("xgetbv", in("ecx") 0, out("eax") lo, out("edx") hi, options(nomem, nostack)) };
    (hi as u64) << 32 | lo as u64
}

fn exits(c: &mut Checks) {
    const IA32_TSC: u32 = 0x10;
    const TSC_AUX: u32 = 0xc000_0103;
    let t = 1u64 << 50;
    wrmsr(IA32_TSC, t);
    let (a, m) = (rdtsc(), rdmsr(IA32_TSC));
    if m == 0 {
        println!("vcputest: note RDMSR of IA32_TSC reads 0 here (QEMU's TCG does not implement it)");
    }
    c.check(
        "wrmsr tsc moves rdtsc (the tsc offset)",
        a >= t && a < t + (1 << 36) && (m >= a || m == 0),
        format_args!("wrote {t:#x}, rdtsc {a:#x}, rdmsr {m:#x}"),
    );

    let has_rdtscp = cpuid(0x8000_0001, 0).edx & (1 << 27) != 0;
    if has_rdtscp {
        let first = rdtscp().1;
        wrmsr(TSC_AUX, 0x1234);
        let (tsc, aux) = rdtscp();
        c.check(
            "rdtscp reads tsc_aux",
            first == 0 && aux == 0x1234 && tsc >= t && rdmsr(TSC_AUX) == 0x1234,
            format_args!("tsc_aux {first:#x} at start (vCPU 0), then {aux:#x}, tsc {tsc:#x}"),
        );
    } else {
        let ud = trap::probe(3, || {
            rdtscp();
        });
        let gp = trap::probe(2, || wrmsr(TSC_AUX, 1));
        c.check(
            "rdtscp hidden: #UD, and tsc_aux #GP",
            ud == Some(6) && gp == Some(13),
            format_args!("rdtscp {ud:?}, wrmsr {gp:?}"),
        );
    }

    let (dr6, dr7) = (read_dr(6), read_dr(7));
    write_dr(0, 0xffff_8000_0000_1000);
    let dr0 = read_dr0();
    c.check(
        "mov dr reads back what it wrote",
        dr0 == 0xffff_8000_0000_1000 && dr6 == 0xffff_0ff0 && dr7 == 0x400,
        format_args!("dr0 {dr0:#x}, dr6 {dr6:#x}, dr7 {dr7:#x}"),
    );
    write_dr(7, 0x400 | (1 << 13));
    let db = trap::probe(3, || {
        read_dr0();
    });
    let (dr6, dr7) = (read_dr(6), read_dr(7));
    c.check(
        "dr7.gd: mov dr raises #db, sets dr6.bd, clears gd",
        db == Some(1) && dr6 & (1 << 13) != 0 && dr7 == 0x400,
        format_args!("{db:?}, dr6 {dr6:#x}, dr7 {dr7:#x}"),
    );

    if cpuid(1, 0).ecx & (1 << 26) != 0 {
        // SAFETY: CR4.OSXSAVE only enables XGETBV/XSETBV and the XSAVE family.
        unsafe { asm!("mov rax, cr4", "bts rax, 18", "mov cr4, rax", out("rax") _, options(nomem, nostack)) };
        let osxsave = cpuid(1, 0).ecx & (1 << 27) != 0;
        let before = xgetbv();
        let ok = trap::probe(3, || xsetbv(0, 3));
        let after = xgetbv();
        // The STAT hypercall is one exit; an intercepted XSETBV another.
        // The host's timer may add one at any time: the fewest of three.
        let exited = (0..3)
            .map(|_| {
                let e0 = hypercall(hc::STAT, hc::STAT_EXITS, 0);
                let _ = trap::probe(3, || xsetbv(0, 3));
                hypercall(hc::STAT, hc::STAT_EXITS, 0) - e0
            })
            .min()
            .is_some_and(|n| n >= 2);
        let xcr1 = trap::probe(3, || xsetbv(1, 3));
        let no_x87 = trap::probe(3, || xsetbv(0, 2));
        c.check(
            "xsetbv takes x87|sse, refuses xcr1 and no x87",
            osxsave && before == 1 && ok.is_none() && after == 3 && xcr1 == Some(13) && no_x87 == Some(13),
            format_args!(
                "osxsave {osxsave}, xcr0 {before:#x} then {after:#x}; xsetbv 3 {ok:?}, xcr1 {xcr1:?}, 2 {no_x87:?}"
            ),
        );
        if exited {
            let avx = trap::probe(3, || xsetbv(0, 7));
            c.check(
                "xsetbv refuses avx (the state holds no ymm registers)",
                avx == Some(13) && xgetbv() == 3,
                format_args!("xsetbv 7 {avx:?}, xcr0 {:#x}", xgetbv()),
            );
        } else {
            println!("vcputest: note XSETBV does not exit here (QEMU's TCG has no XSETBV intercept)");
        }
    }

    let f = trap::probe(2, || {
        // SAFETY: both complete (the hypervisor skips them); nothing in
        // this guest depends on its caches.
        unsafe { asm!("wbinvd", "invd", options(nostack)) };
    });
    c.check("wbinvd and invd complete", f.is_none(), format_args!("{f:?}"));

    let mon = trap::probe(3, || {
        // SAFETY: MONITOR (0f 01 c8) must raise #UD.
        unsafe { asm!("monitor", in("rax") 0x1000u64, in("ecx") 0, in("edx") 0, options(nostack)) };
    });
    let mwait = trap::probe(3, || {
        // SAFETY: MWAIT (0f 01 c9) must raise #UD.
        unsafe { asm!("mwait", in("eax") 0, in("ecx") 0, options(nostack)) };
    });
    let hidden = cpuid(1, 0).ecx & (1 << 3) == 0;
    c.check(
        "monitor and mwait raise #ud, cpuid hides them",
        mon == Some(6) && mwait == Some(6) && hidden,
        format_args!("monitor {mon:?}, mwait {mwait:?}, cpuid.1:ecx.monitor hidden {hidden}"),
    );
}

fn main(boot: Boot) -> u32 {
    for word in boot.cmdline().split_whitespace() {
        if let Some(n) = word.strip_prefix("slow=").and_then(|v| v.parse().ok()) {
            SLOW_WANTED.store(n, SeqCst);
        }
    }
    trap::install();
    let mut c = Checks { failed: 0, total: 0 };
    events(&mut c);
    exits(&mut c);
    timer(&mut c);
    if c.failed == 0 {
        println!("vcputest: PASS ({} checks)", c.total);
        0
    } else {
        println!("vcputest: FAIL ({} of {} checks)", c.failed, c.total);
        1
    }
}

guests::entry!(main);
