//! The checkpoint commands: `vm save <id> <name>` writes a VM's whole state
//! (a `migrate` stream, `Manager::save_vm`) into a checkpoint extent of the
//! data disk; `vm restore <name>` builds and starts a new VM from one
//! (`Manager::restore_vm`), on this host or another of either vendor;
//! `vm checkpoints` lists them; `vm checkpoint delete <name>` frees one.

use alloc::boxed::Box;
use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::RefCell;
use serde_json::{Value, json};

use super::commands::{HostStatus, Reply};
use crate::backend::Backend;
use crate::devices::rtc::utc_text;
use crate::disk::cow::DiskSnapshot;
use crate::disk::image::Image;
use crate::disk::space::{ExtentInfo, ExtentKind, HostSpaceSummary, SpaceError};
use crate::manager::Manager;
use crate::manager::checkpoint::LazyFrom;
use crate::manager::save_job::{LiveDisk, SaveTarget, Saved};
use crate::memory::{HostMemory, HostSpace};

/// `meta[0]` of a checkpoint extent: bits 7:0 the vendor it was saved
/// under, bits 31:16 the stream's format version (major), 15:8 its minor
/// version; `meta[1]`: the VM's RAM in bytes.
const VENDOR_INTEL: u64 = 1;
const VENDOR_AMD: u64 = 2;

fn meta0(vendor: u64) -> u64 {
    vendor | (u64::from(migrate::FORMAT_MAJOR) << 16) | (u64::from(migrate::FORMAT_MINOR) << 8)
}

/// "1.1": the format version a checkpoint was written in.
fn format_version(meta0: u64) -> String {
    format!("{}.{}", (meta0 >> 16) & 0xffff, (meta0 >> 8) & 0xff)
}

fn vendor_name(meta0: u64) -> &'static str {
    match meta0 & 0xff {
        VENDOR_INTEL => "intel",
        VENDOR_AMD => "amd",
        _ => "unknown",
    }
}

fn mib_tenths(bytes: u64) -> String {
    let tenths = (u128::from(bytes) * 10 + (1 << 19)) >> 20;
    format!("{}.{}", tenths / 10, tenths % 10)
}

/// A checkpoint extent being written: the stream's target, and what the
/// save leaves besides (the disk snapshot) to be kept or removed with it.
struct ExtentTarget {
    writer: Option<crate::disk::space::StreamWriter<crate::memory::SharedDisk>>,
    name: String,
    /// The disk snapshot image made for this checkpoint, if any, and the
    /// image it copies.
    snap: Option<(String, String)>,
    id: u32,
    mem_bytes: u64,
}

impl migrate::Sink for ExtentTarget {
    fn write(&mut self, bytes: &[u8]) -> Result<(), migrate::IoError> {
        let w = self.writer.as_mut().ok_or(migrate::IoError("the checkpoint was closed"))?;
        w.write_all(bytes).map_err(|e| match e {
            SpaceError::StreamFull { .. } => {
                migrate::IoError("the checkpoint does not fit in the data disk's free space")
            }
            _ => migrate::IoError("writing the data disk failed"),
        })
    }
}

impl SaveTarget for ExtentTarget {
    fn name(&self) -> &str {
        &self.name
    }

    fn commit(mut self: Box<Self>, host: &mut HostMemory, saved: &Saved) -> Result<String, String> {
        let Some(space) = host.space.as_mut() else {
            return Err(String::from("the data disk went away"));
        };
        let Some(w) = self.writer.take() else { return Err(String::from("the checkpoint was closed")) };
        match w.close(space) {
            Ok(info) => Ok(saved_line(self.id, &info, self.mem_bytes, &saved.stats, self.snap.as_ref())),
            Err(e) => {
                self.discard(space);
                Err(format!("{e}"))
            }
        }
    }

    fn abort(mut self: Box<Self>, host: &mut HostMemory) {
        if let Some(space) = host.space.as_mut() {
            self.discard(space);
        }
    }
}

