//! Exit handling, vendor-neutral. Everything the guest controls is hostile
//! here: port numbers, register values, MSR indices, addresses. A handler
//! either completes the guest's instruction, injects the fault real
//! hardware would raise, or ends this VM with a report; never the host.

use alloc::format;
use alloc::string::String;
use vcpu::state::bits::{CR4_MCE, CR4_OSXSAVE, RFLAGS_IF, RFLAGS_TF};
use vcpu::{Activity, Event, ExitKind, IoAccess, MemAccess, Reg, Vcpu, VmExit};

use mm::addr::GuestPhysAddr;
use mm::vm_memory::{AccessKind, FaultOutcome, PageState, StateCounts};

use super::interrupts::{deadline_ticks, device_tsc_offset, vm_ns};
use super::{Resources, RunState, Vm, mmio, regs};
use crate::backend::Backend;
use crate::devices::{self, PortEffect};
use crate::mca::vmce::VirtualMca;
use crate::memory::{GuestMemory, HostMemory};
use crate::{cpuid, emulator};
use crate::{hypercall, msr};
use mm::paging::EntryFormat;

/// Where operator-visible text goes (the console).
pub trait Console {
    fn line(&mut self, text: &str);
}

/// CPUID: the VM's answer (`profile`) with this vCPU's own fields (its
/// APIC ID `apic_id`, OSXSAVE from its CR4), and the instruction completed.
/// It touches only the vCPU, so a vCPU running beside its siblings handles
/// it where it runs (`manager::rounds`).
#[inline(always)]
pub fn cpuid_exit<B: Backend>(vcpu: &mut B::Vcpu, profile: &cpuid::Profile, backend: &B, apic_id: u32) {
    let g = vcpu.gprs();
    let (leaf, sub) = (g.rax as u32, g.rcx as u32);
    let r = Vm::<B>::cpuid_answer(profile, backend, leaf, sub);
    let r = if cpuid::describes_vcpu(leaf) {
        let osxsave = vcpu.reg(Reg::Cr4) & CR4_OSXSAVE != 0;
        cpuid::vcpu_fields(leaf, r, osxsave, apic_id)
    } else {
        r
    };
    let g = vcpu.gprs_mut();
    g.rax = r.eax as u64;
    g.rbx = r.ebx as u64;
    g.rcx = r.ecx as u64;
    g.rdx = r.edx as u64;
    vcpu.skip_instruction();
}

/// Nanoseconds for `ticks` of a `hz` clock (no overflow for any input).
pub fn ticks_to_ns(ticks: u64, hz: u64) -> u64 {
    (u128::from(ticks) * 1_000_000_000 / u128::from(hz.max(1))).min(u128::from(u64::MAX)) as u64
}

/// What the scheduler does after an exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// Re-enter the guest.
    Continue,
    /// Give the CPU to someone else; the VM stays runnable.
    Yield,
    /// The VM is no longer runnable (ended or halted for good).
    Stop,
    /// The host had no frame for the VM's access: reclaim (or stop the VM
    /// furthest over its share), then run it again to retry the access.
    OutOfMemory,
    /// The guest reset its machine: start the VM again from its image.
    Reset,
}

struct HcCtx<'a, F: EntryFormat> {
    id: u32,
    exits: &'a [u64; ExitKind::COUNT],
    mem: &'a GuestMemory<F>,
    page_ins: u64,
    event: core::cell::Cell<Option<Event>>,
}

impl<F: EntryFormat> HcCtx<'_, F> {
    fn pages(&self) -> StateCounts {
        self.mem.state_counts()
    }
}

impl<F: EntryFormat> hypercall::Context for HcCtx<'_, F> {
    fn vm_id(&self) -> u64 {
        self.id as u64
    }
    fn total_exits(&self) -> u64 {
        self.exits.iter().sum()
    }
    fn hlt_exits(&self) -> u64 {
        self.exits[ExitKind::Hlt as usize]
    }
    fn shared_pages(&self) -> u64 {
        self.pages().zero + self.pages().shared
    }
    fn swapped_pages(&self) -> u64 {
        self.pages().swapped
    }
    fn page_ins(&self) -> u64 {
        self.page_ins
    }
    fn ram_end(&self) -> u64 {
        self.mem.map().ram_ranges().last().map_or(0, |(gpa, size)| gpa.0 + size)
    }
    fn page_shared(&self, gpa: u64) -> bool {
        matches!(self.mem.page_state(GuestPhysAddr(gpa)), Some(PageState::Zero | PageState::Shared))
    }
    fn queue_event(&self, event: Event) {
        self.event.set(Some(event));
    }
}

/// The host's shared memory as an exit handler reaches it: all of it on
/// the boot CPU (`&mut HostMemory`), none on another CPU ([`NoHost`]).
pub trait HostAccess {
    fn memory(&mut self) -> Option<&mut HostMemory>;
}

impl HostAccess for &mut HostMemory {
    #[inline(always)]
    fn memory(&mut self) -> Option<&mut HostMemory> {
        Some(self)
    }
}

