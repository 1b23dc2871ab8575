//! The sending side of a pre-copy migration (`vm migrate`), one step per
//! scheduling round ([`Manager::migration_round`]) so the VM keeps running:
//!
//! 1. connect; start `mm`'s dirty log (write protection, 4 KiB);
//! 2. round 1: every page of RAM, [`PAGES_PER_STEP`] per step, as the
//!    live save does (`save_step`);
//! 3. round k: the pages the guest wrote meanwhile (harvested from the
//!    log), until what is still dirty can be sent within the downtime
//!    limit at the rate measured so far, or after [`MAX_ITERATIONS`]; a
//!    round whose dirty set did not shrink by a tenth throttles the VM
//!    (auto-converge: 20 % of its CPU time taken, 10 more per such round,
//!    up to `throttle=`), so a guest that writes faster than the link
//!    sends still converges;
//! 4. switch-over: pause the VM, capture its vCPU, machine and devices,
//!    send the last dirty pages (streamed as the connection drains, so
//!    the buffer stays small whatever a guest that did not converge left
//!    dirty), the captured state and the end record;
//! 5. confirming: wait for the destination's OK; only then stop the VM
//!    here and free it.
//!
//! Any failure before the OK (refused, reset, silence, the VM ended)
//! stops the dirty log, resumes the VM if the migration paused it, and
//! says so in one line: the VM runs on here. From the switch-over on, the
//! operator cannot change the VM ([`Manager::migration_lock`]): the
//! destination may already run what was sent. `vm stop` during pre-copy
//! cancels the migration.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::net::SocketAddrV4;
use serde::Serialize;

use migrate::{IoError, Sink};
use mm::paging::PageSize;
use mm::vm_memory::{DirtyBitmap, DirtyLogConfig, DirtyMechanism};

use super::{IDLE_US, MAX_REPLY, REPLY_OK, REPLY_REFUSED};
use crate::backend::Backend;
use crate::hostnet::tcp::{StreamId, StreamState, Transport};
use crate::manager::save_job::{Captured, PAGES_PER_STEP, SaveJob};
use crate::manager::{Error, Manager};
use crate::vm::RunState;
use crate::vm::exit::Console;

/// Dirty rounds after the first full copy before the switch-over happens
/// whatever remains (a guest that dirties faster than the link sends
/// would never converge).
pub const MAX_ITERATIONS: u32 = 30;
/// The stream is produced only while less than this waits to go out, so
/// what is sent is recent and the heap holds little: at most this plus
/// one step ([`PAGES_PER_STEP`] pages and their framing, or the staging
/// buffer's 1 MiB) is ever buffered, the switch-over included.
pub(super) const LOW_WATER: usize = 512 * 1024;
/// How long one pre-copy step may take (microseconds of host time), and
/// the pieces it is cut in: the guest's pause per step (with one CPU for
/// both) against the migration's share of the CPU while the guest is busy.
const STEP_BUDGET_US: u64 = 2_000;
const STEP_CHUNK: usize = 8;
/// Bytes handed to the connection per round at most.
const WRITE_PER_ROUND: usize = 256 * 1024;
/// Giving up on a connection that does not open.
const CONNECT_US: u64 = 10_000_000;

/// What `vm migrate` was asked to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    pub to: SocketAddrV4,
    /// The pause the switch-over may take, at the measured rate.
    pub downtime_ms: u32,
    /// Limit on the stream's rate, MiB/s (none: as fast as TCP goes).
    pub bandwidth_mib: Option<u32>,
    /// The most CPU time (percent) auto-converge may take from a VM that
    /// does not converge; 0: never throttle (switch over after
    /// [`MAX_ITERATIONS`] whatever remains).
    pub throttle_max: u8,
    /// Test aid: flip byte `n` of the stream as it goes on the wire, so
    /// the destination's refusal of a corrupt stream can be tested.
    pub corrupt_at: Option<u64>,
    pub mode: Mode,
    /// Post-copy: 2 opens a second connection for the pages the
    /// destination asks for, so they never wait behind the bulk push; 1
    /// sends them on the one connection, ahead of the next batch.
    pub connections: u8,
}

/// How memory moves (`mode=`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// All of it before the VM runs at the destination (rounds of dirty
    /// pages while it runs here, the rest during the pause).
    #[default]
    Precopy,
    /// None of it first: the VM pauses here at once, its vCPU and devices
    /// go over, it runs there, and every page follows, a page the guest
    /// touches there first ahead of the rest.
    Postcopy,
    /// Pre-copy rounds until the dirty set fits the downtime limit or stops
    /// shrinking; then what is still dirty goes post-copy.
    Hybrid,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Precopy => "precopy",
            Mode::Postcopy => "postcopy",
            Mode::Hybrid => "hybrid",
        }
    }
}

/// Default downtime limit (QEMU's default max downtime is 300 ms).
pub const DEFAULT_DOWNTIME_MS: u32 = 300;
/// Auto-converge's first throttle and its step per round that did not
/// converge (QEMU's `cpu-throttle-initial` and `-increment` defaults).
pub const THROTTLE_INITIAL: u8 = 20;
pub const THROTTLE_STEP: u8 = 10;
/// A round converges when its dirty set is below this share (in tenths)
/// of the last one's.
const CONVERGING_TENTHS: u64 = 9;

/// A migration's progress (`vm migrate status`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Status {
    pub id: u32,
    pub to: String,
    /// connecting, precopy, switchover (the VM paused, the last pages
    /// going out), confirming (all sent, waiting for the destination's
    /// answer), completed or failed.
    pub state: &'static str,
    /// Memory rounds begun: 1 is the full copy, later ones dirty pages.
    pub iteration: u32,
    pub pages_sent: u64,
    pub bytes_on_wire: u64,
    /// Pages found dirty at the last harvest.
    pub dirty_pages_last_round: u64,
    /// Those pages over the time since the harvest before: how fast the
    /// guest dirties memory (pages per second).
    pub dirty_rate_pages_per_s: u64,
    /// Time to send those at the measured rate.
    pub expected_downtime_ms: u64,
    /// Bytes per second the destination acknowledged since the start.
    pub rate_bytes_per_s: u64,
    pub elapsed_ms: u64,
    /// Source-side pause: from pausing the VM to the destination's OK.
    pub downtime_ms: Option<u64>,
    /// The VM's id on the destination, once it runs there.
    pub destination_vm: Option<u32>,
    pub error: Option<String>,
    /// The most stream bytes this host held waiting for the connection.
    pub buffer_peak_bytes: u64,
    /// CPU time (percent) taken from the VM by auto-converge, now or (once
    /// the migration ended) at its highest.
    pub throttle_pct: u8,
    /// precopy, postcopy or hybrid.
    pub mode: &'static str,
    /// Post-copy: the pages the destination did not have when it resumed
    /// the VM, those still to send, and those it asked for first (a guest
    /// touch there).
    pub postcopy_pages: u64,
    pub postcopy_pages_left: u64,
    pub demand_requests: u64,
    /// The resume record went out: the destination may run the VM, so
    /// this copy is never resumed by the migration.
    pub destination_may_run: bool,
    /// Post-copy: from the pause here to the resume record on the wire
    /// (the VM's state transferred; the guest's pause, give or take the
    /// destination's build), where `downtime_ms` runs to the OK.
    pub switchover_ms: Option<u64>,
    /// Post-copy connections lost and made again.
    pub recoveries: u32,
    /// The longest source step (producing stream bytes and handing them
    /// to TCP), in microseconds: while it runs, no guest on the boot CPU
    /// does, so it bounds the pauses pre-copy costs them.
    pub longest_step_us: u64,
    /// Post-copy: the second connection, for pages asked for, is up; the
    /// pages it carried.
    pub demand_connection: bool,
    pub demand_pages_sent: u64,
    /// `pages_sent` by how each travelled, and the bytes of their entries.
    pub sent: Sent,
}

