//! The split virtqueue, device side (virtio 1.2 2.7): a descriptor table
//! (16-byte entries: address, length, flags, next), the available ring the
//! driver fills (flags, idx, ring of heads, used_event) and the used ring
//! the device fills (flags, idx, ring of (id, len), avail_event).
//!
//! The guest writes all three at any time, from any vCPU. Nothing read from
//! them is trusted: a chain is walked and checked whole (indices, loops,
//! length, RAM, direction order, indirect tables) before any of it is used,
//! and every ring access goes through [`GuestMemory`], which refuses
//! anything outside RAM. The queue's own configuration (size, addresses) is
//! checked when the driver makes it ready ([`Queue::check_layout`]) and
//! again on restore.
//!
//! Memory ordering: the driver publishes with a write barrier between the
//! ring entry and avail->idx (2.7.13) and the device must mirror it. On the
//! host tests everything runs on one thread; in the hypervisor the vCPU
//! that notified exits on this CPU, but other vCPUs of the same guest keep
//! running on other CPUs and may be filling the ring, so the fences below
//! are real (`core::sync::atomic::fence`, which also stops the compiler
//! moving the guest-memory accesses across them once inlined). On x86
//! (TSO) acquire and release fences cost nothing; the one full fence
//! (before reading the driver's suppression fields) is an MFENCE, as
//! Linux's `virtio_mb` is on the driver side.

use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{Ordering, fence};
use serde::{Deserialize, Serialize};

use super::{GuestMemory, OutsideRam, feature};

/// The largest queue size a split virtqueue may have (2.7).
pub const MAX_SIZE: u16 = 32768;
/// The most descriptors an indirect table may hold here: the spec bounds
/// it by nothing but memory; QEMU allows 1024 (VIRTQUEUE_MAX_SIZE) and
/// Linux builds tables of one entry per scatter-gather element.
pub const MAX_INDIRECT: u32 = 1024;

/// Descriptor flags (2.7.5).
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;
/// Available ring flag: the driver wants no used-buffer notification
/// (2.7.7; meaningless with VIRTIO_F_EVENT_IDX).
pub const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Bytes of one descriptor.
const DESC_SIZE: u64 = 16;
/// Alignments of the three parts (2.7, table "Virtqueue Part Alignment").
pub const DESC_ALIGN: u64 = 16;
pub const AVAIL_ALIGN: u64 = 2;
pub const USED_ALIGN: u64 = 4;

/// What a queue is, as the driver set it up and the device has advanced it:
/// plain data, saved and restored as is.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    /// QueueNum: entries of each ring (a power of two, at most the
    /// device's maximum).
    pub size: u16,
    /// QueueReady: the driver set the queue up and the device may use it.
    pub ready: bool,
    /// Guest-physical addresses of the descriptor table, the available
    /// ring (the "driver area") and the used ring (the "device area").
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
    /// The next available-ring entry the device will take.
    pub next_avail: u16,
    /// The next used-ring entry the device will fill (and the used idx the
    /// guest sees).
    pub next_used: u16,
}

/// Why a queue was refused: the guest broke the ring protocol (or set the
/// queue up wrong).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueError {
    /// The size is zero, not a power of two or above the device's maximum.
    Size { size: u16, max: u16 },
    /// A ring is not aligned as 2.7 requires.
    Misaligned { part: Part, gpa: u64 },
    /// A ring does not lie in guest RAM.
    RingOutsideRam { part: Part, gpa: u64 },
    /// avail->idx moved more than the queue size past what the device took.
    AvailJump { next_avail: u16, avail_idx: u16 },
    /// An available-ring entry names no descriptor.
    HeadOutOfRange { index: u16, size: u16 },
    /// A descriptor's `next` names no descriptor of its table.
    NextOutOfRange { index: u16, entries: u32 },
    /// A chain loops or is longer than its table (2.7.5.3.1, 2.7.13.1).
    ChainTooLong { limit: u32 },
    /// A buffer is not in guest RAM (or wraps the address space).
    BufferOutsideRam { gpa: u64, len: u32 },
    /// A device-readable buffer follows a device-writable one (2.7.4.2).
    ReadableAfterWritable,
    /// An indirect descriptor without VIRTIO_F_INDIRECT_DESC negotiated.
    IndirectNotNegotiated,
    /// An indirect descriptor also has VIRTQ_DESC_F_NEXT (2.7.5.3.1).
    IndirectWithNext,
    /// An indirect table holds an indirect descriptor (2.7.5.3.1).
    NestedIndirect,
    /// An indirect table's length is zero, not a multiple of 16 or above
    /// [`MAX_INDIRECT`] descriptors.
    IndirectLength { len: u32 },
    /// The buffers add up to more than 4 GiB (a used length is 32 bits).
    ChainTooLarge,
    /// The chain's buffers point the wrong way for the device: readable
    /// ones where it only writes, or the reverse.
    Direction,
    /// The chain is too short for what the device needs to read or write.
    TooShort { needed: u32, found: u32 },
    /// The driver made a chain available again before the device used it
    /// (2.7.13: the device owns a chain until it is in the used ring).
    HeadInUse { head: u16 },
    /// A ring access failed: the RAM under it went away.
    Memory(OutsideRam),
}

