//! The virtio-mmio transport with the entropy device behind it, driven by a
//! guest that may do anything: register accesses of any width, a scripted
//! handshake and queue setup (so runs get past the status dance), raw
//! pokes into guest RAM (rings and tables included), descriptor chains of
//! any shape published in the available ring, notifications and interrupt
//! acknowledges.
//!
//! Checks, after every operation:
//! - no panic; the device touches guest RAM only through `VecMemory`
//!   (accesses outside it fail);
//! - the interrupt line is InterruptStatus != 0; DRIVER_OK never stands
//!   without FEATURES_OK;
//! - a device needing a reset does nothing to guest memory but on a reset;
//! - the saved state passes `validate` and restores into a fresh device
//!   that saves the same bytes and then answers the next operation exactly
//!   as the original (register values, guest memory, interrupt line).
//!
//! Input: a feature byte (bit 0 indirect descriptors, bit 1 event index),
//! then operations (see `step`).

use hypervisor::devices::virtio::mmio::{reg, status};
use hypervisor::devices::virtio::queue::VIRTQ_DESC_F_NEXT;
use hypervisor::devices::virtio::rng::{Rng, TestSource};
use hypervisor::devices::virtio::{VecMemory, VirtioMmio, feature};
use hypervisor::devices::{Persist, persist};

use crate::input::Input;

const MAX_STEPS: usize = 64;
const RAM: usize = 0x1_0000;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;

type Dev = VirtioMmio<Rng<TestSource>>;

/// Registers a driver writes, hit more often than raw offsets.
const REGS: [u64; 17] = [
    reg::DEVICE_FEATURES_SEL,
    reg::DRIVER_FEATURES,
    reg::DRIVER_FEATURES_SEL,
    reg::QUEUE_SEL,
    reg::QUEUE_NUM,
    reg::QUEUE_READY,
    reg::QUEUE_NOTIFY,
    reg::INTERRUPT_ACK,
    reg::STATUS,
    reg::QUEUE_DESC_LOW,
    reg::QUEUE_DESC_HIGH,
    reg::QUEUE_DRIVER_LOW,
    reg::QUEUE_DRIVER_HIGH,
    reg::QUEUE_DEVICE_LOW,
    reg::QUEUE_DEVICE_HIGH,
    reg::CONFIG,
    reg::INTERRUPT_STATUS,
];

/// A device and the guest RAM it sees.
#[derive(Clone)]
struct Side {
    dev: Dev,
    mem: VecMemory,
}

/// One guest action; what it read, if anything.
#[derive(Clone, Copy, Debug)]
enum Op {
    Read(u64, u8),
    Write(u64, u8, u64),
    Poke(u64, [u8; 32], usize),
}

impl Side {
    fn apply(&mut self, op: Op) -> Option<u64> {
        match op {
            Op::Read(offset, size) => Some(self.dev.read(offset, size)),
            Op::Write(offset, size, value) => {
                self.dev.write(offset, size, value, &mut self.mem);
                None
            }
            Op::Poke(gpa, bytes, n) => {
                let at = gpa as usize % RAM;
                let n = n.min(RAM - at);
                self.mem.bytes[at..at + n].copy_from_slice(&bytes[..n]);
                None
            }
        }
    }

    fn u16_at(&self, gpa: u64) -> u16 {
        let at = gpa as usize;
        u16::from_le_bytes([self.mem.bytes[at], self.mem.bytes[at + 1]])
    }
}

pub fn virtio(data: &[u8]) {
    let mut input = Input::new(data);
    let features_byte = input.u8();
    let mut features = feature::VERSION_1;
    if features_byte & 1 != 0 {
        features |= feature::INDIRECT_DESC;
    }
    if features_byte & 2 != 0 {
        features |= feature::RING_EVENT_IDX;
    }
    let mut side = Side { dev: VirtioMmio::new(Rng::new(TestSource::default())), mem: VecMemory::new(0, RAM) };
    let mut steps = 0;
    while !input.is_empty() && steps < MAX_STEPS {
        let ops = ops(&mut input, &side, features);
        for op in ops {
            let mut copy = restored(&side);
            let needed_reset = side.dev.status() & status::DEVICE_NEEDS_RESET != 0;
            let before = side.mem.clone();
            let (a, b) = (side.apply(op), copy.apply(op));
            assert_eq!(a, b, "the restored copy answered {op:?} differently");
            assert!(side.mem == copy.mem, "the restored copy wrote guest memory differently after {op:?}");
            assert_eq!(side.dev.save(), copy.dev.save(), "the restored copy diverged after {op:?}");
            let s = side.dev.status();
            assert_eq!(side.dev.interrupt_asserted(), side.dev.interrupt_status() != 0);
            assert!(s & status::DRIVER_OK == 0 || s & status::FEATURES_OK != 0, "DRIVER_OK without FEATURES_OK");
            let is_reset = matches!(op, Op::Write(reg::STATUS, 4, 0));
            if needed_reset && !is_reset && !matches!(op, Op::Poke(..)) {
                assert!(side.mem == before, "a device needing a reset wrote guest memory ({op:?})");
            }
        }
        steps += 1;
    }
}

