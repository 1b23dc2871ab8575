//! The register instructions that exit, emulated by the architecture's
//! rules on either backend: MOV to and from control registers (as far as
//! they exit), MOV DR, XSETBV. Each returns `Ok` when the instruction
//! completed (the caller moves RIP past it) or the fault the CPU would have
//! raised (RIP stays at the instruction). Values come from the guest and
//! are checked before any reaches the backend.

use vcpu::state::XCR0_SUPPORTED;
use vcpu::state::bits::*;
use vcpu::{CrAccess, Event, Reg, Vcpu};

/// CR0 bits 63:32 are reserved (SDM Vol. 3A 2.5).
const CR0_RESERVED_HIGH: u64 = !0xffff_ffff;
/// DR6 bits software can write: B0-B3 and BD, BS, BT (SDM Vol. 3A 18.2.3);
/// the rest read as the fixed pattern.
const DR6_WRITABLE: u64 = 0xe00f;
/// DR7 bits 11, 12, 14 and 15 read as 0, bit 10 as 1 (18.2.4).
const DR7_ZERO: u64 = (1 << 11) | (1 << 12) | (1 << 14) | (1 << 15);

/// MOV to CR0 as the CPU checks it (SDM Vol. 3A 2.5, 10.8.5; Vol. 2B
/// "MOV—Move to/from Control Registers"), with the IA-32e transitions:
/// setting PG with EFER.LME activates long mode (LMA), clearing it leaves.
pub fn write_cr0(vcpu: &mut impl Vcpu, v: u64) -> Result<(), Event> {
    if v & CR0_RESERVED_HIGH != 0 || (v & CR0_PG != 0 && v & CR0_PE == 0) || (v & CR0_NW != 0 && v & CR0_CD == 0) {
        return Err(Event::GP0);
    }
    let old = vcpu.reg(Reg::Cr0);
    let efer = vcpu.reg(Reg::Efer);
    if v & CR0_PG != 0 && old & CR0_PG == 0 && efer & EFER_LME != 0 {
        if vcpu.reg(Reg::Cr4) & CR4_PAE == 0 {
            return Err(Event::GP0);
        }
        vcpu.set_reg(Reg::Efer, efer | EFER_LMA);
    } else if v & CR0_PG == 0 && old & CR0_PG != 0 && efer & EFER_LMA != 0 {
        vcpu.set_reg(Reg::Efer, efer & !EFER_LMA);
    }
    vcpu.set_reg(Reg::Cr0, v);
    Ok(())
}

/// MOV to CR4: VMXE and SMXE are refused (the guest is told it has neither),
/// as is every bit outside `allowed` (what the guest's CPUID advertises, see
/// `cpuid::cr4_allowed`) and clearing PAE in long mode.
pub fn write_cr4(vcpu: &mut impl Vcpu, v: u64, allowed: u64) -> Result<(), Event> {
    let long = vcpu.reg(Reg::Efer) & EFER_LMA != 0;
    if v & !allowed != 0 || (long && v & CR4_PAE == 0) {
        return Err(Event::GP0);
    }
    vcpu.set_reg(Reg::Cr4, v);
    Ok(())
}

