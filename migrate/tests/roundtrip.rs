//! Writing a VM and reading it back gives exactly what was written.

mod common;

use common::*;
use migrate::{MemOp, PAGE_SIZE, PageKind, Reader, Record, Writer, verify};

#[test]
fn realistic_vm_round_trips() {
    let vm = realistic_vm();
    let (stream, written) = vm.write();

    let mut src = &stream[..];
    let mut reader = Reader::open(&mut src).unwrap();
    assert_eq!(reader.header(), &vm.header);
    let mut sink = ModelSink::default();
    let read = reader.apply(&mut sink).unwrap();
    drop(reader);
    assert!(src.is_empty());

    let expected = vm.expected();
    assert_eq!(sink.vm.vcpus, expected.vcpus);
    assert_eq!(sink.vm.devices, expected.devices);
    assert_eq!(sink.vm.large_runs, expected.large_runs);
    assert_eq!(sink.vm.pages.len(), expected.pages.len());
    for (gfn, page) in &expected.pages {
        assert_eq!(sink.vm.pages.get(gfn), Some(page), "page {gfn:#x}");
    }
    assert_eq!(sink.vm, expected);

    // The writer and the reader count alike, and every kind was used.
    assert_eq!(read, written);
    assert_eq!(read.bytes, stream.len() as u64);
    for kind in PageKind::ALL {
        assert!(read.pages(kind) > 0, "no {} pages in the realistic VM", kind.name());
    }
    assert_eq!(read.total_pages(), vm.memory.len() as u64);
    assert_eq!(read.large_runs, 1);
    assert_eq!((read.vcpus, read.devices), (4, 4));
    // Compression and zero flags paid: the stream is well under the raw size.
    assert!(stream.len() < vm.memory.len() * PAGE_SIZE * 3 / 4, "{} bytes", stream.len());

    let v = verify(&stream).unwrap();
    assert_eq!((v.header, v.stats), (vm.header.clone(), written));
}

#[test]
fn typed_records_come_in_stream_order() {
    let vm = realistic_vm();
    let (stream, _) = vm.write();
    let mut reader = Reader::open(&stream[..]).unwrap();
    let mut order = Vec::new();
    let mut first_pages = Vec::new();
    let mut last_offset = 0;
    while let Some((at, record)) = reader.next_record().unwrap() {
        assert!(at.offset > last_offset || at.record == 1);
        last_offset = at.offset;
        match record {
            Record::Vcpu { index, state } => {
                assert_eq!(*state, vm.vcpus[index as usize]);
                order.push(format!("vcpu{index}"));
            }
            Record::Device { name, .. } => order.push(name.to_string()),
            Record::Memory(mut m) => {
                order.push("memory".into());
                while let Some((at, op)) = m.next_entry().unwrap() {
                    assert_eq!(at.kind, Some(migrate::Kind::Memory));
                    if first_pages.is_empty() {
                        first_pages.push(format!("{op:?}"));
                    }
                }
            }
            Record::Resume => order.push("resume".into()),
            Record::Pending(runs) => order.push(format!("pending {}", runs.len())),
            Record::End(stats) => {
                order.push("end".into());
                assert_eq!(stats.records, at.record + 1);
            }
        }
    }
    order.dedup();
    assert_eq!(
        order,
        ["vcpu0", "vcpu1", "vcpu2", "vcpu3", "com1", "pit", "virtio-blk0", "debug-exit", "memory", "end"]
    );
    // Pages 0..3 are zero, so the first entry is a zero run of four.
    assert_eq!(first_pages, ["Zero { gfn: 0, pages: 4 }"]);
    assert!(reader.next_record().unwrap().is_none());
}

#[test]
fn entries_not_taken_are_still_checked() {
    let vm = realistic_vm();
    let (stream, written) = vm.write();
    let mut reader = Reader::open(&stream[..]).unwrap();
    // Skip every memory record's entries; the end record still agrees.
    let mut end = None;
    while let Some((_, record)) = reader.next_record().unwrap() {
        if let Record::End(stats) = record {
            end = Some(stats);
        }
    }
    assert_eq!(end, Some(written));
}

