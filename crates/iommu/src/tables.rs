//! The I/O page tables both vendors walk, built for thinvisor's one
//! policy: every device address is its own physical address on
//! [0, `top`), except the hidden ranges (thinvisor's block), which no
//! device may reach; nothing at or above `top`.
//!
//! Both formats are x86-style radix trees of 512 8-byte entries per 4 KiB
//! table, 9 address bits per level, 3 levels (39-bit addresses) or 4
//! (48-bit); they differ only in the entry bits:
//!
//! - Intel VT-d second-level tables (VT-d spec 4.1, 9.8 "Second-Level
//!   Paging Entries"): bit 0 Read, bit 1 Write, bit 7 Page Size in a
//!   level-2 (2 MiB) or level-3 (1 GiB) entry; an entry with neither R
//!   nor W is not present. Large pages only where CAP.SLLPS allows.
//! - AMD-Vi I/O page tables (AMD IOMMU spec 3.x, 2.2.3 "I/O Page
//!   Tables"): bit 0 PR, bits 11:9 Next Level (the level of the table
//!   pointed to; 0 in a leaf, which then maps the natural page size of
//!   its level: 4 KiB, 2 MiB, 1 GiB), bit 61 IR, bit 62 IW.
//!
//! Hidden pages are not present (so a device's read faults too, unlike
//! the CPU side, where thinvisor shows a zero page). On AMD-Vi the
//! not-present entry is written as Next Level 1 with PR clear: hardware
//! ignores every other bit of a not-present entry, and QEMU 7.2's model
//! records an IO_PAGE_FAULT event only for a non-zero not-present entry
//! (it silently aborts on an all-zero one), so the fault becomes visible
//! in thinvisor's log there too.
//!
//! Entries use the largest page the range allows: a 4 GiB machine with
//! thinvisor's 4 MiB block (2 MiB aligned) needs one root, four 2 MiB
//! directories and no page table.

use core::ops::Range;

use thinvisor_memory::nested::TableAllocator;
use thinvisor_memory::HostPhysAddr;

const PAGE: u64 = 4096;
const ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;

/// Which IOMMU walks the tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Intel VT-d second-level paging.
    VtdSecondLevel,
    /// AMD-Vi I/O page tables (host translation).
    AmdVi,
}

/// VT-d: Read, Write.
const VTD_RW: u64 = 0x3;
/// VT-d: Page Size.
const VTD_PS: u64 = 1 << 7;
/// AMD-Vi: Present.
const AMD_PR: u64 = 1;
/// AMD-Vi: IR | IW.
const AMD_RW: u64 = (1 << 61) | (1 << 62);
/// AMD-Vi Next Level field.
const AMD_NL_SHIFT: u32 = 9;
/// The AMD-Vi not-present marker for hidden memory (see the module
/// documentation).
pub const AMD_HIDDEN: u64 = 1 << AMD_NL_SHIFT;

impl Format {
    /// An entry of a level-`level` table pointing at a table of level
    /// `level - 1`.
    fn table(self, pa: u64, level: u8) -> u64 {
        match self {
            Self::VtdSecondLevel => pa | VTD_RW,
            Self::AmdVi => pa | AMD_PR | AMD_RW | (u64::from(level - 1) << AMD_NL_SHIFT),
        }
    }

    /// A leaf of a level-`level` table mapping `pa`.
    fn leaf(self, pa: u64, level: u8) -> u64 {
        match self {
            Self::VtdSecondLevel if level > 1 => pa | VTD_RW | VTD_PS,
            Self::VtdSecondLevel => pa | VTD_RW,
            Self::AmdVi => pa | AMD_PR | AMD_RW,
        }
    }

    /// The not-present entry for hidden memory.
    fn hidden(self) -> u64 {
        match self {
            Self::VtdSecondLevel => 0,
            Self::AmdVi => AMD_HIDDEN,
        }
    }

    fn present(self, e: u64) -> bool {
        match self {
            Self::VtdSecondLevel => e & VTD_RW != 0,
            Self::AmdVi => e & AMD_PR != 0,
        }
    }

    fn is_leaf(self, e: u64, level: u8) -> bool {
        match self {
            Self::VtdSecondLevel => level == 1 || e & VTD_PS != 0,
            Self::AmdVi => level == 1 || (e >> AMD_NL_SHIFT) & 7 == 0,
        }
    }
}

/// What to map.
#[derive(Clone, Copy, Debug)]
pub struct Identity<'a> {
    /// Map [0, `top`) (4 KiB aligned).
    pub top: u64,
    /// Ranges no device may reach (rounded out to 4 KiB pages; any order,
    /// may overlap).
    pub hidden: &'a [Range<u64>],
    /// 3 (39-bit addresses) or 4 (48-bit).
    pub levels: u8,
    /// 2 MiB leaves allowed.
    pub huge_2m: bool,
    /// 1 GiB leaves allowed.
    pub huge_1g: bool,
}

