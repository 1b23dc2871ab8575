//! A VM's vCPUs between slices: which one runs next, what IPIs did to them
//! (NMI, INIT, startup IPI), pause and resume, and the VM's state as the
//! summary of theirs. Every state change goes through
//! [`super::vcpu_state`]. This runs on the boot CPU between rounds
//! (`manager::rounds`), when none of them is in the guest.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use vcpu::{Event, Vcpu};

use super::vcpu_state::{Parked, VcpuEvent, VcpuState};
use super::{RunState, VcpuStats, Vm};
use crate::backend::Backend;
use crate::vm::exit::Console;

impl<B: Backend> Vm<B> {
    /// How many vCPUs the VM has (0 once it ended).
    pub fn vcpu_count(&self) -> usize {
        self.res.as_ref().map_or(0, |r| r.vcpus.len())
    }

    /// The vCPU the scheduler should run now (host clock `now`, TSC ticks
    /// of a `hz` clock), round-robin from the one after the last run, or
    /// `None`; a vCPU an IPI waits for (`ipi_waiting`) before that. Due
    /// timers fire and IPIs' signals are carried out first, and every
    /// halted vCPU with an interrupt pending wakes: a halted vCPU costs one
    /// check here and nothing else.
    ///
    /// vCPU 0 keeps what a one-vCPU VM always did: halted with interrupts
    /// enabled it also runs when its timer is due or, with no timer armed,
    /// at every round (test guests poll with HLT; HLT then returns as if
    /// woken, which the architecture allows).
    pub fn pick_vcpu(&mut self, now: u64, hz: u64) -> Option<usize> {
        if self.paused || self.created || !self.state.runnable() || !self.throttle.allows(now) {
            return None;
        }
        let timer_due = now >= self.timer_tick;
        let no_timer = self.timer_tick == u64::MAX;
        self.fire_due_timers(now, hz);
        if self.devices.has_signals() {
            self.take_signals();
        }
        let res = self.res.as_mut()?;
        let n = res.vcpus.len();
        let devices = &self.devices;
        let wake = |i: usize, slot: &mut crate::vm::VcpuSlot<B::Vcpu>, legacy: bool| {
            if slot.state == VcpuState::Halted && !slot.halted_irq_off && (legacy || devices.interrupt_pending_for(i)) {
                slot.state.apply(VcpuEvent::Wake);
                slot.stats.wakeups += 1;
            }
        };
        // Every halted vCPU an interrupt waits for wakes now, not only those
        // the search below reaches: the round's siblings are picked from the
        // runnable ones.
        for (i, slot) in res.vcpus.iter_mut().enumerate() {
            wake(i, slot, false);
        }
        let can_run = |s: &crate::vm::VcpuSlot<B::Vcpu>| s.state.runnable() && s.awaiting_page.is_none();
        let waiting = self.ipi_waiting;
        let order = (0..n).map(|k| (self.next_vcpu + k) % n);
        // The round-robin goes on from where it was after a vCPU an IPI
        // waited for, or vCPUs nobody sends IPIs to would wait behind those
        // that get them.
        let pick = match order.clone().find(|&i| waiting & crate::devices::bit(i) != 0 && can_run(&res.vcpus[i])) {
            Some(i) => i,
            None => {
                let i = order.into_iter().find(|&i| {
                    wake(i, &mut res.vcpus[i], i == 0 && (timer_due || no_timer));
                    can_run(&res.vcpus[i])
                })?;
                self.next_vcpu = i + 1;
                i
            }
        };
        self.ipi_waiting &= !crate::devices::bit(pick);
        Some(pick)
    }

