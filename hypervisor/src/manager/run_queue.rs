//! A round's run queue: more runnable VMs than CPUs, and the round goes on
//! (`docs/smp.md`, "The run queue"; issue 11).
//!
//! Without it, a round with more runnable VMs than CPUs ended with the
//! boot CPU's slice, and the next round rotated the VMs: every CPU waited
//! for every other at each slice's end (10 ms), and the boot CPU finished
//! every slice between rounds. In a round of the run queue every runnable
//! VM is a job of one queue the CPUs share ([`Spares`] taken again and
//! again). Each CPU, the boot CPU included, takes the job that waited
//! longest (of its NUMA node first), runs it for a slice, and gives it
//! back if another waits and nothing of that slice needs the boot CPU
//! (`rounds::goes_on_after`); else it runs on. The boot CPU ends the round
//! as it ends one that goes on (`round_on`): console input, a host
//! machine check, a CPU that found nothing to take, a job with console
//! lines to print, a VM outside the queue with a timer due, or
//! `MAX_ROUND_SLICES` slices' time.
//!
//! Which VMs make a queue: VMs not throttled, of one vCPU or of one runnable
//! vCPU while their others want no CPU (`may_go_on`; a job of such a VM
//! that is done for the round ends it, for its other vCPUs' sake),
//! more runnable than CPUs, every runnable VM among them (the round's
//! picks and its spares, however many per CPU), and nothing between rounds
//! waits. VMs of one vCPU halted for their timers are jobs too, asleep
//! until then (`Spares::not_before`): the CPU that takes one when it is due
//! wakes it; a CPU with nothing to take halts until one is due.
//!
//! What stays true: a job is one CPU's from its claim until it is given
//! back (a compare-exchange, then a release store); the boot CPU touches
//! a queued VM only through the job it took, and every VM only after the
//! join; the jobs' intermediate slice ends need nothing (they passed
//! `goes_on_after`), so only each job's last end is finished.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use super::host_calls::HostCalls;
use super::round_on::MAX_ROUND_SLICES;
use super::rounds::{AwaySlice, SliceCpus, SliceHost, halted_for_timer};
use super::{MIN_SLICE_TICKS, Manager};
use crate::backend::Backend;
use crate::mca::host::HOST_ERRORS;
use crate::vm::exit::Console;

/// A run queue's jobs: (VM, vCPU, whether an IPI waited for it), and when
/// each is due (0: now; else the host time its VM sleeps until).
pub(super) struct QueueJobs {
    pub jobs: Vec<(usize, usize, bool)>,
    pub due: Vec<u64>,
}

impl<B: Backend> Manager<B> {
    /// The jobs of a run queue, if the round's `picks` and `spares` make
    /// one: with the VMs asleep for their timers (`asleep_vms`), more VMs
    /// than CPUs, each that may go on (`may_go_on`), every runnable VM
    /// among them, and nothing waiting between rounds. Each job with when
    /// it is due (0: now).
    pub(super) fn queue_jobs(
        &self,
        cpus: &mut impl SliceCpus<B>,
        picks: &[(usize, usize)],
        spares: &[(usize, usize, bool)],
        now: u64,
    ) -> Option<QueueJobs> {
        // (Only with more runnable VMs than CPUs: with a CPU for each, the
        // round goes on as it is (`round_on`), its boot CPU waking the VMs
        // asleep between its slices. A queue there let a busy VM move to
        // the boot CPU, where rounds the other's ticks ended cut it: 30 %
        // slower in Bochs, 2026-12-05. Checked first: a lone VM's round
        // allocates nothing here.)
        if spares.is_empty() || !cpus.goes_on() || !picks.iter().all(|&(i, _)| self.may_go_on(i, now)) {
            return None;
        }
        let mut all: Vec<(usize, usize)> =
            picks.iter().copied().chain(spares.iter().map(|&(i, v, _)| (i, v))).collect();
        let asleep = self.asleep_vms(&all, now);
        all.extend(asleep.iter().map(|&(i, _)| (i, 0)));
        let fits = all.iter().all(|&(i, _)| self.may_go_on(i, now))
            && self.home_runnable(&all, now) == 0
            && self.home_timer(&all) > now
            && !self.work_between_rounds()
            && !cpus.wanted();
        if !fits {
            return None;
        }
        let jobs = picks
            .iter()
            .map(|&(i, v)| (i, v, false))
            .chain(spares.iter().copied())
            .chain(asleep.iter().map(|&(i, _)| (i, 0, false)))
            .collect();
        let due = (0..picks.len() + spares.len()).map(|_| 0).chain(asleep.iter().map(|&(_, t)| t.max(1))).collect();
        Some(QueueJobs { jobs, due })
    }

    /// VMs outside `taken` asleep for their timer: one vCPU, halted with
    /// interrupts on, a timer set, not throttled, paused or ended; each
    /// with its timer (host time).
    fn asleep_vms(&self, taken: &[(usize, usize)], now: u64) -> Vec<(usize, u64)> {
        (0..self.vms.len())
            .filter(|i| !taken.iter().any(|(t, _)| t == i))
            .filter(|&i| self.may_go_on(i, now))
            .filter_map(|i| Some((i, halted_for_timer(&self.vms[i], 0)?)))
            .collect()
    }

