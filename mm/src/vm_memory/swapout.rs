//! Pages leaving memory: swap-out to a [`PageStore`], poisoning after an
//! uncorrectable memory error, and marking pages not-yet-loaded for a lazy
//! restore.

use crate::swap_hook::SlotWord;

use super::state::{Override, REPLACED};
use super::{Backing, Hooks, PageState, SharingIndex, VmMemory, combine, read_frame};
use crate::addr::{GuestPhysAddr, PAGE_SIZE_4K};
use crate::error::Error;
use crate::hal::ContiguousAlloc;
use crate::paging::{EntryFormat, FlushScope, Invalidation};
use crate::swap_hook::PageStore;

impl<F: EntryFormat, S: SlotWord> VmMemory<F, S> {
    /// Page out the 4 KiB page at `gpa` (a `Present` or `Shared` page):
    /// split a large mapping around it, unmap it, flush through `flush`,
    /// write its contents to `store`, then give its frame back (or drop its
    /// shared reference, through `sharing`). If the store refuses, the page
    /// is mapped again and unchanged.
    pub fn swap_out<A: ContiguousAlloc>(
        &mut self,
        alloc: &mut A,
        gpa: GuestPhysAddr,
        store: &mut dyn PageStore<Slot = S>,
        sharing: Option<&mut SharingIndex>,
        flush: &mut dyn FnMut(FlushScope),
    ) -> Result<(), Error> {
        let i = self.index_of(gpa.0).ok_or(Error::NotGuestRam(gpa))?;
        let page = self.gpa_of(i);
        let state = self.state(i);
        if !matches!(state, PageState::Present | PageState::Shared) {
            return Err(Error::WrongPageState { gpa: page, state });
        }
        if state == PageState::Shared && sharing.is_none() {
            return Err(Error::MissingHook("sharing index"));
        }
        let frame = self.mapped_hpa(i).ok_or(Error::WrongPageState { gpa: page, state })?;
        let backing = self.backing(i);
        let (old_code, old_over) = (self.states[i], self.override_of(i));

        let mut inv = Invalidation::none();
        let unmapped = self.transition(alloc, i, PageState::Swapped, false, None, &mut inv);
        inv.flush(alloc, &mut *flush);
        unmapped?;
        // No vCPU can reach the frame now: its contents are final.
        let mut buf = [0u8; 4096];
        // SAFETY: the page's frame (still allocated: nothing freed it), no
        // longer mapped, 4 KiB-aligned.
        unsafe { read_frame(alloc.phys_to_ptr(frame), &mut buf) };
        match store.page_out(page, &buf) {
            Ok(slot) => {
                self.set_override(i, Override::Slot(slot));
                let mut hooks = Hooks { sharing, store: None, source: None };
                // SAFETY: unmapped and flushed above.
                unsafe { self.release_backing(alloc, &mut hooks, page, backing) };
                Ok(())
            }
            Err(e) => {
                let mut inv = Invalidation::none();
                let back = self.transition(
                    alloc,
                    i,
                    PageState::from_code(old_code),
                    old_code & REPLACED != 0,
                    old_over,
                    &mut inv,
                );
                // Mapping a page back into the table it just left needs no
                // new table frame, so this cannot fail.
                debug_assert!(back.is_ok(), "re-mapping {page:?} failed: {back:?}");
                inv.flush(alloc, &mut *flush);
                Err(e)
            }
        }
    }

