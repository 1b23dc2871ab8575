//! SMP bring-up and cross-CPU calls.
//!
//! The boot CPU starts every application processor (AP) with INIT-SIPI-SIPI
//! (SDM Vol. 3A 9.4.4). An AP wakes in real mode at the start page the SIPI
//! names, below 1 MiB: the trampoline below takes it through protected mode
//! to long mode on a temporary page table (the kernel's, plus the start page
//! identity-mapped), picks itself a stack and an index, and calls
//! [`ap_entry`], which loads the kernel's own page table and gives the CPU
//! its own GDT, TSS, interrupt stacks and [`CpuLocal`]. The CPUs come from
//! the ACPI MADT; firmware without ACPI tables (OVMF under Bochs) gets one
//! broadcast INIT-SIPI-SIPI, and the APs that answer are the CPUs.
//!
//! A started AP runs what the kernel gives it ([`set_ap_main`]), then
//! serves calls ([`run_on`]): the caller writes a function and argument
//! into the CPU's mailbox and sends an IPI; the AP, halted with interrupts
//! on, wakes, runs it and posts the result. A TLB shootdown is such a call
//! to every CPU that may hold a stale translation.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use spin::{Mutex, Once};
use vcpu::cpu_local::{self, CpuLocal};
use x86_64::structures::idt::InterruptStackFrame;

use super::{apic, gdt, idt, memory, time};

/// CPUs the kernel manages at most.
pub const MAX_CPUS: usize = 64;
/// APs a broadcast start (no MADT) prepares stacks for.
const BROADCAST_MAX_APS: usize = 7;
const AP_STACK_SIZE: u64 = 64 * 1024;
/// The IPI that wakes a halted AP to look at its mailbox.
pub const WAKE_VECTOR: u8 = 0x41;

/// One host CPU as the kernel sees it.
pub struct Cpu {
    /// The per-CPU words the backends and the VM layer use (GS base points
    /// here).
    pub local: CpuLocal,
    pub online: AtomicBool,
    /// What the CPU's virtualization instance said when it was turned on:
    /// its features, or why it could not be.
    pub virt: Once<Result<alloc::string::String, alloc::string::String>>,
    // The mailbox: `asked` moves on when a call is posted, `answered`
    // catches up when it has run.
    asked: AtomicU64,
    answered: AtomicU64,
    call: AtomicUsize,
    arg: AtomicU64,
    result: AtomicU64,
    /// The CPU that posted the call in the mailbox: told when it is
    /// answered, if it halts for that ([`await_answer`]).
    caller: AtomicU32,
    /// This CPU halts until a call it posted is answered.
    awaiting: AtomicBool,
    /// Its waits in [`await_answer`] that halted, and those the answer's
    /// wake-up ended (the rest ended at the backstop timer).
    awaits: AtomicU64,
    awaits_answered: AtomicU64,
}

impl Cpu {
    /// A call was posted that it has not answered yet.
    fn busy(&self) -> bool {
        self.asked.load(Ordering::Acquire) != self.answered.load(Ordering::Acquire)
    }

    const fn new(index: u32, apic_id: u32) -> Cpu {
        Cpu {
            local: CpuLocal::new(index, apic_id),
            online: AtomicBool::new(false),
            virt: Once::new(),
            asked: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            call: AtomicUsize::new(0),
            arg: AtomicU64::new(0),
            result: AtomicU64::new(0),
            caller: AtomicU32::new(0),
            awaiting: AtomicBool::new(false),
            awaits: AtomicU64::new(0),
            awaits_answered: AtomicU64::new(0),
        }
    }

    pub fn index(&self) -> u32 {
        self.local.index
    }

    /// Waits for another CPU's answer that halted, and those its wake-up ended.
    pub fn awaits(&self) -> (u64, u64) {
        (self.awaits.load(Ordering::Relaxed), self.awaits_answered.load(Ordering::Relaxed))
    }