/// Why the tables could not be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableError {
    /// `levels` is not 3 or 4, or `top` is not 4 KiB aligned or beyond
    /// what the levels address.
    BadLayout,
    OutOfMemory,
}

/// The built tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Built {
    /// The top-level table.
    pub root: HostPhysAddr,
    /// Tables allocated.
    pub tables: usize,
}

/// Builds the identity tables for `layout` in `format`.
pub fn build(
    alloc: &mut dyn TableAllocator,
    format: Format,
    layout: &Identity<'_>,
) -> Result<Built, TableError> {
    if !(3..=4).contains(&layout.levels)
        || !layout.top.is_multiple_of(PAGE)
        || layout.top > span(layout.levels)
    {
        return Err(TableError::BadLayout);
    }
    let mut b = Builder {
        alloc,
        format,
        layout,
        tables: 0,
    };
    let root = b.table(0, layout.levels)?;
    Ok(Built {
        root: HostPhysAddr::new(root),
        tables: b.tables,
    })
}

/// Bytes one level-`level` table spans.
fn span(level: u8) -> u64 {
    PAGE << (9 * u32::from(level))
}

/// How much of [start, end) the hidden ranges cover.
#[derive(PartialEq, Eq)]
enum Cover {
    None,
    Part,
    All,
}

struct Builder<'a, 'b> {
    alloc: &'a mut dyn TableAllocator,
    format: Format,
    layout: &'a Identity<'b>,
    tables: usize,
}

impl Builder<'_, '_> {
    fn cover(&self, start: u64, end: u64) -> Cover {
        let mut any = false;
        for h in self.layout.hidden {
            let hs = h.start & !(PAGE - 1);
            let he = h.end.saturating_add(PAGE - 1) & !(PAGE - 1);
            if hs < end && start < he {
                any = true;
                if hs <= start && he >= end {
                    return Cover::All;
                }
            }
        }
        // Only a single covering range proves All; anything else splits
        // down to 4 KiB pages, where one range always covers a page.
        if any {
            Cover::Part
        } else {
            Cover::None
        }
    }

    /// A new table of level `level` for [base, base + span(level)).
    fn table(&mut self, base: u64, level: u8) -> Result<u64, TableError> {
        let pa = self
            .alloc
            .alloc_table()
            .ok_or(TableError::OutOfMemory)?
            .as_u64();
        self.tables += 1;
        let size = span(level - 1);
        for i in 0..512u64 {
            let start = base + i * size;
            if start >= self.layout.top {
                break;
            }
            let end = start + size;
            let entry = match self.cover(start, end) {
                Cover::All => self.format.hidden(),
                cover => {
                    let huge = match level {
                        1 => true,
                        2 => self.layout.huge_2m,
                        3 => self.layout.huge_1g,
                        _ => false,
                    };
                    if cover == Cover::None && huge && end <= self.layout.top {
                        self.format.leaf(start, level)
                    } else if level == 1 {
                        // A 4 KiB page is either hidden (All) or not.
                        self.format.leaf(start, 1)
                    } else {
                        let t = self.table(start, level - 1)?;
                        self.format.table(t, level)
                    }
                }
            };
            self.alloc.table(HostPhysAddr::new(pa))[i as usize] = entry;
        }
        Ok(pa)
    }
}

