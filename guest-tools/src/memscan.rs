//! The plain logic of `memscan`: which physical pages to read, how to
//! read the System RAM ones through `/proc/kcore`, and the word matcher
//! that looks for thinvisor's canary without ever holding the canary
//! itself in memory.
//!
//! Why two files: Debian's kernel has `CONFIG_STRICT_DEVMEM`, under which
//! `/dev/mem` refuses every page of System RAM (above 1 MiB; below it
//! reads zeros), whatever the command line says. `/proc/kcore` (an ELF
//! core file of the kernel's address space, root only) maps all of System
//! RAM through the kernel's direct map: its RAM segments carry the
//! physical address in `p_paddr`. Everything else (E820-reserved ranges,
//! thinvisor's own block among them, ACPI tables, holes) is not System
//! RAM, which `/dev/mem` reads (with `iomem=relaxed`, also the ranges a
//! driver claimed; `CONFIG_IO_STRICT_DEVMEM` refuses those otherwise).

use std::ops::Range;

/// Bytes of a page.
pub const PAGE: u64 = 4096;

/// A range of the firmware's memory map (`/sys/firmware/memmap/N`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapEntry {
    /// [start, end) (the files hold the inclusive end).
    pub range: Range<u64>,
    /// Its type, e.g. `System RAM`, `Reserved`, `ACPI Tables`.
    pub kind: String,
}

impl MapEntry {
    /// Whether the firmware hands the range to the OS as RAM.
    pub fn is_ram(&self) -> bool {
        self.kind == "System RAM"
    }
}

/// Reserved ranges above 4 GiB larger than this are not read: they are
/// address space the firmware keeps free (QEMU reserves 12 GiB below
/// 1 TiB on AMD processors for HyperTransport), not memory, and reading
/// gigabytes of unbacked addresses would take the scan minutes. thinvisor
/// takes its block from the machine's RAM, which lies below the top of
/// RAM and is read in full.
pub const MAX_HIGH_RESERVED: u64 = 64 << 20;

/// What to read: every page of [0, top of RAM), and every page of every
/// non-RAM range of the firmware's map (those above the top of RAM
/// too), merged, sorted and page-granular; plus the ranges left out
/// (see [`MAX_HIGH_RESERVED`]).
pub fn plan(map: &[MapEntry]) -> (Vec<Range<u64>>, Vec<Range<u64>>) {
    let top = map
        .iter()
        .filter(|e| e.is_ram())
        .map(|e| e.range.end)
        .max()
        .unwrap_or(0);
    let top_page = top.saturating_add(PAGE - 1) & !(PAGE - 1);
    let mut want = Vec::new();
    want.push(0..top_page);
    let mut skipped = Vec::new();
    for e in map.iter().filter(|e| !e.is_ram()) {
        let r = e.range.start & !(PAGE - 1)..e.range.end.saturating_add(PAGE - 1) & !(PAGE - 1);
        if r.start >= 1 << 32 && r.end - r.start > MAX_HIGH_RESERVED {
            skipped.push(r);
        } else {
            want.push(r);
        }
    }
    (merge(want), skipped)
}

