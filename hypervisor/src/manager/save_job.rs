//! Saving a VM's state stream in steps: paused (every step at once, the
//! VM stopped meanwhile) or live (seed 003: the VM runs between steps, its
//! memory under an `mm` copy-on-write snapshot, so the stream is the VM
//! at the instant the save began).
//!
//! The stream goes through a bounded staging buffer (seed 001): records
//! are appended to it, and only a full buffer is written to the target,
//! in one piece, so the data disk sees few large writes however small the
//! records are. A live save runs [`PAGES_PER_STEP`] pages per scheduling
//! round ([`Manager::checkpoint_round`]); the VM's pause is only the time
//! to capture its vCPU and devices and to write-protect its memory, not
//! its size.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use migrate::{Header, IoError, RamRange, Sink, Stats, Vendor, Writer};
use mm::GuestPhysAddr;
use mm::paging::PageSize;
use mm::vm_memory::{PageState, SnapshotStats, Taken};
use vcpu::Vcpu;

use super::checkpoint::{MACHINE, MACHINE_VERSION, MachineState, Refused, SavedVcpu};
use super::{Error, Manager};
use alloc::rc::Rc;
use core::cell::RefCell;

use crate::backend::Backend;
use crate::devices::virtio_slots::HostDisk;
use crate::disk::cow::{CowDisk, DiskSnapshot};
use crate::disk::space::ExtentStore;
use crate::memory::HostMemory;
use crate::memory::SharedDisk;
use crate::vm::exit::Console;
use crate::vm::interrupts::vm_ns;

/// Bytes the staging buffer holds before it is written out.
pub const STAGING_BYTES: usize = 1 << 20;

/// Guest pages a live save writes per scheduling round: 2 MiB, about as
/// long as a time slice to read, compress and stage under emulation (a
/// step of 8 MiB held the VM 208 ms in QEMU TCG), far less on hardware.
pub const PAGES_PER_STEP: u64 = 512;

/// The staging buffer (seed 001): the stream's records are appended here,
/// and [`SaveJob`] writes it to the target once it holds
/// [`STAGING_BYTES`] (and at the end), in one piece. It grows past the
/// bound by at most one record (a memory record is about 256 KiB).
#[derive(Default)]
pub struct Staging {
    buf: Vec<u8>,
}

impl Sink for Staging {
    fn write(&mut self, bytes: &[u8]) -> Result<(), IoError> {
        self.buf.try_reserve(bytes.len()).map_err(|_| IoError("no host memory for the staging buffer"))?;
        self.buf.extend_from_slice(bytes);
        Ok(())
    }
}

/// Where a background save's stream goes, and how it is made complete
/// (the checkpoint extent's close) or thrown away.
pub trait SaveTarget: Sink {
    /// The checkpoint's name.
    fn name(&self) -> &str;
    /// Everything was written: make it durable and complete. A line for
    /// the operator on success.
    fn commit(self: Box<Self>, host: &mut HostMemory, saved: &Saved) -> Result<String, String>;
    /// The save failed: leave nothing that looks complete.
    fn abort(self: Box<Self>, host: &mut HostMemory);
}

/// A save in progress.
pub struct SaveJob {
    pub id: u32,
    pub live: bool,
    writer: Writer<Staging>,
    /// Writes the target received, and their bytes.
    pub drains: u64,
    pub bytes: u64,
    ram: Vec<RamRange>,
    /// Next RAM range and address to write.
    range: usize,
    gpa: u64,
    /// Pages of the 2 MiB run in progress still to write (a step may end
    /// inside a run: a step's length is the guest's pause).
    run_left: u64,
    /// When the save began, and how long the VM was held at the start.
    pub started: u64,
    pub pause_ticks: u64,
    /// Steps taken and the longest one (a live VM waits during a step).
    pub steps: u64,
    pub longest_step_ticks: u64,
    /// The snapshot's counters when the memory was all written.
    pub snapshot: Option<SnapshotStats>,
}

