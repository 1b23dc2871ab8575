//! Byte streams over smoltcp TCP: the transport the host's services use
//! (the `net` test transfer now, migration later). A [`Transport`] is a
//! trait so that a service can be written once and tested over two
//! simulated hosts (`hostnet::link`).

use alloc::vec;
use alloc::vec::Vec;
use core::net::{Ipv4Addr, SocketAddrV4};
use smoltcp::iface::{Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp::{self, State};
use smoltcp::time::Duration;

/// A stream: one TCP connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamId(SocketHandle);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamState {
    /// Handshake under way.
    Connecting,
    /// Data flows both ways.
    Open,
    /// The peer finished sending (FIN): what it sent can still be read,
    /// and we may still write.
    PeerClosed,
    /// Over: closed by both sides, reset, or timed out.
    Closed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetError {
    /// The host has no address yet (`net host ip=`).
    NoAddress,
    /// Too many sockets open.
    NoSockets,
    /// Something already listens on that port.
    PortInUse,
    /// The connection is over (or was never made).
    Closed,
}

impl core::fmt::Display for NetError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            NetError::NoAddress => "the host has no address (net host ip=<addr>/<len>)",
            NetError::NoSockets => "too many connections",
            NetError::PortInUse => "the port is already listened on",
            NetError::Closed => "the connection is closed",
        })
    }
}

/// Connection-oriented byte streams.
pub trait Transport {
    /// Starts connecting to `to`; the stream is `Connecting` until the
    /// handshake completes.
    fn connect(&mut self, to: SocketAddrV4) -> Result<StreamId, NetError>;
    /// Accepts connections on `port` from now on.
    fn listen(&mut self, port: u16) -> Result<(), NetError>;
    /// Stops accepting on `port` (accepted streams stay).
    fn unlisten(&mut self, port: u16);
    /// A connection made to `port`, if one arrived.
    fn accept(&mut self, port: u16) -> Option<StreamId>;
    /// What has arrived, up to `buf.len()` bytes: 0 if nothing yet.
    /// `Err(Closed)` once the peer closed and everything was read.
    fn read(&mut self, s: StreamId, buf: &mut [u8]) -> Result<usize, NetError>;
    /// Queues what fits of `data` (0 if the send buffer is full).
    fn write(&mut self, s: StreamId, data: &[u8]) -> Result<usize, NetError>;
    /// Bytes written but not yet acknowledged by the peer.
    fn unacked(&self, s: StreamId) -> usize;
    /// Ends our direction (FIN after the queued data).
    fn close(&mut self, s: StreamId);
    /// Resets the connection and forgets the stream.
    fn abort(&mut self, s: StreamId);
    /// Forgets a stream that is `Closed`, freeing its buffers.
    fn release(&mut self, s: StreamId);
    fn state(&self, s: StreamId) -> StreamState;
    fn peer(&self, s: StreamId) -> Option<SocketAddrV4>;
}

/// Socket buffers: 256 KiB each way (smoltcp scales the window past 64
/// KiB, RFC 7323), so a few milliseconds of emulated round trip do not
/// cap a transfer at window / RTT.
pub const SOCKET_BUFFER: usize = 256 * 1024;
/// At most this many sockets (listening and connected) at once, so a peer
/// opening connections cannot exhaust the heap.
pub const MAX_SOCKETS: usize = 16;
/// A connection whose peer acknowledges nothing for this long is reset.
const TIMEOUT: Duration = Duration::from_secs(20);

/// The sockets and the listening ports.
pub struct Sockets {
    pub(super) set: SocketSet<'static>,
    /// Listening port and the socket currently listening on it (none while
    /// the socket limit is reached).
    listeners: Vec<(u16, Option<SocketHandle>)>,
    live: usize,
    next_port: u16,
}

impl Sockets {
    pub fn new(set: SocketSet<'static>, seed: u64) -> Self {
        // Ephemeral ports from the IANA range (RFC 6335), starting at a
        // per-boot offset so a restarted host does not reuse its old ones.
        Sockets { set, listeners: Vec::new(), live: 0, next_port: 49152 + (seed % 16384) as u16 }
    }

    fn new_socket(&mut self) -> Result<tcp::Socket<'static>, NetError> {
        if self.live >= MAX_SOCKETS {
            return Err(NetError::NoSockets);
        }
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; SOCKET_BUFFER]),
            tcp::SocketBuffer::new(vec![0; SOCKET_BUFFER]),
        );
        s.set_timeout(Some(TIMEOUT));
        // Bulk transfers: no Nagle delay for the last short segment, and
        // no delayed ACK: the ACKs of one poll's frames go out together
        // anyway, and a held-back ACK stalls a sender waiting for window.
        s.set_nagle_enabled(false);
        s.set_ack_delay(None);
        // Congestion control (RFC 5681): without it a sender puts its whole
        // window (256 KiB) on the wire at once, and a slow receiver (Bochs'
        // NIC takes about a frame per emulated millisecond) drops most of
        // it again and again, until the retransmission timer has backed off
        // to many seconds.
        s.set_congestion_control(tcp::CongestionControl::Reno);
        Ok(s)
    }

    fn add(&mut self, s: tcp::Socket<'static>) -> SocketHandle {
        self.live += 1;
        self.set.add(s)
    }

    fn remove(&mut self, h: SocketHandle) {
        self.set.remove(h);
        self.live -= 1;
    }

    fn listening_socket(&mut self, port: u16) -> Result<SocketHandle, NetError> {
        let mut s = self.new_socket()?;
        s.listen(port).map_err(|_| NetError::PortInUse)?;
        Ok(self.add(s))
    }
}

