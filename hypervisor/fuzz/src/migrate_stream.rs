//! The VM state stream (`migrate`): its reader on raw bytes, and its
//! writer driven by a script, each checked against the other. A stream
//! comes from another host or a checkpoint file: it may be damaged or
//! hostile, and must be refused, never misread or a reason to panic.
//!
//! Checks, on the input as a stream:
//! - `migrate::verify` never panics; a refusal is one line, and where it
//!   names a byte offset, that offset lies inside the input;
//! - applying the stream record by record comes to the same verdict (and
//!   the same counts) as `verify` (which only adds trailing-byte checks);
//! - an accepted stream keeps every promise the format makes to a
//!   consumer: each vCPU and each listed device once, with the listed
//!   version; memory inside the RAM ranges; whole pages; shared ids
//!   defined before use, in order; large runs aligned and filled in order;
//!   resume only in a live stream; counts equal to the end record's;
//! - an accepted stream of modest size, re-encoded by the writer from what
//!   it applied, verifies and applies to the same VM;
//! - indexed for a lazy restore (`migrate::index`), it gives the same
//!   vCPUs, devices and counts, and each data page read back from the one
//!   record the index names equals what apply wrote; a flipped byte in that
//!   record is refused.
//!
//! And on the input as a writer script (header shape, then operations:
//! pages of several contents, shared pages, poisoned pages, large-page
//! runs, vCPUs, devices, resume):
//! - every valid call is accepted; a page outside RAM is refused with
//!   `OutsideRam` and the writer stays refused;
//! - the stream verifies and applies to exactly the VM the script built
//!   (the last copy of a page wins);
//! - a fuzzed byte flipped or a fuzzed truncation is refused.
//!
//! Seeds (`seeds/migrate_stream/`) are streams the writer made, regenerated
//! by `cargo test --manifest-path hypervisor/fuzz/Cargo.toml
//! --no-default-features -- --ignored write_seeds`.

use std::collections::{BTreeMap, BTreeSet};

use migrate::{Apply, DeviceInfo, Error, Header, PAGE_SIZE, RamRange, Reader, Vendor, Writer, verify};
use vcpu::GuestState;

use crate::input::Input;

/// Pages a model keeps before it gives up comparing (a zero run may cover
/// terabytes).
const MODEL_PAGES: u64 = 1 << 16;
const MAX_OPS: usize = 300;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Page {
    Data(Vec<u8>),
    Zero,
    Poisoned,
}

/// A VM as a consumer sees it, with the format's promises checked on
/// every call.
#[derive(Default)]
struct Model {
    header: Option<Header>,
    vcpus: BTreeMap<u32, GuestState>,
    devices: BTreeMap<String, (u16, Vec<u8>)>,
    pages: BTreeMap<u64, Page>,
    /// Pages applied in all; the map stops growing past `MODEL_PAGES`.
    applied: u64,
    large_runs: Vec<(u64, u32)>,
    /// The open large run: next frame, end.
    run: Option<(u64, u64)>,
    shared: Vec<Vec<u8>>,
    resumed: bool,
}

impl Model {
    fn header(&self) -> &Header {
        self.header.as_ref().unwrap()
    }

    fn in_ram(&self, gfn: u64, pages: u64) {
        let end = gfn.checked_add(pages).expect("memory past 2^64");
        let ok = self.header().ram.iter().any(|r| gfn >= r.first_gfn() && end <= r.first_gfn() + r.pages());
        assert!(ok, "{pages} page(s) at {gfn:#x} applied outside RAM");
    }

    fn memory(&mut self, gfn: u64, pages: u64) {
        assert!(!self.resumed || self.header().live);
        self.in_ram(gfn, pages);
        if let Some((next, end)) = self.run {
            assert_eq!(gfn, next, "large run filled out of order");
            assert!(gfn + pages <= end, "entry crosses a large run's end");
            self.run = if gfn + pages == end { None } else { Some((gfn + pages, end)) };
        }
        self.applied += pages;
    }

