//! The destination's side of post-copy: after the stream's resume record
//! the VM runs here while the pages the source listed as pending follow.
//! Each arriving page is loaded into the running VM if it is still
//! missing (`NotLoaded`), and ignored otherwise (it was loaded already); a
//! vCPU that touched a missing page waits for it (`memory::postcopy`),
//! and the page it waits for is asked of the source ahead of the rest
//! (`HVMIGRATE PAGE <gfn>` lines on the same connection).

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use migrate::{Apply, PAGE_SIZE};
use mm::GuestPhysAddr;
use mm::vm_memory::PageState;
use vcpu::GuestState;

use crate::backend::Backend;
use crate::manager::Manager;
use crate::memory::HostMemory;
use crate::memory::postcopy::PostcopyPages;
use crate::vm::Resources;

/// Applies post-copy memory records to a running VM.
struct Arrivals<'a, B: Backend> {
    id: u32,
    /// A recovery's stream: its state records (and resume) are passed
    /// over; the VM has run since the first stream's.
    recovering: bool,
    res: &'a mut Resources<B>,
    alloc: &'a mut B::Mem,
    host: &'a mut HostMemory,
    now_us: u64,
}

impl<B: Backend> Arrivals<'_, B> {
    fn missing(&self, gfn: u64) -> Option<GuestPhysAddr> {
        let gpa = GuestPhysAddr(gfn.checked_mul(4096)?);
        (self.res.mem.page_state(gpa) == Some(PageState::NotLoaded)).then_some(gpa)
    }

    fn arrive(&mut self, gfn: u64, data: &[u8; PAGE_SIZE]) -> Result<(), String> {
        // Loaded already (asked for, and the push brought it again; or
        // never pending): the guest may have written it since.
        let Some(gpa) = self.missing(gfn) else { return Ok(()) };
        if let Some(pc) = self.host.postcopy.get_mut(&self.id) {
            pc.arrive(gfn, data, self.now_us);
        }
        let Resources { mem, vcpus } = &mut *self.res;
        let alloc = &mut *self.alloc;
        self.host
            .with_hooks(self.id, |h| mem.load_page(alloc, h, gpa, &mut |s| crate::vm::flush_all(vcpus, s)))
            .map(|_| ())
            .map_err(|e| format!("guest page {:#x} could not be loaded: {e}", gpa.0))
    }
}

const AFTER_RESUME: &str = "not allowed after the resume record";

impl<B: Backend> Apply for Arrivals<'_, B> {
    type Error = String;

    // The stream's checker refuses state, pending runs and a second resume
    // after the resume record before a sink sees them; refused here too.
    fn vcpu(&mut self, _: u32, _: GuestState) -> Result<(), String> {
        if self.recovering { Ok(()) } else { Err(String::from(AFTER_RESUME)) }
    }
    fn device(&mut self, _: &str, _: u16, _: &[u8]) -> Result<(), String> {
        if self.recovering { Ok(()) } else { Err(String::from(AFTER_RESUME)) }
    }
    fn pending(&mut self, _: u64, _: u32) -> Result<(), String> {
        Err(String::from(AFTER_RESUME))
    }
    fn resume(&mut self) -> Result<(), String> {
        if self.recovering { Ok(()) } else { Err(String::from(AFTER_RESUME)) }
    }
    fn large_run(&mut self, _: u64, _: u32) -> Result<(), String> {
        // Loading the last page of a 2 MiB region maps it large again.
        Ok(())
    }
    fn pages(&mut self, gfn: u64, data: &[u8]) -> Result<(), String> {
        for (i, page) in data.as_chunks::<PAGE_SIZE>().0.iter().enumerate() {
            self.arrive(gfn + i as u64, page)?;
        }
        Ok(())
    }
    fn zero(&mut self, gfn: u64, pages: u32) -> Result<(), String> {
        const ZEROS: [u8; PAGE_SIZE] = [0; PAGE_SIZE];
        for p in 0..u64::from(pages) {
            self.arrive(gfn + p, &ZEROS)?;
        }
        Ok(())
    }
    // The source sends post-copy pages with `Writer::page` only: a shared
    // content would have to be kept for later references.
    fn shared(&mut self, _: u64, _: u32, _: &[u8; PAGE_SIZE]) -> Result<(), String> {
        Err(String::from("shared contents are not used after the resume record"))
    }
    fn shared_ref(&mut self, _: u64, _: u32) -> Result<(), String> {
        Err(String::from("shared contents are not used after the resume record"))
    }
    fn poisoned(&mut self, gfn: u64) -> Result<(), String> {
        let Some(gpa) = self.missing(gfn) else { return Ok(()) };
        let Resources { mem, vcpus } = &mut *self.res;
        let alloc = &mut *self.alloc;
        self.host
            .with_hooks(self.id, |h| mem.mark_poisoned(alloc, h, gpa, &mut |s| crate::vm::flush_all(vcpus, s)))
            .map_err(|e| format!("guest page {:#x} could not be marked poisoned: {e}", gpa.0))?;
        if let Some(pc) = self.host.postcopy.get_mut(&self.id) {
            pc.settled(gfn);
        }
        Ok(())
    }
}

/// `vm stats` of a VM that arrived by post-copy and still lacks pages.
#[derive(Clone, Debug)]
pub struct PostcopyState {
    /// The source host.
    pub from: String,
    pub progress: crate::memory::postcopy::PostcopyProgress,
    /// Pages still only at the source, and vCPUs waiting for one.
    pub missing: u64,
    pub vcpus_waiting: usize,
}

