//! The VT-x backend on this machine: `vmx` crate objects plus host memory.

use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;
use hypervisor::backend::{Backend, Unavailable};
use hypervisor::cpuid::{HostQuirks, Regs};
use mm::paging::{Ept, PageSize};
use vcpu::GuestState;
use vmx::{VmxCpu, VmxVcpu};

use crate::platform::{memory::HostMem, time};

pub struct VmxBackend {
    cpu: VmxCpu,
    mem: HostMem,
    quirks: HostQuirks,
    /// Break the next vCPU's guest state (fault injection for tests).
    pub break_next_entry: bool,
}

impl VmxBackend {
    /// Enters VMX operation, or says why it cannot.
    pub fn start() -> Result<VmxBackend, Unavailable> {
        let mut mem = HostMem;
        // The slice timer is VT-x's own; the APIC timer wakes a halted
        // sibling (`Backend::halt_until`).
        crate::platform::apic::init();
        // SAFETY: called once, on the boot CPU, with interrupts off.
        let cpu = unsafe { VmxCpu::enable(&mut mem) }.map_err(|error| Unavailable::Enable { vendor: "VT-x", error })?;
        // SAFETY: IA32_MISC_ENABLE exists on every CPU with VMX.
        let misc = unsafe { vmx::hw::rdmsr(0x1a0) };
        let quirks = HostQuirks { fast_strings_off: misc & 1 == 0, rdtscp: cpu.controls.rdtscp };
        Ok(VmxBackend { cpu, mem, quirks, break_next_entry: false })
    }

    /// An AP's instance: the AP's own VMX operation, with the boot CPU's
    /// quirks (a guest sees the same CPUID on whichever CPU it runs).
    pub fn on_ap(cpu: VmxCpu, quirks: HostQuirks) -> VmxBackend {
        VmxBackend { cpu, mem: HostMem, quirks, break_next_entry: false }
    }

    pub fn into_cpu(self) -> VmxCpu {
        self.cpu
    }

    pub fn caps(&self) -> &vmx::caps::VmxCaps {
        &self.cpu.caps
    }
}

impl Backend for VmxBackend {
    type Format = Ept;
    type Vcpu = Box<VmxVcpu>;
    type Mem = HostMem;

    fn name(&self) -> &'static str {
        "vmx"
    }

    fn features(&self) -> Vec<String> {
        self.cpu.features()
    }

    fn mem(&mut self) -> &mut HostMem {
        &mut self.mem
    }

    fn max_page_size(&self) -> PageSize {
        if self.cpu.controls.ept_1g {
            PageSize::Size1G
        } else if self.cpu.caps.ept_2m() {
            PageSize::Size2M
        } else {
            PageSize::Size4K
        }
    }

    fn create_vcpu(&mut self, root: mm::HostPhysAddr, state: &GuestState) -> Result<Box<VmxVcpu>, vcpu::Error> {
        // SAFETY: VMX is on (this backend exists) and the nested table
        // outlives the vCPU: the manager destroys the vCPU first.
        let mut v = unsafe { VmxVcpu::new(&mut self.cpu, &mut self.mem, root, state) }?;
        if core::mem::take(&mut self.break_next_entry) {
            v.break_guest_state_for_test();
        }
        Ok(v)
    }

    fn destroy_vcpu(&mut self, vcpu: Box<VmxVcpu>) {
        // SAFETY: the manager only destroys vCPUs that no longer run.
        unsafe { vcpu.destroy(&mut self.cpu, &mut self.mem) }
    }

    fn host_cpuid(&self, leaf: u32, subleaf: u32) -> Regs {
        let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
        Regs { eax: r.eax, ebx: r.ebx, ecx: r.ecx, edx: r.edx }
    }

    fn quirks(&self) -> HostQuirks {
        self.quirks
    }

    fn now(&self) -> u64 {
        time::rdtsc()
    }

    fn tsc_hz(&self) -> u64 {
        time::tsc_hz()
    }

    fn heap_free(&self) -> u64 {
        crate::platform::memory::heap_free()
    }
    fn free_frames(&self) -> u64 {
        crate::platform::memory::free_bytes() / 4096
    }

    fn free_bytes_on(&self, node: u32) -> u64 {
        crate::platform::memory::free_bytes_on(node)
    }
    fn prefer_node(&mut self, node: Option<u32>) {
        let n = node.unwrap_or(vcpu::cpu_local::NO_NODE);
        vcpu::cpu_local::get().alloc_node.store(n, core::sync::atomic::Ordering::Relaxed);
    }
    fn kick(&self, cpu: u32) {
        crate::platform::smp::kick(cpu);
    }
    fn halt_until(&self, until: u64) {
        crate::platform::smp::halt_until(until);
    }
}