impl ExtentTarget {
    /// Nothing half-written stays: the extent this save created and its
    /// disk snapshot go (an unclosed extent would also be dropped at the
    /// next boot).
    fn discard(&mut self, space: &mut HostSpace) {
        self.writer = None;
        let _ = space.delete(&self.name, |_| None);
        if let Some((_, snap)) = self.snap.take() {
            let _ = space.delete(&snap, |_| None);
        }
    }
}

/// "vm 1 saved to checkpoint x: 1.2 MiB (4096 pages: ...)".
fn saved_line(
    id: u32,
    info: &ExtentInfo,
    mem_bytes: u64,
    stats: &migrate::Stats,
    snap: Option<&(String, String)>,
) -> String {
    use migrate::PageKind as K;
    let pages = |k| stats.pages(k);
    let snapped = snap.map(|(d, s)| format!("; disk {d} copied to image {s}")).unwrap_or_default();
    format!(
        "vm {id} saved to checkpoint {}: {} MiB ({} pages: {} data, {} compressed, {} zero, {} poisoned){snapped}",
        info.name,
        mib_tenths(info.bytes),
        mem_bytes / 4096,
        pages(K::Normal) + pages(K::Shared) + pages(K::SharedRef),
        pages(K::Compressed),
        pages(K::Zero),
        pages(K::Poisoned)
    )
}

/// A checkpoint extent being read, as the stream's source.
struct ExtentSource(crate::disk::space::StreamReader<crate::memory::SharedDisk>);

impl migrate::Source for ExtentSource {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, migrate::IoError> {
        self.0.read(buf).map_err(|_| migrate::IoError("reading the data disk failed"))
    }
}

fn no_disk<B: Backend>(m: &Manager<B>) -> String {
    format!("no data disk ({})", m.host_mem.swap_missing)
}

fn checkpoint_json(e: &ExtentInfo) -> Value {
    json!({
        "name": e.name.as_str(),
        "bytes": e.bytes,
        "created": e.created,
        "vendor": vendor_name(e.meta[0]),
        "ram_bytes": e.meta[1],
        "complete": e.complete,
        "format_version": format_version(e.meta[0]),
    })
}

/// The image holding checkpoint `name`'s copy of its VM's disk.
pub(super) fn disk_snapshot_name(name: &str) -> String {
    format!("{name}~disk")
}

/// Copies image `disk` into a new image `snap` of the same size; on any
/// failure nothing of `snap` is left.
fn snapshot_disk(space: &mut HostSpace, disk: &str, snap: &str, now: u64) -> Result<(), String> {
    let blocks = space.get(disk).map_err(|e| format!("{e}"))?.blocks;
    space.create_image(snap, blocks, now).map_err(|e| format!("disk snapshot {snap}: {e}"))?;
    let copied = (|| {
        let mut dst =
            Image::create(space.extent_store(snap).map_err(|e| format!("{e}"))?).map_err(|e| format!("{e}"))?;
        let mut src = Image::open(space.extent_store(disk).map_err(|e| format!("{e}"))?).map_err(|e| format!("{e}"))?;
        dst.copy_from(&mut src).map_err(|e| format!("{e}"))
    })();
    if let Err(e) = copied {
        let _ = space.delete(snap, |_| None);
        return Err(format!("disk snapshot {snap}: {e}"));
    }
    Ok(())
}

/// A new image `snap` the size of VM disk `disk`, and the copy-on-write
/// snapshot that fills it from the VM's disk as it is now; on failure
/// nothing of `snap` is left.
fn cow_disk<B: Backend>(m: &mut Manager<B>, disk: &str, snap: &str, now: u64) -> Result<LiveDisk, String> {
    let vm = m.vms.iter().find(|v| v.devices.block_disk().is_some_and(|(d, _)| d == disk));
    let original = vm.and_then(|v| v.devices.block_backend()).ok_or_else(|| format!("no VM serves disk {disk}"))?;
    let space = m.host_mem.space.as_mut().ok_or_else(|| String::from("no data disk"))?;
    let blocks = space.get(disk).map_err(|e| format!("{e}"))?.blocks;
    space.create_image(snap, blocks, now).map_err(|e| format!("disk snapshot {snap}: {e}"))?;
    let made = space
        .extent_store(snap)
        .map_err(|e| format!("{e}"))
        .and_then(|store| Image::create(store).map_err(|e| format!("{e}")))
        .and_then(|image| DiskSnapshot::new(original.disk.clone(), image).map_err(|e| format!("{e}")));
    match made {
        Ok(s) => Ok(LiveDisk { snap: Rc::new(RefCell::new(s)), original }),
        Err(e) => {
            let _ = space.delete(snap, |_| None);
            Err(format!("disk snapshot {snap}: {e}"))
        }
    }
}

