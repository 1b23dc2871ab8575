//! A VT-x vCPU: one VMCS, the guest's general-purpose registers, and the
//! state the VMCS does not hold (FPU/SSE image, lazily switched MSRs).

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use core::sync::atomic::{AtomicU64, Ordering};
use mm::addr::HostPhysAddr;
use mm::hal::FrameAlloc;
use mm::paging::FlushScope;
use vcpu::state::bits::*;
use vcpu::{DescriptorTable, Error, Event, ExitKind, Gprs, GuestState, Segment, VmExit};
use x86::vmx::vmcs::control::EntryControls;
use x86::vmx::vmcs::{control, guest, host, ro};

use crate::checks::{EntryContext, check_guest_state};
use crate::controls::Controls;
use crate::cpu::{LAZY_MSRS, VmxCpu};
use crate::cr2::GuestCr2;
use crate::decode::{self, Decoded};
use crate::hw::{self, vmread, vmwrite};
use crate::{ar, entry, names};
use vcpu::Vcpu as _;

/// The VMCS this CPU has current (physical address), 0 if none.
static CURRENT_VMCS: AtomicU64 = AtomicU64::new(0);

#[repr(C, align(16))]
struct FxArea([u8; 512]);

impl FxArea {
    /// The FNINIT/reset image: FCW 0x37f, MXCSR 0x1f80 (SDM Vol. 1 10.5.1).
    fn reset() -> FxArea {
        let mut a = FxArea([0; 512]);
        a.0[0..2].copy_from_slice(&0x037fu16.to_le_bytes());
        a.0[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
        a.0[28..32].copy_from_slice(&0xffffu32.to_le_bytes()); // MXCSR_MASK
        a
    }
}

pub struct VmxVcpu {
    gprs: Gprs,
    vmcs: HostPhysAddr,
    launched: bool,
    vpid: u16,
    eptp: u64,
    ctl: Controls,
    /// TSC deadline of the slice, when the CPU cannot save the timer.
    deadline: u64,
    /// Guest CR8 (TPR) when CR8 moves exit; no local APIC is modelled yet.
    cr8: u64,
    /// Guest CR2, which the VMCS does not hold: switched by hand around
    /// every entry and exit (see `crate::cr2`).
    cr2: GuestCr2,
    lazy_msrs: [u64; 5],
    fx: Box<FxArea>,
    loaded: bool,
}

/// Segment field encodings: selector, base, limit, access rights.
const SEGS: [(u32, u32, u32, u32); 8] = [
    (guest::ES_SELECTOR, guest::ES_BASE, guest::ES_LIMIT, guest::ES_ACCESS_RIGHTS),
    (guest::CS_SELECTOR, guest::CS_BASE, guest::CS_LIMIT, guest::CS_ACCESS_RIGHTS),
    (guest::SS_SELECTOR, guest::SS_BASE, guest::SS_LIMIT, guest::SS_ACCESS_RIGHTS),
    (guest::DS_SELECTOR, guest::DS_BASE, guest::DS_LIMIT, guest::DS_ACCESS_RIGHTS),
    (guest::FS_SELECTOR, guest::FS_BASE, guest::FS_LIMIT, guest::FS_ACCESS_RIGHTS),
    (guest::GS_SELECTOR, guest::GS_BASE, guest::GS_LIMIT, guest::GS_ACCESS_RIGHTS),
    (guest::LDTR_SELECTOR, guest::LDTR_BASE, guest::LDTR_LIMIT, guest::LDTR_ACCESS_RIGHTS),
    (guest::TR_SELECTOR, guest::TR_BASE, guest::TR_LIMIT, guest::TR_ACCESS_RIGHTS),
];

fn segs_mut(s: &mut GuestState) -> [&mut Segment; 8] {
    [&mut s.es, &mut s.cs, &mut s.ss, &mut s.ds, &mut s.fs, &mut s.gs, &mut s.ldtr, &mut s.tr]
}

impl VmxVcpu {
    /// A vCPU running in the nested page table rooted at `ept_root`, starting
    /// from `state`.
    ///
    /// # Safety
    /// `cpu` is in VMX operation on this CPU; `ept_root` roots a valid EPT
    /// structure that outlives the vCPU.
    pub unsafe fn new(
        cpu: &mut VmxCpu,
        alloc: &mut impl FrameAlloc,
        ept_root: HostPhysAddr,
        state: &GuestState,
    ) -> Result<Box<VmxVcpu>, Error> {
        let vmcs = alloc.alloc_frame().ok_or(Error::OutOfMemory)?;
        // SAFETY: a fresh frame, reachable through the direct map.
        unsafe { (alloc.phys_to_ptr(vmcs) as *mut u32).write(cpu.caps.revision_id()) };
        let ctl = cpu.controls;
        let mut v = Box::new(VmxVcpu {
            gprs: state.gprs,
            vmcs,
            launched: false,
            vpid: if ctl.vpid { cpu.alloc_vpid() } else { 0 },
            eptp: ctl.eptp(ept_root.0),
            ctl,
            deadline: 0,
            cr8: 0,
            cr2: GuestCr2(state.cr2),
            lazy_msrs: [0; 5],
            fx: Box::new(FxArea::reset()),
            loaded: false,
        });
        // SAFETY: VMX is on; the region has the revision identifier.
        let setup = unsafe { v.setup(cpu) };
        if setup.is_ok() {
            // A reused root frame may still have translations cached under
            // this EPTP from an earlier VM.
            v.flush_nested_tlb(FlushScope::All);
        }
        if let Err(e) = setup.and_then(|_| v.set_state(state)) {
            // SAFETY: the VMCS was never launched; clear it before freeing.
            unsafe {
                let _ = hw::vmclear(vmcs.0);
                CURRENT_VMCS.store(0, Ordering::Relaxed);
                alloc.free_frame(vmcs);
            }
            cpu.free_vpid(v.vpid);
            return Err(e);
        }
        Ok(v)
    }

