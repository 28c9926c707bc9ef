//! Second-level tables for the pass-through layout: guest-physical ==
//! host-physical everywhere the guest may look, except thinvisor's own
//! memory, which the guest sees as a read-only filler page.
//!
//! Why: a pass-through guest owns the machine (its firmware areas, PCI
//! holes, the LAPIC at 0xFEE00000, the IOAPIC and HPET, 64-bit BARs above
//! RAM), so the tables are one identity map of [0, top) built with the
//! largest pages each piece allows. Only two things force smaller pages:
//!
//! - hidden ranges (thinvisor's memory, 4 KiB granular). Each hidden
//!   4 KiB page maps read-only to one filler page (a zero page thinvisor
//!   provides): reads see zeros, writes fault and the hypervisor drops
//!   them. Present-but-read-only rather than not-present so that a
//!   guest that scans memory never stops on a read;
//! - under EPT, a memory-type change inside a larger page: the EPT leaf
//!   carries the memory type the MTRRs would have given (SDM vol. 3C,
//!   29.3.7), because the processor ignores the MTRRs for guest accesses
//!   under EPT. "Ignore PAT" (bit 6) stays 0 so the guest's PAT still
//!   combines with it (29.3.7.2).
//!
//! Under AMD nested paging every leaf is write-back with PAT/PCD/PWT = 0,
//! which leaves the memory type to the guest's PAT and the real MTRRs,
//! which the guest programs natively (AMD APM vol. 2, 15.25.8): no MTRR
//! input is needed, and types never split a page.
//!
//! Pages wholly hidden share tables: every fully hidden 2 MiB region
//! points at one page table of 512 filler leaves, every fully hidden
//! 1 GiB region at one page directory pointing at that page table. So
//! the cost of hiding memory is a page table at each ragged edge, and a
//! 4 GiB machine with one hidden 8 MiB block needs six tables with 1 GiB
//! pages under NPT, eight under EPT with SeaBIOS' MTRRs (the first MiB's
//! fixed ranges cost a page directory and a page table). The tables never change afterwards except through
//! [`PassThroughTables::map_fault`], which only fills empty entries.
//!
//! Everything above `top` is left unmapped at build time; the first
//! access there is a nested page fault, and `map_fault` maps the aligned
//! 1 GiB or 2 MiB region around it (4 KiB next to hidden memory), which
//! is how 64-bit BARs the guest programs become reachable.
//!
//! # Example
//!
//! ```
//! use thinvisor_memory::mtrr::{MtrrMsrs, Mtrrs};
//! use thinvisor_memory::nested::{NptError, TableAllocator};
//! use thinvisor_memory::passthrough::{Format, Layout, PassThroughTables};
//! use thinvisor_memory::{GuestPhysAddr, HostPhysAddr};
//! # struct Tables(Vec<[u64; 512]>);
//! # impl TableAllocator for Tables {
//! #     fn alloc_table(&mut self) -> Option<HostPhysAddr> {
//! #         self.0.push([0; 512]);
//! #         Some(HostPhysAddr::new(self.0.len() as u64 * 4096))
//! #     }
//! #     fn table(&mut self, pa: HostPhysAddr) -> &mut [u64; 512] {
//! #         &mut self.0[(pa.as_u64() / 4096 - 1) as usize]
//! #     }
//! # }
//! # let mut tables = Tables(Vec::new());
//! # let rdmsr = |msr: u32| match msr {
//! #     0xFE => 0x508, 0x2FF => 0xC06, 0x250 | 0x258 | 0x268..=0x26F => 0x0606_0606_0606_0606,
//! #     0x200 => 0xC000_0000, 0x201 => 0xFF_C000_0800, _ => 0,
//! # };
//! // thinvisor's memory (image, heap, its own tables), from the allocator.
//! let own = [0x0700_0000..0x0780_0000];
//! let layout = Layout {
//!     top: 4 << 30, // max(end of the memory map, 4 GiB)
//!     hidden: &own,
//!     filler: HostPhysAddr::new(0x0700_0000), // a zeroed page of its own
//!     huge_1g: true,
//!     max_phys_addr: 40,
//! };
//! // AMD: nCR3 = npt.root().
//! let npt = PassThroughTables::build(&mut tables, Format::Npt, &layout)?;
//! // Intel: the MTRRs as the firmware left them (`rdmsr` wraps the
//! // instruction), then EPTP = ept.root() | WB | 4-level.
//! let mtrrs = Mtrrs::new(&MtrrMsrs::read(rdmsr, 40));
//! let mut ept = PassThroughTables::build(&mut tables, Format::Ept(&mtrrs), &layout)?;
//! let reserved = (npt.tables() + ept.tables()) * 4096; // for the boot log
//! # assert_eq!((npt.tables(), ept.tables(), reserved), (4, 5, 9 * 4096));
//! // A nested page fault at a 64-bit BAR the guest programmed: map, resume.
//! let bar = GuestPhysAddr::new(0x80_0000_0000);
//! assert_eq!(ept.map_fault(&mut tables, bar), Ok(0x80_0000_0000..0x80_4000_0000));
//! // A write to thinvisor's memory: drop it.
//! let own_page = GuestPhysAddr::new(0x0700_1000);
//! assert!(ept.is_hidden(own_page));
//! assert_eq!(ept.map_fault(&mut tables, own_page), Err(NptError::Hidden));
//! # Ok::<(), NptError>(())
//! ```

