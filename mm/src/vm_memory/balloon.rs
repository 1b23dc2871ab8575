//! Balloon bookkeeping: pages the guest's balloon driver gives up lose their
//! host backing (the frames go back to the host pool); deflation backs them
//! again. The page lists come from the guest (virtio-balloon queues) and are
//! hostile: every address is checked, duplicates and pages in the wrong state
//! are refused one by one, and nothing the guest sends can free a frame twice.

use alloc::vec::Vec;
use core::fmt::Debug;

use crate::swap_hook::SlotWord;

use super::{Backing, Hooks, PageState, VmMemory};
use crate::addr::GuestPhysAddr;
use crate::error::Error;
use crate::hal::ContiguousAlloc;
use crate::paging::{EntryFormat, FlushScope, Invalidation};

/// What an inflate or deflate request did.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct BalloonReport {
    /// Pages that changed state.
    pub accepted: u64,
    /// Pages refused (not RAM, already in the requested state, poisoned, or
    /// needing a hook that was not supplied).
    pub rejected: u64,
    /// Host frames given back to the pool (inflate) or taken from it
    /// (deflate).
    pub frames: u64,
}

impl<F: EntryFormat, S: SlotWord> VmMemory<F, S> {
    /// Set how many pages the balloon should hold (clamped to the VM's RAM);
    /// the balloon device asks the guest for the difference.
    pub fn set_balloon_target(&mut self, pages: u64) {
        self.balloon_target = pages.min(self.pages());
    }

    /// The balloon target in pages.
    pub fn balloon_target(&self) -> u64 {
        self.balloon_target
    }

    /// Pages the balloon holds now.
    pub fn balloon_pages(&self) -> u64 {
        self.counts.ballooned
    }

    /// Pages the guest should still give up (positive) or take back
    /// (negative) to reach the target.
    pub fn balloon_delta(&self) -> i64 {
        self.balloon_target as i64 - self.counts.ballooned as i64
    }

    /// The guest gave up the pages at `gpas`: unmap them, flush through
    /// `flush`, then give their backing back (frames to `alloc`, shared
    /// references to `hooks.sharing`, swap slots to `hooks.store`).
    pub fn balloon_inflate<A: ContiguousAlloc>(
        &mut self,
        alloc: &mut A,
        hooks: &mut Hooks<'_, S>,
        gpas: &[GuestPhysAddr],
        flush: &mut dyn FnMut(FlushScope),
    ) -> BalloonReport {
        let mut report = BalloonReport::default();
        let mut inv = Invalidation::none();
        let mut freed: Vec<(GuestPhysAddr, Backing<S>)> = Vec::new();
        for &gpa in gpas {
            let Some(i) = self.index_of(gpa.0) else {
                report.rejected += 1;
                continue;
            };
            if matches!(self.state(i), PageState::Ballooned | PageState::Poisoned) {
                report.rejected += 1;
                continue;
            }
            let backing = self.backing(i);
            if Self::missing_hook(&backing, hooks).is_some()
                // A running snapshot keeps what the page held (a page it
                // cannot keep, a swapped one, stays with the guest).
                || self.snapshot_preserve(alloc, i).is_err()
                || self.transition(alloc, i, PageState::Ballooned, false, None, &mut inv).is_err()
            {
                report.rejected += 1;
                continue;
            }
            report.accepted += 1;
            freed.push((self.gpa_of(i), backing));
        }
        inv.flush(alloc, &mut *flush);
        for (gpa, backing) in freed {
            if matches!(backing, Backing::Original | Backing::Frame(_)) {
                report.frames += 1;
            }
            // SAFETY: the page is unmapped in every table and the unmap was
            // flushed above.
            unsafe { self.release_backing(alloc, hooks, gpa, backing) };
        }
        report
    }

    /// The guest takes the pages at `gpas` back: back each ballooned one
    /// with a fresh zeroed frame. Pages not ballooned are refused. On
    /// `OutOfHostFrames` the pages before stay backed and the rest stay
    /// ballooned (a guest touch backs them later, if memory allows).
    pub fn balloon_deflate<A: ContiguousAlloc>(
        &mut self,
        alloc: &mut A,
        gpas: &[GuestPhysAddr],
        flush: &mut dyn FnMut(FlushScope),
    ) -> Result<BalloonReport, Error> {
        let mut report = BalloonReport::default();
        let mut inv = Invalidation::none();
        let mut result = Ok(());
        for &gpa in gpas {
            match self.index_of(gpa.0) {
                Some(i) if self.state(i) == PageState::Ballooned => match self.back_fresh(alloc, i, &mut inv) {
                    Ok(_) => {
                        report.accepted += 1;
                        report.frames += 1;
                    }
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                },
                _ => report.rejected += 1,
            }
        }
        inv.flush(alloc, &mut *flush);
        result.map(|()| report)
    }
}
