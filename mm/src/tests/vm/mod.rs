//! Behaviour tests of `VmMemory` and the sharing index, on `SimPhys`.

mod basics;
mod dirty;
mod model;
mod reclaim;
mod sampling;
mod sharing;
mod snapshot;

use alloc::vec::Vec;
use core::cell::RefCell;

use crate::addr::GuestPhysAddr;
use crate::paging::{EntryFormat, FlushScope, PageSize};
use crate::sim::SimPhys;
use crate::vm_memory::{Hooks, MemoryMap, VmMemory, VmMemoryConfig};

std::thread_local! {
    static FLUSHES: RefCell<Vec<FlushScope>> = const { RefCell::new(Vec::new()) };
}

/// Record a flush done inside the simulated vCPU's fault loop.
pub(crate) fn record_flush(scope: FlushScope) {
    FLUSHES.with(|f| f.borrow_mut().push(scope));
}

/// Take the flushes recorded so far.
pub(crate) fn take_flushes() -> Vec<FlushScope> {
    FLUSHES.with(|f| core::mem::take(&mut *f.borrow_mut()))
}

pub(crate) type Vm<F> = VmMemory<F, u64>;

/// `mib` MiB of RAM at 0, `vcpus` vCPUs, pages up to `max`.
pub(crate) fn vm<F: EntryFormat>(sim: &mut SimPhys, id: u32, mib: u64, max: PageSize) -> Vm<F> {
    let map = MemoryMap::ram_only(mib << 20).unwrap();
    let config = VmMemoryConfig { id, vcpus: 4, max_page_size: max };
    VmMemory::new(sim, map, config).unwrap()
}

/// Free `vm`, checking nothing leaked.
pub(crate) fn free<F: EntryFormat>(vm: Vm<F>, sim: &mut SimPhys, hooks: &mut Hooks<'_, u64>) {
    // SAFETY: no vCPU runs on the simulated tables; nothing else uses them.
    let report = unsafe { vm.free(sim, hooks, &mut |_| {}) };
    assert_eq!(report.leaked_references, 0);
}

/// A page-sized pattern identifying `tag`.
pub(crate) fn pattern(tag: u64) -> [u8; 4096] {
    let mut p = [0u8; 4096];
    for (i, c) in p.as_chunks_mut::<8>().0.iter_mut().enumerate() {
        *c = (tag.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i as u64).to_le_bytes();
    }
    p
}

pub(crate) const fn g(a: u64) -> GuestPhysAddr {
    GuestPhysAddr(a)
}
