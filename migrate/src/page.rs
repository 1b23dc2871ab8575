//! Memory entries: the payload of a memory record is a sequence of them,
//! each a tag byte, a guest frame number and what the tag needs.

use alloc::vec::Vec;

use crate::PAGE_SIZE;
use crate::limits::MAX_BLOCK_PAGES;
use crate::record::Fields;
use crate::stats::PageKind;

pub const TAG_PAGE: u8 = 1;
pub const TAG_ZERO: u8 = 2;
pub const TAG_LZ4: u8 = 3;
pub const TAG_SHARED: u8 = 4;
pub const TAG_SHARED_REF: u8 = 5;
pub const TAG_POISONED: u8 = 6;
pub const TAG_LARGE: u8 = 7;

/// The largest entry: an LZ4 block that did not shrink (the writer sends
/// those as plain pages, but a reader must bound it anyway).
pub const LZ4_HEADER: usize = 1 + 8 + 1 + 4;
pub const PAGE_ENTRY: usize = 1 + 8 + PAGE_SIZE;

/// Large-page runs the format knows: 2 MiB and 1 GiB pages.
pub const LARGE_RUN_PAGES: [u32; 2] = [512, 512 * 512];

/// One memory entry, as a reader hands it over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemOp<'a> {
    /// The `pages` pages from `gfn` on were one large page: the entries
    /// that follow fill it, in order, before anything else comes.
    LargeRun { gfn: u64, pages: u32 },
    /// Whole pages of data from `gfn` on (sent plain or LZ4-compressed).
    Pages { gfn: u64, data: &'a [u8] },
    /// `pages` zero pages from `gfn` on.
    Zero { gfn: u64, pages: u32 },
    /// A page whose content gets id `id`; later pages may refer to it.
    Shared { gfn: u64, id: u32, data: &'a [u8; PAGE_SIZE] },
    /// A page with the content of id `id`.
    SharedRef { gfn: u64, id: u32 },
    /// A page lost to an uncorrectable memory error: no data.
    Poisoned { gfn: u64 },
}

impl MemOp<'_> {
    /// The guest pages it covers (none for a large-run marker).
    pub fn span(&self) -> (u64, u64) {
        match *self {
            MemOp::LargeRun { gfn, .. } => (gfn, 0),
            MemOp::Pages { gfn, data } => (gfn, (data.len() / PAGE_SIZE) as u64),
            MemOp::Zero { gfn, pages } => (gfn, u64::from(pages)),
            MemOp::Shared { gfn, .. } | MemOp::SharedRef { gfn, .. } | MemOp::Poisoned { gfn } => (gfn, 1),
        }
    }
}

pub fn is_zero(page: &[u8; PAGE_SIZE]) -> bool {
    page.as_chunks::<16>().0.iter().all(|c| *c == [0u8; 16])
}

pub fn put_page(b: &mut Vec<u8>, gfn: u64, data: &[u8]) {
    b.push(TAG_PAGE);
    b.extend_from_slice(&gfn.to_le_bytes());
    b.extend_from_slice(data);
}

pub fn put_zero(b: &mut Vec<u8>, gfn: u64, pages: u32) {
    b.push(TAG_ZERO);
    b.extend_from_slice(&gfn.to_le_bytes());
    b.extend_from_slice(&pages.to_le_bytes());
}

pub fn put_lz4(b: &mut Vec<u8>, gfn: u64, pages: u8, compressed: &[u8]) {
    b.push(TAG_LZ4);
    b.extend_from_slice(&gfn.to_le_bytes());
    b.push(pages);
    b.extend_from_slice(&(compressed.len() as u32).to_le_bytes());
    b.extend_from_slice(compressed);
}

pub fn put_shared(b: &mut Vec<u8>, gfn: u64, id: u32, data: &[u8; PAGE_SIZE]) {
    b.push(TAG_SHARED);
    b.extend_from_slice(&gfn.to_le_bytes());
    b.extend_from_slice(&id.to_le_bytes());
    b.extend_from_slice(data);
}

pub fn put_shared_ref(b: &mut Vec<u8>, gfn: u64, id: u32) {
    b.push(TAG_SHARED_REF);
    b.extend_from_slice(&gfn.to_le_bytes());
    b.extend_from_slice(&id.to_le_bytes());
}

pub fn put_poisoned(b: &mut Vec<u8>, gfn: u64) {
    b.push(TAG_POISONED);
    b.extend_from_slice(&gfn.to_le_bytes());
}

