//! virtio-net (device ID 1, virtio 1.2 5.1): one receive queue (0) and one
//! transmit queue (1); no multiqueue, no control queue. Frames the guest
//! transmits collect in a bounded outbox the host drains
//! ([`Net::take_frames`]); frames for the guest wait in a bounded inbox
//! ([`Net::deliver`]) until the guest has posted receive buffers. The host
//! joins NICs with the learning switch in [`crate::net::switch`].
//!
//! Features (5.1.3): VIRTIO_NET_F_MAC (the address in configuration
//! space), VIRTIO_NET_F_STATUS (link always up) and VIRTIO_NET_F_MTU
//! (1500: Linux then caps the interface's MTU there, so the guest never
//! builds frames this device would drop). No checksum or segmentation
//! offloads: frames go guest to guest through the switch, which would have
//! to checksum or segment them for every receiver that did not negotiate
//! the same offloads. No VIRTIO_NET_F_MRG_RXBUF either: each frame goes in
//! one receive chain whole.
//!
//! The header (5.1.6): with VIRTIO_F_VERSION_1, which this transport
//! requires, `struct virtio_net_hdr` is 12 bytes whether or not
//! MRG_RXBUF is negotiated (num_buffers is always there; Linux sizes it
//! as `virtio_net_hdr_mrg_rxbuf` for VERSION_1). It precedes every frame
//! either way, and may be split across buffers any way the driver likes
//! (2.6.4, message framing): the device reads and writes chains as byte
//! streams.
//!
//! Receive buffers: without MRG_RXBUF and without any GUEST_TSO/UFO
//! feature, and with an MTU of at most 1500, Linux's `virtio_net` posts
//! "small" buffers (`add_recvbuf_small`): one descriptor of header +
//! 1518 bytes (`GOOD_PACKET_LEN`, an Ethernet frame with a VLAN tag), so a
//! frame up to [`MAX_FRAME`] always fits. The spec asks drivers for at
//! least 1526 bytes (5.1.6.3.1: header + 1514); a frame bigger than the
//! chain it would go into is dropped and counted, the chain kept for the
//! next frame.
//!
//! A malformed frame is data, not a protocol error: too short or too long
//! frames are dropped and counted and their chains returned. A chain whose
//! buffers point the wrong way breaks the ring protocol (2.7.4.2; the
//! transport then sets DEVICE_NEEDS_RESET).
//!
//! Wiring (`vm run ... net=<switch>`): the device set places it in a
//! virtio slot with `switch::mac_for(vm, 0)`; the manager attaches the VM
//! to the named switch (port = VM id), and after a VM's exit in which it
//! transmitted passes [`Net::take_frames`] through `Switch::forward`,
//! [`Net::deliver`]s each frame to the NICs the switch names, runs their
//! receive queue
//! ([`VirtioMmio::device_work`](super::mmio::VirtioMmio::device_work) on
//! queue [`RX_QUEUE`]) and drives their interrupt lines
//! (`Manager::forward_frames`).

use alloc::collections::VecDeque;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

use super::queue::{Chain, Queue, QueueError};
use super::{GuestMemory, VirtioDevice};
use crate::devices::persist::{Invalid, Persist};

/// virtio-net's device ID (5, "Device Types").
pub const DEVICE_ID: u32 = 1;
/// Entries per queue (QEMU's default for virtio-net too).
pub const QUEUE_SIZE: u16 = 256;
/// receiveq1 and transmitq1 (5.1.2).
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;

/// Device feature bits (5.1.3).
pub mod feature {
    /// The device reports the maximum MTU in `mtu`.
    pub const MTU: u64 = 1 << 3;
    /// The device has a MAC address in `mac`.
    pub const MAC: u64 = 1 << 5;
    /// Merged receive buffers (not offered).
    pub const MRG_RXBUF: u64 = 1 << 15;
    /// `status` is valid.
    pub const STATUS: u64 = 1 << 16;
    /// What this device offers.
    pub const OFFERED: u64 = MTU | MAC | STATUS;
}

