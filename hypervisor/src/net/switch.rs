//! An internal learning Ethernet switch (the transparent bridge of IEEE
//! 802.1D, without spanning tree: the host's topology is a star and has no
//! loops). Plain logic over frames and small port ids; it knows nothing of
//! devices, rings or guest memory.
//!
//! Each frame that comes in on a port teaches the switch where its source
//! MAC lives; it then goes to the one port its destination was learned on,
//! or, for broadcast, multicast and unknown unicast destinations, to every
//! other port (flooding). It never goes back out of the port it came in
//! on: a destination learned on the in-port is on that port's own segment
//! and the frame is dropped (a VM's NIC is a segment of one, so that is a
//! VM talking to itself, which its own stack handles).
//!
//! # Bounds
//!
//! The MAC table holds at most [`Limits::max_macs`] entries, and a VM's
//! port at most [`Limits::max_macs_per_vm_port`] of them: a guest sending
//! from ever-new source MACs only evicts its own oldest entries, never
//! another VM's (which would turn their unicast into floods that every VM
//! sees). Past the table bound the least recently refreshed entry goes
//! (after the aged ones). Entries age: one not refreshed by a frame from
//! its MAC for [`Limits::max_age`] is forgotten. Time is the caller's
//! (`now` in [`Switch::forward`]; any monotonic unit, milliseconds by
//! default — [`DEFAULT_MAX_AGE`] is 802.1D's recommended 300 s), so the
//! switch is deterministic under record/replay and in tests.
//!
//! # The uplink (`super::uplink` wires it: `net uplink <switch>`)
//!
//! A port attached with `uplink = true` stands for the host's physical NIC:
//! it is bounded only by the whole table (it fronts a LAN of many MACs),
//! otherwise it is a port like any other. The wiring is:
//!
//! - the host NIC's driver runs promiscuous (it must take frames for every
//!   VM's MAC, which the NIC's own filter does not know), feeds each frame
//!   it receives to `forward(UPLINK, frame, now)` and transmits every frame
//!   that `forward` sends to `UPLINK`;
//! - after a migration the destination attaches the VM's NIC to its switch
//!   and forwards [`announce`]`(mac)` from that port: a broadcast that makes
//!   this switch and the physical switches beyond the uplink learn the
//!   MAC's new place (what QEMU's `qemu_announce_self` does; the guest
//!   cannot announce itself, VIRTIO_NET_F_GUEST_ANNOUNCE needing a control
//!   queue this device lacks). The source detaches the VM's port, which
//!   forgets its MACs.
//!
//! # MAC addresses for VMs
//!
//! [`mac_for`]`(vm_id, nic)` is `02:v3:v2:v1:v0:nn`: the first octet has
//! the locally administered bit (0x02) set and the group bit (0x01) clear
//! (IEEE 802, a unicast address no vendor assigns), then the 32-bit VM id
//! big-endian, then the NIC's index. Distinct `(vm_id, nic)` pairs give
//! distinct addresses, so two VMs of one host never collide. The first
//! octet's upper six bits are left zero here: a VM on the switch with the
//! host's uplink gets the host's tag there (`super::uplink::tagged_mac`),
//! so several hosts can share a LAN through their uplinks. A migrated VM
//! keeps the MAC it was created with (its guest saw it), whatever its id
//! on the destination; the destination can check it is free with
//! [`Switch::lookup`].

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

/// A switch port: a VM's NIC or the host uplink, numbered by the caller.
pub type PortId = u16;

/// An Ethernet (IEEE 802 MAC-48) address.
pub type Mac = [u8; 6];

/// The broadcast address.
pub const BROADCAST: Mac = [0xff; 6];
/// Destination, source and EtherType: the shortest frame worth switching.
pub const ETH_HEADER_LEN: usize = 14;
/// Table entries at most, all ports together.
pub const MAX_MACS: usize = 4096;
/// Table entries a VM's port may hold: a guest has a MAC per NIC, more only
/// when it bridges (containers, nested VMs).
pub const MAX_MACS_PER_VM_PORT: usize = 64;
/// How long an entry lives unrefreshed, in milliseconds when `now` is in
/// milliseconds (802.1D's recommended ageing time, 300 s).
pub const DEFAULT_MAX_AGE: u64 = 300_000;

