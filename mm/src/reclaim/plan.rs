//! The reclaim scheduler: one planning round.

use alloc::vec::Vec;

use super::{UsageClasses, VmReclaimInput};
use crate::swap::VmId;

/// Host-wide memory state, in 4 KiB pages.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct HostMemory {
    /// Free host pages now.
    pub free_pages: u64,
    /// Free pages the host wants: the plan reclaims the difference.
    pub target_free_pages: u64,
    /// Below this, ballooning is too slow (the guest must first run and
    /// allocate): the plan swaps instead.
    pub min_free_pages: u64,
}

/// Policy knobs.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct ReclaimConfig {
    /// The idle-memory tax in percent (0..=99): how much more an idle page
    /// counts against a VM than an active one (`1 / (1 - tax)` times).
    pub idle_tax_percent: u32,
    /// Pages one guest can be asked to inflate its balloon by per round.
    pub balloon_pages_per_round: u64,
}

impl Default for ReclaimConfig {
    fn default() -> Self {
        // ESX's default tax; 64 MiB of balloon per round.
        Self { idle_tax_percent: 75, balloon_pages_per_round: 16384 }
    }
}

/// What to do to one VM this round, in pages.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct Action {
    /// Inflate the balloon by this much.
    pub balloon_pages: u64,
    /// Swap out this many pages (coldest first).
    pub swap_pages: u64,
    /// Reclaim this many pages by sharing zero pages and duplicates: the
    /// sharing scanner works through the VM until it has freed this many
    /// or finished a pass.
    pub share_scan_pages: u64,
}

impl Action {
    /// Pages this action frees.
    pub fn total(&self) -> u64 {
        self.balloon_pages + self.swap_pages + self.share_scan_pages
    }
}

/// One round's plan.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct Plan {
    /// One entry per input VM, in input order.
    pub actions: Vec<(VmId, Action)>,
    /// Pages the host wanted freed (after balloon inflation in progress).
    pub need: u64,
    /// Pages the actions free.
    pub planned: u64,
    /// `need - planned`: what reservations and limits left unreclaimable.
    pub shortfall: u64,
    /// Free memory was below the emergency mark: everything is swapped.
    pub emergency: bool,
}

/// Per-VM working numbers.
struct Vm {
    shares: u128,
    classes: UsageClasses,
    /// Pages (balloon + swap) that can still come out of this VM.
    room: u64,
    /// Private pages the water-filling works on, and where each phase
    /// may bring them.
    private: u64,
    active: u64,
}

/// Plan one round: how much to reclaim from each VM in `vms` and how, to
/// bring `host` up to its target. See the module documentation for the
/// order of preference.
pub fn plan(host: &HostMemory, vms: &[VmReclaimInput], cfg: &ReclaimConfig) -> Plan {
    let pending: u64 = vms.iter().filter_map(|v| v.balloon).map(|b| b.pending_pages).sum();
    let need = host.target_free_pages.saturating_sub(host.free_pages).saturating_sub(pending);
    let emergency = host.free_pages < host.min_free_pages;
    let mut actions: Vec<(VmId, Action)> = vms.iter().map(|v| (v.vm, Action::default())).collect();
    if need == 0 {
        return Plan { actions, need, planned: 0, shortfall: 0, emergency };
    }

    let mut work: Vec<Vm> = vms
        .iter()
        .map(|v| {
            let classes = UsageClasses::estimate(v);
            let (ballooned, pending) = v.balloon.map_or((0, 0), |b| (b.current_pages, b.pending_pages));
            let taken = ballooned + pending + v.swapped_pages;
            let room = v
                .resident_pages
                .saturating_sub(v.reserved_pages)
                .saturating_sub(pending)
                .min(v.configured_pages.saturating_sub(v.reserved_pages).saturating_sub(taken));
            Vm {
                shares: u128::from(v.shares.max(1)),
                classes,
                room,
                private: classes.idle + classes.active + classes.duplicate + classes.zero,
                active: classes.active,
            }
        })
        .collect();

    // 1. Sharing, in proportion to what each VM has to share.
    let sharable: Vec<u64> = work.iter().map(|w| w.classes.sharable()).collect();
    let shared = apportion(&sharable, need);
    for ((a, w), &s) in actions.iter_mut().zip(&mut work).zip(&shared) {
        a.1.share_scan_pages = s;
        w.private -= s;
    }
    let mut left = need - shared.iter().sum::<u64>();

    // 2. Idle memory by the idle-memory tax. In these units an active page
    // costs (100 - tax) and an idle one 100, so idle pages weigh
    // 1 / (1 - tax) times more.
    let tax = u128::from(cfg.idle_tax_percent.min(99));
    let active_cost = 100 - tax;
    let start: Vec<u64> = work.iter().map(|w| w.private).collect();
    if left > 0 {
        let lo: Vec<u64> = work.iter().map(|w| w.active.max(w.private.saturating_sub(w.room))).collect();
        let after = water_fill(&work, &start, &lo, left, |w, budget| {
            // Largest P with cost(P) = A (100 - tax) + 100 (P - A) <= budget.
            let a = u128::from(w.active);
            let base = a * active_cost;
            if budget < base { w.active } else { clamp_u64(a + (budget - base) / 100) }
        });
        for (w, p) in work.iter_mut().zip(&after) {
            w.private = *p;
        }
        left -= start.iter().zip(&after).map(|(s, a)| s - a).sum::<u64>();
    }

    // 3. Active memory, by shares, only if idle memory ran out.
    if left > 0 {
        let now: Vec<u64> = work.iter().map(|w| w.private).collect();
        let lo: Vec<u64> = work.iter().zip(&start).map(|(w, s)| s.saturating_sub(w.room).min(w.private)).collect();
        let after = water_fill(&work, &now, &lo, left, |_, budget| clamp_u64(budget / active_cost));
        left -= now.iter().zip(&after).map(|(n, a)| n - a).sum::<u64>();
        for (w, p) in work.iter_mut().zip(&after) {
            w.private = *p;
        }
    }

    // 4. Balloon or swap.
    for (((a, w), v), s) in actions.iter_mut().zip(&work).zip(vms).zip(&start) {
        let take = s - w.private;
        let balloon = match v.balloon {
            Some(b) if !emergency => {
                let room = b.max_pages.saturating_sub(b.current_pages + b.pending_pages);
                take.min(room).min(cfg.balloon_pages_per_round)
            }
            _ => 0,
        };
        a.1.balloon_pages = balloon;
        a.1.swap_pages = take - balloon;
    }
    let planned = need - left;
    Plan { actions, need, planned, shortfall: left, emergency }
}

