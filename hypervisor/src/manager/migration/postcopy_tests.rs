//! Post-copy and hybrid migration between two simulated hosts (the
//! harness of `tests.rs`): the VM runs at the destination before its
//! memory is there, a page it touches is asked for ahead of the rest, a
//! page it wrote there is never overwritten by the push, and a link that
//! breaks leaves both copies paused rather than two copies running.

use alloc::vec;

use super::source::{Mode, Options};
use super::tests::{BASE, PAGES, Pair, RAM_MIB, content, guest_write, peek, to_b};
use crate::backend::Backend;
use crate::manager::Manager;
use crate::testing::MockBackend;
use mm::GuestPhysAddr;
use mm::vm_memory::{FaultOutcome, PageState};

/// A read as the guest's vCPU makes it on VM `id`: `false` while the page
/// is still on its way (post-copy).
fn guest_reads(m: &mut Manager<MockBackend>, id: u32, gpa: u64) -> bool {
    let Manager { backend, vms, host_mem, .. } = m;
    let backend = backend.as_mut().unwrap();
    let res = vms.iter_mut().find(|v| v.id == id).unwrap().res.as_mut().unwrap();
    let mut buf = vec![0; 4096];
    match host_mem.with_hooks(id, |h| res.mem.sim_read(&mut backend.mem, h, 0, GuestPhysAddr(gpa), &mut buf)) {
        Ok(()) => true,
        Err(FaultOutcome::Failed(mm::Error::PageInTransit(_))) => false,
        Err(e) => panic!("read of {gpa:#x}: {e:?}"),
    }
}

fn state(m: &Manager<MockBackend>, id: u32, gpa: u64) -> Option<PageState> {
    m.get(id)?.res.as_ref()?.mem.page_state(GuestPhysAddr(gpa))
}

#[test]
fn postcopy_runs_the_vm_at_once_serves_touched_pages_first_and_frees_the_source_after_the_last() {
    for connections in [2, 1] {
        postcopy_moves_the_vm(connections);
    }
}

/// `connections`: 2 sends the pages asked for on a second connection,
/// 1 on the one, ahead of the next batch.
fn postcopy_moves_the_vm(connections: u8) {
    let mut p = Pair::new();
    let free_before = p.ma.backend.as_ref().unwrap().free_frames();
    // Slow enough that the push takes many rounds.
    p.migrate(Options { mode: Mode::Postcopy, bandwidth_mib: Some(4), connections, ..to_b() });
    p.run_until(1000, 4, 5000, |p| p.lb.0.iter().any(|l| l.contains("runs here")));
    let line = p.lb.0.iter().find(|l| l.contains("runs here")).unwrap();
    assert!(line.starts_with("migrate: vm 1 (tiny) from 10.0.0.1:") && line.contains("post-copy:"), "{line}");
    // The source paused its copy at the start: nothing was sent before.
    assert!(p.ma.get(p.id).unwrap().paused);
    let s = p.ma.migration_status(p.id).unwrap().clone();
    assert_eq!((s.state, s.mode), ("postcopy", "postcopy"));
    assert_eq!(s.postcopy_pages, u64::from(RAM_MIB) * 256, "every page of RAM follows the resume");
    assert!(s.destination_may_run);
    // The guest there touches the last page of the region, far from the
    // push's cursor: missing, asked for, then there with its contents.
    let last = BASE + (PAGES - 1) * 4096;
    assert_eq!(state(&p.mb, 1, last), Some(PageState::NotLoaded));
    assert!(!guest_reads(&mut p.mb, 1, last), "a page not yet here is in transit");
    p.run_until(1000, 0, 200, |p| state(&p.mb, 1, last) == Some(PageState::Present));
    assert!(guest_reads(&mut p.mb, 1, last));
    assert_eq!(peek(&p.mb, 1, last), content(PAGES - 1, p.gens[PAGES as usize - 1]));
    let s = p.ma.migration_status(p.id).unwrap();
    assert!(s.demand_requests >= 1);
    if connections == 2 {
        assert!(s.demand_connection && s.demand_pages_sent >= 1, "the second connection carried it: {s:?}");
    } else {
        assert_eq!((s.demand_connection, s.demand_pages_sent), (false, 0), "{s:?}");
    }
    // It came ahead of the push: the pages after it are not here yet.
    assert_eq!(state(&p.mb, 1, last + 4096), Some(PageState::NotLoaded), "the touched page came ahead of the push");
    // The guest there writes that page: the push must not overwrite it.
    guest_write(&mut p.mb, 1, last, &content(PAGES - 1, 99));
    p.run_until(1000, 0, 20_000, |p| p.ma.migration.out.is_none());
    let done = p.la.0.iter().find(|l| l.starts_with("vm 1: migrated to")).unwrap_or_else(|| panic!("{:?}", p.la.0));
    assert!(done.contains("freed here") && done.contains("pages post-copy"), "{done}");
    let all = p.lb.0.iter().find(|l| l.contains("has all its memory")).unwrap_or_else(|| panic!("{:?}", p.lb.0));
    assert!(all.contains("1 asked for by a touch") || all.contains("asked for by a touch"), "{all}");
    let pc = p.ma.migration_status(p.id).unwrap().clone();
    assert_eq!((pc.state, pc.postcopy_pages_left), ("completed", 0));
    assert!(pc.switchover_ms.is_some_and(|s| s < pc.downtime_ms.unwrap()), "{pc:?}");
    assert!(p.ma.get(p.id).unwrap().res.is_none());
    assert!(p.ma.backend.as_ref().unwrap().free_frames() > free_before);
    // Every page there is as the source had it, but the one written there.
    assert_eq!(p.mb.get(1).unwrap().res.as_ref().unwrap().mem.state_counts().not_loaded, 0);
    assert!(p.mb.host_mem.postcopy.is_empty());
    for q in 0..PAGES - 1 {
        assert!(peek(&p.mb, 1, BASE + q * 4096) == content(q, p.gens[q as usize]), "page {q}");
    }
    assert_eq!(peek(&p.mb, 1, last), content(PAGES - 1, 99));
}

