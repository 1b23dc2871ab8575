//! The test transfer between two hosts (`net listen <port>`, `net send
//! <addr>:<port> <bytes>`): it proves the link end to end and measures it.
//!
//! ```text
//! sender                                           receiver
//!   | -- "HVXF" version:u32 length:u64 ------------->|  header, 16 bytes (LE)
//!   | -- length bytes of pattern(i) ---------------->|  checked byte by byte
//!   | -- crc32(payload):u32 ------------------------>|  trailer
//!   |<-- "HVXR" flags:u32 received:u64 crc32:u32 ----|  reply; flags 0 = verified
//!   | FIN / FIN                                      |
//! ```
//!
//! The payload is a known pattern, so the receiver checks every byte, not
//! only the checksum. Both sides time out a transfer that stops moving.

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::net::SocketAddrV4;
use serde::Serialize;

use super::Counters;
use super::tcp::{StreamId, StreamState, Transport};

pub const MAGIC: [u8; 4] = *b"HVXF";
pub const REPLY_MAGIC: [u8; 4] = *b"HVXR";
pub const VERSION: u32 = 1;
const HEADER: u64 = 16;
const TRAILER: u64 = 4;
const REPLY: usize = 20;
/// Largest transfer (1 GiB): a header naming more is refused.
pub const MAX_BYTES: u64 = 1 << 30;
/// Reply flags.
const BAD_CRC: u32 = 1;
const BAD_PATTERN: u32 = 2;
/// A transfer that moves no byte for this long is given up.
const IDLE_US: u64 = 30_000_000;
/// Bytes moved per stream per poll, so one transfer cannot hog the loop.
const CHUNK: usize = 4096;
const CHUNKS_PER_POLL: usize = 16;
/// Transfers at once, each way.
const MAX_ACTIVE: usize = 4;

/// Payload byte `i`: cheap, and not periodic at any small power of two,
/// so a lost, repeated or shifted segment shows.
pub fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8 ^ (i >> 16) as u8
}

/// How one finished transfer went, for `net --json`.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Outcome {
    pub peer: String,
    pub bytes: u64,
    /// From the connection being open to the reply (sender) or from accept
    /// to the reply sent (receiver).
    pub micros: u64,
    /// Sender: ARP and the TCP handshake before that (0 for the receiver).
    pub connect_micros: u64,
    pub crc32: u32,
    /// Receiver: checksum and pattern matched. Sender: the receiver said so.
    pub verified: bool,
    /// NIC frames in and out while it ran (all traffic, not only its own).
    pub frames_in: u64,
    pub frames_out: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Stats {
    pub sends_ok: u64,
    pub sends_failed: u64,
    pub receives_ok: u64,
    pub receives_failed: u64,
    pub last_send: Option<Outcome>,
    pub last_receive: Option<Outcome>,
}

struct Sender {
    stream: StreamId,
    to: SocketAddrV4,
    len: u64,
    /// Stream bytes accepted by the transport (header, payload, trailer).
    pos: u64,
    crc: crc32fast::Hasher,
    reply: [u8; REPLY],
    reply_got: usize,
    started_us: u64,
    /// When the handshake completed.
    open_us: Option<u64>,
    progress_us: u64,
    counters: Counters,
}

struct Receiver {
    stream: StreamId,
    peer: String,
    head: [u8; HEADER as usize + TRAILER as usize],
    len: u64,
    /// Stream bytes read (header, payload, trailer).
    pos: u64,
    crc: crc32fast::Hasher,
    first_bad: Option<u64>,
    reply: Option<[u8; REPLY]>,
    reply_sent: usize,
    started_us: u64,
    progress_us: u64,
    counters: Counters,
}

#[derive(Default)]
pub struct Service {
    pub port: Option<u16>,
    senders: Vec<Sender>,
    receivers: Vec<Receiver>,
    /// Finished streams waiting for their close handshake, with a deadline.
    closing: Vec<(StreamId, u64)>,
    pub stats: Stats,
}

fn rate(bytes: u64, micros: u64) -> String {
    // Bytes per microsecond are MB/s.
    let centi = bytes * 100 / micros.max(1);
    format!("{}.{:02} MB/s", centi / 100, centi % 100)
}

