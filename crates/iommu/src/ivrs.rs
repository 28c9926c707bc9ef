//! The ACPI I/O Virtualization Reporting Structure (IVRS), which lists
//! AMD IOMMUs (AMD I/O Virtualization Technology (IOMMU) Specification,
//! rev. 3.x, 5.2 "IVRS").
//!
//! Layout (5.2.1): the standard 36-byte header, IVinfo (u32 at 36), 8
//! reserved bytes, then IVDB blocks, each `Type: u8, Flags: u8, Length:
//! u16, ...`. Types 0x10, 0x11 and 0x40 are I/O Virtualization Hardware
//! Definitions (IVHD, 5.2.2): IOMMU DeviceID (u16 at 4), Capability
//! Offset (u16 at 6), IOMMU Base Address (u64 at 8), PCI Segment Group
//! (u16 at 16), IOMMU Info (u16 at 18), then for type 0x10 IOMMU Feature
//! Reporting (u32 at 20) and device entries from byte 24; for 0x11 and
//! 0x40 IOMMU Attributes (u32 at 20), the EFR register image (u64 at 24),
//! reserved (u64 at 32) and device entries from byte 40. One IOMMU is
//! usually described twice (0x10 for old software, 0x11/0x40 for new);
//! the blocks are merged by base address. Types 0x20-0x22 (IVMD, memory
//! definitions) are skipped: the identity map keeps such memory reachable.
//!
//! The device entries (5.2.2.2, table "IVHD Device Entry Type Codes") say
//! which DeviceIDs (bus << 8 | devfn) the IOMMU serves; thinvisor uses
//! them only to size the device table: the highest DeviceID any entry
//! names, or all 65536 for a Select-All entry or an entry it cannot
//! size. Entry lengths come from the type: 0x00-0x3F 4 bytes, 0x40-0x7F 8,
//! 0x80-0xBF 16, 0xC0-0xEF 32, 0xF0 (ACPI HID) 22 plus its UID length.

use crate::{le16, le32, le64, table_body};

/// IOMMUs kept; more are counted in [`Ivrs::units_dropped`].
pub const MAX_UNITS: usize = 8;

const BLOCKS_AT: usize = 48;

/// One IOMMU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ivhd {
    /// The highest IVHD type that described it (0x10, 0x11 or 0x40).
    pub kind: u8,
    /// IVHD Flags.
    pub flags: u8,
    /// The IOMMU's own PCI DeviceID.
    pub device_id: u16,
    /// Its capability block's offset in its PCI configuration space.
    pub capability_offset: u16,
    /// Its MMIO registers (16 KiB; 4 KiB aligned and non-zero: checked).
    pub base: u64,
    pub segment: u16,
    /// The EFR register image (type 0x11/0x40), else 0.
    pub efr: u64,
    /// The highest DeviceID its device entries name (0xFFFF for all).
    pub max_device_id: u16,
}

/// The IVRS table, as far as thinvisor uses it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ivrs {
    /// IVinfo.
    pub ivinfo: u32,
    units: [Ivhd; MAX_UNITS],
    units_len: usize,
    /// IOMMUs beyond [`MAX_UNITS`] (the caller must refuse the table).
    pub units_dropped: usize,
}

impl Ivrs {
    /// The IOMMUs, one entry per register base.
    pub fn units(&self) -> &[Ivhd] {
        &self.units[..self.units_len]
    }
}

/// Why an IVRS table cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IvrsError {
    /// Not an IVRS, or its length field is below 48 or beyond the bytes.
    BadHeader,
    /// A block at this offset has a bad length (below 4, past the table,
    /// or too short for its type).
    BadBlock { offset: usize },
    /// An IVHD's base address is zero or not page-aligned.
    BadBase { offset: usize },
    /// No IVHD at all.
    NoUnits,
}

impl core::fmt::Display for IvrsError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::BadHeader => write!(f, "bad IVRS header or length"),
            Self::BadBlock { offset } => write!(f, "bad IVDB block at offset {offset}"),
            Self::BadBase { offset } => write!(f, "IVHD at offset {offset} has a bad base"),
            Self::NoUnits => write!(f, "no IOMMU (IVHD)"),
        }
    }
}

