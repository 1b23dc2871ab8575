//! Writing a stream: the API the hypervisor calls to save a VM.

use alloc::collections::BTreeMap;
use alloc::vec;
use alloc::vec::Vec;

use crc::{Digest, Table};
use vcpu::GuestState;

use crate::checker::Checker;
use crate::checksum::digest;
use crate::error::{At, Error};
use crate::header::{Header, check_device_name, encode_prologue};
use crate::io::Sink;
use crate::limits::{MAX_BLOCK_PAGES, MAX_PAYLOAD, MAX_SHARED_IDS, TARGET_MEMORY_PAYLOAD};
use crate::page::{self, LZ4_HEADER, MemOp, PAGE_ENTRY, is_zero};
use crate::record::{End, FRAME_LEN, Frame, Kind, PROLOGUE_LEN, TRAILER_LEN, payload_crc};
use crate::stats::{PageKind, Stats};
use crate::{PAGE_SIZE, VCPU_STATE_VERSION};

/// Pages held back to be encoded together: neighbours in one RAM range
/// (and one large-page run), all zero or all data.
#[derive(Clone, Copy)]
enum Pending {
    None,
    Zero { gfn: u64, pages: u32, range: usize },
    Block { gfn: u64, pages: u8, range: usize },
}

/// Writes one stream to a [`Sink`].
///
/// Call [`Writer::begin`], then in any order the VM's vCPUs, devices and
/// memory (each vCPU and each listed device once), then
/// [`Writer::finish`]. Every call is checked against the rules the reader
/// enforces; any error (the caller's or the sink's) ends the stream: later
/// calls return [`Error::UsedAfterError`], and a receiver refuses the
/// unfinished stream because it has no end record.
pub struct Writer<S: Sink> {
    sink: S,
    checker: Checker,
    seq: u32,
    offset: u64,
    /// CRC-32C over every record's payload checksum, for the end record.
    digest: Digest<'static, u32, Table<16>>,
    /// The memory record being filled.
    mem: Vec<u8>,
    pending: Pending,
    /// Data of a pending block.
    block: Vec<u8>,
    /// LZ4 output.
    scratch: Vec<u8>,
    /// Caller's sharing key -> content id.
    shared: BTreeMap<u64, u32>,
    stats: Stats,
    failed: bool,
}

impl<S: Sink> Writer<S> {
    /// Starts a stream of the VM `header` describes: writes the prologue
    /// and the configuration record.
    pub fn begin(sink: S, header: &Header) -> Result<Writer<S>, Error> {
        let at = At { record: 0, offset: PROLOGUE_LEN as u64, kind: Some(Kind::Config) };
        header.validate().map_err(|why| Error::Malformed { at, why })?;
        let mut w = Writer {
            sink,
            checker: Checker::new(header),
            seq: 0,
            offset: 0,
            digest: digest(),
            mem: Vec::new(),
            pending: Pending::None,
            block: Vec::new(),
            scratch: Vec::new(),
            shared: BTreeMap::new(),
            stats: Stats::default(),
            failed: false,
        };
        w.write(&encode_prologue(header.flags()))?;
        w.emit(Kind::Config, &header.encode())?;
        Ok(w)
    }

    /// Saves vCPU `index`'s state.
    pub fn vcpu(&mut self, index: u32, state: &GuestState) -> Result<(), Error> {
        self.guard(|w| {
            w.flush_memory()?;
            let at = w.at(Kind::Vcpu);
            w.checker.vcpu(index, at)?;
            let mut payload = Vec::with_capacity(1024);
            payload.extend_from_slice(&index.to_le_bytes());
            payload.extend_from_slice(&VCPU_STATE_VERSION.to_le_bytes());
            let payload = postcard::to_extend(state, payload).map_err(|_| Error::VcpuState { at, index })?;
            w.emit(Kind::Vcpu, &payload)?;
            w.stats.vcpus += 1;
            Ok(())
        })
    }

