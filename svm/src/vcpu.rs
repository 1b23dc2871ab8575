//! An AMD-V vCPU: one VMCB, the guest's general-purpose registers (RAX and
//! RSP live in the VMCB, mirrored here across each run), and the state the
//! VMCB does not hold: DR0-DR3, XCR0, TSC_AUX, the FPU/SSE image, the
//! activity state, NMI blocking and the events waiting for delivery.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use core::sync::atomic::Ordering;
use mm::addr::HostPhysAddr;
use mm::hal::{FrameAlloc, PhysMem};
use mm::paging::FlushScope;
use vcpu::events::{self, Blocking, Windows};
use vcpu::state::bits::*;
use vcpu::{Activity, Error, Event, EventQueue, ExitKind, Fpu, Gprs, GuestState, Reg, VmExit};

use crate::checks::{ControlContext, check_guest_state};
use crate::code::CodeReader;
use crate::cpu::{HostSwitch, IA32_TSC_AUX, SvmCpu};
use crate::decode::{self, Decoded};
use crate::fetch::{self, Opcode};
use crate::vmcb::{self, Vmcb, ctl, misc1, misc2, save, vintr};
use crate::{entry, hw, names};

// Whose DR0-DR3 are in this CPU's debug registers is per CPU
// (`vcpu::cpu_local::CpuLocal::dr_owner`): the VMCB holds DR6 and DR7 only
// (APM Vol. 2 table B-2) and the host never uses the others.

#[repr(C, align(16))]
struct FxArea([u8; 512]);

/// What `skip_instruction` must do for the last exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Skip {
    None,
    /// The CPU told us (NRIPS, or an I/O exit's EXITINFO2).
    To(u64),
    /// Measure this instruction at RIP.
    Measure(Opcode),
}

pub struct SvmVcpu<M: PhysMem> {
    gprs: Gprs,
    vmcb_pa: HostPhysAddr,
    vmcb: Vmcb,
    /// The host CPU (index) it last ran on: arriving on another, its ASID's
    /// translations there may be stale (a flush while it ran elsewhere
    /// reached only that CPU), so the first VMRUN flushes.
    last_cpu: u32,
    asid: u32,
    shared_asid: bool,
    /// TLB_CONTROL for the next VMRUN (a flush is pending).
    flush: u8,
    flush_value: u8,
    nrips: bool,
    decode_assists: bool,
    skip: Skip,
    deadline: u64,
    timer: crate::cpu::SliceTimer,
    /// `SvmCpu::nudge_after_interrupt`.
    nudge_after_interrupt: bool,
    /// `timer.fired()` when the slice timer was last armed.
    armed_gen: u64,
    /// The guest's code bytes, for instruction lengths without NRIPS.
    code: CodeReader<M>,
    host: HostSwitch,
    dr: [u64; 4],
    tsc_aux: u64,
    xcr0: u64,
    fx: Box<FxArea>,
    loaded: bool,
    /// AMD-V has no activity state: HLT exits, and a halted or waiting
    /// vCPU is not entered (`run` returns `Preempted` until an event wakes
    /// it).
    activity: Activity,
    /// The guest runs an NMI handler: set when an injected NMI was
    /// delivered, cleared once the handler's IRET has executed.
    nmi_blocked: bool,
    /// RIP of the IRET the last IRET intercept stopped at: once RIP has
    /// moved on, the IRET is done (the intercept comes before it executes).
    iret_at: Option<u64>,
    /// An event whose delivery the last exit interrupted.
    injected: Option<Event>,
    queue: EventQueue,
    /// Windows the layer above asked for.
    want: Windows,
    /// What this entry injected, and RIP before a software interrupt moved
    /// it: for what the exit says about its delivery.
    entry_event: Option<(Event, u64)>,
    /// The first intercept vector as in the VMCB (VINTR and IRET come and go).
    misc1_now: u32,
    /// `prepare_events` has something to do: one flag for the exit path to
    /// test instead of six.
    event_work: bool,
    /// `after_exit` has something to do beyond an interrupted delivery: an
    /// event went in, or an IRET is waited for.
    exit_work: bool,
}

