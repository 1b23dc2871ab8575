//! The host data disk and the swap device in it: which disk becomes the
//! data disk, its extent table (`disk::space`), the swap extent, and the
//! one resource pool every VM's swap file reserves from.
//!
//! Taking a disk over is careful, and decided before anything is written:
//! [`classify`] reads the table area (and the blank zone after it); a disk
//! with someone else's data, or with an extent table whose both copies are
//! damaged, is refused without a single write. Only a blank disk, one with
//! our table, or one with the older whole-disk swap superblock (reformatted:
//! see `disk::classify`) gets the self-check, on the blocks of the swap
//! extent (the one the table has, or the one the format will make; the
//! check restores what it overwrote), and only then is the table written:
//! formatted, or reopened (which drops checkpoints never closed). Swap then
//! runs inside the `swap` extent through an `ExtentStore`, unchanged: its
//! superblock is the extent's first block; a reopened one gets an epoch
//! bump (old contents are stale), one that is missing or unusable inside
//! our own extent is simply formatted.

use alloc::boxed::Box;
use alloc::rc::Rc;
use alloc::string::String;
use core::cell::RefCell;
use core::fmt;

use mm::swap::{BlockStore, PoolId, PoolStats, ReservationStats, SwapFile, SwapReservation, VmSwapSpec};

use crate::disk::classify::{DiskKind, Foreign, classify};
use crate::disk::selfcheck::{self, CheckError};
use crate::disk::space::{ExtentName, ExtentStore, FormatOptions, SWAP_NAME, Space, SpaceError};

/// The data disk's driver (ATA PIO or virtio-blk, chosen at boot), shared
/// by the space manager and the swap extent's view. The kernel runs the
/// console and the scheduler on one CPU, so a `RefCell` is the whole of
/// the locking.
pub type SharedDisk = Rc<RefCell<Box<dyn BlockStore>>>;

/// The device under swap: the `swap` extent of the data disk.
pub type SwapDisk = ExtentStore<SharedDisk>;

/// The data disk's space manager.
pub type HostSpace = Space<SharedDisk>;

/// How the device was taken over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    /// It had an extent table.
    Reopened,
    /// It was blank and got a fresh table.
    Formatted,
    /// It held the older whole-disk swap format and got a fresh table.
    Migrated,
}

/// Why a disk did not become the data disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachError {
    /// Reading it to classify it failed; nothing was written.
    Unreadable(mm::Error),
    /// It holds someone else's data; nothing was written.
    Refused(Foreign),
    /// The boot-time self-check failed (the error says whether the old
    /// contents were restored).
    SelfCheck(CheckError),
    /// Formatting or reopening the extent table failed.
    Space(SpaceError),
    /// Formatting or reopening swap in its extent failed.
    Swap(mm::Error),
}

impl fmt::Display for AttachError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttachError::Unreadable(e) => write!(f, "cannot read it to see what it holds: {e}; nothing written"),
            AttachError::Refused(why) => write!(f, "refused without a write: {why}"),
            AttachError::SelfCheck(e) => write!(f, "failed its self-check: {e}"),
            AttachError::Space(e) => write!(f, "extent table: {e}"),
            AttachError::Swap(e) => write!(f, "not used for swap: {e}"),
        }
    }
}

/// The boot-time self-check that preceded the take-over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SelfCheck {
    /// The first block it used, on the disk (not in the extent).
    pub first: u64,
    /// How long it took, with save and restore (microseconds).
    pub micros: u64,
}

pub struct Swap {
    res: SwapReservation<SwapDisk>,
    pool: PoolId,
    /// The driver's description of the disk.
    pub device: String,
    pub attached: Attached,
    pub check: SelfCheck,
}

