use alloc::collections::BTreeSet;
use alloc::vec::Vec;

use super::format::{FIRST_SLOT_BLOCK, SLOT_BLOCKS, SLOT_BYTES};
use super::*;
use crate::Error;
use crate::addr::GuestPhysAddr;
use crate::swap_hook::PageStore;

/// splitmix64: a small deterministic generator for test data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn page(&mut self) -> [u8; 4096] {
        let mut p = [0; 4096];
        for c in p.chunks_mut(8) {
            c.copy_from_slice(&self.next().to_le_bytes());
        }
        p
    }
}

fn device(slots: u64) -> MemBlockStore {
    MemBlockStore::new(FIRST_SLOT_BLOCK + slots * SLOT_BLOCKS)
}

fn spec(vm: VmId, configured: u64, reserved: u64) -> VmSwapSpec {
    VmSwapSpec { vm, configured_pages: configured, reserved_pages: reserved }
}

/// A formatted device with one pool holding VMs 1 and 2 (100 pages of
/// maximum reclaim each).
fn two_vms(slots: u64) -> (SwapReservation<MemBlockStore>, PoolId) {
    let mut r = SwapReservation::format(device(slots)).unwrap();
    let pool = r.create_pool_with(0, &[spec(1, 150, 50), spec(2, 100, 0)]).unwrap();
    (r, pool)
}

fn gpa(n: u64) -> GuestPhysAddr {
    GuestPhysAddr(n << 12)
}

const SENTINEL: [u8; 4096] = [0xa5; 4096];

fn expect_refused(r: &mut SwapReservation<MemBlockStore>, vm: VmId, slot: SwapSlot, at: GuestPhysAddr) -> SlotRefusal {
    let mut page = SENTINEL;
    let err = r.file(vm).unwrap().page_in(slot, at, &mut page).unwrap_err();
    assert_eq!(page, SENTINEL, "a refused page-in must not touch the caller's page");
    match err {
        Error::SwapSlotCorrupt { gpa: g, reason } => {
            assert_eq!(g, at);
            reason
        }
        other => panic!("expected SwapSlotCorrupt, got {other:?}"),
    }
}

#[test]
fn many_random_pages_round_trip() {
    let mut r = SwapReservation::format(device(2000)).unwrap();
    r.create_pool_with(0, &[spec(1, 1000, 0), spec(2, 1000, 0)]).unwrap();
    let mut rng = Rng(7);
    let mut stored = Vec::new();
    for i in 0..1600u64 {
        let vm = 1 + (i % 2) as VmId;
        // Interleave some zero pages and repeated contents too.
        let page = match i % 7 {
            0 => [0; 4096],
            1 => [i as u8; 4096],
            _ => rng.page(),
        };
        let at = gpa(rng.next() % (1 << 30));
        let slot = r.file(vm).unwrap().page_out(at, &page).unwrap();
        stored.push((vm, at, slot, page));
    }
    let io = r.device().stats();
    // One superblock write at format, then one 9-block write per page.
    assert_eq!(io.writes, 1 + 1600);
    assert_eq!(io.blocks_written, 1 + 1600 * SLOT_BLOCKS);
    assert_eq!(r.stats().in_files, 1600);
    // Read back in a scrambled order.
    let n = stored.len();
    for k in 0..n {
        let (vm, at, slot, page) = &stored[(k * 617) % n];
        let mut back = SENTINEL;
        r.file(*vm).unwrap().page_in(*slot, *at, &mut back).unwrap();
        assert_eq!(&back, page, "page {k} came back different");
    }
    assert_eq!(r.device().stats().reads, 1 + 1600, "one read per page-in, plus the superblock check");
    for (vm, _, slot, _) in stored {
        r.file(vm).unwrap().release(slot);
    }
    assert_eq!(r.stats().in_files, 0);
    assert_eq!(r.file_stats(1).unwrap().used, 0);
}

#[test]
fn flipped_data_byte_is_refused() {
    let (mut r, _) = two_vms(200);
    let page = Rng(1).page();
    let slot = r.file(1).unwrap().page_out(gpa(5), &page).unwrap();
    // A byte in the middle of the page's last block.
    assert!(r.device_mut().corrupt(slot.first_block() + 8, 100, 0x01));
    assert_eq!(expect_refused(&mut r, 1, slot, gpa(5)), SlotRefusal::DataChecksum);
}

