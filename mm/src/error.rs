//! The crate's one error type.

use core::fmt;

use crate::addr::{GuestPhysAddr, HostPhysAddr};
use crate::paging::{Access, PageSize};

/// Why `merge` refused to collapse a table into one large page.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum MergeRefusal {
    /// The target is 4 KiB: there is nothing smaller to merge.
    TooSmall,
    /// The range is already one large page.
    AlreadyLarge,
    /// Some child entry is not present.
    Hole,
    /// Some child is itself a table (merge its children first).
    ChildIsTable,
    /// The children's host pages are not consecutive.
    NotContiguous,
    /// The children's host pages do not start on a large-page boundary.
    HostMisaligned,
    /// The children differ in access rights or memory type.
    NotUniform,
}

impl fmt::Display for MergeRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MergeRefusal::TooSmall => "4 KiB pages cannot be merged",
            MergeRefusal::AlreadyLarge => "it is already mapped by one page",
            MergeRefusal::Hole => "part of it is not mapped",
            MergeRefusal::ChildIsTable => "part of it is mapped by smaller pages",
            MergeRefusal::NotContiguous => "its host pages are not contiguous",
            MergeRefusal::HostMisaligned => "its host pages are not aligned to the large page size",
            MergeRefusal::NotUniform => "its pages differ in access rights or memory type",
        })
    }
}

