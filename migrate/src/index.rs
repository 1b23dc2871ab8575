//! Lazy restore's view of a stream: read it once, hand every record but
//! the pages' contents to the consumer, and note which memory record holds
//! each page ([`index`]); later, read one record back on its own, check it
//! again and take single pages out of it ([`RecordView`]).
//!
//! The stream format is unchanged: a memory record is already a unit with
//! its own frame, sequence number and checksums (README.md, "Record
//! frame"), so the byte range of one record is all a lazy reader needs to
//! fetch a page again, and its checksums protect it on the second read as
//! on the first.

use alloc::vec::Vec;

use crate::PAGE_SIZE;
use crate::apply::{Apply, ApplyError};
use crate::error::{At, Error};
use crate::header::Header;
use crate::io::Source;
use crate::page::{self, MemOp};
use crate::reader::{Reader, Record};
use crate::record::{FRAME_LEN, Fields, Frame, FrameError, Kind, TRAILER_LEN, payload_crc};
use crate::stats::Stats;

/// Where one memory record lies in its stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordSpan {
    /// Its sequence number (what its frame must say when read back).
    pub seq: u32,
    /// Stream offset of its frame header.
    pub offset: u64,
    /// Frame header, payload and payload checksum, in bytes.
    pub len: u32,
}

impl RecordSpan {
    /// Where the record is, for error reports.
    pub fn at(&self) -> At {
        At { record: self.seq, offset: self.offset, kind: Some(Kind::Memory) }
    }
}

/// Where a page's content is inside the record that holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Content {
    /// The last data entry (plain, LZ4 block or shared) covering this
    /// frame number.
    Page(u64),
    /// The shared entry that sent content `id` (the page itself was a
    /// shared reference).
    Shared(u32),
}

/// Marks a page held by no record (never sent, or sent as zero or
/// poisoned and applied at once).
const NONE: u32 = u32::MAX;
/// Set in a page's holder when its content is a shared reference (the
/// id is in `aliases`).
const ALIAS: u32 = 1 << 31;

/// Which memory record holds each page's content, for pages whose content
/// is data (zero and poisoned pages are handed to the consumer at once).
/// One word per page of RAM (a tenth of a percent of it), allocated up
/// front by [`PageIndex::new`] so a stream cannot make it grow.
#[derive(Debug)]
pub struct PageIndex {
    /// RAM ranges: first frame, pages, first slot in `holder`.
    ram: Vec<(u64, u64, usize)>,
    /// Per page: an index into `records` (with `ALIAS` for shared
    /// references), or `NONE`.
    holder: Vec<u32>,
    records: Vec<RecordSpan>,
    /// Per shared content id: the record (index into `records`) that sent it.
    shared: Vec<u32>,
    /// Pages whose content is a shared reference: (frame, id), sorted by
    /// frame once indexing is done, the last reference to a page winning.
    aliases: Vec<(u64, u32)>,
}

/// The index could not be allocated (the host is short of heap).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoRoom {
    pub bytes: u64,
}

impl PageIndex {
    /// An empty index for a stream of configuration `header`.
    pub fn new(header: &Header) -> Result<PageIndex, NoRoom> {
        let mut ram = Vec::new();
        let mut pages = 0usize;
        for r in &header.ram {
            let n = r.pages();
            let first = pages;
            pages = usize::try_from(n).ok().and_then(|n| pages.checked_add(n)).ok_or(NoRoom { bytes: u64::MAX })?;
            ram.push((r.first_gfn(), n, first));
        }
        let bytes = (pages as u64).saturating_mul(4);
        let mut holder = Vec::new();
        holder.try_reserve_exact(pages).map_err(|_| NoRoom { bytes })?;
        holder.resize(pages, NONE);
        Ok(PageIndex { ram, holder, records: Vec::new(), shared: Vec::new(), aliases: Vec::new() })
    }

