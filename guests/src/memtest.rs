//! Memory-manager whole-system test: fills a region of guest RAM, waits
//! (HLT rounds) for the hypervisor to share or swap its pages, then checks
//! that every page still holds what the guest wrote. Every output line starts
//! with `memtest:`; the exit code is 0 on PASS, 1 on FAIL and 2 for a bad
//! command line or a region that does not fit in RAM.
//!
//! Command line (`key=value` words):
//! - `mode=share|swap|live` (default `share`);
//! - `mib=N`: region size (default 8), from 4 MiB guest-physical (or the
//!   first page above the image, if that is higher);
//! - `wait=N`: at most N HLT rounds of waiting (default 2000);
//! - `target=N`: stop waiting once the statistic reaches N pages (default:
//!   half the region's pages shared, counted inside the region with the
//!   SHARED_IN_RANGE hypercall, or 1 page of the VM swapped);
//! - `seed=S`: content seed (default 0);
//! - `passes=N`: swap mode's verification passes (default 3);
//! - `hold=1`: share mode, after filling, halt until a byte arrives on COM1
//!   (`vm send`), so the host can checkpoint the VM with the region full and
//!   the check still to come (on this host or wherever it is restored).
//!
//! Every mode prints `memtest: cpuid <hash>` at start, a hash of what CPUID
//! says about the machine (leaves 0, 1, 7.0 and 0x80000000-4; without leaf
//! 1's APIC ID and OSXSAVE, which describe the vCPU and its CR4), and
//! `hold=1` prints it again once released (`cpuid after release`): a
//! checkpoint restored on another host shows whether the CPUID changed.
//!
//! share: page i holds words that depend only on i and the seed (so identical
//! VMs given the same seed have identical pages), and pages with i % 8 in
//! {1, 2} are all zero (a quarter: the zero frame). After the wait, every
//! even page gets one VM-specific word (breaking copy-on-write, half of the
//! zero pages included); then every word of every page is checked.
//!
//! live: for live checkpoints. The region's first page holds one word,
//! `round << 32 | cursor`, written in one store; the other pages are
//! rewritten over and over, in order, each whole page with words of the
//! next round, the header word stepping past it after each page. So at any
//! instant pages `1..cursor` hold round `round + 1` and pages
//! `cursor..` round `round` (the page being written, a mix). Between pages
//! it reads COM1: `c` checks that every page agrees with the header (a
//! checkpoint that is not one instant, some pages newer or older than its
//! header, fails) and goes on; `q` checks and exits.
//!
//! dirty: for live migration; live mode's pages and header, rewritten at
//! `rate=N` pages per millisecond or `pps=N` pages per second (0: as
//! fast as it can; the TSC is calibrated against PIT counter 2 at start),
//! and the longest gap
//! between two page writes measured with RDTSC: the pause the guest saw
//! (a migration's switch-over, or any time the host did not run it).
//! `c` on COM1 checks every page against the header and prints the
//! longest pause; `q` checks and exits.
//!
//! swap: page contents depend on the page, the seed and the VM id, so no
//! sharing can help; after the wait the region is checked in several passes
//! (with one HLT between them) and its checksum compared.
use crate::hypercall as hc;
use crate::io::{cpuid, halt_once, hypercall, hypercall_args, inb, outb, rdtsc};
use crate::{Boot, print, println};
use core::fmt;

const PAGE: u64 = 4096;
const WORDS: u64 = PAGE / 8;
/// Where the region starts unless the image reaches higher: well above the
/// image (1 MiB up) and the hypervisor's boot structures (first 64 KiB).
const REGION_BASE: u64 = 4 << 20;
/// Odd multiplier (2^64 / golden ratio) that spreads a word index.
const SPREAD: u64 = 0x9e37_79b9_7f4a_7c15;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Share,
    Swap,
    Live,
    Dirty,
}

struct Options {
    mode: Mode,
    mib: u64,
    wait: u64,
    target: Option<u64>,
    seed: u64,
    passes: u64,
    hold: bool,
    /// dirty mode: pages per second (0: unlimited); `rate=` sets it in
    /// pages per millisecond, `pps=` per second (below 1 page/ms: a slow
    /// link, as Bochs' is, can then still outrun the guest).
    rate_pps: u64,
}

