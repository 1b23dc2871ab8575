//! TLB-invalidation tokens.
//!
//! Every operation that changes or removes a translation the hardware may
//! have cached returns an [`Invalidation`]. It is `#[must_use]`, so a
//! forgotten INVEPT / INVLPGA / TLB_CONTROL flush is a compiler warning
//! (the same idea as the `x86_64` crate's `MapperFlush`).
//!
//! Page-table frames that an operation unlinks (by `merge`, by mapping a large
//! page over an emptied table, or by `destroy`) ride in the token and are
//! freed only by [`Invalidation::flush`], after the caller's flush callback:
//! until then a vCPU may still walk them through a cached upper-level entry
//! and set accessed/dirty bits in them (SDM Vol. 3C 29.4.3.1, APM Vol. 2
//! 15.16.1), so recycling them earlier would let the hardware write into
//! someone else's memory.

use alloc::vec::Vec;
use core::marker::PhantomData;
use core::sync::atomic::Ordering;

use super::format::EntryFormat;
use super::table::{ENTRIES, is_table, slots};
use crate::addr::{GuestPhysAddr, HostPhysAddr};
use crate::hal::FrameAlloc;

/// What must be flushed from the TLBs (and paging-structure caches) of every
/// CPU that may use the table.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum FlushScope {
    /// Translations of guest-physical addresses in `[start, start + len)`.
    ///
    /// INVEPT has no per-address form and INVLPGA works on guest-virtual
    /// addresses, so backends will usually flush the whole context anyway;
    /// the range tells them (and tests) what actually changed.
    Range {
        /// First affected guest-physical address.
        start: GuestPhysAddr,
        /// Length in bytes.
        len: u64,
    },
    /// Everything derived from this table (INVEPT single-context on the
    /// EPTP, or a new ASID / TLB_CONTROL flush on AMD).
    All,
}

impl FlushScope {
    /// The smallest scope covering both.
    pub fn union(self, other: FlushScope) -> FlushScope {
        match (self, other) {
            (FlushScope::Range { start: a, len: alen }, FlushScope::Range { start: b, len: blen }) => {
                let start = a.min(b);
                let end = (a.0 + alen).max(b.0 + blen);
                FlushScope::Range { start, len: end - start.0 }
            }
            _ => FlushScope::All,
        }
    }

    /// Whether flushing this scope covers `gpa`.
    pub fn covers(&self, gpa: GuestPhysAddr) -> bool {
        match *self {
            FlushScope::Range { start, len } => gpa >= start && gpa.0 - start.0 < len,
            FlushScope::All => true,
        }
    }
}

/// A table detached from the tree, with everything below it.
#[derive(Clone, Copy, Debug)]
pub(super) struct Retired {
    pub(super) table: HostPhysAddr,
    /// Paging level of `table` (4 = root).
    pub(super) level: usize,
}

/// A pending TLB flush, plus table frames to free once it is done.
///
/// Consume it with [`flush`](Self::flush). Tokens of several operations can
/// be [`combine`](Self::combine)d into one flush. Dropping a token that
/// carries retired tables leaks them (and panics in debug builds).
#[must_use = "the TLBs may still hold the old translation: call `flush`"]
pub struct Invalidation<F: EntryFormat> {
    scope: Option<FlushScope>,
    retired: Vec<Retired>,
    _format: PhantomData<fn() -> F>,
}

impl<F: EntryFormat> Invalidation<F> {
    /// Nothing to flush.
    pub fn none() -> Self {
        Self { scope: None, retired: Vec::new(), _format: PhantomData }
    }

    /// A flush of `[start, start + len)` with nothing to free, for changes
    /// made outside the table (e.g. a stale translation a fault handler
    /// found: the TLB may still hold what the table no longer says).
    pub fn of_range(start: GuestPhysAddr, len: u64) -> Self {
        Self::range(start, len)
    }

    pub(super) fn range(start: GuestPhysAddr, len: u64) -> Self {
        Self { scope: Some(FlushScope::Range { start, len }), retired: Vec::new(), _format: PhantomData }
    }

    pub(super) fn all() -> Self {
        Self { scope: Some(FlushScope::All), retired: Vec::new(), _format: PhantomData }
    }

    /// Add a detached table whose frames may be freed after the flush.
    pub(super) fn retire(mut self, table: HostPhysAddr, level: usize) -> Self {
        self.retired.push(Retired { table, level });
        self
    }

    /// What must be flushed, or `None` when nothing changed.
    pub fn scope(&self) -> Option<FlushScope> {
        self.scope
    }

    /// Whether there is nothing to flush.
    pub fn is_none(&self) -> bool {
        self.scope.is_none()
    }

    /// Detached tables that `flush` will free (their subtrees included).
    pub fn retired_tables(&self) -> usize {
        self.retired.len()
    }

    /// One token covering both.
    pub fn combine(mut self, mut other: Self) -> Self {
        self.scope = match (self.scope, other.scope) {
            (Some(a), Some(b)) => Some(a.union(b)),
            (a, b) => a.or(b),
        };
        self.retired.append(&mut other.retired);
        self
    }

    /// Flush: call `flush_tlbs` with the scope (not at all when nothing
    /// changed), then free the retired table frames to `alloc`.
    ///
    /// `flush_tlbs` must not return before every CPU that may use the table
    /// has dropped the cached translations in the scope; `alloc` must be the
    /// allocator the table's frames came from.
    pub fn flush<A: FrameAlloc>(mut self, alloc: &mut A, flush_tlbs: impl FnOnce(FlushScope)) {
        let retired = core::mem::take(&mut self.retired);
        if let Some(scope) = self.scope.take() {
            flush_tlbs(scope);
        }
        for r in retired {
            free_subtree::<F, A>(alloc, r.table, r.level);
        }
    }
}

impl<F: EntryFormat> Default for Invalidation<F> {
    fn default() -> Self {
        Self::none()
    }
}

impl<F: EntryFormat> core::fmt::Debug for Invalidation<F> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Invalidation").field("scope", &self.scope).field("retired_tables", &self.retired.len()).finish()
    }
}

impl<F: EntryFormat> Drop for Invalidation<F> {
    /// Freeing without the flush could hand a frame the hardware still walks
    /// to someone else, so an unflushed token leaks its tables instead.
    fn drop(&mut self) {
        if !self.retired.is_empty() {
            crate::leaked("an Invalidation carrying retired page tables", self.retired.len());
        }
    }
}

/// Free `table` (at `level`) and every table below it. Leaves own nothing.
fn free_subtree<F: EntryFormat, A: FrameAlloc>(alloc: &mut A, table: HostPhysAddr, level: usize) {
    if level > 1 {
        for i in 0..ENTRIES {
            let raw = slots(&*alloc, table)[i].load(Ordering::Acquire);
            if is_table::<F>(raw, level) {
                free_subtree::<F, A>(alloc, F::decode_table(raw), level - 1);
            }
        }
    }
    // SAFETY: `table` came from `alloc.alloc_frame` when it was linked into
    // the tree; it was unlinked before this token was made and the caller's
    // flush has run, so neither software nor hardware references it.
    unsafe { alloc.free_frame(table) };
}
