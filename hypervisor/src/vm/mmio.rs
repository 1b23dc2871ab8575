//! A guest access to a device's registers in guest-physical memory (the
//! local APIC's page, the I/O APIC's), or a write to the firmware ROM: the
//! nested page fault names the address but not the value or the register,
//! so the instruction is decoded and carried out by `emulator` through
//! [`VmPlatform`], over the vCPU's registers, guest RAM (through `mm`, so
//! page-ins and dirty logging apply), the ROM (read as RAM, writes dropped
//! as a PC's bus drops them) and the VM's devices.

use mm::addr::GuestPhysAddr;
use mm::hal::ContiguousAlloc;
use mm::swap::SwapSlot;
use mm::vm_memory::Hooks;
use vcpu::{Gprs, GuestState, MemAccess, Vcpu, walk};

use crate::devices::{self, DeviceSet, PortEffect, virtio};
use crate::emulator::{Mode, PageFaultCode, Platform, Ports, Seg};
use crate::memory::GuestMemory;

/// The emulator's view of one VM at one exit.
pub struct VmPlatform<'a, 'h, V: Vcpu, F: mm::paging::EntryFormat, A: ContiguousAlloc> {
    /// The VM's vCPUs (a nested-TLB flush reaches them all) and the one
    /// whose instruction is emulated.
    pub vcpus: &'a mut [super::VcpuSlot<V>],
    pub cur: usize,
    /// The vCPU's state at the exit: mode, segments and paging for the
    /// decoder and the page walk (the instruction cannot change them).
    pub state: &'a GuestState,
    pub rip: u64,
    pub rflags: u64,
    pub mem: &'a mut GuestMemory<F>,
    pub alloc: &'a mut A,
    pub hooks: &'a mut Hooks<'h, SwapSlot>,
    pub devices: &'a mut DeviceSet,
    pub now_ns: u64,
    /// Device accesses carried out, for the exit statistics.
    pub accesses: u32,
    /// Port accesses no device decoded (string I/O).
    pub unbacked_ports: u32,
    /// A port access that ends or resets the VM (string I/O), for the
    /// exit handler to act on once the instruction stopped.
    pub port_effect: Option<PortEffect>,
    /// Post-copy: a guest frame the instruction needed (its bytes, an
    /// operand, a page table) that is still on its way from the
    /// migration's source. The instruction was not carried out; the vCPU
    /// waits for the page and runs it again.
    pub in_transit: Option<u64>,
    /// Post-copy: a device write (a virtio notification) held back because
    /// what the device would reach is not all here; the frame asked for.
    /// The instruction is not completed: the vCPU waits and runs it again.
    pub device_waits: Option<u64>,
}

impl<V: Vcpu, F: mm::paging::EntryFormat, A: ContiguousAlloc> VmPlatform<'_, '_, V, F, A> {
    /// Notes a page in transit; whether the access went through.
    fn went(&mut self, r: Result<(), mm::Error>) -> bool {
        match r {
            Ok(()) => true,
            Err(mm::Error::PageInTransit(g)) => {
                self.in_transit = Some(g.0 >> 12);
                false
            }
            Err(_) => false,
        }
    }
}

impl<V: Vcpu, F: mm::paging::EntryFormat, A: ContiguousAlloc> Ports for VmPlatform<'_, '_, V, F, A> {
    fn port_read(&mut self, port: u16, size: u8) -> u32 {
        let now = self.now_ns;
        match self.devices.pio_read(port, size, || now) {
            PortEffect::Done(v) => v,
            PortEffect::Unbacked => {
                self.unbacked_ports += 1;
                devices::unbacked_read(size)
            }
            // No read ends a VM today; if one did, it ends it here too.
            effect => {
                self.port_effect = Some(effect);
                devices::unbacked_read(size)
            }
        }
    }

    fn port_write(&mut self, port: u16, size: u8, value: u32) -> bool {
        let now = self.now_ns;
        match self.devices.pio_write(port, size, value, || now) {
            PortEffect::Done(_) => true,
            PortEffect::Unbacked => {
                self.unbacked_ports += 1;
                true
            }
            effect => {
                self.port_effect = Some(effect);
                false
            }
        }
    }
}

impl<V: Vcpu, F: mm::paging::EntryFormat, A: ContiguousAlloc> Platform for VmPlatform<'_, '_, V, F, A> {
    fn gprs(&self) -> &Gprs {
        self.vcpus[self.cur].vcpu.gprs()
    }

