//! A VM disk image: an `image` extent of the data disk (`disk::space`)
//! served to a guest by its virtio-block device.
//!
//! The extent's first [`HEADER_BLOCKS`] blocks (4 KiB, so the guest's data
//! stays 4 KiB-aligned on the disk) hold a header; the guest's bytes
//! follow. Images are not zeroed when they are made (that would write
//! every block of the image under emulation): the header records how much
//! of the image has been *initialised* — a prefix the guest has written or
//! that was zeroed — and everything past it reads as zeros. A write past
//! the prefix first zeroes the gap between the prefix and the write, then
//! writes the data, flushes, and only then moves the prefix in the header
//! (and flushes again): if the host stops in between, the header still has
//! the old prefix and the blocks past it read as zeros, as before the
//! write — which the guest had not been told was done.
//!
//! Header (block 0 of the extent, little-endian):
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 8 | magic `HVIMAGE\0` |
//! | 8 | 4 | format version (1) |
//! | 12 | 4 | block size (512) |
//! | 16 | 8 | capacity in bytes (what the guest sees; a multiple of 512) |
//! | 24 | 8 | initialised prefix in bytes (a multiple of 512, at most the capacity) |
//! | 32 | 476 | zero |
//! | 508 | 4 | CRC-32C of bytes 0..508 |

use alloc::vec;
use core::fmt;

use crate::devices::virtio::block::{BlockBackend, IoFailed};
use mm::le::{get_u32, get_u64, put_u32, put_u64};
use mm::swap::format::crc32c;
use mm::swap::{BLOCK_SIZE, BlockStore};

const MAGIC: &[u8; 8] = b"HVIMAGE\0";
/// The header layout's version.
pub const VERSION: u32 = 1;
/// Blocks before the guest's data.
pub const HEADER_BLOCKS: u64 = 8;
const CRC_AT: usize = BLOCK_SIZE - 4;
/// Bytes zeroed per write when a prefix grows over a gap (a heap buffer).
const ZERO_CHUNK: usize = 64 * 1024;
const BS: u64 = BLOCK_SIZE as u64;

/// Why an image was not opened or an access failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageError {
    /// The extent is smaller than a header and one block.
    TooSmall { blocks: u64 },
    /// Block 0 is not an image header (never initialised, or damaged).
    NotAnImage,
    /// The header's checksum does not match.
    Checksum,
    /// A header of another format version.
    Version(u32),
    /// The header's sizes do not fit the extent.
    BadSizes { capacity: u64, initialised: u64 },
    /// An access not in whole 512-byte blocks, or past the capacity.
    OutOfRange { offset: u64, len: u64 },
    /// The disk failed.
    Io(mm::Error),
}

impl fmt::Display for ImageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ImageError::TooSmall { blocks } => write!(f, "an extent of {blocks} blocks is too small for an image"),
            ImageError::NotAnImage => f.write_str("the extent holds no image header"),
            ImageError::Checksum => f.write_str("the image header's checksum does not match"),
            ImageError::Version(v) => write!(f, "image header version {v}, this hypervisor reads {VERSION}"),
            ImageError::BadSizes { capacity, initialised } => {
                write!(f, "image header sizes do not fit the extent (capacity {capacity}, initialised {initialised})")
            }
            ImageError::OutOfRange { offset, len } => {
                write!(f, "{len} bytes at {offset} are not whole blocks inside the image")
            }
            ImageError::Io(e) => write!(f, "disk error: {e:?}"),
        }
    }
}

impl From<mm::Error> for ImageError {
    fn from(e: mm::Error) -> Self {
        ImageError::Io(e)
    }
}

/// An open image over a block store holding its whole extent.
#[derive(Debug)]
pub struct Image<D: BlockStore> {
    dev: D,
    capacity: u64,
    initialised: u64,
}

impl<D: BlockStore> Image<D> {
    /// The guest-visible capacity an extent of `blocks` blocks gives.
    pub fn capacity_of(blocks: u64) -> u64 {
        blocks.saturating_sub(HEADER_BLOCKS) * BS
    }