/// Walks the tables like the IOMMU does: the physical address `addr`
/// reaches, or None when it faults. For tests and diagnostics.
pub fn translate(
    alloc: &mut dyn TableAllocator,
    format: Format,
    root: HostPhysAddr,
    levels: u8,
    addr: u64,
) -> Option<u64> {
    if addr >= span(levels) {
        return None;
    }
    let mut table = root.as_u64();
    let mut level = levels;
    loop {
        let index = ((addr >> (12 + 9 * (u32::from(level) - 1))) & 0x1FF) as usize;
        let e = alloc.table(HostPhysAddr::new(table))[index];
        if !format.present(e) {
            return None;
        }
        if format.is_leaf(e, level) {
            let size = span(level - 1);
            return Some((e & ADDR_MASK & !(size - 1)) | (addr & (size - 1)));
        }
        table = e & ADDR_MASK;
        level -= 1;
        if level == 0 {
            return None;
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    /// Tables in a Vec, at fake addresses 4096 * (1 + index).
    pub struct Tables(pub Vec<[u64; 512]>);

    impl TableAllocator for Tables {
        fn alloc_table(&mut self) -> Option<HostPhysAddr> {
            if self.0.len() >= 4096 {
                return None;
            }
            self.0.push([0; 512]);
            Some(HostPhysAddr::new(self.0.len() as u64 * 4096))
        }
        fn table(&mut self, pa: HostPhysAddr) -> &mut [u64; 512] {
            &mut self.0[(pa.as_u64() / 4096 - 1) as usize]
        }
    }

    const BLOCK: Range<u64> = 0x1FA0_0000..0x1FE0_0000;

    #[test]
    fn four_gib_with_a_block() {
        for format in [Format::VtdSecondLevel, Format::AmdVi] {
            let mut t = Tables(Vec::new());
            #[allow(clippy::single_range_in_vec_init)] // one hidden range, as a slice
            let hidden = [BLOCK];
            let layout = Identity {
                top: 4 << 30,
                hidden: &hidden,
                levels: 3,
                huge_2m: true,
                huge_1g: true,
            };
            let b = build(&mut t, format, &layout).unwrap();
            // The root and the first GiB's directory.
            assert_eq!(b.tables, 2);
            let tr = |t: &mut Tables, a| translate(t, format, b.root, 3, a);
            assert_eq!(tr(&mut t, 0x1234), Some(0x1234));
            assert_eq!(tr(&mut t, BLOCK.start - 1), Some(BLOCK.start - 1));
            assert_eq!(tr(&mut t, BLOCK.start), None);
            assert_eq!(tr(&mut t, BLOCK.end - 8), None);
            assert_eq!(tr(&mut t, BLOCK.end), Some(BLOCK.end));
            assert_eq!(tr(&mut t, (4 << 30) - 1), Some((4 << 30) - 1));
            assert_eq!(tr(&mut t, 4 << 30), None);
        }
    }

    #[test]
    fn entry_bits() {
        let mut t = Tables(Vec::new());
        #[allow(clippy::single_range_in_vec_init)] // one hidden range, as a slice
        let hidden = [0x20_1000..0x20_2000];
        let layout = Identity {
            top: 1 << 30,
            hidden: &hidden,
            levels: 4,
            huge_2m: true,
            huge_1g: false,
        };
        let b = build(&mut t, Format::AmdVi, &layout).unwrap();
        // PML4 -> PDPT -> PD -> PT.
        assert_eq!(b.tables, 4);
        let pml4 = t.table(b.root)[0];
        assert_eq!(pml4 & 0xE01, 1 | 3 << 9);
        assert_eq!(pml4 >> 61, 3);
        let pd = t.0[2];
        assert_eq!(pd[0], AMD_PR | AMD_RW); // 2 MiB leaf at 0, NL 0
        assert_eq!(pd[1] & 0xE01, 1 | 1 << 9); // page table
        let pt = t.0[3];
        assert_eq!(pt[1], AMD_HIDDEN);
        assert_eq!(pt[2], 0x20_2000 | AMD_PR | AMD_RW);

        let mut t = Tables(Vec::new());
        let b = build(&mut t, Format::VtdSecondLevel, &layout).unwrap();
        assert_eq!(t.table(b.root)[0] & 0xFFF, 3);
        assert_eq!(t.0[2][0], 0x83);
        assert_eq!(t.0[3][1], 0);
        assert_eq!(t.0[3][2], 0x20_2003);
    }

    #[test]
    fn refuses_bad_layouts() {
        let mut t = Tables(Vec::new());
        for (top, levels) in [(0x1001, 3), (1 << 40, 3), (0, 5), (0, 2)] {
            let layout = Identity {
                top,
                hidden: &[],
                levels,
                huge_2m: true,
                huge_1g: true,
            };
            assert_eq!(
                build(&mut t, Format::AmdVi, &layout),
                Err(TableError::BadLayout)
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn identity_except_hidden(
            ranges in proptest::collection::vec((0u64..(1 << 31), 1u64..(1 << 24)), 0..4),
            probes in proptest::collection::vec(0u64..(1 << 32), 1..64),
            top_pages in 1u64..(1 << 19),
            levels in 3u8..=4,
            huge_2m: bool,
            huge_1g: bool,
            amd: bool,
        ) {
            let hidden: Vec<Range<u64>> = ranges.iter().map(|&(s, l)| s..s + l).collect();
            let top = top_pages * 4096;
            let format = if amd { Format::AmdVi } else { Format::VtdSecondLevel };
            let mut t = Tables(Vec::new());
            let layout = Identity { top, hidden: &hidden, levels, huge_2m, huge_1g };
            let b = build(&mut t, format, &layout).unwrap();
            for a in probes {
                let page = a & !0xFFF;
                let hid = hidden.iter().any(|h| page < h.end && h.start < page + 4096);
                let want = (a < top && !hid).then_some(a);
                proptest::prop_assert_eq!(translate(&mut t, format, b.root, levels, a), want, "{:#x}", a);
            }
        }
    }
}
