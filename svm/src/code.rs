//! The guest's instruction bytes at RIP, for CPUs without next-RIP saving
//! (NRIPS; QEMU's SVM has none): the length of the instruction that exited
//! is measured from its bytes (`fetch`). Reaching them takes a walk of the
//! guest's page tables and of the nested table; the last code page's
//! translation is cached, since a guest exits from the same page over and
//! over.

use core::cell::Cell;
use mm::hal::PhysMem;
use vcpu::state::bits::*;
use vcpu::walk::{self, Paging};

use crate::fetch::{self, Opcode};
use crate::vmcb::{Vmcb, ctl, save};

/// The most guest table entries one walk reads: four in 4-level paging
/// (three with PAE, two with 32-bit paging).
const MAX_WALK: usize = 4;

/// Accessed and dirty (bits 5 and 6 of every entry format): the CPU sets
/// them at will and they do not change where a page maps.
const ACCESSED_DIRTY: u64 = 0x60;

/// A translated code page and everything it was derived from.
#[derive(Clone, Copy, Debug)]
struct CodePage {
    cr3: u64,
    mode: u64,
    /// The linear page and the host page behind it.
    page: u64,
    host: u64,
    /// Each guest table entry the walk read, from the top, as the 8
    /// aligned-down bytes holding it (a 32-bit entry at a page's end comes
    /// with its neighbour) through the direct map, and their value: the
    /// translation holds while they hold. After changing an entry, software
    /// invalidates it with INVLPG or by reloading CR3 (APM Vol. 2 5.5);
    /// neither exits here, and both may leave CR3's value as it was, so the
    /// key alone cannot tell that the page moved.
    entries: [(*const u64, u64); MAX_WALK],
    n: usize,
}

/// Reads guest code through the direct map `M`, with a one-page cache.
pub struct CodeReader<M: PhysMem> {
    mem: M,
    page: Option<CodePage>,
    /// Measurements whose bytes could not be read or matched (the
    /// architectural length was used instead).
    fallbacks: u64,
    /// Walks of the guest's tables (cache misses).
    walks: u64,
}

/// The paging-mode bits that select how a linear address translates:
/// CR0.PG, CR4.PSE/PAE/LA57 and EFER.LMA (distinct bit positions).
#[inline(always)]
fn paging_mode(vmcb: Vmcb) -> u64 {
    const CR4_PSE: u64 = 1 << 4;
    const CR4_LA57: u64 = 1 << 12;
    (vmcb.u64(save::CR0) & CR0_PG)
        | (vmcb.u64(save::CR4) & (CR4_PSE | CR4_PAE | CR4_LA57))
        | (vmcb.u64(save::EFER) & EFER_LMA)
}

impl<M: PhysMem> CodeReader<M> {
    /// `mem` maps every frame of the nested tables and of guest RAM.
    pub fn new(mem: M) -> CodeReader<M> {
        CodeReader { mem, page: None, fallbacks: 0, walks: 0 }
    }

    /// Forgets the cached translation (the nested table or the whole guest
    /// state changed).
    pub fn invalidate(&mut self) {
        self.page = None;
    }

    /// How many measurements fell back to the architectural length.
    pub fn fallbacks(&self) -> u64 {
        self.fallbacks
    }

    /// How many times the guest's tables were walked (cache misses).
    pub fn walks(&self) -> u64 {
        self.walks
    }

    /// Host address of guest-physical `gpa` through the nested table.
    fn gpa_to_hpa(&self, vmcb: Vmcb, gpa: u64) -> Option<u64> {
        let root = vmcb.u64(ctl::N_CR3);
        walk::translate_with(Paging::long_mode(root), gpa, |pa| {
            // SAFETY: `pa` is inside a nested table frame (the walk only
            // follows addresses this hypervisor wrote into its tables).
            Some(unsafe { (self.mem.phys_to_ptr(mm::HostPhysAddr(pa)) as *const u64).read_volatile() })
        })
    }

