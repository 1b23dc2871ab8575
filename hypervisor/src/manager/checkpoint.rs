//! Checkpoints: a VM's whole state written as a `migrate` stream
//! ([`Manager::save_vm`]), and a VM rebuilt from one
//! ([`Manager::restore_vm`]), on this host or another, of either vendor.
//!
//! The stream carries each vCPU as the neutral `GuestState` (and its
//! scheduling state in the machine record: `checkpoint_smp`), every device
//! through its `Persist` state, the machine's own description (the
//! "machine" record: guest, command line, RAM size, its clock and TSC at
//! the save, its CPUID profile) and every page of RAM. The restored VM's clock and TSC go on
//! from the values saved, whatever this host's clock reads: the guest sees
//! time stand still while it was saved.

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

use migrate::{Apply, Header, RamRange, Reader, Sink, Source, Stats};
use mm::GuestPhysAddr;
use vcpu::{GuestState, Vcpu};

pub use super::checkpoint_smp::{SavedRun, SavedVcpu};
use super::{Error, Manager, free_memory};
use crate::backend::Backend;
use crate::devices::SavedDevice;
use crate::devices::virtio_slots::HostDisk;
use crate::memory::GuestMemory;
use crate::memory::lazy::{LazyProgress, LazySource};
use crate::memory::reclaim::VmReclaim;
use crate::msr::MsrState;
use crate::vm::boot::Protocol;
use crate::vm::interrupts::{device_tsc_offset, vm_ns};
use crate::vm::{Resources, RunState, Vm, VmStats};

/// The name of the machine's own record among the devices.
pub const MACHINE: &str = "machine";
/// Its layout version: 3 added the CPUID profile, 4 each vCPU's
/// scheduling state (`checkpoint_smp`). Version 2 and 3 records (the same
/// layout without them; written for VMs of one vCPU) still restore: as
/// `cpuid=host` VMs, their vCPU runnable.
pub const MACHINE_VERSION: u16 = 4;
/// The layout before the vCPUs' scheduling state.
const MACHINE_VERSION_ONE_VCPU: u16 = 3;
/// The layout before the CPUID profile.
const MACHINE_VERSION_NO_CPUID: u16 = 2;

/// What a VM is besides its vCPU, devices and RAM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineState {
    pub guest: String,
    pub image: String,
    pub cmdline: String,
    pub modules: Vec<String>,
    /// `Protocol::name` of how it was booted.
    pub protocol: String,
    pub mem_bytes: u64,
    pub reboots: u64,
    /// The VM's clock (ns) at the save.
    pub clock_ns: u64,
    /// The guest's TSC at the save.
    pub guest_tsc: u64,
    /// The source host's TSC rate (information: a guest restored on a host
    /// whose TSC runs at another rate sees its TSC rate change).
    pub tsc_hz: u64,
    pub mtrr_def_type: u64,
    pub misc_enable: u64,
    /// The data-disk image its virtio-blk device serves (version 2 on).
    /// The checkpoint holds the device's state, not the image's contents:
    /// a restore attaches the image as it is then.
    pub disk: Option<String>,
    /// The switch its virtio-net NIC is on (version 2 on): a restore
    /// attaches the new VM to the switch of that name here, made if need
    /// be. The NIC's MAC travels in its device state.
    pub net: Option<String>,
    /// The CPUID it sees (version 3 on): a pinned table goes on as it is,
    /// once this host is found able to honour it.
    pub cpuid: crate::cpuid::Profile,
    /// Each vCPU's scheduling state, vCPU 0 first (version 4 on: one per
    /// vCPU record; older records, of one vCPU, read as
    /// [`SavedVcpu::legacy`]).
    pub vcpus: Vec<SavedVcpu>,
}

