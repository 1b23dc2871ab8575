//! virtio-block (device ID 2, virtio 1.2 5.2): one request queue over a
//! [`BlockBackend`] (a disk image on the host's data disk,
//! `disk::image`). Linux's `virtio_blk` makes it `/dev/vda`.
//!
//! A request (5.2.6) is one chain: a 16-byte device-readable header (type,
//! reserved, sector), the data (device-readable for a write,
//! device-writable for a read), and one device-writable status byte at the
//! very end. Framing is free (VIRTIO_F_VERSION_1 implies ANY_LAYOUT): the
//! header and the data may be split across buffers anywhere.
//!
//! What the guest gets wrong is sorted in two: a chain the device cannot
//! even answer (no room for a header or a status byte) breaks the ring
//! protocol and needs a reset; a request it can answer but not serve (a
//! length that is not whole sectors, a range past the end, an unknown
//! type, a write to a read-only disk) is answered IOERR or UNSUPP and the
//! device goes on, as a disk controller would.
//!
//! Cache (5.2.5, 5.2.6.2): write-through unless the driver switches the
//! `writeback` configuration field on (VIRTIO_BLK_F_CONFIG_WCE): every
//! write is flushed to the host disk before it completes, so what the
//! guest was told is written survives the host stopping. With writeback
//! on, only FLUSH makes data durable, which the driver then sends.
//!
//! All work happens in the notification, synchronously: the vCPU that
//! wrote QueueNotify waits for the host disk. The data moves in chunks of
//! [`CHUNK`] bytes through a heap buffer, whatever length the guest's
//! descriptors claim (a request past the disk's end is refused before any
//! I/O, so the work is bounded by the disk's size).

use alloc::vec;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

use super::queue::{Buffer, Chain, Queue, QueueError};
use super::{GuestMemory, VirtioDevice};
use crate::devices::persist::{Invalid, Persist};

/// The block device's ID (5, "Device Types").
pub const DEVICE_ID: u32 = 2;
/// Entries of its queue.
pub const QUEUE_SIZE: u16 = 256;
/// The sector the request header counts in (5.2.6: always 512 bytes).
pub const SECTOR: u64 = 512;
/// Bytes moved per backend access.
pub const CHUNK: usize = 64 * 1024;
/// The serial number GET_ID returns is at most this long (5.2.6).
pub const ID_BYTES: usize = 20;

/// Feature bits (5.2.3).
pub mod feature {
    /// `seg_max` in the configuration is valid.
    pub const SEG_MAX: u64 = 1 << 2;
    /// The device is read-only.
    pub const RO: u64 = 1 << 5;
    /// FLUSH requests.
    pub const FLUSH: u64 = 1 << 9;
    /// The `writeback` configuration field can be read and set.
    pub const CONFIG_WCE: u64 = 1 << 11;
}

/// Request types (5.2.6).
pub mod request {
    pub const IN: u32 = 0;
    pub const OUT: u32 = 1;
    pub const FLUSH: u32 = 4;
    pub const GET_ID: u32 = 8;
}

/// Status byte values (5.2.6).
pub mod status {
    pub const OK: u8 = 0;
    pub const IOERR: u8 = 1;
    pub const UNSUPP: u8 = 2;
}

/// Configuration space offsets (5.2.4) this device fills in.
pub mod config {
    /// le64: capacity in 512-byte sectors.
    pub const CAPACITY: u64 = 0;
    /// le32: most data buffers in one request.
    pub const SEG_MAX: u64 = 12;
    /// u8: 1 for a write-back cache, 0 for write-through.
    pub const WRITEBACK: u64 = 32;
    /// The end of the fields up to `writeback` (and its padding byte).
    pub const END: u64 = 34;
}

/// The backend failed an access (it says why in the log).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoFailed;

