//! The host's CPUs as the kernel runs them. Every AP turns its own
//! virtualization on when it starts (VMXON region or host save area per CPU:
//! SDM Vol. 3C 24.7, APM Vol. 2 15.30.4) and then waits for calls; the boot
//! CPU runs the console, the management loop and the VMs. The `host`
//! report asks each CPU for an answer and times it, and times one
//! nested-TLB flush on every CPU (what a shootdown costs).

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::marker::PhantomData;
use core::sync::atomic::Ordering;
use hypervisor::cpuid::HostQuirks;
use hypervisor::manager::rounds::{AwaySlice, SliceCpus};
use spin::{Mutex, Once};
use svm::{SliceTimer, SvmCpu};
use vmx::VmxCpu;

use crate::platform::smp::{self, Cpu, MAX_CPUS};
use crate::platform::{apic, cpu, memory::HostMem, time};
use hypervisor::console::CpuStatus;

use super::HostBackend;

/// A CPU's virtualization instance, kept while the CPU lives: it owns the
/// CPU's VMXON region or host save area and what its vCPUs share. An AP's
/// is lent to the backend instance that runs a slice there.
pub enum CpuVirt {
    Vmx(VmxCpu),
    Svm(SvmCpu),
}

/// The APs' instances by CPU index (the boot CPU's is its backend's).
static VIRT: [Mutex<Option<CpuVirt>>; MAX_CPUS] = [const { Mutex::new(None) }; MAX_CPUS];

/// The boot CPU's quirks, which every AP's backend instance reports too.
static BOOT_QUIRKS: Once<HostQuirks> = Once::new();

/// The APs as the scheduler's other CPUs (`manager::rounds`): each with
/// its virtualization on takes one VM's slice at a time.
pub struct Aps<B> {
    cpus: Vec<&'static Cpu>,
    /// Each one's NUMA node (the SRAT's; `None` without one).
    nodes: Vec<Option<u32>>,
    /// The ticket of the slice each is running.
    busy: Vec<Option<u64>>,
    /// Set by the main loop while something it polls between rounds (the
    /// host's network while busy, an attached console) wants rounds to end
    /// with the boot CPU's slice (`SliceCpus::wanted`).
    pub short_rounds: bool,
    /// The host's NIC (the main loop's between rounds): a frame it received
    /// ends a round that goes on.
    pub net: Option<crate::platform::net::HostNic>,
    _backend: PhantomData<B>,
}

impl<B: HostBackend> Aps<B> {
    pub fn new(quirks: HostQuirks, numa: Option<&hypervisor::numa::Topology>) -> Aps<B> {
        BOOT_QUIRKS.call_once(|| quirks);
        let cpus: Vec<&'static Cpu> = smp::cpus().skip(1).filter(|c| matches!(c.virt.get(), Some(Ok(_)))).collect();
        let nodes = cpus.iter().map(|c| numa.and_then(|t| t.node_of_cpu(c.apic_id()))).collect();
        let busy = alloc::vec![None; cpus.len()];
        Aps { cpus, nodes, busy, short_rounds: false, net: None, _backend: PhantomData }
    }
}

// SAFETY: `start` posts each job to one AP, which runs it once
// (`ap_slice`); `join` returns only when every posted job's CPU answered,
// and the answer is read with Acquire against the AP's Release.
unsafe impl<B: HostBackend> SliceCpus<B> for Aps<B> {
    fn free(&self) -> usize {
        self.busy.iter().filter(|b| b.is_none()).count()
    }

    fn start(&mut self, job: *mut AwaySlice<B>) -> bool {
        // SAFETY: the caller's job, in place and not yet handed to a CPU.
        let node = unsafe { (*job).node() };
        // A free CPU of the VM's node first (NUMA placement), then any.
        let mut order: Vec<usize> = (0..self.cpus.len()).collect();
        order.sort_by_key(|&k| node.is_some() && self.nodes[k] != node);
        for k in order {
            let c = self.cpus[k];
            if self.busy[k].is_some() {
                continue;
            }
            if let Some(ticket) = smp::post(c, ap_slice::<B>, job as u64) {
                self.busy[k] = Some(ticket);
                return true;
            }
        }
        false
    }

