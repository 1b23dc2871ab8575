//! Time slices, on this CPU and on the host's other CPUs.
//!
//! A slice runs one vCPU of one VM until its time is up, it halts, or an
//! exit needs the scheduler. [`Manager::run_slice`] runs one on the calling
//! (boot) CPU. [`Manager::run_round`] runs several at once: one VM stays on
//! the boot CPU and each other runnable VM gets a CPU of its own from a
//! [`SliceCpus`] (the kernel's APs), which holds that VM alone until the
//! slice ends (`docs/smp.md`, "VMs on other CPUs"):
//!
//! - The boot CPU touches nothing of a VM that is away: the round's own
//!   slice is of another VM, and everything else (console commands,
//!   management, frames between VMs, a VM's end) waits for
//!   [`SliceCpus::join`].
//! - The other CPU handles the exits that touch only the VM
//!   (`Vm::handle_exit_with` without the host's memory); an exit that needs the host's shared state
//!   (a nested page fault: host memory, sharing, swap, and the disks and
//!   switches behind MMIO; string I/O) ends the slice and is handled on
//!   the boot CPU after the join.
//! - The vCPU is released at the end of every slice away (VMCLEAR under
//!   VT-x), and released on the boot CPU before it goes away, so it can be
//!   loaded wherever it runs next.
//!
//! **Going on.** When every runnable vCPU has a CPU and nothing between
//! rounds needs the VMs home, the round does not end with the boot CPU's
//! slice: the jobs away and siblings run slice after slice, and the boot
//! CPU runs its own VMs, until it ends the round (`manager/round_on.rs`).
//!
//! **Spares.** With more runnable VMs than CPUs, the round also offers
//! the ones left over as [`Spares`]: a CPU whose slice ends early (its
//! vCPU halts, or leaves an exit for the boot CPU) runs one, as a VM
//! away, for what is left of the round instead of idling to the join.
//!
//! **Siblings.** When CPUs are left over, further vCPUs of a VM already
//! picked join the round, if each of them ran out its last slice (it
//! computes; see [`crate::vm::VcpuSlot::computing`]). Then every slice of
//! that VM in the round, the boot CPU's included, is a [`Sibling`]: it
//! holds its vCPU's slot and local APIC and reads the VM's CPUID profile,
//! nothing else of the VM, so several CPUs hold one VM at once without
//! sharing anything mutable but the [`Gang`]'s atomics. A sibling handles
//! what touches its vCPU alone: CPUID, host interrupts, the end of its
//! time, and its APIC's MSRs, xAPIC page ([`super::local_mmio`]), timer
//! and interrupts, with fixed IPIs to the other vCPUs posted to them
//! ([`super::sibling_apic`]). A HLT with interrupts on waits on the
//! sibling's CPU (halted until a kick or its timer) for a vector posted to
//! it or its timer's; the last sibling to halt or go ends the round for
//! the halted ones. A nested page fault on RAM is fixed by the boot CPU
//! in the VM's memory alone while the others run on (a host call from
//! another CPU, in place on the boot CPU), and a mapping it changes that
//! others may have cached is shot down on their CPUs ([`Gang::shoot_down`])
//! before the guest goes on. Any other exit (a device access, HLT with
//! interrupts off, another MSR, INIT or SIPI, a fault the memory manager
//! cannot fix at once) ends
//! its slice and is handled on the boot CPU after the join, with the whole
//! VM. Such an exit also ends the round for the VM's other siblings: each
//! stops at its next exit, and a kick (an IPI to its host CPU) makes that
//! exit come at once, so the boot CPU gets to the exit without waiting for
//! their slices to run out. The boot CPU delivers the VM's device
//! interrupts before the round, the slice ends in time for the VM's next
//! timer outside the siblings' APICs, and after the join the boot CPU
//! takes in what the siblings left ([`Manager`]'s `absorb_gang`). Outside
//! a sibling's fault, nested mappings change only between rounds, and
//! every vCPU away is released at its slice's end, so the flush on
//! arrival covers them.

use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use vcpu::{ExitKind, Vcpu, VmExit};

use super::host_calls::{Call, HostCalls, SiblingFault};
use super::local_mmio::{InterruptPages, LocalMmio, SiblingApicPage};
use super::sibling_apic::{Outbox, PostedIrr, SiblingApic};
use super::{MIN_SLICE_TICKS, Manager, detach_port, release, round_on};
use crate::backend::Backend;
use crate::devices::DeviceSet;
use crate::devices::lapic::Route;
use crate::emulator::MmioFault;
use crate::memory::GuestMemory;
use crate::memory::HostMemory;
use crate::vm::exit::{Console, Flow, NoHost, cpuid_exit};
use crate::vm::interrupts::{ns_to_ticks, vm_ns};
use crate::vm::{RunState, VcpuSlot, Vm};
use core::cell::{Cell, UnsafeCell};

/// Where a slice's exits are handled.
pub(super) trait SliceHost<B: Backend> {
    /// Handles `exit`, or keeps it for the boot CPU (`None`).
    fn handle(&mut self, vm: &mut Vm<B>, exit: VmExit, backend: &mut B, console: &mut impl Console) -> Option<Flow>;
    /// The exit kept for the boot CPU, if any.
    fn take_deferred(&mut self) -> Option<VmExit>;
    /// Handles the host calls CPUs away asked (the boot CPU only, which
    /// owns the host's memory); how many.
    fn serve(&mut self, calls: &HostCalls<B>, backend: &mut B) -> u32 {
        let _ = (calls, backend);
        0
    }
}

/// On the boot CPU, which owns the host's memory: every exit.
impl<B: Backend> SliceHost<B> for HostMemory {
    #[inline(always)]
    fn handle(&mut self, vm: &mut Vm<B>, exit: VmExit, backend: &mut B, console: &mut impl Console) -> Option<Flow> {
        Some(vm.handle_exit(exit, backend, self, console))
    }
    fn take_deferred(&mut self) -> Option<VmExit> {
        None
    }
    fn serve(&mut self, calls: &HostCalls<B>, backend: &mut B) -> u32 {
        calls.serve(backend, |call, b| serve_call(call, b, self))
    }
}

/// A host call (see [`super::host_calls`]), on the boot CPU: the exit is
/// handled as after the join, with the vCPU loaded here, and released
/// again for the CPU that asked.
fn serve_call<B: Backend>(call: &mut Call<B>, backend: &mut B, host: &mut HostMemory) {
    if let Some(f) = call.fault.as_mut() {
        serve_fault(f, call.vcpu, backend, host);
        call.flow = if f.resolved { Flow::Continue } else { Flow::Yield };
        return;
    }
    // SAFETY: the asker touches neither the VM nor its lines until the
    // answer (`HostCalls::ask`), and the boot CPU no other part of that VM
    // before the join.
    let (vm, lines) = unsafe { (&mut *call.vm, &mut *call.lines) };
    let Some(exit) = call.exit.take() else { return };
    let Some(res) = vm.res.as_mut() else {
        call.flow = Flow::Stop;
        return;
    };
    res.set_cur(call.vcpu);
    vm.devices.set_current(call.vcpu);
    res.vcpu().load();
    let here = vcpu::cpu_local::get();
    let was = here.current_vm.swap(vm.id, Ordering::Relaxed);
    call.flow = vm.handle_exit(exit, backend, host, lines);
    if let Some(res) = vm.res.as_mut() {
        res.vcpu().put();
        res.vcpu().release();
    }
    here.current_vm.store(was, Ordering::Relaxed);
    vm.stats.host_calls += 1;
}

/// A sibling's nested page fault on RAM, on the boot CPU, while the VM's
/// other siblings run on (`docs/smp.md`, "Shootdowns"): the memory manager
/// resolves it (a first touch, copy-on-write, swap-in, the dirty log's
/// write protection) with no sibling reading the VM's memory meanwhile,
/// and a change to a mapping other vCPUs may have cached is shot down on
/// their CPUs before anything it unmapped is freed. Anything else (no
/// frame left, a page still at a migration's source, a write to ROM, a
/// poisoned page) changes nothing: `resolved` stays false and the exit is
/// handled after the join with the whole VM, as before.
fn serve_fault<B: Backend>(f: &mut SiblingFault<B>, v: usize, backend: &mut B, host: &mut HostMemory) {
    use mm::vm_memory::FaultOutcome;
    // SAFETY: the round boxed the gang and keeps it until the join.
    let gang = unsafe { &*f.gang };
    let me = vcpu::cpu_local::get().index;
    let kind = crate::vm::exit::access_kind(f.access);
    let gpa = mm::addr::GuestPhysAddr(f.gpa);
    gang.writing_memory(|| {
        // SAFETY: no `&mut Vm` exists while the round runs; the siblings
        // read the VM's memory only under the gang's lock, held here, and
        // this CPU is the only writer.
        let mem = unsafe { &mut *f.mem };
        let before = mem.page_state(gpa);
        let outcome = host.with_hooks(f.vm_id, |hooks| mem.handle_fault(backend.mem(), hooks, v, gpa, kind));
        let FaultOutcome::Resolved(inv) = outcome else { return };
        if !inv.is_none() {
            gang.shoot_down(me, backend);
        }
        // After every CPU dropped the old translations: tables it unmapped
        // may go.
        inv.flush(backend.mem(), |_| {});
        f.resolved = true;
        f.took = crate::vm::exit::FaultTook::of(before, kind);
        host.stats.swapped_in += u64::from(f.took.swap_in);
        host.stats.cow_breaks += u64::from(f.took.cow_break);
    });
}

/// On another CPU: what touches only the VM.
#[derive(Default)]
struct Away {
    deferred: Option<VmExit>,
}

impl<B: Backend> SliceHost<B> for Away {
    #[inline(always)]
    fn handle(&mut self, vm: &mut Vm<B>, exit: VmExit, backend: &mut B, console: &mut impl Console) -> Option<Flow> {
        if Vm::<B>::exit_needs_host(&exit) {
            // Its interrupt controllers are the VM's alone: carried out
            // here, or the VM pays a round per EOI.
            if let VmExit::NestedPageFault { gpa, access, gva } = exit
                && interrupt_mmio_here(vm, MmioFault { gpa, access, gva }, backend)
            {
                return Some(Flow::Continue);
            }
            self.deferred = Some(exit);
            return None;
        }
        Some(vm.handle_exit_with(exit, backend, NoHost, console))
    }
    fn take_deferred(&mut self) -> Option<VmExit> {
        self.deferred.take()
    }
}

/// A VM away's access to its local APIC's page or its I/O APIC's, carried
/// out on the CPU it runs on (`local_mmio`); whether it was (if not,
/// nothing changed and the boot CPU handles the exit after the join).
/// Only a page that is not the guest's RAM: a local APIC moved onto RAM
/// is left to the boot CPU, whose fault handler decides which it is.
#[inline(never)]
fn interrupt_mmio_here<B: Backend>(vm: &mut Vm<B>, fault: MmioFault, backend: &mut B) -> bool {
    let Some(res) = vm.res.as_mut() else { return false };
    let mem = &res.mem;
    if mem.page_state(mm::addr::GuestPhysAddr(fault.gpa)).is_some() || !vm.devices.interrupt_controller_page(fault.gpa)
    {
        return false;
    }
    let (now, hz, offset) = (backend.now(), backend.tsc_hz(), vm.clock_offset_ns);
    let access = LocalMmio {
        vcpu: &mut res.vcpus.current_mut().vcpu,
        mem,
        phys: backend.mem(),
        devices: InterruptPages { devices: &mut vm.devices, to_ns: |t| vm_ns(t, hz, offset) },
    };
    if !access.emulate(fault, now) {
        return false;
    }
    vm.stats.mmio += 1;
    vm.stats.mmio_away += 1;
    vm.timers_changed(hz);
    true
}

/// How a slice ended.
pub struct SliceEnd {
    pub flow: Flow,
    /// An exit left for the boot CPU (slices away only).
    pub deferred: Option<VmExit>,
}

/// Console lines a slice away produced, printed by the boot CPU after the
/// join (the serial port is the boot CPU's).
#[derive(Default)]
pub struct Lines(pub Vec<String>);

impl Console for Lines {
    fn line(&mut self, text: &str) {
        self.0.push(String::from(text));
    }
}

/// What the siblings of one VM share in a round: whether the round is over
/// for them (one left an exit for the boot CPU, which handles it only
/// after the join), the host CPU each runs on (to kick), the interrupts
/// they post to each other, and every vCPU's APIC routing as the round
/// began. Indexed by vCPU.
pub struct Gang {
    /// The VM (its index in the VM table).
    vm: usize,
    over: AtomicBool,
    /// Siblings not halted: every one of the round at first (started or
    /// not), less those halted or gone. The last to halt or go ends the
    /// round for the halted ones, which would otherwise wait for nothing.
    awake: AtomicU32,
    cpus: [AtomicU32; crate::devices::MAX_VCPUS],
    /// Fixed interrupts for each vCPU, from its siblings' IPIs.
    posted: [PostedIrr; crate::devices::MAX_VCPUS],
    /// Level-triggered vectors the siblings ended, for the I/O APIC.
    eois: PostedIrr,
    routes: Vec<Route>,
    /// Nested-mapping changes the boot CPU made for a sibling's fault while
    /// the round ran (see [`Gang::shoot_down`]).
    flush_gen: AtomicU64,
    /// Per vCPU: [`OUT`] while it is not in the guest, else the
    /// `flush_gen` its nested translations are flushed up to.
    inside: [AtomicU64; crate::devices::MAX_VCPUS],
    /// Readers of the VM's memory (siblings decoding an xAPIC access) and
    /// [`MEM_WRITER`] while the boot CPU changes it for a fault.
    mem_lock: AtomicU32,
    /// Shootdowns, and the boot CPU's ticks waiting in them for siblings
    /// to leave the guest (added to the counters after the join).
    shootdowns: AtomicU64,
    shootdown_ticks: AtomicU64,
    shootdown_waits: AtomicU64,
    shootdown_wait_ticks: AtomicU64,
    /// The VM's devices, for siblings' port accesses that reach nothing
    /// else (`DeviceSet::pio_alone`).
    devices: GangDevices,
    /// vCPUs of the VM not in the round but halted with interrupts on,
    /// prepared as standby parts (bit i: vCPU i), and those a CPU took
    /// ([`Gang::claim_standby`]).
    standby: u32,
    standby_claimed: AtomicU32,
    /// A round that goes on (`round_on`): its siblings run slice after
    /// slice until `on_until` (the gang's latest end; 0 once the boot CPU
    /// ends the round). Fixed when the gang is made.
    goes_on: bool,
    on_until: AtomicU64,
}

/// The VM's devices as its siblings reach them in a round: one at a time,
/// under a lock, and never its local APICs (each sibling holds its own;
/// `DeviceSet::pio_alone` touches the device models alone). Nothing else
/// touches the devices until the join: no `&mut Vm` exists meanwhile.
struct GangDevices {
    set: *mut DeviceSet,
    lock: AtomicBool,
    /// Console lines the accesses completed, in the order the lock gave
    /// them (the guest's order), printed after the join.
    lines: UnsafeCell<Vec<String>>,
    /// COM1's interrupt line moved: the boot CPU brings the interrupt
    /// controllers up to date after the join.
    line_moved: AtomicBool,
    /// `lines` has one: the gang stops going on, so the boot CPU prints it
    /// within a slice (read without the lock).
    has_lines: AtomicBool,
}

// SAFETY: `set` and `lines` are reached only in `GangDevices::with`,
// under `lock` (Acquire on taking it, Release on giving it back), and
// `set` points at a VM's devices that nothing else touches until the
// round's join, after which the gang is read on the boot CPU alone.
unsafe impl Sync for GangDevices {}

impl GangDevices {
    /// Devices that are no VM's: every access is left to the boot CPU.
    fn none() -> Self {
        GangDevices {
            set: core::ptr::null_mut(),
            lock: AtomicBool::new(false),
            lines: UnsafeCell::new(Vec::new()),
            line_moved: AtomicBool::new(false),
            has_lines: AtomicBool::new(false),
        }
    }

    /// Runs `f` on the devices and the round's console lines, alone.
    fn with<R>(&self, f: impl FnOnce(&mut DeviceSet, &mut Vec<String>) -> R) -> Option<R> {
        if self.set.is_null() {
            return None;
        }
        while self.lock.compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
            core::hint::spin_loop();
        }
        // SAFETY: the lock is held (see the `Sync` impl), and `set` is
        // the VM's, alive until the join (`prepare_siblings`).
        let r = unsafe { f(&mut *self.set, &mut *self.lines.get()) };
        self.lock.store(false, Ordering::Release);
        Some(r)
    }

    /// The console lines the round's accesses completed (after the join:
    /// the devices are the VM's again, and are not reached here).
    fn take_lines(&mut self) -> Vec<String> {
        core::mem::take(self.lines.get_mut())
    }
}

/// `Gang::inside` of a vCPU not in the guest.
const OUT: u64 = u64::MAX;
/// `Gang::mem_lock` held by the boot CPU.
const MEM_WRITER: u32 = 1 << 31;

/// `Gang::cpus` of a vCPU not in the guest for this round: not one of the
/// round's siblings, or one whose slice is over.
const NO_CPU: u32 = u32::MAX;
/// `Gang::cpus` of a sibling of the round that has not started yet: it
/// takes what is posted to it when it does.
const NOT_YET: u32 = u32::MAX - 1;

/// A `Gang::cpus` value naming a host CPU.
fn on_cpu(c: u32) -> bool {
    c < NOT_YET
}

impl Gang {
    /// The gang of the vCPUs `members` (indexes) of VM `vm`.
    fn new(vm: usize, members: &[usize], routes: Vec<Route>) -> Self {
        let cpus = [const { AtomicU32::new(NO_CPU) }; crate::devices::MAX_VCPUS];
        for &v in members {
            if let Some(c) = cpus.get(v) {
                c.store(NOT_YET, Ordering::Relaxed);
            }
        }
        Gang {
            vm,
            over: AtomicBool::new(false),
            awake: AtomicU32::new(members.len() as u32),
            cpus,
            posted: Default::default(),
            eois: PostedIrr::default(),
            routes,
            flush_gen: AtomicU64::new(0),
            inside: [const { AtomicU64::new(OUT) }; crate::devices::MAX_VCPUS],
            mem_lock: AtomicU32::new(0),
            shootdowns: AtomicU64::new(0),
            shootdown_ticks: AtomicU64::new(0),
            shootdown_waits: AtomicU64::new(0),
            shootdown_wait_ticks: AtomicU64::new(0),
            devices: GangDevices::none(),
            standby: 0,
            standby_claimed: AtomicU32::new(0),
            goes_on: false,
            on_until: AtomicU64::new(0),
        }
    }

