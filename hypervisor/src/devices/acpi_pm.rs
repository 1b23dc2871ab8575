//! The ACPI fixed-hardware power-management registers (ACPI 6.5 4.8) the
//! guest's FADT names (`firmware::acpi`): the PM1a event block (status and
//! enable), the PM1a control block (SCI_EN, and SLP_TYP/SLP_EN to power
//! off), and the 32-bit PM timer at 3.579545 MHz; plus the PC's reset
//! control port 0xcf9, the FADT's reset register.
//!
//! The platform is in ACPI mode from reset (no SMI command port), so SCI_EN
//! reads 1 and stays set. The only sleep state is S5 (the DSDT has no other
//! `\_Sx`): a guest asking for it powers the VM off.

use serde::{Deserialize, Serialize};

use super::persist::{Invalid, Persist};
use crate::firmware::acpi::{PM_TMR, PM1A_CNT, PM1A_EVT, RESET_PORT, S5_SLP_TYP};

/// The PM timer's rate (ACPI 6.5 4.8.3.3).
pub const PM_TIMER_HZ: u64 = 3_579_545;

/// PM1 status bits (4.8.3.1.1) the model keeps: the timer's carry, the
/// power button, and wake.
const TMR_STS: u16 = 1;
const PWRBTN_STS: u16 = 1 << 8;
const WAK_STS: u16 = 1 << 15;
const STS_BITS: u16 = TMR_STS | PWRBTN_STS | WAK_STS;
/// PM1 enable bits: timer, global lock, power button, sleep button, RTC.
const EN_BITS: u16 = 1 | 1 << 5 | 1 << 8 | 1 << 9 | 1 << 10;
/// PM1 control (4.8.3.2.1): SCI_EN, BM_RLD, GBL_RLS, SLP_TYP, SLP_EN.
const SCI_EN: u16 = 1;
const SLP_TYP_SHIFT: u16 = 10;
const SLP_EN: u16 = 1 << 13;
const CNT_BITS: u16 = SCI_EN | 1 << 1 | 7 << SLP_TYP_SHIFT;

/// What a register write asks of the platform.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// SLP_EN with S5's SLP_TYP: soft-off.
    PowerOff,
    /// A reset through the reset register.
    Reset,
}

/// The guest-visible state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcpiPmState {
    pub status: u16,
    pub enable: u16,
    pub control: u16,
    /// The last value written to the reset control port (its low bits are
    /// kept, as on the PIIX/ICH).
    pub reset_control: u8,
}

/// The PM registers and the reset port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiPm {
    state: AcpiPmState,
}

impl Default for AcpiPm {
    fn default() -> Self {
        Self::new()
    }
}

impl AcpiPm {
    pub fn new() -> Self {
        AcpiPm { state: AcpiPmState { control: SCI_EN, ..AcpiPmState::default() } }
    }

    /// The ports the model decodes: `(base, len)`.
    pub const PORTS: [(u16, u64); 4] = [(PM1A_EVT, 4), (PM1A_CNT, 2), (PM_TMR, 4), (RESET_PORT, 1)];

    /// The PM timer's count at `now_ns` (the VM's clock).
    pub fn timer(now_ns: u64) -> u32 {
        (u128::from(now_ns) * u128::from(PM_TIMER_HZ) / 1_000_000_000) as u32
    }

    /// One byte of a port read.
    pub fn read(&mut self, port: u16, now_ns: u64) -> u8 {
        let byte = |v: u16, hi: bool| if hi { (v >> 8) as u8 } else { v as u8 };
        match port {
            p if p == PM1A_EVT || p == PM1A_EVT + 1 => byte(self.state.status, p != PM1A_EVT),
            p if p == PM1A_EVT + 2 || p == PM1A_EVT + 3 => byte(self.state.enable, p != PM1A_EVT + 2),
            p if p == PM1A_CNT || p == PM1A_CNT + 1 => byte(self.state.control, p != PM1A_CNT),
            p if (PM_TMR..PM_TMR + 4).contains(&p) => (Self::timer(now_ns) >> (8 * (p - PM_TMR))) as u8,
            RESET_PORT => self.state.reset_control,
            _ => 0xff,
        }
    }

    /// One byte of a port write; what it asks of the platform, if anything.
    pub fn write(&mut self, port: u16, value: u8) -> Option<Request> {
        let set = |reg: &mut u16, hi: bool, mask: u16| {
            let shift = if hi { 8 } else { 0 };
            *reg = (*reg & !(0xff << shift)) | ((u16::from(value) << shift) & mask);
        };
        match port {
            // Status bits are write-one-to-clear (4.8.3.1.1).
            p if p == PM1A_EVT || p == PM1A_EVT + 1 => {
                let shift = if p == PM1A_EVT { 0 } else { 8 };
                self.state.status &= !((u16::from(value) << shift) & STS_BITS);
            }
            p if p == PM1A_EVT + 2 || p == PM1A_EVT + 3 => set(&mut self.state.enable, p != PM1A_EVT + 2, EN_BITS),
            p if p == PM1A_CNT => {
                set(&mut self.state.control, false, CNT_BITS);
                // SCI_EN is hardware-owned here: always in ACPI mode.
                self.state.control |= SCI_EN;
            }
            p if p == PM1A_CNT + 1 => {
                set(&mut self.state.control, true, CNT_BITS);
                let slp_typ = ((self.state.control >> SLP_TYP_SHIFT) & 7) as u8;
                if u16::from(value) << 8 & SLP_EN != 0 && slp_typ == S5_SLP_TYP {
                    return Some(Request::PowerOff);
                }
            }
            RESET_PORT => {
                // Bit 2 (reset CPU) starts the reset bit 1 selects (hard or
                // soft): either restarts the VM here.
                let start = value & 0x04 != 0 && self.state.reset_control & 0x04 == 0;
                self.state.reset_control = value & 0x0e;
                if start {
                    return Some(Request::Reset);
                }
            }
            _ => {}
        }
        None
    }
}