fn parse(cmdline: &str) -> Result<Options, &str> {
    let mut o =
        Options { mode: Mode::Share, mib: 8, wait: 2000, target: None, seed: 0, passes: 3, hold: false, rate_pps: 0 };
    for (i, word) in cmdline.split_whitespace().enumerate() {
        // Multiboot loaders (QEMU's `-kernel`, GRUB) put the kernel's file
        // name first.
        if i == 0 && !word.contains('=') && word.contains('/') {
            continue;
        }
        let (key, value) = word.split_once('=').ok_or(word)?;
        let num = || parse_u64(value).ok_or(word);
        match key {
            "mode" if value == "share" => o.mode = Mode::Share,
            "mode" if value == "swap" => o.mode = Mode::Swap,
            "mode" if value == "live" => o.mode = Mode::Live,
            "mode" if value == "dirty" => o.mode = Mode::Dirty,
            "rate" => o.rate_pps = num()?.saturating_mul(1000),
            "pps" => o.rate_pps = num()?,
            "mib" => o.mib = num()?,
            "wait" => o.wait = num()?,
            "target" => o.target = Some(num()?),
            "seed" => o.seed = num()?,
            "passes" => o.passes = num()?,
            "hold" => o.hold = num()? != 0,
            _ => return Err(word),
        }
    }
    Ok(o)
}

/// Decimal, or hexadecimal with `0x`.
fn parse_u64(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// A statistic of this VM, `None` if the hypervisor does not know it.
fn stat(which: u64) -> Option<u64> {
    let v = hypercall(hc::STAT, which, 0);
    (v != hc::UNKNOWN).then_some(v)
}

/// Prints a statistic's value, or `unsupported`.
struct Stat(Option<u64>);

impl fmt::Display for Stat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(v) => write!(f, "{v}"),
            None => f.write_str("unsupported"),
        }
    }
}

/// A 64-bit mixing function (xorshift-multiply rounds): every input bit
/// affects every output bit.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 31;
    x = x.wrapping_mul(0xd6e8_feb8_6659_fd93);
    x ^= x >> 32;
    x = x.wrapping_mul(0xd6e8_feb8_6659_fd93);
    x ^ (x >> 32)
}

/// A hash of the machine's CPUID (see the module comment).
fn cpuid_hash() -> u64 {
    let leaves = [(0, 0), (1, 0), (7, 0), (0x8000_0000, 0), (0x8000_0001, 0)];
    let brand = [(0x8000_0002, 0), (0x8000_0003, 0), (0x8000_0004, 0)];
    let mut h = 0;
    for (leaf, sub) in leaves.into_iter().chain(brand) {
        let mut r = cpuid(leaf, sub);
        if leaf == 1 {
            // Initial APIC ID (EBX[31:24]) and OSXSAVE (ECX[27]).
            r.ebx &= 0x00ff_ffff;
            r.ecx &= !(1 << 27);
        }
        for w in [r.eax, r.ebx, r.ecx, r.edx] {
            h = mix(h ^ u64::from(w));
        }
    }
    h
}

/// The guest-physical region under test, in whole pages.
#[derive(Clone, Copy)]
struct Region {
    start: u64,
    pages: u64,
}

impl Region {
    fn gpa(&self, page: u64, word: u64) -> u64 {
        self.start + page * PAGE + word * 8
    }

    fn write(&self, page: u64, word: u64, v: u64) {
        // SAFETY: `main` checked that the region lies in guest RAM (identity-
        // mapped by the boot protocol) above this program's image, page
        // tables and stack, and nothing else uses it.
        unsafe { core::ptr::write_volatile(self.gpa(page, word) as *mut u64, v) }
    }

    fn read(&self, page: u64, word: u64) -> u64 {
        // SAFETY: as in `write`.
        unsafe { core::ptr::read_volatile(self.gpa(page, word) as *const u64) }
    }