/// No host memory: a CPU other than the boot CPU.
pub struct NoHost;

impl HostAccess for NoHost {
    #[inline(always)]
    fn memory(&mut self) -> Option<&mut HostMemory> {
        None
    }
}

/// The memory manager's kind of a faulting access.
pub fn access_kind(access: MemAccess) -> AccessKind {
    match access {
        MemAccess::Read => AccessKind::Read,
        MemAccess::Write => AccessKind::Write,
        MemAccess::Execute => AccessKind::Execute,
    }
}

/// What fixing a fault took, for the counters: a page brought back from
/// swap, or a copy-on-write break of a zero or shared page.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultTook {
    pub swap_in: bool,
    pub cow_break: bool,
}

impl FaultTook {
    /// Of a fault of `kind` fixed on a page that was in state `before`.
    pub fn of(before: Option<PageState>, kind: AccessKind) -> Self {
        FaultTook {
            swap_in: before == Some(PageState::Swapped),
            cow_break: kind == AccessKind::Write && matches!(before, Some(PageState::Zero | PageState::Shared)),
        }
    }
}

impl<B: Backend> Vm<B> {
    /// Handles one exit of this (live) VM.
    #[inline(always)]
    pub fn handle_exit(
        &mut self,
        exit: VmExit,
        backend: &mut B,
        host: &mut HostMemory,
        console: &mut impl Console,
    ) -> Flow {
        self.handle_exit_with(exit, backend, host, console)
    }

    /// Whether handling `exit` needs the host's shared state (host memory:
    /// sharing, swap, frames; the disks and switches behind MMIO devices),
    /// which only the boot CPU touches. The rest touches this VM alone.
    pub fn exit_needs_host(exit: &VmExit) -> bool {
        matches!(exit, VmExit::NestedPageFault { .. } | VmExit::Io(IoAccess { string: true, .. }))
    }

    /// Handles one exit with whatever of the host's memory `host` reaches:
    /// all of it on the boot CPU, none ([`NoHost`]) on a CPU that holds
    /// the VM alone for a slice (`manager::rounds`), which hands the exits
    /// [`Vm::exit_needs_host`] names to the boot CPU instead.
    pub fn handle_exit_with<H: HostAccess>(
        &mut self,
        exit: VmExit,
        backend: &mut B,
        mut host: H,
        console: &mut impl Console,
    ) -> Flow {
        let Some(res) = self.res.as_mut() else {
            return Flow::Stop;
        };
        let vcpu = res.vcpu();
        match exit {
            VmExit::Cpuid => {
                cpuid_exit(vcpu, &self.cpuid, backend, self.devices.apic_id());
                Flow::Continue
            }
            VmExit::Io(io) if io.string => match host.memory() {
                Some(host) => self.string_io(io, backend, host, console),
                // Not given to a handler without the host (see above).
                None => Flow::Yield,
            },
            VmExit::Io(io) => self.handle_io(io, backend, console),
            VmExit::Hlt => self.hlt(backend, console),
            VmExit::InvalidOpcode => {
                // The other vendor's hypercall instruction (a guest saved
                // under it and restored here) is the hypercall too, as KVM
                // does it; any other #UD goes back to the guest.
                let rip = vcpu.rip();
                let code = self.read_virt(backend, rip, 3);
                let Some(res) = self.res.as_mut() else { return Flow::Stop };
                let vcpu = res.vcpu();
                if code == HYPERCALL_VMCALL || code == HYPERCALL_VMMCALL {
                    return self.hypercall(Some(rip.wrapping_add(3)));
                }
                vcpu.inject(Event::UD);
                Flow::Continue
            }
            VmExit::Hypercall => self.hypercall(None),
            VmExit::Rdmsr { msr: index } => {
                let now_ns = vm_ns(backend.now(), backend.tsc_hz(), self.clock_offset_ns);
                let value = match self.devices.lapic_read_msr(index, now_ns) {
                    Some(r) => r.ok(),
                    None if VirtualMca::handles_msr(index) => Some(self.devices.mca().read_msr(index)),
                    None => msr::read(index, &self.msrs),
                };
                complete_rdmsr(vcpu, value);
                Flow::Continue
            }
            VmExit::Wrmsr { msr: msr::IA32_TSC, value } => {
                // Writing the TSC moves the guest's clock: the offset the
                // hardware adds becomes value minus the host's TSC now.
                let offset = value.wrapping_sub(backend.now());
                vcpu.set_reg(Reg::TscOffset, offset);
                let hz = backend.tsc_hz();
                self.devices.set_tsc_offset(device_tsc_offset(offset, hz, self.clock_offset_ns));
                vcpu.skip_instruction();
                self.timer_tick = deadline_ticks(&self.devices, hz, self.clock_offset_ns);
                Flow::Continue
            }
            VmExit::Wrmsr { msr: index, value } => {
                let now_ns = vm_ns(backend.now(), backend.tsc_hz(), self.clock_offset_ns);
                let done = match self.devices.lapic_write_msr(index, value, now_ns) {
                    Some(r) => {
                        self.timer_tick = deadline_ticks(&self.devices, backend.tsc_hz(), self.clock_offset_ns);
                        r.is_ok()
                    }
                    None if VirtualMca::handles_msr(index) => self.devices.mca().write_msr(index, value).is_ok(),
                    None => msr::write(index, value, &mut self.msrs),
                };
                complete_wrmsr(vcpu, done);
                Flow::Continue
            }
            VmExit::NestedPageFault { gpa, access, gva } => match host.memory() {
                Some(host) => self.nested_page_fault(gpa, access, gva, backend, host, console),
                None => Flow::Yield,
            },
            VmExit::ExternalInterrupt { .. } | VmExit::Handled(_) => Flow::Continue,
            VmExit::Preempted => Flow::Yield,
            VmExit::Shutdown { report } | VmExit::EntryFailed { report } | VmExit::Unexpected { report } => {
                let reason = self.with_code_bytes(report, backend);
                self.end(RunState::Stopped { reason }, backend, console);
                Flow::Stop
            }
            other => self.handle_vcpu_exit(other, backend, console),
        }
    }

