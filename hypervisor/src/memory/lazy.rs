//! The page source of a lazily restored VM: its not-loaded pages come
//! from the checkpoint on the data disk, one memory record at a time.
//!
//! `vm restore <name> lazy` reads the checkpoint's stream once (every
//! record checked), applies all but the pages whose content is data, and
//! keeps a `migrate::index::PageIndex` of which memory record holds each of
//! those. Here a touched page's record (the storage block: at most 1 MiB,
//! usually about 256 KiB) is read back from the checkpoint extent in one
//! disk request, its checksums are checked again (the disk may have
//! changed since), and the page and the not-loaded pages of its block are
//! filled from it; the record stays cached for the next pages.
//!
//! Read-ahead follows the access pattern: a touch loads an aligned block of
//! `FAULT_BLOCK` pages; a touch landing in the block right after the last
//! one doubles it (up to 512 pages, 2 MiB, which maps large again), any
//! other touch starts over. A background fill (`Manager::lazy_fill_round`)
//! loads the rest at a bounded rate until nothing is left on disk.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use migrate::index::{PageIndex, RecordView};
use mm::GuestPhysAddr;
use mm::swap::{BLOCK_SIZE, BlockStore};
use mm::vm_memory::PageSource;

/// Pages a first touch loads: an aligned block of 64 KiB, the largest LZ4
/// block of the stream (`migrate::limits::MAX_BLOCK_PAGES`), so a
/// compressed block is usually decoded once for all its pages.
pub const FAULT_BLOCK: u32 = 16;
/// The read-ahead's ceiling: a 2 MiB region, which `mm` maps with one
/// large page again once loaded.
pub const MAX_BLOCK: u32 = 512;
/// Pages the background fill loads per load (one aligned block).
pub const BACKGROUND_BLOCK: u32 = 64;
/// Background fill rate unless the operator gives one (`fill=`): 8192
/// pages (32 MiB) a second, so a 1 GiB guest converges in about 32 s while
/// the fill takes a bounded share of the CPU and the disk.
pub const DEFAULT_FILL_PAGES_PER_SEC: u32 = 8192;

/// How the pages of a lazily restored VM came in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LazyProgress {
    /// Pages on disk when the VM started.
    pub pages_at_start: u64,
    /// Pages still on disk (not loaded), as `mm` counted them last.
    pub on_disk: u64,
    /// Loads started by a guest touch (nested page fault) or a device's
    /// access to guest memory.
    pub faults: u64,
    /// Pages filled because they were touched.
    pub by_fault: u64,
    /// Pages filled with a touched one (its block, the read-ahead).
    pub by_readahead: u64,
    /// Pages filled by the background fill.
    pub by_background: u64,
    /// Records read back from the checkpoint (disk requests).
    pub records_read: u64,
    /// Bytes those reads moved.
    pub bytes_read: u64,
    /// Background fill rate (pages per second; 0: only on touch).
    pub fill_rate: u32,
    /// The fill completed (nothing left on disk, source dropped).
    pub complete: bool,
}

/// Who is loading: a touch (fault or device access) or the background fill.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Demand,
    Background,
}

/// A lazily restored VM's page source. See the module documentation.
pub struct LazySource {
    /// The checkpoint it reads (named in reports; it may not be deleted
    /// while this exists).
    pub checkpoint: String,
    /// The checkpoint extent, block 0 = stream byte 0.
    store: Box<dyn BlockStore>,
    index: PageIndex,
    /// The record last read, checked: (its index span's offset, the view).
    cached: Option<RecordView>,
    /// Buffer for record reads (whole 512-byte blocks around a record).
    buf: Vec<u8>,
    mode: Mode,
    /// The page the current load started at.
    touched: Option<u64>,
    /// Read-ahead: the current block and the frame after the last block a
    /// touch loaded.
    block: u32,
    next_expected: Option<u64>,
    pub progress: LazyProgress,
    /// The first read that failed: one line naming the checkpoint, the
    /// page and the record. The VM is stopped with it.
    pub failure: Option<String>,
    /// `failure` is about a touched page (not read-ahead).
    failure_touched: bool,
    /// Background fill: host clock reading (TSC) of the next round, and
    /// where the next round starts looking.
    pub next_fill_tsc: u64,
    pub fill_cursor: GuestPhysAddr,
}

impl core::fmt::Debug for LazySource {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("LazySource")
            .field("checkpoint", &self.checkpoint)
            .field("progress", &self.progress)
            .field("failure", &self.failure)
            .finish_non_exhaustive()
    }
}