impl MachineState {
    /// The record of layout `version` in `bytes`, whole and well formed.
    pub fn decode(version: u16, bytes: &[u8]) -> Result<MachineState, Refused> {
        // Each version only appended a field, and postcard writes an enum
        // as its variant index and a sequence as its length, both varints,
        // before any data (postcard wire format, "enum", "seq"): one 0
        // byte is `Profile::Host` (what a VM restored from version 2
        // sees), another an empty vCPU list (read as one runnable vCPU).
        let appended: &[u8] = match version {
            MACHINE_VERSION => &[],
            MACHINE_VERSION_ONE_VCPU => &[0],
            MACHINE_VERSION_NO_CPUID => &[0, 0],
            other => return Err(Refused::MachineVersion(other)),
        };
        let mut whole;
        let bytes = if appended.is_empty() {
            bytes
        } else {
            whole = Vec::with_capacity(bytes.len() + appended.len());
            whole.extend_from_slice(bytes);
            whole.extend_from_slice(appended);
            &whole
        };
        let (mut m, rest) = postcard::take_from_bytes::<MachineState>(bytes).map_err(|_| Refused::Machine)?;
        let table_ok = m.cpuid.table().is_none_or(|t| t.is_well_formed());
        // Bytes that only make a record with the zeros appended above are
        // not one of the older version (found by fuzzing): version 2 had
        // no profile, neither had a vCPU list.
        let old_ok = match version {
            MACHINE_VERSION_NO_CPUID => m.cpuid == crate::cpuid::Profile::Host && m.vcpus.is_empty(),
            MACHINE_VERSION_ONE_VCPU => m.vcpus.is_empty(),
            _ => (1..=crate::devices::MAX_VCPUS).contains(&m.vcpus.len()),
        };
        if !rest.is_empty() || !table_ok || !old_ok {
            return Err(Refused::Machine);
        }
        if version != MACHINE_VERSION {
            m.vcpus = SavedVcpu::legacy();
        }
        Ok(m)
    }
}

fn protocol(name: &str) -> Option<Protocol> {
    [Protocol::Elf64, Protocol::Multiboot, Protocol::Linux].into_iter().find(|p| p.name() == name)
}

/// Why a checkpoint could not be restored, besides the stream's own
/// refusals.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refused {
    /// More vCPUs than a VM here may have (the stream's header allows up
    /// to `migrate::limits::MAX_VCPUS`).
    Vcpus(u32),
    /// vCPU records (the header's count) and the machine record's vCPUs
    /// disagree.
    VcpuRecords { records: u32, machine: u32 },
    /// RAM not laid out as this hypervisor lays out a VM of that size.
    RamLayout,
    /// No "machine" record, or one that does not decode.
    Machine,
    /// A machine record of a layout version this hypervisor does not read
    /// (one written before the disk and switch names joined it, say).
    MachineVersion(u16),
    /// The checkpoint's pinned CPUID shows what this host cannot give
    /// its guests (every such register, or the XSAVE size).
    Cpuid(Vec<crate::cpuid::Unsupported>),
    /// The machine record names a boot protocol this version does not know.
    Protocol(String),
    /// No vCPU state in the stream.
    NoVcpu,
    /// The devices refused their state.
    Devices(crate::devices::RestoreError),
    /// Writing a page into the new VM's RAM failed.
    Memory(mm::Error),
    /// No heap for a lazy restore's page index (one word per page).
    LazyIndex { bytes: u64 },
}

