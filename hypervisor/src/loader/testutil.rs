//! Byte-by-byte builders for the loader's tests: minimal ELF64/ELF32
//! executables, Multiboot headers and Linux bzImages.

use alloc::vec::Vec;

use super::linux::{loadflags, off, xloadflags};

pub use elf::abi::{PF_R, PF_W, PF_X, PT_LOAD, PT_NOTE};

/// Offsets of ELF header fields shared by both classes.
pub const E_IDENT_CLASS: usize = 4;
pub const E_IDENT_DATA: usize = 5;
pub const E_TYPE: usize = 16;
pub const E_MACHINE: usize = 18;
/// Size of the ELF64 header and of one ELF64 program header.
pub const EHDR64: usize = 64;
pub const PHDR64: usize = 56;
/// Size of the ELF32 header and of one ELF32 program header.
pub const EHDR32: usize = 52;
pub const PHDR32: usize = 32;

/// One program header and the file bytes it covers.
#[derive(Clone)]
pub struct Seg {
    pub p_type: u32,
    pub flags: u32,
    pub vaddr: u64,
    pub paddr: u64,
    pub data: Vec<u8>,
    pub memsz: u64,
}

impl Seg {
    /// A loadable, executable segment at `paddr` (identity-mapped).
    pub fn text(paddr: u64, data: &[u8]) -> Self {
        Self { p_type: PT_LOAD, flags: PF_R | PF_X, vaddr: paddr, paddr, data: data.to_vec(), memsz: data.len() as u64 }
    }

    /// A loadable, writable segment with `memsz - data.len()` bytes of bss.
    pub fn data(paddr: u64, data: &[u8], memsz: u64) -> Self {
        Self { p_type: PT_LOAD, flags: PF_R | PF_W, vaddr: paddr, paddr, data: data.to_vec(), memsz }
    }
}

fn put(buf: &mut [u8], at: usize, bytes: &[u8]) {
    buf[at..at + bytes.len()].copy_from_slice(bytes);
}

fn ident(class: u8) -> [u8; 16] {
    let mut id = [0u8; 16];
    id[..4].copy_from_slice(b"\x7fELF");
    id[4] = class;
    id[5] = 1; // little-endian
    id[6] = 1; // EV_CURRENT
    id
}

/// File offset of segment `i`'s data: after the headers, in order.
fn data_offsets(headers: usize, segs: &[Seg]) -> Vec<usize> {
    let mut at = headers;
    segs.iter()
        .map(|s| {
            let this = at;
            at += s.data.len();
            this
        })
        .collect()
}

/// An ELF64 x86-64 ET_EXEC with `segs`, entry `entry`, no sections.
pub fn elf64(entry: u64, segs: &[Seg]) -> Vec<u8> {
    let headers = EHDR64 + PHDR64 * segs.len();
    let offsets = data_offsets(headers, segs);
    let mut out = alloc::vec![0u8; headers];
    put(&mut out, 0, &ident(2));
    put(&mut out, E_TYPE, &2u16.to_le_bytes());
    put(&mut out, E_MACHINE, &62u16.to_le_bytes());
    put(&mut out, 20, &1u32.to_le_bytes());
    put(&mut out, 24, &entry.to_le_bytes());
    put(&mut out, 32, &(EHDR64 as u64).to_le_bytes());
    put(&mut out, 52, &(EHDR64 as u16).to_le_bytes());
    put(&mut out, 54, &(PHDR64 as u16).to_le_bytes());
    put(&mut out, 56, &(segs.len() as u16).to_le_bytes());
    for (i, (s, &off)) in segs.iter().zip(&offsets).enumerate() {
        let ph = EHDR64 + PHDR64 * i;
        put(&mut out, ph, &s.p_type.to_le_bytes());
        put(&mut out, ph + 4, &s.flags.to_le_bytes());
        put(&mut out, ph + 8, &(off as u64).to_le_bytes());
        put(&mut out, ph + 16, &s.vaddr.to_le_bytes());
        put(&mut out, ph + 24, &s.paddr.to_le_bytes());
        put(&mut out, ph + 32, &(s.data.len() as u64).to_le_bytes());
        put(&mut out, ph + 40, &s.memsz.to_le_bytes());
        put(&mut out, ph + 48, &0x1000u64.to_le_bytes());
    }
    for s in segs {
        out.extend_from_slice(&s.data);
    }
    out
}

/// An ELF32 i386 ET_EXEC with `segs`, entry `entry`, no sections.
pub fn elf32(entry: u32, segs: &[Seg]) -> Vec<u8> {
    let headers = EHDR32 + PHDR32 * segs.len();
    let offsets = data_offsets(headers, segs);
    let mut out = alloc::vec![0u8; headers];
    put(&mut out, 0, &ident(1));
    put(&mut out, E_TYPE, &2u16.to_le_bytes());
    put(&mut out, E_MACHINE, &3u16.to_le_bytes());
    put(&mut out, 20, &1u32.to_le_bytes());
    put(&mut out, 24, &entry.to_le_bytes());
    put(&mut out, 28, &(EHDR32 as u32).to_le_bytes());
    put(&mut out, 40, &(EHDR32 as u16).to_le_bytes());
    put(&mut out, 42, &(PHDR32 as u16).to_le_bytes());
    put(&mut out, 44, &(segs.len() as u16).to_le_bytes());
    for (i, (s, &off)) in segs.iter().zip(&offsets).enumerate() {
        let ph = EHDR32 + PHDR32 * i;
        put(&mut out, ph, &s.p_type.to_le_bytes());
        put(&mut out, ph + 4, &(off as u32).to_le_bytes());
        put(&mut out, ph + 8, &(s.vaddr as u32).to_le_bytes());
        put(&mut out, ph + 12, &(s.paddr as u32).to_le_bytes());
        put(&mut out, ph + 16, &(s.data.len() as u32).to_le_bytes());
        put(&mut out, ph + 20, &(s.memsz as u32).to_le_bytes());
        put(&mut out, ph + 24, &s.flags.to_le_bytes());
        put(&mut out, ph + 28, &0x1000u32.to_le_bytes());
    }
    for s in segs {
        out.extend_from_slice(&s.data);
    }
    out
}

