//! The host swap device: which disk becomes swap, and the one resource pool
//! every VM's swap file reserves from.
//!
//! Taking a disk over is careful: a disk with a valid swap superblock is
//! reopened (its old contents are stale by the epoch bump), a blank disk
//! (block 0 all zeros, as a fresh scratch image) is formatted, and anything
//! else is refused, so swap never writes over a disk holding other data.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use mm::swap::format::Superblock;
use mm::swap::{
    BLOCK_SIZE, BlockStore, PoolId, PoolStats, ReservationStats, SuperblockRefusal, SwapFile, SwapReservation,
    VmSwapSpec,
};

/// The driver under swap (ATA PIO or virtio-blk, chosen at boot).
pub type SwapDisk = Box<dyn BlockStore>;

/// How the device was taken over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    /// It had a valid swap superblock.
    Reopened,
    /// It was blank and got a fresh superblock.
    Formatted,
}

pub struct Swap {
    res: SwapReservation<SwapDisk>,
    pool: PoolId,
    /// The driver's description of the disk.
    pub device: String,
    pub attached: Attached,
}

impl Swap {
    /// Take `dev` over as the swap device (see the module documentation).
    pub fn attach(mut dev: SwapDisk, device: String) -> Result<Swap, String> {
        let blocks = dev.block_count();
        let mut b0 = [0u8; BLOCK_SIZE];
        dev.read(0, &mut b0).map_err(|e| format!("{device}: cannot read block 0: {e}"))?;
        let (res, attached) = match Superblock::decode(&b0, blocks) {
            Ok(_) => (SwapReservation::open(dev), Attached::Reopened),
            Err(SuperblockRefusal::NoMagic) if b0.iter().all(|&b| b == 0) => {
                (SwapReservation::format(dev), Attached::Formatted)
            }
            Err(why) => return Err(format!("{device}: not used for swap: {why}")),
        };
        let mut res = res.map_err(|e| format!("{device}: {e}"))?;
        let pool = res.create_pool(0);
        Ok(Swap { res, pool, device, attached })
    }

    pub fn stats(&self) -> ReservationStats {
        self.res.stats()
    }

    /// Heap bytes of the swap maps.
    pub fn bookkeeping_bytes(&self) -> u64 {
        self.res.bookkeeping_bytes()
    }

    pub fn pool_stats(&self) -> Option<PoolStats> {
        self.res.pool_stats(self.pool)
    }

    /// Pages VM `vm`'s file holds and may hold, if it has one.
    pub fn file_usage(&self, vm: u32) -> Option<(u64, u64)> {
        self.res.file_stats(vm).map(|f| (f.used, f.limit))
    }

    pub(super) fn file(&mut self, vm: u32) -> Option<SwapFile<'_, SwapDisk>> {
        self.res.file(vm).ok()
    }

    pub(super) fn add_vm(&mut self, spec: VmSwapSpec) -> Result<(), String> {
        self.res.add_vm(self.pool, spec).map_err(|e| format!("{e}"))
    }

    pub(super) fn remove_vm(&mut self, vm: u32) {
        let _ = self.res.remove_vm(vm);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mm::swap::MemBlockStore;

    #[test]
    fn a_blank_disk_is_formatted_then_reopened() {
        let s = Swap::attach(Box::new(MemBlockStore::new(4096)), "mem0".into()).unwrap();
        assert_eq!(s.attached, Attached::Formatted);
        assert!(s.stats().slots > 400, "{:?}", s.stats());
        // Hand the device back and attach again: the superblock is found.
        let dev = s.res.into_device();
        let again = Swap::attach(dev, "mem0".into()).unwrap();
        assert_eq!(again.attached, Attached::Reopened);
    }

    /// Counts writes that reach the device.
    struct Watched(MemBlockStore, alloc::rc::Rc<core::cell::Cell<u64>>);
    impl BlockStore for Watched {
        fn block_count(&self) -> u64 {
            self.0.block_count()
        }
        fn read(&mut self, block: u64, buf: &mut [u8]) -> Result<(), mm::Error> {
            self.0.read(block, buf)
        }
        fn write(&mut self, block: u64, buf: &[u8]) -> Result<(), mm::Error> {
            self.1.set(self.1.get() + 1);
            self.0.write(block, buf)
        }
        fn flush(&mut self) -> Result<(), mm::Error> {
            self.0.flush()
        }
    }

    #[test]
    fn a_disk_with_other_data_is_refused_without_a_write() {
        let mut d = MemBlockStore::new(4096);
        d.raw_mut()[0..4].copy_from_slice(b"\x7fELF");
        let writes = alloc::rc::Rc::new(core::cell::Cell::new(0));
        let e = Swap::attach(Box::new(Watched(d, writes.clone())), "mem0".into()).err().unwrap();
        assert!(e.starts_with("mem0: not used for swap: block 0 has no swap superblock"), "{e}");
        assert_eq!(writes.get(), 0);
        // A blank one is written to (the superblock).
        Swap::attach(Box::new(Watched(MemBlockStore::new(4096), writes.clone())), "mem1".into()).unwrap();
        assert!(writes.get() > 0);
    }

    #[test]
    fn files_reserve_thickly_from_one_pool() {
        let mut s = Swap::attach(Box::new(MemBlockStore::new(4096)), "mem0".into()).unwrap();
        let slots = s.stats().slots;
        s.add_vm(VmSwapSpec { vm: 1, configured_pages: slots, reserved_pages: 10 }).unwrap();
        assert_eq!(s.pool_stats().unwrap().size, slots - 10);
        // A second VM would over-commit the device: refused.
        assert!(s.add_vm(VmSwapSpec { vm: 2, configured_pages: 100, reserved_pages: 0 }).is_err());
        assert_eq!(s.file_usage(1), Some((0, slots - 10)));
        s.remove_vm(1);
        assert_eq!(s.file_usage(1), None);
        s.add_vm(VmSwapSpec { vm: 2, configured_pages: 100, reserved_pages: 0 }).unwrap();
    }
}