impl SaveJob {
    /// What the stream holds so far, by kind of page.
    pub fn stream_stats(&self) -> &migrate::Stats {
        self.writer.stats()
    }

    fn new(id: u32, live: bool, writer: Writer<Staging>, ram: Vec<RamRange>, started: u64, pause_ticks: u64) -> Self {
        let gpa = ram.first().map_or(0, |r| r.base);
        SaveJob {
            id,
            live,
            writer,
            drains: 0,
            bytes: 0,
            ram,
            range: 0,
            gpa,
            run_left: 0,
            started,
            pause_ticks,
            steps: 0,
            longest_step_ticks: 0,
            snapshot: None,
        }
    }
}

/// A VM's state but its memory, taken at one instruction boundary
/// ([`Manager::capture`]).
pub(super) struct Captured {
    /// The stream header listing it (not live).
    pub header: Header,
    /// Every vCPU's registers, by index.
    states: Vec<vcpu::GuestState>,
    machine_bytes: Vec<u8>,
    devices: Vec<crate::devices::SavedDevice>,
}

/// Writes the vCPU, machine and device records of `c`.
pub(super) fn write_captured(w: &mut Writer<Staging>, c: &Captured) -> Result<(), Error> {
    for (i, s) in c.states.iter().enumerate() {
        w.vcpu(i as u32, s).map_err(Error::Stream)?;
    }
    w.device(MACHINE, MACHINE_VERSION, &c.machine_bytes).map_err(Error::Stream)?;
    for d in &c.devices {
        w.device(&d.name, d.version, &d.bytes).map_err(Error::Stream)?;
    }
    Ok(())
}

/// What a finished save reports.
pub struct Saved {
    pub stats: Stats,
    pub live: bool,
    pub pause_ticks: u64,
    pub total_ticks: u64,
    pub steps: u64,
    pub longest_step_ticks: u64,
    /// Storage writes the staging buffer made, and their bytes.
    pub drains: u64,
    pub bytes: u64,
    /// Pages copied before the guest (or a device) changed them.
    pub copies: u64,
}

fn vendor(backend_name: &str) -> Vendor {
    match backend_name {
        "vmx" => Vendor::Intel,
        "svm" => Vendor::Amd,
        _ => Vendor::Unknown,
    }
}

impl<B: Backend> Manager<B> {
    /// Start saving VM `id` into `target`: its vCPUs, machine record and
    /// devices now, at one instruction boundary; its memory by
    /// [`Self::save_step`]. `live` puts the memory under a copy-on-write
    /// snapshot so the VM may run between steps.
    /// Refused while VM `id` migrates (its memory is dirty-logged, and a
    /// checkpoint of a VM about to run elsewhere would be a second copy),
    /// or still arrives by post-copy (its missing pages are elsewhere).
    pub fn begin_save(&mut self, id: u32, live: bool) -> Result<SaveJob, Error> {
        self.migration_lock(id, true)?;
        self.arriving_lock(id)?;
        let started = self.backend.as_ref().map_err(|why| Error::NoVirtualization(why.clone()))?.now();
        let captured = self.capture(id)?;
        let mut w = Writer::begin(Staging::default(), &captured.header).map_err(Error::Stream)?;
        write_captured(&mut w, &captured)?;
        let backend = self.backend.as_mut().map_err(|why| Error::NoVirtualization(why.clone()))?;
        if live {
            let res = self.vms.iter_mut().find(|v| v.id == id).and_then(|v| v.res.as_mut()).ok_or(Error::NoVm(id))?;
            let vcpus = &mut res.vcpus;
            res.mem
                .start_snapshot(backend.mem(), &mut |s| crate::vm::flush_all(vcpus, s))
                .map_err(|e| Error::Checkpoint(Refused::Memory(e)))?;
        }
        let pause_ticks = backend.now().wrapping_sub(started);
        Ok(SaveJob::new(id, live, w, captured.header.ram, started, pause_ticks))
    }

