//! virtio-balloon, the traditional memory balloon (device ID 5, virtio 1.2
//! 5.5): the host sets a target of 4 KiB pages it wants the guest to give
//! up (`num_pages`, 5.5.4); the driver gives pages up through inflateq and
//! takes them back through deflateq as lists of page frame numbers
//! (5.5.6), reports its memory statistics through statsq (5.5.6.3) and
//! hands free memory over for a moment through reporting_vq (free page
//! reporting, 5.5.6.6).
//!
//! The device only parses and bounds what the guest sends: it turns each
//! inflate, deflate or reporting chain into a [`BalloonAction`] of guest
//! physical addresses. Whether an address is RAM, a page already ballooned
//! or one repeated is for the memory manager (`mm`'s `balloon_inflate` /
//! `balloon_deflate` refuse bad pages one by one); the device never touches
//! the pages themselves.
//!
//! # Applying actions (the contract with the VM wiring)
//!
//! A chain stays with the device, not in the used ring, until the host has
//! applied its action: the guest reuses memory as soon as it gets a buffer
//! back (a reported range at once, 5.5.6.6; deflated pages, 5.5.6.1), so a
//! discard applied after the return could destroy data another vCPU has
//! written meanwhile. The order is:
//!
//! 1. a guest notification (or [`VirtioMmio::device_work`]) records actions
//!    and holds their chains ([`Balloon::needs_service`] turns true);
//! 2. the host takes them ([`Balloon::take_actions`], oldest first) and
//!    applies every one of them to `mm`, in order;
//! 3. only then the chains go back: the next run of their queue pushes them
//!    used (with an interrupt if the driver wants one).
//!
//! [`VirtioMmio::balloon_service`] does the three steps under one `&mut`
//! borrow, so nothing can run the queues between taking and applying; the
//! wiring calls it after every MMIO write to the device that leaves
//! `needs_service` true, and after a restore, in the same VM exit, before
//! that vCPU enters the guest again. Holding the chains (rather than
//! relying on "the guest does not run before the host applies") is what
//! keeps it right with several vCPUs: another vCPU may poll the used ring
//! at any time. MUST_TELL_HOST (5.5.3) is thereby honoured without being
//! offered: no deflate chain returns before the host acted on it.
//!
//! # Queue numbering
//!
//! The spec numbers the queues 0 inflateq, 1 deflateq, 2 statsq, 3
//! free_page_vq, 4 reporting_vq, each past the second existing only with
//! its feature (5.5.2). Linux's `virtio_mmio` (`vm_find_vqs`) gives
//! indices only to queues that exist, so reporting_vq is 2 without
//! STATS_VQ and 3 with it; the device maps indices from the negotiated
//! features the same way ([`BalloonQueue::at`]).
//!
//! Every VM has one (`devices::virtio_slots`); `vm::mmio` applies its
//! actions to `mm` (`Vm::service_balloon`) and `vm balloon <id> <MiB>` sets
//! its target.

use alloc::vec::Vec;
use core::mem;
use serde::{Deserialize, Serialize};

use super::mmio::VirtioMmio;
use super::queue::{Chain, Queue, QueueError};
use super::{GuestMemory, VirtioDevice};
use crate::devices::persist::{Invalid, Persist};

/// The balloon's device ID (5, "Device Types").
pub const DEVICE_ID: u32 = 5;
/// Entries per queue. Linux refuses a reporting queue shorter than its
/// PAGE_REPORTING_CAPACITY (32); QEMU's queues are 128 too.
pub const QUEUE_SIZE: u16 = 128;
/// The balloon's page size whatever the guest's (VIRTIO_BALLOON_PFN_SHIFT,
/// 5.5.6).
pub const PAGE_SIZE: u64 = 4096;
const PFN_SHIFT: u32 = 12;
/// PFNs one inflate or deflate chain may carry: Linux sends at most
/// VIRTIO_BALLOON_ARRAY_PFNS_MAX (256) at a time. More is a protocol error,
/// so one notification's work stays bounded.
pub const MAX_PFNS: usize = 256;
/// Ranges one reporting chain may carry: Linux sends at most
/// PAGE_REPORTING_CAPACITY (32); more is a protocol error.
pub const MAX_RANGES: usize = 256;
/// Chains the device holds for the host (actions not yet applied, or
/// applied and not yet returned). Linux has at most one chain in flight
/// per queue; past this the device takes no more chains until the host
/// drains it, so a host that never does cannot grow the heap.
pub const MAX_HELD: usize = 16;
/// Statistics entries read from one buffer (Linux sends 16 at most); the
/// rest of a longer buffer is ignored.
pub const MAX_STATS: usize = 64;
/// Bytes of one statistics entry: le16 tag, le64 value, packed (5.5.6.3).
const STAT_LEN: usize = 10;
/// Rounds of take, apply and run in one [`VirtioMmio::balloon_service`]:
/// the guest may keep queueing chains from other vCPUs while the host
/// serves, so the loop is bounded; what is left waits for the next call.
const SERVICE_ROUNDS: usize = 8;

/// Feature bits (5.5.3).
pub mod feature {
    /// The driver must tell the host before reusing deflated pages.
    pub const MUST_TELL_HOST: u64 = 1 << 0;
    /// statsq exists.
    pub const STATS_VQ: u64 = 1 << 1;
    /// The driver may deflate on its own under memory pressure.
    pub const DEFLATE_ON_OOM: u64 = 1 << 2;
    /// free_page_vq exists (hinting for migration).
    pub const FREE_PAGE_HINT: u64 = 1 << 3;
    /// poison_val is in the configuration space.
    pub const PAGE_POISON: u64 = 1 << 4;
    /// reporting_vq exists.
    pub const PAGE_REPORTING: u64 = 1 << 5;
    /// What the device offers:
    /// - STATS_VQ: the host's view of guest memory pressure.
    /// - DEFLATE_ON_OOM: a guest about to OOM-kill should rather take its
    ///   pages back (it reports them on deflateq, which the host applies
    ///   like any deflate); the VM's RAM size is what the host promised.
    /// - PAGE_REPORTING: free memory goes back to the host without a target.
    ///
    /// Not MUST_TELL_HOST (the device holds deflate chains until applied
    /// anyway), nor FREE_PAGE_HINT (a migration aid with its own command
    /// protocol), nor PAGE_POISON (reported pages come back zeroed, so a
    /// guest that poisons free pages must not report them; Linux then
    /// turns reporting off itself).
    pub const OFFERED: u64 = STATS_VQ | DEFLATE_ON_OOM | PAGE_REPORTING;
}

/// Statistics tags (5.5.6.3.3; 10-15 are Linux's later additions).
pub mod tag {
    pub const SWAP_IN: u16 = 0;
    pub const SWAP_OUT: u16 = 1;
    pub const MAJFLT: u16 = 2;
    pub const MINFLT: u16 = 3;
    pub const MEMFREE: u16 = 4;
    pub const MEMTOT: u16 = 5;
    pub const AVAIL: u16 = 6;
    pub const CACHES: u16 = 7;
    pub const HTLB_PGALLOC: u16 = 8;
    pub const HTLB_PGFAIL: u16 = 9;
    pub const OOM_KILL: u16 = 10;
    pub const ALLOC_STALL: u16 = 11;
    pub const ASYNC_SCAN: u16 = 12;
    pub const DIRECT_SCAN: u16 = 13;
    pub const ASYNC_RECLAIM: u16 = 14;
    pub const DIRECT_RECLAIM: u16 = 15;
}