    /// Writes a fresh header (nothing initialised) over `dev`'s block 0:
    /// the image then reads as zeros throughout.
    pub fn create(mut dev: D) -> Result<Self, ImageError> {
        let blocks = dev.block_count();
        if blocks <= HEADER_BLOCKS {
            return Err(ImageError::TooSmall { blocks });
        }
        let capacity = Self::capacity_of(blocks);
        dev.write(0, &encode(capacity, 0))?;
        dev.flush()?;
        Ok(Image { dev, capacity, initialised: 0 })
    }

    /// Opens the image whose header is in `dev`'s block 0.
    pub fn open(mut dev: D) -> Result<Self, ImageError> {
        let blocks = dev.block_count();
        if blocks <= HEADER_BLOCKS {
            return Err(ImageError::TooSmall { blocks });
        }
        let mut b = vec![0u8; BLOCK_SIZE];
        dev.read(0, &mut b)?;
        let (capacity, initialised) = decode(&b)?;
        if capacity > Self::capacity_of(blocks) || !capacity.is_multiple_of(BS) || !initialised.is_multiple_of(BS) {
            return Err(ImageError::BadSizes { capacity, initialised });
        }
        Ok(Image { dev, capacity, initialised })
    }

    /// Bytes the guest sees.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Bytes from the start that are on the disk (the rest reads zero).
    pub fn initialised(&self) -> u64 {
        self.initialised
    }

    fn check(&self, offset: u64, len: usize) -> Result<(), ImageError> {
        let len64 = len as u64;
        let ok = offset.is_multiple_of(BS)
            && len64.is_multiple_of(BS)
            && offset.checked_add(len64).is_some_and(|end| end <= self.capacity);
        if ok { Ok(()) } else { Err(ImageError::OutOfRange { offset, len: len64 }) }
    }

    /// Reads `buf.len()` bytes at `offset` (whole blocks).
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        self.check(offset, buf.len())?;
        let on_disk = self.initialised.saturating_sub(offset).min(buf.len() as u64) as usize;
        if on_disk > 0 {
            self.dev.read(HEADER_BLOCKS + offset / BS, &mut buf[..on_disk])?;
        }
        buf[on_disk..].fill(0);
        Ok(())
    }

    /// Writes `data` at `offset` (whole blocks). Past the initialised
    /// prefix it zeroes the gap, writes, flushes and then records the new
    /// prefix (see the module comment for why in that order).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), ImageError> {
        self.check(offset, data.len())?;
        let end = offset + data.len() as u64;
        if end > self.initialised && offset > self.initialised {
            let zeros = vec![0u8; ZERO_CHUNK];
            let mut at = self.initialised;
            while at < offset {
                let n = (offset - at).min(ZERO_CHUNK as u64) as usize;
                self.dev.write(HEADER_BLOCKS + at / BS, &zeros[..n])?;
                at += n as u64;
            }
        }
        self.dev.write(HEADER_BLOCKS + offset / BS, data)?;
        if end > self.initialised {
            self.dev.flush()?;
            self.dev.write(0, &encode(self.capacity, end))?;
            self.dev.flush()?;
            self.initialised = end;
        }
        Ok(())
    }

    /// Writes `data` at `offset` (whole blocks) without moving the
    /// initialised prefix: for an image being filled as a whole (a disk
    /// snapshot), which [`Self::set_initialised`] completes. Until then
    /// what was written reads as zeros.
    pub fn write_raw(&mut self, offset: u64, data: &[u8]) -> Result<(), ImageError> {
        self.check(offset, data.len())?;
        Ok(self.dev.write(HEADER_BLOCKS + offset / BS, data)?)
    }

    /// Everything below `len` was written (by [`Self::write_raw`]): make
    /// it durable, then record it as the initialised prefix.
    pub fn set_initialised(&mut self, len: u64) -> Result<(), ImageError> {
        self.check(0, len as usize)?;
        self.dev.flush()?;
        self.dev.write(0, &encode(self.capacity, len))?;
        self.dev.flush()?;
        self.initialised = len;
        Ok(())
    }

    /// Makes every completed write durable.
    pub fn flush(&mut self) -> Result<(), ImageError> {
        Ok(self.dev.flush()?)
    }

    /// Makes this image hold exactly what `src` holds: `src`'s initialised
    /// prefix is copied and becomes this image's (what lay beyond it here
    /// reads as zeros again). A checkpoint's disk snapshot is made this way
    /// from the VM's image, and a restore puts it back. Refused when `src`
    /// holds more than this image can.
    pub fn copy_from<E: BlockStore>(&mut self, src: &mut Image<E>) -> Result<(), ImageError> {
        let len = src.initialised;
        if len > self.capacity {
            return Err(ImageError::OutOfRange { offset: 0, len });
        }
        let mut buf = vec![0u8; ZERO_CHUNK];
        let mut at = 0;
        while at < len {
            let n = (len - at).min(ZERO_CHUNK as u64) as usize;
            src.read(at, &mut buf[..n])?;
            self.dev.write(HEADER_BLOCKS + at / BS, &buf[..n])?;
            at += n as u64;
        }
        self.dev.flush()?;
        self.dev.write(0, &encode(self.capacity, len))?;
        self.dev.flush()?;
        self.initialised = len;
        Ok(())
    }
}

