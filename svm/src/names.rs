//! Names of #VMEXIT codes (APM Vol. 2 appendix C), for reports.

pub const DR_READ: u64 = 0x20;
/// Exception intercepts are 0x40 + vector: #UD.
pub const EXCP_UD: u64 = 0x46;
/// Exception 18 (#MC), intercepted (APM Vol. 2 table C-1: 0x40 + vector).
pub const EXCP_MC: u64 = 0x52;
pub const DR_WRITE: u64 = 0x30;
pub const INIT: u64 = 0x63;
pub const VINTR: u64 = 0x64;
pub const CPUID: u64 = 0x72;
pub const IRET: u64 = 0x74;
pub const PAUSE: u64 = 0x77;
pub const WBINVD: u64 = 0x89;
pub const INVD: u64 = 0x76;
pub const HLT: u64 = 0x78;
pub const INVLPGA: u64 = 0x7a;
pub const IOIO: u64 = 0x7b;
pub const MSR: u64 = 0x7c;
pub const TASK_SWITCH: u64 = 0x7d;
pub const SHUTDOWN: u64 = 0x7f;
pub const VMRUN: u64 = 0x80;
pub const VMMCALL: u64 = 0x81;
pub const VMLOAD: u64 = 0x82;
pub const VMSAVE: u64 = 0x83;
pub const STGI: u64 = 0x84;
pub const CLGI: u64 = 0x85;
pub const SKINIT: u64 = 0x86;
pub const ICEBP: u64 = 0x88;
pub const MONITOR: u64 = 0x8a;
pub const MWAIT: u64 = 0x8b;
pub const MWAIT_ARMED: u64 = 0x8c;
pub const XSETBV: u64 = 0x8d;
pub const RDPRU: u64 = 0x8e;
pub const INTR: u64 = 0x60;
pub const NMI: u64 = 0x61;
pub const NPF: u64 = 0x400;
/// VMRUN refused the guest state (consistency checks, APM 15.5.1).
pub const INVALID: u64 = u64::MAX;
/// -2: the VMCB is in use by another CPU (or a busy SEV guest).
pub const BUSY: u64 = u64::MAX - 1;

pub fn exit_code(code: u64) -> &'static str {
    match code {
        0x00..=0x0f => "CR read",
        0x10..=0x1f => "CR write",
        0x20..=0x2f => "DR read",
        0x30..=0x3f => "DR write",
        0x40..=0x5f => "exception",
        INTR => "INTR",
        NMI => "NMI",
        0x62 => "SMI",
        INIT => "INIT",
        VINTR => "VINTR",
        0x65 => "CR0 selective write",
        0x66..=0x71 => "descriptor-table or flag access",
        CPUID => "CPUID",
        0x73 => "RSM",
        IRET => "IRET",
        0x75 => "software interrupt",
        INVD => "INVD",
        PAUSE => "PAUSE",
        HLT => "HLT",
        0x79 => "INVLPG",
        INVLPGA => "INVLPGA",
        IOIO => "I/O",
        MSR => "MSR",
        TASK_SWITCH => "task switch",
        0x7e => "FERR freeze",
        SHUTDOWN => "shutdown",
        VMRUN => "VMRUN",
        VMMCALL => "VMMCALL",
        VMLOAD => "VMLOAD",
        VMSAVE => "VMSAVE",
        STGI => "STGI",
        CLGI => "CLGI",
        SKINIT => "SKINIT",
        0x87 => "RDTSCP",
        ICEBP => "ICEBP",
        WBINVD => "WBINVD",
        MONITOR => "MONITOR",
        MWAIT => "MWAIT",
        MWAIT_ARMED => "MWAIT (armed)",
        XSETBV => "XSETBV",
        RDPRU => "RDPRU",
        0x8f => "EFER write trap",
        NPF => "nested page fault",
        INVALID => "VMEXIT_INVALID",
        BUSY => "VMEXIT_BUSY",
        _ => "unknown",
    }
}
