//! Damaged, truncated, reordered, forged and wrong-version streams are
//! refused with the error that names what and where.

mod common;

use common::*;
use migrate::{ApplyError, Error, Kind, PAGE_SIZE, Reader, Writer, verify};

/// A small stream with every record and entry kind: 2 vCPUs, a device,
/// zero, compressed, plain, shared, shared-ref and poisoned pages, and a
/// large-page run.
fn small_stream() -> Vec<u8> {
    let h = header(2, &[("com1", 1)], false);
    let mut w = Writer::begin(Vec::new(), &h).unwrap();
    w.vcpu(0, &vcpu_state(0)).unwrap();
    w.vcpu(1, &vcpu_state(1)).unwrap();
    w.device("com1", 1, b"uart state").unwrap();
    w.page(0, &[0; PAGE_SIZE]).unwrap();
    w.page(1, &text_page(1)).unwrap();
    w.page(2, &text_page(2)).unwrap();
    let mut rng = Rng(3);
    w.page(8, &random_page(&mut rng)).unwrap();
    w.shared_page(4, 77, &almost_zero_page(9)).unwrap();
    w.shared_page(5, 77, &almost_zero_page(9)).unwrap();
    w.poisoned(6).unwrap();
    w.large_run(512, 512).unwrap();
    for gfn in 512..1024 {
        let page = if gfn == 600 { almost_zero_page(1) } else { [0; PAGE_SIZE] };
        w.page(gfn, &page).unwrap();
    }
    w.finish().unwrap().0
}

fn record_of(stream: &[u8], offset: usize) -> (u32, usize, usize) {
    let recs = records(stream);
    let i = recs.iter().position(|&(a, b)| offset >= a && offset < b).unwrap();
    (i as u32, recs[i].0, recs[i].1)
}

#[test]
fn the_small_stream_is_valid_and_has_every_kind() {
    let s = small_stream();
    let v = verify(&s).unwrap();
    for kind in migrate::PageKind::ALL {
        assert!(v.stats.pages(kind) > 0, "{}", kind.name());
    }
    assert_eq!(v.stats.large_runs, 1);
}

#[test]
fn every_single_byte_flip_is_refused_naming_the_record() {
    let s = small_stream();
    for offset in 0..s.len() {
        for mask in [0x01u8, 0x80, 0xff] {
            let mut bad = s.clone();
            bad[offset] ^= mask;
            let e = verify(&bad).expect_err(&format!("flip {mask:#x} at byte {offset} accepted"));
            if offset < 8 {
                assert_eq!(e, Error::BadMagic, "byte {offset}");
                continue;
            }
            if offset < 20 {
                assert_eq!(e, Error::PrologueChecksum, "byte {offset}");
                continue;
            }
            let (record, start, _) = record_of(&s, offset);
            let at = match e {
                Error::FrameChecksum { at } => {
                    assert!(offset < start + 16, "byte {offset}: {e}");
                    at
                }
                Error::Checksum { at } => {
                    assert!(offset >= start + 16, "byte {offset}: {e}");
                    at
                }
                e => panic!("byte {offset}: {e}"),
            };
            assert_eq!((at.record, at.offset), (record, start as u64), "byte {offset}");
        }
    }
}

#[test]
fn every_truncation_is_refused() {
    let s = small_stream();
    let recs = records(&s);
    for len in 0..s.len() {
        let e = verify(&s[..len]).expect_err(&format!("cut at {len} accepted"));
        let Error::Truncated { at, part } = e else { panic!("cut at {len}: {e}") };
        if len < 20 {
            assert_eq!((at.record, part), (0, "prologue"));
            continue;
        }
        // The record the cut falls in (or the next one, cut at its start).
        let i = recs.iter().position(|&(a, b)| len >= a && len < b).unwrap();
        assert_eq!(at.record, i as u32, "cut at {len}");
        assert_eq!(at.offset, recs[i].0 as u64);
        let want = if len < recs[i].0 + 16 {
            "frame header"
        } else if len < recs[i].1 - 4 {
            "payload"
        } else {
            "payload checksum"
        };
        assert_eq!(part, want, "cut at {len}");
    }
    // A stream cut exactly before its end record is refused too.
    let last = recs.last().unwrap().0;
    assert!(matches!(verify(&s[..last]), Err(Error::Truncated { part: "frame header", .. })));
}

