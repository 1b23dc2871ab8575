//! The VM manager: starts VMs from the ramdisk's guest images, runs them
//! time-sliced on this CPU, stops them, and answers for them. Generic over
//! the backend, so the whole lifecycle is tested on the host with scripted
//! vCPUs and simulated memory.

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::RefCell;
use core::sync::atomic::Ordering;
use mm::GuestPhysAddr;
use mm::GuestRam;
use mm::paging::PageSize;
use mm::vm_memory::{MemoryMap, ScanReport, VmMemoryConfig};
use vcpu::Vcpu;

use crate::backend::{Backend, Unavailable};
use crate::devices::virtio_slots::{HostDisk, HostEntropy};
use crate::disk::image::Image;
use crate::disk::space::ExtentKind;
use crate::firmware;
use crate::loader::{GuestWrite, GuestWriteError};
use crate::memory::reclaim::{self, VmReclaim};
use crate::memory::{GuestMemory, HostMemory, MIN_TARGET_PAGES};
use crate::net::switch::{self, PortId, Switch};
use crate::vm::exit::Console;
#[cfg(test)]
use crate::vm::exit::Flow;
use crate::vm::{Resources, RunState, Vm, VmStats, boot};

mod error;
pub use error::{DiskRefusal, Error};
pub use migration::postcopy::PostcopyState;

/// The VM this CPU is running or handling an exit for, if any.
pub fn current_vm() -> Option<u32> {
    match vcpu::cpu_local::get().current_vm.load(Ordering::Relaxed) {
        0 => None,
        id => Some(id),
    }
}

/// A guest image from the ramdisk.
#[derive(Clone, Debug)]
pub struct GuestImage {
    pub name: String,
    pub bytes: &'static [u8],
}

pub const DEFAULT_MEM_MIB: u32 = 16;
/// `vm run`'s memory for a Linux kernel: Debian's cloud kernel needs about
/// 54 MiB to decompress into, and its shell and modules room beyond that.
pub const LINUX_MEM_MIB: u32 = 256;
/// `vm run`'s command line for a Linux kernel.
pub const LINUX_CMDLINE: &str = "console=ttyS0";
/// The shortest slice armed for a timer that is due (or nearly): long
/// enough for the guest to make progress between timer exits.
const MIN_SLICE_TICKS: u64 = 1000;
pub const MIN_MEM_MIB: u32 = 2;
pub const MAX_MEM_MIB: u32 = 65536;
/// Host heap a new VM must leave free (console, reports, sharing index).
pub const HEAP_RESERVE: u64 = 2 << 20;
/// Ended VMs kept for `vm list` before the oldest are forgotten.
pub const MAX_ENDED_RECORDS: usize = 64;

/// A VM's memory, devices and NUMA node, built before its vCPU.
type Machine<B> = (GuestMemory<<B as Backend>::Format>, crate::devices::DeviceSet, Option<u32>);

pub struct Manager<B: Backend> {
    /// The backend, or why there is none (no VT-x/AMD-V, disabled...).
    pub backend: Result<B, Unavailable>,
    pub images: Vec<GuestImage>,
    pub vms: Vec<Box<Vm<B>>>,
    next_id: u32,
    cursor: usize,
    /// TSC ticks per time slice.
    pub slice_ticks: u64,
    /// Sharing, swap and reclaim, for all VMs.
    pub host_mem: HostMemory,
    /// The host's Unix time when its clock (`Backend::now`) was 0: what
    /// guests' real-time clocks start from.
    pub host_epoch: u64,
    /// What host machine checks did (`machine_check`).
    pub machine_checks: machine_check::MachineCheckStats,
    /// The host's entropy (RDRAND), if it has any: each VM then gets a
    /// virtio-rng device that draws from it.
    pub entropy: Option<HostEntropy>,
    /// The host's switches by name (`net=<name>`), each made when a first
    /// VM joins it. A VM's port is its id; it is attached while the VM
    /// lives (a reset included) and detached when it ends.
    pub switches: BTreeMap<String, Switch>,
    /// The live save in progress (`vm save ... live`), one at a time.
    pub live_save: Option<save_job::LiveSave>,
    /// The host's NUMA nodes (none without an SRAT): where VMs go.
    pub numa: crate::numa::Topology,
    /// Live migrations to and from this host (`vm migrate`, `migrate listen`).
    pub migration: migration::Migrations<B>,
    /// What the scheduler's rounds cost (`host`).
    pub sched: rounds::SchedStats,
    /// The switch whose uplink the host's NIC is (`net uplink`), and the
    /// frames its VMs sent to the host side, for the next `uplink_round`.
    pub uplink: uplink::Uplink,
}

/// What Linux is told about its TSC, unless its command line says
/// otherwise (Linux's kernel-parameters.txt):
/// - `tsc_early_khz=`: its rate. Linux calibrates the TSC against the PIT or
///   the PM timer, which fails when every read of them is a slow exit
///   (nested emulation); AMD CPUs have no CPUID leaf for the rate and
///   Intel's 0x15 is often absent.
/// - `tsc=reliable`: no clocksource watchdog. The guest's TSC is the host's
///   plus a constant, and the timers the watchdog would check it against
///   (PIT, PM timer) are emulated from that same TSC, so the watchdog can
///   only ever see the VM not being run for a while, and would then switch
///   the guest to a jiffies clock for good.
pub fn linux_timing_hints(cmdline: &str, tsc_hz: u64) -> String {
    let mut line = String::from(cmdline);
    let given = |key: &str| cmdline.split_whitespace().any(|w| w.starts_with(key));
    if !given("tsc_early_khz=") {
        line.push_str(&format!(" tsc_early_khz={}", tsc_hz / 1000));
    }
    if !given("tsc=") {
        line.push_str(" tsc=reliable");
    }
    String::from(line.trim_start())
}

impl<B: Backend> Manager<B> {
    pub fn new(mut backend: Result<B, Unavailable>, images: Vec<GuestImage>) -> Self {
        let slice_ticks = backend.as_ref().map_or(1_000_000, |b| (b.tsc_hz() / 100).max(10_000));
        let mut host_mem = HostMemory::default();
        if let Ok(b) = backend.as_mut() {
            // The zero frame is the host's, not any VM's: take it up front
            // (`run_vm` retries if this fails).
            let _ = host_mem.ensure_sharing(b.mem());
        }
        Manager {
            backend,
            images,
            vms: Vec::new(),
            next_id: 1,
            cursor: 0,
            slice_ticks,
            host_mem,
            host_epoch: 0,
            machine_checks: Default::default(),
            entropy: None,
            switches: BTreeMap::new(),
            live_save: None,
            numa: crate::numa::Topology::default(),
            migration: Default::default(),
            sched: Default::default(),
            uplink: Default::default(),
        }
    }

