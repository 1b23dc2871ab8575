//! Turning SVM on for this CPU (APM Vol. 2 15.4): EFER.SVME, the host save
//! area, the host's VMSAVE state; and what every vCPU on the CPU shares:
//! capabilities, the MSR and I/O permission maps, ASIDs.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use mm::addr::HostPhysAddr;
use mm::hal::ContiguousAlloc;
use vcpu::Error;

use crate::hw;

const MSR_EFER: u32 = 0xc000_0080;
const MSR_VM_CR: u32 = 0xc001_0114;
const MSR_VM_HSAVE_PA: u32 = 0xc001_0117;
const EFER_SVME: u64 = 1 << 12;
const VM_CR_SVMDIS: u64 = 1 << 4;

/// MSRs the guest reads (and writes) directly: `(msr, read, write)`. The
/// syscall, SYSENTER and segment-base MSRs are switched by VMLOAD/VMSAVE;
/// EFER and PAT are intercepted and kept by the backend (EFER.SVME must be
/// hidden; PAT lives in the VMCB's G_PAT with nested paging).
pub const PASSTHROUGH: &[(u32, bool, bool)] = &[
    (0x10, true, false), // TSC (reads)
    (0x174, true, true), // SYSENTER_CS
    (0x175, true, true), // SYSENTER_ESP
    (0x176, true, true), // SYSENTER_EIP
    (0xc000_0081, true, true),
    (0xc000_0082, true, true),
    (0xc000_0083, true, true),
    (0xc000_0084, true, true),
    (0xc000_0100, true, true), // FS_BASE
    (0xc000_0101, true, true), // GS_BASE
    (0xc000_0102, true, true), // KERNEL_GS_BASE
];

/// IA32_TSC_AUX, what RDTSCP and RDPID read: passed through and switched by
/// `load`/`put` (the VMCB does not hold it) when the CPU has it.
pub const IA32_TSC_AUX: u32 = 0xc000_0103;

/// What the host CPU offers the state switched by software (FPU, XCR0,
/// TSC_AUX), found once when SVM is turned on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostSwitch {
    /// FXSAVE's MXCSR_MASK: the MXCSR bits FXRSTOR accepts (0 means the
    /// default 0xffbf, APM Vol. 2 11.4.4).
    pub mxcsr_mask: u32,
    /// The host's XCR0, if it has XSAVE (the host turns CR4.OSXSAVE on so
    /// that XSETBV can switch XCR0 between host and guest).
    pub xcr0: Option<u64>,
    /// XCR0 bits a guest may set: CPUID 0xD.0 EDX:EAX limited to what the
    /// state holds (`vcpu::state::XCR0_SUPPORTED`).
    pub xcr0_mask: u64,
    /// Whether the CPU has IA32_TSC_AUX (RDTSCP or RDPID).
    pub tsc_aux: bool,
}

#[repr(C, align(16))]
struct FxProbe([u8; 512]);

impl HostSwitch {
    /// Probes the CPU and turns on CR4.OSXSAVE where XSAVE exists.
    ///
    /// # Safety
    /// Ring 0, interrupts off, CR4.OSFXSR set (FXSAVE works).
    pub unsafe fn probe() -> HostSwitch {
        let mut area = FxProbe([0; 512]);
        // SAFETY: a 16-byte aligned local of 512 bytes.
        unsafe { hw::fxsave(area.0.as_mut_ptr()) };
        let mask = u32::from_le_bytes([area.0[28], area.0[29], area.0[30], area.0[31]]);
        let xsave = core::arch::x86_64::__cpuid(1).ecx & (1 << 26) != 0;
        let (xcr0, xcr0_mask) = if xsave {
            let l = core::arch::x86_64::__cpuid_count(0xd, 0);
            let supported = ((l.edx as u64) << 32 | l.eax as u64) & vcpu::state::XCR0_SUPPORTED;
            // SAFETY: the CPU has XSAVE; OSXSAVE only enables XGETBV/XSETBV
            // and the XSAVE family, and x87|SSE is a valid XCR0 on it.
            unsafe {
                hw::write_cr4(hw::read_cr4() | vcpu::state::bits::CR4_OSXSAVE);
                hw::xsetbv0(supported | 1);
                (Some(hw::xgetbv0()), supported | 1)
            }
        } else {
            (None, 1)
        };
        let rdtscp = core::arch::x86_64::__cpuid(0x8000_0001).edx & (1 << 27) != 0;
        let rdpid = core::arch::x86_64::__cpuid_count(7, 0).ecx & (1 << 22) != 0;
        HostSwitch { mxcsr_mask: if mask == 0 { 0xffbf } else { mask }, xcr0, xcr0_mask, tsc_aux: rdtscp || rdpid }
    }
}

