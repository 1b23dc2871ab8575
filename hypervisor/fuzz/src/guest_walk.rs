//! The guest page-table walker (`vcpu::walk`) over fuzzed guest memory and
//! fuzzed CR0/CR3/CR4/EFER. The tables are the guest's: any value may be in
//! them. The hypervisor walks them for reports (code bytes at a faulting
//! RIP) and the AMD backend for instruction lengths; the AMD backend also
//! walks its own nested tables with it.
//!
//! Checks, from the SDM's definitions rather than the walker's code:
//! - no paging: the address itself (32 bits), nothing read;
//! - at most 4 (4-level), 3 (PAE) or 2 (32-bit) reads, each inside the
//!   table page the level above named (PDPTEs: the 32-byte block at CR3),
//!   8-byte reads never crossing a page, 4-byte-aligned 32-bit entries
//!   whose upper halves are ignored (the AMD backend reads 4 bytes at a
//!   page's end);
//! - a failed read ends the walk at once with no translation;
//! - a result keeps the page offset and fits the mode's physical width;
//! - every address in the same page (4 KiB, or the large page the walk
//!   ended on) translates the same way through the same reads;
//! - 32-bit modes ignore the upper half of the address;
//! - nested tables built by `mm` (NPT format) translate as `mm` says.
//!
//! Input: a mode byte (bit 0 paging, 1 PAE, 2 long mode, 3 PSE, 4: take
//! CR0/CR4/EFER whole from the next 24 bytes instead), CR3 (`u64`), the
//! readable limit in pages (`u16`, 0: everything), four addresses (`u64`),
//! a byte for the nested-table part, then up to 32 KiB of guest memory,
//! mirrored over the whole address space so that any entry leads somewhere.

use std::cell::RefCell;

use mm::hal::PhysMem;
use mm::paging::{Access, MemType, NestedPageTable, Npt, PageSize};
use mm::sim::SimPhys;
use mm::{GuestPhysAddr, HostPhysAddr};
use vcpu::GuestState;
use vcpu::state::bits::{CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME};
use vcpu::walk::{Paging, translate, translate_with};

use crate::input::Input;

const MEM_PAGES: usize = 8;
const ADDR: u64 = 0x000f_ffff_ffff_f000;
const CR4_PSE: u64 = 1 << 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Flat,
    Bits32,
    Pae,
    Long,
}

impl Mode {
    /// SDM Vol. 3A 4.1.1: which paging mode the registers select.
    fn of(p: &Paging) -> Mode {
        if p.cr0 & CR0_PG == 0 {
            Mode::Flat
        } else if p.efer & EFER_LMA != 0 {
            Mode::Long
        } else if p.cr4 & CR4_PAE != 0 {
            Mode::Pae
        } else {
            Mode::Bits32
        }
    }
}

struct Memory<'a> {
    bytes: &'a [u8],
    /// Reads at or above this fail.
    limit: u64,
    /// XORed into the upper half of every value read.
    upper_noise: u64,
    /// The read (counting from 0) that fails, if any.
    fail_at: Option<usize>,
    reads: RefCell<Vec<u64>>,
}

impl Memory<'_> {
    fn byte(&self, a: u64) -> u8 {
        let page = (a >> 12) as usize % MEM_PAGES;
        let i = page * 4096 + (a & 0xfff) as usize;
        self.bytes.get(i).copied().unwrap_or(0)
    }

    fn read64(&self, a: u64) -> Option<u64> {
        let n = {
            let mut reads = self.reads.borrow_mut();
            reads.push(a);
            reads.len() - 1
        };
        if a >= self.limit || self.fail_at == Some(n) {
            return None;
        }
        let v = (0..8).fold(0u64, |v, i| v | u64::from(self.byte(a.wrapping_add(i))) << (8 * i));
        Some(v ^ self.upper_noise << 32)
    }

    /// Translates `gva`; the result and the addresses read.
    fn walk(&self, p: Paging, gva: u64) -> (Option<u64>, Vec<u64>) {
        self.reads.borrow_mut().clear();
        let r = translate_with(p, gva, |a| self.read64(a));
        (r, self.reads.borrow().clone())
    }
}

