//! Raw entry bits against values worked out by hand from the manuals, and
//! encode/decode round trips.

use crate::addr::HostPhysAddr;
use crate::paging::{Access, EntryFormat, Ept, Leaf, MemType, Npt, PageSize};

fn leaf(hpa: u64, size: PageSize, access: Access, mem_type: MemType, ad: (bool, bool)) -> Leaf {
    Leaf { hpa: HostPhysAddr(hpa), size, access, mem_type, accessed: ad.0, dirty: ad.1 }
}

/// SDM Vol. 3C Tables 29-2/29-4/29-6: R=0 W=1 X=2, type 5:3 (UC=0 WT=4
/// WB=6), large=7, A=8, D=9, address 51:12.
#[test]
fn ept_raw_bits() {
    use PageSize::*;
    let no = (false, false);
    // 4 KiB RWX WB: 0b111 | 6 << 3 = 0x37; bit 7 stays clear in a PTE.
    assert_eq!(Ept::encode_leaf(&leaf(0x1234_5000, Size4K, Access::RWX, MemType::WriteBack, no)), 0x1234_5037);
    // 2 MiB R-X UC: 0b101 | 0 << 3 | large 0x80.
    assert_eq!(Ept::encode_leaf(&leaf(0x4020_0000, Size2M, Access::RX, MemType::Uncacheable, no)), 0x4020_0085);
    // 1 GiB RW- WB, accessed and dirty: 0b011 | 0x30 | 0x80 | 0x100 | 0x200.
    let ad = (true, true);
    assert_eq!(Ept::encode_leaf(&leaf(0x4000_0000, Size1G, Access::RW, MemType::WriteBack, ad)), 0x4000_03B3);
    // 4 KiB RW- WT: 0b011 | 4 << 3.
    assert_eq!(Ept::encode_leaf(&leaf(0x1000, Size4K, Access::RW, MemType::WriteThrough, no)), 0x1023);
    // Table entry: RWX, nothing in bits 7:3 (reserved in non-leaf entries).
    assert_eq!(Ept::encode_table(HostPhysAddr(0x0008_7654_3000)), 0x0008_7654_3007);
    // Highest address bit (51).
    let top = 1 << 51;
    assert_eq!(Ept::encode_table(HostPhysAddr(top)), top | 7);
}

/// APM Vol. 2 Figures 5-18..5-23: P=0 RW=1 US=2 PWT=3 PCD=4 A=5 D=6 PS=7
/// NX=63; US set everywhere (15.25.5); WB = PAT index 0, WT = 1 (PWT),
/// UC = 3 (PWT|PCD) with the power-on PAT.
#[test]
fn npt_raw_bits() {
    use PageSize::*;
    let no = (false, false);
    // 4 KiB RW- WB: P|RW|US, NX.
    assert_eq!(Npt::encode_leaf(&leaf(0x1234_5000, Size4K, Access::RW, MemType::WriteBack, no)), 0x8000_0000_1234_5007);
    // 2 MiB R-X UC: P|US | PWT|PCD | PS, no NX.
    assert_eq!(Npt::encode_leaf(&leaf(0x4020_0000, Size2M, Access::RX, MemType::Uncacheable, no)), 0x4020_009D);
    // 1 GiB RWX WB with A and D: P|RW|US | A | D | PS.
    let ad = (true, true);
    assert_eq!(Npt::encode_leaf(&leaf(0x4000_0000, Size1G, Access::RWX, MemType::WriteBack, ad)), 0x4000_00E7);
    // 4 KiB R-- WT: P|US|PWT, NX.
    assert_eq!(Npt::encode_leaf(&leaf(0x1000, Size4K, Access::R, MemType::WriteThrough, no)), 0x8000_0000_0000_100D);
    // Table entry: P|RW|US, no NX, WB.
    assert_eq!(Npt::encode_table(HostPhysAddr(0x0008_7654_3000)), 0x0008_7654_3007);
}

#[test]
fn presence_and_large_bit() {
    assert!(!Ept::is_present(0));
    assert!(!Npt::is_present(0));
    // Any of R/W/X makes an EPT entry present (SDM Vol. 3C 29.3.2) ...
    assert!(Ept::is_present(0b100));
    // ... while NPT only looks at P: other bits alone are not present.
    assert!(!Npt::is_present(0x8000_0000_0000_1006));
    assert!(Ept::is_large(0x80) && Npt::is_large(0x80));
    // Hardware setting the accessed bit of a table entry does not move it.
    let t = HostPhysAddr(0x1234_5000);
    assert_eq!(Ept::decode_table(Ept::encode_table(t) | Ept::ACCESSED), t);
    assert_eq!(Npt::decode_table(Npt::encode_table(t) | Npt::ACCESSED), t);
}

fn supported_rights<F: EntryFormat>() {
    let all = (0..8u8).map(Access::from_bits_truncate);
    let ok: alloc::vec::Vec<Access> = all.filter(|&a| F::supports(a)).collect();
    assert_eq!(ok, [Access::R, Access::RW, Access::RX, Access::RWX], "{}", F::NAME);
}

fn round_trip<F: EntryFormat>() {
    let types = [MemType::WriteBack, MemType::WriteThrough, MemType::Uncacheable];
    for size in PageSize::LARGEST_FIRST {
        for hpa in [0, size.bytes() * 7, (1u64 << 52) - size.bytes()] {
            for access in [Access::R, Access::RW, Access::RX, Access::RWX] {
                for mem_type in types {
                    for ad in [(false, false), (true, false), (false, true), (true, true)] {
                        let l = leaf(hpa, size, access, mem_type, ad);
                        let raw = F::encode_leaf(&l);
                        assert!(F::is_present(raw));
                        assert_eq!(F::is_large(raw), size != PageSize::Size4K, "{l:?}");
                        assert_eq!(F::decode_leaf(raw, size), l);
                        assert_eq!(raw & F::ACCESSED != 0, ad.0);
                        assert_eq!(raw & F::DIRTY != 0, ad.1);
                    }
                }
            }
        }
    }
}

super::for_both_formats!(supported_rights, round_trip);