/// What CPUID leaf 0x8000_000A and friends say (APM Vol. 3 E.4.9).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvmCaps {
    pub revision: u32,
    pub asids: u32,
    pub nested_paging: bool,
    pub nrips: bool,
    pub vmcb_clean: bool,
    pub flush_by_asid: bool,
    pub decode_assists: bool,
    /// 1 GiB pages (CPUID 0x8000_0001 EDX bit 26), usable in NPT too.
    pub page_1g: bool,
}

impl SvmCaps {
    pub fn from_cpuid(leaf_8000_000a: [u32; 4], ext_edx: u32) -> SvmCaps {
        let [eax, ebx, _, edx] = leaf_8000_000a;
        SvmCaps {
            revision: eax & 0xff,
            asids: ebx,
            nested_paging: edx & 1 != 0,
            nrips: edx & (1 << 3) != 0,
            vmcb_clean: edx & (1 << 5) != 0,
            flush_by_asid: edx & (1 << 6) != 0,
            decode_assists: edx & (1 << 7) != 0,
            page_1g: ext_edx & (1 << 26) != 0,
        }
    }
}

/// The MSR permission map (APM 15.11): two bits per MSR (read, write), for
/// three ranges of 8 K MSRs at byte offsets 0, 0x800 and 0x1000; a set bit
/// intercepts. MSRs outside the ranges are always intercepted.
pub fn build_msr_map(map: &mut [u8; 8192], passthrough: &[(u32, bool, bool)]) {
    map.fill(0xff);
    allow_msrs(map, passthrough);
}

/// Lets more MSRs through a map built by [`build_msr_map`].
pub fn allow_msrs(map: &mut [u8; 8192], passthrough: &[(u32, bool, bool)]) {
    for &(msr, read, write) in passthrough {
        let base = match msr {
            0..=0x1fff => 0,
            0xc000_0000..=0xc000_1fff => 0x800 * 8,
            0xc001_0000..=0xc001_1fff => 0x1000 * 8,
            _ => continue,
        };
        let bit = base + (msr as usize & 0x1fff) * 2;
        if read {
            map[bit / 8] &= !(1 << (bit % 8));
        }
        if write {
            map[(bit + 1) / 8] &= !(1 << ((bit + 1) % 8));
        }
    }
}

/// The platform's one-shot timer that ends a time slice (SVM has no
/// preemption timer): `arm` arranges a host interrupt at a TSC value;
/// `fired` counts the interrupts taken, so a vCPU can tell whether the
/// interrupt it armed was spent while the host ran (taken at STGI after an
/// unrelated exit) and must be armed again before the guest runs.
///
/// `nudge` raises a host interrupt on this CPU at once (a self-IPI whose
/// handler only acknowledges it): pending while the host runs with
/// interrupts off, it ends the guest's next run at its first instruction
/// boundary (see [`SvmCpu::nudge_after_interrupt`]).
#[derive(Clone, Copy)]
pub struct SliceTimer {
    pub arm: fn(deadline_tsc: u64),
    pub fired: fn() -> u64,
    pub nudge: fn(),
}

