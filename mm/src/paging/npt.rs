//! AMD NPT entries (APM Vol. 2 15.25 "Nested Paging"): ordinary long-mode
//! page-table entries (APM Vol. 2 5.3.3, Figures 5-18..5-23).
//!
//! Notes for the SVM backend that loads these tables:
//! - The nested walk uses the host's paging controls, including EFER.NXE
//!   (APM Vol. 2 15.25.5); bit 63 is reserved without it, so the host must
//!   run with EFER.NXE = 1 or every non-executable leaf faults.
//! - Memory type comes from the host PAT selected by PWT/PCD/PAT (APM Vol. 2
//!   15.25.8, 7.8). This format assumes the power-on PAT, in which index 0 is
//!   WB, 1 is WT and 3 is UC, and never sets the PAT bit.

use super::format::{ADDR_MASK_4K, EntryFormat, addr_mask};
use super::types::{Access, Leaf, MemType, PageSize};
use crate::addr::HostPhysAddr;

/// The AMD-V nested-page-table entry format.
#[derive(Debug)]
pub enum Npt {}

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
/// User/supervisor: must be set at every level, because every nested-table
/// access counts as a user access (APM Vol. 2 15.25.5).
const USER: u64 = 1 << 2;
const PWT: u64 = 1 << 3;
const PCD: u64 = 1 << 4;
const ACCESSED: u64 = 1 << 5;
/// Dirty, leaves only.
const DIRTY: u64 = 1 << 6;
/// Page size, in level-2/3 entries. (In a 4 KiB PTE bit 7 is PAT instead.)
const LARGE: u64 = 1 << 7;
const NO_EXECUTE: u64 = 1 << 63;

const _: () = {
    assert!((PRESENT | WRITABLE | USER | PWT | PCD | ACCESSED | DIRTY | LARGE | NO_EXECUTE) & ADDR_MASK_4K == 0);
    assert!(ACCESSED == 0x20 && DIRTY == 0x40 && LARGE == 0x80);
    assert!(NO_EXECUTE == 0x8000_0000_0000_0000);
};

// SAFETY: 0 has P clear, so it is not present; table entries have P and no
// PS bit and their address round-trips through `ADDR_MASK_4K`; leaves have P,
// PS exactly for 2 MiB/1 GiB, and their fields round-trip (see the unit
// tests); ACCESSED and DIRTY are bits 5 and 6, outside the address field.
unsafe impl EntryFormat for Npt {
    const NAME: &'static str = "NPT";
    const ACCESSED: u64 = ACCESSED;
    const DIRTY: u64 = DIRTY;

    /// A present long-mode entry is always readable, so every supported
    /// access includes READ; write and execute are independent (RW, NX).
    fn supports(access: Access) -> bool {
        access.contains(Access::READ)
    }

    fn is_present(raw: u64) -> bool {
        raw & PRESENT != 0
    }

    fn is_large(raw: u64) -> bool {
        raw & LARGE != 0
    }

    /// Non-leaf rights are ANDed (R/W, U/S) and ORed (NX) along the walk
    /// (APM Vol. 2 5.6), so table entries grant everything and leave the
    /// decision to the leaf. PWT/PCD stay clear: tables are WB.
    fn encode_table(table: HostPhysAddr) -> u64 {
        (table.0 & ADDR_MASK_4K) | PRESENT | WRITABLE | USER
    }

    fn decode_table(raw: u64) -> HostPhysAddr {
        HostPhysAddr(raw & ADDR_MASK_4K)
    }

    fn encode_leaf(leaf: &Leaf) -> u64 {
        let mut raw = (leaf.hpa.0 & addr_mask(leaf.size)) | PRESENT | USER;
        if leaf.access.contains(Access::WRITE) {
            raw |= WRITABLE;
        }
        if !leaf.access.contains(Access::EXECUTE) {
            raw |= NO_EXECUTE;
        }
        raw |= match leaf.mem_type {
            MemType::WriteBack => 0,           // PAT index 0
            MemType::WriteThrough => PWT,      // PAT index 1
            MemType::Uncacheable => PCD | PWT, // PAT index 3
        };
        if leaf.size != PageSize::Size4K {
            raw |= LARGE;
        }
        if leaf.accessed {
            raw |= ACCESSED;
        }
        if leaf.dirty {
            raw |= DIRTY;
        }
        raw
    }

    fn decode_leaf(raw: u64, size: PageSize) -> Leaf {
        let mut access = Access::READ;
        access.set(Access::WRITE, raw & WRITABLE != 0);
        access.set(Access::EXECUTE, raw & NO_EXECUTE == 0);
        let mem_type = match (raw & PWT != 0, raw & PCD != 0) {
            (false, false) => MemType::WriteBack,
            (true, false) => MemType::WriteThrough,
            // Index 2 is UC- in the power-on PAT; read it as UC.
            (_, true) => MemType::Uncacheable,
        };
        Leaf {
            hpa: HostPhysAddr(raw & addr_mask(size)),
            size,
            access,
            mem_type,
            accessed: raw & ACCESSED != 0,
            dirty: raw & DIRTY != 0,
        }
    }
}
