//! The boot-time disk check: write a pattern over one swap slot's worth of
//! blocks at the end of the disk, read it back and compare, then put the
//! old contents back. It catches a driver that moves the wrong bytes or the
//! wrong blocks before swap trusts the disk with guest memory.

use alloc::vec;
use core::fmt;

use mm::Error;
use mm::swap::{BLOCK_SIZE, BlockStore};

/// Blocks the check moves: one swap slot (a header block and a 4 KiB page).
pub const CHECK_BLOCKS: u64 = 9;

/// Why a disk failed the check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckError {
    /// The disk is smaller than the pattern.
    TooSmall { blocks: u64 },
    /// A transfer failed (`step` says which).
    Io { step: &'static str, error: Error },
    /// What was read back differs from what was written.
    Mismatch { block: u64, offset: usize, wrote: u8, read: u8 },
}

impl fmt::Display for CheckError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckError::TooSmall { blocks } => write!(f, "the disk has {blocks} blocks, fewer than {CHECK_BLOCKS}"),
            CheckError::Io { step, error } => write!(f, "{step} failed: {error}"),
            CheckError::Mismatch { block, offset, wrote, read } => {
                write!(f, "block {block} byte {offset}: wrote {wrote:#04x}, read back {read:#04x}")
            }
        }
    }
}

/// The pattern byte at `offset` of `block`: it differs between blocks and
/// between a block's halves, so a transfer to the wrong block, a short
/// transfer or swapped bytes all show.
pub fn pattern_byte(block: u64, offset: usize) -> u8 {
    let x = block.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (offset as u64).wrapping_mul(0xff51_afd7_ed55_8ccd);
    (x >> 56) as u8 ^ (offset as u8)
}

/// Runs the check on the last [`CHECK_BLOCKS`] blocks of `disk`; returns
/// the first block it used. The disk's contents there are restored (and
/// flushed) when the check passes; after a failure they are unspecified.
pub fn check(disk: &mut dyn BlockStore) -> Result<u64, CheckError> {
    let blocks = disk.block_count();
    if blocks < CHECK_BLOCKS {
        return Err(CheckError::TooSmall { blocks });
    }
    let first = blocks - CHECK_BLOCKS;
    let len = CHECK_BLOCKS as usize * BLOCK_SIZE;
    let io = |step| move |error| CheckError::Io { step, error };
    let mut saved = vec![0u8; len];
    disk.read(first, &mut saved).map_err(io("reading the old contents"))?;
    let mut pattern = vec![0u8; len];
    for (i, b) in pattern.iter_mut().enumerate() {
        *b = pattern_byte(first + (i / BLOCK_SIZE) as u64, i % BLOCK_SIZE);
    }
    disk.write(first, &pattern).map_err(io("writing the pattern"))?;
    let mut back = vec![0u8; len];
    disk.read(first, &mut back).map_err(io("reading the pattern back"))?;
    if let Some(i) = (0..len).find(|&i| back[i] != pattern[i]) {
        return Err(CheckError::Mismatch {
            block: first + (i / BLOCK_SIZE) as u64,
            offset: i % BLOCK_SIZE,
            wrote: pattern[i],
            read: back[i],
        });
    }
    disk.write(first, &saved).map_err(io("restoring the old contents"))?;
    disk.flush().map_err(io("flushing"))?;
    Ok(first)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mm::swap::MemBlockStore;

    #[test]
    fn a_good_disk_passes_and_keeps_its_contents() {
        let mut disk = MemBlockStore::new(100);
        for (i, b) in disk.raw_mut().iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        let before = disk.raw().to_vec();
        assert_eq!(check(&mut disk), Ok(91));
        assert_eq!(disk.raw(), &before[..]);
        let s = disk.stats();
        assert_eq!((s.reads, s.writes, s.flushes, s.blocks_written), (2, 2, 1, 18));
    }

    #[test]
    fn the_smallest_disk_is_checked_whole() {
        let mut disk = MemBlockStore::new(CHECK_BLOCKS);
        assert_eq!(check(&mut disk), Ok(0));
        assert_eq!(check(&mut MemBlockStore::new(8)), Err(CheckError::TooSmall { blocks: 8 }));
    }

    #[test]
    fn a_lost_write_is_a_mismatch() {
        let mut disk = MemBlockStore::new(64);
        disk.lose_next_writes(1);
        let err = check(&mut disk).unwrap_err();
        assert!(matches!(err, CheckError::Mismatch { block: 55, offset: 0, read: 0, .. }), "{err:?}");
    }

    #[test]
    fn failed_transfers_name_the_step() {
        let mut disk = MemBlockStore::new(64);
        disk.fail_next_writes(1);
        let err = check(&mut disk).unwrap_err();
        assert_eq!(
            err,
            CheckError::Io { step: "writing the pattern", error: Error::BlockIo { block: 55, write: true } }
        );
        assert_eq!(err.to_string(), "writing the pattern failed: The device failed a write at block 55");
        let mut disk = MemBlockStore::new(64);
        disk.fail_next_reads(1);
        assert!(matches!(check(&mut disk), Err(CheckError::Io { step: "reading the old contents", .. })));
    }

    #[test]
    fn the_pattern_differs_between_blocks_and_offsets() {
        let a: alloc::vec::Vec<u8> = (0..BLOCK_SIZE).map(|i| pattern_byte(7, i)).collect();
        let b: alloc::vec::Vec<u8> = (0..BLOCK_SIZE).map(|i| pattern_byte(8, i)).collect();
        assert_ne!(a, b);
        assert_ne!(a[..256], a[256..]);
        // Not a constant: a zero-filled or stuck disk cannot pass by accident.
        assert!(a.iter().filter(|&&x| x == 0).count() < 16);
    }
}
