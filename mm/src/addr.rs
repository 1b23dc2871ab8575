//! Typed guest-physical and host-physical addresses.
//!
//! Mixing up the two address spaces is the classic hypervisor bug; distinct
//! newtypes make it a type error.

use core::fmt;

/// Size of a 4 KiB page.
pub const PAGE_SIZE_4K: u64 = 1 << 12;
/// Size of a 2 MiB page.
pub const PAGE_SIZE_2M: u64 = 1 << 21;
/// Size of a 1 GiB page.
pub const PAGE_SIZE_1G: u64 = 1 << 30;

/// First guest-physical address that 4-level nested paging cannot translate:
/// EPT and NPT with four levels both cover 48 bits of guest-physical space
/// (SDM Vol. 3C 29.3.2, APM Vol. 2 15.25.5).
pub const GUEST_PHYS_LIMIT: u64 = 1 << 48;

/// First host-physical address a 4-level entry cannot hold: entries carry
/// address bits 51:12 (SDM Vol. 3C Table 29-6, APM Vol. 2 Figure 5-23).
pub const HOST_PHYS_LIMIT: u64 = 1 << 52;

macro_rules! phys_addr {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        #[repr(transparent)]
        pub struct $name(pub u64);

        impl $name {
            /// The raw address.
            #[inline]
            pub const fn as_u64(self) -> u64 {
                self.0
            }

            /// Whether the address is a multiple of `align` (a power of two).
            #[inline]
            pub const fn is_aligned(self, align: u64) -> bool {
                debug_assert!(align.is_power_of_two());
                self.0 & (align - 1) == 0
            }

            /// The address rounded down to a multiple of `align` (a power of two).
            #[inline]
            pub const fn align_down(self, align: u64) -> Self {
                debug_assert!(align.is_power_of_two());
                Self(self.0 & !(align - 1))
            }

            /// The address rounded up to a multiple of `align` (a power of
            /// two), or `None` on overflow.
            #[inline]
            pub const fn align_up(self, align: u64) -> Option<Self> {
                debug_assert!(align.is_power_of_two());
                match self.0.checked_add(align - 1) {
                    Some(v) => Some(Self(v & !(align - 1))),
                    None => None,
                }
            }

            /// `self + offset`, or `None` on overflow.
            #[inline]
            pub const fn checked_add(self, offset: u64) -> Option<Self> {
                match self.0.checked_add(offset) {
                    Some(v) => Some(Self(v)),
                    None => None,
                }
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({:#x})"), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }

        impl fmt::LowerHex for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::LowerHex::fmt(&self.0, f)
            }
        }
    };
}

phys_addr! {
    /// An address in a guest's physical address space (what the guest puts in
    /// its own page tables; the input of EPT/NPT translation).
    GuestPhysAddr
}

phys_addr! {
    /// An address in the host's (machine) physical address space (the output
    /// of EPT/NPT translation).
    HostPhysAddr
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;

    #[test]
    fn alignment_helpers() {
        let a = GuestPhysAddr(0x20_1234);
        assert!(!a.is_aligned(PAGE_SIZE_4K));
        assert_eq!(a.align_down(PAGE_SIZE_4K), GuestPhysAddr(0x20_1000));
        assert_eq!(a.align_down(PAGE_SIZE_2M), GuestPhysAddr(0x20_0000));
        assert_eq!(a.align_up(PAGE_SIZE_2M), Some(GuestPhysAddr(0x40_0000)));
        assert_eq!(GuestPhysAddr(u64::MAX).align_up(PAGE_SIZE_4K), None);
        assert!(HostPhysAddr(PAGE_SIZE_1G).is_aligned(PAGE_SIZE_1G));
        assert_eq!(HostPhysAddr(u64::MAX).checked_add(1), None);
    }

    #[test]
    fn debug_shows_hex() {
        assert_eq!(format!("{:?}", GuestPhysAddr(0x1000)), "GuestPhysAddr(0x1000)");
        assert_eq!(format!("{:?}", HostPhysAddr(255)), "HostPhysAddr(0xff)");
        assert_eq!(format!("{}", HostPhysAddr(0x2000)), "0x2000");
    }
}
