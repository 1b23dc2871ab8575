//! The host data disk's space manager: one extent table shared by swap, VM
//! disk images and checkpoints.
//!
//! The disk starts with a small table (two checksummed copies with a
//! generation number, so a torn update never loses it; layout in
//! [`format`]), followed by named extents, each a run of whole 4 KiB
//! units with a kind, a creation time, a "complete" flag and two free-form
//! metadata words:
//!
//! - `swap` (kind [`ExtentKind::Swap`]): made when the disk is formatted,
//!   taking [`FormatOptions::swap_percent`] of it; host swap
//!   (`mm::swap::SwapReservation`) runs inside it unchanged, through an
//!   [`ExtentStore`]. It cannot be deleted.
//! - images ([`ExtentKind::Image`]): VM disks of a fixed size, made by
//!   [`Space::create_image`]. Their blocks are *not* zeroed at creation
//!   (that would be a long write per MiB): `bytes` records how much of the
//!   image has been initialised (0 at creation), and the virtio-block
//!   device that will serve it must read zeros beyond that and advance it,
//!   zeroing any gap, before writing past it. Zero-filled lazily.
//! - checkpoints ([`ExtentKind::Checkpoint`]): byte streams of a size not
//!   known in advance. [`Space::create_checkpoint`] reserves a maximum;
//!   [`StreamWriter::close`] trims the tail, records the exact length and
//!   sets the complete flag. An extent that was never closed (the host
//!   stopped mid-save) is dropped by the next [`Space::open`].
//!
//! Allocation is first fit over the gaps between extents, in 4 KiB units;
//! it fails with a typed error when no gap is large enough, when the
//! table's [`MAX_EXTENTS`] slots are used, or when the name is taken.
//!
//! Every change writes the table copy that does not hold the newest
//! generation and flushes before it returns; the in-memory table changes
//! only once the write succeeded, so a failed change leaves both the disk
//! and the manager as they were.

pub mod format;
mod view;

#[cfg(test)]
mod tests;

use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use mm::swap::{BLOCK_SIZE, BlockStore};

pub use format::{ALIGN_BLOCKS, Copy, CopyRefusal, DATA_START, MAX_EXTENTS, Table};
pub use view::{ExtentStore, StreamReader, StreamWriter};

/// Longest extent name, in bytes.
pub const MAX_NAME: usize = 32;
/// The swap extent's name.
pub const SWAP_NAME: &str = "swap";

/// What an extent holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ExtentKind {
    Swap = 1,
    Image = 2,
    Checkpoint = 3,
}

impl ExtentKind {
    fn from_byte(b: u8) -> Option<Self> {
        match b {
            1 => Some(ExtentKind::Swap),
            2 => Some(ExtentKind::Image),
            3 => Some(ExtentKind::Checkpoint),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ExtentKind::Swap => "swap",
            ExtentKind::Image => "image",
            ExtentKind::Checkpoint => "checkpoint",
        }
    }
}

/// Why a name is not an extent name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameError {
    Empty,
    TooLong {
        len: usize,
    },
    /// A space, a control character or a non-ASCII byte.
    BadByte {
        at: usize,
    },
}

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NameError::Empty => f.write_str("a name cannot be empty"),
            NameError::TooLong { len } => write!(f, "a name is at most {MAX_NAME} bytes, this one is {len}"),
            NameError::BadByte { at } => {
                write!(f, "byte {at} is not printable ASCII (names have no spaces)")
            }
        }
    }
}

/// An extent's name: 1..=32 bytes of printable ASCII, no spaces.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ExtentName {
    len: u8,
    bytes: [u8; MAX_NAME],
}

impl ExtentName {
    /// The swap extent's name, [`SWAP_NAME`].
    pub const SWAP: ExtentName = {
        let src = SWAP_NAME.as_bytes();
        let mut bytes = [0; MAX_NAME];
        let mut i = 0;
        while i < src.len() {
            bytes[i] = src[i];
            i += 1;
        }
        ExtentName { len: src.len() as u8, bytes }
    };

