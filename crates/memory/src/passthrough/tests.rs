//! Tests: the tables are walked as the processor walks them (1 GiB,
//! 2 MiB and 4 KiB leaves, permissions ANDed down the walk) and checked
//! against a plain model of the layout.

// Layouts with one hidden range are arrays of one range on purpose.
#![allow(clippy::single_range_in_vec_init)]

extern crate std;

use super::*;
use crate::mtrr::{MtrrMsrs, VariableMtrr, MAX_VARIABLE_MTRRS};
use crate::nested::tests::{fake, Fake};
use proptest::prelude::*;
use std::vec::Vec;
use MemoryType::*;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const RWX: u64 = 0b111;
/// Read-only: NPT present+user, EPT read+execute.
const RO: u64 = 0b101;

/// One leaf reached by a walk.
#[derive(Clone, Copy, Debug)]
struct Leaf {
    /// First guest-physical address it maps.
    gpa: u64,
    size: u64,
    entry: u64,
    /// Bits 2:0 ANDed over every level: the effective permissions.
    perms: u64,
}

impl Leaf {
    fn hpa(&self, gpa: u64) -> u64 {
        (self.entry & ADDR_MASK & !(self.size - 1)) + (gpa & (self.size - 1))
    }

    /// The EPT memory type (bits 5:3).
    fn ept_type(&self) -> Option<MemoryType> {
        MemoryType::from_bits((self.entry >> 3) & 7)
    }
}

/// Checks one entry's reserved and format bits, as the processor would
/// before using it.
fn check_entry(e: u64, level: u32, leaf: bool, ept: bool) {
    assert_eq!(e >> 52, 0, "{e:#x}: bits 63:52");
    if !leaf {
        // Non-leaf: NPT PWT/PCD clear; EPT bits 7:3 reserved.
        assert_eq!(e & 0xF8, 0, "{e:#x}: table entry bits 7:3");
        return;
    }
    assert!(level < 3, "leaf in the PML4");
    if level > 0 {
        // Large leaves: the address is aligned; NPT bit 12 (PAT) clear.
        let size = entry_size(level);
        assert_eq!(e & ADDR_MASK & (size - 1), 0, "{e:#x}: large leaf address");
    }
    if ept {
        assert!(
            MemoryType::from_bits((e >> 3) & 7).is_some(),
            "{e:#x}: type"
        );
        assert_eq!(e & (1 << 6), 0, "{e:#x}: ignore PAT");
        // Write without read is a misconfiguration.
        assert!(e & 1 != 0 || e & 2 == 0);
    } else {
        assert_eq!(e & 0x18, 0, "{e:#x}: PWT/PCD");
        if level == 0 {
            assert_eq!(e & HUGE, 0, "{e:#x}: PAT in a 4 KiB leaf");
        }
    }
}

/// Walks like the processor: PML4, PDPT (1 GiB leaf when PS), PD
/// (2 MiB leaf when PS), PT.
fn walk(f: &mut Fake, root: HostPhysAddr, gpa: u64, ept: bool) -> Option<Leaf> {
    let mut table = root.as_u64();
    let mut perms = RWX;
    for level in (0..4).rev() {
        let e = f.table(HostPhysAddr::new(table))[index(gpa, level)];
        if e & PRESENT == 0 {
            return None;
        }
        perms &= e & RWX;
        let leaf = level == 0 || (level < 3 && e & HUGE != 0);
        check_entry(e, level, leaf, ept);
        if leaf {
            let size = entry_size(level);
            return Some(Leaf {
                gpa: gpa & !(size - 1),
                size,
                entry: e,
                perms,
            });
        }
        table = e & ADDR_MASK;
    }
    None
}

/// Every leaf, in address order (shared tables once per path).
fn leaves(f: &mut Fake, root: HostPhysAddr, ept: bool) -> Vec<Leaf> {
    fn visit(
        f: &mut Fake,
        table: u64,
        level: u32,
        base: u64,
        perms: u64,
        ept: bool,
        out: &mut Vec<Leaf>,
    ) {
        for i in 0..512u64 {
            let e = f.table(HostPhysAddr::new(table))[i as usize];
            if e & PRESENT == 0 {
                continue;
            }
            let gpa = base + i * entry_size(level);
            let leaf = level == 0 || (level < 3 && e & HUGE != 0);
            check_entry(e, level, leaf, ept);
            if leaf {
                out.push(Leaf {
                    gpa,
                    size: entry_size(level),
                    entry: e,
                    perms: perms & e,
                });
            } else {
                visit(f, e & ADDR_MASK, level - 1, gpa, perms & e & RWX, ept, out);
            }
        }
    }
    let mut out = Vec::new();
    visit(f, root.as_u64(), 3, 0, RWX, ept, &mut out);
    out
}