    /// The page at `gpa` was hit by an uncorrectable memory error: unmap it
    /// for good and quarantine its frame (never mapped or freed again). A
    /// later guest access faults with [`FaultOutcome::Poisoned`](super::FaultOutcome::Poisoned);
    /// migration sends it as corrupted. A shared page's frame is
    /// quarantined in `hooks.sharing` for every VM.
    pub fn mark_poisoned<A: ContiguousAlloc>(
        &mut self,
        alloc: &mut A,
        hooks: &mut Hooks<'_, S>,
        gpa: GuestPhysAddr,
        flush: &mut dyn FnMut(FlushScope),
    ) -> Result<(), Error> {
        let i = self.index_of(gpa.0).ok_or(Error::NotGuestRam(gpa))?;
        let page = self.gpa_of(i);
        let state = self.state(i);
        let backing = self.backing(i);
        match state {
            PageState::Poisoned => return Ok(()),
            PageState::Ballooned | PageState::Swapped => return Err(Error::WrongPageState { gpa: page, state }),
            PageState::Zero | PageState::Shared if hooks.sharing.is_none() => {
                return Err(Error::MissingHook("sharing index"));
            }
            _ => {}
        }
        let (replaced, over) = match state {
            // The frame stays with the page (quarantined).
            PageState::Present | PageState::NotLoaded => (self.states[i] & REPLACED != 0, self.override_of(i)),
            _ => (false, None),
        };
        let mut inv = Invalidation::none();
        let res = self.transition(alloc, i, PageState::Poisoned, replaced, over, &mut inv);
        inv.flush(alloc, &mut *flush);
        res?;
        if let Some(index) = hooks.sharing.as_deref_mut() {
            match backing {
                Backing::Shared(frame) => {
                    index.quarantine(frame);
                    index.release(alloc, frame);
                }
                Backing::Zero => index.release_zero(),
                _ => {}
            }
        }
        Ok(())
    }

    /// Mark the `Present` pages of `[gpa, gpa + len)` not loaded (lazy
    /// restore, post-copy): unmap them but keep their frames, to be filled
    /// from a [`PageSource`](super::PageSource) on first touch. Pages in
    /// other states are left alone. Returns how many pages were marked.
    pub fn mark_not_loaded<A: ContiguousAlloc>(
        &mut self,
        alloc: &mut A,
        gpa: GuestPhysAddr,
        len: u64,
        flush: &mut dyn FnMut(FlushScope),
    ) -> Result<u64, Error> {
        let end = gpa.0.checked_add(len).ok_or(Error::OutsideGuestRam { gpa, len })?;
        let mut inv = Invalidation::none();
        let mut marked = 0;
        let mut result = Ok(());
        let mut cur = gpa.0 & !(PAGE_SIZE_4K - 1);
        while cur < end {
            let Some(i) = self.index_of(cur) else {
                cur += PAGE_SIZE_4K;
                continue;
            };
            // Fast path: a whole large leaf inside the range goes at once.
            if self.view.is_none()
                && let Some(t) = self.primary.translate(&*alloc, GuestPhysAddr(cur))
                && t.leaf.size.bytes() > PAGE_SIZE_4K
                && cur.is_multiple_of(t.leaf.size.bytes())
                && end - cur >= t.leaf.size.bytes()
            {
                let size = t.leaf.size;
                let pages = (size.bytes() / PAGE_SIZE_4K) as usize;
                match self.primary.unmap(&*alloc, GuestPhysAddr(cur), size) {
                    Ok((_, u)) => {
                        combine(&mut inv, u);
                        if t.leaf.dirty
                            && let Some(log) = &mut self.dirty
                        {
                            for p in 0..pages as u64 {
                                log.mark(cur + p * PAGE_SIZE_4K);
                            }
                        }
                        for j in i..i + pages {
                            // Large leaves only cover original `Present` pages.
                            self.set_state(j, PageState::NotLoaded, false, None);
                        }
                        marked += pages as u64;
                        cur += size.bytes();
                        continue;
                    }
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
            if self.state(i) == PageState::Present {
                let replaced = self.states[i] & REPLACED != 0;
                let over = self.override_of(i);
                if let Err(e) = self.transition(alloc, i, PageState::NotLoaded, replaced, over, &mut inv) {
                    result = Err(e);
                    break;
                }
                marked += 1;
            }
            cur += PAGE_SIZE_4K;
        }
        inv.flush(alloc, &mut *flush);
        result.map(|()| marked)
    }
}