impl<M: PhysMem> SvmVcpu<M> {
    /// A vCPU in the nested table rooted at `npt_root`, starting at `state`.
    ///
    /// # Safety
    /// SVM is enabled on this CPU (`cpu` exists); `npt_root` roots a valid
    /// NPT structure that outlives the vCPU; `mem` is the direct map of the
    /// memory `alloc` hands out, and of the tables and guest RAM.
    pub unsafe fn new<A: FrameAlloc>(
        cpu: &mut SvmCpu,
        alloc: &mut A,
        mem: M,
        npt_root: HostPhysAddr,
        state: &GuestState,
    ) -> Result<Box<SvmVcpu<M>>, Error> {
        let vmcb_pa = alloc.alloc_frame().ok_or(Error::OutOfMemory)?;
        // SAFETY: a fresh, zeroed, 4 KiB-aligned frame, ours until `destroy`.
        let vmcb = unsafe { Vmcb::new(alloc.phys_to_ptr(vmcb_pa)) };
        let (asid, shared_asid) = cpu.alloc_asid();
        let flush_value = if cpu.caps.flush_by_asid { vmcb::TLB_FLUSH_ASID } else { vmcb::TLB_FLUSH_ALL };
        let mut v = Box::new(SvmVcpu {
            gprs: state.gprs,
            vmcb_pa,
            vmcb,
            last_cpu: vcpu::cpu_local::get().index,
            asid,
            shared_asid,
            // The ASID may have served an earlier vCPU: start clean.
            flush: flush_value,
            flush_value,
            nrips: cpu.caps.nrips,
            decode_assists: cpu.caps.decode_assists,
            skip: Skip::None,
            deadline: u64::MAX,
            timer: cpu.timer,
            nudge_after_interrupt: cpu.nudge_after_interrupt,
            armed_gen: 0,
            code: CodeReader::new(mem),
            host: cpu.host,
            dr: [0; 4],
            tsc_aux: 0,
            xcr0: 1,
            fx: Box::new(FxArea(Fpu::default().to_fxsave())),
            loaded: false,
            activity: Activity::Active,
            nmi_blocked: false,
            iret_at: None,
            injected: None,
            queue: EventQueue::default(),
            want: Windows::default(),
            entry_event: None,
            misc1_now: misc1::GUEST,
            event_work: false,
            exit_work: false,
        });
        let c = &mut v.vmcb;
        c.write(ctl::INTERCEPT_MISC1, misc1::GUEST);
        c.write(ctl::INTERCEPT_MISC2, misc2::GUEST);
        c.write(ctl::INTERCEPT_DR, vmcb::INTERCEPT_DR_ALL);
        // #UD: a guest saved under VT-x may execute VMCALL, which is #UD
        // here and emulated as the hypercall (`VmExit::InvalidOpcode`). #MC:
        // a host machine check goes to the host (`vcpu::machine_check`).
        c.write(ctl::INTERCEPT_EXCEPTIONS, (1u32 << 6) | (1 << vcpu::machine_check::VECTOR));
        c.set_u64(ctl::IOPM_BASE_PA, cpu.io_map.0);
        c.set_u64(ctl::MSRPM_BASE_PA, cpu.msr_map.0);
        c.write(ctl::GUEST_ASID, asid);
        c.set_u64(ctl::VINTR, vmcb::VINTR_MASKING);
        c.set_u64(ctl::NP_ENABLE, 1);
        c.set_u64(ctl::N_CR3, npt_root.0);
        if let Err(e) = vcpu::Vcpu::set_state(&mut *v, state) {
            cpu.free_asid(asid);
            // SAFETY: never run; nothing else references the frame.
            unsafe { alloc.free_frame(vmcb_pa) };
            return Err(e);
        }
        Ok(v)
    }

    /// Makes the next VMRUN fail: EFER.SVME clear in the guest state, which
    /// the consistency checks refuse (APM 15.5.1). Only for tests of the
    /// entry-failure report.
    pub fn break_guest_state_for_test(&mut self) {
        let efer = self.vmcb.u64(save::EFER) & !EFER_SVME;
        self.vmcb.set_u64(save::EFER, efer);
    }

    /// Frees the VMCB and the ASID.
    ///
    /// # Safety
    /// The vCPU is not running and will not be used again.
    #[allow(clippy::boxed_local)] // callers hold vCPUs boxed; this ends one
    pub unsafe fn destroy<A: FrameAlloc>(self: Box<Self>, cpu: &mut SvmCpu, alloc: &mut A) {
        cpu.free_asid(self.asid);
        // A later vCPU may get this VMCB frame: it must not find the debug
        // registers marked as its own.
        let _ =
            vcpu::cpu_local::get().dr_owner.compare_exchange(self.vmcb_pa.0, 0, Ordering::Relaxed, Ordering::Relaxed);
        // SAFETY: the VMCB is ours and no CPU runs it.
        unsafe { alloc.free_frame(self.vmcb_pa) };
    }

    fn control_context(&self) -> ControlContext {
        ControlContext {
            asid: self.vmcb.read(ctl::GUEST_ASID),
            intercepts_vmrun: self.vmcb.read::<u32>(ctl::INTERCEPT_MISC2) & misc2::VMRUN != 0,
            vmcb_efer: self.vmcb.u64(save::EFER),
        }
    }

