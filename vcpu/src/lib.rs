//! The one interface between the hypervisor and its hardware backends
//! (`vmx/` for Intel VT-x, `svm/` for AMD-V). Everything above the backends
//! speaks only these types: a vCPU runs until an exit that is already
//! decoded, its architectural state has one neutral representation (so a
//! state saved on one vendor loads on the other), and events are injected
//! the same way on both.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod cpu_local;
pub mod events;
pub mod exit;
pub mod host_interrupt;
pub mod machine_check;
pub mod state;
pub mod walk;

pub use events::{Event, EventQueue};
pub use exit::{CrAccess, ExitKind, IoAccess, MemAccess, VmExit};
pub use state::{Activity, DescriptorTable, Fpu, Gprs, GuestState, SegAttrs, Segment};

/// A register the exit handlers emulate, read and written one at a time
/// through [`Vcpu::reg`] and [`Vcpu::set_reg`] (cheaper than a whole
/// [`GuestState`] on the exit path).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reg {
    Cr0,
    Cr3,
    Cr4,
    /// The task-priority register (bits 3:0).
    Cr8,
    Dr0,
    Dr1,
    Dr2,
    Dr3,
    Dr6,
    Dr7,
    Efer,
    Xcr0,
    /// The guest's TSC minus the host's (see [`GuestState::tsc_offset`]).
    TscOffset,
}

impl Reg {
    /// DR`n` for n in 0-3, 6 and 7.
    pub fn dr(n: u8) -> Option<Reg> {
        Some(match n {
            0 => Reg::Dr0,
            1 => Reg::Dr1,
            2 => Reg::Dr2,
            3 => Reg::Dr3,
            6 => Reg::Dr6,
            7 => Reg::Dr7,
            _ => return None,
        })
    }
}

/// Why a vCPU could not be created or could not take a state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    /// The host lacks a feature the backend needs; says which.
    Unsupported(&'static str),
    /// Host memory for the control structures ran out.
    OutOfMemory,
    /// The state cannot be loaded (names the field and why).
    InvalidState(alloc::string::String),
    /// A VMX/SVM instruction failed; the text names it and its error.
    Hardware(alloc::string::String),
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Error::Unsupported(what) => write!(f, "the CPU lacks {what}"),
            Error::OutOfMemory => write!(f, "out of host memory for vCPU control structures"),
            Error::InvalidState(why) => write!(f, "invalid guest state: {why}"),
            Error::Hardware(why) => write!(f, "{why}"),
        }
    }
}

/// A virtual CPU of one backend. Exits come back decoded; the caller handles
/// them with the accessors below and calls `run` again.
///
/// Contract: `run`, `rip`, `rflags`, `cpl`, `skip_instruction` and the
/// register accessors are the exit path; they may only be used between
/// `load` and `put`, when the backend's control structure is the CPU's
/// current one. The other methods work at any time.
pub trait Vcpu {
    /// Enters the guest and returns at the next exit the backend does not
    /// handle itself.
    fn run(&mut self) -> VmExit;

    /// General-purpose registers (cheap: kept in memory across exits).
    fn gprs(&self) -> &Gprs;
    fn gprs_mut(&mut self) -> &mut Gprs;

    fn rip(&self) -> u64;
    fn rflags(&self) -> u64;
    /// Current privilege level (from SS.DPL).
    fn cpl(&self) -> u8;
    /// Moves RIP past the instruction that caused the last exit.
    fn skip_instruction(&mut self);
    /// Ends an instruction the hypervisor emulated (an MMIO access): RIP
    /// and RFLAGS take the values it left, and an STI/MOV SS interrupt
    /// shadow ends with it.
    fn complete_emulated(&mut self, rip: u64, rflags: u64);

    /// The complete architectural state.
    fn state(&self) -> GuestState;
    /// Replaces the complete architectural state.
    fn set_state(&mut self, state: &GuestState) -> Result<(), Error>;

    /// A register the exit handlers emulate.
    fn reg(&self, r: Reg) -> u64;
    /// Writes one as the guest's instruction would have, after the caller
    /// checked the value against the architecture's rules. The backend keeps
    /// its own view consistent (VT-x: the CR0/CR4 read shadows, EFER.LMA with
    /// the IA-32e-mode entry control, a guest-TLB flush where a MOV to CR0,
    /// CR3 or CR4 would flush; DR0-DR3 in the CPU while the vCPU is loaded).
    fn set_reg(&mut self, r: Reg, value: u64);

