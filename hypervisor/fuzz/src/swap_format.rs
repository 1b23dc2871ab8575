//! The swap device's on-disk format (`mm::swap::format`) and the
//! reservation that reads it back. The disk is outside the hypervisor's
//! control: a superblock or slot may hold anything, and a page read back
//! must be exactly the page written or refused.
//!
//! Checks:
//! - superblock decoding never panics; an accepted one fits the device,
//!   names its size, and re-encodes to the same bytes (the checksummed
//!   60); refusals are one line and name the real defect;
//! - a superblock made for any device size decodes back, and no single
//!   flipped bit in its checksummed bytes is accepted;
//! - a slot written by `encode_slot` verifies; one flipped bit in its
//!   header fields or page is refused; a header expected for another slot,
//!   epoch, VM, address or generation is refused with that reason; a
//!   fuzzed slot is only accepted when its fields and checksums match;
//! - end to end on a disk holding the fuzzed block 0: the reservation
//!   opens exactly the devices the decoder accepts, with the next epoch
//!   written back, and a page written out and then damaged on the disk at
//!   a fuzzed place comes back identical or is refused with the caller's
//!   buffer untouched (always refused when the damage is in checked bytes).
//!
//! Input: device blocks (`u64`), 512 bytes of block 0, slot header fields
//! (slot `u32`, epoch, generation `u64`, VM `u32`, address `u64`), a bit
//! to flip (`u16`), a byte choosing the mismatched field, then the slot's
//! header block and page (raw, for the decoder) and a damage byte offset
//! (`u16`) and mask.

use std::collections::HashMap;

use mm::GuestPhysAddr;
use mm::swap::format::{PAGE_BYTES, SLOT_BYTES, SlotHeader, Superblock, crc32c};
use mm::swap::{BLOCK_SIZE, BlockStore, SlotRefusal, SuperblockRefusal, SwapReservation, VmSwapSpec, check_transfer};
use mm::swap_hook::PageStore;

use crate::input::Input;

