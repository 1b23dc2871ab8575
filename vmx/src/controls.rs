//! The VMCS control settings this hypervisor runs guests with, derived once
//! from the capability MSRs. Every control value goes through `caps::adjust`,
//! so bits a CPU forces on are on and bits it lacks are reported by name.

use vcpu::state::bits::*;
use x86::vmx::vmcs::control::{EntryControls, ExitControls, PinbasedControls, PrimaryControls, SecondaryControls};

use crate::caps::{VmxCaps, adjust};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Controls {
    pub pin: u32,
    pub proc: u32,
    pub proc2: u32,
    pub exit: u32,
    /// Entry controls without "IA-32e mode guest", which follows the guest.
    pub entry: u32,
    /// CR0/CR4 bits the hypervisor owns: guest writes to them exit, reads
    /// come from the read shadow (SDM Vol. 3C 25.6.6).
    pub cr0_mask: u64,
    pub cr4_mask: u64,
    pub cr0_fixed0: u64,
    pub cr0_fixed1: u64,
    pub cr4_fixed0: u64,
    pub cr4_fixed1: u64,
    pub timer_rate: u8,
    /// The preemption timer keeps counting across exits (exit control 22).
    pub saves_timer: bool,
    pub vpid: bool,
    pub ept_ad: bool,
    pub ept_1g: bool,
    pub invept_single: bool,
    pub invvpid_single: bool,
    /// "Enable RDTSCP": the guest may run RDTSCP and RDPID (which read
    /// IA32_TSC_AUX); without it both raise #UD and CPUID hides them.
    pub rdtscp: bool,
    /// VM entry into the HLT and wait-for-SIPI activity states (IA32_VMX_MISC
    /// bits 6 and 8, SDM Vol. 3D A.6).
    pub activity_hlt: bool,
    pub activity_wait_sipi: bool,
}

/// Primary controls the backend sets and clears per entry (SDM Vol. 3C
/// 25.6.2): exits when the guest can take an interrupt or an NMI.
pub const INTERRUPT_WINDOW: u32 = PrimaryControls::INTERRUPT_WINDOW_EXITING.bits();
pub const NMI_WINDOW: u32 = PrimaryControls::NMI_WINDOW_EXITING.bits();

