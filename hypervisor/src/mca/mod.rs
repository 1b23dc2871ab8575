//! The machine-check architecture (SDM Vol. 3B chapter 16; AMD APM Vol. 2
//! chapter 9): the host's side (what a #MC on a host CPU means and what the
//! manager must do about it, [`host`]) and the guest's (the virtual banks a
//! VM sees and the machine check it gets when it touches a poisoned page,
//! [`vmce`]). The bits and MSR numbers below are the architectural ones
//! both vendors share.

pub mod host;
pub mod vmce;

/// IA32_MCG_CAP: bank count in bits 7:0, feature bits above.
pub const MCG_CAP: u32 = 0x179;
/// IA32_MCG_STATUS: RIPV, EIPV, MCIP.
pub const MCG_STATUS: u32 = 0x17a;
/// IA32_MCG_CTL (present when `MCG_CAP.MCG_CTL_P`).
pub const MCG_CTL: u32 = 0x17b;
/// IA32_MC0_CTL; bank `i`'s CTL, STATUS, ADDR and MISC are at
/// `MC0_CTL + 4 * i + 0..=3` (SDM Vol. 3B 16.3.2).
pub const MC0_CTL: u32 = 0x400;

/// The MSR of bank `bank`'s register `reg` (0 CTL, 1 STATUS, 2 ADDR, 3 MISC).
pub const fn bank_msr(bank: u32, reg: u32) -> u32 {
    MC0_CTL + 4 * bank + reg
}

/// MCG_CAP bits (SDM Vol. 3B 16.3.1.1).
pub mod cap {
    pub const COUNT_MASK: u64 = 0xff;
    pub const CTL_P: u64 = 1 << 8;
    /// Software error recovery: the S and AR bits of a bank's status mean
    /// something (SRAO and SRAR errors).
    pub const SER_P: u64 = 1 << 24;
}

/// MCG_STATUS bits (SDM Vol. 3B 16.3.1.2).
pub mod mcg {
    /// Restart IP valid: the interrupted program can go on at the saved RIP.
    pub const RIPV: u64 = 1 << 0;
    /// Error IP valid: the saved RIP is the instruction that hit the error.
    pub const EIPV: u64 = 1 << 1;
    /// Machine check in progress: a second #MC meanwhile shuts the CPU down.
    pub const MCIP: u64 = 1 << 2;
}

/// IA32_MCi_STATUS bits (SDM Vol. 3B 16.3.2.2).
pub mod status {
    pub const VAL: u64 = 1 << 63;
    pub const OVER: u64 = 1 << 62;
    /// Uncorrected.
    pub const UC: u64 = 1 << 61;
    pub const EN: u64 = 1 << 60;
    pub const MISCV: u64 = 1 << 59;
    pub const ADDRV: u64 = 1 << 58;
    /// Processor context corrupt: nothing can go on.
    pub const PCC: u64 = 1 << 57;
    /// Signalled by #MC (with SER_P).
    pub const S: u64 = 1 << 56;
    /// Action required: the error was consumed (with SER_P).
    pub const AR: u64 = 1 << 55;
    /// The compound error code of a memory-controller read error, SRAR data
    /// load (SDM Vol. 3B table 16-20: 0x134 is "data load" on a cache
    /// hierarchy read, what a consumed poisoned line reports).
    pub const MCACOD_DATA_LOAD: u64 = 0x134;
    /// ... and an instruction fetch (0x150).
    pub const MCACOD_INSN_FETCH: u64 = 0x150;
}

/// IA32_MCi_MISC: bits 5:0 the least significant valid bit of ADDR, bits
/// 8:6 the address mode (2: physical) (SDM Vol. 3B 16.3.2.4).
pub mod misc {
    pub const LSB_MASK: u64 = 0x3f;
    pub const MODE_SHIFT: u32 = 6;
    pub const MODE_PHYSICAL: u64 = 2;
}