    /// Makes the next VM entry fail: TR becomes unusable, which the entry
    /// checks forbid (SDM Vol. 3C 27.3.1.2). Only for tests of the entry
    /// failure report.
    pub fn break_guest_state_for_test(&mut self) {
        let ar = self.read(guest::TR_ACCESS_RIGHTS) | ar::UNUSABLE as u64;
        self.write(guest::TR_ACCESS_RIGHTS, ar);
    }

    /// Frees the VMCS and the VPID.
    ///
    /// # Safety
    /// The vCPU is not running and will not be used again.
    pub unsafe fn destroy(self: Box<Self>, cpu: &mut VmxCpu, alloc: &mut impl FrameAlloc) {
        // SAFETY: clearing a VMCS we own; afterwards nothing references it.
        unsafe {
            let _ = hw::vmclear(self.vmcs.0);
            let _ = CURRENT_VMCS.compare_exchange(self.vmcs.0, 0, Ordering::Relaxed, Ordering::Relaxed);
            alloc.free_frame(self.vmcs);
        }
        cpu.free_vpid(self.vpid);
    }

    /// # Safety
    /// VMX operation; the VMCS region is initialised.
    unsafe fn setup(&mut self, cpu: &VmxCpu) -> Result<(), Error> {
        let fail = |what: &str, e: hw::VmFail| Error::Hardware(format!("{what}: {e}"));
        // SAFETY: VMCLEAR then VMPTRLD of our own region (SDM Vol. 3C 24.11.3).
        unsafe {
            hw::vmclear(self.vmcs.0).map_err(|e| fail("VMCLEAR", e))?;
            hw::vmptrld(self.vmcs.0).map_err(|e| fail("VMPTRLD", e))?;
        }
        CURRENT_VMCS.store(self.vmcs.0, Ordering::Relaxed);
        let ctl = &self.ctl;
        let gdt = hw::sgdt();
        let idt = hw::sidt();
        let [cs, ss, ds, es, fs, gs, tr] = hw::selectors();
        let tr_base = tss_base(gdt.base, tr);
        let w = |field: u32, value: u64| -> Result<(), Error> {
            // SAFETY: the VMCS is current; each field below exists on every
            // CPU that passed `controls::derive`.
            unsafe { hw::vmwrite_checked(field, value) }.map_err(|e| fail(&format!("VMWRITE {field:#x}"), e))
        };
        w(control::PINBASED_EXEC_CONTROLS, ctl.pin as u64)?;
        w(control::PRIMARY_PROCBASED_EXEC_CONTROLS, ctl.proc as u64)?;
        w(control::SECONDARY_PROCBASED_EXEC_CONTROLS, ctl.proc2 as u64)?;
        w(control::VMEXIT_CONTROLS, ctl.exit as u64)?;
        w(control::VMENTRY_CONTROLS, ctl.entry as u64)?;
        w(control::EXCEPTION_BITMAP, 0)?;
        w(control::CR3_TARGET_COUNT, 0)?;
        w(control::CR0_GUEST_HOST_MASK, ctl.cr0_mask)?;
        w(control::CR4_GUEST_HOST_MASK, ctl.cr4_mask)?;
        w(control::MSR_BITMAPS_ADDR_FULL, cpu.msr_bitmap.0)?;
        w(control::EPTP_FULL, self.eptp)?;
        if ctl.vpid {
            w(control::VPID, self.vpid as u64)?;
        }
        w(control::VMEXIT_MSR_STORE_COUNT, 0)?;
        w(control::VMEXIT_MSR_LOAD_COUNT, 0)?;
        w(control::VMENTRY_MSR_LOAD_COUNT, 0)?;
        w(control::TSC_OFFSET_FULL, 0)?;
        w(guest::LINK_PTR_FULL, u64::MAX)?;
        w(guest::VMX_PREEMPTION_TIMER_VALUE, u32::MAX as u64)?;

        // Host state: what the CPU returns to on every exit (SDM 26.2.3).
        w(host::CR0, hw::read_cr0())?;
        w(host::CR3, hw::read_cr3())?;
        w(host::CR4, hw::read_cr4())?;
        for (field, sel) in [
            (host::CS_SELECTOR, cs),
            (host::SS_SELECTOR, ss),
            (host::DS_SELECTOR, ds),
            (host::ES_SELECTOR, es),
            (host::FS_SELECTOR, fs),
            (host::GS_SELECTOR, gs),
            (host::TR_SELECTOR, tr),
        ] {
            // RPL and TI must be 0 (SDM Vol. 3C 27.2.3).
            w(field, (sel & !7) as u64)?;
        }
        // SAFETY: these MSRs exist on every x86-64 CPU.
        let (fs_base, gs_base, efer, pat) =
            unsafe { (hw::rdmsr(0xc000_0100), hw::rdmsr(0xc000_0101), hw::rdmsr(0xc000_0080), hw::rdmsr(0x277)) };
        w(host::FS_BASE, fs_base)?;
        w(host::GS_BASE, gs_base)?;
        w(host::TR_BASE, tr_base)?;
        w(host::GDTR_BASE, gdt.base)?;
        w(host::IDTR_BASE, idt.base)?;
        w(host::IA32_SYSENTER_CS, 0)?;
        w(host::IA32_SYSENTER_ESP, 0)?;
        w(host::IA32_SYSENTER_EIP, 0)?;
        w(host::IA32_EFER_FULL, efer)?;
        w(host::IA32_PAT_FULL, pat)?;
        w(host::RIP, entry::vmx_exit as *const () as u64)?;
        Ok(())
    }