/// The balloon's queues.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BalloonQueue {
    Inflate,
    Deflate,
    Stats,
    Reporting,
}

impl BalloonQueue {
    pub const ALL: [BalloonQueue; 4] =
        [BalloonQueue::Inflate, BalloonQueue::Deflate, BalloonQueue::Stats, BalloonQueue::Reporting];

    /// The queues that exist with `features` negotiated, in index order.
    fn present(features: u64) -> impl Iterator<Item = BalloonQueue> {
        Self::ALL.into_iter().filter(move |q| match q {
            BalloonQueue::Inflate | BalloonQueue::Deflate => true,
            BalloonQueue::Stats => features & feature::STATS_VQ != 0,
            BalloonQueue::Reporting => features & feature::PAGE_REPORTING != 0,
        })
    }

    /// The queue at transport index `index` with `features` negotiated:
    /// indices count existing queues only (Linux's `vm_find_vqs`).
    pub fn at(index: usize, features: u64) -> Option<BalloonQueue> {
        Self::present(features).nth(index)
    }

    /// This queue's transport index with `features`, if it exists.
    pub fn index(self, features: u64) -> Option<usize> {
        Self::present(features).position(|q| q == self)
    }
}

/// What the guest asked for, for the host to apply to `mm`. Addresses are
/// guest-physical and 4 KiB aligned; nothing in them is checked against
/// RAM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BalloonAction {
    /// Pages the guest gave up (5.5.6.1): `balloon_inflate`.
    Inflate(Vec<u64>),
    /// Pages the guest takes back (5.5.6.1): `balloon_deflate`.
    Deflate(Vec<u64>),
    /// Free ranges (address, length) whose content the host may drop
    /// (5.5.6.6). Not balloon pages: the guest uses them again as soon as
    /// the chain is back and must then find them zeroed (or unchanged), so
    /// the host discards their backing and backs a later touch afresh; it
    /// must not count them against the balloon target.
    Report(Vec<(u64, u64)>),
}

impl BalloonAction {
    /// The queue its chain came on.
    pub fn queue(&self) -> BalloonQueue {
        match self {
            BalloonAction::Inflate(_) => BalloonQueue::Inflate,
            BalloonAction::Deflate(_) => BalloonQueue::Deflate,
            BalloonAction::Report(_) => BalloonQueue::Reporting,
        }
    }

    /// Whether the action is one the device could have made.
    fn check(&self) -> Result<(), Invalid> {
        match self {
            BalloonAction::Inflate(gpas) | BalloonAction::Deflate(gpas) => {
                if gpas.is_empty() || gpas.len() > MAX_PFNS {
                    return Err(Invalid("a balloon action holds no pages or more than a chain carries"));
                }
                // A PFN is 32 bits: addresses below 2^44, page aligned.
                if gpas.iter().any(|&g| !g.is_multiple_of(PAGE_SIZE) || g >> (32 + PFN_SHIFT) != 0) {
                    return Err(Invalid("a balloon page address is not a 4 KiB page frame"));
                }
            }
            BalloonAction::Report(ranges) => {
                if ranges.is_empty() || ranges.len() > MAX_RANGES {
                    return Err(Invalid("a report holds no ranges or more than a chain carries"));
                }
                let bad = |&(gpa, len): &(u64, u64)| {
                    !gpa.is_multiple_of(PAGE_SIZE)
                        || !len.is_multiple_of(PAGE_SIZE)
                        || len == 0
                        || gpa.checked_add(len).is_none()
                };
                if ranges.iter().any(bad) {
                    return Err(Invalid("a reported range is not whole pages"));
                }
            }
        }
        Ok(())
    }
}

/// A chain the device holds until the host applied its action.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingAction {
    /// The chain's head, reported back in the used ring once applied.
    pub head: u16,
    pub action: BalloonAction,
}

/// The guest's memory statistics from one stats buffer (5.5.6.3.3), each
/// `None` if the buffer did not carry its tag. Memory amounts are in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonStats {
    pub swap_in: Option<u64>,
    pub swap_out: Option<u64>,
    pub major_faults: Option<u64>,
    pub minor_faults: Option<u64>,
    pub free_memory: Option<u64>,
    pub total_memory: Option<u64>,
    pub available_memory: Option<u64>,
    pub disk_caches: Option<u64>,
    pub hugetlb_allocations: Option<u64>,
    pub hugetlb_failures: Option<u64>,
    pub oom_kills: Option<u64>,
    pub alloc_stalls: Option<u64>,
    pub async_scans: Option<u64>,
    pub direct_scans: Option<u64>,
    pub async_reclaims: Option<u64>,
    pub direct_reclaims: Option<u64>,
}

impl BalloonStats {
    /// Take one entry; unknown tags are ignored (5.5.6.3.2).
    fn set(&mut self, t: u16, v: u64) {
        let field = match t {
            tag::SWAP_IN => &mut self.swap_in,
            tag::SWAP_OUT => &mut self.swap_out,
            tag::MAJFLT => &mut self.major_faults,
            tag::MINFLT => &mut self.minor_faults,
            tag::MEMFREE => &mut self.free_memory,
            tag::MEMTOT => &mut self.total_memory,
            tag::AVAIL => &mut self.available_memory,
            tag::CACHES => &mut self.disk_caches,
            tag::HTLB_PGALLOC => &mut self.hugetlb_allocations,
            tag::HTLB_PGFAIL => &mut self.hugetlb_failures,
            tag::OOM_KILL => &mut self.oom_kills,
            tag::ALLOC_STALL => &mut self.alloc_stalls,
            tag::ASYNC_SCAN => &mut self.async_scans,
            tag::DIRECT_SCAN => &mut self.direct_scans,
            tag::ASYNC_RECLAIM => &mut self.async_reclaims,
            tag::DIRECT_RECLAIM => &mut self.direct_reclaims,
            _ => return,
        };
        *field = Some(v);
    }
}

/// The balloon's state, as plain data (what [`Persist`] saves).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonState {
    /// `num_pages`: the host's target, in 4 KiB pages.
    pub target: u32,
    /// `actual`: what the driver last wrote (pages it says it holds).
    pub actual: u32,
    /// The device feature bits the driver accepted (0 until DRIVER_OK):
    /// they decide which queue an index is.
    pub features: u64,
    /// Chains whose actions the host has not taken yet, oldest first.
    pub pending: Vec<PendingAction>,
    /// Chains whose actions the host took (and applied): pushed used at
    /// the next run of their queue.
    pub done: Vec<(BalloonQueue, u16)>,
    /// The latest statistics and how many buffers have brought statistics
    /// (the host notes the time it sees this move).
    pub stats: Option<BalloonStats>,
    pub stats_sequence: u64,
    /// The stats buffer the device holds until the host wants fresh values.
    pub stats_head: Option<u16>,
    /// The host asked for fresh statistics: return the held buffer at the
    /// next run of statsq.
    pub stats_requested: bool,
    /// statsq has not run since DRIVER_OK: Linux posts its first stats
    /// buffer and notifies before it sets DRIVER_OK, when the transport
    /// ignores notifications, so the host runs the queue once.
    pub stats_poll: bool,
}

