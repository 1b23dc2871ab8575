//! VMX instructions and the few privileged operations the backend needs.
//! Hand-written rather than `x86::bits64::vmx` because the status flags
//! (CF = VMfailInvalid, ZF = VMfailValid; SDM Vol. 3C 31.2) must be read in
//! the same `asm!` block as the instruction: the compiler may clobber RFLAGS
//! between two blocks. The exit path uses unchecked VMREAD/VMWRITE of fields
//! that exist by construction.

use core::arch::asm;
use x86::vmx::vmcs::ro;

/// A failed VMX instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmFail {
    /// No current VMCS (or bad pointer): CF set.
    Invalid,
    /// The current VMCS holds the VM-instruction error number.
    Valid(u64),
}

impl core::fmt::Display for VmFail {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            VmFail::Invalid => write!(f, "VMfailInvalid"),
            VmFail::Valid(n) => write!(f, "VM-instruction error {n} ({})", crate::names::instruction_error(*n)),
        }
    }
}

fn status(cf: u8, zf: u8) -> Result<(), VmFail> {
    if cf != 0 {
        Err(VmFail::Invalid)
    } else if zf != 0 {
        // SAFETY: ZF means a current VMCS exists and holds the error number.
        Err(VmFail::Valid(unsafe { vmread(ro::VM_INSTRUCTION_ERROR) }))
    } else {
        Ok(())
    }
}

macro_rules! vmx_op_pa {
    ($name:ident, $insn:literal) => {
        /// # Safety
        /// VMX root operation; `pa` is a VMX region as the SDM requires.
        pub unsafe fn $name(pa: u64) -> Result<(), VmFail> {
            let (cf, zf): (u8, u8);
            // SAFETY: the caller upholds the instruction's requirements; the
            // operand is a pointer to a local.
            unsafe {
                asm!(concat!($insn, " qword ptr [{p}]"), "setc {cf}", "setz {zf}",
                    p = in(reg) &pa, cf = out(reg_byte) cf, zf = out(reg_byte) zf,
                    options(nostack));
            }
            status(cf, zf)
        }
    };
}

vmx_op_pa!(vmxon, "vmxon");
vmx_op_pa!(vmclear, "vmclear");
vmx_op_pa!(vmptrld, "vmptrld");

/// VMREAD without a status check.
///
/// # Safety
/// A current VMCS exists and `field` is supported by the CPU.
#[inline(always)]
pub unsafe fn vmread(field: u32) -> u64 {
    let v: u64;
    // SAFETY: as the caller promises.
    unsafe { asm!("vmread {v}, {f}", v = out(reg) v, f = in(reg) field as u64, options(nostack, nomem)) };
    v
}

/// VMWRITE without a status check.
///
/// # Safety
/// A current VMCS exists, `field` is supported and writable, and `value`
/// keeps the guest or host state the VMCS describes sound.
#[inline(always)]
pub unsafe fn vmwrite(field: u32, value: u64) {
    // SAFETY: as the caller promises.
    unsafe { asm!("vmwrite {f}, {v}", f = in(reg) field as u64, v = in(reg) value, options(nostack, nomem)) };
}

/// VMWRITE that reports failure (used while building a VMCS).
///
/// # Safety
/// As for [`vmwrite`], except that an unsupported field is reported.
pub unsafe fn vmwrite_checked(field: u32, value: u64) -> Result<(), VmFail> {
    let (cf, zf): (u8, u8);
    // SAFETY: as the caller promises.
    unsafe {
        asm!("vmwrite {f}, {v}", "setc {cf}", "setz {zf}", f = in(reg) field as u64, v = in(reg) value,
            cf = out(reg_byte) cf, zf = out(reg_byte) zf, options(nostack, nomem));
    }
    status(cf, zf)
}

/// INVEPT type 1 (single context) or 2 (all contexts).
///
/// # Safety
/// VMX root operation with the INVEPT type supported.
pub unsafe fn invept(kind: u64, eptp: u64) -> Result<(), VmFail> {
    let desc: [u64; 2] = [eptp, 0];
    let (cf, zf): (u8, u8);
    // SAFETY: the descriptor is a local 128-bit value (SDM Vol. 3C 31.3).
    unsafe {
        asm!("invept {k}, [{d}]", "setc {cf}", "setz {zf}", k = in(reg) kind, d = in(reg) &desc,
            cf = out(reg_byte) cf, zf = out(reg_byte) zf, options(nostack));
    }
    status(cf, zf)
}

/// INVVPID type 1 (single context) or 2 (all contexts).
///
/// # Safety
/// VMX root operation with the INVVPID type supported.
pub unsafe fn invvpid(kind: u64, vpid: u16) -> Result<(), VmFail> {
    let desc: [u64; 2] = [vpid as u64, 0];
    let (cf, zf): (u8, u8);
    // SAFETY: as for `invept`.
    unsafe {
        asm!("invvpid {k}, [{d}]", "setc {cf}", "setz {zf}", k = in(reg) kind, d = in(reg) &desc,
            cf = out(reg_byte) cf, zf = out(reg_byte) zf, options(nostack));
    }
    status(cf, zf)
}

/// # Safety
/// `msr` exists on this CPU.
pub unsafe fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: as the caller promises.
    unsafe { asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nostack, nomem)) };
    ((hi as u64) << 32) | lo as u64
}

/// # Safety
/// `msr` exists and `value` is valid for it and keeps the host sound.
pub unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: as the caller promises.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32, options(nostack, nomem))
    };
}

/// The CPU's CR2, for the guest CR2 switch (`crate::cr2`).
pub struct Cr2;

