//! A VM's guest-physical memory map: RAM ranges and named MMIO holes.

use alloc::string::String;
use alloc::vec::Vec;

use crate::addr::{GUEST_PHYS_LIMIT, GuestPhysAddr, PAGE_SIZE_1G, PAGE_SIZE_4K};
use crate::error::Error;

/// Index of an MMIO region in its [`MemoryMap`] (stable: regions are only
/// ever added).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct MmioId(pub u32);

/// What a region of the map is.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum RegionKind {
    /// Guest RAM (backed by host memory, mapped in the nested page table).
    Ram,
    /// A device window: accesses fault and go to device emulation.
    Mmio {
        /// Its index.
        id: MmioId,
        /// A name for messages and for the device model ("ioapic", ...).
        name: String,
    },
}

/// One region of the map.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Region {
    /// First guest-physical address.
    pub gpa: GuestPhysAddr,
    /// Length in bytes (a multiple of 4 KiB).
    pub size: u64,
    /// RAM or MMIO.
    pub kind: RegionKind,
}

impl Region {
    /// One past the last address.
    pub fn end(&self) -> u64 {
        self.gpa.0 + self.size
    }
}

/// What a guest-physical address is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Lookup<'a> {
    /// RAM.
    Ram,
    /// Inside an MMIO region, at `offset` from its start.
    Mmio {
        /// Which region.
        id: MmioId,
        /// Its name.
        name: &'a str,
        /// Offset of the address inside the region.
        offset: u64,
    },
    /// Nothing: an access here means the VM must be stopped.
    Nothing,
}

/// A VM's guest-physical memory map. Regions are 4 KiB-aligned, non-empty and
/// never overlap; lookups are a binary search.
#[derive(Clone, Default, PartialEq, Eq, Debug)]
pub struct MemoryMap {
    /// Sorted by address.
    regions: Vec<Region>,
    mmio_count: u32,
}

impl MemoryMap {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// `size` bytes of RAM at guest-physical 0 and nothing else.
    pub fn ram_only(size: u64) -> Result<Self, Error> {
        let mut map = Self::new();
        map.add_ram(GuestPhysAddr(0), size)?;
        Ok(map)
    }

    /// A PC-like layout: RAM from 0 up to 3 GiB (or `ram` if less), the rest
    /// above 4 GiB, and the 3..4 GiB hole holding the PCI window, the IOAPIC
    /// (0xFEC0_0000) and the local APIC (0xFEE0_0000) as named MMIO regions.
    pub fn pc(ram: u64) -> Result<Self, Error> {
        const HOLE: u64 = 3 * PAGE_SIZE_1G;
        let mut map = Self::new();
        map.add_ram(GuestPhysAddr(0), ram.min(HOLE))?;
        map.add_mmio(GuestPhysAddr(HOLE), 0xFEC0_0000 - HOLE, "pci")?;
        map.add_mmio(GuestPhysAddr(0xFEC0_0000), PAGE_SIZE_4K, "ioapic")?;
        map.add_mmio(GuestPhysAddr(0xFEE0_0000), PAGE_SIZE_4K, "lapic")?;
        if ram > HOLE {
            map.add_ram(GuestPhysAddr(4 * PAGE_SIZE_1G), ram - HOLE)?;
        }
        Ok(map)
    }

    /// Add a RAM range.
    pub fn add_ram(&mut self, gpa: GuestPhysAddr, size: u64) -> Result<(), Error> {
        self.insert(Region { gpa, size, kind: RegionKind::Ram })
    }

    /// Add a named MMIO region; returns its id.
    pub fn add_mmio(&mut self, gpa: GuestPhysAddr, size: u64, name: &str) -> Result<MmioId, Error> {
        let id = MmioId(self.mmio_count);
        self.insert(Region { gpa, size, kind: RegionKind::Mmio { id, name: String::from(name) } })?;
        self.mmio_count += 1;
        Ok(id)
    }

    fn insert(&mut self, region: Region) -> Result<(), Error> {
        let bad = Error::InvalidMemoryMap { gpa: region.gpa, size: region.size };
        let end = region.gpa.0.checked_add(region.size).ok_or(bad)?;
        if region.size == 0
            || !region.gpa.is_aligned(PAGE_SIZE_4K)
            || !region.size.is_multiple_of(PAGE_SIZE_4K)
            || end > GUEST_PHYS_LIMIT
        {
            return Err(bad);
        }
        let at = self.regions.partition_point(|r| r.gpa < region.gpa);
        let overlaps_prev = at > 0 && self.regions[at - 1].end() > region.gpa.0;
        let overlaps_next = self.regions.get(at).is_some_and(|r| r.gpa.0 < end);
        if overlaps_prev || overlaps_next {
            return Err(bad);
        }
        self.regions.insert(at, region);
        Ok(())
    }

    /// What `gpa` is.
    pub fn lookup(&self, gpa: GuestPhysAddr) -> Lookup<'_> {
        let Some(i) = self.regions.partition_point(|r| r.gpa <= gpa).checked_sub(1) else {
            return Lookup::Nothing;
        };
        let r = &self.regions[i];
        if gpa.0 >= r.end() {
            return Lookup::Nothing;
        }
        match &r.kind {
            RegionKind::Ram => Lookup::Ram,
            RegionKind::Mmio { id, name } => Lookup::Mmio { id: *id, name, offset: gpa.0 - r.gpa.0 },
        }
    }

    /// All regions, in address order.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// The RAM ranges `(start, size)`, in address order.
    pub fn ram_ranges(&self) -> impl Iterator<Item = (GuestPhysAddr, u64)> + '_ {
        self.regions.iter().filter(|r| r.kind == RegionKind::Ram).map(|r| (r.gpa, r.size))
    }

    /// Total RAM bytes.
    pub fn ram_bytes(&self) -> u64 {
        self.ram_ranges().map(|r| r.1).sum()
    }

    /// The MMIO region `id`.
    pub fn mmio(&self, id: MmioId) -> Option<&Region> {
        self.regions.iter().find(|r| matches!(&r.kind, RegionKind::Mmio { id: i, .. } if *i == id))
    }

    /// Heap bytes of the region list.
    pub(crate) fn bookkeeping_bytes(&self) -> u64 {
        let names: usize = self
            .regions
            .iter()
            .map(|r| match &r.kind {
                RegionKind::Mmio { name, .. } => name.capacity(),
                RegionKind::Ram => 0,
            })
            .sum();
        (self.regions.capacity() * core::mem::size_of::<Region>() + names) as u64
    }
}
