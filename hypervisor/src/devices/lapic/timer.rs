//! The local APIC timer's arithmetic (SDM Vol. 3A 11.5.4): counts derived
//! from the VM clock, never accumulated, so a periodic timer keeps its period
//! exactly however late the caller looks, and a saved state resumes on a
//! clock that continues from the same value.
//!
//! One decrement of the count is a *tick*: `divisor` cycles of the timer's
//! input clock. A count started at `start_ns` from `start_count` reaches zero
//! (the first expiry) at tick `start_count`; a periodic timer then reloads the
//! initial count and expires every `initial` ticks after that.

use serde::{Deserialize, Serialize};

const NS_PER_SEC: u128 = 1_000_000_000;

/// The timer's saved form.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimerState {
    /// The initial-count register (0x380 / MSR 0x838).
    pub initial: u32,
    /// The divide configuration register (0x3e0 / MSR 0x83e): bits 0, 1, 3.
    pub divide: u32,
    /// Whether a one-shot or periodic count is running.
    pub counting: bool,
    /// The VM clock (ns) when the running count started; the VM clock is
    /// continuous across save and restore, so this stays meaningful.
    pub start_ns: u64,
    /// The count at `start_ns`: the initial count, or what was left when the
    /// divide configuration changed mid-count.
    pub start_count: u32,
    /// Expiries already accounted for since `start_ns` (delivered, or
    /// dropped while masked).
    pub expiries: u64,
    /// IA32_TSC_DEADLINE (MSR 0x6e0); 0 is disarmed.
    pub tsc_deadline: u64,
}

/// The divisor a divide configuration register selects (SDM 11.5.4, Figure
/// 11-10): bits 3 and 1:0 form a 3-bit code; 0b111 is divide-by-1 and code
/// `n` otherwise divides by 2^(n+1).
pub fn divisor(divide: u32) -> u64 {
    let code = (divide & 0b11) | ((divide >> 1) & 0b100);
    1 << ((code + 1) & 7)
}

impl TimerState {
    /// Ticks elapsed from `start_ns` to `now_ns` at `hz`.
    fn ticks_at(&self, now_ns: u64, hz: u64) -> u128 {
        let elapsed = u128::from(now_ns.saturating_sub(self.start_ns));
        elapsed.saturating_mul(u128::from(hz)) / (NS_PER_SEC * u128::from(divisor(self.divide)))
    }

    /// The VM time at which tick `t` after the start has happened: the
    /// first `now` for which [`Self::ticks_at`] reaches `t` (saturating).
    fn time_of_tick(&self, t: u128, hz: u64) -> u64 {
        let hz = u128::from(hz.max(1));
        let ns = t
            .checked_mul(u128::from(divisor(self.divide)) * NS_PER_SEC)
            .map(|n| n.div_ceil(hz))
            .and_then(|n| u64::try_from(n).ok())
            .unwrap_or(u64::MAX);
        self.start_ns.saturating_add(ns)
    }

    fn period(&self) -> u128 {
        // Never 0 while counting (an initial count of 0 stops the timer);
        // the guard keeps a hostile state from dividing by zero.
        u128::from(self.initial.max(1))
    }

    /// How many expiries have happened by `now_ns` since the start.
    pub(crate) fn due_expiries(&self, now_ns: u64, hz: u64, periodic: bool) -> u64 {
        if !self.counting {
            return self.expiries;
        }
        let t = self.ticks_at(now_ns, hz);
        let first = u128::from(self.start_count);
        if t < first {
            0
        } else if !periodic {
            1
        } else {
            u64::try_from(1 + (t - first) / self.period()).unwrap_or(u64::MAX)
        }
    }

    /// The current-count register at `now_ns` (SDM 11.5.4): counting down
    /// from the start count; a one-shot count stays at 0 once expired, a
    /// periodic one reloads the initial count.
    pub(crate) fn current(&self, now_ns: u64, hz: u64, periodic: bool) -> u32 {
        if !self.counting {
            return 0;
        }
        let t = self.ticks_at(now_ns, hz);
        let first = u128::from(self.start_count);
        let left = if t < first {
            first - t
        } else if periodic {
            self.period() - (t - first) % self.period()
        } else {
            0
        };
        u32::try_from(left).unwrap_or(u32::MAX)
    }

    /// When the next expiry not yet accounted for happens, if one will.
    pub(crate) fn next_expiry(&self, hz: u64, periodic: bool) -> Option<u64> {
        if !self.counting || (!periodic && self.expiries > 0) {
            return None;
        }
        let t = u128::from(self.start_count).saturating_add(u128::from(self.expiries).saturating_mul(self.period()));
        Some(self.time_of_tick(t, hz))
    }

    /// Start counting `count` ticks from `now_ns`.
    pub(crate) fn start(&mut self, now_ns: u64, count: u32) {
        self.counting = count != 0;
        self.start_ns = now_ns;
        self.start_count = count;
        self.expiries = 0;
    }

    /// Stop counting (the count reads 0).
    pub(crate) fn stop(&mut self) {
        self.counting = false;
        self.start_ns = 0;
        self.start_count = 0;
        self.expiries = 0;
    }
}