impl core::fmt::Display for Refused {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Refused::Vcpus(n) => {
                write!(f, "the checkpoint has {n} vCPUs; VMs here have 1 to {}", crate::devices::MAX_VCPUS)
            }
            Refused::VcpuRecords { records, machine } => {
                write!(f, "the checkpoint has {records} vCPU records but its machine record describes {machine} vCPUs")
            }
            Refused::RamLayout => f.write_str("the checkpoint's RAM is not laid out as a VM of its size here"),
            Refused::Machine => f.write_str("the checkpoint's machine record is missing or does not decode"),
            Refused::MachineVersion(v) => {
                write!(
                    f,
                    "the checkpoint's machine record is version {v}; this hypervisor reads version {MACHINE_VERSION} \
                     (and {MACHINE_VERSION_ONE_VCPU}, {MACHINE_VERSION_NO_CPUID})"
                )
            }
            Refused::Cpuid(what) => {
                f.write_str("the checkpoint's pinned CPUID shows what this host cannot give its guests: ")?;
                let mut sep = "";
                for w in what {
                    write!(f, "{sep}{w}")?;
                    sep = "; ";
                }
                Ok(())
            }
            Refused::Protocol(p) => write!(f, "the checkpoint's boot protocol {p:?} is unknown"),
            Refused::NoVcpu => f.write_str("the checkpoint holds no vCPU state"),
            Refused::Devices(e) => write!(f, "{e}"),
            Refused::Memory(e) => write!(f, "restoring RAM: {e}"),
            Refused::LazyIndex { bytes } => {
                write!(f, "no heap for a lazy restore's page index ({} KiB); restore it eagerly", bytes.div_ceil(1024))
            }
        }
    }
}

impl<B: Backend> Manager<B> {
    /// Write VM `id`'s whole state to `sink`. The VM does not run meanwhile
    /// (the console runs on the one CPU the VMs share), so the checkpoint
    /// is the VM at one instruction boundary; it goes on afterwards.
    /// Swapped-out pages are brought back in to be read. (A paused save;
    /// `save_job` has the steps and the live save.)
    pub fn save_vm<S: Sink>(&mut self, id: u32, mut sink: S) -> Result<(S, Stats), Error> {
        let mut job = self.begin_save(id, false)?;
        while !self.save_step(&mut job, u64::MAX, &mut sink)? {}
        let saved = self.finish_save(job, &mut sink)?;
        Ok((sink, saved.stats))
    }

    /// Build a new VM from the checkpoint in `src` and start it; its id.
    /// Every record is checked as it is applied to the new VM, which has
    /// not run: on any refusal it is freed and nothing else changed.
    pub fn restore_vm<R: Source>(&mut self, src: R) -> Result<u32, Error> {
        self.restore_vm_with_disk(src, None)
    }

    /// As [`Self::restore_vm`]; the VM's disk image (the checkpoint names
    /// it) first gets the contents of image `disk_snapshot`, if given: the
    /// disk as it was when the checkpoint was taken.
    pub fn restore_vm_with_disk<R: Source>(&mut self, src: R, disk_snapshot: Option<&str>) -> Result<u32, Error> {
        self.restore(src, disk_snapshot, None)
    }

    /// As [`Self::restore_vm_with_disk`], lazily: the stream is read and
    /// checked whole as for an eager restore (a damaged checkpoint is
    /// refused before the VM exists), vCPU, devices, zero and poisoned
    /// pages are applied, and the pages whose content is data start not
    /// loaded: the VM runs at once and they come from `from.store` (the
    /// checkpoint's extent, stream byte 0 at its block 0) when touched, or
    /// from the background fill ([`Self::lazy_fill_round`]).
    pub fn restore_vm_lazy<R: Source>(
        &mut self,
        src: R,
        disk_snapshot: Option<&str>,
        from: LazyFrom,
    ) -> Result<u32, Error> {
        self.restore(src, disk_snapshot, Some(from))
    }

    fn restore<R: Source>(
        &mut self,
        src: R,
        disk_snapshot: Option<&str>,
        lazy: Option<LazyFrom>,
    ) -> Result<u32, Error> {
        let requested = self.backend.as_ref().map_or(0, |b| b.now());
        let mut reader = Reader::open(src).map_err(Error::Stream)?;
        let header = reader.header().clone();
        let mem_mib = check_shape(&header)?;
        // Before the VM's memory: a host short of heap refuses here.
        let mut index = match &lazy {
            Some(_) => Some(
                migrate::index::PageIndex::new(&header)
                    .map_err(|e| Error::Checkpoint(Refused::LazyIndex { bytes: e.bytes }))?,
            ),
            None => None,
        };
        let mut rb = self.begin_rebuild(&header, mem_mib, requested)?;
        let result = self.with_rebuild_sink(&mut rb, |sink| match index.as_mut() {
            // Data pages are only indexed: they stay on disk.
            Some(index) => migrate::index::index(&mut reader, index, sink),
            None => reader.apply(sink),
        });
        let result = result.and_then(|r| {
            r.map_err(|e| match e {
                migrate::ApplyError::Stream(e) => Error::Stream(e),
                migrate::ApplyError::Sink { error, .. } => Error::Checkpoint(error),
            })
        });
        if let Err(e) = result {
            self.abandon_rebuild(rb);
            return Err(e);
        }
        self.finish_rebuild(rb, disk_snapshot, lazy.zip(index))
    }

