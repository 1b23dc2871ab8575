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

pub fn read_cr4() -> u64 {
    let v;
    // SAFETY: reading CR4 has no side effects.
    unsafe { asm!("mov {}, cr4", out(reg) v, options(nostack, nomem, preserves_flags)) };
    v
}

/// # Safety
/// The new value keeps the host's paging and protection intact.
pub unsafe fn write_cr4(v: u64) {
    // SAFETY: as the caller promises.
    unsafe { asm!("mov cr4, {}", in(reg) v, options(nostack, nomem)) };
}

/// XGETBV of XCR0.
///
/// # Safety
/// CR4.OSXSAVE is set.
pub unsafe fn xgetbv0() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: as the caller promises; XGETBV only reads.
    unsafe { asm!("xgetbv", in("ecx") 0, out("eax") lo, out("edx") hi, options(nostack, nomem, preserves_flags)) };
    ((hi as u64) << 32) | lo as u64
}

/// XSETBV of XCR0.
///
/// # Safety
/// CR4.OSXSAVE is set and `value` is a valid XCR0 for this CPU.
pub unsafe fn xsetbv0(value: u64) {
    // SAFETY: as the caller promises.
    unsafe {
        asm!("xsetbv", in("ecx") 0, in("eax") value as u32, in("edx") (value >> 32) as u32, options(nostack, nomem, preserves_flags))
    };
}

/// DR0-DR3 (`n` = 0-3; anything else reads DR3).
pub fn read_dr(n: u8) -> u64 {
    let v: u64;
    // SAFETY: reading a debug register in ring 0 has no side effects.
    unsafe {
        match n {
            0 => asm!("mov {}, dr0", out(reg) v, options(nostack, nomem, preserves_flags)),
            1 => asm!("mov {}, dr1", out(reg) v, options(nostack, nomem, preserves_flags)),
            2 => asm!("mov {}, dr2", out(reg) v, options(nostack, nomem, preserves_flags)),
            _ => asm!("mov {}, dr3", out(reg) v, options(nostack, nomem, preserves_flags)),
        }
    }
    v
}

/// Writes DR0-DR3 (`n` = 0-3; anything else writes DR3).
///
/// # Safety
/// `value` is canonical. The host runs with DR7 = 0x400 (#VMEXIT restores
/// the host's, APM Vol. 2 15.6), so breakpoint addresses have no effect on
/// it.
pub unsafe fn write_dr(n: u8, value: u64) {
    // SAFETY: as the caller promises.
    unsafe {
        match n {
            0 => asm!("mov dr0, {}", in(reg) value, options(nostack, nomem, preserves_flags)),
            1 => asm!("mov dr1, {}", in(reg) value, options(nostack, nomem, preserves_flags)),
            2 => asm!("mov dr2, {}", in(reg) value, options(nostack, nomem, preserves_flags)),
            _ => asm!("mov dr3, {}", in(reg) value, options(nostack, nomem, preserves_flags)),
        }
    }
}
