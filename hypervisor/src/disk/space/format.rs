//! The extent table's on-disk format.
//!
//! The table sits at the start of the disk in two copies, A (blocks 0..16)
//! and B (blocks 16..32), 8 KiB each. Every update writes the copy that
//! does *not* hold the newest generation, with the generation plus one, and
//! flushes; so a torn update damages only the copy being written, and the
//! other still holds the table as it was. Reading takes the valid copy with
//! the higher generation. Data extents start at block [`DATA_START`].
//!
//! All integers are little-endian; the checksum is CRC-32C (as in the swap
//! format, `mm::swap::format`).
//!
//! A copy (8192 bytes) is a 128-byte header, then [`MAX_EXTENTS`] (62)
//! 128-byte entry slots, the used ones first (sorted by start block),
//! unused ones zero, then 124 zero bytes and the 4-byte checksum.
//!
//! Header (offset within the copy):
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 8 | magic `HVSPACE\0` |
//! | 8 | 4 | format version (1) |
//! | 12 | 4 | block size (512) |
//! | 16 | 8 | generation (higher is newer; never 0 in a valid copy) |
//! | 24 | 8 | disk blocks when formatted |
//! | 32 | 8 | first data block (32) |
//! | 40 | 4 | used entries |
//! | 44 | 4 | entry size (128) |
//! | 48 | 4 | entry slots ([`MAX_EXTENTS`], 62) |
//! | 52 | 4 | blocks per copy (16) |
//! | 56 | 4 | which copy this is (0 = A, 1 = B; catches misdirected writes) |
//! | 60 | 68 | zero |
//!
//! Entry `i` (at byte `128 (i + 1)`):
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 1 | kind (1 swap, 2 image, 3 checkpoint; 0 never appears in a used slot) |
//! | 1 | 1 | flags: bit 0 complete (a checkpoint being written is not) |
//! | 2 | 1 | name length (1..=32) |
//! | 3 | 5 | zero |
//! | 8 | 32 | name: printable ASCII without spaces, zero padded |
//! | 40 | 8 | start block (a multiple of 8, at least 32) |
//! | 48 | 8 | length in blocks (a multiple of 8, not 0) |
//! | 56 | 8 | bytes: a stream's exact length; an image's initialised prefix |
//! | 64 | 8 | created (Unix seconds) |
//! | 72 | 8 | metadata word 0 (free-form, e.g. a checkpoint's source vendor) |
//! | 80 | 8 | metadata word 1 |
//! | 88 | 40 | zero |
//!
//! The copy's bytes 8188..8192 hold the CRC-32C of bytes 0..8188.

use alloc::vec::Vec;
use core::fmt;

use mm::le::{get_u32, get_u64, put_u32, put_u64};
use mm::swap::BLOCK_SIZE;
use mm::swap::format::crc32c;

use super::{ExtentInfo, ExtentKind, ExtentName};

/// The version this code writes and the only one it reads.
pub const FORMAT_VERSION: u32 = 1;
/// Magic at the start of each copy.
pub const MAGIC: [u8; 8] = *b"HVSPACE\0";
/// Blocks in one copy of the table.
pub const COPY_BLOCKS: u64 = 16;
/// Bytes in one copy.
pub const COPY_BYTES: usize = COPY_BLOCKS as usize * BLOCK_SIZE;
/// The first block after both copies: where extents may start.
pub const DATA_START: u64 = 2 * COPY_BLOCKS;
/// Bytes per header and per entry.
pub const ENTRY_BYTES: usize = 128;
/// Entries one copy holds: its first 128-byte slot is the header, its
/// last holds the checksum.
pub const MAX_EXTENTS: usize = COPY_BYTES / ENTRY_BYTES - 2;
/// Extents start and end on 4 KiB boundaries (8 blocks), so an image's
/// pages line up with the disk's.
pub const ALIGN_BLOCKS: u64 = 8;

const FLAG_COMPLETE: u8 = 1;
const CRC_AT: usize = COPY_BYTES - 4;