/// The pages a migration sent, by kind (`migrate::PageKind`): whole pages
/// (`raw`), zero flags, LZ4 (`compressed`), shared contents and references
/// to them, poisoned pages (metadata only). Bytes are those of the stream's
/// memory entries (the data and the few bytes that name each page).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Sent {
    pub raw_pages: u64,
    pub raw_bytes: u64,
    pub zero_pages: u64,
    pub compressed_pages: u64,
    pub compressed_bytes: u64,
    pub shared_pages: u64,
    pub poisoned_pages: u64,
}

impl Sent {
    fn of(s: &migrate::Stats) -> Sent {
        use migrate::PageKind as K;
        Sent {
            raw_pages: s.pages(K::Normal),
            raw_bytes: s.page_bytes(K::Normal),
            zero_pages: s.pages(K::Zero),
            compressed_pages: s.pages(K::Compressed),
            compressed_bytes: s.page_bytes(K::Compressed),
            shared_pages: s.pages(K::Shared).saturating_add(s.pages(K::SharedRef)),
            poisoned_pages: s.pages(K::Poisoned),
        }
    }
}

impl Status {
    /// The stream's page counts, after a step wrote more.
    fn note_sent(&mut self, s: &migrate::Stats) {
        self.pages_sent = s.total_pages();
        self.sent = Sent::of(s);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Connecting,
    Copying,
    /// The VM paused and captured; the last dirty pages still going out.
    SwitchingOver,
    /// Post-copy: the VM runs at the destination (paused here); its
    /// pages still here go out, those it asks for first.
    Postcopy,
    /// Post-copy lost its connection: trying to connect again.
    Reconnecting,
    /// Connected again: asked the destination which pages it lacks.
    Recovering,
    /// Everything sent: waiting for the destination's answer.
    Confirming,
}

/// Post-copy: the guest frames still to send, as a bitmap over RAM's
/// frame numbers (one bit a page: 32 KiB per GiB), with a cursor for the
/// background push.
#[derive(Default)]
struct Left {
    bits: Vec<u64>,
    count: u64,
    cursor: u64,
}

impl Left {
    fn new(gfns: &[u64]) -> Left {
        let top = gfns.iter().max().map_or(0, |&g| g + 1);
        let mut l = Left { bits: alloc::vec![0; top.div_ceil(64) as usize], count: 0, cursor: 0 };
        for &g in gfns {
            l.insert(g);
        }
        l
    }

    fn insert(&mut self, g: u64) {
        let (w, b) = ((g / 64) as usize, g % 64);
        if self.bits[w] & (1 << b) == 0 {
            self.bits[w] |= 1 << b;
            self.count += 1;
        }
    }

    /// Puts `g` back (a connection that carried it broke); a frame past
    /// the map was never in it.
    fn put_back(&mut self, g: u64) {
        if ((g / 64) as usize) < self.bits.len() {
            self.insert(g);
            self.cursor = self.cursor.min(g & !63);
        }
    }

    /// Takes `g` out: whether it was still to send.
    fn take(&mut self, g: u64) -> bool {
        let (w, b) = ((g / 64) as usize, g % 64);
        match self.bits.get_mut(w) {
            Some(word) if *word & (1 << b) != 0 => {
                *word &= !(1 << b);
                self.count -= 1;
                true
            }
            _ => false,
        }
    }

    /// Takes up to `n` frames from the cursor on (in order, so neighbours
    /// travel together and compress).
    fn take_next(&mut self, n: usize) -> Vec<u64> {
        let mut out = Vec::new();
        let words = self.bits.len() as u64;
        let mut w = self.cursor / 64;
        while out.len() < n && self.count > 0 && w < words {
            let word = self.bits[w as usize];
            if word == 0 {
                w += 1;
                continue;
            }
            let g = w * 64 + u64::from(word.trailing_zeros());
            self.take(g);
            out.push(g);
        }
        self.cursor = w * 64;
        out
    }