    /// VM `id`'s vCPU, machine record and devices now, at one instruction
    /// boundary, and the stream header that lists them (not live).
    pub(super) fn capture(&mut self, id: u32) -> Result<Captured, Error> {
        let net = self.switch_of(id).map(String::from);
        let backend = self.backend.as_mut().map_err(|why| Error::NoVirtualization(why.clone()))?;
        let vm = self.vms.iter_mut().find(|v| v.id == id).ok_or(Error::NoVm(id))?;
        let Some(res) = vm.res.as_mut() else {
            return Err(Error::Ended { id, state: vm.state.name() });
        };
        // Every vCPU's registers (vendor-neutral), vCPU 0's TSC the
        // guest's; their scheduling state goes in the machine record.
        let states: Vec<vcpu::GuestState> = res.vcpus.iter().map(|s| s.vcpu.state()).collect();
        let sched: Vec<SavedVcpu> =
            res.vcpus.iter().enumerate().map(|(i, s)| SavedVcpu::capture(i, s, &vm.devices)).collect();
        let state = &states[0];
        let (hz, now) = (backend.tsc_hz(), backend.now());
        let machine = MachineState {
            guest: vm.guest.clone(),
            image: vm.image.clone(),
            cmdline: vm.cmdline.clone(),
            modules: vm.modules.clone(),
            protocol: String::from(vm.protocol.name()),
            mem_bytes: vm.mem_bytes,
            reboots: vm.reboots,
            clock_ns: vm_ns(now, hz, vm.clock_offset_ns),
            guest_tsc: now.wrapping_add(state.tsc_offset),
            tsc_hz: hz,
            mtrr_def_type: vm.msrs.mtrr_def_type,
            misc_enable: vm.msrs.misc_enable,
            disk: vm.devices.block_disk().map(|(name, _)| String::from(name)),
            net,
            cpuid: vm.cpuid.clone(),
            vcpus: sched,
        };
        let machine_bytes = postcard::to_allocvec(&machine).map_err(|_| Error::Checkpoint(Refused::Machine))?;
        let devices = vm.devices.save();
        let ram: Vec<RamRange> = crate::vm::boot::ram_ranges(vm.mem_bytes)
            .0
            .iter()
            .filter(|r| !r.is_empty())
            .map(|r| RamRange { base: r.start, size: r.end - r.start })
            .collect();
        let header = Header {
            live: false,
            source: vendor(backend.name()),
            vcpus: states.len() as u32,
            ram,
            devices: core::iter::once(migrate::DeviceInfo { name: String::from(MACHINE), version: MACHINE_VERSION })
                .chain(devices.iter().map(|d| migrate::DeviceInfo { name: d.name.clone(), version: d.version }))
                .collect(),
        };
        Ok(Captured { header, states, machine_bytes, devices })
    }