fn clamp_u64(x: u128) -> u64 {
    x.min(u128::from(u64::MAX)) as u64
}

/// Split `total` over `weights` in proportion, capped at each weight
/// (largest remainders get the rounding). If the weights sum to at most
/// `total`, each gets its whole weight.
fn apportion(weights: &[u64], total: u64) -> Vec<u64> {
    let sum: u128 = weights.iter().map(|&w| u128::from(w)).sum();
    if sum <= u128::from(total) {
        return weights.to_vec();
    }
    let mut out: Vec<u64> = weights.iter().map(|&w| (u128::from(w) * u128::from(total) / sum) as u64).collect();
    let mut rest = total - out.iter().sum::<u64>();
    // Fewer than `weights.len()` pages are left: one each to the largest
    // remainders.
    let mut order: Vec<usize> = (0..weights.len()).collect();
    order.sort_by_key(|&i| core::cmp::Reverse(u128::from(weights[i]) * u128::from(total) % sum));
    for i in order {
        if rest == 0 {
            break;
        }
        if out[i] < weights[i] {
            out[i] += 1;
            rest -= 1;
        }
    }
    out
}

/// Take exactly `need` pages (or as many as the bounds allow) out of VMs
/// currently at `hi[i]` pages, none below `lo[i]`, lowering the VMs with
/// the highest cost per share first. `inv(vm, budget)` is the largest page
/// count whose cost is at most `budget` (cost rises with pages).
///
/// Finds the lowest water level `L` (cost per share) at which
/// `sum(hi - P(L)) <= need` by bisection, then gives the rest of the need
/// to VMs in order from what they would give at `L - 1`. O(n log range).
fn water_fill(vms: &[Vm], hi: &[u64], lo: &[u64], need: u64, inv: impl Fn(&Vm, u128) -> u64) -> Vec<u64> {
    let at = |level: u128| -> Vec<u64> {
        vms.iter()
            .zip(hi.iter().zip(lo))
            .map(|(w, (&h, &l))| inv(w, level.saturating_mul(w.shares)).clamp(l.min(h), h))
            .collect()
    };
    let taken = |ps: &[u64]| -> u64 { hi.iter().zip(ps).map(|(h, p)| h - p).sum() };
    let floor = at(0);
    if taken(&floor) <= need {
        return floor;
    }
    // At `top` every VM is at `hi`: inv is at least linear in the budget
    // with slope 1/100, and shares are at least 1.
    let top = u128::from(hi.iter().copied().max().unwrap_or(0)) * 100 + 1;
    let (mut low, mut high) = (0u128, top);
    // Invariant: taken(at(low)) > need, taken(at(high)) <= need.
    while high - low > 1 {
        let mid = low + (high - low) / 2;
        if taken(&at(mid)) > need { low = mid } else { high = mid }
    }
    let mut ps = at(high);
    let more = at(low);
    let mut extra = need - taken(&ps);
    for (p, m) in ps.iter_mut().zip(&more) {
        let give = (*p - m).min(extra);
        *p -= give;
        extra -= give;
    }
    debug_assert_eq!(extra, 0);
    ps
}