    /// As runs of consecutive frames, for the pending records.
    fn runs(gfns: &[u64]) -> Vec<(u64, u32)> {
        let mut runs: Vec<(u64, u32)> = Vec::new();
        for &g in gfns {
            match runs.last_mut() {
                Some((first, n)) if *first + u64::from(*n) == g && *n < u32::MAX => *n += 1,
                _ => runs.push((g, 1)),
            }
        }
        runs
    }
}

/// Post-copy: the outbox is refilled with background pages only below
/// this, and by this many pages at a time, so a page the destination asks
/// for waits behind little (pre-copy's [`LOW_WATER`] is 512 KiB).
const POSTCOPY_LOW_WATER: usize = 64 * 1024;
const POSTCOPY_STEP: usize = 32;
/// The destination's request for a page: the line, then the frame number.
pub const REQUEST_PAGE: &str = "HVMIGRATE PAGE ";
/// Post-copy recovery: the source's first line on a new connection, and
/// the destination's answer (the count, a newline, then that many frame
/// numbers as 8-byte little-endian words: the pages it still lacks).
pub const RECOVER: &str = "HVMIGRATE RECOVER\n";
pub const MISSING: &str = "HVMIGRATE MISSING ";
/// Post-copy: the first line of the second connection, which carries the
/// pages the destination asked for (a stream of its own after the line).
pub const DEMAND: &str = "HVMIGRATE DEMAND\n";
/// Post-copy recovery: a new connection is tried this often, for this long
/// after the link was lost (then the migration fails, both copies paused).
const RECONNECT_US: u64 = 1_000_000;
const RECOVER_FOR_US: u64 = 300_000_000;

/// Post-copy's second connection: the pages the destination asked for go
/// here, on a stream of their own (its header, the VM's state again, which
/// the destination passes over, the resume record, then pages), so they
/// never wait behind the bulk push on the first connection.
struct DemandChannel {
    stream: StreamId,
    job: Option<SaveJob>,
    out: Outbox,
    /// Its first line and its stream's start went out: pages may go.
    ready: bool,
    /// Its end record was written (the migration's pages are all out).
    ended: bool,
    opened_us: u64,
    /// Pages sent on it: put back into the bulk set if it breaks.
    sent: Vec<u64>,
}

/// A migration in progress.
pub struct Outgoing {
    pub status: Status,
    opts: Options,
    stream: StreamId,
    phase: Phase,
    job: Option<SaveJob>,
    /// Stream bytes produced and not yet taken by the connection.
    out: Outbox,
    /// Full copy done: what is left to send are dirty pages.
    bulk_done: bool,
    /// Dirty pages of the current round still to send.
    dirty: Vec<u64>,
    /// Pages found dirty at the harvest before the last one.
    last_dirty: Option<u64>,
    /// When the last harvest (or the full copy's start) was.
    harvest_us: u64,
    bitmap: DirtyBitmap,
    /// The VM's vCPU, machine and devices, taken when it was paused for
    /// the switch-over; written after its last pages.
    captured: Option<Captured>,
    /// Why the operator cancelled it (`vm stop` during pre-copy).
    cancelled: Option<&'static str>,
    /// The migration paused the VM (so a failure resumes it).
    paused_by_us: bool,
    /// Post-copy: pages still to send, pages asked for, and the stream
    /// offset after the resume record (once the connection took that, the
    /// destination may run the VM).
    left: Left,
    demand: Vec<u64>,
    resume_at: Option<u64>,
    /// Post-copy's second connection, and whether it was tried.
    channel: Option<DemandChannel>,
    channel_tried: bool,
    /// Post-copy recovery: when the link was lost, the next connection
    /// attempt, and when the current attempt began.
    lost_us: u64,
    next_try_us: u64,
    try_us: u64,
    started_us: u64,
    open_us: u64,
    /// The bandwidth limit counts from here: the connection's opening,
    /// or a recovery's (an outage earns no burst), with the bytes then.
    budget_from: (u64, u64),
    pause_us: u64,
    progress_us: u64,
    reply: Vec<u8>,
}

/// Stream bytes produced and not yet taken by the connection. What was
/// taken is dropped at the next write, so the buffer holds only what is
/// pending: production stops at [`LOW_WATER`], the bound is that plus one
/// step.
#[derive(Default)]
struct Outbox {
    buf: Vec<u8>,
    pos: usize,
    /// The most bytes it held.
    peak: usize,
}

impl Outbox {
    fn pending(&self) -> usize {
        self.buf.len() - self.pos
    }
}

impl Sink for Outbox {
    fn write(&mut self, bytes: &[u8]) -> Result<(), IoError> {
        // Less than LOW_WATER is pending when a step writes: a cheap move.
        self.buf.drain(..self.pos);
        self.pos = 0;
        self.buf.try_reserve(bytes.len()).map_err(|_| IoError("no host memory for the migration's buffer"))?;
        self.buf.extend_from_slice(bytes);
        self.peak = self.peak.max(self.buf.len());
        Ok(())
    }
}

impl<B: Backend> Manager<B> {
    /// `vm migrate`: start migrating VM `id`; the outcome is reported by
    /// [`Self::migration_round`]. Refused (nothing changed) if a migration
    /// runs, the VM is not one that can move, or the connection cannot
    /// be started.
    pub fn start_migration(
        &mut self,
        id: u32,
        opts: Options,
        t: &mut impl Transport,
        now_us: u64,
    ) -> Result<(), String> {
        if let Some(o) = &self.migration.out {
            return Err(format!("vm {} is already migrating (one at a time)", o.status.id));
        }
        let vm = self.get(id).ok_or_else(|| format!("{}", Error::NoVm(id)))?;
        let Some(res) = vm.res.as_ref() else {
            return Err(format!("{}", Error::Ended { id, state: vm.state.name() }));
        };
        if vm.created {
            return Err(format!("{}", Error::NotStarted(id)));
        }
        self.arriving_lock(id).map_err(|e| format!("{e}"))?;
        if self.live_save.as_ref().is_some_and(|s| s.job.id == id) {
            return Err(format!("vm {id} is being saved live; migrate it when the save is done"));
        }
        if res.mem.dirty_logging().is_some() {
            return Err(format!("vm {id}'s memory is already dirty-logged"));
        }
        let stream = t.connect(opts.to).map_err(|e| format!("{}: {e}", opts.to))?;
        self.migration.out = Some(Outgoing {
            status: Status {
                id,
                to: format!("{}", opts.to),
                state: "connecting",
                mode: opts.mode.name(),
                ..Default::default()
            },
            opts,
            stream,
            phase: Phase::Connecting,
            job: None,
            out: Outbox::default(),
            bulk_done: false,
            dirty: Vec::new(),
            last_dirty: None,
            harvest_us: now_us,
            bitmap: DirtyBitmap::new(),
            captured: None,
            cancelled: None,
            paused_by_us: false,
            left: Left::default(),
            demand: Vec::new(),
            resume_at: None,
            channel: None,
            channel_tried: false,
            lost_us: 0,
            next_try_us: 0,
            try_us: 0,
            started_us: now_us,
            open_us: now_us,
            budget_from: (now_us, 0),
            pause_us: now_us,
            progress_us: now_us,
            reply: Vec::new(),
        });
        Ok(())
    }

    /// `vm migrate status`: the running migration of VM `id`, or its last.
    pub fn migration_status(&self, id: u32) -> Option<&Status> {
        self.migration.out.as_ref().map(|o| &o.status).filter(|s| s.id == id).or(self.migration.last.get(&id))
    }

    /// Refuses an operator's change to VM `id` while it migrates: during
    /// the switch-over and confirmation always (the destination may run
    /// what was sent; the copies would diverge), during pre-copy too if
    /// `precopy_too` (an operation that cannot go with the dirty log).
    pub(crate) fn migration_lock(&self, id: u32, precopy_too: bool) -> Result<(), Error> {
        let Some(o) = self.migration.out.as_ref().filter(|o| o.status.id == id) else { return Ok(()) };
        let switching = !matches!(o.phase, Phase::Connecting | Phase::Copying);
        if switching || precopy_too {
            return Err(Error::Migrating { id, to: o.status.to.clone(), switching });
        }
        Ok(())
    }

    /// The VM in the switch-over of its migration (paused, perhaps already
    /// running at the destination), if any.
    pub(crate) fn switching_over(&self) -> Option<u32> {
        let o = self.migration.out.as_ref()?;
        (!matches!(o.phase, Phase::Connecting | Phase::Copying)).then_some(o.status.id)
    }

    /// Cancels VM `id`'s migration if it is in pre-copy (the caller made
    /// sure it is not past it): the next round fails it with `why`,
    /// closing the connection so the destination drops its partial VM.
    pub(crate) fn cancel_migration_of(&mut self, id: u32, why: &'static str) {
        if let Some(o) = self.migration.out.as_mut().filter(|o| o.status.id == id) {
            o.cancelled = Some(why);
        }
    }