    /// Saves a device's state: its name in the VM (listed in the header),
    /// its state layout version and the state bytes (the hypervisor's
    /// `SavedDevice`).
    pub fn device(&mut self, name: &str, version: u16, bytes: &[u8]) -> Result<(), Error> {
        self.guard(|w| {
            w.flush_memory()?;
            let at = w.at(Kind::Device);
            check_device_name(name).map_err(|why| Error::Malformed { at, why })?;
            w.checker.device(name, version, at)?;
            let mut payload = Vec::with_capacity(3 + name.len() + bytes.len());
            payload.push(name.len() as u8);
            payload.extend_from_slice(name.as_bytes());
            payload.extend_from_slice(&version.to_le_bytes());
            payload.extend_from_slice(bytes);
            w.emit(Kind::Device, &payload)?;
            w.stats.devices += 1;
            Ok(())
        })
    }

    /// Saves guest page `gfn`. The writer chooses how it travels: a zero
    /// flag, part of an LZ4 block with its neighbours when compression
    /// saves at least an eighth, or as is.
    pub fn page(&mut self, gfn: u64, data: &[u8; PAGE_SIZE]) -> Result<(), Error> {
        self.guard(|w| w.page_inner(gfn, data))
    }

    /// Saves guest page `gfn`, which shares its content with other pages:
    /// `key` names that content (e.g. the host frame or the sharing
    /// index's entry) and must not name another content for the rest of
    /// the stream. The first page with a key carries the content, later
    /// ones only an id.
    pub fn shared_page(&mut self, gfn: u64, key: u64, data: &[u8; PAGE_SIZE]) -> Result<(), Error> {
        self.guard(|w| {
            // A zero flag is cheaper than any shared form.
            if is_zero(data) {
                return w.page_inner(gfn, data);
            }
            let id = match w.shared.get(&key) {
                Some(&id) => Some((id, false)),
                None if (w.shared.len() as u32) < MAX_SHARED_IDS => Some((w.shared.len() as u32, true)),
                None => None,
            };
            let Some((id, new)) = id else {
                return w.page_inner(gfn, data);
            };
            w.flush_pending()?;
            if new {
                w.check(&MemOp::Shared { gfn, id, data })?;
                w.room(PAGE_ENTRY + 4)?;
                page::put_shared(&mut w.mem, gfn, id, data);
                w.stats.add(PageKind::Shared, 1, PAGE_ENTRY + 4);
                w.shared.insert(key, id);
            } else {
                w.check(&MemOp::SharedRef { gfn, id })?;
                w.room(13)?;
                page::put_shared_ref(&mut w.mem, gfn, id);
                w.stats.add(PageKind::SharedRef, 1, 13);
            }
            Ok(())
        })
    }

    /// Records that page `gfn` was lost to an uncorrectable memory error.
    /// No data travels; the receiver marks the page poisoned.
    pub fn poisoned(&mut self, gfn: u64) -> Result<(), Error> {
        self.guard(|w| {
            w.flush_pending()?;
            w.check(&MemOp::Poisoned { gfn })?;
            w.room(9)?;
            page::put_poisoned(&mut w.mem, gfn);
            w.stats.add(PageKind::Poisoned, 1, 9);
            Ok(())
        })
    }

    /// Says that the `pages` pages from `gfn` on (512 for 2 MiB, 262144
    /// for 1 GiB, aligned) were one large page, so the receiver can map
    /// them large again. The caller then saves exactly those pages, in
    /// order, before anything else; zero pages among them still travel as
    /// flags.
    pub fn large_run(&mut self, gfn: u64, pages: u32) -> Result<(), Error> {
        self.guard(|w| {
            w.flush_pending()?;
            w.check(&MemOp::LargeRun { gfn, pages })?;
            w.room(13)?;
            page::put_large(&mut w.mem, gfn, pages);
            w.stats.large_runs += 1;
            Ok(())
        })
    }