    /// Runs a round of the run queue over `jobs` (every runnable VM, see
    /// the module); `round_start`: when the round's picks were made.
    pub(super) fn run_queue_round(
        &mut self,
        console: &mut impl Console,
        cpus: &mut impl SliceCpus<B>,
        QueueJobs { jobs, due }: QueueJobs,
        round_start: u64,
    ) -> bool {
        let jobs = &jobs[..];
        let here = vcpu::cpu_local::get();
        let me = here.index;
        let my_node = self.numa.node_of_cpu(here.apic_id.load(Ordering::Relaxed));
        let limit = round_start.saturating_add(self.slice_ticks.saturating_mul(MAX_ROUND_SLICES));
        let round_end = Box::new(AtomicU64::new(limit));
        let mut queue = self.prepare_spares(jobs, round_start, me);
        let calls: Option<Box<HostCalls<B>>> = cpus.takes_calls().then(|| Box::new(HostCalls::new(jobs.len(), me)));
        let calls_ptr: *const HostCalls<B> = calls.as_deref().map_or(core::ptr::null(), |c| c);
        let queue_ptr = queue.make_queue(&round_end, calls_ptr, &due);
        // Each free CPU's way into the queue: a job of no VM that takes the
        // queue's jobs (`Spares::run_here`); each stays in place until the
        // join.
        let mut ways: Vec<AwaySlice<B>> = (0..cpus.free()).map(|_| AwaySlice::into_queue(queue_ptr, me)).collect();
        for way in ways.iter_mut() {
            if !cpus.start(way) {
                break;
            }
        }
        let Ok(backend) = self.backend.as_ref() else {
            cpus.join(&mut || {});
            return false;
        };
        let t0 = backend.now();
        self.sched.start_ticks += t0.saturating_sub(round_start);
        let taken: Vec<(usize, usize)> = jobs.iter().map(|&(i, v, _)| (i, v)).collect();
        let mut here_slices = 0;
        while let Ok(backend) = self.backend.as_ref() {
            let now = backend.now();
            if now.saturating_add(MIN_SLICE_TICKS) >= limit
                || !cpus.all_running()
                || cpus.wanted()
                || HOST_ERRORS.waiting()
                || queue.home_wanted()
                || self.home_timer(&taken) <= now
            {
                break;
            }
            let Ok(backend) = self.backend.as_mut() else { break };
            // SAFETY: the queue stays in place until the join, and this CPU
            // runs nothing else of the round meanwhile.
            if unsafe { queue.run_one_home(backend, &mut self.host_mem, my_node) } {
                here_slices += 1;
                continue;
            }
            // Nothing to take: halted until a VM asleep is due (at most a
            // millisecond, for the console), serving the CPUs' host calls;
            // with none asleep, the round is over.
            let Some(wake) = queue.next_wake().filter(|&w| w < limit) else { break };
            self.doze_serving(cpus, wake, limit, calls.as_deref());
        }
        let Ok(backend) = self.backend.as_mut() else {
            cpus.join(&mut || {});
            return false;
        };
        let t1 = backend.now();
        round_end.store(t1, Ordering::Release);
        cpus.kick_running();
        let host_mem = &mut self.host_mem;
        let calls_ref = calls.as_deref();
        cpus.join(&mut || {
            if let Some(c) = calls_ref {
                host_mem.serve(c, backend);
            }
        });
        let joined = backend.now().saturating_sub(t1);
        if let Some(c) = calls.as_deref() {
            self.sched.host_calls_in_slice += u64::from(c.served_in_slice.load(Ordering::Relaxed));
        }
        let (slices, wakes) = (queue.queue_slices(), queue.woken());
        let next = queue.longest_waiting().map(|k| jobs[k].0);
        let done = self.spares_taken(*queue, jobs);
        // The round-robin goes on where the queue was: the next round
        // starts with the VM that waited longest (a job no CPU took at all
        // comes first anyway: `spares_taken`). Else every round would
        // start in the same order, and the first VM get a slice more.
        if done.len() == jobs.len()
            && let Some(i) = next
        {
            self.cursor = i;
        }
        let ran = done.len() as u64;
        let (on_away, on_here) = self.finish_jobs(done.into_iter().map(|job| (job, true)), console);
        let now = self.backend.as_ref().map_or(round_start, |b| b.now());
        let s = &mut self.sched;
        s.round_ended(now.saturating_sub(round_start));
        s.queue_rounds += 1;
        s.queue_slices += slices;
        s.queue_slices_here += here_slices;
        s.slices += slices + on_away + on_here;
        s.slices_on_here += on_here;
        s.slices_on_away += on_away;
        s.queue_vms += ran;
        s.queue_wakes += wakes;
        s.slice_ticks += t1.saturating_sub(t0);
        s.join_ticks += joined;
        true
    }
}
