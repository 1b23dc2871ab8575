//! The boot-time disk check: write a pattern over one swap slot's worth of
//! blocks at the end of the disk, read it back and compare, then put the
//! old contents back. It catches a driver that moves the wrong bytes or the
//! wrong blocks before swap trusts the disk with guest memory.
//!
//! It writes, so it runs only on a disk that [`classify`] found blank or
//! already ours (`memory::swap` makes sure). Once the pattern may have
//! reached the disk, every way out puts the saved contents back, reads them
//! back to be sure, and flushes; if that fails after
//! [`RESTORE_ATTEMPTS`] tries, the error says so loudly.
//!
//! [`classify`]: super::classify::classify

use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use mm::Error;
use mm::swap::{BLOCK_SIZE, BlockStore};

/// Blocks the check moves: one swap slot (a header block and a 4 KiB page).
pub const CHECK_BLOCKS: u64 = 9;

/// Tries at putting the old contents back (write, read back, flush) before
/// giving up: a transient error should not leave the pattern on a disk.
pub const RESTORE_ATTEMPTS: u32 = 3;

/// What went wrong with the pattern itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Writing the pattern failed (part of it may have landed).
    WritePattern(Error),
    /// Reading the pattern back failed.
    ReadBack(Error),
    /// What was read back differs from what was written.
    Mismatch { block: u64, offset: usize, wrote: u8, read: u8 },
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::WritePattern(e) => write!(f, "writing the pattern failed: {e}"),
            Fault::ReadBack(e) => write!(f, "reading the pattern back failed: {e}"),
            Fault::Mismatch { block, offset, wrote, read } => {
                write!(f, "block {block} byte {offset}: wrote {wrote:#04x}, read back {read:#04x}")
            }
        }
    }
}

/// Why putting the old contents back failed (the last attempt's reason).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestoreError {
    Write(Error),
    ReadBack(Error),
    /// The write reported success but the disk does not hold the old data.
    Differs {
        block: u64,
        offset: usize,
    },
    Flush(Error),
}

impl fmt::Display for RestoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RestoreError::Write(e) => write!(f, "writing failed: {e}"),
            RestoreError::ReadBack(e) => write!(f, "reading back failed: {e}"),
            RestoreError::Differs { block, offset } => {
                write!(f, "the write was lost: block {block} byte {offset} still differs")
            }
            RestoreError::Flush(e) => write!(f, "flushing failed: {e}"),
        }
    }
}

/// Why a disk failed the check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckError {
    /// The disk is smaller than the pattern; nothing was written.
    TooSmall { blocks: u64 },
    /// Saving the old contents failed; nothing was written.
    Unreadable(Error),
    /// The pattern test failed; the old contents were put back (and read
    /// back and flushed).
    Failed(Fault),
    /// The old contents could not be put back in [`RESTORE_ATTEMPTS`]
    /// tries: blocks `first..first + CHECK_BLOCKS` may hold the pattern.
    /// `fault` is what failed before, if the pattern test did.
    NotRestored { first: u64, fault: Option<Fault>, error: RestoreError },
}

impl CheckError {
    /// Did the check leave the disk as it found it?
    pub fn disk_unchanged(&self) -> bool {
        !matches!(self, CheckError::NotRestored { .. })
    }
}

