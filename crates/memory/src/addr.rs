//! Address newtypes, so guest-physical, guest-linear and host-physical
//! addresses cannot be mixed up by accident.

use core::fmt;

macro_rules! address_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[repr(transparent)]
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
        pub struct $name(pub u64);

        impl $name {
            /// Wraps a raw address.
            pub const fn new(addr: u64) -> Self {
                Self(addr)
            }

            /// The raw address.
            pub const fn as_u64(self) -> u64 {
                self.0
            }

            /// `self + offset`, or `None` when that overflows 64 bits.
            pub const fn checked_add(self, offset: u64) -> Option<Self> {
                match self.0.checked_add(offset) {
                    Some(a) => Some(Self(a)),
                    None => None,
                }
            }

            /// Offset within the 4 KiB page (low 12 bits).
            pub const fn page_offset(self) -> u64 {
                self.0 & 0xFFF
            }
        }

        impl fmt::LowerHex for $name {
            /// Plain hex digits (honours `#`, width and padding like `u64`).
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::LowerHex::fmt(&self.0, f)
            }
        }

        impl fmt::Display for $name {
            /// `0x` followed by lower-case hex digits.
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }

        impl From<u64> for $name {
            fn from(addr: u64) -> Self {
                Self(addr)
            }
        }

        impl From<$name> for u64 {
            fn from(addr: $name) -> u64 {
                addr.0
            }
        }
    };
}

address_type!(
    /// An address in the guest's physical address space.
    GuestPhysAddr
);
address_type!(
    /// An address in the guest's linear (virtual) address space, after
    /// segmentation and before paging.
    GuestLinearAddr
);
address_type!(
    /// An address in the machine's (host) physical address space.
    HostPhysAddr
);