pub fn put_large(b: &mut Vec<u8>, gfn: u64, pages: u32) {
    b.push(TAG_LARGE);
    b.extend_from_slice(&gfn.to_le_bytes());
    b.extend_from_slice(&pages.to_le_bytes());
}

/// Steps over the entry at the cursor without decompressing it, checking
/// its shape (tag, lengths, counts) as [`decode`] does: its tag, first
/// frame, pages and shared id (0 unless a shared entry or reference).
pub fn skip(f: &mut Fields<'_>) -> Result<(u8, u64, u64, u32), &'static str> {
    let short = "memory entry cut short";
    let tag = f.u8().ok_or(short)?;
    let gfn = f.u64().ok_or(short)?;
    Ok(match tag {
        TAG_PAGE => {
            f.bytes(PAGE_SIZE).ok_or(short)?;
            (tag, gfn, 1, 0)
        }
        TAG_ZERO | TAG_LARGE => {
            let pages = f.u32().ok_or(short)?;
            if tag == TAG_ZERO && pages == 0 {
                return Err("empty zero run");
            }
            (tag, gfn, if tag == TAG_ZERO { u64::from(pages) } else { 0 }, 0)
        }
        TAG_LZ4 => {
            let pages = f.u8().ok_or(short)?;
            if pages == 0 || pages > MAX_BLOCK_PAGES {
                return Err("LZ4 block page count out of range");
            }
            let len = f.u32().ok_or(short)?;
            f.bytes(len as usize).ok_or(short)?;
            (tag, gfn, u64::from(pages), 0)
        }
        TAG_SHARED => {
            let id = f.u32().ok_or(short)?;
            f.bytes(PAGE_SIZE).ok_or(short)?;
            (tag, gfn, 1, id)
        }
        TAG_SHARED_REF => (tag, gfn, 1, f.u32().ok_or(short)?),
        TAG_POISONED => (tag, gfn, 1, 0),
        _ => return Err("unknown memory entry tag"),
    })
}

/// Decodes the entry at the cursor. LZ4 blocks are expanded into `block`
/// (at most `MAX_BLOCK_PAGES` pages, whatever the entry claims). Returns
/// the entry and how its pages travelled, for the statistics.
pub fn decode<'a>(f: &mut Fields<'a>, block: &'a mut Vec<u8>) -> Result<(MemOp<'a>, Option<PageKind>), &'static str> {
    let short = "memory entry cut short";
    let tag = f.u8().ok_or(short)?;
    let gfn = f.u64().ok_or(short)?;
    Ok(match tag {
        TAG_PAGE => {
            let data = f.bytes(PAGE_SIZE).ok_or(short)?;
            (MemOp::Pages { gfn, data }, Some(PageKind::Normal))
        }
        TAG_ZERO => {
            let pages = f.u32().ok_or(short)?;
            if pages == 0 {
                return Err("empty zero run");
            }
            (MemOp::Zero { gfn, pages }, Some(PageKind::Zero))
        }
        TAG_LZ4 => {
            let pages = f.u8().ok_or(short)?;
            if pages == 0 || pages > MAX_BLOCK_PAGES {
                return Err("LZ4 block page count out of range");
            }
            let len = f.u32().ok_or(short)?;
            let src = f.bytes(len as usize).ok_or(short)?;
            let n = usize::from(pages) * PAGE_SIZE;
            block.clear();
            block.resize(n, 0);
            match lz4_flex::block::decompress_into(src, block) {
                Ok(got) if got == n => {}
                _ => return Err("LZ4 block does not decompress to its pages"),
            }
            (MemOp::Pages { gfn, data: &block[..] }, Some(PageKind::Compressed))
        }
        TAG_SHARED => {
            let id = f.u32().ok_or(short)?;
            let data = f.array::<PAGE_SIZE>().ok_or(short)?;
            (MemOp::Shared { gfn, id, data }, Some(PageKind::Shared))
        }
        TAG_SHARED_REF => {
            let id = f.u32().ok_or(short)?;
            (MemOp::SharedRef { gfn, id }, Some(PageKind::SharedRef))
        }
        TAG_POISONED => (MemOp::Poisoned { gfn }, Some(PageKind::Poisoned)),
        TAG_LARGE => {
            let pages = f.u32().ok_or(short)?;
            (MemOp::LargeRun { gfn, pages }, None)
        }
        _ => return Err("unknown memory entry tag"),
    })
}