    pub fn apic_id(&self) -> u32 {
        self.local.apic_id.load(Ordering::Relaxed)
    }
}

static BOOT_CPU: Cpu = Cpu::new(0, 0);
/// Every CPU by index; the boot CPU is 0, APs take the next free index as
/// they come up.
static CPUS: [AtomicPtr<Cpu>; MAX_CPUS] = [const { AtomicPtr::new(core::ptr::null_mut()) }; MAX_CPUS];
static COUNT: AtomicUsize = AtomicUsize::new(0);
/// One caller at a time posts calls (the mailboxes have one slot each).
static CALLS: Mutex<()> = Mutex::new(());

/// What an AP does once it is up, before it serves calls: the kernel turns
/// its virtualization on there.
static AP_MAIN: Once<fn(&'static Cpu)> = Once::new();

/// The boot CPU's control registers, copied by each AP (paging, FPU and
/// SSE enables, NX): the trampoline sets only what long mode needs.
struct BootRegs {
    cr0: u64,
    cr3: u64,
    cr4: u64,
    efer: u64,
    pat: u64,
}
static BOOT_REGS: Once<BootRegs> = Once::new();

/// Makes the boot CPU's [`CpuLocal`] current. First thing at boot: fault
/// reports read it.
pub fn init_boot_cpu() {
    // SAFETY: ring 0, on the boot CPU, before anything reads cpu_local; the
    // kernel does not otherwise use GS base.
    unsafe { cpu_local::install(&BOOT_CPU.local) };
    BOOT_CPU.online.store(true, Ordering::Relaxed);
    register(&BOOT_CPU, 0);
}

fn register(cpu: &'static Cpu, index: usize) {
    CPUS[index].store(cpu as *const Cpu as *mut Cpu, Ordering::Release);
    COUNT.fetch_max(index + 1, Ordering::AcqRel);
}

/// Every CPU that came up, boot CPU first.
pub fn cpus() -> impl Iterator<Item = &'static Cpu> {
    let n = COUNT.load(Ordering::Acquire);
    CPUS[..n].iter().filter_map(|p| {
        let p = p.load(Ordering::Acquire);
        // SAFETY: a non-null entry points at a Cpu that lives for the
        // kernel's lifetime (the static boot CPU or a leaked Box).
        (!p.is_null()).then(|| unsafe { &*p })
    })
}

/// The CPU this code runs on.
pub fn this_cpu() -> &'static Cpu {
    let i = cpu_local::get().index as usize;
    let p = CPUS[i].load(Ordering::Acquire);
    // SAFETY: the CPU registered itself before anything on it calls this.
    unsafe { &*p }
}