pub fn swap_format(data: &[u8]) {
    let mut input = Input::new(data);
    let blocks = input.u64();
    let block0: [u8; BLOCK_SIZE] = input.array();
    let header = SlotHeader {
        slot: input.u32(),
        epoch: input.u64(),
        generation: input.u64(),
        vm: input.u32(),
        gpa: GuestPhysAddr(input.u64()),
    };
    let bit = input.u16();
    let field = input.u8();
    let mut raw = Box::new([0u8; SLOT_BYTES]);
    raw.copy_from_slice(&input.array::<SLOT_BYTES>());
    let (damage_at, damage_mask) = (input.u16(), input.u8());

    check_superblock(&block0, blocks);
    check_fresh_superblock(blocks, header.epoch, bit);
    check_slot(&header, &raw, bit, field);
    check_device(&block0, blocks, &raw, damage_at, damage_mask);
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn check_superblock(b: &[u8; BLOCK_SIZE], blocks: u64) {
    match Superblock::decode(b, blocks) {
        Ok(sb) => {
            assert_eq!(sb.device_blocks, blocks);
            assert!(sb.slots >= 1 && sb.slots <= u64::from(u32::MAX));
            assert!(sb.slots.checked_mul(9).and_then(|n| n.checked_add(1)).is_some_and(|end| end <= blocks));
            assert_eq!(sb.encode()[..60], b[..60], "accepted bytes do not re-encode");
            assert_eq!(Superblock::decode(&sb.encode(), blocks), Ok(sb));
        }
        Err(e) => {
            let text = e.to_string();
            assert!(!text.is_empty() && !text.contains('\n'));
            assert_eq!(e == SuperblockRefusal::NoMagic, b[..8] != *b"MMSWAPSB");
            if let SuperblockRefusal::DeviceSizeMismatch { recorded, actual } = e {
                assert!(actual == blocks && recorded == u64_at(b, 16) && recorded != blocks);
            }
            if e == SuperblockRefusal::BadChecksum {
                assert_ne!(u32::from_le_bytes(b[56..60].try_into().unwrap()), crc32c(&b[..56]));
            }
        }
    }
}

fn check_fresh_superblock(blocks: u64, epoch: u64, bit: u16) {
    let Ok(sb) = Superblock::for_device(blocks, epoch) else {
        assert!(blocks < 10, "a device of {blocks} blocks holds a slot");
        return;
    };
    assert_eq!(sb.slots, ((blocks - 1) / 9).min(u64::from(u32::MAX)));
    let mut b = sb.encode();
    assert_eq!(Superblock::decode(&b, blocks), Ok(sb));
    let bit = usize::from(bit) % (60 * 8);
    b[bit / 8] ^= 1 << (bit % 8);
    assert!(Superblock::decode(&b, blocks).is_err(), "bit {bit} flipped and still accepted");
}

fn check_slot(h: &SlotHeader, raw: &[u8; SLOT_BYTES], bit: u16, field: u8) {
    // A fuzzed slot: accepted only if every field and both checksums match.
    let verdict = h.verify_slot(raw);
    if verdict.is_ok() {
        assert_eq!(&raw[..8], b"MMSWAPPG");
        assert_eq!(raw[12..16], h.slot.to_le_bytes());
        assert_eq!(u64_at(raw, 16), h.epoch);
        assert_eq!(u64_at(raw, 24), h.generation);
        assert_eq!(u64_at(raw, 32), u64::from(h.vm));
        assert_eq!(u64_at(raw, 40), h.gpa.0);
        assert_eq!(raw[48..52], crc32c(&raw[BLOCK_SIZE..]).to_le_bytes());
        assert_eq!(raw[56..60], crc32c(&raw[..56]).to_le_bytes());
    }
    if let Err(e) = verdict {
        let text = e.to_string();
        assert!(!text.is_empty() && !text.contains('\n'));
    }

    // Written by the encoder: accepted, and the page is the page.
    let page: &[u8; PAGE_BYTES] = raw[BLOCK_SIZE..].try_into().unwrap();
    let mut slot = Box::new([0u8; SLOT_BYTES]);
    h.encode_slot(page, &mut slot);
    assert_eq!(h.verify_slot(&slot), Ok(()));
    assert_eq!(&slot[BLOCK_SIZE..], &page[..]);

    // One flipped bit in the checked bytes: refused.
    let checked = 60 * 8 + PAGE_BYTES * 8;
    let bit = usize::from(bit) * 7 % checked;
    let byte = if bit < 60 * 8 { bit / 8 } else { BLOCK_SIZE + (bit - 60 * 8) / 8 };
    let mut flipped = slot.clone();
    flipped[byte] ^= 1 << (bit % 8);
    assert!(h.verify_slot(&flipped).is_err(), "byte {byte} damaged and still accepted");

    // Expected for another slot, epoch, VM, address or generation: refused,
    // naming it.
    let mut other = *h;
    let want = match field % 5 {
        0 => {
            other.slot = h.slot.wrapping_add(1);
            SlotRefusal::WrongSlot { found: h.slot }
        }
        1 => {
            other.epoch = h.epoch.wrapping_add(1);
            SlotRefusal::WrongEpoch { found: h.epoch }
        }
        2 => {
            other.vm = h.vm.wrapping_add(1);
            SlotRefusal::WrongVm { found: h.vm }
        }
        3 => {
            other.gpa = GuestPhysAddr(h.gpa.0 ^ 0x1000);
            SlotRefusal::WrongAddress { found: h.gpa }
        }
        _ => {
            other.generation = h.generation.wrapping_add(1);
            SlotRefusal::StaleGeneration { expected: other.generation, found: h.generation }
        }
    };
    assert_eq!(other.verify_slot(&slot), Err(want));
}

/// A sparse disk of any size: unwritten blocks read as zeros.
struct SparseDisk {
    blocks: u64,
    data: HashMap<u64, [u8; BLOCK_SIZE]>,
}

impl BlockStore for SparseDisk {
    fn block_count(&self) -> u64 {
        self.blocks
    }
    fn read(&mut self, block: u64, buf: &mut [u8]) -> Result<(), mm::Error> {
        check_transfer(self.blocks, block, buf.len())?;
        for (i, chunk) in buf.chunks_mut(BLOCK_SIZE).enumerate() {
            chunk.copy_from_slice(self.data.get(&(block + i as u64)).unwrap_or(&[0; BLOCK_SIZE]));
        }
        Ok(())
    }
    fn write(&mut self, block: u64, buf: &[u8]) -> Result<(), mm::Error> {
        check_transfer(self.blocks, block, buf.len())?;
        for (i, chunk) in buf.chunks(BLOCK_SIZE).enumerate() {
            self.data.insert(block + i as u64, chunk.try_into().unwrap());
        }
        Ok(())
    }
    fn flush(&mut self) -> Result<(), mm::Error> {
        Ok(())
    }
}

fn check_device(block0: &[u8; BLOCK_SIZE], blocks: u64, raw: &[u8; SLOT_BYTES], at: u16, mask: u8) {
    let mut disk = SparseDisk { blocks, data: HashMap::new() };
    if blocks > 0 {
        disk.write(0, block0).unwrap();
    }
    let decoded = if blocks > 0 { Superblock::decode(block0, blocks).ok() } else { None };
    let res = SwapReservation::open(disk);
    let (Some(old), Ok(mut res)) = (decoded, res) else {
        assert!(decoded.is_none(), "a device with a valid superblock was refused");
        return;
    };
    let sb = res.superblock();
    assert_eq!(sb, Superblock { epoch: old.epoch.wrapping_add(1), ..old }, "opening moves to the next epoch");
    let mut b0 = [0u8; BLOCK_SIZE];
    res.device_mut().read(0, &mut b0).unwrap();
    assert_eq!(Superblock::decode(&b0, blocks), Ok(sb), "the new epoch is on the disk");

    // One page out, damaged on the disk, back in.
    let pool = res.create_pool(0);
    res.add_vm(pool, VmSwapSpec { vm: 7, configured_pages: 2, reserved_pages: 0 }).unwrap();
    let page: &[u8; PAGE_BYTES] = raw[BLOCK_SIZE..].try_into().unwrap();
    let gpa = GuestPhysAddr(0x5000);
    let slot = res.file(7).unwrap().page_out(gpa, page).unwrap();
    let at = usize::from(at) % SLOT_BYTES;
    let block = slot.first_block() + (at / BLOCK_SIZE) as u64;
    let mut buf = [0u8; BLOCK_SIZE];
    res.device_mut().read(block, &mut buf).unwrap();
    buf[at % BLOCK_SIZE] ^= mask;
    res.device_mut().write(block, &buf).unwrap();
    let mut back = [0xa5u8; PAGE_BYTES];
    match res.file(7).unwrap().page_in(slot, gpa, &mut back) {
        Ok(()) => {
            assert_eq!(&back, page, "a damaged page came back changed");
            let checked = !(60..BLOCK_SIZE).contains(&at);
            assert!(mask == 0 || !checked, "damage at byte {at} of the slot went unnoticed");
        }
        Err(e) => {
            assert!(matches!(e, mm::Error::SwapSlotCorrupt { .. }), "{e}");
            assert!(back.iter().all(|&b| b == 0xa5), "a refused page-in wrote the caller's buffer");
        }
    }
    res.file(7).unwrap().release(slot);
    assert_eq!(res.stats().in_files, 0);
}
