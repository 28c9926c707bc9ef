//! Starting thinvisor from software that goes on running as its guest:
//! thinvisor.efi (the UEFI firmware continues booting under thinvisor) and
//! the test guest's `loader` mode (docs/uefi.md).
//!
//! Three steps, each its own module:
//! 1. [`image`]: where thinvisor's ELF image wants to be in physical memory
//!    (the caller reserves that range from its firmware first) and copying
//!    it there;
//! 2. [`info`]: the multiboot2 information thinvisor's entry reads: its
//!    command line, the memory map, the ACPI RSDP and the
//!    [`thinvisor_boot::resume`] tag;
//! 3. [`switch`]: recording the caller's processor state into that tag and
//!    entering thinvisor's 32-bit entry the way a multiboot2 loader does;
//!    the caller's call returns when thinvisor resumes it as its guest.
//!
//! Steps 1 and 2 are plain data and tested on the host, as is [`layout`]:
//! finding room for thinvisor in a memory map, for a loader that has no
//! allocator to ask.

#![no_std]

pub mod image;
pub mod info;
pub mod layout;
#[cfg(target_arch = "x86_64")]
pub mod switch;