/// `struct virtio_net_hdr` with VIRTIO_F_VERSION_1 (5.1.6): flags,
/// gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers.
pub const HEADER_LEN: usize = 12;
/// Offset of `num_buffers` in the header.
const NUM_BUFFERS: usize = 10;
/// An Ethernet header: the shortest frame.
pub const MIN_FRAME: usize = 14;
/// The MTU offered in configuration space (Ethernet's).
pub const MTU: u16 = 1500;
/// The longest frame: Ethernet header, an 802.1Q tag and [`MTU`] bytes of
/// payload (Linux's `GOOD_PACKET_LEN`; a guest's VLAN interfaces inherit
/// the 1500-byte MTU and add the tag in software).
pub const MAX_FRAME: usize = 14 + 4 + MTU as usize;
/// Frames held for the guest while it has no receive buffers posted; more
/// are dropped ([`Net::deliver`]). The guest normally keeps its ring full,
/// so this only takes bursts.
pub const MAX_INBOX: usize = 128;
/// Frames the guest sent that the host has not taken; more are dropped. A
/// full transmit ring's worth, so one notification's frames all fit.
pub const MAX_OUTBOX: usize = QUEUE_SIZE as usize;

/// Configuration space (5.1.4): mac, status, max_virtqueue_pairs, mtu.
const CONFIG_LEN: usize = 12;
/// `status`: VIRTIO_NET_S_LINK_UP.
const LINK_UP: u16 = 1;

/// What the device did with frames, as plain data. "rx" is toward the
/// guest (into its receive buffers), "tx" from it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetCounters {
    /// Frames (and their bytes, headers not counted) put in the guest's
    /// receive buffers.
    pub rx_frames: u64,
    pub rx_bytes: u64,
    /// Frames (and bytes) the guest transmitted into the outbox.
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Delivered while the driver was not up (or left over at its reset).
    pub rx_dropped_not_ready: u64,
    /// Delivered while the inbox was full.
    pub rx_dropped_inbox_full: u64,
    /// Delivered shorter than [`MIN_FRAME`] or longer than [`MAX_FRAME`].
    pub rx_dropped_bad_size: u64,
    /// Larger than the receive chain they would have gone into.
    pub rx_dropped_small_buffer: u64,
    /// Transmitted shorter than the header plus [`MIN_FRAME`].
    pub tx_dropped_short: u64,
    /// Transmitted longer than the header plus [`MAX_FRAME`].
    pub tx_dropped_long: u64,
    /// Transmitted while the outbox was full.
    pub tx_dropped_outbox_full: u64,
}

/// `*c += n`, wrapping: counters restored from a stream may be anywhere.
fn bump(c: &mut u64, n: usize) {
    *c = c.wrapping_add(n as u64);
}

/// The network device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Net {
    mac: [u8; 6],
    /// The driver is up (DRIVER_OK, no reset since): frames for the guest
    /// are only queued then, as a NIC without a driver drops what arrives.
    driver_up: bool,
    inbox: VecDeque<Vec<u8>>,
    outbox: VecDeque<Vec<u8>>,
    counters: NetCounters,
}

impl Net {
    /// A NIC with address `mac` (a unicast address:
    /// [`crate::net::switch::mac_for`]).
    pub fn new(mac: [u8; 6]) -> Self {
        Net { mac, driver_up: false, inbox: VecDeque::new(), outbox: VecDeque::new(), counters: NetCounters::default() }
    }