    /// A CPU whose sibling slice ends at an IPI for the vCPUs `targets`
    /// (not in the guest) takes one of them that waits in standby, if any:
    /// it counts as awake from here (before the sender leaves, so that the
    /// sender being the last awake does not end the round for it).
    fn claim_standby(&self, targets: u32) -> Option<usize> {
        let mut left = targets & self.standby;
        while left != 0 {
            let v = left.trailing_zeros() as usize;
            left &= left - 1;
            let bit = crate::devices::bit(v);
            if self.standby_claimed.fetch_or(bit, Ordering::SeqCst) & bit == 0 {
                self.awake.fetch_add(1, Ordering::SeqCst);
                return Some(v);
            }
        }
        None
    }

    /// Just before vCPU `v` enters the guest: whether it must flush its
    /// nested translations first (a shootdown since `seen`, which this
    /// moves on). From here until [`Gang::left_guest`] it counts as in
    /// the guest with translations as new as `seen`. (SeqCst here and in
    /// `shoot_down`: either this sees the new generation before it
    /// enters, or the boot CPU sees it inside with an older one and kicks
    /// it out.)
    fn entering(&self, v: usize, seen: &mut u64) -> bool {
        let Some(inside) = self.inside.get(v) else { return false };
        let mut flush = false;
        loop {
            let g = self.flush_gen.load(Ordering::SeqCst);
            if g != *seen {
                *seen = g;
                flush = true;
            }
            inside.store(*seen, Ordering::SeqCst);
            if self.flush_gen.load(Ordering::SeqCst) == *seen {
                return flush;
            }
        }
    }

    /// vCPU `v` is out of the guest (after its exit).
    fn left_guest(&self, v: usize) {
        if let Some(inside) = self.inside.get(v) {
            inside.store(OUT, Ordering::SeqCst);
        }
    }

    /// The boot CPU changed the VM's nested mappings: every sibling in the
    /// guest with older translations is kicked out and waited for (it
    /// flushes before it enters again, as does every sibling out of the
    /// guest now). Returns when no CPU can use a translation from before
    /// the change, so the caller may free what the change unmapped.
    /// Siblings that are halted, asking or not yet started are out of the
    /// guest: nobody waits for them.
    fn shoot_down<B: Backend>(&self, me: u32, backend: &B) {
        let t0 = backend.now();
        let g = self.flush_gen.fetch_add(1, Ordering::SeqCst) + 1;
        let stale = |v: usize| {
            let s = self.inside[v].load(Ordering::SeqCst);
            s != OUT && s < g
        };
        let mut pending = 0u32;
        for (v, cpu) in self.cpus.iter().enumerate() {
            if stale(v) {
                let c = cpu.load(Ordering::SeqCst);
                if on_cpu(c) && c != me {
                    backend.kick(c);
                }
                pending |= crate::devices::bit(v);
            }
        }
        let waited = pending != 0;
        while pending != 0 {
            let v = pending.trailing_zeros() as usize;
            if !stale(v) {
                pending &= !crate::devices::bit(v);
            } else {
                core::hint::spin_loop();
            }
        }
        let ticks = backend.now().saturating_sub(t0);
        self.shootdowns.fetch_add(1, Ordering::Relaxed);
        self.shootdown_ticks.fetch_add(ticks, Ordering::Relaxed);
        if waited {
            self.shootdown_waits.fetch_add(1, Ordering::Relaxed);
            self.shootdown_wait_ticks.fetch_add(ticks, Ordering::Relaxed);
        }
    }

    /// Runs `f` while the boot CPU does not change the VM's memory.
    fn reading_memory<R>(&self, f: impl FnOnce() -> R) -> R {
        loop {
            let n = self.mem_lock.load(Ordering::Relaxed);
            if n & MEM_WRITER == 0
                && self.mem_lock.compare_exchange_weak(n, n + 1, Ordering::Acquire, Ordering::Relaxed).is_ok()
            {
                break;
            }
            core::hint::spin_loop();
        }
        let r = f();
        self.mem_lock.fetch_sub(1, Ordering::Release);
        r
    }

    /// Runs `f` (the boot CPU's change of the VM's memory) with no sibling
    /// reading it.
    fn writing_memory<R>(&self, f: impl FnOnce() -> R) -> R {
        // New readers wait from here on; those inside finish.
        self.mem_lock.fetch_or(MEM_WRITER, Ordering::Acquire);
        while self.mem_lock.load(Ordering::Acquire) != MEM_WRITER {
            core::hint::spin_loop();
        }
        let r = f();
        self.mem_lock.store(0, Ordering::Release);
        r
    }

    /// vCPU `v` runs on `cpu` from now on; whether the round is already
    /// over for it. (SeqCst here and in `end` and `post`: either this sees
    /// `over` or a posted vector, or the other side sees this CPU and
    /// kicks it.)
    fn join(&self, v: usize, cpu: u32) -> bool {
        if let Some(c) = self.cpus.get(v) {
            c.store(cpu, Ordering::SeqCst);
        }
        self.over.load(Ordering::SeqCst)
    }

    /// vCPU `v` left the guest for the round (`awake`: not halted):
    /// nobody need kick it.
    fn leave<B: Backend>(&self, v: usize, awake: bool, me: u32, backend: &B) {
        if let Some(c) = self.cpus.get(v) {
            c.store(NO_CPU, Ordering::SeqCst);
        }
        if awake {
            self.doze(me, backend);
        }
    }

    /// A sibling halts (or goes): whether it was the last one awake, in
    /// which case the round is over for those halted. Not while a vector
    /// waits for a sibling in the guest (it was kicked and will wake), nor
    /// if one woke meanwhile: a halted sibling counts itself awake before
    /// it takes its vectors (`halt_here`), so with SeqCst throughout,
    /// either this sees the vector, or the count again above zero.
    fn doze<B: Backend>(&self, me: u32, backend: &B) -> bool {
        let last = self.awake.fetch_sub(1, Ordering::SeqCst) == 1
            && !self.posted.iter().zip(&self.cpus).any(|(p, c)| c.load(Ordering::SeqCst) != NO_CPU && p.any())
            && self.awake.load(Ordering::SeqCst) == 0;
        if last {
            self.end(me, backend);
        }
        last
    }

    /// A halted sibling wakes (before it takes its vectors; see `doze`).
    fn wake(&self) {
        self.awake.fetch_add(1, Ordering::SeqCst);
    }

    /// Ends the round for every sibling: each stops at its next exit, and
    /// the kick makes that exit come now.
    fn end<B: Backend>(&self, me: u32, backend: &B) {
        self.over.store(true, Ordering::SeqCst);
        self.kick_all(me, backend);
    }

    /// Kicks every CPU (other than `me`) running one of its siblings.
    fn kick_all<B: Backend>(&self, me: u32, backend: &B) {
        for c in &self.cpus {
            let c = c.load(Ordering::SeqCst);
            if on_cpu(c) && c != me {
                backend.kick(c);
            }
        }
    }

    /// Kicks the host CPUs that run the vCPUs in `vcpus` (bit i: vCPU
    /// i), after vectors were posted to them from host CPU `me`. (SeqCst:
    /// see `join`; the posts came first.) Returns those of them not in the
    /// guest for this round, whose vectors wait for the boot CPU.
    fn kick_posted<B: Backend>(&self, vcpus: u32, me: u32, backend: &B) -> u32 {
        let (mut left, mut away) = (vcpus, 0);
        while left != 0 {
            let v = left.trailing_zeros() as usize;
            left &= left - 1;
            let c = self.cpus.get(v).map_or(NO_CPU, |c| c.load(Ordering::SeqCst));
            if on_cpu(c) && c != me {
                backend.kick(c);
            }
            if c == NO_CPU {
                away |= crate::devices::bit(v);
            }
        }
        away
    }

    fn over(&self) -> bool {
        self.over.load(Ordering::Relaxed)
    }

    /// In a round that goes on, until when its siblings may run (0 once
    /// the round is to end); `None` in a round that does not.
    fn going_on_until(&self) -> Option<u64> {
        self.goes_on.then(|| self.on_until.load(Ordering::SeqCst))
    }

    /// The boot CPU ends a round that goes on: each sibling's slice ends
    /// at its next look (a kick makes that now), as in a round that does
    /// not; unlike [`Gang::end`], not as if a sibling had cut it short.
    fn stop_going_on<B: Backend>(&self, me: u32, backend: &B) {
        if !self.goes_on {
            return;
        }
        self.on_until.store(0, Ordering::SeqCst);
        self.kick_all(me, backend);
    }
}

/// A sibling's way to its gang: vectors posted, and the vCPUs they went
/// to, whose CPUs the sibling kicks once the access is done.
struct GangOutbox<'a> {
    gang: &'a Gang,
    posted_to: Cell<u32>,
}

impl<'a> GangOutbox<'a> {
    fn new(gang: &'a Gang) -> Self {
        GangOutbox { gang, posted_to: Cell::new(0) }
    }
}

impl Outbox for GangOutbox<'_> {
    fn routes(&self) -> &[Route] {
        &self.gang.routes
    }
    fn post(&self, vcpu: usize, vector: u8) {
        if let Some(p) = self.gang.posted.get(vcpu) {
            p.post(vector);
            self.posted_to.set(self.posted_to.get() | crate::devices::bit(vcpu));
        }
    }
    fn eoi(&self, vector: u8) {
        self.gang.eois.post(vector);
    }
}

/// One vCPU of a VM that has several in the round: all a sibling slice
/// may touch (see the module's "Siblings").
pub struct Sibling<B: Backend> {
    /// Its VM's siblings' shared word (boxed by the round, alive until the
    /// join).
    gang: *const Gang,
    /// Its vCPU's index.
    vcpu: usize,
    /// It entered the guest (a sibling whose round was over before it
    /// started does not).
    ran: bool,
    /// Its slice ended early because another sibling's did.
    kicked: bool,
    /// Its slot, this job's alone until the join (the others of the round
    /// hold other slots of the VM; nobody holds the VM).
    slot: *mut VcpuSlot<B::Vcpu>,
    /// Its local APIC, likewise its alone.
    apic: SiblingApic,
    /// The VM's memory, read by every sibling (the instruction of an
    /// xAPIC access and its page walk) and written by the boot CPU for a
    /// sibling's fault, each under the gang's lock.
    mem: *mut GuestMemory<B::Format>,
    /// The gang's shootdown generation its translations are flushed up to.
    seen_gen: u64,
    /// Its faults on RAM the boot CPU fixed while the round ran: asked as
    /// host calls (and the ticks it waited for them), or handled in place
    /// (a sibling on the boot CPU); what they took.
    host_calls: u64,
    call_ticks: u64,
    faults_in_place: u64,
    swapped_in: u64,
    cow_breaks: u64,
    /// Port accesses it carried out where it ran (`sibling_pio`), and
    /// whether its slice ended because one moved COM1's interrupt line.
    pio_here: u64,
    line_moved: bool,
    /// Moves of COM1's line it carried to the controllers where it ran.
    lines_here: u64,
    /// The VM's clock offset, for the devices that keep time.
    clock_offset_ns: i64,
    /// The VM's CPUID answers, read by every sibling, written by none.
    cpuid: *const crate::cpuid::Profile,
    apic_id: u32,
    vm_id: u32,
    /// What it did, added to the VM's counters after the join.
    exits: [u64; ExitKind::COUNT],
    run_ticks: u64,
    expired: bool,
    /// HLTs it waited out on its CPU, those a vector ended there, and
    /// whether its slice ended with the vCPU halted.
    halts: u64,
    woken: u64,
    ended_halted: bool,
    /// Its slice ended at an IPI it sent to a vCPU not in the guest.
    ipi_away: bool,
    /// Then, the target it took from standby to run next on its CPU.
    standby_next: Option<usize>,
    /// It ran from standby (woken by a sibling's IPI on that one's CPU).
    from_standby: bool,
    /// When its slice was due to end: a standby it takes runs until then.
    deadline: u64,
    /// Slices it ran after its first, the round going on.
    slices_on: u64,
    /// On the boot CPU in a round that goes on: whether something wants
    /// the boot CPU between rounds (`SliceCpus::poll`), looked at before
    /// each further slice.
    poll: Option<fn() -> bool>,
}

/// One vCPU's slice on another CPU, or a sibling's on any CPU. The boot
/// CPU makes it, hands it to a [`SliceCpus`] (or runs it itself), and
/// reads it back only after [`SliceCpus::join`].
pub struct AwaySlice<B: Backend> {
    /// The VM, the other CPU's alone until the join (a pointer: the boot
    /// CPU keeps its `Box` in the VM table and does not touch it). Null
    /// for a sibling, which reaches only its own slot.
    vm: *mut Vm<B>,
    sibling: Option<Sibling<B>>,
    index: usize,
    vcpu: usize,
    slice_ticks: u64,
    /// Set by [`AwaySlice::run`].
    end: Option<SliceEnd>,
    lines: Lines,
    /// The host CPU that ran it.
    cpu: u32,
    /// It ran on another CPU than the boot CPU.
    away: bool,
    /// When the boot CPU's own slice of the round is due to end: a VM
    /// away of one vCPU goes on past its own timer's interrupts until
    /// then, rather than leave its CPU idle for the rest of the round.
    until: Option<u64>,
    /// The VM's NUMA node: a CPU of that node takes it if one is free.
    node: Option<u32>,
    /// The round's spare slices, which this job's CPU takes after its own
    /// slice while the round has time left (null for a spare itself).
    spares: *const Spares<B>,
    /// The round's standby siblings, one of which this job's CPU takes
    /// when its sibling slice ends at an IPI for it (null: none).
    standbys: *const Standbys<B>,
    /// The round's host calls and this job's slot there: away, an exit
    /// for the boot CPU is handled by it while the round runs (null: it
    /// waits for the join).
    calls: *const HostCalls<B>,
    call_slot: usize,
    /// Exits the boot CPU handled for it that way, and how long it
    /// waited for their answers (TSC ticks of its CPU).
    host_calls: u64,
    call_ticks: u64,
    /// A round that goes on: its end, which the boot CPU sets when it
    /// wants every VM home, read here after each slice that ran out and at
    /// each kick (null: the job ends with its slice, as in every round
    /// before 2026-12-05).
    round_end: *const AtomicU64,
    /// Slices it ran after its first, the round going on.
    slices_on: u64,
    /// A job of a round's run queue: the queue and its place there (null
    /// otherwise); and whether its last slice gave its CPU back for
    /// another job (it is free again).
    queue: *const Spares<B>,
    queue_slot: usize,
    paused: bool,
}

impl<B: Backend> AwaySlice<B> {
    /// Vcpu `vcpu` of the VM at `index` in the table, for `slice_ticks`,
    /// made on CPU `cpu`; the caller gives it its VM or sibling part.
    fn new(index: usize, vcpu: usize, slice_ticks: u64, cpu: u32, node: Option<u32>) -> Self {
        AwaySlice {
            vm: core::ptr::null_mut(),
            sibling: None,
            index,
            vcpu,
            slice_ticks,
            end: None,
            lines: Lines::default(),
            cpu,
            away: false,
            until: None,
            node,
            spares: core::ptr::null(),
            standbys: core::ptr::null(),
            calls: core::ptr::null(),
            call_slot: 0,
            host_calls: 0,
            call_ticks: 0,
            round_end: core::ptr::null(),
            slices_on: 0,
            queue: core::ptr::null(),
            queue_slot: 0,
            paused: false,
        }
    }

    /// A CPU's way into a round's run queue `queue` (made on CPU `cpu`):
    /// no VM of its own; it takes the queue's jobs until none is left.
    pub(super) fn into_queue(queue: *const Spares<B>, cpu: u32) -> Self {
        let mut job = AwaySlice::new(usize::MAX, 0, 0, cpu, None);
        job.spares = queue;
        job.away = true;
        job
    }

    /// The NUMA node whose CPUs should run it, if the VM has one.
    pub fn node(&self) -> Option<u32> {
        self.node
    }

    /// Runs the slice on the calling CPU, with that CPU's own backend
    /// instance.
    ///
    /// # Safety
    /// Called once, by the one CPU the job was handed to, between
    /// [`SliceCpus::start`] and the return of [`SliceCpus::join`]: the VM
    /// is then this CPU's alone (the boot CPU does not touch it).
    pub unsafe fn run(&mut self, backend: &mut B) {
        // SAFETY: the caller's contract.
        unsafe { self.run_with(backend, None) }
    }

    /// As [`AwaySlice::run`], on the boot CPU with the host's memory: a
    /// sibling there fixes its faults on RAM in place, and serves the
    /// host calls of the CPUs away at its exits.
    ///
    /// # Safety
    /// As [`AwaySlice::run`].
    unsafe fn run_home(&mut self, backend: &mut B, host: &mut HostMemory) {
        // SAFETY: the caller's contract.
        unsafe { self.run_with(backend, Some(host)) }
    }