    fn entry_report(&self, what: &str) -> String {
        let s = vcpu::Vcpu::state(self);
        let problems = check_guest_state(&s, &self.control_context());
        let mut r = format!(
            "{what}; guest rip {:#x} cr0 {:#x} cr4 {:#x} efer {:#x} (vmcb {:#x})",
            s.rip,
            s.cr0,
            s.cr4,
            self.vmcb.u64(save::EFER),
            self.vmcb_pa.0
        );
        if problems.is_empty() {
            r.push_str("; the software checks found no broken rule");
        }
        for p in problems {
            r.push_str("; ");
            r.push_str(&p);
        }
        r
    }

    fn shutdown_report(&self) -> String {
        let s = vcpu::Vcpu::state(self);
        format!(
            "triple fault at rip {:#x} (cs {:#x}, rsp {:#x}, rflags {:#x}, cr0 {:#x}, cr3 {:#x}, cr4 {:#x}, efer {:#x}, idtr {:#x}/{:#x})",
            s.rip, s.cs.selector, s.gprs.rsp, s.rflags, s.cr0, s.cr3, s.cr4, s.efer, s.idtr.base, s.idtr.limit
        )
    }

    /// After an exit: what became of the event this entry injected, and an
    /// event whose delivery the exit interrupted is kept to go in again
    /// first (APM 15.7.2: EXITINTINFO).
    #[inline(never)]
    fn after_exit(&mut self, interrupted: bool) {
        self.event_work = true;
        if self.iret_at.is_some() {
            self.check_iret_done();
        }
        let info = if interrupted { vmcb::decode_event(self.vmcb.u64(ctl::EXIT_INT_INFO)) } else { None };
        let entry = self.entry_event.take();
        match (info, entry) {
            // Our software interrupt did not get through: RIP goes back to
            // the instruction.
            (
                Some(Event::SoftwareInterrupt { .. } | Event::Exception { vector: 1 | 3 | 4, .. }),
                Some((e @ Event::SoftwareInterrupt { .. }, rip)),
            ) => {
                self.vmcb.set_u64(save::RIP, rip);
                self.injected = Some(e);
            }
            // The guest's own INT n (not ours): RIP is still at the
            // instruction, which runs again.
            (Some(Event::SoftwareInterrupt { .. }), _) => {}
            (Some(e), _) => self.injected = Some(e),
            // An NMI went through: the guest's NMIs are blocked until its
            // handler's IRET (APM 15.20, "NMI").
            (None, Some((Event::Nmi, _))) => self.nmi_blocked = true,
            (None, _) => {}
        }
        self.exit_work = self.iret_at.is_some();
    }

    /// Skips whose bytes could not be read or matched (the architectural
    /// length was used instead).
    pub fn skip_fallbacks(&self) -> u64 {
        self.code.fallbacks()
    }

    fn set_skip(&mut self, op: Opcode) {
        self.skip = if self.nrips { Skip::To(self.vmcb.u64(ctl::NEXT_RIP)) } else { Skip::Measure(op) };
    }

    /// Handles an MSR the backend owns; `Ok` means skip the instruction.
    fn backend_msr(&mut self, d: &Decoded) -> Result<(), Event> {
        match *d {
            Decoded::EferRead => {
                let v = self.vmcb.u64(save::EFER) & !EFER_SVME;
                self.gprs.rax = v & 0xffff_ffff;
                self.gprs.rdx = v >> 32;
            }
            Decoded::EferWrite(v) => {
                let cur = self.vmcb.u64(save::EFER);
                let paging = self.vmcb.u64(save::CR0) & CR0_PG != 0;
                if v & !(EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE) != 0 || (paging && (v ^ cur) & EFER_LME != 0) {
                    return Err(Event::GP0);
                }
                // LMA is the CPU's; SVME the host's.
                self.vmcb.set_u64(save::EFER, (v & !EFER_LMA) | (cur & EFER_LMA) | EFER_SVME);
            }
            Decoded::PatRead => {
                let v = self.vmcb.u64(save::G_PAT);
                self.gprs.rax = v & 0xffff_ffff;
                self.gprs.rdx = v >> 32;
            }
            Decoded::PatWrite(v) => {
                // Each byte a valid memory type: 0, 1, 4, 5, 6 or 7.
                if v.to_le_bytes().iter().any(|&b| !matches!(b, 0 | 1 | 4..=7)) {
                    return Err(Event::GP0);
                }
                self.vmcb.set_u64(save::G_PAT, v);
            }
            _ => return Err(Event::UD),
        }
        Ok(())
    }

    /// A physical interrupt ended the run: the host took it (in `svm_run`);
    /// it was the slice's end if the deadline has passed. An interrupt that
    /// came early (another source, or an APIC timer that runs fast against
    /// the TSC, as under QEMU TCG) re-arms the timer so the slice still ends.
    fn interrupted(&mut self) -> VmExit {
        if hw::rdtsc() >= self.deadline {
            return VmExit::Preempted;
        }
        self.arm_slice_timer();
        VmExit::ExternalInterrupt { vector: None }
    }

