//! The guest's machine-check banks (vMCE): what a VM reads in its MCA MSRs,
//! and the machine check it gets when it touches a page the host poisoned
//! (a host #MC on its frame, or a page that came poisoned in a migration or
//! checkpoint). The guest learns which of its pages is lost and can retire
//! it; the error is neither lost nor spread to other data.
//!
//! One bank (bank 0) with software error recovery (`MCG_CAP` = 1 bank |
//! SER_P): the error is reported as what hardware reports for consumed
//! poison, an uncorrected, action-required data load (or instruction
//! fetch) error with the guest-physical address, page granular (SDM Vol. 3B
//! 16.6.3, table 16-20). The banks are the VM's, not each vCPU's: a memory
//! controller's banks are shared by the cores of a package on real
//! machines too, and the #MC goes to the vCPU that touched the page.
//!
//! A guest that has not set CR4.MCE, has not enabled the bank (MC0_CTL all
//! ones, what Linux and Windows write), or touches poison while its last
//! machine check is still in progress (MCIP) cannot be given one: the
//! processor would shut down, so the VM is stopped with a report (the
//! caller's part).

use serde::{Deserialize, Serialize};

use super::{MCG_CAP, MCG_STATUS, bank_msr, cap, mcg, misc, status};
use crate::devices::lapic::Gp;
use crate::devices::persist::{Invalid, Persist};

/// The banks' registers: all of the device's guest-visible state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmceState {
    pub mcg_status: u64,
    pub ctl: u64,
    pub status: u64,
    pub addr: u64,
    pub misc: u64,
}

/// The guest's machine-check banks.
#[derive(Clone, Debug, Default)]
pub struct VirtualMca {
    s: VmceState,
}

/// What `MCG_CAP` reads: one bank, software error recovery.
pub const GUEST_MCG_CAP: u64 = 1 | cap::SER_P;
/// The MCG_STATUS bits a guest may write (RIPV, EIPV, MCIP, LMCE_S).
const MCG_STATUS_WRITABLE: u64 = 0xf;

/// Why the guest cannot be given its machine check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Undeliverable {
    /// CR4.MCE is clear: a #MC would shut the processor down.
    Disabled,
    /// The guest has not enabled reporting in bank 0 (MC0_CTL).
    BankOff,
    /// A machine check is still in progress (MCIP): a second one shuts
    /// the processor down (SDM Vol. 3B 16.10).
    InProgress,
}

impl core::fmt::Display for Undeliverable {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Undeliverable::Disabled => "the guest has machine checks off (CR4.MCE clear)",
            Undeliverable::BankOff => "the guest has not enabled machine-check reporting (MC0_CTL)",
            Undeliverable::InProgress => "a machine check came while the last was still in progress (shutdown)",
        })
    }
}

impl VirtualMca {
    /// Whether `msr` is one of the banks' MSRs.
    pub fn handles_msr(msr: u32) -> bool {
        matches!(msr, MCG_CAP | MCG_STATUS) || (bank_msr(0, 0)..=bank_msr(0, 3)).contains(&msr)
    }

    /// The guest's RDMSR of one of [`Self::handles_msr`]'s MSRs.
    pub fn read_msr(&self, msr: u32) -> u64 {
        match msr {
            MCG_CAP => GUEST_MCG_CAP,
            MCG_STATUS => self.s.mcg_status,
            m if m == bank_msr(0, 0) => self.s.ctl,
            m if m == bank_msr(0, 1) => self.s.status,
            m if m == bank_msr(0, 2) => self.s.addr,
            _ => self.s.misc,
        }
    }

    /// The guest's WRMSR: MCG_CAP is read-only, MCG_STATUS takes its
    /// defined bits, a bank's status only 0 (clearing it; SDM Vol. 3B
    /// 16.3.2.2), its CTL, ADDR and MISC anything.
    pub fn write_msr(&mut self, msr: u32, value: u64) -> Result<(), Gp> {
        match msr {
            MCG_CAP => return Err(Gp),
            MCG_STATUS if value & !MCG_STATUS_WRITABLE != 0 => return Err(Gp),
            MCG_STATUS => self.s.mcg_status = value,
            m if m == bank_msr(0, 0) => self.s.ctl = value,
            m if m == bank_msr(0, 1) && value != 0 => return Err(Gp),
            m if m == bank_msr(0, 1) => self.s.status = 0,
            m if m == bank_msr(0, 2) => self.s.addr = value,
            _ => self.s.misc = value,
        }
        Ok(())
    }