    /// HLT: the vCPU halts until an interrupt for it (`smp::pick_vcpu`).
    /// Out of line: the hot handler's frame stays small.
    #[inline(never)]
    fn hlt(&mut self, backend: &mut B, console: &mut impl Console) -> Flow {
        let Some(res) = self.res.as_mut() else {
            return Flow::Stop;
        };
        let vcpu = res.vcpu();
        vcpu.skip_instruction();
        let (irq_on, rip) = (vcpu.rflags() & RFLAGS_IF != 0, vcpu.rip());
        let smp = res.vcpus.len() > 1;
        if !irq_on && !smp {
            self.end(RunState::Halted { rip }, backend, console);
            return Flow::Stop;
        }
        // With several vCPUs the VM's state is the summary of theirs
        // (`smp::after_slice`): another may still run, or wake this one
        // (only with an NMI or INIT if its interrupts are off).
        let slot = res.vcpus.current_mut();
        slot.state.apply(super::VcpuEvent::Hlt);
        slot.halted_irq_off = !irq_on;
        if !smp {
            self.state = RunState::Waiting;
        }
        self.show_partial_if_idle(console);
        Flow::Yield
    }

    /// An idle guest has said all it will for now: shows a line it left
    /// open (a shell prompt waits for input). Idle: no vCPU left to run;
    /// another vCPU may be in the middle of a line (an AP halting while the
    /// BSP prints cut its lines in two).
    pub(crate) fn show_partial_if_idle(&mut self, console: &mut impl Console) {
        let Some(res) = self.res.as_ref() else { return };
        let idle = !res.vcpus.iter().any(|s| matches!(s.state, super::VcpuState::Runnable | super::VcpuState::Running));
        if idle && let Some(partial) = self.devices.com1().take_partial() {
            console.line(&format!("[vm {}] {partial}", self.id));
        }
    }

