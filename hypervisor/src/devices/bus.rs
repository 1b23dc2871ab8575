//! An address-range map from bus addresses (I/O ports, guest-physical MMIO)
//! to devices. Ranges never overlap; a lookup is a binary search, so the
//! exit path costs O(log devices) with no allocation, after a check of the
//! range the last lookup found (a guest talks to one device many times in
//! a row: a console write is a run of THR writes and LSR reads).

use alloc::vec::Vec;
use core::cell::Cell;
use core::fmt;
use core::ops::Range;

/// A device's place on a bus: `len` bytes from `base`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry<T> {
    base: u64,
    len: u64,
    device: T,
}

/// A range that was refused because it overlaps one already on the bus,
/// or is empty or wraps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    pub range: Range<u64>,
    /// The range already there, if that was the reason.
    pub taken: Option<Range<u64>>,
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.taken {
            Some(t) => {
                write!(f, "{:#x}..{:#x} overlaps {:#x}..{:#x}", self.range.start, self.range.end, t.start, t.end)
            }
            None => write!(f, "{:#x}..{:#x} is empty or wraps", self.range.start, self.range.end),
        }
    }
}

/// Ranges of one bus, each naming a device (an index, typically).
#[derive(Clone, Debug)]
pub struct Bus<T> {
    entries: Vec<Entry<T>>,
    /// The entry the last successful lookup found (a hint, always a valid
    /// index when `entries` is not empty).
    last: Cell<usize>,
}

impl<T> Default for Bus<T> {
    fn default() -> Self {
        Self { entries: Vec::new(), last: Cell::new(0) }
    }
}

impl<T: Copy> Bus<T> {
    /// Put `device` at `len` bytes from `base`.
    pub fn insert(&mut self, base: u64, len: u64, device: T) -> Result<(), Conflict> {
        let end = base.checked_add(len).filter(|_| len > 0).ok_or(Conflict { range: base..base, taken: None })?;
        let at = self.entries.partition_point(|e| e.base < base);
        let clash = |e: &Entry<T>| base < e.base + e.len && e.base < end;
        for e in self.entries[at.saturating_sub(1)..].iter().take(2) {
            if clash(e) {
                return Err(Conflict { range: base..end, taken: Some(e.base..e.base + e.len) });
            }
        }
        self.entries.insert(at, Entry { base, len, device });
        self.last.set(0);
        Ok(())
    }

    /// The index of the entry holding `addr`: the last one found, if it
    /// still matches, else a binary search.
    fn entry_of(&self, addr: u64) -> Option<usize> {
        if let Some(e) = self.entries.get(self.last.get())
            && e.base <= addr
            && addr - e.base < e.len
        {
            return Some(self.last.get());
        }
        let i = self.entries.partition_point(|e| e.base <= addr).checked_sub(1)?;
        let e = &self.entries[i];
        (addr - e.base < e.len).then(|| {
            self.last.set(i);
            i
        })
    }

    /// The device at `addr` and `addr`'s offset in its range.
    pub fn find(&self, addr: u64) -> Option<(T, u64)> {
        let e = &self.entries[self.entry_of(addr)?];
        Some((e.device, addr - e.base))
    }

    /// The device at `addr`, `addr`'s offset in its range, and how many
    /// bytes of the range lie from `addr` on.
    pub fn find_with_rest(&self, addr: u64) -> Option<(T, u64, u64)> {
        let e = &self.entries[self.entry_of(addr)?];
        let offset = addr - e.base;
        Some((e.device, offset, e.len - offset))
    }

    /// The device an access of `len` bytes at `addr` falls in, if all of it
    /// does (an access straddling two devices or a device's end reaches
    /// none, as on a PC bus where each byte lane decodes on its own; the
    /// caller treats it as unbacked).
    pub fn find_access(&self, addr: u64, len: u64) -> Option<(T, u64)> {
        let (device, offset, rest) = self.find_with_rest(addr)?;
        (len <= rest).then_some((device, offset))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_and_offsets() {
        let mut bus = Bus::default();
        bus.insert(0x3f8, 8, 'u').unwrap();
        bus.insert(0xf4, 1, 'x').unwrap();
        bus.insert(0x70, 2, 'r').unwrap();
        assert_eq!(bus.find(0x3f8), Some(('u', 0)));
        assert_eq!(bus.find(0x3ff), Some(('u', 7)));
        assert_eq!(bus.find(0x400), None);
        assert_eq!(bus.find(0x3f7), None);
        assert_eq!(bus.find(0x71), Some(('r', 1)));
        assert_eq!(bus.find(0), None);
        assert_eq!(bus.find(u64::MAX), None);
        assert_eq!(bus.find_access(0x3fc, 4), Some(('u', 4)));
        assert_eq!(bus.find_access(0x3fd, 4), None, "runs past the device's end");
        assert_eq!(bus.find_access(0xf4, 4), None);
        assert_eq!(bus.find_access(0xf4, 1), Some(('x', 0)));
        assert_eq!(bus.find_access(u64::MAX, 2), None, "no wrap");
    }

    #[test]
    fn overlaps_and_empty_ranges_are_refused() {
        let mut bus = Bus::default();
        bus.insert(0x100, 0x10, 1).unwrap();
        bus.insert(0x200, 0x10, 2).unwrap();
        for (base, len) in [(0x10f, 1), (0xf8, 0x10), (0x100, 0x200), (0x1f0, 0x11), (0x0, 0x1000)] {
            let e = bus.insert(base, len, 9).unwrap_err();
            assert!(e.taken.is_some(), "{base:#x}+{len:#x}: {e}");
        }
        assert_eq!(bus.insert(0x300, 0, 9).unwrap_err().taken, None);
        assert_eq!(bus.insert(u64::MAX, 2, 9).unwrap_err().taken, None);
        // Touching is fine.
        bus.insert(0x110, 0xf0, 3).unwrap();
        bus.insert(0xff, 1, 4).unwrap();
        assert_eq!(bus.find(0x1ff), Some((3, 0xef)));
        assert_eq!(bus.find(0xff), Some((4, 0)));
    }
}