/// A control-register access that exited. `cr4_allowed` as for
/// [`write_cr4`].
pub fn cr_access(vcpu: &mut impl Vcpu, cr: u8, access: CrAccess, cr4_allowed: u64) -> Result<(), Event> {
    // Privilege is checked before the exit on hardware; checked again here
    // because nothing above the backend should rely on that.
    if vcpu.cpl() != 0 {
        return Err(Event::GP0);
    }
    match access {
        CrAccess::MovTo { gpr } => {
            let v = vcpu.gprs().get(gpr);
            match cr {
                0 => write_cr0(vcpu, v),
                3 => {
                    // Bits 63:52 (but for bit 63, PCID's no-flush hint) must
                    // be zero in long mode (SDM Vol. 3A 4.5.4).
                    if vcpu.reg(Reg::Efer) & EFER_LMA != 0 && v & 0x7ff0_0000_0000_0000 != 0 {
                        return Err(Event::GP0);
                    }
                    vcpu.set_reg(Reg::Cr3, v & !(1 << 63));
                    Ok(())
                }
                4 => write_cr4(vcpu, v, cr4_allowed),
                8 => {
                    if v > 15 {
                        return Err(Event::GP0);
                    }
                    vcpu.set_reg(Reg::Cr8, v);
                    Ok(())
                }
                _ => Err(Event::UD),
            }
        }
        CrAccess::MovFrom { gpr } => {
            let v = match cr {
                0 => vcpu.reg(Reg::Cr0),
                3 => vcpu.reg(Reg::Cr3),
                4 => vcpu.reg(Reg::Cr4),
                8 => vcpu.reg(Reg::Cr8),
                _ => return Err(Event::UD),
            };
            vcpu.gprs_mut().set(gpr, v);
            Ok(())
        }
        CrAccess::Clts => {
            let v = vcpu.reg(Reg::Cr0) & !CR0_TS;
            vcpu.set_reg(Reg::Cr0, v);
            Ok(())
        }
        CrAccess::Lmsw { value } => {
            // LMSW loads PE, MP, EM and TS, and cannot clear PE.
            let old = vcpu.reg(Reg::Cr0);
            write_cr0(vcpu, (old & !0xe) | (value as u64 & 0xf) | (old & CR0_PE))
        }
    }
}

/// MOV to or from DR`dr` (SDM Vol. 3A 18.2; Vol. 2B "MOV—Move to/from Debug
/// Registers"): #GP at CPL > 0; DR4/DR5 alias DR6/DR7 unless CR4.DE makes
/// them #UD; DR7.GD turns the access into a general-detect #DB (DR6.BD set,
/// GD cleared so the handler can use the registers); bits 63:32 of DR6 and
/// DR7 cannot be set. A non-canonical DR0-DR3 address is refused with #GP
/// too (it could never match; the host never loads one).
pub fn dr_access(vcpu: &mut impl Vcpu, dr: u8, gpr: u8, write: bool) -> Result<(), Event> {
    if vcpu.cpl() != 0 {
        return Err(Event::GP0);
    }
    let dr = match dr {
        4 | 5 if vcpu.reg(Reg::Cr4) & CR4_DE != 0 => return Err(Event::UD),
        4 | 5 => dr + 2,
        n => n,
    };
    let Some(reg) = Reg::dr(dr) else { return Err(Event::UD) };
    let dr7 = vcpu.reg(Reg::Dr7);
    if dr7 & DR7_GD != 0 {
        let dr6 = vcpu.reg(Reg::Dr6);
        vcpu.set_reg(Reg::Dr6, dr6 | DR6_BD);
        vcpu.set_reg(Reg::Dr7, dr7 & !DR7_GD);
        return Err(Event::DB);
    }
    if !write {
        let v = vcpu.reg(reg);
        vcpu.gprs_mut().set(gpr, v);
        return Ok(());
    }
    let v = vcpu.gprs().get(gpr);
    let v = match reg {
        Reg::Dr6 | Reg::Dr7 if v >> 32 != 0 => return Err(Event::GP0),
        Reg::Dr6 => (v & DR6_WRITABLE) | DR6_FIXED,
        Reg::Dr7 => (v | DR7_FIXED) & !DR7_ZERO,
        _ if ((v as i64) >> 47) != 0 && ((v as i64) >> 47) != -1 => return Err(Event::GP0),
        _ => v,
    };
    vcpu.set_reg(reg, v);
    Ok(())
}