    /// The exits of the vCPU model: windows, register instructions, cache
    /// flushes, MONITOR/MWAIT, PAUSE, INIT/SIPI. Apart from the hot path
    /// (CPUID, port I/O, hypercalls), which stays small for it.
    #[cold]
    #[inline(never)]
    fn handle_vcpu_exit(&mut self, exit: VmExit, backend: &mut B, console: &mut impl Console) -> Flow {
        let Some(res) = self.res.as_mut() else {
            return Flow::Stop;
        };
        let vcpu = res.vcpu();
        match exit {
            // The backend delivers queued events when the window opens; a
            // device model with an interrupt for this vCPU injects it here.
            VmExit::InterruptWindow | VmExit::NmiWindow => Flow::Continue,
            VmExit::CrAccess { cr, access } => {
                // What the guest's CPUID shows and, for a pinned table
                // (checked against this host at restore), the host too.
                let allowed = cpuid::cr4_allowed(|l, s| Self::cpuid_answer(&self.cpuid, backend, l, s))
                    & cpuid::cr4_allowed(|l, s| cpuid::guest_cpuid(l, s, backend.host_cpuid(l, s), backend.quirks()));
                let r = regs::cr_access(vcpu, cr, access, allowed);
                if cr == 8 && matches!(access, vcpu::CrAccess::MovTo { .. }) && r.is_ok() {
                    // CR8 is the local APIC's TPR[7:4] (SDM Vol. 3A 11.8.6.1).
                    self.devices.set_cr8(vcpu.reg(Reg::Cr8));
                }
                complete(vcpu, r)
            }
            VmExit::DrAccess { dr, gpr, write } => {
                let r = regs::dr_access(vcpu, dr, gpr, write);
                complete(vcpu, r)
            }
            VmExit::Xsetbv => {
                // XCR0 bits the guest's CPUID offers (a pinned table's
                // within this host's: checked at restore) and the host has.
                let mask = |l: cpuid::Regs| ((l.edx as u64) << 32) | l.eax as u64;
                let host_mask =
                    mask(backend.host_cpuid(0xd, 0)) & mask(Self::cpuid_answer(&self.cpuid, backend, 0xd, 0));
                let r = regs::xsetbv(vcpu, host_mask);
                complete(vcpu, r)
            }
            VmExit::CacheFlush { .. } => {
                // WBINVD: guest memory is ordinary write-back host memory,
                // coherent with every device that reaches it, so there is
                // nothing to write back for the guest. INVD is done the same
                // way: really discarding dirty lines would lose the host's
                // and other VMs' data (SDM Vol. 2A INVD warns of exactly that).
                let r = if vcpu.cpl() == 0 { Ok(()) } else { Err(Event::GP0) };
                complete(vcpu, r)
            }
            // MONITOR/MWAIT: CPUID says the guest has neither, and a CPU
            // without them raises #UD (SDM Vol. 2B MONITOR, MWAIT).
            VmExit::MonitorMwait => {
                vcpu.inject(Event::UD);
                Flow::Continue
            }
            // Not intercepted by either backend (one vCPU per VM: a spin
            // loop waits for nothing another vCPU of the VM could do). If a
            // backend ever exits on it, give the CPU to another VM.
            VmExit::Pause => {
                vcpu.skip_instruction();
                Flow::Yield
            }
            VmExit::Init => {
                // INIT restarts the bootstrap processor at the reset vector
                // (SDM Vol. 3A 11.4.3); only application processors wait for
                // a SIPI. A VM's one vCPU is its BSP, and there is no
                // firmware at 0xFFFF0 to restart: the VM ends.
                let reason =
                    String::from("INIT signal: the VM would restart at its reset vector, where it has no firmware");
                self.end(RunState::Stopped { reason }, backend, console);
                Flow::Stop
            }
            VmExit::Sipi { vector } => {
                // A SIPI starts a vCPU that waits for one, and is ignored
                // otherwise (SDM Vol. 3A 11.4.4.1).
                let mut s = vcpu.state();
                if s.activity == Activity::WaitForSipi {
                    s.start_at_sipi(vector);
                    if let Err(e) = vcpu.set_state(&s) {
                        let reason = format!("SIPI: the vCPU cannot start: {e}");
                        self.end(RunState::Stopped { reason }, backend, console);
                        return Flow::Stop;
                    }
                }
                Flow::Continue
            }
            // Handled by `handle_exit`.
            _ => Flow::Continue,
        }
    }
}

/// VMCALL (Intel) and VMMCALL (AMD): SDM Vol. 2C VMCALL, APM Vol. 3 VMMCALL.
const HYPERCALL_VMCALL: [u8; 3] = [0x0f, 0x01, 0xc1];
const HYPERCALL_VMMCALL: [u8; 3] = [0x0f, 0x01, 0xd9];

/// The bits of RAX an `in` or `out` of `size` bytes (1, 2 or 4) uses.
#[inline(always)]
pub(crate) fn io_mask(size: u8) -> u64 {
    match size {
        1 => 0xff,
        2 => 0xffff,
        _ => 0xffff_ffff,
    }
}

/// An `in` of `size` bytes read `value`: into RAX (a 32-bit IN
/// zero-extends into RAX; 8- and 16-bit ones merge, SDM Vol. 2A "IN").
#[inline(always)]
pub(crate) fn complete_in(vcpu: &mut impl Vcpu, size: u8, value: u32) {
    let mask = io_mask(size);
    let g = vcpu.gprs_mut();
    g.rax = if size == 4 { u64::from(value) } else { (g.rax & !mask) | (u64::from(value) & mask) };
}

/// After the emulator carried out (all or, for a REP string instruction
/// stopped between iterations, part of) an instruction: RIP past it or
/// still on it, RFLAGS as it left them, and, when it completed with TF
/// set, the single-step trap (SDM Vol. 3A 18.3.1.4: DR6.BS).
pub(crate) fn finish_emulated(vcpu: &mut impl Vcpu, completed: bool, before: &vcpu::GuestState, rip: u64, rflags: u64) {
    vcpu.complete_emulated(if completed { rip } else { before.rip }, rflags);
    if completed && before.rflags & RFLAGS_TF != 0 {
        let dr6 = vcpu.reg(Reg::Dr6);
        vcpu.set_reg(Reg::Dr6, dr6 | (1 << 14));
        vcpu.inject(Event::DB);
    }
}

/// Completes a RDMSR: the value in EDX:EAX and RIP past it, or #GP for an
/// MSR that has none (SDM Vol. 2B, RDMSR).
pub(crate) fn complete_rdmsr(vcpu: &mut impl Vcpu, value: Option<u64>) {
    match value {
        Some(v) => {
            let g = vcpu.gprs_mut();
            g.rax = v & 0xffff_ffff;
            g.rdx = v >> 32;
            vcpu.skip_instruction();
        }
        None => vcpu.inject(Event::GP0),
    }
}