fn secs(micros: u64) -> String {
    format!("{}.{:03} s", micros / 1_000_000, (micros / 1000) % 1000)
}

fn delta(now: Counters, then: Counters) -> (u64, u64) {
    (now.rx_frames.saturating_sub(then.rx_frames), now.tx_frames.saturating_sub(then.tx_frames))
}

impl Service {
    pub fn active(&self) -> (usize, usize) {
        (self.senders.len(), self.receivers.len())
    }

    /// Starts receiving transfers on `port` (one port at a time).
    pub fn listen(&mut self, t: &mut impl Transport, port: u16) -> Result<(), String> {
        if let Some(p) = self.port {
            return Err(format!("already listening on port {p}"));
        }
        t.listen(port).map_err(|e| format!("port {port}: {e}"))?;
        self.port = Some(port);
        Ok(())
    }

    /// Starts sending `len` pattern bytes to `to`.
    pub fn send(
        &mut self,
        t: &mut impl Transport,
        to: SocketAddrV4,
        len: u64,
        now_us: u64,
        counters: Counters,
    ) -> Result<(), String> {
        if len > MAX_BYTES {
            return Err(format!("at most {MAX_BYTES} bytes"));
        }
        if self.senders.len() >= MAX_ACTIVE {
            return Err(format!("{MAX_ACTIVE} transfers are already running"));
        }
        let stream = t.connect(to).map_err(|e| format!("{to}: {e}"))?;
        self.senders.push(Sender {
            stream,
            to,
            len,
            pos: 0,
            crc: crc32fast::Hasher::new(),
            reply: [0; REPLY],
            reply_got: 0,
            started_us: now_us,
            open_us: None,
            progress_us: now_us,
            counters,
        });
        Ok(())
    }

    /// Moves every transfer along; `report` gets one line per finished one.
    pub fn poll(&mut self, t: &mut impl Transport, now_us: u64, counters: Counters, report: &mut dyn FnMut(&str)) {
        if let Some(port) = self.port {
            while let Some(stream) = t.accept(port) {
                let peer = t.peer(stream).map_or_else(|| String::from("?"), |p| format!("{p}"));
                if self.receivers.len() >= MAX_ACTIVE {
                    report(&format!("net listen: refused {peer}: {MAX_ACTIVE} transfers are already running"));
                    t.abort(stream);
                    continue;
                }
                self.receivers.push(Receiver {
                    stream,
                    peer,
                    head: [0; 20],
                    len: 0,
                    pos: 0,
                    crc: crc32fast::Hasher::new(),
                    first_bad: None,
                    reply: None,
                    reply_sent: 0,
                    started_us: now_us,
                    progress_us: now_us,
                    counters,
                });
            }
        }
        let mut i = 0;
        while i < self.senders.len() {
            match step_sender(&mut self.senders[i], t, now_us) {
                Ok(false) => i += 1,
                done => {
                    let s = self.senders.remove(i);
                    self.finish_send(t, s, done.map(|_| ()), now_us, counters, report);
                }
            }
        }
        let mut i = 0;
        while i < self.receivers.len() {
            match step_receiver(&mut self.receivers[i], t, now_us) {
                Ok(false) => i += 1,
                done => {
                    let r = self.receivers.remove(i);
                    self.finish_receive(t, r, done.map(|_| ()), now_us, counters, report);
                }
            }
        }
        self.closing.retain(|&(s, deadline)| {
            let closed = t.state(s) == StreamState::Closed;
            if closed {
                t.release(s);
            } else if now_us > deadline {
                t.abort(s);
            }
            !closed && now_us <= deadline
        });
    }

    fn retire(&mut self, t: &mut impl Transport, s: StreamId, ok: bool, now_us: u64) {
        if ok {
            t.close(s);
            self.closing.push((s, now_us + 5_000_000));
        } else {
            t.abort(s);
        }
    }

