//! Whose disk is this? Decided from reads alone, before anything writes:
//! the boot-time self-check and the take-over both write, and both may
//! only do so on a disk that is blank or already ours. This is the one
//! place that decides it; `memory::swap` asks it once per boot and both the
//! self-check gate and the choice between formatting and reopening follow
//! from the answer.
//!
//! Ours is a disk with the space manager's extent table (`disk::space`,
//! either copy valid), or one with the older whole-disk swap superblock in
//! block 0 (what builds before the extent table wrote). The old swap-only
//! disks are throwaway scratch files made by `boot/` and swap never
//! survives a restart anyway, so such a disk is reformatted with a table:
//! nothing of value is lost.

use alloc::vec;
use core::fmt;

use mm::Error;
use mm::swap::format::Superblock;
use mm::swap::{BLOCK_SIZE, BlockStore, SuperblockRefusal};

use super::space::{self, Copy, CopyRefusal, DATA_START, SpaceError, Table};

/// How far from the start a disk must be all zeros to count as blank: 128
/// KiB. Block 0 alone is not enough, because several formats leave it zero
/// and put their signature further in (ext2/3/4 at byte 1024, ISO 9660 at
/// 32 KiB, btrfs at 64 KiB); a fresh sparse image is zero throughout.
pub const BLANK_BLOCKS: u64 = 256;

/// What a disk holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskKind {
    /// The first [`BLANK_BLOCKS`] blocks (the whole disk if smaller) are
    /// zero: nothing to lose, it may be checked and formatted.
    Blank,
    /// The space manager's extent table (the newest valid copy, which copy
    /// that is, and why the other was refused if it was): ours from an
    /// earlier run, to be checked and reopened.
    Space { table: Table, copy: Copy, refused: Option<CopyRefusal> },
    /// Block 0 holds a valid swap superblock of the older whole-disk
    /// format: ours from an earlier build, to be reformatted.
    OldSwap(Superblock),
    /// Anything else: someone else's data, never written.
    Foreign(Foreign),
}

impl DiskKind {
    /// May the boot path write to this disk at all?
    pub fn writable(&self) -> bool {
        !matches!(self, DiskKind::Foreign(_))
    }
}

/// Why a disk is taken to hold someone else's data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Foreign {
    /// No table, no swap superblock in block 0, and `block` is not all
    /// zeros.
    Data { block: u64 },
    /// Block 0 starts with the swap magic but the superblock is not one
    /// this build can use (damaged, another version, another disk size):
    /// it may hold another build's swap, so it is left alone too.
    Unusable(SuperblockRefusal),
    /// Both copies of the extent table are unusable (damaged, another
    /// version or another disk size): VM images and checkpoints may be on
    /// it, so it is left alone.
    DamagedTable { a: CopyRefusal, b: CopyRefusal },
}

impl fmt::Display for Foreign {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Foreign::Data { block } => {
                write!(f, "block 0 has no swap superblock and block {block} holds data (not blank)")
            }
            Foreign::Unusable(why) => write!(f, "block 0 has a swap superblock this build cannot use: {why}"),
            Foreign::DamagedTable { a, b } => {
                write!(f, "both copies of the extent table are unusable (A: {a}; B: {b})")
            }
        }
    }
}

