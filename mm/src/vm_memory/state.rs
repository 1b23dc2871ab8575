//! The per-page state table: one byte per 4 KiB page of guest RAM.
//!
//! One byte per page is 1/4096 of guest RAM (0.024%). Pages whose backing is
//! not the chunk frame allocated with the VM keep it (`Override`) in a
//! second, dense table of one word per page (1/512 of guest RAM, 0.2%).
//! Dense rather than a map of the pages that need it: the table is
//! allocated with the VM, so a guest that writes every shared page cannot
//! make the host heap grow (a map cost up to 16.5 MiB per GiB and its
//! growth failing was a host panic).

use crate::addr::HostPhysAddr;
use crate::swap_hook::SlotWord;

/// What backs one 4 KiB page of guest RAM: what migration, checkpoint and
/// fault tolerance read to decide how to treat it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum PageState {
    /// Backed by a private host frame the guest may read and write.
    Present,
    /// Mapped read-only to the host-wide zero frame (a zero page; a write
    /// gives it a private frame).
    Zero,
    /// Mapped read-only to a frame shared by content with other pages,
    /// possibly of other VMs (copy-on-write).
    Shared,
    /// Given up by the guest's balloon driver: no host frame.
    Ballooned,
    /// Contents in a swap store; no host frame.
    Swapped,
    /// Hit by an uncorrectable memory error: contents lost, frame
    /// quarantined, never mapped again.
    Poisoned,
    /// Not yet loaded (lazy restore, post-copy): filled from a page source on
    /// first touch.
    NotLoaded,
}

impl PageState {
    /// Every state, in encoding order.
    pub const ALL: [PageState; 7] = [
        PageState::Present,
        PageState::Zero,
        PageState::Shared,
        PageState::Ballooned,
        PageState::Swapped,
        PageState::Poisoned,
        PageState::NotLoaded,
    ];

    pub(super) const fn code(self) -> u8 {
        self as u8
    }

    pub(super) const fn from_code(code: u8) -> PageState {
        PageState::ALL[(code & KIND_MASK) as usize]
    }

    /// The state's name in reports (`present`, `zero`, ... `not-loaded`).
    pub fn name(self) -> &'static str {
        match self {
            PageState::Present => "present",
            PageState::Zero => "zero",
            PageState::Shared => "shared",
            PageState::Ballooned => "ballooned",
            PageState::Swapped => "swapped",
            PageState::Poisoned => "poisoned",
            PageState::NotLoaded => "not-loaded",
        }
    }

    /// Whether the page holds guest data in a host frame (and so can be read
    /// without a page source or store).
    pub fn is_resident(self) -> bool {
        matches!(self, PageState::Present | PageState::Zero | PageState::Shared)
    }
}

/// Bits 2:0 of a state byte: the [`PageState`].
pub(super) const KIND_MASK: u8 = 0b111;
/// Bit 3: the page's own frame is not the chunk frame it was created with
/// but `Override::Frame` (a copy-on-write copy, a page brought back from
/// swap, a re-backed balloon page). Meaningful for `Present`, `Poisoned`
/// and `NotLoaded`, the states that own a frame.
pub(super) const REPLACED: u8 = 1 << 3;

/// Where a page's backing lives when the state byte alone cannot say.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Override<S> {
    /// A host frame: the page's own (`REPLACED`, from `alloc_frame`) or the
    /// shared frame it maps (`Shared`).
    Frame(HostPhysAddr),
    /// The swap store slot holding a `Swapped` page.
    Slot(S),
}

impl<S: SlotWord> Override<S> {
    /// The override as its page's word.
    pub(super) fn to_word(self) -> u64 {
        match self {
            Override::Frame(hpa) => hpa.0,
            Override::Slot(slot) => slot.to_word(),
        }
    }

    /// The override of a page with state byte `code` and word `word`: the
    /// state says whether it has one and of which kind.
    pub(super) fn decode(code: u8, word: u64) -> Option<Self> {
        match PageState::from_code(code) {
            PageState::Shared => Some(Override::Frame(HostPhysAddr(word))),
            PageState::Swapped => Some(Override::Slot(S::from_word(word))),
            _ if code & REPLACED != 0 => Some(Override::Frame(HostPhysAddr(word))),
            _ => None,
        }
    }
}

/// How many pages are in each state.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct StateCounts {
    /// [`PageState::Present`].
    pub present: u64,
    /// [`PageState::Zero`].
    pub zero: u64,
    /// [`PageState::Shared`].
    pub shared: u64,
    /// [`PageState::Ballooned`].
    pub ballooned: u64,
    /// [`PageState::Swapped`].
    pub swapped: u64,
    /// [`PageState::Poisoned`].
    pub poisoned: u64,
    /// [`PageState::NotLoaded`].
    pub not_loaded: u64,
}

impl StateCounts {
    pub(super) fn slot(&mut self, s: PageState) -> &mut u64 {
        match s {
            PageState::Present => &mut self.present,
            PageState::Zero => &mut self.zero,
            PageState::Shared => &mut self.shared,
            PageState::Ballooned => &mut self.ballooned,
            PageState::Swapped => &mut self.swapped,
            PageState::Poisoned => &mut self.poisoned,
            PageState::NotLoaded => &mut self.not_loaded,
        }
    }

    /// Pages in `s`.
    pub fn get(&self, s: PageState) -> u64 {
        let mut c = *self;
        *c.slot(s)
    }

    /// All pages.
    pub fn total(&self) -> u64 {
        PageState::ALL.iter().map(|&s| self.get(s)).sum()
    }
}