    /// Writes `content(page, word)` everywhere; the checksum of what was
    /// written.
    fn fill(&self, content: impl Fn(u64, u64) -> u64) -> u64 {
        let mut sum = Checksum::new();
        for p in 0..self.pages {
            for w in 0..WORDS {
                let v = content(p, w);
                self.write(p, w, v);
                sum.add(v);
            }
        }
        sum.0
    }

    /// Compares every word with `expected(page, word)`.
    fn verify(&self, expected: impl Fn(u64, u64) -> u64) -> Mismatches {
        let mut m = Mismatches { first: None, count: 0 };
        for p in 0..self.pages {
            for w in 0..WORDS {
                let (want, found) = (expected(p, w), self.read(p, w));
                if want != found {
                    m.count += 1;
                    if m.first.is_none() {
                        m.first = Some(Mismatch { gpa: self.gpa(p, 0), offset: w * 8, want, found });
                    }
                }
            }
        }
        m
    }

    fn checksum(&self) -> u64 {
        let mut sum = Checksum::new();
        for p in 0..self.pages {
            for w in 0..WORDS {
                sum.add(self.read(p, w));
            }
        }
        sum.0
    }
}

/// Halts until `value()` reaches `target` or `wait` rounds pass: the last
/// value (`None`: unsupported, not waited) and the rounds.
fn wait_for(value: impl Fn() -> Option<u64>, target: u64, wait: u64) -> (Option<u64>, u64) {
    let mut rounds = 0;
    let mut n = value();
    while let Some(v) = n {
        if v >= target || rounds >= wait {
            break;
        }
        halt_once();
        rounds += 1;
        n = value();
    }
    (n, rounds)
}

/// Pages of `region` the hypervisor maps shared (or to the zero page).
fn shared_in(region: Region) -> Option<u64> {
    let (mut start, mut len, mut total) = (region.start, region.pages * PAGE, 0);
    // Each call covers a bounded part and hands back the rest.
    while len > 0 {
        let (v, next, rest) = hypercall_args(hc::SHARED_IN_RANGE, start, len);
        if v == hc::UNKNOWN || rest >= len {
            return None;
        }
        (total, start, len) = (total + v, next, rest);
    }
    Some(total)
}

/// An order-dependent checksum of 64-bit words.
struct Checksum(u64);

impl Checksum {
    fn new() -> Self {
        Checksum(0xcbf2_9ce4_8422_2325)
    }

    fn add(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(23) ^ v).wrapping_mul(0x0000_0100_0000_01b3);
    }
}

struct Mismatch {
    gpa: u64,
    offset: u64,
    want: u64,
    found: u64,
}

struct Mismatches {
    first: Option<Mismatch>,
    count: u64,
}

impl Mismatches {
    fn merge(&mut self, other: Mismatches) {
        self.count += other.count;
        if self.first.is_none() {
            self.first = other.first;
        }
    }

    /// Prints PASS, or FAIL with the first mismatch; whether it passed.
    fn report(&self) -> bool {
        self.report_as("memtest")
    }

    /// `report`, for the program `who`.
    fn report_as(&self, who: &str) -> bool {
        match &self.first {
            None => {
                println!("{who}: PASS");
                true
            }
            Some(m) => {
                println!(
                    "{who}: FAIL page {:#x} offset {}: expected {:#018x} found {:#018x} ({} mismatched reads)",
                    m.gpa, m.offset, m.want, m.found, self.count
                );
                false
            }
        }
    }
}

