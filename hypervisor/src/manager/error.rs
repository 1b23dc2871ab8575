//! Why the manager refused an operation: one variant per refusal, with the
//! values that explain it, so callers can tell them apart (a migration
//! will retry on `OutOfMemory`-like causes, not on `NoVm`). `Display` gives
//! the one-line message the console prints.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use super::{MAX_MEM_MIB, MIN_MEM_MIB};
use crate::backend::Unavailable;
use crate::disk::image::ImageError;
use crate::memory::{MIN_TARGET_PAGES, NoSwap};
use crate::vm::boot::BootError;

#[derive(Debug, PartialEq, Eq)]
pub enum Error {
    /// The host has no usable VT-x or AMD-V; why not.
    NoVirtualization(Unavailable),
    /// No ramdisk guest image has that name.
    NoGuest {
        name: String,
        available: Vec<String>,
    },
    /// No ramdisk file has that name, for a module.
    NoModule(String),
    /// The VM needs a virtio-rng device but this host has no RDRAND.
    NoEntropy,
    /// A state stream (checkpoint) was refused: what and where.
    Stream(migrate::Error),
    /// A checkpoint's contents do not fit a VM here.
    Checkpoint(super::checkpoint::Refused),
    /// A live save (of that VM) is running already: one at a time.
    SaveRunning(u32),
    /// A live save's copy of the VM's disk failed.
    DiskSnapshot(crate::disk::cow::CopyFailed),
    /// Guest RAM outside `MIN_MEM_MIB..=MAX_MEM_MIB`.
    MemSize,
    /// `vcpus=` out of range (the value given).
    VcpuCount(u32),
    /// The memory map for that size could not be built.
    MemoryMap(mm::Error),
    /// The VM's per-page tables would not leave the host its reserve.
    HeapTooSmall {
        mem_mib: u32,
        tables_kib: u64,
        free_kib: u64,
        reserve_kib: u64,
    },
    /// The page-sharing index could not be set up.
    Sharing(mm::Error),
    /// Guest RAM could not be allocated.
    GuestRam {
        mem_mib: u32,
        error: mm::Error,
    },
    /// The image could not be loaded.
    Load {
        name: String,
        error: BootError,
    },
    /// The backend could not create the vCPU.
    Vcpu(vcpu::Error),
    /// No VM has that id.
    NoVm(u32),
    /// The VM has ended (its state's name).
    Ended {
        id: u32,
        state: &'static str,
    },
    /// `vm stop` of a VM that has ended.
    AlreadyEnded {
        id: u32,
        state: &'static str,
    },
    AlreadyStarted(u32),
    NotStarted(u32),
    AlreadyPaused(u32),
    NotPaused(u32),
    /// The guest has not read the serial input sent before.
    SerialInputFull(u32),
    /// A memory target below the minimum.
    TargetTooSmall,
    /// A target below the VM's size needs a swap file, which it lacks.
    NoSwapFile {
        id: u32,
        why: NoSwap,
    },
    /// The VM has no virtio console (it was restored from a checkpoint
    /// made without one).
    NoVirtioConsole(u32),
    /// The VM has no balloon device (restored from a checkpoint without).
    NoBalloon(u32),
    /// A balloon larger than the VM.
    BalloonTooLarge {
        id: u32,
        mib: u32,
        mem_mib: u32,
    },
    /// Data-disk image `name` cannot be a VM's disk.
    Disk {
        name: String,
        /// Boxed: the reasons carry disk errors, and `Error` stays small.
        why: alloc::boxed::Box<DiskRefusal>,
    },
    /// A VM with this id cannot have a switch port: ports are numbered by
    /// VM id and are 16 bits (`net::switch::PortId`).
    NoSwitchPort(u32),
    /// A restored NIC's MAC address is a live VM's NIC's already (the VM
    /// it was saved from still runs): two stations with one address would
    /// make the switch move the address back and forth.
    MacInUse {
        mac: [u8; 6],
        id: u32,
    },
    /// VM `id` is migrating to `to`; `switching`: it is paused for the
    /// switch-over and waits for the destination's confirmation, when no
    /// change may reach it (the destination runs what was sent).
    Migrating {
        id: u32,
        to: String,
        switching: bool,
    },
    /// VM `id` arrived by post-copy and `missing` of its pages are still
    /// to come from `from`: a copy of it now would lack them.
    Arriving {
        id: u32,
        missing: u64,
        from: String,
    },
}