#[test]
fn flipped_header_bytes_are_refused() {
    let (mut r, _) = two_vms(200);
    let page = Rng(2).page();
    let slot = r.file(1).unwrap().page_out(gpa(5), &page).unwrap();
    let hdr = slot.first_block();
    // The generation field: caught by the header checksum.
    r.device_mut().corrupt(hdr, 25, 0x80);
    assert_eq!(expect_refused(&mut r, 1, slot, gpa(5)), SlotRefusal::HeaderChecksum);
    r.device_mut().corrupt(hdr, 25, 0x80);
    // The stored page checksum field.
    r.device_mut().corrupt(hdr, 49, 0x02);
    assert_eq!(expect_refused(&mut r, 1, slot, gpa(5)), SlotRefusal::HeaderChecksum);
    r.device_mut().corrupt(hdr, 49, 0x02);
    // The magic.
    r.device_mut().corrupt(hdr, 0, 0x20);
    assert_eq!(expect_refused(&mut r, 1, slot, gpa(5)), SlotRefusal::BadMagic);
    r.device_mut().corrupt(hdr, 0, 0x20);
    // The version (checked before the checksum so a newer format is named).
    r.device_mut().corrupt(hdr, 8, 0x02);
    assert_eq!(expect_refused(&mut r, 1, slot, gpa(5)), SlotRefusal::UnsupportedVersion(3));
    r.device_mut().corrupt(hdr, 8, 0x02);
    // Repaired, it reads back.
    let mut back = [0; 4096];
    r.file(1).unwrap().page_in(slot, gpa(5), &mut back).unwrap();
    assert_eq!(back, page);
}

#[test]
fn wrong_address_is_refused() {
    let (mut r, _) = two_vms(200);
    let slot = r.file(1).unwrap().page_out(gpa(5), &Rng(3).page()).unwrap();
    assert_eq!(expect_refused(&mut r, 1, slot, gpa(6)), SlotRefusal::WrongAddress { found: gpa(5) });
}

#[test]
fn another_vms_slot_is_refused() {
    let (mut r, _) = two_vms(200);
    // VM 2's handle used with VM 1's file: refused before reading.
    let slot = r.file(2).unwrap().page_out(gpa(5), &Rng(4).page()).unwrap();
    let reads = r.device().stats().reads;
    assert_eq!(expect_refused(&mut r, 1, slot, gpa(5)), SlotRefusal::NotAllocated);
    assert_eq!(r.device().stats().reads, reads, "a foreign handle must not reach the device");
    // VM 2's page left on disk under a slot the table gives to VM 1 (VM 1's
    // write was lost): the header names VM 2.
    r.file(2).unwrap().release(slot);
    r.device_mut().lose_next_writes(1);
    let mine = r.file(1).unwrap().page_out(gpa(5), &Rng(5).page()).unwrap();
    assert_eq!(mine.index(), slot.index(), "the freed slot is reused first");
    assert_eq!(expect_refused(&mut r, 1, mine, gpa(5)), SlotRefusal::WrongVm { found: 2 });
}

#[test]
fn stale_generation_is_refused() {
    let (mut r, _) = two_vms(200);
    let old_page = Rng(6).page();
    let old = r.file(1).unwrap().page_out(gpa(9), &old_page).unwrap();
    r.file(1).unwrap().release(old);
    // Same VM, same address, same slot; the new write is lost, so the
    // device still holds the old copy: only the generation tells.
    r.device_mut().lose_next_writes(1);
    let new = r.file(1).unwrap().page_out(gpa(9), &Rng(7).page()).unwrap();
    assert_eq!(new.index(), old.index());
    assert_eq!(
        expect_refused(&mut r, 1, new, gpa(9)),
        SlotRefusal::StaleGeneration { expected: new.generation(), found: old.generation() }
    );
    // The old handle is refused too, from the table alone.
    assert_eq!(expect_refused(&mut r, 1, old, gpa(9)), SlotRefusal::NotAllocated);
}