    /// The NIC's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    pub fn counters(&self) -> &NetCounters {
        &self.counters
    }

    /// Frames delivered that wait for receive buffers.
    pub fn pending_rx(&self) -> usize {
        self.inbox.len()
    }

    /// Frames the guest sent that wait for [`Self::take_frames`].
    pub fn pending_tx(&self) -> usize {
        self.outbox.len()
    }

    /// Queue `frame` (an Ethernet frame, no header) for the guest; whether
    /// it was taken. Refused (and counted) when the driver is not up, the
    /// frame's size is not one an Ethernet NIC receives, or the inbox is
    /// full. The caller then runs the receive queue (`device_work(0)`).
    pub fn deliver(&mut self, frame: &[u8]) -> bool {
        let c = &mut self.counters;
        let counter = if !self.driver_up {
            &mut c.rx_dropped_not_ready
        } else if !(MIN_FRAME..=MAX_FRAME).contains(&frame.len()) {
            &mut c.rx_dropped_bad_size
        } else if self.inbox.len() >= MAX_INBOX {
            &mut c.rx_dropped_inbox_full
        } else {
            self.inbox.push_back(frame.to_vec());
            return true;
        };
        bump(counter, 1);
        false
    }

    /// The frames the guest transmitted since the last call, oldest first.
    pub fn take_frames(&mut self) -> Vec<Vec<u8>> {
        self.outbox.drain(..).collect()
    }

    /// Receive queue: inbox frames into the guest's writable chains, each
    /// behind a zeroed header with num_buffers = 1 (5.1.6.4: the device
    /// sets it to 1 without MRG_RXBUF; no flags, as no GUEST_CSUM).
    fn receive(&mut self, queue: &mut Queue, mem: &mut dyn GuestMemory) -> Result<(), QueueError> {
        while let Some(len) = self.inbox.front().map(Vec::len) {
            let Some(chain) = queue.pop(mem)? else { return Ok(()) };
            if !chain.readable.is_empty() {
                queue.undo_pop();
                return Err(QueueError::Direction);
            }
            let Some(frame) = self.inbox.pop_front() else { break };
            if (chain.writable_len() as usize) < HEADER_LEN + len {
                // The chain stays for the next frame (a smaller one may
                // fit); this one is lost, as on a NIC with short buffers.
                queue.undo_pop();
                bump(&mut self.counters.rx_dropped_small_buffer, 1);
                continue;
            }
            let mut bytes = Vec::with_capacity(HEADER_LEN + len);
            bytes.resize(HEADER_LEN, 0);
            bytes[NUM_BUFFERS..HEADER_LEN].copy_from_slice(&1u16.to_le_bytes());
            bytes.extend_from_slice(&frame);
            let written = Queue::write_chain(mem, &chain, &bytes)?;
            queue.push_used(mem, chain.head, written)?;
            bump(&mut self.counters.rx_frames, 1);
            bump(&mut self.counters.rx_bytes, len);
        }
        Ok(())
    }

    /// Transmit queue: each chain is a header and a frame (5.1.6.2); the
    /// header asks for nothing this device offers, so only the frame is
    /// kept.
    fn transmit(&mut self, queue: &mut Queue, mem: &mut dyn GuestMemory) -> Result<(), QueueError> {
        while let Some(chain) = queue.pop(mem)? {
            if !chain.writable.is_empty() {
                queue.undo_pop();
                return Err(QueueError::Direction);
            }
            let len = (chain.readable_len() as usize).saturating_sub(HEADER_LEN);
            let c = &mut self.counters;
            if (chain.readable_len() as usize) < HEADER_LEN + MIN_FRAME {
                bump(&mut c.tx_dropped_short, 1);
            } else if len > MAX_FRAME {
                bump(&mut c.tx_dropped_long, 1);
            } else if self.outbox.len() >= MAX_OUTBOX {
                bump(&mut c.tx_dropped_outbox_full, 1);
            } else {
                let frame = read_chain(mem, &chain, HEADER_LEN, len)?;
                self.outbox.push_back(frame);
                bump(&mut self.counters.tx_frames, 1);
                bump(&mut self.counters.tx_bytes, len);
            }
            // The device writes nothing into a transmit buffer, so the used
            // length (2.7.8: bytes written) is 0 whatever became of it.
            queue.push_used(mem, chain.head, 0)?;
        }
        Ok(())
    }
}

/// `len` bytes of `chain`'s readable buffers after the first `skip`, read
/// as one byte stream (2.6.4: the driver may split them anywhere).
fn read_chain(mem: &mut dyn GuestMemory, chain: &Chain, mut skip: usize, len: usize) -> Result<Vec<u8>, QueueError> {
    let mut out = Vec::with_capacity(len);
    for b in &chain.readable {
        if out.len() == len {
            break;
        }
        let blen = b.len as usize;
        if skip >= blen {
            skip -= blen;
            continue;
        }
        let n = (blen - skip).min(len - out.len());
        let start = out.len();
        out.resize(start + n, 0);
        mem.read(b.gpa + skip as u64, &mut out[start..])?;
        skip = 0;
    }
    Ok(out)
}

impl VirtioDevice for Net {
    const DEVICE_ID: u32 = DEVICE_ID;
    const QUEUES: usize = 2;
    const QUEUE_MAX_SIZE: u16 = QUEUE_SIZE;

