//! Record framing: every record is a 16-byte frame header, the payload and
//! a CRC-32C.
//!
//! The frame header has a checksum of its own so a damaged length is
//! caught before the reader waits for (or buffers) that many bytes. The
//! payload checksum covers the frame header too, which binds a payload to
//! its kind and sequence number: two payloads swapped between records are
//! refused even when both are intact.

use crate::checksum::{crc32c, digest};
use crate::limits::MAX_PAYLOAD;

/// Bytes before the payload.
pub const FRAME_LEN: usize = 16;
/// Bytes after the payload (its checksum).
pub const TRAILER_LEN: usize = 4;
/// The fixed stream prologue: magic, major, minor, flags, checksum.
pub const PROLOGUE_LEN: usize = 20;

/// What a record holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The VM's configuration; always record 0.
    Config,
    Vcpu,
    Device,
    Memory,
    /// Live migration: everything the destination needs to run the VM has
    /// been sent; memory records after it are post-copy pages.
    Resume,
    /// Post-copy: runs of pages whose content comes after the resume
    /// record; the destination must not let the guest see them before.
    Pending,
    /// The last record: the count and digest of all records before it.
    End,
    /// A kind this reader does not know.
    Other(u8),
}

impl Kind {
    /// Set in a kind a reader may skip when it does not know it (added by
    /// a newer minor format version). Without it an unknown kind ends the
    /// read.
    pub const OPTIONAL: u8 = 0x80;

    pub fn code(self) -> u8 {
        match self {
            Kind::Config => 0x01,
            Kind::Vcpu => 0x02,
            Kind::Device => 0x03,
            Kind::Memory => 0x04,
            Kind::Resume => 0x05,
            Kind::Pending => 0x06,
            Kind::End => 0x0f,
            Kind::Other(c) => c,
        }
    }

    pub fn from_code(c: u8) -> Kind {
        match c {
            0x01 => Kind::Config,
            0x02 => Kind::Vcpu,
            0x03 => Kind::Device,
            0x04 => Kind::Memory,
            0x05 => Kind::Resume,
            0x06 => Kind::Pending,
            0x0f => Kind::End,
            c => Kind::Other(c),
        }
    }

    /// The payload layout version this code writes and reads.
    pub fn version(self) -> u16 {
        1
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Config => "configuration",
            Kind::Vcpu => "vCPU",
            Kind::Device => "device",
            Kind::Memory => "memory",
            Kind::Resume => "resume",
            Kind::Pending => "pending pages",
            Kind::End => "end",
            Kind::Other(c) if c & Kind::OPTIONAL != 0 => "unknown optional",
            Kind::Other(_) => "unknown",
        }
    }
}

/// A decoded frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub version: u16,
    pub seq: u32,
    pub len: u32,
}

/// Why a frame header was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    Checksum,
    /// The reserved byte is not zero.
    Reserved,
    TooLong(u32),
}

impl Frame {
    pub fn encode(&self) -> [u8; FRAME_LEN] {
        let mut b = [0u8; FRAME_LEN];
        b[0] = self.kind.code();
        // b[1] is reserved (zero).
        b[2..4].copy_from_slice(&self.version.to_le_bytes());
        b[4..8].copy_from_slice(&self.seq.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        let sum = crc32c(&b[..12]);
        b[12..16].copy_from_slice(&sum.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; FRAME_LEN]) -> Result<Frame, FrameError> {
        if u32::from_le_bytes([b[12], b[13], b[14], b[15]]) != crc32c(&b[..12]) {
            return Err(FrameError::Checksum);
        }
        if b[1] != 0 {
            return Err(FrameError::Reserved);
        }
        let len = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        if len > MAX_PAYLOAD {
            return Err(FrameError::TooLong(len));
        }
        Ok(Frame {
            kind: Kind::from_code(b[0]),
            version: u16::from_le_bytes([b[2], b[3]]),
            seq: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            len,
        })
    }
}

/// Bytes the record starting at `b` (its frame header) takes in all,
/// frame and checksum included; `None` when the frame header is damaged
/// or names an over-long payload (a reader refuses it at once). Lets a
/// receiver wait until a whole record has arrived before it reads it.
pub fn record_len(b: &[u8; FRAME_LEN]) -> Option<usize> {
    Frame::decode(b).ok().map(|f| FRAME_LEN + f.len as usize + TRAILER_LEN)
}

/// The payload checksum: over the encoded frame header and the payload.
pub fn payload_crc(frame: &[u8; FRAME_LEN], payload: &[u8]) -> u32 {
    let mut d = digest();
    d.update(frame);
    d.update(payload);
    d.finalize()
}

/// The end record's payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct End {
    /// Records before the end record (the configuration included).
    pub records: u32,
    /// CRC-32C over the payload checksums of those records, in order
    /// (each as four little-endian bytes).
    pub digest: u32,
    /// Stream bytes before the end record (the prologue included).
    pub bytes: u64,
}

pub const END_LEN: usize = 16;

impl End {
    pub fn encode(&self) -> [u8; END_LEN] {
        let mut b = [0u8; END_LEN];
        b[0..4].copy_from_slice(&self.records.to_le_bytes());
        b[4..8].copy_from_slice(&self.digest.to_le_bytes());
        b[8..16].copy_from_slice(&self.bytes.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Option<End> {
        let b: &[u8; END_LEN] = b.try_into().ok()?;
        Some(End {
            records: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            digest: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            bytes: u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
        })
    }
}

/// Little-endian field reader over a payload: every read checks the length
/// first, so a short or hostile payload is an error, never a panic.
pub struct Fields<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Fields<'a> {
    pub fn new(b: &'a [u8]) -> Fields<'a> {
        Fields { b, pos: 0 }
    }

    pub fn pos(&self) -> usize {
        self.pos
    }

    pub fn rest(&self) -> &'a [u8] {
        &self.b[self.pos..]
    }

    pub fn is_empty(&self) -> bool {
        self.pos == self.b.len()
    }

    pub fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.b.len())?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Some(s)
    }

    pub fn array<const N: usize>(&mut self) -> Option<&'a [u8; N]> {
        self.bytes(N).and_then(|s| s.try_into().ok())
    }

    pub fn u8(&mut self) -> Option<u8> {
        self.array::<1>().map(|a| a[0])
    }

    pub fn u16(&mut self) -> Option<u16> {
        self.array().map(|a| u16::from_le_bytes(*a))
    }

    pub fn u32(&mut self) -> Option<u32> {
        self.array().map(|a| u32::from_le_bytes(*a))
    }

    pub fn u64(&mut self) -> Option<u64> {
        self.array().map(|a| u64::from_le_bytes(*a))
    }
}
