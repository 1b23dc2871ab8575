//! The VM manager: starts VMs from the ramdisk's guest images, runs them
//! time-sliced on this CPU, stops them, and answers for them. Generic over
//! the backend, so the whole lifecycle is tested on the host with scripted
//! vCPUs and simulated memory.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU32, Ordering};
use mm::GuestPhysAddr;
use mm::GuestRam;
use mm::paging::{NestedPageTable, PageSize};
use vcpu::Vcpu;

use crate::backend::Backend;
use crate::loader::{GuestWrite, GuestWriteError};
use crate::vm::exit::{Console, Flow};
use crate::vm::{Resources, RunState, Vm, VmStats, boot};

/// The VM whose slice is running (0: none), for fault reports.
static CURRENT_VM: AtomicU32 = AtomicU32::new(0);

/// The VM this CPU is running or handling an exit for, if any.
pub fn current_vm() -> Option<u32> {
    match CURRENT_VM.load(Ordering::Relaxed) {
        0 => None,
        id => Some(id),
    }
}

/// A guest image from the ramdisk.
#[derive(Clone, Debug)]
pub struct GuestImage {
    pub name: String,
    pub bytes: &'static [u8],
}

pub const DEFAULT_MEM_MIB: u32 = 16;
pub const MIN_MEM_MIB: u32 = 2;
pub const MAX_MEM_MIB: u32 = 65536;
/// Ended VMs kept for `vm list` before the oldest are forgotten.
pub const MAX_ENDED_RECORDS: usize = 64;

pub struct Manager<B: Backend> {
    /// The backend, or why there is none (no VT-x/AMD-V, disabled...).
    pub backend: Result<B, String>,
    pub images: Vec<GuestImage>,
    pub vms: Vec<Box<Vm<B>>>,
    next_id: u32,
    cursor: usize,
    /// TSC ticks per time slice.
    pub slice_ticks: u64,
}

impl<B: Backend> Manager<B> {
    pub fn new(backend: Result<B, String>, images: Vec<GuestImage>) -> Self {
        let slice_ticks = backend.as_ref().map_or(1_000_000, |b| (b.tsc_hz() / 100).max(10_000));
        Manager { backend, images, vms: Vec::new(), next_id: 1, cursor: 0, slice_ticks }
    }

    pub fn get(&self, id: u32) -> Option<&Vm<B>> {
        self.vms.iter().find(|v| v.id == id).map(|b| &**b)
    }

    pub fn any_runnable(&self) -> bool {
        self.vms.iter().any(|v| v.state.runnable())
    }

    /// Starts guest `name` with `mem_mib` MiB of RAM; returns its id.
    pub fn run_vm(&mut self, name: &str, mem_mib: u32, cmdline: &str) -> Result<u32, String> {
        self.run_vm_with(name, mem_mib, &[], cmdline)
    }