/// Parses a whole IVRS table (header included; the checksum is the
/// caller's business).
pub fn parse(table: &[u8]) -> Result<Ivrs, IvrsError> {
    let t = table_body(table, b"IVRS", BLOCKS_AT).ok_or(IvrsError::BadHeader)?;
    let mut ivrs = Ivrs {
        ivinfo: le32(t, 36).unwrap_or(0),
        units: [Ivhd::default(); MAX_UNITS],
        units_len: 0,
        units_dropped: 0,
    };
    let mut at = BLOCKS_AT;
    while at < t.len() {
        let bad = IvrsError::BadBlock { offset: at };
        let kind = *t.get(at).ok_or(bad)?;
        let len = usize::from(le16(t, at + 2).ok_or(bad)?);
        if len < 4 {
            return Err(bad);
        }
        let b = t.get(at..at + len).ok_or(bad)?;
        let entries_at = match kind {
            0x10 => Some(24),
            0x11 | 0x40 => Some(40),
            _ => None,
        };
        if let Some(entries_at) = entries_at {
            if b.len() < entries_at {
                return Err(bad);
            }
            let base = le64(b, 8).ok_or(bad)?;
            if base == 0 || base & 0xFFF != 0 {
                return Err(IvrsError::BadBase { offset: at });
            }
            let unit = Ivhd {
                kind,
                flags: b[1],
                device_id: le16(b, 4).ok_or(bad)?,
                capability_offset: le16(b, 6).ok_or(bad)?,
                base,
                segment: le16(b, 16).ok_or(bad)?,
                efr: if kind == 0x10 {
                    0
                } else {
                    le64(b, 24).ok_or(bad)?
                },
                max_device_id: max_device_id(&b[entries_at..]),
            };
            ivrs.add(unit);
        }
        at += len;
    }
    if ivrs.units_len == 0 && ivrs.units_dropped == 0 {
        return Err(IvrsError::NoUnits);
    }
    Ok(ivrs)
}

impl Ivrs {
    /// Adds `unit`, merged with an earlier block of the same IOMMU.
    fn add(&mut self, unit: Ivhd) {
        let same = self.units[..self.units_len]
            .iter_mut()
            .find(|u| u.base == unit.base && u.segment == unit.segment);
        match same {
            Some(u) => {
                u.max_device_id = u.max_device_id.max(unit.max_device_id);
                if unit.kind > u.kind {
                    u.kind = unit.kind;
                    u.flags = unit.flags;
                    u.efr = unit.efr;
                }
            }
            None if self.units_len < MAX_UNITS => {
                self.units[self.units_len] = unit;
                self.units_len += 1;
            }
            None => self.units_dropped += 1,
        }
    }
}

/// The highest DeviceID the device entries name; 0xFFFF for Select All or
/// for an entry whose length is unknown (so the table covers everything).
fn max_device_id(entries: &[u8]) -> u16 {
    let mut max = 0u16;
    let mut at = 0;
    while at < entries.len() {
        let kind = entries[at];
        let len = match kind {
            0x00..=0x3F => 4,
            0x40..=0x7F => 8,
            0x80..=0xBF => 16,
            0xC0..=0xEF => 32,
            // ACPI HID device: UID length at byte 21.
            0xF0 => match entries.get(at + 21) {
                Some(&uid) => 22 + usize::from(uid),
                None => return 0xFFFF,
            },
            _ => return 0xFFFF,
        };
        let Some(e) = entries.get(at..at + len) else {
            return 0xFFFF;
        };
        let ids: [Option<u16>; 2] = match kind {
            // Select All.
            0x01 => return 0xFFFF,
            // Select, start of range, end of range; extended select and
            // range start; ACPI HID device.
            0x02..=0x04 | 0x46 | 0x47 | 0xF0 => [le16(e, 1), None],
            // Alias select and alias range start: the device and the ID
            // it uses.
            0x42 | 0x43 => [le16(e, 1), le16(e, 5)],
            // Special device (IOAPIC, HPET): the ID it uses.
            0x48 => [le16(e, 5), None],
            _ => [None, None],
        };
        for id in ids.into_iter().flatten() {
            max = max.max(id);
        }
        at += len;
    }
    max
}

