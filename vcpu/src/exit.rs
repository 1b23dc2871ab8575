//! Exits, decoded by the backend into what the handler needs.

use alloc::string::String;

/// A port access. For `in`, the handler writes the value into RAX (the low
/// `size` bytes); for `out`, the value is in RAX.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoAccess {
    pub port: u16,
    /// 1, 2 or 4 bytes.
    pub size: u8,
    pub write: bool,
    /// INS/OUTS (string forms).
    pub string: bool,
    pub rep: bool,
}

/// How the guest touched memory in a nested page fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemAccess {
    Read,
    Write,
    Execute,
}

impl MemAccess {
    pub fn as_str(self) -> &'static str {
        match self {
            MemAccess::Read => "read",
            MemAccess::Write => "write",
            MemAccess::Execute => "instruction fetch",
        }
    }
}

/// What a control-register exit was (SDM Vol. 3C table 28-3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrAccess {
    /// MOV to CRn from general-purpose register `gpr`.
    MovTo {
        gpr: u8,
    },
    /// MOV from CRn to `gpr`.
    MovFrom {
        gpr: u8,
    },
    Clts,
    /// LMSW with this 16-bit source.
    Lmsw {
        value: u16,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// CPUID; leaf and subleaf are in RAX and RCX.
    Cpuid,
    Io(IoAccess),
    Hlt,
    /// VMCALL (VT-x) or VMMCALL (AMD-V).
    Hypercall,
    Rdmsr {
        msr: u32,
    },
    Wrmsr {
        msr: u32,
        value: u64,
    },
    /// A guest-physical access the nested page table does not allow.
    NestedPageFault {
        gpa: u64,
        access: MemAccess,
        gva: Option<u64>,
    },
    /// A host interrupt arrived while the guest ran (the backend has
    /// acknowledged it when the hardware does so on exit).
    ExternalInterrupt {
        vector: Option<u8>,
    },
    /// The time slice given by `set_time_slice` ran out.
    Preempted,
    /// The guest shut down (triple fault); the guest is dead.
    Shutdown {
        report: String,
    },
    /// The hardware refused to enter the guest; names the field or state.
    EntryFailed {
        report: String,
    },
    /// The guest can take an external interrupt now (asked for with
    /// `request_interrupt_window`, or armed by the backend for a queued
    /// interrupt, which goes in at the next entry).
    InterruptWindow,
    /// The guest can take an NMI now.
    NmiWindow,
    /// A control-register access that exited (VT-x: CR0/CR4 bits the
    /// guest/host masks own, CR3 and CR8 if their exiting is on; AMD-V
    /// intercepts none, see `svm::vmcb`). RIP is at the instruction.
    CrAccess {
        cr: u8,
        access: CrAccess,
    },
    /// MOV to (`write`) or from DR`dr`, with general-purpose register `gpr`.
    DrAccess {
        dr: u8,
        gpr: u8,
        write: bool,
    },
    /// XSETBV: XCR index in ECX, value in EDX:EAX.
    Xsetbv,
    /// WBINVD, or INVD (`invd`).
    CacheFlush {
        invd: bool,
    },
    /// An INIT signal arrived.
    Init,
    /// A startup IPI with this vector arrived while waiting for one.
    Sipi {
        vector: u8,
    },
    /// PAUSE (in a spin loop).
    Pause,
    /// MONITOR or MWAIT, which guests are told they do not have.
    MonitorMwait,
    /// The guest raised #UD (intercepted: a guest saved under the other
    /// vendor uses its hypercall instruction, VMCALL or VMMCALL, which is
    /// #UD here). RIP is at the instruction; reflect the #UD otherwise.
    InvalidOpcode,
    /// The backend handled the exit itself (kept for the statistics).
    Handled(ExitKind),
    /// Anything else; ends the VM with this report.
    Unexpected {
        report: String,
    },
}

/// Exit classes for statistics: cheap to count, stable names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum ExitKind {
    Cpuid,
    Io,
    Hlt,
    Hypercall,
    Rdmsr,
    Wrmsr,
    NestedPageFault,
    ExternalInterrupt,
    Preempted,
    Shutdown,
    EntryFailed,
    ControlRegister,
    InterruptWindow,
    NmiWindow,
    DebugRegister,
    Xsetbv,
    CacheFlush,
    InitSipi,
    Pause,
    MonitorMwait,
    InvalidOpcode,
    Unexpected,
}