pub fn guest_walk(data: &[u8]) {
    let mut input = Input::new(data);
    let mode = input.u8();
    let mut p = Paging {
        cr0: CR0_PE | if mode & 1 != 0 { CR0_PG } else { 0 },
        cr3: input.u64(),
        cr4: if mode & 2 != 0 { CR4_PAE } else { 0 } | if mode & 8 != 0 { CR4_PSE } else { 0 },
        efer: if mode & 4 != 0 { EFER_LME | EFER_LMA } else { 0 },
    };
    if mode & 16 != 0 {
        (p.cr0, p.cr4, p.efer) = (input.u64(), input.u64(), input.u64());
    }
    let limit = match input.u16() {
        0 => u64::MAX,
        pages => u64::from(pages) << 12,
    };
    let gvas = [input.u64(), input.u64(), input.u64(), input.u64()];
    let nested = input.u8();
    let bytes = input.bytes(MEM_PAGES * 4096);
    let mem = Memory { bytes, limit, upper_noise: 0, fail_at: None, reads: RefCell::new(Vec::new()) };
    for (i, &gva) in gvas.iter().enumerate() {
        check_walk(&mem, p, gva, gvas[(i + 1) % gvas.len()]);
    }
    nested_tables(nested, &gvas, bytes);
}

fn check_walk(mem: &Memory<'_>, p: Paging, gva: u64, other: u64) {
    let mode = Mode::of(&p);
    let (result, reads) = mem.walk(p, gva);
    assert_eq!(mem.walk(p, gva), (result, reads.clone()), "the walk is deterministic");
    let state = GuestState { cr0: p.cr0, cr3: p.cr3, cr4: p.cr4, efer: p.efer, ..GuestState::default() };
    assert_eq!(translate(&state, gva, |a| mem.read64(a)), result);
    let max_reads = match mode {
        Mode::Flat => 0,
        Mode::Bits32 => 2,
        Mode::Pae => 3,
        Mode::Long => 4,
    };
    assert!(reads.len() <= max_reads, "{mode:?}: {} reads", reads.len());
    if mode == Mode::Flat {
        assert_eq!(result, Some(gva & 0xffff_ffff));
        return;
    }

    // Each read lies in the table the level above named.
    let mut table = match mode {
        Mode::Long => p.cr3 & ADDR,
        Mode::Pae => p.cr3 & 0xffff_ffe0,
        _ => p.cr3 & 0xffff_f000,
    };
    for (level, &a) in reads.iter().enumerate() {
        match mode {
            Mode::Pae if level == 0 => assert!(a >= table && a < table + 32, "PDPTE {a:#x} outside CR3's block"),
            _ => assert_eq!(a & !0xfff, table, "{mode:?} level {level} read {a:#x} outside its table"),
        }
        match mode {
            Mode::Bits32 => assert_eq!(a % 4, 0),
            _ => assert!(a % 8 == 0 && a & 0xfff <= 0xff8, "{a:#x}"),
        }
        if let Some(v) = mem.read64_quiet(a) {
            table = match mode {
                Mode::Bits32 => v & 0xffff_f000,
                _ => v & ADDR,
            };
        }
    }

    // A failed read ends the walk there, untranslated.
    for j in 0..reads.len() {
        let failing = Memory { fail_at: Some(j), reads: RefCell::new(Vec::new()), ..*mem };
        let (r, rs) = failing.walk(p, gva);
        assert_eq!(r, None, "read {j} failed but the walk went on");
        assert_eq!(rs, reads[..=j], "the walk read on after a failure");
    }

    if mode == Mode::Bits32 {
        // 32-bit entries: the upper half of what is read must not matter.
        let noisy = Memory { upper_noise: other | 1, reads: RefCell::new(Vec::new()), ..*mem };
        assert_eq!(noisy.walk(p, gva), (result, reads.clone()));
    }
    if mode != Mode::Long {
        assert_eq!(mem.walk(p, gva & 0xffff_ffff), (result, reads.clone()), "32-bit modes use 32-bit addresses");
    }

    let Some(gpa) = result else { return };
    assert_eq!(gpa & 0xfff, gva & 0xfff, "the page offset is kept");
    let width = if mode == Mode::Bits32 { 32 } else { 52 };
    assert!(gpa < 1 << width, "{mode:?} result {gpa:#x} wider than {width} bits");

    // The page the walk ended on, from how deep it went.
    let page = match (mode, reads.len()) {
        (Mode::Long, 2) => 1 << 30,
        (Mode::Long, 3) | (Mode::Pae, 2) => 2 << 20,
        (Mode::Bits32, 1) => 4 << 20,
        _ => 4096,
    };
    let moved = (gva & !(page - 1)) | (other & (page - 1));
    let want = (gpa & !(page - 1)) | (other & (page - 1));
    assert_eq!(mem.walk(p, moved), (Some(want), reads), "{gva:#x} and {moved:#x} share a {page:#x}-byte page");
}