    /// # Safety
    /// As [`AwaySlice::run`].
    unsafe fn run_with(&mut self, backend: &mut B, mut host: Option<&mut HostMemory>) {
        self.cpu = vcpu::cpu_local::get().index;
        if let Some(s) = self.sibling.as_mut() {
            // SAFETY: the round keeps its host calls in place until the
            // join (or the pointer is null).
            let calls = unsafe { self.calls.as_ref() };
            let calls_host = SiblingHost { calls, slot: self.call_slot, memory: host.as_deref_mut() };
            // SAFETY: the caller's contract; the boot CPU made the slot
            // and profile pointers from the live VM and touches neither
            // the slot nor the profile until the join.
            self.end = Some(unsafe { run_sibling(s, backend, self.slice_ticks, self.node, calls_host) });
            // A chain (a standby's own IPI wakes another) runs here in
            // turn, each claimed once per round. A standby's own job has no
            // `standbys`: the caller of `Standbys::run` runs what it claimed.
            // SAFETY: the round keeps its standbys in place until the join
            // (or the pointer is null).
            if let Some(standbys) = unsafe { self.standbys.as_ref() } {
                let mut next = s.standby_next.take().map(|v| (v, s.deadline));
                while let Some((v, deadline)) = next {
                    // SAFETY: this CPU claimed vCPU `v` in its gang
                    // (`Gang::claim_standby`), which makes its part this
                    // CPU's alone; the round has not joined yet.
                    next = unsafe { standbys.run(self.index, v, deadline, backend, host.as_deref_mut()) };
                }
            }
        } else if !self.vm.is_null() {
            // SAFETY: the caller's contract: nothing else uses the VM now.
            self.end = Some(unsafe { self.run_away(backend) });
        }
        // (Else a CPU's way into a round's run queue: no VM of its own.)
        // SAFETY: the round keeps its spares in place until the join (or
        // the pointer is null), and this CPU runs nothing else of the
        // round meanwhile: its own job is over.
        if let Some(spares) = unsafe { self.spares.as_ref() } {
            // SAFETY: as above.
            unsafe { spares.run_here(backend, self.away, host) };
        }
    }

    /// A spare slice the boot CPU takes, run as the boot CPU runs its own
    /// pick: with the host's memory, so that its exits are all handled
    /// in place (faults on RAM, virtio, string I/O), and serving the
    /// other CPUs' host calls at its exits; before 2026-12-04 the first
    /// such exit ended the spare, and the calls waited for the join.
    ///
    /// # Safety
    /// As [`AwaySlice::run`].
    unsafe fn run_spare_home(&mut self, backend: &mut B, host: &mut HostMemory) {
        self.cpu = vcpu::cpu_local::get().index;
        // SAFETY: the round keeps its host calls in place until the join
        // (or the pointer is null).
        let calls = unsafe { self.calls.as_ref() };
        // SAFETY: the caller's contract: nothing else uses the VM now.
        let vm = unsafe { &mut *self.vm };
        let end = run_body(vm, self.vcpu, backend, host, &mut self.lines, self.slice_ticks, self.until, calls, None);
        // Any CPU may load it next.
        if let Some(res) = vm.res.as_mut() {
            res.vcpu().release();
        }
        self.end = Some(end);
    }

    /// The slice of a VM (not a sibling): its exits for the boot CPU go
    /// to it as host calls while the round runs, when the job is away and
    /// the round takes them (else the first ends the slice, as before).
    ///
    /// # Safety
    /// As [`AwaySlice::run`].
    unsafe fn run_away(&mut self, backend: &mut B) -> SliceEnd {
        let start = backend.now();
        let mut deadline = start.saturating_add(self.slice_ticks).min(self.until.unwrap_or(u64::MAX));
        let mut slice = self.slice_ticks;
        // SAFETY: the round keeps its end in place until the join (or the
        // pointer is null).
        let round_end = unsafe { self.round_end.as_ref() };
        loop {
            // SAFETY: the caller's contract: nothing else uses the VM now
            // (nor during a host call, which has it only while this waits
            // with no reference to it alive).
            let vm = unsafe { &mut *self.vm };
            let end = run_body(
                vm,
                self.vcpu,
                backend,
                &mut Away::default(),
                &mut self.lines,
                slice,
                self.until,
                None,
                round_end,
            );
            // Any CPU may load it next (the boot CPU for a host call too).
            if let Some(res) = vm.res.as_mut() {
                res.vcpu().release();
            }
            // The round goes on: another slice here, with nothing the boot
            // CPU must see between the two.
            // (One clock read for the check and the next slice: a CPU held up
            // between two reads must not find the end behind it.)
            let now = backend.now();
            if let Some(round_end) = round_end
                && let Some(until) = goes_on_after(vm, self.vcpu, &end, &self.lines, round_end, now, backend.tsc_hz())
            {
                // A run queue's job gives its CPU to one that waits.
                // SAFETY: the round keeps its queue in place until the join
                // (or the pointer is null).
                if unsafe { self.queue.as_ref() }.is_some_and(|q| q.others_wait(self.queue_slot, now)) {
                    self.paused = true;
                    return end;
                }
                self.slices_on += 1;
                self.until = Some(until);
                deadline = now.saturating_add(self.slice_ticks).min(until);
                slice = deadline.saturating_sub(now);
                continue;
            }
            let left = deadline.saturating_sub(backend.now());
            // SAFETY: the round keeps its host calls in place until the
            // join (or the pointer is null).
            let calls = unsafe { self.calls.as_ref() }.filter(|_| self.away && left >= MIN_SLICE_TICKS);
            let (Some(calls), Some(exit)) = (calls, end.deferred.as_ref()) else { return end };
            let call = Call {
                vm: self.vm,
                vcpu: self.vcpu,
                exit: Some(exit.clone()),
                lines: &raw mut self.lines,
                flow: Flow::Yield,
                cpu: vcpu::cpu_local::get().index,
                fault: None,
            };
            let asked = backend.now();
            // SAFETY: the slot is this job's; `vm` (the reference above) is
            // not used again, and the lines are not touched, until the
            // answer.
            let Some(Call { flow, .. }) = (unsafe { calls.ask(self.call_slot, call, backend) }) else { return end };
            self.host_calls += 1;
            self.call_ticks += backend.now().saturating_sub(asked);
            if flow != Flow::Continue {
                return SliceEnd { flow, deferred: None };
            }
            // SAFETY: answered: the VM is this CPU's again.
            let vm = unsafe { &mut *self.vm };
            // An IPI the exit sent to another of its vCPUs: the scheduler
            // runs that one first next, as `run_body` does.
            let kicked = vm.devices.take_kicked() & !crate::devices::bit(self.vcpu);
            if kicked != 0 {
                vm.ipi_waiting |= kicked;
                return SliceEnd { flow: Flow::Yield, deferred: None };
            }
            slice = deadline.saturating_sub(backend.now());
            if slice < MIN_SLICE_TICKS {
                return SliceEnd { flow: Flow::Yield, deferred: None };
            }
            // It left its CPU for the call (released); `run_body` enters it
            // again.
            if let Some(slot) = vm.res.as_mut().and_then(|r| r.vcpus.get_mut(self.vcpu)) {
                slot.state.apply(crate::vm::VcpuEvent::Leave);
            }
        }
    }

    /// The VM this slice is of (its index in the VM table).
    pub fn vm_index(&self) -> usize {
        self.index
    }
}

/// Whether a VM away whose slice `end` just returned runs another in a
/// round that goes on, and until when: only a slice that ran out with its
/// vCPU still runnable and nothing for the boot CPU (no exit left to it,
/// no frame to forward, no device signal, no console line to print:
/// `lines` is what the job holds), while the round's end leaves room for
/// one. The vCPU leaves its CPU for the next entry. In a VM of several
/// vCPUs, also only while no other of its vCPUs wants a CPU
/// (`Vm::others_want_cpu_after_timers`, on the host clock's rate `hz`):
/// one that does needs the round's end to be picked.
///
/// (A line held for a round that goes on would come out up to 8 slices
/// late, after lines the boot CPU's VMs printed meanwhile: a VM away
/// would look as if it had not run beside them.)
fn goes_on_after<B: Backend>(
    vm: &mut Vm<B>,
    v: usize,
    end: &SliceEnd,
    lines: &Lines,
    round_end: &AtomicU64,
    now: u64,
    hz: u64,
) -> Option<u64> {
    if !ended_alone(vm, end, lines) || !vm.state.runnable() || vm.others_want_cpu_after_timers(v, now, hz) {
        return None;
    }
    let until = round_end.load(Ordering::Acquire);
    if until < now.saturating_add(MIN_SLICE_TICKS) {
        return None;
    }
    let slot = vm.res.as_mut()?.vcpus.get_mut(v)?;
    if slot.state != crate::vm::VcpuState::Running {
        return None;
    }
    slot.state.apply(crate::vm::VcpuEvent::Leave);
    Some(until)
}

/// Until when a run queue's job sleeps after its slice `end`: its one
/// vCPU halted with interrupts on, waiting for its timer, and nothing of
/// the slice for the boot CPU (as [`goes_on_after`]). `None`: it does not
/// sleep (it runs on, or is done for the round).
fn asleep_until<B: Backend>(vm: &Vm<B>, v: usize, end: &SliceEnd, lines: &Lines) -> Option<u64> {
    if !ended_alone(vm, end, lines) {
        return None;
    }
    halted_for_timer(vm, v)
}

/// Whether a slice's `end` left nothing for the boot CPU: it reaches only
/// its VM (`round_on::ends_alone`), no device signal waits, and the job
/// holds no console line to print.
fn ended_alone<B: Backend>(vm: &Vm<B>, end: &SliceEnd, lines: &Lines) -> bool {
    round_on::ends_alone(vm, end) && !vm.devices.has_signals() && lines.0.is_empty()
}

/// The host time vCPU `v` of `vm` sleeps until: halted with interrupts on,
/// waiting for the VM's timer (set), the VM live and not paused, and its
/// only vCPU (the VM's timer may be another vCPU's, which the CPU that
/// wakes the job would not run). `None` otherwise.
pub(super) fn halted_for_timer<B: Backend>(vm: &Vm<B>, v: usize) -> Option<u64> {
    let res = vm.res.as_ref()?;
    if res.vcpus.len() != 1 {
        return None;
    }
    let slot = res.vcpus.get(v)?;
    let halted = slot.state == crate::vm::VcpuState::Halted && !slot.halted_irq_off && slot.awaiting_page.is_none();
    let live = !vm.state.ended() && !vm.paused && !vm.created;
    (halted && live && vm.timer_tick != u64::MAX).then_some(vm.timer_tick)
}

/// The slices a round offers beyond one per CPU (`docs/smp.md`, "Spare
/// slices"): further runnable VMs, each a job like a VM away. A CPU whose
/// own slice ends early (its vCPU halted, left an exit for the boot CPU,
/// or its VM ended) takes one for what is left of the round rather than
/// idle until the join, and then another, until none is left or the
/// round's time is up. Each CPU first looks for a vCPU that last ran on
/// it (nothing to move), then of its NUMA node, then takes any. A spare no
/// CPU took waits for the next round, where it goes first.
///
/// In a round of the run queue (`manager/run_queue.rs`) every runnable VM
/// is such a job, and a job is taken again and again: one whose slice ran
/// out with nothing for the boot CPU gives its CPU back while another job
/// waits (it is free again, and the job that waited longest goes next).
pub struct Spares<B: Backend> {
    /// Each job in place until the join; a CPU touches one only after its
    /// `claimed` flag became its own.
    jobs: Vec<UnsafeCell<AwaySlice<B>>>,
    claimed: Vec<AtomicBool>,
    /// Where each job's vCPU last ran and its VM's node, for the choice
    /// (read-only while the round runs).
    last_cpu: Vec<Option<u32>>,
    nodes: Vec<Option<u32>>,
    /// The host's CPUs by NUMA node (APIC ID, node), from the SRAT.
    cpu_nodes: Vec<(u32, u32)>,
    /// The round's end: a spare runs until then, never past it.
    deadline: u64,
    /// Less time than this left is not worth a vCPU's move.
    min_ticks: u64,
    /// The round's end, in a round of the run queue (null: spares of
    /// another round, each taken once, until `deadline`).
    queue_end: *const AtomicU64,
    /// Per job: a CPU ran it (in a run queue a job may be free again
    /// after), and its turn: when it was last given back, counted in
    /// `turns` (the longest waiting goes first; at first its place in the
    /// round-robin). A count, not a clock: the CPUs' clocks need not agree.
    ran: Vec<AtomicBool>,
    freed_at: Vec<AtomicU64>,
    turns: AtomicU64,
    /// A slice of the run queue (then the job is given back if another
    /// waits), and the slices taken from it, all CPUs together.
    slice_ticks: u64,
    queue_slices: AtomicU64,
    /// Per job: asleep until this host time (its VM halted for its timer;
    /// 0: due), and how many a CPU woke.
    not_before: Vec<AtomicU64>,
    woken: AtomicU64,
    /// A job holds console lines, or a job of a VM of several vCPUs is
    /// done for the round (its other vCPUs, or its next timer, need a pick
    /// between rounds): the boot CPU ends the run queue's round at its next
    /// look, so this comes within a slice or so.
    home_wanted: AtomicBool,
}

impl<B: Backend> Spares<B> {
    /// Takes spare slices on the calling CPU until none is left or the
    /// round's time is up.
    ///
    /// # Safety
    /// Called between the round's start and its join by a CPU that runs
    /// no other job of the round meanwhile.
    unsafe fn run_here(&self, backend: &mut B, away: bool, mut host: Option<&mut HostMemory>) {
        let here = vcpu::cpu_local::get();
        let apic = here.apic_id.load(Ordering::Relaxed);
        let node = self.cpu_nodes.iter().find(|c| c.0 == apic).map(|c| c.1);
        loop {
            let Some(k) = self.take(backend, here.index, node, away) else {
                // Nothing to take now: in a run queue, wait for a VM asleep
                // to be due (or the round's end: its kick ends the halt).
                match self.next_wake().filter(|&w| w < self.end()) {
                    Some(wake) if self.end().saturating_sub(backend.now()) >= self.min_ticks => {
                        backend.halt_until(wake);
                        continue;
                    }
                    _ => return,
                }
            };
            // SAFETY: `take` made job `k` this CPU's alone until it is given
            // back; the boot CPU reads it only after the join.
            let job = unsafe { &mut *self.jobs[k].get() };
            match host.as_deref_mut() {
                // SAFETY: `take` made the job this CPU's alone; its VM is
                // in no other job of the round.
                Some(host) => unsafe { job.run_spare_home(backend, host) },
                // SAFETY: as above.
                None => unsafe { job.run(backend) },
            }
            // SAFETY: as above (the job is still this CPU's).
            unsafe { self.give_back(k, job) };
        }
    }

    /// Claims the next job for this CPU and readies it for what is left of
    /// the round (a slice at most, in a run queue); the job is then the
    /// caller's alone until it is given back.
    fn take(&self, backend: &B, me: u32, node: Option<u32>, away: bool) -> Option<usize> {
        let (job, k, left, end) = loop {
            let end = self.end();
            let now = backend.now();
            let left = end.saturating_sub(now);
            if left < self.min_ticks {
                return None;
            }
            let k = self.claim(me, node, now)?;
            // SAFETY: the compare-exchange in `claim` made job `k` this
            // CPU's alone until it is given back; the boot CPU reads it
            // only after the join.
            let job = unsafe { &mut *self.jobs[k].get() };
            if self.not_before[k].swap(0, Ordering::Relaxed) == 0 {
                break (job, k, left, end);
            }
            // A VM asleep (halted for its timer), now due: its timers fire
            // and its vCPU wakes, here (the VM is the job's alone).
            // SAFETY: as above; a job of a run queue always has its VM.
            let vm = unsafe { &mut *job.vm };
            if vm.pick_vcpu(now, backend.tsc_hz()) == Some(job.vcpu) {
                self.woken.fetch_add(1, Ordering::Relaxed);
                break (job, k, left, end);
            }
            // Not woken (its timer moved on): asleep again until a timer
            // still to come; else done for the round (kept claimed), so
            // no CPU takes it again and again while nothing changes.
            if vm.timer_tick != u64::MAX && vm.timer_tick > now {
                self.not_before[k].store(vm.timer_tick, Ordering::Relaxed);
                self.claimed[k].store(false, Ordering::Release);
            }
        };
        self.queue_slices.fetch_add(u64::from(self.is_queue()), Ordering::Relaxed);
        job.slice_ticks = if self.is_queue() { left.min(self.slice_ticks) } else { left };
        job.until = Some(end);
        job.away = away;
        job.paused = false;
        Some(k)
    }

    /// After a job's run: one that paused (a run queue's slice ran out with
    /// nothing for the boot CPU, its vCPU left) is free again for any CPU;
    /// one whose vCPU halted for its timer, with nothing else for the boot
    /// CPU, is asleep until that timer (`not_before`), then free.
    ///
    /// # Safety
    /// The job is the caller's (taken, not given back yet).
    unsafe fn give_back(&self, k: usize, job: &mut AwaySlice<B>) {
        if !job.lines.0.is_empty() {
            self.home_wanted.store(true, Ordering::Relaxed);
        }
        // SAFETY: the caller's contract: the job's VM is this CPU's.
        let vm = unsafe { job.vm.as_ref() };
        let asleep = match (self.is_queue(), job.end.as_ref(), vm) {
            (true, Some(end), Some(vm)) if !job.paused => asleep_until(vm, job.vcpu, end, &job.lines),
            _ => None,
        };
        if self.is_queue() && !job.paused && asleep.is_none() && vm.is_some_and(|vm| vm.vcpu_count() > 1) {
            self.home_wanted.store(true, Ordering::Relaxed);
        }
        if job.paused || asleep.is_some() {
            // (At least 1: 0 means due now. A timer already due wakes it at
            // once, on whichever CPU takes it.)
            self.not_before[k].store(asleep.map_or(0, |t| t.max(1)), Ordering::Relaxed);
            self.freed_at[k].store(self.turns.fetch_add(1, Ordering::Relaxed), Ordering::Relaxed);
            // The job's last write before another CPU may take it.
            self.claimed[k].store(false, Ordering::Release);
        }
    }

    /// The boot CPU's turn in a run queue: one slice of the job that waited
    /// longest, with the host's memory (as [`Spares::run_here`]), given
    /// back after it if it may go on. False: no job was free.
    ///
    /// # Safety
    /// As [`Spares::run_here`].
    pub(super) unsafe fn run_one_home(&self, backend: &mut B, host: &mut HostMemory, node: Option<u32>) -> bool {
        let me = vcpu::cpu_local::get().index;
        let Some(k) = self.take(backend, me, node, false) else { return false };
        // SAFETY: `take` made job `k` this CPU's alone until it is given
        // back; the boot CPU's own reads of it are this.
        let job = unsafe { &mut *self.jobs[k].get() };
        // SAFETY: as above.
        unsafe { job.run_spare_home(backend, host) };
        // SAFETY: as above: the VM is this job's, and the job this CPU's.
        let vm = unsafe { &mut *job.vm };
        // Given back whatever the time (a job free at the round's end is
        // simply not taken again), so the end it reads is never reached.
        let never = AtomicU64::new(u64::MAX);
        if let Some(end) = job.end.as_ref()
            && goes_on_after(vm, job.vcpu, end, &job.lines, &never, backend.now(), backend.tsc_hz()).is_some()
        {
            job.paused = true;
        }
        // SAFETY: as above.
        unsafe { self.give_back(k, job) };
        true
    }