    /// One step of the running migrations (between scheduling rounds, also
    /// while no VM wants the CPU): the outgoing one and the incoming one.
    /// `t` is the host network (`None`: no NIC, nothing can move).
    /// The host's clock in microseconds (0 without virtualization).
    fn clock_us(&self) -> u64 {
        self.backend.as_ref().map_or(0, |b| crate::vm::exit::ticks_to_ns(b.now(), b.tsc_hz()) / 1000)
    }

    pub fn migration_round<T: Transport>(&mut self, t: Option<&mut T>, now_us: u64, console: &mut impl Console) {
        let Some(t) = t else { return };
        self.incoming_round(t, now_us, console);
        let Some(mut o) = self.migration.out.take() else { return };
        let began = self.clock_us();
        let step = self.outgoing_step(&mut o, t, now_us);
        o.status.longest_step_us = o.status.longest_step_us.max(self.clock_us().saturating_sub(began));
        match step {
            Ok(None) => {
                o.status.elapsed_ms = now_us.saturating_sub(o.started_us) / 1000;
                self.migration.out = Some(o);
            }
            Ok(Some(dest)) => self.complete_outgoing(o, dest, t, now_us, console),
            // Post-copy: the destination runs the VM on what it got; the
            // rest is only here. Connect again and send what it lacks.
            Err(why)
                if o.status.destination_may_run
                    && o.cancelled.is_none()
                    && self.get(o.status.id).is_some_and(|v| v.res.is_some())
                    && (matches!(o.phase, Phase::Postcopy | Phase::Confirming)
                        || matches!(o.phase, Phase::Reconnecting | Phase::Recovering)
                            && now_us.saturating_sub(o.lost_us) < RECOVER_FOR_US) =>
            {
                if matches!(o.phase, Phase::Postcopy | Phase::Confirming) {
                    console.line(&format!(
                        "vm {}: post-copy to {} lost its connection: {why}; the VM stays paused here with the {} \
                         pages the destination may lack; connecting again",
                        o.status.id, o.status.to, o.status.postcopy_pages_left
                    ));
                    o.lost_us = now_us;
                }
                // What went wrong last, for `vm migrate status` meanwhile.
                o.status.error = Some(why);
                self.lose_link(&mut o, t, now_us);
                self.migration.out = Some(o);
            }
            Err(why) => self.fail_outgoing(o, why, t, now_us, console),
        }
    }

    /// Post-copy's connection is gone: drop it and its stream, and try a
    /// new one from the next second on.
    fn lose_link(&mut self, o: &mut Outgoing, t: &mut impl Transport, now_us: u64) {
        t.abort(o.stream);
        if let Some(job) = o.job.take() {
            self.abort_save(job);
        }
        o.out = Outbox::default();
        o.demand.clear();
        o.reply.clear();
        self.drop_channel(o, t);
        // The recovery's connections are tried afresh.
        o.channel_tried = false;
        o.phase = Phase::Reconnecting;
        o.status.state = "reconnecting";
        o.next_try_us = now_us + RECONNECT_US;
    }

    /// Post-copy recovery: connect, say so, read which pages the
    /// destination lacks, then send them on a new stream (its state
    /// records again, which the destination passes over: its VM has run).
    fn recover_step(&mut self, o: &mut Outgoing, t: &mut impl Transport, now_us: u64) -> Result<Option<u32>, String> {
        if o.phase == Phase::Reconnecting {
            if now_us < o.next_try_us {
                return Ok(None);
            }
            o.stream = t.connect(o.opts.to).map_err(|e| format!("{}: {e}", o.opts.to))?;
            o.phase = Phase::Recovering;
            o.try_us = now_us;
            return Ok(None);
        }
        match t.state(o.stream) {
            StreamState::Connecting if now_us.saturating_sub(o.try_us) <= CONNECT_US => return Ok(None),
            StreamState::Open if o.try_us != 0 => {
                let n = t.write(o.stream, RECOVER.as_bytes()).map_err(|_| String::from("the connection was reset"))?;
                if n != RECOVER.len() {
                    return Err(String::from("the new connection took less than one line"));
                }
                o.try_us = 0;
            }
            StreamState::Open => {}
            _ => return Err(String::from("the destination did not take a new connection")),
        }
        let mut buf = [0u8; 4096];
        loop {
            match t.read(o.stream, &mut buf) {
                Ok(0) => break,
                Ok(n) => o.reply.extend_from_slice(&buf[..n]),
                Err(_) => return Err(String::from("the destination closed the new connection")),
            }
        }
        let Some(end) = o.reply.iter().position(|&b| b == b'\n') else {
            if o.reply.len() > MAX_REPLY {
                return Err(String::from("the destination's answer is not a recovery answer"));
            }
            return Ok(None);
        };
        let line = core::str::from_utf8(&o.reply[..end]).unwrap_or("");
        // It had every page already (the OK was what the link lost).
        if let Some(n) = line.strip_prefix(REPLY_OK) {
            return n.trim().parse().map(Some).map_err(|_| format!("the destination answered {line:?}"));
        }
        let Some(count) = line.strip_prefix(MISSING) else {
            return Err(format!("the destination answered {line:?}"));
        };
        let ram = crate::vm::boot::ram_ranges(self.get(o.status.id).map_or(0, |v| v.mem_bytes));
        let pages: u64 = ram.0[..ram.1].iter().map(|r| (r.end - r.start) >> 12).sum();
        let count = count.trim().parse::<u64>().ok().filter(|&c| c <= pages).ok_or(format!("bad answer {line:?}"))?;
        let body = &o.reply[end + 1..];
        if (body.len() as u64) < count * 8 {
            return Ok(None);
        }
        let mut gfns = Vec::with_capacity(count as usize);
        for w in body[..(count * 8) as usize].as_chunks::<8>().0 {
            let g = u64::from_le_bytes(*w);
            if !ram.0[..ram.1].iter().any(|r| r.contains(&(g << 12))) {
                return Err(format!("the destination asked for page {g:#x}, outside the VM's RAM"));
            }
            gfns.push(g);
        }
        // Page requests may follow the list.
        o.reply.drain(..end + 1 + (count * 8) as usize);
        // A new stream: the header, the state again, the resume, then the
        // pages the destination lacks.
        let id = o.status.id;
        let e = |e: Error| format!("{e}");
        let mut job = self.begin_migration_stream(id).map_err(e)?;
        let captured = self.capture(id).map_err(e)?;
        let r = self.resume_migration_stream(&mut job, &[], &captured, &mut o.out);
        o.job = Some(job);
        r.map_err(e)?;
        o.left = Left::new(&gfns);
        o.status.postcopy_pages_left = o.left.count;
        o.status.recoveries += 1;
        o.budget_from = (now_us, o.status.bytes_on_wire);
        o.phase = Phase::Postcopy;
        o.status.state = "postcopy";
        o.progress_us = now_us;
        Ok(None)
    }

