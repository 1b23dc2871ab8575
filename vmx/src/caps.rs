//! VMX capabilities, read once from the capability MSRs, and the control
//! adjustment rule (SDM Vol. 3D A.3-A.5: the low 32 bits of a capability MSR
//! are the allowed-0 settings, i.e. bits that must be 1; the high 32 bits are
//! the allowed-1 settings, i.e. bits that may be 1).

use x86::msr;

/// Raw capability MSR values. Plain data so tests can build any CPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmxCaps {
    pub basic: u64,
    pub pinbased: u64,
    pub procbased: u64,
    pub procbased2: u64,
    pub exit: u64,
    pub entry: u64,
    pub misc: u64,
    pub cr0_fixed0: u64,
    pub cr0_fixed1: u64,
    pub cr4_fixed0: u64,
    pub cr4_fixed1: u64,
    pub ept_vpid: u64,
}

/// IA32_VMX_BASIC bit 55: the TRUE_* capability MSRs exist and report which
/// default-1 controls may be cleared (SDM Vol. 3D A.1).
const BASIC_TRUE_CTLS: u64 = 1 << 55;
/// IA32_VMX_PROCBASED_CTLS allowed-1 bit 31: secondary controls exist.
const PROC_SECONDARY: u64 = 1 << (31 + 32);

impl VmxCaps {
    /// Reads every capability MSR through `rdmsr`, using the TRUE variants
    /// where the CPU has them.
    pub fn read(rdmsr: impl Fn(u32) -> u64) -> VmxCaps {
        let basic = rdmsr(msr::IA32_VMX_BASIC);
        let true_ctls = basic & BASIC_TRUE_CTLS != 0;
        let pick = |plain, tru| rdmsr(if true_ctls { tru } else { plain });
        let procbased = pick(msr::IA32_VMX_PROCBASED_CTLS, msr::IA32_VMX_TRUE_PROCBASED_CTLS);
        let secondary = procbased & PROC_SECONDARY != 0;
        let procbased2 = if secondary { rdmsr(msr::IA32_VMX_PROCBASED_CTLS2) } else { 0 };
        // EPT/VPID capabilities exist only if EPT or VPID can be enabled.
        let ept_or_vpid = procbased2 & ((1 << (1 + 32)) | (1 << (5 + 32))) != 0;
        VmxCaps {
            basic,
            pinbased: pick(msr::IA32_VMX_PINBASED_CTLS, msr::IA32_VMX_TRUE_PINBASED_CTLS),
            procbased,
            procbased2,
            exit: pick(msr::IA32_VMX_EXIT_CTLS, msr::IA32_VMX_TRUE_EXIT_CTLS),
            entry: pick(msr::IA32_VMX_ENTRY_CTLS, msr::IA32_VMX_TRUE_ENTRY_CTLS),
            misc: rdmsr(msr::IA32_VMX_MISC),
            cr0_fixed0: rdmsr(msr::IA32_VMX_CR0_FIXED0),
            cr0_fixed1: rdmsr(msr::IA32_VMX_CR0_FIXED1),
            cr4_fixed0: rdmsr(msr::IA32_VMX_CR4_FIXED0),
            cr4_fixed1: rdmsr(msr::IA32_VMX_CR4_FIXED1),
            ept_vpid: if ept_or_vpid { rdmsr(msr::IA32_VMX_EPT_VPID_CAP) } else { 0 },
        }
    }

    /// The VMCS revision identifier (bits 30:0 of IA32_VMX_BASIC).
    pub fn revision_id(&self) -> u32 {
        (self.basic & 0x7fff_ffff) as u32
    }

    /// The preemption timer counts down once every 2^rate TSC ticks.
    pub fn preemption_timer_rate(&self) -> u8 {
        (self.misc & 0x1f) as u8
    }

    pub fn may_set(cap: u64, bit: u32) -> bool {
        cap & (1 << (bit as u64 + 32)) != 0
    }

    pub fn ept_wb(&self) -> bool {
        self.ept_vpid & (1 << 14) != 0
    }
    pub fn ept_walk4(&self) -> bool {
        self.ept_vpid & (1 << 6) != 0
    }
    pub fn ept_2m(&self) -> bool {
        self.ept_vpid & (1 << 16) != 0
    }
    pub fn ept_1g(&self) -> bool {
        self.ept_vpid & (1 << 17) != 0
    }
    pub fn ept_ad(&self) -> bool {
        self.ept_vpid & (1 << 21) != 0
    }
    pub fn invept_single(&self) -> bool {
        self.ept_vpid & (1 << 20) != 0 && self.ept_vpid & (1 << 25) != 0
    }
    pub fn invept_all(&self) -> bool {
        self.ept_vpid & (1 << 20) != 0 && self.ept_vpid & (1 << 26) != 0
    }
    pub fn invvpid_single(&self) -> bool {
        self.ept_vpid & (1 << 32) != 0 && self.ept_vpid & (1 << 41) != 0
    }
    pub fn invvpid_all(&self) -> bool {
        self.ept_vpid & (1 << 32) != 0 && self.ept_vpid & (1 << 42) != 0
    }
}

/// Computes a control value: `required` bits must be settable (otherwise
/// the missing ones are returned as the error), `optional` bits are set
/// where allowed, and bits the CPU forces to 1 are set.
pub fn adjust(cap: u64, required: u32, optional: u32) -> Result<u32, u32> {
    let must_be_one = cap as u32;
    let may_be_one = (cap >> 32) as u32;
    let missing = required & !may_be_one;
    if missing != 0 {
        return Err(missing);
    }
    Ok((required | (optional & may_be_one) | must_be_one) & may_be_one)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap(must1: u32, may1: u32) -> u64 {
        ((may1 as u64) << 32) | must1 as u64
    }

    #[test]
    fn adjust_sets_forced_bits_and_drops_unavailable_optional_ones() {
        let c = cap(0b0001_0110, 0b1111_0110);
        assert_eq!(adjust(c, 0b0100_0000, 0b1000_1001), Ok(0b1101_0110));
    }

    #[test]
    fn adjust_reports_missing_required_bits() {
        let c = cap(0, 0b0000_1111);
        assert_eq!(adjust(c, 0b0011_0001, 0), Err(0b0011_0000));
    }

    #[test]
    fn read_prefers_true_msrs_and_skips_absent_secondary() {
        let caps = VmxCaps::read(|m| match m {
            msr::IA32_VMX_BASIC => (1 << 55) | 4,
            msr::IA32_VMX_TRUE_PINBASED_CTLS => 0x1111,
            msr::IA32_VMX_PINBASED_CTLS => 0x2222,
            msr::IA32_VMX_TRUE_PROCBASED_CTLS => 0, // no secondary controls
            msr::IA32_VMX_PROCBASED_CTLS2 => {
                panic!("must not read CTLS2 without secondary controls")
            }
            msr::IA32_VMX_EPT_VPID_CAP => panic!("must not read EPT caps without EPT/VPID"),
            _ => 0,
        });
        assert_eq!(caps.pinbased, 0x1111);
        assert_eq!(caps.revision_id(), 4);
        assert_eq!(caps.procbased2, 0);
    }
}
