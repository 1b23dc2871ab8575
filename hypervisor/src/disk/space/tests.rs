use alloc::rc::Rc;
use alloc::string::ToString;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;

use mm::swap::{BLOCK_SIZE, BlockStore, MemBlockStore, SwapReservation};

use super::format::{COPY_BLOCKS, COPY_BYTES};
use super::*;

type Disk = Rc<RefCell<MemBlockStore>>;

/// 4 MiB, a quarter of it swap.
const BLOCKS: u64 = 8192;
const OPTS: FormatOptions = FormatOptions { swap_percent: 25, min_swap_blocks: 0 };

fn disk() -> Disk {
    Rc::new(RefCell::new(MemBlockStore::new(BLOCKS)))
}

fn formatted() -> (Disk, Space<Disk>) {
    let d = disk();
    let s = Space::format(d.clone(), &OPTS, 1_700_000_000).unwrap();
    (d, s)
}

fn names(s: &Space<Disk>) -> Vec<&str> {
    s.list().iter().map(|e| e.name.as_str()).collect()
}

#[test]
fn format_makes_a_swap_extent_and_reopens() {
    let (d, mut s) = formatted();
    let swap = s.get("swap").unwrap();
    // A quarter of the data area, rounded down to 4 KiB.
    assert_eq!((swap.start, swap.blocks, swap.kind), (DATA_START, 2040, ExtentKind::Swap));
    assert!(swap.complete);
    assert_eq!(swap.created, 1_700_000_000);
    // Copy B, then copy A: A holds generation 2.
    assert_eq!((s.generation(), s.current_copy()), (2, Copy::A));
    s.create_image("web", 2048, 5).unwrap();
    let listed = s.list().to_vec();
    drop(s);
    let s = Space::open(d.clone()).unwrap();
    assert_eq!(s.list(), &listed[..]);
    assert_eq!((s.generation(), s.current_copy(), s.refused_copy()), (3, Copy::B, None));
    // Opening a complete table writes nothing.
    let writes = d.borrow().stats().writes;
    let _ = Space::open(d.clone()).unwrap();
    assert_eq!(d.borrow().stats().writes, writes);
}

#[test]
fn default_options_give_swap_half_and_at_least_16_mib() {
    let o = FormatOptions::default();
    // The tests' 63 MiB scratch disk (129024 blocks).
    assert_eq!(o.swap_extent(129_024).unwrap(), (DATA_START, 64_496));
    // A 20 MiB disk: the 16 MiB floor.
    assert_eq!(o.swap_extent(40_960).unwrap(), (DATA_START, 32_768));
    // Smaller than the floor: all of it.
    assert_eq!(o.swap_extent(4096).unwrap(), (DATA_START, 4064));
    assert_eq!(o.swap_extent(36), Err(SpaceError::TooSmall { blocks: 36 }));
    assert!(matches!(Space::format(MemBlockStore::new(20), &o, 0), Err(SpaceError::TooSmall { .. })));
}

#[test]
fn allocation_is_first_fit_and_refuses_with_typed_errors() {
    let (_, mut s) = formatted();
    let swap_end = DATA_START + 2040;
    let a = s.create_image("a", 100, 0).unwrap();
    assert_eq!((a.start, a.blocks, a.bytes), (swap_end, 104, 0), "rounded up to 4 KiB, not initialised");
    let b = s.create_image("b", 800, 0).unwrap();
    let c = s.create_image("c", 8, 0).unwrap();
    assert_eq!((b.start, c.start), (a.start + 104, b.start + 800));
    // Freeing b leaves a gap that a smaller extent fills first.
    s.delete("b", |_| None).unwrap();
    let d = s.create_image("d", 400, 0).unwrap();
    assert_eq!(d.start, b.start);
    assert_eq!(names(&s), ["swap", "a", "d", "c"], "kept in disk order");
    let free = s.free_blocks();
    assert_eq!(free, BLOCKS - DATA_START - 2040 - 104 - 400 - 8);
    // Too big for any gap.
    let gaps = s.free_gaps();
    let largest = gaps.iter().map(|g| g.1).max().unwrap();
    assert_eq!(
        s.create_image("big", largest + 1, 0),
        Err(SpaceError::NoRoom { wanted: largest + 8, largest_free: largest })
    );
    assert_eq!(s.create_image("a", 8, 0), Err(SpaceError::NameTaken(ExtentName::new("a").unwrap())));
    assert_eq!(s.create_image("z", 0, 0), Err(SpaceError::BadSize));
    assert_eq!(s.create_image("z", u64::MAX, 0), Err(SpaceError::BadSize));
    // The whole largest gap fits exactly.
    s.create_image("big", largest, 0).unwrap();
}

