//! The IVRS parser (`thinvisor_iommu::ivrs::parse`) on any bytes: it must
//! not panic, and what it accepts must be sane (page-aligned, non-zero
//! bases, one entry per base, a device table size that fits 2 MiB).

#![no_main]

use libfuzzer_sys::fuzz_target;
use thinvisor_iommu::{amdvi, ivrs};

fuzz_target!(|data: &[u8]| {
    let _ = ivrs::parse(data);
    let mut table = Vec::with_capacity(48 + data.len());
    table.extend_from_slice(b"IVRS");
    table.extend_from_slice(&((48 + data.len()) as u32).to_le_bytes());
    table.resize(48, 0);
    table.extend_from_slice(data);
    if let Ok(i) = ivrs::parse(&table) {
        assert!(!i.units().is_empty() || i.units_dropped > 0);
        for (n, u) in i.units().iter().enumerate() {
            assert!(u.base != 0 && u.base % 4096 == 0);
            assert!(i.units()[..n].iter().all(|v| v.base != u.base || v.segment != u.segment));
            assert!(amdvi::device_table_bytes(u.max_device_id) <= 2 << 20);
        }
    }
});