    fn outgoing_step(&mut self, o: &mut Outgoing, t: &mut impl Transport, now_us: u64) -> Result<Option<u32>, String> {
        let id = o.status.id;
        if let Some(why) = o.cancelled {
            return Err(format!("cancelled: {why}"));
        }
        let alive = self.get(id).and_then(|v| v.res.as_ref()).map(|r| r.mem.dirty_logging().is_some());
        match (alive, o.phase) {
            (None, _) => return Err(format!("vm {id} ended during the migration")),
            // A reset gives the VM fresh memory, without the log.
            (Some(false), Phase::Copying) => return Err(format!("vm {id} was reset during the migration")),
            _ => {}
        }
        if matches!(o.phase, Phase::Reconnecting | Phase::Recovering) {
            return self.recover_step(o, t, now_us);
        }
        let before = (o.status.bytes_on_wire, o.reply.len());
        match o.phase {
            Phase::Connecting => match t.state(o.stream) {
                StreamState::Connecting if now_us.saturating_sub(o.started_us) > CONNECT_US => {
                    return Err(String::from("the connection did not open in 10 s"));
                }
                StreamState::Connecting => return Ok(None),
                StreamState::Open => {
                    self.open_outgoing(o, now_us)?;
                    o.progress_us = now_us;
                }
                _ => return Err(String::from("the connection was refused (is the destination listening?)")),
            },
            Phase::Copying => {
                if o.out.pending() < LOW_WATER {
                    self.produce(o, now_us)?;
                }
            }
            Phase::SwitchingOver => {
                if o.out.pending() < LOW_WATER {
                    self.switch_step(o)?;
                }
            }
            Phase::Postcopy => self.postcopy_step(o, t, now_us)?,
            Phase::Confirming => {}
            Phase::Reconnecting | Phase::Recovering => {}
        }
        o.status.buffer_peak_bytes = o.out.peak as u64;
        let pumped = pump(o, t, now_us);
        // The destination may have answered already (a refusal comes
        // while the source still sends): its answer says more than a
        // write refused by a closed connection, or than a connection
        // that takes nothing more (a peer that closed may still accept
        // what is in flight, and the source would wait for the idle limit).
        if let Some(answer) = read_answer(o, t)? {
            return answer.map(Some);
        }
        pumped?;
        if (o.status.bytes_on_wire, o.reply.len()) != before {
            o.progress_us = now_us;
        } else if now_us.saturating_sub(o.progress_us) > IDLE_US {
            return Err(format!("no progress for {} s", IDLE_US / 1_000_000));
        }
        Ok(None)
    }

    /// The connection is open: dirty logging on, the stream's header out.
    fn open_outgoing(&mut self, o: &mut Outgoing, now_us: u64) -> Result<(), String> {
        let id = o.status.id;
        let backend = self.backend.as_mut().map_err(|why| format!("{}", Error::NoVirtualization(why.clone())))?;
        let res = self.vms.iter_mut().find(|v| v.id == id).and_then(|v| v.res.as_mut());
        let res = res.ok_or_else(|| format!("vm {id} ended during the migration"))?;
        let vcpus = &mut res.vcpus;
        let config = DirtyLogConfig::new(PageSize::Size4K, DirtyMechanism::WriteProtect);
        res.mem
            .start_dirty_log(backend.mem(), config, &mut |s| crate::vm::flush_all(vcpus, s))
            .map_err(|e| format!("dirty logging: {e:?}"))?;
        match self.begin_migration_stream(id) {
            Ok(job) => o.job = Some(job),
            Err(e) => {
                self.stop_dirty_log(id);
                return Err(format!("{e}"));
            }
        }
        o.phase = Phase::Copying;
        o.status.state = "precopy";
        o.status.iteration = 1;
        o.open_us = now_us;
        o.budget_from = (now_us, o.status.bytes_on_wire);
        o.harvest_us = now_us;
        if o.opts.mode == Mode::Postcopy {
            // Nothing before: every page of RAM follows the resume.
            let ranges = crate::vm::boot::ram_ranges(self.get(id).map_or(0, |v| v.mem_bytes));
            o.dirty = ranges.0[..ranges.1].iter().flat_map(|r| (r.start >> 12)..(r.end >> 12)).collect();
            o.bulk_done = true;
            self.switch_over(o, now_us)?;
            self.start_postcopy(o)?;
        }
        Ok(())
    }

    /// One step of stream production: a piece of the full copy, a piece
    /// of the current dirty round, or (once everything sent so far is
    /// out) the next harvest and maybe the switch-over.
    fn produce(&mut self, o: &mut Outgoing, now_us: u64) -> Result<(), String> {
        let Some(mut job) = o.job.take() else { return Ok(()) };
        let r = self.produce_with(o, &mut job, now_us);
        o.job = Some(job);
        r?;
        if o.phase == Phase::SwitchingOver && o.opts.mode != Mode::Precopy {
            self.start_postcopy(o)?;
        }
        Ok(())
    }

    /// One step of the switch-over's stream: a piece of the last dirty
    /// pages (the VM is paused: they no longer change), then, once they
    /// are all written, the captured state and the end record.
    fn switch_step(&mut self, o: &mut Outgoing) -> Result<(), String> {
        let e = |e: Error| format!("{e}");
        let Some(mut job) = o.job.take() else { return Ok(()) };
        if !o.dirty.is_empty() {
            let n = o.dirty.len().min(PAGES_PER_STEP as usize);
            let gfns: Vec<u64> = o.dirty.drain(..n).collect();
            let r = self.save_pages(&mut job, &gfns, &mut o.out).and_then(|()| self.flush_save(&mut job, &mut o.out));
            o.status.note_sent(job.stream_stats());
            o.job = Some(job);
            return r.map_err(e);
        }
        let captured = o.captured.take().ok_or("the switch-over's state was not captured")?;
        let saved = self.finish_migration_stream(job, &captured, &mut o.out).map_err(e)?;
        o.status.note_sent(&saved.stats);
        o.phase = Phase::Confirming;
        o.status.state = "confirming";
        Ok(())
    }