    /// Makes these jobs a round's run queue (`manager/run_queue.rs`) that
    /// ends at `round_end`, each job with its slot in `calls` (null: none);
    /// returns the queue's address for the CPUs' ways into it.
    /// `asleep`: per job, the host time until which its VM sleeps (halted
    /// for its timer; 0: runnable now).
    pub(super) fn make_queue(
        &mut self,
        round_end: &AtomicU64,
        calls: *const HostCalls<B>,
        asleep: &[u64],
    ) -> *const Spares<B> {
        self.queue_end = round_end;
        for (k, &t) in asleep.iter().enumerate() {
            if let Some(n) = self.not_before.get_mut(k) {
                *n.get_mut() = t;
            }
        }
        let me: *const Spares<B> = self;
        for (k, job) in self.jobs.iter_mut().enumerate() {
            let job = job.get_mut();
            job.calls = calls;
            job.call_slot = k;
            job.queue = me;
            job.queue_slot = k;
            job.round_end = round_end;
        }
        me
    }

    /// Whether this is a round's run queue.
    fn is_queue(&self) -> bool {
        !self.queue_end.is_null()
    }

    /// Until when jobs run: the round's end (a run queue's, as the boot
    /// CPU last set it), else the planned deadline.
    fn end(&self) -> u64 {
        // SAFETY: the round keeps its end in place until the join.
        unsafe { self.queue_end.as_ref() }.map_or(self.deadline, |e| e.load(Ordering::Acquire))
    }

    /// Whether job `k` is free and due at `now` (not asleep).
    fn due(&self, k: usize, now: u64) -> bool {
        !self.claimed[k].load(Ordering::Relaxed) && self.not_before[k].load(Ordering::Relaxed) <= now
    }

    /// Whether a job other than `k` waits for a CPU (a run queue's job
    /// then gives its CPU back at its slice's end).
    fn others_wait(&self, k: usize, now: u64) -> bool {
        (0..self.jobs.len()).any(|j| j != k && self.due(j, now))
    }

    /// When the first job asleep is due (`None`: none is asleep).
    pub(super) fn next_wake(&self) -> Option<u64> {
        (0..self.jobs.len())
            .filter(|&k| !self.claimed[k].load(Ordering::Relaxed))
            .map(|k| self.not_before[k].load(Ordering::Relaxed))
            .filter(|&t| t != 0)
            .min()
    }

    /// The job that waited longest at the round's end, if one waited
    /// (after the join): the next round's round-robin starts with it.
    pub(super) fn longest_waiting(&self) -> Option<usize> {
        (0..self.jobs.len())
            .filter(|&k| !self.claimed[k].load(Ordering::Acquire) && self.not_before[k].load(Ordering::Relaxed) == 0)
            .min_by_key(|&k| self.freed_at[k].load(Ordering::Relaxed))
    }

    /// VMs asleep that a CPU woke for their timer (after the join).
    pub(super) fn woken(&self) -> u64 {
        self.woken.load(Ordering::Relaxed)
    }

    /// Whether a job holds console lines for the boot CPU to print, or is
    /// of a VM of several vCPUs and done for the round (see `home_wanted`).
    pub(super) fn home_wanted(&self) -> bool {
        self.home_wanted.load(Ordering::Relaxed)
    }

    /// The slices a run queue's CPUs took, in all (after the join).
    pub(super) fn queue_slices(&self) -> u64 {
        self.queue_slices.load(Ordering::Relaxed)
    }

    /// The spare this CPU takes: one whose vCPU last ran here, else one of
    /// this CPU's node, else the first left. In a run queue: the one that
    /// waited longest, of this CPU's node (or of none) before others.
    fn claim(&self, me: u32, node: Option<u32>, now: u64) -> Option<usize> {
        let k = self.claim_free(me, node, now)?;
        self.ran[k].store(true, Ordering::Relaxed);
        Some(k)
    }

    fn claim_free(&self, me: u32, node: Option<u32>, now: u64) -> Option<usize> {
        let free = |k: &usize| !self.claimed[*k].load(Ordering::Relaxed);
        if self.is_queue() {
            // (No allocation here: this runs on every CPU at every slice's
            // end. A lost race looks again; each loss is another CPU's win.)
            let far = |k: usize| node.is_some() && self.nodes[k].is_some() && self.nodes[k] != node;
            loop {
                let k = (0..self.jobs.len())
                    .filter(|&k| self.due(k, now))
                    .min_by_key(|&k| (far(k), self.freed_at[k].load(Ordering::Relaxed)))?;
                if self.claimed[k].compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
                    return Some(k);
                }
            }
        }
        let mine = (0..self.jobs.len()).filter(free).find(|&k| self.last_cpu[k] == Some(me));
        let near = || (0..self.jobs.len()).filter(free).find(|&k| node.is_some() && self.nodes[k] == node);
        let order = mine.into_iter().chain(near()).chain(0..self.jobs.len());
        order
            .into_iter()
            .find(|&k| self.claimed[k].compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed).is_ok())
    }

    /// Whether a CPU took spare `k` (read after the join).
    fn taken(&self, k: usize) -> bool {
        self.ran[k].load(Ordering::Acquire)
    }
}

/// The round's standby siblings: vCPUs of its gang VMs halted with
/// interrupts on and not picked, each prepared as a sibling part (slot and
/// APIC pointers, released) that no CPU runs unless a sibling's IPI
/// wakes it (`Gang::claim_standby`): then the sender's CPU runs it at
/// once for the rest of its slice, rather than leave the vector for the
/// next round.
pub struct Standbys<B: Backend> {
    /// (VM index, vCPU) of each job, read by every CPU, written by none.
    keys: Vec<(usize, usize)>,
    jobs: Vec<UnsafeCell<AwaySlice<B>>>,
    ran: Vec<AtomicBool>,
}

impl<B: Backend> Standbys<B> {
    /// Runs the standby part of vCPU `v` of the VM at `vm`, claimed by
    /// this CPU in its gang, until `deadline`. Returns the standby its own
    /// IPI claimed in turn, with its deadline, for the caller to run next
    /// (a loop, not a recursion: each one's frame is left first).
    ///
    /// # Safety
    /// Called by the CPU that claimed it (`Gang::claim_standby`, once per
    /// vCPU and round), between the round's start and its join.
    unsafe fn run(
        &self,
        vm: usize,
        v: usize,
        deadline: u64,
        backend: &mut B,
        host: Option<&mut HostMemory>,
    ) -> Option<(usize, u64)> {
        let k = self.keys.iter().position(|&key| key == (vm, v))?;
        self.ran[k].store(true, Ordering::Relaxed);
        // SAFETY: the claim made job `k` this CPU's alone; the boot CPU
        // reads it only after the join.
        let job = unsafe { &mut *self.jobs[k].get() };
        job.slice_ticks = deadline.saturating_sub(backend.now());
        // Made on the boot CPU (`job.cpu` until it runs).
        job.away = vcpu::cpu_local::get().index != job.cpu;
        if let Some(part) = job.sibling.as_mut() {
            // SAFETY: the part's slot is this job's alone (see above).
            let slot = unsafe { &mut *part.slot };
            slot.state.apply(crate::vm::VcpuEvent::Wake);
            slot.stats.wakeups += 1;
        }
        // SAFETY: as above. (Its own `standbys` and `spares` are null: it
        // runs nothing after itself.)
        unsafe { job.run_with(backend, host) };
        let part = job.sibling.as_mut()?;
        part.standby_next.take().map(|next| (next, part.deadline))
    }

    /// After the join: the standby jobs a CPU ran.
    fn taken(self) -> Vec<AwaySlice<B>> {
        self.jobs
            .into_iter()
            .zip(self.ran)
            .filter(|(_, r)| r.load(Ordering::Relaxed))
            .map(|(j, _)| j.into_inner())
            .collect()
    }
}

/// A sibling's slice (see the module's "Siblings"): the vCPU in the
/// guest until its time is up or an exit needs more than the vCPU and its
/// local APIC.
///
/// # Safety
/// `s.slot`, `s.apic` and `s.cpuid` point into a live VM; until this
/// returns nothing else touches that slot or APIC, and nothing writes the
/// profile.
#[inline(never)]
unsafe fn run_sibling<B: Backend>(
    s: &mut Sibling<B>,
    backend: &mut B,
    slice: u64,
    node: Option<u32>,
    mut host: SiblingHost<'_, B>,
) -> SliceEnd {
    // SAFETY: the caller's contract (the gang, boxed by the round, lives
    // until the join).
    let (slot, profile, gang) = unsafe { (&mut *s.slot, &*s.cpuid, &*s.gang) };
    let here = vcpu::cpu_local::get();
    let me = s.vcpu;
    if gang.join(me, here.index) {
        // Another sibling already left an exit for the boot CPU: the
        // round is over for this VM before this one started.
        gang.leave(me, true, here.index, backend);
        s.kicked = true;
        return SliceEnd { flow: Flow::Yield, deferred: None };
    }
    s.ran = true;
    here.current_vm.store(s.vm_id, Ordering::Relaxed);
    slot.state.apply(crate::vm::VcpuEvent::Enter);
    slot.stats.slices += 1;
    here.slices.fetch_add(1, Ordering::Relaxed);
    slot.stats.ran_on(here.index);
    backend.prefer_node(node);
    slot.vcpu.load();
    let mut t0 = backend.now();
    let mut deadline = t0.saturating_add(slice);
    s.deadline = deadline;
    // Its own APIC's timer is its own to deliver: the slice stops for it
    // (and goes on after it) when it comes first.
    s.apic.refresh_timer(t0);
    let mut armed = s.apic.timer;
    slot.vcpu.set_time_slice(entry_budget(t0, armed, deadline));
    let (exits_before, ticks_before) = (s.exits.iter().sum::<u64>(), s.run_ticks);
    // It halted and the round ended before anything woke it.
    let mut halted = false;
    let deferred = loop {
        if gang.over() {
            s.kicked = true;
            break None;
        }
        s.apic.deliver(&gang.posted[me], &mut slot.vcpu);
        if gang.entering(me, &mut s.seen_gen) {
            // The boot CPU changed a nested mapping since this CPU last
            // looked: what it cached goes before the guest runs again.
            slot.vcpu.flush_nested_tlb(mm::paging::FlushScope::All);
        }
        let exit = slot.vcpu.run();
        gang.left_guest(me);
        let t1 = backend.now();
        s.run_ticks += t1.wrapping_sub(t0);
        t0 = t1;
        s.exits[exit.kind() as usize] += 1;
        crate::trace_exit(s.vm_id, &exit);
        let preempted = matches!(exit, VmExit::Preempted);
        let kind = exit.kind();
        let out = GangOutbox::new(gang);
        match exit {
            VmExit::Cpuid => cpuid_exit(&mut slot.vcpu, profile, backend, s.apic_id),
            // A CPU away that asks a host call kicks the boot CPU: the
            // kick's exit, where a sibling here serves it.
            VmExit::ExternalInterrupt { .. } if host.memory.is_some() && host.calls.is_some_and(|c| c.asked()) => {
                slot.vcpu.put();
                host.serve(backend);
                slot.vcpu.load();
                here.current_vm.store(s.vm_id, Ordering::Relaxed);
                // The call's time is not this VM's.
                t0 = backend.now();
                slot.vcpu.set_time_slice(entry_budget(t0, armed, deadline));
            }
            VmExit::ExternalInterrupt { .. } | VmExit::Handled(_) => {}
            VmExit::InterruptWindow if s.apic.delivers() => {}
            // Halted with interrupts on: it waits here for a vector posted
            // to it or its timer, rather than end the round for the VM.
            VmExit::Hlt if s.apic.delivers() && slot.vcpu.rflags() & vcpu::state::bits::RFLAGS_IF != 0 => {
                slot.vcpu.skip_instruction();
                s.halts += 1;
                if !halt_here(s, gang, &*backend, &mut deadline, slice) {
                    halted = true;
                    break None;
                }
                s.woken += 1;
                // The wait may have used this CPU's timer: set the slice's
                // again.
                armed = s.apic.timer;
                slot.vcpu.set_time_slice(entry_budget(backend.now(), armed, deadline));
                continue;
            }
            // Stopped for its APIC's timer, not the slice's end (a timer
            // that fires a little early is re-armed below).
            VmExit::Preempted if s.apic.timer < deadline && t1 < deadline => {}
            // Its slice is up (a timer that fired a little early counts):
            // it ends below, or goes on in a round that goes on.
            VmExit::Preempted => deadline = deadline.min(t1),
            VmExit::Rdmsr { msr } if let Some(r) = s.apic.rdmsr(msr, t1) => {
                crate::vm::exit::complete_rdmsr(&mut slot.vcpu, r.ok());
            }
            VmExit::Wrmsr { msr, value } if let Some(r) = s.apic.wrmsr(msr, value, t1, me, &out) => {
                crate::vm::exit::complete_wrmsr(&mut slot.vcpu, r.is_ok());
            }
            VmExit::NestedPageFault { gpa, access, gva }
                if s.apic.owns_page(gpa)
                    && gang.reading_memory(|| {
                        let page = LocalMmio {
                            vcpu: &mut slot.vcpu,
                            // SAFETY: the caller's contract: until the join
                            // the VM's memory is read by its siblings and
                            // written by the boot CPU, under the gang's
                            // lock, held here.
                            mem: unsafe { &*s.mem },
                            phys: backend.mem(),
                            devices: SiblingApicPage { apic: &mut s.apic, me, out: &out },
                        };
                        page.emulate(MmioFault { gpa, access, gva }, t1)
                    }) => {}
            // A fault on RAM: fixed by the boot CPU while the others run on.
            VmExit::NestedPageFault { gpa, access, .. }
                if sibling_fault(s, gpa, access, backend, &mut host, deadline) =>
            {
                // Waiting for the answer halted this CPU, which disarms
                // its timer (the slice's, under AMD-V): set it again.
                slot.vcpu.set_time_slice(entry_budget(backend.now(), armed, deadline));
            }
            // A port access to a device that reaches nothing else (COM1
            // polled or written, the CMOS clock, the PM timer): here.
            VmExit::Io(io)
                if let Some(line) =
                    sibling_pio(&mut slot.vcpu, gang, io, &*backend, (s.vm_id, s.clock_offset_ns), &out) =>
            {
                s.pio_here += 1;
                match line {
                    Line::Still => {}
                    // Its interrupts were posted like IPIs (kicked below).
                    Line::Carried => s.lines_here += 1,
                    Line::Left => {
                        // COM1's line moved, and what it reaches is the
                        // boot CPU's (vCPU 0's ExtINT, a level-triggered
                        // entry): it carries the line after the join,
                        // which this makes come now.
                        gang.end(here.index, backend);
                        s.line_moved = true;
                        break None;
                    }
                }
            }
            other => {
                // The boot CPU handles it after the join: end the others'
                // slices now rather than let them run out.
                gang.end(here.index, backend);
                break Some(other);
            }
        }
        let to = out.posted_to.take();
        // An IPI for a vCPU not in the guest now: it takes the vector only
        // after the join, so end this slice rather than risk a second IPI
        // of the same vector meeting the first in its IRR; the scheduler
        // runs that vCPU first next (`Vm::ipi_waiting`).
        let away = if to != 0 { gang.kick_posted(to, here.index, backend) } else { 0 };
        if away != 0 {
            s.ipi_away = true;
            // A target halted in standby runs here at once, for the rest
            // of this slice, instead of at the next round.
            if t1.saturating_add(MIN_SLICE_TICKS) < deadline {
                s.standby_next = gang.claim_standby(away);
            }
            break None;
        }
        if s.apic.timer <= t1 {
            s.apic.tick(t1);
        }
        // A round that goes on ends when the boot CPU says so, and kicks
        // this CPU to make it heard (`Gang::stop_going_on`).
        if kind == ExitKind::ExternalInterrupt
            && let Some(until) = gang.going_on_until()
        {
            deadline = deadline.min(until);
        }
        if t1 >= deadline {
            match sibling_goes_on(s, gang, t1, slice, &*backend) {
                Some(next) => {
                    deadline = next;
                    slot.stats.slices += 1;
                    vcpu::cpu_local::get().slices.fetch_add(1, Ordering::Relaxed);
                }
                None => {
                    s.expired = true;
                    break None;
                }
            }
        }
        if s.apic.timer != armed || preempted || s.deadline != deadline {
            armed = s.apic.timer;
            s.deadline = deadline;
            slot.vcpu.set_time_slice(entry_budget(t1, armed, deadline));
        }
    };
    gang.leave(me, !halted, here.index, backend);
    if halted {
        // As the boot CPU's HLT handler leaves it (`Vm::hlt`): interrupts
        // on, so what the boot CPU delivers wakes it.
        slot.state.apply(crate::vm::VcpuEvent::Hlt);
        slot.halted_irq_off = false;
        s.ended_halted = true;
    }
    // Cut short by a sibling, it was computing all the same; ended for its
    // own IPI, it would have posted that where it runs (as it did).
    slot.computing = halted || s.expired || s.ipi_away || (s.kicked && slot.computing);
    slot.stats.exits += s.exits.iter().sum::<u64>() - exits_before;
    slot.stats.run_ticks += s.run_ticks - ticks_before;
    slot.vcpu.put();
    // Any CPU may load it next, the boot CPU for a deferred exit included.
    slot.vcpu.release();
    backend.prefer_node(None);
    here.current_vm.store(0, Ordering::Relaxed);
    SliceEnd { flow: Flow::Yield, deferred }
}

/// What became of COM1's interrupt line after a sibling's port access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Line {
    /// Where it was.
    Still,
    /// Moved, and carried to the controllers where the sibling runs: the
    /// interrupts it sent are posted to their vCPUs.
    Carried,
    /// Moved, and left to the boot CPU (`DeviceSet::com1_line_alone`
    /// refused): the round must end for it.
    Left,
}

