//! The hypercall ABI (VMCALL on VT-x, VMMCALL on AMD-V): RAX = function,
//! RDI and RSI = arguments, result in RAX. Only ring 0 of the guest may call;
//! from user mode the instruction raises #UD, as on bare metal.

/// Returns [`PING_REPLY`].
pub const PING: u64 = 0;
/// Returns the VM's id.
pub const VM_ID: u64 = 1;
/// Returns a statistic of this VM: RDI = one of the `STAT_*` selectors.
pub const STAT: u64 = 2;
/// Returns how many 4 KiB pages of guest-physical [RDI, RDI + RSI) are
/// mapped to a shared or the zero frame (the part outside RAM counts as
/// not shared). Lets a guest watch page sharing reach its own data.
pub const SHARED_IN_RANGE: u64 = 3;
/// "HVOK".
pub const PING_REPLY: u64 = 0x4b4f_5648;
/// The result of an unknown function or argument.
pub const UNKNOWN: u64 = u64::MAX;
pub const STAT_EXITS: u64 = 0;
pub const STAT_HLT: u64 = 1;
/// Pages of this VM mapped to a shared or the zero frame (copy-on-write).
pub const STAT_SHARED_PAGES: u64 = 2;
/// Pages of this VM in host swap.
pub const STAT_SWAPPED_PAGES: u64 = 3;
/// Pages of this VM read back from swap on a fault since it started.
pub const STAT_PAGE_INS: u64 = 4;

/// What the hypercall needs from its VM.
pub trait Context {
    fn vm_id(&self) -> u64;
    fn total_exits(&self) -> u64;
    fn hlt_exits(&self) -> u64;
    fn shared_pages(&self) -> u64;
    fn swapped_pages(&self) -> u64;
    fn page_ins(&self) -> u64;
    fn shared_in_range(&self, gpa: u64, len: u64) -> u64;
}

/// The result for function `func` with arguments `a` (RDI) and `b` (RSI).
pub fn dispatch(func: u64, a: u64, b: u64, ctx: &impl Context) -> u64 {
    match (func, a) {
        (SHARED_IN_RANGE, _) => ctx.shared_in_range(a, b),
        (PING, _) => PING_REPLY,
        (VM_ID, _) => ctx.vm_id(),
        (STAT, STAT_EXITS) => ctx.total_exits(),
        (STAT, STAT_HLT) => ctx.hlt_exits(),
        (STAT, STAT_SHARED_PAGES) => ctx.shared_pages(),
        (STAT, STAT_SWAPPED_PAGES) => ctx.swapped_pages(),
        (STAT, STAT_PAGE_INS) => ctx.page_ins(),
        _ => UNKNOWN,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Ctx;
    impl Context for Ctx {
        fn vm_id(&self) -> u64 {
            7
        }
        fn total_exits(&self) -> u64 {
            100
        }
        fn hlt_exits(&self) -> u64 {
            3
        }
        fn shared_pages(&self) -> u64 {
            40
        }
        fn swapped_pages(&self) -> u64 {
            50
        }
        fn page_ins(&self) -> u64 {
            60
        }
        fn shared_in_range(&self, gpa: u64, len: u64) -> u64 {
            gpa + len
        }
    }

    #[test]
    fn functions_and_unknowns() {
        assert_eq!(dispatch(PING, 0, 0, &Ctx), PING_REPLY);
        assert_eq!(dispatch(VM_ID, 0, 0, &Ctx), 7);
        assert_eq!(dispatch(STAT, STAT_EXITS, 0, &Ctx), 100);
        assert_eq!(dispatch(STAT, STAT_HLT, 0, &Ctx), 3);
        assert_eq!(dispatch(STAT, STAT_SHARED_PAGES, 0, &Ctx), 40);
        assert_eq!(dispatch(STAT, STAT_SWAPPED_PAGES, 0, &Ctx), 50);
        assert_eq!(dispatch(STAT, STAT_PAGE_INS, 0, &Ctx), 60);
        assert_eq!(dispatch(SHARED_IN_RANGE, 0x1000, 0x2000, &Ctx), 0x3000);
        assert_eq!(dispatch(STAT, 99, 0, &Ctx), UNKNOWN);
        assert_eq!(dispatch(0xdead, 0, 0, &Ctx), UNKNOWN);
    }
}
