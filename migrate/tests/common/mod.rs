//! A model VM for the tests: what a writer was given and what a reader
//! applied, in one comparable form; plus helpers that take a stream apart
//! and forge records with valid checksums (to test the rules behind the
//! checksums).
#![allow(dead_code)]

use std::collections::BTreeMap;

use crc::{CRC_32_ISCSI, Crc};
use migrate::{Apply, DeviceInfo, Header, PAGE_SIZE, RamRange, Vendor, Writer};
use vcpu::{Event, GuestState, Segment};

pub const CRC32C: Crc<u32> = Crc::<u32>::new(&CRC_32_ISCSI);

/// A guest page as the receiver ends up with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Page {
    Data(Vec<u8>),
    Zero,
    Poisoned,
}

/// A whole VM's state, as written or as applied.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Model {
    pub vcpus: BTreeMap<u32, GuestState>,
    pub devices: BTreeMap<String, (u16, Vec<u8>)>,
    pub pages: BTreeMap<u64, Page>,
    pub large_runs: Vec<(u64, u32)>,
    /// Post-copy's pending runs, in stream order.
    pub pending: Vec<(u64, u32)>,
    pub resumed: bool,
}

/// Applies a stream into a [`Model`], resolving shared contents.
#[derive(Default)]
pub struct ModelSink {
    pub vm: Model,
    pub shared: Vec<Vec<u8>>,
    /// Refuse the device with this name (to test sink refusals).
    pub refuse_device: Option<String>,
}

impl Apply for ModelSink {
    type Error = String;

    fn vcpu(&mut self, index: u32, state: GuestState) -> Result<(), String> {
        self.vm.vcpus.insert(index, state);
        Ok(())
    }
    fn device(&mut self, name: &str, version: u16, bytes: &[u8]) -> Result<(), String> {
        if self.refuse_device.as_deref() == Some(name) {
            return Err(format!("device {name} refused its state"));
        }
        self.vm.devices.insert(name.to_string(), (version, bytes.to_vec()));
        Ok(())
    }
    fn large_run(&mut self, gfn: u64, pages: u32) -> Result<(), String> {
        self.vm.large_runs.push((gfn, pages));
        Ok(())
    }
    fn pages(&mut self, gfn: u64, data: &[u8]) -> Result<(), String> {
        assert!(!data.is_empty() && data.len().is_multiple_of(PAGE_SIZE));
        for (i, page) in data.chunks(PAGE_SIZE).enumerate() {
            self.vm.pages.insert(gfn + i as u64, Page::Data(page.to_vec()));
        }
        Ok(())
    }
    fn zero(&mut self, gfn: u64, pages: u32) -> Result<(), String> {
        for i in 0..u64::from(pages) {
            self.vm.pages.insert(gfn + i, Page::Zero);
        }
        Ok(())
    }
    fn shared(&mut self, gfn: u64, id: u32, data: &[u8; PAGE_SIZE]) -> Result<(), String> {
        assert_eq!(id as usize, self.shared.len());
        self.shared.push(data.to_vec());
        self.vm.pages.insert(gfn, Page::Data(data.to_vec()));
        Ok(())
    }
    fn shared_ref(&mut self, gfn: u64, id: u32) -> Result<(), String> {
        let data = self.shared[id as usize].clone();
        self.vm.pages.insert(gfn, Page::Data(data));
        Ok(())
    }
    fn poisoned(&mut self, gfn: u64) -> Result<(), String> {
        self.vm.pages.insert(gfn, Page::Poisoned);
        Ok(())
    }
    fn pending(&mut self, gfn: u64, pages: u32) -> Result<(), String> {
        self.vm.pending.push((gfn, pages));
        Ok(())
    }
    fn resume(&mut self) -> Result<(), String> {
        self.vm.resumed = true;
        Ok(())
    }
}

/// splitmix64: reproducible page contents.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

