//! Input decoding shared by the boot-input targets (`bzimage`,
//! `multiboot`, `bootinfo`, `e820`, `acpi`): memory maps, hidden and
//! avoided ranges shaped like the firmware's and thinvisor's, so short
//! inputs already reach the interesting paths, with fully hostile values
//! mixed in.

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use thinvisor_boot::e820::GuestMap;
use thinvisor_boot::{MemKind, MemRegion};

pub use crate::common::*;

/// Bytes of a page.
pub const PAGE: u64 = 4096;

/// An address: mostly in the first 64 MiB (so ranges collide), sometimes
/// page-aligned, sometimes near the top of the address space, sometimes
/// anything.
pub fn addr(u: &mut Unstructured<'_>) -> Result<u64> {
    Ok(match u.int_in_range(0u8..=5)? {
        0..=2 => u.int_in_range(0u64..=64 << 20)?,
        3 => u.int_in_range(0u64..=16384)? * PAGE,
        4 => u64::MAX - u.int_in_range(0u64..=0x10000)?,
        _ => u.arbitrary()?,
    })
}

/// A memory kind, RAM most often.
pub fn kind(u: &mut Unstructured<'_>) -> Result<MemKind> {
    Ok(match u.int_in_range(0u8..=7)? {
        0..=3 => MemKind::Available,
        4 => MemKind::Reserved,
        5 => MemKind::AcpiReclaimable,
        6 => MemKind::AcpiNvs,
        _ => MemKind::Bad,
    })
}

/// One firmware memory-map entry.
pub fn region(u: &mut Unstructured<'_>) -> Result<MemRegion> {
    let start = addr(u)?;
    let len = match u.int_in_range(0u8..=4)? {
        0 | 1 => u.int_in_range(0u64..=16 << 20)?,
        2 => 0,
        3 => u.int_in_range(1u64..=64)? * PAGE,
        _ => u.arbitrary()?,
    };
    Ok(MemRegion {
        start,
        len,
        kind: kind(u)?,
    })
}

/// Up to `max` firmware entries, plus QEMU's `-m 512` map when asked (so
/// the loaders usually find room).
pub fn memory_map(u: &mut Unstructured<'_>, max: u8) -> Result<Vec<MemRegion>> {
    let mut map = Vec::new();
    for _ in 0..u.int_in_range(0..=max)? {
        map.push(region(u)?);
    }
    if u.ratio(3u8, 4u8)? {
        map.extend(qemu_map());
    }
    Ok(map)
}

/// thinvisor's hidden blocks: page-aligned, mostly in the first 64 MiB;
/// now and then misaligned or backwards (which `GuestMap::new` refuses).
pub fn hidden_ranges(u: &mut Unstructured<'_>) -> Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    for _ in 0..u.int_in_range(0u8..=3)? {
        if u.ratio(1u8, 16u8)? {
            out.push((u.arbitrary()?, u.arbitrary()?));
        } else {
            let p = u.int_in_range(0u64..=16384)?;
            let n = u.int_in_range(0u64..=1024)?;
            out.push((p * PAGE, (p + n) * PAGE));
        }
    }
    Ok(out)
}

/// The boot modules' ranges the loaders keep clear of.
pub fn avoid_ranges(u: &mut Unstructured<'_>) -> Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    for _ in 0..u.int_in_range(0u8..=4)? {
        let s = addr(u)?;
        let len = u.int_in_range(0u64..=8 << 20)?;
        out.push((s, s.saturating_add(len)));
    }
    Ok(out)
}

/// Every write a pass-through loader made lies in usable RAM (never in a
/// hidden range) and outside every avoid range.
pub fn assert_writes_allowed(mem: &Sparse, map: &GuestMap, avoid: &[(u64, u64)]) {
    for &(s, e) in &mem.writes {
        assert_eq!(
            map.check_usable(s, e - s),
            Ok(()),
            "write {s:#x}..{e:#x} outside usable RAM"
        );
        for &(h0, h1) in map.hidden() {
            assert!(
                e <= h0 || h1 <= s,
                "write {s:#x}..{e:#x} into hidden {h0:#x}..{h1:#x}"
            );
        }
        for &(a, b) in avoid.iter().filter(|(a, b)| a < b) {
            assert!(e <= a || b <= s, "write {s:#x}..{e:#x} hits {a:#x}..{b:#x}");
        }
    }
}