/// A part of a virtqueue (2.7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Descriptors,
    Available,
    Used,
}

impl fmt::Display for QueueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            QueueError::Size { size, max } => write!(f, "Queue size {size} is not a power of two up to {max}"),
            QueueError::Misaligned { part, gpa } => write!(f, "{part:?} ring at {gpa:#x} is misaligned"),
            QueueError::RingOutsideRam { part, gpa } => write!(f, "{part:?} ring at {gpa:#x} is not in guest RAM"),
            QueueError::AvailJump { next_avail, avail_idx } => {
                write!(f, "Available index jumped from {next_avail} to {avail_idx}")
            }
            QueueError::HeadOutOfRange { index, size } => write!(f, "Head {index} is outside a queue of {size}"),
            QueueError::NextOutOfRange { index, entries } => {
                write!(f, "Next descriptor {index} is outside a table of {entries}")
            }
            QueueError::ChainTooLong { limit } => write!(f, "Descriptor chain loops or exceeds {limit} descriptors"),
            QueueError::BufferOutsideRam { gpa, len } => write!(f, "Buffer of {len} bytes at {gpa:#x} is not in RAM"),
            QueueError::ReadableAfterWritable => write!(f, "Readable buffer after a writable one"),
            QueueError::IndirectNotNegotiated => write!(f, "Indirect descriptor without the feature"),
            QueueError::IndirectWithNext => write!(f, "Indirect descriptor with the next flag"),
            QueueError::NestedIndirect => write!(f, "Indirect descriptor inside an indirect table"),
            QueueError::IndirectLength { len } => write!(f, "Indirect table of {len} bytes"),
            QueueError::ChainTooLarge => write!(f, "Descriptor chain exceeds 4 GiB"),
            QueueError::Direction => write!(f, "Buffers point the wrong way for the device"),
            QueueError::TooShort { needed, found } => write!(f, "Chain has {found} bytes, the device needs {needed}"),
            QueueError::HeadInUse { head } => write!(f, "Chain {head} made available again before it was used"),
            QueueError::Memory(e) => write!(f, "Ring access failed: {e}"),
        }
    }
}

impl From<OutsideRam> for QueueError {
    fn from(e: OutsideRam) -> Self {
        QueueError::Memory(e)
    }
}

/// One buffer of a chain, checked to lie in guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buffer {
    pub gpa: u64,
    pub len: u32,
}

/// A descriptor chain taken from the available ring, checked whole: the
/// device-readable buffers, then the device-writable ones (2.7.4.2).
/// Zero-length buffers are left out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Chain {
    /// The head descriptor's index: what the used ring reports back.
    pub head: u16,
    pub readable: Vec<Buffer>,
    pub writable: Vec<Buffer>,
}

impl Chain {
    /// Bytes the device may read (fits: the walker bounds the sum).
    pub fn readable_len(&self) -> u32 {
        self.readable.iter().map(|b| b.len).sum()
    }

    /// Bytes the device may write.
    pub fn writable_len(&self) -> u32 {
        self.writable.iter().map(|b| b.len).sum()
    }
}