    /// A new VM of `header`'s shape (`mem_mib` from [`check_shape`]): its
    /// memory and devices, empty, for the stream's records to fill
    /// ([`Self::with_rebuild_sink`]). It takes id `self.next_id` (the
    /// caller reserves it if other VMs may start meanwhile).
    pub(super) fn begin_rebuild(&mut self, header: &Header, mem_mib: u32, requested: u64) -> Result<Rebuild<B>, Error> {
        let with_rng = header.devices.iter().any(|d| d.name == "virtio-rng");
        // The device's slot and ACPI entry now; its image once the machine
        // record names it.
        let with_blk = header.devices.iter().any(|d| d.name == "virtio-blk");
        // The NIC's slot now; its MAC comes with its state, its switch
        // with the machine record.
        let with_net = header.devices.iter().any(|d| d.name == "virtio-net");
        let id = self.next_id;
        if with_net {
            super::switch_port(id)?;
        }
        let nic = with_net.then(|| crate::net::switch::mac_for(id, 0));
        let vcpus = header.vcpus as usize;
        let (mem, devices, node) =
            self.machine(id, mem_mib, with_rng, with_blk.then(HostDisk::detached), nic, vcpus)?;
        let got = Collected { vcpus: alloc::vec![None; vcpus], ..Default::default() };
        Ok(Rebuild { id, requested, mem, devices, node, with_blk, with_net, got })
    }

    /// Runs `f` with the sink that applies records to `rb` (its RAM, and
    /// its vCPU, machine and device records kept for the finish).
    pub(super) fn with_rebuild_sink<T>(
        &mut self,
        rb: &mut Rebuild<B>,
        f: impl for<'x, 'h> FnOnce(&mut Restore<'x, 'h, B::Format, B::Mem>) -> T,
    ) -> Result<T, Error> {
        let backend = self.backend.as_mut().map_err(|why| Error::NoVirtualization(why.clone()))?;
        let alloc = backend.mem();
        let Rebuild { id, mem, got, .. } = rb;
        Ok(self.host_mem.with_hooks(*id, |hooks| f(&mut Restore { mem, alloc, hooks, got })))
    }

    /// Gives up a VM being rebuilt: its memory goes back, nothing else
    /// changed.
    pub(super) fn abandon_rebuild(&mut self, rb: Rebuild<B>) {
        if let Ok(backend) = self.backend.as_mut() {
            free_memory(backend, &mut self.host_mem, rb.id, rb.mem);
        }
    }