    fn finish_send(
        &mut self,
        t: &mut impl Transport,
        s: Sender,
        result: Result<(), String>,
        now_us: u64,
        counters: Counters,
        report: &mut dyn FnMut(&str),
    ) {
        let open = s.open_us.unwrap_or(now_us);
        let (connect_micros, micros) = (open.saturating_sub(s.started_us), now_us.saturating_sub(open));
        let crc = s.crc.clone().finalize();
        let (fin, fout) = delta(counters, s.counters);
        let reply_ok = result.is_ok();
        self.retire(t, s.stream, reply_ok, now_us);
        let line = match result {
            Ok(()) => {
                let flags = u32::from_le_bytes(s.reply[4..8].try_into().unwrap_or_default());
                let got = u64::from_le_bytes(s.reply[8..16].try_into().unwrap_or_default());
                let their_crc = u32::from_le_bytes(s.reply[16..20].try_into().unwrap_or_default());
                let verified = flags == 0 && got == s.len && their_crc == crc;
                self.stats.last_send = Some(Outcome {
                    peer: format!("{}", s.to),
                    bytes: s.len,
                    micros,
                    connect_micros,
                    crc32: crc,
                    verified,
                    frames_in: fin,
                    frames_out: fout,
                });
                if verified {
                    self.stats.sends_ok += 1;
                    format!(
                        "net send: {} bytes to {} in {} ({}) after {} connecting, {fout} frames out, {fin} in, crc32 {crc:#010x} verified by the receiver",
                        s.len,
                        s.to,
                        secs(micros),
                        rate(s.len, micros),
                        secs(connect_micros)
                    )
                } else {
                    self.stats.sends_failed += 1;
                    format!(
                        "net send: to {}: the receiver did NOT verify the data (flags {flags:#x}, it got {got} bytes, crc32 {their_crc:#010x}, ours {crc:#010x})",
                        s.to
                    )
                }
            }
            Err(why) => {
                self.stats.sends_failed += 1;
                let sent = s.pos.saturating_sub(HEADER).min(s.len);
                format!("net send: to {} failed after {sent} of {} bytes: {why}", s.to, s.len)
            }
        };
        report(&line);
    }

    fn finish_receive(
        &mut self,
        t: &mut impl Transport,
        r: Receiver,
        result: Result<(), String>,
        now_us: u64,
        counters: Counters,
        report: &mut dyn FnMut(&str),
    ) {
        let micros = now_us.saturating_sub(r.started_us);
        let crc = r.crc.clone().finalize();
        let (fin, fout) = delta(counters, r.counters);
        self.retire(t, r.stream, result.is_ok(), now_us);
        let line = match result {
            Ok(()) => {
                let sent_crc = u32::from_le_bytes(r.head[16..20].try_into().unwrap_or_default());
                let verified = sent_crc == crc && r.first_bad.is_none();
                self.stats.last_receive = Some(Outcome {
                    peer: r.peer.clone(),
                    bytes: r.len,
                    micros,
                    connect_micros: 0,
                    crc32: crc,
                    verified,
                    frames_in: fin,
                    frames_out: fout,
                });
                if verified {
                    self.stats.receives_ok += 1;
                    format!(
                        "net listen: received {} bytes from {} in {} ({}), {fin} frames in, {fout} out, crc32 {crc:#010x} matches, pattern ok",
                        r.len,
                        r.peer,
                        secs(micros),
                        rate(r.len, micros)
                    )
                } else {
                    self.stats.receives_failed += 1;
                    let pat = r
                        .first_bad
                        .map_or_else(|| String::from("pattern ok"), |b| format!("pattern wrong from byte {b}"));
                    format!(
                        "net listen: {} bytes from {}: BAD DATA: crc32 sent {sent_crc:#010x}, computed {crc:#010x}; {pat}",
                        r.len, r.peer
                    )
                }
            }
            Err(why) => {
                self.stats.receives_failed += 1;
                let got = r.pos.saturating_sub(HEADER).min(r.len);
                format!("net listen: from {}: failed after {got} bytes: {why}", r.peer)
            }
        };
        report(&line);
    }
}