impl Memory<'_> {
    /// `read64` without recording or failing (to follow the walk).
    fn read64_quiet(&self, a: u64) -> Option<u64> {
        (a < self.limit).then(|| {
            let v = (0..8).fold(0u64, |v, i| v | u64::from(self.byte(a.wrapping_add(i))) << (8 * i));
            v ^ self.upper_noise << 32
        })
    }
}

/// Nested tables built by `mm` in simulated memory, walked as 4-level
/// tables the way the AMD backend reads guest memory through them.
fn nested_tables(choice: u8, gvas: &[u64; 4], bytes: &[u8]) {
    let mut sim = SimPhys::new(64);
    let Ok(mut table) = NestedPageTable::<Npt>::new(&mut sim) else { return };
    let mut probes = Vec::new();
    for (i, &g) in gvas.iter().enumerate() {
        let size = [PageSize::Size4K, PageSize::Size2M, PageSize::Size1G][usize::from(choice >> (2 * i)) % 3];
        let mask = !(size.bytes() - 1);
        let gpa = GuestPhysAddr(g & ((1 << 42) - 1) & mask);
        let hpa = HostPhysAddr(g.rotate_left(17) & ((1 << 52) - 1) & mask);
        let access = if g & 1 != 0 { Access::RWX } else { Access::READ };
        if let Ok(inv) = table.map(&mut sim, gpa, hpa, size, access, MemType::WriteBack) {
            inv.flush(&mut sim, |_| {});
        }
        probes.extend([gpa.0, gpa.0 + size.bytes() - 1, g & ((1 << 48) - 1)]);
    }
    probes.extend(bytes.as_chunks::<8>().0.iter().take(8).map(|c| u64::from_le_bytes(*c) & ((1 << 48) - 1)));
    let root = Paging::long_mode(table.root().0);
    assert_eq!(root, Paging { cr0: CR0_PE | CR0_PG, cr3: table.root().0, cr4: CR4_PAE, efer: EFER_LME | EFER_LMA });
    for gpa in probes {
        let walked = translate_with(root, gpa, |pa| {
            let pa = HostPhysAddr(pa);
            // SAFETY: inside the simulated memory (checked), 8 bytes within
            // one table frame (the walk reads aligned entries).
            sim.contains(pa).then(|| unsafe { (sim.phys_to_ptr(pa) as *const u64).read_unaligned() })
        });
        let want = table.translate(&sim, GuestPhysAddr(gpa)).map(|t| t.hpa.0);
        assert_eq!(walked, want, "nested gpa {gpa:#x}");
    }
    table.destroy().flush(&mut sim, |_| {});
    assert_eq!(sim.frames_in_use(), 0);
}
