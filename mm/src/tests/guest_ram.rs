//! Guest RAM: backing, bounds-checked access, mapping into a table.

use alloc::vec;
use alloc::vec::Vec;

use super::{all_mappings, destroy, flush};
use crate::addr::{GuestPhysAddr as G, HostPhysAddr as H, PAGE_SIZE_1G, PAGE_SIZE_2M, PAGE_SIZE_4K};
use crate::error::Error;
use crate::guest_ram::GuestRam;
use crate::hal::{FrameAlloc, PhysMem};
use crate::paging::{Access, EntryFormat, MemType, NestedPageTable, PageSize};
use crate::sim::SimPhys;

const MIB: u64 = 1 << 20;

fn free(ram: GuestRam, sim: &mut SimPhys) {
    // SAFETY: tests free RAM only after destroying (or never building) the
    // tables that map it; nothing else references it.
    unsafe { ram.free(sim) };
}

fn count_sizes(maps: &[crate::paging::Mapping]) -> [usize; 3] {
    let mut n = [0; 3];
    for m in maps {
        n[m.leaf.size as usize] += 1;
    }
    n
}

/// Read a host byte directly, to check where guest writes landed.
fn host_byte(sim: &SimPhys, hpa: H) -> u8 {
    // SAFETY: `hpa` is inside a live allocation of `sim` (guest RAM).
    unsafe { sim.phys_to_ptr(hpa).read() }
}

/// 1 GiB + 6 MiB + 12 KiB: one 1 GiB block, three 2 MiB blocks, three
/// frames; mapped with one 1 GiB, three 2 MiB and three 4 KiB pages.
fn largest_pages<F: EntryFormat>() {
    let size = PAGE_SIZE_1G + 6 * MIB + 3 * PAGE_SIZE_4K;
    let mut sim = SimPhys::new(((PAGE_SIZE_1G + 64 * MIB) / PAGE_SIZE_4K) as usize);
    let ram = GuestRam::new(&mut sim, size).unwrap();
    assert_eq!(ram.size(), size);
    let lens: Vec<u64> = ram.chunks().map(|c| c.len).collect();
    assert_eq!(lens, [PAGE_SIZE_1G, PAGE_SIZE_2M, PAGE_SIZE_2M, PAGE_SIZE_2M, 3 * PAGE_SIZE_4K]);

    let mut t = NestedPageTable::<F>::new(&mut sim).unwrap();
    let (inv, r) = ram.map_into(&mut t, &mut sim);
    r.unwrap();
    assert!(inv.is_none());
    flush(inv, &mut sim);
    let maps = all_mappings(&t, &sim);
    assert_eq!(count_sizes(&maps), [3, 3, 1]);
    for m in &maps {
        assert_eq!(Some(m.leaf.hpa), ram.gpa_to_hpa(m.gpa));
        assert_eq!((m.leaf.access, m.leaf.mem_type), (Access::RWX, MemType::WriteBack));
    }
    // Every byte of RAM translates like gpa_to_hpa; nothing past it does.
    for gpa in [0, PAGE_SIZE_1G - 1, PAGE_SIZE_1G + 5 * MIB, size - 1] {
        assert_eq!(t.translate(&sim, G(gpa)).map(|tr| tr.hpa), ram.gpa_to_hpa(G(gpa)));
    }
    assert!(t.translate(&sim, G(size)).is_none());
    assert!(ram.gpa_to_hpa(G(size)).is_none());

    let report = ram.memory_report(&t);
    assert_eq!(report.ram_bytes, size);
    // Root, PDPT, one PD for the second GiB, one PT for its tail.
    assert_eq!(report.page_table_bytes, 4 * PAGE_SIZE_4K);
    assert!(report.overhead_bytes() >= report.page_table_bytes);

    let ram_frames = sim.frames_in_use() - 4;
    destroy(t, &mut sim, ram_frames);

    // A CPU without 1 GiB nested pages: the same RAM in 2 MiB pages.
    let mut t = NestedPageTable::<F>::new(&mut sim).unwrap();
    t.set_max_page_size(PageSize::Size2M);
    let (inv, r) = ram.map_into(&mut t, &mut sim);
    r.unwrap();
    flush(inv, &mut sim);
    assert_eq!(count_sizes(&all_mappings(&t, &sim)), [3, 512 + 3, 0]);
    destroy(t, &mut sim, ram_frames);
    free(ram, &mut sim);
    assert_eq!(sim.frames_in_use(), 0);
}