/// Whether `mac` is a group address (multicast; broadcast is one too): the
/// low bit of the first octet (IEEE 802 I/G bit).
pub fn is_multicast(mac: &Mac) -> bool {
    mac[0] & 1 != 0
}

/// The MAC of NIC `nic` of VM `vm_id`: locally administered unicast,
/// unique per `(vm_id, nic)` (module documentation).
pub fn mac_for(vm_id: u32, nic: u8) -> Mac {
    let [a, b, c, d] = vm_id.to_be_bytes();
    [0x02, a, b, c, d, nic]
}

/// `mac` as text: six lower-case hex octets joined by colons.
pub fn mac_text(mac: &Mac) -> alloc::string::String {
    let [a, b, c, d, e, f] = mac;
    alloc::format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
}

/// A RARP broadcast from `mac` (EtherType 0x8035, RFC 903 "request
/// reverse", no addresses), padded to Ethernet's 60-byte minimum: a frame
/// every switch learns `mac` from and every host ignores. Sent on a
/// migrated VM's behalf from its new port.
pub fn announce(mac: Mac) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&BROADCAST);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&0x8035u16.to_be_bytes());
    // Hardware Ethernet (1), protocol IPv4, lengths 6 and 4, operation 3.
    f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 3]);
    // Sender and target: the MAC, no IPv4 address.
    for _ in 0..2 {
        f.extend_from_slice(&mac);
        f.extend_from_slice(&[0; 4]);
    }
    f.resize(60, 0);
    f
}

fn mac_at(frame: &[u8], at: usize) -> Mac {
    let mut m = [0; 6];
    m.copy_from_slice(&frame[at..at + 6]);
    m
}

/// The switch's bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Table entries at most.
    pub max_macs: usize,
    /// Table entries of one VM (non-uplink) port at most.
    pub max_macs_per_vm_port: usize,
    /// An entry not refreshed for this long (in the unit of `now`) is
    /// forgotten.
    pub max_age: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_macs: MAX_MACS, max_macs_per_vm_port: MAX_MACS_PER_VM_PORT, max_age: DEFAULT_MAX_AGE }
    }
}

/// What one port saw, as plain data. "rx" is into the switch from the
/// port, "tx" out of the switch to it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortCounters {
    /// Frames (and their bytes) the port sent in, dropped ones included.
    pub rx_frames: u64,
    pub rx_bytes: u64,
    /// Frames (and bytes) the switch sent out of the port.
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Frames from the port that went to every other port.
    pub flooded: u64,
    /// Frames from the port shorter than an Ethernet header.
    pub dropped_runt: u64,
    /// Frames from the port with a multicast or all-zero source MAC (no
    /// station has one; learning it would misdirect traffic).
    pub dropped_bad_source: u64,
    /// Frames from the port to a MAC learned on the port itself.
    pub dropped_local: u64,
    /// MACs learned on the port (new, or moved here from another port).
    pub learned: u64,
    /// Of those, MACs that were on another port before.
    pub moved_in: u64,
    /// The port's entries evicted to make room (per-port or table bound).
    pub evicted: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    port: PortId,
    /// When a frame from this MAC last came in (the caller's `now`).
    seen: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Port {
    uplink: bool,
    /// Table entries on this port.
    macs: usize,
    counters: PortCounters,
}

/// The learning switch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Switch {
    limits: Limits,
    /// Ordered maps: flooding visits ports in id order, so the switch's
    /// output is a function of its input (record/replay, tests).
    ports: BTreeMap<PortId, Port>,
    table: BTreeMap<Mac, Entry>,
}

impl Default for Switch {
    fn default() -> Self {
        Self::new(Limits::default())
    }
}

impl Switch {
    /// A switch with no ports and an empty table.
    pub fn new(limits: Limits) -> Self {
        Switch { limits, ports: BTreeMap::new(), table: BTreeMap::new() }
    }

    /// Attach `port` (`uplink`: the host's NIC, module documentation);
    /// `false` if it is attached already (nothing changes).
    pub fn attach(&mut self, port: PortId, uplink: bool) -> bool {
        if self.ports.contains_key(&port) {
            return false;
        }
        self.ports.insert(port, Port { uplink, macs: 0, counters: PortCounters::default() });
        true
    }

