//! A sibling's access to its own xAPIC page, carried out where the sibling
//! runs (`rounds`, "Siblings"). The nested page fault names the address but
//! not the value, so the instruction is fetched, decoded and executed by
//! the `emulator`, as on the boot CPU, over what a sibling may touch: its
//! vCPU, its own APIC ([`SiblingApic`]) and a read-only view of the VM's
//! memory (`VmMemory::peek`). Nested mappings do not change during a
//! round, and the CPU has just fetched this instruction through the same
//! page tables, so the code and the tables are resident.
//!
//! Anything more goes to the boot CPU with nothing changed (registers as
//! they were, RIP on the instruction): a page that is not resident, a
//! write to RAM, a device other than this APIC, an access that is not one
//! aligned dword (Linux makes no other), an APIC write that is not the
//! sibling's ([`SiblingApic::mmio_write`]), and any fault the instruction
//! raises (the boot CPU raises it).

use mm::addr::GuestPhysAddr;
use mm::hal::PhysMem;
use vcpu::{Gprs, GuestState, MemAccess, Vcpu, walk};

use super::sibling_apic::{Outbox, SiblingApic};
use crate::emulator::{self, MmioFault, Mode, PageFaultCode, Platform, Seg};
use crate::memory::GuestMemory;

/// What one xAPIC access in a sibling works on.
pub struct ApicPage<'a, V: Vcpu, F: mm::paging::EntryFormat, M: PhysMem, O: Outbox> {
    pub vcpu: &'a mut V,
    pub mem: &'a GuestMemory<F>,
    pub phys: &'a M,
    pub apic: &'a mut SiblingApic,
    /// The sibling's vCPU index, and where its IPIs go.
    pub me: usize,
    pub out: &'a O,
}

impl<V: Vcpu, F: mm::paging::EntryFormat, M: PhysMem, O: Outbox> ApicPage<'_, V, F, M, O> {
    /// Carries out the access at host time `now`; whether it was done here
    /// (false: nothing changed, the boot CPU handles the exit).
    pub fn emulate(self, fault: MmioFault, now: u64) -> bool {
        if fault.access == MemAccess::Execute {
            return false;
        }
        let state = self.vcpu.state();
        let gprs = *self.vcpu.gprs();
        let mut p =
            SiblingPlatform { page: self, state: &state, rip: state.rip, rflags: state.rflags, now, refused: false };
        let done = emulator::emulate(&mut p, &fault);
        let (rip, rflags, refused) = (p.rip, p.rflags, p.refused);
        let vcpu = p.page.vcpu;
        match done {
            Ok(done) if !refused => {
                crate::vm::exit::finish_emulated(vcpu, done.completed, &state, rip, rflags);
                true
            }
            _ => {
                // The boot CPU runs it again from the start.
                *vcpu.gprs_mut() = gprs;
                false
            }
        }
    }
}

/// The emulator's view in a sibling (see the module).
struct SiblingPlatform<'a, 'p, V: Vcpu, F: mm::paging::EntryFormat, M: PhysMem, O: Outbox> {
    page: ApicPage<'p, V, F, M, O>,
    state: &'a GuestState,
    rip: u64,
    rflags: u64,
    now: u64,
    /// Something was asked that is not the sibling's to do.
    refused: bool,
}

impl<V: Vcpu, F: mm::paging::EntryFormat, M: PhysMem, O: Outbox> SiblingPlatform<'_, '_, V, F, M, O> {
    /// The register offset of a dword access to the APIC's page.
    fn register(&mut self, gpa: u64, size: u8) -> Option<u64> {
        let ok = size == 4 && gpa & 3 == 0 && self.page.apic.owns_page(gpa);
        self.refused |= !ok;
        ok.then_some(gpa & 0xfff)
    }
}

impl<V: Vcpu, F: mm::paging::EntryFormat, M: PhysMem, O: Outbox> Platform for SiblingPlatform<'_, '_, V, F, M, O> {
    fn gprs(&self) -> &Gprs {
        self.page.vcpu.gprs()
    }

    fn gprs_mut(&mut self) -> &mut Gprs {
        self.page.vcpu.gprs_mut()
    }

    fn rip(&self) -> u64 {
        self.rip
    }

    fn set_rip(&mut self, rip: u64) {
        self.rip = rip;
    }

    fn rflags(&self) -> u64 {
        self.rflags
    }

    fn set_rflags(&mut self, rflags: u64) {
        self.rflags = rflags;
    }

    fn mode(&self) -> Mode {
        Mode::of(self.state)
    }

    fn segment_base(&self, seg: Seg) -> u64 {
        seg.base_in(self.state)
    }

    /// Resident tables only: a walk that needs more is the boot CPU's.
    fn translate(&mut self, gva: u64, _: MemAccess) -> Result<u64, PageFaultCode> {
        let (mem, phys) = (self.page.mem, self.page.phys);
        let read64 = |gpa: u64| {
            let mut b = [0u8; 8];
            mem.peek(phys, GuestPhysAddr(gpa), &mut b).ok().map(|()| u64::from_le_bytes(b))
        };
        let walked = walk::translate(self.state, gva, read64);
        self.refused |= walked.is_none();
        walked.ok_or(PageFaultCode(0))
    }

    fn read_ram(&mut self, gpa: u64, buf: &mut [u8]) -> bool {
        let ok = self.page.mem.peek(self.page.phys, GuestPhysAddr(gpa), buf).is_ok();
        self.refused |= !ok;
        ok
    }

    fn write_ram(&mut self, _: u64, _: &[u8]) -> bool {
        self.refused = true;
        false
    }

    fn mmio_read(&mut self, gpa: u64, size: u8) -> u64 {
        match self.register(gpa, size) {
            Some(offset) => u64::from(self.page.apic.mmio_read(offset, self.now)),
            None => u64::MAX,
        }
    }

    fn mmio_write(&mut self, gpa: u64, size: u8, value: u64) {
        if self.refused {
            return;
        }
        if let Some(offset) = self.register(gpa, size) {
            let (me, out) = (self.page.me, self.page.out);
            self.refused |= !self.page.apic.mmio_write(offset, value as u32, self.now, me, out);
        }
    }
}
