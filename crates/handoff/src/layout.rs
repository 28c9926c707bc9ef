//! Finding room for thinvisor in a memory map: a loader without a memory
//! allocator of its own (the test guest's `loader` mode) picks the block
//! it reserves for thinvisor, and the scratch space it copies the image
//! through, from the firmware's memory map minus what it already uses.
//! A UEFI loader asks its firmware (AllocatePages) instead.

use crate::info::{kind, Region};

/// A half-open physical range [start, end).
pub type Range = (u64, u64);

fn overlaps(a: Range, b: Range) -> bool {
    a.0 < b.1 && b.0 < a.1
}

/// The highest `align`-aligned start of `size` bytes that lie inside one
/// [`kind::AVAILABLE`] region of `map`, end at or below `limit`, and
/// overlap none of `busy`. `align` is a power of two; `None` when nothing
/// fits (or `size` is 0).
///
/// Regions are taken one at a time: a range that would straddle two
/// adjacent available regions is not found (firmware maps list RAM in
/// few, large regions; the loader asks for a few MiB).
pub fn highest_free(
    map: &[Region],
    busy: &[Range],
    size: u64,
    align: u64,
    limit: u64,
) -> Option<u64> {
    assert!(align.is_power_of_two(), "alignment {align:#x}");
    if size == 0 {
        return None;
    }
    let down = |x: u64| x & !(align - 1);
    let mut best: Option<u64> = None;
    for r in map.iter().filter(|r| r.kind == kind::AVAILABLE) {
        let region_end = r.start.saturating_add(r.len).min(limit);
        let Some(mut start) = region_end.checked_sub(size).map(down) else {
            continue;
        };
        // Each step moves `start` below the start of a busy range it
        // overlapped, so the loop ends after at most `busy.len()` steps
        // per region.
        while start >= r.start {
            let candidate = (start, start + size);
            match busy
                .iter()
                .filter(|&&b| overlaps(candidate, b))
                .map(|b| b.0)
                .min()
            {
                None => {
                    best = best.max(Some(start));
                    break;
                }
                Some(lowest) => match lowest.checked_sub(size) {
                    Some(below) => start = down(below),
                    None => break,
                },
            }
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn ram(start: u64, len: u64) -> Region {
        Region {
            start,
            len,
            kind: kind::AVAILABLE,
        }
    }

    /// QEMU's `pc` machine with 512 MiB, as SeaBIOS reports it.
    fn qemu_512m() -> [Region; 4] {
        [
            ram(0, 0x9_FC00),
            Region {
                start: 0x9_FC00,
                len: 0x400,
                kind: kind::RESERVED,
            },
            ram(MIB, 0x1FEE_0000 - MIB),
            Region {
                start: 0xFFFC_0000,
                len: 0x4_0000,
                kind: kind::RESERVED,
            },
        ]
    }

    #[test]
    fn top_of_memory_when_nothing_is_busy() {
        let at = highest_free(&qemu_512m(), &[], 8 * MIB, 2 * MIB, 1 << 32);
        // RAM ends at 0x1FEE_0000: 2 MiB-aligned, the block ends below it.
        assert_eq!(at, Some(0x1F60_0000));
    }

    #[test]
    fn steps_below_busy_ranges() {
        let map = qemu_512m();
        let block = highest_free(&map, &[], 8 * MIB, 2 * MIB, 1 << 32).unwrap();
        let busy = [(block, block + 8 * MIB), (0x1F00_0000, 0x1F00_1000)];
        let scratch = highest_free(&map, &busy, 10 * MIB, 2 * MIB, 1 << 32).unwrap();
        // Below the block, then below the page at 0x1F00_0000.
        assert_eq!(scratch, 0x1F00_0000 - 10 * MIB);
        assert!(busy
            .iter()
            .all(|&b| !overlaps((scratch, scratch + 10 * MIB), b)));
    }

    #[test]
    fn limit_alignment_and_no_room() {
        let map = qemu_512m();
        assert_eq!(
            highest_free(&map, &[], MIB, MIB, 0x1234_5678),
            Some(0x1220_0000)
        );
        // Only the low 640 KiB below the limit, too small for 1 MiB.
        assert_eq!(highest_free(&map, &[], MIB, 4096, MIB), None);
        assert_eq!(highest_free(&map, &[], 0, 4096, 1 << 32), None);
        assert_eq!(
            highest_free(&map, &[(0, 1 << 32)], 4096, 4096, 1 << 32),
            None
        );
        // Reserved regions never count.
        let reserved = [Region {
            start: 0,
            len: 1 << 32,
            kind: kind::RESERVED,
        }];
        assert_eq!(highest_free(&reserved, &[], 4096, 4096, 1 << 32), None);
    }

    /// Against a page-by-page search, on pseudo-random maps.
    #[test]
    fn agrees_with_brute_force() {
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        const PAGE: u64 = 4096;
        for _ in 0..300 {
            let mut map = [ram(0, 0); 3];
            for r in map.iter_mut() {
                *r = Region {
                    start: next(64) * PAGE,
                    len: next(24) * PAGE,
                    kind: if next(4) == 0 {
                        kind::RESERVED
                    } else {
                        kind::AVAILABLE
                    },
                };
            }
            let busy: [Range; 3] = core::array::from_fn(|_| {
                let s = next(80) * PAGE;
                (s, s + next(6) * PAGE)
            });
            let size = (1 + next(6)) * PAGE;
            let align = PAGE << next(3);
            let limit = next(96) * PAGE;
            let fits = |s: u64| {
                s.is_multiple_of(align)
                    && s + size <= limit
                    && map.iter().any(|r| {
                        r.kind == kind::AVAILABLE && r.start <= s && s + size <= r.start + r.len
                    })
                    && busy.iter().all(|&b| !overlaps((s, s + size), b))
            };
            let want = (0..128u64).rev().map(|p| p * PAGE).find(|&s| fits(s));
            assert_eq!(
                highest_free(&map, &busy, size, align, limit),
                want,
                "{map:?} {busy:?} size {size:#x} align {align:#x} limit {limit:#x}"
            );
        }
    }
}
