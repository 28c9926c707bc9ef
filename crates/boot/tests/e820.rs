//! The guest's memory map in the pass-through layout: hidden ranges carved
//! out exactly, overlaps resolved, the 128-entry bound.

mod common;

use common::*;
use proptest::prelude::*;
use thinvisor_boot::e820::{E820Entry, E820Error, GuestMap, Unusable, MAX_E820_ENTRIES};
use thinvisor_boot::{MemKind, MemRegion};

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;

fn table(map: &GuestMap) -> Vec<(u64, u64, u32)> {
    map.e820()
        .iter()
        .map(|e| (e.addr, e.end(), e.type_number()))
        .collect()
}

/// thinvisor's image at 2 MiB and an allocator block at 16 MiB.
const HIDDEN: [(u64, u64); 2] = [(0x20_0000, 0x60_0000), (0x100_0000, 0x140_0000)];

#[test]
fn qemu_map_with_thinvisor_hidden() {
    let map = GuestMap::new(&qemu_map(), &HIDDEN).unwrap();
    assert_eq!(
        table(&map),
        [
            (0, 0x9_FC00, 1),
            (0x9_FC00, 0xA_0000, 2),
            (0xF_0000, 0x10_0000, 2),
            (0x10_0000, 0x20_0000, 1),
            (0x20_0000, 0x60_0000, 2),
            (0x60_0000, 0x100_0000, 1),
            (0x100_0000, 0x140_0000, 2),
            (0x140_0000, 0x1FFE_0000, 1),
            (0x1FFE_0000, 0x2000_0000, 2),
            (0xFFFC_0000, 0x1_0000_0000, 2),
        ]
    );
    assert_eq!(
        map.usable(),
        [
            (0, 0x9_FC00),
            (0x10_0000, 0x20_0000),
            (0x60_0000, 0x100_0000),
            (0x140_0000, 0x1FFE_0000)
        ]
    );
    assert_eq!(map.hidden(), HIDDEN);
    assert_eq!(map.dropped_bytes(), 0);
}

#[test]
fn nothing_hidden_is_the_sorted_merged_map() {
    // Unsorted, split, with an empty entry: sorted and merged.
    let map = GuestMap::new(
        &[
            region(0x10_0000, 0x10_0000, 1),
            region(0, 0x9_FC00, 1),
            region(0x20_0000, 0x10_0000, 1),
            region(0x5000_0000, 0, 2),
            region(0x9_FC00, 0x400, 2),
        ],
        &[],
    )
    .unwrap();
    assert_eq!(
        table(&map),
        [(0, 0x9_FC00, 1), (0x9_FC00, 0xA_0000, 2), (MIB, 3 * MIB, 1)]
    );
}

#[test]
fn overlaps_resolve_to_the_most_restrictive_kind() {
    // RAM 0..16M overlapped by: ACPI 1M..2M, reserved 1.5M..3M, NVS 2.5M..4M,
    // bad 3.5M..5M, and an unknown type (reserved) 8M..9M.
    let map = GuestMap::new(
        &[
            region(0, 16 * MIB, 1),
            region(MIB, MIB, 3),
            region(MIB + MIB / 2, 3 * MIB / 2, 2),
            region(5 * MIB / 2, 3 * MIB / 2, 4),
            region(7 * MIB / 2, 3 * MIB / 2, 5),
            region(8 * MIB, MIB, 12),
        ],
        &[],
    )
    .unwrap();
    assert_eq!(
        table(&map),
        [
            (0, MIB, 1),
            (MIB, MIB + MIB / 2, 3),
            (MIB + MIB / 2, 5 * MIB / 2, 2),
            (5 * MIB / 2, 7 * MIB / 2, 4),
            (7 * MIB / 2, 5 * MIB, 5),
            (5 * MIB, 8 * MIB, 1),
            (8 * MIB, 9 * MIB, 2),
            (9 * MIB, 16 * MIB, 1),
        ]
    );
}

#[test]
fn hidden_beats_every_kind_and_fills_holes() {
    let map = GuestMap::new(
        &[
            region(0, 4 * MIB, 1),
            region(4 * MIB, MIB, 4), // NVS
            region(6 * MIB, MIB, 3), // ACPI reclaimable
        ],
        &[(3 * MIB, 8 * MIB)],
    )
    .unwrap();
    assert_eq!(table(&map), [(0, 3 * MIB, 1), (3 * MIB, 8 * MIB, 2)]);
    assert_eq!(map.usable(), [(0, 3 * MIB)]);
}

#[test]
fn top_of_the_address_space() {
    let high = u64::MAX - 0xFFFF;
    let map = GuestMap::new(
        &[region(high, u64::MAX, 1), region(0, PAGE, 1)],
        &[(high, high + PAGE)],
    )
    .unwrap();
    // The hidden page is carved out of the high region, which is cut at the
    // top of the address space (entries are [start, end), so its last byte
    // is left out).
    assert_eq!(
        table(&map),
        [
            (0, PAGE, 1),
            (high, high + PAGE, 2),
            (high + PAGE, u64::MAX, 1)
        ]
    );
}

