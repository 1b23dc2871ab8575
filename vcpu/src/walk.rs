//! Guest-virtual to guest-physical translation by walking the guest's own
//! page tables (SDM Vol. 3A 4.3-4.5), for reports (instruction bytes at a
//! faulting RIP) and, later, instruction emulation. Reads go through a
//! caller-supplied function so a missing or hostile table only yields `None`.

use crate::GuestState;
use crate::state::bits::*;

const P: u64 = 1;
const PS: u64 = 1 << 7;
const ADDR: u64 = 0x000f_ffff_ffff_f000;

/// The registers that select and root the guest's paging mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Paging {
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
}

impl Paging {
    pub fn of(s: &GuestState) -> Paging {
        Paging { cr0: s.cr0, cr3: s.cr3, cr4: s.cr4, efer: s.efer }
    }

    /// 4-level long-mode paging rooted at `root`: also the layout of AMD's
    /// nested page tables (APM Vol. 2 15.25.5).
    pub fn long_mode(root: u64) -> Paging {
        Paging { cr0: CR0_PE | CR0_PG, cr3: root, cr4: CR4_PAE, efer: EFER_LME | EFER_LMA }
    }
}

/// The guest-physical address of `gva`, or `None` if it is not mapped.
/// `read64` reads 8 bytes of guest-physical memory.
pub fn translate(s: &GuestState, gva: u64, read64: impl Fn(u64) -> Option<u64>) -> Option<u64> {
    translate_with(Paging::of(s), gva, read64)
}

/// [`translate`] from the paging registers alone.
pub fn translate_with(s: Paging, gva: u64, read64: impl Fn(u64) -> Option<u64>) -> Option<u64> {
    if s.cr0 & CR0_PG == 0 {
        return Some(gva & 0xffff_ffff);
    }
    if s.efer & EFER_LMA != 0 {
        // 4-level paging: PML4 (39), PDPT (30, 1 GiB pages), PD (21, 2 MiB).
        let mut table = s.cr3 & ADDR;
        for (level, shift) in [(4, 39), (3, 30), (2, 21), (1, 12)] {
            let e = read64(table + ((gva >> shift) & 0x1ff) * 8)?;
            if e & P == 0 {
                return None;
            }
            if (level == 3 || level == 2) && e & PS != 0 {
                let mask = (1u64 << shift) - 1;
                return Some((e & ADDR & !mask) | (gva & mask));
            }
            table = e & ADDR;
        }
        return Some(table | (gva & 0xfff));
    }
    if s.cr4 & CR4_PAE != 0 {
        // PAE: 4 PDPTEs at CR3 (32-byte aligned), then PD and PT.
        let gva = gva & 0xffff_ffff;
        let pdpte = read64((s.cr3 & 0xffff_ffe0) + (gva >> 30) * 8)?;
        if pdpte & P == 0 {
            return None;
        }
        let pde = read64((pdpte & ADDR) + ((gva >> 21) & 0x1ff) * 8)?;
        if pde & P == 0 {
            return None;
        }
        if pde & PS != 0 {
            return Some((pde & ADDR & !0x1f_ffff) | (gva & 0x1f_ffff));
        }
        let pte = read64((pde & ADDR) + ((gva >> 12) & 0x1ff) * 8)?;
        return (pte & P != 0).then_some((pte & ADDR) | (gva & 0xfff));
    }
    // 32-bit paging with 4 KiB pages and (CR4.PSE) 4 MiB pages.
    let gva = gva & 0xffff_ffff;
    let read32 = |a: u64| read64(a).map(|v| v & 0xffff_ffff);
    let pde = read32((s.cr3 & 0xffff_f000) + (gva >> 22) * 4)?;
    if pde & P == 0 {
        return None;
    }
    if pde & PS != 0 && s.cr4 & (1 << 4) != 0 {
        return Some((pde & 0xffc0_0000) | (gva & 0x3f_ffff));
    }
    let pte = read32((pde & 0xffff_f000) + ((gva >> 12) & 0x3ff) * 4)?;
    (pte & P != 0).then_some((pte & 0xffff_f000) | (gva & 0xfff))
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;
    use alloc::vec::Vec;

    fn reader(mem: &[u8]) -> impl Fn(u64) -> Option<u64> + '_ {
        move |a| {
            let a = a as usize;
            mem.get(a..a + 8).map(|b| u64::from_le_bytes(b.try_into().unwrap()))
        }
    }

    fn put(mem: &mut [u8], at: u64, v: u64) {
        mem[at as usize..at as usize + 8].copy_from_slice(&v.to_le_bytes());
    }

    #[test]
    fn long_mode_walk_through_4k_2m_and_1g_pages() {
        let mut mem: Vec<u8> = vec![0; 0x10_0000];
        put(&mut mem, 0x1000, 0x2000 | 3); // PML4[0]
        put(&mut mem, 0x2000, 0x3000 | 3); // PDPT[0] -> PD
        put(&mut mem, 0x2008, 0x4000_0000 | 0x83); // PDPT[1]: 1 GiB page
        put(&mut mem, 0x3000, 0x4000 | 3); // PD[0] -> PT
        put(&mut mem, 0x3008, 0x60_0000 | 0x83); // PD[1]: 2 MiB page
        put(&mut mem, 0x4000 + 5 * 8, 0x9000 | 3); // PT[5]
        let s = GuestState {
            cr0: CR0_PE | CR0_PG,
            cr4: CR4_PAE,
            efer: EFER_LME | EFER_LMA,
            cr3: 0x1000,
            ..Default::default()
        };
        assert_eq!(translate(&s, 0x5123, reader(&mem)), Some(0x9123));
        assert_eq!(translate(&s, 0x20_0042, reader(&mem)), Some(0x60_0042));
        assert_eq!(translate(&s, 0x4000_1234, reader(&mem)), Some(0x4000_1234));
        assert_eq!(translate(&s, 0x6000, reader(&mem)), None, "not-present PTE");
        assert_eq!(translate(&s, 0x80_0000_0000, reader(&mem)), None, "not-present PML4E");
    }

    #[test]
    fn hostile_tables_pointing_outside_memory_give_none() {
        let mut mem: Vec<u8> = vec![0; 0x3000];
        put(&mut mem, 0x1000, 0xdead_b000_0000 | 3);
        let s = GuestState { cr0: CR0_PE | CR0_PG, cr4: CR4_PAE, efer: EFER_LMA, cr3: 0x1000, ..Default::default() };
        assert_eq!(translate(&s, 0x1000, reader(&mem)), None);
    }

    #[test]
    fn no_paging_and_32_bit_paging() {
        let s = GuestState { cr0: CR0_PE, ..Default::default() };
        assert_eq!(translate(&s, 0x1234_5678, |_| None), Some(0x1234_5678));
        let mut mem: Vec<u8> = vec![0; 0x10_0000];
        let put32 = |mem: &mut [u8], at: usize, v: u32| mem[at..at + 4].copy_from_slice(&v.to_le_bytes());
        put32(&mut mem, 0x1000 + 4, 0x0040_0000 | 0x83); // PDE[1]: 4 MiB page
        put32(&mut mem, 0x1000, 0x2000 | 3); // PDE[0] -> PT
        put32(&mut mem, 0x2000 + 8, 0x7000 | 3); // PTE[2]
        let s = GuestState { cr0: CR0_PE | CR0_PG, cr4: 1 << 4, cr3: 0x1000, ..Default::default() };
        assert_eq!(translate(&s, 0x0040_1234, reader(&mem)), Some(0x0040_1234));
        assert_eq!(translate(&s, 0x2abc, reader(&mem)), Some(0x7abc));
    }
}
