//! Whose disk is this? Decided from reads alone, before anything writes:
//! the boot-time self-check and the swap set-up both write, and both may
//! only do so on a disk that is blank or already our swap device. This is
//! the one place that decides it; `memory::swap` asks it once per boot and
//! both the self-check gate and the choice between formatting and
//! reopening follow from the answer.

use alloc::vec;
use core::fmt;

use mm::Error;
use mm::swap::format::Superblock;
use mm::swap::{BLOCK_SIZE, BlockStore, SuperblockRefusal};

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
    /// Block 0 holds a valid swap superblock of this format: ours from an
    /// earlier run, to be checked and reopened.
    Swap(Superblock),
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
    /// No swap superblock in block 0, and `block` is not all zeros.
    Data { block: u64 },
    /// Block 0 starts with the swap magic but the superblock is not one
    /// this build can use (damaged, another version, another disk size):
    /// it may hold another build's swap, so it is left alone too.
    Unusable(SuperblockRefusal),
}

impl fmt::Display for Foreign {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Foreign::Data { block } => {
                write!(f, "block 0 has no swap superblock and block {block} holds data (not blank)")
            }
            Foreign::Unusable(why) => write!(f, "block 0 has a swap superblock this build cannot use: {why}"),
        }
    }
}

/// Classifies `disk` by reading it (block 0, then up to [`BLANK_BLOCKS`]);
/// never writes. A read error is returned as is: a disk that cannot be
/// read is not used either.
pub fn classify(disk: &mut dyn BlockStore) -> Result<DiskKind, Error> {
    let blocks = disk.block_count();
    if blocks == 0 {
        // Nothing to read, nothing to lose; formatting refuses it later.
        return Ok(DiskKind::Blank);
    }
    let mut b0 = [0u8; BLOCK_SIZE];
    disk.read(0, &mut b0)?;
    match Superblock::decode(&b0, blocks) {
        Ok(sb) => return Ok(DiskKind::Swap(sb)),
        Err(SuperblockRefusal::NoMagic) => {}
        Err(why) => return Ok(DiskKind::Foreign(Foreign::Unusable(why))),
    }
    if b0.iter().any(|&b| b != 0) {
        return Ok(DiskKind::Foreign(Foreign::Data { block: 0 }));
    }
    // Read the rest of the blank zone in 32 KiB pieces.
    const CHUNK: u64 = 64;
    let end = blocks.min(BLANK_BLOCKS);
    let mut buf = vec![0u8; CHUNK as usize * BLOCK_SIZE];
    let mut at = 1;
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
        // Smaller than the blank zone: the whole disk is read.
        let mut d = MemBlockStore::new(10);
        assert_eq!(classify(&mut d), Ok(DiskKind::Blank));
        assert_eq!(d.stats().blocks_read, 10);
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
        assert_eq!(classify(&mut d), Ok(DiskKind::Swap(sb)));
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
        assert_eq!(classify(&mut d), Err(Error::BlockIo { block: 1, write: false }));
        let mut d = MemBlockStore::new(4096);
        d.fail_next_reads(1);
        assert_eq!(classify(&mut d), Err(Error::BlockIo { block: 0, write: false }));
        assert_eq!(d.stats().writes, 0);
    }
}