/// Completes a WRMSR: RIP past it, or #GP for a write refused.
pub(crate) fn complete_wrmsr(vcpu: &mut impl Vcpu, done: bool) {
    if done {
        vcpu.skip_instruction();
    } else {
        vcpu.inject(Event::GP0);
    }
}

/// The exception an emulated instruction raised, as hardware would; a #PF
/// also sets CR2 (only in the whole state: a rare path).
fn raise_emulated_fault(vcpu: &mut impl Vcpu, e: &emulator::Error, event: Event) {
    if let emulator::Error::PageFault { gva, .. } = *e {
        let mut s = vcpu.state();
        s.cr2 = gva;
        let _ = vcpu.set_state(&s);
    }
    vcpu.inject(event);
}

/// Completes an emulated instruction: past it, or the fault it raised.
fn complete(vcpu: &mut impl Vcpu, r: Result<(), Event>) -> Flow {
    match r {
        Ok(()) => vcpu.skip_instruction(),
        Err(ev) => vcpu.inject(ev),
    }
    Flow::Continue
}

impl<B: Backend> Vm<B> {
    /// VMCALL/VMMCALL (ring 0 only: #UD elsewhere, as hardware without a
    /// hypervisor). `next`: RIP after it, when it was emulated from a #UD
    /// (the other vendor's instruction); else the backend skips it.
    // Inline: the exit path's (see `handle_io`).
    #[inline(always)]
    fn hypercall(&mut self, next: Option<u64>) -> Flow {
        let Some(res) = self.res.as_mut() else { return Flow::Stop };
        let (mem, vcpu) = res.split();
        if vcpu.cpl() != 0 {
            vcpu.inject(Event::UD);
            return Flow::Continue;
        }
        let g = vcpu.gprs();
        let ctx = HcCtx {
            id: self.id,
            exits: &self.stats.exits,
            mem: &*mem,
            page_ins: self.reclaim.swapped_in,
            event: core::cell::Cell::new(None),
        };
        let r = hypercall::dispatch(g.rax, g.rdi, g.rsi, &ctx);
        let g = vcpu.gprs_mut();
        g.rax = r.rax;
        if let Some((rdi, rsi)) = r.args {
            (g.rdi, g.rsi) = (rdi, rsi);
        }
        match next {
            Some(rip) => {
                let rflags = vcpu.rflags();
                vcpu.complete_emulated(rip, rflags);
            }
            None => vcpu.skip_instruction(),
        }
        if let Some(ev) = ctx.event.get() {
            vcpu.inject(ev);
        }
        Flow::Continue
    }

    // Inline: with a second caller (`handle_exit_with` without the host, for
    // other CPUs) the compiler no longer inlined it, and port I/O exits
    // took 40 ticks more in Bochs.
    #[inline(always)]
    fn handle_io(&mut self, io: IoAccess, backend: &mut B, console: &mut impl Console) -> Flow {
        let Some(res) = self.res.as_mut() else {
            return Flow::Stop;
        };
        let vcpu = res.vcpu();
        if !matches!(io.size, 1 | 2 | 4) {
            // Not a width the CPU reports: a backend decoding error.
            vcpu.inject(Event::GP0);
            self.stats.unbacked_io += 1;
            return Flow::Continue;
        }
        // `io_mask` and (below) `complete_in`, written out: through the
        // helpers the exit path took 4-10 more Bochs ticks (2026-12-04).
        let mask: u64 = match io.size {
            1 => 0xff,
            2 => 0xffff,
            _ => 0xffff_ffff,
        };
        let value = (vcpu.gprs().rax & mask) as u32;
        // The VM's clock, for the devices that keep time (the RTC).
        let offset_ns = self.clock_offset_ns;
        let now_ns = || vm_ns(backend.now(), backend.tsc_hz(), offset_ns);
        let effect = if io.write {
            self.devices.pio_write(io.port, io.size, value, now_ns)
        } else {
            self.devices.pio_read(io.port, io.size, now_ns)
        };
        // The port access may have changed an interrupt line or a timer.
        if !matches!(effect, PortEffect::Unbacked) && self.devices.lines_may_have_changed() {
            let before = self.devices.next_timer();
            let now = if self.devices.timers_touched() { now_ns() } else { 0 };
            self.devices.update_lines(now);
            if self.devices.next_timer() != before {
                self.timer_tick = deadline_ticks(&self.devices, backend.tsc_hz(), offset_ns);
            }
        }
        let read = match effect {
            PortEffect::Exit(status) => {
                vcpu.skip_instruction();
                self.end(RunState::Exited { status }, backend, console);
                return Flow::Stop;
            }
            PortEffect::PowerOff => {
                vcpu.skip_instruction();
                self.end(RunState::PoweredOff, backend, console);
                return Flow::Stop;
            }
            PortEffect::Reset => {
                console.line(&format!("vm {} ({}) reset by the guest", self.id, self.guest));
                return Flow::Reset;
            }
            PortEffect::Done(v) => {
                if io.write && self.devices.com1_has_output() {
                    for l in self.devices.com1().take_lines() {
                        console.line(&format!("[vm {}] {l}", self.id));
                    }
                }
                (!io.write).then_some(v)
            }
            PortEffect::Unbacked => {
                self.stats.unbacked_io += 1;
                (!io.write).then(|| devices::unbacked_read(io.size))
            }
        };
        if let Some(v) = read {
            let g = vcpu.gprs_mut();
            g.rax = if io.size == 4 { v as u64 } else { (g.rax & !mask) | (v as u64 & mask) };
        }
        vcpu.skip_instruction();
        Flow::Continue
    }

