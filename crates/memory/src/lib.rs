//! How thinvisor reads and writes guest memory.
//!
//! Guest-physical memory is reached through [`GuestPhysMemory`]: one
//! object per VM, shared by its vCPUs, that checks each range and copies
//! in and out with atomic accesses through a [`PhysWindow`] (never a Rust
//! slice: other vCPUs, the guest and devices write the same memory; see
//! [`PhysWindow`] for why atomics). Two layouts implement it:
//! [`IsolatedMemory`] (one block at guest-physical 0) and
//! [`PassthroughMemory`] (guest-physical = host-physical, usable RAM minus
//! the hypervisor's own). Guest-linear memory is reached by walking the
//! guest's own page tables ([`translate`]) in whichever paging mode it is
//! in, and copying page by page ([`read_linear`], [`write_linear`],
//! [`read_cstr`], and the typed [`read_linear_u64`] and friends built on
//! them).
//!
//! The guest's physical memory itself is built here too: second-level
//! tables (AMD NPT, Intel EPT) in [`nested`] for guest RAM at an offset,
//! and in [`passthrough`] for the pass-through layout, with EPT memory
//! types decoded from the MTRRs by [`mtrr`].
//!
//! Every value that comes from the guest (registers, page-table entries,
//! addresses, lengths) is hostile: nothing here panics on it, loops are
//! bounded by the walk depth or the caller's buffer, and every failure is a
//! typed error.

#![no_std]

#[cfg(test)]
extern crate std;

mod addr;
mod linear;
pub mod mtrr;
pub mod nested;
mod paging;
pub mod passthrough;
mod phys;
mod window;

#[cfg(any(test, feature = "testing"))]
pub mod pagetable;
#[cfg(any(test, feature = "testing"))]
pub mod reference;

#[cfg(test)]
mod tests;

pub use addr::{GuestLinearAddr, GuestPhysAddr, HostPhysAddr};
pub use linear::{
    read_cstr, read_cstr_with_access, read_linear, read_linear_array, read_linear_u16,
    read_linear_u32, read_linear_u64, read_linear_u8, with_cstr, write_linear, write_linear_u16,
    write_linear_u32, write_linear_u64, write_linear_u8, CStrError,
};
pub use paging::{
    pf_error, translate, Access, PagingMode, PagingRegs, TranslateError, Translation, MAXPHYADDR,
};
pub use phys::{DirectMap, GuestPhysMemory, IsolatedMemory, PassthroughMemory, PhysAccessError};
pub use window::PhysWindow;