    /// Every record was applied: build the VM and start it; its id. On a
    /// refusal its memory is freed.
    pub(super) fn finish_rebuild(
        &mut self,
        rb: Rebuild<B>,
        disk_snapshot: Option<&str>,
        lazy: Option<(LazyFrom, migrate::index::PageIndex)>,
    ) -> Result<u32, Error> {
        let Rebuild { id, requested, mut mem, mut devices, node, with_blk, with_net, got } = rb;
        let Collected { vcpus: states, machine, devices: saved, .. } = got;
        let index = lazy.as_ref().map(|(_, i)| i);
        let backend = self.backend.as_mut().map_err(|why| Error::NoVirtualization(why.clone()))?;
        let fail = |backend: &mut B, host: &mut crate::memory::HostMemory, mem, e| {
            free_memory(backend, host, id, mem);
            Err(e)
        };
        // Every record passed: the pages a record holds start not loaded
        // (they keep their frames; the first touch fills them). The VM has
        // not run, so no TLB holds its translations.
        if let Some(index) = index {
            let alloc = backend.mem();
            for (gfn, pages) in index.held_runs() {
                if let Err(e) = mem.mark_not_loaded(alloc, GuestPhysAddr(gfn << 12), pages << 12, &mut |_| {}) {
                    return fail(backend, &mut self.host_mem, mem, Error::Checkpoint(Refused::Memory(e)));
                }
            }
        }
        let Some(machine) = machine else {
            return fail(backend, &mut self.host_mem, mem, Error::Checkpoint(Refused::Machine));
        };
        // The stream's checker saw every vCPU index once; the machine
        // record must describe as many.
        let Some(mut states) = states.into_iter().collect::<Option<Vec<GuestState>>>() else {
            return fail(backend, &mut self.host_mem, mem, Error::Checkpoint(Refused::NoVcpu));
        };
        if machine.vcpus.len() != states.len() {
            let (records, machine) = (states.len() as u32, machine.vcpus.len() as u32);
            return fail(
                backend,
                &mut self.host_mem,
                mem,
                Error::Checkpoint(Refused::VcpuRecords { records, machine }),
            );
        }
        let Some(protocol) = protocol(&machine.protocol) else {
            return fail(backend, &mut self.host_mem, mem, Error::Checkpoint(Refused::Protocol(machine.protocol)));
        };
        // A pinned VM runs natively what its table shows: this host must
        // offer all of it.
        if let Some(table) = machine.cpuid.table() {
            let missing =
                table.unsupported(|l, s| crate::cpuid::guest_cpuid(l, s, backend.host_cpuid(l, s), backend.quirks()));
            if !missing.is_empty() {
                return fail(backend, &mut self.host_mem, mem, Error::Checkpoint(Refused::Cpuid(missing)));
            }
        }
        match (&machine.disk, with_blk) {
            (Some(name), true) => match disk_snapshot
                .map_or(Ok(()), |snap| self.copy_image(name, snap))
                .and_then(|()| self.open_disk(name))
            {
                Ok(disk) => {
                    devices.attach_block_backend(disk);
                }
                Err(e) => {
                    let backend = self.backend.as_mut().map_err(|why| Error::NoVirtualization(why.clone()))?;
                    return fail(backend, &mut self.host_mem, mem, e);
                }
            },
            (None, false) => {}
            _ => return fail(backend, &mut self.host_mem, mem, Error::Checkpoint(Refused::Machine)),
        }
        // A NIC is always on a switch, and only a NIC is.
        if machine.net.is_some() != with_net {
            let backend = self.backend.as_mut().map_err(|why| Error::NoVirtualization(why.clone()))?;
            return fail(backend, &mut self.host_mem, mem, Error::Checkpoint(Refused::Machine));
        }
        let backend = self.backend.as_mut().map_err(|why| Error::NoVirtualization(why.clone()))?;
        // The guest's clock and TSC go on from the saved readings.
        let (hz, now) = (backend.tsc_hz(), backend.now());
        let clock_offset_ns = (i128::from(machine.clock_ns) - i128::from(crate::vm::exit::ticks_to_ns(now, hz)))
            .clamp(i64::MIN.into(), i64::MAX.into()) as i64;
        // vCPU 0's TSC is the guest's; the others keep their distance
        // from it (a guest may have written one vCPU's TSC).
        let saved_tsc0 = states[0].tsc_offset;
        for s in &mut states {
            s.tsc_offset = machine.guest_tsc.wrapping_sub(now).wrapping_add(s.tsc_offset.wrapping_sub(saved_tsc0));
        }
        let phys_bits = backend.host_cpuid(0x8000_0008, 0).eax as u8;
        let dev_tsc = device_tsc_offset(states[0].tsc_offset, hz, clock_offset_ns);
        devices.set_cpu(dev_tsc, hz, phys_bits.clamp(36, 52));
        if let Err(e) = devices.restore(&saved) {
            return fail(backend, &mut self.host_mem, mem, Error::Checkpoint(Refused::Devices(e)));
        }
        // The NIC keeps the MAC its guest saw. The VM it was saved from may
        // still run with it: refuse rather than put one address on two
        // ports.
        if let Some(mac) = devices.virtio_net().map(|n| n.mac())
            && let Some(other) =
                self.vms.iter().find(|v| v.res.is_some() && v.devices.virtio_net().is_some_and(|n| n.mac() == mac))
        {
            return fail(backend, &mut self.host_mem, mem, Error::MacInUse { mac, id: other.id });
        }
        devices.set_tsc_offset(dev_tsc);
        // Each vCPU where it was: its registers, its scheduling state, the
        // IPIs it had not acted on yet.
        let mut slots = Vec::with_capacity(states.len());
        for (i, (state, sched)) in states.iter().zip(&machine.vcpus).enumerate() {
            match backend.create_vcpu(mem.root_for_vcpu(i), state) {
                Ok(v) => {
                    let (run, irq_off) = sched.state();
                    let mut slot = crate::vm::VcpuSlot::new(v, run);
                    slot.halted_irq_off = irq_off;
                    slots.push(slot);
                    devices.set_signals(i, sched.signals());
                }
                Err(e) => {
                    for s in slots {
                        backend.destroy_vcpu(s.vcpu);
                    }
                    return fail(backend, &mut self.host_mem, mem, Error::Vcpu(e));
                }
            }
        }
        let res = match Resources::<B>::with_vcpus(mem, slots) {
            Ok(r) => r,
            // Never: the header has 1 to MAX_VCPUS vCPUs.
            Err(mem) => return fail(backend, &mut self.host_mem, *mem, Error::Checkpoint(Refused::NoVcpu)),
        };
        devices.update_lines(vm_ns(now, hz, clock_offset_ns));
        let overhead = res.vcpus.iter().map(|s| s.vcpu.overhead_bytes()).sum::<u64>()
            + res.mem.memory_report().overhead_bytes()
            + core::mem::size_of::<Vm<B>>() as u64;
        let reclaim = VmReclaim { no_swap: self.host_mem.add_vm(id, res.mem.pages()).err(), ..Default::default() };
        // From here on nothing fails: the source joins the VM's hooks
        // before anything (the balloon below, the guest) touches its RAM.
        let on_disk = res.mem.state_counts().not_loaded;
        let lazy_progress = match lazy {
            Some((from, index)) => {
                let mut source = LazySource::new(from.checkpoint, from.store, index, from.fill_rate);
                source.progress.pages_at_start = on_disk;
                source.progress.on_disk = on_disk;
                source.next_fill_tsc = now;
                let progress = source.progress;
                if on_disk > 0 {
                    self.host_mem.lazy.insert(id, source);
                }
                Some(LazyProgress { complete: on_disk == 0, ..progress })
            }
            _ => None,
        };
        let mut vm = Box::new(Vm {
            id,
            guest: machine.guest,
            protocol,
            mem_bytes: machine.mem_bytes,
            cmdline: machine.cmdline,
            modules: machine.modules,
            reboots: machine.reboots,
            state: RunState::Running,
            stats: VmStats { started_tsc: now, requested_tsc: requested, lazy: lazy_progress, ..Default::default() },
            devices,
            timer_tick: u64::MAX,
            clock_offset_ns,
            paused: false,
            throttle: Default::default(),
            created: false,
            image: machine.image,
            msrs: MsrState { mtrr_def_type: machine.mtrr_def_type, misc_enable: machine.misc_enable },
            overhead_bytes: overhead,
            nested_pages: super::nested_leaves(&res.mem, &*backend.mem(), machine.mem_bytes),
            reclaim,
            node,
            cpuid: machine.cpuid,
            next_vcpu: 0,
            ipi_waiting: 0,
            res: Some(res),
        });
        vm.timers_changed(hz);
        // Balloon chains held at the save: their actions apply here (the
        // device saved them), then the chains go back to the driver.
        if vm.devices.balloon_needs_service() {
            let backend = self.backend.as_mut().map_err(|why| Error::NoVirtualization(why.clone()))?;
            vm.service_balloon(backend, &mut self.host_mem);
        }
        self.next_id = self.next_id.max(id + 1);
        self.vms.push(vm);
        if let (Some(net), Ok(port)) = (machine.net, crate::net::switch::PortId::try_from(id)) {
            self.switches.entry(net).or_default().attach(port, false);
            // Switches (this one, those beyond its uplink) learn the VM's
            // MAC here before it runs: it may have been elsewhere.
            self.announce(id);
        }
        self.forget_old_records();
        Ok(id)
    }
}