    fn set(&mut self, gfn: u64, page: Page) {
        if self.applied <= MODEL_PAGES {
            self.pages.insert(gfn, page);
        }
    }

    fn complete(&self) -> bool {
        self.applied <= MODEL_PAGES
    }
}

impl Apply for Model {
    type Error = ();

    fn vcpu(&mut self, index: u32, state: GuestState) -> Result<(), ()> {
        assert!(self.run.is_none() && !self.resumed);
        assert!(index < self.header().vcpus);
        assert!(self.vcpus.insert(index, state).is_none(), "vCPU {index} twice");
        Ok(())
    }
    fn device(&mut self, name: &str, version: u16, bytes: &[u8]) -> Result<(), ()> {
        assert!(self.run.is_none() && !self.resumed);
        let listed = self.header().devices.iter().find(|d| d.name == name).expect("unlisted device");
        assert_eq!(listed.version, version);
        assert!(self.devices.insert(name.to_string(), (version, bytes.to_vec())).is_none());
        Ok(())
    }
    fn large_run(&mut self, gfn: u64, pages: u32) -> Result<(), ()> {
        assert!(self.run.is_none());
        assert!(pages == 512 || pages == 512 * 512);
        assert_eq!(gfn % u64::from(pages), 0);
        self.in_ram(gfn, u64::from(pages));
        self.run = Some((gfn, gfn + u64::from(pages)));
        self.large_runs.push((gfn, pages));
        Ok(())
    }
    fn pages(&mut self, gfn: u64, data: &[u8]) -> Result<(), ()> {
        assert!(!data.is_empty() && data.len().is_multiple_of(PAGE_SIZE) && data.len() <= 16 * PAGE_SIZE);
        self.memory(gfn, (data.len() / PAGE_SIZE) as u64);
        for (i, p) in data.chunks(PAGE_SIZE).enumerate() {
            self.set(gfn + i as u64, Page::Data(p.to_vec()));
        }
        Ok(())
    }
    fn zero(&mut self, gfn: u64, pages: u32) -> Result<(), ()> {
        assert!(pages > 0);
        self.memory(gfn, u64::from(pages));
        if self.complete() {
            for i in 0..u64::from(pages) {
                self.set(gfn + i, Page::Zero);
            }
        }
        Ok(())
    }
    fn shared(&mut self, gfn: u64, id: u32, data: &[u8; PAGE_SIZE]) -> Result<(), ()> {
        assert_eq!(id as usize, self.shared.len(), "shared ids out of order");
        self.memory(gfn, 1);
        self.shared.push(data.to_vec());
        self.set(gfn, Page::Data(data.to_vec()));
        Ok(())
    }
    fn shared_ref(&mut self, gfn: u64, id: u32) -> Result<(), ()> {
        self.memory(gfn, 1);
        let data = self.shared.get(id as usize).expect("reference to an undefined shared id").clone();
        self.set(gfn, Page::Data(data));
        Ok(())
    }
    fn poisoned(&mut self, gfn: u64) -> Result<(), ()> {
        self.memory(gfn, 1);
        self.set(gfn, Page::Poisoned);
        Ok(())
    }
    fn pending(&mut self, gfn: u64, pages: u32) -> Result<(), ()> {
        assert!(self.header().live && !self.resumed && self.run.is_none() && pages > 0);
        self.in_ram(gfn, u64::from(pages));
        Ok(())
    }
    fn resume(&mut self) -> Result<(), ()> {
        assert!(self.header().live && !self.resumed && self.run.is_none());
        assert_eq!(self.vcpus.len() as u32, self.header().vcpus);
        assert_eq!(self.devices.len(), self.header().devices.len());
        self.resumed = true;
        Ok(())
    }
}

pub fn migrate_stream(data: &[u8]) {
    check_reader(data);
    check_writer(data);
}