    /// The guest table entry at host address `hpa`: 8 bytes, or 4 at a
    /// page's last 4 bytes (a 32-bit entry), never past its page.
    #[inline(always)]
    fn read_entry(&self, hpa: u64) -> u64 {
        let p = self.mem.phys_to_ptr(mm::HostPhysAddr(hpa));
        // SAFETY: `hpa` is guest RAM the nested table maps (host memory the
        // allocator handed out), translated by a walk since the last nested
        // flush, which drops the cache; the read stays inside its page. The
        // guest may change it concurrently only on other CPUs, and it is
        // read as plain bytes.
        unsafe {
            if hpa & 0xfff <= 0xff8 {
                (p as *const u64).read_unaligned()
            } else {
                (p as *const u32).read_unaligned() as u64
            }
        }
    }

    /// The linear address of RIP, and whether the code is 64-bit.
    #[inline(always)]
    fn code_address(vmcb: Vmcb) -> (u64, bool) {
        let attrs = vcpu::SegAttrs(vmcb.read::<u16>(save::CS + 2));
        let long = attrs.long() && vmcb.u64(save::EFER) & EFER_LMA != 0;
        let rip = vmcb.u64(save::RIP);
        if long { (rip, true) } else { (vmcb.u64(save::CS + 8).wrapping_add(rip) & 0xffff_ffff, false) }
    }

    /// The cached host page behind linear `page`, if the cache is for it
    /// and still true: same CR3 and paging mode, and every guest table
    /// entry of its walk unchanged but for accessed and dirty bits.
    #[inline(always)]
    fn cached(&self, vmcb: Vmcb, page: u64) -> Option<u64> {
        let c = self.page.as_ref()?;
        if c.page != page || c.cr3 != vmcb.u64(save::CR3) || c.mode != paging_mode(vmcb) {
            return None;
        }
        let mut changed = 0;
        for &(p, value) in &c.entries[..c.n] {
            // SAFETY: a guest RAM page the nested table maps, through the
            // direct map; it stays mapped until the next nested flush, which
            // drops the cache. The read stays inside the page.
            changed |= unsafe { p.read_unaligned() } ^ value;
        }
        (changed & !(ACCESSED_DIRTY | ACCESSED_DIRTY << 32) == 0).then_some(c.host)
    }

    /// Walks the guest's tables and the nested table for linear `page`;
    /// caches the result with the entries it came from.
    #[inline(never)]
    fn translate(&mut self, vmcb: Vmcb, page: u64) -> Option<u64> {
        self.walks += 1;
        self.page = None;
        let cr3 = vmcb.u64(save::CR3);
        let paging = Paging { cr0: vmcb.u64(save::CR0), cr3, cr4: vmcb.u64(save::CR4), efer: vmcb.u64(save::EFER) };
        let entries = Cell::new([(core::ptr::null::<u64>(), 0u64); MAX_WALK]);
        let n = Cell::new(0usize);
        let gpa = walk::translate_with(paging, page, |gpa| {
            let hpa = self.gpa_to_hpa(vmcb, gpa)?;
            let i = n.get();
            if i < MAX_WALK {
                let p = self.mem.phys_to_ptr(mm::HostPhysAddr(hpa.min((hpa & !0xfff) | 0xff8))) as *const u64;
                debug_assert!(p as usize & 0xfff <= 0xff8, "8 bytes inside the page");
                let mut e = entries.get();
                // SAFETY: as in `read_entry`; 8 bytes from at most 0xff8 into
                // the page.
                e[i] = (p, unsafe { p.read_unaligned() });
                entries.set(e);
            }
            n.set(i + 1);
            Some(self.read_entry(hpa))
        })?;
        let host = self.gpa_to_hpa(vmcb, gpa)? & !0xfff;
        if n.get() <= MAX_WALK {
            let mode = paging_mode(vmcb);
            self.page = Some(CodePage { cr3, mode, page, host, entries: entries.get(), n: n.get() });
        }
        Some(host)
    }

    /// The host page behind the guest's linear code page `page`.
    #[inline(always)]
    fn code_page(&mut self, vmcb: Vmcb, page: u64) -> Option<u64> {
        match self.cached(vmcb, page) {
            Some(h) => Some(h),
            None => self.translate(vmcb, page),
        }
    }

    /// Up to 15 code bytes at the guest's RIP (fewer where they cannot be
    /// read), and whether the code is 64-bit.
    pub fn read_at_rip(&mut self, vmcb: Vmcb) -> ([u8; fetch::MAX_LEN], usize, bool) {
        let (lin, long) = Self::code_address(vmcb);
        let (bytes, n) = self.code_bytes(vmcb, lin);
        (bytes, n, long)
    }

