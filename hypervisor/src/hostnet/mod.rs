//! The host's own network: the hypervisor drives the machine's NIC and
//! speaks TCP/IP through `smoltcp` (the link between hypervisor hosts that
//! migration will use). Layers, each tested on the host:
//!
//! - [`e1000`]: the 82540EM's descriptor rings behind a small register/DMA
//!   trait (the kernel's `platform::net` supplies the real BAR and frames);
//! - [`Nic`]: what the stack needs of any NIC; [`HostNet`] adapts one to
//!   smoltcp's `Device` and owns the interface and the sockets;
//! - [`tcp`]: byte streams (connect, listen, read, write, close) over
//!   smoltcp TCP, the transport migration can reuse;
//! - [`transfer`]: the `net listen` / `net send` test transfer;
//! - [`ping`]: `net ping` (the host answers pings itself);
//! - [`console`]: the `net` commands.

pub mod console;
pub mod e1000;
pub mod ping;
pub mod tcp;
pub mod transfer;

use alloc::collections::VecDeque;
use alloc::vec;
use alloc::vec::Vec;
use core::net::Ipv4Addr;
use serde::Serialize;
use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, Ipv4Cidr};

/// Frame and byte counts of one NIC since it was started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Frames received but thrown away: bad descriptor, length or error bits.
    pub rx_dropped: u64,
    /// Frames the device lost for want of a free receive buffer.
    pub rx_missed: u64,
    /// Frames the stack wanted to send that the NIC could not take.
    pub tx_dropped: u64,
}

/// A NIC as the stack sees it: whole Ethernet frames (no CRC) in and out,
/// polled.
pub trait Nic {
    fn mac(&self) -> [u8; 6];
    fn link_up(&mut self) -> bool;
    /// The next received frame into `buf`: its length, or `None`.
    fn recv(&mut self, buf: &mut [u8]) -> Option<usize>;
    /// Whether a received frame waits for `recv` (read without taking
    /// it): a host whose rounds go on ends one for it.
    fn rx_pending(&mut self) -> bool;
    /// Whether `send` has room for a frame now.
    fn can_send(&mut self) -> bool;
    /// Queues `frame`; false (and counted as a drop) if it cannot.
    fn send(&mut self, frame: &[u8]) -> bool;
    fn counters(&self) -> Counters;
    /// Hands the device everything queued or given back so far (a NIC may
    /// batch that); called at the end of every poll.
    fn flush(&mut self) {}
    /// Takes every frame on the wire, not only those for its own MAC (as a
    /// switch's uplink); a NIC without the mode ignores it.
    fn set_promiscuous(&mut self, _on: bool) {}
}

/// Largest Ethernet frame the stack builds (MTU 1500 plus the header).
const FRAME_MAX: usize = 1514;

/// A [`Nic`] as smoltcp's `Device`. Received frames are copied out of the
/// NIC's buffer before smoltcp parses them, so a device that rewrites a
/// buffer afterwards cannot change what the stack already checked. While
/// the NIC is a switch's uplink (`bridge`), the stack reads and writes the
/// bridge's queues instead and the switch moves frames (`net::uplink`).
pub struct Phy<N: Nic> {
    pub nic: N,
    rx: Vec<u8>,
    tx: Vec<u8>,
    bridge: Option<Bridge>,
}

/// The host stack's side of the switch while the NIC is its uplink.
#[derive(Default)]
struct Bridge {
    /// The switch's name, for `net`.
    switch: alloc::string::String,
    /// Frames the switch sent to the host's port.
    inbox: VecDeque<Vec<u8>>,
    /// Frames the stack sent, for the switch.
    outbox: VecDeque<Vec<u8>>,
    counters: BridgeCounters,
}

/// What went between the host's stack and its switch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct BridgeCounters {
    pub to_stack: u64,
    pub from_stack: u64,
    /// Frames for the stack dropped for a full inbox.
    pub dropped: u64,
    /// The switch's side, as the VM manager last reported it
    /// (`UplinkPort::switch_counters`): frames from VMs on the switch
    /// dropped for a MAC not their own, and for a full queue to the host.
    pub spoofed: u64,
    pub vm_frames_dropped: u64,
}