#[test]
fn trailing_bytes_are_refused() {
    let mut s = small_stream();
    let len = s.len();
    s.push(0);
    assert_eq!(verify(&s), Err(Error::TrailingBytes { offset: len as u64 }));
}

#[test]
fn swapped_or_dropped_records_are_out_of_sequence() {
    let s = small_stream();
    let recs = records(&s);
    // Swap records 2 and 3 (both vCPUs... or whatever is there): record 2's
    // place holds record 3.
    let mut swapped = s[..recs[2].0].to_vec();
    swapped.extend_from_slice(&s[recs[3].0..recs[3].1]);
    swapped.extend_from_slice(&s[recs[2].0..recs[2].1]);
    swapped.extend_from_slice(&s[recs[3].1..]);
    let e = verify(&swapped).unwrap_err();
    assert!(matches!(e, Error::Sequence { at, found: 3 } if at.record == 2), "{e}");

    // Drop record 4.
    let mut dropped = s[..recs[4].0].to_vec();
    dropped.extend_from_slice(&s[recs[4].1..]);
    let e = verify(&dropped).unwrap_err();
    assert!(matches!(e, Error::Sequence { at, found: 5 } if at.record == 4), "{e}");

    // Repeat record 1.
    let mut repeated = s[..recs[2].0].to_vec();
    repeated.extend_from_slice(&s[recs[1].0..recs[1].1]);
    repeated.extend_from_slice(&s[recs[2].0..]);
    let e = verify(&repeated).unwrap_err();
    assert!(matches!(e, Error::Sequence { at, found: 1 } if at.record == 2), "{e}");
}

/// Index of the first record of `kind` in a forged record list.
fn find(recs: &[Rec], kind: Kind) -> usize {
    recs.iter().position(|r| r.0 == kind.code()).unwrap()
}

#[test]
fn forged_streams_in_the_wrong_order_are_refused() {
    let s = small_stream();
    let (pro, recs) = unforge(&s);
    // The forger itself is right: the unchanged list verifies.
    verify(&forge(&pro, &recs)).unwrap();

    // Memory before the configuration.
    let mut r = recs.clone();
    let m = r.remove(find(&recs, Kind::Memory));
    r.insert(0, m);
    let e = verify(&forge(&pro, &r)).unwrap_err();
    assert!(matches!(e, Error::Order { at, .. } if at.record == 0 && at.kind == Some(Kind::Memory)), "{e}");

    // A second configuration.
    let mut r = recs.clone();
    r.insert(2, recs[0].clone());
    let e = verify(&forge(&pro, &r)).unwrap_err();
    assert!(matches!(e, Error::Order { at, why: "a second configuration" } if at.record == 2), "{e}");

    // The same vCPU twice.
    let mut r = recs.clone();
    let v = find(&recs, Kind::Vcpu);
    r.insert(v + 1, recs[v].clone());
    let e = verify(&forge(&pro, &r)).unwrap_err();
    assert!(matches!(e, Error::DuplicateVcpu { at, index: 0 } if at.record == v as u32 + 1), "{e}");

    // The same device twice.
    let mut r = recs.clone();
    let d = find(&recs, Kind::Device);
    r.insert(d, recs[d].clone());
    let e = verify(&forge(&pro, &r)).unwrap_err();
    assert!(matches!(&e, Error::DuplicateDevice { name, .. } if name == "com1"), "{e}");

    // A vCPU missing: refused at the end record.
    let mut r = recs.clone();
    r.remove(v + 1);
    let e = verify(&forge(&pro, &r)).unwrap_err();
    assert!(matches!(e, Error::MissingVcpu { at, index: 1 } if at.kind == Some(Kind::End)), "{e}");

    // A device missing.
    let mut r = recs.clone();
    r.remove(d);
    let e = verify(&forge(&pro, &r)).unwrap_err();
    assert!(matches!(&e, Error::MissingDevice { name, .. } if name == "com1"), "{e}");

    // A resume record in a checkpoint (not live) stream.
    let mut r = recs.clone();
    r.insert(d + 1, (Kind::Resume.code(), 1, vec![]));
    let e = verify(&forge(&pro, &r)).unwrap_err();
    assert!(matches!(e, Error::Order { at, .. } if at.kind == Some(Kind::Resume)), "{e}");

    // A vCPU record between a large-page run's pages: split the memory
    // record holding the run marker right after the marker.
    let mut r = recs.clone();
    let mi = r.iter().rposition(|x| x.0 == Kind::Memory.code()).unwrap();
    let payload = r[mi].2.clone();
    let marker = payload.windows(9).position(|w| w[0] == 7 && w[1..9] == 512u64.to_le_bytes()).unwrap();
    let (head, tail) = payload.split_at(marker + 13);
    r[mi].2 = head.to_vec();
    r.insert(mi + 1, (Kind::Memory.code(), 1, tail.to_vec()));
    verify(&forge(&pro, &r)).unwrap();
    r.insert(mi + 1, recs[v].clone());
    let e = verify(&forge(&pro, &r)).unwrap_err();
    assert!(matches!(e, Error::Order { why: "large-page run left unfinished", .. }), "{e}");
}

