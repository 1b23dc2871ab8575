//! Host disks (the device under host swap): the hardware-independent half of
//! the kernel's block drivers. The drivers themselves (port and MMIO access)
//! live in the kernel's `platform::disk`; what can be decided without the
//! hardware — decoding IDENTIFY data, building ATA register sequences,
//! checking a disk with a test pattern — is here, unit-tested on the host.

pub mod ata;
pub mod classify;
pub mod cow;
pub mod image;
pub mod request;
pub mod selfcheck;
pub mod space;

use alloc::format;
use alloc::string::String;

use mm::swap::BLOCK_SIZE;

/// "129024 blocks (63 MiB)": a disk's size for one-line reports. Sizes that
/// are not whole MiB get one decimal, rounded ("1.5 MiB"); under 1 MiB,
/// whole KiB.
pub fn capacity_text(blocks: u64) -> String {
    let bytes = blocks.saturating_mul(BLOCK_SIZE as u64);
    let size = if bytes < 1 << 20 {
        format!("{} KiB", bytes >> 10)
    } else if bytes.is_multiple_of(1 << 20) {
        format!("{} MiB", bytes >> 20)
    } else {
        let tenths = (bytes as u128 * 10 + (1 << 19)) >> 20;
        format!("{}.{} MiB", tenths / 10, tenths % 10)
    };
    format!("{blocks} blocks ({size})")
}

#[cfg(test)]
mod tests {
    use super::capacity_text;

    #[test]
    fn capacity_is_reported_in_blocks_and_binary_units() {
        assert_eq!(capacity_text(131_072), "131072 blocks (64 MiB)");
        assert_eq!(capacity_text(129_024), "129024 blocks (63 MiB)");
        assert_eq!(capacity_text(3072), "3072 blocks (1.5 MiB)");
        assert_eq!(capacity_text(9), "9 blocks (4 KiB)");
        assert_eq!(capacity_text(0), "0 blocks (0 KiB)");
        // No overflow at the top of the range.
        assert!(capacity_text(u64::MAX).starts_with("18446744073709551615 blocks ("));
    }
}