/// A VM's virtio-blk device serves the image; failures are logged here
/// with what failed (the device answers the guest IOERR).
impl<D: BlockStore> BlockBackend for Image<D> {
    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn initialised(&self) -> u64 {
        self.initialised
    }

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), IoFailed> {
        Image::read(self, offset, buf).map_err(|e| log_failure("read", offset, buf.len(), e))
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), IoFailed> {
        Image::write(self, offset, data).map_err(|e| log_failure("write", offset, data.len(), e))
    }

    fn flush(&mut self) -> Result<(), IoFailed> {
        Image::flush(self).map_err(|e| log_failure("flush", 0, 0, e))
    }
}

fn log_failure(what: &str, offset: u64, len: usize, e: ImageError) -> IoFailed {
    log::error!("disk image: {what} of {len} bytes at {offset}: {e}");
    IoFailed
}

fn encode(capacity: u64, initialised: u64) -> vec::Vec<u8> {
    let mut b = vec![0u8; BLOCK_SIZE];
    b[..8].copy_from_slice(MAGIC);
    put_u32(&mut b, 8, VERSION);
    put_u32(&mut b, 12, BLOCK_SIZE as u32);
    put_u64(&mut b, 16, capacity);
    put_u64(&mut b, 24, initialised);
    let sum = crc32c(&b[..CRC_AT]);
    put_u32(&mut b, CRC_AT, sum);
    b
}

fn decode(b: &[u8]) -> Result<(u64, u64), ImageError> {
    if &b[..8] != MAGIC {
        return Err(ImageError::NotAnImage);
    }
    if get_u32(b, CRC_AT) != crc32c(&b[..CRC_AT]) {
        return Err(ImageError::Checksum);
    }
    let version = get_u32(b, 8);
    if version != VERSION {
        return Err(ImageError::Version(version));
    }
    let (capacity, initialised) = (get_u64(b, 16), get_u64(b, 24));
    if get_u32(b, 12) != BLOCK_SIZE as u32 || initialised > capacity {
        return Err(ImageError::BadSizes { capacity, initialised });
    }
    Ok((capacity, initialised))
}

#[cfg(test)]
mod tests {
    use alloc::rc::Rc;
    use core::cell::RefCell;

    use mm::swap::MemBlockStore;

    use super::*;

    type Disk = Rc<RefCell<MemBlockStore>>;

    /// A 1 MiB extent whose blocks hold garbage (0xee), as a fresh extent
    /// of a used disk does.
    fn dirty_disk() -> Disk {
        let d = Rc::new(RefCell::new(MemBlockStore::new(2048)));
        let junk = vec![0xeeu8; 2048 * BLOCK_SIZE];
        d.borrow_mut().write(0, &junk).unwrap();
        d
    }