#[test]
fn misdirected_slot_is_refused() {
    let (mut r, _) = two_vms(200);
    let a = r.file(1).unwrap().page_out(gpa(1), &Rng(8).page()).unwrap();
    let b = r.file(1).unwrap().page_out(gpa(1), &Rng(9).page()).unwrap();
    // Slot a's bytes land where slot b should be (a misdirected write).
    let raw = r.device_mut().raw_mut();
    let (sa, sb) = (a.first_block() as usize * BLOCK_SIZE, b.first_block() as usize * BLOCK_SIZE);
    raw.copy_within(sa..sa + SLOT_BYTES, sb);
    assert_eq!(expect_refused(&mut r, 1, b, gpa(1)), SlotRefusal::WrongSlot { found: a.index() });
}

#[test]
fn slots_from_an_earlier_run_are_refused() {
    let (mut r, _) = two_vms(200);
    let first_epoch = r.superblock().epoch;
    let slot = r.file(1).unwrap().page_out(gpa(3), &Rng(10).page()).unwrap();
    let at = slot.first_block() as usize * BLOCK_SIZE;
    let old_bytes = r.device().raw()[at..at + SLOT_BYTES].to_vec();
    // Restart: same device, new run.
    let mut r = SwapReservation::open(r.into_device()).unwrap();
    assert_eq!(r.superblock().epoch, first_epoch + 1);
    r.create_pool_with(0, &[spec(1, 150, 50)]).unwrap();
    let again = r.file(1).unwrap().page_out(gpa(3), &Rng(11).page()).unwrap();
    // Same slot, VM, address and generation as last run's page...
    assert_eq!((again.index(), again.generation()), (slot.index(), slot.generation()));
    // ...and last run's bytes still there (this run's write lost).
    r.device_mut().raw_mut()[at..at + SLOT_BYTES].copy_from_slice(&old_bytes);
    assert_eq!(expect_refused(&mut r, 1, again, gpa(3)), SlotRefusal::WrongEpoch { found: first_epoch });
}

#[test]
fn failed_write_is_reported_and_loses_nothing() {
    let (mut r, pool) = two_vms(200);
    let keep = Rng(12).page();
    let kept = r.file(1).unwrap().page_out(gpa(1), &keep).unwrap();
    let before = (r.file_stats(1).unwrap(), r.pool_stats(pool).unwrap(), r.stats().in_files);

    r.device_mut().fail_next_writes(1);
    let err = r.file(1).unwrap().page_out(gpa(2), &Rng(13).page()).unwrap_err();
    assert!(matches!(err, Error::BlockIo { write: true, .. }), "{err:?}");
    // Nothing counted against the file or the pool; the slot is retired.
    assert_eq!((r.file_stats(1).unwrap(), r.pool_stats(pool).unwrap(), r.stats().in_files), before);
    assert_eq!(r.stats().retired, 1);

    // The caller still has its page and can try again: a different slot.
    let page = Rng(13).page();
    let second = r.file(1).unwrap().page_out(gpa(2), &page).unwrap();
    assert_ne!(second.index(), kept.index());
    let mut back = [0; 4096];
    r.file(1).unwrap().page_in(second, gpa(2), &mut back).unwrap();
    assert_eq!(back, page);
    r.file(1).unwrap().page_in(kept, gpa(1), &mut back).unwrap();
    assert_eq!(back, keep, "earlier pages survive a failed write");
    // The retired slot belongs to no file: removing the VM frees exactly its two pages.
    assert_eq!(r.remove_vm(1).unwrap(), 2);
    assert_eq!(r.stats().retired, 1);
}

#[test]
fn failed_read_is_reported_and_can_be_retried() {
    let (mut r, _) = two_vms(200);
    let page = Rng(14).page();
    let slot = r.file(2).unwrap().page_out(gpa(4), &page).unwrap();
    r.device_mut().fail_next_reads(1);
    let mut back = SENTINEL;
    let err = r.file(2).unwrap().page_in(slot, gpa(4), &mut back).unwrap_err();
    assert_eq!(err, Error::BlockIo { block: slot.first_block(), write: false });
    assert_eq!(back, SENTINEL);
    r.file(2).unwrap().page_in(slot, gpa(4), &mut back).unwrap();
    assert_eq!(back, page);
}

