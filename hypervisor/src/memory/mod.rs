//! Host-wide memory services the VMs share: the page-sharing index, the swap
//! device with its thick reservation and the VMs' thin swap files, and the
//! reclaimer's settings. Each VM's own memory (map, page states, nested page
//! table) is an [`mm::VmMemory`] in its `Resources`; operations that need a
//! shared service get it through [`HostMemory::with_hooks`].

pub mod frames;
pub mod lazy;
pub mod postcopy;
pub mod reclaim;
pub mod swap;

use alloc::collections::BTreeMap;
use alloc::string::String;
use mm::hal::FrameAlloc;
use mm::swap::{SwapSlot, VmSwapSpec};
use mm::swap_hook::PageStore;
use mm::vm_memory::{Hooks, PageSource, SharingIndex, VmMemory};

pub use swap::{HostSpace, SharedDisk, Swap, SwapDisk};

/// A VM's memory, paging out to the host swap device.
pub type GuestMemory<F> = VmMemory<F, SwapSlot>;

/// Pages no target may go below: the guest must keep enough resident to
/// make progress between two faults (its code, stack and page tables).
pub const MIN_TARGET_PAGES: u64 = 256;

/// Pages the background sharing scan visits per scheduling round while
/// sharing is on (the operator's CPU budget; `mem sharing on <pages>`).
pub const DEFAULT_SCAN_PAGES_PER_ROUND: usize = 256;

/// Host-wide counters since boot.
#[derive(Clone, Copy, Debug, Default)]
pub struct HostMemStats {
    /// Pages visited by sharing scans.
    pub scanned: u64,
    /// Pages merged into the zero frame or a shared frame.
    pub merged: u64,
    /// Host frames sharing gave back.
    pub frames_freed: u64,
    /// Pages written to swap.
    pub swapped_out: u64,
    /// Pages read back from swap on a guest fault.
    pub swapped_in: u64,
    /// Copy-on-write breaks (a guest wrote to a shared or zero page).
    pub cow_breaks: u64,
    /// Times a guest access found no free frame.
    pub out_of_memory: u64,
    /// VMs stopped because frames ran out and nothing could be reclaimed.
    pub oom_stopped: u64,
}

/// Why the host, or a VM, has no swap space.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NoSwap {
    /// No swap device was given to the host.
    NotAttached,
    /// The disk probe found no disk; what it looked for.
    NoDisk { probe: String },
    /// A disk was found but not taken as the swap device.
    Attach { device: String, error: swap::AttachError },
    /// The swap device has no room for this VM's file (thick provisioning).
    File(mm::Error),
}

impl core::fmt::Display for NoSwap {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            NoSwap::NotAttached => f.write_str("no swap disk attached"),
            NoSwap::NoDisk { probe } => write!(f, "no disk: {probe}"),
            NoSwap::Attach { device, error } => write!(f, "{device}: {error}"),
            NoSwap::File(e) => write!(f, "{e}"),
        }
    }
}

pub struct HostMemory {
    /// The content index (created with the first VM: it needs a frame for
    /// the zero page).
    pub sharing: Option<SharingIndex>,
    /// Background scanning between scheduling rounds.
    pub sharing_enabled: bool,
    pub scan_pages_per_round: usize,
    pub swap: Option<Swap>,
    /// The data disk's space manager (swap runs in its `swap` extent; VM
    /// disk images and checkpoints are its other extents). Present exactly
    /// when `swap` is.
    pub space: Option<HostSpace>,
    /// Why there is no swap device (and no data disk), for reports.
    pub swap_missing: NoSwap,
    pub stats: HostMemStats,
    /// `mem target host`: free host pages to keep, met across VMs by
    /// `mm::reclaim::plan` (`manager::host_reclaim`).
    pub host_target: Option<u64>,
    /// Host clock reading (TSC) of the next planning round.
    pub next_plan_tsc: u64,
    /// The page sources of lazily restored VMs, by VM id, until their
    /// last page is loaded (`vm restore <name> lazy`).
    pub lazy: BTreeMap<u32, lazy::LazySource>,
    /// The page sources of VMs that arrived by post-copy migration, by VM
    /// id, until their last page came from the source host.
    pub postcopy: BTreeMap<u32, postcopy::PostcopyPages>,
}

impl Default for HostMemory {
    fn default() -> Self {
        Self {
            sharing: None,
            sharing_enabled: false,
            scan_pages_per_round: DEFAULT_SCAN_PAGES_PER_ROUND,
            swap: None,
            space: None,
            swap_missing: NoSwap::NotAttached,
            stats: HostMemStats::default(),
            host_target: None,
            next_plan_tsc: 0,
            lazy: BTreeMap::new(),
            postcopy: BTreeMap::new(),
        }
    }
}

impl HostMemory {
    /// Make sure the sharing index exists.
    pub fn ensure_sharing(&mut self, alloc: &mut impl FrameAlloc) -> Result<(), mm::Error> {
        if self.sharing.is_none() {
            self.sharing = Some(SharingIndex::new(alloc)?);
        }
        Ok(())
    }

    /// Run `f` with the hooks VM `vm`'s memory operations need: the sharing
    /// index, the VM's swap file (when it has one) and, for a lazily
    /// restored VM, its checkpoint as the page source: guest faults and
    /// device accesses (virtio DMA through `VmMemory::read`/`write`) alike
    /// load not-loaded pages through it.
    pub fn with_hooks<R>(&mut self, vm: u32, f: impl FnOnce(&mut Hooks<'_, SwapSlot>) -> R) -> R {
        let mut file = self.swap.as_mut().and_then(|s| s.file(vm));
        let store = file.as_mut().map(|f| f as &mut dyn PageStore<Slot = SwapSlot>);
        let source = match self.lazy.get_mut(&vm) {
            Some(s) => Some(s as &mut dyn PageSource),
            None => self.postcopy.get_mut(&vm).map(|s| s as &mut dyn PageSource),
        };
        let mut hooks = Hooks { sharing: self.sharing.as_mut(), store, source };
        f(&mut hooks)
    }

    /// Why VM `vm`'s lazy restore could not read a page, if it failed: one
    /// line naming the checkpoint, the page and the record.
    pub fn lazy_failure(&self, vm: u32) -> Option<&str> {
        self.lazy.get(&vm).and_then(|s| s.failure.as_deref())
    }

    /// The VM still reading checkpoint `name` lazily, if any: the
    /// checkpoint may not be deleted until its fill completes.
    pub fn checkpoint_user(&self, name: &str) -> Option<u32> {
        self.lazy.iter().find(|(_, s)| s.checkpoint == name).map(|(&id, _)| id)
    }

    /// Give VM `vm` a swap file for up to `configured_pages -
    /// MIN_TARGET_PAGES` pages. Returns why not when it gets none (no
    /// device, or the reservation cannot hold it: thick provisioning).
    pub fn add_vm(&mut self, vm: u32, configured_pages: u64) -> Result<(), NoSwap> {
        let Some(swap) = self.swap.as_mut() else {
            return Err(self.swap_missing.clone());
        };
        let spec = VmSwapSpec { vm, configured_pages, reserved_pages: MIN_TARGET_PAGES.min(configured_pages) };
        swap.add_vm(spec)
    }

    /// Drop VM `vm`'s swap file and lazy-restore source (after its memory
    /// was freed).
    pub fn remove_vm(&mut self, vm: u32) {
        self.lazy.remove(&vm);
        self.postcopy.remove(&vm);
        if let Some(swap) = self.swap.as_mut() {
            swap.remove_vm(vm);
        }
    }
}