/// Where a block device's bytes are: offsets and lengths are whole
/// sectors inside [`capacity`](Self::capacity) (the device checks).
pub trait BlockBackend {
    /// Bytes the guest sees: a multiple of [`SECTOR`].
    fn capacity(&self) -> u64;
    /// Bytes from the start that hold data; the rest reads as zeros (a
    /// snapshot of the disk copies only these).
    fn initialised(&self) -> u64 {
        self.capacity()
    }
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), IoFailed>;
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), IoFailed>;
    /// Make completed writes durable.
    fn flush(&mut self) -> Result<(), IoFailed>;
}

/// What the device did, for `vm stats` and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockCounters {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Requests answered IOERR or UNSUPP.
    pub errors: u64,
}

/// The block device over backend `B`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Block<B> {
    backend: B,
    read_only: bool,
    /// The serial number GET_ID returns (zero padded).
    id: [u8; ID_BYTES],
    /// The driver switched the write-back cache on.
    writeback: bool,
    counters: BlockCounters,
}

impl<B: BlockBackend> Block<B> {
    /// A device over `backend`, reporting `serial` (at most 20 bytes are
    /// kept) to GET_ID.
    pub fn new(backend: B, serial: &str, read_only: bool) -> Self {
        let mut id = [0u8; ID_BYTES];
        let n = serial.len().min(ID_BYTES);
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        Block { backend, read_only, id, writeback: false, counters: BlockCounters::default() }
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Serve another backend from now on (a restored VM gets its image
    /// once the checkpoint named it).
    pub fn set_backend(&mut self, backend: B) {
        self.backend = backend;
    }

    pub fn counters(&self) -> BlockCounters {
        self.counters
    }

    /// Whether writes complete before they are durable.
    pub fn writeback(&self) -> bool {
        self.writeback
    }

    fn sectors(&self) -> u64 {
        self.backend.capacity() / SECTOR
    }

    /// The byte offset of `len` bytes at `sector`, if they are whole
    /// sectors inside the disk.
    fn range(&self, sector: u64, len: u64) -> Option<u64> {
        let offset = sector.checked_mul(SECTOR)?;
        let end = offset.checked_add(len)?;
        (len.is_multiple_of(SECTOR) && end <= self.backend.capacity()).then_some(offset)
    }

    /// Serve one request; the bytes written into the chain (data and
    /// status). `Err` only for a chain that cannot be answered at all.
    fn serve(&mut self, chain: &Chain, mem: &mut dyn GuestMemory) -> Result<u32, QueueError> {
        let (rlen, wlen) = (chain.readable_len(), chain.writable_len());
        if rlen < 16 {
            return Err(QueueError::TooShort { needed: 16, found: rlen });
        }
        if wlen < 1 {
            return Err(QueueError::TooShort { needed: 1, found: 0 });
        }
        let mut header = [0u8; 16];
        read_at(mem, &chain.readable, 0, &mut header)?;
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or([0; 8]));
        let data_in = u64::from(wlen - 1);
        let data_out = u64::from(rlen - 16);
        let (st, written) = match kind {
            request::IN => match self.range(sector, data_in) {
                Some(offset) => {
                    let st = self.read_into(mem, &chain.writable, offset, data_in)?;
                    (st, if st == status::OK { data_in as u32 } else { 0 })
                }
                None => (status::IOERR, 0),
            },
            request::OUT if self.read_only => (status::IOERR, 0),
            request::OUT => match self.range(sector, data_out) {
                Some(offset) => (self.write_from(mem, &chain.readable, offset, data_out)?, 0),
                None => (status::IOERR, 0),
            },
            request::FLUSH => {
                self.counters.flushes += 1;
                (if self.backend.flush().is_ok() { status::OK } else { status::IOERR }, 0)
            }
            request::GET_ID => {
                let n = (data_in as usize).min(ID_BYTES);
                write_at(mem, &chain.writable, 0, &self.id[..n])?;
                (status::OK, n as u32)
            }
            _ => (status::UNSUPP, 0),
        };
        if st != status::OK {
            self.counters.errors += 1;
            if st == status::IOERR {
                log::warn!("virtio-blk: request type {kind} at sector {sector} ({data_in}/{data_out} bytes) failed");
            }
        }
        write_at(mem, &chain.writable, data_in, &[st])?;
        Ok(written + 1)
    }

    /// Disk bytes `offset..offset + len` into the guest's buffers.
    fn read_into(
        &mut self,
        mem: &mut dyn GuestMemory,
        bufs: &[Buffer],
        offset: u64,
        len: u64,
    ) -> Result<u8, QueueError> {
        let mut chunk = vec![0u8; CHUNK.min(len as usize)];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(CHUNK as u64) as usize;
            if self.backend.read(offset + done, &mut chunk[..n]).is_err() {
                return Ok(status::IOERR);
            }
            write_at(mem, bufs, done, &chunk[..n])?;
            done += n as u64;
        }
        self.counters.reads += 1;
        self.counters.bytes_read += len;
        Ok(status::OK)
    }