    fn slot(&self, gfn: u64) -> Option<usize> {
        let &(first, pages, at) = self.ram.iter().find(|&&(first, pages, _)| gfn >= first && gfn - first < pages)?;
        let _ = pages;
        Some(at + (gfn - first) as usize)
    }

    /// Pages whose content some record holds.
    pub fn held_pages(&self) -> u64 {
        self.holder.iter().filter(|&&h| h != NONE).count() as u64
    }

    /// The memory records that hold content, in stream order.
    pub fn records(&self) -> &[RecordSpan] {
        &self.records
    }

    /// Runs of consecutive frame numbers whose content a record holds:
    /// (first frame, pages), in address order.
    pub fn held_runs(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.ram.iter().flat_map(move |&(first, pages, at)| {
            let held = &self.holder[at..at + pages as usize];
            let mut p = 0usize;
            core::iter::from_fn(move || {
                while p < held.len() && held[p] == NONE {
                    p += 1;
                }
                if p == held.len() {
                    return None;
                }
                let start = p;
                while p < held.len() && held[p] != NONE {
                    p += 1;
                }
                Some((first + start as u64, (p - start) as u64))
            })
        })
    }

    /// The record holding page `gfn`'s content and where in it, or `None`
    /// when no record does (or `gfn` is outside RAM).
    pub fn locate(&self, gfn: u64) -> Option<(RecordSpan, Content)> {
        let h = *self.holder.get(self.slot(gfn)?)?;
        if h == NONE {
            return None;
        }
        let span = *self.records.get((h & !ALIAS) as usize)?;
        if h & ALIAS == 0 {
            return Some((span, Content::Page(gfn)));
        }
        let i = self.aliases.partition_point(|&(g, _)| g <= gfn).checked_sub(1)?;
        let (g, id) = self.aliases[i];
        (g == gfn).then_some((span, Content::Shared(id)))
    }

    /// One memory entry of record `rec` (an index into `records`).
    fn note(&mut self, rec: u32, op: &MemOp<'_>, at: At) -> Result<(), Error> {
        let (gfn, pages) = op.span();
        let holder = match *op {
            MemOp::LargeRun { .. } => return Ok(()),
            MemOp::Pages { .. } => rec,
            MemOp::Shared { id, .. } => {
                // Ids come in order (the reader checked): this is id `len`.
                debug_assert_eq!(id as usize, self.shared.len());
                self.shared
                    .try_reserve(1)
                    .map_err(|_| Error::Malformed { at, why: "too many shared contents to index" })?;
                self.shared.push(rec);
                rec
            }
            MemOp::SharedRef { id, .. } => {
                let &r = self.shared.get(id as usize).ok_or(Error::Malformed { at, why: "shared id not indexed" })?;
                self.aliases
                    .try_reserve(1)
                    .map_err(|_| Error::Malformed { at, why: "too many shared references to index" })?;
                self.aliases.push((gfn, id));
                r | ALIAS
            }
            MemOp::Zero { .. } | MemOp::Poisoned { .. } => NONE,
        };
        // Inside one RAM range: the reader checked.
        let start = self.slot(gfn).ok_or(Error::OutsideRam { at, gfn, pages })?;
        let end = start + pages as usize;
        self.holder.get_mut(start..end).ok_or(Error::OutsideRam { at, gfn, pages })?.fill(holder);
        Ok(())
    }
}

