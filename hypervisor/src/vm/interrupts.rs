//! Device interrupts to the vCPU: timers that came due raise their lines,
//! and INTR from the PIC is delivered as an external interrupt when the
//! vCPU can take one (RFLAGS.IF set, no interrupt shadow, nothing being
//! injected: `Vcpu::interrupt_window_open`), else the backend is asked for
//! an interrupt-window exit (SDM Vol. 3C 26.7.5; APM Vol. 2 15.21.4) and
//! delivery happens at that exit. The vector is taken from the PIC (its
//! acknowledge cycle) only at injection, so a vector is never lost.
//!
//! The host clock is read in TSC ticks on the exit path; the devices count
//! in nanoseconds. `Vm::timer_tick` holds the next timer deadline in ticks,
//! so an exit with nothing due costs one comparison.

use vcpu::{Event, Vcpu};

use super::Vm;
use crate::backend::Backend;
use crate::devices::DeviceSet;
use crate::vm::exit::ticks_to_ns;

/// Nanoseconds to TSC ticks of a `hz` clock (saturating).
pub fn ns_to_ticks(ns: u64, hz: u64) -> u64 {
    (u128::from(ns) * u128::from(hz) / 1_000_000_000).min(u128::from(u64::MAX)) as u64
}

/// The VM's clock (ns) at host clock reading `host_ticks` of a `hz` clock,
/// for a VM whose clock runs `offset_ns` ahead of the host's
/// (`Vm::clock_offset_ns`).
pub fn vm_ns(host_ticks: u64, hz: u64, offset_ns: i64) -> u64 {
    (i128::from(ticks_to_ns(host_ticks, hz)) + i128::from(offset_ns)).clamp(0, i128::from(u64::MAX)) as u64
}

/// The devices' next timer deadline in host TSC ticks of a `hz` clock
/// (`u64::MAX`: none): what `Vm::timer_tick` caches. A free function so the
/// exit handlers can call it while they hold the vCPU.
pub fn deadline_ticks(devices: &DeviceSet, hz: u64, offset_ns: i64) -> u64 {
    devices.next_timer().map_or(u64::MAX, |ns| {
        let host_ns = (i128::from(ns) - i128::from(offset_ns)).clamp(0, i128::from(u64::MAX)) as u64;
        ns_to_ticks(host_ns, hz)
    })
}

/// The offset the devices add to their clock's ticks to get the guest's
/// TSC, for a vCPU TSC offset `tsc_offset` (guest TSC minus host TSC):
/// the devices count from the VM's clock, `offset_ns` ahead of the host's.
pub fn device_tsc_offset(tsc_offset: u64, hz: u64, offset_ns: i64) -> u64 {
    let ahead = (i128::from(offset_ns) * i128::from(hz) / 1_000_000_000) as i64;
    tsc_offset.wrapping_sub(ahead as u64)
}

impl<B: Backend> Vm<B> {
    /// After a change of the devices' lines or timers (a port access):
    /// refresh the cached deadline.
    pub fn timers_changed(&mut self, hz: u64) {
        self.timer_tick = deadline_ticks(&self.devices, hz, self.clock_offset_ns);
    }

    /// Fire due timers and hand a pending interrupt to the vCPU (or ask
    /// for the window). `now` is the host clock in TSC ticks.
    // Runs after every exit: the usual answer, nothing due and nothing
    // pending, is two compares here instead of a call (Bochs VT-x: 16
    // instructions of prologue and epilogue per exit).
    #[inline(always)]
    pub fn deliver_interrupts(&mut self, now: u64, hz: u64) {
        if now >= self.timer_tick || self.devices.interrupt_pending() {
            self.fire_and_deliver(now, hz);
        }
    }

    /// Fires the device timers due at host time `now` (TSC ticks of a
    /// `hz` clock) and refreshes the cached deadline; nothing if none is.
    #[inline(always)]
    pub fn fire_due_timers(&mut self, now: u64, hz: u64) {
        if now >= self.timer_tick {
            self.devices.poll_timers(vm_ns(now, hz, self.clock_offset_ns));
            self.timers_changed(hz);
        }
    }

    #[inline(never)]
    fn fire_and_deliver(&mut self, now: u64, hz: u64) {
        self.fire_due_timers(now, hz);
        if !self.devices.interrupt_pending() {
            return;
        }
        let Some(res) = self.res.as_mut() else { return };
        let vcpu = res.vcpu();
        if vcpu.interrupt_window_open() {
            let vector = self.devices.acknowledge_interrupt();
            vcpu.inject(Event::Interrupt { vector });
        } else {
            vcpu.request_interrupt_window();
        }
    }

    /// TSC ticks until the next timer interrupt (`u64::MAX` if none).
    pub fn ticks_to_timer(&self, now: u64) -> u64 {
        self.timer_tick.saturating_sub(now)
    }
}
