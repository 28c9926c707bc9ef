mod common;

use common::QEMU_E820;
use thinvisor_boot::alloc::{max_phys_end, FrameAllocator, MAX_FREE_RANGES};
use thinvisor_boot::{MemKind, MemRegion};

const MIB: u64 = 1 << 20;

fn map(entries: &[(u64, u64, u32)]) -> Vec<MemRegion> {
    entries
        .iter()
        .map(|&(start, len, ty)| MemRegion {
            start,
            len,
            kind: MemKind::from_multiboot(ty),
        })
        .collect()
}

#[test]
fn qemu_map_with_image_and_modules() {
    let m = map(&QEMU_E820);
    let image = (0x100000, 0x17f123); // hypervisor image, unaligned end
    let guest = (0x200000, 0x212345); // boot module
    let info = (0x9000, 0x9400); // boot information (below 1 MiB anyway)
    let mut a = FrameAllocator::new(&m, &[image, guest, info]);
    assert_eq!(
        a.free_ranges(),
        [(0x180000, 0x200000), (0x213000, 0x1ffe0000)]
    );
    let total = (0x200000 - 0x180000) + (0x1ffe0000 - 0x213000);
    assert_eq!(a.free_bytes(), total);

    assert_eq!(a.alloc(4096, 4096), Some(0x180000));
    assert_eq!(a.alloc(1, 4096), Some(0x181000)); // rounded up to a page
    assert_eq!(a.alloc(2 * MIB, 2 * MIB), Some(0x400000));
    assert_eq!(a.alloc(0x1000, 0x1000), Some(0x182000));
    // The gap left below the 2 MiB block is still used.
    assert_eq!(a.alloc(0x1000, 0x10000), Some(0x190000));
    assert_eq!(a.alloc(0x1ed000, 0x1000), Some(0x213000));
    assert_eq!(a.free_bytes(), total - 0x3000 - 2 * MIB - 0x1000 - 0x1ed000);

    // Everything handed out is available, above 1 MiB and outside the reserved ranges.
    let mut got = vec![
        (0x180000u64, 0x183000u64),
        (0x190000, 0x191000),
        (0x213000, 0x400000),
        (0x400000, 0x600000),
    ];
    while let Some(p) = a.alloc(64 * MIB, 4096) {
        got.push((p, p + 64 * MIB));
    }
    for &(s, e) in &got {
        assert!(s >= 0x100000 && e <= 0x1ffe0000);
        for r in [image, guest] {
            assert!(
                e <= r.0 || s >= (r.1 + 0xfff) & !0xfff,
                "{s:#x}..{e:#x} overlaps {r:?}"
            );
        }
    }
    assert!(a.free_bytes() < 64 * MIB);
}

#[test]
fn nothing_below_one_mib() {
    let m = map(&[(0, 0x9fc00, 1), (0x80000, 0x100000, 1)]);
    let mut a = FrameAllocator::new(&m, &[]);
    assert_eq!(a.free_ranges(), [(0x100000, 0x180000)]);
    assert_eq!(a.alloc(0x1000, 0x1000), Some(0x100000));
    let low_only = FrameAllocator::new(&map(&[(0, 0x9fc00, 1)]), &[]);
    assert_eq!(low_only.free_bytes(), 0);
}

#[test]
fn firmware_oddities() {
    let m = map(&[
        (0x300000, 0x100000, 1), // unsorted
        (0x100000, 0x180000, 1), // overlaps the next one
        (0x200000, 0x80000, 1),
        (0x500000, 0, 1),                // zero length
        (0x600800, 0x2000, 1),           // unaligned: shrinks to one page
        (0x380000, 0x1000, 3),           // ACPI inside available RAM
        (0x3c0000, 0x10, 2),             // tiny reserved: takes its whole page
        (0x700000, 0x100000, 4),         // NVS, not available
        (0x800000, 0x100000, 5),         // bad RAM
        (u64::MAX - 0x1fff, 0x10000, 1), // runs past the top
    ]);
    let a = FrameAllocator::new(&m, &[]);
    assert_eq!(
        a.free_ranges(),
        [
            (0x100000, 0x280000),
            (0x300000, 0x380000),
            (0x381000, 0x3c0000),
            (0x3c1000, 0x400000),
            (0x601000, 0x602000),
            (u64::MAX - 0x1fff, u64::MAX - 0xfff),
        ]
    );
}

#[test]
fn reserved_overrides_available_in_any_order() {
    // A reserved entry listed before the available one that contains it.
    let m = map(&[(0x100000, 0x10000, 2), (0x100000, 0x100000, 1)]);
    let a = FrameAllocator::new(&m, &[]);
    assert_eq!(a.free_ranges(), [(0x110000, 0x200000)]);
}

