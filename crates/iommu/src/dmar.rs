//! The ACPI DMA Remapping Reporting table (DMAR), which lists Intel VT-d
//! remapping units (Intel VT-d specification rev. 4.1, chapter 8).
//!
//! Layout (8.1): the standard 36-byte header, Host Address Width (byte
//! 36, the machine's physical address width minus one), Flags (byte 37:
//! bit 0 INTR_REMAP, bit 1 X2APIC_OPT_OUT, bit 2 DMA_CTRL_PLATFORM_OPT_IN),
//! 10 reserved bytes, then remapping structures, each `Type: u16,
//! Length: u16, ...`. Type 0 is a DMA Remapping Hardware Unit Definition
//! (DRHD, 8.3): Flags (bit 0 INCLUDE_PCI_ALL), Size, Segment Number,
//! Register Base Address (u64), then device scopes. Type 1 is a Reserved
//! Memory Region Reporting structure (RMRR, 8.4): memory that devices use
//! behind the OS's back (USB legacy emulation, say), which the identity
//! map keeps reachable anyway. Other types (ATSR, RHSA, ANDD, SATC, SIDP)
//! do not change an identity map and are skipped.
//!
//! Everything is bounds-checked; a structure whose length is below 4 or
//! runs past the table ends the walk with an error rather than a guess.

use crate::{le16, le64, table_body, SDT_HEADER_LEN};

/// Remapping units kept; more are counted in [`Dmar::units_dropped`].
pub const MAX_UNITS: usize = 8;
/// Reserved memory regions kept.
pub const MAX_RMRRS: usize = 8;

/// Where the remapping structures start (8.1).
const STRUCTURES_AT: usize = 48;
const TYPE_DRHD: u16 = 0;
const TYPE_RMRR: u16 = 1;
/// DRHD Flags bit 0: the unit covers every PCI device of its segment not
/// claimed by another unit.
pub const INCLUDE_PCI_ALL: u8 = 1;

/// One DMA Remapping Hardware Unit Definition.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Drhd {
    /// DRHD Flags (bit 0 INCLUDE_PCI_ALL).
    pub flags: u8,
    /// PCI segment.
    pub segment: u16,
    /// The unit's register page (4 KiB aligned, non-zero: checked).
    pub register_base: u64,
    /// The register set's size in bytes: 2^(Size + 12) (the Size field
    /// is 0 in tables older than rev. 3.0, meaning one page).
    pub register_len: u64,
}

/// One Reserved Memory Region: [base, limit] inclusive.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rmrr {
    pub segment: u16,
    pub base: u64,
    pub limit: u64,
}

/// The DMAR table, as far as thinvisor uses it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dmar {
    /// The Host Address Width field plus one: DMA addresses are this wide.
    pub host_address_width: u8,
    /// DMAR Flags.
    pub flags: u8,
    units: [Drhd; MAX_UNITS],
    units_len: usize,
    /// Units beyond [`MAX_UNITS`] (the caller must refuse the table: an
    /// unprogrammed unit would leave its devices unprotected).
    pub units_dropped: usize,
    rmrrs: [Rmrr; MAX_RMRRS],
    rmrrs_len: usize,
}

/// Why a DMAR table cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DmarError {
    /// Not a DMAR, or its length field is below 48 or beyond the bytes.
    BadHeader,
    /// A remapping structure at this offset has a length below 4, runs
    /// past the table, or is too short for its type.
    BadStructure { offset: usize },
    /// A DRHD's register base is zero or not page-aligned.
    BadRegisterBase { offset: usize },
    /// No remapping unit at all.
    NoUnits,
}

impl core::fmt::Display for DmarError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::BadHeader => write!(f, "bad DMAR header or length"),
            Self::BadStructure { offset } => {
                write!(f, "bad remapping structure at offset {offset}")
            }
            Self::BadRegisterBase { offset } => {
                write!(f, "DRHD at offset {offset} has a bad register base")
            }
            Self::NoUnits => write!(f, "no remapping unit (DRHD)"),
        }
    }
}

impl Dmar {
    /// The remapping units.
    pub fn units(&self) -> &[Drhd] {
        &self.units[..self.units_len]
    }

    /// The reserved memory regions kept (at most [`MAX_RMRRS`]).
    pub fn rmrrs(&self) -> &[Rmrr] {
        &self.rmrrs[..self.rmrrs_len]
    }
}

/// Parses a whole DMAR table (header included). The checksum is the
/// caller's business (the ACPI layer checks it).
pub fn parse(table: &[u8]) -> Result<Dmar, DmarError> {
    let t = table_body(table, b"DMAR", STRUCTURES_AT).ok_or(DmarError::BadHeader)?;
    let mut dmar = Dmar {
        host_address_width: t
            .get(SDT_HEADER_LEN)
            .copied()
            .unwrap_or(0)
            .saturating_add(1),
        flags: t.get(SDT_HEADER_LEN + 1).copied().unwrap_or(0),
        units: [Drhd::default(); MAX_UNITS],
        units_len: 0,
        units_dropped: 0,
        rmrrs: [Rmrr::default(); MAX_RMRRS],
        rmrrs_len: 0,
    };
    let mut at = STRUCTURES_AT;
    while at < t.len() {
        let bad = DmarError::BadStructure { offset: at };
        let kind = le16(t, at).ok_or(bad)?;
        let len = usize::from(le16(t, at + 2).ok_or(bad)?);
        if len < 4 {
            return Err(bad);
        }
        let s = t.get(at..at + len).ok_or(bad)?;
        match kind {
            TYPE_DRHD => {
                if s.len() < 16 {
                    return Err(bad);
                }
                let base = le64(s, 8).ok_or(bad)?;
                if base == 0 || base & 0xFFF != 0 {
                    return Err(DmarError::BadRegisterBase { offset: at });
                }
                let size = s[5] & 0xF;
                let unit = Drhd {
                    flags: s[4],
                    segment: le16(s, 6).ok_or(bad)?,
                    register_base: base,
                    register_len: 1 << (12 + u32::from(size)),
                };
                if dmar.units_len < MAX_UNITS {
                    dmar.units[dmar.units_len] = unit;
                    dmar.units_len += 1;
                } else {
                    dmar.units_dropped += 1;
                }
            }
            TYPE_RMRR => {
                if s.len() < 24 {
                    return Err(bad);
                }
                if dmar.rmrrs_len < MAX_RMRRS {
                    dmar.rmrrs[dmar.rmrrs_len] = Rmrr {
                        segment: le16(s, 6).ok_or(bad)?,
                        base: le64(s, 8).ok_or(bad)?,
                        limit: le64(s, 16).ok_or(bad)?,
                    };
                    dmar.rmrrs_len += 1;
                }
            }
            _ => {}
        }
        at += len;
    }
    if dmar.units_len == 0 && dmar.units_dropped == 0 {
        return Err(DmarError::NoUnits);
    }
    Ok(dmar)
}

