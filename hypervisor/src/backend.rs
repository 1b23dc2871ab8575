//! What the VM layer needs from the machine: a virtualization backend (VT-x
//! or AMD-V) with its nested-page-table format, host memory, and a clock.
//! The kernel implements it on hardware; tests implement it with simulated
//! memory and scripted vCPUs. Static dispatch: no vtable on the exit path.

use alloc::string::String;
use alloc::vec::Vec;
use mm::addr::HostPhysAddr;
use mm::hal::ContiguousAlloc;
use mm::paging::{EntryFormat, PageSize};
use vcpu::{GuestState, Vcpu};

use crate::cpuid::{HostQuirks, Regs};

/// Why the host has no virtualization backend: the console still runs,
/// VMs cannot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unavailable {
    /// CPUID offers neither VT-x nor AMD-V.
    NoVirtualization,
    /// The vendor's extension is there but could not be turned on.
    Enable {
        /// "VT-x" or "AMD-V".
        vendor: &'static str,
        error: vcpu::Error,
    },
}

impl core::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Unavailable::NoVirtualization => f.write_str("this CPU has neither VT-x nor AMD-V"),
            Unavailable::Enable { vendor, error } => write!(f, "{vendor} could not be turned on: {error}"),
        }
    }
}

pub trait Backend {
    /// The nested page-table entry format (EPT or NPT).
    type Format: EntryFormat;
    type Vcpu: Vcpu;
    type Mem: ContiguousAlloc;

    /// "vmx" or "svm".
    fn name(&self) -> &'static str;
    /// Feature names for the `host` report.
    fn features(&self) -> Vec<String>;
    /// Host memory: frames for tables and guest RAM, and the direct map.
    fn mem(&mut self) -> &mut Self::Mem;
    /// The largest nested page the hardware supports.
    fn max_page_size(&self) -> PageSize;
    /// Bytes of the host heap still free (the memory manager's per-VM
    /// tables come from it).
    fn heap_free(&self) -> u64;
    /// Free 4 KiB host frames (what `mem target host` keeps up).
    fn free_frames(&self) -> u64;

    /// A vCPU in the nested table rooted at `nested_root`, starting at
    /// `state`.
    fn create_vcpu(&mut self, nested_root: HostPhysAddr, state: &GuestState) -> Result<Self::Vcpu, vcpu::Error>;
    fn destroy_vcpu(&mut self, vcpu: Self::Vcpu);

    /// The host's own CPUID answer.
    fn host_cpuid(&self, leaf: u32, subleaf: u32) -> Regs;
    fn quirks(&self) -> HostQuirks;
    /// The time-stamp counter and its rate.
    fn now(&self) -> u64;
    fn tsc_hz(&self) -> u64;

    /// Free bytes of host memory on NUMA node `node` (`crate::numa`).
    fn free_bytes_on(&self, node: u32) -> u64;
    /// Frame allocations on this CPU take node `node`'s memory first from
    /// now on (`None`: any node's).
    fn prefer_node(&mut self, node: Option<u32>);
    /// Interrupts host CPU `cpu` (by index): a guest running there exits
    /// (an external interrupt) and its slice's loop looks at why. None
    /// where there are no other CPUs.
    fn kick(&self, cpu: u32) {
        let _ = cpu;
    }
    /// Halts this CPU until host time `until` (TSC) or an interrupt, a
    /// [`Backend::kick`] included, whichever comes first; it may return
    /// earlier. A kick sent since the caller last looked ends it at once
    /// (the host runs with interrupts off, so the kick waits pending). By
    /// default it returns at once: the caller's loop spins.
    fn halt_until(&self, until: u64) {
        let _ = until;
    }
}