/// The test; its exit code.
pub fn main(boot: Boot) -> u32 {
    let o = match parse(boot.cmdline()) {
        Ok(o) => o,
        Err(word) => {
            println!(
                "memtest: error: bad option {word:?} (mode=share|swap|live|dirty mib= wait= target= seed= passes= hold= rate= pps=)"
            );
            return 2;
        }
    };
    let start = REGION_BASE.max(crate::image_end().next_multiple_of(PAGE));
    let ram = boot.ram_bytes();
    let end = o.mib.checked_mul(1 << 20).and_then(|len| start.checked_add(len));
    let end = match end {
        Some(end) if o.mib > 0 && end <= ram => end,
        _ => {
            println!("memtest: error: a {} MiB region from {start:#x} does not fit in {} MiB of RAM", o.mib, ram >> 20);
            return 2;
        }
    };
    let region = Region { start, pages: (end - start) / PAGE };
    let mode = match o.mode {
        Mode::Share => "share",
        Mode::Swap => "swap",
        Mode::Live => "live",
        Mode::Dirty => "dirty",
    };
    println!("memtest: mode={mode} region {start:#x}..{end:#x} ({} pages)", region.pages);
    println!("memtest: cpuid {:016x}", cpuid_hash());
    // Only share and swap ask the hypervisor (live and dirty run on any
    // machine: `memtest-mb` under plain QEMU is the migration baseline).
    let vm_id = || hypercall(hc::VM_ID, 0, 0);
    let passed = match o.mode {
        Mode::Share => share(&o, region, vm_id()),
        Mode::Swap => swap(&o, region, vm_id()),
        Mode::Live => live(&o, region),
        Mode::Dirty => live(&o, region),
    };
    if passed { 0 } else { 1 }
}

/// share mode: page `p`'s original word `w`.
fn shared_content(seed: u64, p: u64, w: u64) -> u64 {
    if matches!(p % 8, 1 | 2) { 0 } else { mix(seed ^ mix(p)) ^ w.wrapping_mul(SPREAD) }
}

fn share(o: &Options, region: Region, vm_id: u64) -> bool {
    let seed = o.seed;
    let sum = region.fill(|p, w| shared_content(seed, p, w));
    println!("memtest: filled {} pages ({} MiB), checksum {sum:#018x}", region.pages, o.mib);
    if o.hold {
        println!("memtest: holding until a byte arrives on COM1");
        // LSR bit 0: data ready (16550).
        while inb(0x3fd) & 1 == 0 {
            halt_once();
        }
        let key = inb(0x3f8);
        println!("memtest: released by {key:#04x}");
        println!("memtest: cpuid after release {:016x}", cpuid_hash());
    }

    let target = o.target.unwrap_or(region.pages / 2);
    match wait_for(|| shared_in(region), target, o.wait) {
        (Some(n), rounds) => println!("memtest: {n} of {} region pages shared after {rounds} rounds", region.pages),
        (None, _) => println!("memtest: shared-page statistic unsupported, not waiting"),
    }

    // One word in every even page: which word moves with the page, the
    // value names the VM and the page.
    let written_word = |p: u64| (p / 2) % WORDS;
    let mark = |p: u64| 0x4d54_0000_0000_0000 | ((vm_id & 0xffff) << 32) | p;
    let mut written = 0;
    for p in (0..region.pages).step_by(2) {
        region.write(p, written_word(p), mark(p));
        written += 1;
    }
    let bad =
        region.verify(|p, w| if p % 2 == 0 && w == written_word(p) { mark(p) } else { shared_content(seed, p, w) });
    println!("memtest: verified {} pages, {written} written after sharing", region.pages);
    let passed = bad.report();
    match stat(hc::STAT_SHARED_PAGES) {
        Some(n) => println!("memtest: {n} pages shared at end"),
        None => println!("memtest: shared-page statistic unsupported at end"),
    }
    passed
}

/// swap mode: words unique to this VM, seed, page and word.
fn swap_content(key: u64, p: u64, w: u64) -> u64 {
    mix(key ^ p) ^ w.wrapping_mul(SPREAD)
}

