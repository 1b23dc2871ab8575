//! Bounds-checked byte and integer access to guest RAM.
//!
//! Guest addresses and lengths come from the guest and are hostile: every
//! access is checked against the layout as a whole before a byte moves, so a
//! refused write changes nothing. Guest memory changes under our feet (vCPUs,
//! DMA), so it is copied with volatile accesses and never borrowed as a
//! slice.

use super::{Backing, GuestRam};
use crate::addr::{GuestPhysAddr, HostPhysAddr, PAGE_SIZE_4K};
use crate::error::Error;
use crate::hal::PhysMem;

/// A piece of an access that is contiguous in host memory.
struct Piece {
    hpa: HostPhysAddr,
    /// Offset into the caller's buffer.
    offset: usize,
    len: usize,
}

/// The pieces of an access already checked to lie inside RAM.
struct Pieces<'a> {
    ram: &'a GuestRam,
    chunk: usize,
    cur: u64,
    end: u64,
    offset: usize,
}

impl Iterator for Pieces<'_> {
    type Item = Piece;

    fn next(&mut self) -> Option<Piece> {
        if self.cur >= self.end {
            return None;
        }
        let c = self.ram.chunks.get(self.chunk)?;
        let mut piece_end = self.end.min(c.end());
        if c.backing == Backing::Frames {
            // Frames of a `Frames` chunk came from separate allocations; the
            // `PhysMem` contract only promises a linear map within one.
            piece_end = piece_end.min((self.cur | (PAGE_SIZE_4K - 1)) + 1);
        }
        let piece = Piece {
            hpa: HostPhysAddr(c.hpa.0 + (self.cur - c.gpa.0)),
            offset: self.offset,
            len: (piece_end - self.cur) as usize,
        };
        self.offset += piece.len;
        self.cur = piece_end;
        if self.cur == c.end() {
            self.chunk += 1;
        }
        Some(piece)
    }
}

impl GuestRam {
    /// Check that `[gpa, gpa + len)` is all RAM and split it into pieces.
    fn pieces(&self, gpa: GuestPhysAddr, len: u64) -> Result<Pieces<'_>, Error> {
        let outside = Error::OutsideGuestRam { gpa, len };
        let end = gpa.0.checked_add(len).ok_or(outside)?;
        let first = if len == 0 { 0 } else { self.chunk_index(gpa.0).ok_or(outside)? };
        // Chunks are sorted and non-overlapping: the range is covered iff
        // each following chunk starts where the previous one ends.
        let mut covered = self.chunks.get(first).map_or(gpa.0, |c| c.end());
        for c in self.chunks.iter().skip(first + 1) {
            if covered >= end || c.gpa.0 != covered {
                break;
            }
            covered = c.end();
        }
        if len != 0 && covered < end {
            return Err(outside);
        }
        Ok(Pieces { ram: self, chunk: first, cur: gpa.0, end, offset: 0 })
    }

    /// Whether every byte of `[gpa, gpa + len)` is RAM.
    pub fn contains(&self, gpa: GuestPhysAddr, len: u64) -> bool {
        self.pieces(gpa, len).is_ok()
    }

    /// Copy guest RAM at `gpa` into `buf`. Fails, copying nothing, if any byte
    /// is outside RAM.
    pub fn read<M: PhysMem>(&self, mem: &M, gpa: GuestPhysAddr, buf: &mut [u8]) -> Result<(), Error> {
        for p in self.pieces(gpa, buf.len() as u64)? {
            let src = mem.phys_to_ptr(p.hpa);
            // SAFETY: the piece lies inside one allocation of RAM owned by
            // `self` (checked by `pieces`), which `PhysMem` maps linearly and
            // validly while `mem` is borrowed.
            unsafe { copy_from_guest(src, &mut buf[p.offset..p.offset + p.len]) };
        }
        Ok(())
    }

    /// Copy `data` into guest RAM at `gpa`. Fails, writing nothing, if any
    /// byte is outside RAM.
    pub fn write<M: PhysMem>(&self, mem: &M, gpa: GuestPhysAddr, data: &[u8]) -> Result<(), Error> {
        for p in self.pieces(gpa, data.len() as u64)? {
            let dst = mem.phys_to_ptr(p.hpa);
            // SAFETY: as in `read`; the memory is guest RAM, never
            // referenced by Rust code, so writing it breaks no borrow.
            unsafe { copy_to_guest(dst, &data[p.offset..p.offset + p.len]) };
        }
        Ok(())
    }

    /// Read a little-endian integer at `gpa` (any alignment).
    pub fn read_obj<T: LeInt, M: PhysMem>(&self, mem: &M, gpa: GuestPhysAddr) -> Result<T, Error> {
        let mut buf = [0u8; 8];
        self.read(mem, gpa, &mut buf[..T::SIZE])?;
        Ok(T::from_le(&buf))
    }

    /// Write a little-endian integer at `gpa` (any alignment).
    pub fn write_obj<T: LeInt, M: PhysMem>(&self, mem: &M, gpa: GuestPhysAddr, value: T) -> Result<(), Error> {
        let mut buf = [0u8; 8];
        value.to_le(&mut buf);
        self.write(mem, gpa, &buf[..T::SIZE])
    }
}

