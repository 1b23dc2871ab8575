//! CRC-32C (Castagnoli, iSCSI polynomial): the checksum of every record and
//! of the prologue, the same one `mm`'s swap format uses. Hardware-neutral
//! and strong for the burst errors of disks and links.

use crc::{CRC_32_ISCSI, Crc, Digest, Table};

/// A `static`, not a `const`: the 16 KiB slice-by-16 table would otherwise
/// be copied into every use.
static CRC32C: Crc<u32, Table<16>> = Crc::<u32, Table<16>>::new(&CRC_32_ISCSI);

pub fn crc32c(bytes: &[u8]) -> u32 {
    CRC32C.checksum(bytes)
}

pub fn digest() -> Digest<'static, u32, Table<16>> {
    CRC32C.digest()
}
