//! What each host CPU keeps about the vCPU work it is doing: the VMCS it has
//! current, whose debug registers it holds, which VM it serves. These were
//! globals while the hypervisor ran on one CPU; on several they must be per
//! CPU, and the backends (`vmx/`, `svm/`) and the VM layer all need them,
//! so they live here, below all of them.
//!
//! The kernel gives every CPU one [`CpuLocal`] and points the CPU's GS base
//! at it ([`install`]); [`get`] reads it back with one GS-relative load (the
//! layout Linux and other x86-64 kernels use for per-CPU data). GS base is
//! the host's own: VM exits restore it from the VMCS host area (SDM Vol. 3C
//! 28.5.2) or the host's VMSAVE area (APM Vol. 2 15.5.2). Off bare metal
//! (host unit tests) there is one shared instance.

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// `alloc_node` when allocations may come from any node.
pub const NO_NODE: u32 = u32::MAX;

/// One CPU's words. `#[repr(C)]` because [`get`] finds it through its first
/// field.
#[repr(C)]
pub struct CpuLocal {
    /// This structure's own address: what `gs:[0]` reads.
    this: AtomicU64,
    /// The kernel's index of the CPU: 0 is the boot CPU.
    pub index: u32,
    /// Its local APIC ID (set when the CPU comes up: the boot CPU's
    /// structure exists before its APIC is read).
    pub apic_id: AtomicU32,
    /// VT-x: the physical address of the VMCS current on this CPU, 0 if
    /// none (VMPTRLD makes one current per CPU, SDM Vol. 3C 24.1).
    pub current_vmcs: AtomicU64,
    /// The vCPU (its VMCS or VMCB address) whose DR0-DR3 and DR6 are in
    /// this CPU's debug registers, 0 if none: neither vendor switches them
    /// on entry and exit, so they are written only when another vCPU's
    /// are there.
    pub dr_owner: AtomicU64,
    /// The VM this CPU is running or handling an exit for (0: none), for
    /// fault reports.
    pub current_vm: AtomicU32,
    /// AMD-V: the VMCB this CPU's own host state (FS, GS, TR, LDTR, the
    /// syscall MSRs) is VMSAVEd to and VMLOADed from around each VMRUN
    /// (APM Vol. 2 15.5.2), 0 before SVM is on here. Per CPU, because GS
    /// base and TR differ between CPUs and a vCPU may run on any.
    pub svm_host_vmcb: AtomicU64,
    /// The NUMA node whose memory this CPU's frame allocations take first
    /// ([`NO_NODE`]: any): set to a VM's node while the CPU builds or runs
    /// it, so the pages the VM touches come from its node.
    pub alloc_node: AtomicU32,
    /// Host timer interrupts this CPU took: the AMD-V backend's slice timer
    /// compares it around VMRUN to tell a slice's end from other exits.
    pub timer_fired: AtomicU64,
    /// vCPU slices this CPU ran: each entry of a vCPU for a slice, and
    /// each further slice of one that goes on (for `host`).
    pub slices: AtomicU64,
}

impl CpuLocal {
    pub const fn new(index: u32, apic_id: u32) -> CpuLocal {
        CpuLocal {
            this: AtomicU64::new(0),
            index,
            apic_id: AtomicU32::new(apic_id),
            current_vmcs: AtomicU64::new(0),
            dr_owner: AtomicU64::new(0),
            current_vm: AtomicU32::new(0),
            svm_host_vmcb: AtomicU64::new(0),
            alloc_node: AtomicU32::new(NO_NODE),
            timer_fired: AtomicU64::new(0),
            slices: AtomicU64::new(0),
        }
    }
}

/// Makes `local` this CPU's: writes its address into itself and into
/// IA32_GS_BASE.
///
/// # Safety
/// Ring 0, on the CPU that `local` describes, before anything on this CPU
/// calls [`get`]; nothing else on this CPU uses GS base.
#[cfg(target_os = "none")]
pub unsafe fn install(local: &'static CpuLocal) {
    let addr = local as *const CpuLocal as u64;
    local.this.store(addr, Ordering::Relaxed);
    const IA32_GS_BASE: u32 = 0xc000_0101;
    // SAFETY: (caller) ring 0; IA32_GS_BASE exists on every x86-64 CPU and
    // takes any canonical address (a kernel pointer is one).
    unsafe {
        core::arch::asm!("wrmsr", in("ecx") IA32_GS_BASE, in("eax") addr as u32, in("edx") (addr >> 32) as u32,
            options(nostack, preserves_flags));
    }
}

/// This CPU's [`CpuLocal`].
#[cfg(target_os = "none")]
#[inline(always)]
pub fn get() -> &'static CpuLocal {
    let p: u64;
    // SAFETY: the kernel installs a CpuLocal on every CPU before any code
    // that calls this runs there (`install`); its first word is its own
    // address, and it lives for the kernel's lifetime.
    unsafe {
        core::arch::asm!("mov {}, gs:[0]", out(reg) p, options(nostack, readonly, preserves_flags));
        &*(p as *const CpuLocal)
    }
}

#[cfg(not(target_os = "none"))]
static HOSTED: CpuLocal = CpuLocal::new(0, 0);

/// Host unit tests have no GS base of their own: one shared instance.
#[cfg(not(target_os = "none"))]
pub fn get() -> &'static CpuLocal {
    HOSTED.this.store(&HOSTED as *const CpuLocal as u64, Ordering::Relaxed);
    &HOSTED
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosted_instance_is_the_boot_cpu() {
        let l = get();
        assert_eq!(l.index, 0);
        assert_eq!(l.this.load(Ordering::Relaxed), l as *const CpuLocal as u64);
    }
}