pub struct PhyRx<'a>(&'a [u8]);

pub struct PhyTx<'a, N: Nic> {
    nic: &'a mut N,
    buf: &'a mut Vec<u8>,
    /// The bridge's outbox, when bridged: the frame goes there, not out.
    outbox: Option<&'a mut Bridge>,
}

impl RxToken for PhyRx<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.0)
    }
}

impl<N: Nic> TxToken for PhyTx<'_, N> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        if self.buf.len() < len {
            self.buf.resize(len, 0);
        }
        let r = f(&mut self.buf[..len]);
        match self.outbox {
            Some(b) => {
                b.outbox.push_back(self.buf[..len].to_vec());
                b.counters.from_stack += 1;
            }
            // A frame the NIC refuses is counted there; TCP resends it.
            None => {
                self.nic.send(&self.buf[..len]);
            }
        }
        r
    }
}

impl<N: Nic> Device for Phy<N> {
    type RxToken<'a>
        = PhyRx<'a>
    where
        Self: 'a;
    type TxToken<'a>
        = PhyTx<'a, N>
    where
        Self: 'a;

    fn receive(&mut self, _now: Instant) -> Option<(PhyRx<'_>, PhyTx<'_, N>)> {
        let n = match &mut self.bridge {
            Some(b) => {
                let f = b.inbox.pop_front()?;
                let n = f.len().min(self.rx.len());
                self.rx[..n].copy_from_slice(&f[..n]);
                n
            }
            None => self.nic.recv(&mut self.rx)?,
        };
        Some((PhyRx(&self.rx[..n]), PhyTx { nic: &mut self.nic, buf: &mut self.tx, outbox: self.bridge.as_mut() }))
    }

    fn transmit(&mut self, _now: Instant) -> Option<PhyTx<'_, N>> {
        let room = match &self.bridge {
            Some(b) => b.outbox.len() < crate::net::uplink::MAX_QUEUED,
            None => self.nic.can_send(),
        };
        if room { Some(PhyTx { nic: &mut self.nic, buf: &mut self.tx, outbox: self.bridge.as_mut() }) } else { None }
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = FRAME_MAX;
        caps
    }
}

/// What `net` shows.
#[derive(Clone, Debug)]
pub struct Status {
    pub link_up: bool,
    pub mac: [u8; 6],
    pub addr: Option<Ipv4Cidr>,
    pub counters: Counters,
    /// The switch whose uplink the NIC is, and what went between it and
    /// the host's stack.
    pub uplink: Option<(alloc::string::String, BridgeCounters)>,
}

/// The host's interface, its sockets and the transfer service.
pub struct HostNet<N: Nic> {
    phy: Phy<N>,
    iface: Interface,
    sockets: tcp::Sockets,
    pub service: transfer::Service,
    ping: Option<ping::Ping>,
    /// ICMP identifier of the next `net ping`.
    ping_ident: u16,
    /// Text naming the device (`"82540EM 0000:00:02.0"`), for `net`.
    pub device: alloc::string::String,
    /// The longest `poll` (microseconds, the caller's clock): while it
    /// runs, no guest on the boot CPU does.
    pub longest_poll_us: u64,
}

/// How long a quiet host's network may go unpolled: rounds go on for at
/// most 8 slices (80 ms) anyway, and no TCP timer of the stack needs
/// better (its retransmits start at 1 s, delayed ACKs are 10 ms but only
/// follow a frame in, which ends the round).
pub const QUIET_US: u64 = 100_000;

/// smoltcp's clock from the host's microseconds since boot.
fn instant(now_us: u64) -> Instant {
    Instant::from_micros(now_us.min(i64::MAX as u64) as i64)
}

