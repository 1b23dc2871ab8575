//! The receiving side (`migrate listen [port]`): one connection at a
//! time; its stream is applied record by record, as whole records arrive,
//! to a new VM that does not run (`checkpoint::Rebuild`, the restore's
//! own code). Only a stream that ends correctly (end record: count,
//! bytes and digest agree) becomes a running VM; then the source is told
//! `HVMIGRATE OK <id>`. A refused stream (another format version, a
//! checksum, a VM this host cannot run) or a connection that ends early
//! drops the partial VM, with one line saying why.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::net::Ipv4Addr;

use migrate::{FRAME_LEN, IoError, PROLOGUE_LEN, Reader, Source, record_len};

use super::{IDLE_US, REPLY_OK, REPLY_REFUSED};
use crate::backend::Backend;
use crate::hostnet::tcp::{StreamId, Transport};
use crate::manager::checkpoint::{Rebuild, check_shape};
use crate::manager::{Error, Manager};
use crate::vm::exit::Console;

/// Bytes read from the connection per round at most, and most held
/// unapplied: a little more than the largest record (1 MiB).
const READ_PER_ROUND: usize = 512 * 1024;
const MAX_BUFFERED: usize = 2 << 20;
/// Records applied per round at most (each up to 1 MiB, usually 256 KiB),
/// so other VMs and the console keep their time.
const RECORDS_PER_ROUND: usize = 8;

/// Listening for migrations, and the one arriving.
pub struct Incoming<B: Backend> {
    pub port: u16,
    conn: Option<Conn<B>>,
    /// Migrations received and refused since listening began.
    pub received: u64,
    pub refused: u64,
    /// Post-copy VMs whose connection broke, paused until their source
    /// (by address) connects again.
    pub orphans: Vec<Orphan>,
    /// The last post-copy VMs that completed, by source address: a source
    /// that lost the OK line and connects again is told again.
    done: Vec<(Ipv4Addr, u32)>,
    /// More connections while one arrives, oldest first: post-copy's
    /// connection for the pages the VM asked for, or a source's recovery,
    /// once their first line says so.
    sides: Vec<DemandIn>,
}

/// A post-copy VM whose connection broke.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Orphan {
    pub vm: u32,
    /// The source's address (its recovery is matched on it).
    pub ip: Ipv4Addr,
    /// The break paused it (an operator's pause stays on recovery).
    pub paused_by_break: bool,
    /// When its first connection began, and the stream bytes its
    /// connections carried so far (for the report at the end).
    pub since_us: u64,
    pub bytes: u64,
}

/// Connections held beside the one arriving, at most.
const MAX_SIDES: usize = 4;

/// Post-copy's second connection from the source: a stream of its own
/// (the VM's state again, passed over, then the pages the VM asked for),
/// applied to the running VM like the first's pages.
struct DemandIn {
    stream: StreamId,
    ip: Option<Ipv4Addr>,
    inbox: Inbox,
    reader: Option<Reader<Inbox>>,
    /// Its first line came.
    known: bool,
    /// Its first line is a recovery's: it replaces the connection held.
    recover: bool,
    started_us: u64,
}

impl<B: Backend> Incoming<B> {
    pub fn new(port: u16) -> Self {
        Incoming { port, conn: None, received: 0, refused: 0, orphans: Vec::new(), done: Vec::new(), sides: Vec::new() }
    }

    /// Whether a stream is arriving.
    pub fn busy(&self) -> bool {
        self.conn.is_some()
    }
}

/// One arriving stream.
struct Conn<B: Backend> {
    stream: StreamId,
    peer: String,
    /// The source's address (recovery matches on it).
    ip: Option<Ipv4Addr>,
    /// Post-copy recovery: this connection carries the rest of a broken
    /// post-copy (its state records are passed over).
    recovering: bool,
    /// When the migration's first connection began and the stream bytes
    /// earlier connections carried (a recovery's report covers them all).
    since_us: u64,
    earlier_bytes: u64,
    inbox: Inbox,
    reader: Option<Reader<Inbox>>,
    vm: Option<Rebuild<B>>,
    /// Post-copy: the VM runs here (its id) while its pages arrive, and
    /// page requests not yet taken by the connection.
    running: Option<u32>,
    requests: Vec<u8>,
    progress_us: u64,
    started_us: u64,
}

/// Received bytes not yet read by the stream reader.
#[derive(Default)]
struct Inbox {
    buf: Vec<u8>,
    pos: usize,
}

