//! The on-device format: a superblock in block 0, then fixed-size slots.
//!
//! All integers are little-endian. Checksums are CRC-32C (Castagnoli, the
//! iSCSI/ext4/btrfs polynomial), which detects all burst errors up to 32
//! bits and is what storage formats use for metadata.
//!
//! Superblock (block 0, 512 bytes):
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 8 | magic `MMSWAPSB` |
//! | 8 | 4 | format version (1) |
//! | 12 | 4 | block size (512) |
//! | 16 | 8 | device blocks when formatted |
//! | 24 | 8 | first slot block (1) |
//! | 32 | 8 | slot count |
//! | 40 | 4 | blocks per slot (9) |
//! | 44 | 4 | page size (4096) |
//! | 48 | 8 | epoch (incremented by every open) |
//! | 56 | 4 | CRC-32C of bytes 0..56 |
//! | 60 | 452 | zero |
//!
//! Slot `i` occupies blocks `first + 9 i ..= first + 9 i + 8`: a header block
//! and the page. Header:
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 8 | magic `MMSWAPPG` |
//! | 8 | 2 | format version (1) |
//! | 10 | 2 | header length (64) |
//! | 12 | 4 | slot index (catches misdirected reads and writes) |
//! | 16 | 8 | epoch from the superblock (catches slots from an earlier run) |
//! | 24 | 8 | generation: a reservation-wide counter, unique per page-out |
//! | 32 | 8 | VM id |
//! | 40 | 8 | guest-physical address |
//! | 48 | 4 | CRC-32C of the 4096-byte page |
//! | 52 | 4 | zero |
//! | 56 | 4 | CRC-32C of header bytes 0..56 |
//! | 60 | 452 | zero |
//!
//! The header carries its own checksum separate from the page's so a
//! refusal can say which half is damaged, and so the identity fields are
//! checked before the 4 KiB checksum is computed.

use crc::{CRC_32_ISCSI, Crc, Table};

use super::VmId;
use super::block::BLOCK_SIZE;
use crate::addr::GuestPhysAddr;
use crate::le::{get_u16, get_u32, get_u64, put_u16, put_u32, put_u64};

/// The version this code writes and the only one it reads.
pub const FORMAT_VERSION: u32 = 1;
/// Superblock magic.
pub const SUPERBLOCK_MAGIC: [u8; 8] = *b"MMSWAPSB";
/// Slot header magic.
pub const SLOT_MAGIC: [u8; 8] = *b"MMSWAPPG";
/// Bytes in a guest page.
pub const PAGE_BYTES: usize = 4096;
/// Blocks in one slot: a header block and the page.
pub const SLOT_BLOCKS: u64 = 1 + (PAGE_BYTES / BLOCK_SIZE) as u64;
/// Bytes in one slot.
pub const SLOT_BYTES: usize = SLOT_BLOCKS as usize * BLOCK_SIZE;
/// The first slot's block (right after the superblock).
pub const FIRST_SLOT_BLOCK: u64 = 1;
const HEADER_LEN: u16 = 64;

/// A `static`, not a `const`: the 16 KiB slice-by-16 table would otherwise
/// be copied into every use.
static CRC32C: Crc<u32, Table<16>> = Crc::<u32, Table<16>>::new(&CRC_32_ISCSI);

/// CRC-32C of `bytes`.
pub fn crc32c(bytes: &[u8]) -> u32 {
    CRC32C.checksum(bytes)
}

/// Why a device's superblock was refused.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum SuperblockRefusal {
    /// Block 0 does not start with the swap magic: not a swap device.
    NoMagic,
    /// A format version this code does not read.
    UnsupportedVersion(u32),
    /// The superblock's checksum does not match its contents.
    BadChecksum,
    /// The superblock was written for another block or page size.
    BlockSizeMismatch { block: u32, page: u32 },
    /// The device is not the size the superblock was written for.
    DeviceSizeMismatch { recorded: u64, actual: u64 },
    /// The slot area does not fit the device or has the wrong shape.
    BadGeometry,
    /// The device has no room for even one slot.
    TooSmall { blocks: u64 },
}

impl core::fmt::Display for SuperblockRefusal {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            SuperblockRefusal::NoMagic => f.write_str("block 0 has no swap superblock (not a swap device)"),
            SuperblockRefusal::UnsupportedVersion(v) => {
                write!(f, "swap format version {v} is not supported (this build reads {FORMAT_VERSION})")
            }
            SuperblockRefusal::BadChecksum => f.write_str("the superblock checksum does not match"),
            SuperblockRefusal::BlockSizeMismatch { block, page } => {
                write!(f, "the superblock is for {block}-byte blocks and {page}-byte pages")
            }
            SuperblockRefusal::DeviceSizeMismatch { recorded, actual } => {
                write!(f, "the superblock is for a device of {recorded} blocks, this one has {actual}")
            }
            SuperblockRefusal::BadGeometry => f.write_str("the superblock's slot area does not fit the device"),
            SuperblockRefusal::TooSmall { blocks } => {
                write!(f, "a device of {blocks} blocks has no room for one swap slot")
            }
        }
    }
}