impl LazySource {
    /// A source over `store` (the checkpoint extent holding the stream that
    /// `index` was built from).
    pub fn new(checkpoint: String, store: Box<dyn BlockStore>, index: PageIndex, fill_rate: u32) -> LazySource {
        LazySource {
            checkpoint,
            store,
            index,
            cached: None,
            buf: Vec::new(),
            mode: Mode::Demand,
            touched: None,
            block: FAULT_BLOCK,
            next_expected: None,
            progress: LazyProgress { fill_rate, ..LazyProgress::default() },
            failure: None,
            failure_touched: false,
            next_fill_tsc: 0,
            fill_cursor: GuestPhysAddr(0),
        }
    }

    /// Loads from now on are the background fill's (`true`) or touches.
    pub fn set_background(&mut self, on: bool) {
        self.mode = if on { Mode::Background } else { Mode::Demand };
    }

    /// The view of the record with index span `span`, read and checked
    /// (or the cached one).
    fn record(&mut self, span: &migrate::index::RecordSpan) -> Result<&mut RecordView, String> {
        if self.cached.as_ref().is_some_and(|v| v.span() == span) {
            return self.cached.as_mut().ok_or_else(String::new);
        }
        self.cached = None;
        let bs = BLOCK_SIZE as u64;
        let first = span.offset / bs;
        let end = (span.offset + u64::from(span.len)).div_ceil(bs);
        let n = ((end - first) * bs) as usize;
        // At most a record's 1 MiB cap plus two blocks: checked by the
        // index, which only keeps spans the reader accepted.
        self.buf.clear();
        self.buf.try_reserve(n).map_err(|_| format!("no heap for a {n}-byte read"))?;
        self.buf.resize(n, 0);
        self.store.read(first, &mut self.buf).map_err(|e| format!("reading the data disk failed: {e}"))?;
        self.progress.records_read += 1;
        self.progress.bytes_read += n as u64;
        let at = (span.offset - first * bs) as usize;
        let bytes = &self.buf[at..at + span.len as usize];
        let view = RecordView::check(bytes, span).map_err(|e| format!("{e}"))?;
        Ok(self.cached.insert(view))
    }
}

impl PageSource for LazySource {
    fn fill(&mut self, gpa: GuestPhysAddr, page: &mut [u8; 4096]) -> Result<(), mm::Error> {
        let gfn = gpa.0 / 4096;
        let located = self.index.locate(gfn);
        let result = match located {
            None => Err((String::from("no record holds it"), None)),
            Some((span, content)) => match self.record(&span) {
                Ok(view) => view.page(content, page).map_err(|e| (format!("{e}"), Some(span))),
                Err(why) => Err((why, Some(span))),
            },
        };
        match result {
            Ok(()) => {
                let p = &mut self.progress;
                match self.mode {
                    Mode::Background => p.by_background += 1,
                    Mode::Demand if self.touched == Some(gfn) => p.by_fault += 1,
                    Mode::Demand => p.by_readahead += 1,
                }
                Ok(())
            }
            Err((why, span)) => {
                // The first failure is kept, unless the touched page's own
                // comes after a read-ahead one: that is the page the guest
                // (or device) waits for, so the report names it.
                let touched = self.mode == Mode::Demand && self.touched == Some(gfn);
                if self.failure.is_none() || (touched && !self.failure_touched) {
                    self.failure_touched = touched;
                    let record = span
                        .map(|s| format!("record {} at byte {}", s.seq, s.offset))
                        .unwrap_or_else(|| String::from("no record"));
                    self.failure = Some(format!(
                        "lazy restore from checkpoint {}: guest page {:#x} ({record}) could not be read: {why}",
                        self.checkpoint, gpa.0
                    ));
                }
                Err(mm::Error::PageSourceFailed(gpa))
            }
        }
    }

    fn block_pages(&self) -> u32 {
        match self.mode {
            Mode::Background => BACKGROUND_BLOCK,
            Mode::Demand => self.block,
        }
    }

    fn touched(&mut self, gpa: GuestPhysAddr) {
        let gfn = gpa.0 / 4096;
        self.touched = Some(gfn);
        if self.mode == Mode::Background {
            return;
        }
        self.progress.faults += 1;
        // Sequential: this touch lands in the block right after the last
        // one a touch loaded. Then read further ahead; else start over.
        let sequential = self.next_expected.is_some_and(|next| gfn >= next && gfn < next + u64::from(self.block));
        self.block = if sequential { (self.block * 2).min(MAX_BLOCK) } else { FAULT_BLOCK };
        let size = u64::from(self.block);
        self.next_expected = Some((gfn & !(size - 1)) + size);
    }
}
