//! Rounds that go on past the boot CPU's slice (`docs/smp.md`, "Rounds
//! that go on"; issue 11).
//!
//! A round used to end with the boot CPU's slice: every other CPU's
//! slice was cut there, and the boot CPU then finished them all, ran the
//! management between rounds and started the next. When every runnable
//! vCPU has a CPU and nothing between rounds needs the VMs home, that cut
//! is pure cost: each CPU would run the same vCPU again. Such a round
//! goes on instead:
//!
//! - each job away whose VM may (not throttled, one vCPU or one runnable
//!   while the others want no CPU, not a sibling or a spare) runs slice
//!   after slice on its CPU, each one's end needing nothing of the boot
//!   CPU (`rounds::goes_on_after`);
//! - the boot CPU runs slices of the VMs no job holds, from the same
//!   round-robin (its own run queue), each finished at once;
//! - the round ends when something wants every VM home (console input,
//!   the host NIC, a machine check, a slice whose end reaches other VMs),
//!   when a job away returns, when a VM that was not runnable at the start
//!   must share a CPU, or after [`MAX_ROUND_SLICES`] slices; then the boot
//!   CPU sets the round's end to now and kicks the CPUs, whose guests
//!   exit and see it.
//!
//! The boot CPU touches no VM a job holds until the join, as in every
//! round: its picks leave them out, and what it checks while the round
//! goes on is its own VMs, the CPUs' answers and the console.

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use super::host_calls::HostCalls;
use super::rounds::{SliceCpus, SliceEnd, run_body};
use super::{MIN_SLICE_TICKS, Manager};
use crate::backend::Backend;
use crate::mca::host::HOST_ERRORS;
use crate::vm::exit::{Console, Flow};
use crate::vm::{RunState, Vm};

/// At most this many slices' time in one round: the lines of the VMs
/// away come out, and the VMs are placed again, at least this often.
pub const MAX_ROUND_SLICES: u64 = 8;

/// What the boot CPU did while the round went on.
#[derive(Default)]
pub(super) struct WentOn {
    /// A slice of its own whose end must wait for the join (it reaches
    /// beyond its VM: frames to forward, its end, memory pressure, a
    /// reset).
    pub left: Option<(usize, usize, Flow)>,
    /// Its slices, and the time in them and halted waiting for the jobs.
    pub slices: u64,
    pub slice_ticks: u64,
    pub doze_ticks: u64,
}

/// Whether a slice's end can be finished while other CPUs hold VMs: it
/// reaches nothing but its own VM (no frames for the switch; `Stop`,
/// `Reset` and `OutOfMemory` reach the host's memory and other VMs).
pub(super) fn ends_alone<B: Backend>(vm: &Vm<B>, end: &SliceEnd) -> bool {
    matches!(end.flow, Flow::Continue | Flow::Yield) && end.deferred.is_none() && !vm.devices.net_frames_waiting()
}

impl<B: Backend> Manager<B> {
    /// Whether management between rounds has work now (a live save, a
    /// lazy fill or a migration moving, sharing scans, memory targets):
    /// then the round ends with the boot CPU's slice, as before. Read
    /// before the round starts, while every VM is home.
    pub(super) fn work_between_rounds(&self) -> bool {
        self.idle_until().is_none()
            || self.host_mem.sharing_enabled
            || self.host_mem.host_target.is_some()
            || self.vms.iter().any(|vm| vm.reclaim.target.is_some())
    }

    /// Whether a VM in `picks` has a runnable vCPU the round left out (more
    /// computing vCPUs than CPUs): then the round does not go on, so the
    /// VM's round-robin gives that one its turn next round.
    pub(super) fn vcpus_left_out(&self, picks: &[(usize, usize)]) -> bool {
        picks.iter().any(|&(i, _)| {
            self.vms[i].res.as_ref().is_some_and(|r| {
                r.vcpus
                    .iter()
                    .enumerate()
                    .any(|(u, s)| s.state.runnable() && s.awaiting_page.is_none() && !picks.contains(&(i, u)))
            })
        })
    }

    /// Whether a job of the VM at `i` may go on past its first slice (host
    /// clock `now`): a VM not throttled (a throttled VM sits out a share
    /// after each slice) with one vCPU, or with one runnable vCPU while no
    /// other wants a CPU (`Vm::others_want_cpu`: the others halted with
    /// nothing pending, waiting for a SIPI, or stopped). Such a job stops
    /// going on when another of its vCPUs comes to want a CPU
    /// (`rounds::goes_on_after`).
    pub(super) fn may_go_on(&self, i: usize, now: u64) -> bool {
        let Some(vm) = self.vms.get(i) else { return false };
        let Some(res) = vm.res.as_ref() else { return false };
        let alone = match res.vcpus.len() {
            1 => true,
            _ => match res.vcpus.iter().position(|s| s.state.runnable()) {
                Some(v) => !vm.others_want_cpu(v, now),
                None => false,
            },
        };
        alone && vm.throttle.pct() == 0
    }