#[test]
fn reserved_ranges_are_widened_to_pages() {
    let m = map(&[(0x100000, 0x100000, 1)]);
    let a = FrameAllocator::new(
        &m,
        &[
            (0x150001, 0x150002),
            (0x1ff000, 0x1ff000),
            (0x170000, 0x160000),
        ],
    );
    // Empty and backwards ranges reserve nothing.
    assert_eq!(
        a.free_ranges(),
        [(0x100000, 0x150000), (0x151000, 0x200000)]
    );
    let a = FrameAllocator::new(&m, &[(0, u64::MAX)]);
    assert_eq!(a.free_bytes(), 0);
    let a = FrameAllocator::new(&m, &[(0x1fffff, u64::MAX)]);
    assert_eq!(a.free_ranges(), [(0x100000, 0x1ff000)]);
}

#[test]
fn bad_requests() {
    let mut a = FrameAllocator::new(&map(&QEMU_E820), &[]);
    let before = a.free_bytes();
    assert_eq!(a.alloc(0, 4096), None);
    assert_eq!(a.alloc(4096, 0), None);
    assert_eq!(a.alloc(4096, 2048), None);
    assert_eq!(a.alloc(4096, 3 * 4096), None);
    assert_eq!(a.alloc(u64::MAX, 4096), None);
    assert_eq!(a.alloc(u64::MAX - 0xfff, 4096), None);
    assert_eq!(a.alloc(4096, 1 << 63), None);
    assert_eq!(a.alloc(1 << 30, 4096), None); // larger than any range
    assert_eq!(a.free_bytes(), before);
}

#[test]
fn exhaustion() {
    let mut a = FrameAllocator::new(&map(&[(0x100000, 0x10000, 1), (0x200000, 0x8000, 1)]), &[]);
    let mut pages = Vec::new();
    while let Some(p) = a.alloc(4096, 4096) {
        pages.push(p);
    }
    assert_eq!(pages.len(), 24);
    assert_eq!(a.free_bytes(), 0);
    assert!(a.free_ranges().is_empty());
    pages.sort();
    pages.dedup();
    assert_eq!(pages.len(), 24);
}

#[test]
fn capacity_overflow_drops_smallest() {
    // 300 separate regions, the last ones bigger.
    let entries: Vec<(u64, u64, u32)> = (0..300u64)
        .map(|i| {
            (
                0x1000_0000 + i * 0x10_0000,
                if i >= 250 { 0x8000 } else { 0x1000 },
                1,
            )
        })
        .collect();
    let a = FrameAllocator::new(&map(&entries), &[]);
    assert_eq!(a.free_ranges().len(), MAX_FREE_RANGES);
    // All 50 big ones survive.
    assert_eq!(
        a.free_ranges()
            .iter()
            .filter(|(s, e)| e - s == 0x8000)
            .count(),
        50
    );
    // Splitting ranges when full never panics and never frees reserved memory.
    let reserved: Vec<(u64, u64)> = (0..300u64)
        .map(|i| {
            let s = 0x1000_0000 + i * 0x10_0000 + 0x2000;
            (s, s + 0x1000)
        })
        .collect();
    let mut a = FrameAllocator::new(&map(&entries), &reserved);
    for &(s, e) in a.free_ranges() {
        for &(rs, re) in &reserved {
            assert!(e <= rs || s >= re);
        }
    }
    while let Some(p) = a.alloc(0x1000, 0x1000) {
        assert!(reserved.iter().all(|&(rs, re)| p + 0x1000 <= rs || p >= re));
    }
}

#[test]
fn max_phys_end_of_maps() {
    assert_eq!(max_phys_end(&[]), 0);
    assert_eq!(max_phys_end(&map(&QEMU_E820)), 0x1_0000_0000);
    assert_eq!(
        max_phys_end(&map(&[(0x1000, 0x1000, 1), (0x8000_0000, 0, 2)])),
        0x2000
    );
    assert_eq!(max_phys_end(&map(&[(u64::MAX - 5, 100, 2)])), u64::MAX);
}

#[test]
fn alloc_high_takes_the_top_below_the_limit() {
    let m = map(&QEMU_E820);
    let mut a = FrameAllocator::new(&m, &[]);
    let top = a.free_ranges().last().unwrap().1;
    // Highest 2 MiB-aligned block that fits.
    let got = a.alloc_high(8 * MIB, 2 * MIB, u64::MAX).unwrap();
    assert_eq!(got, (top - 8 * MIB) & !(2 * MIB - 1));
    assert!(a
        .free_ranges()
        .iter()
        .all(|&(s, e)| e <= got || s >= got + 8 * MIB));
    // A limit below the top is honoured.
    let got = a.alloc_high(MIB, 4096, 64 * MIB).unwrap();
    assert_eq!(got, 63 * MIB);
    // Falls back to a lower range when the highest is too small.
    let mut a = FrameAllocator::new(&map(&[(0x100000, 0x100000, 1), (0x400000, 0x1000, 1)]), &[]);
    assert_eq!(a.alloc_high(0x2000, 4096, u64::MAX), Some(0x1fe000));
    assert_eq!(a.alloc_high(0, 4096, u64::MAX), None);
    assert_eq!(a.alloc_high(4096, 3, u64::MAX), None);
    assert_eq!(a.alloc_high(4096, 4096, 0x100000), None);
}