#[test]
fn bad_hidden_ranges() {
    let map = qemu_map();
    assert_eq!(
        GuestMap::new(&map, &[(0x1000, 0x1800)]).unwrap_err(),
        E820Error::HiddenMisaligned {
            start: 0x1000,
            end: 0x1800
        }
    );
    assert_eq!(
        GuestMap::new(&map, &[(0x1800, 0x2000)]).unwrap_err(),
        E820Error::HiddenMisaligned {
            start: 0x1800,
            end: 0x2000
        }
    );
    assert_eq!(
        GuestMap::new(&map, &[(0x2000, 0x1000)]).unwrap_err(),
        E820Error::HiddenBackwards {
            start: 0x2000,
            end: 0x1000
        }
    );
    // Empty hidden ranges are fine and ignored.
    let m = GuestMap::new(&map, &[(0x2000, 0x2000)]).unwrap();
    assert!(m.hidden().is_empty());
    let many = vec![(0, PAGE); 65];
    assert_eq!(
        GuestMap::new(&map, &many).unwrap_err(),
        E820Error::TooManyHidden(65)
    );
    let regions = vec![region(0, PAGE, 1); 513];
    assert_eq!(
        GuestMap::new(&regions, &[]).unwrap_err(),
        E820Error::TooManyRegions(513)
    );
    for e in [
        E820Error::TooManyEntries,
        E820Error::TooManyHidden(1),
        E820Error::TooManyRegions(1),
    ] {
        assert!(!e.to_string().is_empty());
    }
}

#[test]
fn too_many_entries_drops_the_smallest_ram() {
    // 100 RAM / reserved pairs: 200 entries. RAM entry i is (i + 1) pages.
    let mut regions = Vec::new();
    let mut at = 0;
    for i in 0..100u64 {
        regions.push(region(at, (i + 1) * PAGE, 1));
        at += (i + 1) * PAGE;
        regions.push(region(at, PAGE, 2));
        at += PAGE;
    }
    let map = GuestMap::new(&regions, &[]).unwrap();
    assert_eq!(map.e820().len(), MAX_E820_ENTRIES);
    // 72 RAM entries were dropped: the 72 smallest (1..=72 pages).
    let dropped: u64 = (1..=72).map(|p| p * PAGE).sum();
    assert_eq!(map.dropped_bytes(), dropped);
    let ram: Vec<u64> = map
        .e820()
        .iter()
        .filter(|e| e.kind == MemKind::Available)
        .map(|e| e.size / PAGE)
        .collect();
    assert_eq!(ram, (73..=100).collect::<Vec<_>>());
    // Every reserved entry is still there.
    assert_eq!(
        map.e820()
            .iter()
            .filter(|e| e.kind == MemKind::Reserved)
            .count(),
        100
    );
    check_sorted(map.e820());
    assert_eq!(map.usable().len(), 28);

    // Only reserved entries, separated by holes: nothing may be dropped.
    let regions: Vec<MemRegion> = (0..129).map(|i| region(i * 2 * PAGE, PAGE, 2)).collect();
    assert_eq!(
        GuestMap::new(&regions, &[]).unwrap_err(),
        E820Error::TooManyEntries
    );
    let regions: Vec<MemRegion> = (0..128).map(|i| region(i * 2 * PAGE, PAGE, 2)).collect();
    assert_eq!(GuestMap::new(&regions, &[]).unwrap().e820().len(), 128);
}

#[test]
fn check_usable_names_the_first_bad_address() {
    let map = GuestMap::new(&qemu_map(), &HIDDEN).unwrap();
    assert_eq!(map.check_usable(0x10_0000, 0x10_0000), Ok(()));
    assert_eq!(map.check_usable(0x10_0000, 0), Ok(()));
    assert_eq!(
        map.check_usable(0x10_0000, 0x10_0001),
        Err((0x20_0000, Unusable::Hypervisor))
    );
    // A hidden range is named even when a hole comes first.
    assert_eq!(
        map.check_usable(0x9_0000, 0x20_0000),
        Err((0x20_0000, Unusable::Hypervisor))
    );
    assert_eq!(
        map.check_usable(0x9_0000, 0x1_0000),
        Err((0x9_FC00, Unusable::NotRam))
    );
    assert_eq!(
        map.check_usable(0x1FF0_0000, 0x20_0000),
        Err((0x1FFE_0000, Unusable::NotRam))
    );
    assert_eq!(
        map.check_usable(u64::MAX, 2),
        Err((u64::MAX, Unusable::NotRam))
    );
    assert_eq!(
        map.check_usable(0x3000_0000, 1),
        Err((0x3000_0000, Unusable::NotRam))
    );
}