pub fn random_page(rng: &mut Rng) -> [u8; PAGE_SIZE] {
    let mut p = [0u8; PAGE_SIZE];
    rng.fill(&mut p);
    p
}

/// Text-like content: compresses well but is not trivially repetitive.
pub fn text_page(seed: u64) -> [u8; PAGE_SIZE] {
    let words: [&[u8]; 8] = [b"kernel ", b"page ", b"table ", b"entry ", b"0x7fff ", b"mov ", b"rax, ", b"\n"];
    let mut rng = Rng(seed);
    let mut p = [0u8; PAGE_SIZE];
    let mut i = 0;
    while i < PAGE_SIZE {
        let w = words[(rng.next() % 8) as usize];
        let n = w.len().min(PAGE_SIZE - i);
        p[i..i + n].copy_from_slice(&w[..n]);
        i += n;
    }
    p
}

/// A page with one non-zero byte: not a zero page.
pub fn almost_zero_page(at: usize) -> [u8; PAGE_SIZE] {
    let mut p = [0u8; PAGE_SIZE];
    p[at % PAGE_SIZE] = 1;
    p
}

pub fn vcpu_state(i: u32) -> GuestState {
    let mut s = GuestState { rip: 0xffff_ffff_8100_0000 + u64::from(i) * 0x10, ..GuestState::default() };
    s.gprs.set(0, 0x1234_5678_9abc_def0 ^ u64::from(i));
    s.gprs.set(15, u64::from(i));
    s.cr0 = 0x8005_0033;
    s.cr3 = 0x1_0000 * u64::from(i + 1);
    s.cr4 = 0x0020_06f0;
    s.efer = 0xd01;
    s.cs = Segment { selector: 0x10, base: 0, limit: 0xffff_ffff, attrs: vcpu::SegAttrs::CODE64 };
    s.tsc_aux = u64::from(i);
    s.tsc_offset = 0xffff_ffff_0000_0000 + u64::from(i);
    s.fpu.mxcsr = 0x1fa0;
    s.fpu.xmm[3] = [i as u8 + 1; 16];
    s.interrupt_shadow = i % 2 == 1;
    if i == 1 {
        s.injected_event = Some(Event::Exception { vector: 14, error_code: Some(2) });
        assert!(s.pending_events.push(Event::Interrupt { vector: 0x30 }));
        assert!(s.pending_events.push(Event::Nmi));
    }
    s
}

pub const MIB: u64 = 1 << 20;

/// 8 MiB at 0 and 4 MiB at 4 GiB: an MMIO hole between them.
pub fn header(vcpus: u32, devices: &[(&str, u16)], live: bool) -> Header {
    Header {
        live,
        source: Vendor::Intel,
        vcpus,
        ram: vec![RamRange { base: 0, size: 8 * MIB }, RamRange { base: 4 << 30, size: 4 * MIB }],
        devices: devices.iter().map(|&(n, v)| DeviceInfo { name: n.to_string(), version: v }).collect(),
    }
}

pub const HIGH_GFN: u64 = (4 << 30) / PAGE_SIZE as u64;

/// How the writer is told about a page.
#[derive(Clone, Debug)]
pub enum Src {
    Data([u8; PAGE_SIZE]),
    Shared(u64, [u8; PAGE_SIZE]),
    Poisoned,
}

impl Src {
    pub fn expect(&self) -> Page {
        match self {
            Src::Data(d) | Src::Shared(_, d) if d.iter().all(|&b| b == 0) => Page::Zero,
            Src::Data(d) | Src::Shared(_, d) => Page::Data(d.to_vec()),
            Src::Poisoned => Page::Poisoned,
        }
    }
}

pub fn put<S: migrate::Sink>(w: &mut Writer<S>, gfn: u64, src: &Src) -> Result<(), migrate::Error> {
    match src {
        Src::Data(d) => w.page(gfn, d),
        Src::Shared(key, d) => w.shared_page(gfn, *key, d),
        Src::Poisoned => w.poisoned(gfn),
    }
}