    /// INS/OUTS: the exit names the port but not the memory operand, so
    /// the instruction is decoded and carried out by `emulator` (RIP past
    /// it, or left on it between iterations of a long REP); a fault it
    /// raises goes to the guest, and one it cannot carry out ends the VM
    /// with a report.
    #[inline(never)]
    fn string_io(&mut self, io: IoAccess, backend: &mut B, host: &mut HostMemory, console: &mut impl Console) -> Flow {
        let Some(Resources { mem, vcpus }) = self.res.as_mut() else {
            return Flow::Stop;
        };
        let cur = vcpus.cur();
        let state = vcpus[cur].vcpu.state();
        let hz = backend.tsc_hz();
        let now_ns = vm_ns(backend.now(), hz, self.clock_offset_ns);
        let exit = emulator::PortExit { port: io.port, size: io.size, write: io.write };
        let devices = &mut self.devices;
        let (result, rip, rflags, unbacked, effect, in_transit) = host.with_hooks(self.id, |hooks| {
            let mut p = mmio::VmPlatform {
                vcpus: &mut *vcpus,
                cur,
                state: &state,
                rip: state.rip,
                rflags: state.rflags,
                mem,
                alloc: backend.mem(),
                hooks,
                devices,
                now_ns,
                accesses: 0,
                unbacked_ports: 0,
                port_effect: None,
                in_transit: None,
                device_waits: None,
            };
            let r = emulator::string_io(&mut p, &exit);
            (r, p.rip, p.rflags, p.unbacked_ports, p.port_effect, p.in_transit)
        });
        self.stats.unbacked_io += u64::from(unbacked);
        if let (Err(_), Some(gfn)) = (&result, in_transit) {
            vcpus[cur].awaiting_page = Some(gfn);
            return Flow::Yield;
        }
        let reason = match result {
            Ok(done) => {
                finish_emulated(&mut vcpus[cur].vcpu, done.completed, &state, rip, rflags);
                if io.write && self.devices.com1_has_output() {
                    for l in self.devices.com1().take_lines() {
                        console.line(&format!("[vm {}] {l}", self.id));
                    }
                }
                match effect {
                    Some(PortEffect::Exit(status)) => {
                        self.end(RunState::Exited { status }, backend, console);
                        return Flow::Stop;
                    }
                    Some(PortEffect::PowerOff) => {
                        self.end(RunState::PoweredOff, backend, console);
                        return Flow::Stop;
                    }
                    Some(PortEffect::Reset) => {
                        console.line(&format!("vm {} ({}) reset by the guest", self.id, self.guest));
                        return Flow::Reset;
                    }
                    _ => {}
                }
                self.devices.update_lines(vm_ns(backend.now(), hz, self.clock_offset_ns));
                self.timers_changed(hz);
                return Flow::Continue;
            }
            Err(e) => match e.fault() {
                Some(event) => {
                    raise_emulated_fault(&mut vcpus[cur].vcpu, &e, event);
                    return Flow::Continue;
                }
                None => format!(
                    "{} of port {:#x} ({} bytes) could not be carried out: {e}",
                    if io.write { "OUTS" } else { "INS" },
                    io.port,
                    io.size
                ),
            },
        };
        let reason = self.with_code_bytes(format!("{reason} at rip {:#x}", state.rip), backend);
        self.end(RunState::Stopped { reason }, backend, console);
        Flow::Stop
    }