/// Fills `buf` with stream bytes from `pos` on, never crossing from the
/// payload into the trailer (the trailer needs the final checksum).
fn sender_bytes(s: &Sender, buf: &mut [u8]) -> usize {
    let payload_end = HEADER + s.len;
    if s.pos < HEADER {
        let mut h = [0u8; HEADER as usize];
        h[0..4].copy_from_slice(&MAGIC);
        h[4..8].copy_from_slice(&VERSION.to_le_bytes());
        h[8..16].copy_from_slice(&s.len.to_le_bytes());
        let from = s.pos as usize;
        buf[..h.len() - from].copy_from_slice(&h[from..]);
        h.len() - from
    } else if s.pos < payload_end {
        let n = (buf.len() as u64).min(payload_end - s.pos) as usize;
        for (k, b) in buf[..n].iter_mut().enumerate() {
            *b = pattern(s.pos - HEADER + k as u64);
        }
        n
    } else {
        let t = s.crc.clone().finalize().to_le_bytes();
        let from = (s.pos - payload_end) as usize;
        buf[..t.len() - from].copy_from_slice(&t[from..]);
        t.len() - from
    }
}

/// One poll's worth of a send: Ok(true) when the reply is in.
fn step_sender(s: &mut Sender, t: &mut impl Transport, now_us: u64) -> Result<bool, String> {
    let total = HEADER + s.len + TRAILER;
    let mut buf = vec![0u8; CHUNK];
    let before = (s.pos, s.reply_got);
    if s.open_us.is_none() && t.state(s.stream) != StreamState::Connecting {
        s.open_us = Some(now_us);
    }
    for _ in 0..CHUNKS_PER_POLL {
        if s.pos >= total {
            break;
        }
        let n = sender_bytes(s, &mut buf);
        let wrote = t.write(s.stream, &buf[..n]).map_err(|_| String::from("the connection was closed or refused"))?;
        if s.pos >= HEADER && s.pos < HEADER + s.len {
            s.crc.update(&buf[..wrote]);
        }
        s.pos += wrote as u64;
        if wrote < n {
            break;
        }
    }
    while s.reply_got < REPLY {
        let n = match t.read(s.stream, &mut s.reply[s.reply_got..]) {
            Ok(n) => n,
            Err(_) => return Err(String::from("the receiver closed the connection without a reply")),
        };
        if n == 0 {
            break;
        }
        s.reply_got += n;
    }
    if s.reply_got == REPLY {
        if s.reply[0..4] != REPLY_MAGIC {
            return Err(String::from("the reply is not a transfer reply"));
        }
        return Ok(true);
    }
    if (s.pos, s.reply_got) != before {
        s.progress_us = now_us;
    } else if now_us.saturating_sub(s.progress_us) > IDLE_US {
        return Err(String::from("no progress for 30 s"));
    }
    Ok(false)
}