    /// Whether a vCPU other than `v` wants a host CPU now (host clock
    /// `now`): one runnable or running, one waiting for a lazily restored
    /// page, one an IPI waits for, an NMI, INIT or SIPI not carried out, or
    /// one halted with interrupts on and an interrupt pending (vCPU 0 also
    /// when the VM's timer is due or none is armed, as [`Vm::pick_vcpu`]
    /// wakes it). While none does, a job of vCPU `v` is the whole VM's
    /// work and may go on alone (`manager::round_on`, `manager::run_queue`).
    pub fn others_want_cpu(&self, v: usize, now: u64) -> bool {
        let Some(res) = self.res.as_ref() else { return false };
        if self.ipi_waiting & !crate::devices::bit(v) != 0 || self.devices.has_signals() {
            return true;
        }
        let vcpu0_wakes = now >= self.timer_tick || self.timer_tick == u64::MAX;
        res.vcpus.iter().enumerate().filter(|&(u, _)| u != v).any(|(u, s)| {
            let wakes = !s.halted_irq_off && (self.devices.interrupt_pending_for(u) || (u == 0 && vcpu0_wakes));
            s.awaiting_page.is_some()
                || match s.state {
                    VcpuState::Runnable | VcpuState::Running => true,
                    VcpuState::Halted => wakes,
                    _ => false,
                }
        })
    }

    /// As [`Vm::others_want_cpu`] after the VM's due timers fired (`hz`:
    /// the host clock's rate): a timer of another vCPU that fell due in
    /// vCPU `v`'s slice counts. Only for a VM of several vCPUs (one of one
    /// vCPU: `false`, nothing fired).
    pub fn others_want_cpu_after_timers(&mut self, v: usize, now: u64, hz: u64) -> bool {
        if self.vcpu_count() < 2 {
            return false;
        }
        self.fire_due_timers(now, hz);
        self.others_want_cpu(v, now)
    }

    /// Carries out what IPIs left for each vCPU (SDM Vol. 3A 11.6.1): INIT
    /// parks it in wait-for-SIPI; a startup IPI to a vCPU that waits for
    /// one starts it in real mode at vector × 4 KiB (11.4.4.1; APM Vol. 2
    /// 16.5), others ignore it; an NMI is queued and wakes a halted vCPU
    /// (one waiting for a SIPI ignores it: INIT blocks NMIs, 11.4.4.1 note).
    pub fn take_signals(&mut self) {
        let Some(res) = self.res.as_mut() else { return };
        for i in 0..res.vcpus.len() {
            let sig = self.devices.take_signals(i);
            let slot = &mut res.vcpus[i];
            if slot.state == VcpuState::Stopped {
                continue;
            }
            if sig.init {
                slot.state.apply(VcpuEvent::Init);
                slot.halted_irq_off = false;
            }
            let waits = matches!(slot.state, VcpuState::WaitForSipi | VcpuState::Paused(Parked::WaitForSipi));
            if let Some(vector) = sig.sipi.filter(|_| waits) {
                // The INIT state (SDM Vol. 3A 10.1.1, table 10-1; APM Vol. 2
                // 14.1.3), started at the vector. The backend never sees
                // wait-for-SIPI: this vCPU is not run until now.
                let mut s = slot.vcpu.state().after_init();
                s.start_at_sipi(vector);
                match slot.vcpu.set_state(&s) {
                    Ok(()) => slot.state.apply(VcpuEvent::Sipi),
                    Err(e) => log::warn!("vm {}: vCPU {i} cannot start at SIPI vector {vector:#x}: {e}", self.id),
                }
            }
            if sig.nmi && !waits {
                slot.vcpu.inject(Event::Nmi);
                slot.halted_irq_off = false;
                slot.state.apply(VcpuEvent::Wake);
            }
        }
    }

