//! The AMD-V backend on this machine: `svm` crate objects plus host memory
//! and the APIC timer for time slices.

use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;
use hypervisor::backend::{Backend, Unavailable};
use hypervisor::cpuid::{HostQuirks, Regs};
use mm::paging::{Npt, PageSize};
use svm::{SliceTimer, SvmCpu, SvmVcpu};
use vcpu::GuestState;

use crate::platform::{apic, memory::HostMem, time};

pub struct SvmBackend {
    cpu: SvmCpu,
    mem: HostMem,
    quirks: HostQuirks,
    /// Break the next vCPU's guest state (fault injection for tests).
    pub break_next_entry: bool,
}

impl SvmBackend {
    /// Turns SVM on, or says why it cannot.
    pub fn start() -> Result<SvmBackend, Unavailable> {
        let mut mem = HostMem;
        let timer_hz = apic::init();
        log::info!("apic timer: {} kHz, vector {:#x}", timer_hz / 1000, apic::TIMER_VECTOR);
        // SAFETY: called once, on the boot CPU, with interrupts off.
        let cpu =
            unsafe { SvmCpu::enable(&mut mem, SliceTimer { arm: apic::arm, fired: apic::fired, nudge: apic::nudge }) }
                .map_err(|error| Unavailable::Enable { vendor: "AMD-V", error })?;
        let quirks = HostQuirks { rdtscp: cpu.host.tsc_aux, ..Default::default() };
        Ok(SvmBackend { cpu, mem, quirks, break_next_entry: false })
    }

    /// An AP's instance: the AP's own host save area and host VMCB, with
    /// the boot CPU's quirks (a guest sees the same CPUID on whichever CPU
    /// it runs).
    pub fn on_ap(cpu: SvmCpu, quirks: HostQuirks) -> SvmBackend {
        SvmBackend { cpu, mem: HostMem, quirks, break_next_entry: false }
    }

    pub fn into_cpu(self) -> SvmCpu {
        self.cpu
    }

    pub fn caps(&self) -> &svm::SvmCaps {
        &self.cpu.caps
    }
}

impl Backend for SvmBackend {
    type Format = Npt;
    type Vcpu = Box<SvmVcpu<HostMem>>;
    type Mem = HostMem;

    fn name(&self) -> &'static str {
        "svm"
    }

    fn features(&self) -> Vec<String> {
        self.cpu.features()
    }

    fn mem(&mut self) -> &mut HostMem {
        &mut self.mem
    }

    fn max_page_size(&self) -> PageSize {
        if self.cpu.caps.page_1g { PageSize::Size1G } else { PageSize::Size2M }
    }

    fn create_vcpu(&mut self, root: mm::HostPhysAddr, state: &GuestState) -> Result<Self::Vcpu, vcpu::Error> {
        let direct_map = self.mem;
        // SAFETY: SVM is on (this backend exists); the nested table outlives
        // the vCPU (the manager destroys the vCPU first); HostMem is the
        // direct map of everything the allocator hands out.
        let mut v = unsafe { SvmVcpu::new(&mut self.cpu, &mut self.mem, direct_map, root, state) }?;
        if core::mem::take(&mut self.break_next_entry) {
            v.break_guest_state_for_test();
        }
        Ok(v)
    }

    fn destroy_vcpu(&mut self, vcpu: Self::Vcpu) {
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