#[test]
fn slots_move_between_files_while_the_reservation_stays_the_same() {
    let (mut r, pool) = two_vms(400);
    let size = r.pool_stats(pool).unwrap().size;
    assert_eq!(size, 200);
    assert_eq!(r.stats().reserved, 200);
    let mut rng = Rng(15);

    // VM 1 swaps 100 pages (its limit).
    let a: Vec<_> = (0..100).map(|i| r.file(1).unwrap().page_out(gpa(i), &rng.page()).unwrap()).collect();
    assert_eq!(r.file(1).unwrap().page_out(gpa(100), &rng.page()), Err(Error::PageStoreFull));
    let a_slots: BTreeSet<u32> = a.iter().map(|s| s.index()).collect();
    let check = |r: &SwapReservation<MemBlockStore>, in1: u64, in2: u64| {
        let p = r.pool_stats(pool).unwrap();
        assert_eq!(p.size, size, "the reservation does not change size");
        assert_eq!(p.in_files + p.free, size, "every reserved slot is in a file or free");
        assert_eq!((r.file_stats(1).unwrap().used, r.file_stats(2).unwrap().used), (in1, in2));
        assert_eq!(p.in_files, in1 + in2);
        assert_eq!(r.stats().reserved, size);
    };
    check(&r, 100, 0);

    // 60 of them are paged in: their slots go back to the reservation...
    for s in &a[..60] {
        r.file(1).unwrap().release(*s);
    }
    check(&r, 40, 0);
    // ...and VM 2's file grows from them: the same storage, moved.
    let b: Vec<_> = (0..60).map(|i| r.file(2).unwrap().page_out(gpa(i), &rng.page()).unwrap()).collect();
    check(&r, 40, 60);
    let b_slots: BTreeSet<u32> = b.iter().map(|s| s.index()).collect();
    assert!(b_slots.is_subset(&a_slots), "VM 2 reused VM 1's returned slots");
    assert_eq!(r.device().stats().blocks_written, 1 + 160 * SLOT_BLOCKS);

    // VM 1 ends: its 40 slots return and the pool shrinks by its share.
    assert_eq!(r.remove_vm(1).unwrap(), 40);
    let p = r.pool_stats(pool).unwrap();
    assert_eq!((p.size, p.in_files, p.vms), (100, 60, 1));
    assert_eq!(r.stats().reserved, 100);
    assert_eq!(r.stats().in_files, 60);
    assert_eq!(r.file(1).map(|_| ()), Err(Error::UnknownSwapFile(1)));
    // VM 2 can use them now: 40 more fit its 100-page limit.
    for i in 60..100 {
        r.file(2).unwrap().page_out(gpa(i), &rng.page()).unwrap();
    }
    assert_eq!(r.file_stats(2).unwrap().used, 100);
    // Destroying the pool frees the rest.
    assert_eq!(r.destroy_pool(pool).unwrap(), 100);
    assert_eq!(r.stats(), ReservationStats { slots: 400, retired: 0, reserved: 0, in_files: 0 });
}

#[test]
fn pool_reservation_is_sized_for_maximum_reclaim_and_refused_beyond_the_device() {
    let mut r = SwapReservation::format(device(3000)).unwrap();
    let vms = [spec(1, 1024, 256), spec(2, 2048, 1024), spec(3, 512, 0)];
    let p = r.create_pool_with(0, &vms).unwrap();
    // Sum of (configured - guaranteed): 768 + 1024 + 512.
    assert_eq!(r.pool_stats(p).unwrap().size, 2304);
    assert_eq!(r.unreserved(), 3000 - 2304);
    // A pool guarantee larger than its VMs' own shrinks what can be reclaimed.
    r.set_pool_reservation(p, 2000).unwrap();
    assert_eq!(r.pool_stats(p).unwrap().size, 3584 - 2000);

    // A second pool that would exceed the device: refused, nothing changes.
    let before = r.stats();
    let err = r.create_pool_with(0, &[spec(10, 2000, 0)]).unwrap_err();
    assert_eq!(err, Error::SwapReservationTooLarge { requested: 1584 + 2000, available: 3000 });
    assert_eq!(r.stats(), before);
    assert!(r.file_stats(10).is_none());
    // Growing a pool beyond the device: refused the same way.
    let q = r.create_pool(0);
    r.add_vm(q, spec(11, 1000, 0)).unwrap();
    assert_eq!(
        r.add_vm(q, spec(12, 1000, 500)),
        Err(Error::SwapReservationTooLarge { requested: 2584 + 500, available: 3000 })
    );
    assert_eq!(
        r.set_vm_spec(spec(11, 1500, 0)),
        Err(Error::SwapReservationTooLarge { requested: 3084, available: 3000 })
    );
    assert_eq!(
        r.set_pool_reservation(p, 0),
        Err(Error::SwapReservationTooLarge { requested: 2304 + 1000, available: 3000 })
    );
    assert_eq!(r.stats().reserved, 2584);
    // Duplicate VMs are refused.
    assert_eq!(r.add_vm(q, spec(1, 10, 0)), Err(Error::SwapFileExists(1)));
    assert_eq!(r.add_vm(PoolId(99), spec(50, 10, 0)), Err(Error::UnknownSwapPool(99)));
}