    /// The VM whose virtio-blk device serves data-disk image `name`, if
    /// one that has not ended does: `disk delete` refuses to free it and
    /// no second VM may attach it.
    pub fn disk_user(&self, name: &str) -> Option<u32> {
        self.vms
            .iter()
            .find(|v| v.res.is_some() && v.devices.block_disk().is_some_and(|(n, _)| n == name))
            .map(|v| v.id)
    }

    /// Makes image `disk` hold exactly what image `from` holds (a
    /// checkpoint's disk snapshot taken or put back). `disk` must not be in
    /// use by a VM; `from` may be (the VM is not running: the console and
    /// the VMs share one CPU).
    pub fn copy_image(&self, disk: &str, from: &str) -> Result<(), Error> {
        let refuse = |name: &str, why| Error::Disk { name: String::from(name), why: Box::new(why) };
        let Some(space) = self.host_mem.space.as_ref() else {
            return Err(refuse(disk, DiskRefusal::NoDataDisk(self.host_mem.swap_missing.clone())));
        };
        if let Some(id) = self.disk_user(disk) {
            return Err(refuse(disk, DiskRefusal::InUse(id)));
        }
        let open = |name: &str| {
            match space.get(name) {
                Ok(info) if info.kind == ExtentKind::Image => {}
                Ok(info) => return Err(refuse(name, DiskRefusal::NotAnImage(info.kind.name()))),
                Err(_) => return Err(refuse(name, DiskRefusal::NotFound)),
            }
            let store = space.extent_store(name).map_err(|_| refuse(name, DiskRefusal::NotFound))?;
            Image::open(store).map_err(|e| refuse(name, DiskRefusal::Image(e)))
        };
        let (mut dst, mut src) = (open(disk)?, open(from)?);
        dst.copy_from(&mut src).map_err(|e| refuse(disk, DiskRefusal::Image(e)))
    }

    /// Opens data-disk image `name` for a VM's virtio-blk device: it must
    /// be an image (`disk create`) that no other VM uses.
    pub fn open_disk(&self, name: &str) -> Result<HostDisk, Error> {
        let refuse = |why| Err(Error::Disk { name: String::from(name), why: Box::new(why) });
        let Some(space) = self.host_mem.space.as_ref() else {
            return refuse(DiskRefusal::NoDataDisk(self.host_mem.swap_missing.clone()));
        };
        let info = match space.get(name) {
            Ok(info) => info,
            Err(_) => return refuse(DiskRefusal::NotFound),
        };
        if info.kind != ExtentKind::Image {
            return refuse(DiskRefusal::NotAnImage(info.kind.name()));
        }
        if let Some(id) = self.disk_user(name) {
            return refuse(DiskRefusal::InUse(id));
        }
        let store = match space.extent_store(name) {
            Ok(s) => s,
            Err(_) => return refuse(DiskRefusal::NotFound),
        };
        match Image::open(store) {
            Ok(image) => Ok(HostDisk { name: String::from(name), disk: Rc::new(RefCell::new(image)) }),
            Err(e) => refuse(DiskRefusal::Image(e)),
        }
    }

    pub fn get(&self, id: u32) -> Option<&Vm<B>> {
        self.vms.iter().find(|v| v.id == id).map(|b| &**b)
    }

    pub fn any_runnable(&self) -> bool {
        self.vms.iter().any(|v| v.state.runnable())
    }

    /// Starts guest `name` with `mem_mib` MiB of RAM; returns its id.
    pub fn run_vm(&mut self, name: &str, mem_mib: u32, cmdline: &str) -> Result<u32, Error> {
        self.run_vm_with(name, mem_mib, &[], cmdline)
    }

    /// What `vm run` left out, by the kind of guest. A Linux kernel gets
    /// `LINUX_MEM_MIB`, the file `<name>-initrd` as its initramfs when the
    /// image carries one, and `console=ttyS0` (its shell on COM1); other
    /// guests `DEFAULT_MEM_MIB`, no modules and an empty command line.
    pub fn run_defaults(
        &self,
        name: &str,
        mem_mib: Option<u32>,
        modules: &[String],
        cmdline: Option<&str>,
    ) -> Result<(u32, Vec<String>, String), Error> {
        let image = self.image(name)?;
        if !crate::loader::linux::is_linux(image) {
            return Ok((mem_mib.unwrap_or(DEFAULT_MEM_MIB), modules.to_vec(), cmdline.unwrap_or("").into()));
        }
        let initrd = format!("{name}-initrd");
        let modules = if modules.is_empty() && self.images.iter().any(|g| g.name == initrd) {
            alloc::vec![initrd]
        } else {
            modules.to_vec()
        };
        Ok((mem_mib.unwrap_or(LINUX_MEM_MIB), modules, cmdline.unwrap_or(LINUX_CMDLINE).into()))
    }