#[test]
fn hybrid_goes_postcopy_when_precopy_stops_converging() {
    let mut p = Pair::new();
    // The guest dirties more per round than the link sends: pre-copy alone
    // would throttle it; hybrid switches to post-copy instead.
    p.migrate(Options { mode: Mode::Hybrid, bandwidth_mib: Some(8), downtime_ms: 1, ..to_b() });
    p.run_until(1000, 24, 50_000, |p| p.ma.migration.out.is_none());
    let s = p.ma.migration_status(p.id).unwrap().clone();
    assert_eq!(s.state, "completed", "{:?} {:?}", p.la.0, p.lb.0);
    assert!(s.iteration >= 2 && s.postcopy_pages > 0, "{s:?}");
    assert!(s.postcopy_pages <= PAGES, "only the dirty set went post-copy, not all RAM: {s:?}");
    assert_eq!(s.throttle_pct, 0, "never throttled");
    // Every write the guest made on the source is there.
    p.check_region(&p.mb, 1);
}

/// Post-copy to B, slowed so it lasts, cut once B runs the VM and part of
/// its pages went over.
fn postcopy_then_cut() -> Pair {
    let mut p = Pair::new();
    p.migrate(Options { mode: Mode::Postcopy, bandwidth_mib: Some(2), ..to_b() });
    p.run_until(1000, 0, 5000, |p| p.lb.0.iter().any(|l| l.contains("runs here")));
    p.run_until(1000, 0, 5000, |p| p.ma.migration_status(p.id).is_some_and(|s| s.postcopy_pages_left < 1500));
    p.a.nic().drop_every = 1;
    p.b.nic().drop_every = 1;
    p
}