    /// Detach `port` and forget every MAC learned on it (until they show
    /// up elsewhere, frames to them flood); `false` if it was not attached.
    pub fn detach(&mut self, port: PortId) -> bool {
        if self.ports.remove(&port).is_none() {
            return false;
        }
        self.table.retain(|_, e| e.port != port);
        true
    }

    /// The attached ports, in id order.
    pub fn ports(&self) -> impl Iterator<Item = PortId> + '_ {
        self.ports.keys().copied()
    }

    /// Port `port`'s counters, if it is attached.
    pub fn counters(&self, port: PortId) -> Option<&PortCounters> {
        self.ports.get(&port).map(|p| &p.counters)
    }

    /// Entries in the MAC table (aged ones included until something
    /// sweeps them: [`Self::expire`], or a lookup or learning that meets
    /// them).
    pub fn macs(&self) -> usize {
        self.table.len()
    }

    /// The port `mac` was learned on, if it has not aged by `now`.
    pub fn lookup(&self, mac: &Mac, now: u64) -> Option<PortId> {
        self.table.get(mac).filter(|e| !self.aged(e, now)).map(|e| e.port)
    }

    /// Forget every entry aged by `now`.
    pub fn expire(&mut self, now: u64) {
        let max_age = self.limits.max_age;
        let ports = &mut self.ports;
        self.table.retain(|_, e| {
            let keep = now.saturating_sub(e.seen) < max_age;
            if !keep && let Some(p) = ports.get_mut(&e.port) {
                p.macs -= 1;
            }
            keep
        });
    }

    /// Switch `frame`, which came in on `in_port` at time `now`: the ports
    /// to send it out of (each gets the same, unchanged bytes), in id
    /// order, never `in_port`; empty when it is dropped (too short, a bad
    /// source MAC, a destination on `in_port`, `in_port` not attached).
    pub fn forward(&mut self, in_port: PortId, frame: &[u8], now: u64) -> Vec<PortId> {
        let Some(port) = self.ports.get_mut(&in_port) else { return Vec::new() };
        let c = &mut port.counters;
        c.rx_frames = c.rx_frames.wrapping_add(1);
        c.rx_bytes = c.rx_bytes.wrapping_add(frame.len() as u64);
        if frame.len() < ETH_HEADER_LEN {
            c.dropped_runt = c.dropped_runt.wrapping_add(1);
            return Vec::new();
        }
        let (dst, src) = (mac_at(frame, 0), mac_at(frame, 6));
        if is_multicast(&src) || src == [0; 6] {
            c.dropped_bad_source = c.dropped_bad_source.wrapping_add(1);
            return Vec::new();
        }
        self.learn(in_port, src, now);
        let known = if is_multicast(&dst) { None } else { self.lookup_fresh(&dst, now) };
        let out: Vec<PortId> = match known {
            Some(p) if p == in_port => {
                let c = &mut self.counters_mut(in_port).dropped_local;
                *c = c.wrapping_add(1);
                return Vec::new();
            }
            Some(p) => alloc::vec![p],
            None => {
                let c = &mut self.counters_mut(in_port).flooded;
                *c = c.wrapping_add(1);
                self.ports.keys().copied().filter(|&p| p != in_port).collect()
            }
        };
        for p in &out {
            let c = self.counters_mut(*p);
            c.tx_frames = c.tx_frames.wrapping_add(1);
            c.tx_bytes = c.tx_bytes.wrapping_add(frame.len() as u64);
        }
        out
    }

    /// Counters of a port known to be attached.
    fn counters_mut(&mut self, port: PortId) -> &mut PortCounters {
        &mut self.ports.get_mut(&port).expect("an attached port").counters
    }

    fn aged(&self, e: &Entry, now: u64) -> bool {
        now.saturating_sub(e.seen) >= self.limits.max_age
    }

    /// The port `mac` lives on, forgetting it if it aged.
    fn lookup_fresh(&mut self, mac: &Mac, now: u64) -> Option<PortId> {
        let e = *self.table.get(mac)?;
        if self.aged(&e, now) {
            self.remove(mac);
            return None;
        }
        Some(e.port)
    }

    fn remove(&mut self, mac: &Mac) -> Option<Entry> {
        let e = self.table.remove(mac)?;
        if let Some(p) = self.ports.get_mut(&e.port) {
            p.macs -= 1;
        }
        Some(e)
    }

    /// Evict the least recently refreshed entry (of `port` only, if
    /// given).
    fn evict_oldest(&mut self, port: Option<PortId>) {
        let oldest = self
            .table
            .iter()
            .filter(|(_, e)| port.is_none_or(|p| e.port == p))
            .min_by_key(|(_, e)| e.seen)
            .map(|(mac, _)| *mac);
        if let Some(e) = oldest.and_then(|mac| self.remove(&mac)) {
            let c = &mut self.counters_mut(e.port).evicted;
            *c = c.wrapping_add(1);
        }
    }

    /// `src` lives on `in_port` (attached), as of `now`.
    fn learn(&mut self, in_port: PortId, src: Mac, now: u64) {
        let moved = match self.table.get_mut(&src) {
            Some(e) if e.port == in_port => {
                e.seen = now;
                return;
            }
            Some(_) => {
                self.remove(&src);
                true
            }
            None => false,
        };
        let port = &self.ports[&in_port];
        let limit = if port.uplink { self.limits.max_macs } else { self.limits.max_macs_per_vm_port };
        if limit == 0 || self.limits.max_macs == 0 {
            return;
        }
        if port.macs >= limit {
            self.evict_oldest(Some(in_port));
        }
        if self.table.len() >= self.limits.max_macs {
            self.expire(now);
            if self.table.len() >= self.limits.max_macs {
                self.evict_oldest(None);
            }
        }
        self.table.insert(src, Entry { port: in_port, seen: now });
        let port = self.ports.get_mut(&in_port).expect("an attached port");
        port.macs += 1;
        port.counters.learned = port.counters.learned.wrapping_add(1);
        if moved {
            port.counters.moved_in = port.counters.moved_in.wrapping_add(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    const A: Mac = [0x02, 0, 0, 0, 1, 0];
    const B: Mac = [0x02, 0, 0, 0, 2, 0];
    const C: Mac = [0x02, 0, 0, 0, 3, 0];

    fn frame(dst: Mac, src: Mac, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&dst);
        f.extend_from_slice(&src);
        f.extend_from_slice(&0x0800u16.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// An ARP packet (RFC 826) over Ethernet: `op` 1 request, 2 reply.
    fn arp(dst: Mac, src: Mac, op: u16, sender_ip: [u8; 4], target: Mac, target_ip: [u8; 4]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&dst);
        f.extend_from_slice(&src);
        f.extend_from_slice(&0x0806u16.to_be_bytes());
        f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4]);
        f.extend_from_slice(&op.to_be_bytes());
        f.extend_from_slice(&src);
        f.extend_from_slice(&sender_ip);
        f.extend_from_slice(&target);
        f.extend_from_slice(&target_ip);
        f
    }

    /// Ports 1, 2, 3 (VMs) and 9 (uplink).
    fn switch() -> Switch {
        let mut s = Switch::default();
        for p in [1, 2, 3] {
            assert!(s.attach(p, false));
        }
        assert!(s.attach(9, true));
        assert!(!s.attach(9, false), "attached twice");
        s
    }

    #[test]
    fn mac_text_is_colon_separated_hex() {
        assert_eq!(mac_text(&mac_for(0x0102_03ff, 1)), "02:01:02:03:ff:01");
    }

    #[test]
    fn learns_sources_and_sends_known_unicast_to_one_port() {
        let mut s = switch();
        // B unknown: A's frame floods, and A is learned on port 1.
        assert_eq!(s.forward(1, &frame(B, A, b"hi"), 0), vec![2, 3, 9]);
        assert_eq!(s.lookup(&A, 0), Some(1));
        // B answers from port 2: A is known, so only port 1 gets it.
        assert_eq!(s.forward(2, &frame(A, B, b"yo"), 1), vec![1]);
        // Now both are known.
        assert_eq!(s.forward(1, &frame(B, A, b"again"), 2), vec![2]);
        assert_eq!(s.macs(), 2);
        let c1 = s.counters(1).unwrap();
        assert_eq!((c1.rx_frames, c1.tx_frames, c1.flooded, c1.learned), (2, 1, 1, 1));
        let c3 = s.counters(3).unwrap();
        assert_eq!((c3.rx_frames, c3.tx_frames, c3.tx_bytes), (0, 1, 16));
    }

    #[test]
    fn broadcast_and_multicast_flood_but_never_back() {
        let mut s = switch();
        s.forward(2, &frame(A, B, b""), 0);
        assert_eq!(s.forward(1, &frame(BROADCAST, A, b""), 1), vec![2, 3, 9]);
        // IPv4 multicast 01:00:5e:..., IPv6 33:33:...: flooded the same.
        assert_eq!(s.forward(2, &frame([0x01, 0, 0x5e, 0, 0, 1], B, b""), 2), vec![1, 3, 9]);
        assert_eq!(s.forward(9, &frame([0x33, 0x33, 0, 0, 0, 1], C, b""), 3), vec![1, 2, 3]);
    }

    #[test]
    fn arp_request_floods_and_the_unicast_reply_is_learned_both_ways() {
        let mut s = switch();
        let request = arp(BROADCAST, A, 1, [10, 0, 0, 1], [0; 6], [10, 0, 0, 2]);
        assert_eq!(s.forward(1, &request, 0), vec![2, 3, 9]);
        let reply = arp(A, B, 2, [10, 0, 0, 2], A, [10, 0, 0, 1]);
        assert_eq!(s.forward(2, &reply, 1), vec![1]);
        assert_eq!((s.lookup(&A, 1), s.lookup(&B, 1)), (Some(1), Some(2)));
        // The IPv4 traffic that follows is unicast both ways.
        assert_eq!(s.forward(1, &frame(B, A, b"ping"), 2), vec![2]);
        assert_eq!(s.forward(2, &frame(A, B, b"pong"), 3), vec![1]);
    }

    #[test]
    fn unknown_unicast_floods_until_learned() {
        let mut s = switch();
        assert_eq!(s.forward(1, &frame(C, A, b""), 0), vec![2, 3, 9]);
        assert_eq!(s.forward(1, &frame(C, A, b""), 1), vec![2, 3, 9]);
        s.forward(3, &frame(BROADCAST, C, b""), 2);
        assert_eq!(s.forward(1, &frame(C, A, b""), 3), vec![3]);
        assert_eq!(s.counters(1).unwrap().flooded, 2);
    }

    #[test]
    fn a_mac_moving_ports_is_relearned() {
        let mut s = switch();
        s.forward(1, &frame(BROADCAST, A, b""), 0);
        s.forward(2, &frame(BROADCAST, B, b""), 0);
        assert_eq!(s.forward(2, &frame(A, B, b""), 1), vec![1]);
        // A migrates: its announcement comes in on port 3.
        assert_eq!(s.forward(3, &announce(A), 2), vec![1, 2, 9]);
        assert_eq!(s.lookup(&A, 2), Some(3));
        assert_eq!(s.forward(2, &frame(A, B, b""), 3), vec![3]);
        assert_eq!(s.counters(3).unwrap().moved_in, 1);
        assert_eq!(s.macs(), 2, "moved, not duplicated");
        let f = announce(A);
        assert_eq!(f.len(), 60);
        assert_eq!(&f[12..14], &[0x80, 0x35]);
    }

    #[test]
    fn detach_forgets_the_port_and_its_macs() {
        let mut s = switch();
        s.forward(1, &frame(BROADCAST, A, b""), 0);
        s.forward(2, &frame(BROADCAST, B, b""), 0);
        assert!(s.detach(2));
        assert!(!s.detach(2));
        assert_eq!(s.lookup(&B, 0), None);
        // Frames to B flood to the ports left; none goes to port 2.
        assert_eq!(s.forward(1, &frame(B, A, b""), 1), vec![3, 9]);
        assert!(s.counters(2).is_none());
        assert_eq!(s.forward(2, &frame(A, B, b""), 1), Vec::<PortId>::new(), "a detached port sends nothing");
        // Reattached, it starts over.
        assert!(s.attach(2, false));
        assert_eq!(s.counters(2).unwrap().rx_frames, 0);
        assert_eq!(s.ports().collect::<Vec<_>>(), vec![1, 2, 3, 9]);
    }

    #[test]
    fn the_table_is_bounded_and_entries_age() {
        let limits = Limits { max_macs: 4, max_macs_per_vm_port: 2, max_age: 100 };
        let mut s = Switch::new(limits);
        for p in [1, 2, 9] {
            s.attach(p, p == 9);
        }
        let mac = |i: u8| [0x02, 0, 0, 0, 0, i];
        // A VM port keeps two MACs: its third evicts its own oldest.
        for (t, i) in [(0, 1), (1, 2), (2, 3)] {
            s.forward(1, &frame(BROADCAST, mac(i), b""), t);
        }
        assert_eq!((s.lookup(&mac(1), 3), s.lookup(&mac(2), 3), s.lookup(&mac(3), 3)), (None, Some(1), Some(1)));
        assert_eq!(s.counters(1).unwrap().evicted, 1);
        // The uplink may fill the table; past it the oldest entry goes.
        for (t, i) in [(4, 10), (5, 11), (6, 12)] {
            s.forward(9, &frame(BROADCAST, mac(i), b""), t);
        }
        assert_eq!(s.macs(), 4);
        assert_eq!(s.lookup(&mac(2), 6), None, "the least recently seen");
        assert_eq!(s.lookup(&mac(12), 6), Some(9));
        // Refreshing keeps an entry; one unrefreshed for max_age is gone.
        s.forward(1, &frame(BROADCAST, mac(3), b""), 90);
        assert_eq!(s.lookup(&mac(10), 103), Some(9));
        assert_eq!(s.lookup(&mac(10), 104), None);
        assert_eq!(s.forward(2, &frame(mac(10), B, b""), 104), vec![1, 9], "aged: flooded");
        assert_eq!(s.forward(2, &frame(mac(3), B, b""), 104), vec![1], "refreshed at 90");
        s.expire(300);
        assert_eq!(s.macs(), 0);
        // The per-port counts were kept right through all that: port 1
        // holds two MACs again without evicting either.
        s.forward(1, &frame(BROADCAST, mac(1), b""), 301);
        s.forward(1, &frame(BROADCAST, mac(2), b""), 302);
        assert_eq!((s.lookup(&mac(1), 302), s.lookup(&mac(2), 302)), (Some(1), Some(1)));
    }

    #[test]
    fn no_hairpin_and_bad_frames_are_dropped() {
        let mut s = switch();
        s.forward(1, &frame(BROADCAST, A, b""), 0);
        s.forward(1, &frame(BROADCAST, C, b""), 0);
        // A to C: both behind port 1, so nothing goes anywhere.
        assert_eq!(s.forward(1, &frame(C, A, b""), 1), Vec::<PortId>::new());
        assert_eq!(s.forward(1, &frame(A, A, b""), 1), Vec::<PortId>::new(), "to itself");
        assert_eq!(s.forward(1, &[0u8; 13], 1), Vec::<PortId>::new());
        assert_eq!(s.forward(1, &frame(B, BROADCAST, b""), 1), Vec::<PortId>::new());
        assert_eq!(s.forward(1, &frame(B, [0x01, 0, 0x5e, 0, 0, 1], b""), 1), Vec::<PortId>::new());
        assert_eq!(s.forward(1, &frame(B, [0; 6], b""), 1), Vec::<PortId>::new());
        assert_eq!(s.forward(7, &frame(B, A, b""), 1), Vec::<PortId>::new(), "not attached");
        let c = s.counters(1).unwrap();
        assert_eq!((c.dropped_local, c.dropped_runt, c.dropped_bad_source), (2, 1, 3));
        assert_eq!(s.macs(), 2, "bad sources are not learned");
    }

    #[test]
    fn vm_macs_are_local_unicast_and_distinct() {
        let mut seen = alloc::collections::BTreeSet::new();
        for vm in [0, 1, 2, 255, 256, 0x1234_5678, u32::MAX] {
            for nic in [0, 1, 255] {
                let m = mac_for(vm, nic);
                assert_eq!(m[0] & 0x03, 0x02, "locally administered, unicast");
                assert!(!is_multicast(&m));
                assert!(seen.insert(m), "{m:02x?} twice");
            }
        }
        assert_eq!(mac_for(0x0102_0304, 5), [0x02, 1, 2, 3, 4, 5]);
    }
}