    fn arm_slice_timer(&mut self) {
        self.armed_gen = (self.timer.fired)();
        (self.timer.arm)(self.deadline);
    }

    /// Before an entry: the slice timer is one-shot, and it may have fired
    /// while the host handled an exit (taken at the STGI that follows
    /// `svm_run`, not as an INTR intercept). Then the slice ends now if its
    /// time is up, or the timer is armed again; else the guest would run on
    /// with nothing to stop it, and a guest spinning without exits would
    /// hold the CPU for good.
    fn slice_timer_spent(&mut self) -> bool {
        if (self.timer.fired)() == self.armed_gen {
            return false;
        }
        if hw::rdtsc() >= self.deadline {
            return true;
        }
        self.arm_slice_timer();
        false
    }

    /// Before an entry with events waiting, windows asked for or NMIs
    /// blocked: inject the next event the guest can take and arm the
    /// window intercepts. `Some` is an exit to report without entering: the
    /// NMI window is open now (AMD-V has no NMI-window intercept), or the
    /// vCPU is halted or waiting with nothing to wake it.
    #[inline(never)]
    fn prepare_events(&mut self) -> Option<VmExit> {
        let rflags = self.vmcb.u64(save::RFLAGS);
        let shadow = self.vmcb.u64(ctl::INTERRUPT_SHADOW) & 1 != 0 || self.activity == Activity::WaitForSipi;
        let blocked = Blocking { interrupt: rflags & RFLAGS_IF == 0 || shadow, nmi: self.nmi_blocked || shadow };
        if self.want.nmi && !blocked.nmi && self.injected.is_none() && !self.queue.has_nmi() {
            self.want.nmi = false;
            return Some(VmExit::NmiWindow);
        }
        let plan = events::plan_entry(&mut self.injected, &mut self.queue, blocked, self.want);
        if self.activity != Activity::Active {
            match plan.event {
                // An event wakes a halted vCPU (APM Vol. 3 HLT).
                Some(_) if self.activity == Activity::Halted => self.activity = Activity::Active,
                Some(e) => {
                    self.injected = Some(e);
                    return Some(VmExit::Preempted);
                }
                None => return Some(VmExit::Preempted),
            }
        }
        if let Some(ev) = plan.event {
            let rip = self.vmcb.u64(save::RIP);
            if let Event::SoftwareInterrupt { len, .. } = ev {
                // The CPU pushes RIP (or NEXT_RIP with NRIPS) as the return
                // address: past the instruction (APM 15.20).
                let next = rip.wrapping_add(len as u64);
                self.vmcb.set_u64(save::RIP, next);
                if self.nrips {
                    self.vmcb.set_u64(ctl::NEXT_RIP, next);
                }
            }
            let protected = self.vmcb.u64(save::CR0) & CR0_PE != 0;
            self.vmcb.set_u64(ctl::EVENT_INJ, vmcb::encode_event(ev, protected));
            self.entry_event = Some((ev, rip));
            self.exit_work = true;
        }
        let nmi_going_in = matches!(plan.event, Some(Event::Nmi));
        // While NMIs are blocked, IRET tells when the handler ends; after
        // the intercept the IRET still has to run, and the V_IRQ window
        // brings the exit that shows it has (RIP moved on).
        let mut misc = misc1::GUEST;
        if (self.nmi_blocked || nmi_going_in) && self.iret_at.is_none() {
            misc |= misc1::IRET;
        }
        let irq_window = plan.windows.interrupt || (plan.windows.nmi && self.iret_at.is_some());
        let v = self.vmcb.u64(ctl::VINTR) & !(vintr::IRQ | vintr::PRIO | vintr::IGN_TPR);
        if irq_window {
            // A virtual interrupt of the highest priority, whatever the
            // guest's TPR: the VINTR intercept fires when the guest could
            // take it (APM 15.21.4); it is never delivered.
            misc |= misc1::VINTR;
            self.vmcb.set_u64(ctl::VINTR, v | vintr::IRQ | vintr::PRIO | vintr::IGN_TPR);
        } else {
            self.vmcb.set_u64(ctl::VINTR, v);
        }
        if misc != self.misc1_now {
            self.vmcb.write(ctl::INTERCEPT_MISC1, misc);
            self.misc1_now = misc;
        }
        self.event_work = self.injected.is_some()
            || !self.queue.is_empty()
            || self.want != Windows::default()
            || self.nmi_blocked
            || self.misc1_now != misc1::GUEST
            || self.activity != Activity::Active;
        None
    }

    /// NMIs are unblocked once the IRET the intercept stopped at has run.
    #[cold]
    #[inline(never)]
    fn check_iret_done(&mut self) {
        if let Some(at) = self.iret_at
            && self.vmcb.u64(save::RIP) != at
        {
            self.iret_at = None;
            self.nmi_blocked = false;
        }
    }

