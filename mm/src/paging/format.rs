//! The one thing a vendor supplies to the paging engine: the entry bits.

use super::types::{Access, Leaf};
use crate::addr::HostPhysAddr;

/// Encoding and decoding of 64-bit nested-paging entries.
///
/// The engine ([`NestedPageTable`](super::NestedPageTable)) owns the tree
/// shape (4 levels, 512 entries per table, 4 KiB / 2 MiB / 1 GiB leaves) and
/// only asks the format how to spell an entry. Level numbering: 4 = the root
/// (PML4), 1 = page tables.
///
/// # Safety
///
/// The engine dereferences the table addresses it decodes, so an impl must be
/// consistent:
/// - `0` is not present;
/// - `encode_table(t)` is present, not large, and `decode_table` returns `t`
///   for every 4 KiB-aligned `t` below 2^52;
/// - `encode_leaf(l)` is present, is large exactly when `l.size` is not
///   4 KiB, and `decode_leaf(encode_leaf(l), l.size) == l` for every `l` with
///   an aligned address below 2^52 and an access `supports` accepts;
/// - `ACCESSED` and `DIRTY` are single bits outside the address field, and
///   clearing them in a leaf changes only the decoded `accessed`/`dirty`.
pub unsafe trait EntryFormat {
    /// Name for messages, e.g. "EPT".
    const NAME: &'static str;
    /// Accessed flag (leaves; hardware also sets it in table entries).
    const ACCESSED: u64;
    /// Dirty flag (leaves only).
    const DIRTY: u64;

    /// Whether a leaf can grant exactly `access` (the empty set never: an
    /// entry without rights is "not present", which is `unmap`).
    fn supports(access: Access) -> bool;

    /// Whether the hardware walker treats the entry as present.
    fn is_present(raw: u64) -> bool;

    /// For a present level-2 or level-3 entry: whether it is a leaf (a 2 MiB
    /// or 1 GiB page) rather than a pointer to the next table.
    fn is_large(raw: u64) -> bool;

    /// An entry pointing at the next-level table `table`, granting all rights
    /// so that the leaf alone decides access.
    fn encode_table(table: HostPhysAddr) -> u64;

    /// The table address of an entry made by `encode_table` (hardware may
    /// have set the accessed bit since).
    fn decode_table(raw: u64) -> HostPhysAddr;

    /// A leaf entry. Callers guarantee `supports(leaf.access)` and that
    /// `leaf.hpa` is aligned to `leaf.size` and below 2^52.
    fn encode_leaf(leaf: &Leaf) -> u64;

    /// Decode a present leaf entry of the given size.
    fn decode_leaf(raw: u64, size: super::PageSize) -> Leaf;
}

/// Address bits 51:12 of any 4-level x86 paging entry (SDM Vol. 3C Tables
/// 29-1..29-6, APM Vol. 2 Figures 5-18..5-23).
pub(super) const ADDR_MASK_4K: u64 = 0x000F_FFFF_FFFF_F000;

/// The address field of a leaf of `size`: bits 51:12, 51:21 or 51:30. For
/// large NPT leaves this also drops the PAT bit (bit 12).
pub(super) const fn addr_mask(size: super::PageSize) -> u64 {
    ADDR_MASK_4K & !(size.bytes() - 1)
}

const _: () = {
    assert!(addr_mask(super::PageSize::Size2M) == 0x000F_FFFF_FFE0_0000);
    assert!(addr_mask(super::PageSize::Size1G) == 0x000F_FFFF_C000_0000);
};