    fn produce_with(&mut self, o: &mut Outgoing, job: &mut SaveJob, now_us: u64) -> Result<(), String> {
        let e = |e: Error| format!("{e}");
        if !o.bulk_done || !o.dirty.is_empty() {
            // Pieces of STEP_CHUNK pages until the step's time is up: the
            // VM does not run meanwhile (one CPU does both), so the step's
            // length is the pause pre-copy costs the guest.
            let began = self.clock_us();
            loop {
                if !o.bulk_done {
                    o.bulk_done = self.save_step(job, STEP_CHUNK as u64, &mut o.out).map_err(e)?;
                } else if !o.dirty.is_empty() {
                    let n = o.dirty.len().min(STEP_CHUNK);
                    let gfns: Vec<u64> = o.dirty.drain(..n).collect();
                    self.save_pages(job, &gfns, &mut o.out).map_err(e)?;
                } else {
                    break;
                }
                if self.clock_us().saturating_sub(began) >= STEP_BUDGET_US || o.out.pending() >= LOW_WATER {
                    break;
                }
            }
            self.flush_save(job, &mut o.out).map_err(e)?;
            o.status.note_sent(job.stream_stats());
            return Ok(());
        }
        if o.out.pending() > 0 {
            // Harvest once the round is on the wire: the rate is then the
            // link's, and the next round starts from what is really sent.
            return Ok(());
        }
        self.harvest(o)?;
        let dirty = o.dirty.len() as u64;
        let elapsed = now_us.saturating_sub(o.open_us).max(1);
        let rate = (u128::from(o.status.bytes_on_wire) * 1_000_000 / u128::from(elapsed)) as u64;
        let rate = o.opts.bandwidth_mib.map_or(rate, |b| rate.min(u64::from(b) << 20)).max(1);
        o.status.rate_bytes_per_s = rate;
        o.status.dirty_pages_last_round = dirty;
        let round_us = now_us.saturating_sub(o.harvest_us).max(1);
        o.status.dirty_rate_pages_per_s = dirty.saturating_mul(1_000_000) / round_us;
        o.harvest_us = now_us;
        o.status.expected_downtime_ms = dirty * migrate::PAGE_SIZE as u64 * 1000 / rate;
        if o.status.expected_downtime_ms <= u64::from(o.opts.downtime_ms) || o.status.iteration >= MAX_ITERATIONS {
            self.switch_over(o, now_us)?;
        } else {
            if o.last_dirty.is_some_and(|last| dirty * 10 >= last * CONVERGING_TENTHS) {
                if o.opts.mode == Mode::Hybrid {
                    // Not converging: the rest goes post-copy.
                    return self.switch_over(o, now_us);
                }
                self.throttle_up(o);
            }
            o.last_dirty = Some(dirty);
            o.status.iteration += 1;
        }
        Ok(())
    }

    /// Auto-converge: the dirty set stopped shrinking, so the VM gets less
    /// CPU time (and writes less) in the next rounds.
    fn throttle_up(&mut self, o: &mut Outgoing) {
        let now = o.status.throttle_pct;
        let next = if now == 0 { THROTTLE_INITIAL } else { now.saturating_add(THROTTLE_STEP) };
        let next = next.min(o.opts.throttle_max).min(crate::vm::throttle::MAX_PCT);
        if next > now
            && let Some(vm) = self.vms.iter_mut().find(|v| v.id == o.status.id)
        {
            vm.throttle.set(next);
            o.status.throttle_pct = next;
        }
    }

    /// The VM runs at full speed again (the migration ended).
    fn unthrottle(&mut self, id: u32) {
        if let Some(vm) = self.vms.iter_mut().find(|v| v.id == id) {
            vm.throttle.set(0);
        }
    }

    /// Pause the VM, capture its state and take the last dirty pages;
    /// [`Self::switch_step`] writes them, piece by piece.
    fn switch_over(&mut self, o: &mut Outgoing, now_us: u64) -> Result<(), String> {
        let id = o.status.id;
        if self.get(id).is_some_and(|v| !v.paused) {
            self.set_paused(id, true).map_err(|e| format!("{e}"))?;
            o.paused_by_us = true;
        }
        o.pause_us = now_us;
        // At the pause: the guest's clock goes on from here on the
        // destination, however long the last pages take to go out.
        o.captured = Some(self.capture(id).map_err(|e| format!("{e}"))?);
        let mut last = core::mem::take(&mut o.dirty);
        self.harvest(o)?;
        last.append(&mut o.dirty);
        last.sort_unstable();
        last.dedup();
        o.dirty = last;
        self.stop_dirty_log(id);
        // Post-copy and hybrid go on with `start_postcopy` (the caller's:
        // the stream's job may be in its hands).
        o.phase = Phase::SwitchingOver;
        o.status.state = "switchover";
        Ok(())
    }

    /// Post-copy's switch-over: the pages still dirty are listed as
    /// pending, the captured state and the resume record go out, and from
    /// then on the destination runs the VM while its pages follow.
    fn start_postcopy(&mut self, o: &mut Outgoing) -> Result<(), String> {
        let e = |e: Error| format!("{e}");
        let Some(mut job) = o.job.take() else { return Err(String::from("the migration's stream is gone")) };
        let captured = o.captured.take().ok_or("the switch-over's state was not captured")?;
        let gfns = core::mem::take(&mut o.dirty);
        let r = self.resume_migration_stream(&mut job, &Left::runs(&gfns), &captured, &mut o.out);
        o.job = Some(job);
        r.map_err(e)?;
        o.left = Left::new(&gfns);
        o.resume_at = Some(o.status.bytes_on_wire + o.out.pending() as u64);
        o.status.postcopy_pages = o.left.count;
        o.status.postcopy_pages_left = o.left.count;
        o.phase = Phase::Postcopy;
        o.status.state = "postcopy";
        Ok(())
    }

    /// One step of post-copy: the pages the destination asked for, then
    /// (while little waits to go out) the next of the rest; once none is
    /// left, the end record.
    fn postcopy_step(&mut self, o: &mut Outgoing, t: &mut impl Transport, now_us: u64) -> Result<(), String> {
        let e = |e: Error| format!("{e}");
        // Only frames of the VM's RAM are ever sent (a request for another
        // would make the stream's writer refuse, and fail the migration).
        let ranges = crate::vm::boot::ram_ranges(self.get(o.status.id).map_or(0, |v| v.mem_bytes));
        o.demand.retain(|&g| ranges.0[..ranges.1].iter().any(|r| r.contains(&g.saturating_mul(4096))));
        o.demand.sort_unstable();
        o.demand.dedup();
        let may_end = self.channel_step(o, t, now_us);
        let Some(mut job) = o.job.take() else { return Ok(()) };
        let mut asked: Vec<u64> = core::mem::take(&mut o.demand).into_iter().filter(|&g| o.left.take(g)).collect();
        if o.out.pending() < POSTCOPY_LOW_WATER {
            asked.extend(o.left.take_next(POSTCOPY_STEP));
        }
        let r = if !asked.is_empty() {
            self.save_pages(&mut job, &asked, &mut o.out).and_then(|()| self.flush_pages(&mut job, &mut o.out))
        } else if o.left.count == 0 && may_end {
            let saved = self.finish_save(job, &mut o.out).map_err(e)?;
            o.status.note_sent(&saved.stats);
            o.status.postcopy_pages_left = 0;
            o.phase = Phase::Confirming;
            o.status.state = "confirming";
            return Ok(());
        } else {
            Ok(())
        };
        o.status.note_sent(job.stream_stats());
        o.status.postcopy_pages_left = o.left.count;
        let elapsed = now_us.saturating_sub(o.open_us).max(1);
        o.status.rate_bytes_per_s = (u128::from(o.status.bytes_on_wire) * 1_000_000 / u128::from(elapsed)) as u64;
        o.job = Some(job);
        r.map_err(e)
    }