use core::ops::Range;

use crate::mtrr::{MemoryType, Mtrrs};
use crate::nested::{NptError, TableAllocator};
use crate::{GuestPhysAddr, HostPhysAddr};

/// How many separate hidden ranges (after merging overlapping and
/// adjacent ones) the layout holds.
pub const MAX_HIDDEN_RANGES: usize = 32;

/// NPT present / EPT read.
const PRESENT: u64 = 1 << 0;
/// NPT writable / EPT write.
const WRITE: u64 = 1 << 1;
/// NPT user (nested walks are user accesses, APM 15.25.5) / EPT execute.
const USER_OR_EXECUTE: u64 = 1 << 2;
/// Page size, in PDPT and PD entries of both formats.
const HUGE: u64 = 1 << 7;
/// A pointer to the next table: NPT P|W|U, EPT R|W|X.
const TABLE: u64 = PRESENT | WRITE | USER_OR_EXECUTE;
/// EPT memory type, bits 5:3.
const EPT_TYPE_SHIFT: u32 = 3;
const ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;
const PAGE: u64 = 4096;
/// Four levels map 48 bits of guest-physical address.
const MAX_WIDTH: u8 = 48;

/// Which processor walks the tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format<'a> {
    /// AMD nested paging: leaves write-back with PAT/PCD/PWT = 0, so the
    /// guest's PAT and the real MTRRs decide the memory type (APM vol. 2,
    /// 15.25.8); no MTRR input.
    Npt,
    /// Intel EPT: each leaf carries the type the MTRRs (read at boot,
    /// before the guest ran) give its whole range.
    Ept(&'a Mtrrs),
}

/// What to map.
#[derive(Clone, Copy, Debug)]
pub struct Layout<'a> {
    /// Identity-map [0, `top`) now (4 KiB aligned): typically the end of
    /// the highest memory-map entry or 4 GiB, whichever is higher, so
    /// RAM, firmware, the PCI hole and the local/IO APICs are all in.
    /// Without 1 GiB pages every GiB below `top` costs a page directory,
    /// so `top` should not be much higher than that: what lies above is
    /// mapped on demand.
    pub top: u64,
    /// thinvisor's memory. Rounded out to 4 KiB pages; may overlap, touch,
    /// lie in any order, and lie above `top` (they are hidden wherever
    /// they are).
    pub hidden: &'a [Range<u64>],
    /// The page hidden pages show, read-only: 4 KiB aligned, zeroed, and
    /// normally itself inside a hidden range.
    pub filler: HostPhysAddr,
    /// 1 GiB leaves allowed (NPT: CPUID 0x8000_0001 EDX bit 26; EPT:
    /// IA32_VMX_EPT_VPID_CAP bit 17).
    pub huge_1g: bool,
    /// MAXPHYADDR: nothing at or above 2^min(this, 48) is mapped, as such
    /// an address in a leaf would be a reserved-bit fault or an EPT
    /// misconfiguration.
    pub max_phys_addr: u8,
}

/// The pass-through tables: their root, what is hidden, and how to grow
/// them on a fault.
#[derive(Debug)]
pub struct PassThroughTables {
    root: HostPhysAddr,
    /// `Some` for EPT.
    types: Option<Mtrrs>,
    /// Sorted, merged, 4 KiB aligned, non-empty [start, end) pairs.
    hidden: [(u64, u64); MAX_HIDDEN_RANGES],
    hidden_len: usize,
    filler: u64,
    top: u64,
    /// 2^min(MAXPHYADDR, 48).
    limit: u64,
    huge_1g: bool,
    /// Tables allocated so far, shared ones once.
    tables: usize,
    /// Shared tables of hidden memory, 0 until first needed: [0] a page
    /// table of 512 filler leaves, [1] a page directory of 512 pointers
    /// to [0], [2] a PDPT of 512 pointers to [1].
    filler_tables: [u64; 3],
}