    #[test]
    fn a_new_image_reads_zeros_and_keeps_what_is_written_across_reopening() {
        let d = dirty_disk();
        let mut img = Image::create(d.clone()).unwrap();
        assert_eq!(img.capacity(), (2048 - HEADER_BLOCKS) * BS);
        let mut buf = vec![1u8; 4096];
        img.read(8192, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0), "an unwritten image must read as zeros, not the old disk");
        // A write well past the prefix: the gap before it reads zero too.
        img.write(65536, &[0x5a; 1024]).unwrap();
        assert_eq!(img.initialised(), 65536 + 1024);
        let mut again = Image::open(d.clone()).unwrap();
        assert_eq!(again.initialised(), 65536 + 1024);
        let mut gap = vec![1u8; 65536];
        again.read(0, &mut gap).unwrap();
        assert!(gap.iter().all(|&b| b == 0), "the gap before a write must be zeroed");
        let mut data = vec![0u8; 2048];
        again.read(65536, &mut data).unwrap();
        assert_eq!(&data[..1024], &[0x5a; 1024]);
        assert_eq!(&data[1024..], &[0; 1024], "past the prefix reads zero");
        // A write inside the prefix leaves the header alone.
        let writes = d.borrow().stats().writes;
        again.write(512, &[7; 512]).unwrap();
        assert_eq!(d.borrow().stats().writes, writes + 1);
        // The guest's data starts 4 KiB into the extent.
        let mut raw = vec![0u8; 512];
        d.borrow_mut().read(HEADER_BLOCKS + 1, &mut raw).unwrap();
        assert_eq!(raw, [7; 512]);
    }

    #[test]
    fn accesses_outside_the_image_or_not_in_blocks_are_refused() {
        let mut img = Image::create(dirty_disk()).unwrap();
        let cap = img.capacity();
        let mut buf = vec![0u8; 512];
        assert_eq!(img.read(cap, &mut buf), Err(ImageError::OutOfRange { offset: cap, len: 512 }));
        assert!(img.read(100, &mut buf).is_err());
        assert!(img.write(0, &[0; 100]).is_err());
        assert!(img.write(u64::MAX - 511, &[0; 512]).is_err());
        assert_eq!(img.initialised(), 0);
        img.write(cap - 512, &[3; 512]).unwrap();
        assert_eq!(img.initialised(), cap);
    }

    #[test]
    fn damaged_or_foreign_headers_are_refused() {
        let d = dirty_disk();
        assert_eq!(Image::open(d.clone()).unwrap_err(), ImageError::NotAnImage);
        Image::create(d.clone()).unwrap();
        let mut b = vec![0u8; 512];
        d.borrow_mut().read(0, &mut b).unwrap();
        b[20] ^= 1;
        d.borrow_mut().write(0, &b).unwrap();
        assert_eq!(Image::open(d.clone()).unwrap_err(), ImageError::Checksum);
        // A well-formed header claiming more than the extent holds.
        d.borrow_mut().write(0, &encode(1 << 30, 0)).unwrap();
        assert!(matches!(Image::open(d.clone()), Err(ImageError::BadSizes { .. })));
        let small = Rc::new(RefCell::new(MemBlockStore::new(HEADER_BLOCKS)));
        assert_eq!(Image::create(small).unwrap_err(), ImageError::TooSmall { blocks: HEADER_BLOCKS });
    }

    #[test]
    fn copy_from_makes_an_image_hold_exactly_the_others_contents() {
        let (a, b) = (dirty_disk(), dirty_disk());
        let mut src = Image::create(a).unwrap();
        src.write(4096, &[1; 4096]).unwrap();
        let mut dst = Image::create(b.clone()).unwrap();
        dst.write(0, &[9; 65536]).unwrap();
        dst.copy_from(&mut src).unwrap();
        assert_eq!(dst.initialised(), 8192);
        let mut dst = Image::open(b).unwrap();
        let mut buf = vec![0xffu8; 65536];
        dst.read(0, &mut buf).unwrap();
        assert_eq!(&buf[..4096], &[0; 4096][..], "the source's zero gap");
        assert_eq!(&buf[4096..8192], &[1; 4096][..]);
        assert!(buf[8192..].iter().all(|&x| x == 0), "the old contents past the source's prefix are gone");
        let small = Rc::new(RefCell::new(MemBlockStore::new(16)));
        let mut tiny = Image::create(small).unwrap();
        assert!(tiny.copy_from(&mut dst).is_err());
    }

    #[test]
    fn a_failed_data_write_does_not_move_the_prefix() {
        let d = dirty_disk();
        let mut img = Image::create(d.clone()).unwrap();
        d.borrow_mut().fail_next_writes(1);
        assert!(matches!(img.write(4096, &[9; 512]), Err(ImageError::Io(_))));
        assert_eq!(img.initialised(), 0);
        assert_eq!(Image::open(d).unwrap().initialised(), 0);
    }
}