/// A raw descriptor (2.7.5).
#[derive(Clone, Copy, Debug)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// A split virtqueue: its state and the features that change how its rings
/// are read (derived from the negotiated features, not saved).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Queue {
    pub(super) state: QueueState,
    max_size: u16,
    event_idx: bool,
    indirect: bool,
}

/// Most pages [`Queue::here`] looks at for one queue.
pub const MAX_PAGES_CHECKED: u64 = 4096;

/// Guest memory for [`Queue::here`]'s dry run: reads as they are, writes
/// only checked (never made), and a read that failed because its page is
/// on its way noted.
struct DryRun<'a> {
    mem: &'a mut dyn GuestMemory,
    away: bool,
    budget: u64,
}

impl DryRun<'_> {
    /// Whether `len` bytes at `gpa` are here (true once the budget of pages
    /// is spent).
    fn check(&mut self, gpa: u64, len: u64) -> bool {
        let pages = ((gpa & 0xfff) + len.min(u64::from(u32::MAX))).div_ceil(4096);
        if pages > self.budget {
            self.budget = 0;
            return true;
        }
        self.budget -= pages;
        self.mem.here(gpa, len)
    }
}

impl GuestMemory for DryRun<'_> {
    fn read(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), OutsideRam> {
        let r = self.mem.read(gpa, buf);
        if r.is_err() && !self.mem.here(gpa, buf.len() as u64) {
            self.away = true;
        }
        r
    }

    fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), OutsideRam> {
        let len = data.len() as u64;
        if self.mem.is_ram(gpa, len) { Ok(()) } else { Err(OutsideRam { gpa, len }) }
    }

    fn is_ram(&self, gpa: u64, len: u64) -> bool {
        self.mem.is_ram(gpa, len)
    }
}

/// `vring_need_event` (2.7.10): whether moving the used idx from `old` to
/// `new` passed `event`, in 16-bit modular arithmetic.
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

fn read_u16(mem: &mut dyn GuestMemory, gpa: u64) -> Result<u16, OutsideRam> {
    let mut b = [0; 2];
    mem.read(gpa, &mut b)?;
    Ok(u16::from_le_bytes(b))
}

impl Queue {
    /// A queue the device offers with `max_size` entries at most; not
    /// ready, its size the maximum (what QueueNum reads as until written).
    pub fn new(max_size: u16) -> Self {
        Queue {
            state: QueueState { size: max_size, ..QueueState::default() },
            max_size,
            event_idx: false,
            indirect: false,
        }
    }

    /// The state, as saved.
    pub fn state(&self) -> &QueueState {
        &self.state
    }

    pub fn max_size(&self) -> u16 {
        self.max_size
    }

    /// Apply the negotiated features (at DRIVER_OK and on restore).
    pub(super) fn set_features(&mut self, features: u64) {
        self.event_idx = features & feature::RING_EVENT_IDX != 0;
        self.indirect = features & feature::INDIRECT_DESC != 0;
    }

    /// Back to the state after a device reset (2.4: queues not ready).
    pub(super) fn reset(&mut self) {
        *self = Queue::new(self.max_size);
    }

    /// Whether `size` is a queue size for a maximum of `max` (2.7: a power
    /// of two; 4.2.2: at most QueueNumMax).
    pub fn size_ok(size: u16, max: u16) -> bool {
        size.is_power_of_two() && size <= max && size <= MAX_SIZE
    }

    /// Bytes of each part for `size` entries, with the event fields.
    fn part_len(part: Part, size: u16) -> u64 {
        let n = u64::from(size);
        match part {
            Part::Descriptors => DESC_SIZE * n,
            Part::Available => 6 + 2 * n,
            Part::Used => 6 + 8 * n,
        }
    }

    /// Check the size and each part's alignment, and (with `mem`) that the
    /// parts lie in RAM: what QueueReady = 1 requires.
    pub fn check_layout(state: &QueueState, max: u16, mem: Option<&dyn GuestMemory>) -> Result<(), QueueError> {
        if !Self::size_ok(state.size, max) {
            return Err(QueueError::Size { size: state.size, max });
        }
        let parts = [
            (Part::Descriptors, state.desc, DESC_ALIGN),
            (Part::Available, state.driver, AVAIL_ALIGN),
            (Part::Used, state.device, USED_ALIGN),
        ];
        for (part, gpa, align) in parts {
            if !gpa.is_multiple_of(align) {
                return Err(QueueError::Misaligned { part, gpa });
            }
            if let Some(mem) = mem
                && !mem.is_ram(gpa, Self::part_len(part, state.size))
            {
                return Err(QueueError::RingOutsideRam { part, gpa });
            }
        }
        Ok(())
    }