    fn join(&mut self, serve: &mut dyn FnMut()) {
        for (k, c) in self.cpus.iter().enumerate() {
            let Some(ticket) = self.busy[k] else { continue };
            // Halted, not spinning: the AP wakes this CPU when it answers,
            // only while this CPU waits here (one that comes in a race just
            // after costs its next guest slice one exit, as a kick does),
            // and a millisecond's timer is the backstop. A slice ends by
            // its deadline; an AP that never answers is a host bug, and
            // the VM it holds could not be touched anyway. A kick from an
            // AP that asks a host call also ends the halt: served here.
            serve();
            smp::await_answer(c, ticket, &mut *serve);
            self.busy[k] = None;
        }
    }

    fn takes_calls(&self) -> bool {
        true
    }

    fn goes_on(&self) -> bool {
        true
    }

    fn all_running(&self) -> bool {
        self.busy.iter().zip(&self.cpus).all(|(b, c)| b.is_none_or(|ticket| !smp::answered(c, ticket)))
    }

    fn wanted(&mut self) -> bool {
        self.short_rounds
            || crate::platform::serial::rx_ready()
            || self.net.as_mut().is_some_and(|n| n.in_use() && n.rx_pending())
    }

    fn doze(&mut self, until: u64, serve: &mut dyn FnMut()) {
        smp::doze(until, || self.all_running());
        serve();
    }

    fn poll(&self) -> fn() -> bool {
        || crate::platform::serial::rx_ready() || hypervisor::mca::host::HOST_ERRORS.waiting()
    }

    fn kick_running(&self) {
        for (b, c) in self.busy.iter().zip(&self.cpus) {
            if b.is_some() {
                smp::kick(c.index());
            }
        }
    }
}

/// Runs a VM's slice on this AP, with a backend instance made of the AP's
/// own virtualization (lent back to `VIRT` afterwards). Returns 1 if it
/// could not (no instance of the boot CPU's vendor here): the job is left
/// untouched and its VM waits for its next turn.
fn ap_slice<B: HostBackend>(arg: u64) -> u64 {
    let i = smp::this_cpu().index() as usize;
    let quirks = BOOT_QUIRKS.get().copied().unwrap_or_default();
    let Some(mut backend) = B::on_ap(&mut VIRT[i].lock(), quirks) else { return 1 };
    // SAFETY: `Aps::start` handed this job to this CPU alone, and the boot
    // CPU reads it (and touches its VM) only after `join` saw this call
    // answered.
    unsafe { (*(arg as *mut AwaySlice<B>)).run(&mut backend) };
    *VIRT[i].lock() = Some(backend.into_virt());
    0
}

/// Starts the APs the MADT lists (or whichever answer a broadcast) and
/// logs the outcome.
pub fn start(apic_ids: &[u32]) {
    apic::enable();
    smp::this_cpu().local.apic_id.store(apic::id(), core::sync::atomic::Ordering::Relaxed);
    smp::set_ap_main(ap_main);
    let t0 = time::micros();
    match smp::start_aps(apic_ids) {
        Ok(n) => {
            let ids: Vec<u32> = smp::cpus().map(|c| c.apic_id()).collect();
            let how = if apic_ids.len() > 1 { "from the MADT" } else { "by broadcast (no MADT)" };
            log::info!("smp: {} cpu(s) online {how}, apic ids {ids:?}, started in {} us", n + 1, time::micros() - t0);
            // Each AP reports once its virtualization is on; under a
            // single-threaded emulator that comes well after the start.
            let t1 = time::micros();
            while smp::cpus().skip(1).any(|c| c.virt.get().is_none()) && time::micros() - t1 < 2_000_000 {
                core::hint::spin_loop();
            }
            for c in smp::cpus().skip(1) {
                match c.virt.get() {
                    Some(Ok(_)) => {}
                    Some(Err(e)) => log::warn!("smp: cpu {}: virtualization off: {e}", c.index()),
                    None => log::warn!("smp: cpu {}: did not report its virtualization", c.index()),
                }
            }
        }
        Err(why) => log::warn!("smp: APs not started ({why:?}); running on the boot CPU only"),
    }
}

