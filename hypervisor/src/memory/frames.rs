//! The host's physical frame allocator: one bit per 4 KiB frame, built from
//! the boot memory map. Hand-written rather than a crate because it must hand
//! out naturally aligned contiguous runs (2 MiB / 1 GiB backing for guest RAM)
//! as well as single frames, from storage carved out before the heap exists.

pub const FRAME_SIZE: u64 = 4096;

/// Why a free was refused: the allocator's state is left unchanged.
#[derive(Debug, PartialEq, Eq)]
pub enum FreeError {
    /// The frame lies beyond the memory the bitmap covers.
    OutOfRange(u64),
    /// The frame was already free (a double free).
    NotAllocated(u64),
    /// The address is not 4 KiB aligned.
    Misaligned(u64),
}

impl core::fmt::Display for FreeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            FreeError::OutOfRange(a) => write!(f, "frame {a:#x} is outside managed memory"),
            FreeError::NotAllocated(a) => write!(f, "frame {a:#x} is already free"),
            FreeError::Misaligned(a) => write!(f, "address {a:#x} is not frame aligned"),
        }
    }
}

/// Bit set = frame in use (or not RAM). Frame N covers [N*4K, (N+1)*4K).
pub struct FrameBitmap<'a> {
    bits: &'a mut [u64],
    frames: u64,
    free: u64,
    /// Where the next single-frame search starts (next fit).
    hint: u64,
}

impl<'a> FrameBitmap<'a> {
    /// Words of storage needed to cover physical memory up to `end`.
    pub const fn words_for(end: u64) -> usize {
        end.div_ceil(FRAME_SIZE).div_ceil(64) as usize
    }

    /// Everything starts in use; `add_free` then opens the usable ranges.
    pub fn new(bits: &'a mut [u64]) -> Self {
        bits.fill(!0);
        let frames = bits.len() as u64 * 64;
        FrameBitmap { bits, frames, free: 0, hint: 0 }
    }

    /// Marks whole frames inside [start, end) free; partial frames stay used.
    pub fn add_free(&mut self, start: u64, end: u64) {
        let first = start.div_ceil(FRAME_SIZE);
        let last = (end / FRAME_SIZE).min(self.frames);
        for f in first..last {
            if self.test(f) {
                self.clear(f);
                self.free += 1;
            }
        }
    }

    /// Marks whole or partial frames overlapping [start, end) used.
    pub fn reserve(&mut self, start: u64, end: u64) {
        let first = start / FRAME_SIZE;
        let last = end.div_ceil(FRAME_SIZE).min(self.frames);
        for f in first..last {
            if !self.test(f) {
                self.set(f);
                self.free -= 1;
            }
        }
    }

    pub fn free_frames(&self) -> u64 {
        self.free
    }

    /// One frame's physical address.
    pub fn alloc(&mut self) -> Option<u64> {
        if self.free == 0 {
            return None;
        }
        let words = self.bits.len() as u64;
        let start_word = self.hint / 64;
        for i in 0..words {
            let w = (start_word + i) % words;
            let word = self.bits[w as usize];
            if word != !0 {
                let bit = (!word).trailing_zeros() as u64;
                let f = w * 64 + bit;
                self.set(f);
                self.free -= 1;
                self.hint = f + 1;
                return Some(f * FRAME_SIZE);
            }
        }
        None
    }

    /// One frame inside physical range [start, end) (a NUMA node's memory),
    /// if one is free there.
    pub fn alloc_in(&mut self, start: u64, end: u64) -> Option<u64> {
        let (first, last) = (start.div_ceil(FRAME_SIZE), (end / FRAME_SIZE).min(self.frames));
        if self.free == 0 || first >= last {
            return None;
        }
        // Next fit within the range when the hint is in it.
        let from = if (first..last).contains(&self.hint) { self.hint } else { first };
        let found = self.first_clear(from, last).or_else(|| self.first_clear(first, from))?;
        self.set(found);
        self.free -= 1;
        self.hint = found + 1;
        Some(found * FRAME_SIZE)
    }

