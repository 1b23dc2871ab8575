//! Machine checks on host CPUs: banks switched on at bring-up, and the #MC
//! handler. The handler reads every bank, decides with
//! `hypervisor::mca::host::assess`, hands survivable memory errors to the
//! manager through `HOST_ERRORS` (no lock, no allocation: it may interrupt
//! anything) and clears the banks; anything it cannot survive is reported
//! with the bank's registers and the machine powers off.

use core::sync::atomic::{AtomicU32, Ordering};

use hypervisor::mca::host::{Action, BankError, Context, HOST_ERRORS, assess};
use hypervisor::mca::{MCG_CAP, MCG_CTL, MCG_STATUS, bank_msr, cap, mcg, status};
use x86_64::registers::control::{Cr4, Cr4Flags};
use x86_64::registers::model_specific::Msr;
use x86_64::structures::idt::InterruptStackFrame;

// The machine-check-safe copy: `rep movsb` from the source, with a fixup
// the #MC handler sends it to when a machine check interrupts that very
// instruction (the error was in what it read). SysV: rdi dst, rsi src, rdx
// length; returns 0 when all was copied, 1 when the copy was cut short.
// Hand-written: no crate offers a machine-check-safe copy for bare metal.
core::arch::global_asm!(
    ".global hv_mc_safe_copy",
    "hv_mc_safe_copy:",
    "    mov rcx, rdx",
    ".global hv_mc_safe_copy_insn",
    "hv_mc_safe_copy_insn:",
    "    rep movsb",
    "    xor eax, eax",
    "    ret",
    ".global hv_mc_safe_copy_fixup",
    "hv_mc_safe_copy_fixup:",
    "    mov eax, 1",
    "    ret",
);

unsafe extern "C" {
    fn hv_mc_safe_copy(dst: *mut u8, src: *const u8, len: usize) -> u64;
    fn hv_mc_safe_copy_insn();
    fn hv_mc_safe_copy_fixup();
}

/// Copy `dst.len()` bytes from `src`, surviving a machine check in the
/// source: `false` if one cut the copy short (the #MC handler logged the
/// error; the manager poisons the pages in the frame).
///
/// # Safety
///
/// `src` is valid for reads of `dst.len()` bytes and not written through a
/// Rust reference meanwhile.
pub unsafe fn copy_mc_safe(dst: &mut [u8], src: *const u8) -> bool {
    // SAFETY: the caller's contract for `src`; `dst` is a whole slice.
    unsafe { hv_mc_safe_copy(dst.as_mut_ptr(), src, dst.len()) == 0 }
}

/// Banks the boot CPU reported (0: no machine-check architecture).
static BANKS: AtomicU32 = AtomicU32::new(0);
/// More banks than any CPU has had; a larger count is not trusted.
const MAX_BANKS: u64 = 64;

fn rdmsr(msr: u32) -> u64 {
    // SAFETY: called only for MCA MSRs on a CPU whose CPUID reports MCA
    // (`enable` checks before anything reads them).
    unsafe { Msr::new(msr).read() }
}

fn wrmsr(msr: u32, value: u64) {
    // SAFETY: as `rdmsr`; the values written are ones the SDM defines
    // (all ones to a CTL, zero to a STATUS or MCG_STATUS).
    unsafe { Msr::new(msr).write(value) }
}

/// Switch machine-check reporting on for this CPU (SDM Vol. 3B 16.8):
/// every bank enabled, errors left from before cleared, then CR4.MCE.
/// Returns the bank count (0 when the CPU has no MCA: nothing changed).
pub fn enable() -> u32 {
    let features = raw_cpuid::CpuId::new().get_feature_info();
    if !features.is_some_and(|f| f.has_mce() && f.has_mca()) {
        return 0;
    }
    let caps = rdmsr(MCG_CAP);
    let banks = (caps & cap::COUNT_MASK).min(MAX_BANKS) as u32;
    if caps & cap::CTL_P != 0 {
        wrmsr(MCG_CTL, u64::MAX);
    }
    for b in 0..banks {
        wrmsr(bank_msr(b, 0), u64::MAX);
        wrmsr(bank_msr(b, 1), 0);
    }
    // SAFETY: with the banks set up and the IDT's #MC entry installed
    // (idt::init runs first), a machine check reaches `machine_check`
    // instead of shutting the CPU down.
    unsafe { Cr4::update(|f| f.insert(Cr4Flags::MACHINE_CHECK_EXCEPTION)) };
    BANKS.store(banks, Ordering::Relaxed);
    banks
}

/// The #MC handler (on its own IST stack). It returns when every error was
/// survivable: with the restart IP valid (RIPV), or inside the
/// machine-check-safe copy, which it sends to its fixup.
pub extern "x86-interrupt" fn machine_check(mut frame: InterruptStackFrame) {
    let cpu = vcpu::cpu_local::get().index;
    let in_copy = frame.instruction_pointer.as_u64() == hv_mc_safe_copy_insn as *const () as u64;
    let ctx = if in_copy { Context::SafeCopy } else { Context::Host };
    let mcg_status = rdmsr(MCG_STATUS);
    let banks = (rdmsr(MCG_CAP) & cap::COUNT_MASK).min(MAX_BANKS) as u32;
    let mut fatal = None;
    // An error the interrupted instruction consumed (action required): if
    // that instruction is the safe copy, it was the copy's source.
    let mut consumed = false;
    for bank in 0..banks {
        let st = rdmsr(bank_msr(bank, 1));
        if st & status::VAL == 0 {
            continue;
        }
        let addr = if st & status::ADDRV != 0 { rdmsr(bank_msr(bank, 2)) } else { 0 };
        let misc = if st & status::MISCV != 0 { rdmsr(bank_msr(bank, 3)) } else { 0 };
        let action = assess(mcg_status, st, addr, misc, ctx);
        let e = BankError { cpu, bank, mcg_status, status: st, addr, misc, action };
        if let Action::Fatal(_) = action {
            fatal = Some(e);
            continue;
        }
        consumed |= st & status::AR != 0 && matches!(action, Action::Poison(_));
        HOST_ERRORS.push(e);
        wrmsr(bank_msr(bank, 1), 0);
    }
    if let Some(e) = fatal {
        let why = match e.action {
            Action::Fatal(why) => why,
            _ => "",
        };
        super::serial::force_write_fmt(format_args!(
            "\n!!! hypervisor: machine check on cpu {cpu}: {why}\n    bank {} status {:#018x} addr {:#x} misc {:#x} mcg_status {:#x}\n",
            e.bank, e.status, e.addr, e.misc, mcg_status
        ));
        super::idt::fatal_machine_check(&frame);
    }
    if in_copy && consumed {
        // The copy read the bad data: it fails instead of the host.
        // SAFETY: the frame is this handler's own; the new RIP is the
        // copy's fixup, which returns to the copy's caller with the same
        // stack the interrupted `rep movsb` had.
        unsafe {
            frame
                .as_mut()
                .update(|f| f.instruction_pointer = x86_64::VirtAddr::new(hv_mc_safe_copy_fixup as *const () as u64))
        };
    } else if mcg_status & mcg::RIPV == 0 {
        super::serial::force_write_fmt(format_args!(
            "\n!!! hypervisor: machine check on cpu {cpu} with no restart IP (mcg_status {mcg_status:#x})\n"
        ));
        super::idt::fatal_machine_check(&frame);
    }
    // Done: the next machine check is a new one, not a shutdown.
    wrmsr(MCG_STATUS, 0);
}