    fn gprs_mut(&mut self) -> &mut Gprs {
        self.vcpus[self.cur].vcpu.gprs_mut()
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

    /// The walk reads the guest's tables without bringing pages in: the CPU
    /// walked the same tables for this very instruction, so they are
    /// present unless swapped out since (then the guest gets the #PF a
    /// racing table change would give it). Permissions are not checked
    /// again: the CPU checked them before the access faulted.
    fn translate(&mut self, gva: u64, access: MemAccess) -> Result<u64, PageFaultCode> {
        // A page-table page that is not resident (swapped out, or not yet
        // loaded: lazy restore, post-copy) is brought in as any host read
        // would, rather than read as absent (which would fault the guest
        // for a translation it has).
        let walking =
            core::cell::RefCell::new((&mut *self.mem, &mut *self.alloc, &mut *self.hooks, &mut *self.vcpus, None));
        let read64 = |gpa: u64| {
            let mut w = walking.borrow_mut();
            let (mem, alloc, hooks, vcpus, transit) = &mut *w;
            let mut b = [0u8; 8];
            if mem.peek(&**alloc, GuestPhysAddr(gpa), &mut b).is_ok() {
                return Some(u64::from_le_bytes(b));
            }
            match mem.read(*alloc, hooks, GuestPhysAddr(gpa), &mut b, &mut |s| super::flush_all(vcpus, s)) {
                Ok(()) => Some(u64::from_le_bytes(b)),
                Err(mm::Error::PageInTransit(g)) => {
                    *transit = Some(g.0 >> 12);
                    None
                }
                Err(_) => None,
            }
        };
        let walked = walk::translate(self.state, gva, read64);
        if let Some(g) = walking.into_inner().4 {
            self.in_transit = Some(g);
        }
        walked.ok_or_else(|| {
            // Not present; W/R, U/S and I/D as the access was (SDM Vol. 3A
            // 4.7).
            let mut code = 0;
            if access == MemAccess::Write {
                code |= 1 << 1;
            }
            if self.state.cs.selector & 3 == 3 {
                code |= 1 << 2;
            }
            if access == MemAccess::Execute {
                code |= 1 << 4;
            }
            PageFaultCode(code)
        })
    }

    fn read_ram(&mut self, gpa: u64, buf: &mut [u8]) -> bool {
        let vcpus = &mut *self.vcpus;
        let r = self.mem.read(self.alloc, self.hooks, GuestPhysAddr(gpa), buf, &mut |s| super::flush_all(vcpus, s));
        self.went(r)
    }

    fn write_ram(&mut self, gpa: u64, data: &[u8]) -> bool {
        if self.mem.is_read_only(GuestPhysAddr(gpa)) {
            return true; // ROM: the write goes nowhere
        }
        let vcpus = &mut *self.vcpus;
        let r = self.mem.write(self.alloc, self.hooks, GuestPhysAddr(gpa), data, &mut |s| super::flush_all(vcpus, s));
        self.went(r)
    }

    fn mmio_read(&mut self, gpa: u64, size: u8) -> u64 {
        self.accesses += 1;
        if !self.devices.claims_mmio(gpa) && self.mem.is_read_only(GuestPhysAddr(gpa)) {
            // ROM reads as the memory it is (an access never crosses the
            // faulting page, so it is all ROM).
            let mut b = [0u8; 8];
            let n = usize::from(size).min(8);
            return match self.read_ram(gpa, &mut b[..n]) {
                true => u64::from_le_bytes(b),
                false => u64::MAX,
            };
        }
        self.devices.mmio_read(gpa, size, self.now_ns).unwrap_or(u64::MAX)
    }

    fn mmio_write(&mut self, gpa: u64, size: u8, value: u64) {
        self.accesses += 1;
        if !self.devices.claims_mmio(gpa) && self.mem.is_read_only(GuestPhysAddr(gpa)) {
            return; // ROM: dropped
        }
        if self.devices.is_virtio(gpa) {
            // A queue notification or a queue made ready: the device
            // reaches the guest's rings and buffers through `mm`.
            let paged = self.hooks.source.is_some();
            let mut dma = Dma {
                vcpus: &mut *self.vcpus,
                mem: &mut *self.mem,
                alloc: &mut *self.alloc,
                hooks: self.hooks,
                in_transit: None,
            };
            // Pages may be elsewhere (post-copy): the write waits, not
            // carried out, until what the device would reach is here; the
            // dry run asked for the first page missing.
            if paged
                && !self.devices.virtio_write_can_go(gpa, size, value, &mut dma)
                && let Some(gfn) = dma.in_transit
            {
                self.device_waits = Some(gfn);
                return;
            }
            self.devices.virtio_write(gpa, size, value, &mut dma);
            return;
        }
        self.devices.mmio_write(gpa, size, value, self.now_ns);
    }
}

/// A device's DMA into the VM's RAM, through `mm` like the vCPU's own
/// accesses (swapped pages come back in, writes are dirty-logged). ROM,
/// device pages and holes are not RAM to a device.
struct Dma<'a, 'h, V: Vcpu, F: mm::paging::EntryFormat, A: ContiguousAlloc> {
    vcpus: &'a mut [super::VcpuSlot<V>],
    mem: &'a mut GuestMemory<F>,
    alloc: &'a mut A,
    hooks: &'a mut Hooks<'h, SwapSlot>,
    /// The first page `here` found on its way (post-copy), asked for.
    in_transit: Option<u64>,
}

impl<V: Vcpu, F: mm::paging::EntryFormat, A: ContiguousAlloc> virtio::GuestMemory for Dma<'_, '_, V, F, A> {
    fn read(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), virtio::OutsideRam> {
        let outside = virtio::OutsideRam { gpa, len: buf.len() as u64 };
        if !self.is_ram(gpa, buf.len() as u64) {
            return Err(outside);
        }
        let vcpus = &mut *self.vcpus;
        self.mem
            .read(self.alloc, self.hooks, GuestPhysAddr(gpa), buf, &mut |s| super::flush_all(vcpus, s))
            .map_err(|_| outside)
    }

    fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), virtio::OutsideRam> {
        let outside = virtio::OutsideRam { gpa, len: data.len() as u64 };
        if !self.is_ram(gpa, data.len() as u64) {
            return Err(outside);
        }
        let vcpus = &mut *self.vcpus;
        self.mem
            .write(self.alloc, self.hooks, GuestPhysAddr(gpa), data, &mut |s| super::flush_all(vcpus, s))
            .map_err(|_| outside)
    }

    /// Page by page (the caller bounds the pages: `Queue::here`): a byte
    /// of each is read through `mm`, which brings a swapped page in and
    /// asks the migration's source for one not loaded yet.
    fn here(&mut self, gpa: u64, len: u64) -> bool {
        if !self.is_ram(gpa, len) {
            return true;
        }
        let (first, last) = (gpa >> 12, (gpa + len.max(1) - 1) >> 12);
        for gfn in first..=last.min(first + virtio::queue::MAX_PAGES_CHECKED) {
            let vcpus = &mut *self.vcpus;
            let mut b = [0u8; 1];
            let r = self
                .mem
                .read(self.alloc, self.hooks, GuestPhysAddr(gfn << 12), &mut b, &mut |s| super::flush_all(vcpus, s));
            if let Err(mm::Error::PageInTransit(g)) = r {
                self.in_transit.get_or_insert(g.0 >> 12);
                return false;
            }
        }
        true
    }

    /// One range check, whatever the length: a guest's descriptor may
    /// claim gigabytes, and a per-page walk would let it burn host time.
    fn is_ram(&self, gpa: u64, len: u64) -> bool {
        let Some(end) = gpa.checked_add(len.max(1)) else { return false };
        let in_ram = self.mem.map().ram_ranges().any(|(start, size)| start.0 <= gpa && end <= start.0 + size);
        in_ram && !self.mem.any_read_only(gpa, end)
    }
}

impl<B: crate::backend::Backend> super::Vm<B> {
    /// Runs `f` over the VM's devices with the VM's RAM as device DMA sees
    /// it (through `mm`): host-initiated device work. `None` if the VM has
    /// ended.
    pub fn with_dma<R>(
        &mut self,
        backend: &mut B,
        host: &mut crate::memory::HostMemory,
        f: impl FnOnce(&mut DeviceSet, &mut dyn virtio::GuestMemory) -> R,
    ) -> Option<R> {
        let super::Resources { mem, vcpus, .. } = self.res.as_mut()?;
        let devices = &mut self.devices;
        let alloc = backend.mem();
        Some(host.with_hooks(self.id, |hooks| {
            let mut dma = Dma { vcpus: &mut *vcpus, mem: &mut *mem, alloc, hooks, in_transit: None };
            f(devices, &mut dma)
        }))
    }