fn check_error(e: &Error, len: usize) {
    let text = e.to_string();
    assert!(!text.is_empty() && !text.contains('\n'), "{text:?}");
    let offset = match e {
        Error::Truncated { at, .. } => Some(at.offset),
        Error::FrameChecksum { at }
        | Error::Checksum { at }
        | Error::Sequence { at, .. }
        | Error::TooLong { at, .. }
        | Error::UnknownKind { at, .. }
        | Error::RecordVersion { at, .. }
        | Error::Order { at, .. }
        | Error::Malformed { at, .. }
        | Error::OutsideRam { at, .. } => Some(at.offset),
        Error::TrailingBytes { offset } => Some(*offset),
        _ => None,
    };
    if let Some(offset) = offset {
        assert!(offset <= len as u64, "{e} names byte {offset} of {len}");
    }
}

/// Applies `data` into a fresh model; returns it and the verdict.
fn apply(data: &[u8]) -> (Model, Result<migrate::Stats, Error>, usize) {
    let mut model = Model::default();
    let mut src = data;
    let verdict = match Reader::open(&mut src) {
        Err(e) => Err(e),
        Ok(mut reader) => {
            model.header = Some(reader.header().clone());
            reader.apply(&mut model).map_err(|e| match e {
                migrate::ApplyError::Stream(e) => e,
                migrate::ApplyError::Sink { .. } => unreachable!("the model refuses nothing"),
            })
        }
    };
    let rest = src.len();
    (model, verdict, rest)
}

fn check_reader(data: &[u8]) {
    let verified = verify(data);
    let (model, applied, rest) = apply(data);
    match (&verified, &applied) {
        (Ok(v), Ok(stats)) => {
            assert_eq!(rest, 0);
            assert_eq!(&v.stats, stats);
            assert_eq!(stats.bytes, data.len() as u64);
            assert_eq!(model.header(), &v.header);
            assert!(model.run.is_none());
            assert_eq!(model.vcpus.len() as u32, v.header.vcpus);
            assert_eq!(model.devices.len(), v.header.devices.len());
            assert_eq!(model.applied, stats.total_pages());
            assert_eq!(model.large_runs.len() as u64, stats.large_runs);
            if model.complete() {
                reencode(&model);
                check_index(data, &model);
            }
        }
        (Err(Error::TrailingBytes { offset }), Ok(_)) => assert_eq!(*offset as usize, data.len() - rest),
        (Err(a), Err(b)) => {
            assert_eq!(a, b, "verify and apply disagree");
            check_error(a, data.len());
        }
        _ => panic!("verify {verified:?} but apply {applied:?}"),
    }
}

/// A lazy restore's view of an accepted stream: `migrate::index` reads it
/// to the same verdict and counts, and every data page the model holds
/// comes back from the record the index names, read back on its own
/// (`RecordView`); a byte flipped in that record is refused.
fn check_index(data: &[u8], model: &Model) {
    let ram: u64 = model.header().ram.iter().map(|r| r.pages()).sum();
    if ram > MODEL_PAGES * 16 {
        return; // one word per page of RAM: keep the fuzzer's memory small
    }
    let mut idx = migrate::index::PageIndex::new(model.header()).expect("a small index");
    let mut src = data;
    let mut reader = Reader::open(&mut src).unwrap();
    let mut rest = Rest::default();
    let stats = migrate::index::index(&mut reader, &mut idx, &mut rest).unwrap_or_else(|e| panic!("index: {e:?}"));
    assert_eq!(stats.total_pages(), model.applied);
    assert_eq!(rest.vcpus, model.vcpus);
    assert_eq!(rest.devices, model.devices);
    let mut out = [0u8; PAGE_SIZE];
    let mut flipped_one = false;
    for (&gfn, page) in &model.pages {
        match (page, idx.locate(gfn)) {
            (Page::Data(d), Some((span, content))) => {
                let bytes = &data[span.offset as usize..span.offset as usize + span.len as usize];
                let mut view = migrate::index::RecordView::check(bytes, &span).unwrap();
                view.page(content, &mut out).unwrap();
                assert!(out[..] == d[..], "page {gfn:#x} read back from record {} differs", span.seq);
                if !flipped_one {
                    flipped_one = true;
                    let mut bad = bytes.to_vec();
                    let at = (gfn as usize).wrapping_mul(31) % bad.len();
                    bad[at] ^= 0x10;
                    assert!(migrate::index::RecordView::check(&bad, &span).is_err(), "a flipped byte {at} passed");
                }
            }
            (Page::Data(_), None) => panic!("data page {gfn:#x} has no record in the index"),
            (Page::Zero | Page::Poisoned, Some(_)) => panic!("page {gfn:#x} sent last as zero/poisoned is indexed"),
            (Page::Zero | Page::Poisoned, None) => {}
        }
    }
}