fn swap(o: &Options, region: Region, vm_id: u64) -> bool {
    let key = mix(o.seed ^ mix(vm_id.rotate_left(32) ^ 0x7377_6170));
    let expected = region.fill(|p, w| swap_content(key, p, w));
    println!("memtest: filled {} pages ({} MiB), checksum {expected:#018x}", region.pages, o.mib);

    match wait_for(|| stat(hc::STAT_SWAPPED_PAGES), o.target.unwrap_or(1), o.wait) {
        (Some(n), rounds) => println!("memtest: {n} pages swapped after {rounds} rounds"),
        (None, _) => println!("memtest: swapped-page statistic unsupported, not waiting"),
    }

    let mut bad = Mismatches { first: None, count: 0 };
    for pass in 1..=o.passes {
        if pass > 1 {
            // Give the hypervisor a chance to swap pages out again.
            halt_once();
        }
        bad.merge(region.verify(|p, w| swap_content(key, p, w)));
        println!(
            "memtest: pass {pass} verified {} pages, page-ins {}, swapped {}",
            region.pages,
            Stat(stat(hc::STAT_PAGE_INS)),
            Stat(stat(hc::STAT_SWAPPED_PAGES))
        );
    }
    let sum = region.checksum();
    println!("memtest: checksum {sum:#018x} (expected {expected:#018x})");
    if bad.first.is_none() && sum != expected {
        println!("memtest: FAIL checksum");
        return false;
    }
    bad.report()
}

/// live mode: data page `p`'s word `w` in round `r`.
fn live_content(seed: u64, r: u64, p: u64, w: u64) -> u64 {
    mix(seed ^ mix(p ^ (r << 40))) ^ w.wrapping_mul(SPREAD)
}

/// One writer of live mode's pattern over a region (see the module's
/// `live`): memtest runs one, `smptest live=1` one per vCPU, each on its own
/// pages. Between two [`LiveWriter::step`]s the header word says exactly
/// what every page holds, which [`LiveWriter::check`] verifies.
pub struct LiveWriter {
    region: Region,
    seed: u64,
}

/// What [`LiveWriter::check`] found.
pub struct LiveCheck {
    pub round: u64,
    pub cursor: u64,
    bad: Mismatches,
}

impl LiveCheck {
    /// Every word agrees with the header.
    pub fn agrees(&self) -> bool {
        self.bad.first.is_none()
    }

    /// Prints `<who>: PASS`, or `<who>: FAIL` with the first word that
    /// disagrees; whether it passed.
    pub fn report(&self, who: &str) -> bool {
        self.bad.report_as(who)
    }
}

impl LiveWriter {
    /// Writes round 0 over `pages` pages (at least 2) from `start`, header
    /// first, and returns the writer.
    ///
    /// # Safety
    /// The pages are guest RAM, identity-mapped, used by nothing else.
    pub unsafe fn new(start: u64, pages: u64, seed: u64) -> Option<Self> {
        if pages < 2 {
            return None;
        }
        let region = Region { start, pages };
        region.write(0, 0, live_header(0, 1));
        for p in 1..pages {
            for w in 0..WORDS {
                region.write(p, w, live_content(seed, 0, p, w));
            }
        }
        Some(LiveWriter { region, seed })
    }

    /// Data pages (the header page aside).
    pub fn pages(&self) -> u64 {
        self.region.pages - 1
    }

    /// The next page, whole, in the next round, then the header past it
    /// (one store).
    pub fn step(&self) {
        let h = self.region.read(0, 0);
        let (round, p) = (h >> 32, h & 0xffff_ffff);
        for w in 0..WORDS {
            self.region.write(p, w, live_content(self.seed, round + 1, p, w));
        }
        let next = if p + 1 == self.region.pages { live_header(round + 1, 1) } else { live_header(round, p + 1) };
        self.region.write(0, 0, next);
    }

    /// Every page against the header: pages before the cursor hold the
    /// next round, the others this one.
    pub fn check(&self) -> LiveCheck {
        let h = self.region.read(0, 0);
        let (round, cursor) = (h >> 32, h & 0xffff_ffff);
        let bad = self.region.verify(|p, w| match p {
            0 if w == 0 => h,
            0 => 0,
            p if p < cursor => live_content(self.seed, round + 1, p, w),
            p => live_content(self.seed, round, p, w),
        });
        LiveCheck { round, cursor, bad }
    }
}

/// live mode's header word: `round << 32 | cursor`.
fn live_header(round: u64, cursor: u64) -> u64 {
    (round << 32) | cursor
}