#[test]
fn a_record_from_another_stream_is_caught_by_the_end_digest() {
    let a = small_stream();
    let h = header(2, &[("com1", 1)], false);
    let mut w = Writer::begin(Vec::new(), &h).unwrap();
    w.vcpu(0, &vcpu_state(5)).unwrap();
    let b = w.finish_err_free();
    // Record 1 of `b` has the same number and kind as record 1 of `a` and
    // valid checksums: only the end record's digest can tell.
    let (ra, rb) = (records(&a), records(&b));
    let mut spliced = a[..ra[1].0].to_vec();
    spliced.extend_from_slice(&b[rb[1].0..rb[1].1]);
    spliced.extend_from_slice(&a[ra[1].1..]);
    let bytes_differ = ra[1].1 - ra[1].0 != rb[1].1 - rb[1].0;
    let e = verify(&spliced).unwrap_err();
    let want = if bytes_differ { "byte count" } else { "digest of the records" };
    assert!(matches!(e, Error::EndMismatch { what, .. } if what == want), "{e}");
}

trait FinishPartial {
    fn finish_err_free(self) -> Vec<u8>;
}

impl FinishPartial for Writer<Vec<u8>> {
    /// The bytes so far, without an end record (vCPU 1 never came).
    fn finish_err_free(self) -> Vec<u8> {
        let mut w = self;
        w.vcpu(1, &vcpu_state(6)).unwrap();
        w.device("com1", 1, b"other uart").unwrap();
        w.finish().unwrap().0
    }
}

#[test]
fn a_forged_end_record_is_checked() {
    let s = small_stream();
    let (pro, recs) = unforge(&s);
    let good = forge(&pro, &recs);
    let rl = records(&good);
    let end_at = rl.last().unwrap().0;
    let (_, _, seq, payload) = parts(&good[end_at..]);
    for (field, what) in [(0, "record count"), (4, "digest of the records"), (8, "byte count")] {
        let mut p = payload.clone();
        p[field] ^= 1;
        let mut bad = good[..end_at].to_vec();
        bad.extend_from_slice(&frame(0x0f, 1, seq, &p));
        let e = verify(&bad).unwrap_err();
        assert!(matches!(e, Error::EndMismatch { what: w, .. } if w == what), "{e}");
    }
}

