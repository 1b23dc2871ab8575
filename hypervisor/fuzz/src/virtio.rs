//! The virtio-mmio transport with any of the five devices behind it
//! (entropy, block, console, network, balloon), driven by a guest that may
//! do anything: register accesses of any width, a scripted handshake and
//! setup of every queue (so runs get past the status dance), raw pokes
//! into guest RAM (rings and tables included), descriptor chains of any
//! shape published in any queue's available ring, notifications of any
//! queue index and interrupt acknowledges — and by the host, through each
//! device's own operations (see [`Fuzzed`]).
//!
//! Checks, after every operation:
//! - before every register write, the post-copy dry run of what it would
//!   reach (`VirtioMmio::write_can_go`) writes no guest memory and leaves
//!   the device as it was;
//! - no panic; the device touches guest RAM only through `VecMemory`
//!   (accesses outside it fail);
//! - the interrupt line is InterruptStatus != 0; DRIVER_OK never stands
//!   without FEATURES_OK;
//! - a device needing a reset does nothing to guest memory but on a reset
//!   (host operations included);
//! - the saved state passes `validate` and restores into a fresh device
//!   (built as the host builds one, host-side parts such as the disk or
//!   the entropy source's position carried over) that saves the same
//!   bytes, then answers the next operation exactly as the original
//!   (register values, host-operation results, guest memory, the whole
//!   device afterwards);
//! - per device ([`Fuzzed::check`]): block: the disk changes only on a
//!   QueueNotify of a running, writable device whose backend works, and
//!   only if its write counter grew (an OUT request answered OK);
//!   console: output taken never exceeds `MAX_OUTPUT`, lines carry no
//!   control characters and none come while a terminal is attached; net:
//!   every frame taken or accepted for the guest is 14..=`MAX_FRAME`
//!   bytes; balloon: every action is non-empty, within a chain's bound and
//!   made of 4 KiB-aligned page frames (or whole-page ranges).
//!
//! `regressions/virtio/balloon-same-head-published-twice` keeps the input
//! of the one device bug this target found (a head published twice was
//! held twice, a state the balloon's own `validate` refuses; the device
//! now refuses the second copy and needs a reset).
//!
//! Structure: the guest's side is one generic driver over
//! `VirtioMmio<D>`; what differs per device is the [`Fuzzed`] trait: its
//! saved-state name, how the host builds a fresh one, what of it the host
//! owns (not saved), its host operations and their invariants. So every
//! transport check runs for every device from one body ([`run`]).
//!
//! Input: a first byte choosing the device and the features the handshake
//! accepts, then operations (see [`ops`]). First byte: bits 0-1 transport
//! features (indirect descriptors, event index); bits 2-4 the device (0
//! and 5 entropy, 1 block, 6 read-only block, 2 and 7 console, 3 net, 4
//! balloon: the entropy seeds from before the other devices still start
//! with 0-3); bits 5-7 accept the device's 1st, 2nd, 3rd offered
//! device-specific feature bit.

use core::fmt::Debug;

use hypervisor::devices::virtio::balloon::{self, Balloon, BalloonAction};
use hypervisor::devices::virtio::block::{self, Block, VecDisk};
use hypervisor::devices::virtio::console::{self, Console};
use hypervisor::devices::virtio::mmio::{reg, status};
use hypervisor::devices::virtio::net::{self, Net};
use hypervisor::devices::virtio::queue::VIRTQ_DESC_F_NEXT;
use hypervisor::devices::virtio::rng::{Rng, TestSource};
use hypervisor::devices::virtio::{VecMemory, VirtioDevice, VirtioMmio, feature};
use hypervisor::devices::{Persist, persist};

use crate::input::Input;

const MAX_STEPS: usize = 64;
const RAM: usize = 0x1_0000;
/// Queue `q`'s rings: descriptors at `RINGS + STRIDE * q`, the available
/// ring 4 KiB above, the used ring 8 KiB above (room for 256 entries each;
/// four queues end at 0xc806, inside RAM).
const RINGS: u64 = 0x1000;
const RING_STRIDE: u64 = 0x3000;
/// The block device's disk: 32 sectors and a tail that is not a whole one.
const DISK: usize = 32 * 512 + 100;
const SERIAL: &str = "fuzz-disk";
const MAC: [u8; 6] = [0x02, 0, 0, 0, 1, 0];

