//! The transport, queues and entropy device driven the way Linux's
//! `virtio_mmio` and `virtio_ring` drive them (a mock driver over
//! [`VecMemory`]), then misdriven: every protocol break must end in
//! DEVICE_NEEDS_RESET with guest memory untouched.

use super::mmio::{MmioState, interrupt, reg, status};
use super::queue::{MAX_INDIRECT, QueueState, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
use super::rng::{Rng, TestSource};
use super::*;
use crate::devices::persist::{self, Persist, RestoreError};

const RAM: usize = 0x10_0000;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const BUFFERS: u64 = 0x1_0000;
const SIZE: u16 = 16;
const STATUS_UP: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

type Dev = VirtioMmio<Rng<TestSource>>;

/// What Linux's virtio_mmio + virtio_ring do, by hand.
struct Driver {
    dev: Dev,
    mem: VecMemory,
    /// The driver's copy of avail->idx and of the used idx it has read to.
    avail_idx: u16,
    last_used: u16,
    /// The next free descriptor (this driver never reuses them).
    next_desc: u16,
}

fn entropy(from: u64, n: usize) -> Vec<u8> {
    let mut s = TestSource { state: from, dry: false };
    let mut v = vec![0; n];
    rng::EntropySource::fill(&mut s, &mut v).unwrap();
    v
}

impl Driver {
    fn new() -> Self {
        Driver {
            dev: VirtioMmio::new(Rng::new(TestSource::default())),
            mem: VecMemory::new(0, RAM),
            avail_idx: 0,
            last_used: 0,
            next_desc: 0,
        }
    }

    fn r(&mut self, offset: u64) -> u32 {
        self.dev.read(offset, 4) as u32
    }

    fn w(&mut self, offset: u64, v: u32) {
        self.dev.write(offset, 4, v.into(), &mut self.mem);
    }

    fn u16_at(&self, gpa: u64) -> u16 {
        u16::from_le_bytes(self.mem.bytes[gpa as usize..gpa as usize + 2].try_into().unwrap())
    }

    fn u32_at(&self, gpa: u64) -> u32 {
        u32::from_le_bytes(self.mem.bytes[gpa as usize..gpa as usize + 4].try_into().unwrap())
    }

    fn put(&mut self, gpa: u64, bytes: &[u8]) {
        self.mem.bytes[gpa as usize..gpa as usize + bytes.len()].copy_from_slice(bytes);
    }

    /// `vm_probe` then the handshake of `virtio_dev_probe` up to
    /// FEATURES_OK, accepting `want` of what is offered (or exactly `want`
    /// with `force`); whether FEATURES_OK stuck.
    fn negotiate(&mut self, want: u64, force: bool) -> bool {
        assert_eq!(self.r(reg::MAGIC_VALUE), 0x7472_6976);
        assert_eq!(self.r(reg::VERSION), 2);
        assert_eq!(self.r(reg::DEVICE_ID), 4);
        self.w(reg::STATUS, 0);
        assert_eq!(self.r(reg::STATUS), 0, "reset is immediate");
        self.w(reg::STATUS, status::ACKNOWLEDGE);
        self.w(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        self.w(reg::DEVICE_FEATURES_SEL, 1);
        let mut offered = u64::from(self.r(reg::DEVICE_FEATURES)) << 32;
        self.w(reg::DEVICE_FEATURES_SEL, 0);
        offered |= u64::from(self.r(reg::DEVICE_FEATURES));
        assert_eq!(offered, feature::TRANSPORT, "entropy has no feature bits of its own");
        let accept = if force { want } else { offered & want };
        self.w(reg::DRIVER_FEATURES_SEL, 1);
        self.w(reg::DRIVER_FEATURES, (accept >> 32) as u32);
        self.w(reg::DRIVER_FEATURES_SEL, 0);
        self.w(reg::DRIVER_FEATURES, accept as u32);
        self.w(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        self.r(reg::STATUS) & status::FEATURES_OK != 0
    }

    /// `vm_setup_vq` for queue 0 with `size` entries at the test addresses.
    fn setup_queue(&mut self, size: u16) {
        self.w(reg::QUEUE_SEL, 0);
        assert_eq!(self.r(reg::QUEUE_READY), 0);
        assert_eq!(self.r(reg::QUEUE_NUM_MAX), 256);
        self.w(reg::QUEUE_NUM, size.into());
        for (low, gpa) in [(reg::QUEUE_DESC_LOW, DESC), (reg::QUEUE_DRIVER_LOW, AVAIL), (reg::QUEUE_DEVICE_LOW, USED)] {
            self.w(low, gpa as u32);
            self.w(low + 4, (gpa >> 32) as u32);
        }
        self.w(reg::QUEUE_READY, 1);
    }

    /// A driver up and running with `features`, queue 0 of [`SIZE`].
    fn up(features: u64) -> Self {
        let mut d = Driver::new();
        assert!(d.negotiate(features, false));
        d.setup_queue(SIZE);
        assert_eq!(d.r(reg::QUEUE_READY), 1);
        d.w(reg::STATUS, STATUS_UP);
        assert_eq!(d.r(reg::STATUS), STATUS_UP);
        d
    }

    fn desc(&mut self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&addr.to_le_bytes());
        b[8..12].copy_from_slice(&len.to_le_bytes());
        b[12..14].copy_from_slice(&flags.to_le_bytes());
        b[14..].copy_from_slice(&next.to_le_bytes());
        self.put(table + 16 * u64::from(i), &b);
    }

    /// Make `head` available (ring entry, then the barrier, then idx).
    fn publish(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % SIZE);
        self.put(AVAIL + 4 + 2 * slot, &head.to_le_bytes());
        self.avail_idx = self.avail_idx.wrapping_add(1);
        let idx = self.avail_idx;
        self.put(AVAIL + 2, &idx.to_le_bytes());
    }

    /// `virtqueue_add` of a chain of `(addr, len, device-writable)`
    /// buffers; its head.
    fn post(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc % SIZE;
        for (k, &(addr, len, write)) in bufs.iter().enumerate() {
            let i = self.next_desc % SIZE;
            let next = (i + 1) % SIZE;
            let last = k + 1 == bufs.len();
            let flags = if write { VIRTQ_DESC_F_WRITE } else { 0 } | if last { 0 } else { VIRTQ_DESC_F_NEXT };
            self.desc(DESC, i, addr, len, flags, next);
            self.next_desc = next;
        }
        self.publish(head);
        head
    }

    fn kick(&mut self) {
        self.w(reg::QUEUE_NOTIFY, 0);
    }

    /// `virtqueue_get_buf` until empty: (head, len) of each used entry.
    fn used(&mut self) -> Vec<(u32, u32)> {
        let idx = self.u16_at(USED + 2);
        let mut out = Vec::new();
        while self.last_used != idx {
            let e = USED + 4 + 8 * u64::from(self.last_used % SIZE);
            out.push((self.u32_at(e), self.u32_at(e + 4)));
            self.last_used = self.last_used.wrapping_add(1);
        }
        out
    }

    /// `vm_interrupt`: read InterruptStatus and acknowledge it.
    fn ack(&mut self) -> u32 {
        let s = self.r(reg::INTERRUPT_STATUS);
        self.w(reg::INTERRUPT_ACK, s);
        assert!(!self.dev.interrupt_asserted());
        s
    }

    fn buffer(&self, gpa: u64, len: usize) -> &[u8] {
        &self.mem.bytes[gpa as usize..gpa as usize + len]
    }
}

const FEATURES: u64 = feature::VERSION_1 | feature::INDIRECT_DESC | feature::RING_EVENT_IDX;

#[test]
fn entropy_reaches_the_guest_end_to_end() {
    for features in [feature::VERSION_1, FEATURES] {
        let mut d = Driver::up(features);
        assert!(!d.dev.interrupt_asserted());
        // One chain of two buffers (16 + 48 bytes), one of 64.
        let a = d.post(&[(BUFFERS, 16, true), (BUFFERS + 0x100, 48, true)]);
        let b = d.post(&[(BUFFERS + 0x200, 64, true)]);
        d.kick();
        assert!(d.dev.interrupt_asserted(), "level raised");
        assert_eq!(d.used(), [(a.into(), 64), (b.into(), 64)]);
        let all = entropy(0, 128);
        assert_eq!(d.buffer(BUFFERS, 16), &all[..16]);
        assert_eq!(d.buffer(BUFFERS + 0x100, 48), &all[16..64]);
        assert_eq!(d.buffer(BUFFERS + 0x200, 64), &all[64..]);
        assert_eq!(d.buffer(BUFFERS + 16, 16), &[0; 16], "nothing past a buffer");
        assert_eq!(d.ack(), interrupt::USED_BUFFER);
        // A kick with nothing new: no interrupt.
        d.kick();
        assert!(!d.dev.interrupt_asserted());
        if features & feature::RING_EVENT_IDX != 0 {
            // The device asked to hear of the next entry (avail_event).
            assert_eq!(d.u16_at(USED + 4 + 8 * u64::from(SIZE)), 2);
        }
        // Around the ring: 40 more single buffers, 16 at a time at most.
        for round in 0..4u64 {
            let heads: Vec<u16> =
                (0..10).map(|k| d.post(&[(BUFFERS + 0x1000 * (round + 1) + 0x40 * k, 8, true)])).collect();
            d.kick();
            let used: Vec<(u32, u32)> = heads.iter().map(|&h| (h.into(), 8)).collect();
            assert_eq!(d.used(), used);
            d.ack();
        }
        assert_eq!(d.dev.status() & status::DEVICE_NEEDS_RESET, 0);
    }
}

#[test]
fn indirect_tables_are_followed() {
    let mut d = Driver::up(FEATURES);
    let table = 0x8000;
    d.desc(table, 0, BUFFERS, 8, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 2);
    d.desc(table, 2, BUFFERS + 0x40, 24, VIRTQ_DESC_F_WRITE, 0);
    // The WRITE flag of the indirect descriptor itself is ignored
    // (2.7.5.3.2); the table need not be in descriptor order.
    d.desc(DESC, 5, table, 48, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_WRITE, 0);
    d.publish(5);
    d.kick();
    assert_eq!(d.used(), [(5, 32)]);
    let all = entropy(0, 32);
    assert_eq!((d.buffer(BUFFERS, 8), d.buffer(BUFFERS + 0x40, 24)), (&all[..8], &all[8..]));
}

#[test]
fn interrupts_are_suppressed_as_the_driver_asks() {
    // Without EVENT_IDX: VIRTQ_AVAIL_F_NO_INTERRUPT.
    let mut d = Driver::up(feature::VERSION_1);
    d.put(AVAIL, &1u16.to_le_bytes());
    d.post(&[(BUFFERS, 8, true)]);
    d.kick();
    assert_eq!(d.used().len(), 1, "the buffer is used");
    assert!(!d.dev.interrupt_asserted(), "but not announced");
    // With EVENT_IDX: used_event = 2 means "after entry 2 is used".
    let mut d = Driver::up(FEATURES);
    d.put(AVAIL + 4 + 2 * u64::from(SIZE), &2u16.to_le_bytes());
    d.post(&[(BUFFERS, 8, true)]);
    d.post(&[(BUFFERS + 8, 8, true)]);
    d.kick();
    assert!(!d.dev.interrupt_asserted(), "used idx 0 -> 2 did not pass 2");
    d.post(&[(BUFFERS + 16, 8, true)]);
    d.kick();
    assert!(d.dev.interrupt_asserted(), "2 -> 3 passed it");
    assert_eq!(d.used().len(), 3);
}

#[test]
fn a_dry_source_leaves_the_buffer_for_later() {
    let mut d = Driver::up(FEATURES);
    d.dev.device_mut().source_mut().dry = true;
    d.post(&[(BUFFERS, 8, true)]);
    d.kick();
    assert_eq!(d.used(), []);
    assert_eq!(d.dev.status(), STATUS_UP, "not the guest's fault");
    d.dev.device_mut().source_mut().dry = false;
    d.kick();
    assert_eq!(d.used(), [(0, 8)]);
}

#[test]
fn the_handshake_refuses_what_the_spec_forbids() {
    // Features not offered, or no VERSION_1: FEATURES_OK does not stick.
    let mut d = Driver::new();
    assert!(!d.negotiate(FEATURES | 1, true));
    assert!(!d.negotiate(feature::RING_EVENT_IDX, true), "a legacy driver");
    assert!(d.negotiate(FEATURES, false));
    // Features after FEATURES_OK are ignored.
    d.w(reg::DRIVER_FEATURES_SEL, 0);
    d.w(reg::DRIVER_FEATURES, 0);
    assert_eq!(d.dev.save().driver_features, FEATURES);
    // Clearing a bit, DRIVER_OK without FEATURES_OK: ignored.
    let before = d.dev.save();
    d.w(reg::STATUS, status::ACKNOWLEDGE);
    d.w(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK);
    d.w(reg::STATUS, STATUS_UP | 0x100);
    assert_eq!(d.dev.save(), before);
    // A notify before DRIVER_OK does nothing.
    d.setup_queue(SIZE);
    d.post(&[(BUFFERS, 8, true)]);
    d.kick();
    assert_eq!(d.used(), []);
    d.w(reg::STATUS, STATUS_UP);
    // Queue setup after DRIVER_OK is ignored.
    let before = d.dev.save();
    d.w(reg::QUEUE_NUM, 8);
    d.w(reg::QUEUE_DESC_LOW, 0x5000);
    d.w(reg::QUEUE_READY, 1);
    assert_eq!(d.dev.save(), before);
    d.kick();
    assert_eq!(d.used(), [(0, 8)]);
    // Narrow accesses to control registers: read 0, writes dropped.
    assert_eq!(d.dev.read(reg::MAGIC_VALUE, 1), 0);
    d.dev.write(reg::STATUS, 1, 0, &mut d.mem);
    assert_eq!(d.r(reg::STATUS), STATUS_UP);
    // No queue 1; no shared memory; no configuration space.
    d.w(reg::QUEUE_SEL, 1);
    assert_eq!((d.r(reg::QUEUE_NUM_MAX), d.r(reg::QUEUE_READY)), (0, 0));
    assert_eq!(d.r(reg::SHM_LEN_LOW), u32::MAX);
    assert_eq!(d.dev.read(reg::CONFIG, 4), 0);
    assert_eq!(d.dev.read(0x800, 4), 0, "past the window, in the page");
    d.dev.write(0x800, 4, 1, &mut d.mem);
    assert_eq!(d.r(reg::VENDOR_ID), mmio::VENDOR_ID);
    // Reset: all back to power-on.
    d.w(reg::STATUS, 0);
    assert_eq!(d.dev.save(), Driver::new().dev.save());
}

/// What each hostile case does to a running device's rings (after one good
/// chain went through).
type Hostile = fn(&mut Driver);

fn hostile_cases() -> Vec<(&'static str, Hostile, QueueError)> {
    vec![
        ("head out of range", |d| d.publish(SIZE), QueueError::HeadOutOfRange { index: SIZE, size: SIZE }),
        (
            "next out of range",
            |d| {
                d.desc(DESC, 3, BUFFERS, 8, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, SIZE);
                d.publish(3);
            },
            QueueError::NextOutOfRange { index: SIZE, entries: SIZE.into() },
        ),
        (
            "a loop",
            |d| {
                d.desc(DESC, 3, BUFFERS, 8, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 4);
                d.desc(DESC, 4, BUFFERS, 8, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 3);
                d.publish(3);
            },
            QueueError::ChainTooLong { limit: SIZE.into() },
        ),
        (
            "a descriptor naming itself",
            |d| {
                d.desc(DESC, 3, BUFFERS, 8, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 3);
                d.publish(3);
            },
            QueueError::ChainTooLong { limit: SIZE.into() },
        ),
        (
            "a buffer past RAM",
            |d| {
                d.post(&[(RAM as u64 - 8, 16, true)]);
            },
            QueueError::BufferOutsideRam { gpa: RAM as u64 - 8, len: 16 },
        ),
        (
            "a buffer wrapping the address space",
            |d| {
                d.post(&[(u64::MAX - 3, 16, true)]);
            },
            QueueError::BufferOutsideRam { gpa: u64::MAX - 3, len: 16 },
        ),
        (
            "readable after writable",
            |d| {
                d.post(&[(BUFFERS, 8, true), (BUFFERS + 8, 8, false)]);
            },
            QueueError::ReadableAfterWritable,
        ),
        (
            "a readable buffer for the entropy device",
            |d| {
                d.post(&[(BUFFERS, 8, false), (BUFFERS + 8, 8, true)]);
            },
            QueueError::Direction,
        ),
        (
            "no room at all",
            |d| {
                d.post(&[(BUFFERS, 0, true)]);
            },
            QueueError::TooShort { needed: 1, found: 0 },
        ),
        (
            "more than 4 GiB",
            |d| {
                d.post(&[(BUFFERS, 16, true), (BUFFERS, u32::MAX - 8, true)]);
            },
            QueueError::ChainTooLarge,
        ),
        (
            "avail idx jumping past the queue size",
            |d| {
                let jump = d.avail_idx.wrapping_add(SIZE + 1);
                d.put(AVAIL + 2, &jump.to_le_bytes());
            },
            QueueError::AvailJump { next_avail: 1, avail_idx: 1 + SIZE + 1 },
        ),
        (
            "indirect with next",
            |d| {
                d.desc(DESC, 3, 0x8000, 16, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 4);
                d.publish(3);
            },
            QueueError::IndirectWithNext,
        ),
        (
            "nested indirect",
            |d| {
                d.desc(0x8000, 0, 0x9000, 16, VIRTQ_DESC_F_INDIRECT, 0);
                d.desc(DESC, 3, 0x8000, 16, VIRTQ_DESC_F_INDIRECT, 0);
                d.publish(3);
            },
            QueueError::NestedIndirect,
        ),
        (
            "an indirect table of 20 bytes",
            |d| {
                d.desc(DESC, 3, 0x8000, 20, VIRTQ_DESC_F_INDIRECT, 0);
                d.publish(3);
            },
            QueueError::IndirectLength { len: 20 },
        ),
        (
            "an empty indirect table",
            |d| {
                d.desc(DESC, 3, 0x8000, 0, VIRTQ_DESC_F_INDIRECT, 0);
                d.publish(3);
            },
            QueueError::IndirectLength { len: 0 },
        ),
        (
            "an indirect table too large",
            |d| {
                d.desc(DESC, 3, 0x8000, (MAX_INDIRECT + 1) * 16, VIRTQ_DESC_F_INDIRECT, 0);
                d.publish(3);
            },
            QueueError::IndirectLength { len: (MAX_INDIRECT + 1) * 16 },
        ),
        (
            "an indirect table past RAM",
            |d| {
                d.desc(DESC, 3, RAM as u64 - 16, 32, VIRTQ_DESC_F_INDIRECT, 0);
                d.publish(3);
            },
            QueueError::BufferOutsideRam { gpa: RAM as u64 - 16, len: 32 },
        ),
        (
            "a loop in an indirect table",
            |d| {
                d.desc(0x8000, 0, BUFFERS, 8, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1);
                d.desc(0x8000, 1, BUFFERS, 8, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 0);
                d.desc(DESC, 3, 0x8000, 32, VIRTQ_DESC_F_INDIRECT, 0);
                d.publish(3);
            },
            QueueError::ChainTooLong { limit: 2 },
        ),
        (
            "next past an indirect table",
            |d| {
                d.desc(0x8000, 0, BUFFERS, 8, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 2);
                d.desc(DESC, 3, 0x8000, 32, VIRTQ_DESC_F_INDIRECT, 0);
                d.publish(3);
            },
            QueueError::NextOutOfRange { index: 2, entries: 2 },
        ),
    ]
}

/// A device that took one good chain, then `hostile`: DEVICE_NEEDS_RESET,
/// a configuration change interrupt, guest memory as the driver left it,
/// and no more queue work until a reset, after which it works again.
fn check_hostile(features: u64, name: &str, hostile: Hostile) {
    let mut d = Driver::up(features);
    d.post(&[(BUFFERS, 8, true)]);
    d.kick();
    assert_eq!(d.used(), [(0, 8)]);
    d.ack();
    d.next_desc = 1;
    hostile(&mut d);
    let mem = d.mem.clone();
    let queue = d.dev.queue(0).unwrap().state().clone();
    d.kick();
    assert_eq!(d.dev.status(), STATUS_UP | status::DEVICE_NEEDS_RESET, "{name}");
    assert_eq!(d.dev.interrupt_status(), interrupt::CONFIG, "{name}: a config interrupt, no used one");
    assert!(d.mem == mem, "{name}: guest memory changed");
    assert_eq!(d.dev.queue(0).unwrap().state(), &queue, "{name}: the queue moved");
    // Stays put: more kicks do nothing, even with a good chain.
    d.ack();
    d.post(&[(BUFFERS, 8, true)]);
    let mem = d.mem.clone();
    d.kick();
    assert!(d.mem == mem && !d.dev.interrupt_asserted(), "{name}: worked while needing a reset");
    // The saved state of a device needing a reset restores.
    let saved = persist::save("virtio", &d.dev);
    persist::decode::<Dev>("virtio", &saved).unwrap();
    // A reset and a new handshake bring it back.
    d.mem = VecMemory::new(0, RAM);
    (d.avail_idx, d.last_used, d.next_desc) = (0, 0, 0);
    assert!(d.negotiate(features, false));
    d.setup_queue(SIZE);
    d.w(reg::STATUS, STATUS_UP);
    d.post(&[(BUFFERS, 8, true)]);
    d.kick();
    assert_eq!(d.used(), [(0, 8)], "{name}: after the reset");
}

#[test]
fn every_hostile_ring_ends_in_needs_reset_and_nothing_else() {
    for (name, hostile, expected) in hostile_cases() {
        // The error itself, from the queue directly.
        let mut d = Driver::up(FEATURES);
        d.post(&[(BUFFERS, 8, true)]);
        d.kick();
        d.next_desc = 1;
        hostile(&mut d);
        let mut q = d.dev.queue(0).unwrap().clone();
        let got = q.pop(&mut d.mem).and_then(|c| {
            let c = c.expect("a chain");
            if !c.readable.is_empty() {
                return Err(QueueError::Direction);
            }
            if c.writable_len() == 0 {
                return Err(QueueError::TooShort { needed: 1, found: 0 });
            }
            Ok(())
        });
        assert_eq!(got, Err(expected), "{name}");
        check_hostile(FEATURES, name, hostile);
    }
    // Indirect descriptors without the feature.
    let indirect: Hostile = |d| {
        d.desc(0x8000, 0, BUFFERS, 8, VIRTQ_DESC_F_WRITE, 0);
        d.desc(DESC, 3, 0x8000, 16, VIRTQ_DESC_F_INDIRECT, 0);
        d.publish(3);
    };
    check_hostile(feature::VERSION_1, "indirect not negotiated", indirect);
}

#[test]
fn bad_queue_setup_needs_a_reset() {
    let cases: [(&str, Hostile); 6] = [
        ("size 12", |d| d.w(reg::QUEUE_NUM, 12)),
        ("size 512", |d| d.w(reg::QUEUE_NUM, 512)),
        ("size 2^16", |d| d.w(reg::QUEUE_NUM, 1 << 16)),
        ("descriptors misaligned", |d| d.w(reg::QUEUE_DESC_LOW, DESC as u32 + 8)),
        ("used ring misaligned", |d| d.w(reg::QUEUE_DEVICE_LOW, USED as u32 + 2)),
        ("available ring past RAM", |d| d.w(reg::QUEUE_DRIVER_HIGH, 1)),
    ];
    for (name, bad) in cases {
        let mut d = Driver::new();
        assert!(d.negotiate(FEATURES, false));
        d.w(reg::QUEUE_SEL, 0);
        d.w(reg::QUEUE_NUM, SIZE.into());
        for (low, gpa) in [(reg::QUEUE_DESC_LOW, DESC), (reg::QUEUE_DRIVER_LOW, AVAIL), (reg::QUEUE_DEVICE_LOW, USED)] {
            d.w(low, gpa as u32);
        }
        bad(&mut d);
        d.w(reg::QUEUE_READY, 1);
        assert_eq!(d.r(reg::QUEUE_READY), 0, "{name}");
        assert_ne!(d.r(reg::STATUS) & status::DEVICE_NEEDS_RESET, 0, "{name}");
        assert_eq!(d.dev.interrupt_status(), 0, "{name}: no interrupt before DRIVER_OK");
        assert!(d.mem == VecMemory::new(0, RAM), "{name}");
        // The state a guest reached saves and restores.
        persist::decode::<Dev>("virtio", &persist::save("virtio", &d.dev)).unwrap();
    }
}

#[test]
fn a_restored_device_continues_the_queue_where_it_stopped() {
    let mut d = Driver::up(FEATURES);
    d.post(&[(BUFFERS, 8, true)]);
    d.post(&[(BUFFERS + 8, 8, true)]);
    d.kick();
    // One more posted but not yet kicked, the interrupt not yet taken.
    d.post(&[(BUFFERS + 16, 8, true)]);
    let saved = persist::save("virtio-rng", &d.dev);
    assert_eq!(saved.version, 1);
    let mut copy = Driver::new();
    copy.mem = d.mem.clone();
    copy.dev.restore(persist::decode::<Dev>("virtio-rng", &saved).unwrap());
    assert_eq!(persist::save("virtio-rng", &copy.dev), saved, "saves what it was given");
    assert!(copy.dev.interrupt_asserted(), "the pending interrupt came along");
    // The entropy source is the host's: give the copy the same position.
    *copy.dev.device_mut().source_mut() = d.dev.device().source().clone();
    (copy.avail_idx, copy.last_used, copy.next_desc) = (d.avail_idx, d.last_used, d.next_desc);
    d.kick();
    copy.kick();
    assert!(copy.mem == d.mem, "the same used entry and bytes");
    assert_eq!(copy.used(), [(0, 8), (1, 8), (2, 8)]);
    assert_eq!(copy.dev.save(), d.dev.save());
}

#[test]
fn impossible_states_are_refused() {
    let d = Driver::up(FEATURES);
    let good = d.dev.save();
    assert_eq!(Dev::validate(&good), Ok(()));
    let q = |f: fn(&mut QueueState)| {
        let mut s = good.clone();
        f(&mut s.queues[0]);
        s
    };
    let cases: Vec<(MmioState<()>, &str)> = vec![
        (q(|q| q.size = 12), "a queue size is not a power of two up to the maximum"),
        (q(|q| q.size = 512), "a queue size is not a power of two up to the maximum"),
        (q(|q| q.desc += 8), "a ready queue's rings are misaligned"),
        (q(|q| q.device += 2), "a ready queue's rings are misaligned"),
        (q(|q| q.next_avail = 17), "a queue has more in flight than it has entries"),
        (q(|q| q.next_used = 1), "a queue has more in flight than it has entries"),
        (MmioState { status: status::ACKNOWLEDGE | 0x10, ..good.clone() }, "the status has bits no device sets"),
        (MmioState { status: status::DRIVER_OK, ..good.clone() }, "DRIVER_OK without FEATURES_OK"),
        (MmioState { driver_features: 0, ..good.clone() }, "the accepted features are not ones a device offers"),
        (
            MmioState { driver_features: FEATURES | 1 << 40, ..good.clone() },
            "the accepted features are not ones a device offers",
        ),
        (MmioState { interrupt_status: 4, ..good.clone() }, "the interrupt status has undefined bits"),
        (MmioState { queues: vec![], ..good.clone() }, "the number of queues is not the device's"),
        (MmioState { status: status::ACKNOWLEDGE, ..good.clone() }, "a queue is ready before FEATURES_OK"),
    ];
    for (state, why) in cases {
        let mut saved = persist::save("virtio-rng", &d.dev);
        saved.bytes = postcard::to_allocvec(&state).unwrap();
        assert_eq!(
            persist::decode::<Dev>("virtio-rng", &saved),
            Err(RestoreError::Invalid { device: "virtio-rng", why })
        );
    }
    // Unaligned addresses of a queue not yet ready are a driver midway.
    let mut s = Driver::new().dev.save();
    s.queues[0].desc = 3;
    assert_eq!(Dev::validate(&s), Ok(()));
}

/// Guest RAM with some pages not here yet (a post-copy migration's): an
/// access to one fails, and `here` says so.
struct Partial<'a> {
    ram: &'a mut VecMemory,
    away: Vec<u64>,
}