#[cfg(test)]
pub(crate) mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    pub fn table(blocks: &[Vec<u8>]) -> Vec<u8> {
        let mut t = Vec::new();
        t.extend_from_slice(b"IVRS");
        t.extend_from_slice(&[0; 32]);
        t.extend_from_slice(&0x0020_3040u32.to_le_bytes());
        t.extend_from_slice(&[0; 8]);
        for b in blocks {
            t.extend_from_slice(b);
        }
        let len = t.len() as u32;
        t[4..8].copy_from_slice(&len.to_le_bytes());
        t
    }

    pub fn ivhd(kind: u8, base: u64, entries: &[u8]) -> Vec<u8> {
        let header = if kind == 0x10 { 24 } else { 40 };
        let mut b = std::vec![0u8; header];
        b[0] = kind;
        b[1] = 0xD1;
        let len = (header + entries.len()) as u16;
        b[2..4].copy_from_slice(&len.to_le_bytes());
        b[4..6].copy_from_slice(&0x0010u16.to_le_bytes());
        b[6..8].copy_from_slice(&0x40u16.to_le_bytes());
        b[8..16].copy_from_slice(&base.to_le_bytes());
        if kind != 0x10 {
            b[24..32].copy_from_slice(&0x40u64.to_le_bytes());
        }
        b.extend_from_slice(entries);
        b
    }

    #[test]
    fn qemu_like_table() {
        // Select All; then the same IOMMU again as type 0x11.
        let t = table(&[
            ivhd(0x10, 0xfed8_0000, &[1, 0, 0, 0]),
            ivhd(0x11, 0xfed8_0000, &[1, 0, 0, 0]),
        ]);
        let i = parse(&t).unwrap();
        assert_eq!(i.units().len(), 1);
        let u = i.units()[0];
        assert_eq!(
            (u.kind, u.base, u.max_device_id, u.efr),
            (0x11, 0xfed8_0000, 0xFFFF, 0x40)
        );
        assert_eq!((u.device_id, u.capability_offset), (0x10, 0x40));
    }

    #[test]
    fn device_entries_size_the_table() {
        // Range 00:00.0 .. 03:1f.7, an alias to 05:00.0, an IOAPIC as 00:14.0.
        let entries = [
            3, 0x00, 0x00, 0, 4, 0xFF, 0x03, 0, // range
            0x42, 0x08, 0x00, 0, 0, 0x00, 0x05, 0, // alias select
            0x48, 0, 0, 0xD7, 0x21, 0xA0, 0x00, 1, // special: IOAPIC
        ];
        let i = parse(&table(&[ivhd(0x10, 0xfeb8_0000, &entries)])).unwrap();
        assert_eq!(i.units()[0].max_device_id, 0x0500);
        // An unknown variable-length type: assume everything.
        let i = parse(&table(&[ivhd(0x10, 0xfeb8_0000, &[0xF5, 0, 0, 0])])).unwrap();
        assert_eq!(i.units()[0].max_device_id, 0xFFFF);
    }

    #[test]
    fn refuses_bad_tables() {
        assert_eq!(parse(&[]), Err(IvrsError::BadHeader));
        assert_eq!(parse(&table(&[])), Err(IvrsError::NoUnits));
        let mut t = table(&[ivhd(0x10, 0xfed8_0000, &[])]);
        t[50] = 3;
        t[51] = 0;
        assert_eq!(parse(&t), Err(IvrsError::BadBlock { offset: 48 }));
        let t = table(&[ivhd(0x10, 0xfed8_0010, &[])]);
        assert_eq!(parse(&t), Err(IvrsError::BadBase { offset: 48 }));
        // An IVMD only.
        let mut ivmd = std::vec![0u8; 32];
        ivmd[0] = 0x20;
        ivmd[2] = 32;
        assert_eq!(parse(&table(&[ivmd])), Err(IvrsError::NoUnits));
    }

    proptest::proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(0u8..=255, 0..300)) {
            let _ = parse(&bytes);
            let mut t = table(&[ivhd(0x11, 0xfed8_0000, &[])]);
            t.extend_from_slice(&bytes);
            let len = t.len() as u32;
            t[4..8].copy_from_slice(&len.to_le_bytes());
            let _ = parse(&t);
        }

        #[test]
        fn flipped_bytes_never_panic(flips in proptest::collection::vec((0usize..200, 0u8..=255), 0..16)) {
            let mut t = table(&[ivhd(0x10, 0xfed8_0000, &[3, 0, 0, 0, 4, 0xFF, 0xFF, 0]), ivhd(0x11, 0xfed8_0000, &[1, 0, 0, 0])]);
            for (at, v) in flips {
                let n = t.len();
                t[at % n] = v;
            }
            let _ = parse(&t);
        }
    }
}
