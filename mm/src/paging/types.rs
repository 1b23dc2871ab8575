//! Vendor-neutral vocabulary of the nested-paging engine.

use core::fmt;

use crate::addr::{GuestPhysAddr, HostPhysAddr, PAGE_SIZE_1G, PAGE_SIZE_2M, PAGE_SIZE_4K};

/// The size of one leaf mapping.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub enum PageSize {
    /// 4 KiB, mapped by a level-1 (page-table) entry.
    Size4K,
    /// 2 MiB, mapped by a level-2 (page-directory) entry.
    Size2M,
    /// 1 GiB, mapped by a level-3 (page-directory-pointer) entry.
    Size1G,
}

impl PageSize {
    /// All sizes, largest first (the order to try when mapping a range).
    pub const LARGEST_FIRST: [PageSize; 3] = [PageSize::Size1G, PageSize::Size2M, PageSize::Size4K];

    /// Size in bytes.
    pub const fn bytes(self) -> u64 {
        match self {
            PageSize::Size4K => PAGE_SIZE_4K,
            PageSize::Size2M => PAGE_SIZE_2M,
            PageSize::Size1G => PAGE_SIZE_1G,
        }
    }

    /// The next smaller size (what [`split`](super::NestedPageTable::split)
    /// produces), or `None` for 4 KiB.
    pub const fn smaller(self) -> Option<PageSize> {
        match self {
            PageSize::Size4K => None,
            PageSize::Size2M => Some(PageSize::Size4K),
            PageSize::Size1G => Some(PageSize::Size2M),
        }
    }

    /// The paging level whose entries map this size (1 = page table).
    pub(crate) const fn level(self) -> usize {
        match self {
            PageSize::Size4K => 1,
            PageSize::Size2M => 2,
            PageSize::Size1G => 3,
        }
    }

    /// The size a leaf at `level` maps; `None` above level 3 (a 512 GiB leaf
    /// does not exist in 4-level EPT or NPT).
    pub(crate) const fn at_level(level: usize) -> Option<PageSize> {
        match level {
            1 => Some(PageSize::Size4K),
            2 => Some(PageSize::Size2M),
            3 => Some(PageSize::Size1G),
            _ => None,
        }
    }
}

impl fmt::Display for PageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PageSize::Size4K => "4 KiB",
            PageSize::Size2M => "2 MiB",
            PageSize::Size1G => "1 GiB",
        })
    }
}

bitflags::bitflags! {
    /// What a guest may do through a mapping.
    #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
    pub struct Access: u8 {
        /// Data reads (and guest page-table walks).
        const READ = 1 << 0;
        /// Data writes.
        const WRITE = 1 << 1;
        /// Instruction fetches.
        const EXECUTE = 1 << 2;
    }
}

impl Access {
    /// Read-only.
    pub const R: Access = Access::READ;
    /// Read and write, no execute.
    pub const RW: Access = Access::READ.union(Access::WRITE);
    /// Read and execute, no write.
    pub const RX: Access = Access::READ.union(Access::EXECUTE);
    /// Everything (guest RAM).
    pub const RWX: Access = Access::all();
}

impl fmt::Display for Access {
    /// `rwx` notation with `-` for a missing right, e.g. `r-x`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (flag, c) in [(Access::READ, 'r'), (Access::WRITE, 'w'), (Access::EXECUTE, 'x')] {
            fmt::Write::write_char(f, if self.contains(flag) { c } else { '-' })?;
        }
        Ok(())
    }
}

/// The memory type a mapping imposes (combined with the guest's PAT by the
/// hardware; see the entry formats for how each vendor encodes it).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum MemType {
    /// UC: device memory (MMIO).
    Uncacheable,
    /// WT: write-through.
    WriteThrough,
    /// WB: ordinary RAM.
    WriteBack,
}

/// One decoded leaf entry: where it points and with what rights.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Leaf {
    /// Host-physical base of the page (aligned to `size`).
    pub hpa: HostPhysAddr,
    /// Page size.
    pub size: PageSize,
    /// Guest rights.
    pub access: Access,
    /// Memory type.
    pub mem_type: MemType,
    /// Accessed flag, set by hardware on any use of the translation.
    pub accessed: bool,
    /// Dirty flag, set by hardware on a write through the translation.
    pub dirty: bool,
}

/// A leaf mapping as found in a table: a [`Leaf`] at a guest-physical base.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Mapping {
    /// Guest-physical base of the page (aligned to `leaf.size`).
    pub gpa: GuestPhysAddr,
    /// The entry.
    pub leaf: Leaf,
}

/// The result of translating one guest-physical address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Translation {
    /// The host-physical address of the translated byte (page base plus
    /// offset).
    pub hpa: HostPhysAddr,
    /// The leaf that translated it.
    pub leaf: Leaf,
}
