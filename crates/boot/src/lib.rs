//! Everything thinvisor learns at boot, parsed so that it can be tested on the
//! host: the hypervisor's command line, the boot loader's information
//! (multiboot v1 and v2) copied into a neutral [`BootInfo`], a physical frame
//! allocator built from the firmware's memory map, and a multiboot v1 loader
//! for the guest kernel.
//!
//! Every input here comes from outside (boot loader, firmware, a guest image),
//! so every parser returns an error for malformed input instead of panicking.

#![no_std]

pub mod alloc;
pub mod cmdline;
pub mod guest;
mod info;
pub mod multiboot1;
pub mod multiboot2;

pub use info::{
    BootInfo, BootInfoError, MemKind, MemRegion, Module, CMDLINE_CAP, MAX_MODULES, MAX_REGIONS,
    MODULE_STRING_CAP,
};

/// Size of a small page; the unit of every physical allocation.
pub const PAGE_SIZE: u64 = 4096;

/// Rounds `x` up to a multiple of `align` (a power of two); `None` on overflow.
pub(crate) fn align_up(x: u64, align: u64) -> Option<u64> {
    let mask = align.checked_sub(1)?;
    Some(x.checked_add(mask)? & !mask)
}

/// Rounds `x` down to a multiple of `align` (a power of two).
pub(crate) fn align_down(x: u64, align: u64) -> u64 {
    x & !align.wrapping_sub(1)
}
