//! Migration between two simulated hosts (`hostnet::link`: two NICs on an
//! in-memory cable, each host a manager over the mock backend): the VM
//! moves with every write its guest made during pre-copy, the source frees
//! it only after the destination runs it; a cut link, a corrupt byte and
//! another format version each leave the source VM running and no VM on
//! the destination.

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use super::command::{MigrateCommand, parse};
use super::source::{Mode, Options};
use crate::backend::Backend;
use crate::hostnet::HostNet;
use crate::hostnet::link::{End, hosts};
use crate::hostnet::tcp::{Transport, parse_endpoint};
use crate::manager::{GuestImage, Manager};
use crate::testing::{Lines, MockBackend, elf_guest};
use mm::GuestPhysAddr;

pub(super) const RAM_MIB: u32 = 8;
pub(super) const BASE: u64 = 0x40_0000;
pub(super) const PAGES: u64 = 512;

pub(super) fn manager(frames: usize) -> Manager<MockBackend> {
    let images = vec![GuestImage { name: "tiny".into(), bytes: elf_guest(&[0x90; 32]) }];
    Manager::new(Ok(MockBackend::new(frames)), images)
}

/// Page contents for page `p` in generation `g`.
pub(super) fn content(p: u64, g: u64) -> Vec<u8> {
    let mut x = (p << 20 | g).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    // A word at a time: the tests write many pages.
    (0..512)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect()
}

/// A write as the guest's vCPU makes it: through the nested tables, so
/// the dirty log's write protection sees it.
pub(super) fn guest_write(m: &mut Manager<MockBackend>, id: u32, gpa: u64, data: &[u8]) {
    let Manager { backend, vms, host_mem, .. } = m;
    let backend = backend.as_mut().unwrap();
    let res = vms.iter_mut().find(|v| v.id == id).unwrap().res.as_mut().unwrap();
    host_mem.with_hooks(id, |h| res.mem.sim_write(&mut backend.mem, h, 0, GuestPhysAddr(gpa), data)).unwrap();
}

pub(super) fn peek(m: &Manager<MockBackend>, id: u32, gpa: u64) -> Vec<u8> {
    let mut buf = vec![0; 4096];
    let vm = m.get(id).unwrap();
    vm.res.as_ref().unwrap().mem.peek(&m.backend.as_ref().unwrap().mem, GuestPhysAddr(gpa), &mut buf).unwrap();
    buf
}

/// Two hosts, a VM on the first whose region holds generation 0, the
/// second listening.
pub(super) struct Pair {
    pub(super) a: HostNet<End>,
    pub(super) b: HostNet<End>,
    pub(super) ma: Manager<MockBackend>,
    pub(super) mb: Manager<MockBackend>,
    pub(super) id: u32,
    /// The generation each page of the region holds.
    pub(super) gens: Vec<u64>,
    pub(super) now: u64,
    pub(super) la: Lines,
    pub(super) lb: Lines,
    /// The pages of the region the guest rewrites (the first `span`).
    pub(super) span: u64,
    /// Hundredths of a page the throttled guest still owes (it writes
    /// `dirty × (100 - throttle %)` hundredths per round).
    pub(super) owed: u64,
}

impl Pair {
    pub(super) fn new() -> Pair {
        Pair::with(RAM_MIB, 8192, 1)
    }

    fn with_vcpus(n: u32) -> Pair {
        Pair::with(RAM_MIB, 8192, n)
    }

    /// A VM of `mib` MiB and `vcpus` vCPUs, on hosts of `frames` 4 KiB
    /// frames each.
    pub(super) fn with(mib: u32, frames: usize, vcpus: u32) -> Pair {
        let (a, mut b) = hosts();
        let (mut ma, mut mb) = (manager(frames), manager(frames));
        let id = ma.run_vm_smp("tiny", mib, &[], "", None, None, vcpus).unwrap();
        for p in 0..PAGES {
            guest_write(&mut ma, id, BASE + p * 4096, &content(p, 0));
        }
        mb.listen_migrations(super::DEFAULT_PORT, &mut b.tcp()).unwrap();
        Pair {
            a,
            b,
            ma,
            mb,
            id,
            gens: vec![0; PAGES as usize],
            now: 0,
            la: Lines::default(),
            lb: Lines::default(),
            owed: 0,
            span: PAGES,
        }
    }