    /// Host input for the VM's virtio console (an attached terminal's
    /// keys): into the guest's receive buffers through `mm`, as the
    /// device's own DMA. How many bytes were taken (the rest did not fit
    /// the device's buffer); `None` if the VM has ended or has no virtio
    /// console.
    pub fn virtio_console_input(
        &mut self,
        bytes: &[u8],
        backend: &mut B,
        host: &mut crate::memory::HostMemory,
    ) -> Option<usize> {
        self.with_dma(backend, host, |devices, dma| devices.virtio_console_input(bytes, dma)).flatten()
    }
}

impl<B: crate::backend::Backend> super::Vm<B> {
    /// Applies what the guest's balloon driver asked for to `mm`, then
    /// gives the driver its chains back (the device holds them until the
    /// host applied them: `devices::virtio::balloon`). Inflated and
    /// reported pages lose their host frames (a later touch backs them
    /// afresh, zeroed); deflated ones get a fresh frame now. Call after a
    /// write to the balloon's registers and after a restore.
    pub fn service_balloon(&mut self, backend: &mut B, host: &mut crate::memory::HostMemory) {
        use crate::devices::virtio::balloon::BalloonAction;
        let Some(super::Resources { mem, vcpus, .. }) = self.res.as_mut() else { return };
        let (devices, stats) = (&mut self.devices, &mut self.stats.balloon);
        // Each round applies what the last one took; a driver that keeps
        // posting gets its next chains at its next notification.
        for _ in 0..4 {
            let actions = devices.balloon_take_actions();
            let alloc = backend.mem();
            host.with_hooks(self.id, |hooks| {
                for action in actions {
                    let flush = &mut |s| super::flush_all(vcpus, s);
                    match action {
                        BalloonAction::Inflate(gpas) => {
                            let gpas: alloc::vec::Vec<GuestPhysAddr> = gpas.into_iter().map(GuestPhysAddr).collect();
                            let r = mem.balloon_inflate(alloc, hooks, &gpas, flush);
                            stats.inflated += r.accepted;
                            stats.refused += r.rejected;
                        }
                        BalloonAction::Deflate(gpas) => {
                            let gpas: alloc::vec::Vec<GuestPhysAddr> = gpas.into_iter().map(GuestPhysAddr).collect();
                            match mem.balloon_deflate(alloc, &gpas, flush) {
                                Ok(r) => {
                                    stats.deflated += r.accepted;
                                    stats.refused += r.rejected;
                                }
                                // Out of host frames: the rest stay
                                // ballooned and are backed when touched.
                                Err(e) => log::warn!("vm {}: balloon deflate: {e}", self.id),
                            }
                        }
                        BalloonAction::Report(ranges) => {
                            // Only the RAM inside each range: a range's
                            // length is the guest's to choose.
                            let mut gpas = alloc::vec::Vec::new();
                            for (start, len) in ranges {
                                let end = start.saturating_add(len);
                                for (base, size) in mem.map().ram_ranges() {
                                    let (lo, hi) = (start.max(base.0), end.min(base.0 + size));
                                    gpas.extend((lo..hi).step_by(4096).map(GuestPhysAddr));
                                }
                            }
                            let r = mem.balloon_inflate(alloc, hooks, &gpas, flush);
                            stats.reported += r.accepted;
                            stats.refused += r.rejected;
                        }
                    }
                }
                let mut dma = Dma { vcpus: &mut *vcpus, mem: &mut *mem, alloc, hooks, in_transit: None };
                devices.balloon_run_queues(&mut dma);
            });
            if !devices.balloon_needs_service() {
                break;
            }
        }
    }

    /// Asks the balloon driver for fresh statistics.
    pub fn request_balloon_stats(&mut self, backend: &mut B, host: &mut crate::memory::HostMemory) -> bool {
        self.with_dma(backend, host, |devices, dma| devices.balloon_request_stats(dma)).unwrap_or(false)
    }
}

impl<B: crate::backend::Backend> super::Vm<B> {
    /// Frames for the VM's NIC (from its switch): into the guest's
    /// receive buffers through `mm`, as the device's own DMA. How many the
    /// NIC took (the rest were dropped and counted by it); `None` if the
    /// VM has ended or has no NIC.
    pub fn virtio_net_deliver(
        &mut self,
        frames: &[alloc::vec::Vec<u8>],
        backend: &mut B,
        host: &mut crate::memory::HostMemory,
    ) -> Option<usize> {
        self.with_dma(backend, host, |devices, dma| devices.virtio_net_deliver(frames, dma))?
    }
}