/// How much of a region is hidden.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Hidden {
    None,
    Part,
    All,
}

impl PassThroughTables {
    /// Builds the tables for `layout`.
    ///
    /// Errors: `Misaligned` when `top` or the filler page is not 4 KiB
    /// aligned; `OutOfRange` when `top`, the filler or a hidden range
    /// reaches past 2^min(MAXPHYADDR, 48); `TooManyHidden`; `OutOfMemory`
    /// (the tables allocated so far are not given back: the hypervisor
    /// stops booting anyway).
    pub fn build(
        alloc: &mut dyn TableAllocator,
        format: Format<'_>,
        layout: &Layout<'_>,
    ) -> Result<Self, NptError> {
        let limit = 1u64 << layout.max_phys_addr.clamp(12, MAX_WIDTH);
        let filler = layout.filler.as_u64();
        if !layout.top.is_multiple_of(PAGE) || !filler.is_multiple_of(PAGE) {
            return Err(NptError::Misaligned);
        }
        if layout.top > limit || filler >= limit {
            return Err(NptError::OutOfRange);
        }
        let (hidden, hidden_len) = normalize(layout.hidden, limit)?;
        let mut t = Self {
            root: HostPhysAddr::new(0),
            types: match format {
                Format::Npt => None,
                Format::Ept(m) => Some(*m),
            },
            hidden,
            hidden_len,
            filler,
            top: layout.top,
            limit,
            huge_1g: layout.huge_1g,
            tables: 0,
            filler_tables: [0; 3],
        };
        let root = t.alloc(alloc)?;
        t.root = HostPhysAddr::new(root);
        t.fill(alloc, root, 3, 0)?;
        Ok(t)
    }

    /// The root table: the VMCB's nCR3, or the address in the EPT pointer.
    pub fn root(&self) -> HostPhysAddr {
        self.root
    }

    /// How many 4 KiB tables these tables use (so far: faults add some).
    pub fn tables(&self) -> usize {
        self.tables
    }

    /// The end of the range mapped at build time.
    pub fn top(&self) -> u64 {
        self.top
    }

    /// The hidden ranges as the tables see them: sorted, merged, rounded
    /// out to 4 KiB.
    pub fn hidden_ranges(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        self.hidden[..self.hidden_len].iter().map(|&(s, e)| s..e)
    }

    /// Whether `gpa` is thinvisor's: it reads as the filler page and a
    /// write to it faults (and is to be dropped).
    pub fn is_hidden(&self, gpa: GuestPhysAddr) -> bool {
        let g = gpa.as_u64();
        self.first_ending_after(g).is_some_and(|(s, _)| s <= g)
    }

    /// Maps the region around `gpa` after a nested page fault there: the
    /// aligned 1 GiB region (when allowed), else the aligned 2 MiB region,
    /// else the 4 KiB page, the first that is unmapped, holds no hidden
    /// page and (EPT) has one memory type. Returns the region now mapped.
    ///
    /// Hidden pages are mapped (to the filler) from the start, so an
    /// empty entry never covers one; the check here is a second guard.
    ///
    /// Cheap (one walk, at most three new tables) and only ever fills
    /// empty entries, so no TLB flush is needed: processors do not cache
    /// not-present translations, and an EPT violation invalidates what
    /// could translate the faulting address (SDM vol. 3C, 29.4.3.1). Not
    /// for concurrent use by several vCPUs.
    ///
    /// Errors: `Hidden` (a write to thinvisor's memory: drop it);
    /// `AlreadyMapped` (the fault has another cause); `OutOfRange` (at or
    /// above 2^MAXPHYADDR); `OutOfMemory`.
    pub fn map_fault(
        &mut self,
        alloc: &mut dyn TableAllocator,
        gpa: GuestPhysAddr,
    ) -> Result<Range<u64>, NptError> {
        let g = gpa.as_u64();
        if g >= self.limit {
            return Err(NptError::OutOfRange);
        }
        if self.is_hidden(gpa) {
            return Err(NptError::Hidden);
        }
        let mut table = self.root.as_u64();
        for level in (0..4).rev() {
            let size = entry_size(level);
            let a = g & !(size - 1);
            let b = a + size;
            let i = index(g, level);
            let entry = alloc.table(HostPhysAddr::new(table))[i];
            if entry & PRESENT != 0 {
                if level == 0 || entry & HUGE != 0 {
                    return Err(NptError::AlreadyMapped);
                }
                table = entry & ADDR_MASK;
                continue;
            }
            let leaf = if b <= self.limit && self.hidden_in(a, b) == Hidden::None {
                self.identity_leaf(level, a, b)
            } else {
                None
            };
            if let Some(leaf) = leaf {
                alloc.table(HostPhysAddr::new(table))[i] = leaf;
                return Ok(a..b);
            }
            if level == 0 {
                // A 4 KiB page that is neither hidden nor beyond the limit
                // always has a leaf; this is unreachable.
                return Err(NptError::OutOfRange);
            }
            let next = self.alloc(alloc)?;
            alloc.table(HostPhysAddr::new(table))[i] = next | TABLE;
            table = next;
        }
        Err(NptError::AlreadyMapped)
    }

