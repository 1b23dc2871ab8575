//! The ELF loader on arbitrary bytes, as x86-64 and as i386: never panics;
//! an accepted plan stays in RAM, out of the reserved low pages, free of
//! overlaps, and applies cleanly.

use hypervisor::loader::RamLayout;
use hypervisor::loader::elf::{Machine, plan};

use crate::check_plan;

const RESERVED: [std::ops::Range<u64>; 2] = [0..0x8000, 0x80_0000..0x80_1000];

pub fn elf(data: &[u8]) {
    let layout = RamLayout { ram_size: 16 << 20, reserved: &RESERVED };
    for machine in [Machine::X86_64, Machine::I386] {
        if let Ok(plan) = plan(data, machine, &layout) {
            check_plan(&plan, data, &layout, machine == Machine::I386);
        }
    }
}