    pub fn new(name: &str) -> Result<Self, NameError> {
        let b = name.as_bytes();
        if b.is_empty() {
            return Err(NameError::Empty);
        }
        if b.len() > MAX_NAME {
            return Err(NameError::TooLong { len: b.len() });
        }
        if let Some(at) = b.iter().position(|c| !c.is_ascii_graphic()) {
            return Err(NameError::BadByte { at });
        }
        let mut bytes = [0; MAX_NAME];
        bytes[..b.len()].copy_from_slice(b);
        Ok(ExtentName { len: b.len() as u8, bytes })
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    pub fn as_str(&self) -> &str {
        // Only `new` makes names, from ASCII.
        core::str::from_utf8(self.as_bytes()).unwrap_or("?")
    }
}

impl fmt::Display for ExtentName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for ExtentName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

/// One extent, as the table records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExtentInfo {
    pub name: ExtentName,
    pub kind: ExtentKind,
    /// First block on the disk.
    pub start: u64,
    /// Length in blocks.
    pub blocks: u64,
    /// A stream's exact length in bytes; an image's initialised prefix;
    /// the swap extent's whole length.
    pub bytes: u64,
    /// Unix seconds, as given by the caller.
    pub created: u64,
    /// False while a checkpoint is being written.
    pub complete: bool,
    /// Free-form (a checkpoint's source vendor, ...); 0 when unused.
    pub meta: [u64; 2],
}

impl ExtentInfo {
    /// Size in bytes of the blocks the extent holds.
    pub fn capacity_bytes(&self) -> u64 {
        self.blocks * BLOCK_SIZE as u64
    }
}

/// Why a space operation failed. Each is one line; none changed anything
/// unless it says so.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpaceError {
    /// The device failed.
    Io(mm::Error),
    /// The disk has no room for the table and a swap extent.
    TooSmall {
        blocks: u64,
    },
    /// Neither copy of the table has the magic: the disk holds no table.
    NotFormatted,
    /// Both copies are unusable; nothing was written.
    Damaged {
        a: CopyRefusal,
        b: CopyRefusal,
    },
    BadName(NameError),
    NameTaken(ExtentName),
    NotFound(ExtentName),
    /// No gap holds `wanted` blocks.
    NoRoom {
        wanted: u64,
        largest_free: u64,
    },
    /// All [`MAX_EXTENTS`] slots are used.
    TableFull,
    /// A size of zero, or one that overflows.
    BadSize,
    /// The swap extent is the host's; it is never deleted.
    Protected(ExtentName),
    /// VM `vm` uses the extent.
    InUse {
        name: ExtentName,
        vm: u32,
    },
    /// The extent is still being written (or was abandoned).
    Incomplete(ExtentName),
    /// A stream write would pass the extent's reserved maximum.
    StreamFull {
        max_bytes: u64,
    },
}

impl fmt::Display for SpaceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SpaceError::Io(e) => write!(f, "disk I/O failed: {e}"),
            SpaceError::TooSmall { blocks } => {
                write!(f, "a disk of {blocks} blocks has no room for the extent table and swap")
            }
            SpaceError::NotFormatted => f.write_str("the disk has no extent table"),
            SpaceError::Damaged { a, b } => {
                write!(f, "both copies of the extent table are unusable (A: {a}; B: {b}); nothing written")
            }
            SpaceError::BadName(e) => write!(f, "bad name: {e}"),
            SpaceError::NameTaken(n) => write!(f, "{n:?} already exists"),
            SpaceError::NotFound(n) => write!(f, "no extent named {n:?}"),
            SpaceError::NoRoom { wanted, largest_free } => write!(
                f,
                "no room: {} KiB wanted, the largest free gap is {} KiB",
                wanted * BLOCK_SIZE as u64 / 1024,
                largest_free * BLOCK_SIZE as u64 / 1024
            ),
            SpaceError::TableFull => write!(f, "the extent table is full ({MAX_EXTENTS} extents)"),
            SpaceError::BadSize => f.write_str("the size must be more than zero and fit the disk"),
            SpaceError::Protected(n) => write!(f, "{n:?} is the host's swap and cannot be deleted"),
            SpaceError::InUse { name, vm } => write!(f, "{name:?} is in use by vm {vm}"),
            SpaceError::Incomplete(n) => write!(f, "{n:?} is incomplete (being written, or abandoned)"),
            SpaceError::StreamFull { max_bytes } => {
                write!(f, "the write passes the extent's maximum of {max_bytes} bytes")
            }
        }
    }
}

impl From<mm::Error> for SpaceError {
    fn from(e: mm::Error) -> Self {
        SpaceError::Io(e)
    }
}

impl From<NameError> for SpaceError {
    fn from(e: NameError) -> Self {
        SpaceError::BadName(e)
    }
}