    /// Makes the 4 KiB page at `gpa` read-only (identity still), splitting
    /// the large page that maps it: writes to it then exit, reads do not.
    /// For device pages whose writes the hypervisor must see (the local
    /// APIC's interrupt command register). The caller flushes the guest's
    /// TLB if the guest ran already.
    ///
    /// Errors: `Hidden` (already read-only, as filler), `OutOfRange` (not
    /// mapped), `OutOfMemory`.
    pub fn write_protect(
        &mut self,
        alloc: &mut dyn TableAllocator,
        gpa: GuestPhysAddr,
    ) -> Result<(), NptError> {
        let (table, i) = self.leaf_entry(alloc, gpa, true)?;
        alloc.table(HostPhysAddr::new(table))[i] &= !WRITE;
        Ok(())
    }

    /// Gives a page [`write_protect`](Self::write_protect)ed back its write
    /// permission (it stays a 4 KiB page). The caller flushes the guests'
    /// TLBs: they may hold the read-only translation.
    pub fn write_unprotect(
        &mut self,
        alloc: &mut dyn TableAllocator,
        gpa: GuestPhysAddr,
    ) -> Result<(), NptError> {
        let (table, i) = self.leaf_entry(alloc, gpa, false)?;
        alloc.table(HostPhysAddr::new(table))[i] |= WRITE;
        Ok(())
    }

    /// The table and index of the leaf entry that maps `gpa`, splitting
    /// large leaves down to a 4 KiB one when `split` (same bits, so every
    /// translation stays as it was).
    fn leaf_entry(
        &mut self,
        alloc: &mut dyn TableAllocator,
        gpa: GuestPhysAddr,
        split: bool,
    ) -> Result<(u64, usize), NptError> {
        let g = gpa.as_u64();
        if self.is_hidden(gpa) {
            return Err(NptError::Hidden);
        }
        let mut table = self.root.as_u64();
        for level in (0..4).rev() {
            let i = index(g, level);
            let entry = alloc.table(HostPhysAddr::new(table))[i];
            if entry & PRESENT == 0 {
                return Err(NptError::OutOfRange);
            }
            if level == 0 || (entry & HUGE != 0 && !split) {
                return Ok((table, i));
            }
            if entry & HUGE == 0 {
                table = entry & ADDR_MASK;
                continue;
            }
            table = self.split(alloc, table, i, level)?;
        }
        Err(NptError::OutOfRange)
    }

    /// Splits the large leaf at `table[i]` (at `level`, 1 or 2) into a new
    /// table of 512 leaves of the next size with the same bits, so every
    /// translation stays as it was; returns the new table. A 4 KiB leaf
    /// has no page-size bit (bit 7 is PAT there, and a large leaf's PAT
    /// bit 12 is part of the address field in a 4 KiB one: this builder
    /// never sets either).
    fn split(
        &mut self,
        alloc: &mut dyn TableAllocator,
        table: u64,
        i: usize,
        level: u32,
    ) -> Result<u64, NptError> {
        let entry = alloc.table(HostPhysAddr::new(table))[i];
        let next = self.alloc(alloc)?;
        let child = entry_size(level - 1);
        let base = entry & ADDR_MASK & !(entry_size(level) - 1);
        let flags = entry & !ADDR_MASK & if level == 1 { !HUGE } else { u64::MAX };
        for (j, e) in alloc.table(HostPhysAddr::new(next)).iter_mut().enumerate() {
            *e = (base + j as u64 * child) | flags;
        }
        alloc.table(HostPhysAddr::new(table))[i] = next | TABLE;
        Ok(next)
    }

