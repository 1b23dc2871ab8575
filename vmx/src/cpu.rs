//! Entering VMX operation on this CPU (SDM Vol. 3C 24.7-24.8): the feature
//! control MSR, the CR0/CR4 fixed bits, the VMXON region; and what every
//! vCPU on the CPU shares (capabilities, controls, the MSR bitmap, VPIDs).

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use mm::addr::HostPhysAddr;
use mm::hal::FrameAlloc;
use vcpu::Error;

use crate::caps::VmxCaps;
use crate::controls::{self, Controls};
use crate::hw;

const IA32_FEATURE_CONTROL: u32 = 0x3a;
const FC_LOCK: u64 = 1;
const FC_VMXON_OUTSIDE_SMX: u64 = 1 << 2;

/// MSRs the guest reads and writes directly. The first group is saved and
/// loaded by the VMCS itself; the second is switched by `load`/`put`
/// (nothing in the host uses them).
pub const PASSTHROUGH: &[(u32, bool, bool)] = &[
    (0x10, true, false),        // IA32_TIME_STAMP_COUNTER (reads)
    (0x174, true, true),        // IA32_SYSENTER_CS
    (0x175, true, true),        // IA32_SYSENTER_ESP
    (0x176, true, true),        // IA32_SYSENTER_EIP
    (0x277, true, true),        // IA32_PAT (saved/loaded on exit/entry)
    (0xc000_0080, true, false), // IA32_EFER reads (writes exit: LMA tracking)
    (0xc000_0100, true, true),  // FS_BASE
    (0xc000_0101, true, true),  // GS_BASE
    (0xc000_0102, true, true),  // KERNEL_GS_BASE (lazy)
    (0xc000_0081, true, true),  // STAR (lazy)
    (0xc000_0082, true, true),  // LSTAR (lazy)
    (0xc000_0083, true, true),  // CSTAR (lazy)
    (0xc000_0084, true, true),  // SFMASK (lazy)
];

/// The lazily switched MSRs, in `GuestState` order.
pub const LAZY_MSRS: [u32; 5] = [0xc000_0102, 0xc000_0081, 0xc000_0082, 0xc000_0083, 0xc000_0084];

/// IA32_TSC_AUX, what RDTSCP and RDPID read: passed through and switched by
/// `load`/`put` when the guest may run them.
pub const IA32_TSC_AUX: u32 = 0xc000_0103;

/// What the host CPU offers the state switched by software (FPU, XCR0,
/// TSC_AUX), found once when VMX is turned on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostSwitch {
    /// FXSAVE's MXCSR_MASK: the MXCSR bits FXRSTOR accepts (SDM Vol. 1
    /// 11.6.6; 0 means the default 0xffbf).
    pub mxcsr_mask: u32,
    /// The host's XCR0, if it has XSAVE (the host turns CR4.OSXSAVE on so
    /// that XSETBV can switch XCR0 between host and guest).
    pub xcr0: Option<u64>,
    /// XCR0 bits a guest may set: CPUID 0xD.0 EDX:EAX limited to what the
    /// state holds (`vcpu::state::XCR0_SUPPORTED`).
    pub xcr0_mask: u64,
    /// Whether IA32_TSC_AUX is the guest's while it runs (RDTSCP enabled).
    pub tsc_aux: bool,
}

impl HostSwitch {
    /// Probes the CPU and turns on CR4.OSXSAVE where XSAVE exists.
    ///
    /// # Safety
    /// Ring 0, interrupts off, CR4.OSFXSR set (FXSAVE works).
    pub unsafe fn probe(rdtscp: bool) -> HostSwitch {
        let mut area = crate::vcpu::FxArea([0; 512]);
        // SAFETY: a 16-byte aligned local of 512 bytes.
        unsafe { hw::fxsave(area.0.as_mut_ptr()) };
        let mask = u32::from_le_bytes([area.0[28], area.0[29], area.0[30], area.0[31]]);
        let xsave = core::arch::x86_64::__cpuid(1).ecx & (1 << 26) != 0;
        let (xcr0, xcr0_mask) = if xsave {
            let l = core::arch::x86_64::__cpuid_count(0xd, 0);
            let supported = ((l.edx as u64) << 32 | l.eax as u64) & vcpu::state::XCR0_SUPPORTED;
            // SAFETY: the CPU has XSAVE; OSXSAVE only enables XGETBV/XSETBV
            // and the XSAVE family, and x87|SSE is a valid XCR0 on every
            // such CPU (SDM Vol. 1 13.3).
            unsafe {
                hw::write_cr4(hw::read_cr4() | vcpu::state::bits::CR4_OSXSAVE);
                hw::xsetbv0(supported | 1);
                (Some(hw::xgetbv0()), supported | 1)
            }
        } else {
            (None, 1)
        };
        HostSwitch { mxcsr_mask: if mask == 0 { 0xffbf } else { mask }, xcr0, xcr0_mask, tsc_aux: rdtscp }
    }
}

pub struct VmxCpu {
    pub caps: VmxCaps,
    pub controls: Controls,
    pub host: HostSwitch,
    vmxon: HostPhysAddr,
    pub msr_bitmap: HostPhysAddr,
    next_vpid: u16,
    free_vpids: Vec<u16>,
}

