//! Host disks: the scratch disk that host swap will live on. Under QEMU
//! (q35, no legacy IDE) it is a virtio-blk PCI device; under Bochs (i440fx,
//! no AHCI) the primary ATA channel's slave. The boot disk is never
//! touched: it is QEMU's AHCI disk, and Bochs's ATA master.

pub mod ata;
pub mod virtio;

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use mm::swap::BlockStore;

/// Finds the scratch disk: the first virtio-blk PCI function, else the
/// slave on the primary ATA channel.
///
/// Returns the disk and a one-line description of it (`"virtio-blk
/// 0000:00:03.0, 129024 blocks (63 MiB)"`, `"ata0-slave, 129024 blocks (63
/// MiB), model \"...\""`), or `None` and why there is none (`"no virtio-blk
/// PCI device; ata0-slave: no device"`). Call it once: each call starts the
/// device afresh.
pub fn probe() -> (Option<Box<dyn BlockStore + Send>>, String) {
    let functions = super::pci::scan();
    for f in &functions {
        log::debug!(
            "pci {}: {:04x}:{:04x} class {:02x}.{:02x}.{:02x}",
            f.bdf,
            f.vendor,
            f.device,
            f.class,
            f.subclass,
            f.prog_if
        );
    }
    let virtio_why = match virtio::VirtioDisk::probe(&functions) {
        Ok(Some((disk, text))) => return (Some(Box::new(disk)), text),
        Ok(None) => String::from("no virtio-blk PCI device"),
        Err(why) => why,
    };
    match ata::AtaDisk::probe() {
        Ok((disk, text)) => (Some(Box::new(disk)), text),
        Err(why) => (None, format!("{virtio_why}; {why}")),
    }
}