/// The layout as a plain list, for checking.
struct Model {
    top: u64,
    limit: u64,
    /// Rounded out to pages, unsorted, possibly overlapping.
    hidden: Vec<(u64, u64)>,
    filler: u64,
    huge_1g: bool,
    types: Option<Mtrrs>,
    /// Regions `map_fault` mapped.
    lazy: Vec<Range<u64>>,
}

impl Model {
    fn new(layout: &Layout<'_>, types: Option<Mtrrs>) -> Self {
        Self {
            top: layout.top,
            limit: 1 << layout.max_phys_addr.clamp(12, 48),
            hidden: layout
                .hidden
                .iter()
                .filter(|r| r.start < r.end)
                .map(|r| (r.start & !0xFFF, (r.end + 0xFFF) & !0xFFF))
                .collect(),
            filler: layout.filler.as_u64(),
            huge_1g: layout.huge_1g,
            types,
            lazy: Vec::new(),
        }
    }

    fn format(&self) -> Format<'_> {
        match &self.types {
            Some(m) => Format::Ept(m),
            None => Format::Npt,
        }
    }

    fn ept(&self) -> bool {
        self.types.is_some()
    }

    fn is_hidden(&self, gpa: u64) -> bool {
        self.hidden.iter().any(|&(s, e)| s <= gpa && gpa < e)
    }

    fn hides_any(&self, a: u64, b: u64) -> bool {
        self.hidden.iter().any(|&(s, e)| s < b && a < e)
    }

    /// Hidden pages below `below`, counted over the ranges merged here.
    fn hidden_pages(&self, below: u64) -> u64 {
        let mut sorted = self.hidden.clone();
        sorted.sort();
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for (s, e) in sorted {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        merged
            .iter()
            .map(|&(s, e)| e.min(below).saturating_sub(s) / PAGE)
            .sum()
    }

    fn mapped(&self, gpa: u64) -> bool {
        gpa < self.top || self.lazy.iter().any(|r| r.contains(&gpa))
    }

    /// Whether [a, b) could be one identity leaf.
    fn leaf_ok(&self, a: u64, b: u64) -> bool {
        b <= self.top
            && !self.hides_any(a, b)
            && self.types.is_none_or(|m| m.uniform_type(a, b).is_some())
    }

    /// Checks the translation of `gpa`: (a) identity with full rights and
    /// the MTRR type, (b) hidden → filler read-only, (c) maximal pages,
    /// nothing else mapped.
    fn check(&self, f: &mut Fake, root: HostPhysAddr, gpa: u64) {
        let w = walk(f, root, gpa, self.ept());
        if self.is_hidden(gpa) {
            let w = w.unwrap_or_else(|| panic!("hidden {gpa:#x} unmapped"));
            assert_eq!(w.size, PAGE, "hidden {gpa:#x} in a large page");
            assert_eq!(w.hpa(gpa), self.filler + (gpa & 0xFFF), "hidden {gpa:#x}");
            assert_eq!(w.perms, RO, "hidden {gpa:#x} rights");
            if self.ept() {
                assert_eq!(w.ept_type(), Some(WriteBack));
            }
        } else if self.mapped(gpa) {
            let w = w.unwrap_or_else(|| panic!("{gpa:#x} unmapped"));
            assert_eq!(w.hpa(gpa), gpa, "{gpa:#x} not identity");
            assert_eq!(w.perms, RWX, "{gpa:#x} rights");
            assert!(
                !self.hides_any(w.gpa, w.gpa + w.size),
                "{w:x?} covers hidden"
            );
            if let Some(m) = &self.types {
                assert_eq!(w.ept_type(), Some(m.type_of(gpa)), "{gpa:#x} type");
            }
            // Maximal: the next larger page around it could not be a leaf.
            if gpa < self.top {
                let bigger = w.size << 9;
                let allowed = bigger == 2 * MIB || (bigger == GIB && self.huge_1g);
                let a = gpa & !(bigger - 1);
                assert!(
                    !(allowed && self.leaf_ok(a, a + bigger)),
                    "{gpa:#x}: {:#x} page where {bigger:#x} fits",
                    w.size
                );
            }
        } else {
            assert!(w.is_none(), "{gpa:#x} above top mapped: {w:x?}");
        }
    }

    /// Checks every leaf and that together they cover exactly [0, top),
    /// the hidden pages and the lazily mapped regions.
    fn check_all(&self, f: &mut Fake, root: HostPhysAddr) {
        let mut identity_below_top = 0;
        let mut filler_pages = 0;
        for l in leaves(f, root, self.ept()) {
            let end = l.gpa + l.size;
            if l.perms == RO {
                assert_eq!(l.size, PAGE);
                assert_eq!(l.entry & ADDR_MASK, self.filler);
                assert!(self.is_hidden(l.gpa), "{l:x?} filler but not hidden");
                filler_pages += 1;
                continue;
            }
            assert_eq!(l.perms, RWX, "{l:x?}");
            assert_eq!(l.hpa(l.gpa), l.gpa, "{l:x?} not identity");
            assert!(!self.hides_any(l.gpa, end), "{l:x?} covers hidden");
            assert!(end <= self.limit);
            if let Some(m) = &self.types {
                assert_eq!(l.ept_type(), m.uniform_type(l.gpa, end), "{l:x?}");
            }
            if end <= self.top {
                identity_below_top += l.size;
            } else {
                assert!(l.gpa >= self.top, "{l:x?} straddles top");
                assert!(
                    self.lazy.iter().any(|r| r.start == l.gpa && r.end == end),
                    "{l:x?} above top not from a fault"
                );
            }
        }
        let hidden_below_top = self.hidden_pages(self.top);
        assert_eq!(identity_below_top + hidden_below_top * PAGE, self.top);
        assert_eq!(filler_pages, self.hidden_pages(self.limit));
    }

    /// Faults at `gpa` and checks the answer and the new mapping (d).
    fn fault(&mut self, t: &mut PassThroughTables, f: &mut Fake, gpa: u64) {
        let r = t.map_fault(f, GuestPhysAddr::new(gpa));
        if gpa >= self.limit {
            assert_eq!(r, Err(NptError::OutOfRange));
        } else if self.is_hidden(gpa) {
            assert_eq!(r, Err(NptError::Hidden));
        } else if self.mapped(gpa) {
            assert_eq!(r, Err(NptError::AlreadyMapped), "{gpa:#x}");
        } else {
            let r = r.unwrap_or_else(|e| panic!("fault at {gpa:#x}: {e:?}"));
            let size = r.end - r.start;
            assert!(r.contains(&gpa));
            assert!(size == PAGE || size == 2 * MIB || (size == GIB && self.huge_1g));
            assert_eq!(r.start % size, 0);
            assert!(!self.hides_any(r.start, r.end), "{r:x?} covers hidden");
            assert!(r.end <= self.limit);
            self.lazy.push(r.clone());
            for a in [r.start, gpa, r.end - 1] {
                self.check(f, t.root(), a);
            }
            assert_eq!(
                t.map_fault(f, GuestPhysAddr::new(gpa)),
                Err(NptError::AlreadyMapped)
            );
        }
    }
}

