//! Intel EPT entries (SDM Vol. 3C 29.3.2 "EPT Translation Mechanism",
//! Tables 29-1..29-6).
//!
//! Notes for the VMX backend that loads these tables:
//! - Accessed/dirty bits are only maintained when EPTP bit 6 is set
//!   (SDM Vol. 3C 29.3.5); otherwise they stay zero and harvesting finds
//!   nothing.
//! - The ignore-PAT bit (6) is left clear, so the guest's PAT still refines
//!   the memory type as it would on bare metal (SDM Vol. 3C 29.3.7.2), the
//!   same behaviour NPT has.

use super::format::{ADDR_MASK_4K, EntryFormat, addr_mask};
use super::types::{Access, Leaf, MemType, PageSize};
use crate::addr::HostPhysAddr;

/// The Intel VT-x extended-page-table entry format.
#[derive(Debug)]
pub enum Ept {}

const READ: u64 = 1 << 0;
const WRITE: u64 = 1 << 1;
/// Execute (supervisor-mode execute when mode-based execute control is on;
/// this crate does not use that control).
const EXECUTE: u64 = 1 << 2;
const RWX: u64 = READ | WRITE | EXECUTE;
/// Leaf memory type, bits 5:3.
const MEMTYPE_SHIFT: u32 = 3;
const MEMTYPE_MASK: u64 = 0b111 << MEMTYPE_SHIFT;
/// Ignore PAT (leaves only); never set, see the module comment.
const IGNORE_PAT: u64 = 1 << 6;
/// Bit 7 in a level-2/3 entry: maps a page instead of a table.
const LARGE: u64 = 1 << 7;
const ACCESSED: u64 = 1 << 8;
/// Dirty, leaves only.
const DIRTY: u64 = 1 << 9;

/// EPT memory-type encodings (the MTRR/PAT encodings, SDM Vol. 3A Table 11-2
/// and Vol. 3C 29.3.7).
const MT_UC: u64 = 0;
const MT_WT: u64 = 4;
const MT_WB: u64 = 6;

const _: () = {
    // Flags, memory type, and the address field must not overlap.
    assert!((RWX | MEMTYPE_MASK | IGNORE_PAT | LARGE | ACCESSED | DIRTY) & ADDR_MASK_4K == 0);
    assert!(RWX & MEMTYPE_MASK == 0);
    assert!(MEMTYPE_MASK == 0x38);
    assert!(ACCESSED == 0x100 && DIRTY == 0x200 && LARGE == 0x80);
};

// SAFETY: 0 has no R/W/X bit, so it is not present; table entries carry RWX
// and no LARGE bit, and their address round-trips through `ADDR_MASK_4K`;
// leaves carry R (every supported access includes READ), LARGE exactly for
// 2 MiB/1 GiB, and their fields round-trip (see the unit tests); ACCESSED and
// DIRTY are bits 8 and 9, outside the address field.
unsafe impl EntryFormat for Ept {
    const NAME: &'static str = "EPT";
    const ACCESSED: u64 = ACCESSED;
    const DIRTY: u64 = DIRTY;

    /// Write without read is an EPT misconfiguration (SDM Vol. 3C 29.3.3.1).
    /// Execute-only is valid only on CPUs that report it in
    /// IA32_VMX_EPT_VPID_CAP bit 0, so this format refuses it rather than
    /// produce tables that misconfigure elsewhere; every supported access
    /// therefore includes READ.
    fn supports(access: Access) -> bool {
        access.contains(Access::READ)
    }

    /// An EPT entry is present when any of bits 2:0 is set (SDM Vol. 3C
    /// 29.3.2).
    fn is_present(raw: u64) -> bool {
        raw & RWX != 0
    }

    fn is_large(raw: u64) -> bool {
        raw & LARGE != 0
    }

    /// Tables 29-1, 29-3, 29-5: bits 7:3 of a table entry are reserved, so
    /// only RWX and the address are set.
    fn encode_table(table: HostPhysAddr) -> u64 {
        (table.0 & ADDR_MASK_4K) | RWX
    }

    fn decode_table(raw: u64) -> HostPhysAddr {
        HostPhysAddr(raw & ADDR_MASK_4K)
    }

    /// Tables 29-2, 29-4, 29-6.
    fn encode_leaf(leaf: &Leaf) -> u64 {
        let mut raw = leaf.hpa.0 & addr_mask(leaf.size);
        if leaf.access.contains(Access::READ) {
            raw |= READ;
        }
        if leaf.access.contains(Access::WRITE) {
            raw |= WRITE;
        }
        if leaf.access.contains(Access::EXECUTE) {
            raw |= EXECUTE;
        }
        let mt = match leaf.mem_type {
            MemType::Uncacheable => MT_UC,
            MemType::WriteThrough => MT_WT,
            MemType::WriteBack => MT_WB,
        };
        raw |= mt << MEMTYPE_SHIFT;
        // Bit 7 is "ignored" in a 4 KiB PTE (Table 29-6): leave it clear.
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
        let mut access = Access::empty();
        access.set(Access::READ, raw & READ != 0);
        access.set(Access::WRITE, raw & WRITE != 0);
        access.set(Access::EXECUTE, raw & EXECUTE != 0);
        let mem_type = match (raw & MEMTYPE_MASK) >> MEMTYPE_SHIFT {
            MT_WB => MemType::WriteBack,
            MT_WT => MemType::WriteThrough,
            // This crate writes only UC, WT and WB; read anything else
            // (WC, WP, reserved) as the most conservative type.
            _ => MemType::Uncacheable,
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