pub fn set_ap_main(f: fn(&'static Cpu)) {
    AP_MAIN.call_once(|| f);
}

// The trampoline, copied to the start page and patched there (its far
// jumps' targets, the GDT pointer, the page table, the stacks) before the
// SIPIs. Position-independent in real mode through CS; the patched far
// jumps then reach the copy's protected- and long-mode parts. Hand-written
// because nothing smaller than a bootloader crate offers it.
global_asm!(
    r#"
.pushsection .rodata.hv_ap_trampoline, "a"
.balign 16
.global hv_ap_trampoline
hv_ap_trampoline:
.code16
    cli
    cld
    xorl %ebx, %ebx
    movw %cs, %bx
    shll $4, %ebx
    movw %cs, %ax
    movw %ax, %ds
    lgdtl (hv_ap_gdtr - hv_ap_trampoline)
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    .byte 0x66, 0xea
.global hv_ap_jmp32
hv_ap_jmp32:
    .long 0
    .word 0x08
.code32
.global hv_ap_prot
hv_ap_prot:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl %cr4, %eax
    orl $0x20, %eax
    movl %eax, %cr4
    movl (hv_ap_cr3 - hv_ap_trampoline)(%ebx), %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx
    rdmsr
    orl $0x900, %eax
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax
    movl %eax, %cr0
    .byte 0xea
.global hv_ap_jmp64
hv_ap_jmp64:
    .long 0
    .word 0x18
.code64
.global hv_ap_long
hv_ap_long:
    movl %ebx, %ebx
    movl $1, %eax
    lock xaddl %eax, (hv_ap_next - hv_ap_trampoline)(%rbx)
    cmpl (hv_ap_max - hv_ap_trampoline)(%rbx), %eax
    jae 2f
    movl %eax, %edi
    movq (hv_ap_stacks - hv_ap_trampoline)(%rbx, %rax, 8), %rsp
    andq $-16, %rsp
    movq (hv_ap_entry - hv_ap_trampoline)(%rbx), %rax
    callq *%rax
2:
    cli
    hlt
    jmp 2b
.balign 8
.global hv_ap_gdt
hv_ap_gdt:
    .quad 0
    .quad 0x00cf9a000000ffff
    .quad 0x00cf92000000ffff
    .quad 0x00af9a000000ffff
.global hv_ap_gdtr
hv_ap_gdtr:
    .word 31
    .long 0
.balign 8
.global hv_ap_cr3
hv_ap_cr3:
    .quad 0
.global hv_ap_entry
hv_ap_entry:
    .quad 0
.global hv_ap_next
hv_ap_next:
    .long 0
.global hv_ap_max
hv_ap_max:
    .long 0
.global hv_ap_stacks
hv_ap_stacks:
    .fill 64, 8, 0
.global hv_ap_trampoline_end
hv_ap_trampoline_end:
.popsection
"#,
    options(att_syntax)
);

unsafe extern "C" {
    static hv_ap_trampoline: u8;
    static hv_ap_trampoline_end: u8;
    static hv_ap_jmp32: u8;
    static hv_ap_prot: u8;
    static hv_ap_jmp64: u8;
    static hv_ap_long: u8;
    static hv_ap_gdt: u8;
    static hv_ap_gdtr: u8;
    static hv_ap_cr3: u8;
    static hv_ap_entry: u8;
    static hv_ap_next: u8;
    static hv_ap_max: u8;
    static hv_ap_stacks: u8;
}

/// Why no AP was started.
#[derive(Debug)]
pub enum NotStarted {
    NoStartPage,
    FiveLevelPaging,
    /// The kernel or the direct map sits in the first 512 GiB, which the
    /// start code maps to itself.
    LowKernel,
    NoMemory,
}

/// Starts the APs: those the MADT lists (`apic_ids`, boot CPU first), or,
/// with no MADT, whichever answer a broadcast. Returns how many came up.
pub fn start_aps(apic_ids: &[u32]) -> Result<usize, NotStarted> {
    let page = memory::trampoline_page().ok_or(NotStarted::NoStartPage)?;
    // SAFETY: reading control registers and MSRs that exist on every
    // x86-64 CPU.
    let (cr0, cr3, cr4, efer, pat) = unsafe {
        let cr0: u64;
        let cr3: u64;
        let cr4: u64;
        asm!("mov {}, cr0", out(reg) cr0, options(nomem, nostack));
        asm!("mov {}, cr3", out(reg) cr3, options(nomem, nostack));
        asm!("mov {}, cr4", out(reg) cr4, options(nomem, nostack));
        let efer = x86_64::registers::model_specific::Msr::new(0xc000_0080).read();
        let pat = x86_64::registers::model_specific::Msr::new(0x277).read();
        (cr0, cr3, cr4, efer, pat)
    };
    const CR4_LA57: u64 = 1 << 12;
    const CR4_VMXE: u64 = 1 << 13;
    const EFER_SVME: u64 = 1 << 12;
    if cr4 & CR4_LA57 != 0 {
        return Err(NotStarted::FiveLevelPaging);
    }
    let pml4_index = |va: u64| (va >> 39) & 0x1ff;
    if pml4_index(ap_entry as *const () as u64) == 0 || pml4_index(memory::phys_offset()) == 0 {
        return Err(NotStarted::LowKernel);
    }
    let cr3 = cr3 & 0x000f_ffff_ffff_f000;
    BOOT_REGS.call_once(|| BootRegs { cr0, cr3, cr4: cr4 & !CR4_VMXE, efer: efer & !EFER_SVME, pat });

    // The start page table: the kernel's top level, with entry 0 mapping
    // the first 2 MiB to themselves (the start page is there). It must sit
    // below 4 GiB: 32-bit code loads it. It is never freed: an AP that
    // answers late still walks it.
    let frames = [memory::alloc_frame(), memory::alloc_frame(), memory::alloc_frame()];
    let [Some(pml4), Some(pdpt), Some(pd)] = frames else {
        return Err(NotStarted::NoMemory);
    };
    if pml4.max(pdpt).max(pd) >= 1 << 32 {
        return Err(NotStarted::NoMemory);
    }
    const PRESENT_WRITE: u64 = 0b11;
    const HUGE: u64 = 1 << 7;
    // SAFETY: three zeroed frames just allocated, and the kernel's live
    // top-level table, all reached through the direct map; the kernel's is
    // only read.
    unsafe {
        core::ptr::copy_nonoverlapping(
            memory::phys_to_virt(cr3) as *const u64,
            memory::phys_to_virt(pml4) as *mut u64,
            512,
        );
        (memory::phys_to_virt(pml4) as *mut u64).write(pdpt | PRESENT_WRITE);
        (memory::phys_to_virt(pdpt) as *mut u64).write(pd | PRESENT_WRITE);
        (memory::phys_to_virt(pd) as *mut u64).write(PRESENT_WRITE | HUGE);
    }

    let broadcast = apic_ids.len() <= 1;
    let want = if broadcast { BROADCAST_MAX_APS } else { (apic_ids.len() - 1).min(MAX_CPUS - 1) };
    let mut stacks = Vec::with_capacity(want);
    for _ in 0..want {
        match memory::alloc_contiguous(AP_STACK_SIZE, 4096) {
            Some(pa) => stacks.push(pa),
            None => break,
        }
    }

    // SAFETY: the symbols are labels in one section, so their distances
    // are the layout of the trampoline; the start page is conventional
    // memory the frame allocator never hands out, mapped by the direct map,
    // and no AP runs there until the SIPIs below.
    unsafe {
        let start = &raw const hv_ap_trampoline as usize;
        let len = &raw const hv_ap_trampoline_end as usize - start;
        assert!(len <= 4096, "the AP start code outgrew its page");
        let dst = memory::phys_to_virt(page);
        core::ptr::copy_nonoverlapping(start as *const u8, dst, len);
        let at = |sym: *const u8| dst.add(sym as usize - start);
        let off = |sym: *const u8| page + (sym as usize - start) as u64;
        (at(&raw const hv_ap_jmp32) as *mut u32).write_unaligned(off(&raw const hv_ap_prot) as u32);
        (at(&raw const hv_ap_jmp64) as *mut u32).write_unaligned(off(&raw const hv_ap_long) as u32);
        (at(&raw const hv_ap_gdtr).add(2) as *mut u32).write_unaligned(off(&raw const hv_ap_gdt) as u32);
        (at(&raw const hv_ap_cr3) as *mut u64).write_unaligned(pml4);
        (at(&raw const hv_ap_entry) as *mut u64).write_unaligned(ap_entry as *const () as u64);
        (at(&raw const hv_ap_next) as *mut u32).write_unaligned(0);
        (at(&raw const hv_ap_max) as *mut u32).write_unaligned(stacks.len() as u32);
        for (i, s) in stacks.iter().enumerate() {
            let top = memory::phys_to_virt(*s) as u64 + AP_STACK_SIZE;
            (at(&raw const hv_ap_stacks).add(i * 8) as *mut u64).write_unaligned(top);
        }
    }

    // INIT, 10 ms, SIPI, 200 us, SIPI (SDM Vol. 3A 9.4.4.1).
    const INIT: u32 = 0b101 << 8 | 1 << 14;
    const STARTUP: u32 = 0b110 << 8 | 1 << 14;
    const ALL_BUT_SELF: u32 = 0b11 << 18;
    let vector = (page >> 12) as u32;
    let targets: Vec<(u32, u32)> = if broadcast {
        alloc::vec![(0, ALL_BUT_SELF)]
    } else {
        apic_ids[1..=stacks.len()].iter().map(|&id| (id, 0)).collect()
    };
    for &(id, shorthand) in &targets {
        apic::send_ipi(id, INIT | shorthand);
    }
    delay_us(10_000);
    for _ in 0..2 {
        for &(id, shorthand) in &targets {
            apic::send_ipi(id, STARTUP | shorthand | vector);
        }
        delay_us(200);
    }

    // Wait for them: all the MADT listed, or (broadcast) until no more
    // arrive for a while.
    let up = || COUNT.load(Ordering::Acquire) - 1;
    let t0 = time::micros();
    let mut last = (0, t0);
    loop {
        let now = time::micros();
        let n = up();
        if n != last.0 {
            last = (n, now);
        }
        if (!broadcast && n >= stacks.len()) || now - t0 > 1_000_000 || (broadcast && now - last.1 > 100_000) {
            break;
        }
        core::hint::spin_loop();
    }
    let n = up();
    // Stacks nobody took go back; an AP later than this halts in the start
    // code (its index is past the new limit).
    // SAFETY: the start page is still ours; the limit only shrinks.
    unsafe {
        let start = &raw const hv_ap_trampoline as usize;
        let max = memory::phys_to_virt(page).add(&raw const hv_ap_max as usize - start) as *mut AtomicU32;
        (*max).store(n as u32, Ordering::SeqCst);
    }
    for s in stacks.iter().skip(n) {
        memory::free_range(*s, AP_STACK_SIZE);
    }
    Ok(n)
}

fn delay_us(us: u64) {
    let start = time::rdtsc();
    let ticks = time::tsc_hz() * us / 1_000_000;
    while time::rdtsc() - start < ticks {
        core::hint::spin_loop();
    }
}

/// Where each AP arrives from the start code, on its own stack, with the
/// start page table and interrupts off. `slot` is its place in the start
/// order.
extern "C" fn ap_entry(slot: u32) -> ! {
    let regs = BOOT_REGS.get().expect("set before the SIPIs");
    // SAFETY: the boot CPU's own values: its page table (which maps this
    // code and stack the same way the start table does), and control
    // registers this CPU accepts since the boot CPU, the same model, runs
    // with them. EFER keeps LME and NXE, which the start code set.
    unsafe {
        asm!("mov cr3, {}", in(reg) regs.cr3, options(nostack));
        asm!("mov cr4, {}", in(reg) regs.cr4, options(nostack));
        asm!("mov cr0, {}", in(reg) regs.cr0, options(nostack));
        x86_64::registers::model_specific::Msr::new(0xc000_0080).write(regs.efer);
        x86_64::registers::model_specific::Msr::new(0x277).write(regs.pat);
        asm!("fninit", options(nomem, nostack));
    }
    gdt::init_ap();
    idt::load();
    apic::enable();
    let index = slot as usize + 1;
    let cpu: &'static Cpu = Box::leak(Box::new(Cpu::new(index as u32, apic::id())));
    // SAFETY: ring 0, on the CPU `cpu` describes, before anything here
    // reads cpu_local.
    unsafe { cpu_local::install(&cpu.local) };
    // Its machine checks reach the handler (banks are per CPU).
    super::mce::enable();
    register(cpu, index);
    cpu.online.store(true, Ordering::Release);
    if let Some(main) = AP_MAIN.get() {
        main(cpu);
    }
    serve_calls(cpu)
}

/// An AP's life after start: halted until a call arrives, then the call.
fn serve_calls(cpu: &'static Cpu) -> ! {
    loop {
        x86_64::instructions::interrupts::disable();
        let asked = cpu.asked.load(Ordering::Acquire);
        if asked != cpu.answered.load(Ordering::Relaxed) {
            let f = cpu.call.load(Ordering::Relaxed);
            // SAFETY: `run_on` stores only `fn(u64) -> u64` pointers here,
            // before moving `asked` on with Release.
            let f: fn(u64) -> u64 = unsafe { core::mem::transmute(f) };
            cpu.result.store(f(cpu.arg.load(Ordering::Relaxed)), Ordering::Relaxed);
            // SeqCst, then `awaiting` SeqCst: with `await_answer`'s two in
            // the other order, either the caller sees the answer before it
            // halts or this CPU sees it halting and wakes it.
            cpu.answered.store(asked, Ordering::SeqCst);
            let caller = cpu.caller.load(Ordering::Relaxed);
            if let Some(c) = cpus().find(|c| c.index() == caller)
                && c.awaiting.load(Ordering::SeqCst)
            {
                apic::send_ipi(c.apic_id(), WAKE_VECTOR as u32 | 1 << 14);
            }
            continue;
        }
        // STI's one-instruction shadow covers HLT: a wake IPI that arrived
        // after the check above is taken in the HLT and ends it (SDM Vol.
        // 2B STI), so no call is missed.
        // SAFETY: the wake handler only acknowledges the interrupt.
        unsafe { asm!("sti", "hlt", "cli", options(nomem, nostack)) };
    }
}

/// Halts this CPU until TSC `until` or an interrupt: a kick, or the APIC
/// timer armed for `until` (`Backend::halt_until`).
pub fn halt_until(until: u64) {
    apic::arm(until);
    // STI's shadow covers HLT: a kick that arrived while interrupts were off
    // is taken in the HLT and ends it, so none is missed (SDM Vol. 2B STI).
    // SAFETY: the wake and timer handlers only count and acknowledge.
    unsafe { asm!("sti", "hlt", "cli", options(nomem, nostack)) };
    apic::disarm();
}

pub extern "x86-interrupt" fn wake_interrupt(_frame: InterruptStackFrame) {
    apic::eoi();
}

/// Interrupts CPU `index` with the wake vector, whose handler only
/// acknowledges it: a guest running there exits (external interrupt; the
/// host runs with interrupts off, so one arriving between two guest runs
/// ends the next at once). Unknown or this CPU: nothing.
pub fn kick(index: u32) {
    if index == cpu_local::get().index {
        return;
    }
    if let Some(c) = cpus().find(|c| c.index() == index) {
        apic::send_ipi(c.apic_id(), WAKE_VECTOR as u32 | 1 << 14);
    }
}

/// Starts `f(arg)` on `cpu` without waiting for it: the ticket to ask
/// [`await_answer`] with, or `None` if the CPU is offline, is this one, or has a
/// call still to answer.
pub fn post(cpu: &'static Cpu, f: fn(u64) -> u64, arg: u64) -> Option<u64> {
    let _one_caller = CALLS.lock();
    if cpu.index() == cpu_local::get().index || !cpu.online.load(Ordering::Acquire) || cpu.busy() {
        return None;
    }
    cpu.call.store(f as usize, Ordering::Relaxed);
    cpu.arg.store(arg, Ordering::Relaxed);
    cpu.caller.store(cpu_local::get().index, Ordering::Relaxed);
    let n = cpu.asked.fetch_add(1, Ordering::Release) + 1;
    // Fixed delivery, physical destination, assert.
    apic::send_ipi(cpu.apic_id(), WAKE_VECTOR as u32 | 1 << 14);
    Some(n)
}

/// Halts this CPU until `cpu` answers the call [`post`] gave `ticket` for:
/// the answering CPU wakes a caller that waits, and a millisecond's timer
/// is the backstop for a lost wake-up. Under an emulator that runs every
/// CPU on one thread, a caller that spun here took that thread from the
/// CPU it waits for. `woken` runs after every halt: whatever else woke
/// this CPU (a kick from a CPU that asks it something) is done there.
pub fn await_answer(cpu: &Cpu, ticket: u64, mut woken: impl FnMut()) {
    let me = this_cpu();
    let mut halted = false;
    loop {
        // SeqCst both: see `serve_calls`.
        me.awaiting.store(true, Ordering::SeqCst);
        if cpu.answered.load(Ordering::SeqCst) == ticket {
            break;
        }
        let backstop = time::rdtsc().saturating_add(time::tsc_hz() / 1000);
        halt_until(backstop);
        halted = true;
        if cpu.answered.load(Ordering::Acquire) == ticket {
            // Woken by the answer, not by the backstop.
            if time::rdtsc() < backstop {
                me.awaits_answered.fetch_add(1, Ordering::Relaxed);
            }
            break;
        }
        woken();
    }
    me.awaiting.store(false, Ordering::Relaxed);
    me.awaits.fetch_add(u64::from(halted), Ordering::Relaxed);
}

/// Whether `cpu` answered the call [`post`] gave `ticket` for.
pub fn answered(cpu: &Cpu, ticket: u64) -> bool {
    cpu.answered.load(Ordering::Acquire) == ticket
}

/// Halts this CPU until TSC `until`, a kick, or the answer of a call it
/// posted (the answering CPU wakes a caller marked waiting, as in
/// [`await_answer`]); not at all if `still_waiting` says the wait is over
/// once this CPU is marked.
pub fn doze(until: u64, still_waiting: impl Fn() -> bool) {
    let me = this_cpu();
    // SeqCst both: see `serve_calls`.
    me.awaiting.store(true, Ordering::SeqCst);
    if still_waiting() {
        halt_until(until);
    }
    me.awaiting.store(false, Ordering::Relaxed);
}

/// Runs `f(arg)` on each of `cpus` at once (the caller's own CPU directly)
/// and waits up to `timeout_us` for all: each one's result, or `None` for a
/// CPU that did not answer in time (it may still run the call later).
pub fn run_on(cpus: &[&'static Cpu], f: fn(u64) -> u64, arg: u64, timeout_us: u64) -> Vec<Option<u64>> {
    let _one_caller = CALLS.lock();
    let me = cpu_local::get().index;
    let mut asked = Vec::with_capacity(cpus.len());
    for c in cpus {
        // A CPU still busy with a posted call (a slice) is not asked: its
        // mailbox holds one call at a time.
        if c.index() == me || !c.online.load(Ordering::Acquire) || c.busy() {
            asked.push(0);
            continue;
        }
        c.call.store(f as usize, Ordering::Relaxed);
        c.arg.store(arg, Ordering::Relaxed);
        c.caller.store(me, Ordering::Relaxed);
        let n = c.asked.fetch_add(1, Ordering::Release) + 1;
        asked.push(n);
        // Fixed delivery, physical destination, assert.
        apic::send_ipi(c.apic_id(), WAKE_VECTOR as u32 | 1 << 14);
    }
    let mut out: Vec<Option<u64>> = cpus.iter().map(|c| (c.index() == me).then(|| f(arg))).collect();
    let t0 = time::micros();
    for (i, c) in cpus.iter().enumerate() {
        if asked[i] == 0 {
            continue;
        }
        while c.answered.load(Ordering::Acquire) != asked[i] && time::micros() - t0 < timeout_us {
            core::hint::spin_loop();
        }
        if c.answered.load(Ordering::Acquire) == asked[i] {
            out[i] = Some(c.result.load(Ordering::Relaxed));
        }
    }
    out
}
