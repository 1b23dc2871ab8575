//! The VM state stream: one versioned, checksummed format for a VM's whole
//! state (configuration, vCPUs, devices, memory), shared by checkpoints,
//! live migration, record/replay and fault tolerance.
//!
//! A stream is a fixed prologue (magic, format version, flags) followed by
//! records, each framed with a kind, a layout version, a sequence number, a
//! length and two CRC-32Cs, and ends with an end record that counts the
//! records and digests their checksums. `README.md` has the byte layout.
//!
//! - [`Writer`] writes one: `begin(header)`, then vCPUs, devices and memory
//!   pages in whatever order the user needs (pre-copy sends memory first),
//!   then `finish()`. It picks each page's encoding (zero, LZ4 block,
//!   plain, shared) and refuses anything a reader would refuse.
//! - [`Reader`] reads one record at a time ([`Reader::next_record`]), or hands
//!   every record to an [`Apply`] sink ([`Reader::apply`]). Records reach
//!   the caller only after their checksums and ordering rules passed, but a
//!   later record may still fail: apply to a fresh VM that has not run and
//!   drop it on error, or first check a whole in-memory stream with
//!   [`verify`].
//! - [`index::index`] reads a stream as `apply` does but only notes which
//!   memory record holds each data page; [`index::RecordView`] reads one
//!   record back later, checks it again and takes pages out of it (lazy
//!   restore).
//!
//! Nothing in the stream names a VMCS or VMCB: vCPUs travel as the neutral
//! [`vcpu::GuestState`], so a stream written on an Intel host restores on an
//! AMD one.
#![no_std]

extern crate alloc;

mod apply;
mod checker;
mod checksum;
mod error;
mod header;
pub mod index;
mod io;
mod page;
mod reader;
mod record;
mod stats;
mod writer;

pub use apply::{Apply, ApplyError, Discard, Verified, verify};
pub use error::{At, Error};
pub use header::{DeviceInfo, Header, RamRange, Vendor};
pub use io::{IoError, Sink, Source};
pub use page::MemOp;
pub use reader::{MemoryRecord, Reader, Record};
pub use record::{FRAME_LEN, Kind, PROLOGUE_LEN, record_len};
pub use stats::{PageKind, Stats};
pub use writer::Writer;

/// Bytes in a guest page.
pub const PAGE_SIZE: usize = 4096;

/// The first eight bytes of every stream.
pub const MAGIC: [u8; 8] = *b"HVSTATE\n";

/// The format version this code writes. A reader refuses another major
/// version; a higher minor version only adds optional records (kinds with
/// [`Kind::OPTIONAL`] set), which this reader skips, or records only a
/// newer feature writes and an older reader must refuse (1.1: post-copy's
/// pending record, `Kind::Pending`).
pub const FORMAT_MAJOR: u16 = 1;
pub const FORMAT_MINOR: u16 = 1;

/// The layout version of [`vcpu::GuestState`] as it travels (postcard).
/// Bump it when `GuestState` changes shape: the test
/// `guest_state_encoding_is_pinned` fails until someone does.
pub const VCPU_STATE_VERSION: u16 = 1;

/// Limits a reader enforces before it allocates or loops on anything the
/// stream says (and a writer refuses to exceed).
pub mod limits {
    /// Largest record payload. A reader grows its buffer as bytes arrive,
    /// never past this.
    pub const MAX_PAYLOAD: u32 = 1 << 20;
    /// Memory records are cut at about this size: big enough that framing
    /// is noise (20 bytes per record), small enough for a network buffer.
    pub const TARGET_MEMORY_PAYLOAD: usize = 256 * 1024;
    pub const MAX_VCPUS: u32 = 1024;
    pub const MAX_RAM_RANGES: u16 = 64;
    pub const MAX_DEVICES: u16 = 256;
    /// Device names are 1 to this many bytes of UTF-8.
    pub const MAX_DEVICE_NAME: usize = 64;
    /// Pages in one LZ4 block (64 KiB: LZ4's window, so a bigger block
    /// would not compress better).
    pub const MAX_BLOCK_PAGES: u8 = 16;
    /// Guest-physical addresses stay below 2^52 (the architectural
    /// MAXPHYADDR limit, SDM Vol. 3A 4.1.4).
    pub const MAX_GPA_BITS: u32 = 52;
    /// Page runs in one pending record (12 bytes each: within the payload
    /// cap).
    pub const MAX_PENDING_RUNS: usize = 65536;
    /// Distinct shared contents in one stream.
    pub const MAX_SHARED_IDS: u32 = 1 << 24;
}