impl fmt::Display for CheckError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckError::TooSmall { blocks } => {
                write!(f, "the disk has {blocks} blocks, fewer than {CHECK_BLOCKS}; nothing written")
            }
            CheckError::Unreadable(e) => write!(f, "saving the old contents failed: {e}; nothing written"),
            CheckError::Failed(fault) => write!(f, "{fault}; the old contents were restored"),
            CheckError::NotRestored { first, fault, error } => {
                match fault {
                    Some(fault) => write!(f, "{fault}, and ")?,
                    None => write!(f, "the pattern passed, but ")?,
                }
                write!(
                    f,
                    "RESTORING THE OLD CONTENTS FAILED after {RESTORE_ATTEMPTS} attempts ({error}): blocks \
                     {first}..{} may hold the test pattern",
                    first + CHECK_BLOCKS
                )
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

/// The first index where `a` and `b` differ, as (block, offset) from `first`.
fn first_difference(first: u64, a: &[u8], b: &[u8]) -> Option<(u64, usize)> {
    let i = a.iter().zip(b).position(|(x, y)| x != y)?;
    Some((first + (i / BLOCK_SIZE) as u64, i % BLOCK_SIZE))
}

/// Runs the check on the last [`CHECK_BLOCKS`] blocks of `disk`; returns
/// the first block it used. On success, and on every error but
/// [`CheckError::NotRestored`], the disk holds what it held before.
pub fn check(disk: &mut dyn BlockStore) -> Result<u64, CheckError> {
    let blocks = disk.block_count();
    if blocks < CHECK_BLOCKS {
        return Err(CheckError::TooSmall { blocks });
    }
    let first = blocks - CHECK_BLOCKS;
    let len = CHECK_BLOCKS as usize * BLOCK_SIZE;
    let mut saved = vec![0u8; len];
    disk.read(first, &mut saved).map_err(CheckError::Unreadable)?;
    let pattern: Vec<u8> = (0..len).map(|i| pattern_byte(first + (i / BLOCK_SIZE) as u64, i % BLOCK_SIZE)).collect();
    // From here on the pattern may be on the disk: every path restores.
    let mut back = vec![0u8; len];
    let fault = match disk.write(first, &pattern) {
        Err(e) => Some(Fault::WritePattern(e)),
        Ok(()) => match disk.read(first, &mut back) {
            Err(e) => Some(Fault::ReadBack(e)),
            Ok(()) => first_difference(first, &pattern, &back).map(|(block, offset)| {
                let i = (block - first) as usize * BLOCK_SIZE + offset;
                Fault::Mismatch { block, offset, wrote: pattern[i], read: back[i] }
            }),
        },
    };
    match (restore(disk, first, &saved, &mut back), fault) {
        (Ok(()), None) => Ok(first),
        (Ok(()), Some(fault)) => Err(CheckError::Failed(fault)),
        (Err(error), fault) => Err(CheckError::NotRestored { first, fault, error }),
    }
}

/// Puts `saved` back at `first`, reads it back and flushes, up to
/// [`RESTORE_ATTEMPTS`] times; the last attempt's error if none succeeded.
fn restore(disk: &mut dyn BlockStore, first: u64, saved: &[u8], scratch: &mut [u8]) -> Result<(), RestoreError> {
    let mut last = None;
    for _ in 0..RESTORE_ATTEMPTS {
        let attempt = (|| {
            disk.write(first, saved).map_err(RestoreError::Write)?;
            disk.read(first, scratch).map_err(RestoreError::ReadBack)?;
            if let Some((block, offset)) = first_difference(first, saved, scratch) {
                return Err(RestoreError::Differs { block, offset });
            }
            disk.flush().map_err(RestoreError::Flush)
        })();
        match attempt {
            Ok(()) => return Ok(()),
            Err(e) => last = Some(e),
        }
    }
    Err(last.expect("at least one attempt"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mm::swap::MemBlockStore;

    /// A 64-block disk full of non-zero data; the check uses blocks 55..64.
    fn disk_with_data() -> (MemBlockStore, Vec<u8>) {
        let mut disk = MemBlockStore::new(64);
        for (i, b) in disk.raw_mut().iter_mut().enumerate() {
            *b = (i % 251) as u8 | 1;
        }
        let before = disk.raw().to_vec();
        (disk, before)
    }

    #[test]
    fn a_good_disk_passes_and_keeps_its_contents() {
        let mut disk = MemBlockStore::new(100);
        for (i, b) in disk.raw_mut().iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        let before = disk.raw().to_vec();
        assert_eq!(check(&mut disk), Ok(91));
        assert_eq!(disk.raw(), &before[..]);
        // Save, pattern, read back, restore, read back the restore, flush.
        let s = disk.stats();
        assert_eq!((s.reads, s.writes, s.flushes, s.blocks_written), (3, 2, 1, 18));
    }

    #[test]
    fn the_smallest_disk_is_checked_whole() {
        let mut disk = MemBlockStore::new(CHECK_BLOCKS);
        assert_eq!(check(&mut disk), Ok(0));
        let mut small = MemBlockStore::new(8);
        assert_eq!(check(&mut small), Err(CheckError::TooSmall { blocks: 8 }));
        assert_eq!(small.stats().writes, 0);
    }

    #[test]
    fn after_a_mismatch_the_old_contents_are_back() {
        let (mut disk, before) = disk_with_data();
        // The pattern write is lost: what is read back is the old data.
        disk.lose_next_writes(1);
        let err = check(&mut disk).unwrap_err();
        assert!(matches!(err, CheckError::Failed(Fault::Mismatch { block: 55, offset: 0, .. })), "{err:?}");
        assert!(err.to_string().ends_with("; the old contents were restored"), "{err}");
        assert!(err.disk_unchanged());
        assert!(disk.raw() == &before[..], "the check left the pattern behind");

        // A mismatch in the last byte only (a short transfer): the pattern
        // is on the disk, and must go.
        let (mut disk, before) = disk_with_data();
        let mut bad = MismatchAtEnd(disk, true);
        let err = check(&mut bad).unwrap_err();
        assert!(matches!(err, CheckError::Failed(Fault::Mismatch { block: 63, offset: 511, .. })), "{err:?}");
        disk = bad.0;
        assert!(disk.raw() == &before[..], "the check left the pattern behind");
    }

    /// Reads back the pattern with its last byte flipped, once.
    struct MismatchAtEnd(MemBlockStore, bool);
    impl BlockStore for MismatchAtEnd {
        fn block_count(&self) -> u64 {
            self.0.block_count()
        }
        fn read(&mut self, block: u64, buf: &mut [u8]) -> Result<(), Error> {
            self.0.read(block, buf)?;
            // The second read is the pattern's read-back.
            if self.0.stats().reads == 2 && core::mem::take(&mut self.1) {
                *buf.last_mut().unwrap() ^= 0x40;
            }
            Ok(())
        }
        fn write(&mut self, block: u64, buf: &[u8]) -> Result<(), Error> {
            self.0.write(block, buf)
        }
        fn flush(&mut self) -> Result<(), Error> {
            self.0.flush()
        }
    }

    #[test]
    fn after_a_failed_read_back_or_pattern_write_the_old_contents_are_back() {
        let (mut disk, before) = disk_with_data();
        disk.fail_reads_after(1, 1);
        let err = check(&mut disk).unwrap_err();
        assert_eq!(err, CheckError::Failed(Fault::ReadBack(Error::BlockIo { block: 55, write: false })));
        assert!(disk.raw() == &before[..], "the check left the pattern behind");
        assert_eq!(disk.stats().flushes, 1);

        let (mut disk, before) = disk_with_data();
        disk.fail_next_writes(1);
        let err = check(&mut disk).unwrap_err();
        assert_eq!(err, CheckError::Failed(Fault::WritePattern(Error::BlockIo { block: 55, write: true })));
        assert_eq!(
            err.to_string(),
            "writing the pattern failed: The device failed a write at block 55; the old contents were restored"
        );
        assert!(disk.raw() == &before[..]);
    }

    #[test]
    fn nothing_is_written_when_the_old_contents_cannot_be_saved() {
        let (mut disk, before) = disk_with_data();
        disk.fail_next_reads(1);
        let err = check(&mut disk).unwrap_err();
        assert_eq!(err, CheckError::Unreadable(Error::BlockIo { block: 55, write: false }));
        assert_eq!(disk.stats().writes, 0);
        assert!(disk.raw() == &before[..]);
    }

    #[test]
    fn a_failed_restore_is_retried() {
        // The first restore write fails, the second is lost (read back
        // finds it), the third lands.
        let (mut disk, before) = disk_with_data();
        disk.fail_writes_after(1, 1);
        disk.lose_writes_after(1, 1);
        assert_eq!(check(&mut disk), Ok(55));
        assert!(disk.raw() == &before[..]);
        let (mut disk, before) = disk_with_data();
        disk.fail_next_flushes(2);
        assert_eq!(check(&mut disk), Ok(55));
        assert!(disk.raw() == &before[..]);
    }

    #[test]
    fn a_restore_that_keeps_failing_is_reported_as_such() {
        let (mut disk, _) = disk_with_data();
        disk.fail_writes_after(1, RESTORE_ATTEMPTS);
        let err = check(&mut disk).unwrap_err();
        assert_eq!(
            err,
            CheckError::NotRestored {
                first: 55,
                fault: None,
                error: RestoreError::Write(Error::BlockIo { block: 55, write: true })
            }
        );
        assert!(!err.disk_unchanged());
        assert_eq!(
            err.to_string(),
            "the pattern passed, but RESTORING THE OLD CONTENTS FAILED after 3 attempts (writing failed: The \
             device failed a write at block 55): blocks 55..64 may hold the test pattern"
        );
        // After a mismatch too (the pattern landed), with every restore lost.
        let (mut disk, _) = disk_with_data();
        disk.lose_writes_after(1, RESTORE_ATTEMPTS);
        let err = check(&mut MismatchAtEnd(disk, true)).unwrap_err();
        assert!(
            matches!(
                err,
                CheckError::NotRestored {
                    first: 55,
                    fault: Some(Fault::Mismatch { block: 63, offset: 511, .. }),
                    error: RestoreError::Differs { block: 55, offset: 0 }
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains(", and RESTORING THE OLD CONTENTS FAILED"), "{err}");
        // Flushing never succeeds: not known to be restored.
        let (mut disk, _) = disk_with_data();
        disk.fail_next_flushes(RESTORE_ATTEMPTS);
        let err = check(&mut disk).unwrap_err();
        assert!(matches!(err, CheckError::NotRestored { error: RestoreError::Flush(_), .. }), "{err:?}");
    }

    #[test]
    fn the_pattern_differs_between_blocks_and_offsets() {
        let a: Vec<u8> = (0..BLOCK_SIZE).map(|i| pattern_byte(7, i)).collect();
        let b: Vec<u8> = (0..BLOCK_SIZE).map(|i| pattern_byte(8, i)).collect();
        assert_ne!(a, b);
        assert_ne!(a[..256], a[256..]);
        // Not a constant: a zero-filled or stuck disk cannot pass by accident.
        assert!(a.iter().filter(|&&x| x == 0).count() < 16);
    }
}