/// Why an image cannot be attached to a VM.
#[derive(Debug, PartialEq, Eq)]
pub enum DiskRefusal {
    /// The host has no data disk (why not).
    NoDataDisk(NoSwap),
    NotFound,
    /// The extent is of another kind (its name).
    NotAnImage(&'static str),
    /// VM `id` uses it.
    InUse(u32),
    /// Its header was refused, or the disk failed reading it.
    Image(ImageError),
}

impl fmt::Display for DiskRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DiskRefusal::NoDataDisk(why) => write!(f, "there is no data disk ({why})"),
            DiskRefusal::NotFound => f.write_str("no such image (disk list shows them; disk create makes one)"),
            DiskRefusal::NotAnImage(kind) => write!(f, "it is a {kind}, not a disk image"),
            DiskRefusal::InUse(id) => write!(f, "vm {id} uses it"),
            DiskRefusal::Image(e) => write!(f, "{e}"),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NoVirtualization(why) => write!(f, "virtualization is unavailable: {why}"),
            Error::NoGuest { name, available } => {
                write!(f, "no guest named {name:?} (available: {})", available.join(", "))
            }
            Error::NoModule(name) => write!(f, "no ramdisk file {name:?} for a module"),
            Error::NoEntropy => {
                f.write_str("this host has no hardware entropy (RDRAND) for the VM's virtio-rng device")
            }
            Error::Stream(e) => write!(f, "{e}"),
            Error::Checkpoint(e) => write!(f, "{e}"),
            Error::SaveRunning(id) => write!(f, "a live save of vm {id} is running; one at a time"),
            Error::DiskSnapshot(e) => write!(f, "disk snapshot: {e}"),
            Error::MemSize => write!(f, "mem must be {MIN_MEM_MIB}..={MAX_MEM_MIB} MiB"),
            Error::VcpuCount(n) => write!(f, "vcpus must be 1..={} (got {n})", crate::devices::MAX_VCPUS),
            Error::MemoryMap(e) => write!(f, "bad memory size: {e}"),
            Error::HeapTooSmall { mem_mib, tables_kib, free_kib, reserve_kib } => write!(
                f,
                "not enough host heap for {mem_mib} MiB of guest RAM: its per-page tables need {tables_kib} KiB, \
                 {free_kib} KiB are free and {reserve_kib} KiB stay reserved for the host"
            ),
            Error::Sharing(e) => write!(f, "cannot set up page sharing: {e}"),
            Error::GuestRam { mem_mib, error } => write!(f, "cannot allocate {mem_mib} MiB of guest RAM: {error}"),
            Error::Load { name, error } => write!(f, "cannot load {name}: {error}"),
            Error::Vcpu(e) => write!(f, "cannot create the vCPU: {e}"),
            Error::NoVm(id) => write!(f, "no VM {id}"),
            Error::Ended { id, state } => write!(f, "vm {id} has {state}"),
            Error::AlreadyEnded { id, state } => write!(f, "vm {id} has already {state}"),
            Error::AlreadyStarted(id) => write!(f, "vm {id} has already started"),
            Error::NotStarted(id) => write!(f, "vm {id} has not started (vm start {id})"),
            Error::AlreadyPaused(id) => write!(f, "vm {id} is already paused"),
            Error::NotPaused(id) => write!(f, "vm {id} is not paused"),
            Error::SerialInputFull(id) => {
                write!(f, "vm {id}'s serial input is full: it has not read what was sent before")
            }
            Error::TargetTooSmall => write!(f, "a target must be at least {} KiB", MIN_TARGET_PAGES * 4),
            Error::NoSwapFile { id, why } => {
                write!(f, "vm {id} cannot be held below its size: it has no swap file ({why})")
            }
            Error::Disk { name, why } => write!(f, "disk {name}: {why}"),
            Error::NoVirtioConsole(id) => write!(f, "vm {id} has no virtio console"),
            Error::NoBalloon(id) => write!(f, "vm {id} has no balloon device"),
            Error::BalloonTooLarge { id, mib, mem_mib } => {
                write!(f, "vm {id} has {mem_mib} MiB: its balloon cannot hold {mib} MiB")
            }
            Error::NoSwitchPort(id) => {
                write!(f, "vm {id} cannot join a switch: ports are numbered by VM id, up to {}", u16::MAX)
            }
            Error::MacInUse { mac, id } => {
                write!(f, "the NIC's MAC address {} is vm {id}'s", crate::net::switch::mac_text(mac))
            }
            Error::Migrating { id, to, switching: true } => write!(
                f,
                "vm {id} is in the switch-over of its migration to {to}, waiting for the destination to confirm: \
                 it cannot change until the migration completes or fails ('vm migrate status {id}')"
            ),
            Error::Migrating { id, to, switching: false } => write!(
                f,
                "vm {id} is migrating to {to} (pre-copy): try again once the migration has ended ('vm migrate status {id}')"
            ),
            Error::Arriving { id, missing, from } => write!(
                f,
                "vm {id} is still arriving by post-copy ({missing} pages to come from {from}): try again once it has \
                 all its memory ('vm stats {id}')"
            ),
        }
    }
}

/// The console's replies carry the message.
impl From<Error> for String {
    fn from(e: Error) -> String {
        alloc::string::ToString::to_string(&e)
    }
}