    pub(super) fn migrate(&mut self, o: Options) {
        self.ma.start_migration(self.id, o, &mut self.a.tcp(), self.now).unwrap();
    }

    /// One round of both hosts, `step_us` apart; the guest rewrites
    /// `dirty` pages first if it runs, fewer if it is throttled (it gets
    /// that much less CPU time: `manager::rounds` and `vm::throttle`).
    pub(super) fn round(&mut self, step_us: u64, dirty: u64) {
        self.now += step_us;
        let vm = self.ma.get(self.id);
        let running = vm.is_some_and(|v| v.res.is_some() && !v.paused);
        let throttle = vm.map_or(0, |v| u64::from(v.throttle.pct()));
        if running {
            self.owed += dirty * (100 - throttle);
            let dirty = self.owed / 100;
            self.owed %= 100;
            for k in 0..dirty {
                let p = (self.now / step_us * 7 + k * 13) % self.span;
                self.gens[p as usize] += 1;
                guest_write(&mut self.ma, self.id, BASE + p * 4096, &content(p, self.gens[p as usize]));
            }
        }
        let mut sink = |_: &str| {};
        self.a.poll(self.now, &mut sink);
        self.b.poll(self.now, &mut sink);
        self.ma.migration_round(Some(&mut self.a.tcp()), self.now, &mut self.la);
        self.mb.migration_round(Some(&mut self.b.tcp()), self.now, &mut self.lb);
    }

    pub(super) fn run_until(&mut self, step_us: u64, dirty: u64, max: usize, done: impl Fn(&Pair) -> bool) {
        for _ in 0..max {
            self.round(step_us, dirty);
            if done(self) {
                return;
            }
        }
        panic!("not done after {max} rounds: a {:?} b {:?}", self.la.0, self.lb.0);
    }

    /// The region on VM `id` of `m` holds the generations written.
    pub(super) fn check_region(&self, m: &Manager<MockBackend>, id: u32) {
        for p in 0..PAGES {
            assert!(peek(m, id, BASE + p * 4096) == content(p, self.gens[p as usize]), "page {p} differs");
        }
    }

    fn source_runs_on(&self) {
        let vm = self.ma.get(self.id).unwrap();
        let res = vm.res.as_ref().expect("the source VM still has its memory");
        assert!(!vm.paused, "the source VM was left paused");
        assert!(res.mem.dirty_logging().is_none(), "the dirty log was left running");
        assert!(self.ma.migration.out.is_none());
        self.check_region(&self.ma, self.id);
    }

    fn destination_has_no_vm(&self) {
        assert!(self.mb.vms.is_empty(), "the destination kept a VM");
        assert!(!self.mb.migration.incoming.as_ref().unwrap().busy());
    }
}

pub(super) fn to_b() -> Options {
    Options {
        to: parse_endpoint("10.0.0.2:7070").unwrap(),
        downtime_ms: 300,
        bandwidth_mib: None,
        throttle_max: 99,
        corrupt_at: None,
        mode: Mode::Precopy,
        connections: 2,
    }
}