fn need(cap: u64, required: u32, optional: u32, what: &'static str) -> Result<u32, &'static str> {
    adjust(cap, required, optional).map_err(|_| what)
}

/// The controls, or the name of the first feature the CPU lacks.
pub fn derive(caps: &VmxCaps) -> Result<Controls, &'static str> {
    let pin = need(
        caps.pinbased,
        (PinbasedControls::EXTERNAL_INTERRUPT_EXITING | PinbasedControls::NMI_EXITING).bits(),
        0,
        "external-interrupt and NMI exiting",
    )?;
    let pin = need(caps.pinbased, pin | PinbasedControls::VMX_PREEMPTION_TIMER.bits(), 0, "the VMX-preemption timer")?;
    // Virtual NMIs: the VMCS tracks the guest's NMI blocking (until its
    // IRET), which NMI-window exiting needs (SDM Vol. 3C 25.6.1, 26.2.1.1).
    let pin = need(caps.pinbased, pin | PinbasedControls::VIRTUAL_NMIS.bits(), 0, "virtual NMIs")?;
    let proc = need(
        caps.procbased,
        (PrimaryControls::HLT_EXITING
            | PrimaryControls::UNCOND_IO_EXITING
            | PrimaryControls::USE_MSR_BITMAPS
            | PrimaryControls::MWAIT_EXITING
            | PrimaryControls::MONITOR_EXITING
            // RDTSC, RDTSCP and RDMSR of the TSC add the VMCS TSC offset
            // instead of exiting (SDM Vol. 3C 26.3).
            | PrimaryControls::USE_TSC_OFFSETTING
            // DR0-DR3 and DR6 are not in the VMCS: every MOV DR exits, so
            // the vCPU's copies are always what the guest wrote.
            | PrimaryControls::MOV_DR_EXITING
            | PrimaryControls::SECONDARY_CONTROLS)
            .bits(),
        0,
        "HLT/I-O/MSR-bitmap/MOV-DR exiting, TSC offsetting or secondary controls",
    )?;
    if !VmxCaps::may_set(caps.procbased, 22) || !VmxCaps::may_set(caps.procbased, 2) {
        return Err("interrupt- and NMI-window exiting");
    }
    let proc2 = need(
        caps.procbased2,
        SecondaryControls::ENABLE_EPT.bits(),
        (SecondaryControls::ENABLE_VPID
            | SecondaryControls::ENABLE_RDTSCP
            | SecondaryControls::ENABLE_INVPCID
            | SecondaryControls::WBINVD_EXITING)
            .bits(),
        "EPT",
    )?;
    let proc2 = need(caps.procbased2, proc2 | SecondaryControls::UNRESTRICTED_GUEST.bits(), 0, "unrestricted guest")?;
    let exit = need(
        caps.exit,
        (ExitControls::HOST_ADDRESS_SPACE_SIZE
            | ExitControls::ACK_INTERRUPT_ON_EXIT
            | ExitControls::SAVE_IA32_PAT
            | ExitControls::LOAD_IA32_PAT
            | ExitControls::SAVE_IA32_EFER
            | ExitControls::LOAD_IA32_EFER
            // The guest's DR7 lives in the VMCS.
            | ExitControls::SAVE_DEBUG_CONTROLS)
            .bits(),
        ExitControls::SAVE_VMX_PREEMPTION_TIMER.bits(),
        "64-bit host and PAT/EFER/DR7 switching on exit",
    )?;
    let entry = need(
        caps.entry,
        (EntryControls::LOAD_IA32_PAT | EntryControls::LOAD_IA32_EFER | EntryControls::LOAD_DEBUG_CONTROLS).bits(),
        0,
        "PAT/EFER/DR7 loading on entry",
    )? & !EntryControls::IA32E_MODE_GUEST.bits();
    if !(caps.ept_walk4() && caps.ept_wb()) {
        return Err("4-level write-back EPT");
    }
    if !(caps.invept_single() || caps.invept_all()) {
        return Err("INVEPT");
    }
    let vpid = proc2 & SecondaryControls::ENABLE_VPID.bits() != 0 && (caps.invvpid_single() || caps.invvpid_all());
    let proc2 = if vpid { proc2 } else { proc2 & !SecondaryControls::ENABLE_VPID.bits() };
    // With unrestricted guest, PE and PG may be 0 (SDM Vol. 3C 27.3.1.1).
    let cr0_forced = caps.cr0_fixed0 & !(CR0_PE | CR0_PG);
    let cr0_mask = (cr0_forced | !caps.cr0_fixed1 | CR0_PG) & 0xffff_ffff;
    let cr4_mask = caps.cr4_fixed0 | (!caps.cr4_fixed1 & 0xffff_ffff) | CR4_VMXE;
    Ok(Controls {
        pin,
        proc,
        proc2,
        exit,
        entry,
        cr0_mask,
        cr4_mask,
        cr0_fixed0: caps.cr0_fixed0,
        cr0_fixed1: caps.cr0_fixed1,
        cr4_fixed0: caps.cr4_fixed0,
        cr4_fixed1: caps.cr4_fixed1,
        timer_rate: caps.preemption_timer_rate(),
        saves_timer: exit & ExitControls::SAVE_VMX_PREEMPTION_TIMER.bits() != 0,
        vpid,
        ept_ad: caps.ept_ad(),
        ept_1g: caps.ept_1g(),
        invept_single: caps.invept_single(),
        invvpid_single: caps.invvpid_single(),
        rdtscp: proc2 & SecondaryControls::ENABLE_RDTSCP.bits() != 0,
        activity_hlt: caps.misc & (1 << 6) != 0,
        activity_wait_sipi: caps.misc & (1 << 8) != 0,
    })
}

