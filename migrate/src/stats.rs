//! What a stream held, counted the same way by the writer and the reader
//! (the round-trip tests compare the two).

/// How a page travelled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageKind {
    /// 4 KiB of data as is.
    Normal,
    /// A flag: the page is all zeros.
    Zero,
    /// Part of an LZ4 block.
    Compressed,
    /// The first page with a shared content: the content, with its id.
    Shared,
    /// A later page with that content: the id only.
    SharedRef,
    /// Hit by an uncorrectable memory error: metadata only.
    Poisoned,
}

impl PageKind {
    pub const ALL: [PageKind; 6] = [
        PageKind::Normal,
        PageKind::Zero,
        PageKind::Compressed,
        PageKind::Shared,
        PageKind::SharedRef,
        PageKind::Poisoned,
    ];

    pub fn name(self) -> &'static str {
        match self {
            PageKind::Normal => "normal",
            PageKind::Zero => "zero",
            PageKind::Compressed => "compressed",
            PageKind::Shared => "shared",
            PageKind::SharedRef => "shared-ref",
            PageKind::Poisoned => "poisoned",
        }
    }
}

/// Counts of a stream's contents.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Records, the end record included.
    pub records: u32,
    /// Stream bytes, prologue to end record.
    pub bytes: u64,
    pub vcpus: u32,
    pub devices: u32,
    pub large_runs: u64,
    /// Post-copy: pages the pending records said come after the resume
    /// record (saturating).
    pub pending_pages: u64,
    pages: [u64; 6],
    entry_bytes: [u64; 6],
}

impl Stats {
    /// Pages that travelled as `kind`.
    pub fn pages(&self, kind: PageKind) -> u64 {
        self.pages[kind as usize]
    }

    /// Bytes of memory entries of `kind` (record framing not included).
    pub fn page_bytes(&self, kind: PageKind) -> u64 {
        self.entry_bytes[kind as usize]
    }

    /// Guest pages the stream carried, poisoned ones included.
    pub fn total_pages(&self) -> u64 {
        self.pages.iter().sum()
    }

    /// Saturating: a hostile stream long enough to overflow a count must
    /// not panic the host (overflow checks stay on in release builds).
    pub(crate) fn add(&mut self, kind: PageKind, pages: u64, bytes: usize) {
        self.pages[kind as usize] = self.pages[kind as usize].saturating_add(pages);
        self.entry_bytes[kind as usize] = self.entry_bytes[kind as usize].saturating_add(bytes as u64);
    }
}