fn mtrrs(default: MemoryType, fixed: [u64; 11], ranges: &[(u64, u64, MemoryType)]) -> Mtrrs {
    let mut raw = MtrrMsrs {
        cap: 0x500 | ranges.len() as u64,
        def_type: 0xC00 | default.bits(),
        fixed,
        max_phys_addr: 40,
        ..MtrrMsrs::default()
    };
    for (pair, &(base, size, ty)) in raw.variable.iter_mut().zip(ranges) {
        *pair = VariableMtrr {
            base: base | ty.bits(),
            mask: (((1u64 << 40) - 1) & !(size - 1)) | 0x800,
        };
    }
    Mtrrs::new(&raw)
}

/// SeaBIOS on QEMU: default WB, 0xA0000-0xBFFFF UC in the fixed ranges,
/// the PCI hole UC.
fn seabios() -> Mtrrs {
    let mut fixed = [0x0606_0606_0606_0606; 11];
    fixed[2] = 0;
    mtrrs(WriteBack, fixed, &[(0xC000_0000, GIB, Uncacheable)])
}

fn layout(top: u64, hidden: &[Range<u64>], huge_1g: bool) -> Layout<'_> {
    Layout {
        top,
        hidden,
        filler: HostPhysAddr::new(hidden.first().map_or(0x5000, |r| r.start & !0xFFF)),
        huge_1g,
        max_phys_addr: 40,
    }
}

fn build(model: &Model, layout: &Layout<'_>) -> (Fake, PassThroughTables) {
    let mut f = fake(1 << 16);
    let t = PassThroughTables::build(&mut f, model.format(), layout).unwrap();
    assert_eq!(t.tables(), f.tables.len());
    (f, t)
}