mod sealed {
    pub trait Sealed {}
}

/// Integers that guest RAM can hold, stored little-endian as on x86.
pub trait LeInt: Copy + sealed::Sealed {
    /// Size in bytes (at most 8).
    const SIZE: usize;
    /// From the first `SIZE` bytes of `bytes`.
    fn from_le(bytes: &[u8; 8]) -> Self;
    /// Into the first `SIZE` bytes of `bytes`.
    fn to_le(self, bytes: &mut [u8; 8]);
}

macro_rules! le_int {
    ($($t:ty),*) => {$(
        impl sealed::Sealed for $t {}
        impl LeInt for $t {
            const SIZE: usize = core::mem::size_of::<$t>();
            fn from_le(bytes: &[u8; 8]) -> Self {
                let mut raw = [0u8; core::mem::size_of::<$t>()];
                raw.copy_from_slice(&bytes[..Self::SIZE]);
                <$t>::from_le_bytes(raw)
            }
            fn to_le(self, bytes: &mut [u8; 8]) {
                bytes[..Self::SIZE].copy_from_slice(&self.to_le_bytes());
            }
        }
    )*};
}
le_int!(u8, u16, u32, u64, i8, i16, i32, i64);

/// Volatile copy out of guest memory: byte by byte up to 8-byte alignment,
/// then 8 bytes at a time. Volatile keeps the compiler from assuming the
/// memory is stable (it is not: the guest runs concurrently).
///
/// # Safety
///
/// `src` is valid for reads of `dst.len()` bytes.
unsafe fn copy_from_guest(src: *const u8, dst: &mut [u8]) {
    let n = dst.len();
    let mut i = 0;
    while i < n {
        if (src.addr() + i) % 8 == 0 && n - i >= 8 {
            // SAFETY: `i + 8 <= n`, so the word is inside the valid range, and
            // the address is 8-byte aligned.
            let word = unsafe { src.add(i).cast::<u64>().read_volatile() };
            dst[i..i + 8].copy_from_slice(&word.to_ne_bytes());
            i += 8;
        } else {
            // SAFETY: `i < n`, inside the valid range.
            dst[i] = unsafe { src.add(i).read_volatile() };
            i += 1;
        }
    }
}

/// Volatile copy into guest memory; see [`copy_from_guest`].
///
/// # Safety
///
/// `dst` is valid for writes of `src.len()` bytes and not referenced by any
/// Rust reference.
unsafe fn copy_to_guest(dst: *mut u8, src: &[u8]) {
    let n = src.len();
    let mut i = 0;
    while i < n {
        if (dst.addr() + i) % 8 == 0 && n - i >= 8 {
            let mut word = [0u8; 8];
            word.copy_from_slice(&src[i..i + 8]);
            // SAFETY: `i + 8 <= n`, inside the valid range, 8-byte aligned.
            unsafe { dst.add(i).cast::<u64>().write_volatile(u64::from_ne_bytes(word)) };
            i += 8;
        } else {
            // SAFETY: `i < n`, inside the valid range.
            unsafe { dst.add(i).write_volatile(src[i]) };
            i += 1;
        }
    }
}