/// Why a stored slot was refused on page-in.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum SlotRefusal {
    /// The slot is not held by this VM's file under that generation (a
    /// released, reused or foreign slot handle); the device was not read.
    NotAllocated,
    /// The header block has no slot magic.
    BadMagic,
    /// The header names a format version this code does not read.
    UnsupportedVersion(u16),
    /// The header's checksum does not match the header.
    HeaderChecksum,
    /// The header belongs to another slot (misdirected write or read).
    WrongSlot { found: u32 },
    /// The header was written in an earlier run of the reservation.
    WrongEpoch { found: u64 },
    /// The header names another VM.
    WrongVm { found: VmId },
    /// The header names another guest-physical address.
    WrongAddress { found: GuestPhysAddr },
    /// The header is from another page-out of this slot (a lost write).
    StaleGeneration { expected: u64, found: u64 },
    /// The page's checksum does not match the page.
    DataChecksum,
}

impl core::fmt::Display for SlotRefusal {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            SlotRefusal::NotAllocated => f.write_str("the slot is not held by this swap file"),
            SlotRefusal::BadMagic => f.write_str("the slot header has no magic"),
            SlotRefusal::UnsupportedVersion(v) => write!(f, "the slot header has unsupported version {v}"),
            SlotRefusal::HeaderChecksum => f.write_str("the slot header checksum does not match"),
            SlotRefusal::WrongSlot { found } => write!(f, "the header belongs to slot {found}"),
            SlotRefusal::WrongEpoch { found } => write!(f, "the header is from epoch {found}, an earlier run"),
            SlotRefusal::WrongVm { found } => write!(f, "the header belongs to VM {found}"),
            SlotRefusal::WrongAddress { found } => write!(f, "the header is for guest address {found}"),
            SlotRefusal::StaleGeneration { expected, found } => {
                write!(f, "the header is generation {found}, expected {expected} (lost write)")
            }
            SlotRefusal::DataChecksum => f.write_str("the page checksum does not match"),
        }
    }
}

/// The decoded superblock.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Superblock {
    /// Device blocks when formatted.
    pub device_blocks: u64,
    /// Slots on the device.
    pub slots: u64,
    /// Incremented by every open, stamped into every slot header.
    pub epoch: u64,
}

impl Superblock {
    /// The layout for a device of `blocks` blocks.
    pub fn for_device(blocks: u64, epoch: u64) -> Result<Self, SuperblockRefusal> {
        let slots = blocks.saturating_sub(FIRST_SLOT_BLOCK) / SLOT_BLOCKS;
        // Slot indices are u32 in headers and handles.
        let slots = slots.min(u64::from(u32::MAX));
        if slots == 0 {
            return Err(SuperblockRefusal::TooSmall { blocks });
        }
        Ok(Self { device_blocks: blocks, slots, epoch })
    }

    /// Encode into block 0.
    pub fn encode(&self) -> [u8; BLOCK_SIZE] {
        let mut b = [0; BLOCK_SIZE];
        b[0..8].copy_from_slice(&SUPERBLOCK_MAGIC);
        put_u32(&mut b, 8, FORMAT_VERSION);
        put_u32(&mut b, 12, BLOCK_SIZE as u32);
        put_u64(&mut b, 16, self.device_blocks);
        put_u64(&mut b, 24, FIRST_SLOT_BLOCK);
        put_u64(&mut b, 32, self.slots);
        put_u32(&mut b, 40, SLOT_BLOCKS as u32);
        put_u32(&mut b, 44, PAGE_BYTES as u32);
        put_u64(&mut b, 48, self.epoch);
        let sum = crc32c(&b[..56]);
        put_u32(&mut b, 56, sum);
        b
    }