#[test]
fn a_postcopy_whose_link_breaks_waits_with_both_copies_paused_and_goes_on_when_it_comes_back() {
    let mut p = postcopy_then_cut();
    p.run_until(10_000, 0, 5000, |p| {
        p.ma.migration_status(p.id).is_some_and(|s| s.state == "reconnecting")
            && !p.mb.migration.incoming.as_ref().unwrap().orphans.is_empty()
    });
    let a = p.la.0.iter().find(|l| l.contains("lost its connection")).unwrap();
    assert!(a.contains("stays paused here") && a.contains("connecting again"), "{a}");
    let vm = p.ma.get(p.id).unwrap();
    assert!(vm.paused && vm.res.is_some(), "the source keeps its copy, paused");
    let b = p.lb.0.iter().find(|l| l.contains("broke")).unwrap();
    assert!(b.contains("post-copy of vm 1") && b.contains("is paused here"), "{b}");
    assert!(p.mb.get(1).unwrap().paused);
    let missing = p.mb.get(1).unwrap().res.as_ref().unwrap().mem.state_counts().not_loaded;
    assert!(missing > 0 && b.contains(&format!("{missing} of its pages")), "{b}");
    // Nothing moves while the link is down.
    for _ in 0..300 {
        p.round(10_000, 0);
    }
    assert_eq!(p.mb.get(1).unwrap().res.as_ref().unwrap().mem.state_counts().not_loaded, missing);
    // The link comes back: the source connects again, B says what it
    // lacks, runs the VM on, and the rest arrives.
    p.a.nic().drop_every = 0;
    p.b.nic().drop_every = 0;
    p.run_until(10_000, 0, 2000, |p| p.ma.migration_status(p.id).is_some_and(|s| s.recoveries == 1));
    // The bandwidth limit (2 MiB/s) counts from the reconnection: the
    // outage earned no burst.
    let before = p.ma.migration_status(p.id).unwrap().bytes_on_wire;
    for _ in 0..50 {
        p.round(10_000, 0);
    }
    let sent = p.ma.migration_status(p.id).unwrap().bytes_on_wire - before;
    assert!(sent <= (1 << 20) + (128 << 10), "{sent} bytes in 0.5 s at 2 MiB/s");
    p.run_until(10_000, 0, 20_000, |p| p.ma.migration.out.is_none());
    let s = p.ma.migration_status(p.id).unwrap().clone();
    assert_eq!((s.state, s.postcopy_pages_left), ("completed", 0), "{s:?} {:?} {:?}", p.la.0, p.lb.0);
    assert!(s.recoveries >= 1, "{s:?}");
    assert!(p.lb.0.iter().any(|l| l.contains("connected again: vm 1 runs on")), "{:?}", p.lb.0);
    // Its report covers both connections: time from the first, the cut
    // included.
    let all = p.lb.0.iter().find(|l| l.contains("has all its memory")).unwrap_or_else(|| panic!("{:?}", p.lb.0));
    let ms: u64 = all.split(" bytes in ").nth(1).and_then(|r| r.split(" ms").next()).unwrap().parse().unwrap();
    assert!(ms > 20_000, "{all}");
    let s = p.ma.migration_status(p.id).unwrap();
    assert!(s.rate_bytes_per_s > 0, "{s:?}");
    let dest = p.mb.get(1).unwrap();
    assert!(!dest.paused && dest.res.as_ref().unwrap().mem.state_counts().not_loaded == 0);
    p.check_region(&p.mb, 1);
    assert!(p.ma.get(p.id).unwrap().res.is_none(), "freed at the source after B had every page");
}

#[test]
fn a_postcopy_whose_link_never_comes_back_fails_with_both_copies_paused() {
    let mut p = postcopy_then_cut();
    p.run_until(100_000, 0, 10_000, |p| p.ma.migration.out.is_none());
    let a = p.la.0.last().unwrap();
    assert!(a.contains("failed during post-copy") && a.contains("stays paused here"), "{a}");
    let vm = p.ma.get(p.id).unwrap();
    assert!(vm.paused && vm.res.is_some());
    assert_eq!(p.ma.migration_status(p.id).unwrap().state, "failed");
    assert!(p.mb.get(1).unwrap().paused);
}

/// Post-copy to B until the VM runs there, nothing of its memory yet sent
/// (a slow link).
fn running_on_b_without_pages() -> Pair {
    let mut p = Pair::new();
    p.migrate(Options { mode: Mode::Postcopy, bandwidth_mib: Some(1), ..to_b() });
    p.run_until(1000, 0, 5000, |p| p.lb.0.iter().any(|l| l.contains("runs here")));
    p
}

fn exit_on_b(p: &mut Pair, exit: vcpu::VmExit) -> crate::vm::exit::Flow {
    let Manager { backend, vms, host_mem, .. } = &mut p.mb;
    let vm = vms.iter_mut().find(|v| v.id == 1).unwrap();
    vm.handle_exit(exit, backend.as_mut().unwrap(), host_mem, &mut crate::testing::Lines::default())
}

fn awaiting(p: &Pair) -> Option<u64> {
    p.mb.get(1).unwrap().res.as_ref().unwrap().vcpus[0].awaiting_page
}