/// The stream's VM shape checked against what VMs here are: 1 to
/// `MAX_VCPUS` vCPUs, RAM laid out as for a VM of its size. Its RAM in MiB.
pub(super) fn check_shape(header: &Header) -> Result<u32, Error> {
    if !(1..=crate::devices::MAX_VCPUS).contains(&(header.vcpus as usize)) {
        return Err(Error::Checkpoint(Refused::Vcpus(header.vcpus)));
    }
    let ram_bytes: u64 = header.ram.iter().map(|r| r.size).sum();
    let (ranges, n) = crate::vm::boot::ram_ranges(ram_bytes);
    let ours: Vec<RamRange> = ranges[..n].iter().map(|r| RamRange { base: r.start, size: r.end - r.start }).collect();
    if ours != header.ram || !ram_bytes.is_multiple_of(1 << 20) {
        return Err(Error::Checkpoint(Refused::RamLayout));
    }
    u32::try_from(ram_bytes >> 20).map_err(|_| Error::MemSize)
}

/// A VM being rebuilt from a stream (a restore, or a migration's
/// destination while the stream arrives): memory and devices made, not
/// yet a VM; nothing of it runs.
pub struct Rebuild<B: Backend> {
    pub(super) id: u32,
    requested: u64,
    mem: GuestMemory<B::Format>,
    devices: crate::devices::DeviceSet,
    node: Option<u32>,
    with_blk: bool,
    with_net: bool,
    got: Collected,
}

