//! Lazy restore's index: every page a stream holds as data is found again
//! by reading back only the record that holds it, checked a second time;
//! zero and poisoned pages go to the sink at once; later copies win.

mod common;

use common::*;
use migrate::index::{Content, PageIndex, RecordView, index};
use migrate::{Error, PAGE_SIZE, Reader, Writer};

/// Indexes `stream`; returns the index and what the sink was given.
fn indexed(stream: &[u8]) -> Result<(PageIndex, ModelSink), Error> {
    let mut src = stream;
    let mut reader = Reader::open(&mut src)?;
    let mut idx = PageIndex::new(reader.header()).unwrap();
    let mut sink = ModelSink::default();
    index(&mut reader, &mut idx, &mut sink).map_err(|e| match e {
        migrate::ApplyError::Stream(e) => e,
        migrate::ApplyError::Sink { error, .. } => panic!("the model refused: {error}"),
    })?;
    Ok((idx, sink))
}

/// Page `gfn` as lazy restore reads it: its record alone, checked again.
fn read_back(stream: &[u8], idx: &PageIndex, gfn: u64) -> Option<Vec<u8>> {
    let (span, content) = idx.locate(gfn)?;
    let bytes = &stream[span.offset as usize..(span.offset + u64::from(span.len)) as usize];
    let mut view = RecordView::check(bytes, &span).unwrap();
    let mut page = [0u8; PAGE_SIZE];
    view.page(content, &mut page).unwrap();
    Some(page.to_vec())
}

#[test]
fn every_data_page_is_found_in_its_record_and_the_rest_goes_to_the_sink() {
    let vm = realistic_vm();
    let (stream, _) = vm.write();
    let (idx, sink) = indexed(&stream).unwrap();
    let expected = vm.expected();
    let mut data = 0;
    for (gfn, page) in &expected.pages {
        match page {
            Page::Data(d) => {
                data += 1;
                assert_eq!(read_back(&stream, &idx, *gfn).as_ref(), Some(d), "page {gfn:#x}");
                assert!(!sink.vm.pages.contains_key(gfn), "data page {gfn:#x} reached the sink");
            }
            Page::Zero | Page::Poisoned => {
                assert!(idx.locate(*gfn).is_none(), "page {gfn:#x} indexed");
                assert_eq!(sink.vm.pages.get(gfn), Some(page), "page {gfn:#x}");
            }
        }
    }
    assert_eq!(idx.held_pages(), data);
    // The runs cover exactly the held pages.
    let mut from_runs = 0;
    for (gfn, pages) in idx.held_runs() {
        for g in gfn..gfn + pages {
            assert!(matches!(expected.pages.get(&g), Some(Page::Data(_))), "{g:#x} in a run");
        }
        from_runs += pages;
    }
    assert_eq!(from_runs, data);
    // Never sent, outside RAM: nothing.
    assert!(idx.locate(1050).is_none() && idx.locate(1 << 40).is_none());
    // vCPUs, devices and the large run went to the sink as apply gives them.
    assert_eq!(sink.vm.vcpus, expected.vcpus);
    assert_eq!(sink.vm.devices, expected.devices);
    assert_eq!(sink.vm.large_runs, expected.large_runs);
    // Shared references resolve to the record that sent the content.
    let shared_ref = expected
        .pages
        .keys()
        .copied()
        .find(|&g| matches!(idx.locate(g), Some((_, Content::Shared(_)))))
        .expect("the realistic VM has shared references");
    assert!(idx.records().iter().any(|r| Some(*r) == idx.locate(shared_ref).map(|l| l.0)));
}

#[test]
fn a_record_damaged_after_indexing_is_refused_when_read_back() {
    let vm = realistic_vm();
    let (stream, _) = vm.write();
    let (idx, _) = indexed(&stream).unwrap();
    let span = idx.records()[0];
    let (start, end) = (span.offset as usize, (span.offset + u64::from(span.len)) as usize);
    let good = &stream[start..end];
    // Every byte of the frame header, a spread of payload bytes, the
    // checksum: each flip is caught.
    let positions: Vec<usize> =
        (0..16).chain((16..good.len()).step_by(997)).chain(good.len() - 4..good.len()).collect();
    for at in positions {
        let mut bad = good.to_vec();
        bad[at] ^= 0x10;
        let e = RecordView::check(&bad, &span).unwrap_err();
        let text = e.to_string();
        assert!(text.contains(&format!("record {}", span.seq)) && !text.contains('\n'), "byte {at}: {text}");
    }
    // Another record's bytes, or a short read, are not this record.
    let other = idx.records()[1];
    let e = RecordView::check(&stream[other.offset as usize..][..other.len as usize], &span).unwrap_err();
    assert!(matches!(e, Error::Malformed { .. } | Error::Sequence { .. }), "{e}");
    assert!(RecordView::check(&good[..good.len() - 1], &span).is_err());
}

#[test]
fn a_stream_refused_by_apply_is_refused_by_index() {
    let vm = realistic_vm();
    let (stream, _) = vm.write();
    for at in (0..stream.len()).step_by(stream.len() / 64) {
        let mut bad = stream.clone();
        bad[at] ^= 0x01;
        assert!(indexed(&bad).is_err(), "flip at {at} accepted");
    }
    assert!(indexed(&stream[..stream.len() - 10]).is_err());
}

#[test]
fn the_last_copy_of_a_page_wins() {
    let h = header(1, &[], true);
    let mut w = Writer::begin(Vec::new(), &h).unwrap();
    w.vcpu(0, &vcpu_state(0)).unwrap();
    let a = text_page(1);
    let b = random_page(&mut Rng(3));
    // Round 1: page 1 data, page 2 zero, page 3 shared content, page 4 a
    // reference to it, page 5 a reference.
    w.page(1, &a).unwrap();
    w.page(2, &[0; PAGE_SIZE]).unwrap();
    w.shared_page(3, 9, &b).unwrap();
    w.shared_page(4, 9, &b).unwrap();
    w.shared_page(5, 9, &b).unwrap();
    // Round 2: page 1 becomes zero, page 2 data, page 4 data.
    w.page(1, &[0; PAGE_SIZE]).unwrap();
    w.page(2, &b).unwrap();
    w.page(4, &a).unwrap();
    let (stream, _) = w.finish().unwrap();
    let (idx, sink) = indexed(&stream).unwrap();
    assert!(idx.locate(1).is_none());
    assert_eq!(sink.vm.pages.get(&1), Some(&Page::Zero));
    assert_eq!(read_back(&stream, &idx, 2), Some(b.to_vec()));
    assert_eq!(read_back(&stream, &idx, 3), Some(b.to_vec()));
    assert_eq!(read_back(&stream, &idx, 4), Some(a.to_vec()));
    assert!(matches!(idx.locate(5), Some((_, Content::Shared(_)))));
    assert_eq!(read_back(&stream, &idx, 5), Some(b.to_vec()));
}