    /// Queues `event`. Events are delivered one per entry, when the guest
    /// can take them, in the order of SDM Vol. 3A 6.9 (exceptions, then
    /// NMIs, then external interrupts); a second event never overwrites the
    /// first. An external interrupt waits for RFLAGS.IF = 1 and the end of
    /// an interrupt shadow, an NMI for the IRET of the NMI handler.
    fn inject(&mut self, event: Event);

    /// Asks for one [`VmExit::InterruptWindow`] as soon as the guest can take
    /// an external interrupt; at the next entry if it can now.
    fn request_interrupt_window(&mut self);
    /// Whether the guest can take an external interrupt at the next entry:
    /// RFLAGS.IF = 1, no STI/MOV SS shadow, nothing waiting for delivery.
    fn interrupt_window_open(&self) -> bool;
    /// Asks for one [`VmExit::NmiWindow`] as soon as the guest can take an
    /// NMI; at the next entry if it can now.
    fn request_nmi_window(&mut self);
    /// Whether the guest can take an NMI at the next entry: no NMI handler
    /// running, no shadow, no NMI waiting.
    fn nmi_window_open(&self) -> bool;

    /// Grants the vCPU `ticks` TSC ticks before `run` returns
    /// [`VmExit::Preempted`].
    fn set_time_slice(&mut self, ticks: u64);

    /// Host memory this vCPU's control structures use (bytes).
    fn overhead_bytes(&self) -> u64;

    /// Makes this vCPU the one that runs on this CPU next (before a series
    /// of `run` calls): loads its FPU/SSE state and lazily switched MSRs.
    fn load(&mut self);
    /// Saves what `load` loaded; another vCPU may run afterwards.
    fn put(&mut self);
    /// Lets the vCPU be used on another host CPU next: called (after `put`)
    /// on the CPU it last ran on, which gives up what it caches of the vCPU
    /// (VT-x: VMCLEAR writes the VMCS back to memory, SDM Vol. 3C 25.11.1;
    /// both: whose debug registers the CPU holds). Its next `load`, on any
    /// CPU, makes it that CPU's, flushing translations it may have left
    /// there earlier.
    fn release(&mut self);

    /// Drops cached nested translations for this vCPU (after the nested
    /// page table changed).
    fn flush_nested_tlb(&mut self, scope: mm::paging::FlushScope);
}

/// A boxed vCPU is a vCPU (backends keep their state on the heap).
impl<T: Vcpu + ?Sized> Vcpu for alloc::boxed::Box<T> {
    fn run(&mut self) -> VmExit {
        (**self).run()
    }
    fn gprs(&self) -> &Gprs {
        (**self).gprs()
    }
    fn gprs_mut(&mut self) -> &mut Gprs {
        (**self).gprs_mut()
    }
    fn rip(&self) -> u64 {
        (**self).rip()
    }
    fn rflags(&self) -> u64 {
        (**self).rflags()
    }
    fn cpl(&self) -> u8 {
        (**self).cpl()
    }
    fn skip_instruction(&mut self) {
        (**self).skip_instruction()
    }
    fn complete_emulated(&mut self, rip: u64, rflags: u64) {
        (**self).complete_emulated(rip, rflags)
    }
    fn state(&self) -> GuestState {
        (**self).state()
    }
    fn set_state(&mut self, state: &GuestState) -> Result<(), Error> {
        (**self).set_state(state)
    }
    fn reg(&self, r: Reg) -> u64 {
        (**self).reg(r)
    }
    fn set_reg(&mut self, r: Reg, value: u64) {
        (**self).set_reg(r, value)
    }
    fn inject(&mut self, event: Event) {
        (**self).inject(event)
    }
    fn request_interrupt_window(&mut self) {
        (**self).request_interrupt_window()
    }
    fn interrupt_window_open(&self) -> bool {
        (**self).interrupt_window_open()
    }
    fn request_nmi_window(&mut self) {
        (**self).request_nmi_window()
    }
    fn nmi_window_open(&self) -> bool {
        (**self).nmi_window_open()
    }
    fn release(&mut self) {
        (**self).release()
    }
    fn set_time_slice(&mut self, ticks: u64) {
        (**self).set_time_slice(ticks)
    }
    fn overhead_bytes(&self) -> u64 {
        (**self).overhead_bytes()
    }
    fn load(&mut self) {
        (**self).load()
    }
    fn put(&mut self) {
        (**self).put()
    }
    fn flush_nested_tlb(&mut self, scope: mm::paging::FlushScope) {
        (**self).flush_nested_tlb(scope)
    }
}