fn live(o: &Options, region: Region) -> bool {
    // SAFETY: `main` checked the region (see `Region::write`).
    let Some(writer) = (unsafe { LiveWriter::new(region.start, region.pages, o.seed) }) else {
        println!("memtest: error: live mode needs at least 2 pages");
        return false;
    };
    let dirty = o.mode == Mode::Dirty;
    let khz = if dirty { tsc_khz() } else { 0 };
    if dirty {
        println!("memtest: dirty: {} pages at {} pages/s (0: unlimited), tsc {khz} kHz", writer.pages(), o.rate_pps);
    } else {
        println!("memtest: live: rewriting {} pages in rounds; c checks, q checks and exits", writer.pages());
    }
    let mut checks = 0u64;
    // Rate limit: pages written since `t_start`, allowed `rate_pps` per
    // second (counted in whole ms, at least one page of burst).
    let (t_start, mut written) = (rdtsc(), 0u64);
    let (mut last, mut longest) = (rdtsc(), 0u64);
    // Where the pauses fell: the four longest (start in ms since the
    // start, length in TSC ticks) and how many passed 5, 10 and 20 ms, so
    // a migration's pauses can be told apart (one switch-over, or a
    // pre-copy step after another).
    let mut worst = [(0u64, 0u64); 4];
    let mut over = [0u64; 3];
    loop {
        let now = rdtsc();
        let gap = now.wrapping_sub(last);
        longest = longest.max(gap);
        if dirty && khz > 0 {
            for (n, ms) in over.iter_mut().zip([5, 10, 20]) {
                *n += u64::from(gap >= ms * khz);
            }
            if let Some(w) = worst.iter_mut().min_by_key(|w| w.1).filter(|w| gap > w.1) {
                *w = (last.wrapping_sub(t_start) / khz, gap);
            }
        }
        last = now;
        let ms = now.wrapping_sub(t_start) / khz.max(1);
        let allowed = ms.saturating_mul(o.rate_pps) / 1000 + (o.rate_pps / 1000).max(1);
        if dirty && o.rate_pps > 0 && written >= allowed {
            // Ahead of the rate: spin (a HLT would wait for the next
            // timer tick, and count as a pause).
            core::hint::spin_loop();
            continue;
        }
        written += 1;
        // Between pages: the header says exactly what every page holds.
        if inb(0x3fd) & 1 != 0 {
            let key = inb(0x3f8);
            if key == b'c' || key == b'q' {
                checks += 1;
                let c = writer.check();
                println!(
                    "memtest: live check {checks}: round {} cursor {}, {} pages{}",
                    c.round,
                    c.cursor,
                    writer.pages(),
                    if c.agrees() { " agree with the header" } else { "" }
                );
                if dirty {
                    println!("memtest: dirty: {written} page writes, longest pause {} us", longest * 1000 / khz.max(1));
                    worst.sort_unstable_by_key(|w| w.0);
                    print!(
                        "memtest: dirty: pauses over 5/10/20 ms: {}/{}/{}; the longest at",
                        over[0], over[1], over[2]
                    );
                    for (at, ticks) in worst.iter().filter(|w| w.1 > 0) {
                        print!(" {at} ms ({} us)", ticks * 1000 / khz.max(1));
                    }
                    println!();
                }
                let passed = c.report("memtest");
                if key == b'q' || !passed {
                    return passed;
                }
                // The check's own time is not a pause.
                last = rdtsc();
            }
        }
        writer.step();
    }
}

/// The TSC's rate in kHz, from 10 ms of PIT counter 2 (1.193182 MHz):
/// gate on (port 0x61 bit 0), speaker off, mode 0 counts down once and
/// raises its output (port 0x61 bit 5) at zero.
fn tsc_khz() -> u64 {
    const COUNT: u16 = 11932;
    let gate = inb(0x61);
    outb(0x61, (gate & !0x02) | 0x01);
    outb(0x43, 0xb0);
    outb(0x42, COUNT as u8);
    outb(0x42, (COUNT >> 8) as u8);
    let t0 = rdtsc();
    while inb(0x61) & 0x20 == 0 {}
    (rdtsc() - t0) / 10
}
