//! Stream size and speed for a synthetic 64 MiB guest.
//!
//! `cargo bench -p migrate --bench stream`
//!
//! The guest: 16384 pages in runs of 1-64 neighbouring pages of one class
//! (real memory is clustered), drawn with these weights:
//!
//! | class | share | content |
//! | --- | --- | --- |
//! | zero | 40 % | all zeros (free memory, fresh heap) |
//! | text | 25 % | word-like bytes: compressible (code, page cache, logs) |
//! | sparse | 10 % | 256 random bytes at the start, zeros after (partly used heap) |
//! | random | 15 % | incompressible (encrypted or compressed data) |
//! | shared | 10 % | one of 64 contents, sent through `shared_page` |
//!
//! plus 16 poisoned pages; the first 8 aligned 2 MiB ranges are written as
//! large-page runs. Encoding writes a checkpoint stream (4 vCPUs, 3
//! devices, all pages) into a Vec; decoding applies it into a 64 MiB
//! buffer (every page copied or zeroed, as a restore does). Times are the
//! best of 5 rounds on this host's CPU, not under an emulator.

use std::hint::black_box;
use std::time::{Duration, Instant};

use migrate::{Apply, DeviceInfo, Header, PAGE_SIZE, PageKind, RamRange, Reader, Vendor, Writer};
use vcpu::GuestState;

const PAGES: u64 = 16_384;
const ROUNDS: usize = 5;
const LARGE_RUNS: u64 = 8;

/// splitmix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Class {
    Zero,
    Text,
    Sparse,
    Random,
    Shared(u64),
    Poisoned,
}

struct Guest {
    memory: Vec<u8>,
    class: Vec<Class>,
}

fn text(rng: &mut Rng, page: &mut [u8]) {
    const WORDS: [&[u8]; 12] = [
        b"mov ",
        b"rax, ",
        b"[rbp-0x18]",
        b"\n",
        b"call ",
        b"0xffffffff8100",
        b"kernel: ",
        b"page ",
        b"eth0 ",
        b"link up ",
        b"ret\n",
        b"    ",
    ];
    let mut i = 0;
    while i < page.len() {
        let w = WORDS[(rng.next() % 12) as usize];
        let n = w.len().min(page.len() - i);
        page[i..i + n].copy_from_slice(&w[..n]);
        i += n;
    }
}

fn guest() -> Guest {
    let mut rng = Rng(20_261_201);
    let mut memory = vec![0u8; PAGES as usize * PAGE_SIZE];
    let mut class = Vec::with_capacity(PAGES as usize);
    let mut shared = Vec::new();
    for i in 0..64 {
        let mut p = vec![0u8; PAGE_SIZE];
        Rng(i).fill(&mut p[..1024]);
        shared.push(p);
    }
    while (class.len() as u64) < PAGES {
        let run = 1 + rng.next() % 64;
        let c = match rng.next() % 100 {
            0..40 => Class::Zero,
            40..65 => Class::Text,
            65..75 => Class::Sparse,
            75..90 => Class::Random,
            _ => Class::Shared(0),
        };
        for _ in 0..run {
            let gfn = class.len();
            if gfn as u64 == PAGES {
                break;
            }
            let page = &mut memory[gfn * PAGE_SIZE..(gfn + 1) * PAGE_SIZE];
            let c = match c {
                Class::Text => {
                    text(&mut rng, page);
                    c
                }
                Class::Sparse => {
                    rng.fill(&mut page[..256]);
                    c
                }
                Class::Random => {
                    rng.fill(page);
                    c
                }
                Class::Shared(_) => {
                    let k = rng.next() % 64;
                    page.copy_from_slice(&shared[k as usize]);
                    Class::Shared(k)
                }
                c => c,
            };
            class.push(c);
        }
    }
    for _ in 0..16 {
        let gfn = (rng.next() % PAGES) as usize;
        class[gfn] = Class::Poisoned;
        memory[gfn * PAGE_SIZE..(gfn + 1) * PAGE_SIZE].fill(0);
    }
    Guest { memory, class }
}

fn header() -> Header {
    Header {
        live: false,
        source: Vendor::Intel,
        vcpus: 4,
        ram: vec![RamRange { base: 0, size: PAGES * PAGE_SIZE as u64 }],
        devices: ["com1", "pit", "virtio-blk0"]
            .iter()
            .map(|n| DeviceInfo { name: n.to_string(), version: 1 })
            .collect(),
    }
}

fn encode(g: &Guest, out: Vec<u8>) -> (Vec<u8>, migrate::Stats) {
    let h = header();
    let mut w = Writer::begin(out, &h).unwrap();
    for i in 0..4 {
        w.vcpu(i, &GuestState { rip: u64::from(i), ..GuestState::default() }).unwrap();
    }
    for d in &h.devices {
        w.device(&d.name, 1, &[0x5a; 64]).unwrap();
    }
    for gfn in 0..PAGES {
        if gfn % 512 == 0 && gfn / 512 < LARGE_RUNS {
            w.large_run(gfn, 512).unwrap();
        }
        let i = gfn as usize;
        let page: &[u8; PAGE_SIZE] = g.memory[i * PAGE_SIZE..(i + 1) * PAGE_SIZE].try_into().unwrap();
        match g.class[i] {
            Class::Poisoned => w.poisoned(gfn).unwrap(),
            Class::Shared(k) => w.shared_page(gfn, k, page).unwrap(),
            _ => w.page(gfn, page).unwrap(),
        }
    }
    w.finish().unwrap()
}