/// The realistic VM: 4 vCPUs, 4 devices, and memory of every kind: zero
/// runs, text (compressible), random, shared duplicates, poisoned pages, and
/// a 2 MiB large-page run with zero pages and data inside.
pub struct Vm {
    pub header: Header,
    pub vcpus: Vec<GuestState>,
    pub devices: Vec<(String, u16, Vec<u8>)>,
    /// Memory in the order the writer gets it; `large` marks where a run
    /// starts.
    pub memory: Vec<(u64, Src)>,
    pub large: Vec<(u64, u32)>,
}

pub fn realistic_vm() -> Vm {
    let devices: Vec<(String, u16, Vec<u8>)> = vec![
        ("com1".into(), 1, vec![0x03, 0x00, 0x60, 0x00, 0xc1]),
        ("pit".into(), 2, (0u8..40).collect()),
        ("virtio-blk0".into(), 3, vec![0xab; 300]),
        ("debug-exit".into(), 1, vec![]),
    ];
    let dev_info: Vec<(&str, u16)> = devices.iter().map(|(n, v, _)| (n.as_str(), *v)).collect();
    let header = header(4, &dev_info, false);
    let mut rng = Rng(7);
    let mut memory = Vec::new();
    // Low RAM, pages 0..512: a mix, page by page.
    for gfn in 0..512u64 {
        let src = match gfn % 16 {
            0..=3 => Src::Data([0; PAGE_SIZE]),
            4..=7 => Src::Data(text_page(gfn)),
            8 | 9 => Src::Data(random_page(&mut rng)),
            10 => Src::Shared(gfn % 3, text_page(1000 + gfn % 3)),
            11 => Src::Shared(100 + gfn % 2, random_page(&mut Rng(100 + gfn % 2))),
            12 => Src::Data(almost_zero_page(gfn as usize)),
            13 if gfn % 64 == 13 => Src::Poisoned,
            _ => Src::Data(text_page(gfn / 32)),
        };
        memory.push((gfn, src));
    }
    // A 2 MiB large page at 2 MiB: mostly zero, some data, a random stretch.
    let large = vec![(512, 512)];
    for gfn in 512..1024u64 {
        let src = match gfn {
            512..=515 => Src::Data(text_page(gfn)),
            600..=640 => Src::Data(random_page(&mut rng)),
            700 => Src::Shared(0, text_page(1000)),
            _ => Src::Data([0; PAGE_SIZE]),
        };
        memory.push((gfn, src));
    }
    // Sparse pages after it; pages never sent stay absent.
    for gfn in (1100..2048u64).step_by(7) {
        memory.push((gfn, Src::Data(if gfn % 2 == 0 { text_page(gfn) } else { random_page(&mut rng) })));
    }
    // High RAM, above the hole.
    for i in 0..64u64 {
        let src = if i < 32 { Src::Data([0; PAGE_SIZE]) } else { Src::Data(text_page(i)) };
        memory.push((HIGH_GFN + i, src));
    }
    memory.push((HIGH_GFN + 1023, Src::Poisoned));
    let vcpus = (0..4).map(vcpu_state).collect();
    Vm { header, vcpus, devices, memory, large }
}

impl Vm {
    /// What a receiver should end up with.
    pub fn expected(&self) -> Model {
        let mut m = Model::default();
        for (i, s) in self.vcpus.iter().enumerate() {
            m.vcpus.insert(i as u32, s.clone());
        }
        for (n, v, b) in &self.devices {
            m.devices.insert(n.clone(), (*v, b.clone()));
        }
        for (gfn, src) in &self.memory {
            m.pages.insert(*gfn, src.expect());
        }
        m.large_runs = self.large.clone();
        m
    }

