//! Nested page tables: guest-physical to host-physical, in the long-mode
//! page-table format (AMD APM vol. 2, 15.25).

use thinvisor_memory::{GuestPhysAddr, HostPhysAddr};

/// Where the builder gets zeroed 4 KiB tables and how it reaches them.
pub trait TableAllocator {
    /// A new, zeroed table, or None when memory is exhausted.
    fn alloc_table(&mut self) -> Option<HostPhysAddr>;
    /// The table at `pa` (one the allocator handed out).
    fn table(&mut self, pa: HostPhysAddr) -> &mut [u64; 512];
}

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
/// Nested page walks are user accesses: every entry needs U (APM 15.25.5).
const USER: u64 = 1 << 2;
const HUGE: u64 = 1 << 7;
const ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;
const SIZE_2M: u64 = 2 << 20;

/// Why a mapping could not be built.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum NptError {
    OutOfMemory,
    /// Addresses or size not 2 MiB aligned.
    Misaligned,
    /// The range was already (partly) mapped differently.
    Overlap,
}

/// A 4-level nested page table.
pub struct NestedPageTable {
    root: HostPhysAddr,
}

impl NestedPageTable {
    pub fn new(alloc: &mut dyn TableAllocator) -> Result<Self, NptError> {
        let root = alloc.alloc_table().ok_or(NptError::OutOfMemory)?;
        Ok(Self { root })
    }

    /// The value for the VMCB's nCR3.
    pub fn root(&self) -> HostPhysAddr {
        self.root
    }

    /// Map `size` bytes at `gpa` to `hpa` read/write/execute with 2 MiB
    /// pages; all three must be 2 MiB aligned.
    pub fn map_2m(
        &mut self,
        alloc: &mut dyn TableAllocator,
        gpa: GuestPhysAddr,
        hpa: HostPhysAddr,
        size: u64,
    ) -> Result<(), NptError> {
        if !(gpa.as_u64() | hpa.as_u64() | size).is_multiple_of(SIZE_2M) {
            return Err(NptError::Misaligned);
        }
        let mut offset = 0;
        while offset < size {
            let g = gpa
                .as_u64()
                .checked_add(offset)
                .ok_or(NptError::Misaligned)?;
            let h = hpa
                .as_u64()
                .checked_add(offset)
                .ok_or(NptError::Misaligned)?;
            let pml4 = self.root;
            let pdpt = next_table(alloc, pml4, index(g, 39))?;
            let pd = next_table(alloc, pdpt, index(g, 30))?;
            let entry = &mut alloc.table(pd)[index(g, 21)];
            if *entry != 0 {
                return Err(NptError::Overlap);
            }
            *entry = (h & ADDR_MASK) | PRESENT | WRITABLE | USER | HUGE;
            offset += SIZE_2M;
        }
        Ok(())
    }
}

fn index(address: u64, shift: u32) -> usize {
    ((address >> shift) & 0x1FF) as usize
}

/// The table that entry `i` of `table` points to, created when absent.
fn next_table(
    alloc: &mut dyn TableAllocator,
    table: HostPhysAddr,
    i: usize,
) -> Result<HostPhysAddr, NptError> {
    let entry = alloc.table(table)[i];
    if entry & PRESENT != 0 {
        if entry & HUGE != 0 {
            return Err(NptError::Overlap);
        }
        return Ok(HostPhysAddr::new(entry & ADDR_MASK));
    }
    let new = alloc.alloc_table().ok_or(NptError::OutOfMemory)?;
    alloc.table(table)[i] = new.as_u64() | PRESENT | WRITABLE | USER;
    Ok(new)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::collections::BTreeMap;

    /// Tables kept in a map from fake physical addresses.
    struct Fake {
        tables: BTreeMap<u64, [u64; 512]>,
        next: u64,
        limit: usize,
    }

    impl TableAllocator for Fake {
        fn alloc_table(&mut self) -> Option<HostPhysAddr> {
            if self.tables.len() == self.limit {
                return None;
            }
            self.next += 0x1000;
            self.tables.insert(self.next, [0; 512]);
            Some(HostPhysAddr::new(self.next))
        }
        fn table(&mut self, pa: HostPhysAddr) -> &mut [u64; 512] {
            self.tables.get_mut(&pa.as_u64()).unwrap()
        }
    }

    fn fake(limit: usize) -> Fake {
        Fake {
            tables: BTreeMap::new(),
            next: 0x10_0000,
            limit,
        }
    }

    /// Walk like the processor would.
    fn walk(f: &mut Fake, root: HostPhysAddr, gpa: u64) -> Option<u64> {
        let mut table = root;
        for shift in [39, 30] {
            let e = f.table(table)[index(gpa, shift)];
            if e & PRESENT == 0 || e & USER == 0 {
                return None;
            }
            table = HostPhysAddr::new(e & ADDR_MASK);
        }
        let e = f.table(table)[index(gpa, 21)];
        (e & (PRESENT | USER | HUGE) == PRESENT | USER | HUGE)
            .then(|| (e & ADDR_MASK) + (gpa & (SIZE_2M - 1)))
    }

    #[test]
    fn maps_guest_ram_at_an_offset() {
        let mut f = fake(16);
        let mut npt = NestedPageTable::new(&mut f).unwrap();
        let base = 0x4000_0000;
        npt.map_2m(
            &mut f,
            GuestPhysAddr::new(0),
            HostPhysAddr::new(base),
            64 << 20,
        )
        .unwrap();
        let root = npt.root();
        for gpa in [0, 0x1234, (2 << 20) + 5, (64 << 20) - 1] {
            assert_eq!(walk(&mut f, root, gpa), Some(base + gpa));
        }
        assert_eq!(walk(&mut f, root, 64 << 20), None);
        assert_eq!(walk(&mut f, root, 0xE000_0000), None);
        // PML4 + PDPT + one PD.
        assert_eq!(f.tables.len(), 3);
    }

    #[test]
    fn refuses_misaligned_overlapping_and_exhaustion() {
        let mut f = fake(3);
        let mut npt = NestedPageTable::new(&mut f).unwrap();
        let g = GuestPhysAddr::new;
        let h = HostPhysAddr::new;
        assert_eq!(
            npt.map_2m(&mut f, g(0x1000), h(0), SIZE_2M),
            Err(NptError::Misaligned)
        );
        assert_eq!(
            npt.map_2m(&mut f, g(0), h(0), 0x1000),
            Err(NptError::Misaligned)
        );
        npt.map_2m(&mut f, g(0), h(0), SIZE_2M).unwrap();
        assert_eq!(
            npt.map_2m(&mut f, g(0), h(0), SIZE_2M),
            Err(NptError::Overlap)
        );
        assert_eq!(
            npt.map_2m(&mut f, g(1 << 30), h(0), SIZE_2M),
            Err(NptError::OutOfMemory)
        );
    }
}