#[test]
fn precopy_moves_the_vm_with_every_write_and_frees_it_after_the_confirmation() {
    let mut p = Pair::new();
    let free_before = p.ma.backend.as_ref().unwrap().free_frames();
    // A tight downtime limit at a slow rate: several dirty rounds.
    p.migrate(Options { downtime_ms: 1, bandwidth_mib: Some(8), ..to_b() });
    assert!(p.ma.start_migration(p.id, to_b(), &mut p.a.tcp(), 0).unwrap_err().contains("already migrating"));
    p.run_until(1000, 4, 20_000, |p| {
        p.la.0.iter().any(|l| l.contains("migrated to")) || p.la.0.iter().any(|l| l.contains("failed"))
    });
    for _ in 0..50 {
        p.round(1000, 0);
    }
    let line = p.la.0.iter().find(|l| l.starts_with("vm 1: migrated to")).unwrap_or_else(|| panic!("{:?}", p.la.0));
    assert!(line.contains("10.0.0.2:7070 (vm 1 there)") && line.contains("freed here"), "{line}");
    let s = p.ma.migration_status(p.id).unwrap().clone();
    assert_eq!(s.state, "completed");
    assert!(s.iteration >= 2, "only {} iterations", s.iteration);
    assert!(s.pages_sent > u64::from(RAM_MIB) * 256, "{s:?}");
    assert!(s.bytes_on_wire > 0 && s.downtime_ms.is_some() && s.destination_vm == Some(1));
    // Every page is counted by how it went: the guest's written pages as
    // data (raw or LZ4), the rest of its RAM as zero flags.
    let k = s.sent;
    let by_kind = k.raw_pages + k.zero_pages + k.compressed_pages + k.shared_pages + k.poisoned_pages;
    assert_eq!(by_kind, s.pages_sent, "{k:?}");
    assert!(k.zero_pages > 0 && k.raw_pages + k.compressed_pages > 0, "{k:?}");
    // An entry is its page and a few bytes naming it.
    assert!((k.raw_pages * 4096..k.raw_pages * 4200).contains(&k.raw_bytes), "{k:?}");
    assert!(k.compressed_bytes < k.compressed_pages * 4096 || k.compressed_pages == 0, "{k:?}");
    assert!(line.contains(&format!("{} raw, {} zero", k.raw_pages, k.zero_pages)), "{line}");
    // The source VM ended and gave its memory back.
    let vm = p.ma.get(p.id).unwrap();
    assert!(vm.res.is_none() && vm.state.ended());
    assert!(p.ma.backend.as_ref().unwrap().free_frames() > free_before);
    // The destination runs it, with every page as the guest last wrote it.
    assert!(p.lb.0.iter().any(|l| l.starts_with("migrate: vm 1 (tiny) arrived from 10.0.0.1:")), "{:?}", p.lb.0);
    let dest = p.mb.get(1).expect("the VM on the destination");
    assert!(dest.res.is_some() && !dest.paused && !dest.state.ended());
    p.check_region(&p.mb, 1);
    assert!(p.gens.iter().any(|&g| g > 1), "the guest rewrote pages during the migration");
    // The listener takes another.
    assert!(!p.mb.migration.incoming.as_ref().unwrap().busy());
    assert_eq!(p.mb.migration.incoming.as_ref().unwrap().received, 1);
}

#[test]
fn a_cut_link_leaves_the_vm_running_at_the_source_and_none_at_the_destination() {
    let mut p = Pair::new();
    let frames = p.mb.backend.as_ref().unwrap().free_frames();
    p.migrate(Options { bandwidth_mib: Some(4), ..to_b() });
    p.run_until(1000, 2, 5000, |p| p.ma.migration_status(p.id).is_some_and(|s| s.bytes_on_wire > 300_000));
    assert!(p.ma.get(p.id).unwrap().res.as_ref().unwrap().mem.dirty_logging().is_some());
    assert!(p.mb.migration.incoming.as_ref().unwrap().busy());
    // The cable is cut both ways (the destination's host dies, as far as
    // either side can tell).
    p.a.nic().drop_every = 1;
    p.b.nic().drop_every = 1;
    p.run_until(10_000, 2, 5000, |p| p.ma.migration.out.is_none() && !p.mb.migration.incoming.as_ref().unwrap().busy());
    let line = p.la.0.last().unwrap();
    assert!(line.starts_with("vm 1: migration to 10.0.0.2:7070 failed:") && line.ends_with("runs on here"), "{line}");
    assert!(p.lb.0.iter().any(|l| l.contains("ended early") && l.contains("partial VM is dropped")), "{:?}", p.lb.0);
    assert_eq!(p.ma.migration_status(p.id).unwrap().state, "failed");
    p.source_runs_on();
    p.destination_has_no_vm();
    assert_eq!(p.mb.backend.as_ref().unwrap().free_frames(), frames, "the partial VM's memory was freed");
}