    /// The bytes of ramdisk file `name`.
    pub fn image_bytes(&self, name: &str) -> Option<&'static [u8]> {
        self.images.iter().find(|g| g.name == name).map(|g| g.bytes)
    }

    fn image(&self, name: &str) -> Result<&'static [u8], Error> {
        self.images.iter().find(|g| g.name == name).map(|g| g.bytes).ok_or_else(|| Error::NoGuest {
            name: String::from(name),
            available: self.images.iter().map(|g| g.name.clone()).collect(),
        })
    }

    /// As `run_vm`, passing ramdisk files as Multiboot modules.
    pub fn run_vm_with(&mut self, name: &str, mem_mib: u32, modules: &[String], cmdline: &str) -> Result<u32, Error> {
        self.run_vm_with_disk(name, mem_mib, modules, cmdline, None)
    }

    /// As `run_vm_with`, with data-disk image `disk` as the VM's virtio-blk
    /// disk (`/dev/vda` in a Linux guest).
    pub fn run_vm_with_disk(
        &mut self,
        name: &str,
        mem_mib: u32,
        modules: &[String],
        cmdline: &str,
        disk: Option<&str>,
    ) -> Result<u32, Error> {
        self.run_vm_with_nic(name, mem_mib, modules, cmdline, disk, None)
    }

    /// As `run_vm_with_disk`, with a virtio-net NIC (`eth0` in a Linux
    /// guest) on switch `net` when given: its MAC is
    /// `switch::mac_for(id, 0)`, its port the VM's id.
    pub fn run_vm_with_nic(
        &mut self,
        name: &str,
        mem_mib: u32,
        modules: &[String],
        cmdline: &str,
        disk: Option<&str>,
        net: Option<&str>,
    ) -> Result<u32, Error> {
        self.run_vm_smp(name, mem_mib, modules, cmdline, disk, net, 1)
    }

    /// As `run_vm_with_nic`, with `vcpus` vCPUs (1 to
    /// [`crate::devices::MAX_VCPUS`]): vCPU 0 starts at the image's entry,
    /// the others wait for the guest's INIT and startup IPIs.
    #[allow(clippy::too_many_arguments)]
    pub fn run_vm_smp(
        &mut self,
        name: &str,
        mem_mib: u32,
        modules: &[String],
        cmdline: &str,
        disk: Option<&str>,
        net: Option<&str>,
        vcpus: u32,
    ) -> Result<u32, Error> {
        let id = self.spawn(name, mem_mib, modules, cmdline, disk, net, vcpus)?;
        if let Some(vm) = self.vms.iter_mut().find(|v| v.id == id) {
            vm.start_vcpus();
        }
        Ok(id)
    }

    /// Builds a VM and adds it, its vCPUs created but not started.
    #[allow(clippy::too_many_arguments)]
    fn spawn(
        &mut self,
        name: &str,
        mem_mib: u32,
        modules: &[String],
        cmdline: &str,
        disk: Option<&str>,
        net: Option<&str>,
        vcpus: u32,
    ) -> Result<u32, Error> {
        if !(1..=crate::devices::MAX_VCPUS as u32).contains(&vcpus) {
            return Err(Error::VcpuCount(vcpus));
        }
        let id = self.next_id;
        let port = net.map(|_| switch_port(id)).transpose()?;
        let disk = disk.map(|d| self.open_disk(d)).transpose()?;
        let nic = net.map(|n| self.uplink.mac_for(id, n));
        let vm = self.create_vm(id, name, mem_mib, modules, cmdline, disk, nic, vcpus as usize)?;
        self.next_id += 1;
        self.vms.push(vm);
        if let (Some(net), Some(port)) = (net, port) {
            self.switches.entry(String::from(net)).or_default().attach(port, false);
        }
        self.forget_old_records();
        Ok(id)
    }

    /// The switch VM `id`'s NIC is on, while the VM lives.
    pub fn switch_of(&self, id: u32) -> Option<&str> {
        let port = PortId::try_from(id).ok()?;
        self.switches.iter().find(|(_, s)| s.counters(port).is_some()).map(|(name, _)| name.as_str())
    }

    /// Frames VM `index` transmitted (its NIC's outbox), through its
    /// switch to the NICs of the VMs the switch names, each batch into
    /// their receive buffers at once. Frames of a VM on no switch are
    /// dropped, as a NIC without a cable sends into nothing. Frames cross
    /// VMs, so this runs between slices, never inside one VM's exit.
    fn forward_frames(&mut self, index: usize) {
        let Some(vm) = self.vms.get_mut(index) else { return };
        let mut frames = vm.devices.take_net_frames();
        if frames.is_empty() {
            return;
        }
        let Ok(port) = PortId::try_from(vm.id) else { return };
        let own_mac = vm.devices.virtio_net().map(|n| n.mac());
        // Port security on the switch that faces the LAN: a VM sends only
        // from its own MAC there, or it could pose as the host or another
        // host and have the host's traffic (a migration's memory) sent to it.
        let on_lan = self.uplink.switch.is_some() && self.switch_of(u32::from(port)) == self.uplink.switch.as_deref();
        if on_lan {
            let before = frames.len();
            frames.retain(|f| f.get(6..12) == own_mac.as_ref().map(|m| &m[..]));
            self.uplink.spoofed += (before - frames.len()) as u64;
        }
        self.send_from_port(port, frames);
    }

    /// `frames` into the switch at `port`, and out where it sends them:
    /// into VMs' receive buffers now, to the host side (NIC, host stack)
    /// at the next `uplink_round`, which the scheduler's rounds cannot reach.
    fn send_from_port(&mut self, port: PortId, frames: Vec<Vec<u8>>) {
        let Ok(backend) = self.backend.as_mut() else { return };
        let Some(sw) = self.switches.values_mut().find(|s| s.counters(port).is_some()) else { return };
        // The switch ages its table in milliseconds of host time.
        let now_ms = crate::vm::exit::ticks_to_ns(backend.now(), backend.tsc_hz()) / 1_000_000;
        let mut out = crate::net::uplink::ToVms::new();
        for f in frames {
            for p in sw.forward(port, &f, now_ms) {
                if crate::net::uplink::is_host_side(p) {
                    self.uplink.queue(p, f.clone());
                } else {
                    out.entry(p).or_default().push(f.clone());
                }
            }
        }
        self.deliver_frames(out);
    }

    /// Frames the switch sent to VM ports, each port's batch into its VM's
    /// receive buffers at once. Ports are detached when their VM ends; a
    /// port without a live VM drops what it is sent.
    fn deliver_frames(&mut self, out: crate::net::uplink::ToVms) {
        let Ok(backend) = self.backend.as_mut() else { return };
        for (p, frames) in out {
            if let Some(to) = self.vms.iter_mut().find(|v| v.id == u32::from(p) && v.res.is_some()) {
                to.virtio_net_deliver(&frames, backend, &mut self.host_mem);
            }
        }
    }

    /// The machine of a new VM `id` with `mem_mib` MiB: its RAM (the
    /// memory manager's tables checked against the host heap first), its
    /// devices (virtio-rng if `with_rng`) and the firmware's ACPI tables in
    /// the BIOS area, which is ROM as on a PC (the guest reads its tables,
    /// its writes there are dropped). What `vm run` loads an image into and
    /// `vm restore` a checkpoint.
    fn machine(
        &mut self,
        id: u32,
        mem_mib: u32,
        with_rng: bool,
        disk: Option<HostDisk>,
        nic: Option<switch::Mac>,
        vcpus: usize,
    ) -> Result<Machine<B>, Error> {
        let backend = self.backend.as_mut().map_err(|why| Error::NoVirtualization(why.clone()))?;
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&mem_mib) {
            return Err(Error::MemSize);
        }
        let entropy = match (with_rng, self.entropy) {
            (false, _) => None,
            (true, Some(e)) => Some(e),
            (true, None) => return Err(Error::NoEntropy),
        };
        let size = (mem_mib as u64) << 20;
        let config = VmMemoryConfig { id, vcpus, max_page_size: backend.max_page_size() };
        let map = MemoryMap::pc(size).map_err(Error::MemoryMap)?;
        // The memory manager's tables for this VM come from the host heap,
        // all at once: refuse the VM unless they fit with room to spare.
        let tables = GuestMemory::<B::Format>::table_bytes(&map);
        let free = backend.heap_free();
        if tables.saturating_add(HEAP_RESERVE) > free {
            return Err(Error::HeapTooSmall {
                mem_mib,
                tables_kib: tables >> 10,
                free_kib: free >> 10,
                reserve_kib: HEAP_RESERVE >> 10,
            });
        }
        self.host_mem.ensure_sharing(backend.mem()).map_err(Error::Sharing)?;
        // The VM's NUMA node (`crate::numa`): its RAM comes from there.
        let free: Vec<(u32, u64)> = self.numa.nodes.iter().map(|n| (n.id, backend.free_bytes_on(n.id))).collect();
        let node = match crate::numa::place(&self.numa, size, &free) {
            crate::numa::Placement::Node(n) => Some(n),
            crate::numa::Placement::Spread => None,
        };
        backend.prefer_node(node);
        // RAM in the largest host chunks available, mapped with the largest
        // nested pages alignment allows (2 MiB or 1 GiB where it can).
        let mem = GuestMemory::<B::Format>::new(backend.mem(), map, config);
        backend.prefer_node(None);
        let mut mem = mem.map_err(|error| Error::GuestRam { mem_mib, error })?;
        let alloc = backend.mem();
        let mut devices = crate::devices::DeviceSet::pc_smp(self.host_epoch, size, vcpus);
        if let Some(entropy) = entropy {
            devices.add_virtio_rng(entropy);
        }
        devices.add_virtio_console();
        devices.add_virtio_balloon();
        if let Some(disk) = disk {
            devices.add_virtio_blk(disk);
        }
        // After every other slot: a restore rebuilds them in this order.
        if let Some(mac) = nic {
            devices.add_virtio_net(mac);
        }
        let acpi = firmware::acpi::build(&firmware::acpi::Config {
            // APIC ID = vCPU index (`DeviceSet::pc_smp`).
            apic_ids: (0..vcpus as u8).collect(),
            ioapic: Some((crate::devices::IOAPIC_ID, crate::devices::ioapic::IOAPIC_BASE as u32)),
            lapic_address: crate::devices::lapic::DEFAULT_BASE as u32,
            ecam: Some(crate::devices::pci::ECAM_BASE),
            virtio_mmio: devices.virtio_slots(),
        });
        let _ = RamWriter { ram: mem.ram(), mem: &*alloc }.write(firmware::acpi::AREA_BASE, &acpi.bytes);
        // Nothing runs on the tables yet: nothing to flush.
        let rom = mm::GuestPhysAddr(firmware::acpi::AREA_BASE);
        if let Err(error) = mem.set_read_only(alloc, rom, firmware::acpi::AREA_LEN, &mut |_| {}) {
            free_memory(backend, &mut self.host_mem, id, mem);
            return Err(Error::GuestRam { mem_mib, error });
        }
        Ok((mem, devices, node))
    }

    /// Builds VM `id` from guest `name`: memory, image, devices (a NIC if
    /// `with_nic`), vCPU.
    #[allow(clippy::too_many_arguments)]
    fn create_vm(
        &mut self,
        id: u32,
        name: &str,
        mem_mib: u32,
        modules: &[String],
        cmdline: &str,
        disk: Option<HostDisk>,
        nic: Option<switch::Mac>,
        vcpus: usize,
    ) -> Result<Box<Vm<B>>, Error> {
        if let Err(why) = &self.backend {
            return Err(Error::NoVirtualization(why.clone()));
        }
        let image = self.image(name)?;
        let backend = self.backend.as_mut().map_err(|why| Error::NoVirtualization(why.clone()))?;
        let mut mods = Vec::with_capacity(modules.len());
        for m in modules {
            let file = self.images.iter().find(|g| &g.name == m).ok_or_else(|| Error::NoModule(m.clone()))?;
            mods.push(boot::Module { name: m.as_str(), data: file.bytes });
        }
        let hinted;
        let cmdline = if crate::loader::linux::is_linux(image) {
            hinted = linux_timing_hints(cmdline, backend.tsc_hz());
            hinted.as_str()
        } else {
            cmdline
        };
        let with_rng = self.entropy.is_some();
        let (mem, mut devices, node) = self.machine(id, mem_mib, with_rng, disk, nic, vcpus)?;
        let size = (mem_mib as u64) << 20;
        let backend = self.backend.as_mut().map_err(|why| Error::NoVirtualization(why.clone()))?;
        let alloc = backend.mem();
        let loaded = {
            let mut w = RamWriter { ram: mem.ram(), mem: &*alloc };
            boot::prepare(image, size, cmdline, &mods, id, &mut w)
                .map_err(|error| Error::Load { name: String::from(name), error })
        };
        let (mut state, protocol) = match loaded {
            Ok(v) => v,
            Err(e) => {
                free_memory(backend, &mut self.host_mem, id, mem);
                return Err(e);
            }
        };
        // The guest's TSC starts at 0 when the VM does (the backend adds the
        // offset to every RDTSC, RDTSCP and TSC read).
        state.tsc_offset = 0u64.wrapping_sub(backend.now());
        // The APs are built in the state INIT leaves, made valid for the
        // backend as started at vector 0: they wait for a SIPI (vCPU state
        // machine) and are given the real start state then.
        let mut ap_state = state.after_init();
        ap_state.start_at_sipi(0);
        let mut slots = Vec::with_capacity(vcpus);
        for i in 0..vcpus {
            match backend.create_vcpu(mem.root_for_vcpu(i), if i == 0 { &state } else { &ap_state }) {
                Ok(v) => slots.push(crate::vm::VcpuSlot::new(v, crate::vm::VcpuState::Created)),
                Err(e) => {
                    for s in slots {
                        backend.destroy_vcpu(s.vcpu);
                    }
                    free_memory(backend, &mut self.host_mem, id, mem);
                    return Err(Error::Vcpu(e));
                }
            }
        }
        let res = match Resources::<B>::with_vcpus(mem, slots) {
            Ok(r) => r,
            Err(mem) => {
                free_memory(backend, &mut self.host_mem, id, *mem);
                return Err(Error::VcpuCount(0));
            }
        };
        let mem = &res.mem;
        let overhead = res.vcpus.iter().map(|s| s.vcpu.overhead_bytes()).sum::<u64>()
            + mem.memory_report().overhead_bytes()
            + core::mem::size_of::<Vm<B>>() as u64;
        let nested_pages = nested_leaves(mem, &*backend.mem(), size);
        let phys_bits = backend.host_cpuid(0x8000_0008, 0).eax as u8;
        devices.set_cpu(state.tsc_offset, backend.tsc_hz(), phys_bits.clamp(36, 52));
        let reclaim = VmReclaim { no_swap: self.host_mem.add_vm(id, mem.pages()).err(), ..Default::default() };
        let now = backend.now();
        Ok(Box::new(Vm {
            id,
            guest: String::from(name),
            protocol,
            mem_bytes: size,
            cmdline: String::from(cmdline),
            modules: modules.to_vec(),
            reboots: 0,
            state: RunState::Running,
            // `vm run`'s time to first entry counts from the VM being
            // built (its image loaded): one clock read less on this path.
            stats: VmStats { started_tsc: now, requested_tsc: now, ..Default::default() },
            devices,
            timer_tick: u64::MAX,
            clock_offset_ns: 0,
            paused: false,
            throttle: Default::default(),
            created: false,
            image: String::from(name),
            msrs: Default::default(),
            overhead_bytes: overhead,
            nested_pages,
            reclaim,
            node,
            cpuid: Default::default(),
            next_vcpu: 0,
            ipi_waiting: 0,
            res: Some(res),
        }))
    }

    /// The guest of VM at `index` asked for a reset: the VM starts again
    /// from its image, with fresh memory and devices, under the same id
    /// (what a PC's reset does, firmware included). If it cannot be
    /// rebuilt, it ends with the reason.
    fn reboot_vm(&mut self, index: usize, console: &mut impl Console) {
        // A live save of it completes from the memory it still has.
        self.complete_live_save_of(self.vms[index].id, console);
        let Ok(backend) = self.backend.as_mut() else { return };
        let old = &mut self.vms[index];
        release(backend, &mut self.host_mem, old);
        let (id, guest, image, mem_mib, modules, cmdline) = (
            old.id,
            old.guest.clone(),
            old.image.clone(),
            (old.mem_bytes >> 20) as u32,
            old.modules.clone(),
            old.cmdline.clone(),
        );
        let (reboots, stats, paused) = (old.reboots + 1, old.stats.clone(), old.paused);
        let vcpus = old.devices.vcpu_count();
        // A reset keeps the CPU, and so the CPUID, the VM had.
        let cpuid = old.cpuid.clone();
        let attached = old.devices.com1().is_raw();
        // The same disk, as a PC's reset keeps its drives, and the same NIC
        // on the same switch.
        let disk = old.devices.block_backend();
        let nic = old.devices.virtio_net().map(|n| n.mac());
        let net = self.switch_of(id).map(String::from);
        // Whatever happens, the old guest's MACs are forgotten: the new one
        // announces itself afresh (ARP), maybe from other addresses.
        detach_port(&mut self.switches, id);
        match self.create_vm(id, &image, mem_mib, &modules, &cmdline, disk, nic, vcpus) {
            Ok(mut vm) => {
                vm.start_vcpus();
                if paused {
                    vm.pause_vcpus(true);
                }
                if let (Some(net), Ok(port)) = (net, PortId::try_from(id)) {
                    self.switches.entry(net).or_default().attach(port, false);
                }
                vm.guest = guest.clone();
                vm.cpuid = cpuid;
                vm.reboots = reboots;
                vm.stats.exits = stats.exits;
                vm.stats.run_ticks = stats.run_ticks;
                vm.paused = paused;
                // An attached terminal stays attached across the reset.
                vm.devices.com1().set_raw(attached);
                console.line(&format!("vm {id} ({guest}) restarted (reset {reboots})"));
                self.vms[index] = vm;
            }
            Err(e) => {
                let backend = self.backend.as_mut().expect("checked above");
                let reason = format!("the guest reset the machine and it could not start again: {e}");
                self.vms[index].end(RunState::Stopped { reason }, backend, console);
            }
        }
    }

    /// Stops VM `id` (if it still runs) and frees its memory; the record
    /// stays for `vm list`. During a migration's pre-copy this cancels
    /// the migration (the next migration round ends it, the destination
    /// drops its partial VM); during its switch-over it is refused (the
    /// destination may run the VM already).
    pub fn stop(&mut self, id: u32, console: &mut impl Console) -> Result<(), Error> {
        self.migration_lock(id, false)?;
        if self.vms.iter().any(|v| v.id == id && !v.state.ended()) {
            self.complete_live_save_of(id, console);
        }
        let backend = self.backend.as_mut().map_err(|why| Error::NoVirtualization(why.clone()))?;
        let vm = self.vms.iter_mut().find(|v| v.id == id).ok_or(Error::NoVm(id))?;
        if vm.state.ended() {
            return Err(Error::AlreadyEnded { id, state: vm.state.name() });
        }
        vm.end(RunState::Stopped { reason: String::from("by the operator") }, backend, console);
        release(backend, &mut self.host_mem, vm);
        detach_port(&mut self.switches, id);
        self.cancel_migration_of(id, "the VM was stopped by the operator");
        Ok(())
    }

    /// Stops every VM still running (before power-off).
    pub fn stop_all(&mut self, console: &mut impl Console) {
        let ids: Vec<u32> = self.vms.iter().filter(|v| !v.state.ended()).map(|v| v.id).collect();
        for id in ids {
            let _ = self.stop(id, console);
        }
    }

    /// A guest access of VM `faulting` found no free frame (it retries when
    /// it runs next). Get frames back: a sharing pass over every VM, then
    /// page-outs from the VMs over their entitlement, furthest over first.
    /// If that frees nothing, stop the VM furthest over its entitlement
    /// (the faulting one only if it is that VM, or no VM is over): the VM
    /// that grabbed the frames pays, not the one that asked next. A VM in
    /// a migration's switch-over is never stopped.
    pub fn relieve_memory_pressure(&mut self, faulting: u32, console: &mut impl Console) {
        if self.live_save.is_some() {
            // The live save's copies hold frames until written: writing
            // them gives the frames back, and a write waiting for a copy
            // goes on once its page is written.
            self.checkpoint_round(console);
            return;
        }
        // Never the VM in a migration's switch-over: the destination may
        // already run it, and a refused stream must find it here.
        let spared = self.switching_over();
        let Ok(backend) = self.backend.as_mut() else {
            return;
        };
        let host = &mut self.host_mem;
        host.stats.out_of_memory += 1;
        let mut freed = 0;
        for vm in self.vms.iter_mut() {
            let Some(Resources { mem, vcpus, .. }) = vm.res.as_mut() else { continue };
            let r =
                reclaim::share_step(mem, backend.mem(), host, reclaim::PRESSURE_SCAN_PAGES, usize::MAX, &mut |scope| {
                    crate::vm::flush_all(vcpus, scope)
                });
            // A first merge of two twins costs a frame for the shared copy.
            freed += r.frames_freed.saturating_sub(r.promoted);
        }
        let claims: Vec<reclaim::Claim> = self
            .vms
            .iter()
            .filter_map(|v| {
                let mem = &v.res.as_ref()?.mem;
                Some(reclaim::Claim {
                    vm: v.id,
                    configured: mem.pages(),
                    private: mem.state_counts().present,
                    target: v.reclaim.target,
                })
            })
            .collect();
        let over = reclaim::over_entitlement(&claims);
        for &(id, pages) in &over {
            let Some(vm) = self.vms.iter_mut().find(|v| v.id == id) else { continue };
            let Some(Resources { mem, vcpus, .. }) = vm.res.as_mut() else { continue };
            freed += reclaim::page_out_some(id, mem, &mut vm.reclaim, pages, backend.mem(), host, &mut |scope| {
                crate::vm::flush_all(vcpus, scope)
            });
        }
        if freed > 0 {
            return;
        }
        let (victim, reason) = match over.iter().find(|&&(id, _)| Some(id) != spared) {
            Some(&(id, pages)) => (
                id,
                format!(
                    "the host ran out of memory and nothing could be reclaimed; this VM held {pages} pages beyond its share"
                ),
            ),
            None if Some(faulting) != spared => {
                (faulting, String::from("the host ran out of memory and nothing could be reclaimed"))
            }
            None => return,
        };
        let Some(vm) = self.vms.iter_mut().find(|v| v.id == victim) else { return };
        host.stats.oom_stopped += 1;
        vm.end(RunState::Stopped { reason }, backend, console);
        release(backend, host, vm);
        detach_port(&mut self.switches, victim);
    }

    /// Memory work between scheduling rounds: a background sharing step
    /// over every live VM while sharing is on, and one round of target
    /// enforcement for VMs over their target.
    pub fn reclaim_round(&mut self) {
        self.host_reclaim_round();
        let Ok(backend) = self.backend.as_mut() else {
            return;
        };
        let host = &mut self.host_mem;
        for vm in self.vms.iter_mut() {
            let Some(Resources { mem, vcpus, .. }) = vm.res.as_mut() else { continue };
            let flush = &mut |scope| crate::vm::flush_all(vcpus, scope);
            // Targets first: their clock reads accessed bits that the
            // sharing scan's large-page analysis clears.
            reclaim::enforce_target(vm.id, mem, &mut vm.reclaim, backend.mem(), host, flush);
            if host.sharing_enabled {
                let pages = host.scan_pages_per_round;
                reclaim::share_step(mem, backend.mem(), host, pages, reclaim::BREAK_LARGE_PER_ROUND, flush);
            }
        }
    }

    /// One full sharing pass over VM `id` (or every live VM): large pages
    /// an earlier pass found opportunities in and the guest has not touched
    /// since are broken up and shared first. What it did.
    pub fn share_now(&mut self, id: Option<u32>) -> Result<ScanReport, Error> {
        let backend = self.backend.as_mut().map_err(|why| Error::NoVirtualization(why.clone()))?;
        if let Some(id) = id {
            match self.vms.iter().find(|v| v.id == id) {
                None => return Err(Error::NoVm(id)),
                Some(v) if v.res.is_none() => return Err(Error::Ended { id, state: v.state.name() }),
                Some(_) => {}
            }
        }
        let host = &mut self.host_mem;
        let mut total = ScanReport::default();
        for vm in self.vms.iter_mut().filter(|v| id.is_none_or(|id| v.id == id)) {
            let Some(Resources { mem, vcpus, .. }) = vm.res.as_mut() else { continue };
            let pages = mem.pages() as usize;
            let r = reclaim::share_step(mem, backend.mem(), host, pages, usize::MAX, &mut |scope| {
                crate::vm::flush_all(vcpus, scope)
            });
            total += r;
        }
        Ok(total)
    }

    /// `vm create`: VM `id` is built as `run_vm_with` builds it, and
    /// waits for `start`.
    #[allow(clippy::too_many_arguments)]
    pub fn create_vm_stopped(
        &mut self,
        name: &str,
        image: &str,
        mem_mib: u32,
        modules: &[String],
        cmdline: &str,
        disk: Option<&str>,
        net: Option<&str>,
        vcpus: u32,
    ) -> Result<u32, Error> {
        let id = self.spawn(image, mem_mib, modules, cmdline, disk, net, vcpus)?;
        if let Some(vm) = self.vms.iter_mut().find(|v| v.id == id) {
            vm.created = true;
            vm.guest = String::from(name);
        }
        Ok(id)
    }

    /// VM `id`'s nested-page-table leaves mapping RAM now (4 KiB, 2 MiB,
    /// 1 GiB), if it still has memory.
    pub fn nested_pages_now(&mut self, id: u32) -> Option<[u64; 3]> {
        let backend = self.backend.as_mut().ok()?;
        let vm = self.vms.iter().find(|v| v.id == id)?;
        let res = vm.res.as_ref()?;
        Some(nested_leaves(&res.mem, &*backend.mem(), vm.mem_bytes))
    }

    /// How many 4 KiB pages of VM `id`'s RAM sit on each NUMA node (`None`:
    /// outside every node the SRAT names), by its nested page table.
    pub fn pages_by_node(&mut self, id: u32) -> Vec<(Option<u32>, u64)> {
        let Ok(backend) = self.backend.as_mut() else { return Vec::new() };
        let Some(vm) = self.vms.iter().find(|v| v.id == id) else { return Vec::new() };
        let Some(res) = vm.res.as_ref() else { return Vec::new() };
        let (ranges, n) = crate::vm::boot::ram_ranges(vm.mem_bytes);
        let top = ranges[..n].last().map_or(0, |r| r.end);
        let mut counts: BTreeMap<Option<u32>, u64> = BTreeMap::new();
        for m in res.mem.table().mappings(&*backend.mem(), GuestPhysAddr(0)..GuestPhysAddr(top)) {
            *counts.entry(self.numa.node_of_addr(m.leaf.hpa.0)).or_default() += m.leaf.size.bytes() / 4096;
        }
        counts.into_iter().collect()
    }

    /// `cpuid=pinned`: VM `id`, built and not yet run, answers CPUID from
    /// now on from the table of what it would be told on this host, here
    /// and wherever its checkpoints are restored (`portable`: cut to the
    /// features hosts of both vendors offer, [`crate::cpuid::Table::portable`]).
    pub fn pin_cpuid(&mut self, id: u32, portable: bool) -> Result<(), Error> {
        let backend = self.backend.as_ref().map_err(|why| Error::NoVirtualization(why.clone()))?;
        let vm = self.vms.iter_mut().find(|v| v.id == id).ok_or(Error::NoVm(id))?;
        let table = crate::cpuid::Table::capture(|l, s| {
            crate::cpuid::guest_cpuid(l, s, backend.host_cpuid(l, s), backend.quirks())
        });
        vm.cpuid = if portable {
            crate::cpuid::Profile::Portable(table.portable())
        } else {
            crate::cpuid::Profile::Pinned(table)
        };
        Ok(())
    }

    /// `vm start`: created VMs run, from the same round on (so a group
    /// that works together starts together). Every id is checked first:
    /// one that is not a created VM refuses the lot and starts none.
    pub fn start(&mut self, ids: &[u32]) -> Result<(), Error> {
        for (i, &id) in ids.iter().enumerate() {
            let vm = self.vms.iter().find(|v| v.id == id).ok_or(Error::NoVm(id))?;
            if !vm.created || ids[..i].contains(&id) {
                return Err(Error::AlreadyStarted(id));
            }
        }
        for vm in self.vms.iter_mut().filter(|v| ids.contains(&v.id)) {
            vm.created = false;
            vm.start_vcpus();
        }
        Ok(())
    }

    /// Pause (`true`) or resume VM `id`. A paused VM keeps its memory and
    /// devices; only the scheduler passes it over. Its clock devices keep
    /// host time, so a guest sees the pause as lost time, as after a host
    /// that was busy.
    /// Refused while a migration of the VM is in its switch-over (it
    /// paused the VM and resumes it only if the migration fails).
    pub fn set_paused(&mut self, id: u32, paused: bool) -> Result<(), Error> {
        self.migration_lock(id, false)?;
        let vm = self.vms.iter_mut().find(|v| v.id == id).ok_or(Error::NoVm(id))?;
        if vm.res.is_none() {
            return Err(Error::Ended { id, state: vm.state.name() });
        }
        if vm.created {
            return Err(Error::NotStarted(id));
        }
        if vm.paused == paused {
            return Err(if paused { Error::AlreadyPaused(id) } else { Error::NotPaused(id) });
        }
        vm.paused = paused;
        vm.pause_vcpus(paused);
        Ok(())
    }

    /// `vm balloon`: VM `id`'s balloon should hold `mib` MiB. Returns the
    /// previous target and what the guest holds now (4 KiB pages); the
    /// driver inflates or deflates on its own time.
    pub fn set_balloon(&mut self, id: u32, mib: u32) -> Result<(u32, u32), Error> {
        // The balloon's state went with the switch-over's capture.
        self.migration_lock(id, false)?;
        let vm = self.vms.iter_mut().find(|v| v.id == id).ok_or(Error::NoVm(id))?;
        let Some(res) = vm.res.as_mut() else {
            return Err(Error::Ended { id, state: vm.state.name() });
        };
        let pages = u64::from(mib) << 8;
        if pages > res.mem.pages() {
            return Err(Error::BalloonTooLarge { id, mib, mem_mib: (vm.mem_bytes >> 20) as u32 });
        }
        let dev = vm.devices.balloon().ok_or(Error::NoBalloon(id))?;
        let (before, actual) = (dev.target(), dev.actual());
        res.mem.set_balloon_target(pages);
        vm.devices.balloon_set_target(pages as u32);
        Ok((before, actual))
    }

    /// Attach the operator's terminal to VM `id`'s COM1 or virtio console:
    /// its output is kept byte for byte for [`Self::console_output`]
    /// instead of lines, and [`Self::console_input`] types into it.
    pub fn attach(&mut self, id: u32, port: ConsolePort) -> Result<(), Error> {
        let vm = self.vms.iter_mut().find(|v| v.id == id).ok_or(Error::NoVm(id))?;
        if vm.res.is_none() {
            return Err(Error::Ended { id, state: vm.state.name() });
        }
        match port {
            ConsolePort::Serial => vm.devices.com1().set_raw(true),
            ConsolePort::Virtio => vm.devices.virtio_console().ok_or(Error::NoVirtioConsole(id))?.set_attached(true),
        }
        Ok(())
    }

    /// Detach the terminal from VM `id` (if it still exists).
    pub fn detach(&mut self, id: u32) {
        if let Some(vm) = self.vms.iter_mut().find(|v| v.id == id) {
            vm.devices.com1().set_raw(false);
            if let Some(c) = vm.devices.virtio_console() {
                c.set_attached(false);
            }
        }
    }

    /// What attached VM `id` wrote since the last call, or `None` once the
    /// VM has ended (the terminal should detach).
    pub fn console_output(&mut self, id: u32) -> Option<Vec<u8>> {
        let vm = self.vms.iter_mut().find(|v| v.id == id)?;
        let mut out = vm.devices.com1().take_raw();
        if let Some(c) = vm.devices.virtio_console().filter(|c| c.is_attached()) {
            out.extend(c.take_output());
        }
        if vm.res.is_none() && out.is_empty() {
            return None;
        }
        Some(out)
    }

    /// The attached terminal's keys for VM `id`: to its virtio console if
    /// that is what is attached, else to COM1 ([`Self::send_input`]).
    pub fn console_input(&mut self, id: u32, bytes: &[u8]) -> Result<usize, Error> {
        self.migration_lock(id, false)?;
        let backend = self.backend.as_mut().map_err(|why| Error::NoVirtualization(why.clone()))?;
        let vm = self.vms.iter_mut().find(|v| v.id == id).ok_or(Error::NoVm(id))?;
        if !vm.devices.virtio_console().is_some_and(|c| c.is_attached()) {
            return self.send_input(id, bytes);
        }
        let n = vm
            .virtio_console_input(bytes, backend, &mut self.host_mem)
            .ok_or(Error::Ended { id, state: vm.state.name() })?;
        vm.timers_changed(backend.tsc_hz());
        Ok(n)
    }

    /// Bytes for VM `id`'s COM1 (the operator typing): queued in the UART's
    /// receive buffer, which interrupts the guest. How many were taken.
    /// Refused during a migration's switch-over: the UART's state has
    /// been captured, input now would be lost with the source's copy.
    pub fn send_input(&mut self, id: u32, bytes: &[u8]) -> Result<usize, Error> {
        self.migration_lock(id, false)?;
        let backend = self.backend.as_mut().map_err(|why| Error::NoVirtualization(why.clone()))?;
        let vm = self.vms.iter_mut().find(|v| v.id == id).ok_or(Error::NoVm(id))?;
        if vm.res.is_none() {
            return Err(Error::Ended { id, state: vm.state.name() });
        }
        if vm.devices.com1().rx_room() < bytes.len() {
            return Err(Error::SerialInputFull(id));
        }
        let n = vm.devices.com1().receive(bytes);
        let hz = backend.tsc_hz();
        vm.devices.update_lines(crate::vm::interrupts::vm_ns(backend.now(), hz, vm.clock_offset_ns));
        vm.timers_changed(hz);
        Ok(n)
    }

    /// Sets (or with `None` clears) VM `id`'s memory target in pages.
    pub fn set_target(&mut self, id: u32, pages: Option<u64>) -> Result<(), Error> {
        let vm = self.vms.iter_mut().find(|v| v.id == id).ok_or(Error::NoVm(id))?;
        let Some(res) = vm.res.as_ref() else {
            return Err(Error::Ended { id, state: vm.state.name() });
        };
        if let Some(p) = pages {
            if p < MIN_TARGET_PAGES {
                return Err(Error::TargetTooSmall);
            }
            if p < res.mem.pages()
                && let Some(why) = &vm.reclaim.no_swap
            {
                return Err(Error::NoSwapFile { id, why: why.clone() });
            }
        }
        vm.reclaim.target = pages;
        vm.reclaim.stuck = None;
        Ok(())
    }

    fn forget_old_records(&mut self) {
        while self.vms.iter().filter(|v| v.state.ended()).count() > MAX_ENDED_RECORDS {
            if let Some(pos) = self.vms.iter().position(|v| v.state.ended()) {
                self.vms.remove(pos);
            }
        }
    }
}