impl VmxCpu {
    /// Turns VMX on. Refuses with the name of what is missing.
    ///
    /// # Safety
    /// Ring 0, called once per CPU, with interrupts off; `alloc` hands out
    /// frames reachable through its direct map.
    pub unsafe fn enable(alloc: &mut impl FrameAlloc) -> Result<VmxCpu, Error> {
        let leaf1 = core::arch::x86_64::__cpuid(1);
        if leaf1.ecx & (1 << 5) == 0 {
            return Err(Error::Unsupported("VMX (CPUID.1:ECX.VMX = 0)"));
        }
        // SAFETY: IA32_FEATURE_CONTROL exists on every CPU with VMX.
        let fc = unsafe { hw::rdmsr(IA32_FEATURE_CONTROL) };
        if fc & FC_LOCK == 0 {
            // Firmware left it unlocked (OVMF does): allow VMXON and lock.
            // SAFETY: writing the lock and enable bits is what the SDM
            // prescribes before VMXON (Vol. 3C 24.7).
            unsafe { hw::wrmsr(IA32_FEATURE_CONTROL, fc | FC_LOCK | FC_VMXON_OUTSIDE_SMX) };
        } else if fc & FC_VMXON_OUTSIDE_SMX == 0 {
            return Err(Error::Unsupported("VMX enabled by firmware (IA32_FEATURE_CONTROL is locked with VMX off)"));
        }
        // SAFETY: every capability MSR exists when VMX does; `read` only
        // reads the optional ones when their presence bits say so.
        let caps = VmxCaps::read(|m| unsafe { hw::rdmsr(m) });
        let controls = controls::derive(&caps).map_err(Error::Unsupported)?;

        let cr0 = hw::read_cr0();
        let cr4 = hw::read_cr4();
        // SAFETY: setting the fixed-1 bits (NE, VMXE) and clearing fixed-0
        // ones is required for VMXON and does not disturb the host.
        unsafe {
            hw::write_cr0((cr0 | caps.cr0_fixed0) & caps.cr0_fixed1);
            hw::write_cr4((cr4 | caps.cr4_fixed0) & caps.cr4_fixed1);
        }
        // SAFETY: ring 0 with interrupts off (our caller); the bootloader
        // leaves SSE (CR4.OSFXSR) on for x86-64 code.
        let host = unsafe { HostSwitch::probe(controls.rdtscp) };
        let vmxon = alloc.alloc_frame().ok_or(Error::OutOfMemory)?;
        let msr_bitmap = alloc.alloc_frame().ok_or(Error::OutOfMemory)?;
        // SAFETY: both frames are fresh, 4 KiB, and reachable via the direct
        // map; the revision identifier goes in the first 4 bytes.
        unsafe {
            (alloc.phys_to_ptr(vmxon) as *mut u32).write(caps.revision_id());
            let bitmap = &mut *(alloc.phys_to_ptr(msr_bitmap) as *mut [u8; 4096]);
            controls::build_msr_bitmap(bitmap, PASSTHROUGH);
            if host.tsc_aux {
                controls::build_msr_bitmap_add(bitmap, &[(IA32_TSC_AUX, true, true)]);
            }
        }
        // SAFETY: CR0/CR4 satisfy the fixed bits and the region is set up.
        unsafe { hw::vmxon(vmxon.0) }.map_err(|e| Error::Hardware(format!("VMXON failed: {e}")))?;
        if controls.invept_single || caps.invept_all() {
            // Translations cached before this boot must not leak into guests.
            if caps.invept_all() {
                // SAFETY: in VMX operation with all-context INVEPT supported.
                let _ = unsafe { hw::invept(2, 0) };
            }
        }
        Ok(VmxCpu { caps, controls, host, vmxon, msr_bitmap, next_vpid: 1, free_vpids: Vec::new() })
    }

    /// A VPID for a new vCPU (0 belongs to the host).
    pub fn alloc_vpid(&mut self) -> u16 {
        if let Some(v) = self.free_vpids.pop() {
            return v;
        }
        let v = self.next_vpid;
        self.next_vpid = self.next_vpid.wrapping_add(1).max(1);
        v
    }

    pub fn free_vpid(&mut self, vpid: u16) {
        if vpid != 0 {
            self.free_vpids.push(vpid);
        }
    }

    pub fn vmxon_region(&self) -> HostPhysAddr {
        self.vmxon
    }

    /// What the `host` command shows.
    pub fn features(&self) -> Vec<String> {
        let c = &self.controls;
        let mut f: Vec<String> =
            ["vmx", "ept", "unrestricted-guest", "preemption-timer"].iter().map(|s| String::from(*s)).collect();
        for (on, name) in [
            (c.vpid, "vpid"),
            (c.ept_ad, "ept-ad"),
            (self.caps.ept_2m(), "ept-2m"),
            (c.ept_1g, "ept-1g"),
            (c.saves_timer, "timer-save"),
            (c.rdtscp, "rdtscp"),
            (self.host.xcr0.is_some(), "xsave"),
            (VmxCaps::may_set(self.caps.procbased2, 17), "pml"),
        ] {
            if on {
                f.push(String::from(name));
            }
        }
        f
    }
}