    /// Decode and check block 0 of a device of `actual_blocks` blocks.
    pub fn decode(b: &[u8; BLOCK_SIZE], actual_blocks: u64) -> Result<Self, SuperblockRefusal> {
        if b[0..8] != SUPERBLOCK_MAGIC {
            return Err(SuperblockRefusal::NoMagic);
        }
        // Version before checksum: a later version may checksum differently.
        let version = get_u32(b, 8);
        if version != FORMAT_VERSION {
            return Err(SuperblockRefusal::UnsupportedVersion(version));
        }
        if get_u32(b, 56) != crc32c(&b[..56]) {
            return Err(SuperblockRefusal::BadChecksum);
        }
        let (block, page) = (get_u32(b, 12), get_u32(b, 44));
        if block as usize != BLOCK_SIZE || page as usize != PAGE_BYTES {
            return Err(SuperblockRefusal::BlockSizeMismatch { block, page });
        }
        let recorded = get_u64(b, 16);
        if recorded != actual_blocks {
            return Err(SuperblockRefusal::DeviceSizeMismatch { recorded, actual: actual_blocks });
        }
        let first = get_u64(b, 24);
        let slots = get_u64(b, 32);
        let fits = slots
            .checked_mul(SLOT_BLOCKS)
            .and_then(|n| n.checked_add(FIRST_SLOT_BLOCK))
            .is_some_and(|end| end <= actual_blocks);
        if first != FIRST_SLOT_BLOCK
            || u64::from(get_u32(b, 40)) != SLOT_BLOCKS
            || slots == 0
            || slots > u64::from(u32::MAX)
            || !fits
        {
            return Err(SuperblockRefusal::BadGeometry);
        }
        Ok(Self { device_blocks: recorded, slots, epoch: get_u64(b, 48) })
    }
}

/// What a slot's header says about the page in it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct SlotHeader {
    /// The slot's own index.
    pub slot: u32,
    /// The reservation's epoch when written.
    pub epoch: u64,
    /// The page-out's generation.
    pub generation: u64,
    /// The owning VM.
    pub vm: VmId,
    /// The page's guest-physical address.
    pub gpa: GuestPhysAddr,
}

impl SlotHeader {
    /// Fill `slot_buf` (a whole slot) with this header and `page`.
    pub fn encode_slot(&self, page: &[u8; PAGE_BYTES], slot_buf: &mut [u8; SLOT_BYTES]) {
        let (h, data) = slot_buf.split_at_mut(BLOCK_SIZE);
        h.fill(0);
        h[0..8].copy_from_slice(&SLOT_MAGIC);
        put_u16(h, 8, FORMAT_VERSION as u16);
        put_u16(h, 10, HEADER_LEN);
        put_u32(h, 12, self.slot);
        put_u64(h, 16, self.epoch);
        put_u64(h, 24, self.generation);
        put_u64(h, 32, u64::from(self.vm));
        put_u64(h, 40, self.gpa.0);
        put_u32(h, 48, crc32c(page));
        let sum = crc32c(&h[..56]);
        put_u32(h, 56, sum);
        data.copy_from_slice(page);
    }

    /// Check a whole slot read from the device against what the caller
    /// expects (`self`); on success the page is `&slot_buf[BLOCK_SIZE..]`.
    /// Identity is checked before the page checksum so the most specific
    /// refusal wins.
    pub fn verify_slot(&self, slot_buf: &[u8; SLOT_BYTES]) -> Result<(), SlotRefusal> {
        let (h, data) = slot_buf.split_at(BLOCK_SIZE);
        if h[0..8] != SLOT_MAGIC {
            return Err(SlotRefusal::BadMagic);
        }
        let version = get_u16(h, 8);
        if u32::from(version) != FORMAT_VERSION {
            return Err(SlotRefusal::UnsupportedVersion(version));
        }
        if get_u32(h, 56) != crc32c(&h[..56]) || get_u16(h, 10) != HEADER_LEN {
            return Err(SlotRefusal::HeaderChecksum);
        }
        let found_slot = get_u32(h, 12);
        if found_slot != self.slot {
            return Err(SlotRefusal::WrongSlot { found: found_slot });
        }
        let epoch = get_u64(h, 16);
        if epoch != self.epoch {
            return Err(SlotRefusal::WrongEpoch { found: epoch });
        }
        let vm = get_u64(h, 32);
        if vm != u64::from(self.vm) {
            // Only this code writes headers, and it writes u32 ids, so a
            // larger value passed the header CRC by chance; report it clipped.
            return Err(SlotRefusal::WrongVm { found: vm.min(u64::from(VmId::MAX)) as VmId });
        }
        let gpa = GuestPhysAddr(get_u64(h, 40));
        if gpa != self.gpa {
            return Err(SlotRefusal::WrongAddress { found: gpa });
        }
        let generation = get_u64(h, 24);
        if generation != self.generation {
            return Err(SlotRefusal::StaleGeneration { expected: self.generation, found: generation });
        }
        if get_u32(h, 48) != crc32c(data) {
            return Err(SlotRefusal::DataChecksum);
        }
        Ok(())
    }
}
