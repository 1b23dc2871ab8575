//! An AMD-V vCPU: one VMCB, the guest's general-purpose registers (RAX and
//! RSP live in the VMCB, mirrored here across each run) and its FPU/SSE
//! image.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use mm::addr::HostPhysAddr;
use mm::hal::{FrameAlloc, PhysMem};
use mm::paging::FlushScope;
use vcpu::state::bits::*;
use vcpu::{Error, Event, ExitKind, Gprs, GuestState, VmExit};

use crate::checks::{ControlContext, check_guest_state};
use crate::code::CodeReader;
use crate::cpu::SvmCpu;
use crate::decode::{self, Decoded};
use crate::fetch::Opcode;
use crate::vmcb::{self, Vmcb, ctl, misc1, misc2, save};
use crate::{entry, hw, names};

#[repr(C, align(16))]
struct FxArea([u8; 512]);

impl FxArea {
    /// The FNINIT/reset image: FCW 0x37f, MXCSR 0x1f80.
    fn reset() -> FxArea {
        let mut a = FxArea([0; 512]);
        a.0[0..2].copy_from_slice(&0x037fu16.to_le_bytes());
        a.0[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
        a
    }
}

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
    host_vmcb: u64,
    asid: u32,
    shared_asid: bool,
    /// TLB_CONTROL for the next VMRUN (a flush is pending).
    flush: u8,
    flush_value: u8,
    nrips: bool,
    skip: Skip,
    deadline: u64,
    arm_timer: crate::cpu::ArmTimer,
    /// The guest's code bytes, for instruction lengths without NRIPS.
    code: CodeReader<M>,
    fx: Box<FxArea>,
    loaded: bool,
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
            host_vmcb: cpu.host_vmcb.0,
            asid,
            shared_asid,
            // The ASID may have served an earlier vCPU: start clean.
            flush: flush_value,
            flush_value,
            nrips: cpu.caps.nrips,
            skip: Skip::None,
            deadline: u64::MAX,
            arm_timer: cpu.arm_timer,
            code: CodeReader::new(mem),
            fx: Box::new(FxArea::reset()),
            loaded: false,
        });
        let c = &mut v.vmcb;
        c.write(ctl::INTERCEPT_MISC1, misc1::GUEST);
        c.write(ctl::INTERCEPT_MISC2, misc2::GUEST);
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

    /// An event whose delivery the exit interrupted goes in again (APM
    /// 15.7.2: EXITINTINFO).
    fn requeue_interrupted_event(&mut self) {
        let info = self.vmcb.u64(ctl::EXIT_INT_INFO);
        if info & vmcb::event::VALID != 0 {
            self.vmcb.set_u64(ctl::EVENT_INJ, info);
        }
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
    fn interrupted(&self) -> VmExit {
        if hw::rdtsc() >= self.deadline {
            return VmExit::Preempted;
        }
        (self.arm_timer)(self.deadline);
        VmExit::ExternalInterrupt { vector: None }
    }
}

impl<M: PhysMem> vcpu::Vcpu for SvmVcpu<M> {
    fn run(&mut self) -> VmExit {
        self.vmcb.set_u64(save::RAX, self.gprs.rax);
        self.vmcb.set_u64(save::RSP, self.gprs.rsp);
        let tlb = if self.shared_asid { self.flush_value } else { core::mem::take(&mut self.flush) };
        self.vmcb.write(ctl::TLB_CONTROL, tlb);
        self.skip = Skip::None;
        // SAFETY: SVM is on (the vCPU exists), the VMCB is complete, the
        // host VMCB holds the host's VMSAVE state, and `gprs` outlives the
        // call.
        unsafe { entry::svm_run(&mut self.gprs, self.vmcb_pa.0, self.host_vmcb) };
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
        match d {
            Decoded::Exit(e, op) => {
                match op {
                    Some(op) => self.set_skip(op),
                    None => self.requeue_interrupted_event(),
                }
                e
            }
            Decoded::Io(io, next) => {
                self.skip = Skip::To(next);
                VmExit::Io(io)
            }
            Decoded::Interrupt | Decoded::Nmi => {
                self.requeue_interrupted_event();
                self.interrupted()
            }
            Decoded::Shutdown => VmExit::Shutdown { report: self.shutdown_report() },
            Decoded::Invalid => VmExit::EntryFailed { report: self.entry_report("VMRUN failed: VMEXIT_INVALID") },
            Decoded::InjectUd => {
                self.inject(Event::UD);
                VmExit::Handled(ExitKind::Unexpected)
            }
            Decoded::SkipOnly(op) => {
                self.set_skip(op);
                self.skip_instruction();
                VmExit::Handled(ExitKind::Unexpected)
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

    fn state(&self) -> GuestState {
        let mut s = GuestState { gprs: self.gprs, ..Default::default() };
        self.vmcb.store_state(&mut s);
        // RAX and RSP are mirrored in `gprs` between runs.
        s.gprs.rax = self.gprs.rax;
        s.gprs.rsp = self.gprs.rsp;
        s
    }

    fn set_state(&mut self, s: &GuestState) -> Result<(), Error> {
        self.gprs = s.gprs;
        self.vmcb.load_state(s);
        self.code.invalidate();
        match check_guest_state(s, &self.control_context()).into_iter().next() {
            Some(p) => Err(Error::InvalidState(p)),
            None => Ok(()),
        }
    }

    fn inject(&mut self, event: Event) {
        self.vmcb.set_u64(ctl::EVENT_INJ, vmcb::encode_event(event));
    }

    fn set_time_slice(&mut self, ticks: u64) {
        self.deadline = hw::rdtsc().saturating_add(ticks);
        (self.arm_timer)(self.deadline);
    }

    fn overhead_bytes(&self) -> u64 {
        4096 + core::mem::size_of::<Self>() as u64 + core::mem::size_of::<FxArea>() as u64
    }

    fn flush_nested_tlb(&mut self, _scope: FlushScope) {
        // No per-address nested flush exists: drop the ASID's translations.
        self.flush = self.flush_value;
        self.code.invalidate();
    }

    fn load(&mut self) {
        // SAFETY: the FXSAVE image is ours, aligned and valid.
        unsafe { hw::fxrstor(self.fx.0.as_ptr()) };
        self.loaded = true;
    }

    fn put(&mut self) {
        if !self.loaded {
            return;
        }
        // SAFETY: saving into our own aligned area.
        unsafe { hw::fxsave(self.fx.0.as_mut_ptr()) };
        self.loaded = false;
    }
}