    /// After vCPU `i`'s slice: it gives the CPU up (unless it halted or
    /// was parked by an INIT) and the VM's state becomes the summary of
    /// its vCPUs' (for one vCPU, what the exit handlers already set). A VM none of whose vCPUs can
    /// ever run again (each halted with interrupts off or waiting for a
    /// SIPI nobody can send) ends, as a one-vCPU VM halted with interrupts
    /// off does. Returns whether it ended.
    pub fn after_slice(&mut self, i: usize, backend: &mut B, console: &mut impl Console) -> bool {
        if self.devices.has_signals() {
            self.take_signals();
        }
        let Some(res) = self.res.as_mut() else { return false };
        if let Some(slot) = res.vcpus.get_mut(i)
            && slot.state == VcpuState::Running
        {
            slot.state.apply(VcpuEvent::Leave);
        }
        // Ended, or halted for good by its exit handler (one vCPU, HLT with
        // interrupts off): nothing to summarise.
        if !self.state.runnable() {
            return false;
        }
        let live = |s: &super::VcpuSlot<B::Vcpu>| match s.state {
            VcpuState::Runnable | VcpuState::Running => Some(true),
            VcpuState::Halted if !s.halted_irq_off => Some(false),
            _ => None,
        };
        if res.vcpus.iter().any(|s| live(s) == Some(true)) {
            self.state = RunState::Running;
        } else if res.vcpus.iter().any(|s| live(s) == Some(false)) {
            self.state = RunState::Waiting;
        } else {
            let dead_halt = res.vcpus.iter().all(|s| s.halted_irq_off);
            let rip = res.vcpus[0].vcpu.state().rip;
            let end = if dead_halt {
                RunState::Halted { rip }
            } else {
                RunState::Stopped {
                    reason: String::from(
                        "every vCPU is halted with interrupts disabled or waits for a startup IPI: nothing can wake them",
                    ),
                }
            };
            self.end(end, backend, console);
            return true;
        }
        false
    }

    /// `vm pause` (`true`) and resume: every vCPU is outside the guest when
    /// the console runs (one host CPU), so each goes to paused at once.
    pub fn pause_vcpus(&mut self, paused: bool) {
        let Some(res) = self.res.as_mut() else { return };
        let event = if paused { VcpuEvent::Pause } else { VcpuEvent::Resume };
        for s in res.vcpus.iter_mut() {
            s.state.apply(event);
        }
    }

    /// `vm start` of a created VM: the BSP runs, the APs wait for a SIPI.
    pub fn start_vcpus(&mut self) {
        let Some(res) = self.res.as_mut() else { return };
        for (i, s) in res.vcpus.iter_mut().enumerate() {
            s.state.apply(VcpuEvent::Start { bsp: i == 0 });
        }
    }

    /// Every vCPU stops (the VM ended).
    pub fn stop_vcpus(&mut self) {
        let Some(res) = self.res.as_mut() else { return };
        for s in res.vcpus.iter_mut() {
            s.state.apply(VcpuEvent::Stop);
        }
    }

    /// Each vCPU's index (= APIC ID), state and counters, for `vm stats`;
    /// an ended VM's as they were when it ended.
    pub fn vcpu_report(&self) -> Vec<(usize, &'static str, VcpuStats)> {
        match self.res.as_ref() {
            Some(res) => res.vcpus.iter().enumerate().map(|(i, s)| (i, s.state.name(), s.stats.clone())).collect(),
            None => self
                .stats
                .ended_vcpus
                .iter()
                .enumerate()
                .map(|(i, s)| (i, VcpuState::Stopped.name(), s.clone()))
                .collect(),
        }
    }

    /// One line per vCPU for `vm stats`, with its local APIC at VM time
    /// `now_ns` while the VM lives.
    pub fn vcpu_lines(&self, now_ns: u64) -> Vec<String> {
        self.vcpu_report()
            .into_iter()
            .map(|(i, state, s)| {
                let apic = match self.res.as_ref().and_then(|_| self.devices.apic_summary(i, now_ns)) {
                    Some(a) => format!("; apic: {a}"),
                    None => String::new(),
                };
                format!(
                    "vcpu {i}: {state}, {} exits, {} slices, {} wake-ups from hlt, last on host cpu {}, ran on host cpus {} ({} moves){apic}",
                    s.exits,
                    s.slices,
                    s.wakeups,
                    s.last_host_cpu,
                    s.host_cpu_list(),
                    s.moves
                )
            })
            .collect()
    }
}