    /// Up to 15 code bytes at linear address `lin`.
    fn code_bytes(&mut self, vmcb: Vmcb, mut lin: u64) -> ([u8; fetch::MAX_LEN], usize) {
        let mut out = [0u8; fetch::MAX_LEN];
        let mut n = 0;
        while n < out.len() {
            let Some(host_page) = self.code_page(vmcb, lin & !0xfff) else { break };
            let off = (lin & 0xfff) as usize;
            let take = (4096 - off).min(out.len() - n);
            let src = self.mem.phys_to_ptr(mm::HostPhysAddr(host_page + off as u64));
            // SAFETY: `host_page` is a guest RAM page from the nested table;
            // `take` bytes from `off` stay inside it.
            unsafe { core::ptr::copy_nonoverlapping(src as *const u8, out[n..].as_mut_ptr(), take) };
            n += take;
            lin = lin.wrapping_add(take as u64);
        }
        (out, n)
    }

    /// The length of `op` at the guest's RIP; the architectural length if
    /// the bytes cannot be read or are not that instruction.
    ///
    /// Fast path: the code page is cached and the bytes are the bare opcode
    /// (what compilers emit), compared in place.
    pub fn measure(&mut self, vmcb: Vmcb, op: Opcode) -> u64 {
        let (lin, long) = Self::code_address(vmcb);
        let code = op.bytes();
        let off = lin & 0xfff;
        if off <= 4096 - 4
            && let Some(h) = self.code_page(vmcb, lin & !0xfff)
        {
            let p = self.mem.phys_to_ptr(mm::HostPhysAddr(h + off));
            // SAFETY: guest RAM from the nested table; the 4 bytes read stay
            // inside the page (checked above).
            let here = unsafe { (p as *const u32).read_unaligned() };
            let (word, mask) = op.word();
            if here & mask == word {
                return code.len() as u64;
            }
        }
        let (bytes, n) = self.code_bytes(vmcb, lin);
        if let Some(len) = fetch::instruction_length(&bytes[..n], op, long) {
            return len as u64;
        }
        self.fallbacks += 1;
        code.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mm::hal::FrameAlloc;
    use mm::paging::{Access, MemType, NestedPageTable, Npt, PageSize};
    use mm::sim::SimPhys;
    use mm::{GuestPhysAddr, HostPhysAddr};
    use vcpu::{GuestState, SegAttrs, Segment};

    /// The direct map of a `SimPhys` the test keeps owning.
    struct View<'a>(&'a SimPhys);

