//! The host's own CMOS clock, read once at boot so guests' clocks start from
//! the wall-clock time (MC146818A registers, as in `devices::rtc`).

use x86_64::instructions::port::Port;

fn read(index: u8) -> u8 {
    let mut idx: Port<u8> = Port::new(0x70);
    let mut data: Port<u8> = Port::new(0x71);
    // SAFETY: 0x70/0x71 are the CMOS index and data ports on every PC; bit 7
    // of the index (NMI mask) is left clear, as firmware leaves it.
    unsafe {
        idx.write(index & 0x7f);
        data.read()
    }
}

/// The host's wall-clock time, seconds since 1970 (UTC, as PC clocks under
/// UEFI and emulators keep it), or `None` if the clock never left an update
/// cycle or reads garbage.
pub fn unix_time() -> Option<u64> {
    // Wait out an update in progress (register A bit 7), then read twice
    // until two reads agree, so no field rolls over between reads.
    let snapshot = || {
        let mut spins = 0;
        while read(0x0a) & 0x80 != 0 {
            spins += 1;
            if spins > 1_000_000 {
                return None;
            }
        }
        Some([read(0x00), read(0x02), read(0x04), read(0x07), read(0x08), read(0x09), read(0x32), read(0x0b)])
    };
    let mut a = snapshot()?;
    for _ in 0..5 {
        let b = snapshot()?;
        if a == b {
            break;
        }
        a = b;
    }
    hypervisor::devices::rtc::unix_from_registers(a)
}