    /// Write `pages` more pages of the VM's memory (a 2 MiB run may go
    /// on in the next step: its pages follow its marker in order, whenever
    /// they are written), the staging buffer going to `target` each time
    /// it is full; whether all memory is written.
    pub fn save_step(&mut self, job: &mut SaveJob, pages: u64, target: &mut impl Sink) -> Result<bool, Error> {
        let backend = self.backend.as_mut().map_err(|why| Error::NoVirtualization(why.clone()))?;
        let t0 = backend.now();
        let id = job.id;
        let vm = self.vms.iter_mut().find(|v| v.id == id).ok_or(Error::NoVm(id))?;
        let Some(res) = vm.res.as_mut() else {
            return Err(Error::Ended { id, state: vm.state.name() });
        };
        let (mem, vcpus) = (&mut res.mem, &mut res.vcpus);
        let w = &mut job.writer;
        let mut page = [0u8; migrate::PAGE_SIZE];
        let mut done = 0u64;
        while let Some(r) = job.ram.get(job.range) {
            let end = r.base + r.size;
            if job.gpa >= end {
                job.range += 1;
                if let Some(next) = job.ram.get(job.range) {
                    job.gpa = next.base;
                }
                continue;
            }
            if done >= pages {
                break;
            }
            let gpa = job.gpa;
            let g = GuestPhysAddr(gpa);
            if job.run_left == 0 && gpa.is_multiple_of(2 << 20) && gpa + (2 << 20) <= end {
                // A 2 MiB page of RAM travels as a run, so the restored VM
                // can map it large again (contiguity survives).
                let large = if job.live {
                    mem.snapshot_was_large(g)
                } else {
                    mem.table().translate(&*backend.mem(), g).map(|t| t.leaf.size) == Some(PageSize::Size2M)
                };
                if large {
                    w.large_run(gpa >> 12, 512).map_err(Error::Stream)?;
                    job.run_left = 512;
                }
            }
            write_page(w, &mut self.host_mem, backend, mem, vcpus, id, job.live, gpa, &mut page)?;
            job.gpa += migrate::PAGE_SIZE as u64;
            job.run_left = job.run_left.saturating_sub(1);
            done += 1;
            if w.sink_mut().buf.len() >= STAGING_BYTES {
                drain(w.sink_mut(), target, &mut job.drains, &mut job.bytes)?;
            }
        }
        let finished = job.range >= job.ram.len();
        if finished && job.live {
            job.snapshot = mem.snapshot_stats();
        }
        let ticks = backend.now().wrapping_sub(t0);
        job.steps += 1;
        job.longest_step_ticks = job.longest_step_ticks.max(ticks);
        Ok(finished)
    }

    /// Close the stream of a save whose memory is all written: the end
    /// record, the staging buffer's last write, the snapshot's end.
    pub fn finish_save(&mut self, job: SaveJob, target: &mut impl Sink) -> Result<Saved, Error> {
        let (copies, live) = (job.snapshot.map_or(0, |s| s.copies), job.live);
        if live {
            self.stop_snapshot(job.id);
        }
        let (mut drains, mut bytes) = (job.drains, job.bytes);
        let (mut staging, stats) = job.writer.finish().map_err(Error::Stream)?;
        drain(&mut staging, target, &mut drains, &mut bytes)?;
        let now = self.backend.as_ref().map_or(job.started, |b| b.now());
        let total_ticks = now.wrapping_sub(job.started);
        Ok(Saved {
            stats,
            live,
            // A paused save holds the VM throughout.
            pause_ticks: if live { job.pause_ticks } else { total_ticks },
            total_ticks,
            steps: job.steps,
            longest_step_ticks: job.longest_step_ticks,
            drains,
            bytes,
            copies,
        })
    }

    /// Begin VM `id`'s live-migration stream: the live header only. Its
    /// memory follows by [`Self::save_step`] (every page, read as it is
    /// now: the VM runs under dirty logging, not a snapshot) and
    /// [`Self::save_pages`] (pages written since), its vCPU and devices
    /// at the end ([`Self::finish_migration_stream`]).
    pub(super) fn begin_migration_stream(&mut self, id: u32) -> Result<SaveJob, Error> {
        let started = self.backend.as_ref().map_err(|why| Error::NoVirtualization(why.clone()))?.now();
        let mut header = self.capture(id)?.header;
        header.live = true;
        let w = Writer::begin(Staging::default(), &header).map_err(Error::Stream)?;
        Ok(SaveJob::new(id, false, w, header.ram, started, 0))
    }

