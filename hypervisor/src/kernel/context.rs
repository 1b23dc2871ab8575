//! What the CPU is doing right now, for fault and panic reports.

pub struct Describe;

impl core::fmt::Display for Describe {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        // Which CPU: with several, the report must say which one faulted.
        let cpu = vcpu::cpu_local::get();
        write!(f, "cpu {} (apic {}): ", cpu.index, cpu.apic_id.load(core::sync::atomic::Ordering::Relaxed))?;
        match hypervisor::manager::current_vm() {
            None => write!(f, "host"),
            Some(id) => write!(f, "running or handling an exit of vm {id}"),
        }
    }
}

pub fn describe() -> Describe {
    Describe
}
