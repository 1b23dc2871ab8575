//! A VT-x vCPU: one VMCS, the guest's general-purpose registers, and the
//! state the VMCS does not hold (SDM Vol. 3C 25.4): CR2, DR0-DR3 and DR6,
//! CR8, XCR0, the FPU/SSE image, the lazily switched MSRs, and the events
//! waiting for delivery.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use core::cell::Cell;
use core::sync::atomic::Ordering;
use mm::addr::HostPhysAddr;
use mm::hal::FrameAlloc;
use mm::paging::FlushScope;
use vcpu::events::{self, Blocking, Windows};
use vcpu::state::bits::*;
use vcpu::{
    Activity, DescriptorTable, Error, Event, EventQueue, ExitKind, Fpu, Gprs, GuestState, Reg, Segment, VmExit,
};
use x86::vmx::vmcs::control::EntryControls;
use x86::vmx::vmcs::{control, guest, host, ro};

use crate::checks::{EntryContext, check_guest_state};
use crate::controls::{self, Controls};
use crate::cpu::{HostSwitch, IA32_TSC_AUX, LAZY_MSRS, VmxCpu};
use crate::cr2::GuestCr2;
use crate::decode::{self, Decoded};
use crate::hw::{self, vmread, vmwrite};
use crate::{ar, entry, names};
use vcpu::Vcpu as _;

// The VMCS current on this CPU and the owner of its debug registers are
// per CPU: `vcpu::cpu_local` (the VMCS holds only DR7, SDM Vol. 3C 25.4.1;
// the host never uses DR0-DR3/DR6 and runs with DR7 = 0x400, 28.5.1).

#[repr(C, align(16))]
pub(crate) struct FxArea(pub(crate) [u8; 512]);

/// Interruptibility state (SDM Vol. 3C 25.4.2, table 25-3).
const BLOCKING_STI: u64 = 1;
const BLOCKING_MOV_SS: u64 = 2;
const BLOCKING_NMI: u64 = 8;
/// Activity states (table 25-2... 25.4.2).
const ACTIVITY_ACTIVE: u64 = 0;
const ACTIVITY_HLT: u64 = 1;
const ACTIVITY_WAIT_SIPI: u64 = 3;
/// VM-entry interruption information (25.8.3): valid bit 31, deliver error
/// code bit 11, type 10:8.
const INTR_VALID: u64 = 1 << 31;
const INTR_ERROR_CODE: u64 = 1 << 11;
const TYPE_EXTERNAL: u64 = 0;
const TYPE_NMI: u64 = 2;
const TYPE_HW_EXCEPTION: u64 = 3;
const TYPE_SOFT_INT: u64 = 4;
const TYPE_PRIV_SOFT_EXCEPTION: u64 = 5;
const TYPE_SOFT_EXCEPTION: u64 = 6;
/// `active_on` when the VMCS is active on no CPU.
const NO_CPU: u32 = u32::MAX;