/// Without contiguous blocks, and with host frames offset by 4 KiB from
/// 2 MiB alignment, everything is mapped with 4 KiB pages.
fn small_pages_when_unaligned<F: EntryFormat>() {
    let mut sim = SimPhys::new(2048);
    sim.set_contiguous(false);
    let pad = sim.alloc_frame().unwrap();
    let ram = GuestRam::new(&mut sim, 4 * MIB).unwrap();
    // The frames happen to be consecutive: one chunk, one run.
    assert_eq!(ram.chunks().count(), 1);
    let mut t = NestedPageTable::<F>::new(&mut sim).unwrap();
    let (inv, r) = ram.map_into(&mut t, &mut sim);
    r.unwrap();
    flush(inv, &mut sim);
    assert_eq!(count_sizes(&all_mappings(&t, &sim)), [1024, 0, 0]);
    destroy(t, &mut sim, 1 + 1024);
    free(ram, &mut sim);
    // SAFETY: `pad` came from `sim` and is unused.
    unsafe { sim.free_frame(pad) };
    assert_eq!(sim.frames_in_use(), 0);

    // The same RAM on aligned consecutive frames (a fresh memory, so they
    // start at its 1 GiB-aligned base) gets 2 MiB pages after all: what
    // counts is the alignment of both addresses, not how they were allocated.
    let mut sim = SimPhys::new(2048);
    sim.set_contiguous(false);
    let ram = GuestRam::new(&mut sim, 4 * MIB).unwrap();
    let mut t = NestedPageTable::<F>::new(&mut sim).unwrap();
    let (inv, r) = ram.map_into(&mut t, &mut sim);
    r.unwrap();
    flush(inv, &mut sim);
    assert_eq!(count_sizes(&all_mappings(&t, &sim)), [0, 2, 0]);
    destroy(t, &mut sim, 1024);
    free(ram, &mut sim);
}

/// Regions with a hole: the hole neither translates nor reads.
fn regions_with_hole<F: EntryFormat>() {
    let mut sim = SimPhys::new(4096);
    let regions = [(G(0), 2 * MIB + 2 * PAGE_SIZE_4K), (G(4 * MIB), 2 * MIB)];
    let ram = GuestRam::with_regions(&mut sim, &regions).unwrap();
    assert_eq!(ram.size(), 4 * MIB + 2 * PAGE_SIZE_4K);
    let mut t = NestedPageTable::<F>::new(&mut sim).unwrap();
    let (inv, r) = ram.map_into(&mut t, &mut sim);
    r.unwrap();
    flush(inv, &mut sim);
    assert_eq!(count_sizes(&all_mappings(&t, &sim)), [2, 2, 0]);
    for hole in [2 * MIB + 2 * PAGE_SIZE_4K, 3 * MIB, 4 * MIB - 1, 6 * MIB] {
        assert!(t.translate(&sim, G(hole)).is_none(), "{hole:#x}");
        assert!(!ram.contains(G(hole), 1));
    }
    // Reads and writes that touch the hole are refused whole.
    let mut buf = [0u8; 16];
    let at = 2 * MIB + 2 * PAGE_SIZE_4K - 8;
    assert_eq!(ram.write(&sim, G(at), &[0xEE; 16]), Err(Error::OutsideGuestRam { gpa: G(at), len: 16 }));
    ram.read(&sim, G(at), &mut buf[..8]).unwrap();
    assert_eq!(buf[..8], [0; 8], "a refused write changed memory");
    assert!(ram.read(&sim, G(4 * MIB - 4), &mut buf).is_err());
    let ram_frames = (ram.size() / PAGE_SIZE_4K) as usize;
    destroy(t, &mut sim, ram_frames);
    free(ram, &mut sim);
}