/// The balloon device.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Balloon {
    s: BalloonState,
}

impl Balloon {
    /// A balloon with a target of 0 pages.
    pub fn new() -> Self {
        Self::default()
    }

    /// The target in 4 KiB pages (`num_pages`).
    pub fn target(&self) -> u32 {
        self.s.target
    }

    /// Set the target; whether it changed, i.e. whether the driver needs a
    /// configuration change notification
    /// ([`VirtioMmio::balloon_set_target`] sends it).
    pub fn set_target(&mut self, pages: u32) -> bool {
        let changed = self.s.target != pages;
        self.s.target = pages;
        changed
    }

    /// The pages the driver last said it holds (`actual`). Information
    /// only: `mm`'s own count is the truth.
    pub fn actual(&self) -> u32 {
        self.s.actual
    }

    /// The device features the driver accepted.
    pub fn negotiated(&self) -> u64 {
        self.s.features
    }

    /// Queue `q`'s transport index as negotiated, if it exists.
    pub fn queue_index(&self, q: BalloonQueue) -> Option<usize> {
        q.index(self.s.features)
    }

    /// The latest statistics, `None` until a stats buffer arrived.
    pub fn stats(&self) -> Option<BalloonStats> {
        self.s.stats
    }

    /// How many stats buffers have arrived: moves with every update.
    pub fn stats_sequence(&self) -> u64 {
        self.s.stats_sequence
    }

    /// Ask for fresh statistics: true if the device holds a stats buffer,
    /// which the next run of statsq gives back for the driver to refill
    /// (5.5.6.3); [`VirtioMmio::balloon_request_stats`] runs it. False if
    /// it holds none (no STATS_VQ, or the driver is refilling it and fresh
    /// values are on their way anyway).
    pub fn request_stats(&mut self) -> bool {
        self.s.stats_requested = self.s.stats_head.is_some();
        self.s.stats_requested
    }

    /// Whether the host has work here: actions to apply, applied chains to
    /// return, a stats buffer to return or statsq to poll.
    pub fn needs_service(&self) -> bool {
        let s = &self.s;
        !s.pending.is_empty() || !s.done.is_empty() || s.stats_poll || (s.stats_requested && s.stats_head.is_some())
    }

    /// The actions recorded since the last call, oldest first. The caller
    /// MUST apply all of them, in order, before anything runs the balloon's
    /// queues again: their chains go back to the guest at the next run
    /// (see the module documentation; [`VirtioMmio::balloon_service`]
    /// does it all).
    pub fn take_actions(&mut self) -> Vec<BalloonAction> {
        let taken = mem::take(&mut self.s.pending);
        self.s.done.extend(taken.iter().map(|p| (p.action.queue(), p.head)));
        taken.into_iter().map(|p| p.action).collect()
    }

    /// Chains held for the host, either way.
    fn held(&self) -> usize {
        self.s.pending.len() + self.s.done.len()
    }

    /// Give back the chains of `q` whose actions were applied (5.5.6: the
    /// device writes nothing into them).
    fn return_done(&mut self, q: BalloonQueue, queue: &mut Queue, mem: &mut dyn GuestMemory) -> Result<(), QueueError> {
        while let Some(i) = self.s.done.iter().position(|&(dq, _)| dq == q) {
            queue.push_used(mem, self.s.done[i].1, 0)?;
            self.s.done.remove(i);
        }
        Ok(())
    }

    /// inflateq, deflateq, reporting_vq: turn chains into pending actions,
    /// as many as the device may hold. A chain with nothing for the host
    /// goes back at once.
    fn take_chains(&mut self, q: BalloonQueue, queue: &mut Queue, mem: &mut dyn GuestMemory) -> Result<(), QueueError> {
        // Full: the rest stays available until the host drains (then
        // `balloon_service` runs the queue again).
        while self.held() < MAX_HELD {
            let Some(chain) = queue.pop(mem)? else { return Ok(()) };
            // A head the device still holds, published again: the driver
            // broke the ring protocol (two copies would apply twice and
            // could not be saved).
            if self.s.pending.iter().any(|p| p.action.queue() == q && p.head == chain.head) {
                queue.undo_pop();
                return Err(QueueError::HeadInUse { head: chain.head });
            }
            let parsed = match q {
                BalloonQueue::Inflate => read_pfns(&chain, mem).map(|p| p.map(BalloonAction::Inflate)),
                BalloonQueue::Deflate => read_pfns(&chain, mem).map(|p| p.map(BalloonAction::Deflate)),
                _ => read_ranges(&chain).map(|r| r.map(BalloonAction::Report)),
            };
            match parsed {
                Err(e) => {
                    // Refused whole: the queue stays as the guest left it.
                    queue.undo_pop();
                    return Err(e);
                }
                Ok(None) => queue.push_used(mem, chain.head, 0)?,
                Ok(Some(action)) => self.s.pending.push(PendingAction { head: chain.head, action }),
            }
        }
        Ok(())
    }

    /// statsq (5.5.6.3): give the held buffer back if the host asked, then
    /// read and hold what the driver posted.
    fn stats_queue(&mut self, queue: &mut Queue, mem: &mut dyn GuestMemory) -> Result<(), QueueError> {
        self.s.stats_poll = false;
        if mem::take(&mut self.s.stats_requested)
            && let Some(head) = self.s.stats_head.take()
        {
            queue.push_used(mem, head, 0)?;
        }
        while let Some(chain) = queue.pop(mem)? {
            if !chain.writable.is_empty() {
                queue.undo_pop();
                return Err(QueueError::Direction);
            }
            let stats = read_stats(&chain, mem)?;
            // One buffer held at most: a driver that posts another (Linux
            // never does) gets the older one back.
            if let Some(old) = self.s.stats_head.replace(chain.head) {
                queue.push_used(mem, old, 0)?;
            }
            self.s.stats = Some(stats);
            self.s.stats_sequence += 1;
        }
        Ok(())
    }
}

/// The readable bytes of `chain` as one stream, at most `max` of them.
fn read_readable(chain: &Chain, mem: &mut dyn GuestMemory, max: usize) -> Result<Vec<u8>, QueueError> {
    let mut bytes = Vec::new();
    for b in &chain.readable {
        let n = (b.len as usize).min(max - bytes.len());
        if n == 0 {
            break;
        }
        let at = bytes.len();
        bytes.resize(at + n, 0);
        mem.read(b.gpa, &mut bytes[at..])?;
    }
    Ok(bytes)
}