    /// MOV DR: which general-purpose register, from the decode assists or
    /// the instruction's bytes, and where the next instruction is. `None`:
    /// the bytes are not a MOV DR the guest may run (#UD).
    #[cold]
    #[inline(never)]
    fn decode_mov_dr(&mut self, info1: u64) -> Option<(u8, u64)> {
        let rip = self.vmcb.u64(save::RIP);
        if self.decode_assists && self.nrips && info1 & (1 << 63) != 0 {
            return Some(((info1 & 0xf) as u8, self.vmcb.u64(ctl::NEXT_RIP)));
        }
        let (bytes, n, long) = self.code.read_at_rip(self.vmcb);
        let (len, _, gpr, _) = fetch::mov_dr(&bytes[..n], long)?;
        Some((gpr, rip.wrapping_add(len as u64)))
    }

    /// Writes DR0-DR3 into the CPU unless they are already there.
    fn load_debug_registers(&mut self) {
        if vcpu::cpu_local::get().dr_owner.load(Ordering::Relaxed) != self.vmcb_pa.0 {
            for (n, &v) in self.dr.iter().enumerate() {
                // SAFETY: values checked canonical by `set_state`/the MOV DR
                // handler; the host runs with breakpoints disabled.
                unsafe { hw::write_dr(n as u8, v) };
            }
            vcpu::cpu_local::get().dr_owner.store(self.vmcb_pa.0, Ordering::Relaxed);
        }
    }

    /// The guest's FPU: from the CPU while loaded.
    fn guest_fpu(&self) -> Fpu {
        if self.loaded {
            let mut a = FxArea([0; 512]);
            // SAFETY: a 16-byte aligned local; FXSAVE only stores.
            unsafe { hw::fxsave(a.0.as_mut_ptr()) };
            Fpu::from_fxsave(&a.0)
        } else {
            Fpu::from_fxsave(&self.fx.0)
        }
    }

    /// The guest's XCR0. While it is loaded, the CPU's: QEMU's TCG does not
    /// implement the XSETBV intercept (APM Vol. 2 15.9 has one), so there a
    /// guest's XSETBV changes the CPU's XCR0 without an exit; the state keeps
    /// what it can hold of it.
    fn guest_xcr0(&self) -> u64 {
        if self.loaded && self.host.xcr0.is_some() {
            // SAFETY: the host turned CR4.OSXSAVE on.
            (unsafe { hw::xgetbv0() } & self.host.xcr0_mask) | 1
        } else {
            self.xcr0
        }
    }

    /// Puts `to` into the CPU's XCR0 unless it is there.
    fn switch_xcr0(&self, to: u64) {
        if self.host.xcr0.is_some() {
            // SAFETY: the host turned CR4.OSXSAVE on; `to` is the host's
            // value or a guest value checked against the CPU's mask.
            unsafe {
                if hw::xgetbv0() != to {
                    hw::xsetbv0(to);
                }
            }
        }
    }
}

