//! A host-wide free-memory target (`mem target host <MiB>`) met across the
//! VMs by `mm::reclaim::plan`: sharing first, then for each VM its balloon
//! or host swap by its usage classes and whether its guest runs a balloon
//! driver, as the product brief asks.
//!
//! About once a second, while free host memory is below the target, one
//! planning round turns each live VM into a `VmReclaimInput` (its page
//! counts from `mm`, its balloon when the driver is up, the guest's own
//! free and cache figures from the balloon's statistics) and applies the
//! plan: a balloon is asked for more pages (the driver gives them up on its
//! own time), host swap works through the VM's memory target
//! (`memory::reclaim::enforce_target`, a bounded number of pages per
//! scheduling round), and sharing scans the VM. What each VM was given and
//! why is kept for `mem`.

use mm::reclaim::{self, Action, GuestMemStats, ReclaimConfig, VmReclaimInput};

use super::Manager;
use crate::backend::Backend;
use crate::memory::MIN_TARGET_PAGES;
use crate::memory::reclaim::{PlanNote, share_step};

/// Below this share of the target, ballooning is too slow: the plan swaps
/// (the planner's emergency mark).
const EMERGENCY_PERCENT: u64 = 25;
/// Pages whose accessed bits one usage sample watches per VM.
const USAGE_SAMPLES: usize = 256;

impl<B: Backend> Manager<B> {
    /// `mem target host`: keep `pages` host pages free (`None` stops
    /// planning; balloons and targets already set stay as they are).
    pub fn set_host_target(&mut self, pages: Option<u64>) {
        self.host_mem.host_target = pages;
        self.host_mem.next_plan_tsc = 0;
    }

    /// One planning round if a host target is set and its time has come.
    /// Returns the plan it applied.
    pub fn host_reclaim_round(&mut self) -> Option<reclaim::Plan> {
        let target = self.host_mem.host_target?;
        let backend = self.backend.as_mut().ok()?;
        let now = backend.now();
        if now < self.host_mem.next_plan_tsc {
            return None;
        }
        self.host_mem.next_plan_tsc = now.saturating_add(backend.tsc_hz());
        let free = backend.free_frames();
        let host = reclaim::HostMemory {
            free_pages: free,
            target_free_pages: target,
            min_free_pages: target * EMERGENCY_PERCENT / 100,
        };
        let mut inputs = alloc::vec::Vec::new();
        for vm in self.vms.iter_mut() {
            let Some(res) = vm.res.as_mut() else { continue };
            // Usage classes from access bits: the sample started last round
            // ends now (pages the guest touched since are active), and the
            // next one starts.
            if res.mem.sampling_active()
                && let Ok(e) = res.mem.finish_usage_sample(&*backend.mem())
            {
                vm.reclaim.usage = Some(e.into());
            }
            let vcpus = &mut res.vcpus;
            res.mem.start_usage_sample(backend.mem(), now ^ u64::from(vm.id), USAGE_SAMPLES, &mut |s| {
                crate::vm::flush_all(vcpus, s)
            });
            let c = res.mem.state_counts();
            let pages = res.mem.pages();
            // A balloon counts once its driver negotiated features: a guest
            // without the driver never will.
            let balloon = vm.devices.balloon().filter(|b| b.negotiated() != 0).map(|b| mm::reclaim::Balloon {
                current_pages: u64::from(b.actual()),
                pending_pages: u64::from(b.target()).saturating_sub(u64::from(b.actual())),
                max_pages: pages.saturating_sub(MIN_TARGET_PAGES),
            });
            let guest = vm.devices.balloon().and_then(|b| b.stats()).map(|s| GuestMemStats {
                free_pages: s.free_memory.unwrap_or(0) / 4096,
                cache_pages: s.disk_caches.unwrap_or(0) / 4096,
            });
            inputs.push(VmReclaimInput {
                vm: vm.id,
                shares: 1,
                configured_pages: pages,
                reserved_pages: MIN_TARGET_PAGES,
                resident_pages: c.present + c.zero + c.shared,
                swapped_pages: c.swapped,
                balloon,
                // Until a sample finished, the planner treats the VM as all
                // active unless the guest's own figures say otherwise.
                estimate: vm.reclaim.usage.unwrap_or_default(),
                guest,
            });
        }
        let plan = reclaim::plan(&host, &inputs, &ReclaimConfig::default());
        for ((id, action), input) in plan.actions.iter().zip(&inputs) {
            let Some(vm) = self.vms.iter_mut().find(|v| v.id == *id) else { continue };
            let Some(res) = vm.res.as_mut() else { continue };
            let why = reason(action, input, plan.emergency);
            vm.reclaim.planned =
                Some(PlanNote { classes: reclaim::UsageClasses::estimate(input), action: *action, why });
            if action.balloon_pages > 0
                && let Some(b) = vm.devices.balloon()
            {
                let want = (u64::from(b.target()) + action.balloon_pages).min(res.mem.pages() - MIN_TARGET_PAGES);
                res.mem.set_balloon_target(want);
                vm.devices.balloon_set_target(want as u32);
            }
            if action.swap_pages > 0 {
                let private = res.mem.state_counts().present;
                let target = private.saturating_sub(action.swap_pages).max(MIN_TARGET_PAGES);
                vm.reclaim.target = Some(vm.reclaim.target.map_or(target, |t| t.min(target)));
            }
            if action.share_scan_pages > 0 {
                let vcpus = &mut res.vcpus;
                let budget = action.share_scan_pages as usize;
                share_step(&mut res.mem, backend.mem(), &mut self.host_mem, budget, 0, &mut |s| {
                    crate::vm::flush_all(vcpus, s)
                });
            }
        }
        // Fresh guest figures for the next round.
        for vm in self.vms.iter_mut() {
            vm.request_balloon_stats(backend, &mut self.host_mem);
        }
        Some(plan)
    }
}

/// One line on why the plan reclaims from a VM the way it does.
fn reason(action: &Action, input: &VmReclaimInput, emergency: bool) -> &'static str {
    match (action.balloon_pages > 0, action.swap_pages > 0, action.share_scan_pages > 0) {
        (false, false, false) => "nothing: the host target is met without it",
        (true, false, _) => "balloon: its guest runs a balloon driver and chooses the pages",
        (_, true, _) if input.balloon.is_none() => "swap: its guest has no balloon driver",
        (_, true, _) if emergency => "swap: free memory is below the emergency mark, ballooning is too slow",
        (_, true, _) => "swap: its balloon is at its limit for this round",
        (false, false, true) => "sharing: zero or duplicate pages",
    }
}