/// The transport over one interface's sockets.
pub struct Tcp<'a> {
    pub(super) iface: &'a mut Interface,
    pub(super) sockets: &'a mut Sockets,
}

impl Tcp<'_> {
    #[cfg(test)]
    pub fn sock_state(&self, s: StreamId) -> State {
        self.sock(s).state()
    }
    fn sock(&self, s: StreamId) -> &tcp::Socket<'static> {
        self.sockets.set.get::<tcp::Socket>(s.0)
    }
    fn sock_mut(&mut self, s: StreamId) -> &mut tcp::Socket<'static> {
        self.sockets.set.get_mut::<tcp::Socket>(s.0)
    }
}

impl Transport for Tcp<'_> {
    fn connect(&mut self, to: SocketAddrV4) -> Result<StreamId, NetError> {
        if self.iface.ipv4_addr().is_none() {
            return Err(NetError::NoAddress);
        }
        let mut s = self.sockets.new_socket()?;
        let port = self.sockets.next_port;
        self.sockets.next_port = if port == u16::MAX { 49152 } else { port + 1 };
        s.connect(self.iface.context(), (super::ip(*to.ip()), to.port()), port).map_err(|_| NetError::Closed)?;
        Ok(StreamId(self.sockets.add(s)))
    }

    fn listen(&mut self, port: u16) -> Result<(), NetError> {
        if port == 0 || self.sockets.listeners.iter().any(|(p, _)| *p == port) {
            return Err(NetError::PortInUse);
        }
        let h = self.sockets.listening_socket(port)?;
        self.sockets.listeners.push((port, Some(h)));
        Ok(())
    }

    fn unlisten(&mut self, port: u16) {
        if let Some(i) = self.sockets.listeners.iter().position(|(p, _)| *p == port)
            && let (_, Some(h)) = self.sockets.listeners.remove(i)
        {
            self.sockets.remove(h);
        }
    }

    /// smoltcp has no accept queue: the listening socket itself becomes the
    /// connection. It is handed out as a stream and a fresh socket listens
    /// in its place; if the socket limit forbids one, the port is deaf
    /// until streams are released (each `accept` tries again).
    fn accept(&mut self, port: u16) -> Option<StreamId> {
        let i = self.sockets.listeners.iter().position(|(p, _)| *p == port)?;
        let Some(h) = self.sockets.listeners[i].1 else {
            self.sockets.listeners[i].1 = self.sockets.listening_socket(port).ok();
            return None;
        };
        if self.sockets.set.get::<tcp::Socket>(h).is_listening() {
            return None;
        }
        self.sockets.listeners[i].1 = self.sockets.listening_socket(port).ok();
        Some(StreamId(h))
    }

    fn read(&mut self, s: StreamId, buf: &mut [u8]) -> Result<usize, NetError> {
        let sock = self.sock_mut(s);
        if sock.can_recv() {
            return sock.recv_slice(buf).map_err(|_| NetError::Closed);
        }
        if sock.may_recv() || sock.state() == State::SynSent || sock.state() == State::SynReceived {
            Ok(0)
        } else {
            Err(NetError::Closed)
        }
    }

    fn write(&mut self, s: StreamId, data: &[u8]) -> Result<usize, NetError> {
        let sock = self.sock_mut(s);
        if sock.may_send() {
            sock.send_slice(data).map_err(|_| NetError::Closed)
        } else if matches!(sock.state(), State::SynSent | State::SynReceived) {
            Ok(0)
        } else {
            Err(NetError::Closed)
        }
    }

    fn unacked(&self, s: StreamId) -> usize {
        self.sock(s).send_queue()
    }

    fn close(&mut self, s: StreamId) {
        self.sock_mut(s).close();
    }

    fn abort(&mut self, s: StreamId) {
        self.sock_mut(s).abort();
        self.release(s);
    }

    fn release(&mut self, s: StreamId) {
        self.sockets.remove(s.0);
    }

    fn state(&self, s: StreamId) -> StreamState {
        match self.sock(s).state() {
            State::SynSent | State::SynReceived | State::Listen => StreamState::Connecting,
            State::Established | State::FinWait1 | State::FinWait2 => StreamState::Open,
            State::CloseWait | State::LastAck => StreamState::PeerClosed,
            State::Closed | State::Closing | State::TimeWait => StreamState::Closed,
        }
    }

    fn peer(&self, s: StreamId) -> Option<SocketAddrV4> {
        let ep = self.sock(s).remote_endpoint()?;
        match ep.addr {
            smoltcp::wire::IpAddress::Ipv4(a) => Some(SocketAddrV4::new(a, ep.port)),
        }
    }
}

