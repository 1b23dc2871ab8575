//! A host interrupt that ended a guest's run under VT-x. With "acknowledge
//! interrupt on exit" (SDM Vol. 3C 25.7.1) the exit takes the vector from
//! the local APIC (its ISR bit set, the exit's interruption information
//! names it) and nothing runs the host's handler: the backend must, or
//! the vector stays in service and blocks every interrupt of its priority
//! class on that CPU (a kick on the wake vector would then block the next
//! wake-up). KVM does the same by calling the IDT entry. AMD-V leaves the
//! interrupt pending and the host takes it after STGI: nothing to do there.

/// The first vector that is not an exception.
pub const FIRST_EXTERNAL: u8 = 32;

// One stub per external vector, 4 bytes apart: `int N; ret`. Hand-written
// because `int` takes its vector as an immediate only.
#[cfg(target_os = "none")]
core::arch::global_asm!(
    ".section .text.host_int_stubs, \"ax\"",
    ".balign 4",
    ".global hv_host_int_stubs",
    "hv_host_int_stubs:",
    ".set vec, 32",
    ".rept 224",
    ".balign 4",
    "int vec",
    "ret",
    ".set vec, vec + 1",
    ".endr",
);

/// Runs the host IDT's handler for external interrupt `vector` (32..=255),
/// as if it had arrived in host mode. A no-op for exception vectors (the
/// backends deliver #MC and NMI on their own paths) and off bare metal.
pub fn deliver_to_host(vector: u8) {
    #[cfg(target_os = "none")]
    if vector >= FIRST_EXTERNAL {
        unsafe extern "C" {
            static hv_host_int_stubs: u8;
        }
        let stub = &raw const hv_host_int_stubs as u64 + u64::from(vector - FIRST_EXTERNAL) * 4;
        // SAFETY: `stub` is the start of this vector's `int N; ret` (4-byte
        // slots from the table's start, vector >= 32 so inside it). The
        // host's handler for an external vector saves every register it
        // uses (x86-interrupt), acknowledges the local APIC and returns;
        // the stub then returns here. The call uses the stack, which is
        // ours.
        unsafe { core::arch::asm!("call {}", in(reg) stub) };
    }
    #[cfg(not(target_os = "none"))]
    let _ = vector;
}