    /// The guest consumed poison at guest-physical `gpa` (an instruction
    /// fetch if `fetch`): fill bank 0 and set MCG_STATUS as hardware would
    /// for an SRAR error, ready for the caller to inject #MC with RIP still
    /// at the access (EIPV; RIPV clear: the access cannot simply be
    /// retried). `cr4_mce`: the vCPU's CR4.MCE.
    pub fn consume(&mut self, gpa: u64, fetch: bool, cr4_mce: bool) -> Result<(), Undeliverable> {
        if !cr4_mce {
            return Err(Undeliverable::Disabled);
        }
        if self.s.ctl != u64::MAX {
            return Err(Undeliverable::BankOff);
        }
        if self.s.mcg_status & mcg::MCIP != 0 {
            return Err(Undeliverable::InProgress);
        }
        let over = if self.s.status & status::VAL != 0 { status::OVER } else { 0 };
        let code = if fetch { status::MCACOD_INSN_FETCH } else { status::MCACOD_DATA_LOAD };
        self.s.status = status::VAL
            | over
            | status::UC
            | status::EN
            | status::MISCV
            | status::ADDRV
            | status::S
            | status::AR
            | code;
        self.s.addr = gpa;
        // Physical address, valid from bit 12: the page is what is lost.
        self.s.misc = (misc::MODE_PHYSICAL << misc::MODE_SHIFT) | 12;
        self.s.mcg_status = mcg::EIPV | mcg::MCIP;
        Ok(())
    }
}

impl Persist for VirtualMca {
    type State = VmceState;
    const STATE_VERSION: u16 = 1;

    fn save(&self) -> VmceState {
        self.s.clone()
    }

    fn validate(state: &VmceState) -> Result<(), Invalid> {
        if state.mcg_status & !MCG_STATUS_WRITABLE != 0 {
            return Err(Invalid("MCG_STATUS has reserved bits set"));
        }
        Ok(())
    }

    fn restore(&mut self, state: VmceState) {
        self.s = state;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enabled() -> VirtualMca {
        let mut m = VirtualMca::default();
        m.write_msr(bank_msr(0, 0), u64::MAX).unwrap();
        m
    }

    #[test]
    fn msrs_read_and_refuse_as_the_architecture_says() {
        let mut m = VirtualMca::default();
        assert_eq!(m.read_msr(MCG_CAP), GUEST_MCG_CAP);
        assert_eq!(m.write_msr(MCG_CAP, 0), Err(Gp));
        assert_eq!(m.write_msr(MCG_STATUS, 1 << 4), Err(Gp));
        assert!(VirtualMca::handles_msr(0x403) && !VirtualMca::handles_msr(0x404) && !VirtualMca::handles_msr(0x17b));
        m.write_msr(bank_msr(0, 2), 0x55).unwrap();
        assert_eq!(m.read_msr(bank_msr(0, 2)), 0x55);
        assert_eq!(m.write_msr(bank_msr(0, 1), 1), Err(Gp), "a status takes only 0");
    }

    #[test]
    fn consumed_poison_fills_the_bank_once_and_needs_the_guest_ready() {
        let mut off = VirtualMca::default();
        assert_eq!(off.consume(0x5000, false, true), Err(Undeliverable::BankOff));
        let mut m = enabled();
        assert_eq!(m.consume(0x5000, false, false), Err(Undeliverable::Disabled));
        m.consume(0x5123, false, true).unwrap();
        let st = m.read_msr(bank_msr(0, 1));
        assert_eq!(
            st & (status::VAL | status::UC | status::AR | status::ADDRV),
            status::VAL | status::UC | status::AR | status::ADDRV
        );
        assert_eq!(st & 0xffff, status::MCACOD_DATA_LOAD);
        assert_eq!(m.read_msr(bank_msr(0, 2)), 0x5123);
        assert_eq!(m.read_msr(bank_msr(0, 3)) & 0x3f, 12);
        assert_eq!(m.read_msr(MCG_STATUS), mcg::EIPV | mcg::MCIP);
        // Not yet handled: a second one shuts the processor down.
        assert_eq!(m.consume(0x6000, true, true), Err(Undeliverable::InProgress));
        // The handler clears MCIP (and maybe not the bank): the next error
        // overwrites the bank and says so.
        m.write_msr(MCG_STATUS, 0).unwrap();
        m.consume(0x6000, true, true).unwrap();
        let st = m.read_msr(bank_msr(0, 1));
        assert_eq!((st & status::OVER != 0, st & 0xffff), (true, status::MCACOD_INSN_FETCH));
        // Saved and restored whole; a state with reserved bits is refused.
        let mut b = VirtualMca::default();
        b.restore(m.save());
        assert_eq!(b.save(), m.save());
        assert!(VirtualMca::validate(&VmceState { mcg_status: 1 << 9, ..Default::default() }).is_err());
    }
}