/// An inflate or deflate chain: device-readable le32 PFNs (5.5.6), as page
/// addresses; `None` if it holds none. A PFN may straddle two buffers; a
/// partial one at the end is ignored.
fn read_pfns(chain: &Chain, mem: &mut dyn GuestMemory) -> Result<Option<Vec<u64>>, QueueError> {
    if !chain.writable.is_empty() {
        return Err(QueueError::Direction);
    }
    let len = chain.readable_len();
    if len as usize > MAX_PFNS * 4 {
        // No error variant says "too many entries"; the log line does.
        log::warn!("virtio-balloon: a chain of {} PFNs, more than {MAX_PFNS}", len / 4);
        return Err(QueueError::ChainTooLarge);
    }
    let bytes = read_readable(chain, mem, MAX_PFNS * 4)?;
    let gpas: Vec<u64> =
        bytes.as_chunks::<4>().0.iter().map(|&c| u64::from(u32::from_le_bytes(c)) << PFN_SHIFT).collect();
    Ok((!gpas.is_empty()).then_some(gpas))
}

/// A reporting chain: device-writable buffers, each a free range (5.5.6.6;
/// Linux's `virtballoon_free_page_report` adds them with
/// `virtqueue_add_inbuf`). The device writes nothing into them; only the
/// whole 4 KiB pages inside each are reported. `None` if there are none.
fn read_ranges(chain: &Chain) -> Result<Option<Vec<(u64, u64)>>, QueueError> {
    if !chain.readable.is_empty() {
        return Err(QueueError::Direction);
    }
    if chain.writable.len() > MAX_RANGES {
        log::warn!("virtio-balloon: a report of {} ranges, more than {MAX_RANGES}", chain.writable.len());
        return Err(QueueError::ChainTooLarge);
    }
    let ranges: Vec<(u64, u64)> = chain
        .writable
        .iter()
        .filter_map(|b| {
            let start = b.gpa.checked_next_multiple_of(PAGE_SIZE)?;
            let end = b.gpa.checked_add(b.len.into())? / PAGE_SIZE * PAGE_SIZE;
            (end > start).then(|| (start, end - start))
        })
        .collect();
    Ok((!ranges.is_empty()).then_some(ranges))
}

/// A stats buffer: packed (le16 tag, le64 value) entries (5.5.6.3); a
/// partial entry at the end is ignored, as is anything past [`MAX_STATS`]
/// entries.
fn read_stats(chain: &Chain, mem: &mut dyn GuestMemory) -> Result<BalloonStats, QueueError> {
    let bytes = read_readable(chain, mem, MAX_STATS * STAT_LEN)?;
    let mut stats = BalloonStats::default();
    for &[t0, t1, v @ ..] in bytes.as_chunks::<STAT_LEN>().0 {
        stats.set(u16::from_le_bytes([t0, t1]), u64::from_le_bytes(v));
    }
    Ok(stats)
}

impl VirtioDevice for Balloon {
    const DEVICE_ID: u32 = DEVICE_ID;
    /// inflateq, deflateq, statsq, reporting_vq: the most there can be
    /// with the features offered (no free_page_vq).
    const QUEUES: usize = 4;
    const QUEUE_MAX_SIZE: u16 = QUEUE_SIZE;

    fn features(&self) -> u64 {
        feature::OFFERED
    }

    /// `num_pages` at 0, `actual` at 4 (5.5.4); the fields after them exist
    /// only with features not offered and read 0.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; 8];
        config[..4].copy_from_slice(&self.s.target.to_le_bytes());
        config[4..].copy_from_slice(&self.s.actual.to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset.checked_add(i as u64).and_then(|o| usize::try_from(o).ok());
            *b = at.and_then(|o| config.get(o)).copied().unwrap_or(0);
        }
    }

    /// Only `actual` is the driver's to write (5.5.4); the bytes of a write
    /// that fall on it are taken, the rest ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let mut actual = self.s.actual.to_le_bytes();
        for (i, &b) in data.iter().enumerate() {
            if let Some(k) = offset.checked_add(i as u64).and_then(|o| o.checked_sub(4))
                && let Some(slot) = usize::try_from(k).ok().and_then(|k| actual.get_mut(k))
            {
                *slot = b;
            }
        }
        self.s.actual = u32::from_le_bytes(actual);
    }

    fn activate(&mut self, features: u64) {
        self.s.features = features & feature::OFFERED;
        self.s.stats_poll = self.s.features & feature::STATS_VQ != 0;
    }

    /// The queues are gone, and with them every chain the device held.
    /// Actions not yet applied are dropped too, which is safe for each
    /// kind: an inflate not applied leaves the page backed, a deflate not
    /// applied leaves it ballooned until the guest touches it, a report
    /// not applied discards nothing. The target, `actual` and the last
    /// statistics are kept.
    fn reset(&mut self) {
        let s = &mut self.s;
        s.features = 0;
        s.pending.clear();
        s.done.clear();
        s.stats_head = None;
        s.stats_requested = false;
        s.stats_poll = false;
    }

    fn notify(&mut self, index: usize, queue: &mut Queue, mem: &mut dyn GuestMemory) -> Result<(), QueueError> {
        // An index no negotiated queue has: Linux never sets one up;
        // nothing to do for it.
        let Some(q) = BalloonQueue::at(index, self.s.features) else { return Ok(()) };
        if q == BalloonQueue::Stats {
            return self.stats_queue(queue, mem);
        }
        self.return_done(q, queue, mem)?;
        self.take_chains(q, queue, mem)
    }
}

/// Host operations on a balloon in its transport: what the VM wiring calls.
impl VirtioMmio<Balloon> {
    /// Set the balloon target (4 KiB pages) and, if it changed, tell the
    /// driver (a configuration change notification once it is up, 2.4.2).
    pub fn balloon_set_target(&mut self, pages: u32) {
        if self.device_mut().set_target(pages) {
            self.config_changed();
        }
    }

    /// Ask the driver for fresh statistics: return the held stats buffer
    /// now (with an interrupt); the driver refills and posts it, and
    /// [`Balloon::stats`] changes when it arrives. False if there was no
    /// buffer to return.
    pub fn balloon_request_stats(&mut self, mem: &mut dyn GuestMemory) -> bool {
        if !self.device_mut().request_stats() {
            return false;
        }
        if let Some(i) = self.device().queue_index(BalloonQueue::Stats) {
            self.device_work(i, mem);
        }
        true
    }

    /// Apply what the guest asked for and give its chains back: take the
    /// pending actions, pass each to `apply` in order (which applies it to
    /// `mm` before returning), then run every queue, which returns the
    /// applied chains and takes new ones. Call it after each MMIO write
    /// that leaves [`Balloon::needs_service`] true, and after a restore,
    /// before the vCPU enters the guest again; then drive the interrupt
    /// line as after any write.
    pub fn balloon_service(&mut self, mem: &mut dyn GuestMemory, apply: &mut dyn FnMut(BalloonAction)) {
        for _ in 0..SERVICE_ROUNDS {
            for action in self.device_mut().take_actions() {
                apply(action);
            }
            self.balloon_run_queues(mem);
            if self.device().s.pending.is_empty() {
                break;
            }
        }
    }

