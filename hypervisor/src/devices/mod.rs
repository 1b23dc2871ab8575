//! Guest-facing device models reached through port I/O. Each model is plain
//! logic over its registers, so it is tested on the host.

pub mod uart;

/// The debug-exit port: a write of V ends the VM with status (V << 1) | 1,
/// like QEMU's `isa-debug-exit` device, so test kernels written for QEMU
/// report their verdict the same way here.
pub const EXIT_PORT: u16 = 0xf4;

/// COM1's ports.
pub const COM1_BASE: u16 = 0x3f8;

/// What a port access did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortEffect {
    /// Done; for reads, the value read.
    Done(u32),
    /// The guest asked to end with this exit status.
    Exit(u32),
}

/// All-ones for reads of ports no device decodes, as on a PC bus.
pub fn unbacked_read(size: u8) -> u32 {
    match size {
        1 => 0xff,
        2 => 0xffff,
        _ => 0xffff_ffff,
    }
}

/// The exit status for a value written to [`EXIT_PORT`].
pub fn exit_status(value: u32) -> u32 {
    (value << 1) | 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_status_follows_isa_debug_exit() {
        assert_eq!(exit_status(0), 1);
        assert_eq!(exit_status(1), 3);
        assert_eq!(exit_status(0x7f), 0xff);
        assert_eq!(unbacked_read(1), 0xff);
        assert_eq!(unbacked_read(4), 0xffff_ffff);
    }
}
