//! The one interface between the hypervisor and its hardware backends
//! (`vmx/` for Intel VT-x, `svm/` for AMD-V). Everything above the backends
//! speaks only these types: a vCPU runs until an exit that is already
//! decoded, its architectural state has one neutral representation (so a
//! state saved on one vendor loads on the other), and events are injected
//! the same way on both.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod exit;
pub mod state;
pub mod walk;

pub use exit::{ExitKind, IoAccess, MemAccess, VmExit};
pub use state::{Activity, DescriptorTable, Event, Gprs, GuestState, SegAttrs, Segment};

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

    /// The complete architectural state.
    fn state(&self) -> GuestState;
    /// Replaces the complete architectural state.
    fn set_state(&mut self, state: &GuestState) -> Result<(), Error>;

    /// Delivers `event` at the next entry.
    fn inject(&mut self, event: Event);

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
    fn state(&self) -> GuestState {
        (**self).state()
    }
    fn set_state(&mut self, state: &GuestState) -> Result<(), Error> {
        (**self).set_state(state)
    }
    fn inject(&mut self, event: Event) {
        (**self).inject(event)
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