/// What an index hands its consumer besides the data pages (which it
/// keeps): vCPUs and devices collected, the rest taken as is (the model
/// checked the stream's rules already).
#[derive(Default)]
struct Rest {
    vcpus: BTreeMap<u32, GuestState>,
    devices: BTreeMap<String, (u16, Vec<u8>)>,
}

impl Apply for Rest {
    type Error = ();
    fn vcpu(&mut self, index: u32, state: GuestState) -> Result<(), ()> {
        self.vcpus.insert(index, state);
        Ok(())
    }
    fn device(&mut self, name: &str, version: u16, bytes: &[u8]) -> Result<(), ()> {
        self.devices.insert(name.to_string(), (version, bytes.to_vec()));
        Ok(())
    }
    fn large_run(&mut self, _: u64, _: u32) -> Result<(), ()> {
        Ok(())
    }
    fn pages(&mut self, gfn: u64, _: &[u8]) -> Result<(), ()> {
        panic!("the index handed data page {gfn:#x} to its consumer")
    }
    fn zero(&mut self, _: u64, _: u32) -> Result<(), ()> {
        Ok(())
    }
    fn shared(&mut self, gfn: u64, _: u32, _: &[u8; PAGE_SIZE]) -> Result<(), ()> {
        panic!("the index handed shared page {gfn:#x} to its consumer")
    }
    fn shared_ref(&mut self, gfn: u64, _: u32) -> Result<(), ()> {
        panic!("the index handed shared reference {gfn:#x} to its consumer")
    }
    fn poisoned(&mut self, _: u64) -> Result<(), ()> {
        Ok(())
    }
    fn pending(&mut self, _: u64, _: u32) -> Result<(), ()> {
        Ok(())
    }
    fn resume(&mut self) -> Result<(), ()> {
        Ok(())
    }
}

/// Writes what a model applied as a new stream; it must verify and apply
/// to the same VM.
fn reencode(model: &Model) {
    let h = model.header();
    let mut w = Writer::begin(Vec::new(), h).unwrap();
    for (i, s) in &model.vcpus {
        w.vcpu(*i, s).unwrap();
    }
    for d in &h.devices {
        let (v, b) = &model.devices[&d.name];
        w.device(&d.name, *v, b).unwrap();
    }
    // Runs sent in several rounds may repeat or nest: keep the first of
    // any that overlap.
    let mut runs: BTreeMap<u64, u32> = BTreeMap::new();
    let mut covered: BTreeSet<u64> = BTreeSet::new();
    for &(g, p) in &model.large_runs {
        if p == 512 && !runs.iter().any(|(&s, &q)| g < s + u64::from(q) && s < g + u64::from(p)) {
            runs.insert(g, p);
            covered.extend(g..g + u64::from(p));
        }
    }
    let zero = [0u8; PAGE_SIZE];
    for (&gfn, page) in &model.pages {
        if let Some(&p) = runs.get(&gfn) {
            w.large_run(gfn, p).unwrap();
        }
        match page {
            Page::Data(d) => w.page(gfn, d.as_slice().try_into().unwrap()).unwrap(),
            Page::Zero => w.page(gfn, &zero).unwrap(),
            Page::Poisoned => w.poisoned(gfn).unwrap(),
        }
    }
    let (stream, _) = w.finish().unwrap();
    let (again, verdict, _) = apply(&stream);
    verdict.unwrap();
    assert_eq!(again.vcpus, model.vcpus);
    assert_eq!(again.devices, model.devices);
    assert_eq!(again.pages, normalise(&model.pages));
    assert_eq!(again.large_runs, runs.into_iter().collect::<Vec<_>>());
}