    fn avail_entry(&self, k: u16) -> u64 {
        let slot = u64::from(k % self.state.size);
        self.state.driver.wrapping_add(4 + 2 * slot)
    }

    fn used_event_addr(&self) -> u64 {
        self.state.driver.wrapping_add(4 + 2 * u64::from(self.state.size))
    }

    fn avail_event_addr(&self) -> u64 {
        self.state.device.wrapping_add(4 + 8 * u64::from(self.state.size))
    }

    /// The next chain the driver made available, checked whole; `None`
    /// when the ring is empty. On an error nothing was written and the
    /// chain stays where it was.
    pub fn pop(&mut self, mem: &mut dyn GuestMemory) -> Result<Option<Chain>, QueueError> {
        let mut avail_idx = self.avail_idx(mem)?;
        if avail_idx == self.state.next_avail && self.event_idx {
            // Ask to be notified at the next entry (2.7.10: avail_event),
            // then look again: the driver may have added one before it
            // could see the new avail_event, and then it will not notify.
            mem.write(self.avail_event_addr(), &self.state.next_avail.to_le_bytes())?;
            // The avail_event store before the idx load (store-load: a full
            // fence, as QEMU's `virtio_queue_set_notification`).
            fence(Ordering::SeqCst);
            avail_idx = self.avail_idx(mem)?;
        }
        if avail_idx == self.state.next_avail {
            return Ok(None);
        }
        // Ring entries and descriptors are read after the idx that
        // published them (the driver's write barrier, 2.7.13, pairs with
        // this one).
        fence(Ordering::Acquire);
        let head = read_u16(mem, self.avail_entry(self.state.next_avail))?;
        let chain = self.walk(mem, head)?;
        self.state.next_avail = self.state.next_avail.wrapping_add(1);
        Ok(Some(chain))
    }

    /// Whether everything serving the chains available now would reach is
    /// here ([`GuestMemory::here`]): the rings, any indirect tables, and
    /// every chain's buffers, found by a dry run on a copy of the queue
    /// (nothing is written, and this queue does not move). A protocol
    /// error ends the dry run; the real run reports it. At most
    /// [`MAX_PAGES_CHECKED`] pages are looked at: past that the device goes
    /// ahead as it would without post-copy (a chain may claim gigabytes).
    pub fn here(&self, mem: &mut dyn GuestMemory) -> bool {
        let mut dry = DryRun { mem, away: false, budget: MAX_PAGES_CHECKED };
        let s = &self.state;
        let parts = [(Part::Descriptors, s.desc), (Part::Available, s.driver), (Part::Used, s.device)];
        if !parts.iter().all(|&(part, gpa)| dry.check(gpa, Self::part_len(part, s.size))) {
            return false;
        }
        let mut copy = self.clone();
        for _ in 0..s.size {
            match copy.pop(&mut dry) {
                Ok(Some(chain)) => {
                    if !chain.readable.iter().chain(&chain.writable).all(|b| dry.check(b.gpa, b.len.into())) {
                        return false;
                    }
                }
                _ => break,
            }
        }
        !dry.away
    }

    /// Put the last popped chain back (the device could not serve it now).
    pub fn undo_pop(&mut self) {
        self.state.next_avail = self.state.next_avail.wrapping_sub(1);
    }

    /// avail->idx, refused if it is more than the queue size ahead of what
    /// the device took (2.7.6: the driver cannot have made more available).
    fn avail_idx(&self, mem: &mut dyn GuestMemory) -> Result<u16, QueueError> {
        let idx = read_u16(mem, self.state.driver.wrapping_add(2))?;
        if idx.wrapping_sub(self.state.next_avail) > self.state.size {
            return Err(QueueError::AvailJump { next_avail: self.state.next_avail, avail_idx: idx });
        }
        Ok(idx)
    }