fn desc(q: usize) -> u64 {
    RINGS + RING_STRIDE * q as u64
}

fn avail(q: usize) -> u64 {
    desc(q) + 0x1000
}

fn used(q: usize) -> u64 {
    desc(q) + 0x2000
}

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

/// What an operation gave back, compared between the original and its
/// restored copy.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    Nothing,
    Value(u64),
    Bytes(Vec<u8>),
    Lines(Vec<String>),
    Frames(Vec<Vec<u8>>),
    Actions(Vec<BalloonAction>),
}

/// One action of the guest (register access, RAM poke) or of the host.
#[derive(Clone, Debug)]
enum Op<H> {
    Read(u64, u8),
    Write(u64, u8, u64),
    Poke(u64, [u8; 32], usize),
    Host(H),
}

/// A device as the target drives it: the host's side of it.
trait Fuzzed: VirtioDevice + Persist + Clone + PartialEq + Debug + Sized {
    /// Its name in a VM's saved state.
    const NAME: &'static str;
    /// The host's operations on it.
    type HostOp: Clone + Debug;

    /// A device as the host builds one to restore into: the same host
    /// configuration as `like` (read-only disk or not), nothing else.
    fn fresh(like: &Self) -> Self;

    /// Give `to` what of `from` the host owns and does not save (disk
    /// contents, entropy source position, attached terminal).
    fn carry_host(_from: &Self, _to: &mut Self) {}

    /// The next host operation.
    fn host_op(input: &mut Input<'_>) -> Self::HostOp;

    /// Do it, as the VM wiring would.
    fn host(dev: &mut VirtioMmio<Self>, mem: &mut VecMemory, op: &Self::HostOp) -> Answer;

    /// Device-specific promises about `op`, which took the device from
    /// `before` to `after` and answered `answer`.
    fn check(_before: &VirtioMmio<Self>, _after: &VirtioMmio<Self>, _op: &Op<Self::HostOp>, _answer: &Answer) {}
}

/// Whether the transport lets the device work: DRIVER_OK, neither failed
/// nor waiting for a reset.
fn running(status: u32) -> bool {
    status & (status::DRIVER_OK | status::FAILED | status::DEVICE_NEEDS_RESET) == status::DRIVER_OK
}

/// The host's entropy source runs dry or recovers.
#[derive(Clone, Copy, Debug)]
enum RngOp {
    Dry(bool),
}

impl Fuzzed for Rng<TestSource> {
    const NAME: &'static str = "virtio-rng";
    type HostOp = RngOp;

    fn fresh(_: &Self) -> Self {
        Rng::new(TestSource::default())
    }

    fn carry_host(from: &Self, to: &mut Self) {
        *to.source_mut() = from.source().clone();
    }

    fn host_op(input: &mut Input<'_>) -> RngOp {
        RngOp::Dry(input.bool())
    }

    fn host(dev: &mut VirtioMmio<Self>, _: &mut VecMemory, op: &RngOp) -> Answer {
        let RngOp::Dry(on) = *op;
        dev.device_mut().source_mut().dry = on;
        Answer::Nothing
    }
}

/// The disk fails every access, or works again.
#[derive(Clone, Copy, Debug)]
enum BlockOp {
    Fail(bool),
}

impl Fuzzed for Block<VecDisk> {
    const NAME: &'static str = "virtio-blk";
    type HostOp = BlockOp;

    fn fresh(like: &Self) -> Self {
        Block::new(VecDisk::new(DISK), SERIAL, like.features() & block::feature::RO != 0)
    }

    fn carry_host(from: &Self, to: &mut Self) {
        to.set_backend(from.backend().clone());
    }

    fn host_op(input: &mut Input<'_>) -> BlockOp {
        BlockOp::Fail(input.bool())
    }

    fn host(dev: &mut VirtioMmio<Self>, _: &mut VecMemory, op: &BlockOp) -> Answer {
        let BlockOp::Fail(on) = *op;
        let mut disk = dev.device().backend().clone();
        disk.fail = on;
        dev.device_mut().set_backend(disk);
        Answer::Nothing
    }