/// Data pages of zeros are zero pages once re-encoded.
fn normalise(pages: &BTreeMap<u64, Page>) -> BTreeMap<u64, Page> {
    pages
        .iter()
        .map(|(&g, p)| match p {
            Page::Data(d) if d.iter().all(|&b| b == 0) => (g, Page::Zero),
            p => (g, p.clone()),
        })
        .collect()
}

/// splitmix64, for page contents.
fn fill(seed: u64, page: &mut [u8]) {
    let mut s = seed;
    for chunk in page.chunks_mut(8) {
        s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        chunk.copy_from_slice(&(z ^ (z >> 31)).to_le_bytes()[..chunk.len()]);
    }
}

fn content(input: &mut Input) -> [u8; PAGE_SIZE] {
    let mut p = [0u8; PAGE_SIZE];
    match input.u8() % 5 {
        0 => {}
        1 => fill(input.u64(), &mut p),
        2 => {
            // Compressible: a short pattern tiled.
            let pat = input.array::<4>();
            for (i, b) in p.iter_mut().enumerate() {
                *b = pat[i % 4] ^ (i / 512) as u8;
            }
        }
        3 => p[usize::from(input.u16()) % PAGE_SIZE] = input.u8() | 1,
        _ => fill(input.u64(), &mut p[..256]),
    }
    p
}

fn shared_content(key: u64) -> [u8; PAGE_SIZE] {
    let mut p = [0u8; PAGE_SIZE];
    if key != 0 {
        fill(key, &mut p[..1024]);
    }
    p
}