#[test]
fn read_write_across_chunks() {
    let mut sim = SimPhys::new(4096);
    // 2 MiB block followed by frames.
    let ram = GuestRam::new(&mut sim, 2 * MIB + 3 * PAGE_SIZE_4K).unwrap();
    assert_eq!(ram.chunks().count(), 2);
    let data: Vec<u8> = (0..64u8).collect();
    let at = G(2 * MIB - 20);
    ram.write(&sim, at, &data).unwrap();
    let mut back = vec![0u8; 64];
    ram.read(&sim, at, &mut back).unwrap();
    assert_eq!(back, data);
    // The bytes landed where gpa_to_hpa says, on both sides of the seam.
    for i in [0u64, 19, 20, 63] {
        let hpa = ram.gpa_to_hpa(G(at.0 + i)).unwrap();
        assert_eq!(host_byte(&sim, hpa), i as u8);
    }
    // Integers, little-endian, unaligned, across the seam.
    ram.write_obj(&sim, G(2 * MIB - 2), 0x1122_3344u32).unwrap();
    assert_eq!(ram.read_obj::<u32, _>(&sim, G(2 * MIB - 2)).unwrap(), 0x1122_3344);
    assert_eq!(ram.read_obj::<u8, _>(&sim, G(2 * MIB - 2)).unwrap(), 0x44);
    assert_eq!(ram.read_obj::<u16, _>(&sim, G(2 * MIB)).unwrap(), 0x1122);
    ram.write_obj(&sim, G(8), -2i64).unwrap();
    assert_eq!(ram.read_obj::<u64, _>(&sim, G(8)).unwrap(), u64::MAX - 1);
    free(ram, &mut sim);
    assert_eq!(sim.frames_in_use(), 0);
}

/// Frames that are not physically adjacent: each is its own chunk, and a
/// copy across them goes to the right host frames.
#[test]
fn read_write_across_scattered_frames() {
    let mut sim = SimPhys::new(16);
    sim.set_contiguous(false);
    let all: Vec<H> = (0..16).map(|_| sim.alloc_frame().unwrap()).collect();
    for f in all.iter().step_by(2) {
        // SAFETY: from `sim`, unused.
        unsafe { sim.free_frame(*f) };
    }
    let ram = GuestRam::new(&mut sim, 4 * PAGE_SIZE_4K).unwrap();
    let hpas: Vec<H> = ram.chunks().map(|c| c.hpa).collect();
    assert_eq!(hpas, [all[0], all[2], all[4], all[6]]);
    let data: Vec<u8> = (0..=255u8).cycle().take(2 * PAGE_SIZE_4K as usize + 100).collect();
    ram.write(&sim, G(PAGE_SIZE_4K - 50), &data).unwrap();
    let mut back = vec![0u8; data.len()];
    ram.read(&sim, G(PAGE_SIZE_4K - 50), &mut back).unwrap();
    assert_eq!(back, data);
    assert_eq!(host_byte(&sim, H(all[2].0)), data[50]);
    assert_eq!(host_byte(&sim, H(all[4].0 + 1)), data[50 + 4096 + 1]);
    free(ram, &mut sim);
    for f in all.iter().skip(1).step_by(2) {
        // SAFETY: from `sim`, unused.
        unsafe { sim.free_frame(*f) };
    }
    assert_eq!(sim.frames_in_use(), 0);
}