/// A Multiboot header: magic, `flags`, a correct checksum, then `fields`
/// (the address fields, then the video fields, as far as given).
pub fn mb_header(flags: u32, fields: &[u32]) -> Vec<u8> {
    let magic: u32 = 0x1BAD_B002;
    let checksum = 0u32.wrapping_sub(magic).wrapping_sub(flags);
    let mut out = Vec::new();
    for word in [magic, flags, checksum].iter().chain(fields) {
        out.extend_from_slice(&word.to_le_bytes());
    }
    out
}

/// `len` bytes of a recognisable pattern with `header` written at `offset`.
pub fn image_with_header(len: usize, offset: usize, header: &[u8]) -> Vec<u8> {
    let mut out: Vec<u8> = (0..len).map(|i| (i % 251) as u8 + 1).collect();
    out[offset..offset + header.len()].copy_from_slice(header);
    out
}

/// Reads a little-endian u32 at `at`.
pub fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
}

/// Reads a little-endian u64 at `at`.
pub fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
}

/// The header fields of a synthetic Linux bzImage (boot.rst, "The
/// Real-Mode Kernel Header"); `Default` is a valid 64-bit relocatable kernel
/// preferring 2 MiB.
#[derive(Clone, Debug)]
pub struct Hdr {
    pub setup_sects: u8,
    pub boot_flag: u16,
    pub signature: [u8; 4],
    pub version: u16,
    /// The byte at 0x201: the header ends at 0x202 + this.
    pub jump: u8,
    pub loadflags: u8,
    pub xloadflags: u16,
    pub kernel_len: usize,
    /// `None`: the kernel length in paragraphs, rounded up.
    pub syssize: Option<u32>,
    pub initrd_addr_max: u32,
    pub kernel_alignment: u32,
    pub relocatable: u8,
    pub cmdline_size: u32,
    pub payload: (u32, u32),
    pub pref_address: u64,
    pub init_size: u32,
}

impl Default for Hdr {
    fn default() -> Self {
        Self {
            setup_sects: 4,
            boot_flag: 0xAA55,
            signature: *b"HdrS",
            version: 0x020f,
            jump: 0x6a,
            loadflags: loadflags::LOADED_HIGH,
            xloadflags: xloadflags::KERNEL_64,
            kernel_len: 0x3000,
            syssize: None,
            initrd_addr_max: 0x7fff_ffff,
            kernel_alignment: 0x20_0000,
            relocatable: 1,
            cmdline_size: 2047,
            payload: (0x100, 0x1000),
            pref_address: 0x20_0000,
            init_size: 0x10_0000,
        }
    }
}

/// A bzImage with header `h`: setup sectors and kernel filled with a
/// recognisable pattern, the header fields written over it.
pub fn bzimage(h: &Hdr) -> Vec<u8> {
    let sects = if h.setup_sects == 0 { 4 } else { usize::from(h.setup_sects) };
    let len = (sects + 1) * 512 + h.kernel_len;
    let mut img: Vec<u8> = (0..len).map(|i| (i % 251) as u8 + 1).collect();
    img[off::SETUP_SECTS] = h.setup_sects;
    let syssize = h.syssize.unwrap_or(h.kernel_len.div_ceil(16) as u32);
    put(&mut img, off::SYSSIZE, &syssize.to_le_bytes());
    put(&mut img, off::BOOT_FLAG, &h.boot_flag.to_le_bytes());
    put(&mut img, off::JUMP, &[0xEB, h.jump]);
    put(&mut img, off::HEADER, &h.signature);
    put(&mut img, off::VERSION, &h.version.to_le_bytes());
    img[off::LOADFLAGS] = h.loadflags;
    put(&mut img, off::INITRD_ADDR_MAX, &h.initrd_addr_max.to_le_bytes());
    put(&mut img, off::KERNEL_ALIGNMENT, &h.kernel_alignment.to_le_bytes());
    img[off::RELOCATABLE_KERNEL] = h.relocatable;
    put(&mut img, off::XLOADFLAGS, &h.xloadflags.to_le_bytes());
    put(&mut img, off::CMDLINE_SIZE, &h.cmdline_size.to_le_bytes());
    put(&mut img, off::PAYLOAD_OFFSET, &h.payload.0.to_le_bytes());
    put(&mut img, off::PAYLOAD_LENGTH, &h.payload.1.to_le_bytes());
    put(&mut img, off::PREF_ADDRESS, &h.pref_address.to_le_bytes());
    put(&mut img, off::INIT_SIZE, &h.init_size.to_le_bytes());
    img
}