impl crate::cr2::Cr2Register for Cr2 {
    #[inline(always)]
    fn get(&self) -> u64 {
        let v;
        // SAFETY: reading CR2 has no side effects.
        unsafe { asm!("mov {}, cr2", out(reg) v, options(nostack, nomem, preserves_flags)) };
        v
    }

    #[inline(always)]
    fn set(&mut self, value: u64) {
        // SAFETY: CR2 only reports the address of the last page fault; no
        // host code depends on its value (a host page fault is fatal and
        // reports the value the fault itself wrote).
        unsafe { asm!("mov cr2, {}", in(reg) value, options(nostack, nomem, preserves_flags)) };
    }
}

pub fn read_cr0() -> u64 {
    let v;
    // SAFETY: reading CR0 has no side effects.
    unsafe { asm!("mov {}, cr0", out(reg) v, options(nostack, nomem)) };
    v
}

pub fn read_cr3() -> u64 {
    let v;
    // SAFETY: reading CR3 has no side effects.
    unsafe { asm!("mov {}, cr3", out(reg) v, options(nostack, nomem)) };
    v
}

pub fn read_cr4() -> u64 {
    let v;
    // SAFETY: reading CR4 has no side effects.
    unsafe { asm!("mov {}, cr4", out(reg) v, options(nostack, nomem)) };
    v
}

/// # Safety
/// The new value keeps the host's paging and protection intact.
pub unsafe fn write_cr0(v: u64) {
    // SAFETY: as the caller promises.
    unsafe { asm!("mov cr0, {}", in(reg) v, options(nostack, nomem)) };
}

/// # Safety
/// As for [`write_cr0`].
pub unsafe fn write_cr4(v: u64) {
    // SAFETY: as the caller promises.
    unsafe { asm!("mov cr4, {}", in(reg) v, options(nostack, nomem)) };
}

#[repr(C, packed)]
#[derive(Default)]
pub struct DtPtr {
    pub limit: u16,
    pub base: u64,
}

pub fn sgdt() -> DtPtr {
    let mut d = DtPtr::default();
    // SAFETY: SGDT stores 10 bytes into `d`.
    unsafe { asm!("sgdt [{}]", in(reg) &mut d, options(nostack)) };
    d
}

pub fn sidt() -> DtPtr {
    let mut d = DtPtr::default();
    // SAFETY: SIDT stores 10 bytes into `d`.
    unsafe { asm!("sidt [{}]", in(reg) &mut d, options(nostack)) };
    d
}

/// The host's segment selectors: CS, SS, DS, ES, FS, GS, TR.
pub fn selectors() -> [u16; 7] {
    let (cs, ss, ds, es, fs, gs, tr): (u16, u16, u16, u16, u16, u16, u16);
    // SAFETY: reading segment registers and the task register is harmless.
    unsafe {
        asm!("mov {0:x}, cs", "mov {1:x}, ss", "mov {2:x}, ds", "mov {3:x}, es", "mov {4:x}, fs",
            "mov {5:x}, gs", "str {6:x}",
            out(reg) cs, out(reg) ss, out(reg) ds, out(reg) es, out(reg) fs, out(reg) gs, out(reg) tr,
            options(nostack, nomem));
    }
    [cs, ss, ds, es, fs, gs, tr]
}

/// FXSAVE64 into a 512-byte, 16-byte aligned area.
///
/// # Safety
/// `area` is valid for 512 bytes and aligned; CR4.OSFXSR is set.
pub unsafe fn fxsave(area: *mut u8) {
    // SAFETY: as the caller promises.
    unsafe { asm!("fxsave64 [{}]", in(reg) area, options(nostack)) };
}

/// # Safety
/// `area` holds a valid FXSAVE image (reserved MXCSR bits clear).
pub unsafe fn fxrstor(area: *const u8) {
    // SAFETY: as the caller promises.
    unsafe { asm!("fxrstor64 [{}]", in(reg) area, options(nostack)) };
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

/// DR0-DR3 and DR6 (`n` = 0-3 or 6; anything else reads DR6).
pub fn read_dr(n: u8) -> u64 {
    let v: u64;
    // SAFETY: reading a debug register in ring 0 has no side effects.
    unsafe {
        match n {
            0 => asm!("mov {}, dr0", out(reg) v, options(nostack, nomem, preserves_flags)),
            1 => asm!("mov {}, dr1", out(reg) v, options(nostack, nomem, preserves_flags)),
            2 => asm!("mov {}, dr2", out(reg) v, options(nostack, nomem, preserves_flags)),
            3 => asm!("mov {}, dr3", out(reg) v, options(nostack, nomem, preserves_flags)),
            _ => asm!("mov {}, dr6", out(reg) v, options(nostack, nomem, preserves_flags)),
        }
    }
    v
}

/// Writes DR0-DR3 or DR6 (`n` = 0-3 or 6; anything else writes DR6).
///
/// # Safety
/// `value` is canonical (DR0-DR3) or has bits 63:32 clear (DR6). The host
/// runs with DR7 = 0x400 (VM exit sets it, SDM Vol. 3C 28.5.1), so
/// breakpoint addresses have no effect on it.
pub unsafe fn write_dr(n: u8, value: u64) {
    // SAFETY: as the caller promises.
    unsafe {
        match n {
            0 => asm!("mov dr0, {}", in(reg) value, options(nostack, nomem, preserves_flags)),
            1 => asm!("mov dr1, {}", in(reg) value, options(nostack, nomem, preserves_flags)),
            2 => asm!("mov dr2, {}", in(reg) value, options(nostack, nomem, preserves_flags)),
            3 => asm!("mov dr3, {}", in(reg) value, options(nostack, nomem, preserves_flags)),
            _ => asm!("mov dr6, {}", in(reg) value, options(nostack, nomem, preserves_flags)),
        }
    }
}
