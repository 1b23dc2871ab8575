//! The thick swap reservation, its pools, and the thin per-VM swap files.

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use super::VmId;
use super::block::{BLOCK_SIZE, BlockStore};
use super::format::{FIRST_SLOT_BLOCK, PAGE_BYTES, SLOT_BLOCKS, SLOT_BYTES, SlotHeader, SlotRefusal, Superblock};
use crate::Error;
use crate::addr::GuestPhysAddr;
use crate::swap_hook::{PageStore, SlotWord};

/// A resource pool: a set of VMs whose swap is reserved together.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct PoolId(pub u32);

/// A VM's memory configuration as far as swap is concerned.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct VmSwapSpec {
    /// The VM.
    pub vm: VmId,
    /// Guest memory, in 4 KiB pages.
    pub configured_pages: u64,
    /// Host memory guaranteed to the VM (never reclaimed), in pages.
    pub reserved_pages: u64,
}

impl VmSwapSpec {
    /// The most the host can ever reclaim from this VM, so the most its
    /// swap file can hold: configured memory minus the guarantee.
    pub const fn max_reclaim(&self) -> u64 {
        self.configured_pages.saturating_sub(self.reserved_pages)
    }
}

/// A handle to one swapped-out page: the slot and the page-out's
/// generation. A handle that outlives its page (released, or the VM's file
/// removed) is refused on page-in because the generation no longer matches.
///
/// Both halves are 32 bits so the handle packs into the one word per page
/// that `VmMemory` keeps ([`SlotWord`]). The generation wraps after 2^32
/// page-outs; a stale handle would then need the same slot *and* the same
/// generation modulo 2^32 to pass, on top of the header's address check.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct SwapSlot {
    index: u32,
    generation: u32,
}

impl SlotWord for SwapSlot {
    fn to_word(self) -> u64 {
        u64::from(self.generation) << 32 | u64::from(self.index)
    }

    fn from_word(word: u64) -> Self {
        SwapSlot { index: word as u32, generation: (word >> 32) as u32 }
    }
}

impl SwapSlot {
    /// The slot's index on the device.
    pub fn index(self) -> u32 {
        self.index
    }

    /// The page-out's generation (unique within the reservation's run).
    pub fn generation(self) -> u64 {
        u64::from(self.generation)
    }

    /// The device block where the slot starts.
    pub fn first_block(self) -> u64 {
        slot_block(self.index)
    }
}

/// Totals over the whole reservation.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ReservationStats {
    /// Slots the device holds.
    pub slots: u64,
    /// Slots taken out of use after a failed write.
    pub retired: u64,
    /// Slots reserved by pools (the thick reservation: sum of pool sizes).
    pub reserved: u64,
    /// Slots currently holding pages in some VM's file.
    pub in_files: u64,
}

/// One pool's reservation and use.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct PoolStats {
    /// Pages reserved for the pool: the most its VMs can have swapped.
    pub size: u64,
    /// Pages in its VMs' files.
    pub in_files: u64,
    /// `size - in_files`: reserved, not yet in any file.
    pub free: u64,
    /// VMs in the pool.
    pub vms: usize,
}

/// One VM's swap file.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct FileStats {
    /// The pool it reserves from.
    pub pool: PoolId,
    /// Pages in the file.
    pub used: u64,
    /// The most it may hold (the VM's maximum reclaim).
    pub limit: u64,
}

#[derive(Clone, Copy, Debug)]
struct Pool {
    /// Pool-level guarantee: its VMs together keep at least this much.
    reserved_pages: u64,
    sum_configured: u64,
    sum_vm_reserved: u64,
    vms: usize,
    in_files: u64,
}

impl Pool {
    /// The most that can be reclaimed from the pool's VMs together: all
    /// their memory minus the larger of the pool's guarantee and the sum of
    /// their own.
    fn size(&self) -> u64 {
        self.sum_configured.saturating_sub(self.sum_vm_reserved.max(self.reserved_pages))
    }
}