/// Classifies `disk` by reading it (the table area, then up to
/// [`BLANK_BLOCKS`]); never writes. A read error is returned as is: a disk
/// that cannot be read is not used either.
pub fn classify(disk: &mut dyn BlockStore) -> Result<DiskKind, Error> {
    let blocks = disk.block_count();
    if blocks == 0 {
        // Nothing to read, nothing to lose; formatting refuses it later.
        return Ok(DiskKind::Blank);
    }
    // One read covers both table copies (and block 0 for the old format).
    let head_blocks = blocks.min(DATA_START);
    let mut head = vec![0u8; head_blocks as usize * BLOCK_SIZE];
    disk.read(0, &mut head)?;
    if blocks >= DATA_START {
        let (a, b) = head.split_at(space::format::COPY_BYTES);
        let a = Table::decode(a, Copy::A, blocks);
        let b = Table::decode(b, Copy::B, blocks);
        match space::choose(a, b) {
            Ok((table, copy, refused)) => return Ok(DiskKind::Space { table, copy, refused }),
            Err(SpaceError::Damaged { a, b }) => return Ok(DiskKind::Foreign(Foreign::DamagedTable { a, b })),
            Err(_) => {}
        }
    }
    let mut b0 = [0u8; BLOCK_SIZE];
    b0.copy_from_slice(&head[..BLOCK_SIZE]);
    match Superblock::decode(&b0, blocks) {
        Ok(sb) => return Ok(DiskKind::OldSwap(sb)),
        Err(SuperblockRefusal::NoMagic) => {}
        Err(why) => return Ok(DiskKind::Foreign(Foreign::Unusable(why))),
    }
    if let Some(i) = head.iter().position(|&b| b != 0) {
        return Ok(DiskKind::Foreign(Foreign::Data { block: (i / BLOCK_SIZE) as u64 }));
    }
    // Read the rest of the blank zone in 32 KiB pieces.
    const CHUNK: u64 = 64;
    let end = blocks.min(BLANK_BLOCKS);
    let mut buf = vec![0u8; CHUNK as usize * BLOCK_SIZE];
    let mut at = head_blocks;
    while at < end {
        let n = CHUNK.min(end - at);
        let piece = &mut buf[..n as usize * BLOCK_SIZE];
        disk.read(at, piece)?;
        if let Some(i) = piece.iter().position(|&b| b != 0) {
            return Ok(DiskKind::Foreign(Foreign::Data { block: at + (i / BLOCK_SIZE) as u64 }));
        }
        at += n;
    }
    Ok(DiskKind::Blank)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mm::swap::MemBlockStore;

    #[test]
    fn a_zero_disk_is_blank_and_reading_it_writes_nothing() {
        let mut d = MemBlockStore::new(4096);
        assert_eq!(classify(&mut d), Ok(DiskKind::Blank));
        let s = d.stats();
        assert_eq!((s.writes, s.flushes, s.blocks_read), (0, 0, BLANK_BLOCKS));
        // Smaller than the blank zone: the whole disk is read; smaller
        // than the table area: too.
        for n in [10, 100] {
            let mut d = MemBlockStore::new(n);
            assert_eq!(classify(&mut d), Ok(DiskKind::Blank));
            assert_eq!(d.stats().blocks_read, n);
        }
    }

    #[test]
    fn data_anywhere_in_the_blank_zone_makes_a_disk_foreign() {
        // Block 0 (a boot sector, FAT), block 2 (the ext2 superblock at
        // byte 1024 + 56: magic 0xef53), the last block of the zone.
        for (block, offset) in [(0u64, 510usize), (2, 56), (BLANK_BLOCKS - 1, 511)] {
            let mut d = MemBlockStore::new(4096);
            d.raw_mut()[block as usize * BLOCK_SIZE + offset] = 0x53;
            let kind = classify(&mut d).unwrap();
            assert_eq!(kind, DiskKind::Foreign(Foreign::Data { block }));
            assert!(!kind.writable());
        }
        // Past the zone, data does not count: a blank disk is only known
        // blank as far as it was read.
        let mut d = MemBlockStore::new(4096);
        d.raw_mut()[BLANK_BLOCKS as usize * BLOCK_SIZE] = 1;
        assert_eq!(classify(&mut d), Ok(DiskKind::Blank));
    }

    #[test]
    fn a_swap_superblock_is_ours_and_a_damaged_one_is_not() {
        let mut d = MemBlockStore::new(4096);
        let sb = Superblock::for_device(4096, 7).unwrap();
        d.raw_mut()[..BLOCK_SIZE].copy_from_slice(&sb.encode());
        assert_eq!(classify(&mut d), Ok(DiskKind::OldSwap(sb)));
        assert!(classify(&mut d).unwrap().writable());
        // One bit off: the checksum fails, and the disk is left alone.
        d.corrupt(0, 20, 1);
        assert_eq!(classify(&mut d), Ok(DiskKind::Foreign(Foreign::Unusable(SuperblockRefusal::BadChecksum))));
        // Formatted for another size: someone else's swap.
        let mut d = MemBlockStore::new(4000);
        d.raw_mut()[..BLOCK_SIZE].copy_from_slice(&sb.encode());
        let kind = classify(&mut d).unwrap();
        assert_eq!(
            kind,
            DiskKind::Foreign(Foreign::Unusable(SuperblockRefusal::DeviceSizeMismatch {
                recorded: 4096,
                actual: 4000
            }))
        );
        if let DiskKind::Foreign(f) = kind {
            assert_eq!(
                f.to_string(),
                "block 0 has a swap superblock this build cannot use: the superblock is for a device of 4096 \
                 blocks, this one has 4000"
            );
        }
    }

    #[test]
    fn a_read_error_is_reported_not_guessed() {
        let mut d = MemBlockStore::new(4096);
        d.fail_reads_after(1, 1);
        assert_eq!(classify(&mut d), Err(Error::BlockIo { block: DATA_START, write: false }));
        let mut d = MemBlockStore::new(4096);
        d.fail_next_reads(1);
        assert_eq!(classify(&mut d), Err(Error::BlockIo { block: 0, write: false }));
        assert_eq!(d.stats().writes, 0);
    }

    #[test]
    fn an_extent_table_is_ours_even_with_one_copy_damaged_and_not_with_both() {
        use crate::disk::space::{FormatOptions, Space};
        use alloc::rc::Rc;
        use core::cell::RefCell;
        let d = Rc::new(RefCell::new(MemBlockStore::new(4096)));
        let s = Space::format(d.clone(), &FormatOptions::default(), 9).unwrap();
        let table = Table { generation: s.generation(), disk_blocks: 4096, extents: s.list().to_vec() };
        drop(s);
        let kind = classify(&mut d.clone()).unwrap();
        assert_eq!(kind, DiskKind::Space { table: table.clone(), copy: Copy::A, refused: None });
        // Copy A (the newest) damaged: copy B is used, one generation back.
        d.borrow_mut().corrupt(0, 100, 1);
        match classify(&mut d.clone()).unwrap() {
            DiskKind::Space { table: t, copy: Copy::B, refused: Some(CopyRefusal::BadChecksum) } => {
                assert_eq!((t.generation, t.extents), (table.generation - 1, table.extents.clone()));
            }
            other => panic!("{other:?}"),
        }
        d.borrow_mut().corrupt(16, 100, 1);
        let kind = classify(&mut d.clone()).unwrap();
        let want = Foreign::DamagedTable { a: CopyRefusal::BadChecksum, b: CopyRefusal::BadChecksum };
        assert_eq!(kind, DiskKind::Foreign(want));
        assert_eq!(
            want.to_string(),
            "both copies of the extent table are unusable (A: the checksum does not match; B: the checksum does not \
             match)"
        );
        assert_eq!(d.borrow().stats().writes, 2, "only the format wrote");
    }
}