impl<B: Backend> Drop for Manager<B> {
    /// Returns every live VM's memory (the kernel's manager lives forever;
    /// this matters for tests and for an orderly shutdown).
    fn drop(&mut self) {
        if let Ok(backend) = self.backend.as_mut() {
            for vm in &mut self.vms {
                release(backend, &mut self.host_mem, vm);
            }
            if let Some(index) = self.host_mem.sharing.take() {
                // SAFETY: every VM that used the index was freed above.
                unsafe { index.free(backend.mem()) };
            }
        }
    }
}

/// Writes load plans into a new VM's RAM through the direct map (every page
/// still has its original frame, so no page state is involved).
struct RamWriter<'a, M: mm::hal::PhysMem> {
    ram: &'a GuestRam,
    mem: &'a M,
}

impl<M: mm::hal::PhysMem> GuestWrite for RamWriter<'_, M> {
    fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), GuestWriteError> {
        self.ram.write(self.mem, GuestPhysAddr(gpa), data).map_err(|_| GuestWriteError)
    }

    fn fill_zero(&mut self, gpa: u64, len: u64) -> Result<(), GuestWriteError> {
        const ZEROS: [u8; 4096] = [0; 4096];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(4096);
            self.write(gpa + done, &ZEROS[..n as usize])?;
            done += n;
        }
        Ok(())
    }
}