#[derive(Clone, Copy, Debug)]
struct File {
    pool: PoolId,
    spec: VmSwapSpec,
    used: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Owner {
    Free,
    Vm(VmId),
    /// A write to the slot failed; the slot is never used again this run.
    Retired,
}

#[derive(Clone, Copy, Debug)]
struct SlotMeta {
    owner: Owner,
    generation: u32,
}

fn slot_block(index: u32) -> u64 {
    FIRST_SLOT_BLOCK + u64::from(index) * SLOT_BLOCKS
}

/// A swap device formatted for host swap, owning the device, its pools and
/// every VM's swap file.
///
/// The reservation is thick: creating or growing a pool takes its whole
/// maximum reclaim out of the device's capacity at once, and fails if the
/// device cannot hold it, so a page-out inside a VM's limit never finds
/// the device full. Files are thin: they hold only the slots they use,
/// taking them from their pool's reservation on page-out and giving them
/// back on release or when the VM is removed, so `reserved` stays fixed
/// while slots move between files.
pub struct SwapReservation<D: BlockStore> {
    dev: D,
    sb: Superblock,
    /// Per-slot owner, only as far as slots were ever used: the table grows
    /// with use rather than with the device.
    meta: Vec<SlotMeta>,
    free: Vec<u32>,
    retired: u64,
    pools: Vec<Option<Pool>>,
    files: BTreeMap<VmId, File>,
    reserved: u64,
    in_files: u64,
    /// Never 0 (the generation of a slot never used).
    next_generation: u32,
    /// One slot's bytes: page-ins are read here and verified before a byte
    /// reaches the caller's page; kept to avoid a 4.5 KiB stack buffer.
    scratch: Box<[u8; SLOT_BYTES]>,
}

impl<D: BlockStore> core::fmt::Debug for SwapReservation<D> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SwapReservation").field("superblock", &self.sb).field("stats", &self.stats()).finish()
    }
}

impl<D: BlockStore> SwapReservation<D> {
    /// Write a fresh superblock to `dev` and take it over. This is the
    /// operator's explicit "make this a swap device"; the kernel otherwise
    /// uses [`open`](Self::open), which refuses devices that are not.
    pub fn format(mut dev: D) -> Result<Self, Error> {
        let blocks = dev.block_count();
        // Continue an existing device's epoch so its old slots stay stale.
        let epoch = match Self::read_superblock(&mut dev) {
            Ok(old) => old.epoch.wrapping_add(1),
            Err(Error::SwapDeviceRefused(_)) => 1,
            Err(e) => return Err(e),
        };
        let sb = Superblock::for_device(blocks, epoch).map_err(Error::SwapDeviceRefused)?;
        Self::start(dev, sb)
    }

    /// Take over a device formatted by [`format`](Self::format), refusing
    /// one whose superblock is missing, damaged, of another version or for
    /// another device size. Swap contents do not survive a restart, so the
    /// epoch is bumped: every slot written before is stale from now on.
    pub fn open(mut dev: D) -> Result<Self, Error> {
        let mut sb = Self::read_superblock(&mut dev)?;
        sb.epoch = sb.epoch.wrapping_add(1);
        Self::start(dev, sb)
    }

    fn read_superblock(dev: &mut D) -> Result<Superblock, Error> {
        let blocks = dev.block_count();
        if blocks == 0 {
            return Err(Error::SwapDeviceRefused(super::SuperblockRefusal::TooSmall { blocks }));
        }
        let mut b = [0; BLOCK_SIZE];
        dev.read(0, &mut b)?;
        Superblock::decode(&b, blocks).map_err(Error::SwapDeviceRefused)
    }

    fn start(mut dev: D, sb: Superblock) -> Result<Self, Error> {
        dev.write(0, &sb.encode())?;
        // The epoch must be on the medium before slots stamped with it are.
        dev.flush()?;
        Ok(Self {
            dev,
            sb,
            meta: Vec::new(),
            free: Vec::new(),
            retired: 0,
            pools: Vec::new(),
            files: BTreeMap::new(),
            reserved: 0,
            in_files: 0,
            next_generation: 1,
            scratch: Box::new([0; SLOT_BYTES]),
        })
    }