#[test]
fn a_corrupt_byte_is_refused_naming_the_record_and_the_vm_runs_on() {
    let mut p = Pair::new();
    p.migrate(Options { corrupt_at: Some(100_000), ..to_b() });
    p.run_until(1000, 2, 20_000, |p| p.ma.migration.out.is_none());
    let refused = p.lb.0.iter().find(|l| l.contains("refused the stream")).unwrap_or_else(|| panic!("{:?}", p.lb.0));
    assert!(refused.contains("(memory)") && refused.contains("checksum"), "{refused}");
    let line = p.la.0.last().unwrap();
    assert!(line.contains("the destination refused the stream") && line.contains("checksum"), "{line}");
    p.source_runs_on();
    p.destination_has_no_vm();
    // It can go again, uncorrupted, over the same listener; the refused
    // stream used up no id there.
    p.migrate(to_b());
    p.run_until(1000, 2, 20_000, |p| p.ma.migration.out.is_none());
    assert_eq!(p.ma.migration_status(p.id).unwrap().state, "completed", "{:?} {:?}", p.la.0, p.lb.0);
    let dest = p.mb.vms.iter().find(|v| v.res.is_some()).unwrap().id;
    assert_eq!(dest, 1);
    p.check_region(&p.mb, dest);
}

/// CRC-32C (Castagnoli), bitwise: the stream's prologue checksum.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82f6_3b78 } else { crc >> 1 };
        }
    }
    !crc
}

#[test]
fn a_stream_of_another_format_version_or_a_checkpoint_is_refused() {
    let mut p = Pair::new();
    let ours = p.ma.save_vm(p.id, Vec::new()).unwrap().0;
    let mut v2 = ours.clone();
    v2[8..10].copy_from_slice(&2u16.to_le_bytes());
    let sum = crc32c(&v2[..16]);
    v2[16..20].copy_from_slice(&sum.to_le_bytes());
    for (bytes, says) in [(&v2, "version 2"), (&ours, "not a live-migration stream")] {
        let s = p.a.tcp().connect(parse_endpoint("10.0.0.2:7070").unwrap()).unwrap();
        p.lb.0.clear();
        let mut sent = 0;
        let mut reply = Vec::new();
        for _ in 0..2000 {
            p.round(1000, 0);
            if sent < bytes.len() {
                sent += p.a.tcp().write(s, &bytes[sent..]).unwrap_or(0);
            }
            let mut buf = [0u8; 256];
            if let Ok(n) = p.a.tcp().read(s, &mut buf) {
                reply.extend_from_slice(&buf[..n]);
            }
            if reply.ends_with(b"\n") {
                break;
            }
        }
        let reply = String::from_utf8(reply).unwrap();
        assert!(reply.starts_with(super::REPLY_REFUSED) && reply.contains(says), "{reply:?}");
        assert!(p.lb.0.iter().any(|l| l.contains("refused the stream") && l.contains(says)), "{:?}", p.lb.0);
        p.a.tcp().abort(s);
        p.destination_has_no_vm();
    }
}

