//! CPU throttling of a VM (a migration's auto-converge): a VM throttled to
//! `pct` percent runs at most `100 - pct` percent of the wall-clock time.
//! After each slice it sits out long enough to keep that share (`ran ×
//! pct / (100 - pct)` TSC ticks), and its slices are capped at
//! [`SLICE_US`] so the pauses the guest sees stay short (at 99 %: 2 ms of
//! run, then about 200 ms out). A guest that dirties memory faster than a
//! migration can send it then dirties less, and the pre-copy converges.

/// The longest slice a throttled VM gets, in microseconds.
pub const SLICE_US: u64 = 2_000;
/// The most a VM can be throttled (it must still run to converge).
pub const MAX_PCT: u8 = 99;

/// A VM's throttle: none (0 %) unless a migration set one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Throttle {
    pct: u8,
    /// TSC reading before which the VM does not run.
    until: u64,
}

impl Throttle {
    /// The share of time taken away, in percent (0: not throttled).
    pub fn pct(&self) -> u8 {
        self.pct
    }

    /// Throttles to `pct` percent (capped at [`MAX_PCT`]); 0 lifts it,
    /// and the VM may run at once.
    pub fn set(&mut self, pct: u8) {
        self.pct = pct.min(MAX_PCT);
        if self.pct == 0 {
            self.until = 0;
        }
    }

    /// Whether the VM may run at TSC reading `now`.
    pub fn allows(&self, now: u64) -> bool {
        self.pct == 0 || now >= self.until
    }

    /// After a slice that ran `ran` TSC ticks and ended at `now`: when the
    /// VM may run again.
    pub fn after_slice(&mut self, ran: u64, now: u64) {
        if self.pct > 0 {
            let out = u128::from(ran) * u128::from(self.pct) / u128::from(100 - self.pct);
            self.until = now.saturating_add(u64::try_from(out).unwrap_or(u64::MAX));
        }
    }

    /// The slice cap in TSC ticks at `hz` (`u64::MAX` when not throttled).
    pub fn slice_cap(&self, hz: u64) -> u64 {
        if self.pct == 0 { u64::MAX } else { (u128::from(hz) * u128::from(SLICE_US) / 1_000_000).max(1) as u64 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unthrottled_vm_always_runs_and_keeps_its_slices() {
        let mut t = Throttle::default();
        t.after_slice(1_000_000, 5);
        assert!(t.allows(0) && t.allows(5));
        assert_eq!(t.slice_cap(1_000_000_000), u64::MAX);
    }

    #[test]
    fn a_throttled_vm_sits_out_its_share_after_each_slice() {
        let mut t = Throttle::default();
        t.set(75);
        // Ran 100 ticks ending at 1000: out for 300 more (a quarter of the time running).
        t.after_slice(100, 1000);
        assert!(!t.allows(1000) && !t.allows(1299));
        assert!(t.allows(1300));
        t.set(50);
        t.after_slice(100, 2000);
        assert!(!t.allows(2099) && t.allows(2100));
        // Slices capped at 2 ms: 2,000,000 ticks at 1 GHz.
        assert_eq!(t.slice_cap(1_000_000_000), 2_000_000);
    }

    #[test]
    fn the_share_over_many_slices_is_what_was_asked() {
        for pct in [20u8, 50, 90, 99] {
            let mut t = Throttle::default();
            t.set(pct);
            let (mut now, mut ran_total) = (0u64, 0u64);
            while now < 10_000_000 {
                if t.allows(now) {
                    let ran = 10_000;
                    now += ran;
                    ran_total += ran;
                    t.after_slice(ran, now);
                } else {
                    now += 10;
                }
            }
            let share = ran_total * 100 / now;
            let want = 100 - u64::from(pct);
            assert!(share.abs_diff(want) <= 1, "{pct}%: ran {share}% of the time");
        }
    }

    #[test]
    fn lifting_it_lets_the_vm_run_at_once_and_the_cap_holds() {
        let mut t = Throttle::default();
        t.set(200);
        assert_eq!(t.pct(), MAX_PCT);
        t.after_slice(1_000, 0);
        assert!(!t.allows(10_000));
        t.set(0);
        assert!(t.allows(10_000));
        t.after_slice(u64::MAX, u64::MAX - 1);
        assert!(t.allows(0));
    }
}