    /// Write pages `gfns` of the job's VM again (later copies win), the
    /// staging buffer going to `target` each time it is full.
    pub(super) fn save_pages(&mut self, job: &mut SaveJob, gfns: &[u64], target: &mut impl Sink) -> Result<(), Error> {
        let backend = self.backend.as_mut().map_err(|why| Error::NoVirtualization(why.clone()))?;
        let id = job.id;
        let vm = self.vms.iter_mut().find(|v| v.id == id).ok_or(Error::NoVm(id))?;
        let Some(res) = vm.res.as_mut() else {
            return Err(Error::Ended { id, state: vm.state.name() });
        };
        let mut page = [0u8; migrate::PAGE_SIZE];
        for &gfn in gfns {
            let w = &mut job.writer;
            write_page(w, &mut self.host_mem, backend, &mut res.mem, &mut res.vcpus, id, false, gfn << 12, &mut page)?;
            if w.sink_mut().buf.len() >= STAGING_BYTES {
                drain(w.sink_mut(), target, &mut job.drains, &mut job.bytes)?;
            }
        }
        Ok(())
    }

    /// Close the open memory record and hand everything to `target` now
    /// (post-copy: a page the destination waits for goes at once).
    pub(super) fn flush_pages(&mut self, job: &mut SaveJob, target: &mut impl Sink) -> Result<(), Error> {
        job.writer.flush().map_err(Error::Stream)?;
        self.flush_save(job, target)
    }

    /// Hand what the staging buffer holds to `target` now (a connection
    /// that should not wait for a full buffer).
    pub(super) fn flush_save(&mut self, job: &mut SaveJob, target: &mut impl Sink) -> Result<(), Error> {
        drain(job.writer.sink_mut(), target, &mut job.drains, &mut job.bytes)
    }

    /// The switch-over's end of a migration stream: the VM's vCPU,
    /// machine record and devices as captured when it was paused, then
    /// the end record.
    pub(super) fn finish_migration_stream(
        &mut self,
        mut job: SaveJob,
        captured: &Captured,
        target: &mut impl Sink,
    ) -> Result<Saved, Error> {
        write_captured(&mut job.writer, captured)?;
        self.finish_save(job, target)
    }

    /// Post-copy's switch-over: the pages of `pending` (runs of frames)
    /// come later; the VM's vCPU, machine and devices as captured; the
    /// resume record, after which the destination runs the VM. All of it
    /// goes to `target` now.
    pub(super) fn resume_migration_stream(
        &mut self,
        job: &mut SaveJob,
        pending: &[(u64, u32)],
        captured: &Captured,
        target: &mut impl Sink,
    ) -> Result<(), Error> {
        job.writer.pending(pending).map_err(Error::Stream)?;
        write_captured(&mut job.writer, captured)?;
        job.writer.resume().map_err(Error::Stream)?;
        self.flush_save(job, target)
    }

    /// Give a save up (the caller discards what its target holds).
    pub fn abort_save(&mut self, job: SaveJob) {
        if job.live {
            self.stop_snapshot(job.id);
        }
    }

    /// End VM `id`'s memory snapshot, if it still has one.
    fn stop_snapshot(&mut self, id: u32) {
        let Ok(backend) = self.backend.as_mut() else { return };
        let Some(vm) = self.vms.iter_mut().find(|v| v.id == id) else { return };
        if let Some(res) = vm.res.as_mut() {
            let vcpus = &mut res.vcpus;
            let _ = res.mem.stop_snapshot(backend.mem(), &mut |s| crate::vm::flush_all(vcpus, s));
        }
    }

    /// Start a live save of VM `id` into `target`, run by
    /// [`Self::checkpoint_round`]; `done` is said when it ends. One at a
    /// time. The VM's pause (ticks). Refused, `target` aborted.
    pub fn start_live_save(
        &mut self,
        id: u32,
        target: Box<dyn SaveTarget>,
        done: String,
        disk: Option<LiveDisk>,
    ) -> Result<u64, Error> {
        let started = match &self.live_save {
            Some(other) => Err(Error::SaveRunning(other.job.id)),
            None => self.begin_save(id, true),
        };
        match started {
            Ok(job) => {
                let pause = job.pause_ticks;
                if let (Some(d), Some(vm)) = (&disk, self.vms.iter_mut().find(|v| v.id == id)) {
                    // From now on every guest write to the disk first
                    // copies what it overwrites into the snapshot.
                    let cow = CowDisk(d.snap.clone());
                    vm.devices.attach_block_backend(HostDisk {
                        name: d.original.name.clone(),
                        disk: Rc::new(RefCell::new(cow)),
                    });
                }
                self.live_save = Some(LiveSave { job, target, done, disk, memory_done: false });
                Ok(pause)
            }
            Err(e) => {
                target.abort(&mut self.host_mem);
                Err(e)
            }
        }
    }