    /// Live migration: everything the destination needs to run the VM
    /// (every vCPU and device) has been sent; memory after this is
    /// post-copy. Only in a stream whose header says `live`.
    pub fn resume(&mut self) -> Result<(), Error> {
        self.guard(|w| {
            w.flush_memory()?;
            let at = w.at(Kind::Resume);
            w.checker.resume(at)?;
            w.emit(Kind::Resume, &[])
        })
    }

    /// Post-copy: the pages of `runs` (first frame, count) come after the
    /// resume record; until then the destination keeps them from the
    /// guest. Only in a live stream, before [`Writer::resume`]. Large
    /// lists go out as several records.
    pub fn pending(&mut self, runs: &[(u64, u32)]) -> Result<(), Error> {
        self.guard(|w| {
            w.flush_memory()?;
            for chunk in runs.chunks(crate::limits::MAX_PENDING_RUNS) {
                let at = w.at(Kind::Pending);
                w.checker.record(Kind::Pending, at)?;
                let mut payload = Vec::with_capacity(chunk.len() * 12);
                for &(gfn, pages) in chunk {
                    w.checker.pending(gfn, pages, at)?;
                    payload.extend_from_slice(&gfn.to_le_bytes());
                    payload.extend_from_slice(&pages.to_le_bytes());
                }
                w.emit(Kind::Pending, &payload)?;
                w.stats.pending_pages += chunk.iter().map(|&(_, p)| u64::from(p)).sum::<u64>();
            }
            Ok(())
        })
    }

    /// Sends the memory held back now, as a record of its own (post-copy:
    /// a page the destination waits for must not wait for the record to
    /// fill up).
    pub fn flush(&mut self) -> Result<(), Error> {
        self.guard(|w| w.flush_memory())
    }

    /// Writes the end record; returns the sink and what the stream holds.
    pub fn finish(mut self) -> Result<(S, Stats), Error> {
        self.guard(|w| {
            w.flush_memory()?;
            let at = w.at(Kind::End);
            w.checker.end(at)?;
            let digest = core::mem::replace(&mut w.digest, digest()).finalize();
            let end = End { records: w.seq, digest, bytes: w.offset };
            w.emit(Kind::End, &end.encode())
        })?;
        self.stats.bytes = self.offset;
        Ok((self.sink, self.stats))
    }

    /// The sink, between calls: a caller staging the stream in a buffer
    /// drains it from here (records reach the sink whole, as they are
    /// finished; the open memory record stays in the writer).
    pub fn sink_mut(&mut self) -> &mut S {
        &mut self.sink
    }