impl ExitKind {
    pub const COUNT: usize = 22;
    pub const ALL: [ExitKind; Self::COUNT] = [
        ExitKind::Cpuid,
        ExitKind::Io,
        ExitKind::Hlt,
        ExitKind::Hypercall,
        ExitKind::Rdmsr,
        ExitKind::Wrmsr,
        ExitKind::NestedPageFault,
        ExitKind::ExternalInterrupt,
        ExitKind::Preempted,
        ExitKind::Shutdown,
        ExitKind::EntryFailed,
        ExitKind::ControlRegister,
        ExitKind::InterruptWindow,
        ExitKind::NmiWindow,
        ExitKind::DebugRegister,
        ExitKind::Xsetbv,
        ExitKind::CacheFlush,
        ExitKind::InitSipi,
        ExitKind::Pause,
        ExitKind::MonitorMwait,
        ExitKind::InvalidOpcode,
        ExitKind::Unexpected,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ExitKind::Cpuid => "cpuid",
            ExitKind::Io => "io",
            ExitKind::Hlt => "hlt",
            ExitKind::Hypercall => "hypercall",
            ExitKind::Rdmsr => "rdmsr",
            ExitKind::Wrmsr => "wrmsr",
            ExitKind::NestedPageFault => "nested_page_fault",
            ExitKind::ExternalInterrupt => "external_interrupt",
            ExitKind::Preempted => "preempted",
            ExitKind::Shutdown => "shutdown",
            ExitKind::EntryFailed => "entry_failed",
            ExitKind::ControlRegister => "control_register",
            ExitKind::InterruptWindow => "interrupt_window",
            ExitKind::NmiWindow => "nmi_window",
            ExitKind::DebugRegister => "debug_register",
            ExitKind::Xsetbv => "xsetbv",
            ExitKind::CacheFlush => "wbinvd",
            ExitKind::InitSipi => "init_sipi",
            ExitKind::Pause => "pause",
            ExitKind::MonitorMwait => "monitor_mwait",
            ExitKind::InvalidOpcode => "invalid_opcode",
            ExitKind::Unexpected => "unexpected",
        }
    }
}

impl VmExit {
    pub fn kind(&self) -> ExitKind {
        match self {
            VmExit::Cpuid => ExitKind::Cpuid,
            VmExit::Io(_) => ExitKind::Io,
            VmExit::Hlt => ExitKind::Hlt,
            VmExit::Hypercall => ExitKind::Hypercall,
            VmExit::Rdmsr { .. } => ExitKind::Rdmsr,
            VmExit::Wrmsr { .. } => ExitKind::Wrmsr,
            VmExit::NestedPageFault { .. } => ExitKind::NestedPageFault,
            VmExit::ExternalInterrupt { .. } => ExitKind::ExternalInterrupt,
            VmExit::Preempted => ExitKind::Preempted,
            VmExit::Shutdown { .. } => ExitKind::Shutdown,
            VmExit::EntryFailed { .. } => ExitKind::EntryFailed,
            VmExit::InterruptWindow => ExitKind::InterruptWindow,
            VmExit::NmiWindow => ExitKind::NmiWindow,
            VmExit::CrAccess { .. } => ExitKind::ControlRegister,
            VmExit::DrAccess { .. } => ExitKind::DebugRegister,
            VmExit::Xsetbv => ExitKind::Xsetbv,
            VmExit::CacheFlush { .. } => ExitKind::CacheFlush,
            VmExit::Init | VmExit::Sipi { .. } => ExitKind::InitSipi,
            VmExit::Pause => ExitKind::Pause,
            VmExit::MonitorMwait => ExitKind::MonitorMwait,
            VmExit::InvalidOpcode => ExitKind::InvalidOpcode,
            VmExit::Handled(k) => *k,
            VmExit::Unexpected { .. } => ExitKind::Unexpected,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_indexable_and_named_uniquely() {
        for (i, k) in ExitKind::ALL.iter().enumerate() {
            assert_eq!(*k as usize, i);
        }
        let mut names: alloc::vec::Vec<_> = ExitKind::ALL.iter().map(|k| k.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), ExitKind::COUNT);
    }
}
