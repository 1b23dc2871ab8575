//! The page source of a VM that arrived by post-copy migration: it runs
//! on this host while some of its pages are still at the source host.
//! Those pages are `NotLoaded` in `mm`; a touch (a vCPU's nested page
//! fault, or a device's access) finds them missing here and gets
//! [`mm::Error::PageInTransit`]: the vCPU waits without running
//! (`VcpuSlot::awaiting_page`) and the destination asks the source for the
//! page ahead of its background push (`manager::migration::destination`).
//! When a page arrives it is handed over through [`PostcopyPages::arrive`]
//! and loaded at once (`mm::VmMemory::load_page`); a page the guest has
//! since written is never overwritten, because it is no longer
//! `NotLoaded`.

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use mm::GuestPhysAddr;
use mm::vm_memory::PageSource;

/// What post-copy did for one VM (the destination's side).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PostcopyProgress {
    /// Pages still at the source when the VM started here.
    pub pages_at_start: u64,
    /// Touches of a page not yet here (each asks the source once).
    pub faults: u64,
    /// Pages asked for by a touch and received.
    pub demand_pages: u64,
    /// Pages that came in the background push before anyone touched them.
    pub pushed_pages: u64,
    /// Time from a demand request to its page, microseconds: sum and most.
    pub fault_wait_us_sum: u64,
    pub fault_wait_us_max: u64,
}

impl PostcopyProgress {
    /// Mean wait of a touched page, microseconds.
    pub fn fault_wait_us_mean(&self) -> u64 {
        self.fault_wait_us_sum.checked_div(self.demand_pages).unwrap_or(0)
    }
}

/// See the module documentation.
#[derive(Debug, Default)]
pub struct PostcopyPages {
    /// The page being handed over (frame number, contents).
    arriving: Option<(u64, Box<[u8; 4096]>)>,
    /// Pages touched while missing, with the time they were asked for
    /// (microseconds; `None`: not asked yet).
    wanted: BTreeMap<u64, Option<u64>>,
    pub progress: PostcopyProgress,
    /// The source host, for reports.
    pub from: alloc::string::String,
}

impl PostcopyPages {
    pub fn new(from: alloc::string::String, pages_at_start: u64) -> Self {
        PostcopyPages {
            from,
            progress: PostcopyProgress { pages_at_start, ..Default::default() },
            ..Default::default()
        }
    }

    /// Page `gfn` arrived with `data`: the next `fill` of it hands it over.
    /// Whether someone waited for it (a demand page) is counted, with the
    /// wait, at time `now_us`.
    pub fn arrive(&mut self, gfn: u64, data: &[u8; 4096], now_us: u64) {
        match self.arriving.as_mut() {
            Some((g, page)) => {
                *g = gfn;
                page.copy_from_slice(data);
            }
            None => self.arriving = Some((gfn, Box::new(*data))),
        }
        let p = &mut self.progress;
        match self.wanted.remove(&gfn) {
            Some(asked) => {
                p.demand_pages += 1;
                let waited = asked.map_or(0, |t| now_us.saturating_sub(t));
                p.fault_wait_us_sum = p.fault_wait_us_sum.saturating_add(waited);
                p.fault_wait_us_max = p.fault_wait_us_max.max(waited);
            }
            None => p.pushed_pages += 1,
        }
    }

    /// Pages touched while missing that the source has not been asked for
    /// yet; they count as asked (at `now_us`) from here on.
    pub fn take_requests(&mut self, now_us: u64) -> alloc::vec::Vec<u64> {
        let mut ask = alloc::vec::Vec::new();
        for (&gfn, asked) in self.wanted.iter_mut().filter(|(_, a)| a.is_none()) {
            *asked = Some(now_us);
            ask.push(gfn);
        }
        ask
    }

    /// The connection that carried the requests broke: every awaited
    /// page is asked for again on the next.
    pub fn ask_again(&mut self) {
        for asked in self.wanted.values_mut() {
            *asked = None;
        }
    }

    /// Page `gfn` came without data (poisoned at the source): nobody
    /// waits for its contents any more.
    pub fn settled(&mut self, gfn: u64) {
        self.wanted.remove(&gfn);
    }

    /// Pages touched and still awaited.
    pub fn awaited(&self) -> usize {
        self.wanted.len()
    }
}

impl PageSource for PostcopyPages {
    fn fill(&mut self, gpa: GuestPhysAddr, page: &mut [u8; 4096]) -> Result<(), mm::Error> {
        let gfn = gpa.0 / 4096;
        match self.arriving.as_ref() {
            Some((g, data)) if *g == gfn => {
                page.copy_from_slice(&data[..]);
                Ok(())
            }
            _ => {
                if !self.wanted.contains_key(&gfn) {
                    self.progress.faults += 1;
                    self.wanted.insert(gfn, None);
                }
                Err(mm::Error::PageInTransit(gpa))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_page_is_asked_for_once_and_its_wait_is_measured() {
        let mut p = PostcopyPages::new("a".into(), 10);
        let mut page = [0u8; 4096];
        let g = GuestPhysAddr(0x5000);
        assert_eq!(p.fill(g, &mut page), Err(mm::Error::PageInTransit(g)));
        assert_eq!(p.fill(g, &mut page), Err(mm::Error::PageInTransit(g)));
        assert_eq!(p.progress.faults, 1, "a second touch of the same page is the same fault");
        assert_eq!(p.take_requests(100), [5]);
        assert!(p.take_requests(150).is_empty(), "asked once");
        // A page nobody waited for: pushed.
        p.arrive(7, &[7; 4096], 200);
        assert_eq!(p.progress.pushed_pages, 1);
        p.arrive(5, &[5; 4096], 1100);
        p.fill(g, &mut page).unwrap();
        assert_eq!(page, [5; 4096]);
        assert_eq!(
            (p.progress.demand_pages, p.progress.fault_wait_us_max, p.progress.fault_wait_us_mean()),
            (1, 1000, 1000)
        );
        assert_eq!(p.awaited(), 0);
    }
}
