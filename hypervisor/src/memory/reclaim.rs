//! Reclaiming memory from running VMs between scheduling rounds: the
//! background sharing scan, and per-VM memory targets enforced by sharing,
//! then by swapping.
//!
//! A VM is charged for its private frames (`Present` pages). Pages mapped to
//! the zero frame or a shared frame cost the VM nothing: the host pays for
//! the one shared copy. A target therefore squeezes a VM first by sharing
//! (free, if its pages have twins) and then by paging out.
//!
//! Victims are chosen by a clock hand over the VM's pages, resuming where
//! the last round stopped, with a second chance for pages whose nested
//! accessed bit says the guest touched them since the hand last passed. A guest that touches a swapped page faults it
//! back in (and goes over its target by one page until the next round), so
//! a VM squeezed below its working set keeps computing correctly, only
//! slower.

use alloc::string::String;
use mm::addr::{GuestPhysAddr, PAGE_SIZE_4K};
use mm::hal::ContiguousAlloc;
use mm::paging::{EntryFormat, FlushScope, Invalidation};
use mm::swap_hook::PageStore;
use mm::vm_memory::{PageState, ScanReport};

use super::{GuestMemory, HostMemory};

/// Most pages one VM pages out per round: bounds the time the scheduler
/// spends on reclaim before it runs a guest again.
pub const MAX_SWAP_OUT_PER_ROUND: u64 = 512;

/// A VM's reclaim settings and state.
#[derive(Clone, Debug, Default)]
pub struct VmReclaim {
    /// Private pages the VM may keep (`mem target`); `None`: unlimited.
    pub target: Option<u64>,
    /// Clock hand: the next page index to consider for page-out.
    pub hand: u64,
    /// Why the VM has no swap file, if it has none.
    pub no_swap: Option<String>,
    /// Why the last round could not meet the target, if it could not.
    pub stuck: Option<String>,
    /// Pages this VM has had paged out / in / copied on write.
    pub swapped_out: u64,
    pub swapped_in: u64,
    pub cow_breaks: u64,
}

/// What one round did for one VM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RoundReport {
    pub scan: ScanReport,
    pub swapped_out: u64,
    /// Pages passed over because the guest had touched them.
    pub second_chances: u64,
}

/// Large pages a background round may break up to share their small pages.
pub const BREAK_LARGE_PER_ROUND: usize = 2;

/// One sharing step over `mem`: first break up to `break_large` large pages
/// that an earlier scan found sharing opportunities in and that the guest
/// has not touched since (cold), sharing their small pages; then scan at
/// most `pages` pages. Counted in the host totals. No-op without the index.
pub fn share_step<F: EntryFormat, A: ContiguousAlloc>(
    mem: &mut GuestMemory<F>,
    alloc: &mut A,
    host: &mut HostMemory,
    pages: usize,
    break_large: usize,
    flush: &mut dyn FnMut(FlushScope),
) -> ScanReport {
    let Some(index) = host.sharing.as_mut() else {
        return ScanReport::default();
    };
    let mut r = if break_large > 0 && mem.large_page_sharing().regions > 0 {
        mem.break_cold_large_pages(alloc, index, break_large, flush)
    } else {
        ScanReport::default()
    };
    r += mem.share_scan(alloc, index, pages, flush);
    host.stats.scanned += r.scanned;
    host.stats.merged += r.zero_merged + r.shared_merged;
    host.stats.frames_freed += r.frames_freed;
    r
}

/// One round of holding VM `vm` (memory `mem`) to its target: a sharing
/// step, then page-outs by the clock hand until the VM is within target,
/// [`MAX_SWAP_OUT_PER_ROUND`] pages went out, or swap refuses.
pub fn enforce_target<F: EntryFormat, A: ContiguousAlloc>(
    vm: u32,
    mem: &mut GuestMemory<F>,
    policy: &mut VmReclaim,
    alloc: &mut A,
    host: &mut HostMemory,
    flush: &mut dyn FnMut(FlushScope),
) -> RoundReport {
    let mut report = RoundReport::default();
    let Some(target) = policy.target else {
        return report;
    };
    if mem.state_counts().present <= target {
        policy.stuck = None;
        return report;
    }
    policy.stuck = None;
    report.swapped_out = page_out(vm, mem, policy, target, alloc, host, flush, &mut report.second_chances);
    // Sharing after the clock: its large-page analysis clears accessed
    // bits too, so within a round the clock reads them first; the next
    // round's clock then sees what the guest touched since this one.
    let budget = host.scan_pages_per_round;
    report.scan = share_step(mem, alloc, host, budget, BREAK_LARGE_PER_ROUND, flush);
    if mem.state_counts().present <= target {
        policy.stuck = None;
    } else if policy.stuck.is_none() && host.swap.as_ref().and_then(|s| s.file_usage(vm)).is_none() {
        policy.stuck = Some(policy.no_swap.clone().unwrap_or_else(|| String::from("no swap file")));
    }
    report
}

/// The clock: page out until `target`, the round's limit or a refusal.
#[allow(clippy::too_many_arguments)]
fn page_out<F: EntryFormat, A: ContiguousAlloc>(
    vm: u32,
    mem: &mut GuestMemory<F>,
    policy: &mut VmReclaim,
    target: u64,
    alloc: &mut A,
    host: &mut HostMemory,
    flush: &mut dyn FnMut(FlushScope),
    second_chances: &mut u64,
) -> u64 {
    let pages = mem.pages();
    let HostMemory { sharing, swap, stats, .. } = host;
    let Some(mut file) = swap.as_mut().and_then(|s| s.file(vm)) else {
        return 0;
    };
    let mut swapped = 0;
    // Second chance: a page the guest touched since the hand last passed
    // loses its accessed bit and stays; the hand may go round twice.
    let mut looked = 0;
    let mut cleared = Invalidation::none();
    while mem.state_counts().present > target && swapped < MAX_SWAP_OUT_PER_ROUND && looked < 2 * pages {
        let gpa = GuestPhysAddr(policy.hand * PAGE_SIZE_4K);
        policy.hand = (policy.hand + 1) % pages.max(1);
        looked += 1;
        if mem.page_state(gpa) != Some(PageState::Present) {
            continue;
        }
        let (accessed, inv) = mem.test_and_clear_accessed(&*alloc, gpa);
        cleared = cleared.combine(inv);
        if let Some(size) = accessed {
            // A large leaf's bit speaks for all its pages: pass them all.
            let leaf_pages = size.bytes() / PAGE_SIZE_4K;
            let next = ((gpa.0 / PAGE_SIZE_4K) | (leaf_pages - 1)) + 1;
            looked += next - gpa.0 / PAGE_SIZE_4K - 1;
            policy.hand = next % pages.max(1);
            *second_chances += leaf_pages;
            continue;
        }
        match mem.swap_out(alloc, gpa, &mut file as &mut dyn PageStore<Slot = _>, sharing.as_mut(), flush) {
            Ok(()) => swapped += 1,
            Err(e) => {
                policy.stuck = Some(alloc::format!("page-out of {:#x} refused: {e}", gpa.0));
                break;
            }
        }
    }
    // Accesses from now on must set the bits again for the next round.
    cleared.flush(alloc, &mut *flush);
    policy.swapped_out += swapped;
    stats.swapped_out += swapped;
    swapped
}