pub struct VmxVcpu {
    gprs: Gprs,
    vmcs: HostPhysAddr,
    /// The host CPU (index) the VMCS is active on, [`NO_CPU`] once cleared:
    /// a VMCS may be current on one CPU at a time, and must be VMCLEARed
    /// there before another loads it (SDM Vol. 3C 25.1, 25.11.1).
    active_on: Cell<u32>,
    /// VMLAUNCH has run since the VMCS was last cleared (then VMRESUME).
    launched: Cell<bool>,
    vpid: u16,
    eptp: u64,
    ctl: Controls,
    host: HostSwitch,
    /// TSC deadline of the slice, when the CPU cannot save the timer.
    deadline: u64,
    /// Guest CR8 (TPR): CR8 moves exit; the local APIC above reads it.
    cr8: u64,
    /// Guest CR2, which the VMCS does not hold: switched by hand around
    /// every entry and exit (see `crate::cr2`).
    cr2: GuestCr2,
    /// DR0-DR3, DR6: in the CPU while this vCPU owns them (`DR_OWNER`).
    dr: [u64; 4],
    dr6: u64,
    lazy_msrs: [u64; 5],
    tsc_aux: u64,
    xcr0: u64,
    fx: Box<FxArea>,
    loaded: bool,
    /// An event whose delivery the last exit interrupted.
    injected: Option<Event>,
    queue: EventQueue,
    /// Windows the layer above asked for.
    want: Windows,
    /// The primary controls in the VMCS (the window exits come and go).
    proc_now: u32,
    /// The last entry injected an event (its field must be cleared).
    entry_event: bool,
    /// `prepare_events` has something to do: one flag for the exit path to
    /// test instead of five.
    event_work: bool,
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
            active_on: Cell::new(NO_CPU),
            launched: Cell::new(false),
            vpid: if ctl.vpid { cpu.alloc_vpid() } else { 0 },
            eptp: ctl.eptp(ept_root.0),
            ctl,
            host: cpu.host,
            deadline: 0,
            cr8: 0,
            cr2: GuestCr2(state.cr2),
            dr: [0; 4],
            dr6: DR6_FIXED,
            lazy_msrs: [0; 5],
            tsc_aux: 0,
            xcr0: 1,
            fx: Box::new(FxArea(Fpu::default().to_fxsave())),
            loaded: false,
            injected: None,
            queue: EventQueue::default(),
            want: Windows::default(),
            proc_now: ctl.proc,
            entry_event: false,
            event_work: false,
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
                vcpu::cpu_local::get().current_vmcs.store(0, Ordering::Relaxed);
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
        let on = self.active_on.get();
        assert!(
            on == NO_CPU || on == vcpu::cpu_local::get().index,
            "VMCS {:#x} destroyed on cpu {} while active on cpu {on}",
            self.vmcs.0,
            vcpu::cpu_local::get().index
        );
        // SAFETY: clearing a VMCS we own, active here or nowhere;
        // afterwards nothing references it.
        unsafe {
            let _ = hw::vmclear(self.vmcs.0);
            let _ = vcpu::cpu_local::get().current_vmcs.compare_exchange(
                self.vmcs.0,
                0,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            // A later vCPU may get this VMCS frame: it must not find the
            // debug registers marked as its own.
            let _ =
                vcpu::cpu_local::get().dr_owner.compare_exchange(self.vmcs.0, 0, Ordering::Relaxed, Ordering::Relaxed);
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
        vcpu::cpu_local::get().current_vmcs.store(self.vmcs.0, Ordering::Relaxed);
        let ctl = &self.ctl;
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
        // #UD: a guest saved under AMD-V may execute VMMCALL, which is #UD
        // here and emulated as the hypercall (`VmExit::InvalidOpcode`). #MC:
        // a host machine check goes to the host (`vcpu::machine_check`).
        w(control::EXCEPTION_BITMAP, (1 << 6) | (1 << vcpu::machine_check::VECTOR))?;
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
        // Loaded and saved with DR7 ("debug controls"); the guest's WRMSR
        // of it is refused, so it stays 0.
        w(guest::IA32_DEBUGCTL_FULL, 0)?;
        w(guest::VMX_PREEMPTION_TIMER_VALUE, u32::MAX as u64)?;

        self.active_on.set(vcpu::cpu_local::get().index);
        // SAFETY: the VMCS is current (above).
        unsafe { self.write_host_state() }
    }

    /// The host state, what the CPU returns to on every exit (SDM Vol. 3C
    /// 26.2.3): this CPU's own GDT, TSS and GS base among it, so it is
    /// written again whenever the vCPU arrives on another CPU.
    ///
    /// # Safety
    /// VMX operation; this vCPU's VMCS is current on this CPU.
    unsafe fn write_host_state(&self) -> Result<(), Error> {
        let fail = |what: &str, e: hw::VmFail| Error::Hardware(format!("{what}: {e}"));
        let gdt = hw::sgdt();
        let idt = hw::sidt();
        let [cs, ss, ds, es, fs, gs, tr] = hw::selectors();
        let tr_base = tss_base(gdt.base, tr);
        let w = |field: u32, value: u64| -> Result<(), Error> {
            // SAFETY: (caller) the VMCS is current; host-state fields exist
            // on every VMX CPU.
            unsafe { hw::vmwrite_checked(field, value) }.map_err(|e| fail(&format!("VMWRITE {field:#x}"), e))
        };
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

    /// Makes this VMCS current on this CPU if it is not. Arriving from
    /// another CPU (released there), it gets this CPU's host state, must
    /// be launched again, and drops translations it may have left here
    /// from an earlier stay (a flush while it ran elsewhere reached only
    /// that CPU).
    #[inline(always)]
    fn make_current(&self) {
        // The common case, on every VMCS access outside the exit path's
        // hot reads: already current here. One GS-relative load.
        if vcpu::cpu_local::get().current_vmcs.load(Ordering::Relaxed) != self.vmcs.0 {
            self.load_here();
        }
    }

    /// `make_current`'s rare part: VMPTRLD, and the arrival work when the
    /// VMCS comes from another CPU.
    #[cold]
    #[inline(never)]
    fn load_here(&self) {
        let here = vcpu::cpu_local::get();
        let on = self.active_on.get();
        // Loading a VMCS active on another CPU corrupts it: the scheduler
        // releases a vCPU before moving it. A host bug, not a guest's: loud.
        assert!(
            on == NO_CPU || on == here.index,
            "VMCS {:#x} is active on cpu {on}; cpu {} may not load it before it is released there",
            self.vmcs.0,
            here.index
        );
        // SAFETY: our VMCS, initialised by `setup`, active nowhere else.
        if unsafe { hw::vmptrld(self.vmcs.0) }.is_err() {
            return;
        }
        here.current_vmcs.store(self.vmcs.0, Ordering::Relaxed);
        if on == NO_CPU {
            self.active_on.set(here.index);
            self.launched.set(false);
            // SAFETY: the VMCS is current; host state as at `setup`, for
            // this CPU. INVEPT of this vCPU's context (all of them if the
            // single form is missing) is always allowed in VMX operation.
            unsafe {
                if let Err(e) = self.write_host_state() {
                    panic!("VMCS {:#x}: host state on cpu {}: {e}", self.vmcs.0, here.index);
                }
                let _ = if self.ctl.invept_single { hw::invept(1, self.eptp) } else { hw::invept(2, 0) };
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
            vcpu::cpu_local::get().current_vmcs.load(Ordering::Relaxed),
            self.vmcs.0,
            "exit-path access to a VMCS that is not current"
        );
        // SAFETY: as above; the fields used exist on every VMX CPU.
        unsafe { vmread(field) }
    }

    #[inline(always)]
    fn write_hot(&mut self, field: u32, value: u64) {
        debug_assert_eq!(
            vcpu::cpu_local::get().current_vmcs.load(Ordering::Relaxed),
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

    /// Drops the guest's cached linear translations, as a MOV to CR3 (or a
    /// CR0/CR4 write that changes paging) does on hardware: with VPID they
    /// outlive the exit (SDM Vol. 3C 29.4.3.1).
    fn flush_guest_tlb(&self) {
        if self.ctl.vpid {
            // SAFETY: VMX operation; the INVVPID type was checked at
            // start-up (single context, else all contexts).
            let _ = unsafe { hw::invvpid(if self.ctl.invvpid_single { 1 } else { 2 }, self.vpid) };
        }
    }

    /// Before an entry with events waiting or windows armed: inject the next
    /// event the guest can take and arm the window exits for the rest
    /// (`vcpu::events::plan_entry`; SDM Vol. 3C 26.6.5, 27.6).
    #[inline(never)]
    fn prepare_events(&mut self) {
        let intr = self.read_hot(guest::INTERRUPTIBILITY_STATE);
        let rflags = self.read_hot(guest::RFLAGS);
        let parked = self.read_hot(guest::ACTIVITY_STATE) == ACTIVITY_WAIT_SIPI;
        let shadow = intr & (BLOCKING_STI | BLOCKING_MOV_SS) != 0 || parked;
        let blocked =
            Blocking { interrupt: rflags & RFLAGS_IF == 0 || shadow, nmi: intr & BLOCKING_NMI != 0 || shadow };
        let plan = events::plan_entry(&mut self.injected, &mut self.queue, blocked, self.want);
        if let Some(ev) = plan.event {
            self.write_injection(ev);
        } else if self.entry_event {
            self.write_hot(control::VMENTRY_INTERRUPTION_INFO_FIELD, 0);
            self.entry_event = false;
        }
        let mut proc = self.ctl.proc;
        if plan.windows.interrupt {
            proc |= controls::INTERRUPT_WINDOW;
        }
        if plan.windows.nmi {
            proc |= controls::NMI_WINDOW;
        }
        if proc != self.proc_now {
            self.write_hot(control::PRIMARY_PROCBASED_EXEC_CONTROLS, proc as u64);
            self.proc_now = proc;
        }
        self.event_work = self.injected.is_some()
            || !self.queue.is_empty()
            || self.want != Windows::default()
            || self.proc_now != self.ctl.proc
            || self.entry_event;
    }

    /// The VM-entry interruption information for `ev` (SDM Vol. 3C 25.8.3).
    /// Software interrupts carry their instruction's length: INT3 and INTO
    /// (one byte, vectors 3 and 4) are software exceptions, INT1 (one byte,
    /// vector 1) a privileged software exception, the rest INT n.
    fn write_injection(&mut self, ev: Event) {
        let protected = self.read_hot(guest::CR0) & CR0_PE != 0;
        let (vector, kind) = match ev {
            Event::Exception { vector, .. } => (vector, TYPE_HW_EXCEPTION),
            Event::Interrupt { vector } => (vector, TYPE_EXTERNAL),
            Event::Nmi => (2, TYPE_NMI),
            Event::SoftwareInterrupt { vector, len } => {
                self.write_hot(control::VMENTRY_INSTRUCTION_LEN, len as u64);
                let kind = match (vector, len) {
                    (1, 1) => TYPE_PRIV_SOFT_EXCEPTION,
                    (3 | 4, 1) => TYPE_SOFT_EXCEPTION,
                    _ => TYPE_SOFT_INT,
                };
                (vector, kind)
            }
        };
        let mut info = INTR_VALID | (kind << 8) | vector as u64;
        if let Some(code) = ev.delivered_error_code(protected) {
            info |= INTR_ERROR_CODE;
            self.write_hot(control::VMENTRY_EXCEPTION_ERR_CODE, code as u64);
        }
        self.write_hot(control::VMENTRY_INTERRUPTION_INFO_FIELD, info);
        self.entry_event = true;
    }

    fn activity(&self) -> u64 {
        self.read(guest::ACTIVITY_STATE)
    }

    /// Writes DR0-DR3 and DR6 into the CPU unless they are already there.
    fn load_debug_registers(&mut self) {
        if vcpu::cpu_local::get().dr_owner.load(Ordering::Relaxed) != self.vmcs.0 {
            for (n, &v) in self.dr.iter().enumerate() {
                // SAFETY: values checked canonical by `set_state`/the MOV DR
                // handler; the host runs with breakpoints disabled.
                unsafe { hw::write_dr(n as u8, v) };
            }
            // SAFETY: bits 63:32 checked clear.
            unsafe { hw::write_dr(6, self.dr6) };
            vcpu::cpu_local::get().dr_owner.store(self.vmcs.0, Ordering::Relaxed);
        }
    }

    /// Guest DR6: the CPU's while this vCPU is loaded (a #DB in the guest
    /// changes it without an exit).
    fn guest_dr6(&self) -> u64 {
        if self.loaded && vcpu::cpu_local::get().dr_owner.load(Ordering::Relaxed) == self.vmcs.0 {
            hw::read_dr(6)
        } else {
            self.dr6
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

    /// Makes the host's XCR0 the guest's, or back.
    fn switch_xcr0(&self, to: u64) {
        if let Some(host) = self.host.xcr0
            && host != self.xcr0
        {
            // SAFETY: the host turned CR4.OSXSAVE on; both values were
            // checked against the CPU's XCR0 mask.
            unsafe { hw::xsetbv0(to) };
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

    /// Keeps an event whose delivery the exit interrupted, to deliver it
    /// again first (SDM Vol. 3C 28.2.3, 29.2.3): the IDT-vectoring
    /// information has the entry field's format; a software interrupt's
    /// instruction length is the exit's.
    fn requeue_interrupted_event(&mut self) {
        let info = self.read(ro::IDT_VECTORING_INFO);
        if info & INTR_VALID == 0 {
            return;
        }
        let vector = info as u8;
        self.event_work = true;
        self.injected = Some(match (info >> 8) & 7 {
            TYPE_EXTERNAL => Event::Interrupt { vector },
            TYPE_NMI => Event::Nmi,
            TYPE_SOFT_INT | TYPE_PRIV_SOFT_EXCEPTION | TYPE_SOFT_EXCEPTION => {
                Event::SoftwareInterrupt { vector, len: self.read(ro::VMEXIT_INSTRUCTION_LEN) as u8 }
            }
            _ => Event::Exception {
                vector,
                error_code: (info & INTR_ERROR_CODE != 0).then(|| self.read(ro::IDT_VECTORING_ERR_CODE) as u32),
            },
        });
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
        if self.event_work {
            self.prepare_events();
        }
        // SAFETY: the VMCS is current, complete (`setup`), and HOST_RIP is
        // `vmx_exit`; `gprs` lives as long as the call.
        let rc = unsafe {
            if !self.ctl.saves_timer {
                let left = self.deadline.saturating_sub(core::arch::x86_64::_rdtsc()) >> self.ctl.timer_rate;
                vmwrite(guest::VMX_PREEMPTION_TIMER_VALUE, left.min(u32::MAX as u64));
            }
            vmwrite(guest::RSP, self.gprs.rsp);
            self.cr2.load(&mut hw::Cr2);
            let rc = entry::vmx_run(&mut self.gprs, self.launched.get() as u64);
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
        self.launched.set(true);
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
                match e {
                    VmExit::ExternalInterrupt { vector: Some(vcpu::machine_check::VECTOR) } => {
                        vcpu::machine_check::deliver_to_host()
                    }
                    // Acknowledged by the exit: the host's handler runs now.
                    VmExit::ExternalInterrupt { vector: Some(v) } => vcpu::host_interrupt::deliver_to_host(v),
                    _ => {}
                }
                e
            }
            Decoded::InterruptWindow => {
                self.want.interrupt = false;
                self.event_work = true;
                VmExit::InterruptWindow
            }
            Decoded::NmiWindow => {
                self.want.nmi = false;
                self.event_work = true;
                VmExit::NmiWindow
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
            Decoded::EferWrite { value } => {
                match self.write_efer(value) {
                    Ok(()) => self.skip_instruction(),
                    Err(ev) => self.inject(ev),
                }
                VmExit::Handled(decode::handled_kind(&decoded))
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
        if intr & (BLOCKING_STI | BLOCKING_MOV_SS) != 0 {
            self.write_hot(guest::INTERRUPTIBILITY_STATE, intr & !(BLOCKING_STI | BLOCKING_MOV_SS));
        }
    }

    fn complete_emulated(&mut self, rip: u64, rflags: u64) {
        self.write_hot(guest::RIP, rip);
        self.write_hot(guest::RFLAGS, rflags);
        let intr = self.read_hot(guest::INTERRUPTIBILITY_STATE);
        if intr & (BLOCKING_STI | BLOCKING_MOV_SS) != 0 {
            self.write_hot(guest::INTERRUPTIBILITY_STATE, intr & !(BLOCKING_STI | BLOCKING_MOV_SS));
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
        s.cr8 = self.cr8;
        s.dr = self.dr;
        s.dr6 = self.guest_dr6();
        s.dr7 = self.read(guest::DR7);
        s.efer = self.read(guest::IA32_EFER_FULL);
        s.pat = self.read(guest::IA32_PAT_FULL);
        s.gdtr = DescriptorTable { base: self.read(guest::GDTR_BASE), limit: self.read(guest::GDTR_LIMIT) as u16 };
        s.idtr = DescriptorTable { base: self.read(guest::IDTR_BASE), limit: self.read(guest::IDTR_LIMIT) as u16 };
        s.sysenter_cs = self.read(guest::IA32_SYSENTER_CS);
        s.sysenter_esp = self.read(guest::IA32_SYSENTER_ESP);
        s.sysenter_eip = self.read(guest::IA32_SYSENTER_EIP);
        let (lazy, tsc_aux) = if self.loaded {
            // SAFETY: these MSRs exist on every x86-64 CPU.
            let lazy = LAZY_MSRS.map(|m| unsafe { hw::rdmsr(m) });
            // SAFETY: read only when the CPU has it.
            (lazy, if self.host.tsc_aux { unsafe { hw::rdmsr(IA32_TSC_AUX) } } else { self.tsc_aux })
        } else {
            (self.lazy_msrs, self.tsc_aux)
        };
        [s.kernel_gs_base, s.star, s.lstar, s.cstar, s.sfmask] = lazy;
        s.tsc_aux = tsc_aux;
        s.xcr0 = self.xcr0;
        s.fpu = self.guest_fpu();
        s.tsc_offset = self.read(control::TSC_OFFSET_FULL);
        s.activity = match self.activity() {
            ACTIVITY_HLT => Activity::Halted,
            ACTIVITY_WAIT_SIPI => Activity::WaitForSipi,
            _ => Activity::Active,
        };
        let intr = self.read(guest::INTERRUPTIBILITY_STATE);
        s.interrupt_shadow = intr & (BLOCKING_STI | BLOCKING_MOV_SS) != 0;
        s.nmi_blocked = intr & BLOCKING_NMI != 0;
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
            return Err(Error::InvalidState(String::from("IA32_TSC_AUX: this CPU cannot give guests RDTSCP")));
        }
        let activity = match s.activity {
            Activity::Active => ACTIVITY_ACTIVE,
            Activity::Halted if self.ctl.activity_hlt => ACTIVITY_HLT,
            Activity::WaitForSipi if self.ctl.activity_wait_sipi => ACTIVITY_WAIT_SIPI,
            a => return Err(Error::InvalidState(format!("activity state {a:?}: this CPU cannot enter it"))),
        };
        let mut check = s.clone();
        check.cr0 = self.ctl.real_cr0(s.cr0);
        check.cr4 = self.ctl.real_cr4(s.cr4);
        let efer_lma = s.efer & EFER_LMA != 0;
        let ctx = EntryContext { ia32e_guest: efer_lma, ..self.entry_context() };
        if let Some(p) = check_guest_state(&check, &ctx).into_iter().next() {
            return Err(Error::InvalidState(p));
        }
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
        self.cr8 = s.cr8;
        self.write(guest::DR7, s.dr7);
        self.set_efer(s.efer);
        self.write(guest::IA32_PAT_FULL, s.pat);
        self.write(guest::GDTR_BASE, s.gdtr.base);
        self.write(guest::GDTR_LIMIT, s.gdtr.limit as u64);
        self.write(guest::IDTR_BASE, s.idtr.base);
        self.write(guest::IDTR_LIMIT, s.idtr.limit as u64);
        self.write(guest::IA32_SYSENTER_CS, s.sysenter_cs);
        self.write(guest::IA32_SYSENTER_ESP, s.sysenter_esp);
        self.write(guest::IA32_SYSENTER_EIP, s.sysenter_eip);
        self.write(control::TSC_OFFSET_FULL, s.tsc_offset);
        self.write(guest::ACTIVITY_STATE, activity);
        // Blocking by STI needs RFLAGS.IF = 1 (SDM Vol. 3C 27.3.1.5); the
        // neutral shadow is either, so one with IF = 0 is MOV SS's.
        let shadow = match (s.interrupt_shadow, s.interrupts_enabled()) {
            (false, _) => 0,
            (true, true) => BLOCKING_STI,
            (true, false) => BLOCKING_MOV_SS,
        };
        self.write(guest::INTERRUPTIBILITY_STATE, shadow | if s.nmi_blocked { BLOCKING_NMI } else { 0 });
        self.write(guest::PENDING_DBG_EXCEPTIONS, 0);
        self.lazy_msrs = [s.kernel_gs_base, s.star, s.lstar, s.cstar, s.sfmask];
        self.tsc_aux = s.tsc_aux;
        self.fx.0 = s.fpu.to_fxsave();
        self.dr = s.dr;
        self.dr6 = s.dr6;
        let old_xcr0 = self.xcr0;
        self.xcr0 = s.xcr0;
        if self.loaded {
            // SAFETY: the guest's own values for MSRs the host never uses,
            // an FXSAVE image with MXCSR checked against the CPU's mask,
            // checked debug-register values and XCR0.
            unsafe {
                for (m, v) in LAZY_MSRS.iter().zip(self.lazy_msrs) {
                    hw::wrmsr(*m, v);
                }
                if self.host.tsc_aux {
                    hw::wrmsr(IA32_TSC_AUX, self.tsc_aux);
                }
                hw::fxrstor(self.fx.0.as_ptr());
                if self.host.xcr0.is_some() && old_xcr0 != self.xcr0 {
                    hw::xsetbv0(self.xcr0);
                }
            }
            vcpu::cpu_local::get().dr_owner.store(0, Ordering::Relaxed);
            self.load_debug_registers();
        }
        self.write(control::VMENTRY_INTERRUPTION_INFO_FIELD, 0);
        self.entry_event = false;
        self.injected = s.injected_event;
        self.queue = s.pending_events;
        self.event_work = true;
        Ok(())
    }

    fn reg(&self, r: Reg) -> u64 {
        match r {
            Reg::Cr0 => self.guest_cr0(),
            Reg::Cr3 => self.read(guest::CR3),
            Reg::Cr4 => self.guest_cr4(),
            Reg::Cr8 => self.cr8,
            Reg::Dr0 => self.dr[0],
            Reg::Dr1 => self.dr[1],
            Reg::Dr2 => self.dr[2],
            Reg::Dr3 => self.dr[3],
            Reg::Dr6 => self.guest_dr6(),
            Reg::Dr7 => self.read(guest::DR7),
            Reg::Efer => self.read(guest::IA32_EFER_FULL),
            Reg::Xcr0 => self.xcr0,
            Reg::TscOffset => self.read(control::TSC_OFFSET_FULL),
        }
    }

    fn set_reg(&mut self, r: Reg, v: u64) {
        let dr = |n: u8, this: &mut Self| {
            if n == 6 {
                this.dr6 = v;
            } else {
                this.dr[n as usize] = v;
            }
            if this.loaded && vcpu::cpu_local::get().dr_owner.load(Ordering::Relaxed) == this.vmcs.0 {
                // SAFETY: the caller checked the value as MOV DR would.
                unsafe { hw::write_dr(n, v) };
            }
        };
        match r {
            Reg::Cr0 => {
                self.set_cr0(v);
                self.flush_guest_tlb();
            }
            Reg::Cr3 => {
                self.write(guest::CR3, v);
                self.flush_guest_tlb();
            }
            Reg::Cr4 => {
                self.set_cr4(v);
                self.flush_guest_tlb();
            }
            Reg::Cr8 => self.cr8 = v & 0xf,
            Reg::Dr0 => dr(0, self),
            Reg::Dr1 => dr(1, self),
            Reg::Dr2 => dr(2, self),
            Reg::Dr3 => dr(3, self),
            Reg::Dr6 => dr(6, self),
            Reg::Dr7 => self.write(guest::DR7, v),
            Reg::Efer => self.set_efer(v),
            Reg::Xcr0 => {
                if self.loaded && self.host.xcr0.is_some() && v != self.xcr0 {
                    // SAFETY: the caller checked `v` against the XCR0 mask.
                    unsafe { hw::xsetbv0(v) };
                }
                self.xcr0 = v;
            }
            Reg::TscOffset => self.write(control::TSC_OFFSET_FULL, v),
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
        self.read(guest::RFLAGS) & RFLAGS_IF != 0
            && self.read(guest::INTERRUPTIBILITY_STATE) & (BLOCKING_STI | BLOCKING_MOV_SS) == 0
            && self.activity() != ACTIVITY_WAIT_SIPI
            && self.injected.is_none()
            && self.queue.is_empty()
    }

    fn request_nmi_window(&mut self) {
        self.want.nmi = true;
        self.event_work = true;
    }

    fn nmi_window_open(&self) -> bool {
        self.read(guest::INTERRUPTIBILITY_STATE) & (BLOCKING_STI | BLOCKING_MOV_SS | BLOCKING_NMI) == 0
            && self.activity() != ACTIVITY_WAIT_SIPI
            && self.injected.is_none()
            && !self.queue.has_nmi()
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

    fn release(&mut self) {
        let here = vcpu::cpu_local::get();
        if self.active_on.get() != here.index {
            return;
        }
        // SAFETY: the VMCS is ours and active on this CPU; VMCLEAR writes
        // its data back to memory and makes it clear (not launched), so any
        // CPU may load it next (SDM Vol. 3C 25.11.1).
        if unsafe { hw::vmclear(self.vmcs.0) }.is_ok() {
            self.active_on.set(NO_CPU);
            self.launched.set(false);
            let _ = here.current_vmcs.compare_exchange(self.vmcs.0, 0, Ordering::Relaxed, Ordering::Relaxed);
        }
        // DR0-DR3 and DR6 here stop being the vCPU's: it may change them
        // elsewhere.
        let _ = here.dr_owner.compare_exchange(self.vmcs.0, 0, Ordering::Relaxed, Ordering::Relaxed);
    }

    fn load(&mut self) {
        self.make_current();
        // SAFETY: the FXSAVE image is ours and valid (MXCSR checked); the
        // lazy MSRs, TSC_AUX and XCR0's guest value are not used by the
        // host, so loading guest values there is harmless.
        unsafe {
            hw::fxrstor(self.fx.0.as_ptr());
            for (m, v) in LAZY_MSRS.iter().zip(self.lazy_msrs) {
                hw::wrmsr(*m, v);
            }
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
        // SAFETY: saving into our own aligned area and reading MSRs.
        unsafe {
            hw::fxsave(self.fx.0.as_mut_ptr());
            self.lazy_msrs = LAZY_MSRS.map(|m| hw::rdmsr(m));
            if self.host.tsc_aux {
                self.tsc_aux = hw::rdmsr(IA32_TSC_AUX);
            }
        }
        self.dr6 = self.guest_dr6();
        if let Some(host) = self.host.xcr0 {
            self.switch_xcr0(host);
        }
        self.loaded = false;
    }
}
