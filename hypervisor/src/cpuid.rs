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
}

// Leaf 1 ECX (SDM Vol. 2A table 3-10).
const ECX_MONITOR: u32 = 1 << 3;
const ECX_DS_CPL: u32 = 1 << 4;
const ECX_VMX: u32 = 1 << 5;
const ECX_SMX: u32 = 1 << 6;
const ECX_EST: u32 = 1 << 7;
const ECX_TM2: u32 = 1 << 8;
const ECX_PDCM: u32 = 1 << 15;
const ECX_X2APIC: u32 = 1 << 21;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_XSAVE: u32 = 1 << 26;
const ECX_OSXSAVE: u32 = 1 << 27;
const ECX_AVX: u32 = 1 << 28;
const ECX_HYPERVISOR: u32 = 1 << 31;
// Leaf 1 EDX (table 3-11).
const EDX_APIC: u32 = 1 << 9;
const EDX_DS: u32 = 1 << 21;
const EDX_ACPI: u32 = 1 << 22;
const EDX_TM: u32 = 1 << 29;
const EDX_PBE: u32 = 1 << 31;
// Leaf 7 subleaf 0.
const L7_EBX_ERMS: u32 = 1 << 9;
const L7_EBX_AVX2: u32 = 1 << 5;
const L7_EBX_AVX512: u32 = 0xd023_0000; // F, DQ, IFMA, CD, BW, VL
const L7_ECX_WAITPKG: u32 = 1 << 5;
const L7_EDX_FSRM: u32 = 1 << 4;
/// IBRS/IBPB, STIBP, L1D_FLUSH, ARCH_CAPABILITIES, SSBD: their MSRs are
/// not virtualised yet, so the guest must not be told to use them.
const L7_EDX_SPEC: u32 = (1 << 26) | (1 << 27) | (1 << 28) | (1 << 29) | (1 << 31);
// 0x80000001 ECX.
const EXT_ECX_SVM: u32 = 1 << 2;

/// The guest's answer for `leaf`/`subleaf`, given the host's answer.
pub fn guest_cpuid(leaf: u32, subleaf: u32, host: Regs, quirks: HostQuirks) -> Regs {
    let _ = subleaf;
    let mut r = host;
    match leaf {
        1 => {
            r.ecx &= !(ECX_MONITOR
                | ECX_DS_CPL
                | ECX_VMX
                | ECX_SMX
                | ECX_EST
                | ECX_TM2
                | ECX_PDCM
                | ECX_X2APIC
                | ECX_TSC_DEADLINE
                | ECX_XSAVE
                | ECX_OSXSAVE
                | ECX_AVX);
            r.ecx |= ECX_HYPERVISOR;
            r.edx &= !(EDX_APIC | EDX_DS | EDX_ACPI | EDX_TM | EDX_PBE);
            // One logical processor, initial APIC id 0.
            r.ebx = (r.ebx & 0xffff) | (1 << 16);
        }
        // Thermal/power, topology and XSAVE leaves describe hardware the
        // guest does not have.
        5 | 6 | 0xb | 0xd | 0x1f => r = Regs::default(),
        7 => {
            if subleaf == 0 {
                r.ebx &= !(L7_EBX_AVX2 | L7_EBX_AVX512);
                r.ecx &= !L7_ECX_WAITPKG;
                r.edx &= !L7_EDX_SPEC;
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
        0x8000_0001 => r.ecx &= !EXT_ECX_SVM,
        _ => {}
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: Regs = Regs { eax: !0, ebx: !0, ecx: !0, edx: !0 };

    #[test]
    fn hides_virtualisation_and_sets_hypervisor_bit() {
        let r = guest_cpuid(1, 0, Regs { ecx: ECX_VMX | ECX_SMX, ..Default::default() }, HostQuirks::default());
        assert_eq!(r.ecx & (ECX_VMX | ECX_SMX), 0);
        assert_ne!(r.ecx & ECX_HYPERVISOR, 0);
        let r = guest_cpuid(0x8000_0001, 0, ALL, HostQuirks::default());
        assert_eq!(r.ecx & EXT_ECX_SVM, 0);
        assert_eq!(r.edx, !0, "NX, LM, 1 GiB pages pass through");
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
        let q = HostQuirks { fast_strings_off: true };
        let r = guest_cpuid(7, 0, ALL, q);
        assert_eq!(r.ebx & L7_EBX_ERMS, 0);
        assert_eq!(r.edx & L7_EDX_FSRM, 0);
        let r = guest_cpuid(7, 0, ALL, HostQuirks::default());
        assert_ne!(r.edx & L7_EDX_FSRM, 0);
    }

    #[test]
    fn leaf1_reports_one_cpu_and_no_apic() {
        let r = guest_cpuid(1, 0, ALL, HostQuirks::default());
        assert_eq!(r.ebx >> 16, 1);
        assert_eq!(r.edx & EDX_APIC, 0);
        assert_eq!(r.ecx & (ECX_XSAVE | ECX_OSXSAVE), 0);
    }
}
