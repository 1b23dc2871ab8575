//! Each vCPU's scheduling state in a checkpoint (machine record version 4
//! on): what `vm::vcpu_state` and `vm::smp` need, besides the vCPU's
//! registers (its vCPU record) and its local APIC (device `lapic<i>`), to
//! go on exactly where it was: runnable, halted (with interrupts on or
//! off) or waiting for a startup IPI, and the NMI, INIT and SIPI that IPIs
//! left for it and it has not acted on yet. Vendor-neutral: nothing here
//! is VMCS or VMCB state.
//!
//! A paused VM's vCPUs are saved where their pause parked them, and a
//! restored VM runs (as a one-vCPU VM always did); a running vCPU (none
//! is, between slices) as runnable; a created VM's as `vm start` would
//! leave them.

use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

use crate::devices::{DeviceSet, Signals};
use crate::vm::VcpuSlot;
use crate::vm::vcpu_state::{Parked, VcpuState};

/// Where a vCPU is in its life, as saved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SavedRun {
    Runnable,
    /// Executed HLT; `irq_off`: with RFLAGS.IF clear, so only an NMI, INIT
    /// or SIPI wakes it.
    Halted {
        irq_off: bool,
    },
    /// After INIT (or power-on, for an AP): runs at a startup IPI.
    WaitForSipi,
}

/// One vCPU's scheduling state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedVcpu {
    pub run: SavedRun,
    /// IPIs delivered to it and not yet carried out
    /// (`Vm::take_signals`): an NMI, an INIT, the last SIPI's vector.
    pub nmi: bool,
    pub init: bool,
    pub sipi: Option<u8>,
}

impl SavedVcpu {
    /// vCPU `index`'s state in `slot`, its signals from `devices`.
    pub fn capture<V>(index: usize, slot: &VcpuSlot<V>, devices: &DeviceSet) -> SavedVcpu {
        let parked = |p: Parked| match p {
            Parked::Runnable => SavedRun::Runnable,
            Parked::Halted => SavedRun::Halted { irq_off: slot.halted_irq_off },
            Parked::WaitForSipi => SavedRun::WaitForSipi,
        };
        let run = match slot.state {
            VcpuState::Runnable | VcpuState::Running => SavedRun::Runnable,
            VcpuState::Halted => parked(Parked::Halted),
            VcpuState::WaitForSipi => SavedRun::WaitForSipi,
            VcpuState::Paused(p) => parked(p),
            // `vm start` runs the BSP and parks the APs. (A stopped vCPU
            // belongs to an ended VM, which has nothing to save.)
            VcpuState::Created | VcpuState::Stopped if index == 0 => SavedRun::Runnable,
            VcpuState::Created | VcpuState::Stopped => SavedRun::WaitForSipi,
        };
        let s = devices.signals(index);
        SavedVcpu { run, nmi: s.nmi, init: s.init, sipi: s.sipi }
    }

    /// The vCPU's state and whether it halted with interrupts off.
    pub fn state(&self) -> (VcpuState, bool) {
        match self.run {
            SavedRun::Runnable => (VcpuState::Runnable, false),
            SavedRun::Halted { irq_off } => (VcpuState::Halted, irq_off),
            SavedRun::WaitForSipi => (VcpuState::WaitForSipi, false),
        }
    }

    pub fn signals(&self) -> Signals {
        Signals { nmi: self.nmi, init: self.init, sipi: self.sipi }
    }

    /// What a checkpoint from before version 4 (one vCPU) had: vCPU 0
    /// runnable, nothing pending.
    pub fn legacy() -> Vec<SavedVcpu> {
        alloc::vec![SavedVcpu { run: SavedRun::Runnable, nmi: false, init: false, sipi: None }]
    }
}