#[test]
fn wrong_magic_version_and_flags() {
    let s = small_stream();
    let body = &s[20..];
    let with = |p: Vec<u8>| [p, body.to_vec()].concat();

    let mut bad = s.clone();
    bad[..8].copy_from_slice(b"NOTASTRM");
    assert_eq!(verify(&bad), Err(Error::BadMagic));
    assert_eq!(
        verify(b"HV"),
        Err(Error::Truncated { at: migrate::At { record: 0, offset: 0, kind: None }, part: "prologue" })
    );

    assert_eq!(verify(&with(prologue(2, 0, 0))), Err(Error::Version { major: 2, minor: 0 }));
    assert_eq!(verify(&with(prologue(0, 9, 0))), Err(Error::Version { major: 0, minor: 9 }));
    // A newer minor version of this major one reads (it may only add
    // optional records).
    verify(&with(prologue(1, 7, 0))).unwrap();
    // Required flags this reader does not know: refused; informational
    // ones (16-31): ignored.
    assert_eq!(verify(&with(prologue(1, 0, 1 << 3))), Err(Error::UnknownFlags { flags: 1 << 3 }));
    verify(&with(prologue(1, 0, 1 << 20))).unwrap();

    // This writer writes 1.1 (post-copy's pending record); 1.0 streams
    // (every checkpoint saved before) still read.
    assert_eq!(prologue(1, 1, 0), s[..20]);
    verify(&with(prologue(1, 0, 0))).unwrap();
}

#[test]
fn wrong_record_and_state_versions() {
    let s = small_stream();
    let (pro, recs) = unforge(&s);
    let v = find(&recs, Kind::Vcpu);

    let mut r = recs.clone();
    r[v].1 = 2;
    let e = verify(&forge(&pro, &r)).unwrap_err();
    assert!(matches!(e, Error::RecordVersion { at, version: 2 } if at.record == v as u32), "{e}");

    let mut r = recs.clone();
    r[v].2[4..6].copy_from_slice(&9u16.to_le_bytes());
    let e = verify(&forge(&pro, &r)).unwrap_err();
    assert!(matches!(e, Error::VcpuVersion { index: 0, version: 9, .. }), "{e}");

    // A vCPU state that does not decode, or has bytes left over.
    let mut r = recs.clone();
    let n = r[v].2.len();
    r[v].2.truncate(n - 3);
    assert!(matches!(verify(&forge(&pro, &r)), Err(Error::VcpuState { index: 0, .. })));
    let mut r = recs.clone();
    r[v].2.push(0);
    assert!(matches!(verify(&forge(&pro, &r)), Err(Error::VcpuState { index: 0, .. })));

    // A vCPU state format other than the neutral one.
    let mut r = recs.clone();
    r[0].2[0] = 2;
    let e = verify(&forge(&pro, &r)).unwrap_err();
    assert!(matches!(e, Error::CpuFormat { format: 2, .. }), "{e}");

    // The configuration's device version disagrees with the device record.
    let d = find(&recs, Kind::Device);
    let mut r = recs.clone();
    let n = r[d].2.len();
    let name_len = usize::from(r[d].2[0]);
    r[d].2[1 + name_len] = 4;
    assert_eq!(n, r[d].2.len());
    let e = verify(&forge(&pro, &r)).unwrap_err();
    assert!(matches!(&e, Error::DeviceVersion { found: 4, expected: 1, .. }), "{e}");
}

#[test]
fn unknown_record_kinds() {
    let s = small_stream();
    let (pro, recs) = unforge(&s);
    // Optional (bit 7): skipped.
    let mut r = recs.clone();
    r.insert(2, (0x90, 1, b"from the future".to_vec()));
    let v = verify(&forge(&pro, &r)).unwrap();
    assert_eq!(v.stats.records as usize, recs.len() + 2);
    // Mandatory: refused.
    let mut r = recs.clone();
    r.insert(2, (0x10, 1, vec![]));
    let e = verify(&forge(&pro, &r)).unwrap_err();
    assert!(matches!(e, Error::UnknownKind { at, code: 0x10 } if at.record == 2), "{e}");
}