    /// Heap bytes the reservation's own maps use (per-slot owners, free
    /// list, pools, files, the page-in scratch buffer).
    pub fn bookkeeping_bytes(&self) -> u64 {
        (self.meta.capacity() * core::mem::size_of::<SlotMeta>()
            + self.free.capacity() * 4
            + self.pools.capacity() * core::mem::size_of::<Option<Pool>>()
            + self.files.len() * (core::mem::size_of::<VmId>() + core::mem::size_of::<File>())
            + SLOT_BYTES) as u64
    }

    /// Give the device back. Every swapped page is lost; callers do this
    /// at shutdown, after their VMs ended.
    pub fn into_device(self) -> D {
        self.dev
    }

    /// The device (tests inject faults through it).
    pub fn device(&self) -> &D {
        &self.dev
    }

    /// The device, mutably. Writing to it behind the reservation's back
    /// can only make page-ins fail their checks, never return wrong data.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.dev
    }

    /// The superblock in force (with this run's epoch).
    pub fn superblock(&self) -> Superblock {
        self.sb
    }

    /// Totals over the device.
    pub fn stats(&self) -> ReservationStats {
        ReservationStats {
            slots: self.sb.slots,
            retired: self.retired,
            reserved: self.reserved,
            in_files: self.in_files,
        }
    }

    /// Slots that can still be reserved by new or growing pools.
    pub fn unreserved(&self) -> u64 {
        self.usable().saturating_sub(self.reserved)
    }

    fn usable(&self) -> u64 {
        self.sb.slots - self.retired
    }

    /// Refuse a change that moves the total reservation from `old` to
    /// `new` pages for one pool if the device cannot hold it.
    fn check_fit(&self, old: u64, new: u64) -> Result<(), Error> {
        let requested = self.reserved - old + new;
        // Shrinking is always allowed, even when retired slots left the
        // device overcommitted.
        if new > old && requested > self.usable() {
            return Err(Error::SwapReservationTooLarge { requested, available: self.usable() });
        }
        Ok(())
    }

    fn pool(&self, pool: PoolId) -> Result<&Pool, Error> {
        self.pools.get(pool.0 as usize).and_then(Option::as_ref).ok_or(Error::UnknownSwapPool(pool.0))
    }

    /// A new, empty resource pool whose VMs together keep at least
    /// `reserved_pages` (0: only their own guarantees). Its reservation
    /// grows as VMs are added.
    pub fn create_pool(&mut self, reserved_pages: u64) -> PoolId {
        let pool = Pool { reserved_pages, sum_configured: 0, sum_vm_reserved: 0, vms: 0, in_files: 0 };
        let id = match self.pools.iter().position(Option::is_none) {
            Some(i) => {
                self.pools[i] = Some(pool);
                i
            }
            None => {
                self.pools.push(Some(pool));
                self.pools.len() - 1
            }
        };
        PoolId(id as u32)
    }

    /// A pool with `vms` in it, reserved in one step: either all of it fits
    /// on the device or nothing changes.
    pub fn create_pool_with(&mut self, reserved_pages: u64, vms: &[VmSwapSpec]) -> Result<PoolId, Error> {
        let mut p = Pool { reserved_pages, sum_configured: 0, sum_vm_reserved: 0, vms: 0, in_files: 0 };
        for (i, s) in vms.iter().enumerate() {
            if self.files.contains_key(&s.vm) || vms[..i].iter().any(|o| o.vm == s.vm) {
                return Err(Error::SwapFileExists(s.vm));
            }
            p.sum_configured = p.sum_configured.saturating_add(s.configured_pages);
            p.sum_vm_reserved = p.sum_vm_reserved.saturating_add(s.reserved_pages.min(s.configured_pages));
        }
        self.check_fit(0, p.size())?;
        let id = self.create_pool(reserved_pages);
        for s in vms {
            self.files.insert(s.vm, File { pool: id, spec: *s, used: 0 });
        }
        p.vms = vms.len();
        self.reserved += p.size();
        self.pools[id.0 as usize] = Some(p);
        Ok(id)
    }

    /// Apply `change` to a copy of `pool`; commit it only if the pool still
    /// covers what its files hold and the device still holds the total.
    fn resize_pool(&mut self, pool: PoolId, change: impl FnOnce(&mut Pool)) -> Result<(), Error> {
        let old = *self.pool(pool)?;
        let mut new = old;
        change(&mut new);
        if new.size() < new.in_files {
            return Err(Error::SwapShrinkBelowUse { in_use: new.in_files, requested: new.size() });
        }
        self.check_fit(old.size(), new.size())?;
        self.reserved = self.reserved - old.size() + new.size();
        self.pools[pool.0 as usize] = Some(new);
        Ok(())
    }

    /// Add a VM (and its empty swap file) to `pool`, growing the pool's
    /// reservation by what the VM adds to its maximum reclaim.
    pub fn add_vm(&mut self, pool: PoolId, spec: VmSwapSpec) -> Result<(), Error> {
        if self.files.contains_key(&spec.vm) {
            return Err(Error::SwapFileExists(spec.vm));
        }
        self.resize_pool(pool, |p| {
            p.sum_configured = p.sum_configured.saturating_add(spec.configured_pages);
            p.sum_vm_reserved = p.sum_vm_reserved.saturating_add(spec.reserved_pages.min(spec.configured_pages));
            p.vms += 1;
        })?;
        self.files.insert(spec.vm, File { pool, spec, used: 0 });
        Ok(())
    }

    /// Change a VM's memory configuration (hot-add, a new guarantee). Its
    /// file's limit and its pool's reservation follow; refused if the device
    /// cannot hold the growth or the file already holds more than the new
    /// limit.
    pub fn set_vm_spec(&mut self, spec: VmSwapSpec) -> Result<(), Error> {
        let file = *self.files.get(&spec.vm).ok_or(Error::UnknownSwapFile(spec.vm))?;
        if spec.max_reclaim() < file.used {
            return Err(Error::SwapShrinkBelowUse { in_use: file.used, requested: spec.max_reclaim() });
        }
        let old = file.spec;
        self.resize_pool(file.pool, |p| {
            p.sum_configured = p.sum_configured - old.configured_pages + spec.configured_pages;
            p.sum_vm_reserved = p.sum_vm_reserved - old.reserved_pages.min(old.configured_pages)
                + spec.reserved_pages.min(spec.configured_pages);
        })?;
        if let Some(f) = self.files.get_mut(&spec.vm) {
            f.spec = spec;
        }
        Ok(())
    }

    /// Change a pool's own guarantee.
    pub fn set_pool_reservation(&mut self, pool: PoolId, reserved_pages: u64) -> Result<(), Error> {
        self.resize_pool(pool, |p| p.reserved_pages = reserved_pages)
    }

    /// The VM ended: every slot of its file goes back (to its pool and the
    /// device), and the pool's reservation shrinks by the VM's share.
    /// Returns the slots freed.
    pub fn remove_vm(&mut self, vm: VmId) -> Result<u64, Error> {
        let file = self.files.remove(&vm).ok_or(Error::UnknownSwapFile(vm))?;
        let mut freed = 0;
        for (i, m) in self.meta.iter_mut().enumerate() {
            if m.owner == Owner::Vm(vm) {
                m.owner = Owner::Free;
                self.free.push(i as u32);
                freed += 1;
            }
        }
        debug_assert_eq!(freed, file.used);
        self.in_files -= freed;
        let spec = file.spec;
        let pool = self.pools[file.pool.0 as usize].as_mut().expect("a file's pool exists");
        let old = pool.size();
        pool.in_files -= freed;
        pool.sum_configured -= spec.configured_pages;
        pool.sum_vm_reserved -= spec.reserved_pages.min(spec.configured_pages);
        pool.vms -= 1;
        self.reserved = self.reserved - old + pool.size();
        Ok(freed)
    }

    /// Remove every VM of `pool` and the pool itself; returns slots freed.
    pub fn destroy_pool(&mut self, pool: PoolId) -> Result<u64, Error> {
        self.pool(pool)?;
        let vms: Vec<VmId> = self.files.iter().filter(|(_, f)| f.pool == pool).map(|(&vm, _)| vm).collect();
        let mut freed = 0;
        for vm in vms {
            freed += self.remove_vm(vm)?;
        }
        let p = self.pools[pool.0 as usize].take().expect("checked above");
        self.reserved -= p.size();
        Ok(freed)
    }

    /// A pool's reservation and use.
    pub fn pool_stats(&self, pool: PoolId) -> Option<PoolStats> {
        let p = self.pool(pool).ok()?;
        Some(PoolStats { size: p.size(), in_files: p.in_files, free: p.size() - p.in_files, vms: p.vms })
    }

    /// A VM's swap file.
    pub fn file_stats(&self, vm: VmId) -> Option<FileStats> {
        self.files.get(&vm).map(|f| FileStats { pool: f.pool, used: f.used, limit: f.spec.max_reclaim() })
    }

    /// The VM's swap file as a [`PageStore`], borrowing the reservation
    /// for as long as it is used.
    pub fn file(&mut self, vm: VmId) -> Result<SwapFile<'_, D>, Error> {
        if !self.files.contains_key(&vm) {
            return Err(Error::UnknownSwapFile(vm));
        }
        Ok(SwapFile { res: self, vm })
    }

    /// Take a slot for `vm`'s file, within its limit and its pool's.
    fn take_slot(&mut self, vm: VmId) -> Result<u32, Error> {
        let file = self.files.get(&vm).ok_or(Error::UnknownSwapFile(vm))?;
        let pool = self.pool(file.pool)?;
        if file.used >= file.spec.max_reclaim() || pool.in_files >= pool.size() {
            return Err(Error::PageStoreFull);
        }
        if let Some(i) = self.free.pop() {
            return Ok(i);
        }
        // Slots never used yet, in device order; the table grows here.
        let next = self.meta.len() as u64;
        if next >= self.sb.slots || self.meta.try_reserve(1).is_err() || self.free.try_reserve(1).is_err() {
            // Only reachable after retirements overcommitted the device,
            // or when the host is out of memory for the table.
            return Err(Error::PageStoreFull);
        }
        self.meta.push(SlotMeta { owner: Owner::Free, generation: 0 });
        Ok(next as u32)
    }

    fn page_out(&mut self, vm: VmId, gpa: GuestPhysAddr, page: &[u8; PAGE_BYTES]) -> Result<SwapSlot, Error> {
        let index = self.take_slot(vm)?;
        let generation = self.next_generation;
        self.next_generation = self.next_generation.checked_add(1).unwrap_or(1);
        let header = SlotHeader { slot: index, epoch: self.sb.epoch, generation: u64::from(generation), vm, gpa };
        header.encode_slot(page, &mut self.scratch);
        if let Err(e) = self.dev.write(slot_block(index), &self.scratch[..]) {
            // The caller still has the page, so nothing is lost. A sector
            // that failed a write tends to fail again: retire the slot
            // rather than hand it to the next page-out.
            self.meta[index as usize].owner = Owner::Retired;
            self.retired += 1;
            return Err(e);
        }
        self.meta[index as usize] = SlotMeta { owner: Owner::Vm(vm), generation };
        let file = self.files.get_mut(&vm).expect("take_slot checked the file");
        file.used += 1;
        let pool = file.pool;
        self.pools[pool.0 as usize].as_mut().expect("take_slot checked the pool").in_files += 1;
        self.in_files += 1;
        Ok(SwapSlot { index, generation })
    }

    fn owns(&self, vm: VmId, slot: SwapSlot) -> bool {
        self.meta.get(slot.index as usize).is_some_and(|m| m.owner == Owner::Vm(vm) && m.generation == slot.generation)
    }

    fn page_in(
        &mut self,
        vm: VmId,
        slot: SwapSlot,
        gpa: GuestPhysAddr,
        page: &mut [u8; PAGE_BYTES],
    ) -> Result<(), Error> {
        if !self.owns(vm, slot) {
            return Err(Error::SwapSlotCorrupt { gpa, reason: SlotRefusal::NotAllocated });
        }
        self.dev.read(slot_block(slot.index), &mut self.scratch[..])?;
        let expect =
            SlotHeader { slot: slot.index, epoch: self.sb.epoch, generation: u64::from(slot.generation), vm, gpa };
        expect.verify_slot(&self.scratch).map_err(|reason| Error::SwapSlotCorrupt { gpa, reason })?;
        page.copy_from_slice(&self.scratch[BLOCK_SIZE..]);
        Ok(())
    }

    fn release(&mut self, vm: VmId, slot: SwapSlot) {
        // A stale or foreign handle frees nothing: it must never take a
        // slot away from the page that now lives in it.
        if !self.owns(vm, slot) {
            return;
        }
        self.meta[slot.index as usize].owner = Owner::Free;
        self.free.push(slot.index);
        let file = self.files.get_mut(&vm).expect("an owned slot's file exists");
        file.used -= 1;
        let pool = file.pool;
        self.pools[pool.0 as usize].as_mut().expect("a file's pool exists").in_files -= 1;
        self.in_files -= 1;
    }
}