/// On each AP as it starts, before it serves calls.
fn ap_main(c: &'static Cpu) {
    let info = cpu::detect();
    let mut mem = HostMem;
    // AMD-V's slice timer, and what wakes a halted sibling on either.
    apic::init();
    let virt = if info.vmx {
        // SAFETY: once on this CPU, ring 0, interrupts off.
        unsafe { VmxCpu::enable(&mut mem) }.map(CpuVirt::Vmx)
    } else if info.svm {
        // SAFETY: as above.
        unsafe { SvmCpu::enable(&mut mem, SliceTimer { arm: apic::arm, fired: apic::fired, nudge: apic::nudge }) }
            .map(CpuVirt::Svm)
    } else {
        Err(vcpu::Error::Unsupported("neither VT-x nor AMD-V"))
    };
    let report = match virt {
        Ok(v) => {
            let name = match &v {
                CpuVirt::Vmx(_) => "vmx on",
                CpuVirt::Svm(_) => "svm on",
            };
            *VIRT[c.index() as usize].lock() = Some(v);
            Ok(String::from(name))
        }
        Err(e) => Err(format!("{e}")),
    };
    c.virt.call_once(|| report);
}

/// A call that does nothing: the round trip is the IPI and the wake-up.
fn nothing(_: u64) -> u64 {
    0
}

/// Flushes this CPU's nested translations for every VM: INVEPT
/// all-context under VT-x (SDM Vol. 3C 30.3); under AMD-V there is no
/// instruction for it, so this CPU's next VMRUN flushes (TLB_CONTROL) and
/// the call is the cost of reaching the CPU. `boot_vmx`: the boot CPU's
/// backend is VT-x (its instance is the backend's, not in `VIRT`).
fn flush_nested(boot_vmx: u64) -> u64 {
    let i = smp::this_cpu().index() as usize;
    let vmx = if i == 0 {
        boot_vmx == 1
    } else {
        matches!(VIRT[i].lock().as_ref(), Some(CpuVirt::Vmx(c)) if c.caps.invept_all())
    };
    if vmx {
        // SAFETY: VMX is on on this CPU (it has a VmxCpu, or it is the boot
        // CPU with the VT-x backend); INVEPT type 2 needs no descriptor
        // contents.
        return unsafe { vmx::hw::invept(2, 0) }.is_err() as u64;
    }
    0
}

/// The `host` report's CPU lines, measured now.
pub fn status(boot_virt: &str) -> (Vec<CpuStatus>, Option<u64>) {
    let all: Vec<&'static Cpu> = smp::cpus().collect();
    let mut out = Vec::new();
    for c in &all {
        let call_ticks = if c.index() == 0 {
            None
        } else {
            let t0 = time::rdtsc();
            smp::run_on(&[*c], nothing, 0, 100_000)[0].map(|_| time::rdtsc() - t0)
        };
        let virt = match (c.index(), c.virt.get()) {
            (0, _) => String::from(boot_virt),
            (_, Some(Ok(v))) => v.clone(),
            (_, Some(Err(e))) => format!("virtualization off: {e}"),
            (_, None) => String::from("virtualization not reported"),
        };
        out.push(CpuStatus {
            index: c.index(),
            apic_id: c.apic_id(),
            role: if c.index() == 0 {
                let (halts, answered) = c.awaits();
                format!(
                    "boot (console, management, VMs; halted {halts} times for other CPUs' slices, {answered} \
                     woken by their end)"
                )
            } else if matches!(c.virt.get(), Some(Ok(_))) {
                // Every vCPU slice it ran, further slices of a round that
                // goes on and of a run queue included (`CpuLocal::slices`).
                format!("VMs ({} slices)", c.local.slices.load(Ordering::Relaxed))
            } else {
                String::from("idle")
            },
            virt,
            call_ticks,
        });
    }
    let shootdown = boot_virt.ends_with(" on").then(|| {
        let t0 = time::rdtsc();
        let r = smp::run_on(&all, flush_nested, boot_virt.starts_with("vmx") as u64, 100_000);
        r.iter().all(|x| *x == Some(0)).then(|| time::rdtsc() - t0)
    });
    (out, shootdown.flatten())
}