/// A sibling's `in` or `out` (not the string forms) of a device that
/// reaches no other device, vCPU or host state (`DeviceSet::pio_alone`),
/// carried out where it runs under the gang's device lock: a vCPU that
/// polls COM1 or reads the PM timer beside its siblings no longer ends
/// their slices for it. A moved COM1 line is carried to the interrupt
/// controllers there too when it only sends fixed interrupts, posted to
/// their vCPUs through `out`. `None` with nothing done for any other
/// access, which the boot CPU handles after the join.
fn sibling_pio<B: Backend>(
    vcpu: &mut impl Vcpu,
    gang: &Gang,
    io: vcpu::IoAccess,
    backend: &B,
    (vm_id, offset_ns): (u32, i64),
    out: &GangOutbox<'_>,
) -> Option<Line> {
    if io.string {
        return None;
    }
    let value = (vcpu.gprs().rax & crate::vm::exit::io_mask(io.size)) as u32;
    let now_ns = || vm_ns(backend.now(), backend.tsc_hz(), offset_ns);
    let (done, line) = gang.devices.with(|devices, lines| {
        // A line left for the boot CPU: every later access waits for it
        // too, so that one moving the line back cannot hide the edge
        // before the boot CPU carries it.
        if gang.devices.line_moved.load(Ordering::Relaxed) {
            return None;
        }
        let done = devices.pio_alone(io.port, io.size, io.write.then_some(value), now_ns)?;
        if io.write && devices.com1_has_output() {
            lines.extend(devices.com1().take_lines().into_iter().map(|l| alloc::format!("[vm {vm_id}] {l}")));
            if !lines.is_empty() {
                gang.devices.has_lines.store(true, Ordering::Relaxed);
            }
        }
        let line = match done.line_moved {
            false => Line::Still,
            true if devices.com1_line_alone(&gang.routes, |v, vector| out.post(v, vector)) => Line::Carried,
            true => {
                gang.devices.line_moved.store(true, Ordering::Relaxed);
                Line::Left
            }
        };
        Some((done, line))
    })??;
    if !io.write {
        crate::vm::exit::complete_in(vcpu, io.size, done.value);
    }
    vcpu.skip_instruction();
    Some(line)
}

/// A sibling whose vCPU halted waits on its CPU (halting it until a kick or
/// the next due time) for what wakes the vCPU: a vector posted to it, or
/// its APIC's timer. Whether it woke; if not, the slice's time ran out or
/// the round ended (another sibling's exit for the boot CPU, or no
/// sibling left awake), and the vCPU stays halted.
fn halt_here<B: Backend>(s: &mut Sibling<B>, gang: &Gang, backend: &B, deadline: &mut u64, slice: u64) -> bool {
    let (me, cpu) = (s.vcpu, vcpu::cpu_local::get().index);
    if s.apic.wakes(&gang.posted[me]) {
        return true;
    }
    if gang.doze(cpu, backend) {
        return false;
    }
    loop {
        let now = backend.now();
        if s.apic.timer <= now {
            s.apic.tick(now);
        }
        // After the timer: its interrupt may be the one.
        if gang.posted[me].any() || s.apic.deliverable() {
            gang.wake();
            if s.apic.wakes(&gang.posted[me]) {
                return true;
            }
            // Masked by the processor priority: halted still.
            if gang.doze(cpu, backend) {
                return false;
            }
            continue;
        }
        if gang.over() {
            return false;
        }
        // A round that goes on: it waits on, slice after slice, until the
        // boot CPU ends the round (then at once: the kick ended the halt).
        if let Some(until) = gang.going_on_until() {
            *deadline = (*deadline).min(until);
        }
        // (Not the boot CPU's own: halted at its slice's end, it leaves,
        // and the boot CPU serves the others' host calls and runs its own
        // VMs while they go on.)
        if now >= *deadline {
            match sibling_goes_on(s, gang, now, slice, backend).filter(|_| s.poll.is_none()) {
                Some(next) => *deadline = next,
                None => return false,
            }
        }
        backend.halt_until(s.apic.timer.min(*deadline));
    }
}

/// A sibling whose slice is up, in a round that goes on (`round_on`):
/// the end of its next slice, or `None` when the round ends for it (not
/// going on, its gang over, the round's end reached, or on the boot CPU
/// something wanting it between rounds, which ends the round for the
/// others too).
fn sibling_goes_on<B: Backend>(s: &mut Sibling<B>, gang: &Gang, now: u64, slice: u64, backend: &B) -> Option<u64> {
    let until = gang.going_on_until()?;
    // A console line waits for the boot CPU: it comes out at the join.
    if gang.over() || until < now.saturating_add(MIN_SLICE_TICKS) || gang.devices.has_lines.load(Ordering::Relaxed) {
        return None;
    }
    if let Some(poll) = s.poll
        && poll()
    {
        gang.stop_going_on(vcpu::cpu_local::get().index, backend);
        return None;
    }
    s.slices_on += 1;
    Some(until.min(now.saturating_add(slice)))
}

/// Where a sibling's faults on RAM are fixed while its round runs.
struct SiblingHost<'a, B: Backend> {
    /// The round's host calls and the job's slot there (none: the round
    /// takes no calls, and such a fault waits for the join).
    calls: Option<&'a HostCalls<B>>,
    slot: usize,
    /// The host's memory, on the boot CPU: its sibling fixes its own
    /// faults in place and serves the calls of the others.
    memory: Option<&'a mut HostMemory>,
}

impl<B: Backend> SiblingHost<'_, B> {
    /// On the boot CPU: serves the calls asked.
    #[cold]
    #[inline(never)]
    fn serve(&mut self, backend: &mut B) {
        let (Some(calls), Some(host)) = (self.calls, self.memory.as_deref_mut()) else { return };
        let served = SliceHost::serve(host, calls, backend);
        calls.served_in_slice.fetch_add(served, Ordering::Relaxed);
    }
}

/// A sibling's nested page fault at `gpa`: if it is on RAM, the boot CPU
/// fixes it while the round runs (in place on the boot CPU, as a host call
/// from elsewhere, if the slice has time left for it). Whether it was
/// fixed (the guest retries the access); if not, nothing changed and the
/// exit waits for the join with the whole VM.
#[cold]
#[inline(never)]
fn sibling_fault<B: Backend>(
    s: &mut Sibling<B>,
    gpa: u64,
    access: vcpu::MemAccess,
    backend: &mut B,
    host: &mut SiblingHost<'_, B>,
    deadline: u64,
) -> bool {
    // SAFETY: the round boxed the gang and keeps it until the join.
    let gang = unsafe { &*s.gang };
    let ram = gang.reading_memory(|| {
        // SAFETY: read under the gang's lock (see `Sibling::mem`).
        let mem = unsafe { &*s.mem };
        matches!(mem.map().lookup(mm::addr::GuestPhysAddr(gpa)), mm::vm_memory::Lookup::Ram)
    });
    if !ram {
        return false;
    }
    let mut fault = SiblingFault {
        mem: s.mem,
        gang: s.gang,
        vm_id: s.vm_id,
        gpa,
        access,
        resolved: false,
        took: Default::default(),
    };
    let t0 = backend.now();
    if let Some(memory) = host.memory.as_deref_mut() {
        serve_fault(&mut fault, s.vcpu, backend, memory);
        s.faults_in_place += u64::from(fault.resolved);
    } else {
        let Some(calls) = host.calls.filter(|_| deadline.saturating_sub(t0) >= MIN_SLICE_TICKS) else {
            return false;
        };
        let call = Call {
            vm: core::ptr::null_mut(),
            vcpu: s.vcpu,
            exit: None,
            lines: core::ptr::null_mut(),
            flow: Flow::Yield,
            cpu: vcpu::cpu_local::get().index,
            fault: Some(fault),
        };
        // SAFETY: the slot is this job's; this touches the VM's memory no
        // more until the answer.
        let Some(answer) = (unsafe { calls.ask(host.slot, call, backend) }) else { return false };
        let Some(answered) = answer.fault else { return false };
        fault = answered;
        s.host_calls += 1;
        s.call_ticks += backend.now().saturating_sub(t0);
    }
    s.swapped_in += u64::from(fault.took.swap_in);
    s.cow_breaks += u64::from(fault.took.cow_break);
    fault.resolved
}

/// Where a VM's round-robin goes on after a round of its vCPUs `mine`
/// (the first pick first) out of `n`: at the first vCPU after the first
/// pick that was not in the round, so one left out (not computing) is the
/// first pick next and runs; with every vCPU in the round, after the last.
/// (Going on after the highest in the round, as before 2026-12-04, passed
/// over a vCPU between two computing ones for good: 4 vCPUs on 4 CPUs,
/// vCPU 1 not computing, ran rounds of 0, 2 and 3 without end while the
/// guest waited for vCPU 1.)
fn next_after_gang(mine: &[usize], n: usize) -> usize {
    let Some(&first) = mine.first() else { return 0 };
    (1..n).map(|d| (first + d) % n).find(|v| !mine.contains(v)).unwrap_or_else(|| (first + 1) % n.max(1))
}

/// How long a sibling may stay in the guest from `now`: until its APIC's
/// timer (`armed`) or the slice's end, but never less than
/// `MIN_SLICE_TICKS` for a timer (a timer due at once, or programmed with a
/// tiny period, still lets the guest run between its interrupts).
fn entry_budget(now: u64, armed: u64, deadline: u64) -> u64 {
    let to_timer = armed.saturating_sub(now).max(MIN_SLICE_TICKS);
    deadline.saturating_sub(now).min(to_timer)
}

/// A sibling's part of its job, and its slice, until the job is built.
struct SiblingPart<B: Backend> {
    vm: usize,
    vcpu: usize,
    part: Option<(Sibling<B>, u64)>,
}

/// The host's other CPUs, as the scheduler uses them: each takes one
/// [`AwaySlice`] at a time.
///
/// # Safety
/// An implementation runs each started job exactly once, on one CPU, by
/// calling [`AwaySlice::run`] with that CPU's backend instance, and
/// [`SliceCpus::join`] returns only after every started job's `run` has
/// returned (with its writes visible to the caller).
pub unsafe trait SliceCpus<B: Backend> {
    /// How many CPUs could take a slice now.
    fn free(&self) -> usize;
    /// Starts `job` on a free CPU; false if none is free (the job was not
    /// touched). `job` must stay where it is until [`SliceCpus::join`].
    fn start(&mut self, job: *mut AwaySlice<B>) -> bool;
    /// Waits for every started job, calling `serve` whenever it may have
    /// host calls to answer (the jobs' CPUs kick this one when they ask).
    fn join(&mut self, serve: &mut dyn FnMut());
    /// Whether its jobs may ask the boot CPU to handle an exit while the
    /// round runs ([`HostCalls`]): only if they run on other CPUs while
    /// the boot CPU goes on (a stand-in that runs them in `join` on the
    /// calling thread would wait for itself).
    fn takes_calls(&self) -> bool {
        false
    }
    /// Whether its jobs may go on past the boot CPU's slice, the round
    /// lasting while nothing needs every VM home (`docs/smp.md`, "Rounds
    /// that go on"). Then the methods below must be real.
    fn goes_on(&self) -> bool {
        false
    }
    /// Whether every job started in the round is still running (none has
    /// returned).
    fn all_running(&self) -> bool {
        false
    }
    /// Whether something outside the VMs wants the boot CPU's loop between
    /// rounds now (console input, a host NIC to poll, an attached console).
    fn wanted(&mut self) -> bool {
        true
    }
    /// Halts this CPU until host time `until`, a job's return or a kick,
    /// whichever comes first (it may return sooner), then calls `serve`.
    fn doze(&mut self, until: u64, serve: &mut dyn FnMut()) {
        let _ = until;
        serve();
    }
    /// Interrupts the CPUs running the round's jobs: a guest there exits
    /// at once and its slice looks at the round's end again.
    fn kick_running(&self) {}
    /// What the boot CPU's own sibling looks at before each further slice
    /// of a round that goes on: whether console input or a host machine
    /// check wants the boot CPU (a plain function: the sibling runs where
    /// `self` is not at hand).
    fn poll(&self) -> fn() -> bool {
        || true
    }
}

/// No other CPUs: every slice runs on the boot CPU.
pub struct NoOtherCpus;

// SAFETY: it starts nothing.
unsafe impl<B: Backend> SliceCpus<B> for NoOtherCpus {
    fn free(&self) -> usize {
        0
    }
    fn start(&mut self, _: *mut AwaySlice<B>) -> bool {
        false
    }
    fn join(&mut self, _: &mut dyn FnMut()) {}
}

/// One vCPU's slice: enters the guest until the slice is over or an exit
/// needs the scheduler (or, away, the boot CPU). Everything it touches is
/// the VM's, the backend (this CPU's) and the host memory or `Away`.
// Out of line: the exit loop gets a frame of its own, whatever the round
// around it holds.
#[inline(never)]
#[allow(clippy::too_many_arguments)]
pub(super) fn run_body<B: Backend, H: SliceHost<B>>(
    vm: &mut Vm<B>,
    v: usize,
    backend: &mut B,
    host: &mut H,
    console: &mut impl Console,
    slice_ticks: u64,
    until: Option<u64>,
    calls: Option<&HostCalls<B>>,
    cut: Option<&AtomicU64>,
) -> SliceEnd {
    let now = backend.now();
    // A throttled VM's cap bounds the wall-clock deadline below too.
    let slice_ticks = slice_ticks.min(vm.throttle.slice_cap(backend.tsc_hz()));
    vm.state = RunState::Running;
    vm.devices.set_current(v);
    vm.stats.first_entry_tsc.get_or_insert(now);
    let here = vcpu::cpu_local::get();
    here.current_vm.store(vm.id, Ordering::Relaxed);
    let slice = planned_slice(vm, now, backend.tsc_hz(), slice_ticks);
    let Some(res) = vm.res.as_mut() else {
        here.current_vm.store(0, Ordering::Relaxed);
        return SliceEnd { flow: Flow::Stop, deferred: None };
    };
    res.set_cur(v);
    let slot = &mut res.vcpus[v];
    slot.state.apply(crate::vm::VcpuEvent::Enter);
    slot.stats.slices += 1;
    here.slices.fetch_add(1, Ordering::Relaxed);
    slot.stats.ran_on(here.index);
    let exits_before = vm.stats.total_exits();
    let ticks_before = vm.stats.run_ticks;
    // Pages the guest touches first in this slice come from its node.
    backend.prefer_node(vm.node);
    res.vcpu().load();
    res.vcpu().set_time_slice(slice);
    let mut slice_end = now.saturating_add(slice);
    vm.deliver_interrupts(now, backend.tsc_hz());
    // The preemption timer counts guest time only; a VM that exits all the
    // time must still give the CPU up after a slice of wall-clock time, or
    // the console and other VMs starve.
    let mut t0 = backend.now();
    let mut deadline = t0.saturating_add(slice_ticks).min(until.unwrap_or(u64::MAX));
    // Its own timer's interrupts are delivered within the slice (one vCPU:
    // an interrupt for another would need the scheduler).
    let goes_on = until.is_some() && vm.res.as_ref().is_some_and(|r| r.vcpus.len() == 1);
    let mut expired = false;
    let mut last = ExitKind::Preempted;
    let mut ipi_sent = false;
    let flow = loop {
        // Not `map` into an `Option<VmExit>`: that moves the exit once more
        // on every exit.
        let Some(res) = vm.res.as_mut() else { break Flow::Stop };
        let exit = res.vcpu().run();
        // One clock read per exit: it ends this run and starts the next, so
        // exit handling counts as the VM's time.
        let t1 = backend.now();
        vm.stats.run_ticks += t1.wrapping_sub(t0);
        t0 = t1;
        let kind = exit.kind();
        last = kind;
        vm.stats.exits[kind as usize] += 1;
        crate::trace_exit(vm.id, &exit);
        let preempted = matches!(exit, VmExit::Preempted);
        // Stopped for its own timer before the slice's end: the interrupt
        // is delivered below, and it goes on.
        let own_timer = goes_on && preempted && t1.saturating_add(MIN_SLICE_TICKS) < deadline;
        let flow = if own_timer {
            Flow::Continue
        } else {
            let Some(flow) = host.handle(vm, exit, backend, console) else {
                break Flow::Yield;
            };
            flow
        };
        if flow != Flow::Continue {
            expired = preempted;
            vm.stats.slices_expired += preempted as u64;
            break flow;
        }
        // An IPI for another vCPU (or an INIT for this one; only an APIC
        // write sends one): let the scheduler act on it now rather than at
        // the slice's end.
        if matches!(kind, vcpu::ExitKind::NestedPageFault | vcpu::ExitKind::Wrmsr) {
            let targets = vm.devices.take_kicked();
            if targets != 0 {
                // They run first next (`Vm::ipi_waiting`).
                vm.ipi_waiting |= targets & !crate::devices::bit(v);
                ipi_sent = true;
                break Flow::Yield;
            }
        }
        // An AP that asks a host call kicks this CPU: the kick's exit.
        if kind == ExitKind::ExternalInterrupt
            && let Some(calls) = calls
            && calls.asked()
        {
            t0 = serve_in_slice(vm, v, backend, host, calls);
        }
        // A round that goes on ends when the boot CPU says so, and kicks
        // this CPU to make it heard (`SliceCpus::kick_running`).
        if kind == ExitKind::ExternalInterrupt
            && let Some(cut) = cut
        {
            deadline = deadline.min(cut.load(Ordering::Acquire));
        }
        vm.deliver_interrupts(t1, backend.tsc_hz());
        // The guest moved its timer earlier than the slice's end
        // (reprogrammed a counter): end the slice in time for it, or a guest
        // that spins waiting for that interrupt gets it only when the slice
        // runs out.
        let timer = vm.timer_tick.max(t1.saturating_add(MIN_SLICE_TICKS));
        if timer < slice_end || own_timer {
            slice_end = timer.min(deadline);
            if let Some(res) = vm.res.as_mut() {
                res.vcpu().set_time_slice(slice_end.saturating_sub(t1).max(MIN_SLICE_TICKS));
            }
        }
        if t1 >= deadline {
            expired = true;
            vm.stats.slices_expired += 1;
            break Flow::Yield;
        }
    };
    vm.throttle.after_slice(vm.stats.run_ticks - ticks_before, backend.now());
    if let Some(slot) = vm.res.as_mut().and_then(|r| r.vcpus.get_mut(v)) {
        // Halted with interrupts on, or ended to let the target of its IPI
        // run: beside a sibling it would wait for its interrupt, or post
        // the IPI, where it runs.
        let idle = last == ExitKind::Hlt && slot.state == crate::vm::VcpuState::Halted && !slot.halted_irq_off;
        slot.computing = expired || idle || ipi_sent;
        slot.stats.exits += vm.stats.total_exits() - exits_before;
        slot.stats.run_ticks += vm.stats.run_ticks - ticks_before;
    }
    if let Some(res) = vm.res.as_mut() {
        res.vcpu().put();
    }
    backend.prefer_node(None);
    here.current_vm.store(0, Ordering::Relaxed);
    SliceEnd { flow, deferred: host.take_deferred() }
}