#[test]
fn a_full_disk_and_a_full_table_are_refused_and_change_nothing() {
    let (d, mut s) = formatted();
    let free = s.free_blocks();
    s.create_image("all", free, 0).unwrap();
    let generation_before = s.generation();
    let writes = d.borrow().stats().writes;
    assert_eq!(s.create_image("one", 1, 0), Err(SpaceError::NoRoom { wanted: 8, largest_free: 0 }));
    assert!(matches!(s.create_checkpoint("cp", 1, 0, [0; 2]), Err(SpaceError::NoRoom { .. })));
    assert_eq!((s.generation(), d.borrow().stats().writes), (generation_before, writes));
    s.delete("all", |_| None).unwrap();
    // One swap extent plus MAX_EXTENTS - 1 images fill the table.
    for i in 1..MAX_EXTENTS {
        s.create_image(&alloc::format!("img{i}"), 8, 0).unwrap();
    }
    assert_eq!(s.list().len(), MAX_EXTENTS);
    assert_eq!(s.create_image("onemore", 8, 0), Err(SpaceError::TableFull));
    // And a full table reopens.
    drop(s);
    assert_eq!(Space::open(d).unwrap().list().len(), MAX_EXTENTS);
}

#[test]
fn names_are_validated() {
    let ok = ["a", "web-1", "vm.disk_2", "X!~", &"n".repeat(32)];
    for n in ok {
        assert_eq!(ExtentName::new(n).unwrap().as_str(), n);
    }
    assert_eq!(ExtentName::new(""), Err(NameError::Empty));
    assert_eq!(ExtentName::new(&"n".repeat(33)), Err(NameError::TooLong { len: 33 }));
    assert_eq!(ExtentName::new("a b"), Err(NameError::BadByte { at: 1 }));
    assert_eq!(ExtentName::new("tab\t"), Err(NameError::BadByte { at: 3 }));
    assert_eq!(ExtentName::new("é"), Err(NameError::BadByte { at: 0 }));
    let (_, mut s) = formatted();
    assert_eq!(s.create_image("a b", 8, 0), Err(SpaceError::BadName(NameError::BadByte { at: 1 })));
    assert_eq!(
        SpaceError::BadName(NameError::TooLong { len: 40 }).to_string(),
        "bad name: a name is at most 32 bytes, this one is 40"
    );
}

#[test]
fn swap_is_protected_and_the_in_use_hook_refuses() {
    let (_, mut s) = formatted();
    s.create_image("web", 8, 0).unwrap();
    let generation_before = s.generation();
    assert_eq!(s.delete("swap", |_| None), Err(SpaceError::Protected(ExtentName::new("swap").unwrap())));
    let e = s.delete("web", |info| (info.kind == ExtentKind::Image).then_some(3)).unwrap_err();
    assert_eq!(e.to_string(), "\"web\" is in use by vm 3");
    assert_eq!(s.delete("nope", |_| None), Err(SpaceError::NotFound(ExtentName::new("nope").unwrap())));
    assert_eq!(s.generation(), generation_before);
    assert_eq!(s.delete("web", |_| None).unwrap().name.as_str(), "web");
}

/// Damage every byte pattern of one copy in turn.
fn damage(d: &Disk, copy: Copy, offset: usize) {
    let block = copy.first_block() + (offset / BLOCK_SIZE) as u64;
    assert!(d.borrow_mut().corrupt(block, offset % BLOCK_SIZE, 0x10));
}