    /// Step 3 alone, for a host that applies actions with the guest's
    /// memory borrowed elsewhere (`mm` itself): every action
    /// [`Balloon::take_actions`] returned must have been applied first.
    /// Returns applied chains and takes new ones.
    pub fn balloon_run_queues(&mut self, mem: &mut dyn GuestMemory) {
        for q in BalloonQueue::ALL {
            if let Some(i) = self.device().queue_index(q) {
                self.device_work(i, mem);
            }
        }
    }
}

impl Persist for Balloon {
    type State = BalloonState;
    const STATE_VERSION: u16 = 1;

    fn save(&self) -> BalloonState {
        self.s.clone()
    }

    fn validate(s: &BalloonState) -> Result<(), Invalid> {
        if s.features & !feature::OFFERED != 0 {
            return Err(Invalid("the balloon's features are not ones it offers"));
        }
        if s.pending.len() + s.done.len() > MAX_HELD {
            return Err(Invalid("the balloon holds more chains than it keeps"));
        }
        let exists = |q: BalloonQueue| q.index(s.features).is_some();
        let mut held: Vec<(BalloonQueue, u16)> = Vec::new();
        for p in &s.pending {
            p.action.check()?;
            held.push((p.action.queue(), p.head));
        }
        for &(q, head) in &s.done {
            if q == BalloonQueue::Stats {
                return Err(Invalid("a stats buffer among the applied chains"));
            }
            held.push((q, head));
        }
        if let Some(head) = s.stats_head {
            held.push((BalloonQueue::Stats, head));
        }
        for (i, &(q, head)) in held.iter().enumerate() {
            if head >= QUEUE_SIZE {
                return Err(Invalid("a held chain's head is outside its queue"));
            }
            if !exists(q) {
                return Err(Invalid("a held chain is on a queue the features do not give"));
            }
            if held[..i].contains(&(q, head)) {
                return Err(Invalid("a chain is held twice"));
            }
        }
        if s.stats_requested && s.stats_head.is_none() {
            return Err(Invalid("stats requested with no stats buffer held"));
        }
        if s.stats_poll && !exists(BalloonQueue::Stats) {
            return Err(Invalid("a stats poll without a stats queue"));
        }
        if s.stats.is_some() != (s.stats_sequence > 0) {
            return Err(Invalid("the stats sequence does not match the stats held"));
        }
        Ok(())
    }