    /// Makes this VMCS current if it is not.
    fn make_current(&self) {
        if CURRENT_VMCS.load(Ordering::Relaxed) != self.vmcs.0 {
            // SAFETY: our VMCS, initialised by `setup`.
            if unsafe { hw::vmptrld(self.vmcs.0) }.is_ok() {
                CURRENT_VMCS.store(self.vmcs.0, Ordering::Relaxed);
            }
        }
    }

    fn read(&self, field: u32) -> u64 {
        self.make_current();
        // SAFETY: the VMCS is current and the fields used exist.
        unsafe { vmread(field) }
    }

    /// VMREAD on the exit path: the VMCS is current between an exit and the
    /// next entry (the `Vcpu` contract), so the check is debug-only.
    #[inline(always)]
    fn read_hot(&self, field: u32) -> u64 {
        debug_assert_eq!(
            CURRENT_VMCS.load(Ordering::Relaxed),
            self.vmcs.0,
            "exit-path access to a VMCS that is not current"
        );
        // SAFETY: as above; the fields used exist on every VMX CPU.
        unsafe { vmread(field) }
    }

    #[inline(always)]
    fn write_hot(&mut self, field: u32, value: u64) {
        debug_assert_eq!(
            CURRENT_VMCS.load(Ordering::Relaxed),
            self.vmcs.0,
            "exit-path access to a VMCS that is not current"
        );
        // SAFETY: as for `write`.
        unsafe { vmwrite(field, value) }
    }