/// Gives a VM's memory back: frames, shared references and swap slots, then
/// its swap file.
fn free_memory<B: Backend>(backend: &mut B, host: &mut HostMemory, id: u32, mem: GuestMemory<B::Format>) {
    let alloc = backend.mem();
    let report = host.with_hooks(id, |hooks| {
        // SAFETY: no vCPU runs on the VM's tables (it was destroyed or never
        // created) and no device uses its memory; `alloc` is where it came from.
        unsafe { mem.free(alloc, hooks, &mut |_| {}) }
    });
    if report.leaked_references > 0 {
        log::error!("vm {id}: {} shared pages or swap slots could not be released", report.leaked_references);
    }
    host.remove_vm(id);
}

/// Which of a VM's consoles a terminal attaches to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConsolePort {
    /// COM1, the 16550 UART (`ttyS0`).
    Serial,
    /// The virtio console (`hvc0`).
    Virtio,
}

/// VM `id`'s switch port, as a number (`Error::NoSwitchPort` past them).
fn switch_port(id: u32) -> Result<PortId, Error> {
    // The top two port numbers are the host's NIC and its stack.
    PortId::try_from(id).ok().filter(|&p| !crate::net::uplink::is_host_side(p)).ok_or(Error::NoSwitchPort(id))
}