fn check_writer(data: &[u8]) {
    let mut input = Input::new(data);
    let live = input.bool();
    let vcpus = 1 + u32::from(input.u8() % 4);
    let mut ram = Vec::new();
    let mut base = u64::from(input.u8() % 4) * 512;
    for _ in 0..1 + input.u8() % 3 {
        let pages = 1 + input.below(2048);
        ram.push(RamRange { base: base * PAGE_SIZE as u64, size: pages * PAGE_SIZE as u64 });
        base += pages + 1 + input.below(1024);
    }
    let devices: Vec<DeviceInfo> =
        (0..input.u8() % 4).map(|i| DeviceInfo { name: format!("dev{i}"), version: input.u16() }).collect();
    let header = Header { live, source: Vendor::Amd, vcpus, ram, devices };
    let mut w = Writer::begin(Vec::new(), &header).unwrap();

    let mut want = Model { header: Some(header.clone()), ..Model::default() };
    let gfns: Vec<(u64, u64)> = header.ram.iter().map(|r| (r.first_gfn(), r.pages())).collect();
    let pick = |input: &mut Input| {
        let (first, pages) = gfns[input.below(gfns.len() as u64) as usize];
        first + input.below(pages)
    };
    let mut refused = false;
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        match input.u8() % 9 {
            0..=2 => {
                let gfn = pick(&mut input);
                let p = content(&mut input);
                w.page(gfn, &p).unwrap();
                want.pages.insert(gfn, Page::Data(p.to_vec()));
            }
            3 => {
                let gfn = pick(&mut input);
                let key = u64::from(input.u8() % 4);
                let p = shared_content(key);
                w.shared_page(gfn, key, &p).unwrap();
                want.pages.insert(gfn, Page::Data(p.to_vec()));
            }
            4 => {
                let gfn = pick(&mut input);
                w.poisoned(gfn).unwrap();
                want.pages.insert(gfn, Page::Poisoned);
            }
            5 => {
                let starts: Vec<u64> = gfns
                    .iter()
                    .flat_map(|&(f, n)| (f.div_ceil(512) * 512..f + n).step_by(512).filter(move |&s| s + 512 <= f + n))
                    .collect();
                if starts.is_empty() {
                    continue;
                }
                let start = starts[input.below(starts.len() as u64) as usize];
                w.large_run(start, 512).unwrap();
                want.large_runs.push((start, 512));
                let every = 1 + u64::from(input.u8());
                for gfn in start..start + 512 {
                    let p = if (gfn - start).is_multiple_of(every) { content(&mut input) } else { [0; PAGE_SIZE] };
                    w.page(gfn, &p).unwrap();
                    want.pages.insert(gfn, Page::Data(p.to_vec()));
                }
            }
            6 if !want.resumed => {
                let i = input.below(u64::from(vcpus)) as u32;
                if want.vcpus.contains_key(&i) {
                    continue;
                }
                let s =
                    GuestState { rip: input.u64(), cr3: input.u64(), tsc_aux: u64::from(i), ..GuestState::default() };
                w.vcpu(i, &s).unwrap();
                want.vcpus.insert(i, s);
            }
            7 if !want.resumed && !header.devices.is_empty() => {
                let d = &header.devices[input.below(header.devices.len() as u64) as usize];
                if want.devices.contains_key(&d.name) {
                    continue;
                }
                let len = usize::from(input.u8() % 64);
                let bytes = input.bytes(len).to_vec();
                w.device(&d.name, d.version, &bytes).unwrap();
                want.devices.insert(d.name.clone(), (d.version, bytes));
            }
            8 if live && !want.resumed && want.vcpus.len() as u32 == vcpus => {
                finish_state(&mut w, &mut want, &header);
                w.resume().unwrap();
                want.resumed = true;
            }
            8 => {
                // Just past the end of the last RAM range: refused, and the
                // writer stays refused.
                let (f, n) = *gfns.last().unwrap();
                assert!(matches!(w.page(f + n, &[0; PAGE_SIZE]), Err(Error::OutsideRam { .. })));
                assert_eq!(w.page(f, &[0; PAGE_SIZE]), Err(Error::UsedAfterError));
                refused = true;
                break;
            }
            _ => {}
        }
    }
    if refused {
        return;
    }
    finish_state(&mut w, &mut want, &header);
    let (stream, stats) = w.finish().unwrap();

    let v = verify(&stream).unwrap_or_else(|e| panic!("the writer's own stream refused: {e}"));
    assert_eq!(v.stats, stats);
    let (got, verdict, _) = apply(&stream);
    verdict.unwrap();
    assert_eq!(got.vcpus, want.vcpus);
    assert_eq!(got.devices, want.devices);
    assert_eq!(got.pages, normalise(&want.pages));
    assert_eq!(got.large_runs, want.large_runs);
    assert_eq!(got.resumed, want.resumed);

    // Damage: one flipped byte, one cut.
    let at = input.u32() as usize % stream.len();
    let mask = input.u8() | 1;
    let mut bad = stream.clone();
    bad[at] ^= mask;
    let e = verify(&bad).expect_err("a flipped byte was accepted");
    check_error(&e, bad.len());
    let cut = input.u32() as usize % stream.len();
    let e = verify(&stream[..cut]).expect_err("a truncated stream was accepted");
    assert!(matches!(e, Error::Truncated { .. }), "cut at {cut}: {e}");
}

