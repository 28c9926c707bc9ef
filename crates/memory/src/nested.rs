//! Second-level page tables, guest-physical to host-physical: AMD's
//! nested page tables (APM vol. 2, 15.25) and Intel's EPT (SDM vol. 3C,
//! 29.3). Both are 4-level radix trees with the long-mode geometry; only
//! the bits of an entry differ, so one builder serves both.
//!
//! [`NestedPageTable`] maps guest RAM at an offset (the isolated layout);
//! the pass-through layout (identity, thinvisor's memory hidden, EPT
//! memory types from the MTRRs) is [`crate::passthrough`].

use crate::{GuestPhysAddr, HostPhysAddr};

/// Where the builder gets zeroed 4 KiB tables and how it reaches them.
pub trait TableAllocator {
    /// A new, zeroed table, or None when memory is exhausted.
    fn alloc_table(&mut self) -> Option<HostPhysAddr>;
    /// The table at `pa` (one the allocator handed out).
    fn table(&mut self, pa: HostPhysAddr) -> &mut [u64; 512];
}

/// Bit 0 is "present" in NPT entries and "readable" in EPT entries; every
/// entry this builder writes has it, so it marks entries in use.
const PRESENT: u64 = 1 << 0;
/// Bit 7 is "page size" in both formats.
const HUGE: u64 = 1 << 7;

/// The entry bits of one table format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableFormat {
    /// Bits of an entry that points at the next table.
    pub table: u64,
    /// Bits of a 2 MiB leaf (HUGE included).
    pub leaf_2m: u64,
}

/// AMD nested paging: present, writable, user (nested walks are user
/// accesses, APM 15.25.5); leaves add page size.
pub const NPT: TableFormat = TableFormat {
    table: 0x7,
    leaf_2m: 0x7 | HUGE,
};

/// Intel EPT: read, write, execute; leaves add memory type write-back (6
/// in bits 5:3, SDM 29.3.7) and page size.
pub const EPT_WRITE_BACK: TableFormat = TableFormat {
    table: 0x7,
    leaf_2m: 0x7 | (6 << 3) | HUGE,
};
const ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;
const SIZE_2M: u64 = 2 << 20;
const SIZE_1G: u64 = 1 << 30;

/// Why a mapping could not be built.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum NptError {
    OutOfMemory,
    /// Addresses or size not 2 MiB aligned.
    Misaligned,
    /// The range was already (partly) mapped differently.
    Overlap,
    /// An address beyond what the tables can map: MAXPHYADDR, or the
    /// 48 bits of a 4-level table (pass-through layout).
    OutOfRange,
    /// More separate hidden ranges than the pass-through layout holds
    /// ([`crate::passthrough::MAX_HIDDEN_RANGES`]).
    TooManyHidden,
    /// The address is hidden from the guest: it maps to the filler page
    /// and nothing else may map it (pass-through layout).
    Hidden,
    /// The address is mapped already, so its fault has another cause
    /// (pass-through layout).
    AlreadyMapped,
}

/// A 4-level second-level page table.
pub struct NestedPageTable {
    root: HostPhysAddr,
    format: TableFormat,
}

impl NestedPageTable {
    pub fn new(alloc: &mut dyn TableAllocator, format: TableFormat) -> Result<Self, NptError> {
        let root = alloc.alloc_table().ok_or(NptError::OutOfMemory)?;
        Ok(Self { root, format })
    }

    /// The root table: the VMCB's nCR3, or the address in the EPT pointer.
    pub fn root(&self) -> HostPhysAddr {
        self.root
    }

    /// Map `size` bytes at `gpa` to `hpa` read/write/execute with 2 MiB
    /// pages, and 1 GiB pages where `huge_1g` allows and the addresses and
    /// the remaining size line up; all three must be 2 MiB aligned.
    pub fn map(
        &mut self,
        alloc: &mut dyn TableAllocator,
        gpa: GuestPhysAddr,
        hpa: HostPhysAddr,
        size: u64,
        huge_1g: bool,
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
            let pdpt = next_table(alloc, self.root, index(g, 39), self.format)?;
            if huge_1g && (g | h).is_multiple_of(SIZE_1G) && size - offset >= SIZE_1G {
                // The 2 MiB leaf bits with PS at the PDPT level form a
                // 1 GiB leaf in both formats (APM 15.25, SDM 29.3.2).
                let entry = &mut alloc.table(pdpt)[index(g, 30)];
                if *entry != 0 {
                    return Err(NptError::Overlap);
                }
                *entry = (h & ADDR_MASK) | self.format.leaf_2m;
                offset += SIZE_1G;
                continue;
            }
            let pd = next_table(alloc, pdpt, index(g, 30), self.format)?;
            let entry = &mut alloc.table(pd)[index(g, 21)];
            if *entry != 0 {
                return Err(NptError::Overlap);
            }
            *entry = (h & ADDR_MASK) | self.format.leaf_2m;
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
    format: TableFormat,
) -> Result<HostPhysAddr, NptError> {
    let entry = alloc.table(table)[i];
    if entry & PRESENT != 0 {
        if entry & HUGE != 0 {
            return Err(NptError::Overlap);
        }
        return Ok(HostPhysAddr::new(entry & ADDR_MASK));
    }
    let new = alloc.alloc_table().ok_or(NptError::OutOfMemory)?;
    alloc.table(table)[i] = new.as_u64() | format.table;
    Ok(new)
}

#[cfg(test)]
pub(crate) mod tests {
    extern crate std;
    use super::*;
    use std::collections::BTreeMap;