impl<N: Nic> HostNet<N> {
    /// `seed` varies TCP's initial sequence numbers and ports per boot.
    pub fn new(nic: N, device: alloc::string::String, now_us: u64, seed: u64) -> Self {
        let mac = nic.mac();
        let mut phy = Phy { nic, rx: vec![0; e1000::BUF], tx: vec![0; e1000::BUF], bridge: None };
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(mac)));
        config.random_seed = seed;
        let iface = Interface::new(config, &mut phy, instant(now_us));
        HostNet {
            phy,
            iface,
            sockets: tcp::Sockets::new(SocketSet::new(Vec::new()), seed),
            service: transfer::Service::default(),
            ping: None,
            ping_ident: seed as u16,
            device,
            longest_poll_us: 0,
        }
    }

    /// Sets the host's one IPv4 address (replacing any other).
    pub fn set_addr(&mut self, cidr: Ipv4Cidr) {
        self.iface.update_ip_addrs(|addrs| {
            addrs.clear();
            // Room for one address always exists after `clear`.
            let _ = addrs.push(IpCidr::Ipv4(cidr));
        });
    }

    pub fn addr(&self) -> Option<Ipv4Cidr> {
        self.iface
            .ip_addrs()
            .iter()
            .map(|a| match a {
                IpCidr::Ipv4(c) => *c,
            })
            .next()
    }

    pub fn status(&mut self) -> Status {
        Status {
            link_up: self.phy.nic.link_up(),
            mac: self.phy.nic.mac(),
            addr: self.addr(),
            counters: self.phy.nic.counters(),
            uplink: self.phy.bridge.as_ref().map(|b| (b.switch.clone(), b.counters)),
        }
    }

    /// Makes the NIC switch `name`'s uplink (promiscuous, the stack behind
    /// the switch: `net::uplink`), or (`None`) the stack's alone again.
    /// Frames still queued either way are dropped; TCP resends them.
    pub fn set_uplink(&mut self, name: Option<&str>) {
        self.phy.nic.set_promiscuous(name.is_some());
        self.phy.bridge = name.map(|n| Bridge { switch: n.into(), ..Bridge::default() });
    }

    /// The switch whose uplink the NIC is.
    pub fn uplink(&self) -> Option<&str> {
        self.phy.bridge.as_ref().map(|b| b.switch.as_str())
    }

    pub fn nic(&mut self) -> &mut N {
        &mut self.phy.nic
    }

    /// `net listen`: transfers are accepted on `port` from now on.
    pub fn listen(&mut self, port: u16) -> Result<(), alloc::string::String> {
        let mut tcp = tcp::Tcp { iface: &mut self.iface, sockets: &mut self.sockets };
        self.service.listen(&mut tcp, port)
    }

    /// `net send`: starts sending `len` pattern bytes to `to`.
    pub fn send(&mut self, to: core::net::SocketAddrV4, len: u64, now_us: u64) -> Result<(), alloc::string::String> {
        let counters = self.phy.nic.counters();
        let mut tcp = tcp::Tcp { iface: &mut self.iface, sockets: &mut self.sockets };
        self.service.send(&mut tcp, to, len, now_us, counters)
    }

    /// `net ping`: `count` echo requests to `to`, reported by `poll`.
    pub fn ping(&mut self, to: Ipv4Addr, count: u16, now_us: u64) -> Result<(), alloc::string::String> {
        if self.ping.is_some() {
            return Err("a ping is already running".into());
        }
        if self.addr().is_none() {
            return Err(alloc::format!("{}", tcp::NetError::NoAddress));
        }
        self.ping_ident = self.ping_ident.wrapping_add(1);
        self.ping = Some(ping::Ping::start(&mut self.sockets.set, to, count, self.ping_ident, now_us));
        Ok(())
    }

    /// Whether nothing of the host's network needs a poll before `now_us +
    /// QUIET_US`: no frame waits in the NIC or the bridge's queues, no
    /// ping or transfer runs, and no timer of the stack falls due sooner.
    /// Then the host's rounds may go on past the boot CPU's slice
    /// (`docs/smp.md`, "Rounds that go on"), and a frame that arrives ends
    /// one ([`HostNet::rx_pending`]).
    pub fn quiet(&mut self, now_us: u64) -> bool {
        self.ping.is_none()
            && self.service.active() == (0, 0)
            && self.phy.bridge.as_ref().is_none_or(|b| b.inbox.is_empty() && b.outbox.is_empty())
            && self.iface.poll_delay(instant(now_us), &self.sockets.set).is_none_or(|d| d.total_micros() >= QUIET_US)
            && !self.phy.nic.rx_pending()
    }

    /// Whether the host uses its network: it has an address, or the NIC is
    /// a switch's uplink (else the frames it receives go nowhere).
    pub fn in_use(&self) -> bool {
        self.addr().is_some() || self.phy.bridge.is_some()
    }

    /// Whether a frame waits in the NIC.
    pub fn rx_pending(&mut self) -> bool {
        self.phy.nic.rx_pending()
    }

    /// The TCP transport, for services that stream (migration).
    pub fn tcp(&mut self) -> tcp::Tcp<'_> {
        tcp::Tcp { iface: &mut self.iface, sockets: &mut self.sockets }
    }

    /// One round: frames in, the services, frames out. `report` gets a line
    /// per finished transfer. Bounded work per call, so the main loop stays
    /// responsive under a flood: smoltcp's `poll` would take frames for as
    /// long as they come.
    pub fn poll(&mut self, now_us: u64, report: &mut dyn FnMut(&str)) {
        let now = instant(now_us);
        self.iface.poll_maintenance(now);
        // Bridged, the switch fills the inbox up to its bound between
        // polls: take all of it, or the next round's frames find it full.
        let budget = if self.phy.bridge.is_some() { crate::net::uplink::MAX_QUEUED } else { 64 };
        for _ in 0..budget {
            use smoltcp::iface::PollIngressSingleResult;
            if self.iface.poll_ingress_single(now, &mut self.phy, &mut self.sockets.set)
                == PollIngressSingleResult::None
            {
                break;
            }
        }
        // Egress before the services too: a socket that just reached
        // TIME-WAIT sends its last ACK before a service may free it.
        self.egress(now);
        let counters = self.phy.nic.counters();
        let mut tcp = tcp::Tcp { iface: &mut self.iface, sockets: &mut self.sockets };
        self.service.poll(&mut tcp, now_us, counters, report);
        if let Some(p) = &mut self.ping
            && p.poll(&mut self.sockets.set, now_us, report)
        {
            self.ping = None;
        }
        self.egress(now);
        self.phy.nic.flush();
    }

    fn egress(&mut self, now: Instant) {
        for _ in 0..64 {
            if self.iface.poll_egress(now, &mut self.phy, &mut self.sockets.set) == smoltcp::iface::PollResult::None {
                break;
            }
        }
    }
}