/// A CPU away waits for an exit of its VM to be handled here, at an exit
/// of this CPU's own slice of `vm` (vCPU `v`): this vCPU steps aside for
/// it (its FPU and lazy MSRs are in the CPU) and comes back. Returns the
/// clock after, where the slice's own time goes on (the call's time is
/// not this VM's). Out of line and cold: the exit loop stays as it was.
#[cold]
#[inline(never)]
fn serve_in_slice<B: Backend, H: SliceHost<B>>(
    vm: &mut Vm<B>,
    v: usize,
    backend: &mut B,
    host: &mut H,
    calls: &HostCalls<B>,
) -> u64 {
    if let Some(res) = vm.res.as_mut() {
        res.vcpu().put();
    }
    let served = host.serve(calls, backend);
    calls.served_in_slice.fetch_add(served, Ordering::Relaxed);
    if let Some(res) = vm.res.as_mut() {
        res.set_cur(v);
        res.vcpu().load();
    }
    vm.devices.set_current(v);
    vcpu::cpu_local::get().current_vm.store(vm.id, Ordering::Relaxed);
    backend.now()
}

/// How long a slice of `vm` starting at `now` is set to run (it may end
/// sooner): at most `slice_ticks`, less for a throttled VM (a migration's
/// auto-converge: short slices keep the pauses between them short), and
/// ending in time for the VM's next timer interrupt.
fn planned_slice<B: Backend>(vm: &Vm<B>, now: u64, hz: u64, slice_ticks: u64) -> u64 {
    let slice_ticks = slice_ticks.min(vm.throttle.slice_cap(hz));
    slice_ticks.min(vm.ticks_to_timer(now).max(MIN_SLICE_TICKS))
}

/// The scheduler's own cost, summed over its rounds (TSC ticks of the
/// boot CPU): what a round spends outside guest slices is picking,
/// posting the slices away, and finishing every slice after the join.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SchedStats {
    pub rounds: u64,
    /// Slices run, on the boot CPU and away.
    pub slices: u64,
    pub slices_away: u64,
    /// Slices run beside another vCPU of the same VM (siblings).
    pub sibling_slices: u64,
    /// Sibling slices ended early (or not started) because another sibling
    /// of their VM left an exit for the boot CPU.
    pub kicked_slices: u64,
    /// Spare slices: taken by a CPU whose own slice of the round ended
    /// early (`Spares`).
    pub spare_slices: u64,
    /// Standby siblings a sibling's IPI woke on the sender's CPU
    /// (`Standbys`).
    pub standby_slices: u64,
    /// Rounds of the run queue (`run_queue`): the slices taken from it
    /// (by the boot CPU: `queue_slices_here`), and the VMs that ran in
    /// them, summed over the rounds.
    pub queue_rounds: u64,
    pub queue_slices: u64,
    pub queue_slices_here: u64,
    pub queue_vms: u64,
    /// VMs asleep in a run queue (halted for their timers) that a CPU
    /// woke and ran when the timer was due (`Spares::take`).
    pub queue_wakes: u64,
    /// Rounds that went on past the boot CPU's slice (`round_on`), and the
    /// slices run in them after the first on each CPU: on the boot CPU, and
    /// by the jobs away.
    pub rounds_on: u64,
    pub slices_on_here: u64,
    pub slices_on_away: u64,
    /// Whole rounds, from the first pick to the last slice finished.
    pub round_ticks: u64,
    /// The boot CPU's own slices (`run_body`), exits handled included.
    pub slice_ticks: u64,
    /// Waiting in the join for the other CPUs' slices.
    pub join_ticks: u64,
    /// Before the boot CPU's slice: picking, releasing and posting the
    /// slices that go away.
    pub start_ticks: u64,
    /// After the join, apart from scheduling proper: printing the console
    /// lines the slices away left, and handling the exits they left to the
    /// boot CPU (`deferred_exits` of them: nested page faults, string I/O).
    pub lines_ticks: u64,
    pub deferred_ticks: u64,
    pub deferred_exits: u64,
    /// Exits of slices away the boot CPU handled while the round ran
    /// (host calls), each instead of an end of that slice.
    pub host_calls: u64,
    /// What the slices away waited for those answers, in all (ticks of
    /// their CPUs' TSCs).
    pub host_call_ticks: u64,
    /// Of those calls, the ones the boot CPU served at an exit of its own
    /// slice (the others, while it waited in the join).
    pub host_calls_in_slice: u64,
    /// Nested-mapping shootdowns: the boot CPU changed a mapping for a
    /// sibling's fault while other siblings of the VM ran (`Gang::shoot_down`);
    /// of them, those that waited for a sibling in the guest to leave it;
    /// and the boot CPU's ticks in them, in all and in those that waited.
    pub shootdowns: u64,
    pub shootdown_waits: u64,
    pub shootdown_ticks: u64,
    pub shootdown_wait_ticks: u64,
    /// The longest round.
    pub longest_round_ticks: u64,
    /// Times the boot CPU halted with nothing to run (`Manager::idle_until`),
    /// and for how long.
    pub idle_halts: u64,
    pub idle_ticks: u64,
}

impl SchedStats {
    /// Counts a round that lasted `ticks`.
    pub(super) fn round_ended(&mut self, ticks: u64) {
        self.rounds += 1;
        self.round_ticks += ticks;
        self.longest_round_ticks = self.longest_round_ticks.max(ticks);
    }

    /// Ticks per round spent scheduling (neither in a slice nor waiting).
    pub fn overhead_per_round(&self) -> u64 {
        (self.round_ticks.saturating_sub(self.slice_ticks).saturating_sub(self.join_ticks)) / self.rounds.max(1)
    }
}

/// What decides which picked slice the boot CPU keeps.
#[derive(Clone, Copy, Debug)]
pub struct HomeFit {
    /// The VM's NUMA node (`None`: not placed on one).
    pub node: Option<u32>,
    /// Its vCPU last ran on this CPU.
    pub last_here: bool,
}

/// The pick this CPU runs itself (NUMA placement, issue 11): a VM of this
/// CPU's node before one without a node, and that before a VM of another
/// node, which should go to a CPU of its own; among equals, one whose vCPU
/// last ran here (nothing to move), then the first. Without NUMA (no node
/// anywhere) that is "last ran here, else the first", as before.
pub fn choose_home(fits: &[HomeFit], my_node: Option<u32>) -> usize {
    let rank = |f: &HomeFit| {
        let node = match (f.node, my_node) {
            (Some(n), Some(m)) if n == m => 2,
            (None, _) | (_, None) => 1,
            _ => 0,
        };
        (node, f.last_here)
    };
    // The first of the best (`max_by_key` would give the last).
    let best = fits.iter().map(rank).max().unwrap_or((1, false));
    fits.iter().position(|f| rank(f) == best).unwrap_or(0)
}

impl<B: Backend> Manager<B> {
    /// The next runnable vCPU after the cursor, of a VM not in `taken`:
    /// VMs round-robin, and within a VM its vCPUs round-robin
    /// (`Vm::pick_vcpu`, which passes halted vCPUs over until an
    /// interrupt for them is pending).
    pub(super) fn pick(&mut self, now: u64, hz: u64, taken: &[(usize, usize)]) -> Option<(usize, usize)> {
        let n = self.vms.len();
        let found = (0..n)
            .map(|k| (self.cursor + k) % n)
            .filter(|i| !taken.iter().any(|(t, _)| t == i))
            .find_map(|i| Some((i, self.vms[i].pick_vcpu(now, hz)?)))?;
        self.cursor = (found.0 + 1) % n.max(1);
        Some(found)
    }

    /// With nothing runnable: until when the boot CPU may halt, the
    /// earliest timer of a VM (`u64::MAX` if none has one; the caller
    /// still wakes to poll the console and the NIC). `None` while work
    /// moves at every turn of the main loop: a live save, a lazy restore's
    /// fill, a migration.
    pub fn idle_until(&self) -> Option<u64> {
        if self.live_save.is_some() || !self.host_mem.lazy.is_empty() || self.migration.busy() {
            return None;
        }
        Some(self.home_timer(&[]))
    }

    /// Runs the next runnable vCPU for one time slice on this CPU. Returns
    /// false when nothing could run.
    pub fn run_slice(&mut self, console: &mut impl Console) -> bool {
        self.run_round(console, &mut NoOtherCpus)
    }

    /// Runs one time slice on this CPU and, at the same time, one on each
    /// free CPU of `cpus` for another runnable VM or a sibling vCPU of one
    /// (see the module's "Siblings"); then waits for them all and finishes
    /// every slice here. One vCPU (or one free CPU) is a plain slice here:
    /// a vCPU moves only when there is work for two CPUs. Returns false
    /// when nothing could run.
    pub fn run_round(&mut self, console: &mut impl Console, cpus: &mut impl SliceCpus<B>) -> bool {
        let Ok(backend) = self.backend.as_ref() else {
            return false;
        };
        let (now, hz) = (backend.now(), backend.tsc_hz());
        let mut picks: Vec<(usize, usize)> = Vec::new();
        let Some(first) = self.pick(now, hz, &picks) else {
            return false;
        };
        let round_start = now;
        picks.push(first);
        let free = cpus.free();
        while picks.len() <= free {
            let Some(p) = self.pick(now, hz, &picks) else { break };
            picks.push(p);
        }
        self.pick_siblings(&mut picks, free + 1);
        // Every CPU has a pick: further VMs for a CPU whose slice ends early.
        // (Every runnable VM when each pick may make a run queue with them:
        // the queue holds them all, however many per CPU.)
        let max_spares = match picks.iter().all(|&(i, _)| self.may_go_on(i, now)) && cpus.goes_on() {
            true => self.vms.len(),
            false => free + 1,
        };
        let spare_picks = if free > 0 && picks.len() == free + 1 {
            self.pick_spares(now, hz, &picks, max_spares)
        } else {
            Vec::new()
        };
        // More VMs than CPUs, each of one vCPU (some maybe asleep for their
        // timers): a round of the run queue.
        if free > 0
            && let Some(queue) = self.queue_jobs(cpus, &picks, &spare_picks, now)
        {
            return self.run_queue_round(console, cpus, queue, round_start);
        }
        // The slice that stays here: by NUMA node, then one whose vCPU
        // last ran here (still loaded here, nothing to move).
        let here = vcpu::cpu_local::get();
        let me = here.index;
        let my_node = self.numa.node_of_cpu(here.apic_id.load(Ordering::Relaxed));
        let fits: Vec<HomeFit> = picks
            .iter()
            .map(|&(i, v)| HomeFit {
                node: self.vms[i].node,
                last_here: self.vms[i].res.as_ref().and_then(|r| r.vcpus.get(v)).map(|s| s.stats.last_host_cpu)
                    == Some(me),
            })
            .collect();
        let home = choose_home(&fits, my_node);
        // Each gang VM's shared word, kept until every job is finished.
        let mut gangs: Vec<Box<Gang>> = Vec::new();
        // A round that goes on past the boot CPU's slice (`round_on`): every
        // runnable vCPU has a CPU, and nothing between rounds waits.
        let limit = round_start.saturating_add(self.slice_ticks.saturating_mul(round_on::MAX_ROUND_SLICES));
        let goes_on = cpus.goes_on()
            && picks.len() > 1
            && spare_picks.is_empty()
            && !self.vcpus_left_out(&picks)
            && !self.work_between_rounds()
            && !cpus.wanted();
        // Siblings go on until a VM no CPU holds has a timer due at the
        // latest (the boot CPU, in its own sibling, does not pick others).
        let gangs_until = goes_on.then(|| limit.min(self.home_timer(&picks)));
        let (mut siblings, standby_parts) = self.prepare_siblings(&picks, now, hz, &mut gangs, gangs_until);
        // When the slice that stays here is due to end (it may end sooner):
        // a VM away computes on until then.
        let (hi, hv) = picks[home];
        let home_end = match siblings.iter().find(|e| (e.vm, e.vcpu) == (hi, hv)).and_then(|e| e.part.as_ref()) {
            Some((_, slice)) => now.saturating_add(*slice),
            None => now.saturating_add(planned_slice(&self.vms[hi], now, hz, self.slice_ticks)),
        };
        let mut spares = (!spare_picks.is_empty()).then(|| self.prepare_spares(&spare_picks, now, me));
        let round_end: Option<Box<AtomicU64>> = goes_on.then(|| Box::new(AtomicU64::new(limit)));
        let round_end_ptr: *const AtomicU64 = round_end.as_deref().map_or(core::ptr::null(), |r| r);
        // One host-call slot per job that may run away: the picks, then
        // the spares.
        let n_spares = spares.as_ref().map_or(0, |sp| sp.jobs.len());
        let n_standby = standby_parts.len();
        // Only with a job that may run away (a lone VM stays here: no
        // allocation on its path).
        let calls: Option<Box<HostCalls<B>>> = (cpus.takes_calls() && picks.len() + n_spares > 1)
            .then(|| Box::new(HostCalls::new(picks.len() + n_spares + n_standby, me)));
        let calls_ptr: *const HostCalls<B> = calls.as_deref().map_or(core::ptr::null(), |c| c);
        let standbys: Option<Box<Standbys<B>>> = (n_standby > 0).then(|| {
            let mut keys = Vec::with_capacity(n_standby);
            let mut jobs = Vec::with_capacity(n_standby);
            for (k, SiblingPart { vm: i, vcpu: v, part }) in standby_parts.into_iter().enumerate() {
                let mut job = AwaySlice::new(i, v, self.slice_ticks, me, self.vms[i].node);
                job.sibling = part.map(|(s, _)| s);
                job.calls = calls_ptr;
                job.call_slot = picks.len() + n_spares + k;
                keys.push((i, v));
                jobs.push(UnsafeCell::new(job));
            }
            let ran = jobs.iter().map(|_| AtomicBool::new(false)).collect();
            Box::new(Standbys { keys, jobs, ran })
        });
        let standbys_ptr: *const Standbys<B> = standbys.as_deref().map_or(core::ptr::null(), |s| s);
        if let Some(sp) = spares.as_mut() {
            for (k, job) in sp.jobs.iter_mut().enumerate() {
                let job = job.get_mut();
                job.calls = calls_ptr;
                job.call_slot = picks.len() + k;
            }
        }
        let spares_ptr: *const Spares<B> = spares.as_deref().map_or(core::ptr::null(), |s| s);
        let mut away: Vec<AwaySlice<B>> = Vec::with_capacity(picks.len() - 1);
        let mut home_sibling: Option<AwaySlice<B>> = None;
        // Whether a job may go on (read here: once started, a job is its
        // CPU's until the join).
        let mut jobs_go_on = gangs.iter().any(|g| g.goes_on);
        for (k, &(i, v)) in picks.iter().enumerate() {
            let mut job = AwaySlice::new(i, v, self.slice_ticks, me, self.vms[i].node);
            job.away = k != home;
            job.until = Some(home_end);
            job.spares = spares_ptr;
            job.standbys = standbys_ptr;
            job.calls = calls_ptr;
            job.call_slot = k;
            // A sibling's VM is not touched again before the join (its
            // slot pointers must stay the last word on it).
            if let Some(entry) = siblings.iter_mut().find(|e| (e.vm, e.vcpu) == (i, v)) {
                // Released and given its interrupts by `prepare_siblings`;
                // each pick is there once, so each part is taken once.
                let Some((mut part, slice)) = entry.part.take() else { continue };
                // The boot CPU's own looks out for what wants it between
                // rounds before each further slice.
                if k == home && goes_on {
                    part.poll = Some(cpus.poll());
                }
                job.sibling = Some(part);
                job.slice_ticks = slice;
            } else if k == home {
                continue;
            } else {
                if !round_end_ptr.is_null() && self.may_go_on(i, now) {
                    job.round_end = round_end_ptr;
                    jobs_go_on = true;
                }
                let vm = &mut self.vms[i];
                let Some(res) = vm.res.as_mut() else { continue };
                // It may still be loaded here from an earlier slice.
                if let Some(slot) = res.vcpus.get_mut(v) {
                    slot.vcpu.release();
                }
                job.vm = &raw mut **vm;
            }
            if k == home {
                home_sibling = Some(job);
            } else {
                away.push(job);
            }
        }
        // Each job stays in place (the vector is not touched) until the join.
        let started: Vec<bool> = away.iter_mut().map(|job| cpus.start(job)).collect();
        let slices = 1 + started.iter().filter(|&&s| s).count() as u64;
        let (i, v) = picks[home];
        let (mut end, slice_ticks, t1) = {
            let Ok(backend) = self.backend.as_mut() else {
                cpus.join(&mut || {});
                return false;
            };
            let t0 = backend.now();
            self.sched.start_ticks += t0.saturating_sub(round_start);
            let calls = calls.as_deref();
            let end = match home_sibling.as_mut() {
                Some(job) => {
                    // SAFETY: this CPU runs the job once, now; its slot is
                    // no other job's, and the VM is nobody's until the join.
                    unsafe { job.run_home(backend, &mut self.host_mem) };
                    None
                }
                None => {
                    let end = run_body(
                        &mut self.vms[i],
                        v,
                        backend,
                        &mut self.host_mem,
                        console,
                        self.slice_ticks,
                        None,
                        calls,
                        None,
                    );
                    if let Some(spares) = spares.as_deref() {
                        // SAFETY: the spares stay in place until the join,
                        // and this CPU's own slice of the round is over.
                        unsafe { spares.run_here(backend, false, Some(&mut self.host_mem)) };
                    }
                    Some(end)
                }
            };
            let t1 = backend.now();
            (end, t1 - t0, t1)
        };
        let calls_ref = calls.as_deref();
        // The round goes on if a job may, and the boot CPU's own slice ended
        // with nothing for the other VMs: finished now, its VM is picked
        // again with the rest.
        let mut went_on = round_on::WentOn::default();
        if let Some(round_end) = round_end.as_deref() {
            let home_alone =
                home_sibling.is_none() && end.as_ref().is_some_and(|e| round_on::ends_alone(&self.vms[i], e));
            // Or its own sibling halted at its slice's end while the others
            // go on: it waits beside them, serving their host calls.
            let home_halted = home_sibling.as_ref().and_then(|j| j.sibling.as_ref()).is_some_and(|s| s.ended_halted);
            if jobs_go_on
                && home_alone
                && let Some(e) = end.take()
            {
                self.finish_slice(i, v, e.flow, console);
                let mut taken: Vec<(usize, usize)> = picks.iter().copied().filter(|&p| p != (i, v)).collect();
                went_on = self.go_on(cpus, round_end, limit, &mut taken, calls_ref, console);
            } else if jobs_go_on && home_halted {
                let mut taken = picks.clone();
                went_on = self.go_on(cpus, round_end, limit, &mut taken, calls_ref, console);
            } else {
                // The jobs end with the boot CPU's slice, as in a round that
                // does not go on; one that went on already (this CPU's
                // slice ran past that end) is kicked to hear it.
                round_end.store(home_end, Ordering::Release);
                if self.backend.as_ref().is_ok_and(|b| b.now() >= home_end) {
                    cpus.kick_running();
                }
            }
            // Siblings that went on end too.
            if let Ok(backend) = self.backend.as_ref() {
                for gang in &gangs {
                    gang.stop_going_on(me, backend);
                }
            }
        }
        let (slice_ticks, joined) = {
            let Ok(backend) = self.backend.as_mut() else {
                cpus.join(&mut || {});
                return false;
            };
            // The clock read once more only after a round that could go on.
            let t1 = if round_end.is_some() { backend.now() } else { t1 };
            // Waiting, it serves the host calls of the CPUs it waits for.
            let host_mem = &mut self.host_mem;
            cpus.join(&mut || {
                if let Some(c) = calls_ref {
                    host_mem.serve(c, backend);
                }
            });
            (slice_ticks + went_on.slice_ticks, backend.now() - t1 + went_on.doze_ticks)
        };
        if let Some(c) = calls.as_deref() {
            self.sched.host_calls_in_slice += u64::from(c.served_in_slice.load(Ordering::Relaxed));
        }
        // What the slices away printed first: it ran before the end of this
        // CPU's last slice, whose finishing may print (a VM's end); in a
        // round that went on, that is up to 8 slices later.
        if round_end.is_some() {
            let t = self.backend.as_ref().map_or(0, |b| b.now());
            for job in away.iter_mut() {
                for l in job.lines.0.drain(..) {
                    console.line(&l);
                }
            }
            self.sched.lines_ticks += self.backend.as_ref().map_or(0, |b| b.now()).saturating_sub(t);
        }
        if let Some(end) = end {
            self.finish_slice(i, v, end.flow, console);
        }
        if let Some((li, lv, flow)) = went_on.left {
            self.finish_slice(li, lv, flow, console);
        }
        for gang in &mut gangs {
            self.absorb_gang(gang, console);
        }
        let home_job = home_sibling.into_iter().map(|job| (job, true));
        let away_jobs = away.into_iter().zip(started);
        let spare_jobs = spares.map(|sp| self.spares_taken(*sp, &spare_picks)).unwrap_or_default();
        let spares_taken = spare_jobs.len() as u64;
        let standby_jobs = standbys.map(|st| st.taken()).unwrap_or_default();
        let standbys_taken = standby_jobs.len() as u64;
        let later_jobs = spare_jobs.into_iter().chain(standby_jobs).map(|job| (job, true));
        let (slices_on_away, slices_on_here) = self.finish_jobs(home_job.chain(away_jobs).chain(later_jobs), console);
        let slices_on_here = slices_on_here + went_on.slices;
        let now = self.backend.as_ref().map_or(round_start, |b| b.now());
        let s = &mut self.sched;
        s.round_ended(now.saturating_sub(round_start));
        s.slices += slices + spares_taken + standbys_taken + slices_on_here + slices_on_away;
        s.rounds_on += u64::from(slices_on_here + slices_on_away > 0);
        s.slices_on_here += slices_on_here;
        s.slices_on_away += slices_on_away;
        s.spare_slices += spares_taken;
        s.standby_slices += standbys_taken;
        s.slice_ticks += slice_ticks;
        s.join_ticks += joined;
        true
    }

