//! A machine check on a host CPU: what each bank's error means
//! ([`assess`]), and the hand-over from the #MC handler, which may not take
//! a lock or allocate, to the manager, which poisons the guest pages in the
//! frame ([`ErrorLog`]).
//!
//! The policy follows SDM Vol. 3B 16.6-16.10: a corrected error is only
//! logged; an uncorrected one with the processor context corrupt (PCC), or
//! with no restart IP (RIPV clear), cannot be survived; an uncorrected
//! memory error that names a physical address is survived by never using
//! that frame again: the pages in it are poisoned, and a guest that touches
//! one gets a machine check of its own ([`super::vmce`]). An error the
//! hypervisor itself consumed (action required, AR) outside a
//! machine-check-safe copy is fatal: its data is already gone.

use core::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};

use super::{mcg, misc, status};

/// What one bank's error asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// The bank holds nothing (VAL clear).
    Nothing,
    /// Corrected, or uncorrected without an address to act on while the
    /// CPU may go on (logged; nothing else can be done).
    Log,
    /// Uncorrected memory error at this host-physical address (the bits
    /// below the reported least significant bit cleared): the frame holding
    /// it must never be used again.
    Poison(u64),
    /// The host cannot go on; the reason.
    Fatal(&'static str),
}

/// Where the interrupted code was when the #MC came.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Context {
    /// Ordinary hypervisor code (or idle).
    Host,
    /// A machine-check-safe copy: an error it consumed fails the copy
    /// instead of the host.
    SafeCopy,
}

/// What bank status `st` (with ADDR `addr`, MISC `misc_reg`), reported
/// with global status `mcg_status`, asks for. `ctx`: where the #MC
/// interrupted the host.
pub fn assess(mcg_status: u64, st: u64, addr: u64, misc_reg: u64, ctx: Context) -> Action {
    if st & status::VAL == 0 {
        return Action::Nothing;
    }
    if st & status::UC == 0 {
        return Action::Log;
    }
    if st & status::PCC != 0 {
        return Action::Fatal("uncorrected error with the processor context corrupt");
    }
    if st & status::AR != 0 && ctx == Context::Host {
        return Action::Fatal("the hypervisor consumed poisoned memory");
    }
    if mcg_status & mcg::RIPV == 0 && ctx == Context::Host {
        return Action::Fatal("uncorrected error with no restart IP");
    }
    if st & status::ADDRV == 0 {
        return Action::Log;
    }
    // With MISCV, ADDR is physical only in address mode 2 and valid from
    // MISC's least significant bit up; without it, a physical address.
    let lsb = if st & status::MISCV != 0 {
        if (misc_reg >> misc::MODE_SHIFT) & 7 != misc::MODE_PHYSICAL {
            return Action::Log;
        }
        (misc_reg & misc::LSB_MASK).min(63) as u32
    } else {
        0
    };
    Action::Poison(addr & !((1u64 << lsb) - 1))
}

/// One bank's error as the handler read it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BankError {
    /// The host CPU (its index in the hypervisor's CPU list).
    pub cpu: u32,
    pub bank: u32,
    pub mcg_status: u64,
    pub status: u64,
    pub addr: u64,
    pub misc: u64,
    pub action: Action,
}

const SLOTS: usize = 16;
const FREE: u8 = 0;
const WRITING: u8 = 1;
const READY: u8 = 2;

struct Slot {
    state: AtomicU8,
    cpu: AtomicU32,
    bank: AtomicU32,
    words: [AtomicU64; 5],
}

/// Errors handed from #MC handlers (any CPU, any time, no locks) to the
/// manager (the boot CPU's main loop). Each slot is claimed with a
/// compare-and-swap, filled, then published; the manager takes published
/// slots and frees them. When all are full the error is counted as lost
/// (the bank was still cleared: the handler cannot wait).
pub struct ErrorLog {
    slots: [Slot; SLOTS],
    lost: AtomicU64,
}

impl Default for ErrorLog {
    fn default() -> Self {
        Self::new()
    }
}

impl ErrorLog {
    pub const fn new() -> Self {
        #[allow(clippy::declare_interior_mutable_const)] // a template for the array, never shared
        const EMPTY: Slot = Slot {
            state: AtomicU8::new(FREE),
            cpu: AtomicU32::new(0),
            bank: AtomicU32::new(0),
            words: [const { AtomicU64::new(0) }; 5],
        };
        Self { slots: [EMPTY; SLOTS], lost: AtomicU64::new(0) }
    }

    /// From the #MC handler: keep `e` for the manager. `false` if every
    /// slot was taken (counted in [`Self::lost`]).
    pub fn push(&self, e: BankError) -> bool {
        let (kind, arg) = match e.action {
            Action::Nothing => (0, 0),
            Action::Log => (1, 0),
            Action::Poison(a) => (2, a),
            // A fatal error never comes back to be taken.
            Action::Fatal(_) => (3, 0),
        };
        for s in &self.slots {
            if s.state.compare_exchange(FREE, WRITING, Ordering::Acquire, Ordering::Relaxed).is_ok() {
                s.cpu.store(e.cpu, Ordering::Relaxed);
                s.bank.store(e.bank, Ordering::Relaxed);
                for (w, v) in s.words.iter().zip([e.mcg_status, e.status, e.addr, e.misc, kind << 62 | arg]) {
                    w.store(v, Ordering::Relaxed);
                }
                s.state.store(READY, Ordering::Release);
                return true;
            }
        }
        self.lost.fetch_add(1, Ordering::Relaxed);
        false
    }