    fn write(&mut self, field: u32, value: u64) {
        self.make_current();
        // SAFETY: the VMCS is current; callers keep guest state valid (an
        // invalid one is caught at entry and reported, never run).
        unsafe { vmwrite(field, value) }
    }

    /// Guest-visible CR0: owned bits from the read shadow.
    fn guest_cr0(&self) -> u64 {
        let m = self.ctl.cr0_mask;
        (self.read(guest::CR0) & !m) | (self.read(control::CR0_READ_SHADOW) & m)
    }

    fn guest_cr4(&self) -> u64 {
        let m = self.ctl.cr4_mask;
        (self.read(guest::CR4) & !m) | (self.read(control::CR4_READ_SHADOW) & m)
    }

    fn set_cr0(&mut self, v: u64) {
        self.write(guest::CR0, self.ctl.real_cr0(v));
        self.write(control::CR0_READ_SHADOW, v);
    }

    fn set_cr4(&mut self, v: u64) {
        self.write(guest::CR4, self.ctl.real_cr4(v));
        self.write(control::CR4_READ_SHADOW, v);
    }

    /// EFER.LMA and the "IA-32e mode guest" entry control move together
    /// (SDM Vol. 3C 27.3.1.1).
    fn set_efer(&mut self, efer: u64) {
        self.write(guest::IA32_EFER_FULL, efer);
        let e = self.read(control::VMENTRY_CONTROLS) & !(EntryControls::IA32E_MODE_GUEST.bits() as u64);
        let lma = if efer & EFER_LMA != 0 { EntryControls::IA32E_MODE_GUEST.bits() as u64 } else { 0 };
        self.write(control::VMENTRY_CONTROLS, e | lma);
    }

    /// MOV to CR0 as the guest asked for it (SDM Vol. 3A 2.5, 9.8.5).
    fn write_cr0(&mut self, v: u64) -> Result<(), Event> {
        if v >> 32 != 0 || (v & CR0_PG != 0 && v & CR0_PE == 0) || (v & CR0_NW != 0 && v & CR0_CD == 0) {
            return Err(Event::GP0);
        }
        let efer = self.read(guest::IA32_EFER_FULL);
        let old = self.guest_cr0();
        if v & CR0_PG != 0 && old & CR0_PG == 0 && efer & EFER_LME != 0 {
            if self.guest_cr4() & CR4_PAE == 0 {
                return Err(Event::GP0);
            }
            self.set_efer(efer | EFER_LMA);
        } else if v & CR0_PG == 0 && old & CR0_PG != 0 {
            self.set_efer(efer & !EFER_LMA);
        }
        self.set_cr0(v);
        Ok(())
    }

    fn write_cr4(&mut self, v: u64) -> Result<(), Event> {
        let long = self.read(guest::IA32_EFER_FULL) & EFER_LMA != 0;
        // VMX is hidden from guests; bits the CPU cannot run with are refused.
        if v & CR4_VMXE != 0 || v & !self.ctl.cr4_fixed1 != 0 || (long && v & CR4_PAE == 0) {
            return Err(Event::GP0);
        }
        self.set_cr4(v);
        Ok(())
    }

    fn write_efer(&mut self, v: u64) -> Result<(), Event> {
        let cur = self.read(guest::IA32_EFER_FULL);
        let paging = self.guest_cr0() & CR0_PG != 0;
        if v & !(EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE) != 0 || (paging && (v ^ cur) & EFER_LME != 0) {
            return Err(Event::GP0);
        }
        // LMA is the CPU's to set: keep the current value.
        self.set_efer((v & !EFER_LMA) | (cur & EFER_LMA));
        Ok(())
    }

