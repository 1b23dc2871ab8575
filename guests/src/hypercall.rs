//! The hypercall ABI as guests see it (VMCALL/VMMCALL, RAX = function,
//! RDI/RSI = arguments, result in RAX). Mirrors `hypervisor::hypercall`.

pub const PING: u64 = 0;
pub const VM_ID: u64 = 1;
pub const STAT: u64 = 2;
/// Pages of guest-physical [RDI, RDI + RSI) mapped to a shared or the zero
/// frame. One call looks at a bounded part of the range and returns RDI and
/// RSI advanced past it: call again, adding up RAX, until RSI is 0.
pub const SHARED_IN_RANGE: u64 = 3;
/// Queues external interrupt RDI (32-255) for this vCPU: delivered when
/// it can take one (RFLAGS.IF = 1, no STI/MOV SS shadow).
pub const QUEUE_INTERRUPT: u64 = 4;
/// Queues an NMI for this vCPU: delivered when no NMI handler runs.
pub const QUEUE_NMI: u64 = 5;
/// What PING returns: "HVOK".
pub const PING_REPLY: u64 = 0x4b4f_5648;
/// Returned for an unknown function.
pub const UNKNOWN: u64 = u64::MAX;
/// STAT argument: total exits of this VM.
pub const STAT_EXITS: u64 = 0;
/// STAT argument: HLT exits of this VM.
pub const STAT_HLT: u64 = 1;
/// STAT argument: this VM's 4 KiB pages currently backed by a shared
/// (copy-on-write) frame, the zero frame included.
pub const STAT_SHARED_PAGES: u64 = 2;
/// STAT argument: this VM's pages currently swapped out to the host's swap
/// disk.
pub const STAT_SWAPPED_PAGES: u64 = 3;
/// STAT argument: pages swapped back in on fault since the VM started.
pub const STAT_PAGE_INS: u64 = 4;
/// The vendor signature in CPUID 0x40000000 EBX:ECX:EDX.
pub const SIGNATURE: &[u8; 12] = b"RustyHVType1";
