//! The guest's memory map (`thinvisor_boot::e820::GuestMap::new`) from a
//! hostile firmware map (overlapping, unsorted, empty, wrapping entries)
//! and hidden ranges (thinvisor's block).
//!
//! Checked against a byte-by-byte model: the E820 table is sorted,
//! non-overlapping, without empty entries, at most 128 entries, adjacent
//! entries of one kind merged; at every boundary point of the input (and
//! a few more) its kind is the model's (hidden: reserved; else the most
//! restrictive firmware kind), except usable RAM left out to fit (and
//! counted in `dropped_bytes`); hidden ranges are reserved throughout and
//! never usable; `usable()` is the table's usable entries; `check_usable`
//! agrees with `usable()`.

#![no_main]

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use thinvisor_boot::e820::{GuestMap, MAX_E820_ENTRIES};
use thinvisor_boot::{MemKind, MemRegion};
use thinvisor_memory_fuzz::boot::{addr, hidden_ranges, memory_map};

/// The order `GuestMap` resolves overlaps in (module documentation).
fn rank(k: MemKind) -> u8 {
    match k {
        MemKind::Available => 0,
        MemKind::AcpiReclaimable => 1,
        MemKind::Reserved => 2,
        MemKind::AcpiNvs => 3,
        MemKind::Bad => 4,
    }
}

fn model(map: &[MemRegion], hidden: &[(u64, u64)], p: u64) -> Option<MemKind> {
    if hidden.iter().any(|&(s, e)| s <= p && p < e) {
        return Some(MemKind::Reserved);
    }
    map.iter()
        .filter(|r| r.len != 0 && r.start <= p && p < r.end())
        .map(|r| r.kind)
        .max_by_key(|&k| rank(k))
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let map = memory_map(u, 24)?;
    let hidden = hidden_ranges(u)?;
    let Ok(gm) = GuestMap::new(&map, &hidden) else {
        return Ok(());
    };
    let table = gm.e820();
    assert!(table.len() <= MAX_E820_ENTRIES);
    for e in table {
        assert!(e.size > 0, "empty entry {e:?}");
    }
    for w in table.windows(2) {
        assert!(w[0].end() <= w[1].addr, "unsorted or overlapping: {w:x?}");
        if w[0].end() == w[1].addr {
            assert_ne!(w[0].kind, w[1].kind, "not merged: {w:x?}");
        }
    }
    let at = |p: u64| {
        table
            .iter()
            .find(|e| e.addr <= p && p < e.end())
            .map(|e| e.kind)
    };
    let mut points: Vec<u64> = map
        .iter()
        .flat_map(|r| {
            [
                r.start,
                r.end(),
                r.end().wrapping_sub(1),
                r.start.wrapping_add(4096),
            ]
        })
        .chain(hidden.iter().flat_map(|&(s, e)| [s, e, e.wrapping_sub(1)]))
        .collect();
    for _ in 0..8 {
        points.push(addr(u)?);
    }
    for &p in &points {
        let want = model(&map, gm.hidden(), p);
        let got = at(p);
        if want == Some(MemKind::Available) && got.is_none() {
            assert!(
                gm.dropped_bytes() > 0,
                "{p:#x}: RAM missing, nothing dropped"
            );
            continue;
        }
        // An entry may run to the top of the address space, whose last
        // byte is then left out.
        if p == u64::MAX && got.is_none() {
            continue;
        }
        assert_eq!(got, want, "kind at {p:#x}");
    }
    for &(s, e) in gm.hidden() {
        let mut p = s;
        while p < e {
            let entry = table
                .iter()
                .find(|x| x.addr <= p && p < x.end())
                .unwrap_or_else(|| panic!("hidden {p:#x} not in the table"));
            assert_eq!(entry.kind, MemKind::Reserved, "hidden {p:#x}");
            p = entry.end();
            if entry.end() == u64::MAX {
                break;
            }
        }
    }
    let usable: Vec<(u64, u64)> = table
        .iter()
        .filter(|e| e.kind == MemKind::Available)
        .map(|e| (e.addr, e.end()))
        .collect();
    assert_eq!(gm.usable(), &usable[..]);
    for _ in 0..4 {
        let a = addr(u)?;
        let len = u.int_in_range(0u64..=1 << 24)?;
        let ok = gm.check_usable(a, len).is_ok();
        let want = len == 0
            || a.checked_add(len).is_some_and(|end| {
                // Usable entries never touch (they would be merged).
                usable.iter().any(|&(s, e)| s <= a && end <= e)
            });
        assert_eq!(ok, want, "check_usable({a:#x}, {len:#x})");
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
