//! An access to interrupt-controller registers, carried out on the CPU
//! where the vCPU runs rather than left for the boot CPU (`rounds`): a
//! sibling's access to its own xAPIC page, and a VM away's access to its
//! local APIC's page or its I/O APIC's. The nested page fault names the
//! address but not the value, so the instruction is fetched, decoded and
//! executed by the `emulator`, as on the boot CPU, over what may be
//! touched there: the vCPU, the registers of [`LocalDevices`] and a
//! read-only view of the VM's memory (`VmMemory::peek`; a sibling reads it
//! under its gang's lock, as the boot CPU may fix another sibling's fault
//! meanwhile). The CPU has just fetched this instruction through the same
//! page tables, so the code and the tables are normally resident; if not,
//! the access is the boot CPU's.
//!
//! Anything more goes to the boot CPU with nothing changed (registers as
//! they were, RIP on the instruction): a page that is not resident, a
//! write to RAM, another device, an access that is not one aligned dword
//! (Linux makes no other), a register write the devices refuse (for a
//! sibling: one that is not its own, [`SiblingApic::mmio_write`]), and
//! any fault the instruction raises (the boot CPU raises it).

use mm::addr::GuestPhysAddr;
use mm::hal::PhysMem;
use vcpu::{Gprs, GuestState, MemAccess, Vcpu, walk};

use super::sibling_apic::{Outbox, SiblingApic};
use crate::devices::DeviceSet;
use crate::emulator::{self, MmioFault, Mode, PageFaultCode, Platform, Seg};
use crate::memory::GuestMemory;

/// The registers an access carried out where the vCPU runs may reach.
pub trait LocalDevices {
    /// Whether the aligned dword at `gpa` is one of them.
    fn claims(&mut self, gpa: u64) -> bool;
    /// Reads it at host time `now`.
    fn read(&mut self, gpa: u64, now: u64) -> u32;
    /// Writes it; false if that is not for this CPU to do (nothing
    /// changed).
    fn write(&mut self, gpa: u64, value: u32, now: u64) -> bool;
}

/// A sibling's own xAPIC page; its IPIs go out through `out`.
pub struct SiblingApicPage<'a, O: Outbox> {
    pub apic: &'a mut SiblingApic,
    /// The sibling's vCPU index.
    pub me: usize,
    pub out: &'a O,
}

impl<O: Outbox> LocalDevices for SiblingApicPage<'_, O> {
    fn claims(&mut self, gpa: u64) -> bool {
        self.apic.owns_page(gpa)
    }
    fn read(&mut self, gpa: u64, now: u64) -> u32 {
        self.apic.mmio_read(gpa & 0xfff, now)
    }
    fn write(&mut self, gpa: u64, value: u32, now: u64) -> bool {
        self.apic.mmio_write(gpa & 0xfff, value, now, self.me, self.out)
    }
}

/// A VM away's interrupt controllers: the current vCPU's local APIC page
/// (xAPIC mode) and the I/O APIC's, both the VM's alone, as the whole VM
/// is the CPU's for its slice. `to_ns` turns host time into the VM's.
pub struct InterruptPages<'a, T: Fn(u64) -> u64> {
    pub devices: &'a mut DeviceSet,
    pub to_ns: T,
}

impl<T: Fn(u64) -> u64> LocalDevices for InterruptPages<'_, T> {
    fn claims(&mut self, gpa: u64) -> bool {
        self.devices.interrupt_controller_page(gpa)
    }
    fn read(&mut self, gpa: u64, now: u64) -> u32 {
        self.devices.mmio_read(gpa, 4, (self.to_ns)(now)).unwrap_or(u64::MAX) as u32
    }
    fn write(&mut self, gpa: u64, value: u32, now: u64) -> bool {
        self.devices.mmio_write(gpa, 4, u64::from(value), (self.to_ns)(now))
    }
}

/// What one access carried out where the vCPU runs works on.
pub struct LocalMmio<'a, V: Vcpu, F: mm::paging::EntryFormat, M: PhysMem, D: LocalDevices> {
    pub vcpu: &'a mut V,
    pub mem: &'a GuestMemory<F>,
    pub phys: &'a M,
    pub devices: D,
}

impl<V: Vcpu, F: mm::paging::EntryFormat, M: PhysMem, D: LocalDevices> LocalMmio<'_, V, F, M, D> {
    /// Carries out the access at host time `now`; whether it was done here
    /// (false: nothing changed, the boot CPU handles the exit).
    pub fn emulate(self, fault: MmioFault, now: u64) -> bool {
        if fault.access == MemAccess::Execute {
            return false;
        }
        let state = self.vcpu.state();
        let gprs = *self.vcpu.gprs();
        let mut p =
            LocalPlatform { page: self, state: &state, rip: state.rip, rflags: state.rflags, now, refused: false };
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

/// The emulator's view where the vCPU runs (see the module).
struct LocalPlatform<'a, 'p, V: Vcpu, F: mm::paging::EntryFormat, M: PhysMem, D: LocalDevices> {
    page: LocalMmio<'p, V, F, M, D>,
    state: &'a GuestState,
    rip: u64,
    rflags: u64,
    now: u64,
    /// Something was asked that is not this CPU's to do.
    refused: bool,
}

impl<V: Vcpu, F: mm::paging::EntryFormat, M: PhysMem, D: LocalDevices> LocalPlatform<'_, '_, V, F, M, D> {
    /// Whether the access is one aligned dword of the devices' registers.
    fn register(&mut self, gpa: u64, size: u8) -> bool {
        let ok = size == 4 && gpa & 3 == 0 && self.page.devices.claims(gpa);
        self.refused |= !ok;
        ok
    }
}

impl<V: Vcpu, F: mm::paging::EntryFormat, M: PhysMem, D: LocalDevices> Platform for LocalPlatform<'_, '_, V, F, M, D> {
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
            true => u64::from(self.page.devices.read(gpa, self.now)),
            false => u64::MAX,
        }
    }

    fn mmio_write(&mut self, gpa: u64, size: u8, value: u64) {
        if self.refused {
            return;
        }
        if self.register(gpa, size) {
            self.refused |= !self.page.devices.write(gpa, value as u32, self.now);
        }
    }
}