pub struct SvmCpu {
    pub caps: SvmCaps,
    pub host: HostSwitch,
    hsave: HostPhysAddr,
    /// The host's VMSAVE state, VMLOADed after every #VMEXIT.
    pub host_vmcb: HostPhysAddr,
    pub msr_map: HostPhysAddr,
    pub io_map: HostPhysAddr,
    pub timer: SliceTimer,
    /// Every VMRUN that injects an external interrupt is followed at once
    /// by a host interrupt (`SliceTimer::nudge`), so the guest exits right
    /// after the delivery. For QEMU's TCG (7.2): it delivers an injected
    /// interrupt inside VMRUN but leaves the vector as the CPU's pending
    /// exception, and delivers it a second time, whatever the guest's
    /// RFLAGS.IF, when its execution loop is next asked to stop (the
    /// round-robin kick of single-threaded TCG, every 100 ms; icount's
    /// budget) before an exit or an interrupt replaced it. A Linux guest
    /// then took its timer interrupt twice, the second at the handler's
    /// first instruction, and died ("Fatal exception in interrupt"). An
    /// exit clears that state. Recognised by what no AMD CPU since 2010
    /// lacks: NRIP save, under another hypervisor (CPUID.1:ECX[31]).
    pub nudge_after_interrupt: bool,
    next_asid: u32,
    free_asids: Vec<u32>,
}

/// The ASID shared by vCPUs once the unique ones run out; they flush the
/// TLB at every VMRUN.
pub const fn shared_asid(caps: &SvmCaps) -> u32 {
    caps.asids - 1
}

impl SvmCpu {
    /// Turns SVM on. Refuses with the name of what is missing.
    ///
    /// # Safety
    /// Ring 0, called once per CPU, with interrupts off; `alloc` hands out
    /// memory reachable through its direct map.
    pub unsafe fn enable(alloc: &mut impl ContiguousAlloc, timer: SliceTimer) -> Result<SvmCpu, Error> {
        let ext = core::arch::x86_64::__cpuid(0x8000_0001);
        if ext.ecx & (1 << 2) == 0 {
            return Err(Error::Unsupported("SVM (CPUID 0x80000001:ECX.SVM = 0)"));
        }
        // SAFETY: VM_CR exists on every CPU with SVM.
        if unsafe { hw::rdmsr(MSR_VM_CR) } & VM_CR_SVMDIS != 0 {
            return Err(Error::Unsupported("SVM enabled by firmware (VM_CR.SVMDIS is set)"));
        }
        let l = core::arch::x86_64::__cpuid(0x8000_000a);
        let caps = SvmCaps::from_cpuid([l.eax, l.ebx, l.ecx, l.edx], ext.edx);
        if !caps.nested_paging {
            return Err(Error::Unsupported("nested paging (CPUID 0x8000000A:EDX.NP = 0)"));
        }
        if caps.asids < 3 {
            return Err(Error::Unsupported("at least 3 ASIDs"));
        }
        // SAFETY: ring 0 with interrupts off (our caller); the bootloader
        // leaves SSE (CR4.OSFXSR) on for x86-64 code.
        let host = unsafe { HostSwitch::probe() };
        let hsave = alloc.alloc_frame().ok_or(Error::OutOfMemory)?;
        let host_vmcb = alloc.alloc_frame().ok_or(Error::OutOfMemory)?;
        let msr_map = alloc.alloc_contiguous(8192, 4096).ok_or(Error::OutOfMemory)?;
        // 12 KiB are used (65536 ports + 3 bits), allocated as 16.
        let io_map = alloc.alloc_contiguous(16384, 4096).ok_or(Error::OutOfMemory)?;
        // SAFETY: fresh memory of the sizes just allocated, reachable through
        // the direct map and used by nothing else.
        unsafe {
            let map = &mut *(alloc.phys_to_ptr(msr_map) as *mut [u8; 8192]);
            build_msr_map(map, PASSTHROUGH);
            if host.tsc_aux {
                allow_msrs(map, &[(IA32_TSC_AUX, true, true)]);
            }
            // Every port exits: the hypervisor emulates or refuses each.
            core::ptr::write_bytes(alloc.phys_to_ptr(io_map), 0xff, 16384);
        }
        // SAFETY: EFER exists on every x86-64 CPU; SVME only enables the SVM
        // instructions. The host save area is a fresh, never-freed frame.
        unsafe {
            hw::wrmsr(MSR_EFER, hw::rdmsr(MSR_EFER) | EFER_SVME);
            hw::wrmsr(MSR_VM_HSAVE_PA, hsave.0);
            hw::vmsave(host_vmcb.0);
        }
        vcpu::cpu_local::get().svm_host_vmcb.store(host_vmcb.0, core::sync::atomic::Ordering::Relaxed);
        let nested = core::arch::x86_64::__cpuid(1).ecx & (1 << 31) != 0;
        Ok(SvmCpu {
            caps,
            host,
            hsave,
            host_vmcb,
            msr_map,
            io_map,
            timer,
            nudge_after_interrupt: nested && !caps.nrips,
            next_asid: 1,
            free_asids: Vec::new(),
        })
    }