    /// What has been written so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    fn guard<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T, Error>) -> Result<T, Error> {
        if self.failed {
            return Err(Error::UsedAfterError);
        }
        let r = f(self);
        self.failed = r.is_err();
        r
    }

    fn at(&self, kind: Kind) -> At {
        At { record: self.seq, offset: self.offset, kind: Some(kind) }
    }

    /// Where the next memory entry will land.
    fn entry_at(&self) -> At {
        let within = if self.mem.is_empty() { 0 } else { FRAME_LEN + self.mem.len() };
        At { record: self.seq, offset: self.offset + within as u64, kind: Some(Kind::Memory) }
    }

    fn check(&mut self, op: &MemOp<'_>) -> Result<crate::checker::Landing, Error> {
        let at = self.entry_at();
        self.checker.memory(op, at)
    }

    fn page_inner(&mut self, gfn: u64, data: &[u8; PAGE_SIZE]) -> Result<(), Error> {
        let landing = self.check(&MemOp::Pages { gfn, data })?;
        let range = landing.range;
        if is_zero(data) {
            match &mut self.pending {
                Pending::Zero { gfn: g, pages, range: r }
                    if *g + u64::from(*pages) == gfn && *r == range && *pages < u32::MAX =>
                {
                    *pages += 1;
                }
                _ => {
                    self.flush_pending()?;
                    self.pending = Pending::Zero { gfn, pages: 1, range };
                }
            }
        } else {
            match &mut self.pending {
                Pending::Block { gfn: g, pages, range: r }
                    if *g + u64::from(*pages) == gfn && *r == range && *pages < MAX_BLOCK_PAGES =>
                {
                    *pages += 1;
                }
                _ => {
                    self.flush_pending()?;
                    self.block.clear();
                    self.pending = Pending::Block { gfn, pages: 1, range };
                }
            }
            self.block.extend_from_slice(data);
        }
        // An entry must not cross the end of a large-page run.
        if landing.closed_run {
            self.flush_pending()?;
        }
        Ok(())
    }

    /// Encodes the pending pages into the memory record.
    fn flush_pending(&mut self) -> Result<(), Error> {
        match core::mem::replace(&mut self.pending, Pending::None) {
            Pending::None => {}
            Pending::Zero { gfn, pages, .. } => {
                self.room(13)?;
                page::put_zero(&mut self.mem, gfn, pages);
                self.stats.add(PageKind::Zero, u64::from(pages), 13);
            }
            Pending::Block { gfn, pages, .. } => {
                let raw = usize::from(pages) * PAGE_SIZE;
                if self.scratch.is_empty() {
                    let max = lz4_flex::block::get_maximum_output_size(usize::from(MAX_BLOCK_PAGES) * PAGE_SIZE);
                    self.scratch = vec![0; max];
                }
                // Compression pays when it saves at least an eighth: less
                // is not worth the receiver's decompression.
                match lz4_flex::block::compress_into(&self.block[..raw], &mut self.scratch) {
                    Ok(n) if LZ4_HEADER + n <= raw - raw / 8 => {
                        self.room(LZ4_HEADER + n)?;
                        page::put_lz4(&mut self.mem, gfn, pages, &self.scratch[..n]);
                        self.stats.add(PageKind::Compressed, u64::from(pages), LZ4_HEADER + n);
                    }
                    _ => {
                        for i in 0..usize::from(pages) {
                            self.room(PAGE_ENTRY)?;
                            let data = &self.block[i * PAGE_SIZE..(i + 1) * PAGE_SIZE];
                            page::put_page(&mut self.mem, gfn + i as u64, data);
                            self.stats.add(PageKind::Normal, 1, PAGE_ENTRY);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Makes room for an entry of `len` bytes: sends the memory record when
    /// the entry would take it past the target size.
    fn room(&mut self, len: usize) -> Result<(), Error> {
        if !self.mem.is_empty() && self.mem.len() + len > TARGET_MEMORY_PAYLOAD {
            self.send_memory()?;
        }
        Ok(())
    }

    fn send_memory(&mut self) -> Result<(), Error> {
        let mem = core::mem::take(&mut self.mem);
        let r = self.emit(Kind::Memory, &mem);
        self.mem = mem;
        self.mem.clear();
        r
    }

    /// Sends everything held back: before any other record.
    fn flush_memory(&mut self) -> Result<(), Error> {
        self.flush_pending()?;
        if !self.mem.is_empty() {
            self.send_memory()?;
        }
        Ok(())
    }

    fn emit(&mut self, kind: Kind, payload: &[u8]) -> Result<(), Error> {
        let at = self.at(kind);
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|&l| l <= MAX_PAYLOAD)
            .ok_or(Error::TooLong { at, len: payload.len() as u64 })?;
        let seq = self.seq;
        let next_seq = seq.checked_add(1).ok_or(Error::Malformed { at, why: "more than 2^32 records" })?;
        let frame = Frame { kind, version: kind.version(), seq, len }.encode();
        let crc = payload_crc(&frame, payload).to_le_bytes();
        self.write(&frame)?;
        self.write(payload)?;
        self.write(&crc)?;
        self.digest.update(&crc);
        self.seq = next_seq;
        self.stats.records += 1;
        debug_assert_eq!(self.offset, at.offset + (FRAME_LEN + payload.len() + TRAILER_LEN) as u64);
        Ok(())
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.sink.write(bytes).map_err(|error| Error::Io { offset: self.offset, error })?;
        self.offset += bytes.len() as u64;
        Ok(())
    }
}