    /// The name of the checkpoint a live save is writing.
    pub fn live_save_target(&self) -> Option<String> {
        self.live_save.as_ref().map(|s| String::from(s.target.name()))
    }

    /// The running live save: VM id and the snapshot's counters.
    pub fn live_save(&self) -> Option<(u32, Option<SnapshotStats>)> {
        let job = &self.live_save.as_ref()?.job;
        let stats = self.get(job.id).and_then(|v| v.res.as_ref()).and_then(|r| r.mem.snapshot_stats());
        Some((job.id, stats))
    }

    /// One step of the running live save (between scheduling rounds);
    /// when its memory is all written, the stream is closed and committed
    /// and the operator told.
    pub fn checkpoint_round(&mut self, console: &mut impl Console) {
        self.live_save_step(PAGES_PER_STEP, console);
    }

    /// Finish VM `id`'s live save now, before its memory goes (the VM
    /// resets or ends): the checkpoint stays the instant the save began.
    pub fn complete_live_save_of(&mut self, id: u32, console: &mut impl Console) {
        if self.live_save.as_ref().is_some_and(|s| s.job.id == id) {
            self.live_save_step(u64::MAX, console);
        }
    }

    fn live_save_step(&mut self, pages: u64, console: &mut impl Console) {
        let Some(LiveSave { mut job, mut target, done, disk, memory_done }) = self.live_save.take() else { return };
        let id = job.id;
        let step = if memory_done { Ok(true) } else { self.save_step(&mut job, pages, &mut target) };
        // The disk's copy advances with the memory: 1 MiB per step.
        let disk_step =
            disk.as_ref().map_or(Ok(true), |d| d.snap.borrow_mut().step(if pages == u64::MAX { u64::MAX } else { 16 }));
        let step = match (step, disk_step) {
            (Ok(m), Ok(d)) => Ok((m, d)),
            (Err(e), _) => Err(e),
            (_, Err(e)) => Err(Error::DiskSnapshot(e)),
        };
        let result = match step {
            Ok((memory_done, false)) | Ok((memory_done @ false, _)) => {
                self.live_save = Some(LiveSave { job, target, done, disk, memory_done });
                return;
            }
            Ok((true, true)) => {
                let finished = disk.as_ref().map_or(Ok(0), |d| d.snap.borrow_mut().finish());
                match finished {
                    Ok(_) => self.finish_save(job, &mut target),
                    Err(e) => {
                        self.abort_save(job);
                        Err(Error::DiskSnapshot(e))
                    }
                }
            }
            Err(e) => {
                self.abort_save(job);
                Err(e)
            }
        };
        // The VM's device serves its disk directly again.
        let disk_note = disk.map(|d| {
            if let Some(vm) = self.vms.iter_mut().find(|v| v.id == id) {
                vm.devices.attach_block_backend(d.original.clone());
            }
            let s = d.snap.borrow();
            format!(
                "; disk: {} chunks copied before the guest overwrote them, {} in the background",
                s.before_write, s.background
            )
        });
        let hz = self.tsc_hz();
        match result {
            Ok(saved) => match target.commit(&mut self.host_mem, &saved) {
                Ok(what) => {
                    console.line(&format!("{done}{}{}", report(&saved, what, hz), disk_note.unwrap_or_default()))
                }
                Err(e) => console.line(&format!("vm {id}: live save failed, nothing kept: {e}")),
            },
            Err(e) => {
                target.abort(&mut self.host_mem);
                console.line(&format!("vm {id}: live save failed, nothing kept: {e}"));
            }
        }
    }