    /// Writes it as a checkpoint: vCPUs, devices, then memory.
    pub fn write(&self) -> (Vec<u8>, migrate::Stats) {
        let mut w = Writer::begin(Vec::new(), &self.header).unwrap();
        for (i, s) in self.vcpus.iter().enumerate() {
            w.vcpu(i as u32, s).unwrap();
        }
        for (n, v, b) in &self.devices {
            w.device(n, *v, b).unwrap();
        }
        for (gfn, src) in &self.memory {
            if let Some(&(g, pages)) = self.large.iter().find(|l| l.0 == *gfn) {
                w.large_run(g, pages).unwrap();
            }
            put(&mut w, *gfn, src).unwrap();
        }
        w.finish().unwrap()
    }
}

/// The records of a stream: (start, end) byte ranges, prologue excluded.
pub fn records(stream: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut at = 20;
    while at + 16 <= stream.len() {
        let len = u32::from_le_bytes(stream[at + 8..at + 12].try_into().unwrap()) as usize;
        let end = at + 16 + len + 4;
        out.push((at, end));
        at = end;
    }
    assert_eq!(at, stream.len(), "records do not tile the stream");
    out
}

/// A record with valid checksums around `payload`.
pub fn frame(kind: u8, version: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = vec![kind, 0];
    b.extend_from_slice(&version.to_le_bytes());
    b.extend_from_slice(&seq.to_le_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    let h = CRC32C.checksum(&b);
    b.extend_from_slice(&h.to_le_bytes());
    let mut d = CRC32C.digest();
    d.update(&b);
    d.update(payload);
    let p = d.finalize();
    b.extend_from_slice(payload);
    b.extend_from_slice(&p.to_le_bytes());
    b
}

/// A record as `forge` takes it: kind, version, payload.
pub type Rec = (u8, u16, Vec<u8>);

/// A record's parts: kind, version, seq, payload.
pub fn parts(rec: &[u8]) -> (u8, u16, u32, Vec<u8>) {
    let version = u16::from_le_bytes(rec[2..4].try_into().unwrap());
    let seq = u32::from_le_bytes(rec[4..8].try_into().unwrap());
    (rec[0], version, seq, rec[16..rec.len() - 4].to_vec())
}

/// Rebuilds a stream from its prologue and a list of records (each
/// `(kind, version, payload)`), numbering them in order, with a correct end
/// record: a forged stream only the format's rules can refuse.
pub fn forge(prologue: &[u8], recs: &[Rec]) -> Vec<u8> {
    let mut out = prologue.to_vec();
    let mut digest = CRC32C.digest();
    for (seq, (kind, version, payload)) in recs.iter().enumerate() {
        let f = frame(*kind, *version, seq as u32, payload);
        digest.update(&f[f.len() - 4..]);
        out.extend_from_slice(&f);
    }
    let mut end = Vec::new();
    end.extend_from_slice(&(recs.len() as u32).to_le_bytes());
    end.extend_from_slice(&digest.finalize().to_le_bytes());
    end.extend_from_slice(&(out.len() as u64).to_le_bytes());
    out.extend_from_slice(&frame(0x0f, 1, recs.len() as u32, &end));
    out
}

/// A stream's records other than the end record, as `forge` takes them.
pub fn unforge(stream: &[u8]) -> (Vec<u8>, Vec<Rec>) {
    let recs = records(stream);
    let body = recs[..recs.len() - 1]
        .iter()
        .map(|&(a, b)| {
            let (k, v, _, p) = parts(&stream[a..b]);
            (k, v, p)
        })
        .collect();
    (stream[..20].to_vec(), body)
}

/// A prologue with the given version and flags and a valid checksum.
pub fn prologue(major: u16, minor: u16, flags: u32) -> Vec<u8> {
    let mut b = migrate::MAGIC.to_vec();
    b.extend_from_slice(&major.to_le_bytes());
    b.extend_from_slice(&minor.to_le_bytes());
    b.extend_from_slice(&flags.to_le_bytes());
    let c = CRC32C.checksum(&b);
    b.extend_from_slice(&c.to_le_bytes());
    b
}