    /// Post-copy's second connection: opened once, its stream started when
    /// it is up, the pages asked for sent on it, and (once every page is
    /// out) its end record, acknowledged before the first connection's
    /// end record goes. Whether the first connection may end (as far as
    /// this one goes). A channel that fails is dropped and its pages go
    /// back to the bulk set: the migration never fails for it.
    fn channel_step(&mut self, o: &mut Outgoing, t: &mut impl Transport, now_us: u64) -> bool {
        if o.channel.is_none() && !o.channel_tried && o.opts.connections >= 2 {
            o.channel_tried = true;
            o.channel = t.connect(o.opts.to).ok().map(|stream| DemandChannel {
                stream,
                job: None,
                out: Outbox::default(),
                ready: false,
                ended: false,
                opened_us: now_us,
                sent: Vec::new(),
            });
        }
        let Some(mut ch) = o.channel.take() else { return true };
        match self.run_channel(o, &mut ch, t, now_us) {
            Ok(end_main) => {
                o.status.demand_connection = ch.ready;
                if end_main {
                    t.close(ch.stream);
                    self.migration.closing.push((ch.stream, now_us + 5_000_000));
                    o.status.demand_connection = false;
                } else {
                    o.channel = Some(ch);
                }
                end_main
            }
            Err(()) => {
                o.channel = Some(ch);
                self.drop_channel(o, t);
                true
            }
        }
    }

    /// One step of the second connection; `Ok(true)` once its stream ended
    /// and every byte of it was acknowledged (the first may end now).
    fn run_channel(
        &mut self,
        o: &mut Outgoing,
        ch: &mut DemandChannel,
        t: &mut impl Transport,
        now_us: u64,
    ) -> Result<bool, ()> {
        if !ch.ready {
            if o.left.count == 0 && o.demand.is_empty() {
                return Err(()); // everything went on the first already
            }
            match t.state(ch.stream) {
                StreamState::Connecting if now_us.saturating_sub(ch.opened_us) <= CONNECT_US => return Ok(false),
                StreamState::Open => {}
                _ => return Err(()),
            }
            if t.write(ch.stream, DEMAND.as_bytes()) != Ok(DEMAND.len()) {
                return Err(());
            }
            let id = o.status.id;
            let mut job = self.begin_migration_stream(id).map_err(|_| ())?;
            let captured = self.capture(id).map_err(|_| ())?;
            let r = self.resume_migration_stream(&mut job, &[], &captured, &mut ch.out);
            ch.job = Some(job);
            r.map_err(|_| ())?;
            ch.ready = true;
        }
        if !o.demand.is_empty() && !ch.ended {
            let asked = core::mem::take(&mut o.demand);
            for &g in &asked {
                // Sent here, so not again in bulk (unless this breaks).
                o.left.take(g);
            }
            let mut job = ch.job.take().ok_or(())?;
            let r =
                self.save_pages(&mut job, &asked, &mut ch.out).and_then(|()| self.flush_pages(&mut job, &mut ch.out));
            ch.job = Some(job);
            r.map_err(|_| ())?;
            o.status.demand_pages_sent += asked.len() as u64;
            ch.sent.extend(asked);
        }
        if o.left.count == 0 && o.demand.is_empty() && !ch.ended {
            let job = ch.job.take().ok_or(())?;
            self.finish_save(job, &mut ch.out).map_err(|_| ())?;
            ch.ended = true;
        }
        let n = ch.out.pending();
        if n > 0 {
            let wrote = t.write(ch.stream, &ch.out.buf[ch.out.pos..ch.out.pos + n]).map_err(|_| ())?;
            ch.out.pos += wrote;
            o.status.bytes_on_wire += wrote as u64;
        }
        Ok(ch.ended && ch.out.pending() == 0 && t.unacked(ch.stream) == 0)
    }

    /// The second connection is given up: what it carried goes again in
    /// bulk (the destination passes over pages it has).
    fn drop_channel(&mut self, o: &mut Outgoing, t: &mut impl Transport) {
        let Some(mut ch) = o.channel.take() else { return };
        t.abort(ch.stream);
        if let Some(job) = ch.job.take() {
            self.abort_save(job);
        }
        for g in ch.sent {
            o.left.put_back(g);
        }
        o.status.postcopy_pages_left = o.left.count;
        o.status.demand_connection = false;
    }

    /// The pages written since the last harvest, into `o.dirty`.
    fn harvest(&mut self, o: &mut Outgoing) -> Result<(), String> {
        let id = o.status.id;
        let backend = self.backend.as_mut().map_err(|why| format!("{}", Error::NoVirtualization(why.clone())))?;
        let res = self.vms.iter_mut().find(|v| v.id == id).and_then(|v| v.res.as_mut());
        let res = res.ok_or_else(|| format!("vm {id} ended during the migration"))?;
        let vcpus = &mut res.vcpus;
        res.mem
            .harvest_dirty(backend.mem(), &mut o.bitmap, &mut |s| crate::vm::flush_all(vcpus, s))
            .map_err(|e| format!("dirty log: {e:?}"))?;
        // The bitmap covers guest-physical space up to the end of RAM,
        // holes included: keep the pages that are RAM.
        let ranges = crate::vm::boot::ram_ranges(self.get(id).map_or(0, |v| v.mem_bytes));
        let ram = &ranges.0[..ranges.1];
        o.dirty.extend(o.bitmap.iter().map(|g| g.0).filter(|g| ram.iter().any(|r| r.contains(g))).map(|g| g >> 12));
        Ok(())
    }

    /// Ends VM `id`'s dirty log, if it has one.
    fn stop_dirty_log(&mut self, id: u32) {
        let Ok(backend) = self.backend.as_mut() else { return };
        if let Some(res) = self.vms.iter_mut().find(|v| v.id == id).and_then(|v| v.res.as_mut())
            && res.mem.dirty_logging().is_some()
        {
            let vcpus = &mut res.vcpus;
            let _ = res.mem.stop_dirty_log(backend.mem(), &mut |s| crate::vm::flush_all(vcpus, s));
        }
    }

