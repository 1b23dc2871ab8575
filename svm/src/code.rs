//! The guest's instruction bytes at RIP, for CPUs without next-RIP saving
//! (NRIPS; QEMU's SVM has none): the length of the instruction that exited
//! is measured from its bytes (`fetch`). Reaching them takes a walk of the
//! guest's page tables and of the nested table; the last code page's
//! translation is cached, since a guest exits from the same page over and
//! over.

use mm::hal::PhysMem;
use vcpu::state::bits::*;
use vcpu::walk::{self, Paging};

use crate::fetch::{self, Opcode};
use crate::vmcb::{Vmcb, ctl, save};

/// Reads guest code through the direct map `M`, with a one-page cache.
pub struct CodeReader<M: PhysMem> {
    mem: M,
    /// Last code page translated: (guest CR3, linear page, host page).
    page: Option<(u64, u64, u64)>,
    /// Measurements whose bytes could not be read or matched (the
    /// architectural length was used instead).
    fallbacks: u64,
}

impl<M: PhysMem> CodeReader<M> {
    /// `mem` maps every frame of the nested tables and of guest RAM.
    pub fn new(mem: M) -> CodeReader<M> {
        CodeReader { mem, page: None, fallbacks: 0 }
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

    /// Host address of guest-physical `gpa` through the nested table.
    fn gpa_to_hpa(&self, vmcb: Vmcb, gpa: u64) -> Option<u64> {
        let root = vmcb.u64(ctl::N_CR3);
        walk::translate_with(Paging::long_mode(root), gpa, |pa| {
            // SAFETY: `pa` is inside a nested table frame (the walk only
            // follows addresses this hypervisor wrote into its tables).
            Some(unsafe { (self.mem.phys_to_ptr(mm::HostPhysAddr(pa)) as *const u64).read_volatile() })
        })
    }

    /// 8 bytes of guest-physical memory, or 4 at a page's last 4 bytes
    /// (a 32-bit table entry): never past the page that was translated.
    fn read_guest64(&self, vmcb: Vmcb, gpa: u64) -> Option<u64> {
        let hpa = self.gpa_to_hpa(vmcb, gpa)?;
        let p = self.mem.phys_to_ptr(mm::HostPhysAddr(hpa));
        // SAFETY: `hpa` is guest RAM mapped by the nested table (host
        // memory the allocator handed out); the read stays inside its page.
        // The guest may change it concurrently only on other CPUs, and it is
        // read as plain bytes.
        Some(unsafe {
            if gpa & 0xfff <= 0xff8 {
                (p as *const u64).read_unaligned()
            } else {
                (p as *const u32).read_unaligned() as u64
            }
        })
    }

    /// The linear address of RIP, and whether the code is 64-bit.
    #[inline(always)]
    fn code_address(vmcb: Vmcb) -> (u64, bool) {
        let attrs = vcpu::SegAttrs(vmcb.read::<u16>(save::CS + 2));
        let long = attrs.long() && vmcb.u64(save::EFER) & EFER_LMA != 0;
        let rip = vmcb.u64(save::RIP);
        if long { (rip, true) } else { (vmcb.u64(save::CS + 8).wrapping_add(rip) & 0xffff_ffff, false) }
    }

    /// The host page behind the guest's linear code page `page`.
    fn code_page(&mut self, vmcb: Vmcb, page: u64, use_cache: bool) -> Option<u64> {
        let cr3 = vmcb.u64(save::CR3);
        if use_cache
            && let Some((c, p, h)) = self.page
            && c == cr3
            && p == page
        {
            return Some(h);
        }
        let paging = Paging { cr0: vmcb.u64(save::CR0), cr3, cr4: vmcb.u64(save::CR4), efer: vmcb.u64(save::EFER) };
        let gpa = walk::translate_with(paging, page, |a| self.read_guest64(vmcb, a))?;
        let h = self.gpa_to_hpa(vmcb, gpa)? & !0xfff;
        self.page = Some((cr3, page, h));
        Some(h)
    }

    /// Up to 15 code bytes at linear address `lin`.
    fn code_bytes(&mut self, vmcb: Vmcb, mut lin: u64, use_cache: bool) -> ([u8; fetch::MAX_LEN], usize) {
        let mut out = [0u8; fetch::MAX_LEN];
        let mut n = 0;
        while n < out.len() {
            let Some(host_page) = self.code_page(vmcb, lin & !0xfff, use_cache) else { break };
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
            && let Some(h) = self.code_page(vmcb, lin & !0xfff, true)
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
        for use_cache in [true, false] {
            let (bytes, n) = self.code_bytes(vmcb, lin, use_cache);
            if let Some(len) = fetch::instruction_length(&bytes[..n], op, long) {
                return len as u64;
            }
        }
        self.fallbacks += 1;
        code.len() as u64
    }
}