#[test]
fn malformed_memory_entries() {
    let s = small_stream();
    let (pro, recs) = unforge(&s);
    let m = find(&recs, Kind::Memory);
    let with_mem = |payload: Vec<u8>| {
        let mut r = recs.clone();
        r.insert(m, (Kind::Memory.code(), 1, payload));
        verify(&forge(&pro, &r))
    };
    let entry = |tag: u8, gfn: u64, rest: &[u8]| [&[tag][..], &gfn.to_le_bytes(), rest].concat();

    // Outside RAM (in the MMIO hole), and wrapping past 2^64.
    let e = with_mem(entry(6, 0x8_0000, &[])).unwrap_err();
    assert!(matches!(e, Error::OutsideRam { gfn: 0x8_0000, pages: 1, .. }), "{e}");
    let e = with_mem(entry(2, u64::MAX, &2u32.to_le_bytes())).unwrap_err();
    assert!(matches!(e, Error::OutsideRam { .. }), "{e}");
    // A zero run spilling from one RAM range into the hole.
    let e = with_mem(entry(2, 2047, &2u32.to_le_bytes())).unwrap_err();
    assert!(matches!(e, Error::OutsideRam { gfn: 2047, pages: 2, .. }), "{e}");
    // Unknown tag; entry cut short; empty zero run.
    assert!(matches!(with_mem(entry(9, 0, &[])), Err(Error::Malformed { why: "unknown memory entry tag", .. })));
    assert!(matches!(with_mem(entry(1, 0, &[0; 100])), Err(Error::Malformed { why: "memory entry cut short", .. })));
    assert!(matches!(with_mem(entry(2, 0, &0u32.to_le_bytes())), Err(Error::Malformed { .. })));
    // A reference to a shared content never sent.
    let e = with_mem(entry(5, 0, &0u32.to_le_bytes())).unwrap_err();
    assert!(matches!(e, Error::Malformed { why: "reference to a shared content not yet sent", .. }), "{e}");
    // LZ4: too many pages; a block that expands past what it claims; one
    // that falls short.
    let lz4 = |pages: u8, raw: &[u8]| {
        let c = lz4_flex::block::compress(raw);
        let mut rest = vec![pages];
        rest.extend_from_slice(&(c.len() as u32).to_le_bytes());
        rest.extend_from_slice(&c);
        entry(3, 0, &rest)
    };
    assert!(matches!(with_mem(lz4(17, &[0; 17 * PAGE_SIZE])), Err(Error::Malformed { .. })));
    assert!(matches!(with_mem(lz4(2, &[0; 3 * PAGE_SIZE])), Err(Error::Malformed { .. })));
    assert!(matches!(with_mem(lz4(2, &[0; PAGE_SIZE])), Err(Error::Malformed { .. })));
    with_mem(lz4(2, &[0; 2 * PAGE_SIZE])).unwrap();
    // Large runs: unknown size, misaligned, nested, filled out of order.
    let large = |gfn: u64, pages: u32| entry(7, gfn, &pages.to_le_bytes());
    assert!(matches!(with_mem(large(0, 256)), Err(Error::Malformed { .. })));
    assert!(matches!(with_mem(large(1, 512)), Err(Error::Malformed { .. })));
    let e = with_mem([large(0, 512), large(0, 512)].concat()).unwrap_err();
    assert!(matches!(e, Error::Order { why: "large-page run inside another", .. }), "{e}");
    let e = with_mem([large(0, 512), entry(2, 1, &511u32.to_le_bytes())].concat()).unwrap_err();
    assert!(matches!(e, Error::Order { why: "large-page run filled out of order", .. }), "{e}");
    let e = with_mem([large(0, 512), entry(2, 0, &513u32.to_le_bytes())].concat()).unwrap_err();
    assert!(matches!(e, Error::Order { .. }), "{e}");
    with_mem([large(0, 512), entry(2, 0, &512u32.to_le_bytes())].concat()).unwrap();
    // The error names the entry's byte offset: record start + 16 + 13.
    let e = with_mem([entry(2, 0, &1u32.to_le_bytes()), entry(6, 0x8_0000, &[])].concat()).unwrap_err();
    let Error::OutsideRam { at, .. } = e else { panic!("{e}") };
    let rs = records(&forge(&pro, &{
        let mut r = recs.clone();
        r.insert(m, (4, 1, vec![]));
        r
    }));
    assert_eq!(at.offset, rs[m].0 as u64 + 16 + 13);
}