impl<B: Backend> Rebuild<B> {
    /// The stream's resume record was applied: with post-copy, the VM
    /// runs from here on while its pending pages follow.
    pub(super) fn resumed(&self) -> bool {
        self.got.resumed
    }
}

/// What the records gave besides RAM, kept until the VM is built.
#[derive(Default)]
struct Collected {
    /// Each vCPU's registers by index (the checker allows each index below
    /// the header's count once).
    vcpus: Vec<Option<GuestState>>,
    machine: Option<MachineState>,
    devices: Vec<SavedDevice>,
    /// Shared contents by id: the first page that had it (a map: a hostile
    /// stream may hold many ids and many references).
    shared: BTreeMap<u32, u64>,
    /// The resume record came (live migration): the VM may run now.
    resumed: bool,
}

/// Where a lazily restored VM's pages come from: the checkpoint (named in
/// reports and protected from deletion while in use) and its extent as a
/// block store, stream byte 0 at block 0.
pub struct LazyFrom {
    pub checkpoint: String,
    pub store: Box<dyn mm::swap::BlockStore>,
    /// Background fill rate, pages per second (0: pages load only when
    /// touched).
    pub fill_rate: u32,
}

/// Applies a checkpoint to a new VM's RAM and collects its vCPU, machine
/// and device records.
pub(super) struct Restore<'a, 'h, F: mm::paging::EntryFormat, A: mm::hal::ContiguousAlloc> {
    mem: &'a mut GuestMemory<F>,
    alloc: &'a mut A,
    hooks: &'a mut mm::vm_memory::Hooks<'h, mm::swap::SwapSlot>,
    got: &'a mut Collected,
}