/// The figure the boot log reports: a 4 GiB machine hiding 8 MiB at
/// ragged edges needs a handful of tables.
#[test]
fn four_gib_machine_needs_few_tables() {
    let hidden = [0x7F00_3000..0x7F80_3000];
    let m = seabios();
    for (types, huge_1g, want) in [
        // PML4, PDPT, the PD and PT of the first MiB's fixed ranges, the
        // PD of the hidden block, its two edge PTs, the shared filler PT.
        (Some(m), true, 8),
        // No type splits: the first GiB is one leaf.
        (None, true, 6),
        // Four PDs instead of 1 GiB leaves.
        (Some(m), false, 10),
        (None, false, 9),
    ] {
        let l = layout(4 * GIB, &hidden, huge_1g);
        let model = Model::new(&l, types);
        let (mut f, t) = build(&model, &l);
        assert_eq!(t.tables(), want, "{types:?} {huge_1g}");
        model.check_all(&mut f, t.root());
        for gpa in [
            0,
            0xA_0000,
            0xC_0000,
            0x7F00_2FFF,
            0x7F00_3000,
            0x7F80_2FFF,
            0x7F80_3000,
        ] {
            model.check(&mut f, t.root(), gpa);
        }
    }
}

#[test]
fn seabios_ept_leaves() {
    let l = layout(8 * GIB, &[], true);
    let model = Model::new(&l, Some(seabios()));
    let (mut f, t) = build(&model, &l);
    let root = t.root();
    let leaf = |f: &mut Fake, gpa| walk(f, root, gpa, true).unwrap();
    // Fixed ranges: 4 KiB pages in the first 2 MiB (UC VGA window).
    assert_eq!(leaf(&mut f, 0).size, PAGE);
    assert_eq!(leaf(&mut f, 0xA_0000).ept_type(), Some(Uncacheable));
    assert_eq!(leaf(&mut f, 0xC_0000).ept_type(), Some(WriteBack));
    assert_eq!(leaf(&mut f, 2 * MIB).size, 2 * MIB);
    // 1 GiB leaves elsewhere: WB RAM, the UC PCI hole with the LAPIC.
    let g1 = leaf(&mut f, GIB);
    assert_eq!((g1.size, g1.entry), (GIB, GIB | 0x7 | (6 << 3) | HUGE));
    let hole = leaf(&mut f, 0xFEE0_0000);
    assert_eq!((hole.size, hole.entry), (GIB, (3 * GIB) | 0x7 | HUGE));
    assert_eq!(leaf(&mut f, 7 * GIB).size, GIB);
    assert!(walk(&mut f, root, 8 * GIB, true).is_none());
    model.check_all(&mut f, root);
}

#[test]
fn npt_leaves_are_write_back_pat_zero() {
    let hidden = [0x20_3000..0x20_4000];
    let l = layout(2 * GIB, &hidden, true);
    let model = Model::new(&l, None);
    let (mut f, t) = build(&model, &l);
    let root = t.root();
    assert_eq!(walk(&mut f, root, GIB, false).unwrap().entry, GIB | 0x87);
    assert_eq!(
        walk(&mut f, root, 0x20_2000, false).unwrap().entry,
        0x20_2007
    );
    assert_eq!(
        walk(&mut f, root, 0x40_0000, false).unwrap().entry,
        0x40_0087
    );
    let h = walk(&mut f, root, 0x20_3123, false).unwrap();
    assert_eq!((h.entry, h.perms), (0x20_3005, RO));
    assert!(t.is_hidden(GuestPhysAddr::new(0x20_3FFF)));
    assert!(!t.is_hidden(GuestPhysAddr::new(0x20_4000)));
    assert!(!t.is_hidden(GuestPhysAddr::new(0x20_2FFF)));
}

#[test]
fn wholly_hidden_regions_share_tables() {
    // 1 GiB + 4 MiB + a page, from 1 GiB - 2 MiB: the first 2 MiB and
    // the last ones are whole 2 MiB regions; the middle is a whole GiB.
    let hidden = [GIB - 2 * MIB..2 * GIB + 2 * MIB + PAGE];
    let l = layout(4 * GIB, &hidden, true);
    let model = Model::new(&l, None);
    let (mut f, t) = build(&model, &l);
    // PML4, PDPT, PD of GiB 0, PD of GiB 2, PT at the end edge, the
    // filler PT, the filler PD.
    assert_eq!(t.tables(), 7);
    model.check_all(&mut f, t.root());
    for gpa in [
        GIB - 2 * MIB - 1,
        GIB - 1,
        GIB,
        2 * GIB - 1,
        2 * GIB + 2 * MIB,
        2 * GIB + 2 * MIB + PAGE,
    ] {
        model.check(&mut f, t.root(), gpa);
    }
    assert_eq!(
        t.hidden_ranges().collect::<Vec<_>>(),
        std::vec![GIB - 2 * MIB..2 * GIB + 2 * MIB + PAGE]
    );
}

