//! A minimal IDT so a test can run an instruction that should fault (#DB,
//! #UD, #GP, #PF, #MC) and observe the fault instead of dying: `probe` arms a handler
//! that records the vector and resumes after the faulting instruction, whose
//! length the caller gives.

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU64, Ordering};

/// Bytes to skip when the probed instruction faults; 0 = not probing.
#[unsafe(no_mangle)]
static PROBE_LEN: AtomicU64 = AtomicU64::new(0);
/// The vector of the last probed fault, or u64::MAX.
#[unsafe(no_mangle)]
static PROBE_VECTOR: AtomicU64 = AtomicU64::new(u64::MAX);

// Handlers: with an error code (#GP, #PF) drop it first; then, if probing, record
// the vector, move the saved RIP past the instruction and return; otherwise
// report the unexpected fault through the exit port (status 0xff).
global_asm!(
    ".global trap_db",
    "trap_db:",
    "    push 1",
    "    jmp 2f",
    ".global trap_ud",
    "trap_ud:",
    "    push 6",
    "    jmp 2f",
    ".global trap_mc",
    "trap_mc:",
    "    push 18",
    "    jmp 2f",
    ".global trap_pf",
    "trap_pf:",
    "    add rsp, 8",
    "    push 14",
    "    jmp 2f",
    ".global trap_gp",
    "trap_gp:",
    "    add rsp, 8",
    "    push 13",
    "2:  cmp qword ptr [rip + PROBE_LEN], 0",
    "    je 3f",
    "    pop qword ptr [rip + PROBE_VECTOR]",
    "    push rax",
    "    mov rax, [rip + PROBE_LEN]",
    "    add [rsp + 8], rax",
    "    pop rax",
    "    iretq",
    "3:  mov dx, 0xf4",
    "    mov eax, 0x7f",
    "    out dx, eax",
    "4:  cli",
    "    hlt",
    "    jmp 4b",
);

unsafe extern "C" {
    fn trap_db();
    fn trap_ud();
    fn trap_mc();
    fn trap_gp();
    fn trap_pf();
}

#[repr(C, align(16))]
struct Idt([u64; 512]);

/// All 256 vectors, so tests can add interrupt handlers (`set_handler`).
static mut IDT: Idt = Idt([0; 512]);

#[repr(C, packed)]
struct DtPtr {
    limit: u16,
    base: u64,
}

fn gate(handler: u64, cs: u16) -> (u64, u64) {
    // 64-bit interrupt gate, present, DPL 0 (SDM Vol. 3A 7.14.1).
    let lo = (handler & 0xffff) | ((cs as u64) << 16) | (0x8e00u64 << 32) | ((handler >> 16) & 0xffff) << 48;
    (lo, handler >> 32)
}

/// Installs handlers for #DB, #UD, #GP and #PF.
pub fn install() {
    let cs: u16;
    // SAFETY: reading CS.
    unsafe { asm!("mov {0:x}, cs", out(reg) cs, options(nomem, nostack)) };
    // SAFETY: single-threaded guest; the IDT is only written here, before
    // it is loaded.
    unsafe {
        let idt = &mut *core::ptr::addr_of_mut!(IDT);
        for (vector, handler) in [
            (1usize, trap_db as *const () as u64),
            (6usize, trap_ud as *const () as u64),
            (13, trap_gp as *const () as u64),
            (14, trap_pf as *const () as u64),
            (18, trap_mc as *const () as u64),
        ] {
            let (lo, hi) = gate(handler, cs);
            idt.0[vector * 2] = lo;
            idt.0[vector * 2 + 1] = hi;
        }
        let ptr = DtPtr { limit: 256 * 16 - 1, base: idt as *const Idt as u64 };
        asm!("lidt [{}]", in(reg) &ptr, options(nostack));
    }
}

/// Points IDT vector `vector` at `handler` (an interrupt gate: IF is 0 in
/// the handler). Call after `install`.
pub fn set_handler(vector: u8, handler: u64) {
    let cs: u16;
    // SAFETY: reading CS.
    unsafe { asm!("mov {0:x}, cs", out(reg) cs, options(nomem, nostack)) };
    let (lo, hi) = gate(handler, cs);
    // SAFETY: single-threaded guest; the CPU reads a gate only when it
    // delivers through it, and tests set gates before they can be used.
    unsafe {
        let idt = &mut *core::ptr::addr_of_mut!(IDT);
        idt.0[vector as usize * 2] = lo;
        idt.0[vector as usize * 2 + 1] = hi;
    }
}

/// Runs `f`, whose faulting instruction is `len` bytes long; returns the
/// fault vector, or None if nothing faulted.
pub fn probe(len: u64, f: impl FnOnce()) -> Option<u8> {
    PROBE_VECTOR.store(u64::MAX, Ordering::SeqCst);
    PROBE_LEN.store(len, Ordering::SeqCst);
    f();
    PROBE_LEN.store(0, Ordering::SeqCst);
    match PROBE_VECTOR.load(Ordering::SeqCst) {
        u64::MAX => None,
        v => Some(v as u8),
    }
}