#[test]
fn commands_parse_and_refuse_bad_input() {
    assert_eq!(parse("vm list"), None);
    assert_eq!(parse("migrate listen").unwrap().unwrap().0, MigrateCommand::Listen(7070));
    assert_eq!(parse("migrate listen 9000 --json").unwrap().unwrap(), (MigrateCommand::Listen(9000), true));
    assert_eq!(parse("vm migrate status 3").unwrap().unwrap().0, MigrateCommand::Status(3));
    let MigrateCommand::Start(3, o) = parse("vm migrate 3 10.0.0.2 downtime=50 bandwidth=20").unwrap().unwrap().0
    else {
        panic!()
    };
    assert_eq!((o.to.port(), o.downtime_ms, o.bandwidth_mib, o.corrupt_at), (7070, 50, Some(20), None));
    let MigrateCommand::Start(1, o) = parse("vm migrate 1 10.0.0.2:7100 corrupt_at=9").unwrap().unwrap().0 else {
        panic!()
    };
    assert_eq!((o.to.port(), o.corrupt_at, o.mode), (7100, Some(9), Mode::Precopy));
    for (word, mode) in [("postcopy", Mode::Postcopy), ("hybrid", Mode::Hybrid), ("precopy", Mode::Precopy)] {
        let MigrateCommand::Start(1, o) = parse(&format!("vm migrate 1 10.0.0.2 mode={word}")).unwrap().unwrap().0
        else {
            panic!()
        };
        assert_eq!(o.mode, mode);
    }
    for bad in [
        "migrate",
        "migrate listen 0",
        "migrate listen x",
        "migrate frob",
        "vm migrate",
        "vm migrate 1",
        "vm migrate x 10.0.0.2",
        "vm migrate 1 10.0.0.300",
        "vm migrate 1 10.0.0.2:0",
        "vm migrate 1 10.0.0.2 downtime=0",
        "vm migrate 1 10.0.0.2 bandwidth=x",
        "vm migrate 1 10.0.0.2 speed=1",
        "vm migrate 1 10.0.0.2 downtime",
        "vm migrate 1 10.0.0.2 mode=lazy",
        "vm migrate status",
        "vm migrate status x",
    ] {
        let e = parse(bad).unwrap().unwrap_err().0;
        assert!(!e.contains('\n') && !e.is_empty(), "{bad:?}: {e:?}");
    }
}

#[test]
fn refusals_change_nothing() {
    let (mut a, _b) = hosts();
    let mut m = manager(8192);
    let mut out = Lines::default();
    let run = |line: &str, m: &mut Manager<MockBackend>, a: &mut HostNet<End>, out: &mut Lines| {
        super::command::execute(&parse(line).unwrap().unwrap(), m, Some(&mut a.tcp()), 0, out);
    };
    run("vm migrate 7 10.0.0.2", &mut m, &mut a, &mut out);
    assert_eq!(out.0.last().unwrap(), "error: vm migrate: no VM 7");
    let id = m.run_vm("tiny", RAM_MIB, "").unwrap();
    let mut bare = HostNet::new(crate::hostnet::link::pair().0, "c".into(), 0, 3);
    super::command::execute(
        &parse("vm migrate 1 10.0.0.2").unwrap().unwrap(),
        &mut m,
        Some(&mut bare.tcp()),
        0,
        &mut out,
    );
    assert!(out.0.last().unwrap().contains("no address"), "{:?}", out.0);
    assert!(m.migration.out.is_none());
    run("vm migrate status 1 --json", &mut m, &mut a, &mut out);
    assert!(out.0.last().unwrap().contains("\"ok\":false"));
    run("migrate listen", &mut m, &mut a, &mut out);
    run("migrate listen 7071", &mut m, &mut a, &mut out);
    assert_eq!(out.0.last().unwrap(), "error: migrate listen: already listening on port 7070");
    super::command::execute::<MockBackend, crate::hostnet::tcp::Tcp>(
        &parse("vm migrate 1 10.0.0.2").unwrap().unwrap(),
        &mut m,
        None,
        0,
        &mut out,
    );
    assert!(out.0.last().unwrap().contains("no network device"));
    assert!(m.get(id).unwrap().res.as_ref().unwrap().mem.dirty_logging().is_none());
}

#[test]
fn a_vm_of_three_vcpus_arrives_with_every_vcpu_where_it_was() {
    let mut p = Pair::with_vcpus(3);
    // The APs wait for their SIPI at the source: so they must at the
    // destination, each with its own registers.
    let before: Vec<(crate::vm::VcpuState, u64)> = {
        let res = p.ma.get(p.id).unwrap().res.as_ref().unwrap();
        res.vcpus.iter().map(|s| (s.state, s.vcpu.state.rip)).collect()
    };
    p.migrate(to_b());
    p.run_until(1000, 2, 20_000, |p| p.la.0.iter().any(|l| l.contains("migrated to") || l.contains("failed")));
    assert!(p.la.0.iter().any(|l| l.starts_with("vm 1: migrated to")), "{:?} {:?}", p.la.0, p.lb.0);
    let dest = p.mb.get(1).expect("the VM on the destination");
    let res = dest.res.as_ref().unwrap();
    let after: Vec<(crate::vm::VcpuState, u64)> = res.vcpus.iter().map(|s| (s.state, s.vcpu.state.rip)).collect();
    assert_eq!(after.len(), 3);
    assert_eq!(after[1..], before[1..], "the APs still wait for their SIPI where they were");
    p.check_region(&p.mb, 1);
}

