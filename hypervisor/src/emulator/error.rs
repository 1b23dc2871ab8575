//! Why an instruction was not emulated. Each refusal is one variant; the
//! caller asks [`Error::fault`] whether hardware would raise an exception
//! (inject it) or whether the emulator simply cannot go on (stop the VM
//! with the `Display` text as the report). No variant holds a string, so
//! building one costs nothing on the exit path.

use core::fmt;

use iced_x86::Mnemonic;
use vcpu::Event;

/// A refused instruction. The guest's registers, RIP, RFLAGS, memory and
/// devices are untouched when `emulate` returns one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// Fetching the instruction or translating an operand's address found
    /// no valid translation: inject #PF with this error code and CR2 = `gva`
    /// (SDM Vol. 3A 4.7).
    PageFault { gva: u64, error_code: u32 },
    /// The bytes at RIP are not a valid instruction, or a LOCK prefix where
    /// it is not allowed: #UD (SDM Vol. 2B, "LOCK").
    InvalidOpcode,
    /// The instruction is longer than 15 bytes: #GP(0) (SDM Vol. 3A,
    /// "Interrupt 13—General Protection Exception").
    TooLong,
    /// A 64-bit linear address is not canonical: #GP(0), or #SS(0) if it
    /// goes through SS (SDM Vol. 1 3.3.7.1).
    NonCanonical { stack: bool },
    /// The exit was an instruction fetch from MMIO: code cannot run there.
    FetchFromMmio,
    /// The instruction's bytes are not all in guest RAM (or ROM).
    CodeNotInRam { gpa: u64 },
    /// A valid instruction the emulator does not implement on MMIO.
    NotEmulated { mnemonic: Mnemonic },
    /// A VEX- or EVEX-encoded (AVX) instruction: not decoded, not emulated.
    VectorInstruction,
    /// An instruction it implements, with an operand it does not (a
    /// segment, control, vector or x87 register, an unusual memory size).
    UnsupportedOperand { mnemonic: Mnemonic },
    /// A LOCK-prefixed read-modify-write: the device read and write are two
    /// bus accesses here, not one atomic one, so it is refused rather than
    /// run with weaker semantics than the guest asked for.
    Locked,
    /// No memory operand of the instruction falls in the page of the exit,
    /// or it does not make the access the exit reported: the bytes changed
    /// since the exit, or the decoder and the CPU disagree.
    NotTheFaultingAccess,
    /// The MMIO access crosses a page boundary.
    SplitAccess { gva: u64 },
    /// The other memory operand of a string instruction is neither RAM nor
    /// the faulting MMIO page.
    NotRam { gpa: u64 },
    /// The instruction at RIP is not the INS/OUTS the port exit reported
    /// (another instruction, port, width or direction).
    NotThePortExit,
}

impl Error {
    /// The exception hardware would raise for this instruction, or `None`
    /// when the VM should be stopped with a report instead. For a page
    /// fault the caller also sets CR2 to the faulting address.
    pub fn fault(&self) -> Option<Event> {
        match *self {
            Error::PageFault { error_code, .. } => Some(Event::Exception { vector: 14, error_code: Some(error_code) }),
            Error::InvalidOpcode => Some(Event::UD),
            Error::TooLong => Some(Event::GP0),
            Error::NonCanonical { stack: false } => Some(Event::GP0),
            Error::NonCanonical { stack: true } => Some(Event::Exception { vector: 12, error_code: Some(0) }),
            Error::FetchFromMmio
            | Error::CodeNotInRam { .. }
            | Error::NotEmulated { .. }
            | Error::VectorInstruction
            | Error::UnsupportedOperand { .. }
            | Error::Locked
            | Error::NotTheFaultingAccess
            | Error::SplitAccess { .. }
            | Error::NotRam { .. }
            | Error::NotThePortExit => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Error::PageFault { gva, error_code } => {
                write!(f, "Page fault at {gva:#x} (error code {error_code:#x})")
            }
            Error::InvalidOpcode => f.write_str("Invalid instruction"),
            Error::TooLong => f.write_str("Instruction longer than 15 bytes"),
            Error::NonCanonical { .. } => f.write_str("Non-canonical address"),
            Error::FetchFromMmio => f.write_str("Instruction fetch from MMIO"),
            Error::CodeNotInRam { gpa } => write!(f, "Instruction bytes at {gpa:#x} are not in guest memory"),
            Error::NotEmulated { .. } => f.write_str("Instruction not emulated on MMIO"),
            Error::VectorInstruction => f.write_str("VEX or EVEX instruction not emulated on MMIO"),
            Error::UnsupportedOperand { .. } => f.write_str("Operand not emulated on MMIO"),
            Error::Locked => f.write_str("Locked read-modify-write of MMIO"),
            Error::NotTheFaultingAccess => f.write_str("Instruction does not make the faulting MMIO access"),
            Error::SplitAccess { gva } => write!(f, "MMIO access at {gva:#x} crosses a page boundary"),
            Error::NotRam { gpa } => write!(f, "String operand at {gpa:#x} is neither RAM nor the MMIO page"),
            Error::NotThePortExit => f.write_str("Instruction is not the INS/OUTS the port exit reported"),
        }
    }
}
