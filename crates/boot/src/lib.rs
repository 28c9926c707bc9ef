//! Everything thinvisor learns at boot, parsed so that it can be tested on the
//! host: the hypervisor's command line, the boot loader's information
//! (multiboot v1 and v2) copied into a neutral [`BootInfo`], a physical frame
//! allocator built from the firmware's memory map, and the guest loaders: a
//! multiboot v1 loader for the isolated layout (guest RAM is a block at
//! guest-physical 0) and, for the pass-through layout (guest-physical =
//! host-physical), the guest's memory map with thinvisor hidden
//! ([`e820`]), a Linux bzImage loader ([`linux`]) and the multiboot v1
//! loader over the same [`phys::PhysWrite`] target.
//!
//! Every input here comes from outside (boot loader, firmware, a guest image),
//! so every parser returns an error for malformed input instead of panicking.

#![no_std]

pub mod acpi;
pub mod alloc;
pub mod cmdline;
pub mod e820;
pub mod entry;
pub mod guest;
mod info;
pub mod linux;
pub mod multiboot1;
pub mod multiboot2;
pub mod phys;
mod place;
pub mod resume;

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