    /// The guest's bytes (after the 16-byte header) to the disk at
    /// `offset`; flushed unless the cache is write-back.
    fn write_from(
        &mut self,
        mem: &mut dyn GuestMemory,
        bufs: &[Buffer],
        offset: u64,
        len: u64,
    ) -> Result<u8, QueueError> {
        let mut chunk = vec![0u8; CHUNK.min(len as usize)];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(CHUNK as u64) as usize;
            read_at(mem, bufs, 16 + done, &mut chunk[..n])?;
            if self.backend.write(offset + done, &chunk[..n]).is_err() {
                return Ok(status::IOERR);
            }
            done += n as u64;
        }
        if !self.writeback && self.backend.flush().is_err() {
            return Ok(status::IOERR);
        }
        self.counters.writes += 1;
        self.counters.bytes_written += len;
        Ok(status::OK)
    }
}

/// Fill `out` from bytes `at..` of the concatenation of `bufs`.
fn read_at(mem: &mut dyn GuestMemory, bufs: &[Buffer], at: u64, out: &mut [u8]) -> Result<(), QueueError> {
    let mut done = 0usize;
    for_each_piece(bufs, at, out.len() as u64, |gpa, n| {
        mem.read(gpa, &mut out[done..done + n])?;
        done += n;
        Ok(())
    })
}

/// Copy `data` to bytes `at..` of the concatenation of `bufs`.
fn write_at(mem: &mut dyn GuestMemory, bufs: &[Buffer], at: u64, data: &[u8]) -> Result<(), QueueError> {
    let mut done = 0usize;
    for_each_piece(bufs, at, data.len() as u64, |gpa, n| {
        mem.write(gpa, &data[done..done + n])?;
        done += n;
        Ok(())
    })
}

/// Calls `f(gpa, len)` for the pieces of `bufs` that hold bytes
/// `at..at + len` of their concatenation, in order. The caller sized the
/// range from the chain's lengths, so it lies inside.
fn for_each_piece(
    bufs: &[Buffer],
    mut at: u64,
    mut len: u64,
    mut f: impl FnMut(u64, usize) -> Result<(), super::OutsideRam>,
) -> Result<(), QueueError> {
    for b in bufs {
        if len == 0 {
            break;
        }
        let blen = u64::from(b.len);
        if at >= blen {
            at -= blen;
            continue;
        }
        let n = (blen - at).min(len);
        f(b.gpa + at, n as usize)?;
        len -= n;
        at = 0;
    }
    debug_assert_eq!(len, 0, "a range past the chain's buffers");
    Ok(())
}

impl<B: BlockBackend> VirtioDevice for Block<B> {
    const DEVICE_ID: u32 = DEVICE_ID;
    const QUEUES: usize = 1;
    const QUEUE_MAX_SIZE: u16 = QUEUE_SIZE;