#[test]
#[allow(clippy::reversed_empty_ranges)]
fn hidden_ranges_are_rounded_sorted_and_merged() {
    let hidden = [
        0x5000..0x5000, // empty
        0x9001..0x9002, // one byte page
        0x3800..0x5001, // 0x3000..0x6000
        0x6000..0x7000, // touches the previous
        0x8000..0x4000, // backwards: empty
        0x1_0000_0000..0x1_0000_0001,
        0x4000..0x4800, // inside
    ];
    let l = layout(0x10_0000, &hidden, true);
    let model = Model::new(&l, None);
    let (mut f, t) = build(&model, &l);
    assert_eq!(
        t.hidden_ranges().collect::<Vec<_>>(),
        std::vec![0x3000..0x7000, 0x9000..0xA000, 0x1_0000_0000..0x1_0000_1000]
    );
    model.check_all(&mut f, t.root());
    // Hidden above top: mapped to the filler too.
    model.check(&mut f, t.root(), 0x1_0000_0FFF);
}

#[test]
fn faults_above_top_map_large_regions_around_hidden_pages() {
    let hidden = [0x1_4020_0000..0x1_4020_1000, 0x7F00_0000..0x7F80_0000];
    let l = layout(4 * GIB, &hidden, true);
    let mut model = Model::new(&l, Some(seabios()));
    let (mut f, mut t) = build(&model, &l);
    let before = t.tables();
    // A 64-bit BAR at 512 GiB: one 1 GiB leaf (a PDPT for that PML4 slot).
    model.fault(&mut t, &mut f, 0x80_1234_5678);
    assert_eq!(model.lazy[0], 0x80_0000_0000..0x80_4000_0000);
    assert_eq!(t.tables(), before + 1);
    // In the GiB holding the hidden page above top: 2 MiB leaves, and
    // 4 KiB pages beside the hidden one.
    model.fault(&mut t, &mut f, 0x1_4000_0000);
    assert_eq!(model.lazy[1], 0x1_4000_0000..0x1_4020_0000);
    model.fault(&mut t, &mut f, 0x1_4020_1000);
    assert_eq!(model.lazy[2], 0x1_4020_1000..0x1_4020_2000);
    model.fault(&mut t, &mut f, 0x1_4040_0000);
    assert_eq!(model.lazy[3], 0x1_4040_0000..0x1_4060_0000);
    // Hidden, below top, beyond MAXPHYADDR.
    model.fault(&mut t, &mut f, 0x1_4020_0FFF);
    model.fault(&mut t, &mut f, 0x7F00_0000);
    model.fault(&mut t, &mut f, 0xFEE0_0000);
    model.fault(&mut t, &mut f, 1 << 40);
    model.fault(&mut t, &mut f, u64::MAX);
    model.check_all(&mut f, t.root());
    assert_eq!(t.tables(), f.tables.len());
    // Without 1 GiB pages: 2 MiB.
    let l = layout(4 * GIB, &hidden, false);
    let mut model = Model::new(&l, None);
    let (mut f, mut t) = build(&model, &l);
    model.fault(&mut t, &mut f, 0x80_1234_5678);
    assert_eq!(model.lazy[0], 0x80_1220_0000..0x80_1240_0000);
}

#[test]
fn lazy_mapping_follows_memory_types() {
    // A UC 4 KiB page and a WC 64 MiB window above top.
    let m = mtrrs(
        WriteBack,
        [0; 11],
        &[
            (0x2_0000_3000, PAGE, Uncacheable),
            (0x2_4000_0000, 64 * MIB, WriteCombining),
        ],
    );
    let l = layout(GIB, &[], true);
    let mut model = Model::new(&l, Some(m));
    let (mut f, mut t) = build(&model, &l);
    model.fault(&mut t, &mut f, 0x2_0000_3000);
    assert_eq!(model.lazy[0], 0x2_0000_3000..0x2_0000_4000);
    model.fault(&mut t, &mut f, 0x2_0000_0000);
    assert_eq!(model.lazy[1], 0x2_0000_0000..0x2_0000_1000);
    model.fault(&mut t, &mut f, 0x2_0020_0000);
    assert_eq!(model.lazy[2], 0x2_0020_0000..0x2_0040_0000);
    model.fault(&mut t, &mut f, 0x2_4100_0000);
    assert_eq!(model.lazy[3], 0x2_4100_0000..0x2_4120_0000);
    model.check_all(&mut f, t.root());
}