#[test]
fn hostile_configurations() {
    let s = small_stream();
    let (pro, recs) = unforge(&s);
    let config = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut r = recs.clone();
        f(&mut r[0].2);
        verify(&forge(&pro, &r))
    };
    // Counts far past the limits are refused before anything is reserved.
    assert!(matches!(config(&|c| c[8..10].copy_from_slice(&u16::MAX.to_le_bytes())), Err(Error::Malformed { .. })));
    assert!(matches!(config(&|c| c[10..12].copy_from_slice(&u16::MAX.to_le_bytes())), Err(Error::Malformed { .. })));
    assert!(matches!(config(&|c| c[4..8].copy_from_slice(&u32::MAX.to_le_bytes())), Err(Error::Malformed { .. })));
    assert!(matches!(config(&|c| c[4..8].copy_from_slice(&0u32.to_le_bytes())), Err(Error::Malformed { .. })));
    // A RAM range past the physical address limit, or overlapping.
    assert!(matches!(
        config(&|c| c[12..20].copy_from_slice(&(1u64 << 60).to_le_bytes())),
        Err(Error::Malformed { .. })
    ));
    assert!(matches!(config(&|c| c[28..36].copy_from_slice(&0u64.to_le_bytes())), Err(Error::Malformed { .. })));
    // Trailing bytes.
    assert!(matches!(config(&|c| c.push(0)), Err(Error::Malformed { why: "bytes after the device list", .. })));
    // The source vendor is information: any value reads.
    config(&|c| c[2] = 0xee).unwrap();
}

#[test]
fn a_sink_refusal_names_the_record() {
    let s = small_stream();
    let mut sink = ModelSink { refuse_device: Some("com1".into()), ..Default::default() };
    let e = Reader::open(&s[..]).unwrap().apply(&mut sink).unwrap_err();
    let ApplyError::Sink { at, error } = &e else { panic!("{e}") };
    assert_eq!((at.record, at.kind), (3, Some(Kind::Device)));
    assert_eq!(error, "device com1 refused its state");
    assert_eq!(
        e.to_string(),
        format!("device com1 refused its state (applying record 3 (device) at byte {})", at.offset)
    );
}

#[test]
fn errors_read_as_one_line_naming_record_kind_and_offset() {
    let s = small_stream();
    let recs = records(&s);
    let mut bad = s.clone();
    bad[recs[1].0 + 40] ^= 4;
    let e = verify(&bad).unwrap_err();
    assert_eq!(e.to_string(), format!("Payload checksum mismatch in record 1 (vCPU) at byte {}", recs[1].0));
    // A reader that failed stays failed.
    let mut r = Reader::open(&bad[..]).unwrap();
    assert!(r.next_record().is_err());
    assert_eq!(r.next_record().unwrap_err(), Error::UsedAfterError);
}