/// Runs `line` on `m`'s console; what it printed.
fn console(m: &mut Manager<MockBackend>, line: &str) -> String {
    let mut con = Lines::default();
    let parsed = crate::console::parse(line).unwrap().unwrap();
    crate::console::execute(&parsed, m, &crate::console::HostStatus::default(), &mut con);
    con.text()
}

#[test]
fn the_source_vm_cannot_change_from_the_switch_over_on() {
    let mut p = Pair::new();
    p.migrate(to_b());
    p.run_until(1000, 2, 20_000, |p| {
        p.ma.migration_status(p.id).is_some_and(|s| s.state == "switchover" || s.state == "confirming")
    });
    assert!(p.ma.get(p.id).unwrap().paused);
    // Each is refused with one line, and changes nothing.
    for line in ["vm resume 1", "vm pause 1", "vm stop 1", "vm balloon 1 2", "vm send 1 -- x"] {
        let out = console(&mut p.ma, line);
        assert!(
            out.starts_with("error: vm 1 is in the switch-over of its migration to 10.0.0.2:7070")
                && !out.contains('\n'),
            "{line}: {out:?}"
        );
        let vm = p.ma.get(p.id).unwrap();
        assert!(vm.paused && vm.res.is_some(), "{line} changed the VM");
    }
    assert!(matches!(p.ma.begin_save(p.id, true), Err(crate::manager::Error::Migrating { switching: true, .. })));
    // Nor does the host's last resort against running out of memory stop
    // it (after the passes that share what can be shared).
    for _ in 0..50 {
        p.ma.relieve_memory_pressure(p.id, &mut p.la);
    }
    let vm = p.ma.get(p.id).unwrap();
    assert!(vm.paused && vm.res.is_some() && !vm.state.ended(), "out of memory stopped the VM in its switch-over");
    // The migration goes on and completes; the guest's pages arrive.
    p.run_until(1000, 0, 20_000, |p| p.ma.migration.out.is_none());
    assert_eq!(p.ma.migration_status(p.id).unwrap().state, "completed", "{:?} {:?}", p.la.0, p.lb.0);
    p.check_region(&p.mb, 1);
}

#[test]
fn stop_during_pre_copy_cancels_the_migration_and_save_waits_for_its_end() {
    let mut p = Pair::new();
    p.migrate(Options { bandwidth_mib: Some(4), ..to_b() });
    p.run_until(1000, 2, 5000, |p| p.ma.migration_status(p.id).is_some_and(|s| s.bytes_on_wire > 100_000));
    assert_eq!(p.ma.migration_status(p.id).unwrap().state, "precopy");
    // Pause and resume are the operator's to give during pre-copy; a
    // checkpoint is not.
    assert_eq!(console(&mut p.ma, "vm pause 1"), "vm 1 paused");
    assert_eq!(console(&mut p.ma, "vm resume 1"), "vm 1 resumed");
    let e = p.ma.begin_save(p.id, false).map(|_| ()).unwrap_err();
    assert!(format!("{e}").starts_with("vm 1 is migrating to 10.0.0.2:7070 (pre-copy)"), "{e}");
    assert!(p.ma.get(p.id).unwrap().res.as_ref().unwrap().mem.dirty_logging().is_some());
    assert!(console(&mut p.ma, "vm stop 1").ends_with("\nvm 1 stopped"));
    p.run_until(1000, 0, 5000, |p| p.ma.migration.out.is_none() && !p.mb.migration.incoming.as_ref().unwrap().busy());
    let line = p.la.0.last().unwrap();
    assert_eq!(line, "vm 1: migration to 10.0.0.2:7070 failed: cancelled: the VM was stopped by the operator");
    assert_eq!(p.ma.migration_status(p.id).unwrap().state, "failed");
    assert!(p.lb.0.iter().any(|l| l.contains("partial VM is dropped")), "{:?}", p.lb.0);
    p.destination_has_no_vm();
}