    fn read_desc(mem: &mut dyn GuestMemory, table: u64, index: u16) -> Result<Desc, QueueError> {
        let mut b = [0u8; 16];
        mem.read(table.wrapping_add(DESC_SIZE * u64::from(index)), &mut b)?;
        let [a0, a1, a2, a3, a4, a5, a6, a7, l0, l1, l2, l3, f0, f1, n0, n1] = b;
        Ok(Desc {
            addr: u64::from_le_bytes([a0, a1, a2, a3, a4, a5, a6, a7]),
            len: u32::from_le_bytes([l0, l1, l2, l3]),
            flags: u16::from_le_bytes([f0, f1]),
            next: u16::from_le_bytes([n0, n1]),
        })
    }

    /// Walk the chain from `head` and check all of it.
    fn walk(&self, mem: &mut dyn GuestMemory, head: u16) -> Result<Chain, QueueError> {
        let size = self.state.size;
        if head >= size {
            return Err(QueueError::HeadOutOfRange { index: head, size });
        }
        let mut chain = Chain { head, ..Chain::default() };
        // The table being walked, its entries and how many of them the walk
        // has visited: a chain longer than its table loops.
        let (mut table, mut entries, mut visited) = (self.state.desc, u32::from(size), 0u32);
        let mut in_indirect = false;
        let mut index = head;
        let mut total = 0u32;
        let mut seen_writable = false;
        loop {
            visited += 1;
            if visited > entries {
                return Err(QueueError::ChainTooLong { limit: entries });
            }
            let d = Self::read_desc(mem, table, index)?;
            if d.flags & VIRTQ_DESC_F_INDIRECT != 0 {
                if !self.indirect {
                    return Err(QueueError::IndirectNotNegotiated);
                }
                if in_indirect {
                    return Err(QueueError::NestedIndirect);
                }
                if d.flags & VIRTQ_DESC_F_NEXT != 0 {
                    return Err(QueueError::IndirectWithNext);
                }
                let n = d.len / DESC_SIZE as u32;
                if d.len == 0 || !d.len.is_multiple_of(DESC_SIZE as u32) || n > MAX_INDIRECT {
                    return Err(QueueError::IndirectLength { len: d.len });
                }
                if !mem.is_ram(d.addr, d.len.into()) {
                    return Err(QueueError::BufferOutsideRam { gpa: d.addr, len: d.len });
                }
                // The table's descriptors follow (2.7.5.3.2: the device
                // ignores the WRITE flag of the indirect descriptor itself).
                (table, entries, visited, in_indirect, index) = (d.addr, n, 0, true, 0);
                continue;
            }
            let writable = d.flags & VIRTQ_DESC_F_WRITE != 0;
            if !writable && seen_writable {
                return Err(QueueError::ReadableAfterWritable);
            }
            seen_writable |= writable;
            total = total.checked_add(d.len).ok_or(QueueError::ChainTooLarge)?;
            if d.len > 0 {
                if !mem.is_ram(d.addr, d.len.into()) {
                    return Err(QueueError::BufferOutsideRam { gpa: d.addr, len: d.len });
                }
                let b = Buffer { gpa: d.addr, len: d.len };
                if writable { chain.writable.push(b) } else { chain.readable.push(b) }
            }
            if d.flags & VIRTQ_DESC_F_NEXT == 0 {
                return Ok(chain);
            }
            if u32::from(d.next) >= entries {
                return Err(QueueError::NextOutOfRange { index: d.next, entries });
            }
            index = d.next;
        }
    }

    /// Report chain `head` used, `len` bytes written into it (2.7.8).
    pub fn push_used(&mut self, mem: &mut dyn GuestMemory, head: u16, len: u32) -> Result<(), QueueError> {
        let slot = u64::from(self.state.next_used % self.state.size);
        let entry = self.state.device.wrapping_add(4 + 8 * slot);
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        mem.write(entry, &elem)?;
        // The element before the idx that publishes it (2.7.8.2; the
        // driver's read barrier after reading used->idx pairs with this).
        fence(Ordering::Release);
        let next = self.state.next_used.wrapping_add(1);
        mem.write(self.state.device.wrapping_add(2), &next.to_le_bytes())?;
        self.state.next_used = next;
        Ok(())
    }