    fn features(&self) -> u64 {
        feature::OFFERED
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // 5.1.4: mac[6], le16 status, le16 max_virtqueue_pairs (0: only
        // with VIRTIO_NET_F_MQ or RSS), le16 mtu; the fields after it
        // depend on features not offered and read 0.
        let mut config = [0u8; CONFIG_LEN];
        config[..6].copy_from_slice(&self.mac);
        config[6..8].copy_from_slice(&LINK_UP.to_le_bytes());
        config[10..12].copy_from_slice(&MTU.to_le_bytes());
        data.fill(0);
        if let Ok(start) = usize::try_from(offset)
            && start < CONFIG_LEN
        {
            let n = data.len().min(CONFIG_LEN - start);
            data[..n].copy_from_slice(&config[start..start + n]);
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // 5.1.4: every field is read-only for a non-legacy driver (only
        // the legacy interface let drivers write `mac`; a modern one
        // changes it through a control queue, not offered).
    }

    fn activate(&mut self, _features: u64) {
        // Nothing depends on what was accepted: the header is the
        // VERSION_1 one and no offload can have been negotiated.
        self.driver_up = true;
    }

    fn reset(&mut self) {
        // Frames for a driver that went away are stale (a new one starts
        // with fresh ARP and DHCP); frames the guest sent are the host's
        // to take.
        self.driver_up = false;
        bump(&mut self.counters.rx_dropped_not_ready, self.inbox.len());
        self.inbox.clear();
    }

    fn notify(&mut self, index: usize, queue: &mut Queue, mem: &mut dyn GuestMemory) -> Result<(), QueueError> {
        match index {
            RX_QUEUE => self.receive(queue, mem),
            _ => self.transmit(queue, mem),
        }
    }
}

/// The NIC's state: its address, whether its driver is up, the frames in
/// flight either way and the counters. The MAC travels with the VM: a
/// restored NIC keeps the address its guest saw, whatever it was built
/// with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub mac: [u8; 6],
    pub driver_up: bool,
    pub inbox: Vec<Vec<u8>>,
    pub outbox: Vec<Vec<u8>>,
    pub counters: NetCounters,
}

impl Persist for Net {
    type State = NetState;
    const STATE_VERSION: u16 = 1;

    fn save(&self) -> NetState {
        NetState {
            mac: self.mac,
            driver_up: self.driver_up,
            inbox: self.inbox.iter().cloned().collect(),
            outbox: self.outbox.iter().cloned().collect(),
            counters: self.counters,
        }
    }

    fn validate(s: &NetState) -> Result<(), Invalid> {
        if s.mac[0] & 1 != 0 || s.mac == [0; 6] {
            return Err(Invalid("the MAC address is not a unicast one"));
        }
        if !s.driver_up && !s.inbox.is_empty() {
            return Err(Invalid("frames wait for a driver that is not up"));
        }
        if s.inbox.len() > MAX_INBOX {
            return Err(Invalid("more frames for the guest than the NIC holds"));
        }
        if s.outbox.len() > MAX_OUTBOX {
            return Err(Invalid("more frames from the guest than the NIC holds"));
        }
        if s.inbox.iter().chain(&s.outbox).any(|f| !(MIN_FRAME..=MAX_FRAME).contains(&f.len())) {
            return Err(Invalid("a frame in flight has a size no frame has"));
        }
        // The counters are any numbers (they wrap).
        Ok(())
    }