const _: () = assert!(DATA_START.is_multiple_of(ALIGN_BLOCKS));
const _: () = assert!((MAX_EXTENTS + 1) * ENTRY_BYTES <= CRC_AT);

/// One of the two copies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Copy {
    A,
    B,
}

impl Copy {
    /// The copy's first block.
    pub fn first_block(self) -> u64 {
        match self {
            Copy::A => 0,
            Copy::B => COPY_BLOCKS,
        }
    }

    pub fn other(self) -> Copy {
        match self {
            Copy::A => Copy::B,
            Copy::B => Copy::A,
        }
    }

    fn index(self) -> u32 {
        match self {
            Copy::A => 0,
            Copy::B => 1,
        }
    }
}

impl fmt::Display for Copy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Copy::A => "A",
            Copy::B => "B",
        })
    }
}

/// Why one copy of the table was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyRefusal {
    /// No table magic: never written (or not ours).
    NoMagic,
    UnsupportedVersion(u32),
    /// The checksum does not match (a torn or damaged write).
    BadChecksum,
    /// The copy says it is the other copy (a misdirected write).
    WrongCopy,
    /// Written for a disk of another size.
    DiskSizeMismatch {
        recorded: u64,
        actual: u64,
    },
    /// Block size, entry size, slot count or data start differ from this
    /// build's.
    BadGeometry,
    /// Entry `index` is malformed (`why`), though the checksum matched.
    BadEntry {
        index: usize,
        why: &'static str,
    },
}

impl fmt::Display for CopyRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CopyRefusal::NoMagic => f.write_str("no table magic"),
            CopyRefusal::UnsupportedVersion(v) => {
                write!(f, "format version {v} is not supported (this build reads {FORMAT_VERSION})")
            }
            CopyRefusal::BadChecksum => f.write_str("the checksum does not match"),
            CopyRefusal::WrongCopy => f.write_str("it is the other copy (misdirected write)"),
            CopyRefusal::DiskSizeMismatch { recorded, actual } => {
                write!(f, "it is for a disk of {recorded} blocks, this one has {actual}")
            }
            CopyRefusal::BadGeometry => f.write_str("its geometry is not this build's"),
            CopyRefusal::BadEntry { index, why } => write!(f, "entry {index} {why}"),
        }
    }
}

/// A decoded copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Table {
    pub generation: u64,
    pub disk_blocks: u64,
    /// Sorted by start block, non-overlapping, names unique.
    pub extents: Vec<ExtentInfo>,
}

impl Table {
    /// Encode as copy `which`. `extents` must be at most [`MAX_EXTENTS`]
    /// and sorted (the space manager keeps them so).
    pub fn encode(&self, which: Copy) -> Vec<u8> {
        debug_assert!(self.extents.len() <= MAX_EXTENTS);
        let mut b = alloc::vec![0u8; COPY_BYTES];
        b[0..8].copy_from_slice(&MAGIC);
        put_u32(&mut b, 8, FORMAT_VERSION);
        put_u32(&mut b, 12, BLOCK_SIZE as u32);
        put_u64(&mut b, 16, self.generation);
        put_u64(&mut b, 24, self.disk_blocks);
        put_u64(&mut b, 32, DATA_START);
        put_u32(&mut b, 40, self.extents.len() as u32);
        put_u32(&mut b, 44, ENTRY_BYTES as u32);
        put_u32(&mut b, 48, MAX_EXTENTS as u32);
        put_u32(&mut b, 52, COPY_BLOCKS as u32);
        put_u32(&mut b, 56, which.index());
        for (i, e) in self.extents.iter().take(MAX_EXTENTS).enumerate() {
            let s = &mut b[(i + 1) * ENTRY_BYTES..(i + 2) * ENTRY_BYTES];
            s[0] = e.kind as u8;
            s[1] = if e.complete { FLAG_COMPLETE } else { 0 };
            let name = e.name.as_bytes();
            s[2] = name.len() as u8;
            s[8..8 + name.len()].copy_from_slice(name);
            put_u64(s, 40, e.start);
            put_u64(s, 48, e.blocks);
            put_u64(s, 56, e.bytes);
            put_u64(s, 64, e.created);
            put_u64(s, 72, e.meta[0]);
            put_u64(s, 80, e.meta[1]);
        }
        let sum = crc32c(&b[..CRC_AT]);
        put_u32(&mut b, CRC_AT, sum);
        b
    }

