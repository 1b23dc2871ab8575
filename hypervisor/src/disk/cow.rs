//! A copy-on-write snapshot of a VM's disk image while the VM runs (a live
//! checkpoint's disk, seed 003): the snapshot image gets the disk as it
//! was at one instant, while the guest goes on writing its disk.
//!
//! The part of the disk to copy is the image's initialised prefix at the
//! instant (the rest reads as zeros either way), in chunks of
//! [`CHUNK`] bytes. A guest write to a chunk not yet copied copies it
//! first; [`DiskSnapshot::step`] copies the others in the background.
//! The snapshot image is written without moving its initialised prefix
//! ([`Image::write_raw`]); only [`DiskSnapshot::finish`] sets it, after a
//! flush, so an unfinished snapshot reads as an empty disk, never as a mix.

use alloc::rc::Rc;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;

use mm::swap::BlockStore;

use super::image::{Image, ImageError};
use crate::devices::virtio::block::{BlockBackend, IoFailed};

/// Bytes copied together: a guest write into an uncopied chunk costs one
/// read and one write of this size first.
pub const CHUNK: u64 = 64 * 1024;

/// Why a snapshot's copy failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyFailed {
    /// Reading the VM's disk.
    Source { offset: u64 },
    /// Writing the snapshot image.
    Snapshot(ImageError),
}

impl core::fmt::Display for CopyFailed {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            CopyFailed::Source { offset } => write!(f, "reading the VM's disk at byte {offset} failed"),
            CopyFailed::Snapshot(e) => write!(f, "writing the disk snapshot failed: {e}"),
        }
    }
}

/// The copy in progress.
pub struct DiskSnapshot<D: BlockStore> {
    source: Rc<RefCell<dyn BlockBackend>>,
    snap: Image<D>,
    /// Bytes to copy: the source's initialised prefix at the instant.
    limit: u64,
    /// One bit per chunk below `limit`: copied.
    copied: Vec<u64>,
    /// The next chunk the background copy looks at.
    cursor: u64,
    /// Chunks copied because the guest was about to write them.
    pub before_write: u64,
    /// Chunks copied in the background.
    pub background: u64,
    /// The first failure: the snapshot is then abandoned (the guest's
    /// writes go on).
    pub failed: Option<CopyFailed>,
    buf: Vec<u8>,
}

impl<D: BlockStore> DiskSnapshot<D> {
    /// Start copying `source` (its contents now) into `snap`, a new image
    /// at least as large.
    pub fn new(source: Rc<RefCell<dyn BlockBackend>>, snap: Image<D>) -> Result<Self, ImageError> {
        let limit = source.borrow().initialised();
        if limit > snap.capacity() {
            return Err(ImageError::OutOfRange { offset: 0, len: limit });
        }
        let chunks = limit.div_ceil(CHUNK) as usize;
        Ok(DiskSnapshot {
            source,
            snap,
            limit,
            copied: vec![0; chunks.div_ceil(64)],
            cursor: 0,
            before_write: 0,
            background: 0,
            failed: None,
            buf: vec![0; CHUNK as usize],
        })
    }

    fn chunks(&self) -> u64 {
        self.limit.div_ceil(CHUNK)
    }

    fn is_copied(&self, c: u64) -> bool {
        self.copied[(c / 64) as usize] & (1 << (c % 64)) != 0
    }

    fn copy(&mut self, c: u64) -> Result<(), CopyFailed> {
        let offset = c * CHUNK;
        let len = (self.limit - offset).min(CHUNK) as usize;
        self.source.borrow_mut().read(offset, &mut self.buf[..len]).map_err(|_| CopyFailed::Source { offset })?;
        self.snap.write_raw(offset, &self.buf[..len]).map_err(CopyFailed::Snapshot)?;
        self.copied[(c / 64) as usize] |= 1 << (c % 64);
        Ok(())
    }

    /// The guest is about to write `[offset, offset + len)`: copy the
    /// chunks it touches that still hold the instant's data.
    fn before_guest_write(&mut self, offset: u64, len: u64) {
        if self.failed.is_some() || offset >= self.limit || len == 0 {
            return;
        }
        let last = (offset.saturating_add(len).min(self.limit) - 1) / CHUNK;
        for c in offset / CHUNK..=last {
            if !self.is_copied(c) {
                match self.copy(c) {
                    Ok(()) => self.before_write += 1,
                    Err(e) => {
                        self.failed = Some(e);
                        return;
                    }
                }
            }
        }
    }

    /// Copy up to `chunks` more chunks; whether everything is copied.
    pub fn step(&mut self, chunks: u64) -> Result<bool, CopyFailed> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        let mut done = 0;
        while self.cursor < self.chunks() && done < chunks {
            let c = self.cursor;
            if !self.is_copied(c) {
                if let Err(e) = self.copy(c) {
                    self.failed = Some(e);
                    return Err(e);
                }
                self.background += 1;
                done += 1;
            }
            self.cursor += 1;
        }
        Ok(self.cursor >= self.chunks())
    }

    /// Everything is copied: make the snapshot durable and give it its
    /// initialised prefix. Bytes it holds.
    pub fn finish(&mut self) -> Result<u64, CopyFailed> {
        if !self.step(u64::MAX)? {
            return Err(CopyFailed::Source { offset: self.cursor * CHUNK });
        }
        self.snap.set_initialised(self.limit).map_err(CopyFailed::Snapshot)?;
        Ok(self.limit)
    }
}