/// XSETBV (SDM Vol. 2D "XSETBV"): #UD without CR4.OSXSAVE; #GP(0) at CPL >
/// 0, for an XCR other than 0, or a value that clears x87, sets bits outside
/// `host_mask` (the host's CPUID 0xD.0 EDX:EAX) or beyond what the state
/// can hold ([`XCR0_SUPPORTED`]: x87 and SSE, the FXSAVE image).
pub fn xsetbv(vcpu: &mut impl Vcpu, host_mask: u64) -> Result<(), Event> {
    if vcpu.reg(Reg::Cr4) & CR4_OSXSAVE == 0 {
        return Err(Event::UD);
    }
    let g = vcpu.gprs();
    let (xcr, v) = (g.rcx as u32, (g.rdx << 32) | (g.rax & 0xffff_ffff));
    if vcpu.cpl() != 0 || xcr != 0 || v & 1 == 0 || v & !(host_mask & XCR0_SUPPORTED) != 0 {
        return Err(Event::GP0);
    }
    vcpu.set_reg(Reg::Xcr0, v);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::MockVcpu;

    fn long_mode() -> MockVcpu {
        let mut v = MockVcpu::new(&vcpu::GuestState {
            cr0: CR0_PE | CR0_PG | CR0_ET | CR0_NE,
            cr4: CR4_PAE,
            efer: EFER_LME | EFER_LMA,
            ..Default::default()
        });
        v.loaded = true;
        v
    }

    const ALL_CR4: u64 = 0x7f_ffff & !CR4_VMXE & !(1 << 14);

    #[test]
    fn cr0_writes_follow_the_rules_and_track_long_mode() {
        let mut v = long_mode();
        assert_eq!(write_cr0(&mut v, 1 << 32), Err(Event::GP0), "reserved high bits");
        assert_eq!(write_cr0(&mut v, CR0_PG), Err(Event::GP0), "PG without PE");
        assert_eq!(write_cr0(&mut v, CR0_PE | CR0_NW), Err(Event::GP0), "NW without CD");
        assert_eq!(write_cr0(&mut v, CR0_PE | CR0_ET), Ok(()));
        assert_eq!(v.reg(Reg::Efer) & EFER_LMA, 0, "paging off leaves long mode");
        v.set_reg(Reg::Cr4, 0);
        assert_eq!(write_cr0(&mut v, CR0_PE | CR0_PG), Err(Event::GP0), "LME and PG need PAE");
        v.set_reg(Reg::Cr4, CR4_PAE);
        assert_eq!(write_cr0(&mut v, CR0_PE | CR0_PG), Ok(()));
        assert_ne!(v.reg(Reg::Efer) & EFER_LMA, 0, "and activate long mode");
    }

    #[test]
    fn control_register_accesses() {
        let mut v = long_mode();
        v.gprs.rbx = CR4_PAE | CR4_VMXE;
        assert_eq!(cr_access(&mut v, 4, CrAccess::MovTo { gpr: 3 }, ALL_CR4), Err(Event::GP0), "VMXE is hidden");
        v.gprs.rbx = 0;
        assert_eq!(cr_access(&mut v, 4, CrAccess::MovTo { gpr: 3 }, ALL_CR4), Err(Event::GP0), "PAE in long mode");
        v.gprs.rbx = CR4_PAE | CR4_PGE;
        assert_eq!(cr_access(&mut v, 4, CrAccess::MovTo { gpr: 3 }, ALL_CR4), Ok(()));
        assert_eq!(cr_access(&mut v, 4, CrAccess::MovFrom { gpr: 9 }, ALL_CR4), Ok(()));
        assert_eq!(v.gprs.r9, CR4_PAE | CR4_PGE);
        v.gprs.rax = 16;
        assert_eq!(cr_access(&mut v, 8, CrAccess::MovTo { gpr: 0 }, ALL_CR4), Err(Event::GP0), "TPR is 4 bits");
        v.gprs.rax = 9;
        assert_eq!(cr_access(&mut v, 8, CrAccess::MovTo { gpr: 0 }, ALL_CR4), Ok(()));
        assert_eq!(v.reg(Reg::Cr8), 9);
        v.gprs.rcx = 1 << 60;
        assert_eq!(cr_access(&mut v, 3, CrAccess::MovTo { gpr: 1 }, ALL_CR4), Err(Event::GP0));
        v.gprs.rcx = (1 << 63) | 0x5000;
        assert_eq!(cr_access(&mut v, 3, CrAccess::MovTo { gpr: 1 }, ALL_CR4), Ok(()));
        assert_eq!(v.reg(Reg::Cr3), 0x5000, "the no-flush hint is not part of CR3");
        v.set_reg(Reg::Cr0, v.reg(Reg::Cr0) | CR0_TS);
        assert_eq!(cr_access(&mut v, 0, CrAccess::Clts, ALL_CR4), Ok(()));
        assert_eq!(v.reg(Reg::Cr0) & CR0_TS, 0);
        assert_eq!(cr_access(&mut v, 0, CrAccess::Lmsw { value: 0xe }, ALL_CR4), Ok(()));
        assert_eq!(v.reg(Reg::Cr0) & 0xf, 0xf, "LMSW cannot clear PE");
        assert_eq!(cr_access(&mut v, 5, CrAccess::MovFrom { gpr: 0 }, ALL_CR4), Err(Event::UD));
        v.cpl = 3;
        assert_eq!(cr_access(&mut v, 0, CrAccess::MovFrom { gpr: 0 }, ALL_CR4), Err(Event::GP0));
    }

    #[test]
    fn debug_register_accesses() {
        let mut v = long_mode();
        v.gprs.rax = 0xffff_8000_0000_1000;
        assert_eq!(dr_access(&mut v, 2, 0, true), Ok(()));
        assert_eq!(dr_access(&mut v, 2, 5, false), Ok(()));
        assert_eq!(v.gprs.rbp, 0xffff_8000_0000_1000);
        v.gprs.rax = 0x0000_8000_0000_0000;
        assert_eq!(dr_access(&mut v, 1, 0, true), Err(Event::GP0), "not canonical");
        v.gprs.rax = 1 << 32;
        assert_eq!(dr_access(&mut v, 7, 0, true), Err(Event::GP0), "DR7 bits 63:32");
        v.gprs.rax = 0;
        assert_eq!(dr_access(&mut v, 6, 0, true), Ok(()));
        assert_eq!(v.reg(Reg::Dr6), DR6_FIXED, "fixed bits read as 1");
        v.gprs.rax = 0x3;
        assert_eq!(dr_access(&mut v, 5, 0, true), Ok(()), "DR5 is DR7 without CR4.DE");
        assert_eq!(v.reg(Reg::Dr7), 0x403);
        v.set_reg(Reg::Cr4, CR4_PAE | CR4_DE);
        assert_eq!(dr_access(&mut v, 4, 0, false), Err(Event::UD), "DR4 with CR4.DE");
        v.gprs.rax = 0x403 | DR7_GD;
        assert_eq!(dr_access(&mut v, 7, 0, true), Ok(()));
        assert_eq!(dr_access(&mut v, 0, 0, false), Err(Event::DB), "general detect");
        assert_ne!(v.reg(Reg::Dr6) & DR6_BD, 0);
        assert_eq!(v.reg(Reg::Dr7) & DR7_GD, 0, "GD cleared for the handler");
        assert_eq!(dr_access(&mut v, 0, 0, false), Ok(()));
        v.cpl = 3;
        assert_eq!(dr_access(&mut v, 0, 0, false), Err(Event::GP0));
    }

    #[test]
    fn xsetbv_checks_the_xcr_the_value_and_the_mode() {
        let mut v = long_mode();
        v.gprs.rax = 3;
        assert_eq!(xsetbv(&mut v, 7), Err(Event::UD), "CR4.OSXSAVE off");
        v.set_reg(Reg::Cr4, CR4_PAE | CR4_OSXSAVE);
        assert_eq!(xsetbv(&mut v, 7), Ok(()));
        assert_eq!(v.reg(Reg::Xcr0), 3);
        v.gprs.rax = 7;
        assert_eq!(xsetbv(&mut v, 7), Err(Event::GP0), "AVX: the state holds no YMM registers");
        v.gprs.rax = 2;
        assert_eq!(xsetbv(&mut v, 7), Err(Event::GP0), "x87 must stay");
        v.gprs.rax = 3;
        assert_eq!(xsetbv(&mut v, 1), Err(Event::GP0), "SSE beyond the host's mask");
        v.gprs.rcx = 1;
        assert_eq!(xsetbv(&mut v, 7), Err(Event::GP0), "XCR1");
        v.gprs.rcx = 0;
        v.gprs.rdx = 1;
        assert_eq!(xsetbv(&mut v, 7), Err(Event::GP0), "EDX bits");
        assert_eq!(v.reg(Reg::Xcr0), 3, "refused writes change nothing");
    }
}