impl<M: PhysMem> vcpu::Vcpu for SvmVcpu<M> {
    fn run(&mut self) -> VmExit {
        // The slice's end is looked at before any event is planned: an
        // event `prepare_events` puts in EVENT_INJ is out of `injected` and
        // `queue`, so it must go in at this very VMRUN. Returned before it,
        // the event was invisible to `state` and to `interrupt_window_open`,
        // and the next plan overwrote it: an interrupt the local APIC had
        // put in service never reached the guest, which never ended it
        // (a Linux CPU without timer interrupts, ISR 0xec stuck, seen after
        // a migration and under load).
        if self.slice_timer_spent() {
            return VmExit::Preempted;
        }
        if self.event_work
            && let Some(exit) = self.prepare_events()
        {
            return exit;
        }
        self.vmcb.set_u64(save::RAX, self.gprs.rax);
        self.vmcb.set_u64(save::RSP, self.gprs.rsp);
        let here = vcpu::cpu_local::get();
        if self.last_cpu != here.index {
            self.last_cpu = here.index;
            self.flush = self.flush_value;
            self.code.invalidate();
        }
        let tlb = if self.shared_asid { self.flush_value } else { core::mem::take(&mut self.flush) };
        self.vmcb.write(ctl::TLB_CONTROL, tlb);
        self.skip = Skip::None;
        if self.nudge_after_interrupt && vmcb::is_external_interrupt(self.vmcb.u64(ctl::EVENT_INJ)) {
            (self.timer.nudge)();
        }
        // SAFETY: SVM is on on this CPU (vCPUs run only where an SvmCpu
        // exists, which stored this CPU's host VMCB), the VMCB is complete,
        // the host VMCB holds this CPU's VMSAVE state, and `gprs` outlives
        // the call.
        unsafe { entry::svm_run(&mut self.gprs, self.vmcb_pa.0, here.svm_host_vmcb.load(Ordering::Relaxed)) };
        self.gprs.rax = self.vmcb.u64(save::RAX);
        self.gprs.rsp = self.vmcb.u64(save::RSP);
        self.vmcb.set_u64(ctl::EVENT_INJ, 0);
        let code = self.vmcb.u64(ctl::EXIT_CODE);
        let d = decode::decode(
            code,
            self.vmcb.u64(ctl::EXIT_INFO1),
            self.vmcb.u64(ctl::EXIT_INFO2),
            self.gprs.rax,
            self.gprs.rcx,
            self.gprs.rdx,
        );
        let interrupted = matches!(d, Decoded::Exit(_, None) | Decoded::Interrupt | Decoded::Nmi);
        if self.exit_work || interrupted {
            self.after_exit(interrupted);
        }
        match d {
            Decoded::Exit(e, op) => {
                if let Some(op) = op {
                    self.set_skip(op);
                }
                if e == (VmExit::ExternalInterrupt { vector: Some(vcpu::machine_check::VECTOR) }) {
                    vcpu::machine_check::deliver_to_host();
                }
                e
            }
            Decoded::Io(io, next) => {
                self.skip = Skip::To(next);
                VmExit::Io(io)
            }
            Decoded::Interrupt | Decoded::Nmi => self.interrupted(),
            Decoded::Shutdown => VmExit::Shutdown { report: self.shutdown_report() },
            Decoded::Invalid => VmExit::EntryFailed { report: self.entry_report("VMRUN failed: VMEXIT_INVALID") },
            Decoded::InjectUd => {
                self.inject(Event::UD);
                VmExit::Handled(ExitKind::Unexpected)
            }
            Decoded::Dr { dr, write, info1 } => match self.decode_mov_dr(info1) {
                Some((gpr, next)) => {
                    self.skip = Skip::To(next);
                    VmExit::DrAccess { dr, gpr, write }
                }
                None => {
                    self.inject(Event::UD);
                    VmExit::Handled(ExitKind::DebugRegister)
                }
            },
            Decoded::Vintr => {
                self.event_work = true;
                // The window is open: take the virtual interrupt back.
                let v = self.vmcb.u64(ctl::VINTR) & !(vintr::IRQ | vintr::PRIO | vintr::IGN_TPR);
                self.vmcb.set_u64(ctl::VINTR, v);
                self.vmcb.write(ctl::INTERCEPT_MISC1, misc1::GUEST);
                self.misc1_now = misc1::GUEST;
                if self.want.nmi && !self.nmi_blocked {
                    self.want.nmi = false;
                    VmExit::NmiWindow
                } else {
                    self.want.interrupt = false;
                    VmExit::InterruptWindow
                }
            }
            Decoded::Iret => {
                self.event_work = true;
                self.exit_work = true;
                // Before the IRET: it runs when the guest resumes.
                self.iret_at = Some(self.vmcb.u64(save::RIP));
                let misc = self.misc1_now & !misc1::IRET;
                self.vmcb.write(ctl::INTERCEPT_MISC1, misc);
                self.misc1_now = misc;
                VmExit::Handled(ExitKind::NmiWindow)
            }
            Decoded::EferRead | Decoded::PatRead | Decoded::EferWrite(_) | Decoded::PatWrite(_) => {
                let (kind, op) = if matches!(d, Decoded::EferRead | Decoded::PatRead) {
                    (ExitKind::Rdmsr, Opcode::Rdmsr)
                } else {
                    (ExitKind::Wrmsr, Opcode::Wrmsr)
                };
                match self.backend_msr(&d) {
                    Ok(()) => {
                        self.set_skip(op);
                        self.skip_instruction();
                    }
                    Err(ev) => self.inject(ev),
                }
                VmExit::Handled(kind)
            }
            Decoded::Unknown(code) => VmExit::Unexpected {
                report: format!(
                    "unhandled #VMEXIT {code:#x} ({}), exitinfo1 {:#x} exitinfo2 {:#x} at rip {:#x}",
                    names::exit_code(code),
                    self.vmcb.u64(ctl::EXIT_INFO1),
                    self.vmcb.u64(ctl::EXIT_INFO2),
                    self.vmcb.u64(save::RIP)
                ),
            },
        }
    }

    fn gprs(&self) -> &Gprs {
        &self.gprs
    }

    fn gprs_mut(&mut self) -> &mut Gprs {
        &mut self.gprs
    }

    fn rip(&self) -> u64 {
        self.vmcb.u64(save::RIP)
    }

    fn rflags(&self) -> u64 {
        self.vmcb.u64(save::RFLAGS)
    }

    fn cpl(&self) -> u8 {
        self.vmcb.read(save::CPL)
    }