/// `vm save <id> <name> [live]`. A VM with a disk image also gets the
/// image copied, at the same instant, into image `<name>~disk` (its
/// initialised part: a disk the guest barely used costs little); `vm
/// restore` puts it back. Paused: everything before the VM runs again.
/// Live: the VM runs on once its vCPU, devices and disk are captured and
/// its memory is under a copy-on-write snapshot; the memory is written
/// between time slices and a line says when the checkpoint is complete.
pub(super) fn save<B: Backend>(
    m: &mut Manager<B>,
    h: &HostStatus,
    id: u32,
    name: &str,
    live: bool,
) -> Result<Reply, String> {
    let now_unix = m.host_epoch + h.uptime_us / 1_000_000;
    let vm = m.get(id).ok_or_else(|| format!("no VM {id}"))?;
    if vm.res.is_none() {
        return Err(format!("vm {id} has ended ({}): nothing to save", vm.state.name()));
    }
    if let Some((other, _)) = m.live_save() {
        return Err(format!("a live save of vm {other} is running; one at a time"));
    }
    let disk = vm.devices.block_disk().map(|(d, _)| String::from(d));
    let snap = disk_snapshot_name(name);
    if disk.is_some() {
        crate::disk::space::ExtentName::new(&snap)
            .map_err(|e| format!("vm {id} has a disk, whose snapshot {snap:?} cannot be named: {e}"))?;
        if m.host_mem.space.as_ref().is_some_and(|s| s.get(&snap).is_ok()) {
            return Err(format!("{snap:?} already exists (a disk snapshot)"));
        }
    }
    let mem_bytes = vm.mem_bytes;
    let backend = m.backend.as_ref().map_err(|e| format!("{e}"))?;
    let (vendor, hz) = (
        match backend.name() {
            "vmx" => VENDOR_INTEL,
            "svm" => VENDOR_AMD,
            _ => 0,
        },
        backend.tsc_hz(),
    );
    if m.host_mem.space.is_none() {
        return Err(format!("no data disk ({})", m.host_mem.swap_missing));
    }
    // The disk snapshot image comes first: the checkpoint's extent takes
    // the largest free stretch until it is closed. Paused, the disk is
    // copied now (the VM does not run during this command); live, it is
    // copied on write while the VM runs.
    let live_disk = match (&disk, live) {
        (Some(d), true) => Some(cow_disk(m, d, &snap, now_unix)?),
        (Some(d), false) => {
            let space = m.host_mem.space.as_mut().expect("checked above");
            snapshot_disk(space, d, &snap, now_unix)?;
            None
        }
        (None, _) => None,
    };
    let space: &mut HostSpace = m.host_mem.space.as_mut().expect("checked above");
    // At most the RAM and its framing; at most the largest free stretch.
    // The extent is trimmed to what was written when it is closed.
    let room = HostSpaceSummary::of(space).largest_free * 512;
    let max = (mem_bytes + mem_bytes / 16 + (1 << 20)).min(room);
    let writer = match space.create_checkpoint(name, max, now_unix, [meta0(vendor), mem_bytes]) {
        Ok(w) => w,
        Err(e) => {
            if disk.is_some() {
                let _ = space.delete(&snap, |_| None);
            }
            return Err(format!("{e}"));
        }
    };
    // The snapshot image goes with the checkpoint, kept or removed.
    let snap_of = disk.as_ref().map(|d| (d.clone(), snap.clone()));
    let target =
        Box::new(ExtentTarget { writer: Some(writer), name: String::from(name), snap: snap_of, id, mem_bytes });
    if live {
        let pause = m.start_live_save(id, target, String::new(), live_disk).map_err(|e| format!("{e}"))?;
        let us = u128::from(pause) * 1_000_000 / u128::from(hz.max(1));
        let snapped = disk.as_ref().map(|d| format!("; disk {d} to image {snap}, copy-on-write")).unwrap_or_default();
        return Ok(Reply {
            text: format!(
                "vm {id}: live save to checkpoint {name} started (paused {us} us{snapped}); the VM runs on while its memory is written"
            ),
            json: json!({ "id": id, "checkpoint": name, "live": true, "pause_us": us as u64, "disk_snapshot": disk.as_ref().map(|_| snap.clone()) }),
        });
    }
    let mut target = target;
    let result = (|| {
        let mut job = m.begin_save(id, false)?;
        while !m.save_step(&mut job, u64::MAX, &mut target)? {}
        m.finish_save(job, &mut target)
    })();
    let saved = match result {
        Ok(s) => s,
        Err(e) => {
            target.abort(&mut m.host_mem);
            return Err(format!("{e}"));
        }
    };
    let line = target.commit(&mut m.host_mem, &saved)?;
    let info = m.host_mem.space.as_ref().and_then(|s| s.get(name).ok()).ok_or_else(|| format!("{name} vanished"))?;
    let stats = &saved.stats;
    use migrate::PageKind as K;
    let pages = |k| stats.pages(k);
    let ms = (u128::from(saved.total_ticks) * 1000 / u128::from(hz.max(1))) as u64;
    Ok(Reply {
        text: crate::manager::save_job::report(&saved, line, hz),
        json: json!({
            "id": id,
            "checkpoint": checkpoint_json(&info),
            "pages": {
                "normal": pages(K::Normal),
                "compressed": pages(K::Compressed),
                "zero": pages(K::Zero),
                "shared": pages(K::Shared) + pages(K::SharedRef),
                "poisoned": pages(K::Poisoned),
            },
            "large_runs": stats.large_runs,
            "ms": ms,
            "staged_writes": saved.drains,
            "disk_snapshot": disk.as_ref().map(|_| snap.clone()),
        }),
    })
}