#[test]
fn the_switch_over_streams_a_large_dirty_set_through_a_small_buffer() {
    // 24 MiB of RAM; the guest marks 16 MiB of it during the first round,
    // and the downtime limit lets the switch-over follow that round: its
    // dirty set is 16 MiB, several times what the buffer may hold.
    const MARKED: u64 = 4096;
    let first = BASE + PAGES * 4096;
    let mark = |p: u64| (p * 0x9e37_79b9 + 1).to_le_bytes();
    let mut p = Pair::with(24, 24_576, 1);
    p.migrate(Options { downtime_ms: 60_000, ..to_b() });
    let mut marked = false;
    for _ in 0..100_000 {
        if !marked && p.ma.migration_status(p.id).is_some_and(|s| s.state == "precopy") {
            for k in 0..MARKED {
                guest_write(&mut p.ma, p.id, first + k * 4096, &mark(k));
            }
            marked = true;
        }
        p.round(1000, 0);
        if p.ma.migration.out.is_none() {
            break;
        }
    }
    let s = p.ma.migration_status(p.id).unwrap().clone();
    assert_eq!((s.state, s.iteration), ("completed", 1), "{s:?} {:?} {:?}", p.la.0, p.lb.0);
    assert!(s.dirty_pages_last_round >= MARKED, "{s:?}");
    // LOW_WATER pending plus one step (2 MiB of pages and their framing).
    let bound = (super::source::LOW_WATER + (3 << 20)) as u64;
    assert!(s.buffer_peak_bytes > 0 && s.buffer_peak_bytes < bound, "{} bytes held", s.buffer_peak_bytes);
    let dest = p.mb.get(1).expect("the VM on the destination");
    assert!(!dest.paused && dest.res.is_some());
    for k in 0..MARKED {
        assert_eq!(peek(&p.mb, 1, first + k * 4096)[..8], mark(k), "page {k}");
    }
    p.check_region(&p.mb, 1);
}