    /// Handles an exit the backend owns. `Ok` means: skip the instruction.
    fn emulate(&mut self, d: &Decoded) -> Result<(), Event> {
        match *d {
            Decoded::MovToCr { cr, gpr } => {
                let v = self.gprs.get(gpr);
                match cr {
                    0 => self.write_cr0(v),
                    3 => {
                        self.write(guest::CR3, v);
                        if self.ctl.vpid {
                            // A MOV to CR3 flushes the guest's TLB.
                            // SAFETY: VMX operation, single-context INVVPID
                            // checked at start-up (else all-context).
                            let _ = unsafe { hw::invvpid(if self.ctl.invvpid_single { 1 } else { 2 }, self.vpid) };
                        }
                        Ok(())
                    }
                    4 => self.write_cr4(v),
                    8 => {
                        self.cr8 = v & 0xf;
                        Ok(())
                    }
                    _ => Err(Event::UD),
                }
            }
            Decoded::MovFromCr { cr, gpr } => {
                let v = match cr {
                    0 => self.guest_cr0(),
                    3 => self.read(guest::CR3),
                    4 => self.guest_cr4(),
                    8 => self.cr8,
                    _ => return Err(Event::UD),
                };
                self.gprs.set(gpr, v);
                Ok(())
            }
            Decoded::Clts => {
                let v = self.guest_cr0() & !(1 << 3);
                self.set_cr0(v);
                Ok(())
            }
            Decoded::Lmsw { value } => {
                // LMSW loads PE, MP, EM, TS and cannot clear PE.
                let old = self.guest_cr0();
                let v = (old & !0xe) | (value as u64 & 0xf) | (old & CR0_PE);
                self.write_cr0(v)
            }
            Decoded::EferWrite { value } => self.write_efer(value),
            _ => Err(Event::UD),
        }
    }

    fn entry_context(&self) -> EntryContext {
        EntryContext {
            ia32e_guest: self.read(control::VMENTRY_CONTROLS) & EntryControls::IA32E_MODE_GUEST.bits() as u64 != 0,
            unrestricted: true,
            cr0_fixed0: self.ctl.cr0_fixed0,
            cr0_fixed1: self.ctl.cr0_fixed1,
            cr4_fixed0: self.ctl.cr4_fixed0,
            cr4_fixed1: self.ctl.cr4_fixed1,
        }
    }

    /// The failed entry explained: the hardware's reason plus every guest
    /// state rule the software check finds broken.
    fn entry_report(&self, what: String) -> String {
        let mut s = self.state();
        s.cr0 = self.read(guest::CR0);
        s.cr4 = self.read(guest::CR4);
        let problems = check_guest_state(&s, &self.entry_context());
        let mut r = format!("{what}; guest rip {:#x} cr0 {:#x} cr4 {:#x} efer {:#x}", s.rip, s.cr0, s.cr4, s.efer);
        if problems.is_empty() {
            r.push_str("; the software checks found no broken guest-state rule");
        }
        for p in problems {
            r.push_str("; ");
            r.push_str(&p);
        }
        r
    }

    fn triple_fault_report(&self) -> String {
        let s = self.state();
        let idt_info = self.read(ro::IDT_VECTORING_INFO);
        let mut r = format!(
            "triple fault at rip {:#x} (cs {:#x}, rsp {:#x}, rflags {:#x}, cr0 {:#x}, cr3 {:#x}, cr4 {:#x}, efer {:#x}, idtr {:#x}/{:#x})",
            s.rip, s.cs.selector, s.gprs.rsp, s.rflags, s.cr0, s.cr3, s.cr4, s.efer, s.idtr.base, s.idtr.limit
        );
        if idt_info & (1 << 31) != 0 {
            r.push_str(&format!("; while delivering vector {} (type {})", idt_info & 0xff, (idt_info >> 8) & 7));
        }
        r
    }

