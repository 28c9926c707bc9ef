//! The DMAR parser (`thinvisor_iommu::dmar::parse`) on any bytes: it must
//! not panic, and what it accepts must be sane (page-aligned, non-zero
//! register bases; at least one unit; units within the table's count).

#![no_main]

use libfuzzer_sys::fuzz_target;
use thinvisor_iommu::dmar;

fuzz_target!(|data: &[u8]| {
    // As given, and with a valid-looking header in front, so the fuzzer
    // spends its time in the structures.
    let _ = dmar::parse(data);
    let mut table = Vec::with_capacity(48 + data.len());
    table.extend_from_slice(b"DMAR");
    table.extend_from_slice(&((48 + data.len()) as u32).to_le_bytes());
    table.resize(48, 0);
    table.extend_from_slice(data);
    if let Ok(d) = dmar::parse(&table) {
        assert!(!d.units().is_empty() || d.units_dropped > 0);
        assert!(d.units().len() <= dmar::MAX_UNITS);
        for u in d.units() {
            assert!(u.register_base != 0 && u.register_base % 4096 == 0);
            assert!(u.register_len >= 4096);
        }
    }
});
