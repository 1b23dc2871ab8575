//! Ending the machine: ACPI soft-off, with the emulator's debug-exit port
//! first when the boot configuration names one (so an emulator run ends with
//! a status the test harness can read).

use core::sync::atomic::{AtomicU16, Ordering};
use x86_64::instructions::port::Port;

/// 0 = no debug-exit device. Set from the boot configuration only: writing
/// to an arbitrary port on real hardware is not safe.
static DEBUG_EXIT_PORT: AtomicU16 = AtomicU16::new(0);

pub fn set_debug_exit_port(port: u16) {
    DEBUG_EXIT_PORT.store(port, Ordering::Relaxed);
}

/// Powers off; `success` selects the status an emulator reports. Success
/// goes through ACPI soft-off (the real path, which an emulator reports as a
/// clean exit); failure first writes the debug-exit port so an emulator's
/// exit code says so.
pub fn off(success: bool) -> ! {
    x86_64::instructions::interrupts::disable();
    let port = DEBUG_EXIT_PORT.load(Ordering::Relaxed);
    if success {
        super::acpi::power_off();
        // Soft-off takes effect asynchronously (in QEMU, after the vCPU
        // returns to the main loop): give it time before the fallback.
        let until = super::time::micros() + 200_000;
        while super::time::micros() < until {
            core::hint::spin_loop();
        }
    }
    if port != 0 {
        // QEMU's isa-debug-exit exits with (v << 1) | 1: 0 -> 1, 1 -> 3.
        // SAFETY: the operator configured this port as a debug-exit device.
        unsafe { Port::<u32>::new(port).write(if success { 0 } else { 1 }) };
    }
    super::acpi::power_off();
    crate::println!("hypervisor: power-off did not take effect; halting");
    loop {
        x86_64::instructions::hlt();
    }
}

pub fn fail() -> ! {
    crate::platform::serial::force_write_fmt(format_args!("hypervisor: power off (failure)\n"));
    off(false)
}