impl Controls {
    /// The CR0 the CPU runs the guest with, for a guest-chosen value.
    pub fn real_cr0(&self, guest: u64) -> u64 {
        (guest | (self.cr0_fixed0 & !(CR0_PE | CR0_PG))) & self.cr0_fixed1
    }

    pub fn real_cr4(&self, guest: u64) -> u64 {
        (guest | self.cr4_fixed0) & self.cr4_fixed1
    }

    /// The EPT pointer for a root table (SDM Vol. 3C 25.6.11): write-back,
    /// 4-level walk, accessed/dirty flags when the CPU has them.
    pub fn eptp(&self, root: u64) -> u64 {
        root | 6 | (3 << 3) | if self.ept_ad { 1 << 6 } else { 0 }
    }
}

/// Which MSRs the guest reaches directly: the MSR bitmap (SDM Vol. 3C
/// 25.6.9) is four 1 KiB bitmaps: reads of 0..0x1fff, reads of
/// 0xc0000000..0xc0001fff, then writes of the same two ranges; a set bit
/// makes the access exit.
pub fn build_msr_bitmap(bitmap: &mut [u8; 4096], passthrough: &[(u32, bool, bool)]) {
    bitmap.fill(0xff);
    build_msr_bitmap_add(bitmap, passthrough);
}

/// Lets more MSRs through a bitmap built by [`build_msr_bitmap`].
pub fn build_msr_bitmap_add(bitmap: &mut [u8; 4096], passthrough: &[(u32, bool, bool)]) {
    for &(msr, read, write) in passthrough {
        let (base, index) = match msr {
            0..=0x1fff => (0, msr),
            0xc000_0000..=0xc000_1fff => (1024, msr - 0xc000_0000),
            _ => continue,
        };
        let (byte, bit) = ((index / 8) as usize, index % 8);
        if read {
            bitmap[base + byte] &= !(1 << bit);
        }
        if write {
            bitmap[2048 + base + byte] &= !(1 << bit);
        }
    }
}