impl Partial<'_> {
    fn touches_away(&self, gpa: u64, len: u64) -> bool {
        (gpa >> 12..=(gpa + len.max(1) - 1) >> 12).any(|p| self.away.contains(&p))
    }
}

impl GuestMemory for Partial<'_> {
    fn read(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), OutsideRam> {
        if self.touches_away(gpa, buf.len() as u64) {
            return Err(OutsideRam { gpa, len: buf.len() as u64 });
        }
        self.ram.read(gpa, buf)
    }

    fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), OutsideRam> {
        if self.touches_away(gpa, data.len() as u64) {
            return Err(OutsideRam { gpa, len: data.len() as u64 });
        }
        self.ram.write(gpa, data)
    }

    fn is_ram(&self, gpa: u64, len: u64) -> bool {
        self.ram.is_ram(gpa, len)
    }

    fn here(&mut self, gpa: u64, len: u64) -> bool {
        !self.touches_away(gpa, len)
    }
}

#[test]
fn a_dry_run_finds_every_page_a_notification_would_reach_and_changes_nothing() {
    let mut d = Driver::up(FEATURES);
    // A direct chain whose second buffer is on its own page, and an
    // indirect one whose table is on another.
    let a = d.post(&[(BUFFERS, 16, true), (BUFFERS + 0x3000, 16, true)]);
    let table = 0x8000;
    d.desc(table, 0, BUFFERS + 0x5000, 8, VIRTQ_DESC_F_WRITE, 0);
    d.desc(DESC, 7, table, 16, VIRTQ_DESC_F_INDIRECT, 0);
    d.publish(7);
    let before = d.mem.clone();
    for (away, here) in [
        (vec![], true),
        (vec![(BUFFERS + 0x3000) >> 12], false),
        (vec![table >> 12], false),
        (vec![(BUFFERS + 0x5000) >> 12], false),
        (vec![AVAIL >> 12], false),
        (vec![USED >> 12], false),
        (vec![(BUFFERS + 0x7000) >> 12], true),
    ] {
        let mut mem = Partial { ram: &mut d.mem, away: away.clone() };
        assert_eq!(d.dev.queue_here(0, &mut mem), here, "away {away:x?}");
        assert!(d.dev.write_can_go(reg::QUEUE_NOTIFY, 4, 0, &mut mem) == here);
        assert!(d.dev.write_can_go(reg::QUEUE_SEL, 4, 0, &mut mem), "no other register waits");
        assert_eq!(d.mem, before, "a dry run writes nothing");
    }
    // The real notification serves both chains, as if no dry run had been.
    d.kick();
    assert_eq!(d.used(), [(a.into(), 32), (7, 8)]);
    // With the ring empty and EVENT_IDX, a real look at it writes
    // avail_event; the dry run does not.
    let avail_event = USED + 4 + 8 * u64::from(SIZE);
    d.put(avail_event, &[0xff, 0xff]);
    let mut mem = Partial { ram: &mut d.mem, away: vec![] };
    assert!(d.dev.queue_here(0, &mut mem));
    assert_eq!(d.u16_at(avail_event), 0xffff);
    d.kick();
    assert_eq!(d.u16_at(avail_event), 2, "the real look did");
}