/// `vm restore <name> [lazy [fill=<pages/s>]]`. Lazily, the VM runs as
/// soon as the checkpoint has been read and checked once; its data pages
/// stay on disk until touched or filled in the background at `lazy` pages
/// a second.
pub(super) fn restore<B: Backend>(m: &mut Manager<B>, name: &str, lazy: Option<u32>) -> Result<Reply, String> {
    let space: &HostSpace = m.host_mem.space.as_ref().ok_or_else(|| no_disk(m))?;
    let reader = match space.get(name) {
        Ok(e) if e.kind != ExtentKind::Checkpoint => Err(format!("{name} is a {}, not a checkpoint", e.kind.name())),
        Ok(_) => space.read_stream(name).map_err(|e| format!("{e}")),
        Err(e) => Err(format!("{e}")),
    }?;
    // The extent again, as a block store the lazy VM's faults read
    // single records from (its own handle on the disk, as the reader's).
    let from = match lazy {
        Some(fill_rate) => Some(LazyFrom {
            checkpoint: String::from(name),
            store: Box::new(space.extent_store(name).map_err(|e| format!("{e}"))?),
            fill_rate,
        }),
        None => None,
    };
    // The disk as it was at the save, if the checkpoint has a copy.
    let snap = disk_snapshot_name(name);
    let snapshot = space.get(&snap).ok().filter(|e| e.kind == ExtentKind::Image).map(|_| snap);
    // The space manager stays in place: the restore opens the VM's disk
    // image through it.
    let restored = match from {
        Some(from) => m.restore_vm_lazy(ExtentSource(reader), snapshot.as_deref(), from),
        None => m.restore_vm_with_disk(ExtentSource(reader), snapshot.as_deref()),
    };
    let id = restored.map_err(|e| format!("checkpoint {name}: {e}"))?;
    let vm = m.get(id).ok_or_else(|| format!("no VM {id}"))?;
    let progress = m.lazy_progress(id);
    let lazily = progress
        .map(|p| {
            format!(
                "; lazy: {} of {} pages left on disk, filled at {} pages/s",
                p.on_disk,
                vm.mem_bytes >> 12,
                p.fill_rate
            )
        })
        .unwrap_or_default();
    Ok(Reply {
        text: format!(
            "vm {id} restored from checkpoint {name}: {} ({}, {} MiB), running{lazily}",
            vm.guest,
            vm.protocol.name(),
            vm.mem_bytes >> 20
        ),
        json: json!({
            "id": id,
            "checkpoint": name,
            "guest": vm.guest,
            "mem_mib": vm.mem_bytes >> 20,
            "lazy": progress.is_some(),
            "pages_on_disk": progress.map_or(0, |p| p.on_disk),
            "fill_pages_per_sec": progress.map(|p| p.fill_rate),
        }),
    })
}