/// Reads the rest of `reader`'s stream as [`Reader::apply`] does, every
/// record checked the same way, but memory whose content is data goes
/// into `index` instead of to `sink`: `sink` gets the vCPU, device,
/// resume, large-run, zero and poisoned calls only (never `pages`,
/// `shared` or `shared_ref`). Returns what the stream held. On error,
/// drop what `sink` built, as after `apply`.
pub fn index<R: Source, A: Apply>(
    reader: &mut Reader<R>,
    index: &mut PageIndex,
    sink: &mut A,
) -> Result<Stats, ApplyError<A::Error>> {
    let refused = |at| move |error| ApplyError::Sink { at, error };
    loop {
        let Some((at, record)) = reader.next_record()? else {
            return Ok(*reader.stats());
        };
        match record {
            Record::Vcpu { index, state } => sink.vcpu(index, *state).map_err(refused(at))?,
            Record::Device { name, version, bytes } => sink.device(name, version, bytes).map_err(refused(at))?,
            Record::Memory(mut m) => {
                // The record's number in the index; its span is known
                // once the reader is past it, which it is already (a
                // record is read whole before its entries come out).
                let rec = index.records.len();
                let rec32 = u32::try_from(rec)
                    .ok()
                    .filter(|&r| r < ALIAS - 1)
                    .ok_or(Error::Malformed { at, why: "too many memory records to index" })?;
                let mut used = false;
                while let Some((e, op)) = m.next_entry()? {
                    match op {
                        MemOp::Zero { gfn, pages } => sink.zero(gfn, pages).map_err(refused(e))?,
                        MemOp::Poisoned { gfn } => sink.poisoned(gfn).map_err(refused(e))?,
                        MemOp::LargeRun { gfn, pages } => sink.large_run(gfn, pages).map_err(refused(e))?,
                        MemOp::Pages { .. } | MemOp::Shared { .. } | MemOp::SharedRef { .. } => used = true,
                    }
                    index.note(rec32, &op, e)?;
                }
                if used {
                    let len = u32::try_from(reader.offset() - at.offset)
                        .map_err(|_| Error::Malformed { at, why: "record longer than a frame can be" })?;
                    index
                        .records
                        .try_reserve(1)
                        .map_err(|_| Error::Malformed { at, why: "too many memory records to index" })?;
                    index.records.push(RecordSpan { seq: at.record, offset: at.offset, len });
                } else {
                    // Nothing in it needs reading again: forget it. No page
                    // names it (only data entries set a holder).
                }
            }
            Record::Resume => sink.resume().map_err(refused(at))?,
            // Only in a live stream (the checker refuses it elsewhere): a
            // checkpoint being indexed never has one.
            Record::Pending(runs) => {
                for (gfn, pages) in runs {
                    sink.pending(gfn, pages).map_err(refused(at))?;
                }
            }
            Record::End(stats) => {
                // Later references win, as later pages do.
                index.aliases.sort_by_key(|&(g, _)| g);
                dedup_keep_last(&mut index.aliases);
                return Ok(stats);
            }
        }
    }
}

/// Keeps the last of each run of equal frame numbers (a stable sort kept
/// stream order within a frame).
fn dedup_keep_last(v: &mut Vec<(u64, u32)>) {
    let mut out = 0;
    for i in 0..v.len() {
        if i + 1 < v.len() && v[i + 1].0 == v[i].0 {
            continue;
        }
        v[out] = v[i];
        out += 1;
    }
    v.truncate(out);
}

/// A memory entry located inside a record's payload (not decoded).
#[derive(Clone, Copy, Debug)]
struct Entry {
    tag: u8,
    gfn: u64,
    pages: u64,
    /// Shared id for a shared entry.
    id: u32,
    pos: usize,
}

/// One memory record read back on its own and checked again: its frame
/// header checksum, sequence number, kind, layout version, length and
/// payload checksum, then the shape of every entry. Pages come out one at a
/// time ([`Self::page`]); an LZ4 block is decompressed once for all the
/// pages it holds.
#[derive(Debug)]
pub struct RecordView {
    span: RecordSpan,
    payload: Vec<u8>,
    entries: Vec<Entry>,
    /// The decompressed LZ4 block last used: its entry's payload position.
    block: Vec<u8>,
    block_pos: Option<usize>,
}