/// One VM's thin swap file: a [`PageStore`] handle that borrows the
/// [`SwapReservation`] holding the device, the pools and every file's
/// slot table.
///
/// Why a borrowing handle: all VMs' files share one device and one pool
/// budget, and `no_std` has no `Rc<RefCell>`-free way to share a `&mut`.
/// Keeping the state in the reservation and lending it per operation
/// makes the sharing explicit; on SMP the kernel puts the reservation
/// behind one `spin::Mutex` and makes a handle under the lock (a page-out
/// is one synchronous device write, so the lock is short).
pub struct SwapFile<'r, D: BlockStore> {
    res: &'r mut SwapReservation<D>,
    vm: VmId,
}

impl<D: BlockStore> core::fmt::Debug for SwapFile<'_, D> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SwapFile").field("vm", &self.vm).field("stats", &self.stats()).finish()
    }
}

impl<D: BlockStore> SwapFile<'_, D> {
    /// The VM whose file this is.
    pub fn vm(&self) -> VmId {
        self.vm
    }

    /// The file's use and limit.
    pub fn stats(&self) -> FileStats {
        self.res.file_stats(self.vm).expect("a handle's file exists while it is borrowed")
    }
}

impl<D: BlockStore> PageStore for SwapFile<'_, D> {
    type Slot = SwapSlot;

    /// Errors: [`Error::PageStoreFull`] when the VM's file is at its limit
    /// or its pool's reservation is used up; [`Error::BlockIo`] when the
    /// device failed the write (the page stays the caller's; the slot is
    /// retired).
    fn page_out(&mut self, gpa: GuestPhysAddr, page: &[u8; 4096]) -> Result<SwapSlot, Error> {
        self.res.page_out(self.vm, gpa, page)
    }

    /// Errors: [`Error::SwapSlotCorrupt`] with the reason when the handle
    /// is stale or the slot fails any check (`page` is then untouched);
    /// [`Error::BlockIo`] when the device failed the read. The slot stays
    /// allocated either way: release it when giving up on the page.
    fn page_in(&mut self, slot: SwapSlot, gpa: GuestPhysAddr, page: &mut [u8; 4096]) -> Result<(), Error> {
        self.res.page_in(self.vm, slot, gpa, page)
    }

    /// Returns the slot to the pool's reservation. A stale handle is ignored.
    fn release(&mut self, slot: SwapSlot) {
        self.res.release(self.vm, slot)
    }
}
