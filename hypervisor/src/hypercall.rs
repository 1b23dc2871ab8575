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
///
/// One call looks at no more than [`RANGE_PAGES_PER_CALL`] pages of RAM
/// and returns RDI and RSI advanced past what it looked at; the guest
/// calls again, adding up RAX, until RSI is 0. Without the bound a guest
/// of 64 GiB could hold the CPU for a whole time slice with one call.
pub const SHARED_IN_RANGE: u64 = 3;
/// Pages of RAM one range hypercall examines at most (16 MiB of guest RAM).
pub const RANGE_PAGES_PER_CALL: u64 = 4096;
/// Queues external interrupt RDI (32-255) for the calling vCPU, delivered
/// when it can take one (RFLAGS.IF = 1, no interrupt shadow); returns 0.
/// A test hook for event delivery: a guest can only interrupt itself.
pub const QUEUE_INTERRUPT: u64 = 4;
/// Queues an NMI for the calling vCPU (delivered when no NMI handler of
/// its runs); returns 0.
pub const QUEUE_NMI: u64 = 5;
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
    /// One past the last byte of RAM.
    fn ram_end(&self) -> u64;
    /// Whether the page at `gpa` (in RAM) is mapped shared or to the zero
    /// frame.
    fn page_shared(&self, gpa: u64) -> bool;
    /// Queues `event` for the calling vCPU, after the hypercall completes.
    fn queue_event(&self, event: vcpu::Event);
}

/// What a hypercall returns: RAX, and RDI/RSI when it changes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reply {
    pub rax: u64,
    /// New RDI and RSI (range functions: what is left to do).
    pub args: Option<(u64, u64)>,
}

impl From<u64> for Reply {
    fn from(rax: u64) -> Self {
        Reply { rax, args: None }
    }
}

/// The result for function `func` with arguments `a` (RDI) and `b` (RSI).
// Inline: out of line, its prologue and epilogue were 16 of a VMCALL
// exit's 310 host instructions (Bochs VT-x); the long call is out of line.
#[inline(always)]
pub fn dispatch(func: u64, a: u64, b: u64, ctx: &impl Context) -> Reply {
    match (func, a) {
        (SHARED_IN_RANGE, _) => shared_in_range(a, b, ctx),
        (PING, _) => PING_REPLY.into(),
        (VM_ID, _) => ctx.vm_id().into(),
        (STAT, STAT_EXITS) => ctx.total_exits().into(),
        (STAT, STAT_HLT) => ctx.hlt_exits().into(),
        (STAT, STAT_SHARED_PAGES) => ctx.shared_pages().into(),
        (STAT, STAT_SWAPPED_PAGES) => ctx.swapped_pages().into(),
        (STAT, STAT_PAGE_INS) => ctx.page_ins().into(),
        (QUEUE_INTERRUPT, 32..=255) => queue(ctx, vcpu::Event::Interrupt { vector: a as u8 }),
        (QUEUE_NMI, _) => queue(ctx, vcpu::Event::Nmi),
        _ => UNKNOWN.into(),
    }
}

/// The test hooks that queue an event: off the hot path.
#[cold]
#[inline(never)]
fn queue(ctx: &impl Context, event: vcpu::Event) -> Reply {
    ctx.queue_event(event);
    0.into()
}