impl RecordView {
    /// Checks `bytes`, read back from where `span` says, as the record
    /// `span` names.
    pub fn check(bytes: &[u8], span: &RecordSpan) -> Result<RecordView, Error> {
        let at = span.at();
        let malformed = |why| Error::Malformed { at, why };
        if bytes.len() != span.len as usize || bytes.len() < FRAME_LEN + TRAILER_LEN {
            return Err(malformed("record read back at another length"));
        }
        let fb: &[u8; FRAME_LEN] = bytes[..FRAME_LEN].try_into().map_err(|_| malformed("frame cut short"))?;
        let frame = Frame::decode(fb).map_err(|e| match e {
            FrameError::Checksum => Error::FrameChecksum { at },
            FrameError::Reserved => malformed("reserved frame byte not zero"),
            FrameError::TooLong(len) => Error::TooLong { at, len: u64::from(len) },
        })?;
        if frame.seq != span.seq {
            return Err(Error::Sequence { at, found: frame.seq });
        }
        if frame.kind != Kind::Memory {
            return Err(malformed("not a memory record"));
        }
        if frame.version != Kind::Memory.version() {
            return Err(Error::RecordVersion { at, version: frame.version });
        }
        let end = FRAME_LEN + frame.len as usize;
        if end + TRAILER_LEN != bytes.len() {
            return Err(malformed("record read back at another length"));
        }
        let payload = &bytes[FRAME_LEN..end];
        let crc = u32::from_le_bytes([bytes[end], bytes[end + 1], bytes[end + 2], bytes[end + 3]]);
        if crc != payload_crc(fb, payload) {
            return Err(Error::Checksum { at });
        }
        let mut entries = Vec::new();
        let mut f = Fields::new(payload);
        while !f.is_empty() {
            let pos = f.pos();
            let (tag, gfn, pages, id) =
                page::skip(&mut f).map_err(|why| Error::Malformed { at: entry_at(span, pos), why })?;
            entries.try_reserve(1).map_err(|_| malformed("too many entries to hold"))?;
            entries.push(Entry { tag, gfn, pages, id, pos });
        }
        Ok(RecordView { span: *span, payload: payload.to_vec(), entries, block: Vec::new(), block_pos: None })
    }

    /// The record this is.
    pub fn span(&self) -> &RecordSpan {
        &self.span
    }

    /// Copies `content` (as [`PageIndex::locate`] named it) into `out`.
    pub fn page(&mut self, content: Content, out: &mut [u8; PAGE_SIZE]) -> Result<(), Error> {
        let found = self.entries.iter().rev().find(|e| match content {
            Content::Page(gfn) => {
                matches!(e.tag, page::TAG_PAGE | page::TAG_LZ4 | page::TAG_SHARED)
                    && gfn >= e.gfn
                    && gfn - e.gfn < e.pages
            }
            Content::Shared(id) => e.tag == page::TAG_SHARED && e.id == id,
        });
        let at = self.span.at();
        let e = *found.ok_or(Error::Malformed { at, why: "the record does not hold the page" })?;
        let index = match content {
            Content::Page(gfn) => (gfn - e.gfn) as usize,
            Content::Shared(_) => 0,
        };
        if e.tag == page::TAG_LZ4 && self.block_pos != Some(e.pos) {
            let mut f = Fields::new(&self.payload);
            f.bytes(e.pos);
            // A decode failure leaves the block unusable: forget it first.
            self.block_pos = None;
            page::decode(&mut f, &mut self.block)
                .map_err(|why| Error::Malformed { at: entry_at(&self.span, e.pos), why })?;
            self.block_pos = Some(e.pos);
        }
        let data: &[u8] = match e.tag {
            page::TAG_LZ4 => &self.block,
            // Plain and shared data follow the tag, frame number (and id).
            page::TAG_PAGE => self.payload.get(e.pos + 9..).unwrap_or(&[]),
            _ => self.payload.get(e.pos + 13..).unwrap_or(&[]),
        };
        let page = data
            .get(index * PAGE_SIZE..(index + 1) * PAGE_SIZE)
            .ok_or(Error::Malformed { at: entry_at(&self.span, e.pos), why: "memory entry cut short" })?;
        out.copy_from_slice(page);
        Ok(())
    }
}

fn entry_at(span: &RecordSpan, pos: usize) -> At {
    At { offset: span.offset + (FRAME_LEN + pos) as u64, ..span.at() }
}