    /// A nested page fault: copy-on-write, page-in and the like are resolved
    /// by the memory manager and the guest retries; anything else ends the
    /// VM with a report.
    // Out of line: its frame (and the MMIO emulator's, with a whole
    // `GuestState`) must not grow the hot exit path's.
    #[inline(never)]
    fn nested_page_fault(
        &mut self,
        gpa: u64,
        access: MemAccess,
        gva: Option<u64>,
        backend: &mut B,
        host: &mut HostMemory,
        console: &mut impl Console,
    ) -> Flow {
        let Some(Resources { mem, vcpus, .. }) = self.res.as_mut() else {
            return Flow::Stop;
        };
        let kind = access_kind(access);
        let before = mem.page_state(GuestPhysAddr(gpa));
        // The faulting vCPU: a dirty log traced per vCPU logs only its own.
        let cur = vcpus.cur();
        let outcome =
            host.with_hooks(self.id, |hooks| mem.handle_fault(backend.mem(), hooks, cur, GuestPhysAddr(gpa), kind));
        let reason = match outcome {
            FaultOutcome::Resolved(inv) => {
                inv.flush(backend.mem(), |scope| super::flush_all(vcpus, scope));
                let took = FaultTook::of(before, kind);
                self.reclaim.swapped_in += u64::from(took.swap_in);
                self.reclaim.cow_breaks += u64::from(took.cow_break);
                host.stats.swapped_in += u64::from(took.swap_in);
                host.stats.cow_breaks += u64::from(took.cow_break);
                return Flow::Continue;
            }
            FaultOutcome::OutsideMemory | FaultOutcome::Mmio { .. } if self.devices.claims_mmio(gpa) => {
                return self.emulate_mmio(gpa, access, gva, backend, host, console);
            }
            FaultOutcome::OutsideMemory | FaultOutcome::Mmio { .. } => self.fault_report(gpa, access, gva, backend),
            // A write to the firmware ROM: a PC drops it. The instruction
            // is carried out with its ROM bytes left as they were.
            FaultOutcome::ReadOnly => return self.emulate_mmio(gpa, access, gva, backend, host, console),
            // The page's contents were lost to an uncorrectable memory
            // error: the guest gets the machine check hardware would give
            // (RIP still at the access), or is stopped if it cannot take
            // one.
            FaultOutcome::Poisoned => {
                let vcpu = &mut vcpus.current_mut().vcpu;
                let cr4_mce = vcpu.reg(Reg::Cr4) & CR4_MCE != 0;
                match self.devices.mca().consume(gpa, access == MemAccess::Execute, cr4_mce) {
                    Ok(()) => {
                        vcpu.inject(Event::MC);
                        self.stats.machine_checks += 1;
                        // A guest that keeps touching it cannot flood the
                        // console: the first few are told, all are counted.
                        if self.stats.machine_checks <= 8 {
                            console.line(&format!(
                                "vm {}: machine check delivered: guest-physical {gpa:#x} is poisoned ({} at rip {:#x})",
                                self.id,
                                access.as_str(),
                                vcpu.rip()
                            ));
                        }
                        return Flow::Continue;
                    }
                    Err(why) => format!("machine check: guest-physical {gpa:#x} is poisoned and {why}"),
                }
            }
            // Not this VM's doing as such: nothing changed, RIP still names
            // the access, and the manager decides who gives memory back.
            FaultOutcome::Failed(mm::Error::OutOfHostFrames | mm::Error::OutOfTableMemory) => {
                self.reclaim.out_of_memory += 1;
                return Flow::OutOfMemory;
            }
            // Post-copy: the page is still at the migration's source. The
            // vCPU waits (RIP still names the access) until it arrives.
            FaultOutcome::Failed(mm::Error::PageInTransit(at)) => {
                vcpus.current_mut().awaiting_page = Some(at.0 >> 12);
                return Flow::Yield;
            }
            // A lazy restore's checkpoint could not give the page: its
            // report names the checkpoint, the page and the record.
            FaultOutcome::Failed(mm::Error::PageSourceFailed(_)) if host.lazy_failure(self.id).is_some() => {
                String::from(host.lazy_failure(self.id).unwrap_or_default())
            }
            FaultOutcome::Failed(e) => {
                format!("{} of guest-physical {gpa:#x} could not be resolved: {e}", access.as_str())
            }
        };
        self.end(RunState::Stopped { reason }, backend, console);
        Flow::Stop
    }

