//! Views of one extent: a [`BlockStore`] over its blocks (for swap, later
//! VM disk images), and a byte stream writer and reader (for checkpoints).

use alloc::vec;
use alloc::vec::Vec;

use mm::swap::{BLOCK_SIZE, BlockStore, check_transfer};

use super::{ExtentInfo, Space, SpaceError};

/// Blocks one stream transfer moves at most (64 KiB): large enough to
/// keep requests few, small enough for a heap buffer.
const CHUNK_BLOCKS: usize = 128;

/// A block store over blocks `start..start + blocks` of `dev`: block 0 of
/// the view is `start` on the disk, and transfers that would leave the
/// extent are refused (in the view's numbering) before the device sees
/// them.
#[derive(Debug)]
pub struct ExtentStore<D: BlockStore> {
    dev: D,
    start: u64,
    blocks: u64,
}

impl<D: BlockStore> ExtentStore<D> {
    pub fn new(dev: D, start: u64, blocks: u64) -> Self {
        ExtentStore { dev, start, blocks }
    }

    /// The extent's first block on the disk.
    pub fn start(&self) -> u64 {
        self.start
    }
}

impl<D: BlockStore> BlockStore for ExtentStore<D> {
    fn block_count(&self) -> u64 {
        self.blocks
    }

    fn read(&mut self, block: u64, buf: &mut [u8]) -> Result<(), mm::Error> {
        check_transfer(self.blocks, block, buf.len())?;
        self.dev.read(self.start + block, buf)
    }

    fn write(&mut self, block: u64, buf: &[u8]) -> Result<(), mm::Error> {
        check_transfer(self.blocks, block, buf.len())?;
        self.dev.write(self.start + block, buf)
    }

    fn flush(&mut self) -> Result<(), mm::Error> {
        self.dev.flush()
    }
}

/// Appends bytes to a checkpoint extent made by
/// [`Space::create_checkpoint`]. [`close`](Self::close) writes the last
/// partial block, trims the unused tail, records the exact length and
/// marks the extent complete. Dropped without `close` (or after an I/O
/// error), the extent stays incomplete: listed as such, and dropped by the
/// next [`Space::open`]; [`abort`](Self::abort) deletes it at once.
///
/// It holds its own handle on the device, not the space manager, so a
/// save can run in the background while other commands use the table;
/// `close` and `abort` take the manager back.
pub struct StreamWriter<D: BlockStore> {
    dev: D,
    info: ExtentInfo,
    /// Bytes accepted so far.
    bytes: u64,
    /// The bytes of the block not yet written (`bytes % BLOCK_SIZE` of them).
    partial: Vec<u8>,
}

impl<D: BlockStore> StreamWriter<D> {
    pub(super) fn new(dev: D, info: ExtentInfo) -> Self {
        StreamWriter { dev, info, bytes: 0, partial: Vec::with_capacity(BLOCK_SIZE) }
    }

    /// The extent as created (incomplete, at its maximum size).
    pub fn info(&self) -> &ExtentInfo {
        &self.info
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// Appends `data`. Refused without writing anything if it would pass
    /// the extent's maximum ([`SpaceError::StreamFull`]).
    pub fn write_all(&mut self, mut data: &[u8]) -> Result<(), SpaceError> {
        let max_bytes = self.info.capacity_bytes();
        if self.bytes.checked_add(data.len() as u64).is_none_or(|end| end > max_bytes) {
            return Err(SpaceError::StreamFull { max_bytes });
        }
        let start = self.info.start;
        let block = move |bytes: u64| start + bytes / BLOCK_SIZE as u64;
        if !self.partial.is_empty() {
            let take = data.len().min(BLOCK_SIZE - self.partial.len());
            self.partial.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.partial.len() == BLOCK_SIZE {
                let at = block(self.bytes - (self.bytes % BLOCK_SIZE as u64));
                self.dev.write(at, &self.partial)?;
                self.partial.clear();
            }
            self.bytes += take as u64;
        }
        // Whole blocks straight from the caller's buffer.
        while data.len() >= BLOCK_SIZE {
            let n = (data.len() / BLOCK_SIZE).min(CHUNK_BLOCKS) * BLOCK_SIZE;
            self.dev.write(block(self.bytes), &data[..n])?;
            data = &data[n..];
            self.bytes += n as u64;
        }
        self.partial.extend_from_slice(data);
        self.bytes += data.len() as u64;
        Ok(())
    }

    /// Finishes the stream: the last block (zero padded), a flush, then the
    /// table records the length, the trimmed size and the complete flag.
    pub fn close(mut self, space: &mut Space<D>) -> Result<ExtentInfo, SpaceError> {
        if !self.partial.is_empty() {
            let at = self.info.start + self.bytes / BLOCK_SIZE as u64;
            self.partial.resize(BLOCK_SIZE, 0);
            self.dev.write(at, &self.partial)?;
        }
        self.dev.flush()?;
        let bytes = self.bytes;
        let used = bytes.div_ceil(BLOCK_SIZE as u64).next_multiple_of(super::ALIGN_BLOCKS).max(super::ALIGN_BLOCKS);
        space.update(self.info.name, |e| {
            e.blocks = used.min(e.blocks);
            e.bytes = bytes;
            e.complete = true;
        })
    }

    /// Gives up: deletes the extent.
    pub fn abort(self, space: &mut Space<D>) -> Result<(), SpaceError> {
        space.delete(self.info.name.as_str(), |_| None).map(|_| ())
    }
}

/// Reads a complete extent's bytes back, from the start. It holds its own
/// handle on the device, not the space manager: a restore reading a
/// checkpoint can still open the VM's disk image through the manager.
pub struct StreamReader<D: BlockStore> {
    dev: D,
    info: ExtentInfo,
    pos: u64,
    scratch: Vec<u8>,
}

impl<D: BlockStore> StreamReader<D> {
    pub(super) fn new(dev: D, info: ExtentInfo) -> Self {
        StreamReader { dev, info, pos: 0, scratch: vec![0; BLOCK_SIZE] }
    }

    pub fn info(&self) -> &ExtentInfo {
        &self.info
    }

    /// Bytes left to read.
    pub fn remaining(&self) -> u64 {
        self.info.bytes - self.pos
    }

    /// Reads up to `buf.len()` bytes; 0 at the end of the stream.
    pub fn read(&mut self, buf: &mut [u8]) -> Result<usize, SpaceError> {
        let n = usize::try_from(self.remaining()).unwrap_or(usize::MAX).min(buf.len());
        let mut done = 0;
        while done < n {
            let block = self.info.start + self.pos / BLOCK_SIZE as u64;
            let off = (self.pos % BLOCK_SIZE as u64) as usize;
            let left = n - done;
            let step = if off == 0 && left >= BLOCK_SIZE {
                let len = (left / BLOCK_SIZE).min(CHUNK_BLOCKS) * BLOCK_SIZE;
                self.dev.read(block, &mut buf[done..done + len])?;
                len
            } else {
                self.dev.read(block, &mut self.scratch)?;
                let len = left.min(BLOCK_SIZE - off);
                buf[done..done + len].copy_from_slice(&self.scratch[off..off + len]);
                len
            };
            done += step;
            self.pos += step as u64;
        }
        Ok(done)
    }
}