/// How [`Space::format`] lays a disk out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FormatOptions {
    /// Share of the data area given to swap, in percent (1..=100).
    pub swap_percent: u8,
    /// Swap gets at least this many blocks (or the whole data area, if it
    /// is smaller).
    pub min_swap_blocks: u64,
}

/// Half the disk, and at least 16 MiB: the tests' 63 MiB scratch disk
/// gives swap 31.5 MiB (7166 slots), where the swap test needs 2816
/// reserved slots and checks for more than 4096.
impl Default for FormatOptions {
    fn default() -> Self {
        FormatOptions { swap_percent: 50, min_swap_blocks: 16 << 11 }
    }
}

impl FormatOptions {
    /// The swap extent `format` makes on a disk of `disk_blocks` blocks:
    /// `(start, blocks)`. Self-checks run on it before the format writes.
    pub fn swap_extent(&self, disk_blocks: u64) -> Result<(u64, u64), SpaceError> {
        let data = round_down(disk_blocks.saturating_sub(DATA_START));
        let share = round_down((u128::from(data) * u128::from(self.swap_percent.clamp(1, 100)) / 100) as u64);
        let blocks = share.max(round_down(self.min_swap_blocks.min(data)));
        if blocks == 0 {
            return Err(SpaceError::TooSmall { blocks: disk_blocks });
        }
        Ok((DATA_START, blocks))
    }
}

fn round_down(blocks: u64) -> u64 {
    blocks - blocks % ALIGN_BLOCKS
}

fn round_up(blocks: u64) -> Option<u64> {
    blocks.checked_add(ALIGN_BLOCKS - 1).map(round_down)
}

/// Reads both copies of the table without writing: the newest valid copy,
/// and why the other was refused (if it was). [`SpaceError::NotFormatted`]
/// when neither has the magic.
pub fn read_table(dev: &mut dyn BlockStore) -> Result<(Table, Copy, Option<CopyRefusal>), SpaceError> {
    let blocks = dev.block_count();
    if blocks < DATA_START {
        return Err(SpaceError::NotFormatted);
    }
    let mut buf = vec![0u8; 2 * format::COPY_BYTES];
    dev.read(0, &mut buf)?;
    let (a, b) = buf.split_at(format::COPY_BYTES);
    choose(Table::decode(a, Copy::A, blocks), Table::decode(b, Copy::B, blocks))
}

/// Of two decoded copies, the valid one with the higher generation, and
/// why the other was refused (if it was).
pub fn choose(
    a: Result<Table, CopyRefusal>,
    b: Result<Table, CopyRefusal>,
) -> Result<(Table, Copy, Option<CopyRefusal>), SpaceError> {
    match (a, b) {
        (Ok(ta), Ok(tb)) if tb.generation > ta.generation => Ok((tb, Copy::B, None)),
        (Ok(ta), Ok(_)) => Ok((ta, Copy::A, None)),
        (Ok(ta), Err(why)) => Ok((ta, Copy::A, Some(why))),
        (Err(why), Ok(tb)) => Ok((tb, Copy::B, Some(why))),
        (Err(CopyRefusal::NoMagic), Err(CopyRefusal::NoMagic)) => Err(SpaceError::NotFormatted),
        (Err(a), Err(b)) => Err(SpaceError::Damaged { a, b }),
    }
}

/// Counts over a table, for one-line reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostSpaceSummary {
    pub swap_blocks: u64,
    pub images: usize,
    pub checkpoints: usize,
    pub largest_free: u64,
}

impl HostSpaceSummary {
    pub fn of<D: BlockStore>(s: &Space<D>) -> Self {
        let mut sum = HostSpaceSummary {
            largest_free: s.free_gaps().iter().map(|g| g.1).max().unwrap_or(0),
            ..Default::default()
        };
        for e in s.list() {
            match e.kind {
                ExtentKind::Swap => sum.swap_blocks += e.blocks,
                ExtentKind::Image => sum.images += 1,
                ExtentKind::Checkpoint => sum.checkpoints += 1,
            }
        }
        sum
    }
}

/// The space manager: the device and its table.
pub struct Space<D: BlockStore> {
    dev: D,
    table: Table,
    /// The copy holding `table.generation`; the next write goes to the other.
    current: Copy,
    /// Why the other copy was refused when the disk was opened.
    refused_copy: Option<CopyRefusal>,
    /// Incomplete extents `open` dropped.
    dropped: Vec<ExtentName>,
}

