//! A hostile stream must not make a reader allocate much: lengths and
//! counts are capped before anything is reserved, and payload buffers grow
//! with the bytes that arrive, not with what a length field claims. One
//! test in this binary, so the allocation counter sees only it.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use migrate::{Error, IoError, Reader, Source, verify};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator and only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(live, Ordering::Relaxed);
        // SAFETY: the caller's contract is GlobalAlloc::alloc's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Peak bytes allocated (above what was live before) while `f` runs.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let r = f();
    (r, PEAK.load(Ordering::Relaxed) - base)
}

/// A source that never ends: zeros forever.
struct Endless;

impl Source for Endless {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, IoError> {
        buf.fill(0);
        Ok(buf.len())
    }
}

/// A raw frame header with a valid header checksum and any length.
fn frame_header(kind: u8, seq: u32, len: u32) -> Vec<u8> {
    let mut b = vec![kind, 0, 1, 0];
    b.extend_from_slice(&seq.to_le_bytes());
    b.extend_from_slice(&len.to_le_bytes());
    let c = CRC32C.checksum(&b);
    b.extend_from_slice(&c.to_le_bytes());
    b
}

#[test]
fn hostile_lengths_do_not_allocate() {
    let h = header(1, &[], false);
    let mut w = migrate::Writer::begin(Vec::new(), &h).unwrap();
    w.vcpu(0, &vcpu_state(0)).unwrap();
    let good = w.finish().unwrap().0;
    let recs = records(&good);
    let head = &good[..recs[1].0];

    // A length of 4 GiB: refused from the frame header alone.
    let s = [head, &frame_header(4, 1, u32::MAX)].concat();
    let (r, peak) = peak_of(|| verify(&s));
    assert!(matches!(r, Err(Error::TooLong { len: 0xffff_ffff, .. })), "{r:?}");
    assert!(peak < 64 * 1024, "peak {peak}");

    // The largest allowed length, with ten bytes behind it: the buffer
    // grows by what arrives (one 64 KiB step), not by the claim.
    let s = [head, &frame_header(4, 1, migrate::limits::MAX_PAYLOAD), &[0u8; 10]].concat();
    let (r, peak) = peak_of(|| verify(&s));
    assert!(matches!(r, Err(Error::Truncated { part: "payload", .. })), "{r:?}");
    assert!(peak < 256 * 1024, "peak {peak}");

    // An endless source behind a maximal length: bounded by the cap.
    let (r, peak) = peak_of(|| {
        let mut src = [head, &frame_header(4, 1, migrate::limits::MAX_PAYLOAD)].concat();
        let mut chained = Chain(&mut src[..], Endless);
        let mut reader = Reader::open(&mut chained).unwrap();
        while reader.next_record()?.is_some() {}
        Ok::<_, Error>(())
    });
    assert!(matches!(r, Err(Error::Checksum { .. })), "{r:?}");
    assert!(peak < 3 * migrate::limits::MAX_PAYLOAD as usize, "peak {peak}");

    // Counts in the configuration: 65535 RAM ranges or devices, refused
    // before anything is reserved for them.
    let (pro, recs) = unforge(&good);
    for field in [8..10, 10..12] {
        let mut r = recs.clone();
        r[0].2[field].copy_from_slice(&u16::MAX.to_le_bytes());
        let s = forge(&pro, &r);
        let (r, peak) = peak_of(|| verify(&s));
        assert!(matches!(r, Err(Error::Malformed { .. })), "{r:?}");
        assert!(peak < 64 * 1024, "peak {peak}");
    }

    // An LZ4 block claiming to expand to 255 pages: refused on the count.
    let mut r = recs.clone();
    let mut entry = vec![3u8];
    entry.extend_from_slice(&0u64.to_le_bytes());
    entry.push(255);
    entry.extend_from_slice(&4u32.to_le_bytes());
    entry.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]);
    r.push((4, 1, entry));
    let s = forge(&pro, &r);
    let (r, peak) = peak_of(|| verify(&s));
    assert!(matches!(r, Err(Error::Malformed { .. })), "{r:?}");
    assert!(peak < 64 * 1024, "peak {peak}");
}

/// `a` then `b`.
struct Chain<'a, B>(&'a mut [u8], B);

impl<B: Source> Source for Chain<'_, B> {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, IoError> {
        if self.0.is_empty() {
            return self.1.read(buf);
        }
        let mut a: &[u8] = self.0;
        let n = a.read(buf)?;
        let rest = std::mem::take(&mut self.0);
        self.0 = &mut rest[n..];
        Ok(n)
    }
}