    /// Tables kept in a map from fake physical addresses.
    pub(crate) struct Fake {
        pub(crate) tables: BTreeMap<u64, [u64; 512]>,
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

    /// An allocator that hands out at most `limit` tables.
    pub(crate) fn fake(limit: usize) -> Fake {
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
            if e & PRESENT == 0 || e & 4 == 0 {
                return None;
            }
            table = HostPhysAddr::new(e & ADDR_MASK);
        }
        let e = f.table(table)[index(gpa, 21)];
        (e & NPT.leaf_2m == NPT.leaf_2m).then(|| (e & ADDR_MASK) + (gpa & (SIZE_2M - 1)))
    }

    #[test]
    fn maps_guest_ram_at_an_offset() {
        let mut f = fake(16);
        let mut npt = NestedPageTable::new(&mut f, NPT).unwrap();
        let base = 0x4000_0000;
        npt.map(
            &mut f,
            GuestPhysAddr::new(0),
            HostPhysAddr::new(base),
            64 << 20,
            true,
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
    fn uses_1g_pages_where_aligned_and_allowed() {
        let mut f = fake(16);
        let mut npt = NestedPageTable::new(&mut f, EPT_WRITE_BACK).unwrap();
        // 1 GiB + 4 MiB at 1 GiB-aligned addresses: one 1 GiB leaf, two 2 MiB.
        let size = SIZE_1G + 2 * SIZE_2M;
        npt.map(
            &mut f,
            GuestPhysAddr::new(0),
            HostPhysAddr::new(SIZE_1G),
            size,
            true,
        )
        .unwrap();
        let root = npt.root();
        let pdpt = HostPhysAddr::new(f.table(root)[0] & ADDR_MASK);
        assert_eq!(f.table(pdpt)[0], SIZE_1G | EPT_WRITE_BACK.leaf_2m);
        let pd = HostPhysAddr::new(f.table(pdpt)[1] & ADDR_MASK);
        assert_eq!(
            f.table(pd)[1],
            (2 * SIZE_1G + SIZE_2M) | EPT_WRITE_BACK.leaf_2m
        );
        // PML4, PDPT, one PD.
        assert_eq!(f.tables.len(), 3);
        // Not allowed, or not aligned: 2 MiB pages only.
        let mut f = fake(16);
        let mut npt = NestedPageTable::new(&mut f, NPT).unwrap();
        npt.map(
            &mut f,
            GuestPhysAddr::new(0),
            HostPhysAddr::new(SIZE_2M),
            SIZE_1G,
            true,
        )
        .unwrap();
        let pdpt = HostPhysAddr::new(f.table(npt.root())[0] & ADDR_MASK);
        assert_eq!(f.table(pdpt)[0] & HUGE, 0);
        for gpa in [0, SIZE_1G - 1, 12345 << 12] {
            assert_eq!(walk(&mut f, npt.root(), gpa), Some(SIZE_2M + gpa));
        }
    }

    #[test]
    fn ept_leaves_are_write_back_rwx() {
        let mut f = fake(16);
        let mut npt = NestedPageTable::new(&mut f, EPT_WRITE_BACK).unwrap();
        npt.map(
            &mut f,
            GuestPhysAddr::new(0),
            HostPhysAddr::new(0x20_0000),
            SIZE_2M,
            true,
        )
        .unwrap();
        let root = npt.root();
        let pdpt = f.table(root)[0];
        assert_eq!(pdpt & 0xFFF, 0x7);
        let pd = f.table(HostPhysAddr::new(pdpt & ADDR_MASK))[0];
        let leaf = f.table(HostPhysAddr::new(pd & ADDR_MASK))[0];
        assert_eq!(leaf, 0x20_0000 | 0xB7);
    }

    #[test]
    fn refuses_misaligned_overlapping_and_exhaustion() {
        let mut f = fake(3);
        let mut npt = NestedPageTable::new(&mut f, NPT).unwrap();
        let g = GuestPhysAddr::new;
        let h = HostPhysAddr::new;
        assert_eq!(
            npt.map(&mut f, g(0x1000), h(0), SIZE_2M, false),
            Err(NptError::Misaligned)
        );
        assert_eq!(
            npt.map(&mut f, g(0), h(0), 0x1000, false),
            Err(NptError::Misaligned)
        );
        npt.map(&mut f, g(0), h(0), SIZE_2M, false).unwrap();
        assert_eq!(
            npt.map(&mut f, g(0), h(0), SIZE_2M, false),
            Err(NptError::Overlap)
        );
        assert_eq!(
            npt.map(&mut f, g(1 << 30), h(0), SIZE_2M, false),
            Err(NptError::OutOfMemory)
        );
    }
}