    // SAFETY: forwards to `SimPhys`, which upholds the contract.
    unsafe impl PhysMem for View<'_> {
        fn phys_to_ptr(&self, pa: HostPhysAddr) -> *mut u8 {
            self.0.phys_to_ptr(pa)
        }
    }

    /// Guest-physical layout: 4-level tables at 0x1000 (PML4), 0x2000
    /// (PDPT), 0x3000 (PD), 0x4000 and 0x5000 (PTs); code pages from 0x10000.
    const PAGES: u64 = 32;
    const CODE_LIN: u64 = 0x18000;
    const PTE: u64 = 0x4000 + (CODE_LIN >> 12) * 8;
    const RW: u64 = 3; // present, writable

    /// Guest RAM behind a nested table, each guest page its own host frame
    /// (the nested table is where host and guest frames differ), and a VMCB
    /// with 64-bit paging on.
    struct Guest {
        phys: SimPhys,
        frames: Vec<HostPhysAddr>,
        vmcb_frame: HostPhysAddr,
        npt: Option<NestedPageTable<Npt>>,
    }

    impl Drop for Guest {
        fn drop(&mut self) {
            if let Some(npt) = self.npt.take() {
                npt.destroy().flush(&mut self.phys, |_| {});
            }
        }
    }

    impl Guest {
        fn new() -> Guest {
            let mut phys = SimPhys::new(128);
            let mut npt = NestedPageTable::<Npt>::new(&mut phys).unwrap();
            let mut frames = Vec::new();
            for i in 0..PAGES {
                // Out of order, so guest-physical and host-physical differ.
                let _skip = phys.alloc_frame().unwrap();
                let f = phys.alloc_frame().unwrap();
                npt.map(&mut phys, GuestPhysAddr(i * 4096), f, PageSize::Size4K, Access::RWX, MemType::WriteBack)
                    .unwrap()
                    .flush(&mut phys, |_| {});
                frames.push(f);
            }
            let vmcb_frame = phys.alloc_frame().unwrap();
            let root = npt.root();
            let g = Guest { phys, frames, vmcb_frame, npt: Some(npt) };
            g.entry(0x1000, 0x2000 | RW);
            g.entry(0x2000, 0x3000 | RW);
            g.entry(0x3000, 0x4000 | RW);
            let mut s = GuestState {
                cr0: CR0_PE | CR0_PG | CR0_ET | CR0_NE,
                cr3: 0x1000,
                cr4: CR4_PAE,
                efer: EFER_LME | EFER_LMA,
                cs: Segment { selector: 8, base: 0, limit: 0xffff_ffff, attrs: SegAttrs::CODE64 },
                ..Default::default()
            };
            s.rip = CODE_LIN + 0x100;
            let mut v = g.vmcb();
            v.load_state(&s);
            v.set_u64(ctl::N_CR3, root.0);
            g
        }

        fn vmcb(&self) -> Vmcb {
            // SAFETY: a frame of `phys`, zeroed, 4 KiB-aligned, alive as long
            // as `self`.
            unsafe { Vmcb::new(self.phys.phys_to_ptr(self.vmcb_frame)) }
        }

        fn write(&self, gpa: u64, bytes: &[u8]) {
            let hpa = HostPhysAddr(self.frames[(gpa / 4096) as usize].0 + gpa % 4096);
            // SAFETY: inside one frame of `phys` the test owns; nothing holds
            // a reference to it.
            unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), self.phys.phys_to_ptr(hpa), bytes.len()) }
        }

        /// A guest page-table entry, as the guest's own MOV would write it.
        fn entry(&self, gpa: u64, value: u64) {
            self.write(gpa, &value.to_le_bytes());
        }
    }

    const CPUID_BARE: [u8; 2] = [0x0f, 0xa2];
    const CPUID_66: [u8; 3] = [0x66, 0x0f, 0xa2];

    #[test]
    fn measures_through_guest_and_nested_tables() {
        let g = Guest::new();
        g.entry(PTE, 0x10000 | RW);
        g.write(0x10100, &CPUID_66);
        let mut r = CodeReader::new(View(&g.phys));
        assert_eq!(r.measure(g.vmcb(), Opcode::Cpuid), 3);
        g.write(0x10100, &CPUID_BARE);
        assert_eq!(r.measure(g.vmcb(), Opcode::Cpuid), 2, "cached page, bytes read afresh");
        for _ in 0..100 {
            assert_eq!(r.measure(g.vmcb(), Opcode::Cpuid), 2);
        }
        assert_eq!((r.walks(), r.fallbacks()), (1, 0), "one walk, then the cache");
        r.invalidate();
        assert_eq!(r.measure(g.vmcb(), Opcode::Cpuid), 2);
        assert_eq!(r.walks(), 2);
    }

    /// The guest remaps its code page (new PTE, then INVLPG, which does not
    /// exit) and keeps CR3: the cached translation must not be used.
    #[test]
    fn a_remapped_code_page_is_not_read_through_the_stale_translation() {
        let g = Guest::new();
        g.entry(PTE, 0x10000 | RW);
        g.write(0x10100, &CPUID_BARE);
        g.write(0x11100, &CPUID_66);
        let mut r = CodeReader::new(View(&g.phys));
        assert_eq!(r.measure(g.vmcb(), Opcode::Cpuid), 2);
        g.entry(PTE, 0x11000 | RW);
        assert_eq!(r.measure(g.vmcb(), Opcode::Cpuid), 3, "66 0f a2 on the page the PTE now maps");
        g.entry(PTE, 0x10000 | RW);
        assert_eq!(r.measure(g.vmcb(), Opcode::Cpuid), 2, "and back");
        assert_eq!((r.walks(), r.fallbacks()), (3, 0));
    }

    /// The same through a higher level: the PDE now points at another page
    /// table.
    #[test]
    fn a_changed_upper_level_entry_is_seen_too() {
        let g = Guest::new();
        g.entry(PTE, 0x10000 | RW);
        g.entry(0x5000 + (CODE_LIN >> 12) * 8, 0x11000 | RW);
        g.write(0x10100, &CPUID_BARE);
        g.write(0x11100, &CPUID_66);
        let mut r = CodeReader::new(View(&g.phys));
        assert_eq!(r.measure(g.vmcb(), Opcode::Cpuid), 2);
        g.entry(0x3000, 0x5000 | RW);
        assert_eq!(r.measure(g.vmcb(), Opcode::Cpuid), 3);
    }

    /// Accessed and dirty bits the CPU sets in the entries do not change the
    /// translation; the cache survives them and still answers right.
    #[test]
    fn accessed_and_dirty_bits_do_not_matter() {
        let g = Guest::new();
        g.entry(PTE, 0x10000 | RW);
        g.write(0x10100, &CPUID_BARE);
        let mut r = CodeReader::new(View(&g.phys));
        assert_eq!(r.measure(g.vmcb(), Opcode::Cpuid), 2);
        g.entry(PTE, 0x10000 | RW | 0x60);
        g.entry(0x3000, 0x4000 | RW | 0x20);
        assert_eq!(r.measure(g.vmcb(), Opcode::Cpuid), 2);
        assert_eq!(r.walks(), 1, "still the cached walk");
        g.entry(PTE, 0x10000 | RW | 0x60 | (1 << 63));
        assert_eq!(r.measure(g.vmcb(), Opcode::Cpuid), 2);
        assert_eq!(r.walks(), 2, "any other bit (here NX) is a change");
    }

    /// Paging switched off with CR3 unchanged: the linear page is now the
    /// physical one.
    #[test]
    fn a_paging_mode_change_with_the_same_cr3_is_seen() {
        let g = Guest::new();
        g.entry(PTE, 0x10000 | RW);
        g.write(0x10100, &CPUID_BARE);
        g.write(CODE_LIN + 0x100, &CPUID_66); // now guest-physical too
        let mut r = CodeReader::new(View(&g.phys));
        assert_eq!(r.measure(g.vmcb(), Opcode::Cpuid), 2);
        let mut v = g.vmcb();
        v.set_u64(save::CR0, CR0_PE | CR0_ET | CR0_NE);
        v.set_u64(save::EFER, EFER_LME | EFER_SVME);
        v.write(save::CS + 2, SegAttrs::CODE32.0);
        assert_eq!(r.measure(g.vmcb(), Opcode::Cpuid), 3);
    }

    /// 32-bit paging (4-byte entries, two levels), remapped the same way.
    #[test]
    fn a_remapped_page_under_32_bit_paging() {
        let g = Guest::new();
        let put32 = |gpa: u64, v: u32| g.write(gpa, &v.to_le_bytes());
        put32(0x6000, 0x7000 | RW as u32); // PDE 0 -> PT
        put32(0x7000 + (CODE_LIN >> 12) * 4, 0x10000 | RW as u32);
        put32(0x7000 + 0xffc, 0x12000 | RW as u32); // last entry: read as 4 bytes
        g.write(0x10100, &CPUID_BARE);
        g.write(0x11100, &CPUID_66);
        let mut v = g.vmcb();
        v.set_u64(save::CR0, CR0_PE | CR0_PG | CR0_ET | CR0_NE);
        v.set_u64(save::CR3, 0x6000);
        v.set_u64(save::CR4, 0);
        v.set_u64(save::EFER, EFER_SVME);
        v.write(save::CS + 2, SegAttrs::CODE32.0);
        let mut r = CodeReader::new(View(&g.phys));
        assert_eq!(r.measure(g.vmcb(), Opcode::Cpuid), 2);
        put32(0x7000 + (CODE_LIN >> 12) * 4, 0x11000 | RW as u32);
        assert_eq!(r.measure(g.vmcb(), Opcode::Cpuid), 3);
        v.set_u64(save::RIP, 0x3ff100); // PT's last entry, at the table page's end
        g.write(0x12100, &CPUID_66);
        assert_eq!(r.measure(g.vmcb(), Opcode::Cpuid), 3);
        put32(0x7000 + 0xffc, 0x10000 | RW as u32);
        assert_eq!(r.measure(g.vmcb(), Opcode::Cpuid), 2);
        assert_eq!((r.walks(), r.fallbacks()), (4, 0));
    }
}