/// Why checkpoint `name` may not be freed now: a lazily restored VM still
/// reads pages from it.
pub(super) fn lazy_user<B: Backend>(m: &Manager<B>, name: &str) -> Result<(), String> {
    match m.host_mem.checkpoint_user(name) {
        Some(id) => Err(format!(
            "checkpoint {name} is in use by vm {id}: its lazy restore still reads {} pages from it (wait for the fill, or stop the VM)",
            m.lazy_progress(id).map_or(0, |p| p.on_disk)
        )),
        None => Ok(()),
    }
}

/// `vm checkpoints`.
pub(super) fn list<B: Backend>(m: &Manager<B>) -> Result<Reply, String> {
    let s = m.host_mem.space.as_ref().ok_or_else(|| no_disk(m))?;
    let cps: Vec<&ExtentInfo> = s.list().iter().filter(|e| e.kind == ExtentKind::Checkpoint).collect();
    let mut text = String::from(
        "NAME                              SIZE(MiB)  RAM(MiB)  VENDOR   FORMAT  CREATED (UTC)        COMPLETE",
    );
    for e in &cps {
        text.push_str(&format!(
            "\n{:<32}  {:>9}  {:>8}  {:<7}  {:<6}  {}  {}",
            e.name.as_str(),
            mib_tenths(e.bytes),
            e.meta[1] >> 20,
            vendor_name(e.meta[0]),
            format_version(e.meta[0]),
            utc_text(e.created),
            if e.complete { "yes" } else { "no (being written)" }
        ));
    }
    let list: Vec<Value> = cps.iter().map(|e| checkpoint_json(e)).collect();
    let reads = format!("{}.{}", migrate::FORMAT_MAJOR, migrate::FORMAT_MINOR);
    Ok(Reply { text, json: json!({ "checkpoints": list, "format_version_read": reads }) })
}

/// `vm checkpoint delete <name>`: checkpoints only (images and swap have
/// `disk delete`).
pub(super) fn delete<B: Backend>(m: &mut Manager<B>, name: &str) -> Result<Reply, String> {
    lazy_user(m, name)?;
    let snap_user = m.disk_user(&disk_snapshot_name(name));
    let live = m.live_save_target();
    let live = live.as_deref();
    let s = m.host_mem.space.as_mut().ok_or_else(|| format!("no data disk ({})", m.host_mem.swap_missing))?;
    let e = s.get(name).map_err(|e| format!("{e}"))?;
    if e.kind != ExtentKind::Checkpoint {
        return Err(format!("{name} is a {}, not a checkpoint", e.kind.name()));
    }
    if !e.complete && live == Some(name) {
        return Err(format!("checkpoint {name} is being written by a live save"));
    }
    let e = s.delete(name, |_| None).map_err(|e| format!("{e}"))?;
    // Its disk snapshot goes with it (unless a VM was given it as a disk).
    let snap = s.delete(&disk_snapshot_name(name), |_| snap_user).ok();
    let freed = e.capacity_bytes() + snap.map_or(0, |x| x.capacity_bytes());
    Ok(Reply {
        text: format!("checkpoint {} deleted ({} MiB freed)", e.name, mib_tenths(freed)),
        json: checkpoint_json(&e),
    })
}