#[test]
fn live_stream_precopy_then_postcopy() {
    // Round 1 sends all of RAM while the VM runs, round 2 the dirty pages
    // again; vCPUs and devices at switch-over; then post-copy pages.
    let h = header(2, &[("com1", 1)], true);
    let mut w = Writer::begin(Vec::new(), &h).unwrap();
    for gfn in 0..64 {
        w.page(gfn, &text_page(gfn)).unwrap();
    }
    for gfn in [3, 9, 10] {
        w.page(gfn, &text_page(1000 + gfn)).unwrap();
    }
    w.page(11, &[0; PAGE_SIZE]).unwrap();
    w.vcpu(1, &vcpu_state(1)).unwrap();
    w.vcpu(0, &vcpu_state(0)).unwrap();
    w.device("com1", 1, b"uart").unwrap();
    w.resume().unwrap();
    w.page(100, &text_page(100)).unwrap();
    w.poisoned(101).unwrap();
    let (stream, _) = w.finish().unwrap();

    let mut sink = ModelSink::default();
    Reader::open(&stream[..]).unwrap().apply(&mut sink).unwrap();
    assert!(sink.vm.resumed);
    for gfn in 0..64u64 {
        let want = match gfn {
            3 | 9 | 10 => Page::Data(text_page(1000 + gfn).to_vec()),
            11 => Page::Zero,
            _ => Page::Data(text_page(gfn).to_vec()),
        };
        assert_eq!(sink.vm.pages[&gfn], want, "page {gfn}: the last copy wins");
    }
    assert_eq!(sink.vm.pages[&100], Page::Data(text_page(100).to_vec()));
    assert_eq!(sink.vm.pages[&101], Page::Poisoned);
    assert_eq!(sink.vm.vcpus.len(), 2);
}

#[test]
fn postcopy_pending_runs_come_before_the_resume_and_their_pages_after() {
    // Hybrid: a pre-copy round, then the pages dirtied since are listed as
    // pending (their old copies must not reach the guest) and follow the
    // resume record.
    let h = header(1, &[("com1", 1)], true);
    let mut w = Writer::begin(Vec::new(), &h).unwrap();
    for gfn in 0..16 {
        w.page(gfn, &text_page(gfn)).unwrap();
    }
    w.pending(&[(2, 3), (9, 1)]).unwrap();
    w.vcpu(0, &vcpu_state(0)).unwrap();
    w.device("com1", 1, b"uart").unwrap();
    w.resume().unwrap();
    for gfn in [2, 3, 4, 9] {
        w.page(gfn, &text_page(500 + gfn)).unwrap();
    }
    let (stream, written) = w.finish().unwrap();
    assert_eq!(written.pending_pages, 4);

    let mut sink = ModelSink::default();
    let read = Reader::open(&stream[..]).unwrap().apply(&mut sink).unwrap();
    assert_eq!(read, written);
    assert_eq!(sink.vm.pending, vec![(2, 3), (9, 1)]);
    assert_eq!(sink.vm.pages[&3], Page::Data(text_page(503).to_vec()));
}

#[test]
fn pending_runs_are_refused_outside_a_live_stream_after_the_resume_and_outside_ram() {
    let h = header(1, &[], false);
    let mut w = Writer::begin(Vec::new(), &h).unwrap();
    let e = w.pending(&[(0, 1)]).unwrap_err();
    assert!(format!("{e}").contains("pending pages in a stream that is not live"), "{e}");

    let h = header(1, &[], true);
    let mut w = Writer::begin(Vec::new(), &h).unwrap();
    let e = w.pending(&[(0, 0)]).unwrap_err();
    assert!(format!("{e}").contains("empty pending run"), "{e}");
    let mut w = Writer::begin(Vec::new(), &h).unwrap();
    assert!(matches!(w.pending(&[(u64::MAX - 1, 4)]), Err(migrate::Error::OutsideRam { .. })));
    let mut w = Writer::begin(Vec::new(), &h).unwrap();
    w.vcpu(0, &vcpu_state(0)).unwrap();
    w.resume().unwrap();
    let e = w.pending(&[(0, 1)]).unwrap_err();
    assert!(format!("{e}").contains("pending pages after the resume record"), "{e}");

    // A forged pending record after the resume, with valid checksums, is
    // refused by the reader too.
    let mut w = Writer::begin(Vec::new(), &h).unwrap();
    w.pending(&[(1, 2)]).unwrap();
    w.vcpu(0, &vcpu_state(0)).unwrap();
    w.resume().unwrap();
    let (stream, _) = w.finish().unwrap();
    let (pro, mut recs) = unforge(&stream);
    let pending = recs.remove(1);
    recs.insert(3, pending);
    let forged = forge(&pro, &recs);
    let e = verify(&forged).unwrap_err();
    assert!(format!("{e}").contains("pending pages after the resume record"), "{e}");
}

