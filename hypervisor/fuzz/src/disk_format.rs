//! The data disk's own formats, read back from a disk the hypervisor does
//! not control: the extent table (`disk::space::format`, two checksummed
//! copies) and a VM disk image's header (`disk::image`). A copy or header
//! may hold anything; it must be refused or read as what it says, never a
//! reason to panic or to reach outside the disk.
//!
//! The fuzzer's bytes become the table copy and the image header; flags
//! choose whether the magic, version, geometry and checksum are set right
//! first, so the checks behind the checksum are reached.
//!
//! Checks:
//! - `Table::decode` never panics; a refusal is one line; an accepted
//!   table's extents are sorted, apart, aligned, inside the data area and
//!   uniquely named, and it re-encodes to a copy that decodes to itself;
//! - `Space::open` of a disk holding the fuzzed copy in A and a damaged
//!   (or valid older) one in B never panics; what it opens lists only
//!   complete extents inside the disk, with the free gaps and extents
//!   tiling the data area;
//! - `Image::open` of an extent whose header is fuzzed never panics; an
//!   accepted image's capacity fits the extent, its initialised prefix its
//!   capacity, and it reads its last block (zeros past the prefix).

use std::cell::RefCell;
use std::rc::Rc;

use hypervisor::disk::image::{HEADER_BLOCKS, Image};
use hypervisor::disk::space::format::{COPY_BYTES, Copy, DATA_START, MAGIC, Table};
use hypervisor::disk::space::{ExtentStore, Space};
use mm::swap::format::crc32c;
use mm::swap::{BLOCK_SIZE, BlockStore, MemBlockStore};

use crate::input::Input;

type Disk = Rc<RefCell<MemBlockStore>>;

/// Sets what the flags ask for: the magic, version, block size, data
/// start, entry size and slots, copy blocks, which copy, disk size, then
/// the checksum.
fn fix(b: &mut [u8], flags: u8, which: u32, disk_blocks: u64) {
    if flags & 1 != 0 {
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&1u32.to_le_bytes());
    }
    if flags & 2 != 0 {
        b[12..16].copy_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
        b[24..32].copy_from_slice(&disk_blocks.to_le_bytes());
        b[32..40].copy_from_slice(&DATA_START.to_le_bytes());
        b[40] %= 8; // a few used entries
        b[41..44].fill(0);
        b[44..48].copy_from_slice(&128u32.to_le_bytes());
        b[48..52].copy_from_slice(&62u32.to_le_bytes());
        b[52..56].copy_from_slice(&16u32.to_le_bytes());
        b[56..60].copy_from_slice(&which.to_le_bytes());
    }
    if flags & 4 != 0 {
        let n = b.len();
        let sum = crc32c(&b[..n - 4]);
        b[n - 4..].copy_from_slice(&sum.to_le_bytes());
    }
}

pub fn disk_format(data: &[u8]) {
    let mut input = Input::new(data);
    // 64 KiB to 32 MiB of disk, in 4 KiB units.
    let disk_blocks = (64 + input.below(8192)) * 8;
    let flags = input.u8();
    let mut copy = vec![0u8; COPY_BYTES];
    let raw = input.bytes(COPY_BYTES);
    copy[..raw.len()].copy_from_slice(raw);
    fix(&mut copy, flags, 0, disk_blocks);
    let table = Table::decode(&copy, Copy::A, disk_blocks);
    match &table {
        Ok(t) => check_table(t, disk_blocks),
        Err(e) => {
            let text = e.to_string();
            assert!(!text.is_empty() && !text.contains('\n'), "{text:?}");
        }
    }

    // The fuzzed copy as A on a disk; B a damaged one, or the same table
    // one generation older (so A is taken when valid).
    let disk: Disk = Rc::new(RefCell::new(MemBlockStore::new(disk_blocks)));
    disk.borrow_mut().write(0, &copy).unwrap();
    let b = match (&table, input.bool()) {
        (Ok(t), true) if t.generation > 1 => {
            Table { generation: t.generation - 1, disk_blocks, extents: t.extents.clone() }.encode(Copy::B)
        }
        _ => {
            let mut b = copy.clone();
            fix(&mut b, flags, 1, disk_blocks);
            b[usize::from(input.u16()) % COPY_BYTES] ^= input.u8() | 1;
            b
        }
    };
    disk.borrow_mut().write(16, &b).unwrap();
    if let Ok(space) = Space::open(disk.clone()) {
        let listed = space.list();
        assert!(listed.iter().all(|e| e.complete), "an incomplete extent stayed listed");
        let used: u64 = listed.iter().map(|e| e.blocks).sum();
        let free: u64 = space.free_gaps().iter().map(|g| g.1).sum();
        assert_eq!(used + free, disk_blocks - DATA_START, "extents and gaps do not tile the data area");
    }

    // An image in an extent of the disk, its header fuzzed.
    let blocks = HEADER_BLOCKS + 1 + input.below(4096);
    let start = DATA_START;
    if start + blocks > disk_blocks {
        return;
    }
    let mut header = [0u8; BLOCK_SIZE];
    let raw = input.rest();
    header[..raw.len().min(BLOCK_SIZE)].copy_from_slice(&raw[..raw.len().min(BLOCK_SIZE)]);
    if flags & 8 != 0 {
        header[0..8].copy_from_slice(b"HVIMAGE\0");
        header[8..12].copy_from_slice(&1u32.to_le_bytes());
        header[12..16].copy_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
    }
    if flags & 16 != 0 {
        let sum = crc32c(&header[..BLOCK_SIZE - 4]);
        header[BLOCK_SIZE - 4..].copy_from_slice(&sum.to_le_bytes());
    }
    disk.borrow_mut().write(start, &header).unwrap();
    let Ok(mut image) = Image::open(ExtentStore::new(disk.clone(), start, blocks)) else { return };
    let (capacity, initialised) = (image.capacity(), image.initialised());
    assert!(capacity <= (blocks - HEADER_BLOCKS) * BLOCK_SIZE as u64, "capacity {capacity} past the extent");
    assert!(initialised <= capacity && capacity.is_multiple_of(BLOCK_SIZE as u64));
    if capacity > 0 {
        let mut last = [0xa5u8; BLOCK_SIZE];
        image.read(capacity - BLOCK_SIZE as u64, &mut last).unwrap();
        if initialised < capacity {
            assert!(last.iter().all(|&b| b == 0), "past the initialised prefix reads as data");
        }
    }
}

fn check_table(t: &Table, disk_blocks: u64) {
    let mut end = DATA_START;
    for (i, e) in t.extents.iter().enumerate() {
        assert!(e.start >= end, "extent {i} overlaps or is out of order");
        end = e.start + e.blocks;
        assert!(end <= disk_blocks && e.blocks > 0 && e.start.is_multiple_of(8) && e.blocks.is_multiple_of(8));
        assert!(t.extents[..i].iter().all(|o| o.name != e.name), "name {} twice", e.name);
    }
    assert_eq!(Table::decode(&t.encode(Copy::A), Copy::A, disk_blocks).as_ref(), Ok(t));
    assert_eq!(Table::decode(&t.encode(Copy::B), Copy::B, disk_blocks).as_ref(), Ok(t));
    assert!(Table::decode(&t.encode(Copy::B), Copy::A, disk_blocks).is_err(), "a misdirected copy was taken");
}