impl<B: Backend> Manager<B> {
    /// VM `id`'s post-copy, while pages are still to come.
    pub fn postcopy_state(&self, id: u32) -> Option<PostcopyState> {
        let pc = self.host_mem.postcopy.get(&id)?;
        let res = self.get(id)?.res.as_ref()?;
        Some(PostcopyState {
            from: pc.from.clone(),
            progress: pc.progress,
            missing: res.mem.state_counts().not_loaded,
            vcpus_waiting: res.vcpus.iter().filter(|s| s.awaiting_page.is_some()).count(),
        })
    }

    /// Refuses a save or a migration of VM `id` while it arrives by
    /// post-copy: pages it lacks are at the source, so the copy would lack
    /// them too.
    pub(crate) fn arriving_lock(&self, id: u32) -> Result<(), crate::manager::Error> {
        match self.postcopy_state(id) {
            Some(st) => Err(crate::manager::Error::Arriving { id, missing: st.missing, from: st.from }),
            None => Ok(()),
        }
    }

    /// The VM `id` was just built from a stream whose resume record came:
    /// its pending pages are missing until they arrive from `from`.
    pub(super) fn begin_postcopy(&mut self, id: u32, from: &str) -> u64 {
        let missing = self.get(id).and_then(|v| v.res.as_ref()).map_or(0, |r| r.mem.state_counts().not_loaded);
        self.host_mem.postcopy.insert(id, PostcopyPages::new(String::from(from), missing));
        missing
    }

    /// Applies the next record (whole in `reader`'s buffer) to the running
    /// post-copy VM `id`: `Ok(true)` at the end record.
    pub(super) fn apply_postcopy<R: migrate::Source>(
        &mut self,
        id: u32,
        reader: &mut migrate::Reader<R>,
        now_us: u64,
        recovering: bool,
    ) -> Result<bool, String> {
        let backend = self.backend.as_mut().map_err(|why| format!("{why}"))?;
        let alloc = backend.mem();
        let vm = self.vms.iter_mut().find(|v| v.id == id).ok_or_else(|| format!("vm {id} ended here"))?;
        let res = vm.res.as_mut().ok_or_else(|| format!("vm {id} ended here"))?;
        let mut sink = Arrivals::<B> { id, recovering, res, alloc, host: &mut self.host_mem, now_us };
        let applied = reader.apply_next(&mut sink);
        // Whatever happened, vCPUs whose page is here run again.
        self.wake_postcopy_waiters(id);
        match applied {
            Ok(done) => Ok(done.is_some()),
            Err(migrate::ApplyError::Stream(e)) => Err(format!("{e}")),
            Err(migrate::ApplyError::Sink { at, error }) => Err(format!("{error} (applying {at})")),
        }
    }

    /// Post-copy recovery: the pages VM `id` still lacks (the source sends
    /// them on the new connection); the ones its vCPUs wait for are asked
    /// for again, first.
    pub(super) fn postcopy_missing(&mut self, id: u32) -> Vec<u64> {
        if let Some(pc) = self.host_mem.postcopy.get_mut(&id) {
            pc.ask_again();
        }
        let Some(vm) = self.get(id) else { return Vec::new() };
        let Some(res) = vm.res.as_ref() else { return Vec::new() };
        let ranges = crate::vm::boot::ram_ranges(vm.mem_bytes);
        ranges.0[..ranges.1]
            .iter()
            .flat_map(|r| (r.start >> 12)..(r.end >> 12))
            .filter(|&g| res.mem.page_state(GuestPhysAddr(g << 12)) == Some(PageState::NotLoaded))
            .collect()
    }

    /// vCPUs of VM `id` that waited for a page that is now here may run.
    pub(super) fn wake_postcopy_waiters(&mut self, id: u32) {
        let Some(res) = self.vms.iter_mut().find(|v| v.id == id).and_then(|v| v.res.as_mut()) else { return };
        for i in 0..res.vcpus.len() {
            let Some(gfn) = res.vcpus[i].awaiting_page else { continue };
            let still = res.mem.page_state(GuestPhysAddr(gfn.saturating_mul(4096))) == Some(PageState::NotLoaded);
            if !still {
                res.vcpus[i].awaiting_page = None;
            }
        }
    }

    /// Pages VM `id` touched while missing and has not asked for yet, as
    /// request lines (they count as asked from here on).
    pub(super) fn postcopy_requests(&mut self, id: u32, now_us: u64) -> Vec<u8> {
        let Some(pc) = self.host_mem.postcopy.get_mut(&id) else { return Vec::new() };
        let mut out = Vec::new();
        for gfn in pc.take_requests(now_us) {
            out.extend_from_slice(format!("{}{gfn}\n", super::source::REQUEST_PAGE).as_bytes());
        }
        out
    }

    /// Post-copy of VM `id` is over (every page here): its page source
    /// goes; one line of what it did.
    pub(super) fn end_postcopy(&mut self, id: u32) -> Result<String, String> {
        let left = self.get(id).and_then(|v| v.res.as_ref()).map_or(0, |r| r.mem.state_counts().not_loaded);
        if left > 0 {
            return Err(format!("the stream ended with {left} of its pending pages never sent"));
        }
        let Some(pc) = self.host_mem.postcopy.remove(&id) else { return Ok(String::new()) };
        let p = pc.progress;
        Ok(format!(
            "post-copy: {} pages, {} asked for by a touch (wait mean {} us, max {} us), {} pushed",
            p.pages_at_start,
            p.demand_pages,
            p.fault_wait_us_mean(),
            p.fault_wait_us_max,
            p.pushed_pages
        ))
    }
}