    /// After the join: finishes each job a CPU ran (`true` beside it):
    /// prints its lines, handles the exit it left to the boot CPU, ends
    /// its slice. Returns the slices the jobs ran after their first, away
    /// and on the boot CPU.
    pub(super) fn finish_jobs(
        &mut self,
        jobs: impl IntoIterator<Item = (AwaySlice<B>, bool)>,
        console: &mut impl Console,
    ) -> (u64, u64) {
        // VMs of which a sibling ended its slice halted: idle, they may have
        // a line to show.
        let mut halted_vms: Vec<usize> = Vec::new();
        let clock = |m: &Self| m.backend.as_ref().map_or(0, |b| b.now());
        let (mut slices_on_away, mut slices_on_here) = (0, 0);
        for (job, started) in jobs {
            let went_away = job.away;
            let on = job.slices_on + job.sibling.as_ref().map_or(0, |s| s.slices_on);
            if went_away {
                slices_on_away += on;
            } else {
                slices_on_here += on;
            }
            self.sched.host_calls += job.host_calls;
            self.sched.host_call_ticks += job.call_ticks;
            let t = clock(self);
            for l in &job.lines.0 {
                console.line(l);
            }
            self.sched.lines_ticks += clock(self).saturating_sub(t);
            // A job no CPU took: its VM simply waits for its next turn.
            let Some(end) = job.end.filter(|_| started) else { continue };
            if let Some(s) = &job.sibling {
                self.count_sibling(job.index, s);
                if s.ended_halted && !halted_vms.contains(&job.index) {
                    halted_vms.push(job.index);
                }
            }
            let flow = match end.deferred {
                Some(exit) => {
                    let t = clock(self);
                    let flow = self.handle_deferred(job.index, job.vcpu, exit, console);
                    self.sched.deferred_ticks += clock(self).saturating_sub(t);
                    self.sched.deferred_exits += 1;
                    flow
                }
                None => end.flow,
            };
            self.finish_slice(job.index, job.vcpu, flow, console);
            self.sched.slices_away += u64::from(went_away);
        }
        for i in halted_vms {
            self.vms[i].show_partial_if_idle(console);
        }
        (slices_on_away, slices_on_here)
    }

    /// Up to `max` more runnable vCPUs, of VMs not in `picks`, as the
    /// round's spares; each with whether an IPI waited for it (picking it
    /// cleared that, and a spare no CPU takes gets it back).
    fn pick_spares(&mut self, now: u64, hz: u64, picks: &[(usize, usize)], max: usize) -> Vec<(usize, usize, bool)> {
        let waiting: Vec<u32> = self.vms.iter().map(|vm| vm.ipi_waiting).collect();
        let mut taken = picks.to_vec();
        let mut out = Vec::new();
        while out.len() < max {
            let Some((i, v)) = self.pick(now, hz, &taken) else { break };
            taken.push((i, v));
            out.push((i, v, waiting.get(i).is_some_and(|w| w & crate::devices::bit(v) != 0)));
        }
        out
    }

    /// The round's spare jobs (see [`Spares`]): each vCPU released here
    /// (it may still be loaded on this CPU), its VM not touched again
    /// before the join.
    pub(super) fn prepare_spares(&mut self, picks: &[(usize, usize, bool)], now: u64, me: u32) -> Box<Spares<B>> {
        let mut jobs = Vec::with_capacity(picks.len());
        let (mut last_cpu, mut nodes) = (Vec::new(), Vec::new());
        for &(i, v, _) in picks {
            let vm = &mut self.vms[i];
            let mut last = None;
            if let Some(slot) = vm.res.as_mut().and_then(|r| r.vcpus.get_mut(v)) {
                slot.vcpu.release();
                last = (slot.stats.host_cpus != 0).then_some(slot.stats.last_host_cpu);
            }
            last_cpu.push(last);
            nodes.push(vm.node);
            let mut job = AwaySlice::new(i, v, self.slice_ticks, me, vm.node);
            job.vm = &raw mut **vm;
            jobs.push(UnsafeCell::new(job));
        }
        let claimed = jobs.iter().map(|_| AtomicBool::new(false)).collect();
        let cpu_nodes = self.numa.nodes.iter().flat_map(|n| n.apic_ids.iter().map(move |&a| (a, n.id))).collect();
        Box::new(Spares {
            jobs,
            claimed,
            last_cpu,
            nodes,
            cpu_nodes,
            deadline: now.saturating_add(self.slice_ticks),
            min_ticks: (self.slice_ticks / 8).max(MIN_SLICE_TICKS),
            queue_end: core::ptr::null(),
            ran: (0..picks.len()).map(|_| AtomicBool::new(false)).collect(),
            freed_at: (0..picks.len() as u64).map(AtomicU64::new).collect(),
            turns: AtomicU64::new(picks.len() as u64),
            slice_ticks: self.slice_ticks,
            queue_slices: AtomicU64::new(0),
            not_before: picks.iter().map(|_| AtomicU64::new(0)).collect(),
            woken: AtomicU64::new(0),
            home_wanted: AtomicBool::new(false),
        })
    }

    /// After the join: the spare jobs a CPU took, to finish like any slice
    /// away. Those none took go first next: the cursor comes back to the
    /// first, and each gets back its place among its VM's vCPUs and the
    /// IPI that waited for it.
    pub(super) fn spares_taken(&mut self, spares: Spares<B>, picks: &[(usize, usize, bool)]) -> Vec<AwaySlice<B>> {
        let taken: Vec<bool> = (0..picks.len()).map(|k| spares.taken(k)).collect();
        let mut first_left = None;
        for (&(i, v, waiting), &took) in picks.iter().zip(&taken) {
            if took {
                continue;
            }
            first_left.get_or_insert(i);
            let vm = &mut self.vms[i];
            vm.next_vcpu = v;
            if waiting {
                vm.ipi_waiting |= crate::devices::bit(v);
            }
        }
        if let Some(i) = first_left {
            self.cursor = i;
        }
        spares.jobs.into_iter().zip(taken).filter(|(_, took)| *took).map(|(job, _)| job.into_inner()).collect()
    }

    /// Adds to `picks` (one per VM so far) further vCPUs of the VMs in it,
    /// up to `cpus` picks in all: a vCPU joins its sibling when both ran
    /// out their last slice or ended it halted (they compute, or wait for
    /// IPIs; `VcpuSlot::computing`). One that ended its slice at another
    /// exit would, beside a sibling, end it at its first exit that needs
    /// the VM and pay a round for it, so it runs alone with its VM.
    fn pick_siblings(&mut self, picks: &mut Vec<(usize, usize)>, cpus: usize) {
        for k in 0..picks.len() {
            let (i, v) = picks[k];
            let vm = &self.vms[i];
            let Some(res) = vm.res.as_ref() else { continue };
            // A throttled VM's share is per slice: it runs one at a time.
            if vm.throttle.pct() > 0 || !res.vcpus.get(v).is_some_and(|s| s.computing) {
                continue;
            }
            let n = res.vcpus.len();
            for u in (1..n).map(|d| (v + d) % n) {
                if picks.len() >= cpus {
                    return;
                }
                let s = &res.vcpus[u];
                if s.computing && s.state.runnable() && s.awaiting_page.is_none() {
                    picks.push((i, u));
                }
            }
        }
    }

    /// Readies the VMs of which `picks` holds several vCPUs: each such
    /// vCPU gets its pending interrupts here (the devices are the VM's,
    /// which a sibling does not reach) and is released to go anywhere.
    /// Returns each sibling's job part, with its slice: short enough for
    /// the VM's next timer interrupt. Taking the slot and profile pointers
    /// is the last this CPU does with such a VM before the join.
    // Boxed: the siblings hold pointers to their gang, which must not move
    // when the vector grows.
    #[allow(clippy::vec_box)]
    fn prepare_siblings(
        &mut self,
        picks: &[(usize, usize)],
        now: u64,
        hz: u64,
        gangs: &mut Vec<Box<Gang>>,
        goes_on_until: Option<u64>,
    ) -> (Vec<SiblingPart<B>>, Vec<SiblingPart<B>>) {
        let mut out = Vec::new();
        let mut standbys = Vec::new();
        for (k, &(i, _)) in picks.iter().enumerate() {
            // Each VM once, at its first pick, and only with several.
            if picks[..k].iter().any(|p| p.0 == i) || picks.iter().filter(|p| p.0 == i).count() < 2 {
                continue;
            }
            let vm = &mut self.vms[i];
            let mine: Vec<usize> = picks.iter().filter(|p| p.0 == i).map(|p| p.1).collect();
            vm.state = RunState::Running;
            vm.stats.first_entry_tsc.get_or_insert(now);
            for &v in &mine {
                let Some(res) = vm.res.as_mut() else { break };
                res.set_cur(v);
                vm.devices.set_current(v);
                vm.deliver_interrupts(now, hz);
                if let Some(slot) = vm.res.as_mut().and_then(|r| r.vcpus.get_mut(v)) {
                    slot.vcpu.release();
                }
            }
            // Halted with interrupts on and not in the round: standby, for
            // a sibling's IPI to wake on the sender's CPU (released, as
            // any CPU may run it).
            let mut standby = Vec::new();
            if let Some(r) = vm.res.as_mut().filter(|_| vm.throttle.pct() == 0) {
                for (u, slot) in r.vcpus.iter_mut().enumerate() {
                    let idle = slot.state == crate::vm::VcpuState::Halted
                        && !slot.halted_irq_off
                        && slot.awaiting_page.is_none();
                    if idle && !mine.contains(&u) {
                        slot.vcpu.release();
                        standby.push(u);
                    }
                }
            }
            vm.next_vcpu = next_after_gang(&mine, vm.res.as_ref().map_or(0, |r| r.vcpus.len()));
            // Each sibling keeps its own APIC's timer: the slice ends in
            // time for the others (the PIT, vCPUs not in the round).
            let mask = mine.iter().fold(0, |m, &v| m | crate::devices::bit(v));
            let now_ns = vm_ns(now, hz, vm.clock_offset_ns);
            let outside = vm.devices.next_timer_outside(now_ns, mask).map_or(u64::MAX, |ns| {
                let host_ns = (i128::from(ns) - i128::from(vm.clock_offset_ns)).clamp(0, i128::from(u64::MAX)) as u64;
                ns_to_ticks(host_ns, hz).saturating_sub(now)
            });
            let slice = self.slice_ticks.min(outside.max(MIN_SLICE_TICKS));
            let parts: Vec<(usize, bool)> =
                mine.iter().map(|&v| (v, false)).chain(standby.iter().map(|&u| (u, true))).collect();
            let apic_ids: Vec<u32> =
                parts.iter().map(|&(v, _)| vm.devices.lapic(v).map_or(v as u32, |l| l.id())).collect();
            // The PIC's INTR is vCPU 0's (`DeviceSet::acknowledge_interrupt`).
            let pic = vm.devices.pic_intr();
            let (vm_id, cpuid, offset_ns) = (vm.id, &raw const vm.cpuid, vm.clock_offset_ns);
            let tsc = vm.devices.guest_tsc_clock();
            let lapics = vm.devices.lapics_ptr();
            let mut gang = Box::new(Gang::new(i, &mine, vm.devices.routes().collect()));
            // A round that goes on: its siblings too, until the VM's next
            // timer outside their APICs at the latest (the boot CPU
            // delivers that one); not a throttled VM's, whose share is
            // counted per slice.
            if let Some(until) = goes_on_until.filter(|_| vm.throttle.pct() == 0) {
                let until = until.min(now.saturating_add(outside));
                if until > now.saturating_add(slice) {
                    gang.goes_on = true;
                    gang.on_until.store(until, Ordering::Relaxed);
                }
            }
            // The siblings reach the devices (not the APICs, whose
            // pointers were taken above) under the gang's lock.
            gang.devices.set = &raw mut vm.devices;
            gang.standby = standby.iter().fold(0, |m, &u| m | crate::devices::bit(u));
            let Some(res) = vm.res.as_mut() else { continue };
            let base = res.vcpus.as_mut_ptr();
            let mem: *mut GuestMemory<B::Format> = &raw mut res.mem;
            let gang_ptr: *const Gang = &*gang;
            gangs.push(gang);
            for (&(v, from_standby), apic_id) in parts.iter().zip(apic_ids) {
                // SAFETY: `v` indexes the slots (picked from them), and the
                // VM has an APIC per slot, so both pointers stay inside
                // their boxed slices; each sibling gets its own vCPU's, and
                // the VM is not touched until the join.
                let (slot, apic) =
                    unsafe { (base.add(v), SiblingApic::new(lapics.add(v), hz, offset_ns, tsc, v == 0 && pic)) };
                let s = Sibling {
                    gang: gang_ptr,
                    vcpu: v,
                    ran: false,
                    kicked: false,
                    slot,
                    apic,
                    mem,
                    seen_gen: 0,
                    host_calls: 0,
                    call_ticks: 0,
                    faults_in_place: 0,
                    swapped_in: 0,
                    cow_breaks: 0,
                    pio_here: 0,
                    line_moved: false,
                    lines_here: 0,
                    clock_offset_ns: offset_ns,
                    cpuid,
                    apic_id,
                    vm_id,
                    exits: [0; ExitKind::COUNT],
                    run_ticks: 0,
                    expired: false,
                    halts: 0,
                    woken: 0,
                    ended_halted: false,
                    ipi_away: false,
                    standby_next: None,
                    from_standby,
                    deadline: 0,
                    slices_on: 0,
                    poll: None,
                };
                let part = SiblingPart { vm: i, vcpu: v, part: Some((s, slice)) };
                if from_standby { standbys.push(part) } else { out.push(part) }
            }
        }
        (out, standbys)
    }