    /// The first free frame in [from, to), a word at a time.
    fn first_clear(&self, from: u64, to: u64) -> Option<u64> {
        let mut f = from;
        while f < to {
            let word = self.bits[(f / 64) as usize] | ((1u64 << (f % 64)) - 1);
            if word != !0 {
                let g = (f / 64) * 64 + (!word).trailing_zeros() as u64;
                return (g < to).then_some(g);
            }
            f = (f / 64 + 1) * 64;
        }
        None
    }

    /// Free frames inside [start, end).
    pub fn free_frames_in(&self, start: u64, end: u64) -> u64 {
        let (first, last) = (start.div_ceil(FRAME_SIZE), (end / FRAME_SIZE).min(self.frames));
        (first..last).filter(|&f| !self.test(f)).count() as u64
    }

    /// `size` bytes of contiguous frames starting at a multiple of `align`
    /// (both multiples of 4 KiB, align a power of two).
    pub fn alloc_contiguous(&mut self, size: u64, align: u64) -> Option<u64> {
        self.alloc_contiguous_in(size, align, 0, u64::MAX)
    }

    /// As [`alloc_contiguous`](Self::alloc_contiguous), the run inside
    /// physical range [start, end).
    pub fn alloc_contiguous_in(&mut self, size: u64, align: u64, start: u64, end: u64) -> Option<u64> {
        if size == 0 || !size.is_multiple_of(FRAME_SIZE) || !align.is_power_of_two() || align < FRAME_SIZE {
            return None;
        }
        let count = size / FRAME_SIZE;
        let step = align / FRAME_SIZE;
        if count > self.free {
            return None;
        }
        let last = (end / FRAME_SIZE).min(self.frames);
        let mut f = start.div_ceil(FRAME_SIZE).next_multiple_of(step);
        while f + count <= last {
            match (f..f + count).find(|&g| self.test(g)) {
                None => {
                    for g in f..f + count {
                        self.set(g);
                    }
                    self.free -= count;
                    return Some(f * FRAME_SIZE);
                }
                // Skip past the used frame to the next aligned candidate.
                Some(used) => f = (used / step + 1) * step,
            }
        }
        None
    }

    pub fn free(&mut self, addr: u64) -> Result<(), FreeError> {
        self.free_range(addr, FRAME_SIZE)
    }

    /// Frees [addr, addr+size); checks every frame first so a bad request
    /// changes nothing.
    pub fn free_range(&mut self, addr: u64, size: u64) -> Result<(), FreeError> {
        if !addr.is_multiple_of(FRAME_SIZE) || !size.is_multiple_of(FRAME_SIZE) {
            return Err(FreeError::Misaligned(addr));
        }
        let first = addr / FRAME_SIZE;
        let count = size / FRAME_SIZE;
        if first.checked_add(count).is_none_or(|end| end > self.frames) {
            return Err(FreeError::OutOfRange(addr));
        }
        if let Some(f) = (first..first + count).find(|&f| !self.test(f)) {
            return Err(FreeError::NotAllocated(f * FRAME_SIZE));
        }
        for f in first..first + count {
            self.clear(f);
        }
        self.free += count;
        Ok(())
    }

    fn test(&self, f: u64) -> bool {
        self.bits[(f / 64) as usize] & (1 << (f % 64)) != 0
    }
    fn set(&mut self, f: u64) {
        self.bits[(f / 64) as usize] |= 1 << (f % 64);
    }
    fn clear(&mut self, f: u64) {
        self.bits[(f / 64) as usize] &= !(1 << (f % 64));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;

    fn bitmap(storage: &mut Vec<u64>) -> FrameBitmap<'_> {
        FrameBitmap::new(storage.as_mut_slice())
    }