impl Persist for AcpiPm {
    type State = AcpiPmState;
    const STATE_VERSION: u16 = 1;

    fn save(&self) -> AcpiPmState {
        self.state.clone()
    }

    fn validate(s: &AcpiPmState) -> Result<(), Invalid> {
        if s.status & !STS_BITS != 0 || s.enable & !EN_BITS != 0 || s.control & !CNT_BITS != 0 {
            return Err(Invalid("a PM1 register has bits the hardware does not keep"));
        }
        if s.control & SCI_EN == 0 {
            return Err(Invalid("SCI_EN is clear on a platform that is always in ACPI mode"));
        }
        Ok(())
    }

    fn restore(&mut self, state: AcpiPmState) {
        self.state = state;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write16(pm: &mut AcpiPm, port: u16, v: u16) -> Option<Request> {
        let a = pm.write(port, v as u8);
        a.or(pm.write(port + 1, (v >> 8) as u8))
    }

    #[test]
    fn the_pm_timer_counts_at_3_58_mhz_and_wraps_at_32_bits() {
        let mut pm = AcpiPm::new();
        let read32 = |pm: &mut AcpiPm, t| (0..4).fold(0u32, |v, i| v | u32::from(pm.read(PM_TMR + i, t)) << (8 * i));
        assert_eq!(read32(&mut pm, 0), 0);
        assert_eq!(read32(&mut pm, 1_000_000_000), 3_579_545);
        assert_eq!(read32(&mut pm, 1_200_000_000_000), (1_200u64 * 3_579_545 % (1 << 32)) as u32, "wraps");
    }

    #[test]
    fn sci_en_is_set_and_s5_powers_off() {
        let mut pm = AcpiPm::new();
        assert_eq!(pm.read(PM1A_CNT, 0) & 1, 1, "ACPI mode from reset");
        // SLP_TYP = S5 without SLP_EN: nothing yet; then SLP_EN.
        assert_eq!(write16(&mut pm, PM1A_CNT, u16::from(S5_SLP_TYP) << 10), None);
        assert_eq!(write16(&mut pm, PM1A_CNT, u16::from(S5_SLP_TYP) << 10 | SLP_EN), Some(Request::PowerOff));
        // Another sleep type is not a state this platform has.
        let mut pm = AcpiPm::new();
        assert_eq!(write16(&mut pm, PM1A_CNT, 5 << 10 | SLP_EN), None);
        assert_eq!(pm.read(PM1A_CNT + 1, 0) & 0x20, 0, "SLP_EN reads 0");
        // A byte write of the control block's low half cannot clear SCI_EN
        // either (the state would then be one `validate` refuses).
        assert_eq!(pm.write(PM1A_CNT, 0), None);
        assert_eq!(pm.read(PM1A_CNT, 0) & 1, 1);
        assert_eq!(AcpiPm::validate(&pm.save()), Ok(()));
    }

    #[test]
    fn status_is_write_one_to_clear_and_enable_keeps_its_bits() {
        let mut pm = AcpiPm::new();
        pm.state.status = TMR_STS | PWRBTN_STS;
        write16(&mut pm, PM1A_EVT, PWRBTN_STS);
        assert_eq!(pm.state.status, TMR_STS);
        write16(&mut pm, PM1A_EVT + 2, 0xffff);
        assert_eq!(u16::from(pm.read(PM1A_EVT + 2, 0)) | u16::from(pm.read(PM1A_EVT + 3, 0)) << 8, EN_BITS);
    }

    #[test]
    fn the_reset_port_resets_on_bit_2() {
        let mut pm = AcpiPm::new();
        assert_eq!(pm.write(RESET_PORT, 0x02), None, "selecting a hard reset does not start it");
        assert_eq!(pm.write(RESET_PORT, 0x06), Some(Request::Reset));
        assert_eq!(pm.read(RESET_PORT, 0), 0x06);
    }

    #[test]
    fn state_round_trips_and_bad_state_is_refused() {
        use crate::devices::persist::{RestoreError, decode, save};
        let mut pm = AcpiPm::new();
        write16(&mut pm, PM1A_EVT + 2, 1 << 8);
        let mut back = AcpiPm::new();
        back.restore(decode::<AcpiPm>("acpi-pm", &save("acpi-pm", &pm)).unwrap());
        assert_eq!(back, pm);
        let mut bad = pm.clone();
        bad.state.control = 0;
        assert!(matches!(decode::<AcpiPm>("acpi-pm", &save("acpi-pm", &bad)), Err(RestoreError::Invalid { .. })));
    }
}