#[test]
fn a_vcpu_that_touches_a_missing_page_waits_without_running_until_it_arrives() {
    let mut p = running_on_b_without_pages();
    let gpa = BASE + 300 * 4096;
    assert_eq!(state(&p.mb, 1, gpa), Some(PageState::NotLoaded));
    let flow = exit_on_b(&mut p, vcpu::VmExit::NestedPageFault { gpa, access: vcpu::MemAccess::Write, gva: None });
    assert_eq!(flow, crate::vm::exit::Flow::Yield, "the vCPU waits; the VM is not stopped");
    assert_eq!(awaiting(&p), Some(gpa >> 12));
    // The operator sees it (`vm stats`).
    let st = p.mb.postcopy_state(1).unwrap();
    assert!(st.from.starts_with("10.0.0.1:") && st.vcpus_waiting == 1 && st.missing > 0, "{st:?}");
    let (now, hz) = (p.mb.backend.as_ref().unwrap().now(), p.mb.backend.as_ref().unwrap().tsc_hz());
    let vm = p.mb.vms.iter_mut().find(|v| v.id == 1).unwrap();
    assert!(!vm.state.ended());
    assert_eq!(vm.pick_vcpu(now, hz), None, "a waiting vCPU costs no CPU");
    // Its page is asked for and comes ahead of the rest.
    p.run_until(1000, 0, 2000, |p| awaiting(p).is_none());
    assert_eq!(state(&p.mb, 1, gpa), Some(PageState::Present));
    assert!(p.ma.migration_status(p.id).unwrap().demand_requests >= 1);
    let vm = p.mb.vms.iter_mut().find(|v| v.id == 1).unwrap();
    assert_eq!(vm.pick_vcpu(now, hz), Some(0));
    assert_eq!(p.mb.postcopy_state(1).unwrap().vcpus_waiting, 0);
}

#[test]
fn a_vm_still_arriving_is_not_saved_or_migrated_on_until_it_has_all_its_memory() {
    let mut p = running_on_b_without_pages();
    let refused = p.mb.begin_save(1, false).map(|_| ()).unwrap_err();
    assert!(matches!(refused, crate::manager::Error::Arriving { id: 1, missing, .. } if missing > 0), "{refused:?}");
    let why = p.mb.start_migration(1, to_b(), &mut p.b.tcp(), p.now).unwrap_err();
    assert!(why.contains("still arriving by post-copy") && why.contains("pages to come from 10.0.0.1:"), "{why}");
    assert!(p.mb.migration_status(1).is_none(), "nothing started");
    p.run_until(10_000, 0, 5000, |p| p.lb.0.iter().any(|l| l.contains("has all its memory")));
    assert_eq!(p.mb.arriving_lock(1), Ok(()));
}

#[test]
fn an_emulated_instruction_whose_bytes_are_missing_waits_instead_of_faulting_the_guest() {
    let mut p = running_on_b_without_pages();
    // A device-register access (the local APIC's page): the instruction is
    // fetched from guest memory, which is not here yet.
    let rip = p.mb.get(1).unwrap().res.as_ref().unwrap().vcpus[0].vcpu.state.rip;
    let flow =
        exit_on_b(&mut p, vcpu::VmExit::NestedPageFault { gpa: 0xfee0_0080, access: vcpu::MemAccess::Read, gva: None });
    assert_eq!(flow, crate::vm::exit::Flow::Yield);
    let waiting = awaiting(&p).expect("waits for a page");
    assert_eq!(state(&p.mb, 1, waiting << 12), Some(PageState::NotLoaded));
    let vcpu = &p.mb.get(1).unwrap().res.as_ref().unwrap().vcpus[0].vcpu;
    assert_eq!(vcpu.state.rip, rip, "nothing was carried out");
    assert!(vcpu.injected.is_empty(), "no fault was raised in the guest");
    p.run_until(1000, 0, 2000, |p| awaiting(p).is_none());
    assert!(!p.mb.get(1).unwrap().state.ended());
}