#[test]
fn a_damaged_newest_copy_falls_back_to_the_older_one() {
    let (d, mut s) = formatted();
    s.create_image("old", 8, 0).unwrap(); // generation 3, in copy B
    s.create_image("new", 8, 0).unwrap(); // generation 4, in copy A
    assert_eq!(s.current_copy(), Copy::A);
    drop(s);
    // Copy A damaged in its header, an entry, the padding, the checksum.
    for offset in [20, 128 * 2 + 9, 4000, COPY_BYTES - 1] {
        damage(&d, Copy::A, offset);
        let s = Space::open(d.clone()).unwrap();
        assert_eq!(names(&s), ["swap", "old"], "offset {offset}");
        assert_eq!((s.generation(), s.current_copy(), s.refused_copy()), (3, Copy::B, Some(CopyRefusal::BadChecksum)));
        damage(&d, Copy::A, offset);
    }
    // Damage A; the next change rewrites A, and both copies are good again.
    damage(&d, Copy::A, 20);
    let mut s = Space::open(d.clone()).unwrap();
    s.create_image("again", 8, 0).unwrap();
    assert_eq!((s.generation(), s.current_copy(), s.refused_copy()), (4, Copy::A, None));
    drop(s);
    let raw = d.borrow().raw().to_vec();
    let b = Table::decode(&raw[COPY_BYTES..2 * COPY_BYTES], Copy::B, BLOCKS).unwrap();
    assert_eq!(b.generation, 3);
    assert_eq!(Space::open(d).unwrap().refused_copy(), None);
}

#[test]
fn both_copies_damaged_is_refused_without_a_write() {
    let (d, s) = formatted();
    drop(s);
    damage(&d, Copy::A, 30);
    damage(&d, Copy::B, 8);
    let before = d.borrow().raw().to_vec();
    let writes = d.borrow().stats().writes;
    let e = Space::open(d.clone()).unwrap_err();
    assert_eq!(e, SpaceError::Damaged { a: CopyRefusal::BadChecksum, b: CopyRefusal::UnsupportedVersion(0x11) });
    assert!(e.to_string().starts_with("both copies of the extent table are unusable (A: the checksum"), "{e}");
    assert_eq!(d.borrow().stats().writes, writes);
    assert!(d.borrow().raw() == &before[..]);
    // A blank disk is not formatted, and says so.
    assert_eq!(Space::open(MemBlockStore::new(BLOCKS)).unwrap_err(), SpaceError::NotFormatted);
}

#[test]
fn a_misdirected_or_resized_copy_is_refused() {
    let (d, s) = formatted();
    let table = Table { generation: 9, disk_blocks: BLOCKS, extents: s.list().to_vec() };
    drop(s);
    // Copy B's bytes written where A belongs.
    d.borrow_mut().raw_mut()[..COPY_BYTES].copy_from_slice(&table.encode(Copy::B));
    let s = Space::open(d.clone()).unwrap();
    assert_eq!((s.current_copy(), s.refused_copy()), (Copy::B, Some(CopyRefusal::WrongCopy)));
    drop(s);
    // The same table on a larger disk: refused (both copies).
    let big = Rc::new(RefCell::new(MemBlockStore::new(BLOCKS + 8)));
    big.borrow_mut().raw_mut()[..2 * COPY_BYTES].copy_from_slice(&d.borrow().raw()[..2 * COPY_BYTES]);
    let e = Space::open(big).unwrap_err();
    assert!(
        matches!(e, SpaceError::Damaged { b: CopyRefusal::DiskSizeMismatch { recorded: BLOCKS, .. }, .. }),
        "{e:?}"
    );
}