    /// From the manager: every published error, oldest slot first.
    pub fn take(&self, mut f: impl FnMut(BankError)) {
        for s in &self.slots {
            if s.state.load(Ordering::Acquire) != READY {
                continue;
            }
            let w: [u64; 5] = core::array::from_fn(|i| s.words[i].load(Ordering::Relaxed));
            let action = match w[4] >> 62 {
                0 => Action::Nothing,
                1 => Action::Log,
                2 => Action::Poison(w[4] & !(3 << 62)),
                _ => Action::Fatal("fatal"),
            };
            let e = BankError {
                cpu: s.cpu.load(Ordering::Relaxed),
                bank: s.bank.load(Ordering::Relaxed),
                mcg_status: w[0],
                status: w[1],
                addr: w[2],
                misc: w[3],
                action,
            };
            s.state.store(FREE, Ordering::Release);
            f(e);
        }
    }

    /// Whether an error waits to be taken (a round that goes on ends for
    /// it: the pages it costs are poisoned before the guests read on).
    pub fn waiting(&self) -> bool {
        self.slots.iter().any(|s| s.state.load(Ordering::Acquire) == READY)
    }

    /// Errors dropped because the log was full.
    pub fn lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }
}

/// The host's log: the platform's #MC handler pushes, the manager takes.
pub static HOST_ERRORS: ErrorLog = ErrorLog::new();

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mca::status::*;

    /// QEMU's documented example (`mce 0 4 0xbd000000000000c0 0x5
    /// 0x1a000000 0x86`): uncorrected, action optional, address valid.
    const QEMU_SRAO: u64 = 0xbd00_0000_0000_00c0;

    #[test]
    fn an_action_optional_memory_error_poisons_its_frame() {
        let mcg = mcg::RIPV | mcg::MCIP;
        assert_eq!(assess(mcg, QEMU_SRAO, 0x1a00_0123, 0x86, Context::Host), Action::Poison(0x1a00_0100));
        // MISC's least significant bit 12: the page.
        assert_eq!(assess(mcg, QEMU_SRAO, 0x1a00_0123, 0x8c, Context::Host), Action::Poison(0x1a00_0000));
        // Without MISCV the address is taken whole.
        assert_eq!(assess(mcg, QEMU_SRAO & !MISCV, 0x1a00_0123, 0, Context::Host), Action::Poison(0x1a00_0123));
        // Not a physical address (mode 0, segment offset): nothing to act on.
        assert_eq!(assess(mcg, QEMU_SRAO, 0x1a00_0123, 0x0c, Context::Host), Action::Log);
        assert_eq!(assess(mcg, QEMU_SRAO & !ADDRV, 0, 0, Context::Host), Action::Log);
    }

    #[test]
    fn what_the_host_cannot_survive() {
        let ok = mcg::RIPV | mcg::MCIP;
        assert_eq!(assess(ok, 0, 0, 0, Context::Host), Action::Nothing);
        assert_eq!(assess(ok, VAL | EN | 0x17a, 0, 0, Context::Host), Action::Log, "corrected");
        assert!(matches!(assess(ok, QEMU_SRAO | PCC, 0x1000, 0x86, Context::Host), Action::Fatal(_)));
        assert!(matches!(assess(mcg::MCIP, QEMU_SRAO, 0x1000, 0x86, Context::Host), Action::Fatal(_)));
        // Consumed by the hypervisor: fatal, unless inside a safe copy,
        // which fails instead (and even without a restart IP: the copy's
        // fixup is where execution goes on).
        let srar = QEMU_SRAO | AR;
        assert!(matches!(assess(ok, srar, 0x1000, 0x86, Context::Host), Action::Fatal(_)));
        assert_eq!(assess(mcg::EIPV | mcg::MCIP, srar, 0x1000, 0x86, Context::SafeCopy), Action::Poison(0x1000));
    }

    #[test]
    fn the_log_hands_errors_over_and_counts_what_it_cannot_hold() {
        let log = ErrorLog::new();
        let e = |i: u32| BankError {
            cpu: i,
            bank: 4,
            mcg_status: 5,
            status: QEMU_SRAO,
            addr: 0x1000 * i as u64,
            misc: 0x86,
            action: Action::Poison(0x1000 * i as u64),
        };
        for i in 0..SLOTS as u32 {
            assert!(log.push(e(i)));
        }
        assert!(!log.push(e(99)));
        assert_eq!(log.lost(), 1);
        let mut got = alloc::vec::Vec::new();
        log.take(|b| got.push(b));
        assert_eq!(got.len(), SLOTS);
        assert_eq!(got[3], e(3));
        log.take(|_| panic!("taken errors are gone"));
        assert!(log.push(e(1)), "slots are free again");
    }
}