    fn features(&self) -> u64 {
        let ro = if self.read_only { feature::RO } else { 0 };
        feature::SEG_MAX | feature::FLUSH | feature::CONFIG_WCE | ro
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut space = [0u8; config::END as usize];
        space[..8].copy_from_slice(&self.sectors().to_le_bytes());
        // A request's data buffers: all of a queue's descriptors but the
        // header's and the status's (Linux sizes its scatterlists by it).
        let seg_max = u32::from(QUEUE_SIZE) - 2;
        space[config::SEG_MAX as usize..][..4].copy_from_slice(&seg_max.to_le_bytes());
        space[config::WRITEBACK as usize] = u8::from(self.writeback);
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset).ok().and_then(|o| space.get(o + i)).copied().unwrap_or(0);
        }
    }

    /// Only `writeback` is writable (5.2.4, with VIRTIO_BLK_F_CONFIG_WCE).
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if offset == config::WRITEBACK
            && let Some(&v) = data.first()
        {
            self.writeback = v != 0;
        }
    }

    fn activate(&mut self, _features: u64) {}

    fn reset(&mut self) {
        self.writeback = false;
    }

    fn notify(&mut self, _index: usize, queue: &mut Queue, mem: &mut dyn GuestMemory) -> Result<(), QueueError> {
        while let Some(chain) = queue.pop(mem)? {
            match self.serve(&chain, mem) {
                Ok(len) => queue.push_used(mem, chain.head, len)?,
                Err(e) => {
                    queue.undo_pop();
                    return Err(e);
                }
            }
        }
        Ok(())
    }
}

/// The device's saved state: the cache mode and the counters (the backend
/// is the host's: a restore attaches the same image).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    pub writeback: bool,
    pub counters: BlockCounters,
}

impl<B: BlockBackend> Persist for Block<B> {
    type State = BlockState;
    const STATE_VERSION: u16 = 1;

    fn save(&self) -> BlockState {
        BlockState { writeback: self.writeback, counters: self.counters }
    }

    fn validate(_: &BlockState) -> Result<(), Invalid> {
        // Any cache mode and any counts are possible.
        Ok(())
    }

    fn restore(&mut self, s: BlockState) {
        self.writeback = s.writeback;
        self.counters = s.counters;
    }
}

/// A disk in a byte vector (tests and the fuzz target), which can be told
/// to fail.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VecDisk {
    pub bytes: Vec<u8>,
    pub fail: bool,
    pub flushes: u64,
}

impl VecDisk {
    pub fn new(len: usize) -> Self {
        VecDisk { bytes: vec![0; len], ..Default::default() }
    }
}

