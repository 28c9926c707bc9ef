//! Tests: unit tests per mode and edge case, and property tests against a
//! deliberately simple reference walker.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::vec;
use std::vec::Vec;

use crate::{GuestPhysAddr, GuestPhysMemory, IsolatedMemory, PhysAccessError, PhysWindow};

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
/// addresses a flat buffer cannot reach (e.g. just below 4 GiB). An access
/// must lie inside one window.
struct Windows {
    windows: Vec<(u64, IsolatedMemory<'static>)>,
}

impl Windows {
    fn new(windows: &[(u64, usize)]) -> Self {
        Self {
            windows: windows
                .iter()
                .map(|&(b, l)| (b, IsolatedMemory::new(vec![0; l].leak())))
                .collect(),
        }
    }
}

impl GuestPhysMemory for Windows {
    fn map(&self, gpa: GuestPhysAddr, len: usize) -> Result<PhysWindow<'_>, PhysAccessError> {
        self.windows
            .iter()
            .find_map(|(base, w)| {
                let off = gpa.0.checked_sub(*base)?;
                w.map(GuestPhysAddr(off), len).ok()
            })
            .ok_or(PhysAccessError { gpa })
    }
}

/// A count the tests read and reset (shared memory must be `Sync`, hence
/// atomic).
#[derive(Default)]
struct Count(AtomicUsize);

impl Count {
    fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }

    fn set(&self, v: usize) {
        self.0.store(v, Ordering::Relaxed);
    }
}

/// Counts the ranges mapped for reading (entries and data), to check the
/// once-per-page promise; refuses writes.
struct Counting<'m, M> {
    inner: &'m M,
    reads: Count,
}

impl<M: GuestPhysMemory> GuestPhysMemory for Counting<'_, M> {
    fn map(&self, gpa: GuestPhysAddr, len: usize) -> Result<PhysWindow<'_>, PhysAccessError> {
        self.reads.set(self.reads.get() + 1);
        self.inner.map(gpa, len)
    }

    fn write_phys(&self, gpa: GuestPhysAddr, _data: &[u8]) -> Result<(), PhysAccessError> {
        Err(PhysAccessError { gpa })
    }
}