#[test]
fn hostile_addresses_refused() {
    let mut sim = SimPhys::new(64);
    let ram = GuestRam::new(&mut sim, 8 * PAGE_SIZE_4K).unwrap();
    let size = ram.size();
    let mut buf = [0u8; 8];
    for (gpa, len) in [(size - 4, 8u64), (size, 1), (u64::MAX, 2), (u64::MAX - 3, 8), (1 << 48, 1)] {
        let want = Err(Error::OutsideGuestRam { gpa: G(gpa), len });
        assert_eq!(ram.read(&sim, G(gpa), &mut buf[..len as usize]), want);
        assert_eq!(ram.write(&sim, G(gpa), &buf[..len as usize]), want);
    }
    assert!(ram.read_obj::<u64, _>(&sim, G(size - 7)).is_err());
    assert!(ram.write_obj(&sim, G(size - 1), 0u16).is_err());
    assert!(ram.read_obj::<u64, _>(&sim, G(size - 8)).is_ok());
    // Zero-length accesses touch nothing and succeed anywhere.
    assert!(ram.read(&sim, G(u64::MAX), &mut []).is_ok());
    free(ram, &mut sim);
}

#[test]
fn invalid_layouts_refused() {
    let mut sim = SimPhys::new(64);
    let bad: [&[(G, u64)]; 5] = [
        &[(G(0), 0)],
        &[(G(0), 100)],
        &[(G(0x800), 0x1000)],
        &[(G(0), 0x2000), (G(0x1000), 0x1000)],
        &[(G((1 << 48) - 0x1000), 0x2000)],
    ];
    for regions in bad {
        let e = GuestRam::with_regions(&mut sim, regions).unwrap_err();
        assert!(matches!(e, Error::InvalidRamLayout { .. }), "{regions:?}: {e}");
    }
    assert_eq!(sim.allocations(), 0);
}

#[test]
fn out_of_memory_frees_everything() {
    for budget in [0, 1, 5] {
        let mut sim = SimPhys::new(2048);
        sim.fail_after(budget);
        let e = GuestRam::new(&mut sim, 2 * MIB + 16 * PAGE_SIZE_4K).unwrap_err();
        assert_eq!(e, Error::OutOfGuestMemory { size: 2 * MIB + 16 * PAGE_SIZE_4K });
        assert_eq!(sim.frames_in_use(), 0);
        assert_eq!(sim.frees(), budget);
    }
    // Too little memory for a block: falls back to frames, then runs out.
    let mut sim = SimPhys::new(100);
    assert!(GuestRam::new(&mut sim, 2 * MIB).is_err());
    assert_eq!(sim.frames_in_use(), 0);
}

/// map_into stops at the first failure, and the token is still valid.
fn map_into_out_of_table_frames<F: EntryFormat>() {
    let mut sim = SimPhys::new(4096);
    let ram = GuestRam::new(&mut sim, 4 * MIB).unwrap();
    let mut t = NestedPageTable::<F>::new(&mut sim).unwrap();
    sim.fail_after(1);
    let (inv, r) = ram.map_into(&mut t, &mut sim);
    flush(inv, &mut sim);
    assert_eq!(r, Err(Error::OutOfTableMemory));
    assert!(all_mappings(&t, &sim).is_empty());
    sim.stop_failing();
    let (inv, r) = ram.map_into(&mut t, &mut sim);
    flush(inv, &mut sim);
    r.unwrap();
    assert_eq!(all_mappings(&t, &sim).len(), 2);
    assert!(ram.map_into(&mut t, &mut sim).1.is_err(), "mapping twice must overlap");
    destroy(t, &mut sim, 1024);
    free(ram, &mut sim);
}

// The leak check is a debug-build panic.
#[cfg(debug_assertions)]
#[test]
#[should_panic(expected = "GuestRam was dropped without being freed")]
fn dropping_ram_is_a_loud_leak() {
    let mut sim = SimPhys::new(4);
    let _ram = GuestRam::new(&mut sim, PAGE_SIZE_4K).unwrap();
}

#[test]
fn page_size_discriminants_index_counts() {
    // `count_sizes` indexes by discriminant: 4K, 2M, 1G.
    assert_eq!([PageSize::Size4K as usize, PageSize::Size2M as usize, PageSize::Size1G as usize], [0, 1, 2]);
}

super::for_both_formats!(largest_pages, small_pages_when_unaligned, regions_with_hole, map_into_out_of_table_frames);