#[test]
fn refuses_bad_layouts() {
    let mut f = fake(64);
    let build = |f: &mut Fake, l: &Layout<'_>| PassThroughTables::build(f, Format::Npt, l).err();
    let ok = layout(4 * GIB, &[], true);
    assert_eq!(
        build(&mut f, &Layout { top: 0x1001, ..ok }),
        Some(NptError::Misaligned)
    );
    let filler = HostPhysAddr::new(0x1234);
    assert_eq!(
        build(&mut f, &Layout { filler, ..ok }),
        Some(NptError::Misaligned)
    );
    assert_eq!(
        build(&mut f, &Layout { top: 1 << 41, ..ok }),
        Some(NptError::OutOfRange)
    );
    assert_eq!(
        build(
            &mut f,
            &Layout {
                top: !0xFFF,
                max_phys_addr: 255,
                ..ok
            }
        ),
        Some(NptError::OutOfRange)
    );
    let filler = HostPhysAddr::new(1 << 40);
    assert_eq!(
        build(&mut f, &Layout { filler, ..ok }),
        Some(NptError::OutOfRange)
    );
    let far = [0x1000..(1 << 40) + 1];
    assert_eq!(
        build(&mut f, &Layout { hidden: &far, ..ok }),
        Some(NptError::OutOfRange)
    );
    let huge = [0x1000..u64::MAX];
    assert_eq!(
        build(
            &mut f,
            &Layout {
                hidden: &huge,
                ..ok
            }
        ),
        Some(NptError::OutOfRange)
    );
    let many: Vec<_> = (0..MAX_HIDDEN_RANGES as u64 + 1)
        .map(|i| i * 0x2000..i * 0x2000 + 1)
        .collect();
    assert_eq!(
        build(
            &mut f,
            &Layout {
                hidden: &many,
                ..ok
            }
        ),
        Some(NptError::TooManyHidden)
    );
    // Exactly the maximum, given in reverse order: fine.
    let most: Vec<_> = many[1..].iter().rev().cloned().collect();
    let mut f = fake(64);
    let t = PassThroughTables::build(
        &mut f,
        Format::Npt,
        &Layout {
            hidden: &most,
            ..ok
        },
    )
    .unwrap();
    assert_eq!(t.hidden_ranges().count(), MAX_HIDDEN_RANGES);
    // Every table count short of enough runs out cleanly.
    let l = layout(4 * GIB, &[0x7F00_3000..0x7F80_3000], true);
    let m = seabios();
    for limit in 0..8 {
        let mut f = fake(limit);
        assert_eq!(
            PassThroughTables::build(&mut f, Format::Ept(&m), &l).err(),
            Some(NptError::OutOfMemory)
        );
    }
    let mut f = fake(8);
    let mut t = PassThroughTables::build(&mut f, Format::Ept(&m), &l).unwrap();
    assert_eq!(
        t.map_fault(&mut f, GuestPhysAddr::new(0x80_0000_0000)),
        Err(NptError::OutOfMemory)
    );
}

#[test]
fn top_zero_maps_only_hidden_pages() {
    let hidden = [0x3000..0x4000];
    let l = layout(0, &hidden, true);
    let model = Model::new(&l, None);
    let (mut f, t) = build(&model, &l);
    model.check_all(&mut f, t.root());
    assert!(walk(&mut f, t.root(), 0x2000, false).is_none());
    let l = layout(0, &[], true);
    let model = Model::new(&l, None);
    let (_, t) = build(&model, &l);
    assert_eq!(t.tables(), 1);
}

/// A power-of-two variable range, or the fixed ranges' choice.
fn any_mtrrs() -> impl Strategy<Value = Mtrrs> {
    let ty = prop::sample::select(std::vec![
        Uncacheable,
        WriteCombining,
        WriteThrough,
        WriteProtected,
        WriteBack
    ]);
    let range = (12u32..34, 0u64..(1 << 22), ty.clone())
        .prop_map(|(log, slot, ty)| ((slot << log) & ((1 << 35) - 1), 1u64 << log, ty));
    let fixed = prop_oneof![
        Just([0x0606_0606_0606_0606u64; 11]),
        prop::array::uniform11(prop::sample::select(std::vec![
            0u64,
            0x0606_0606_0606_0606,
            0x0606_0000_0404_0101,
        ])),
    ];
    (ty, fixed, prop::collection::vec(range, 0..6)).prop_map(|(default, fixed, ranges)| {
        assert!(ranges.len() <= MAX_VARIABLE_MTRRS);
        mtrrs(default, fixed, &ranges)
    })
}

/// Where a hidden range or a probe sits: anywhere, or near `top`, a
/// 2 MiB or a 1 GiB boundary.
#[derive(Clone, Copy, Debug)]
enum Anchor {
    Any(u64),
    Top(i64),
    TwoMib(u64, i64),
    OneGib(u64, i64),
}

fn any_anchor() -> impl Strategy<Value = Anchor> {
    prop_oneof![
        (0u64..(1 << 35)).prop_map(Anchor::Any),
        (-8i64..8).prop_map(Anchor::Top),
        (0u64..8192, -8i64..8).prop_map(|(n, d)| Anchor::TwoMib(n, d)),
        (0u64..17, -8i64..8).prop_map(|(n, d)| Anchor::OneGib(n, d)),
    ]
}