/// The uplink's host side: the NIC's frames, and the stack's through the
/// bridge's queues. Only meaningful while bridged (`set_uplink`).
impl<N: Nic> crate::net::uplink::UplinkPort for HostNet<N> {
    fn take_wire(&mut self) -> Option<Vec<u8>> {
        let n = self.phy.nic.recv(&mut self.phy.rx)?;
        Some(self.phy.rx[..n].to_vec())
    }

    fn take_host(&mut self) -> Option<Vec<u8>> {
        self.phy.bridge.as_mut()?.outbox.pop_front()
    }

    fn to_wire(&mut self, frame: &[u8]) {
        // A full ring drops the frame, counted by the NIC as tx_dropped.
        self.phy.nic.send(frame);
    }

    fn to_host(&mut self, frame: Vec<u8>) {
        let Some(b) = self.phy.bridge.as_mut() else { return };
        if b.inbox.len() < crate::net::uplink::MAX_QUEUED {
            b.inbox.push_back(frame);
            b.counters.to_stack += 1;
        } else {
            b.counters.dropped += 1;
        }
    }

    fn flush(&mut self) {
        self.phy.nic.flush();
    }

    fn switch_counters(&mut self, spoofed: u64, dropped: u64) {
        if let Some(b) = self.phy.bridge.as_mut() {
            (b.counters.spoofed, b.counters.vm_frames_dropped) = (spoofed, dropped);
        }
    }
}