    fn restore(&mut self, s: BalloonState) {
        self.s = s;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::VecMemory;
    use crate::devices::virtio::feature::VERSION_1;
    use crate::devices::virtio::mmio::{interrupt, reg, status};
    use crate::devices::virtio::queue::{VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};

    /// Queue sizes the mock driver sets (enough to overfill the device).
    const SIZE: u16 = 32;
    /// Where the buffers go.
    const BUF: u64 = 0x10000;
    const UP: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

    /// Queue `i`'s rings: descriptors at its base, avail at +0x800, used at
    /// +0xa00.
    fn base(i: usize) -> u64 {
        0x1000 * (i as u64 + 1)
    }

    /// Linux's virtio_mmio + virtio_ring, by hand, for one balloon.
    struct Driver {
        d: VirtioMmio<Balloon>,
        mem: VecMemory,
        queues: usize,
        /// Per queue: avail idx and next free descriptor.
        avail: [u16; 4],
        next_desc: [u16; 4],
    }

    impl Driver {
        /// Negotiate `features` (device bits) and set up as many queues as
        /// they give, in Linux's compacted order; `before_ok` runs between
        /// queue setup and DRIVER_OK (Linux posts its stats buffer there).
        fn up_with(features: u64, before_ok: impl FnOnce(&mut Driver)) -> Driver {
            let mut mem = VecMemory::new(0, 0x40000);
            let mut d = VirtioMmio::new(Balloon::new());
            assert_eq!(d.read(reg::DEVICE_ID, 4), 5);
            d.write(reg::STATUS, 4, u64::from(status::ACKNOWLEDGE | status::DRIVER), &mut mem);
            d.write(reg::DEVICE_FEATURES_SEL, 4, 0, &mut mem);
            let offered = d.read(reg::DEVICE_FEATURES, 4) & feature::OFFERED;
            assert_eq!(offered, feature::STATS_VQ | feature::DEFLATE_ON_OOM | feature::PAGE_REPORTING);
            d.write(reg::DRIVER_FEATURES_SEL, 4, 0, &mut mem);
            d.write(reg::DRIVER_FEATURES, 4, features, &mut mem);
            d.write(reg::DRIVER_FEATURES_SEL, 4, 1, &mut mem);
            d.write(reg::DRIVER_FEATURES, 4, VERSION_1 >> 32, &mut mem);
            d.write(reg::STATUS, 4, u64::from(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK), &mut mem);
            let queues = BalloonQueue::present(features).count();
            for i in 0..queues {
                d.write(reg::QUEUE_SEL, 4, i as u64, &mut mem);
                d.write(reg::QUEUE_NUM, 4, SIZE.into(), &mut mem);
                d.write(reg::QUEUE_DESC_LOW, 4, base(i), &mut mem);
                d.write(reg::QUEUE_DRIVER_LOW, 4, base(i) + 0x800, &mut mem);
                d.write(reg::QUEUE_DEVICE_LOW, 4, base(i) + 0xa00, &mut mem);
                d.write(reg::QUEUE_READY, 4, 1, &mut mem);
            }
            let mut drv = Driver { d, mem, queues, avail: [0; 4], next_desc: [0; 4] };
            before_ok(&mut drv);
            drv.d.write(reg::STATUS, 4, u64::from(UP), &mut drv.mem);
            assert_eq!(drv.d.read(reg::STATUS, 4), u64::from(UP));
            drv
        }

        fn up(features: u64) -> Driver {
            Self::up_with(features, |_| {})
        }

        /// Post a chain of `(gpa, len, writable)` buffers on queue `q`
        /// (not notified); its head.
        fn post(&mut self, q: usize, bufs: &[(u64, u32, bool)]) -> u16 {
            assert!(q < self.queues);
            let head = self.next_desc[q];
            for (k, &(gpa, len, w)) in bufs.iter().enumerate() {
                let i = self.next_desc[q];
                self.next_desc[q] += 1;
                let mut flags = if w { VIRTQ_DESC_F_WRITE } else { 0 };
                if k + 1 < bufs.len() {
                    flags |= VIRTQ_DESC_F_NEXT;
                }
                let at = (base(q) + 16 * u64::from(i)) as usize;
                let m = &mut self.mem.bytes;
                m[at..at + 8].copy_from_slice(&gpa.to_le_bytes());
                m[at + 8..at + 12].copy_from_slice(&len.to_le_bytes());
                m[at + 12..at + 14].copy_from_slice(&flags.to_le_bytes());
                m[at + 14..at + 16].copy_from_slice(&(i + 1).to_le_bytes());
            }
            let avail = (base(q) + 0x800) as usize;
            let slot = avail + 4 + 2 * usize::from(self.avail[q] % SIZE);
            self.mem.bytes[slot..slot + 2].copy_from_slice(&head.to_le_bytes());
            self.avail[q] += 1;
            self.mem.bytes[avail + 2..avail + 4].copy_from_slice(&self.avail[q].to_le_bytes());
            head
        }

        fn notify(&mut self, q: usize) {
            self.d.write(reg::QUEUE_NOTIFY, 4, q as u64, &mut self.mem);
        }

        /// Used idx and the used elements of queue `q` so far.
        fn used(&self, q: usize) -> Vec<(u32, u32)> {
            let u = (base(q) + 0xa00) as usize;
            let b = &self.mem.bytes;
            let idx = u16::from_le_bytes([b[u + 2], b[u + 3]]);
            (0..idx)
                .map(|k| {
                    let e = u + 4 + 8 * usize::from(k % SIZE);
                    let id = u32::from_le_bytes(b[e..e + 4].try_into().unwrap());
                    let len = u32::from_le_bytes(b[e + 4..e + 8].try_into().unwrap());
                    (id, len)
                })
                .collect()
        }

        /// Service as the VM wiring would; the actions applied.
        fn service(&mut self) -> Vec<BalloonAction> {
            let mut applied = Vec::new();
            self.d.balloon_service(&mut self.mem, &mut |a| applied.push(a));
            applied
        }

        fn put_pfns(&mut self, gpa: u64, pfns: &[u32]) -> u32 {
            for (k, p) in pfns.iter().enumerate() {
                let at = gpa as usize + 4 * k;
                self.mem.bytes[at..at + 4].copy_from_slice(&p.to_le_bytes());
            }
            4 * pfns.len() as u32
        }

        fn needs_reset(&mut self) -> bool {
            self.d.read(reg::STATUS, 4) & u64::from(status::DEVICE_NEEDS_RESET) != 0
        }
    }

    #[test]
    fn queue_indices_follow_the_negotiated_features() {
        use BalloonQueue::*;
        let both = feature::STATS_VQ | feature::PAGE_REPORTING;
        assert_eq!(
            [0, 1, 2, 3].map(|i| BalloonQueue::at(i, both)),
            [Some(Inflate), Some(Deflate), Some(Stats), Some(Reporting)]
        );
        assert_eq!(BalloonQueue::at(2, feature::PAGE_REPORTING), Some(Reporting));
        assert_eq!(BalloonQueue::at(3, feature::PAGE_REPORTING), None);
        assert_eq!(BalloonQueue::at(2, 0), None);
        assert_eq!(Reporting.index(feature::PAGE_REPORTING), Some(2));
        assert_eq!(Reporting.index(both), Some(3));
        assert_eq!(Stats.index(feature::PAGE_REPORTING), None);

        // Without STATS_VQ the reporting queue is 2 and carries reports.
        let mut drv = Driver::up(feature::PAGE_REPORTING);
        assert_eq!(drv.d.device().queue_index(Reporting), Some(2));
        drv.post(2, &[(BUF, 0x1000, true)]);
        drv.notify(2);
        assert_eq!(drv.service(), [BalloonAction::Report(vec![(BUF, 0x1000)])]);
        assert_eq!(drv.used(2), [(0, 0)]);

        // With it, 2 is statsq (a readable buffer held, not a report) and
        // 3 the reporting queue.
        let mut drv = Driver::up(both);
        drv.post(2, &[(BUF, 10, false)]);
        drv.notify(2);
        assert!(drv.d.device().stats().is_some());
        assert_eq!(drv.used(2), []);
        drv.post(3, &[(BUF + 0x2000, 0x2000, true)]);
        drv.notify(3);
        assert_eq!(drv.service(), [BalloonAction::Report(vec![(BUF + 0x2000, 0x2000)])]);
        assert_eq!(drv.used(3), [(0, 0)]);
        assert!(!drv.needs_reset());
    }

    #[test]
    fn inflate_and_deflate_become_actions_and_chains_return_once_applied() {
        let mut drv = Driver::up(0);
        let len = drv.put_pfns(BUF, &[0x100, 0x101, 0xfffff]);
        let head = drv.post(0, &[(BUF, len, false)]);
        drv.notify(0);
        // Held: nothing used, no interrupt until the host applied it.
        assert_eq!(drv.used(0), []);
        assert!(!drv.d.interrupt_asserted());
        assert!(drv.d.device().needs_service());
        assert_eq!(drv.service(), [BalloonAction::Inflate(vec![0x10_0000, 0x10_1000, 0xfffff000])]);
        assert_eq!(drv.used(0), [(head.into(), 0)]);
        assert_eq!(drv.d.interrupt_status(), interrupt::USED_BUFFER);
        assert!(!drv.d.device().needs_service());
        drv.d.write(reg::INTERRUPT_ACK, 4, interrupt::USED_BUFFER.into(), &mut drv.mem);

        // A deflate whose second PFN straddles two buffers, with a partial
        // PFN at the end that is ignored.
        drv.put_pfns(BUF + 0x100, &[0x100, 0x101]);
        let head = drv.post(1, &[(BUF + 0x100, 6, false), (BUF + 0x106, 3, false)]);
        drv.notify(1);
        assert_eq!(drv.used(1), []);
        assert_eq!(drv.service(), [BalloonAction::Deflate(vec![0x10_0000, 0x10_1000])]);
        assert_eq!(drv.used(1), [(head.into(), 0)]);
        assert!(drv.d.interrupt_asserted());

        // A chain with no whole PFN has nothing for the host: back at once.
        let head = drv.post(0, &[(BUF, 3, false)]);
        drv.notify(0);
        assert_eq!(drv.used(0)[1], (head.into(), 0));
        assert!(!drv.d.device().needs_service());
        assert!(!drv.needs_reset());
    }

    #[test]
    fn over_long_and_wrong_way_chains_need_a_reset_and_change_nothing() {
        // 257 PFNs, one more than a chain may carry.
        let mut drv = Driver::up(0);
        let pfns: Vec<u32> = (0..=MAX_PFNS as u32).collect();
        let len = drv.put_pfns(BUF, &pfns);
        drv.post(0, &[(BUF, len, false)]);
        let before = drv.mem.bytes.clone();
        drv.notify(0);
        assert!(drv.needs_reset());
        assert_eq!(drv.d.interrupt_status() & interrupt::CONFIG, interrupt::CONFIG);
        assert_eq!(drv.mem.bytes, before, "a refused chain changed guest memory");
        assert!(drv.d.device_mut().take_actions().is_empty());
        assert_eq!(drv.d.queue(0).unwrap().state().next_avail, 0, "the refused chain was taken");

        // Exactly 256 are fine.
        let mut drv = Driver::up(0);
        let len = drv.put_pfns(BUF, &pfns[..MAX_PFNS]);
        drv.post(0, &[(BUF, len, false)]);
        drv.notify(0);
        assert!(!drv.needs_reset());
        assert!(matches!(&drv.service()[..], [BalloonAction::Inflate(g)] if g.len() == MAX_PFNS));

        // A writable buffer on inflateq, then a readable one on the
        // reporting queue.
        let mut drv = Driver::up(0);
        drv.put_pfns(BUF, &[1]);
        drv.post(0, &[(BUF, 4, false), (BUF + 0x100, 4, true)]);
        let before = drv.mem.bytes.clone();
        drv.notify(0);
        assert!(drv.needs_reset());
        assert_eq!(drv.mem.bytes, before);
        assert!(drv.service().is_empty());
        let mut drv = Driver::up(feature::PAGE_REPORTING);
        drv.post(2, &[(BUF, 0x1000, false)]);
        drv.notify(2);
        assert!(drv.needs_reset());
    }

    #[test]
    fn a_held_chain_published_again_needs_a_reset() {
        // Found by the `virtio` fuzz target: the second copy was held too,
        // a state no restore accepts.
        let mut drv = Driver::up(0);
        let len = drv.put_pfns(BUF, &[0x10]);
        let head = drv.post(0, &[(BUF, len, false)]);
        let avail = (base(0) + 0x800) as usize;
        let slot = avail + 4 + 2 * usize::from(drv.avail[0] % SIZE);
        drv.mem.bytes[slot..slot + 2].copy_from_slice(&head.to_le_bytes());
        drv.avail[0] += 1;
        drv.mem.bytes[avail + 2..avail + 4].copy_from_slice(&drv.avail[0].to_le_bytes());
        drv.notify(0);
        assert!(drv.needs_reset());
        let state = drv.d.device().save();
        assert_eq!(state.pending.len(), 1, "the chain is held once");
        assert_eq!(Balloon::validate(&state), Ok(()));
    }

    #[test]
    fn a_host_that_never_drains_stops_the_device_taking_chains() {
        let mut drv = Driver::up(0);
        for k in 0..=MAX_HELD as u32 {
            let len = drv.put_pfns(BUF + 0x10 * u64::from(k), &[k]);
            drv.post(0, &[(BUF + 0x10 * u64::from(k), len, false)]);
        }
        drv.notify(0);
        assert!(!drv.needs_reset());
        // 16 held, the 17th left available.
        assert_eq!(drv.d.queue(0).unwrap().state().next_avail, MAX_HELD as u16);
        assert_eq!(drv.used(0), []);
        // Serving takes the rest too and returns all of them.
        let applied = drv.service();
        let expect: Vec<BalloonAction> =
            (0..=MAX_HELD as u64).map(|k| BalloonAction::Inflate(vec![k << PFN_SHIFT])).collect();
        assert_eq!(applied, expect);
        assert_eq!(drv.used(0).len(), MAX_HELD + 1);
        assert!(!drv.d.device().needs_service());
    }

    #[test]
    fn the_target_is_config_space_and_raises_a_config_interrupt() {
        let mut drv = Driver::up(0);
        let generation = drv.d.read(reg::CONFIG_GENERATION, 4);
        drv.d.balloon_set_target(0x1234_5678);
        assert_eq!(drv.d.read(reg::CONFIG, 4), 0x1234_5678);
        assert_eq!(drv.d.read(reg::CONFIG + 2, 2), 0x1234);
        assert_eq!(drv.d.interrupt_status(), interrupt::CONFIG);
        assert_ne!(drv.d.read(reg::CONFIG_GENERATION, 4), generation);
        drv.d.write(reg::INTERRUPT_ACK, 4, interrupt::CONFIG.into(), &mut drv.mem);
        // The same target again is no change.
        drv.d.balloon_set_target(0x1234_5678);
        assert!(!drv.d.interrupt_asserted());

        // The driver writes actual; num_pages is not its to write.
        drv.d.write(reg::CONFIG + 4, 4, 500, &mut drv.mem);
        drv.d.write(reg::CONFIG, 4, 7, &mut drv.mem);
        assert_eq!(drv.d.device().actual(), 500);
        assert_eq!(drv.d.read(reg::CONFIG, 4), 0x1234_5678);
        assert_eq!(drv.d.read(reg::CONFIG + 4, 4), 500);
        // A write straddling both fields takes only actual's bytes.
        drv.d.write(reg::CONFIG + 2, 4, 0xaaaa_0102, &mut drv.mem);
        assert_eq!(drv.d.device().actual(), 0xaaaa);
        assert_eq!(drv.d.device().target(), 0x1234_5678);
        assert_eq!(drv.d.read(reg::CONFIG + 8, 4), 0, "no fields past actual");

        // Before DRIVER_OK a new target moves the generation, no interrupt.
        let mut mem = VecMemory::new(0, 0x1000);
        let mut d = VirtioMmio::new(Balloon::new());
        d.balloon_set_target(9);
        assert_eq!(d.read(reg::CONFIG_GENERATION, 4), 1);
        assert!(!d.interrupt_asserted());
        d.write(reg::STATUS, 4, u64::from(status::ACKNOWLEDGE), &mut mem);
        assert_eq!(d.read(reg::CONFIG, 4), 9);
    }

    fn put_stats(mem: &mut VecMemory, gpa: u64, entries: &[(u16, u64)]) -> u32 {
        let mut at = gpa as usize;
        for &(t, v) in entries {
            mem.bytes[at..at + 2].copy_from_slice(&t.to_le_bytes());
            mem.bytes[at + 2..at + 10].copy_from_slice(&v.to_le_bytes());
            at += STAT_LEN;
        }
        (STAT_LEN * entries.len()) as u32
    }

    #[test]
    fn the_stats_buffer_is_held_until_the_host_asks() {
        // Linux posts the first buffer and notifies before DRIVER_OK; the
        // transport ignores that notification.
        let mut drv = Driver::up_with(feature::STATS_VQ, |drv| {
            let len = put_stats(&mut drv.mem, BUF, &[(tag::MEMFREE, 123), (tag::MEMTOT, 456), (99, 7)]);
            drv.post(2, &[(BUF, len + 5, false)]);
            drv.notify(2);
        });
        assert_eq!(drv.d.device().stats(), None);
        assert!(drv.d.device().needs_service(), "the early buffer must be polled");
        assert!(drv.service().is_empty());
        let s = drv.d.device().stats().unwrap();
        assert_eq!((s.free_memory, s.total_memory, s.swap_in), (Some(123), Some(456), None));
        assert_eq!(drv.d.device().stats_sequence(), 1);
        assert_eq!(drv.used(2), [], "the stats buffer must be held");
        assert!(!drv.d.device().needs_service());

        // The host asks: the buffer goes back with an interrupt.
        assert!(drv.d.balloon_request_stats(&mut drv.mem));
        assert_eq!(drv.used(2), [(0, 0)]);
        assert!(drv.d.interrupt_asserted());
        // Nothing held while the driver refills: no request possible.
        assert!(!drv.d.balloon_request_stats(&mut drv.mem));
        assert_eq!(drv.used(2).len(), 1);

        // The driver refills it with new values (one entry split across two
        // buffers) and posts it again.
        let len = put_stats(&mut drv.mem, BUF + 0x100, &[(tag::MEMFREE, 100), (tag::DIRECT_RECLAIM, 9)]);
        drv.post(2, &[(BUF + 0x100, 4, false), (BUF + 0x104, len - 4, false)]);
        drv.notify(2);
        let s = drv.d.device().stats().unwrap();
        assert_eq!((s.free_memory, s.direct_reclaims, s.total_memory), (Some(100), Some(9), None));
        assert_eq!(drv.d.device().stats_sequence(), 2);
        assert_eq!(drv.used(2).len(), 1);

        // A writable buffer on statsq is refused.
        drv.post(2, &[(BUF, 10, true)]);
        drv.notify(2);
        assert!(drv.needs_reset());
    }

    #[test]
    fn reports_are_whole_pages_returned_unwritten_with_length_zero() {
        let mut drv = Driver::up(feature::PAGE_REPORTING);
        drv.mem.bytes[BUF as usize..BUF as usize + 0x4000].fill(0x5a);
        // Two aligned ranges and one whose only whole page is its second.
        let head = drv.post(2, &[(BUF, 0x2000, true), (BUF + 0x2800, 0x1800, true), (0x30000, 0x1000, true)]);
        let before = drv.mem.bytes.clone();
        drv.notify(2);
        assert_eq!(drv.used(2), [], "a report must not return before it is applied");
        assert_eq!(
            drv.service(),
            [BalloonAction::Report(vec![(BUF, 0x2000), (BUF + 0x3000, 0x1000), (0x30000, 0x1000)])]
        );
        assert_eq!(drv.used(2), [(head.into(), 0)]);
        let used_ring = base(2) as usize + 0xa00..base(2) as usize + 0xc00;
        for (i, (a, b)) in drv.mem.bytes.iter().zip(&before).enumerate() {
            assert!(a == b || used_ring.contains(&i), "the device wrote guest memory at {i:#x}");
        }
        // Less than a page: nothing to report, back at once.
        drv.post(2, &[(BUF + 0x10, 0x100, true)]);
        drv.notify(2);
        assert_eq!(drv.used(2).len(), 2);
        assert!(!drv.d.device().needs_service());
    }

    #[test]
    fn a_reset_drops_what_the_device_held() {
        let mut drv = Driver::up(feature::STATS_VQ);
        drv.post(2, &[(BUF, 10, false)]);
        drv.notify(2);
        drv.put_pfns(BUF + 0x100, &[5]);
        drv.post(0, &[(BUF + 0x100, 4, false)]);
        drv.notify(0);
        drv.d.balloon_set_target(77);
        assert!(drv.d.device().needs_service());
        drv.d.write(reg::STATUS, 4, 0, &mut drv.mem);
        let dev = drv.d.device();
        assert!(!dev.needs_service());
        assert_eq!(dev.negotiated(), 0);
        assert_eq!(dev.target(), 77);
        assert!(dev.stats().is_some(), "the last statistics are kept");
    }

    #[test]
    fn state_round_trips_and_impossible_states_are_refused() {
        let mut drv = Driver::up(feature::STATS_VQ | feature::PAGE_REPORTING);
        drv.d.balloon_set_target(1000);
        let len = put_stats(&mut drv.mem, BUF, &[(tag::AVAIL, 42)]);
        drv.post(2, &[(BUF, len, false)]);
        drv.notify(2);
        drv.put_pfns(BUF + 0x100, &[7, 8]);
        drv.post(0, &[(BUF + 0x100, 8, false)]);
        drv.notify(0);
        drv.post(3, &[(BUF + 0x1000, 0x1000, true)]);
        drv.notify(3);

        let saved = drv.d.save();
        assert_eq!(saved.device.pending.len(), 2);
        assert_eq!(saved.device.stats_head, Some(0));
        assert_eq!(VirtioMmio::<Balloon>::validate(&saved), Ok(()));
        let mut e = VirtioMmio::new(Balloon::new());
        e.restore(saved.clone());
        assert_eq!(e.save(), saved);
        // The restored device carries on: the held actions are applied and
        // their chains returned into the same guest memory.
        let mut applied = Vec::new();
        e.balloon_service(&mut drv.mem, &mut |a| applied.push(a));
        assert_eq!(
            applied,
            [BalloonAction::Inflate(vec![0x7000, 0x8000]), BalloonAction::Report(vec![(BUF + 0x1000, 0x1000)])]
        );
        assert_eq!(drv.used(0), [(0, 0)]);
        assert_eq!(drv.used(3), [(0, 0)]);
        assert_eq!(e.device().stats().unwrap().available_memory, Some(42));
        assert_eq!(e.device().target(), 1000);

        let good = saved.device;
        assert_eq!(Balloon::validate(&good), Ok(()));
        let bad = |f: &dyn Fn(&mut BalloonState)| {
            let mut s = good.clone();
            f(&mut s);
            Balloon::validate(&s)
        };
        let inflate = |head, gpas: Vec<u64>| PendingAction { head, action: BalloonAction::Inflate(gpas) };
        assert!(bad(&|s| s.features |= feature::FREE_PAGE_HINT).is_err());
        assert!(bad(&|s| s.pending = (0..=MAX_HELD as u16).map(|h| inflate(h, vec![0])).collect()).is_err());
        assert!(bad(&|s| s.done = (0..MAX_HELD as u16 - 1).map(|h| (BalloonQueue::Deflate, h)).collect()).is_err());
        assert!(bad(&|s| s.pending.push(inflate(5, vec![0x1001]))).is_err());
        assert!(bad(&|s| s.pending.push(inflate(5, vec![1 << 44]))).is_err());
        assert!(bad(&|s| s.pending.push(inflate(5, vec![]))).is_err());
        assert!(bad(&|s| s.pending.push(inflate(5, vec![0; MAX_PFNS + 1]))).is_err());
        assert!(bad(&|s| s.pending.push(inflate(0, vec![0]))).is_err(), "head 0 is held twice");
        assert!(bad(&|s| s.pending.push(inflate(QUEUE_SIZE, vec![0]))).is_err());
        let report = |r: Vec<(u64, u64)>| PendingAction { head: 9, action: BalloonAction::Report(r) };
        assert!(bad(&|s| s.pending.push(report(vec![(0x1000, 0)]))).is_err());
        assert!(bad(&|s| s.pending.push(report(vec![(0x1000, 0x800)]))).is_err());
        assert!(bad(&|s| s.pending.push(report(vec![(u64::MAX - 0xfff, 0x1000)]))).is_err());
        assert!(bad(&|s| s.features = feature::STATS_VQ).is_err(), "a report without the reporting queue");
        assert!(bad(&|s| s.features = feature::PAGE_REPORTING).is_err(), "a stats buffer without statsq");
        assert!(bad(&|s| s.done.push((BalloonQueue::Stats, 3))).is_err());
        assert!(
            bad(&|s| {
                s.stats_head = None;
                s.stats_requested = true;
            })
            .is_err()
        );
        assert!(bad(&|s| s.stats_sequence = 0).is_err());
        // And a good variation passes, so the refusals above are specific.
        assert_eq!(bad(&|s| s.pending.push(inflate(5, vec![0x5000]))), Ok(()));
    }
}