#[test]
fn the_writer_refuses_what_a_reader_would() {
    let h = header(2, &[("com1", 1)], false);
    let begin = || Writer::begin(Vec::new(), &h).unwrap();
    let zero = [0u8; PAGE_SIZE];

    let mut w = begin();
    assert!(matches!(w.page(0x8_0000, &zero), Err(Error::OutsideRam { .. })));
    // Any error ends the stream.
    assert_eq!(w.page(0, &zero), Err(Error::UsedAfterError));

    let mut w = begin();
    assert!(matches!(w.vcpu(2, &vcpu_state(0)), Err(Error::VcpuIndex { index: 2, count: 2, .. })));
    let mut w = begin();
    w.vcpu(1, &vcpu_state(1)).unwrap();
    assert!(matches!(w.vcpu(1, &vcpu_state(1)), Err(Error::DuplicateVcpu { index: 1, .. })));
    let mut w = begin();
    assert!(matches!(w.device("com2", 1, b""), Err(Error::UnknownDevice { .. })));
    let mut w = begin();
    assert!(matches!(w.device("com1", 2, b""), Err(Error::DeviceVersion { .. })));
    let mut w = begin();
    assert!(matches!(w.device("com1", 1, &vec![0; 2 << 20]), Err(Error::TooLong { .. })));
    let mut w = begin();
    assert!(matches!(w.large_run(3, 512), Err(Error::Malformed { .. })));
    let mut w = begin();
    w.large_run(512, 512).unwrap();
    assert!(matches!(w.page(513, &zero), Err(Error::Order { .. })));
    let mut w = begin();
    w.large_run(512, 512).unwrap();
    w.page(512, &zero).unwrap();
    assert!(matches!(w.vcpu(0, &vcpu_state(0)), Err(Error::Order { .. })));
    let mut w = begin();
    w.vcpu(0, &vcpu_state(0)).unwrap();
    assert!(matches!(w.finish(), Err(Error::MissingVcpu { index: 1, .. })));
    let mut w = begin();
    assert!(matches!(w.resume(), Err(Error::Order { .. })));

    let bad = migrate::Header { vcpus: 0, ..h.clone() };
    assert!(matches!(Writer::begin(Vec::new(), &bad), Err(Error::Malformed { .. })));
    let bad = migrate::Header { ram: vec![migrate::RamRange { base: 100, size: 4096 }], ..h.clone() };
    assert!(matches!(Writer::begin(Vec::new(), &bad), Err(Error::Malformed { .. })));
}

#[test]
fn a_failing_sink_is_reported_with_its_offset() {
    struct Full(usize);
    impl migrate::Sink for Full {
        fn write(&mut self, bytes: &[u8]) -> Result<(), migrate::IoError> {
            if bytes.len() > self.0 {
                return Err(migrate::IoError("disk full"));
            }
            self.0 -= bytes.len();
            Ok(())
        }
    }
    let h = header(1, &[], false);
    let mut w = Writer::begin(Full(200), &h).unwrap();
    let e = w.vcpu(0, &vcpu_state(0)).unwrap_err();
    assert!(matches!(e, Error::Io { error: migrate::IoError("disk full"), .. }), "{e}");
}

/// A stream arriving in pieces (a migration's connection): `record_len`
/// says when a whole record is there, `apply_next` applies one record at
/// a time and ends where `apply` ends; a damaged frame header has no
/// length, so a receiver hands it on at once and the reader refuses it.
#[test]
fn records_applied_one_at_a_time_as_they_arrive() {
    use migrate::{Discard, FRAME_LEN, PROLOGUE_LEN, record_len};
    let s = small_stream();
    let whole = verify(&s).unwrap().stats;
    // Walk the records by their lengths: they end exactly at the stream's end.
    let (mut at, mut records) = (PROLOGUE_LEN, 0);
    while at < s.len() {
        at += record_len(s[at..at + FRAME_LEN].try_into().unwrap()).unwrap();
        records += 1;
    }
    assert_eq!((at, records), (s.len(), whole.records));
    let mut src = &s[..];
    let mut r = Reader::open(&mut src).unwrap();
    let mut steps = 0;
    let stats = loop {
        steps += 1;
        if let Some(stats) = r.apply_next(&mut Discard).unwrap() {
            break stats;
        }
    };
    assert_eq!((stats, steps), (whole, whole.records - 1));
    let mut damaged = s.clone();
    damaged[PROLOGUE_LEN + 9] ^= 1;
    assert_eq!(record_len(damaged[PROLOGUE_LEN..PROLOGUE_LEN + FRAME_LEN].try_into().unwrap()), None);
    let mut src = &damaged[..];
    assert!(matches!(Reader::open(&mut src), Err(Error::FrameChecksum { .. })));
}