#[test]
fn malformed_entries_are_refused_even_with_a_good_checksum() {
    let good = ExtentInfo {
        name: ExtentName::new("x").unwrap(),
        kind: ExtentKind::Image,
        start: DATA_START,
        blocks: 8,
        bytes: 0,
        created: 0,
        complete: true,
        meta: [0; 2],
    };
    let check = |extents: Vec<ExtentInfo>| {
        let t = Table { generation: 1, disk_blocks: BLOCKS, extents };
        Table::decode(&t.encode(Copy::A), Copy::A, BLOCKS)
    };
    assert!(check(vec![good]).is_ok());
    let bad = |e: CopyRefusal| match e {
        CopyRefusal::BadEntry { why, .. } => why,
        other => panic!("{other:?}"),
    };
    let outside = ExtentInfo { start: 8, ..good };
    assert_eq!(bad(check(vec![outside]).unwrap_err()), "lies outside the data area");
    let past_end = ExtentInfo { start: BLOCKS - 8, blocks: 16, ..good };
    assert_eq!(bad(check(vec![past_end]).unwrap_err()), "lies outside the data area");
    let unaligned = ExtentInfo { start: DATA_START + 1, ..good };
    assert_eq!(bad(check(vec![unaligned]).unwrap_err()), "is not 4 KiB aligned");
    let second = ExtentInfo { name: ExtentName::new("y").unwrap(), start: DATA_START + 4 * 8, ..good };
    let overlapping = ExtentInfo { blocks: 40, ..good };
    assert!(bad(check(vec![overlapping, second]).unwrap_err()).starts_with("overlaps"));
    let same_name = ExtentInfo { name: good.name, ..second };
    assert_eq!(bad(check(vec![good, same_name]).unwrap_err()), "repeats a name");
    let overfull = ExtentInfo { bytes: 8 * 512 + 1, ..good };
    assert_eq!(bad(check(vec![overfull]).unwrap_err()), "holds more bytes than blocks");
}

/// A device whose next `write` lands only its first `keep` blocks and
/// then fails: a write torn by a crash.
struct Tearing {
    inner: Disk,
    tear: Option<u64>,
}

impl BlockStore for Tearing {
    fn block_count(&self) -> u64 {
        self.inner.block_count()
    }
    fn read(&mut self, block: u64, buf: &mut [u8]) -> Result<(), mm::Error> {
        self.inner.read(block, buf)
    }
    fn write(&mut self, block: u64, buf: &[u8]) -> Result<(), mm::Error> {
        match self.tear.take() {
            Some(keep) => {
                let n = (keep as usize * BLOCK_SIZE).min(buf.len());
                if n > 0 {
                    self.inner.write(block, &buf[..n])?;
                }
                Err(mm::Error::BlockIo { block: block + keep, write: true })
            }
            None => self.inner.write(block, buf),
        }
    }
    fn flush(&mut self) -> Result<(), mm::Error> {
        self.inner.flush()
    }
}

#[test]
fn a_torn_table_write_keeps_the_previous_table() {
    for keep in 0..COPY_BLOCKS {
        let (d, s) = formatted();
        drop(s);
        let mut s = Space::open(Tearing { inner: d.clone(), tear: None }).unwrap();
        s.create_image("kept", 8, 0).unwrap();
        let before = s.list().to_vec();
        s.dev().tear = Some(keep);
        let e = s.create_image("lost", 8, 0).unwrap_err();
        assert!(matches!(e, SpaceError::Io(_)), "{e:?}");
        // The manager did not change, and the disk reopens as it was.
        assert_eq!(s.list(), &before[..]);
        drop(s);
        let s = Space::open(d).unwrap();
        assert_eq!(s.list(), &before[..], "torn after {keep} blocks");
    }
}

#[test]
fn extent_store_is_bounds_checked_and_offset() {
    let (d, s) = formatted();
    s.get("swap").unwrap();
    let mut view = s.extent_store("swap").unwrap();
    assert_eq!((view.block_count(), view.start()), (2040, DATA_START));
    view.write(0, &[7; BLOCK_SIZE]).unwrap();
    assert!(d.borrow().raw()[DATA_START as usize * BLOCK_SIZE..][..BLOCK_SIZE].iter().all(|&b| b == 7));
    let mut buf = [0; 2 * BLOCK_SIZE];
    assert_eq!(view.read(2039, &mut buf), Err(mm::Error::BlockOutOfRange { block: 2039, len: 2 }));
    assert_eq!(view.write(2040, &buf[..BLOCK_SIZE]), Err(mm::Error::BlockOutOfRange { block: 2040, len: 1 }));
    assert_eq!(view.read(u64::MAX, &mut buf), Err(mm::Error::BlockOutOfRange { block: u64::MAX, len: 2 }));
    assert_eq!(view.read(0, &mut buf[..10]), Err(mm::Error::BadBlockBuffer { len: 10 }));
    view.read(2038, &mut buf).unwrap();
    // The swap reservation runs inside the view, and never writes the table.
    let table = d.borrow().raw()[..2 * COPY_BYTES].to_vec();
    let res = SwapReservation::format(view).unwrap();
    assert_eq!(res.stats().slots, (2040 - 1) / 9);
    assert!(d.borrow().raw()[..2 * COPY_BYTES] == table[..]);
    let again = SwapReservation::open(s.extent_store("swap").unwrap());
    assert!(again.is_ok());
}