/// Sorted, disjoint union of `ranges` (empty ones dropped).
pub fn merge(mut ranges: Vec<Range<u64>>) -> Vec<Range<u64>> {
    ranges.retain(|r| r.start < r.end);
    ranges.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::new();
    for r in ranges {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// One entry of the firmware map from the three files of its directory
/// (`start`, `end` inclusive, both hex with 0x; `type`).
pub fn map_entry(start: &str, end: &str, kind: &str) -> Option<MapEntry> {
    let hex = |s: &str| u64::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok();
    let (start, end) = (hex(start)?, hex(end)?);
    (start <= end).then(|| MapEntry {
        range: start..end.saturating_add(1),
        kind: kind.trim().to_string(),
    })
}

/// A stretch of physical memory that `/proc/kcore` holds: physical
/// [`phys`], at file offset `offset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KcoreSegment {
    pub phys: Range<u64>,
    pub offset: u64,
}

/// The segments of `/proc/kcore` that map System RAM through the
/// kernel's direct map, from the start of the file (its ELF header and
/// program headers). kcore gives every segment of RAM (and the kernel's
/// text) its physical address in `p_paddr`, every other one (vmalloc,
/// modules, vmemmap) all ones; the direct map is the one offset
/// (virtual - physical) shared by the segments with the most bytes. None
/// for a file that is not a 64-bit little-endian ELF core.
pub fn kcore_segments(head: &[u8]) -> Option<Vec<KcoreSegment>> {
    let u16_at = |at: usize| Some(u16::from_le_bytes(head.get(at..at + 2)?.try_into().ok()?));
    let u32_at = |at: usize| Some(u32::from_le_bytes(head.get(at..at + 4)?.try_into().ok()?));
    let u64_at = |at: usize| Some(u64::from_le_bytes(head.get(at..at + 8)?.try_into().ok()?));
    // ELF64 (class 2), little-endian (1), ET_CORE (4).
    if head.get(..6)? != b"\x7fELF\x02\x01" || u16_at(16)? != 4 {
        return None;
    }
    let phoff = usize::try_from(u64_at(32)?).ok()?;
    let phentsize = usize::from(u16_at(54)?);
    let phnum = usize::from(u16_at(56)?);
    if phentsize < 56 {
        return None;
    }
    // (offset, vaddr, paddr, filesz) of each PT_LOAD with a physical
    // address.
    let mut loads = Vec::new();
    for i in 0..phnum {
        let ph = phoff.checked_add(i.checked_mul(phentsize)?)?;
        if u32_at(ph)? != 1 {
            continue;
        }
        let (offset, vaddr, paddr, filesz) = (
            u64_at(ph + 8)?,
            u64_at(ph + 16)?,
            u64_at(ph + 24)?,
            u64_at(ph + 32)?,
        );
        if paddr != u64::MAX && filesz > 0 {
            loads.push((offset, vaddr, paddr, filesz));
        }
    }
    let mut by_offset: Vec<(u64, u64)> = Vec::new();
    for &(_, vaddr, paddr, size) in &loads {
        let delta = vaddr.wrapping_sub(paddr);
        match by_offset.iter_mut().find(|(d, _)| *d == delta) {
            Some((_, total)) => *total += size,
            None => by_offset.push((delta, size)),
        }
    }
    let direct = by_offset.iter().max_by_key(|(_, total)| *total)?.0;
    let mut out: Vec<KcoreSegment> = loads
        .iter()
        .filter(|(_, vaddr, paddr, _)| vaddr.wrapping_sub(*paddr) == direct)
        .map(|&(offset, _, paddr, size)| KcoreSegment {
            phys: paddr..paddr.saturating_add(size),
            offset,
        })
        .collect();
    out.sort_by_key(|s| s.phys.start);
    Some(out)
}

/// Where physical page `pa` is in `/proc/kcore`, if a segment holds all
/// of it.
pub fn kcore_offset(segments: &[KcoreSegment], pa: u64) -> Option<u64> {
    segments
        .iter()
        .find(|s| s.phys.start <= pa && pa.saturating_add(PAGE) <= s.phys.end)
        .map(|s| s.offset + (pa - s.phys.start))
}

/// How far the matcher rotates words (32: half a word, which is 8 hex
/// digits of the canary's text).
const ROTATION: u32 = 32;

/// Finds the words `canary ^ i` (i < 512) of thinvisor's canary page, at
/// any 8-byte-aligned address (the page is page-aligned, and a guest that
/// could read it would see it at its own page offsets).
///
/// It never holds the canary: only the canary rotated by half a word,
/// parsed from the text with its halves swapped, so the scanner's own
/// memory (its stack, its registers saved on the kernel stack at every
/// system call) holds no copy of a canary word for the scan to find.
/// `word` matches when `(word ^ canary) < 512`, i.e. when
/// `rot(word) ^ rot(canary)` has no bit outside `rot(0x1FF)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Matcher {
    rotated: u64,
}

/// The bits `(word ^ canary)` may have for a match, rotated.
const LOW9_ROTATED: u64 = 0x1FFu64.rotate_left(ROTATION);

impl Matcher {
    /// The matcher for the canary written as hex text (`0x` and 1 to 16
    /// digits, as thinvisor logs it). The text is turned into the rotated
    /// value directly, without the canary's value on the way.
    pub fn from_hex(text: &str) -> Option<Matcher> {
        let digits = text.strip_prefix("0x").unwrap_or(text);
        if digits.is_empty() || digits.len() > 16 || !digits.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return None;
        }
        let padded = format!("{digits:0>16}");
        // Rotating by 32 bits swaps the halves: the low 8 digits first.
        let swapped = format!("{}{}", &padded[8..], &padded[..8]);
        let rotated = u64::from_str_radix(&swapped, 16).ok()?;
        Some(Matcher { rotated })
    }

    /// The matcher for a value the caller holds anyway (the control).
    pub fn for_value(value: u64) -> Matcher {
        Matcher {
            rotated: value.rotate_left(ROTATION),
        }
    }

    /// Whether `word` is one of the 512 words.
    #[inline]
    pub fn matches(&self, word: u64) -> bool {
        (word.rotate_left(ROTATION) ^ self.rotated) & !LOW9_ROTATED == 0
    }
}