/// Everything that can go wrong in this crate. No operation panics on bad
/// input; it returns one of these and leaves its object unchanged unless the
/// operation's documentation says otherwise.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Error {
    /// A guest-physical address is not aligned to the page size asked for.
    MisalignedGuestAddress { gpa: GuestPhysAddr, size: PageSize },
    /// A host-physical address is not aligned to the page size asked for.
    MisalignedHostAddress { hpa: HostPhysAddr, size: PageSize },
    /// A guest-physical range reaches beyond the 48 bits nested paging covers.
    GuestAddressOutOfRange(GuestPhysAddr),
    /// A host-physical range reaches beyond the 52 bits an entry can hold.
    HostAddressOutOfRange(HostPhysAddr),
    /// The entry format cannot grant exactly these rights.
    UnsupportedAccess { format: &'static str, access: Access },
    /// The table is limited to smaller pages (see `set_max_page_size`).
    UnsupportedPageSize(PageSize),
    /// `map` would overlap an existing mapping.
    AlreadyMapped { gpa: GuestPhysAddr, size: PageSize },
    /// Nothing is mapped at the address.
    NotMapped(GuestPhysAddr),
    /// The address is mapped by a larger page than the operation names.
    InsideLargerPage { gpa: GuestPhysAddr, size: PageSize },
    /// The range is mapped by smaller pages than the operation names.
    MappedBySmallerPages { gpa: GuestPhysAddr, size: PageSize },
    /// `split` found a 4 KiB page.
    CannotSplit(GuestPhysAddr),
    /// `merge` refused.
    CannotMerge { gpa: GuestPhysAddr, size: PageSize, reason: MergeRefusal },
    /// The frame allocator ran out while building page tables.
    OutOfTableMemory,
    /// The host ran out of memory while allocating guest RAM.
    OutOfGuestMemory { size: u64 },
    /// A guest RAM layout is empty, misaligned, overlapping or out of order.
    InvalidRamLayout { gpa: GuestPhysAddr, size: u64 },
    /// A guest RAM access touches bytes outside guest RAM.
    OutsideGuestRam { gpa: GuestPhysAddr, len: u64 },
    // --- vm_memory: the per-VM memory object (keep this block together) ---
    /// A guest-physical memory map region is empty, not 4 KiB-aligned,
    /// overlapping another or beyond the guest-physical space.
    InvalidMemoryMap { gpa: GuestPhysAddr, size: u64 },
    /// The address is not RAM of this VM.
    NotGuestRam(GuestPhysAddr),
    /// The page's state does not allow the operation.
    WrongPageState { gpa: GuestPhysAddr, state: crate::vm_memory::PageState },
    /// The page is poisoned (uncorrectable memory error); its contents are lost.
    PagePoisoned(GuestPhysAddr),
    /// The host ran out of 4 KiB frames for a guest page (copy-on-write
    /// copy, page-in, balloon deflation, lazy load).
    OutOfHostFrames,
    /// The host heap has no room for the manager's own bookkeeping (a VM's
    /// per-page tables, a sharing-index entry).
    OutOfHeap { bytes: u64 },
    /// The operation needs a hook (sharing index, page store or page
    /// source) the caller did not supply.
    MissingHook(&'static str),
    /// A page store refused to take a page (full).
    PageStoreFull,
    /// A page store slot failed its integrity check: the stored copy is
    /// corrupt and was not used.
    PageStoreCorrupt { gpa: GuestPhysAddr },
    /// A lazy-load page source could not supply a page.
    PageSourceFailed(GuestPhysAddr),
    /// The page source does not have the page yet (post-copy: it is on its
    /// way from the migration's source host). Nothing changed; the access
    /// can be retried once it arrives.
    PageInTransit(GuestPhysAddr),
    /// Reading the page hit an uncorrectable memory error in its frame
    /// (the host's machine-check-safe copy failed). [`VmMemory::read`]
    /// poisons the page and reports [`Error::PagePoisoned`] instead.
    ///
    /// [`VmMemory::read`]: crate::vm_memory::VmMemory::read
    MemoryError(GuestPhysAddr),
    /// Dirty logging is already running (start) or not running (harvest, stop).
    DirtyLogState { running: bool },
    /// Access sampling is already running (start) or not running (finish).
    SamplingState { running: bool },
    /// A memory snapshot is already running (start, dirty logging) or not
    /// running (take, stop).
    SnapshotState { running: bool },
    /// The snapshot already handed this page out.
    SnapshotTaken(GuestPhysAddr),
    /// A vCPU index beyond the 64 this crate tracks.
    InvalidVcpu(usize),
    /// A granularity the operation does not support.
    UnsupportedGranularity(PageSize),
    // --- end vm_memory ---
    // --- swap: host swap devices, reservations and files (keep this block together) ---
    /// A block transfer's buffer is empty or not a whole number of blocks.
    BadBlockBuffer { len: usize },
    /// A block transfer reaches beyond the device.
    BlockOutOfRange { block: u64, len: u64 },
    /// The block device failed a transfer starting at `block`.
    BlockIo { block: u64, write: bool },
    /// The device's swap superblock was refused.
    SwapDeviceRefused(crate::swap::SuperblockRefusal),
    /// A pool's reservation would need more swap slots than the device has.
    SwapReservationTooLarge { requested: u64, available: u64 },
    /// A pool or file would shrink below the pages it already holds.
    SwapShrinkBelowUse { in_use: u64, requested: u64 },
    /// No such swap pool.
    UnknownSwapPool(u32),
    /// The VM has no swap file.
    UnknownSwapFile(u32),
    /// The VM already has a swap file.
    SwapFileExists(u32),
    /// A swapped-out page failed its checks on page-in; nothing was returned.
    SwapSlotCorrupt { gpa: GuestPhysAddr, reason: crate::swap::SlotRefusal },
    // --- end swap ---
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Error::MisalignedGuestAddress { gpa, size } => {
                write!(f, "Guest-physical address {gpa} is not aligned to {size}")
            }
            Error::MisalignedHostAddress { hpa, size } => {
                write!(f, "Host-physical address {hpa} is not aligned to {size}")
            }
            Error::GuestAddressOutOfRange(gpa) => {
                write!(f, "Guest-physical range at {gpa} reaches beyond the 48-bit guest-physical space")
            }
            Error::HostAddressOutOfRange(hpa) => {
                write!(f, "Host-physical range at {hpa} reaches beyond the 52-bit physical address space")
            }
            Error::UnsupportedAccess { format, access } => {
                write!(f, "{format} entries cannot grant access {access}")
            }
            Error::UnsupportedPageSize(size) => {
                write!(f, "{size} pages are not enabled for this nested page table")
            }
            Error::AlreadyMapped { gpa, size } => {
                write!(f, "{size} page at {gpa} overlaps an existing mapping")
            }
            Error::NotMapped(gpa) => write!(f, "Guest-physical address {gpa} is not mapped"),
            Error::InsideLargerPage { gpa, size } => {
                write!(f, "Guest-physical address {gpa} lies inside a {size} page (split it first)")
            }
            Error::MappedBySmallerPages { gpa, size } => {
                write!(f, "The {size} range at {gpa} is mapped by smaller pages")
            }
            Error::CannotSplit(gpa) => {
                write!(f, "The page at {gpa} is already 4 KiB and cannot be split")
            }
            Error::CannotMerge { gpa, size, reason } => {
                write!(f, "Cannot merge the {size} range at {gpa}: {reason}")
            }
            Error::OutOfTableMemory => f.write_str("Out of host memory for page tables"),
            Error::OutOfGuestMemory { size } => {
                write!(f, "Out of host memory for {size:#x} bytes of guest RAM")
            }
            Error::InvalidRamLayout { gpa, size } => write!(
                f,
                "Guest RAM region at {gpa} of {size:#x} bytes is empty, not 4 KiB-aligned, \
                 out of order or beyond the guest-physical space"
            ),
            Error::OutsideGuestRam { gpa, len } => {
                write!(f, "Guest-physical range at {gpa} of {len:#x} bytes is outside guest RAM")
            }
            Error::InvalidMemoryMap { gpa, size } => write!(
                f,
                "Memory map region at {gpa} of {size:#x} bytes is empty, not 4 KiB-aligned, \
                 overlapping or beyond the guest-physical space"
            ),
            Error::NotGuestRam(gpa) => write!(f, "Guest-physical address {gpa} is not RAM of this VM"),
            Error::WrongPageState { gpa, state } => {
                write!(f, "The page at {gpa} is {state:?}, which does not allow this operation")
            }
            Error::PagePoisoned(gpa) => write!(f, "The page at {gpa} is poisoned by an uncorrectable memory error"),
            Error::OutOfHostFrames => f.write_str("Out of host memory for a guest page"),
            Error::OutOfHeap { bytes } => {
                write!(f, "The host heap has no room for {bytes} bytes of memory-manager bookkeeping")
            }
            Error::MissingHook(what) => write!(f, "This operation needs a {what}, and none was supplied"),
            Error::PageStoreFull => f.write_str("The page store is full"),
            Error::PageStoreCorrupt { gpa } => {
                write!(f, "The stored copy of the page at {gpa} is corrupt (checksum or header mismatch)")
            }
            Error::PageSourceFailed(gpa) => write!(f, "The page source could not supply the page at {gpa}"),
            Error::PageInTransit(gpa) => write!(f, "The page at {gpa} has not arrived yet (post-copy)"),
            Error::MemoryError(gpa) => write!(f, "Reading the page at {gpa} hit an uncorrectable memory error"),
            Error::DirtyLogState { running: true } => f.write_str("Dirty logging is already running"),
            Error::DirtyLogState { running: false } => f.write_str("Dirty logging is not running"),
            Error::SamplingState { running: true } => f.write_str("Access sampling is already running"),
            Error::SamplingState { running: false } => f.write_str("Access sampling is not running"),
            Error::SnapshotState { running: true } => f.write_str("A memory snapshot is already running"),
            Error::SnapshotState { running: false } => f.write_str("No memory snapshot is running"),
            Error::SnapshotTaken(gpa) => write!(f, "The snapshot already handed out the page at {gpa}"),
            Error::InvalidVcpu(n) => write!(f, "vCPU {n} is beyond the 64 vCPUs memory tracking supports"),
            Error::UnsupportedGranularity(size) => write!(f, "{size} granularity is not supported here"),
            Error::BadBlockBuffer { len } => {
                write!(f, "A block transfer of {len} bytes is not a whole number of 512-byte blocks")
            }
            Error::BlockOutOfRange { block, len } => {
                write!(f, "A transfer of {len} block(s) at block {block} reaches beyond the device")
            }
            Error::BlockIo { block, write: true } => write!(f, "The device failed a write at block {block}"),
            Error::BlockIo { block, write: false } => write!(f, "The device failed a read at block {block}"),
            Error::SwapDeviceRefused(reason) => write!(f, "Refusing the swap device: {reason}"),
            Error::SwapReservationTooLarge { requested, available } => {
                write!(f, "A swap reservation of {requested} pages does not fit the device's {available} usable slots")
            }
            Error::SwapShrinkBelowUse { in_use, requested } => {
                write!(f, "Cannot shrink swap to {requested} pages: {in_use} pages are swapped out")
            }
            Error::UnknownSwapPool(p) => write!(f, "There is no swap pool {p}"),
            Error::UnknownSwapFile(vm) => write!(f, "VM {vm} has no swap file"),
            Error::SwapFileExists(vm) => write!(f, "VM {vm} already has a swap file"),
            Error::SwapSlotCorrupt { gpa, reason } => {
                write!(f, "Refusing the swapped-out copy of the page at {gpa}: {reason}")
            }
        }
    }
}

impl core::error::Error for Error {}