    fn skip_instruction(&mut self) {
        let rip = self.vmcb.u64(save::RIP);
        let next = match self.skip {
            Skip::None => return,
            Skip::To(n) => n,
            Skip::Measure(op) => rip.wrapping_add(self.code.measure(self.vmcb, op)),
        };
        self.skip = Skip::None;
        self.vmcb.set_u64(save::RIP, next);
        // Moving past the instruction ends an STI/MOV SS interrupt shadow.
        self.vmcb.set_u64(ctl::INTERRUPT_SHADOW, 0);
    }

    fn complete_emulated(&mut self, rip: u64, rflags: u64) {
        self.skip = Skip::None;
        self.vmcb.set_u64(save::RIP, rip);
        self.vmcb.set_u64(save::RFLAGS, rflags);
        self.vmcb.set_u64(ctl::INTERRUPT_SHADOW, 0);
    }

    fn state(&self) -> GuestState {
        let mut s = GuestState { gprs: self.gprs, ..Default::default() };
        self.vmcb.store_state(&mut s);
        // RAX and RSP are mirrored in `gprs` between runs.
        s.gprs.rax = self.gprs.rax;
        s.gprs.rsp = self.gprs.rsp;
        s.dr = self.dr;
        s.tsc_aux = if self.loaded && self.host.tsc_aux {
            // SAFETY: the CPU has the MSR.
            unsafe { hw::rdmsr(IA32_TSC_AUX) }
        } else {
            self.tsc_aux
        };
        s.xcr0 = self.guest_xcr0();
        s.fpu = self.guest_fpu();
        s.activity = self.activity;
        s.nmi_blocked = self.nmi_blocked && !matches!(self.iret_at, Some(at) if at != s.rip);
        s.injected_event = self.injected;
        s.pending_events = self.queue;
        s
    }

    fn set_state(&mut self, s: &GuestState) -> Result<(), Error> {
        s.check_neutral(self.host.mxcsr_mask).map_err(Error::InvalidState)?;
        if s.xcr0 & !self.host.xcr0_mask != 0 {
            return Err(Error::InvalidState(format!("XCR0 {:#x}: this CPU allows {:#x}", s.xcr0, self.host.xcr0_mask)));
        }
        if s.tsc_aux != 0 && !self.host.tsc_aux {
            return Err(Error::InvalidState(String::from("IA32_TSC_AUX: this CPU has no RDTSCP")));
        }
        let ctx = ControlContext { vmcb_efer: s.efer | EFER_SVME, ..self.control_context() };
        if let Some(p) = check_guest_state(s, &ctx).into_iter().next() {
            return Err(Error::InvalidState(p));
        }
        self.gprs = s.gprs;
        self.vmcb.load_state(s);
        self.code.invalidate();
        self.dr = s.dr;
        self.tsc_aux = s.tsc_aux;
        self.fx.0 = s.fpu.to_fxsave();
        self.xcr0 = s.xcr0;
        if self.loaded {
            // SAFETY: an FXSAVE image with MXCSR checked against the CPU's
            // mask, TSC_AUX with its reserved bits clear.
            unsafe {
                hw::fxrstor(self.fx.0.as_ptr());
                if self.host.tsc_aux {
                    hw::wrmsr(IA32_TSC_AUX, self.tsc_aux);
                }
            }
            self.switch_xcr0(self.xcr0);
            vcpu::cpu_local::get().dr_owner.store(0, Ordering::Relaxed);
            self.load_debug_registers();
        }
        self.activity = s.activity;
        self.nmi_blocked = s.nmi_blocked;
        self.iret_at = None;
        self.injected = s.injected_event;
        self.queue = s.pending_events;
        self.entry_event = None;
        self.exit_work = false;
        self.vmcb.set_u64(ctl::EVENT_INJ, 0);
        self.event_work = true;
        Ok(())
    }

    fn reg(&self, r: Reg) -> u64 {
        match r {
            Reg::Cr0 => self.vmcb.u64(save::CR0),
            Reg::Cr3 => self.vmcb.u64(save::CR3),
            Reg::Cr4 => self.vmcb.u64(save::CR4),
            Reg::Cr8 => self.vmcb.u64(ctl::VINTR) & vintr::TPR,
            Reg::Dr0 => self.dr[0],
            Reg::Dr1 => self.dr[1],
            Reg::Dr2 => self.dr[2],
            Reg::Dr3 => self.dr[3],
            Reg::Dr6 => self.vmcb.u64(save::DR6),
            Reg::Dr7 => self.vmcb.u64(save::DR7),
            Reg::Efer => self.vmcb.u64(save::EFER) & !EFER_SVME,
            Reg::Xcr0 => self.guest_xcr0(),
            Reg::TscOffset => self.vmcb.u64(ctl::TSC_OFFSET),
        }
    }