    /// After the boot CPU's own slice of a round that goes on (finished
    /// already): runs more slices here, of VMs outside `taken` (those the
    /// round's jobs hold), while every job still runs and nothing wants
    /// the VMs home; then ends the round for the other CPUs at `round_end`.
    /// `limit`: the round's latest end.
    pub(super) fn go_on(
        &mut self,
        cpus: &mut impl SliceCpus<B>,
        round_end: &AtomicU64,
        limit: u64,
        taken: &mut Vec<(usize, usize)>,
        calls: Option<&HostCalls<B>>,
        console: &mut impl Console,
    ) -> WentOn {
        let mut on = WentOn::default();
        while let Ok(backend) = self.backend.as_ref() {
            let (now, hz) = (backend.now(), backend.tsc_hz());
            if now.saturating_add(MIN_SLICE_TICKS) >= limit
                || !cpus.all_running()
                || cpus.wanted()
                || HOST_ERRORS.waiting()
                || self.home_runnable(taken, now) > 1
            {
                break;
            }
            match self.pick(now, hz, taken) {
                Some((i, v)) => {
                    let slice = self.slice_ticks.min(limit - now);
                    let Ok(backend) = self.backend.as_mut() else { break };
                    let t0 = backend.now();
                    let end =
                        run_body(&mut self.vms[i], v, backend, &mut self.host_mem, console, slice, None, calls, None);
                    on.slice_ticks += backend.now().saturating_sub(t0);
                    on.slices += 1;
                    if ends_alone(&self.vms[i], &end) {
                        self.finish_slice(i, v, end.flow, console);
                    } else {
                        // Its VM stays out of further picks until the join.
                        taken.push((i, v));
                        on.left = Some((i, v, end.flow));
                        break;
                    }
                }
                None => {
                    // Nothing of its own to run: halted until a VM here has
                    // a timer due, a job returns, or a CPU asks a host call.
                    let wake = self.home_timer(taken);
                    on.doze_ticks += self.doze_serving(cpus, wake, limit, calls);
                }
            }
        }
        let now = self.backend.as_ref().map_or(0, |b| b.now());
        round_end.store(now, Ordering::Release);
        cpus.kick_running();
        on
    }

    /// Halts the boot CPU, in a round that goes on with nothing of its own
    /// to run, until `wake` (at most a millisecond, for the console; not
    /// past `limit`; and at least a minimum slice: a wake already due that
    /// nothing takes, a throttled VM's timer, would make it a spin),
    /// serving the other CPUs' host calls. Returns the ticks it dozed.
    pub(super) fn doze_serving(
        &mut self,
        cpus: &mut impl SliceCpus<B>,
        wake: u64,
        limit: u64,
        calls: Option<&HostCalls<B>>,
    ) -> u64 {
        use super::rounds::SliceHost;
        let (Ok(backend), host) = (self.backend.as_mut(), &mut self.host_mem) else { return 0 };
        let now = backend.now();
        let until = wake.min(now.saturating_add(backend.tsc_hz() / 1000)).min(limit);
        cpus.doze(until.max(now.saturating_add(MIN_SLICE_TICKS)), &mut || {
            if let Some(c) = calls {
                host.serve(c, backend);
            }
        });
        backend.now().saturating_sub(now)
    }

    /// VMs outside `taken` that want a CPU now (a second one means VMs wait
    /// for a CPU: the round ends, and the next one rotates them).
    pub(super) fn home_runnable(&self, taken: &[(usize, usize)], now: u64) -> usize {
        let home = |i: &usize| !taken.iter().any(|(t, _)| t == i);
        (0..self.vms.len())
            .filter(home)
            .filter(|&i| {
                let vm = &self.vms[i];
                vm.state == RunState::Running && !vm.paused && !vm.created && vm.throttle.allows(now)
            })
            .count()
    }

    /// The earliest timer of a live VM outside `taken` (`u64::MAX`: none;
    /// a paused VM's waits for its resume).
    pub(super) fn home_timer(&self, taken: &[(usize, usize)]) -> u64 {
        let home = |i: &usize| !taken.iter().any(|(t, _)| t == i);
        (0..self.vms.len())
            .filter(home)
            .map(|i| &self.vms[i])
            .filter(|vm| !vm.state.ended() && !vm.paused && !vm.created)
            .map(|vm| vm.timer_tick)
            .min()
            .unwrap_or(u64::MAX)
    }
}