    /// Decode and check copy `which` (`b` is [`COPY_BYTES`] long) of a
    /// disk of `disk_blocks` blocks.
    pub fn decode(b: &[u8], which: Copy, disk_blocks: u64) -> Result<Table, CopyRefusal> {
        if b.len() != COPY_BYTES || b[0..8] != MAGIC {
            return Err(CopyRefusal::NoMagic);
        }
        // Version before checksum: a later version may checksum differently.
        let version = get_u32(b, 8);
        if version != FORMAT_VERSION {
            return Err(CopyRefusal::UnsupportedVersion(version));
        }
        if get_u32(b, CRC_AT) != crc32c(&b[..CRC_AT]) {
            return Err(CopyRefusal::BadChecksum);
        }
        if get_u32(b, 56) != which.index() {
            return Err(CopyRefusal::WrongCopy);
        }
        let recorded = get_u64(b, 24);
        if recorded != disk_blocks {
            return Err(CopyRefusal::DiskSizeMismatch { recorded, actual: disk_blocks });
        }
        let used = get_u32(b, 40) as usize;
        if get_u32(b, 12) as usize != BLOCK_SIZE
            || get_u64(b, 32) != DATA_START
            || get_u32(b, 44) as usize != ENTRY_BYTES
            || get_u32(b, 48) as usize != MAX_EXTENTS
            || u64::from(get_u32(b, 52)) != COPY_BLOCKS
            || used > MAX_EXTENTS
            || get_u64(b, 16) == 0
        {
            return Err(CopyRefusal::BadGeometry);
        }
        let mut extents: Vec<ExtentInfo> = Vec::with_capacity(used);
        for index in 0..used {
            let s = &b[(index + 1) * ENTRY_BYTES..(index + 2) * ENTRY_BYTES];
            let bad = |why| CopyRefusal::BadEntry { index, why };
            let kind = ExtentKind::from_byte(s[0]).ok_or(bad("has an unknown kind"))?;
            let len = usize::from(s[2]);
            let name = s.get(8..8 + len).and_then(|n| core::str::from_utf8(n).ok());
            let name = name.and_then(|n| ExtentName::new(n).ok()).ok_or(bad("has an invalid name"))?;
            let (start, blocks) = (get_u64(s, 40), get_u64(s, 48));
            let end = start.checked_add(blocks).ok_or(bad("overflows the disk"))?;
            if start < DATA_START || end > disk_blocks || blocks == 0 {
                return Err(bad("lies outside the data area"));
            }
            if !start.is_multiple_of(ALIGN_BLOCKS) || !blocks.is_multiple_of(ALIGN_BLOCKS) {
                return Err(bad("is not 4 KiB aligned"));
            }
            let bytes = get_u64(s, 56);
            if bytes > blocks * BLOCK_SIZE as u64 {
                return Err(bad("holds more bytes than blocks"));
            }
            if let Some(prev) = extents.last()
                && prev.start + prev.blocks > start
            {
                return Err(bad("overlaps the one before (or is out of order)"));
            }
            if extents.iter().any(|e| e.name == name) {
                return Err(bad("repeats a name"));
            }
            extents.push(ExtentInfo {
                name,
                kind,
                start,
                blocks,
                bytes,
                created: get_u64(s, 64),
                complete: s[1] & FLAG_COMPLETE != 0,
                meta: [get_u64(s, 72), get_u64(s, 80)],
            });
        }
        Ok(Table { generation: get_u64(b, 16), disk_blocks, extents })
    }
}