impl BlockBackend for VecDisk {
    fn capacity(&self) -> u64 {
        self.bytes.len() as u64 / SECTOR * SECTOR
    }

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), IoFailed> {
        if self.fail {
            return Err(IoFailed);
        }
        let o = offset as usize;
        buf.copy_from_slice(&self.bytes[o..o + buf.len()]);
        Ok(())
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), IoFailed> {
        if self.fail {
            return Err(IoFailed);
        }
        let o = offset as usize;
        self.bytes[o..o + data.len()].copy_from_slice(data);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), IoFailed> {
        self.flushes += 1;
        if self.fail { Err(IoFailed) } else { Ok(()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::VecMemory;
    use crate::devices::virtio::feature::VERSION_1;
    use crate::devices::virtio::mmio::{VirtioMmio, reg, status as dev_status};
    use crate::devices::virtio::queue::{VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};

    /// Queue of 8 entries: descriptors 0x1000, avail 0x1100, used 0x1200.
    const Q: u64 = 0x1000;

    /// A mock driver: the handshake (with `features` accepted), the queue
    /// set up, requests built in guest memory.
    struct Driver {
        dev: VirtioMmio<Block<VecDisk>>,
        mem: VecMemory,
        next: u16,
    }

    impl Driver {
        fn up(disk: VecDisk, features: u64) -> Driver {
            let mut mem = VecMemory::new(0, 0x40000);
            let mut dev = VirtioMmio::new(Block::new(disk, "img-web", false));
            assert_eq!(dev.read(reg::DEVICE_ID, 4), 2);
            let mut w = |d: &mut VirtioMmio<_>, r, v: u64| d.write(r, 4, v, &mut mem);
            w(&mut dev, reg::STATUS, u64::from(dev_status::ACKNOWLEDGE | dev_status::DRIVER));
            w(&mut dev, reg::DRIVER_FEATURES_SEL, 0);
            w(&mut dev, reg::DRIVER_FEATURES, features & 0xffff_ffff);
            w(&mut dev, reg::DRIVER_FEATURES_SEL, 1);
            w(&mut dev, reg::DRIVER_FEATURES, VERSION_1 >> 32);
            let fok = dev_status::ACKNOWLEDGE | dev_status::DRIVER | dev_status::FEATURES_OK;
            w(&mut dev, reg::STATUS, u64::from(fok));
            w(&mut dev, reg::QUEUE_NUM, 8);
            w(&mut dev, reg::QUEUE_DESC_LOW, Q);
            w(&mut dev, reg::QUEUE_DRIVER_LOW, Q + 0x100);
            w(&mut dev, reg::QUEUE_DEVICE_LOW, Q + 0x200);
            w(&mut dev, reg::QUEUE_READY, 1);
            w(&mut dev, reg::STATUS, u64::from(fok | dev_status::DRIVER_OK));
            assert_eq!(dev.read(reg::STATUS, 4), u64::from(fok | dev_status::DRIVER_OK));
            Driver { dev, mem, next: 0 }
        }

        fn desc(&mut self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
            let at = (Q + 16 * u64::from(i)) as usize;
            let m = &mut self.mem.bytes;
            m[at..at + 8].copy_from_slice(&addr.to_le_bytes());
            m[at + 8..at + 12].copy_from_slice(&len.to_le_bytes());
            m[at + 12..at + 14].copy_from_slice(&flags.to_le_bytes());
            m[at + 14..at + 16].copy_from_slice(&next.to_le_bytes());
        }

        fn header(&mut self, at: u64, kind: u32, sector: u64) {
            let a = at as usize;
            self.mem.bytes[a..a + 4].copy_from_slice(&kind.to_le_bytes());
            self.mem.bytes[a + 4..a + 8].fill(0);
            self.mem.bytes[a + 8..a + 16].copy_from_slice(&sector.to_le_bytes());
        }

        /// Publish the chain at descriptor 0 and notify; the used length.
        fn submit(&mut self) -> u32 {
            let avail = (Q + 0x100) as usize;
            let slot = avail + 4 + 2 * usize::from(self.next % 8);
            self.mem.bytes[slot..slot + 2].copy_from_slice(&0u16.to_le_bytes());
            self.next = self.next.wrapping_add(1);
            self.mem.bytes[avail + 2..avail + 4].copy_from_slice(&self.next.to_le_bytes());
            self.dev.write(reg::QUEUE_NOTIFY, 4, 0, &mut self.mem);
            let used = (Q + 0x200) as usize;
            assert_eq!(u16::from_le_bytes([self.mem.bytes[used + 2], self.mem.bytes[used + 3]]), self.next);
            let e = used + 4 + 8 * usize::from((self.next - 1) % 8);
            u32::from_le_bytes(self.mem.bytes[e + 4..e + 8].try_into().unwrap())
        }

        /// A three-descriptor request: header at 0x2000, data at 0x3000
        /// (`len`, writable for a read), status at 0x2100.
        fn request(&mut self, kind: u32, sector: u64, len: u32) -> (u8, u32) {
            self.header(0x2000, kind, sector);
            self.mem.bytes[0x2100] = 0xff;
            let data_flags = if kind == request::OUT { 0 } else { VIRTQ_DESC_F_WRITE };
            self.desc(0, 0x2000, 16, VIRTQ_DESC_F_NEXT, 1);
            self.desc(1, 0x3000, len, data_flags | VIRTQ_DESC_F_NEXT, 2);
            self.desc(2, 0x2100, 1, VIRTQ_DESC_F_WRITE, 0);
            let used = self.submit();
            (self.mem.bytes[0x2100], used)
        }

        fn needs_reset(&mut self) -> bool {
            self.dev.read(reg::STATUS, 4) & u64::from(dev_status::DEVICE_NEEDS_RESET) != 0
        }
    }

    #[test]
    fn writes_reach_the_disk_and_reads_come_back() {
        let mut d = Driver::up(VecDisk::new(1 << 20), feature::FLUSH);
        assert_eq!(d.dev.read(reg::CONFIG + config::CAPACITY, 4), 2048, "capacity in sectors");
        d.mem.bytes[0x3000..0x3400].fill(0x5a);
        assert_eq!(d.request(request::OUT, 10, 1024), (status::OK, 1));
        let disk = &d.dev.device().backend().bytes;
        assert_eq!(&disk[5120..6144], &[0x5a; 1024][..]);
        assert_eq!(disk[5119], 0);
        // Write-through: the write was flushed before it completed.
        assert_eq!(d.dev.device().backend().flushes, 1);
        d.mem.bytes[0x3000..0x3400].fill(0);
        assert_eq!(d.request(request::IN, 10, 1024), (status::OK, 1025));
        assert_eq!(&d.mem.bytes[0x3000..0x3400], &[0x5a; 1024][..]);
        assert!(d.dev.interrupt_asserted());
        let c = d.dev.device().counters();
        assert_eq!((c.reads, c.writes, c.bytes_read, c.bytes_written, c.errors), (1, 1, 1024, 1024, 0));
    }

    #[test]
    fn a_request_split_anywhere_across_buffers_is_served() {
        let mut d = Driver::up(VecDisk::new(1 << 20), 0);
        for (i, b) in d.dev.device_mut().backend.bytes[512..1536].iter_mut().enumerate() {
            *b = i as u8;
        }
        // Header in two pieces (5 + 11 bytes); the data and the status
        // share the last buffer: 1024 bytes as 700 + (324 + status).
        d.header(0x2000, request::IN, 1);
        d.desc(0, 0x2000, 5, VIRTQ_DESC_F_NEXT, 1);
        d.desc(1, 0x2005, 11, VIRTQ_DESC_F_NEXT, 2);
        d.desc(2, 0x3000, 700, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 3);
        d.desc(3, 0x4000, 325, VIRTQ_DESC_F_WRITE, 0);
        assert_eq!(d.submit(), 1025);
        let want: Vec<u8> = (0..1024).map(|i| i as u8).collect();
        assert_eq!(&d.mem.bytes[0x3000..0x3000 + 700], &want[..700]);
        assert_eq!(&d.mem.bytes[0x4000..0x4000 + 324], &want[700..]);
        assert_eq!(d.mem.bytes[0x4000 + 324], status::OK);
    }

    #[test]
    fn requests_that_cannot_be_served_are_answered_and_the_device_goes_on() {
        let mut d = Driver::up(VecDisk::new(1 << 20), 0);
        // Past the end; straddling the end; not whole sectors; unknown.
        assert_eq!(d.request(request::IN, 2048, 512).0, status::IOERR);
        assert_eq!(d.request(request::OUT, 2047, 1024).0, status::IOERR);
        assert_eq!(d.request(request::OUT, 0, 100).0, status::IOERR);
        assert_eq!(d.request(request::IN, u64::MAX, 512).0, status::IOERR);
        assert_eq!(d.request(99, 0, 512).0, status::UNSUPP);
        assert!(d.dev.device().backend().bytes.iter().all(|&b| b == 0), "a refused request wrote the disk");
        // The backend failing is an IOERR too.
        d.dev.device_mut().backend.fail = true;
        assert_eq!(d.request(request::IN, 0, 512).0, status::IOERR);
        d.dev.device_mut().backend.fail = false;
        assert_eq!(d.dev.device().counters().errors, 6);
        assert!(!d.needs_reset());
        assert_eq!(d.request(request::IN, 0, 512).0, status::OK);
        // GET_ID: the serial, zero padded.
        assert_eq!(d.request(request::GET_ID, 0, 20), (status::OK, 21));
        assert_eq!(&d.mem.bytes[0x3000..0x3008], b"img-web\0");
    }

    #[test]
    fn chains_that_cannot_be_answered_need_a_reset_and_change_nothing() {
        // No status byte: nowhere to answer.
        let mut d = Driver::up(VecDisk::new(1 << 20), 0);
        d.header(0x2000, request::OUT, 0);
        d.desc(0, 0x2000, 16, VIRTQ_DESC_F_NEXT, 1);
        d.desc(1, 0x3000, 512, 0, 0);
        // Published by hand (ring slot 0 is already 0): `submit` expects
        // the chain used.
        let avail = (Q + 0x100) as usize;
        d.mem.bytes[avail + 2] = 1;
        let before = d.mem.bytes.clone();
        d.dev.write(reg::QUEUE_NOTIFY, 4, 0, &mut d.mem);
        assert!(d.needs_reset());
        assert_eq!(d.mem.bytes, before, "a refused chain changed guest memory");
        assert!(d.dev.device().backend().bytes.iter().all(|&b| b == 0));
        // A header shorter than 16 bytes.
        let mut d = Driver::up(VecDisk::new(1 << 20), 0);
        d.desc(0, 0x2000, 8, VIRTQ_DESC_F_NEXT, 1);
        d.desc(1, 0x2100, 1, VIRTQ_DESC_F_WRITE, 0);
        d.mem.bytes[avail + 2] = 1;
        d.dev.write(reg::QUEUE_NOTIFY, 4, 0, &mut d.mem);
        assert!(d.needs_reset());
    }

    #[test]
    fn writeback_is_the_drivers_choice_and_flush_makes_it_durable() {
        let mut d = Driver::up(VecDisk::new(1 << 20), feature::FLUSH | feature::CONFIG_WCE);
        assert_eq!(d.dev.read(reg::CONFIG + config::WRITEBACK, 1), 0, "write-through by default");
        d.dev.write(reg::CONFIG + config::WRITEBACK, 1, 1, &mut d.mem);
        assert!(d.dev.device().writeback());
        assert_eq!(d.request(request::OUT, 0, 512).0, status::OK);
        assert_eq!(d.dev.device().backend().flushes, 0, "a write-back write flushed");
        assert_eq!(d.request(request::FLUSH, 0, 0).0, status::OK);
        assert_eq!(d.dev.device().backend().flushes, 1);
        // Read-only fields ignore writes.
        d.dev.write(reg::CONFIG + config::CAPACITY, 4, 5, &mut d.mem);
        assert_eq!(d.dev.read(reg::CONFIG + config::CAPACITY, 4), 2048);
        // Saved state carries the cache mode; a reset drops it.
        let s = d.dev.save();
        let mut e = VirtioMmio::new(Block::new(VecDisk::new(1 << 20), "x", false));
        e.restore(s.clone());
        assert_eq!(e.save(), s);
        assert!(e.device().writeback());
        d.dev.write(reg::STATUS, 4, 0, &mut d.mem);
        assert!(!d.dev.device().writeback());
    }

    #[test]
    fn a_read_only_disk_refuses_writes() {
        let mut dev = Block::new(VecDisk::new(4096), "ro", true);
        assert_ne!(dev.features() & feature::RO, 0);
        let mut mem = VecMemory::new(0, 0x10000);
        mem.bytes[0x100] = request::OUT as u8;
        let chain = Chain {
            head: 0,
            readable: vec![Buffer { gpa: 0x100, len: 16 }, Buffer { gpa: 0x200, len: 512 }],
            writable: vec![Buffer { gpa: 0x400, len: 1 }],
        };
        mem.bytes[0x200..0x400].fill(1);
        assert_eq!(dev.serve(&chain, &mut mem), Ok(1));
        assert_eq!(mem.bytes[0x400], status::IOERR);
        assert!(dev.backend().bytes.iter().all(|&b| b == 0));
    }
}