#[cfg(test)]
pub(crate) mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    /// A DMAR table: header, HAW, flags, then `structures`.
    pub fn table(haw: u8, structures: &[Vec<u8>]) -> Vec<u8> {
        let mut t = Vec::new();
        t.extend_from_slice(b"DMAR");
        t.extend_from_slice(&[0; 32]);
        t.push(haw);
        t.push(1);
        t.extend_from_slice(&[0; 10]);
        for s in structures {
            t.extend_from_slice(s);
        }
        let len = t.len() as u32;
        t[4..8].copy_from_slice(&len.to_le_bytes());
        t
    }

    /// QEMU's DRHD: INCLUDE_PCI_ALL, segment 0, registers at 0xfed90000,
    /// one IOAPIC device scope.
    pub fn drhd(base: u64) -> Vec<u8> {
        let mut s = Vec::new();
        s.extend_from_slice(&0u16.to_le_bytes());
        s.extend_from_slice(&24u16.to_le_bytes());
        s.push(INCLUDE_PCI_ALL);
        s.push(0);
        s.extend_from_slice(&0u16.to_le_bytes());
        s.extend_from_slice(&base.to_le_bytes());
        // Device scope: IOAPIC (type 3), length 8, enumeration id, bus 0xFF, path (0, 0).
        s.extend_from_slice(&[3, 8, 0, 0, 0, 0xFF, 0, 0]);
        s
    }

    fn rmrr(base: u64, limit: u64) -> Vec<u8> {
        let mut s = Vec::new();
        s.extend_from_slice(&1u16.to_le_bytes());
        s.extend_from_slice(&24u16.to_le_bytes());
        s.extend_from_slice(&[0; 4]);
        s.extend_from_slice(&base.to_le_bytes());
        s.extend_from_slice(&limit.to_le_bytes());
        s
    }

    #[test]
    fn qemu_like_table() {
        let t = table(38, &[drhd(0xfed9_0000), rmrr(0xE_0000, 0xF_FFFF)]);
        let d = parse(&t).unwrap();
        assert_eq!(d.host_address_width, 39);
        assert_eq!(
            d.units(),
            &[Drhd {
                flags: INCLUDE_PCI_ALL,
                segment: 0,
                register_base: 0xfed9_0000,
                register_len: 4096
            }]
        );
        assert_eq!(d.rmrrs().len(), 1);
        assert_eq!(d.rmrrs()[0].limit, 0xF_FFFF);
    }

    #[test]
    fn refuses_bad_tables() {
        assert_eq!(parse(b"DMAR"), Err(DmarError::BadHeader));
        assert_eq!(parse(&table(38, &[])), Err(DmarError::NoUnits));
        let mut t = table(38, &[drhd(0xfed9_0000)]);
        t[48 + 2] = 2; // structure length 2
        assert_eq!(parse(&t), Err(DmarError::BadStructure { offset: 48 }));
        let t = table(38, &[drhd(0xfed9_0800)]);
        assert_eq!(parse(&t), Err(DmarError::BadRegisterBase { offset: 48 }));
        let mut t = table(38, &[drhd(0xfed9_0000)]);
        t[4..8].copy_from_slice(&1000u32.to_le_bytes()); // longer than the bytes
        assert_eq!(parse(&t), Err(DmarError::BadHeader));
        let mut t = table(38, &[drhd(0xfed9_0000)]);
        t[0] = b'X';
        assert_eq!(parse(&t), Err(DmarError::BadHeader));
    }

    #[test]
    fn many_units_are_counted() {
        let units: Vec<Vec<u8>> = (0..10).map(|i| drhd(0xfed9_0000 + i * 0x1000)).collect();
        let d = parse(&table(38, &units)).unwrap();
        assert_eq!(d.units().len(), MAX_UNITS);
        assert_eq!(d.units_dropped, 2);
    }

    proptest::proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(0u8..=255, 0..300)) {
            let _ = parse(&bytes);
            let mut t = table(38, &[drhd(0xfed9_0000)]);
            t.extend_from_slice(&bytes);
            let len = t.len() as u32;
            t[4..8].copy_from_slice(&len.to_le_bytes());
            let _ = parse(&t);
        }

        #[test]
        fn flipped_bytes_never_panic(flips in proptest::collection::vec((0usize..200, 0u8..=255), 0..16)) {
            let mut t = table(38, &[drhd(0xfed9_0000), rmrr(0x1000, 0x1FFF)]);
            for (at, v) in flips {
                let n = t.len();
                t[at % n] = v;
            }
            let _ = parse(&t);
        }
    }
}