/// A test pattern that does not repeat with the block size.
fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
}

#[test]
fn a_checkpoint_stream_round_trips_and_is_trimmed_at_close() {
    let (d, mut s) = formatted();
    let free_before = s.free_blocks();
    let data = pattern(100_000);
    let mut w = s.create_checkpoint("cp1", 1 << 20, 77, [2, 0xfeed]).unwrap();
    assert_eq!(w.info().blocks, 2048);
    // Odd-sized pieces: partial blocks, whole blocks, a big run.
    let mut at = 0;
    for piece in [1usize, 511, 3, 1024, 70_000, 5, 512] {
        w.write_all(&data[at..at + piece]).unwrap();
        at += piece;
    }
    w.write_all(&data[at..]).unwrap();
    assert_eq!(w.len(), 100_000);
    let info = w.close(&mut s).unwrap();
    assert!(info.complete);
    assert_eq!((info.bytes, info.blocks, info.created, info.meta), (100_000, 200, 77, [2, 0xfeed]));
    assert_eq!(s.free_blocks(), free_before - 200, "the tail went back");
    // Read back in odd pieces, then after a reopen in one go.
    let mut r = s.read_stream("cp1").unwrap();
    let mut back = Vec::new();
    let mut buf = vec![0; 777];
    loop {
        let n = r.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        back.extend_from_slice(&buf[..n]);
    }
    assert!(back == data);
    drop(s);
    let s = Space::open(d).unwrap();
    let mut r = s.read_stream("cp1").unwrap();
    let mut all = vec![0; 200_000];
    assert_eq!(r.read(&mut all).unwrap(), 100_000);
    assert!(all[..100_000] == data[..]);
    assert_eq!(r.read(&mut all).unwrap(), 0);
}

#[test]
fn a_stream_is_bounded_and_an_unclosed_one_is_dropped_on_open() {
    let (d, mut s) = formatted();
    let mut w = s.create_checkpoint("cp", 4096, 0, [0; 2]).unwrap();
    w.write_all(&[1; 4000]).unwrap();
    assert_eq!(w.write_all(&[1; 97]), Err(SpaceError::StreamFull { max_bytes: 4096 }));
    w.write_all(&[1; 96]).unwrap();
    drop(w); // never closed: a crash mid-save
    let e = s.get("cp").unwrap();
    assert!(!e.complete);
    assert!(matches!(s.read_stream("cp"), Err(SpaceError::Incomplete(_))));
    drop(s);
    let s = Space::open(d.clone()).unwrap();
    assert_eq!(names(&s), ["swap"]);
    assert_eq!(s.dropped(), &[ExtentName::new("cp").unwrap()]);
    drop(s);
    // Abort deletes at once; an empty stream closes to one 4 KiB unit.
    let mut s = Space::open(d).unwrap();
    s.create_checkpoint("gone", 4096, 0, [0; 2]).unwrap().abort(&mut s).unwrap();
    let w = s.create_checkpoint("empty", 1 << 20, 0, [0; 2]).unwrap();
    let info = w.close(&mut s).unwrap();
    assert_eq!((info.bytes, info.blocks), (0, 8));
    assert_eq!(names(&s), ["swap", "empty"]);
    assert_eq!(s.read_stream("empty").unwrap().read(&mut [0; 16]).unwrap(), 0);
}

#[test]
fn a_failed_stream_write_is_reported_and_leaves_the_extent_incomplete() {
    let (d, mut s) = formatted();
    let mut w = s.create_checkpoint("cp", 1 << 16, 0, [0; 2]).unwrap();
    d.borrow_mut().fail_next_writes(1);
    assert!(matches!(w.write_all(&[0; 1024]), Err(SpaceError::Io(_))));
    drop(w);
    assert!(!s.get("cp").unwrap().complete);
}