    /// Re-injects an event whose delivery the exit interrupted (SDM Vol. 3C
    /// 28.2.4 and 29.2.3).
    fn requeue_interrupted_event(&mut self) {
        let info = self.read(ro::IDT_VECTORING_INFO);
        if info & (1 << 31) == 0 {
            return;
        }
        self.write(control::VMENTRY_INTERRUPTION_INFO_FIELD, info & !(1 << 12));
        if info & (1 << 11) != 0 {
            let code = self.read(ro::IDT_VECTORING_ERR_CODE);
            self.write(control::VMENTRY_EXCEPTION_ERR_CODE, code);
        }
        let len = self.read(ro::VMEXIT_INSTRUCTION_LEN);
        self.write(control::VMENTRY_INSTRUCTION_LEN, len);
    }
}

/// The base of the TSS the selector names in the GDT at `gdt_base` (a
/// 16-byte system descriptor in long mode, SDM Vol. 3A 8.2.3).
fn tss_base(gdt_base: u64, sel: u16) -> u64 {
    let d = (gdt_base + (sel & !7) as u64) as *const u64;
    // SAFETY: the selector was read from TR, so it indexes a valid TSS
    // descriptor of the live GDT.
    let (lo, hi) = unsafe { (d.read_unaligned(), d.add(1).read_unaligned()) };
    ((lo >> 16) & 0xff_ffff) | (((lo >> 56) & 0xff) << 24) | ((hi & 0xffff_ffff) << 32)
}

impl vcpu::Vcpu for VmxVcpu {
    fn run(&mut self) -> VmExit {
        self.make_current();
        // SAFETY: the VMCS is current, complete (`setup`), and HOST_RIP is
        // `vmx_exit`; `gprs` lives as long as the call.
        let rc = unsafe {
            if !self.ctl.saves_timer {
                let left = self.deadline.saturating_sub(core::arch::x86_64::_rdtsc()) >> self.ctl.timer_rate;
                vmwrite(guest::VMX_PREEMPTION_TIMER_VALUE, left.min(u32::MAX as u64));
            }
            vmwrite(guest::RSP, self.gprs.rsp);
            self.cr2.load(&mut hw::Cr2);
            let rc = entry::vmx_run(&mut self.gprs, self.launched as u64);
            // Before anything else can fault: the guest's page-fault address.
            self.cr2.save(&hw::Cr2);
            rc
        };
        if rc != 0 {
            let what = if rc == 1 {
                String::from("VM entry failed: VMfailInvalid (no current VMCS)")
            } else {
                let n = self.read(ro::VM_INSTRUCTION_ERROR);
                format!("VM entry failed: VM-instruction error {n} ({})", names::instruction_error(n))
            };
            return VmExit::EntryFailed { report: self.entry_report(what) };
        }
        self.launched = true;
        // SAFETY: after an exit the VMCS is current.
        let reason = unsafe {
            self.gprs.rsp = vmread(guest::RSP);
            vmread(ro::EXIT_REASON) as u32
        };
        let decoded = decode::decode(reason, &|f: u32| self.read(f), &self.gprs);
        match decoded {
            Decoded::Exit(e) => {
                if matches!(e, VmExit::NestedPageFault { .. } | VmExit::ExternalInterrupt { .. } | VmExit::Preempted) {
                    self.requeue_interrupted_event();
                }
                e
            }
            Decoded::TripleFault => VmExit::Shutdown { report: self.triple_fault_report() },
            Decoded::EntryFailure { reason, qualification } => VmExit::EntryFailed {
                report: self.entry_report(format!(
                    "VM entry failed: {} (qualification {qualification:#x})",
                    names::exit_reason(reason)
                )),
            },
            Decoded::InjectUd => {
                self.inject(Event::UD);
                VmExit::Handled(ExitKind::Unexpected)
            }
            ref d => {
                let kind = decode::handled_kind(d);
                match self.emulate(d) {
                    Ok(()) => self.skip_instruction(),
                    Err(ev) => self.inject(ev),
                }
                VmExit::Handled(kind)
            }
        }
    }

    fn gprs(&self) -> &Gprs {
        &self.gprs
    }

    fn gprs_mut(&mut self) -> &mut Gprs {
        &mut self.gprs
    }

    fn rip(&self) -> u64 {
        self.read_hot(guest::RIP)
    }

    fn rflags(&self) -> u64 {
        self.read_hot(guest::RFLAGS)
    }

    fn cpl(&self) -> u8 {
        ((self.read_hot(guest::SS_ACCESS_RIGHTS) >> 5) & 3) as u8
    }