/// Saves the vCPUs and devices the script has not.
fn finish_state(w: &mut Writer<Vec<u8>>, want: &mut Model, header: &Header) {
    for i in 0..header.vcpus {
        if let std::collections::btree_map::Entry::Vacant(e) = want.vcpus.entry(i) {
            let s = GuestState { tsc_aux: u64::from(i), ..GuestState::default() };
            w.vcpu(i, &s).unwrap();
            e.insert(s);
        }
    }
    for d in &header.devices {
        if !want.devices.contains_key(&d.name) {
            w.device(&d.name, d.version, b"").unwrap();
            want.devices.insert(d.name.clone(), (d.version, Vec::new()));
        }
    }
}

/// Streams the writer makes, as seeds: they get the fuzzer past the magic,
/// the checksums and the ordering rules.
pub fn migrate_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let dev = |n: &str, v| DeviceInfo { name: n.to_string(), version: v };
    let header = |live, vcpus, devices| Header {
        live,
        source: Vendor::Intel,
        vcpus,
        ram: vec![RamRange { base: 0, size: 4 << 20 }, RamRange { base: 1 << 32, size: 1 << 20 }],
        devices,
    };
    let text = |seed: u8| {
        let mut p = [0u8; PAGE_SIZE];
        for (i, b) in p.iter_mut().enumerate() {
            *b = b"mov rax, [rbp]\n"[i % 15] ^ seed;
        }
        p
    };
    let mut seeds = Vec::new();

    // A minimal checkpoint: one vCPU, one page.
    let mut w = Writer::begin(Vec::new(), &header(false, 1, vec![])).unwrap();
    w.vcpu(0, &GuestState::default()).unwrap();
    w.page(1, &text(0)).unwrap();
    seeds.push(("minimal-checkpoint", w.finish().unwrap().0));

    // Every entry kind and a 2 MiB run.
    let mut w = Writer::begin(Vec::new(), &header(false, 2, vec![dev("com1", 1), dev("pit", 2)])).unwrap();
    w.vcpu(0, &GuestState { rip: 0xfff0, ..GuestState::default() }).unwrap();
    w.vcpu(1, &GuestState::default()).unwrap();
    w.device("com1", 1, &[3, 0, 0x60]).unwrap();
    w.device("pit", 2, &[0; 12]).unwrap();
    w.page(0, &[0; PAGE_SIZE]).unwrap();
    w.page(1, &text(1)).unwrap();
    w.page(2, &text(2)).unwrap();
    let mut random = [0u8; PAGE_SIZE];
    fill(7, &mut random);
    w.page(4, &random).unwrap();
    w.shared_page(5, 9, &text(9)).unwrap();
    w.shared_page(6, 9, &text(9)).unwrap();
    w.poisoned(7).unwrap();
    w.large_run(512, 512).unwrap();
    for gfn in 512..1024 {
        w.page(gfn, &if gfn % 100 == 3 { text(gfn as u8) } else { [0; PAGE_SIZE] }).unwrap();
    }
    w.page((1 << 32) / PAGE_SIZE as u64, &text(3)).unwrap();
    seeds.push(("every-kind-checkpoint", w.finish().unwrap().0));

    // Live: pre-copy rounds, switch-over, resume, post-copy pages.
    let mut w = Writer::begin(Vec::new(), &header(true, 1, vec![dev("com1", 1)])).unwrap();
    for gfn in 0..8 {
        w.page(gfn, &text(gfn as u8)).unwrap();
    }
    w.page(3, &text(33)).unwrap();
    // Hybrid: pages dirtied since their copy come after the resume.
    w.pending(&[(3, 1), (20, 2)]).unwrap();
    w.vcpu(0, &GuestState::default()).unwrap();
    w.device("com1", 1, b"uart").unwrap();
    w.resume().unwrap();
    w.page(3, &text(34)).unwrap();
    w.page(20, &text(20)).unwrap();
    w.poisoned(21).unwrap();
    seeds.push(("live-precopy-resume-postcopy", w.finish().unwrap().0));
    seeds
}