    /// The destination runs the VM: it ends here, its memory freed.
    fn complete_outgoing(
        &mut self,
        mut o: Outgoing,
        dest: u32,
        t: &mut impl Transport,
        now_us: u64,
        console: &mut impl Console,
    ) {
        let id = o.status.id;
        t.close(o.stream);
        self.migration.closing.push((o.stream, now_us + 5_000_000));
        self.unthrottle(id);
        let downtime = now_us.saturating_sub(o.pause_us) / 1000;
        o.status.downtime_ms = Some(downtime);
        o.status.state = "completed";
        o.status.destination_vm = Some(dest);
        o.status.elapsed_ms = now_us.saturating_sub(o.started_us) / 1000;
        if let Ok(backend) = self.backend.as_mut()
            && let Some(vm) = self.vms.iter_mut().find(|v| v.id == id)
        {
            let reason = format!("migrated to {} (vm {dest} there)", o.status.to);
            vm.end(RunState::Stopped { reason }, backend, console);
            super::super::release(backend, &mut self.host_mem, vm);
            super::super::detach_port(&mut self.switches, id);
        }
        let s = &o.status;
        let pause = match s.switchover_ms {
            Some(sw) => format!(
                "switch-over {sw} ms (pause to the resume record on the wire), {} pages post-copy{}, all confirmed \
                 {downtime} ms after the pause",
                s.postcopy_pages,
                if s.recoveries > 0 { format!(" over {} reconnection(s)", s.recoveries) } else { String::new() }
            ),
            None => format!("downtime {downtime} ms (pause to confirmation)"),
        };
        console.line(&format!(
            "vm {id}: migrated to {} (vm {dest} there) in {} ms: {} iterations, {} pages ({} raw, {} zero, {} compressed \
             into {} bytes, {} shared, {} poisoned), {} bytes on the wire, {pause}{}; freed here",
            s.to,
            s.elapsed_ms,
            s.iteration,
            s.pages_sent,
            s.sent.raw_pages,
            s.sent.zero_pages,
            s.sent.compressed_pages,
            s.sent.compressed_bytes,
            s.sent.shared_pages,
            s.sent.poisoned_pages,
            s.bytes_on_wire,
            if s.throttle_pct > 0 { format!(", throttled up to {}%", s.throttle_pct) } else { String::new() }
        ));
        self.migration.last.insert(id, o.status);
    }

    /// Anything went wrong before the destination's OK: the VM runs on.
    fn fail_outgoing(
        &mut self,
        mut o: Outgoing,
        why: String,
        t: &mut impl Transport,
        now_us: u64,
        console: &mut impl Console,
    ) {
        let id = o.status.id;
        t.abort(o.stream);
        if let Some(job) = o.job.take() {
            self.abort_save(job);
        }
        self.stop_dirty_log(id);
        self.unthrottle(id);
        o.status.state = "failed";
        o.status.elapsed_ms = now_us.saturating_sub(o.started_us) / 1000;
        if o.status.destination_may_run {
            // Post-copy: the destination may run the VM on what it got, so
            // this copy must not run too (two diverging copies of one
            // guest). It stays paused with every page, the ones the
            // destination still lacks included, for the operator.
            console.line(&format!(
                "vm {id}: migration to {} failed during post-copy: {why}; the destination may be running the VM: \
                 it stays paused here, holding the {} pages the destination has not received",
                o.status.to, o.status.postcopy_pages_left
            ));
            o.status.error = Some(why);
            self.migration.last.insert(id, o.status);
            return;
        }
        let resumed = o.paused_by_us && self.set_paused(id, false).is_ok();
        let runs = if self.get(id).is_some_and(|v| v.res.is_some()) {
            if resumed { "; the VM resumed here" } else { "; the VM runs on here" }
        } else {
            ""
        };
        console.line(&format!("vm {id}: migration to {} failed: {why}{runs}", o.status.to));
        o.status.error = Some(why);
        self.migration.last.insert(id, o.status);
    }
}

/// The destination's answer line, once it is whole: `Ok(id)` for OK.
/// `Ok(None)`: not yet; `Err`: the connection closed without one.
fn read_answer(o: &mut Outgoing, t: &mut impl Transport) -> Result<Option<Result<u32, String>>, String> {
    let mut buf = [0u8; 64];
    let mut closed = false;
    loop {
        let Ok(n) = t.read(o.stream, &mut buf) else {
            // Its answer may have come just before the close.
            closed = true;
            break;
        };
        if n == 0 {
            break;
        }
        o.reply.extend_from_slice(&buf[..n]);
        take_requests(o)?;
        if o.reply.len() > MAX_REPLY {
            return Err(String::from("the destination's answer is not a migration answer"));
        }
    }
    // Requests left over from a recovery's answer.
    take_requests(o)?;
    if let Some(end) = o.reply.iter().position(|&b| b == b'\n') {
        let line = core::str::from_utf8(&o.reply[..end]).unwrap_or("");
        if let Some(n) = line.strip_prefix(REPLY_OK) {
            return Ok(Some(n.trim().parse().map_err(|_| format!("the destination answered {line:?}"))));
        }
        if let Some(why) = line.strip_prefix(REPLY_REFUSED) {
            return Ok(Some(Err(format!("the destination refused the stream: {why}"))));
        }
        return Ok(Some(Err(format!("the destination answered {line:?}"))));
    }
    if closed && o.phase == Phase::Confirming {
        return Err(String::from("the destination closed the connection without confirming the VM runs there"));
    }
    Ok(None)
}

/// Post-copy's page requests, which come before the answer: taken out of
/// what the destination sent.
fn take_requests(o: &mut Outgoing) -> Result<(), String> {
    while let Some(end) = o.reply.iter().position(|&b| b == b'\n') {
        let line = core::str::from_utf8(&o.reply[..end]).unwrap_or("");
        let Some(gfn) = line.strip_prefix(REQUEST_PAGE) else { break };
        let gfn = gfn.trim().parse::<u64>().map_err(|_| format!("the destination asked for {line:?}"))?;
        match o.phase {
            Phase::Postcopy => o.demand.push(gfn),
            // Every page is out already: the one asked for is on its way
            // (a vCPU touched it while it was on the wire).
            Phase::Confirming => {}
            _ => return Err(format!("the destination asked for page {gfn:#x} outside post-copy")),
        }
        o.status.demand_requests += 1;
        o.reply.drain(..=end);
    }
    Ok(())
}

/// Hands produced bytes to the connection, within the bandwidth limit;
/// the test aid `corrupt_at` flips one byte on the way.
fn pump(o: &mut Outgoing, t: &mut impl Transport, now_us: u64) -> Result<(), String> {
    let mut room = WRITE_PER_ROUND;
    if let Some(mib) = o.opts.bandwidth_mib {
        let (since, base) = o.budget_from;
        let allowed = u128::from(mib) * (1 << 20) * u128::from(now_us.saturating_sub(since)) / 1_000_000;
        // A round's worth of burst allowed from the start.
        let allowed = allowed as u64 + (64 << 10);
        room = room.min(allowed.saturating_sub(o.status.bytes_on_wire - base) as usize);
    }
    let n = o.out.pending().min(room);
    if n == 0 {
        return Ok(());
    }
    let at = o.status.bytes_on_wire;
    let mut chunk = &o.out.buf[o.out.pos..o.out.pos + n];
    let flipped;
    if let Some(c) = o.opts.corrupt_at.filter(|&c| c >= at && c < at + n as u64) {
        let mut copy = chunk.to_vec();
        copy[(c - at) as usize] ^= 0xff;
        flipped = copy;
        chunk = &flipped;
    }
    let wrote = t.write(o.stream, chunk).map_err(|_| String::from("the connection was closed or reset"))?;
    o.out.pos += wrote;
    o.status.bytes_on_wire += wrote as u64;
    if o.resume_at.is_some_and(|r| o.status.bytes_on_wire >= r) && !o.status.destination_may_run {
        o.status.destination_may_run = true;
        o.status.switchover_ms = Some(now_us.saturating_sub(o.pause_us) / 1000);
    }
    Ok(())
}
