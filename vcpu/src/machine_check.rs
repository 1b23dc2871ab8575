//! A machine check that interrupted a guest. Both backends intercept #MC
//! (VT-x: exception bitmap bit 18, and exit reason 41 for one during VM
//! entry; AMD-V: exception intercept 18): a host memory or bus error must
//! reach the host's handler, which reads the banks, never the guest's IDT.
//! The CPU holds the #MC at the exit (SDM Vol. 3C 26.2 and 28.2; APM Vol. 2
//! 15.12), so the backend raises it for the host once back in host mode,
//! as KVM does with `int $18`; the handler finds the banks as the hardware
//! left them.

/// The #MC vector.
pub const VECTOR: u8 = 18;

/// Run the host's #MC handler for the machine check that ended the
/// guest's run. A no-op off bare metal (unit tests on a host OS).
pub fn deliver_to_host() {
    #[cfg(target_os = "none")]
    // SAFETY: INT 18 runs the host IDT's #MC handler, on its own IST
    // stack (installed at bring-up, before any guest runs); it returns
    // here when the error was survivable, or powers the machine off.
    unsafe {
        core::arch::asm!("int 18", options(nomem, nostack))
    };
}