#[test]
fn pages_asked_for_while_the_last_ones_are_in_flight_do_not_break_the_migration() {
    for connections in [1, 2] {
        let mut p = Pair::new();
        p.migrate(Options { mode: Mode::Postcopy, bandwidth_mib: Some(8), connections, ..to_b() });
        p.run_until(1000, 0, 5000, |p| p.lb.0.iter().any(|l| l.contains("runs here")));
        // Each round the guest there touches the last page still missing:
        // the push reaches it last, so requests keep coming until the end,
        // some for pages already on the wire.
        for _ in 0..20_000 {
            let last = {
                let res = p.mb.get(1).unwrap().res.as_ref().unwrap();
                (0..u64::from(RAM_MIB) * 256)
                    .rev()
                    .find(|&g| res.mem.page_state(GuestPhysAddr(g << 12)) == Some(PageState::NotLoaded))
            };
            if let Some(g) = last {
                guest_reads(&mut p.mb, 1, g << 12);
            }
            p.round(1000, 0);
            if p.ma.migration.out.is_none() {
                break;
            }
        }
        let s = p.ma.migration_status(p.id).unwrap();
        assert_eq!((s.state, s.recoveries), ("completed", 0), "{connections}: {s:?} {:?}", p.la.0);
        assert!(s.demand_requests > 10, "{s:?}");
    }
}

#[test]
fn a_source_that_connects_again_replaces_the_connection_the_destination_still_holds() {
    use crate::hostnet::tcp::{StreamState, Transport, parse_endpoint};
    let mut p = Pair::new();
    p.migrate(Options { mode: Mode::Postcopy, bandwidth_mib: Some(2), ..to_b() });
    p.run_until(1000, 0, 5000, |p| p.lb.0.iter().any(|l| l.contains("runs here")));
    // A connection from the source's host that says it recovers, while B
    // still holds the running one (as when B has not seen it break): B
    // takes the new one and breaks the old.
    let s = p.a.tcp().connect(parse_endpoint("10.0.0.2:7070").unwrap()).unwrap();
    for _ in 0..100 {
        if p.a.tcp().state(s) == StreamState::Open {
            break;
        }
        p.round(1000, 0);
    }
    assert_eq!(p.a.tcp().write(s, super::source::RECOVER.as_bytes()), Ok(super::source::RECOVER.len()));
    p.run_until(1000, 0, 100, |p| p.lb.0.iter().any(|l| l.contains("broke")));
    let broke = p.lb.0.iter().find(|l| l.contains("broke")).unwrap();
    assert!(broke.contains("the source connected again"), "{broke}");
    let mut answer = vec![0u8; 64];
    for _ in 0..100 {
        if p.a.tcp().read(s, &mut answer).is_ok_and(|n| n > 0) {
            break;
        }
        p.round(1000, 0);
    }
    assert!(answer.starts_with(super::source::MISSING.as_bytes()), "{answer:?}");
    p.a.tcp().abort(s);
    // The real source lost its connection (B refused it): it connects
    // again, replaces the impostor's the same way, and finishes.
    p.run_until(10_000, 0, 5000, |p| p.ma.migration.out.is_none());
    let st = p.ma.migration_status(p.id).unwrap().clone();
    assert_eq!(st.state, "completed", "{st:?} {:?} {:?}", p.la.0, p.lb.0);
    assert!(st.recoveries >= 1);
    p.check_region(&p.mb, 1);
    assert!(!p.mb.get(1).unwrap().paused);
}

/// The virtio console's register page on host `m`'s VM `id`.
fn console_base(m: &mut Manager<MockBackend>, id: u32) -> u64 {
    use crate::devices::virtio::mmio::reg;
    let Manager { backend, vms, host_mem, .. } = m;
    let vm = vms.iter_mut().find(|v| v.id == id).unwrap();
    vm.with_dma(backend.as_mut().unwrap(), host_mem, |d, _| {
        d.virtio_slots().iter().map(|s| u64::from(s.base)).find(|&b| d.mmio_read(b + reg::DEVICE_ID, 4, 0) == Some(3))
    })
    .flatten()
    .expect("every VM has a virtio console")
}

