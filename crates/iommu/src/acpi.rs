//! The two small ACPI jobs around the IOMMU tables, as pure functions:
//! hiding a table from the guest, and reading the PCI Express
//! configuration space base from the MCFG.

use crate::{le16, le32, le64};

/// Renames a table's signature by replacing its first letter with 'X'
/// ("DMAR" becomes "XMAR", "IVRS" "XVRS") and fixes its checksum (byte 9,
/// ACPI 6.5 5.2.6: all bytes of the table sum to zero), as BitVisor does:
/// an OS looking for the table finds none. `table` is the whole table;
/// its header's length must match the slice. False (and nothing changed)
/// when the table is shorter than its header says, or does not carry
/// `signature`.
pub fn hide_table(table: &mut [u8], signature: &[u8; 4]) -> bool {
    let Some(len) = le32(table, 4) else {
        return false;
    };
    if table.get(..4) != Some(&signature[..]) || len as usize != table.len() || table.len() < 36 {
        return false;
    }
    table[0] = b'X';
    table[9] = 0;
    let sum = table.iter().fold(0u8, |s, &b| s.wrapping_add(b));
    table[9] = 0u8.wrapping_sub(sum);
    true
}

/// PCI segment 0's enhanced configuration space (ECAM) window in an MCFG
/// table (PCI Firmware Specification 3.2, 4.1.2: 16-byte entries from
/// byte 44: base u64, segment u16, start bus, end bus): (base, start
/// bus, end bus).
pub fn mcfg_segment0(table: &[u8]) -> Option<(u64, u8, u8)> {
    let len = (le32(table, 4)? as usize).min(table.len());
    table.get(44..len)?.chunks_exact(16).find_map(|e| {
        let base = le64(e, 0)?;
        let (start, end) = (e[10], e[11]);
        (le16(e, 8)? == 0 && base != 0 && start <= end).then_some((base, start, end))
    })
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    fn table(sig: &[u8; 4], body: &[u8]) -> Vec<u8> {
        let mut t = std::vec![0u8; 36];
        t[..4].copy_from_slice(sig);
        t.extend_from_slice(body);
        let len = t.len() as u32;
        t[4..8].copy_from_slice(&len.to_le_bytes());
        t[10..16].copy_from_slice(b"BOCHS ");
        let sum = t.iter().fold(0u8, |s, &b| s.wrapping_add(b));
        t[9] = 0u8.wrapping_sub(sum);
        t
    }

    #[test]
    fn hides_with_a_valid_checksum() {
        let mut t = table(b"DMAR", &[38, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert!(hide_table(&mut t, b"DMAR"));
        assert_eq!(&t[..4], b"XMAR");
        assert_eq!(t.iter().fold(0u8, |s, &b| s.wrapping_add(b)), 0);
        // Already hidden, or another table, or a lying length: unchanged.
        let before = t.clone();
        assert!(!hide_table(&mut t, b"DMAR"));
        assert_eq!(t, before);
        let mut t = table(b"IVRS", &[0; 12]);
        t[4] = 200;
        assert!(!hide_table(&mut t, b"IVRS"));
        assert!(!hide_table(&mut [], b"IVRS"));
    }

    #[test]
    fn mcfg() {
        let mut body = std::vec![0u8; 8];
        // Segment 1 first, then segment 0 at 0xB0000000, buses 0..=255.
        for (base, seg) in [(0xC000_0000u64, 1u16), (0xB000_0000, 0)] {
            body.extend_from_slice(&base.to_le_bytes());
            body.extend_from_slice(&seg.to_le_bytes());
            body.extend_from_slice(&[0, 0xFF, 0, 0, 0, 0]);
        }
        let t = table(b"MCFG", &body);
        assert_eq!(mcfg_segment0(&t), Some((0xB000_0000, 0, 0xFF)));
        assert_eq!(mcfg_segment0(&t[..50]), None);
        assert_eq!(mcfg_segment0(&[]), None);
    }

    proptest::proptest! {
        #[test]
        fn never_panic(mut bytes in proptest::collection::vec(0u8..=255, 0..200)) {
            let _ = mcfg_segment0(&bytes);
            let _ = hide_table(&mut bytes, b"DMAR");
        }
    }
}