    fn check(before: &VirtioMmio<Self>, after: &VirtioMmio<Self>, op: &Op<BlockOp>, _: &Answer) {
        let (b, a) = (before.device(), after.device());
        if a.backend().bytes == b.backend().bytes {
            return;
        }
        assert!(matches!(op, Op::Write(reg::QUEUE_NOTIFY, 4, _)), "the disk changed on {op:?}");
        assert!(running(before.status()), "the disk changed while the device was not running");
        assert!(!b.backend().fail, "the disk changed while its backend failed");
        assert_eq!(b.features() & block::feature::RO, 0, "a read-only disk changed");
        assert!(a.counters().writes > b.counters().writes, "the disk changed without an OUT request answered OK");
    }
}

/// Host operations on the console.
#[derive(Clone, Debug)]
enum ConsoleOp {
    /// Keys (or a paste) into the receive queue: `input` then
    /// `device_work(0)`.
    Input(Vec<u8>),
    TakeOutput,
    TakeLines,
    Attach(bool),
}

impl Fuzzed for Console {
    const NAME: &'static str = "virtio-console";
    type HostOp = ConsoleOp;

    fn fresh(_: &Self) -> Self {
        Console::new()
    }

    fn carry_host(from: &Self, to: &mut Self) {
        to.set_attached(from.is_attached());
    }

    fn host_op(input: &mut Input<'_>) -> ConsoleOp {
        match input.u8() % 4 {
            0 => {
                let n = input.u8();
                if n & 0x80 != 0 {
                    // A paste of up to 8 KiB, past what the console holds.
                    let seed = input.u8();
                    ConsoleOp::Input((0..usize::from(n & 0x7f) * 64).map(|i| seed.wrapping_add(i as u8)).collect())
                } else {
                    ConsoleOp::Input(input.bytes(usize::from(n % 33)).to_vec())
                }
            }
            1 => ConsoleOp::TakeOutput,
            2 => ConsoleOp::TakeLines,
            _ => ConsoleOp::Attach(input.bool()),
        }
    }

    fn host(dev: &mut VirtioMmio<Self>, mem: &mut VecMemory, op: &ConsoleOp) -> Answer {
        match op {
            ConsoleOp::Input(bytes) => {
                let n = dev.device_mut().input(bytes);
                dev.device_work(0, mem);
                Answer::Value(n as u64)
            }
            ConsoleOp::TakeOutput => Answer::Bytes(dev.device_mut().take_output()),
            ConsoleOp::TakeLines => Answer::Lines(dev.device_mut().take_lines()),
            ConsoleOp::Attach(on) => {
                dev.device_mut().set_attached(*on);
                Answer::Nothing
            }
        }
    }

    fn check(before: &VirtioMmio<Self>, _: &VirtioMmio<Self>, op: &Op<ConsoleOp>, answer: &Answer) {
        match (op, answer) {
            (Op::Host(ConsoleOp::Input(bytes)), Answer::Value(n)) => {
                assert!(*n as usize <= bytes.len(), "the console took more input than it was given");
            }
            (_, Answer::Bytes(out)) => assert!(out.len() <= console::MAX_OUTPUT, "{} bytes of output", out.len()),
            (_, Answer::Lines(lines)) => {
                assert!(lines.is_empty() || !before.device().is_attached(), "lines taken while a terminal is attached");
                for l in lines {
                    assert!(!l.chars().any(|c| c.is_control() && c != '\t'), "a control character in {l:?}");
                }
            }
            _ => {}
        }
    }
}

/// Host operations on the NIC.
#[derive(Clone, Debug)]
enum NetOp {
    /// A frame from the switch: `deliver` then `device_work(RX_QUEUE)`.
    Deliver(Vec<u8>),
    TakeFrames,
}

impl Fuzzed for Net {
    const NAME: &'static str = "virtio-net";
    type HostOp = NetOp;

    fn fresh(_: &Self) -> Self {
        // Another address: the saved one must come back.
        Net::new([0x02, 0, 0, 0, 9, 9])
    }

