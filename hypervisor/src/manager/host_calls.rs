//! Exits a VM away leaves to the boot CPU, handled while the round runs
//! (`docs/smp.md`, "Host calls").
//!
//! A slice on another CPU handles the exits that touch only its VM; one
//! that needs the host's shared state (a nested page fault on RAM or on a
//! virtio device's registers, string I/O) is the boot CPU's, which owns
//! the host's memory, disks and switches. Left for after the round's join,
//! such an exit cost the VM the rest of the round (up to a slice, 10 ms)
//! per disk or network notification. Instead the CPU away *asks*: it
//! releases the vCPU, puts the exit in its slot here and kicks the boot
//! CPU, which *serves* the call at its next exit (or in the join), with
//! the VM as it would after the join, and kicks the CPU back. The VM is
//! the boot CPU's only between the ask and the answer: the CPU away
//! touches neither the VM nor its console lines meanwhile.
//!
//! One slot per job of the round; each job runs on one CPU at a time, so
//! a slot has one asker. States go FREE -> ASKED (the asker, Release) ->
//! ANSWERED (the boot CPU, Release) -> FREE (the asker, after its Acquire).

use alloc::vec::Vec;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU8, AtomicU32, Ordering};
use vcpu::{MemAccess, VmExit};

use super::rounds::{Gang, Lines};
use crate::backend::Backend;
use crate::memory::GuestMemory;
use crate::vm::Vm;
use crate::vm::exit::{FaultTook, Flow};

const FREE: u8 = 0;
const ASKED: u8 = 1;
const ANSWERED: u8 = 2;

/// One exit a CPU away asks the boot CPU to handle.
pub struct Call<B: Backend> {
    /// The VM and the vCPU that exited (released by the asker). Null for
    /// a sibling's fault, which reaches only the VM's memory (`fault`).
    pub vm: *mut Vm<B>,
    pub vcpu: usize,
    pub exit: Option<VmExit>,
    /// The job's console lines, where the handler's lines go (in order
    /// with the guest's own).
    pub lines: *mut Lines,
    /// What the handler answered.
    pub flow: Flow,
    /// The asking CPU, kicked with the answer.
    pub cpu: u32,
    /// A sibling's nested page fault on the VM's RAM: the boot CPU resolves
    /// it in the VM's memory alone, the other siblings running on.
    pub fault: Option<SiblingFault<B>>,
}

/// A sibling's nested page fault on RAM (`rounds::serve_fault`). The
/// sibling keeps its vCPU loaded: the boot CPU touches only the VM's
/// memory, under the gang's lock.
pub struct SiblingFault<B: Backend> {
    pub mem: *mut GuestMemory<B::Format>,
    pub gang: *const Gang,
    pub vm_id: u32,
    pub gpa: u64,
    pub access: MemAccess,
    /// The answer: the mapping was fixed (the sibling retries the access);
    /// if not, nothing changed and the exit waits for the join.
    pub resolved: bool,
    /// What fixing it took, for the VM's counters.
    pub took: FaultTook,
}

struct Slot<B: Backend> {
    state: AtomicU8,
    call: UnsafeCell<Option<Call<B>>>,
}

/// A round's host calls: one slot per job that may run away.
pub struct HostCalls<B: Backend> {
    slots: Vec<Slot<B>>,
    /// Calls asked and not yet served: the boot CPU's look at each exit.
    asked: AtomicU32,
    /// The boot CPU, which the asker kicks.
    boot: u32,
    /// Calls served at an exit of the boot CPU's own slice (the rest were
    /// served while it waited in the join).
    pub served_in_slice: AtomicU32,
}

impl<B: Backend> HostCalls<B> {
    pub fn new(slots: usize, boot: u32) -> Self {
        let slots = (0..slots).map(|_| Slot { state: AtomicU8::new(FREE), call: UnsafeCell::new(None) }).collect();
        HostCalls { slots, asked: AtomicU32::new(0), boot, served_in_slice: AtomicU32::new(0) }
    }

    /// Whether a call waits to be served.
    pub fn asked(&self) -> bool {
        self.asked.load(Ordering::Acquire) != 0
    }

    /// Asks the boot CPU to handle `call` and waits (halted, woken by the
    /// answer's kick; a millisecond's timer is the backstop) for its
    /// answer: the call back, with the flow the handler gave (and a
    /// fault's outcome). An unknown slot answers
    /// `None` at once, having asked nothing.
    ///
    /// # Safety
    /// Slot `k` is the calling job's alone, and until this returns the
    /// caller touches neither `call.vm` nor `call.lines` (the boot CPU
    /// handles the exit with them), nor a fault's memory.
    pub unsafe fn ask(&self, k: usize, call: Call<B>, backend: &B) -> Option<Call<B>> {
        let slot = self.slots.get(k)?;
        // SAFETY: FREE: nobody else reads or writes the call now.
        unsafe { *slot.call.get() = Some(call) };
        slot.state.store(ASKED, Ordering::Release);
        self.asked.fetch_add(1, Ordering::AcqRel);
        backend.kick(self.boot);
        let wait = (backend.tsc_hz() / 1000).max(1);
        while slot.state.load(Ordering::Acquire) != ANSWERED {
            // A kick sent since the load ends the halt at once.
            backend.halt_until(backend.now().saturating_add(wait));
            core::hint::spin_loop();
        }
        // SAFETY: ANSWERED, seen with Acquire: the boot CPU is done with
        // the call and touches it no more.
        let answer = unsafe { (*slot.call.get()).take() };
        slot.state.store(FREE, Ordering::Relaxed);
        answer
    }

    /// On the boot CPU: handles every call asked with `handle`, which
    /// sets each one's `flow`, and kicks each asker with its answer.
    /// Returns how many it served.
    pub fn serve(&self, backend: &mut B, mut handle: impl FnMut(&mut Call<B>, &mut B)) -> u32 {
        let mut served = 0;
        for slot in &self.slots {
            if slot.state.load(Ordering::Acquire) != ASKED {
                continue;
            }
            // SAFETY: ASKED, seen with Acquire: the asker wrote the call and
            // waits for the answer without touching it.
            let Some(call) = (unsafe { &mut *slot.call.get() }).as_mut() else { continue };
            handle(call, backend);
            let cpu = call.cpu;
            self.asked.fetch_sub(1, Ordering::AcqRel);
            slot.state.store(ANSWERED, Ordering::Release);
            backend.kick(cpu);
            served += 1;
        }
        served
    }
}
