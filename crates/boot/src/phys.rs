//! Writing the guest's memory in the pass-through layout, where
//! guest-physical addresses are host-physical addresses.
//!
//! The loaders in this crate decide *where* things go; the hypervisor does
//! the writing through its direct map, and refuses addresses it has no
//! mapping for (holes, MMIO). [`PhysWrite`] is that seam: the hypervisor
//! implements it over the direct map, tests over a buffer, and the isolated
//! layout over the guest's RAM block ([`RamSlice`]).

use core::fmt;

/// A physical write that the target refused: `len` bytes at `addr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PhysWriteError {
    /// First physical address of the refused write.
    pub addr: u64,
    /// Its length in bytes.
    pub len: u64,
}

impl core::error::Error for PhysWriteError {}

impl fmt::Display for PhysWriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot write physical memory {:#x}+{:#x} (not mapped)",
            self.addr, self.len
        )
    }
}

/// Physical memory the loaders write the guest's kernel and boot
/// information into. Every range handed to it has already been checked
/// against the memory map; an implementation still refuses what it cannot
/// reach rather than writing somewhere else.
pub trait PhysWrite {
    /// Copies `bytes` to physical address `pa`.
    fn write(&mut self, pa: u64, bytes: &[u8]) -> Result<(), PhysWriteError>;
    /// Fills `len` bytes from physical address `pa` with zeros.
    fn zero(&mut self, pa: u64, len: u64) -> Result<(), PhysWriteError>;
}

/// A buffer standing for physical memory `[base, base + bytes.len())`: the
/// isolated layout's guest RAM (base 0), or a test's memory.
#[derive(Debug)]
pub struct RamSlice<'a> {
    base: u64,
    bytes: &'a mut [u8],
}

impl<'a> RamSlice<'a> {
    /// `bytes` holds physical memory from `base` on.
    pub fn new(base: u64, bytes: &'a mut [u8]) -> Self {
        RamSlice { base, bytes }
    }

    fn range(&mut self, pa: u64, len: u64) -> Result<&mut [u8], PhysWriteError> {
        let err = PhysWriteError { addr: pa, len };
        let start = pa
            .checked_sub(self.base)
            .and_then(|o| usize::try_from(o).ok())
            .ok_or(err)?;
        let end = usize::try_from(len)
            .ok()
            .and_then(|l| start.checked_add(l))
            .ok_or(err)?;
        self.bytes.get_mut(start..end).ok_or(err)
    }
}

impl PhysWrite for RamSlice<'_> {
    fn write(&mut self, pa: u64, bytes: &[u8]) -> Result<(), PhysWriteError> {
        self.range(pa, bytes.len() as u64)?.copy_from_slice(bytes);
        Ok(())
    }

    fn zero(&mut self, pa: u64, len: u64) -> Result<(), PhysWriteError> {
        self.range(pa, len)?.fill(0);
        Ok(())
    }
}