/// [`SHARED_IN_RANGE`] over at most [`RANGE_PAGES_PER_CALL`] pages of RAM
/// from `gpa`; RDI/RSI come back as the rest of the range. The part beyond
/// RAM is skipped at no cost. Every page stop is page-aligned, so no page is
/// counted twice across calls.
#[inline(never)]
fn shared_in_range(gpa: u64, len: u64, ctx: &impl Context) -> Reply {
    const PAGE: u64 = 4096;
    let end = gpa.saturating_add(len);
    let first = gpa & !(PAGE - 1);
    let ram_end = ctx.ram_end();
    let mut stop = end.min(first.saturating_add(RANGE_PAGES_PER_CALL * PAGE));
    if stop >= ram_end {
        stop = end;
    }
    let mut count = 0;
    let mut page = first;
    while page < stop.min(ram_end) {
        count += u64::from(ctx.page_shared(page));
        page += PAGE;
    }
    Reply { rax: count, args: Some((stop, end - stop)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 64 GiB of RAM, every third page shared.
    struct Ctx;
    std::thread_local! {
        static QUEUED: core::cell::Cell<Option<vcpu::Event>> = const { core::cell::Cell::new(None) };
    }
    const RAM: u64 = 64 << 30;
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
        fn ram_end(&self) -> u64 {
            RAM
        }
        fn page_shared(&self, gpa: u64) -> bool {
            assert!(gpa < RAM && gpa % 4096 == 0, "asked about {gpa:#x}");
            (gpa / 4096) % 3 == 0
        }
        fn queue_event(&self, event: vcpu::Event) {
            QUEUED.with(|q| q.set(Some(event)));
        }
    }

    #[test]
    fn functions_and_unknowns() {
        let rax = |f, a, b| dispatch(f, a, b, &Ctx).rax;
        assert_eq!(rax(PING, 0, 0), PING_REPLY);
        assert_eq!(rax(VM_ID, 0, 0), 7);
        assert_eq!(rax(STAT, STAT_EXITS, 0), 100);
        assert_eq!(rax(STAT, STAT_HLT, 0), 3);
        assert_eq!(rax(STAT, STAT_SHARED_PAGES, 0), 40);
        assert_eq!(rax(STAT, STAT_SWAPPED_PAGES, 0), 50);
        assert_eq!(rax(STAT, STAT_PAGE_INS, 0), 60);
        assert_eq!(rax(STAT, 99, 0), UNKNOWN);
        assert_eq!(rax(0xdead, 0, 0), UNKNOWN);
        assert_eq!(dispatch(PING, 1, 2, &Ctx).args, None, "only range functions change RDI/RSI");
        let queued = || QUEUED.with(|q| q.take());
        assert_eq!(rax(QUEUE_INTERRUPT, 0x41, 0), 0);
        assert_eq!(queued(), Some(vcpu::Event::Interrupt { vector: 0x41 }));
        assert_eq!(rax(QUEUE_INTERRUPT, 14, 0), UNKNOWN, "exception vectors are not interrupts");
        assert_eq!(rax(QUEUE_INTERRUPT, 256, 0), UNKNOWN);
        assert_eq!(queued(), None);
        assert_eq!(rax(QUEUE_NMI, 0, 0), 0);
        assert_eq!(queued(), Some(vcpu::Event::Nmi));
    }

    #[test]
    fn a_small_range_is_done_in_one_call() {
        // Pages 1..=6 (the first and last partly): pages 3 and 6 are shared.
        let r = dispatch(SHARED_IN_RANGE, 0x1800, 0x5900, &Ctx);
        assert_eq!(r, Reply { rax: 2, args: Some((0x7100, 0)) });
    }

    /// The whole of a 64 GiB VM in bounded calls: each looks at no more than
    /// the cap, and the sum is exact.
    #[test]
    fn a_huge_range_takes_bounded_calls_that_add_up() {
        let (mut gpa, mut len, mut total, mut calls) = (0x123, RAM + (1 << 30), 0, 0u64);
        while len > 0 {
            let r = dispatch(SHARED_IN_RANGE, gpa, len, &Ctx);
            let (next, rest) = r.args.unwrap();
            let looked_at = next.min(RAM) - (gpa & !0xfff);
            assert!(looked_at <= RANGE_PAGES_PER_CALL * 4096, "one call looked at {looked_at:#x} bytes of RAM");
            assert_eq!(next + rest, gpa + len, "the range's end moved");
            (gpa, len, total, calls) = (next, rest, total + r.rax, calls + 1);
        }
        assert_eq!(total, (RAM / 4096).div_ceil(3));
        assert_eq!(calls, RAM / 4096 / RANGE_PAGES_PER_CALL, "the part past RAM cost no call");
    }

    #[test]
    fn edges_never_overflow() {
        let r = dispatch(SHARED_IN_RANGE, u64::MAX - 10, u64::MAX, &Ctx);
        assert_eq!(r, Reply { rax: 0, args: Some((u64::MAX, 0)) });
        let r = dispatch(SHARED_IN_RANGE, 0, 0, &Ctx);
        assert_eq!(r, Reply { rax: 0, args: Some((0, 0)) });
    }
}