    /// An ASID for a new vCPU, and whether it is the shared one.
    pub fn alloc_asid(&mut self) -> (u32, bool) {
        if let Some(a) = self.free_asids.pop() {
            return (a, false);
        }
        if self.next_asid < shared_asid(&self.caps) {
            self.next_asid += 1;
            return (self.next_asid - 1, false);
        }
        (shared_asid(&self.caps), true)
    }

    pub fn free_asid(&mut self, asid: u32) {
        if asid != 0 && asid != shared_asid(&self.caps) {
            self.free_asids.push(asid);
        }
    }

    pub fn host_save_area(&self) -> HostPhysAddr {
        self.hsave
    }

    /// What the `host` command shows.
    pub fn features(&self) -> Vec<String> {
        let c = &self.caps;
        let mut f: Vec<String> = ["svm", "npt", "lapic-timer-slicing"].iter().map(|s| String::from(*s)).collect();
        f.push(format!("asids={}", c.asids));
        for (on, name) in [
            (c.nrips, "nrips"),
            (c.flush_by_asid, "flush-by-asid"),
            (c.decode_assists, "decode-assists"),
            (c.vmcb_clean, "vmcb-clean"),
            (c.page_1g, "npt-1g"),
            (self.host.tsc_aux, "rdtscp"),
            (self.host.xcr0.is_some(), "xsave"),
            (self.nudge_after_interrupt, "nudge-after-interrupt"),
        ] {
            if on {
                f.push(String::from(name));
            }
        }
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bit(map: &[u8; 8192], n: usize) -> bool {
        map[n / 8] & (1 << (n % 8)) != 0
    }

    #[test]
    fn msr_map_bits_follow_the_manual() {
        let mut map = Box::new([0u8; 8192]);
        build_msr_map(&mut map, &[(0x174, true, true), (0x10, true, false), (0xc000_0082, true, true)]);
        // MSR 0x174: bits 0x2e8/0x2e9 of the first range.
        assert!(!bit(&map, 0x174 * 2) && !bit(&map, 0x174 * 2 + 1));
        // TSC: reads pass, writes exit.
        assert!(!bit(&map, 0x20) && bit(&map, 0x21));
        // LSTAR in the second range at byte 0x800.
        let b = 0x800 * 8 + 0x82 * 2;
        assert!(!bit(&map, b) && !bit(&map, b + 1));
        // EFER (not listed) exits both ways.
        let e = 0x800 * 8 + 0x80 * 2;
        assert!(bit(&map, e) && bit(&map, e + 1));
        assert_eq!(map.iter().filter(|&&b| b != 0xff).count(), 3);
    }

    #[test]
    fn capabilities_from_cpuid() {
        // QEMU 7.2 TCG: revision 1, 16 ASIDs, NP only.
        let c = SvmCaps::from_cpuid([1, 16, 0, 1], 1 << 26);
        assert!(c.nested_paging && !c.nrips && !c.flush_by_asid && c.page_1g);
        assert_eq!((c.revision, c.asids), (1, 16));
        let c = SvmCaps::from_cpuid([1, 64, 0, 0xff], 0);
        assert!(c.nrips && c.flush_by_asid && c.decode_assists && c.vmcb_clean && !c.page_1g);
    }
}