/// A fresh device given `side`'s saved state: it must take it and save it
/// back unchanged.
fn restored(side: &Side) -> Side {
    let saved = persist::save("virtio-rng", &side.dev);
    let state = match persist::decode::<Dev>("virtio-rng", &saved) {
        Ok(s) => s,
        Err(e) => panic!("a state the guest reached was refused: {e}"),
    };
    let mut dev: Dev = VirtioMmio::new(Rng::new(TestSource::default()));
    dev.restore(state);
    assert_eq!(persist::save("virtio-rng", &dev), saved, "restored state saves differently");
    // The entropy source is the host's, not saved: carry its position.
    *dev.device_mut().source_mut() = side.dev.device().source().clone();
    Side { dev, mem: side.mem.clone() }
}

/// The next operation's guest actions.
fn ops(input: &mut Input<'_>, side: &Side, features: u64) -> Vec<Op> {
    let op = input.u8();
    let w = |offset, value: u32| Op::Write(offset, 4, value.into());
    match op % 8 {
        0 => vec![w(REGS[input.below(REGS.len() as u64) as usize], input.u32())],
        1 => {
            let offset = input.below(0x200);
            let size = [1, 2, 4, 8][usize::from(op >> 3 & 3)];
            if op & 0x20 != 0 { vec![Op::Write(offset, size, input.u64())] } else { vec![Op::Read(offset, size)] }
        }
        2 => vec![Op::Read(REGS[input.below(REGS.len() as u64) as usize], 4)],
        3 => {
            let gpa = input.below(RAM as u64);
            let n = usize::from(input.u8() % 33);
            let src = input.bytes(n);
            let mut bytes = [0u8; 32];
            bytes[..src.len()].copy_from_slice(src);
            vec![Op::Poke(gpa, bytes, src.len())]
        }
        4 => {
            // Linux's probe: reset, ACKNOWLEDGE, DRIVER, features,
            // FEATURES_OK, queue 0 of 2^k entries, DRIVER_OK.
            let size = 1u32 << (input.u8() % 10);
            let up = status::ACKNOWLEDGE | status::DRIVER;
            vec![
                w(reg::STATUS, 0),
                w(reg::STATUS, status::ACKNOWLEDGE),
                w(reg::STATUS, up),
                w(reg::DRIVER_FEATURES_SEL, 0),
                w(reg::DRIVER_FEATURES, features as u32),
                w(reg::DRIVER_FEATURES_SEL, 1),
                w(reg::DRIVER_FEATURES, (features >> 32) as u32),
                w(reg::STATUS, up | status::FEATURES_OK),
                w(reg::QUEUE_SEL, 0),
                w(reg::QUEUE_NUM, size),
                w(reg::QUEUE_DESC_LOW, DESC as u32),
                w(reg::QUEUE_DRIVER_LOW, AVAIL as u32),
                w(reg::QUEUE_DEVICE_LOW, USED as u32),
                w(reg::QUEUE_READY, 1),
                w(reg::STATUS, up | status::FEATURES_OK | status::DRIVER_OK),
            ]
        }
        5 => {
            // A chain of up to four descriptors, then published: each
            // descriptor's index, buffer (in or near RAM), length, flags
            // and next from the input, NEXT chaining them unless the
            // flags say otherwise.
            let size = side.dev.queue(0).map_or(1, |q| q.state().size.max(1));
            let n = 1 + input.u8() % 4;
            let mut out = Vec::new();
            let first = input.u16() % size;
            let mut index = first;
            for k in 0..n {
                let addr = u64::from(input.u16()) + if input.u8() == 0xff { 0xffff_0000 } else { 0 };
                let len = u32::from(input.u16());
                let flags = u16::from(input.u8() & 7) | if k + 1 < n { VIRTQ_DESC_F_NEXT } else { 0 };
                let next = input.u16() % size;
                let mut b = [0u8; 32];
                b[..8].copy_from_slice(&addr.to_le_bytes());
                b[8..12].copy_from_slice(&len.to_le_bytes());
                b[12..14].copy_from_slice(&flags.to_le_bytes());
                b[14..16].copy_from_slice(&next.to_le_bytes());
                out.push(Op::Poke(DESC + 16 * u64::from(index), b, 16));
                index = next;
            }
            let avail_idx = side.u16_at(AVAIL + 2);
            let mut slot = [0u8; 32];
            slot[..2].copy_from_slice(&first.to_le_bytes());
            out.push(Op::Poke(AVAIL + 4 + 2 * u64::from(avail_idx % size), slot, 2));
            let mut idx = [0u8; 32];
            idx[..2].copy_from_slice(&avail_idx.wrapping_add(1).to_le_bytes());
            out.push(Op::Poke(AVAIL + 2, idx, 2));
            out
        }
        6 => vec![w(reg::QUEUE_NOTIFY, u32::from(input.u8() % 2))],
        _ => {
            let s = side.dev.interrupt_status();
            vec![w(reg::INTERRUPT_ACK, s)]
        }
    }
}