    /// Makes `range` (4 KiB aligned) read-only to the guest with the
    /// fewest changes: an entry wholly inside it, leaf or pointer, loses
    /// its write permission (both formats AND the permissions of every
    /// level of the walk: AMD APM vol. 2, 15.25.5; Intel SDM vol. 3C,
    /// 29.3.2), a large leaf partly inside is split. A 256 MiB ECAM window
    /// on 2 MiB boundaries costs at most one table per ragged edge. Not
    /// for ranges that overlap hidden memory (its tables are shared).
    /// The caller flushes the guests' TLBs if they already run.
    pub fn write_protect_range(
        &mut self,
        alloc: &mut dyn TableAllocator,
        range: Range<u64>,
    ) -> Result<(), NptError> {
        if !range.start.is_multiple_of(PAGE) || !range.end.is_multiple_of(PAGE) {
            return Err(NptError::Misaligned);
        }
        if self
            .hidden_ranges()
            .any(|h| h.start < range.end && range.start < h.end)
        {
            return Err(NptError::Hidden);
        }
        let root = self.root.as_u64();
        self.protect_in(alloc, root, 3, 0, &range)
    }

    fn protect_in(
        &mut self,
        alloc: &mut dyn TableAllocator,
        table: u64,
        level: u32,
        base: u64,
        range: &Range<u64>,
    ) -> Result<(), NptError> {
        let size = entry_size(level);
        for i in 0..512usize {
            let a = base + i as u64 * size;
            let b = a + size;
            if b <= range.start || a >= range.end {
                continue;
            }
            let entry = alloc.table(HostPhysAddr::new(table))[i];
            if entry & PRESENT == 0 {
                continue;
            }
            if range.start <= a && b <= range.end {
                alloc.table(HostPhysAddr::new(table))[i] = entry & !WRITE;
                continue;
            }
            // Partly inside: never a 4 KiB leaf (the range is aligned).
            let Some(below) = level.checked_sub(1) else {
                continue;
            };
            let next = if entry & HUGE != 0 {
                self.split(alloc, table, i, level)?
            } else {
                entry & ADDR_MASK
            };
            self.protect_in(alloc, next, below, a, range)?;
        }
        Ok(())
    }

    /// A zeroed table, counted.
    fn alloc(&mut self, alloc: &mut dyn TableAllocator) -> Result<u64, NptError> {
        let t = alloc.alloc_table().ok_or(NptError::OutOfMemory)?;
        self.tables += 1;
        Ok(t.as_u64())
    }

    /// Fills `table`, at `level` (3 PML4 .. 0 page table), which maps
    /// from `base`.
    fn fill(
        &mut self,
        alloc: &mut dyn TableAllocator,
        table: u64,
        level: u32,
        base: u64,
    ) -> Result<(), NptError> {
        let size = entry_size(level);
        for i in 0..512u64 {
            let a = base + i * size;
            if a >= self.limit {
                break;
            }
            let b = a + size;
            let entry = match self.hidden_in(a, b) {
                Hidden::All => self.hidden_entry(alloc, level)?,
                Hidden::None if a >= self.top => continue,
                Hidden::None if b <= self.top => match self.identity_leaf(level, a, b) {
                    Some(leaf) => leaf,
                    None => self.child(alloc, level, a)?,
                },
                _ => self.child(alloc, level, a)?,
            };
            alloc.table(HostPhysAddr::new(table))[i as usize] = entry;
        }
        Ok(())
    }

    /// A new table below `level` for the region at `a`, filled; the entry
    /// pointing at it.
    fn child(
        &mut self,
        alloc: &mut dyn TableAllocator,
        level: u32,
        a: u64,
    ) -> Result<u64, NptError> {
        // A 4 KiB page is wholly hidden or not at all, and wholly below
        // `top` or not at all (both are 4 KiB granular): never split.
        let Some(below) = level.checked_sub(1) else {
            return Err(NptError::Misaligned);
        };
        let t = self.alloc(alloc)?;
        self.fill(alloc, t, below, a)?;
        Ok(t | TABLE)
    }

