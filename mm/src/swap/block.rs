//! The disk under host swap, behind one small synchronous trait.

use crate::Error;

/// Bytes in one block. 512 is the unit both drivers the kernel will have
/// address in (virtio-blk counts in 512-byte sectors whatever the medium;
/// ATA PIO moves 512-byte sectors), so every driver can implement
/// [`BlockStore`] without read-modify-write. A swap slot is then nine
/// blocks (one header sector and the 4 KiB page, 12.5 % overhead) written
/// by one request, instead of two 4 KiB blocks (100 % overhead) or a shared
/// header block (two writes per page-out and a torn-update window).
pub const BLOCK_SIZE: usize = 512;

/// A disk addressed in [`BLOCK_SIZE`]-byte blocks.
///
/// Synchronous and minimal on purpose: a driver (virtio-blk under QEMU, ATA
/// PIO under Bochs) implements it by polling. Transfers may span several
/// consecutive blocks (`buf.len()` a non-zero multiple of [`BLOCK_SIZE`]) so
/// a driver can issue one request per swap slot.
pub trait BlockStore {
    /// Blocks on the device.
    fn block_count(&self) -> u64;

    /// Read `buf.len() / BLOCK_SIZE` blocks starting at `block`.
    ///
    /// Errors: [`Error::BadBlockBuffer`], [`Error::BlockOutOfRange`],
    /// [`Error::BlockIo`] (the device failed; `buf` is then unspecified).
    fn read(&mut self, block: u64, buf: &mut [u8]) -> Result<(), Error>;

    /// Write `buf.len() / BLOCK_SIZE` blocks starting at `block`. When it
    /// returns `Ok`, a later `read` returns the new contents.
    ///
    /// Errors as for [`read`](Self::read); after [`Error::BlockIo`] the
    /// blocks' contents are unspecified.
    fn write(&mut self, block: u64, buf: &[u8]) -> Result<(), Error>;

    /// Make completed writes durable (write cache flush).
    fn flush(&mut self) -> Result<(), Error>;
}

/// A shared handle is a block store: a test hands one clone to the code
/// under test and keeps another to look at (or damage) the disk.
impl<T: BlockStore> BlockStore for alloc::rc::Rc<core::cell::RefCell<T>> {
    fn block_count(&self) -> u64 {
        self.borrow().block_count()
    }
    fn read(&mut self, block: u64, buf: &mut [u8]) -> Result<(), Error> {
        self.borrow_mut().read(block, buf)
    }
    fn write(&mut self, block: u64, buf: &[u8]) -> Result<(), Error> {
        self.borrow_mut().write(block, buf)
    }
    fn flush(&mut self) -> Result<(), Error> {
        self.borrow_mut().flush()
    }
}

/// A boxed driver is a block store: the kernel picks its swap disk's driver
/// at boot (ATA or virtio-blk) and keeps it as `Box<dyn BlockStore>`.
impl<T: BlockStore + ?Sized> BlockStore for alloc::boxed::Box<T> {
    fn block_count(&self) -> u64 {
        (**self).block_count()
    }
    fn read(&mut self, block: u64, buf: &mut [u8]) -> Result<(), Error> {
        (**self).read(block, buf)
    }
    fn write(&mut self, block: u64, buf: &[u8]) -> Result<(), Error> {
        (**self).write(block, buf)
    }
    fn flush(&mut self) -> Result<(), Error> {
        (**self).flush()
    }
}

/// Check a transfer's shape against a device of `blocks` blocks; returns
/// the number of blocks it covers. Drivers and [`MemBlockStore`] share it so
/// they refuse the same requests with the same errors.
pub fn check_transfer(blocks: u64, block: u64, len: usize) -> Result<u64, Error> {
    if len == 0 || !len.is_multiple_of(BLOCK_SIZE) {
        return Err(Error::BadBlockBuffer { len });
    }
    let n = (len / BLOCK_SIZE) as u64;
    match block.checked_add(n) {
        Some(end) if end <= blocks => Ok(n),
        _ => Err(Error::BlockOutOfRange { block, len: n }),
    }
}

#[cfg(any(test, feature = "sim"))]
pub use sim::{IoStats, MemBlockStore};

#[cfg(any(test, feature = "sim"))]
mod sim {
    use alloc::vec;
    use alloc::vec::Vec;

    use super::{BLOCK_SIZE, BlockStore, check_transfer};
    use crate::Error;

    /// I/O counters of a [`MemBlockStore`].
    #[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
    pub struct IoStats {
        /// `read` calls that succeeded.
        pub reads: u64,
        /// `write` calls that succeeded (including lost ones).
        pub writes: u64,
        /// `flush` calls.
        pub flushes: u64,
        /// Blocks moved by successful reads.
        pub blocks_read: u64,
        /// Blocks moved by successful writes.
        pub blocks_written: u64,
        /// Calls that failed by injection.
        pub injected_failures: u64,
    }

    /// An in-memory [`BlockStore`] with I/O counters and fault injection,
    /// for tests and benchmarks.
    #[derive(Debug)]
    pub struct MemBlockStore {
        data: Vec<u8>,
        stats: IoStats,
        fail_writes: Injected,
        fail_reads: Injected,
        fail_flushes: Injected,
        fail_write_block: Option<u64>,
        lose_writes: Injected,
    }

