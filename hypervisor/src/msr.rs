//! MSRs the guest reaches through exits (the backends pass the safe ones
//! straight through). Known MSRs are emulated with per-VM values; anything
//! else raises #GP, which is what hardware does for an MSR it lacks.

/// Per-VM values of emulated MSRs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MsrState {
    pub mtrr_def_type: u64,
    pub misc_enable: u64,
}

impl Default for MsrState {
    fn default() -> Self {
        // MISC_ENABLE: fast strings on, BTS and PEBS unavailable (SDM Vol. 4
        // table 2-2, bits 0, 11, 12). MTRRs default to write-back, enabled.
        MsrState { mtrr_def_type: 0xc06, misc_enable: 1 | (1 << 11) | (1 << 12) }
    }
}

pub const IA32_FEATURE_CONTROL: u32 = 0x3a;
pub const IA32_BIOS_SIGN_ID: u32 = 0x8b;
pub const IA32_PLATFORM_ID: u32 = 0x17;
pub const IA32_MTRRCAP: u32 = 0xfe;
pub const IA32_MISC_ENABLE: u32 = 0x1a0;
pub const IA32_MTRR_DEF_TYPE: u32 = 0x2ff;
pub const IA32_TSC: u32 = 0x10;
pub const MSR_PLATFORM_INFO: u32 = 0xce;
/// AMD's interrupt-pending message register (BKDG, family 10h-16h): Linux
/// reads it to decide whether C1E can break its timer (AMD erratum 400,
/// `arch/x86/kernel/process.c`). Zero: no SMI/C1E message is pending.
pub const MSR_K8_INT_PENDING_MSG: u32 = 0xc001_0055;

/// The guest's RDMSR, or `None` for #GP.
pub fn read(msr: u32, s: &MsrState) -> Option<u64> {
    Some(match msr {
        // Locked with VMX off: the guest cannot turn VMX on.
        IA32_FEATURE_CONTROL => 1,
        IA32_BIOS_SIGN_ID | IA32_PLATFORM_ID => 0,
        // No variable or fixed-range MTRRs; the default type rules.
        IA32_MTRRCAP => 0,
        IA32_MTRR_DEF_TYPE => s.mtrr_def_type,
        IA32_MISC_ENABLE => s.misc_enable,
        MSR_K8_INT_PENDING_MSG => 0,
        _ => return None,
    })
}

/// The guest's WRMSR; `false` means #GP.
pub fn write(msr: u32, value: u64, s: &mut MsrState) -> bool {
    match msr {
        // Microcode-update trigger and signature: accepted, nothing to do.
        IA32_BIOS_SIGN_ID | 0x79 => true,
        IA32_MTRR_DEF_TYPE => {
            // Type in bits 7:0 (UC 0, WC 1, WT 4, WP 5, WB 6), FE bit 10,
            // E bit 11; everything else reserved.
            let ty = value & 0xff;
            if value & !0xcff != 0 || !matches!(ty, 0 | 1 | 4 | 5 | 6) {
                return false;
            }
            s.mtrr_def_type = value;
            true
        }
        IA32_MISC_ENABLE => {
            // Only fast strings may change; the rest reads back unchanged.
            s.misc_enable = (s.misc_enable & !1) | (value & 1);
            true
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_c1e_message_register_reads_zero_and_refuses_writes() {
        let mut s = MsrState::default();
        assert_eq!(read(MSR_K8_INT_PENDING_MSG, &s), Some(0));
        assert!(!write(MSR_K8_INT_PENDING_MSG, 1 << 27, &mut s));
    }

    #[test]
    fn known_msrs_emulated_unknown_ones_refused() {
        let mut s = MsrState::default();
        assert_eq!(read(IA32_FEATURE_CONTROL, &s), Some(1));
        assert_eq!(read(0x1234_5678, &s), None);
        assert!(!write(0x1234_5678, 0, &mut s));
        assert!(!write(IA32_FEATURE_CONTROL, 5, &mut s), "the guest cannot enable VMX");
        assert!(write(IA32_MTRR_DEF_TYPE, 0x806, &mut s));
        assert_eq!(read(IA32_MTRR_DEF_TYPE, &s), Some(0x806));
        assert!(!write(IA32_MTRR_DEF_TYPE, 0x803, &mut s), "type 3 is reserved");
        assert!(!write(IA32_MTRR_DEF_TYPE, 1 << 20, &mut s));
        assert_eq!(read(IA32_MTRR_DEF_TYPE, &s), Some(0x806), "a refused write changes nothing");
        assert!(write(IA32_MISC_ENABLE, 0, &mut s));
        assert_eq!(read(IA32_MISC_ENABLE, &s), Some((1 << 11) | (1 << 12)));
    }
}