    #[test]
    fn allocations_in_a_range_stay_in_it() {
        let mut storage = vec![0u64; FrameBitmap::words_for(64 * MB)];
        let mut b = bitmap(&mut storage);
        b.add_free(MB, 64 * MB);
        let (lo, hi) = (32 * MB, 48 * MB);
        let before = b.free_frames_in(lo, hi);
        assert_eq!(before, 16 * MB / FRAME_SIZE);
        for _ in 0..before {
            let f = b.alloc_in(lo, hi).unwrap();
            assert!((lo..hi).contains(&f), "{f:#x}");
        }
        assert_eq!(b.alloc_in(lo, hi), None, "the range is full");
        assert_eq!(b.free_frames_in(lo, hi), 0);
        // Elsewhere is untouched, and a freed frame in the range comes back.
        assert_eq!(b.free_frames(), (63 * MB - 16 * MB) / FRAME_SIZE);
        b.free(lo + 5 * FRAME_SIZE).unwrap();
        assert_eq!(b.alloc_in(lo, hi), Some(lo + 5 * FRAME_SIZE));
        // Unaligned bounds take whole frames only; an empty range has none.
        assert_eq!(b.alloc_in(MB + 1, MB + FRAME_SIZE + 1), None);
        assert_eq!(b.alloc_in(hi, lo), None);
        let run = b.alloc_contiguous_in(2 * MB, 2 * MB, 50 * MB, 60 * MB).unwrap();
        assert!(run >= 50 * MB && run + 2 * MB <= 60 * MB && run.is_multiple_of(2 * MB), "{run:#x}");
        assert_eq!(b.alloc_contiguous_in(2 * MB, 2 * MB, 40 * MB, 44 * MB), None, "inside the full range");
    }

    #[test]
    fn only_usable_frames_are_handed_out() {
        let mut s = vec![0; FrameBitmap::words_for(16 * MB)];
        let mut b = bitmap(&mut s);
        b.add_free(MB + 100, 2 * MB); // partial first frame excluded
        assert_eq!(b.free_frames(), 255);
        let mut got = Vec::new();
        while let Some(f) = b.alloc() {
            assert!((MB + FRAME_SIZE..2 * MB).contains(&f), "{f:#x}");
            got.push(f);
        }
        assert_eq!(got.len(), 255);
        got.sort();
        got.dedup();
        assert_eq!(got.len(), 255, "no frame handed out twice");
        assert_eq!(b.free_frames(), 0);
    }

    #[test]
    fn contiguous_runs_are_aligned_and_skip_holes() {
        let mut s = vec![0; FrameBitmap::words_for(64 * MB)];
        let mut b = bitmap(&mut s);
        b.add_free(MB, 64 * MB);
        b.reserve(4 * MB + 8192, 4 * MB + 12288); // a hole in the second 2 MiB run
        let a = b.alloc_contiguous(2 * MB, 2 * MB).unwrap();
        assert_eq!(a, 2 * MB);
        let c = b.alloc_contiguous(2 * MB, 2 * MB).unwrap();
        assert_eq!(c, 6 * MB, "the run at 4 MiB has a hole");
        let before = b.free_frames();
        assert!(b.alloc_contiguous(128 * MB, 2 * MB).is_none());
        assert_eq!(b.free_frames(), before, "a failed allocation takes nothing");
    }

    #[test]
    fn frees_are_checked_and_atomic() {
        let mut s = vec![0; FrameBitmap::words_for(8 * MB)];
        let mut b = bitmap(&mut s);
        b.add_free(0, 8 * MB);
        let a = b.alloc_contiguous(4 * FRAME_SIZE, FRAME_SIZE).unwrap();
        let free = b.free_frames();
        assert_eq!(b.free(a + 1), Err(FreeError::Misaligned(a + 1)));
        assert_eq!(b.free_range(a, 8 * FRAME_SIZE), Err(FreeError::NotAllocated(a + 4 * FRAME_SIZE)));
        assert_eq!(b.free_frames(), free, "refused free changed nothing");
        assert_eq!(b.free(64 * MB), Err(FreeError::OutOfRange(64 * MB)));
        b.free_range(a, 4 * FRAME_SIZE).unwrap();
        assert_eq!(b.free(a), Err(FreeError::NotAllocated(a)));
        assert_eq!(b.free_frames(), free + 4);
    }

    #[test]
    fn next_fit_wraps_around() {
        let mut s = vec![0; FrameBitmap::words_for(MB)];
        let mut b = bitmap(&mut s);
        b.add_free(0, MB);
        let first = b.alloc().unwrap();
        for _ in 1..256 {
            b.alloc().unwrap();
        }
        assert!(b.alloc().is_none());
        b.free(first).unwrap();
        assert_eq!(b.alloc(), Some(first));
    }
}
