//! Why a stream was refused (or could not be written), and where.

use alloc::string::String;
use core::fmt;

use crate::io::IoError;
use crate::record::Kind;

/// Where in a stream something went wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct At {
    /// The record's sequence number (0 is the configuration).
    pub record: u32,
    /// Byte offset in the stream: of the record, or of the memory entry
    /// inside it that was refused.
    pub offset: u64,
    /// The record's kind, once its frame header has been read.
    pub kind: Option<Kind>,
}

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "record {}", self.record)?;
        if let Some(kind) = self.kind {
            write!(f, " ({})", kind.name())?;
        }
        write!(f, " at byte {}", self.offset)
    }
}

/// A stream refused by a reader, or a write a writer refused. Every
/// variant past the prologue says where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    /// The sink or source failed.
    Io {
        offset: u64,
        error: IoError,
    },
    /// Not a VM state stream.
    BadMagic,
    /// The prologue's checksum does not match.
    PrologueChecksum,
    /// A major format version this reader does not read.
    Version {
        major: u16,
        minor: u16,
    },
    /// Flags this reader must understand and does not.
    UnknownFlags {
        flags: u32,
    },
    /// The stream ends inside or before a record (a stream cut at a record
    /// boundary lacks its end record).
    Truncated {
        at: At,
        part: &'static str,
    },
    /// A frame header's checksum does not match.
    FrameChecksum {
        at: At,
    },
    /// A payload's checksum does not match.
    Checksum {
        at: At,
    },
    /// A record out of sequence: missing, repeated or reordered.
    Sequence {
        at: At,
        found: u32,
    },
    /// A record longer than `limits::MAX_PAYLOAD`.
    TooLong {
        at: At,
        len: u64,
    },
    /// A record kind this reader does not know and may not skip.
    UnknownKind {
        at: At,
        code: u8,
    },
    /// A record layout version this reader does not read.
    RecordVersion {
        at: At,
        version: u16,
    },
    /// A record where the format does not allow it.
    Order {
        at: At,
        why: &'static str,
    },
    /// A payload that does not parse, or a field out of its range.
    Malformed {
        at: At,
        why: &'static str,
    },
    /// vCPU state in a representation this reader does not know.
    CpuFormat {
        at: At,
        format: u16,
    },
    /// Memory outside the guest's RAM ranges.
    OutsideRam {
        at: At,
        gfn: u64,
        pages: u64,
    },
    /// A vCPU index not below the configuration's vCPU count.
    VcpuIndex {
        at: At,
        index: u32,
        count: u32,
    },
    DuplicateVcpu {
        at: At,
        index: u32,
    },
    /// A vCPU state layout version this reader does not read.
    VcpuVersion {
        at: At,
        index: u32,
        version: u16,
    },
    /// vCPU state bytes that do not decode.
    VcpuState {
        at: At,
        index: u32,
    },
    /// A device the configuration does not list.
    UnknownDevice {
        at: At,
        name: String,
    },
    DuplicateDevice {
        at: At,
        name: String,
    },
    /// A device state version other than the configuration lists.
    DeviceVersion {
        at: At,
        name: String,
        found: u16,
        expected: u16,
    },
    /// The stream ended (or resumed) without a vCPU's state.
    MissingVcpu {
        at: At,
        index: u32,
    },
    /// The stream ended (or resumed) without a listed device's state.
    MissingDevice {
        at: At,
        name: String,
    },
    /// The end record disagrees with what came before it.
    EndMismatch {
        at: At,
        what: &'static str,
    },
    /// Bytes after the end record of an in-memory stream.
    TrailingBytes {
        offset: u64,
    },
    /// A writer or reader was used after one of its calls failed.
    UsedAfterError,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { offset, error } => write!(f, "I/O failed at byte {offset}: {error}"),
            Error::BadMagic => f.write_str("Not a VM state stream (bad magic)"),
            Error::PrologueChecksum => f.write_str("Stream prologue checksum mismatch"),
            Error::Version { major, minor } => write!(f, "Unsupported stream format version {major}.{minor}"),
            Error::UnknownFlags { flags } => write!(f, "Unknown stream flags {flags:#x}"),
            Error::Truncated { at, part } => write!(f, "Stream truncated in {at}: no {part}"),
            Error::FrameChecksum { at } => write!(f, "Frame header checksum mismatch in {at}"),
            Error::Checksum { at } => write!(f, "Payload checksum mismatch in {at}"),
            Error::Sequence { at, found } => write!(f, "Out of sequence: {at} is numbered {found}"),
            Error::TooLong { at, len } => write!(f, "Record too long in {at}: {len} bytes"),
            Error::UnknownKind { at, code } => write!(f, "Unknown record kind {code:#04x} in {at}"),
            Error::RecordVersion { at, version } => write!(f, "Unsupported record version {version} in {at}"),
            Error::Order { at, why } => write!(f, "Record out of order in {at}: {why}"),
            Error::Malformed { at, why } => write!(f, "Malformed {at}: {why}"),
            Error::CpuFormat { at, format } => write!(f, "Unknown vCPU state format {format} in {at}"),
            Error::OutsideRam { at, gfn, pages } => {
                write!(f, "Memory outside guest RAM in {at}: {pages} page(s) at frame {gfn:#x}")
            }
            Error::VcpuIndex { at, index, count } => write!(f, "vCPU {index} of {count} in {at}"),
            Error::DuplicateVcpu { at, index } => write!(f, "vCPU {index} saved twice, again in {at}"),
            Error::VcpuVersion { at, index, version } => {
                write!(f, "vCPU {index} state version {version} unsupported in {at}")
            }
            Error::VcpuState { at, index } => write!(f, "vCPU {index} state does not decode in {at}"),
            Error::UnknownDevice { at, name } => write!(f, "Unlisted device {name:?} in {at}"),
            Error::DuplicateDevice { at, name } => write!(f, "Device {name:?} saved twice, again in {at}"),
            Error::DeviceVersion { at, name, found, expected } => {
                write!(f, "Device {name:?} state version {found} in {at}, configuration says {expected}")
            }
            Error::MissingVcpu { at, index } => write!(f, "No state for vCPU {index} before {at}"),
            Error::MissingDevice { at, name } => write!(f, "No state for device {name:?} before {at}"),
            Error::EndMismatch { at, what } => write!(f, "End record disagrees with the stream in {at}: {what}"),
            Error::TrailingBytes { offset } => write!(f, "Bytes after the end record at byte {offset}"),
            Error::UsedAfterError => f.write_str("Stream used after an earlier error"),
        }
    }
}