/// One step of the move check, run on whichever CPU it is sent to.
struct MoveStep<V> {
    vcpu: *mut V,
    /// What the exit was (kind and guest-physical address), on which CPU,
    /// and whether the CPU's own per-CPU words were in place after it.
    seen: Option<(String, u32, bool)>,
}

fn move_step<V: vcpu::Vcpu>(arg: u64) -> u64 {
    // SAFETY: `vcpu_move_check` passes a live MoveStep and waits for this
    // call to answer before it touches the step or the vCPU again.
    let step = unsafe { &mut *(arg as *mut MoveStep<V>) };
    // SAFETY: as above: the vCPU is used by one CPU at a time.
    let v = unsafe { &mut *step.vcpu };
    v.load();
    v.set_time_slice(time::tsc_hz());
    let exit = v.run();
    v.put();
    v.release();
    let what = match exit {
        vcpu::VmExit::NestedPageFault { gpa, .. } => format!("nested page fault at {gpa:#x}"),
        other => format!("{:?}", other.kind()),
    };
    // GS base came back as this CPU's (the exit restored the host state
    // written for this CPU, not the one the vCPU was created on).
    let here = vcpu::cpu_local::get();
    let own = core::ptr::eq(here, &smp::this_cpu().local) && here.index == smp::this_cpu().index();
    step.seen = Some((what, here.index, own));
    0
}

/// A vCPU created on the boot CPU enters its guest there, on the next CPU,
/// and on the boot CPU again (released between: VMCLEAR/VMPTRLD under
/// VT-x, the host save area and a TLB flush under AMD-V). Its nested table
/// is empty, so each entry ends at once in a nested page fault at the same
/// address, and its state stays what it was. Run at boot with the vCPU
/// conformance check; prints one line per entry and PASS or FAIL.
pub fn vcpu_move_check<B: hypervisor::backend::Backend>(b: &mut B, out: &mut impl FnMut(&str)) -> bool {
    use mm::hal::FrameAlloc;
    let all: Vec<&'static Cpu> = smp::cpus().collect();
    if all.len() < 2 {
        out("vcpu-move: skipped (one cpu)");
        return true;
    }
    let Some(root) = b.mem().alloc_frame() else {
        out("vcpu-move: FAIL no host frame for a nested table");
        return false;
    };
    let start = hypervisor::vm::conformance::start_state();
    let mut v = match b.create_vcpu(root, &start) {
        Ok(v) => v,
        Err(e) => {
            out(&format!("vcpu-move: FAIL cannot create a vCPU: {e}"));
            // SAFETY: our frame; no vCPU uses it.
            unsafe { b.mem().free_frame(root) };
            return false;
        }
    };
    let before = vcpu::Vcpu::state(&v);
    let mut ok = true;
    let mut first: Option<String> = None;
    for target in [all[0], all[1], all[0], all[1]] {
        let mut step = MoveStep { vcpu: &mut v as *mut B::Vcpu, seen: None };
        let arg = &mut step as *mut MoveStep<B::Vcpu> as u64;
        if target.index() == 0 {
            move_step::<B::Vcpu>(arg);
        } else if smp::run_on(&[target], move_step::<B::Vcpu>, arg, 2_000_000)[0].is_none() {
            out(&format!("vcpu-move: FAIL cpu {} did not answer", target.index()));
            ok = false;
            break;
        }
        let Some((what, cpu, own)) = step.seen else { continue };
        let same = *first.get_or_insert_with(|| what.clone()) == what;
        let right = cpu == target.index() && own && same && what.starts_with("nested page fault");
        out(&format!(
            "vcpu-move: entered on cpu {cpu}: {what}{}",
            if right { "" } else { " (WRONG: expected the same fault, on this cpu's own host state)" }
        ));
        ok &= right;
    }
    let after = vcpu::Vcpu::state(&v);
    if after != before {
        out("vcpu-move: FAIL the vCPU's state changed across the moves");
        ok = false;
    }
    b.destroy_vcpu(v);
    // SAFETY: the vCPU that used the frame as its nested root is gone.
    unsafe { b.mem().free_frame(root) };
    out(if ok { "vcpu-move: PASS" } else { "vcpu-move: FAIL" });
    ok
}
