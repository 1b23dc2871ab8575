//! Behaviour tests of the paging engine and guest RAM, run on `SimPhys`.

mod entry_bits;
mod guest_ram;
mod harvest;
mod map_translate;
mod oom;
mod split_merge;
pub(crate) mod vm;

use alloc::vec::Vec;

use crate::addr::GuestPhysAddr;
use crate::paging::{EntryFormat, FlushScope, Invalidation, Mapping, NestedPageTable};
use crate::sim::SimPhys;

/// Instantiate generic test functions `fn name<F: EntryFormat>()` once per
/// format, as `ept::name` and `npt::name`.
macro_rules! for_both_formats {
    ($($name:ident),* $(,)?) => {
        mod ept {
            $(#[test] fn $name() { super::$name::<crate::paging::Ept>() })*
        }
        mod npt {
            $(#[test] fn $name() { super::$name::<crate::paging::Npt>() })*
        }
    };
}
pub(crate) use for_both_formats;

/// xorshift64*: a tiny seeded generator, so property tests are repeatable
/// and need no extra dependency.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform-ish in `0..n` (n > 0).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub(crate) fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// A simulated memory big enough for any table these tests build.
pub(crate) fn table_sim() -> SimPhys {
    SimPhys::new(16 * 1024)
}

/// Flush `inv` and return the scope it asked for.
pub(crate) fn flush<F: EntryFormat>(inv: Invalidation<F>, sim: &mut SimPhys) -> Option<FlushScope> {
    let mut seen = None;
    inv.flush(sim, |scope| {
        assert!(seen.is_none(), "flush callback called twice");
        seen = Some(scope);
    });
    seen
}

/// Destroy `table`, check it asked for a full flush, and that every table
/// frame went back.
pub(crate) fn destroy<F: EntryFormat>(table: NestedPageTable<F>, sim: &mut SimPhys, other_frames: usize) {
    let frames = table.table_frames();
    let before = sim.frames_in_use();
    assert_eq!(flush(table.destroy(), sim), Some(FlushScope::All));
    assert_eq!(sim.frames_in_use(), before - frames);
    assert_eq!(sim.frames_in_use(), other_frames, "table frames leaked");
}

pub(crate) fn all_mappings<F: EntryFormat>(table: &NestedPageTable<F>, sim: &SimPhys) -> Vec<Mapping> {
    table.mappings(sim, GuestPhysAddr(0)..GuestPhysAddr(crate::addr::GUEST_PHYS_LIMIT)).collect()
}