/// `a.b.c.d/len` with a unicast host address and len 1..=32.
pub fn parse_cidr(s: &str) -> Result<Ipv4Cidr, &'static str> {
    let (a, len) = s.split_once('/').ok_or("expected <a.b.c.d>/<prefix length>")?;
    let addr: Ipv4Addr = a.parse().map_err(|_| "not an IPv4 address")?;
    let len: u8 = len.parse().ok().filter(|l| (1..=32).contains(l)).ok_or("prefix length must be 1-32")?;
    let cidr = Ipv4Cidr::new(addr, len);
    if addr.is_unspecified() || addr.is_broadcast() || addr.is_multicast() || addr.is_loopback() {
        return Err("not a host address");
    }
    if len < 31 && (addr == cidr.network().address() || Some(addr) == cidr.broadcast()) {
        return Err("the network's own or broadcast address");
    }
    Ok(cidr)
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn mac_text(m: &[u8; 6]) -> alloc::string::String {
    alloc::format!("{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
}

/// The address as smoltcp names it, for sockets.
fn ip(a: Ipv4Addr) -> IpAddress {
    IpAddress::Ipv4(a)
}

#[cfg(any(test, feature = "testing"))]
pub mod link {
    //! Two [`Nic`]s joined by an in-memory cable, optionally lossy (for
    //! tests and the fuzz targets).

    use super::*;
    use alloc::collections::VecDeque;
    use alloc::rc::Rc;
    use alloc::vec::Vec;
    use core::cell::RefCell;

    type Wire = Rc<RefCell<VecDeque<Vec<u8>>>>;

    pub struct End {
        pub mac: [u8; 6],
        rx: Wire,
        tx: Wire,
        pub counters: Counters,
        /// Drop every n-th frame sent (0: none).
        pub drop_every: u64,
        sent: u64,
    }

    pub fn pair() -> (End, End) {
        let (a, b): (Wire, Wire) = Default::default();
        let end = |mac, rx: &Wire, tx: &Wire| End {
            mac,
            rx: rx.clone(),
            tx: tx.clone(),
            counters: Counters::default(),
            drop_every: 0,
            sent: 0,
        };
        (end([2, 0, 0, 0, 0, 1], &a, &b), end([2, 0, 0, 0, 0, 2], &b, &a))
    }

    impl Nic for End {
        fn mac(&self) -> [u8; 6] {
            self.mac
        }
        fn link_up(&mut self) -> bool {
            true
        }
        fn recv(&mut self, buf: &mut [u8]) -> Option<usize> {
            let f = self.rx.borrow_mut().pop_front()?;
            buf.get_mut(..f.len())?.copy_from_slice(&f);
            self.counters.rx_frames += 1;
            self.counters.rx_bytes += f.len() as u64;
            Some(f.len())
        }
        fn rx_pending(&mut self) -> bool {
            !self.rx.borrow().is_empty()
        }
        fn can_send(&mut self) -> bool {
            self.tx.borrow().len() < 256
        }
        fn send(&mut self, frame: &[u8]) -> bool {
            self.sent += 1;
            self.counters.tx_frames += 1;
            self.counters.tx_bytes += frame.len() as u64;
            if self.drop_every != 0 && self.sent.is_multiple_of(self.drop_every) {
                return true; // lost on the wire
            }
            self.tx.borrow_mut().push_back(frame.to_vec());
            true
        }
        fn counters(&self) -> Counters {
            self.counters
        }
    }

    /// Two hosts on one link, 10.0.0.1/24 and 10.0.0.2/24.
    pub fn hosts() -> (HostNet<End>, HostNet<End>) {
        let (a, b) = pair();
        let mut a = HostNet::new(a, "a".into(), 0, 1);
        let mut b = HostNet::new(b, "b".into(), 0, 2);
        a.set_addr(parse_cidr("10.0.0.1/24").unwrap());
        b.set_addr(parse_cidr("10.0.0.2/24").unwrap());
        (a, b)
    }

    /// Polls both hosts `rounds` times, 1 ms of simulated time apart,
    /// collecting their report lines.
    pub fn run(
        a: &mut HostNet<End>,
        b: &mut HostNet<End>,
        now: &mut u64,
        rounds: usize,
        lines: &mut Vec<alloc::string::String>,
    ) {
        for _ in 0..rounds {
            *now += 1000;
            a.poll(*now, &mut |l| lines.push(alloc::format!("a: {l}")));
            b.poll(*now, &mut |l| lines.push(alloc::format!("b: {l}")));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::link::*;
    use super::*;
    use smoltcp::wire::{
        ArpOperation, ArpPacket, ArpRepr, EthernetFrame, EthernetProtocol, EthernetRepr, Icmpv4Packet, Icmpv4Repr,
        IpProtocol, Ipv4Packet, Ipv4Repr,
    };

    #[test]
    fn cidr_parsing_refuses_bad_input() {
        assert_eq!(parse_cidr("10.0.0.1/24").unwrap().to_string(), "10.0.0.1/24");
        assert!(parse_cidr("192.168.7.9/31").is_ok());
        for bad in [
            "",
            "10.0.0.1",
            "10.0.0.1/",
            "10.0.0.1/0",
            "10.0.0.1/33",
            "10.0.0/24",
            "10.0.0.256/24",
            "0.0.0.0/8",
            "224.0.0.1/4",
            "255.255.255.255/32",
            "127.0.0.1/8",
            "10.0.0.0/24",
            "10.0.0.255/24",
            "a.b.c.d/8",
        ] {
            assert!(parse_cidr(bad).is_err(), "{bad:?} accepted");
        }
    }

    /// A host whose network needs nothing is quiet (its rounds may go on);
    /// a frame in, a ping or a transfer running, or a TCP timer soon, is
    /// not.
    #[test]
    fn a_host_network_is_quiet_only_while_nothing_waits_or_runs() {
        let (mut a, mut b) = hosts();
        let mut now = 0;
        assert!(a.in_use() && a.quiet(now) && b.quiet(now));
        // A ping: running on `a` (its timer due), a frame pending on `b`.
        a.ping(Ipv4Addr::new(10, 0, 0, 2), 2, now).unwrap();
        assert!(!a.quiet(now), "a ping runs");
        now += 1000;
        a.poll(now, &mut |_| {});
        assert!(b.rx_pending() && !b.quiet(now), "b has a frame to take");
        let mut lines = Vec::new();
        run(&mut a, &mut b, &mut now, 3000, &mut lines);
        assert!(lines.iter().any(|l| l.contains("2 received")), "{lines:?}");
        assert!(a.quiet(now) && b.quiet(now), "the ping is over and nothing waits: {lines:?}");
        // A listener alone is quiet; a transfer running is not.
        b.listen(7000).unwrap();
        assert!(b.quiet(now));
        a.send(core::net::SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), 7000), 100_000, now).unwrap();
        assert!(!a.quiet(now), "a transfer runs");
        run(&mut a, &mut b, &mut now, 3000, &mut lines);
        assert!(lines.iter().any(|l| l.starts_with("b: ") && l.contains("received")), "{lines:?}");
        // Unconfigured, a NIC is not in use (its frames go nowhere).
        let (c, _) = pair();
        assert!(!HostNet::new(c, "c".into(), 0, 3).in_use());
    }

    /// An echo request from 10.0.0.9 is answered through the NIC, as
    /// `auto-icmp-echo-reply` promises (RFC 792).
    #[test]
    fn answers_ping() {
        let (a, mut peer) = pair();
        let mut host = HostNet::new(a, "a".into(), 0, 1);
        host.set_addr(parse_cidr("10.0.0.1/24").unwrap());
        let caps = smoltcp::phy::ChecksumCapabilities::default();
        let icmp = Icmpv4Repr::EchoRequest { ident: 7, seq_no: 1, data: b"ping!" };
        let ip = Ipv4Repr {
            src_addr: Ipv4Addr::new(10, 0, 0, 9),
            dst_addr: Ipv4Addr::new(10, 0, 0, 1),
            next_header: IpProtocol::Icmp,
            payload_len: icmp.buffer_len(),
            hop_limit: 64,
        };
        let eth = EthernetRepr {
            src_addr: EthernetAddress(peer.mac),
            dst_addr: EthernetAddress([2, 0, 0, 0, 0, 1]),
            ethertype: EthernetProtocol::Ipv4,
        };
        let mut frame = vec![0u8; eth.buffer_len() + ip.buffer_len() + icmp.buffer_len()];
        let mut f = EthernetFrame::new_unchecked(&mut frame[..]);
        eth.emit(&mut f);
        let mut p = Ipv4Packet::new_unchecked(f.payload_mut());
        ip.emit(&mut p, &caps);
        icmp.emit(&mut Icmpv4Packet::new_unchecked(p.payload_mut()), &caps);
        // The peer introduces itself first (ARP, RFC 826), as a pinging host
        // would; smoltcp answers from its neighbour cache.
        let arp = ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Request,
            source_hardware_addr: EthernetAddress(peer.mac),
            source_protocol_addr: Ipv4Addr::new(10, 0, 0, 9),
            target_hardware_addr: EthernetAddress([0; 6]),
            target_protocol_addr: Ipv4Addr::new(10, 0, 0, 1),
        };
        let arp_eth = EthernetRepr { dst_addr: EthernetAddress([0xff; 6]), ethertype: EthernetProtocol::Arp, ..eth };
        let mut arp_frame = vec![0u8; arp_eth.buffer_len() + arp.buffer_len()];
        let mut f = EthernetFrame::new_unchecked(&mut arp_frame[..]);
        arp_eth.emit(&mut f);
        arp.emit(&mut ArpPacket::new_unchecked(f.payload_mut()));
        peer.send(&arp_frame);
        peer.send(&frame);
        let mut reply = None;
        for t in 1..10 {
            host.poll(t * 1000, &mut |_| {});
            let mut buf = vec![0u8; 2048];
            while let Some(n) = peer.recv(&mut buf) {
                let f = EthernetFrame::new_checked(&buf[..n]).unwrap();
                if f.ethertype() == EthernetProtocol::Ipv4 {
                    let p = Ipv4Packet::new_checked(f.payload()).unwrap();
                    let i = Icmpv4Packet::new_checked(p.payload()).unwrap();
                    if let Ok(Icmpv4Repr::EchoReply { ident, seq_no, data }) = Icmpv4Repr::parse(&i, &caps) {
                        reply = Some((p.src_addr(), ident, seq_no, data.to_vec()));
                    }
                }
            }
        }
        assert_eq!(reply, Some((Ipv4Addr::new(10, 0, 0, 1), 7, 1, b"ping!".to_vec())));
        assert_eq!(host.status().counters.rx_frames, 2);
    }

    /// Garbage frames of every length never upset the stack.
    #[test]
    fn garbage_frames_are_harmless() {
        let (a, mut peer) = pair();
        let mut host = HostNet::new(a, "a".into(), 0, 1);
        host.set_addr(parse_cidr("10.0.0.1/24").unwrap());
        let mut x = 0x1234_5678u32;
        for len in 0..1600 {
            let mut f: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            if len >= 14 {
                f[12..14].copy_from_slice(&[0x08, (len % 2) as u8 * 6]); // IPv4 or ARP
            }
            peer.send(&f);
            host.poll(len as u64 * 10, &mut |_| {});
        }
        assert_eq!(host.status().counters.rx_frames, 1600);
    }
}
