//! What CPUID tells a guest: the host's answer with the features this
//! hypervisor does not virtualise removed, the hypervisor-present bit set,
//! and a vendor leaf at 0x40000000 (the range reserved for hypervisors, see
//! the Intel SDM Vol. 2A CPUID "Hypervisor" note and Linux's
//! Documentation/virt/kvm/x86/cpuid.rst for the convention).

/// The signature in EBX:ECX:EDX of leaf 0x40000000.
pub const SIGNATURE: &[u8; 12] = b"RustyHVType1";
pub const HV_LEAF: u32 = 0x4000_0000;
/// Highest hypervisor leaf.
pub const HV_MAX_LEAF: u32 = 0x4000_0001;
/// Interface version in leaf 0x40000001 EAX.
pub const HV_VERSION: u32 = 1;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Regs {
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// Facts about the host that change what guests may be told.
#[derive(Clone, Copy, Debug, Default)]
pub struct HostQuirks {
    /// IA32_MISC_ENABLE.FAST_STRINGS is off (Bochs): then ERMS/FSRM must be
    /// hidden, or Linux's short `memmove` faults forever.
    pub fast_strings_off: bool,
    /// The backend lets the guest run RDTSCP and RDPID with its own
    /// IA32_TSC_AUX (VT-x: "enable RDTSCP"; AMD-V: the CPU has the MSR, which
    /// the backend switches). Otherwise both are hidden, and raise #UD.
    pub rdtscp: bool,
}

// Leaf 1 ECX (SDM Vol. 2A table 3-10).
const ECX_MONITOR: u32 = 1 << 3;
const ECX_DS_CPL: u32 = 1 << 4;
const ECX_VMX: u32 = 1 << 5;
const ECX_SMX: u32 = 1 << 6;
const ECX_EST: u32 = 1 << 7;
const ECX_TM2: u32 = 1 << 8;
const ECX_PDCM: u32 = 1 << 15;
const ECX_PCID: u32 = 1 << 17;
const ECX_X2APIC: u32 = 1 << 21;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_XSAVE: u32 = 1 << 26;
const ECX_OSXSAVE: u32 = 1 << 27;
const ECX_AVX: u32 = 1 << 28;
const ECX_HYPERVISOR: u32 = 1 << 31;
// Leaf 1 EDX (table 3-11).
const EDX_VME: u32 = 1 << 1;
const EDX_DE: u32 = 1 << 2;
const EDX_PSE: u32 = 1 << 3;
const EDX_PAE: u32 = 1 << 6;
const EDX_MCE: u32 = 1 << 7;
const EDX_PGE: u32 = 1 << 13;
const EDX_FXSR: u32 = 1 << 24;
const EDX_SSE: u32 = 1 << 25;
const EDX_APIC: u32 = 1 << 9;
const EDX_DS: u32 = 1 << 21;
const EDX_ACPI: u32 = 1 << 22;
const EDX_TM: u32 = 1 << 29;
const EDX_PBE: u32 = 1 << 31;
// Leaf 7 subleaf 0.
const L7_EBX_FSGSBASE: u32 = 1 << 0;
/// IA32_TSC_ADJUST is not emulated (its MSR raises #GP).
const L7_EBX_TSC_ADJUST: u32 = 1 << 1;
const L7_EBX_SMEP: u32 = 1 << 7;
const L7_EBX_ERMS: u32 = 1 << 9;
/// MPX: its bound registers are XSAVE state the guest cannot have.
const L7_EBX_MPX: u32 = 1 << 14;
const L7_EBX_SMAP: u32 = 1 << 20;
const L7_EBX_AVX2: u32 = 1 << 5;
const L7_EBX_AVX512: u32 = 0xd023_0000; // F, DQ, IFMA, CD, BW, VL
const L7_ECX_UMIP: u32 = 1 << 2;
/// PKU and CET: PKRU and the CET registers are XSAVE state that is not
/// switched between VMs, so guests must not be told to use them.
const L7_ECX_PKU: u32 = 1 << 3;
const L7_ECX_WAITPKG: u32 = 1 << 5;
const L7_ECX_CET_SS: u32 = 1 << 7;
/// 5-level paging: the hypervisor's walks of guest page tables (reports,
/// instruction bytes on AMD without NRIPS, MOV DR and MMIO decoding) know
/// 4 levels, so a guest must not turn on a fifth.
const L7_ECX_LA57: u32 = 1 << 16;
const L7_ECX_RDPID: u32 = 1 << 22;
const L7_EDX_CET_IBT: u32 = 1 << 20;
/// AMX: tile state is XSAVE state too.
const L7_EDX_AMX: u32 = (1 << 22) | (1 << 24) | (1 << 25);
const L7_EDX_FSRM: u32 = 1 << 4;
/// IBRS/IBPB, STIBP, L1D_FLUSH, ARCH_CAPABILITIES, SSBD: their MSRs are
/// not virtualised yet, so the guest must not be told to use them.
const L7_EDX_SPEC: u32 = (1 << 26) | (1 << 27) | (1 << 28) | (1 << 29) | (1 << 31);
// 0x80000001 ECX and EDX.
const EXT_ECX_SVM: u32 = 1 << 2;
const EXT_EDX_RDTSCP: u32 = 1 << 27;
/// The XSAVE area's size for what XCR0 may enable (x87 and SSE): the
/// 512-byte legacy region and the 64-byte header (SDM Vol. 1 13.4).
const XSAVE_LEGACY_SIZE: u32 = 576;

/// The guest's answer for `leaf`/`subleaf`, given the host's answer.
pub fn guest_cpuid(leaf: u32, subleaf: u32, host: Regs, quirks: HostQuirks) -> Regs {
    let _ = subleaf;
    let mut r = host;
    match leaf {
        1 => {
            // XSAVE stays (with XCR0 limited to x87 and SSE, leaf 0xD);
            // OSXSAVE mirrors the guest's CR4 and is set by the caller.
            r.ecx &= !(ECX_MONITOR
                | ECX_DS_CPL
                | ECX_VMX
                | ECX_SMX
                | ECX_EST
                | ECX_TM2
                | ECX_PDCM
                | ECX_X2APIC
                | ECX_OSXSAVE
                | ECX_AVX);
            r.ecx |= ECX_HYPERVISOR;
            // The local APIC (xAPIC; x2APIC hidden: Linux would not use it
            // without interrupt remapping) with its TSC-deadline timer.
            r.edx &= !(EDX_DS | EDX_ACPI | EDX_TM | EDX_PBE);
            r.edx |= EDX_APIC;
            r.ecx |= ECX_TSC_DEADLINE;
            // One logical processor, initial APIC id 0.
            r.ebx = (r.ebx & 0xffff) | (1 << 16);
        }
        // Thermal/power and topology leaves describe hardware the guest
        // does not have.
        5 | 6 | 0xb | 0x1f => r = Regs::default(),
        // XSAVE: only the x87 and SSE components, which the saved state
        // holds (`vcpu::state::XCR0_SUPPORTED`); no XSAVEOPT, XSAVEC or
        // XSAVES (subleaf 1), no further components.
        0xd => {
            r = if subleaf == 0 && host.eax & 1 != 0 {
                let mask = host.eax & vcpu::state::XCR0_SUPPORTED as u32;
                Regs { eax: mask, ebx: XSAVE_LEGACY_SIZE, ecx: XSAVE_LEGACY_SIZE, edx: 0 }
            } else {
                Regs::default()
            }
        }
        7 => {
            if subleaf == 0 {
                r.ebx &= !(L7_EBX_AVX2 | L7_EBX_AVX512 | L7_EBX_TSC_ADJUST | L7_EBX_MPX);
                r.ecx &= !(L7_ECX_WAITPKG | L7_ECX_PKU | L7_ECX_CET_SS | L7_ECX_LA57);
                if !quirks.rdtscp {
                    r.ecx &= !L7_ECX_RDPID;
                }
                r.edx &= !(L7_EDX_SPEC | L7_EDX_CET_IBT | L7_EDX_AMX);
                if quirks.fast_strings_off {
                    r.ebx &= !L7_EBX_ERMS;
                    r.edx &= !L7_EDX_FSRM;
                }
            } else {
                r = Regs::default();
            }
        }
        HV_LEAF => {
            let w = |i: usize| u32::from_le_bytes([SIGNATURE[i], SIGNATURE[i + 1], SIGNATURE[i + 2], SIGNATURE[i + 3]]);
            r = Regs { eax: HV_MAX_LEAF, ebx: w(0), ecx: w(4), edx: w(8) };
        }
        0x4000_0001 => r = Regs { eax: HV_VERSION, ..Default::default() },
        0x4000_0002..=0x4fff_ffff => r = Regs::default(),
        0x8000_0001 => {
            r.ecx &= !EXT_ECX_SVM;
            if !quirks.rdtscp {
                r.edx &= !EXT_EDX_RDTSCP;
            }
        }
        _ => {}
    }
    r
}

/// CR4 bits a guest may set: those of the features its CPUID reports (SDM
/// Vol. 3A 2.5 and the CPUID feature each bit belongs to), never VMXE or
/// SMXE. `cpuid` answers as the guest's CPUID does.
pub fn cr4_allowed(cpuid: impl Fn(u32, u32) -> Regs) -> u64 {
    let l1 = cpuid(1, 0);
    let l7 = cpuid(7, 0);
    let bit = |has: bool, b: u32| if has { 1u64 << b } else { 0 };
    // TSD (2) and PCE (8) exist on every x86-64 CPU.
    let mut m = (1 << 2) | (1 << 8);
    m |= bit(l1.edx & EDX_VME != 0, 0) | bit(l1.edx & EDX_VME != 0, 1);
    m |= bit(l1.edx & EDX_DE != 0, 3) | bit(l1.edx & EDX_PSE != 0, 4) | bit(l1.edx & EDX_PAE != 0, 5);
    m |= bit(l1.edx & EDX_MCE != 0, 6) | bit(l1.edx & EDX_PGE != 0, 7);
    m |= bit(l1.edx & EDX_FXSR != 0, 9) | bit(l1.edx & EDX_SSE != 0, 10);
    m |= bit(l7.ecx & L7_ECX_UMIP != 0, 11) | bit(l7.ecx & L7_ECX_LA57 != 0, 12);
    m |= bit(l7.ebx & L7_EBX_FSGSBASE != 0, 16) | bit(l1.ecx & ECX_PCID != 0, 17);
    m |= bit(l1.ecx & ECX_XSAVE != 0, 18) | bit(l7.ebx & L7_EBX_SMEP != 0, 20);
    m |= bit(l7.ebx & L7_EBX_SMAP != 0, 21) | bit(l7.ecx & L7_ECX_PKU != 0, 22);
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: Regs = Regs { eax: !0, ebx: !0, ecx: !0, edx: !0 };

    #[test]
    fn five_level_paging_is_hidden_and_its_cr4_bit_refused() {
        let r = guest_cpuid(7, 0, ALL, HostQuirks::default());
        assert_eq!(r.ecx & L7_ECX_LA57, 0);
        let allowed = cr4_allowed(|l, s| guest_cpuid(l, s, ALL, HostQuirks::default()));
        assert_eq!(allowed & (1 << 12), 0, "CR4.LA57");
    }

    #[test]
    fn hides_virtualisation_and_sets_hypervisor_bit() {
        let r = guest_cpuid(1, 0, Regs { ecx: ECX_VMX | ECX_SMX, ..Default::default() }, HostQuirks::default());
        assert_eq!(r.ecx & (ECX_VMX | ECX_SMX), 0);
        assert_ne!(r.ecx & ECX_HYPERVISOR, 0);
        let r = guest_cpuid(0x8000_0001, 0, ALL, HostQuirks::default());
        assert_eq!(r.ecx & EXT_ECX_SVM, 0);
        assert_eq!(r.edx, !EXT_EDX_RDTSCP, "NX, LM, 1 GiB pages pass through; RDTSCP only with TSC_AUX");
    }

    #[test]
    fn vendor_leaf_names_the_hypervisor() {
        let r = guest_cpuid(HV_LEAF, 0, ALL, HostQuirks::default());
        let mut sig = [0u8; 12];
        sig[..4].copy_from_slice(&r.ebx.to_le_bytes());
        sig[4..8].copy_from_slice(&r.ecx.to_le_bytes());
        sig[8..].copy_from_slice(&r.edx.to_le_bytes());
        assert_eq!(&sig, SIGNATURE);
        assert_eq!(r.eax, HV_MAX_LEAF);
        assert_eq!(guest_cpuid(0x4000_0001, 0, ALL, HostQuirks::default()).eax, HV_VERSION);
        assert_eq!(guest_cpuid(0x4000_0100, 0, ALL, HostQuirks::default()), Regs::default());
    }

    #[test]
    fn fast_string_quirk_hides_erms_and_fsrm() {
        let q = HostQuirks { fast_strings_off: true, ..Default::default() };
        let r = guest_cpuid(7, 0, ALL, q);
        assert_eq!(r.ebx & L7_EBX_ERMS, 0);
        assert_eq!(r.edx & L7_EDX_FSRM, 0);
        let r = guest_cpuid(7, 0, ALL, HostQuirks::default());
        assert_ne!(r.edx & L7_EDX_FSRM, 0);
    }

    #[test]
    fn leaf1_reports_one_cpu_with_an_xapic_and_its_tsc_deadline_timer() {
        let r = guest_cpuid(1, 0, ALL, HostQuirks::default());
        assert_eq!(r.ebx >> 16, 1);
        assert_eq!(r.ebx >> 24, 0, "initial APIC id 0");
        assert_ne!(r.edx & EDX_APIC, 0);
        assert_eq!(r.ecx & (ECX_X2APIC | ECX_TSC_DEADLINE), ECX_TSC_DEADLINE);
        assert_eq!(r.ecx & (ECX_MONITOR | ECX_AVX), 0, "no MONITOR/MWAIT, no AVX");
        assert_eq!(r.ecx & ECX_OSXSAVE, 0, "OSXSAVE follows the guest's CR4 (set by the exit handler)");
        assert_ne!(r.ecx & ECX_XSAVE, 0);
        assert_eq!(guest_cpuid(5, 0, ALL, HostQuirks::default()), Regs::default(), "no MONITOR leaf");
        let r = guest_cpuid(1, 0, Regs::default(), HostQuirks::default());
        assert_ne!(r.edx & EDX_APIC, 0, "whatever the host says");
    }

    #[test]
    fn xsave_offers_only_x87_and_sse() {
        let host = Regs { eax: 0x2e7, ebx: 2696, ecx: 2696, edx: 0 };
        let r = guest_cpuid(0xd, 0, host, HostQuirks::default());
        assert_eq!(r, Regs { eax: 3, ebx: 576, ecx: 576, edx: 0 });
        assert_eq!(guest_cpuid(0xd, 1, ALL, HostQuirks::default()), Regs::default(), "no XSAVEOPT/XSAVEC/XSAVES");
        assert_eq!(guest_cpuid(0xd, 2, ALL, HostQuirks::default()), Regs::default(), "no AVX component");
        let r = guest_cpuid(7, 0, ALL, HostQuirks::default());
        assert_eq!(r.ecx & (L7_ECX_PKU | L7_ECX_CET_SS), 0);
        assert_eq!(r.ebx & (L7_EBX_MPX | L7_EBX_TSC_ADJUST), 0);
    }

    #[test]
    fn rdtscp_and_rdpid_only_with_tsc_aux() {
        let q = HostQuirks { rdtscp: true, ..Default::default() };
        assert_ne!(guest_cpuid(0x8000_0001, 0, ALL, q).edx & EXT_EDX_RDTSCP, 0);
        assert_ne!(guest_cpuid(7, 0, ALL, q).ecx & L7_ECX_RDPID, 0);
        let none = HostQuirks::default();
        assert_eq!(guest_cpuid(0x8000_0001, 0, ALL, none).edx & EXT_EDX_RDTSCP, 0);
        assert_eq!(guest_cpuid(7, 0, ALL, none).ecx & L7_ECX_RDPID, 0);
    }

    #[test]
    fn cr4_follows_the_guests_cpuid() {
        let all = cr4_allowed(|l, s| guest_cpuid(l, s, ALL, HostQuirks::default()));
        assert_eq!(all & ((1 << 13) | (1 << 14)), 0, "VMXE and SMXE never");
        assert_ne!(all & (1 << 18), 0, "OSXSAVE with XSAVE");
        assert_eq!(all & (1 << 22), 0, "PKE: PKU is hidden");
        assert_ne!(all & 0x7ff, 0);
        let bare = cr4_allowed(|_, _| Regs::default());
        assert_eq!(bare, (1 << 2) | (1 << 8));
    }
}
