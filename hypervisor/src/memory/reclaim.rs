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
    pub no_swap: Option<super::NoSwap>,
    /// Why the last round could not meet the target, if it could not.
    pub stuck: Option<String>,
    /// Pages this VM has had paged out / in / copied on write.
    pub swapped_out: u64,
    pub swapped_in: u64,
    pub cow_breaks: u64,
    /// Guest accesses that found the host out of frames.
    pub out_of_memory: u64,
    /// What the last host-wide planning round decided for this VM, and why.
    pub planned: Option<PlanNote>,
    /// The last finished usage sample (access bits over random pages
    /// between two planning rounds), for the planner's usage classes.
    pub usage: Option<mm::reclaim::UsageEstimate>,
}

/// One VM's part of a host-wide plan (`mem target host`), for `mem`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanNote {
    pub classes: mm::reclaim::UsageClasses,
    pub action: mm::reclaim::Action,
    /// Why it was reclaimed from this way.
    pub why: &'static str,
}

/// What a VM holds and may hold when the host runs out of frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Claim {
    pub vm: u32,
    /// Pages of RAM it was configured with.
    pub configured: u64,
    /// Private frames it holds (`Present` pages).
    pub private: u64,
    /// Its memory target, if the operator set one.
    pub target: Option<u64>,
}

impl Claim {
    /// Its entitlement when the VMs' `held` private frames are all there
    /// is: a share of them in proportion to configured size (`total`
    /// configured pages over all VMs), and no more than its target.
    pub fn entitlement(&self, held: u64, total: u64) -> u64 {
        let share = (u128::from(held) * u128::from(self.configured) / u128::from(total.max(1))) as u64;
        self.target.map_or(share, |t| t.min(share))
    }
}

/// The VMs holding more private frames than their entitlement, furthest
/// over first, as `(vm, pages over)`. When frames run out these give memory
/// back, and the first is stopped if nothing can be reclaimed: one VM that
/// grabs frames must not get an innocent one stopped.
pub fn over_entitlement(claims: &[Claim]) -> alloc::vec::Vec<(u32, u64)> {
    let held: u64 = claims.iter().map(|c| c.private).sum();
    let total: u64 = claims.iter().map(|c| c.configured).sum();
    let mut over: alloc::vec::Vec<(u32, u64)> = claims
        .iter()
        .filter_map(|c| c.private.checked_sub(c.entitlement(held, total)).filter(|&n| n > 0).map(|n| (c.vm, n)))
        .collect();
    over.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    over
}

/// Pages one VM's sharing pass looks at when the host is out of frames
/// (bounded: the faulting guest waits for it).
pub const PRESSURE_SCAN_PAGES: usize = 16384;

/// Page out up to `pages` private pages of VM `vm` by its clock (second
/// chance as for targets), when the host needs frames back. Pages out.
pub fn page_out_some<F: EntryFormat, A: ContiguousAlloc>(
    vm: u32,
    mem: &mut GuestMemory<F>,
    policy: &mut VmReclaim,
    pages: u64,
    alloc: &mut A,
    host: &mut HostMemory,
    flush: &mut dyn FnMut(FlushScope),
) -> u64 {
    let target = mem.state_counts().present.saturating_sub(pages.min(MAX_SWAP_OUT_PER_ROUND));
    let mut second_chances = 0;
    page_out(vm, mem, policy, target, alloc, host, flush, &mut second_chances)
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
        policy.stuck =
            Some(policy.no_swap.as_ref().map_or_else(|| String::from("no swap file"), |n| alloc::format!("{n}")));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(vm: u32, configured: u64, private: u64, target: Option<u64>) -> Claim {
        Claim { vm, configured, private, target }
    }

    #[test]
    fn entitlement_is_a_share_by_size_capped_by_the_target() {
        // 3000 frames held by VMs of 1000, 1000 and 2000 pages: shares of
        // 750, 750 and 1500.
        let claims = [claim(1, 1000, 1000, None), claim(2, 1000, 500, None), claim(3, 2000, 1500, Some(1200))];
        assert_eq!(claims[0].entitlement(3000, 4000), 750);
        assert_eq!(claims[2].entitlement(3000, 4000), 1200, "the target caps the share");
        // VM 1 is 250 over, VM 3 300 over its target; VM 2 is under.
        assert_eq!(over_entitlement(&claims), [(3, 300), (1, 250)]);
    }

    #[test]
    fn nobody_over_and_no_vms_are_handled() {
        assert_eq!(over_entitlement(&[claim(1, 100, 50, None), claim(2, 100, 50, None)]), []);
        assert_eq!(over_entitlement(&[]), []);
        assert_eq!(claim(1, 0, 0, None).entitlement(0, 0), 0);
        // Huge numbers do not overflow the proportion.
        assert_eq!(claim(1, u64::MAX / 2, 0, None).entitlement(u64::MAX, u64::MAX), u64::MAX / 2);
    }
}