    fn host_op(input: &mut Input<'_>) -> NetOp {
        if input.bool() {
            return NetOp::TakeFrames;
        }
        let n = input.u8();
        let len = match n {
            0..=0xef => net::MIN_FRAME + usize::from(n),
            0xf0 => 0,
            0xf1 => net::MIN_FRAME - 1,
            0xf2 => net::MAX_FRAME + 1,
            0xf3..=0xf7 => net::MAX_FRAME - usize::from(n - 0xf3),
            _ => 1000 + 32 * usize::from(n - 0xf8),
        };
        let seed = input.u8();
        NetOp::Deliver((0..len).map(|i| seed.wrapping_add(i as u8)).collect())
    }

    fn host(dev: &mut VirtioMmio<Self>, mem: &mut VecMemory, op: &NetOp) -> Answer {
        match op {
            NetOp::Deliver(frame) => {
                let taken = dev.device_mut().deliver(frame);
                dev.device_work(net::RX_QUEUE, mem);
                Answer::Value(taken.into())
            }
            NetOp::TakeFrames => Answer::Frames(dev.device_mut().take_frames()),
        }
    }

    fn check(_: &VirtioMmio<Self>, _: &VirtioMmio<Self>, op: &Op<NetOp>, answer: &Answer) {
        let ok = |len: usize| (net::MIN_FRAME..=net::MAX_FRAME).contains(&len);
        match (op, answer) {
            (Op::Host(NetOp::Deliver(frame)), Answer::Value(1)) => {
                assert!(ok(frame.len()), "a frame of {} bytes taken for the guest", frame.len());
            }
            (_, Answer::Frames(frames)) => {
                for f in frames {
                    assert!(ok(f.len()), "the guest sent a frame of {} bytes", f.len());
                }
            }
            _ => {}
        }
    }
}

/// Host operations on the balloon.
#[derive(Clone, Copy, Debug)]
enum BalloonOp {
    SetTarget(u32),
    /// `balloon_service`, its `apply` recording the actions.
    Service,
    RequestStats,
}

impl Fuzzed for Balloon {
    const NAME: &'static str = "virtio-balloon";
    type HostOp = BalloonOp;

    fn fresh(_: &Self) -> Self {
        Balloon::new()
    }

    fn host_op(input: &mut Input<'_>) -> BalloonOp {
        match input.u8() % 3 {
            0 => BalloonOp::SetTarget(input.u16().into()),
            1 => BalloonOp::Service,
            _ => BalloonOp::RequestStats,
        }
    }

    fn host(dev: &mut VirtioMmio<Self>, mem: &mut VecMemory, op: &BalloonOp) -> Answer {
        match *op {
            BalloonOp::SetTarget(pages) => {
                dev.balloon_set_target(pages);
                Answer::Nothing
            }
            BalloonOp::Service => {
                let mut actions = Vec::new();
                dev.balloon_service(mem, &mut |a| actions.push(a));
                Answer::Actions(actions)
            }
            BalloonOp::RequestStats => Answer::Value(dev.balloon_request_stats(mem).into()),
        }
    }

    fn check(_: &VirtioMmio<Self>, _: &VirtioMmio<Self>, _: &Op<BalloonOp>, answer: &Answer) {
        let Answer::Actions(actions) = answer else { return };
        let page = |gpa: u64| gpa.is_multiple_of(balloon::PAGE_SIZE);
        for a in actions {
            match a {
                BalloonAction::Inflate(gpas) | BalloonAction::Deflate(gpas) => {
                    assert!((1..=balloon::MAX_PFNS).contains(&gpas.len()), "{a:?}");
                    // 32-bit PFNs of 4 KiB pages.
                    assert!(gpas.iter().all(|&g| page(g) && g >> 44 == 0), "{a:?}");
                }
                BalloonAction::Report(ranges) => {
                    assert!((1..=balloon::MAX_RANGES).contains(&ranges.len()), "{a:?}");
                    let whole = |&(gpa, len): &(u64, u64)| page(gpa) && page(len) && len > 0;
                    assert!(ranges.iter().all(whole), "{a:?}");
                }
            }
        }
    }
}

/// A device and the guest RAM it sees.
#[derive(Clone)]
struct Side<D> {
    dev: VirtioMmio<D>,
    mem: VecMemory,
}

impl<D: Fuzzed> Side<D> {
    fn apply(&mut self, op: &Op<D::HostOp>) -> Answer {
        match *op {
            Op::Read(offset, size) => Answer::Value(self.dev.read(offset, size)),
            Op::Write(offset, size, value) => {
                // The post-copy dry run of what the write would reach
                // walks the same hostile rings and changes nothing.
                let before = self.mem.bytes.clone();
                let state = self.dev.save();
                let _ = self.dev.write_can_go(offset, size, value, &mut self.mem);
                assert!(self.mem.bytes == before, "the dry run of {offset:#x} wrote guest memory");
                assert_eq!(self.dev.save(), state, "the dry run of {offset:#x} changed the device");
                self.dev.write(offset, size, value, &mut self.mem);
                Answer::Nothing
            }
            Op::Poke(gpa, bytes, n) => {
                let at = gpa as usize % RAM;
                let n = n.min(RAM - at);
                self.mem.bytes[at..at + n].copy_from_slice(&bytes[..n]);
                Answer::Nothing
            }
            Op::Host(ref h) => D::host(&mut self.dev, &mut self.mem, h),
        }
    }

