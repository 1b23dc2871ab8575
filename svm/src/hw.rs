//! The few privileged instructions this backend needs, one line each.

use core::arch::asm;

/// # Safety
/// `msr` exists on this CPU (else #GP), and ring 0.
#[inline(always)]
pub unsafe fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: the caller guarantees the MSR exists and we are in ring 0.
    unsafe { asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) };
    ((hi as u64) << 32) | lo as u64
}

/// # Safety
/// `msr` exists and `value` is valid for it; writing it does not break
/// the host.
#[inline(always)]
pub unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: the caller vouches for the MSR and the value.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32, options(nostack, preserves_flags))
    };
}

/// VMSAVE: stores FS, GS, TR, LDTR (with hidden state), KernelGsBase,
/// STAR/LSTAR/CSTAR/SFMASK and SYSENTER_* into the VMCB at `pa`.
///
/// # Safety
/// EFER.SVME is set and `pa` is a 4 KiB-aligned VMCB page we own.
pub unsafe fn vmsave(pa: u64) {
    // SAFETY: per the caller.
    unsafe { asm!("vmsave rax", in("rax") pa, options(nostack, preserves_flags)) };
}

/// # Safety
/// `area` is 16-byte aligned and 512 bytes long.
pub unsafe fn fxsave(area: *mut u8) {
    // SAFETY: per the caller.
    unsafe { asm!("fxsave64 [{}]", in(reg) area, options(nostack, preserves_flags)) };
}

/// # Safety
/// `area` is a valid FXSAVE image, 16-byte aligned.
pub unsafe fn fxrstor(area: *const u8) {
    // SAFETY: per the caller.
    unsafe { asm!("fxrstor64 [{}]", in(reg) area, options(nostack, preserves_flags)) };
}

pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC only reads the time-stamp counter.
    unsafe { core::arch::x86_64::_rdtsc() }
}