#[test]
fn files_and_pools_stop_at_their_limits_and_cannot_shrink_below_use() {
    let mut r = SwapReservation::format(device(100)).unwrap();
    // Each VM may lose 30 pages, but the pool guarantees 60 of their 90: 30 together.
    let p = r.create_pool_with(60, &[spec(1, 45, 15), spec(2, 45, 15)]).unwrap();
    assert_eq!(r.pool_stats(p).unwrap().size, 30);
    let mut rng = Rng(16);
    for i in 0..20 {
        r.file(1).unwrap().page_out(gpa(i), &rng.page()).unwrap();
    }
    for i in 0..10 {
        r.file(2).unwrap().page_out(gpa(i), &rng.page()).unwrap();
    }
    // VM 2 is below its own limit, but the pool's reservation is used up.
    assert_eq!(r.file(2).unwrap().page_out(gpa(10), &rng.page()), Err(Error::PageStoreFull));
    assert_eq!(r.file_stats(2).unwrap(), FileStats { pool: p, used: 10, limit: 30 });
    // Neither the pool nor a file can shrink below what they hold.
    assert_eq!(r.set_pool_reservation(p, 70), Err(Error::SwapShrinkBelowUse { in_use: 30, requested: 20 }));
    assert_eq!(r.set_vm_spec(spec(1, 45, 35)), Err(Error::SwapShrinkBelowUse { in_use: 20, requested: 10 }));
    // Growing the pool lets VM 2 continue.
    r.set_pool_reservation(p, 40).unwrap();
    r.file(2).unwrap().page_out(gpa(10), &rng.page()).unwrap();
}

#[test]
fn stale_release_frees_nothing() {
    let (mut r, _) = two_vms(200);
    let old = r.file(1).unwrap().page_out(gpa(1), &Rng(17).page()).unwrap();
    r.file(1).unwrap().release(old);
    let page = Rng(18).page();
    let new = r.file(1).unwrap().page_out(gpa(2), &page).unwrap();
    assert_eq!(new.index(), old.index());
    // Releasing the stale handle again (a double release) and through the
    // other VM must not free the new page's slot.
    r.file(1).unwrap().release(old);
    r.file(2).unwrap().release(new);
    assert_eq!(r.file_stats(1).unwrap().used, 1);
    let mut back = [0; 4096];
    r.file(1).unwrap().page_in(new, gpa(2), &mut back).unwrap();
    assert_eq!(back, page);
}

