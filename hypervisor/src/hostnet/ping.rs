//! `net ping <addr> [count]`: ICMP echo requests (RFC 792) through a
//! smoltcp ICMP socket, one every 200 ms, each reply reported with its
//! round trip, then a summary. The host answers others' pings itself
//! (smoltcp's `auto-icmp-echo-reply`).

use alloc::format;
use alloc::vec;
use alloc::vec::Vec;
use core::net::Ipv4Addr;
use smoltcp::iface::{SocketHandle, SocketSet};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::socket::icmp;
use smoltcp::wire::{Icmpv4Packet, Icmpv4Repr, IpAddress};

/// Most requests one `net ping` sends.
pub const MAX_COUNT: u16 = 100;
const INTERVAL_US: u64 = 200_000;
/// How long after the last request a reply still counts.
const WAIT_US: u64 = 2_000_000;
/// Payload of each request: its send time, so a reply carries it back.
const DATA: usize = 8;

pub struct Ping {
    handle: SocketHandle,
    to: Ipv4Addr,
    ident: u16,
    count: u16,
    sent: u16,
    received: u16,
    next_us: u64,
    /// Sequence numbers already answered (a duplicate reply counts once).
    seen: Vec<bool>,
}

impl Ping {
    pub fn start(sockets: &mut SocketSet<'static>, to: Ipv4Addr, count: u16, ident: u16, now_us: u64) -> Ping {
        let meta = || vec![icmp::PacketMetadata::EMPTY; 8];
        let mut socket = icmp::Socket::new(
            icmp::PacketBuffer::new(meta(), vec![0; 8 * 64]),
            icmp::PacketBuffer::new(meta(), vec![0; 8 * 64]),
        );
        // Only an unspecified endpoint is refused, and this one is not.
        let _ = socket.bind(icmp::Endpoint::Ident(ident));
        let handle = sockets.add(socket);
        Ping { handle, to, ident, count, sent: 0, received: 0, next_us: now_us, seen: vec![false; usize::from(count)] }
    }

    /// Sends what is due and reports replies; true when done (the socket
    /// is then removed).
    pub fn poll(&mut self, sockets: &mut SocketSet<'static>, now_us: u64, report: &mut dyn FnMut(&str)) -> bool {
        let caps = ChecksumCapabilities::default();
        let socket = sockets.get_mut::<icmp::Socket>(self.handle);
        while let Ok((bytes, from)) = socket.recv() {
            let Ok(packet) = Icmpv4Packet::new_checked(bytes) else { continue };
            let Ok(Icmpv4Repr::EchoReply { ident, seq_no, data }) = Icmpv4Repr::parse(&packet, &caps) else {
                continue;
            };
            let Some(seen) = self.seen.get_mut(usize::from(seq_no)) else { continue };
            if ident != self.ident || *seen || data.len() != DATA {
                continue;
            }
            *seen = true;
            self.received += 1;
            let sent_us = u64::from_le_bytes(data.try_into().unwrap_or_default());
            let rtt = now_us.saturating_sub(sent_us);
            report(&format!("net ping: reply from {from}: seq {seq_no}, {}.{:03} ms", rtt / 1000, rtt % 1000));
        }
        if self.sent < self.count && now_us >= self.next_us && socket.can_send() {
            let repr = Icmpv4Repr::EchoRequest { ident: self.ident, seq_no: self.sent, data: &now_us.to_le_bytes() };
            let mut buf = [0u8; 8 + DATA];
            repr.emit(&mut Icmpv4Packet::new_unchecked(&mut buf[..]), &caps);
            if socket.send_slice(&buf, IpAddress::Ipv4(self.to)).is_ok() {
                self.sent += 1;
                self.next_us = now_us + INTERVAL_US;
            }
        }
        let done = self.received == self.count
            || (self.sent == self.count && now_us >= self.next_us.saturating_sub(INTERVAL_US) + WAIT_US);
        if done {
            report(&format!("net ping: {}: {} sent, {} received", self.to, self.sent, self.received));
            sockets.remove(self.handle);
        }
        done
    }
}

#[cfg(test)]
mod tests {
    use super::super::link::*;
    use alloc::string::String;
    use alloc::vec::Vec;
    use core::net::Ipv4Addr;

    #[test]
    fn pings_are_answered_and_counted() {
        let (mut a, mut b) = hosts();
        a.ping(Ipv4Addr::new(10, 0, 0, 2), 4, 0).unwrap();
        assert!(a.ping(Ipv4Addr::new(10, 0, 0, 2), 1, 0).is_err(), "one at a time");
        let (mut now, mut lines) = (0, Vec::new());
        run(&mut a, &mut b, &mut now, 3000, &mut lines);
        let replies = lines.iter().filter(|l| l.starts_with("a: net ping: reply from 10.0.0.2: seq ")).count();
        assert_eq!(replies, 4, "{lines:?}");
        assert_eq!(lines.last().map(String::as_str), Some("a: net ping: 10.0.0.2: 4 sent, 4 received"));
        // Nobody at .3: every request goes unanswered, the summary says so.
        lines.clear();
        a.ping(Ipv4Addr::new(10, 0, 0, 3), 2, now).unwrap();
        run(&mut a, &mut b, &mut now, 5000, &mut lines);
        assert_eq!(lines, ["a: net ping: 10.0.0.3: 2 sent, 0 received"]);
    }
}