/// One poll's worth of a receive: Ok(true) when the reply is sent.
fn step_receiver(r: &mut Receiver, t: &mut impl Transport, now_us: u64) -> Result<bool, String> {
    let mut buf = vec![0u8; CHUNK];
    let before = (r.pos, r.reply_sent);
    if r.reply.is_none() {
        for _ in 0..CHUNKS_PER_POLL {
            let want = if r.pos < HEADER {
                (HEADER - r.pos) as usize
            } else if r.pos < HEADER + r.len {
                (HEADER + r.len - r.pos).min(CHUNK as u64) as usize
            } else {
                (HEADER + r.len + TRAILER - r.pos) as usize
            };
            let n = t
                .read(r.stream, &mut buf[..want])
                .map_err(|_| String::from("the sender closed the connection early"))?;
            if n == 0 {
                break;
            }
            let data = &buf[..n];
            if r.pos < HEADER {
                r.head[r.pos as usize..r.pos as usize + n].copy_from_slice(data);
                r.pos += n as u64;
                if r.pos == HEADER {
                    if r.head[0..4] != MAGIC {
                        return Err(String::from("refused: not a transfer stream"));
                    }
                    let version = u32::from_le_bytes(r.head[4..8].try_into().unwrap_or_default());
                    if version != VERSION {
                        return Err(format!("refused: transfer version {version}, this host speaks {VERSION}"));
                    }
                    r.len = u64::from_le_bytes(r.head[8..16].try_into().unwrap_or_default());
                    if r.len > MAX_BYTES {
                        return Err(format!("refused: {} bytes is over the {MAX_BYTES}-byte limit", r.len));
                    }
                }
            } else if r.pos < HEADER + r.len {
                let off = r.pos - HEADER;
                if r.first_bad.is_none()
                    && let Some(k) = data.iter().enumerate().position(|(k, &b)| b != pattern(off + k as u64))
                {
                    r.first_bad = Some(off + k as u64);
                }
                r.crc.update(data);
                r.pos += n as u64;
            } else {
                let at = 16 + (r.pos - HEADER - r.len) as usize;
                r.head[at..at + n].copy_from_slice(data);
                r.pos += n as u64;
            }
            if r.pos == HEADER + r.len + TRAILER {
                let crc = r.crc.clone().finalize();
                let sent_crc = u32::from_le_bytes(r.head[16..20].try_into().unwrap_or_default());
                let flags =
                    if sent_crc != crc { BAD_CRC } else { 0 } | if r.first_bad.is_some() { BAD_PATTERN } else { 0 };
                let mut reply = [0u8; REPLY];
                reply[0..4].copy_from_slice(&REPLY_MAGIC);
                reply[4..8].copy_from_slice(&flags.to_le_bytes());
                reply[8..16].copy_from_slice(&r.len.to_le_bytes());
                reply[16..20].copy_from_slice(&crc.to_le_bytes());
                r.reply = Some(reply);
                break;
            }
        }
    }
    if let Some(reply) = r.reply {
        let n = t
            .write(r.stream, &reply[r.reply_sent..])
            .map_err(|_| String::from("the sender went away before the reply"))?;
        r.reply_sent += n;
        if r.reply_sent == REPLY {
            return Ok(true);
        }
    }
    if (r.pos, r.reply_sent) != before {
        r.progress_us = now_us;
    } else if now_us.saturating_sub(r.progress_us) > IDLE_US {
        return Err(String::from("no progress for 30 s"));
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::super::link::*;
    use super::super::tcp::parse_endpoint;
    use super::*;

    fn transfer(len: u64, drop_every: u64) -> (Vec<String>, Stats, Stats) {
        let (mut a, mut b) = hosts();
        a.nic().drop_every = drop_every;
        b.listen(7000).unwrap();
        a.send(parse_endpoint("10.0.0.2:7000").unwrap(), len, 0).unwrap();
        let (mut now, mut lines) = (0, Vec::new());
        for _ in 0..100_000 {
            run(&mut a, &mut b, &mut now, 1, &mut lines);
            if lines.len() >= 2 {
                break;
            }
        }
        // The close handshakes finish and every socket is freed.
        run(&mut a, &mut b, &mut now, 200, &mut lines);
        let (ca, cb) = (a.service.closing.clone(), b.service.closing.clone());
        let states: Vec<_> =
            ca.iter().map(|c| a.tcp().sock_state(c.0)).chain(cb.iter().map(|c| b.tcp().sock_state(c.0))).collect();
        assert_eq!(a.service.closing.len() + b.service.closing.len(), 0, "{lines:?} {states:?}");
        (lines, a.service.stats.clone(), b.service.stats.clone())
    }

    #[test]
    fn a_transfer_is_verified_on_both_sides() {
        let (lines, sa, sb) = transfer(1 << 20, 0);
        assert!(
            lines.iter().any(|l| l.starts_with("b: net listen: received 1048576 bytes from 10.0.0.1:")),
            "{lines:?}"
        );
        assert!(lines.iter().any(|l| l.starts_with("a: net send: 1048576 bytes to 10.0.0.2:7000")), "{lines:?}");
        assert_eq!((sa.sends_ok, sb.receives_ok, sa.sends_failed, sb.receives_failed), (1, 1, 0, 0));
        let (s, r) = (sa.last_send.unwrap(), sb.last_receive.unwrap());
        assert!(s.verified && r.verified);
        let mut h = crc32fast::Hasher::new();
        h.update(&(0..1u64 << 20).map(pattern).collect::<Vec<_>>());
        assert_eq!((s.crc32, r.crc32), (h.clone().finalize(), h.finalize()));
        assert!(s.frames_out > (1 << 20) / 1500);
    }

    #[test]
    fn loss_and_empty_transfers() {
        let (lines, sa, sb) = transfer(200_000, 17);
        assert_eq!((sa.sends_ok, sb.receives_ok), (1, 1), "{lines:?}");
        let (lines, sa, sb) = transfer(0, 0);
        assert_eq!((sa.sends_ok, sb.receives_ok), (1, 1), "{lines:?}");
    }

    /// A peer that is not a sender (wrong magic, wrong version, a huge
    /// length, corrupt data, or one that hangs up) is refused or reported,
    /// and the listener goes on serving.
    #[test]
    fn bad_senders_are_refused() {
        let mut bad_crc = Vec::from(*b"HVXF");
        bad_crc.extend_from_slice(&VERSION.to_le_bytes());
        bad_crc.extend_from_slice(&4u64.to_le_bytes());
        bad_crc.extend((0..4).map(pattern));
        bad_crc.extend_from_slice(&[1, 2, 3, 4]);
        let mut bad_pattern = bad_crc.clone();
        bad_pattern[16] ^= 1;
        let mut huge = Vec::from(*b"HVXF");
        huge.extend_from_slice(&VERSION.to_le_bytes());
        huge.extend_from_slice(&u64::MAX.to_le_bytes());
        let mut v2 = Vec::from(*b"HVXF");
        v2.extend_from_slice(&2u32.to_le_bytes());
        v2.extend_from_slice(&[0; 8]);
        let cases: [(&[u8], &str); 6] = [
            (b"GET / HTTP/1.0\r\n\r\n", "not a transfer stream"),
            (&v2, "transfer version 2"),
            (&huge, "over the"),
            (&bad_crc, "BAD DATA: crc32 sent 0x04030201"),
            (&bad_pattern, "pattern wrong from byte 0"),
            (b"HVXF", "closed the connection early"),
        ];
        let (mut a, mut b) = hosts();
        b.listen(7000).unwrap();
        assert!(b.listen(7001).is_err());
        let to = parse_endpoint("10.0.0.2:7000").unwrap();
        let (mut now, mut lines) = (0, Vec::new());
        for (bytes, expect) in cases {
            let s = a.tcp().connect(to).unwrap();
            run(&mut a, &mut b, &mut now, 20, &mut lines);
            assert_eq!(a.tcp().write(s, bytes), Ok(bytes.len()));
            a.tcp().close(s);
            lines.clear();
            run(&mut a, &mut b, &mut now, 50, &mut lines);
            assert!(lines.iter().any(|l| l.contains(expect)), "{expect:?} not in {lines:?}");
            a.tcp().abort(s);
        }
        assert_eq!(b.service.stats.receives_failed, 6);
        // Still listening: a real transfer goes through.
        a.send(to, 10_000, now).unwrap();
        lines.clear();
        run(&mut a, &mut b, &mut now, 200, &mut lines);
        assert_eq!(b.service.stats.receives_ok, 1, "{lines:?}");
    }

    #[test]
    fn a_dead_peer_times_out() {
        let (mut a, mut b) = hosts();
        let to = parse_endpoint("10.0.0.2:7000").unwrap();
        b.listen(7000).unwrap();
        a.send(to, 8 << 20, 0).unwrap();
        let (mut now, mut lines) = (0, Vec::new());
        run(&mut a, &mut b, &mut now, 5, &mut lines);
        // b vanishes (its NIC is never polled again).
        for _ in 0..40_000 {
            now += 1000;
            a.poll(now, &mut |l| lines.push(String::from(l)));
            if !lines.is_empty() {
                break;
            }
        }
        assert!(lines.iter().any(|l| l.starts_with("net send: to 10.0.0.2:7000 failed after")), "{lines:?}");
        assert_eq!(a.service.stats.sends_failed, 1);
        assert!(a.send(to, MAX_BYTES + 1, now).is_err());
    }
}