#[test]
fn a_virtio_notification_waits_until_the_rings_and_buffers_it_reaches_are_here() {
    use crate::devices::virtio::feature::VERSION_1;
    use crate::devices::virtio::mmio::{reg, status};
    // On A, the guest's driver brings its virtio console up, puts a line
    // in a transmit buffer and makes it available (rings at 0x20_0000,
    // the buffer at 0x30_0000), but the notification comes only once the
    // VM runs on B, where none of those pages is yet.
    let mut p = Pair::new();
    let base = console_base(&mut p.ma, 1);
    let regs = |p: &mut Pair, writes: &[(u64, u32)]| {
        let Manager { backend, vms, host_mem, .. } = &mut p.ma;
        let vm = vms.iter_mut().find(|v| v.id == 1).unwrap();
        vm.with_dma(backend.as_mut().unwrap(), host_mem, |d, mem| {
            for &(offset, v) in writes {
                assert!(d.virtio_write(base + offset, 4, v.into(), mem));
            }
        });
    };
    let (ring, buf, line) = (0x20_0000u64, 0x30_0000u64, b"hello from b\n");
    let driver = status::ACKNOWLEDGE | status::DRIVER;
    regs(
        &mut p,
        &[
            (reg::STATUS, driver),
            (reg::DRIVER_FEATURES_SEL, 1),
            (reg::DRIVER_FEATURES, (VERSION_1 >> 32) as u32),
            (reg::STATUS, driver | status::FEATURES_OK),
            (reg::QUEUE_SEL, 1),
            (reg::QUEUE_NUM, 8),
            (reg::QUEUE_DESC_LOW, ring as u32),
            (reg::QUEUE_DRIVER_LOW, (ring + 0x1000) as u32),
            (reg::QUEUE_DEVICE_LOW, (ring + 0x2000) as u32),
            (reg::QUEUE_READY, 1),
            (reg::STATUS, driver | status::FEATURES_OK | status::DRIVER_OK),
        ],
    );
    let mut desc = [0u8; 16];
    desc[..8].copy_from_slice(&buf.to_le_bytes());
    desc[8..12].copy_from_slice(&(line.len() as u32).to_le_bytes());
    guest_write(&mut p.ma, 1, ring, &desc);
    guest_write(&mut p.ma, 1, ring + 0x1000, &[0, 0, 1, 0, 0, 0]);
    guest_write(&mut p.ma, 1, buf, line);
    // The notification: `mov [rax], ecx` at RIP (identity-mapped).
    let rip = p.ma.get(1).unwrap().res.as_ref().unwrap().vcpus[0].vcpu.state.rip;
    guest_write(&mut p.ma, 1, rip, &[0x89, 0x08]);
    p.migrate(Options { mode: Mode::Postcopy, bandwidth_mib: Some(1), ..to_b() });
    p.run_until(1000, 0, 5000, |p| p.lb.0.iter().any(|l| l.contains("runs here")));
    for gpa in [ring, ring + 0x1000, buf] {
        assert_eq!(state(&p.mb, 1, gpa), Some(PageState::NotLoaded));
    }
    let notify = base + reg::QUEUE_NOTIFY;
    let mut waits = Vec::new();
    let mut lines = crate::testing::Lines::default();
    loop {
        assert!(waits.len() < 8, "still waiting after {waits:x?}");
        let Manager { backend, vms, host_mem, .. } = &mut p.mb;
        let vm = vms.iter_mut().find(|v| v.id == 1).unwrap();
        let v = &mut vm.res.as_mut().unwrap().vcpus[0].vcpu;
        (v.gprs.rax, v.gprs.rcx) = (notify, 1);
        let exit = vcpu::VmExit::NestedPageFault { gpa: notify, access: vcpu::MemAccess::Write, gva: Some(notify) };
        let flow = vm.handle_exit(exit, backend.as_mut().unwrap(), host_mem, &mut lines);
        let Some(gfn) = awaiting(&p) else {
            assert_eq!(flow, crate::vm::exit::Flow::Continue);
            break;
        };
        // Nothing carried out: RIP on the instruction, the used ring not
        // written.
        assert_eq!(p.mb.get(1).unwrap().res.as_ref().unwrap().vcpus[0].vcpu.state.rip, rip);
        waits.push(gfn << 12);
        p.run_until(1000, 0, 2000, |p| awaiting(p).is_none());
    }
    // It waited for the code, then for what the device reaches (the
    // rings, the buffer), each asked for ahead of the push; then the
    // device read the line and marked the chain used.
    assert!(waits.contains(&(rip & !0xfff)), "{waits:x?}");
    assert!(waits.iter().any(|&g| g == ring || g == ring + 0x1000 || g == ring + 0x2000 || g == buf), "{waits:x?}");
    assert!(lines.0.iter().any(|l| l.contains("hello from b")), "{:?}", lines.0);
    let used_idx = u16::from_le_bytes(peek(&p.mb, 1, ring + 0x2000)[2..4].try_into().unwrap());
    assert_eq!(used_idx, 1, "the chain was used once");
    assert_eq!(p.mb.get(1).unwrap().res.as_ref().unwrap().vcpus[0].vcpu.state.rip, rip + 2);
}