    fn tsc_hz(&self) -> u64 {
        self.backend.as_ref().map_or(1, |b| b.tsc_hz()).max(1)
    }
}

/// Writes guest page `gpa` of VM `id` to `w`: its contents (from the
/// snapshot for a live save), or that it is poisoned.
#[allow(clippy::too_many_arguments)]
pub(super) fn write_page<B: Backend>(
    w: &mut Writer<Staging>,
    host_mem: &mut HostMemory,
    backend: &mut B,
    mem: &mut crate::memory::GuestMemory<B::Format>,
    vcpus: &mut [crate::vm::VcpuSlot<B::Vcpu>],
    id: u32,
    live: bool,
    gpa: u64,
    page: &mut [u8; migrate::PAGE_SIZE],
) -> Result<(), Error> {
    let g = GuestPhysAddr(gpa);
    let alloc = backend.mem();
    let flush = &mut |s| crate::vm::flush_all(vcpus, s);
    // A read that hits an uncorrectable memory error poisons the page (the
    // host's copy is machine-check safe): it goes out as poisoned, never
    // as data, and the save or migration goes on.
    let taken = if live {
        match host_mem.with_hooks(id, |h| mem.snapshot_take(alloc, h, g, page, flush)) {
            Err(mm::Error::PagePoisoned(_)) => Taken::Poisoned,
            other => other.map_err(|error| Error::Checkpoint(Refused::Memory(error)))?,
        }
    } else if mem.page_state(g) == Some(PageState::Poisoned) {
        Taken::Poisoned
    } else {
        match host_mem.with_hooks(id, |h| mem.read(alloc, h, g, page, flush)) {
            Ok(()) => Taken::Data,
            Err(mm::Error::PagePoisoned(_)) => Taken::Poisoned,
            Err(error) => return Err(Error::Checkpoint(Refused::Memory(error))),
        }
    };
    match taken {
        Taken::Poisoned => w.poisoned(gpa >> 12).map_err(Error::Stream),
        Taken::Data => w.page(gpa >> 12, page).map_err(Error::Stream),
    }
}

/// "pause 3 ms, total 210 ms, ..." for a finished save.
pub fn report(s: &Saved, what: String, hz: u64) -> String {
    let ms = |t: u64| u128::from(t) * 1000 / u128::from(hz.max(1));
    let us = |t: u64| u128::from(t) * 1_000_000 / u128::from(hz.max(1));
    format!(
        "{what}; {}: pause {} us, total {} ms, {} steps (longest {} us), {} pages copied on write, {} staged writes of {} bytes",
        if s.live { "live" } else { "paused" },
        us(s.pause_ticks),
        ms(s.total_ticks),
        s.steps,
        us(s.longest_step_ticks),
        s.copies,
        s.drains,
        s.bytes
    )
}

/// The running live save.
pub struct LiveSave {
    pub(super) job: SaveJob,
    target: Box<dyn SaveTarget>,
    /// What to say before the report when it ends.
    done: String,
    disk: Option<LiveDisk>,
    /// All memory is written (the disk's copy may still run).
    memory_done: bool,
}

/// The VM's disk under a copy-on-write snapshot for a live save.
pub struct LiveDisk {
    pub snap: Rc<RefCell<DiskSnapshot<ExtentStore<SharedDisk>>>>,
    /// What the VM's device served before (and serves again after).
    pub original: HostDisk,
}

/// Writes what `staging` holds to `target`, in one piece.
fn drain(staging: &mut Staging, target: &mut impl Sink, drains: &mut u64, bytes: &mut u64) -> Result<(), Error> {
    if staging.buf.is_empty() {
        return Ok(());
    }
    target.write(&staging.buf).map_err(|error| Error::Stream(migrate::Error::Io { offset: *bytes, error }))?;
    *drains += 1;
    *bytes += staging.buf.len() as u64;
    staging.buf.clear();
    Ok(())
}