    fn u16_at(&self, gpa: u64) -> u16 {
        let at = gpa as usize;
        u16::from_le_bytes([self.mem.bytes[at], self.mem.bytes[at + 1]])
    }
}

pub fn virtio(data: &[u8]) {
    let mut input = Input::new(data);
    let first = input.u8();
    match first >> 2 & 7 {
        0 | 5 => run(&mut input, first, Rng::new(TestSource::default())),
        1 | 6 => {
            let mut disk = VecDisk::new(DISK);
            for (i, b) in disk.bytes.iter_mut().enumerate() {
                *b = (i / 512) as u8 ^ i as u8;
            }
            run(&mut input, first, Block::new(disk, SERIAL, first >> 2 & 7 == 6))
        }
        2 | 7 => run(&mut input, first, Console::new()),
        3 => run(&mut input, first, Net::new(MAC)),
        _ => run(&mut input, first, Balloon::new()),
    }
}

/// The operations of `input` on `device`, every check after each.
fn run<D: Fuzzed>(input: &mut Input<'_>, first: u8, device: D) {
    let mut side = Side { dev: VirtioMmio::new(device), mem: VecMemory::new(0, RAM) };
    let features = accepted_features(first, side.dev.offered_features());
    let mut steps = 0;
    while !input.is_empty() && steps < MAX_STEPS {
        for op in ops(input, &side, features) {
            let mut copy = restored(&side);
            let needed_reset = side.dev.status() & status::DEVICE_NEEDS_RESET != 0;
            let before = side.clone();
            let (a, b) = (side.apply(&op), copy.apply(&op));
            assert_eq!(a, b, "the restored copy answered {op:?} differently");
            assert!(side.mem == copy.mem, "the restored copy wrote guest memory differently after {op:?}");
            assert_eq!(side.dev.save(), copy.dev.save(), "the restored copy diverged after {op:?}");
            assert_eq!(side.dev, copy.dev, "the restored copy's host-side parts diverged after {op:?}");
            let s = side.dev.status();
            assert_eq!(side.dev.interrupt_asserted(), side.dev.interrupt_status() != 0);
            assert!(s & status::DRIVER_OK == 0 || s & status::FEATURES_OK != 0, "DRIVER_OK without FEATURES_OK");
            let is_reset = matches!(op, Op::Write(reg::STATUS, 4, 0));
            if needed_reset && !is_reset && !matches!(op, Op::Poke(..)) {
                assert!(side.mem == before.mem, "a device needing a reset wrote guest memory ({op:?})");
            }
            D::check(&before.dev, &side.dev, &op, &a);
        }
        steps += 1;
    }
}

/// What the handshake accepts: VERSION_1, the transport features bits 0-1
/// of `first` ask for, and the k-th device-specific bit offered if bit
/// 5 + k is set.
fn accepted_features(first: u8, offered: u64) -> u64 {
    let mut features = feature::VERSION_1;
    if first & 1 != 0 {
        features |= feature::INDIRECT_DESC;
    }
    if first & 2 != 0 {
        features |= feature::RING_EVENT_IDX;
    }
    let own = offered & feature::DEVICE_SPECIFIC;
    for (k, bit) in (0..24).map(|b| 1u64 << b).filter(|b| own & b != 0).take(3).enumerate() {
        if first >> (5 + k) & 1 != 0 {
            features |= bit;
        }
    }
    features
}

/// A fresh device given `side`'s saved state: it must take it and save it
/// back unchanged.
fn restored<D: Fuzzed>(side: &Side<D>) -> Side<D> {
    let saved = persist::save(D::NAME, &side.dev);
    let state = match persist::decode::<VirtioMmio<D>>(D::NAME, &saved) {
        Ok(s) => s,
        Err(e) => panic!("a state the guest reached was refused: {e}"),
    };
    let mut dev = VirtioMmio::new(D::fresh(side.dev.device()));
    dev.restore(state);
    assert_eq!(persist::save(D::NAME, &dev), saved, "restored state saves differently");
    D::carry_host(side.dev.device(), dev.device_mut());
    Side { dev, mem: side.mem.clone() }
}

/// The next operation's actions.
fn ops<D: Fuzzed>(input: &mut Input<'_>, side: &Side<D>, features: u64) -> Vec<Op<D::HostOp>> {
    let op = input.u8();
    let w = |offset, value: u32| Op::Write(offset, 4, value.into());
    // Queue indices: one byte only when the device has several queues
    // (the entropy seeds predate that byte).
    let queue = |input: &mut Input<'_>| if D::QUEUES > 1 { input.below(D::QUEUES as u64) as usize } else { 0 };
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
            // FEATURES_OK, every queue (2^k entries up to the device's
            // maximum, its own rings), DRIVER_OK.
            let up = status::ACKNOWLEDGE | status::DRIVER;
            let mut out = vec![
                w(reg::STATUS, 0),
                w(reg::STATUS, status::ACKNOWLEDGE),
                w(reg::STATUS, up),
                w(reg::DRIVER_FEATURES_SEL, 0),
                w(reg::DRIVER_FEATURES, features as u32),
                w(reg::DRIVER_FEATURES_SEL, 1),
                w(reg::DRIVER_FEATURES, (features >> 32) as u32),
                w(reg::STATUS, up | status::FEATURES_OK),
            ];
            let orders = D::QUEUE_MAX_SIZE.trailing_zeros() as u8 + 1;
            for q in 0..D::QUEUES {
                let size = 1u32 << (input.u8() % orders);
                out.extend([
                    w(reg::QUEUE_SEL, q as u32),
                    w(reg::QUEUE_NUM, size),
                    w(reg::QUEUE_DESC_LOW, desc(q) as u32),
                    w(reg::QUEUE_DRIVER_LOW, avail(q) as u32),
                    w(reg::QUEUE_DEVICE_LOW, used(q) as u32),
                    w(reg::QUEUE_READY, 1),
                ]);
            }
            out.push(w(reg::STATUS, up | status::FEATURES_OK | status::DRIVER_OK));
            out
        }
        5 => {
            // A chain of up to four descriptors, then published on a
            // queue: each descriptor's index, buffer (in or near RAM),
            // length, flags and next from the input, NEXT chaining them
            // unless the flags say otherwise.
            let q = queue(input);
            let size = side.dev.queue(q).map_or(1, |q| q.state().size.max(1));
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
                out.push(Op::Poke(desc(q) + 16 * u64::from(index), b, 16));
                index = next;
            }
            let avail_idx = side.u16_at(avail(q) + 2);
            let mut slot = [0u8; 32];
            slot[..2].copy_from_slice(&first.to_le_bytes());
            out.push(Op::Poke(avail(q) + 4 + 2 * u64::from(avail_idx % size), slot, 2));
            let mut idx = [0u8; 32];
            idx[..2].copy_from_slice(&avail_idx.wrapping_add(1).to_le_bytes());
            out.push(Op::Poke(avail(q) + 2, idx, 2));
            out
        }
        // Any queue index, and the first one past the device's.
        6 => vec![w(reg::QUEUE_NOTIFY, u32::from(input.u8()) % (D::QUEUES as u32 + 1))],
        // Mostly the host; an acknowledge of what is pending when bits 3-4
        // are clear (what the entropy seeds used, as 7).
        _ if op >> 3 & 3 == 0 => {
            let s = side.dev.interrupt_status();
            vec![w(reg::INTERRUPT_ACK, s)]
        }
        _ => vec![Op::Host(D::host_op(input))],
    }
}