impl Anchor {
    fn at(self, top: u64) -> u64 {
        let (base, pages) = match self {
            Anchor::Any(a) => (a, 0),
            Anchor::Top(d) => (top, d),
            Anchor::TwoMib(n, d) => (n * 2 * MIB, d),
            Anchor::OneGib(n, d) => (n * GIB, d),
        };
        base.saturating_add_signed(pages * PAGE as i64)
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn tables_match_the_layout(
        top in prop_oneof![
            (0u64..=16).prop_map(|g| g * GIB),
            (0u64..=8192).prop_map(|n| n * 2 * MIB),
            (0u64..(1 << 22)).prop_map(|p| p * PAGE),
        ],
        hidden in prop::collection::vec(
            (any_anchor(), prop_oneof![1u64..16, 1u64..2048, Just(512u64), Just(1024u64)], 0u64..4096, 0u64..4096),
            0..5,
        ),
        filler in (0u64..(1 << 24)).prop_map(|p| p * PAGE),
        huge_1g in any::<bool>(),
        types in prop::option::of(any_mtrrs()),
        probes in prop::collection::vec(any_anchor(), 48),
        faults in prop::collection::vec(prop_oneof![
            any_anchor(),
            (0u64..(1 << 41)).prop_map(Anchor::Any),
        ], 0..8),
    ) {
        // Ranges of whole pages, with ragged byte ends sometimes.
        let hidden: Vec<Range<u64>> = hidden
            .iter()
            .map(|&(anchor, pages, head, tail)| {
                let start = anchor.at(top) & !0xFFF;
                start + head % 4096..start + pages * PAGE - tail % 4096
            })
            .collect();
        let l = Layout { top, hidden: &hidden, filler: HostPhysAddr::new(filler), huge_1g, max_phys_addr: 40 };
        let mut model = Model::new(&l, types);
        let (mut f, mut t) = build(&model, &l);
        model.check_all(&mut f, t.root());
        let mut points: Vec<u64> = probes.iter().map(|p| p.at(top)).collect();
        for &(s, e) in &model.hidden {
            points.extend([s.saturating_sub(1), s, e - 1, e]);
        }
        for p in points {
            model.check(&mut f, t.root(), p);
            prop_assert_eq!(t.is_hidden(GuestPhysAddr::new(p)), model.is_hidden(p));
        }
        for fault in faults {
            model.fault(&mut t, &mut f, fault.at(top));
        }
        prop_assert_eq!(t.tables(), f.tables.len());
        model.check_all(&mut f, t.root());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Hostile MTRRs (non-contiguous masks, reserved types, odd widths):
    /// every page still gets exactly its MTRR type, and the tables stay
    /// consistent. Kept to 1 GiB: such masks can cost a page table per
    /// 2 MiB.
    #[test]
    fn hostile_mtrrs_still_give_each_page_its_type(
        raw in crate::mtrr::tests::any_msrs(),
        top in (0u64..=512).prop_map(|n| n * 2 * MIB),
        huge_1g in any::<bool>(),
        probes in prop::collection::vec(0u64..GIB, 64),
    ) {
        let types = Mtrrs::new(&raw);
        let hidden = [0x3F0_1000..0x400_3000];
        let l = Layout { top, hidden: &hidden, filler: HostPhysAddr::new(0x3F0_1000), huge_1g, max_phys_addr: 40 };
        let model = Model::new(&l, Some(types));
        let (mut f, t) = build(&model, &l);
        for p in probes {
            model.check(&mut f, t.root(), p);
        }
        model.check_all(&mut f, t.root());
    }

    /// Any layout at all: an answer, never a panic, and a bounded number
    /// of tables (the allocator's limit).
    #[test]
    fn hostile_layouts_never_panic(
        top in prop_oneof![any::<u64>(), any::<u64>().prop_map(|t| t & !0xFFF),
            (0u64..(1 << 36)).prop_map(|t| t & !0xFFF)],
        hidden in prop::collection::vec((any::<u64>(), any::<u64>()), 0..40),
        filler in prop_oneof![any::<u64>(), (0u64..(1 << 36)).prop_map(|t| t & !0xFFF)],
        huge_1g in any::<bool>(),
        width in prop_oneof![any::<u8>(), 36u8..=52],
        ept in any::<bool>(),
        faults in prop::collection::vec(any::<u64>(), 0..8),
    ) {
        let hidden: Vec<Range<u64>> = hidden.into_iter().map(|(s, e)| s..e).collect();
        let l = Layout { top, hidden: &hidden, filler: HostPhysAddr::new(filler), huge_1g, max_phys_addr: width };
        let m = seabios();
        let format = if ept { Format::Ept(&m) } else { Format::Npt };
        let mut f = fake(256);
        let built = PassThroughTables::build(&mut f, format, &l);
        let valid = top.is_multiple_of(PAGE)
            && filler.is_multiple_of(PAGE)
            && filler < 1 << 36
            && top <= 1 << 36
            && width >= 36
            && hidden.iter().all(|r| r.start >= r.end);
        if valid {
            // Only the allocator's limit can stop a valid layout.
            prop_assert!(matches!(built, Ok(_) | Err(NptError::OutOfMemory)), "{:?}", built.err());
        }
        if let Ok(mut t) = built {
            for g in faults {
                let _ = t.map_fault(&mut f, GuestPhysAddr::new(g));
                let _ = t.is_hidden(GuestPhysAddr::new(g));
            }
            prop_assert_eq!(t.tables(), f.tables.len());
        }
    }
}

/// A write-protected device page (the local APIC) stays identity-mapped
/// and readable, loses only its write permission, and its large page is
/// split without changing any other translation.
#[test]
fn write_protect_splits_and_keeps_identity() {
    let hidden = [0x7F00_0000..0x7F40_0000];
    for (types, huge_1g) in [(Some(seabios()), true), (None, true), (None, false)] {
        let l = layout(4 * GIB, &hidden, huge_1g);
        let model = Model::new(&l, types);
        let (mut f, mut t) = build(&model, &l);
        let apic = 0xFEE0_0000;
        t.write_protect(&mut f, GuestPhysAddr::new(apic)).unwrap();
        let leaf = walk(&mut f, t.root(), apic + 0x300, model.ept()).unwrap();
        assert_eq!(leaf.size, 4096);
        assert_eq!(leaf.hpa(apic + 0x300), apic + 0x300);
        assert_eq!(leaf.perms & 0b111, RO, "read (and execute/user), no write");
        // The neighbours keep everything they had.
        for gpa in [apic - 0x1000, apic + 0x1000, 0xFEC0_0000, 0x1000_0000] {
            let leaf = walk(&mut f, t.root(), gpa, model.ept()).unwrap();
            assert_eq!(leaf.hpa(gpa), gpa);
            assert_eq!(leaf.perms & 0b111, 0b111, "{gpa:#x}");
        }
        // A hidden page cannot be protected again; an unmapped one cannot
        // be protected at all.
        assert_eq!(
            t.write_protect(&mut f, GuestPhysAddr::new(0x7F00_0000)),
            Err(NptError::Hidden)
        );
        assert_eq!(
            t.write_protect(&mut f, GuestPhysAddr::new(8 * GIB)),
            Err(NptError::OutOfRange)
        );
        // Twice is harmless.
        t.write_protect(&mut f, GuestPhysAddr::new(apic)).unwrap();
        // And it can be undone.
        t.write_unprotect(&mut f, GuestPhysAddr::new(apic)).unwrap();
        let leaf = walk(&mut f, t.root(), apic, model.ept()).unwrap();
        assert_eq!((leaf.hpa(apic), leaf.perms & 0b111), (apic, 0b111));
        assert_eq!(
            t.write_unprotect(&mut f, GuestPhysAddr::new(0x7F00_0000)),
            Err(NptError::Hidden)
        );
    }
}

/// A whole ECAM window made read-only: every page inside loses its write
/// permission (through a pointer or a leaf), every page outside keeps it,
/// everything stays identity-mapped, and it costs a table or two at the
/// ragged edges only.
#[test]
fn write_protect_range_is_cheap_and_exact() {
    let hidden = [0x7F00_0000..0x7F40_0000];
    for (types, huge_1g) in [(Some(seabios()), true), (None, true), (None, false)] {
        let l = layout(4 * GIB, &hidden, huge_1g);
        let model = Model::new(&l, types);
        let (mut f, mut t) = build(&model, &l);
        let before = t.tables();
        for range in [0xB000_0000..0xC000_0000u64, 0xE010_0000..0xE030_0000] {
            t.write_protect_range(&mut f, range.clone()).unwrap();
            let probes = [
                range.start - 0x1000,
                range.start,
                range.start + 0x1234,
                (range.start + range.end) / 2,
                range.end - 8,
                range.end,
                range.end + 0x20_0000,
            ];
            for gpa in probes {
                let leaf = walk(&mut f, t.root(), gpa, model.ept()).unwrap();
                assert_eq!(leaf.hpa(gpa), gpa);
                let want = if range.contains(&gpa) { RO } else { 0b111 };
                assert_eq!(leaf.perms & 0b111, want, "{gpa:#x} in {range:x?}");
            }
        }
        assert!(
            t.tables() - before <= 4,
            "{} new tables",
            t.tables() - before
        );
        assert_eq!(
            t.write_protect_range(&mut f, 0x7E00_0000..0x7F00_1000),
            Err(NptError::Hidden)
        );
        assert_eq!(
            t.write_protect_range(&mut f, 0x1000..0x1800),
            Err(NptError::Misaligned)
        );
    }
}