    /// The entry for a wholly hidden region at `level`: the filler leaf,
    /// or a pointer to the shared table of hidden memory below.
    fn hidden_entry(
        &mut self,
        alloc: &mut dyn TableAllocator,
        level: u32,
    ) -> Result<u64, NptError> {
        let Some(below) = level.checked_sub(1) else {
            return Ok(self.filler_leaf());
        };
        let slot = below as usize;
        if let Some(&t) = self.filler_tables.get(slot).filter(|&&t| t != 0) {
            return Ok(t | TABLE);
        }
        let entry = self.hidden_entry(alloc, below)?;
        let t = self.alloc(alloc)?;
        alloc.table(HostPhysAddr::new(t)).fill(entry);
        if let Some(s) = self.filler_tables.get_mut(slot) {
            *s = t;
        }
        Ok(t | TABLE)
    }

    /// A read-only leaf to the filler page: NPT present+user, EPT
    /// read+execute write-back.
    fn filler_leaf(&self) -> u64 {
        let ty = match self.types {
            Some(_) => MemoryType::WriteBack.bits() << EPT_TYPE_SHIFT,
            None => 0,
        };
        self.filler | PRESENT | USER_OR_EXECUTE | ty
    }

    /// An identity leaf for [a, b) at `level`, when the level allows
    /// leaves and (EPT) the range has one memory type.
    fn identity_leaf(&self, level: u32, a: u64, b: u64) -> Option<u64> {
        let huge = match level {
            0 => 0,
            1 => HUGE,
            2 if self.huge_1g => HUGE,
            _ => return None,
        };
        let ty = match &self.types {
            None => 0,
            Some(m) => m.uniform_type(a, b)?.bits() << EPT_TYPE_SHIFT,
        };
        Some(a | TABLE | huge | ty)
    }

    /// The first hidden range that ends after `a`.
    fn first_ending_after(&self, a: u64) -> Option<(u64, u64)> {
        let h = &self.hidden[..self.hidden_len];
        h.get(h.partition_point(|&(_, end)| end <= a)).copied()
    }

    /// How much of [a, b) is hidden (ranges are merged, so all of it
    /// means inside one range).
    fn hidden_in(&self, a: u64, b: u64) -> Hidden {
        match self.first_ending_after(a) {
            Some((s, e)) if s < b => {
                if s <= a && e >= b {
                    Hidden::All
                } else {
                    Hidden::Part
                }
            }
            _ => Hidden::None,
        }
    }
}

/// Bytes one entry maps at `level` (0: 4 KiB .. 3: 512 GiB).
fn entry_size(level: u32) -> u64 {
    1 << (12 + 9 * level)
}

fn index(address: u64, level: u32) -> usize {
    ((address >> (12 + 9 * level)) & 0x1FF) as usize
}

/// Merged hidden ranges and how many of them are in use.
type HiddenList = ([(u64, u64); MAX_HIDDEN_RANGES], usize);

/// The hidden ranges rounded out to 4 KiB, sorted and merged; empty ones
/// dropped. The input is borrowed and there is no heap, so this picks the
/// ranges in order of start (a selection sort: there are a few).
fn normalize(input: &[Range<u64>], limit: u64) -> Result<HiddenList, NptError> {
    let mut out = [(0, 0); MAX_HIDDEN_RANGES];
    let mut len: usize = 0;
    let mut last: Option<(u64, usize)> = None;
    loop {
        let mut next: Option<(u64, usize)> = None;
        for (i, r) in input.iter().enumerate() {
            let key = (r.start, i);
            if r.start >= r.end || last.is_some_and(|l| key <= l) {
                continue;
            }
            if next.is_none_or(|n| key < n) {
                next = Some(key);
            }
        }
        let Some((_, i)) = next else {
            break;
        };
        last = next;
        let Some(r) = input.get(i) else {
            break;
        };
        let start = r.start & !(PAGE - 1);
        let end = r.end.checked_add(PAGE - 1).ok_or(NptError::OutOfRange)? & !(PAGE - 1);
        if end > limit {
            return Err(NptError::OutOfRange);
        }
        match len.checked_sub(1).and_then(|l| out.get_mut(l)) {
            Some(prev) if start <= prev.1 => prev.1 = prev.1.max(end),
            _ => {
                *out.get_mut(len).ok_or(NptError::TooManyHidden)? = (start, end);
                len += 1;
            }
        }
    }
    Ok((out, len))
}

#[cfg(test)]
mod tests;