/// A control value for [`Matcher::for_value`]: random-looking bits from
/// `seed` (e.g. the TSC), kept away from the words memory is full of, as
/// thinvisor keeps its canary.
pub fn control_value(seed: u64) -> u64 {
    let mut z = seed;
    loop {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut x = z;
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^= x >> 31;
        let ok = |half: u64| (4..=28).contains(&half.count_ones());
        if ok(x >> 32) && ok(x & 0xFFFF_FFFF) {
            return x;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(start: u64, end: u64, kind: &str) -> MapEntry {
        MapEntry {
            range: start..end,
            kind: kind.to_string(),
        }
    }

    #[test]
    fn plan_covers_ram_and_reserved() {
        let map = [
            e(0, 0x9fc00, "System RAM"),
            e(0x9fc00, 0xa0000, "Reserved"),
            e(0xf0000, 0x100000, "Reserved"),
            e(0x100000, 0x1fa00000, "System RAM"),
            e(0x1fa00000, 0x1fe00000, "Reserved"),
            e(0x1fe00000, 0x1ffe0000, "System RAM"),
            e(0x1ffe0000, 0x20000000, "Reserved"),
            e(0xfffc0000, 0x1_0000_0000, "Reserved"),
            e(0xfd_0000_0000, 0x100_0000_0000, "Reserved"),
        ];
        let (want, skipped) = plan(&map);
        assert_eq!(want, vec![0..0x20000000, 0xfffc0000..0x1_0000_0000]);
        assert_eq!(skipped, vec![0xfd_0000_0000..0x100_0000_0000]);
        // A small reserved range above 4 GiB is read.
        let (want, _) = plan(&[e(0, 0x1000, "System RAM"), e(1 << 33, (1 << 33) + 10, "x")]);
        assert_eq!(want, vec![0..0x1000, 1 << 33..(1 << 33) + PAGE]);
    }

    #[test]
    fn map_entries_parse() {
        assert_eq!(
            map_entry("0x9fc00\n", "0x9ffff\n", "Reserved\n"),
            Some(e(0x9fc00, 0xa0000, "Reserved"))
        );
        assert_eq!(map_entry("0x10", "0xf", "x"), None);
        assert_eq!(map_entry("zz", "0xf", "x"), None);
    }

    #[test]
    fn matcher_finds_exactly_the_canary_page_words() {
        let canary = 0x1234_5678_9abc_def0u64;
        let m = Matcher::from_hex("0x123456789abcdef0").unwrap();
        assert_eq!(m, Matcher::for_value(canary));
        for i in 0..512 {
            assert!(m.matches(canary ^ i));
        }
        assert!(!m.matches(canary ^ 512));
        assert!(!m.matches(canary ^ (1 << 63)));
        assert!(!m.matches(0));
        assert!(!m.matches(u64::MAX));
        // Short text is zero-extended, as u64 parsing would.
        assert_eq!(Matcher::from_hex("0xabc"), Some(Matcher::for_value(0xabc)));
        for bad in ["", "0x", "0x12345678123456781", "0xg"] {
            assert_eq!(Matcher::from_hex(bad), None, "{bad}");
        }
    }

    #[test]
    fn control_values_are_plausible() {
        for seed in 0..1000 {
            let v = control_value(seed);
            assert!(!Matcher::for_value(v).matches(0));
            assert!(!Matcher::for_value(v).matches(u64::MAX));
        }
    }

    /// A kcore head: ELF header and program headers.
    fn kcore(phdrs: &[(u32, u64, u64, u64, u64)]) -> Vec<u8> {
        let mut h = vec![0u8; 64];
        h[..6].copy_from_slice(b"\x7fELF\x02\x01");
        h[16..18].copy_from_slice(&4u16.to_le_bytes());
        h[32..40].copy_from_slice(&64u64.to_le_bytes());
        h[54..56].copy_from_slice(&56u16.to_le_bytes());
        h[56..58].copy_from_slice(&(phdrs.len() as u16).to_le_bytes());
        for &(ty, offset, vaddr, paddr, size) in phdrs {
            let mut p = vec![0u8; 56];
            p[..4].copy_from_slice(&ty.to_le_bytes());
            p[8..16].copy_from_slice(&offset.to_le_bytes());
            p[16..24].copy_from_slice(&vaddr.to_le_bytes());
            p[24..32].copy_from_slice(&paddr.to_le_bytes());
            p[32..40].copy_from_slice(&size.to_le_bytes());
            h.extend(p);
        }
        h
    }

    #[test]
    fn kcore_ram_segments() {
        let base = 0xffff_8880_0000_0000u64;
        let head = kcore(&[
            (4, 0x1000, 0, 0, 0x100),
            // text: its own offset, RAM already
            (1, 0x5000, 0xffff_ffff_8100_0000, 0x100_0000, 0x20_0000),
            // vmalloc: no physical address
            (1, 0x9000, 0xffff_c900_0000_0000, u64::MAX, 1 << 40),
            (1, 0x10000, base + 0x1000, 0x1000, 0x9e000),
            (1, 0x200000, base + 0x100000, 0x100000, 0x1f900000),
        ]);
        let s = kcore_segments(&head).unwrap();
        assert_eq!(
            s,
            vec![
                KcoreSegment {
                    phys: 0x1000..0x9f000,
                    offset: 0x10000
                },
                KcoreSegment {
                    phys: 0x100000..0x1fa00000,
                    offset: 0x200000
                },
            ]
        );
        assert_eq!(kcore_offset(&s, 0x2000), Some(0x11000));
        assert_eq!(kcore_offset(&s, 0x9f000), None);
        assert_eq!(kcore_offset(&s, 0x0), None);
        assert_eq!(kcore_offset(&s, 0x1f9ff000), Some(0x200000 + 0x1f8ff000));
        assert_eq!(kcore_segments(b"\x7fELF\x01\x01"), None);
        assert_eq!(kcore_segments(&head[..100]), None);
    }
}