/// `a.b.c.d:port`.
pub fn parse_endpoint(s: &str) -> Result<SocketAddrV4, &'static str> {
    let (a, p) = s.rsplit_once(':').ok_or("expected <a.b.c.d>:<port>")?;
    let addr: Ipv4Addr = a.parse().map_err(|_| "not an IPv4 address")?;
    let port: u16 = p.parse().ok().filter(|&p| p != 0).ok_or("port must be 1-65535")?;
    if addr.is_unspecified() || addr.is_broadcast() || addr.is_multicast() {
        return Err("not a host address");
    }
    Ok(SocketAddrV4::new(addr, port))
}

#[cfg(test)]
mod tests {
    use super::super::link::*;
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(parse_endpoint("10.0.0.2:7000").unwrap().to_string(), "10.0.0.2:7000");
        for bad in ["10.0.0.2", "10.0.0.2:0", "10.0.0.2:65536", ":80", "0.0.0.0:80", "x:1", "10.0.0.2:-1"] {
            assert!(parse_endpoint(bad).is_err(), "{bad:?}");
        }
    }

    /// 300 KB each way between two simulated hosts over a link that loses
    /// every 13th (one way) and 17th (the other) frame: bytes arrive complete and in order, both sides
    /// see the close.
    #[test]
    fn streams_survive_loss_both_ways() {
        let (mut a, mut b) = hosts();
        a.nic().drop_every = 13;
        b.nic().drop_every = 17;
        b.tcp().listen(7000).unwrap();
        assert_eq!(b.tcp().listen(7000), Err(NetError::PortInUse));
        let to = parse_endpoint("10.0.0.2:7000").unwrap();
        let sa = a.tcp().connect(to).unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let (mut sent_a, mut sent_b) = (0, 0);
        let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
        let mut sb = None;
        let (mut now, mut lines) = (0, Vec::new());
        let mut buf = vec![0u8; 4096];
        for _ in 0..200_000 {
            run(&mut a, &mut b, &mut now, 1, &mut lines);
            if sb.is_none() {
                sb = b.tcp().accept(7000);
            }
            let Some(sb) = sb else { continue };
            if sent_a < data.len() {
                sent_a += a.tcp().write(sa, &data[sent_a..]).unwrap();
                if sent_a == data.len() {
                    a.tcp().close(sa);
                }
            }
            if sent_b < data.len() {
                sent_b += b.tcp().write(sb, &data[sent_b..]).unwrap();
                if sent_b == data.len() {
                    b.tcp().close(sb);
                }
            }
            if let Ok(n) = a.tcp().read(sa, &mut buf) {
                got_a.extend_from_slice(&buf[..n]);
            }
            if let Ok(n) = b.tcp().read(sb, &mut buf) {
                got_b.extend_from_slice(&buf[..n]);
            }
            if a.tcp().state(sa) == StreamState::Closed && b.tcp().state(sb) == StreamState::Closed {
                break;
            }
        }
        assert!(got_a == data && got_b == data, "a got {} b got {}", got_a.len(), got_b.len());
        let sb = sb.unwrap();
        assert_eq!(a.tcp().read(sa, &mut buf), Err(NetError::Closed));
        a.tcp().release(sa);
        b.tcp().release(sb);
        // The listener still takes a second connection.
        let sa = a.tcp().connect(to).unwrap();
        let mut accepted = None;
        for _ in 0..100 {
            run(&mut a, &mut b, &mut now, 1, &mut lines);
            accepted = accepted.or_else(|| b.tcp().accept(7000));
        }
        let sb = accepted.expect("second connection accepted");
        assert_eq!(a.tcp().state(sa), StreamState::Open);
        assert_eq!(b.tcp().peer(sb).map(|p| *p.ip()), Some(Ipv4Addr::new(10, 0, 0, 1)));
    }

    #[test]
    fn refusals() {
        let (mut a, mut b) = hosts();
        let (c, _) = pair();
        let mut bare = super::super::HostNet::new(c, "c".into(), 0, 3);
        let to = parse_endpoint("10.0.0.2:7000").unwrap();
        assert_eq!(bare.tcp().connect(to), Err(NetError::NoAddress));
        // Nobody listens: the peer resets, the stream closes.
        let s = a.tcp().connect(to).unwrap();
        let (mut now, mut lines) = (0, Vec::new());
        run(&mut a, &mut b, &mut now, 50, &mut lines);
        assert_eq!(a.tcp().state(s), StreamState::Closed);
        a.tcp().release(s);
        // The socket limit holds.
        let mut held = Vec::new();
        while let Ok(s) = a.tcp().connect(to) {
            held.push(s);
        }
        assert_eq!(held.len(), MAX_SOCKETS);
        assert_eq!(a.tcp().connect(to), Err(NetError::NoSockets));
        assert_eq!(a.tcp().listen(1), Err(NetError::NoSockets));
    }
}