impl Inbox {
    fn unread(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    fn push(&mut self, bytes: &[u8]) {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos >= MAX_BUFFERED {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Whether the next record (after `skip` bytes: the prologue) is here
    /// whole, or its frame header is damaged (the reader refuses it now).
    fn record_ready(&self, skip: usize) -> bool {
        let Some(frame) = self.unread().get(skip..skip + FRAME_LEN) else { return false };
        let frame: &[u8; FRAME_LEN] = frame.try_into().expect("FRAME_LEN bytes");
        record_len(frame).is_none_or(|n| self.unread().len() >= skip + n)
    }
}

impl Source for Inbox {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, IoError> {
        let n = buf.len().min(self.buf.len() - self.pos);
        buf[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// How a stream ended.
enum Outcome {
    Running(u32),
    /// Post-copy completed: every page of the running VM is here.
    PostcopyDone(u32, String),
    /// Post-copy failed (a refusal or the connection): the VM, which ran
    /// here, is paused with its missing pages at the source.
    PostcopyBroken(u32, String),
    Refused(String),
    /// The connection broke: nobody to answer.
    Lost(String),
}

impl<B: Backend> Manager<B> {
    /// `migrate listen [port]`: accept migrations on `port` from now on.
    pub fn listen_migrations(&mut self, port: u16, t: &mut impl Transport) -> Result<(), String> {
        if let Some(i) = &self.migration.incoming {
            return Err(format!("already listening on port {}", i.port));
        }
        t.listen(port).map_err(|e| format!("port {port}: {e}"))?;
        self.migration.incoming = Some(Incoming::new(port));
        Ok(())
    }

    /// One step of the incoming side: accept, read, apply, answer.
    pub(super) fn incoming_round(&mut self, t: &mut impl Transport, now_us: u64, console: &mut impl Console) {
        self.migration.reap(t, now_us);
        let Some(mut inc) = self.migration.incoming.take() else { return };
        while let Some(stream) = t.accept(inc.port) {
            let ip = t.peer(stream).map(|p| *p.ip());
            let peer = t.peer(stream).map_or_else(|| String::from("?"), |p| format!("{p}"));
            if inc.conn.is_some() && inc.sides.len() < MAX_SIDES {
                // Perhaps the running post-copy's second connection, or its
                // source connecting again: its first line says.
                inc.sides.push(DemandIn {
                    stream,
                    ip,
                    inbox: Inbox::default(),
                    reader: None,
                    known: false,
                    recover: false,
                    started_us: now_us,
                });
                continue;
            }
            if inc.conn.is_some() {
                console.line(&format!("migrate: refused {peer}: a migration is already arriving"));
                refuse(t, stream, "a migration is already arriving here");
                self.migration.closing.push((stream, now_us + 5_000_000));
                continue;
            }
            console.line(&format!("migrate: receiving a VM from {peer}"));
            inc.conn = Some(Conn {
                stream,
                peer,
                ip,
                recovering: false,
                since_us: now_us,
                earlier_bytes: 0,
                inbox: Inbox::default(),
                reader: None,
                vm: None,
                running: None,
                requests: Vec::new(),
                progress_us: now_us,
                started_us: now_us,
            });
        }
        let main = inc.conn.as_ref().map(|c| (c.running, c.ip));
        self.sides_round(&mut inc.sides, main, t, now_us, console);
        if let Some(at) = inc.sides.iter().position(|d| d.recover)
            && let Some(old) = inc.conn.take()
        {
            // The source connected again while this host still held its
            // old connection (it had not seen it break): the source has
            // dropped that one, so it is over (and any second connection
            // of its); the new one recovers.
            let d = inc.sides.remove(at);
            for stale in inc.sides.drain(..) {
                t.abort(stale.stream);
            }
            if let Some(id) = old.running {
                self.break_postcopy(&mut inc, &old, id, "the source connected again", t, now_us, console);
            } else {
                t.abort(old.stream);
            }
            let peer = t.peer(d.stream).map_or_else(|| String::from("?"), |p| format!("{p}"));
            inc.conn = Some(Conn {
                stream: d.stream,
                peer,
                ip: d.ip,
                recovering: false,
                since_us: now_us,
                earlier_bytes: 0,
                inbox: d.inbox,
                reader: None,
                vm: None,
                running: None,
                requests: Vec::new(),
                progress_us: now_us,
                started_us: now_us,
            });
        }
        if let Some(mut c) = inc.conn.take() {
            match self.receive(&mut c, &mut inc, t, now_us, console) {
                None => inc.conn = Some(c),
                Some(outcome) => {
                    let ms = now_us.saturating_sub(c.since_us) / 1000;
                    let bytes = c.earlier_bytes + c.reader.as_ref().map_or(0, |r| r.offset());
                    if let Some(vm) = c.vm.take() {
                        // A stream that did not become a VM gives its id
                        // back, unless a VM started meanwhile took a later one.
                        if self.next_id == vm.id + 1 {
                            self.next_id = vm.id;
                        }
                        self.abandon_rebuild(vm);
                    }
                    match outcome {
                        Outcome::PostcopyDone(id, what) => {
                            inc.received += 1;
                            if let Some(ip) = c.ip {
                                inc.done.retain(|&(a, _)| a != ip);
                                inc.done.push((ip, id));
                                if inc.done.len() > 8 {
                                    inc.done.remove(0);
                                }
                            }
                            let _ = t.write(c.stream, format!("{REPLY_OK}{id}\n").as_bytes());
                            t.close(c.stream);
                            self.migration.closing.push((c.stream, now_us + 5_000_000));
                            console.line(&format!(
                                "migrate: vm {id} from {} has all its memory ({bytes} bytes in {ms} ms): {what}",
                                c.peer
                            ));
                        }
                        Outcome::PostcopyBroken(id, why) => {
                            self.break_postcopy(&mut inc, &c, id, &why, t, now_us, console);
                        }
                        Outcome::Running(id) => {
                            inc.received += 1;
                            let _ = t.write(c.stream, format!("{REPLY_OK}{id}\n").as_bytes());
                            t.close(c.stream);
                            self.migration.closing.push((c.stream, now_us + 5_000_000));
                            let guest = self.get(id).map_or_else(String::new, |v| v.guest.clone());
                            console.line(&format!(
                                "migrate: vm {id} ({guest}) arrived from {} ({bytes} bytes in {ms} ms) and runs",
                                c.peer
                            ));
                        }
                        Outcome::Refused(why) => {
                            inc.refused += 1;
                            refuse(t, c.stream, &why);
                            self.migration.closing.push((c.stream, now_us + 5_000_000));
                            console.line(&format!(
                                "migrate: refused the stream from {}: {why}; the partial VM is dropped",
                                c.peer
                            ));
                        }
                        Outcome::Lost(why) => {
                            inc.refused += 1;
                            t.abort(c.stream);
                            console.line(&format!(
                                "migrate: the stream from {} ended early: {why}; the partial VM is dropped",
                                c.peer
                            ));
                        }
                    }
                }
            }
        }
        self.migration.incoming = Some(inc);
    }

    /// Reads what arrived and applies the records that are whole; the
    /// outcome once the stream is over.
    fn receive(
        &mut self,
        c: &mut Conn<B>,
        inc: &mut Incoming<B>,
        t: &mut impl Transport,
        now_us: u64,
        console: &mut impl Console,
    ) -> Option<Outcome> {
        let mut buf = [0u8; 16 * 1024];
        let mut got = 0;
        let mut closed = false;
        while got < READ_PER_ROUND && c.inbox.unread().len() < MAX_BUFFERED {
            match t.read(c.stream, &mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    got += n;
                    match &mut c.reader {
                        Some(r) => r.source_mut().push(&buf[..n]),
                        None => c.inbox.push(&buf[..n]),
                    }
                }
                Err(_) => {
                    closed = true;
                    break;
                }
            }
        }
        if got > 0 {
            c.progress_us = now_us;
        }
        if c.reader.is_none() && c.running.is_none() && !c.inbox.unread().starts_with(&migrate::MAGIC) {
            // Post-copy recovery: the rest of a broken post-copy follows.
            let line = super::source::RECOVER.as_bytes();
            if c.inbox.unread().len() < line.len() {
                return self.stalled(c, closed, now_us);
            }
            if !c.inbox.unread().starts_with(line) {
                return Some(Outcome::Refused(String::from("not a migration stream")));
            }
            c.inbox.pos += line.len();
            if let Some(&(_, id)) = inc.done.iter().find(|&&(ip, _)| Some(ip) == c.ip) {
                // Its post-copy completed; the source lost the OK.
                return Some(Outcome::Running(id));
            }
            let Some(at) = inc.orphans.iter().position(|o| Some(o.ip) == c.ip) else {
                return Some(Outcome::Refused(String::from("no broken post-copy from this host")));
            };
            let Orphan { vm: id, paused_by_break: by_us, since_us, bytes, .. } = inc.orphans.remove(at);
            c.since_us = since_us;
            c.earlier_bytes = bytes;
            if self.get(id).is_none_or(|v| v.res.is_none()) {
                return Some(Outcome::Refused(format!("vm {id}, whose post-copy broke, ended here")));
            }
            let missing = self.postcopy_missing(id);
            c.requests.extend_from_slice(format!("{}{}\n", super::source::MISSING, missing.len()).as_bytes());
            for g in &missing {
                c.requests.extend_from_slice(&g.to_le_bytes());
            }
            c.running = Some(id);
            c.recovering = true;
            if let Some(vm) = self.vms.iter_mut().find(|v| v.id == id && v.paused && by_us) {
                vm.paused = false;
                vm.pause_vcpus(false);
            }
            console.line(&format!(
                "migrate: {} connected again: vm {id} runs on, the source sends its {} missing pages",
                c.peer,
                missing.len()
            ));
        }
        if c.reader.is_none() && c.running.is_some() {
            // A recovery's stream: the VM's shape must be this VM's. It
            // comes once the list of missing pages went out.
            closed |= send_requests(c, t);
            if !c.inbox.record_ready(PROLOGUE_LEN) {
                return self.stalled(c, closed, now_us);
            }
            let reader = match Reader::open(core::mem::take(&mut c.inbox)) {
                Ok(r) => r,
                Err(e) => return Some(Outcome::Refused(format!("{e}"))),
            };
            let id = c.running.unwrap_or_default();
            let ranges = crate::vm::boot::ram_ranges(self.get(id).map_or(0, |v| v.mem_bytes));
            let ram: u64 = ranges.0[..ranges.1].iter().map(|r| r.end - r.start).sum();
            let h = reader.header();
            if !h.live || h.ram.iter().map(|r| r.pages() * 4096).sum::<u64>() != ram {
                return Some(Outcome::Refused(String::from("the recovery stream is not this VM's")));
            }
            c.reader = Some(reader);
        }
        if c.reader.is_none() {
            // The prologue and the configuration: the VM's shape.
            if !c.inbox.record_ready(PROLOGUE_LEN) {
                return self.stalled(c, closed, now_us);
            }
            let reader = match Reader::open(core::mem::take(&mut c.inbox)) {
                Ok(r) => r,
                Err(e) => return Some(Outcome::Refused(format!("{e}"))),
            };
            let header = reader.header().clone();
            c.reader = Some(reader);
            if !header.live {
                return Some(Outcome::Refused(String::from("not a live-migration stream (a checkpoint?)")));
            }
            let requested = self.backend.as_ref().map_or(0, |b| b.now());
            match check_shape(&header).and_then(|mib| self.begin_rebuild(&header, mib, requested)) {
                Ok(vm) => {
                    // Its id is taken now: VMs started meanwhile get others.
                    self.next_id = self.next_id.max(vm.id + 1);
                    c.vm = Some(vm);
                }
                Err(e) => return Some(Outcome::Refused(format!("{e}"))),
            }
        }
        for _ in 0..RECORDS_PER_ROUND {
            let reader = c.reader.as_mut()?;
            if !reader.source_mut().record_ready(0) {
                break;
            }
            if let Some(id) = c.running {
                match self.apply_postcopy(id, reader, now_us, c.recovering) {
                    Ok(false) => continue,
                    Ok(true) => {
                        // The source ends this stream only once the second
                        // one's bytes were acknowledged: they are here.
                        while self.sides_round(&mut inc.sides, Some((Some(id), c.ip)), t, now_us, console) > 0 {}
                        return Some(match self.end_postcopy(id) {
                            Ok(what) => Outcome::PostcopyDone(id, what),
                            Err(why) => Outcome::PostcopyBroken(id, why),
                        });
                    }
                    Err(why) => return Some(Outcome::PostcopyBroken(id, why)),
                }
            }
            let vm = c.vm.as_mut()?;
            let applied = self.with_rebuild_sink(vm, |sink| reader.apply_next(sink));
            match applied {
                Ok(Ok(None)) if vm.resumed() => {
                    // Post-copy: the VM runs from here on; the pages it
                    // lacks follow.
                    let vm = c.vm.take().expect("checked above");
                    let id = match self.finish_rebuild(vm, None, None) {
                        Ok(id) => id,
                        Err(e) => return Some(Outcome::Refused(format!("{e}"))),
                    };
                    let missing = self.begin_postcopy(id, &c.peer);
                    c.running = Some(id);
                    let guest = self.get(id).map_or_else(String::new, |v| v.guest.clone());
                    let (at, ms) = (reader.offset(), now_us.saturating_sub(c.started_us) / 1000);
                    console.line(&format!(
                        "migrate: vm {id} ({guest}) from {} runs here after {at} bytes in {ms} ms (post-copy: {missing} \
                         pages still at the source)",
                        c.peer
                    ));
                }
                Ok(Ok(None)) => {}
                Ok(Ok(Some(_))) => {
                    let vm = c.vm.take().expect("checked above");
                    return Some(match self.finish_rebuild(vm, None, None) {
                        Ok(id) => Outcome::Running(id),
                        Err(e) => Outcome::Refused(format!("{e}")),
                    });
                }
                Ok(Err(e)) => {
                    let e = match e {
                        migrate::ApplyError::Stream(e) => Error::Stream(e),
                        migrate::ApplyError::Sink { error, .. } => Error::Checkpoint(error),
                    };
                    return Some(Outcome::Refused(format!("{e}")));
                }
                Err(e) => return Some(Outcome::Refused(format!("{e}"))),
            }
        }
        if let Some(id) = c.running {
            // Pages its vCPUs (or devices) touched while missing: asked
            // for ahead of the source's background push.
            let asked = self.postcopy_requests(id, now_us);
            c.requests.extend_from_slice(&asked);
            closed |= send_requests(c, t);
        }
        // A sender may close its side right after the end record: whole
        // records still buffered are applied in the next rounds first.
        let buffered = c.reader.as_mut().is_some_and(|r| r.source_mut().record_ready(0));
        if buffered {
            c.progress_us = now_us;
            return None;
        }
        self.stalled(c, closed, now_us)
    }

    /// Nothing more to apply now: over if the connection is, or idle too long.
    fn stalled(&self, c: &Conn<B>, closed: bool, now_us: u64) -> Option<Outcome> {
        let at = c.reader.as_ref().map_or(0, |r| r.offset());
        let why = if closed {
            format!("the connection closed after {at} applied bytes, before the end record")
        } else if now_us.saturating_sub(c.progress_us) > IDLE_US {
            format!("no data for {} s after {at} bytes", IDLE_US / 1_000_000)
        } else {
            return None;
        };
        Some(match c.running {
            Some(id) => Outcome::PostcopyBroken(id, why),
            None => Outcome::Lost(why),
        })
    }
}

impl<B: Backend> Manager<B> {
    /// Post-copy of VM `id` over `c` broke: the connection goes, the VM
    /// waits paused (its vCPUs may not run on without pages the source
    /// still holds) until the source connects again.
    #[allow(clippy::too_many_arguments)]
    fn break_postcopy(
        &mut self,
        inc: &mut Incoming<B>,
        c: &Conn<B>,
        id: u32,
        why: &str,
        t: &mut impl Transport,
        now_us: u64,
        console: &mut impl Console,
    ) {
        inc.refused += 1;
        refuse(t, c.stream, why);
        self.migration.closing.push((c.stream, now_us + 5_000_000));
        let mut by_us = false;
        if let Some(vm) = self.vms.iter_mut().find(|v| v.id == id && !v.paused) {
            vm.paused = true;
            vm.pause_vcpus(true);
            by_us = true;
        }
        if let Some(ip) = c.ip {
            inc.orphans.retain(|o| o.vm != id);
            let bytes = c.earlier_bytes + c.reader.as_ref().map_or(0, |r| r.offset());
            inc.orphans.push(Orphan { vm: id, ip, paused_by_break: by_us, since_us: c.since_us, bytes });
        }
        let left = self.get(id).and_then(|v| v.res.as_ref()).map_or(0, |r| r.mem.state_counts().not_loaded);
        console.line(&format!(
            "migrate: post-copy of vm {id} from {} broke: {why}; vm {id} is paused here, {left} of its pages are \
             still only at the source; it goes on when the source connects again",
            c.peer
        ));
    }

    /// One step of every connection beside the arriving one; the records
    /// they applied. A newer second connection replaces an older one (the
    /// source opens one per stream).
    fn sides_round(
        &mut self,
        sides: &mut Vec<DemandIn>,
        main: Option<(Option<u32>, Option<Ipv4Addr>)>,
        t: &mut impl Transport,
        now_us: u64,
        console: &mut impl Console,
    ) -> usize {
        let mut applied = 0;
        for d in core::mem::take(sides) {
            let mut slot = Some(d);
            applied += self.demand_round(&mut slot, main, t, now_us, console);
            sides.extend(slot);
        }
        while sides.iter().filter(|d| d.known).count() > 1 {
            let Some(at) = sides.iter().position(|d| d.known) else { break };
            t.abort(sides.remove(at).stream);
        }
        applied
    }

    /// One step of post-copy's second connection (`main`: the running
    /// post-copy's VM and source): its first line, its stream's start,
    /// then its records; the records it applied. It never fails the
    /// migration: one that is not what it says, or breaks, is dropped.
    fn demand_round(
        &mut self,
        side: &mut Option<DemandIn>,
        main: Option<(Option<u32>, Option<Ipv4Addr>)>,
        t: &mut impl Transport,
        now_us: u64,
        console: &mut impl Console,
    ) -> usize {
        let Some(mut d) = side.take() else { return 0 };
        let mut buf = [0u8; 16 * 1024];
        let mut closed = false;
        let mut got = 0;
        while got < READ_PER_ROUND {
            match t.read(d.stream, &mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    got += n;
                    match &mut d.reader {
                        Some(r) => r.source_mut().push(&buf[..n]),
                        None => d.inbox.push(&buf[..n]),
                    }
                }
                Err(_) => {
                    closed = true;
                    break;
                }
            }
        }
        let id = match main {
            Some((Some(id), ip)) if ip == d.ip => id,
            // Its first connection's resume record is not applied yet.
            Some((None, ip)) if ip == d.ip && now_us.saturating_sub(d.started_us) < 10_000_000 && !closed => {
                *side = Some(d);
                return 0;
            }
            _ => {
                // Not the running post-copy's (or it ended): the one
                // connection at a time rule.
                refuse(t, d.stream, "a migration is already arriving here");
                self.migration.closing.push((d.stream, now_us + 5_000_000));
                return 0;
            }
        };
        if !d.known {
            let line = super::source::DEMAND.as_bytes();
            if d.inbox.unread().starts_with(super::source::RECOVER.as_bytes()) {
                d.recover = true;
                *side = Some(d);
                return 0;
            }
            if d.inbox.unread().len() < line.len() {
                if closed || now_us.saturating_sub(d.started_us) > 10_000_000 {
                    t.abort(d.stream);
                } else {
                    *side = Some(d);
                }
                return 0;
            }
            if !d.inbox.unread().starts_with(line) {
                refuse(t, d.stream, "a migration is already arriving here");
                self.migration.closing.push((d.stream, now_us + 5_000_000));
                return 0;
            }
            d.inbox.pos += line.len();
            d.known = true;
        }
        if d.reader.is_none() {
            if !d.inbox.record_ready(PROLOGUE_LEN) {
                if closed {
                    t.abort(d.stream);
                } else {
                    *side = Some(d);
                }
                return 0;
            }
            match Reader::open(core::mem::take(&mut d.inbox)) {
                Ok(r) if r.header().live => d.reader = Some(r),
                _ => {
                    console.line("migrate: post-copy's second connection sent no live stream; dropped");
                    t.abort(d.stream);
                    return 0;
                }
            }
        }
        let mut applied = 0;
        while let Some(reader) = d.reader.as_mut()
            && reader.source_mut().record_ready(0)
        {
            match self.apply_postcopy(id, reader, now_us, true) {
                Ok(false) => applied += 1,
                Ok(true) => {
                    t.close(d.stream);
                    self.migration.closing.push((d.stream, now_us + 5_000_000));
                    return applied + 1;
                }
                Err(why) => {
                    console.line(&format!("migrate: post-copy's second connection dropped: {why}"));
                    t.abort(d.stream);
                    return applied;
                }
            }
        }
        if closed {
            t.abort(d.stream);
        } else {
            *side = Some(d);
        }
        applied
    }
}

/// Hands the connection what waits to go to the source (page requests, a
/// recovery's list of missing pages); whether the connection is gone.
fn send_requests<B: Backend>(c: &mut Conn<B>, t: &mut impl Transport) -> bool {
    if c.requests.is_empty() {
        return false;
    }
    match t.write(c.stream, &c.requests) {
        Ok(n) => {
            c.requests.drain(..n);
            false
        }
        Err(_) => true,
    }
}

/// Tells the source why (best effort: the line fits any send buffer) and
/// closes.
fn refuse(t: &mut impl Transport, s: StreamId, why: &str) {
    let line = format!("{REPLY_REFUSED}{}\n", why.replace('\n', " "));
    let _ = t.write(s, line.as_bytes());
    t.close(s);
}
