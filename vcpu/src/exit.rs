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
    Unexpected,
}

impl ExitKind {
    pub const COUNT: usize = 13;
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