impl<F: mm::paging::EntryFormat, A: mm::hal::ContiguousAlloc> Restore<'_, '_, F, A> {
    fn write(&mut self, gfn: u64, data: &[u8]) -> Result<(), Refused> {
        let gpa = GuestPhysAddr(gfn.checked_mul(4096).ok_or(Refused::RamLayout)?);
        // The VM has not run: no TLB holds its translations.
        self.mem.write(self.alloc, self.hooks, gpa, data, &mut |_| {}).map_err(Refused::Memory)
    }
}

impl<F: mm::paging::EntryFormat, A: mm::hal::ContiguousAlloc> Apply for Restore<'_, '_, F, A> {
    type Error = Refused;

    fn vcpu(&mut self, index: u32, state: GuestState) -> Result<(), Refused> {
        // The reader's checker refuses an index past the header's count
        // before this sees it; refused here too rather than trusted.
        let slot = self.got.vcpus.get_mut(index as usize).ok_or(Refused::Vcpus(index.saturating_add(1)))?;
        *slot = Some(state);
        Ok(())
    }

    fn device(&mut self, name: &str, version: u16, bytes: &[u8]) -> Result<(), Refused> {
        if name == MACHINE {
            self.got.machine = Some(MachineState::decode(version, bytes)?);
        } else {
            self.got.devices.push(SavedDevice { name: String::from(name), version, bytes: bytes.to_vec() });
        }
        Ok(())
    }

    fn large_run(&mut self, _: u64, _: u32) -> Result<(), Refused> {
        // The new VM's RAM is mapped with the largest pages alignment
        // allows already; the run's pages follow.
        Ok(())
    }

    fn pages(&mut self, gfn: u64, data: &[u8]) -> Result<(), Refused> {
        self.write(gfn, data)
    }

    fn zero(&mut self, gfn: u64, pages: u32) -> Result<(), Refused> {
        const ZEROS: [u8; 4096] = [0; 4096];
        for p in 0..u64::from(pages) {
            self.write(gfn + p, &ZEROS)?;
        }
        Ok(())
    }

    fn shared(&mut self, gfn: u64, id: u32, data: &[u8; migrate::PAGE_SIZE]) -> Result<(), Refused> {
        self.write(gfn, data)?;
        self.got.shared.insert(id, gfn);
        Ok(())
    }

    fn shared_ref(&mut self, gfn: u64, id: u32) -> Result<(), Refused> {
        // The content is in the new VM already, at the first page that had
        // it: copy it from there (sharing merges them again later).
        let first = *self.got.shared.get(&id).ok_or(Refused::RamLayout)?;
        let mut page = [0u8; 4096];
        let from = GuestPhysAddr(first * 4096);
        self.mem.read(self.alloc, self.hooks, from, &mut page, &mut |_| {}).map_err(Refused::Memory)?;
        self.write(gfn, &page)
    }

    fn poisoned(&mut self, gfn: u64) -> Result<(), Refused> {
        let gpa = GuestPhysAddr(gfn.checked_mul(4096).ok_or(Refused::RamLayout)?);
        self.mem.mark_poisoned(self.alloc, self.hooks, gpa, &mut |_| {}).map_err(Refused::Memory)
    }

    fn pending(&mut self, gfn: u64, pages: u32) -> Result<(), Refused> {
        // Post-copy: what arrived of these pages before (a pre-copy round)
        // is stale; they come after the resume record. Until then the
        // guest must not see them: not loaded, filled on arrival
        // (`memory::postcopy`). The VM has not run: no TLB to flush.
        let gpa = GuestPhysAddr(gfn.checked_mul(4096).ok_or(Refused::RamLayout)?);
        self.mem.mark_not_loaded(self.alloc, gpa, u64::from(pages) << 12, &mut |_| {}).map_err(Refused::Memory)?;
        Ok(())
    }

    fn resume(&mut self) -> Result<(), Refused> {
        self.got.resumed = true;
        Ok(())
    }
}