#[test]
fn a_guest_that_outruns_the_link_is_throttled_until_it_converges() {
    // 4 pages per ms (16 per 4 ms round) over 64 pages, against a link of
    // 2 pages per ms and a 10 ms limit (20 pages): every dirty round finds
    // the 64 pages again.: every dirty round
    // finds the whole region again.
    let fast = |throttle_max| Options { bandwidth_mib: Some(8), downtime_ms: 10, throttle_max, ..to_b() };
    let mut p = Pair::new();
    p.span = 64;
    p.migrate(fast(0));
    p.run_until(4000, 16, 50_000, |p| p.ma.migration.out.is_none());
    let s = p.ma.migration_status(p.id).unwrap().clone();
    assert_eq!(s.state, "completed", "{:?}", p.la.0);
    assert_eq!(s.iteration, super::source::MAX_ITERATIONS, "throttle=0: only the round cap ends it");
    assert_eq!(s.throttle_pct, 0);
    assert!(s.expected_downtime_ms > 10, "it never converged: {s:?}");
    p.check_region(&p.mb, 1);

    let mut p = Pair::new();
    p.span = 64;
    p.migrate(fast(99));
    let mut seen: Vec<u8> = Vec::new();
    let mut rates: Vec<u64> = Vec::new();
    for _ in 0..50_000 {
        p.round(4000, 16);
        let pct = p.ma.get(p.id).map_or(0, |v| v.throttle.pct());
        if p.ma.migration.out.is_none() {
            break;
        }
        if seen.last() != Some(&pct) {
            seen.push(pct);
        }
        let rate = p.ma.migration_status(p.id).unwrap().dirty_rate_pages_per_s;
        if rate > 0 && rates.last() != Some(&rate) {
            rates.push(rate);
        }
    }
    // The status's dirty rate shows the throttle working: it falls to
    // half of its peak (4 pages per ms unthrottled) or less.
    let peak = rates.iter().copied().max().unwrap_or(0);
    assert_eq!(peak, 4000, "dirty rates {rates:?}");
    assert!(rates.iter().any(|&r| r <= peak / 2), "dirty rates {rates:?}");
    let s = p.ma.migration_status(p.id).unwrap().clone();
    assert_eq!(s.state, "completed", "{:?}", p.la.0);
    // 20 %, then 10 more per round that did not converge.
    let want: Vec<u8> = [0].into_iter().chain((20..=99).step_by(10)).take(seen.len()).collect();
    assert_eq!(seen, want);
    assert!(s.throttle_pct >= 20 && s.throttle_pct == *seen.last().unwrap(), "{s:?}");
    assert!(s.iteration < super::source::MAX_ITERATIONS, "converged before the cap: {s:?}");
    assert!(s.expected_downtime_ms <= 10, "{s:?}");
    let line = p.la.0.iter().find(|l| l.starts_with("vm 1: migrated to")).unwrap();
    assert!(line.contains(&format!("throttled up to {}%", s.throttle_pct)), "{line}");
    eprintln!("throttled {seen:?}: {s:?}");
    p.check_region(&p.mb, 1);

    // Up to 40 % only: the throttle stops there.
    let mut p = Pair::new();
    p.span = 64;
    p.migrate(fast(40));
    p.run_until(4000, 16, 50_000, |p| p.ma.migration.out.is_none());
    assert_eq!(p.ma.migration_status(p.id).unwrap().throttle_pct, 40);
}

#[test]
fn a_failed_migration_gives_the_vm_its_full_speed_back() {
    let mut p = Pair::new();
    p.span = 64;
    p.migrate(Options { bandwidth_mib: Some(8), downtime_ms: 10, ..to_b() });
    p.run_until(4000, 16, 50_000, |p| p.ma.get(p.id).is_some_and(|v| v.throttle.pct() > 0));
    p.a.nic().drop_every = 1;
    p.b.nic().drop_every = 1;
    p.run_until(10_000, 1, 5000, |p| p.ma.migration.out.is_none());
    let s = p.ma.migration_status(p.id).unwrap();
    assert_eq!(s.state, "failed");
    assert!(s.throttle_pct > 0, "the status keeps the highest throttle");
    assert_eq!(p.ma.get(p.id).unwrap().throttle.pct(), 0, "the VM runs at full speed again");
    p.source_runs_on();
}

#[test]
fn a_precopy_step_ends_at_its_time_budget_so_the_guest_is_not_kept_waiting() {
    // A slow host: every clock read is 250 µs later (the mock's clock runs
    // at 1 MHz), so a step uses up its 2 ms after a few pieces of 8 pages.
    let mut p = Pair::new();
    p.ma.backend.as_mut().unwrap().tick = 250;
    p.migrate(to_b());
    p.run_until(1000, 0, 20_000, |p| p.la.0.iter().any(|l| l.contains("migrated to") || l.contains("failed")));
    assert!(p.la.0.iter().any(|l| l.starts_with("vm 1: migrated to")), "{:?}", p.la.0);
    p.check_region(&p.mb, 1);
    let s = p.ma.migration_status(p.id).unwrap().clone();
    // One piece is a page read, a clock read per page and the step's own:
    // well under the 512 pages (128 ms here) a step took before.
    assert!(s.longest_step_us >= 2_000 && s.longest_step_us < 12_000, "{s:?}");
    // Fast host, same VM: the step is not cut short.
    let mut q = Pair::new();
    q.migrate(to_b());
    q.run_until(1000, 0, 20_000, |p| p.la.0.iter().any(|l| l.contains("migrated to") || l.contains("failed")));
    let fast = q.ma.migration_status(q.id).unwrap().clone();
    assert!(fast.longest_step_us < s.longest_step_us, "{fast:?}");
}