    fn restore(&mut self, s: NetState) {
        self.mac = s.mac;
        self.driver_up = s.driver_up;
        self.inbox = s.inbox.into();
        self.outbox = s.outbox.into();
        self.counters = s.counters;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::VecMemory;
    use crate::devices::virtio::feature::VERSION_1;
    use crate::devices::virtio::mmio::{VirtioMmio, reg, status};
    use crate::devices::virtio::queue::{VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
    use crate::net::switch::{self, BROADCAST, Mac, Switch};
    use alloc::vec;

    /// Entries of each mock queue.
    const N: u16 = 8;
    /// Queue `q`'s descriptors; avail at +0x100, used at +0x200.
    fn ring(q: usize) -> u64 {
        0x1000 + 0x1000 * q as u64
    }
    /// Where buffer `i` of queue `q` lives (0x800 bytes each).
    fn buf(q: usize, i: u16) -> u64 {
        0x1_0000 + 0x8000 * q as u64 + 0x800 * u64::from(i)
    }

    /// A guest's virtio-net driver, by hand: rings of 8 entries, one
    /// descriptor per receive buffer, header and frame in two descriptors
    /// per transmit chain (as Linux does when it cannot push the header
    /// into the frame's headroom).
    struct Guest {
        dev: VirtioMmio<Net>,
        mem: VecMemory,
        avail: [u16; 2],
        used_seen: [u16; 2],
    }

    impl Guest {
        fn up(mac: Mac) -> Self {
            let mut g = Guest {
                dev: VirtioMmio::new(Net::new(mac)),
                mem: VecMemory::new(0, 0x4_0000),
                avail: [0; 2],
                used_seen: [0; 2],
            };
            assert_eq!(g.dev.read(reg::DEVICE_ID, 4), 1);
            g.w(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
            let offered = g.dev.offered_features();
            assert_eq!(offered & feature::OFFERED, feature::OFFERED);
            assert_eq!(offered & (0x7fff | feature::MRG_RXBUF) & !(feature::MTU | feature::MAC), 0, "no offloads");
            let want = VERSION_1 | feature::OFFERED;
            g.w(reg::DRIVER_FEATURES_SEL, 0);
            g.w(reg::DRIVER_FEATURES, want as u32);
            g.w(reg::DRIVER_FEATURES_SEL, 1);
            g.w(reg::DRIVER_FEATURES, (want >> 32) as u32);
            g.w(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
            for q in 0..2 {
                g.w(reg::QUEUE_SEL, q as u32);
                g.w(reg::QUEUE_NUM, N.into());
                g.w(reg::QUEUE_DESC_LOW, ring(q) as u32);
                g.w(reg::QUEUE_DRIVER_LOW, (ring(q) + 0x100) as u32);
                g.w(reg::QUEUE_DEVICE_LOW, (ring(q) + 0x200) as u32);
                g.w(reg::QUEUE_READY, 1);
            }
            let ok = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
            g.w(reg::STATUS, ok);
            assert_eq!(g.dev.read(reg::STATUS, 4), u64::from(ok));
            g
        }

        fn w(&mut self, offset: u64, v: u32) {
            self.dev.write(offset, 4, v.into(), &mut self.mem);
        }

        fn put(&mut self, gpa: u64, bytes: &[u8]) {
            self.mem.bytes[gpa as usize..gpa as usize + bytes.len()].copy_from_slice(bytes);
        }

        fn u16_at(&self, gpa: u64) -> u16 {
            u16::from_le_bytes([self.mem.bytes[gpa as usize], self.mem.bytes[gpa as usize + 1]])
        }

        fn desc(&mut self, q: usize, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..].copy_from_slice(&next.to_le_bytes());
            self.put(ring(q) + 16 * u64::from(i), &d);
        }

        /// Make the chain at `head` available on queue `q`.
        fn publish(&mut self, q: usize, head: u16) {
            let slot = self.avail[q] % N;
            self.put(ring(q) + 0x100 + 4 + 2 * u64::from(slot), &head.to_le_bytes());
            self.avail[q] = self.avail[q].wrapping_add(1);
            let idx = self.avail[q];
            self.put(ring(q) + 0x100 + 2, &idx.to_le_bytes());
        }

        /// Post a receive buffer of `len` bytes and notify.
        fn post_rx(&mut self, len: u32) {
            let i = self.avail[0] % N;
            self.desc(0, i, buf(0, i), len, VIRTQ_DESC_F_WRITE, 0);
            self.publish(0, i);
            self.w(reg::QUEUE_NOTIFY, 0);
        }

        /// Transmit `frame` behind a zero header, in two descriptors.
        fn send(&mut self, frame: &[u8]) {
            let head = (2 * self.avail[1]) % N;
            let (h, f) = (buf(1, head), buf(1, head + 1));
            self.put(h, &[0; HEADER_LEN]);
            self.put(f, frame);
            self.desc(1, head, h, HEADER_LEN as u32, VIRTQ_DESC_F_NEXT, head + 1);
            self.desc(1, head + 1, f, frame.len() as u32, 0, 0);
            self.publish(1, head);
            self.w(reg::QUEUE_NOTIFY, 1);
        }

        /// New used entries of queue `q`: (id, len).
        fn used(&mut self, q: usize) -> Vec<(u16, u32)> {
            let mut out = Vec::new();
            let idx = self.u16_at(ring(q) + 0x202);
            while self.used_seen[q] != idx {
                let at = (ring(q) + 0x204 + 8 * u64::from(self.used_seen[q] % N)) as usize;
                let id = u32::from_le_bytes(self.mem.bytes[at..at + 4].try_into().unwrap());
                let len = u32::from_le_bytes(self.mem.bytes[at + 4..at + 8].try_into().unwrap());
                out.push((id as u16, len));
                self.used_seen[q] = self.used_seen[q].wrapping_add(1);
            }
            out
        }

        /// Frames received since the last call, headers checked.
        fn received(&mut self) -> Vec<Vec<u8>> {
            self.used(0)
                .into_iter()
                .map(|(id, len)| {
                    let at = buf(0, id) as usize;
                    let hdr = &self.mem.bytes[at..at + HEADER_LEN];
                    assert_eq!(hdr, &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0], "zero header, num_buffers 1");
                    self.mem.bytes[at + HEADER_LEN..at + len as usize].to_vec()
                })
                .collect()
        }

        fn needs_reset(&mut self) -> bool {
            self.dev.read(reg::STATUS, 4) & u64::from(status::DEVICE_NEEDS_RESET) != 0
        }
    }

    const MAC_A: Mac = [0x02, 0, 0, 0, 1, 0];
    const MAC_B: Mac = [0x02, 0, 0, 0, 2, 0];

    fn frame(dst: Mac, src: Mac, ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&dst);
        f.extend_from_slice(&src);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn configuration_space_has_the_mac_link_up_and_mtu() {
        let mut g = Guest::up(MAC_A);
        let cfg = |g: &mut Guest, off: u64, size: u8| g.dev.read(reg::CONFIG + off, size);
        // Linux reads the MAC a byte at a time.
        let mac: Vec<u8> = (0..6).map(|i| cfg(&mut g, i, 1) as u8).collect();
        assert_eq!(mac, MAC_A);
        assert_eq!(cfg(&mut g, 6, 2), 1, "VIRTIO_NET_S_LINK_UP");
        assert_eq!(cfg(&mut g, 8, 2), 0, "max_virtqueue_pairs: no MQ");
        assert_eq!(cfg(&mut g, 10, 2), 1500);
        assert_eq!(cfg(&mut g, 11, 4), 1500 >> 8, "a read crossing the end");
        assert_eq!(cfg(&mut g, 12, 4), 0);
        // Writes change nothing.
        g.dev.write(reg::CONFIG, 1, 0xff, &mut g.mem);
        assert_eq!(cfg(&mut g, 0, 1), 2);
    }

    #[test]
    fn transmitted_frames_reach_the_outbox_and_bad_ones_are_counted() {
        let mut g = Guest::up(MAC_A);
        let ok = frame(BROADCAST, MAC_A, 0x0806, &[7; 28]);
        g.send(&ok);
        g.send(&[1; 13]);
        g.send(&vec![2; MAX_FRAME + 1]);
        let max = frame(MAC_B, MAC_A, 0x8100, &vec![3; MAX_FRAME - 14]);
        g.send(&max);
        assert_eq!(g.dev.device_mut().take_frames(), vec![ok.clone(), max]);
        assert!(g.dev.device_mut().take_frames().is_empty());
        // Every chain went back, used length 0, and the guest is told.
        assert_eq!(g.used(1), vec![(0, 0), (2, 0), (4, 0), (6, 0)]);
        assert!(g.dev.interrupt_asserted());
        assert!(!g.needs_reset(), "a bad frame is not a protocol error");
        let c = *g.dev.device().counters();
        assert_eq!((c.tx_frames, c.tx_bytes, c.tx_dropped_short, c.tx_dropped_long), (2, 42 + MAX_FRAME as u64, 1, 1));
        // The header split anywhere: 5 bytes, then 7 + the frame.
        let (h, f) = (buf(1, 0), buf(1, 1));
        let mut bytes = vec![0u8; HEADER_LEN];
        bytes.extend_from_slice(&ok);
        g.put(h, &bytes[..5]);
        g.put(f, &bytes[5..]);
        g.desc(1, 0, h, 5, VIRTQ_DESC_F_NEXT, 1);
        g.desc(1, 1, f, (bytes.len() - 5) as u32, 0, 0);
        g.publish(1, 0);
        g.w(reg::QUEUE_NOTIFY, 1);
        assert_eq!(g.dev.device_mut().take_frames(), vec![ok.clone()]);
        // An outbox nobody drains drops, and counts, past its bound.
        for _ in 0..MAX_OUTBOX + 3 {
            g.send(&ok);
        }
        assert_eq!(g.dev.device().counters().tx_dropped_outbox_full, 3);
        assert_eq!(g.dev.device_mut().take_frames().len(), MAX_OUTBOX);
    }

    #[test]
    fn delivered_frames_wait_for_buffers_and_oversized_ones_are_dropped() {
        // Before the driver is up, a frame goes nowhere.
        let mut net = Net::new(MAC_B);
        assert!(!net.deliver(&frame(MAC_B, MAC_A, 0x0800, b"early")));
        assert_eq!(net.counters().rx_dropped_not_ready, 1);

        let mut g = Guest::up(MAC_B);
        let f1 = frame(MAC_B, MAC_A, 0x0800, b"first");
        let f2 = frame(MAC_B, MAC_A, 0x0800, &[9; 200]);
        let f3 = frame(MAC_B, MAC_A, 0x0800, b"third");
        for f in [&f1, &f2, &f3] {
            assert!(g.dev.device_mut().deliver(f));
        }
        g.dev.device_work(RX_QUEUE, &mut g.mem);
        assert_eq!(g.used(0), vec![], "no buffers yet: the frames wait");
        assert_eq!(g.dev.device().pending_rx(), 3);
        // Buffers for header + 19 bytes: f1 fits the first; f2 does not
        // fit the second and is dropped, which keeps it for f3.
        g.post_rx((HEADER_LEN + 19) as u32);
        assert_eq!(g.received(), vec![f1]);
        assert!(g.dev.interrupt_asserted());
        g.post_rx((HEADER_LEN + 19) as u32);
        assert_eq!(g.received(), vec![f3]);
        let c = *g.dev.device().counters();
        assert_eq!((c.rx_frames, c.rx_bytes, c.rx_dropped_small_buffer), (2, 38, 1));
        // Sizes no Ethernet frame has, and a full inbox, are refused.
        assert!(!g.dev.device_mut().deliver(&[0; 13]));
        assert!(!g.dev.device_mut().deliver(&vec![0; MAX_FRAME + 1]));
        for _ in 0..MAX_INBOX {
            assert!(g.dev.device_mut().deliver(&f2));
        }
        assert!(!g.dev.device_mut().deliver(&f2));
        let c = *g.dev.device().counters();
        assert_eq!((c.rx_dropped_bad_size, c.rx_dropped_inbox_full), (2, 1));
        // A reset drops what waits for the old driver.
        g.w(reg::STATUS, 0);
        assert_eq!(g.dev.device().pending_rx(), 0);
        assert_eq!(g.dev.device().counters().rx_dropped_not_ready, MAX_INBOX as u64);
    }

    #[test]
    fn wrong_directions_need_a_reset() {
        // A readable buffer on the receive queue.
        let mut g = Guest::up(MAC_A);
        g.dev.device_mut().deliver(&frame(MAC_A, MAC_B, 0x0800, b"x"));
        g.desc(0, 0, buf(0, 0), 64, 0, 0);
        g.publish(0, 0);
        let before = g.mem.bytes.clone();
        g.w(reg::QUEUE_NOTIFY, 0);
        assert!(g.needs_reset());
        assert_eq!(g.mem.bytes, before, "a refused chain changed guest memory");
        // A writable buffer on the transmit queue.
        let mut g = Guest::up(MAC_A);
        g.desc(1, 0, buf(1, 0), 64, VIRTQ_DESC_F_WRITE, 0);
        g.publish(1, 0);
        let before = g.mem.bytes.clone();
        g.w(reg::QUEUE_NOTIFY, 1);
        assert!(g.needs_reset());
        assert_eq!(g.mem.bytes, before);
        assert!(g.dev.device_mut().take_frames().is_empty());
    }

    #[test]
    fn state_round_trips_and_impossible_states_are_refused() {
        let mut g = Guest::up(MAC_A);
        let f = frame(MAC_A, MAC_B, 0x0800, b"in flight");
        g.dev.device_mut().deliver(&f);
        g.send(&frame(MAC_B, MAC_A, 0x0800, b"out"));
        let s = g.dev.save();
        assert_eq!(s.device.inbox, vec![f.clone()]);
        assert_eq!(s.device.outbox.len(), 1);
        let mut e = VirtioMmio::new(Net::new(switch::mac_for(7, 0)));
        assert_eq!(<VirtioMmio<Net> as Persist>::validate(&s), Ok(()));
        e.restore(s.clone());
        assert_eq!(e.save(), s);
        assert_eq!(e.device().mac(), MAC_A, "the MAC travels with the VM");

        let good = s.device;
        let bad = [
            NetState { mac: [0x03, 0, 0, 0, 0, 1], ..good.clone() },
            NetState { mac: [0; 6], ..good.clone() },
            NetState { driver_up: false, ..good.clone() },
            NetState { inbox: vec![f.clone(); MAX_INBOX + 1], ..good.clone() },
            NetState { outbox: vec![f.clone(); MAX_OUTBOX + 1], ..good.clone() },
            NetState { inbox: vec![vec![0; 13]], ..good.clone() },
            NetState { outbox: vec![vec![0; MAX_FRAME + 1]], ..good.clone() },
        ];
        for b in &bad {
            assert!(Net::validate(b).is_err(), "{b:?}");
        }
        assert_eq!(
            Net::validate(&NetState { counters: NetCounters { rx_bytes: u64::MAX, ..good.counters }, ..good }),
            Ok(())
        );
    }

    /// Two guests on one switch: A's ARP request reaches B through the
    /// switch, B's unicast reply comes back to A only, then they talk.
    #[test]
    fn two_nics_talk_through_the_switch() {
        const PORT_A: switch::PortId = 1;
        const PORT_B: switch::PortId = 2;
        let (mac_a, mac_b) = (switch::mac_for(1, 0), switch::mac_for(2, 0));
        let mut guests = [Guest::up(mac_a), Guest::up(mac_b)];
        let mut sw = Switch::default();
        sw.attach(PORT_A, false);
        sw.attach(PORT_B, false);
        sw.attach(9, true);
        let port_of = |i: usize| [PORT_A, PORT_B][i];
        let mut uplink = Vec::new();
        // What the VM wiring does after a transmit notification from guest
        // `from`: drain its outbox through the switch into the other NICs.
        let mut pump = |guests: &mut [Guest; 2], sw: &mut Switch, from: usize, now: u64| {
            for f in guests[from].dev.device_mut().take_frames() {
                for out in sw.forward(port_of(from), &f, now) {
                    match out {
                        PORT_A | PORT_B => {
                            let g = &mut guests[usize::from(out - 1)];
                            assert!(g.dev.device_mut().deliver(&f));
                            g.dev.device_work(RX_QUEUE, &mut g.mem);
                        }
                        _ => uplink.push(f.clone()),
                    }
                }
            }
        };
        for g in &mut guests {
            for _ in 0..4 {
                g.post_rx((HEADER_LEN + MAX_FRAME) as u32);
            }
        }
        let arp = |op: u16, src: Mac, sip: u8, dst: Mac, tip: u8| {
            let mut p = vec![0, 1, 0x08, 0x00, 6, 4];
            p.extend_from_slice(&op.to_be_bytes());
            p.extend_from_slice(&src);
            p.extend_from_slice(&[10, 0, 0, sip]);
            p.extend_from_slice(&dst);
            p.extend_from_slice(&[10, 0, 0, tip]);
            p
        };
        // A: who has 10.0.0.2?
        let request = frame(BROADCAST, mac_a, 0x0806, &arp(1, mac_a, 1, [0; 6], 2));
        guests[0].send(&request);
        pump(&mut guests, &mut sw, 0, 0);
        assert_eq!(guests[1].received(), vec![request]);
        assert!(guests[1].dev.interrupt_asserted());
        assert!(guests[0].received().is_empty(), "not back to the sender");
        // B: 10.0.0.2 is at mac_b, to A alone.
        let reply = frame(mac_a, mac_b, 0x0806, &arp(2, mac_b, 2, mac_a, 1));
        guests[1].send(&reply);
        pump(&mut guests, &mut sw, 1, 1);
        assert_eq!(guests[0].received(), vec![reply]);
        // Both are learned: the IPv4 that follows is unicast both ways.
        let ping = frame(mac_b, mac_a, 0x0800, &[0x45; 84]);
        guests[0].send(&ping);
        pump(&mut guests, &mut sw, 0, 2);
        assert_eq!(guests[1].received(), vec![ping]);
        let pong = frame(mac_a, mac_b, 0x0800, &[0x45; 84]);
        guests[1].send(&pong);
        pump(&mut guests, &mut sw, 1, 3);
        assert_eq!(guests[0].received(), vec![pong]);
        assert_eq!(uplink.len(), 1, "only the broadcast went out of the uplink");
        for (i, g) in guests.iter().enumerate() {
            let c = g.dev.device().counters();
            assert_eq!((c.tx_frames, c.rx_frames), (2, 2), "guest {i}");
            assert_eq!(sw.counters(port_of(i)).unwrap().rx_frames, 2);
        }
    }
}