#[test]
fn superblock_refusals() {
    // A blank disk is not a swap device.
    assert_eq!(
        SwapReservation::open(device(10)).map(|_| ()),
        Err(Error::SwapDeviceRefused(SuperblockRefusal::NoMagic))
    );
    assert_eq!(
        SwapReservation::format(MemBlockStore::new(9)).map(|_| ()),
        Err(Error::SwapDeviceRefused(SuperblockRefusal::TooSmall { blocks: 9 }))
    );
    let good = SwapReservation::format(device(10)).unwrap().into_device();
    let open = |f: &dyn Fn(&mut MemBlockStore)| {
        let mut d = MemBlockStore::new(good.block_count());
        d.raw_mut().copy_from_slice(good.raw());
        f(&mut d);
        SwapReservation::open(d).map(|r| r.superblock())
    };
    let ok = open(&|_| {}).unwrap();
    assert_eq!((ok.slots, ok.epoch), (10, 2));
    // Any flipped bit in the checksummed fields.
    for byte in [12, 16, 24, 33, 40, 44, 48, 57] {
        assert_eq!(
            open(&|d| {
                d.corrupt(0, byte, 0x04);
            }),
            Err(Error::SwapDeviceRefused(SuperblockRefusal::BadChecksum)),
            "byte {byte}"
        );
    }
    assert_eq!(
        open(&|d| {
            d.corrupt(0, 8, 0x02);
        }),
        Err(Error::SwapDeviceRefused(SuperblockRefusal::UnsupportedVersion(3)))
    );
    assert_eq!(
        open(&|d| {
            d.corrupt(0, 3, 0x01);
        }),
        Err(Error::SwapDeviceRefused(SuperblockRefusal::NoMagic))
    );
    // The same superblock on a device of another size.
    let mut bigger = MemBlockStore::new(good.block_count() + 9);
    bigger.raw_mut()[..BLOCK_SIZE].copy_from_slice(&good.raw()[..BLOCK_SIZE]);
    assert_eq!(
        SwapReservation::open(bigger).map(|_| ()),
        Err(Error::SwapDeviceRefused(SuperblockRefusal::DeviceSizeMismatch { recorded: 91, actual: 100 }))
    );
    // A well-checksummed superblock with impossible geometry.
    let sb = super::format::Superblock { device_blocks: 91, slots: 11, epoch: 1 }.encode();
    let mut d = MemBlockStore::new(91);
    d.raw_mut()[..BLOCK_SIZE].copy_from_slice(&sb);
    assert_eq!(SwapReservation::open(d).map(|_| ()), Err(Error::SwapDeviceRefused(SuperblockRefusal::BadGeometry)));
    // Formatting a device that had swap on it continues its epoch.
    let r = SwapReservation::format(good).unwrap();
    assert_eq!(r.superblock().epoch, 2);
    // An I/O error while reading the superblock is reported as such.
    let mut d = MemBlockStore::new(10);
    d.fail_next_reads(1);
    assert_eq!(SwapReservation::open(d).map(|_| ()), Err(Error::BlockIo { block: 0, write: false }));
}

#[test]
fn block_store_checks_transfers() {
    let mut d = MemBlockStore::new(4);
    let mut buf = [0u8; 1024];
    assert_eq!(d.read(3, &mut buf), Err(Error::BlockOutOfRange { block: 3, len: 2 }));
    assert_eq!(d.write(u64::MAX, &buf[..512]), Err(Error::BlockOutOfRange { block: u64::MAX, len: 1 }));
    assert_eq!(d.read(0, &mut buf[..100]), Err(Error::BadBlockBuffer { len: 100 }));
    assert_eq!(d.write(0, &[]), Err(Error::BadBlockBuffer { len: 0 }));
    buf[600] = 7;
    d.write(2, &buf).unwrap();
    let mut back = [0u8; 512];
    d.read(3, &mut back).unwrap();
    assert_eq!(back[600 - 512], 7);
    d.fail_write_to(1);
    assert_eq!(d.write(0, &buf), Err(Error::BlockIo { block: 0, write: true }));
    d.write(0, &buf).unwrap();
    assert_eq!(d.stats().writes, 2);
    assert_eq!(d.stats().injected_failures, 1);
}

