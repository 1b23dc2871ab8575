//! One vCPU's life, as an explicit state machine: every change of a vCPU's
//! scheduling state goes through [`VcpuState::next`], so the rules live in
//! one place (Firecracker's `vstate/vcpu.rs` and axvisor's `axvcpu` do the
//! same). The VM's [`super::RunState`] is the summary of its vCPUs'.
//!
//! ```text
//!  Created --Start(bsp)--> Runnable <--Leave-- Running
//!  Created --Start(ap)---> WaitForSipi         ^   |  \--Hlt--> Halted
//!  Runnable --Enter--------------------------/     |            |
//!  Halted --Wake--> Runnable                        \           |
//!  (any live) --Init--> WaitForSipi --Sipi--> Runnable
//!  Runnable | Halted | WaitForSipi --Pause--> Paused(that) --Resume--> that
//!  (any) --Stop--> Stopped
//! ```
//!
//! An AP starts in wait-for-SIPI, as after power-on (SDM Vol. 3A 9.1,
//! 9.4.1; APM Vol. 2 16.x); INIT puts any vCPU there (SDM Vol. 3A 10.1.1
//! table 10-1 for the state it leaves). A SIPI to a vCPU that does not wait
//! for one is ignored (SDM Vol. 3A 11.4.4.1), as is a wake-up of a vCPU that
//! is not halted: both come from the guest and change nothing.

/// Where a paused vCPU goes back to on resume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parked {
    Runnable,
    Halted,
    WaitForSipi,
}

/// A vCPU's scheduling state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuState {
    /// Built, its VM not started yet.
    Created,
    /// Waits for a time slice.
    Runnable,
    /// In the guest (or in an exit handler) on a host CPU.
    Running,
    /// Executed HLT: runs again when an interrupt for it is pending.
    Halted,
    /// After INIT (or power-on, for an AP): runs again at a startup IPI.
    WaitForSipi,
    /// The operator paused its VM: outside the guest until resumed.
    Paused(Parked),
    /// Its VM ended.
    Stopped,
}

/// What happens to a vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuEvent {
    /// Its VM starts; the bootstrap processor runs, an AP waits for a SIPI.
    Start {
        bsp: bool,
    },
    /// The scheduler gives it a host CPU.
    Enter,
    /// It gives the host CPU up (slice over, yield), still runnable.
    Leave,
    /// It executed HLT (leaving the CPU).
    Hlt,
    /// An interrupt for it is pending.
    Wake,
    /// An INIT reached it.
    Init,
    /// A startup IPI reached it.
    Sipi,
    Pause,
    Resume,
    /// Its VM ended.
    Stop,
}

/// A transition the hypervisor must never ask for (a bug, not the guest's
/// doing: guest-caused events that do not apply are ignored instead).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Illegal {
    pub from: VcpuState,
    pub event: VcpuEvent,
}

impl VcpuState {
    pub fn name(self) -> &'static str {
        match self {
            VcpuState::Created => "created",
            VcpuState::Runnable => "runnable",
            VcpuState::Running => "running",
            VcpuState::Halted => "halted",
            VcpuState::WaitForSipi => "wait-for-sipi",
            VcpuState::Paused(_) => "paused",
            VcpuState::Stopped => "stopped",
        }
    }

    /// The state after `event`: the one place the rules are.
    pub fn next(self, event: VcpuEvent) -> Result<VcpuState, Illegal> {
        use VcpuEvent as E;
        use VcpuState as S;
        let illegal = Err(Illegal { from: self, event });
        Ok(match (self, event) {
            (_, E::Stop) => S::Stopped,
            (S::Stopped, _) => return illegal,
            (S::Created, E::Start { bsp: true }) => S::Runnable,
            (S::Created, E::Start { bsp: false }) => S::WaitForSipi,
            (S::Created, E::Init) => S::WaitForSipi,
            (S::Created, _) | (_, E::Start { .. }) => return illegal,
            (S::Runnable, E::Enter) => S::Running,
            (S::Running, E::Leave) => S::Runnable,
            (S::Running, E::Hlt) => S::Halted,
            (S::Halted, E::Wake) => S::Runnable,
            // Guest-caused and not applicable: no change.
            (s @ (S::Runnable | S::Running | S::WaitForSipi | S::Paused(_)), E::Wake) => s,
            (S::Paused(_), E::Init) => S::Paused(Parked::WaitForSipi),
            (_, E::Init) => S::WaitForSipi,
            (S::WaitForSipi, E::Sipi) => S::Runnable,
            (S::Paused(Parked::WaitForSipi), E::Sipi) => S::Paused(Parked::Runnable),
            (s, E::Sipi) => s,
            (S::Runnable, E::Pause) => S::Paused(Parked::Runnable),
            (S::Halted, E::Pause) => S::Paused(Parked::Halted),
            (S::WaitForSipi, E::Pause) => S::Paused(Parked::WaitForSipi),
            (S::Paused(p), E::Resume) => match p {
                Parked::Runnable => S::Runnable,
                Parked::Halted => S::Halted,
                Parked::WaitForSipi => S::WaitForSipi,
            },
            _ => return illegal,
        })
    }

    /// Applies `event`; an illegal one (a hypervisor bug) is logged and
    /// leaves the state as it was rather than taking the host down.
    /// (Debug builds, the unit tests', panic instead: the test that made
    /// the bug fails.)
    pub fn apply(&mut self, event: VcpuEvent) {
        if !self.try_apply(event) {
            debug_assert!(false, "vcpu state machine: {self:?} cannot take {event:?}");
            log::error!("vcpu state machine: {self:?} cannot take {event:?}");
        }
    }

    /// Applies `event` if it is legal here; whether it was.
    fn try_apply(&mut self, event: VcpuEvent) -> bool {
        self.next(event).map(|s| *self = s).is_ok()
    }

    /// Waits for a host CPU.
    pub fn runnable(self) -> bool {
        self == VcpuState::Runnable
    }
}