impl<D: BlockStore> fmt::Debug for Space<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Space").field("table", &self.table).field("current", &self.current).finish()
    }
}

impl<D: BlockStore> Space<D> {
    /// Lays out a fresh table on `dev` with only the swap extent (created
    /// at `now`, Unix seconds), whatever the disk held: the caller decides
    /// that the disk may be formatted (`disk::classify`). Copy B is written
    /// first, so a format torn by a crash leaves either a valid table or
    /// the disk's old block 0.
    pub fn format(mut dev: D, opts: &FormatOptions, now: u64) -> Result<Self, SpaceError> {
        let disk_blocks = dev.block_count();
        let (start, blocks) = opts.swap_extent(disk_blocks)?;
        let swap = ExtentInfo {
            name: ExtentName::SWAP,
            kind: ExtentKind::Swap,
            start,
            blocks,
            bytes: blocks * BLOCK_SIZE as u64,
            created: now,
            complete: true,
            meta: [0; 2],
        };
        let table = Table { generation: 1, disk_blocks, extents: vec![swap] };
        dev.write(Copy::B.first_block(), &table.encode(Copy::B))?;
        dev.flush()?;
        let mut space = Space { dev, table, current: Copy::B, refused_copy: None, dropped: Vec::new() };
        let extents = space.table.extents.clone();
        space.commit(extents)?;
        Ok(space)
    }

    /// Takes over a disk with a table, refusing one whose copies are both
    /// unusable (without writing). Incomplete extents (checkpoints whose
    /// writer never closed them) are dropped, which writes the table.
    pub fn open(mut dev: D) -> Result<Self, SpaceError> {
        let (table, current, refused_copy) = read_table(&mut dev)?;
        let mut space = Space { dev, table, current, refused_copy, dropped: Vec::new() };
        let dropped: Vec<ExtentName> = space.table.extents.iter().filter(|e| !e.complete).map(|e| e.name).collect();
        if !dropped.is_empty() {
            let keep = space.table.extents.iter().filter(|e| e.complete).copied().collect();
            space.commit(keep)?;
            space.dropped = dropped;
        }
        Ok(space)
    }

    /// The extents, by start block.
    pub fn list(&self) -> &[ExtentInfo] {
        &self.table.extents
    }

    /// The extent called `name`.
    pub fn get(&self, name: &str) -> Result<ExtentInfo, SpaceError> {
        let name = ExtentName::new(name)?;
        self.table.extents.iter().find(|e| e.name == name).copied().ok_or(SpaceError::NotFound(name))
    }

    pub fn disk_blocks(&self) -> u64 {
        self.table.disk_blocks
    }

    pub fn generation(&self) -> u64 {
        self.table.generation
    }

    /// The copy holding the newest table.
    pub fn current_copy(&self) -> Copy {
        self.current
    }

    /// Why the other copy was refused at open (it is rewritten by the
    /// next change).
    pub fn refused_copy(&self) -> Option<CopyRefusal> {
        self.refused_copy
    }

    /// Incomplete extents dropped by `open`.
    pub fn dropped(&self) -> &[ExtentName] {
        &self.dropped
    }

    /// The free gaps, `(start, blocks)`, in disk order.
    pub fn free_gaps(&self) -> Vec<(u64, u64)> {
        let mut gaps = Vec::new();
        let mut at = DATA_START;
        for e in &self.table.extents {
            if e.start > at {
                gaps.push((at, e.start - at));
            }
            at = e.start + e.blocks;
        }
        let end = round_down(self.table.disk_blocks);
        if end > at {
            gaps.push((at, end - at));
        }
        gaps
    }

    /// Blocks in all free gaps.
    pub fn free_blocks(&self) -> u64 {
        self.free_gaps().iter().map(|g| g.1).sum()
    }

    /// A VM disk image of `blocks` blocks (rounded up to 4 KiB), created
    /// at `now`. Not zeroed: see the module documentation.
    pub fn create_image(&mut self, name: &str, blocks: u64, now: u64) -> Result<ExtentInfo, SpaceError> {
        self.create(name, ExtentKind::Image, blocks, now, [0; 2], true)
    }

    /// A checkpoint of at most `max_bytes`, created at `now` with metadata
    /// `meta`, open for writing. Until [`StreamWriter::close`] it is
    /// incomplete (listed as such, dropped at the next open).
    pub fn create_checkpoint(
        &mut self,
        name: &str,
        max_bytes: u64,
        now: u64,
        meta: [u64; 2],
    ) -> Result<StreamWriter<D>, SpaceError>
    where
        D: Clone,
    {
        let blocks = max_bytes.div_ceil(BLOCK_SIZE as u64);
        let info = self.create(name, ExtentKind::Checkpoint, blocks, now, meta, false)?;
        Ok(StreamWriter::new(self.dev.clone(), info))
    }

