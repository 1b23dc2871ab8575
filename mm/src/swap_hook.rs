//! The interface between the per-VM memory object and a swap store.
//!
//! [`VmMemory::swap_out`](crate::vm_memory::VmMemory::swap_out) writes a
//! page through [`PageStore::page_out`] and keeps the returned slot in the
//! page's state; a later guest touch pages it back in through
//! [`PageStore::page_in`] (see `VmMemory::handle_fault`). [`MemStore`] is
//! an in-memory store with per-slot checksums for tests and benchmarks.

use alloc::boxed::Box;
use alloc::vec::Vec;

use crate::addr::GuestPhysAddr;

/// A swap store's handle for one stored page, packed into one 64-bit word.
///
/// `VmMemory` keeps one word per guest page for whatever backs it (a frame
/// address or a slot), allocated with the VM, so nothing it tracks grows
/// while the guest runs.
pub trait SlotWord: Copy + Eq + core::fmt::Debug {
    /// The handle as a word; [`from_word`](Self::from_word) gives it back.
    fn to_word(self) -> u64;
    /// The handle [`to_word`](Self::to_word) packed.
    fn from_word(word: u64) -> Self;
}

impl SlotWord for u64 {
    fn to_word(self) -> u64 {
        self
    }

    fn from_word(word: u64) -> Self {
        word
    }
}

/// Where swapped-out guest pages go. Implemented by `mm::swap::SwapFile`.
pub trait PageStore {
    type Slot: SlotWord;
    /// Write one 4 KiB page; returns the slot that now holds it.
    fn page_out(&mut self, gpa: GuestPhysAddr, page: &[u8; 4096]) -> Result<Self::Slot, crate::Error>;
    /// Read a slot back into `page`; a slot whose checksum or header does not match is an error, never silently wrong data.
    fn page_in(&mut self, slot: Self::Slot, gpa: GuestPhysAddr, page: &mut [u8; 4096]) -> Result<(), crate::Error>;
    /// The slot's contents are no longer needed.
    fn release(&mut self, slot: Self::Slot);
}

/// One stored page: the owner's address (the "header") and a checksum, so
/// a slot handed back for the wrong page or a corrupted copy is refused.
struct Stored {
    gpa: GuestPhysAddr,
    sum: u64,
    data: Box<[u8; 4096]>,
}

/// An in-memory [`PageStore`] (slots are `u64` indices), with a capacity
/// limit and a way to corrupt a slot, for tests and benchmarks.
#[derive(Default)]
pub struct MemStore {
    slots: Vec<Option<Stored>>,
    free: Vec<u64>,
    capacity: Option<usize>,
    live: usize,
}

impl MemStore {
    /// An unbounded store.
    pub fn new() -> Self {
        Self::default()
    }

    /// A store that refuses pages beyond `pages` live slots.
    pub fn with_capacity(pages: usize) -> Self {
        Self { capacity: Some(pages), ..Self::default() }
    }

    /// Slots currently holding a page.
    pub fn live_slots(&self) -> usize {
        self.live
    }

    /// Flip a bit of the stored copy in `slot` (tests: a corrupt store).
    /// Returns false if the slot holds nothing.
    pub fn corrupt(&mut self, slot: u64) -> bool {
        match self.slots.get_mut(slot as usize) {
            Some(Some(s)) => {
                s.data[123] ^= 0x10;
                true
            }
            _ => false,
        }
    }
}

/// Checksum of a stored page (xxh3, seeded with the owner's address so a
/// copy of another page does not verify).
fn checksum(gpa: GuestPhysAddr, page: &[u8; 4096]) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(page, gpa.0)
}

impl PageStore for MemStore {
    type Slot = u64;

    fn page_out(&mut self, gpa: GuestPhysAddr, page: &[u8; 4096]) -> Result<u64, crate::Error> {
        if self.capacity.is_some_and(|c| self.live >= c) {
            return Err(crate::Error::PageStoreFull);
        }
        let stored = Stored { gpa, sum: checksum(gpa, page), data: Box::new(*page) };
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slots[slot as usize] = Some(stored);
                slot
            }
            None => {
                self.slots.push(Some(stored));
                self.slots.len() as u64 - 1
            }
        };
        self.live += 1;
        Ok(slot)
    }

    fn page_in(&mut self, slot: u64, gpa: GuestPhysAddr, page: &mut [u8; 4096]) -> Result<(), crate::Error> {
        let corrupt = crate::Error::PageStoreCorrupt { gpa };
        let stored = self.slots.get(slot as usize).and_then(Option::as_ref).ok_or(corrupt)?;
        if stored.gpa != gpa || checksum(gpa, &stored.data) != stored.sum {
            return Err(corrupt);
        }
        page.copy_from_slice(&stored.data[..]);
        Ok(())
    }

    fn release(&mut self, slot: u64) {
        if let Some(s) = self.slots.get_mut(slot as usize)
            && s.take().is_some()
        {
            self.free.push(slot);
            self.live -= 1;
        }
    }
}

impl core::fmt::Debug for MemStore {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("MemStore").field("live", &self.live).field("capacity", &self.capacity).finish()
    }
}