    /// Whether the driver wants a used-buffer notification now that the
    /// used idx moved from `old_used` to where it is: with
    /// VIRTIO_F_EVENT_IDX when it passed used_event (2.7.10), else unless
    /// avail->flags has VIRTQ_AVAIL_F_NO_INTERRUPT (2.7.7).
    pub fn needs_interrupt(&self, mem: &mut dyn GuestMemory, old_used: u16) -> Result<bool, QueueError> {
        if old_used == self.state.next_used {
            return Ok(false);
        }
        // The used idx store before the loads of the driver's suppression
        // fields (store-load), or a driver that just re-enabled interrupts
        // may be missed (Linux's `virtqueue_enable_cb` does the mirror).
        fence(Ordering::SeqCst);
        if self.event_idx {
            let event = read_u16(mem, self.used_event_addr())?;
            Ok(need_event(event, self.state.next_used, old_used))
        } else {
            let flags = read_u16(mem, self.state.driver)?;
            Ok(flags & VIRTQ_AVAIL_F_NO_INTERRUPT == 0)
        }
    }

    /// Write `data` across the writable buffers of `chain` from its start;
    /// the bytes written (at most the chain's writable length).
    pub fn write_chain(mem: &mut dyn GuestMemory, chain: &Chain, data: &[u8]) -> Result<u32, QueueError> {
        let mut done = 0usize;
        for b in &chain.writable {
            if done == data.len() {
                break;
            }
            let n = (b.len as usize).min(data.len() - done);
            mem.write(b.gpa, &data[done..done + n])?;
            done += n;
        }
        Ok(done as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::super::VecMemory;
    use super::*;

    #[test]
    fn need_event_follows_the_spec_formula_across_wraparound() {
        // used_event 5: moving 4 -> 6 passes it, 6 -> 8 does not.
        assert!(need_event(5, 6, 4));
        assert!(!need_event(5, 8, 6));
        assert!(need_event(5, 6, 5), "landing just past it");
        assert!(!need_event(5, 5, 4), "landing on it is not passing it");
        assert!(need_event(0xffff, 1, 0xfffe), "across the wrap");
        assert!(!need_event(3, 1, 0xfffe));
    }

    #[test]
    fn layouts_are_checked_for_size_alignment_and_ram() {
        let mem = VecMemory::new(0, 0x10000);
        let ok =
            QueueState { size: 16, ready: false, desc: 0x1000, driver: 0x2002, device: 0x3004, ..Default::default() };
        assert_eq!(Queue::check_layout(&ok, 256, Some(&mem)), Ok(()));
        for size in [0, 3, 24, 512] {
            let s = QueueState { size, ..ok.clone() };
            assert_eq!(Queue::check_layout(&s, 256, None), Err(QueueError::Size { size, max: 256 }));
        }
        let s = QueueState { desc: 0x1008, ..ok.clone() };
        assert!(matches!(
            Queue::check_layout(&s, 256, None),
            Err(QueueError::Misaligned { part: Part::Descriptors, .. })
        ));
        let s = QueueState { driver: 0x2001, ..ok.clone() };
        assert!(matches!(
            Queue::check_layout(&s, 256, None),
            Err(QueueError::Misaligned { part: Part::Available, .. })
        ));
        let s = QueueState { device: 0x3002, ..ok.clone() };
        assert!(matches!(Queue::check_layout(&s, 256, None), Err(QueueError::Misaligned { part: Part::Used, .. })));
        // The used ring of 16 entries is 6 + 128 bytes: its last byte
        // must be RAM too.
        let s = QueueState { device: 0x10000 - 132, ..ok.clone() };
        assert!(matches!(
            Queue::check_layout(&s, 256, Some(&mem)),
            Err(QueueError::RingOutsideRam { part: Part::Used, .. })
        ));
        let s = QueueState { device: u64::MAX - 3, ..ok };
        assert!(matches!(Queue::check_layout(&s, 256, Some(&mem)), Err(QueueError::RingOutsideRam { .. })));
    }
}