/// What the VM's block device serves while the snapshot runs: its own
/// disk, each write preceded by the copy of what it overwrites.
pub struct CowDisk<D: BlockStore>(pub Rc<RefCell<DiskSnapshot<D>>>);

impl<D: BlockStore> BlockBackend for CowDisk<D> {
    fn capacity(&self) -> u64 {
        self.0.borrow().source.borrow().capacity()
    }

    fn initialised(&self) -> u64 {
        self.0.borrow().source.borrow().initialised()
    }

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), IoFailed> {
        let source = self.0.borrow().source.clone();
        source.borrow_mut().read(offset, buf)
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), IoFailed> {
        let mut s = self.0.borrow_mut();
        s.before_guest_write(offset, data.len() as u64);
        let source = s.source.clone();
        drop(s);
        source.borrow_mut().write(offset, data)
    }

    fn flush(&mut self) -> Result<(), IoFailed> {
        let source = self.0.borrow().source.clone();
        source.borrow_mut().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::space::ExtentStore;
    use mm::swap::MemBlockStore;

    type Store = ExtentStore<Rc<RefCell<MemBlockStore>>>;

    fn image(dev: &Rc<RefCell<MemBlockStore>>, start: u64, blocks: u64) -> Image<Store> {
        Image::create(ExtentStore::new(dev.clone(), start, blocks)).unwrap()
    }

    fn fill(seed: u8, n: usize) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
    }

    #[test]
    fn the_snapshot_is_the_instant_while_the_guest_writes_on() {
        let dev = Rc::new(RefCell::new(MemBlockStore::new(4096)));
        let mut disk = image(&dev, 0, 2048);
        // 300 KiB written: five chunks, the last one partial.
        disk.write(0, &fill(1, 300 * 1024)).unwrap();
        let source: Rc<RefCell<dyn BlockBackend>> = Rc::new(RefCell::new(disk));
        let snap = Rc::new(RefCell::new(DiskSnapshot::new(source.clone(), image(&dev, 2048, 2048)).unwrap()));
        let mut vm = CowDisk(snap.clone());
        // The guest writes into chunk 2 and past the instant's end.
        vm.write(2 * CHUNK + 512, &[0xee; 1024]).unwrap();
        vm.write(400 * 1024, &[0xdd; 512]).unwrap();
        assert_eq!(snap.borrow().before_write, 1);
        assert!(!snap.borrow_mut().step(2).unwrap());
        vm.write(0, &[0xcc; 512]).unwrap(); // copied already: no copy
        assert_eq!(snap.borrow().before_write, 1);
        let _ = vm.write(0, &[]); // an empty write copies nothing (and must not underflow)
        assert_eq!(snap.borrow().before_write, 1);
        assert_eq!(snap.borrow_mut().finish().unwrap(), 300 * 1024);
        assert_eq!(snap.borrow().background, 4);
        // The snapshot reads as the disk did; the disk has the new writes.
        let mut back = Image::open(ExtentStore::new(dev.clone(), 2048, 2048)).unwrap();
        assert_eq!(back.initialised(), 300 * 1024);
        let mut got = vec![0; 300 * 1024];
        back.read(0, &mut got).unwrap();
        assert!(got == fill(1, 300 * 1024));
        let mut now = vec![0; 1024];
        vm.read(2 * CHUNK + 512, &mut now).unwrap();
        assert!(now.iter().all(|&b| b == 0xee));
    }

    #[test]
    fn an_unfinished_snapshot_reads_as_an_empty_disk_and_a_failed_copy_is_kept() {
        let dev = Rc::new(RefCell::new(MemBlockStore::new(4096)));
        let mut disk = image(&dev, 0, 2048);
        disk.write(0, &fill(2, 200 * 1024)).unwrap();
        let source: Rc<RefCell<dyn BlockBackend>> = Rc::new(RefCell::new(disk));
        let snap = Rc::new(RefCell::new(DiskSnapshot::new(source, image(&dev, 2048, 2048)).unwrap()));
        snap.borrow_mut().step(2).unwrap();
        let back = Image::open(ExtentStore::new(dev.clone(), 2048, 2048)).unwrap();
        assert_eq!(back.initialised(), 0, "not finished: nothing is claimed");
        dev.borrow_mut().fail_next_writes(1);
        let e = snap.borrow_mut().step(1).unwrap_err();
        assert!(matches!(e, CopyFailed::Snapshot(_)), "{e:?}");
        assert_eq!(snap.borrow().failed, Some(e));
        // The guest's own writes still go through.
        let mut vm = CowDisk(snap.clone());
        vm.write(0, &[1; 512]).unwrap();
        assert!(snap.borrow_mut().finish().is_err());
    }
}