    /// Reads a complete extent's bytes back (a checkpoint's stream).
    pub fn read_stream(&self, name: &str) -> Result<StreamReader<D>, SpaceError>
    where
        D: Clone,
    {
        let info = self.get(name)?;
        if !info.complete {
            return Err(SpaceError::Incomplete(info.name));
        }
        Ok(StreamReader::new(self.dev.clone(), info))
    }

    /// Deletes `name`, unless it is the swap extent or `in_use` names a VM
    /// using it (the manager's hook: VM disk images attached to a VM;
    /// nothing uses images yet). Its blocks are not cleared.
    pub fn delete(
        &mut self,
        name: &str,
        in_use: impl FnOnce(&ExtentInfo) -> Option<u32>,
    ) -> Result<ExtentInfo, SpaceError> {
        let info = self.get(name)?;
        if info.kind == ExtentKind::Swap {
            return Err(SpaceError::Protected(info.name));
        }
        if let Some(vm) = in_use(&info) {
            return Err(SpaceError::InUse { name: info.name, vm });
        }
        let keep = self.table.extents.iter().filter(|e| e.name != info.name).copied().collect();
        self.commit(keep)?;
        Ok(info)
    }

    /// A block store over extent `name` (the swap reservation runs in one).
    pub fn extent_store(&self, name: &str) -> Result<ExtentStore<D>, SpaceError>
    where
        D: Clone,
    {
        let info = self.get(name)?;
        Ok(ExtentStore::new(self.dev.clone(), info.start, info.blocks))
    }

    fn create(
        &mut self,
        name: &str,
        kind: ExtentKind,
        blocks: u64,
        now: u64,
        meta: [u64; 2],
        complete: bool,
    ) -> Result<ExtentInfo, SpaceError> {
        let name = ExtentName::new(name)?;
        if self.table.extents.iter().any(|e| e.name == name) {
            return Err(SpaceError::NameTaken(name));
        }
        let wanted = round_up(blocks).filter(|&b| b > 0).ok_or(SpaceError::BadSize)?;
        if self.table.extents.len() >= MAX_EXTENTS {
            return Err(SpaceError::TableFull);
        }
        let gaps = self.free_gaps();
        let Some(&(start, _)) = gaps.iter().find(|g| g.1 >= wanted) else {
            let largest_free = gaps.iter().map(|g| g.1).max().unwrap_or(0);
            return Err(SpaceError::NoRoom { wanted, largest_free });
        };
        let bytes = if kind == ExtentKind::Swap { wanted * BLOCK_SIZE as u64 } else { 0 };
        let info = ExtentInfo { name, kind, start, blocks: wanted, bytes, created: now, complete, meta };
        let mut extents = self.table.extents.clone();
        let at = extents.partition_point(|e| e.start < start);
        extents.insert(at, info);
        self.commit(extents)?;
        Ok(info)
    }

    /// Replaces `name`'s entry by `f(entry)` (a stream's close).
    fn update(&mut self, name: ExtentName, f: impl FnOnce(&mut ExtentInfo)) -> Result<ExtentInfo, SpaceError> {
        let mut extents = self.table.extents.clone();
        let e = extents.iter_mut().find(|e| e.name == name).ok_or(SpaceError::NotFound(name))?;
        f(e);
        let info = *e;
        self.commit(extents)?;
        Ok(info)
    }

    /// Writes `extents` as the next generation into the other copy and
    /// flushes; only then does the in-memory table change.
    fn commit(&mut self, extents: Vec<ExtentInfo>) -> Result<(), SpaceError> {
        let next = Table { generation: self.table.generation + 1, disk_blocks: self.table.disk_blocks, extents };
        let target = self.current.other();
        self.dev.write(target.first_block(), &next.encode(target))?;
        self.dev.flush()?;
        self.table = next;
        self.current = target;
        self.refused_copy = None;
        Ok(())
    }

    /// The device (tests).
    #[cfg(test)]
    fn dev(&mut self) -> &mut D {
        &mut self.dev
    }

    /// Hands the device back.
    pub fn into_device(self) -> D {
        self.dev
    }
}