    /// An access to a device's registers: the instruction is emulated
    /// (`emulator`), RIP moves past it, and the devices' interrupts and
    /// timers are looked at again. A fault the instruction would raise
    /// goes to the guest; an instruction the emulator cannot carry out
    /// ends the VM with a report naming it.
    #[inline(never)]
    fn emulate_mmio(
        &mut self,
        gpa: u64,
        access: MemAccess,
        gva: Option<u64>,
        backend: &mut B,
        host: &mut HostMemory,
        console: &mut impl Console,
    ) -> Flow {
        let Some(Resources { mem, vcpus }) = self.res.as_mut() else {
            return Flow::Stop;
        };
        let cur = vcpus.cur();
        let state = vcpus[cur].vcpu.state();
        let hz = backend.tsc_hz();
        let now_ns = vm_ns(backend.now(), hz, self.clock_offset_ns);
        let fault = emulator::MmioFault { gpa, access, gva };
        let devices = &mut self.devices;
        let (result, rip, rflags, in_transit, device_waits) = host.with_hooks(self.id, |hooks| {
            let mut p = mmio::VmPlatform {
                vcpus: &mut *vcpus,
                cur,
                state: &state,
                rip: state.rip,
                rflags: state.rflags,
                mem,
                alloc: backend.mem(),
                hooks,
                devices,
                now_ns,
                accesses: 0,
                unbacked_ports: 0,
                port_effect: None,
                in_transit: None,
                device_waits: None,
            };
            let r = emulator::emulate(&mut p, &fault);
            (r, p.rip, p.rflags, p.in_transit, p.device_waits)
        });
        self.stats.mmio += 1;
        // Post-copy: a page the instruction needs is not here yet (its
        // bytes, an operand, a page table), or one a virtio notification
        // it makes would reach (the device write was held back; a plain
        // store, it changed nothing else). It is not carried out; the vCPU
        // waits for the page and runs it again.
        let waits = match (&result, in_transit, device_waits) {
            (_, _, Some(gfn)) | (Err(_), Some(gfn), None) => Some(gfn),
            _ => None,
        };
        if let Some(gfn) = waits {
            vcpus[cur].awaiting_page = Some(gfn);
            return Flow::Yield;
        }
        let reason = match result {
            Ok(done) => {
                finish_emulated(&mut vcpus[cur].vcpu, done.completed, &state, rip, rflags);
                // What the guest wrote to hvc0 (a transmit notification).
                if let Some(c) = self.devices.virtio_console() {
                    for l in c.take_lines() {
                        console.line(&format!("[vm {} hvc0] {l}", self.id));
                    }
                }
                // Pages the balloon driver gave up, took back or reported
                // free: applied before the vCPU runs again.
                if self.devices.balloon_needs_service() {
                    self.service_balloon(backend, host);
                }
                self.timers_changed(hz);
                // Frames the NIC took from a transmit notification: the
                // manager forwards them between slices, so end this one
                // now rather than hold them (and their replies) for the
                // rest of it.
                if self.devices.net_frames_waiting() {
                    return Flow::Yield;
                }
                return Flow::Continue;
            }
            Err(e) => match e.fault() {
                Some(event) => {
                    raise_emulated_fault(&mut vcpus[cur].vcpu, &e, event);
                    return Flow::Continue;
                }
                None => format!(
                    "{} of {} at guest-physical {gpa:#x} could not be emulated: {e}",
                    access.as_str(),
                    if self.devices.claims_mmio(gpa) { "device registers" } else { "ROM" }
                ),
            },
        };
        let reason = self.with_code_bytes(format!("{reason} at rip {:#x}", state.rip), backend);
        self.end(RunState::Stopped { reason }, backend, console);
        Flow::Stop
    }

    /// Says what the guest touched, where, and with which instruction.
    fn fault_report(&self, gpa: u64, access: MemAccess, gva: Option<u64>, backend: &mut B) -> String {
        let Some(res) = &self.res else {
            return String::new();
        };
        let inside = gpa < self.mem_bytes;
        let mut r = format!(
            "{} of guest-physical {gpa:#x} {} at rip {:#x}",
            access.as_str(),
            if inside { "not permitted" } else { "outside its memory" },
            res.vcpu_ref().rip()
        );
        if let Some(la) = gva {
            r.push_str(&format!(" (guest-linear {la:#x})"));
        }
        self.with_code_bytes(r, backend)
    }

    fn with_code_bytes(&self, mut report: String, backend: &mut B) -> String {
        let Some(res) = &self.res else { return report };
        let bytes = self.read_virt(backend, res.vcpu_ref().rip(), 15);
        if !bytes.is_empty() {
            report.push_str("; code at rip:");
            for b in bytes {
                report.push_str(&format!(" {b:02x}"));
            }
        }
        report
    }

    /// Moves the VM to a final state and prints its end report. Resources
    /// are released by the manager.
    pub fn end(&mut self, state: RunState, backend: &mut B, console: &mut impl Console) {
        let com1 = self.devices.com1();
        com1.flush_partial();
        for l in com1.take_lines() {
            console.line(&format!("[vm {}] {l}", self.id));
        }
        self.state = state;
        self.stats.ended_tsc = Some(backend.now());
        console.line(&self.end_report(backend.tsc_hz()));
    }

    /// One line: what happened to the VM, after how much work.
    pub fn end_report(&self, tsc_hz: u64) -> String {
        let what = match &self.state {
            RunState::Exited { status } => format!("exited with status {status} ({status:#x})"),
            RunState::PoweredOff => String::from("powered off (ACPI S5)"),
            RunState::Halted { rip } => format!("halted with interrupts disabled at rip {rip:#x}"),
            RunState::Stopped { reason } => format!("stopped: {reason}"),
            RunState::Running | RunState::Waiting => String::from("is running"),
        };
        let run_us = ticks_to_us(self.stats.run_ticks, tsc_hz);
        format!(
            "vm {} ({}) {what}; {} exits, {}.{:03} ms in guest",
            self.id,
            self.guest,
            self.stats.total_exits(),
            run_us / 1000,
            run_us % 1000
        )
    }
}

pub fn ticks_to_us(ticks: u64, hz: u64) -> u64 {
    ((ticks as u128 * 1_000_000) / hz.max(1) as u128) as u64
}