#[test]
fn compressed_blocks_hold_neighbours_only() {
    // Pages 0, 1, 2 and 5: two blocks (0-2 and 5), never one spanning the gap.
    let h = header(1, &[], false);
    let mut w = Writer::begin(Vec::new(), &h).unwrap();
    w.vcpu(0, &vcpu_state(0)).unwrap();
    for gfn in [0, 1, 2, 5] {
        w.page(gfn, &text_page(gfn)).unwrap();
    }
    let (stream, stats) = w.finish().unwrap();
    assert_eq!(stats.pages(PageKind::Compressed), 4);
    let mut reader = Reader::open(&stream[..]).unwrap();
    let mut spans = Vec::new();
    while let Some((_, record)) = reader.next_record().unwrap() {
        if let Record::Memory(mut m) = record {
            while let Some((_, op)) = m.next_entry().unwrap() {
                spans.push(op.span());
                if let MemOp::Pages { gfn, data } = op {
                    for (i, p) in data.chunks(PAGE_SIZE).enumerate() {
                        assert_eq!(p, text_page(gfn + i as u64));
                    }
                }
            }
        }
    }
    assert_eq!(spans, [(0, 3), (5, 1)]);
}

#[test]
fn random_pages_travel_plain() {
    let h = header(1, &[], false);
    let mut w = Writer::begin(Vec::new(), &h).unwrap();
    w.vcpu(0, &vcpu_state(0)).unwrap();
    let mut rng = Rng(1);
    for gfn in 0..40 {
        w.page(gfn, &random_page(&mut rng)).unwrap();
    }
    let (stream, stats) = w.finish().unwrap();
    assert_eq!(stats.pages(PageKind::Normal), 40);
    assert_eq!(stats.pages(PageKind::Compressed), 0);
    verify(&stream).unwrap();
}

#[test]
fn a_one_gib_run_is_accepted_and_zero_pages_stay_flags() {
    let h = migrate::Header { ram: vec![migrate::RamRange { base: 0, size: 2 << 30 }], ..header(1, &[], false) };
    let mut w = Writer::begin(Vec::new(), &h).unwrap();
    w.vcpu(0, &vcpu_state(0)).unwrap();
    let first = 262_144;
    w.large_run(first, 262_144).unwrap();
    let zero = [0u8; PAGE_SIZE];
    for gfn in first..first + 262_144 {
        if gfn == first + 5 {
            w.page(gfn, &text_page(5)).unwrap();
        } else {
            w.page(gfn, &zero).unwrap();
        }
    }
    let (stream, stats) = w.finish().unwrap();
    assert_eq!(stats.pages(PageKind::Zero), 262_143);
    // Two zero runs around the one page: 26 bytes for the zeros of 1 GiB.
    assert_eq!(stats.page_bytes(PageKind::Zero), 26);
    let mut sink = ModelSink::default();
    Reader::open(&stream[..]).unwrap().apply(&mut sink).unwrap();
    assert_eq!(sink.vm.large_runs, [(first, 262_144)]);
    assert_eq!(sink.vm.pages.len(), 262_144);
}

#[test]
fn flush_sends_the_held_back_pages_as_a_record_of_their_own() {
    let h = header(1, &[], true);
    let mut w = Writer::begin(Vec::new(), &h).unwrap();
    w.page(5, &text_page(5)).unwrap();
    let before = w.sink_mut().len();
    w.flush().unwrap();
    assert!(w.sink_mut().len() > before, "the page went out with the flush");
    w.flush().unwrap();
    w.page(6, &text_page(6)).unwrap();
    w.vcpu(0, &vcpu_state(0)).unwrap();
    let (stream, _) = w.finish().unwrap();
    let mut sink = ModelSink::default();
    Reader::open(&stream[..]).unwrap().apply(&mut sink).unwrap();
    assert_eq!(sink.vm.pages[&5], Page::Data(text_page(5).to_vec()));
    assert_eq!(sink.vm.pages[&6], Page::Data(text_page(6).to_vec()));
    // Configuration, two memory records (an empty flush sends none), the
    // vCPU, the end.
    assert_eq!(records(&stream).len(), 5);
}