fn check_sorted(entries: &[E820Entry]) {
    for e in entries {
        assert!(e.size > 0, "{e:?}");
    }
    for w in entries.windows(2) {
        assert!(w[0].end() <= w[1].addr, "{w:x?}");
        assert!(
            w[0].end() < w[1].addr || w[0].kind != w[1].kind,
            "unmerged {w:x?}"
        );
    }
}

// ------------------------------------------------------------ properties

fn kind() -> impl Strategy<Value = u32> {
    prop_oneof![4 => Just(1u32), 1 => Just(2u32), 1 => Just(3u32), 1 => Just(4u32), 1 => Just(5u32), 1 => Just(17u32)]
}

fn addr() -> impl Strategy<Value = u64> {
    prop_oneof![
        8 => 0u64..64 * MIB,
        2 => (0u64..16384).prop_map(|p| p * PAGE),
        1 => (0u64..0x10000).prop_map(|x| u64::MAX - x),
    ]
}

fn map_region() -> impl Strategy<Value = MemRegion> {
    (
        addr(),
        prop_oneof![0u64..16 * MIB, Just(0u64), any::<u64>()],
        kind(),
    )
        .prop_map(|(s, l, t)| region(s, l, t))
}

fn hidden_range() -> impl Strategy<Value = (u64, u64)> {
    prop_oneof![
        (0u64..16384, 0u64..2048).prop_map(|(p, n)| (p * PAGE, (p + n) * PAGE)),
        (0u64..16).prop_map(|n| (u64::MAX - 0xFFF - n * PAGE, u64::MAX - 0xFFF)),
    ]
}

fn rank(k: MemKind) -> u8 {
    match k {
        MemKind::Available => 0,
        MemKind::AcpiReclaimable => 1,
        MemKind::Reserved => 2,
        MemKind::AcpiNvs => 3,
        MemKind::Bad => 4,
    }
}

/// What byte `p` should be: hidden bytes reserved, else the most restrictive
/// kind of the entries covering it, else a hole.
fn expected(map: &[MemRegion], hidden: &[(u64, u64)], p: u64) -> Option<MemKind> {
    if hidden.iter().any(|&(s, e)| s <= p && p < e) {
        return Some(MemKind::Reserved);
    }
    map.iter()
        .filter(|r| r.len > 0 && r.start <= p && p < r.end())
        .map(|r| r.kind)
        .max_by_key(|&k| rank(k))
}

fn actual(m: &GuestMap, p: u64) -> Option<MemKind> {
    m.e820()
        .iter()
        .find(|e| e.addr <= p && p < e.end())
        .map(|e| e.kind)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn guest_map_is_exact(
        map in prop::collection::vec(map_region(), 0..40),
        hidden in prop::collection::vec(hidden_range(), 0..8),
        probes in prop::collection::vec(addr(), 0..32),
    ) {
        let m = GuestMap::new(&map, &hidden).unwrap();
        prop_assert_eq!(m.dropped_bytes(), 0);
        check_sorted(m.e820());
        // The usable list is exactly the type 1 entries.
        let ram: Vec<(u64, u64)> = m.e820().iter()
            .filter(|e| e.kind == MemKind::Available)
            .map(|e| (e.addr, e.end())).collect();
        prop_assert_eq!(m.usable(), &ram[..]);
        // Every boundary, its neighbours, and random probes: the map says
        // exactly what the model says. Between boundaries nothing changes,
        // so this checks every byte.
        let mut points: Vec<u64> = probes;
        for r in map.iter().filter(|r| r.len > 0) {
            points.extend([r.start, r.end(), r.start.wrapping_sub(1), r.end().wrapping_sub(1)]);
        }
        for &(s, e) in &hidden {
            points.extend([s, e, s.wrapping_sub(1), e.wrapping_sub(1)]);
        }
        for p in points {
            if p == u64::MAX {
                continue; // no entry can contain the last byte
            }
            let want = expected(&map, &hidden, p);
            let got = actual(&m, p);
            prop_assert_eq!(got, want, "at {:#x}", p);
            let in_hidden = hidden.iter().any(|&(s, e)| s <= p && p < e);
            let usable = m.usable().iter().any(|&(s, e)| s <= p && p < e);
            prop_assert!(!(in_hidden && usable), "hidden byte {:#x} is usable", p);
            prop_assert_eq!(usable, want == Some(MemKind::Available));
        }
    }

}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn guest_map_never_panics_and_stays_bounded(
        map in prop::collection::vec(map_region(), 0..300),
        hidden in prop::collection::vec(hidden_range(), 0..64),
    ) {
        if let Ok(m) = GuestMap::new(&map, &hidden) {
            prop_assert!(m.e820().len() <= MAX_E820_ENTRIES);
            check_sorted(m.e820());
            for &(s, e) in m.usable() {
                prop_assert!(!hidden.iter().any(|&(hs, he)| hs < e && s < he));
            }
        }
    }
}