    fn set_reg(&mut self, r: Reg, v: u64) {
        let dr = |n: usize, this: &mut Self| {
            this.dr[n] = v;
            if this.loaded && vcpu::cpu_local::get().dr_owner.load(Ordering::Relaxed) == this.vmcb_pa.0 {
                // SAFETY: the caller checked the value as MOV DR would.
                unsafe { hw::write_dr(n as u8, v) };
            }
        };
        match r {
            Reg::Cr0 => self.vmcb.set_u64(save::CR0, v),
            Reg::Cr3 => self.vmcb.set_u64(save::CR3, v),
            Reg::Cr4 => self.vmcb.set_u64(save::CR4, v),
            Reg::Cr8 => {
                let cur = self.vmcb.u64(ctl::VINTR);
                self.vmcb.set_u64(ctl::VINTR, (cur & !vintr::TPR) | (v & vintr::TPR));
            }
            Reg::Dr0 => dr(0, self),
            Reg::Dr1 => dr(1, self),
            Reg::Dr2 => dr(2, self),
            Reg::Dr3 => dr(3, self),
            Reg::Dr6 => self.vmcb.set_u64(save::DR6, v),
            Reg::Dr7 => self.vmcb.set_u64(save::DR7, v),
            Reg::Efer => self.vmcb.set_u64(save::EFER, v | EFER_SVME),
            Reg::Xcr0 => {
                self.xcr0 = v;
                if self.loaded {
                    self.switch_xcr0(v);
                }
            }
            Reg::TscOffset => self.vmcb.set_u64(ctl::TSC_OFFSET, v),
        }
        if matches!(r, Reg::Cr0 | Reg::Cr3 | Reg::Cr4) {
            // A new paging mode or root: the cached code page is stale.
            self.code.invalidate();
            self.flush = self.flush_value;
        }
    }

    fn inject(&mut self, event: Event) {
        // A full queue cannot happen (see `vcpu::events::QUEUE_LEN`); were
        // it to, the newest event is the one lost.
        let _ = self.queue.push(event);
        self.event_work = true;
    }

    fn request_interrupt_window(&mut self) {
        self.want.interrupt = true;
        self.event_work = true;
    }

    fn interrupt_window_open(&self) -> bool {
        self.vmcb.u64(save::RFLAGS) & RFLAGS_IF != 0
            && self.vmcb.u64(ctl::INTERRUPT_SHADOW) & 1 == 0
            && self.activity != Activity::WaitForSipi
            && self.injected.is_none()
            && self.queue.is_empty()
    }

    fn request_nmi_window(&mut self) {
        self.want.nmi = true;
        self.event_work = true;
    }

    fn nmi_window_open(&self) -> bool {
        !self.nmi_blocked
            && self.vmcb.u64(ctl::INTERRUPT_SHADOW) & 1 == 0
            && self.activity != Activity::WaitForSipi
            && self.injected.is_none()
            && !self.queue.has_nmi()
    }

    fn set_time_slice(&mut self, ticks: u64) {
        self.deadline = hw::rdtsc().saturating_add(ticks);
        self.arm_slice_timer();
    }

    fn overhead_bytes(&self) -> u64 {
        4096 + core::mem::size_of::<Self>() as u64 + core::mem::size_of::<FxArea>() as u64
    }

    fn flush_nested_tlb(&mut self, _scope: FlushScope) {
        // No per-address nested flush exists: drop the ASID's translations.
        self.flush = self.flush_value;
        self.code.invalidate();
    }

    fn release(&mut self) {
        // The VMCB is plain memory any CPU may VMRUN; only the debug
        // registers this CPU holds for the vCPU stay behind (stale once it
        // runs elsewhere). The TLB is flushed where it arrives (`run`).
        let _ =
            vcpu::cpu_local::get().dr_owner.compare_exchange(self.vmcb_pa.0, 0, Ordering::Relaxed, Ordering::Relaxed);
    }

    fn load(&mut self) {
        // SAFETY: the FXSAVE image is ours, aligned and valid (MXCSR
        // checked); TSC_AUX and XCR0's guest value are not used by the host.
        unsafe {
            hw::fxrstor(self.fx.0.as_ptr());
            if self.host.tsc_aux {
                hw::wrmsr(IA32_TSC_AUX, self.tsc_aux);
            }
        }
        self.switch_xcr0(self.xcr0);
        self.load_debug_registers();
        self.loaded = true;
    }

    fn put(&mut self) {
        if !self.loaded {
            return;
        }
        // SAFETY: saving into our own aligned area; the MSR exists.
        unsafe {
            hw::fxsave(self.fx.0.as_mut_ptr());
            if self.host.tsc_aux {
                self.tsc_aux = hw::rdmsr(IA32_TSC_AUX);
            }
        }
        if let Some(host) = self.host.xcr0 {
            self.xcr0 = self.guest_xcr0();
            self.switch_xcr0(host);
        }
        self.loaded = false;
    }
}