impl Swap {
    /// Take `dev` over as the data disk and start swap in its `swap`
    /// extent (see the module documentation). `opts` lays out a disk that
    /// gets a fresh table, `unix_now` dates its swap extent, `now_us` times
    /// the self-check.
    pub fn attach(
        mut dev: Box<dyn BlockStore>,
        device: String,
        opts: &FormatOptions,
        unix_now: u64,
        now_us: fn() -> u64,
    ) -> Result<(Swap, HostSpace), AttachError> {
        // One classification decides whether anything may be written, where
        // the swap extent is for the check, and whether to format or reopen.
        let kind = classify(dev.as_mut()).map_err(AttachError::Unreadable)?;
        let (start, blocks) = match &kind {
            DiskKind::Foreign(why) => return Err(AttachError::Refused(*why)),
            DiskKind::Space { table, .. } => {
                let swap = table.extents.iter().find(|e| e.name.as_str() == SWAP_NAME);
                let swap = swap.ok_or(AttachError::Space(SpaceError::NotFound(ExtentName::SWAP)))?;
                (swap.start, swap.blocks)
            }
            DiskKind::Blank | DiskKind::OldSwap(_) => {
                opts.swap_extent(dev.block_count()).map_err(AttachError::Space)?
            }
        };
        let shared: SharedDisk = Rc::new(RefCell::new(dev));
        let start_us = now_us();
        let mut view = ExtentStore::new(shared.clone(), start, blocks);
        let first = selfcheck::check(&mut view).map_err(AttachError::SelfCheck)?;
        let check = SelfCheck { first: start + first, micros: now_us().wrapping_sub(start_us) };
        let (space, attached) = match kind {
            DiskKind::Space { .. } => (Space::open(shared), Attached::Reopened),
            DiskKind::OldSwap(_) => (Space::format(shared, opts, unix_now), Attached::Migrated),
            _ => (Space::format(shared, opts, unix_now), Attached::Formatted),
        };
        let space = space.map_err(AttachError::Space)?;
        let view = || space.extent_store(SWAP_NAME).map_err(AttachError::Space);
        let res = match attached {
            // Reopen our own swap; if its superblock is missing or unusable
            // (a crash between the table and the swap format), the extent is
            // ours all the same: format it.
            Attached::Reopened => match SwapReservation::open(view()?) {
                Err(mm::Error::SwapDeviceRefused(_)) => SwapReservation::format(view()?),
                other => other,
            },
            _ => SwapReservation::format(view()?),
        };
        let mut res = res.map_err(AttachError::Swap)?;
        let pool = res.create_pool(0);
        Ok((Swap { res, pool, device, attached, check }, space))
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

    pub(super) fn add_vm(&mut self, spec: VmSwapSpec) -> Result<(), super::NoSwap> {
        self.res.add_vm(self.pool, spec).map_err(super::NoSwap::File)
    }

    pub(super) fn remove_vm(&mut self, vm: u32) {
        let _ = self.res.remove_vm(vm);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::classify::BLANK_BLOCKS;
    use crate::disk::selfcheck::{CHECK_BLOCKS, Fault};
    use alloc::rc::Rc;
    use alloc::vec::Vec;
    use core::cell::RefCell;
    use mm::swap::format::Superblock;
    use mm::swap::{BLOCK_SIZE, MemBlockStore, SuperblockRefusal};

    fn no_clock() -> u64 {
        0
    }

    /// A disk the test keeps a handle on after handing it to `attach`.
    #[derive(Clone)]
    struct Shared(Rc<RefCell<MemBlockStore>>);
    impl Shared {
        fn new(d: MemBlockStore) -> Self {
            Shared(Rc::new(RefCell::new(d)))
        }
        fn raw(&self) -> Vec<u8> {
            self.0.borrow().raw().to_vec()
        }
    }
    /// Half of an 8 MiB disk is swap (the 16 MiB floor is off).
    const OPTS: FormatOptions = FormatOptions { swap_percent: 50, min_swap_blocks: 0 };

    fn attach_with(d: &Shared, opts: &FormatOptions) -> Result<Swap, AttachError> {
        Swap::attach(Box::new(d.0.clone()), "mem0".into(), opts, 1_700_000_000, no_clock).map(|(swap, _)| swap)
    }

    fn attach(d: &Shared) -> Result<Swap, AttachError> {
        attach_with(d, &FormatOptions::default())
    }

    #[test]
    fn a_blank_disk_is_checked_formatted_then_reopened() {
        let d = Shared::new(MemBlockStore::new(16_384));
        let (s, space) = Swap::attach(Box::new(d.0.clone()), "mem0".into(), &OPTS, 5, no_clock).unwrap();
        assert_eq!(s.attached, Attached::Formatted);
        let ext = space.get("swap").unwrap();
        assert_eq!((ext.start, ext.blocks, ext.created), (32, 8176, 5));
        // The check ran on the swap extent's last slot, not the disk's.
        assert_eq!(s.check.first, 32 + 8176 - CHECK_BLOCKS);
        assert_eq!(s.stats().slots, (8176 - 1) / 9);
        // The table is in front of swap, and the rest is free for images.
        assert_eq!(space.free_blocks(), 16_384 - 32 - 8176);
        drop((s, space));
        // Attach again: the table is found, swap reopened in its extent.
        let again = attach_with(&d, &OPTS).unwrap();
        assert_eq!(again.attached, Attached::Reopened);
        assert_eq!(again.stats().slots, (8176 - 1) / 9);
    }

    #[test]
    fn images_survive_a_reattach_and_unclosed_checkpoints_do_not() {
        let d = Shared::new(MemBlockStore::new(16_384));
        let (s, mut space) = Swap::attach(Box::new(d.0.clone()), "mem0".into(), &OPTS, 5, no_clock).unwrap();
        space.create_image("web", 2048, 6).unwrap();
        let mut w = space.create_checkpoint("half", 4096, 7, [0; 2]).unwrap();
        w.write_all(b"partial").unwrap();
        drop(w);
        drop((s, space));
        let (s, space) = Swap::attach(Box::new(d.0.clone()), "mem0".into(), &OPTS, 8, no_clock).unwrap();
        assert_eq!(s.attached, Attached::Reopened);
        let names: Vec<&str> = space.list().iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["swap", "web"]);
        assert_eq!(space.dropped().len(), 1);
    }

    #[test]
    fn an_old_whole_disk_swap_device_is_migrated_to_a_table() {
        let d = our_swap_disk();
        let s = attach_with(&d, &OPTS).unwrap();
        assert_eq!(s.attached, Attached::Migrated);
        assert_eq!(s.stats().slots, (2032 - 1) / 9);
        let raw = d.raw();
        assert_eq!(&raw[..7], b"HVSPACE", "block 0 now holds the table");
    }

    #[test]
    fn a_table_with_both_copies_damaged_is_refused_without_a_write() {
        let d = Shared::new(MemBlockStore::new(4096));
        drop(attach_with(&d, &OPTS).unwrap());
        d.0.borrow_mut().corrupt(3, 0, 1);
        d.0.borrow_mut().corrupt(17, 0, 1);
        let before = d.raw();
        let writes = d.0.borrow().stats().writes;
        let e = attach(&d).err().unwrap();
        assert!(matches!(e, AttachError::Refused(Foreign::DamagedTable { .. })), "{e:?}");
        assert_eq!(d.0.borrow().stats().writes, writes);
        assert!(d.raw() == before);
    }

    /// Disks holding someone else's data, as a whole-system test would
    /// give them: every byte must survive the boot path.
    fn foreign_disks() -> Vec<(&'static str, MemBlockStore)> {
        let mut v = Vec::new();
        let mut d = MemBlockStore::new(4096);
        for (i, b) in d.raw_mut().iter_mut().enumerate() {
            *b = (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3] | 1;
        }
        v.push(("filled with a pattern", d));
        let mut d = MemBlockStore::new(4096);
        d.raw_mut()[0..4].copy_from_slice(b"\x7fELF");
        v.push(("an ELF header in block 0", d));
        // ext2: block 0 and 1 zero, the superblock's magic 0xef53 at 1080.
        let mut d = MemBlockStore::new(4096);
        d.raw_mut()[1080..1082].copy_from_slice(&[0x53, 0xef]);
        v.push(("ext2, block 0 zero", d));
        // Data only in the last blocks, where the self-check writes, and
        // a non-blank block 0.
        let mut d = MemBlockStore::new(4096);
        d.raw_mut()[510..512].copy_from_slice(&[0x55, 0xaa]);
        let n = d.raw().len();
        d.raw_mut()[n - 512..].fill(0xee);
        v.push(("a boot sector and a GPT backup", d));
        // Another build's swap device (a damaged or resized superblock).
        let mut d = MemBlockStore::new(4096);
        let mut sb = Superblock::for_device(8192, 3).unwrap().encode();
        d.raw_mut()[..BLOCK_SIZE].copy_from_slice(&sb);
        v.push(("swap for another size", d));
        sb[40] ^= 1;
        let mut d = MemBlockStore::new(4096);
        d.raw_mut()[..BLOCK_SIZE].copy_from_slice(&sb);
        v.push(("damaged swap", d));
        v
    }

    #[test]
    fn a_foreign_disk_is_refused_and_not_one_byte_changes() {
        for (what, d) in foreign_disks() {
            let d = Shared::new(d);
            let before = d.raw();
            let e = attach(&d).err().unwrap_or_else(|| panic!("{what}: attached"));
            assert!(matches!(e, AttachError::Refused(_)), "{what}: {e:?}");
            assert!(e.to_string().starts_with("refused without a write: block 0 has "), "{what}: {e}");
            let s = d.0.borrow().stats();
            assert_eq!((s.writes, s.flushes), (0, 0), "{what}: written to");
            assert!(d.raw() == before, "{what}: contents changed");
        }
        let e = attach(&Shared::new(foreign_disks().remove(2).1)).err().unwrap();
        assert_eq!(
            e.to_string(),
            "refused without a write: block 0 has no swap superblock and block 2 holds data (not blank)"
        );
        let e = attach(&Shared::new(foreign_disks().remove(5).1)).err().unwrap();
        assert_eq!(e, AttachError::Refused(Foreign::Unusable(SuperblockRefusal::BadChecksum)));
    }

    #[test]
    fn an_unreadable_disk_is_not_written() {
        let mut d = MemBlockStore::new(4096);
        d.fail_next_reads(1);
        let d = Shared::new(d);
        let e = attach(&d).err().unwrap();
        assert_eq!(e, AttachError::Unreadable(mm::Error::BlockIo { block: 0, write: false }));
        assert_eq!(d.0.borrow().stats().writes, 0);
    }

    /// Our swap device from an earlier run, with data in the last slot
    /// (where the self-check writes).
    fn our_swap_disk() -> Shared {
        let mut d = MemBlockStore::new(4096);
        d.raw_mut()[..BLOCK_SIZE].copy_from_slice(&Superblock::for_device(4096, 1).unwrap().encode());
        let n = d.raw().len();
        for (i, b) in d.raw_mut()[n - CHECK_BLOCKS as usize * BLOCK_SIZE..].iter_mut().enumerate() {
            *b = i as u8 ^ 0x5a;
        }
        Shared::new(d)
    }

    #[test]
    fn a_failed_self_check_restores_the_disk_and_does_not_attach() {
        // A lost pattern write (a mismatch), then a failed read-back: the
        // disk is given up, with what it held put back.
        let d = our_swap_disk();
        let before = d.raw();
        d.0.borrow_mut().lose_next_writes(1);
        let e = attach(&d).err().unwrap();
        assert!(matches!(e, AttachError::SelfCheck(CheckError::Failed(Fault::Mismatch { .. }))), "{e:?}");
        assert!(d.raw() == before, "the mismatch left the pattern behind");

        let d = our_swap_disk();
        // Classification reads the table area once (block 0 holds an old
        // superblock); the check's first read saves, the second is the
        // read-back.
        d.0.borrow_mut().fail_reads_after(2, 1);
        let e = attach(&d).err().unwrap();
        assert!(matches!(e, AttachError::SelfCheck(CheckError::Failed(Fault::ReadBack(_)))), "{e:?}");
        assert!(d.raw() == before, "the failed read-back left the pattern behind");

        // A restore that never lands: said loudly, and swap is not started.
        let d = our_swap_disk();
        d.0.borrow_mut().fail_writes_after(1, selfcheck::RESTORE_ATTEMPTS);
        let e = attach(&d).err().unwrap();
        assert!(e.to_string().contains("RESTORING THE OLD CONTENTS FAILED"), "{e}");
        assert_eq!(d.raw()[..BLOCK_SIZE], before[..BLOCK_SIZE], "the superblock was rewritten");
    }

    #[test]
    fn a_blank_disk_that_fails_its_check_is_not_formatted() {
        let mut d = MemBlockStore::new(4096);
        d.lose_next_writes(1);
        let d = Shared::new(d);
        let e = attach(&d).err().unwrap();
        assert!(matches!(e, AttachError::SelfCheck(_)), "{e:?}");
        assert!(d.raw().iter().all(|&b| b == 0), "a superblock or the pattern was written");
        let blank = BLANK_BLOCKS.min(4096);
        assert_eq!(d.0.borrow().stats().blocks_read, blank + 2 * CHECK_BLOCKS + CHECK_BLOCKS);
    }

    #[test]
    fn files_reserve_thickly_from_one_pool() {
        let mut s = attach(&Shared::new(MemBlockStore::new(4096))).unwrap();
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