    fn skip_instruction(&mut self) {
        let len = self.read_hot(ro::VMEXIT_INSTRUCTION_LEN);
        let rip = self.read_hot(guest::RIP);
        self.write_hot(guest::RIP, rip.wrapping_add(len));
        // Moving past the instruction ends an STI/MOV SS interrupt shadow.
        let intr = self.read_hot(guest::INTERRUPTIBILITY_STATE);
        if intr & 3 != 0 {
            self.write_hot(guest::INTERRUPTIBILITY_STATE, intr & !3);
        }
    }

    fn state(&self) -> GuestState {
        let mut s = GuestState { gprs: self.gprs, ..Default::default() };
        for (seg, &(sel, base, limit, ar)) in segs_mut(&mut s).into_iter().zip(SEGS.iter()) {
            *seg = Segment {
                selector: self.read(sel) as u16,
                base: self.read(base),
                limit: self.read(limit) as u32,
                attrs: ar::from_vmx(self.read(ar) as u32),
            };
        }
        s.rip = self.read(guest::RIP);
        s.rflags = self.read(guest::RFLAGS);
        s.cr0 = self.guest_cr0();
        s.cr2 = self.cr2.0;
        s.cr3 = self.read(guest::CR3);
        s.cr4 = self.guest_cr4();
        s.dr7 = self.read(guest::DR7);
        s.efer = self.read(guest::IA32_EFER_FULL);
        s.pat = self.read(guest::IA32_PAT_FULL);
        s.gdtr = DescriptorTable { base: self.read(guest::GDTR_BASE), limit: self.read(guest::GDTR_LIMIT) as u16 };
        s.idtr = DescriptorTable { base: self.read(guest::IDTR_BASE), limit: self.read(guest::IDTR_LIMIT) as u16 };
        s.sysenter_cs = self.read(guest::IA32_SYSENTER_CS);
        s.sysenter_esp = self.read(guest::IA32_SYSENTER_ESP);
        s.sysenter_eip = self.read(guest::IA32_SYSENTER_EIP);
        let lazy = if self.loaded {
            // SAFETY: these MSRs exist on every x86-64 CPU.
            LAZY_MSRS.map(|m| unsafe { hw::rdmsr(m) })
        } else {
            self.lazy_msrs
        };
        [s.kernel_gs_base, s.star, s.lstar, s.cstar, s.sfmask] = lazy;
        s.interrupt_shadow = self.read(guest::INTERRUPTIBILITY_STATE) & 3 != 0;
        let info = self.read(control::VMENTRY_INTERRUPTION_INFO_FIELD);
        if info & (1 << 31) != 0 {
            let vector = info as u8;
            s.pending_event = Some(match (info >> 8) & 7 {
                0 => Event::Interrupt { vector },
                2 => Event::Nmi,
                _ => Event::Exception {
                    vector,
                    error_code: (info & (1 << 11) != 0).then(|| self.read(control::VMENTRY_EXCEPTION_ERR_CODE) as u32),
                },
            });
        }
        s
    }

