//! The state VMRUN refuses (APM Vol. 2 15.5.1, "Canonicalization and
//! Consistency Checks"), checked in software so that a failed VMRUN
//! (VMEXIT_INVALID, which says nothing more) is reported with the rule the
//! state breaks.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use vcpu::GuestState;
use vcpu::state::bits::*;

/// EFER bits that exist (SCE, LME, LMA, NXE, SVME, LMSLE, FFXSR, TCE);
/// the rest must be zero.
const EFER_DEFINED: u64 = 1 | (1 << 8) | (0x3f << 10);
/// CR4 bits an AMD CPU defines (VME..OSXMMEXCPT, UMIP, LA57, FSGSBASE,
/// PCIDE, OSXSAVE, SMEP, SMAP, PKE, CET); bit 13 (VMXE) is reserved.
const CR4_DEFINED: u64 = 0x7ff | (1 << 11) | (1 << 12) | (1 << 16) | (1 << 17) | (1 << 18) | (0xf << 20) | (1 << 23);

/// What the control area adds to the rules.
#[derive(Clone, Copy, Debug)]
pub struct ControlContext {
    pub asid: u32,
    pub intercepts_vmrun: bool,
    /// The EFER the VMCB holds (with SVME, which the neutral state hides).
    pub vmcb_efer: u64,
}

/// Every rule `s` breaks, as one line each; empty if VMRUN should accept it.
pub fn check_guest_state(s: &GuestState, c: &ControlContext) -> Vec<String> {
    let mut p = Vec::new();
    let efer = c.vmcb_efer;
    if efer & EFER_SVME == 0 {
        p.push(String::from("EFER.SVME is clear (VMRUN requires it in the guest's EFER)"));
    }
    if efer & !EFER_DEFINED != 0 {
        p.push(format!("EFER {efer:#x} sets reserved bits {:#x}", efer & !EFER_DEFINED));
    }
    if s.cr0 & CR0_CD == 0 && s.cr0 & CR0_NW != 0 {
        p.push(format!("CR0 {:#x}: NW set with CD clear", s.cr0));
    }
    if s.cr0 >> 32 != 0 {
        p.push(format!("CR0 {:#x}: bits 63:32 must be zero", s.cr0));
    }
    if s.cr3 >> 52 != 0 {
        p.push(format!("CR3 {:#x}: bits 63:52 must be zero", s.cr3));
    }
    if s.cr4 & !CR4_DEFINED != 0 {
        p.push(format!("CR4 {:#x} sets reserved bits {:#x}", s.cr4, s.cr4 & !CR4_DEFINED));
    }
    if s.dr6 >> 32 != 0 || s.dr7 >> 32 != 0 {
        p.push(format!("DR6 {:#x} / DR7 {:#x}: bits 63:32 must be zero", s.dr6, s.dr7));
    }
    let long_paging = efer & EFER_LME != 0 && s.cr0 & CR0_PG != 0;
    if long_paging && s.cr4 & CR4_PAE == 0 {
        p.push(String::from("EFER.LME and CR0.PG set with CR4.PAE clear"));
    }
    if long_paging && s.cr0 & CR0_PE == 0 {
        p.push(String::from("EFER.LME and CR0.PG set with CR0.PE clear"));
    }
    if long_paging && s.cr4 & CR4_PAE != 0 && s.cs.attrs.long() && s.cs.attrs.db() {
        p.push(format!("long mode with CS.L and CS.D both set (cs attributes {:#x})", s.cs.attrs.0));
    }
    if !c.intercepts_vmrun {
        p.push(String::from("the VMRUN intercept is clear"));
    }
    if c.asid == 0 {
        p.push(String::from("guest ASID 0 (the host's)"));
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use vcpu::{SegAttrs, Segment};

    fn long_mode() -> (GuestState, ControlContext) {
        let s = GuestState {
            cr0: CR0_PE | CR0_PG | CR0_ET | CR0_NE,
            cr4: CR4_PAE,
            efer: EFER_LME | EFER_LMA,
            cs: Segment { attrs: SegAttrs::CODE64, ..Default::default() },
            dr6: 0xffff_0ff0,
            dr7: 0x400,
            ..Default::default()
        };
        let c = ControlContext { asid: 1, intercepts_vmrun: true, vmcb_efer: s.efer | EFER_SVME };
        (s, c)
    }

    #[test]
    fn a_good_long_mode_state_passes() {
        let (s, c) = long_mode();
        assert_eq!(check_guest_state(&s, &c), Vec::<String>::new());
    }

    #[test]
    fn each_rule_is_reported() {
        let (s, c) = long_mode();
        let one = |s: &GuestState, c: &ControlContext, needle: &str| {
            let p = check_guest_state(s, c);
            assert!(p.iter().any(|l| l.contains(needle)), "{needle:?} not in {p:?}");
        };
        one(&s, &ControlContext { vmcb_efer: s.efer, ..c }, "SVME");
        one(&s, &ControlContext { vmcb_efer: c.vmcb_efer | (1 << 20), ..c }, "EFER");
        one(&GuestState { cr0: s.cr0 | CR0_NW, ..s.clone() }, &c, "NW set");
        one(&GuestState { cr0: s.cr0 | (1 << 40), ..s.clone() }, &c, "CR0");
        one(&GuestState { cr3: 1 << 60, ..s.clone() }, &c, "CR3");
        one(&GuestState { cr4: s.cr4 | CR4_VMXE, ..s.clone() }, &c, "CR4");
        one(&GuestState { cr4: 0, ..s.clone() }, &c, "CR4.PAE");
        let mut cs = s.cs;
        cs.attrs.0 |= SegAttrs::DB;
        one(&GuestState { cs, ..s.clone() }, &c, "CS.L and CS.D");
        one(&s, &ControlContext { intercepts_vmrun: false, ..c }, "VMRUN intercept");
        one(&s, &ControlContext { asid: 0, ..c }, "ASID 0");
    }
}