    /// As `run_vm`, passing ramdisk files as Multiboot modules.
    pub fn run_vm_with(&mut self, name: &str, mem_mib: u32, modules: &[String], cmdline: &str) -> Result<u32, String> {
        let backend = self.backend.as_mut().map_err(|why| format!("virtualization is unavailable: {why}"))?;
        let image = self
            .images
            .iter()
            .find(|g| g.name == name)
            .ok_or_else(|| {
                let names: Vec<&str> = self.images.iter().map(|g| g.name.as_str()).collect();
                format!("no guest named {name:?} (available: {})", names.join(", "))
            })?
            .bytes;
        let mut mods = Vec::with_capacity(modules.len());
        for m in modules {
            let file = self
                .images
                .iter()
                .find(|g| &g.name == m)
                .ok_or_else(|| format!("no ramdisk file {m:?} for a module"))?;
            mods.push(boot::Module { name: m.as_str(), data: file.bytes });
        }
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&mem_mib) {
            return Err(format!("mem must be {MIN_MEM_MIB}..={MAX_MEM_MIB} MiB"));
        }
        let id = self.next_id;
        let size = (mem_mib as u64) << 20;
        let max_page = backend.max_page_size();
        let mem = backend.mem();
        let ram = GuestRam::new(mem, size).map_err(|e| format!("cannot allocate {mem_mib} MiB of guest RAM: {e}"))?;
        let mut npt = match NestedPageTable::<B::Format>::new(mem) {
            Ok(t) => t,
            Err(e) => {
                // SAFETY: nothing maps the RAM yet.
                unsafe { ram.free(mem) };
                return Err(format!("cannot allocate a nested page table: {e}"));
            }
        };
        npt.set_max_page_size(max_page);
        let (inv, mapped) = ram.map_into(&mut npt, mem);
        // A fresh table: no vCPU has cached anything from it yet.
        inv.flush(mem, |_| {});
        let loaded = mapped.map_err(|e| format!("cannot map guest RAM: {e}")).and_then(|_| {
            let mut w = RamWriter { ram: &ram, mem: &*mem };
            boot::prepare(image, size, cmdline, &mods, id, &mut w).map_err(|e| format!("cannot load {name}: {e}"))
        });
        let (state, protocol) = match loaded {
            Ok(v) => v,
            Err(e) => {
                release_memory(backend, npt, ram);
                return Err(e);
            }
        };
        let vcpu = match backend.create_vcpu(npt.root(), &state) {
            Ok(v) => v,
            Err(e) => {
                release_memory(backend, npt, ram);
                return Err(format!("cannot create the vCPU: {e}"));
            }
        };
        let overhead =
            vcpu.overhead_bytes() + ram.memory_report(&npt).overhead_bytes() + core::mem::size_of::<Vm<B>>() as u64;
        let mut nested_pages = [0u64; 3];
        for m in npt.mappings(&*backend.mem(), mm::GuestPhysAddr(0)..mm::GuestPhysAddr(size)) {
            nested_pages[match m.leaf.size {
                PageSize::Size4K => 0,
                PageSize::Size2M => 1,
                PageSize::Size1G => 2,
            }] += 1;
        }
        let now = backend.now();
        self.next_id += 1;
        self.vms.push(Box::new(Vm {
            id,
            guest: String::from(name),
            protocol,
            mem_bytes: size,
            cmdline: String::from(cmdline),
            state: RunState::Running,
            stats: VmStats { started_tsc: now, ..Default::default() },
            uart: Default::default(),
            msrs: Default::default(),
            overhead_bytes: overhead,
            nested_pages,
            res: Some(Resources { ram, npt, vcpu }),
        }));
        self.forget_old_records();
        Ok(id)
    }

    /// Stops VM `id` (if it still runs) and frees its memory; the record
    /// stays for `vm list`.
    pub fn stop(&mut self, id: u32, console: &mut impl Console) -> Result<(), String> {
        let backend = self.backend.as_mut().map_err(|why| format!("virtualization is unavailable: {why}"))?;
        let vm = self.vms.iter_mut().find(|v| v.id == id).ok_or_else(|| format!("no VM {id}"))?;
        if vm.state.ended() {
            return Err(format!("vm {id} has already {}", vm.state.name()));
        }
        vm.end(RunState::Stopped { reason: String::from("by the operator") }, backend, console);
        release(backend, vm);
        Ok(())
    }

    /// Stops every VM still running (before power-off).
    pub fn stop_all(&mut self, console: &mut impl Console) {
        let ids: Vec<u32> = self.vms.iter().filter(|v| !v.state.ended()).map(|v| v.id).collect();
        for id in ids {
            let _ = self.stop(id, console);
        }
    }

    /// Runs the next runnable VM for one time slice. Returns false when
    /// nothing could run.
    pub fn run_slice(&mut self, console: &mut impl Console) -> bool {
        let Ok(backend) = self.backend.as_mut() else {
            return false;
        };
        let n = self.vms.len();
        let Some(i) = (0..n).map(|k| (self.cursor + k) % n).find(|&i| self.vms[i].state.runnable()) else {
            return false;
        };
        self.cursor = (i + 1) % n.max(1);
        let vm = &mut self.vms[i];
        vm.state = RunState::Running;
        CURRENT_VM.store(vm.id, Ordering::Relaxed);
        let flow = {
            let Some(res) = vm.res.as_mut() else {
                return false;
            };
            res.vcpu.load();
            res.vcpu.set_time_slice(self.slice_ticks);
            // The preemption timer counts guest time only; a VM that exits
            // all the time must still give the CPU up after a slice of
            // wall-clock time, or the console and other VMs starve.
            let mut t0 = backend.now();
            let deadline = t0.saturating_add(self.slice_ticks);
            loop {
                let exit = vm.res.as_mut().map(|r| r.vcpu.run());
                let Some(exit) = exit else { break Flow::Stop };
                // One clock read per exit: it ends this run and starts the
                // next, so exit handling counts as the VM's time.
                let t1 = backend.now();
                vm.stats.run_ticks += t1.wrapping_sub(t0);
                t0 = t1;
                vm.stats.exits[exit.kind() as usize] += 1;
                crate::trace_exit(vm.id, &exit);
                let preempted = matches!(exit, vcpu::VmExit::Preempted);
                let flow = vm.handle_exit(exit, backend, console);
                if flow != Flow::Continue {
                    vm.stats.slices_expired += preempted as u64;
                    break flow;
                }
                if t1 >= deadline {
                    vm.stats.slices_expired += 1;
                    break Flow::Yield;
                }
            }
        };
        if let Some(res) = vm.res.as_mut() {
            res.vcpu.put();
        }
        CURRENT_VM.store(0, Ordering::Relaxed);
        if flow == Flow::Stop && vm.state.ended() {
            release(backend, vm);
        }
        true
    }

    fn forget_old_records(&mut self) {
        while self.vms.iter().filter(|v| v.state.ended()).count() > MAX_ENDED_RECORDS {
            if let Some(pos) = self.vms.iter().position(|v| v.state.ended()) {
                self.vms.remove(pos);
            }
        }
    }
}