/// Intercepted? (the same rule the CPU applies)
pub fn msr_intercepted(bitmap: &[u8; 4096], msr: u32, write: bool) -> bool {
    let (base, index) = match msr {
        0..=0x1fff => (0, msr),
        0xc000_0000..=0xc000_1fff => (1024, msr - 0xc000_0000),
        _ => return true,
    };
    let off = if write { 2048 } else { 0 } + base + (index / 8) as usize;
    bitmap[off] & (1 << (index % 8)) != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CPU with everything this backend uses (values shaped like a recent
    /// Intel part: default-1 bits, 2^5 timer rate, EPT/VPID with A/D).
    pub fn bochs_like() -> VmxCaps {
        let all = |must1: u32| ((0xffff_ffffu64) << 32) | must1 as u64;
        VmxCaps {
            basic: (1 << 55) | 1,
            pinbased: all(0x16),
            procbased: all(0x0401_e172),
            procbased2: all(0),
            exit: all(0x36dff),
            entry: all(0x11ff),
            misc: 5 | (1 << 6) | (1 << 8),
            cr0_fixed0: 0x8000_0021,
            cr0_fixed1: 0xffff_ffff,
            cr4_fixed0: 0x2000,
            cr4_fixed1: 0x3f_ffff,
            ept_vpid: (1 << 6)
                | (1 << 14)
                | (1 << 16)
                | (1 << 17)
                | (1 << 20)
                | (1 << 21)
                | (1 << 25)
                | (1 << 26)
                | (1 << 32)
                | (1 << 41)
                | (1 << 42),
        }
    }

    #[test]
    fn derives_controls_and_forced_bits() {
        let c = derive(&bochs_like()).unwrap();
        assert_ne!(c.pin & PinbasedControls::VIRTUAL_NMIS.bits(), 0);
        for bit in [PrimaryControls::USE_TSC_OFFSETTING, PrimaryControls::MOV_DR_EXITING] {
            assert_ne!(c.proc & bit.bits(), 0, "{bit:?}");
        }
        assert_eq!(c.proc & (INTERRUPT_WINDOW | NMI_WINDOW), 0, "windows are armed per entry");
        assert_ne!(c.entry & EntryControls::LOAD_DEBUG_CONTROLS.bits(), 0);
        assert_ne!(c.exit & ExitControls::SAVE_DEBUG_CONTROLS.bits(), 0);
        assert_ne!(c.proc2 & SecondaryControls::WBINVD_EXITING.bits(), 0);
        assert_ne!(c.pin & PinbasedControls::VMX_PREEMPTION_TIMER.bits(), 0);
        assert_ne!(c.proc & PrimaryControls::UNCOND_IO_EXITING.bits(), 0);
        assert_eq!(c.proc & 0x0401_e172, 0x0401_e172, "default-1 bits stay set");
        assert_ne!(c.proc2 & SecondaryControls::UNRESTRICTED_GUEST.bits(), 0);
        assert!(c.vpid && c.ept_ad && c.saves_timer);
        assert_eq!(c.entry & EntryControls::IA32E_MODE_GUEST.bits(), 0);
        assert_eq!(c.timer_rate, 5);
        // NE is forced and owned; PE is left to the (unrestricted) guest.
        assert_ne!(c.cr0_mask & CR0_NE, 0);
        assert_ne!(c.cr0_mask & CR0_PG, 0);
        assert_eq!(c.cr0_mask & CR0_PE, 0);
        assert_ne!(c.cr4_mask & CR4_VMXE, 0);
        assert_eq!(c.real_cr0(CR0_PE), CR0_PE | CR0_NE);
        assert_eq!(c.real_cr4(0), CR4_VMXE);
        assert_eq!(c.eptp(0x1234_5000), 0x1234_505e);
    }

    #[test]
    fn names_the_missing_feature() {
        let mut caps = bochs_like();
        caps.procbased2 &= !(1u64 << (7 + 32)); // no unrestricted guest
        assert_eq!(derive(&caps), Err("unrestricted guest"));
        let mut caps = bochs_like();
        caps.pinbased &= !(1u64 << (6 + 32));
        assert_eq!(derive(&caps), Err("the VMX-preemption timer"));
        let mut caps = bochs_like();
        caps.ept_vpid = 0;
        assert_eq!(derive(&caps), Err("4-level write-back EPT"));
        let mut caps = bochs_like();
        caps.pinbased &= !(1u64 << (5 + 32));
        assert_eq!(derive(&caps), Err("virtual NMIs"));
        let mut caps = bochs_like();
        caps.procbased &= !(1u64 << (22 + 32));
        assert_eq!(derive(&caps), Err("interrupt- and NMI-window exiting"));
    }

    #[test]
    fn msr_bitmap_passes_through_only_what_is_listed() {
        let mut b = [0u8; 4096];
        build_msr_bitmap(&mut b, &[(0x174, true, true), (0xc000_0100, true, true), (0x10, true, false)]);
        assert!(!msr_intercepted(&b, 0x174, false) && !msr_intercepted(&b, 0x174, true));
        assert!(!msr_intercepted(&b, 0xc000_0100, true));
        assert!(!msr_intercepted(&b, 0x10, false) && msr_intercepted(&b, 0x10, true));
        assert!(msr_intercepted(&b, 0x175 + 1, false));
        assert!(msr_intercepted(&b, 0xc000_0080, true), "EFER writes exit");
        assert!(msr_intercepted(&b, 0x4000_0000, false), "out-of-range MSRs always exit");
    }
}