/// Detach VM `id` from its switch (it ended, or resets): the switch
/// forgets the MACs learned on its port. Switches stay when empty (a VM
/// may join again; they are a few bytes).
fn detach_port(switches: &mut BTreeMap<String, Switch>, id: u32) {
    if let Ok(port) = PortId::try_from(id) {
        for s in switches.values_mut() {
            s.detach(port);
        }
    }
}

/// Frees what a VM holds: the vCPU first (nothing runs on the table after
/// that), then its memory.
fn release<B: Backend>(backend: &mut B, host: &mut HostMemory, vm: &mut Vm<B>) {
    vm.stop_vcpus();
    if let Some(res) = vm.res.take() {
        vm.stats.ended_vcpus = res.vcpus.iter().map(|s| s.stats.clone()).collect();
        for slot in res.vcpus.into_vec() {
            backend.destroy_vcpu(slot.vcpu);
        }
        free_memory(backend, host, vm.id, res.mem);
    }
}

#[cfg(test)]
mod balloon_tests;
pub mod checkpoint;
mod checkpoint_smp;
#[cfg(test)]
mod checkpoint_smp_tests;
#[cfg(test)]
mod checkpoint_tests;
#[cfg(test)]
mod disk_tests;
pub mod host_calls;
mod host_reclaim;
pub mod lazy;
#[cfg(test)]
mod lazy_tests;
pub mod local_mmio;
pub mod machine_check;
#[cfg(test)]
mod machine_check_tests;
#[cfg(test)]
mod mem_tests;
pub mod migration;
#[cfg(test)]
mod net_tests;
mod round_on;
pub mod rounds;
#[cfg(test)]
mod rounds_tests;
mod run_queue;
pub mod save_job;
#[cfg(test)]
mod save_tests;
pub mod sibling_apic;
#[cfg(test)]
mod smp_tests;
#[cfg(test)]
mod tests;
pub mod uplink;
#[cfg(test)]
mod vcpu_tests;

/// The leaves of `mem`'s nested page table that map RAM of a VM of
/// `mem_bytes`, by size: 4 KiB, 2 MiB, 1 GiB.
pub fn nested_leaves<M: mm::hal::PhysMem>(
    mem: &GuestMemory<impl mm::paging::EntryFormat>,
    phys: &M,
    mem_bytes: u64,
) -> [u64; 3] {
    let mut leaves = [0u64; 3];
    let (ranges, n) = crate::vm::boot::ram_ranges(mem_bytes);
    let top = ranges[..n].last().map_or(0, |r| r.end);
    for m in mem.table().mappings(phys, mm::GuestPhysAddr(0)..mm::GuestPhysAddr(top)) {
        leaves[match m.leaf.size {
            PageSize::Size4K => 0,
            PageSize::Size2M => 1,
            PageSize::Size1G => 2,
        }] += 1;
    }
    leaves
}