impl<B: Backend> Drop for Manager<B> {
    /// Returns every live VM's memory (the kernel's manager lives forever;
    /// this matters for tests and for an orderly shutdown).
    fn drop(&mut self) {
        if let Ok(backend) = self.backend.as_mut() {
            for vm in &mut self.vms {
                release(backend, vm);
            }
        }
    }
}

/// Writes load plans into guest RAM through the direct map.
struct RamWriter<'a, M: mm::hal::PhysMem> {
    ram: &'a GuestRam,
    mem: &'a M,
}

impl<M: mm::hal::PhysMem> GuestWrite for RamWriter<'_, M> {
    fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), GuestWriteError> {
        self.ram.write(self.mem, GuestPhysAddr(gpa), data).map_err(|_| GuestWriteError)
    }

    fn fill_zero(&mut self, gpa: u64, len: u64) -> Result<(), GuestWriteError> {
        const ZEROS: [u8; 4096] = [0; 4096];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(4096);
            self.write(gpa + done, &ZEROS[..n as usize])?;
            done += n;
        }
        Ok(())
    }
}

fn release_memory<B: Backend>(backend: &mut B, npt: NestedPageTable<B::Format>, ram: GuestRam) {
    let mem = backend.mem();
    npt.destroy().flush(mem, |_| {});
    // SAFETY: the table that mapped the RAM is gone and no vCPU uses it.
    unsafe { ram.free(mem) };
}

/// Frees what a VM holds: the vCPU first (nothing runs on the table after
/// that), then the nested table, then RAM.
fn release<B: Backend>(backend: &mut B, vm: &mut Vm<B>) {
    if let Some(res) = vm.res.take() {
        backend.destroy_vcpu(res.vcpu);
        release_memory(backend, res.npt, res.ram);
    }
}

#[cfg(test)]
mod tests;