    /// After the join, what a VM's siblings left in their gang: interrupts
    /// posted to vCPUs that did not take them (not running, or posted
    /// after their last look) go into their APICs, the EOIs owed to the
    /// I/O APIC reach it, and what the devices cache about the APICs
    /// (timers, pending interrupts: what wakes a halted vCPU) is looked
    /// up again.
    fn absorb_gang(&mut self, gang: &mut Gang, console: &mut impl Console) {
        // What the siblings' port accesses printed, in the guest's order.
        for l in gang.devices.take_lines() {
            console.line(&l);
        }
        let Ok(backend) = self.backend.as_ref() else { return };
        let (now, hz) = (backend.now(), backend.tsc_hz());
        let vm = &mut self.vms[gang.vm];
        if gang.devices.line_moved.load(Ordering::Relaxed) {
            vm.devices.update_lines(vm_ns(now, hz, vm.clock_offset_ns));
        }
        for (v, posted) in gang.posted.iter().enumerate() {
            if let Some(lapic) = vm.devices.lapic_mut(v) {
                let waiting = posted.take(|vector| {
                    lapic.accept(vector, false);
                });
                if waiting {
                    vm.ipi_waiting |= crate::devices::bit(v);
                }
            }
        }
        gang.eois.take(|vector| vm.devices.eoi_broadcast(vector));
        vm.devices.lapics_changed(vm_ns(now, hz, vm.clock_offset_ns));
        vm.timers_changed(hz);
        // The round changed nested mappings: vCPUs not in it may have
        // cached the old ones on a CPU they come back to (AMD-V keeps an
        // ASID's translations on a CPU across VMRUNs).
        if gang.flush_gen.load(Ordering::Acquire) != 0
            && let Some(res) = vm.res.as_mut()
        {
            crate::vm::flush_all(&mut res.vcpus, mm::paging::FlushScope::All);
        }
        let shootdowns = gang.shootdowns.load(Ordering::Relaxed);
        vm.stats.shootdowns += shootdowns;
        self.sched.shootdowns += shootdowns;
        self.sched.shootdown_waits += gang.shootdown_waits.load(Ordering::Relaxed);
        self.sched.shootdown_ticks += gang.shootdown_ticks.load(Ordering::Relaxed);
        self.sched.shootdown_wait_ticks += gang.shootdown_wait_ticks.load(Ordering::Relaxed);
    }

    /// A sibling's counters, into its VM's (on this CPU, after the join).
    fn count_sibling(&mut self, i: usize, s: &Sibling<B>) {
        let vm = &mut self.vms[i];
        for (total, n) in vm.stats.exits.iter_mut().zip(s.exits) {
            *total += n;
        }
        vm.stats.run_ticks += s.run_ticks;
        vm.stats.slices_expired += u64::from(s.expired);
        vm.stats.parallel_slices += u64::from(s.ran);
        vm.stats.sibling_apic_accesses += s.apic.handled;
        vm.stats.posted_ipis += s.apic.posted;
        vm.stats.sibling_halts += s.halts;
        vm.stats.sibling_wakes += s.woken;
        vm.stats.sibling_ipi_ends += u64::from(s.ipi_away);
        vm.stats.standby_wakes += u64::from(s.from_standby && s.ran);
        vm.stats.sibling_pio += s.pio_here;
        vm.stats.sibling_line_ends += u64::from(s.line_moved);
        vm.stats.sibling_lines += s.lines_here;
        vm.stats.host_calls += s.host_calls;
        vm.stats.sibling_faults += s.host_calls + s.faults_in_place;
        vm.reclaim.swapped_in += s.swapped_in;
        vm.reclaim.cow_breaks += s.cow_breaks;
        self.sched.host_calls += s.host_calls;
        self.sched.host_call_ticks += s.call_ticks;
        self.sched.sibling_slices += u64::from(s.ran);
        self.sched.kicked_slices += u64::from(s.kicked);
    }

    /// An exit a slice away left for this CPU: handled here, where the
    /// host's memory is, with the vCPU loaded here for it.
    fn handle_deferred(&mut self, i: usize, v: usize, exit: VmExit, console: &mut impl Console) -> Flow {
        let Ok(backend) = self.backend.as_mut() else { return Flow::Stop };
        let vm = &mut self.vms[i];
        let Some(res) = vm.res.as_mut() else { return Flow::Stop };
        res.set_cur(v);
        vm.devices.set_current(v);
        res.vcpu().load();
        vcpu::cpu_local::get().current_vm.store(vm.id, Ordering::Relaxed);
        let flow = vm.handle_exit(exit, backend, &mut self.host_mem, console);
        vcpu::cpu_local::get().current_vm.store(0, Ordering::Relaxed);
        if let Some(res) = vm.res.as_mut() {
            res.vcpu().put();
        }
        // The slice is over either way: a `Continue` only means the VM
        // may run on.
        if flow == Flow::Continue { Flow::Yield } else { flow }
    }

    /// What follows a slice, on this CPU: the vCPU's state, frames the VM
    /// sent, and the VM's end, reset or memory pressure.
    pub(super) fn finish_slice(&mut self, i: usize, v: usize, flow: Flow, console: &mut impl Console) {
        let Ok(backend) = self.backend.as_mut() else { return };
        let vm = &mut self.vms[i];
        // Its vCPU leaves; a VM of several vCPUs that none can run again ends.
        let smp_ended = flow != Flow::Reset && vm.after_slice(v, backend, console);
        let flow = if smp_ended { Flow::Stop } else { flow };
        let (id, ended) = (vm.id, flow == Flow::Stop && vm.state.ended());
        // What the NIC sent in this slice goes out before anything else (a
        // guest's last frames before it powers off included).
        self.forward_frames(i);
        if ended {
            self.complete_live_save_of(id, console);
            let Ok(backend) = self.backend.as_mut() else { return };
            release(backend, &mut self.host_mem, &mut self.vms[i]);
            detach_port(&mut self.switches, id);
        }
        if flow == Flow::OutOfMemory {
            self.relieve_memory_pressure(id, console);
        }
        if flow == Flow::Reset {
            self.reboot_vm(i, console);
        }
    }
}

#[cfg(test)]
mod gang_tests {
    use super::{Gang, NO_CPU, NOT_YET};
    use crate::testing::MockBackend;
    use core::sync::atomic::Ordering;

    #[test]
    fn after_a_line_left_for_the_boot_cpu_siblings_leave_it_their_accesses_too_so_no_edge_is_lost() {
        use super::{GangOutbox, Line, sibling_pio};
        use crate::devices::{COM1_BASE, DeviceSet};
        use crate::testing::MockVcpu;
        use vcpu::IoAccess;
        let b = MockBackend::new(16);
        let mut set = DeviceSet::pc_smp(0, 16 << 20, 2);
        // The PIC unmasked (a rise of IRQ 4 raises vCPU 0's INTR: the
        // boot CPU's to carry), COM1's OUT2 on.
        crate::devices::init_pic_as_linux(&mut set, 0x00);
        set.pio_write(COM1_BASE + 4, 1, 0x08, || 0);
        set.update_lines(0);
        let mut gang = Gang::new(0, &[0, 1], set.routes().collect());
        gang.devices.set = &raw mut set;
        let out = GangOutbox::new(&gang);
        let mut v = MockVcpu::new(&Default::default());
        let io = |port: u16, write: bool| IoAccess { port, size: 1, write, string: false, rep: false };
        // vCPU 0 enables the transmitter-empty interrupt: IRQ 4 rises,
        // left to the boot CPU.
        v.gprs.rax = 0x02;
        assert_eq!(sibling_pio(&mut v, &gang, io(COM1_BASE + 1, true), &b, (1, 0), &out), Some(Line::Left));
        // vCPU 1's read of IIR would acknowledge it and lower the line
        // before the boot CPU saw it rise: left to the boot CPU, undone.
        assert_eq!(sibling_pio(&mut v, &gang, io(COM1_BASE + 2, false), &b, (1, 0), &out), None);
        // After the join: the rise first, then the read.
        drop(gang);
        set.update_lines(0);
        assert!(set.interrupt_pending_for(0), "the edge reached the PIC");
        assert_eq!(set.pio_read(COM1_BASE + 2, 1, || 0), crate::devices::PortEffect::Done(0x02));
    }

    #[test]
    fn a_shootdown_waits_for_a_sibling_in_the_guest_and_each_flushes_before_it_enters_again() {
        use core::sync::atomic::AtomicBool;
        let b = MockBackend::new(16);
        let gang = Gang::new(0, &[0, 1, 2], alloc::vec::Vec::new());
        assert!(!gang.join(0, 0) && !gang.join(1, 1) && !gang.join(2, 2));
        let (mut seen0, mut seen2) = (0, 0);
        assert!(!gang.entering(0, &mut seen0), "nothing changed yet: no flush");
        gang.left_guest(0);
        // vCPU 2 is in the guest (on another thread), vCPU 0 out of it.
        assert!(!gang.entering(2, &mut seen2));
        let left = AtomicBool::new(false);
        std::thread::scope(|t| {
            t.spawn(|| {
                std::thread::sleep(std::time::Duration::from_millis(50));
                left.store(true, Ordering::SeqCst);
                gang.left_guest(2);
            });
            gang.shoot_down(0, &b);
            assert!(left.load(Ordering::SeqCst), "returned only after vCPU 2 left the guest");
        });
        assert_eq!(gang.shootdown_waits.load(Ordering::Relaxed), 1);
        // Both flush before they enter again, once.
        assert!(gang.entering(0, &mut seen0) && gang.entering(2, &mut seen2));
        assert!(!gang.entering(2, &mut seen2));
        gang.left_guest(0);
        gang.left_guest(2);
        // Nobody in the guest with an old view: nothing to wait for.
        gang.shoot_down(0, &b);
        assert_eq!(gang.shootdowns.load(Ordering::Relaxed), 2);
        assert_eq!(gang.shootdown_waits.load(Ordering::Relaxed), 1);
        // vCPU 1, which had not entered yet, flushes at its first entry.
        let mut seen1 = 0;
        assert!(gang.entering(1, &mut seen1));
    }

    #[test]
    fn a_vcpu_left_out_of_a_gang_is_the_next_first_pick() {
        use super::next_after_gang;
        // 4 vCPUs, vCPU 1 left out between computing ones: it goes next.
        assert_eq!(next_after_gang(&[0, 2, 3], 4), 1);
        assert_eq!(next_after_gang(&[2, 3, 0], 4), 1);
        // Fewer CPUs than vCPUs, all computing: the rest in turn.
        assert_eq!(next_after_gang(&[0, 1], 3), 2);
        assert_eq!(next_after_gang(&[2, 0], 3), 1);
        assert_eq!(next_after_gang(&[1, 2], 3), 0);
        // Every vCPU in the round: after the first pick.
        assert_eq!(next_after_gang(&[3, 0, 1, 2], 4), 0);
        assert_eq!(next_after_gang(&[], 4), 0);
    }

    #[test]
    fn the_memory_lock_keeps_readers_out_while_the_boot_cpu_writes() {
        use core::sync::atomic::AtomicBool;
        let gang = Gang::new(0, &[0, 1], alloc::vec::Vec::new());
        let writing = AtomicBool::new(false);
        std::thread::scope(|t| {
            gang.writing_memory(|| {
                writing.store(true, Ordering::SeqCst);
                t.spawn(|| {
                    gang.reading_memory(|| assert!(!writing.load(Ordering::SeqCst), "read during a write"));
                });
                std::thread::sleep(std::time::Duration::from_millis(20));
                writing.store(false, Ordering::SeqCst);
            });
        });
        assert_eq!(gang.mem_lock.load(Ordering::SeqCst), 0);
        assert_eq!(gang.reading_memory(|| 7), 7);
    }

    #[test]
    fn the_last_sibling_to_halt_ends_the_round_unless_a_vector_waits_for_one_in_the_guest() {
        let b = MockBackend::new(16);
        let gang = Gang::new(0, &[0, 1], alloc::vec::Vec::new());
        assert!(!gang.join(0, 0) && !gang.join(1, 1));
        // vCPU 1 posts to vCPU 0 and halts; vCPU 0, halted before it saw
        // the vector, is not counted awake: still not the last, as vCPU 0
        // will wake for the vector.
        assert!(!gang.doze(0, &b), "vCPU 0 halts first: vCPU 1 is awake");
        gang.posted[0].post(0x40);
        assert!(!gang.doze(1, &b), "a vector waits for halted vCPU 0");
        assert!(!gang.over());
        // vCPU 0 wakes for it (counted before it takes it), then halts
        // again: now it is the last, with nothing waiting.
        gang.wake();
        assert!(gang.posted[0].take(|_| {}));
        assert!(gang.doze(0, &b), "nothing awake, nothing posted");
        assert!(gang.over());
        // A vector for a vCPU no longer in the guest does not hold a round.
        let gang = Gang::new(0, &[0, 1], alloc::vec::Vec::new());
        assert!(!gang.join(0, 0) && !gang.join(1, 1));
        gang.posted[1].post(0x41);
        gang.cpus[1].store(NO_CPU, Ordering::SeqCst);
        assert!(!gang.doze(1, &b));
        assert!(gang.doze(0, &b), "vCPU 1 left: its vector waits for the boot CPU");
    }

    #[test]
    fn a_post_is_away_only_for_a_vcpu_not_of_the_round_or_gone_from_it() {
        let b = MockBackend::new(16);
        // vCPUs 0 and 1 are the round's; 2 is not.
        let gang = Gang::new(0, &[0, 1], alloc::vec::Vec::new());
        assert_eq!(gang.cpus[1].load(Ordering::SeqCst), NOT_YET);
        assert!(!gang.join(0, 0));
        // vCPU 1 has not started: it takes the vector when it does.
        assert_eq!(gang.kick_posted(0b010, 0, &b), 0);
        assert_eq!(gang.kick_posted(0b100, 0, &b), 0b100, "vCPU 2 is not in the round");
        assert!(!gang.join(1, 1));
        assert_eq!(gang.kick_posted(0b110, 0, &b), 0b100, "vCPU 1 runs on CPU 1: kicked, not away");
        gang.leave(1, true, 1, &b);
        assert_eq!(gang.kick_posted(0b010, 0, &b), 0b010, "its slice is over");
    }
}

#[cfg(test)]
mod spares_tests {
    use super::{AwaySlice, Spares};
    use crate::testing::MockBackend;
    use alloc::vec::Vec;
    use core::cell::UnsafeCell;
    use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    /// Spares whose vCPUs last ran on `last` and whose VMs are on `nodes`
    /// (jobs that are never run: only the choice is tested).
    fn spares(last: &[Option<u32>], nodes: &[Option<u32>]) -> Spares<MockBackend> {
        let job = |i: usize| AwaySlice::<MockBackend>::new(i, 0, 0, 0, nodes[i]);
        Spares {
            jobs: (0..last.len()).map(|i| UnsafeCell::new(job(i))).collect(),
            claimed: last.iter().map(|_| AtomicBool::new(false)).collect(),
            last_cpu: last.to_vec(),
            nodes: nodes.to_vec(),
            cpu_nodes: Vec::new(),
            deadline: 0,
            min_ticks: 0,
            queue_end: core::ptr::null(),
            ran: last.iter().map(|_| AtomicBool::new(false)).collect(),
            freed_at: (0..last.len() as u64).map(AtomicU64::new).collect(),
            turns: AtomicU64::new(last.len() as u64),
            slice_ticks: 0,
            queue_slices: AtomicU64::new(0),
            not_before: last.iter().map(|_| AtomicU64::new(0)).collect(),
            woken: AtomicU64::new(0),
            home_wanted: AtomicBool::new(false),
        }
    }

    #[test]
    fn a_run_queue_gives_the_cpu_to_the_job_that_waited_longest_of_its_node_first() {
        let end = AtomicU64::new(u64::MAX);
        // Jobs 0 and 1 on node 0, job 2 on node 1, job 3 on none.
        let mut s = spares(&[Some(1), Some(1), Some(1), Some(1)], &[Some(0), Some(0), Some(1), None]);
        s.queue_end = &end;
        assert_eq!(s.claim(1, Some(1), 0), Some(2), "its node's first, though job 0 waited longer");
        assert_eq!(s.claim(1, Some(1), 0), Some(3), "then a job of no node: not the one it last ran");
        assert_eq!(s.claim(1, Some(1), 0), Some(0), "then another node's, longest waiting first");
        assert!(s.others_wait(0, 0), "job 1 waits");
        assert!(!s.others_wait(1, 0), "job 1 alone waits");
        // Job 2 given back now, job 0 later: job 2 goes first.
        s.freed_at[2].store(100, Ordering::Relaxed);
        s.claimed[2].store(false, Ordering::Release);
        s.freed_at[0].store(200, Ordering::Relaxed);
        s.claimed[0].store(false, Ordering::Release);
        assert_eq!(s.claim(5, None, 0), Some(1), "job 1 waited since the round's start");
        assert_eq!(s.claim(5, None, 0), Some(2));
        assert_eq!(s.claim(5, None, 0), Some(0));
        assert_eq!(s.claim(5, None, 0), None, "each runs on one CPU at a time");
        assert!((0..4).all(|k| s.taken(k)));
    }

    #[test]
    fn a_cpu_takes_the_spare_that_last_ran_there_then_one_of_its_node_then_the_first_left() {
        // Spare 0: no history, node 1. Spare 1: last on CPU 2, node 0.
        // Spare 2: last on CPU 1, node 0.
        let s = spares(&[None, Some(2), Some(1)], &[Some(1), Some(0), Some(0)]);
        assert_eq!(s.claim(1, Some(1), 0), Some(2), "CPU 1's own vCPU first, whatever its node");
        assert_eq!(s.claim(1, Some(0), 0), Some(1), "then one of CPU 1's node");
        assert_eq!(s.claim(3, Some(0), 0), Some(0), "then the first left");
        assert_eq!(s.claim(2, None, 0), None, "each spare is taken once");
        assert!((0..3).all(|k| s.taken(k)));
        // Without NUMA nodes: the first left.
        let s = spares(&[None, None], &[None, None]);
        assert_eq!(s.claim(0, None, 0), Some(0));
        assert_eq!(s.claim(1, None, 0), Some(1));
    }
}