#[cfg(test)]
mod tests {
    use super::VcpuEvent as E;
    use super::VcpuState as S;
    use super::*;

    #[test]
    fn bsp_runs_halts_wakes_and_stops() {
        let mut s = S::Created.next(E::Start { bsp: true }).unwrap();
        assert_eq!(s, S::Runnable);
        s = s.next(E::Enter).unwrap();
        assert_eq!(s, S::Running);
        s = s.next(E::Hlt).unwrap();
        assert_eq!(s, S::Halted);
        assert_eq!(s.next(E::Enter), Err(Illegal { from: S::Halted, event: E::Enter }), "a halted vCPU never runs");
        s = s.next(E::Wake).unwrap();
        assert_eq!(s, S::Runnable);
        assert_eq!(s.next(E::Stop), Ok(S::Stopped));
        assert!(S::Stopped.next(E::Wake).is_err() && S::Stopped.next(E::Sipi).is_err());
    }

    #[test]
    fn ap_waits_for_sipi_and_init_parks_any_live_vcpu() {
        let s = S::Created.next(E::Start { bsp: false }).unwrap();
        assert_eq!(s, S::WaitForSipi);
        assert_eq!(s.next(E::Wake), Ok(S::WaitForSipi), "interrupts do not start an AP");
        assert_eq!(s.next(E::Sipi), Ok(S::Runnable));
        for from in [S::Runnable, S::Running, S::Halted, S::WaitForSipi] {
            assert_eq!(from.next(E::Init), Ok(S::WaitForSipi), "{from:?}");
        }
        assert_eq!(S::Runnable.next(E::Sipi), Ok(S::Runnable), "a second SIPI is ignored");
        assert_eq!(S::Halted.next(E::Sipi), Ok(S::Halted));
    }

    #[test]
    fn pause_remembers_and_guest_events_while_paused_are_kept() {
        for (from, parked) in
            [(S::Runnable, Parked::Runnable), (S::Halted, Parked::Halted), (S::WaitForSipi, Parked::WaitForSipi)]
        {
            let p = from.next(E::Pause).unwrap();
            assert_eq!(p, S::Paused(parked));
            assert_eq!(p.next(E::Resume), Ok(from));
        }
        assert!(S::Running.next(E::Pause).is_err(), "a running vCPU leaves the guest first");
        // An IPI sent before the pause lands while paused.
        let p = S::WaitForSipi.next(E::Pause).unwrap().next(E::Sipi).unwrap();
        assert_eq!(p.next(E::Resume), Ok(S::Runnable));
        let p = S::Runnable.next(E::Pause).unwrap().next(E::Init).unwrap();
        assert_eq!(p.next(E::Resume), Ok(S::WaitForSipi));
        assert!(S::Runnable.next(E::Resume).is_err());
    }

    #[test]
    fn apply_keeps_the_state_on_an_illegal_event() {
        let mut s = S::Halted;
        assert!(!s.try_apply(E::Leave));
        assert_eq!(s, S::Halted);
        s.apply(E::Wake);
        assert_eq!(s, S::Runnable);
    }
}
