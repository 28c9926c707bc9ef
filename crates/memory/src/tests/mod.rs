//! Tests: unit tests per mode and edge case, and property tests against a
//! deliberately simple reference walker.

use std::cell::Cell;
use std::vec;
use std::vec::Vec;

use crate::{GuestPhysAddr, GuestPhysMemory, PhysAccessError};

mod cstr;
mod linear;
mod paging;
mod phys;
mod props;
mod types;

/// Guest RAM size for unit tests: 8 MiB, so 2 MiB and 4 MiB pages fit.
const RAM: usize = 8 << 20;
/// Where unit tests put page-table pages.
const TABLES: u64 = 0x10_0000;
const TABLES_END: u64 = 0x20_0000;

fn guest_ram() -> Vec<u8> {
    vec![0u8; RAM]
}

/// Guest memory made of a few separate windows, for tests that need RAM at
/// addresses a flat buffer cannot reach (e.g. just below 4 GiB).
struct Windows {
    windows: Vec<(u64, Vec<u8>)>,
}

impl Windows {
    fn new(windows: &[(u64, usize)]) -> Self {
        Self {
            windows: windows.iter().map(|&(b, l)| (b, vec![0; l])).collect(),
        }
    }

    fn find(&self, gpa: u64, len: usize) -> Option<(usize, usize)> {
        self.windows.iter().enumerate().find_map(|(i, (base, w))| {
            let off = usize::try_from(gpa.checked_sub(*base)?).ok()?;
            (off.checked_add(len)? <= w.len()).then_some((i, off))
        })
    }
}

impl GuestPhysMemory for Windows {
    fn map(&self, gpa: GuestPhysAddr, len: usize) -> Result<&[u8], PhysAccessError> {
        let (i, off) = self.find(gpa.0, len).ok_or(PhysAccessError { gpa })?;
        Ok(&self.windows[i].1[off..off + len])
    }

    fn map_mut(&mut self, gpa: GuestPhysAddr, len: usize) -> Result<&mut [u8], PhysAccessError> {
        let (i, off) = self.find(gpa.0, len).ok_or(PhysAccessError { gpa })?;
        Ok(&mut self.windows[i].1[off..off + len])
    }
}

/// Counts `read_phys` calls, to check the once-per-page promise.
struct Counting<'m, M> {
    inner: &'m M,
    reads: Cell<usize>,
}

impl<M: GuestPhysMemory> GuestPhysMemory for Counting<'_, M> {
    fn map(&self, gpa: GuestPhysAddr, len: usize) -> Result<&[u8], PhysAccessError> {
        self.inner.map(gpa, len)
    }

    fn map_mut(&mut self, gpa: GuestPhysAddr, _len: usize) -> Result<&mut [u8], PhysAccessError> {
        Err(PhysAccessError { gpa })
    }

    fn read_phys(&self, gpa: GuestPhysAddr, buf: &mut [u8]) -> Result<(), PhysAccessError> {
        self.reads.set(self.reads.get() + 1);
        self.inner.read_phys(gpa, buf)
    }
}