/// A restore target: guest RAM as one buffer.
struct Ram {
    memory: Vec<u8>,
    shared: Vec<[u8; PAGE_SIZE]>,
    poisoned: u64,
}

impl Ram {
    fn page(&mut self, gfn: u64) -> &mut [u8] {
        let i = gfn as usize * PAGE_SIZE;
        &mut self.memory[i..i + PAGE_SIZE]
    }
}

impl Apply for Ram {
    type Error = ();
    fn vcpu(&mut self, _: u32, s: GuestState) -> Result<(), ()> {
        black_box(s);
        Ok(())
    }
    fn device(&mut self, _: &str, _: u16, b: &[u8]) -> Result<(), ()> {
        black_box(b);
        Ok(())
    }
    fn large_run(&mut self, _: u64, _: u32) -> Result<(), ()> {
        Ok(())
    }
    fn pages(&mut self, gfn: u64, data: &[u8]) -> Result<(), ()> {
        let i = gfn as usize * PAGE_SIZE;
        self.memory[i..i + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn zero(&mut self, gfn: u64, pages: u32) -> Result<(), ()> {
        let i = gfn as usize * PAGE_SIZE;
        self.memory[i..i + pages as usize * PAGE_SIZE].fill(0);
        Ok(())
    }
    fn shared(&mut self, gfn: u64, id: u32, data: &[u8; PAGE_SIZE]) -> Result<(), ()> {
        assert_eq!(id as usize, self.shared.len());
        self.shared.push(*data);
        self.page(gfn).copy_from_slice(data);
        Ok(())
    }
    fn shared_ref(&mut self, gfn: u64, id: u32) -> Result<(), ()> {
        let data = self.shared[id as usize];
        self.page(gfn).copy_from_slice(&data);
        Ok(())
    }
    fn poisoned(&mut self, gfn: u64) -> Result<(), ()> {
        self.poisoned += 1;
        self.page(gfn).fill(0);
        Ok(())
    }
    fn pending(&mut self, _: u64, _: u32) -> Result<(), ()> {
        Ok(())
    }
    fn resume(&mut self) -> Result<(), ()> {
        Ok(())
    }
}

fn mib_s(bytes: usize, t: Duration) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / t.as_secs_f64()
}

fn main() {
    let g = guest();
    let raw = g.memory.len();

    let mut best_enc = Duration::MAX;
    let mut stream = Vec::new();
    let mut stats = None;
    for _ in 0..ROUNDS {
        let buf = Vec::with_capacity(raw);
        let t = Instant::now();
        let (s, st) = encode(&g, buf);
        best_enc = best_enc.min(t.elapsed());
        stream = s;
        stats = Some(st);
    }
    let stats = stats.unwrap();

    let mut best_dec = Duration::MAX;
    let mut best_verify = Duration::MAX;
    let mut ram = Ram { memory: vec![0xcc; raw], shared: Vec::new(), poisoned: 0 };
    for _ in 0..ROUNDS {
        ram.shared.clear();
        ram.poisoned = 0;
        let t = Instant::now();
        let read = Reader::open(&stream[..]).unwrap().apply(&mut ram).unwrap();
        best_dec = best_dec.min(t.elapsed());
        assert_eq!(read, stats);
        let t = Instant::now();
        black_box(migrate::verify(&stream).unwrap());
        best_verify = best_verify.min(t.elapsed());
    }
    assert!(ram.memory == g.memory, "the restored guest differs");
    assert_eq!(ram.poisoned, stats.pages(PageKind::Poisoned));

    println!("synthetic guest: {} MiB, {} pages, {} large-page runs", raw >> 20, PAGES, stats.large_runs);
    println!("{:<11} {:>7} {:>12} {:>11}", "page kind", "pages", "stream bytes", "bytes/page");
    for kind in PageKind::ALL {
        let (p, b) = (stats.pages(kind), stats.page_bytes(kind));
        let per = if p == 0 { 0.0 } else { b as f64 / p as f64 };
        println!("{:<11} {:>7} {:>12} {:>11.1}", kind.name(), p, b, per);
    }
    let entries: u64 = PageKind::ALL.iter().map(|&k| stats.page_bytes(k)).sum();
    println!(
        "stream: {} bytes in {} records ({} bytes of memory entries, {} of framing, vCPUs, devices, runs)",
        stats.bytes,
        stats.records,
        entries,
        stats.bytes - entries
    );
    let compressed_raw = stats.pages(PageKind::Compressed) as f64 * PAGE_SIZE as f64;
    println!(
        "LZ4 blocks: {:.2}:1 ({} pages in {} bytes); whole stream: {:.2}:1 against raw guest memory",
        compressed_raw / stats.page_bytes(PageKind::Compressed) as f64,
        stats.pages(PageKind::Compressed),
        stats.page_bytes(PageKind::Compressed),
        raw as f64 / stats.bytes as f64
    );
    println!(
        "encode {:.1} ms ({:.0} MiB/s of guest memory); apply {:.1} ms ({:.0} MiB/s); verify {:.1} ms ({:.0} MiB/s)",
        best_enc.as_secs_f64() * 1e3,
        mib_s(raw, best_enc),
        best_dec.as_secs_f64() * 1e3,
        mib_s(raw, best_dec),
        best_verify.as_secs_f64() * 1e3,
        mib_s(raw, best_verify)
    );
}