    /// One injected fault: let `skip` calls through, then hit `n`.
    #[derive(Clone, Copy, Debug, Default)]
    struct Injected {
        skip: u32,
        n: u32,
    }

    impl Injected {
        fn new(skip: u32, n: u32) -> Self {
            Self { skip, n }
        }

        /// Called once per call of the kind: does this one hit?
        fn hit(&mut self) -> bool {
            if self.n == 0 {
                false
            } else if self.skip > 0 {
                self.skip -= 1;
                false
            } else {
                self.n -= 1;
                true
            }
        }
    }

    impl MemBlockStore {
        /// A zero-filled device of `blocks` blocks.
        pub fn new(blocks: u64) -> Self {
            Self {
                data: vec![0; blocks as usize * BLOCK_SIZE],
                stats: IoStats::default(),
                fail_writes: Injected::default(),
                fail_reads: Injected::default(),
                fail_flushes: Injected::default(),
                fail_write_block: None,
                lose_writes: Injected::default(),
            }
        }

        /// The I/O counters so far.
        pub fn stats(&self) -> IoStats {
            self.stats
        }

        /// The raw device contents (tests inspect and tamper with them).
        pub fn raw(&self) -> &[u8] {
            &self.data
        }

        /// The raw device contents, writable, bypassing the counters.
        pub fn raw_mut(&mut self) -> &mut [u8] {
            &mut self.data
        }

        /// XOR `mask` into byte `offset` of `block` (a media error that the
        /// device does not notice). Returns false if out of range.
        pub fn corrupt(&mut self, block: u64, offset: usize, mask: u8) -> bool {
            let at = (block as usize).checked_mul(BLOCK_SIZE).and_then(|b| b.checked_add(offset));
            match at {
                Some(at) if offset < BLOCK_SIZE && at < self.data.len() => {
                    self.data[at] ^= mask;
                    true
                }
                _ => false,
            }
        }

        /// The next `n` writes fail with [`Error::BlockIo`] and change nothing.
        pub fn fail_next_writes(&mut self, n: u32) {
            self.fail_writes_after(0, n);
        }

        /// After `skip` more writes, `n` writes fail with
        /// [`Error::BlockIo`] and change nothing.
        pub fn fail_writes_after(&mut self, skip: u32, n: u32) {
            self.fail_writes = Injected::new(skip, n);
        }

        /// The next write that touches `block` fails.
        pub fn fail_write_to(&mut self, block: u64) {
            self.fail_write_block = Some(block);
        }

        /// The next `n` reads fail with [`Error::BlockIo`].
        pub fn fail_next_reads(&mut self, n: u32) {
            self.fail_reads_after(0, n);
        }

        /// After `skip` more reads, `n` reads fail with [`Error::BlockIo`].
        pub fn fail_reads_after(&mut self, skip: u32, n: u32) {
            self.fail_reads = Injected::new(skip, n);
        }

        /// The next `n` flushes fail with [`Error::BlockIo`].
        pub fn fail_next_flushes(&mut self, n: u32) {
            self.fail_flushes = Injected::new(0, n);
        }

        /// The next `n` writes report success but store nothing (a lying
        /// write cache or a misdirected write).
        pub fn lose_next_writes(&mut self, n: u32) {
            self.lose_writes_after(0, n);
        }

        /// After `skip` more writes (that do not fail by injection), `n`
        /// writes report success but store nothing.
        pub fn lose_writes_after(&mut self, skip: u32, n: u32) {
            self.lose_writes = Injected::new(skip, n);
        }

        fn range(block: u64, n: u64) -> core::ops::Range<usize> {
            let start = block as usize * BLOCK_SIZE;
            start..start + n as usize * BLOCK_SIZE
        }
    }

    impl BlockStore for MemBlockStore {
        fn block_count(&self) -> u64 {
            (self.data.len() / BLOCK_SIZE) as u64
        }

        fn read(&mut self, block: u64, buf: &mut [u8]) -> Result<(), Error> {
            let n = check_transfer(self.block_count(), block, buf.len())?;
            if self.fail_reads.hit() {
                self.stats.injected_failures += 1;
                return Err(Error::BlockIo { block, write: false });
            }
            buf.copy_from_slice(&self.data[Self::range(block, n)]);
            self.stats.reads += 1;
            self.stats.blocks_read += n;
            Ok(())
        }

        fn write(&mut self, block: u64, buf: &[u8]) -> Result<(), Error> {
            let n = check_transfer(self.block_count(), block, buf.len())?;
            let hits_bad = self.fail_write_block.is_some_and(|b| (block..block + n).contains(&b));
            if hits_bad {
                self.fail_write_block = None;
            }
            // In order: a write that fails is not also lost (nor counted
            // by the lost writes' `skip`).
            if hits_bad || self.fail_writes.hit() {
                self.stats.injected_failures += 1;
                return Err(Error::BlockIo { block, write: true });
            }
            if !self.lose_writes.hit() {
                self.data[Self::range(block, n)].copy_from_slice(buf);
            }
            self.stats.writes += 1;
            self.stats.blocks_written += n;
            Ok(())
        }

        fn flush(&mut self) -> Result<(), Error> {
            if self.fail_flushes.hit() {
                self.stats.injected_failures += 1;
                return Err(Error::BlockIo { block: 0, write: true });
            }
            self.stats.flushes += 1;
            Ok(())
        }
    }
}
