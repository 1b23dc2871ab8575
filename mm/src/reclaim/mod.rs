//! The reclaim policy: given a host-wide free-memory target, decide per VM
//! how many pages to reclaim and by which means. Pure arithmetic over
//! counts (no page tables), so it is host-testable and cheap to run every
//! scheduling round.
//!
//! Inputs per VM ([`VmReclaimInput`]): configured size, guaranteed
//! reservation, resident pages, whether the guest has a balloon driver and
//! how big its balloon is, swap use, proportional shares, a
//! [`UsageEstimate`] from access sampling, and optionally the guest's own
//! report of free memory. From these the policy estimates per-VM
//! memory-usage classes ([`UsageClasses`]: zero, already shared, duplicate,
//! idle, active; after the seed abstract on memory-usage classes), then
//! plans ([`plan`]) in this order of cost:
//!
//! 1. **Sharing**: zero pages and duplicates are reclaimed by page sharing,
//!    which needs neither guest cooperation nor I/O and costs the guest
//!    nothing until it writes the page.
//! 2. **Idle memory**, spread over VMs by an idle-memory tax: a VM's
//!    claim on memory is its shares divided by its pages, where idle pages
//!    are charged `1 / (1 - tax)` times as much as active ones, and memory
//!    is taken from the VM with the weakest claim first. This is the
//!    adjusted shares-per-page ratio of Waldspurger, "Memory Resource
//!    Management in VMware ESX Server" (OSDI 2002, section 5.2), with its
//!    default tax of 75 %; here it orders reclamation of idle memory.
//! 3. **Active memory**, only when the idle memory of all VMs is not
//!    enough, in proportion to shares.
//!
//! Each VM's amount is then split: ballooning first when the guest has a
//! balloon (the guest picks which pages to give up, using knowledge the
//! host lacks, and avoids double paging), up to its balloon's room and the
//! rate a guest can inflate per round; host swapping for the rest, for
//! VMs without a balloon, and for everything when free memory has fallen
//! below the emergency mark, where ballooning is too slow. No VM is planned
//! below its reservation.

mod plan;
#[cfg(test)]
mod tests;

pub use plan::{Action, HostMemory, Plan, ReclaimConfig, plan};

use crate::swap::VmId;

/// Usage classes of a random sample of a VM's pages, as the sampler
/// counts them (`vm_memory` produces one per sampling interval). Every
/// sampled page that is backed by host memory is in exactly one of the
/// class counts; pages sampled while ballooned, swapped or not loaded count
/// only in `sampled`. The policy scales the classes to the VM's resident
/// pages, so the sample may be drawn from all guest pages or only resident
/// ones.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct UsageEstimate {
    /// Pages sampled.
    pub sampled: u64,
    /// Private pages whose contents are all zero.
    pub zero: u64,
    /// Pages already backed by a shared or the zero frame (they cost the
    /// host nothing more, so there is nothing to reclaim from them).
    pub shared: u64,
    /// Private non-zero pages accessed during the interval.
    pub active: u64,
    /// Private non-zero pages not accessed during the interval.
    pub idle: u64,
    /// Of `idle` and `active`: pages whose contents match a page in the
    /// sharing index (sharing candidates). 0 if the sampler does not look.
    pub duplicate: u64,
}

impl From<crate::vm_memory::UsageEstimate> for UsageEstimate {
    fn from(e: crate::vm_memory::UsageEstimate) -> Self {
        Self { sampled: e.sampled, zero: e.zero, shared: e.shared, active: e.accessed, idle: e.idle, duplicate: 0 }
    }
}

/// The guest's own account of its memory, from its balloon driver's
/// statistics (virtio-balloon `MEMFREE` and `CACHES`), in 4 KiB pages.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct GuestMemStats {
    /// Memory the guest has not allocated at all.
    pub free_pages: u64,
    /// Clean caches the guest can drop without I/O.
    pub cache_pages: u64,
}

/// A guest's balloon driver.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct Balloon {
    /// Pages the balloon holds now.
    pub current_pages: u64,
    /// Pages asked for but not yet handed over by the guest (inflation in
    /// progress): counted as reclaimed so the next round does not ask again.
    pub pending_pages: u64,
    /// The most the balloon may hold (the driver's or the operator's limit).
    pub max_pages: u64,
}

/// One VM as the policy sees it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct VmReclaimInput {
    /// The VM.
    pub vm: VmId,
    /// Proportional share of host memory (0 counts as 1).
    pub shares: u32,
    /// Guest memory, in pages.
    pub configured_pages: u64,
    /// Host memory guaranteed to the VM: the policy never plans the VM's
    /// resident pages below this.
    pub reserved_pages: u64,
    /// Guest pages backed by host memory (private, zero-mapped or shared).
    pub resident_pages: u64,
    /// Guest pages in host swap.
    pub swapped_pages: u64,
    /// The balloon, or `None` if the guest has no balloon driver.
    pub balloon: Option<Balloon>,
    /// The latest usage sample.
    pub estimate: UsageEstimate,
    /// The guest's own report, if its driver sends one.
    pub guest: Option<GuestMemStats>,
}

/// Estimated pages of a VM in each usage class; together they make up its
/// resident pages. `duplicate` pages are taken out of idle and active
/// (sharing reclaims them first).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct UsageClasses {
    /// Private zero pages (reclaimable by zero-page sharing).
    pub zero: u64,
    /// Already shared (nothing to reclaim).
    pub shared: u64,
    /// Private duplicates of other pages (reclaimable by sharing).
    pub duplicate: u64,
    /// Private pages not in use: the guest's free memory and cold pages.
    pub idle: u64,
    /// Private pages in use.
    pub active: u64,
}

impl UsageClasses {
    /// Fewer sampled resident pages than this and the sample says too
    /// little: the VM is treated as all active, so it is not reclaimed
    /// from ahead of VMs whose idleness is known.
    pub const MIN_SAMPLE: u64 = 16;

    /// Scale `input`'s sample to its resident pages. Rounding errs towards
    /// active. The guest's report of free and cache pages, when larger
    /// than the sampled idle estimate, replaces it: the guest knows which
    /// of its pages are free even when it touched them recently (it
    /// zeroes or scrubs free pages, for one).
    pub fn estimate(input: &VmReclaimInput) -> Self {
        let e = &input.estimate;
        let resident = input.resident_pages;
        let counted = e.zero.saturating_add(e.shared).saturating_add(e.active).saturating_add(e.idle);
        if counted < Self::MIN_SAMPLE {
            return Self { active: resident, ..Self::default() };
        }
        let scale = |n: u64| (u128::from(n) * u128::from(resident) / u128::from(counted)) as u64;
        let zero = scale(e.zero);
        let shared = scale(e.shared);
        let duplicate = scale(e.duplicate.min(e.active + e.idle));
        let mut idle = scale(e.idle);
        let private = resident - zero - shared;
        if let Some(g) = input.guest {
            idle = idle.max(g.free_pages.saturating_add(g.cache_pages).min(private));
        }
        // Duplicates come out of idle first (they are usually cold).
        let idle = idle.min(private);
        let dup_from_idle = duplicate.min(idle);
        let duplicate = duplicate.min(private);
        let idle = idle - dup_from_idle;
        let active = private - duplicate - idle;
        Self { zero, shared, duplicate, idle, active }
    }

    /// Pages sharing can reclaim.
    pub fn sharable(&self) -> u64 {
        self.zero + self.duplicate
    }
}