/// End to end: a VM's pages swapped out through its `SwapFile` by
/// `VmMemory`, faulted back by host reads, with the reservation's counts
/// following, and a corrupt slot refused with the page kept swapped.
#[test]
fn vm_memory_swaps_through_a_swap_file() {
    use crate::paging::{Ept, PageSize};
    use crate::sim::SimPhys;
    use crate::vm_memory::{Hooks, MemoryMap, PageState, VmMemory, VmMemoryConfig};

    let mut sim = SimPhys::new(4096);
    let map = MemoryMap::ram_only(4 << 20).unwrap();
    let config = VmMemoryConfig { id: 1, vcpus: 1, max_page_size: PageSize::Size2M };
    let mut v: VmMemory<Ept, SwapSlot> = VmMemory::new(&mut sim, map, config).unwrap();
    let mut r = SwapReservation::format(device(2048)).unwrap();
    let pool = r.create_pool_with(0, &[spec(1, 1024, 256)]).unwrap();
    let mut rng = Rng(30);
    let pages: Vec<[u8; 4096]> = (0..64).map(|_| rng.page()).collect();
    for (i, p) in pages.iter().enumerate() {
        v.write(&mut sim, &mut Hooks::none(), gpa(i as u64), p, &mut |_| {}).unwrap();
    }
    let frames = sim.frames_in_use();
    for i in 0..64 {
        v.swap_out(&mut sim, gpa(i), &mut r.file(1).unwrap(), None, &mut |_| {}).unwrap();
    }
    assert_eq!(r.file_stats(1).unwrap().used, 64);
    assert_eq!(r.pool_stats(pool).unwrap().in_files, 64);
    // 64 frames back to the host, one table frame to split the 2 MiB page.
    assert_eq!(sim.frames_in_use(), frames - 64 + 1);

    // Damage page 5's copy: reading it is refused and it stays swapped.
    let slot_block = FIRST_SLOT_BLOCK + 5 * SLOT_BLOCKS;
    r.device_mut().corrupt(slot_block + 3, 17, 0x40);
    let mut buf = [0u8; 4096];
    let mut file = r.file(1).unwrap();
    let mut hooks = Hooks { sharing: None, store: Some(&mut file), source: None };
    let err = v.read(&mut sim, &mut hooks, gpa(5), &mut buf, &mut |_| {}).unwrap_err();
    assert!(matches!(err, Error::SwapSlotCorrupt { reason: SlotRefusal::DataChecksum, .. }), "{err:?}");
    assert_eq!(v.page_state(gpa(5)), Some(PageState::Swapped));

    // Every other page comes back intact, and its slot goes back.
    for (i, p) in pages.iter().enumerate().filter(|(i, _)| *i != 5) {
        v.read(&mut sim, &mut hooks, gpa(i as u64), &mut buf, &mut |_| {}).unwrap();
        assert_eq!(&buf, p, "page {i}");
    }
    assert_eq!(file.stats().used, 1);
    // Freeing the VM releases the damaged page's slot too.
    let mut hooks = Hooks { sharing: None, store: Some(&mut file), source: None };
    // SAFETY: simulated tables; no vCPU runs on them.
    let report = unsafe { v.free(&mut sim, &mut hooks, &mut |_| {}) };
    assert_eq!(report.leaked_references, 0);
    assert_eq!(r.stats().in_files, 0);
    assert_eq!(r.remove_vm(1).unwrap(), 0);
    assert_eq!(sim.frames_in_use(), 0);
}

#[test]
fn injected_faults_skip_then_hit() {
    let mut d = MemBlockStore::new(4);
    let one = [7u8; BLOCK_SIZE];
    let mut buf = [0u8; BLOCK_SIZE];
    // Reads: one through, then two fail, then through again.
    d.fail_reads_after(1, 2);
    assert!(d.read(0, &mut buf).is_ok());
    assert_eq!(d.read(1, &mut buf), Err(Error::BlockIo { block: 1, write: false }));
    assert_eq!(d.read(2, &mut buf), Err(Error::BlockIo { block: 2, write: false }));
    assert!(d.read(3, &mut buf).is_ok());
    // Writes: the second fails; the lost one counts only writes that did
    // not fail, so it is the third.
    d.fail_writes_after(1, 1);
    d.lose_writes_after(1, 1);
    assert!(d.write(0, &one).is_ok());
    assert!(d.write(1, &one).is_err());
    assert!(d.write(2, &one).is_ok());
    assert!(d.write(3, &one).is_ok());
    let raw = d.raw();
    let block = |b: usize| &raw[b * BLOCK_SIZE..(b + 1) * BLOCK_SIZE];
    assert_eq!((block(0)[0], block(1)[0], block(2)[0], block(3)[0]), (7, 0, 0, 7));
    d.fail_next_flushes(1);
    assert!(d.flush().is_err());
    assert!(d.flush().is_ok());
    let s = d.stats();
    assert_eq!((s.reads, s.writes, s.flushes, s.injected_failures), (2, 3, 1, 4));
}