    fn set_state(&mut self, s: &GuestState) -> Result<(), Error> {
        self.gprs = s.gprs;
        let segs = [&s.es, &s.cs, &s.ss, &s.ds, &s.fs, &s.gs, &s.ldtr, &s.tr];
        for (seg, &(sel, base, limit, ar)) in segs.into_iter().zip(SEGS.iter()) {
            self.write(sel, seg.selector as u64);
            self.write(base, seg.base);
            self.write(limit, seg.limit as u64);
            self.write(ar, ar::to_vmx(seg.attrs) as u64);
        }
        self.write(guest::RIP, s.rip);
        self.write(guest::RFLAGS, s.rflags);
        self.write(guest::RSP, s.gprs.rsp);
        self.set_cr0(s.cr0);
        self.cr2 = GuestCr2(s.cr2);
        self.write(guest::CR3, s.cr3);
        self.set_cr4(s.cr4);
        self.write(guest::DR7, s.dr7 | 0x400);
        self.set_efer(s.efer);
        self.write(guest::IA32_PAT_FULL, if s.pat == 0 { PAT_DEFAULT } else { s.pat });
        self.write(guest::GDTR_BASE, s.gdtr.base);
        self.write(guest::GDTR_LIMIT, s.gdtr.limit as u64);
        self.write(guest::IDTR_BASE, s.idtr.base);
        self.write(guest::IDTR_LIMIT, s.idtr.limit as u64);
        self.write(guest::IA32_SYSENTER_CS, s.sysenter_cs);
        self.write(guest::IA32_SYSENTER_ESP, s.sysenter_esp);
        self.write(guest::IA32_SYSENTER_EIP, s.sysenter_eip);
        self.write(guest::ACTIVITY_STATE, 0);
        self.write(guest::INTERRUPTIBILITY_STATE, if s.interrupt_shadow { 1 } else { 0 });
        self.write(guest::PENDING_DBG_EXCEPTIONS, 0);
        self.lazy_msrs = [s.kernel_gs_base, s.star, s.lstar, s.cstar, s.sfmask];
        if self.loaded {
            for (m, v) in LAZY_MSRS.iter().zip(self.lazy_msrs) {
                // SAFETY: the guest's own values for MSRs the host never uses.
                unsafe { hw::wrmsr(*m, v) };
            }
        }
        self.write(control::VMENTRY_INTERRUPTION_INFO_FIELD, 0);
        if let Some(ev) = s.pending_event {
            self.inject(ev);
        }
        let mut check = s.clone();
        check.cr0 = self.read(guest::CR0);
        check.cr4 = self.read(guest::CR4);
        let problems = check_guest_state(&check, &self.entry_context());
        match problems.into_iter().next() {
            Some(p) => Err(Error::InvalidState(p)),
            None => Ok(()),
        }
    }

    fn inject(&mut self, event: Event) {
        // VM-entry interruption information (SDM Vol. 3C 25.8.3).
        let (vector, kind, code) = match event {
            Event::Exception { vector, error_code } => (vector as u64, 3u64, error_code),
            Event::Interrupt { vector } => (vector as u64, 0, None),
            Event::Nmi => (2, 2, None),
        };
        let mut info = (1 << 31) | (kind << 8) | vector;
        if let Some(c) = code {
            info |= 1 << 11;
            self.write(control::VMENTRY_EXCEPTION_ERR_CODE, c as u64);
        }
        self.write(control::VMENTRY_INTERRUPTION_INFO_FIELD, info);
    }

    fn set_time_slice(&mut self, ticks: u64) {
        // SAFETY: RDTSC only reads the counter.
        self.deadline = unsafe { core::arch::x86_64::_rdtsc() }.saturating_add(ticks);
        if self.ctl.saves_timer {
            let v = (ticks >> self.ctl.timer_rate).clamp(1, u32::MAX as u64);
            self.write(guest::VMX_PREEMPTION_TIMER_VALUE, v);
        }
    }

    fn overhead_bytes(&self) -> u64 {
        4096 + core::mem::size_of::<VmxVcpu>() as u64 + core::mem::size_of::<FxArea>() as u64
    }

    fn flush_nested_tlb(&mut self, _scope: FlushScope) {
        // INVEPT has no per-address form: drop the whole context.
        // SAFETY: VMX operation; the INVEPT type was checked at start-up.
        let _ = unsafe { if self.ctl.invept_single { hw::invept(1, self.eptp) } else { hw::invept(2, 0) } };
    }

    fn load(&mut self) {
        self.make_current();
        // SAFETY: the FXSAVE image is ours and valid; the lazy MSRs are not
        // used by the host, so loading guest values there is harmless.
        unsafe {
            hw::fxrstor(self.fx.0.as_ptr());
            for (m, v) in LAZY_MSRS.iter().zip(self.lazy_msrs) {
                hw::wrmsr(*m, v);
            }
        }
        self.loaded = true;
    }

    fn put(&mut self) {
        if !self.loaded {
            return;
        }
        // SAFETY: saving into our own aligned area and reading MSRs.
        unsafe {
            hw::fxsave(self.fx.0.as_mut_ptr());
            self.lazy_msrs = LAZY_MSRS.map(|m| hw::rdmsr(m));
        }
        self.loaded = false;
    }
}
